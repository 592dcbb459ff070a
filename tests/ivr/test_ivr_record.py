"""torecord and voicemail (DESIGN §3), through the sans-IO machine on a virtual clock,
every state crossing JSON between steps (see sim.py)."""

from __future__ import annotations

import time
from typing import Any, Literal

import pytest

from pbx.ivr import machine
from pbx.messages import (
    HangupCommand,
    MediaFailure,
    PlayCommand,
    RecordCommand,
    StopRecordCommand,
    TimerCommand,
)
from tests.ivr.sim import Sim, play

T0 = 1_764_288_000.0  # 2025-11-28 00:00:00 UTC


def stamp(now: float) -> str:
    return time.strftime("%Y%m%d_%H%M%S", time.gmtime(now))


def sim_at(answers: Any, **kw: Any) -> Sim:
    sim = Sim(answers, **kw)
    sim.now = T0
    return sim


def record(record_id: int, path: str, **kw: Any) -> RecordCommand:
    return RecordCommand(record_id=record_id, path=path, stop_digits="#", **kw)


# ---------------------------------------------------------------- torecord


def test_torecord_prompt_beep_record_then_recording_complete() -> None:
    sim = sim_at(
        [
            {"type": "torecord", "prompt": "sounds/leave.wav", "beep": True,
             "max_duration_secs": 30},
            {"type": "hangup"},
        ]
    )  # fmt: skip
    assert sim.start() == [play(1, "sounds/leave.wav")]
    assert sim.phase == "record_prompt"
    # Digits during the prompt are dropped: a `#` must not end the recording at once.
    assert sim.digit("#") == []
    assert sim.audio_done(1) == [
        record(1, f"sess-1/{stamp(sim.now)}.wav", max_duration_ms=30_000, beep=True)
    ]
    assert sim.phase == "recording"
    path = f"sess-1/{stamp(sim.now)}.wav"
    # The stop digit is the media worker's business.
    assert sim.digit("#") == [] and len(sim.sent) == 1
    assert sim.recorded(1, path, 4_600) == [HangupCommand(reason="Normal")]
    url = f"recordings/{path}"
    assert sim.events[-1] == {"type": "recording_complete", "url": url, "duration_secs": 5}
    assert sim.sent[-1]["variables"]["recording_url"] == url
    assert sim.sent[-1]["variables"]["recording_duration"] == "5"
    assert sim.notified_body("end")["reason"] == "Normal"


def test_torecord_defaults_no_prompt_no_beep_120_s() -> None:
    sim = sim_at([{"type": "torecord"}])
    (cmd,) = sim.start()
    assert cmd == record(1, f"sess-1/{stamp(sim.now)}.wav", max_duration_ms=120_000)
    assert cmd.area == "recordings" and not cmd.beep and cmd.metadata is None


def test_torecord_max_duration_is_bounded() -> None:
    for secs, expected_ms in ((0, 120_000), (-5, 120_000), (1, 1_000), (10**6, 3_600_000)):
        sim = sim_at([{"type": "torecord", "max_duration_secs": secs}])
        (cmd,) = sim.start()
        assert isinstance(cmd, RecordCommand) and cmd.max_duration_ms == expected_ms, secs


@pytest.mark.parametrize(
    ("reason", "ms", "secs"),
    [("max_duration", 30_000, 30), ("stopped", 200, 0), ("error", 1_499, 1), ("dtmf", 500, 1)],
)
def test_recording_complete_in_every_finish_reason(
    reason: Literal["dtmf", "max_duration", "stopped", "error"], ms: int, secs: int
) -> None:
    sim = sim_at([{"type": "torecord"}, {"type": "hangup"}])
    (cmd,) = sim.start()
    sim.recorded(1, cmd.path, ms, reason)
    assert sim.events[-1]["duration_secs"] == secs


def test_caller_hangup_while_recording_ends_without_provider_call() -> None:
    sim = sim_at([{"type": "torecord", "beep": True}])
    sim.start()
    assert sim.hang_up() == []
    assert len(sim.sent) == 1 and sim.done
    assert sim.notified_body("end")["reason"] == "Hangup"
    assert sim.traces[-1].end_reason == "Hangup"
    # A late RecordingFinished is ignored.
    assert sim.recorded(1, "x.wav", 100) == []


def test_torecord_next_is_followed_locally() -> None:
    sim = sim_at(
        [
            {
                "type": "torecord",
                "next": {"type": "prompt", "file": "sounds/thanks_$recording_duration$.wav"},
            },
            {"type": "hangup"},
        ]
    )
    (cmd,) = sim.start()
    assert sim.recorded(1, cmd.path, 7_000) == [play(1, "sounds/thanks_7.wav")]
    assert len(sim.sent) == 1
    assert sim.variables["recording_url"] == f"recordings/{cmd.path}"
    sim.audio_done(1)
    assert sim.events[-1] == {"type": "audio_complete", "interrupted": False}


def test_stale_recording_finished_is_ignored() -> None:
    sim = sim_at([{"type": "torecord"}])
    (cmd,) = sim.start()
    assert sim.recorded(7, cmd.path, 1_000) == []
    assert sim.phase == "recording" and len(sim.sent) == 1


def test_two_recordings_in_one_second_get_distinct_paths() -> None:
    sim = sim_at([{"type": "torecord"}, {"type": "torecord"}, {"type": "hangup"}])
    (first,) = sim.start()
    sim.now -= 0.5  # the next event lands in the same second
    (second,) = sim.recorded(1, first.path, 100)
    assert isinstance(second, RecordCommand) and second.record_id == 2
    assert first.path == f"sess-1/{stamp(T0)}.wav"
    assert second.path == f"sess-1/{stamp(T0)}_2.wav"


def test_recording_refused_by_media_worker_sends_error() -> None:
    sim = sim_at([{"type": "torecord"}, {"type": "hangup"}])
    sim.start()
    # A refused start is a MediaFailure and nothing else: after a grace period, error.
    grace = TimerCommand(timer_id=1, delay_ms=machine.RECORD_FAILURE_GRACE_MS)
    assert sim.media(MediaFailure(reason="path escapes the area")) == [grace]
    assert "recording: path escapes the area" in (sim.traces[-1].error or "")
    assert len(sim.sent) == 1
    assert sim.timer(1) == [HangupCommand(reason="Normal")]
    assert sim.events[-1] == {
        "type": "error",
        "reason": "recording failed: path escapes the area",
    }


def test_write_error_still_gives_recording_complete() -> None:
    # The media worker reports a write error, then the RecordingFinished of what was kept.
    sim = sim_at([{"type": "torecord"}, {"type": "hangup"}])
    (cmd,) = sim.start()
    sim.media(MediaFailure(reason="x.wav: write failed: No space left on device"))
    assert sim.recorded(1, cmd.path, 2_000, "error") == [
        TimerCommand(timer_id=1, delay_ms=0),
        HangupCommand(reason="Normal"),
    ]
    assert sim.events[-1]["type"] == "recording_complete"
    assert sim.timer(1) == []  # stale


def test_torecord_prompt_failure_sends_error() -> None:
    sim = sim_at([{"type": "torecord", "prompt": "sounds/missing.wav"}, {"type": "hangup"}])
    sim.start()
    sim.media(MediaFailure(reason="no such prompt", play_id=1))
    assert sim.events[-1] == {"type": "error", "reason": "playback failed: no such prompt"}


def test_abort_while_recording_stops_the_recording() -> None:
    sim = sim_at([{"type": "torecord"}])
    sim.start()
    assert sim.state is not None
    commands = sim.run(machine.abort(sim.state, None, "internal error: boom", sim.now))
    assert commands == [StopRecordCommand(), play(1, machine.ERROR_PROMPT)]
    assert sim.phase == "closing"


def test_media_failure_without_play_or_record_is_ignored() -> None:
    sim = sim_at([{"type": "collect_dtmf", "timeout_ms": 1000}])
    sim.start()
    assert sim.media(MediaFailure(reason="late")) == []
    assert sim.phase == "collect_wait"


# ---------------------------------------------------------------- voicemail


def voicemail_record(sim: Sim, target: str = "1001", mailbox: str = "1001") -> RecordCommand:
    return record(
        1,
        f"{mailbox}/{stamp(sim.now)}_sess-1.wav",
        area="voicemail",
        max_duration_ms=machine.VOICEMAIL_MAX_SECS * 1000,
        beep=True,
        metadata={
            "caller": "1001",
            "callee": "*99",
            "target": target,
            "session_id": "sess-1",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sim.now)),
        },
    )


def test_voicemail_greeting_beep_message_goodbye_hangup() -> None:
    sim = sim_at([{"type": "voicemail", "target": "1001", "next": {"type": "hangup"}}])
    assert sim.start() == [play(1, "sounds/voicemail_greeting.wav")]
    assert sim.phase == "vm_greeting"
    assert sim.digit("5") == []
    commands = sim.audio_done(1)
    assert commands == [voicemail_record(sim)]
    path = commands[0].path
    assert sim.digit("#") == []
    assert sim.recorded(1, path, 12_000) == [play(2, machine.VOICEMAIL_GOODBYE)]
    assert len(sim.sent) == 1  # no provider call: voicemail is terminal
    assert not sim.done
    assert sim.audio_done(2) == [HangupCommand(reason="Voicemail(1001)")]
    assert sim.done
    assert sim.notified_body("end")["reason"] == "Voicemail(1001)"
    assert sim.traces[-1].end_reason == "Voicemail(1001)"


def test_voicemail_without_greeting_file_is_beep_only() -> None:
    sim = sim_at([{"type": "voicemail", "target": "1001"}])
    sim.start()
    commands = sim.media(MediaFailure(reason="no such prompt", play_id=1))
    assert commands == [voicemail_record(sim)]


def test_voicemail_custom_greeting_and_unsafe_mailbox() -> None:
    sim = sim_at([{"type": "voicemail", "target": "../../etc", "greeting": "sounds/vm.wav"}])
    assert sim.start() == [play(1, "sounds/vm.wav")]
    (cmd,) = sim.audio_done(1)
    assert cmd == voicemail_record(sim, target="../../etc", mailbox="_.._.._etc")


def test_voicemail_metadata_failure_still_says_goodbye() -> None:
    sim = sim_at([{"type": "voicemail", "target": "1001"}])
    sim.start()
    (cmd,) = sim.audio_done(1)
    sim.media(MediaFailure(reason="x.wav.json: cannot write"))
    assert sim.recorded(1, cmd.path, 5_000) == [
        TimerCommand(timer_id=1, delay_ms=0),
        play(2, machine.VOICEMAIL_GOODBYE),
    ]


def test_voicemail_caller_hangup_is_the_normal_end() -> None:
    for when in ("greeting", "recording", "goodbye"):
        sim = sim_at([{"type": "voicemail", "target": "2001"}])
        sim.start()
        if when != "greeting":
            (cmd,) = sim.audio_done(1)
            if when == "goodbye":
                sim.recorded(1, cmd.path, 3_000)
        assert sim.hang_up() == []
        assert sim.done and len(sim.sent) == 1
        assert sim.notified_body("end")["reason"] == "Voicemail(2001)", when


def test_voicemail_recording_failure_is_an_error() -> None:
    sim = sim_at([{"type": "voicemail", "target": "1001"}])
    sim.start()
    sim.audio_done(1)
    sim.media(MediaFailure(reason="disk full"))
    commands = sim.timer(1)
    assert commands == [play(2, machine.ERROR_PROMPT)]
    assert sim.audio_done(2) == [
        HangupCommand(reason="Error(voicemail: recording failed: disk full)")
    ]
    assert sim.notified_body("end")["reason"].startswith("Error(voicemail")


def test_voicemail_from_menu_entry_substitutes_target() -> None:
    menu = {
        "type": "dtmf_menu",
        "greeting": "sounds/menu.wav",
        "entries": {"3": {"type": "voicemail", "target": "$callee$"}},
        "variables": {"callee": "2001"},
    }
    sim = sim_at([menu])
    sim.start()
    assert sim.digit("3", stopped=1) == [play(2, machine.VOICEMAIL_GREETING)]
    (cmd,) = sim.audio_done(2)
    assert isinstance(cmd, RecordCommand) and cmd.path.startswith("2001/")
    assert cmd.metadata is not None and cmd.metadata["target"] == "2001"


def test_play_commands_are_plain_prompts() -> None:
    # The beep is the media worker's (RecordCommand.beep), not a PlayCommand.
    sim = sim_at([{"type": "torecord", "beep": True}])
    assert not any(isinstance(c, PlayCommand) for c in sim.start())

"""How long a session may wait for a call event (`Step.wait_ms`, the reply's `wait_ms`)
and what it does when the front says nothing came (`WaitExpiredInput`), on the machine
with a virtual clock (issue 8: no session waits in silence)."""

from __future__ import annotations

from typing import Any

from pbx.ivr import machine
from pbx.messages import (
    HangupCommand,
    StopCommand,
    StopRecordCommand,
    TimerCommand,
)
from tests.ivr.sim import Sim, play

HANGUP = {"type": "hangup"}


def collect(**fields: Any) -> dict[str, Any]:
    return {"type": "collect_dtmf", "max_digits": 16, "timeout_ms": 30_000, **fields}


def test_collect_without_prompt_waits_as_long_as_its_timer() -> None:
    sim = Sim([collect()])
    assert sim.start() == [TimerCommand(timer_id=1, delay_ms=30_000)]
    assert sim.wait_ms == 30_000
    # A digit re-arms the (inter-digit) timer: the bound starts again.
    assert sim.digit("4") == [TimerCommand(timer_id=2, delay_ms=30_000)]
    assert sim.wait_ms == 30_000
    # An event that changes nothing (a stale timer) leaves what is left of the bound.
    assert sim.timer(1) == []
    assert sim.wait_ms == 30_000 - 500


def test_collect_with_prompt_has_no_bound_until_the_prompt_ends() -> None:
    sim = Sim([collect(prompt="sounds/enter.wav")])
    assert sim.start() == [play(1, "sounds/enter.wav", True)]
    assert sim.wait_ms is None  # a prompt's length is not known here
    sim.audio_done(1)
    assert sim.wait_ms == 30_000


def test_menu_waits_for_its_timeout_after_the_greeting() -> None:
    menu = {"type": "dtmf_menu", "greeting": "sounds/menu.wav", "timeout_ms": 4000,
            "entries": {"1": HANGUP}}
    sim = Sim([menu])
    sim.start()
    assert sim.phase == "menu_greeting" and sim.wait_ms is None
    sim.audio_done(1)
    assert sim.phase == "menu_wait" and sim.wait_ms == 4000


def test_recording_waits_for_its_longest_length() -> None:
    sim = Sim([{"type": "torecord", "max_duration_secs": 60}])
    sim.start()
    assert sim.phase == "recording"
    assert sim.wait_ms == 60_000 + round(machine.RECORD_END_SLACK_S * 1000)


def test_no_bound_while_waiting_for_the_provider_or_when_done() -> None:
    sim = Sim([HANGUP])
    assert sim.start() == [HangupCommand(reason="Normal")]
    assert sim.done and sim.wait_ms is None


def test_lost_digit_timer_becomes_an_error_event_for_the_provider() -> None:
    sim = Sim([collect(), HANGUP])
    sim.start()
    commands = sim.wait_expired(35_000)
    # The timer is given up (a late firing is stale), the provider hears why.
    assert commands == [TimerCommand(timer_id=1, delay_ms=0), HangupCommand(reason="Normal")]
    assert sim.events[-1]["type"] == "error"
    reason = sim.events[-1]["reason"]
    assert "35000 ms" in reason and "collect_dtmf" in reason, reason
    errors = [t.error for t in sim.traces if t.error]
    assert any("collect_dtmf" in e for e in errors), sim.traces
    assert sim.done


def test_late_timer_after_the_error_is_stale() -> None:
    sim = Sim([collect(), collect()])
    sim.start()
    assert sim.wait_expired(35_000) == [TimerCommand(timer_id=1, delay_ms=0),
                                        TimerCommand(timer_id=2, delay_ms=30_000)]
    asked = len(sim.sent)
    assert sim.timer(1) == []  # the lost one, found after all: ignored
    assert len(sim.sent) == asked and sim.wait_ms == 30_000 - 500


def test_lost_prompt_end_stops_it_and_tells_the_provider() -> None:
    sim = Sim([{"type": "prompt", "file": "sounds/news.wav"}, HANGUP])
    sim.start()
    assert sim.phase == "prompt"
    assert sim.wait_expired(605_000) == [StopCommand(), HangupCommand(reason="Normal")]
    assert sim.events[-1]["type"] == "error" and "prompt" in sim.events[-1]["reason"]


def test_lost_recording_end_stops_the_recording() -> None:
    sim = Sim([{"type": "torecord", "max_duration_secs": 60}, HANGUP])
    sim.start()
    assert sim.wait_expired(67_000) == [StopRecordCommand(), HangupCommand(reason="Normal")]
    assert sim.events[-1]["type"] == "error"


def test_closing_session_just_hangs_up() -> None:
    sim = Sim([{"type": "play_and_hangup", "prompt": "sounds/bye.wav"}])
    sim.start()
    assert sim.phase == "closing"
    assert sim.wait_expired(605_000) == [StopCommand(), HangupCommand(reason="Normal")]
    assert sim.done and len(sim.sent) == 1  # no provider step on the way out


def test_voicemail_without_its_recording_end_fails_with_the_error_prompt() -> None:
    sim = Sim([{"type": "voicemail", "target": "2001"}])
    sim.start()
    assert sim.phase == "vm_greeting"
    commands = sim.wait_expired(605_000)
    assert commands[0] == StopCommand()
    assert commands[-1] == play(2, machine.ERROR_PROMPT)
    assert sim.phase == "closing" and len(sim.sent) == 1


def test_after_the_end_it_is_ignored() -> None:
    sim = Sim([HANGUP])
    sim.start()
    assert sim.wait_expired(1000) == []
    assert sim.done and len(sim.sent) == 1

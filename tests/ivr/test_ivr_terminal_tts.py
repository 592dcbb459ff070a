"""queue, route_to_agent, voip_bridge, TTS (tts_text, greeting_text) and ASR through the
sans-IO machine on a virtual clock, every state crossing JSON between steps."""

from __future__ import annotations

from typing import Any

from pbx.ivr import machine
from pbx.ivr.requests import TtsResult
from pbx.messages import (
    AgentCommand,
    HangupCommand,
    QueueCommand,
    SessionStartInput,
    TimerCommand,
    WsBridgeCommand,
    WsBridgeEnded,
)
from tests.ivr.sim import Sim, fake_tts, play

# ---------------------------------------------------------------- terminal actions


def assert_ended(sim: Sim, reason: str) -> None:
    assert sim.done
    assert sim.notified_body("end") == {"reason": reason, "session_id": "sess-1"}
    assert sim.traces[-1].end_reason == reason


def test_queue() -> None:
    sim = Sim([{"type": "queue", "target": "support", "next": {"type": "hangup"}}])
    assert sim.start() == [QueueCommand(target="support")]
    assert_ended(sim, "Queue(support)")
    assert sim.traces[-1].action_type == "queue"


def test_queue_return_to_ivr_then_session_starts_again() -> None:
    sim = Sim(
        [
            {"type": "queue", "target": "$queue$", "return_to_ivr": True,
             "variables": {"queue": "sales"}},
            {"type": "hangup"},
        ]
    )  # fmt: skip
    assert sim.start() == [QueueCommand(target="sales", return_to_ivr=True)]
    assert_ended(sim, "Queue(sales)")
    # Nobody answered: the front starts the IVR again on the same call.
    back = sim.call.model_copy(
        update={"variables": {"transferred_from": "queue", "return_reason": "no_answer"}}
    )
    assert sim.send(SessionStartInput(call=back)) == [HangupCommand(reason="Normal")]
    assert sim.events[-1] == {"type": "session_start"}
    assert sim.sent[-1]["variables"]["transferred_from"] == "queue"
    assert sim.sent[-1]["variables"]["return_reason"] == "no_answer"
    assert sim.kinds().count("start") == 2


def test_queue_from_menu_entry() -> None:
    menu = {
        "type": "dtmf_menu",
        "greeting": "sounds/menu.wav",
        "entries": {"2": {"type": "queue", "target": "support"}},
    }
    sim = Sim([menu])
    sim.start()
    assert sim.digit("2", stopped=1) == [QueueCommand(target="support")]
    assert sim.notified_body("dtmf_match")["action"] == {
        "type": "queue",
        "target": "support",
        "return_to_ivr": False,
    }
    assert_ended(sim, "Queue(support)")


def test_route_to_agent() -> None:
    sim = Sim([{"type": "route_to_agent", "target": "9200", "skill_group_id": "sales",
                "key_id": "k", "channel_code": "c"}])  # fmt: skip
    # key_id and channel_code ride along (to the agent's INVITE, pbx.calls.queue).
    assert sim.start() == [AgentCommand(target="9200", skill_group_id="sales", key_id="k",
                                        channel_code="c")]
    assert_ended(sim, "Agent(9200)")
    sim2 = Sim([{"type": "route_to_agent", "target": "9201"}])
    assert sim2.start() == [AgentCommand(target="9201")]


def test_voip_bridge() -> None:
    sim = Sim(
        [
            {
                "type": "voip_bridge",
                "create_room_uri": "wss://rooms.test/new?session=$session_id$",
                "headers": {"Authorization": "Bearer $caller$"},
                "timeout_ms": 5000,
            }
        ]
    )
    assert sim.start() == [
        WsBridgeCommand(
            uri="wss://rooms.test/new?session=sess-1",
            headers={"Authorization": "Bearer 1001"},
            timeout_ms=5000,
        )
    ]
    assert_ended(sim, "VoipBridge")
    # The bridge's end is the front's business: ignored here.
    assert sim.media(WsBridgeEnded(reason="closed by peer")) == []


def test_voip_bridge_default_timeout() -> None:
    for timeout in (None, 0):
        node: dict[str, Any] = {"type": "voip_bridge", "create_room_uri": "ws://x"}
        if timeout is not None:
            node["timeout_ms"] = timeout
        (cmd,) = Sim([node]).start()
        assert isinstance(cmd, WsBridgeCommand) and cmd.timeout_ms == 30_000


def test_ws_bridge_ended_mid_session_is_ignored() -> None:
    sim = Sim([{"type": "prompt", "file": "sounds/a.wav"}])
    sim.start()
    assert sim.media(WsBridgeEnded(reason="timeout")) == []
    assert sim.phase == "prompt"


# ---------------------------------------------------------------- TTS


def test_tts_prompt_is_synthesised_then_played() -> None:
    sim = Sim(
        [
            {"type": "prompt", "tts_text": "Hello $caller$", "tts_voice": "en-gb",
             "interruptible": True},
            {"type": "hangup"},
        ],
        tts=fake_tts,
    )  # fmt: skip
    assert sim.start() == [play(1, ".tts/Hello 1001|en-gb.wav", interruptible=True)]
    assert sim.tts_sent == [("Hello 1001", "en-gb")]
    assert len(sim.sent) == 1 and sim.phase == "prompt"
    sim.audio_done(1)
    assert sim.events[-1] == {"type": "audio_complete", "interrupted": False}


def test_tts_prompt_request_shape() -> None:
    sim = Sim([{"type": "prompt", "tts_text": "hi"}])
    step = machine.start(sim.call, 1.0)
    step = machine.provider_result(
        step.state, sim.answer(sim.call.params.url, {"event": None}), 2.0
    )
    request = step.tts_request
    assert request is not None and step.pending_request is request
    assert step.step_request is None and step.api_request is None
    assert (request.kind, request.url, request.body) == ("tts", "", {"text": "hi", "voice": None})
    assert step.waiting_for_provider and not step.commands


def test_file_wins_over_tts_text() -> None:
    sim = Sim([{"type": "prompt", "file": "sounds/a.wav", "tts_text": "x"}], tts=fake_tts)
    assert sim.start() == [play(1, "sounds/a.wav")]
    assert sim.tts_sent == []


def test_tts_failure_reason_goes_to_the_provider() -> None:
    def broken(text: str, voice: str | None) -> TtsResult:
        return TtsResult(error="TTS failed: espeak-ng: exit 1")

    sim = Sim([{"type": "prompt", "tts_text": "x"}, {"type": "hangup"}], tts=broken)
    assert sim.start() == [HangupCommand(reason="Normal")]
    assert sim.events[-1] == {"type": "error", "reason": "TTS failed: espeak-ng: exit 1"}
    assert any("tts: TTS failed" in (t.error or "") for t in sim.traces)


def test_tts_prompt_with_next_menu_takes_the_interrupting_digit() -> None:
    node = {
        "type": "prompt",
        "tts_text": "Your balance is 5 dollars.",
        "interruptible": True,
        "next": {
            "type": "dtmf_menu",
            "greeting": "sounds/menu.wav",
            "entries": {"1": {"type": "queue", "target": "support"}},
        },
    }
    sim = Sim([node], tts=fake_tts)
    sim.start()
    assert sim.digit("1", stopped=1) == [QueueCommand(target="support")]


def menu_text(**extra: Any) -> dict[str, Any]:
    return {
        "type": "dtmf_menu",
        "greeting_text": "Press 1 for $caller$.",
        "timeout_ms": 3000,
        "max_retries": 3,
        "entries": {"1": {"type": "transfer", "target": "2001"}},
        **extra,
    }


def test_greeting_text_is_synthesised_once_per_menu() -> None:
    notice = {"type": "prompt", "file": "sounds/timeout.wav"}
    sim = Sim([menu_text(timeout_action=notice)], tts=fake_tts)
    greeting = ".tts/Press 1 for 1001.|default.wav"
    assert sim.start() == [play(1, greeting, interruptible=True)]
    assert sim.phase == "menu_greeting"
    assert sim.audio_done(1) == [TimerCommand(timer_id=1, delay_ms=3000)]
    assert sim.timer(1) == [play(2, "sounds/timeout.wav")]
    assert sim.audio_done(2) == [play(3, greeting, interruptible=True)]
    assert sim.tts_sent == [("Press 1 for 1001.", None)]
    sim.digit("1", stopped=3)
    assert sim.notified_body("end")["reason"] == "Transfer(2001)"


def test_menu_notice_with_tts_text() -> None:
    invalid = {"type": "prompt", "tts_text": "Not $x$.", "variables": {"x": "valid"}}
    sim = Sim([menu_text(greeting="sounds/menu.wav", invalid_action=invalid)], tts=fake_tts)
    assert sim.start() == [play(1, "sounds/menu.wav", interruptible=True)]
    assert sim.digit("7", stopped=1) == [play(2, ".tts/Not valid.|default.wav")]
    assert sim.phase == "menu_notice"
    assert sim.audio_done(2) == [play(3, "sounds/menu.wav", interruptible=True)]
    # greeting wins over greeting_text
    assert sim.tts_sent == [("Not valid.", None)]


def test_greeting_text_without_tts_sends_error() -> None:
    sim = Sim([menu_text(), {"type": "hangup"}])
    assert sim.start() == [HangupCommand(reason="Normal")]
    assert sim.events[-1] == {"type": "error", "reason": machine.TTS_UNAVAILABLE}


def test_tts_error_loop_is_still_bounded() -> None:
    sim = Sim(lambda body: {"type": "prompt", "tts_text": "again"})
    sim.start()
    assert len(sim.sent) == machine.MAX_CHAINED_STEPS
    assert len(sim.tts_sent) == machine.MAX_CHAINED_STEPS
    assert sim.phase == "closing"


# ---------------------------------------------------------------- ASR


def test_input_voice_without_asr_sends_error() -> None:
    sim = Sim([{"type": "input_voice", "scene": "order"}, {"type": "hangup"}])
    assert sim.start() == [HangupCommand(reason="Normal")]
    assert sim.events[-1] == {"type": "error", "reason": "ASR service not available"}

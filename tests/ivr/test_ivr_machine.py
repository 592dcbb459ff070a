"""The step-mode machine on a virtual clock, no I/O (driven by `tests.ivr.sim.Sim`).

Every state crosses an orjson dump/load and every input an IvrEvent encode/decode
between steps, as they do over ZeroMQ.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from pbx.ivr import machine
from pbx.ivr.requests import ProviderResult
from pbx.messages import (
    CallEndedInput,
    DtmfDigit,
    HangupCommand,
    MediaFailure,
    MediaInput,
    StopCommand,
    TimerCommand,
    TransferCommand,
)
from tests.ivr.sim import URL, WELCOME_MENU, Answer, Sim, play

# ---------------------------------------------------------------- start, happy path


def test_start_notifies_then_asks_session_start() -> None:
    sim = Sim([WELCOME_MENU], ivr_id="proj_42", tenant_id="t1")
    commands = sim.start()
    assert sim.kinds() == ["start"]
    kind, url, body = sim.notified[0]
    assert url == URL + "/start"
    assert body == {
        "session_id": "sess-1",
        "caller": "1001",
        "callee": "*99",
        "direction": "inbound",
        "tenant_id": "t1",
        "ivr_id": "proj_42",
    }
    ctx = sim.sent[0]
    assert ctx["event"] == {"type": "session_start"}
    assert ctx["ivr_id"] == "proj_42" and ctx["tenant_id"] == "t1"
    assert ctx["variables"] == {
        "session_id": "sess-1",
        "caller": "1001",
        "callee": "*99",
        "direction": "inbound",
        "tenant_id": "t1",
        "sip_X-Customer": "gold",
    }
    assert commands == [play(1, "sounds/ivr/welcome.wav", True)]
    assert not sim.done
    (trace,) = sim.traces
    assert trace.trigger == "session_start"
    assert trace.action_type == "prompt"
    assert trace.action == WELCOME_MENU
    assert trace.request == ctx
    assert trace.duration_ms == pytest.approx(40.0)
    assert trace.step_index == 1 and trace.call_id == "call-1" and trace.error is None


def test_welcome_then_menu_digit_1_transfers_locally() -> None:
    sim = Sim([WELCOME_MENU])
    sim.start()
    # The digit stops the interruptible welcome; the chained menu takes it locally.
    commands = sim.digit("1", stopped=1)
    assert commands == [TransferCommand(target="2001")]
    assert len(sim.sent) == 1  # only session_start went to the provider
    assert sim.kinds() == ["start", "dtmf_match", "end"]
    assert sim.notified[1][1] == URL + "/dtmf-match"
    assert sim.notified_body("dtmf_match") == {
        "digit": "1",
        "action": {"type": "transfer", "target": "2001"},
        "session_id": "sess-1",
    }
    assert sim.notified[2][1] == URL + "/end"
    assert sim.notified_body("end") == {"reason": "Transfer(2001)", "session_id": "sess-1"}
    assert sim.done
    last = sim.traces[-1]
    assert last.end_reason == "Transfer(2001)"
    assert last.action_type == "transfer"
    assert [t.step_index for t in sim.traces] == [1, 2]


def test_welcome_to_end_then_greeting_then_timer_then_digit() -> None:
    sim = Sim([WELCOME_MENU])
    sim.start()
    assert sim.audio_done(1) == [play(2, "sounds/ivr/menu.wav", True)]
    assert sim.audio_done(2) == [TimerCommand(timer_id=1, delay_ms=5000)]
    commands = sim.digit("0")
    assert commands == [TimerCommand(timer_id=1, delay_ms=0), TransferCommand(target="operator")]
    assert sim.notified_body("end")["reason"] == "Transfer(operator)"
    assert len(sim.sent) == 1


def test_digit_during_greeting_not_reported_stopped_gets_a_stop() -> None:
    sim = Sim([WELCOME_MENU])
    sim.start()
    sim.audio_done(1)  # greeting play 2 starts
    assert sim.digit("1", stopped=None) == [StopCommand(), TransferCommand(target="2001")]


# ---------------------------------------------------------------- prompts and digits


def test_interruptible_prompt_without_next_sends_dtmf_to_provider() -> None:
    sim = Sim(
        [
            {"type": "prompt", "file": "a.wav", "interruptible": True},
            {"type": "prompt", "file": "b.wav"},
        ]
    )
    sim.start()
    commands = sim.digit("5", stopped=1)
    assert sim.events[-1] == {"type": "dtmf", "digit": "5"}  # no audio_complete
    assert commands == [play(2, "b.wav")]  # the worker already stopped play 1: no StopCommand


def test_interruptible_prompt_with_non_digit_next_sends_dtmf_to_provider() -> None:
    sim = Sim(
        [
            {"type": "prompt", "file": "a.wav", "interruptible": True, "next": {"type": "hangup"}},
            {"type": "hangup"},
        ]
    )
    sim.start()
    assert sim.digit("7", stopped=1) == [HangupCommand(reason="Normal")]
    assert sim.events[-1] == {"type": "dtmf", "digit": "7"}


def test_non_interruptible_prompt_keeps_digits_and_reports_interrupted() -> None:
    sim = Sim([{"type": "prompt", "file": "a.wav"}, {"type": "hangup"}])
    assert sim.start() == [play(1, "a.wav", False)]
    assert sim.digit("3") == []  # type-ahead: nothing happens yet
    assert len(sim.sent) == 1
    sim.audio_done(1)
    assert sim.events[-1] == {"type": "audio_complete", "interrupted": True}


def test_non_interruptible_prompt_without_digit_reports_not_interrupted() -> None:
    sim = Sim([{"type": "prompt", "file": "a.wav"}, {"type": "hangup"}])
    sim.start()
    sim.audio_done(1)
    assert sim.events[-1] == {"type": "audio_complete", "interrupted": False}


def test_non_interruptible_prompt_with_next_menu_feeds_kept_digit_locally() -> None:
    action = dict(WELCOME_MENU, interruptible=False)
    sim = Sim([action])
    sim.start()
    assert sim.digit("1") == []
    # At the end of the prompt the menu gets the kept digit, without its greeting.
    assert sim.audio_done(1) == [TransferCommand(target="2001")]
    assert len(sim.sent) == 1
    assert sim.notified_body("dtmf_match")["digit"] == "1"


def test_kept_digits_dropped_when_next_takes_none() -> None:
    sim = Sim(
        [
            {"type": "prompt", "file": "a.wav", "next": {"type": "prompt", "file": "b.wav"}},
            {"type": "hangup"},
        ]
    )
    sim.start()
    sim.digit("4")
    assert sim.audio_done(1) == [play(2, "b.wav")]
    sim.audio_done(2)
    assert sim.events[-1] == {"type": "audio_complete", "interrupted": False}


def test_kept_digits_survive_provider_round_trip_to_a_menu() -> None:
    menu = WELCOME_MENU["next"]
    sim = Sim([{"type": "prompt", "file": "a.wav"}, menu])
    sim.start()
    sim.digit("1")
    assert sim.audio_done(1) == [TransferCommand(target="2001")]
    assert sim.events[-1] == {"type": "audio_complete", "interrupted": True}


# ---------------------------------------------------------------- dtmf_menu rules


def menu(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "dtmf_menu",
        "greeting": "menu.wav",
        "timeout_ms": 3000,
        "entries": {"1": {"type": "transfer", "target": "2001"}},
    }
    base.update(fields)
    return base


def test_menu_invalid_digit_without_invalid_action_goes_to_provider() -> None:
    sim = Sim([menu(), {"type": "hangup"}])
    sim.start()
    sim.digit("9", stopped=1)
    assert sim.events[-1] == {"type": "dtmf_menu_invalid", "digit": "9"}
    assert "dtmf_match" not in sim.kinds()


def test_menu_with_empty_entries_sends_every_digit_to_provider() -> None:
    answers: list[Answer] = [
        menu(entries={}, invalid_action={"type": "hangup"}),
        {"type": "prompt", "file": "x.wav"},
    ]
    sim = Sim(answers)
    sim.start()
    sim.digit("1", stopped=1)
    assert sim.events[-1] == {"type": "dtmf_menu_invalid", "digit": "1"}


def test_menu_invalid_action_notice_then_outcome_at_max_retries() -> None:
    invalid = {"type": "prompt", "file": "invalid.wav"}
    sim = Sim([menu(max_retries=1, invalid_action=invalid), {"type": "hangup"}])
    sim.start()
    # Miss 1 (one retry left): the notice plays, then the greeting again.
    assert sim.digit("9", stopped=1) == [play(2, "invalid.wav")]
    assert sim.audio_done(2) == [play(3, "menu.wav", True)]
    assert sim.audio_done(3) == [TimerCommand(timer_id=1, delay_ms=3000)]
    # Miss 2 (no retry left): invalid_action is the menu's outcome.
    commands = sim.digit("8")
    assert commands == [TimerCommand(timer_id=1, delay_ms=0), play(4, "invalid.wav")]
    assert len(sim.sent) == 1
    # It is now a plain prompt: its end goes to the provider.
    sim.audio_done(4)
    assert sim.events[-1] == {"type": "audio_complete", "interrupted": False}


def test_menu_terminal_invalid_action_executes_at_once() -> None:
    sim = Sim([menu(invalid_action={"type": "hangup", "prompt": "bye.wav"})])
    sim.start()
    assert sim.digit("9", stopped=1) == [play(2, "bye.wav")]
    assert sim.audio_done(2) == [HangupCommand(reason="Normal")]
    assert sim.notified_body("end")["reason"] == "Normal"
    assert len(sim.sent) == 1


def test_menu_type_ahead_during_notice_answers_menu() -> None:
    invalid = {"type": "prompt", "file": "invalid.wav"}
    sim = Sim([menu(invalid_action=invalid)])
    sim.start()
    sim.digit("9", stopped=1)  # notice play 2, not interruptible
    assert sim.digit("1") == []
    assert sim.audio_done(2) == [TransferCommand(target="2001")]


def test_menu_timeout_without_timeout_action_goes_to_provider() -> None:
    sim = Sim([menu(), {"type": "hangup"}])
    sim.start()
    sim.audio_done(1)
    assert sim.timer(1) == [HangupCommand(reason="Normal")]
    assert sim.events[-1] == {"type": "dtmf_menu_timeout"}


def test_menu_timeout_action_retries_then_outcome() -> None:
    timeout = {"type": "prompt", "file": "timeout.wav"}
    sim = Sim([menu(max_retries=1, timeout_action=timeout, greeting=None), {"type": "hangup"}])
    # No greeting: the timer is armed at once.
    assert sim.start() == [TimerCommand(timer_id=1, delay_ms=3000)]
    assert sim.timer(1) == [play(1, "timeout.wav")]
    assert sim.audio_done(1) == [TimerCommand(timer_id=2, delay_ms=3000)]
    assert sim.timer(2) == [play(2, "timeout.wav")]
    assert len(sim.sent) == 1
    sim.audio_done(2)
    assert sim.events[-1] == {"type": "audio_complete", "interrupted": False}


def test_a_menu_that_plays_nothing_on_timeout_does_not_spin() -> None:
    """No greeting, a 0 ms timeout and a timeout notice with nothing to play: each retry
    re-armed a 1 ms timer without asking the provider (a round trip front -> worker ->
    executor a millisecond, for max_retries: up to 4e9). A notice with nothing to play
    is the menu's outcome now, as any action that is not a notice: here a prompt with
    nothing in it, an invalid action (the error prompt, then the call ends)."""
    sim = Sim([menu(greeting=None, timeout_ms=0, max_retries=4_000_000_000,
                    timeout_action={"type": "prompt"}), {"type": "hangup"}])
    assert sim.start() == [TimerCommand(timer_id=1, delay_ms=1)]
    assert sim.timer(1) == [play(1, "sounds/error.wav")]
    assert sim.timer(2) == []  # no timer re-armed
    [hangup] = sim.audio_done(1)
    assert isinstance(hangup, HangupCommand) and hangup.reason.startswith("Error(prompt")
    assert sim.done and len(sim.sent) == 1


# ---------------------------------------------------------------- hang-up and transfer


def test_hangup_with_prompt_plays_then_hangs_up_without_provider() -> None:
    sim = Sim([{"type": "hangup", "prompt": "goodbye.wav"}])
    assert sim.start() == [play(1, "goodbye.wav")]
    assert not sim.done
    assert sim.digit("1") == []  # ignored while closing
    assert sim.audio_done(1) == [HangupCommand(code=None, reason="Normal")]
    assert len(sim.sent) == 1
    assert sim.done
    assert sim.notified_body("end") == {"reason": "Normal", "session_id": "sess-1"}
    assert sim.traces[-1].end_reason == "Normal"
    assert sim.traces[-1].trigger == "audio_complete"


def test_hangup_without_prompt_is_immediate() -> None:
    sim = Sim([{"type": "hangup", "prompt": None}])
    assert sim.start() == [HangupCommand(reason="Normal")]
    assert sim.done
    assert sim.traces[-1].end_reason == "Normal"
    assert sim.traces[-1].trigger == "session_start"


def test_play_and_hangup_sends_code() -> None:
    sim = Sim([{"type": "play_and_hangup", "prompt": "busy.wav", "code": 486}])
    assert sim.start() == [play(1, "busy.wav")]
    assert sim.audio_done(1) == [HangupCommand(code=486, reason="Normal")]


def test_terminal_next_is_ignored() -> None:
    sim = Sim([{"type": "transfer", "target": "2001", "next": {"type": "hangup"}}])
    assert sim.start() == [TransferCommand(target="2001")]
    assert sim.done


def test_caller_hangup_ends_session_and_later_events_are_ignored() -> None:
    sim = Sim([WELCOME_MENU])
    sim.start()
    assert sim.send(CallEndedInput()) == []
    assert sim.done
    assert sim.notified_body("end") == {"reason": "Hangup", "session_id": "sess-1"}
    assert sim.traces[-1].end_reason == "Hangup"
    n_notified, n_traces = len(sim.notified), len(sim.traces)
    assert sim.digit("1", stopped=1) == []
    assert sim.audio_done(1) == []
    assert sim.send(CallEndedInput()) == []
    assert (len(sim.notified), len(sim.traces)) == (n_notified, n_traces)
    assert sim.done


# ---------------------------------------------------------------- errors


def assert_error_hangup(sim: Sim, commands: list[Any], fragment: str, play_id: int = 1) -> None:
    assert commands == [play(play_id, machine.ERROR_PROMPT)]
    error = sim.traces[-1].error
    assert error is not None and fragment in error, error
    assert not sim.done
    n_sent = len(sim.sent)
    hangup = sim.audio_done(play_id)
    assert len(hangup) == 1 and isinstance(hangup[0], HangupCommand)
    assert len(sim.sent) == n_sent
    assert sim.done
    reason = sim.notified_body("end")["reason"]
    assert reason.startswith("Error(") and fragment in reason
    assert sim.traces[-1].end_reason == reason


@pytest.mark.parametrize(
    ("answer", "fragment"),
    [
        ({"type": "repeat"}, "tree-mode only action type 'repeat'"),
        ({"type": "menu"}, "tree-mode only"),
        ({"type": "webhook", "url": "x"}, "tree-mode only"),
        ({"type": "bogus"}, "unknown action type 'bogus'"),
        ({"file": "a.wav"}, "no 'type' field"),
        ({"type": "transfer"}, "transfer: missing required field 'target'"),
        (["not", "an", "object"], "not a JSON object"),
        (
            {"type": "prompt", "file": "a.wav", "next": {"type": "repeat"}},
            "'repeat' is not supported in step mode (at prompt.next)",
        ),
        ({"type": "prompt"}, "prompt: missing required field 'file'"),
    ],
)
def test_bad_action_plays_error_and_hangs_up(answer: Any, fragment: str) -> None:
    sim = Sim([answer])
    commands = sim.start()
    assert_error_hangup(sim, commands, fragment)


def test_invalid_json_from_provider_plays_error_and_hangs_up() -> None:
    sim = Sim([ProviderResult("invalid", body="<html>", reason="not JSON: boom", status=200)])
    commands = sim.start()
    assert sim.traces[-1].trigger == "session_start"
    assert_error_hangup(sim, commands, "invalid provider response")


def test_voicemail_entry_of_menu_runs_locally() -> None:
    sim = Sim([menu(entries={"2": {"type": "voicemail", "target": "1001"}})])
    sim.start()
    commands = sim.digit("2", stopped=1)
    assert sim.notified_body("dtmf_match")["action"]["type"] == "voicemail"
    assert commands == [play(2, machine.VOICEMAIL_GREETING)]
    assert len(sim.sent) == 1 and sim.phase == "vm_greeting"


def test_provider_failure_executes_default_fallback() -> None:
    sim = Sim([ProviderResult("fallback", reason="HTTP 503; gave up", status=503, attempts=4)])
    commands = sim.start()
    assert commands == [play(1, "sounds/error.wav")]
    trace = sim.traces[-1]
    assert trace.action_type == "hangup" and "HTTP 503" in (trace.error or "")
    assert sim.audio_done(1) == [HangupCommand(reason="Normal")]
    assert sim.notified_body("end")["reason"] == "Normal"


def test_provider_failure_executes_configured_fallback() -> None:
    retry = {"fallback": {"type": "transfer", "target": "operator"}}
    sim = Sim([ProviderResult("fallback", reason="timeout")], retry=retry)
    assert sim.start() == [TransferCommand(target="operator")]
    assert sim.notified_body("end")["reason"] == "Transfer(operator)"


def test_tts_prompt_without_tts_sends_error_event() -> None:
    sim = Sim([{"type": "prompt", "tts_text": "hello"}, {"type": "hangup"}])
    assert sim.start() == [HangupCommand(reason="Normal")]
    assert sim.events[-1] == {"type": "error", "reason": machine.TTS_UNAVAILABLE}
    assert sim.tts_sent == [("hello", None)]


def test_playback_failure_sends_error_event() -> None:
    sim = Sim([{"type": "prompt", "file": "missing.wav"}, {"type": "hangup"}])
    sim.start()
    sim.media(MediaFailure(reason="no such file", play_id=1))
    assert sim.events[-1] == {"type": "error", "reason": "playback failed: no such file"}


def test_provider_error_loop_is_bounded() -> None:
    sim = Sim(lambda body: {"type": "prompt", "tts_text": "again"})
    commands = sim.start()
    assert len(sim.sent) == machine.MAX_CHAINED_STEPS
    assert_error_hangup(sim, commands, "provider steps without a call event")


def test_abort_plays_error_then_hangs_up() -> None:
    sim = Sim([WELCOME_MENU])
    sim.start()
    assert sim.state is not None
    step = machine.abort(sim.state, None, "internal error: KeyError", sim.now)
    commands = sim.run(step)
    assert_error_hangup(sim, commands, "internal error", play_id=2)


def test_abort_without_state_hangs_up() -> None:
    step = machine.abort(None, None, "boom", 1.0)
    assert step.done and step.commands == [HangupCommand(reason="Error(boom)")]


def test_unexpected_input_in_phase_raises() -> None:
    sim = Sim([WELCOME_MENU])
    step = machine.start(sim.call, 1.0)
    with pytest.raises(machine.IvrStateError, match="wait_provider"):
        machine.handle(step.state, MediaInput(event=DtmfDigit(digit="1")), 2.0)


# ---------------------------------------------------------------- stale media events


def test_stale_play_id_is_ignored() -> None:
    sim = Sim(
        [
            {"type": "prompt", "file": "a.wav", "interruptible": True},
            {"type": "prompt", "file": "b.wav"},
            {"type": "hangup"},
        ]
    )
    sim.start()
    sim.digit("1", stopped=1)  # play 1 stopped; provider answers with play 2
    n_sent = len(sim.sent)
    assert sim.audio_done(1) == []  # a late end of the stopped prompt
    assert sim.media(MediaFailure(reason="x", play_id=1)) == []
    assert len(sim.sent) == n_sent
    sim.audio_done(2)
    assert len(sim.sent) == n_sent + 1


def test_stale_timer_id_is_ignored() -> None:
    timeout = {"type": "prompt", "file": "timeout.wav"}
    sim = Sim([menu(greeting=None, timeout_action=timeout)])
    sim.start()  # timer 1
    sim.timer(1)  # notice play 1
    sim.audio_done(1)  # timer 2
    assert sim.timer(1) == []
    assert sim.audio_done(1) == []
    assert sim.timer(3) == []
    assert sim.timer(2) == [play(2, "timeout.wav")]
    assert len(sim.sent) == 1


# ---------------------------------------------------------------- variables, passthrough


def test_variables_substituted_from_session_and_provider() -> None:
    sim = Sim(
        [
            {
                "type": "prompt",
                "file": "sounds/$lang$/hello_$caller$.wav",
                "variables": {"lang": "en", "agent": 2001},
            },
            {"type": "transfer", "target": "$agent$-$sip_X-Customer$-$unknown$"},
        ]
    )
    assert sim.start() == [play(1, "sounds/en/hello_1001.wav")]
    sim.audio_done(1)
    assert sim.sent[-1]["variables"]["lang"] == "en"
    assert sim.sent[-1]["variables"]["agent"] == "2001"
    # Unknown names stay as written.
    assert sim.notified_body("end")["reason"] == "Transfer(2001-gold-$unknown$)"


def test_nested_actions_substituted_when_executed() -> None:
    sim = Sim(
        [
            {
                "type": "prompt",
                "file": "a.wav",
                "variables": {"who": "first"},
                "next": {
                    "type": "transfer",
                    "target": "$who$",
                    "variables": {"who": "second"},
                },
            }
        ]
    )
    sim.start()
    # The nested action's own variables apply before its substitution.
    assert sim.audio_done(1) == [TransferCommand(target="second")]


def test_step_id_and_extra_passthrough_in_traces() -> None:
    sim = Sim(
        [
            {
                "type": "prompt",
                "file": "a.wav",
                "step_id": 1000602002200750100,
                "step_name": "welcome",
                "extra": {"tenantId": "didi"},
            },
            {"type": "hangup", "step_id": "2"},
        ]
    )
    sim.start()
    sim.audio_done(1)
    first, second = sim.traces
    assert (first.step_id, first.step_name, first.extra) == (
        "1000602002200750100",
        "welcome",
        {"tenantId": "didi"},
    )
    # The latest extra is kept until the provider replaces it.
    assert (second.step_id, second.step_name, second.extra) == ("2", None, {"tenantId": "didi"})
    assert second.end_reason == "Normal"
    assert second.trigger == "audio_complete"


def test_state_is_plain_json() -> None:
    sim = Sim([WELCOME_MENU])
    step = machine.start(sim.call, 1.0)
    assert orjson.loads(orjson.dumps(step.state)) == step.state
    assert step.state["phase"] == "wait_provider"

"""collect_dtmf and input_phone on the machine, virtual clock (DESIGN §3)."""

from __future__ import annotations

from typing import Any

from pbx.messages import (
    CallEndedInput,
    HangupCommand,
    MediaFailure,
    StopCommand,
    TimerCommand,
    TransferCommand,
)
from tests.ivr.sim import Sim, play

HANGUP = {"type": "hangup"}


def collect(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"type": "collect_dtmf", "timeout_ms": 3000}
    base.update(fields)
    return base


def timer(timer_id: int, delay_ms: int = 3000) -> TimerCommand:
    return TimerCommand(timer_id=timer_id, delay_ms=delay_ms)


def cancel(timer_id: int) -> TimerCommand:
    return TimerCommand(timer_id=timer_id, delay_ms=0)


# ---------------------------------------------------------------- collect_dtmf


def test_collect_ends_on_terminator_which_is_not_stored() -> None:
    sim = Sim([collect(min_digits=1, max_digits=6, terminator="#", prompt="enter.wav"), HANGUP])
    assert sim.start() == [play(1, "enter.wav", True)]
    assert sim.phase == "collect_prompt"
    # The timeout is first armed when the prompt ends.
    assert sim.audio_done(1) == [timer(1)]
    assert sim.digit("1") == [timer(2)]
    assert sim.digit("2") == [timer(3)]
    assert len(sim.sent) == 1
    assert sim.digit("#") == [cancel(3), HangupCommand(reason="Normal")]
    # ONE dtmf event with all the digits; the value is in dtmf_input too.
    assert sim.events == [{"type": "session_start"}, {"type": "dtmf", "digit": "12"}]
    assert sim.sent[-1]["variables"]["dtmf_input"] == "12"


def test_collect_ends_on_max_digits() -> None:
    sim = Sim([collect(min_digits=3, max_digits=4), HANGUP])
    # No prompt: the timer is armed at once.
    assert sim.start() == [timer(1)]
    assert sim.phase == "collect_wait"
    assert sim.digits("123") == [timer(2), timer(3), timer(4)]
    assert len(sim.sent) == 1
    assert sim.digit("4") == [cancel(4), HangupCommand(reason="Normal")]
    assert sim.events[1:] == [{"type": "dtmf", "digit": "1234"}]
    assert sim.sent[-1]["variables"]["dtmf_input"] == "1234"


def test_collect_timeout_with_enough_digits_sends_them() -> None:
    sim = Sim([collect(min_digits=2, max_digits=6), HANGUP])
    sim.start()
    sim.digits("12")
    assert sim.timer(3) == [HangupCommand(reason="Normal")]
    assert sim.events[1:] == [{"type": "dtmf", "digit": "12"}]
    assert sim.sent[-1]["variables"]["dtmf_input"] == "12"


def test_collect_timeout_with_too_few_digits_sends_dtmf_timeout() -> None:
    sim = Sim([collect(min_digits=3, max_digits=4), HANGUP])
    sim.start()
    sim.digits("12")
    assert sim.timer(3) == [HangupCommand(reason="Normal")]
    assert sim.events[1:] == [{"type": "dtmf_timeout"}]
    # The partial digits are in the variable.
    assert sim.sent[-1]["variables"]["dtmf_input"] == "12"


def test_collect_timeout_without_any_digit() -> None:
    sim = Sim([collect(prompt="enter.wav"), HANGUP])
    sim.start()
    sim.audio_done(1)
    sim.timer(1)
    assert sim.events[1:] == [{"type": "dtmf_timeout"}]
    assert sim.sent[-1]["variables"]["dtmf_input"] == ""


def test_collect_terminator_with_too_few_digits_sends_dtmf_timeout() -> None:
    sim = Sim([collect(min_digits=3, terminator="#"), HANGUP])
    sim.start()
    sim.digits("1#")
    assert sim.events[1:] == [{"type": "dtmf_timeout"}]
    assert sim.sent[-1]["variables"]["dtmf_input"] == "1"


def test_collect_inter_digit_timer_is_rearmed_and_old_timers_are_stale() -> None:
    sim = Sim([collect(min_digits=1, max_digits=4, timeout_ms=2000), HANGUP])
    assert sim.start() == [timer(1, 2000)]
    assert sim.digit("1") == [timer(2, 2000)]  # re-armed after the digit
    # The first timer was replaced: its firing (late, already queued) is ignored.
    assert sim.timer(1) == []
    assert sim.digit("2") == [timer(3, 2000)]
    assert sim.timer(2) == []
    assert len(sim.sent) == 1
    assert sim.timer(3) == [HangupCommand(reason="Normal")]
    assert sim.events[1:] == [{"type": "dtmf", "digit": "12"}]


def test_collect_prompt_is_interrupted_by_the_first_digit_which_counts() -> None:
    sim = Sim([collect(min_digits=2, max_digits=3, prompt="enter.wav"), HANGUP])
    sim.start()
    # The worker stopped the interruptible prompt: no StopCommand; the timer starts.
    assert sim.digit("5", stopped=1) == [timer(1)]
    assert sim.phase == "collect_wait"
    assert sim.audio_done(1) == []  # a late end of the stopped prompt is stale
    assert sim.digits("67") == [timer(2), cancel(2), HangupCommand(reason="Normal")]
    assert sim.events[1:] == [{"type": "dtmf", "digit": "567"}]


def test_collect_prompt_still_playing_is_stopped_by_a_digit() -> None:
    sim = Sim([collect(min_digits=1, max_digits=1, prompt="enter.wav"), HANGUP])
    sim.start()
    # The worker did not report stopping it: the machine stops it.
    assert sim.digit("9") == [StopCommand(), HangupCommand(reason="Normal")]
    assert sim.events[1:] == [{"type": "dtmf", "digit": "9"}]


def test_interrupting_digit_of_a_prompt_feeds_its_next_collect() -> None:
    prompt = {
        "type": "prompt",
        "file": "welcome.wav",
        "interruptible": True,
        "next": collect(min_digits=2, max_digits=2, prompt="enter.wav"),
    }
    sim = Sim([prompt, HANGUP])
    sim.start()
    # The digit stops the welcome and is the first collected digit; the collect's own
    # prompt is skipped (that digit would have stopped it too).
    assert sim.digit("4", stopped=1) == [timer(1)]
    assert len(sim.sent) == 1
    sim.digit("2")
    assert sim.events[1:] == [{"type": "dtmf", "digit": "42"}]


def test_type_ahead_from_non_interruptible_prompt_feeds_collect() -> None:
    prompt = {
        "type": "prompt",
        "file": "welcome.wav",
        "next": collect(min_digits=4, max_digits=4, prompt="enter.wav"),
    }
    sim = Sim([prompt, HANGUP])
    sim.start()
    assert sim.digits("12") == []  # kept while the prompt plays
    assert sim.audio_done(1) == [timer(1)]  # no collect prompt: digits are in
    assert sim.digits("34") == [timer(2), cancel(2), HangupCommand(reason="Normal")]
    assert sim.events[1:] == [{"type": "dtmf", "digit": "1234"}]


def test_type_ahead_can_complete_the_collection_at_once() -> None:
    prompt = {
        "type": "prompt",
        "file": "welcome.wav",
        "next": collect(min_digits=1, max_digits=6, terminator="#", prompt="enter.wav"),
    }
    sim = Sim([prompt, HANGUP])
    sim.start()
    sim.digits("77#")
    assert sim.audio_done(1) == [HangupCommand(reason="Normal")]
    assert sim.events[1:] == [{"type": "dtmf", "digit": "77"}]


def test_type_ahead_survives_the_provider_round_trip_to_collect() -> None:
    sim = Sim(
        [{"type": "prompt", "file": "welcome.wav"}, collect(min_digits=1, max_digits=2), HANGUP]
    )
    sim.start()
    sim.digit("8")
    assert sim.audio_done(1) == [timer(1)]
    assert sim.events[-1] == {"type": "audio_complete", "interrupted": True}
    sim.digit("9")
    assert sim.events[-1] == {"type": "dtmf", "digit": "89"}


def test_collect_next_is_followed_locally_with_the_variable() -> None:
    action = collect(
        min_digits=4, max_digits=4, next={"type": "transfer", "target": "ext-$dtmf_input$"}
    )
    sim = Sim([action])
    sim.start()
    commands = sim.digits("2001")
    assert commands[-2:] == [cancel(4), TransferCommand(target="ext-2001")]
    assert len(sim.sent) == 1  # no provider call
    assert sim.notified_body("end")["reason"] == "Transfer(ext-2001)"


def test_collect_next_is_not_followed_on_too_few_digits() -> None:
    action = collect(min_digits=4, max_digits=4, next={"type": "transfer", "target": "x"})
    sim = Sim([action, HANGUP])
    sim.start()
    sim.digit("2")
    assert sim.timer(2) == [HangupCommand(reason="Normal")]
    assert sim.events[1:] == [{"type": "dtmf_timeout"}]


def test_collect_zero_timeout_arms_a_1ms_timer() -> None:
    # delay 0 would cancel the worker's timer.
    sim = Sim([collect(timeout_ms=0), HANGUP])
    assert sim.start() == [timer(1, 1)]


def test_collect_prompt_failure_sends_error() -> None:
    sim = Sim([collect(prompt="missing.wav"), HANGUP])
    sim.start()
    sim.media(MediaFailure(reason="no such file", play_id=1))
    assert sim.events[-1] == {"type": "error", "reason": "playback failed: no such file"}


def test_caller_hangup_during_collection() -> None:
    sim = Sim([collect()])
    sim.start()
    sim.digit("1")
    assert sim.send(CallEndedInput()) == []
    assert sim.done
    assert sim.notified_body("end")["reason"] == "Hangup"
    assert sim.timer(2) == []


# ---------------------------------------------------------------- input_phone


def test_input_phone_collects_11_digits() -> None:
    sim = Sim([{"type": "input_phone", "prompt": "phone.wav"}, HANGUP])
    assert sim.start() == [play(1, "phone.wav", True)]
    assert sim.audio_done(1) == [timer(1, 5000)]
    commands = sim.digits("13800138000")
    assert commands[-2:] == [cancel(11), HangupCommand(reason="Normal")]
    assert sim.events[1:] == [{"type": "phone_collected", "number": "13800138000"}]
    assert sim.sent[-1]["variables"]["phone_number"] == "13800138000"
    assert "dtmf_input" not in sim.sent[-1]["variables"]


def test_input_phone_too_few_digits_sends_dtmf_timeout() -> None:
    sim = Sim([{"type": "input_phone"}, HANGUP])
    sim.start()
    sim.digits("138")
    assert sim.timer(4) == [HangupCommand(reason="Normal")]
    assert sim.events[1:] == [{"type": "dtmf_timeout"}]
    assert sim.sent[-1]["variables"]["phone_number"] == "138"


def test_input_phone_hash_ends_the_number_and_is_not_stored() -> None:
    sim = Sim([{"type": "input_phone", "min_digits": 3}, HANGUP])
    sim.start()
    sim.digits("110#")
    assert sim.events[1:] == [{"type": "phone_collected", "number": "110"}]
    assert sim.sent[-1]["variables"]["phone_number"] == "110"


def test_input_phone_hash_with_too_few_digits() -> None:
    sim = Sim([{"type": "input_phone"}, HANGUP])
    sim.start()
    sim.digits("1380013800#")  # 10 digits < 11
    assert sim.events[1:] == [{"type": "dtmf_timeout"}]
    assert sim.sent[-1]["variables"]["phone_number"] == "1380013800"

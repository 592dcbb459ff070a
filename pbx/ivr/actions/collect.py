"""`collect_dtmf` and `input_phone` (docs/decisions.md "Collect"): an optional
interruptible prompt, then digits until `max_digits`, the terminator or the
(inter-digit) timeout; the value goes in `dtmf_input` / `phone_number`, then `next`
is followed or the provider hears `dtmf` / `phone_collected` (`dtmf_timeout` when
fewer than `min_digits` came).

Phases: COLLECT_PROMPT (`CollectPrompt`), COLLECT_WAIT (`Collecting`).
"""

from __future__ import annotations

from pbx.ivr.models import (
    CollectDtmfAction,
    DtmfEvent,
    DtmfTimeoutEvent,
    InputPhoneAction,
    PhoneCollectedEvent,
)
from pbx.ivr.phases import Collecting, CollectPrompt, Digits, PhaseData
from pbx.ivr.session import Session
from pbx.messages import AudioComplete, DtmfDigit, TimerFired

Collector = CollectDtmfAction | InputPhoneAction


def run(s: Session, action: Collector, typeahead: Digits) -> PhaseData:
    """Type-ahead digits (kept from a non-interruptible prompt, or the digit that
    interrupted a prompt whose `next` this is) are taken first; then the prompt is
    skipped, as the first of them would have stopped it."""
    collected = ""
    for i, digit in enumerate(typeahead):
        collected, complete = _take(action, collected, digit)
        if complete:
            # Choice: digits past the end of the collection stay type-ahead for the
            # next action that takes digits (like a non-interruptible prompt's).
            return _end(s, collected, typeahead[i + 1 :])
    if not typeahead and action.prompt:
        return CollectPrompt(play_id=s.play(action.prompt, interruptible=True))
    return _arm(s, collected)


def _collector(s: Session) -> Collector:
    node = s.env.node
    assert isinstance(node, CollectDtmfAction | InputPhoneAction)
    return node


def _take(node: Collector, collected: str, digit: str) -> tuple[str, bool]:
    """Add one digit; True when it ends the collection (terminator or max_digits)."""
    if node.terminator and digit == node.terminator:
        return collected, True  # not stored
    collected += digit
    return collected, len(collected) >= node.max_digits


def _arm(s: Session, collected: str) -> PhaseData:
    """(Re-)arm the timeout: when the prompt ends, and again after every digit."""
    return Collecting(timer=s.arm_timer(_collector(s).timeout_ms), collected=collected)


def prompt_done(s: Session, data: CollectPrompt, ev: AudioComplete) -> PhaseData:
    return _arm(s, "")


def digit(s: Session, data: CollectPrompt | Collecting, ev: DtmfDigit) -> PhaseData:
    s.stop_play(data.active_play, ev.stopped_play_id)  # the prompt, if still playing
    so_far = data.collected if isinstance(data, Collecting) else ""
    collected, complete = _take(_collector(s), so_far, ev.digit)
    if complete:
        s.cancel_timer(data.active_timer)
        return _end(s, collected, ())
    return _arm(s, collected)  # inter-digit timeout; replaces the running timer


def timeout(s: Session, data: Collecting, ev: TimerFired) -> PhaseData:
    return _end(s, data.collected, ())


def _end(s: Session, value: str, typeahead: Digits) -> PhaseData:
    """The collection is over: the value (even partial) goes in the variable; with at
    least `min_digits` the result goes to the provider (or `next` is followed), with
    fewer the provider gets `dtmf_timeout`. `typeahead` is what was typed past it."""
    node = _collector(s)
    phone = isinstance(node, InputPhoneAction)
    s.env.variables["phone_number" if phone else "dtmf_input"] = value
    if len(value) < node.min_digits:
        # Choice: a `next` is not followed on a failed collection (the provider
        # decides what to do about it).
        return s.ask(DtmfTimeoutEvent(), typeahead)
    if node.next is not None:
        # docs/decisions.md "next": a local collection result continues without a provider
        # call; `next` reads the value from the variable.
        return s.execute(node.next, typeahead)
    if phone:
        return s.ask(PhoneCollectedEvent(number=value), typeahead)
    return s.ask(DtmfEvent(digit=value), typeahead)

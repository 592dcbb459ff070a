"""`dtmf_menu` (docs/decisions.md "Menu"): an always-interruptible greeting (a file, or
`greeting_text` synthesised once), then the timeout timer; a digit picks an entry
(reported to `/dtmf-match`, executed locally); an invalid digit or the timeout runs
`invalid_action` / `timeout_action` as a notice and repeats the greeting, up to
`max_retries`, or asks the provider (`dtmf_menu_invalid`, `dtmf_menu_timeout`).

Phases: MENU_GREETING (`MenuGreeting`), MENU_NOTICE (`MenuNotice`), MENU_WAIT
(`MenuWaiting`), and WAIT_TTS for its speech; all carry the menu's `MenuProgress`.
"""

from __future__ import annotations

from dataclasses import replace

from pbx.ivr.models import (
    ActionNode,
    DtmfEvent,
    DtmfMenuAction,
    DtmfMenuInvalidEvent,
    DtmfMenuTimeoutEvent,
    DtmfTimeoutEvent,
    PromptAction,
    action_json,
)
from pbx.ivr.phases import (
    AwaitingSpeech,
    Digits,
    MenuGreeting,
    MenuNotice,
    MenuProgress,
    MenuWaiting,
    PhaseData,
)
from pbx.ivr.session import Session
from pbx.messages import AudioComplete, DtmfDigit, MediaFailure, TimerFired

# A menu ends in one of its entries, its invalid/timeout action or a provider event:
# nothing is left for a `next` to follow. Not refused (rustpbx ignores it too, and
# providers written for it send it), but said in the step's trace.
NEXT_ON_MENU = ("dtmf_menu: `next` is not followed: a menu ends in an entry, its "
                "invalid_action / timeout_action or a provider event")


def run(s: Session, action: DtmfMenuAction, typeahead: Digits) -> PhaseData:
    if action.next is not None:
        s.errors.append(NEXT_ON_MENU)
    progress = MenuProgress()
    if typeahead:
        # Type-ahead answers the menu before its greeting.
        return _input(s, typeahead[0], typeahead[1:], progress)
    return _greet(s, progress)


def _menu(s: Session) -> DtmfMenuAction:
    node = s.env.node
    assert isinstance(node, DtmfMenuAction)
    return node


def _greet(s: Session, progress: MenuProgress) -> PhaseData:
    menu = _menu(s)
    greeting = menu.greeting or progress.spoken_greeting
    if greeting:
        # docs/decisions.md "Menu": a menu greeting is always interruptible.
        return MenuGreeting(play_id=s.play(greeting, interruptible=True), menu=progress)
    if menu.greeting_text:
        # Synthesised once per menu; the repeats play the same file.
        return replace(s.synthesize(menu.greeting_text, None, "greeting"), menu=progress)
    return _arm(s, progress)


def _arm(s: Session, progress: MenuProgress) -> PhaseData:
    return MenuWaiting(timer=s.arm_timer(_menu(s).timeout_ms), menu=progress)


def greeting_done(s: Session, data: MenuGreeting, ev: AudioComplete) -> PhaseData:
    return _arm(s, data.menu)


def digit(s: Session, data: MenuGreeting | MenuWaiting, ev: DtmfDigit) -> PhaseData:
    s.stop_play(data.active_play, ev.stopped_play_id)
    s.cancel_timer(data.active_timer)
    return _input(s, ev.digit, (), data.menu)


def timeout(s: Session, data: MenuWaiting, ev: TimerFired) -> PhaseData:
    menu = _menu(s)
    if menu.timeout_action is not None:
        return _retry(s, menu.timeout_action, data.menu)
    if s.rustpbx:
        return s.ask(DtmfTimeoutEvent())  # rustpbx never sends dtmf_menu_timeout
    return s.ask(DtmfMenuTimeoutEvent())


def _input(s: Session, digit: str, rest: Digits, progress: MenuProgress) -> PhaseData:
    """One digit for the menu; `rest` is the type-ahead after it."""
    menu = _menu(s)
    entry = menu.entries.get(digit)
    if entry is not None:
        s.notify(
            "dtmf_match",
            {"digit": digit, "action": action_json(entry), "session_id": s.env.call.session_id},
        )
        return s.execute(entry, rest)
    if menu.entries and menu.invalid_action is not None:
        return _retry(s, menu.invalid_action, progress)
    # No invalid_action, or empty entries: the provider decides (docs/decisions.md "Menu"); rustpbx
    # never sends dtmf_menu_invalid, its providers expect the plain digit.
    if s.rustpbx:
        return s.ask(DtmfEvent(digit=digit))
    return s.ask(DtmfMenuInvalidEvent(digit=digit))


def _retry(s: Session, action: ActionNode, progress: MenuProgress) -> PhaseData:
    """docs/decisions.md "Menu": count an attempt; while retries are left a non-terminal action is
    played as a notice and the greeting repeats; when none are left, or when the
    action is terminal, it is executed as the menu's outcome. `max_retries` counts
    retries, like `retry.max_retries`: 0 gives the outcome at the first miss, 1 after
    one repeat, the default 3 after three (rustpbx, and this project before: at miss
    number `max_retries`, so 0 and 1 were the same). Choice: invalid and timeout
    attempts share one counter; a non-terminal action that is not a `prompt` (nothing
    to play as a notice) is executed as the outcome at once. Type-ahead is dropped."""
    progress = replace(progress, attempts=progress.attempts + 1)
    misses_allowed = _menu(s).max_retries + (0 if s.rustpbx else 1)
    if (
        action.terminal
        or progress.attempts >= misses_allowed
        or not isinstance(action, PromptAction)
    ):
        return s.execute(action, [])
    notice = s.prepare(action)
    assert isinstance(notice, PromptAction)
    if not (notice.file or notice.tts_text):
        # Nothing to play: re-greeting at once would spin (a menu without a greeting and
        # a 0 ms timeout re-armed a 1 ms timer, up to max_retries times, never asking the
        # provider). It is the outcome, as an action that is not a notice.
        return s.execute(action, [])
    if notice.file:
        play_id = s.play(notice.file, notice.interruptible)
        return MenuNotice(play_id=play_id, interruptible=notice.interruptible, menu=progress)
    speech = s.synthesize(notice.tts_text or "", notice.tts_voice, "notice")
    return replace(speech, menu=progress, notice_interruptible=notice.interruptible)


def notice_digit(s: Session, data: MenuNotice, ev: DtmfDigit) -> PhaseData:
    if not data.interruptible:
        return replace(data, typeahead=(*data.typeahead, ev.digit))
    s.stop_play(data.play_id, ev.stopped_play_id)
    return _input(s, ev.digit, data.typeahead, data.menu)


def notice_done(s: Session, data: MenuNotice, ev: AudioComplete | MediaFailure) -> PhaseData:
    if data.typeahead:
        return _input(s, data.typeahead[0], data.typeahead[1:], data.menu)
    return _greet(s, data.menu)


def speech_done(s: Session, data: AwaitingSpeech, file: str) -> PhaseData:
    """The menu's greeting or notice, synthesised (`pbx.ivr.actions.prompt.speech_done`
    took the failures)."""
    assert data.menu is not None
    if data.purpose == "greeting":
        return _greet(s, replace(data.menu, spoken_greeting=file))
    play_id = s.play(file, data.notice_interruptible)
    return MenuNotice(play_id=play_id, interruptible=data.notice_interruptible, menu=data.menu)

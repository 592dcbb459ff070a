"""Phases of a step-mode IVR session: what each one waits for, the scratch data it
carries, and the one table of legal transitions between them.

A session is always in one `Phase`, and its phase-specific data is one small frozen
dataclass per phase (`AwaitingStep` for `Phase.WAIT_PROVIDER`, `Prompting` for
`Phase.PROMPT`, ...: `PHASE_DATA` maps each phase to its type). A handler gets the
current phase's data and returns the next phase's; the session checks the step
against `TRANSITIONS` in one place (`pbx.ivr.session.Session.enter`), and a step the
table does not list raises `IllegalTransition`, naming both phases and the input.

What lives in the data is what that phase needs and nothing else: the prompt whose
end it awaits (`play_id`), the timer it armed (`Timer`), the recording it runs, the
digits it has collected or kept as type-ahead, the request in flight. What every
phase shares (the call, variables, the current action, id counters, trace fields) is
the session's envelope (`pbx.ivr.state.Envelope`); both travel in the one flat
`state` object (JSON text on the wire) whose format `pbx.ivr.state` defines.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Literal

Digits = tuple[str, ...]
SpeechPurpose = Literal["prompt", "greeting", "notice"]


class IvrStateError(Exception):
    """An input the current phase cannot take (a bug in the front or the shell)."""


class Phase(StrEnum):
    WAIT_PROVIDER = "wait_provider"  # a step request is out; only its result is accepted
    PROMPT = "prompt"  # a `prompt` action is playing
    MENU_GREETING = "menu_greeting"  # a `dtmf_menu` greeting is playing (interruptible)
    MENU_NOTICE = "menu_notice"  # invalid/timeout notice playing; the greeting repeats after
    MENU_WAIT = "menu_wait"  # greeting over, the menu's timeout timer is armed
    COLLECT_PROMPT = "collect_prompt"  # collect_dtmf / input_phone prompt (interruptible)
    COLLECT_WAIT = "collect_wait"  # collecting digits; the (inter-digit) timer is armed
    WAIT_API = "wait_api"  # an `api` request is out; only its result is accepted
    WAIT_TTS = "wait_tts"  # a `tts` request is out; only its result is accepted
    WAIT_ASR = "wait_asr"  # an `asr` request is out; only its result is accepted
    RECORD_PROMPT = "record_prompt"  # torecord's prompt is playing; recording follows
    RECORDING = "recording"  # torecord / voicemail: the media worker is recording
    VM_GREETING = "vm_greeting"  # voicemail greeting playing; beep and recording follow
    CLOSING = "closing"  # last prompt before the hang-up (hangup, play_and_hangup, error)
    DONE = "done"


WAITING_FOR_ANSWER = frozenset(
    {Phase.WAIT_PROVIDER, Phase.WAIT_API, Phase.WAIT_TTS, Phase.WAIT_ASR}
)
AsrStage = Literal["check", "recognize"]


class InputKind(StrEnum):
    DIGIT = "dtmf"
    AUDIO_COMPLETE = "audio_complete"
    TIMER = "timer"
    MEDIA_FAILURE = "media_error"
    CALL_ENDED = "call_ended"
    PROVIDER_RESULT = "provider_result"
    API_RESULT = "api_result"
    TTS_RESULT = "tts_result"
    ASR_RESULT = "asr_result"
    RECORDING_FINISHED = "recording_finished"
    WAIT_EXPIRED = "wait_expired"


class IllegalTransition(IvrStateError):
    """A handler answered an input with a phase the table does not allow after the
    current one (a bug in the machine, as h11's LocalProtocolError is in its user)."""

    def __init__(self, from_phase: Phase | None, to_phase: Phase, cause: str) -> None:
        origin = repr(from_phase.value) if from_phase is not None else "(new session)"
        super().__init__(
            f"illegal transition from phase {origin} to {to_phase.value!r} on {cause!r}"
        )
        self.from_phase = from_phase
        self.to_phase = to_phase
        self.cause = cause


# ---------------------------------------------------------------- the data of each phase


@dataclass(frozen=True, slots=True)
class Timer:
    """A media-worker timer the session armed, and when it fires on the clock of `now`
    (None only in a state written before deadlines were kept)."""

    timer_id: int
    due: float | None


@dataclass(frozen=True, slots=True)
class PendingRequest:
    """The step (or api) request in flight: what the trace of its answer needs."""

    trigger: str
    request: dict[str, Any]
    sent_at: float


@dataclass(frozen=True, slots=True)
class MenuProgress:
    """What a `dtmf_menu` keeps across its greeting, notices and waits: the invalid and
    timeout attempts so far (one counter) and the greeting synthesised from
    `greeting_text`, so the repeats play the same file."""

    attempts: int = 0
    spoken_greeting: str | None = None


@dataclass(frozen=True, slots=True)
class PhaseData:
    """The scratch data of one phase. The three `active_*` properties name the prompt,
    timer and recording whose event the phase awaits (events about any other are
    stale); `deadlines` are the times by which the awaited timer fires or recording
    ends (the bound of the session's wait, `Step.wait_ms`)."""

    phase: ClassVar[Phase]

    @property
    def active_play(self) -> int | None:
        return None

    @property
    def active_timer(self) -> int | None:
        return None

    @property
    def active_record(self) -> int | None:
        return None

    def deadlines(self) -> list[float]:
        return []

    def kept_digits(self) -> Digits:
        """Type-ahead: digits pressed that the next digit-taking action gets."""
        return ()

    def hangup_reason(self) -> str | None:
        """The end reason that replaces the caller's hang-up reason in this phase (a
        voicemail's `Voicemail(<target>)`, or the reason its closing prompt carries)."""
        return None


@dataclass(frozen=True, slots=True)
class _Playing(PhaseData):
    play_id: int  # the prompt whose end or failure is awaited

    @property
    def active_play(self) -> int | None:
        return self.play_id


@dataclass(frozen=True, slots=True)
class _Timed(PhaseData):
    timer: Timer

    @property
    def active_timer(self) -> int | None:
        return self.timer.timer_id

    def deadlines(self) -> list[float]:
        return [self.timer.due] if self.timer.due is not None else []


@dataclass(frozen=True, slots=True)
class AwaitingStep(PhaseData):
    phase = Phase.WAIT_PROVIDER
    pending: PendingRequest
    # Digits kept from a prompt survive the round trip and feed the answer, if it
    # takes digits (docs/decisions.md "Type-ahead").
    typeahead: Digits = ()

    def kept_digits(self) -> Digits:
        return self.typeahead


@dataclass(frozen=True, slots=True)
class AwaitingApi(PhaseData):
    phase = Phase.WAIT_API
    pending: PendingRequest


@dataclass(frozen=True, slots=True)
class AwaitingSpeech(PhaseData):
    """A `tts` request is out: for a prompt, a menu greeting or a menu notice (the menu
    and the notice's interruptibility survive it)."""

    phase = Phase.WAIT_TTS
    purpose: SpeechPurpose
    menu: MenuProgress | None = None
    notice_interruptible: bool = False


@dataclass(frozen=True, slots=True)
class AwaitingRecognition(PhaseData):
    """An `asr` request is out (`input_voice`): "check" asks whether a recogniser is
    there before the caller is listened to, "recognize" for the utterance's text."""

    phase = Phase.WAIT_ASR
    stage: AsrStage


@dataclass(frozen=True, slots=True)
class Prompting(_Playing):
    phase = Phase.PROMPT
    typeahead: Digits = ()  # digits pressed during a prompt that is not interruptible
    rest: tuple[str, ...] = ()  # the parts of a `record_name_list` still to play

    def kept_digits(self) -> Digits:
        return self.typeahead


@dataclass(frozen=True, slots=True)
class MenuGreeting(_Playing):
    phase = Phase.MENU_GREETING
    menu: MenuProgress = field(default_factory=MenuProgress)


@dataclass(frozen=True, slots=True)
class MenuNotice(_Playing):
    phase = Phase.MENU_NOTICE
    interruptible: bool = False
    typeahead: Digits = ()  # digits pressed during a notice that is not interruptible
    menu: MenuProgress = field(default_factory=MenuProgress)

    def kept_digits(self) -> Digits:
        return self.typeahead


@dataclass(frozen=True, slots=True)
class MenuWaiting(_Timed):
    phase = Phase.MENU_WAIT
    menu: MenuProgress = field(default_factory=MenuProgress)


@dataclass(frozen=True, slots=True)
class CollectPrompt(_Playing):
    """The collection's prompt plays; nothing is collected yet (type-ahead skips it)."""

    phase = Phase.COLLECT_PROMPT


@dataclass(frozen=True, slots=True)
class Collecting(_Timed):
    phase = Phase.COLLECT_WAIT
    collected: str = ""  # the digits of the current collect_dtmf / input_phone so far


@dataclass(frozen=True, slots=True)
class RecordPrompt(_Playing):
    phase = Phase.RECORD_PROMPT


@dataclass(frozen=True, slots=True)
class VoicemailGreeting(_Playing):
    phase = Phase.VM_GREETING
    end_reason: str  # `Voicemail(<target>)`, also when the caller hangs up now

    def hangup_reason(self) -> str | None:
        return self.end_reason


@dataclass(frozen=True, slots=True)
class Recording(PhaseData):
    """The media worker records (`record_id`, ends by `due` at the latest). After a
    media failure, `failure` is its reason and `grace_timer` waits for the
    RecordingFinished that a write error sends (a refused start sends none)."""

    phase = Phase.RECORDING
    record_id: int
    due: float | None
    failure: str | None = None
    grace_timer: Timer | None = None
    end_reason: str | None = None  # a voicemail's `Voicemail(<target>)`

    @property
    def active_record(self) -> int | None:
        return self.record_id

    @property
    def active_timer(self) -> int | None:
        return self.grace_timer.timer_id if self.grace_timer is not None else None

    def deadlines(self) -> list[float]:
        dues = [self.due] if self.due is not None else []
        if self.grace_timer is not None and self.grace_timer.due is not None:
            dues.append(self.grace_timer.due)
        return dues

    def hangup_reason(self) -> str | None:
        return self.end_reason


@dataclass(frozen=True, slots=True)
class Closing(_Playing):
    """The last prompt plays; then the call is hung up with `hangup_code` (None: the
    front's default) and the session ends with `end_reason`."""

    phase = Phase.CLOSING
    end_reason: str
    hangup_code: int | None = None

    def hangup_reason(self) -> str | None:
        return self.end_reason


@dataclass(frozen=True, slots=True)
class Done(PhaseData):
    phase = Phase.DONE
    end_reason: str | None = None
    hangup_code: int | None = None


PHASE_DATA: Mapping[Phase, type[PhaseData]] = {
    cls.phase: cls
    for cls in (
        AwaitingStep, AwaitingApi, AwaitingSpeech, AwaitingRecognition, Prompting, MenuGreeting, MenuNotice,
        MenuWaiting, CollectPrompt, Collecting, RecordPrompt, Recording, VoicemailGreeting,
        Closing, Done,
    )
}


# ---------------------------------------------------------------- the transition table

# The phases executing an action (a provider's answer, a `next`, a menu entry or its
# invalid / timeout action, an api's dynamic tree) can begin in: each action's first
# phase, WAIT_PROVIDER for one that asks the provider at once (input_voice, a
# collection ended by type-ahead, jump_ivr), CLOSING for one that cannot run (the
# error prompt), DONE for a terminal one. Not MENU_NOTICE: a menu starts with its
# greeting...
_EXECUTE = frozenset(Phase) - {Phase.MENU_NOTICE}
# ...unless type-ahead (digits pressed before it) answers it with an invalid digit.
# Handlers that pass type-ahead on may reach any phase; so may a menu's own inputs
# (an invalid digit or the timeout plays a notice).
_EXECUTE_WITH_TYPEAHEAD = frozenset(Phase)
# Every phase but DONE may close with the error prompt (the shell's abort, a failure)
# and end (the caller hangs up).
_ALWAYS = (Phase.CLOSING, Phase.DONE)

# `TRANSITIONS[a]` holds the phases a session in phase `a` may be in after one input
# (staying in `a` included); None is a session that has not started (start, a
# restart, or an abort before the start).
TRANSITIONS: Mapping[Phase | None, frozenset[Phase]] = {
    None: frozenset({Phase.WAIT_PROVIDER, Phase.CLOSING}),
    Phase.WAIT_PROVIDER: _EXECUTE_WITH_TYPEAHEAD,  # the answer gets the kept digits
    Phase.PROMPT: _EXECUTE_WITH_TYPEAHEAD,  # `next` gets the digits pressed during it
    Phase.MENU_GREETING: _EXECUTE_WITH_TYPEAHEAD,  # a digit picks an entry or a notice
    Phase.MENU_NOTICE: _EXECUTE_WITH_TYPEAHEAD,  # an entry gets the digits pressed
    Phase.MENU_WAIT: _EXECUTE_WITH_TYPEAHEAD,  # a digit or the timeout
    Phase.WAIT_API: _EXECUTE,  # its `next`, or its dynamic tree, is executed
    Phase.COLLECT_PROMPT: _EXECUTE,  # the collection ends; `next` is executed
    Phase.COLLECT_WAIT: _EXECUTE,  # the collection ends; `next` is executed
    Phase.RECORDING: _EXECUTE,  # the recording ends; `next` is executed
    # The speech comes back: it plays (as a prompt, a menu greeting or a notice), or
    # the provider hears of the failure.
    Phase.WAIT_TTS: frozenset(
        {Phase.WAIT_TTS, Phase.PROMPT, Phase.MENU_GREETING, Phase.MENU_NOTICE,
         Phase.WAIT_PROVIDER, *_ALWAYS}
    ),
    # input_voice: listening starts (check), the provider hears the text or the failure.
    Phase.WAIT_ASR: frozenset({Phase.WAIT_ASR, Phase.RECORDING, Phase.WAIT_PROVIDER, *_ALWAYS}),
    # The prompt ends and the recording starts, or the provider hears why not.
    Phase.RECORD_PROMPT: frozenset(
        {Phase.RECORD_PROMPT, Phase.RECORDING, Phase.WAIT_PROVIDER, *_ALWAYS}
    ),
    # The greeting ends (or cannot play) and the recording starts; voicemail has no
    # provider step, so its failures close the call.
    Phase.VM_GREETING: frozenset({Phase.VM_GREETING, Phase.RECORDING, *_ALWAYS}),
    Phase.CLOSING: frozenset(_ALWAYS),  # the prompt ends: hang up
    Phase.DONE: frozenset(),  # inputs after the end are ignored before they get here
}


def check_transition(from_phase: Phase | None, to_phase: Phase, cause: str) -> None:
    """Raise `IllegalTransition` unless the table allows `from_phase` -> `to_phase`;
    `cause` (the input) goes in the message."""
    if to_phase not in TRANSITIONS[from_phase]:
        raise IllegalTransition(from_phase, to_phase, cause)

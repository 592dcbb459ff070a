"""The session state as it travels: the `state` text of IvrEvent / IvrReply.

An IVR session keeps nothing between events: its whole state goes to the front in
each reply and comes back with the next event (`pbx.messages`). That text is
`SessionState` dumped as JSON, format version 1 (`v`): one flat object whose keys
old and new executors alike read and write, so a session may move between
executors of either version mid-call. The executor parses the text straight into
`SessionState` and writes it straight from it (`load`, `state_text`: one pydantic-core
pass each, no intermediate dict); the dict form (`dump`, `load` of a dict) is the
same object for the machine's tests and callers that hold one.

In memory the same state is two parts: the `Envelope` (what every phase shares:
the call, variables, the current action, id counters, trace fields) and one phase's
data (`pbx.ivr.phases`). `load` and `dump` map between the two. Keys the current
phase has no use for are written at their defaults and ignored when read (executors
before the split into phase data left stale values in some). Nothing outside the IVR
package reads the state: the front keeps the text as it came and learns the
`step_index` and `end_reason` it needs from the reply's own fields.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pbx.ivr.models import ActionNode
from pbx.ivr.phases import (
    AwaitingApi,
    AwaitingRecognition,
    AwaitingSpeech,
    AwaitingStep,
    Closing,
    Collecting,
    CollectPrompt,
    Done,
    IvrStateError,
    MenuGreeting,
    MenuNotice,
    MenuProgress,
    MenuWaiting,
    PendingRequest,
    Phase,
    PhaseData,
    Prompting,
    Recording,
    RecordPrompt,
    Timer,
    VoicemailGreeting,
)
from pbx.messages import CallInfo

STATE_VERSION = 1


class PendingStep(BaseModel):
    """The step (or api) request in flight: what the trace of its answer needs."""

    model_config = ConfigDict(extra="forbid")
    trigger: str
    request: dict[str, Any]
    sent_at: float


class SessionState(BaseModel):
    """Everything the session needs between events; travels as JSON in IvrEvent/IvrReply.

    The keys from `active_play` to `end_reason` and `pending` are phase data: each
    phase reads and writes its own (see `load`), the others stay at their defaults."""

    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = 1  # STATE_VERSION
    phase: Phase
    call: CallInfo
    variables: dict[str, str] = Field(default_factory=dict)
    # The action being executed, variables already substituted.
    node: ActionNode | None = None
    play_id: int = 0  # last play_id issued; ids only grow within a session
    timer_id: int = 0  # last timer_id issued
    active_play: int | None = None  # the prompt whose end or failure is awaited
    active_timer: int | None = None  # the timer whose firing is awaited
    # When the awaited timer fires and the running recording ends at the latest, on the
    # clock of `now` (meaningful while active_timer / active_record is set): the bound
    # of the session's wait that each Step reports (`wait_ms`).
    timer_due: float | None = None
    record_due: float | None = None
    record_id: int = 0  # last record_id issued
    active_record: int | None = None  # the recording whose end is awaited
    last_record_path: str | None = None  # so two recordings in one second do not collide
    record_failure: str | None = None  # a media failure reported while recording
    # What a `tts` request in flight is for: a prompt, a menu greeting or a menu notice.
    tts_for: Literal["prompt", "greeting", "notice"] | None = None
    tts_greeting: str | None = None  # the current menu's synthesised greeting_text
    # Of an `asr` request in flight (input_voice). Written only when set, as prompt_rest.
    asr_stage: Literal["check", "recognize"] | None = None
    digits: list[str] = Field(default_factory=list)  # type-ahead, for a digit-taking action
    # The parts of a `record_name_list` prompt still to play after the current one.
    # Written only when there are some: executors from before it refuse the key.
    prompt_rest: list[str] = Field(default_factory=list)
    collected: str = ""  # digits of the current collect_dtmf / input_phone so far
    menu_attempts: int = 0  # invalid/timeout attempts of the current dtmf_menu
    notice_interruptible: bool = False
    hangup_code: int | None = None
    end_reason: str | None = None
    step_index: int = 0
    chained_steps: int = 0
    step_id: str | None = None
    step_name: str | None = None
    extra: dict[str, Any] | None = None
    pending: PendingStep | None = None


@dataclass
class Envelope:
    """What every phase of a session shares."""

    call: CallInfo
    variables: dict[str, str]
    node: ActionNode | None = None  # the action being executed, variables substituted
    # Id counters: ids only grow within a session (a jump_ivr keeps play and timer
    # ids, so late events of the old IVR stay stale; record ids start again).
    play_id: int = 0
    timer_id: int = 0
    record_id: int = 0
    last_record_path: str | None = None  # so two recordings in one second do not collide
    step_index: int = 0  # of the last trace
    chained_steps: int = 0  # provider steps (and api calls) since the last call event
    # Spec §4 passthrough of the latest provider answer.
    step_id: str | None = None
    step_name: str | None = None
    extra: dict[str, Any] | None = None


# The envelope's fields are keys of the state dict of the same name.
_ENVELOPE_KEYS = tuple(f.name for f in fields(Envelope))

# ---------------------------------------------------------------- text / dict -> memory


def load(state: str | dict[str, Any]) -> tuple[Envelope, PhaseData]:
    """Read a state, its JSON text or its dict (as `state_text` / `dump` or any
    version-1 executor wrote it). A state that is not one raises pydantic's
    ValidationError (not JSON, a key missing or of the wrong type) or IvrStateError (a
    phase without the data it needs)."""
    if isinstance(state, str):
        s = SessionState.model_validate_json(state)
    else:
        s = SessionState.model_validate(state)
    envelope = Envelope(**{name: getattr(s, name) for name in _ENVELOPE_KEYS})
    return envelope, _phase_data(s)


def _required(value: Any, s: SessionState, name: str) -> Any:
    if value is None:
        raise IvrStateError(f"state in phase {s.phase.value!r} without {name!r}")
    return value


def _pending(s: SessionState) -> PendingRequest:
    p: PendingStep = _required(s.pending, s, "pending")
    return PendingRequest(trigger=p.trigger, request=p.request, sent_at=p.sent_at)


def _timer(s: SessionState) -> Timer:
    return Timer(timer_id=_required(s.active_timer, s, "active_timer"), due=s.timer_due)


def _menu(s: SessionState) -> MenuProgress:
    return MenuProgress(attempts=s.menu_attempts, spoken_greeting=s.tts_greeting)


def _phase_data(s: SessionState) -> PhaseData:
    match s.phase:
        case Phase.WAIT_PROVIDER:
            return AwaitingStep(pending=_pending(s), typeahead=tuple(s.digits))
        case Phase.WAIT_API:
            return AwaitingApi(pending=_pending(s))
        case Phase.WAIT_TTS:
            purpose = _required(s.tts_for, s, "tts_for")
            return AwaitingSpeech(
                purpose=purpose,
                menu=_menu(s) if purpose != "prompt" else None,
                notice_interruptible=s.notice_interruptible if purpose == "notice" else False,
            )
        case Phase.WAIT_ASR:
            return AwaitingRecognition(stage=_required(s.asr_stage, s, "asr_stage"))
        case Phase.DONE:
            return Done(end_reason=s.end_reason, hangup_code=s.hangup_code)
        case Phase.COLLECT_WAIT:
            return Collecting(timer=_timer(s), collected=s.collected)
        case Phase.MENU_WAIT:
            return MenuWaiting(timer=_timer(s), menu=_menu(s))
        case Phase.RECORDING:
            return Recording(
                record_id=_required(s.active_record, s, "active_record"),
                due=s.record_due,
                failure=s.record_failure,
                grace_timer=_timer(s) if s.active_timer is not None else None,
                end_reason=s.end_reason,
            )
    play_id: int = _required(s.active_play, s, "active_play")
    match s.phase:
        case Phase.PROMPT:
            return Prompting(play_id=play_id, typeahead=tuple(s.digits),
                             rest=tuple(s.prompt_rest))
        case Phase.MENU_GREETING:
            return MenuGreeting(play_id=play_id, menu=_menu(s))
        case Phase.MENU_NOTICE:
            return MenuNotice(
                play_id=play_id,
                interruptible=s.notice_interruptible,
                typeahead=tuple(s.digits),
                menu=_menu(s),
            )
        case Phase.COLLECT_PROMPT:
            return CollectPrompt(play_id=play_id)
        case Phase.RECORD_PROMPT:
            return RecordPrompt(play_id=play_id)
        case Phase.VM_GREETING:
            return VoicemailGreeting(
                play_id=play_id, end_reason=_required(s.end_reason, s, "end_reason")
            )
        case Phase.CLOSING:
            return Closing(
                play_id=play_id,
                end_reason=_required(s.end_reason, s, "end_reason"),
                hangup_code=s.hangup_code,
            )
    raise AssertionError(f"phase {s.phase!r} has no data type")  # every Phase is above


# ---------------------------------------------------------------- memory -> text / dict


def session_state(envelope: Envelope, data: PhaseData) -> SessionState:
    """The state of `envelope` in the phase of `data`, to write (`state_text`)."""
    return SessionState(
        phase=data.phase,
        **{name: getattr(envelope, name) for name in _ENVELOPE_KEYS},
        **_phase_fields(data),
    )


def _unset(state: SessionState) -> set[str] | None:
    # Keys older executors refuse are written only when set.
    unset = {"prompt_rest"} if not state.prompt_rest else set()
    if state.asr_stage is None:
        unset.add("asr_stage")
    return unset or None


def state_text(state: SessionState) -> str:
    """The JSON text that travels (`IvrReply.state`)."""
    return state.model_dump_json(exclude=_unset(state))


def state_dict(state: SessionState) -> dict[str, Any]:
    """The same object as `state_text`, as a dict (JSON types only)."""
    return state.model_dump(mode="json", exclude=_unset(state))


def dump(envelope: Envelope, data: PhaseData) -> dict[str, Any]:
    """The state dict of `envelope` in the phase of `data` (JSON types only)."""
    return state_dict(session_state(envelope, data))


def _timer_fields(timer: Timer | None) -> dict[str, Any]:
    if timer is None:
        return {}
    return {"active_timer": timer.timer_id, "timer_due": timer.due}


def _menu_fields(menu: MenuProgress | None) -> dict[str, Any]:
    if menu is None:
        return {}
    return {"menu_attempts": menu.attempts, "tts_greeting": menu.spoken_greeting}


def _phase_fields(data: PhaseData) -> dict[str, Any]:
    fields: dict[str, Any] = {"active_play": data.active_play}
    match data:
        case AwaitingStep(pending=p, typeahead=typeahead):
            fields["pending"] = PendingStep(trigger=p.trigger, request=p.request, sent_at=p.sent_at)
            fields["digits"] = list(typeahead)
        case AwaitingApi(pending=p):
            fields["pending"] = PendingStep(trigger=p.trigger, request=p.request, sent_at=p.sent_at)
        case AwaitingSpeech(purpose=purpose, menu=menu, notice_interruptible=interruptible):
            fields.update(_menu_fields(menu), tts_for=purpose, notice_interruptible=interruptible)
        case AwaitingRecognition(stage=stage):
            fields["asr_stage"] = stage
        case Prompting(typeahead=typeahead):
            fields["digits"] = list(typeahead)
        case MenuGreeting(menu=menu):
            fields.update(_menu_fields(menu))
        case MenuNotice(interruptible=interruptible, typeahead=typeahead, menu=menu):
            fields.update(
                _menu_fields(menu), notice_interruptible=interruptible, digits=list(typeahead)
            )
        case MenuWaiting(timer=timer, menu=menu):
            fields.update(_menu_fields(menu))
            fields.update(_timer_fields(timer))
        case Collecting(timer=timer, collected=collected):
            fields.update(_timer_fields(timer), collected=collected)
        case Recording():
            fields.update(
                _timer_fields(data.grace_timer),
                active_record=data.record_id,
                record_due=data.due,
                record_failure=data.failure,
                end_reason=data.end_reason,
            )
        case VoicemailGreeting(end_reason=end_reason):
            fields["end_reason"] = end_reason
        case Closing(end_reason=end_reason, hangup_code=code) | Done(
            end_reason=end_reason, hangup_code=code
        ):
            fields.update(end_reason=end_reason, hangup_code=code)
    if isinstance(data, Prompting) and data.rest:
        fields["prompt_rest"] = list(data.rest)
    return fields

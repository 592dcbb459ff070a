"""The machine's two handler tables, and the handlers of the inputs that belong to no
action family.

* `EXECUTORS`: action type -> the function that starts it (`pbx.ivr.actions.*`, one
  module per family). Every ActionNode type has one.
* `INPUTS`: (phase, input kind) -> the function that handles that input in that
  phase. An input a phase does not list is refused (`IvrStateError`): which inputs
  each phase accepts is this table.

Both are typed: an entry names the action model (or the phase data type) its
function takes, so mypy checks each function against its entry, and the entry checks
at run time what it is given.

Handled here: the provider's answer to a step request (parsed and executed), the
caller hanging up, and a lost wait (issue 8); both of the latter in every phase.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from pbx.ivr.actions import api, collect, handoff, hangup, menu, prompt, record, voice
from pbx.ivr.models import (
    ActionError,
    ActionNode,
    ApiAction,
    CollectDtmfAction,
    DtmfMenuAction,
    ErrorEvent,
    HangupAction,
    InputPhoneAction,
    InputVoiceAction,
    JumpIvrAction,
    PlayAndHangupAction,
    PromptAction,
    QueueAction,
    RouteToAgentAction,
    ToRecordAction,
    TransferAction,
    VoicemailAction,
    VoipBridgeAction,
    parse_action,
)
from pbx.ivr.phases import (
    WAITING_FOR_ANSWER,
    AwaitingApi,
    AwaitingRecognition,
    AwaitingSpeech,
    AwaitingStep,
    Closing,
    Collecting,
    CollectPrompt,
    Digits,
    InputKind,
    MenuGreeting,
    MenuNotice,
    MenuWaiting,
    Phase,
    PhaseData,
    Prompting,
    Recording,
    RecordPrompt,
    VoicemailGreeting,
)
from pbx.ivr.requests import ProviderResult
from pbx.ivr.session import Executor, Session
from pbx.messages import CallEndedInput, StopCommand, WaitExpiredInput

A = TypeVar("A", bound=BaseModel)
D = TypeVar("D", bound=PhaseData)


@dataclass(frozen=True)
class ActionHandler(Generic[A]):
    """Starts actions of type `model`; returns the phase the action begins in."""

    model: type[A]
    run: Callable[[Session, A, Digits], PhaseData]

    @property
    def action_type(self) -> str:
        return str(self.model.model_fields["type"].default)

    def __call__(self, session: Session, action: ActionNode, typeahead: Digits) -> PhaseData:
        if not isinstance(action, self.model):
            raise TypeError(f"{self.action_type} handler given {type(action).__name__}")
        return self.run(session, action, typeahead)


@dataclass(frozen=True)
class InputHandler(Generic[D]):
    """Handles one kind of input in a phase whose data is a `data`; returns the next
    phase's data."""

    data: type[D]
    run: Callable[[Session, D, Any], PhaseData]

    def __call__(self, session: Session, data: PhaseData, payload: Any) -> PhaseData:
        if not isinstance(data, self.data):
            raise TypeError(f"handler for {self.data.__name__} given {type(data).__name__}")
        return self.run(session, data, payload)


# ---------------------------------------------------------------- inputs of no one family


def provider_answer(s: Session, data: AwaitingStep, result: ProviderResult) -> PhaseData:
    """The answer (after the retry policy) to a step request: executed, with the
    type-ahead the step kept; spec §8 for what could not be executed."""
    pending = data.pending
    trace: dict[str, Any] = {
        "trigger": pending.trigger,
        "request": pending.request,
        "duration_ms": max(0.0, (s.now - pending.sent_at) * 1000.0),
        "action": result.body if isinstance(result.body, dict) else None,
        "action_type": None,
    }
    s.provider_trace = trace
    raw: object = result.body
    if result.outcome == "invalid":
        return s.fail(f"invalid provider response: {result.reason}")
    if result.outcome == "fallback":
        s.errors.append(f"provider failed ({result.reason}); executing retry.fallback")
        raw = s.env.call.params.retry.fallback
        trace["action"] = raw
    try:
        action = parse_action(raw)
    except ActionError as exc:
        if isinstance(raw, dict) and isinstance(raw.get("type"), str):
            trace["action_type"] = raw["type"]
        return s.fail(exc.reason)
    trace["action_type"] = action.type
    return s.take(action, data.typeahead)


def call_ended(s: Session, data: PhaseData, ev: CallEndedInput) -> PhaseData:
    """The caller is gone: no commands, just `/end` (reason "Hangup" by default). A
    caller hanging up is how most voicemail messages end: the reason stays
    `Voicemail(<target>)` (or the Error(...) of a failed one)."""
    reason = ev.reason
    if isinstance(s.env.node, VoicemailAction):
        reason = data.hangup_reason() or reason
    return s.end(reason)


def wait_expired(s: Session, data: PhaseData, inp: WaitExpiredInput) -> PhaseData:
    """The front heard no call event for longer than this session's wait allows: the
    timer, prompt end or recording end it waited for was lost on the way. Give it up
    (late events become stale) and tell the provider: an `error` event (voicemail,
    which has no provider step, fails; a closing session just hangs up)."""
    if data.phase in WAITING_FOR_ANSWER:
        return data  # an answer is awaited, not a call event: nothing was lost here
    node = s.env.node
    what = f"{node.type if node is not None else 'session'} ({data.phase.value})"
    reason = (f"no call event for {inp.waited_ms} ms waiting in {what}: a media "
              "command or its event was lost")
    s.errors.append(reason)
    if data.active_play is not None:
        s.commands.append(StopCommand())
    s.cancel_timer(data.active_timer)
    s.stop_record(data.active_record)
    if isinstance(data, Closing):
        return s.hangup_now(data.hangup_code, data.end_reason)
    if isinstance(node, VoicemailAction):
        return s.fail(f"voicemail: {reason}")
    return s.ask(ErrorEvent(reason=reason), data.kept_digits())


# ---------------------------------------------------------------- the tables


def _action(model: type[A], run: Callable[[Session, A, Digits], PhaseData]) -> ActionHandler[Any]:
    """A table entry. Built here, not in the table, so that mypy checks `run` against
    `model` (in the table, the entry's type would be inferred from the table's)."""
    return ActionHandler(model, run)


def _on(data: type[D], run: Callable[[Session, D, Any], PhaseData]) -> InputHandler[Any]:
    """A table entry; mypy checks `run` against `data` here."""
    return InputHandler(data, run)


def _by_type(*handlers: ActionHandler[Any]) -> Mapping[str, Executor]:
    return {h.action_type: h for h in handlers}


EXECUTORS: Mapping[str, Executor] = _by_type(
    _action(PromptAction, prompt.run),
    _action(DtmfMenuAction, menu.run),
    _action(CollectDtmfAction, collect.run),
    _action(InputPhoneAction, collect.run),
    _action(ApiAction, api.run),
    _action(TransferAction, handoff.transfer),
    _action(QueueAction, handoff.queue),
    _action(RouteToAgentAction, handoff.route_to_agent),
    _action(JumpIvrAction, handoff.jump),
    _action(HangupAction, hangup.hangup),
    _action(PlayAndHangupAction, hangup.play_and_hangup),
    _action(ToRecordAction, record.torecord),
    _action(VoicemailAction, record.voicemail),
    _action(VoipBridgeAction, voice.voip_bridge),
    _action(InputVoiceAction, voice.input_voice),
)


def _stay(s: Session, data: PhaseData, payload: object) -> PhaseData:
    return data


_ignore = _on(PhaseData, _stay)

INPUTS: Mapping[tuple[Phase, InputKind], InputHandler[Any]] = {
    (Phase.WAIT_PROVIDER, InputKind.PROVIDER_RESULT): _on(AwaitingStep, provider_answer),
    (Phase.WAIT_API, InputKind.API_RESULT): _on(AwaitingApi, api.result),
    (Phase.WAIT_TTS, InputKind.TTS_RESULT): _on(AwaitingSpeech, prompt.speech_done),
    (Phase.WAIT_ASR, InputKind.ASR_RESULT): _on(AwaitingRecognition, voice.asr_answer),
    (Phase.PROMPT, InputKind.DIGIT): _on(Prompting, prompt.digit),
    (Phase.PROMPT, InputKind.AUDIO_COMPLETE): _on(Prompting, prompt.done),
    (Phase.PROMPT, InputKind.MEDIA_FAILURE): _on(Prompting, prompt.play_failed),
    (Phase.MENU_GREETING, InputKind.DIGIT): _on(MenuGreeting, menu.digit),
    (Phase.MENU_GREETING, InputKind.AUDIO_COMPLETE): _on(MenuGreeting, menu.greeting_done),
    (Phase.MENU_GREETING, InputKind.MEDIA_FAILURE): _on(MenuGreeting, prompt.play_failed),
    (Phase.MENU_NOTICE, InputKind.DIGIT): _on(MenuNotice, menu.notice_digit),
    (Phase.MENU_NOTICE, InputKind.AUDIO_COMPLETE): _on(MenuNotice, menu.notice_done),
    (Phase.MENU_NOTICE, InputKind.MEDIA_FAILURE): _on(MenuNotice, menu.notice_done),
    (Phase.MENU_WAIT, InputKind.DIGIT): _on(MenuWaiting, menu.digit),
    (Phase.MENU_WAIT, InputKind.TIMER): _on(MenuWaiting, menu.timeout),
    (Phase.COLLECT_PROMPT, InputKind.DIGIT): _on(CollectPrompt, collect.digit),
    (Phase.COLLECT_PROMPT, InputKind.AUDIO_COMPLETE): _on(CollectPrompt, collect.prompt_done),
    (Phase.COLLECT_PROMPT, InputKind.MEDIA_FAILURE): _on(CollectPrompt, prompt.play_failed),
    (Phase.COLLECT_WAIT, InputKind.DIGIT): _on(Collecting, collect.digit),
    (Phase.COLLECT_WAIT, InputKind.TIMER): _on(Collecting, collect.timeout),
    (Phase.RECORD_PROMPT, InputKind.DIGIT): _ignore,
    (Phase.RECORD_PROMPT, InputKind.AUDIO_COMPLETE): _on(RecordPrompt, record.prompt_done),
    (Phase.RECORD_PROMPT, InputKind.MEDIA_FAILURE): _on(RecordPrompt, prompt.play_failed),
    (Phase.VM_GREETING, InputKind.DIGIT): _ignore,
    (Phase.VM_GREETING, InputKind.AUDIO_COMPLETE): _on(VoicemailGreeting, record.greeting_done),
    (Phase.VM_GREETING, InputKind.MEDIA_FAILURE): _on(VoicemailGreeting, record.greeting_done),
    # The stop digit (and any other) is the media worker's business while recording.
    (Phase.RECORDING, InputKind.DIGIT): _ignore,
    (Phase.RECORDING, InputKind.RECORDING_FINISHED): _on(Recording, record.finished),
    (Phase.RECORDING, InputKind.MEDIA_FAILURE): _on(Recording, record.trouble),
    (Phase.RECORDING, InputKind.TIMER): _on(Recording, record.failed),
    (Phase.CLOSING, InputKind.DIGIT): _ignore,
    (Phase.CLOSING, InputKind.AUDIO_COMPLETE): _on(Closing, hangup.closing_done),
    (Phase.CLOSING, InputKind.MEDIA_FAILURE): _on(Closing, hangup.closing_done),
    # Every phase but DONE (whose inputs are ignored before they get here).
    **{
        (phase, kind): handler
        for phase in Phase
        if phase is not Phase.DONE
        for kind, handler in (
            (InputKind.CALL_ENDED, _on(PhaseData, call_ended)),
            (InputKind.WAIT_EXPIRED, _on(PhaseData, wait_expired)),
        )
    },
}

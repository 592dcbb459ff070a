"""The step-mode IVR session state machine (sans-IO).

Theory of operation
-------------------
One IVR session is a `SessionState` (a pydantic model, JSON-able) that travels with
every `IvrEvent` and comes back in every `IvrReply`; nothing is kept between calls.
The entry points take the dumped state, one input and the current time `now`
(wall-clock seconds; tests pass a virtual clock) and return a `Step`:

    start(call, now)                    SessionStartInput   -> Step
    handle(state, input, now)           MediaInput / CallEndedInput (and a restart)
    provider_result(state, result, now) the answer to the Step's `step` request
    api_result(state, result, now)      the answer to the Step's `api` request
    tts_result(state, result, now)      the answer to the Step's `tts` request
    abort(state, call, reason, now)     the shell's last resort after an internal error

`handle`, `provider_result`, `api_result` and `tts_result` also take `ivrs`, the configured
`[ivrs.<route_point>]` table a `jump_ivr` action looks its target up in (data passed
in like the clock, so the machine stays pure).

A `Step` holds the new state, call commands for the media worker / front (in order),
HTTP requests for the shell, traces, and two flags. When `waiting_for_provider` is
set the last request is a `step`, `api` or `tts` request: the shell performs it
(`step` under the retry policy in `pbx.ivr.provider`, `tts` with `pbx.tts`) and feeds
the `ProviderResult` to `provider_result` (the `ApiResult` to `api_result`, the
`TtsResult` to `tts_result`), and so on until the machine waits for a call event
again; then the shell replies. The other requests
(`start`, `end`, `dtmf_match`) are fire-and-forget notifications.

Phases (`Phase`) and which inputs each accepts are one table, `_TABLE`, at the end
of this file. Media events that belong to a prompt, timer or recording that is no
longer the current one (play_id / timer_id / record_id other than `active_play` /
`active_timer` / `active_record`) are stale and ignored before the table is
consulted, and so is `ws_bridge_ended` (voip_bridge is terminal: the front handles
its end); inputs after the session is done are ignored; any other input a phase does
not list raises `IvrStateError`.

No silent waits (issue 8): every Step says in `wait_ms` how long the session may now
wait for its next call event on its own terms (what is left of the timer it armed or
the recording it runs; None while a prompt plays, whose length it does not know). The
front holds the session to it and, when nothing came, feeds a `WaitExpiredInput`: the
session gives up what it waited for and asks the provider with an `error` event.

Recording and voicemail file names carry the time of `now` in UTC
(`YYYYmmdd_HHMMSS`), so they too are a pure function of the inputs.

Protocol decisions followed here are DESIGN §3's; where the brief or DESIGN left
a choice open, the choice is said in a comment where it is made.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from pbx.config import IvrAppParams
from pbx.ivr.models import (
    NESTED_ACTION_FIELDS,
    ActionError,
    ActionNode,
    ApiAction,
    ApiResponseEvent,
    ApiResult,
    AudioCompleteEvent,
    CollectDtmfAction,
    DtmfEvent,
    DtmfMenuAction,
    DtmfMenuInvalidEvent,
    DtmfMenuTimeoutEvent,
    DtmfTimeoutEvent,
    ErrorEvent,
    HangupAction,
    InputPhoneAction,
    InputVoiceAction,
    JumpIvrAction,
    PhoneCollectedEvent,
    PlayAndHangupAction,
    PromptAction,
    ProviderContext,
    ProviderEvent,
    ProviderRequest,
    ProviderResult,
    QueueAction,
    RecordingCompleteEvent,
    RequestKind,
    RouteToAgentAction,
    SessionContext,
    SessionStartEvent,
    ToRecordAction,
    TransferAction,
    TtsResult,
    VoicemailAction,
    VoipBridgeAction,
    action_json,
    parse_action,
)
from pbx.messages import (
    AgentCommand,
    AudioComplete,
    CallCommand,
    CallEndedInput,
    CallInfo,
    DtmfDigit,
    HangupCommand,
    MediaFailure,
    MediaInput,
    PlayCommand,
    QueueCommand,
    RecordCommand,
    RecordingFinished,
    SessionStartInput,
    StepTrace,
    StopCommand,
    StopRecordCommand,
    TimerCommand,
    TimerFired,
    TransferCommand,
    WaitExpiredInput,
    WsBridgeCommand,
    WsBridgeEnded,
)
from pbx.redact import redact

ERROR_PROMPT = "sounds/error.wav"
# Voicemail: greeting (a missing greeting file leaves the beep only), goodbye after the
# message. A `voicemail` action may name its own greeting (`greeting`, an extension).
VOICEMAIL_GREETING = "sounds/voicemail_greeting.wav"
VOICEMAIL_GOODBYE = "sounds/goodbye.wav"
# Recording length when `max_duration_secs` is unset (or not positive), and the most
# a provider may ask for.
DEFAULT_RECORD_SECS = 120
MAX_RECORD_SECS = 3600
VOICEMAIL_MAX_SECS = 120
RECORD_STOP_DIGITS = "#"
# A media failure while recording is either a refused start (nothing follows) or a
# write error (its RecordingFinished follows on the same tick): wait this long for it.
RECORD_FAILURE_GRACE_MS = 1000
# A recording's RecordingFinished comes at most this long after its max duration (the
# beep before it, the tick that closes the file).
RECORD_END_SLACK_S = 2.0
TTS_UNAVAILABLE = "TTS service not available"
ASR_UNAVAILABLE = "ASR service not available"
# Provider steps (and `api` calls) allowed in a row without a call event in between: a
# provider that answers every `error` with another failing action, or an `api` whose
# dynamic tree is another `api`, would otherwise loop forever.
MAX_CHAINED_STEPS = 16
# Methods whose `api` variables go in the query string; the others send a JSON body.
QUERY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})

Ivrs = Mapping[str, IvrAppParams]
STATE_VERSION = 1


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
    RECORD_PROMPT = "record_prompt"  # torecord's prompt is playing; recording follows
    RECORDING = "recording"  # torecord / voicemail: the media worker is recording
    VM_GREETING = "vm_greeting"  # voicemail greeting playing; beep and recording follow
    CLOSING = "closing"  # last prompt before the hang-up (hangup, play_and_hangup, error)
    DONE = "done"


class InputKind(StrEnum):
    DIGIT = "dtmf"
    AUDIO_COMPLETE = "audio_complete"
    TIMER = "timer"
    MEDIA_FAILURE = "media_error"
    CALL_ENDED = "call_ended"
    PROVIDER_RESULT = "provider_result"
    API_RESULT = "api_result"
    TTS_RESULT = "tts_result"
    RECORDING_FINISHED = "recording_finished"
    WAIT_EXPIRED = "wait_expired"


class PendingStep(BaseModel):
    """The step (or api) request in flight: what the trace of its answer needs."""

    model_config = ConfigDict(extra="forbid")
    trigger: str
    request: dict[str, Any]
    sent_at: float


class SessionState(BaseModel):
    """Everything the session needs between events; travels as JSON in IvrEvent/IvrReply."""

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
    digits: list[str] = Field(default_factory=list)  # type-ahead, for a digit-taking action
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
class Step:
    """What one entry point produced. `requests` are in the order to send them; when
    `waiting_for_provider` is set the last one is the `step`, `api` or `tts` request to
    answer."""

    state: dict[str, Any]
    commands: list[CallCommand] = field(default_factory=list)
    requests: list[ProviderRequest] = field(default_factory=list)
    traces: list[StepTrace] = field(default_factory=list)
    waiting_for_provider: bool = False
    done: bool = False
    # The longest the session may now wait for a call event (see the module docstring);
    # None while it waits for the provider, when done, or while a prompt plays.
    wait_ms: int | None = None

    @property
    def pending_request(self) -> ProviderRequest | None:
        """The `step`, `api` or `tts` request whose result the session waits for, if any."""
        last = self.requests[-1] if self.waiting_for_provider and self.requests else None
        return last if last is not None and last.kind in ("step", "api", "tts") else None

    @property
    def step_request(self) -> ProviderRequest | None:
        request = self.pending_request
        return request if request is not None and request.kind == "step" else None

    @property
    def api_request(self) -> ProviderRequest | None:
        request = self.pending_request
        return request if request is not None and request.kind == "api" else None

    @property
    def tts_request(self) -> ProviderRequest | None:
        request = self.pending_request
        return request if request is not None and request.kind == "tts" else None


# ---------------------------------------------------------------- variables (spec §7)

_VAR_RE = re.compile(r"\$([A-Za-z0-9_][A-Za-z0-9_.\-]*)\$")
# Fields never substituted: identifiers, passthrough data, the variables themselves.
_NOT_SUBSTITUTED = NESTED_ACTION_FIELDS | {"type", "step_id", "step_name", "extra", "variables"}


def substitute_text(text: str, variables: dict[str, str]) -> str:
    """Replace each `$name$` once; unknown names stay as written (DESIGN §3)."""
    return _VAR_RE.sub(lambda m: variables.get(m.group(1), m.group(0)), text)


def _substitute_value(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):
        return substitute_text(value, variables)
    if isinstance(value, dict):
        return {k: _substitute_value(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_value(v, variables) for v in value]
    return value


def substitute(action: ActionNode, variables: dict[str, str]) -> ActionNode:
    """The action with `$name$` replaced in its own string fields; nested actions are
    left alone and substituted when they are executed (variables may change by then)."""
    updates = {
        name: _substitute_value(getattr(action, name), variables)
        for name in type(action).model_fields
        if name not in _NOT_SUBSTITUTED
    }
    return action.model_copy(update=updates)


_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_.@+\-]")


def safe_name(text: str) -> str:
    """One path component from provider or SIP data (a mailbox, a session id): characters
    other than letters, digits and `_.@+-` become `_`, and it never starts with a dot."""
    name = _UNSAFE_RE.sub("_", text)[:128]
    return f"_{name}" if not name or name.startswith(".") else name


def initial_variables(call: CallInfo) -> dict[str, str]:
    """Pre-defined variables (spec §7) plus `sip_<Header>` and the call's preset ones."""
    variables = {
        "session_id": call.session_id,
        "caller": call.caller,
        "callee": call.callee,
        "direction": call.direction,
    }
    if call.params.tenant_id is not None:
        variables["tenant_id"] = call.params.tenant_id
    for name, value in call.sip_headers.items():
        variables[f"sip_{name}"] = value
    variables.update(call.variables)
    return variables


# ---------------------------------------------------------------- entry points


def start(call: CallInfo, now: float) -> Step:
    """Session start: `/start` notification, then the `session_start` step request."""
    session = _Session(
        SessionState(phase=Phase.WAIT_PROVIDER, call=call, variables=initial_variables(call)),
        now,
        trigger="session_start",
    )
    session.begin()
    return session.finish()


def handle(
    state: dict[str, Any],
    inp: SessionStartInput | MediaInput | CallEndedInput | WaitExpiredInput,
    now: float,
    ivrs: Ivrs | None = None,
) -> Step:
    """A call event: a media event (digit, prompt end, timer, media failure) or hang-up."""
    if isinstance(inp, SessionStartInput):
        # A new session on the same call (e.g. back from a queue): start afresh.
        return start(inp.call, now)
    session = _Session.load(state, now, trigger=_input_name(inp), ivrs=ivrs)
    return session.feed(inp)


def provider_result(
    state: dict[str, Any], result: ProviderResult, now: float, ivrs: Ivrs | None = None
) -> Step:
    """The answer (after the retry policy) to the step request the last Step asked for."""
    session = _Session.load(state, now, trigger="provider", ivrs=ivrs)
    return session.dispatch(InputKind.PROVIDER_RESULT, result)


def api_result(
    state: dict[str, Any], result: ApiResult, now: float, ivrs: Ivrs | None = None
) -> Step:
    """The outcome of the `api` request the last Step asked for."""
    session = _Session.load(state, now, trigger="api", ivrs=ivrs)
    return session.dispatch(InputKind.API_RESULT, result)


def tts_result(
    state: dict[str, Any], result: TtsResult, now: float, ivrs: Ivrs | None = None
) -> Step:
    """The outcome of the `tts` request the last Step asked for."""
    session = _Session.load(state, now, trigger="tts", ivrs=ivrs)
    return session.dispatch(InputKind.TTS_RESULT, result)


def abort(state: dict[str, Any] | None, call: CallInfo | None, reason: str, now: float) -> Step:
    """The shell's last resort after an unexpected error: error prompt, then hang-up.

    Falls back to a bare HangupCommand when the state itself is unusable.
    """
    try:
        if state is not None:
            session = _Session.load(state, now, trigger="internal_error")
        elif call is not None:
            session = _Session(
                SessionState(phase=Phase.PROMPT, call=call, variables=initial_variables(call)),
                now,
                trigger="internal_error",
            )
        else:
            raise ValueError("no state and no call")
    except Exception:
        hangup = HangupCommand(reason=f"Error({reason})")
        return Step(state=state or {}, commands=[hangup], done=True)
    if session.s.phase is Phase.DONE:
        return session.finish()
    session.s.pending = None
    session.s.phase = Phase.PROMPT  # anything but CLOSING: play the error prompt
    session.fail(reason)
    return session.finish()


def _input_name(inp: MediaInput | CallEndedInput | WaitExpiredInput) -> str:
    return inp.event.type if isinstance(inp, MediaInput) else inp.type


# ---------------------------------------------------------------- the session


class _Session:
    """One entry point's work on a loaded state; collects commands, requests, traces."""

    def __init__(
        self, state: SessionState, now: float, trigger: str, ivrs: Ivrs | None = None
    ) -> None:
        self.s = state
        self.now = now
        self.trigger = trigger
        self.ivrs: Ivrs = ivrs if ivrs is not None else {}
        self.commands: list[CallCommand] = []
        self.requests: list[ProviderRequest] = []
        self.errors: list[str] = []
        self.provider_trace: dict[str, Any] | None = None
        self.ended = False
        self.end_reason: str | None = None  # for the trace; survives a jump_ivr restart

    @classmethod
    def load(
        cls, state: dict[str, Any], now: float, trigger: str, ivrs: Ivrs | None = None
    ) -> _Session:
        return cls(SessionState.model_validate(state), now, trigger, ivrs)

    def begin(self) -> None:
        """A (new) provider session: `/start` notification, then `session_start`."""
        call = self.s.call
        ctx = SessionContext(
            session_id=call.session_id,
            caller=call.caller,
            callee=call.callee,
            direction=call.direction,
            tenant_id=call.params.tenant_id,
            ivr_id=call.params.ivr_id,
        )
        self.notify("start", ctx.model_dump(mode="json"))
        self.ask(SessionStartEvent())

    # ------------------------------------------------------------ dispatch

    def feed(self, inp: MediaInput | CallEndedInput | WaitExpiredInput) -> Step:
        if self.s.phase is Phase.DONE:
            return self.finish()  # events after the end are ignored
        self.s.chained_steps = 0
        if isinstance(inp, CallEndedInput):
            return self.dispatch(InputKind.CALL_ENDED, inp)
        if isinstance(inp, WaitExpiredInput):
            return self.dispatch(InputKind.WAIT_EXPIRED, inp)
        ev = inp.event
        if isinstance(ev, DtmfDigit):
            return self.dispatch(InputKind.DIGIT, ev)
        if isinstance(ev, AudioComplete):
            if ev.play_id != self.s.active_play:
                return self.finish()  # stale: a stopped or replaced prompt
            return self.dispatch(InputKind.AUDIO_COMPLETE, ev)
        if isinstance(ev, TimerFired):
            if ev.timer_id != self.s.active_timer:
                return self.finish()  # stale: a cancelled or replaced timer
            return self.dispatch(InputKind.TIMER, ev)
        if isinstance(ev, MediaFailure):
            if ev.play_id is not None:
                if ev.play_id != self.s.active_play:
                    return self.finish()  # about a prompt we no longer wait for
            elif self.s.active_play is None and self.s.active_record is None:
                return self.finish()  # about nothing we still wait for
            return self.dispatch(InputKind.MEDIA_FAILURE, ev)
        if isinstance(ev, RecordingFinished):
            if ev.record_id != self.s.active_record:
                return self.finish()  # stale: a stopped recording
            return self.dispatch(InputKind.RECORDING_FINISHED, ev)
        if isinstance(ev, WsBridgeEnded):
            return self.finish()  # voip_bridge is terminal: the front handles its end
        raise IvrStateError(f"unknown media event {ev!r}")

    def dispatch(self, kind: InputKind, payload: Any) -> Step:
        if self.s.phase is Phase.DONE:
            return self.finish()
        handler = _TABLE.get((self.s.phase, kind))
        if handler is None:
            raise IvrStateError(f"input {kind.value!r} not allowed in phase {self.s.phase.value!r}")
        handler(self, payload)
        return self.finish()

    # ------------------------------------------------------------ outputs

    def notify(self, kind: RequestKind, body: dict[str, Any]) -> None:
        params = self.s.call.params
        path = {"start": "/start", "end": "/end", "dtmf_match": "/dtmf-match"}[kind]
        self.requests.append(ProviderRequest(kind, params.url + path, body, params))

    def ask(self, event: ProviderEvent) -> None:
        """Send `event` to the provider; the session waits for its answer."""
        self.s.chained_steps += 1
        if self.s.chained_steps > MAX_CHAINED_STEPS:
            self.fail(f"more than {MAX_CHAINED_STEPS} provider steps without a call event")
            return
        call, params = self.s.call, self.s.call.params
        ctx = ProviderContext(
            session_id=call.session_id,
            caller=call.caller,
            callee=call.callee,
            direction=call.direction,
            tenant_id=params.tenant_id,
            ivr_id=params.ivr_id,
            variables=dict(self.s.variables),
            event=event,
        )
        body = ctx.model_dump(mode="json")
        self.s.pending = PendingStep(trigger=event.type, request=body, sent_at=self.now)
        self.s.phase = Phase.WAIT_PROVIDER
        self.requests.append(ProviderRequest("step", params.url, body, params))

    def play(self, file: str, interruptible: bool) -> None:
        self.s.play_id += 1
        self.s.active_play = self.s.play_id
        self.commands.append(
            PlayCommand(play_id=self.s.play_id, file=file, interruptible=interruptible)
        )

    def stop_play(self, stopped_play_id: int | None) -> None:
        """A digit ended the active prompt. The media worker already stopped an
        interruptible prompt it reports in `stopped_play_id`; otherwise stop it here."""
        if self.s.active_play is not None and stopped_play_id != self.s.active_play:
            self.commands.append(StopCommand())
        self.s.active_play = None

    def arm_timer(self, delay_ms: int) -> None:
        """Arm the call's media-worker timer (replacing any previous one). A delay of 0
        means "cancel" to the worker, so 0 is armed as 1 ms."""
        self.s.timer_id += 1
        self.s.active_timer = self.s.timer_id
        self.s.timer_due = self.now + max(1, delay_ms) / 1000.0
        self.commands.append(TimerCommand(timer_id=self.s.timer_id, delay_ms=max(1, delay_ms)))

    def cancel_timer(self) -> None:
        if self.s.active_timer is not None:
            self.commands.append(TimerCommand(timer_id=self.s.active_timer, delay_ms=0))
            self.s.active_timer = None

    def stop_record(self) -> None:
        """Stop a recording in progress (its RecordingFinished is then stale)."""
        if self.s.active_record is not None:
            self.commands.append(StopRecordCommand())
            self.s.active_record = None

    def synthesize(
        self, text: str, voice: str | None, purpose: Literal["prompt", "greeting", "notice"]
    ) -> None:
        """Ask the shell for text to speech; the file comes back to `on_tts_result`."""
        self.s.tts_for = purpose
        self.s.phase = Phase.WAIT_TTS
        body = {"text": text, "voice": voice}
        self.requests.append(ProviderRequest("tts", "", body, self.s.call.params))

    def end(self, reason: str) -> None:
        """The session is over: `/end` notification, no further events wanted."""
        self.s.end_reason = reason
        self.s.phase = Phase.DONE
        self.s.active_play = None
        self.s.active_timer = None
        self.s.pending = None
        self.ended = True
        self.end_reason = reason
        self.notify("end", {"reason": reason, "session_id": self.s.call.session_id})

    def hangup_now(self) -> None:
        reason = self.s.end_reason or "Normal"
        self.commands.append(HangupCommand(code=self.s.hangup_code, reason=reason))
        self.end(reason)

    def close(self, prompt: str | None, code: int | None, reason: str) -> None:
        """hangup / play_and_hangup: play the prompt, then hang up, no provider call."""
        self.cancel_timer()
        self.stop_record()
        self.s.hangup_code = code
        self.s.end_reason = reason
        if prompt:
            self.play(prompt, interruptible=False)
            self.s.phase = Phase.CLOSING
        else:
            self.hangup_now()

    def fail(self, reason: str) -> None:
        """Spec §8: record the error, play sounds/error.wav, hang up."""
        self.errors.append(reason)
        if self.s.phase is Phase.DONE:
            return
        self.s.pending = None
        if self.s.phase is Phase.CLOSING:
            # Already on the way out: do not start another prompt.
            self.s.end_reason = f"Error({reason})"
            self.hangup_now()
            return
        self.close(ERROR_PROMPT, None, f"Error({reason})")

    # ------------------------------------------------------------ executing actions

    def prepare(self, action: ActionNode) -> ActionNode:
        """Apply the action's `variables`, then substitute `$name$` in its fields."""
        if isinstance(action.variables, dict):
            self.s.variables.update(action.variables)
        return substitute(action, self.s.variables)

    def execute(self, action: ActionNode, digits: list[str]) -> None:
        """Run an action; `digits` (type-ahead) go to it if it takes digits, else dropped."""
        self.cancel_timer()
        action = self.prepare(action)
        self.s.node = action
        self.s.digits = list(digits) if action.takes_digits else []
        self.s.menu_attempts = 0
        self.s.tts_greeting = None
        executor = _EXECUTORS.get(action.type)
        if executor is None:
            self.fail(f"{action.type}: not implemented yet")
            return
        executor(self, action)

    def exec_prompt(self, action: ActionNode) -> None:
        assert isinstance(action, PromptAction)
        if action.file:
            self.play(action.file, action.interruptible)
            self.s.phase = Phase.PROMPT
        elif action.tts_text:
            # DESIGN §3 "TTS": synthesised by the shell, then played (or error{reason}).
            self.synthesize(action.tts_text, action.tts_voice, "prompt")
        else:
            self.fail("prompt: missing required field 'file' (or 'tts_text')")

    def exec_menu(self, action: ActionNode) -> None:
        assert isinstance(action, DtmfMenuAction)
        if self.s.digits:
            # Type-ahead answers the menu before its greeting.
            self.menu_input(self.s.digits.pop(0))
        else:
            self.menu_greet()

    def exec_hangup(self, action: ActionNode) -> None:
        assert isinstance(action, HangupAction)
        self.close(action.prompt, None, "Normal")

    def exec_play_and_hangup(self, action: ActionNode) -> None:
        assert isinstance(action, PlayAndHangupAction)
        self.close(action.prompt, action.code, "Normal")

    def exec_transfer(self, action: ActionNode) -> None:
        assert isinstance(action, TransferAction)
        self.commands.append(TransferCommand(target=action.target))
        self.end(f"Transfer({action.target})")

    def exec_queue(self, action: ActionNode) -> None:
        assert isinstance(action, QueueAction)
        self.commands.append(QueueCommand(target=action.target, return_to_ivr=action.return_to_ivr))
        self.end(f"Queue({action.target})")

    def exec_route_to_agent(self, action: ActionNode) -> None:
        assert isinstance(action, RouteToAgentAction)
        self.commands.append(
            AgentCommand(target=action.target, skill_group_id=action.skill_group_id or None)
        )
        self.end(f"Agent({action.target})")

    def exec_voip_bridge(self, action: ActionNode) -> None:
        assert isinstance(action, VoipBridgeAction)
        # Choice: a timeout that is not positive means the default.
        timeout_ms = action.timeout_ms if action.timeout_ms > 0 else 30_000
        self.commands.append(
            WsBridgeCommand(
                uri=action.create_room_uri, headers=dict(action.headers), timeout_ms=timeout_ms
            )
        )
        self.end("VoipBridge")

    def exec_input_voice(self, action: ActionNode) -> None:
        assert isinstance(action, InputVoiceAction)
        # No ASR yet: DESIGN §3 "ASR" — the provider gets error{reason}.
        self.ask(ErrorEvent(reason=ASR_UNAVAILABLE))

    def exec_jump(self, action: ActionNode) -> None:
        """jump_ivr: end this provider session (`/end` with `Jump(<route_point>)`), then
        start the `[ivrs.<route_point>]` IVR on the same call as if it had just entered:
        `/start`, `session_start`, fresh variables plus `params`.

        Kept across the jump: the call, the play/timer id counters (late events of the
        old session stay stale), the trace step index and passthrough fields, and the
        chained-step count (so IVRs jumping to each other cannot loop without bound)."""
        assert isinstance(action, JumpIvrAction)
        params = self.ivrs.get(action.route_point)
        if params is None:
            self.fail(f"jump_ivr: unknown route point {action.route_point!r}")
            return
        old = self.s
        self.end(f"Jump({action.route_point})")
        call = old.call.model_copy(
            update={"params": params, "route_name": action.route_point, "variables": {}}
        )
        variables = initial_variables(call)
        variables.update(action.params)
        self.s = SessionState(
            phase=Phase.WAIT_PROVIDER,
            call=call,
            variables=variables,
            # The jump stays the session's last action until the new IVR answers (the
            # trace of a jump taken locally, e.g. from a menu entry, names it).
            node=old.node,
            play_id=old.play_id,
            timer_id=old.timer_id,
            step_index=old.step_index,
            chained_steps=old.chained_steps,
            # Spec §4 passthrough until the new IVR's provider replaces them.
            step_id=old.step_id,
            step_name=old.step_name,
            extra=old.extra,
        )
        self.begin()

    # ------------------------------------------------------------ collect_dtmf, input_phone

    def collector(self) -> CollectDtmfAction | InputPhoneAction:
        node = self.s.node
        assert isinstance(node, CollectDtmfAction | InputPhoneAction)
        return node

    def exec_collect(self, action: ActionNode) -> None:
        """DESIGN §3: optional interruptible prompt, then digits until `max_digits`, the
        terminator or the (inter-digit) timeout. Type-ahead digits (kept from a
        non-interruptible prompt, or the digit that interrupted a prompt whose `next`
        this is) are taken first; then the prompt is skipped, as the first of them
        would have stopped it."""
        assert isinstance(action, CollectDtmfAction | InputPhoneAction)
        self.s.collected = ""
        typed, self.s.digits = self.s.digits, []
        for i, digit in enumerate(typed):
            if self.collect_take(digit):
                # Choice: digits past the end of the collection stay type-ahead for the
                # next action that takes digits (like a non-interruptible prompt's).
                self.s.digits = typed[i + 1 :]
                self.collect_end()
                return
        if not typed and action.prompt:
            self.play(action.prompt, interruptible=True)
            self.s.phase = Phase.COLLECT_PROMPT
        else:
            self.collect_arm()

    def collect_take(self, digit: str) -> bool:
        """Add one digit; True when it ends the collection (terminator or max_digits)."""
        node = self.collector()
        if node.terminator and digit == node.terminator:
            return True  # not stored
        self.s.collected += digit
        return len(self.s.collected) >= node.max_digits

    def collect_arm(self) -> None:
        """(Re-)arm the timeout: when the prompt ends, and again after every digit."""
        self.arm_timer(self.collector().timeout_ms)
        self.s.phase = Phase.COLLECT_WAIT

    def collect_prompt_done(self, ev: AudioComplete) -> None:
        self.s.active_play = None
        self.collect_arm()

    def collect_digit(self, ev: DtmfDigit) -> None:
        self.stop_play(ev.stopped_play_id)  # the prompt, if still playing
        if self.collect_take(ev.digit):
            self.cancel_timer()
            self.collect_end()
        else:
            self.collect_arm()  # inter-digit timeout; replaces the running timer

    def collect_timeout(self, ev: TimerFired) -> None:
        self.s.active_timer = None
        self.collect_end()

    def collect_end(self) -> None:
        """The collection is over: the value (even partial) goes in the variable; with at
        least `min_digits` the result goes to the provider (or `next` is followed), with
        fewer the provider gets `dtmf_timeout`."""
        node = self.collector()
        value, self.s.collected = self.s.collected, ""
        phone = isinstance(node, InputPhoneAction)
        self.s.variables["phone_number" if phone else "dtmf_input"] = value
        if len(value) < node.min_digits:
            # Choice: a `next` is not followed on a failed collection (the provider
            # decides what to do about it).
            self.ask(DtmfTimeoutEvent())
        elif node.next is not None:
            # DESIGN §3 "next": a local collection result continues without a provider
            # call; `next` reads the value from the variable.
            self.execute(node.next, self.s.digits)
        elif phone:
            self.ask(PhoneCollectedEvent(number=value))
        else:
            self.ask(DtmfEvent(digit=value))

    # ------------------------------------------------------------ api

    def exec_api(self, action: ActionNode) -> None:
        """Ask the shell for the HTTP call; its outcome comes back to `on_api_result`."""
        assert isinstance(action, ApiAction)
        self.s.chained_steps += 1
        if self.s.chained_steps > MAX_CHAINED_STEPS:
            self.fail(f"more than {MAX_CHAINED_STEPS} provider steps without a call event")
            return
        method = action.method.strip().upper() or "GET"
        names = action.variables.split(",") if isinstance(action.variables, str) else []
        # Choice: names of variables that are not set are left out.
        values = {
            name: self.s.variables[name]
            for name in (n.strip() for n in names)
            if name and name in self.s.variables
        }
        query = values if method in QUERY_METHODS else None
        body = {} if query is not None else values
        described: dict[str, Any] = {"method": method, "url": action.url}
        # Headers are not traced (they tend to carry credentials).
        described["query" if query is not None else "body"] = values
        self.s.pending = PendingStep(trigger="api", request=described, sent_at=self.now)
        self.s.phase = Phase.WAIT_API
        self.requests.append(
            ProviderRequest(
                "api",
                action.url,
                body,
                self.s.call.params,
                method=method,
                headers=dict(action.headers),
                query=query,
                timeout_s=float(action.timeout),
            )
        )

    def on_api_result(self, result: ApiResult) -> None:
        node = self.s.node
        pending = self.s.pending
        assert isinstance(node, ApiAction) and pending is not None
        self.s.pending = None
        self.s.variables["api_status"] = str(result.status)
        self.s.variables["api_result"] = orjson.dumps(result.body).decode()
        trace: dict[str, Any] = {
            "trigger": "api_response",
            "request": pending.request,
            "duration_ms": max(0.0, (self.now - pending.sent_at) * 1000.0),
            "action": action_json(node),
            "action_type": node.type,
        }
        self.provider_trace = trace
        if node.get_dynamic_tree:
            # The body is the next action (DESIGN §3); `next` of the api node is not
            # followed, the tree carries its own.
            body = result.body
            trace["action"] = body if isinstance(body, dict) else None
            if not 200 <= result.status < 300:
                error = body.get("error") if isinstance(body, dict) else None
                self.fail(f"api: dynamic tree not fetched: {error or f'HTTP {result.status}'}")
                return
            try:
                action = parse_action(body)
            except ActionError as exc:
                if isinstance(body, dict) and isinstance(body.get("type"), str):
                    trace["action_type"] = body["type"]
                self.fail(f"api: dynamic tree: {exc.reason}")
                return
            trace["action_type"] = action.type
            self.take(action)
        elif node.next is not None:
            # DESIGN §3 "next": followed without a provider call; `api_status` and
            # `api_result` tell it how the call went.
            self.execute(node.next, self.s.digits)
        else:
            self.ask(ApiResponseEvent(status=result.status, body=result.body))

    # ------------------------------------------------------------ prompt

    def prompt_digit(self, ev: DtmfDigit) -> None:
        node = self.s.node
        assert isinstance(node, PromptAction)
        if not node.interruptible:
            self.s.digits.append(ev.digit)  # type-ahead (DESIGN §3 non-interruptible prompt)
            return
        self.stop_play(ev.stopped_play_id)
        if node.next is not None and node.next.takes_digits:
            self.execute(node.next, [ev.digit])
        else:
            self.ask(DtmfEvent(digit=ev.digit))

    def prompt_done(self, ev: AudioComplete) -> None:
        node = self.s.node
        assert isinstance(node, PromptAction)
        self.s.active_play = None
        digits, self.s.digits = self.s.digits, []
        if node.next is not None:
            self.execute(node.next, digits)
        else:
            # Choice: the kept digits survive the provider round trip and feed the action
            # it answers with, if that takes digits ("feed the next action that takes
            # digits", DESIGN §3).
            self.s.digits = digits
            self.ask(AudioCompleteEvent(interrupted=bool(digits)))

    def play_failed(self, ev: MediaFailure) -> None:
        self.s.active_play = None
        self.ask(ErrorEvent(reason=f"playback failed: {ev.reason}"))

    # ------------------------------------------------------------ dtmf_menu

    def menu(self) -> DtmfMenuAction:
        assert isinstance(self.s.node, DtmfMenuAction)
        return self.s.node

    def menu_greet(self) -> None:
        menu = self.menu()
        greeting = menu.greeting or self.s.tts_greeting
        if greeting:
            self.play(greeting, interruptible=True)  # DESIGN §3: always interruptible
            self.s.phase = Phase.MENU_GREETING
        elif menu.greeting_text:
            # Synthesised once per menu; the repeats play the same file.
            self.synthesize(menu.greeting_text, None, "greeting")
        else:
            self.menu_arm()

    def menu_arm(self) -> None:
        self.arm_timer(self.menu().timeout_ms)
        self.s.phase = Phase.MENU_WAIT

    def menu_greeting_done(self, ev: AudioComplete) -> None:
        self.s.active_play = None
        self.menu_arm()

    def menu_digit(self, ev: DtmfDigit) -> None:
        self.stop_play(ev.stopped_play_id)
        self.cancel_timer()
        self.menu_input(ev.digit)

    def menu_timeout(self, ev: TimerFired) -> None:
        self.s.active_timer = None
        menu = self.menu()
        if menu.timeout_action is not None:
            self.menu_retry(menu.timeout_action)
        else:
            self.ask(DtmfMenuTimeoutEvent())

    def menu_input(self, digit: str) -> None:
        menu = self.menu()
        entry = menu.entries.get(digit)
        if entry is not None:
            self.notify(
                "dtmf_match",
                {
                    "digit": digit,
                    "action": action_json(entry),
                    "session_id": self.s.call.session_id,
                },
            )
            self.execute(entry, self.s.digits)
        elif menu.entries and menu.invalid_action is not None:
            self.s.digits = []
            self.menu_retry(menu.invalid_action)
        else:
            # No invalid_action, or empty entries: the provider decides (DESIGN §3).
            self.s.digits = []
            self.ask(DtmfMenuInvalidEvent(digit=digit))

    def menu_retry(self, action: ActionNode) -> None:
        """DESIGN §3: count an attempt; below max_retries a non-terminal action is played
        as a notice and the greeting repeats; at max_retries, or when terminal, the action
        is executed as the menu's outcome. Choice: invalid and timeout attempts share one
        counter; a non-terminal action that is not a `prompt` (nothing to play as a
        notice) is executed as the outcome at once."""
        menu = self.menu()
        self.s.menu_attempts += 1
        if (
            action.terminal
            or self.s.menu_attempts >= menu.max_retries
            or not isinstance(action, PromptAction)
        ):
            self.execute(action, [])
            return
        notice = self.prepare(action)
        assert isinstance(notice, PromptAction)
        self.s.notice_interruptible = notice.interruptible
        if notice.file:
            self.play(notice.file, notice.interruptible)
            self.s.phase = Phase.MENU_NOTICE
        elif notice.tts_text:
            self.synthesize(notice.tts_text, notice.tts_voice, "notice")
        else:
            self.menu_greet()

    def notice_digit(self, ev: DtmfDigit) -> None:
        if not self.s.notice_interruptible:
            self.s.digits.append(ev.digit)
            return
        self.stop_play(ev.stopped_play_id)
        self.menu_input(ev.digit)

    def notice_done(self, ev: AudioComplete | MediaFailure) -> None:
        self.s.active_play = None
        if self.s.digits:
            self.menu_input(self.s.digits.pop(0))
        else:
            self.menu_greet()

    # ------------------------------------------------------------ closing, hang-up

    def closing_done(self, ev: AudioComplete | MediaFailure) -> None:
        self.s.active_play = None
        self.hangup_now()

    def ignore(self, payload: Any) -> None:
        pass

    def wait_expired(self, inp: WaitExpiredInput) -> None:
        """The front heard no call event for longer than this session's wait allows: the
        timer, prompt end or recording end it waited for was lost on the way. Give it up
        (late events become stale) and tell the provider: an `error` event (voicemail,
        which has no provider step, fails; a closing session just hangs up)."""
        if self.s.phase in (Phase.WAIT_PROVIDER, Phase.WAIT_API, Phase.WAIT_TTS):
            return  # an answer is awaited, not a call event: nothing was lost here
        node = self.s.node
        what = f"{node.type if node is not None else 'session'} ({self.s.phase.value})"
        reason = (f"no call event for {inp.waited_ms} ms waiting in {what}: a media "
                  "command or its event was lost")
        self.errors.append(reason)
        if self.s.active_play is not None:
            self.commands.append(StopCommand())
            self.s.active_play = None
        self.cancel_timer()
        self.stop_record()
        if self.s.phase is Phase.CLOSING:
            self.hangup_now()
        elif isinstance(node, VoicemailAction):
            self.fail(f"voicemail: {reason}")
        else:
            self.ask(ErrorEvent(reason=reason))

    def wait_bound_ms(self) -> int | None:
        """How long the session may now wait for a call event, on its own terms: what is
        left of the timer it armed or the recording it runs (the sooner); None while it
        waits for an answer, is done, or plays a prompt (no bound of its own)."""
        if self.s.phase in (Phase.WAIT_PROVIDER, Phase.WAIT_API, Phase.WAIT_TTS, Phase.DONE):
            return None
        dues = []
        if self.s.active_timer is not None and self.s.timer_due is not None:
            dues.append(self.s.timer_due)
        if self.s.active_record is not None and self.s.record_due is not None:
            dues.append(self.s.record_due)
        if not dues:
            return None
        return max(0, math.ceil((min(dues) - self.now) * 1000.0))

    def call_ended(self, ev: CallEndedInput) -> None:
        # The caller is gone: no commands, just `/end` (reason "Hangup" by default). A
        # caller hanging up is how most voicemail messages end: the reason stays
        # `Voicemail(<target>)` (or the Error(...) of a failed one).
        reason = ev.reason
        if isinstance(self.s.node, VoicemailAction) and self.s.end_reason:
            reason = self.s.end_reason
        self.end(reason)

    # ------------------------------------------------------------ text to speech

    def on_tts_result(self, result: TtsResult) -> None:
        purpose, self.s.tts_for = self.s.tts_for, None
        if result.file is None:
            reason = result.error or TTS_UNAVAILABLE
            self.errors.append(f"tts: {reason}")
            # Spec §8 "TTS Audio Fallback": the provider gets error{reason} and decides.
            self.ask(ErrorEvent(reason=reason))
            return
        if purpose == "prompt":
            node = self.s.node
            assert isinstance(node, PromptAction)
            self.play(result.file, node.interruptible)
            self.s.phase = Phase.PROMPT
        elif purpose == "greeting":
            self.s.tts_greeting = result.file
            self.menu_greet()
        else:
            self.play(result.file, self.s.notice_interruptible)
            self.s.phase = Phase.MENU_NOTICE

    # ------------------------------------------------------------ torecord, voicemail

    def exec_torecord(self, action: ActionNode) -> None:
        """DESIGN §3 "torecord": prompt, optional beep, then record until `#`, hang-up or
        `max_duration_secs`. Choice: the prompt is not interruptible and digits pressed
        before the recording starts are dropped (a `#` must not end it at once)."""
        assert isinstance(action, ToRecordAction)
        if action.prompt:
            self.play(action.prompt, interruptible=False)
            self.s.phase = Phase.RECORD_PROMPT
        else:
            self.record_start()

    def exec_voicemail(self, action: ActionNode) -> None:
        """DESIGN §3 "voicemail": greeting, beep, message in the target's mailbox (the
        media worker writes the JSON record with the length), goodbye, hang-up. A
        greeting that cannot be played (no such file) leaves the beep only."""
        assert isinstance(action, VoicemailAction)
        self.s.end_reason = f"Voicemail({action.target})"
        self.play(action.greeting or VOICEMAIL_GREETING, interruptible=False)
        self.s.phase = Phase.VM_GREETING

    def record_prompt_done(self, ev: AudioComplete) -> None:
        self.s.active_play = None
        self.record_start()

    def greeting_done(self, ev: AudioComplete | MediaFailure) -> None:
        self.s.active_play = None
        self.record_start()

    def record_start(self) -> None:
        node = self.s.node
        call = self.s.call
        stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime(self.now))
        metadata: dict[str, Any] | None = None
        if isinstance(node, VoicemailAction):
            area: Literal["recordings", "voicemail"] = "voicemail"
            path = f"{safe_name(node.target)}/{stamp}_{safe_name(call.session_id)}"
            beep = True
            max_secs = VOICEMAIL_MAX_SECS
            metadata = {
                "caller": call.caller,
                "callee": call.callee,
                "target": node.target,
                "session_id": call.session_id,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.now)),
            }
        else:
            assert isinstance(node, ToRecordAction)
            area = "recordings"
            path = f"{safe_name(call.session_id)}/{stamp}"
            beep = node.beep
            secs = node.max_duration_secs
            max_secs = min(secs, MAX_RECORD_SECS) if secs and secs > 0 else DEFAULT_RECORD_SECS
        # Two recordings of one session within a second would share a name.
        if self.s.last_record_path is not None and self.s.last_record_path.startswith(path):
            path = f"{path}_{self.s.record_id + 1}"
        path += ".wav"
        self.s.last_record_path = path
        self.s.record_id += 1
        self.s.active_record = self.s.record_id
        self.s.record_due = self.now + max_secs + RECORD_END_SLACK_S
        self.s.record_failure = None
        self.commands.append(
            RecordCommand(
                record_id=self.s.record_id,
                path=path,
                area=area,
                max_duration_ms=max_secs * 1000,
                stop_digits=RECORD_STOP_DIGITS,
                beep=beep,
                metadata=metadata,
            )
        )
        self.s.phase = Phase.RECORDING

    def record_finished(self, ev: RecordingFinished) -> None:
        """The recording ended (`#`, max length, stop, or a write error after part of it
        was written): DESIGN §3, recording_complete in every case while the call is up."""
        self.s.active_record = None
        self.s.record_failure = None
        self.cancel_timer()  # the grace timer of a media failure, if any
        node = self.s.node
        if isinstance(node, VoicemailAction):
            self.close(VOICEMAIL_GOODBYE, None, f"Voicemail({node.target})")
            return
        assert isinstance(node, ToRecordAction)
        # DESIGN §2: recordings/{session_id}/{YYYYmmdd_HHMMSS}.wav, whatever the
        # configured directory is called.
        url = f"recordings/{ev.path}"
        secs = (ev.duration_ms + 500) // 1000
        self.s.variables["recording_url"] = url
        self.s.variables["recording_duration"] = str(secs)
        if node.next is not None:
            self.execute(node.next, [])
        else:
            self.ask(RecordingCompleteEvent(url=url, duration_secs=secs))

    def record_trouble(self, ev: MediaFailure) -> None:
        """A media failure while recording: a write error is followed by its
        RecordingFinished, a refused start by nothing. Wait a little to tell which."""
        self.errors.append(f"recording: {ev.reason}")
        if self.s.record_failure is None:
            self.s.record_failure = ev.reason
            self.arm_timer(RECORD_FAILURE_GRACE_MS)

    def record_failed(self, ev: TimerFired) -> None:
        """No recording came of it (refused by the media worker)."""
        self.s.active_timer = None
        self.s.active_record = None
        reason, self.s.record_failure = self.s.record_failure or "no recording", None
        if isinstance(self.s.node, VoicemailAction):
            self.fail(f"voicemail: recording failed: {reason}")
        else:
            self.ask(ErrorEvent(reason=f"recording failed: {reason}"))

    # ------------------------------------------------------------ provider answers

    def on_provider_result(self, result: ProviderResult) -> None:
        pending = self.s.pending
        assert pending is not None
        self.s.pending = None
        trace: dict[str, Any] = {
            "trigger": pending.trigger,
            "request": pending.request,
            "duration_ms": max(0.0, (self.now - pending.sent_at) * 1000.0),
            "action": result.body if isinstance(result.body, dict) else None,
            "action_type": None,
        }
        self.provider_trace = trace
        raw: object = result.body
        if result.outcome == "invalid":
            self.fail(f"invalid provider response: {result.reason}")
            return
        if result.outcome == "fallback":
            self.errors.append(f"provider failed ({result.reason}); executing retry.fallback")
            raw = self.s.call.params.retry.fallback
            trace["action"] = raw
        try:
            action = parse_action(raw)
        except ActionError as exc:
            if isinstance(raw, dict) and isinstance(raw.get("type"), str):
                trace["action_type"] = raw["type"]
            self.fail(exc.reason)
            return
        trace["action_type"] = action.type
        self.take(action)

    def take(self, action: ActionNode) -> None:
        """Execute an action the provider (or an api's dynamic tree) answered with."""
        # Spec §4 passthrough: step_id/step_name of the latest provider answer, and the
        # latest `extra` until the provider replaces it.
        self.s.step_id = action.step_id
        self.s.step_name = action.step_name
        if action.extra is not None:
            self.s.extra = action.extra
        self.execute(action, self.s.digits)

    # ------------------------------------------------------------ result

    def finish(self) -> Step:
        traces: list[StepTrace] = []
        error = "; ".join(self.errors) or None
        end_reason = self.end_reason if self.ended else None
        node = self.s.node
        if self.provider_trace is not None:
            traces.append(self.trace(error=error, end_reason=end_reason, **self.provider_trace))
        elif error is not None or self.ended:
            traces.append(
                self.trace(
                    trigger=self.trigger,
                    action_type=node.type if node is not None else None,
                    action=action_json(node) if node is not None else None,
                    request=None,
                    duration_ms=0.0,
                    error=error,
                    end_reason=end_reason,
                )
            )
        waiting = self.s.phase in (Phase.WAIT_PROVIDER, Phase.WAIT_API, Phase.WAIT_TTS)
        return Step(
            state=self.s.model_dump(mode="json"),
            commands=self.commands,
            requests=self.requests,
            traces=traces,
            waiting_for_provider=waiting,
            done=self.s.phase is Phase.DONE,
            wait_ms=self.wait_bound_ms(),
        )

    def trace(self, **fields: Any) -> StepTrace:
        self.s.step_index += 1
        # Secrets stay in the front (DESIGN §6): action and provider headers, secret
        # `sip_*` variables and URL credentials never reach a trace (pbx.redact).
        return StepTrace(
            call_id=self.s.call.call_id,
            session_id=self.s.call.session_id,
            step_index=self.s.step_index,
            step_id=self.s.step_id,
            step_name=self.s.step_name,
            extra=redact(self.s.extra),
            at=self.now,
            **redact(fields),
        )


_Handler = Any  # Callable[[_Session, payload], None]; payload type depends on the input

_EXECUTORS: dict[str, _Handler] = {
    "prompt": _Session.exec_prompt,
    "dtmf_menu": _Session.exec_menu,
    "hangup": _Session.exec_hangup,
    "play_and_hangup": _Session.exec_play_and_hangup,
    "transfer": _Session.exec_transfer,
    "input_voice": _Session.exec_input_voice,
    "collect_dtmf": _Session.exec_collect,
    "input_phone": _Session.exec_collect,
    "api": _Session.exec_api,
    "jump_ivr": _Session.exec_jump,
    "queue": _Session.exec_queue,
    "route_to_agent": _Session.exec_route_to_agent,
    "voip_bridge": _Session.exec_voip_bridge,
    "voicemail": _Session.exec_voicemail,
    "torecord": _Session.exec_torecord,
}

# The transition table: (phase, input) -> handler. Anything absent raises IvrStateError.
_TABLE: dict[tuple[Phase, InputKind], _Handler] = {
    (Phase.WAIT_PROVIDER, InputKind.PROVIDER_RESULT): _Session.on_provider_result,
    (Phase.PROMPT, InputKind.DIGIT): _Session.prompt_digit,
    (Phase.PROMPT, InputKind.AUDIO_COMPLETE): _Session.prompt_done,
    (Phase.PROMPT, InputKind.MEDIA_FAILURE): _Session.play_failed,
    (Phase.MENU_GREETING, InputKind.DIGIT): _Session.menu_digit,
    (Phase.MENU_GREETING, InputKind.AUDIO_COMPLETE): _Session.menu_greeting_done,
    (Phase.MENU_GREETING, InputKind.MEDIA_FAILURE): _Session.play_failed,
    (Phase.MENU_NOTICE, InputKind.DIGIT): _Session.notice_digit,
    (Phase.MENU_NOTICE, InputKind.AUDIO_COMPLETE): _Session.notice_done,
    (Phase.MENU_NOTICE, InputKind.MEDIA_FAILURE): _Session.notice_done,
    (Phase.MENU_WAIT, InputKind.DIGIT): _Session.menu_digit,
    (Phase.MENU_WAIT, InputKind.TIMER): _Session.menu_timeout,
    (Phase.COLLECT_PROMPT, InputKind.DIGIT): _Session.collect_digit,
    (Phase.COLLECT_PROMPT, InputKind.AUDIO_COMPLETE): _Session.collect_prompt_done,
    (Phase.COLLECT_PROMPT, InputKind.MEDIA_FAILURE): _Session.play_failed,
    (Phase.COLLECT_WAIT, InputKind.DIGIT): _Session.collect_digit,
    (Phase.COLLECT_WAIT, InputKind.TIMER): _Session.collect_timeout,
    (Phase.WAIT_API, InputKind.API_RESULT): _Session.on_api_result,
    (Phase.WAIT_TTS, InputKind.TTS_RESULT): _Session.on_tts_result,
    (Phase.RECORD_PROMPT, InputKind.DIGIT): _Session.ignore,
    (Phase.RECORD_PROMPT, InputKind.AUDIO_COMPLETE): _Session.record_prompt_done,
    (Phase.RECORD_PROMPT, InputKind.MEDIA_FAILURE): _Session.play_failed,
    (Phase.VM_GREETING, InputKind.DIGIT): _Session.ignore,
    (Phase.VM_GREETING, InputKind.AUDIO_COMPLETE): _Session.greeting_done,
    (Phase.VM_GREETING, InputKind.MEDIA_FAILURE): _Session.greeting_done,
    # The stop digit (and any other) is the media worker's business while recording.
    (Phase.RECORDING, InputKind.DIGIT): _Session.ignore,
    (Phase.RECORDING, InputKind.RECORDING_FINISHED): _Session.record_finished,
    (Phase.RECORDING, InputKind.MEDIA_FAILURE): _Session.record_trouble,
    (Phase.RECORDING, InputKind.TIMER): _Session.record_failed,
    (Phase.CLOSING, InputKind.DIGIT): _Session.ignore,
    (Phase.CLOSING, InputKind.AUDIO_COMPLETE): _Session.closing_done,
    (Phase.CLOSING, InputKind.MEDIA_FAILURE): _Session.closing_done,
    **{
        (phase, InputKind.CALL_ENDED): _Session.call_ended
        for phase in Phase
        if phase is not Phase.DONE
    },
    **{
        (phase, InputKind.WAIT_EXPIRED): _Session.wait_expired
        for phase in Phase
        if phase is not Phase.DONE
    },
}

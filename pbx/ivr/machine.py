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
    abort(state, call, reason, now)     the shell's last resort after an internal error

`handle`, `provider_result` and `api_result` also take `ivrs`, the configured
`[ivrs.<route_point>]` table a `jump_ivr` action looks its target up in (data passed
in like the clock, so the machine stays pure).

A `Step` holds the new state, call commands for the media worker / front (in order),
HTTP requests for the shell, traces, and two flags. When `waiting_for_provider` is
set the last request is a `step` request or an `api` request: the shell performs it
(`step` under the retry policy in `pbx.ivr.provider`) and feeds the `ProviderResult`
to `provider_result` (or the `ApiResult` to `api_result`), and so on until the
machine waits for a call event again; then the shell replies. The other requests
(`start`, `end`, `dtmf_match`) are fire-and-forget notifications.

Phases (`Phase`) and which inputs each accepts are one table, `_TABLE`, at the end
of this file. Media events that belong to a prompt or timer that is no longer the
current one (play_id / timer_id older than `active_play` / `active_timer`) are stale
and ignored before the table is consulted; inputs after the session is done are
ignored; any other input a phase does not list raises `IvrStateError`.

Protocol decisions followed here are DESIGN §3's; where the brief or DESIGN left
a choice open, the choice is said in a comment where it is made.
"""

from __future__ import annotations

import re
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
    RequestKind,
    SessionContext,
    SessionStartEvent,
    TransferAction,
    action_json,
    parse_action,
)
from pbx.messages import (
    AudioComplete,
    CallCommand,
    CallEndedInput,
    CallInfo,
    DtmfDigit,
    HangupCommand,
    MediaFailure,
    MediaInput,
    PlayCommand,
    SessionStartInput,
    StepTrace,
    StopCommand,
    TimerCommand,
    TimerFired,
    TransferCommand,
)

ERROR_PROMPT = "sounds/error.wav"
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
    `waiting_for_provider` is set the last one is the `step` or `api` request to answer."""

    state: dict[str, Any]
    commands: list[CallCommand] = field(default_factory=list)
    requests: list[ProviderRequest] = field(default_factory=list)
    traces: list[StepTrace] = field(default_factory=list)
    waiting_for_provider: bool = False
    done: bool = False

    @property
    def pending_request(self) -> ProviderRequest | None:
        """The `step` or `api` request whose result the session waits for, if any."""
        last = self.requests[-1] if self.waiting_for_provider and self.requests else None
        return last if last is not None and last.kind in ("step", "api") else None

    @property
    def step_request(self) -> ProviderRequest | None:
        request = self.pending_request
        return request if request is not None and request.kind == "step" else None

    @property
    def api_request(self) -> ProviderRequest | None:
        request = self.pending_request
        return request if request is not None and request.kind == "api" else None


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
    inp: SessionStartInput | MediaInput | CallEndedInput,
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


def _input_name(inp: MediaInput | CallEndedInput) -> str:
    return inp.type if isinstance(inp, CallEndedInput) else inp.event.type


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

    def feed(self, inp: MediaInput | CallEndedInput) -> Step:
        if self.s.phase is Phase.DONE:
            return self.finish()  # events after the end are ignored
        self.s.chained_steps = 0
        if isinstance(inp, CallEndedInput):
            return self.dispatch(InputKind.CALL_ENDED, inp)
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
            if self.s.active_play is None or ev.play_id not in (None, self.s.active_play):
                return self.finish()  # about nothing we still wait for
            return self.dispatch(InputKind.MEDIA_FAILURE, ev)
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
        self.commands.append(TimerCommand(timer_id=self.s.timer_id, delay_ms=max(1, delay_ms)))

    def cancel_timer(self) -> None:
        if self.s.active_timer is not None:
            self.commands.append(TimerCommand(timer_id=self.s.active_timer, delay_ms=0))
            self.s.active_timer = None

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
            # No TTS yet: DESIGN §3 "TTS" — the provider gets error{reason}.
            self.ask(ErrorEvent(reason=TTS_UNAVAILABLE))
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
        if menu.greeting:
            self.play(menu.greeting, interruptible=True)  # DESIGN §3: always interruptible
            self.s.phase = Phase.MENU_GREETING
        elif menu.greeting_text:
            self.ask(ErrorEvent(reason=TTS_UNAVAILABLE))
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
        if notice.file:
            self.play(notice.file, notice.interruptible)
            self.s.notice_interruptible = notice.interruptible
            self.s.phase = Phase.MENU_NOTICE
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

    def call_ended(self, ev: CallEndedInput) -> None:
        # The caller is gone: no commands, just `/end` (reason "Hangup" by default).
        self.end(ev.reason)

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
        waiting = self.s.phase in (Phase.WAIT_PROVIDER, Phase.WAIT_API)
        return Step(
            state=self.s.model_dump(mode="json"),
            commands=self.commands,
            requests=self.requests,
            traces=traces,
            waiting_for_provider=waiting,
            done=self.s.phase is Phase.DONE,
        )

    def trace(self, **fields: Any) -> StepTrace:
        self.s.step_index += 1
        return StepTrace(
            call_id=self.s.call.call_id,
            session_id=self.s.call.session_id,
            step_index=self.s.step_index,
            step_id=self.s.step_id,
            step_name=self.s.step_name,
            extra=self.s.extra,
            at=self.now,
            **fields,
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
    # Documented but not executed yet (a trace error "not implemented yet", error.wav,
    # hang-up): queue, voicemail, route_to_agent, voip_bridge, torecord.
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
    (Phase.CLOSING, InputKind.DIGIT): _Session.ignore,
    (Phase.CLOSING, InputKind.AUDIO_COMPLETE): _Session.closing_done,
    (Phase.CLOSING, InputKind.MEDIA_FAILURE): _Session.closing_done,
    **{
        (phase, InputKind.CALL_ENDED): _Session.call_ended
        for phase in Phase
        if phase is not Phase.DONE
    },
}

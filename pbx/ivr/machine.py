"""The step-mode IVR session state machine (sans-IO).

Theory of operation
-------------------
One IVR session is a `SessionState` (a pydantic model, JSON-able) that travels with
every `IvrEvent` and comes back in every `IvrReply`; nothing is kept between calls.
Three entry points take the dumped state, one input and the current time `now`
(wall-clock seconds; tests pass a virtual clock) and return a `Step`:

    start(call, now)                    SessionStartInput   -> Step
    handle(state, input, now)           MediaInput / CallEndedInput (and a restart)
    provider_result(state, result, now) the answer to the Step's `step` request
    abort(state, call, reason, now)     the shell's last resort after an internal error

A `Step` holds the new state, call commands for the media worker / front (in order),
HTTP requests for the shell, traces, and two flags. When `waiting_for_provider` is
set the last request is a `step` request: the shell performs it (retry policy in
`pbx.ivr.provider`) and feeds the `ProviderResult` to `provider_result`, and so on
until the machine waits for a call event again; then the shell replies. The other
requests (`start`, `end`, `dtmf_match`) are fire-and-forget notifications.

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
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pbx.ivr.models import (
    NESTED_ACTION_FIELDS,
    ActionError,
    ActionNode,
    AudioCompleteEvent,
    DtmfEvent,
    DtmfMenuAction,
    DtmfMenuInvalidEvent,
    DtmfMenuTimeoutEvent,
    ErrorEvent,
    HangupAction,
    InputVoiceAction,
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
# Provider steps allowed in a row without a call event in between: a provider that
# answers every `error` with another failing action would otherwise loop forever.
MAX_CHAINED_STEPS = 16
STATE_VERSION = 1


class IvrStateError(Exception):
    """An input the current phase cannot take (a bug in the front or the shell)."""


class Phase(StrEnum):
    WAIT_PROVIDER = "wait_provider"  # a step request is out; only its result is accepted
    PROMPT = "prompt"  # a `prompt` action is playing
    MENU_GREETING = "menu_greeting"  # a `dtmf_menu` greeting is playing (interruptible)
    MENU_NOTICE = "menu_notice"  # invalid/timeout notice playing; the greeting repeats after
    MENU_WAIT = "menu_wait"  # greeting over, the menu's timeout timer is armed
    CLOSING = "closing"  # last prompt before the hang-up (hangup, play_and_hangup, error)
    DONE = "done"


class InputKind(StrEnum):
    DIGIT = "dtmf"
    AUDIO_COMPLETE = "audio_complete"
    TIMER = "timer"
    MEDIA_FAILURE = "media_error"
    CALL_ENDED = "call_ended"
    PROVIDER_RESULT = "provider_result"


class PendingStep(BaseModel):
    """The step request in flight: what the trace of its answer needs."""

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
    `waiting_for_provider` is set the last one is the `step` request to answer."""

    state: dict[str, Any]
    commands: list[CallCommand] = field(default_factory=list)
    requests: list[ProviderRequest] = field(default_factory=list)
    traces: list[StepTrace] = field(default_factory=list)
    waiting_for_provider: bool = False
    done: bool = False

    @property
    def step_request(self) -> ProviderRequest | None:
        if self.waiting_for_provider and self.requests and self.requests[-1].kind == "step":
            return self.requests[-1]
        return None


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
    ctx = SessionContext(
        session_id=call.session_id,
        caller=call.caller,
        callee=call.callee,
        direction=call.direction,
        tenant_id=call.params.tenant_id,
        ivr_id=call.params.ivr_id,
    )
    session.notify("start", ctx.model_dump(mode="json"))
    session.ask(SessionStartEvent())
    return session.finish()


def handle(
    state: dict[str, Any], inp: SessionStartInput | MediaInput | CallEndedInput, now: float
) -> Step:
    """A call event: a media event (digit, prompt end, timer, media failure) or hang-up."""
    if isinstance(inp, SessionStartInput):
        # A new session on the same call (e.g. back from a queue): start afresh.
        return start(inp.call, now)
    session = _Session.load(state, now, trigger=_input_name(inp))
    return session.feed(inp)


def provider_result(state: dict[str, Any], result: ProviderResult, now: float) -> Step:
    """The answer (after the retry policy) to the step request the last Step asked for."""
    session = _Session.load(state, now, trigger="provider")
    return session.dispatch(InputKind.PROVIDER_RESULT, result)


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

    def __init__(self, state: SessionState, now: float, trigger: str) -> None:
        self.s = state
        self.now = now
        self.trigger = trigger
        self.commands: list[CallCommand] = []
        self.requests: list[ProviderRequest] = []
        self.errors: list[str] = []
        self.provider_trace: dict[str, Any] | None = None
        self.ended = False

    @classmethod
    def load(cls, state: dict[str, Any], now: float, trigger: str) -> _Session:
        return cls(SessionState.model_validate(state), now, trigger)

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
        self.s.timer_id += 1
        self.s.active_timer = self.s.timer_id
        self.commands.append(TimerCommand(timer_id=self.s.timer_id, delay_ms=delay_ms))

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
        end_reason = self.s.end_reason if self.ended else None
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
        waiting = self.s.phase is Phase.WAIT_PROVIDER
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
    # Documented but not executed yet (a trace error "not implemented yet", error.wav,
    # hang-up): queue, voicemail, jump_ivr, route_to_agent, voip_bridge, collect_dtmf,
    # input_phone, api, torecord.
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
    (Phase.CLOSING, InputKind.DIGIT): _Session.ignore,
    (Phase.CLOSING, InputKind.AUDIO_COMPLETE): _Session.closing_done,
    (Phase.CLOSING, InputKind.MEDIA_FAILURE): _Session.closing_done,
    **{
        (phase, InputKind.CALL_ENDED): _Session.call_ended
        for phase in Phase
        if phase is not Phase.DONE
    },
}

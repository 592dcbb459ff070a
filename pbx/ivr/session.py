"""The session core: one entry point's work on one loaded state.

`Session` holds the state (the `Envelope` every phase shares, and the current
phase's data) and collects what the entry point produces: call commands, HTTP
requests, errors for the trace. It offers the verbs every action family uses:

* outputs: `ask` (a provider step), `notify` (fire-and-forget), `play` /
  `stop_play`, `arm_timer` / `cancel_timer`, `stop_record`, `synthesize` (TTS);
* the way out: `end`, `hangup_now`, `close` (a last prompt, then hang up), `fail`
  (spec §8: error prompt, hang-up);
* `execute` / `take`: run an action through the action table the session was
  given (`pbx.ivr.handlers.EXECUTORS`: action type -> `pbx.ivr.actions.*`);
* `enter`: the one place a phase changes, checked against
  `pbx.ivr.phases.TRANSITIONS`;
* `finish`: the `Step` to hand back (state dict, commands, requests, traces).

Handlers get the current phase's data and return the next phase's (a
`pbx.ivr.phases.PhaseData`); they never set the phase themselves. Each handler
releases what its phase holds (the timer it armed, the prompt a digit stopped, the
recording running) where it leaves it, in the order the media worker is to see.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from pbx.config import IvrAppParams
from pbx.ivr.models import (
    ActionNode,
    ProviderContext,
    ProviderEvent,
    SessionContext,
    SessionStartEvent,
    action_json,
)
from pbx.ivr.phases import (
    WAITING_FOR_ANSWER,
    AwaitingRecognition,
    AwaitingSpeech,
    AwaitingStep,
    Closing,
    Digits,
    Done,
    PendingRequest,
    Phase,
    PhaseData,
    SpeechPurpose,
    Timer,
    check_transition,
)
from pbx.ivr.requests import ProviderRequest, RequestKind
from pbx.ivr.state import Envelope, SessionState, load, session_state, state_dict, state_text
from pbx.ivr.variables import initial_variables, substitute
from pbx.messages import (
    CallCommand,
    CallInfo,
    HangupCommand,
    PlayCommand,
    StepTrace,
    StopCommand,
    StopRecordCommand,
    TimerCommand,
)
from pbx.redact import redact

Ivrs = Mapping[str, IvrAppParams]
ERROR_PROMPT = "sounds/error.wav"
# Provider steps (and `api` calls) allowed in a row without a call event in between: a
# provider that answers every `error` with another failing action, or an `api` whose
# dynamic tree is another `api`, would otherwise loop forever.
MAX_CHAINED_STEPS = 16
# The session's variables, names and values: its state travels in every event and reply,
# at most pbx.messages.MAX_IVR_STATE_CHARS (256 K) with everything else in it.
MAX_VARIABLES_CHARS = 64 * 1024


def variables_chars(values: Mapping[str, str]) -> int:
    return sum(len(k) + len(v) for k, v in values.items())


@dataclass
class Step:
    """What one entry point produced. `requests` are in the order to send them; when
    `waiting_for_provider` is set the last one is the `step`, `api`, `tts` or `asr`
    request to answer.

    The state is `dumped` (its text or dict) when the Step is made from one (`abort`),
    else written from `memory` (the session's envelope and phase data as this entry
    point left them) when first asked for (`state_text`, `state`): an entry point given
    this Step instead of its state goes on from `memory` (`pbx.ivr.machine`), so the
    executor writes and reads the state once per call event, not once per provider
    answer (issue 9)."""

    commands: list[CallCommand] = field(default_factory=list)
    requests: list[ProviderRequest] = field(default_factory=list)
    traces: list[StepTrace] = field(default_factory=list)
    waiting_for_provider: bool = False
    done: bool = False
    # The longest the session may now wait for a call event (see `pbx.ivr.machine`);
    # None while it waits for the provider, when done, or while a prompt plays.
    wait_ms: int | None = None
    # Never changed once the Step is made: whoever goes on from it copies what it
    # changes (`resume`), so `state` stays this entry point's.
    memory: tuple[Envelope, PhaseData] | None = field(default=None, repr=False)
    dumped: str | dict[str, Any] | None = field(default=None, repr=False)
    # `memory` as written, and its text, once asked for (`written`, `state_text`).
    _written: SessionState | None = field(default=None, init=False, repr=False)
    _text: str | None = field(default=None, init=False, repr=False)

    def written(self) -> SessionState | None:
        """The state made from `memory` (None for a Step made from its dumped state)."""
        if self._written is None and self.memory is not None:
            self._written = session_state(*self.memory)
        return self._written

    @property
    def state_text(self) -> str:
        """The state's JSON text (`pbx.ivr.state`), as the reply carries it."""
        if self._text is None:
            written = self.written()
            if written is not None:
                self._text = state_text(written)
            elif isinstance(self.dumped, str):
                self._text = self.dumped
            else:
                assert self.dumped is not None, "a Step has its state or its memory"
                self._text = orjson.dumps(self.dumped).decode()
        return self._text

    @property
    def state(self) -> dict[str, Any]:
        """The state as a dict (`pbx.ivr.state`), to look into or feed an entry point."""
        written = self.written()
        if written is not None:
            return state_dict(written)
        assert self.dumped is not None, "a Step has its state or its memory"
        return orjson.loads(self.dumped) if isinstance(self.dumped, str) else self.dumped

    @property
    def step_index(self) -> int:
        """The state's `step_index` (what the front's own traces go on from); 0 for a
        state this Step could not read (`abort` given an unusable one)."""
        written = self.written()
        return written.step_index if written is not None else 0

    @property
    def end_reason(self) -> str | None:
        """The state's `end_reason` (None while the session runs, or unreadable)."""
        written = self.written()
        return written.end_reason if written is not None else None

    def resume(self) -> tuple[Envelope, PhaseData]:
        """The session in memory for the next entry point: the envelope copied where
        handlers change it in place (`variables`; phase data is frozen), so this
        Step's `state` is unchanged whatever the next entry point does."""
        if self.memory is None:
            assert self.dumped is not None, "a Step has its state or its memory"
            return load(self.dumped)
        envelope, data = self.memory
        return replace(envelope, variables=dict(envelope.variables)), data

    @property
    def pending_request(self) -> ProviderRequest | None:
        """The `step`, `api`, `tts` or `asr` request whose result the session waits for."""
        last = self.requests[-1] if self.waiting_for_provider and self.requests else None
        return last if last is not None and last.kind in ("step", "api", "tts", "asr") else None

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

    @property
    def asr_request(self) -> ProviderRequest | None:
        request = self.pending_request
        return request if request is not None and request.kind == "asr" else None


# An action's executor: the session, the action (variables applied and substituted),
# the type-ahead it gets (empty unless it takes digits) -> the phase it begins in.
Executor = Callable[["Session", ActionNode, Digits], PhaseData]


class Session:
    """One entry point's work on a loaded state; collects commands, requests, traces."""

    def __init__(
        self,
        envelope: Envelope,
        data: PhaseData | None,
        now: float,
        trigger: str,
        executors: Mapping[str, Executor],
        ivrs: Ivrs | None = None,
    ) -> None:
        self.env = envelope
        # The current phase's data; None until a new session's first phase.
        self.data = data
        self.now = now
        self.trigger = trigger
        self.executors = executors
        self.ivrs: Ivrs = ivrs if ivrs is not None else {}
        self.commands: list[CallCommand] = []
        self.requests: list[ProviderRequest] = []
        self.errors: list[str] = []
        self.provider_trace: dict[str, Any] | None = None
        self.ended = False
        self.end_reason: str | None = None  # for the trace; survives a jump_ivr restart
        self.oversized = False  # an action's variables were refused (`prepare`)

    @classmethod
    def new(
        cls, call: CallInfo, now: float, trigger: str, executors: Mapping[str, Executor]
    ) -> Session:
        """A session that has not started: no phase yet."""
        return cls(Envelope(call=call, variables=initial_variables(call)), None, now, trigger,
                   executors)

    @property
    def phase(self) -> Phase | None:
        return self.data.phase if self.data is not None else None

    @property
    def rustpbx(self) -> bool:
        """The route asked for rustpbx's behaviour where it and the document differ
        (`app_params.compat`, docs/compat-rustpbx.md)."""
        return self.env.call.params.compat == "rustpbx"

    def enter(self, data: PhaseData, cause: str) -> None:
        """The one place the phase changes: `data` is the next phase's, after `cause`."""
        check_transition(self.phase, data.phase, cause)
        self.data = data

    def begin(self) -> PhaseData:
        """A (new) provider session: `/start` notification, then `session_start`."""
        ctx = SessionContext(**self._session_context())
        self.notify("start", ctx.model_dump(mode="json"))
        return self.ask(SessionStartEvent())

    def _session_context(self) -> dict[str, Any]:
        """The fields of `/start` that every step request repeats (spec §3)."""
        call = self.env.call
        return {
            "session_id": call.session_id,
            "caller": call.caller,
            "callee": call.callee,
            "direction": call.direction,
            "tenant_id": call.params.tenant_id,
            "ivr_id": call.params.ivr_id,
        }

    # ------------------------------------------------------------ outputs

    def notify(self, kind: RequestKind, body: dict[str, Any]) -> None:
        params = self.env.call.params
        path = {"start": "/start", "end": "/end", "dtmf_match": "/dtmf-match"}[kind]
        self.requests.append(ProviderRequest(kind, params.url + path, body, params))

    def chain_step(self) -> bool:
        """Count a provider step (or api call) without a call event; False (and the
        session fails) past MAX_CHAINED_STEPS."""
        self.env.chained_steps += 1
        return self.env.chained_steps <= MAX_CHAINED_STEPS

    def too_many_steps(self) -> PhaseData:
        return self.fail(f"more than {MAX_CHAINED_STEPS} provider steps without a call event")

    def ask(self, event: ProviderEvent, typeahead: Digits = ()) -> PhaseData:
        """Send `event` to the provider; the session waits for its answer, keeping the
        type-ahead `typeahead` for it."""
        if not self.chain_step():
            return self.too_many_steps()
        params = self.env.call.params
        ctx = ProviderContext(
            **self._session_context(), variables=dict(self.env.variables), event=event
        )
        body = ctx.model_dump(mode="json")
        self.requests.append(ProviderRequest("step", params.url, body, params))
        pending = PendingRequest(trigger=event.type, request=body, sent_at=self.now)
        return AwaitingStep(pending=pending, typeahead=typeahead)

    def play(self, file: str, interruptible: bool) -> int:
        """Play a prompt; its play_id, whose end (or failure) the next phase awaits."""
        self.env.play_id += 1
        self.commands.append(
            PlayCommand(play_id=self.env.play_id, file=file, interruptible=interruptible)
        )
        return self.env.play_id

    def stop_play(self, active_play: int | None, stopped_play_id: int | None) -> None:
        """A digit ended the active prompt. The media worker already stopped an
        interruptible prompt it reports in `stopped_play_id`; otherwise stop it here."""
        if active_play is not None and stopped_play_id != active_play:
            self.commands.append(StopCommand())

    def arm_timer(self, delay_ms: int) -> Timer:
        """Arm the call's media-worker timer (replacing any previous one). A delay of 0
        means "cancel" to the worker, so 0 is armed as 1 ms."""
        self.env.timer_id += 1
        delay_ms = max(1, delay_ms)
        self.commands.append(TimerCommand(timer_id=self.env.timer_id, delay_ms=delay_ms))
        return Timer(timer_id=self.env.timer_id, due=self.now + delay_ms / 1000.0)

    def cancel_timer(self, active_timer: int | None) -> None:
        if active_timer is not None:
            self.commands.append(TimerCommand(timer_id=active_timer, delay_ms=0))

    def stop_record(self, active_record: int | None) -> None:
        """Stop a recording in progress (its RecordingFinished is then stale)."""
        if active_record is not None:
            self.commands.append(StopRecordCommand())

    def synthesize(self, text: str, voice: str | None, purpose: SpeechPurpose) -> AwaitingSpeech:
        """Ask the shell for text to speech; the file comes back as a TTS_RESULT input
        (`pbx.ivr.actions.prompt.speech_done`). A menu's speech gets its own data."""
        body = {"text": text, "voice": voice}
        self.requests.append(ProviderRequest("tts", "", body, self.env.call.params))
        return AwaitingSpeech(purpose=purpose)

    def recognize(self, body: dict[str, Any]) -> AwaitingRecognition:
        """Ask the shell about speech recognition (`pbx.ivr.actions.voice`): the answer
        comes back as an ASR_RESULT input."""
        self.requests.append(ProviderRequest("asr", "", body, self.env.call.params))
        return AwaitingRecognition(stage=body["stage"])

    # ------------------------------------------------------------ the way out

    def end(self, reason: str, hangup_code: int | None = None) -> Done:
        """The session is over: `/end` notification, no further events wanted."""
        self.ended = True
        self.end_reason = reason
        self.notify("end", {"reason": reason, "session_id": self.env.call.session_id})
        return Done(end_reason=reason, hangup_code=hangup_code)

    def hangup_now(self, code: int | None, reason: str) -> Done:
        self.commands.append(HangupCommand(code=code, reason=reason))
        return self.end(reason, code)

    def close(self, prompt: str | None, code: int | None, reason: str) -> PhaseData:
        """hangup / play_and_hangup / errors: play the prompt, then hang up with `code`,
        no provider call. The caller has released what its phase held."""
        if prompt:
            return Closing(play_id=self.play(prompt, interruptible=False), end_reason=reason,
                           hangup_code=code)
        return self.hangup_now(code, reason)

    def fail(self, reason: str) -> PhaseData:
        """Spec §8: record the error, play sounds/error.wav, hang up."""
        self.errors.append(reason)
        return self.close(ERROR_PROMPT, None, f"Error({reason})")

    # ------------------------------------------------------------ executing actions

    def prepare(self, action: ActionNode) -> ActionNode:
        """Apply the action's `variables`, then substitute `$name$` in its fields.
        Variables that would take the session's past MAX_VARIABLES_CHARS are not taken
        (the state travels in every event): `execute` then fails the session."""
        if isinstance(action.variables, dict) and not self.take_variables(action.variables):
            self.oversized = True
        return substitute(action, self.env.variables)

    def take_variables(self, values: Mapping[str, str]) -> bool:
        """Add `values` to the session's variables, unless that takes them past
        MAX_VARIABLES_CHARS (then nothing is added: False)."""
        if not values:
            return True
        merged = {**self.env.variables, **values}
        if variables_chars(merged) > MAX_VARIABLES_CHARS:
            return False
        self.env.variables = merged
        return True

    def fail_oversized(self) -> PhaseData:
        return self.fail(f"variables over {MAX_VARIABLES_CHARS} characters")

    def execute(self, action: ActionNode, typeahead: Sequence[str]) -> PhaseData:
        """Run an action; `typeahead` goes to it if it takes digits, else is dropped.
        No timer is armed here: whoever leaves a timed phase cancels its timer first."""
        action = self.prepare(action)
        if self.oversized:
            self.oversized = False
            return self.fail_oversized()
        self.env.node = action
        digits = tuple(typeahead) if action.takes_digits else ()
        return self.executors[action.type](self, action, digits)

    def take(self, action: ActionNode, typeahead: Digits) -> PhaseData:
        """Execute an action the provider (or an api's dynamic tree) answered with."""
        # Spec §4 passthrough: step_id/step_name of the latest provider answer, and the
        # latest `extra` until the provider replaces it.
        self.env.step_id = action.step_id
        self.env.step_name = action.step_name
        # An answer without `extra` keeps the latest; an explicit `"extra": null`
        # clears it.
        if "extra" in action.model_fields_set:
            self.env.extra = action.extra
        return self.execute(action, typeahead)

    # ------------------------------------------------------------ result

    def wait_bound_ms(self) -> int | None:
        """How long the session may now wait for a call event, on its own terms: what is
        left of the timer it armed or the recording it runs (the sooner); None while it
        waits for an answer, is done, or plays a prompt (no bound of its own)."""
        dues = self.data.deadlines() if self.data is not None else []
        if not dues:
            return None
        return max(0, math.ceil((min(dues) - self.now) * 1000.0))

    def finish(self) -> Step:
        assert self.data is not None, "a session ends every entry point in a phase"
        traces: list[StepTrace] = []
        error = "; ".join(self.errors) or None
        end_reason = self.end_reason if self.ended else None
        node = self.env.node
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
        return Step(
            memory=(self.env, self.data),
            commands=self.commands,
            requests=self.requests,
            traces=traces,
            waiting_for_provider=self.data.phase in WAITING_FOR_ANSWER,
            done=self.data.phase is Phase.DONE,
            wait_ms=self.wait_bound_ms(),
        )

    def trace(self, **fields: Any) -> StepTrace:
        self.env.step_index += 1
        # Secrets stay in the front (DESIGN §6): action and provider headers, secret
        # `sip_*` variables and URL credentials never reach a trace (pbx.redact).
        return StepTrace(
            call_id=self.env.call.call_id,
            session_id=self.env.call.session_id,
            step_index=self.env.step_index,
            step_id=self.env.step_id,
            step_name=self.env.step_name,
            extra=redact(self.env.extra),
            at=self.now,
            **redact(fields),
        )

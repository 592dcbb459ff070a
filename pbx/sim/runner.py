"""One simulated call: the front and the media worker, played on a virtual clock.

The IVR side is the real one: every call event goes through the executor's own
`workers.ivr.handle_event` (the machine in `pbx.ivr`, the provider HTTP calls of
`pbx.ivr.provider.ProviderClient` with its retry policy, `/start` before the first
step), so the provider meets exactly what a real call would send it. What is
simulated is everything around it, with no SIP and no RTP:

* prompts end after their real length (the WAV in the sounds directory) or
  `prompt_ms`; synthesised speech is not synthesised (its text is reported) and
  lasts `prompt_ms`;
* timers (menu and collect timeouts) fire on the virtual clock, at once in real time;
* key presses arrive at the times the script says; one that hits an interruptible
  prompt stops it, as the media worker does;
* recordings last until a stop key or their length limit; transfers, queues, agents,
  bridges and hang-ups end the call and are reported as what they would do;
* a wait nothing would ever end gets the front's `wait_expired`, as a real call would.

Provider latency is measured in real time and reported; it does not move the
virtual clock, so a run prints the same timeline every time.
"""

from __future__ import annotations

import heapq
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import orjson

from media.prompts import PromptError, resolve
from media.wav import WavError, parse_wav
from pbx import schema
from pbx.config import IvrAppParams
from pbx.ivr.provider import ProviderClient
from pbx.ivr.requests import ApiResult, ProviderRequest, ProviderResult, TtsResult
from pbx.messages import (
    AgentCommand,
    AudioComplete,
    CallEndedInput,
    CallInfo,
    DtmfDigit,
    HangupCommand,
    IvrEvent,
    MediaInput,
    PlayCommand,
    QueueCommand,
    RecordCommand,
    RecordingFinished,
    SessionStartInput,
    StopCommand,
    StopRecordCommand,
    TimerCommand,
    TimerFired,
    TransferCommand,
    WaitExpiredInput,
    WsBridgeCommand,
)
from pbx.settings.speech import TtsSettings
from pbx.sim.scenario import Call, Hangup, Options, Press, Wait
from pbx.tts import TtsEngine, cache_name
from workers.ivr import handle_event

Out = Callable[[str], None]
# The front's watchdog (`[sessions]` defaults): a wait with nothing to end it.
WAIT_GRACE_MS = 5000
MAX_WAIT_MS = 600_000
MAX_EVENTS = 10_000  # per call: a provider that loops on timeouts still ends
SHOW_CHARS = 400  # of a JSON body, unless verbose


def _short(value: object, verbose: bool) -> str:
    text = orjson.dumps(value).decode()
    return text if verbose or len(text) <= SHOW_CHARS else text[: SHOW_CHARS - 3] + "..."


@dataclass
class Outcome:
    """What one call did: what the expectations are checked against, and what went wrong."""

    name: str
    events: list[dict[str, Any]] = field(default_factory=list)
    actions: list[dict[str, Any]] = field(default_factory=list)
    played: list[str] = field(default_factory=list)
    said: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # recorded by the PBX (error.wav played)
    end_reasons: list[str] = field(default_factory=list)
    variables: dict[str, str] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)  # provider answers outside the schema
    provider_failures: list[str] = field(default_factory=list)  # HTTP errors, not JSON
    slow: list[str] = field(default_factory=list)
    internal: list[str] = field(default_factory=list)  # the PBX's own bugs
    failed_expectations: list[str] = field(default_factory=list)
    unexpected_errors: list[str] = field(default_factory=list)

    def problems(self, options: Options) -> list[str]:
        """Protocol problems that fail the run even without a failed expectation."""
        return [
            *self.violations,
            *self.provider_failures,
            *self.unexpected_errors,
            *(self.slow if options.fail_on_slow else []),
        ]


class SimClient(ProviderClient):
    """The executor's provider client, reporting each exchange to the call."""

    def __init__(self, call: SimCall) -> None:
        super().__init__()
        self.call = call

    async def step(self, params: IvrAppParams, body: dict[str, Any]) -> ProviderResult:
        self.call.on_request(params, body)
        started = time.monotonic()
        result = await super().step(params, body)
        self.call.on_result(params, result, (time.monotonic() - started) * 1000.0)
        return result

    def send(self, request: ProviderRequest) -> Any:
        self.call.on_notify(request)
        return super().send(request)

    async def perform_api(self, request: ProviderRequest) -> ApiResult:
        # What goes out, as sent: the variables named by the action's `variables`, as the
        # query string (aiohttp's `params`: added to any query the URL has) or JSON body.
        if request.query:
            joiner = "&" if "?" in request.url else "?"
            sent = f"{request.url}{joiner}{urlencode(request.query)}"
        elif request.query is not None:
            sent = request.url
        else:
            sent = f"{request.url} body {_short(request.body, self.call.verbose)}"
        self.call.say(f"  → api {request.method} {sent}")
        result = await super().perform_api(request)
        self.call.say(f"  ← api {result.status}: {_short(result.body, self.call.verbose)}")
        return result


class SimTts(TtsEngine):
    """Text to speech that synthesises nothing: the text is reported, the prompt is a
    name in the cache that lasts `prompt_ms`."""

    def __init__(self, call: SimCall) -> None:
        sounds = call.options.sounds_dir
        super().__init__(TtsSettings(cache_dir=f"{sounds}/.tts"), sounds, espeak=None)
        self.call = call
        self.texts: dict[str, str] = {}

    async def perform(self, request: ProviderRequest) -> TtsResult:
        text = str(request.body.get("text") or "")
        voice = request.body.get("voice")
        name = f".tts/{cache_name(text, voice if isinstance(voice, str) else 'default')}"
        self.texts[name] = text
        return TtsResult(file=name, source="simulated")


class _Relay(logging.Handler):
    """The provider client's retry log lines and the executor's internal errors, shown."""

    def __init__(self, call: SimCall) -> None:
        super().__init__(logging.DEBUG)
        self.call = call

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name == "pbx.ivr.executor" and record.levelno >= logging.ERROR:
            self.call.outcome.internal.append(message)
            self.call.say(f"  ✗ PBX internal error: {message}")
        elif message.startswith("provider "):
            self.call.say(f"  ! {message.split(': ', 1)[-1]}")


class SimCall:
    """One call through the IVR, driven by a script of caller steps."""

    def __init__(
        self,
        call: Call,
        params: IvrAppParams,
        options: Options,
        out: Out,
        *,
        ivrs: dict[str, IvrAppParams] | None = None,
        verbose: bool = False,
    ) -> None:
        self.script = call
        self.params = params
        self.options = options
        self.out = out
        self.ivrs = ivrs or {}
        self.verbose = verbose
        self.outcome = Outcome(name=call.name)
        self.session_id = f"sim-{uuid.uuid4().hex[:12]}"
        self.info = CallInfo(
            call_id=f"{self.session_id}@pbx-sim",
            session_id=self.session_id,
            caller=call.caller or "1001",
            callee=call.callee or "2000",
            direction=call.direction or "inbound",
            route_name="pbx-sim",
            params=params,
            sip_headers=dict(call.sip_headers or {}),
            variables=dict(call.variables or {}),
        )
        self.epoch = time.time()  # virtual time 0: file names and traces look real
        self.t = 0.0
        self.state: str | None = None  # the session's state text, as the front keeps it
        self.seq = 0
        self.done = False
        self.over = False  # the call left the IVR (done) or the caller hung up
        self.tts: SimTts | None = None
        # Pending media events: (due, order, input)
        self._queue: list[tuple[float, int, MediaInput | WaitExpiredInput]] = []
        self._order = 0
        self._playing: tuple[int, bool] | None = None  # (play_id, interruptible)
        self._timer: int | None = None
        self._key_restarts_timer = False
        self._recording: tuple[int, str, float] | None = None  # (record_id, path, start)
        self._stop_digits = "#"
        self._node: dict[str, Any] | None = None
        self._last_variables: dict[str, str] = {}

    # ------------------------------------------------------------ output

    def say(self, line: str) -> None:
        self.out(line)

    def _stamp(self, text: str) -> None:
        self.out(f"[{self.t:8.3f}s] {text}")

    # ------------------------------------------------------------ provider hooks

    def on_request(self, params: IvrAppParams, body: dict[str, Any]) -> None:
        event = body.get("event")
        if isinstance(event, dict):
            self.outcome.events.append(event)
        problems = schema.violations("provider-context", body)
        if problems:  # what the PBX sends is the PBX's business
            self.outcome.internal.extend(f"request: {p}" for p in problems)
        shown = body if self.verbose else {"event": event}
        self.say(f"  → POST {params.url} {_short(shown, self.verbose)}")

    def on_result(self, params: IvrAppParams, result: ProviderResult, elapsed_ms: float) -> None:
        status = f"{result.status}" if result.status is not None else "no answer"
        tries = f" after {result.attempts} attempts" if result.attempts > 1 else ""
        if result.outcome == "ok":
            self.say(f"  ← {status} in {elapsed_ms:.0f} ms{tries}: "
                     f"{_short(result.body, self.verbose)}")
            if isinstance(result.body, dict):
                self.outcome.actions.append(result.body)
            for problem in schema.violations("action-node", result.body):
                line = f"schema violation: {problem}"
                self.outcome.violations.append(line)
                self.say(f"  ✗ {line}")
        else:
            what = "not JSON" if result.outcome == "invalid" else "failed"
            line = f"provider {what}: {result.reason}"
            if result.outcome == "invalid":
                line += f" (body: {result.body!r})"
            self.outcome.provider_failures.append(line)
            self.say(f"  ✗ {line}" + ("; the route's retry.fallback runs"
                                      if result.outcome == "fallback" else ""))
        if elapsed_ms > self.options.slow_ms and result.outcome == "ok":
            line = (f"slow answer: {elapsed_ms:.0f} ms (flagged above {self.options.slow_ms} ms;"
                    f" the PBX gives up at retry.timeout_ms = {params.retry.timeout_ms} ms)")
            self.outcome.slow.append(line)
            self.say(f"  ! {line}")

    def on_notify(self, request: ProviderRequest) -> None:
        body = request.body
        if request.kind == "end":
            self.outcome.end_reasons.append(str(body.get("reason")))
            self.say(f"  → POST {request.url} (end: {body.get('reason')})")
        elif request.kind == "dtmf_match":
            action = body.get("action")
            if isinstance(action, dict):
                self.outcome.actions.append(action)
            self.say(f"  → POST {request.url} (menu entry {body.get('digit')!r}: "
                     f"{_short(action, self.verbose)})")
        else:
            self.say(f"  → POST {request.url}")

    # ------------------------------------------------------------ the IVR side

    def clock(self) -> float:
        return self.epoch + self.t

    async def _deliver(
        self, inp: SessionStartInput | MediaInput | CallEndedInput | WaitExpiredInput,
        client: SimClient,
    ) -> None:
        self.seq += 1
        event = IvrEvent(session_id=self.session_id, seq=self.seq, state=self.state, input=inp)
        reply = await handle_event(event, client, self.clock, self.ivrs, self.tts)
        # The state travels as JSON text, as it does between the front and the executors.
        self.state = reply.state
        self._note_state()
        for trace in reply.traces:
            if trace.error:
                self.outcome.errors.append(trace.error)
                self.say(f"  ✗ error: {trace.error}")
        for command in reply.commands:
            self._apply(command)
        self.done = reply.done
        if reply.done:
            self.over = True
        elif not self._queue and not self._playing:
            # Nothing will end this wait: the front's watchdog would.
            wait_ms = reply.wait_ms if reply.wait_ms is not None else MAX_WAIT_MS
            self._push(self.t + (wait_ms + WAIT_GRACE_MS) / 1000.0,
                       WaitExpiredInput(waited_ms=wait_ms + WAIT_GRACE_MS))

    def _note_state(self) -> None:
        assert self.state is not None
        state = orjson.loads(self.state)  # the simulator shows what the state holds
        node = state.get("node")
        if isinstance(node, dict) and node != self._node:
            self._node = node
            if not self.outcome.actions or self.outcome.actions[-1] != node:
                self.outcome.actions.append(node)
        variables = dict(state.get("variables") or {})
        changed = {k: v for k, v in variables.items() if self._last_variables.get(k) != v}
        if self._last_variables and changed:
            shown = ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items()))
            self.say(f"  = variables: {shown}")
        self._last_variables = variables
        self.outcome.variables = variables

    def _push(self, due: float, inp: MediaInput | WaitExpiredInput) -> None:
        self._order += 1
        heapq.heappush(self._queue, (due, self._order, inp))

    def _cancel(self, match: Callable[[MediaInput | WaitExpiredInput], bool]) -> None:
        self._queue = [item for item in self._queue if not match(item[2])]
        heapq.heapify(self._queue)

    def _prompt_seconds(self, file: str) -> float:
        default = self.options.prompt_ms / 1000.0
        if self.tts is not None and file in self.tts.texts:
            return default
        try:
            audio = parse_wav(resolve(self.options.sounds_dir, file).read_bytes())
        except (PromptError, OSError, WavError) as exc:
            self.say(f"  ! {file}: {exc.__class__.__name__}: not in {self.options.sounds_dir}/"
                     f" (a real call would report a playback error); lasts {default:g} s here")
            return default
        return audio.frames / audio.rate if audio.rate else default

    def _apply(self, command: Any) -> None:
        if isinstance(command, PlayCommand):
            seconds = self._prompt_seconds(command.file)
            text = self.tts.texts.get(command.file) if self.tts is not None else None
            if text is not None:
                self.outcome.said.append(text)
                what = f"says {text!r} (text to speech)"
            else:
                self.outcome.played.append(command.file)
                what = f"plays {command.file}"
            self.say(f"  ♪ {what}, {seconds:.1f} s"
                     f"{', interruptible' if command.interruptible else ''}")
            self._stop_prompt()
            self._playing = (command.play_id, command.interruptible)
            self._push(self.t + seconds, MediaInput(event=AudioComplete(play_id=command.play_id)))
        elif isinstance(command, StopCommand):
            if self._playing is not None:
                self.say("  ■ prompt stopped")
            self._stop_prompt()
        elif isinstance(command, TimerCommand):
            self._cancel(lambda i: isinstance(i, MediaInput) and isinstance(i.event, TimerFired))
            self._timer = None
            if command.delay_ms > 0:
                self._timer = command.timer_id
                collecting = (self._node or {}).get("type") in ("collect_dtmf", "input_phone")
                if not (collecting and self._key_restarts_timer):  # each key restarts it
                    self.say(f"  ⏱ waits up to {command.delay_ms / 1000.0:g} s")
                self._push(self.t + command.delay_ms / 1000.0,
                           MediaInput(event=TimerFired(timer_id=command.timer_id)))
        elif isinstance(command, RecordCommand):
            limit_s = command.max_duration_ms / 1000.0
            self.say(f"  ● records the caller to {command.area}/{command.path} (up to "
                     f"{limit_s:g} s, a {' or '.join(command.stop_digits) or 'no'} key stops it"
                     f"{', after a beep' if command.beep else ''})")
            self._recording = (command.record_id, command.path, self.t)
            self._stop_digits = command.stop_digits
            self._push(self.t + limit_s, MediaInput(event=RecordingFinished(
                record_id=command.record_id, path=command.path,
                duration_ms=command.max_duration_ms, reason="max_duration")))
        elif isinstance(command, StopRecordCommand):
            self._stop_recording()
        elif isinstance(command, HangupCommand):
            code = f" with {command.code}" if command.code is not None else ""
            self.say(f"  ☎ the PBX hangs up{code} ({command.reason})")
            self._end_media()
        elif isinstance(command, TransferCommand):
            self.say(f"  ➜ transfers the call to {command.target} (the call leaves the IVR)")
            self._end_media()
        elif isinstance(command, QueueCommand):
            back = ("; back to this IVR if no agent answers" if command.return_to_ivr else "")
            self.say(f"  ➜ puts the caller in queue {command.target}{back}")
            self._end_media()
        elif isinstance(command, AgentCommand):
            group = f" (skill group {command.skill_group_id})" if command.skill_group_id else ""
            self.say(f"  ➜ routes the call to agent {command.target}{group}")
            self._end_media()
        elif isinstance(command, WsBridgeCommand):
            self.say(f"  ➜ bridges the call's audio to {command.uri}")
            self._end_media()
        else:
            self.say(f"  ? {getattr(command, 'type', command)!r}: not simulated")

    def _stop_prompt(self) -> None:
        if self._playing is not None:
            play_id = self._playing[0]
            self._cancel(lambda i: isinstance(i, MediaInput) and isinstance(i.event, AudioComplete)
                         and i.event.play_id == play_id)
            self._playing = None

    def _stop_recording(self) -> None:
        self._cancel(lambda i: isinstance(i, MediaInput)
                     and isinstance(i.event, RecordingFinished))
        self._recording = None

    def _end_media(self) -> None:
        self._queue = []
        self._playing = None
        self._timer = None
        self._recording = None

    # ------------------------------------------------------------ the caller side

    async def _next_media(self, client: SimClient) -> None:
        due, _, inp = heapq.heappop(self._queue)
        self.t = max(self.t, due)
        if isinstance(inp, MediaInput):
            ev = inp.event
            if isinstance(ev, AudioComplete):
                self._playing = None
                self._stamp("prompt ended")
            elif isinstance(ev, TimerFired):
                self._timer = None
                self._stamp("no key pressed: timeout")
            elif isinstance(ev, RecordingFinished):
                self._recording = None
                self._stamp(f"recording ended ({ev.reason}, {ev.duration_ms / 1000.0:g} s)")
        else:
            self._stamp(f"nothing happened for {inp.waited_ms} ms: the front gives up the wait")
        await self._deliver(inp, client)

    async def _until(self, t_end: float, client: SimClient) -> None:
        """Deliver every media event due by `t_end` (they go before a caller step due at
        the same time), then stand at `t_end`."""
        while self._queue and self._queue[0][0] <= t_end and not self.over:
            await self._checked_next(client)
        if not self.over:
            self.t = max(self.t, t_end)

    async def _checked_next(self, client: SimClient) -> None:
        if self.seq >= MAX_EVENTS:
            raise _TooLong(f"more than {MAX_EVENTS} call events")
        await self._next_media(client)

    def _idle(self) -> bool:
        return self.over or (self._playing is None and not self._queue_has_audio())

    def _queue_has_audio(self) -> bool:
        return any(isinstance(i, MediaInput) and isinstance(i.event, AudioComplete)
                   for _, _, i in self._queue)

    async def _press(self, key: str, client: SimClient) -> None:
        stopped = None
        if self._playing is not None and self._playing[1]:
            stopped = self._playing[0]
        note = " (stops the prompt)" if stopped is not None else ""
        self._stamp(f"caller presses {key}{note}")
        if stopped is not None:
            self._stop_prompt()
        if self._recording is not None and key in self._stop_digits:
            record_id, path, started = self._recording
            self._stop_recording()
            duration_ms = int(round((self.t - started) * 1000))
            self._push(self.t + 0.02, MediaInput(event=RecordingFinished(
                record_id=record_id, path=path, duration_ms=duration_ms, reason="dtmf")))
        self._key_restarts_timer = self._timer is not None
        try:
            await self._deliver(MediaInput(event=DtmfDigit(digit=key, stopped_play_id=stopped)),
                                client)
        finally:
            self._key_restarts_timer = False

    async def run(self) -> Outcome:
        """Run the call: start, the script, then until the IVR is done (or `max_call_s`)."""
        provider_log = logging.getLogger("pbx.ivr.provider")
        executor_log = logging.getLogger("pbx.ivr.executor")
        relay = _Relay(self)
        saved = provider_log.level, executor_log.propagate
        provider_log.addHandler(relay)
        executor_log.addHandler(relay)
        provider_log.setLevel(logging.DEBUG)
        executor_log.propagate = False
        self.say(f"=== {self.script.name}: {self.info.caller} calls {self.info.callee} "
                 f"(session {self.session_id}, provider {self.params.url})")
        unknown = [k for k in (self.script.app_params or {}) if k not in IvrAppParams.model_fields]
        for key in unknown:
            self.say(f"  ! app_params key {key!r} is not known to this PBX: ignored")
        try:
            client = SimClient(self)
            try:
                self.tts = SimTts(self) if self.options.tts else None
                self._stamp("call enters the IVR")
                await self._deliver(SessionStartInput(call=self.info), client)
                await self._script(client)
            except _TooLong as exc:
                self.outcome.internal.append(str(exc))
                self.say(f"  ✗ {exc}")
            finally:
                await client.close()  # waits (bounded) for /end and the other notifications
        finally:
            provider_log.removeHandler(relay)
            executor_log.removeHandler(relay)
            provider_log.setLevel(saved[0])
            executor_log.propagate = saved[1]
        return self.outcome

    async def _script(self, client: SimClient) -> None:
        gap = self.options.digit_gap_ms / 1000.0
        for step in self.script.steps:
            if self.over:
                self.say(f"  (the call is over: the script's {type(step).__name__.lower()} "
                         "and what follows are not run)")
                return
            if isinstance(step, Wait):
                if step.wait == "idle":
                    while not self._idle() and self._queue:
                        await self._checked_next(client)
                else:
                    await self._until(self.t + step.wait, client)
            elif isinstance(step, Press):
                for i, key in enumerate(step.press):
                    if i:
                        await self._until(self.t + gap, client)
                    if self.over:
                        break
                    await self._press(key, client)
            elif isinstance(step, Hangup):
                reason = step.hangup if isinstance(step.hangup, str) else "Hangup"
                self._stamp("caller hangs up")
                self._end_media()
                await self._deliver(CallEndedInput(reason=reason), client)
                self.over = True
        limit = self.options.max_call_s
        while not self.over and self._queue:
            if self._queue[0][0] > limit:
                self.t = limit
                self._stamp(f"still in the IVR after {limit:g} s: the caller hangs up")
                self._end_media()
                await self._deliver(CallEndedInput(reason="Hangup"), client)
                self.over = True
                break
            await self._checked_next(client)
        if not self.over:
            self._stamp("the call waits for nothing more")


class _TooLong(Exception):
    pass

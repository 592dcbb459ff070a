"""IVR executor process (`pbx-ivr`): a thin asyncio shell around `pbx.ivr.machine`.

A zmq DEALER (identity `ivr-<hostname>-<pid>`) connects to the front's IVR ROUTER
(`[zmq] ivr_endpoint`), announces itself with `IvrReady` and sends `IvrHeartbeat`
every `[ivr] heartbeat_ms` with the number of sessions it is working on. Each
`IvrEvent` is handled in its own task: the machine runs, its provider requests are
performed (step requests awaited under the retry policy, notifications in the
background), and one `IvrReply` with the same `seq` goes back. Messages are sent as
a single frame; on receipt the last frame is the message (an optional empty
delimiter frame is tolerated).

The DEALER is `pbx.dealer.FrontDealer`, a plain socket driven from the event loop
(zmq.asyncio's Future per send and per receive was a tenth of the executor's CPU,
issue 9): a send never waits, a reply the socket refuses (the front gone or stalled)
waits in its outbox, in order, up to `send_wait_s`; heartbeats are not queued.

`api` actions' HTTP calls are performed here too (same aiohttp session), text to
speech (`tts` requests: `tts_text`, `greeting_text`) is synthesised into the prompt
cache by `pbx.tts.TtsEngine` before the reply goes out, and the
`[ivrs.<route_point>]` table loaded at start is handed to the machine for `jump_ivr`.
Speech recognition (`asr` requests, `input_voice`) is `pbx.asr.AsrEngine`'s: an HTTP
service or local pocketsphinx in child processes, never on this loop's thread; the
engine's spool sweep runs here every `pbx.asr.SWEEP_INTERVAL_S`.

The executor keeps no session state: the state comes with the event and leaves with
the reply. A bad frame is logged and dropped; an exception while handling one
session is logged and answered with the error prompt and a hang-up, and the process
carries on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import uvloop
import zmq

from pbx.asr import ASR_UNAVAILABLE, SWEEP_INTERVAL_S, AsrEngine
from pbx.config import ConfigError, IvrAppParams, Settings, load_config
from pbx.dealer import SEND_WAIT_S, FrontDealer
from pbx.ivr import machine
from pbx.ivr.provider import ProviderClient
from pbx.ivr.requests import AsrResult, TtsResult
from pbx.messages import (
    MAX_IVR_STATE_CHARS,
    CallCommand,
    HangupCommand,
    IvrEvent,
    IvrHeartbeat,
    IvrReady,
    IvrReply,
    MessageError,
    SessionStartInput,
    StepTrace,
    decode,
)
from pbx.planes import plane_context
from pbx.reload import plan_reload
from pbx.startup import start_program
from pbx.tts import TTS_UNAVAILABLE, TtsEngine

log = logging.getLogger("pbx.ivr.executor")

Clock = Callable[[], float]
# Beyond /start's own timeout (`ProviderClient.notify_timeout_ms`), how long the first
# step may still wait for it: the task ends by then; this only bounds a stuck one.
START_WAIT_SLACK_S = 0.1
Ivrs = Mapping[str, IvrAppParams]


@dataclass
class _Progress:
    """What one event's handling produced so far (kept for the error path)."""

    initial_state: str | None  # the event's state text
    commands: list[CallCommand] = field(default_factory=list)
    traces: list[StepTrace] = field(default_factory=list)
    done: bool = False
    # The session's /start while it is on its way: the first step waits for it.
    start: asyncio.Task[None] | None = None
    # The event's Steps so far: a Step's state is written only when asked for (the
    # reply, the error path), never between one event's provider answers
    # (`machine.Step`).
    steps: list[machine.Step] = field(default_factory=list)

    def last_written(self) -> machine.Step | None:
        """For the error path: the last Step whose state can be written (`add` wrote
        the final one's; an intermediate one's is written here, and should that fail,
        the one before it's), None when none can."""
        for step in reversed(self.steps):
            try:
                _ = step.state_text
            except Exception:
                continue
            return step
        return None

    @property
    def state(self) -> str | None:
        """For the error path: the state text of the last Step, else the event's own."""
        step = self.last_written()
        return step.state_text if step is not None else self.initial_state

    def add(self, step: machine.Step, client: ProviderClient) -> None:
        if step.pending_request is None:
            # The Step the reply carries: its state written before the Step counts, so
            # a state that cannot be written leaves the Step out (its commands, its
            # notifications), as when every Step wrote its state at once.
            _ = step.state_text
        self.steps.append(step)
        self.commands.extend(step.commands)
        self.traces.extend(step.traces)
        self.done = step.done
        for request in step.requests:
            if request.kind not in ("step", "api", "tts"):
                task = client.send(request)  # fire-and-forget notifications
                if request.kind == "start":
                    self.start = task

    async def started(self, timeout_s: float) -> None:
        """/start before the session's first step (docs/protocol.md "POST U/start"): a
        provider that resets a session on /start (the document's skeleton) must never
        handle that step before it. So the step waits for /start's answer, or its failure: at most /start's own
        timeout (`timeout_s`), after which it gave up. A provider answering /start at
        once costs the step one round trip (a millisecond on a LAN); one that works long
        in /start delays its first step by that long, up to the timeout. Waiting only
        for /start's request to be sent is not enough: a provider that runs requests
        concurrently (threads, tasks) may handle the step while /start still runs."""
        if self.start is not None:
            await asyncio.wait({self.start}, timeout=timeout_s + START_WAIT_SLACK_S)
            self.start = None


async def process_event(
    event: IvrEvent,
    client: ProviderClient,
    clock: Clock,
    progress: _Progress | None = None,
    ivrs: Ivrs | None = None,
    tts: TtsEngine | None = None,
    asr: AsrEngine | None = None,
) -> IvrReply:
    """Run the machine for one event until it waits for the next call event. Without
    `tts` (`asr`), text to speech (speech recognition) is unavailable: the provider
    gets an `error` event."""
    progress = progress if progress is not None else _Progress(initial_state=event.state)
    inp = event.input
    if isinstance(inp, SessionStartInput):
        step = machine.start(inp.call, clock())
    elif event.state is None:
        raise ValueError(f"{inp.type} event without a session state")
    else:
        step = machine.handle(event.state, inp, clock(), ivrs=ivrs)
    progress.add(step, client)
    while (request := step.pending_request) is not None:
        if request.kind == "api":
            api = await client.perform_api(request)
            step = machine.api_result(step, api, clock(), ivrs=ivrs)
        elif request.kind == "tts":
            spoken = (
                await tts.perform(request) if tts is not None else TtsResult(error=TTS_UNAVAILABLE)
            )
            if spoken.error is not None:
                log.info("session %s: tts: %s", event.session_id, spoken.error)
            step = machine.tts_result(step, spoken, clock(), ivrs=ivrs)
        elif request.kind == "asr":
            heard = (
                await asr.perform(request) if asr is not None else AsrResult(error=ASR_UNAVAILABLE)
            )
            if heard.error is not None and request.body.get("stage") != "check":
                log.info("session %s: asr: %s", event.session_id, heard.error)
            step = machine.asr_result(step, heard, clock(), ivrs=ivrs)
        else:
            await progress.started(client.notify_timeout_ms / 1000.0)
            result = await client.step(request.params, request.body)
            step = machine.provider_result(step, result, clock(), ivrs=ivrs)
        progress.add(step, client)
    return _reply(event, progress, step, step.done, step.wait_ms)


def _reply(
    event: IvrEvent, progress: _Progress, step: machine.Step, done: bool, wait_ms: int | None
) -> IvrReply:
    """The reply carrying `step`'s state, with what the front reads of it. Raises
    (ValidationError) for a state over MAX_IVR_STATE_CHARS, which the front would
    refuse."""
    return IvrReply(
        session_id=event.session_id,
        seq=event.seq,
        state=step.state_text,
        step_index=step.step_index,
        end_reason=step.end_reason,
        commands=progress.commands,
        traces=progress.traces,
        done=done,
        wait_ms=wait_ms,
    )


async def handle_event(
    event: IvrEvent,
    client: ProviderClient,
    clock: Clock,
    ivrs: Ivrs | None = None,
    tts: TtsEngine | None = None,
    asr: AsrEngine | None = None,
) -> IvrReply:
    """`process_event`, but an internal error becomes error prompt + hang-up."""
    progress = _Progress(initial_state=event.state)
    try:
        return await process_event(event, client, clock, progress, ivrs, tts, asr)
    except Exception as exc:
        log.exception("session %s seq %d: internal error", event.session_id, event.seq)
        reason = f"internal error: {exc.__class__.__name__}"
        call = event.input.call if isinstance(event.input, SessionStartInput) else None
        try:
            step = machine.abort(progress.state, call, reason, clock())
            progress.add(step, client)
            return _reply(event, progress, step, step.done, step.wait_ms)
        except Exception:
            log.exception("session %s: abort failed", event.session_id)
        # The last resort: a bare hang-up, on the last state that could be written (as
        # it was: nothing more can be read of it), or "{}" when there is none or it is
        # too long to travel.
        progress.commands.append(HangupCommand(reason=f"Error({reason})"))
        last = progress.last_written()
        state = last.state_text if last is not None else progress.initial_state
        if state is None or len(state) > MAX_IVR_STATE_CHARS:
            state = "{}"
        return IvrReply(
            session_id=event.session_id,
            seq=event.seq,
            state=state,
            step_index=last.step_index if last is not None else 0,
            end_reason=last.end_reason if last is not None else None,
            commands=progress.commands,
            traces=progress.traces,
            done=True,
            wait_ms=None,
        )


class Executor:
    """The process: one DEALER socket, one provider client, one task per event."""

    def __init__(
        self,
        settings: Settings,
        ctx: zmq.Context[zmq.Socket[bytes]],
        client: ProviderClient,
        executor_id: str,
        clock: Clock = time.time,
        tts: TtsEngine | None = None,
        asr: AsrEngine | None = None,
        send_wait_s: float = SEND_WAIT_S,
    ) -> None:
        self.settings = settings
        self.client = client
        self.tts = tts or TtsEngine(
            settings.tts, settings.media.sounds_dir, http=lambda: client.session
        )
        self.asr = asr or AsrEngine(settings.asr, http=lambda: client.session)
        self.executor_id = executor_id
        self.clock = clock
        self.dealer = FrontDealer(ctx, executor_id, self._on_frame, linger_ms=1000,
                                  send_wait_s=send_wait_s)
        self._sessions: set[asyncio.Task[None]] = set()
        self._working: dict[str, int] = {}

    def reload(self) -> None:
        """SIGHUP (`pbx reload` sends it after the front's): re-read the config file and
        take its `[ivrs.*]` for the next `jump_ivr` (a session carries its own IVR's
        parameters; pbx.reload). A bad file changes nothing."""
        path = self.settings.source_path
        try:
            new = load_config(path)
        except ConfigError as exc:
            log.error("reload refused, running settings kept: %s", exc)
            return
        plan = plan_reload(self.settings, new)
        assert plan.settings is not None
        self.settings = plan.settings
        log.info("reload of %s: %s", path, "[ivrs.*] reloaded" if "ivrs" in plan.changed
                 else "[ivrs.*] unchanged")

    @property
    def busy(self) -> int:
        return len(self._sessions)

    def send(self, msg: IvrReady | IvrHeartbeat | IvrReply) -> None:
        """To the front now or through the outbox (`FrontDealer`); a heartbeat is dropped
        while others wait (the next one says the same)."""
        self.dealer.send(msg, droppable=isinstance(msg, IvrHeartbeat))

    def _on_frame(self, frame: bytes) -> None:
        """One message from the front: a bad one is logged and dropped, an IvrEvent
        starts a task."""
        try:
            msg = decode(frame)
        except MessageError as exc:
            log.warning("dropping bad frame: %s", exc)
            return
        if not isinstance(msg, IvrEvent):
            log.warning("dropping unexpected %s message", getattr(msg, "kind", "?"))
            return
        task = asyncio.create_task(self._session(msg))
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)

    def connect(self) -> None:
        """Connect to the front and read from it in the running loop."""
        endpoint = self.settings.zmq.ivr_endpoint
        self.dealer.connect(self.settings.zmq, endpoint)
        log.info("executor %s connected to %s%s", self.executor_id, endpoint,
                 " (CURVE)" if self.settings.zmq.curve else "")

    def close(self) -> None:
        self.dealer.close()

    async def run(self, stop: asyncio.Event) -> None:
        self.connect()
        tts = self.tts
        log.info(
            "text to speech: %s",
            tts.problem
            or ", then ".join(
                [f"service {tts.settings.url}"] * bool(tts.settings.url)
                + [f"espeak-ng ({tts.espeak})"] * (tts.espeak is not None)
            )
            or "not available (no [tts] url, no espeak-ng)",
        )
        log.info("speech recognition: %s", self.asr.describe())
        self.send(IvrReady(executor_id=self.executor_id, capacity=self.settings.ivr.capacity))
        workers = [
            asyncio.create_task(self._heartbeats(), name="heartbeat"),
            asyncio.create_task(self._sweep_spool(), name="asr-spool"),
        ]
        # Not one of the loops above: it ends once the recogniser is loaded.
        warm = asyncio.create_task(self.asr.warm(), name="asr-warm")
        stopped = asyncio.create_task(stop.wait(), name="stop")
        done, _ = await asyncio.wait([stopped, *workers], return_when=asyncio.FIRST_COMPLETED)
        for task in [stopped, *workers]:
            task.cancel()
        await asyncio.gather(stopped, *workers, return_exceptions=True)
        for task in done:
            if task is not stopped and not task.cancelled() and task.exception() is not None:
                log.error("executor loop failed: %r", task.exception())
        if self._sessions:
            log.info("waiting for %d session(s) in progress", len(self._sessions))
            await asyncio.wait(set(self._sessions), timeout=5.0)
        # Replies of the sessions that just ended, bounded like the sessions' wait.
        await self.dealer.flushed(1.0)
        warm.cancel()
        await self.asr.close()
        self.close()

    async def _heartbeats(self) -> None:
        period_s = self.settings.ivr.heartbeat_ms / 1000.0
        while True:
            await asyncio.sleep(period_s)
            self.send(
                IvrHeartbeat(
                    executor_id=self.executor_id,
                    busy=self.busy,
                    capacity=self.settings.ivr.capacity,
                    working=dict(self._working),
                )
            )

    async def _sweep_spool(self) -> None:
        """Utterances nobody recognised (an executor died, the call ended first)."""
        while True:
            removed = await asyncio.to_thread(self.asr.sweep_spool)
            if removed:
                log.info("asr spool: deleted %d stale utterance(s)", removed)
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def _session(self, event: IvrEvent) -> None:
        self._working[event.session_id] = event.seq
        try:
            reply = await handle_event(
                event, self.client, self.clock, self.settings.ivrs, self.tts, self.asr
            )
            self.send(reply)
        except Exception:
            log.exception("session %s seq %d: cannot send reply", event.session_id, event.seq)
        finally:
            if self._working.get(event.session_id) == event.seq:
                del self._working[event.session_id]


def executor_id() -> str:
    return f"ivr-{socket.gethostname()}-{os.getpid()}"


async def serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ctx = plane_context(settings.zmq)
    client = ProviderClient()
    try:
        executor = Executor(settings, ctx, client, executor_id())
        loop.add_signal_handler(signal.SIGHUP, executor.reload)
        await executor.run(stop)
    finally:
        await client.close()
        ctx.term()
    log.info("executor stopped")


def main() -> None:
    settings = start_program("pbx-ivr", "client")
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()

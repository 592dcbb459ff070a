"""The front's shell around the call core: I/O only.

`pbx.calls.CallCore` is the SIP transaction user, B2BUA and IVR broker, without I/O.
This shell feeds it what arrives (SIP messages from `pbx.transport`, ZeroMQ messages
from `pbx.broker`), with the loop's clock, and carries out what it asks (send SIP, send
on a plane, publish an event, resolve a host name) through the callables handed in by
`pbx.app`. One `call_at` follows the core's `get_timer()`, asked once per loop
iteration in which something ran.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from pbx import messages as m
from pbx.calls.context import Command, Publish, Resolve, ToIvr, ToMedia
from pbx.calls.core import CallCore
from pbx.calls.state import Call, Leg, Session
from pbx.config import ConfigError, Settings, load_config
from pbx.jsonl import JsonLinesLog
from pbx.records import CallRecords
from pbx.reload import plan_reload
from pbx.retention import RetentionSweeper
from pbx.sip.framing import FramingError
from pbx.sip.transaction import SendBytes
from pbx.traces import TraceStore

log = logging.getLogger("pbx.front")

Addr = tuple[str, int]
# Let the BYEs and final responses of a shutdown leave before the loop stops.
SHUTDOWN_FLUSH_S = 0.2

__all__ = ["Call", "Front", "Leg", "Session"]


class SendFn(Protocol):
    """The transport's send: UDP, or with `reliable` the peer's TCP connection."""

    def __call__(self, data: bytes, addr: Addr, reliable: bool = False) -> None: ...


class Front:
    def __init__(
        self,
        settings: Settings,
        send_datagram: SendFn,
        send_media: Callable[[bytes, Any], bool],
        send_ivr: Callable[[bytes, Any], bool],
        publish: Callable[[dict[str, Any]], None],
        is_connected: Callable[[Addr], bool] = lambda addr: False,
        has_subscribers: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.send_datagram = send_datagram
        self.send_media = send_media
        self.send_ivr = send_ivr
        self.publish = publish
        logs_dir = Path(settings.logging.dir)
        rotation = (settings.logging.jsonl_max_bytes, settings.logging.jsonl_backups)
        self.logs_flush_s = settings.logging.jsonl_flush_s
        buffered = self.logs_flush_s > 0
        self.traces_log = JsonLinesLog(logs_dir / "traces.jsonl", *rotation,
                                       flush_every_line=not buffered)
        self.calls_log = JsonLinesLog(logs_dir / "calls.jsonl", *rotation,
                                      flush_every_line=not buffered)
        self._logs_flush: asyncio.TimerHandle | None = None
        self.traces = TraceStore(settings.traces.max_sessions, settings.traces.max_steps,
                                 self.traces_log, max_bytes=settings.traces.max_bytes,
                                 max_session_bytes=settings.traces.max_session_bytes)
        self.records = CallRecords(self.calls_log)
        # Recordings, voicemail and TTS cache retention: run by pbx.app's periodic loop.
        self.retention = RetentionSweeper.from_settings(settings)
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:  # built before the loop runs (the loop's clock is monotonic)
            now = time.monotonic()
        self.core = CallCore(settings, records=self.records, traces=self.traces,
                             is_connected=is_connected, now=now,
                             wall_offset=time.time() - now)
        ctx = self.core.ctx
        self.registrar = ctx.registrar
        self.stats = ctx.stats
        self.calls = ctx.table.calls
        self.sessions = ctx.table.sessions
        self.legs_by_media = ctx.table.legs_by_media
        self.setup_by_source = ctx.table.setup_by_source
        self.calls_by_source = ctx.table.calls_by_source
        self.media_workers = ctx.media_workers
        self.executors = ctx.executors
        self.queue_calls = self.core.queue
        # In-process subscribers to every published event (the admin's /ws/events), and
        # whether each hears anything now (`add_listener`; one without is always heard).
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._listener_active: dict[Callable[[dict[str, Any]], None],
                                    Callable[[], bool]] = {}
        # Whether `publish` reaches anyone now (the PUB socket's subscribers); None:
        # assume it does. With neither a subscriber nor an active listener, the core
        # builds no events (issue 9: ~3-4 us each in the front).
        self.has_subscribers = has_subscribers
        self.core.ctx.listened = self._listened
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._follow: asyncio.Handle | None = None  # this iteration's _follow_deadline
        self._resolving: set[asyncio.Task[None]] = set()
        self.started_at = time.time()
        self.reloaded_at: float | None = None  # wall clock of the last applied reload

    # ---------------------------------------------------------------- clock, timer

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def now(self) -> float:
        return self.loop.time()

    def _run(self) -> None:
        """Carry out what the core asked; its next deadline is followed once per loop
        iteration (`_follow_deadline`, before the loop next waits): a drain of plane
        messages runs this per message, and asking the core's timers (transactions,
        retransmissions, records...) each time was ~5 % of the front's CPU."""
        self._flush()
        if self._follow is None:
            self._follow = self.loop.call_soon(self._follow_deadline)

    def _follow_deadline(self) -> None:
        self._follow = None
        deadline = self.core.get_timer()
        if self._timer is not None:
            if deadline == self._timer_at:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            # (uvloop's handles do not say when they are due: the deadline is kept.)
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _flush(self) -> None:
        core = self.core
        out = core.drain()
        while out:
            for command in out:
                self._execute(command)
            out = core.drain()  # a refused send may have asked for more
        if self._logs_flush is None and (self.traces_log.unflushed
                                         or self.calls_log.unflushed):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # driven without a loop (tests): nothing would flush
                self.flush_logs()
                return
            self._logs_flush = loop.call_later(self.logs_flush_s, self.flush_logs)

    def flush_logs(self) -> None:
        """The JSON-lines logs' buffers to their files (on a timer, `_flush`)."""
        if self._logs_flush is not None:
            self._logs_flush.cancel()
            self._logs_flush = None
        self.traces_log.flush()
        self.calls_log.flush()

    def _on_timer(self) -> None:
        self._timer = None
        try:
            self.core.handle_timer(self.now())
        finally:
            self._run()  # whatever happened, the timers keep running

    def _execute(self, command: Command) -> None:
        if isinstance(command, SendBytes):
            self.send_datagram(command.data, command.addr, command.reliable)
        elif isinstance(command, ToMedia):
            if not self.send_media(command.worker, command.msg):
                self.core.media_send_failed(command, "refused by the plane", self.now())
        elif isinstance(command, ToIvr):
            if not self.send_ivr(command.executor, command.event):
                self.core.ivr_send_failed(command.executor, command.event, self.now())
        elif isinstance(command, Publish):
            self._publish(command.event)
        elif isinstance(command, Resolve):
            task = asyncio.create_task(self._resolve(command))
            self._resolving.add(task)
            task.add_done_callback(self._resolving.discard)

    async def _resolve(self, command: Resolve) -> None:
        try:
            infos = await self.loop.getaddrinfo(command.host, command.port,
                                                type=socket.SOCK_DGRAM)
            addr: Addr | None = (str(infos[0][4][0]), command.port)
        except (OSError, IndexError):
            addr = None
        self.core.host_resolved(command.dialog_key, addr, self.now())
        self._run()

    def add_listener(self, listener: Callable[[dict[str, Any]], None],
                     active: Callable[[], bool] | None = None) -> None:
        """An in-process subscriber to every event; `active` says whether it hears
        anything now (an admin hub with no WebSocket client does not)."""
        self.listeners.append(listener)
        if active is not None:
            self._listener_active[listener] = active

    def _listened(self) -> bool:
        """Whether an event published now reaches anyone (`CallContext.listened`)."""
        if self.has_subscribers is None or self.has_subscribers():
            return True
        for listener in self.listeners:
            active = self._listener_active.get(listener)
            if active is None or active():
                return True
        return False

    def _publish(self, event: dict[str, Any]) -> None:
        """To the ZeroMQ PUB socket and to in-process listeners (the admin WebSocket)."""
        self.publish(event)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")

    # ---------------------------------------------------------------- inputs

    def message_received(self, data: bytes, addr: Addr, *, reliable: bool = False) -> None:
        self.core.sip_received(data, addr, self.now(), reliable=reliable)
        self._run()

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.message_received(data, addr)

    def stream_unframed(self, head: bytes, addr: Addr, error: FramingError) -> None:
        """A TCP stream that cannot be framed: answer the request whose head we have
        (400, or 413 when too large); the transport then closes the connection."""
        self.core.sip_unframed(head, addr, error, self.now())
        self._run()

    def on_media_message(self, identity: bytes, msg: Any) -> None:
        self.core.media_message(identity, msg, self.now())
        self._run()

    def on_ivr_message(self, identity: bytes, msg: Any) -> None:
        self.core.ivr_message(identity, msg, self.now())
        self._run()

    def expire_workers(self) -> None:
        """The liveness check now (it also runs on its own timer)."""
        self.core.check_liveness(self.now())
        self._run()

    def record_trace(self, trace: m.StepTrace) -> None:
        """A step trace into the store, the log and the listeners (as an executor's)."""
        self.core.events.trace(trace)
        self._flush()

    def reload(self) -> dict[str, Any]:
        """Re-read the config file this front started with and apply its dial plan
        (`pbx.reload`). A file that fails validation changes nothing. The report:
        `ok`, `file`, `changed` (sections), `restart_needed` (keys), `error`."""
        path = self.settings.source_path
        report: dict[str, Any] = {"file": path, "changed": [], "restart_needed": []}
        try:
            new = load_config(path)
        except ConfigError as exc:
            log.error("reload refused, running settings kept: %s", exc)
            return {**report, "ok": False, "error": str(exc)}
        plan = plan_reload(self.settings, new)
        assert plan.settings is not None
        self.settings = plan.settings
        self.core.reload(plan.settings)
        self._run()
        self.reloaded_at = time.time()
        log.info("reload of %s: %s", path, plan.summary())
        return {**report, "ok": True, "changed": plan.changed,
                "restart_needed": plan.restart_needed, "error": None}

    async def shutdown(self) -> None:
        """On SIGTERM: end every call properly so phones are not left in dead calls."""
        self.core.shutdown(self.now())
        self._run()
        await asyncio.sleep(SHUTDOWN_FLUSH_S)
        self.records.flush_all()
        self.flush_logs()

    def close(self) -> None:
        """The logs flushed and closed (after `shutdown`, or when the loop ends on an
        error)."""
        self.flush_logs()
        self.traces_log.close()
        self.calls_log.close()

    # ---------------------------------------------------------------- state

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.core.snapshot(),
            **self.traces.stats(),
            "traces_log_rotations": self.traces_log.rotations,
            "calls_log_rotations": self.calls_log.rotations,
            **self.retention.stats,
        }

"""Media worker process: the asyncio shell around `media.engine.MediaEngine`.

    pbx-media            (or: python -m workers.media)

Connects a DEALER socket (identity `media-<hostname>-<pid>`) to the front's
media ROUTER, says MediaReady once its kernels are warm, heartbeats, and
turns front commands into engine calls. The socket is `pbx.dealer.FrontDealer`'s,
driven from the loop without zmq.asyncio: each command is handled synchronously in
the socket's drain, and a message the front cannot take (gone or stalled) waits in
its outbox, in order, up to 15 s (heartbeats are not queued). Each call leg gets its own UDP socket
on an even port of `[media] rtp_ports` (a random start, so several workers
sharing the range rarely collide; a taken port is skipped), bound ahead of the
call: the worker keeps a pool of bound RTP/RTCP pairs (`workers.portpool`,
`[media] port_pool`) and announces its free ports to the front (MediaPorts after
MediaReady, at the end of any tick in which the pool changed or an allocation was
handled, and in every heartbeat); MediaAllocate names the port the front handed out
(and, for an inbound leg, where to send its RTP: `remote`), and the pool is refilled
soon after, a few binds per loop callback. Only a refused allocation is answered
(MediaAllocated with its error, and named in the announcements' `refused` for a while,
as are numbers that never arrived): the next announcement, whose `allocate_seq` covers
the allocation, confirms it. One tick loop runs every 20 ms from a fixed origin and
hands the engine the nominal tick time; a late tick skips ahead instead of running the
missed ones back to back.
The legs' RTP sockets are read when data arrives: the event loop watches the
epoll set of all of them (`workers.rtpio`), and a wake-up reads only the ready
sockets — at once if the last read was POLL_SECONDS (RELAY_POLL_SECONDS while legs
are bridged) ago or more, otherwise when that interval is over, so a busy worker reads
its packets in batches. While those timed reads keep finding packets the worker stays
on the timer (the fd unwatched); a read that finds nothing goes back to readiness.
While any leg is bridged (and no leg's media is on the event loop: IPv6, WebSocket)
the time between ticks goes to one compiled call instead (`workers.rtploop`,
`relay_until`): it waits on the RTP sockets and the DEALER's fd, relays each packet in
the pass that reads it, and comes back to Python only for what needs it, for the
front's messages and at the tick, so the event loop gets its turn at least every tick.

With `[media] rtp_socket` "shared" or "auto" the worker also binds one shared RTP
port (and its RTCP port + 1) and announces it with its pool: a MediaAllocate naming it
puts the leg there without binding anything. The shared socket is in the same epoll
set and is read with recvmmsg, its legs' packets go out with sendmmsg, and each
datagram's leg is told by its source address (`workers.demux`: its SDP address or
latched source; anything else is dropped and counted as foreign). RTCP on the shared
port + 1 is told apart the same way, by a dict (a report per leg every few seconds).

Recordings (MediaRecord) are written by the engine's recorder in batches during
the tick; every file error comes back as a MediaFailure event. A WebSocket
bridge (MediaWsBridge) is one task per leg here: it connects with aiohttp
(`timeout_ms` bounds the connect), hands binary frames to the engine (and
stops reading while the engine's playout buffer is full), and a sender task
per socket writes the caller-audio frames the engine queued during the tick.
Either side closing, or a failed connect, sends WsBridgeEnded; a release
closes the socket without an event.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import signal
import socket
import time
from bisect import bisect_left
from typing import Any

import aiohttp
import numpy as np

from media import g711, inband, vad, wsbridge
from media.engine import EngineError, EngineTotals, MediaEngine, Packet
from media.kernels import cachestamp, rtpbatch
from media.legtable import TxBatch
from media.prompts import PromptCache
from media.recorder import Recorder
from media.vad import ListenTuning
from pbx.config import Settings
from pbx.dealer import FrontDealer
from pbx.messages import (
    MAX_RELEASED_LEGS,
    MEDIA_TIMING_BOUNDS_MS,
    TIMING_BUCKETS,
    MediaAllocate,
    MediaAllocated,
    MediaBridge,
    MediaDtmfInfo,
    MediaEvent,
    MediaHeartbeat,
    MediaPlay,
    MediaPorts,
    MediaReady,
    MediaRecord,
    MediaRecordStop,
    MediaRelease,
    MediaReleased,
    MediaRemote,
    MediaStop,
    MediaTimer,
    MediaWsBridge,
    MessageError,
    ReleasedLeg,
    decode,
)
from pbx.planes import plane_context
from pbx.startup import start_program
from workers import rtpio, rtploop
from workers.portpool import RefusedSeqs, RtpPortPool, bind_rtp_pair

log = logging.getLogger("pbx.media")

TICK_SECONDS = 0.020
# The legs' RTP sockets are read at most this often (on a wake-up from their epoll
# set, and before every tick): a received RFC 4733 end packet waits at most this
# long before its digit goes out, and a burst of packets is read in one batch.
POLL_SECONDS = 0.002
# ... and this often while any leg is bridged: relayed audio waits for the read (about
# this long, plus the pass). perf/bench_relay.py, 500 bridged calls, the phones' packets
# spread over the tick (--phases 20): 1 ms cost 0.086-0.100 % of a core per call (relay
# p99 2.5-2.9 ms), 2 ms the same CPU with p99 4.2-4.6 ms, too near the 5 ms budget.
RELAY_POLL_SECONDS = 0.001
# uvloop's timers count whole milliseconds: call_later(d) with d under 0.5 ms runs on the
# next loop turn. The chained read (`_poll_due`) never waits less than this, or a
# shorter interval would read in a busy loop while packets keep coming.
LOOP_TIMER_SECONDS = 0.001
# Caller-audio frames waiting for a slow WebSocket; more are dropped (0.5 s at 20 ms).
WS_SEND_QUEUE = 25
# Port pairs bound per refill callback: a long refill yields to the loop in between.
REFILL_BINDS = 8
# Prompts timed from MediaPlay to their first RTP packet at once (more: not timed).
MAX_PLAYS_TIMED = 10_000


class _RtpProtocol(asyncio.DatagramProtocol):
    def __init__(self, worker: MediaWorker, call_id: str) -> None:
        self.worker = worker
        self.call_id = call_id

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.worker.on_rtp(self.call_id, data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that is gone: nothing to do but note it.
        log.debug("call %s: RTP socket error: %s", self.call_id, exc)


class _RtcpProtocol(asyncio.DatagramProtocol):
    """RTCP (rtp_port + 1) stays on asyncio: one datagram per leg every ~5 s."""

    def __init__(self, worker: MediaWorker, call_id: str) -> None:
        self.worker = worker
        self.call_id = call_id

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.worker.engine.receive_rtcp(self.call_id, data, addr, time.monotonic())

    def error_received(self, exc: Exception) -> None:
        log.debug("call %s: RTCP socket error: %s", self.call_id, exc)


class _SharedRtcpProtocol(asyncio.DatagramProtocol):
    """RTCP of the legs on the shared port: each datagram to the leg whose SDP address it
    comes from, + 1 (RFC 3550 §11) or itself (endpoints that send RTCP from their RTP
    socket); others are counted as foreign."""

    def __init__(self, worker: MediaWorker) -> None:
        self.worker = worker

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        worker = self.worker
        call_id = worker.shared_rtcp_legs.get((addr[0], addr[1]))
        if call_id is None:
            worker.shared_rtcp_foreign += 1
            return
        worker.engine.receive_rtcp(call_id, data, addr, time.monotonic())

    def error_received(self, exc: Exception) -> None:
        log.debug("shared RTCP socket error: %s", exc)


class MediaWorker:
    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        media = settings.media
        asr = settings.asr
        recorder = Recorder(
            {"recordings": media.recordings_dir, "voicemail": media.voicemail_dir,
             "asr": asr.spool_dir},
            listen=ListenTuning(
                end_silence_ms=asr.end_silence_ms, max_speech_ms=asr.max_speech_ms,
                margin_db=asr.speech_margin_db, min_dbfs=asr.min_speech_dbfs,
            ),
        )  # fmt: skip
        rtp = settings.rtp
        self.engine = MediaEngine(
            PromptCache(media.sounds_dir), recorder=recorder, latching=rtp.latching,
            relatch_silence_ms=rtp.relatch_silence_ms,
        )  # fmt: skip
        self._reported = EngineTotals(0, 0, 0, 0, 0)  # `counts()` at the last heartbeat
        # RTP: IPv4 sockets polled in batches (workers.rtpio); IPv6 on asyncio endpoints.
        self.rtp = rtpio.RtpSockets(legs=self.engine.tab)
        # The shared RTP port ([media] rtp_socket; bound in `run`), None: none. Its RTCP
        # (port + 1) by source: (ip, SDP port + 1 or SDP port) -> the shared leg's call id.
        self.shared_port: int | None = None
        self.shared_rtcp: asyncio.DatagramTransport | None = None
        self.shared_rtcp_legs: dict[tuple[str, int], str] = {}
        self._shared_rtcp_of: dict[str, list[tuple[str, int]]] = {}
        self.shared_rtcp_foreign = 0
        self.transports: dict[str, asyncio.DatagramTransport] = {}
        self.rtcp_transports: dict[str, asyncio.DatagramTransport] = {}
        self.ws_tasks: dict[str, asyncio.Task[None]] = {}
        self.ws_queues: dict[str, asyncio.Queue[bytes]] = {}
        self.pool = RtpPortPool(media.rtp_ip, *media.port_range, media.port_pool)
        self.allocate_seq = 0  # MediaAllocate.seq of the last one handled
        self.refused = RefusedSeqs()  # what `allocate_seq` does not confirm
        self._announce_due = False  # an allocation was handled since the last announcement
        self.released: list[ReleasedLeg] = []  # legs released since the last MediaReleased
        self._refill: asyncio.Handle | None = None
        self._http: aiohttp.ClientSession | None = None
        self._last_poll = 0.0  # time.monotonic() of the last read of the RTP sockets
        self._poll_timer: asyncio.TimerHandle | None = None
        self._watching = False  # the loop watches the RTP sockets' epoll fd
        # The compiled wait between ticks while legs are bridged (`relay_until`); from `run`.
        self.relay_loop: rtploop.RelayLoop | None = None
        self.tick_late_max = 0.0
        self.tick_late: list[float] = []  # seconds, each tick since the last heartbeat
        self.tick_busy: list[float] = []
        self.ticks_skipped = 0
        # Prompts whose first frame has not gone out: call_id -> (play_id, MediaPlay's
        # arrival); what they waited goes in the next heartbeat (ms).
        self.plays_starting: dict[str, tuple[int, float]] = {}
        self.play_start_ms: list[float] = []
        self.ctx = plane_context(settings.zmq)
        self.dealer = FrontDealer(self.ctx, worker_id, self.on_frame, linger_ms=500)
        self.loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------ front plane

    def send(self, msg: Any) -> None:
        """To the front now, or through the outbox while its queue is full (`FrontDealer`);
        a heartbeat is dropped meanwhile (the next one says the same)."""
        self.dealer.send(msg, droppable=isinstance(msg, MediaHeartbeat))

    def send_events(self, events: list[MediaEvent]) -> None:
        for ev in events:
            self.send(ev)

    def on_frame(self, frame: bytes) -> None:
        """One message from the front, handled in the socket's drain (`FrontDealer`)."""
        try:
            msg = decode(frame)
        except MessageError as exc:
            log.warning("ignoring malformed frame from the front: %s", exc)
            return
        try:
            self.handle(msg)
        except EngineError as exc:
            log.warning("%s: %s", type(msg).__name__, exc)
        except Exception:
            log.exception("error handling %s", type(msg).__name__)

    def handle(self, msg: Any) -> None:
        now = time.monotonic()
        engine = self.engine
        if isinstance(msg, MediaAllocate):
            self.allocate(msg)
        elif isinstance(msg, MediaRemote):
            self.set_remote(msg)
        elif isinstance(msg, MediaPlay):
            self.send_events(engine.play(msg, now))
            if len(self.plays_starting) < MAX_PLAYS_TIMED:
                self.plays_starting[msg.call_id] = (msg.play_id, now)
        elif isinstance(msg, MediaStop):
            engine.stop(msg.call_id)
        elif isinstance(msg, MediaTimer):
            engine.set_timer(msg, now)
        elif isinstance(msg, MediaBridge):
            engine.bridge(msg.call_id, msg.peer_call_id)
        elif isinstance(msg, MediaDtmfInfo):
            self.send_events(engine.dtmf_info(msg, now))
        elif isinstance(msg, MediaRecord):
            self.send_events(engine.record(msg, now))
        elif isinstance(msg, MediaRecordStop):
            self.send_events(engine.record_stop(msg.call_id, now))
        elif isinstance(msg, MediaWsBridge):
            self.start_ws(msg)
        elif isinstance(msg, MediaRelease):
            self.stop_ws(msg.call_id)
            self.released.append(engine.remove_leg(msg.call_id, now))
            self.close_leg(msg.call_id)
            self.refill_soon()  # room for one more pooled pair
        else:
            log.warning("ignoring %s: not for a media worker", type(msg).__name__)

    def allocate(self, msg: MediaAllocate) -> None:
        """Give the leg the pooled pair the front chose, or say why not (the port stays
        in the pool if it was there). The front takes the next announcement as the
        confirmation of every `seq` up to its `allocate_seq` but those in its `refused`:
        so every refusal goes there too, and so do numbers skipped (MediaAllocates that
        never arrived) and one that arrives after a later one (too late to be judged)."""
        media = self.settings.media
        seq = msg.seq
        self._announce_due = True  # the front learns `allocate_seq` even if nothing changed
        if seq <= self.allocate_seq:
            self.refuse(msg, f"allocation {seq} came after {self.allocate_seq}")
            return
        if seq > self.allocate_seq + 1:
            log.warning("MediaAllocate %d-%d never arrived: announced as refused",
                        self.allocate_seq + 1, seq - 1)
            self.refused.add(self.allocate_seq + 1, seq - 1, time.monotonic())
        self.allocate_seq = seq
        if msg.call_id in self.engine.legs:  # asked again: the same answer
            leg = self.engine.legs[msg.call_id]
            if leg.local_port != msg.rtp_port:
                self.refuse(msg, f"the leg already has port {leg.local_port}")
            return
        if len(self.engine) >= media.capacity:
            self.refuse(msg, "worker at capacity")
            return
        if self.shared_port is not None and msg.rtp_port == self.shared_port:
            self.allocate_shared(msg)
            return
        pair = self.pool.take(msg.rtp_port)
        if pair is None:
            self.refuse(msg, f"port {msg.rtp_port} is not in the worker's pool")
            return
        self.refill_soon()
        sock, rtcp_sock = pair
        port = msg.rtp_port
        try:
            leg = self.engine.add_leg(msg.call_id, port, msg.inband_dtmf)
        except EngineError as exc:
            sock.close()
            rtcp_sock.close()
            self.refuse(msg, str(exc))
            return
        if sock.family == socket.AF_INET:
            self.rtp.add(msg.call_id, sock, leg.row)
        else:
            task = self.loop.create_task(self._open_endpoint(msg.call_id, sock, _RtpProtocol))
            task.add_done_callback(_log_task_error)
        # The sockets are bound, so the endpoints are created without awaiting a bind.
        task = self.loop.create_task(self._open_endpoint(msg.call_id, rtcp_sock, _RtcpProtocol))
        task.add_done_callback(_log_task_error)
        self.allocated(msg)

    def allocate_shared(self, msg: MediaAllocate) -> None:
        """The leg on the shared port: nothing to bind; its packets find it by source
        address once MediaRemote gives its SDP address."""
        try:
            leg = self.engine.add_leg(msg.call_id, msg.rtp_port, msg.inband_dtmf)
        except EngineError as exc:
            self.refuse(msg, str(exc))
            return
        self.rtp.add_shared(msg.call_id, leg.row)
        self.allocated(msg)

    def refuse(self, msg: MediaAllocate, error: str) -> None:
        """Say so now (MediaAllocated) and in the announcements of the next while
        (`refused`), in case the front never gets the MediaAllocated."""
        self.refused.add(msg.seq, msg.seq, time.monotonic())
        self.send(MediaAllocated(call_id=msg.call_id, error=error))

    def allocated(self, msg: MediaAllocate) -> None:
        """The leg has its port: said by the next announcement (`announce_ports`, its
        `allocate_seq`), not by a message of its own; the remote end it came with is set."""
        if msg.remote is not None:
            self.set_remote(msg.remote)

    def set_remote(self, msg: MediaRemote) -> None:
        refused = destination_refused(msg.remote_ip, self.settings.media.rtp_ip)
        if refused is not None:
            raise EngineError(f"call {msg.call_id!r}: no RTP to {msg.remote_ip}: {refused}")
        self.engine.set_remote(msg)
        if self.rtp.on_shared(msg.call_id):
            self.shared_leg_moved(msg.call_id)

    def shared_leg_moved(self, call_id: str) -> None:
        """A shared leg's SDP address changed (or came): its RTP and RTCP keys follow."""
        self.rtp.refresh(call_id)
        self._forget_shared_rtcp(call_id)
        leg = self.engine.legs.get(call_id)
        if leg is None or leg.sdp_remote is None:
            return
        ip, port = leg.sdp_remote
        mine = self._shared_rtcp_of[call_id] = []
        for key in ((ip, port + 1), (ip, port)):
            if key not in self.shared_rtcp_legs:  # as the RTP table: the first claim keeps it
                self.shared_rtcp_legs[key] = call_id
                mine.append(key)

    def _forget_shared_rtcp(self, call_id: str) -> None:
        for key in self._shared_rtcp_of.pop(call_id, []):
            if self.shared_rtcp_legs.get(key) == call_id:
                del self.shared_rtcp_legs[key]

    def bind_shared(self) -> None:
        """The shared RTP/RTCP pair: `[media] shared_port` or a free pair of the range
        (IPv4 only: an IPv6 worker keeps per-leg ports)."""
        media = self.settings.media
        if media.rtp_socket == "per_leg" or ":" in media.rtp_ip:
            return
        if media.shared_port:
            pair = bind_rtp_pair(media.rtp_ip, media.shared_port, media.shared_port + 1)
        else:
            pair = bind_rtp_pair(media.rtp_ip, *media.port_range)
        if pair is None:
            log.error("no shared RTP port free (%s): every leg gets a port of its own",
                      media.shared_port or media.rtp_ports)
            return
        rtp, rtcp = pair
        self.rtp.set_shared(rtp)
        self.shared_port = rtp.getsockname()[1]
        self._shared_rtcp_sock = rtcp
        log.info("shared RTP port %d (RTCP %d)", self.shared_port, self.shared_port + 1)

    async def open_shared_rtcp(self) -> None:
        sock = getattr(self, "_shared_rtcp_sock", None)
        if sock is None:
            return
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: _SharedRtcpProtocol(self), sock=sock
        )
        self.shared_rtcp = transport

    def refill_soon(self) -> None:
        """Bind replacements for the pool after the work at hand (never in the tick)."""
        if self._refill is None:
            self._refill = self.loop.call_soon(self._refill_pool)

    def _refill_pool(self) -> None:
        self._refill = None
        room = self.settings.media.capacity - len(self.engine)
        if self.pool.fill(room, REFILL_BINDS):
            self.refill_soon()  # more wanted: after the callbacks waiting meanwhile

    def ports_message(self) -> MediaPorts:
        return MediaPorts(ports=self.pool.ports(), allocate_seq=self.allocate_seq,
                          refused=self.refused.ranges(time.monotonic()),
                          shared_port=self.shared_port)

    def announce_ports(self) -> None:
        """MediaPorts if the pool changed or an allocation was handled since the last
        announcement (called once per tick: a burst of allocations is one message)."""
        if self.pool.changed or self._announce_due:
            self.send(self.ports_message())
            self.pool.changed = self._announce_due = False

    def send_released(self) -> None:
        """The statistics of the legs released since the last call (once per tick: a
        tick's releases are one message, not one each; issue 9)."""
        while self.released:
            legs, self.released = (self.released[:MAX_RELEASED_LEGS],
                                   self.released[MAX_RELEASED_LEGS:])
            self.send(MediaReleased(legs=legs))

    async def _open_endpoint(
        self,
        call_id: str,
        sock: socket.socket,
        protocol: type[_RtpProtocol] | type[_RtcpProtocol],
    ) -> None:
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: protocol(self, call_id), sock=sock
        )
        if call_id not in self.engine.legs:  # released before the endpoint was up
            transport.close()
            return
        table = self.rtcp_transports if protocol is _RtcpProtocol else self.transports
        table[call_id] = transport

    def close_leg(self, call_id: str) -> None:
        """Close the leg's RTP and RTCP sockets (a shared leg: its addresses go)."""
        self._forget_shared_rtcp(call_id)
        sock = self.rtp.remove(call_id)
        if sock is not None:
            sock.close()
        for table in (self.transports, self.rtcp_transports):
            transport = table.pop(call_id, None)
            if transport is not None:
                transport.close()

    # ------------------------------------------------------------ WebSocket bridge

    def start_ws(self, msg: MediaWsBridge) -> None:
        if msg.call_id not in self.engine.legs:
            log.warning("MediaWsBridge for unknown call %s", msg.call_id)
            return
        if msg.call_id in self.ws_tasks:  # a new bridge replaces the old one, silently
            self.stop_ws(msg.call_id)
            self.engine.ws_closed(msg.call_id, "replaced")
        task = self.loop.create_task(self._ws_bridge(msg))
        task.add_done_callback(_log_task_error)
        self.ws_tasks[msg.call_id] = task

    def stop_ws(self, call_id: str) -> None:
        task = self.ws_tasks.pop(call_id, None)
        if task is not None:
            task.cancel()

    def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        return self._http

    async def _ws_bridge(self, msg: MediaWsBridge) -> None:
        call_id = msg.call_id
        me = asyncio.current_task()
        reason = "closed by peer"
        ws: aiohttp.ClientWebSocketResponse | None = None
        sender: asyncio.Task[None] | None = None
        try:
            try:
                async with asyncio.timeout(msg.timeout_ms / 1000.0):
                    ws = await self.http().ws_connect(msg.uri, headers=msg.headers,
                                                      max_msg_size=wsbridge.MAX_FRAME_BYTES)
            except TimeoutError:
                reason = "timeout"
                return
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                reason = f"connect failed: {exc}"
                return
            if self.ws_tasks.get(call_id) is not me or call_id not in self.engine.legs:
                return
            queue: asyncio.Queue[bytes] = asyncio.Queue(WS_SEND_QUEUE)
            self.ws_queues[call_id] = queue
            sender = self.loop.create_task(_ws_send(ws, queue))
            self.engine.ws_start(call_id)
            async for frame in ws:
                if frame.type == aiohttp.WSMsgType.BINARY:
                    self.engine.ws_audio(call_id, frame.data)
                    while not self.engine.ws_room(call_id):
                        await asyncio.sleep(TICK_SECONDS)  # backpressure on the peer
                elif frame.type == aiohttp.WSMsgType.ERROR:
                    reason = f"error: {ws.exception()}"
                    break
            if sender.done() and not sender.cancelled() and sender.exception() is not None:
                reason = f"error: {sender.exception()}"
        finally:
            if sender is not None:
                sender.cancel()
            if self.ws_queues.get(call_id) is not None and self.ws_tasks.get(call_id) is me:
                del self.ws_queues[call_id]
            if ws is not None and not ws.closed:
                try:
                    await asyncio.shield(ws.close())
                except (Exception, asyncio.CancelledError):
                    pass
            if self.ws_tasks.get(call_id) is me:  # not released or replaced meanwhile
                del self.ws_tasks[call_id]
                self.send_events(self.engine.ws_closed(call_id, reason))

    def send_ws(self, frames: list[tuple[str, bytes]]) -> None:
        queues = self.ws_queues
        for call_id, data in frames:
            queue = queues.get(call_id)
            if queue is not None and not queue.full():
                queue.put_nowait(data)

    # ------------------------------------------------------------ RTP plane

    def on_rtp(self, call_id: str, data: bytes, addr: tuple[str, int]) -> None:
        packets, events = self.engine.receive_rtp(call_id, data, addr, time.monotonic())
        self.send_packets(packets)
        self.send_events(events)

    def watch_rtp(self) -> None:
        """Read the RTP sockets whenever one has data (see `_rtp_ready`)."""
        if not self._watching:
            self.loop.add_reader(self.rtp.fileno(), self._rtp_ready)
            self._watching = True

    def unwatch_rtp(self) -> None:
        if self._watching:
            self.loop.remove_reader(self.rtp.fileno())
            self._watching = False
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None

    def _read_interval(self) -> float:
        """How often the sockets are read: RELAY_POLL_SECONDS while a leg is bridged."""
        return RELAY_POLL_SECONDS if self.engine.relaying else POLL_SECONDS

    def _rtp_ready(self) -> None:
        """A leg's socket has data: read the ready sockets now if the last read was at
        least POLL_SECONDS (RELAY_POLL_SECONDS while legs are bridged) ago; otherwise
        stop watching until that interval is over, so the packets arriving meanwhile are
        read together."""
        wait = self._last_poll + self._read_interval() - time.monotonic()
        if wait <= 0:
            self._poll_safe()
            return
        self.unwatch_rtp()
        self._poll_timer = self.loop.call_later(wait, self._poll_due)

    def _poll_due(self) -> None:
        """The interval's read. While it finds packets the next read stays on the
        timer: a steady stream (phones' 20 ms clocks are not in step, so packets arrive
        all through a tick) costs one timer a read, not also a wake-up on readiness and
        the reader removed and added again (two `epoll_ctl`). A read that finds nothing
        goes back to waiting on readiness."""
        self._poll_timer = None
        if self._poll_safe():
            self._poll_timer = self.loop.call_later(
                max(self._read_interval(), LOOP_TIMER_SECONDS), self._poll_due)  # fmt: skip
        else:
            self.watch_rtp()

    def _poll_safe(self) -> int:
        """`poll_rtp`, its failure logged: how many datagrams it read."""
        try:
            return self.poll_rtp()
        except Exception:
            log.exception("RTP poll failed")
            return 0

    def poll_rtp(self) -> int:
        """Every datagram waiting on the legs' RTP sockets (only those the epoll set
        reports ready), through the engine a buffer at a time
        (`MediaEngine.receive_batch`: one kernel pass, Python only for the packets that
        need it); returns how many. What bridged legs relay leaves right after each
        pass, in one compiled send loop: relayed audio waits for no tick."""
        rtp = self.rtp
        engine = self.engine
        self._last_poll = time.monotonic()
        total = 0
        while True:
            n = rtp.recv()
            if n == 0:
                return total
            total += n
            self.send_pass(*engine.receive_batch(
                rtp.buf, rtp.lens, rtp.names, rtp.rows, n, time.monotonic()
            ))  # fmt: skip
            if n < rtp.buf.shape[0]:
                return total

    def send_pass(self, packets: list[Packet], events: list[MediaEvent]) -> None:
        """What a receive pass leaves: its relayed packets (`engine.relay`, at once), any
        other packets, its events."""
        if self.engine.relay.n:
            self.send_batch(self.engine.relay)
        if packets:
            self.send_packets(packets)
        if events:
            self.send_events(events)

    def send_tx(self) -> None:
        """The tick's prompt packets (`engine.tx`): `send_batch`."""
        self.send_batch(self.engine.tx)

    def send_batch(self, tx: TxBatch) -> None:
        """A batch of packets (the tick's prompt frames, a receive pass's relayed ones),
        in one call: `sendmmsg` for legs on the shared port, a compiled sendto loop from
        each per-leg socket (`RtpSockets.send`); legs on asyncio endpoints (IPv6) the
        per-packet way."""
        if tx.n == 0:
            return
        self.send_unsent(tx, self.rtp.send(tx.data, tx.lens, tx.rows, tx.ips, tx.ports, tx.n))

    def send_unsent(self, tx: TxBatch, unsent: np.ndarray) -> None:
        """The packets of `tx` the compiled send loop left (a leg on an asyncio endpoint,
        or a failed sendto): the per-packet way."""
        if unsent.size == 0:
            return
        by_row = self.engine.legs_by_row
        packets: list[Packet] = []
        for k in unsent.tolist():
            leg = by_row.get(int(tx.rows[k]))
            if leg is not None and leg.call_id in self.transports and leg.remote is not None:
                packets.append((leg.call_id, tx.packet(k), leg.remote))
        self.send_packets(packets)

    def send_packets(self, packets: list[Packet]) -> None:
        get = self.rtp.get
        transports = self.transports
        for call_id, data, addr in packets:
            sock = get(call_id)
            try:
                if sock is not None:
                    sock.sendto(data, addr)
                else:
                    transport = transports.get(call_id)
                    if transport is not None:
                        transport.sendto(data, addr)
            except (OSError, ValueError) as exc:
                # One bad destination (or a full buffer) must not cost the other calls.
                log.debug("RTP send for %s to %s failed: %s", call_id, addr, exc)

    def send_rtcp(self, packets: list[Packet]) -> None:
        shared = self.rtp.shared_calls
        for call_id, data, addr in packets:
            transport = (self.shared_rtcp if call_id in shared
                         else self.rtcp_transports.get(call_id))
            if transport is not None:
                try:
                    transport.sendto(data, addr)
                except (OSError, ValueError) as exc:
                    log.debug("RTCP send for %s to %s failed: %s", call_id, addr, exc)

    async def tick_loop(self) -> None:
        """One clock for every leg: every TICK_SECONDS from a fixed origin, a read of the
        RTP sockets, then one engine tick (playback, detection, recording, RTCP) for all
        legs. Between ticks the sockets are read on readiness (`watch_rtp`)."""
        # time.monotonic(), not loop.time(): uvloop's clock has 1 ms steps.
        origin = time.monotonic()
        self.engine.wall_offset = time.time() - origin
        k = 0
        while True:
            k += 1
            target = origin + k * TICK_SECONDS
            if self.relay_loop_ok():
                await self.relay_until(target)
            else:
                await self.sleep_until(target)
            self._poll_safe()
            now = time.monotonic()
            late = now - target
            if late > TICK_SECONDS:
                # Skip the missed ticks: the engine's fixed-origin pacing catches up.
                skip_to = int((now - origin) / TICK_SECONDS)
                self.ticks_skipped += skip_to - k
                k = skip_to
                target = origin + k * TICK_SECONDS
            self.tick_late_max = max(self.tick_late_max, late)
            self.tick_late.append(late)
            try:
                packets, events = self.engine.tick_batch(target)
                self.send_tx()
                self.send_packets(packets)
                self.send_events(events)
                if self.engine.ws.outgoing:
                    self.send_ws(self.engine.ws.drain())
                self.send_rtcp(self.engine.rtcp_due(target))
                self.announce_ports()
                self.send_released()
                if self.plays_starting:
                    self.time_play_starts()
            except Exception:
                log.exception("tick failed")
            self.tick_busy.append(time.monotonic() - now)

    def relay_loop_ok(self) -> bool:
        """Whether the time to the next tick goes to the compiled loop (`workers.rtploop`):
        while legs are bridged, unless a leg's media is on the event loop (an IPv6 leg's
        asyncio endpoint, a WebSocket bridge), which would wait for the loop's turn."""
        return (self.relay_loop is not None and self.engine.relaying and self.engine.kernels
                and not self.transports and not self.ws_tasks)  # fmt: skip

    def leave_relay_loop(self) -> None:
        """Back from the compiled loop (if it ran): the event loop watches the RTP sockets
        again, and their epoll set no longer holds the DEALER's fd."""
        if self.relay_loop is not None and self.relay_loop.active:
            self.relay_loop.stop()
        if not self._watching and self._poll_timer is None:
            self.watch_rtp()  # neither on readiness nor on the timer: back to readiness

    async def sleep_until(self, target: float) -> None:
        """Until the tick at `target` on the event loop, which reads the RTP sockets
        meanwhile (out of the compiled loop, if it ran)."""
        self.leave_relay_loop()
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def relay_until(self, target: float) -> None:
        """Until the tick at `target`: the RTP sockets read, and bridged legs relayed, by
        the compiled loop; back here for what needs Python, and to give the event loop a
        turn whenever the front sent something (or a signal came). The loop does not watch
        the RTP sockets meanwhile."""
        loop = self.relay_loop
        assert loop is not None
        self.unwatch_rtp()
        engine = self.engine
        rtp = self.rtp
        while True:
            if not self.dealer.quiet():
                # A message from the front waits for the event loop (its signal on the
                # fd spent already, or a drain scheduled): its turn before any wait.
                await asyncio.sleep(0)
                if time.monotonic() >= target:
                    return
                continue
            reason = rtploop.CONTROL
            try:
                reason = loop.wait(target, engine)
                if loop.deferred():
                    self.send_pass(*engine.finish_deferred(
                        loop.dbuf, loop.dlens, loop.drows, loop.dat, loop.deferred()))
                    loop.clear_deferred()
                if reason == rtploop.PASS:
                    n = int(loop.last[rtploop.LAST_N])
                    rtp.passed(n)
                    self.send_pass(*engine.finish_batch(
                        rtp.buf, rtp.lens, rtp.rows, n, float(loop.at[0]),
                        int(loop.last[rtploop.LAST_SEEN]),
                    ))  # fmt: skip
                elif reason == rtploop.SENT:
                    engine.relay.n = int(loop.last[rtploop.LAST_N])
                    engine.record_relayed()
                    self.send_unsent(engine.relay,
                                     rtp.unsent(int(loop.last[rtploop.LAST_UNSENT])))
            except Exception:
                loop.clear_deferred()
                log.exception("RTP relay loop failed: the event loop reads until the tick")
                reason = rtploop.FAILED
            # The event loop's turn: the DEALER's reader, RTCP, timers (the heartbeat); and
            # after a send, the reader's EVENTS check (pbx.broker), before the next wait.
            # At least once a tick: the tick loop itself never waits in this mode.
            await asyncio.sleep(0)
            if reason == rtploop.DEADLINE:
                return
            if reason == rtploop.FAILED or not self.relay_loop_ok():
                await self.sleep_until(target)
                return

    def time_play_starts(self) -> None:
        """After a tick: the prompts whose first frame it sent (a few per tick, not per
        packet)."""
        sent_at = time.monotonic()
        for call_id, (play_id, since) in list(self.plays_starting.items()):
            started = self.engine.prompt_started(call_id, play_id)
            if started is None:
                del self.plays_starting[call_id]
            elif started:
                del self.plays_starting[call_id]
                self.play_start_ms.append((sent_at - since) * 1000.0)

    async def heartbeat_loop(self) -> None:
        media = self.settings.media
        while True:
            await asyncio.sleep(media.heartbeat_ms / 1000.0)
            counts, last = self.counts(), self._reported
            self._reported = counts
            ports = self.ports_message()
            self.pool.changed = self._announce_due = False  # the heartbeat announces them
            self.send(
                MediaHeartbeat(
                    worker_id=self.worker_id,
                    calls=len(self.engine),
                    capacity=media.capacity,
                    rtp_ip=media.rtp_ip,
                    ports=ports.ports,
                    allocate_seq=ports.allocate_seq,
                    refused=ports.refused,
                    shared_port=ports.shared_port,
                    tick_late_ms_max=round(self.tick_late_max * 1000.0, 3),
                    rtp_foreign_dropped=counts.rtp_foreign_dropped - last.rtp_foreign_dropped,
                    rtcp_foreign_dropped=counts.rtcp_foreign_dropped - last.rtcp_foreign_dropped,
                    rtp_packets_received=counts.rtp_received - last.rtp_received,
                    rtp_packets_sent=counts.rtp_sent - last.rtp_sent,
                    dtmf_flood_dropped=counts.presses_dropped - last.presses_dropped,
                    **self.timing_histograms(),
                    **self.tick_stats(),
                )
            )
            self.tick_late_max = 0.0
            if self.pool.exhausted:
                self.refill_soon()  # the range may have room again

    def counts(self) -> EngineTotals:
        """The engine's totals, with the strangers on the shared ports (no leg's)."""
        totals = self.engine.totals()
        return totals._replace(
            rtp_foreign_dropped=totals.rtp_foreign_dropped + self.rtp.foreign,
            rtcp_foreign_dropped=totals.rtcp_foreign_dropped + self.shared_rtcp_foreign)

    def timing_histograms(self) -> dict[str, Any]:
        """Tick lateness and play-to-first-RTP since the last heartbeat, as bucket counts
        (call before `tick_stats`, which starts the next period)."""
        late_ms = [late * 1000.0 for late in self.tick_late]
        plays, self.play_start_ms = self.play_start_ms, []
        return {
            "tick_late_buckets": timing_buckets(late_ms),
            "tick_late_sum_ms": round(sum(late_ms), 3),
            "play_start_buckets": timing_buckets(plays),
            "play_start_sum_ms": round(sum(plays), 3),
        }

    def tick_stats(self) -> dict[str, Any]:
        """Tick lateness / work percentiles since the last call (for the heartbeat)."""
        late, busy = sorted(self.tick_late), sorted(self.tick_busy)
        self.tick_late, self.tick_busy = [], []
        skipped, self.ticks_skipped = self.ticks_skipped, 0

        def pct(xs: list[float], q: float) -> float:
            return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000.0, 3) if xs else 0.0

        return {
            "tick_late_ms_p50": pct(late, 0.50),
            "tick_late_ms_p99": pct(late, 0.99),
            "tick_busy_ms_p99": pct(busy, 0.99),
            "ticks": len(late),
            "ticks_skipped": skipped,
        }

    async def run(self) -> None:
        endpoint = self.settings.zmq.media_endpoint
        self.dealer.connect(self.settings.zmq, endpoint)
        self.relay_loop = rtploop.RelayLoop(self.rtp, self.dealer.fileno())
        log.info("media worker %s connected to %s%s", self.worker_id, endpoint,
                 " (CURVE)" if self.settings.zmq.curve else "")
        media = self.settings.media
        self.bind_shared()
        await self.open_shared_rtcp()
        self.pool.fill(media.capacity, media.port_pool)
        if self.pool.exhausted:
            log.warning("only %d of %d RTP port pairs free in %s: the pool refills as ports "
                        "come free", len(self.pool), self.pool.size, media.rtp_ports)
        self.send(MediaReady(worker_id=self.worker_id, capacity=media.capacity,
                             rtp_ip=media.rtp_ip))
        self.send(self.ports_message())
        self.pool.changed = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._stopping.set)
        self.watch_rtp()
        tasks = [
            asyncio.create_task(self.tick_loop()),
            asyncio.create_task(self.heartbeat_loop()),
        ]
        stop = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop and task.exception() is not None:
                log.error("worker task failed", exc_info=task.exception())
        self.dealer.stop_reading()  # no command starts anything from here on
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.unwatch_rtp()
        for call_id in list(self.engine.legs):
            self.stop_ws(call_id)
            self.engine.remove_leg(call_id, time.monotonic())  # finishes recordings
        self.send_released()  # what the last tick did not send
        if self._http is not None:
            await self._http.close()
        for transport in [*self.transports.values(), *self.rtcp_transports.values()]:
            transport.close()
        if self.shared_rtcp is not None:
            self.shared_rtcp.close()
        if self.relay_loop is not None:
            self.relay_loop.stop()
        self.rtp.close()
        self.pool.close()
        await self.dealer.flushed(0.5)  # what waits for room, bounded as LINGER is
        self.dealer.close()
        self.ctx.term()
        log.info("media worker %s stopped", self.worker_id)


def timing_buckets(samples_ms: list[float]) -> list[int]:
    """Counts of `samples_ms` per bucket of MEDIA_TIMING_BOUNDS_MS (a sample on a bound
    is in that bucket, as Prometheus' `le`), the last bucket for beyond."""
    counts = [0] * TIMING_BUCKETS
    for sample in samples_ms:
        counts[bisect_left(MEDIA_TIMING_BOUNDS_MS, sample)] += 1
    return counts


async def _ws_send(ws: aiohttp.ClientWebSocketResponse, queue: asyncio.Queue[bytes]) -> None:
    while True:
        data = await queue.get()
        await ws.send_bytes(data)


def _log_task_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task failed", exc_info=task.exception())


def destination_refused(remote_ip: str, local_ip: str) -> str | None:
    """Why this worker (on `local_ip`) must not send a leg's RTP to `remote_ip`, or None.
    The address comes from a stranger's SDP: one of the other family would be sent to
    as 0.0.0.0 (this host), a loopback one reaches this host's own UDP services, a
    multicast or broadcast one everybody's. Loopback is a peer's own address only on a
    worker that is on loopback itself (a test, a one-host setup)."""
    try:
        remote = ipaddress.ip_address(remote_ip)
        local = ipaddress.ip_address(local_ip)
    except ValueError:
        return "not an IP address"
    if remote.version != local.version:
        return f"not an IPv{local.version} address, as the worker's"
    if remote.is_multicast or remote.is_unspecified or remote_ip == "255.255.255.255":
        return "not a unicast address"
    if remote.is_loopback and not local.is_loopback:
        return "a loopback address, and the worker is not on loopback"
    return None


def batch_scheduling(on: bool) -> bool:
    """`[media] sched_batch`: the calling thread (and the threads it starts later: the
    ZeroMQ I/O thread, the event loop's executor) runs under SCHED_BATCH, which a
    wake-up never lets preempt the thread running on its core (sched(7)). A worker that
    did took the core from whoever sent its packets (on loopback, the phones; on a host,
    the other processes) for the first one or two of a burst, slept, and was woken for
    the next: at 100 bridged calls on this 2-core machine ~4,500 wake-ups a second for
    1,000 sending instants, against ~1,000 as a batch thread (perf/README.md, "Batch
    scheduling"). An idle core still runs it at once. Returns whether the policy is set;
    a refusal (a seccomp profile, say) is logged and the worker runs on as an ordinary
    thread."""
    if not on or not hasattr(os, "SCHED_BATCH"):
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as e:
        log.warning("[media] sched_batch: SCHED_BATCH refused (%s); an ordinary thread", e)
        return False
    return True


async def _amain(settings: Settings) -> None:
    worker = MediaWorker(settings, f"media-{socket.gethostname()}-{os.getpid()}")
    await worker.run()


def main() -> None:
    settings = start_program("pbx-media", "client")
    flushed = cachestamp.refresh()
    if flushed:
        log.info("kernel sources changed: compiling %s afresh", ", ".join(flushed))
    g711.warm()
    inband.warm()
    rtpbatch.warm()
    rtpio.warm()
    rtploop.warm()
    vad.warm()
    import uvloop

    # The compiled kernels leave a large heap of long-lived objects (numba, llvmlite):
    # frozen, the cyclic collector's full passes no longer walk it every few seconds
    # (a tenth of the worker's time at 1,000 calls, perf/README "Shared RTP port").
    gc.collect()
    gc.freeze()
    batch_scheduling(settings.media.sched_batch)
    uvloop.run(_amain(settings))


if __name__ == "__main__":
    main()

"""Media worker process: the asyncio shell around `media.engine.MediaEngine`.

    pbx-media            (or: python -m workers.media)

Connects a DEALER socket (identity `media-<hostname>-<pid>`) to the front's
media ROUTER, says MediaReady once its kernels are warm, heartbeats, and
turns front commands into engine calls. Each call leg gets its own UDP socket
on an even port of `[media] rtp_ports` (a random start, so several workers
sharing the range rarely collide; a taken port is skipped). One tick loop
runs every 20 ms from a fixed origin and hands the engine the nominal tick
time; a late tick skips ahead instead of running the missed ones back to back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import sys
from typing import Any

import zmq
import zmq.asyncio

from media import g711
from media.engine import EngineError, MediaEngine, Packet
from media.prompts import PromptCache
from pbx.config import ConfigError, Settings, load_config
from pbx.messages import (
    MediaAllocate,
    MediaAllocated,
    MediaBridge,
    MediaDtmfInfo,
    MediaEvent,
    MediaHeartbeat,
    MediaPlay,
    MediaReady,
    MediaRelease,
    MediaRemote,
    MediaStop,
    MediaTimer,
    MessageError,
    decode,
    encode,
)

log = logging.getLogger("pbx.media")

TICK_SECONDS = 0.020


class _RtpProtocol(asyncio.DatagramProtocol):
    def __init__(self, worker: MediaWorker, call_id: str) -> None:
        self.worker = worker
        self.call_id = call_id

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.worker.on_rtp(self.call_id, data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a peer that is gone: nothing to do but note it.
        log.debug("call %s: RTP socket error: %s", self.call_id, exc)


class MediaWorker:
    def __init__(self, settings: Settings, worker_id: str) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.engine = MediaEngine(PromptCache(settings.media.sounds_dir))
        self.transports: dict[str, asyncio.DatagramTransport] = {}
        self.tick_late_max = 0.0
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, worker_id.encode())
        self.sock.setsockopt(zmq.LINGER, 500)
        self.loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------ front plane

    def send(self, msg: Any) -> None:
        fut: Any = self.sock.send(encode(msg))  # an asyncio Future on a zmq.asyncio socket
        fut.add_done_callback(_log_send_error)

    def send_events(self, events: list[MediaEvent]) -> None:
        for ev in events:
            self.send(ev)

    async def recv_loop(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if not frames:
                continue
            try:
                msg = decode(frames[-1])
            except MessageError as exc:
                log.warning("ignoring malformed frame from the front: %s", exc)
                continue
            try:
                await self.handle(msg)
            except EngineError as exc:
                log.warning("%s: %s", type(msg).__name__, exc)
            except Exception:
                log.exception("error handling %s", type(msg).__name__)

    async def handle(self, msg: Any) -> None:
        now = self.loop.time()
        engine = self.engine
        if isinstance(msg, MediaAllocate):
            self.allocate(msg)
        elif isinstance(msg, MediaRemote):
            engine.set_remote(msg)
        elif isinstance(msg, MediaPlay):
            self.send_events(engine.play(msg, now))
        elif isinstance(msg, MediaStop):
            engine.stop(msg.call_id)
        elif isinstance(msg, MediaTimer):
            engine.set_timer(msg, now)
        elif isinstance(msg, MediaBridge):
            engine.bridge(msg.call_id, msg.peer_call_id)
        elif isinstance(msg, MediaDtmfInfo):
            self.send_events(engine.dtmf_info(msg, now))
        elif isinstance(msg, MediaRelease):
            released = engine.remove_leg(msg.call_id)
            transport = self.transports.pop(msg.call_id, None)
            if transport is not None:
                transport.close()
            self.send(released)
        else:
            log.warning("ignoring %s: not for a media worker", type(msg).__name__)

    def allocate(self, msg: MediaAllocate) -> None:
        media = self.settings.media
        if msg.call_id in self.engine.legs:
            leg = self.engine.legs[msg.call_id]
            self.send(
                MediaAllocated(call_id=msg.call_id, rtp_ip=media.rtp_ip, rtp_port=leg.local_port)
            )
            return
        if len(self.engine) >= media.capacity:
            self.send(MediaAllocated(call_id=msg.call_id, error="worker at capacity"))
            return
        sock = bind_rtp_socket(media.rtp_ip, *media.port_range)
        if sock is None:
            self.send(
                MediaAllocated(call_id=msg.call_id, error=f"no free RTP port in {media.rtp_ports}")
            )
            return
        port = sock.getsockname()[1]
        self.engine.add_leg(msg.call_id, port, msg.inband_dtmf)
        # The socket is bound, so the endpoint is created without awaiting a bind.
        task = self.loop.create_task(self._open_endpoint(msg.call_id, sock))
        task.add_done_callback(_log_task_error)
        self.send(MediaAllocated(call_id=msg.call_id, rtp_ip=media.rtp_ip, rtp_port=port))

    async def _open_endpoint(self, call_id: str, sock: socket.socket) -> None:
        transport, _ = await self.loop.create_datagram_endpoint(
            lambda: _RtpProtocol(self, call_id), sock=sock
        )
        if call_id not in self.engine.legs:  # released before the endpoint was up
            transport.close()
            return
        self.transports[call_id] = transport

    # ------------------------------------------------------------ RTP plane

    def on_rtp(self, call_id: str, data: bytes, addr: tuple[str, int]) -> None:
        packets, events = self.engine.receive_rtp(call_id, data, addr, self.loop.time())
        self.send_packets(packets)
        self.send_events(events)

    def send_packets(self, packets: list[Packet]) -> None:
        transports = self.transports
        for call_id, data, addr in packets:
            transport = transports.get(call_id)
            if transport is not None:
                try:
                    transport.sendto(data, addr)
                except (OSError, ValueError) as exc:
                    # One bad destination must not cost the other calls their packets.
                    log.debug("RTP send for %s to %s failed: %s", call_id, addr, exc)

    async def tick_loop(self) -> None:
        loop = self.loop
        origin = loop.time()
        k = 0
        while True:
            k += 1
            target = origin + k * TICK_SECONDS
            delay = target - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = loop.time()
            late = now - target
            if late > TICK_SECONDS:
                # Skip the missed ticks: the engine's fixed-origin pacing catches up.
                k = int((now - origin) / TICK_SECONDS)
                target = origin + k * TICK_SECONDS
            self.tick_late_max = max(self.tick_late_max, late)
            try:
                packets, events = self.engine.tick(target)
                self.send_packets(packets)
                self.send_events(events)
            except Exception:
                log.exception("tick failed")

    async def heartbeat_loop(self) -> None:
        media = self.settings.media
        while True:
            await asyncio.sleep(media.heartbeat_ms / 1000.0)
            self.send(
                MediaHeartbeat(
                    worker_id=self.worker_id,
                    calls=len(self.engine),
                    capacity=media.capacity,
                    tick_late_ms_max=round(self.tick_late_max * 1000.0, 3),
                )
            )
            self.tick_late_max = 0.0

    async def run(self) -> None:
        endpoint = self.settings.zmq.media_endpoint
        self.sock.connect(endpoint)
        log.info("media worker %s connected to %s", self.worker_id, endpoint)
        self.send(MediaReady(worker_id=self.worker_id, capacity=self.settings.media.capacity))
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._stopping.set)
        tasks = [
            asyncio.create_task(self.recv_loop()),
            asyncio.create_task(self.tick_loop()),
            asyncio.create_task(self.heartbeat_loop()),
        ]
        stop = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stop and task.exception() is not None:
                log.error("worker task failed", exc_info=task.exception())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for transport in self.transports.values():
            transport.close()
        self.sock.close()
        self.ctx.term()
        log.info("media worker %s stopped", self.worker_id)


def bind_rtp_socket(
    ip: str, low: int, high: int, rng: random.Random | None = None
) -> socket.socket | None:
    """A non-blocking UDP socket bound to a free even port in [low, high], or None."""
    first = low + (low & 1)
    evens = list(range(first, high + 1, 2))
    if not evens:
        return None
    start = (rng or random).randrange(len(evens))
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for i in range(len(evens)):
        port = evens[(start + i) % len(evens)]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((ip, port))
        except OSError:
            sock.close()
            continue
        sock.setblocking(False)
        return sock
    return None


def _log_send_error(fut: Any) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("send to the front failed: %s", fut.exception())


def _log_task_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("task failed", exc_info=task.exception())


async def _amain(settings: Settings) -> None:
    worker = MediaWorker(settings, f"media-{socket.gethostname()}-{os.getpid()}")
    await worker.run()


def main() -> None:
    try:
        settings = load_config()
    except ConfigError as exc:
        print(f"pbx-media: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(
        level=settings.logging.level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s",
    )
    g711.warm()
    import uvloop

    uvloop.run(_amain(settings))


if __name__ == "__main__":
    main()

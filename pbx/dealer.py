"""A worker's DEALER to the front, driven from the event loop: `FrontDealer`.

The IVR executor (`workers.ivr`) and the media worker (`workers.media`) each talk to the
front through one DEALER socket. It is a plain (blocking-API) socket read and written
from the loop, as the front's own sockets are (`pbx.broker`): zmq.asyncio's Future,
task wake-up and loop iteration per message were 20-40 us of CPU each, and a call is
about ten control messages (issue 9).

Reading is `pbx.broker.ZmqReader`'s (its FD is edge-triggered: a wake-up drains to
EAGAIN, and a send outside the drain gets one EVENTS check per loop iteration, as the
broker does, since the send may have taken the signal of a message that is waiting).
Each message's last frame goes to `on_frame` synchronously (an optional empty delimiter
frame is tolerated); an exception there is logged and the drain goes on.

A send never waits: a message the socket refuses (its queue to the front is full: the
front is gone or stalled) waits in the outbox, in order, and goes out when the socket
takes messages again (retried on every wake-up of the FD, and every `SEND_RETRY_S` as
the safety net for a missed edge), or is dropped with a warning after `send_wait_s`
(by then the front has given the work elsewhere or ended the call, DESIGN §1).
A `droppable` message (a heartbeat: the next one says the same) is never queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import zmq

from pbx import planes
from pbx.broker import DRAIN_BATCH, ZmqReader
from pbx.config import ZmqSettings
from pbx.messages import encode

log = logging.getLogger("pbx.dealer")

# How long a message may wait for room in the socket's queue to the front before it is
# dropped: the front re-sends an unanswered IVR event elsewhere, or ends the call, by
# then (pbx.calls.ivr, IVR_REPLY_MARGIN_S).
SEND_WAIT_S = 15.0
# How often the outbox retries while it waits, besides every wake-up of the socket's FD.
SEND_RETRY_S = 0.05


class FrontDealer:
    """One DEALER socket to the front: its reader, its outbox."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], identity: str,
                 on_frame: Callable[[bytes], None], *, linger_ms: int,
                 send_wait_s: float = SEND_WAIT_S) -> None:
        self.sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, identity.encode())
        self.sock.setsockopt(zmq.LINGER, linger_ms)
        self.on_frame = on_frame
        self.send_wait_s = send_wait_s
        # Messages the socket refused, oldest first: (frame, deadline on the loop's clock).
        self._outbox: deque[tuple[bytes, float]] = deque()
        self._outbox_task: asyncio.Task[None] | None = None
        self._outbox_wake = asyncio.Event()
        self.dropped = 0  # messages dropped after waiting send_wait_s
        self._reader: ZmqReader | None = None

    def connect(self, zs: ZmqSettings, endpoint: str) -> None:
        """Connect to the front (CURVE client when on) and read it in the running loop."""
        planes.configure_client(self.sock, zs, endpoint)
        self.sock.connect(endpoint)
        self._reader = ZmqReader(self.sock, self._read_one, asyncio.get_running_loop(),
                                 DRAIN_BATCH)

    def fileno(self) -> int:
        """The socket's `zmq.FD`: readable when something may have arrived (edge-like:
        only the reader's drain or its EVENTS check rearms it; `workers.rtploop` waits on
        it to give the event loop its turn)."""
        return int(self.sock.getsockopt(zmq.FD))

    def quiet(self) -> bool:
        """Whether nothing from the front waits for the event loop, before a wait on
        `fileno()` outside it (`workers.rtploop`): no drain scheduled or cut short, no
        EVENTS check owed after a send (which may have taken the FD's signal), and no
        message waiting. That last check is an EVENTS, which re-arms the FD; a message
        found waiting gets its drain scheduled."""
        reader = self._reader
        if reader is None or reader.closed:
            return True
        if reader.pending is not None or reader.unchecked or reader.draining:
            return False
        if cast(int, self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            reader.pending = reader.loop.call_soon(reader.drain)
            return False
        return True

    @property
    def waiting(self) -> int:
        """Messages in the outbox."""
        return len(self._outbox)

    def send(self, msg: Any, droppable: bool = False) -> None:
        """Hand `msg` to the socket now, or queue it behind those waiting (module text);
        a `droppable` one is dropped instead while others wait."""
        if self._outbox:
            if not droppable:
                self._queue(encode(msg))
            return
        frame = encode(msg)
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            if not droppable:
                self._queue(frame)
        if self._reader is not None:
            self._reader.sent()

    def _queue(self, frame: bytes) -> None:
        loop = asyncio.get_running_loop()
        if not self._outbox:
            log.warning("the queue to the front is full (the front gone or stalled): "
                        "messages wait up to %g s", self.send_wait_s)
        self._outbox.append((frame, loop.time() + self.send_wait_s))
        if self._outbox_task is None or self._outbox_task.done():
            self._outbox_task = loop.create_task(self._flush_outbox(), name="outbox")

    def _flush(self) -> None:
        """Send what the outbox holds while the socket takes it; drop the expired."""
        now = asyncio.get_running_loop().time()
        outbox = self._outbox
        try:
            while outbox:
                frame, deadline = outbox[0]
                if deadline <= now:
                    outbox.popleft()
                    self.dropped += 1
                    log.warning("dropped a message to the front after %g s without room",
                                self.send_wait_s)
                    continue
                self.sock.send(frame, zmq.NOBLOCK)
                outbox.popleft()
        except zmq.Again:
            pass
        finally:
            if self._reader is not None:
                self._reader.sent()

    async def _flush_outbox(self) -> None:
        """Until the outbox is empty: retry on every wake-up of the socket (room in
        the queue signals its FD) and every SEND_RETRY_S."""
        while self._outbox:
            self._flush()
            if not self._outbox:
                break
            self._outbox_wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox_wake.wait(), SEND_RETRY_S)
        log.info("the queue to the front takes messages again (%d dropped so far)",
                 self.dropped)

    async def flushed(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) for the outbox to empty, e.g. before closing."""
        if self._outbox_task is not None and not self._outbox_task.done():
            await asyncio.wait({self._outbox_task}, timeout=timeout_s)

    def _read_one(self) -> None:
        """One message from the front (zmq.Again if none): its last frame to `on_frame`."""
        if self._outbox:
            self._outbox_wake.set()  # the FD woke us: maybe room to send
        sock = self.sock
        frame = sock.recv(zmq.NOBLOCK)
        while sock.getsockopt(zmq.RCVMORE):
            frame = sock.recv(zmq.NOBLOCK)
        try:
            self.on_frame(frame)
        except Exception:  # one message's failure must not stop the reader
            log.exception("error handling a message from the front")

    def stop_reading(self) -> None:
        """No more messages from the front are handled (shutting down); sending goes on."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def close(self) -> None:
        """Stop reading, drop the outbox; the socket closes with its LINGER."""
        self.stop_reading()
        if self._outbox_task is not None:
            self._outbox_task.cancel()
        self.sock.close()

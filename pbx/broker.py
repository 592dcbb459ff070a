"""The front's ZeroMQ shell: ROUTER sockets for the media and IVR planes, XPUB for events.

Thin: frames in are decoded into message models and handed to callbacks;
messages out are encoded and sent to a worker identity. Worker liveness and
choice live in `pbx.registry` (pure). Who may connect is `pbx.planes`: with CURVE
on, every socket is a CURVE server and the broker answers the ZAP requests
(`ZapPolicy`) on its own context, in the front's event loop; rejected handshakes
are counted in `stats["zmq_auth_rejected"]`.

Plain (blocking-API) sockets driven from the event loop, without zmq.asyncio: that
costs a Future, a task wake-up and a loop iteration per message, about a fifth of
the front's CPU at 200 calls/s (issue 9). Each socket that is read has a `ZmqReader`:
the loop watches the socket's `zmq.FD`, which is edge-triggered (it signals that the
socket's command mailbox went from empty to non-empty, not that a message is there),
and every call into the socket (send, recv, EVENTS) may consume that signal. So:

- a wake-up reads with NOBLOCK until nothing is left (EAGAIN: libzmq processed every
  pending command first, as for EVENTS, so the next arrival signals the FD again);
- a send outside the socket's own drain marks the socket (`ZmqReader.sent`), and once
  per loop iteration (a `call_soon` made by its first such send, so after the handler
  or timer that sent and before the loop next waits) EVENTS is checked, and a drain is
  scheduled if a message is waiting (the sends may have eaten its signal). One check
  per socket per iteration, not per send: each EVENTS makes libzmq process its commands
  (a poll and a getpid), and the front sends ~6 messages per call;
- a drain handles at most `DRAIN_BATCH` messages, then continues on the next loop
  iteration (`call_soon`), so one busy plane cannot starve the other, SIP or timers.

Events go out on an XPUB socket (a PUB whose subscriptions the broker reads: a
subscribe message when a topic gets its first subscriber, an unsubscribe when it loses
its last one, libzmq sending those of a subscriber that disconnects): while no topic
has a subscriber, `publish` neither encodes nor sends (5 events a call, for nobody,
in most deployments). Subscribers see no difference (same CURVE, same frames).

Handlers run synchronously, one message at a time, never re-entered: a handler may
send on either plane (its send never calls a handler; the drain in progress, or one
scheduled, picks up what arrived meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import orjson
import zmq

from pbx import messages
from pbx.config import ZmqSettings
from pbx.planes import ZAP_ENDPOINT, ZapPolicy, configure_server, plane_context

log = logging.getLogger("pbx.broker")

Handler = Callable[[bytes, Any], None]

# Messages one socket handles per loop iteration before the others (the other plane,
# SIP, timers) get their turn: the broker's part is ~5 us a message (perf/bench_broker),
# so the front's handlers set how long a batch takes (a millisecond or two).
DRAIN_BATCH = 64

_MORE = zmq.SNDMORE | zmq.NOBLOCK


class ZmqReader:
    """One socket read from the event loop: wake-ups on its FD, drains after sends."""

    __slots__ = ("sock", "read_one", "loop", "fd", "batch", "draining", "pending", "closed",
                 "unchecked")

    def __init__(self, sock: zmq.Socket[bytes], read_one: Callable[[], None],
                 loop: asyncio.AbstractEventLoop, batch: int) -> None:
        """`read_one` receives (NOBLOCK) and handles one message; zmq.Again if none."""
        self.sock = sock
        self.read_one = read_one
        self.loop = loop
        self.batch = batch
        self.draining = False
        self.closed = False
        self.pending: asyncio.Handle | None = None  # a drain to continue next iteration
        self.unchecked = False  # sent on since the last EVENTS check (or drain)
        self.fd = sock.fileno()  # zmq.FD
        loop.add_reader(self.fd, self.wake)
        # Whatever arrived before the FD was watched has already spent its signal.
        self.pending = loop.call_soon(self.drain)

    def wake(self) -> None:
        if self.pending is None:  # else the scheduled drain is this iteration's turn
            self.drain()

    def drain(self) -> None:
        self.pending = None
        if self.closed:
            return
        self.draining = True
        self.unchecked = False  # the drain's reads end on EAGAIN: commands processed
        try:
            for _ in range(self.batch):
                try:
                    self.read_one()
                except zmq.Again:
                    return  # commands processed, nothing to read: the FD is armed
                except zmq.ZMQError as exc:
                    if not self.closed:
                        log.error("cannot receive: %s", exc)
                    return
                if self.closed:  # a handler closed the broker
                    return
            self.pending = self.loop.call_soon(self.drain)
        finally:
            self.draining = False

    def sent(self) -> None:
        """After a send on this socket: one EVENTS check this loop iteration, whatever
        the number of sends (none inside a drain, which ends on EAGAIN; module text)."""
        if not self.draining and not self.unchecked:
            self.unchecked = True
            self.loop.call_soon(self.check)

    def check(self) -> None:
        """After sends on this socket (`unchecked`): they may have taken the FD's signal
        for a message that is waiting; read it on the next iteration (never from inside
        the sender's call)."""
        self.unchecked = False
        if self.closed or self.draining or self.pending is not None:
            return  # the drain running (or the one scheduled) reads it
        if cast(int, self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            self.pending = self.loop.call_soon(self.drain)

    def close(self) -> None:
        self.closed = True
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        if not self.loop.is_closed():
            self.loop.remove_reader(self.fd)


class Broker:
    def __init__(self, settings: ZmqSettings) -> None:
        """Binds the three sockets. `pbx.planes.prepare(settings, "front")` must have run
        (private IPC directories, keys present)."""
        self.settings = settings
        # A context of its own: the ZAP handler's endpoint is one per context.
        self.ctx = plane_context(settings)
        self.stats: dict[str, int] = {"zmq_auth_rejected": 0}
        self.zap: zmq.Socket[bytes] | None = None
        self.zap_policy: ZapPolicy | None = None
        if settings.curve:
            # Bound before any CURVE socket: without a handler libzmq accepts every key.
            self.zap = self.ctx.socket(zmq.REP)
            self.zap.setsockopt(zmq.LINGER, 0)
            self.zap.bind(ZAP_ENDPOINT)
            self.zap_policy = ZapPolicy.from_settings(settings)
        self.media = self._router("media")
        self.ivr = self._router("ivr")
        self.events = self.ctx.socket(zmq.XPUB)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.setsockopt(zmq.SNDHWM, 100_000)
        configure_server(self.events, settings, "events")
        self.events.bind(settings.events_endpoint)
        self._readers: list[ZmqReader] = []
        self._media_reader: ZmqReader | None = None
        self._ivr_reader: ZmqReader | None = None
        self._events_reader: ZmqReader | None = None
        # Topics with a subscriber (subscribe +1, unsubscribe -1: libzmq passes only the
        # first and the last of each topic): events are encoded and sent while > 0.
        self.subscribed_topics = 0

    def _router(self, plane: str) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Sending to a worker that has gone must fail loudly, not vanish.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        configure_server(sock, self.settings, plane)
        sock.bind(self.settings.endpoints()[plane])
        return sock

    def start(self, on_media: Handler, on_ivr: Handler,
              stats: dict[str, int] | None = None) -> None:
        """Receive on both planes (and answer ZAP requests) in the running loop; `stats`,
        if given, becomes the dict the broker counts into (the front's, so /metrics
        shows it)."""
        if stats is not None:
            stats.update(self.stats)
            self.stats = stats
        loop = asyncio.get_running_loop()
        if self.zap is not None:
            zap = self.zap
            self._readers.append(ZmqReader(zap, lambda: self._authenticate(zap), loop,
                                         DRAIN_BATCH))
        self._media_reader = ZmqReader(self.media, _plane_reader(self.media, on_media, "media"),
                                     loop, DRAIN_BATCH)
        self._ivr_reader = ZmqReader(self.ivr, _plane_reader(self.ivr, on_ivr, "ivr"), loop,
                                   DRAIN_BATCH)
        self._events_reader = ZmqReader(self.events, self._read_subscription, loop,
                                      DRAIN_BATCH)
        self._readers += [self._media_reader, self._ivr_reader, self._events_reader]

    def _read_subscription(self) -> None:
        """One (un)subscription from the events socket; zmq.Again if none waits. A
        subscriber may send anything: what is not a subscription is ignored."""
        sock = self.events
        frame = sock.recv(zmq.NOBLOCK)
        while sock.getsockopt(zmq.RCVMORE):
            sock.recv(zmq.NOBLOCK)
        if frame[:1] == b"\x01":
            self.subscribed_topics += 1
        elif frame[:1] == b"\x00" and self.subscribed_topics > 0:
            self.subscribed_topics -= 1

    def _authenticate(self, zap: zmq.Socket[bytes]) -> None:
        """One ZAP request (RFC 27) answered; zmq.Again if none waits."""
        assert self.zap_policy is not None
        request = zap.recv_multipart(zmq.NOBLOCK)
        reply, refused = self.zap_policy.answer(request)
        if refused is not None:
            self.stats["zmq_auth_rejected"] += 1
            address = request[3][:64].decode(errors="replace") if len(request) > 3 else "?"
            log.warning("refused a connection from %s: %s", address, refused)
        try:
            # REP: the reply goes to the one requester (libzmq's session, over an inproc
            # pipe without a high-water mark); the drain re-reads after it.
            zap.send_multipart(reply, zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.error("cannot answer a ZAP request: %s", exc)

    def _send(self, sock: zmq.Socket[bytes], reader: ZmqReader | None, identity: bytes,
              msg: Any) -> bool:
        """False when the send fails at once: EHOSTUNREACH for a worker that is not (or
        no longer) connected, under ROUTER_MANDATORY; EAGAIN for a full queue. Both are
        decided on the identity frame; the payload frame then always goes."""
        payload = messages.encode(msg)
        try:
            # Two sends, not send_multipart: a quarter of the cost (pyzmq's checks).
            sock.send(identity, _MORE)
        except zmq.ZMQError as exc:
            log.warning("cannot send %s to %r: %s", msg.kind, identity, exc)
            sent = False
        else:
            sock.send(payload, zmq.NOBLOCK)
            sent = True
        if reader is not None:
            reader.sent()
        return sent

    def send_media(self, identity: bytes, msg: Any) -> bool:
        return self._send(self.media, self._media_reader, identity, msg)

    def send_ivr(self, identity: bytes, msg: Any) -> bool:
        return self._send(self.ivr, self._ivr_reader, identity, msg)

    def has_subscribers(self) -> bool:
        """Whether a published event reaches anyone (a topic has a subscriber)."""
        return self.subscribed_topics > 0

    def publish(self, event: dict[str, Any]) -> None:
        if not self.subscribed_topics:
            return  # nobody would receive it
        try:
            self.events.send(orjson.dumps(event), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # no subscriber room: live events are best effort
        if self._events_reader is not None:
            self._events_reader.sent()

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        self._readers = []
        self._media_reader = self._ivr_reader = self._events_reader = None
        # The CURVE sockets go first: the ZAP handler outlives every socket it guards.
        for sock in (self.media, self.ivr, self.events, self.zap):
            if sock is not None:
                sock.close(0)
        self.ctx.term()


def _plane_reader(sock: zmq.Socket[bytes], handler: Handler, plane: str
                  ) -> Callable[[], None]:
    """Receives one message of a plane's ROUTER (zmq.Again if none), decodes it and
    calls `handler(identity, message)`; a malformed one is logged and dropped."""

    def read_one() -> None:
        # A ROUTER delivers the sender's identity, then the message's frames, all at
        # once: the second recv always has a frame (recv, not recv_multipart: half the
        # cost).
        identity = sock.recv(zmq.NOBLOCK)
        payload = sock.recv(zmq.NOBLOCK)
        if sock.getsockopt(zmq.RCVMORE):
            frames = 2
            while sock.getsockopt(zmq.RCVMORE):
                sock.recv(zmq.NOBLOCK)
                frames += 1
            log.warning("%s plane: dropped a message of %d frames", plane, frames)
            return
        try:
            msg = messages.decode(payload)
        except messages.MessageError as exc:
            log.warning("%s plane: bad frame from %r: %s", plane, identity, exc)
            return
        try:
            handler(identity, msg)
        except Exception:
            log.exception("%s plane: handling %s from %r failed", plane, msg.kind, identity)

    return read_one

"""The front's ZeroMQ shell: ROUTER sockets for the media and IVR planes, PUB for events.

Thin: frames in are decoded into message models and handed to callbacks;
messages out are encoded and sent to a worker identity. Worker liveness and
choice live in `pbx.registry` (pure). Who may connect is `pbx.planes`: with CURVE
on, every socket is a CURVE server and the broker answers the ZAP requests
(`ZapPolicy`) on its own context, in the front's event loop; rejected handshakes
are counted in `stats["zmq_auth_rejected"]`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
import zmq
import zmq.asyncio

from pbx import messages
from pbx.config import ZmqSettings
from pbx.planes import ZAP_ENDPOINT, ZapPolicy, configure_server

log = logging.getLogger("pbx.broker")

Handler = Callable[[bytes, Any], None]


class Broker:
    def __init__(self, settings: ZmqSettings) -> None:
        """Binds the three sockets. `pbx.planes.prepare(settings, "front")` must have run
        (private IPC directories, keys present)."""
        self.settings = settings
        # A context of its own: the ZAP handler's endpoint is one per context.
        self.ctx = zmq.asyncio.Context()
        self.stats: dict[str, int] = {"zmq_auth_rejected": 0}
        self.zap: zmq.asyncio.Socket | None = None
        self.zap_policy: ZapPolicy | None = None
        if settings.curve:
            # Bound before any CURVE socket: without a handler libzmq accepts every key.
            self.zap = self.ctx.socket(zmq.REP)
            self.zap.setsockopt(zmq.LINGER, 0)
            self.zap.bind(ZAP_ENDPOINT)
            self.zap_policy = ZapPolicy.from_settings(settings)
        self.media = self._router("media")
        self.ivr = self._router("ivr")
        self.events = self.ctx.socket(zmq.PUB)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.setsockopt(zmq.SNDHWM, 100_000)
        configure_server(self.events, settings, "events")
        self.events.bind(settings.events_endpoint)
        self._tasks: list[asyncio.Task[None]] = []

    def _router(self, plane: str) -> zmq.asyncio.Socket:
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
        """Receive on both planes (and answer ZAP requests); `stats`, if given, becomes
        the dict the broker counts into (the front's, so /metrics shows it)."""
        if stats is not None:
            stats.update(self.stats)
            self.stats = stats
        self._tasks = [
            asyncio.create_task(self._receive(self.media, on_media, "media")),
            asyncio.create_task(self._receive(self.ivr, on_ivr, "ivr")),
        ]
        if self.zap is not None:
            self._tasks.append(asyncio.create_task(self._authenticate(self.zap)))

    async def _authenticate(self, zap: zmq.asyncio.Socket) -> None:
        assert self.zap_policy is not None
        while True:
            request = await zap.recv_multipart()
            reply, refused = self.zap_policy.answer(request)
            if refused is not None:
                self.stats["zmq_auth_rejected"] += 1
                address = request[3][:64].decode(errors="replace") if len(request) > 3 else "?"
                log.warning("refused a connection from %s: %s", address, refused)
            await zap.send_multipart(reply)

    async def _receive(self, sock: zmq.asyncio.Socket, handler: Handler, plane: str) -> None:
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 2:
                log.warning("%s plane: dropped a message of %d frames", plane, len(frames))
                continue
            identity, payload = frames
            try:
                msg = messages.decode(payload)
            except messages.MessageError as exc:
                log.warning("%s plane: bad frame from %r: %s", plane, identity, exc)
                continue
            try:
                handler(identity, msg)
            except Exception:
                log.exception("%s plane: handling %s from %r failed", plane, msg.kind, identity)

    def _send(self, sock: zmq.asyncio.Socket, identity: bytes, msg: Any) -> bool:
        try:
            sent = sock.send_multipart([identity, messages.encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("cannot send %s to %r: %s", msg.kind, identity, exc)
            return False
        # A zmq.asyncio socket does not raise: a send that failed at once (EHOSTUNREACH
        # for a worker that has gone, under ROUTER_MANDATORY; EAGAIN for a full queue)
        # is the exception of the Future it returns, which must be looked at here.
        if isinstance(sent, asyncio.Future):
            if not sent.done():
                sent.add_done_callback(lambda f: _late_failure(f, msg.kind, identity))
            elif not sent.cancelled() and sent.exception() is not None:
                log.warning("cannot send %s to %r: %s", msg.kind, identity, sent.exception())
                return False
        return True

    def send_media(self, identity: bytes, msg: Any) -> bool:
        return self._send(self.media, identity, msg)

    def send_ivr(self, identity: bytes, msg: Any) -> bool:
        return self._send(self.ivr, identity, msg)

    def publish(self, event: dict[str, Any]) -> None:
        try:
            self.events.send(orjson.dumps(event), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # no subscriber room: live events are best effort

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        # The CURVE sockets go first: the ZAP handler outlives every socket it guards.
        for sock in (self.media, self.ivr, self.events, self.zap):
            if sock is not None:
                sock.close(0)
        self.ctx.term()


def _late_failure(sent: asyncio.Future[Any], kind: str, identity: bytes) -> None:
    """A queued send that failed later: logged (the Future's exception is retrieved)."""
    if not sent.cancelled() and sent.exception() is not None:
        log.warning("cannot send %s to %r: %s", kind, identity, sent.exception())

"""The front's ZeroMQ shell: ROUTER sockets for the media and IVR planes, PUB for events.

Thin: frames in are decoded into message models and handed to callbacks;
messages out are encoded and sent to a worker identity. Worker liveness and
choice live in `pbx.registry` (pure).
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

log = logging.getLogger("pbx.broker")

Handler = Callable[[bytes, Any], None]


class Broker:
    def __init__(self, settings: ZmqSettings) -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.media = self._router(settings.media_endpoint)
        self.ivr = self._router(settings.ivr_endpoint)
        self.events = self.ctx.socket(zmq.PUB)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.setsockopt(zmq.SNDHWM, 100_000)
        self.events.bind(settings.events_endpoint)
        self._tasks: list[asyncio.Task[None]] = []

    def _router(self, endpoint: str) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Sending to a worker that has gone must fail loudly, not vanish.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.bind(endpoint)
        return sock

    def start(self, on_media: Handler, on_ivr: Handler) -> None:
        self._tasks = [
            asyncio.create_task(self._receive(self.media, on_media, "media")),
            asyncio.create_task(self._receive(self.ivr, on_ivr, "ivr")),
        ]

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
        for sock in (self.media, self.ivr, self.events):
            sock.close(0)


def _late_failure(sent: asyncio.Future[Any], kind: str, identity: bytes) -> None:
    """A queued send that failed later: logged (the Future's exception is retrieved)."""
    if not sent.cancelled() and sent.exception() is not None:
        log.warning("cannot send %s to %r: %s", kind, identity, sent.exception())

"""The front's side of a plane in tests of a worker's DEALER (`pbx.dealer`): a plain
ROUTER, read from the running loop so that the worker under test keeps running."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import zmq

from pbx.messages import decode


def router(ctx: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    return sock


async def receive(sock: zmq.Socket[bytes], until: Callable[[list[tuple[bytes, Any]]], bool],
                  timeout_s: float = 10.0) -> list[tuple[bytes, Any]]:
    """(identity, decoded last frame) of each message from the workers until `until(got)`;
    AssertionError after `timeout_s`."""
    got: list[tuple[bytes, Any]] = []
    deadline = time.monotonic() + timeout_s
    while not until(got):
        assert time.monotonic() < deadline, (
            f"gave up after {[type(msg).__name__ for _, msg in got]}")
        try:
            identity, *frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            await asyncio.sleep(0.005)
            continue
        got.append((identity, decode(frames[-1])))
    return got

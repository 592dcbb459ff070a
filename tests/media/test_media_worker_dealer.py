"""The media worker's DEALER to the front without zmq.asyncio (`pbx.dealer.FrontDealer`):
the worker runs in this process (its real `run`), a plain ROUTER in the test is the front.

- the front gone: what the worker says waits in order, heartbeats are not queued, and
  past the bound the waiting messages are dropped; the worker carries on either way;
- the socket's FD is edge-triggered: a command that arrives while the worker sends
  (the send takes the FD's signal) is still read, without another message to wake it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop
import zmq

from pbx.config import Settings, parse_config
from pbx.messages import (
    MediaAllocate,
    MediaAllocated,
    MediaHeartbeat,
    MediaPorts,
    MediaReady,
    MediaRelease,
    MediaReleased,
    encode,
)
from pbx.planes import ensure_private_dir
from tests.zmq_front import receive, router
from workers.media import MediaWorker

# Above the kernel's ephemeral range, and not the other worker tests' (test_portpool).
LOW = 61000 + 2 * (os.getpid() % 400)
HIGH = LOW + 19  # 10 pairs
HEARTBEAT_MS = 50

Scenario = Callable[[Settings, str, zmq.Socket[bytes]], Coroutine[Any, Any, None]]


def run(tmp_path: Path, scenario: Scenario) -> None:
    """`scenario(settings, endpoint, front)`: the front's ROUTER made but not bound."""
    assert ensure_private_dir(tmp_path / "zmq") is None
    endpoint = f"ipc://{tmp_path / 'zmq' / 'media'}"
    settings = parse_config(
        f'[zmq]\nmedia_endpoint = "{endpoint}"\n'
        f'[media]\nrtp_ip = "127.0.0.1"\nrtp_ports = "{LOW}-{HIGH}"\nport_pool = 4\n'
        f'capacity = 8\nheartbeat_ms = {HEARTBEAT_MS}\nsounds_dir = "{tmp_path}"\n'
        f'recordings_dir = "{tmp_path}"\nvoicemail_dir = "{tmp_path}"\n'
        f'[logging]\ndir = "{tmp_path}"\n')
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()

    async def main() -> None:
        front = router(ctx)
        try:
            await scenario(settings, endpoint, front)
        finally:
            front.close()

    try:
        uvloop.run(asyncio.wait_for(main(), 30.0))
    finally:
        ctx.term()


@contextlib.asynccontextmanager
async def running(settings: Settings, send_wait_s: float | None = None,
                  tiny_queue: bool = False) -> AsyncIterator[MediaWorker]:
    """The worker's `run` in this loop: connected, MediaReady and MediaPorts sent (or
    waiting) on entry; stopped as SIGTERM does on exit."""
    worker = MediaWorker(settings, "media-test")
    if tiny_queue:  # before `run` connects: the pipe to the front holds a message or two
        worker.dealer.sock.setsockopt(zmq.SNDHWM, 1)
    if send_wait_s is not None:
        worker.dealer.send_wait_s = send_wait_s
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.2)
    try:
        yield worker
    finally:
        worker._stopping.set()
        await asyncio.wait_for(task, 5.0)


def said(got: list[tuple[bytes, Any]]) -> list[Any]:
    """The messages but heartbeats and port announcements."""
    return [m for _, m in got if not isinstance(m, MediaHeartbeat | MediaPorts)]


def has(kind: type) -> Callable[[list[tuple[bytes, Any]]], bool]:
    return lambda got: any(isinstance(m, kind) for _, m in got)


def test_front_gone_messages_wait_in_order_and_heartbeats_do_not(tmp_path: Path) -> None:
    async def scenario(settings: Settings, endpoint: str, front: zmq.Socket[bytes]) -> None:
        async with running(settings, send_wait_s=10.0, tiny_queue=True) as worker:
            # No front: commands handled meanwhile (as if they had come just before it
            # went) are answered into the outbox; the loop goes on (a send never waits).
            for k, port in enumerate(worker.pool.ports()[:3], start=1):
                worker.handle(MediaAllocate(call_id=f"c{k}", rtp_port=port, seq=k))
            for k in (1, 2, 3):
                worker.handle(MediaRelease(call_id=f"c{k}"))
                await asyncio.sleep(0.05)  # a tick each: three MediaReleased
            waiting = worker.dealer.waiting
            assert waiting >= 3, waiting
            await asyncio.sleep(5 * HEARTBEAT_MS / 1000.0)  # heartbeats: not queued
            assert worker.dealer.waiting == waiting
            assert len(worker.engine) == 0 and worker.dealer.dropped == 0

            front.bind(endpoint)  # the front comes (back): everything, in order
            got = said(await receive(front, lambda g: len(said(g)) == 4))
            assert isinstance(got[0], MediaReady)
            assert [(type(m), [leg.call_id for leg in m.legs]) for m in got[1:]] == [
                (MediaReleased, ["c1"]), (MediaReleased, ["c2"]), (MediaReleased, ["c3"])]
            # (allocations are not answered: the announcements confirm them)
            assert worker.dealer.waiting == 0 and worker.dealer.dropped == 0

    run(tmp_path, scenario)


def test_front_gone_past_the_bound_messages_are_dropped_and_the_worker_goes_on(
        tmp_path: Path) -> None:
    async def scenario(settings: Settings, endpoint: str, front: zmq.Socket[bytes]) -> None:
        async with running(settings, send_wait_s=0.3, tiny_queue=True) as worker:
            port = worker.pool.ports()[0]
            stranger = next(p for p in range(LOW, HIGH, 2) if p not in worker.pool.ports())
            worker.handle(MediaAllocate(call_id="c1", rtp_port=port, seq=1))
            for seq in range(2, 6):  # refused (not in the pool): four answers
                worker.handle(MediaAllocate(call_id=f"r{seq}", rtp_port=stranger, seq=seq))
            queued = worker.dealer.waiting
            assert queued >= 4, queued
            started = time.monotonic()
            while worker.dealer.waiting and time.monotonic() - started < 5.0:
                await asyncio.sleep(0.02)  # the loop is not blocked meanwhile
            assert worker.dealer.waiting == 0 and worker.dealer.dropped >= queued

            front.bind(endpoint)  # the front learns the pool from the next heartbeat
            got = await receive(front, has(MediaHeartbeat))
            (beat,) = [m for _, m in got if isinstance(m, MediaHeartbeat)]
            assert beat.calls == 1 and beat.allocate_seq == 5
            front.send_multipart([b"media-test", encode(MediaRelease(call_id="c1"))])
            got = await receive(front, has(MediaReleased))
            assert [leg.call_id for _, m in got if isinstance(m, MediaReleased)
                    for leg in m.legs] == ["c1"]

    run(tmp_path, scenario)


def test_a_command_arriving_while_the_worker_sends_is_read(tmp_path: Path) -> None:
    """The front's command reaches the worker's socket while the loop is busy; the
    worker then sends (its send processes the socket's commands and takes the FD's
    signal of the arrival) before the loop looks at the FD. Nothing else arrives after:
    only the worker's check after its send can find the command."""
    async def scenario(settings: Settings, endpoint: str, front: zmq.Socket[bytes]) -> None:
        front.bind(endpoint)
        async with running(settings) as worker:
            got = await receive(front, has(MediaPorts))
            assert isinstance(got[0][1], MediaReady)
            # Allocations of a port not in the pool: each answered at once (a refusal).
            stranger = next(p for p in range(LOW, HIGH, 2) if p not in worker.pool.ports())
            for k in (1, 2, 3):
                call_id = f"c{k}"
                # Synchronous from here to the await: the worker's loop cannot run.
                front.send_multipart([b"media-test", encode(
                    MediaAllocate(call_id=call_id, rtp_port=stranger, seq=k))])
                time.sleep(0.1)  # in the worker's pipe, its socket's mailbox signalled
                worker.send(worker.ports_message())  # takes the signal
                got = await receive(front, has(MediaAllocated), timeout_s=3.0)
                (allocated,) = [m for _, m in got if isinstance(m, MediaAllocated)]
                assert allocated.call_id == call_id and allocated.error is not None

    run(tmp_path, scenario)


def test_quiet_owns_up_to_a_send_and_to_a_message_waiting(tmp_path: Path) -> None:
    """Before the compiled relay loop (`workers.rtploop`) waits on the DEALER's fd outside
    the event loop, `quiet` says whether the loop owes the front's plane a turn: after a
    send (the EVENTS check the send may need), and for a message that arrived while the
    worker was busy (found by EVENTS, which re-arms the fd: its drain is scheduled)."""
    async def scenario(settings: Settings, endpoint: str, front: zmq.Socket[bytes]) -> None:
        front.bind(endpoint)
        async with running(settings) as worker:
            await receive(front, has(MediaPorts))
            dealer = worker.dealer

            async def settled() -> bool:  # heartbeats send too: quiet between them
                for _ in range(100):
                    if dealer.quiet():
                        return True
                    await asyncio.sleep(0.002)
                return False

            assert await settled()
            worker.send(worker.ports_message())
            assert not dealer.quiet()  # the check owed after the send
            assert await settled()
            stranger = next(p for p in range(LOW, HIGH, 2) if p not in worker.pool.ports())
            front.send_multipart([b"media-test", encode(
                MediaAllocate(call_id="q1", rtp_port=stranger, seq=1))])
            time.sleep(0.1)  # in the worker's socket; the loop has not run since
            assert not dealer.quiet()  # found waiting: its drain is scheduled
            got = await receive(front, has(MediaAllocated), timeout_s=3.0)
            (allocated,) = [m for _, m in got if isinstance(m, MediaAllocated)]
            assert allocated.call_id == "q1"

    run(tmp_path, scenario)

"""The executor's DEALER without zmq.asyncio (workers.ivr): it reads in the event loop,
and a message the socket refuses (its queue to the front full: the front gone) waits in
order, bounded in time, without blocking the loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop
import zmq

from pbx.config import load_config
from pbx.ivr.provider import ProviderClient
from pbx.messages import CallEndedInput, IvrEvent, IvrHeartbeat, IvrReply, encode
from pbx.planes import ensure_private_dir
from tests.zmq_front import receive
from tests.zmq_front import router as front_router
from workers.ivr import Executor

Ctx = zmq.Context[zmq.Socket[bytes]]


def run(coro: Coroutine[Any, Any, None], timeout_s: float = 30.0) -> None:
    uvloop.run(asyncio.wait_for(coro, timeout_s))


def endpoint_config(tmp_path: Path) -> tuple[str, Path]:
    assert ensure_private_dir(tmp_path / "zmq") is None
    endpoint = f"ipc://{tmp_path / 'zmq' / 'ivr'}"
    config = tmp_path / "pbx.toml"
    config.write_text(f'[zmq]\nivr_endpoint = "{endpoint}"\n[logging]\ndir = "{tmp_path}"\n')
    return endpoint, config


def reply(seq: int) -> IvrReply:
    return IvrReply(session_id="s1", seq=seq, state=f'{{"n":{seq}}}', step_index=0)


def executor_with_tiny_queue(ctx: Ctx, config: Path, send_wait_s: float) -> Executor:
    executor = Executor(load_config(str(config)), ctx, ProviderClient(), "ivr-test",
                        send_wait_s=send_wait_s)
    executor.dealer.sock.setsockopt(zmq.SNDHWM, 1)
    executor.connect()
    return executor


def count(n: int) -> Callable[[list[Any]], bool]:
    return lambda got: len(got) == n


def test_replies_wait_for_room_in_order_and_heartbeats_do_not(tmp_path: Path) -> None:
    endpoint, config = endpoint_config(tmp_path)
    ctx: Ctx = zmq.Context()

    async def main() -> None:
        executor = executor_with_tiny_queue(ctx, config, send_wait_s=10.0)
        router = front_router(ctx)
        try:
            # No front yet: the socket takes a message or two, the outbox the rest, and
            # the loop goes on (send never waits).
            for seq in range(1, 7):
                executor.send(reply(seq))
            waiting = executor.dealer.waiting
            assert waiting >= 4, waiting
            executor.send(IvrHeartbeat(executor_id="ivr-test", busy=0, capacity=1))
            assert executor.dealer.waiting == waiting  # not queued behind replies

            router.bind(endpoint)  # the front comes (back)
            got = await receive(router, count(6))
            assert [msg.seq for _, msg in got] == [1, 2, 3, 4, 5, 6]
            assert executor.dealer.waiting == 0 and executor.dealer.dropped == 0

            # It reads from the front too: an event (after an empty delimiter frame),
            # here one the executor cannot handle (no state), is answered.
            event = IvrEvent(session_id="s2", seq=3, input=CallEndedInput())
            router.send_multipart([b"ivr-test", b"", encode(event)])
            ((identity, answer),) = await receive(router, count(1))
            assert identity == b"ivr-test"
            assert isinstance(answer, IvrReply) and answer.seq == 3 and answer.done
        finally:
            executor.close()
            router.close()

    try:
        run(main())
    finally:
        ctx.term()


def test_a_reply_without_room_is_dropped_after_the_bound(tmp_path: Path) -> None:
    endpoint, config = endpoint_config(tmp_path)
    ctx: Ctx = zmq.Context()

    async def main() -> None:
        executor = executor_with_tiny_queue(ctx, config, send_wait_s=0.3)
        router = front_router(ctx)
        try:
            for seq in range(1, 6):
                executor.send(reply(seq))
            queued = executor.dealer.waiting
            taken = 5 - queued
            assert queued >= 3, queued
            started = time.monotonic()
            while executor.dealer.waiting and time.monotonic() - started < 5.0:
                await asyncio.sleep(0.02)  # the loop is not blocked meanwhile
            assert executor.dealer.waiting == 0
            assert executor.dealer.dropped == queued
            assert 0.25 <= time.monotonic() - started < 2.0

            router.bind(endpoint)  # only what the socket had taken arrives
            got = await receive(router, count(taken))
            assert [msg.seq for _, msg in got] == list(range(1, taken + 1))
            executor.send(reply(9))  # and new replies go again
            ((_, late),) = await receive(router, count(1))
            assert late.seq == 9
        finally:
            executor.close()
            router.close()

    try:
        run(main())
    finally:
        ctx.term()

"""Issue 10 item 5: `/start` is handled before the session's first step, for every
session, against a real provider process that takes its time in `/start` and runs
requests concurrently (tests/ivr/order_provider.py). 1,000 sessions, 100 at a time,
through the executor's event handling (`workers.ivr.handle_event`) and its real HTTP
client; loopback only, every wait bounded."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pbx.config import IvrAppParams
from pbx.ivr.provider import ProviderClient
from pbx.messages import CallInfo, IvrEvent, SessionStartInput
from workers.ivr import handle_event

ROOT = Path(__file__).resolve().parents[2]
SESSIONS = 1000
AT_ONCE = 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "the order provider did not start"
            time.sleep(0.05)


async def _sessions(url: str) -> None:
    gate = asyncio.Semaphore(AT_ONCE)
    params = IvrAppParams(url=url)

    async with ProviderClient() as client:
        async def one(i: int) -> None:
            call = CallInfo(call_id=f"c{i}", session_id=f"s{i}", caller="1001",
                            callee="*99", route_name="r", params=params)
            event = IvrEvent(session_id=f"s{i}", seq=1, state=None,
                             input=SessionStartInput(call=call))
            async with gate:
                reply = await handle_event(event, client, time.time)
            assert reply.done, reply  # the provider's hang-up was executed

        await asyncio.gather(*(one(i) for i in range(SESSIONS)))


def test_start_is_handled_before_the_first_step_in_1000_sessions() -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ivr.order_provider", str(port), "10"], cwd=ROOT)
    try:
        _wait_listening(port)
        asyncio.run(asyncio.wait_for(_sessions(f"http://127.0.0.1:{port}/ivr/step"), 240))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/log", timeout=10) as resp:
            records = json.load(resp)
    finally:
        proc.terminate()
        proc.wait(10)
    started: set[str] = set()
    inversions = []
    steps = 0
    for record in records:
        if record[0] == "start":
            started.add(record[1])
        else:
            steps += 1
            if record[1] not in started:
                inversions.append(record[1])
    assert steps == SESSIONS
    assert len(started) == SESSIONS
    assert inversions == [], f"{len(inversions)} sessions' first step before /start"

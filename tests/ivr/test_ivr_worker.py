"""workers/ivr.py: in-process error handling, and the real process over ZeroMQ + HTTP.

Loopback only, every wait bounded.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq
import zmq.asyncio
from aiohttp import web

from pbx.config import IvrAppParams
from pbx.ivr import session as session_module
from pbx.ivr.phases import Phase
from pbx.ivr.provider import ProviderClient
from pbx.ivr.state import SessionState
from pbx.messages import (
    MAX_IVR_STATE_CHARS,
    CallInfo,
    DtmfDigit,
    HangupCommand,
    IvrEvent,
    IvrHeartbeat,
    IvrReady,
    IvrReply,
    MediaInput,
    PlayCommand,
    SessionStartInput,
    TransferCommand,
    decode,
    encode,
)
from workers.ivr import handle_event

ROOT = Path(__file__).resolve().parents[2]

WELCOME_MENU = {
    "type": "prompt",
    "file": "sounds/ivr/welcome.wav",
    "interruptible": True,
    "next": {
        "type": "dtmf_menu",
        "greeting": "sounds/ivr/menu.wav",
        "entries": {"1": {"type": "transfer", "target": "2001"}},
    },
}


def run(coro: Any, timeout_s: float = 30.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


def test_internal_error_is_answered_with_hangup() -> None:
    # A media event without a state cannot be handled: the reply still comes, with a
    # hang-up, instead of an exception.
    event = IvrEvent(
        session_id="s1", seq=7, state=None, input=MediaInput(event=DtmfDigit(digit="1"))
    )

    async def main() -> IvrReply:
        async with ProviderClient() as client:
            return await handle_event(event, client, lambda: 1.0)

    reply = run(main())
    assert reply.seq == 7 and reply.done
    assert len(reply.commands) == 1 and isinstance(reply.commands[0], HangupCommand)


class Provider:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.seen.append((request.path, body))
        answer: dict[str, Any] = {"status": "ok"}
        if request.path == "/ivr/step":
            answer = (
                WELCOME_MENU if body["event"]["type"] == "session_start" else {"type": "hangup"}
            )
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/ivr/step"

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    def paths(self) -> list[str]:
        return [path for path, _ in self.seen]

    async def wait_for(self, path: str, timeout_s: float = 5.0) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            for p, body in self.seen:
                if p == path:
                    return body
            assert asyncio.get_running_loop().time() < deadline, f"{path} not seen: {self.paths()}"
            await asyncio.sleep(0.02)


def _first_step_after_slow_start(start_s: float) -> tuple[list[str], float]:
    """One session against a provider whose /start takes `start_s`: the order of the
    provider's events ("<path>" when a request arrives, "<path> done" when its answer
    leaves) and how long the session's first event took."""

    class SlowStart(Provider):
        def __init__(self) -> None:
            super().__init__()
            self.order: list[str] = []

        async def handle(self, request: web.Request) -> web.Response:
            self.order.append(request.path)
            if request.path.endswith("/start"):
                await asyncio.sleep(start_s)
            response = await super().handle(request)
            self.order.append(f"{request.path} done")
            return response

    async def main() -> tuple[list[str], float]:
        provider = SlowStart()
        await provider.start()
        try:
            call = CallInfo(call_id="c1", session_id="s1", caller="1001", callee="*99",
                            route_name="r", params=IvrAppParams(url=provider.url))
            event = IvrEvent(session_id="s1", seq=1, state=None,
                             input=SessionStartInput(call=call))
            async with ProviderClient(notify_timeout_ms=500) as client:
                started = asyncio.get_running_loop().time()
                await handle_event(event, client, lambda: 1.0)
                took_s = asyncio.get_running_loop().time() - started
            return provider.order, took_s
        finally:
            await provider.stop()

    result: tuple[list[str], float] = run(main())
    return result


def test_a_state_that_cannot_be_dumped_is_answered_from_the_step_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A Step's state is written only for the reply (machine.Step): when that fails
    # (here: the welcome prompt's), the error path answers from the Step before it
    # (waiting for the provider) with the error prompt and a hang-up, the failed Step's
    # commands left out, as when every Step wrote its state at once; not an exception
    # that sends no reply at all.
    real_session_state = session_module.session_state

    def session_state(envelope: Any, data: Any) -> Any:
        if data.phase is Phase.PROMPT:
            raise ValueError("cannot dump the prompt phase")
        return real_session_state(envelope, data)

    monkeypatch.setattr(session_module, "session_state", session_state)

    async def main() -> IvrReply:
        provider = Provider()
        await provider.start()
        try:
            call = CallInfo(call_id="c1", session_id="s1", caller="1001", callee="*99",
                            route_name="r", params=IvrAppParams(url=provider.url))
            event = IvrEvent(session_id="s1", seq=1, state=None,
                             input=SessionStartInput(call=call))
            async with ProviderClient() as client:
                return await handle_event(event, client, lambda: 1.0)
        finally:
            await provider.stop()

    reply = run(main())
    assert orjson.loads(reply.state)["phase"] == "closing"
    assert [c.file for c in reply.commands if isinstance(c, PlayCommand)] == [
        "sounds/error.wav"]
    assert [t.step_index for t in reply.traces] == [1]
    assert "ValueError" in (reply.traces[0].error or "")


@pytest.mark.parametrize("state", [
    '{"v": 1, "phase": "prompt"',  # not JSON
    '["prompt"]',  # JSON, not an object
    '{"v": 1, "phase": "prompt", "call": {}}',  # an object, not a session state
])
def test_a_state_the_executor_cannot_read_ends_the_session_on_it(state: str) -> None:
    # As with a state object it could not read (protocol 4): a bare hang-up, the state
    # handed back as it came; the reply's own fields say nothing was read of it.
    event = IvrEvent(session_id="s1", seq=4, state=state,
                     input=MediaInput(event=DtmfDigit(digit="1")))

    async def main() -> IvrReply:
        async with ProviderClient() as client:
            return await handle_event(event, client, lambda: 1.0)

    reply = run(main())
    assert reply.done and reply.seq == 4
    assert reply.commands == [HangupCommand(reason="Error(internal error: ValidationError)")]
    assert (reply.state, reply.step_index, reply.end_reason) == (state, 0, None)


def test_the_state_is_read_from_its_text_and_written_as_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The executor parses the event's text straight into SessionState and writes the
    # reply's straight from it (no dict on the way: model_validate / model_dump would
    # fail here), and says the state's step_index and end_reason in the reply.
    def no_dict(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the state went through a dict")

    monkeypatch.setattr(SessionState, "model_validate", no_dict)
    monkeypatch.setattr(SessionState, "model_dump", no_dict)

    async def main() -> tuple[IvrReply, IvrReply]:
        provider = Provider()
        await provider.start()
        try:
            call = CallInfo(call_id="c1", session_id="s1", caller="1001", callee="*99",
                            route_name="r", params=IvrAppParams(url=provider.url))
            async with ProviderClient() as client:
                start = await handle_event(
                    IvrEvent(session_id="s1", seq=1, input=SessionStartInput(call=call)),
                    client, lambda: 1.0)
                digit = await handle_event(
                    IvrEvent(session_id="s1", seq=2, state=start.state,
                             input=MediaInput(event=DtmfDigit(digit="1", stopped_play_id=1))),
                    client, lambda: 2.0)
            return start, digit
        finally:
            await provider.stop()

    start, digit = run(main())
    assert isinstance(start.state, str) and not start.done
    written = orjson.loads(start.state)
    assert written["phase"] == "prompt"
    assert (start.step_index, start.end_reason) == (written["step_index"], None)
    assert start.step_index == 1
    assert digit.done and digit.commands == [TransferCommand(target="2001")]
    assert (digit.step_index, digit.end_reason) == (2, "Transfer(2001)")
    assert orjson.loads(digit.state)["end_reason"] == "Transfer(2001)"


def test_an_extra_too_long_for_the_state_is_an_invalid_reply_that_travels() -> None:
    # Kept in the state, it would make it over MAX_IVR_STATE_CHARS, which the front
    # refuses: the action is refused first (the error prompt), and the reply travels.
    huge = {"type": "prompt", "file": "sounds/ivr/welcome.wav",
            "extra": {"blob": "x" * MAX_IVR_STATE_CHARS}}

    class HugeAction(Provider):
        async def handle(self, request: web.Request) -> web.Response:
            await request.read()
            answer = huge if request.path == "/ivr/step" else {"status": "ok"}
            return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def main() -> IvrReply:
        provider = HugeAction()
        await provider.start()
        try:
            call = CallInfo(call_id="c1", session_id="s1", caller="1001", callee="*99",
                            route_name="r", params=IvrAppParams(url=provider.url))
            async with ProviderClient() as client:
                return await handle_event(
                    IvrEvent(session_id="s1", seq=1, input=SessionStartInput(call=call)),
                    client, lambda: 1.0)
        finally:
            await provider.stop()

    reply = run(main())
    assert [c.file for c in reply.commands if isinstance(c, PlayCommand)] == [
        "sounds/error.wav"]
    assert "larger than" in (reply.traces[-1].error or "")
    assert len(reply.state) < MAX_IVR_STATE_CHARS and "x" * 100 not in reply.state
    assert decode(encode(reply)) == reply  # the front takes it


def test_first_step_waits_for_the_answer_to_start() -> None:
    """A provider that resets its session on /start (the upstream document's skeleton)
    must never handle the session's first step before /start, even when /start is
    slow and the provider runs requests concurrently (DESIGN §3)."""
    order, took_s = _first_step_after_slow_start(0.3)
    assert order[:3] == ["/ivr/step/start", "/ivr/step/start done", "/ivr/step"], order
    assert 0.3 <= took_s < 0.5, took_s


def test_a_start_that_never_answers_delays_the_first_step_by_its_timeout_only() -> None:
    order, took_s = _first_step_after_slow_start(5.0)
    assert order[:2] == ["/ivr/step/start", "/ivr/step"], order
    # /start's own timeout (500 ms), then the step: the call goes on.
    assert 0.45 <= took_s < 1.5, took_s


async def recv(
    router: zmq.asyncio.Socket, kind: type, timeout_s: float = 10.0
) -> tuple[bytes, Any]:
    """Next message of `kind` from the executor (others, e.g. heartbeats, skipped)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        assert remaining > 0, f"no {kind.__name__} within {timeout_s} s"
        if await router.poll(timeout=int(remaining * 1000)) == 0:
            continue
        identity, *frames = await router.recv_multipart()
        msg = decode(frames[-1])
        if isinstance(msg, kind):
            return identity, msg


def test_executor_process_answers_session_start(tmp_path: Path) -> None:
    async def main() -> None:
        provider = Provider()
        await provider.start()
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        config = tmp_path / "pbx.toml"
        config.write_text(
            f'[zmq]\nivr_endpoint = "tcp://127.0.0.1:{port}"\n'
            '[ivr]\nheartbeat_ms = 100\ncapacity = 7\n[logging]\nlevel = "DEBUG"\n'
        )
        stderr = open(tmp_path / "stderr.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "workers.ivr"],
            cwd=ROOT,
            env={**os.environ, "PBX_CONFIG": str(config)},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        try:
            identity, ready = await recv(router, IvrReady)
            assert ready.capacity == 7
            assert identity.decode() == ready.executor_id
            assert ready.executor_id.startswith("ivr-") and ready.executor_id.endswith(
                f"-{proc.pid}"
            )
            _, beat = await recv(router, IvrHeartbeat)
            assert beat.busy == 0 and beat.capacity == 7

            # A bad frame is dropped; the process carries on.
            await router.send_multipart([identity, b"not json"])

            call = CallInfo(
                call_id="c1",
                session_id="s1",
                caller="1001",
                callee="*99",
                route_name="step_ivr",
                params=IvrAppParams(url=provider.url),
            )
            start = IvrEvent(session_id="s1", seq=1, input=SessionStartInput(call=call))
            await router.send_multipart([identity, encode(start)])
            _, reply = await recv(router, IvrReply)
            assert reply.seq == 1 and not reply.done
            assert reply.commands == [
                PlayCommand(play_id=1, file="sounds/ivr/welcome.wav", interruptible=True)
            ]
            assert reply.traces and reply.traces[0].trigger == "session_start"
            step = await provider.wait_for("/ivr/step")
            assert step["event"] == {"type": "session_start"}
            assert (await provider.wait_for("/ivr/step/start"))["session_id"] == "s1"

            # The state came back with the reply; the next event carries it.
            digit = IvrEvent(
                session_id="s1",
                seq=2,
                state=reply.state,
                input=MediaInput(event=DtmfDigit(digit="1", stopped_play_id=1)),
            )
            await router.send_multipart([identity, encode(digit)])
            _, reply2 = await recv(router, IvrReply)
            assert reply2.seq == 2 and reply2.done
            assert reply2.commands == [TransferCommand(target="2001")]
            assert (await provider.wait_for("/ivr/step/dtmf-match"))["digit"] == "1"
            assert (await provider.wait_for("/ivr/step/end"))["reason"] == "Transfer(2001)"
            assert provider.paths().count("/ivr/step") == 1

            proc.send_signal(signal.SIGTERM)
            rc = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 10)
            assert rc == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            stderr.close()
            router.close()
            ctx.term()
            await provider.stop()
        log = (tmp_path / "stderr.log").read_text()
        assert "dropping bad frame" in log
        assert "Traceback" not in log

    run(main(), timeout_s=40.0)


def test_executor_bad_config_exits_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "workers.ivr"],
        cwd=ROOT,
        env={**os.environ, "PBX_CONFIG": str(tmp_path / "missing.toml")},
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert b"missing.toml" in proc.stderr and b"cannot read" in proc.stderr


def test_when_even_the_abort_fails_the_last_resort_hangs_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An internal error, then an abort that fails too: the reply is a bare hang-up on a
    state the front takes ("{}": none was ever written), done."""
    from pbx.ivr import machine
    from workers import ivr as ivr_worker

    async def broken(*_: object, **__: object) -> IvrReply:
        raise RuntimeError("boom")

    def abort_fails(*_: object, **__: object) -> None:
        raise RuntimeError("abort boom")

    monkeypatch.setattr(ivr_worker, "process_event", broken)
    monkeypatch.setattr(machine, "abort", abort_fails)
    call = CallInfo(call_id="c1", session_id="s1", caller="1001", callee="*99",
                    route_name="r", params=IvrAppParams(url="http://127.0.0.1:1/ivr"))

    async def main() -> IvrReply:
        async with ProviderClient() as client:
            return await handle_event(
                IvrEvent(session_id="s1", seq=1, input=SessionStartInput(call=call)),
                client, lambda: 1.0)

    reply = run(main())
    assert reply.done and reply.state == "{}"
    assert [type(c) for c in reply.commands] == [HangupCommand]
    assert reply.commands[0].reason == "Error(internal error: RuntimeError)"
    assert decode(encode(reply)) == reply

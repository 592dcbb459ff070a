"""ProviderClient against a real aiohttp server on 127.0.0.1 (ephemeral port)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from pbx.config import IvrAppParams, RetrySettings
from pbx.ivr.provider import ProviderClient

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Server:
    def __init__(self, handler: Handler) -> None:
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.handler = handler
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def _record(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.path, dict(request.headers), orjson.loads(body)))
        return await self.handler(request)

    async def __aenter__(self) -> Server:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._record)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    def params(self, **retry: Any) -> IvrAppParams:
        return IvrAppParams(
            url=f"http://127.0.0.1:{self.port}/ivr/step",
            headers={"Authorization": "Bearer t"},
            retry=RetrySettings.model_validate({"max_retries": 3, "timeout_ms": 200, **retry}),
        )


def run(coro: Awaitable[None], timeout_s: float = 15.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, timeout_s)

    asyncio.run(bounded())


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


BODY = {"session_id": "s1", "event": {"type": "session_start"}}


def test_success_sends_headers_and_body() -> None:
    async def handler(request: web.Request) -> web.Response:
        return json_response({"type": "hangup"})

    async def main() -> None:
        async with Server(handler) as server, ProviderClient() as client:
            result = await client.step(server.params(), BODY)
            assert result.outcome == "ok"
            assert result.body == {"type": "hangup"}
            assert result.attempts == 1 and result.status == 200
            path, headers, body = server.requests[0]
            assert path == "/ivr/step"
            assert headers["Content-Type"] == "application/json"
            assert headers["Authorization"] == "Bearer t"
            assert body == BODY

    run(main())


def test_timeout_then_success() -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(1.0)  # past the 200 ms per-request timeout
        return json_response({"type": "hangup"})

    async def main() -> None:
        async with Server(handler) as server, ProviderClient() as client:
            t0 = time.monotonic()
            result = await client.step(server.params(), BODY)
            elapsed = time.monotonic() - t0
            assert result.outcome == "ok" and result.attempts == 2
            assert 0.25 <= elapsed < 0.9  # one timeout (0.2 s) + 0.1 s pause + answer
            assert len(server.requests) == 2

    run(main())


def test_5xx_until_retries_exhausted_gives_fallback() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=503)

    async def main() -> None:
        async with Server(handler) as server, ProviderClient() as client:
            t0 = time.monotonic()
            result = await client.step(server.params(max_retries=2), BODY)
            elapsed = time.monotonic() - t0
            assert result.outcome == "fallback"
            assert result.attempts == 3 and result.status == 503
            assert "HTTP 503" in result.reason
            assert len(server.requests) == 3
            assert elapsed >= 0.2  # two 100 ms pauses between the three attempts

    run(main())


def test_4xx_gives_fallback_at_once() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=404)

    async def main() -> None:
        async with Server(handler) as server, ProviderClient() as client:
            result = await client.step(server.params(), BODY)
            assert result.outcome == "fallback"
            assert result.attempts == 1 and result.status == 404
            assert len(server.requests) == 1

    run(main())


def test_invalid_json_is_reported() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="<html>oops</html>", content_type="text/html")

    async def main() -> None:
        async with Server(handler) as server, ProviderClient() as client:
            result = await client.step(server.params(), BODY)
            assert result.outcome == "invalid"
            assert "not JSON" in result.reason
            assert len(server.requests) == 1

    run(main())


def test_connection_refused_retries_then_fallback() -> None:
    async def handler(request: web.Request) -> web.Response:
        return json_response({})

    async def main() -> None:
        async with Server(handler) as server:
            params = server.params(max_retries=1)
        # The server is gone: nothing listens on that port any more.
        async with ProviderClient() as client:
            result = await client.step(params, BODY)
            assert result.outcome == "fallback"
            assert result.attempts == 2
            assert "connection error" in result.reason

    run(main())


def test_notify_does_not_block_and_close_waits_bounded() -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        if request.path.endswith("/end"):
            await release.wait()
        return json_response({"type": "hangup"})

    async def main() -> None:
        async with Server(handler) as server:
            client = ProviderClient(notify_timeout_ms=2000)
            params = server.params()
            t0 = time.monotonic()
            task = client.notify(params.url + "/end", {"reason": "Normal"}, params)
            assert client.pending_notifications == 1
            # The step path goes on while the notification hangs.
            result = await client.step(params, BODY)
            assert result.outcome == "ok"
            assert time.monotonic() - t0 < 0.5
            assert not task.done()
            await client.close(wait_s=0.1)  # bounded: cancels what is still pending
            assert task.done()
            release.set()
            paths = [path for path, _, _ in server.requests]
            assert "/ivr/step/end" in paths and "/ivr/step" in paths
            end = next(r for r in server.requests if r[0] == "/ivr/step/end")
            assert end[1]["Content-Type"] == "application/json"
            assert end[2] == {"reason": "Normal"}

    run(main())


def test_notify_times_out_quietly() -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(2.0)
        return json_response({})

    async def main() -> None:
        async with Server(handler) as server:
            client = ProviderClient(notify_timeout_ms=100)
            params = server.params()
            task = client.notify(params.url + "/start", {"session_id": "s1"}, params)
            await asyncio.wait_for(task, 1.0)  # ends by its own timeout, no exception
            assert client.pending_notifications == 0
            await client.close()

    run(main())


def test_a_providers_cookie_is_not_sent_back() -> None:
    """The executor keeps no session state: a cookie one session's provider sets must not
    ride along on the next requests (another session's, another tenant's)."""

    async def handler(request: web.Request) -> web.Response:
        response = json_response({"type": "hangup"})
        response.set_cookie("provider_session", "s1-secret")
        return response

    async def main() -> None:
        async with Server(handler) as server, ProviderClient() as client:
            # By name: aiohttp's jar would refuse a cookie from an IP address anyway.
            params = server.params().model_copy(
                update={"url": f"http://localhost:{server.port}/ivr/step"})
            for _ in range(2):
                assert (await client.step(params, BODY)).outcome == "ok"
            await client.api("POST", f"http://localhost:{server.port}/api", body={})
            assert len(server.requests) == 3
            assert all("Cookie" not in headers for _, headers, _ in server.requests)

    run(main())

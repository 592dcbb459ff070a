"""`api` and `jump_ivr` through the executor shell: ProviderClient.api and
workers.ivr.handle_event against real aiohttp servers on 127.0.0.1 (ephemeral ports)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from pbx.config import ConfigError, IvrAppParams, load_config, parse_config
from pbx.ivr.provider import ProviderClient
from pbx.messages import (
    CallInfo,
    HangupCommand,
    IvrEvent,
    MediaInput,
    PlayCommand,
    SessionStartInput,
    TimerFired,
)
from workers.ivr import handle_event

ROOT = Path(__file__).resolve().parents[2]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Server:
    """Any method, any path; records (method, path, query, headers, body bytes)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.seen: list[tuple[str, str, dict[str, str], dict[str, str], bytes]] = []
        self.runner: web.AppRunner | None = None
        self.base = ""

    async def _record(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            (request.method, request.path, dict(request.query), dict(request.headers), body)
        )
        return await self.handler(request)

    async def __aenter__(self) -> Server:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._record)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    def paths(self) -> list[str]:
        return [path for _, path, _, _, _ in self.seen]

    def json(self, path: str) -> list[Any]:
        return [orjson.loads(body) for _, p, _, _, body in self.seen if p == path]

    async def wait_for(self, path: str, count: int = 1, timeout_s: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.paths().count(path) < count:
            assert asyncio.get_running_loop().time() < deadline, f"{path}: {self.paths()}"
            await asyncio.sleep(0.02)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def run(coro: Awaitable[None], timeout_s: float = 20.0) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, timeout_s)

    asyncio.run(bounded())


# ---------------------------------------------------------------- ProviderClient.api


def test_api_get_with_query_and_json_answer() -> None:
    async def handler(request: web.Request) -> web.Response:
        return json_response({"balance": 100, "q": dict(request.query)})

    async def main() -> None:
        async with Server(handler) as server, ProviderClient() as client:
            result = await client.api(
                "GET",
                server.base + "/balance",
                headers={"X-Token": "t"},
                body={},
                query={"caller": "1001", "note": "a b&c"},
                timeout_s=2,
            )
            assert result.status == 200
            assert result.body == {"balance": 100, "q": {"caller": "1001", "note": "a b&c"}}
            ((method, path, query, headers, body),) = server.seen
            assert (method, path, body) == ("GET", "/balance", b"")
            assert query == {"caller": "1001", "note": "a b&c"}
            assert headers["X-Token"] == "t"

    run(main())


def test_api_post_with_json_body_and_text_answer() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="created", status=201)

    async def main() -> None:
        async with Server(handler) as server, ProviderClient() as client:
            result = await client.api(
                "POST", server.base + "/orders", body={"user_phone": "138"}, timeout_s=2
            )
            assert (result.status, result.body) == (201, "created")
            ((method, _, query, headers, body),) = server.seen
            assert method == "POST" and query == {}
            assert headers["Content-Type"] == "application/json"
            assert orjson.loads(body) == {"user_phone": "138"}

    run(main())


def test_api_error_status_keeps_the_body() -> None:
    async def handler(request: web.Request) -> web.Response:
        return json_response({"error": "nope"}, status=404)

    async def main() -> None:
        async with Server(handler) as server, ProviderClient() as client:
            result = await client.api("PUT", server.base + "/x", body={})
            assert (result.status, result.body) == (404, {"error": "nope"})

    run(main())


def test_api_connection_refused_gives_status_0() -> None:
    async def handler(request: web.Request) -> web.Response:
        return json_response({})

    async def main() -> None:
        async with Server(handler) as server:
            url = server.base + "/gone"
        async with ProviderClient() as client:
            result = await client.api("GET", url, timeout_s=2)
            assert result.status == 0
            assert isinstance(result.body, dict) and set(result.body) == {"error"}
            assert "Connect" in result.body["error"]

    run(main())


def test_api_timeout_gives_status_0() -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(2.0)
        return json_response({})

    async def main() -> None:
        async with Server(handler) as server, ProviderClient() as client:
            result = await client.api("GET", server.base + "/slow", timeout_s=0.2)
            assert result.status == 0
            assert result.body == {"error": "timeout after 0.2 s"}

    run(main())


# ---------------------------------------------------------------- through handle_event


def call_info(url: str) -> CallInfo:
    return CallInfo(
        call_id="c1",
        session_id="s1",
        caller="1001",
        callee="*99",
        route_name="step_ivr",
        params=IvrAppParams(url=url),
    )


def test_executor_api_flow_get_then_post() -> None:
    api_base = ""

    async def provider(request: web.Request) -> web.Response:
        if request.path != "/ivr/step":
            return json_response({"status": "ok"})
        body = orjson.loads(await request.read())
        event = body["event"]
        if event["type"] == "session_start":
            return json_response(
                {
                    "type": "api",
                    "url": api_base + "/users/$caller$",
                    "variables": "caller",
                    "next": {
                        "type": "api",
                        "url": api_base + "/orders",
                        "method": "POST",
                        "variables": "caller,api_status",
                    },
                }
            )
        assert event["type"] == "api_response"
        return json_response({"type": "hangup"})

    async def api(request: web.Request) -> web.Response:
        return json_response({"path": request.path})

    async def main() -> None:
        nonlocal api_base
        async with Server(provider) as prov, Server(api) as api_server:
            api_base = api_server.base
            async with ProviderClient() as client:
                start = IvrEvent(
                    session_id="s1",
                    seq=1,
                    input=SessionStartInput(call=call_info(prov.base + "/ivr/step")),
                )
                reply = await handle_event(start, client, lambda: 1.0)
                assert reply.done
                assert reply.commands == [HangupCommand(reason="Normal")]
            (get, post) = api_server.seen
            assert (get[0], get[1], get[2]) == ("GET", "/users/1001", {"caller": "1001"})
            assert (post[0], post[1]) == ("POST", "/orders")
            assert orjson.loads(post[4]) == {"caller": "1001", "api_status": "200"}
            steps = prov.json("/ivr/step")
            assert [s["event"]["type"] for s in steps] == ["session_start", "api_response"]
            assert steps[-1]["event"] == {
                "type": "api_response",
                "status": 200,
                "body": {"path": "/orders"},
            }
            assert orjson.loads(steps[-1]["variables"]["api_result"]) == {"path": "/orders"}

    run(main())


def test_executor_api_network_error_and_dynamic_tree() -> None:
    async def provider(request: web.Request) -> web.Response:
        if request.path != "/ivr/step":
            return json_response({"status": "ok"})
        event = orjson.loads(await request.read())["event"]
        if event["type"] == "session_start":
            return json_response({"type": "api", "url": "http://127.0.0.1:9/unreachable"})
        assert event["type"] == "api_response" and event["status"] == 0
        assert "error" in event["body"]
        return json_response({"type": "api", "url": tree_url, "get_dynamic_tree": True})

    async def trees(request: web.Request) -> web.Response:
        return json_response({"type": "prompt", "file": "sounds/dynamic.wav"})

    tree_url = ""

    async def main() -> None:
        nonlocal tree_url
        async with Server(provider) as prov, Server(trees) as tree_server:
            tree_url = tree_server.base + "/tree"
            async with ProviderClient() as client:
                start = IvrEvent(
                    session_id="s1",
                    seq=1,
                    input=SessionStartInput(call=call_info(prov.base + "/ivr/step")),
                )
                reply = await handle_event(start, client, lambda: 1.0)
            assert not reply.done
            assert reply.commands == [PlayCommand(play_id=1, file="sounds/dynamic.wav")]
            assert prov.paths().count("/ivr/step") == 2
            assert tree_server.paths() == ["/tree"]

    run(main())


def test_executor_jump_ivr_uses_the_configured_ivrs_table() -> None:
    async def first(request: web.Request) -> web.Response:
        if request.path != "/ivr/step":
            return json_response({"status": "ok"})
        event = orjson.loads(await request.read())["event"]
        if event["type"] == "session_start":
            return json_response(
                {"type": "collect_dtmf", "min_digits": 1, "max_digits": 1, "timeout_ms": 100}
            )
        return json_response(
            {"type": "jump_ivr", "route_point": "sales", "params": {"reason": "timeout"}}
        )

    async def sales(request: web.Request) -> web.Response:
        if request.path != "/sales/step":
            return json_response({"status": "ok"})
        return json_response({"type": "prompt", "file": "sounds/sales.wav"})

    async def main() -> None:
        async with Server(first) as a, Server(sales) as b:
            settings = parse_config(
                f'[ivrs.sales]\nurl = "{b.base}/sales/step"\nname = "sales"\n'
                f'headers = {{ "X-Ivr" = "sales" }}\n'
            )
            async with ProviderClient() as client:
                start = IvrEvent(
                    session_id="s1",
                    seq=1,
                    input=SessionStartInput(call=call_info(a.base + "/ivr/step")),
                )
                reply = await handle_event(start, client, lambda: 1.0, settings.ivrs)
                assert reply.commands[0].type == "timer"
                fired = IvrEvent(
                    session_id="s1",
                    seq=2,
                    state=reply.state,
                    input=MediaInput(event=TimerFired(timer_id=1)),
                )
                reply = await handle_event(fired, client, lambda: 2.0, settings.ivrs)
                assert not reply.done
                assert reply.commands == [PlayCommand(play_id=1, file="sounds/sales.wav")]
                await a.wait_for("/ivr/step/end")
                await b.wait_for("/sales/step/start")
            assert a.json("/ivr/step/end") == [{"reason": "Jump(sales)", "session_id": "s1"}]
            assert a.paths().count("/ivr/step") == 2
            (step,) = b.json("/sales/step")
            assert step["event"] == {"type": "session_start"}
            assert step["variables"]["reason"] == "timeout"
            assert "dtmf_input" not in step["variables"]
            assert b.json("/sales/step/start")[0]["session_id"] == "s1"
            # The new IVR's configured headers go to its provider.
            assert all(headers.get("X-Ivr") == "sales" for _, _, _, headers, _ in b.seen)

    run(main())


def test_ivrs_config_section_is_optional_and_validated() -> None:
    assert load_config(str(ROOT / "config" / "pbx.toml")).ivrs == {}
    settings = parse_config('[ivrs.sales]\nurl = "http://127.0.0.1:8081/ivr/"\n')
    assert settings.ivrs["sales"].url == "http://127.0.0.1:8081/ivr"
    assert settings.ivrs["sales"].retry.max_retries == 3
    with pytest.raises(ConfigError, match=r"ivrs\.sales\.url"):
        parse_config('[ivrs.sales]\nurl = "ftp://x"\n', "x.toml")

"""The admin listener (issue 8): no Host/Origin check let any web page in an operator's
browser read ws://127.0.0.1:8088/ws/events, and DNS rebinding reach /api/traces; there
was no authentication at all.

Against the real system's listener (harness), plus a listener with a token (the admin app
of a front built from a config that sets one, on a real socket).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import os
import socket
from pathlib import Path

import pytest
from aiohttp import ClientSession, WSServerHandshakeError
from aiohttp.test_utils import TestServer

from pbx.admin import admin_app
from pbx.config import ConfigError, parse_config
from pbx.front import Front
from tests.e2e.harness import PbxSystem


def get(port: int, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def websocket_handshake(port: int, headers: dict[str, str]) -> int:
    """The status of a WebSocket upgrade to /ws/events with these extra headers."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET /ws/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n"
               + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request.encode())
        status_line = s.recv(4096).split(b"\r\n", 1)[0]
    return int(status_line.split()[1])


def test_a_rebound_host_name_is_refused(system: PbxSystem) -> None:
    """DNS rebinding: evil.example resolves to 127.0.0.1, the page fetches /api/traces;
    its Host header names evil.example."""
    port = system.admin_port
    status, _ = get(port, "/api/traces", {"Host": f"evil.example:{port}"})
    assert status == 421
    status, body = get(port, "/api/traces", {"Host": f"127.0.0.1:{port}"})
    assert status == 200 and body.startswith(b"[")
    assert get(port, "/metrics", {"Host": f"localhost:{port}"})[0] == 200


def test_a_cross_site_websocket_is_refused(system: PbxSystem) -> None:
    """A page on another site opens ws://127.0.0.1:<admin>/ws/events: the browser sends
    its Origin, which must name this listener."""
    port = system.admin_port
    assert websocket_handshake(port, {"Origin": "http://evil.example"}) == 403
    assert websocket_handshake(port, {"Origin": f"http://127.0.0.1:{port}"}) == 101
    assert websocket_handshake(port, {}) == 101  # a non-browser client sends none


def test_the_token_is_required_when_set(tmp_path: Path) -> None:
    config = parse_config(f"""
[admin]
listen = "127.0.0.1:8088"
token = "0123456789abcdef-admin"

[logging]
dir = "{tmp_path}"
""")
    front = Front(config, lambda *a, **k: None, lambda *a: True, lambda *a: True,
                  lambda e: None)

    async def main() -> None:
        server = TestServer(admin_app(front), host="127.0.0.1")
        await server.start_server()
        try:
            base = f"http://127.0.0.1:{server.port}"
            async with ClientSession() as http:
                async with http.get(base + "/api/calls") as r:
                    assert r.status == 401
                async with http.get(base + "/api/calls",
                                    headers={"Authorization": "Bearer wrong-token-000000"}) as r:
                    assert r.status == 401
                async with http.get(base + "/api/calls", headers={
                        "Authorization": "Bearer 0123456789abcdef-admin"}) as r:
                    assert r.status == 200 and await r.json() == []
                async with http.get(base + "/metrics?token=0123456789abcdef-admin") as r:
                    assert r.status == 200
                with pytest.raises(WSServerHandshakeError):
                    await http.ws_connect(base + "/ws/events")
                ws = await http.ws_connect(base + "/ws/events?token=0123456789abcdef-admin")
                await ws.close()
        finally:
            await server.close()

    asyncio.run(main())


def test_a_listener_beyond_loopback_needs_a_token() -> None:
    with pytest.raises(ConfigError, match="token is required"):
        parse_config('[admin]\nlisten = "0.0.0.0:8088"\n', "pbx.toml")
    parse_config('[admin]\nlisten = "0.0.0.0:8088"\ntoken = "a-long-enough-token"\n')


def test_the_debug_page_needs_no_token_in_a_url(tmp_path: Path) -> None:
    """With a token set, /debug is served without it (a static page, no data) under a CSP
    that lets nothing external load; a browser's WebSocket, which cannot set headers,
    carries the token as the `pbx.token.<base64url>` subprotocol, and the server
    answers with `pbx.events` only (the token is not echoed)."""
    config = parse_config(f"""
[admin]
listen = "127.0.0.1:8088"
token = "0123456789abcdef-admin"

[logging]
dir = "{tmp_path}"
""")
    front = Front(config, lambda *a, **k: None, lambda *a: True, lambda *a: True,
                  lambda e: None)
    good = "pbx.token." + base64.urlsafe_b64encode(b"0123456789abcdef-admin").decode().rstrip("=")
    bad = "pbx.token." + base64.urlsafe_b64encode(b"0123456789abcdef-wrong").decode().rstrip("=")

    async def main() -> None:
        server = TestServer(admin_app(front), host="127.0.0.1")
        await server.start_server()
        try:
            base = f"http://127.0.0.1:{server.port}"
            async with ClientSession() as http:
                async with http.get(base + "/debug") as r:
                    assert r.status == 200 and "/ws/events" in await r.text()
                    csp = r.headers["Content-Security-Policy"]
                    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
                    assert r.headers["Referrer-Policy"] == "no-referrer"
                async with http.post(base + "/debug") as r:
                    assert r.status == 401  # only the page's GET is exempt
                for protocols in ((bad, "pbx.events"), ("pbx.events", "pbx.token.%%%")):
                    with pytest.raises(WSServerHandshakeError):
                        await http.ws_connect(base + "/ws/events", protocols=protocols)
                ws = await http.ws_connect(base + "/ws/events", protocols=("pbx.events", good))
                assert ws.protocol == "pbx.events"
                await ws.close()
                # A token given as a subprotocol is for the WebSocket handshake: a plain
                # request carrying the header is let in too (same secret), a wrong one not.
                async with http.get(base + "/api/calls",
                                    headers={"Sec-WebSocket-Protocol": bad}) as r:
                    assert r.status == 401
        finally:
            await server.close()

    asyncio.run(main())


@pytest.mark.parametrize(("header", "status"), [
    (b"Authorization: Bearer \xff\xfe\r\n", 401),  # not UTF-8: not the token
    (b"Origin: http://[::1\r\n", 403),  # not a URL: not one of ours
])
def test_a_malformed_header_is_refused_not_a_500(header: bytes, status: int) -> None:
    """Before the token check, anyone could send these: a traceback in the log at ERROR
    and a 500 each."""
    from aiohttp import web

    from pbx.admin import access_guard
    from pbx.config import AdminSettings

    async def scenario() -> bytes:
        app = web.Application(middlewares=[access_guard(AdminSettings(
            listen="127.0.0.1:8088", token="s3cret-token-0123456789"))])

        async def ok(_: web.Request) -> web.Response:
            return web.Response(text="ok")
        app.router.add_get("/api/calls", ok)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()

        def raw() -> bytes:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
                s.sendall(b"GET /api/calls HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header
                          + b"Connection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            return data.split(b"\r\n", 1)[0]
        try:
            return await asyncio.to_thread(raw)
        finally:
            await server.close()

    assert asyncio.run(scenario()).split()[1] == str(status).encode()

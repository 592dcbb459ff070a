"""`pbx config check` and `pbx reload` (pbx.cli) against a front's real admin listener
(aiohttp on a socket, token set): the token is required for a reload and the CLI sends
the config's; a good file is applied, a bad one refused with the file, key and reason."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from pbx import cli
from pbx.admin import admin_app
from pbx.config import load_config
from pbx.front import Front
from pbx.routing import CallAddress

TOKEN = "0123456789abcdef-admin"
ROUTE_94 = """
[[routes]]
name = "new"
to_user = "*94"
app_params = { url = "http://127.0.0.1:9/new" }
"""


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, port: int, extra: str = "") -> None:
    path.write_text(f"""
[admin]
listen = "127.0.0.1:{port}"
token = "{TOKEN}"

[logging]
dir = "{path.parent}"

[[routes]]
name = "main"
to_user = "*99"
app_params = {{ url = "http://127.0.0.1:9/ivr" }}
{extra}""")


def to(user: str) -> CallAddress:
    return CallAddress(user, "pbx", "1001", "example.net", user)


def test_reload_over_the_admin_listener(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    port = free_tcp_port()
    config = tmp_path / "pbx.toml"
    write_config(config, port)
    front = Front(load_config(str(config)), lambda *a, **k: None, lambda *a: True,
                  lambda *a: True, lambda e: None)
    args = ["--config", str(config), "--supervisord-conf", str(tmp_path / "none.conf"),
            "reload"]

    async def main() -> None:
        server = TestServer(admin_app(front), host="127.0.0.1", port=port)
        await server.start_server()
        try:
            async with ClientSession() as http, http.post(
                    f"http://127.0.0.1:{port}/api/reload") as r:
                assert r.status == 401  # token-protected like the rest
            assert await asyncio.to_thread(cli.main, args) == 0
            assert "dial plan unchanged" in capsys.readouterr().out

            write_config(config, port, ROUTE_94)
            assert await asyncio.to_thread(cli.main, args) == 0
            assert "reloaded routes" in capsys.readouterr().out
            route = front.core.inbound.router.match(to("*94"))
            assert route is not None and route.name == "new"

            write_config(config, port, ROUTE_94.replace("http://", "ftp://"))
            assert await asyncio.to_thread(cli.main, args) == 2
            err = capsys.readouterr().err
            assert "reload refused, the running settings are kept" in err
            assert f"{config}: key routes[1].app_params.url" in err and "http(s) URL" in err
            assert front.core.inbound.router.match(to("*94")) is not None  # kept
            assert front.settings.routes[1].app_params.url == "http://127.0.0.1:9/new"
        finally:
            await server.close()

    asyncio.run(main())


def test_reload_when_the_front_is_down_says_so(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "pbx.toml"
    write_config(config, free_tcp_port())
    assert cli.main(["--config", str(config), "reload"]) == 1
    err = capsys.readouterr().err
    assert "does not answer" in err and "is the system running?" in err


def test_config_check_is_the_start_up_validation(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "pbx.toml"
    write_config(config, 8088)
    assert cli.main(["config", "check", str(config)]) == 0
    assert "OK (0 users, 1 routes" in capsys.readouterr().out
    write_config(config, 8088, "\n[sip]\nlisten = 'nowhere'\n")
    assert cli.main(["config", "check", str(config)]) == 2
    assert f"{config}: key sip.listen:" in capsys.readouterr().err
    # The CURVE keys as the front checks them at start (pbx.planes): a server key
    # without its secret half.
    write_config(config, 8088, "\n[zmq]\nserver_public_key = '" + "a" * 40 + "'\n"
                 "media_client_keys = ['" + "b" * 40 + "']\nivr_client_keys = ['"
                 + "b" * 40 + "']\n")
    assert cli.main(["config", "check", str(config)]) == 2
    assert "key zmq.server_secret_key: CURVE is on" in capsys.readouterr().err

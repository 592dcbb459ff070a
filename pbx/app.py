"""The front process (`pbx-front`): SIP over UDP, the ZeroMQ broker, the admin listener.

A thin shell: datagrams go to `Front.datagram_received`, ZeroMQ frames to
`Front.on_media_message` / `on_ivr_message`; worker expiry runs on a short
periodic check.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

import uvloop
from aiohttp import web

from pbx.broker import Broker
from pbx.config import ConfigError, Settings, load_config, parse_host_port
from pbx.front import Front
from pbx.logs import setup_logging

log = logging.getLogger("pbx.app")
EXPIRY_CHECK_S = 0.25


class SipUdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, front_ref: list[Front]) -> None:
        self.front_ref = front_ref

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        if not self.front_ref:
            return  # still starting: the sender retransmits
        try:
            self.front_ref[0].datagram_received(data, addr[:2])
        except Exception:
            # A bug must cost one message, not the process (and never reach the caller).
            log.exception("unhandled error on a datagram from %s:%d", addr[0], addr[1])

    def error_received(self, exc: Exception) -> None:
        log.debug("UDP error: %s", exc)


def admin_app(front: Front) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        lines = []
        for name, value in front.snapshot().items():
            lines.append(f"# TYPE pbx_{name} gauge")
            lines.append(f"pbx_{name} {value}")
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def calls(_: web.Request) -> web.Response:
        return web.json_response([
            {"call_id": c.call_id, "caller": c.caller, "callee": c.callee,
             "route": c.route.name if c.route else None, "started_at": c.started_at,
             "answered_at": c.answered_at, "ivr": c.session is not None and not c.session.done,
             "bridged_to": c.transfer_target}
            for c in front.calls.values()
        ])

    async def traces(request: web.Request) -> web.Response:
        steps = front.traces.get(request.match_info["session_id"])
        if steps is None:
            return web.json_response({"error": "unknown session"}, status=404)
        return web.json_response(steps)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/calls", calls)
    app.router.add_get("/api/traces/{session_id}", traces)
    return app


async def run(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    broker = Broker(settings.zmq)
    front_ref: list[Front] = []
    host, port = settings.sip.host_port
    transport, _ = await loop.create_datagram_endpoint(
        lambda: SipUdpProtocol(front_ref), local_addr=(host, port)
    )

    def send_datagram(data: bytes, addr: tuple[str, int]) -> None:
        try:
            transport.sendto(data, addr)
        except (OSError, ValueError) as exc:
            # An unusable destination (a host name, a closed port) costs that message only.
            log.warning("cannot send SIP to %s: %s", addr, exc)

    front = Front(settings, send_datagram, broker.send_media, broker.send_ivr, broker.publish)
    front_ref.append(front)
    broker.start(front.on_media_message, front.on_ivr_message)

    runner = web.AppRunner(admin_app(front), access_log=None)
    await runner.setup()
    admin_host, admin_port = parse_host_port(settings.admin.listen, "admin.listen")
    await web.TCPSite(runner, admin_host, admin_port).start()
    log.info("front listening on udp %s:%d, admin on %s:%d", host, port, admin_host, admin_port)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), EXPIRY_CHECK_S)
            except TimeoutError:
                pass
            try:
                front.expire_workers()
            except Exception:
                log.exception("worker expiry check failed")
        await front.shutdown()
    finally:
        transport.close()
        await runner.cleanup()
        broker.close()


def main(argv: list[str] | None = None) -> Any:
    try:
        settings = load_config()
    except ConfigError as exc:
        print(f"pbx-front: bad configuration: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings, "front")
    uvloop.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())

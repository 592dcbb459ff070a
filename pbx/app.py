"""The front process (`pbx-front`): SIP over UDP and TCP, the ZeroMQ broker, the admin
listener.

A thin shell: SIP messages come from `pbx.transport` to `Front.message_received`,
ZeroMQ frames go to `Front.on_media_message` / `on_ivr_message`; worker expiry and
the idle-connection sweep run on a short periodic check.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

import uvloop
from aiohttp import web

from pbx import planes
from pbx.admin import admin_app
from pbx.broker import Broker
from pbx.config import ConfigError, Settings, load_config, parse_host_port
from pbx.front import Front
from pbx.logs import setup_logging
from pbx.transport import SipTransport

log = logging.getLogger("pbx.app")
EXPIRY_CHECK_S = 0.25


async def run(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    broker = Broker(settings.zmq)
    host, port = settings.sip.host_port
    transport = SipTransport(settings.sip)
    await transport.start(host, port)
    front = Front(settings, transport.send, broker.send_media, broker.send_ivr, broker.publish,
                  is_connected=transport.is_connected)
    transport.handler = front
    broker.start(front.on_media_message, front.on_ivr_message, front.stats)

    runner = web.AppRunner(admin_app(front, transport), access_log=None)
    await runner.setup()
    admin_host, admin_port = parse_host_port(settings.admin.listen, "admin.listen")
    await web.TCPSite(runner, admin_host, admin_port).start()
    log.info("front listening on udp+tcp %s:%d, admin on %s:%d", host, port, admin_host,
             admin_port)

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
                transport.sweep_idle()
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
    try:
        planes.prepare(settings, "front")
    except ConfigError as exc:
        print(f"pbx-front: cannot start: {exc}", file=sys.stderr)
        return 2
    if planes.secret_readable_by_others(settings):
        log.warning("%s holds a CURVE secret key and group or other can read it "
                    "(chmod 600 it)", settings.source_path)
    uvloop.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The front process (`pbx-front`): SIP over UDP and TCP, the ZeroMQ broker, the admin
listener.

A thin shell: SIP messages come from `pbx.transport` to `Front.message_received`,
ZeroMQ frames go to `Front.on_media_message` / `on_ivr_message`; the call layer keeps
its own deadlines (one timer, `pbx.front`). What is not the call layer's runs on a slow
housekeeping tick: the transport's idle-connection sweep and the retention sweep of
recordings, voicemail and the TTS cache (`pbx.retention`, in a worker thread).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
from typing import Any

import uvloop
from aiohttp import web

from pbx.admin import admin_app
from pbx.broker import Broker
from pbx.config import Settings, parse_host_port
from pbx.front import Front
from pbx.metrics import CollectorWatch
from pbx.retention import AreaResult
from pbx.startup import start_program
from pbx.transport import SipTransport

log = logging.getLogger("pbx.app")
HOUSEKEEPING_S = 1.0
# Container allocations (net of deallocations) between two young collections
# (CPython 3.11's default: 700; 3.13's: 2000). Each young collection walks what the calls
# of the last few ms still hold; fewer of them walk less of it (the calls have ended):
# at 400 calls/s, 40 -> 14 us of collector CPU per call, a collection of ~1.6 ms CPU
# instead of ~0.5 ms (perf/README.md, issue 9).
GC_YOUNG = 2000
# Middle-generation collections between two full ones (CPython's default: 10).
GC_FULL_EVERY = 1000
RETENTION_STOP_WAIT_S = 10.0


async def run(settings: Settings) -> None:
    loop = asyncio.get_running_loop()
    broker = Broker(settings.zmq)
    host, port = settings.sip.host_port
    transport = SipTransport(settings.sip, settings.limits.tcp_connections_per_source)
    await transport.start(host, port)
    front = Front(settings, transport.send, broker.send_media, broker.send_ivr, broker.publish,
                  is_connected=transport.is_connected,
                  has_subscribers=broker.has_subscribers)
    transport.handler = front
    broker.start(front.on_media_message, front.on_ivr_message, front.stats)

    runner = web.AppRunner(admin_app(front, transport), access_log=None)
    await runner.setup()
    admin_host, admin_port = parse_host_port(settings.admin.listen, "admin.listen")
    await web.TCPSite(runner, admin_host, admin_port).start()
    log.info("front listening on udp+tcp %s:%d, admin on %s:%d", host, port, admin_host,
             admin_port)
    tune_gc()
    gc_watch = CollectorWatch(front.core.ctx.metrics)
    gc.callbacks.append(gc_watch)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # SIGHUP: re-read the config file and apply its dial plan (pbx.reload; the result,
    # or why the file was refused, goes to the log).
    loop.add_signal_handler(signal.SIGHUP, front.reload)
    sweep: asyncio.Task[list[AreaResult]] | None = None
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), HOUSEKEEPING_S)
            except TimeoutError:
                pass
            try:
                transport.sweep_idle()
            except Exception:
                log.exception("idle connection sweep failed")
            sweep = _retention_step(front, sweep, loop.time())
        await front.shutdown()
        if sweep is not None:
            await asyncio.wait({sweep}, timeout=RETENTION_STOP_WAIT_S)
    finally:
        gc.callbacks.remove(gc_watch)
        front.close()
        transport.close()
        await runner.cleanup()
        broker.close()


def tune_gc() -> None:
    """Keep the collector's pauses off the call set-up path. A full (gen2) collection
    walks every live object: at 400 calls/s the front holds a few hundred thousand (32 s
    of lingering transactions and dialogs) and one took 80-146 ms, the p99 of INVITE->200
    (perf/README.md). What start-up made never dies: frozen, it is never walked again;
    and a full collection waits for 100x more young collections than by default (cyclic
    call garbage is freed there, every few thousand calls); a young one waits for
    `GC_YOUNG` allocations."""
    gc.collect()
    gc.freeze()
    _, middle, _ = gc.get_threshold()
    gc.set_threshold(GC_YOUNG, middle, GC_FULL_EVERY)


def recordings_in_progress(front: Front) -> list[str]:
    """Files the media workers are still writing: recordings of live calls whose
    RecordingFinished has not come (retention never deletes them)."""
    return [rec["file"] for call in front.calls.values() for rec in call.recordings
            if rec.get("reason") is None and rec.get("file")]


def _retention_step(front: Front, sweep: asyncio.Task[list[AreaResult]] | None,
                    now: float) -> asyncio.Task[list[AreaResult]] | None:
    """Start a retention sweep when one is due (in a worker thread: file system work
    never blocks the event loop), and count the one that finished."""
    if sweep is not None:
        if not sweep.done():
            return sweep
        try:
            front.retention.record(sweep.result())
        except Exception:
            log.exception("retention sweep failed")
    if not front.retention.due(now):
        return None
    return asyncio.create_task(asyncio.to_thread(
        front.retention.sweep, time.time(), recordings_in_progress(front)))


def main(argv: list[str] | None = None) -> Any:
    settings = start_program("pbx-front", "front")
    uvloop.run(run(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A provider process that records the order in which it handles requests, for
tests/ivr/test_start_order.py: `python -m tests.ivr.order_provider PORT SEED`.

Like the upstream document's skeleton, its `/start` (re)creates the session's state;
unlike the skeleton, it takes its time doing so (0-120 ms, a database write, drawn from
SEED) and runs requests concurrently (aiohttp), so a step handled while `/start` is
still working would find its state reset under it. It records `("start", session_id)`
when `/start` has set the session up and `("step", session_id, event type)` when a
step arrives; `GET /log` returns the records in order. Every step is answered with a
hang-up."""

from __future__ import annotations

import asyncio
import random
import sys
from typing import Any

from aiohttp import web

START_WORK_S = (0.0, 0.120)


class OrderProvider:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.records: list[list[str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        sid = str(body.get("session_id", ""))
        if request.path.endswith("/start"):
            await asyncio.sleep(self.rng.uniform(*START_WORK_S))
            self.records.append(["start", sid])
            return web.json_response({"status": "ok"})
        if request.path.endswith(("/end", "/dtmf-match")):
            return web.json_response({"status": "ok"})
        event = body.get("event") or {}
        self.records.append(["step", sid, str(event.get("type", ""))])
        return web.json_response({"type": "hangup"})

    async def log(self, request: web.Request) -> web.Response:
        return web.json_response(self.records)


def main() -> None:
    port, seed = int(sys.argv[1]), int(sys.argv[2])
    provider = OrderProvider(seed)
    app = web.Application()
    app.router.add_get("/log", provider.log)
    app.router.add_post("/{tail:.*}", provider.handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, backlog=1024)


if __name__ == "__main__":
    main()

"""The quick start's provider (docs/quickstart.md): a welcome prompt, a menu, goodbye.

    .venv/bin/python examples/quickstart_provider.py [port]      # default 8080

Serves `POST /ivr/step` (a step: ProviderContext in, ActionNode out) and the three
notifications `/ivr/step/start`, `/ivr/step/end`, `/ivr/step/dtmf-match`.
"""

from __future__ import annotations

import sys
from typing import Any

from aiohttp import web

MENU: dict[str, Any] = {
    "type": "dtmf_menu",
    "greeting": "sounds/menu.wav",
    "timeout_ms": 5000,
    "entries": {
        "1": {"type": "transfer", "target": "2001"},
        "2": {"type": "play_and_hangup", "prompt": "sounds/goodbye.wav"},
    },
}


def next_action(event: dict[str, Any], variables: dict[str, str]) -> dict[str, Any]:
    """One step: the event that happened -> what the PBX does next."""
    kind = event.get("type")
    if kind == "session_start":
        # A prompt with the menu chained after it: no round trip in between.
        return {"type": "prompt", "file": "sounds/welcome.wav", "interruptible": True,
                "next": MENU}
    if kind in ("dtmf_menu_invalid", "dtmf_menu_timeout"):
        # A wrong key or silence: say so, then the menu again; the third time, goodbye.
        # The count travels with the call as a session variable: nothing kept here.
        misses = int(variables.get("misses", "0")) + 1
        if misses >= 3:
            return {"type": "hangup", "prompt": "sounds/goodbye.wav"}
        return {"type": "prompt", "file": "sounds/invalid.wav",
                "variables": {"misses": str(misses)}, "next": MENU}
    return {"type": "hangup", "prompt": "sounds/goodbye.wav"}


async def step(request: web.Request) -> web.Response:
    context = await request.json()
    return web.json_response(next_action(context.get("event") or {},
                                         context.get("variables") or {}))


async def notification(request: web.Request) -> web.Response:
    # /start, /end and /dtmf-match: the PBX ignores the answer.
    return web.json_response({"status": "ok"})


def app() -> web.Application:
    application = web.Application()
    application.router.add_post("/ivr/step", step)
    application.router.add_post("/ivr/step/{notification:start|end|dtmf-match}", notification)
    return application


if __name__ == "__main__":
    web.run_app(app(), host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 8080)

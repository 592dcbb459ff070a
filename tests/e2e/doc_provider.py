"""The upstream document's §6 example provider ("Building a Provider"), as a real
aiohttp process: `python -m tests.e2e.doc_provider PORT LOG`.

`IvrSession` is the document's, line for line, with one change the issue allows: its
tree-mode only `"next": {"type": "repeat"}` (which step mode refuses) is replaced by
re-sending the menu (`MENU`, the one it sent first); type hints and `noqa` marks are
added for the linters. The HTTP part is the document's skeleton, written with
aiohttp: `/start` creates (resets) the session, `/end` drops it, every other path is
a step (`/dtmf-match` too, as in the skeleton). It answers the document's way whatever the PBX's compatibility setting is:
tests/e2e/test_rustpbx_compat.py runs it under both.

Every request and the answer given are appended to LOG as one JSON line
(`{"path", "body", "answer", "at"}`), so the test sees what the provider decided.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from aiohttp import web

MENU: dict[str, Any] = {
    "type": "dtmf_menu",
    "greeting": "sounds/ivr/menu.wav",
    "timeout_ms": 5000,
    "entries": {
        "1": { "type": "transfer", "target": "2001" },
        "2": { "type": "queue", "target": "support" },
        "0": { "type": "transfer", "target": "operator" },
    },
}


class IvrSession:
    def __init__(self, caller: Any, callee: Any) -> None:
        self.step = "start"
        self.retries = 0

    def next_action(self, event: dict[str, Any]) -> dict[str, Any]:
        ev_type = event.get("type", "")

        # Step 1: initial greeting + DTMF menu (chained in one response)
        if self.step == "start":
            self.step = "menu"
            return {
                "type": "prompt",
                "file": "sounds/ivr/welcome.wav",
                "interruptible": True,
                "next": {
                    "type": "dtmf_menu",
                    "greeting": "sounds/ivr/menu.wav",
                    "timeout_ms": 5000,
                    "entries": {
                        "1": { "type": "transfer", "target": "2001" },
                        "2": { "type": "queue", "target": "support" },
                        "0": { "type": "transfer", "target": "operator" },
                    },
                },
            }

        # Step 2: handle DTMF from the menu
        if self.step == "menu":
            if ev_type == "dtmf":
                digit = event.get("digit", "")
                if digit == "1":  return {"type": "transfer", "target": "2001"}  # noqa: E701
                if digit == "2":  return {"type": "queue", "target": "support"}  # noqa: E701
                if digit == "0":  return {"type": "transfer", "target": "operator"}  # noqa: E701
                self.retries += 1
                if self.retries >= 3:
                    return {"type": "hangup"}
                return {"type": "prompt", "file": "sounds/ivr/invalid.wav",
                        "next": MENU}
            if ev_type == "dtmf_timeout":
                return {"type": "prompt", "file": "sounds/ivr/timeout.wav",
                        "next": MENU}

        return {"type": "hangup"}  # fallback


class Provider:
    """The skeleton's handler: one session table, every request logged."""

    def __init__(self, log_path: str) -> None:
        self.sessions: dict[str, IvrSession] = {}
        self.log = open(log_path, "a", buffering=1)  # line-buffered: one line per write

    def record(self, path: str, body: Any, answer: Any) -> None:
        self.log.write(json.dumps({"path": path, "body": body, "answer": answer,
                                   "at": time.time()}) + "\n")

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        sid = body.get("session_id", "")
        answer: dict[str, Any]
        if request.path == "/ivr/step/start":
            self.sessions[sid] = IvrSession(body.get("caller"), body.get("callee"))
            answer = {"status": "ok"}
        elif request.path == "/ivr/step/end":
            self.sessions.pop(sid, None)
            answer = {"status": "ok"}
        else:  # /ivr/step (main endpoint); the skeleton sends /dtmf-match here too
            # (no event: the answer is a hang-up, which the PBX ignores)
            session = self.sessions.get(sid)
            if not session:
                session = self.sessions[sid] = IvrSession("unknown", "unknown")
            answer = session.next_action(body.get("event", {}))
        self.record(request.path, body, answer)
        return web.json_response(answer)


def main() -> None:
    port, log_path = int(sys.argv[1]), sys.argv[2]
    provider = Provider(log_path)
    app = web.Application()
    app.router.add_post("/{tail:.*}", provider.handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, handle_signals=True)


if __name__ == "__main__":
    main()

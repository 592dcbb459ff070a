#!/usr/bin/env python3
"""Reference step-mode IVR provider for pbx (standard library only).

    python3 examples/step_ivr_provider.py [port] [--host 127.0.0.1]

Serves the step-mode provider protocol (the provider guide: docs/) under any
base path, e.g. ``http://127.0.0.1:8080/ivr/step``:

* ``POST <base>``            a step: ProviderContext in, ActionNode out
* ``POST <base>/start``      session created, answers ``{"status": "ok"}``
* ``POST <base>/end``        session removed, answers ``{"status": "ok"}``
* ``POST <base>/dtmf-match`` noted, answers ``{"status": "ok"}``

The flow: welcome prompt chained into a DTMF menu (1 → transfer 2001,
2 → the ``support`` queue of ``[queues.support]`` in config/pbx.toml, 0 → transfer
operator). The menu has no
``invalid_action``/``timeout_action``, so the PBX reports a wrong key
(``dtmf_menu_invalid``) or silence (``dtmf_menu_timeout``) here; the provider
plays a notice and the menu again, and hangs up with a goodbye on the third
failure. Only step-mode actions are used (no tree-only ``repeat``).

``examples/balance_provider.py`` is a second example that uses text to speech,
``collect_dtmf``, ``api``, ``torecord`` and ``queue``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FLOW = "reference"
MAX_FAILURES = 3
MAX_BODY = 1 << 20  # 1 MiB: a ProviderContext is a few hundred bytes

# Terminal actions of the menu; also used when the PBX forwards a digit as `dtmf`.
TARGETS: dict[str, dict] = {
    "1": {"type": "transfer", "target": "2001"},
    "2": {"type": "queue", "target": "support"},
    "0": {"type": "transfer", "target": "operator"},
}


def menu() -> dict:
    """The DTMF menu; a fresh copy each time so callers may add fields."""
    return {
        "type": "dtmf_menu",
        "greeting": "sounds/menu.wav",
        "timeout_ms": 5000,
        "entries": {digit: dict(action) for digit, action in TARGETS.items()},
    }


class IvrSession:
    """Per-call state machine. Pure: an event dict in, an ActionNode dict out."""

    def __init__(self, session_id: str, caller: str = "", callee: str = "") -> None:
        self.session_id = session_id
        self.caller = caller
        self.callee = callee
        self.failures = 0
        self.steps = 0
        self.created = time.time()

    def next_action(self, event: dict | None) -> dict:
        self.steps += 1
        ev_type = event.get("type", "") if isinstance(event, dict) else ""
        if ev_type == "session_start":
            self.failures = 0
            node = {
                "type": "prompt",
                "file": "sounds/welcome.wav",
                "interruptible": True,
                "next": menu(),
            }
            return self._tag(node, "welcome", "Welcome and main menu")
        if ev_type in ("dtmf_menu_invalid", "dtmf_menu_timeout"):
            notice = "invalid" if ev_type == "dtmf_menu_invalid" else "timeout"
            return self._failure(notice)
        if ev_type == "dtmf":
            digit = str(event.get("digit", ""))
            if digit in TARGETS:
                return self._tag(dict(TARGETS[digit]), f"choice_{digit}", f"Menu choice {digit}")
            return self._failure("invalid")
        if ev_type == "audio_complete":
            return self._tag(menu(), "menu", "Main menu")
        if ev_type == "error":
            node = {"type": "hangup", "prompt": "sounds/error.wav"}
            return self._tag(node, "error", "Error, goodbye")
        node = {"type": "hangup", "prompt": None}
        return self._tag(node, "unknown_event", f"Unknown event {ev_type or '(none)'}")

    def _failure(self, notice: str) -> dict:
        self.failures += 1
        if self.failures >= MAX_FAILURES:
            node = {"type": "hangup", "prompt": "sounds/goodbye.wav"}
            return self._tag(node, "too_many_failures", "Too many failures, goodbye")
        node = {"type": "prompt", "file": f"sounds/{notice}.wav", "next": menu()}
        return self._tag(node, f"retry_{notice}", f"Retry after {notice} ({self.failures})")

    def _tag(self, node: dict, step: str, name: str) -> dict:
        node["step_id"] = f"{FLOW}.{self.steps}.{step}"
        node["step_name"] = name
        node["extra"] = {"flow": FLOW, "failures": self.failures, "caller": self.caller}
        return node


class Sessions:
    """Thread-safe session table."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, IvrSession] = {}

    def start(self, sid: str, caller: str, callee: str) -> None:
        # /start is fire-and-forget and may arrive after the first step: never reset a session.
        with self._lock:
            self._sessions.setdefault(sid, IvrSession(sid, caller, callee))

    def end(self, sid: str) -> bool:
        with self._lock:
            return self._sessions.pop(sid, None) is not None

    def step(self, sid: str, ctx: dict) -> dict:
        # The whole step runs under the lock: the PBX keeps one event in flight
        # per session, so this costs nothing and keeps each session consistent.
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:  # /start is fire-and-forget and may be lost
                session = IvrSession(sid, _s(ctx.get("caller")), _s(ctx.get("callee")))
                self._sessions[sid] = session
            return session.next_action(ctx.get("event"))

    def __contains__(self, sid: str) -> bool:
        with self._lock:
            return sid in self._sessions

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


def _s(value: object) -> str:
    return value if isinstance(value, str) else ""


def _log(msg: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} provider {msg}\n")
    sys.stderr.flush()


class Handler(BaseHTTPRequestHandler):
    server_version = "pbx-reference-provider/1.0"
    protocol_version = "HTTP/1.1"  # keep-alive for the PBX's connection pool
    # An answer in one segment: buffered, so its headers and body leave together when
    # the request is done (http.server flushes then), and without Nagle's algorithm, so
    # it never waits for the PBX's delayed ACK (~40 ms on a kept-alive connection).
    wbufsize = -1
    disable_nagle_algorithm = True
    sessions: Sessions  # set by make_server

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        try:
            self._post()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # never a traceback to the client
            _log(f"error {type(exc).__name__}: {exc}")
            try:
                self._json(500, {"error": "internal error"})
            except OSError:
                pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path.rstrip("/") in ("", "/health"):
            self._json(200, {"status": "ok", "sessions": len(self.sessions)})
        else:
            self._json(405, {"error": "use POST"})

    def _post(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            self._json(400, {"error": "missing or invalid Content-Length"})
            return
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            self._json(400, {"error": f"invalid JSON: {exc}"})
            return
        if not isinstance(body, dict):
            self._json(400, {"error": "body must be a JSON object"})
            return
        sid = _s(body.get("session_id"))
        kind = path.rsplit("/", 1)[-1]

        if kind == "start":
            self.sessions.start(sid, _s(body.get("caller")), _s(body.get("callee")))
            _log(f"session={sid} start caller={_s(body.get('caller'))}")
            self._json(200, {"status": "ok"})
        elif kind == "end":
            self.sessions.end(sid)
            _log(f"session={sid} end reason={body.get('reason')!r}")
            self._json(200, {"status": "ok"})
        elif kind == "dtmf-match":
            action = body.get("action")
            atype = action.get("type") if isinstance(action, dict) else None
            _log(f"session={sid} dtmf-match digit={body.get('digit')!r} action={atype}")
            self._json(200, {"status": "ok"})
        else:
            if not sid:
                self._json(400, {"error": "session_id missing"})
                return
            node = self.sessions.step(sid, body)
            event = body.get("event")
            etype = event.get("type") if isinstance(event, dict) else None
            _log(f"session={sid} event={etype} action={node['type']}")
            self._json(200, node)

    def _json(self, status: int, data: dict) -> None:
        if status >= 400:
            _log(f"{self.command} {self.path} -> {status} {data.get('error')}")
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # one line per request is written by _post instead


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # listen backlog; the default 5 resets bursts of connections


def make_server(host: str = "127.0.0.1", port: int = 8080) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"sessions": Sessions()})
    return Server((host, port), handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Reference step-mode IVR provider")
    parser.add_argument("port", nargs="?", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    server = make_server(args.host, args.port)
    host, port = server.server_address[:2]
    _log(f"listening on http://{host}:{port}/ivr/step")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

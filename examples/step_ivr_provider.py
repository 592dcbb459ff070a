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

The perf scripts run hundreds of calls a second through it, so its HTTP server is a
small keep-alive HTTP/1.1 server on asyncio (one thread, requests parsed in place, a
JSON answer written at once) and its log lines are written a few times a second, not
one write each: a request costs it ~60 us of CPU, where http.server's thread per
connection cost ~210 us.

``examples/balance_provider.py`` is a second example that uses text to speech,
``collect_dtmf``, ``api``, ``torecord`` and ``queue``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
import threading
import time
from email.utils import formatdate

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


# ---------------------------------------------------------------- logging
# One line per request, buffered and written a few times a second: under load (the perf
# scripts run hundreds of calls a second through this provider) a write and a flush per
# line cost the provider, and supervisord, which reads its stderr, a wake-up each.
LOG_FLUSH_S = 0.2
_log_lines: list[str] = []


def _log(msg: str) -> None:
    _log_lines.append(f"{time.strftime('%H:%M:%S')} provider {msg}\n")


def _flush_log() -> None:
    if _log_lines:
        sys.stderr.write("".join(_log_lines))
        _log_lines.clear()
    sys.stderr.flush()


# ---------------------------------------------------------------- the protocol


def answer(sessions: Sessions, method: str, path: str, raw: bytes) -> tuple[int, dict]:
    """One request of the provider protocol: (HTTP status, JSON body)."""
    path = path.split("?", 1)[0].rstrip("/")
    if method == "GET":
        if path in ("", "/health"):
            return 200, {"status": "ok", "sessions": len(sessions)}
        return 405, {"error": "use POST"}
    if method != "POST":
        return 405, {"error": "use POST"}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return 400, {"error": f"invalid JSON: {exc}"}
    if not isinstance(body, dict):
        return 400, {"error": "body must be a JSON object"}
    sid = _s(body.get("session_id"))
    kind = path.rsplit("/", 1)[-1]
    if kind == "start":
        sessions.start(sid, _s(body.get("caller")), _s(body.get("callee")))
        _log(f"session={sid} start caller={_s(body.get('caller'))}")
        return 200, {"status": "ok"}
    if kind == "end":
        sessions.end(sid)
        _log(f"session={sid} end reason={body.get('reason')!r}")
        return 200, {"status": "ok"}
    if kind == "dtmf-match":
        action = body.get("action")
        atype = action.get("type") if isinstance(action, dict) else None
        _log(f"session={sid} dtmf-match digit={body.get('digit')!r} action={atype}")
        return 200, {"status": "ok"}
    if not sid:
        return 400, {"error": "session_id missing"}
    node = sessions.step(sid, body)
    event = body.get("event")
    etype = event.get("type") if isinstance(event, dict) else None
    _log(f"session={sid} event={etype} action={node['type']}")
    return 200, node


# ---------------------------------------------------------------- HTTP/1.1 (asyncio)
# A small keep-alive HTTP/1.1 server on asyncio, in place of http.server's thread per
# connection: the PBX keeps a pool of connections open and sends a few small JSON POSTs
# per call on each, so a request costs a parse of its head and one write here.

MAX_HEAD = 16 * 1024  # request line and headers
SERVER = "pbx-reference-provider/1.0"
REASONS = {200: "OK", 400: "Bad Request", 405: "Method Not Allowed",
           411: "Length Required", 413: "Content Too Large",
           431: "Request Header Fields Too Large", 500: "Internal Server Error"}


class HttpError(Exception):
    """A request that cannot be read: answered with `status`, then the connection closes."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status


def parse_head(head: bytes) -> tuple[str, str, bool, int]:
    """A request's head (without the blank line): method, target, whether the connection
    stays open after the answer, and the body's length."""
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise HttpError(400, "malformed request line") from None
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(400, f"unsupported version {version[:20]!r}")
    headers = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise HttpError(400, "malformed header line")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(411, "send the body with a Content-Length")
    length_text = headers.get("content-length", "0")
    # ASCII digits only (str.isdigit takes "²", which int() refuses), and few of them.
    if not (length_text.isascii() and length_text.isdigit()) or len(length_text) > 12:
        raise HttpError(400, "missing or invalid Content-Length")
    length = int(length_text)
    if length > MAX_BODY:
        raise HttpError(413, f"body over {MAX_BODY} bytes")
    connection = headers.get("connection", "").lower()
    keep_alive = (connection != "close" if version == "HTTP/1.1"
                  else connection == "keep-alive")
    return method, target, keep_alive, length


_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header's value, made once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True))
    return _date[1]


def response(status: int, data: dict, keep_alive: bool) -> bytes:
    payload = json.dumps(data).encode()
    close = "" if keep_alive else "Connection: close\r\n"
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nServer: {SERVER}\r\n"
            f"Date: {http_date()}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n{close}\r\n")
    return head.encode() + payload


class HttpConnection(asyncio.Protocol):
    """One client connection: requests in order, each answered before the next is read."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Answers leave at once, never held for the client's delayed ACK (Nagle).
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and not self.transport.is_closing():
            end = self.buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    self._fail(HttpError(431, f"request head over {MAX_HEAD} bytes"))
                return
            try:
                method, target, keep_alive, length = parse_head(bytes(self.buffer[:end]))
            except HttpError as exc:
                self._fail(exc)
                return
            if len(self.buffer) < end + 4 + length:
                return  # the rest of the body is on its way
            body = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            try:
                status, out = answer(self.sessions, method, target, body)
            except Exception as exc:  # never a traceback to the client
                _log(f"error {type(exc).__name__}: {exc}")
                status, out = 500, {"error": "internal error"}
            if status >= 400:
                _log(f"{method} {target[:200]} -> {status} {out.get('error')}")
            self.transport.write(response(status, out, keep_alive))
            if not keep_alive:
                self.transport.close()

    def _fail(self, exc: HttpError) -> None:
        assert self.transport is not None
        _log(f"-> {exc.status} {exc}")
        self.transport.write(response(exc.status, {"error": str(exc)}, keep_alive=False))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int, started: asyncio.Future | None = None) -> None:
    """Serve until cancelled (SIGINT, SIGTERM). `started` gets the bound address."""
    loop = asyncio.get_running_loop()
    sessions = Sessions()
    server = await loop.create_server(lambda: HttpConnection(sessions), host, port,
                                      backlog=1024)  # bursts of new connections
    bound = server.sockets[0].getsockname()[:2]
    _log(f"listening on http://{bound[0]}:{bound[1]}/ivr/step")
    if started is not None:
        started.set_result(bound)
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))

    def flush_often() -> None:
        _flush_log()
        loop.call_later(LOG_FLUSH_S, flush_often)

    flush_often()
    try:
        async with server:
            await stop
    finally:
        _flush_log()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Reference step-mode IVR provider")
    parser.add_argument("port", nargs="?", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.host, args.port))
    except OSError as exc:
        _log(f"cannot listen on {args.host}:{args.port}: {exc}")
        _flush_log()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Example step-mode provider: an account balance line (standard library only).

    python3 examples/balance_provider.py [port] [--host 127.0.0.1] [--api-base URL]

Serves the step-mode provider protocol under any base path, e.g.
``http://127.0.0.1:8081/ivr/step`` (``POST <base>``, ``<base>/start``, ``<base>/end``,
``<base>/dtmf-match``), and, on the same server, the balance API the IVR calls:

* ``GET /api/balance?dtmf_input=<account>`` → ``{"account", "balance", "currency"}``,
  404 for an unknown account, 400 without an account number.

The flow, one action of each kind the PBX runs for it:

1. ``prompt`` with ``tts_text`` (the welcome and the question, spoken by the PBX's
   text to speech) chained into ``collect_dtmf`` (4 to 10 digits, ended by ``#``);
2. ``api``: the PBX calls ``/api/balance`` with the digits (``variables:
   dtmf_input``) and sends the answer back as ``api_response``;
3. a ``tts_text`` prompt reading the balance, chained into a ``dtmf_menu`` whose
   greeting is ``greeting_text``: 1 → ``torecord`` (leave a message, ``#`` ends it),
   2 → ``queue`` "support", 9 → hang up;
4. ``recording_complete`` → a spoken thank-you, then ``hangup`` with the goodbye.

An unknown account or no digits: asked again, three failures end the call. The
balance service down: the caller goes to the support queue. An ``error`` event
(e.g. the PBX has no text to speech): the support queue too, where a person can
read the balance.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

FLOW = "balance"
MAX_FAILURES = 3
MAX_BODY = 1 << 20

# account -> (balance in cents, currency)
ACCOUNTS: dict[str, tuple[int, str]] = {
    "1234": (12_345, "USD"),
    "5555": (0, "USD"),
    "98765": (104_210, "EUR"),
}
CURRENCY_WORDS = {"USD": ("dollar", "dollars"), "EUR": ("euro", "euros")}

GOODBYE = {"type": "hangup", "prompt": "sounds/goodbye.wav"}
SUPPORT = {"type": "queue", "target": "support"}


def spell(digits: str) -> str:
    """ "1234" -> "1 2 3 4": read as digits, not as a number."""
    return " ".join(digits)


def say_amount(cents: int, currency: str) -> str:
    """12345, "USD" -> "123 dollars and 45 cents"."""
    one, many = CURRENCY_WORDS.get(currency, (currency, currency))
    units, rest = divmod(abs(cents), 100)
    text = f"{units} {one if units == 1 else many}"
    if rest:
        text += f" and {rest} {'cent' if rest == 1 else 'cents'}"
    return ("minus " if cents < 0 else "") + text


def collect_account(intro: str) -> dict:
    return {
        "type": "prompt",
        "tts_text": f"{intro} Please enter your account number, then press the pound key.",
        "interruptible": True,
        "next": {
            "type": "collect_dtmf",
            "min_digits": 4,
            "max_digits": 10,
            "terminator": "#",
            "timeout_ms": 8000,
        },
    }


def menu() -> dict:
    return {
        "type": "dtmf_menu",
        "greeting_text": "To leave us a message, press 1. "
        "To speak to an agent, press 2. To end the call, press 9.",
        "timeout_ms": 6000,
        "entries": {
            "1": {
                "type": "torecord",
                "prompt": "sounds/voicemail_greeting.wav",
                "beep": True,
                "max_duration_secs": 60,
            },
            "2": dict(SUPPORT),
            "9": dict(GOODBYE),
        },
    }


class BalanceSession:
    """Per-call state machine. Pure: an event dict in, an ActionNode dict out."""

    def __init__(self, session_id: str, caller: str = "", api_base: str = "") -> None:
        self.session_id = session_id
        self.caller = caller
        self.api_base = api_base
        self.failures = 0
        self.steps = 0
        self.account = ""
        self.recording = ""

    def next_action(self, event: dict | None, variables: dict | None = None) -> dict:
        self.steps += 1
        event = event if isinstance(event, dict) else {}
        ev = event.get("type", "")
        if ev == "session_start":
            self.failures = 0
            return self._tag(collect_account("Welcome to the balance line."), "ask_account")
        if ev == "dtmf":  # the collected account number
            self.account = str(event.get("digit") or (variables or {}).get("dtmf_input", ""))
            node = {
                "type": "api",
                "url": f"{self.api_base}/api/balance",
                "method": "GET",
                "variables": "dtmf_input",
                "timeout": 5,
            }
            return self._tag(node, "lookup")
        if ev == "dtmf_timeout":
            return self._retry("Sorry, we did not get an account number.", "no_digits")
        if ev == "api_response":
            return self._balance(event)
        if ev in ("dtmf_menu_invalid", "dtmf_menu_timeout"):
            self.failures += 1
            if self.failures >= MAX_FAILURES:
                return self._tag(dict(GOODBYE), "menu_failures")
            notice = "invalid" if ev == "dtmf_menu_invalid" else "timeout"
            node = {"type": "prompt", "file": f"sounds/{notice}.wav", "next": menu()}
            return self._tag(node, f"menu_{notice}")
        if ev == "recording_complete":
            self.recording = str(event.get("url", ""))
            secs = event.get("duration_secs", 0)
            node = {
                "type": "prompt",
                "tts_text": f"Thank you. We received your message of {secs} seconds.",
                "next": dict(GOODBYE),
            }
            return self._tag(node, "recorded")
        if ev == "audio_complete":
            return self._tag(menu(), "menu")
        if ev == "error":
            # No text to speech (or another failure): a person takes over.
            return self._tag(dict(SUPPORT), "error_to_support")
        return self._tag(dict(GOODBYE), "unknown_event")

    def _balance(self, event: dict) -> dict:
        status = event.get("status")
        raw = event.get("body")
        body: dict = raw if isinstance(raw, dict) else {}
        if status == 200 and "balance_cents" in body:
            amount = say_amount(int(body["balance_cents"]), str(body.get("currency", "USD")))
            node = {
                "type": "prompt",
                "tts_text": f"The balance of account {spell(self.account)} is {amount}.",
                "interruptible": True,
                "next": menu(),
            }
            self.failures = 0
            return self._tag(node, "balance")
        if status in (400, 404):
            return self._retry(
                f"Sorry, we could not find account {spell(self.account)}.", "unknown_account"
            )
        # 0 (no answer), 5xx: the balance service is down.
        node = {
            "type": "prompt",
            "tts_text": "Our balance service is not available right now. "
            "Please hold for an agent.",
            "next": dict(SUPPORT),
        }
        return self._tag(node, "service_down")

    def _retry(self, sorry: str, step: str) -> dict:
        self.failures += 1
        if self.failures >= MAX_FAILURES:
            return self._tag(dict(GOODBYE), "too_many_failures")
        return self._tag(collect_account(sorry), step)

    def _tag(self, node: dict, step: str) -> dict:
        node["step_id"] = f"{FLOW}.{self.steps}.{step}"
        node["step_name"] = step.replace("_", " ")
        node["extra"] = {"flow": FLOW, "failures": self.failures, "account": self.account}
        return node


def lookup(query: dict[str, list[str]]) -> tuple[int, dict]:
    """The balance API: (HTTP status, JSON body)."""
    account = (query.get("dtmf_input") or query.get("account") or [""])[0].strip()
    if not account:
        return 400, {"error": "account number missing"}
    if account not in ACCOUNTS:
        return 404, {"error": "unknown account", "account": account}
    cents, currency = ACCOUNTS[account]
    return 200, {
        "account": account,
        "balance": f"{cents / 100:.2f}",
        "balance_cents": cents,
        "currency": currency,
    }


class Sessions:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, BalanceSession] = {}

    def start(self, sid: str, caller: str) -> None:
        with self._lock:
            self._sessions.setdefault(sid, BalanceSession(sid, caller))

    def end(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)

    def step(self, sid: str, ctx: dict, api_base: str) -> dict:
        with self._lock:
            session = self._sessions.get(sid)
            if session is None:  # /start is fire-and-forget and may be lost
                session = BalanceSession(sid, _s(ctx.get("caller")))
                self._sessions[sid] = session
            session.api_base = api_base
            return session.next_action(ctx.get("event"), ctx.get("variables"))

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


def _s(value: object) -> str:
    return value if isinstance(value, str) else ""


def _log(msg: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} balance {msg}\n")
    sys.stderr.flush()


class Handler(BaseHTTPRequestHandler):
    server_version = "pbx-balance-provider/1.0"
    protocol_version = "HTTP/1.1"
    sessions: Sessions
    api_base: str | None  # None: from the request's Host header

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        url = urlsplit(self.path)
        path = url.path.rstrip("/")
        if path in ("", "/health"):
            self._json(200, {"status": "ok", "sessions": len(self.sessions)})
        elif path == "/api/balance":
            status, body = lookup(parse_qs(url.query))
            _log(f"api balance {body.get('account')!r} -> {status}")
            self._json(status, body)
        else:
            self._json(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        try:
            self._post()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:
            _log(f"error {type(exc).__name__}: {exc}")
            try:
                self._json(500, {"error": "internal error"})
            except OSError:
                pass

    def _post(self) -> None:
        path = urlsplit(self.path).path.rstrip("/")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            self._json(400, {"error": "missing or invalid Content-Length"})
            return
        try:
            body = json.loads(self.rfile.read(length) if length else b"")
        except (ValueError, UnicodeDecodeError) as exc:
            self._json(400, {"error": f"invalid JSON: {exc}"})
            return
        if not isinstance(body, dict):
            self._json(400, {"error": "body must be a JSON object"})
            return
        sid = _s(body.get("session_id"))
        kind = path.rsplit("/", 1)[-1]
        if kind == "start":
            self.sessions.start(sid, _s(body.get("caller")))
            self._json(200, {"status": "ok"})
        elif kind == "end":
            self.sessions.end(sid)
            _log(f"session={sid} end reason={body.get('reason')!r}")
            self._json(200, {"status": "ok"})
        elif kind == "dtmf-match":
            self._json(200, {"status": "ok"})
        elif not sid:
            self._json(400, {"error": "session_id missing"})
        else:
            node = self.sessions.step(sid, body, self._api_base())
            event = body.get("event")
            etype = event.get("type") if isinstance(event, dict) else None
            _log(f"session={sid} event={etype} action={node['type']}")
            self._json(200, node)

    def _api_base(self) -> str:
        if self.api_base:
            return self.api_base
        host = self.headers.get("Host")
        if not host:
            addr = self.server.server_address
            host = f"{addr[0]!s}:{addr[1]}" if isinstance(addr, tuple) else "127.0.0.1"
        return f"http://{host}"

    def _json(self, status: int, data: dict) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


def make_server(
    host: str = "127.0.0.1", port: int = 8081, api_base: str | None = None
) -> ThreadingHTTPServer:
    attrs = {"sessions": Sessions(), "api_base": api_base.rstrip("/") if api_base else None}
    return Server((host, port), type("BoundHandler", (Handler,), attrs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Balance line step-mode IVR provider")
    parser.add_argument("port", nargs="?", type=int, default=8081)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--api-base", default=None, help="base URL of /api/balance (default: the Host header)"
    )
    args = parser.parse_args(argv)
    server = make_server(args.host, args.port, args.api_base)
    host, port = server.server_address[0], server.server_address[1]
    _log(f"listening on http://{host!s}:{port}/ivr/step")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The front's admin web app (DESIGN §2 "admin"): metrics, calls, traces, live events.

    /metrics                  Prometheus text
    /api/calls                calls in progress
    /api/traces               recent IVR sessions (summaries, newest first; ?limit=N)
    /api/traces/{session_id}  every kept step of one session
    /ws/events                WebSocket: every `ivr_step_trace` and call event as a JSON
                              text frame (?session_id=… or ?call_id=… to filter,
                              ?type=ivr_step_trace or call)
    /debug                    the trace viewer (pbx/debug_page.py): live calls and each
                              session's step timeline, from the three above

A shell: the data comes from the `Front`; events reach WebSocket clients through an
`EventHub`, whose bounded per-client queues make a slow client lose events rather
than delay the front.

Access (DESIGN §6): every request's `Host` must name this listener (its address,
localhost, a loopback address or `[admin] allowed_hosts`), which defeats DNS
rebinding; a request with an `Origin` (any browser's WebSocket or cross-site
fetch) must come from such a host too, so a web page elsewhere cannot read
`/ws/events` through an operator's browser; and with `[admin] token` set (required
beyond loopback) every request carries it as `Authorization: Bearer <token>` or
`?token=`, or (a browser's WebSocket, which cannot set headers) as the subprotocol
`pbx.token.<base64url of the token>` beside `pbx.events`, so the /debug page never puts
it in a URL. `/debug` itself is served without the token: it is a static page holding
no data, and it asks for the token (kept in the tab's sessionStorage) on a 401.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson
from aiohttp import WSMsgType, web

from pbx.config import AdminSettings, parse_host_port
from pbx.debug_page import DEBUG_HTML
from pbx.queues import WaitState

if TYPE_CHECKING:
    from pbx.front import Front

log = logging.getLogger("pbx.admin")

CLIENT_QUEUE_EVENTS = 2000
WS_HEARTBEAT_S = 20.0
# The WebSocket subprotocol /ws/events speaks, and the prefix of the one that carries
# the token from a browser (RFC 6455 §1.9: Sec-WebSocket-Protocol; the server echoes
# only EVENTS_PROTOCOL, never the token).
EVENTS_PROTOCOL = "pbx.events"
TOKEN_PROTOCOL_PREFIX = "pbx.token."
# /debug: no external asset may load (the page works offline, and a compromised CDN
# cannot script the operator's browser); fetch and WebSocket only to this listener.
DEBUG_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                               "style-src 'unsafe-inline'; img-src data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


class EventHub:
    """Fan-out of front events to WebSocket clients."""

    def __init__(self, max_queue: int = CLIENT_QUEUE_EVENTS) -> None:
        self.max_queue = max_queue
        self.clients: set[asyncio.Queue[dict[str, Any]]] = set()
        self.dropped = 0

    def publish(self, event: dict[str, Any]) -> None:
        for queue in self.clients:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self.dropped += 1

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(self.max_queue)
        self.clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self.clients.discard(queue)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _host_name(value: str) -> str:
    """The host of a `Host` header or an origin's netloc, lower-case, without port."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _protocol_token(header: str) -> str:
    """The token a browser's WebSocket carries as `pbx.token.<base64url>`, or ""."""
    for item in header.split(",")[:8]:
        item = item.strip()
        if item.startswith(TOKEN_PROTOCOL_PREFIX):
            value = item[len(TOKEN_PROTOCOL_PREFIX):][:512]
            try:
                return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
            except (binascii.Error, ValueError):
                return ""
    return ""


def access_guard(settings: AdminSettings) -> Callable[..., Awaitable[web.StreamResponse]]:
    """aiohttp middleware enforcing the Host, Origin and token rules of this module."""
    listen_host, _ = parse_host_port(settings.listen, "listen")
    allowed = {"localhost", "127.0.0.1", "::1", listen_host.lower().strip("[]"),
               *(h.lower() for h in settings.allowed_hosts)}
    token = settings.token.encode() if settings.token else None

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _host_name(request.headers.get("Host", "")) not in allowed:
            return web.Response(status=421, text="unknown host\n")
        origin = request.headers.get("Origin")
        if origin is not None and _host_name(urlsplit(origin).netloc) not in allowed:
            return web.Response(status=403, text="cross-origin request refused\n")
        if token is not None and not (request.path == "/debug" and request.method == "GET"):
            given = request.query.get("token", "") or _protocol_token(
                request.headers.get("Sec-WebSocket-Protocol", ""))
            auth = request.headers.get("Authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
            if not hmac.compare_digest(given.encode(), token):
                return web.Response(status=401, text="token required\n",
                                    headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return guard


def _wanted(event: dict[str, Any], filters: dict[str, str]) -> bool:
    return all(str(event.get(key)) == value for key, value in filters.items())


def admin_app(front: Front, transport: Any = None) -> web.Application:
    hub = EventHub()
    front.listeners.append(hub.publish)

    async def metrics(_: web.Request) -> web.Response:
        lines = []
        values = dict(front.snapshot())
        if transport is not None:
            values.update(transport.stats)
        values["queue_waiting"] = sum(
            1 for c in front.calls.values()
            if c.queue_run is not None and c.queue_run.wait.state is WaitState.RINGING)
        values["records_pending"] = len(front.records.pending)
        values["trace_sessions"] = len(front.traces)
        values["ws_clients"] = len(hub.clients)
        values["ws_events_dropped"] = hub.dropped
        for name, value in values.items():
            lines.append(f"# TYPE pbx_{name} gauge")
            lines.append(f"pbx_{name} {value}")
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def calls(_: web.Request) -> web.Response:
        return web.json_response([
            {"call_id": c.call_id, "caller": c.caller, "callee": c.callee,
             "route": c.route.name if c.route else None, "started_at": c.started_at,
             "answered_at": c.answered_at, "ivr": c.session is not None and not c.session.done,
             "session_id": c.session.session_id if c.session is not None else None,
             "bridged_to": c.transfer_target, "queue": c.queue_name, "agent": c.agent}
            for c in front.calls.values()
        ])

    async def recent_traces(request: web.Request) -> web.Response:
        try:
            limit = max(1, min(1000, int(request.query.get("limit", "100"))))
        except ValueError:
            return web.json_response({"error": "limit must be a number"}, status=400)
        return web.json_response(front.traces.recent(limit))

    async def traces(request: web.Request) -> web.Response:
        steps = front.traces.get(request.match_info["session_id"])
        if steps is None:
            return web.json_response({"error": "unknown session"}, status=404)
        return web.json_response(steps)

    async def events(request: web.Request) -> web.WebSocketResponse:
        filters = {k: v for k, v in request.query.items()
                   if k in ("session_id", "call_id", "type")}
        ws = web.WebSocketResponse(heartbeat=WS_HEARTBEAT_S, protocols=(EVENTS_PROTOCOL,))
        await ws.prepare(request)
        queue = hub.subscribe()

        async def forward() -> None:
            while True:
                event = await queue.get()
                if _wanted(event, filters):
                    await ws.send_str(orjson.dumps(event, default=str).decode())

        sender = asyncio.create_task(forward())
        try:
            async for msg in ws:  # clients have nothing to say; this waits for the close
                if msg.type == WSMsgType.ERROR:
                    break
        finally:
            hub.unsubscribe(queue)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, RuntimeError):
                await sender
        return ws

    async def debug(_: web.Request) -> web.Response:
        return web.Response(text=DEBUG_HTML, content_type="text/html",
                            headers=DEBUG_PAGE_HEADERS)

    app = web.Application(middlewares=[access_guard(front.settings.admin)])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/calls", calls)
    app.router.add_get("/api/traces", recent_traces)
    app.router.add_get("/api/traces/{session_id}", traces)
    app.router.add_get("/ws/events", events)
    app.router.add_get("/debug", debug)
    return app

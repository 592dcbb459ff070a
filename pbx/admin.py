"""The front's admin web app (DESIGN §2 "admin"): metrics, calls, traces, live events.

    /metrics                  Prometheus text format (pbx.metrics, pbx.metrics_export)
    /api/calls                calls in progress (?sip_call_id=X: the call, live or among
                              the recent finished ones, one of whose legs has Call-ID X)
    /api/traces               recent IVR sessions (summaries, newest first; ?limit=N)
    /api/traces/{session_id}  every kept step of one session
    /ws/events                WebSocket: every `ivr_step_trace` and call event as a JSON
                              text frame (?session_id=…, ?call_id=… or
                              ?sip_call_id=… (any leg's) to filter,
                              ?type=ivr_step_trace or call)
    /debug                    the trace viewer (pbx/debug_page.py): live calls and each
                              session's step timeline, from the three above
    /api/status               the front's media workers, executors and call count
    POST /api/reload          re-read the config file and apply its dial plan
                              (pbx.reload; 422 with the reason for a bad file)

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
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from pbx.config import AdminSettings, parse_host_port
from pbx.debug_page import DEBUG_HTML
from pbx.metrics_export import FrontCollector
from pbx.queues import WaitState

if TYPE_CHECKING:
    from pbx.calls.state import Call
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

    def has_clients(self) -> bool:
        return bool(self.clients)

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
        if origin is not None and _origin_host(origin) not in allowed:
            return web.Response(status=403, text="cross-origin request refused\n")
        if token is not None and not (request.path == "/debug" and request.method == "GET"):
            given = request.query.get("token", "") or _protocol_token(
                request.headers.get("Sec-WebSocket-Protocol", ""))
            auth = request.headers.get("Authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
            # Header bytes that are not UTF-8 come surrogate-escaped: not the token either.
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token):
                return web.Response(status=401, text="token required\n",
                                    headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return guard


def _origin_host(origin: str) -> str:
    """The host an Origin header names; "" for one that is not a URL (refused)."""
    try:
        return _host_name(urlsplit(origin).netloc)
    except ValueError:
        return ""


def _wanted(event: dict[str, Any], filters: dict[str, str]) -> bool:
    """`sip_call_id` matches any leg's Call-ID (`sip_call_ids`); the others exactly."""
    return all(value in (event.get("sip_call_ids") or ()) if key == "sip_call_id"
               else str(event.get(key)) == value for key, value in filters.items())


def admin_app(front: Front, transport: Any = None) -> web.Application:
    hub = EventHub()
    front.add_listener(hub.publish, hub.has_clients)

    def values() -> dict[str, Any]:
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
        return values

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FrontCollector(front.core.ctx, values))

    async def metrics(_: web.Request) -> web.Response:
        # The text format (0.0.4), which every Prometheus reads; not OpenMetrics, where
        # the counter `pbx_calls_total` and the gauge `pbx_calls` would share a name.
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def live_call(c: Call) -> dict[str, Any]:
        return {"call_id": c.call_id, "sip_call_ids": list(c.sip_call_ids),
                "sip_legs": c.sip_legs(), "kind": c.kind, "live": True,
                "caller": c.caller, "callee": c.callee,
                "route": c.route.name if c.route else None, "started_at": c.started_at,
                "answered_at": c.answered_at,
                "ivr": c.session is not None and not c.session.done,
                "session_id": c.session.session_id if c.session is not None else None,
                "bridged_to": c.transfer_target if c.transfer_target is not None
                else (c.extension if c.direct else None),
                "queue": c.queue_name, "agent": c.agent}

    async def calls(request: web.Request) -> web.Response:
        sip_call_id = request.query.get("sip_call_id")
        if sip_call_id is None:
            return web.json_response([live_call(c) for c in front.calls.values()])
        # One call at most, by index: live first, then the recent finished ones (their
        # record, `live` false); the file holds the older ones.
        live = front.core.ctx.table.find_sip_call_id(sip_call_id)
        if live is not None:
            return web.json_response([live_call(live)])
        record = front.records.find_sip_call_id(sip_call_id)
        return web.json_response([{**record, "live": False}] if record is not None else [])

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
                   if k in ("session_id", "call_id", "sip_call_id", "type")}
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

    async def status(_: web.Request) -> web.Response:
        """What `pbx status` shows of the front: its workers, executors and calls."""
        now = asyncio.get_running_loop().time()

        def workers(registry: Any, pools: bool) -> list[dict[str, Any]]:
            out = []
            for w in registry.workers():
                pool = registry.pool(w.identity) if pools else None
                out.append({"id": w.identity.decode(errors="replace"), "address": w.address,
                            "load": w.load, "capacity": w.capacity,
                            "ports_free": len(pool.free_ports()) if pool is not None else None,
                            "heartbeat_age_s": round(
                                registry.expiry_s - (w.expires_at - now), 3)})
            return out

        return web.json_response({
            "config": front.settings.source_path, "started_at": front.started_at,
            "reloaded_at": front.reloaded_at, "calls": len(front.calls),
            "sessions": len(front.sessions),
            "media_workers": workers(front.media_workers, True),
            "executors": workers(front.executors, False)})

    async def reload(_: web.Request) -> web.Response:
        """`pbx reload`: re-read the config file and apply its dial plan (pbx.reload)."""
        report = front.reload()
        return web.json_response(report, status=200 if report["ok"] else 422)

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
    app.router.add_get("/api/status", status)
    app.router.add_post("/api/reload", reload)
    return app

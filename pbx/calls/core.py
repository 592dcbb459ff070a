"""The call core: the SIP transaction user, B2BUA and IVR broker, with no I/O.

In the shape of aioquic's connection: every entry point takes `now`; inputs are SIP
messages (through the transaction layer), media and IVR plane messages, a host
resolved, a plane refusing a send, and the timer; outputs are the commands in
`pbx.calls.context` (send SIP, to a media worker, to an executor, publish, resolve),
collected with `drain()`. `get_timer()` is the one deadline the shell waits for.

Where things go, by module:

* `inbound` — an initial INVITE: admission, answer, ACK, CANCEL;
* `dialogs` — BYE, re-INVITE, UPDATE, INFO, OPTIONS in a dialog; `refer` — REFER;
* `session_timer` — RFC 4028; `legs` — what is said on one leg (200, BYE, CANCEL ...);
* `outbound` — transfers and member legs, and the responses to our INVITEs;
* `queue` — queue and agent waits; `ivr` — IVR sessions, executors, their commands;
* `media` — ports on media workers and the workers' messages;
* `teardown` — how a call ends; `state` — the call's data, phases, dict form;
* `table` — every index and the per-source budgets; `timers` — every deadline.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

from pbx import messages as m
from pbx.calls.context import ALLOW, SERVER, CallContext, Command, ToMedia, reason_phrase
from pbx.calls.dialogs import InDialog
from pbx.calls.events import CallEvents, log_sip_call_ids
from pbx.calls.inbound import Inbound
from pbx.calls.ivr import IvrBroker
from pbx.calls.legs import LegSignaling
from pbx.calls.media import MediaPlane
from pbx.calls.outbound import Outbound
from pbx.calls.queue import QueueCalls
from pbx.calls.refer import Refers
from pbx.calls.session_timer import SessionTimers
from pbx.calls.state import Call, Leg, LegPhase
from pbx.calls.targets import Targets
from pbx.calls.teardown import Teardown
from pbx.calls.timers import TimerKind
from pbx.config import Settings
from pbx.policy import PROVIDER
from pbx.ratelimit import NetworkSet
from pbx.records import CallRecords
from pbx.registrar import FailureLog, Registrar
from pbx.registry import MediaWorkerRegistry, WorkerRegistry
from pbx.routing import Router
from pbx.sip.auth import DigestAuthenticator
from pbx.sip.authguard import AuthGuard
from pbx.sip.budget import SourceBudget
from pbx.sip.errors import SipError
from pbx.sip.headers import Headers
from pbx.sip.message import SipRequest, make_response, new_tag, parse_message, stamp_via
from pbx.sip.retransmit import AckTimeout
from pbx.sip.transaction import (
    RequestReceived,
    ResponseReceived,
    SendBytes,
    TransactionKey,
    TransactionLayer,
    TransactionTimeout,
    TryingDue,
)
from pbx.sip.uri import parse_name_addr
from pbx.traces import TraceStore

log = logging.getLogger("pbx.calls")

Addr = tuple[str, int]
# How often workers' and executors' liveness and the sessions' deadlines are checked.
LIVENESS_CHECK_S = 0.25
# Requests the UAS checks of RFC 3261 §8.2.2 apply to (the others get 501 first).
UAS_CHECKED_METHODS = frozenset({"INVITE", "OPTIONS", "BYE", "INFO", "REGISTER", "UPDATE",
                                 "REFER"})
# Option tags a request may require of us (RFC 3261 §8.2.2.3).
SUPPORTED_TAGS = frozenset({"timer"})


def new_registrar(settings: Settings) -> Registrar:
    """The registrar and digest authenticator `[sip]` and `[auth]` describe."""
    auth = settings.auth
    secret = (settings.sip.auth_secret or secrets.token_hex(32)).encode()
    return Registrar(
        settings.users,
        DigestAuthenticator(settings.sip.realm, secret, nonce_ttl_s=auth.nonce_ttl_s,
                            algorithms=tuple(settings.sip.digest_algorithms),
                            nonce_table_size=auth.nonce_table_size),
        guard=AuthGuard(
            max_failures=auth.max_failures, source_max_failures=auth.source_max_failures,
            user_max_failures=auth.user_max_failures, backoff_base_s=auth.backoff_base_s,
            backoff_max_s=auth.backoff_max_s, failure_memory_s=auth.failure_memory_s,
            known_source_s=auth.known_source_s, table_size=auth.table_size),
        failure_log=FailureLog(auth.log_failures_per_min, auth.log_failures_burst,
                               auth.log_failures_max_per_min),
        md5_user_agents=auth.md5_user_agents,
    )


class CallCore:
    def __init__(self, settings: Settings, *, records: CallRecords, traces: TraceStore,
                 is_connected: Callable[[Addr], bool] = lambda addr: False,
                 now: float = 0.0, wall_offset: float = 0.0) -> None:
        """`now`: the shell's monotonic clock; `wall_offset`: wall clock minus it."""
        limits = settings.limits
        budget_exempt = NetworkSet(settings.sip.rate_limit_exempt)
        transactions = TransactionLayer(budget=SourceBudget(
            max_transactions=limits.transactions_per_source,
            max_bytes=limits.transaction_bytes_per_source,
            retry_after_s=limits.retry_after_s, exempt=budget_exempt))
        self.ctx = ctx = CallContext(
            settings, transactions=transactions, registrar=new_registrar(settings),
            media_workers=MediaWorkerRegistry(settings.media.expiry_ms / 1000),
            executors=WorkerRegistry(settings.ivr.expiry_ms / 1000), records=records,
            traces=traces, wall_offset=wall_offset)
        ctx.table.budget_exempt = budget_exempt
        ctx.now = now
        self.events = CallEvents(ctx)
        log_sip_call_ids(ctx.table)  # every log line about a call names its SIP Call-IDs
        self.media = MediaPlane(ctx)
        self.session_timers = SessionTimers(ctx)
        self.legs = LegSignaling(ctx, self.session_timers, self.events)
        self.teardown = Teardown(ctx, self.legs, self.media, self.session_timers, self.events)
        self.session_timers.end_leg = self.teardown.leg_over
        self.targets = Targets(ctx, is_connected)
        self.outbound = Outbound(ctx, self.legs, self.media, self.targets, self.teardown,
                                 self.events)
        self.queue = QueueCalls(ctx, self)
        self.outbound.members = self.queue
        self.ivr = IvrBroker(ctx, self.media, self.teardown, self.outbound, self.queue,
                             self.targets, self.events)
        self.refers = Refers(ctx, self.legs, self.teardown, self.outbound, self.ivr,
                             self.targets)
        self.in_dialog = InDialog(ctx, self.legs, self.media, self.session_timers,
                                  self.teardown, self.refers)
        self.inbound = Inbound(ctx, self.legs, self.media, self.session_timers,
                               self.teardown, self.outbound, self.ivr, self.events)
        self.teardown.on_ended += [self.ivr.call_ended, self.queue.call_ended]
        self.teardown.on_leg_left.append(self.queue.leg_left)
        self.media.on_allocated = self._allocated
        self.media.on_failed = self._media_failed
        ctx.timers.set(TimerKind.LIVENESS, None, now + LIVENESS_CHECK_S)

    # ---------------------------------------------------------------- outputs, timer

    def drain(self) -> list[Command]:
        """The commands of the step; the step's ended calls that nothing reaches any
        more are unlinked now (`CallTable.unlink_released`), every handler done."""
        ctx = self.ctx
        if ctx.table.released:
            ctx.table.unlink_released()
        out, ctx.out = ctx.out, []
        return out

    def get_timer(self) -> float | None:
        ctx = self.ctx
        # The shell asks after every input: no list, no min() call.
        best = ctx.timers.get_timer()
        for deadline in (ctx.transactions.get_timer(), ctx.retransmitter.get_timer(),
                         ctx.registrar.get_timer(), ctx.records.get_timer()):
            if deadline is not None and (best is None or deadline < best):
                best = deadline
        return best

    def handle_timer(self, now: float) -> None:
        ctx = self.ctx
        ctx.now = now
        self._transaction_events(ctx.transactions.handle_timer(now))
        self._transaction_events(ctx.retransmitter.handle_timer(now))
        ctx.registrar.expire(now)
        ctx.records.handle_timer(now)
        for kind, key in ctx.timers.due(now):
            try:
                self._fire(kind, key)
            except Exception:
                log.exception("timer %s %r failed", kind.value, key)

    def check_liveness(self, now: float) -> None:
        """The liveness check now (it also runs every LIVENESS_CHECK_S on the timer)."""
        self.ctx.now = now
        self._check_liveness()

    def _check_liveness(self) -> None:
        """Silent media workers' calls end; no IVR session waits in silence; ended
        dialogs' tombstones past their linger go."""
        self.media.expire_workers()
        self.ivr.check()
        self.ctx.table.expire_ended_dialogs(self.ctx.now)

    def _fire(self, kind: TimerKind, key: Any) -> None:
        table = self.ctx.table
        if kind is TimerKind.RING:
            self.outbound.ring_timeout(key)
        elif kind is TimerKind.SESSION_REFRESH:
            leg = table.dialogs.get(key)
            if leg is not None:
                self.session_timers.refresh(leg)
        elif kind is TimerKind.SESSION_EXPIRY:
            leg = table.dialogs.get(key)
            if leg is not None and self.session_timers.expired(leg):
                self.teardown.leg_over(leg, "SessionExpired", 408)
        elif kind is TimerKind.DIALOG_LINGER:
            table.forget_dialog(key)
        elif kind is TimerKind.CLIENT_TXN_LINGER:
            self.ctx.transactions.abandon(key)
            leg = table.client_txns.pop(key, None)
            if leg is not None:
                table.release_call(leg.call)
        elif kind is TimerKind.QUEUE:
            self.queue.on_timer(key)
        elif kind is TimerKind.ALLOCATION:
            self.media.allocation_timeout(key)
        elif kind is TimerKind.LIVENESS:
            self.ctx.timers.set(TimerKind.LIVENESS, None, self.ctx.now + LIVENESS_CHECK_S)
            self._check_liveness()

    # ---------------------------------------------------------------- SIP in

    def sip_received(self, data: bytes, addr: Addr, now: float, *,
                     reliable: bool = False) -> None:
        ctx = self.ctx
        ctx.now = now
        try:
            msg = parse_message(data)
        except SipError as exc:
            ctx.stats["sip_malformed"] += 1
            self.reject_malformed(data, addr, exc, reliable=reliable)
            return
        if isinstance(msg, SipRequest):
            stamp_via(msg, addr[0], addr[1])  # RFC 3581; responses go to the source anyway
        self._transaction_events(ctx.transactions.receive(msg, addr, now, reliable=reliable,
                                                          size=len(data)))

    def sip_unframed(self, head: bytes, addr: Addr, error: SipError, now: float) -> None:
        """A TCP stream that cannot be framed: the request whose head we have is
        answered (400, or 413 when too large); the transport then closes it."""
        self.ctx.now = now
        self.ctx.stats["sip_malformed"] += 1
        self.reject_malformed(head + b"\r\n\r\n", addr, error, reliable=True)

    def reject_malformed(self, data: bytes, addr: Addr, exc: SipError, *,
                         reliable: bool = False) -> None:
        """400 when the request is readable enough to answer (RFC 3261 §8.2), else drop."""
        log.info("malformed SIP from %s:%d: %s", addr[0], addr[1], exc)
        text = data.decode("utf-8", "replace")
        head = text.split("\r\n\r\n", 1)[0].split("\n\n", 1)[0]
        lines = [ln.rstrip("\r") for ln in head.split("\n")]
        if not lines or lines[0].upper().startswith("SIP/") or lines[0].startswith("ACK "):
            return  # a response or an ACK is never answered
        wanted = {"via": "Via", "v": "Via", "from": "From", "f": "From", "to": "To", "t": "To",
                  "call-id": "Call-ID", "i": "Call-ID", "cseq": "CSeq"}
        headers = Headers()
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            key = name.strip().lower()
            if colon and key in wanted:
                headers.add(wanted[key], value.strip())
        if "Via" not in headers:
            return  # nowhere a response could be matched (RFC 3261 §8.2.6.2)
        reason = str(exc).replace("\r", " ").replace("\n", " ")[:100]
        request = SipRequest("UNKNOWN", "sip:invalid", headers)
        response = make_response(request, exc.status, f"Bad Request ({reason})"
                                 if exc.status == 400 else None)
        response.headers.add("Server", SERVER)
        self.ctx.out.append(SendBytes(response.serialize(), addr, reliable))

    def _transaction_events(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, SendBytes):
                self.ctx.out.append(ev)
            elif isinstance(ev, RequestReceived):
                self._on_request(ev)
            elif isinstance(ev, TryingDue):
                self.ctx.out.extend(self.ctx.transactions.trying(ev.key))
            elif isinstance(ev, ResponseReceived):
                self._guarded(self.outbound.on_response, ev.response, ev.key)
            elif isinstance(ev, TransactionTimeout):
                self._guarded(self.outbound.client_timeout, ev.key)
            elif isinstance(ev, AckTimeout):
                self._guarded(self.inbound.ack_timeout, ev.dialog_key)

    @staticmethod
    def _guarded(handler: Callable[..., None], *args: Any) -> None:
        try:
            handler(*args)
        except Exception:
            log.exception("handling %s failed", getattr(handler, "__name__", handler))

    def _on_request(self, ev: RequestReceived) -> None:
        req, key, ctx = ev.request, ev.key, self.ctx
        method = req.method
        try:
            if method == "ACK":
                self.inbound.on_ack(req, ev.addr)
            elif self._refused_by_uas_checks(req, key):
                pass
            elif method == "INVITE" and req.to_tag is None:
                self.inbound.on_invite(req, ev.addr, key, ev.reliable)
            elif method == "CANCEL":
                self.inbound.on_cancel(req, ev.addr, key)
            elif method == "OPTIONS" and req.to_tag is None:
                ctx.respond(key, req, 200, headers=[("Allow", ALLOW),
                                                    ("Accept", "application/sdp")])
            elif req.to_tag is not None:
                self.in_dialog.on_request(req, ev.addr, key)
            elif method in ("BYE", "INFO", "UPDATE", "REFER"):
                ctx.respond(key, req, 481)
            elif method == "REGISTER":
                self._on_register(req, ev.addr, key)
            else:
                ctx.respond(key, req, 501, headers=[("Allow", ALLOW)])
        except SipError as exc:
            if method != "ACK":
                ctx.respond(key, req, exc.status, reason_phrase(str(exc)))
        except Exception:
            log.exception("error handling %s %s", method, req.call_id)
            if method != "ACK":
                ctx.respond(key, req, 500, "Server Internal Error")

    def _refused_by_uas_checks(self, req: SipRequest, key: TransactionKey) -> bool:
        """RFC 3261 §8.2.2-8.2.3, in the RFC's order, for the methods we implement
        (others get 501 from the dispatch): Request-URI scheme (416), Require (420),
        body type (415), Accept (406); and a REGISTER's To must be a SIP URI (§10.3)."""
        method = req.method
        if method not in UAS_CHECKED_METHODS:
            return False
        # Each header is read only when its check is reached (twice a call: INVITE, BYE).
        status, reason, headers = 0, "", []
        request_headers = req.headers
        required = ([t.strip() for v in request_headers.get_all("Require")
                     for t in v.split(",") if t.strip() and t.strip().lower()
                     not in SUPPORTED_TAGS] if "Require" in request_headers else [])
        if req.uri.partition(":")[0].lower() not in ("sip", "sips", "tel"):
            status, reason = 416, "Unsupported URI Scheme"
        elif required:
            status, reason = 420, "Bad Extension"
            headers = [("Unsupported", ", ".join(required))]
        elif method in ("INVITE", "UPDATE") and req.body and (
                (request_headers.get("Content-Type") or "").split(";")[0].strip().lower()
                != "application/sdp"):
            status, reason = 415, "Unsupported Media Type"
            headers = [("Accept", "application/sdp")]
        elif (method == "INVITE" and "Accept" in request_headers and not
              {"application/sdp", "application/*", "*/*"}
              & {a.split(";")[0].strip().lower() for v in request_headers.get_all("Accept")
                 for a in v.split(",")}):
            status, reason = 406, "Not Acceptable"
            headers = [("Warning", f'399 {self.ctx.me.host} "only application/sdp bodies"')]
        elif method == "REGISTER":
            to_uri = parse_name_addr(req.headers.get("To") or "").uri
            if to_uri.scheme not in ("sip", "sips"):
                status, reason = 400, "To of a REGISTER must be a SIP URI"
        if not status:
            return False
        self.ctx.respond(key, req, status, reason, to_tag=new_tag(), headers=headers)
        return True

    def _on_register(self, req: SipRequest, addr: Addr, key: TransactionKey) -> None:
        # Bindings and lockouts run on `now`; nonces carry wall-clock time (only the front
        # instance that issued a nonce accepts it).
        ctx = self.ctx
        response = ctx.registrar.handle_register(req, addr, ctx.now, auth_now=ctx.wall())
        response.headers.add("Server", SERVER)
        ctx.send_response(key, response)

    # ---------------------------------------------------------------- planes in

    def media_message(self, identity: bytes, msg: Any, now: float) -> None:
        self.ctx.now = now
        leg = self.media.on_message(identity, msg)
        if leg is not None:
            self.ivr.media_event(leg.call, msg.event)

    def ivr_message(self, identity: bytes, msg: Any, now: float) -> None:
        self.ctx.now = now
        self.ivr.on_message(identity, msg)

    def host_resolved(self, dialog_key: tuple[str, str], addr: Addr | None,
                      now: float) -> None:
        self.ctx.now = now
        self.outbound.host_resolved(dialog_key, addr)

    def media_send_failed(self, command: ToMedia, why: str, now: float) -> None:
        """The media plane refused a message (the worker is gone or its queue full)."""
        self.ctx.now = now
        log.warning("cannot send %s to media worker %r: %s", command.msg.kind,
                    command.worker, why)
        if command.call_id is None:
            return
        call = self.ctx.table.calls.get(command.call_id)
        if call is not None:
            self.ivr.command_lost(call, command.command or command.msg.kind,
                                  f"media worker {command.worker.decode(errors='replace')} "
                                  "did not take it")

    def ivr_send_failed(self, executor: bytes, event: m.IvrEvent, now: float) -> None:
        self.ctx.now = now
        self.ivr.send_failed(executor, event)

    def shutdown(self, now: float) -> None:
        self.ctx.now = now
        self.teardown.shutdown()

    def reload(self, settings: Settings) -> None:
        """Run with `settings` (a `pbx.reload` plan's: the running settings with a new dial
        plan). Calls in progress hold their route and queue settings from set-up; what
        decides later (the next INVITE's route, a user lookup, a queue's next round of
        members) reads the new plan."""
        ctx = self.ctx
        ctx.settings = settings
        ctx.policy.settings = settings
        ctx.registrar.users = settings.users
        self.inbound.router = Router(settings.routes)
        self.queue.reload(settings)

    # ---------------------------------------------------------------- hooks

    def _allocated(self, leg: Leg, ok: bool) -> None:
        if leg.outbound:
            self.outbound.allocated(leg, ok)
        else:
            self.inbound.allocated(leg, ok)

    def _media_failed(self, leg: Leg, reason: str) -> None:
        try:
            self.teardown.hangup(leg.call, reason, 503)
        except Exception:
            log.exception("call %s: could not end it", leg.call.call_id)

    # ---------------------------------------------------------------- CallOps (queues)

    def ring(self, call: Call, member: str, media_id: str) -> list[Leg]:
        places = self.targets.resolve_all(member)
        legs = [self.outbound.new_leg(call, member, place,
                                      media_id if len(places) == 1 else f"{media_id}-{i}")
                for i, place in enumerate(places, 1)]
        for leg in legs:
            leg.member = member
        call.ringing.extend(legs)
        for leg in legs:
            if leg.phase is LegPhase.PENDING and not call.ended:
                self.outbound.call_out(leg)
        return legs

    def give_up_leg(self, leg: Leg) -> None:
        self.legs.give_up(leg)
        self.media.release(leg)
        self.legs.linger(leg)

    def authorize(self, call: Call, target: str) -> str | None:
        allowed = self.targets.authorize(call, PROVIDER, target)
        if allowed is None:
            self.ivr.refused_target(call, target)
        return allowed

    def transfer(self, call: Call, target: str) -> None:
        self.outbound.transfer(call, target)

    def hangup(self, call: Call, reason: str, code: int | None) -> None:
        self.teardown.hangup(call, reason, code)

    def restart_ivr(self, call: Call, variables: dict[str, str]) -> None:
        self.ivr.restart(call, variables)

    def publish(self, call: Call, event: str) -> None:
        self.events.call(call, event)

    # ---------------------------------------------------------------- state

    def snapshot(self) -> dict[str, Any]:
        ctx = self.ctx
        table = ctx.table
        return {
            "calls": len(table.calls),
            "sessions": len(table.sessions),
            "media_workers": len(ctx.media_workers),
            "media_ports_free": ctx.media_workers.free_ports(),
            "executors": len(ctx.executors),
            "media_legs": len(table.legs_by_media),
            "transactions": len(ctx.transactions),
            "transactions_over_budget": ctx.transactions.sources.refused,
            "sources_in_setup": len(table.setup_by_source),
            "sources_with_calls": len(table.calls_by_source),
            **ctx.stats,
            **ctx.registrar.stats,
        }

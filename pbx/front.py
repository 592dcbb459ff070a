"""The front: SIP user agent core, call table and B2BUA legs, and the broker's policy.

Layers stack as STYLE.md says: `pbx.sip.message` parses, `pbx.sip.transaction`
runs transactions (sans-IO), and this module is the transaction user: dialogs,
calls, routing, IVR sessions and media legs. Its I/O is confined to three
callables handed in by `pbx.app` (send a datagram, send on a ZeroMQ plane,
publish an event). RTP ports come from the media workers' announced pools
(`pbx.registry.MediaWorkerRegistry`), so answering an INVITE waits for no other process.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from pbx import messages as m
from pbx.config import RouteSettings, Settings
from pbx.jsonl import JsonLinesLog
from pbx.policy import (
    PROVIDER,
    Destination,
    DestinationKind,
    Party,
    PartyKind,
    Policy,
    Verdict,
)
from pbx.queue_calls import QueueCalls
from pbx.ratelimit import NetworkSet
from pbx.records import CallRecords, call_record
from pbx.redact import is_secret_header, redact
from pbx.registrar import Registrar
from pbx.registry import MediaWorkerRegistry, WorkerRegistry
from pbx.retention import RetentionSweeper
from pbx.routing import CallAddress, Router
from pbx.sip import sdp
from pbx.sip.auth import DigestAuthenticator
from pbx.sip.authguard import AuthGuard
from pbx.sip.errors import SipError
from pbx.sip.fields import DTMF_INFO_TYPES, parse_dtmf_info, parse_session_expires
from pbx.sip.framing import FramingError
from pbx.sip.message import (
    REASON_PHRASES,
    Headers,
    SipRequest,
    SipResponse,
    make_cancel,
    make_response,
    new_branch,
    new_call_id,
    new_tag,
    parse_message,
    parse_name_addr,
    parse_uri,
    stamp_via,
)
from pbx.sip.transaction import (
    AckTimeout,
    RequestReceived,
    ResponseReceived,
    SendBytes,
    SourceBudget,
    TransactionKey,
    TransactionLayer,
    TransactionTimeout,
    Uas2xxRetransmitter,
)
from pbx.traces import TraceStore

log = logging.getLogger("pbx.front")

Addr = tuple[str, int]
ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO, UPDATE, REFER"
SUPPORTED = "timer"
USER_AGENT = "pbx/0.1"
# A port handed out and not confirmed by its worker (MediaAllocated) within this ends
# the leg's call.
MEDIA_ALLOCATE_TIMEOUT_S = 2.0
# How long an IVR event may stay unanswered beyond the provider's own retry budget
# before it is re-sent once to another executor, and then the call is given up.
IVR_REPLY_MARGIN_S = 15.0
# How long a session may wait for any executor at all.
IVR_NO_EXECUTOR_S = 10.0
# RFC 3261 §17.1.1.2 Timer B/F: how long we keep a client transaction's owner around.
CLIENT_TXN_LINGER_S = 32.0
# Requests the UAS checks of RFC 3261 §8.2.2 apply to (the others get 501 first).
UAS_CHECKED_METHODS = frozenset({"INVITE", "OPTIONS", "BYE", "INFO", "REGISTER", "UPDATE",
                                 "REFER"})
# Option tags a request may require of us (RFC 3261 §8.2.2.3).
SUPPORTED_TAGS = frozenset({"timer"})
# RFC 4028: the smallest session interval we accept (its §4 floor), and how long before
# the session's expiry the side that does not refresh gives up on it (§10).
MIN_SE_S = 90
SESSION_EXPIRY_MARGIN_S = 32
# RFC 3515 §2.4.4: how long the implicit subscription of a REFER lives.
REFER_SUBSCRIPTION_S = 60


class SendFn(Protocol):
    """The transport's send: UDP, or with `reliable` the peer's TCP connection."""

    def __call__(self, data: bytes, addr: Addr, reliable: bool = False) -> None: ...


def _reason_phrase(text: str, limit: int = 100) -> str:
    """Text safe for a status line or a quoted header value: one line, no quotes."""
    return " ".join(text.replace('"', "'").split())[:limit]


def _wants_tcp(uri_text: str) -> bool:
    """A SIP URI that asks for TCP (`;transport=tcp`, RFC 3261 §19.1.1)."""
    try:
        return (parse_uri(uri_text).params.get("transport") or "").lower() == "tcp"
    except SipError:
        return False


def _with_tcp(uri_text: str) -> str:
    """The URI with `;transport=tcp` (before any `?headers`)."""
    base, sep, headers = uri_text.partition("?")
    return f"{base};transport=tcp{sep}{headers}"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass
class Leg:
    """One SIP dialog of a call, and its RTP port on a media worker."""

    call: Call
    sip_call_id: str
    local_tag: str
    media_id: str
    outbound: bool
    addr: Addr  # where requests to the remote party go
    local_party: str = ""  # our From/To header value, with our tag
    remote_party: str = ""  # theirs
    remote_target: str = ""  # their Contact URI
    local_cseq: int = 0
    remote_tag: str | None = None
    invite: SipRequest | None = None
    invite_key: TransactionKey | None = None
    state: str = "early"  # early | confirmed | terminated
    worker: bytes | None = None
    rtp_port: int = 0
    negotiated: sdp.Negotiated | None = None
    answer_sdp: bytes = b""
    ring_timer: asyncio.TimerHandle | None = None
    source: Addr | None = None  # where the initial INVITE came from (2xx retransmissions)
    route_set: list[str] = field(default_factory=list)  # Route header values, in order
    media_address: Addr | None = None  # where the worker was last told to send RTP
    provisional_seen: bool = False  # RFC 3261 §9.1: CANCEL only after a 1xx
    cancel_pending: bool = False
    late_bye_sent: bool = False
    reliable: bool = False  # the dialog runs over TCP (no retransmissions, RFC 3261 §18)
    member: str | None = None  # the queue member (or agent) this leg rings
    rtp_ip: str = ""  # our RTP address on the media worker
    # A 2xx to an INVITE in the dialog awaits its ACK (a second one gets 491, §14.2),
    # and whether that 2xx carried our offer (an offerless re-INVITE: the ACK answers).
    reinvite_unacked: bool = False
    offer_in_2xx: bool = False
    session_timer: asyncio.TimerHandle | None = None  # RFC 4028 refresh or expiry
    peer_allows_update: bool = False
    # Who is at the other end (pbx.policy): the caller's party on an inbound leg; on an
    # outbound leg, the extension we rang, else an anonymous party. REFERs are theirs.
    peer: Party = field(default_factory=lambda: Party(PartyKind.ANONYMOUS))
    # The source IP an inbound INVITE spent a set-up budget of, until its ACK, and a
    # calls budget of, until the leg ends.
    setup_source: str | None = None
    call_source: str | None = None

    @property
    def dialog_key(self) -> tuple[str, str]:
        return (self.sip_call_id, self.local_tag)


@dataclass
class Session:
    """The front's side of an IVR session: event queue, in-flight event, latest state."""

    session_id: str
    call: Call
    info: m.CallInfo
    seq: int = 0
    state: dict[str, Any] | None = None
    queue: deque[Any] = field(default_factory=deque)
    in_flight: m.IvrEvent | None = None
    executor: bytes | None = None
    done: bool = False
    sent_at: float = 0.0
    attempts: int = 0
    waiting_since: float | None = None  # in `Front.waiting_sessions` since
    closing: bool = False  # the call left the IVR (a REFER): its commands are ignored
    # When the in-flight event was first sent (re-sends keep it), and since when it has
    # found no executor to take it (reset only when one does).
    dispatched_at: float = 0.0
    unplaced_since: float | None = None
    # Nothing in flight, nothing queued: the session waits for a call event, and hears
    # a WaitExpiredInput if none came by `wait_deadline` (the last reply's `wait_ms`,
    # else `[sessions] max_wait_ms`, plus `[sessions] wait_grace_ms`; front clock).
    wait_started: float | None = None
    wait_deadline: float | None = None
    wait_ms: int | None = None  # the last reply's own bound (None: it gave none)


@dataclass
class Call:
    call_id: str  # our id for the call (records, traces)
    route: RouteSettings | None
    caller: str
    callee: str
    started_at: float
    a: Leg | None = None
    b: Leg | None = None
    session: Session | None = None
    answered_at: float | None = None
    ended: bool = False
    end_reason: str = ""
    end_code: int | None = None
    transfer_target: str | None = None
    extension: str | None = None  # set for a direct call to a user (no IVR)
    party: Party = field(default_factory=lambda: Party(PartyKind.ANONYMOUS))  # the caller
    # Queue / route_to_agent (pbx.queue_calls): candidates ringing, and the wait itself.
    # The member who answers becomes `b`.
    ringing: list[Leg] = field(default_factory=list)
    queue_run: Any = None  # pbx.queue_calls.QueueRun while the caller waits
    queue_name: str | None = None
    queue_member: str | None = None
    agent: str | None = None
    ws_bridge: str | None = None
    bridged_at: float | None = None
    ended_at: float | None = None
    recordings: list[dict[str, Any]] = field(default_factory=list)
    session_ids: list[str] = field(default_factory=list)
    # REFER (RFC 3515): the leg that asked, whose implicit subscription gets the NOTIFYs;
    # `detached` holds a referrer no longer part of the bridge (released once notified).
    referrer: Leg | None = None
    refer_event: str = "refer"
    detached: list[Leg] = field(default_factory=list)

    def legs(self) -> list[Leg]:
        return [leg for leg in (self.a, self.b, *self.ringing, *self.detached)
                if leg is not None]


def _count_down(held: dict[str, int], source: str) -> None:
    """One budget unit of `source` is back; a source holding none leaves the table."""
    left = held.get(source, 0) - 1
    if left > 0:
        held[source] = left
    else:
        held.pop(source, None)


class Front:
    def __init__(
        self,
        settings: Settings,
        send_datagram: SendFn,
        send_media: Callable[[bytes, Any], bool],
        send_ivr: Callable[[bytes, Any], bool],
        publish: Callable[[dict[str, Any]], None],
        is_connected: Callable[[Addr], bool] = lambda addr: False,
    ) -> None:
        self.settings = settings
        # Whether a TCP connection to the address is open (a phone's registration flow).
        self.is_connected = is_connected
        self.send_datagram = send_datagram
        self.send_media = send_media
        self.send_ivr = send_ivr
        self.publish = publish
        self.router = Router(settings.routes)
        self.policy = Policy(settings)
        # Per-source budgets (DESIGN §6); the rate limit's exempt networks skip them.
        self.budget_exempt = NetworkSet(settings.sip.rate_limit_exempt)
        self.setup_by_source: dict[str, int] = {}
        self.calls_by_source: dict[str, int] = {}
        limits = settings.limits
        self.transactions = TransactionLayer(budget=SourceBudget(
            max_transactions=limits.transactions_per_source,
            max_bytes=limits.transaction_bytes_per_source,
            retry_after_s=limits.retry_after_s, exempt=self.budget_exempt))
        self.retransmitter = Uas2xxRetransmitter()
        secret = (settings.sip.auth_secret or secrets.token_hex(32)).encode()
        auth = settings.auth
        self.registrar = Registrar(
            settings.users,
            DigestAuthenticator(settings.sip.realm, secret, nonce_ttl_s=auth.nonce_ttl_s,
                                algorithms=tuple(settings.sip.digest_algorithms),
                                nonce_table_size=auth.nonce_table_size),
            guard=AuthGuard(
                max_failures=auth.max_failures, source_max_failures=auth.source_max_failures,
                user_max_failures=auth.user_max_failures, backoff_base_s=auth.backoff_base_s,
                backoff_max_s=auth.backoff_max_s, failure_memory_s=auth.failure_memory_s,
                known_source_s=auth.known_source_s, table_size=auth.table_size),
        )
        self.media_workers = MediaWorkerRegistry(settings.media.expiry_ms / 1000)
        self.executors = WorkerRegistry(settings.ivr.expiry_ms / 1000)
        host, port = settings.sip.advertised_host_port
        self.host, self.port = host, port
        self.calls: dict[str, Call] = {}
        self.dialogs: dict[tuple[str, str], Leg] = {}
        self.pending_invites: dict[TransactionKey, Leg] = {}
        self.client_txns: dict[TransactionKey, Leg] = {}
        self.legs_by_media: dict[str, Leg] = {}
        self.sessions: dict[str, Session] = {}
        self.waiting_sessions: deque[Session] = deque()
        logs_dir = Path(settings.logging.dir)
        rotation = (settings.logging.jsonl_max_bytes, settings.logging.jsonl_backups)
        self.traces_log = JsonLinesLog(logs_dir / "traces.jsonl", *rotation)
        self.calls_log = JsonLinesLog(logs_dir / "calls.jsonl", *rotation)
        self.traces = TraceStore(settings.traces.max_sessions, settings.traces.max_steps,
                                 self.traces_log, max_bytes=settings.traces.max_bytes,
                                 max_session_bytes=settings.traces.max_session_bytes)
        self.records = CallRecords(self.calls_log)
        # Recordings, voicemail and TTS cache retention: run by pbx.app's periodic loop.
        self.retention = RetentionSweeper.from_settings(settings)
        self.queue_calls = QueueCalls(self)
        # In-process subscribers to every published event (the admin's /ws/events).
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.stats = {"calls_total": 0, "calls_failed": 0, "sip_malformed": 0,
                      "calls_challenged": 0, "calls_forbidden": 0, "setup_budget_refused": 0,
                      "calls_budget_refused": 0,
                      "refers_refused": 0, "transfers_refused": 0, "in_dialog_foreign": 0,
                      # The planes (DESIGN §6): refused handshakes (pbx.broker), replies
                      # not from the executor asked, workers declaring a refused RTP
                      # address, allocations not at the worker's declared address.
                      "zmq_auth_rejected": 0, "ivr_replies_rejected": 0,
                      "media_workers_rejected": 0, "media_allocations_rejected": 0,
                      # Ports a worker refused or never confirmed: the call ended (503).
                      "media_allocations_failed": 0,
                      "ivr_waits_expired": 0, "ivr_commands_lost": 0,
                      # Strict RTP latching: packets from strangers, dropped by the workers.
                      "rtp_foreign_dropped": 0, "rtcp_foreign_dropped": 0}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------ plumbing

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def now(self) -> float:
        return self.loop.time()

    def _spawn(self, coro: Any, call: Call) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, call))

    def _task_done(self, task: asyncio.Task[Any], call: Call) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        log.error("call %s: task failed", call.call_id, exc_info=task.exception())
        # A bug must end the call cleanly, never leave the caller ringing or in silence.
        try:
            self._hangup_call(call, "InternalError", 500)
        except Exception:
            log.exception("call %s: could not end the call after a failure", call.call_id)

    def _emit(self, events: list[Any]) -> None:
        for ev in events:
            if isinstance(ev, SendBytes):
                self.send_datagram(ev.data, ev.addr, ev.reliable)
            elif isinstance(ev, RequestReceived):
                self._on_request(ev)
            elif isinstance(ev, ResponseReceived):
                self._on_response(ev.response, ev.key)
            elif isinstance(ev, TransactionTimeout):
                self._on_client_timeout(ev.key)
            elif isinstance(ev, AckTimeout):
                self._on_ack_timeout(ev.dialog_key)
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadlines = [
            d
            for d in (self.transactions.get_timer(), self.retransmitter.get_timer(),
                      self.registrar.get_timer(), self.records.get_timer())
            if d is not None
        ]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadlines:
            self._timer = self.loop.call_at(min(deadlines), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.now()
        try:
            events: list[Any] = self.transactions.handle_timer(now)
            events += self.retransmitter.handle_timer(now)
            self.registrar.expire(now)
            self.records.handle_timer(now)
            self._emit(events)
        finally:
            self._arm_timer()  # whatever happened, SIP timers keep running

    # ------------------------------------------------------------ SIP in

    def message_received(self, data: bytes, addr: Addr, *, reliable: bool = False) -> None:
        """One message from the transport: a UDP datagram, or one framed off a TCP
        stream (`reliable`, RFC 3261 §18: no retransmissions on it)."""
        if not data.strip():
            return  # keep-alive (RFC 5626 §3.5.1)
        try:
            msg = parse_message(data)
        except SipError as exc:
            self.stats["sip_malformed"] += 1
            self._reject_malformed(data, addr, exc, reliable=reliable)
            return
        if isinstance(msg, SipRequest):
            stamp_via(msg, addr[0], addr[1])  # RFC 3581; responses go to the source anyway
        self._emit(self.transactions.receive(msg, addr, self.now(), reliable=reliable,
                                             size=len(data)))

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.message_received(data, addr)

    def stream_unframed(self, head: bytes, addr: Addr, error: FramingError) -> None:
        """A TCP stream that cannot be framed: answer the request whose head we have
        (400, or 413 when too large); the transport then closes the connection."""
        self.stats["sip_malformed"] += 1
        self._reject_malformed(head + b"\r\n\r\n", addr, error, reliable=True)

    def _reject_malformed(self, data: bytes, addr: Addr, exc: SipError, *,
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
        response.headers.add("Server", USER_AGENT)
        self.send_datagram(response.serialize(), addr, reliable)

    def _respond(self, key: TransactionKey, request: SipRequest, status: int,
                 reason: str | None = None, *, to_tag: str | None = None,
                 headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> SipResponse:
        hdrs = [("Server", USER_AGENT)] + (headers or [])
        response = make_response(request, status, reason, to_tag=to_tag, headers=hdrs, body=body)
        self._emit(list(self.transactions.respond(key, response, self.now())))
        return response

    def _on_request(self, ev: RequestReceived) -> None:
        req, key = ev.request, ev.key
        method = req.method
        try:
            if method == "ACK":
                self._on_ack(req)
            elif self._refused_by_uas_checks(req, key):
                pass
            elif method == "INVITE" and req.to_tag is None:
                self._on_initial_invite(req, ev.addr, key, reliable=ev.reliable)
            elif method == "CANCEL":
                self._on_cancel(req, key)
            elif method == "OPTIONS" and req.to_tag is None:
                self._respond(key, req, 200, headers=[("Allow", ALLOW), ("Accept", "application/sdp")])
            elif req.to_tag is not None:
                self._on_in_dialog(req, ev.addr, key)
            elif method in ("BYE", "INFO", "UPDATE", "REFER"):
                self._respond(key, req, 481)
            elif method == "REGISTER":
                self._on_register(req, ev.addr, key)
            else:
                self._respond(key, req, 501, headers=[("Allow", ALLOW)])
        except SipError as exc:
            if method != "ACK":
                self._respond(key, req, exc.status, _reason_phrase(str(exc)))
        except Exception:
            log.exception("error handling %s %s", method, req.call_id)
            if method != "ACK":
                self._respond(key, req, 500, "Server Internal Error")

    def _refused_by_uas_checks(self, req: SipRequest, key: TransactionKey) -> bool:
        """RFC 3261 §8.2.2-8.2.3, in the RFC's order, for the methods we implement
        (others get 501 from the dispatch): Request-URI scheme (416), Require (420),
        body type (415), Accept (406); and a REGISTER's To must be a SIP URI (§10.3)."""
        method = req.method
        if method not in UAS_CHECKED_METHODS:
            return False
        status, reason, headers = 0, "", []
        scheme = req.uri.partition(":")[0].lower()
        required = [t.strip() for v in req.headers.get_all("Require") for t in v.split(",")
                    if t.strip() and t.strip().lower() not in SUPPORTED_TAGS]
        ctype = (req.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        accept = [a.split(";")[0].strip().lower() for v in req.headers.get_all("Accept")
                  for a in v.split(",")]
        if scheme not in ("sip", "sips", "tel"):
            status, reason = 416, "Unsupported URI Scheme"
        elif required:
            status, reason = 420, "Bad Extension"
            headers = [("Unsupported", ", ".join(required))]
        elif method in ("INVITE", "UPDATE") and req.body and ctype != "application/sdp":
            status, reason = 415, "Unsupported Media Type"
            headers = [("Accept", "application/sdp")]
        elif (method == "INVITE" and "Accept" in req.headers and not
              {"application/sdp", "application/*", "*/*"} & set(accept)):
            status, reason = 406, "Not Acceptable"
            headers = [("Warning", f'399 {self.host} "only application/sdp bodies"')]
        elif method == "REGISTER":
            to_uri = parse_name_addr(req.headers.get("To") or "").uri
            if to_uri.scheme not in ("sip", "sips"):
                status, reason = 400, "To of a REGISTER must be a SIP URI"
        if not status:
            return False
        self._respond(key, req, status, reason, to_tag=new_tag(), headers=headers)
        return True

    def _on_register(self, req: SipRequest, addr: Addr, key: TransactionKey) -> None:
        # Two clocks: bindings and lockouts run on the loop's clock, nonces carry
        # wall-clock time (only the front instance that issued a nonce accepts it).
        response = self.registrar.handle_register(req, addr, self.now(), auth_now=time.time())
        response.headers.add("Server", USER_AGENT)
        self._emit(list(self.transactions.respond(key, response, self.now())))

    # ------------------------------------------------------------ incoming calls

    def _on_initial_invite(self, req: SipRequest, addr: Addr, key: TransactionKey, *,
                           reliable: bool = False) -> None:
        if self._session_interval_too_small(req, key):
            return
        to = parse_name_addr(req.headers.get("To") or "")
        frm = parse_name_addr(req.headers.get("From") or "")
        ruri = parse_uri(req.uri)
        address = CallAddress(
            to_user=to.uri.user or "", to_host=to.uri.host,
            from_user=frm.uri.user or "", from_host=frm.uri.host,
            request_uri_user=ruri.user or "",
        )
        self.stats["calls_total"] += 1
        destination = self._invite_destination(address)
        party = self._invite_party(req, key, addr, frm.uri.host, frm.uri.port,
                                   address.from_user, destination)
        if party is None:
            self.stats["calls_failed"] += 1
            return  # challenged or refused
        decision = self.policy.decide(party, destination)
        if decision.verdict is Verdict.CHALLENGE:
            self._challenge_invite(req, key)
            return
        if not decision.allowed:
            self.stats["calls_failed"] += 1
            self.stats["calls_forbidden"] += 1
            self._respond(key, req, decision.status, decision.reason, to_tag=new_tag())
            return
        spent = self._take_setup_budget(addr[0])
        if spent is not None:
            self.stats["calls_failed"] += 1
            self.stats[f"{spent}_budget_refused"] += 1
            reason = ("Too Many Calls In Set-Up" if spent == "setup"
                      else "Too Many Calls From This Source")
            self._respond(key, req, 503, reason, to_tag=new_tag(),
                          headers=[("Retry-After", str(self.settings.limits.retry_after_s))])
            return
        route = destination.route
        extension = destination.name if destination.kind is DestinationKind.USER else None
        call = Call(
            call_id=secrets.token_hex(8), route=route, caller=address.from_user,
            callee=address.to_user, started_at=time.time(), extension=extension, party=party,
        )
        leg = Leg(
            call=call, sip_call_id=req.call_id, local_tag=new_tag(),
            media_id=f"{call.call_id}-a", outbound=False, addr=addr, source=addr,
            reliable=reliable, peer=party, setup_source=addr[0], call_source=addr[0],
        )
        leg.invite, leg.invite_key = req, key
        leg.remote_tag = req.from_tag
        leg.remote_party = req.headers.get("From") or ""
        leg.local_party = f"{req.headers.get('To') or ''};tag={leg.local_tag}"
        contact = req.headers.get("Contact")
        leg.remote_target = str(parse_name_addr(contact).uri) if contact else str(frm.uri)
        # RFC 3261 §12.1.1: the UAS route set is the Record-Route list, in order.
        leg.route_set = req.headers.get_all("Record-Route")
        # Over TCP, in-dialog requests reuse the caller's connection (RFC 3261 §18.1.1;
        # a phone behind NAT cannot take a new one); over UDP they follow the route set.
        leg.addr = addr if reliable else self._next_hop(leg, fallback=addr)
        call.a = leg
        self.calls[call.call_id] = call
        self.pending_invites[key] = leg
        self._publish_call(call, "started")
        try:
            self._answer_incoming(call, leg, req, key)
        except Exception:
            # A bug must end the call cleanly, never leave the caller ringing.
            log.exception("call %s: answering failed", call.call_id)
            self._hangup_call(call, "InternalError", 500)

    def _invite_destination(self, address: CallAddress) -> Destination:
        """What an initial INVITE asks for: a route, else one of our users (bridged, no
        IVR), else nothing."""
        route = self.router.match(address)
        if route is not None:
            return Destination(DestinationKind.ROUTE, route.name, route)
        if self.registrar.lookup(address.to_user, self.now()):
            return Destination(DestinationKind.USER, address.to_user)
        return Destination(DestinationKind.NONE, address.to_user)

    def _invite_party(self, req: SipRequest, key: TransactionKey, addr: Addr, from_host: str,
                      from_port: int | None, from_user: str,
                      destination: Destination) -> Party | None:
        """Who calls (pbx.policy): an extension once its digest credentials check out
        (RFC 3261 §22.3, as a proxy: 407), a trusted source, or an anonymous caller. None
        when the request was answered here (challenged or refused)."""
        if self.registrar.authenticator.has_credentials(req, proxy=True):
            # Verified with replay protection and the failed-login backoff (a locked-out
            # source or username gets 403 + Retry-After, its credentials unchecked).
            out = self.registrar.authenticate(req, addr, self.now(), auth_now=time.time(),
                                              proxy=True)
            if out.ok and out.username == from_user:
                return Party(PartyKind.EXTENSION, from_user)
            if out.ok:  # valid credentials of another extension: no impersonation
                self._respond(key, req, 403, "Forbidden (From is not the authenticated user)",
                              to_tag=new_tag())
            else:
                if out.status == 407:
                    self.stats["calls_challenged"] += 1
                self._respond(key, req, out.status,
                              _reason_phrase(out.reason) if out.reason else None,
                              to_tag=new_tag(), headers=out.headers)
            return None
        if self.policy.is_trusted_source(addr[0]):
            return Party(PartyKind.TRUSTED, from_user)
        if self.policy.must_authenticate(from_host, from_port, destination):
            self._challenge_invite(req, key)
            return None
        return Party(PartyKind.ANONYMOUS, from_user)

    def _challenge_invite(self, req: SipRequest, key: TransactionKey) -> None:
        """The one 407 every unauthorized INVITE gets, whatever it asked for."""
        self.stats["calls_challenged"] += 1
        self._respond(key, req, 407, to_tag=new_tag(),
                      headers=self.registrar.authenticator.challenge(
                          time.time(), proxy=True, request=req))

    # ------------------------------------------------------------ per-source budgets

    def _take_setup_budget(self, source: str) -> str | None:
        """One more inbound call from `source`, in set-up until its ACK and held until
        it ends, if its budgets (`[limits] setup_calls_per_source`, `calls_per_source`)
        allow; else the budget that is spent ("setup" or "calls")."""
        if source in self.budget_exempt:
            return None
        held = self.setup_by_source.get(source, 0)
        if held >= self.settings.limits.setup_calls_per_source:
            return "setup"
        calls = self.calls_by_source.get(source, 0)
        if calls >= self.settings.limits.calls_per_source:
            return "calls"
        self.setup_by_source[source] = held + 1
        self.calls_by_source[source] = calls + 1
        return None

    def _end_setup(self, leg: Leg) -> None:
        """The leg's call is answered and acknowledged, or over: its budget is back."""
        source, leg.setup_source = leg.setup_source, None
        if source is None or source in self.budget_exempt:
            return
        _count_down(self.setup_by_source, source)

    def _end_source_call(self, leg: Leg) -> None:
        """The leg is over: its set-up and calls budgets are back."""
        self._end_setup(leg)
        source, leg.call_source = leg.call_source, None
        if source is not None and source not in self.budget_exempt:
            _count_down(self.calls_by_source, source)

    def _next_hop(self, leg: Leg, fallback: Addr) -> Addr:
        """Where in-dialog requests go: the first Route, else the remote target (RFC 3261
        §12.2.1.1, loose routing). A target we cannot send to directly (a host name, no
        DNS on this path) falls back to where the peer's packets came from."""
        target = leg.remote_target
        if leg.route_set:
            try:
                target = str(parse_name_addr(leg.route_set[0]).uri)
            except SipError:
                return fallback
        try:
            uri = parse_uri(target)
        except SipError:
            return fallback
        host = uri.host.strip("[]")
        return (host, uri.port or 5060) if _is_ip(host) else fallback

    def _answer_incoming(self, call: Call, leg: Leg, req: SipRequest,
                         key: TransactionKey) -> None:
        """183/200 (or the call's first transfer leg) at once: the RTP port is handed out
        locally (`_allocate`), so nothing here waits for another process."""
        route = call.route
        if not req.body:
            self._fail_invite(leg, 488, "No SDP Offer")
            return
        if not self._allocate(leg, route.inband_dtmf if route else False):
            self._fail_invite(leg, 503, "No Media Worker", [("Retry-After", "5")])
            return
        try:
            negotiated, answer = sdp.answer_offer(
                req.body, leg.rtp_ip, leg.rtp_port, int(time.time())
            )
        except SipError as exc:
            self._release_media(leg)
            self._fail_invite(leg, exc.status, _reason_phrase(str(exc), 80))
            return
        leg.negotiated, leg.answer_sdp = negotiated, answer
        self._send_remote(leg)
        self.dialogs[leg.dialog_key] = leg
        if route is None:
            # Direct call to a user: the caller is answered when the callee answers.
            assert call.extension is not None
            self._transfer(call, call.extension)
            return
        if route.answer == "early_media":
            # 183 with the SDP answer: the IVR plays before any final response, so a
            # play_and_hangup code can still be the final status (DESIGN §3).
            self._respond(key, req, 183, to_tag=leg.local_tag, body=answer,
                          headers=self._dialog_headers(leg))
        else:
            self._answer_leg(leg)
        self._start_session(call, req)

    def _dialog_headers(self, leg: Leg) -> list[tuple[str, str]]:
        headers = [("Contact", self._contact(leg.reliable)), ("Allow", ALLOW),
                   ("Supported", SUPPORTED)]
        headers += [("Record-Route", rr) for rr in leg.route_set]
        return headers

    def _answer_leg(self, leg: Leg) -> None:
        """200 OK for an inbound leg's INVITE, retransmitted until the ACK (§13.3.1.4)."""
        assert leg.invite is not None and leg.invite_key is not None
        self.pending_invites.pop(leg.invite_key, None)
        headers = self._dialog_headers(leg) + self._session_timer(leg, leg.invite)
        response = self._respond(leg.invite_key, leg.invite, 200, to_tag=leg.local_tag,
                                 body=leg.answer_sdp, headers=headers)
        leg.state = "confirmed"
        if not leg.reliable:  # a stream delivers the 2xx; only UDP retransmits it
            self.retransmitter.start(self._dkey(leg), response.serialize(),
                                     leg.source or leg.addr, self.now())
            self._arm_timer()
        call = leg.call
        call.answered_at = time.time()
        self._publish_call(call, "answered")

    def _fail_invite(self, leg: Leg, status: int, reason: str,
                     headers: list[tuple[str, str]] | None = None) -> None:
        assert leg.invite is not None and leg.invite_key is not None
        self.pending_invites.pop(leg.invite_key, None)
        self._respond(leg.invite_key, leg.invite, status, reason, to_tag=leg.local_tag,
                      headers=headers)
        leg.state = "terminated"
        self.stats["calls_failed"] += 1
        self._end_call(leg.call, f"Rejected({status})", status)

    def _contact(self, reliable: bool = False) -> str:
        transport = ";transport=tcp" if reliable else ""
        return f"<sip:pbx@{self.host}:{self.port}{transport}>"

    @staticmethod
    def _dkey(leg: Leg) -> str:
        return f"{leg.sip_call_id}|{leg.local_tag}"

    def _on_ack(self, req: SipRequest) -> None:
        leg = self.dialogs.get((req.call_id, req.to_tag or ""))
        if leg is not None:
            self.retransmitter.ack(self._dkey(leg))
            self._arm_timer()
            leg.reinvite_unacked = False
            if leg.state == "confirmed":
                self._end_setup(leg)
            if leg.offer_in_2xx:
                # The answer to the offer our 2xx made (an offerless re-INVITE).
                leg.offer_in_2xx = False
                try:
                    leg.negotiated = sdp.parse_answer(req.body)
                except SipError as exc:
                    log.info("call %s: no usable SDP answer in the ACK: %s",
                             leg.call.call_id, exc)
                    return
                self._send_remote(leg)

    def _on_ack_timeout(self, dialog_key: str) -> None:
        call_id, _, tag = dialog_key.partition("|")
        leg = self.dialogs.get((call_id, tag))
        if leg is not None:
            log.info("no ACK for 200 on %s: ending the call", call_id)
            self._hangup_call(leg.call, "NoAck", None)

    def _on_cancel(self, req: SipRequest, key: TransactionKey) -> None:
        invite_key = self.transactions.find_invite_server(req)
        if invite_key is None:
            self._respond(key, req, 481)
            return
        leg = self.pending_invites.pop(invite_key, None)
        if leg is None:
            # RFC 3261 §9.2: the INVITE was already answered; the CANCEL itself succeeds.
            self._respond(key, req, 200)
            return
        self._respond(key, req, 200, to_tag=leg.local_tag)
        assert leg.invite is not None
        self._respond(invite_key, leg.invite, 487, to_tag=leg.local_tag)
        leg.state = "terminated"
        self._end_call(leg.call, "Cancelled", 487)

    # ------------------------------------------------------------ in-dialog requests

    def _on_in_dialog(self, req: SipRequest, addr: Addr, key: TransactionKey) -> None:
        leg = self.dialogs.get((req.call_id, req.to_tag or ""))
        if leg is None:
            self._respond(key, req, 481)
            return
        if not self.policy.in_dialog_source_ok(self._peer_ip(leg), addr[0]):
            self.stats["in_dialog_foreign"] += 1
            log.info("call %s: %s from %s, not the dialog's peer %s; refused",
                     leg.call.call_id, req.method, addr[0], self._peer_ip(leg))
            self._respond(key, req, 403, "Forbidden (not the dialog's peer)")
            return
        if req.method == "BYE" and leg in leg.call.detached:
            self._respond(key, req, 200)  # a referrer leaving before its final NOTIFY
            self._drop_detached(leg)
        elif req.method == "BYE":
            self._respond(key, req, 200)
            if leg.state == "early" and not leg.outbound and leg.invite_key is not None:
                # A BYE on an early dialog (RFC 3261 §15) ends the INVITE too.
                assert leg.invite is not None
                self.pending_invites.pop(leg.invite_key, None)
                self._respond(leg.invite_key, leg.invite, 487, to_tag=leg.local_tag)
            leg.state = "terminated"
            self._hangup_call(leg.call, "Hangup" if leg is leg.call.a else "CalleeHangup",
                              None, except_leg=leg)
        elif req.method == "INVITE":
            self._on_reinvite(leg, req, addr, key)
        elif req.method == "UPDATE":
            self._on_update(leg, req, key)
        elif req.method == "REFER":
            self._on_refer(leg, req, key)
        elif req.method == "INFO":
            self._on_info(leg, req, key)
        elif req.method == "OPTIONS":
            self._respond(key, req, 200, headers=[("Allow", ALLOW)])
        else:
            self._respond(key, req, 501, headers=[("Allow", ALLOW)])

    @staticmethod
    def _peer_ip(leg: Leg) -> str | None:
        """The IP the dialog's peer sends from: where its INVITE came from (inbound), or
        where we send it requests (outbound: its contact, registration source or next
        hop, resolved)."""
        if leg.source is not None:
            return leg.source[0]
        return leg.addr[0] if _is_ip(leg.addr[0]) else None

    def _on_info(self, leg: Leg, req: SipRequest, key: TransactionKey) -> None:
        # A bad digit raises SipError: 400 "Bad DTMF Digit" at the request boundary.
        info = parse_dtmf_info(req.headers.get("Content-Type"), req.body)
        if info is None:
            self._respond(key, req, 415, headers=[("Accept", ", ".join(DTMF_INFO_TYPES))])
            return
        self._respond(key, req, 200)
        if leg.worker is not None:
            self.send_media(leg.worker, m.MediaDtmfInfo(
                call_id=leg.media_id, digit=info.digit, duration_ms=info.duration_ms))

    # ------------------------------------------------------------ re-INVITE, UPDATE

    def _on_reinvite(self, leg: Leg, req: SipRequest, addr: Addr, key: TransactionKey) -> None:
        """A re-INVITE (RFC 3261 §14.2, RFC 3264 §8): hold, resume, a new address or codec,
        a session refresh; offerless, our 2xx makes the offer and the ACK answers it."""
        if leg.state != "confirmed":
            # The dialog's first INVITE is still unanswered (§14.2: 500 + Retry-After).
            self._respond(key, req, 500, "Previous INVITE Pending",
                          headers=[("Retry-After", str(secrets.randbelow(10) + 1))])
            return
        if leg.reinvite_unacked or leg.offer_in_2xx:
            self._respond(key, req, 491)  # its 2xx awaits the ACK: overlapping (§14.2)
            return
        if self._session_interval_too_small(req, key):
            return
        body = self._renegotiate(leg, req.body) if req.body else leg.answer_sdp
        headers = self._dialog_headers(leg) + self._session_timer(leg, req)
        response = self._respond(key, req, 200, body=body, headers=headers)
        leg.reinvite_unacked = True
        leg.offer_in_2xx = not req.body
        if not leg.reliable:
            self.retransmitter.start(self._dkey(leg), response.serialize(), addr, self.now())
            self._arm_timer()

    def _on_update(self, leg: Leg, req: SipRequest, key: TransactionKey) -> None:
        """UPDATE (RFC 3311): a new offer, or a session refresh, in any dialog state."""
        if req.body and leg.offer_in_2xx:
            self._respond(key, req, 491)  # our offer is still unanswered (RFC 3311 §5.2)
            return
        if self._session_interval_too_small(req, key):
            return
        body = self._renegotiate(leg, req.body) if req.body else b""
        headers = [("Contact", self._contact(leg.reliable)), ("Supported", SUPPORTED)]
        self._respond(key, req, 200, body=body, headers=headers + self._session_timer(leg, req))

    def _renegotiate(self, leg: Leg, offer: bytes) -> bytes:
        """Answer a new offer in the dialog and apply it to the leg's media. An offer that
        changes nothing (a refresh) gets our previous SDP back, same o= version; a changed
        answer takes the next version (RFC 3264 §8). SdpError (488) leaves all as it was."""
        if not leg.rtp_ip or leg.worker is None:
            raise SipError("no media for this dialog", 488)
        origin = sdp.origin_of(leg.answer_sdp) or (int(time.time()),) * 2
        negotiated, answer = sdp.answer_offer(offer, leg.rtp_ip, leg.rtp_port, origin[0],
                                              version=origin[1])
        if sdp.without_origin(answer) == sdp.without_origin(leg.answer_sdp):
            answer = leg.answer_sdp
        else:
            negotiated, answer = sdp.answer_offer(offer, leg.rtp_ip, leg.rtp_port, origin[0],
                                                  version=origin[1] + 1)
        changed = negotiated != leg.negotiated
        leg.negotiated, leg.answer_sdp = negotiated, answer
        if changed:
            log.info("call %s: leg %s now %s %s:%d %s", leg.call.call_id, leg.media_id,
                     negotiated.codec, negotiated.remote_ip, negotiated.remote_port,
                     negotiated.direction)
            self._send_remote(leg)
        return answer

    # ------------------------------------------------------------ session timers (RFC 4028)

    @staticmethod
    def _session_expires(req: SipRequest) -> tuple[int, str | None] | None:
        """(interval, refresher) of the request's Session-Expires; SipError 400 if bad."""
        text = req.headers.get("Session-Expires")
        return None if text is None else parse_session_expires(text)

    def _session_interval_too_small(self, req: SipRequest, key: TransactionKey) -> bool:
        """RFC 4028 §8.1: 422 with our Min-SE for an interval below it."""
        se = self._session_expires(req)
        if se is None or se[0] >= MIN_SE_S:
            return False
        self._respond(key, req, 422, "Session Interval Too Small",
                      to_tag=None if req.to_tag else new_tag(),
                      headers=[("Min-SE", str(MIN_SE_S))])
        return True

    def _session_timer(self, leg: Leg, req: SipRequest) -> list[tuple[str, str]]:
        """The 2xx's session-timer headers for a session-refresh request (INVITE or UPDATE,
        RFC 4028 §9), and the leg's timer re-armed: without Session-Expires there is none;
        with it, the refresher is as requested (else the UAC), or us when the UAC does not
        support the extension."""
        self._stop_session_timer(leg)
        allow = [a.strip().upper() for a in req.headers.get_all("Allow")]
        leg.peer_allows_update = "UPDATE" in allow
        se = self._session_expires(req)
        if se is None:
            return []
        interval, refresher = se
        supported = any(t.strip().lower() == "timer" for name in ("Supported", "Require")
                        for t in req.headers.get_all(name))
        if not supported:
            refresher = "uas"
        elif refresher not in ("uac", "uas"):
            refresher = "uac"
        headers = [("Session-Expires", f"{interval};refresher={refresher}")]
        if supported:
            headers.append(("Require", "timer"))
        if refresher == "uas":
            leg.session_timer = self.loop.call_later(interval / 2, self._refresh_session,
                                                     leg, interval)
        else:
            wait = interval - min(SESSION_EXPIRY_MARGIN_S, interval / 3)
            leg.session_timer = self.loop.call_later(wait, self._session_expired, leg)
        return headers

    def _stop_session_timer(self, leg: Leg) -> None:
        if leg.session_timer is not None:
            leg.session_timer.cancel()
            leg.session_timer = None

    def _refresh_session(self, leg: Leg, interval: int) -> None:
        """We are the refresher: an UPDATE without SDP at half the interval (RFC 4028 §7.4);
        a peer that does not allow UPDATE is not refreshed (we send no re-INVITEs yet)."""
        leg.session_timer = None
        if leg.state != "confirmed" or leg.call.ended:
            return
        if leg.peer_allows_update:
            req = self._new_request(leg, "UPDATE", [
                ("Session-Expires", f"{interval};refresher=uac"), ("Supported", SUPPORTED)])
            _, sends = self.transactions.send_request(req, leg.addr, self.now(),
                                                      reliable=leg.reliable)
            self._emit(list(sends))
        leg.session_timer = self.loop.call_later(interval / 2, self._refresh_session,
                                                 leg, interval)

    def _session_expired(self, leg: Leg) -> None:
        """No refresh came in the interval (RFC 4028 §10): end the call with BYE."""
        leg.session_timer = None
        if leg.state == "confirmed" and not leg.call.ended:
            log.info("call %s: session timer of %s expired", leg.call.call_id, leg.media_id)
            self._hangup_call(leg.call, "SessionExpired", 408)

    # ------------------------------------------------------------ REFER (RFC 3515)

    def _on_refer(self, leg: Leg, req: SipRequest, key: TransactionKey) -> None:
        """A blind transfer asked by a party: on an IVR call the caller is connected to the
        target (the IVR ends with `Transfer(<target>)`); in a bridge the referrer's peer is,
        and the referrer is released once told. The referrer hears how it went in NOTIFYs
        of its implicit subscription (`message/sipfrag`)."""
        call = leg.call
        refer_to = req.headers.get("Refer-To")
        if leg.state != "confirmed" or call.ended:
            self._respond(key, req, 403, "REFER Outside A Confirmed Dialog")
            return
        if not refer_to:
            self._respond(key, req, 400, "Missing Refer-To")
            return
        uri = parse_name_addr(refer_to).uri
        if "replaces" in str(uri).lower():
            self._respond(key, req, 501, "Attended Transfer Not Supported")
            return
        # One policy for every leg (DESIGN §6): the referrer may ask for what it could
        # have called itself, and an unknown caller not at all unless its route says so.
        if not self.policy.may_refer(leg.peer, call.route):
            self.stats["refers_refused"] += 1
            log.info("call %s: REFER from %s party refused", call.call_id, leg.peer.kind.value)
            self._respond(key, req, 403, "Forbidden (transfer not allowed)")
            return
        destination = self._classify_target(self._refer_target(uri))
        decision = self.policy.decide(leg.peer, destination)
        if not decision.allowed and decision.status != 404:  # nobody there: NOTIFY 404
            self.stats["refers_refused"] += 1
            log.info("call %s: REFER to %r refused for a %s party", call.call_id,
                     _reason_phrase(destination.name, 80), leg.peer.kind.value)
            self._respond(key, req, 403, "Forbidden (transfer target not allowed)")
            return
        target = destination.name
        bridged = (call.a is not None and call.b is not None and leg in (call.a, call.b)
                   and call.a.state == call.b.state == "confirmed" and call.bridged_at)
        ivr = (leg is call.a and call.b is None and not call.ringing
               and call.queue_run is None and call.ws_bridge is None)
        if call.referrer is not None or not (bridged or ivr):
            self._respond(key, req, 403, "Transfer Not Possible Now")
            return
        self._respond(key, req, 202, headers=[("Contact", self._contact(leg.reliable))])
        call.referrer = leg
        call.refer_event = f"refer;id={req.cseq[0]}"  # RFC 3515 §2.4.6
        self._notify_refer(leg, call.refer_event, "100 Trying", final=False)
        log.info("call %s: REFER from %s to %s", call.call_id, leg.media_id, target)
        session = call.session
        if session is not None and not session.done:
            session.closing = True
            self._session_input(session, m.CallEndedInput(reason=f"Transfer({target})"))
        if ivr:
            if leg.worker is not None:
                self.send_media(leg.worker, m.MediaStop(call_id=leg.media_id))
        else:
            # The referrer leaves the bridge; its peer becomes the call's caller side.
            other = call.b if leg is call.a else call.a
            call.a, call.b = other, None
            call.detached.append(leg)
        self._transfer(call, target)

    @staticmethod
    def _refer_target(uri: Any) -> str:
        """A Refer-To URI as a transfer target: scheme, user, host and port only (its
        parameters and headers are the referrer's to set, not ours to dial)."""
        user = uri.user or ""
        return f"{uri.scheme}:{user + '@' if user else ''}{uri.host}" + (
            f":{uri.port}" if uri.port else "")

    def _classify_target(self, target: str) -> Destination:
        """A transfer target (an extension, or a SIP URI, ours or elsewhere) as a policy
        destination; a URI naming this PBX is the extension of its user part."""
        user = target
        if target.lower().startswith(("sip:", "sips:")):
            try:
                uri = parse_uri(target)
            except SipError:
                return Destination(DestinationKind.NONE, target)
            if not self.policy.is_local(uri.host, uri.port):
                return Destination(DestinationKind.URI, target)
            user = uri.user or ""
        if user and self.registrar.lookup(user, self.now()):
            return Destination(DestinationKind.USER, user)
        return Destination(DestinationKind.NONE, user)

    def _authorized_target(self, call: Call, party: Party, target: str) -> str | None:
        """The target to dial for a transfer `party` asks for (a URI naming us becomes
        the extension), or None when the policy refuses it: the call is then ended with
        `TransferFailed(<target>)` and 403. A target nobody answers to is left to the
        dialling to find out (404, or a skill group's next member)."""
        destination = self._classify_target(target)
        decision = self.policy.decide(party, destination)
        if decision.allowed or decision.status == 404:
            return destination.name
        self.stats["transfers_refused"] += 1
        shown = _reason_phrase(target, 80)
        log.info("call %s: transfer to %r refused for a %s party", call.call_id, shown,
                 party.kind.value)
        self._hangup_call(call, f"TransferFailed({shown})", 403)
        return None

    def _notify_refer(self, leg: Leg, event: str, status_line: str, *, final: bool) -> None:
        state = ("terminated;reason=noresource" if final
                 else f"active;expires={REFER_SUBSCRIPTION_S}")
        req = self._new_request(leg, "NOTIFY", [("Event", event), ("Subscription-State", state)],
                                body=f"SIP/2.0 {status_line}\r\n".encode(),
                                content_type="message/sipfrag;version=2.0")
        _, sends = self.transactions.send_request(req, leg.addr, self.now(),
                                                  reliable=leg.reliable)
        self._emit(list(sends))

    def _refer_result(self, call: Call, status: int, reason: str) -> None:
        """The transfer a REFER asked for succeeded (200) or failed: the final NOTIFY; a
        referrer detached from its bridge is then released."""
        leg, call.referrer = call.referrer, None
        if leg is None or leg.state != "confirmed":
            return
        reason = reason or REASON_PHRASES.get(status, "Failed")
        self._notify_refer(leg, call.refer_event, f"{status} {reason}", final=True)
        if leg in call.detached and status < 300:
            self._send_bye(leg)
            self._drop_detached(leg)

    def _drop_detached(self, leg: Leg) -> None:
        call = leg.call
        leg.state = "terminated"
        self._end_source_call(leg)  # (a referrer may leave before it ever ACKed our 200)
        self._stop_session_timer(leg)
        self.retransmitter.ack(self._dkey(leg))
        self._release_media(leg)
        if leg in call.detached:
            call.detached.remove(leg)
        self.loop.call_later(CLIENT_TXN_LINGER_S, self.dialogs.pop, leg.dialog_key, None)

    # ------------------------------------------------------------ our requests

    def _via(self, reliable: bool) -> str:
        transport = "TCP" if reliable else "UDP"
        return f"SIP/2.0/{transport} {self.host}:{self.port};branch={new_branch()};rport"

    def _new_request(self, leg: Leg, method: str, extra: list[tuple[str, str]] | None = None,
                     body: bytes = b"", content_type: str | None = None) -> SipRequest:
        leg.local_cseq += 1
        h = Headers()
        h.add("Via", self._via(leg.reliable))
        h.add("Max-Forwards", "70")
        h.add("From", leg.local_party)
        h.add("To", leg.remote_party)
        h.add("Call-ID", leg.sip_call_id)
        h.add("CSeq", f"{leg.local_cseq} {method}")
        for route in leg.route_set:
            h.add("Route", route)
        h.add("Contact", self._contact(leg.reliable))
        h.add("User-Agent", USER_AGENT)
        for name, value in extra or []:
            h.add(name, value)
        if body:
            h.add("Content-Type", content_type or "application/sdp")
        return SipRequest(method, leg.remote_target, h, body)

    def _send_bye(self, leg: Leg, code: int | None = None, text: str = "") -> None:
        if leg.state != "confirmed":
            return
        extra = []
        if code is not None:
            # RFC 3326 Reason; the text comes from the provider's side: keep it one safe line.
            extra.append(("Reason", f'SIP;cause={code};text="{_reason_phrase(text) or "Call ended"}"'))
        req = self._new_request(leg, "BYE", extra)
        leg.state = "terminated"
        key, sends = self.transactions.send_request(req, leg.addr, self.now(),
                                                    reliable=leg.reliable)
        self._emit(list(sends))

    # ------------------------------------------------------------ outbound legs (B2BUA)

    def _resolve_target(self, target: str) -> tuple[str, str, int] | None:
        """An extension (static contact first, then its registered contacts) or a SIP URI
        → (Request-URI, host, port). A phone registered over UDP is reached where its
        REGISTER came from (it may be behind NAT); over TCP, on its registration
        connection while that is open (RFC 5626 §5.3 flow reuse), else at its Contact with
        `;transport=tcp`."""
        uri_text: str | None = None
        source: Addr | None = None
        bindings = self.registrar.lookup(target, self.now())
        if bindings:
            binding = bindings[0]
            uri_text, source = binding.uri, binding.source
            if (binding.transport or "").upper() == "TCP":
                if not _wants_tcp(uri_text):
                    uri_text = _with_tcp(uri_text)
                if source is not None and not self.is_connected(source):
                    source = None
        elif target.startswith(("sip:", "sips:")):
            uri_text = target
        if uri_text is None:
            return None
        try:
            uri = parse_uri(uri_text)
        except SipError:
            return None
        if source is not None:
            return uri_text, source[0], source[1]
        return uri_text, uri.host.strip("[]"), uri.port or 5060

    def _transfer(self, call: Call, target: str) -> None:
        a = call.a
        if a is None or a.state == "terminated":
            return
        if call.b is not None and call.b.state != "terminated":
            log.warning("call %s: a second transfer while one is running; ignored",
                        call.call_id)
            return
        call.transfer_target = target
        resolved = self._resolve_target(target)
        if resolved is None:
            log.info("call %s: transfer target %r not found", call.call_id, target)
            self._hangup_call(call, f"TransferFailed({target})", 404)
            return
        call.b = self._out_leg(call, target, resolved, f"{call.call_id}-b")
        self._spawn(self._call_out(call, call.b), call)

    def _out_leg(self, call: Call, target: str, resolved: tuple[str, str, int],
                 media_id: str) -> Leg:
        """A new outbound leg of the call to `target` (an extension or a SIP URI; not
        yet sent: `_call_out` does that)."""
        ruri, host, port = resolved
        # The extension we ring is one of ours (its REFERs are an extension's); anyone
        # else we reach by URI is a stranger to the policy.
        peer = (Party(PartyKind.EXTENSION, target) if target in self.settings.users
                else Party(PartyKind.ANONYMOUS))
        b = Leg(
            call=call, sip_call_id=new_call_id(self.host), local_tag=new_tag(),
            media_id=media_id, outbound=True, addr=(host, port),
            reliable=_wants_tcp(ruri), peer=peer,
        )
        # Caller ID is policy, never an unverified From copied through (DESIGN §6).
        caller_id = self.policy.presented_caller_id(call.party)
        b.local_party = f"<sip:{caller_id}@{self.host}:{self.port}>;tag={b.local_tag}"
        b.remote_party = f"<{ruri}>"
        b.remote_target = ruri
        return b

    async def _call_out(self, call: Call, b: Leg) -> None:
        a = call.a
        assert a is not None
        host, port = b.addr
        if not _is_ip(host):
            try:
                infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
                b.addr = (str(infos[0][4][0]), port)
            except (OSError, IndexError):
                self._setup_failed(b, f"TransferFailed({call.transfer_target})", 404)
                return
        # Both legs must be on one worker: the bridge is local to it.
        if a.worker is None:
            self._setup_failed(b, "TransferFailed(media)", 503)
            return
        if call.ended or b.state == "terminated":  # the caller left, or a queue moved on
            return
        if not self._allocate(b, inband_dtmf=False, worker=a.worker):
            self._setup_failed(b, "TransferFailed(media)", 503)
            return
        offer = sdp.make_offer(b.rtp_ip, b.rtp_port, int(time.time()))
        b.answer_sdp = offer  # what we answer a re-INVITE on this leg with
        req = self._new_request(b, "INVITE", body=offer)
        b.invite = req
        key, sends = self.transactions.send_request(req, b.addr, self.now(),
                                                    reliable=b.reliable)
        b.invite_key = key
        self.client_txns[key] = b
        self.dialogs[b.dialog_key] = b
        self._emit(list(sends))
        if b.member is None:  # a queue member rings as long as its queue wait says
            b.ring_timer = self.loop.call_later(
                self.settings.sip.ring_timeout_ms / 1000, self._ring_timeout, b
            )

    def _setup_failed(self, b: Leg, reason: str, code: int) -> None:
        """An outbound leg could not even be sent: a queue tries its next member, a
        transfer ends the call."""
        if b.member is not None:
            self._outbound_failed(b, code)
        else:
            self._hangup_call(b.call, reason, code)

    def _ring_timeout(self, b: Leg) -> None:
        b.ring_timer = None
        if b.state == "early":
            self._cancel_outbound(b)
            self._outbound_failed(b, 408)

    def _cancel_outbound(self, b: Leg) -> None:
        """CANCEL a ringing outbound leg; before any 1xx it waits for one (RFC 3261 §9.1)."""
        if b.invite is None or b.invite_key is None:
            return
        if not b.provisional_seen:
            b.cancel_pending = True
            return
        b.cancel_pending = False
        _, sends = self.transactions.send_request(make_cancel(b.invite), b.addr, self.now(),
                                                  reliable=b.reliable)
        self._emit(list(sends))
        # Timer C's role: if no final response ever comes, forget the INVITE's owner.
        self.loop.call_later(CLIENT_TXN_LINGER_S, self.client_txns.pop, b.invite_key, None)

    def _on_response(self, resp: SipResponse, key: TransactionKey) -> None:
        leg = self.client_txns.get(key)
        if leg is None:
            return
        if resp.cseq[1] != "INVITE":
            if resp.status >= 200:
                self.client_txns.pop(key, None)
            return
        if resp.status < 200:
            leg.provisional_seen = True
            if leg.cancel_pending:
                self._cancel_outbound(leg)
            elif resp.status in (180, 183):
                self._relay_ringing(leg.call)
            return
        if resp.status >= 300:
            self.client_txns.pop(key, None)
            if leg.state == "early":
                self._outbound_failed(leg, resp.status)
            return
        # 2xx: ACK every one (retransmissions included, RFC 3261 §13.2.2.4).
        if leg.remote_tag is not None and resp.to_tag != leg.remote_tag:
            self._end_stray_dialog(leg, resp)  # a second fork answered
            return
        if leg.remote_tag is None:
            self.loop.call_later(CLIENT_TXN_LINGER_S, self.client_txns.pop, key, None)
            self._learn_dialog(leg, resp)
        self._send_ack(leg, leg.remote_party, leg.remote_target, leg.addr)
        if leg.state == "early" and not leg.cancel_pending:
            self._outbound_answered(leg, resp)
        elif leg.state != "confirmed" and not leg.late_bye_sent:
            # Answered after we gave up on it (ring timeout, caller gone): RFC 3261 §15.
            leg.late_bye_sent = True
            leg.state = "confirmed"
            self._send_bye(leg)

    def _relay_ringing(self, call: Call) -> None:
        """Tell a still-unanswered caller that the callee rings (no IVR media to relay)."""
        a = call.a
        if (a is None or a.state != "early" or a.invite is None or a.invite_key is None
                or call.session is not None):
            return
        self._respond(a.invite_key, a.invite, 180, to_tag=a.local_tag,
                      headers=self._dialog_headers(a))

    def _learn_dialog(self, leg: Leg, resp: SipResponse) -> None:
        """The dialog state a 2xx establishes on our outbound leg (RFC 3261 §12.1.2)."""
        leg.remote_tag = resp.to_tag
        leg.remote_party = resp.headers.get("To") or leg.remote_party
        # The UAC route set is the Record-Route list in reverse.
        leg.route_set = list(reversed(resp.headers.get_all("Record-Route")))
        contact = resp.headers.get("Contact")
        if contact:
            try:
                leg.remote_target = str(parse_name_addr(contact).uri)
            except SipError:
                pass
        if not leg.reliable:  # over TCP the connection we opened carries the dialog
            leg.addr = self._next_hop(leg, fallback=leg.addr)

    def _send_ack(self, leg: Leg, to: str, target: str, addr: Addr) -> None:
        assert leg.invite is not None
        h = Headers()
        h.add("Via", self._via(leg.reliable))
        h.add("Max-Forwards", "70")
        h.add("From", leg.local_party)
        h.add("To", to)
        h.add("Call-ID", leg.sip_call_id)
        h.add("CSeq", f"{leg.invite.cseq[0]} ACK")
        for route in leg.route_set:
            h.add("Route", route)
        ack = SipRequest("ACK", target, h)
        self._emit(list(self.transactions.send_stateless(ack, addr, reliable=leg.reliable)))

    def _end_stray_dialog(self, leg: Leg, resp: SipResponse) -> None:
        """ACK and BYE a 2xx from another fork than the one we kept (RFC 3261 §13.2.2.4)."""
        to = resp.headers.get("To") or leg.remote_party
        target = leg.remote_target
        contact = resp.headers.get("Contact")
        if contact:
            try:
                target = str(parse_name_addr(contact).uri)
            except SipError:
                pass
        self._send_ack(leg, to, target, leg.addr)
        stray = Leg(call=leg.call, sip_call_id=leg.sip_call_id, local_tag=leg.local_tag,
                    media_id="", outbound=True, addr=leg.addr, local_party=leg.local_party,
                    remote_party=to, remote_target=target, local_cseq=leg.local_cseq + 100,
                    state="confirmed", reliable=leg.reliable)
        self._send_bye(stray)

    def _outbound_answered(self, b: Leg, resp: SipResponse) -> None:
        if b.ring_timer is not None:
            b.ring_timer.cancel()
            b.ring_timer = None
        b.state = "confirmed"
        call = b.call
        a = call.a
        if call.ended or a is None or a.state == "terminated":
            self._send_bye(b)
            self._release_media(b)
            return
        try:
            b.negotiated = sdp.parse_answer(resp.body)
        except SipError as exc:
            log.info("call %s: bad SDP answer from %s: %s", call.call_id, b.remote_target, exc)
            self._send_bye(b)
            if b.member is not None:
                self._outbound_failed(b, 488)  # the queue tries someone else
            else:
                self._hangup_call(call, "TransferFailed(sdp)", 488)
            return
        if b.member is not None and not self.queue_calls.member_answered(b):
            self._send_bye(b)  # another member was quicker, or the wait is over
            self._release_media(b)
            return
        if a.state == "early":
            self._answer_leg(a)  # early-media call: answered when the transfer is
        self._send_remote(b)
        if a.worker is not None:
            self.send_media(a.worker, m.MediaStop(call_id=a.media_id))
            self.send_media(a.worker, m.MediaBridge(call_id=a.media_id, peer_call_id=b.media_id))
        call.bridged_at = time.time()
        self._publish_call(call, "bridged")
        self._refer_result(call, 200, "OK")

    def _outbound_failed(self, b: Leg, status: int) -> None:
        if b.ring_timer is not None:
            b.ring_timer.cancel()
            b.ring_timer = None
        b.state = "terminated"
        self._release_media(b)
        call = b.call
        if b.member is not None:
            self.queue_calls.member_failed(b, status)
            return
        log.info("call %s: transfer to %s failed with %d", call.call_id, call.transfer_target,
                 status)
        self._hangup_call(call, f"TransferFailed({status})", status)

    def _on_client_timeout(self, key: TransactionKey) -> None:
        leg = self.client_txns.pop(key, None)
        if leg is not None and key.method == "INVITE" and leg.state == "early":
            self._outbound_failed(leg, 408)

    # ------------------------------------------------------------ call teardown

    def _hangup_call(self, call: Call, reason: str, code: int | None,
                     except_leg: Leg | None = None) -> None:
        """End every leg of the call: BYE where confirmed, CANCEL where ringing out, a
        final response where an inbound INVITE is unanswered (early media)."""
        if call.referrer is not None:
            status = code if code is not None and 300 <= code <= 699 else 487
            self._refer_result(call, status, "Request Terminated" if status == 487 else "")
        for leg in call.legs():
            if leg is except_leg:
                continue
            if leg.state == "confirmed":
                self._send_bye(leg, code if leg is call.a else None, reason)
            elif leg.state == "early" and leg.outbound:
                self._cancel_outbound(leg)
                leg.state = "terminated"
            elif leg.state == "early" and leg.invite_key is not None:
                assert leg.invite is not None
                self.pending_invites.pop(leg.invite_key, None)
                final = code if code is not None and 300 <= code <= 699 else 480
                self._respond(leg.invite_key, leg.invite, final, to_tag=leg.local_tag)
                leg.state = "terminated"
        self._end_call(call, reason, code)

    def _end_call(self, call: Call, reason: str, code: int | None) -> None:
        if call.ended:
            return
        call.ended = True
        call.end_reason, call.end_code = reason, code
        call.ended_at = time.time()
        # Legs whose RTP statistics (MediaReleased) the call record waits for.
        stats_legs = {leg.media_id: name for name, leg in (("a", call.a), ("b", call.b))
                      if leg is not None and leg.worker is not None}
        for leg in call.legs():
            self._end_source_call(leg)
            if leg.ring_timer is not None:
                leg.ring_timer.cancel()
                leg.ring_timer = None
            self._stop_session_timer(leg)
            self.retransmitter.ack(self._dkey(leg))
            self._release_media(leg)
            # Keep the dialog a while so retransmitted BYEs still match (then 481 is fine).
            self.loop.call_later(CLIENT_TXN_LINGER_S, self.dialogs.pop, leg.dialog_key, None)
        session = call.session
        if session is not None and not session.done:
            self._session_input(session, m.CallEndedInput(reason="Hangup"))
        self.queue_calls.call_ended(call)
        self.calls.pop(call.call_id, None)
        self._publish_call(call, "ended")
        self.records.finish(call_record(call), stats_legs, self.now())
        self._arm_timer()

    async def shutdown(self) -> None:
        """On SIGTERM: end every call properly so phones are not left in dead calls."""
        for call in list(self.calls.values()):
            try:
                self._hangup_call(call, "Shutdown", 503)
            except Exception:
                log.exception("call %s: could not end it at shutdown", call.call_id)
        await asyncio.sleep(0.2)  # let the BYEs and final responses leave
        self.records.flush_all()

    # ------------------------------------------------------------ media plane

    def _allocate(self, leg: Leg, inband_dtmf: bool, worker: bytes | None = None) -> bool:
        """An RTP port for the leg, handed out here from a worker's announced pool: on
        `worker` if given (alive, with a free port), else on the least-loaded live worker
        with one. The leg gets the worker's declared address and the port at once; the
        worker confirms with MediaAllocated (`on_media_message`). False: no port."""
        handout = self.media_workers.hand_out(leg.media_id, self.now(), worker)
        if handout is None:
            return False
        leg.worker, leg.rtp_port = handout.worker, handout.port
        # Never an SDP answer pointing where the worker did not declare itself.
        leg.rtp_ip = self.media_workers.address_of(handout.worker) or ""
        self.legs_by_media[leg.media_id] = leg
        if not self.send_media(handout.worker, m.MediaAllocate(
                call_id=leg.media_id, rtp_port=handout.port, seq=handout.seq,
                inband_dtmf=inband_dtmf)):
            self._forget_media(leg)
            return False
        return True

    def _send_remote(self, leg: Leg) -> None:
        n = leg.negotiated
        if n is None or leg.worker is None:
            return
        address, direction = (n.remote_ip, n.remote_port), n.direction
        if n.remote_ip in ("0.0.0.0", "::"):
            # RFC 2543 hold (RFC 3264 §8.4): nowhere to send; keep the last address and
            # stop sending until a new offer resumes.
            if leg.media_address is None:
                return
            address, direction = leg.media_address, "inactive"
        leg.media_address = address
        self.send_media(leg.worker, m.MediaRemote(
            call_id=leg.media_id, remote_ip=address[0], remote_port=address[1],
            payload_type=n.payload_type, codec=n.codec,  # type: ignore[arg-type]
            dtmf_payload_type=n.dtmf_payload_type, ptime_ms=n.ptime_ms,
            direction=direction,  # type: ignore[arg-type]
        ))

    def _forget_media(self, leg: Leg) -> None:
        """Drop our record of the leg's port (and the load it counted) without a release."""
        if leg.worker is not None:
            self.media_workers.release(leg.worker, leg.rtp_port)
        leg.worker = None
        self.legs_by_media.pop(leg.media_id, None)

    def _release_media(self, leg: Leg) -> None:
        if leg.worker is None:
            return
        self.send_media(leg.worker, m.MediaRelease(call_id=leg.media_id))
        self._forget_media(leg)

    def on_media_message(self, identity: bytes, msg: Any) -> None:
        now = self.now()
        if isinstance(msg, m.MediaReady | m.MediaHeartbeat):
            declared = self.media_workers.address_of(identity)
            if not self.settings.media.rtp_ip_allowed(msg.rtp_ip) or declared not in (
                    None, msg.rtp_ip):
                self.stats["media_workers_rejected"] += 1
                log.warning("media worker %.64r declares RTP address %.64r, which is %s: "
                            "refused", identity, msg.rtp_ip,
                            f"not the {declared!r} it declared first" if declared is not None
                            else "not [media] rtp_ip or in worker_rtp_ips")
                return
            if self.media_workers.ready(identity, msg.capacity, msg.calls, now, msg.rtp_ip):
                log.info("media worker %s joined (capacity %d, RTP address %s)",
                         msg.worker_id, msg.capacity, msg.rtp_ip)
            if isinstance(msg, m.MediaHeartbeat):  # counts since the worker's last heartbeat
                self.stats["rtp_foreign_dropped"] += msg.rtp_foreign_dropped
                self.stats["rtcp_foreign_dropped"] += msg.rtcp_foreign_dropped
                self.media_workers.announce(identity, msg.ports, msg.allocate_seq)
            return
        if not self.media_workers.seen(identity, now):
            log.info("message from unknown media worker %.64r; ignored until it says ready",
                     identity)
            return
        if isinstance(msg, m.MediaPorts):
            self.media_workers.announce(identity, msg.ports, msg.allocate_seq)
        elif isinstance(msg, m.MediaAllocated):
            asked = self.legs_by_media.get(msg.call_id)
            if asked is None:
                return  # the leg ended: its MediaRelease followed the MediaAllocate
            if asked.worker != identity:
                # Only the worker asked answers for a leg: another cannot end its call.
                self.stats["media_allocations_rejected"] += 1
                log.warning("media worker %.64r answered the allocation of %.64s asked of "
                            "%.64r: ignored", identity, msg.call_id, asked.worker)
                return
            if (msg.error is None and msg.rtp_ip == asked.rtp_ip
                    and msg.rtp_port == asked.rtp_port):
                self.media_workers.confirm(identity, msg.rtp_port, msg.call_id)
                return
            if msg.error is None:  # the leg's SDP says another address or port
                self.stats["media_allocations_rejected"] += 1
                log.warning("media worker %.64r allocated %s at %.64r port %d, not the "
                            "%.64r port %d it was given: ending the call", identity,
                            msg.call_id, msg.rtp_ip, msg.rtp_port, asked.rtp_ip,
                            asked.rtp_port)
            else:
                self.stats["media_allocations_failed"] += 1
                log.warning("media worker %.64r refused port %d for %s (%.200s): ending the "
                            "call", identity, asked.rtp_port, msg.call_id, msg.error)
                self._forget_media(asked)  # it holds nothing to release
            self._hangup_call(asked.call, "MediaAllocationFailed", 503)
        elif isinstance(msg, m.MediaEvent):
            leg = self.legs_by_media.get(msg.call_id)
            if leg is None or leg.worker != identity:
                return
            if leg is leg.call.a:
                self._on_leg_media_event(leg.call, msg.event)
        elif isinstance(msg, m.MediaReleased):
            log.debug("leg %s released: %d packets sent, %d received", msg.call_id,
                      msg.packets_sent, msg.packets_received)
            self.records.media_released(msg.call_id, msg.model_dump(
                mode="json", exclude={"v", "kind", "call_id"}))

    def expire_workers(self) -> None:
        """Drop silent workers, end the calls of a dead media worker, re-send the events of
        a dead executor, and give up on IVR events nobody answers."""
        now = self.now()
        for identity in self.media_workers.expire(now):
            log.warning("media worker %r stopped heartbeating: ending its calls", identity)
            for leg in [lg for lg in self.legs_by_media.values() if lg.worker == identity]:
                self._forget_media(leg)
                try:
                    self._hangup_call(leg.call, "MediaWorkerLost", 503)
                except Exception:
                    log.exception("call %s: could not end it", leg.call.call_id)
        for identity, media_id in self.media_workers.overdue(now - MEDIA_ALLOCATE_TIMEOUT_S):
            unconfirmed = self.legs_by_media.get(media_id)
            if unconfirmed is None or unconfirmed.worker != identity:
                continue
            self.stats["media_allocations_failed"] += 1
            log.warning("media worker %.64r did not confirm port %d for %s: ending the call",
                        identity, unconfirmed.rtp_port, media_id)
            try:
                self._hangup_call(unconfirmed.call, "MediaAllocationFailed", 503)
            except Exception:
                log.exception("call %s: could not end it", unconfirmed.call.call_id)
        for identity in self.executors.expire(now):
            log.warning("IVR executor %r stopped heartbeating: re-sending its events", identity)
            self._executor_lost(identity)
        self._check_sessions(now)

    # ------------------------------------------------------------ IVR plane

    def _start_session(self, call: Call, req: SipRequest) -> None:
        route = call.route
        assert route is not None
        session_id = f"{call.call_id}"
        # Credentials stay in the front (DESIGN §6): no secret header ([privacy]
        # secret_headers, Authorization and Proxy-Authorization always) is a sip_* variable.
        headers = {name: value for name, value in req.headers.items()
                   if name not in ("Via", "Content-Length")
                   and not is_secret_header(name)}
        info = m.CallInfo(
            call_id=call.call_id, session_id=session_id, caller=call.caller,
            callee=call.callee, route_name=route.name, params=route.app_params,
            sip_headers=headers, variables=self._call_variables(call),
        )
        self._open_session(call, info)

    @staticmethod
    def _call_variables(call: Call) -> dict[str, str]:
        """Variables every session of the call starts with: `caller_trust` tells the
        provider whether `caller` was verified (extension: digest; trusted: a trusted
        network; anonymous: an unverified From)."""
        return {"caller_trust": call.party.kind.value}

    def _open_session(self, call: Call, info: m.CallInfo) -> None:
        session = Session(session_id=info.session_id, call=call, info=info)
        call.session = session
        call.session_ids.append(info.session_id)
        self.sessions[info.session_id] = session
        self._session_input(session, m.SessionStartInput(call=info))

    def _restart_session(self, call: Call, variables: dict[str, str]) -> None:
        """Start the route's IVR again on the call (back from a queue): a new session
        (`<call id>-<n>`) with the first one's call info and these variables."""
        old = call.session
        if call.ended or old is None:
            return
        if not old.done:  # cannot happen after a queue command; never run two sessions
            log.warning("call %s: session %s still running; not restarting", call.call_id,
                        old.session_id)
            return
        session_id = f"{call.call_id}-{len(call.session_ids) + 1}"
        info = old.info.model_copy(update={
            "session_id": session_id,
            "variables": {**self._call_variables(call), **variables}})
        self._open_session(call, info)

    def _session_input(self, session: Session, item: Any) -> None:
        session.queue.append(item)
        self._dispatch(session)

    def _dispatch(self, session: Session, resend: bool = False,
                  exclude: frozenset[bytes] = frozenset()) -> None:
        """Send the session's next event, one in flight at a time (DESIGN §1)."""
        now = self.now()
        if session.in_flight is None:
            if not session.queue:
                return
            session.seq += 1
            session.attempts = 0
            session.dispatched_at = now
            session.wait_started = session.wait_deadline = None  # an event came
            session.in_flight = m.IvrEvent(
                session_id=session.session_id, seq=session.seq, state=session.state,
                input=session.queue.popleft(),
            )
        elif not resend:
            return
        while True:
            executor = self.executors.choose(now, exclude)
            if executor is None:
                if session.unplaced_since is None:
                    session.unplaced_since = now
                if session.waiting_since is None:
                    session.waiting_since = now
                    self.waiting_sessions.append(session)
                return
            session.executor = executor
            session.sent_at = now
            session.attempts += 1
            session.waiting_since = None
            if self.send_ivr(executor, session.in_flight):
                session.unplaced_since = None
                return
            # Its queue is full or it is gone: try the others for this event.
            self.executors.release(executor)
            exclude = exclude | {executor}

    def _executor_lost(self, identity: bytes) -> None:
        for session in list(self.sessions.values()):
            if session.executor == identity and session.in_flight is not None:
                session.executor = None
                self._dispatch(session, resend=True, exclude=frozenset({identity}))

    def _refresh_in_flight(self, identity: bytes, working: dict[str, int], now: float) -> None:
        """An executor's heartbeat lists what it works on: those events stay alive however
        long they take; one it should have but does not list was lost on the way."""
        grace_s = 2 * self.settings.ivr.heartbeat_ms / 1000 + 1.0
        for session in list(self.sessions.values()):
            if session.executor != identity or session.in_flight is None:
                continue
            if working.get(session.session_id) == session.in_flight.seq:
                session.sent_at = now
            elif now - session.sent_at > grace_s:
                log.warning("session %s: event %d lost on the way to %r; re-sending",
                            session.session_id, session.in_flight.seq, identity)
                self.executors.release(identity)
                session.executor = None
                self._dispatch(session, resend=True)

    def _reply_deadline_s(self, session: Session) -> float:
        retry = session.info.params.retry
        budget = (retry.max_retries + 1) * (retry.timeout_ms / 1000 + 0.1)
        return budget + IVR_REPLY_MARGIN_S

    def _check_sessions(self, now: float) -> None:
        """No session waits in silence (issue 8). One waiting for a call event past its
        deadline gets a WaitExpiredInput (its provider an `error` event). An event nobody
        answers is re-sent once to another executor; then the call ends; so does one
        that executors keep working on past `[sessions] max_event_ms`, and a session no
        executor can take for IVR_NO_EXECUTOR_S."""
        watch = self.settings.sessions
        for session in list(self.sessions.values()):
            if session.done:
                continue
            if session.in_flight is None:
                if (not session.queue and session.wait_deadline is not None
                        and now >= session.wait_deadline):
                    self._wait_expired(session, now)
                continue
            if now - session.dispatched_at > watch.max_event_ms / 1000:
                log.warning("session %s: event %d still unanswered after %.0f s; ending "
                            "the call", session.session_id, session.in_flight.seq,
                            now - session.dispatched_at)
                if session.executor is not None:
                    self.executors.release(session.executor)
                self._abandon_session(session, "IvrTimeout",
                                      f"event {session.in_flight.seq} unanswered for "
                                      f"{now - session.dispatched_at:.0f} s")
                continue
            if session.executor is None:
                if session.unplaced_since is not None and (
                        now - session.unplaced_since > IVR_NO_EXECUTOR_S):
                    log.warning("session %s: no IVR executor available; ending the call",
                                session.session_id)
                    self._abandon_session(session, "NoExecutor",
                                          f"no IVR executor took event "
                                          f"{session.in_flight.seq} for "
                                          f"{now - session.unplaced_since:.0f} s")
                continue
            if now - session.sent_at < self._reply_deadline_s(session):
                continue
            stuck = session.executor
            if session.attempts < 2:
                log.warning("session %s: no reply from %r; re-sending", session.session_id,
                            stuck)
                self.executors.release(stuck)
                session.executor = None
                self._dispatch(session, resend=True, exclude=frozenset({stuck}))
            else:
                log.warning("session %s: no reply after %d attempts; ending the call",
                            session.session_id, session.attempts)
                self.executors.release(stuck)
                self._abandon_session(session, "IvrTimeout",
                                      f"no reply to event {session.in_flight.seq} after "
                                      f"{session.attempts} attempts")

    def _wait_expired(self, session: Session, now: float) -> None:
        """The session heard no call event by its deadline: what it waited for was lost
        (a media command or its event). It is told, and tells its provider."""
        started = session.wait_started if session.wait_started is not None else now
        waited_ms = max(0, round((now - started) * 1000))
        log.warning("session %s: no call event for %d ms (its own bound: %s): telling "
                    "the session", session.session_id, waited_ms,
                    "none" if session.wait_ms is None else f"{session.wait_ms} ms")
        self.stats["ivr_waits_expired"] += 1
        session.wait_started = session.wait_deadline = None
        self._session_input(session, m.WaitExpiredInput(waited_ms=waited_ms))

    def _abandon_session(self, session: Session, reason: str, detail: str = "") -> None:
        """Give up on the session: the call ends with `reason`, and the trace says why."""
        self._front_trace(session, f"{reason}: {detail}" if detail else reason, reason)
        session.done = True
        session.in_flight = None
        session.executor = None
        session.queue.clear()
        self.sessions.pop(session.session_id, None)
        self._hangup_call(session.call, reason, 500)

    def _front_trace(self, session: Session, error: str, end_reason: str | None) -> None:
        """A step trace the front writes itself (no executor saw what went wrong)."""
        index = int((session.state or {}).get("step_index", 0)) + 1
        self._record_trace(m.StepTrace(
            call_id=session.call.call_id, session_id=session.session_id, step_index=index,
            trigger="front", error=error, end_reason=end_reason, at=time.time()))

    def on_ivr_message(self, identity: bytes, msg: Any) -> None:
        now = self.now()
        if isinstance(msg, m.IvrReady | m.IvrHeartbeat):
            load = 0 if isinstance(msg, m.IvrReady) else msg.busy
            if self.executors.ready(identity, msg.capacity, load, now):
                log.info("IVR executor %s joined", msg.executor_id)
            if isinstance(msg, m.IvrHeartbeat):
                self._refresh_in_flight(identity, msg.working, now)
            # Take the queue as it is: sessions that still find no room queue up again.
            waiting, self.waiting_sessions = self.waiting_sessions, deque()
            for session in waiting:
                session.waiting_since = None
                if not session.done:
                    self._dispatch(session, resend=True)
            return
        if not self.executors.seen(identity, now):
            return
        if isinstance(msg, m.IvrReply):
            self._on_ivr_reply(identity, msg)

    def _on_ivr_reply(self, identity: bytes, reply: m.IvrReply) -> None:
        session = self.sessions.get(reply.session_id)
        if session is None or session.in_flight is None:
            return  # a late answer from an executor we gave up on
        if identity != session.executor:
            # Only the executor the event went to may steer the call (DESIGN §6).
            self.stats["ivr_replies_rejected"] += 1
            log.warning("session %.64s: reply seq %d from %.64r, but the event went to "
                        "%.64r: ignored", session.session_id, reply.seq, identity,
                        session.executor)
            return
        if reply.seq != session.in_flight.seq:
            return  # an answer to an event already answered
        self.executors.release(identity)
        session.in_flight = None
        session.executor = None
        session.state = reply.state
        for trace in reply.traces:
            self._record_trace(trace)
        call = session.call
        if session.closing and reply.commands:
            # The call left the IVR (a REFER) and the session was told: what it still
            # asked for is obsolete, not lost.
            log.debug("session %s: %d command(s) after the call left the IVR ignored",
                      session.session_id, len(reply.commands))
        for command in reply.commands if not session.closing else ():
            self._apply_command(call, command)
        if reply.done or (call.ended and not session.queue):
            session.done = True
            session.queue.clear()
            self.sessions.pop(session.session_id, None)
            if not call.ended and not session.closing and not self._handed_over(call):
                # The session ended without hanging up or handing the call to anyone
                # (a transfer, queue, agent or WebSocket): nothing would ever end it.
                self._front_trace(session, "the session ended and left the call to "
                                  "nobody", "IvrEndedWithoutHandover")
                self._hangup_call(call, "IvrEndedWithoutHandover", 500)
            return
        if session.in_flight is None and not call.ended:
            # Now it waits for a call event: for as long as the reply says, or at most
            # `[sessions] max_wait_ms` when it gives no bound of its own (issue 8).
            watch = self.settings.sessions
            now = self.now()
            bound_ms = reply.wait_ms if reply.wait_ms is not None else watch.max_wait_ms
            session.wait_ms = reply.wait_ms
            session.wait_started = now
            session.wait_deadline = now + (bound_ms + watch.wait_grace_ms) / 1000
        self._dispatch(session)

    @staticmethod
    def _handed_over(call: Call) -> bool:
        """Whether something other than the IVR now has the call."""
        return ((call.b is not None and call.b.state != "terminated") or bool(call.ringing)
                or call.queue_run is not None or call.ws_bridge is not None)

    def _apply_command(self, call: Call, command: Any) -> None:
        """One command of an executor's reply. A media command either reaches the
        caller's media worker or the call ends with a traced error (issue 8: a command
        dropped in silence leaves a session waiting for an event that never comes)."""
        a = call.a
        if call.ended or a is None:
            return  # the call is over: nothing left to command
        if isinstance(command, m.PlayCommand):
            self._to_media(call, a, command, m.MediaPlay(
                call_id=a.media_id, play_id=command.play_id, file=command.file,
                interruptible=command.interruptible))
        elif isinstance(command, m.StopCommand):
            self._to_media(call, a, command, m.MediaStop(call_id=a.media_id))
        elif isinstance(command, m.TimerCommand):
            self._to_media(call, a, command, m.MediaTimer(
                call_id=a.media_id, timer_id=command.timer_id, delay_ms=command.delay_ms))
        elif isinstance(command, m.HangupCommand):
            self._hangup_call(call, command.reason, command.code)
        elif isinstance(command, m.TransferCommand):
            target = self._authorized_target(call, PROVIDER, command.target)
            if target is not None:
                self._transfer(call, target)
        elif isinstance(command, m.RecordCommand):
            if self._to_media(call, a, command, m.MediaRecord(
                    call_id=a.media_id, **command.model_dump(exclude={"type"}))):
                area_dir = (self.settings.media.recordings_dir if command.area == "recordings"
                            else self.settings.media.voicemail_dir)
                # Completed by the RecordingFinished event; one the call's end cut short
                # keeps reason null (the file is there, written as it went).
                call.recordings.append({
                    "record_id": command.record_id, "path": command.path,
                    "area": command.area, "file": str(Path(area_dir) / command.path),
                    "duration_ms": None, "reason": None})
        elif isinstance(command, m.StopRecordCommand):
            self._to_media(call, a, command, m.MediaRecordStop(call_id=a.media_id))
        elif isinstance(command, m.WsBridgeCommand):
            # The IVR ends here; the bridge's end (WsBridgeEnded) ends the call.
            call.ws_bridge = command.uri
            if a.worker is None:
                self._hangup_call(call, "WsBridgeFailed(media)", 503)
                return
            if self._to_media(call, a, command, m.MediaStop(call_id=a.media_id)) and (
                    self._to_media(call, a, command, m.MediaWsBridge(
                        call_id=a.media_id, uri=command.uri, headers=command.headers,
                        timeout_ms=command.timeout_ms))):
                self._publish_call(call, "ws_bridged")
        elif isinstance(command, m.QueueCommand):
            self.queue_calls.start_queue(call, command)
        elif isinstance(command, m.AgentCommand):
            self.queue_calls.start_agent(call, command)

    def _to_media(self, call: Call, leg: Leg, command: Any, msg: Any) -> bool:
        """Hand a session's command to the leg's media worker. One that cannot be handed
        over (no worker, or the plane refused it) ends the call with a traced error."""
        worker = leg.worker
        if worker is not None and self.send_media(worker, msg):
            return True
        why = ("the caller's leg has no media worker" if worker is None
               else f"media worker {worker.decode(errors='replace')} did not take it")
        log.warning("call %s: %s command lost (%s); ending the call", call.call_id,
                    command.type, why)
        self.stats["ivr_commands_lost"] += 1
        if call.session is not None:
            self._front_trace(call.session, f"{command.type} command lost: {why}",
                              "MediaCommandLost")
        self._hangup_call(call, "MediaCommandLost", 503)
        return False

    def _on_leg_media_event(self, call: Call, event: Any) -> None:
        """A media event of the caller's leg: to the IVR session while it runs; a
        recording's end goes in the call record; the WebSocket bridge's end, once the
        IVR has handed the call to it, ends the call."""
        if isinstance(event, m.RecordingFinished):
            for rec in call.recordings:
                if rec["record_id"] == event.record_id and rec["path"] == event.path:
                    rec.update(duration_ms=event.duration_ms, reason=event.reason)
                    break
            else:
                call.recordings.append({"record_id": event.record_id, "path": event.path,
                                        "duration_ms": event.duration_ms,
                                        "reason": event.reason})
        session = call.session
        if session is not None and not session.done:
            self._session_input(session, m.MediaInput(event=event))
        elif isinstance(event, m.WsBridgeEnded) and call.ws_bridge is not None:
            log.info("call %s: WebSocket bridge ended: %s", call.call_id, event.reason)
            self._hangup_call(call, "WsBridgeEnded", None)

    def _record_trace(self, trace: m.StepTrace) -> None:
        # Redacted by the executor already; again here, in case one did not (DESIGN §6).
        data = redact(trace.model_dump(mode="json"))
        self.traces.add(data)  # bounded store + logs/traces.jsonl
        self._publish({"type": "ivr_step_trace", **data})

    def _publish(self, event: dict[str, Any]) -> None:
        """To the ZeroMQ PUB socket and to in-process listeners (the admin WebSocket)."""
        self.publish(event)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")

    # ------------------------------------------------------------ records

    def _publish_call(self, call: Call, event: str) -> None:
        record: dict[str, Any] = {
            "type": "call", "event": event, "call_id": call.call_id,
            "route": call.route.name if call.route else None,
            "caller": call.caller, "callee": call.callee, "started_at": call.started_at,
            "answered_at": call.answered_at,
        }
        if call.queue_name is not None or call.agent is not None:
            record.update(queue=call.queue_name, agent=call.agent,
                          queue_member=call.queue_member)
        if event == "ended":
            record.update(end_reason=call.end_reason, end_code=call.end_code,
                          ended_at=call.ended_at or time.time(),
                          transfer_target=call.transfer_target)
            record = redact(record)  # a transfer target URI may carry a password or token
            log.info("call %s ended: %s", call.call_id, orjson.dumps(record).decode())
        self._publish(record)

    def snapshot(self) -> dict[str, Any]:
        return {
            "calls": len(self.calls),
            "sessions": len(self.sessions),
            "media_workers": len(self.media_workers),
            "media_ports_free": self.media_workers.free_ports(),
            "executors": len(self.executors),
            "media_legs": len(self.legs_by_media),
            "transactions": len(self.transactions),
            "transactions_over_budget": self.transactions.refused,
            "sources_in_setup": len(self.setup_by_source),
            "sources_with_calls": len(self.calls_by_source),
            **self.stats,
            **self.registrar.stats,
            **self.traces.stats(),
            "traces_log_rotations": self.traces_log.rotations,
            "calls_log_rotations": self.calls_log.rotations,
            **self.retention.stats,
        }

"""What every part of the call layer shares: settings, the call table, the timers, the
pure SIP cores, the clock, and the outbox of commands for the shell.

The call layer does no I/O. What it wants done is appended to `out`, in order, and
the shell (`pbx.front`) carries it out after each entry point:

* `SendBytes` (pbx.sip.transaction) — a SIP message to an address;
* `ToMedia` — a message to a media worker (`lost_ends_call`: a session's command, whose
  loss ends the call, reported back by `CallCore.media_send_failed`);
* `ToIvr` — an event to an IVR executor (a refusal comes back as `ivr_send_failed`);
* `Publish` — a call event for the events plane and in-process listeners;
* `Resolve` — a host name to resolve (the answer comes back as `host_resolved`).

The clock is passed in: each entry point of `CallCore` sets `now` (the loop's monotonic
clock) before anything runs; `wall()` is the same instant on the wall clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pbx.calls.table import CallTable
from pbx.calls.timers import Timers
from pbx.config import Settings
from pbx.metrics import FrontMetrics, setup_outcome
from pbx.policy import Policy
from pbx.records import CallRecords
from pbx.registrar import Registrar
from pbx.registry import MediaWorkerRegistry, WorkerRegistry
from pbx.sip.dialog import LocalAddress
from pbx.sip.message import SipRequest, SipResponse, make_response
from pbx.sip.retransmit import Uas2xxRetransmitter
from pbx.sip.transaction import SendBytes, TransactionKey, TransactionLayer
from pbx.traces import TraceStore

Addr = tuple[str, int]
SERVER = "pbx/0.1"
ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO, UPDATE, REFER"
SUPPORTED = "timer"

# The commands are never changed once made; slotted, not frozen (a frozen dataclass's
# __init__ costs 3-5 times as much: pbx.sip.transaction's events).

log = logging.getLogger("pbx.calls")


@dataclass(slots=True)
class ToMedia:
    worker: bytes
    msg: Any
    # A session's command: if the plane refuses it, the call ends (MediaCommandLost).
    call_id: str | None = None
    command: str | None = None

    @property
    def lost_ends_call(self) -> bool:
        return self.call_id is not None


@dataclass(slots=True)
class ToIvr:
    executor: bytes
    event: Any  # messages.IvrEvent


@dataclass(slots=True)
class Publish:
    event: dict[str, Any]


@dataclass(slots=True)
class Resolve:
    host: str
    port: int
    dialog_key: tuple[str, str]  # the outbound leg waiting for the answer


Command = SendBytes | ToMedia | ToIvr | Publish | Resolve


def reason_phrase(text: str, limit: int = 100) -> str:
    """Text safe for a status line or a quoted header value: one line, no quotes."""
    return " ".join(text.replace('"', "'").split())[:limit]


def _someone_listens() -> bool:
    return True


class CallContext:
    def __init__(self, settings: Settings, *, transactions: TransactionLayer,
                 registrar: Registrar, media_workers: MediaWorkerRegistry,
                 executors: WorkerRegistry, records: CallRecords, traces: TraceStore,
                 wall_offset: float) -> None:
        self.settings = settings
        host, port = settings.sip.advertised_host_port
        self.me = LocalAddress(host, port)
        self.policy = Policy(settings)
        self.table = CallTable(settings)
        self.timers = Timers()
        self.transactions = transactions
        self.retransmitter = Uas2xxRetransmitter()
        self.registrar = registrar
        self.media_workers = media_workers
        self.executors = executors
        self.records = records
        self.traces = traces
        self.out: list[Command] = []
        # Whether an event published now reaches anyone (the shell's answer: a PUB
        # subscriber, an admin WebSocket client): events no one would receive are not
        # built (issue 9). Until the shell says otherwise, someone does.
        self.listened: Callable[[], bool] = _someone_listens
        self.now = 0.0
        self.wall_offset = wall_offset
        self.stats: dict[str, int] = {
            "calls_total": 0, "calls_failed": 0, "sip_malformed": 0,
            "calls_challenged": 0, "calls_forbidden": 0, "setup_budget_refused": 0,
            "calls_budget_refused": 0,
            "refers_refused": 0, "transfers_refused": 0, "in_dialog_foreign": 0,
            # The planes (DESIGN §6): refused handshakes (pbx.broker), replies not from
            # the executor asked, workers declaring a refused RTP address, allocations
            # not at the worker's declared address.
            "zmq_auth_rejected": 0, "ivr_replies_rejected": 0,
            "media_workers_rejected": 0, "media_allocations_rejected": 0,
            # Ports a worker refused or never confirmed: the call ended (503).
            "media_allocations_failed": 0,
            "ivr_waits_expired": 0, "ivr_commands_lost": 0,
            # Sessions given up on whose /end went to another executor (pbx.calls.ivr).
            "ivr_farewells": 0,
            # Strict RTP latching: packets from strangers, dropped by the workers.
            "rtp_foreign_dropped": 0, "rtcp_foreign_dropped": 0, "dtmf_flood_dropped": 0,
            # Workers that stopped heartbeating; released legs' RTP statistics.
            "media_workers_lost": 0, "ivr_executors_lost": 0,
            "rtp_packets_sent": 0, "rtp_packets_received": 0, "rtp_packets_lost": 0,
            "rtp_packets_late": 0, "rtcp_sent": 0, "rtcp_received": 0}
        # Latencies and labelled counts for /metrics (pbx.metrics).
        self.metrics = FrontMetrics()
        transactions.on_invite_final = self._invite_final

    def _invite_final(self, request: SipRequest, status: int, seconds: float) -> None:
        """An initial INVITE's final response (re-INVITEs carry a To tag): set-up time."""
        if request.to_tag is None:
            self.metrics.setup.observe(seconds, setup_outcome(status))

    def wall(self) -> float:
        """`now` on the wall clock (records, SDP origins, digest nonces)."""
        return self.now + self.wall_offset

    # ---------------------------------------------------------------- SIP out

    def respond(self, key: TransactionKey, request: SipRequest, status: int,
                reason: str | None = None, *, to_tag: str | None = None,
                headers: list[tuple[str, str]] | None = None,
                body: bytes = b"") -> bytes:
        """The response sent in the request's transaction; returns it as serialised (a
        2xx to an INVITE is retransmitted from these bytes, RFC 3261 §13.3.1.4)."""
        hdrs = [("Server", SERVER)] + (headers or [])
        response = make_response(request, status, reason, to_tag=to_tag, headers=hdrs,
                                 body=body)
        data = response.serialize()
        self.out.extend(self.transactions.respond(key, response, self.now, data=data))
        return data

    def from_dialog_peer(self, request: SipRequest, peer: str | None, source: str,
                         call_id: str) -> bool:
        """`request` (inside a dialog, or a CANCEL) comes from the address of the dialog's
        peer (`[policy] in_dialog_source`, pbx.policy): a stranger who learned the tags
        or the branch cannot end the call, move its media or press its keys. If it does
        not, it is counted and logged, and the caller refuses (or drops) it."""
        if self.policy.in_dialog_source_ok(peer, source):
            return True
        self.stats["in_dialog_foreign"] += 1
        log.info("call %s: %s from %s, not the dialog's peer %s; refused", call_id,
                 request.method, source, peer)
        return False

    def send_response(self, key: TransactionKey, response: SipResponse) -> None:
        self.out.extend(self.transactions.respond(key, response, self.now))

    def send_request(self, request: SipRequest, addr: Addr, reliable: bool) -> TransactionKey:
        key, sends = self.transactions.send_request(request, addr, self.now,
                                                    reliable=reliable)
        self.out.extend(sends)
        return key

    def send_stateless(self, msg: SipRequest | SipResponse, addr: Addr,
                       reliable: bool) -> None:
        self.out.extend(self.transactions.send_stateless(msg, addr, reliable=reliable))

    # ---------------------------------------------------------------- planes out

    def to_media(self, worker: bytes, msg: Any) -> None:
        self.out.append(ToMedia(worker, msg))

    def publish(self, event: dict[str, Any]) -> None:
        self.out.append(Publish(event))

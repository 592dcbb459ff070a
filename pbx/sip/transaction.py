"""The SIP transaction layer (RFC 3261 §17), sans-IO.

The shell parses a datagram and hands the message to `receive(msg, addr, now)`; the
TU (dialog/call layer) calls `respond()`, `send_request()` and `send_stateless()`.
Every entry point returns events: `SendBytes` for the shell to put on the wire,
`RequestReceived` / `ResponseReceived` / `TransactionTimeout` for the TU. Time comes
in as `now` (seconds, any monotonic origin); `get_timer()` is the earliest deadline
and the shell calls `handle_timer(now)` when it passes.

Timers are deadline fields named as in the RFC (`timer_a` ... `timer_m`, the last two
from RFC 6026). A reliable transport arms no retransmission timer (A, E, G) and makes
the wait timers (D, I, J, K) zero, so the transaction ends at once.

States and transitions, server side (RFC 3261 §17.2, RFC 6026 §7.1):

    INVITE      Proceeding --1xx--> Proceeding
                Proceeding --2xx--> Accepted (Timer L; INVITE retransmissions
                                    absorbed, ACKs passed to the TU)
                Proceeding --3xx-6xx--> Completed (Timer G resend, Timer H)
                Completed --ACK--> Confirmed (Timer I)
                Accepted/Confirmed/Completed --L/I/H--> Terminated
    non-INVITE  Trying --1xx--> Proceeding --final--> Completed (Timer J)

client side (§17.1, RFC 6026 §7.2):

    INVITE      Calling (Timer A resend, Timer B) --1xx--> Proceeding
                Calling/Proceeding --2xx--> Accepted (Timer M; every 2xx to the TU)
                Calling/Proceeding --3xx-6xx--> Completed (ACK sent, Timer D)
                Calling/Proceeding --abandon() by the TU--> Terminated
    non-INVITE  Trying (Timer E resend, Timer F) --1xx--> Proceeding
                Trying/Proceeding --final--> Completed (Timer K)

A transaction is removed from its table as soon as it terminates, so the tables hold
only live transactions. The TU retransmits an INVITE's 2xx (RFC 3261 §13.3.1.4,
`pbx.sip.retransmit.Uas2xxRetransmitter`).

Budgets (DESIGN §6, `pbx.sip.budget`): what one source IP holds in server
transactions is counted (`sources`); a new request beyond its `SourceBudget`
gets a stateless 503 with Retry-After and leaves no state.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

from pbx.sip.budget import SourceBudget, SourceLedger
from pbx.sip.errors import SipError
from pbx.sip.message import (
    MAGIC_COOKIE,
    SipRequest,
    SipResponse,
    make_ack,
    make_response,
    trying_bytes,
)

T1 = 0.5  # RTT estimate, seconds (RFC 3261 §17.1.1.1)
T2 = 4.0  # maximum retransmit interval for non-INVITE requests and INVITE responses
T4 = 5.0  # maximum duration a message remains in the network
TIMER_D_UNRELIABLE = 32.0  # RFC 3261 §17.1.1.2: at least 32 s for unreliable transports

Addr = tuple[str, int]


class TxState(Enum):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    ACCEPTED = "Accepted"
    TERMINATED = "Terminated"


class TransactionKey(NamedTuple):
    """Identifies a transaction: top Via branch, method (INVITE for an ACK that
    matches one), sent-by for server transactions (RFC 3261 §17.2.3, §17.1.3).
    A named tuple: every message looks one up, and a tuple is built and hashed in C."""

    branch: str
    method: str
    sent_by: str = ""
    client: bool = False


# --------------------------------------------------------------------------- events
# Records of what happened, never changed once made. Slotted, not frozen: a frozen
# dataclass sets each field through object.__setattr__, and a call makes a dozen of
# these (0.5-0.8 us each instead of 0.15, perf/README.md).


@dataclass(slots=True)
class RequestReceived:
    """A new request for the TU (ACK to a 2xx too, with a key of its own); `reliable`
    when it came on a stream (TCP)."""

    request: SipRequest
    addr: Addr
    key: TransactionKey
    reliable: bool = False


@dataclass(slots=True)
class ResponseReceived:
    """A response for a client transaction."""

    response: SipResponse
    key: TransactionKey


@dataclass(slots=True)
class TransactionTimeout:
    """Timer B or F fired: the TU treats it as a 408 (RFC 3261 §8.1.3.1)."""

    key: TransactionKey


@dataclass(slots=True)
class TryingDue:
    """After the RequestReceived of a new INVITE: the TU hands it back to `trying()`
    once it has handled the request, and the 100 goes out only if the TU has not
    answered meanwhile (RFC 3261 §17.2.1: no 100 is needed when the TU answers at once;
    a 200 answered in the same pass saves a datagram per call)."""

    key: TransactionKey


@dataclass(slots=True)
class SendBytes:
    """Bytes for the wire; `reliable` sends them on the peer's TCP connection."""

    data: bytes
    addr: Addr
    reliable: bool = False


TransactionEvent = (RequestReceived | ResponseReceived | TransactionTimeout | SendBytes
                    | TryingDue)


# --------------------------------------------------------------------------- transactions


def _earliest(timers: tuple[float | None, ...]) -> float | None:
    """The earliest of the timers that are set (None if none is). A plain loop: the
    heap asks each transaction about once per message, and a generator with `min`
    cost three times as much (perf/README.md, bench_core)."""
    best = None
    for t in timers:
        if t is not None and (best is None or t < best):
            best = t
    return best


@dataclass(eq=False)
class _ServerTransaction:
    key: TransactionKey
    invite: bool
    # Let go of at the final response: a transaction then lingers up to 32 s (Timers J,
    # L) with only its key, address and last response, so the collector walks a few
    # objects per lingering transaction instead of the parsed request (perf/README.md).
    request: SipRequest | None
    addr: Addr
    reliable: bool
    state: TxState
    last_response: bytes | None = None
    held_bytes: int = 0  # what it counts against its source's budget (0: exempt)
    timer_g: float | None = None
    timer_g_interval: float = T1
    timer_h: float | None = None
    timer_i: float | None = None
    timer_j: float | None = None
    timer_l: float | None = None
    created_at: float = 0.0  # when the request came (for the set-up latency)

    def next_deadline(self) -> float | None:
        return _earliest((self.timer_g, self.timer_h, self.timer_i, self.timer_j,
                          self.timer_l))


@dataclass(eq=False)
class _ClientTransaction:
    key: TransactionKey
    invite: bool
    request: SipRequest
    data: bytes
    addr: Addr
    reliable: bool
    state: TxState
    ack: bytes | None = None
    timer_a: float | None = None
    timer_a_interval: float = T1
    timer_b: float | None = None
    timer_d: float | None = None
    timer_e: float | None = None
    timer_e_interval: float = T1
    timer_f: float | None = None
    timer_k: float | None = None
    timer_m: float | None = None

    def next_deadline(self) -> float | None:
        return _earliest((self.timer_a, self.timer_b, self.timer_d, self.timer_e,
                          self.timer_f, self.timer_k, self.timer_m))


_Transaction = _ServerTransaction | _ClientTransaction


def _is_due(deadline: float | None, now: float) -> bool:
    return deadline is not None and deadline <= now


class TransactionLayer:
    """Client and server transactions for one SIP endpoint.

    `send_trying`: an INVITE server transaction answers 100 Trying (RFC 3261
    §17.2.1) unless the TU answers first: `receive()` follows the INVITE's
    RequestReceived with a TryingDue that the TU passes to `trying()` when done.
    """

    def __init__(self, *, send_trying: bool = True, budget: SourceBudget | None = None) -> None:
        self.send_trying = send_trying
        self.sources = SourceLedger(budget or SourceBudget())
        self._server: dict[TransactionKey, _ServerTransaction] = {}
        self._client: dict[TransactionKey, _ClientTransaction] = {}
        self._heap: list[tuple[float, int, _Transaction]] = []
        # The heap's top entry get_timer found current; forgotten whenever a
        # transaction's timers change (`_schedule`, `_terminate`, a 1xx to our INVITE).
        self._checked_top: tuple[float, int, _Transaction] | None = None
        self._seq = itertools.count()
        # Told of each INVITE server transaction's first final response: the request,
        # the status and the seconds since the INVITE came (the TU's set-up metrics).
        self.on_invite_final: Callable[[SipRequest, int, float], None] | None = None

    # ----------------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self._server) + len(self._client)

    def state_of(self, key: TransactionKey) -> TxState | None:
        """The state of a live transaction, None once it is gone."""
        txn = (self._client if key.client else self._server).get(key)
        return txn.state if txn is not None else None

    def find_invite_server(self, cancel: SipRequest) -> TransactionKey | None:
        """The INVITE server transaction a CANCEL cancels (RFC 3261 §9.2), if live."""
        key = self._server_key(cancel, "INVITE")
        txn = self._server.get(key)
        return key if txn is not None and txn.invite else None

    # ----------------------------------------------------------------- keys

    @staticmethod
    def _server_key(request: SipRequest, method: str | None = None) -> TransactionKey:
        via = request.via
        if method is None:
            method = "INVITE" if request.method == "ACK" else request.method
        branch = via.branch
        if not branch.startswith(MAGIC_COOKIE):
            # RFC 2543 peer (§17.2.3): match on Request-URI, From tag, Call-ID,
            # CSeq number and the top Via (the To tag is left out: an ACK carries
            # ours, the INVITE did not).
            branch = "|".join(
                ["rfc2543", request.uri, request.from_tag or "", request.call_id,
                 str(request.cseq[0]), str(via)]
            )
        return TransactionKey(branch, method, via.sent_by)

    # ----------------------------------------------------------------- receive

    def receive(
        self, msg: SipRequest | SipResponse, addr: Addr, now: float, *, reliable: bool = False,
        size: int = 0,
    ) -> list[TransactionEvent]:
        """Feed one parsed message from the network (`size`: its length on the wire)."""
        if isinstance(msg, SipRequest):
            return self._receive_request(msg, addr, now, reliable, size)
        return self._receive_response(msg, now)

    def _over_budget(self, request: SipRequest, addr: Addr, size: int,
                     reliable: bool) -> list[TransactionEvent] | None:
        """None if the source may open one more transaction of `size` bytes, else what
        to send instead: a stateless 503."""
        if self.sources.admits(addr[0], size):
            return None
        busy = make_response(request, 503, "Service Unavailable (source over budget)",
                             headers=[("Retry-After", str(self.sources.budget.retry_after_s))])
        return [SendBytes(busy.serialize(), addr, reliable)]

    def _hold(self, txn: _ServerTransaction, size: int) -> None:
        """Count `size` more bytes (and, the first time, the transaction) for its source."""
        txn.held_bytes = self.sources.hold(txn.addr[0], txn.held_bytes, size)

    def _receive_request(
        self, request: SipRequest, addr: Addr, now: float, reliable: bool, size: int = 0
    ) -> list[TransactionEvent]:
        key = self._server_key(request)
        txn = self._server.get(key)
        if request.method == "ACK":
            if txn is not None and txn.invite:
                if txn.state is TxState.COMPLETED:
                    # ACK for our non-2xx final: absorbed (RFC 3261 §17.2.1)
                    txn.state = TxState.CONFIRMED
                    txn.timer_g = None
                    txn.timer_h = None
                    txn.timer_i = now + (0.0 if reliable or txn.reliable else T4)
                    self._schedule(txn)
                    return []
                if txn.state is TxState.CONFIRMED:
                    return []
            # ACK for a 2xx (or stray): the TU's, as a request of its own
            ack_key = TransactionKey(key.branch, "ACK", key.sent_by)
            return [RequestReceived(request, addr, ack_key, reliable)]
        if txn is not None:
            # a retransmission: absorbed, the last response re-sent (§17.2.1, §17.2.2)
            if txn.last_response is not None and txn.state in (
                TxState.PROCEEDING,
                TxState.COMPLETED,
            ):
                return [SendBytes(txn.last_response, txn.addr, txn.reliable)]
            return []
        size = max(size, 1)  # every transaction counts, even one whose size is not told
        refused = self._over_budget(request, addr, size, reliable)
        if refused is not None:
            return refused
        invite = request.method == "INVITE"
        txn = _ServerTransaction(
            key, invite, request, addr, reliable,
            TxState.PROCEEDING if invite else TxState.TRYING, created_at=now,
        )
        self._server[key] = txn
        self._hold(txn, size)
        if invite and self.send_trying:
            return [RequestReceived(request, addr, key, reliable), TryingDue(key)]
        return [RequestReceived(request, addr, key, reliable)]

    def trying(self, key: TransactionKey) -> list[SendBytes]:
        """The 100 Trying of a new INVITE whose TU has not answered yet, else []."""
        txn = self._server.get(key)
        if (txn is None or txn.state is not TxState.PROCEEDING or txn.last_response is not None
                or txn.request is None):
            return []
        txn.last_response = trying_bytes(txn.request)
        self._hold(txn, len(txn.last_response))
        return [SendBytes(txn.last_response, txn.addr, txn.reliable)]

    def _receive_response(self, response: SipResponse, now: float) -> list[TransactionEvent]:
        key = TransactionKey(response.branch, response.cseq[1], "", True)
        txn = self._client.get(key)
        if txn is None:
            return []  # matches no transaction: discarded (RFC 3261 §18.1.2)
        status = response.status
        state = txn.state
        if txn.invite:
            if state in (TxState.CALLING, TxState.PROCEEDING):
                txn.timer_a = None
                txn.timer_b = None
                self._checked_top = None
                if status < 200:
                    txn.state = TxState.PROCEEDING
                    return [ResponseReceived(response, key)]
                if status < 300:
                    txn.state = TxState.ACCEPTED
                    txn.timer_m = now + 64 * T1
                    self._schedule(txn)
                    return [ResponseReceived(response, key)]
                txn.ack = make_ack(txn.request, response).serialize()
                txn.state = TxState.COMPLETED
                events: list[TransactionEvent] = [
                    SendBytes(txn.ack, txn.addr, txn.reliable),
                    ResponseReceived(response, key),
                ]
                if txn.reliable:
                    self._terminate(txn)
                else:
                    txn.timer_d = now + TIMER_D_UNRELIABLE
                    self._schedule(txn)
                return events
            if state is TxState.ACCEPTED and 200 <= status < 300:
                return [ResponseReceived(response, key)]  # the TU re-ACKs each 2xx
            if state is TxState.COMPLETED and status >= 300 and txn.ack is not None:
                return [SendBytes(txn.ack, txn.addr, txn.reliable)]
            return []
        if state in (TxState.TRYING, TxState.PROCEEDING):
            if status < 200:
                txn.state = TxState.PROCEEDING
                return [ResponseReceived(response, key)]
            txn.state = TxState.COMPLETED
            txn.timer_e = None
            txn.timer_f = None
            if txn.reliable:
                self._terminate(txn)
            else:
                txn.timer_k = now + T4
                self._schedule(txn)
            return [ResponseReceived(response, key)]
        return []  # retransmitted final in Completed: absorbed

    # ----------------------------------------------------------------- TU side

    def respond(self, key: TransactionKey, response: SipResponse, now: float, *,
                data: bytes | None = None) -> list[SendBytes]:
        """Send a response in a server transaction, to the address the request came from.

        A key that is gone, or a final response after the final one (e.g. a 487
        racing a 200), gives [] - except further 2xx in Accepted, which are sent.
        `data`: the response already serialised (a TU that keeps the bytes, for a 2xx
        it retransmits itself, serialises once).
        """
        txn = self._server.get(key)
        if txn is None:
            return []
        if data is None:
            data = response.serialize()
        status = response.status
        send = [SendBytes(data, txn.addr, txn.reliable)]
        self._hold(txn, len(data))  # a little over-counted: a response replaces the last
        if txn.invite:
            if txn.state is TxState.PROCEEDING:
                if status >= 200:
                    if self.on_invite_final is not None and txn.request is not None:
                        self.on_invite_final(txn.request, status, now - txn.created_at)
                    txn.request = None
                if status < 200:
                    txn.last_response = data
                elif status < 300:
                    txn.state = TxState.ACCEPTED
                    txn.last_response = None
                    txn.timer_l = now + 64 * T1
                    self._schedule(txn)
                else:
                    txn.state = TxState.COMPLETED
                    txn.last_response = data
                    txn.timer_h = now + 64 * T1
                    if not txn.reliable:
                        txn.timer_g = now + T1
                        txn.timer_g_interval = T1
                    self._schedule(txn)
                return send
            if txn.state is TxState.ACCEPTED and 200 <= status < 300:
                return send
            return []
        if txn.state in (TxState.TRYING, TxState.PROCEEDING):
            txn.last_response = data
            if status < 200:
                txn.state = TxState.PROCEEDING
            else:
                txn.state = TxState.COMPLETED
                txn.request = None
                if txn.reliable:
                    self._terminate(txn)
                else:
                    txn.timer_j = now + 64 * T1
                    self._schedule(txn)
            return send
        return []

    def send_request(
        self, request: SipRequest, addr: Addr, now: float, *, reliable: bool = False
    ) -> tuple[TransactionKey, list[SendBytes]]:
        """Start a client transaction; the request's top Via must carry a fresh branch."""
        if request.method == "ACK":
            raise SipError("ACK has no client transaction: use send_stateless", 500)
        branch = request.branch
        if not branch:
            raise SipError("request to send has no Via branch", 500)
        key = TransactionKey(branch, request.method, "", True)
        if key in self._client:
            raise SipError(f"client transaction {branch} {request.method} exists", 500)
        data = request.serialize()
        invite = request.method == "INVITE"
        txn = _ClientTransaction(
            key, invite, request, data, addr, reliable,
            TxState.CALLING if invite else TxState.TRYING,
        )
        if invite:
            txn.timer_b = now + 64 * T1
            if not reliable:
                txn.timer_a = now + T1
        else:
            txn.timer_f = now + 64 * T1
            if not reliable:
                txn.timer_e = now + T1
        self._client[key] = txn
        self._schedule(txn)
        return key, [SendBytes(data, addr, reliable)]

    def abandon(self, key: TransactionKey) -> None:
        """The TU gave up on a final response (64*T1 after its CANCEL, §9.1): an INVITE
        still Calling or Proceeding (no timer there after a 1xx) ends; later, its timers."""
        txn = self._client.get(key)
        if txn is not None and txn.invite and txn.state in (TxState.CALLING, TxState.PROCEEDING):
            self._terminate(txn)

    @staticmethod
    def send_stateless(msg: SipRequest | SipResponse, addr: Addr, *,
                       reliable: bool = False) -> list[SendBytes]:
        """Send outside any transaction (ACK for a 2xx, 2xx retransmissions)."""
        return [SendBytes(msg.serialize(), addr, reliable)]

    # ----------------------------------------------------------------- timers

    def get_timer(self) -> float | None:
        heap = self._heap
        while heap:
            top = heap[0]
            if top is self._checked_top:
                # Checked, and no transaction's timers changed since: the shell asks
                # after every input, and most inputs change no timer.
                return top[0]
            deadline, _, txn = top
            current = txn.next_deadline() if self._is_live(txn) else None
            if current is None or current > deadline:
                heapq.heappop(heap)  # stale entry
                continue
            self._checked_top = top
            return deadline
        return None

    def handle_timer(self, now: float) -> list[TransactionEvent]:
        events: list[TransactionEvent] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, txn = heapq.heappop(heap)
            if not self._is_live(txn) or not _is_due(txn.next_deadline(), now):
                continue
            if isinstance(txn, _ServerTransaction):
                events.extend(self._server_timers(txn, now))
            else:
                events.extend(self._client_timers(txn, now))
        return events

    def _server_timers(self, txn: _ServerTransaction, now: float) -> list[TransactionEvent]:
        if (
            _is_due(txn.timer_h, now)
            or _is_due(txn.timer_i, now)
            or _is_due(txn.timer_j, now)
            or _is_due(txn.timer_l, now)
        ):
            # H: no ACK came (§17.2.1); I, J, L: absorbing time is over
            self._terminate(txn)
            return []
        events: list[TransactionEvent] = []
        if _is_due(txn.timer_g, now) and txn.last_response is not None:
            events.append(SendBytes(txn.last_response, txn.addr, txn.reliable))
            txn.timer_g_interval = min(2 * txn.timer_g_interval, T2)
            txn.timer_g = now + txn.timer_g_interval
        self._schedule(txn)
        return events

    def _client_timers(self, txn: _ClientTransaction, now: float) -> list[TransactionEvent]:
        if _is_due(txn.timer_b, now) or _is_due(txn.timer_f, now):
            self._terminate(txn)
            return [TransactionTimeout(txn.key)]
        if _is_due(txn.timer_d, now) or _is_due(txn.timer_k, now) or _is_due(txn.timer_m, now):
            self._terminate(txn)
            return []
        events: list[TransactionEvent] = []
        if _is_due(txn.timer_a, now):
            events.append(SendBytes(txn.data, txn.addr, txn.reliable))
            txn.timer_a_interval *= 2  # INVITE: doubles without cap (§17.1.1.2)
            txn.timer_a = now + txn.timer_a_interval
        if _is_due(txn.timer_e, now):
            events.append(SendBytes(txn.data, txn.addr, txn.reliable))
            if txn.state is TxState.TRYING:
                txn.timer_e_interval = min(2 * txn.timer_e_interval, T2)
            else:
                txn.timer_e_interval = T2  # Proceeding: every T2 (§17.1.2.2)
            txn.timer_e = now + txn.timer_e_interval
        self._schedule(txn)
        return events

    # ----------------------------------------------------------------- bookkeeping

    def _is_live(self, txn: _Transaction) -> bool:
        if isinstance(txn, _ServerTransaction):
            return self._server.get(txn.key) is txn
        return self._client.get(txn.key) is txn

    def _schedule(self, txn: _Transaction) -> None:
        self._checked_top = None
        deadline = txn.next_deadline()
        if deadline is not None:
            heapq.heappush(self._heap, (deadline, next(self._seq), txn))

    def _terminate(self, txn: _Transaction) -> None:
        self._checked_top = None
        txn.state = TxState.TERMINATED
        if isinstance(txn, _ServerTransaction):
            if self._server.get(txn.key) is txn:
                del self._server[txn.key]
                self.sources.release(txn.addr[0], txn.held_bytes)
                txn.held_bytes = 0
        elif self._client.get(txn.key) is txn:
            del self._client[txn.key]

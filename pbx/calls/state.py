"""A call's state: legs, the call, the IVR session envelope; explicit phases; a dict form.

Everything the call layer knows about a call is here, in plain data. Phases are enums
with a transition table: `advance_leg` / `advance_call` are the only writers of a
phase, and a transition the table does not allow raises `IllegalTransition` naming both
phases (a bug, never a peer's doing: peers' messages are checked before a transition).

Leg phases (one SIP dialog and its RTP port):

    PENDING ──> EARLY ──> CONFIRMED ──> TERMINATED
       │          └──────────────────────^
       └─────────────────────────────────^

PENDING: an outbound leg not sent yet (its target resolving); EARLY: an INVITE in
progress either way; CONFIRMED: answered (and, inbound, 2xx sent); TERMINATED: over.

Call phases:

    SETUP ──> IVR ──> TRANSFERRING ──> BRIDGED
      │        │ ^ └─> QUEUED ───────────^
      │        │ └──────┘  (back to the IVR)
      │        └─> WS_BRIDGED
      └─> TRANSFERRING (a direct call to a user)
    every phase ──> ENDED;  BRIDGED ──> TRANSFERRING (a REFER in the bridge)

`to_dict()` / `call_from_dict()` write a call's whole state (dialogs, legs, media
binding, IVR session envelope, queue wait) to plain JSON types and back. Times are on
the front's clocks (monotonic `now` for deadlines, wall clock for `*_at` fields).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from pydantic import TypeAdapter

from pbx import messages as m
from pbx.config import RouteSettings
from pbx.policy import Party, PartyKind
from pbx.queues import QueueWait
from pbx.sip import sdp
from pbx.sip.dialog import Dialog, is_ip
from pbx.sip.message import SipRequest, parse_message
from pbx.sip.transaction import TransactionKey

Addr = tuple[str, int]
# A call keeps the SIP Call-IDs of this many legs at most (a long queue wait rings many
# members; the caller's leg is always the first).
MAX_SIP_CALL_IDS = 32
# A session's queued inputs in the dict form.
_INPUT: TypeAdapter[Any] = TypeAdapter(m.IvrInput)


class IllegalTransition(Exception):
    """A phase change the transition table does not allow (a bug in the call layer)."""

    def __init__(self, what: str, old: Enum, new: Enum) -> None:
        super().__init__(f"{what}: illegal transition {old.name} -> {new.name}")
        self.old, self.new = old, new


class LegPhase(Enum):
    PENDING = "pending"
    EARLY = "early"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


class CallPhase(Enum):
    SETUP = "setup"
    IVR = "ivr"
    TRANSFERRING = "transferring"
    QUEUED = "queued"
    BRIDGED = "bridged"
    WS_BRIDGED = "ws_bridged"
    ENDED = "ended"


LEG_TRANSITIONS: dict[LegPhase, frozenset[LegPhase]] = {
    LegPhase.PENDING: frozenset({LegPhase.EARLY, LegPhase.TERMINATED}),
    LegPhase.EARLY: frozenset({LegPhase.CONFIRMED, LegPhase.TERMINATED}),
    LegPhase.CONFIRMED: frozenset({LegPhase.TERMINATED}),
    LegPhase.TERMINATED: frozenset(),
}

CALL_TRANSITIONS: dict[CallPhase, frozenset[CallPhase]] = {
    CallPhase.SETUP: frozenset({CallPhase.IVR, CallPhase.TRANSFERRING, CallPhase.ENDED}),
    CallPhase.IVR: frozenset({CallPhase.IVR, CallPhase.TRANSFERRING, CallPhase.QUEUED,
                              CallPhase.WS_BRIDGED, CallPhase.ENDED}),
    CallPhase.TRANSFERRING: frozenset({CallPhase.BRIDGED, CallPhase.ENDED}),
    CallPhase.QUEUED: frozenset({CallPhase.BRIDGED, CallPhase.IVR, CallPhase.ENDED}),
    CallPhase.BRIDGED: frozenset({CallPhase.TRANSFERRING, CallPhase.ENDED}),
    CallPhase.WS_BRIDGED: frozenset({CallPhase.ENDED}),
    CallPhase.ENDED: frozenset(),
}


@dataclass
class MediaBinding:
    """A leg's RTP port on a media worker and what it was told to send to."""

    worker: bytes | None = None
    rtp_ip: str = ""
    rtp_port: int = 0
    negotiated: sdp.Negotiated | None = None
    answer_sdp: bytes = b""  # our SDP in the dialog (answer inbound, offer outbound)
    address: Addr | None = None  # where the worker was last told to send RTP

    def to_dict(self) -> dict[str, Any]:
        return {"worker": self.worker.decode("latin-1") if self.worker is not None else None,
                "rtp_ip": self.rtp_ip, "rtp_port": self.rtp_port,
                "negotiated": asdict(self.negotiated) if self.negotiated else None,
                "answer_sdp": self.answer_sdp.decode("latin-1"),
                "address": list(self.address) if self.address else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MediaBinding:
        worker, negotiated, address = data["worker"], data["negotiated"], data["address"]
        return cls(worker=worker.encode("latin-1") if worker is not None else None,
                   rtp_ip=data["rtp_ip"], rtp_port=data["rtp_port"],
                   negotiated=sdp.Negotiated(**negotiated) if negotiated else None,
                   answer_sdp=data["answer_sdp"].encode("latin-1"),
                   address=(address[0], address[1]) if address else None)


@dataclass
class Leg:
    """One SIP dialog of a call and its media binding."""

    call: Call
    media_id: str  # the leg's id on its media worker (`<call id>-a`, `-b`, `-q<n>`)
    outbound: bool
    dialog: Dialog
    addr: Addr  # where requests to the peer go
    phase: LegPhase = LegPhase.EARLY
    source: Addr | None = None  # where an inbound INVITE came from (2xx retransmissions)
    invite: SipRequest | None = None  # the dialog's initial INVITE (ours or theirs)
    invite_key: TransactionKey | None = None
    provisional_seen: bool = False  # RFC 3261 §9.1: CANCEL only after a 1xx
    cancel_pending: bool = False
    media: MediaBinding = field(default_factory=MediaBinding)
    # A 2xx to a re-INVITE awaits its ACK (a second one gets 491, §14.2), and whether
    # that 2xx carried our offer (an offerless re-INVITE: the ACK answers).
    reinvite_unacked: bool = False
    offer_in_2xx: bool = False
    # RFC 4028: the session interval (0: no timer) and whether we refresh.
    session_interval: int = 0
    we_refresh: bool = False
    peer_allows_update: bool = False
    peer_supports_timer: bool = False  # its Supported/Require named `timer`
    # Our session refresh (UPDATE or re-INVITE) awaiting its final response, and whether
    # it is the one retry a 422 allows (pbx.calls.session_timer). Not in the dict form.
    refresh_key: TransactionKey | None = None
    refresh_retried: bool = False
    # Who is at the other end (pbx.policy): the caller on an inbound leg; on an outbound
    # leg the extension we rang, else an anonymous party. REFERs are theirs.
    peer: Party = field(default_factory=lambda: Party(PartyKind.ANONYMOUS))
    # The source IP whose set-up budget the leg holds until its ACK, and whose calls
    # budget until it ends.
    setup_source: str | None = None
    call_source: str | None = None
    member: str | None = None  # the queue member (or agent) this leg rings
    # The To-tags of other forks whose 2xx we ACKed and ended with a BYE (RFC 3261
    # §13.2.2.4): their retransmissions get the ACK only. Not kept in the dict form.
    stray_tags: set[str] = field(default_factory=set)
    # Our BYE's extra headers while it waits for the ACK of our 2xx (RFC 3261 §15);
    # None when no BYE waits.
    bye_waiting: list[tuple[str, str]] | None = None

    def __post_init__(self) -> None:
        # Every leg's SIP Call-ID goes into the call's records, traces and log lines,
        # so a packet capture matches a record without timestamps.
        ids = self.call.sip_call_ids
        cid = self.dialog.call_id
        if cid not in ids and len(ids) < MAX_SIP_CALL_IDS:
            ids.append(cid)

    @property
    def dialog_key(self) -> tuple[str, str]:
        return self.dialog.key

    @property
    def reliable(self) -> bool:
        return self.dialog.reliable

    def to_dict(self) -> dict[str, Any]:
        key = self.invite_key
        return {
            "media_id": self.media_id, "outbound": self.outbound,
            "dialog": self.dialog.to_dict(), "addr": list(self.addr),
            "phase": self.phase.value, "source": list(self.source) if self.source else None,
            "invite": self.invite.serialize().decode("utf-8", "surrogateescape")
            if self.invite is not None else None,
            "invite_key": key._asdict() if key is not None else None,
            "provisional_seen": self.provisional_seen, "cancel_pending": self.cancel_pending,
            "media": self.media.to_dict(), "reinvite_unacked": self.reinvite_unacked,
            "offer_in_2xx": self.offer_in_2xx, "session_interval": self.session_interval,
            "we_refresh": self.we_refresh, "peer_allows_update": self.peer_allows_update,
            "peer_supports_timer": self.peer_supports_timer,
            "peer": {"kind": self.peer.kind.value, "user": self.peer.user},
            "setup_source": self.setup_source, "call_source": self.call_source,
            "member": self.member,
        }


def leg_from_dict(call: Call, data: dict[str, Any]) -> Leg:
    invite = None
    if data["invite"] is not None:
        parsed = parse_message(data["invite"].encode("utf-8", "surrogateescape"))
        assert isinstance(parsed, SipRequest)
        invite = parsed
    key = data["invite_key"]
    source = data["source"]
    return Leg(
        call=call, media_id=data["media_id"], outbound=data["outbound"],
        dialog=Dialog.from_dict(data["dialog"]), addr=(data["addr"][0], data["addr"][1]),
        phase=LegPhase(data["phase"]), source=(source[0], source[1]) if source else None,
        invite=invite, invite_key=TransactionKey(**key) if key else None,
        provisional_seen=data["provisional_seen"], cancel_pending=data["cancel_pending"],
        media=MediaBinding.from_dict(data["media"]),
        reinvite_unacked=data["reinvite_unacked"], offer_in_2xx=data["offer_in_2xx"],
        session_interval=data["session_interval"], we_refresh=data["we_refresh"],
        peer_allows_update=data["peer_allows_update"],
        peer_supports_timer=data.get("peer_supports_timer", False),
        peer=Party(PartyKind(data["peer"]["kind"]), data["peer"]["user"]),
        setup_source=data["setup_source"], call_source=data["call_source"],
        member=data["member"])


@dataclass
class Session:
    """The front's side of an IVR session: event queue, in-flight event, latest state."""

    session_id: str
    call: Call
    info: m.CallInfo
    seq: int = 0
    # The executor's session state: JSON text, kept and sent back as it came (issue 9);
    # of it the front knows what the last reply said: `step_index`, `end_reason`.
    state: str | None = None
    step_index: int = 0
    end_reason: str | None = None
    queue: deque[Any] = field(default_factory=deque)  # call events not yet sent
    in_flight: m.IvrEvent | None = None
    executor: bytes | None = None
    done: bool = False
    sent_at: float = 0.0
    attempts: int = 0
    waiting_since: float | None = None  # waiting for an executor with room since
    closing: bool = False  # the call left the IVR (a REFER): its commands are ignored
    # When the in-flight event was first sent (re-sends keep it), and since when it has
    # found no executor to take it (reset only when one does).
    dispatched_at: float = 0.0
    unplaced_since: float | None = None
    # Nothing in flight, nothing queued: the session waits for a call event, and hears
    # a WaitExpiredInput if none came by `wait_deadline` (the last reply's `wait_ms`,
    # else `[sessions] max_wait_ms`, plus `[sessions] wait_grace_ms`).
    wait_started: float | None = None
    wait_deadline: float | None = None
    wait_ms: int | None = None  # the last reply's own bound (None: it gave none)
    # The front's wall clock at the latest key press not yet seen reaching the provider.
    digit_at: float | None = None
    # Executors whose plane refused the in-flight event (full, gone): not asked again
    # for it.
    refused: set[bytes] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "info": self.info.model_dump(mode="json"),
            "seq": self.seq, "state": self.state, "step_index": self.step_index,
            "end_reason": self.end_reason,
            "queue": [_INPUT.dump_python(item, mode="json") for item in self.queue],
            "in_flight": self.in_flight.model_dump(mode="json") if self.in_flight else None,
            "executor": self.executor.decode("latin-1") if self.executor else None,
            "done": self.done, "sent_at": self.sent_at, "attempts": self.attempts,
            "waiting_since": self.waiting_since, "closing": self.closing,
            "dispatched_at": self.dispatched_at, "unplaced_since": self.unplaced_since,
            "wait_started": self.wait_started, "wait_deadline": self.wait_deadline,
            "wait_ms": self.wait_ms,
            "refused": sorted(e.decode("latin-1") for e in self.refused),
        }


def session_from_dict(call: Call, data: dict[str, Any]) -> Session:
    executor = data["executor"]
    in_flight = data["in_flight"]
    return Session(
        session_id=data["session_id"], call=call,
        info=m.CallInfo.model_validate(data["info"]), seq=data["seq"], state=data["state"],
        step_index=data["step_index"], end_reason=data["end_reason"],
        queue=deque(_INPUT.validate_python(item) for item in data["queue"]),
        in_flight=m.IvrEvent.model_validate(in_flight) if in_flight else None,
        executor=executor.encode("latin-1") if executor else None, done=data["done"],
        sent_at=data["sent_at"], attempts=data["attempts"],
        waiting_since=data["waiting_since"], closing=data["closing"],
        dispatched_at=data["dispatched_at"], unplaced_since=data["unplaced_since"],
        wait_started=data["wait_started"], wait_deadline=data["wait_deadline"],
        wait_ms=data["wait_ms"], refused={e.encode("latin-1") for e in data["refused"]})


@dataclass
class QueueRun:
    """A caller waiting in a queue (`kind` "queue") or for an agent's skill group."""

    kind: str  # "queue" | "agent"
    name: str
    wait: QueueWait
    return_to_ivr: bool
    legs_made: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "wait": self.wait.to_dict(),
                "return_to_ivr": self.return_to_ivr, "legs_made": self.legs_made}


@dataclass
class Call:
    call_id: str  # our id for the call (records, traces)
    route: RouteSettings | None
    caller: str
    callee: str
    started_at: float  # wall clock, as every *_at field
    phase: CallPhase = CallPhase.SETUP
    a: Leg | None = None  # the caller's side
    b: Leg | None = None  # the side it is transferred or bridged to
    session: Session | None = None
    answered_at: float | None = None
    end_reason: str = ""
    end_code: int | None = None
    transfer_target: str | None = None
    extension: str | None = None  # set for a direct call to a user (no IVR)
    # The call started as a direct call: the caller dialled `extension` straight
    # (SETUP -> TRANSFERRING), no IVR. `transfer_target` stays None unless a REFER
    # transfers it later: a direct call is recorded and logged as one, not a transfer.
    direct: bool = False
    party: Party = field(default_factory=lambda: Party(PartyKind.ANONYMOUS))  # the caller
    # Queue / route_to_agent (pbx.calls.queue): candidates ringing, and the wait itself.
    # The member who answers becomes `b`.
    ringing: list[Leg] = field(default_factory=list)
    # A transfer's branches, one per binding of the target, ringing in parallel
    # (pbx.calls.outbound): the first to answer becomes `b`; the best final response
    # of those that failed (and the end reason it asks for) ends the call if all fail.
    forks: list[Leg] = field(default_factory=list)
    fork_status: int | None = None
    fork_reason: str | None = None
    transfers_made: int = 0  # transfers that made legs: each names its own (media ids)
    queue_run: QueueRun | None = None
    queue_name: str | None = None
    queue_member: str | None = None
    agent: str | None = None
    # Headers every INVITE to the agent (or its skill group) carries: the provider's
    # routing hints (pbx.calls.queue.agent_headers).
    agent_headers: list[tuple[str, str]] = field(default_factory=list)
    ws_bridge: str | None = None
    bridged_at: float | None = None
    ended_at: float | None = None
    recordings: list[dict[str, Any]] = field(default_factory=list)
    session_ids: list[str] = field(default_factory=list)
    # The SIP Call-ID of every leg, the caller's first (Leg.__post_init__).
    sip_call_ids: list[str] = field(default_factory=list)
    # REFER (RFC 3515): the leg that asked, whose implicit subscription gets the NOTIFYs;
    # `detached` holds a referrer no longer part of the bridge (released once notified).
    referrer: Leg | None = None
    refer_event: str = "refer"
    detached: list[Leg] = field(default_factory=list)
    # The media id of the branch whose early media (an 18x with SDP) the caller hears
    # on a direct call, until one answers (pbx.calls.outbound).
    early_media: str | None = None

    @property
    def ended(self) -> bool:
        return self.phase is CallPhase.ENDED

    @property
    def kind(self) -> str:
        """"direct" (a call to a user, no IVR) or "ivr" (a route's IVR answered it)."""
        return "direct" if self.direct else "ivr"

    def sip_legs(self) -> dict[str, str]:
        """The SIP Call-ID of the caller's leg ("a") and of the bridged one ("b")."""
        return {name: leg.dialog.call_id for name, leg in (("a", self.a), ("b", self.b))
                if leg is not None}

    def legs(self) -> list[Leg]:
        return [leg for leg in (self.a, self.b, *self.forks, *self.ringing, *self.detached)
                if leg is not None]

    def to_dict(self) -> dict[str, Any]:
        """The call's whole state as plain JSON types (legs by value; the referrer by
        its media id, since it is one of the legs)."""
        return {
            "call_id": self.call_id, "route": self.route.name if self.route else None,
            "caller": self.caller, "callee": self.callee, "started_at": self.started_at,
            "phase": self.phase.value,
            "a": self.a.to_dict() if self.a else None,
            "b": self.b.to_dict() if self.b else None,
            "session": self.session.to_dict() if self.session else None,
            "answered_at": self.answered_at, "end_reason": self.end_reason,
            "end_code": self.end_code, "transfer_target": self.transfer_target,
            "extension": self.extension, "direct": self.direct,
            "sip_call_ids": list(self.sip_call_ids),
            "party": {"kind": self.party.kind.value, "user": self.party.user},
            "ringing": [leg.to_dict() for leg in self.ringing],
            "forks": [leg.to_dict() for leg in self.forks],
            "fork_status": self.fork_status, "fork_reason": self.fork_reason,
            "transfers_made": self.transfers_made,
            "queue_run": self.queue_run.to_dict() if self.queue_run else None,
            "queue_name": self.queue_name, "queue_member": self.queue_member,
            "agent": self.agent, "agent_headers": [list(h) for h in self.agent_headers],
            "ws_bridge": self.ws_bridge, "bridged_at": self.bridged_at,
            "ended_at": self.ended_at, "recordings": [dict(r) for r in self.recordings],
            "session_ids": list(self.session_ids),
            "referrer": self.referrer.media_id if self.referrer else None,
            "refer_event": self.refer_event,
            "detached": [leg.to_dict() for leg in self.detached],
            "early_media": self.early_media,
        }


def call_from_dict(data: dict[str, Any], routes: dict[str, RouteSettings],
                   queue_waits: Any = None) -> Call:
    """A call back from `Call.to_dict()`. `routes` by name; `queue_waits(kind, name,
    wait_dict)` rebuilds a queue wait (its settings and book live in the front)."""
    route = routes[data["route"]] if data["route"] is not None else None
    call = Call(
        call_id=data["call_id"], route=route, caller=data["caller"], callee=data["callee"],
        started_at=data["started_at"], phase=CallPhase(data["phase"]),
        answered_at=data["answered_at"], end_reason=data["end_reason"],
        end_code=data["end_code"], transfer_target=data["transfer_target"],
        extension=data["extension"], direct=data.get("direct", False),
        sip_call_ids=list(data.get("sip_call_ids", [])),
        party=Party(PartyKind(data["party"]["kind"]), data["party"]["user"]),
        queue_name=data["queue_name"], queue_member=data["queue_member"],
        agent=data["agent"], ws_bridge=data["ws_bridge"], bridged_at=data["bridged_at"],
        agent_headers=[(str(n), str(v)) for n, v in data.get("agent_headers", [])],
        ended_at=data["ended_at"], recordings=[dict(r) for r in data["recordings"]],
        session_ids=list(data["session_ids"]), refer_event=data["refer_event"],
        fork_status=data["fork_status"], fork_reason=data["fork_reason"],
        transfers_made=data.get("transfers_made", 0), early_media=data.get("early_media"))
    call.a = leg_from_dict(call, data["a"]) if data["a"] else None
    call.b = leg_from_dict(call, data["b"]) if data["b"] else None
    call.ringing = [leg_from_dict(call, d) for d in data["ringing"]]
    call.forks = [leg_from_dict(call, d) for d in data["forks"]]
    call.detached = [leg_from_dict(call, d) for d in data["detached"]]
    call.session = session_from_dict(call, data["session"]) if data["session"] else None
    if data["referrer"] is not None:
        call.referrer = next(leg for leg in call.legs() if leg.media_id == data["referrer"])
    run = data["queue_run"]
    if run is not None:
        assert queue_waits is not None, "a queued call needs its queue's settings"
        call.queue_run = QueueRun(run["kind"], run["name"],
                                  queue_waits(run["kind"], run["name"], run["wait"]),
                                  run["return_to_ivr"], run["legs_made"])
    return call


def peer_ip(leg: Leg) -> str | None:
    """The IP the dialog's peer sends from: where its INVITE came from (inbound), or
    where we send it requests (outbound: its contact, registration source or next hop,
    resolved)."""
    if leg.source is not None:
        return leg.source[0]
    return leg.addr[0] if is_ip(leg.addr[0]) else None


def unlink(call: Call) -> None:
    """A call that is over and that nothing looks up any more lets go of its legs and
    session, which point back at it: the cycle is broken, so reference counting frees
    the lot at once instead of a full collection much later (pbx.app.tune_gc)."""
    call.a = call.b = call.session = call.referrer = call.queue_run = None
    call.ringing.clear()
    call.forks.clear()
    call.detached.clear()


def advance_leg(leg: Leg, new: LegPhase) -> None:
    """The one writer of a leg's phase (see LEG_TRANSITIONS)."""
    if new is leg.phase:
        return
    if new not in LEG_TRANSITIONS[leg.phase]:
        raise IllegalTransition(f"leg {leg.media_id or leg.dialog.call_id}", leg.phase, new)
    leg.phase = new


def advance_call(call: Call, new: CallPhase) -> None:
    """The one writer of a call's phase (see CALL_TRANSITIONS)."""
    if new not in CALL_TRANSITIONS[call.phase]:
        raise IllegalTransition(f"call {call.call_id}", call.phase, new)
    call.phase = new

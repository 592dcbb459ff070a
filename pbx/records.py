"""Call records: one JSON line per finished call in `<[logging] dir>/calls.jsonl`.

A record is written when the call ends, once the media workers have reported the RTP
statistics of the call's legs (`MediaReleased`, answering the front's `MediaRelease`),
or `RTP_STATS_WAIT_S` after the end at the latest, so a dead worker never holds a
record back. `rtp_complete` says whether every leg's statistics made it in. One line
type only: readers never have to join two lines.

Fields (times are wall-clock seconds since the epoch; absent values are null):

    type            "call"
    call_id         the front's id for the call (traces, recordings use it too)
    sip_call_id     the SIP Call-ID of the caller's leg (what a capture of the INVITE shows)
    sip_call_ids    the SIP Call-ID of every leg, the caller's first, then each leg we
                    sent (the bridged party, queue members rung, a REFER's target)
    kind            "direct" (an extension dialled a user: no IVR, not a transfer; a
                    failed one ends with CalleeFailed(<status>)) or "ivr" (a route)
    sessions        IVR session ids, in order (a queue return starts a second one)
    route           route name (null for a direct call)
    caller, callee  From and To users
    started_at, answered_at, bridged_at, ended_at, duration_s (end - start)
    outcome         see `outcome()`
    end_reason      e.g. Hangup, CalleeHangup, Cancelled, Rejected(503), QueueNoAnswer
    end_code        SIP status tied to the end (final response, or Reason on the BYE)
    codec           the caller leg's codec; peer_codec the bridged leg's
    transfer_target the transfer target (null for a direct call unless a REFER moved it), queue the queue name, queue_member who
                    answered, agent the route_to_agent target, ws_bridge the WebSocket URI
                    (URIs without passwords or credential query parameters, pbx.redact)
    recordings      [{path, area, duration_ms, reason}] from RecordingFinished events
    rtp             per leg ("a" caller, "b" bridged party), as far as reported: the
                    leg's MediaReleased statistics — packets_sent, packets_received and
                    whatever else the worker reports (lost, jitter_ms, late, RTCP)
    rtp_complete    true when every leg with media reported its statistics

The module is pure apart from the writer it is given; time comes in as `now`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pbx.redact import redact_url

if TYPE_CHECKING:
    from pbx.calls.state import Call

RTP_STATS_WAIT_S = 2.0
# Finished calls kept in memory for `/api/calls?sip_call_id=` (the newest; the file
# has them all).
RECENT_CALLS = 1000

# End reasons that mean the system, not a party, ended the call.
FAILURE_REASONS = ("InternalError", "MediaWorkerLost", "NoExecutor", "IvrTimeout", "NoAck",
                   "Shutdown")


class LineWriter(Protocol):
    def write(self, obj: Any) -> None: ...


def outcome(answered: bool, bridged: bool, end_reason: str) -> str:
    """One word for reports: cancelled (the caller gave up before an answer), rejected
    (never answered: no route, no media, early-media hang-up code…), failed (the system
    ended it), transfer_failed / no_answer (answered, but the transfer, queue or agent
    found nobody), bridged (talked to a person), completed (IVR only, ended normally)."""
    if end_reason == "Cancelled":
        return "cancelled"
    if end_reason.startswith(FAILURE_REASONS):
        return "failed"
    if not answered:
        return "rejected"
    if bridged:
        return "bridged"
    if end_reason.startswith("TransferFailed"):
        return "transfer_failed"
    if end_reason in ("QueueNoAnswer", "AgentNoAnswer"):
        return "no_answer"
    return "completed"


def _url(value: str | None) -> str | None:
    return redact_url(value) if value is not None else None


def call_record(call: Call) -> dict[str, Any]:
    """The record of a finished call (without `rtp`, added when it is written)."""
    a, b = call.a, call.b
    ended_at = call.ended_at if call.ended_at is not None else call.started_at
    return {
        "type": "call", "call_id": call.call_id,
        "sip_call_id": call.sip_call_ids[0] if call.sip_call_ids else None,
        "sip_call_ids": list(call.sip_call_ids), "kind": call.kind,
        "sessions": list(call.session_ids),
        "route": call.route.name if call.route else None,
        "caller": call.caller, "callee": call.callee,
        "started_at": call.started_at, "answered_at": call.answered_at,
        "bridged_at": call.bridged_at, "ended_at": ended_at,
        "duration_s": round(ended_at - call.started_at, 3),
        "outcome": outcome(call.answered_at is not None, call.bridged_at is not None,
                           call.end_reason),
        "end_reason": call.end_reason, "end_code": call.end_code,
        "codec": a.media.negotiated.codec if a is not None and a.media.negotiated else None,
        "peer_codec": b.media.negotiated.codec if b is not None and b.media.negotiated else None,
        # URIs from the provider or a REFER: no password or token in a record.
        "transfer_target": _url(call.transfer_target), "queue": call.queue_name,
        "queue_member": call.queue_member, "agent": call.agent,
        "ws_bridge": _url(call.ws_bridge),
        "recordings": list(call.recordings),
    }


@dataclass
class _Pending:
    record: dict[str, Any]
    legs: dict[str, str]  # media id -> leg name ("a", "b")
    due: float
    rtp: dict[str, dict[str, Any]] = field(default_factory=dict)


class CallRecords:
    """Finished calls waiting for their legs' RTP statistics, then written; the newest
    `recent` of them kept, indexed by their legs' SIP Call-IDs."""

    def __init__(self, writer: LineWriter, wait_s: float = RTP_STATS_WAIT_S,
                 recent: int = RECENT_CALLS) -> None:
        self.writer = writer
        self.wait_s = wait_s
        self.pending: dict[str, _Pending] = {}  # call id -> record
        self.by_media: dict[str, str] = {}  # media id -> call id
        self.max_recent = recent
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()  # call id -> record
        self.by_sip_call_id: dict[str, str] = {}  # SIP Call-ID -> call id in `recent`

    def find_sip_call_id(self, sip_call_id: str) -> dict[str, Any] | None:
        """The record of a recent finished call one of whose legs had this Call-ID (as
        written, or without `rtp` while its statistics are awaited)."""
        call_id = self.by_sip_call_id.get(sip_call_id)
        return self.recent.get(call_id) if call_id is not None else None

    def _remember(self, record: dict[str, Any]) -> None:
        if self.max_recent <= 0:
            return
        call_id = record["call_id"]
        self.recent[call_id] = record
        self.recent.move_to_end(call_id)
        for sip_call_id in record.get("sip_call_ids") or ():
            self.by_sip_call_id[sip_call_id] = call_id
        while len(self.recent) > self.max_recent:
            old_id, old = self.recent.popitem(last=False)
            for sip_call_id in old.get("sip_call_ids") or ():
                if self.by_sip_call_id.get(sip_call_id) == old_id:
                    del self.by_sip_call_id[sip_call_id]

    def finish(self, record: dict[str, Any], legs: dict[str, str], now: float) -> None:
        """A call ended. `legs` maps the media ids whose MediaReleased is awaited to a
        leg name; with none, the record is written at once."""
        call_id = record["call_id"]
        self._remember(record)
        if not legs:
            self._write(record, {}, complete=True)
            return
        self.pending[call_id] = _Pending(record, dict(legs), now + self.wait_s)
        for media_id in legs:
            self.by_media[media_id] = call_id

    def media_released(self, media_id: str, stats: dict[str, Any]) -> None:
        """A leg's statistics from MediaReleased (its ReleasedLeg's fields but call_id)."""
        call_id = self.by_media.pop(media_id, None)
        if call_id is None:
            return
        p = self.pending.get(call_id)
        if p is None:
            return
        name = p.legs.pop(media_id, media_id)
        p.rtp[name] = dict(stats)
        if not p.legs:
            del self.pending[call_id]
            self._write(p.record, p.rtp, complete=True)

    def get_timer(self) -> float | None:
        # Records wait `wait_s` each and `now` never goes back, so the dict's insertion
        # order is due order: the first one is the next deadline (O(1) on every call).
        for p in self.pending.values():
            return p.due
        return None

    def handle_timer(self, now: float) -> None:
        while self.pending:
            call_id, p = next(iter(self.pending.items()))
            if p.due > now:
                break
            self._flush(call_id)

    def flush_all(self) -> None:
        for call_id in list(self.pending):
            self._flush(call_id)

    def _flush(self, call_id: str) -> None:
        p = self.pending.pop(call_id)
        for media_id in p.legs:
            self.by_media.pop(media_id, None)
        self._write(p.record, p.rtp, complete=not p.legs)

    def _write(self, record: dict[str, Any], rtp: dict[str, dict[str, Any]],
               complete: bool) -> None:
        full = {**record, "rtp": rtp, "rtp_complete": complete}
        if record["call_id"] in self.recent:
            self.recent[record["call_id"]] = full
        self.writer.write(full)

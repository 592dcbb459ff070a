"""The call table: the one owner of every index into the calls, and the per-source budgets.

Indexes (all point into `calls`):

* `calls` — call id → Call;
* `by_sip_call_id` — the SIP Call-ID of each of a call's legs → its call id
  (`/api/calls?sip_call_id=`);
* `dialogs` — (Call-ID, our tag) → Leg, for in-dialog requests and our ACK matching,
  while the dialog is live or our BYE waits for the ACK of our 2xx;
* `ended_dialogs` — (Call-ID, our tag) → the peer's IP (None: not known), the tombstone
  of a dialog that is over, kept for its linger (`pbx.calls.legs.LINGER_S`) so a late
  BYE still gets its 200, anything else a 481 and a stranger a 403, and an ACK is
  absorbed, without keeping the call: a tombstone holds no object of it. Every linger
  is as long, so they end in the order they began (`ended_order`, expired by the
  liveness check every 0.25 s) with no timer each: what a tombstone holds is strings
  and tuples of them, which the garbage collector stops tracking;
* `pending_invites` — an inbound INVITE's server transaction → its leg until answered
  (CANCEL finds it here);
* `client_txns` — our INVITEs' client transactions → their outbound legs, and our
  session refreshes' (UPDATE or re-INVITE) → their legs;
* `resolving` — (Call-ID, our tag) → an outbound leg whose host name is resolving;
* `legs_by_media` — media id → Leg while it holds an RTP port;
* `sessions` — IVR session id → Session while it runs; `waiting_sessions` those
  waiting for an executor with room.

An ended call is unlinked (`pbx.calls.state.unlink`: its legs and session let go of,
so reference counting frees the lot at once) as soon as no index reaches it any more:
`release_call` notes it, `unlink_released` checks and unlinks at the end of the step
(`CallCore.drain`), after every handler of the step is done with the call.

Budgets (DESIGN §6): an inbound call holds one unit of its source's set-up budget
until its ACK and one of its calls budget until it ends; sources in
`[sip] rate_limit_exempt` hold none.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from pbx.calls.state import unlink
from pbx.config import Settings
from pbx.ratelimit import NetworkSet
from pbx.sip.authguard import source_key
from pbx.sip.transaction import TransactionKey

if TYPE_CHECKING:
    from pbx.calls.state import Call, Leg, Session


class CallTable:
    def __init__(self, settings: Settings) -> None:
        self.calls: dict[str, Call] = {}
        self.by_sip_call_id: dict[str, str] = {}
        self.dialogs: dict[tuple[str, str], Leg] = {}
        self.ended_dialogs: dict[tuple[str, str], str | None] = {}
        self.ended_order: deque[tuple[float, tuple[str, str]]] = deque()
        self.pending_invites: dict[TransactionKey, Leg] = {}
        self.client_txns: dict[TransactionKey, Leg] = {}
        self.resolving: dict[tuple[str, str], Leg] = {}
        self.legs_by_media: dict[str, Leg] = {}
        self.sessions: dict[str, Session] = {}
        self.waiting_sessions: deque[Session] = deque()
        # Ended calls to check and unlink at the end of the step, once each (by id).
        self.released: dict[int, Call] = {}
        self.limits = settings.limits
        self.budget_exempt = NetworkSet(settings.sip.rate_limit_exempt)
        self.setup_by_source: dict[str, int] = {}
        self.calls_by_source: dict[str, int] = {}

    def add_call(self, call: Call) -> None:
        self.calls[call.call_id] = call
        self.index_legs(call)

    def index_legs(self, call: Call) -> None:
        """The call's legs' SIP Call-IDs (a new leg's too) point at it."""
        for sip_call_id in call.sip_call_ids:
            self.by_sip_call_id[sip_call_id] = call.call_id

    def remove_call(self, call: Call) -> None:
        self.calls.pop(call.call_id, None)
        for sip_call_id in call.sip_call_ids:
            if self.by_sip_call_id.get(sip_call_id) == call.call_id:
                del self.by_sip_call_id[sip_call_id]

    def find_sip_call_id(self, sip_call_id: str) -> Call | None:
        call_id = self.by_sip_call_id.get(sip_call_id)
        return self.calls.get(call_id) if call_id is not None else None

    def end_dialog(self, leg: Leg, peer_ip: str | None, until: float) -> None:
        """The leg's dialog is over and nothing waits on it: a tombstone (`peer_ip`)
        takes its place `until` then (`expire_ended_dialogs`); its call goes once
        nothing reaches it."""
        key = leg.dialog_key
        if self.dialogs.get(key) is leg:
            del self.dialogs[key]
            self.ended_dialogs[key] = peer_ip
            self.ended_order.append((until, key))
        self.release_call(leg.call)

    def expire_ended_dialogs(self, now: float) -> None:
        """The tombstones whose linger is over go: their dialogs no longer match."""
        order = self.ended_order
        while order and order[0][0] <= now:
            self.ended_dialogs.pop(order.popleft()[1], None)

    def forget_dialog(self, key: tuple[str, str]) -> None:
        """The linger of a dialog not made a tombstone is over: it no longer matches."""
        leg = self.dialogs.pop(key, None)
        if leg is not None:
            self.release_call(leg.call)

    def release_call(self, call: Call) -> None:
        """Called when an index lets go of one of the call's legs or its session: an
        ended call no index reaches any more is unlinked at the end of the step. Whether
        one does is asked then, once (an ending call lets go of ~4 indexes in its step)."""
        if call.ended:
            self.released[id(call)] = call

    def reaches(self, call: Call) -> bool:
        """Whether an index still leads to the call: a late event (an ACK, a response to
        our INVITE, a host resolved, an executor's reply, a media worker's answer) can
        still need its graph."""
        session = call.session
        if session is not None and self.sessions.get(session.session_id) is session:
            return True
        for leg in call.legs():
            key = leg.dialog_key
            if (self.dialogs.get(key) is leg or self.resolving.get(key) is leg
                    or self.legs_by_media.get(leg.media_id) is leg
                    or (leg.invite_key is not None
                        and self.client_txns.get(leg.invite_key) is leg)):
                return True
        return False

    def unlink_released(self) -> None:
        """Unlink the ended calls released in this step that nothing reached again."""
        released, self.released = self.released, {}
        for call in released.values():
            if not self.reaches(call):
                unlink(call)

    def take_setup_budget(self, source: str) -> str | None:
        """One more inbound call from `source` if its budgets (`[limits]
        setup_calls_per_source`, `calls_per_source`) allow; else the budget that is
        spent ("setup" or "calls")."""
        if source in self.budget_exempt:
            return None
        source = source_key(source)
        held = self.setup_by_source.get(source, 0)
        if held >= self.limits.setup_calls_per_source:
            return "setup"
        calls = self.calls_by_source.get(source, 0)
        if calls >= self.limits.calls_per_source:
            return "calls"
        self.setup_by_source[source] = held + 1
        self.calls_by_source[source] = calls + 1
        return None

    def end_setup(self, leg: Leg) -> None:
        """The leg's call is answered and acknowledged, or over: its set-up unit is back."""
        source, leg.setup_source = leg.setup_source, None
        if source is not None and source not in self.budget_exempt:
            _count_down(self.setup_by_source, source_key(source))

    def end_source_call(self, leg: Leg) -> None:
        """The leg is over: its set-up and calls units are back."""
        self.end_setup(leg)
        source, leg.call_source = leg.call_source, None
        if source is not None and source not in self.budget_exempt:
            _count_down(self.calls_by_source, source_key(source))


def _count_down(held: dict[str, int], source: str) -> None:
    """One unit of `source` is back; a source holding none leaves the table."""
    left = held.get(source, 0) - 1
    if left > 0:
        held[source] = left
    else:
        held.pop(source, None)

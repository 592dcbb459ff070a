"""The call table: the one owner of every index into the calls, and the per-source budgets.

Indexes (all point into `calls`):

* `calls` — call id → Call;
* `by_sip_call_id` — the SIP Call-ID of each of a call's legs → its call id
  (`/api/calls?sip_call_id=`);
* `dialogs` — (Call-ID, our tag) → Leg, for in-dialog requests and our ACK matching;
  kept a while after the call (lingers) so retransmitted BYEs still match;
* `pending_invites` — an inbound INVITE's server transaction → its leg until answered
  (CANCEL finds it here);
* `client_txns` — our INVITEs' client transactions → their outbound legs, and our
  session refreshes' (UPDATE) → their legs;
* `resolving` — (Call-ID, our tag) → an outbound leg whose host name is resolving;
* `legs_by_media` — media id → Leg while it holds an RTP port;
* `sessions` — IVR session id → Session while it runs; `waiting_sessions` those
  waiting for an executor with room.

Budgets (DESIGN §6): an inbound call holds one unit of its source's set-up budget
until its ACK and one of its calls budget until it ends; sources in
`[sip] rate_limit_exempt` hold none.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from pbx.config import Settings
from pbx.ratelimit import NetworkSet
from pbx.sip.transaction import TransactionKey

if TYPE_CHECKING:
    from pbx.calls.state import Call, Leg, Session


class CallTable:
    def __init__(self, settings: Settings) -> None:
        self.calls: dict[str, Call] = {}
        self.by_sip_call_id: dict[str, str] = {}
        self.dialogs: dict[tuple[str, str], Leg] = {}
        self.pending_invites: dict[TransactionKey, Leg] = {}
        self.client_txns: dict[TransactionKey, Leg] = {}
        self.resolving: dict[tuple[str, str], Leg] = {}
        self.legs_by_media: dict[str, Leg] = {}
        self.sessions: dict[str, Session] = {}
        self.waiting_sessions: deque[Session] = deque()
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

    def take_setup_budget(self, source: str) -> str | None:
        """One more inbound call from `source` if its budgets (`[limits]
        setup_calls_per_source`, `calls_per_source`) allow; else the budget that is
        spent ("setup" or "calls")."""
        if source in self.budget_exempt:
            return None
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
            _count_down(self.setup_by_source, source)

    def end_source_call(self, leg: Leg) -> None:
        """The leg is over: its set-up and calls units are back."""
        self.end_setup(leg)
        source, leg.call_source = leg.call_source, None
        if source is not None and source not in self.budget_exempt:
            _count_down(self.calls_by_source, source)


def _count_down(held: dict[str, int], source: str) -> None:
    """One unit of `source` is back; a source holding none leaves the table."""
    left = held.get(source, 0) - 1
    if left > 0:
        held[source] = left
    else:
        held.pop(source, None)

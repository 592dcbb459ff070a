"""What the call layer says on one leg: answer, reject, BYE, CANCEL, ACK, NOTIFY.

Each operation changes the leg's phase where the RFC says the dialog changes (a 2xx
confirms it, a final error response, BYE or CANCEL ends it) and sends through the
transaction layer. Decisions about the call (who else to tell, what to do next) are
the callers'.
"""

from __future__ import annotations

from pbx.calls.context import ALLOW, SUPPORTED, CallContext, reason_phrase
from pbx.calls.events import CallEvents
from pbx.calls.session_timer import SessionTimers
from pbx.calls.state import Leg, LegPhase, advance_leg, peer_ip
from pbx.calls.timers import TimerKind
from pbx.sip.dialog import Dialog, ack_2xx, new_request
from pbx.sip.message import make_cancel
from pbx.sip.transaction import TransactionKey

Addr = tuple[str, int]
# RFC 3261 §17.1.1.2 Timer B/F: how long a finished dialog or client transaction's owner
# is kept so late responses and retransmitted requests still match.
LINGER_S = 32.0
# RFC 3515 §2.4.4: how long the implicit subscription of a REFER lives.
REFER_SUBSCRIPTION_S = 60


class LegSignaling:
    def __init__(self, ctx: CallContext, session_timers: SessionTimers,
                 events: CallEvents) -> None:
        self.ctx = ctx
        self.session_timers = session_timers
        self.events = events

    def dialog_headers(self, leg: Leg) -> list[tuple[str, str]]:
        headers = [("Contact", self.ctx.me.contact(leg.reliable)), ("Allow", ALLOW),
                   ("Supported", SUPPORTED)]
        headers += [("Record-Route", rr) for rr in leg.dialog.route_set]
        return headers

    def answer(self, leg: Leg) -> None:
        """200 OK for an inbound leg's INVITE, retransmitted until the ACK (§13.3.1.4)."""
        ctx = self.ctx
        assert leg.invite is not None and leg.invite_key is not None
        ctx.table.pending_invites.pop(leg.invite_key, None)
        headers = self.dialog_headers(leg) + self.session_timers.negotiate(leg, leg.invite)
        data = ctx.respond(leg.invite_key, leg.invite, 200, to_tag=leg.dialog.local_tag,
                           body=leg.media.answer_sdp, headers=headers)
        advance_leg(leg, LegPhase.CONFIRMED)
        if not leg.reliable:  # a stream delivers the 2xx; only UDP retransmits it
            ctx.retransmitter.start(leg.dialog_key, data, leg.source or leg.addr, ctx.now)
        call = leg.call
        call.answered_at = ctx.wall()
        self.events.call(call, "answered")

    def reject(self, leg: Leg, status: int, reason: str | None = None,
               headers: list[tuple[str, str]] | None = None) -> None:
        """A final error response to an inbound leg's INVITE: the leg is over."""
        assert leg.invite is not None and leg.invite_key is not None
        self.ctx.table.pending_invites.pop(leg.invite_key, None)
        self.ctx.respond(leg.invite_key, leg.invite, status, reason,
                         to_tag=leg.dialog.local_tag, headers=headers)
        advance_leg(leg, LegPhase.TERMINATED)

    def send_bye(self, leg: Leg, code: int | None = None, text: str = "") -> None:
        """BYE on a confirmed leg (with an RFC 3326 Reason when `code` is given)."""
        if leg.phase is not LegPhase.CONFIRMED:
            return
        extra = []
        if code is not None:
            # The text comes from the provider's side: keep it one safe line.
            extra.append(("Reason",
                          f'SIP;cause={code};text="{reason_phrase(text) or "Call ended"}"'))
        advance_leg(leg, LegPhase.TERMINATED)
        if self.ctx.retransmitter.pending(leg.dialog_key):
            # Our 2xx is not ACKed yet: the BYE waits for the ACK, or for the 2xx's
            # retransmissions to time out (RFC 3261 §15), so it cannot overtake a lost
            # 2xx and leave the peer in a call we ended (`bye_after_ack`).
            leg.bye_waiting = extra
            return
        self.bye(leg.dialog, leg.addr, extra)

    def bye_after_ack(self, leg: Leg) -> None:
        """The ACK came (or our 2xx timed out): the BYE that waited for it goes now."""
        extra, leg.bye_waiting = leg.bye_waiting, None
        if extra is not None:
            self.bye(leg.dialog, leg.addr, extra)
        self.linger(leg)  # from our BYE on

    def bye(self, dialog: Dialog, addr: Addr,
            extra: list[tuple[str, str]] | None = None) -> None:
        """BYE in a dialog (a leg's, or one a late or forked 2xx made)."""
        req = new_request(dialog, self.ctx.me, "BYE", extra)
        self.ctx.send_request(req, addr, dialog.reliable)

    def ack(self, dialog: Dialog, addr: Addr, invite_cseq: int) -> None:
        """ACK a 2xx to our INVITE (every one, retransmissions included, §13.2.2.4)."""
        self.ctx.send_stateless(ack_2xx(dialog, self.ctx.me, invite_cseq), addr,
                                dialog.reliable)

    def cancel(self, leg: Leg) -> None:
        """CANCEL a ringing outbound leg; before any 1xx it waits for one (RFC 3261 §9.1)."""
        if leg.invite is None or leg.invite_key is None:
            return
        if not leg.provisional_seen:
            leg.cancel_pending = True
            return
        leg.cancel_pending = False
        self.ctx.send_request(make_cancel(leg.invite), leg.addr, leg.reliable)
        # Timer C's role: if no final response ever comes, forget the INVITE's owner.
        self.linger_client_txn(leg.invite_key)

    def give_up(self, leg: Leg) -> None:
        """An outbound leg we no longer want: CANCEL while it rings; over either way
        (a 2xx that still comes gets ACK + BYE)."""
        if leg.phase is LegPhase.EARLY:
            self.cancel(leg)
        advance_leg(leg, LegPhase.TERMINATED)

    def notify_refer(self, leg: Leg, event: str, status_line: str, *, final: bool) -> None:
        """A NOTIFY of a REFER's implicit subscription (RFC 3515 §2.4.5)."""
        state = ("terminated;reason=noresource" if final
                 else f"active;expires={REFER_SUBSCRIPTION_S}")
        req = new_request(leg.dialog, self.ctx.me, "NOTIFY",
                          [("Event", event), ("Subscription-State", state)],
                          body=f"SIP/2.0 {status_line}\r\n".encode(),
                          content_type="message/sipfrag;version=2.0")
        self.ctx.send_request(req, leg.addr, leg.reliable)

    def linger(self, leg: Leg) -> None:
        """Keep the leg's dialog a while so retransmitted BYEs still match (then 481):
        once terminated and with no BYE of ours waiting for an ACK (which needs the
        leg), as a tombstone (`CallTable.ended_dialogs`)."""
        ctx = self.ctx
        if leg.phase is LegPhase.TERMINATED and leg.bye_waiting is None:
            ctx.timers.cancel(TimerKind.DIALOG_LINGER, leg.dialog_key)  # an earlier one
            ctx.table.end_dialog(leg, peer_ip(leg), ctx.now + LINGER_S)
        else:
            ctx.timers.set(TimerKind.DIALOG_LINGER, leg.dialog_key, ctx.now + LINGER_S)

    def linger_client_txn(self, key: TransactionKey | None) -> None:
        """A client transaction whose final response may never come (after our CANCEL,
        or a refresh pending when its dialog ended): late answers still find its leg for
        64*T1 (§9.1), then the front forgets it and the transaction ends."""
        if key is not None:
            self.ctx.timers.set(TimerKind.CLIENT_TXN_LINGER, key, self.ctx.now + LINGER_S)

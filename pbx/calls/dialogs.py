"""Requests inside a dialog: BYE, re-INVITE, UPDATE, INFO, REFER, OPTIONS.

An in-dialog request is accepted only from the dialog's peer (DESIGN §6). BYE ends the
call (on an early dialog it ends the INVITE too, RFC 3261 §15); a re-INVITE or UPDATE
renegotiates the leg's media (hold, resume, a new address or codec) and refreshes its
session timer; INFO carries DTMF to the leg's worker; REFER is `pbx.calls.refer`'s.
"""

from __future__ import annotations

import logging
import secrets

from pbx import messages as m
from pbx.calls.context import ALLOW, SUPPORTED, CallContext
from pbx.calls.legs import LegSignaling
from pbx.calls.media import MediaPlane
from pbx.calls.refer import Refers
from pbx.calls.session_timer import SessionTimers
from pbx.calls.state import Leg, LegPhase, advance_leg, peer_ip
from pbx.calls.teardown import Teardown
from pbx.sip import sdp
from pbx.sip.dialog import in_order
from pbx.sip.errors import SipError
from pbx.sip.fields import DTMF_INFO_TYPES, parse_dtmf_info
from pbx.sip.message import SipRequest
from pbx.sip.transaction import TransactionKey

log = logging.getLogger("pbx.calls")

Addr = tuple[str, int]


def _our_reinvite_pending(leg: Leg) -> bool:
    """Our session refresh re-INVITE (an offer: our SDP) awaits its final response."""
    return leg.refresh_key is not None and leg.refresh_key.method == "INVITE"


def _their_offer_unanswered(leg: Leg) -> bool:
    """The offer of the peer's initial INVITE has no answer of ours yet: an inbound leg
    still ringing a direct call (its answer comes with the callee's 2xx; an IVR route's
    goes in its 183 or 200 as soon as the port is there)."""
    return (not leg.outbound and leg.phase is LegPhase.EARLY and leg.call.route is None
            and leg.invite is not None and bool(leg.invite.body))


class InDialog:
    def __init__(self, ctx: CallContext, legs: LegSignaling, media: MediaPlane,
                 session_timers: SessionTimers, teardown: Teardown, refers: Refers) -> None:
        self.ctx = ctx
        self.legs = legs
        self.media = media
        self.session_timers = session_timers
        self.teardown = teardown
        self.refers = refers

    def on_request(self, req: SipRequest, addr: Addr, key: TransactionKey) -> None:
        ctx = self.ctx
        table = ctx.table
        dialog_key = (req.call_id, req.to_tag or "")
        leg = table.dialogs.get(dialog_key)
        if leg is not None:
            peer = peer_ip(leg)
        elif dialog_key in table.ended_dialogs:  # the tombstone of an ended dialog
            peer = table.ended_dialogs[dialog_key]
        else:
            ctx.respond(key, req, 481)
            return
        if not ctx.from_dialog_peer(req, peer, addr[0],
                                    leg.call.call_id if leg is not None else req.call_id):
            ctx.respond(key, req, 403, "Forbidden (not the dialog's peer)")
            return
        method = req.method
        if leg is None or leg.phase is LegPhase.TERMINATED:
            # The dialog is over and only lingers so that late requests get an answer,
            # never an effect on the call: after a transfer the referrer's own BYE
            # crosses ours while its call goes on between the other two. A BYE gets its
            # 200 (RFC 3261 §15.1.2: either side may send one), anything else 481.
            ctx.respond(key, req, 200 if method == "BYE" else 481)
            if method == "BYE" and leg is not None and leg.bye_waiting is not None:
                # Our BYE waited for the ACK (§15); theirs ended the dialog already.
                leg.bye_waiting = None
                ctx.retransmitter.ack(leg.dialog_key)
                self.legs.linger(leg)
            return
        if not in_order(leg.dialog, req):
            # Delivered late, after a newer request (UDP): applying it would undo what
            # that one did, e.g. put a resumed call back on hold (RFC 3261 §12.2.2).
            ctx.respond(key, req, 500, "Out Of Order CSeq")
            return
        if method == "BYE":
            self._on_bye(leg, req, key)
        elif method == "INVITE":
            self._on_reinvite(leg, req, addr, key)
        elif method == "UPDATE":
            self._on_update(leg, req, key)
        elif method == "REFER":
            self.refers.on_refer(leg, req, key)
        elif method == "INFO":
            self._on_info(leg, req, key)
        elif method == "OPTIONS":
            ctx.respond(key, req, 200, headers=[("Allow", ALLOW)])
        else:
            ctx.respond(key, req, 501, headers=[("Allow", ALLOW)])

    def _on_bye(self, leg: Leg, req: SipRequest, key: TransactionKey) -> None:
        self.ctx.respond(key, req, 200)
        call = leg.call
        if leg in call.detached:  # a referrer leaving before its final NOTIFY
            self.teardown.drop_leg(leg)
            return
        if leg.phase is LegPhase.EARLY and not leg.outbound and leg.invite_key is not None:
            self.legs.reject(leg, 487)  # a BYE on an early dialog ends the INVITE too
        advance_leg(leg, LegPhase.TERMINATED)
        self.teardown.hangup(call, "Hangup" if leg is call.a else "CalleeHangup", None,
                             except_leg=leg)

    def _on_info(self, leg: Leg, req: SipRequest, key: TransactionKey) -> None:
        # A bad digit raises SipError: 400 "Bad DTMF Digit" at the request boundary.
        info = parse_dtmf_info(req.headers.get("Content-Type"), req.body)
        if info is None:
            self.ctx.respond(key, req, 415, headers=[("Accept", ", ".join(DTMF_INFO_TYPES))])
            return
        self.ctx.respond(key, req, 200)
        if leg.media.worker is not None:
            self.ctx.to_media(leg.media.worker, m.MediaDtmfInfo(
                call_id=leg.media_id, digit=info.digit, duration_ms=info.duration_ms))

    def _on_reinvite(self, leg: Leg, req: SipRequest, addr: Addr, key: TransactionKey) -> None:
        """A re-INVITE (RFC 3261 §14.2, RFC 3264 §8): hold, resume, a new address or codec,
        a session refresh; offerless, our 2xx makes the offer and the ACK answers it."""
        ctx = self.ctx
        if leg.phase is not LegPhase.CONFIRMED:
            # The dialog's first INVITE is still unanswered (§14.2: 500 + Retry-After).
            ctx.respond(key, req, 500, "Previous INVITE Pending",
                        headers=[("Retry-After", str(secrets.randbelow(10) + 1))])
            return
        if leg.reinvite_unacked or leg.offer_in_2xx or _our_reinvite_pending(leg):
            # Its 2xx awaits the ACK, or our refresh re-INVITE its answer: overlapping
            # (§14.2; the peer retries after its §14.1 delay).
            ctx.respond(key, req, 491)
            return
        if self.session_timers.refused_too_small(req, key):
            return
        body = self._renegotiate(leg, req.body) if req.body else leg.media.answer_sdp
        headers = self.legs.dialog_headers(leg) + self.session_timers.negotiate(leg, req)
        data = ctx.respond(key, req, 200, body=body, headers=headers)
        leg.reinvite_unacked = True
        leg.offer_in_2xx = not req.body
        if not leg.reliable:
            ctx.retransmitter.start(leg.dialog_key, data, addr, ctx.now)

    def _on_update(self, leg: Leg, req: SipRequest, key: TransactionKey) -> None:
        """UPDATE (RFC 3311): a new offer, or a session refresh, in any dialog state."""
        ctx = self.ctx
        if req.body and (leg.offer_in_2xx or _our_reinvite_pending(leg)):
            ctx.respond(key, req, 491)  # our offer is still unanswered (RFC 3311 §5.2)
            return
        if req.body and _their_offer_unanswered(leg):
            # RFC 3311 §5.2: their INVITE's offer is not answered yet (a direct call's
            # answer goes with its callee's): 500 with Retry-After.
            ctx.respond(key, req, 500, "Offer Pending",
                        headers=[("Retry-After", str(secrets.randbelow(10) + 1))])
            return
        if self.session_timers.refused_too_small(req, key):
            return
        body = self._renegotiate(leg, req.body) if req.body else b""
        headers = [("Contact", ctx.me.contact(leg.reliable)), ("Supported", SUPPORTED)]
        ctx.respond(key, req, 200, body=body,
                    headers=headers + self.session_timers.negotiate(leg, req))

    def _renegotiate(self, leg: Leg, offer: bytes) -> bytes:
        """Answer a new offer in the dialog and apply it to the leg's media. An offer that
        changes nothing (a refresh) gets our previous SDP back, same o= version; a changed
        answer takes the next version (RFC 3264 §8). SdpError (488) leaves all as it was."""
        media = leg.media
        if not media.rtp_ip or media.worker is None:
            raise SipError("no media for this dialog", 488)
        origin = sdp.origin_of(media.answer_sdp) or (int(self.ctx.wall()),) * 2
        negotiated, answer = sdp.answer_offer(offer, media.rtp_ip, media.rtp_port, origin[0],
                                              version=origin[1])
        if not self.media.may_move_to(leg, negotiated.remote_ip):
            raise SipError("RTP address not the caller's own on a shared port", 488)
        if sdp.without_origin(answer) == sdp.without_origin(media.answer_sdp):
            answer = media.answer_sdp
        else:
            negotiated, answer = sdp.answer_offer(offer, media.rtp_ip, media.rtp_port,
                                                  origin[0], version=origin[1] + 1)
        changed = negotiated != media.negotiated
        media.negotiated, media.answer_sdp = negotiated, answer
        if changed:
            log.info("call %s: leg %s now %s %s:%d %s", leg.call.call_id, leg.media_id,
                     negotiated.codec, negotiated.remote_ip, negotiated.remote_port,
                     negotiated.direction)
            self.media.send_remote(leg)
        return answer

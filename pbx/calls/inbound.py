"""Incoming calls: an initial INVITE admitted (or not), answered, acknowledged or
cancelled.

Admission, in order: who calls (`party`: an extension whose digest checks out, a
trusted source, or an anonymous caller; pbx.policy), whether the policy lets that
party reach the destination, and the source's set-up and calls budgets (DESIGN §6).
An admitted call gets leg `a` and a port on a media worker; then a route's IVR
answers it (200, or 183 for `answer = "early_media"`), or a direct call to a user is
transferred to that user and answered when the user answers.
"""

from __future__ import annotations

import logging

from pbx.calls.context import CallContext, reason_phrase
from pbx.calls.events import CallEvents
from pbx.calls.ivr import IvrBroker
from pbx.calls.legs import LegSignaling
from pbx.calls.media import MediaPlane
from pbx.calls.outbound import Outbound
from pbx.calls.session_timer import SessionTimers
from pbx.calls.state import Call, Leg, LegPhase, peer_ip
from pbx.calls.teardown import Teardown
from pbx.policy import Destination, DestinationKind, Party, PartyKind, Verdict
from pbx.routing import CallAddress, Router
from pbx.sip import sdp
from pbx.sip.dialog import next_hop, uas_from_invite
from pbx.sip.errors import SipError
from pbx.sip.message import SipRequest, new_tag
from pbx.sip.transaction import TransactionKey
from pbx.sip.uri import parse_name_addr, parse_uri
from pbx.tokens import token_hex

log = logging.getLogger("pbx.calls")

Addr = tuple[str, int]


class Inbound:
    def __init__(self, ctx: CallContext, legs: LegSignaling, media: MediaPlane,
                 session_timers: SessionTimers, teardown: Teardown, outbound: Outbound,
                 ivr: IvrBroker, events: CallEvents) -> None:
        self.ctx = ctx
        self.router = Router(ctx.settings.routes)
        self.legs = legs
        self.media = media
        self.session_timers = session_timers
        self.teardown = teardown
        self.outbound = outbound
        self.ivr = ivr
        self.events = events

    # ---------------------------------------------------------------- admission

    def on_invite(self, req: SipRequest, addr: Addr, key: TransactionKey,
                  reliable: bool) -> None:
        ctx = self.ctx
        if self.session_timers.refused_too_small(req, key):
            return
        to = parse_name_addr(req.headers.get("To") or "")
        frm = parse_name_addr(req.headers.get("From") or "")
        ruri = parse_uri(req.uri)
        address = CallAddress(
            to_user=to.uri.user or "", to_host=to.uri.host,
            from_user=frm.uri.user or "", from_host=frm.uri.host,
            request_uri_user=ruri.user or "",
        )
        ctx.stats["calls_total"] += 1
        destination = self._destination(address)
        party = self._party(req, key, addr, frm.uri.host, frm.uri.port, address.from_user,
                            destination)
        if party is None:
            ctx.stats["calls_failed"] += 1
            return  # challenged or refused
        decision = ctx.policy.decide(party, destination)
        if decision.verdict is Verdict.CHALLENGE:
            self._challenge(req, key)
            return
        if not decision.allowed:
            ctx.stats["calls_failed"] += 1
            ctx.stats["calls_forbidden"] += 1
            ctx.respond(key, req, decision.status, decision.reason, to_tag=new_tag())
            return
        # The dialog first: an INVITE it cannot be made from (a bad Contact: SipError,
        # answered 400) must not have spent a unit of its source's budget first.
        dialog = uas_from_invite(req, new_tag(), reliable)
        spent = ctx.table.take_setup_budget(addr[0])
        if spent is not None:
            ctx.stats["calls_failed"] += 1
            ctx.stats[f"{spent}_budget_refused"] += 1
            reason = ("Too Many Calls In Set-Up" if spent == "setup"
                      else "Too Many Calls From This Source")
            ctx.respond(key, req, 503, reason, to_tag=new_tag(),
                        headers=[("Retry-After", str(ctx.settings.limits.retry_after_s))])
            return
        route = destination.route
        call = Call(
            call_id=token_hex(8), route=route, caller=address.from_user,
            callee=address.to_user, started_at=ctx.wall(), party=party,
            extension=destination.name if destination.kind is DestinationKind.USER else None)
        # Over TCP, in-dialog requests reuse the caller's connection (RFC 3261 §18.1.1;
        # a phone behind NAT cannot take a new one); over UDP they follow the route set.
        leg = Leg(call=call, media_id=f"{call.call_id}-a", outbound=False, dialog=dialog,
                  addr=addr if reliable else next_hop(dialog, fallback=addr), source=addr,
                  invite=req, invite_key=key, peer=party, setup_source=addr[0],
                  call_source=addr[0])
        call.a = leg
        ctx.table.add_call(call)
        ctx.table.pending_invites[key] = leg
        self.events.call(call, "started")
        if not req.body and route is not None and route.answer == "early_media":
            # A late offer is ours to make in the 183, which needs it sent reliably
            # (RFC 3262 100rel), which we do not do.
            self._fail(leg, 488, "No SDP Offer")
            return
        self.media.allocate(leg, route.inband_dtmf if route else False)

    def _destination(self, address: CallAddress) -> Destination:
        """What an initial INVITE asks for: a route, else one of our users (bridged, no
        IVR), else nothing."""
        route = self.router.match(address)
        if route is not None:
            return Destination(DestinationKind.ROUTE, route.name, route)
        if self.ctx.registrar.lookup(address.to_user, self.ctx.now):
            return Destination(DestinationKind.USER, address.to_user)
        return Destination(DestinationKind.NONE, address.to_user)

    def _party(self, req: SipRequest, key: TransactionKey, addr: Addr, from_host: str,
               from_port: int | None, from_user: str,
               destination: Destination) -> Party | None:
        """Who calls (pbx.policy): an extension once its digest credentials check out
        (RFC 3261 §22.3, as a proxy: 407), a trusted source, or an anonymous caller.
        None when the request was answered here (challenged or refused)."""
        ctx = self.ctx
        registrar = ctx.registrar
        if registrar.authenticator.has_credentials(req, proxy=True):
            # Verified with replay protection and the failed-login backoff (a locked-out
            # source or username gets 403 + Retry-After, its credentials unchecked).
            out = registrar.authenticate(req, addr, ctx.now, auth_now=ctx.wall(), proxy=True)
            if out.ok and out.username == from_user:
                return Party(PartyKind.EXTENSION, from_user)
            if out.ok:  # valid credentials of another extension: no impersonation
                registrar.log_failure(req, addr, ctx.now, "auth refused", out.username,
                                      f"From user {from_user[:32]!r} is not the "
                                      "authenticated user")
                ctx.respond(key, req, 403, "Forbidden (From is not the authenticated user)",
                            to_tag=new_tag())
            else:
                if out.status == 407:
                    ctx.stats["calls_challenged"] += 1
                ctx.respond(key, req, out.status,
                            reason_phrase(out.reason) if out.reason else None,
                            to_tag=new_tag(), headers=out.headers)
            return None
        if ctx.policy.is_trusted_source(addr[0]):
            return Party(PartyKind.TRUSTED, from_user)
        if ctx.policy.must_authenticate(from_host, from_port, destination):
            self._challenge(req, key)
            return None
        return Party(PartyKind.ANONYMOUS, from_user)

    def _challenge(self, req: SipRequest, key: TransactionKey) -> None:
        """The one 407 every unauthorized INVITE gets, whatever it asked for."""
        ctx = self.ctx
        ctx.stats["calls_challenged"] += 1
        ctx.respond(key, req, 407, to_tag=new_tag(),
                    headers=ctx.registrar.challenge(req, ctx.wall(), proxy=True))

    # ---------------------------------------------------------------- answering

    def allocated(self, leg: Leg, ok: bool) -> None:
        """Leg a's port is there (or not): answer the offer."""
        call = leg.call
        if leg.phase is LegPhase.TERMINATED:  # cancelled while the port was allocated
            self.media.release(leg)
            return
        if not ok:
            self._fail(leg, 503, "No Media Worker", [("Retry-After", "5")])
            return
        assert leg.invite is not None and leg.invite_key is not None
        media = leg.media
        if not leg.invite.body:
            # A late offer (RFC 3261 §13.2.1, RFC 3264 §5; trunks and gateways send
            # them): our 2xx makes the offer, the ACK answers it (`on_ack`).
            media.answer_sdp = answer = sdp.make_offer(media.rtp_ip, media.rtp_port,
                                                       int(self.ctx.wall()))
            leg.offer_in_2xx = True
        else:
            try:
                negotiated, answer = sdp.answer_offer(leg.invite.body, media.rtp_ip,
                                                      media.rtp_port, int(self.ctx.wall()))
            except SipError as exc:
                self.media.release(leg)
                self._fail(leg, exc.status, reason_phrase(str(exc), 80))
                return
            media.negotiated, media.answer_sdp = negotiated, answer
            self.media.send_remote(leg)
        self.ctx.table.dialogs[leg.dialog_key] = leg
        route = call.route
        if route is None:
            # Direct call to a user: the caller is answered when the callee answers.
            assert call.extension is not None
            self.outbound.transfer(call, call.extension)
            return
        if route.answer == "early_media":
            # 183 with the SDP answer: the IVR plays before any final response, so a
            # play_and_hangup code can still be the final status (docs/actions.md).
            self.ctx.respond(leg.invite_key, leg.invite, 183, to_tag=leg.dialog.local_tag,
                             body=answer, headers=self.legs.dialog_headers(leg))
        else:
            self.legs.answer(leg)
        self.ivr.start(call, leg.invite)

    def _fail(self, leg: Leg, status: int, reason: str,
              headers: list[tuple[str, str]] | None = None) -> None:
        self.legs.reject(leg, status, reason, headers)
        self.ctx.stats["calls_failed"] += 1
        self.teardown.end(leg.call, f"Rejected({status})", status)

    # ---------------------------------------------------------------- ACK, CANCEL

    def on_ack(self, req: SipRequest, addr: Addr) -> None:
        ctx = self.ctx
        dialog_key = (req.call_id, req.to_tag or "")
        leg = ctx.table.dialogs.get(dialog_key)
        if leg is None:
            if dialog_key in ctx.table.ended_dialogs:
                ctx.retransmitter.ack(dialog_key)  # absorbed: the dialog is over
            return
        # As any in-dialog request (pbx.calls.dialogs): an ACK carries an answer that moves
        # media, or ends a late-offer call; a stranger's is dropped (an ACK has no answer).
        if not ctx.from_dialog_peer(req, peer_ip(leg), addr[0], leg.call.call_id):
            return
        ctx.retransmitter.ack(leg.dialog_key)
        leg.reinvite_unacked = False
        if leg.bye_waiting is not None:
            self.legs.bye_after_ack(leg)
            return
        if leg.phase is LegPhase.CONFIRMED:
            ctx.table.end_setup(leg)
        if leg.offer_in_2xx:
            # The answer to the offer our 2xx made (an offerless re-INVITE).
            leg.offer_in_2xx = False
            try:
                answer = sdp.parse_answer(req.body)
            except SipError as exc:
                log.info("call %s: no usable SDP answer in the ACK: %s",
                         leg.call.call_id, exc)
                if leg.media.negotiated is None:
                    # A late offer's session never had media: it cannot go on.
                    self.teardown.leg_over(leg, "NoSdpAnswer", 488)
                return
            if not self.media.may_move_to(leg, answer.remote_ip):
                log.info("call %s: the ACK's SDP names %s, not the caller's own address, "
                         "on a shared RTP port: ignored", leg.call.call_id, answer.remote_ip)
                return
            leg.media.negotiated = answer
            self.media.send_remote(leg)

    def ack_timeout(self, dialog_key: tuple[str, str]) -> None:
        leg = self.ctx.table.dialogs.get(dialog_key)
        if leg is not None and leg.bye_waiting is not None:
            self.legs.bye_after_ack(leg)  # the call is over already (§15)
        elif leg is not None:
            log.info("no ACK for 200 on %s: ending the call", dialog_key[0])
            self.teardown.leg_over(leg, "NoAck", None)

    def on_cancel(self, req: SipRequest, addr: Addr, key: TransactionKey) -> None:
        ctx = self.ctx
        invite_key = ctx.transactions.find_invite_server(req)
        if invite_key is None:
            ctx.respond(key, req, 481)
            return
        leg = ctx.table.pending_invites.get(invite_key)
        if leg is None:
            # RFC 3261 §9.2: the INVITE was already answered; the CANCEL itself succeeds.
            ctx.respond(key, req, 200)
            return
        # A CANCEL takes the INVITE's path (§9.1): from elsewhere, it is not the caller's.
        if not ctx.from_dialog_peer(req, peer_ip(leg), addr[0], leg.call.call_id):
            ctx.respond(key, req, 403, "Forbidden (not the dialog's peer)")
            return
        ctx.respond(key, req, 200, to_tag=leg.dialog.local_tag)
        self.legs.reject(leg, 487)
        self.teardown.hangup(leg.call, "Cancelled", 487)

"""REFER (RFC 3515): blind transfers asked by a party in the call.

On an IVR call the caller is connected to the target (the IVR ends with
`Transfer(<target>)`); in a bridge the referrer's peer is, and the referrer is released
once told; when the transfer fails it has its call back. The referrer hears how it
went in NOTIFYs of its implicit subscription (`message/sipfrag`): 100 at once, the
final status when the transfer is answered or fails.
"""

from __future__ import annotations

import logging

from pbx import messages as m
from pbx.calls.context import CallContext, reason_phrase
from pbx.calls.ivr import IvrBroker
from pbx.calls.legs import LegSignaling
from pbx.calls.outbound import Outbound
from pbx.calls.state import Call, CallPhase, Leg, LegPhase, advance_call
from pbx.calls.targets import Targets
from pbx.calls.teardown import Teardown
from pbx.sip.message import REASON_PHRASES, SipRequest
from pbx.sip.transaction import TransactionKey
from pbx.sip.uri import SipUri, parse_name_addr

log = logging.getLogger("pbx.calls")


def refer_target(uri: SipUri) -> str:
    """A Refer-To URI as a transfer target: scheme, user, host and port only (its
    parameters and headers are the referrer's to set, not ours to dial)."""
    user = uri.user or ""
    return f"{uri.scheme}:{user + '@' if user else ''}{uri.host}" + (
        f":{uri.port}" if uri.port else "")


class Refers:
    def __init__(self, ctx: CallContext, legs: LegSignaling, teardown: Teardown,
                 outbound: Outbound, ivr: IvrBroker, targets: Targets) -> None:
        self.ctx = ctx
        self.legs = legs
        self.teardown = teardown
        self.outbound = outbound
        self.ivr = ivr
        self.targets = targets
        outbound.on_bridged.append(lambda call: self.result(call, 200, "OK"))
        outbound.retrieve = self.retrieve
        teardown.before_hangup.append(self._on_hangup)

    def on_refer(self, leg: Leg, req: SipRequest, key: TransactionKey) -> None:
        ctx = self.ctx
        call = leg.call
        refer_to = req.headers.get("Refer-To")
        if leg.phase is not LegPhase.CONFIRMED or call.ended:
            ctx.respond(key, req, 403, "REFER Outside A Confirmed Dialog")
            return
        if not refer_to:
            ctx.respond(key, req, 400, "Missing Refer-To")
            return
        uri = parse_name_addr(refer_to).uri
        if "replaces" in str(uri).lower():
            ctx.respond(key, req, 501, "Attended Transfer Not Supported")
            return
        # One policy for every leg (DESIGN §6): the referrer may ask for what it could
        # have called itself, and an unknown caller not at all unless its route says so.
        if not ctx.policy.may_refer(leg.peer, call.route):
            ctx.stats["refers_refused"] += 1
            log.info("call %s: REFER from %s party refused", call.call_id, leg.peer.kind.value)
            ctx.respond(key, req, 403, "Forbidden (transfer not allowed)")
            return
        destination = self.targets.classify(refer_target(uri))
        decision = ctx.policy.decide(leg.peer, destination)
        if not decision.allowed and decision.status != 404:  # nobody there: NOTIFY 404
            ctx.stats["refers_refused"] += 1
            log.info("call %s: REFER to %r refused for a %s party", call.call_id,
                     reason_phrase(destination.name, 80), leg.peer.kind.value)
            ctx.respond(key, req, 403, "Forbidden (transfer target not allowed)")
            return
        a, b = call.a, call.b
        bridged = (call.phase is CallPhase.BRIDGED and a is not None and b is not None
                   and leg in (a, b) and a.phase is b.phase is LegPhase.CONFIRMED)
        in_ivr = call.phase is CallPhase.IVR and leg is a
        if call.referrer is not None or not (bridged or in_ivr):
            ctx.respond(key, req, 403, "Transfer Not Possible Now")
            return
        ctx.respond(key, req, 202, headers=[("Contact", ctx.me.contact(leg.reliable))])
        call.referrer = leg
        call.refer_event = f"refer;id={req.cseq[0]}"  # RFC 3515 §2.4.6
        self.legs.notify_refer(leg, call.refer_event, "100 Trying", final=False)
        target = destination.name
        log.info("call %s: REFER from %s to %s", call.call_id, leg.media_id, target)
        session = call.session
        if session is not None and not session.done:
            session.closing = True
            self.ivr.input(session, m.CallEndedInput(reason=f"Transfer({target})"))
        if in_ivr:
            if leg.media.worker is not None:
                ctx.to_media(leg.media.worker, m.MediaStop(call_id=leg.media_id))
        else:
            # The referrer leaves the bridge; its peer becomes the call's caller side.
            call.a, call.b = (b if leg is a else a), None
            call.detached.append(leg)
        self.outbound.transfer(call, target)

    def _on_hangup(self, call: Call, reason: str, code: int | None) -> None:
        if call.referrer is not None:
            status = code if code is not None and 300 <= code <= 699 else 487
            self.result(call, status, "Request Terminated" if status == 487 else "")

    def retrieve(self, call: Call, status: int) -> bool:
        """The transfer out of a bridge failed with `status`: the referrer hears it (the
        final NOTIFY) and, still in its dialog, has its call back with the party it
        tried to transfer (RFC 5589 §6.1: the transferor retrieves the call; RFC 3515
        §2.4.5: a REFER's outcome does not end the referrer's dialog). Their media
        bridge was never undone. False when there is no such referrer: the call ends."""
        leg, peer = call.referrer, call.a
        if (leg is None or leg not in call.detached or leg.phase is not LegPhase.CONFIRMED
                or peer is None or peer.phase is not LegPhase.CONFIRMED or call.ended):
            return False
        self.result(call, status, "")
        call.detached.remove(leg)
        # Back in the bridge: a callee who referred stays `b`, a caller `a`.
        if leg.outbound:
            call.b = leg
        else:
            call.a, call.b = leg, peer
        advance_call(call, CallPhase.BRIDGED)
        log.info("call %s: transfer failed with %d; %s has the call back", call.call_id,
                 status, leg.media_id)
        return True

    def result(self, call: Call, status: int, reason: str) -> None:
        """The transfer a REFER asked for succeeded (200) or failed: the final NOTIFY; a
        referrer detached from its bridge is then released."""
        leg, call.referrer = call.referrer, None
        if leg is None or leg.phase is not LegPhase.CONFIRMED:
            return
        reason = reason or REASON_PHRASES.get(status, "Failed")
        self.legs.notify_refer(leg, call.refer_event, f"{status} {reason}", final=True)
        if leg in call.detached and status < 300:
            self.legs.send_bye(leg)
            self.teardown.drop_leg(leg)

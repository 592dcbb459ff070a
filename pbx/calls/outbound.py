"""Outbound legs (the B2BUA's UAC side): transfers, queue members, agents.

A transfer rings every binding of its target at once (parallel forking: an
extension's registered contacts and its static contact, one branch per address;
`Targets.resolve_all`), each branch its own outbound leg in `call.forks`, all on the
caller's media worker (the bridge is local to one worker). RFC 3261 §16.7 as a B2BUA:

* the first branch to answer (2xx) becomes leg `b` and is bridged to the caller; the
  others get CANCEL (§9.1: once they sent a 1xx), and a 2xx one of them still sends
  gets ACK + BYE (§15);
* a 6xx ends the fork: the other branches are cancelled and the caller gets the 6xx
  (§16.7 point 5, §16.10);
* a branch failing otherwise (3xx-5xx, no answer, no port, its host not found) is
  remembered; when every branch failed the caller gets the best of their responses
  (`_response_rank`; §16.7 point 6);
* one ring timeout (`[sip] ring_timeout_ms`, timer `(RING, call id)`) covers all the
  branches: each is cancelled and counts as a 408;
* the caller's CANCEL (or any end of the call) cancels every branch (pbx.calls.teardown).

An outbound leg goes PENDING (its host resolving, its port allocating) → EARLY (INVITE
sent) → CONFIRMED (2xx, ACKed) or TERMINATED (error, ring timeout, CANCEL). A queue
member's leg is the same leg; what its answer or failure means is the queue's
(`MemberEvents`).

Responses to our INVITEs come here (`on_response`): every 2xx is ACKed (§13.2.2.4), a
2xx from a second fork or for a leg we gave up on gets ACK + BYE; a final response for
a leg we gave up on (the call is over, another branch answered) is absorbed quietly.
Responses to our session refreshes (UPDATE or re-INVITE, on any leg) and their
timeouts go on to pbx.calls.session_timer, a re-INVITE's 2xx ACKed here first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from pbx import messages as m
from pbx.calls.context import CallContext, Resolve
from pbx.calls.events import CallEvents
from pbx.calls.legs import LegSignaling
from pbx.calls.media import MediaPlane
from pbx.calls.state import Call, CallPhase, Leg, LegPhase, advance_call, advance_leg
from pbx.calls.targets import Targets, wants_tcp
from pbx.calls.teardown import Teardown
from pbx.calls.timers import TimerKind
from pbx.policy import Party, PartyKind
from pbx.sip import sdp
from pbx.sip.dialog import forked, is_ip, learn_2xx, new_request, next_hop, uac_for_target
from pbx.sip.errors import SipError
from pbx.sip.message import SipResponse, new_call_id, new_tag
from pbx.sip.transaction import TransactionKey

log = logging.getLogger("pbx.calls")

Addr = tuple[str, int]
# Call phases a transfer may start from (BRIDGED only once a REFER took `b` away).
TRANSFER_FROM = frozenset({CallPhase.SETUP, CallPhase.IVR, CallPhase.BRIDGED})
# A callee's final status that would say something false to our caller, and what the
# caller gets instead.
CALLEE_STATUS_RELAYED_AS = {503: 500, 401: 403, 407: 403}
# How many other forks' answered dialogs a leg remembers having ended (a peer that
# makes more gets a BYE for each of their 2xx retransmissions).
MAX_STRAY_FORKS = 8
# Among the 4xx of failed branches, the ones that say most about the callee, first
# (busy over unavailable over not found over our own ring timeout).
_PREFERRED_4XX = (486, 480, 404, 408)


def _response_rank(status: int) -> tuple[int, int]:
    """Lower is better: 6xx, then 4xx (`_PREFERRED_4XX` order, then the others), 5xx,
    3xx (a B2BUA does not relay redirects of its callee's devices)."""
    if status >= 600:
        return (0, status)
    if 400 <= status < 500:
        if status in _PREFERRED_4XX:
            return (1, _PREFERRED_4XX.index(status))
        return (1, -1)  # any other 4xx (403, 488 ...) is more telling than those
    if status >= 500:
        return (2, status)
    return (3, status)


class MemberEvents(Protocol):
    """What happens to a queue member's leg (pbx.calls.queue)."""

    def member_answered(self, leg: Leg) -> bool: ...

    def member_failed(self, leg: Leg, status: int) -> None: ...


class Outbound:
    def __init__(self, ctx: CallContext, legs: LegSignaling, media: MediaPlane,
                 targets: Targets, teardown: Teardown, events: CallEvents) -> None:
        self.ctx = ctx
        self.legs = legs
        self.media = media
        self.targets = targets
        self.teardown = teardown
        self.events = events
        self.members: MemberEvents | None = None
        # A failed transfer's referrer, still in its dialog, takes the call back
        # (pbx.calls.refer): True if it did, else the call ends.
        self.retrieve: Callable[[Call, int], bool] | None = None
        # The call is bridged to its `b` (a REFER's final NOTIFY).
        self.on_bridged: list[Callable[[Call], None]] = []

    # ---------------------------------------------------------------- starting legs

    def transfer(self, call: Call, target: str) -> None:
        """Connect the caller to `target` (an extension or a SIP URI)."""
        a = call.a
        if a is None or a.phase is LegPhase.TERMINATED:
            return
        if call.phase not in TRANSFER_FROM or call.b is not None or call.forks:
            log.warning("call %s: a transfer while the call is %s; ignored", call.call_id,
                        call.phase.value)
            return
        if call.phase is CallPhase.SETUP:
            call.direct = True  # dialled straight, no IVR: not a transfer
        else:
            call.transfer_target = target
        advance_call(call, CallPhase.TRANSFERRING)
        places = self.targets.resolve_all(target)
        if not places:
            log.info("call %s: %s target %r not found", call.call_id, _what(call), target)
            self._transfer_failed(call, _failure(call, target), 404)
            return
        call.fork_status = call.fork_reason = None
        # Media ids: "<call>-b" (or -b1, -b2 ... for forks) the first time; a later
        # transfer (a REFER out of a bridge) while those legs may still be there, or
        # their statistics still on the way, names its own: "<call>-t2", -t2.1 ...
        call.transfers_made += 1
        made = call.transfers_made
        base = f"{call.call_id}-b" if made == 1 else f"{call.call_id}-t{made}"
        many = len(places) > 1
        sep = "" if made == 1 else "."
        call.forks = [self.new_leg(call, target, place, f"{base}{sep}{i}" if many else base)
                      for i, place in enumerate(places, 1)]
        ctx = self.ctx
        ctx.timers.set(TimerKind.RING, call.call_id,
                       ctx.now + ctx.settings.sip.ring_timeout_ms / 1000)
        if many:
            log.info("call %s: ringing %s at %d places", call.call_id, target, len(places))
        for leg in list(call.forks):
            if call.ended:
                break
            if leg.phase is LegPhase.PENDING:
                self.call_out(leg)

    def new_leg(self, call: Call, target: str, resolved: tuple[str, str, int],
                media_id: str) -> Leg:
        """A new outbound leg of the call to `target`, not yet sent (`call_out` does)."""
        ctx = self.ctx
        ruri, host, port = resolved
        # The extension we ring is one of ours (its REFERs are an extension's); anyone
        # else we reach by URI is a stranger to the policy.
        peer = (Party(PartyKind.EXTENSION, target) if target in ctx.settings.users
                else Party(PartyKind.ANONYMOUS))
        # Caller ID is policy, never an unverified From copied through (DESIGN §6).
        caller_id = ctx.policy.presented_caller_id(call.party)
        dialog = uac_for_target(new_call_id(ctx.me.host), new_tag(),
                                f"<sip:{caller_id}@{ctx.me.host}:{ctx.me.port}>", ruri,
                                reliable=wants_tcp(ruri))
        leg = Leg(call=call, media_id=media_id, outbound=True, dialog=dialog,
                  addr=(host, port), phase=LegPhase.PENDING, peer=peer)
        ctx.table.index_legs(call)
        return leg

    def call_out(self, b: Leg) -> None:
        """Send the leg: resolve its host if it is a name, then a port on the caller's
        worker, then the INVITE."""
        host, port = b.addr
        if not is_ip(host):
            self.ctx.table.resolving[b.dialog_key] = b
            self.ctx.out.append(Resolve(host, port, b.dialog_key))
            return
        self._allocate(b)

    def host_resolved(self, dialog_key: tuple[str, str], addr: Addr | None) -> None:
        b = self.ctx.table.resolving.pop(dialog_key, None)
        if b is None:
            return
        if b.phase is not LegPhase.PENDING:  # given up while its host resolved
            self.ctx.table.release_call(b.call)
            return
        if addr is None:
            log.info("call %s: %s not found", b.call.call_id, b.addr[0])
            self._setup_failed(b, _failure(b.call, _dialled(b.call)), 404)
            return
        b.addr = addr
        self._allocate(b)

    def _allocate(self, b: Leg) -> None:
        a = b.call.a
        # Both legs must be on one worker: the bridge is local to it.
        if a is None or a.media.worker is None:
            self._setup_failed(b, _failure(b.call, "media"), 503)
            return
        self.media.allocate(b, inband_dtmf=False, worker=a.media.worker)

    def allocated(self, b: Leg, ok: bool) -> None:
        """The leg's port is there (or not): send the INVITE."""
        if not ok:
            self._setup_failed(b, _failure(b.call, "media"), 503)
            return
        call, ctx = b.call, self.ctx
        if call.ended or b.phase is not LegPhase.PENDING:  # the caller left, or a queue moved on
            self.media.release(b)
            return
        offer = sdp.make_offer(b.media.rtp_ip, b.media.rtp_port, int(ctx.wall()))
        b.media.answer_sdp = offer  # what we answer a re-INVITE on this leg with
        req = new_request(b.dialog, ctx.me, "INVITE", extra=call.agent_headers, body=offer)
        b.invite = req
        b.invite_key = ctx.send_request(req, b.addr, b.reliable)
        advance_leg(b, LegPhase.EARLY)
        ctx.table.client_txns[b.invite_key] = b
        ctx.table.dialogs[b.dialog_key] = b

    def _setup_failed(self, b: Leg, reason: str, code: int) -> None:
        """An outbound leg could not even be sent: a queue tries its next member, a
        transfer its other branches (the call ends when none is left)."""
        self.failed(b, code, reason)

    def ring_timeout(self, call_id: str) -> None:
        """Nobody answered the transfer in `ring_timeout_ms`: every branch is cancelled
        (each a 408) and the caller gets the best response (a queue member rings as
        long as its queue wait says, not on this timer)."""
        call = self.ctx.table.calls.get(call_id)
        if call is None or call.ended:
            return
        for leg in list(call.forks):
            self.legs.give_up(leg)
            self.failed(leg, 408)

    # ---------------------------------------------------------------- responses

    def on_response(self, resp: SipResponse, key: TransactionKey) -> None:
        ctx = self.ctx
        leg = ctx.table.client_txns.get(key)
        if leg is None:
            return
        if key != leg.invite_key:  # our session refresh (pbx.calls.session_timer)
            if key.method == "INVITE" and 200 <= resp.status < 300:
                self._refresh_2xx(leg, resp, key)
            self.legs.session_timers.answered(leg, resp, key)
            return
        if resp.status < 200:
            leg.provisional_seen = True
            if leg.cancel_pending:
                self.legs.cancel(leg)
            elif resp.status in (180, 183) and not self._early_media(leg, resp):
                self._relay_ringing(leg.call)
            return
        if resp.status >= 300:
            ctx.table.client_txns.pop(key, None)
            if leg.phase is LegPhase.EARLY:
                self.failed(leg, resp.status)
            ctx.table.release_call(leg.call)
            return
        self._on_2xx(leg, resp)

    def _on_2xx(self, leg: Leg, resp: SipResponse) -> None:
        assert leg.invite is not None
        cseq = leg.invite.cseq[0]
        if leg.dialog.remote_tag is not None and resp.to_tag != leg.dialog.remote_tag:
            # A second fork answered (RFC 3261 §13.2.2.4): ACK every 2xx of its dialog
            # and BYE it once, both where that dialog says (§12.2.1.1), not to the
            # winner whose address `leg.addr` is by now.
            stray = forked(leg.dialog, resp)
            addr = leg.addr if leg.reliable else next_hop(stray, fallback=leg.addr)
            self.legs.ack(stray, addr, cseq)
            tag = resp.to_tag or ""
            if tag not in leg.stray_tags:
                if len(leg.stray_tags) < MAX_STRAY_FORKS:
                    leg.stray_tags.add(tag)
                self.legs.bye(stray, addr)
            return
        if leg.dialog.remote_tag is None:
            self.legs.linger_client_txn(leg.invite_key)
            learn_2xx(leg.dialog, resp)
            if not leg.reliable:  # over TCP the connection we opened carries the dialog
                leg.addr = next_hop(leg.dialog, fallback=leg.addr)
            self.legs.ack(leg.dialog, leg.addr, cseq)
            if leg.phase is LegPhase.EARLY and not leg.cancel_pending:
                self._answered(leg, resp)
            else:
                # Answered after we gave up on it (ring timeout, caller gone): §15.
                self.legs.bye(leg.dialog, leg.addr)
            return
        self.legs.ack(leg.dialog, leg.addr, cseq)  # a retransmitted 2xx

    def _refresh_2xx(self, leg: Leg, resp: SipResponse, key: TransactionKey) -> None:
        """A 2xx to our refresh re-INVITE: ACKed, each one (RFC 3261 §13.2.2.4); its
        answer to our unchanged offer is applied if it moves the peer's media (an SBC
        relocating its relay), as any answer is (RFC 3264 §8)."""
        self.legs.ack(leg.dialog, leg.addr, resp.cseq[0])
        if (key != leg.refresh_key or leg.phase is not LegPhase.CONFIRMED or leg.call.ended
                or not resp.body):
            return  # a retransmission, or too late to matter
        try:
            answer = sdp.parse_answer(resp.body)
        except SipError as exc:
            log.info("call %s: bad SDP answer to our refresh of %s: %s; media unchanged",
                     leg.call.call_id, leg.media_id, exc)
            return
        if answer == leg.media.negotiated or not self.media.may_move_to(leg, answer.remote_ip):
            return
        leg.media.negotiated = answer
        self.media.send_remote(leg)

    def _relay_ringing(self, call: Call) -> None:
        """Tell a still-unanswered caller that the callee rings (no IVR media to relay;
        not after early media: the caller keeps hearing it)."""
        a = call.a
        if (a is None or a.phase is not LegPhase.EARLY or a.invite is None
                or a.invite_key is None or call.session is not None
                or call.early_media is not None):
            return
        self.ctx.respond(a.invite_key, a.invite, 180, to_tag=a.dialog.local_tag,
                         headers=self.legs.dialog_headers(a))

    def _early_media(self, b: Leg, resp: SipResponse) -> bool:
        """A branch's 180/183 with an SDP answer on a direct call (RFC 3960's gateway
        model: a trunk's ringback, an announcement such as "the number is unavailable"):
        the branch is bridged to the caller now and the caller gets a 183 with our answer,
        the same SDP its 200 will carry (RFC 3261 §13.2.1, RFC 6337 §3.1). The latest
        branch to send SDP is the one heard. False (a plain 180 then) when the caller
        sent no offer (our offer would need a reliable 183, RFC 3262, which we do not
        do), or when an IVR has the caller (its own prompts play)."""
        call, a = b.call, b.call.a
        if (not resp.body or call.session is not None or b.member is not None
                or b not in call.forks or a is None or a.phase is not LegPhase.EARLY
                or a.invite is None or a.invite_key is None or a.offer_in_2xx
                or not a.media.answer_sdp or a.media.worker is None):
            return False
        try:
            negotiated = sdp.parse_answer(resp.body)
        except SipError as exc:
            log.info("call %s: bad SDP in a %d from %s: %s; ringing only", call.call_id,
                     resp.status, b.addr[0], exc)
            return False
        if negotiated != b.media.negotiated:
            b.media.negotiated = negotiated
            self.media.send_remote(b)
        if call.early_media != b.media_id:
            first = call.early_media is None
            call.early_media = b.media_id
            self.ctx.to_media(a.media.worker, m.MediaStop(call_id=a.media_id))
            self.ctx.to_media(a.media.worker, m.MediaBridge(call_id=a.media_id,
                                                            peer_call_id=b.media_id))
            if first:
                self.ctx.respond(a.invite_key, a.invite, 183, to_tag=a.dialog.local_tag,
                                 body=a.media.answer_sdp, headers=self.legs.dialog_headers(a))
        return True

    def _answered(self, b: Leg, resp: SipResponse) -> None:
        advance_leg(b, LegPhase.CONFIRMED)
        call = b.call
        a = call.a
        if call.ended or a is None or a.phase is LegPhase.TERMINATED:
            self.legs.send_bye(b)
            self.media.release(b)
            return
        early = call.early_media == b.media_id  # already bridged on its 18x
        call.early_media = None
        heard = b.media.negotiated
        try:
            # A 200 without the SDP its 183 had (wrong, §13.2.1, but seen): that one.
            b.media.negotiated = (heard if early and heard is not None and not resp.body
                                  else sdp.parse_answer(resp.body))
        except SipError as exc:
            log.info("call %s: bad SDP answer from %s: %s", call.call_id,
                     b.dialog.remote_target, exc)
            self.legs.send_bye(b)
            # The queue tries someone else, a transfer (or direct call) its other branches.
            self.failed(b, 488, None if b.member is not None else _failure(call, "sdp"))
            return
        if b.member is not None and not (self.members and self.members.member_answered(b)):
            self.legs.send_bye(b)  # another member was quicker, or the wait is over
            self.media.release(b)
            return
        if b.member is None:
            if b not in call.forks:  # not a branch of this call's transfer (any more)
                self.legs.send_bye(b)
                self.media.release(b)
                return
            # The first branch to answer wins; the others are cancelled (§16.7 point 10).
            call.forks.remove(b)
            self._drop_branches(call)
            self.ctx.timers.cancel(TimerKind.RING, call.call_id)
            call.b = b
        if a.phase is LegPhase.EARLY:
            self.legs.answer(a)  # early-media call: answered when the transfer is
        if not early or b.media.negotiated != heard:
            self.media.send_remote(b)
        if a.media.worker is not None and not early:  # bridged already: no gap in it
            self.ctx.to_media(a.media.worker, m.MediaStop(call_id=a.media_id))
            self.ctx.to_media(a.media.worker, m.MediaBridge(call_id=a.media_id,
                                                            peer_call_id=b.media_id))
        advance_call(call, CallPhase.BRIDGED)
        call.bridged_at = self.ctx.wall()
        self.events.call(call, "bridged")
        for hook in self.on_bridged:
            hook(call)

    def failed(self, b: Leg, status: int, reason: str | None = None) -> None:
        """The leg ended without an answer: a queue tries its next member; a transfer
        waits for its other branches, and ends the call with the best response when
        none is left, or at once on a 6xx (RFC 3261 §16.7 points 5 and 6). `reason`:
        the end reason this failure asks for (default `TransferFailed(<status>)`, or
        `CalleeFailed(<status>)` for a direct call)."""
        advance_leg(b, LegPhase.TERMINATED)
        self.media.release(b)  # the worker unbridges the caller if it heard this one
        self.legs.linger(b)
        call = b.call
        if call.early_media == b.media_id:
            call.early_media = None
        if b.member is not None:
            if self.members is not None:
                self.members.member_failed(b, status)
            return
        if b not in call.forks:
            return  # a branch given up already (another answered, the call is over)
        call.forks.remove(b)
        if call.ended:
            return
        # A callee's 503 would tell our caller that this PBX is overloaded: 500 instead
        # (§16.7 point 6); its 401/407 challenged us, not the caller, and would reach it
        # without the challenge (§22.3): 403. Our own failures (`reason` given) keep
        # their status.
        relayed = status if reason is not None else CALLEE_STATUS_RELAYED_AS.get(
            status, status)
        if call.fork_status is None or _response_rank(relayed) < _response_rank(
                call.fork_status):
            call.fork_status, call.fork_reason = relayed, reason
        log.info("call %s: %s to %s failed with %d (branch %s)", call.call_id, _what(call),
                 _dialled(call), status, b.dialog.remote_target or b.addr[0])
        if status >= 600:
            self._drop_branches(call)  # a 6xx ends the fork (§16.7 point 5)
        elif call.forks:
            return  # other branches still ring
        best = call.fork_status
        if best < 400 and call.fork_reason is None:
            # Only redirects came: not followed nor their Contact relayed, and a 3xx
            # without one tells the caller nothing (§21.3).
            best = 480
        self._transfer_failed(call, call.fork_reason or _failure(call, str(best)), best)

    def _transfer_failed(self, call: Call, reason: str, code: int) -> None:
        """No branch of the transfer answered: a referrer detached from its bridge gets
        its call back, else the call ends with `code`."""
        self.ctx.timers.cancel(TimerKind.RING, call.call_id)
        if self.retrieve is None or not self.retrieve(call, code):
            self.teardown.hangup(call, reason, code)

    def _drop_branches(self, call: Call) -> None:
        """Give up every branch still ringing (CANCEL once it sent a 1xx; a 2xx that still
        comes gets ACK + BYE)."""
        for leg in call.forks:
            self.legs.give_up(leg)
            self.media.release(leg)
            self.legs.linger(leg)
        call.forks.clear()

    def client_timeout(self, key: TransactionKey) -> None:
        leg = self.ctx.table.client_txns.pop(key, None)
        if leg is None:
            return
        if key != leg.invite_key:  # our session refresh (pbx.calls.session_timer)
            self.legs.session_timers.timed_out(leg, key)
        elif leg.phase is LegPhase.EARLY:
            self.failed(leg, 408)
        self.ctx.table.release_call(leg.call)


def _dialling_direct(call: Call) -> bool:
    """The call is a direct call still ringing its user (no transfer since)."""
    return call.direct and call.transfer_target is None


def _what(call: Call) -> str:
    return "direct call" if _dialling_direct(call) else "transfer"


def _dialled(call: Call) -> str:
    target = call.extension if _dialling_direct(call) else call.transfer_target
    return target or ""


def _failure(call: Call, detail: str) -> str:
    """The end reason of a failed leg: `CalleeFailed(...)` for a direct call (the user
    did not answer: busy, rejected, not reachable), `TransferFailed(...)` for a transfer."""
    return f"{'CalleeFailed' if _dialling_direct(call) else 'TransferFailed'}({detail})"

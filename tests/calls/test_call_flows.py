"""Call flows a carrier hits, on the core's virtual clock: requests and responses
crossing each other (CANCEL and 200, BYE and ACK, a transfer and the referrer's
dialog), late and repeated responses, and what every flow must give back at its end
(every index of `pbx.calls.table` empty once the dialogs stopped lingering)."""

from __future__ import annotations

from pathlib import Path

from pbx import messages as m
from pbx.calls.legs import LINGER_S
from pbx.calls.state import Call, CallPhase, Leg
from pbx.sip.message import SipRequest, SipResponse, make_response
from tests.calls.rig import (
    CALLER,
    MEMBERS,
    PLAY,
    SDP,
    TRUSTED_CALLER,
    CoreRig,
    caller_invite,
    first_then,
    reply,
)
from tests.calls.test_dialogs import offer


def table_empty(rig: CoreRig) -> None:
    """Nothing of any call is left: every index and budget of the call table."""
    # The longest: a BYE that waited for the ACK until our 2xx timed out (64*T1, §15),
    # then its dialog's linger.
    rig.advance(2 * LINGER_S + 1)
    table = rig.core.ctx.table
    left = {name: getattr(table, name) for name in (
        "calls", "dialogs", "ended_dialogs", "ended_order", "pending_invites", "client_txns",
        "legs_by_media", "sessions", "waiting_sessions", "released", "setup_by_source",
        "calls_by_source", "resolving", "by_sip_call_id")
        if getattr(table, name)}
    assert not left, left
    assert not len(rig.core.ctx.retransmitter)  # no 2xx retransmitted for ever
    assert not len(rig.core.ctx.transactions)  # no transaction waits for ever


def bridged(tmp_path: Path, ack: bool = True, ring_s: float = 30) -> tuple[CoreRig, Call]:
    """The caller, transferred by the IVR to 2001, bridged to it and (if `ack`) ACKed;
    transfers ring for `ring_s` ([sip] ring_timeout_ms)."""
    rig = CoreRig(tmp_path, first_then([m.TransferCommand(target="2001")]), TRUSTED_CALLER)
    rig.settings.sip.ring_timeout_ms = int(ring_s * 1000)
    call = rig.call()
    [invite] = rig.requests("INVITE", MEMBERS["2001"])
    rig.answer(invite, MEMBERS["2001"], "t1")
    if ack:
        rig.caller_request("ACK", 1)
    assert rig.of(m.MediaBridge) and call.b is not None
    return rig, call


def notifies(rig: CoreRig) -> list[SipRequest]:
    return rig.requests("NOTIFY", CALLER)


def callee_request(rig: CoreRig, leg: Leg, method: str, cseq: int, extra: str = "") -> None:
    """A request of the callee of the outbound `leg` in its dialog, from its address."""
    dialog, (host, port) = leg.dialog, leg.addr
    rig.feed((
        f"{method} sip:pbx@127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {host}:{port};branch=z9hG4bK-callee-{method}-{cseq}\r\n"
        f"Max-Forwards: 70\r\nFrom: {dialog.remote_party}\r\nTo: {dialog.local_party}\r\n"
        f"Call-ID: {dialog.call_id}\r\nCSeq: {cseq} {method}\r\n"
        f"Contact: <sip:callee@{host}:{port}>\r\n{extra}Content-Length: 0\r\n\r\n"
    ).encode(), leg.addr)


def test_a_detached_referrers_session_expiry_leaves_the_transfer_ringing(
        tmp_path: Path) -> None:
    rig, call = bridged(tmp_path, ring_s=120)
    rig.caller_request("UPDATE", 2, "Session-Expires: 90;refresher=uac\r\nSupported: timer\r\n")
    rig.caller_request("REFER", 3, "Refer-To: <sip:2002@127.0.0.1>\r\n")
    assert rig.last(3).status == 202
    [second] = rig.requests("INVITE", MEMBERS["2002"])
    rig.answer(second, MEMBERS["2002"], "t2", ring_only=True)
    rig.advance(60)  # the referrer's session expires while 2002 rings
    bye = rig.requests("BYE", CALLER)[0]
    assert "cause=408" in (bye.headers.get("Reason") or "")
    assert not call.ended
    assert not rig.requests("BYE", MEMBERS["2001"])
    rig.answer(second, MEMBERS["2002"], "t2")
    assert call.b is not None and call.b.dialog.remote_tag == "t2"
    assert not rig.requests("BYE", MEMBERS["2002"])
    rig.core.hangup(call, "Hangup", None)
    table_empty(rig)


def test_a_detached_referrers_missing_ack_leaves_the_transfer_ringing(
        tmp_path: Path) -> None:
    """A referrer may REFER before its ACK ever arrives: when our 200's retransmissions
    give up (RFC 3261 §13.3.1.4) only its own dialog ends, not its peer's transfer."""
    rig, call = bridged(tmp_path, ack=False, ring_s=120)
    rig.caller_request("REFER", 2, "Refer-To: <sip:2002@127.0.0.1>\r\n")
    [second] = rig.requests("INVITE", MEMBERS["2002"])
    rig.answer(second, MEMBERS["2002"], "t2", ring_only=True)
    rig.advance(40)  # 64*T1 after our 200
    assert rig.requests("BYE", CALLER)
    assert not call.ended
    assert not rig.requests("BYE", MEMBERS["2001"])
    rig.answer(second, MEMBERS["2002"], "t2")
    assert call.b is not None and call.b.dialog.remote_tag == "t2"
    assert not rig.requests("BYE", MEMBERS["2002"])
    rig.core.hangup(call, "Hangup", None)
    table_empty(rig)


def we_refresh(tmp_path: Path) -> tuple[CoreRig, Call]:
    """An IVR call whose session we refresh (the caller does not support timer)."""
    rig = CoreRig(tmp_path, first_then(PLAY))
    call = rig.call(caller_invite("Session-Expires: 100\r\nAllow: INVITE, ACK, BYE, UPDATE\r\n"))
    rig.caller_request("ACK", 1)
    rig.advance(50)
    assert rig.requests("UPDATE", CALLER)
    return rig, call


def test_our_session_refresh_answered_481_ends_the_call(tmp_path: Path) -> None:
    rig, call = we_refresh(tmp_path)
    [update] = {r.cseq[0]: r for r in rig.requests("UPDATE", CALLER)}.values()
    rig.feed(make_response(update, 481), CALLER)
    assert call.ended
    table_empty(rig)


def test_our_session_refresh_unanswered_ends_the_call(tmp_path: Path) -> None:
    rig, call = we_refresh(tmp_path)
    rig.advance(33)  # Timer F: 64*T1
    assert call.ended
    table_empty(rig)


def test_our_session_refresh_answered_200_keeps_the_call(tmp_path: Path) -> None:
    rig, call = we_refresh(tmp_path)
    [update] = {r.cseq[0]: r for r in rig.requests("UPDATE", CALLER)}.values()
    rig.feed(make_response(update, 200), CALLER)
    rig.advance(40)
    assert not call.ended


def test_a_queue_agent_who_transfers_its_caller_is_free_for_the_next_one(
        tmp_path: Path) -> None:
    """The agent who answered a queue call blind-transfers the caller (RFC 3515, from
    the callee's side) and leaves: it takes the queue's next caller at once, not only
    once the transferred call ends."""
    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="sales")]), TRUSTED_CALLER)
    call = rig.call()
    rig.caller_request("ACK", 1)
    [first] = rig.requests("INVITE", MEMBERS["2001"])
    rig.answer(first, MEMBERS["2001"], "m1")
    agent = call.b
    assert agent is not None and agent.member == "2001"
    callee_request(rig, agent, "REFER", 1, "Refer-To: <sip:2003@127.0.0.1>\r\n")
    assert rig.responses(MEMBERS["2001"])[-1].status == 202
    [third] = rig.requests("INVITE", MEMBERS["2003"])
    rig.answer(third, MEMBERS["2003"], "t3")
    assert rig.requests("BYE", MEMBERS["2001"])  # the agent is released
    assert not call.ended and call.b is not None and call.b.dialog.remote_tag == "t3"
    book = rig.core.queue.books[("queue", "sales")]
    assert "2001" not in book.busy
    second = rig.call(caller_invite(branch="7").replace(b"caller-call@", b"second-call@"))
    assert second is not call
    invites = rig.requests("INVITE", MEMBERS["2001"])
    assert len(invites) == 2  # rung for the next caller, who it answers
    rig.answer(invites[1], MEMBERS["2001"], "m2")
    assert second.b is not None and book.busy == {"2001"}
    rig.core.hangup(call, "Hangup", None)  # the transferred call's end frees nobody
    assert book.busy == {"2001"}
    rig.core.hangup(second, "Hangup", None)
    table_empty(rig)


def test_a_second_forks_2xx_gets_its_ack_and_one_bye_at_its_own_contact(
        tmp_path: Path) -> None:
    """Our INVITE forked downstream (a trunk or proxy) and two UAs answered: the first
    2xx wins; the other's dialog gets its ACK and a BYE sent as its own dialog says
    (its Contact: RFC 3261 §13.2.2.4, §12.2.1.1), not to the winner. Each retransmission
    of that 2xx is ACKed again, but its dialog is ended once."""
    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER)
    proxy, winner, loser = MEMBERS["2001"], ("127.0.0.1", 6011), ("127.0.0.1", 6019)
    call = rig.call(caller_invite().replace(b"*99", b"2001"))
    [invite] = rig.requests("INVITE", proxy)

    def ok(tag: str, contact: tuple[str, int]) -> SipResponse:
        return make_response(invite, 200, to_tag=tag, body=SDP, headers=[
            ("Contact", f"<sip:2001@{contact[0]}:{contact[1]}>"),
            ("Content-Type", "application/sdp")])

    rig.feed(ok("w1", winner), proxy)
    assert call.b is not None and call.b.addr == winner
    assert len(rig.requests("ACK", winner)) == 1
    rig.feed(ok("l1", loser), proxy)
    rig.feed(ok("l1", loser), proxy)  # retransmitted: our ACK was lost
    acks, byes = rig.requests("ACK", loser), rig.requests("BYE", loser)
    assert len(acks) == 2 and all((a.headers.get("To") or "").endswith("tag=l1") for a in acks)
    assert len(byes) == 1 and byes[0].uri == "sip:2001@127.0.0.1:6019"
    assert not rig.requests("BYE", winner) and not rig.requests("BYE", proxy)
    assert not call.ended
    rig.caller_request("ACK", 1)
    rig.caller_request("BYE", 2)
    table_empty(rig)


def test_a_failed_transfer_out_of_a_bridge_gives_the_referrer_its_call_back(
        tmp_path: Path) -> None:
    """The referrer hears the failure (NOTIFY 486) and keeps its call with the party it
    tried to transfer (RFC 3515 §2.4.5, RFC 5589 §6.1: the transferor retrieves it),
    instead of both being hung up; it may try again."""
    rig, call = bridged(tmp_path)
    rig.caller_request("REFER", 2, "Refer-To: <sip:2002@127.0.0.1>\r\n")
    [second] = rig.requests("INVITE", MEMBERS["2002"])
    rig.feed(make_response(second, 180, to_tag="t2"), MEMBERS["2002"])
    rig.feed(make_response(second, 486, to_tag="t2"), MEMBERS["2002"])
    final = notifies(rig)[-1]
    assert final.body == b"SIP/2.0 486 Busy Here\r\n"
    assert (final.headers.get("Subscription-State") or "").startswith("terminated")
    assert not call.ended and call.phase is CallPhase.BRIDGED
    assert not rig.requests("BYE", CALLER) and not rig.requests("BYE", MEMBERS["2001"])
    assert call.a is not None and call.a.dialog.remote_tag == "caller"
    assert call.b is not None and call.b.dialog.remote_tag == "t1" and not call.detached
    # The caller tries again, 2003 answers: bridged to 2001, the caller released.
    rig.caller_request("REFER", 3, "Refer-To: <sip:2003@127.0.0.1>\r\n")
    assert rig.last(3).status == 202
    [third] = rig.requests("INVITE", MEMBERS["2003"])
    rig.answer(third, MEMBERS["2003"], "t3")
    assert notifies(rig)[-1].body == b"SIP/2.0 200 OK\r\n"
    assert rig.requests("BYE", CALLER) and not rig.requests("BYE", MEMBERS["2001"])
    assert call.b is not None and call.b.dialog.remote_tag == "t3"
    rig.core.hangup(call, "Hangup", None)
    table_empty(rig)


def test_a_transfer_the_callee_asked_for_rings_out_and_the_callee_gets_the_call_back(
        tmp_path: Path) -> None:
    """The callee refers the caller; nobody answers in ring_timeout_ms: NOTIFY 408 to
    the callee, who keeps the caller; no BYE to anyone."""
    rig, call = bridged(tmp_path, ring_s=5)
    assert call.b is not None
    callee_request(rig, call.b, "REFER", 1, "Refer-To: <sip:2002@127.0.0.1>\r\n")
    [second] = rig.requests("INVITE", MEMBERS["2002"])
    rig.feed(make_response(second, 180, to_tag="t2"), MEMBERS["2002"])
    rig.advance(6)
    assert rig.requests("CANCEL", MEMBERS["2002"])
    final = rig.requests("NOTIFY", MEMBERS["2001"])[-1]
    assert final.body.startswith(b"SIP/2.0 408")
    assert not call.ended and call.phase is CallPhase.BRIDGED
    assert not rig.requests("BYE", CALLER) and not rig.requests("BYE", MEMBERS["2001"])
    assert call.b is not None and call.b.dialog.remote_tag == "t1"
    rig.feed(make_response(second, 487, to_tag="t2"), MEMBERS["2002"])
    rig.caller_request("BYE", 2)
    assert call.ended and rig.requests("BYE", MEMBERS["2001"])
    table_empty(rig)


def test_an_in_dialog_request_older_than_the_last_is_refused(tmp_path: Path) -> None:
    """UDP may deliver a re-INVITE late, after a newer one (a hold after the resume):
    a request whose CSeq is below the dialog's last is out of order and gets 500,
    never applied (RFC 3261 §12.2.2); the dialog's own INVITE counts too."""
    rig = CoreRig(tmp_path, first_then(PLAY))
    call = rig.answered()
    rig.caller_request("INVITE", 5, body=offer("sendrecv", port=41000))
    assert rig.last(5).status == 200
    rig.caller_request("ACK", 5)
    remotes = len(rig.of(m.MediaRemote))
    rig.caller_request("INVITE", 4, body=offer("sendonly", port=42000))  # the late one
    assert rig.last(4).status == 500
    assert len(rig.of(m.MediaRemote)) == remotes
    rig.caller_request("INFO", 1, "", body=b"Signal=5\r\nDuration=100\r\n",
                       content_type="application/dtmf-relay")
    assert rig.last(1).status == 500  # below the initial INVITE's CSeq
    rig.caller_request("UPDATE", 6)
    assert rig.last(6).status == 200
    rig.caller_request("BYE", 7)
    assert rig.last(7).status == 200 and call.ended
    table_empty(rig)


def test_a_callee_redirect_reaches_the_caller_as_480_never_as_a_3xx(tmp_path: Path) -> None:
    """A callee (or a trunk) that answers our INVITE with 302 is not followed (a B2BUA
    does not dial where a device redirects it: policy) and its Contact is not relayed;
    a 3xx without a Contact would tell the caller nothing (RFC 3261 §21.3), so the
    caller of a direct call gets 480 Temporarily Unavailable."""
    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER)
    call = rig.call(caller_invite().replace(b"*99", b"2001"))
    [invite] = rig.requests("INVITE", MEMBERS["2001"])
    rig.feed(make_response(invite, 302, to_tag="t1",
                           headers=[("Contact", "<sip:2001@198.51.100.7>")]), MEMBERS["2001"])
    finals = [r for r in rig.responses() if r.cseq[1] == "INVITE" and r.status >= 200]
    assert [r.status for r in finals] == [480]
    assert call.ended and call.end_code == 480
    table_empty(rig)


def test_a_callees_auth_challenge_reaches_the_caller_as_403(tmp_path: Path) -> None:
    """A trunk or device that challenges our INVITE (407; we hold no credentials for
    it) refuses the call; relayed as is, the caller would get a 407 without its
    Proxy-Authenticate (RFC 3261 §22.3: it must carry one) and, worse, be asked to
    authenticate to us for someone else's realm. It gets 403."""
    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER)
    call = rig.call(caller_invite().replace(b"*99", b"2001"))
    [invite] = rig.requests("INVITE", MEMBERS["2001"])
    rig.feed(make_response(invite, 407, to_tag="t1", headers=[
        ("Proxy-Authenticate", 'Digest realm="trunk", nonce="n"')]), MEMBERS["2001"])
    finals = [r for r in rig.responses() if r.cseq[1] == "INVITE" and r.status >= 200]
    assert [r.status for r in finals] == [403]
    assert "Proxy-Authenticate" not in finals[0].headers
    assert call.ended
    table_empty(rig)


def test_our_bye_waits_for_the_ack_of_our_200(tmp_path: Path) -> None:
    """The IVR hangs up at once, before the caller's ACK: the BYE waits for the ACK
    (RFC 3261 §15: the callee MUST NOT send BYE on a confirmed dialog before the ACK
    of its 2xx, or the 2xx's retransmissions timing out), so a BYE that overtakes a
    lost 200 cannot leave the phone in a call we ended; our 200 keeps being
    retransmitted meanwhile."""
    rig = CoreRig(tmp_path, first_then([m.HangupCommand(code=603, reason="Closed")]))
    rig.feed(caller_invite(), CALLER)
    assert not rig.core.ctx.table.calls and 200 in rig.statuses()  # ended
    assert not rig.requests("BYE", CALLER)
    rig.advance(1)
    assert len([r for r in rig.responses() if r.status == 200]) > 1  # retransmitted
    rig.caller_request("ACK", 1)
    [bye] = rig.requests("BYE", CALLER)
    assert "cause=603" in (bye.headers.get("Reason") or "")
    table_empty(rig)


def test_a_bye_of_the_caller_before_its_ack_stands_for_our_waiting_one(
        tmp_path: Path) -> None:
    """Both sides hang up before the ACK: the caller's BYE ends the dialog; ours, which
    waited for the ACK, is not sent any more, nor our 200 retransmitted."""
    rig = CoreRig(tmp_path, first_then([m.HangupCommand()]))
    rig.feed(caller_invite(), CALLER)
    rig.caller_request("BYE", 2)
    assert rig.last(2).status == 200
    rig.advance(40)
    assert not rig.requests("BYE", CALLER)
    assert len([r for r in rig.responses() if r.status == 200 and r.cseq[1] == "INVITE"]) == 1
    table_empty(rig)


def test_our_bye_goes_when_the_ack_never_comes(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.HangupCommand()]))
    rig.feed(caller_invite(), CALLER)
    assert not rig.core.ctx.table.calls and not rig.requests("BYE", CALLER)
    rig.advance(31)
    assert not rig.requests("BYE", CALLER)
    rig.advance(2)  # 64*T1: the 2xx's retransmissions time out
    assert rig.requests("BYE", CALLER)
    table_empty(rig)
    assert len({b.cseq for b in rig.requests("BYE", CALLER)}) == 1  # (retransmitted)


def late_offer_invite(to_user: str = "*99") -> bytes:
    """CALLER's INVITE without SDP (a delayed offer, as trunks and gateways send)."""
    head = caller_invite().split(b"\r\n\r\n")[0].replace(b"*99", to_user.encode())
    lines = [ln for ln in head.split(b"\r\n")
             if not ln.startswith((b"Content-Type", b"Content-Length"))]
    return b"\r\n".join(lines) + b"\r\nContent-Length: 0\r\n\r\n"


def test_a_late_offer_invite_gets_our_offer_in_the_200_and_the_ack_answers(
        tmp_path: Path) -> None:
    """An INVITE without an offer (RFC 3261 §13.2.1, RFC 3264 §5: the delayed offer of
    many trunks and gateways) is answered with our offer in the 200; the ACK's answer
    tells the worker where to send RTP. An ACK without a usable answer ends the call."""
    rig = CoreRig(tmp_path, first_then(PLAY))
    call = rig.call(late_offer_invite())
    [ok] = [r for r in rig.responses() if r.status == 200]
    assert b"m=audio" in ok.body and not rig.of(m.MediaRemote)
    rig.caller_request("ACK", 1, body=offer(port=41000))
    assert rig.of(m.MediaRemote)[-1].remote_port == 41000
    assert rig.of(m.MediaPlay) and not call.ended
    rig.caller_request("BYE", 2)
    table_empty(rig)


def test_a_late_offer_whose_ack_has_no_answer_ends_the_call(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    call = rig.call(late_offer_invite())
    rig.caller_request("ACK", 1)
    assert call.ended and rig.requests("BYE", CALLER)
    assert "cause=488" in (rig.requests("BYE", CALLER)[0].headers.get("Reason") or "")
    table_empty(rig)


def test_a_late_offer_direct_call_offers_ours_to_the_caller_when_answered(
        tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER)
    call = rig.call(late_offer_invite("2001"))
    [invite] = rig.requests("INVITE", MEMBERS["2001"])
    rig.answer(invite, MEMBERS["2001"], "t1")
    [ok] = [r for r in rig.responses() if r.status == 200 and r.cseq[1] == "INVITE"]
    assert b"m=audio" in ok.body and call.phase is CallPhase.BRIDGED
    rig.caller_request("ACK", 1, body=offer(port=41000))
    assert call.a is not None
    assert [r.remote_port for r in rig.of(m.MediaRemote)
            if r.call_id == call.a.media_id] == [41000]
    rig.caller_request("BYE", 2)
    table_empty(rig)


def test_a_refer_to_nobody_out_of_a_bridge_leaves_the_bridge_as_it_was(
        tmp_path: Path) -> None:
    """REFER to a user we do not have, from a bridge: 202, NOTIFY 100 then 404, and the
    two parties stay bridged (no BYE, no new media command)."""
    rig, call = bridged(tmp_path)
    media = len(rig.media)
    rig.caller_request("REFER", 2, "Refer-To: <sip:9999@127.0.0.1>\r\n")
    assert rig.last(2).status == 202
    assert [n.body for n in notifies(rig)] == [b"SIP/2.0 100 Trying\r\n",
                                               b"SIP/2.0 404 Not Found\r\n"]
    assert not call.ended and call.phase is CallPhase.BRIDGED and not call.detached
    assert not rig.requests("BYE") and len(rig.media) == media
    rig.caller_request("BYE", 3)
    assert rig.requests("BYE", MEMBERS["2001"])
    table_empty(rig)


# ---------------------------------------------------------------- flows already right
# (each checked to give back every index and budget at its end)


def test_the_callers_bye_before_its_ack_ends_the_call_and_the_late_ack_is_harmless(
        tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    call = rig.call()
    rig.caller_request("BYE", 2)  # RFC 3261 §15.1.2: the caller may BYE before its ACK
    assert rig.last(2).status == 200 and call.ended
    assert not rig.core.ctx.table.setup_by_source
    rig.caller_request("ACK", 1)
    assert not rig.requests("BYE", CALLER)
    table_empty(rig)


def test_a_cancel_crossing_the_callees_200_gets_the_callee_acked_and_byed(
        tmp_path: Path) -> None:
    """A direct call: the caller's CANCEL, our CANCEL to the ringing callee, its 200
    crossing it (RFC 3261 §9.1, §15): ACK and BYE; its retransmitted 200 is ACKed
    again, no second BYE."""
    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER)
    call = rig.call(caller_invite().replace(b"*99", b"2001"))
    [invite] = rig.requests("INVITE", MEMBERS["2001"])
    rig.feed(make_response(invite, 180, to_tag="t1"), MEMBERS["2001"])
    rig.cancel_call()
    assert call.ended and 487 in rig.statuses()
    assert rig.requests("CANCEL", MEMBERS["2001"])
    rig.answer(invite, MEMBERS["2001"], "t1")
    rig.answer(invite, MEMBERS["2001"], "t1")
    assert len(rig.requests("ACK", MEMBERS["2001"])) == 2
    assert len({b.cseq for b in rig.requests("BYE", MEMBERS["2001"])}) == 1
    table_empty(rig)


def test_a_queue_member_answering_after_the_caller_left_gets_ack_and_bye(
        tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="sales")]))
    call = rig.call()
    rig.caller_request("ACK", 1)
    invites = {to: msg for msg, to in rig.sip
               if isinstance(msg, SipRequest) and msg.method == "INVITE"}
    for to, invite in invites.items():
        rig.feed(make_response(invite, 180, to_tag=f"t{to[1]}"), to)
    rig.caller_request("BYE", 2)
    assert call.ended
    for to, invite in invites.items():  # their 200s crossed our CANCELs
        rig.answer(invite, to, f"t{to[1]}")
        assert rig.requests("ACK", to) and rig.requests("BYE", to)
    assert not rig.core.queue.books[("queue", "sales")].busy
    table_empty(rig)


def test_the_ivrs_reply_after_the_caller_hung_up_does_nothing(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path)
    held: list[m.IvrEvent] = []
    rig.executors[b"e"].answer = lambda event: held.append(event)  # keeps them
    call = rig.call()
    rig.caller_request("ACK", 1)
    rig.caller_request("BYE", 2)
    assert call.ended and held
    for event in held:  # in flight while the caller left: a transfer, say
        rig.reply(b"e", reply(event, m.TransferCommand(target="2001"), done=True))
    assert not rig.requests("INVITE", MEMBERS["2001"])
    table_empty(rig)


def test_a_transfer_out_of_a_bridge_gets_a_media_leg_of_its_own(tmp_path: Path) -> None:
    """The target of a REFER out of a bridge is a new leg on the worker: it must not take
    the media id of the bridged party still there (the worker refuses an id it holds: the
    call ended with 503), nor of the referrer whose release would take it along."""
    rig, call = bridged(tmp_path)

    def transferred(target: str, tag: str) -> None:
        invites = rig.requests("INVITE", MEMBERS[target])
        rig.answer(invites[-1], MEMBERS[target], tag)
        assert not call.ended, call.end_reason
        assert call.a is not None and call.b is not None and call.b.dialog.remote_tag == tag
        ids = [leg.media_id for leg in call.legs()]
        assert len(ids) == len(set(ids)), ids
        bridge = rig.of(m.MediaBridge)[-1]
        assert {bridge.call_id, bridge.peer_call_id} == {call.a.media_id, call.b.media_id}

    rig.caller_request("REFER", 2, "Refer-To: <sip:2002@127.0.0.1>\r\n")  # the caller
    assert rig.last(2).status == 202
    transferred("2002", "t2")
    assert rig.requests("BYE", CALLER) and not rig.requests("BYE", MEMBERS["2001"])
    assert call.b is not None
    callee_request(rig, call.b, "REFER", 1, "Refer-To: <sip:2001@127.0.0.1>\r\n")  # 2002
    transferred("2001", "t3")
    assert rig.requests("BYE", MEMBERS["2002"])  # the referrer, released once told


def test_a_reply_with_two_hand_overs_keeps_the_first(tmp_path: Path) -> None:
    """A buggy (or hostile) executor's reply queues the caller and then bridges it to a
    WebSocket: the first hand-over takes the call; what follows is ignored, not raised
    out of the core half-applied."""
    rig = CoreRig(tmp_path, first_then([
        m.QueueCommand(target="sales"), m.WsBridgeCommand(uri="ws://127.0.0.1:1/ws"),
        m.PlayCommand(play_id=9, file="sounds/menu.wav")]), TRUSTED_CALLER)
    call = rig.call()
    assert call.phase is CallPhase.QUEUED and call.ws_bridge is None
    assert not rig.of(m.MediaWsBridge)
    assert [p.file for p in rig.of(m.MediaPlay)] == ["sounds/hold.wav"]  # the queue's
    [invite] = rig.requests("INVITE", MEMBERS["2001"])  # the queue rings its members
    rig.answer(invite, MEMBERS["2001"], "m1")
    assert call.phase is CallPhase.BRIDGED

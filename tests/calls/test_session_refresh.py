"""Our session refreshes (RFC 4028 §7.4, §9, §10) on the core's virtual clock: by UPDATE
when the peer allows it, else by re-INVITE with our current SDP (trunks, SBCs and older
phones without UPDATE), its ACK, 491/422/408/481 and other answers, what its 2xx says
about the timer, and glare with the peer's own re-INVITE (RFC 3261 §14)."""

from __future__ import annotations

from pathlib import Path

from pbx import messages as m
from pbx.calls.state import Call
from pbx.sip.message import SipRequest, make_response
from tests.calls.rig import (
    CALLER,
    MEMBERS,
    PLAY,
    SDP,
    TRUSTED_CALLER,
    CoreRig,
    caller_invite,
    first_then,
)
from tests.calls.test_call_flows import bridged, callee_request, table_empty
from tests.calls.test_dialogs import offer

# A trunk that does timers, makes us the refresher, and does not allow UPDATE.
NO_UPDATE = ("Session-Expires: 90;refresher=uas\r\nMin-SE: 90\r\nSupported: timer\r\n"
             "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS\r\n")


def no_update_call(tmp_path: Path) -> tuple[CoreRig, Call]:
    rig = CoreRig(tmp_path, first_then(PLAY))
    call = rig.call(caller_invite(NO_UPDATE))
    ok = rig.responses()[-1]
    assert ok.status == 200 and ok.headers.get("Session-Expires") == "90;refresher=uas"
    rig.caller_request("ACK", 1)
    return rig, call


def reinvites(rig: CoreRig, addr: tuple[str, int] = CALLER) -> list[SipRequest]:
    """Our re-INVITEs to `addr`, one per CSeq (UDP retransmissions share it), in order."""
    return list({r.cseq[0]: r for r in rig.requests("INVITE", addr)}.values())


def our_200(rig: CoreRig) -> bytes:
    return [r for r in rig.responses() if r.status == 200 and r.cseq[1] == "INVITE"][0].body


def answer_ok(rig: CoreRig, req: SipRequest, session_expires: str | None,
              addr: tuple[str, int] = CALLER) -> None:
    headers = [("Contact", f"<sip:peer@{addr[0]}:{addr[1]}>"),
               ("Content-Type", "application/sdp")]
    if session_expires is not None:
        headers += [("Session-Expires", session_expires), ("Require", "timer")]
    rig.feed(make_response(req, 200, body=SDP, headers=headers), addr)


def test_we_refresh_by_update_when_the_peer_allows_it(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    rig.call(caller_invite(NO_UPDATE.replace("OPTIONS", "OPTIONS, UPDATE")))
    rig.caller_request("ACK", 1)
    rig.advance(45)
    [update] = {r.cseq[0]: r for r in rig.requests("UPDATE", CALLER)}.values()
    assert update.headers.get("Session-Expires") == "90;refresher=uac" and not update.body
    assert not reinvites(rig)


def test_we_refresh_by_reinvite_with_our_sdp_when_update_is_not_allowed(
        tmp_path: Path) -> None:
    rig, call = no_update_call(tmp_path)
    ours = our_200(rig)
    rig.advance(44.9)
    assert not reinvites(rig)
    rig.advance(0.2)
    [reinvite] = reinvites(rig)
    assert not rig.requests("UPDATE", CALLER)
    # In the dialog, our SDP unchanged (same o= version: RFC 3264 §8), a refresh (§7.4).
    assert reinvite.to_tag == "caller" and reinvite.headers.get("Call-ID") == (
        "caller-call@127.0.0.1")
    assert reinvite.body == ours
    assert reinvite.headers.get("Session-Expires") == "90;refresher=uac"
    assert "timer" in (reinvite.headers.get("Supported") or "")
    media = len(rig.media)
    answer_ok(rig, reinvite, "90;refresher=uac")
    # Its 2xx is ACKed in the dialog with the re-INVITE's CSeq (RFC 3261 §13.2.2.4), and
    # every retransmission of it too.
    [ack] = rig.requests("ACK", CALLER)
    assert ack.cseq == (reinvite.cseq[0], "ACK") and ack.to_tag == "caller"
    assert ack.headers.get("Call-ID") == "caller-call@127.0.0.1"
    answer_ok(rig, reinvite, "90;refresher=uac")
    assert len(rig.requests("ACK", CALLER)) == 2
    assert len(rig.media) == media  # a refresh changes no media
    # The next refresh half an interval after the 2xx.
    rig.advance(44.9)
    assert len(reinvites(rig)) == 1
    rig.advance(0.2)
    assert len(reinvites(rig)) == 2 and reinvites(rig)[1].body == ours
    assert not call.ended


def test_an_answer_to_our_refresh_that_moves_the_peers_media_is_applied(
        tmp_path: Path) -> None:
    """An SBC may relocate its media relay in the answer to our unchanged offer: the
    worker is told (RFC 3264 §8: the answer is the session's now)."""
    rig, call = no_update_call(tmp_path)
    rig.advance(45.1)
    [reinvite] = reinvites(rig)
    rig.feed(make_response(reinvite, 200, body=offer(port=41000), headers=[
        ("Contact", "<sip:peer@127.0.0.1:5999>"), ("Content-Type", "application/sdp"),
        ("Session-Expires", "90;refresher=uac")]), CALLER)
    assert rig.requests("ACK", CALLER)
    assert call.a is not None
    assert rig.of(m.MediaRemote)[-1].call_id == call.a.media_id
    assert rig.of(m.MediaRemote)[-1].remote_port == 41000


def test_a_refresh_answered_491_is_retried_within_2_s_when_the_peer_owns_the_call_id(
        tmp_path: Path) -> None:
    rig, call = no_update_call(tmp_path)
    rig.advance(45.1)
    [first] = reinvites(rig)
    rig.feed(make_response(first, 491), CALLER)
    assert not call.ended
    rig.advance_until(lambda: len(reinvites(rig)) == 2, 2.01)  # RFC 3261 §14.1: 0-2 s
    assert len(reinvites(rig)) == 2
    second = reinvites(rig)[1]
    assert second.cseq[0] > first.cseq[0] and second.body == first.body


def test_a_refresh_answered_491_is_retried_after_2_1_to_4_s_when_we_own_the_call_id(
        tmp_path: Path) -> None:
    rig, call = bridged(tmp_path)
    leg = call.b
    assert leg is not None
    # The callee refreshes with an offerless re-INVITE that makes us the refresher and
    # does not allow UPDATE.
    callee_request(rig, leg, "INVITE", 2, NO_UPDATE)
    assert [r for r in rig.responses(MEMBERS["2001"]) if r.cseq[1] == "INVITE"][-1].headers.get(
        "Session-Expires") == "90;refresher=uas"
    callee_request(rig, leg, "ACK", 2)
    rig.advance(45.1)
    [first] = reinvites(rig, MEMBERS["2001"])[1:]  # after our initial INVITE
    assert first.to_tag == "t1"
    rig.feed(make_response(first, 491), MEMBERS["2001"])
    rig.advance(2.09)
    assert len(reinvites(rig, MEMBERS["2001"])) == 2
    rig.advance(1.92)
    assert len(reinvites(rig, MEMBERS["2001"])) == 3
    assert not call.ended


def test_a_refresh_answered_481_or_408_ends_the_call(tmp_path: Path) -> None:
    for status in (481, 408):
        rig, call = no_update_call(tmp_path / str(status))
        rig.advance(45.1)
        [reinvite] = reinvites(rig)
        rig.feed(make_response(reinvite, status), CALLER)
        assert call.ended and call.end_reason == "SessionExpired"
        byes = rig.requests("BYE", CALLER)
        assert byes and "cause=408" in (byes[0].headers.get("Reason") or "")
        table_empty(rig)


def test_an_unanswered_refresh_ends_the_call(tmp_path: Path) -> None:
    rig, call = no_update_call(tmp_path)
    rig.advance(45.1)
    assert reinvites(rig)
    rig.advance(33)  # Timer B: 64*T1
    assert call.ended and rig.requests("BYE", CALLER)
    table_empty(rig)


def test_a_refresh_answered_otherwise_keeps_the_call_and_refreshes_again(
        tmp_path: Path) -> None:
    rig, call = no_update_call(tmp_path)
    rig.advance(45.1)
    [reinvite] = reinvites(rig)
    rig.feed(make_response(reinvite, 500), CALLER)  # RFC 4028 §10 ends only on 408/481
    assert not call.ended and not rig.requests("BYE", CALLER)
    rig.advance(45)
    assert len(reinvites(rig)) == 2 and not call.ended


def test_a_2xx_without_session_expires_stops_our_refreshes(tmp_path: Path) -> None:
    rig, call = no_update_call(tmp_path)
    rig.advance(45.1)
    [reinvite] = reinvites(rig)
    answer_ok(rig, reinvite, None)  # RFC 4028 §7.2: the peer does not do timers now
    rig.advance(600)
    assert len(reinvites(rig)) == 1
    assert not call.ended and not rig.requests("BYE", CALLER)


def test_a_2xx_making_the_peer_the_refresher_arms_our_expiry(tmp_path: Path) -> None:
    rig, call = no_update_call(tmp_path)
    rig.advance(45.1)
    [reinvite] = reinvites(rig)
    answer_ok(rig, reinvite, "120;refresher=uas")
    rig.advance(120 - 32 - 1)
    assert len(reinvites(rig)) == 1 and not call.ended
    rig.advance(2)
    assert call.ended and "cause=408" in (
        rig.requests("BYE", CALLER)[0].headers.get("Reason") or "")


def test_a_refresh_answered_422_is_retried_once_with_the_min_se_asked(
        tmp_path: Path) -> None:
    rig, call = no_update_call(tmp_path)
    rig.advance(45.1)
    [first] = reinvites(rig)
    rig.feed(make_response(first, 422, headers=[("Min-SE", "180")]), CALLER)
    [_, second] = reinvites(rig)
    assert second.headers.get("Session-Expires") == "180;refresher=uac"
    assert second.headers.get("Min-SE") == "180"
    rig.feed(make_response(second, 422, headers=[("Min-SE", "360")]), CALLER)
    assert len(reinvites(rig)) == 2 and not call.ended  # once only


def test_their_reinvite_while_ours_is_pending_gets_491(tmp_path: Path) -> None:
    """Glare (RFC 3261 §14.2, RFC 3311 §5.2): while our refresh re-INVITE is unanswered,
    their re-INVITE and their UPDATE with an offer get 491; once ours is answered and
    ACKed, theirs go through."""
    rig, call = no_update_call(tmp_path)
    rig.advance(45.1)
    [reinvite] = reinvites(rig)
    remotes = len(rig.of(m.MediaRemote))
    rig.caller_request("INVITE", 2, body=offer("sendonly"))
    assert rig.last(2).status == 491
    rig.caller_request("UPDATE", 3, body=offer("sendonly"))
    assert rig.last(3).status == 491
    assert len(rig.of(m.MediaRemote)) == remotes  # nothing of theirs applied
    answer_ok(rig, reinvite, "90;refresher=uac")
    rig.caller_request("INVITE", 4, body=offer("sendonly"))
    assert rig.last(4).status == 200 and b"a=recvonly" in rig.last(4).body
    assert not call.ended


def test_an_update_offer_before_our_answer_on_a_direct_call_gets_500_retry_after(
        tmp_path: Path) -> None:
    """RFC 3311 §5.2: an offer in an UPDATE while the INVITE's offer is still unanswered
    (a direct call rings its callee; our answer goes with the callee's) gets 500 with
    Retry-After, and changes nothing."""
    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER)
    call = rig.call(caller_invite().replace(b"*99", b"2001"))
    [invite] = rig.requests("INVITE", MEMBERS["2001"])
    rig.answer(invite, MEMBERS["2001"], "t1", ring_only=True)
    ringing = [r for r in rig.responses() if r.status == 180][0]
    remotes = len(rig.of(m.MediaRemote))
    rig.feed((
        "UPDATE sip:pbx@127.0.0.1:5060 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-update-2\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=caller\r\n"
        f"To: {ringing.headers.get('To')}\r\nCall-ID: caller-call@127.0.0.1\r\n"
        "CSeq: 2 UPDATE\r\nContact: <sip:1001@127.0.0.1:5999>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(offer(port=43000))}\r\n\r\n"
    ).encode() + offer(port=43000), CALLER)
    response = rig.last(2)
    assert response.status == 500 and response.headers.get("Retry-After")
    assert len(rig.of(m.MediaRemote)) == remotes and not call.ended


def test_a_refresh_answered_100_and_never_again_leaves_nothing_behind(
        tmp_path: Path) -> None:
    """Our refresh re-INVITE gets a 100 and then nothing: its transaction has no timer in
    Proceeding; the call ends when the session expires, and neither the transaction nor
    the front's index of it may stay."""
    rig, call = no_update_call(tmp_path)
    rig.advance(45.1)
    [reinvite] = reinvites(rig)
    rig.feed(make_response(reinvite, 100), CALLER)
    rig.advance(60)
    assert call.ended
    table_empty(rig)

"""In-dialog requests on the core's virtual clock: re-INVITE (hold, resume, refresh,
offerless, glare), UPDATE, session timer headers (RFC 4028), REFER (RFC 3515) and who
may send them."""

from __future__ import annotations

from pathlib import Path

from pbx import messages as m
from pbx.sip import sdp
from pbx.sip.message import SipRequest
from tests.calls.rig import (
    CALLER,
    MEMBERS,
    PLAY,
    TRUSTED_CALLER,
    CoreRig,
    caller_invite,
    first_then,
)


def offer(direction: str = "sendrecv", port: int = 40000, ip: str = "127.0.0.1",
          version: int = 1) -> bytes:
    return (f"v=0\r\no=- 1 {version} IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
            f"a=rtpmap:101 telephone-event/8000\r\na={direction}\r\n").encode()


def notifies(rig: CoreRig) -> list[SipRequest]:
    return rig.requests("NOTIFY", CALLER)


def test_hold_resume_refresh_and_offerless_reinvite(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    call = rig.answered()
    first = [r for r in rig.responses() if r.status == 200][0].body
    version = sdp.origin_of(first)
    assert version is not None
    remotes = len(rig.of(m.MediaRemote))
    # Hold: sendonly -> our answer recvonly, a new o= version.
    rig.caller_request("INVITE", 2, body=offer("sendonly"))
    held = rig.last(2)
    assert held.status == 200 and b"a=recvonly" in held.body
    assert sdp.origin_of(held.body) == (version[0], version[1] + 1)
    # The worker is told: our direction recvonly, so it sends the held party nothing.
    assert rig.of(m.MediaRemote)[remotes - 1].direction == "sendrecv"
    assert len(rig.of(m.MediaRemote)) > remotes
    assert rig.of(m.MediaRemote)[-1].direction == "recvonly"
    rig.caller_request("ACK", 2)
    # A second re-INVITE before the first's ACK: 491; after it, fine.
    rig.caller_request("INVITE", 3, body=offer("sendonly"))
    rig.caller_request("INVITE", 4, body=offer("sendonly"))
    assert rig.last(4).status == 491
    # A refresh (same offer): the same SDP, same version.
    assert rig.last(3).body == held.body
    rig.caller_request("ACK", 3)
    # Resume on a new port: sendrecv, and the worker gets the new address.
    rig.caller_request("INVITE", 5, body=offer("sendrecv", port=41000))
    resumed = rig.last(5)
    assert b"a=sendrecv" in resumed.body
    assert sdp.origin_of(resumed.body) == (version[0], version[1] + 2)
    remote = rig.of(m.MediaRemote)[-1]
    assert len(rig.of(m.MediaRemote)) > remotes and remote.remote_port == 41000
    assert remote.direction == "sendrecv"
    rig.caller_request("ACK", 5)
    # Offerless: our SDP is the offer, the ACK's answer is applied.
    rig.caller_request("INVITE", 6)
    assert rig.last(6).body == resumed.body
    rig.caller_request("ACK", 6, body=offer(port=42000))
    assert rig.of(m.MediaRemote)[-1].remote_port == 42000
    # c=0.0.0.0 (RFC 2543 hold): answered; the worker keeps the last address and
    # stops sending (inactive), never sends to 0.0.0.0.
    rig.caller_request("INVITE", 7, body=offer(ip="0.0.0.0"))
    assert rig.last(7).status == 200
    held_remote = rig.of(m.MediaRemote)[-1]
    assert (held_remote.remote_ip, held_remote.remote_port) == ("127.0.0.1", 42000)
    assert held_remote.direction == "inactive"
    rig.caller_request("ACK", 7)
    # A bad offer: 488, the session unchanged.
    rig.caller_request("INVITE", 8, body=b"v=0\r\nm=video 1 RTP/AVP 31\r\n")
    assert rig.last(8).status == 488
    assert not call.ended and rig.core.ctx.table.calls


def test_update_with_and_without_sdp(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY))
    rig.answered()
    rig.caller_request("UPDATE", 2, body=offer("inactive", port=43000))
    ok = rig.last(2)
    assert ok.status == 200 and b"a=inactive" in ok.body
    assert rig.of(m.MediaRemote)[-1].remote_port == 43000
    rig.caller_request("UPDATE", 3)
    assert rig.last(3).status == 200 and not rig.last(3).body
    assert "UPDATE" in (ok.headers.get("Allow") or "UPDATE")


def test_session_timers(tmp_path: Path) -> None:
    """The headers; expiry and refresh timing are in tests/calls/test_core.py."""
    rig = CoreRig(tmp_path, first_then(PLAY))
    # Below Min-SE: 422 with ours.
    rig.feed(caller_invite("Session-Expires: 30\r\nSupported: timer\r\n"), CALLER)
    too_small = [r for r in rig.responses() if r.status == 422]
    assert too_small and too_small[0].headers.get("Min-SE") == "90"
    assert not rig.core.ctx.table.calls
    rig.sip.clear()
    call = rig.call(caller_invite("Session-Expires: 90;refresher=uac\r\nSupported: timer\r\n",
                                  branch="2"))
    ok = [r for r in rig.responses() if r.status == 200]
    assert ok and ok[0].headers.get("Session-Expires") == "90;refresher=uac"
    assert ok[0].headers.get("Require") == "timer"
    rig.caller_request("ACK", 2)
    leg = call.a
    assert leg is not None and leg.session_interval == 90 and not leg.we_refresh
    # A refresh by UPDATE re-arms it; the refresher defaults to the UAC.
    rig.caller_request("UPDATE", 3, "Session-Expires: 120\r\nSupported: timer\r\n")
    assert rig.last(3).headers.get("Session-Expires") == "120;refresher=uac"
    assert leg.session_interval == 120


def test_refer_on_an_ivr_call_transfers_the_caller(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY), TRUSTED_CALLER)
    rig.answered()
    rig.caller_request("REFER", 2, "Refer-To: <sip:2001@127.0.0.1:5060>\r\n")
    assert rig.last(2).status == 202
    assert notifies(rig)[0].body == b"SIP/2.0 100 Trying\r\n"
    assert notifies(rig)[0].headers.get("Event") == "refer;id=2"
    ended = [e.input for e in rig.ivr if isinstance(e.input, m.CallEndedInput)]
    assert ended and ended[0].reason == "Transfer(2001)"
    invite = rig.requests("INVITE", MEMBERS["2001"])
    assert invite
    rig.answer(invite[0], MEMBERS["2001"], "t1")
    assert rig.of(m.MediaBridge)
    final = notifies(rig)[-1]
    assert final.body == b"SIP/2.0 200 OK\r\n"
    assert (final.headers.get("Subscription-State") or "").startswith("terminated")
    assert not rig.requests("BYE", CALLER)  # the caller stays, bridged


def test_a_refer_out_of_the_ivr_survives_the_sessions_lost_goodbye(tmp_path: Path) -> None:
    """After a REFER the IVR session only has its goodbye (CallEndedInput) to deliver; if
    no executor takes it, the session is given up, but the call is no longer the IVR's
    to end: the caller stays bridged to the target."""
    rig = CoreRig(tmp_path, first_then(PLAY), TRUSTED_CALLER)
    call = rig.answered()
    rig.executors[b"e"].full = True  # from now on no executor has room
    rig.heartbeat()
    rig.caller_request("REFER", 2, "Refer-To: <sip:2001@127.0.0.1:5060>\r\n")
    assert rig.last(2).status == 202
    [invite] = rig.requests("INVITE", MEMBERS["2001"])
    rig.answer(invite, MEMBERS["2001"], "t1")
    assert rig.of(m.MediaBridge)
    for _ in range(30):  # 15 s: past IVR_NO_EXECUTOR_S
        rig.advance(0.5)
        rig.heartbeat()
    assert not call.ended, call.end_reason
    assert not rig.requests("BYE", CALLER) and not rig.requests("BYE", MEMBERS["2001"])
    assert not rig.core.ctx.table.sessions  # the session itself is given up


def test_refer_in_a_bridge_connects_the_peer_and_releases_the_referrer(
        tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.TransferCommand(target="2001")]), TRUSTED_CALLER)
    call = rig.call()
    invite = rig.requests("INVITE", MEMBERS["2001"])
    assert invite
    rig.answer(invite[0], MEMBERS["2001"], "t1")
    assert rig.of(m.MediaBridge)
    rig.caller_request("ACK", 1)
    rig.caller_request("REFER", 2, "Refer-To: <sip:2002@127.0.0.1>\r\n")
    assert rig.last(2).status == 202
    second = rig.requests("INVITE", MEMBERS["2002"])
    assert second
    rig.answer(second[0], MEMBERS["2002"], "t2")
    assert len(rig.of(m.MediaBridge)) == 2
    assert rig.of(m.MediaBridge)[-1].call_id.endswith("-b")
    assert notifies(rig)[-1].body == b"SIP/2.0 200 OK\r\n"
    assert rig.requests("BYE", CALLER)
    assert not rig.requests("BYE", MEMBERS["2001"])
    assert call.a is not None and call.a.dialog.remote_tag == "t1" and not call.detached


def test_a_referrer_released_before_its_ack_gives_its_set_up_budget_back(
        tmp_path: Path) -> None:
    """A caller may REFER out of a bridge before it ever ACKed our 200 (in-dialog
    requests need no ACK): the referrer leaves the call without ending it, and its call
    in set-up must leave its source's budget (`[limits] setup_calls_per_source`) too."""
    rig = CoreRig(tmp_path, first_then([m.TransferCommand(target="2001")]), TRUSTED_CALLER)
    call = rig.call()
    invite = rig.requests("INVITE", MEMBERS["2001"])
    assert invite
    rig.answer(invite[0], MEMBERS["2001"], "t1")
    assert rig.of(m.MediaBridge)
    assert rig.core.ctx.table.setup_by_source == {CALLER[0]: 1}  # never ACKed
    rig.caller_request("REFER", 2, "Refer-To: <sip:2002@127.0.0.1>\r\n")
    assert rig.last(2).status == 202
    second = rig.requests("INVITE", MEMBERS["2002"])
    assert second
    rig.answer(second[0], MEMBERS["2002"], "t2")
    assert not call.detached and call.a is not None and call.a.dialog.remote_tag == "t1"
    assert rig.core.ctx.table.setup_by_source == {}
    # The referrer is released: its BYE waits for the ACK of our 200 (RFC 3261 §15).
    assert not rig.requests("BYE", CALLER)
    rig.caller_request("ACK", 1)
    assert rig.requests("BYE", CALLER)


def test_refer_to_an_unknown_target_notifies_the_failure(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY), TRUSTED_CALLER)
    rig.answered()
    rig.caller_request("REFER", 2, "Refer-To: <sip:9999@127.0.0.1:5060>\r\n")
    assert rig.last(2).status == 202
    assert len(notifies(rig)) == 2
    assert notifies(rig)[-1].body == b"SIP/2.0 404 Not Found\r\n"
    assert rig.requests("BYE", CALLER)
    rig.caller_request("REFER", 3)  # the dialog is gone
    assert rig.last(3).status in (403, 481)


def test_an_in_dialog_request_from_another_ip_is_refused(tmp_path: Path) -> None:
    """Someone who learned the dialog's tags cannot hang it up, move its media or press
    its keys from elsewhere ([policy] in_dialog_source = "same_ip", pbx.policy)."""
    rig = CoreRig(tmp_path, first_then(PLAY))
    rig.answered()
    ok = [r for r in rig.responses() if r.status == 200][0]
    elsewhere = ("198.51.100.66", 5999)
    bye = (
        "BYE sip:pbx@127.0.0.1:5060 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 198.51.100.66:5999;branch=z9hG4bK-forged-bye\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=caller\r\n"
        f"To: {ok.headers.get('To')}\r\nCall-ID: caller-call@127.0.0.1\r\n"
        "CSeq: 5 BYE\r\nContent-Length: 0\r\n\r\n").encode()
    rig.feed(bye, elsewhere)
    forged = [r for r in rig.responses(elsewhere) if r.cseq[1] == "BYE"]
    assert [r.status for r in forged] == [403]
    assert rig.core.ctx.table.calls and rig.core.ctx.stats["in_dialog_foreign"] == 1
    rig.caller_request("BYE", 6)  # the real caller still can
    assert rig.last(6).status == 200
    assert not rig.core.ctx.table.calls


def test_an_ack_from_another_ip_moves_no_media(tmp_path: Path) -> None:
    """An ACK carries the answer to an offerless re-INVITE: from a stranger who learned
    the tags it must not move the call's media (nor end a late-offer call)."""
    rig = CoreRig(tmp_path, first_then(PLAY))
    rig.answered()
    rig.caller_request("ACK", 1)
    rig.caller_request("INVITE", 2)  # offerless: our 200 offers, the ACK answers
    assert rig.last(2).status == 200
    remotes = len(rig.of(m.MediaRemote))
    elsewhere = ("198.51.100.66", 5999)
    rig.caller_request("ACK", 2, body=offer(ip="203.0.113.9", port=4444), source=elsewhere)
    assert len(rig.of(m.MediaRemote)) == remotes
    assert rig.core.ctx.stats["in_dialog_foreign"] == 1
    rig.caller_request("ACK", 2, body=offer(port=42000))  # the caller's own
    assert rig.of(m.MediaRemote)[-1].remote_port == 42000


def test_a_cancel_from_another_ip_is_refused(tmp_path: Path) -> None:
    """A CANCEL comes from where its INVITE came (RFC 3261 §9.1): a copy of the caller's
    (its Via and branch) sent from elsewhere does not end the ringing call."""
    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER)
    call = rig.call(caller_invite("").replace(b"*99", b"2001"))
    invite = rig.requests("INVITE", MEMBERS["2001"])[0]
    rig.answer(invite, MEMBERS["2001"], "t1", ring_only=True)
    elsewhere = ("198.51.100.66", 5999)
    rig.cancel_call(source=elsewhere)
    assert [r.status for r in rig.responses(elsewhere)] == [403]
    assert not call.ended and not rig.requests("CANCEL", MEMBERS["2001"])
    assert rig.core.ctx.stats["in_dialog_foreign"] == 1
    rig.answer(invite, MEMBERS["2001"], "t1")  # 2001 answers: the two are bridged
    assert rig.of(m.MediaBridge) and not call.ended and 487 not in rig.statuses()


def test_the_referrers_own_bye_after_the_final_notify_leaves_the_transferred_call_up(
        tmp_path: Path) -> None:
    """After a transfer the referrer's BYE often crosses ours (phones hang up when the
    final NOTIFY says 200): it ends the referrer's dialog only, not the call that now
    joins the other two parties."""
    rig = CoreRig(tmp_path, first_then([m.TransferCommand(target="2001")]), TRUSTED_CALLER)
    call = rig.call()
    invite = rig.requests("INVITE", MEMBERS["2001"])
    rig.answer(invite[0], MEMBERS["2001"], "t1")
    rig.caller_request("ACK", 1)
    rig.caller_request("REFER", 2, "Refer-To: <sip:2002@127.0.0.1>\r\n")
    second = rig.requests("INVITE", MEMBERS["2002"])
    rig.answer(second[0], MEMBERS["2002"], "t2")
    assert notifies(rig)[-1].body == b"SIP/2.0 200 OK\r\n"
    assert rig.requests("BYE", CALLER)  # ours, released the referrer
    rig.caller_request("BYE", 3)  # theirs, crossing ours
    assert rig.last(3).status in (200, 481)
    assert not call.ended
    assert not rig.requests("BYE", MEMBERS["2001"])
    assert not rig.requests("BYE", MEMBERS["2002"])
    rig.caller_request("INVITE", 4, body=offer())  # nothing more happens in that dialog
    assert rig.last(4).status == 481

"""In-dialog requests of the front without sockets: re-INVITE (hold, resume, refresh,
offerless, glare), UPDATE, session timers (RFC 4028) and REFER (RFC 3515)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pbx import messages as m
from pbx.sip import sdp
from pbx.sip.message import SipRequest, SipResponse
from tests.test_front_queue import CALLER, MEMBERS, SDP, Rig, first_then, until

PLAY = [m.PlayCommand(play_id=1, file="sounds/menu.wav")]
# The caller's source is a trusted network: its REFERs may reach extensions (pbx.policy).
TRUSTED_CALLER = '\n[policy]\ntrusted_networks = ["127.0.0.1/32"]\n'


def offer(direction: str = "sendrecv", port: int = 40000, ip: str = "127.0.0.1",
          version: int = 1) -> bytes:
    return (f"v=0\r\no=- 1 {version} IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
            f"a=rtpmap:101 telephone-event/8000\r\na={direction}\r\n").encode()


def in_dialog(rig: Rig, method: str, cseq: int, body: bytes = b"",
              headers: str = "", extra_ct: str = "application/sdp") -> None:
    ok = [r for r in rig.responses(CALLER) if r.status == 200 and r.cseq[1] == "INVITE"][0]
    ctype = f"Content-Type: {extra_ct}\r\n" if body else ""
    msg = (
        f"{method} sip:pbx@127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-{method}-{cseq}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=caller\r\n"
        f"To: {ok.headers.get('To')}\r\nCall-ID: caller-call@127.0.0.1\r\n"
        f"CSeq: {cseq} {method}\r\nContact: <sip:1001@127.0.0.1:5999>\r\n{headers}"
        f"{ctype}Content-Length: {len(body)}\r\n\r\n").encode() + body
    rig.front.message_received(msg, CALLER)


def ack(rig: Rig, cseq: int, body: bytes = b"") -> None:
    ok = [r for r in rig.responses(CALLER) if r.status == 200][0]
    ctype = "Content-Type: application/sdp\r\n" if body else ""
    msg = (
        "ACK sip:pbx@127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-ack-{cseq}\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=caller\r\n"
        f"To: {ok.headers.get('To')}\r\nCall-ID: caller-call@127.0.0.1\r\n"
        f"CSeq: {cseq} ACK\r\n{ctype}Content-Length: {len(body)}\r\n\r\n").encode() + body
    rig.front.message_received(msg, CALLER)


def last(rig: Rig, cseq: int) -> SipResponse:
    return [r for r in rig.responses(CALLER) if r.cseq[0] == cseq][-1]


async def answered(rig: Rig) -> None:
    """The caller's call answered and acknowledged, and its IVR's first step taken."""
    rig.call()
    await until(lambda: [r for r in rig.responses(CALLER) if r.status == 200])
    rig.ack_caller()
    await until(lambda: all(s.in_flight is None for s in rig.front.sessions.values()))


def test_hold_resume_refresh_and_offerless_reinvite(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then(PLAY))
        await answered(rig)
        first = [r for r in rig.responses(CALLER) if r.status == 200][0].body
        version = sdp.origin_of(first)
        assert version is not None
        remotes = len(rig.of(m.MediaRemote))
        # Hold: sendonly -> our answer recvonly, a new o= version.
        in_dialog(rig, "INVITE", 2, offer("sendonly"))
        held = last(rig, 2)
        assert held.status == 200 and b"a=recvonly" in held.body
        assert sdp.origin_of(held.body) == (version[0], version[1] + 1)
        # The worker is told: our direction recvonly, so it sends the held party nothing.
        assert rig.of(m.MediaRemote)[remotes - 1].direction == "sendrecv"
        assert len(rig.of(m.MediaRemote)) > remotes
        assert rig.of(m.MediaRemote)[-1].direction == "recvonly"
        ack(rig, 2)
        # A second re-INVITE before the first's ACK: 491; after it, fine.
        in_dialog(rig, "INVITE", 3, offer("sendonly"))
        in_dialog(rig, "INVITE", 4, offer("sendonly"))
        assert last(rig, 4).status == 491
        # A refresh (same offer): the same SDP, same version.
        assert last(rig, 3).body == held.body
        ack(rig, 3)
        # Resume on a new port: sendrecv, and the worker gets the new address.
        in_dialog(rig, "INVITE", 5, offer("sendrecv", port=41000))
        resumed = last(rig, 5)
        assert b"a=sendrecv" in resumed.body
        assert sdp.origin_of(resumed.body) == (version[0], version[1] + 2)
        remote = rig.of(m.MediaRemote)[-1]
        assert len(rig.of(m.MediaRemote)) > remotes and remote.remote_port == 41000
        assert remote.direction == "sendrecv"
        ack(rig, 5)
        # Offerless: our SDP is the offer, the ACK's answer is applied.
        in_dialog(rig, "INVITE", 6)
        assert last(rig, 6).body == resumed.body
        ack(rig, 6, offer(port=42000))
        assert rig.of(m.MediaRemote)[-1].remote_port == 42000
        # c=0.0.0.0 (RFC 2543 hold): answered; the worker keeps the last address and
        # stops sending (inactive), never sends to 0.0.0.0.
        in_dialog(rig, "INVITE", 7, offer(ip="0.0.0.0"))
        assert last(rig, 7).status == 200
        held = rig.of(m.MediaRemote)[-1]
        assert (held.remote_ip, held.remote_port) == ("127.0.0.1", 42000)
        assert held.direction == "inactive"
        ack(rig, 7)
        # A bad offer: 488, the session unchanged.
        in_dialog(rig, "INVITE", 8, b"v=0\r\nm=video 1 RTP/AVP 31\r\n")
        assert last(rig, 8).status == 488
        assert rig.front.calls

    asyncio.run(main())


def test_update_with_and_without_sdp(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then(PLAY))
        await answered(rig)
        in_dialog(rig, "UPDATE", 2, offer("inactive", port=43000))
        ok = last(rig, 2)
        assert ok.status == 200 and b"a=inactive" in ok.body
        assert rig.of(m.MediaRemote)[-1].remote_port == 43000
        in_dialog(rig, "UPDATE", 3)
        assert last(rig, 3).status == 200 and not last(rig, 3).body
        assert "UPDATE" in (ok.headers.get("Allow") or "UPDATE")

    asyncio.run(main())


def test_session_timers(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then(PLAY))
        # Below Min-SE: 422 with ours.
        rig.front.message_received(
            rig_invite(b"Session-Expires: 30\r\nSupported: timer\r\n"), CALLER)
        too_small = [r for r in rig.responses(CALLER) if r.status == 422]
        assert too_small and too_small[0].headers.get("Min-SE") == "90"
        assert not rig.front.calls
        rig.sip.clear()
        rig.front.message_received(rig_invite(
            b"Session-Expires: 90;refresher=uac\r\nSupported: timer\r\n", branch="2"), CALLER)
        ok = await until(lambda: [r for r in rig.responses(CALLER) if r.status == 200])
        assert ok[0].headers.get("Session-Expires") == "90;refresher=uac"
        assert ok[0].headers.get("Require") == "timer"
        rig.ack_caller()
        leg = next(iter(rig.front.calls.values())).a
        assert leg is not None and leg.session_timer is not None
        # A refresh by UPDATE re-arms it; the refresher defaults to the UAC.
        in_dialog(rig, "UPDATE", 2, headers="Session-Expires: 120\r\nSupported: timer\r\n")
        assert last(rig, 2).headers.get("Session-Expires") == "120;refresher=uac"
        # Without a refresh in time, BYE (here the timer is shortened).
        leg.session_timer.cancel()
        leg.session_timer = asyncio.get_running_loop().call_later(
            0.05, rig.front._session_expired, leg)
        await until(lambda: rig.requests("BYE", CALLER))

    asyncio.run(main())


def rig_invite(extra: bytes, branch: str = "1") -> bytes:
    return (
        "INVITE sip:*99@127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-caller-{branch}\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=caller\r\n"
        "To: <sip:*99@127.0.0.1:5060>\r\nCall-ID: caller-call@127.0.0.1\r\n"
        f"CSeq: {branch} INVITE\r\nContact: <sip:1001@127.0.0.1:5999>\r\n"
    ).encode() + extra + (
        f"Content-Type: application/sdp\r\nContent-Length: {len(SDP)}\r\n\r\n").encode() + SDP


def notifies(rig: Rig) -> list[SipRequest]:
    return rig.requests("NOTIFY", CALLER)


def test_refer_on_an_ivr_call_transfers_the_caller(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then(PLAY), TRUSTED_CALLER)
        await answered(rig)
        in_dialog(rig, "REFER", 2, headers="Refer-To: <sip:2001@127.0.0.1:5060>\r\n")
        assert last(rig, 2).status == 202
        assert notifies(rig)[0].body == b"SIP/2.0 100 Trying\r\n"
        assert notifies(rig)[0].headers.get("Event") == "refer;id=2"
        ended = [e for e in rig.ivr_events if isinstance(e.input, m.CallEndedInput)]
        assert ended and ended[0].input.reason == "Transfer(2001)"
        invite = await until(lambda: rig.requests("INVITE", MEMBERS["2001"]))
        rig.answer(invite[0], MEMBERS["2001"], "t1")
        await until(lambda: rig.of(m.MediaBridge))
        final = notifies(rig)[-1]
        assert final.body == b"SIP/2.0 200 OK\r\n"
        assert (final.headers.get("Subscription-State") or "").startswith("terminated")
        assert not rig.requests("BYE", CALLER)  # the caller stays, bridged

    asyncio.run(main())


def test_refer_in_a_bridge_connects_the_peer_and_releases_the_referrer(
        tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then([m.TransferCommand(target="2001")]), TRUSTED_CALLER)
        rig.call()
        invite = await until(lambda: rig.requests("INVITE", MEMBERS["2001"]))
        rig.answer(invite[0], MEMBERS["2001"], "t1")
        await until(lambda: rig.of(m.MediaBridge))
        rig.ack_caller()
        in_dialog(rig, "REFER", 2, headers="Refer-To: <sip:2002@127.0.0.1>\r\n")
        assert last(rig, 2).status == 202
        second = await until(lambda: rig.requests("INVITE", MEMBERS["2002"]))
        rig.answer(second[0], MEMBERS["2002"], "t2")
        await until(lambda: len(rig.of(m.MediaBridge)) == 2)
        assert rig.of(m.MediaBridge)[-1].call_id.endswith("-b")
        assert notifies(rig)[-1].body == b"SIP/2.0 200 OK\r\n"
        assert rig.requests("BYE", CALLER)
        assert not rig.requests("BYE", MEMBERS["2001"])
        call = next(iter(rig.front.calls.values()))
        assert call.a is not None and call.a.remote_tag == "t1" and not call.detached

    asyncio.run(main())


def test_a_referrer_released_before_its_ack_gives_its_set_up_budget_back(
        tmp_path: Path) -> None:
    """A caller may REFER out of a bridge before it ever ACKed our 200 (in-dialog
    requests need no ACK): the referrer leaves the call without ending it, and its call
    in set-up must leave its source's budget (`[limits] setup_calls_per_source`) too."""
    async def main() -> None:
        rig = Rig(tmp_path, first_then([m.TransferCommand(target="2001")]), TRUSTED_CALLER)
        rig.call()
        invite = await until(lambda: rig.requests("INVITE", MEMBERS["2001"]))
        rig.answer(invite[0], MEMBERS["2001"], "t1")
        await until(lambda: rig.of(m.MediaBridge))
        assert rig.front.setup_by_source == {CALLER[0]: 1}  # never ACKed
        in_dialog(rig, "REFER", 2, headers="Refer-To: <sip:2002@127.0.0.1>\r\n")
        assert last(rig, 2).status == 202
        second = await until(lambda: rig.requests("INVITE", MEMBERS["2002"]))
        rig.answer(second[0], MEMBERS["2002"], "t2")
        await until(lambda: rig.requests("BYE", CALLER))  # the referrer is released
        call = next(iter(rig.front.calls.values()))
        assert not call.detached and call.a is not None and call.a.remote_tag == "t1"
        assert rig.front.setup_by_source == {}

    asyncio.run(main())


def test_refer_to_an_unknown_target_notifies_the_failure(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, first_then(PLAY), TRUSTED_CALLER)
        await answered(rig)
        in_dialog(rig, "REFER", 2, headers="Refer-To: <sip:9999@127.0.0.1:5060>\r\n")
        assert last(rig, 2).status == 202
        await until(lambda: len(notifies(rig)) == 2)
        assert notifies(rig)[-1].body == b"SIP/2.0 404 Not Found\r\n"
        assert rig.requests("BYE", CALLER)
        in_dialog(rig, "REFER", 3)  # the dialog is gone
        assert last(rig, 3).status in (403, 481)

    asyncio.run(main())



def test_an_in_dialog_request_from_another_ip_is_refused(tmp_path: Path) -> None:
    """Someone who learned the dialog's tags cannot hang it up, move its media or press
    its keys from elsewhere ([policy] in_dialog_source = "same_ip", pbx.policy)."""
    async def main() -> None:
        rig = Rig(tmp_path, first_then(PLAY))
        await answered(rig)
        ok = [r for r in rig.responses(CALLER) if r.status == 200][0]
        elsewhere = ("198.51.100.66", 5999)
        bye = (
            "BYE sip:pbx@127.0.0.1:5060 SIP/2.0\r\n"
            "Via: SIP/2.0/UDP 198.51.100.66:5999;branch=z9hG4bK-forged-bye\r\n"
            "Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=caller\r\n"
            f"To: {ok.headers.get('To')}\r\nCall-ID: caller-call@127.0.0.1\r\n"
            "CSeq: 5 BYE\r\nContent-Length: 0\r\n\r\n").encode()
        rig.front.message_received(bye, elsewhere)
        forged = [r for r in rig.responses(elsewhere) if r.cseq[1] == "BYE"]
        assert [r.status for r in forged] == [403]
        assert rig.front.calls and rig.front.stats["in_dialog_foreign"] == 1
        in_dialog(rig, "BYE", 6)  # the real caller still can
        assert last(rig, 6).status == 200
        await until(lambda: not rig.front.calls)

    asyncio.run(main())

"""Early media on a direct call (RFC 3960's gateway model), on the virtual clock: a
callee's 180/183 with SDP (a trunk's ringback, an announcement) is bridged to the caller
at once and the caller gets a 183 with our answer, the same SDP as its 200 later
(RFC 3261 §13.2.1); an 18x without SDP stays a plain 180."""

from __future__ import annotations

from pathlib import Path

from pbx import messages as m
from pbx.calls.state import Call, CallPhase, call_from_dict
from pbx.sip.message import SipRequest, SipResponse, make_response
from tests.calls.rig import MEMBERS, SDP, TRUSTED_CALLER, CoreRig, caller_invite
from tests.calls.test_call_flows import late_offer_invite
from tests.calls.test_forking import PHONE_A, STATIC, forked_call, invite_to

CALLEE = MEMBERS["2001"]
# The callee's network sends its ringback from another port than it will talk from.
EARLY_SDP = SDP.replace(b"40000", b"42000")


def direct_call(tmp_path: Path, invite: bytes | None = None) -> tuple[CoreRig, Call, SipRequest]:
    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER)
    call = rig.call(invite or caller_invite().replace(b"*99", b"2001"))
    [out] = rig.requests("INVITE", CALLEE)
    return rig, call, out


def provisional(rig: CoreRig, invite: SipRequest, addr: tuple[str, int], tag: str,
                status: int = 183, body: bytes = EARLY_SDP) -> None:
    rig.feed(make_response(invite, status, to_tag=tag, body=body), addr)


def answer(rig: CoreRig, invite: SipRequest, addr: tuple[str, int], tag: str,
           body: bytes = SDP) -> None:
    rig.feed(make_response(invite, 200, to_tag=tag, body=body, headers=[
        ("Contact", f"<sip:2001@{addr[0]}:{addr[1]}>")]), addr)


def to_caller(rig: CoreRig, status: int) -> list[SipResponse]:
    return [r for r in rig.responses() if r.status == status and r.cseq[1] == "INVITE"]


def test_a_183_with_sdp_is_bridged_at_once_and_the_200_keeps_the_bridge(
        tmp_path: Path) -> None:
    rig, call, out = direct_call(tmp_path)
    provisional(rig, out, CALLEE, "t1")
    [early] = to_caller(rig, 183)
    assert b"m=audio" in early.body and early.headers.get("Content-Type") == "application/sdp"
    [bridge] = rig.of(m.MediaBridge)
    assert call.a is not None and bridge.call_id == call.a.media_id
    [leg] = call.forks
    assert bridge.peer_call_id == leg.media_id
    assert rig.of(m.MediaRemote)[-1].remote_port == 42000  # where the ringback comes from
    assert call.early_media == leg.media_id and call.phase is CallPhase.TRANSFERRING
    provisional(rig, out, CALLEE, "t1", status=180, body=b"")
    assert not to_caller(rig, 180)  # the caller keeps hearing the early media
    answer(rig, out, CALLEE, "t1")
    [ok] = to_caller(rig, 200)
    assert ok.body == early.body  # one answer to the caller's offer (§13.2.1)
    assert len(rig.of(m.MediaBridge)) == 1  # no gap in what the caller hears
    assert rig.of(m.MediaRemote)[-1].remote_port == 40000  # the 200 moved the callee's RTP
    assert call.phase is CallPhase.BRIDGED and call.early_media is None


def test_a_200_without_the_sdp_of_its_183_keeps_the_early_answer(tmp_path: Path) -> None:
    rig, call, out = direct_call(tmp_path)
    provisional(rig, out, CALLEE, "t1")
    remotes = len(rig.of(m.MediaRemote))
    answer(rig, out, CALLEE, "t1", body=b"")
    assert call.phase is CallPhase.BRIDGED and to_caller(rig, 200)
    assert len(rig.of(m.MediaRemote)) == remotes and not rig.requests("BYE", CALLEE)


def test_an_18x_without_sdp_is_a_plain_180(tmp_path: Path) -> None:
    rig, call, out = direct_call(tmp_path)
    provisional(rig, out, CALLEE, "t1", body=b"")
    assert to_caller(rig, 180) and not to_caller(rig, 183)
    assert not rig.of(m.MediaBridge) and call.early_media is None


def test_a_caller_without_an_offer_gets_a_180(tmp_path: Path) -> None:
    """Our offer would have to go in a reliable 183 (RFC 3262), which we do not send."""
    rig, call, out = direct_call(tmp_path, late_offer_invite("2001"))
    provisional(rig, out, CALLEE, "t1")
    assert to_caller(rig, 180) and not to_caller(rig, 183)
    assert not rig.of(m.MediaBridge)


def test_bad_early_sdp_is_ringing_only(tmp_path: Path) -> None:
    rig, call, out = direct_call(tmp_path)
    provisional(rig, out, CALLEE, "t1", body=b"v=0\r\nnot sdp\r\n")
    assert to_caller(rig, 180) and not rig.of(m.MediaBridge) and not call.ended


def test_the_latest_branch_with_early_media_is_heard_and_the_winner_bridged(
        tmp_path: Path) -> None:
    rig, call = forked_call(tmp_path, phones=(PHONE_A,))
    static, phone = invite_to(rig, STATIC), invite_to(rig, PHONE_A)
    provisional(rig, static, STATIC, "ts")
    provisional(rig, phone, PHONE_A, "ta")
    assert len(to_caller(rig, 183)) == 1  # one early answer to the caller
    bridges = rig.of(m.MediaBridge)
    legs = {leg.addr: leg for leg in call.forks}
    assert [b.peer_call_id for b in bridges] == [legs[STATIC].media_id,
                                                 legs[PHONE_A].media_id]
    answer(rig, static, STATIC, "ts")  # the other one answers
    assert call.b is legs[STATIC] and call.phase is CallPhase.BRIDGED
    assert rig.of(m.MediaBridge)[-1].peer_call_id == legs[STATIC].media_id
    assert rig.requests("CANCEL", PHONE_A)


def test_a_failed_branch_stops_being_heard_and_another_takes_over(tmp_path: Path) -> None:
    rig, call = forked_call(tmp_path, phones=(PHONE_A,))
    static, phone = invite_to(rig, STATIC), invite_to(rig, PHONE_A)
    provisional(rig, static, STATIC, "ts")
    legs = {leg.addr: leg for leg in call.forks}
    rig.feed(make_response(static, 486, to_tag="ts"), STATIC)
    assert call.early_media is None and not call.ended
    assert legs[STATIC].media_id in {x.call_id for x in rig.of(m.MediaRelease)}
    provisional(rig, phone, PHONE_A, "ta")
    assert rig.of(m.MediaBridge)[-1].peer_call_id == legs[PHONE_A].media_id
    first, again = to_caller(rig, 183)  # the same answer, heard again
    assert first.body == again.body and first.headers.get("To") == again.headers.get("To")


def test_the_early_media_branch_survives_the_dict_form(tmp_path: Path) -> None:
    rig, call, out = direct_call(tmp_path)
    provisional(rig, out, CALLEE, "t1")
    data = call.to_dict()
    again = call_from_dict(data, {r.name: r for r in rig.settings.routes})
    assert again.early_media == call.early_media is not None
    assert again.to_dict() == data

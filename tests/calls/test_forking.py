"""Parallel forking (issue 11): every binding of a user rings at once, on the virtual
clock. 3001 has a static contact and two phones registered with digest through the
core; each is a branch of its own (RFC 3261 §16.7 as a B2BUA): the first 2xx wins and
the others get CANCEL, a late 2xx of a loser gets ACK + BYE, a 6xx ends the fork, the
best response is relayed when all fail, one ring timeout covers every branch and the
caller's CANCEL cancels them all."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pbx import messages as m
from pbx.calls.state import Call, CallPhase, LegPhase
from pbx.sip.digest import client_authorization, parse_challenge
from pbx.sip.message import SipRequest, make_response
from tests.calls.rig import CALLER, TRUSTED_CALLER, CoreRig, caller_invite, first_then

STATIC = ("127.0.0.1", 6031)
PHONE_A = ("127.0.0.1", 6032)
PHONE_B = ("127.0.0.1", 6033)
FORKED_USER = """
[users."3001"]
password = "pw-3001"
contact = "sip:3001@127.0.0.1:6031"

[users."3002"]
password = "pw-3002"
"""


def register(rig: CoreRig, user: str, addr: tuple[str, int],
             contact_addr: tuple[str, int] | None = None) -> None:
    """`user`'s phone at `addr` registers (401, then digest credentials; MD5 here)."""
    host, port = contact_addr or addr
    password = f"pw-{user}"

    def request(cseq: int, authorization: str = "") -> bytes:
        auth_line = f"Authorization: {authorization}\r\n" if authorization else ""
        return (f"REGISTER sip:127.0.0.1:5060 SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {addr[0]}:{addr[1]};branch=z9hG4bK-reg-{port}-{cseq}\r\n"
                f"Max-Forwards: 70\r\nFrom: <sip:{user}@127.0.0.1>;tag=r{port}\r\n"
                f"To: <sip:{user}@127.0.0.1>\r\nCall-ID: reg-{port}@phone\r\n"
                f"CSeq: {cseq} REGISTER\r\nContact: <sip:{user}@{host}:{port}>\r\n"
                f"Expires: 3600\r\n{auth_line}Content-Length: 0\r\n\r\n").encode()

    rig.feed(request(1), addr)
    challenge = next(v for v in rig.responses(addr)[-1].headers.get_all("WWW-Authenticate")
                     if parse_challenge(v).algorithm == "MD5")
    rig.feed(request(2, client_authorization(
        challenge=challenge, username=user, password=password, method="REGISTER",
        uri="sip:127.0.0.1:5060", cnonce="cn", nc=1)), addr)
    assert rig.responses(addr)[-1].status == 200


def forked_call(tmp_path: Path, *, phones: tuple[tuple[str, int], ...] = (PHONE_A, PHONE_B),
                user: str = "3001") -> tuple[CoreRig, Call]:
    """A trusted caller calls `user` directly, with `phones` registered."""
    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER + FORKED_USER)
    for phone in phones:
        register(rig, user, phone)
    call = rig.call(caller_invite("").replace(b"*99", user.encode()))
    return rig, call


def invite_to(rig: CoreRig, addr: tuple[str, int]) -> SipRequest:
    [invite] = rig.requests("INVITE", addr)
    return invite


def test_every_binding_rings_and_the_first_answer_wins(tmp_path: Path) -> None:
    rig, call = forked_call(tmp_path)
    # The static contact is one binding more, not an override of the registrations.
    invites = {addr: invite_to(rig, addr) for addr in (STATIC, PHONE_A, PHONE_B)}
    assert call.phase is CallPhase.TRANSFERRING and len(call.forks) == 3
    assert len({i.call_id for i in invites.values()}) == 3  # each its own outbound leg
    assert len({leg.media_id for leg in call.forks}) == 3
    for addr, invite in invites.items():
        rig.answer(invite, addr, f"t{addr[1]}", ring_only=True)
    assert 180 in rig.statuses()
    rig.answer(invites[PHONE_B], PHONE_B, f"t{PHONE_B[1]}")
    assert call.phase is CallPhase.BRIDGED and call.b is not None
    assert call.b.addr == PHONE_B and not call.forks
    assert rig.statuses()[-1] == 200  # the caller is answered with the winner
    for loser in (STATIC, PHONE_A):
        [cancel] = rig.requests("CANCEL", loser)
        assert cancel.call_id == invites[loser].call_id
    assert not rig.requests("CANCEL", PHONE_B)
    bridge = [x for x in rig.media if isinstance(x, m.MediaBridge)]
    assert bridge[-1].peer_call_id == call.b.media_id
    # The losers' ports went back.
    released = {x.call_id for x in rig.media if isinstance(x, m.MediaRelease)}
    assert len(released) == 2 and call.b.media_id not in released


def test_a_late_2xx_from_a_cancelled_branch_gets_ack_and_bye(tmp_path: Path) -> None:
    rig, call = forked_call(tmp_path, phones=(PHONE_A,))
    static, phone = invite_to(rig, STATIC), invite_to(rig, PHONE_A)
    rig.answer(static, STATIC, "ts", ring_only=True)
    rig.answer(phone, PHONE_A, "ta")  # phone A wins
    assert rig.requests("CANCEL", STATIC)
    rig.answer(static, STATIC, "ts")  # the static contact answered all the same
    acks = [r for r in rig.requests("ACK", STATIC) if r.to_tag == "ts"]
    byes = rig.requests("BYE", STATIC)
    assert acks and len(byes) == 1 and byes[0].to_tag == "ts"
    assert call.phase is CallPhase.BRIDGED and call.b is not None and call.b.addr == PHONE_A
    assert not rig.requests("BYE", PHONE_A) and not rig.requests("BYE", CALLER)


def test_a_6xx_ends_the_fork(tmp_path: Path) -> None:
    rig, call = forked_call(tmp_path)
    for addr in (STATIC, PHONE_A):
        rig.answer(invite_to(rig, addr), addr, f"t{addr[1]}", ring_only=True)
    rig.feed(make_response(invite_to(rig, PHONE_B), 603, to_tag="tb"), PHONE_B)
    assert call.ended and call.end_code == 603
    assert rig.statuses()[-1] == 603
    assert rig.requests("CANCEL", STATIC) and rig.requests("CANCEL", PHONE_A)
    assert rig.requests("ACK", PHONE_B)  # the transaction layer ACKs the 603


def test_a_failed_branch_leaves_the_others_ringing(tmp_path: Path) -> None:
    rig, call = forked_call(tmp_path)
    rig.feed(make_response(invite_to(rig, STATIC), 404, to_tag="ts"), STATIC)
    rig.feed(make_response(invite_to(rig, PHONE_A), 486, to_tag="ta"), PHONE_A)
    assert call.phase is CallPhase.TRANSFERRING and len(call.forks) == 1
    assert 486 not in rig.statuses()
    rig.answer(invite_to(rig, PHONE_B), PHONE_B, "tb")
    assert call.phase is CallPhase.BRIDGED and call.b is not None and call.b.addr == PHONE_B


@pytest.mark.parametrize(("responses", "relayed"), [
    ((404, 486, 408), 486),  # busy says most about the callee
    ((503, 404, 500), 404),  # a 4xx before a 5xx (the lowest class, §16.7 point 6)
    ((503, 503, 503), 500),  # a callee's 503 is not ours to say
    ((302, 500, 503), 500),  # no redirect from a device of ours
    ((480, 403, 404), 403),  # any other 4xx before the unavailable ones
])
def test_the_best_response_is_relayed_when_every_branch_fails(
        tmp_path: Path, responses: tuple[int, int, int], relayed: int) -> None:
    rig, call = forked_call(tmp_path)
    for addr, status in zip((STATIC, PHONE_A, PHONE_B), responses, strict=True):
        assert not call.ended
        rig.feed(make_response(invite_to(rig, addr), status, to_tag=f"t{addr[1]}"), addr)
    assert call.ended and call.end_code == relayed
    assert call.end_reason == f"TransferFailed({relayed})"
    assert rig.statuses()[-1] == relayed


def test_one_ring_timeout_covers_every_branch(tmp_path: Path) -> None:
    rig, call = forked_call(tmp_path)
    for addr in (STATIC, PHONE_A, PHONE_B):
        rig.answer(invite_to(rig, addr), addr, f"t{addr[1]}", ring_only=True)
    ring_s = rig.settings.sip.ring_timeout_ms / 1000
    rig.advance(ring_s - 0.01)
    assert not any(rig.requests("CANCEL", addr) for addr in (STATIC, PHONE_A, PHONE_B))
    rig.advance(0.02)
    assert all(len(rig.requests("CANCEL", addr)) == 1 for addr in (STATIC, PHONE_A, PHONE_B))
    assert call.ended and call.end_reason == "TransferFailed(408)"
    assert rig.statuses()[-1] == 408


def test_the_callers_cancel_cancels_every_branch(tmp_path: Path) -> None:
    rig, call = forked_call(tmp_path)
    for addr in (STATIC, PHONE_A, PHONE_B):
        rig.answer(invite_to(rig, addr), addr, f"t{addr[1]}", ring_only=True)
    rig.cancel_call()
    assert 487 in rig.statuses() and call.ended
    assert all(len(rig.requests("CANCEL", addr)) == 1 for addr in (STATIC, PHONE_A, PHONE_B))


def test_a_late_final_response_on_an_ended_call_is_absorbed_quietly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig, call = forked_call(tmp_path)
    for addr in (STATIC, PHONE_A, PHONE_B):
        rig.answer(invite_to(rig, addr), addr, f"t{addr[1]}", ring_only=True)
    rig.cancel_call()
    assert call.ended and call.end_reason == "Cancelled"
    with caplog.at_level(logging.INFO):
        rig.advance(20)  # the phones ring on a while, then reject
        rig.feed(make_response(invite_to(rig, STATIC), 487, to_tag="t6031"), STATIC)
        rig.feed(make_response(invite_to(rig, PHONE_A), 486, to_tag="t6032"), PHONE_A)
        rig.feed(make_response(invite_to(rig, PHONE_B), 603, to_tag="t6033"), PHONE_B)
    assert not [r for r in caplog.records if r.name.startswith("pbx")]
    assert call.end_reason == "Cancelled" and call.end_code == 487
    assert rig.requests("ACK", PHONE_B)  # the final responses are still ACKed


def test_a_phone_registered_at_its_static_contact_rings_once(tmp_path: Path) -> None:
    rig, call = forked_call(tmp_path, phones=(STATIC,))
    assert len(rig.requests("INVITE", STATIC)) == 1 and len(call.forks) == 1


def test_one_binding_is_a_plain_transfer(tmp_path: Path) -> None:
    """3002 (no static contact) registered once: one leg, `<call id>-b` as before."""
    rig, call = forked_call(tmp_path, phones=(PHONE_A,), user="3002")
    invite = invite_to(rig, PHONE_A)
    assert [leg.media_id for leg in call.forks] == [f"{call.call_id}-b"]
    rig.answer(invite, PHONE_A, "ta")
    assert call.phase is CallPhase.BRIDGED and call.b is not None
    assert call.b.phase is LegPhase.CONFIRMED and call.b.media_id == f"{call.call_id}-b"


def test_a_provider_transfer_forks_too(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.TransferCommand(target="3001")]), FORKED_USER)
    register(rig, "3001", PHONE_A)
    call = rig.call()
    rig.caller_request("ACK", 1)
    assert rig.requests("INVITE", STATIC) and rig.requests("INVITE", PHONE_A)
    rig.answer(invite_to(rig, STATIC), STATIC, "ts")
    assert call.phase is CallPhase.BRIDGED and rig.requests("CANCEL", PHONE_A) == []
    # Phone A never sent a 1xx: it is CANCELled once it does (RFC 3261 §9.1).
    rig.feed(make_response(invite_to(rig, PHONE_A), 180, to_tag="ta"), PHONE_A)
    assert len(rig.requests("CANCEL", PHONE_A)) == 1


def test_baresip_is_challenged_with_md5_alone(tmp_path: Path) -> None:
    """An INVITE from an extension (407): one MD5 challenge for libre, both else."""
    rig = CoreRig(tmp_path, extra=FORKED_USER)
    invite = (caller_invite("User-Agent: baresip v1.0.0 (x86_64/linux)\r\n")
              .replace(b"*99", b"3002").replace(b"sip:1001@", b"sip:3001@"))
    rig.feed(invite, CALLER)
    challenges = rig.responses()[-1].headers.get_all("Proxy-Authenticate")
    assert rig.statuses()[-1] == 407
    assert [parse_challenge(c).algorithm for c in challenges] == ["MD5"]
    rig.feed(caller_invite("", branch="2").replace(b"*99", b"3002")
             .replace(b"sip:1001@", b"sip:3001@"), CALLER)
    challenges = rig.responses()[-1].headers.get_all("Proxy-Authenticate")
    assert [parse_challenge(c).algorithm for c in challenges] == ["SHA-256", "MD5"]


QUEUE_OF_3001 = """
[queues.forked]
members = ["3001", "2002"]
strategy = "ring_all"
timeout_ms = 5000
"""


def queued_call(tmp_path: Path) -> tuple[CoreRig, Call]:
    rig = CoreRig(tmp_path, first_then([m.QueueCommand(target="forked")]),
                  FORKED_USER + QUEUE_OF_3001)
    register(rig, "3001", PHONE_A)
    call = rig.call()
    rig.caller_request("ACK", 1)
    return rig, call


def test_a_queue_member_rings_at_every_binding(tmp_path: Path) -> None:
    rig, call = queued_call(tmp_path)
    member_2002 = ("127.0.0.1", 6002)
    assert call.phase is CallPhase.QUEUED
    assert {leg.member for leg in call.ringing} == {"3001", "2002"} and len(call.ringing) == 3
    for addr in (STATIC, PHONE_A, member_2002):
        rig.answer(invite_to(rig, addr), addr, f"t{addr[1]}", ring_only=True)
    rig.answer(invite_to(rig, PHONE_A), PHONE_A, "ta")
    assert call.phase is CallPhase.BRIDGED and call.b is not None and call.b.addr == PHONE_A
    assert call.queue_member == "3001" and not call.ringing
    # The member's other phone and the other member are cancelled.
    assert rig.requests("CANCEL", STATIC) and rig.requests("CANCEL", member_2002)


def test_a_queue_member_fails_only_when_its_last_phone_does(tmp_path: Path) -> None:
    rig, call = queued_call(tmp_path)
    member_2002 = ("127.0.0.1", 6002)
    rig.feed(make_response(invite_to(rig, STATIC), 486, to_tag="ts"), STATIC)
    assert [leg.member for leg in call.ringing].count("3001") == 1
    rig.feed(make_response(invite_to(rig, member_2002), 486, to_tag="t2"), member_2002)
    assert call.phase is CallPhase.QUEUED  # 3001's registered phone still rings
    rig.answer(invite_to(rig, PHONE_A), PHONE_A, "ta")
    assert call.phase is CallPhase.BRIDGED and call.queue_member == "3001"


def test_credentials_of_another_extension_are_refused_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """3001's valid credentials on an INVITE whose From claims 3002: 403, one INFO line."""
    rig = CoreRig(tmp_path, extra=FORKED_USER)
    invite = (caller_invite("").replace(b"*99", b"3002").replace(b"sip:1001@", b"sip:3002@"))
    rig.feed(invite, CALLER)
    challenge = next(v for v in rig.responses()[-1].headers.get_all("Proxy-Authenticate")
                     if parse_challenge(v).algorithm == "MD5")
    credentials = client_authorization(challenge=challenge, username="3001",
                                       password="pw-3001", method="INVITE",
                                       uri="sip:3002@127.0.0.1:5060", cnonce="cn", nc=1)
    with caplog.at_level(logging.INFO, logger="pbx.auth"):
        rig.feed(caller_invite(f"Proxy-Authorization: {credentials}\r\n", branch="2")
                 .replace(b"*99", b"3002").replace(b"sip:1001@", b"sip:3002@"), CALLER)
    assert rig.statuses()[-1] == 403
    [record] = caplog.records
    assert "'3001'" in record.getMessage() and "'3002'" in record.getMessage()
    assert "127.0.0.1:5999" in record.getMessage()


def test_a_branch_whose_host_is_not_found_fails_alone(tmp_path: Path) -> None:
    """3003's static contact names a host that does not resolve: its branch fails (404,
    remembered with its own reason) while the registered phone rings on; when that one
    is busy too, the caller gets 486, the more telling of the two."""
    from tests.calls.test_state import round_trip

    rig = CoreRig(tmp_path, extra=TRUSTED_CALLER + FORKED_USER
                  + '\n[users."3003"]\npassword = "pw-3003"\n'
                    'contact = "sip:3003@phone.invalid:5060"\n')
    register(rig, "3003", PHONE_A)
    call = rig.call(caller_invite("").replace(b"*99", b"3003"))
    [resolve] = rig.resolves
    assert resolve.host == "phone.invalid" and len(call.forks) == 2
    rig.core.host_resolved(resolve.dialog_key, None, rig.now)
    rig.pump()
    assert not call.ended and len(call.forks) == 1
    assert (call.fork_status, call.fork_reason) == (404, "TransferFailed(3003)")
    round_trip(rig, call)
    rig.feed(make_response(invite_to(rig, PHONE_A), 486, to_tag="ta"), PHONE_A)
    assert call.ended and call.end_code == 486 and rig.statuses()[-1] == 486

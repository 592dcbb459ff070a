"""RTP ports without a round trip: the core answers an INVITE from the media workers'
announced pools within the one entry point, and ends the calls whose port the worker
refuses, never confirms, or loses with its death."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbx import messages as m
from pbx.calls.media import MEDIA_ALLOCATE_TIMEOUT_S
from pbx.sip import sdp
from tests.calls.rig import CALLER, PLAY, TRUSTED_CALLER, CoreRig, caller_invite, first_then

EARLY_ROUTE = """
[[routes]]
name = "early"
to_user = "*98"
app = "ivr"
answer = "early_media"
app_params = { mode = "step", url = "http://127.0.0.1:1/ivr" }
"""


def another_call(n: int) -> bytes:
    return caller_invite().replace(b"caller-call@", f"caller-{n}@".encode()).replace(
        b"branch=z9hG4bK-caller-1", f"branch=z9hG4bK-caller-{n}".encode())


def finals(rig: CoreRig) -> list[int]:
    return [status for status in rig.statuses() if status >= 200]


def test_invite_is_answered_within_the_entry_point(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path)
    rig.auto_allocate = False  # nothing from the worker before the 200
    first = rig.worker.pool[0]
    rig.call()
    (ok,) = [r for r in rig.responses() if r.status == 200]
    answer = sdp.parse_answer(ok.body)
    assert (answer.remote_ip, answer.remote_port) == ("127.0.0.1", first)
    # One message to the worker: the port, and where the caller's RTP goes (the offer).
    (allocate,) = [msg for msg in rig.media if not isinstance(msg, m.MediaRemote)]
    remote = allocate.remote
    assert allocate == m.MediaAllocate(call_id=allocate.call_id, rtp_port=first, seq=1,
                                       inband_dtmf=allocate.inband_dtmf, remote=remote)
    assert isinstance(remote, m.MediaRemote) and remote.call_id == allocate.call_id
    assert (remote.remote_ip, remote.remote_port, remote.codec) == ("127.0.0.1", 40000, "PCMU")
    assert rig.ivr  # the IVR session started too
    pool = rig.core.ctx.media_workers.pool(b"w")
    assert pool is not None and list(pool.unconfirmed) == [first]
    rig.allocate(allocate)  # the worker then announces its pool: that confirms the port
    assert not pool.unconfirmed
    rig.advance(MEDIA_ALLOCATE_TIMEOUT_S + 1)
    assert not rig.requests("BYE", CALLER)  # no allocation deadline left to fire


def test_early_media_route_gets_its_183_within_the_entry_point(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, extra=EARLY_ROUTE)
    rig.auto_allocate = False
    rig.feed(caller_invite().replace(b"*99", b"*98"), CALLER)
    assert rig.statuses() == [183]
    port = rig.of(m.MediaAllocate)[0].rtp_port
    assert f"m=audio {port} ".encode() in rig.responses()[0].body


def test_no_free_port_anywhere_is_503_with_retry_after(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path)
    rig.core.media_message(b"w", m.MediaPorts(ports=[], allocate_seq=0), rig.now)
    rig.feed(caller_invite(), CALLER)
    final = rig.responses()[-1]
    assert final.status == 503 and final.reason == "No Media Worker"
    assert final.headers.get("Retry-After") == "5"
    assert not rig.of(m.MediaAllocate)


def test_two_invites_never_share_the_last_port(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path)
    rig.auto_allocate = False  # the worker's answers have not come yet
    rig.worker.pool[1:] = []
    rig.core.media_message(b"w", rig.worker.ports(), rig.now)
    rig.call()
    rig.feed(another_call(2), CALLER)
    # The stale list (sent before the worker took the port) arrives in between too.
    rig.core.media_message(b"w", m.MediaPorts(ports=[30000], allocate_seq=0), rig.now)
    rig.feed(another_call(3), CALLER)
    assert finals(rig) == [200, 503, 503]
    assert [a.rtp_port for a in rig.of(m.MediaAllocate)] == [30000]


def test_refused_allocation_ends_the_call(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    rig = CoreRig(tmp_path)
    rig.worker.pool.clear()  # it no longer has what it announced: it refuses
    rig.feed(caller_invite(), CALLER)
    assert finals(rig) == [200]
    rig.caller_request("ACK", 1)  # (our BYE waits for it: RFC 3261 §15)
    bye = rig.requests("BYE", CALLER)
    assert bye and "cause=503" in (bye[0].headers.get("Reason") or "")
    assert rig.core.ctx.stats["media_allocations_failed"] == 1
    assert not rig.core.ctx.table.calls and not rig.core.ctx.table.legs_by_media
    assert not rig.of(m.MediaRelease)  # the worker holds nothing for the leg
    assert "refused port 30000" in caplog.text and "ending the call" in caplog.text


def test_allocation_that_never_reached_the_worker_ends_its_call_not_the_next(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """MediaAllocate 1 is lost on its way (a reconnect), 2 is handled: the worker's
    announcement (allocate_seq 2) names 1 as refused, so it does not confirm it."""
    rig = CoreRig(tmp_path)
    rig.auto_allocate = False
    rig.call()
    rig.feed(another_call(2), CALLER)
    assert finals(rig) == [200, 200]
    first, second = rig.of(m.MediaAllocate)
    assert (first.seq, second.seq) == (1, 2)
    rig.caller_request("ACK", 1)  # (our BYE waits for it: RFC 3261 §15)
    rig.allocate(second)  # the worker got only this one
    rig.pump()
    assert rig.worker.ports().refused == [(1, 1)]
    bye = rig.requests("BYE", CALLER)
    assert len({b.call_id for b in bye}) == 1 and bye[0].call_id == "caller-call@127.0.0.1"
    assert "cause=503" in (bye[0].headers.get("Reason") or "")
    assert rig.core.ctx.stats["media_allocations_failed"] == 1
    assert list(rig.core.ctx.table.legs_by_media) == [second.call_id]
    assert not [msg for msg in rig.of(m.MediaRelease) if msg.call_id == first.call_id]
    assert "as refused or never received" in caplog.text
    # Its deadline went with it, and the second call's was met: nothing more ends.
    rig.advance(MEDIA_ALLOCATE_TIMEOUT_S + 1)
    assert rig.core.ctx.stats["media_allocations_failed"] == 1
    assert len({b.call_id for b in rig.requests("BYE", CALLER)}) == 1


def test_dead_worker_ends_its_calls_and_its_pool_is_forgotten(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path)
    rig.call()
    rig.caller_request("ACK", 1)  # (our BYE waits for it: RFC 3261 §15)
    assert rig.core.snapshot()["media_ports_free"] == len(rig.worker.pool)
    rig.alive = False
    rig.advance(rig.settings.media.expiry_ms / 1000 + 0.5)
    byes = rig.requests("BYE", CALLER)  # one BYE (and its UDP retransmissions)
    assert len({bye.cseq for bye in byes}) == 1
    assert "cause=503" in (byes[0].headers.get("Reason") or "")
    assert rig.core.ctx.media_workers.pool(b"w") is None
    assert rig.core.snapshot()["media_ports_free"] == 0
    rig.feed(another_call(2), CALLER)
    assert rig.responses()[-1].status == 503


def test_shared_mode_hands_out_the_worker_s_shared_port_to_every_leg(tmp_path: Path) -> None:
    """[media] rtp_socket = "shared": every call's leg gets the worker's announced shared
    port at once (no pooled port taken), within the worker's capacity; the worker's
    confirmations are taken leg by leg."""
    rig = CoreRig(tmp_path, extra='\n[media]\nrtp_socket = "shared"\n')
    rig.auto_allocate = False
    pool_before = list(rig.worker.pool)
    rig.core.media_message(b"w", m.MediaPorts(ports=pool_before, allocate_seq=0,
                                              shared_port=31000), rig.now)  # fmt: skip
    rig.call()
    rig.feed(another_call(2), CALLER)
    assert finals(rig) == [200, 200]
    allocs = rig.of(m.MediaAllocate)
    assert [a.rtp_port for a in allocs] == [31000, 31000]
    for ok in [r for r in rig.responses() if r.status == 200]:
        assert sdp.parse_answer(ok.body).remote_port == 31000
    pool = rig.core.ctx.media_workers.pool(b"w")
    assert pool is not None and pool.free_ports() == pool_before  # no pooled port taken
    for a in allocs:
        rig.core.media_message(b"w", m.MediaAllocated(call_id=a.call_id, rtp_ip="127.0.0.1",
                                                      rtp_port=31000), rig.now)  # fmt: skip
    assert not pool.shared_unconfirmed and len(pool.shared_in_use) == 2
    rig.advance(MEDIA_ALLOCATE_TIMEOUT_S + 1)
    assert not rig.requests("BYE", CALLER)  # confirmed: nothing ends


def test_anonymous_caller_on_the_shared_port_cannot_point_its_rtp_elsewhere(
        tmp_path: Path) -> None:
    """On the shared port an SDP address claims the packets that come from it
    (workers.demux): an anonymous caller's new offer naming another address than its own
    gets 488 and the worker is not told; the ACK's answer to our offer likewise is
    ignored. The caller's own address (another port) and hold (c=0.0.0.0) are fine."""
    rig = CoreRig(tmp_path, first_then(PLAY), extra='\n[media]\nrtp_socket = "shared"\n')
    rig.auto_allocate = False
    rig.core.media_message(b"w", m.MediaPorts(ports=list(rig.worker.pool), allocate_seq=0,
                                              shared_port=31000), rig.now)  # fmt: skip
    rig.call()
    alloc = rig.of(m.MediaAllocate)[-1]
    assert alloc.rtp_port == 31000
    rig.core.media_message(b"w", m.MediaAllocated(call_id=alloc.call_id, rtp_ip="127.0.0.1",
                                                  rtp_port=31000), rig.now)  # fmt: skip
    remotes = len(rig.of(m.MediaRemote))
    victim = sdp_offer("198.51.100.9", 7000)
    rig.caller_request("INVITE", 2, body=victim)
    assert rig.last(2).status == 488
    assert len(rig.of(m.MediaRemote)) == remotes
    rig.caller_request("INVITE", 3, body=sdp_offer("127.0.0.1", 7002))  # its own address
    assert rig.last(3).status == 200 and rig.of(m.MediaRemote)[-1].remote_port == 7002
    rig.caller_request("ACK", 3)
    rig.caller_request("INVITE", 4)  # offerless: the ACK answers
    assert rig.last(4).status == 200
    remotes = len(rig.of(m.MediaRemote))
    rig.caller_request("ACK", 4, body=victim)
    assert len(rig.of(m.MediaRemote)) == remotes


def test_trusted_source_on_the_shared_port_may_name_its_media_address(
        tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then(PLAY),
                  extra='\n[media]\nrtp_socket = "shared"\n' + TRUSTED_CALLER)
    rig.auto_allocate = False
    rig.core.media_message(b"w", m.MediaPorts(ports=list(rig.worker.pool), allocate_seq=0,
                                              shared_port=31000), rig.now)  # fmt: skip
    rig.call()
    alloc = rig.of(m.MediaAllocate)[-1]
    rig.core.media_message(b"w", m.MediaAllocated(call_id=alloc.call_id, rtp_ip="127.0.0.1",
                                                  rtp_port=31000), rig.now)  # fmt: skip
    rig.caller_request("INVITE", 2, body=sdp_offer("198.51.100.9", 7000))  # an SBC's media
    assert rig.last(2).status == 200
    assert rig.of(m.MediaRemote)[-1].remote_ip == "198.51.100.9"


def sdp_offer(ip: str, port: int) -> bytes:
    return (f"v=0\r\no=- 1 2 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n").encode()

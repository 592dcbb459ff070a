"""What the call core believes from the planes (DESIGN §6): replies only from the
executor an event went to, RTP addresses only as the worker declared them; and the
media workers' strict-latching counts added up for /metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from pbx import messages as m
from tests.calls.rig import CALLER, MEMBERS, CoreRig, caller_invite, reply
from tests.fake_media_worker import FakeMediaWorker

ROGUE_ADDRESS = "198.51.100.7"


def held_rig(tmp: Path) -> CoreRig:
    """Executor `e` gets the events but the test decides what it answers."""
    rig = CoreRig(tmp)
    rig.executors[b"e"].answer = lambda event: None
    return rig


def final_status(rig: CoreRig) -> int | None:
    finals = [r for r in rig.responses(CALLER) if r.status >= 200]
    return finals[0].status if finals else None


def test_reply_from_another_identity_is_ignored_and_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rig = held_rig(tmp_path)
    rig.call()
    event = rig.ivr[0]
    assert rig.executors[b"e"].received == [event]
    # A rogue that joined as an executor answers the event in flight.
    rig.add_executor(b"rogue", answer=lambda event: None)
    rig.reply(b"rogue", reply(event, m.TransferCommand(target="2002")))
    rig.advance(0.05)
    assert not rig.requests("INVITE", MEMBERS["2002"])
    assert rig.core.ctx.stats["ivr_replies_rejected"] == 1
    session = rig.core.ctx.table.sessions[event.session_id]
    assert session.in_flight == event and session.executor == b"e"
    # The executor the event went to is still heard.
    rig.reply(b"e", reply(event, m.TransferCommand(target="2001")))
    assert rig.requests("INVITE", MEMBERS["2001"])
    assert rig.core.ctx.stats["ivr_replies_rejected"] == 1
    assert "reply seq 1 from b'rogue', but the event went to b'e': ignored" in caplog.text


def test_rejection_log_line_is_bounded(tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    rig = held_rig(tmp_path)
    rig.call()
    event = rig.ivr[0]
    huge = b"r" * 255  # the longest ZeroMQ identity
    rig.core.ivr_message(huge, m.IvrReady(executor_id="x" * 5000, capacity=1), rig.now)
    rig.reply(huge, reply(event))
    assert rig.core.ctx.stats["ivr_replies_rejected"] == 1
    line = next(r.getMessage() for r in caplog.records if "ignored" in r.getMessage())
    assert len(line) < 300


def test_allocation_at_another_address_ends_the_call(tmp_path: Path) -> None:
    """The SDP answer carries the address the worker declared, never its reply's."""
    rig = CoreRig(tmp_path)
    rig.worker.allocated_ip = ROGUE_ADDRESS  # the worker declared 127.0.0.1
    rig.feed(caller_invite(), CALLER)
    assert final_status(rig) == 200
    rig.caller_request("ACK", 1)  # (our BYE waits for it: RFC 3261 §15)
    bye = rig.requests("BYE", CALLER)
    assert bye and "cause=503" in (bye[0].headers.get("Reason") or "")
    assert all(ROGUE_ADDRESS.encode() not in r.body for r in rig.responses(CALLER))
    assert rig.core.ctx.stats["media_allocations_rejected"] == 1
    # The port the worker opened is given back.
    assert [r.call_id for r in rig.of(m.MediaRelease)] == [
        a.call_id for a in rig.of(m.MediaAllocate)]
    assert not rig.core.ctx.table.legs_by_media


def test_allocation_answered_by_another_worker_is_ignored(tmp_path: Path) -> None:
    """Only the worker asked answers for a leg: another one can neither confirm it nor
    end its call."""
    rig = CoreRig(tmp_path)
    rig.auto_allocate = False
    other = FakeMediaWorker(rig._from_worker, b"other", capacity=0, first_port=31000)
    rig.core.media_message(b"other", other.heartbeat(), rig.now)  # full: not chosen
    rig.call()
    assert final_status(rig) == 200
    leg = next(iter(rig.core.ctx.table.legs_by_media.values()))
    assert leg.media.worker == b"w"
    for error in (None, "refused"):  # before `w`'s own answer arrives
        rig.core.media_message(b"other", m.MediaAllocated(
            call_id=leg.media_id, rtp_ip="127.0.0.1", rtp_port=leg.media.rtp_port,
            error=error), rig.now)
    rig.pump()
    assert rig.core.ctx.stats["media_allocations_rejected"] == 2
    rig.allocate(rig.of(m.MediaAllocate)[0])  # `w` confirms
    rig.pump()
    pool = rig.core.ctx.media_workers.pool(b"w")
    assert pool is not None and not pool.unconfirmed
    rig.advance(5)  # past the confirmation deadline: nothing ends
    assert not rig.requests("BYE", CALLER) and leg.call.call_id in rig.core.ctx.table.calls
    ok = [r for r in rig.responses(CALLER) if r.status == 200][0]
    assert b"c=IN IP4 127.0.0.1" in ok.body
    assert f"m=audio {leg.media.rtp_port} ".encode() in ok.body


def test_worker_declaring_a_refused_address_is_not_used(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path)
    workers = rig.core.ctx.media_workers
    workers.remove(b"w")  # a front that has not heard of `w` yet
    rogue = FakeMediaWorker(rig._from_worker, rtp_ip=ROGUE_ADDRESS)
    rogue.join()
    rig.core.media_message(b"w", rogue.heartbeat(), rig.now)
    assert b"w" not in workers
    assert rig.core.ctx.stats["media_workers_rejected"] == 2
    rig.feed(caller_invite(), CALLER)
    assert final_status(rig) == 503
    assert not rig.of(m.MediaAllocate)


def test_worker_changing_its_address_is_refused(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path)
    rig.settings.media.worker_rtp_ips = ["10.0.0.0/24"]
    workers = rig.core.ctx.media_workers
    rig.core.media_message(b"w2", m.MediaReady(worker_id="w2", capacity=10,
                                               rtp_ip="10.0.0.5"), rig.now)
    assert workers.address_of(b"w2") == "10.0.0.5"
    changed = FakeMediaWorker(rig._from_worker, b"w2", rtp_ip="10.0.0.6")
    rig.core.media_message(b"w2", changed.heartbeat(), rig.now)
    assert workers.pool(b"w2") is None  # nor its ports
    assert rig.core.ctx.stats["media_workers_rejected"] == 1
    assert workers.address_of(b"w2") == "10.0.0.5"
    rig.core.media_message(b"w3", m.MediaReady(worker_id="w3", capacity=10,
                                               rtp_ip="10.0.1.5"), rig.now)
    assert b"w3" not in workers
    assert rig.core.ctx.stats["media_workers_rejected"] == 2


def test_worker_learnt_from_heartbeat_after_front_restart(tmp_path: Path) -> None:
    """A restarted front hears only heartbeats: they carry the address and the pool
    too, and the front numbers its allocations on from the worker's last one."""
    rig = CoreRig(tmp_path)
    rig.core.ctx.media_workers.remove(b"w")
    rig.worker.seq = 41  # allocations the old front made
    rig.core.media_message(b"w", rig.worker.heartbeat(), rig.now)
    rig.call()
    assert final_status(rig) == 200
    assert [a.seq for a in rig.of(m.MediaAllocate)] == [42]
    assert rig.worker.legs
    assert rig.core.ctx.stats["media_allocations_rejected"] == 0


def test_heartbeat_foreign_counts_add_up_in_the_snapshot(tmp_path: Path) -> None:
    """Strict RTP latching: the packets from strangers each worker dropped since its last
    heartbeat, added up over workers and heartbeats."""
    rig = CoreRig(tmp_path)  # its worker `w` said ready
    assert rig.core.snapshot()["rtp_foreign_dropped"] == 0
    for worker, rtp, rtcp, presses in ((b"w", 5, 0, 0), (b"w2", 7, 2, 30), (b"w", 0, 1, 4)):
        rig.core.media_message(worker, m.MediaHeartbeat(
            worker_id=worker.decode(), calls=1, capacity=10, rtp_ip="127.0.0.1",
            ports=[], allocate_seq=0, rtp_foreign_dropped=rtp,
            rtcp_foreign_dropped=rtcp, dtmf_flood_dropped=presses), rig.now)  # fmt: skip
    snap = rig.core.snapshot()
    assert snap["rtp_foreign_dropped"] == 12 and snap["rtcp_foreign_dropped"] == 3
    assert snap["dtmf_flood_dropped"] == 34  # key presses past a leg's 20 a second
    assert snap["media_workers"] == 2

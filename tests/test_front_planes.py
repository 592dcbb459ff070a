"""What the front believes from the planes (DESIGN §6), without sockets: replies only from
the executor an event went to, RTP addresses only as the worker declared them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pbx import messages as m
from tests.fake_media_worker import FakeMediaWorker
from tests.test_front_queue import CALLER, MEMBERS, Rig, until

ROGUE_ADDRESS = "198.51.100.7"


class HeldRig(Rig):
    """Executor `e` gets the events but the test decides what it answers."""

    def _send_ivr(self, executor: bytes, event: m.IvrEvent) -> bool:
        self.ivr_events.append(event)
        self.sent_to = executor
        return True


def reply(event: m.IvrEvent, *commands: Any) -> m.IvrReply:
    return m.IvrReply(session_id=event.session_id, seq=event.seq, state={"s": 1},
                      commands=list(commands))


def test_reply_from_another_identity_is_ignored_and_counted(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    async def main() -> None:
        rig = HeldRig(tmp_path, lambda event: [])
        rig.call()
        event = await until(lambda: rig.ivr_events and rig.ivr_events[0])
        assert rig.sent_to == b"e"
        # A rogue that joined as an executor answers the event in flight.
        rig.front.on_ivr_message(b"rogue", m.IvrReady(executor_id="rogue", capacity=10))
        rig.front.on_ivr_message(b"rogue", reply(event, m.TransferCommand(target="2002")))
        await asyncio.sleep(0.05)
        assert not rig.requests("INVITE", MEMBERS["2002"])
        assert rig.front.stats["ivr_replies_rejected"] == 1
        session = rig.front.sessions[event.session_id]
        assert session.in_flight == event and session.executor == b"e"
        # The executor the event went to is still heard.
        rig.front.on_ivr_message(b"e", reply(event, m.TransferCommand(target="2001")))
        await until(lambda: rig.requests("INVITE", MEMBERS["2001"]))
        assert rig.front.stats["ivr_replies_rejected"] == 1

    asyncio.run(main())
    assert "reply seq 1 from b'rogue', but the event went to b'e': ignored" in caplog.text


def test_rejection_log_line_is_bounded(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                       ) -> None:
    async def main() -> None:
        rig = HeldRig(tmp_path, lambda event: [])
        rig.call()
        event = await until(lambda: rig.ivr_events and rig.ivr_events[0])
        huge = b"r" * 255  # the longest ZeroMQ identity
        rig.front.on_ivr_message(huge, m.IvrReady(executor_id="x" * 5000, capacity=1))
        rig.front.on_ivr_message(huge, reply(event))
        assert rig.front.stats["ivr_replies_rejected"] == 1

    asyncio.run(main())
    line = next(r.getMessage() for r in caplog.records if "ignored" in r.getMessage())
    assert len(line) < 300


def final_status(rig: Rig) -> int | None:
    finals = [r for r in rig.responses(CALLER) if r.status >= 200]
    return finals[0].status if finals else None


def test_allocation_at_another_address_ends_the_call(tmp_path: Path) -> None:
    """The SDP answer carries the address the worker declared, never its reply's."""
    async def main() -> None:
        rig = Rig(tmp_path, lambda event: [])
        rig.worker.allocated_ip = ROGUE_ADDRESS  # declared 127.0.0.1, allocates elsewhere
        rig.call()
        assert final_status(rig) == 200
        bye = await until(lambda: rig.requests("BYE", CALLER))
        assert "cause=503" in (bye[0].headers.get("Reason") or "")
        assert all(ROGUE_ADDRESS.encode() not in r.body for r in rig.responses(CALLER))
        assert rig.front.stats["media_allocations_rejected"] == 1
        # The port the worker opened is given back.
        assert [r.call_id for r in rig.of(m.MediaRelease)] == [
            a.call_id for a in rig.of(m.MediaAllocate)]
        assert not rig.front.legs_by_media

    asyncio.run(main())


def test_allocation_answered_by_another_worker_is_ignored(tmp_path: Path) -> None:
    """Only the worker asked answers for a leg: another one can neither confirm it nor
    end its call."""
    async def main() -> None:
        rig = Rig(tmp_path, lambda event: [])
        rig.front.on_media_message(b"other", FakeMediaWorker(
            rig.front, b"other", capacity=0, first_port=31000).heartbeat())  # full: not chosen
        rig.call()
        assert final_status(rig) == 200
        leg = next(iter(rig.front.legs_by_media.values()))
        assert leg.worker == b"w"
        for error in (None, "refused"):  # before `w`'s own answer arrives
            rig.front.on_media_message(b"other", m.MediaAllocated(
                call_id=leg.media_id, rtp_ip="127.0.0.1", rtp_port=leg.rtp_port,
                error=error))
        assert rig.front.stats["media_allocations_rejected"] == 2
        await until(lambda: not rig.front.media_workers.pool(b"w").unconfirmed)  # type: ignore[union-attr]
        assert not rig.requests("BYE", CALLER) and leg.call.call_id in rig.front.calls
        ok = [r for r in rig.responses(CALLER) if r.status == 200][0]
        assert b"c=IN IP4 127.0.0.1" in ok.body and f"m=audio {leg.rtp_port} ".encode() in ok.body

    asyncio.run(main())


def test_worker_declaring_a_refused_address_is_not_used(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, lambda event: [])
        rig.front.media_workers.remove(b"w")
        rogue = FakeMediaWorker(rig.front, rtp_ip=ROGUE_ADDRESS)
        rogue.join()
        rig.front.on_media_message(b"w", rogue.heartbeat())
        assert b"w" not in rig.front.media_workers
        assert rig.front.stats["media_workers_rejected"] == 2
        rig.call()
        assert final_status(rig) == 503
        assert not rig.of(m.MediaAllocate)

    asyncio.run(main())


def test_worker_changing_its_address_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, lambda event: [])
        settings = rig.front.settings.media
        settings.worker_rtp_ips = ["10.0.0.0/24"]
        rig.front.on_media_message(b"w2", m.MediaReady(worker_id="w2", capacity=10,
                                                       rtp_ip="10.0.0.5"))
        assert rig.front.media_workers.address_of(b"w2") == "10.0.0.5"
        changed = FakeMediaWorker(rig.front, b"w2", rtp_ip="10.0.0.6")
        rig.front.on_media_message(b"w2", changed.heartbeat())
        assert rig.front.media_workers.pool(b"w2") is None  # nor its ports
        assert rig.front.stats["media_workers_rejected"] == 1
        assert rig.front.media_workers.address_of(b"w2") == "10.0.0.5"
        rig.front.on_media_message(b"w3", m.MediaReady(worker_id="w3", capacity=10,
                                                       rtp_ip="10.0.1.5"))
        assert b"w3" not in rig.front.media_workers
        assert rig.front.stats["media_workers_rejected"] == 2

    asyncio.run(main())


def test_worker_learnt_from_heartbeat_after_front_restart(tmp_path: Path) -> None:
    """A restarted front hears only heartbeats: they carry the address and the pool
    too, and the front numbers its allocations on from the worker's last one."""
    async def main() -> None:
        rig = Rig(tmp_path, lambda event: [])
        rig.front.media_workers.remove(b"w")
        rig.worker.seq = 41  # allocations the old front made
        rig.front.on_media_message(b"w", rig.worker.heartbeat())
        rig.call()
        assert final_status(rig) == 200
        assert [a.seq for a in rig.of(m.MediaAllocate)] == [42]
        await until(lambda: rig.worker.legs)
        assert rig.front.stats["media_allocations_rejected"] == 0

    asyncio.run(main())

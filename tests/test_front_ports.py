"""RTP ports without a round trip: the front answers an INVITE from the media workers'
announced pools within the one `message_received` call, and ends the calls whose port
the worker refuses, never confirms, or loses with its death."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pbx import messages as m
from pbx.front import MEDIA_ALLOCATE_TIMEOUT_S
from pbx.sip import sdp
from pbx.sip.message import SipResponse
from tests.test_front_queue import CALLER, Rig, caller_invite, until

EARLY_ROUTE = """
[[routes]]
name = "early"
to_user = "*98"
app = "ivr"
answer = "early_media"
app_params = { mode = "step", url = "http://127.0.0.1:1/ivr" }
"""


def responses(rig: Rig) -> list[SipResponse]:
    return rig.responses(CALLER)


async def settled(rig: Rig) -> None:
    """The worker's answers so far have reached the front (confirmations, its list)."""
    pool = rig.front.media_workers.pool(b"w")
    assert pool is not None
    await until(lambda: pool.allocate_seq == rig.worker.seq and not pool.unconfirmed)


class SilentWorkerRig(Rig):
    """Its worker announced a pool but never answers an allocation."""

    def _send_media(self, worker: bytes, msg: Any) -> bool:
        self.media.append(msg)
        return True


def test_invite_is_answered_within_message_received(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, lambda event: [])
        first = rig.worker.pool[0]
        rig.call()  # no await from here on: nothing else runs meanwhile
        (ok,) = [r for r in responses(rig) if r.status == 200]
        answer = sdp.parse_answer(ok.body)
        assert (answer.remote_ip, answer.remote_port) == ("127.0.0.1", first)
        allocate, remote = rig.media[:2]
        assert allocate == m.MediaAllocate(call_id=allocate.call_id, rtp_port=first, seq=1,
                                           inband_dtmf=allocate.inband_dtmf)
        assert isinstance(remote, m.MediaRemote) and remote.call_id == allocate.call_id
        assert rig.ivr_events  # the IVR session started too
        await settled(rig)  # the worker then confirms
        assert not rig.requests("BYE", CALLER)

    asyncio.run(main())


def test_early_media_route_gets_its_183_within_message_received(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, lambda event: [], EARLY_ROUTE)
        rig.front.message_received(caller_invite().replace(b"*99", b"*98"), CALLER)
        assert [r.status for r in responses(rig)] == [100, 183]
        assert f"m=audio {rig.of(m.MediaAllocate)[0].rtp_port} ".encode() in responses(rig)[1].body

    asyncio.run(main())


def test_no_free_port_anywhere_is_503_with_retry_after(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, lambda event: [])
        rig.front.on_media_message(b"w", m.MediaPorts(ports=[], allocate_seq=0))
        rig.call()
        final = responses(rig)[-1]
        assert final.status == 503 and final.reason == "No Media Worker"
        assert final.headers.get("Retry-After") == "5"
        assert not rig.of(m.MediaAllocate)

    asyncio.run(main())


def test_two_invites_in_one_turn_never_share_the_last_port(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, lambda event: [])
        rig.worker.pool[1:] = []
        rig.front.on_media_message(b"w", rig.worker.ports())
        rig.call()
        second = caller_invite().replace(b"caller-call@", b"caller-two@").replace(
            b"branch=z9hG4bK-caller-1", b"branch=z9hG4bK-caller-2")
        rig.front.message_received(second, CALLER)
        # The stale list (sent before the worker took the port) arrives in between too.
        rig.front.on_media_message(b"w", m.MediaPorts(ports=[30000], allocate_seq=0))
        third = second.replace(b"caller-two@", b"caller-three@").replace(
            b"z9hG4bK-caller-2", b"z9hG4bK-caller-3")
        rig.front.message_received(third, CALLER)
        assert [r.status for r in responses(rig) if r.status >= 200] == [200, 503, 503]
        assert [a.rtp_port for a in rig.of(m.MediaAllocate)] == [30000]

    asyncio.run(main())


def test_refused_allocation_ends_the_call(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, lambda event: [])
        rig.worker.pool.clear()  # it no longer has what it announced: it refuses
        rig.call()
        assert [r.status for r in responses(rig) if r.status >= 200] == [200]
        bye = await until(lambda: rig.requests("BYE", CALLER))
        assert "cause=503" in (bye[0].headers.get("Reason") or "")
        assert rig.front.stats["media_allocations_failed"] == 1
        assert not rig.front.calls and not rig.front.legs_by_media
        assert not rig.of(m.MediaRelease)  # the worker holds nothing for the leg

    asyncio.run(main())
    assert "refused port 30000" in caplog.text and "ending the call" in caplog.text


def test_unconfirmed_allocation_ends_the_call(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        rig = SilentWorkerRig(tmp_path, lambda event: [])
        rig.call()
        assert [r.status for r in responses(rig) if r.status >= 200] == [200]
        start = rig.front.now()
        for late in (MEDIA_ALLOCATE_TIMEOUT_S - 0.1, MEDIA_ALLOCATE_TIMEOUT_S + 0.1):
            monkeypatch.setattr(rig.front, "now", lambda late=late: start + late)
            rig.front.on_media_message(b"w", rig.worker.heartbeat())  # alive all along
            rig.front.expire_workers()
            if late < MEDIA_ALLOCATE_TIMEOUT_S:
                assert rig.front.calls and not rig.requests("BYE", CALLER)
        (bye,) = rig.requests("BYE", CALLER)
        assert "cause=503" in (bye.headers.get("Reason") or "")
        assert rig.front.stats["media_allocations_failed"] == 1
        assert not rig.front.calls

    asyncio.run(main())


def test_dead_worker_ends_its_calls_and_its_pool_is_forgotten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, lambda event: [])
        rig.call()
        await settled(rig)
        assert rig.front.snapshot()["media_ports_free"] == len(rig.worker.pool)
        later = rig.front.now() + 10.0
        monkeypatch.setattr(rig.front, "now", lambda: later)
        rig.front.expire_workers()
        (bye,) = rig.requests("BYE", CALLER)
        assert "cause=503" in (bye.headers.get("Reason") or "")
        assert rig.front.media_workers.pool(b"w") is None
        assert rig.front.snapshot()["media_ports_free"] == 0
        second = caller_invite().replace(b"caller-call@", b"caller-two@").replace(
            b"branch=z9hG4bK-caller-1", b"branch=z9hG4bK-caller-2")
        rig.front.message_received(second, CALLER)
        assert responses(rig)[-1].status == 503

    asyncio.run(main())

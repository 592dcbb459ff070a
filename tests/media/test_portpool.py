"""The media worker's pool of pre-bound RTP/RTCP pairs (workers.portpool) and how the
worker uses it: allocations take the pair the front named, refills come after, and
the free list is announced once per tick however many allocations there were."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from pbx.config import parse_config
from pbx.messages import (
    MAX_REFUSED_RANGES,
    MediaAllocate,
    MediaAllocated,
    MediaPorts,
    MediaRelease,
    MediaReleased,
    MediaRemote,
)
from workers.media import MediaWorker
from workers.portpool import (
    REFUSED_KEEP_S,
    Pair,
    RefusedSeqs,
    RtpPortPool,
    bind_rtp_pair,
    pairs_in_range,
)

# Above the kernel's ephemeral range (32768-60999), and not the other worker tests'.
LOW = 64000 + 2 * (os.getpid() % 300)
HIGH = LOW + 19  # 10 pairs


class Binder:
    """Pairs of real sockets on the ports handed to it, in order; None when out."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.calls = 0

    def __call__(self, ip: str, low: int, high: int) -> Pair | None:
        self.calls += 1
        if not self.ports:
            return None
        return bind_rtp_pair(ip, self.ports[0], self.ports.pop(0) + 1)


def closed(sock: socket.socket) -> bool:
    return sock.fileno() == -1


def test_pairs_in_range_counts_as_the_binder() -> None:
    assert pairs_in_range(20000, 29999) == 5000
    assert pairs_in_range(20001, 20003) == 1  # 20002/20003
    assert pairs_in_range(20000, 20000) == 0  # no room for RTCP


def test_fill_is_bounded_by_size_room_and_binds_per_call() -> None:
    pool = RtpPortPool("127.0.0.1", LOW, HIGH, size=4)
    try:
        assert pool.fill(room=100, max_binds=3) is True  # one more wanted
        assert len(pool) == 3 and pool.changed
        assert pool.fill(room=100, max_binds=3) is False
        assert len(pool) == 4
        for port in pool.ports():
            assert port % 2 == 0 and LOW <= port < HIGH
            rtp, rtcp = pool.pairs[port]
            assert rtp.getsockname()[1] == port and rtcp.getsockname()[1] == port + 1
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                with pytest.raises(OSError):
                    other.bind(("127.0.0.1", port))  # held by the pool
        small = RtpPortPool("127.0.0.1", LOW, HIGH, size=4, bind=Binder([]))
        assert small.fill(room=0, max_binds=10) is False and len(small) == 0  # at capacity
    finally:
        pool.close()


def test_size_is_bounded_by_the_range_and_a_full_range_is_noted() -> None:
    assert RtpPortPool("127.0.0.1", LOW, LOW + 5, size=64).size == 3
    binder = Binder([LOW, LOW + 2])
    pool = RtpPortPool("127.0.0.1", LOW, HIGH, size=4, bind=binder)
    try:
        assert pool.fill(room=10, max_binds=10) is False
        assert pool.ports() == [LOW, LOW + 2] and pool.exhausted
        binder.ports.append(LOW + 4)  # a port came free
        assert pool.fill(room=10, max_binds=10) is False
        assert pool.ports() == [LOW, LOW + 2, LOW + 4] and pool.exhausted
    finally:
        pool.close()


def test_take_and_close() -> None:
    pool = RtpPortPool("127.0.0.1", LOW, HIGH, size=2, bind=Binder([LOW, LOW + 2]))
    pool.fill(room=10, max_binds=10)
    pool.changed = False
    assert pool.take(LOW + 4) is None and not pool.changed
    pair = pool.take(LOW)
    assert pair is not None and pool.changed and pool.ports() == [LOW + 2]
    assert LOW not in pool and LOW + 2 in pool
    left = pool.pairs[LOW + 2]
    pool.close()
    assert all(closed(s) for s in left) and not closed(pair[0])
    for s in pair:
        s.close()


# ---------------------------------------------------------------- in the worker


@pytest.fixture
def worker() -> Iterator[tuple[MediaWorker, list[Any]]]:
    settings = parse_config(f'[media]\nrtp_ports = "{LOW}-{HIGH}"\nport_pool = 3\n'
                            'capacity = 4\n')
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    async def make() -> MediaWorker:
        return MediaWorker(settings, "media-test")

    w = loop.run_until_complete(make())
    sent: list[Any] = []
    w.send = sent.append  # type: ignore[method-assign]
    w.pool.fill(settings.media.capacity, settings.media.port_pool)
    w.pool.changed = False
    try:
        yield w, sent
    finally:
        w.close_leg("c1")
        for call_id in list(w.engine.legs):
            w.close_leg(call_id)
        w.pool.close()
        w.rtp.close()
        w.dealer.close()
        w.ctx.term()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        asyncio.set_event_loop(None)
        # Sockets the closed loop's tasks still hold (an RTCP endpoint that never
        # opened) close now, not at some later collection: the next test binds the
        # same range.
        gc.collect()


def run_soon(w: MediaWorker) -> None:
    """Let the callbacks the worker scheduled (the refill) run."""
    w.loop.run_until_complete(asyncio.sleep(0))


def test_allocation_takes_the_named_pair_and_the_pool_refills_later(
        worker: tuple[MediaWorker, list[Any]]) -> None:
    w, sent = worker
    before = w.pool.ports()
    port = before[1]
    w.allocate(MediaAllocate(call_id="c1", rtp_port=port, seq=1))
    assert sent == []  # success is not answered: the next announcement says it
    assert w.engine.legs["c1"].local_port == port
    assert w.rtp.get("c1") is not None and w.rtp.get("c1").getsockname()[1] == port  # type: ignore[union-attr]
    assert w.pool.ports() == [before[0], before[2]]  # not refilled inside the allocation
    run_soon(w)
    assert len(w.pool) == 3 and port not in w.pool.ports()


def test_many_allocations_one_announcement_per_tick(
        worker: tuple[MediaWorker, list[Any]]) -> None:
    w, sent = worker
    for seq, port in enumerate(w.pool.ports()[:2], start=1):
        w.allocate(MediaAllocate(call_id=f"c{seq}", rtp_port=port, seq=seq))
    run_soon(w)
    assert sent == []  # nothing yet
    w.announce_ports()
    w.announce_ports()
    (announced,) = sent
    assert announced == MediaPorts(ports=w.pool.ports(), allocate_seq=2)  # confirms both
    assert len(announced.ports) == 2  # capacity 4 with 2 legs: room for 2 pairs
    sent.clear()
    w.handle(MediaRelease(call_id="c2"))
    w.send_released()
    assert [leg.call_id for leg in sent[0].legs] == ["c2"]
    run_soon(w)  # room for one more pair again
    w.announce_ports()
    assert sent[-1] == MediaPorts(ports=w.pool.ports(), allocate_seq=2)
    assert len(sent[-1].ports) == 3


def test_a_ticks_releases_are_one_message(worker: tuple[MediaWorker, list[Any]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """MediaRelease is not answered at once: the tick sends one MediaReleased for every
    leg released since the last (never more than MAX_RELEASED_LEGS legs in one)."""
    w, sent = worker
    for seq, port in enumerate(w.pool.ports()[:3], start=1):
        w.allocate(MediaAllocate(call_id=f"c{seq}", rtp_port=port, seq=seq))
    sent.clear()
    for call_id in ("c1", "c2", "c3", "unknown"):
        w.handle(MediaRelease(call_id=call_id))
    for _ in range(5):  # the RTCP endpoints opened and closed again: ports free
        run_soon(w)
    assert sent == []
    w.send_released()
    (released,) = sent
    assert isinstance(released, MediaReleased)
    assert [leg.call_id for leg in released.legs] == ["c1", "c2", "c3", "unknown"]
    w.send_released()
    assert len(sent) == 1  # nothing more to say
    monkeypatch.setattr("workers.media.MAX_RELEASED_LEGS", 3)
    for n in range(7):
        w.handle(MediaRelease(call_id=f"gone{n}"))
    w.send_released()
    assert [len(msg.legs) for msg in sent[1:]] == [3, 3, 1]


def test_allocation_with_its_remote_end_sets_it(
        worker: tuple[MediaWorker, list[Any]]) -> None:
    # An inbound leg's MediaAllocate carries its first MediaRemote: one message, not two.
    w, sent = worker
    port = w.pool.ports()[0]
    remote = MediaRemote(call_id="c1", remote_ip="127.0.0.1", remote_port=40000,
                         payload_type=8, codec="PCMA", dtmf_payload_type=101)
    w.handle(MediaAllocate(call_id="c1", rtp_port=port, seq=1, remote=remote))
    leg = w.engine.legs["c1"]
    assert sent == [] and leg.local_port == port
    assert leg.sdp_remote == ("127.0.0.1", 40000) and leg.codec == "PCMA"


def test_allocation_errors_keep_the_pool_and_still_announce_the_seq(
        worker: tuple[MediaWorker, list[Any]]) -> None:
    w, sent = worker
    ports = w.pool.ports()
    stranger = next(p for p in range(LOW, HIGH, 2) if p not in ports)
    w.allocate(MediaAllocate(call_id="c1", rtp_port=stranger, seq=1))
    assert sent[-1].error == f"port {stranger} is not in the worker's pool"
    assert "c1" not in w.engine.legs and w.pool.ports() == ports
    w.announce_ports()
    # No change but the seq, which it names as refused (in case the refusal is lost).
    assert sent[-1] == MediaPorts(ports=ports, allocate_seq=1, refused=[(1, 1)])
    # The same leg asked again: the same answer (none); another port for it: an error.
    answered = len(sent)
    w.allocate(MediaAllocate(call_id="c1", rtp_port=ports[0], seq=2))
    w.allocate(MediaAllocate(call_id="c1", rtp_port=ports[0], seq=3))
    assert len(sent) == answered and w.engine.legs["c1"].local_port == ports[0]
    w.allocate(MediaAllocate(call_id="c1", rtp_port=ports[1], seq=4))
    assert sent[-1].error == f"the leg already has port {ports[0]}"
    run_soon(w)
    # At capacity: refused, and the named port stays in the pool.
    for seq, call_id in enumerate(("c2", "c3", "c4"), start=5):
        w.allocate(MediaAllocate(call_id=call_id, rtp_port=w.pool.ports()[0], seq=seq))
        run_soon(w)
    assert len(w.engine) == 4 and w.pool.ports() == []  # no room: nothing pre-bound
    w.pool.fill(room=1, max_binds=1)  # as if capacity had room; the worker still refuses
    last = w.pool.ports()[0]
    w.allocate(MediaAllocate(call_id="c5", rtp_port=last, seq=8))
    assert sent[-1].error == "worker at capacity" and w.pool.ports() == [last]


def test_allocations_that_never_arrived_or_came_late_are_announced_as_refused(
        worker: tuple[MediaWorker, list[Any]]) -> None:
    """The front takes `allocate_seq` as the confirmation of every number up to it but
    those in `refused`: a gap (MediaAllocate 1-2 lost on the way) goes there, and so
    does a number that arrives after a later one."""
    w, sent = worker
    ports = w.pool.ports()
    w.allocate(MediaAllocate(call_id="c3", rtp_port=ports[0], seq=3))
    assert sent == [] and w.engine.legs["c3"].local_port == ports[0]
    w.announce_ports()
    assert sent[-1].allocate_seq == 3 and sent[-1].refused == [(1, 2)]
    w.allocate(MediaAllocate(call_id="c2", rtp_port=ports[1], seq=2))
    assert sent[-1] == MediaAllocated(call_id="c2", error="allocation 2 came after 3")
    assert "c2" not in w.engine.legs and ports[1] in w.pool.ports()
    w.allocate(MediaAllocate(call_id="c5", rtp_port=ports[1], seq=4))
    w.announce_ports()
    assert sent[-1].allocate_seq == 4 and sent[-1].refused == [(1, 2), (2, 2)]
    assert w.engine.legs["c5"].local_port == ports[1]


def test_refused_seqs_merge_expire_and_stay_bounded() -> None:
    refused = RefusedSeqs()
    assert refused.ranges(now=0.0) == []
    refused.add(1, 1, now=0.0)
    refused.add(2, 4, now=1.0)  # consecutive: one range, kept from its last extension
    refused.add(7, 7, now=2.0)
    assert refused.ranges(now=2.0) == [(1, 4), (7, 7)]
    assert refused.ranges(now=1.0 + REFUSED_KEEP_S) == [(7, 7)]
    assert refused.ranges(now=2.0 + REFUSED_KEEP_S) == []
    for seq in range(10, 10 + 2 * (MAX_REFUSED_RANGES + 5), 2):  # none consecutive
        refused.add(seq, seq, now=100.0)
    kept = refused.ranges(now=100.0)
    assert len(kept) == MAX_REFUSED_RANGES and kept[-1] == (seq, seq)  # the newest kept
    # The announcement's field takes them all.
    assert MediaPorts(ports=[], allocate_seq=seq, refused=kept).refused == kept

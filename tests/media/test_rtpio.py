"""workers.rtpio: the legs' sockets in one epoll set; only ready sockets are read."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from media.legtable import TxBatch
from workers.rtpio import RtpSockets


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    out = []
    for _ in range(4):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        out.append(s)
    yield out
    for s in out:
        s.close()


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def drain(rs: RtpSockets) -> list[tuple[int, int, bytes]]:
    """(socket index, engine row, payload) of every packet recv() returns."""
    out = []
    while True:
        n = rs.recv()
        out += [(int(rs.owner[k]), int(rs.rows[k]), rs.buf[k, : rs.lens[k]].tobytes())
                for k in range(n)]  # fmt: skip
        if n < rs.buf.shape[0]:
            return out


def test_only_ready_sockets_are_read(socks: list[socket.socket]) -> None:
    rs = RtpSockets(batch=4)
    phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for k, s in enumerate(socks):
            rs.add(f"c{k}", s, 10 + k)
        assert rs.ready() == [] and not readable(rs.fileno())
        assert rs.recv() == 0
        phone.sendto(b"a0", socks[0].getsockname())
        phone.sendto(b"a2", socks[2].getsockname())
        phone.sendto(b"b2", socks[2].getsockname())
        assert rs.ready() == [0, 2] and readable(rs.fileno())
        assert sorted(drain(rs)) == [(0, 10, b"a0"), (2, 12, b"a2"), (2, 12, b"b2")]
        assert rs.ready() == [] and not readable(rs.fileno())
        # a burst larger than the buffer: read over several fills, none lost
        for j in range(10):
            phone.sendto(b"x%d" % j, socks[1].getsockname())
        got = drain(rs)
        assert [p for _, _, p in got] == [b"x%d" % j for j in range(10)]
        assert {(i, r) for i, r, _ in got} == {(1, 11)}
        # the compatibility path returns call ids and source addresses
        phone.sendto(b"p3", socks[3].getsockname())
        assert rs.poll() == [("c3", b"p3", ("127.0.0.1", phone.getsockname()[1]))]
    finally:
        phone.close()
        rs.close()


def test_removed_legs_are_never_read_and_slots_are_reused(socks: list[socket.socket]) -> None:
    rs = RtpSockets(batch=8)
    phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for k, s in enumerate(socks[:3]):
            rs.add(f"c{k}", s, k)
        phone.sendto(b"early", socks[1].getsockname())
        assert rs.remove("c1") is socks[1]
        assert len(rs) == 2 and rs.ready() == [] and not readable(rs.fileno())
        phone.sendto(b"late", socks[1].getsockname())
        phone.sendto(b"c0", socks[0].getsockname())
        assert drain(rs) == [(0, 0, b"c0")]
        # the removed leg's datagrams are still in its socket: nobody read them
        assert socks[1].recv(100) == b"early" and socks[1].recv(100) == b"late"
        # a new leg takes the free slot and is read from there
        rs.add("c3", socks[3], 7)
        assert rs.call_ids[1] == "c3"
        phone.sendto(b"new", socks[3].getsockname())
        assert rs.ready() == [1]
        assert drain(rs) == [(1, 7, b"new")]
        with pytest.raises(ValueError):
            rs.add("c3", socks[1], 8)
        # a socket closed by its owner before remove() leaves the set too
        socks[0].close()
        assert rs.remove("c0") is not None
        phone.sendto(b"c2", socks[2].getsockname())
        assert drain(rs) == [(2, 2, b"c2")]
    finally:
        phone.close()
        rs.close()


class _Engine:
    """Stands in for MediaEngine: records what each read of the sockets handed it."""

    def __init__(self) -> None:
        self.batches: list[tuple[float, list[bytes]]] = []
        self.relay = TxBatch()  # nothing relayed
        self.relaying = False  # no leg bridged: reads every POLL_SECONDS

    def receive_batch(self, buf, lens, names, rows, n, now):  # type: ignore[no-untyped-def]
        self.batches.append((now, [buf[k, : lens[k]].tobytes() for k in range(n)]))
        return [], []


@contextlib.contextmanager
def _reading_worker() -> Iterator[Any]:
    """A MediaWorker shell with only what reading needs: the running loop, an empty set of
    RTP sockets and `_Engine`; nothing watched, no read yet. Unwatched and closed after."""
    from workers import media

    w = media.MediaWorker.__new__(media.MediaWorker)
    w.loop = asyncio.get_running_loop()
    w.rtp = RtpSockets(batch=16)
    w.engine = _Engine()  # type: ignore[assignment]
    w._last_poll, w._poll_timer, w._watching = 0.0, None, False
    try:
        yield w
    finally:
        w.unwatch_rtp()
        w.rtp._epoll.close()


async def _until(batches: list[Any], count: int, step: float = 0.0005) -> None:
    """Until `count` reads have happened (2 s at most)."""
    deadline = time.monotonic() + 2.0
    while len(batches) < count and time.monotonic() < deadline:
        await asyncio.sleep(step)


def test_worker_reads_on_readiness_and_coalesces(socks: list[socket.socket]) -> None:
    """No tick loop runs here: every read comes from the epoll fd waking the loop."""
    from workers import media

    async def scenario() -> None:
        with _reading_worker() as w, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
            batches = w.engine.batches
            for k, s in enumerate(socks[:2]):
                w.rtp.add(f"c{k}", s, k)
            w.watch_rtp()
            phone.sendto(b"one", socks[0].getsockname())
            await _until(batches, 1)
            assert [p for _, p in batches] == [[b"one"]]
            # right after a read: the next wake waits out POLL_SECONDS, then reads all
            first = batches[0][0]
            for p in (b"a", b"b", b"c"):
                phone.sendto(p, socks[1].getsockname())
            await _until(batches, 2)
            assert sorted(batches[1][1]) == [b"a", b"b", b"c"]
            assert batches[1][0] >= first + media.POLL_SECONDS - 1e-4
            # a removed leg is never read; an unwatched set is not read at all
            w.rtp.remove("c0")
            phone.sendto(b"gone", socks[0].getsockname())
            await asyncio.sleep(0.02)
            assert len(batches) == 2
            w.unwatch_rtp()
            phone.sendto(b"later", socks[1].getsockname())
            await asyncio.sleep(0.02)
            assert len(batches) == 2
            w.watch_rtp()
            await _until(batches, 3)
            assert batches[2][1] == [b"later"]
            assert socks[0].recv(100) == b"gone"

    asyncio.run(scenario())


def test_worker_stays_on_its_timer_while_packets_keep_coming(
    socks: list[socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read on the timer that found packets schedules the next read on the timer, without
    watching the epoll fd again in between (the phones of a busy worker send all through
    the tick: watching again would cost a wake-up and two epoll_ctl per read); a read
    that finds nothing goes back to waiting on readiness."""
    from workers import media

    # long enough that each packet below is sent well inside the interval, on a slow
    # machine too
    monkeypatch.setattr(media, "POLL_SECONDS", 0.05)

    async def scenario() -> None:
        with _reading_worker() as w, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
            batches = w.engine.batches
            w.rtp.add("c0", socks[0], 0)
            w.watch_rtp()
            phone.sendto(b"one", socks[0].getsockname())
            await _until(batches, 1, step=0.0002)
            phone.sendto(b"two", socks[0].getsockname())  # too early: read on the timer
            await _until(batches, 2, step=0.0002)
            assert [p for _, p in batches] == [[b"one"], [b"two"]]
            # that read found a packet: the next one is on the timer too, fd unwatched
            assert not w._watching and w._poll_timer is not None
            phone.sendto(b"three", socks[0].getsockname())
            await _until(batches, 3, step=0.0002)
            assert batches[2][1] == [b"three"]
            assert batches[2][0] >= batches[1][0] + media.POLL_SECONDS - 1e-4
            assert not w._watching and w._poll_timer is not None
            # nothing more: the next timer's read finds nothing and watches again
            await asyncio.sleep(3 * media.POLL_SECONDS + 0.01)
            assert len(batches) == 3
            assert w._watching and w._poll_timer is None
            phone.sendto(b"four", socks[0].getsockname())
            await _until(batches, 4, step=0.0002)
            assert batches[3][1] == [b"four"]

    asyncio.run(scenario())


def test_worker_timed_reads_are_never_a_busy_loop_under_uvloop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvloop's call_later(d) with d under 0.5 ms runs on the next loop turn: a chained read
    at such an interval would spin while every read finds packets. The chain waits at
    least LOOP_TIMER_SECONDS."""
    import uvloop

    from workers import media

    monkeypatch.setattr(media, "POLL_SECONDS", 0.0002)
    reads: list[float] = []

    async def scenario() -> None:
        def poll() -> int:  # every read finds a packet: a stream that never pauses
            reads.append(time.monotonic())
            return 1

        with _reading_worker() as w:
            w.poll_rtp = poll
            w._poll_due()
            await asyncio.sleep(0.05)

    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    with runner:
        runner.run(scenario())
    assert 10 <= len(reads) <= 60  # one read a millisecond, not tens of thousands


# ------------------------------------------------------------ the shared socket
# ------------------------------------------------------------ the shared socket


def _phones(k: int) -> list[socket.socket]:
    out = []
    for _ in range(k):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        out.append(s)
    return out


def test_shared_socket_reads_with_recvmmsg_and_demuxes_by_source(
    socks: list[socket.socket],
) -> None:
    """Legs on the shared socket and a leg on its own socket, in one receive pass: each
    packet gets its leg's row by source address; strangers get -1 and are counted."""
    from media.kernels.rtpbatch import L_SDP_IP, L_SDP_PORT
    from media.legtable import LegTable

    legs = LegTable()
    rs = RtpSockets(batch=64, legs=legs)
    shared = socks[0]
    phones = _phones(3)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rs.set_shared(shared)
        rows = []
        for k, phone in enumerate(phones[:2]):
            row = legs.add()
            legs.i[row, L_SDP_IP] = 0x7F000001
            legs.i[row, L_SDP_PORT] = phone.getsockname()[1]
            rs.add_shared(f"s{k}", row)
            rows.append(row)
        own = legs.add()
        rs.add("own", socks[1], own)
        assert len(rs) == 3 and rs.on_shared("s0") and not rs.on_shared("own")
        for j in range(20):  # a burst: one recvmmsg takes it
            phones[j % 2].sendto(b"p%d" % j, shared.getsockname())
        phones[2].sendto(b"o", socks[1].getsockname())
        for _ in range(5):
            stranger.sendto(b"evil", shared.getsockname())
        got = drain(rs)
        assert sorted((r, p) for _, r, p in got if p != b"evil") == sorted(
            [(rows[j % 2], b"p%d" % j) for j in range(20)] + [(own, b"o")]
        )
        assert [r for _, r, p in got if p == b"evil"] == [-1] * 5 and rs.foreign == 5
        assert [p for _, r, p in got if r == rows[0]] == [b"p%d" % j for j in range(0, 20, 2)]
        # a removed leg's source becomes a stranger; the socket stays for the others
        assert rs.remove("s0") is None
        phones[0].sendto(b"late", shared.getsockname())
        phones[1].sendto(b"still", shared.getsockname())
        got = drain(rs)
        assert sorted((r, p) for _, r, p in got) == [(-1, b"late"), (rows[1], b"still")]
        assert rs.foreign == 6
    finally:
        for p in [*phones, stranger]:
            p.close()
        rs.close()


def test_shared_socket_sends_with_sendmmsg_from_its_port(socks: list[socket.socket]) -> None:
    """One send batch: shared legs' packets leave from the shared port, an own-socket
    leg's from its own; a row without a socket is reported unsent."""
    import numpy as np

    from media.legtable import LegTable

    legs = LegTable()
    rs = RtpSockets(batch=8, legs=legs)
    phones = _phones(3)
    try:
        rs.set_shared(socks[0])
        a, b, c = legs.add(), legs.add(), legs.add()
        rs.add_shared("a", a)
        rs.add_shared("b", b)
        rs.add("c", socks[1], c)
        n = 1500  # more than one sendmmsg takes (UIO_MAXIOV)
        data = np.zeros((n + 1, 20), dtype=np.uint8)
        for k in range(n + 1):
            data[k, :4] = list(k.to_bytes(4, "big"))
        lens = np.full(n + 1, 4, dtype=np.int64)
        rows = np.array([a, b, c] * (n // 3) + [99], dtype=np.int64)
        ips = np.full(n + 1, 0x7F000001, dtype=np.int64)
        ports = np.array([p.getsockname()[1] for p in phones] * (n // 3) + [1], dtype=np.int64)
        for p in phones:
            p.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        unsent = rs.send(data, lens, rows, ips, ports, n + 1)
        assert unsent.tolist() == [n]
        for j, phone in enumerate(phones):
            got = []
            while True:
                try:
                    payload, src = phone.recvfrom(100)
                except BlockingIOError:
                    break
                got.append(int.from_bytes(payload, "big"))
                want = socks[0] if j < 2 else socks[1]
                assert src == want.getsockname()
            assert got == list(range(j, n, 3))
    finally:
        for p in phones:
            p.close()
        rs.close()

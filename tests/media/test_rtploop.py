"""workers.rtploop: the compiled receive loop between ticks while legs are bridged.

Real sockets on loopback, a real engine, the worker's own `relay_until` (on a worker
shell with only what it needs). What the phones hear through the loop must be what the
engine's batch path (`receive_batch`, the reference) relays for the same streams, byte
for byte, and every key press reported once; the event loop must get its turn when the
DEALER's fd is readable; the worker goes back to the event loop's reads when the bridge
ends."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from media.engine import MediaEngine
from media.kernels import rtpbatch as K
from media.legtable import TxBatch
from media.prompts import PromptCache
from media.recorder import Recorder
from media.rectable import LEAD_SAMPLES
from media.rtp import RtpPacket, build_event, build_rtp
from pbx.messages import DtmfDigit, MediaRecord, MediaRemote
from tests.media.test_rtpbatch import Batch
from workers import rtploop
from workers.rtpio import RtpSockets

# Two phones: a PCMU with events on 101, b PCMA with events on 96 (the relay transcodes).
PHONES = {"a": ("PCMU", 0, 101), "b": ("PCMA", 8, 96)}


def new_engine(tmp: Path) -> MediaEngine:
    return MediaEngine(PromptCache(tmp), rng=random.Random(5),
                       recorder=Recorder({"recordings": tmp / "rec"}))  # fmt: skip


def set_up(engine: MediaEngine, phone_ports: dict[str, int], record: bool) -> None:
    """Legs a and b at their phones' addresses, bridged; a recorded when `record`."""
    for call_id, (codec, pt, dtmf) in PHONES.items():
        engine.add_leg(call_id, 30000 + 2 * len(engine), inband_dtmf=False)
        engine.set_remote(MediaRemote(
            call_id=call_id, remote_ip="127.0.0.1", remote_port=phone_ports[call_id],
            payload_type=pt, codec=codec, dtmf_payload_type=dtmf,  # type: ignore[arg-type]
        ))  # fmt: skip
    engine.bridge("a", "b")
    if record:
        engine.record(MediaRecord(call_id="a", record_id=1, path="a.wav", stereo=True),
                      time.monotonic())  # fmt: skip


def streams() -> list[tuple[str, bytes]]:
    """What the phones send, in order: audio both ways, a press from each (start, update,
    end three times), more audio."""
    rng = random.Random(3)
    seq = {c: rng.randrange(65536) for c in PHONES}
    ts = {c: rng.getrandbits(32) for c in PHONES}
    out: list[tuple[str, bytes]] = []

    def audio(c: str) -> None:
        seq[c] = (seq[c] + 1) & 0xFFFF
        ts[c] = (ts[c] + 160) % (1 << 32)
        payload = bytes(rng.getrandbits(8) for _ in range(160))
        out.append((c, build_rtp(RtpPacket(PHONES[c][1], seq[c], ts[c], 0x100 + ord(c),
                                           payload))))  # fmt: skip

    def press(c: str, digit: int) -> None:
        for k, (end, dur) in enumerate([(False, 160), (False, 320), (True, 480), (True, 480),
                                        (True, 480)]):  # fmt: skip
            seq[c] = (seq[c] + 1) & 0xFFFF
            out.append((c, build_rtp(RtpPacket(PHONES[c][2], seq[c], ts[c], 0x100 + ord(c),
                                               build_event(digit, end, 10, dur),
                                               marker=k == 0))))  # fmt: skip

    for _ in range(12):
        audio("a")
        audio("b")
    press("a", 5)
    press("b", 10)  # '*'
    for _ in range(12):
        audio("a")
        audio("b")
    return out


class _Dealer:
    """The worker's DEALER as far as `relay_until` goes: what it sends, kept."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, msg: Any, droppable: bool = False) -> None:
        self.sent.append(msg)

    def quiet(self) -> bool:
        return True


@contextlib.contextmanager
def worker_shell(engine: MediaEngine) -> Iterator[Any]:
    """A MediaWorker with only what `relay_until` needs: the running loop, the engine,
    its RTP sockets, a DEALER stand-in and a RelayLoop whose control fd is a socket pair's
    (the test writes to the other end)."""
    from workers import media

    w = media.MediaWorker.__new__(media.MediaWorker)
    w.loop = asyncio.get_running_loop()
    w.engine = engine
    w.rtp = RtpSockets(batch=16, legs=engine.tab)
    w.transports, w.ws_tasks = {}, {}
    w.dealer = _Dealer()  # type: ignore[assignment]
    w._last_poll, w._poll_timer, w._watching = 0.0, None, False
    w.control_end, w.control_peer = socket.socketpair()
    w.relay_loop = rtploop.RelayLoop(w.rtp, w.control_end.fileno())
    try:
        yield w
    finally:
        w.unwatch_rtp()
        w.relay_loop.stop()
        w.rtp.close()
        w.control_end.close()
        w.control_peer.close()


def bound_udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    return s


def heard(phone: socket.socket) -> list[bytes]:
    out = []
    with contextlib.suppress(BlockingIOError):
        while True:
            out.append(phone.recv(4096))
    return out


def reference(tmp: Path, ports: dict[str, int], items: list[tuple[str, bytes]],
              record: bool) -> tuple[dict[str, list[bytes]], list[str]]:  # fmt: skip
    """The same streams through `receive_batch`, one pass per packet: what each phone would
    hear, and the digits reported."""
    engine = new_engine(tmp / "ref")
    set_up(engine, ports, record)
    out: dict[str, list[bytes]] = {c: [] for c in PHONES}
    digits: list[str] = []
    now = time.monotonic()
    for call_id, data in items:
        batch = Batch([(engine.legs[call_id].row, data, ("127.0.0.1", ports[call_id]))])
        _, events = engine.receive_batch(batch.buf, batch.lens, batch.names, batch.rows, 1, now)
        for peer_id, packet, _ in engine.relayed():
            out[peer_id].append(packet)
        digits += [e.event.digit for e in events if isinstance(e.event, DtmfDigit)]
        now += 0.0001
    return out, digits


@pytest.mark.parametrize(("defer", "record", "relay_width"),
                         [(64, False, 172), (2, False, 172), (64, True, 172), (64, False, 20)])
def test_loop_relays_as_the_batch_path_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           defer: int, record: bool,
                                           relay_width: int) -> None:  # fmt: skip
    """Latches (the first packet of each phone) and recorded legs' audio go back to Python
    at once (PASS, SENT); key presses wait in the deferred queue (2 places: it fills and
    the pass goes to Python); a relay batch too narrow for the audio (20 bytes) makes the
    pass Python's, which grows it; the rest is relayed in the loop. The phones hear exactly
    what the batch path relays, and each press is reported once."""
    monkeypatch.setattr(rtploop, "DEFER_PACKETS", defer)
    phones = {c: bound_udp() for c in PHONES}
    ports = {c: s.getsockname()[1] for c, s in phones.items()}
    items = streams()
    expected, expected_digits = reference(tmp_path, ports, items, record)
    engine = new_engine(tmp_path / "loop")
    set_up(engine, ports, record)
    engine.relay = TxBatch(capacity=1, width=relay_width)

    async def scenario() -> None:
        with worker_shell(engine) as w:
            legs = {c: bound_udp() for c in PHONES}  # the legs' RTP sockets
            for c, s in legs.items():
                w.rtp.add(c, s, engine.legs[c].row)
            assert w.relay_loop_ok()
            for call_id, data in items:
                phones[call_id].sendto(data, legs[call_id].getsockname())
                await w.relay_until(time.monotonic() + 0.001)  # one packet per pass
            await w.relay_until(time.monotonic() + 0.02)
            assert {c: heard(phones[c]) for c in PHONES} == expected
            digits = [m.event.digit for m in w.dealer.sent if isinstance(m.event, DtmfDigit)]
            assert digits == expected_digits == ["5", "*"]
            counts = w.relay_loop.counts
            # the audio and the event packets were relayed in the loop, not by Python
            assert counts[rtploop.RELAYED] >= (len(items) - 2 if not record else 1)
            for s in legs.values():
                s.close()

    try:
        asyncio.run(scenario())
    finally:
        for s in phones.values():
            s.close()
    if record:  # a's audio (PASS) and b's relayed to it (SENT) in a's recording
        row = int(engine.tab.i[engine.legs["a"].row, K.L_REC])
        buf = engine.recorder.table.buf[row]  # PCMU: silence is 0xFF
        # The streams run ~20 times faster than the clock here (a packet a pass): each is
        # placed as it comes until it is LEAD_SAMPLES ahead, then anchored again.
        assert (buf[0] != 0xFF).sum() >= LEAD_SAMPLES and (buf[1] != 0xFF).sum() >= LEAD_SAMPLES


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[MediaEngine]:
    """Legs a and b bridged, their phones' sockets bound (closed after)."""
    phones = {c: bound_udp() for c in PHONES}
    engine = new_engine(tmp_path)
    set_up(engine, {c: s.getsockname()[1] for c, s in phones.items()}, record=False)
    yield engine
    for s in phones.values():
        s.close()


def test_dealer_fd_gives_the_event_loop_its_turn(engine: MediaEngine) -> None:
    """A readable DEALER fd ends the wait at once (CONTROL): the event loop runs its
    reader, then the loop waits again until the tick."""
    async def scenario() -> None:
        with worker_shell(engine) as w:
            read_at: list[float] = []

            def reader() -> None:  # the DEALER's reader drains its fd
                w.control_end.recv(16)
                read_at.append(time.monotonic())

            control_fd = w.control_end.fileno()
            w.loop.add_reader(control_fd, reader)
            try:
                start = time.monotonic()
                # from another thread: the event loop's own timers wait for the tick
                front = threading.Timer(0.05, w.control_peer.send, (b"x",))
                front.start()
                await w.relay_until(start + 0.5)
                end = time.monotonic()
            finally:
                front.join()
                w.loop.remove_reader(control_fd)
            assert len(read_at) == 1
            assert read_at[0] - start < 0.3  # not at the tick: at once
            assert end - start >= 0.5 - 1e-3  # and then the wait went on until the tick
            assert w.relay_loop.counts[rtploop.RETURNS] >= 2

    asyncio.run(scenario())


def test_event_loop_timers_run_every_tick(engine: MediaEngine) -> None:
    """The tick loop never sleeps on the event loop in this mode: `relay_until` gives it a
    turn at each tick, so its timers (the heartbeat) run within a tick of being due."""
    async def scenario() -> None:
        with worker_shell(engine) as w:
            fired: list[float] = []
            start = time.monotonic()
            w.loop.call_later(0.01, lambda: fired.append(time.monotonic()))
            for k in range(1, 6):  # as tick_loop: from one tick's wait to the next
                await w.relay_until(start + 0.02 * k)
            assert len(fired) == 1
            assert fired[0] - start < 0.06

    asyncio.run(scenario())


def test_worker_reads_on_the_event_loop_again_when_no_leg_is_bridged(engine: MediaEngine) -> None:
    """After the bridge ends the next tick's wait is the event loop's again: the RTP set
    watched by it, the DEALER's fd out of the set."""
    async def scenario() -> None:
        with worker_shell(engine) as w:
            await w.relay_until(time.monotonic() + 0.005)
            assert w.relay_loop.active and not w._watching
            engine.remove_leg("b", time.monotonic())
            engine.tick_batch(time.monotonic())  # re-counts `relaying`
            assert not w.relay_loop_ok()
            w.leave_relay_loop()
            assert not w.relay_loop.active and w._watching
            assert w.rtp.control_fd == -1

    asyncio.run(scenario())

"""The bridged relay in compiled code (`media.kernels.rtpbatch.relay_batch`): the kernel
against its Python twin on random workloads, and the engine's batch path (the kernel's
relay) against its per-packet path (`MediaEngine._forward`, the reference the relay must
reproduce byte for byte) over bridged calls that transcode, relay RFC 4733, hold, play a
prompt over the bridge, re-bridge, release a leg mid-stream and record. Virtual clock,
no sockets."""

from __future__ import annotations

import random
import wave
from pathlib import Path

import numpy as np
import pytest

from media import g711
from media.engine import MediaEngine, Packet
from media.kernels import rtpbatch as K
from media.legtable import LegTable, TxBatch
from media.prompts import PromptCache
from media.recorder import Recorder
from media.rtp import RtpPacket, build_event, build_rtp, parse_rtp
from pbx.messages import DtmfDigit, MediaEvent, MediaPlay, MediaRecord, MediaRemote
from tests.media.test_rtpbatch import Batch, make_tables, random_packets, run_rx, write_wav

TICK = 0.02

# ------------------------------------------------------------ the transcoding table


def test_transcode_table_is_g711_transcode() -> None:
    codes = np.arange(256, dtype=np.uint8)
    np.testing.assert_array_equal(K.XCODE[0], g711.transcode(codes, "PCMU", "PCMA"))
    np.testing.assert_array_equal(K.XCODE[1], g711.transcode(codes, "PCMA", "PCMU"))


# ------------------------------------------------------------ kernel against twin


def relay(kernel, batch: Batch, action: np.ndarray, now: float, tab: LegTable,  # type: ignore[no-untyped-def]
          out: TxBatch) -> None:  # fmt: skip
    """As `MediaEngine._relay`: call again with a bigger buffer until every packet fits."""
    p, at = 0, 0
    while True:
        p, at = kernel(batch.buf, batch.lens, batch.rows, batch.n, at, action, now, tab.i,
                       tab.f, out.data, out.lens, out.rows, out.ts, out.at, out.ips,
                       out.ports, p)  # fmt: skip
        out.n = p
        if at >= batch.n:
            return
        out.grow(int(batch.lens[at]))


def sent(out: TxBatch) -> list[tuple[bytes, int, int, int, int, float | None]]:
    """The batch's packets with their row, timestamp, address and `at` (None: NaN, an
    event, nothing for a recording)."""
    return [(out.packet(k), int(out.rows[k]), int(out.ts[k]), int(out.ips[k]),
             int(out.ports[k]), None if np.isnan(out.at[k]) else float(out.at[k]))
            for k in range(out.n)]  # fmt: skip


@pytest.mark.parametrize("seed", range(6))
def test_relay_kernel_equals_twin(seed: int) -> None:
    rng = random.Random(seed)
    rows = list(range(6))
    tab, rx = make_tables(6)
    for r in rows:  # what the peers send with: their SSRC, sequence, timeline
        i = tab.i[r]
        i[K.L_SSRC], i[K.L_SEQ], i[K.L_TS] = rng.getrandbits(32), 65530 + r, (1 << 32) - 500 * r
        i[K.L_HAS_REMOTE], i[K.L_REMOTE_IP], i[K.L_REMOTE_PORT] = 1, 0x0A000001 + r, 4000 + r
    now = 100.0
    relayed = events = 0
    for _ in range(40):
        # bridges come and go (row 5 bridged to a released row now and then); the peers'
        # streams are taken by prompts, held, lose their address, start new talk spurts
        peers = rows[:]
        rng.shuffle(peers)
        for a, b in zip(peers[0::2], peers[1::2], strict=True):
            tab.i[a, K.L_PEER], tab.i[b, K.L_PEER] = b, a
        if rng.random() < 0.3:
            tab.i[rng.choice(rows), K.L_PEER] = -1
        tab.i[:, K.L_ALIVE] = 1
        if rng.random() < 0.2:
            tab.i[rng.choice(rows), K.L_ALIVE] = 0
        for r in rows:
            i = tab.i[r]
            i[K.L_PLAYING] = rng.random() < 0.1
            i[K.L_NOSEND] = rng.random() < 0.1
            i[K.L_HAS_REMOTE] = rng.random() < 0.95
            i[K.L_DTMF_PT] = rng.choice([101, 101, 96, -1])
            i[K.L_CODEC] = rng.random() < 0.5
            if rng.random() < 0.15:
                i[K.L_FWD_OFFSET] = -1
            if rng.random() < 0.1:
                tab.f[r, K.F_SENT_UNTIL] = np.nan if rng.random() < 0.5 else now - 0.5
        batch = Batch(random_packets(rng, rows, rng.randrange(0, 60)))
        now += rng.choice([0.002, 0.01, 0.02, 0.3])
        _, action = run_rx(K.rx_batch, batch, now, tab, rx)
        action = np.ascontiguousarray(action, dtype=np.int8)
        twin = LegTable(capacity=6)
        twin.i[:], twin.f[:] = tab.i, tab.f
        a_out, b_out = TxBatch(capacity=2, width=20), TxBatch(capacity=2, width=20)
        relay(K.relay_batch, batch, action, now, tab, a_out)
        relay(K.relay_batch_py, batch, action, now, twin, b_out)
        assert sent(a_out) == sent(b_out)
        np.testing.assert_array_equal(tab.i, twin.i)
        np.testing.assert_array_equal(tab.f, twin.f)
        relayed += a_out.n
        events += sum(pkt[1] & 0x7F == tab.i[row, K.L_DTMF_PT] for pkt, row, *_ in sent(a_out))

    # the paths were taken: plenty relayed, events too, the buffers grown from 2 x 20
    assert relayed > 150 and events > 5


# ------------------------------------------------------------ the engine: batch vs _forward

# Four phones: codec, audio and telephone-event payload types (c takes no events).
PHONES = {"a": ("PCMU", 0, 101), "b": ("PCMA", 8, 96), "c": ("PCMU", 0, None),
          "d": ("PCMA", 8, 101)}  # fmt: skip
PATHS = ["kernel", "twin", "packet"]


def phone_addr(call_id: str) -> tuple[str, int]:
    return "192.0.2.10", 7000 + ord(call_id) - ord("a")


class Sim:
    """The engine on a virtual clock with the four phones sending every tick, fed through
    one path: "kernel" (receive_batch, relay_batch), "twin" (receive_batch with the
    kernels' Python twins) or "packet" (receive_rtp: `_forward` per packet)."""

    def __init__(self, tmp: Path, path: str, record: bool = False) -> None:
        write_wav(tmp / "p.wav", 0.3)
        self.path = path
        self.rec_dir = tmp / f"rec-{path}"
        self.engine = MediaEngine(PromptCache(tmp), rng=random.Random(5),
                                  recorder=Recorder({"recordings": self.rec_dir}))  # fmt: skip
        self.engine.kernels = path != "twin"
        rng = random.Random(9)  # the phones' streams: the same for every path
        self.seq = {c: rng.randrange(65536) for c in PHONES}
        self.ts = {c: rng.getrandbits(32) for c in PHONES}
        self.noise = [bytes(rng.getrandbits(8) for _ in range(160)) for _ in range(16)]
        self.k = 0
        self.packets: list[Packet] = []  # what the engine sent, in order
        self.relay_only: list[Packet] = []  # the relayed ones (batch paths: engine.relay)
        self.events: list[MediaEvent] = []
        self.blocked_passes = 0  # receive passes while a bridged leg was held or playing
        self.into_blocked = 0  # packets relayed into such a leg
        for call_id in PHONES:
            self.engine.add_leg(call_id, 30000 + 2 * len(self.engine), inband_dtmf=False)
            self.remote(call_id)
        # a first packet from every phone (G.729: latches, never relayed), as in
        # test_rtpbatch.digit_stream: the batch relays to the address its pass latched
        self.send([(c, build_rtp(RtpPacket(18, self.next_seq(c), self.ts[c], 1, bytes(20))))
                   for c in PHONES])  # fmt: skip

    @property
    def now(self) -> float:
        return 10.0 + self.k * TICK

    def remote(self, call_id: str, direction: str = "sendrecv") -> None:
        codec, pt, dtmf = PHONES[call_id]
        self.engine.set_remote(MediaRemote(
            call_id=call_id, remote_ip="10.0.0.1", remote_port=4000 + ord(call_id),
            payload_type=pt, codec=codec, dtmf_payload_type=dtmf,  # type: ignore[arg-type]
            direction=direction,  # type: ignore[arg-type]
        ))  # fmt: skip

    def next_seq(self, call_id: str) -> int:
        self.seq[call_id] = (self.seq[call_id] + 1) & 0xFFFF
        return self.seq[call_id]

    def audio(self, call_id: str) -> bytes:
        pt = PHONES[call_id][1]
        self.ts[call_id] = (self.ts[call_id] + 160) % (1 << 32)
        payload = self.noise[(self.k + ord(call_id)) % 16]
        return build_rtp(RtpPacket(pt, self.next_seq(call_id), self.ts[call_id], 0x100 + ord(
            call_id), payload, marker=self.k % 50 == 0))  # fmt: skip

    def press(self, call_id: str, digit: int) -> list[tuple[str, bytes]]:
        """A 60 ms RFC 4733 event with its own payload type: start, update, end three times."""
        ssrc, pt = 0x100 + ord(call_id), 101 if call_id != "b" else 96
        start = self.ts[call_id]
        out = []
        for k, (end, dur) in enumerate([(False, 160), (False, 320), (True, 480), (True, 480),
                                        (True, 480)]):  # fmt: skip
            out.append((call_id, build_rtp(RtpPacket(pt, self.next_seq(call_id), start, ssrc,
                                                     build_event(digit, end, 10, dur),
                                                     marker=k == 0))))  # fmt: skip
        return out

    def send(self, items: list[tuple[str, bytes]]) -> None:
        """One receive pass of `items` (call_id, datagram), from each phone's address."""
        engine = self.engine
        now = self.now + 0.005
        blocked = {c for c, leg in engine.legs.items() if leg.play is not None or not leg.sending}
        if blocked & {leg.peer for leg in engine.legs.values()}:
            self.blocked_passes += 1
        sent_before = len(self.relay_only)
        self._send(items, now)
        self.into_blocked += sum(c in blocked for c, _, _ in self.relay_only[sent_before:])

    def _send(self, items: list[tuple[str, bytes]], now: float) -> None:
        engine = self.engine
        if self.path == "packet":
            for call_id, data in items:
                p, e = engine.receive_rtp(call_id, data, phone_addr(call_id), now)
                self.packets += p
                self.relay_only += p
                self.events += e
            return
        rows = {c: leg.row for c, leg in engine.legs.items()}
        gone = max(rows.values(), default=0) + 1  # a released leg's row: nobody's now
        batch = Batch([(rows.get(c, gone), d, phone_addr(c)) for c, d in items])
        p, e = engine.receive_batch(batch.buf, batch.lens, batch.names, batch.rows, batch.n,
                                    now)  # fmt: skip
        assert p == []  # no WebSocket here: everything else went to engine.relay
        relayed = engine.relayed()
        self.packets += relayed
        self.relay_only += relayed
        self.events += e

    def tick(self, extra: list[tuple[str, bytes]] | None = None,
             silent: tuple[str, ...] = ()) -> None:  # fmt: skip
        items = [(c, self.audio(c)) for c in PHONES if c in self.engine.legs and c not in silent]
        self.send(items + (extra or []))
        p, e = self.engine.tick(self.now)
        self.packets += p
        self.events += e
        self.k += 1


def scenario(sim: Sim) -> None:
    """a-b bridged (PCMU <-> PCMA, events 101 <-> 96), hold and resume, a prompt over the
    bridge, a pause in a's stream, presses both ways, a re-bridged to c (no events), b to d,
    d released with its packets in the batch, a recording of a (stereo)."""
    e = sim.engine
    e.bridge("a", "b")
    for _ in range(5):
        sim.tick()
    sim.tick(extra=sim.press("a", 5) + sim.press("b", 7))
    for _ in range(3):
        sim.tick()
    sim.remote("b", "recvonly")  # b on hold: nothing goes to b
    for _ in range(4):
        sim.tick(extra=sim.press("a", 1) if sim.k == 11 else None)
    sim.remote("b")  # resumed: a new talk spurt into b
    for _ in range(4):
        sim.tick()
    e.play(MediaPlay(call_id="a", play_id=1, file="p.wav"), sim.now)  # over the bridge
    for _ in range(22):
        sim.tick()  # the prompt ends: a new talk spurt of b's audio into a
    for _ in range(6):
        sim.tick(silent=("a",))  # a pauses: b's stream goes on over the gap
    if sim.path != "twin":
        e.record(MediaRecord(call_id="a", record_id=1, path="a.wav", stereo=True), sim.now)
    for _ in range(10):
        sim.tick()
    e.bridge("a", "c")  # b is alone now (filled); c takes no events
    for _ in range(5):
        sim.tick(extra=sim.press("a", 9) if sim.k == 57 else None)
    e.bridge("b", "d")
    for _ in range(5):
        sim.tick()
    released = e.remove_leg("d", sim.now)  # d's and b's packets of this pass still come
    assert released.packets_sent > 0
    sim.tick(extra=[("d", sim.audio("d")), ("d", sim.audio("d"))])
    for _ in range(3):
        sim.tick()
    if sim.path != "twin":
        e.record_stop("a", sim.now)
    for _ in range(40):  # the recorder writes what is old enough and closes the file
        sim.tick()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sim]:
    out = {}
    for path in PATHS:
        sim = Sim(tmp_path_factory.mktemp(path), path)
        scenario(sim)
        out[path] = sim
    return out


def test_relay_bytes_equal_forward(runs: dict[str, Sim]) -> None:
    """What the kernel relays, and everything else the engine sends and reports, equals
    the per-packet path's (`_forward`) byte for byte, and the twin's."""
    ref = runs["packet"]
    assert len(ref.relay_only) > 100
    for path in ("kernel", "twin"):
        sim = runs[path]
        assert sim.relay_only == ref.relay_only, path
        assert sim.events == ref.events, path
        if path == "kernel":  # the twin run records nothing
            assert sim.packets == ref.packets
        for call_id, leg in sim.engine.legs.items():
            other = ref.engine.legs[call_id]
            assert (leg.seq, leg.ts, leg.packets_sent, leg.octets_sent, leg.fwd_offset,
                    leg.sent_until) == (other.seq, other.ts, other.packets_sent,
                                        other.octets_sent, other.fwd_offset,
                                        other.sent_until)  # fmt: skip


def test_recorded_bridged_leg_records_the_same(runs: dict[str, Sim]) -> None:
    """The recording of a bridged leg (caller left, what it hears right) is the same file
    whether its relay ran in the kernel or per packet."""
    a = (runs["kernel"].rec_dir / "a.wav").read_bytes()
    b = (runs["packet"].rec_dir / "a.wav").read_bytes()
    assert a == b
    with wave.open(str(runs["kernel"].rec_dir / "a.wav"), "rb") as w:
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
    assert w.getnchannels() == 2 and (frames[:, 0] != 0).sum() > 800
    assert (frames[:, 1] != 0).sum() > 800  # heard: b's relayed audio, then c's


def stream(sim: Sim, to: str) -> list[RtpPacket]:
    return [parse_rtp(d) for c, d, _ in sim.relay_only if c == to]


def test_transcoding_both_ways_and_event_payload_types(runs: dict[str, Sim]) -> None:
    sim = runs["kernel"]
    to_b, to_a = stream(sim, "b"), stream(sim, "a")
    audio_b = [p for p in to_b if p.payload_type == 8]
    audio_a = [p for p in to_a if p.payload_type == 0]
    assert audio_b and audio_a
    mu = {bytes(g711.transcode(np.frombuffer(x, dtype=np.uint8), "PCMU", "PCMA"))
          for x in sim.noise}  # fmt: skip
    al = {bytes(g711.transcode(np.frombuffer(x, dtype=np.uint8), "PCMA", "PCMU"))
          for x in sim.noise}  # fmt: skip
    # the first packets into b are a's (µ-law -> A-law), into a b's (A-law -> µ-law);
    # later ones come from d and c, in the same law: copied
    assert {p.payload for p in audio_b[:9]} <= mu - set(sim.noise)
    assert {p.payload for p in audio_a[:17]} <= al - set(sim.noise)
    assert {p.payload for p in audio_b[-5:]} | {p.payload for p in audio_a[-5:]} <= set(sim.noise)
    # RFC 4733 relayed with the peer's payload type, and every press reported once
    assert {p.payload_type for p in to_b} == {8, 96} and {p.payload_type for p in to_a} == {0, 101}
    assert not [p for p in stream(sim, "c") if p.payload_type != 0]  # c takes no events
    presses = [(e.call_id, e.event.digit) for e in sim.events if isinstance(e.event, DtmfDigit)]
    assert presses == [("a", "5"), ("b", "7"), ("a", "1"), ("a", "9")]


def test_new_talk_spurt_marker_and_timestamp_continuity(runs: dict[str, Sim]) -> None:
    """Into b: a's audio, then hold (nothing), then resume: the first packet after it has
    the marker and a timestamp that went on over the held time; sequence numbers go on."""
    sim = runs["kernel"]
    b = stream(sim, "b")
    # everything b's stream carried (relayed, then fill frames while alone, relayed again)
    seqs = [parse_rtp(d).sequence for c, d, _ in sim.packets if c == "b"]
    assert len(seqs) > len(b)
    assert all((y - x) & 0xFFFF == 1 for x, y in zip(seqs, seqs[1:], strict=False))
    marked = [k for k, p in enumerate(b) if p.marker]
    assert marked[0] == 0  # the bridge: a new spurt
    gaps = [(b[k].timestamp - b[k - 1].timestamp) % (1 << 32) for k in marked[1:]]
    # resume after 4 held ticks (+1: 160 per packet); the source's own markers pass through
    assert 5 * 160 in gaps
    for k in range(1, len(b)):
        if not b[k].marker and b[k].payload_type == 8 and b[k - 1].payload_type == 8:
            assert (b[k].timestamp - b[k - 1].timestamp) % (1 << 32) == 160


def test_leg_left_alone_by_a_rebridge_is_filled(runs: dict[str, Sim]) -> None:
    """a leaves b for c: until b is bridged to d its stream goes on with silence frames
    (the fill, as for a leg whose peer hung up), not a hole."""
    sim = runs["kernel"]
    relayed = {d for c, d, _ in sim.relay_only if c == "b"}
    b = [d for c, d, _ in sim.packets if c == "b"]
    last_relayed = max(k for k, d in enumerate(b) if d in relayed)  # d's, before d left
    fill = [parse_rtp(d) for d in b[:last_relayed] if d not in relayed]
    assert len(fill) >= 4 and {(p.payload_type, p.payload) for p in fill} == {(8, b"\xd5" * 160)}


def test_hold_prompt_and_release_drop(runs: dict[str, Sim]) -> None:
    """Nothing is relayed into a held leg or a leg playing a prompt, nor to or from a
    released leg whose packets are still in the batch."""
    for sim in runs.values():
        # passes in which a bridged leg's peer was held or playing: nothing went there
        assert sim.blocked_passes >= 4 + 15 and sim.into_blocked == 0
    sim = runs["kernel"]
    b_audio = [p for p in stream(sim, "b") if p.payload_type == 8]
    # into b: a's audio for 9 ticks, not during b's 4 held ones, 4 + 22 + 10 more (none
    # in a's 6 silent ticks), then d's for 5 ticks; d released: none of its last packets
    assert len(b_audio) == 9 + (4 + 22 + 10) + 5
    assert "d" not in {c for c, _, _ in sim.relay_only[-60:]}


# ------------------------------------------------------------ the worker: sent on arrival


def test_worker_sends_the_relay_batch_right_after_the_receive_pass(tmp_path: Path) -> None:
    """One read of the sockets (no tick runs): what the phone on leg a sent leaves leg b's
    socket for b's phone, rewritten, through the compiled send loop, not per packet."""
    import socket

    from workers import media
    from workers.rtpio import RtpSockets

    w = media.MediaWorker.__new__(media.MediaWorker)
    w.engine = MediaEngine(PromptCache(tmp_path), rng=random.Random(1))
    w.rtp = RtpSockets(batch=16)
    w.transports = {}
    w._last_poll = 0.0

    def per_packet(packets: list[Packet]) -> None:
        raise AssertionError(f"sent one by one: {packets}")

    w.send_packets = per_packet  # type: ignore[method-assign]
    w.send_events = lambda events: None  # type: ignore[method-assign]
    legs, phones = [], []
    try:
        for k, codec in enumerate(["PCMU", "PCMA"]):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            legs.append(s)
            ph = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            ph.bind(("127.0.0.1", 0))
            ph.settimeout(2.0)
            phones.append(ph)
            call_id = f"c{k}"
            leg = w.engine.add_leg(call_id, s.getsockname()[1])
            w.engine.set_remote(MediaRemote(
                call_id=call_id, remote_ip="127.0.0.1", remote_port=ph.getsockname()[1],
                payload_type=0 if codec == "PCMU" else 8, codec=codec,  # type: ignore[arg-type]
            ))  # fmt: skip
            w.rtp.add(call_id, s, leg.row)
        w.engine.bridge("c0", "c1")
        payload = bytes(range(160))
        phones[0].sendto(build_rtp(RtpPacket(0, 7, 1000, 0x42, payload)), legs[0].getsockname())
        w.poll_rtp()
        data, addr = phones[1].recvfrom(2048)
        assert addr == legs[1].getsockname()  # from b's own port (symmetric RTP)
        pkt = parse_rtp(data)
        b = w.engine.legs["c1"]
        assert (pkt.payload_type, pkt.ssrc, pkt.marker) == (8, b.ssrc, True)
        assert pkt.payload == bytes(K.XCODE[0][np.frombuffer(payload, dtype=np.uint8)])
        assert b.packets_sent == 1 and w.engine.relay.n == 1
    finally:
        w.rtp.close()
        for s in phones:
            s.close()


def test_engine_says_while_it_relays(tmp_path: Path) -> None:
    """`MediaEngine.relaying` (the worker reads its sockets more often then): set by a
    bridge at once, re-counted every tick, so it ends with the last bridge."""
    engine = MediaEngine(PromptCache(tmp_path), rng=random.Random(2))
    for call_id in ("a", "b", "c"):
        engine.add_leg(call_id, 40000)
    engine.tick_batch(1.0)
    assert not engine.relaying
    engine.bridge("a", "b")
    assert engine.relaying
    engine.tick_batch(1.02)
    assert engine.relaying
    engine.remove_leg("a")
    engine.tick_batch(1.04)
    assert not engine.relaying  # b is alone again, c never was bridged
    engine.bridge("b", "c")
    engine.remove_leg("b")
    engine.remove_leg("c")
    engine.tick_batch(1.06)
    assert not engine.relaying

"""The batch kernels (media.kernels.rtpbatch) against their Python twins and the per-packet
reference code, the engine's batched paths against its per-packet ones, and the compiled
sendto loop against the bytes the Python path builds."""

from __future__ import annotations

import random
import socket
import wave
from pathlib import Path

import numpy as np
import pytest

from media.engine import MediaEngine, Packet
from media.kernels import rtpbatch as K
from media.legtable import LegTable, ipv4_int
from media.prompts import PromptCache
from media.rtcp import ReceiveStats
from media.rtp import RtpPacket, build_event, build_rtp, parse_rtp
from media.rxaudio import RxAudio
from pbx.messages import MediaEvent, MediaPlay, MediaRemote
from workers.rtpio import MAX_DATAGRAM, SOCKADDR_IN, RtpSockets

SRC = ("10.1.2.3", 4000)


def sockaddr(ip: str, port: int) -> np.ndarray:
    out = np.zeros(SOCKADDR_IN, dtype=np.uint8)
    out[0] = socket.AF_INET
    out[2:4] = np.frombuffer(port.to_bytes(2, "big"), dtype=np.uint8)
    out[4:8] = np.frombuffer(socket.inet_aton(ip), dtype=np.uint8)
    return out


class Batch:
    """Datagrams as the socket loop leaves them: buffer, lengths, sockaddr_in, rows."""

    def __init__(self, items: list[tuple[int, bytes, tuple[str, int]]]) -> None:
        n = len(items)
        self.n = n
        self.buf = np.zeros((max(n, 1), MAX_DATAGRAM), dtype=np.uint8)
        self.lens = np.zeros(max(n, 1), dtype=np.int64)
        self.names = np.zeros((max(n, 1), SOCKADDR_IN), dtype=np.uint8)
        self.rows = np.zeros(max(n, 1), dtype=np.int64)
        for k, (row, data, addr) in enumerate(items):
            self.buf[k, : len(data)] = np.frombuffer(data, dtype=np.uint8)
            self.lens[k] = len(data)
            self.names[k] = sockaddr(*addr)
            self.rows[k] = row


# ------------------------------------------------------------ a random receive workload


def phone(r: int) -> tuple[str, int]:
    """Where row r's phone sends from."""
    return f"192.0.2.{r}", 5000 + r


def sdp_addr(r: int) -> tuple[str, int]:
    """Row r's address in its SDP (not where it sends from: behind a NAT)."""
    return f"198.51.100.{r}", 6000 + r


def random_packets(rng: random.Random, rows: list[int], count: int, spray: bool = True
                   ) -> list[tuple[int, bytes, tuple[str, int]]]:  # fmt: skip
    """Phones' streams with everything A.1 and the parser must survive: 16-bit wraps, loss,
    reordering, duplicates, large jumps, new SSRCs, CSRCs, header extensions, padding,
    RFC 4733 events, PCMA, unknown and empty payloads, unsent pauses (the timestamp jumps,
    the sequence number does not), port-0 sources and garbage; with
    `spray`, strangers' packets too (their own SSRCs or the phone's) and some from the
    SDP address."""
    state = {r: [rng.randrange(65536) if r % 2 else 65500, rng.getrandbits(32), 7 + r]
             for r in rows}  # fmt: skip
    out: list[tuple[int, bytes, tuple[str, int]]] = []
    for _ in range(count):
        r = rng.choice(rows)
        st = state[r]
        roll = rng.random()
        if roll < 0.03:
            out.append((r, bytes(rng.randrange(0, 14)), SRC))  # too short / not version 2
            continue
        if roll < 0.06:
            st[0] = (st[0] + rng.randrange(3001, 60000)) % 65536  # a large jump
        elif roll < 0.08:
            st[2] = rng.getrandbits(32)  # a new source
        elif roll < 0.15:
            st[0] = (st[0] + rng.randrange(1, 4)) % 65536  # loss
        elif roll < 0.19:
            st[1] = (st[1] + rng.randrange(160, 1200)) % (1 << 32)  # a pause, nothing lost
        seq = st[0]
        if rng.random() < 0.1:
            seq = (seq - rng.randrange(1, 5)) % 65536  # late / duplicate
        else:
            st[0] = (st[0] + 1) % 65536
            st[1] = (st[1] + 160) % (1 << 32)
        kind = rng.random()
        pt, payload = 0, bytes(rng.getrandbits(8) for _ in range(160))
        if kind < 0.1:
            pt, payload = 101, build_event(rng.randrange(16), rng.random() < 0.3, 10, 160)
        elif kind < 0.15:
            pt = 8
        elif kind < 0.18:
            pt = 18  # G.729: not ours
        elif kind < 0.2:
            payload = b""
        elif kind < 0.22:
            payload = payload[: rng.randrange(1, 600)] * 3  # odd sizes, > ring/4 too
        pkt = RtpPacket(
            pt, seq, (st[1] + rng.choice([0, 0, 0, 7, -320])) % (1 << 32), st[2], payload,
            marker=rng.random() < 0.05,
            csrcs=tuple(range(rng.choice([0, 0, 1, 15]))),
            extension=(0xBEDE, bytes(4 * rng.randrange(3))) if rng.random() < 0.1 else None,
            padding=rng.choice([0, 0, 0, 1, 4]),
        )  # fmt: skip
        data = build_rtp(pkt)
        if rng.random() < 0.02 and len(data) > 12:
            data = data[: rng.randrange(12, len(data))]  # truncated (padding count may lie)
        src = (SRC[0], 0) if rng.random() < 0.05 else phone(r)
        if spray and rng.random() < 0.15:
            src = (f"203.0.113.{rng.randrange(3)}", 40000 + rng.randrange(3))
            if rng.random() < 0.7:  # a stranger's own SSRC, else the phone's (a replay)
                data = data[:8] + rng.getrandbits(32).to_bytes(4, "big") + data[12:]
        elif spray and rng.random() < 0.02:
            src = sdp_addr(r)
        out.append((r, data, src))
    return out


def make_tables(rows: int) -> tuple[LegTable, RxAudio]:
    tab = LegTable(capacity=rows)
    rx = RxAudio(capacity=rows)
    for r in range(rows):
        assert tab.add() == r
        i = tab.i[r]
        i[K.L_ALIVE] = 1
        i[K.L_FAST] = r != 3  # row 3: on a WebSocket, everything to Python
        i[K.L_REC] = 0 if r == 1 else -1  # row 1 recorded: its audio marked ACT_RECORD
        i[K.L_PT] = 0 if r % 3 else 96
        i[K.L_DTMF_PT] = 101 if r != 2 else -1
        i[K.L_CODEC] = r == 4  # row 4 talks PCMA
        if r != 5:  # row 5: no in-band detection
            i[K.L_RX_SLOT] = rx.add(0xD5 if r == 4 else 0xFF)
        if r != 1:  # row 1: no SDP address yet
            i[K.L_SDP_IP] = ipv4_int(sdp_addr(r)[0])
            i[K.L_SDP_PORT] = sdp_addr(r)[1]
        i[K.L_NORECV] = r == 2  # row 2: the far end is not sending (we are sendonly)
    return tab, rx


def state(tab: LegTable, rx: RxAudio) -> list[np.ndarray]:
    return [tab.i.copy(), tab.f.copy(), tab.stats.i.copy(), tab.stats.f.copy(),
            *(a.copy() for a in rx.arrays())]  # fmt: skip


RELATCH_S = 0.5


def run_rx(kernel, batch: Batch, now: float, tab: LegTable, rx: RxAudio,  # type: ignore[no-untyped-def]
           any_ssrc: bool = False) -> tuple[int, np.ndarray]:  # fmt: skip
    action = np.zeros(max(batch.n, 1), dtype=np.int8)
    seen = kernel(batch.buf, batch.lens, batch.names, batch.rows, batch.n, now, RELATCH_S,
                  any_ssrc, tab.i, tab.f, tab.stats.i, tab.stats.f, *rx.arrays(), action)  # fmt: skip
    return int(seen), action[: batch.n].copy()


@pytest.mark.parametrize("any_ssrc", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_rx_kernel_equals_twin(seed: int, any_ssrc: bool) -> None:
    rng = random.Random(seed)
    rows = list(range(6))
    a_tab, a_rx = make_tables(6)
    b_tab, b_rx = make_tables(6)
    now = 100.0
    relatched = recorded = gaps_seen = 0
    for k in range(40):  # batches with reads (ticks) in between
        items = random_packets(rng, rows, rng.randrange(0, 60))
        batch = Batch(items)
        now += rng.choice([0.01, 0.01, 0.02, 0.3, 0.7])  # 0.7: a silence, the latch may move
        if k == 20:  # a new offer/answer with the same address: silence counts from now
            a_tab.f[:, K.F_LATCH_SEEN] = b_tab.f[:, K.F_LATCH_SEEN] = np.nan
        fa, aa = run_rx(K.rx_batch, batch, now, a_tab, a_rx, any_ssrc)
        fb, ab = run_rx(K.rx_batch_py, batch, now, b_tab, b_rx, any_ssrc)
        assert fa == fb and (aa == ab).all()
        marked = np.flatnonzero(aa & K.ACT_RECORD)
        assert {items[k][0] for k in marked.tolist()} <= {1}  # the recorded row's only
        recorded += marked.size
        for k in np.flatnonzero(aa & K.ACT_RELATCHED).tolist():
            relatched += 1
            row, _, src = items[k]
            # the far end of row 2 is not sending: only its SDP address takes the latch
            assert row != 2 or src == sdp_addr(2)
        for x, y in zip(state(a_tab, a_rx), state(b_tab, b_rx), strict=True):
            np.testing.assert_array_equal(x, y)
        slots = np.array([s for s in range(a_rx.capacity) if a_rx.started[s]], dtype=np.int64)
        if slots.size:
            got, want = a_rx.read(slots), b_rx.read_py(slots)
            np.testing.assert_array_equal(got.codes, want.codes)
            np.testing.assert_array_equal(got.gaps, want.gaps)
            gaps_seen += int(got.gaps.sum())
    assert a_tab.i[:, K.L_RECEIVED].sum() > 300
    assert gaps_seen > 0  # reads found sub-blocks no packet wrote
    assert a_rx.resyncs.sum() > 6 and a_rx.late.sum() > 0  # the ring paths were taken
    # the latch paths were taken: strangers dropped, the latch moved
    assert a_tab.i[:, K.L_FOREIGN].sum() > 50 and a_tab.i[2, K.L_FOREIGN] > 0
    assert relatched == a_tab.i[:, K.L_RELATCHED].sum() > 10
    assert recorded > 20  # row 1's audio went to the recording placement


def test_rx_stats_equal_receive_stats_and_flags() -> None:
    """One leg's stream through the kernel gives the A.1/A.3/A.8 state `ReceiveStats` gets
    from the same packets one by one; events and the bridged leg's packets are flagged."""
    rng = random.Random(42)
    tab, rx = make_tables(6)
    ref = ReceiveStats()
    # all from the phone (the latch is tested below)
    items = [(r, d, phone(0)) for r, d, _ in random_packets(rng, [0], 3000, spray=False)
             if len(d) >= 12]  # fmt: skip
    # then one clean source across the 16-bit wrap, with loss and reordering
    clean = [(0, build_rtp(RtpPacket(0, s % 65536, 160 * s, 0x999, bytes(160))), phone(0))
             for s in range(65000, 66000) if s % 17]  # fmt: skip
    for k in range(5, len(clean) - 1, 23):
        clean[k], clean[k + 1] = clean[k + 1], clean[k]
    items += clean
    now = 50.0
    for start in range(0, len(items), 37):
        chunk = items[start : start + 37]
        now += 0.02
        batch = Batch(chunk)
        seen, action = run_rx(K.rx_batch, batch, now, tab, rx)
        for k, (_, data, _) in enumerate(chunk):
            try:
                pkt = parse_rtp(data)
            except ValueError:
                assert action[k] == 0
                continue
            ref.update(pkt.sequence, pkt.ssrc, now)
            if pkt.payload_type == 101:
                assert action[k] & K.ACT_PYTHON
            elif pkt.payload_type in (0, 8) and pkt.payload:
                ref.update_jitter(pkt.timestamp, now)
        assert seen == int(np.bitwise_or.reduce(action))
    got = ReceiveStats(tab.stats, 0)
    for name in ("ssrc", "base_seq", "max_seq", "cycles", "bad_seq", "received", "transit",
                 "jitter", "extended_max", "expected", "lost"):  # fmt: skip
        assert getattr(got, name) == getattr(ref, name), name
    assert got.report_block(now) == ref.report_block(now)
    assert got.cycles == 65536 and got.lost == 1000 // 17 + 1  # wrapped, lost every 17th

    # the leg that is bridged / recorded: every valid packet goes to Python (counted here)
    batch = Batch([(3, build_rtp(RtpPacket(0, 9, 99, 5, bytes(160))), phone(3))])
    assert run_rx(K.rx_batch, batch, now, tab, rx)[1][0] & K.ACT_PYTHON
    assert tab.i[3, K.L_RECEIVED] == 1 and tab.stats.i[3, K.S_MAX] == 9


@pytest.mark.parametrize("kernel", [K.rx_batch, K.rx_batch_py])
def test_rx_latches_first_source_with_a_port_and_drops_others(kernel) -> None:  # type: ignore[no-untyped-def]
    tab, rx = make_tables(6)
    pkt = build_rtp(RtpPacket(0, 1, 160, 9, bytes(160)))
    batch = Batch([(0, b"junk", ("6.6.6.6", 1)), (0, pkt, ("10.0.0.7", 0)),
                   (0, pkt, ("192.0.2.9", 31000)), (0, pkt, ("6.6.6.6", 2)),
                   (0, pkt, ("10.0.0.7", 0))])  # fmt: skip
    _, action = run_rx(kernel, batch, 0.0, tab, rx)
    assert action.tolist() == [0, 0, K.ACT_LATCHED, 0, 0]
    i = tab.i[0]
    assert i[K.L_LATCHED] == 1 and i[K.L_REMOTE_PORT] == 31000
    assert i[K.L_REMOTE_IP] == ipv4_int("192.0.2.9")
    # before the latch a port-0 source is taken (it latches nothing), after it dropped
    assert i[K.L_RECEIVED] == 2 and i[K.L_FOREIGN] == 2


# ------------------------------------------------------------ the engine: batch vs per packet


def write_wav(path: Path, seconds: float) -> None:
    t = np.arange(int(8000 * seconds)) / 8000.0
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes((np.sin(2 * np.pi * 300 * t) * 8000).astype("<i2").tobytes())


def make_engine(tmp_path: Path, kernels: bool = True) -> MediaEngine:
    write_wav(tmp_path / "p.wav", 0.5)
    engine = MediaEngine(PromptCache(tmp_path), rng=random.Random(3))
    engine.kernels = kernels
    for k, codec in enumerate(["PCMU", "PCMA", "PCMU", "PCMU"]):
        engine.add_leg(f"c{k}", 30000 + 2 * k, inband_dtmf=k != 2)
        engine.set_remote(MediaRemote(
            call_id=f"c{k}", remote_ip="10.0.0.1", remote_port=4000 + k,
            payload_type=0 if codec == "PCMU" else 8, codec=codec, dtmf_payload_type=101,
            ptime_ms=30 if k == 3 else 20,
        ))  # fmt: skip
    engine.bridge("c2", "c3")
    return engine


def digit_stream(rng: random.Random, n_ticks: int) -> list[list[tuple[str, bytes, tuple[str, int]]]]:
    """Per tick, what the phones send: audio (a 697+1209 Hz tone now and then, so in-band
    detection reports), RFC 4733 presses, some reordering."""
    from media import g711

    t = np.arange(160) / 8000.0
    tone = g711.encode((6000 * (np.sin(2 * np.pi * 697 * t) + np.sin(2 * np.pi * 1209 * t)))
                       .astype(np.int16), "PCMU").tobytes()  # fmt: skip
    quiet = bytes([0xFF]) * 160
    seq = {f"c{k}": 1000 * k for k in range(4)}
    ts = {f"c{k}": 50_000 * k for k in range(4)}
    ticks = []
    for k in range(n_ticks):
        out = []
        if k == 0:
            # A first packet from every phone (G.729: counted, latches, never forwarded), so
            # no packet is relayed before its peer has latched: the batch relays after the
            # whole receive pass (to the address the pass latched), the per-packet path at
            # once (to the SDP address until the peer's first packet).
            for cid in seq:
                out.append((cid, build_rtp(RtpPacket(18, seq[cid], ts[cid], 77, bytes(20))),
                            ("192.0.2.1", 7000 + int(cid[1]))))  # fmt: skip
                seq[cid] = (seq[cid] + 1) & 0xFFFF
        for cid in seq:
            pressing = (k // 10) % 4 == 1
            payload = tone if pressing and cid == "c0" else quiet
            pt = 8 if cid == "c1" else 0
            out.append((cid, build_rtp(RtpPacket(pt, seq[cid], ts[cid], 77, payload)),
                        ("192.0.2.1", 7000 + int(cid[1]))))  # fmt: skip
            seq[cid] = (seq[cid] + 1) & 0xFFFF
            if pressing and cid == "c1":
                end = (k % 10) == 9
                ev = build_event(5, end, 10, 160 * (k % 10 + 1))
                out.append((cid, build_rtp(RtpPacket(101, seq[cid], ts[cid], 77, ev)),
                            ("192.0.2.1", 7001)))  # fmt: skip
                seq[cid] = (seq[cid] + 1) & 0xFFFF
            ts[cid] = (ts[cid] + 160) % (1 << 32)
        if rng.random() < 0.3 and len(out) > 2:
            out[0], out[1] = out[1], out[0]
        ticks.append(out)
    return ticks


def drive(engine: MediaEngine, ticks: list[list[tuple[str, bytes, tuple[str, int]]]],
          batched: bool) -> tuple[list[Packet], list[MediaEvent]]:  # fmt: skip
    packets: list[Packet] = []
    events: list[MediaEvent] = []
    for k, items in enumerate(ticks):
        now = 10.0 + k * 0.02
        if k == 3:
            events += engine.play(MediaPlay(call_id="c0", play_id=1, file="p.wav"), now)
            events += engine.play(MediaPlay(call_id="c1", play_id=2, file="p.wav", loop=True),
                                  now)  # fmt: skip
        if batched:
            by_call = {leg.call_id: row for row, leg in engine.legs_by_row.items()}
            batch = Batch([(by_call[c], d, a) for c, d, a in items])
            p, e = engine.receive_batch(batch.buf, batch.lens, batch.names, batch.rows,
                                        batch.n, now + 0.005)  # fmt: skip
            p = engine.relayed() + p
        else:
            p, e = [], []
            for c, d, a in items:
                pp, ee = engine.receive_rtp(c, d, a, now + 0.005)
                p += pp
                e += ee
        packets += p
        events += e
        p, e = engine.tick(now)
        packets += p
        events += e
    return packets, events


def test_engine_batch_equals_per_packet(tmp_path: Path) -> None:
    ticks = digit_stream(random.Random(1), 120)
    a = make_engine(tmp_path)
    b = make_engine(tmp_path)
    pa, ea = drive(a, ticks, batched=True)
    pb, eb = drive(b, ticks, batched=False)
    assert ea == eb and pa == pb
    sources = {e.event.source for e in ea if hasattr(e.event, "source")}  # type: ignore[attr-defined]
    assert sources == {"inband", "rfc4733"}
    assert any(c == "c3" for c, _, _ in pa)  # forwarded from the bridged leg
    for cid in a.legs:
        la, lb = a.legs[cid], b.legs[cid]
        assert (la.remote, la.latched, la.packets_received) == (lb.remote, lb.latched,
                                                                lb.packets_received)  # fmt: skip
        assert la.rx_stats.report_block(1.0) == lb.rx_stats.report_block(1.0)
        assert (la.seq, la.ts, la.packets_sent) == (lb.seq, lb.ts, lb.packets_sent)
    assert a.legs["c0"].remote == ("192.0.2.1", 7000)
    # every leg on the kernel's path, the bridged ones too (relay_batch forwards them)
    assert [int(a.tab.i[leg.row, K.L_FAST]) for leg in a.legs.values()] == [1, 1, 1, 1]
    c2, c3 = a.legs["c2"].row, a.legs["c3"].row
    assert a.tab.i[c2, K.L_PEER] == c3 and a.tab.i[c3, K.L_PEER] == c2


def test_pump_kernel_equals_twin(tmp_path: Path) -> None:
    ticks = digit_stream(random.Random(2), 150)
    pa, ea = drive(make_engine(tmp_path, kernels=True), ticks, batched=True)
    pb, eb = drive(make_engine(tmp_path, kernels=False), ticks, batched=True)
    assert pa == pb and ea == eb
    # 0.5 s prompt, then fill frames (the kernel's equal the twin's too)
    c0 = [d for c, d, _ in pa if c == "c0"]
    assert sum(1 for d in c0 if set(d[12:]) != {0xFF}) == 25 and len(c0) > 25
    assert any(e.event.type == "audio_complete" for e in ea)  # type: ignore[attr-defined]


def test_pump_grows_its_buffer_and_bursts(tmp_path: Path) -> None:
    write_wav(tmp_path / "p.wav", 1.0)
    engine = MediaEngine(PromptCache(tmp_path), rng=random.Random(3))
    engine.tx.__init__(capacity=2, width=20)  # type: ignore[misc]
    for k in range(5):
        engine.add_leg(f"c{k}", 30000 + 2 * k)
        engine.set_remote(MediaRemote(call_id=f"c{k}", remote_ip="10.0.0.1",
                                      remote_port=4000 + k, payload_type=0, codec="PCMU"))  # fmt: skip
        engine.play(MediaPlay(call_id=f"c{k}", play_id=1, file="p.wav"), 0.0)
    packets, _ = engine.tick(0.0)
    assert len(packets) == 5 and engine.tx.data.shape[0] >= 5
    packets, _ = engine.tick(1.0)  # a late tick: at most MAX_BURST_FRAMES each
    assert len(packets) == 5 * K.MAX_BURST_FRAMES


# ------------------------------------------------------------ the compiled sendto loop


def test_send_loop_puts_the_python_paths_bytes_on_the_wire(tmp_path: Path) -> None:
    phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    phone.bind(("127.0.0.1", 0))
    phone.settimeout(2.0)
    write_wav(tmp_path / "p.wav", 0.2)
    engine = MediaEngine(PromptCache(tmp_path), rng=random.Random(3))
    twin = MediaEngine(PromptCache(tmp_path), rng=random.Random(3))
    twin.kernels = False
    rs = RtpSockets(batch=16)
    socks = []
    try:
        for k in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            socks.append(s)
            for e in (engine, twin):
                leg = e.add_leg(f"c{k}", s.getsockname()[1])
                e.set_remote(MediaRemote(call_id=f"c{k}", remote_ip="127.0.0.1",
                                         remote_port=phone.getsockname()[1],
                                         payload_type=8 if k == 1 else 0,
                                         codec="PCMA" if k == 1 else "PCMU"))  # fmt: skip
                e.play(MediaPlay(call_id=f"c{k}", play_id=1, file="p.wav", loop=True), 0.0)
            rs.add(f"c{k}", s, leg.row)
        port_of = {f"c{k}": s.getsockname()[1] for k, s in enumerate(socks)}
        for t in range(12):
            engine.tick_batch(t * 0.02)
            tx = engine.tx
            assert rs.send(tx.data, tx.lens, tx.rows, tx.ips, tx.ports, tx.n).size == 0
            expected, _ = twin.tick(t * 0.02)  # the Python path: build_header + payload
            got = [phone.recvfrom(2048) for _ in range(tx.n)]
            assert sorted((d, a[1]) for d, a in got) == sorted(
                (d, port_of[c]) for c, d, _ in expected
            )
        # a leg without a socket here (IPv6 on asyncio) comes back unsent
        rs.remove("c2")
        engine.tick_batch(0.3)
        tx = engine.tx
        unsent = rs.send(tx.data, tx.lens, tx.rows, tx.ips, tx.ports, tx.n)
        rows = [engine.legs_by_row[int(r)].call_id for r in tx.rows[: tx.n]]
        assert [rows[k] for k in unsent] == ["c2"] * rows.count("c2") and len(rows) == 12
    finally:
        phone.close()
        for s in socks:
            s.close()


def test_every_action_bit_fits_the_engines_int8_action_array() -> None:
    """`MediaEngine` keeps each packet's ACT_* bits in an int8 array and `rx_batch`
    returns their union: a flag of 128 or more would come out negative there."""
    flags = {name: getattr(K, name) for name in dir(K) if name.startswith("ACT_")}
    assert len(flags) >= 5
    union = 0
    for name, value in flags.items():
        assert value > 0 and value & (value - 1) == 0, f"{name} is not one bit"
        assert union & value == 0, f"{name} shares a bit with another flag"
        union |= value
    assert np.int8(union) == union  # the union of all of them still fits

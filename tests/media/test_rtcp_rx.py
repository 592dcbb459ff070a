"""RFC 3550 receive statistics and RTCP reports, the receive ring, latching and RTCP in the
engine — all on a virtual clock."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from media.engine import MediaEngine
from media.prompts import PromptCache
from media.rtcp import (
    RTCP_RR,
    RTCP_SDES,
    RTCP_SR,
    ReceiveStats,
    RtcpError,
    build_report,
    ntp_timestamp,
    parse_compound,
)
from media.rtp import RtpPacket, build_rtp
from media.rxaudio import TICK_SAMPLES, RxAudio
from pbx.messages import MediaRemote

# ------------------------------------------------------------ ReceiveStats


def test_stats_count_loss_wrap_and_duplicates() -> None:
    st = ReceiveStats()
    seqs = [65530 + i for i in range(6)] + [0, 1, 3, 4, 4]  # wraps, 2 lost, 4 twice
    for s in seqs:
        st.update(s % 65536, 7, 0.0)
    assert st.extended_max == 65536 + 4
    assert st.expected == 11 and st.received == 11 and st.lost == 0  # dup offsets the loss
    block = st.report_block(0.0)
    assert block[0] == 7 and block[2] == 65536 + 4


def test_stats_fraction_lost_per_interval() -> None:
    st = ReceiveStats()
    for s in range(100):
        if s % 4 != 3:  # a quarter lost
            st.update(s, 1, 0.0)
    st.update(100, 1, 0.0)
    _, fl, *_ = st.report_block(1.0)
    assert fl >> 24 == int(25 / 101 * 256) and fl & 0xFFFFFF == 25
    for s in range(101, 201):  # nothing lost in the next interval
        st.update(s, 1, 0.0)
    _, fl, *_ = st.report_block(2.0)
    assert fl >> 24 == 0 and fl & 0xFFFFFF == 25  # cumulative stays


def test_stats_large_jump_needs_two_packets_and_new_ssrc_restarts() -> None:
    st = ReceiveStats()
    for s in range(10):
        st.update(s, 1, 0.0)
    st.update(30000, 1, 0.0)  # a lone jump is ignored (A.1 bad_seq)
    assert st.max_seq == 9
    st.update(30001, 1, 0.0)  # the next one follows it: resync
    assert st.max_seq == 30001 and st.base_seq == 30001
    st.update(5, 2, 0.0)  # another SSRC: start over
    assert st.ssrc == 2 and st.received == 1 and st.lost == 0


def test_jitter_a8() -> None:
    st = ReceiveStats()
    st.update(0, 1, 0.0)
    for k in range(200):  # 20 ms packets arriving alternately 0 and 4 ms late
        st.update_jitter(160 * k, k * 0.020 + (0.004 if k % 2 else 0.0))
    # |D| = 32 samples every packet: J converges to 32
    assert abs(st.jitter - 32) < 0.5
    st.update_jitter(160 * 200 + (1 << 31), 200 * 0.02)  # a timestamp jump is not jitter
    assert abs(st.jitter - 32) < 0.5


# ------------------------------------------------------------ RTCP packets


def test_sr_and_rr_roundtrip_with_sdes() -> None:
    st = ReceiveStats()
    for s in range(50):
        st.update(s, 0xABC, 0.0)
    st.lsr, st.lsr_at = 0x12345678, 1.0
    sr = build_report(0x55, "pbx@host", 1.5, 1_700_000_000.25, st, (1000, 50, 8000))
    assert sr[1] == RTCP_SR and len(sr) % 4 == 0
    # the SDES CNAME follows the SR in the same compound packet
    sr_len = 4 * (int.from_bytes(sr[2:4], "big") + 1)
    assert sr[sr_len + 1] == RTCP_SDES and b"pbx@host" in sr[sr_len:]
    (report,) = parse_compound(sr)
    assert report.ssrc == 0x55
    assert report.sender == (*ntp_timestamp(1_700_000_000.25), 1000, 50, 8000)
    (block,) = report.blocks
    assert block.ssrc == 0xABC and block.extended_max_seq == 49 and block.cumulative_lost == 0
    assert block.lsr == 0x12345678 and block.dlsr == 32768  # 0.5 s in 1/65536 s

    rr = build_report(0x55, "x", 0.0, 0.0, ReceiveStats(), None)
    assert rr[1] == RTCP_RR and rr[0] & 0x1F == 0  # no source heard: no block
    assert parse_compound(rr)[0].blocks == ()


def test_parse_rejects_garbage() -> None:
    for bad in (b"", b"\x00" * 8, b"\x80\xc9\x00\x09" + b"\x00" * 4):
        try:
            parse_compound(bad)
        except RtcpError:
            continue
        raise AssertionError(f"accepted {bad!r}")


# ------------------------------------------------------------ RxAudio


def frame(value: int, n: int = 160) -> bytes:
    return bytes([value]) * n


def test_ring_reorders_and_fills_losses_with_silence() -> None:
    rx = RxAudio(capacity=1)
    slot = rx.add(0xFF)
    base = 1000
    # packets 0..5 of 160 samples, arriving 0,2,1,3,5 (4 lost)
    for k in (0, 2, 1, 3, 5):
        rx.put(slot, base + 160 * k, frame(k), 0.0)
    out = np.concatenate([rx.read(np.array([slot])).codes[0] for _ in range(9)])
    # the read begins one tick plus two packets before the first packet
    lead = TICK_SAMPLES + 2 * 160
    assert (out[:lead] == 0xFF).all()
    got = out[lead:].reshape(-1, 160)[:, 0].tolist()
    assert got == [0, 1, 2, 3, 0xFF, 5]
    assert rx.late[slot] == 0


def test_ring_read_marks_the_sub_blocks_no_packet_wrote() -> None:
    """A lost packet is silence *and* a gap (in-band detection holds over it); a packet
    that covers part of a tick leaves the rest of the tick a gap."""
    rx = RxAudio(capacity=1)
    slot = rx.add(0xFF)
    for k in (0, 1, 3):  # packet 2 lost
        rx.put(slot, 1000 + 160 * k, frame(k), 0.0)
    rx.put(slot, 1000 + 160 * 4, frame(4, 80), 0.0)  # half a tick
    ticks = [rx.read(np.array([slot])) for _ in range(9)]
    gaps = np.concatenate([t.gaps for t in ticks]).tolist()
    codes = np.concatenate([t.codes for t in ticks])
    lead = 3  # one tick plus two packets before the first packet
    assert gaps[:lead] == [[True] * 4] * lead
    assert gaps[lead:] == [[False] * 4, [False] * 4, [True] * 4, [False] * 4,
                           [False, False, True, True], [True] * 4]  # fmt: skip
    assert codes[lead + 2].tolist() == [0xFF] * 160 and codes.dtype == np.uint8
    # read_py is the same read
    twin = RxAudio(capacity=1)
    s2 = twin.add(0xFF)
    for k in (0, 1, 3):
        twin.put(s2, 1000 + 160 * k, frame(k), 0.0)
    twin.put(s2, 1000 + 160 * 4, frame(4, 80), 0.0)
    for t in ticks:
        got = twin.read_py(np.array([s2]))
        np.testing.assert_array_equal(got.codes, t.codes)
        np.testing.assert_array_equal(got.gaps, t.gaps)


def test_ring_tells_an_unsent_pause_from_loss() -> None:
    """The sequence number after a timestamp jump: directly the next one, the sender
    paused and the pause reads as heard silence; skipped, packets were lost (gaps)."""
    for skipped, want_gaps in ((0, False), (1, True)):
        rx = RxAudio(capacity=1)
        slot = rx.add(0xFF)
        rx.put(slot, 1000, frame(1), 0.0, seq=10)
        rx.put(slot, 1160, frame(2), 0.0, seq=11)
        rx.put(slot, 1160 + 160 * 3, frame(3), 0.0, seq=12 + skipped)  # 40 ms of nothing
        ticks = [rx.read(np.array([slot])) for _ in range(7)]
        codes = [int(t.codes[0, 0]) for t in ticks[3:]]
        assert codes == [1, 2, 0xFF, 0xFF]
        assert [bool(t.gaps.any()) for t in ticks[5:7]] == [want_gaps, want_gaps]
        assert not ticks[3].gaps.any() and not ticks[4].gaps.any()


def test_ring_drops_late_packets_then_resyncs() -> None:
    rx = RxAudio(capacity=1)
    slot = rx.add(0xD5)
    rx.put(slot, 0, frame(1), 0.0)
    for _ in range(10):
        rx.read(np.array([slot]))
    rx.put(slot, 160, frame(2), 0.0)  # long behind the read position: late
    assert rx.late[slot] == 1 and rx.resyncs[slot] == 1
    rx.put(slot, 320, frame(2), 0.0)
    rx.put(slot, 480, frame(2), 0.0)  # third late in a row: re-anchor on it
    assert rx.resyncs[slot] == 2
    rx.put(slot, 10_000_000, frame(3), 0.0)  # a jump far ahead: re-anchor
    assert rx.resyncs[slot] == 3


def test_ring_timestamp_wrap_and_growth() -> None:
    rx = RxAudio(capacity=1, grow_by=2)
    slots = [rx.add(0xFF) for _ in range(5)]
    assert rx.capacity >= 5
    s = slots[-1]
    ts = (1 << 32) - 200
    for k in range(4):
        rx.put(s, (ts + 160 * k) % (1 << 32), frame(10 + k), 0.0)
    out = np.concatenate([rx.read(np.array([s])).codes[0] for _ in range(7)])
    vals = [v for v in out.tolist() if v != 0xFF]
    assert vals == [10] * 160 + [11] * 160 + [12] * 160 + [13] * 160


# ------------------------------------------------------------ the engine


def make_engine(tmp_path: Path) -> MediaEngine:
    # Packet counts of the prompt alone (no fill frames after it).
    engine = MediaEngine(PromptCache(tmp_path), rng=random.Random(5), fill_gaps=False)
    engine.add_leg("a", 30000)
    engine.set_remote(
        MediaRemote(
            call_id="a", remote_ip="10.0.0.1", remote_port=4000, payload_type=0, codec="PCMU",
        )  # fmt: skip
    )
    return engine


def test_latching_follows_the_first_packet_once(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    leg = engine.legs["a"]
    assert leg.remote == ("10.0.0.1", 4000) and leg.rtcp_remote == ("10.0.0.1", 4001)
    pkt = build_rtp(RtpPacket(0, 1, 160, 9, frame(0xFF)))
    engine.receive_rtp("a", b"junk", ("6.6.6.6", 1), 0.0)  # not RTP: no latch
    assert leg.remote == ("10.0.0.1", 4000)
    engine.receive_rtp("a", pkt, ("192.0.2.7", 31000), 0.0)
    assert leg.remote == ("192.0.2.7", 31000)
    engine.receive_rtp("a", pkt, ("6.6.6.6", 2), 0.0)  # later sources do not move it
    assert leg.remote == ("192.0.2.7", 31000)
    # the same SDP again (a re-INVITE that changed nothing) keeps the latch
    engine.set_remote(
        MediaRemote(call_id="a", remote_ip="10.0.0.1", remote_port=4000, payload_type=0,
                    codec="PCMU")  # fmt: skip
    )
    assert leg.remote == ("192.0.2.7", 31000)
    # a new SDP address: send there until the next packet latches again
    engine.set_remote(
        MediaRemote(call_id="a", remote_ip="10.0.0.9", remote_port=5000, payload_type=0,
                    codec="PCMU")  # fmt: skip
    )
    assert leg.remote == ("10.0.0.9", 5000) and not leg.latched


def test_rtcp_reports_every_5_s_sr_rr_and_stats_on_release(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    engine.wall_offset = 1_700_000_000.0
    sent: list[tuple[float, bytes]] = []
    seq = 0
    for k in range(1, 1501):  # 30 s of ticks; the phone sends every 20 ms, loses every 50th
        now = k * 0.02
        if k % 50:
            engine.receive_rtp("a", build_rtp(RtpPacket(0, seq, 160 * k, 9, frame(0xFF))),
                               ("10.0.0.1", 4000), now)  # fmt: skip
        seq += 1
        engine.tick(now)
        sent += [(now, p[1]) for p in engine.rtcp_due(now)]
        assert all(p[0] == "a" and p[2] == ("10.0.0.1", 4001) for p in engine.rtcp_due(now))
    times = [t for t, _ in sent]
    gaps = np.diff(times)
    assert 4 <= len(sent) <= 12 and (gaps >= 2.5 - 1e-9).all() and (gaps <= 7.5 + 1e-9).all()
    first = parse_compound(sent[0][1])[0]
    assert first.sender is None  # nothing sent yet: RR
    (block,) = parse_compound(sent[-1][1])[0].blocks
    assert block.ssrc == 9 and 0 < block.cumulative_lost <= 30

    # the far end's SR and RR come back on RTCP: LSR kept, its view of us reported
    leg = engine.legs["a"]
    theirs = ReceiveStats()
    theirs.update(0, leg.ssrc, 0.0)
    theirs.update(10, leg.ssrc, 0.0)  # they lost 9 of ours
    # (from another port of the peer's IP, as through a NAT: it latches there)
    engine.receive_rtcp("a", build_report(9, "p", 0.0, 1e9, theirs, (0, 1, 160)),
                        ("10.0.0.1", 5555), 31.0)  # fmt: skip
    assert leg.rtcp_remote == ("10.0.0.1", 5555) and leg.rx_stats.lsr_at == 31.0
    released = engine.remove_leg("a")
    assert released.remote_packets_lost == 9 and released.rtcp_received == 1
    assert 0 < released.packets_lost <= 30 and released.rtcp_sent == len(sent)
    assert released.jitter_ms < 1.0

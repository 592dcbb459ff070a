"""The sans-IO media engine on a virtual clock."""

from __future__ import annotations

import random
import wave
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from media import g711
from media.engine import MAX_BURST_FRAMES, EngineError, MediaEngine, Packet
from media.prompts import PromptCache
from media.rtp import RtpPacket, build_event, build_rtp, parse_rtp, seq_diff, ts_diff
from pbx.messages import (
    AudioComplete,
    DtmfDigit,
    MediaDtmfInfo,
    MediaEvent,
    MediaFailure,
    MediaPlay,
    MediaRemote,
    MediaTimer,
    TimerFired,
)

TICK = 0.020
PHONE = ("127.0.0.1", 40000)
PEER_PHONE = ("127.0.0.1", 40002)


def write_wav(path: Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(samples.astype("<i2").tobytes())


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(8000 * seconds))) / 8000.0
    return (np.sin(2 * np.pi * hz * t) * 10000).astype(np.int16)


class Clock:
    """Drives the engine like the worker does: ticks at k * 20 ms."""

    def __init__(self, engine: MediaEngine) -> None:
        self.engine = engine
        self.k = 0
        self.packets: list[tuple[float, Packet]] = []
        self.events: list[tuple[float, MediaEvent]] = []

    @property
    def now(self) -> float:
        return self.k * TICK

    def run(self, seconds: float) -> None:
        for _ in range(int(round(seconds / TICK))):
            self.k += 1
            packets, events = self.engine.tick(self.now)
            self.packets += [(self.now, p) for p in packets]
            self.events += [(self.now, e) for e in events]

    def rtp(self, call_id: str | None = None) -> list[RtpPacket]:
        return [parse_rtp(p[1]) for _, p in self.packets if call_id in (None, p[0])]


@pytest.fixture
def engine(tmp_path: Path) -> MediaEngine:
    sounds = tmp_path / "sounds"
    write_wav(sounds / "one_second.wav", tone(1.0))
    write_wav(sounds / "short.wav", tone(0.05))  # 2.5 frames of 20 ms
    write_wav(sounds / "half.wav", tone(0.5))
    # The prompt pump alone: no fill frames between prompts (tests/media/test_fill.py).
    return MediaEngine(PromptCache(sounds), rng=random.Random(7), fill_gaps=False)


def add(
    engine: MediaEngine,
    call_id: str = "c1",
    codec: str = "PCMU",
    ptime_ms: int = 20,
    remote: tuple[str, int] = PHONE,
) -> None:
    engine.add_leg(call_id, 20000, inband_dtmf=False)
    engine.set_remote(
        MediaRemote(
            call_id=call_id,
            remote_ip=remote[0],
            remote_port=remote[1],
            payload_type=0 if codec == "PCMU" else 8,
            codec=codec,  # type: ignore[arg-type]
            dtmf_payload_type=101,
            ptime_ms=ptime_ms,
        )
    )


def play(
    engine: MediaEngine,
    now: float,
    file: str = "one_second.wav",
    play_id: int = 1,
    interruptible: bool = False,
    call_id: str = "c1",
    loop: bool = False,
) -> list[MediaEvent]:
    return engine.play(
        MediaPlay(
            call_id=call_id, play_id=play_id, file=file, interruptible=interruptible, loop=loop
        ),
        now,
    )


def dtmf_packet(ts: int, event: int, end: bool, seq: int = 1) -> bytes:
    return build_rtp(RtpPacket(101, seq, ts, 0x1234, build_event(event, end, 10, 800)))


def bodies(clock: Clock) -> list[object]:
    return [e.event for _, e in clock.events]


def assert_continuous(pkts: list[RtpPacket], spf: int) -> None:
    for a, b in pairwise(pkts):
        assert seq_diff(b.sequence, a.sequence) == 1
        assert ts_diff(b.timestamp, a.timestamp) == spf


def test_one_second_prompt_at_20ms(engine: MediaEngine) -> None:
    add(engine)
    clock = Clock(engine)
    clock.run(0.1)
    assert play(engine, clock.now) == []
    start = clock.now
    clock.run(1.2)
    pkts = clock.rtp()
    assert len(pkts) == 50
    assert all(p.payload_type == 0 and len(p.payload) == 160 for p in pkts)
    assert pkts[0].marker and not any(p.marker for p in pkts[1:])
    assert len({p.ssrc for p in pkts}) == 1
    assert_continuous(pkts, 160)
    times = [t for t, _ in clock.packets]
    assert np.allclose(np.diff(times), TICK)  # one frame per tick, no drift
    assert all(dest == PHONE for _, (_, _, dest) in clock.packets)
    codes = b"".join(p.payload for p in pkts)
    assert codes == engine.prompts.encoded("one_second.wav", "PCMU").tobytes()
    [(t_end, ev)] = clock.events
    assert ev.event == AudioComplete(play_id=1) and ev.call_id == "c1"
    assert t_end == pytest.approx(start + 1.0 + TICK)  # first tick after the audio's end
    assert t_end > times[-1]
    assert engine.legs["c1"].packets_sent == 50


def test_ptime_30(engine: MediaEngine) -> None:
    add(engine, ptime_ms=30)
    clock = Clock(engine)
    play(engine, clock.now, file="half.wav")
    clock.run(0.7)
    pkts = clock.rtp()
    assert len(pkts) == 17  # ceil(4000 / 240)
    assert all(len(p.payload) == 240 for p in pkts)
    assert_continuous(pkts, 240)
    # the last frame is padded with µ-law silence
    assert pkts[-1].payload.endswith(bytes([0xFF]) * (17 * 240 - 4000))
    # each frame goes out at the first tick at or after origin + k * 30 ms
    times = [t for t, _ in clock.packets]
    origin = times[0]
    for k, t in enumerate(times):
        assert origin + k * 0.030 <= t + 1e-9 < origin + k * 0.030 + TICK
    assert bodies(clock) == [AudioComplete(play_id=1)]


def test_short_prompt_padded_and_seq_ts_continue_across_prompts(engine: MediaEngine) -> None:
    add(engine, codec="PCMA")
    clock = Clock(engine)
    play(engine, clock.now, file="short.wav", play_id=1)
    clock.run(0.2)
    play(engine, clock.now, file="short.wav", play_id=2)
    clock.run(0.2)
    pkts = clock.rtp()
    assert len(pkts) == 6
    assert [p.marker for p in pkts] == [True, False, False, True, False, False]
    assert pkts[2].payload.endswith(bytes([0xD5]) * 80)  # A-law silence
    assert all(seq_diff(b.sequence, a.sequence) == 1 for a, b in pairwise(pkts))
    # the timestamp follows the clock over the pause between the prompts
    gap = ts_diff(pkts[3].timestamp, pkts[2].timestamp)
    sent_gap = clock.packets[3][0] - clock.packets[2][0]
    assert gap == round(sent_gap * 8000)
    assert bodies(clock) == [AudioComplete(play_id=1), AudioComplete(play_id=2)]


def test_new_prompt_replaces_without_complete(engine: MediaEngine) -> None:
    add(engine)
    clock = Clock(engine)
    play(engine, clock.now, play_id=1)
    clock.run(0.2)
    play(engine, clock.now, file="short.wav", play_id=2)
    clock.run(0.2)
    assert bodies(clock) == [AudioComplete(play_id=2)]
    assert len(clock.rtp()) == 10 + 3


def test_interruptible_prompt_stops_on_digit(engine: MediaEngine) -> None:
    add(engine)
    clock = Clock(engine)
    play(engine, clock.now, interruptible=True, play_id=4)
    clock.run(0.2)
    for pkt in (
        dtmf_packet(5000, 5, False),
        dtmf_packet(5000, 5, True),
        dtmf_packet(5000, 5, True),
        dtmf_packet(5000, 5, True),
    ):
        out, events = engine.receive_rtp("c1", pkt, PHONE, clock.now)
        assert out == []
        clock.events += [(clock.now, e) for e in events]
    clock.run(1.2)
    assert bodies(clock) == [DtmfDigit(digit="5", stopped_play_id=4)]
    assert len(clock.rtp()) == 10  # nothing after the digit
    assert engine.legs["c1"].packets_received == 4


def test_non_interruptible_continues_and_reports_digit(engine: MediaEngine) -> None:
    add(engine)
    clock = Clock(engine)
    play(engine, clock.now, interruptible=False, play_id=4)
    clock.run(0.2)
    _, events = engine.receive_rtp("c1", dtmf_packet(5000, 11, True), PHONE, clock.now)
    clock.events += [(clock.now, e) for e in events]
    clock.run(1.2)
    assert bodies(clock) == [DtmfDigit(digit="#"), AudioComplete(play_id=4)]
    assert len(clock.rtp()) == 50


def test_dtmf_info(engine: MediaEngine) -> None:
    add(engine)
    play(engine, 0.0, interruptible=True, play_id=9)
    [ev] = engine.dtmf_info(MediaDtmfInfo(call_id="c1", digit="*"), 0.05)
    assert ev.event == DtmfDigit(digit="*", source="info", stopped_play_id=9)
    [ev] = engine.dtmf_info(MediaDtmfInfo(call_id="c1", digit="x"), 0.05)
    assert isinstance(ev.event, MediaFailure)


def test_timers(engine: MediaEngine) -> None:
    add(engine)
    clock = Clock(engine)
    engine.set_timer(MediaTimer(call_id="c1", timer_id=1, delay_ms=100), clock.now)
    clock.run(0.08)
    assert clock.events == []
    clock.run(0.04)
    assert [(round(t, 3), e.event) for t, e in clock.events] == [(0.1, TimerFired(timer_id=1))]
    # re-arming replaces the previous timer; delay 0 cancels
    engine.set_timer(MediaTimer(call_id="c1", timer_id=2, delay_ms=100), clock.now)
    engine.set_timer(MediaTimer(call_id="c1", timer_id=3, delay_ms=200), clock.now)
    clock.run(0.5)
    assert bodies(clock)[1:] == [TimerFired(timer_id=3)]
    engine.set_timer(MediaTimer(call_id="c1", timer_id=4, delay_ms=50), clock.now)
    engine.set_timer(MediaTimer(call_id="c1", timer_id=4, delay_ms=0), clock.now)
    clock.run(0.5)
    assert len(clock.events) == 2


def test_play_errors(engine: MediaEngine) -> None:
    add(engine)
    [ev] = play(engine, 0.0, file="../etc/passwd", play_id=3)
    assert isinstance(ev.event, MediaFailure) and ev.event.play_id == 3
    assert "outside" in ev.event.reason
    [ev] = play(engine, 0.0, file="missing.wav", play_id=4)
    assert isinstance(ev.event, MediaFailure) and "no such prompt" in ev.event.reason
    [ev] = play(engine, 0.0, call_id="nope")
    assert isinstance(ev.event, MediaFailure)
    with pytest.raises(EngineError):
        engine.stop("nope")


def test_no_remote_no_packets(engine: MediaEngine) -> None:
    engine.add_leg("c1", 20000)
    clock = Clock(engine)
    play(engine, clock.now, file="short.wav")
    clock.run(0.2)
    assert clock.packets == [] and bodies(clock) == [AudioComplete(play_id=1)]


def test_remote_set_mid_prompt_marks_first_packet_and_reencodes(engine: MediaEngine) -> None:
    engine.add_leg("c1", 20000)
    clock = Clock(engine)
    play(engine, clock.now, file="half.wav")
    clock.run(0.1)
    engine.set_remote(
        MediaRemote(
            call_id="c1", remote_ip=PHONE[0], remote_port=PHONE[1], payload_type=8, codec="PCMA"
        )
    )
    clock.run(0.6)
    pkts = clock.rtp()
    assert len(pkts) == 20 and pkts[0].marker and pkts[0].payload_type == 8
    assert (
        pkts[0].payload == engine.prompts.encoded("half.wav", "PCMA")[5 * 160 : 6 * 160].tobytes()
    )


def test_loop_plays_until_stopped(engine: MediaEngine) -> None:
    add(engine)
    clock = Clock(engine)
    play(engine, clock.now, file="short.wav", loop=True)
    clock.run(1.0)
    assert clock.events == []
    assert len(clock.rtp()) == 50  # 2.5 frames, padded to 3, per loop
    engine.stop("c1")
    clock.run(0.2)
    assert len(clock.rtp()) == 50


def test_late_tick_bursts_at_most_a_few_frames(engine: MediaEngine) -> None:
    add(engine)
    play(engine, 0.0)
    engine.tick(0.02)
    packets, _ = engine.tick(0.5)
    assert len(packets) == MAX_BURST_FRAMES
    packets, _ = engine.tick(0.52)
    assert len(packets) == 1


def test_remove_leg_counts(engine: MediaEngine) -> None:
    add(engine)
    clock = Clock(engine)
    play(engine, clock.now, file="short.wav")
    engine.receive_rtp("c1", b"\x00garbage", PHONE, 0.0)  # not counted
    engine.receive_rtp("c1", build_rtp(RtpPacket(0, 1, 1, 1, b"\xff" * 160)), PHONE, 0.0)
    clock.run(0.2)
    released = engine.remove_leg("c1")
    assert (released.packets_sent, released.packets_received) == (3, 1)
    assert engine.remove_leg("c1").packets_sent == 0
    clock.run(0.2)
    assert len(clock.packets) == 3


def test_bridge_forwards_with_transcoding(engine: MediaEngine) -> None:
    add(engine, "a", codec="PCMU", remote=PHONE)
    add(engine, "b", codec="PCMA", remote=PEER_PHONE)
    engine.bridge("a", "b")
    pcm = tone(0.2, hz=700)
    mu = g711.encode(pcm, "PCMU")
    out: list[Packet] = []
    for i in range(10):
        data = build_rtp(
            RtpPacket(
                0,
                100 + i,
                8000 + 160 * i,
                0xAAAA,
                mu[i * 160 : (i + 1) * 160].tobytes(),
                marker=i == 0,
            )
        )
        packets, events = engine.receive_rtp("a", data, PHONE, 0.02 * i)
        assert events == []
        out += packets
    assert [(c, dest) for c, _, dest in out] == [("b", PEER_PHONE)] * 10
    fwd = [parse_rtp(d) for _, d, _ in out]
    b = engine.legs["b"]
    assert all(p.payload_type == 8 and p.ssrc == b.ssrc for p in fwd)
    assert fwd[0].marker
    assert_continuous(fwd, 160)
    decoded = g711.decode(np.frombuffer(b"".join(p.payload for p in fwd), np.uint8), "PCMA")
    np.testing.assert_allclose(decoded, pcm, atol=400)
    assert np.corrcoef(decoded.astype(float), pcm.astype(float))[0, 1] > 0.999

    # the other way, PCMA -> PCMU
    a_law = g711.encode(pcm[:160], "PCMA").tobytes()
    packets, _ = engine.receive_rtp(
        "b", build_rtp(RtpPacket(8, 1, 1, 0xBBBB, a_law)), PEER_PHONE, 0.3
    )
    [(call_id, data, dest)] = packets
    back = parse_rtp(data)
    assert (call_id, dest, back.payload_type, back.ssrc) == ("a", PHONE, 0, engine.legs["a"].ssrc)
    np.testing.assert_allclose(
        g711.decode(np.frombuffer(back.payload, np.uint8), "PCMU"), pcm[:160], atol=400
    )


def test_bridge_forwards_rfc4733_with_peer_payload_type(engine: MediaEngine) -> None:
    add(engine, "a")
    engine.add_leg("b", 20002)
    engine.set_remote(
        MediaRemote(
            call_id="b",
            remote_ip=PEER_PHONE[0],
            remote_port=PEER_PHONE[1],
            payload_type=0,
            codec="PCMU",
            dtmf_payload_type=96,
        )
    )
    engine.bridge("a", "b")
    packets, events = engine.receive_rtp("a", dtmf_packet(4000, 3, True), PHONE, 0.0)
    assert [e.event for e in events] == [DtmfDigit(digit="3")]
    [(call_id, data, dest)] = packets
    fwd = parse_rtp(data)
    assert (call_id, dest, fwd.payload_type) == ("b", PEER_PHONE, 96)
    assert fwd.payload == build_event(3, True, 10, 800)


def test_bridged_leg_playing_a_prompt_takes_no_forwarded_audio(engine: MediaEngine) -> None:
    add(engine, "a")
    add(engine, "b", remote=PEER_PHONE)
    engine.bridge("a", "b")
    play(engine, 0.0, call_id="b", file="short.wav")
    data = build_rtp(RtpPacket(0, 1, 1, 1, b"\xff" * 160))
    assert engine.receive_rtp("a", data, PHONE, 0.0) == ([], [])
    for k in range(1, 10):
        engine.tick(k * TICK)  # prompt over
    [(call_id, _, _)] = engine.receive_rtp("a", data, PHONE, 0.21)[0]
    assert call_id == "b"


def test_unknown_and_duplicate_legs(engine: MediaEngine) -> None:
    add(engine)
    with pytest.raises(EngineError):
        engine.add_leg("c1", 1)
    with pytest.raises(EngineError):
        engine.bridge("c1", "c1")
    with pytest.raises(EngineError):
        engine.set_timer(MediaTimer(call_id="x", timer_id=1, delay_ms=1), 0.0)
    assert engine.receive_rtp("x", b"", PHONE, 0.0) == ([], [])


# ------------------------------------------------------------ hold (RFC 3264 direction)


def direct(engine: MediaEngine, direction: str, call_id: str = "c1", remote=PHONE) -> None:
    """A repeated MediaRemote (as after a re-INVITE) with our side's direction."""
    engine.set_remote(
        MediaRemote(
            call_id=call_id,
            remote_ip=remote[0],
            remote_port=remote[1],
            payload_type=0,
            codec="PCMU",
            dtmf_payload_type=101,
            direction=direction,  # type: ignore[arg-type]
        )
    )


@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("hold", ["recvonly", "inactive"])
def test_held_leg_sends_no_prompt_but_completes_on_time(
    engine: MediaEngine, kernels: bool, hold: str
) -> None:
    engine.kernels = kernels
    add(engine, "c1")
    add(engine, "c2", remote=PEER_PHONE)  # the same prompt, never held: the reference
    clock = Clock(engine)
    play(engine, clock.now, call_id="c1")
    play(engine, clock.now, call_id="c2")
    clock.run(0.2)
    before = clock.rtp("c1")
    assert len(before) == 10
    direct(engine, hold)
    assert not engine.legs["c1"].sending
    mark = len(clock.packets)
    clock.run(0.3)
    assert all(p[0] == "c2" for _, p in clock.packets[mark:])  # c1 silent while held
    direct(engine, "sendrecv")
    assert engine.legs["c1"].sending
    clock.run(0.7)
    after = clock.rtp("c1")[10:]
    assert len(after) == 50 - 10 - 15  # the held frames were skipped, not delayed
    # the prompt's clock ran on: the first frame after resume is frame 25
    codes = engine.prompts.encoded("one_second.wav", "PCMU")
    assert after[0].payload == codes[25 * 160 : 26 * 160].tobytes()
    assert after[0].marker and not any(p.marker for p in after[1:])
    assert seq_diff(after[0].sequence, before[-1].sequence) == 1
    assert ts_diff(after[0].timestamp, before[-1].timestamp) == 160 * 16  # over the hold
    assert_continuous(after, 160)
    done = [(t, e.call_id) for t, e in clock.events if isinstance(e.event, AudioComplete)]
    assert len(done) == 2 and done[0][0] == done[1][0]  # on time, as the leg never held


def test_held_leg_takes_no_forwarded_audio_and_resumes_marked(engine: MediaEngine) -> None:
    add(engine, "a")
    add(engine, "b", remote=PEER_PHONE)
    engine.bridge("a", "b")

    def voice(k: int) -> bytes:
        return build_rtp(RtpPacket(0, 100 + k, 160 * k, 0xAAAA, b"\x7f" * 160))

    [(_, first, _)] = engine.receive_rtp("a", voice(0), PHONE, 0.0)[0]
    direct(engine, "recvonly", "b", PEER_PHONE)
    for k in range(1, 10):
        assert engine.receive_rtp("a", voice(k), PHONE, 0.02 * k) == ([], [])
    # RFC 4733 from the peer is not forwarded either, but still reported
    packets, events = engine.receive_rtp("a", dtmf_packet(4000, 3, True, seq=500), PHONE, 0.2)
    assert packets == [] and [e.event for e in events] == [DtmfDigit(digit="3")]
    # the held leg still receives, and its audio still reaches the other side
    [(call_id, _, _)] = engine.receive_rtp(
        "b", build_rtp(RtpPacket(0, 1, 1, 0xBBBB, b"\xff" * 160)), PEER_PHONE, 0.2
    )[0]
    assert call_id == "a"
    # RTCP keeps flowing for the held leg
    engine.rtcp_due(0.2)  # schedules the first reports
    assert any(c == "b" for c, _, _ in engine.rtcp_due(10.0))
    direct(engine, "sendrecv", "b", PEER_PHONE)
    [(call_id, data, dest)] = engine.receive_rtp("a", voice(11), PHONE, 0.22)[0]
    assert (call_id, dest) == ("b", PEER_PHONE)
    a, b = parse_rtp(first), parse_rtp(data)
    assert b.marker and seq_diff(b.sequence, a.sequence) == 1
    assert ts_diff(b.timestamp, a.timestamp) == 160 * 11  # the timeline ran over the hold

"""No RTP silence gap while the IVR waits (issue 11): a leg nothing feeds keeps sending,
RFC 3389 comfort noise when negotiated, else G.711 silence, one packet per ptime, in
one RTP stream with the prompts around it (RFC 3550 §5.1), on the compiled kernel and
its Python twin alike."""

from __future__ import annotations

import random
from itertools import pairwise
from pathlib import Path

import pytest

from media import g711
from media.engine import MediaEngine
from media.kernels import rtpbatch as K
from media.prompts import PromptCache
from media.rtp import RtpPacket, seq_diff, ts_diff
from pbx.messages import MediaPlay, MediaRemote
from tests.media.test_media_engine import PEER_PHONE, PHONE, Clock, tone, write_wav

CN = 13


def engine_for(tmp_path: Path, kernels: bool) -> MediaEngine:
    write_wav(tmp_path / "prompt.wav", tone(0.1))  # 5 frames of 20 ms
    engine = MediaEngine(PromptCache(tmp_path), rng=random.Random(11))
    engine.kernels = kernels
    return engine


def add(engine: MediaEngine, call_id: str = "c1", codec: str = "PCMU", cn: int | None = None,
        ptime_ms: int = 20, remote: tuple[str, int] = PHONE,
        direction: str = "sendrecv") -> None:
    engine.add_leg(call_id, 20000, inband_dtmf=False)
    engine.set_remote(MediaRemote(
        call_id=call_id, remote_ip=remote[0], remote_port=remote[1],
        payload_type=0 if codec == "PCMU" else 8, codec=codec,  # type: ignore[arg-type]
        dtmf_payload_type=101, ptime_ms=ptime_ms, cn_payload_type=cn,
        direction=direction))  # type: ignore[arg-type]


def assert_one_stream(packets: list[RtpPacket], spf: int = 160) -> None:
    """One SSRC, sequence numbers +1 and timestamps +spf from packet to packet: no gap."""
    assert len({p.ssrc for p in packets}) == 1
    for a, b in pairwise(packets):
        assert seq_diff(b.sequence, a.sequence) == 1
        assert ts_diff(b.timestamp, a.timestamp) == spf


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "twin"])
@pytest.mark.parametrize("codec", ["PCMU", "PCMA"])
def test_a_waiting_leg_gets_50_silence_frames_a_second(tmp_path: Path, kernels: bool,
                                                       codec: str) -> None:
    engine = engine_for(tmp_path, kernels)
    add(engine, codec=codec)
    clock = Clock(engine)
    clock.run(2.0)
    packets = clock.rtp("c1")
    assert len(packets) == 100  # 50 a second
    pt = 0 if codec == "PCMU" else 8
    silence = bytes([g711.SILENCE[codec]]) * 160
    assert all(p.payload_type == pt and p.payload == silence for p in packets)
    assert not any(p.marker for p in packets)
    assert_one_stream(packets)
    # Each packet leaves at its tick: one per 20 ms, never a burst.
    assert [len([1 for t, p in clock.packets if t == clock.packets[0][0] + k * 0.02])
            for k in range(3)] == [1, 1, 1]
    assert engine.legs["c1"].packets_sent == 100


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "twin"])
def test_comfort_noise_when_negotiated(tmp_path: Path, kernels: bool) -> None:
    engine = engine_for(tmp_path, kernels)
    add(engine, cn=CN)
    clock = Clock(engine)
    clock.run(1.0)
    packets = clock.rtp("c1")
    assert len(packets) == 50
    # RFC 3389 §3: one byte, the noise level in -dBov.
    assert all(p.payload_type == CN and p.payload == bytes([K.CN_LEVEL_DBOV])
               for p in packets)
    assert_one_stream(packets)  # the timestamp follows the sampling clock
    assert engine.legs["c1"].octets_sent == 50


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "twin"])
@pytest.mark.parametrize("cn", [None, CN], ids=["silence", "cn"])
def test_prompt_fill_prompt_is_one_continuous_stream(tmp_path: Path, kernels: bool,
                                                     cn: int | None) -> None:
    engine = engine_for(tmp_path, kernels)
    add(engine, cn=cn)
    clock = Clock(engine)
    clock.run(0.2)  # waiting: fill
    engine.play(MediaPlay(call_id="c1", play_id=1, file="prompt.wav"), clock.now)
    clock.run(0.5)  # 5 prompt frames, then fill again
    engine.play(MediaPlay(call_id="c1", play_id=2, file="prompt.wav"), clock.now)
    clock.run(0.3)
    packets = clock.rtp("c1")
    assert len(packets) == 50  # 1 s, 50 packets, whatever they carried
    assert_one_stream(packets)
    kinds = ["prompt" if p.payload_type == 0 and len(set(p.payload)) > 1 else "fill"
             for p in packets]
    assert kinds == ["fill"] * 10 + ["prompt"] * 5 + ["fill"] * 20 + ["prompt"] * 5 + [
        "fill"] * 10
    # The marker bit starts each prompt's talk spurt only (RFC 3551 §4.1).
    assert [k for k, p in enumerate(packets) if p.marker] == [10, 35]
    if cn is not None:
        assert {p.payload_type for p, k in zip(packets, kinds, strict=True)
                if k == "fill"} == {CN}


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "twin"])
def test_ptime_30_fills_at_its_own_pace(tmp_path: Path, kernels: bool) -> None:
    engine = engine_for(tmp_path, kernels)
    add(engine, ptime_ms=30)
    clock = Clock(engine)
    clock.run(1.2)
    packets = clock.rtp("c1")
    assert len(packets) == 40 and all(len(p.payload) == 240 for p in packets)
    assert_one_stream(packets, spf=240)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "twin"])
def test_no_fill_on_hold_or_in_a_bridge(tmp_path: Path, kernels: bool) -> None:
    engine = engine_for(tmp_path, kernels)
    add(engine, "held", direction="recvonly")
    add(engine, "a")
    add(engine, "b", remote=PEER_PHONE)
    engine.bridge("a", "b")  # each stream is the peer's audio (none here): nothing added
    clock = Clock(engine)
    clock.run(0.5)
    assert clock.packets == []
    # The peer hangs up: the leg left alone is filled again until its call ends.
    engine.remove_leg("b")
    clock.run(0.2)
    assert {p[0] for _, p in clock.packets} == {"a"} and len(clock.packets) == 10
    # Resumed from hold: filled from then on.
    engine.set_remote(MediaRemote(call_id="held", remote_ip=PHONE[0], remote_port=PHONE[1],
                                  payload_type=0, codec="PCMU", direction="sendrecv"))
    clock.run(0.2)
    assert len(clock.rtp("held")) == 10


def test_a_late_tick_does_not_burst_more_than_the_prompt_would(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, True)
    add(engine)
    packets, _ = engine.tick(0.0)
    assert len(packets) == 1
    packets, _ = engine.tick(1.0)  # a tick 1 s late: at most MAX_BURST_FRAMES
    assert len(packets) == K.MAX_BURST_FRAMES
    packets, _ = engine.tick(1.02)
    assert len(packets) == 1

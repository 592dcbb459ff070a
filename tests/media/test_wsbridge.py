"""The WebSocket bridge's engine side (media.wsbridge) on a virtual clock."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from media import g711
from media.engine import MediaEngine
from media.prompts import PromptCache
from media.rtp import RtpPacket, build_rtp, parse_rtp, seq_diff, ts_diff
from media.wsbridge import MAX_BUFFER_SAMPLES, PREFILL_SAMPLES
from pbx.messages import MediaEvent, MediaPlay, MediaRemote, WsBridgeEnded

TICK = 0.020
PHONE = ("127.0.0.1", 40000)


def tone(samples: int, hz: float = 500.0) -> np.ndarray:
    t = np.arange(samples) / 8000.0
    return (np.sin(2 * np.pi * hz * t) * 9000).astype(np.int16)


@pytest.fixture
def engine(tmp_path: Path) -> MediaEngine:
    import wave

    with wave.open(str(tmp_path / "p.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(tone(800).tobytes())
    e = MediaEngine(PromptCache(tmp_path), random.Random(3), fill_gaps=False)
    e.add_leg("a", 20000)
    e.set_remote(
        MediaRemote(
            call_id="a", remote_ip=PHONE[0], remote_port=PHONE[1], payload_type=8, codec="PCMA"
        )
    )
    e.ws_start("a")
    return e


def run(engine: MediaEngine, start: int, n: int) -> list[RtpPacket]:
    out = []
    for k in range(start, start + n):
        packets, _ = engine.tick(k * TICK)
        out += [parse_rtp(p[1]) for p in packets]
    return out


def test_caller_audio_goes_out_as_pcm16(engine: MediaEngine) -> None:
    audio = tone(480)
    for i in range(3):
        payload = g711.encode(audio[160 * i : 160 * (i + 1)], "PCMA").tobytes()
        engine.receive_rtp("a", build_rtp(RtpPacket(8, i, 160 * i, 7, payload)), PHONE, 0.001 * i)
    engine.tick(0.02)
    ((call_id, data),) = engine.ws.drain()
    assert call_id == "a" and len(data) == 960
    expected = g711.decode(g711.encode(audio, "PCMA"), "PCMA")
    np.testing.assert_array_equal(np.frombuffer(data, "<i2"), expected)
    engine.tick(0.04)
    assert engine.ws.drain() == []  # nothing arrived: nothing sent


def test_socket_audio_played_paced_with_prefill(engine: MediaEngine) -> None:
    audio = tone(8 * 150)  # 150 ms, in frames of odd sizes
    data = audio.astype("<i2").tobytes()
    engine.ws_audio("a", data[:301])
    assert run(engine, 1, 2) == []  # below the 60 ms prefill
    engine.ws_audio("a", data[301:])
    pkts = run(engine, 3, 12)
    assert len(pkts) == 8  # 7.5 frames, the last padded
    assert pkts[0].marker and not any(p.marker for p in pkts[1:])
    assert [seq_diff(p.sequence, pkts[0].sequence) for p in pkts] == list(range(8))
    assert [ts_diff(p.timestamp, pkts[0].timestamp) for p in pkts] == [160 * i for i in range(8)]
    sent = b"".join(p.payload for p in pkts)
    assert sent[:1200] == g711.encode(audio, "PCMA").tobytes()
    assert sent[1200:] == bytes([g711.SILENCE["PCMA"]]) * 80
    # underrun, then new audio: a new talk spurt whose timestamp kept running
    engine.ws_audio("a", tone(PREFILL_SAMPLES).tobytes())
    more = run(engine, 15, 5)
    assert len(more) == 3 and more[0].marker
    assert ts_diff(more[0].timestamp, pkts[-1].timestamp) == 160 * (15 - 10)


def test_backpressure_and_prompt_priority(engine: MediaEngine) -> None:
    engine.ws_audio("a", tone(MAX_BUFFER_SAMPLES - 160).tobytes())
    assert engine.ws_room("a")
    engine.ws_audio("a", tone(160).tobytes())
    assert not engine.ws_room("a")
    assert engine.play(MediaPlay(call_id="a", play_id=1, file="p.wav"), 0.0) == []
    pkts = run(engine, 1, 5)
    prompt = engine.prompts.encoded("p.wav", "PCMA")
    assert b"".join(p.payload for p in pkts) == prompt.tobytes()  # the prompt, not the socket
    assert engine.ws_room("a")  # socket audio kept flowing (discarded) meanwhile


def test_closed_and_released(engine: MediaEngine) -> None:
    assert engine.ws_closed("a", "closed by peer") == [
        MediaEvent(call_id="a", event=WsBridgeEnded(reason="closed by peer"))
    ]
    assert engine.legs["a"].ws is None and len(engine.ws) == 0
    engine.ws_audio("a", b"\0\0" * 1000)  # ignored
    assert run(engine, 1, 5) == []
    engine.ws_start("a")
    engine.remove_leg("a")
    assert len(engine.ws) == 0
    assert engine.ws_closed("a", "closed by peer") == []  # no event after a release


def test_held_leg_drops_socket_audio_and_resumes_marked(engine: MediaEngine) -> None:
    def direct(direction: str) -> None:
        engine.set_remote(
            MediaRemote(
                call_id="a", remote_ip=PHONE[0], remote_port=PHONE[1], payload_type=8,
                codec="PCMA", direction=direction,  # type: ignore[arg-type]
            )
        )  # fmt: skip

    engine.ws_audio("a", tone(160 * 20).tobytes())
    pkts = run(engine, 1, 3)
    assert len(pkts) == 3
    direct("inactive")
    assert run(engine, 4, 5) == []  # played out into nothing: the socket's clock runs on
    direct("sendrecv")
    more = run(engine, 9, 20)
    assert len(more) == 20 - 3 - 5 and more[0].marker
    assert seq_diff(more[0].sequence, pkts[-1].sequence) == 1
    assert ts_diff(more[0].timestamp, pkts[-1].timestamp) == 160 * 6


def test_one_huge_frame_buffers_at_most_30_s() -> None:
    """A server we do not control sends one 4 MB frame (aiohttp's default largest): it was
    all encoded and kept (about 260 s a leg). Now 30 s is kept and the rest dropped; the
    shell also refuses frames over MAX_FRAME_BYTES (ws_connect's max_msg_size)."""
    from media.wsbridge import HARD_BUFFER_SAMPLES, MAX_FRAME_BYTES, WsLeg

    leg = WsLeg("PCMU")
    leg.feed(b"\0" * (4 * 1024 * 1024 - 2))
    assert leg.buffered == HARD_BUFFER_SAMPLES
    leg.feed(b"\0" * 320)  # full: nothing more is kept
    assert leg.buffered == HARD_BUFFER_SAMPLES and not leg.room()
    short = WsLeg("PCMU")
    short.feed(b"\0" * 3 * 16000)  # a 3 s utterance in one frame: kept whole
    assert short.buffered == 3 * 8000 and MAX_FRAME_BYTES == 2 * HARD_BUFFER_SAMPLES

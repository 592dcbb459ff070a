"""Recording (media.recorder + media.wav) through the sans-IO engine on a virtual clock."""

from __future__ import annotations

import os
import random
import wave
from pathlib import Path

import numpy as np
import orjson
import pytest

from media import g711
from media.engine import MediaEngine, Packet
from media.prompts import BEEP_MS, PromptCache
from media.recorder import BUF_SAMPLES, Recorder, RecordError, resolve_target
from media.rtp import RtpPacket, build_event, build_rtp, parse_rtp
from media.wav import HEADER_SIZE, WavWriter, parse_wav, placeholder_size
from pbx.messages import (
    AudioComplete,
    DtmfDigit,
    MediaDtmfInfo,
    MediaEvent,
    MediaFailure,
    MediaPlay,
    MediaRecord,
    MediaRemote,
    RecordingFinished,
)

TICK = 0.020
PHONE = ("127.0.0.1", 40000)
PEER_PHONE = ("127.0.0.1", 40002)
SSRC = 0x1234
TS0 = 4_000_000_000  # wraps during the test


def tone(samples: int, hz: float, amp: float = 8000.0, start: int = 0) -> np.ndarray:
    t = (np.arange(samples) + start) / 8000.0
    return (np.sin(2 * np.pi * hz * t) * amp).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(samples.astype("<i2").tobytes())


def read(path: Path) -> tuple[wave._wave_params, np.ndarray]:
    with wave.open(str(path), "rb") as w:
        params = w.getparams()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return params, data.reshape(-1, params.nchannels)


class Sim:
    """The engine on a virtual clock, a caller sending RTP, the events collected."""

    def __init__(self, tmp: Path) -> None:
        sounds = tmp / "sounds"
        write_wav(sounds / "prompt.wav", tone(8000, 440.0))
        self.rec_dir = tmp / "rec"
        self.vm_dir = tmp / "vm"
        self.recorder = Recorder(
            {"recordings": self.rec_dir, "voicemail": self.vm_dir},
            wall_clock=lambda: 1_700_000_000.0,
        )
        self.engine = MediaEngine(PromptCache(sounds), random.Random(1), recorder=self.recorder)
        self.k = 0
        self.events: list[tuple[float, MediaEvent]] = []
        self.packets: list[tuple[float, Packet]] = []
        self.seq = 0
        self.sent = 0  # caller samples sent so far (its timestamp offset)
        self.leg("a", PHONE)

    def leg(self, call_id: str, phone: tuple[str, int], codec: str = "PCMU") -> None:
        self.engine.add_leg(call_id, 20000 + 2 * len(self.engine))
        self.engine.set_remote(
            MediaRemote(
                call_id=call_id,
                remote_ip=phone[0],
                remote_port=phone[1],
                payload_type=0 if codec == "PCMU" else 8,
                codec=codec,  # type: ignore[arg-type]
                dtmf_payload_type=101,
            )
        )

    @property
    def now(self) -> float:
        return self.k * TICK

    def tick(self, n: int = 1, audio: np.ndarray | None = None, call_id: str = "a") -> None:
        """n ticks; before each one (i.e. during the 20 ms that it ends) the caller sends
        its next 160 samples of `audio` (cycled), or nothing if `audio` is None."""
        for _ in range(n):
            if audio is not None:
                self.caller(audio, call_id)
            self.k += 1
            packets, events = self.engine.tick(self.now)
            self.packets += [(self.now, p) for p in packets]
            self.events += [(self.now, e) for e in events]

    def caller(self, audio: np.ndarray, call_id: str = "a", send: bool = True) -> None:
        frame = np.resize(np.roll(audio, -self.sent), 160)  # cycled source
        if send:
            pkt = RtpPacket(
                0,
                self.seq,
                (TS0 + self.sent) % (1 << 32),
                SSRC,
                g711.encode(frame, "PCMU").tobytes(),
            )
            # it arrives just as the 20 ms it holds end, at the next tick
            packets, events = self.engine.receive_rtp(
                call_id, build_rtp(pkt), PHONE, self.now + TICK
            )
            self.packets += [(self.now, p) for p in packets]
            self.events += [(self.now, e) for e in events]
        self.seq += 1
        self.sent += 160

    def skip(self, n: int = 1, call_id: str = "a", audio: np.ndarray | None = None) -> None:
        """n ticks during which the caller's packets are lost (its clock still runs)."""
        for _ in range(n):
            if audio is not None:
                self.caller(audio, call_id, send=False)
            self.k += 1
            _, events = self.engine.tick(self.now)
            self.events += [(self.now, e) for e in events]

    def record(self, **kw: object) -> list[MediaEvent]:
        msg = MediaRecord.model_validate({"call_id": "a", "record_id": 1, "path": "r.wav", **kw})
        out = self.engine.record(msg, self.now)
        self.events += [(self.now, e) for e in out]
        return out

    def stop(self) -> list[MediaEvent]:
        out = self.engine.record_stop("a", self.now)
        self.events += [(self.now, e) for e in out]
        return out

    def finished(self) -> list[RecordingFinished]:
        return [e.event for _, e in self.events if isinstance(e.event, RecordingFinished)]


@pytest.fixture
def sim(tmp_path: Path) -> Sim:
    return Sim(tmp_path)


def test_known_tone_comes_back_sample_exact(sim: Sim) -> None:
    src = tone(8000, 1000.0)
    assert sim.record() == []
    sim.tick(50, src)
    assert sim.stop() == [
        MediaEvent(
            call_id="a",
            event=RecordingFinished(record_id=1, path="r.wav", duration_ms=1000, reason="stopped"),
        )
    ]
    params, data = read(sim.rec_dir / "r.wav")
    assert (params.nchannels, params.sampwidth, params.framerate) == (1, 2, 8000)
    assert params.nframes == 8000
    np.testing.assert_array_equal(data[:, 0], g711.decode(g711.encode(src, "PCMU"), "PCMU"))
    assert sim.engine.legs["a"].rec is None
    assert sim.engine.record_stop("a", sim.now) == []  # nothing left to stop


def test_gaps_are_silence_and_duration_is_wall_clock(sim: Sim) -> None:
    src = tone(8000, 1000.0)
    sim.record()
    sim.tick(10, src)
    sim.skip(5, audio=src)  # 5 packets lost
    sim.tick(10, src)
    sim.skip(25)  # the caller stops sending altogether (silence suppression, hold)
    sim.stop()
    params, data = read(sim.rec_dir / "r.wav")
    assert params.nframes == 8000 and sim.finished()[0].duration_ms == 1000
    expected = g711.decode(g711.encode(src, "PCMU"), "PCMU").copy()
    expected[1600:2400] = 0  # the lost packets
    expected[4000:] = 0  # no RTP at all
    np.testing.assert_array_equal(data[:, 0], expected)


def test_late_and_reordered_packets_land_in_place(sim: Sim) -> None:
    src = tone(8000, 700.0)
    sim.record()
    sim.tick(5, src)
    held = (sim.seq, sim.sent)
    sim.skip(1, audio=src)  # packet 5 held back...
    sim.tick(1, src)
    sim.seq, sim.sent = held  # ...and arrives 20 ms late, after packet 6
    sim.caller(src)
    sim.seq, sim.sent = held[0] + 2, held[1] + 320
    sim.tick(18, src)
    sim.stop()
    _, data = read(sim.rec_dir / "r.wav")
    expected = g711.decode(g711.encode(src, "PCMU"), "PCMU")[: data.shape[0]]
    np.testing.assert_array_equal(data[:, 0], expected)


def test_stereo_caller_left_prompt_right(sim: Sim) -> None:
    src = tone(8000, 1000.0)
    sim.record(stereo=True)
    assert sim.engine.play(MediaPlay(call_id="a", play_id=3, file="prompt.wav"), sim.now) == []
    sim.tick(25, src)
    sim.stop()
    params, data = read(sim.rec_dir / "r.wav")
    assert params.nchannels == 2 and params.nframes == 4000
    np.testing.assert_array_equal(data[:, 0], g711.decode(g711.encode(src[:4000], "PCMU"), "PCMU"))
    prompt = sim.engine.prompts.encoded("prompt.wav", "PCMU")
    # the prompt's first frame leaves at the first tick (20 ms = sample 160)
    assert not data[:160, 1].any()
    np.testing.assert_array_equal(data[160:, 1], g711.decode(prompt[: 4000 - 160], "PCMU"))


def test_stereo_bridged_peer_on_the_right_transcoded(sim: Sim) -> None:
    sim.leg("b", PEER_PHONE, codec="PCMA")
    sim.engine.bridge("a", "b")
    sim.record(stereo=True)
    peer_audio = tone(160 * 30, 600.0)
    for i in range(30):
        frame = g711.encode(peer_audio[160 * i : 160 * (i + 1)], "PCMA").tobytes()
        pkt = RtpPacket(8, 500 + i, 1000 + 160 * i, 0x99, frame)
        sim.engine.receive_rtp("b", build_rtp(pkt), PEER_PHONE, sim.now + 0.01)
        sim.tick(1, tone(160, 1000.0))
    sim.stop()
    _, data = read(sim.rec_dir / "r.wav")
    right = data[:, 1].astype(float)
    spectrum = np.abs(np.fft.rfft(right))
    assert abs(np.argmax(spectrum) * 8000 / right.size - 600) < 10
    assert np.sqrt(np.mean(right[400:] ** 2)) > 4000  # continuous, no holes
    left = data[:, 0].astype(float)
    assert abs(np.argmax(np.abs(np.fft.rfft(left))) * 8000 / left.size - 1000) < 10


def test_max_duration(sim: Sim) -> None:
    sim.record(max_duration_ms=500)
    sim.tick(40, tone(8000, 1000.0))
    assert sim.finished() == [
        RecordingFinished(record_id=1, path="r.wav", duration_ms=500, reason="max_duration")
    ]
    assert [t for t, e in sim.events] == [pytest.approx(0.5)]
    assert read(sim.rec_dir / "r.wav")[0].nframes == 4000


def test_stop_digit_rfc4733_is_cut_out(sim: Sim) -> None:
    src = tone(8000, 1000.0)
    sim.record(stop_digits="#*")
    sim.tick(30, src)  # 600 ms of speech, then '#' pressed for 120 ms (no audio meanwhile)
    ev_ts = (TS0 + sim.sent) % (1 << 32)
    for i in range(6):
        end = i == 5
        pkt = RtpPacket(101, sim.seq, ev_ts, SSRC, build_event(11, end, 10, 160 * (i + 1)))
        sim.seq += 1
        sim.sent += 160
        _, events = sim.engine.receive_rtp("a", build_rtp(pkt), PHONE, sim.now + TICK)
        sim.events += [(sim.now, e) for e in events]
        sim.tick()
    digits = [e.event for _, e in sim.events if isinstance(e.event, DtmfDigit)]
    assert digits == [DtmfDigit(digit="#")]  # still reported
    (done,) = sim.finished()
    assert done.reason == "dtmf"
    # the digit's event began at 600 ms; 100 ms before the report would be 620 ms
    assert done.duration_ms == 600
    _, data = read(sim.rec_dir / "r.wav")
    assert data.shape[0] == 4800
    np.testing.assert_array_equal(data[:, 0], g711.decode(g711.encode(src[:4800], "PCMU"), "PCMU"))


def test_stop_digit_info_trims_100ms_other_digits_do_not_stop(sim: Sim) -> None:
    sim.record()  # stop_digits "#"
    sim.tick(20, tone(8000, 1000.0))
    sim.engine.dtmf_info(MediaDtmfInfo(call_id="a", digit="5"), sim.now + 0.005)
    sim.tick(5, tone(8000, 1000.0))
    assert sim.finished() == []
    sim.engine.dtmf_info(MediaDtmfInfo(call_id="a", digit="#"), sim.now + 0.005)
    sim.tick(3, tone(8000, 1000.0))
    (done,) = sim.finished()
    # reported at 505 ms, handled at the 520 ms tick, cut 100 ms before that
    assert done.reason == "dtmf" and done.duration_ms == 420
    assert read(sim.rec_dir / "r.wav")[0].nframes == done.duration_ms * 8


def test_beep_first_and_not_recorded(sim: Sim) -> None:
    src = tone(8000, 1000.0)
    sim.record(beep=True, stereo=True)
    beep_frames = -(-BEEP_MS // 20)
    sim.tick(beep_frames + 1, src)  # the beep's frames, and the tick that ends it
    sent = [parse_rtp(p[1]) for _, p in sim.packets]
    assert len(sent) == beep_frames and sent[0].marker
    beep = sim.engine.prompts.beep("PCMU")
    assert b"".join(p.payload for p in sent)[: beep.size] == beep.tobytes()
    assert not [e for _, e in sim.events if isinstance(e.event, AudioComplete)]
    start = sim.now
    sim.tick(25, src)
    sim.stop()
    assert sim.finished()[0].duration_ms == round((sim.now - start) * 1000) == 500
    _, data = read(sim.rec_dir / "r.wav")
    assert not data[:, 1].any()  # nothing played after the beep: right channel silent
    assert np.sqrt(np.mean(data[200:, 0].astype(float) ** 2)) > 4000


def test_release_finishes_file_and_metadata_without_event(sim: Sim) -> None:
    meta = {"caller": "1001", "mailbox": "2000"}
    sim.record(area="voicemail", path="2000/msg1.wav", metadata=meta)
    sim.tick(37, tone(8000, 1000.0))
    released = sim.engine.remove_leg("a", sim.now)
    assert released.call_id == "a" and sim.finished() == [] and sim.events == []
    wav = sim.vm_dir / "2000" / "msg1.wav"
    assert read(wav)[0].nframes == 37 * 160
    doc = orjson.loads((sim.vm_dir / "2000" / "msg1.wav.json").read_bytes())
    assert doc == {**meta, "duration_ms": 740, "finished_at": "2023-11-14T22:13:20.000Z"}
    assert len(sim.recorder) == 0


def test_release_without_now_uses_last_tick(sim: Sim) -> None:
    sim.record()
    sim.tick(10, tone(8000, 1000.0))
    sim.engine.remove_leg("a")
    assert read(sim.rec_dir / "r.wav")[0].nframes == 1600


def test_metadata_with_stop_event(sim: Sim) -> None:
    sim.record(path="x/y/z.wav", metadata={"a": 1}, max_duration_ms=200)
    sim.tick(12)
    assert sim.finished()[0].duration_ms == 200
    doc = orjson.loads((sim.rec_dir / "x" / "y" / "z.wav.json").read_bytes())
    assert doc["a"] == 1 and doc["duration_ms"] == 200
    assert not (sim.rec_dir / "x" / "y" / "z.wav.json.tmp").exists()


@pytest.mark.parametrize(
    "path", ["../out.wav", "/tmp/out.wav", "a/../../out.wav", "", "a\x00b", "..\\out.wav", "."]
)
def test_escapes_refused_nothing_written(sim: Sim, path: str, tmp_path: Path) -> None:
    before = sorted(p for p in tmp_path.rglob("*"))
    (failure,) = sim.record(path=path)
    assert isinstance(failure.event, MediaFailure) and failure.call_id == "a"
    assert sim.engine.legs["a"].rec is None
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_symlinked_directory_out_refused(sim: Sim, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    sim.rec_dir.mkdir()
    os.symlink(outside, sim.rec_dir / "link")
    (failure,) = sim.record(path="link/x.wav")
    assert "outside" in failure.event.reason  # type: ignore[union-attr]
    assert list(outside.iterdir()) == []
    with pytest.raises(RecordError):
        resolve_target(sim.rec_dir, "link/x.wav")
    assert resolve_target(sim.rec_dir, "a/b.wav") == sim.rec_dir.resolve() / "a" / "b.wav"


def test_symlinked_file_not_followed(sim: Sim, tmp_path: Path) -> None:
    sim.rec_dir.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.symlink(victim, sim.rec_dir / "r.wav")
    (failure,) = sim.record()
    assert isinstance(failure.event, MediaFailure)
    assert victim.read_text() == "keep"


def test_unconfigured_area_and_unknown_call(tmp_path: Path) -> None:
    engine = MediaEngine(PromptCache(tmp_path))
    engine.add_leg("a", 20000)
    (f,) = engine.record(MediaRecord(call_id="a", record_id=1, path="r.wav"), 0.0)
    assert isinstance(f.event, MediaFailure) and "no directory" in f.event.reason
    (f,) = engine.record(MediaRecord(call_id="zz", record_id=1, path="r.wav"), 0.0)
    assert isinstance(f.event, MediaFailure) and "unknown call" in f.event.reason


def test_unwritable_directory_is_a_failure(sim: Sim) -> None:
    sim.rec_dir.mkdir()
    (sim.rec_dir / "file").write_text("")
    (failure,) = sim.record(path="file/r.wav")  # a file where a directory should be
    assert isinstance(failure.event, MediaFailure) and "cannot write" in failure.event.reason


def test_write_error_mid_recording(sim: Sim) -> None:
    sim.record()
    sim.tick(5, tone(8000, 1000.0))
    rec = sim.engine.legs["a"].rec
    assert rec is not None
    full = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
    os.close(rec.writer._fd)  # type: ignore[arg-type]
    rec.writer._fd = full
    sim.tick(20, tone(8000, 1000.0))
    kinds = [type(e.event) for _, e in sim.events]
    assert kinds == [MediaFailure, RecordingFinished]
    assert "No space left" in sim.events[0][1].event.reason  # type: ignore[union-attr]
    assert sim.finished()[0].reason == "error"
    assert sim.engine.legs["a"].rec is None
    sim.tick(5, tone(8000, 1000.0))  # the engine carries on


def test_new_record_replaces_the_running_one(sim: Sim) -> None:
    sim.record()
    sim.tick(10)
    events = sim.record(record_id=2, path="second.wav")
    assert events == [
        MediaEvent(
            call_id="a",
            event=RecordingFinished(record_id=1, path="r.wav", duration_ms=200, reason="stopped"),
        )
    ]
    sim.tick(5)
    sim.stop()
    assert sim.finished()[-1].record_id == 2 and sim.finished()[-1].duration_ms == 100


def test_header_placeholder_then_patched(sim: Sim) -> None:
    sim.record()
    path = sim.rec_dir / "r.wav"
    head = path.read_bytes()[:HEADER_SIZE]
    assert int.from_bytes(head[40:44], "little") == placeholder_size(1)
    sim.tick(30, tone(8000, 1000.0))  # 600 ms: written in 200 ms batches, header not yet patched
    size = path.stat().st_size - HEADER_SIZE
    assert 3200 <= size <= 4800 * 2 and size % 2 == 0  # written in batches of about 200 ms
    with wave.open(str(path)) as w:  # already playable: reads up to the end of the file
        assert len(w.readframes(w.getnframes())) == size
    sim.tick(40, tone(8000, 1000.0))  # 1.4 s: patched once a second had been written
    data = path.read_bytes()
    declared = int.from_bytes(data[40:44], "little")
    assert 16000 <= declared < len(data) - HEADER_SIZE
    assert int.from_bytes(data[4:8], "little") == declared + 36
    assert parse_wav(data).frames == declared // 2
    sim.stop()
    data = path.read_bytes()
    assert int.from_bytes(data[40:44], "little") == len(data) - HEADER_SIZE == 1400 * 16


def test_memory_per_recording_leg(sim: Sim) -> None:
    sim.record(stereo=True)
    rec = sim.engine.legs["a"].rec
    assert rec is not None and rec.buf.nbytes == 2 * BUF_SAMPLES


def test_stalled_ticks_make_room(sim: Sim) -> None:
    """Packets keep arriving while no tick runs (a stalled loop): nothing is lost."""
    src = tone(16000, 1000.0)
    sim.record()
    for _ in range(60):  # 1.2 s of packets, no tick
        sim.caller(src)
        sim.k += 1
    sim.tick(1)
    sim.stop()
    _, data = read(sim.rec_dir / "r.wav")
    np.testing.assert_array_equal(
        data[: 60 * 160, 0], g711.decode(g711.encode(src[: 60 * 160], "PCMU"), "PCMU")
    )


def test_wav_writer_truncate_and_close(tmp_path: Path) -> None:
    w = WavWriter(tmp_path / "t.wav", 2)
    w.append(np.arange(800, dtype="<i2").tobytes())
    w.truncate(100)
    w.close()
    w.close()  # idempotent
    params, data = read(tmp_path / "t.wav")
    assert params.nframes == 100 and data.shape == (100, 2)
    assert (tmp_path / "t.wav").stat().st_size == HEADER_SIZE + 400
    with pytest.raises(OSError):
        w.append(b"\0\0\0\0")


def test_many_recordings_spread_their_writes_and_end_on_time(
    sim: Sim, monkeypatch: pytest.MonkeyPatch
) -> None:
    from media.recorder import Recording

    calls = [f"c{i}" for i in range(25)]
    for i, cid in enumerate(calls):
        sim.leg(cid, ("127.0.0.1", 41000 + 2 * i))
        msg = MediaRecord(call_id=cid, record_id=i, path=f"m/{cid}.wav", max_duration_ms=1000)
        assert sim.engine.record(msg, sim.now) == []
    flushes: list[int] = []
    orig = Recording._flush

    def counted(self: Recording, upto: int) -> None:
        flushes.append(sim.k)
        orig(self, upto)

    monkeypatch.setattr(Recording, "_flush", counted)
    sim.tick(49)
    per_tick = np.bincount(flushes)
    assert len(flushes) >= 25 * 3 and per_tick.max() <= 3  # 25 recordings, 10 groups
    sim.tick(1)
    ends = [(t, e.event) for t, e in sim.events if isinstance(e.event, RecordingFinished)]
    assert len(ends) == 25
    assert all(t == pytest.approx(1.0) and ev.duration_ms == 1000 for t, ev in ends)
    assert all(read(sim.rec_dir / "m" / f"{cid}.wav")[0].nframes == 8000 for cid in calls)


@pytest.mark.parametrize("path", ["packet", "kernel"])
@pytest.mark.parametrize("jump", [0, 7000])
def test_a_peer_jumping_ahead_does_not_erase_the_other_channel(
        tmp_path: Path, path: str, jump: int) -> None:
    """The bridged peer jumps its timestamps ~0.9 s ahead once (a clock that ran away, or
    on purpose). Taken as is (under the 1 s re-anchor), what the caller hears was placed
    in the future, the buffer flushed up to there, and every later packet of the caller's
    own voice was 'too late': its channel went silent for the rest of the call. A stream
    ahead of the wall clock by more than LEAD_SAMPLES is anchored again."""
    from tests.media.test_rtpbatch import Batch

    sim = Sim(tmp_path)
    sim.leg("b", PEER_PHONE)
    sim.engine.bridge("a", "b")
    sim.record(stereo=True)
    peer = tone(160 * 150, 600.0)
    for i in range(150):
        frame = g711.encode(peer[160 * i : 160 * (i + 1)], "PCMU").tobytes()
        ts = 1000 + 160 * i + (jump if i >= 20 else 0)
        data = build_rtp(RtpPacket(0, 500 + i, ts, 0x99, frame))
        if path == "packet":
            sim.engine.receive_rtp("b", data, PEER_PHONE, sim.now + 0.01)
        else:
            b = Batch([(sim.engine.legs["b"].row, data, PEER_PHONE)])
            sim.engine.receive_batch(b.buf, b.lens, b.names, b.rows, b.n, sim.now + 0.01)
        sim.tick(1, tone(160, 1000.0))  # the caller's own voice, every tick
    sim.stop()
    _, recorded = read(sim.rec_dir / "r.wav")
    after = recorded[8000:20000].astype(float)  # 1 s to 2.5 s, well after the jump
    own, heard = np.sqrt((after ** 2).mean(axis=0))
    assert own > 3000, "the caller's own voice is gone from its channel"
    assert heard > 3000  # and the peer is heard

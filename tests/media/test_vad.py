"""The listening VAD (media.kernels.vad through media.vad) and listening recordings
(media.recorder) on a virtual clock."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from media import g711, vad
from media.kernels import vad as k
from pbx.messages import RecordingFinished
from tests.media.test_recorder import Sim, read

FRAME = vad.FRAME
TUNING = vad.ListenTuning(end_silence_ms=400, max_speech_ms=2000)


def noise(frames: int, dbfs: float, seed: int = 1) -> np.ndarray:
    """White noise at `dbfs` RMS, int16."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(frames * FRAME)
    x *= 32768.0 * 10 ** (dbfs / 20) / np.sqrt(np.mean(x * x))
    return np.clip(x, -32768, 32767).astype(np.int16)


def speechlike(frames: int, dbfs: float = -18.0) -> np.ndarray:
    """A vowel-like buzz (harmonics of 140 Hz) at `dbfs` RMS, with 40 ms dips between
    "syllables" every 300 ms."""
    t = np.arange(frames * FRAME) / 8000.0
    x = sum(np.sin(2 * np.pi * 140 * h * t) / h for h in range(1, 12))
    x *= 32768.0 * 10 ** (dbfs / 20) / np.sqrt(np.mean(x * x))
    gate = ((t * 1000) % 300) < 260
    return np.clip(x * gate, -32768, 32767).astype(np.int16)


def decide(
    pcm: np.ndarray, listen_ms: int = 3000, codec: str = "PCMU", chunk_frames: int = 1,
    tuning: vad.ListenTuning = TUNING,
) -> tuple[str | None, int, int]:
    """Feed `pcm` in chunks as ticks would; (decision, cut frame, frames fed)."""
    codes = g711.encode(pcm, codec)
    bank = vad.VadBank(1)
    row = bank.take(tuning.params(listen_ms))
    fed = 0
    for at in range(0, codes.size // FRAME, chunk_frames):
        part = codes[at * FRAME : (at + chunk_frames) * FRAME]
        ended = bank.run([part], [codec == "PCMA"], [row])
        fed = at + part.size // FRAME
        if ended:
            reason, cut = ended[0]
            return reason, cut, fed
    return None, 0, fed


def test_frame_energy_in_dbfs() -> None:
    full = g711.encode(np.full(FRAME, 32000, dtype=np.int16), "PCMU")
    assert k.frame_dbfs(full, 0, False) == pytest.approx(20 * np.log10(32124 / 32768), abs=0.2)
    silent = g711.encode(np.zeros(FRAME, dtype=np.int16), "PCMA")
    assert k.frame_dbfs(silent, 0, True) < -60
    assert k.frame_dbfs(g711.encode(noise(1, -30.0), "PCMA"), 0, True) == pytest.approx(
        -30.0, abs=0.6)


def test_silence_is_no_speech_when_the_listening_time_is_over() -> None:
    reason, cut, fed = decide(np.zeros(400 * FRAME, dtype=np.int16), listen_ms=3000)
    assert (reason, cut, fed) == ("no_speech", 150, 150)


def test_speech_then_silence_ends_after_the_silence_cut_200_ms_after_the_speech() -> None:
    pcm = np.concatenate([noise(25, -60.0), speechlike(50), noise(100, -60.0, seed=2)])
    reason, cut, fed = decide(pcm)
    assert reason == "speech_end"
    assert fed == 25 + 50 + 20  # end_silence_ms 400 = 20 frames after the last voiced one
    assert cut == 25 + 50 + 10  # TAIL_FRAMES after it


def test_speech_that_goes_on_ends_at_max_speech() -> None:
    reason, cut, fed = decide(np.concatenate([noise(10, -60.0), speechlike(300)]))
    assert reason == "max_speech"
    assert cut == fed == 10 + 100  # 2000 ms of speech


def test_a_noisy_line_is_not_speech_but_speech_over_it_is() -> None:
    line = noise(100, -38.0)  # louder than min_speech_dbfs: only the floor tells
    assert decide(line, listen_ms=2000)[0] == "no_speech"
    pcm = np.concatenate([line[: 30 * FRAME], speechlike(40, -15.0) + noise(40, -38.0, seed=3),
                          noise(60, -38.0, seed=4)])
    assert decide(pcm)[0] == "speech_end"


def test_a_click_is_not_speech() -> None:
    pcm = np.zeros(200 * FRAME, dtype=np.int16)
    pcm[20 * FRAME : 22 * FRAME] = noise(2, -10.0)  # 40 ms: fewer than START_FRAMES
    assert decide(pcm, listen_ms=2000)[0] == "no_speech"


@pytest.mark.parametrize("codec", ["PCMU", "PCMA"])
@pytest.mark.parametrize("chunk_frames", [1, 3, 7])
def test_same_decision_whatever_the_law_and_the_frames_per_tick(
    codec: str, chunk_frames: int,
) -> None:
    pcm = np.concatenate([noise(25, -60.0), speechlike(50), noise(100, -60.0, seed=2)])
    assert decide(pcm, codec=codec, chunk_frames=chunk_frames)[:2] == ("speech_end", 85)


def test_one_call_decides_for_every_leg_on_its_own() -> None:
    speech = g711.encode(np.concatenate([speechlike(30), noise(40, -60.0)]), "PCMU")
    quiet = g711.encode(noise(70, -60.0), "PCMA")
    bank = vad.VadBank(2)  # grows for the third leg
    rows = [bank.take(TUNING.params(ms)) for ms in (1000, 5000, 5000)]
    ended = bank.run([speech, quiet, quiet[: 10 * FRAME]], [False, True, True], rows)
    # The others heard 70 and 10 frames of their 250: still waiting. The speech's last
    # 40 ms are a dip between "syllables".
    assert ended == {0: ("speech_end", 38)}
    assert bank.state[rows[1], k.S_SEEN] == 70 and bank.state[rows[2], k.S_SEEN] == 10
    # It began speaking at once, but the first frame is also where the floor starts:
    # the speech counts from the first dip (260-300 ms) on.
    assert bank.speech_start_ms(rows[0]) == 300 and bank.speech_start_ms(rows[1]) is None
    assert bank.run([quiet], [True], [rows[2]]) == {}
    # A row given back starts afresh for the next leg that takes it.
    bank.give_back(rows[0])
    assert bank.take(TUNING.params(1000)) == rows[0]
    assert bank.state[rows[0], k.S_SEEN] == 0 and bank.speech_start_ms(rows[0]) is None


# ---------------------------------------------------------------- listening recordings


@pytest.fixture
def sim(tmp_path: Path) -> Sim:
    s = Sim(tmp_path)
    s.recorder.areas["asr"] = tmp_path / "asr"
    s.recorder.listen = TUNING
    return s


def test_the_recording_ends_at_the_end_of_speech_cut_after_it(sim: Sim, tmp_path: Path) -> None:
    sim.record(path="u.wav", area="asr", listen_ms=3000, stop_digits="")
    speech = np.concatenate([noise(10, -60.0), speechlike(40), noise(200, -60.0, seed=2)])
    for _ in range(250):
        sim.tick(1, speech)  # the caller sends its next 20 ms of it
        if sim.finished():
            break
    (done,) = sim.finished()
    # 200 ms of noise, 800 ms of speech, the 200 ms tail.
    assert done == RecordingFinished(record_id=1, path="u.wav", duration_ms=1200,
                                     reason="speech_end", speech_start_ms=200)
    # Decided once the 400 ms of silence are HOLD_SAMPLES (60 ms) old.
    assert 10 + 40 + 20 + 3 <= sim.k <= 10 + 40 + 20 + 5
    params, data = read(tmp_path / "asr" / "u.wav")
    assert params.nframes == 9600
    assert np.abs(data[10 * FRAME : 50 * FRAME, 0]).max() > 3000
    assert sim.engine.legs["a"].rec is None


def test_nobody_speaking_ends_the_recording_with_no_speech(sim: Sim) -> None:
    sim.record(path="u.wav", area="asr", listen_ms=1000, stop_digits="")
    sim.tick(80, np.zeros(FRAME, dtype=np.int16))
    (done,) = sim.finished()
    assert done.reason == "no_speech" and done.duration_ms == 1000
    assert done.speech_start_ms is None


def test_speech_that_goes_on_ends_the_recording_at_max_speech(sim: Sim) -> None:
    sim.record(path="u.wav", area="asr", listen_ms=1000, stop_digits="", max_duration_ms=600_000)
    sim.tick(200, np.concatenate([noise(10, -60.0), speechlike(190)]))
    (done,) = sim.finished()
    assert done.reason == "max_speech" and done.duration_ms == 200 + 2000


def test_a_plain_recording_does_not_listen(sim: Sim) -> None:
    sim.record(path="r.wav", max_duration_ms=3000)
    sim.tick(200, np.zeros(FRAME, dtype=np.int16))
    (done,) = sim.finished()
    assert done.reason == "max_duration" and done.duration_ms == 3000
    assert done.speech_start_ms is None

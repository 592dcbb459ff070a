"""In-band DTMF detector: kernel against its numpy twin, the facade, and a quality battery.

The battery follows the spandsp / Mitel test-tape method with synthesised,
seeded signals; every signal goes through G.711 µ-law encode/decode first, as
it would arrive from RTP. Each condition runs many trials at random phases and
random alignment to the 20 ms tick grid, all trials as channels of one batched
detector. The table of conditions and detection rates is printed at the end of
the module (also without `-s`).

Levels: 0 dBm0 = the decoded µ-law digital milliwatt, RMS 16,017 (see
`media.kernels.goertzel`). "S/N" is total DTMF power over white-noise power
in the 0-4 kHz band.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from media import g711, inband
from media.kernels import goertzel as k

FS = 8000
TICK = inband.TICK_SAMPLES
ROW_HZ = k.ROW_HZ
COL_HZ = k.COL_HZ
DIGITS = k.DIGITS
DIGIT_HZ = {d: (ROW_HZ[i // 4], COL_HZ[i % 4]) for i, d in enumerate(DIGITS)}
DBM0_PEAK = k.DBM0_RMS * math.sqrt(2.0)
LEAD_SAMPLES = 800  # silence before the first tone (plus 0..159 for alignment)
TAIL_SAMPLES = 1600


def amp(dbm0: float) -> float:
    """Peak amplitude of a sine at `dbm0`."""
    return DBM0_PEAK * 10.0 ** (dbm0 / 20.0)


def ulaw_round_trip(x: np.ndarray) -> np.ndarray:
    pcm = np.clip(np.round(x), -32768, 32767).astype(np.int16)
    return g711.decode(g711.encode(pcm, "PCMU"), "PCMU")


# ------------------------------------------------------------------ signals


@dataclass
class Trial:
    """One channel: the signal and the tones it carries (digit, start, end in samples)."""

    signal: np.ndarray
    tones: list[tuple[str, int, int]]


def sequence(
    rng: np.random.Generator,
    digits: str,
    on_ms: float,
    off_ms: float,
    row_dbm0: float = -10.0,
    col_dbm0: float = -10.0,
    row_dev: float = 0.0,
    col_dev: float = 0.0,
) -> Trial:
    """Digits as tone bursts with gaps, random phases, random alignment to the tick grid."""
    parts = [np.zeros(LEAD_SAMPLES + int(rng.integers(TICK)))]
    pos = len(parts[0])
    tones = []
    on = int(round(on_ms * FS / 1000))
    off = int(round(off_ms * FS / 1000))
    t = np.arange(on) / FS
    for d in digits:
        fr, fc = DIGIT_HZ[d]
        ph = rng.uniform(0, 2 * np.pi, 2)
        x = amp(row_dbm0) * np.sin(2 * np.pi * fr * (1 + row_dev) * t + ph[0])
        x += amp(col_dbm0) * np.sin(2 * np.pi * fc * (1 + col_dev) * t + ph[1])
        parts += [x, np.zeros(off)]
        tones.append((d, pos, pos + on))
        pos += on + off
    return Trial(np.concatenate(parts), tones)


def white_noise(rng: np.random.Generator, n: int, dbm0: float) -> np.ndarray:
    return rng.standard_normal(n) * k.DBM0_RMS * 10.0 ** (dbm0 / 20.0)


def dial_tone(rng: np.random.Generator, n: int, dbm0: float) -> np.ndarray:
    t = np.arange(n) / FS
    ph = rng.uniform(0, 2 * np.pi, 2)
    return amp(dbm0) * (np.sin(2 * np.pi * 350 * t + ph[0]) + np.sin(2 * np.pi * 440 * t + ph[1]))


def detect(signals: list[np.ndarray]) -> list[list[tuple[str, int]]]:
    """µ-law round trip, then all signals as channels of one detector -> (digit, start sample) each."""
    n = len(signals)
    ticks = -(-(max(len(s) for s in signals) + TAIL_SAMPLES) // TICK)
    buf = np.zeros((n, ticks * TICK))
    for i, s in enumerate(signals):
        buf[i, : len(s)] = s
    frames = np.ascontiguousarray(ulaw_round_trip(buf).reshape(n, ticks, TICK).transpose(1, 0, 2))
    det = inband.InbandDetector(capacity=max(n, 1))
    slots = np.array([det.add() for _ in range(n)])
    out: list[list[tuple[str, int]]] = [[] for _ in range(n)]
    for t in range(ticks):
        for slot, digit, offset in det.process(frames[t], slots):
            out[slot].append((digit, t * TICK + offset))
    return out


@dataclass
class Score:
    tones: int
    hits: int
    extra: int  # detections that match no tone (wrong digit, duplicate, or none there)

    @property
    def rate(self) -> float:
        return self.hits / self.tones if self.tones else 0.0


def score(trials: list[Trial], found: list[list[tuple[str, int]]]) -> Score:
    """A detection is a hit when its digit is the tone's and its start lies in the tone
    (20 ms of slack before, for the sub-block rounding); each tone is hit at most once."""
    tones = hits = extra = 0
    for trial, dets in zip(trials, found, strict=True):
        tones += len(trial.tones)
        used = [False] * len(trial.tones)
        for digit, start in dets:
            for i, (d, a, b) in enumerate(trial.tones):
                if not used[i] and d == digit and a - 160 <= start <= b:
                    used[i] = True
                    hits += 1
                    break
            else:
                extra += 1
    return Score(tones, hits, extra)


def all_digits(rng: np.random.Generator) -> str:
    return "".join(rng.permutation(list(DIGITS)))


# ------------------------------------------------------------------ the table


@dataclass
class Row:
    group: str
    condition: str
    expect: str
    tones: int
    rate: float
    extra: int
    ok: bool


@pytest.fixture(scope="module")
def table(request: pytest.FixtureRequest) -> Iterator[list[Row]]:
    rows: list[Row] = []
    yield rows
    lines = [
        "",
        "in-band DTMF battery (G.711 µ-law round trip; rate = tones detected / tones sent)",
        f"{'group':<10} {'condition':<50} {'expect':<8} {'tones':>6} {'rate':>7} {'extra':>6}  ok",
    ]
    for r in rows:
        tones = f"{r.tones}" if r.tones else "-"
        rate = f"{100 * r.rate:6.1f}%" if r.tones else "      -"
        lines.append(
            f"{r.group:<10} {r.condition:<50} {r.expect:<8} {tones:>6} {rate:>7} {r.extra:>6}  "
            + ("yes" if r.ok else "NO")
        )
    # written past pytest's output capture, so `make test` shows it too
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if capman is None or reporter is None:  # pragma: no cover
        print("\n".join(lines))
        return
    with capman.global_and_fixture_disabled():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


def record(
    table: list[Row], group: str, condition: str, expect: str, s: Score, min_rate: float = 1.0
) -> bool:
    """expect: 'detect' (rate >= min_rate, no extra), 'reject' (nothing detected), 'info'."""
    if expect == "detect":
        ok = s.rate >= min_rate and s.extra == 0
    elif expect == "reject":
        ok = s.hits == 0 and s.extra == 0
    else:
        ok = True
    table.append(Row(group, condition, expect, s.tones, s.rate, s.extra, ok))
    return ok


def run_condition(trials: list[Trial]) -> Score:
    return score(trials, detect([t.signal for t in trials]))


# ------------------------------------------------------------------ kernel vs twin, facade


def _mixed_frames(seed: int, calls: int, ticks: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sigs = []
    for c in range(calls):
        kind = c % 4
        if kind == 0:
            s = sequence(
                rng, all_digits(rng), 50, 50, rng.uniform(-30, 0), rng.uniform(-30, -3)
            ).signal
        elif kind == 1:
            s = white_noise(rng, ticks * TICK, float(rng.uniform(-50, -5)))
        elif kind == 2:
            s = sequence(rng, all_digits(rng), 45, 40, -12, -10).signal
            s = s + white_noise(rng, len(s), -30)
        else:  # notes whose 2nd harmonic falls near a column (the harmonic check)
            s = _harmonic_notes(rng, ticks * TICK)
        sigs.append(s[: ticks * TICK])
    buf = np.zeros((calls, ticks * TICK))
    for i, s in enumerate(sigs):
        buf[i, : len(s)] = s
    return ulaw_round_trip(buf).reshape(calls, ticks, TICK).transpose(1, 0, 2).copy()


def _harmonic_notes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Notes 2 % under 697/770/852 Hz with a 2nd harmonic (-7 dB) 2.2 % over 1336/1477/1633 Hz."""
    out = np.zeros(n)
    pos = LEAD_SAMPLES
    while pos + 800 < n:
        f0 = float(rng.choice([697.0, 770.0, 852.0])) * 0.98
        t = np.arange(800) / FS
        ph = rng.uniform(0, 2 * np.pi, 2)
        x = np.sin(2 * np.pi * f0 * t + ph[0]) + 0.45 * np.sin(2 * np.pi * 2 * f0 * t + ph[1])
        out[pos : pos + 800] = amp(-8) * x
        pos += 800 + int(rng.integers(200, 600))
    return out


def test_kernel_matches_numpy_twin() -> None:
    calls, ticks = 12, 90
    frames = _mixed_frames(7, calls, ticks)
    # the twin runs on half the slots, in a scrambled slot order
    slots = np.random.default_rng(1).permutation(24)[:calls]
    hist_a, sm_a = k.new_state(24)
    hist_b, sm_b = k.new_state(24)
    # gaps (sub-blocks no packet wrote): single lost packets, and one call with a run
    # of them long enough to outlast the hold
    gaps = np.random.default_rng(2).random((ticks, calls, k.SUBS_PER_TICK)) < 0.04
    gaps[30:36, 0] = True
    hits_a, hits_b, rep_a, rep_b = [], [], [], []
    for t in range(ticks):
        ha, ra = k.detect_tick(frames[t], slots, hist_a, sm_a, gaps[t])
        hb, rb = k.detect_tick_py(frames[t], slots, hist_b, sm_b, gaps[t])
        hits_a.append(ha)
        hits_b.append(hb)
        rep_a.append(ra)
        rep_b.append(rb)
    ha_all, hb_all = np.stack(hits_a), np.stack(hits_b)
    assert (ha_all >= 0).sum() > 100  # the signals do carry digits
    np.testing.assert_array_equal(np.stack(rep_a), np.stack(rep_b))
    assert (ha_all == hb_all).mean() > 0.995  # float32 vs float64 may flip a borderline hop
    np.testing.assert_allclose(hist_a[slots], hist_b[slots], rtol=1e-3, atol=64.0)
    np.testing.assert_array_equal(sm_a, sm_b)


def test_facade_slots_grow_and_validation() -> None:
    det = inband.InbandDetector(capacity=2, grow_by=3)
    slots = [det.add() for _ in range(4)]
    assert slots == [0, 1, 2, 3] and det.capacity == 5 and len(det) == 4
    det.remove(1)
    assert det.add() == 1
    with pytest.raises(ValueError):
        det.remove(4)
    with pytest.raises(ValueError):
        det.process(np.zeros((2, 80), dtype=np.int16), np.array([0, 1]))
    with pytest.raises(ValueError):
        det.process(np.zeros((2, TICK), dtype=np.int16), np.array([0]))
    with pytest.raises(ValueError):
        det.process(np.zeros((1, TICK), dtype=np.int16), np.array([7]))
    inband.warm()


def test_state_survives_growth_and_slot_reuse() -> None:
    """A digit spanning a growth of the state arrays is still found; a reused slot starts clean."""
    rng = np.random.default_rng(3)
    trial = sequence(rng, "5", 60, 100)
    pcm = ulaw_round_trip(np.concatenate([trial.signal, np.zeros(2 * TICK)]))
    frames = pcm[: len(pcm) // TICK * TICK].reshape(-1, TICK)
    det = inband.InbandDetector(capacity=1, grow_by=1)
    slot = det.add()
    found = []
    for t, f in enumerate(frames):
        if t == len(frames) // 2:
            det.add()  # grows while the tone may be under way
        found += det.process(f[None, :], np.array([slot]))
    assert [d.digit for d in found] == ["5"]
    # a removed-then-added slot must not carry the old history into a new call
    det.remove(slot)
    slot2 = det.add()
    assert slot2 == slot
    assert det.process(np.zeros((1, TICK), dtype=np.int16), np.array([slot2])) == []


def test_report_offset_points_at_tone_start() -> None:
    rng = np.random.default_rng(11)
    trials = [sequence(rng, all_digits(rng), 60, 60) for _ in range(8)]
    found = detect([t.signal for t in trials])
    errors = []
    for trial, dets in zip(trials, found, strict=True):
        assert [d for d, _ in dets] == [d for d, _, _ in trial.tones]
        errors += [start - a for (_, start), (_, a, _) in zip(dets, trial.tones, strict=True)]
    # within one 5 ms sub-block either side
    assert max(abs(e) for e in errors) <= 40, errors


# ------------------------------------------------------------------ the battery


def test_all_16_digits(table: list[Row]) -> None:
    rng = np.random.default_rng(100)
    trials = [sequence(rng, all_digits(rng), 50, 50) for _ in range(16)]
    assert record(
        table, "digits", "all 16, -10 dBm0/tone, 50 ms on/50 off", "detect", run_condition(trials)
    )


@pytest.mark.parametrize(
    ("row_dev", "col_dev", "expect"),
    [
        (0.015, 0.0, "detect"),
        (-0.015, 0.0, "detect"),
        (0.0, 0.015, "detect"),
        (0.0, -0.015, "detect"),
        (0.015, 0.015, "detect"),
        (-0.015, -0.015, "detect"),
        (0.015, -0.015, "detect"),
        (-0.015, 0.015, "detect"),
        (0.035, 0.0, "reject"),
        (-0.035, 0.0, "reject"),
        (0.0, 0.035, "reject"),
        (0.0, -0.035, "reject"),
        (0.035, 0.035, "reject"),
        (-0.035, -0.035, "reject"),
    ],
)
def test_frequency_deviation(table: list[Row], row_dev: float, col_dev: float, expect: str) -> None:
    rng = np.random.default_rng(int(1000 * (row_dev + 2 * col_dev)) + 200)
    trials = [
        sequence(rng, all_digits(rng), 60, 60, row_dev=row_dev, col_dev=col_dev) for _ in range(6)
    ]
    cond = f"row {100 * row_dev:+.1f} %, column {100 * col_dev:+.1f} %"
    assert record(table, "frequency", cond, expect, run_condition(trials))


@pytest.mark.parametrize(
    ("on_ms", "expect"),
    [
        (40, "detect"),
        (35, "info"),
        (30, "info"),
        (25, "info"),
        (23, "reject"),
        (20, "reject"),
        (15, "reject"),
        (10, "reject"),
    ],
)
def test_duration(table: list[Row], on_ms: int, expect: str) -> None:
    rng = np.random.default_rng(300 + on_ms)
    trials = [sequence(rng, all_digits(rng), on_ms, 80) for _ in range(12)]
    assert record(table, "duration", f"{on_ms} ms tones, 80 ms gaps", expect, run_condition(trials))


@pytest.mark.parametrize("on_ms", [40, 50])
def test_40ms_gaps_resolved(table: list[Row], on_ms: int) -> None:
    rng = np.random.default_rng(400 + on_ms)
    # every digit twice in a row: each pair is two digits only if the gap is seen
    trials = [sequence(rng, "".join(d + d for d in all_digits(rng)), on_ms, 40) for _ in range(8)]
    cond = f"{on_ms} ms tones, 40 ms gaps, each digit twice"
    assert record(table, "gaps", cond, "detect", run_condition(trials))


@pytest.mark.parametrize(("drop_ms", "expect"), [(5, "detect"), (10, "detect")])
def test_short_interruption_is_one_digit(table: list[Row], drop_ms: int, expect: str) -> None:
    """ITU-T Q.24: a drop-out of up to 10 ms inside a tone is not a pause."""
    rng = np.random.default_rng(450 + drop_ms)
    trials = []
    for _ in range(6):
        t = sequence(rng, all_digits(rng), 100, 60)
        for _, a, _ in t.tones:
            m = a + int(rng.integers(200, 400))
            t.signal[m : m + drop_ms * FS // 1000] = 0.0
        trials.append(t)
    cond = f"100 ms tones with a {drop_ms} ms drop-out inside"
    assert record(table, "gaps", cond, expect, run_condition(trials))


@pytest.mark.parametrize(
    ("row_dbm0", "col_dbm0", "expect", "label"),
    [
        (-6.0, -14.0, "detect", "normal 8 dB (row -6, column -14 dBm0)"),
        (-12.0, -8.0, "detect", "reverse 4 dB (row -12, column -8 dBm0)"),
        (-4.0, -16.0, "reject", "normal 12 dB (row -4, column -16 dBm0)"),
        (-16.0, -8.0, "reject", "reverse 8 dB (row -16, column -8 dBm0)"),
    ],
)
def test_twist(table: list[Row], row_dbm0: float, col_dbm0: float, expect: str, label: str) -> None:
    rng = np.random.default_rng(500 + int(row_dbm0 * 10 + col_dbm0))
    trials = [sequence(rng, all_digits(rng), 60, 60, row_dbm0, col_dbm0) for _ in range(6)]
    assert record(table, "twist", label, expect, run_condition(trials))


@pytest.mark.parametrize("dbm0", [0.0, -5.0, -10.0, -15.0, -20.0, -25.0, -30.0, -35.0, -45.0])
def test_levels(table: list[Row], dbm0: float) -> None:
    rng = np.random.default_rng(600 + int(-dbm0))
    trials = [sequence(rng, all_digits(rng), 60, 60, dbm0, dbm0) for _ in range(6)]
    expect = "detect" if dbm0 >= -35 else "reject"
    cond = f"{dbm0:.0f} dBm0 per tone" + (" (sum clips)" if dbm0 > -6 else "")
    assert record(table, "level", cond, expect, run_condition(trials))


@pytest.mark.parametrize(
    ("dbm0", "snr_db"), [(-10.0, 15.0), (-25.0, 15.0), (-10.0, 10.0), (-25.0, 6.0)]
)
def test_white_noise(table: list[Row], dbm0: float, snr_db: float) -> None:
    rng = np.random.default_rng(700 + int(-dbm0) + int(snr_db))
    noise_dbm0 = dbm0 + 10 * math.log10(2) - snr_db  # two tones' power over the noise
    trials = []
    for _ in range(20):
        t = sequence(rng, all_digits(rng), 50, 50, dbm0, dbm0)
        t.signal = t.signal + white_noise(rng, len(t.signal), noise_dbm0)
        trials.append(t)
    s = run_condition(trials)
    cond = f"{dbm0:.0f} dBm0/tone, noise {noise_dbm0:.1f} dBm0 (S/N {snr_db:.0f} dB)"
    # the requirement is 15 dB; lower S/N rows are for information
    assert record(table, "noise", cond, "detect" if snr_db >= 15 else "info", s, min_rate=0.95)


def test_dial_tone(table: list[Row]) -> None:
    rng = np.random.default_rng(800)
    trials = []
    for _ in range(8):
        t = sequence(rng, all_digits(rng), 50, 50, -10, -10)
        t.signal = t.signal + dial_tone(rng, len(t.signal), -10)
        trials.append(t)
    ok1 = record(
        table,
        "dial tone",
        "digits -10 + 350/440 Hz at -10 dBm0/tone",
        "detect",
        run_condition(trials),
    )
    alone = [Trial(dial_tone(rng, 10 * FS, lvl), []) for lvl in (0, -5, -10, -13, -20, -30)]
    s = run_condition(alone)
    ok2 = record(table, "dial tone", "350+440 Hz alone, 0..-30 dBm0, 6 x 10 s", "reject", s)
    assert ok1 and ok2


def test_no_digit_from_noise(table: list[Row]) -> None:
    rng = np.random.default_rng(900)
    trials = [Trial(white_noise(rng, 10 * FS, lvl), []) for lvl in (-3, -10, -20, -30, -40, -50)]
    assert record(
        table, "noise", "white noise alone, -3..-50 dBm0, 6 x 10 s", "reject", run_condition(trials)
    )


# ------------------------------------------------------------------ talk-off: speech and music

SPEECH_SENTENCES = [
    "Please enter your account number followed by the pound key.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "One two three four five six seven eight nine zero, star, hash.",
    "Thank you for calling, all of our agents are busy at the moment.",
    "Your call is important to us, please stay on the line.",
    "She sells sea shells by the sea shore on a sunny afternoon.",
    "To hear these options again, press nine; to speak to an operator, press zero.",
    "The meeting has been moved to Thursday at eleven forty five.",
    "Beautiful music fills the hall while the violins sing and the drums roll.",
    "Eee, ooo, aaa, mmm, the singer held the high note for a long, long time.",
    "Twenty twenty four, nineteen eighty, three hundred and sixty five days.",
    "Could you spell that please: alpha, bravo, charlie, delta, echo, foxtrot.",
    "Weather tomorrow: sunny spells, light winds, and a high of seventeen degrees.",
    "Whistle while you work, hum a tune, and keep the rhythm going.",
    "Guten Tag, wie geht es Ihnen? Bonjour, comment allez-vous? Buenos dias.",
    "Remember to check the voicemail box for new and saved messages.",
]
SPEECH_VOICES = [
    ("en-us", 150),
    ("en", 175),
    ("en-gb+f3", 140),
    ("en-us+m3", 200),
    ("de", 160),
    ("fr", 150),
    ("es", 170),
    ("it", 145),
    ("en+f2", 220),
    ("nl", 130),
    ("en-us+f4", 120),
    ("pt", 165),
]
SPEECH_SECONDS_PER_VOICE = 55.0


def _speech_text(rng: np.random.Generator, words: int) -> str:
    out: list[str] = []
    while sum(len(s.split()) for s in out) < words:
        out.append(SPEECH_SENTENCES[int(rng.integers(len(SPEECH_SENTENCES)))])
    return " ".join(out)


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert w.getframerate() == FS and w.getsampwidth() == 2 and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64)


@pytest.fixture(scope="module")
def speech() -> list[tuple[str, np.ndarray]]:
    """About 11 minutes of espeak-ng speech at 8 kHz, cached in the temp dir across runs."""
    # make test installs both (make tools); a missing one must fail, not hide the test.
    assert shutil.which("espeak-ng") and shutil.which("sox"), "espeak-ng and sox are needed"
    cache = Path(tempfile.gettempdir()) / "pbx-inband-speech"
    cache.mkdir(exist_ok=True)
    rng = np.random.default_rng(1234)
    out = []
    for voice, wpm in SPEECH_VOICES:
        text = _speech_text(rng, int(SPEECH_SECONDS_PER_VOICE * wpm / 60))
        key = hashlib.sha256(f"{voice}|{wpm}|{text}".encode()).hexdigest()[:16]
        wav8k = cache / f"{key}.wav"
        if not wav8k.exists():
            # Per-process names: two runs sharing the temp dir (CI and a developer, or
            # two checkouts) may generate the same file at once; the rename is atomic.
            raw = cache / f"{key}.{os.getpid()}.raw.wav"
            subprocess.run(
                ["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(raw), text],
                check=True,
                capture_output=True,
            )
            tmp = cache / f"{key}.{os.getpid()}.tmp.wav"
            subprocess.run(
                ["sox", str(raw), "-r", str(FS), "-c", "1", "-b", "16", str(tmp)],
                check=True,
                capture_output=True,
            )
            tmp.replace(wav8k)
            raw.unlink()
        out.append((f"{voice} {wpm} wpm", _read_wav(wav8k)))
    return out


def test_no_digit_from_speech(table: list[Row], speech: list[tuple[str, np.ndarray]]) -> None:
    seconds = sum(len(x) for _, x in speech) / FS
    assert seconds >= 600, seconds
    signals = []
    for _, x in speech:
        peak = np.abs(x).max()
        for gain_db in (-1.0, -20.0):  # a loud talker (peaks at -1 dBFS) and a quiet one
            signals.append(x / peak * 32767 * 10 ** (gain_db / 20))
    s = run_condition([Trial(sig, []) for sig in signals])
    cond = f"espeak-ng, {len(speech)} voices, {seconds / 60:.1f} min x 2 levels"
    assert record(table, "talk-off", cond, "reject", s)


def _note_hz(semitones_from_a4: float) -> float:
    return 440.0 * 2 ** (semitones_from_a4 / 12)


def _harmonic_tone(
    t: np.ndarray, f0: np.ndarray | float, harmonics: int, phase_rng: np.random.Generator
) -> np.ndarray:
    """Sum of harmonics with 1/h amplitudes; f0 may vary over time (the phase is integrated)."""
    f0 = np.broadcast_to(np.asarray(f0, dtype=np.float64), t.shape)
    phase = 2 * np.pi * np.cumsum(f0) / FS
    x = np.zeros_like(t)
    for h in range(1, harmonics + 1):
        inside = (h * f0) < FS / 2
        x += inside * np.sin(h * phase + phase_rng.uniform(0, 2 * np.pi)) / h
    return x


def _music(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Chords of 2-4 notes with harmonics, envelopes, and sweeps, back to back."""
    parts = []
    total = 0
    while total < seconds * FS:
        n = int(rng.uniform(0.12, 0.6) * FS)
        t = np.arange(n) / FS
        kind = rng.integers(4)
        if kind < 2:  # chord
            notes = rng.choice(np.arange(-24, 20), size=int(rng.integers(2, 5)), replace=False)
            x = sum(_harmonic_tone(t, _note_hz(s), int(rng.integers(3, 9)), rng) for s in notes)
        elif kind == 2:  # a melody note with vibrato
            f0 = _note_hz(rng.uniform(-20, 20)) * (1 + 0.01 * np.sin(2 * np.pi * 5.5 * t))
            x = _harmonic_tone(t, f0, int(rng.integers(2, 7)), rng)
        else:  # sweeps: one up, one down, log-frequency
            f_a = 200 * (10 ** (t / t[-1])) if rng.integers(2) else 2000 / (10 ** (t / t[-1]))
            f_b = 1800 / (8 ** (t / t[-1]))
            x = _harmonic_tone(t, f_a, 4, rng) + 0.7 * _harmonic_tone(t, f_b, 3, rng)
        env = np.minimum(1.0, np.minimum(t / 0.01, (t[-1] - t) / 0.03 + 0.05))
        x = x * env
        parts.append(x / (np.abs(x).max() + 1e-9) * amp(rng.uniform(-20, -3)))
        total += n
    return np.concatenate(parts)


def test_no_digit_from_fundamental_and_2nd_harmonic(table: list[Row]) -> None:
    rng = np.random.default_rng(1400)
    trials = [Trial(_harmonic_notes(rng, 10 * FS), []) for _ in range(6)]
    cond = "note 2 % under a row + 2nd harmonic, 6 x 10 s"
    assert record(table, "talk-off", cond, "reject", run_condition(trials))


def test_no_digit_from_music(table: list[Row]) -> None:
    rng = np.random.default_rng(1500)
    signals = [_music(rng, 30.0) for _ in range(8)]
    minutes = sum(len(x) for x in signals) / FS / 60
    s = run_condition([Trial(x, []) for x in signals])
    cond = f"chords with harmonics, vibrato, sweeps, {minutes:.1f} min"
    assert record(table, "talk-off", cond, "reject", s)

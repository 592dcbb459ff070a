"""perf/bench_media.py --loss: a real media worker, phones losing audio packets, and
every key press still reported exactly once (in-band and RFC 4733 together)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def bench_media(tmp_path: Path, calls: int, *options: str) -> dict:
    out = tmp_path / "media.json"
    subprocess.run(
        [sys.executable, "perf/bench_media.py", "-n", str(calls), "--warmup", "1",
         "--measure", "3", "--press-every", "0.4", *options, "--json", str(out)],
        cwd=ROOT, check=True, timeout=240, capture_output=True,
    )  # fmt: skip
    result: dict = json.loads(out.read_text())["results"][0]
    return result


def test_presses_are_reported_once_through_lost_packets(tmp_path: Path) -> None:
    calls, seconds = 40, 4.0
    result = bench_media(tmp_path, calls, "--loss", "5")
    digits = result["digits"]
    assert result["worker_errors"] == []
    # 5 % of 40 phones' 200 audio packets each were never sent
    audio_packets = calls * round(seconds / 0.02)
    assert 0.02 * audio_packets < result["audio_packets_withheld"] < 0.09 * audio_packets
    assert digits["presses"] >= calls * 5
    assert digits["reported"] == digits["presses"]
    assert digits["legs_with_duplicates"] == 0 and digits["legs_with_missing"] == 0
    assert digits["by_source"].get("inband", 0) > 0  # the in-band path was exercised


def test_per_leg_phones_send_from_the_first_tick(tmp_path: Path) -> None:
    """The per-leg phone sockets' compiled loops are loaded before the first tick: met
    there, they made the generator ~0.9 s late, and the audio it then sent at once
    overflowed the worker's receive ring (the first presses, in-band only, were lost)."""
    result = bench_media(tmp_path, 40, "--no-rfc4733", "--gen-sockets", "per_leg")
    digits = result["digits"]
    assert digits["presses"] >= 40 * 5
    assert digits["reported"] == digits["presses"] == digits["by_source"]["inband"]
    assert digits["legs_with_missing"] == 0


def test_press_faults_place_the_first_press_that_went_wrong() -> None:
    """A leg that missed its second press, one that reported its first twice, and a
    clean one: the JSON says which press and when it began."""
    sys.path.insert(0, str(ROOT / "perf"))
    try:
        import bench_media
    finally:
        sys.path.pop(0)
    presses = np.array([3, 2, 2])
    heard = [["1/rfc4733", "3/inband"], ["1/rfc4733", "1/inband", "2/rfc4733"],
             ["1/rfc4733", "2/inband"]]
    faults = bench_media.press_faults(presses, heard, np.array([10, 0, 5]), 250)
    assert [(f["leg"], f["press"], f["pressed"]) for f in faults] == [(0, 1, "123"), (1, 1, "12")]
    assert faults[0]["at_s"] == (10 + 250) * 0.02 and faults[1]["at_s"] == 250 * 0.02
    assert faults[1]["heard"] == heard[1]

"""perf/bench_media.py --loss: a real media worker, phones losing audio packets, and
every key press still reported exactly once (in-band and RFC 4733 together)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_presses_are_reported_once_through_lost_packets(tmp_path: Path) -> None:
    out = tmp_path / "media.json"
    calls, seconds = 40, 4.0
    subprocess.run(
        [sys.executable, "perf/bench_media.py", "-n", str(calls), "--warmup", "1",
         "--measure", "3", "--press-every", "0.4", "--loss", "5", "--json", str(out)],
        cwd=ROOT, check=True, timeout=240, capture_output=True,
    )  # fmt: skip
    result = json.loads(out.read_text())["results"][0]
    digits = result["digits"]
    assert result["worker_errors"] == []
    # 5 % of 40 phones' 200 audio packets each were never sent
    audio_packets = calls * round(seconds / 0.02)
    assert 0.02 * audio_packets < result["audio_packets_withheld"] < 0.09 * audio_packets
    assert digits["presses"] >= calls * 5
    assert digits["reported"] == digits["presses"]
    assert digits["legs_with_duplicates"] == 0 and digits["legs_with_missing"] == 0
    assert digits["by_source"].get("inband", 0) > 0  # the in-band path was exercised

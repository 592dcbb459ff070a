"""perf/bench_executor.py runs end to end on a few sessions and reports sane figures
(its figures themselves are timings: not checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_executor_reports_cpu_and_latency(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "perf" / "bench_executor.py"), "-n", "30", "-r", "60",
         "--warmup", "5", "--json", str(out)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    (run,) = summary["runs"]
    assert run["sessions"] == 30 and run["bad_reply_count"] == 0
    # Every session was answered twice and cost the executor some CPU.
    assert run["executor_cpu_ms_per_session"] > 0
    assert summary["executor_cpu_ms_per_session_median"] == run["executor_cpu_ms_per_session"]
    assert 0 < run["reply_ms_p50"] <= run["reply_ms_p99"] < 10_000
    assert run["start_reply_ms_p50"] > 0 and run["end_reply_ms_p50"] > 0
    assert run["executor_to_provider_cpu"] > 0


def test_bench_executor_in_process_reports_cpu_per_session() -> None:
    # process_event for both events of each session, no I/O: a figure per round.
    done = subprocess.run(
        [sys.executable, str(ROOT / "perf" / "bench_executor.py"), "--in-process", "20",
         "--repeat", "2"],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = (done.stdout + done.stderr).strip().splitlines()[-1]
    assert "in process, 20 sessions per round:" in line, line
    figures = line.split(":", 3)[-1].split("us")[0].split(",")
    assert len(figures) == 2 and all(float(f) > 0 for f in figures), line

"""perf/bench_wakeup.py: every placement measured, each side's CPU counted, JSON written."""

from __future__ import annotations

import json
import os
from pathlib import Path

from perf.bench_wakeup import main, ping_pong


def test_a_ping_pong_counts_both_sides_and_its_round_trips() -> None:
    before = os.sched_getaffinity(0)
    cpu = min(before)
    result = ping_pong(300, cpu, cpu)
    assert set(result) == {"round_trip_us", "parent_cpu_us", "child_cpu_us"}
    assert result["round_trip_us"] > 0
    # One CPU for both: each side's CPU per round trip is within the round trip's time.
    assert 0 < result["parent_cpu_us"] <= result["round_trip_us"] * 1.5
    assert os.sched_getaffinity(0) == before  # the script's own placement is given back


def test_the_script_writes_every_placement(tmp_path: Path, capsys) -> None:
    out = tmp_path / "wakeup.json"
    assert main(["--round-trips", "200", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    expected = ({"free", "two_cpus", "one_cpu", "two_cpus_busy"}
                if len(os.sched_getaffinity(0)) >= 2 else {"free", "one_cpu"})
    assert set(data["results"]) == expected
    assert all(r["round_trip_us"] > 0 for r in data["results"].values())
    printed = capsys.readouterr().out
    assert all(name in printed for name in expected)

"""perf/setup_rate.py's "best step" figures (the ladder itself needs a running PBX)."""

from __future__ import annotations

from typing import Any

from perf.setup_rate import best_per_core


def step(rate: int, per_core: float | None, failed: int, p99: float | None) -> dict[str, Any]:
    return {"tool": "sipp", "rate": rate, "failed": failed,
            "calls_per_s_per_front_core": per_core, "setup_ms": {"p99": p99}}


def test_best_clean_step_counts_failures_and_the_bound_counts_p99_too() -> None:
    ladder = [step(400, 820.0, 0, 8.0), step(500, 960.0, 0, 40.0),
              step(600, 1100.0, 0, 1500.0), step(700, 1200.0, 12, 3500.0)]
    assert best_per_core(ladder) == 1100.0  # clean: no failed call, whatever the p99
    assert best_per_core(ladder, 100.0) == 960.0
    assert best_per_core(ladder, 5.0) is None
    assert best_per_core([step(400, None, 0, 8.0), step(500, 900.0, 0, None)], 100.0) is None

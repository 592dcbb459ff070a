"""perf/bench_relay_floor.py: every packet relayed to the peer's phone, counters taken, JSON written."""

from __future__ import annotations

import json
from pathlib import Path

from perf.bench_relay_floor import main, run_step


def test_a_step_relays_every_packet_to_the_peer() -> None:
    result = run_step(calls=4, interval_ms=1.0, warmup=0.3, measure=1.0, seed=0)
    # 8 legs, a packet every 20 ms each, for 1.3 s; all come back from the peer leg.
    assert result["sent"] >= 8 * 60
    assert result["forwarded"] == result["sent"] and result["lost"] == 0
    assert result["misrouted"] == 0  # each heard by the phone of the sender's peer leg
    assert 8 * 50 * 0.8 <= result["relayed_per_s"] <= 8 * 50 * 1.2
    assert result["passes_per_s"] > 0 and result["cpu_pct_per_call"] >= 0


def test_the_script_writes_each_step(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "floor.json"
    assert main(["-n", "2", "--interval-ms", "0", "1", "--warmup", "0.2", "--measure", "0.5",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [(r["calls"], r["interval_ms"]) for r in data["results"]] == [(2, 0.0), (2, 1.0)]
    assert all(r["lost"] == 0 and r["forwarded"] > 0 for r in data["results"])
    assert "interval" in capsys.readouterr().out

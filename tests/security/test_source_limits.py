"""Per-source limits (issue 8): loopback was exempt by default, and the rate limiter
scanned its whole table for every new source once full (a spoofed-source flood made
each message cost O(sources))."""

from __future__ import annotations

import time
from pathlib import Path

from pbx.config import load_config
from pbx.ratelimit import RateLimiter

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_config_exempts_no_source() -> None:
    settings = load_config(str(ROOT / "config" / "pbx.toml"))
    assert settings.sip.rate_limit_exempt == []
    assert settings.sip.rate_limit_per_s > 0


def test_eviction_is_constant_time_per_new_source() -> None:
    """A full table must not be scanned for every new source (a spoofed-source flood):
    the work per message stays flat as the table grows, even when no source in it has
    gone quiet."""
    def cost(max_sources: int) -> float:
        rl = RateLimiter(rate_per_s=10, burst=10, max_sources=max_sources)
        for i in range(max_sources):
            rl.allow(f"s{i}", 0.0)
        best = float("inf")
        for rep in range(3):  # new sources every time: each one evicts
            start = time.perf_counter()
            for i in range(2000):
                rl.allow(f"n{rep}-{i}", 0.5)  # the table's sources are not quiet yet
            best = min(best, time.perf_counter() - start)
        return best

    small, large = cost(100), cost(50_000)
    assert large < 10 * small, (small, large)

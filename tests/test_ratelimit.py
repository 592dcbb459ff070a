from __future__ import annotations

from pbx.ratelimit import RateLimiter


def test_burst_then_rate() -> None:
    rl = RateLimiter(rate_per_s=200, burst=400)
    assert sum(rl.allow("192.0.2.1", 0.0) for _ in range(1000)) == 400
    # 100 ms later: 20 more tokens
    assert sum(rl.allow("192.0.2.1", 0.1) for _ in range(100)) == 20
    # never more than the burst, however long the source was quiet
    assert sum(rl.allow("192.0.2.1", 100.0) for _ in range(1000)) == 400


def test_sources_are_independent() -> None:
    rl = RateLimiter(rate_per_s=1, burst=2)
    assert [rl.allow("a", 0.0) for _ in range(3)] == [True, True, False]
    assert [rl.allow("b", 0.0) for _ in range(3)] == [True, True, False]


def test_disabled_and_exempt() -> None:
    assert all(RateLimiter(0, 1).allow("a", 0.0) for _ in range(1000))
    rl = RateLimiter(1, 1, exempt=("127.0.0.0/8",))
    assert all(rl.allow("127.0.0.5", 0.0) for _ in range(1000))
    assert [rl.allow("10.0.0.1", 0.0) for _ in range(2)] == [True, False]
    assert [rl.allow("not-an-ip", 0.0) for _ in range(2)] == [True, False]


def test_table_is_bounded() -> None:
    rl = RateLimiter(rate_per_s=10, burst=10, max_sources=100)
    for i in range(1000):
        rl.allow(f"10.0.{i // 256}.{i % 256}", 0.0)
        assert len(rl) <= 100
    # the source quiet longest is evicted first, a busy one keeps its (empty) bucket
    rl = RateLimiter(rate_per_s=10, burst=2, max_sources=2)
    rl.allow("quiet", 0.0)
    assert rl.allow("busy", 10.0) and rl.allow("busy", 10.0)
    assert rl.allow("new", 10.0)
    assert not rl.allow("busy", 10.0)


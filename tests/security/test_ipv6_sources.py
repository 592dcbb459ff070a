"""An IPv6 host holds a /64 and can send from any of its 2^64 addresses: every budget
keyed by source (the rate limit, server transactions, calls in set-up) counts the /64 as
one source, as the digest lockout already did (pbx.sip.authguard.source_key). Before,
1,000 addresses of one /64 got 1,000 budgets."""

from __future__ import annotations

from pbx.calls.table import CallTable
from pbx.config import parse_config
from pbx.ratelimit import RateLimiter
from pbx.sip.budget import SourceBudget, SourceLedger

PREFIX = "2001:db8:5:6"


def addresses(n: int) -> list[str]:
    return [f"{PREFIX}::{k + 1:x}" for k in range(n)]


def test_the_rate_limit_counts_a_slash_64_once() -> None:
    limiter = RateLimiter(10, 20)
    allowed = sum(limiter.allow(ip, 0.0) for ip in addresses(1000))
    assert allowed == 20  # the burst of one source
    assert limiter.allow("2001:db8:5:7::1", 0.0)  # the next /64 is another source
    assert limiter.allow("192.0.2.1", 0.0) and limiter.allow("192.0.2.2", 0.0)


def test_server_transactions_count_a_slash_64_once() -> None:
    ledger = SourceLedger(SourceBudget(max_transactions=5))
    held = 0
    for ip in addresses(1000):
        if ledger.admits(ip, 100):
            ledger.hold(ip, 0, 100)
            held += 1
    assert held == 5 and ledger.held_by(f"{PREFIX}::abcd") == (5, 500)
    ledger.release(f"{PREFIX}::1", 100)  # released from whichever address it came
    assert ledger.held_by(f"{PREFIX}::2") == (4, 400)


def test_calls_in_set_up_count_a_slash_64_once() -> None:
    settings = parse_config("[limits]\nsetup_calls_per_source = 3\n")
    table = CallTable(settings)
    refused = [table.take_setup_budget(ip) for ip in addresses(10)]
    assert refused.count(None) == 3 and refused[3:] == ["setup"] * 7
    assert table.take_setup_budget("2001:db8:5:7::1") is None

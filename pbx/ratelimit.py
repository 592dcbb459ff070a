"""Per-source request rate limit: one token bucket per source IP, pure (`now` passed in).

A source may send `burst` messages at once and `rate_per_s` per second after
that; what it sends beyond is dropped by the shell (silently on UDP: an answer
would only feed a flood). The table is bounded: when it is full, buckets that
have refilled completely (sources that went quiet) are dropped first, and if
that frees nothing the oldest entry goes, so a spoofed-source flood costs
memory only up to `max_sources`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: float, *, max_sources: int = 65536,
                 exempt: tuple[str, ...] = ()) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(burst, 1.0)
        self.max_sources = max_sources
        self.exempt = tuple(ipaddress.ip_network(net, strict=False) for net in exempt)
        self._buckets: dict[str, _Bucket] = {}
        self._exempt_cache: dict[str, bool] = {}

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _is_exempt(self, source: str) -> bool:
        if not self.exempt:
            return False
        hit = self._exempt_cache.get(source)
        if hit is None:
            try:
                addr = ipaddress.ip_address(source)
                hit = any(addr in net for net in self.exempt)
            except ValueError:
                hit = False
            if len(self._exempt_cache) < self.max_sources:
                self._exempt_cache[source] = hit
        return hit

    def allow(self, source: str, now: float) -> bool:
        """Take one token from `source`'s bucket; False when it is empty."""
        if not self.enabled or self._is_exempt(source):
            return True
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._evict(now)
            bucket = self._buckets[source] = _Bucket(self.burst, now)
        elif now > bucket.updated:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate_per_s)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

    def _evict(self, now: float) -> None:
        full_after_s = self.burst / self.rate_per_s
        quiet = [src for src, b in self._buckets.items() if now - b.updated >= full_after_s]
        for src in quiet:
            del self._buckets[src]
        if not quiet:
            del self._buckets[next(iter(self._buckets))]

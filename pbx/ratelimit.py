"""Per-source request rate limit: one token bucket per source IP, pure (`now` passed in).

A source may send `burst` messages at once and `rate_per_s` per second after
that; what it sends beyond is dropped by the shell (silently on UDP: an answer
would only feed a flood). The table is bounded: buckets are kept in least
recently used order, and when the table is full the least recently used one
goes (O(1): its source was quiet longest, so its bucket is the fullest), so a
spoofed-source flood costs memory only up to `max_sources` and time O(1) per
message.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from pbx.sip.authguard import source_key


class NetworkSet:
    """Membership of source IPs in a list of networks (config: exemptions, trusted
    networks), with a bounded cache so a flood of sources costs one lookup each."""

    def __init__(self, networks: Iterable[str], max_cache: int = 65536) -> None:
        self.networks = tuple(ipaddress.ip_network(net, strict=False) for net in networks)
        self.max_cache = max_cache
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, source: object) -> bool:
        if not self.networks or not isinstance(source, str):
            return False
        hit = self._cache.get(source)
        if hit is None:
            try:
                addr = ipaddress.ip_address(source)
                hit = any(addr in net for net in self.networks)
            except ValueError:
                hit = False
            if len(self._cache) >= self.max_cache:
                self._cache.clear()
            self._cache[source] = hit
        return hit


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: float, *, max_sources: int = 65536,
                 exempt: Iterable[str] = ()) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(burst, 1.0)
        self.max_sources = max_sources
        self.exempt = NetworkSet(exempt, max_sources)
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.rate_per_s > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: str, now: float) -> bool:
        """Take one token from `source`'s bucket; False when it is empty."""
        if not self.enabled or source in self.exempt:
            return True
        if ":" in source:  # IPv6: its /64 (an IPv4 address is its own key, no call)
            source = source_key(source)
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._buckets.popitem(last=False)
            bucket = self._buckets[source] = _Bucket(self.burst, now)
        else:
            self._buckets.move_to_end(source)
            if now > bucket.updated:
                bucket.tokens = min(self.burst,
                                    bucket.tokens + (now - bucket.updated) * self.rate_per_s)
                bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True
        return False

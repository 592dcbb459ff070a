"""Failed-authentication counters with exponential backoff (lockout), sans-IO.

Theory of operation
-------------------
Digest lets anyone who can send a request test one password per request
(RFC 7616 §5.7 online dictionary attacks). The registrar asks `check` before
it verifies credentials, and reports every verified attempt with
`record_failure` / `record_success`. While `check` returns a `Lockout` the
credentials are not even verified, so a cracker cannot tell a right password
from a wrong one, and the answer (403 with Retry-After) is the same whether the
username exists or not: usernames are counted whether they exist or not.

Three counters, all keyed by the source *IP* (the port is the attacker's to
choose; IPv6 sources count per /64, the block one subscriber gets):

* (source, username), limit `max_failures`: one client guessing one
  password. Tight: a phone with a wrong password stops hammering quickly.
* source, limit `source_max_failures`: one client guessing over many
  usernames (a scanner sweeping extensions). Looser, because an office NAT
  puts many phones behind one address.
* username, limit `user_max_failures`: many sources guessing one password
  (a distributed attack). This one is the double-edged sword: failing on
  purpose for a username from anywhere would lock out the real phone (a
  denial of service). So it is the softest, and a source that has
  authenticated as the user within `known_source_s` is *known* for it: the
  per-username and per-source counters neither grow from nor apply to a
  known (source, user) pair; only the pair's own counter does. The working
  phone keeps registering from its address while strangers are locked out;
  the trade-off is that a phone that comes up from a new address during such
  an attack waits out the backoff like the attacker (and an attacker behind
  the same NAT as the phone can lock that phone out, as it shares its address).

Each counter: a failure more than `failure_memory_s` after the previous one
starts again from zero; at the limit the key is locked for `backoff_base_s`,
each further failure (one is possible each time a lock ends) doubles it, up to
`backoff_max_s`. A success clears only the (source, user) counter: a cracker
holding one valid account must not be able to reset its source's counter.

Every table is bounded (`table_size` entries, least recently used evicted
first) and every operation is O(1): a few dict lookups. Entries are created
by failures (counters) or successes (known pairs), so the memory a stranger
can make us hold is `table_size` entries per table. No clock: `now` comes in.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

# Usernames longer than this are keyed by a hash (the text is the attacker's).
_MAX_KEY_CHARS = 64
K = TypeVar("K")


def source_key(ip: str) -> str:
    """The address a source is counted under, by every per-source budget and lockout:
    the IP, or its /64 for IPv6 (one host holds a /64 and sends from any address in it)."""
    if ":" not in ip:
        return ip
    return _ipv6_key(ip)


@functools.lru_cache(maxsize=65536)
def _ipv6_key(ip: str) -> str:
    try:
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    except ValueError:
        return ip[:_MAX_KEY_CHARS]


def user_key(username: str) -> str:
    """A bounded key for a username (long ones are replaced by a hash of them)."""
    if len(username) <= _MAX_KEY_CHARS:
        return username
    digest = hashlib.sha256(username.encode("utf-8", "surrogatepass")).hexdigest()
    return "#" + digest[:32]


@dataclass(frozen=True)
class Lockout:
    """Why and until when credentials from a source are not checked."""

    scope: str  # "source+user", "source" or "user"
    until: float

    def retry_after_s(self, now: float) -> int:
        """Whole seconds to wait (Retry-After, RFC 3261 §20.33), at least 1."""
        return max(1, int(self.until - now + 0.999))


class _Counter:
    __slots__ = ("failures", "last_failure", "locked_until")

    def __init__(self) -> None:
        self.failures = 0
        self.last_failure = float("-inf")
        self.locked_until = float("-inf")


class _Lru(Generic[K]):
    """A dict of at most `size` counters; the least recently touched goes first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[K, _Counter] = OrderedDict()

    def get(self, key: K) -> _Counter | None:
        return self.entries.get(key)

    def touch(self, key: K) -> _Counter:
        entry = self.entries.get(key)
        if entry is None:
            if len(self.entries) >= self.size:
                self.entries.popitem(last=False)
            entry = self.entries[key] = _Counter()
        else:
            self.entries.move_to_end(key)
        return entry

    def __len__(self) -> int:
        return len(self.entries)


class AuthGuard:
    """The counters and their policy; see the module docstring."""

    def __init__(
        self,
        *,
        max_failures: int = 5,
        source_max_failures: int = 20,
        user_max_failures: int = 30,
        backoff_base_s: float = 2.0,
        backoff_max_s: float = 900.0,
        failure_memory_s: float = 3600.0,
        known_source_s: float = 86400.0,
        table_size: int = 16384,
    ) -> None:
        if min(max_failures, source_max_failures, user_max_failures, table_size) < 1:
            raise ValueError("limits and table_size must be at least 1")
        if not 0 < backoff_base_s <= backoff_max_s:
            raise ValueError("need 0 < backoff_base_s <= backoff_max_s")
        self.max_failures = max_failures
        self.source_max_failures = source_max_failures
        self.user_max_failures = user_max_failures
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.failure_memory_s = failure_memory_s
        self.known_source_s = known_source_s
        self._pairs: _Lru[tuple[str, str]] = _Lru(table_size)
        self._sources: _Lru[str] = _Lru(table_size)
        self._users: _Lru[str] = _Lru(table_size)
        # (source, user) -> until when the source is known for the user.
        self._known: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._known_size = table_size

    # ------------------------------------------------------------ queries

    def _is_known(self, pair: tuple[str, str], now: float) -> bool:
        until = self._known.get(pair)
        return until is not None and until > now

    def check(self, source_ip: str, username: str, now: float) -> Lockout | None:
        """The lockout that applies to credentials for `username` from `source_ip`
        (the longest if several do), or None if they may be checked."""
        src, user = source_key(source_ip), user_key(username)
        pair = (src, user)
        found: list[Lockout] = []
        entry = self._pairs.get(pair)
        if entry is not None and entry.locked_until > now:
            found.append(Lockout("source+user", entry.locked_until))
        if not self._is_known(pair, now):
            for scope, table_entry in (("source", self._sources.get(src)),
                                       ("user", self._users.get(user))):
                if table_entry is not None and table_entry.locked_until > now:
                    found.append(Lockout(scope, table_entry.locked_until))
        return max(found, key=lambda lock: lock.until) if found else None

    def entries(self) -> int:
        """Entries held over all tables (a gauge for /metrics)."""
        return len(self._pairs) + len(self._sources) + len(self._users) + len(self._known)

    # ------------------------------------------------------------ updates

    def _fail(self, entry: _Counter, limit: int, now: float) -> float | None:
        """Count one failure; the lock's end if this failure starts one."""
        if now - entry.last_failure > self.failure_memory_s:
            entry.failures = 0
        entry.failures += 1
        entry.last_failure = now
        over = entry.failures - limit
        if over < 0:
            return None
        # Capped exponent: 2**60 s is past any backoff_max_s.
        lock_s = min(self.backoff_base_s * 2.0 ** min(over, 60), self.backoff_max_s)
        entry.locked_until = now + lock_s
        return entry.locked_until

    def record_failure(self, source_ip: str, username: str, now: float) -> list[Lockout]:
        """A password was checked and was wrong (or the user is unknown). Returns the
        lockouts this failure starts (empty if none)."""
        src, user = source_key(source_ip), user_key(username)
        pair = (src, user)
        started: list[Lockout] = []
        until = self._fail(self._pairs.touch(pair), self.max_failures, now)
        if until is not None:
            started.append(Lockout("source+user", until))
        if not self._is_known(pair, now):
            until = self._fail(self._sources.touch(src), self.source_max_failures, now)
            if until is not None:
                started.append(Lockout("source", until))
            until = self._fail(self._users.touch(user), self.user_max_failures, now)
            if until is not None:
                started.append(Lockout("user", until))
        return started

    def record_success(self, source_ip: str, username: str, now: float) -> None:
        """The user authenticated from the source: its pair counter is cleared and the
        source becomes known for the user (see the module docstring)."""
        pair = (source_key(source_ip), user_key(username))
        self._pairs.entries.pop(pair, None)
        known = self._known
        if pair in known:
            known.move_to_end(pair)
        elif len(known) >= self._known_size:
            known.popitem(last=False)
        known[pair] = now + self.known_source_s

"""Digest nonces: bound to a request and a front instance, usable once per nonce count.

Theory of operation
-------------------
A nonce is `<issued ms>.<instance>.<salt>.<binding>.<mac>` (hex), where
mac = HMAC-SHA-256(secret, realm:issued:instance:salt:binding). It is checked
without a table (the MAC proves we issued it), and it is *bound*:

* to the **request it was issued for**: `binding` is a keyed hash of that
  request's Call-ID and To URI. A client retrying after 401/407 keeps both
  (RFC 3261 §8.1.3.5), a phone refreshing its registration keeps both (§10.2),
  in-dialog requests keep both; a captured `Authorization` replayed with another
  Call-ID, or a captured INVITE `Proxy-Authorization` sent towards another To,
  does not match. The method is not bound (the digest covers it: HA2), nor is
  the source address: RFC 7616 §3.3 notes that an address in the nonce breaks
  clients whose requests take different paths and is easily spoofed; for SIP
  it would also break NAT rebinding and a phone moving between networks, and
  over UDP it stops nobody (a spoofed REGISTER needs no answer to succeed).
* to the **front instance** that issued it (`instance`, random per `Nonces`,
  that is per `DigestAuthenticator`), so that the replay table below is
  complete for every nonce the instance can accept. Several fronts may share
  `auth_secret`: a second front (or this one after a restart) recognises the
  others' nonces as authentic but never accepts them; if the digest is right it
  answers with a fresh challenge and `stale=true`, so the phone retries at once
  with the new nonce without asking its user (one extra round trip on
  fail-over), and a request captured at one front cannot be replayed at another.

Each nonce is accepted with a nonce count `nc` strictly higher than the last
one accepted with it (RFC 7616 §3.4 "nc", §5.5 replay attacks: "if the same
nc-value is seen twice, then the request is a replay"); a client may reuse a
nonce for later requests in the same dialog or registration with nc + 1. The
table behind this holds only nonces that *authenticated successfully* (a
stranger without a password cannot add to it), each until it expires
(`ttl_s`), at most `table_size` of them. When it is full the oldest entry goes
and every nonce issued up to that one becomes stale (a watermark), so an
evicted nonce can never be replayed: its owner just gets `stale=true` and a new
nonce. All this is O(1) per request.

Which of these checks fail, and in which order, is `DigestAuthenticator.verify`'s
business (`pbx.sip.auth`): it asks only once the digest proved the password.
No socket, no clock: time comes in as `now` (seconds). Nonces are checked only
by the instance that issued them, so any clock that is the same for one
process works (the front passes wall-clock time).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections import OrderedDict
from typing import NamedTuple
from urllib.parse import unquote

from pbx.sip.digest import utf8
from pbx.sip.errors import SipError
from pbx.sip.message import SipRequest
from pbx.sip.uri import parse_name_addr

# A nonce "issued" this far in the future is refused as forged (clock steps aside).
NONCE_FUTURE_SKEW_S = 5.0
# Nonces that authenticated, remembered with their last nc (see the module docstring).
DEFAULT_NONCE_TABLE_SIZE = 16384

# issued ms . instance . salt . binding ("x": bound to no request) . mac
_NONCE_RE = re.compile(
    r"([0-9a-f]{1,16})\.([0-9a-f]{8})\.([0-9a-f]{12})\.([0-9a-f]{16}|x)\.([0-9a-f]{32})")
_UNBOUND = "x"


class IssuedNonce(NamedTuple):
    """An authentic nonce, taken apart."""

    age_s: float
    issued_ms: int
    instance: str
    binding: str
    mac: str


def binding_text(request: SipRequest) -> str:
    """What a nonce is bound to: the Call-ID and the To URI (scheme, user, host, port;
    no parameters or tags), as the request carries them."""
    to = request.headers.get("To") or ""
    try:
        uri = parse_name_addr(to).uri
        to_key = f"{uri.scheme}:{unquote(uri.user or '')}@{uri.host.lower()}:{uri.port}"
    except SipError:
        to_key = to.strip()
    return f"{request.call_id}\x00{to_key}"


class Nonces:
    """The nonces of one front instance: issues them, recognises them, and remembers
    the ones that authenticated with their last nonce count (the replay table).

    `secret` keys the MAC (fronts that share it recognise each other's nonces),
    `ttl_s` is how long a nonce stays usable, `table_size` bounds the replay table.
    """

    def __init__(self, realm: str, secret: bytes, ttl_s: float = 300,
                 table_size: int = DEFAULT_NONCE_TABLE_SIZE) -> None:
        if not secret:
            raise ValueError("the nonce secret must not be empty")
        if table_size < 1:
            raise ValueError("nonce_table_size must be at least 1")
        self.realm = realm
        self.secret = secret
        self.ttl_s = ttl_s
        self.table_size = table_size
        self.instance = secrets.token_hex(4)
        # mac of a nonce that authenticated -> (issued ms, last nc accepted); insertion
        # order is first-use order, so the oldest entries are at the front.
        self._used: OrderedDict[str, tuple[int, int]] = OrderedDict()
        # Nonces issued at or before this (ms) are stale: entries evicted from _used.
        self._floor_ms = -1
        self.evictions = 0

    def _mac(self, issued: str, instance: str, salt: str, binding: str) -> str:
        msg = utf8(f"{self.realm}:{issued}:{instance}:{salt}:{binding}")
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()[:32]

    def _binding(self, request: SipRequest | None) -> str:
        if request is None:
            return _UNBOUND
        msg = b"binding\x00" + utf8(binding_text(request))
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()[:16]

    # -- issuing and recognising

    def make(self, now: float, request: SipRequest | None = None) -> str:
        """A fresh nonce, bound to `request` (the one being challenged). Without a
        request it is bound to none (kept for callers not yet passing one; such a
        nonce is still single-use per nc)."""
        issued = f"{max(0, int(now * 1000)):x}"
        salt = secrets.token_hex(6)
        binding = self._binding(request)
        mac = self._mac(issued, self.instance, salt, binding)
        return f"{issued}.{self.instance}.{salt}.{binding}.{mac}"

    def check(self, nonce: str, now: float) -> IssuedNonce | None:
        """`nonce` taken apart if a front sharing our secret issued it, else None (also
        for one that claims to come from the future)."""
        m = _NONCE_RE.fullmatch(nonce)
        if not m:
            return None
        issued, instance, salt, binding, mac = m.groups()
        if not hmac.compare_digest(mac, self._mac(issued, instance, salt, binding)):
            return None
        issued_ms = int(issued, 16)
        age_s = now - issued_ms / 1000
        if age_s < -NONCE_FUTURE_SKEW_S:
            return None
        return IssuedNonce(max(0.0, age_s), issued_ms, instance, binding, mac)

    def age_s(self, nonce: str, now: float) -> float | None:
        """Seconds since `nonce` was issued by a front sharing our secret, or None if
        none did (or it claims to come from the future)."""
        issued = self.check(nonce, now)
        return None if issued is None else issued.age_s

    # -- is an authentic nonce usable?

    def is_ours(self, nonce: IssuedNonce) -> bool:
        """Issued by this instance (another front's, or ours before a restart, is not)."""
        return nonce.instance == self.instance

    def is_bound_to(self, nonce: IssuedNonce, request: SipRequest) -> bool:
        """Issued for this request's Call-ID and To (or bound to no request)."""
        return nonce.binding == _UNBOUND or hmac.compare_digest(
            nonce.binding, self._binding(request))

    def is_stale(self, nonce: IssuedNonce) -> bool:
        """Older than `ttl_s`, or issued before the oldest entry the table dropped."""
        return nonce.age_s > self.ttl_s or nonce.issued_ms <= self._floor_ms

    def last_count(self, nonce: IssuedNonce) -> int | None:
        """The highest nonce count accepted with it so far; None if never used."""
        seen = self._used.get(nonce.mac)
        return None if seen is None else seen[1]

    # -- the replay table

    @property
    def tracked(self) -> int:
        """Entries in the replay table (a gauge for /metrics)."""
        return len(self._used)

    def _expire_used(self, now: float) -> None:
        horizon_ms = (now - self.ttl_s) * 1000
        used = self._used
        while used:
            issued_ms, _ = next(iter(used.values()))
            if issued_ms >= horizon_ms:
                break
            used.popitem(last=False)

    def record_use(self, nonce: IssuedNonce, count: int, now: float) -> None:
        """`nonce` authenticated with nonce count `count`: a later use needs a higher one."""
        self._expire_used(now)
        mac, issued_ms = nonce.mac, nonce.issued_ms
        if mac in self._used:
            self._used[mac] = (issued_ms, count)
            return
        while len(self._used) >= self.table_size:
            _, (evicted_ms, _) = self._used.popitem(last=False)
            self._floor_ms = max(self._floor_ms, evicted_ms)
            self.evictions += 1
        self._used[mac] = (issued_ms, count)

"""HTTP Digest authentication for SIP, server side and a small client helper.

Theory of operation
-------------------
RFC 3261 §22 reuses HTTP Digest (RFC 2617, updated by RFC 7616; SHA-256 for
SIP by RFC 8760). A server without credentials in a request answers 401 (or
407 as a proxy) with one `WWW-Authenticate` (`Proxy-Authenticate`) header per
algorithm it accepts, SHA-256 first (RFC 8760 §2.4: in order of preference);
the client picks the first it supports and repeats the request with an
`Authorization` (`Proxy-Authorization`) header whose `response` proves it knows
the password:

    HA1 = H(username ":" realm ":" password)            (-sess: H(HA1 ":" nonce ":" cnonce))
    HA2 = H(method ":" digest-uri)                      (auth-int: ... ":" H(body))
    response = H(HA1 ":" nonce ":" nc ":" cnonce ":" qop ":" HA2)

`qop` is required (RFC 7616 §3.4: the RFC 2069 form without it has no nc and no
cnonce, so it cannot be protected against replay): credentials without it get
a fresh challenge. `auth-int` is accepted as well as `auth`.

Nonces: bound, single-use per nonce count
-----------------------------------------
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
* to the **front instance** that issued it (`instance`, random per
  `DigestAuthenticator`), so that the replay table below is complete for every
  nonce the instance can accept. Several fronts may share `auth_secret`: a
  second front (or this one after a restart) recognises the others' nonces as
  authentic but never accepts them; if the digest is right it answers with a
  fresh challenge and `stale=true`, so the phone retries at once with the new
  nonce without asking its user (one extra round trip on fail-over), and a
  request captured at one front cannot be replayed at another.

Each nonce is accepted with a nonce count `nc` strictly higher than the last
one accepted with it (RFC 7616 §3.4 "nc", §5.5 replay attacks: "if the same
nc-value is seen twice, then the request is a replay"); a client may reuse a
nonce for later requests in the same dialog or registration with nc + 1. The
table behind this holds only nonces that *authenticated successfully* (a
stranger without a password cannot add to it), each until it expires
(`nonce_ttl_s`), at most `nonce_table_size` of them. When it is full the
oldest entry goes and every nonce issued up to that one becomes stale (a
watermark), so an evicted nonce can never be replayed: its owner just gets
`stale=true` and a new nonce. All this is O(1) per request.

A nonce older than `nonce_ttl_s`, bound elsewhere, from another instance, or
reused with a count already seen, is *unusable*: if the digest computed with
it is right, the result says so (`STALE_NONCE`, `FOREIGN_NONCE`,
`NONCE_BOUND_ELSEWHERE`, `NONCE_REUSED`, all `stale`) and the server
re-challenges with `stale=true` (RFC 7616 §3.3: the username and password were
right); if the digest is wrong the result is `WRONG_RESPONSE`.

No oracle for strangers
-----------------------
An unknown username (or a user without a password) is checked against a
random dummy password with exactly the same work as a known one, and fails
with the same status and headers as a wrong password (`UNKNOWN_USER` is only
for the server's own logs and counters). Comparisons are on bytes, so a
non-ASCII `response` is just wrong, never an exception. Failure counting and
lockout are not here but in `pbx.sip.authguard` and the registrar, which calls
`verify` only for requests it has not locked out.

`verify` checks, in order: credentials present for our realm (a request may
carry credentials for several realms), well-formed parameters, algorithm
accepted, qop present, digest-uri equivalent to the Request-URI (RFC 2617
§3.2.2.5), nonce authentic, response right (against the user's password or
the dummy), user known, nonce usable for this request. Failures come back as
an `AuthResult` with an `AuthFailure` reason and the response it suggests
(400 for malformed credentials or a wrong uri, otherwise a new challenge);
nothing is raised for bad input from the network.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import unquote

from pbx.sip.errors import SipError, excerpt
from pbx.sip.message import SipRequest
from pbx.sip.uri import parse_name_addr, parse_uri

MD5 = "MD5"
SHA256 = "SHA-256"
# RFC 7616 §3.3 algorithms; the -sess variants are accepted in credentials but not offered.
_HASHES: dict[str, Callable[[bytes], Any]] = {
    "MD5": hashlib.md5,
    "MD5-SESS": hashlib.md5,
    "SHA-256": hashlib.sha256,
    "SHA-256-SESS": hashlib.sha256,
}
_CANONICAL_ALGORITHMS = {"MD5": "MD5", "MD5-SESS": "MD5-sess",
                         "SHA-256": "SHA-256", "SHA-256-SESS": "SHA-256-sess"}
DEFAULT_ALGORITHMS: tuple[str, ...] = (SHA256, MD5)

# A nonce "issued" this far in the future is refused as forged (clock steps aside).
NONCE_FUTURE_SKEW_S = 5.0
# Nonces that authenticated, remembered with their last nc (see the module docstring).
DEFAULT_NONCE_TABLE_SIZE = 16384

_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_NC_RE = re.compile(r"[0-9A-Fa-f]{8}")
# issued ms . instance . salt . binding ("x": bound to no request) . mac
_NONCE_RE = re.compile(
    r"([0-9a-f]{1,16})\.([0-9a-f]{8})\.([0-9a-f]{12})\.([0-9a-f]{16}|x)\.([0-9a-f]{32})")
_UNBOUND = "x"
# RFC 8187 ext-value (RFC 7616 §3.4.4 `username*`): charset ' [language] ' value-chars.
_EXT_VALUE_RE = re.compile(
    r"(?i:UTF-8|ISO-8859-1)'[A-Za-z0-9-]*'((?:%[0-9A-Fa-f]{2}|[A-Za-z0-9!#$&+\-.^_`|~])*)")


def _canonical_algorithm(name: str) -> str:
    key = name.upper()
    if key not in _HASHES:
        raise ValueError(f"unsupported digest algorithm {name!r}")
    return _CANONICAL_ALGORITHMS[key]


# --------------------------------------------------------------------------- digest maths


def _utf8(text: str) -> bytes:
    """The bytes of `text`: as received for text decoded off the wire with
    surrogateescape; any other lone surrogate is encoded rather than raising."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _h(algorithm: str, text: str | bytes) -> str:
    data = _utf8(text) if isinstance(text, str) else text
    return _HASHES[algorithm.upper()](data).hexdigest()


def digest_ha1(algorithm: str, username: str, realm: str, password: str,
               nonce: str = "", cnonce: str = "") -> str:
    """HA1 of RFC 7616 §3.4.2 (for `-sess` algorithms nonce and cnonce are folded in)."""
    ha1 = _h(algorithm, f"{username}:{realm}:{password}")
    if algorithm.upper().endswith("-SESS"):
        ha1 = _h(algorithm, f"{ha1}:{nonce}:{cnonce}")
    return ha1


def digest_response(
    *,
    algorithm: str,
    username: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    """The `response` value (RFC 7616 §3.4.1; RFC 2069 form when qop is None)."""
    ha1 = digest_ha1(algorithm, username, realm, password, nonce, cnonce or "")
    return digest_response_from_ha1(algorithm=algorithm, ha1=ha1, method=method, uri=uri,
                                    nonce=nonce, qop=qop, nc=nc, cnonce=cnonce, body=body)


def digest_response_from_ha1(
    *,
    algorithm: str,
    ha1: str,
    method: str,
    uri: str,
    nonce: str,
    qop: str | None = None,
    nc: str | None = None,
    cnonce: str | None = None,
    body: bytes = b"",
) -> str:
    if qop == "auth-int":
        ha2 = _h(algorithm, f"{method}:{uri}:{_h(algorithm, body)}")
    else:
        ha2 = _h(algorithm, f"{method}:{uri}")
    if qop is None:
        return _h(algorithm, f"{ha1}:{nonce}:{ha2}")
    return _h(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


# --------------------------------------------------------------------------- header parsing


def parse_auth_params(value: str) -> tuple[str, dict[str, str]]:
    """Split `Digest a=b, c="d, \\"e\\""` into ("digest", {"a": "b", "c": 'd, "e"'}).

    The scheme and parameter names are lower-cased; quoted strings are unescaped
    (RFC 3261 §25.1 quoted-pair) and may hold commas. Empty list elements are
    skipped (RFC 7230 §7). Raises SipError (400) on malformed text or a
    duplicated parameter.
    """
    text = value.strip()
    m = _TOKEN_RE.match(text)
    if not m:
        raise SipError(f"missing auth scheme in {excerpt(value)}")
    scheme = m.group(0).lower()
    i = m.end()
    n = len(text)
    if i < n and text[i] not in " \t":
        raise SipError(f"bad auth scheme in {excerpt(value)}")
    params: dict[str, str] = {}
    while True:
        while i < n and text[i] in " \t,":
            i += 1
        if i >= n:
            break
        m = _TOKEN_RE.match(text, i)
        if not m:
            raise SipError(f"bad auth parameter at {excerpt(text[i:i + 80])}")
        name = m.group(0).lower()
        i = m.end()
        while i < n and text[i] in " \t":
            i += 1
        if i >= n or text[i] != "=":
            raise SipError(f"auth parameter {excerpt(name)} without a value")
        i += 1
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == '"':
            out: list[str] = []
            i += 1
            while True:
                if i >= n:
                    raise SipError(f"unterminated quoted string in {excerpt(value)}")
                ch = text[i]
                if ch == "\\" and i + 1 < n:
                    out.append(text[i + 1])
                    i += 2
                elif ch == '"':
                    i += 1
                    break
                else:
                    out.append(ch)
                    i += 1
            param = "".join(out)
        else:
            m = _TOKEN_RE.match(text, i)
            if not m:
                raise SipError(f"bad value for auth parameter {excerpt(name)}")
            param = m.group(0)
            i = m.end()
        if name in params:
            raise SipError(f"duplicate auth parameter {excerpt(name)}")
        params[name] = param
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] != ",":
            raise SipError(f"expected ',' after auth parameter {excerpt(name)}")
    return scheme, params


def quote_string(text: str) -> str:
    """A quoted-string with `\\` and `"` escaped (RFC 3261 §25.1)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass(frozen=True)
class DigestChallenge:
    """One parsed `WWW-Authenticate`/`Proxy-Authenticate` Digest challenge."""

    realm: str
    nonce: str
    algorithm: str = MD5
    qop: tuple[str, ...] = ()
    opaque: str | None = None
    stale: bool = False


def parse_challenge(value: str) -> DigestChallenge:
    """Parse a Digest challenge; SipError if it is not one or lacks realm/nonce."""
    scheme, p = parse_auth_params(value)
    if scheme != "digest":
        raise SipError(f"not a Digest challenge: {excerpt(value)}")
    if "realm" not in p or "nonce" not in p:
        raise SipError("Digest challenge without realm or nonce")
    qop = tuple(q.strip().lower() for q in p.get("qop", "").split(",") if q.strip())
    return DigestChallenge(
        realm=p["realm"], nonce=p["nonce"], algorithm=p.get("algorithm", MD5),
        qop=qop, opaque=p.get("opaque"), stale=p.get("stale", "").lower() == "true",
    )


def choose_challenge(values: Sequence[str]) -> DigestChallenge:
    """The first Digest challenge in `values` whose algorithm we support (RFC 8760 §2.4:
    the server lists them in order of preference). SipError if there is none."""
    for value in values:
        try:
            ch = parse_challenge(value)
        except SipError:
            continue
        if ch.algorithm.upper() in _HASHES:
            return ch
    raise SipError("no usable Digest challenge")


# --------------------------------------------------------------------------- server side


class AuthFailure(Enum):
    MISSING_CREDENTIALS = "missing credentials"
    MALFORMED = "malformed credentials"
    REALM_MISMATCH = "realm mismatch"
    UNSUPPORTED_ALGORITHM = "unsupported algorithm"
    QOP_REQUIRED = "qop required (RFC 2069 credentials refused)"
    BAD_URI = "digest uri does not match the Request-URI"
    BAD_NONCE = "nonce not issued by us"
    UNKNOWN_USER = "unknown user"
    WRONG_RESPONSE = "wrong response"
    # The four below: the digest was right but the nonce cannot be used (`stale`).
    STALE_NONCE = "stale nonce"
    FOREIGN_NONCE = "nonce issued by another front instance"
    NONCE_BOUND_ELSEWHERE = "nonce issued for another request (Call-ID/To)"
    NONCE_REUSED = "nonce count not above the last one accepted (replay)"


# Right digest, unusable nonce: re-challenge with stale=true (RFC 7616 §3.3).
STALE_REASONS = frozenset({AuthFailure.STALE_NONCE, AuthFailure.FOREIGN_NONCE,
                           AuthFailure.NONCE_BOUND_ELSEWHERE, AuthFailure.NONCE_REUSED})
# A password was tried and was wrong (or the user does not exist): what lockout counts.
GUESS_REASONS = frozenset({AuthFailure.WRONG_RESPONSE, AuthFailure.UNKNOWN_USER})


@dataclass(frozen=True)
class AuthResult:
    """Outcome of `DigestAuthenticator.verify`.

    `status` is the response the failure suggests: 400 for malformed
    credentials or a digest-uri that does not match (RFC 2617 §3.2.2.5),
    otherwise 401 (407 for a proxy) with a fresh challenge, `stale=true` when
    the digest was right but the nonce unusable (`STALE_REASONS`). Unknown
    users and wrong passwords get the same 401 so that a scanner cannot tell
    which usernames exist; `reason` tells them apart for the server only.
    """

    ok: bool
    username: str | None = None
    reason: AuthFailure | None = None
    detail: str = ""
    proxy: bool = False

    @property
    def stale(self) -> bool:
        return self.reason in STALE_REASONS

    @property
    def is_guess(self) -> bool:
        """A password was checked and was wrong: counts as a failed attempt."""
        return self.reason in GUESS_REASONS

    @property
    def status(self) -> int:
        if self.ok:
            return 200
        if self.reason in (AuthFailure.MALFORMED, AuthFailure.BAD_URI):
            return 400
        return 407 if self.proxy else 401


def _uris_match(digest_uri: str, request_uri: str) -> bool:
    """RFC 2617 §3.2.2.5: digest-uri and Request-URI name the same resource.

    Equal text, or equal scheme, user, host (case-insensitive) and port; URI
    parameters are not compared (clients differ in how they echo them).
    """
    if digest_uri == request_uri:
        return True
    try:
        a, b = parse_uri(digest_uri), parse_uri(request_uri)
    except SipError:
        return False
    if not (a.is_sip and b.is_sip):
        return a.scheme == b.scheme and a.host == b.host
    return (a.scheme == b.scheme and unquote(a.user or "") == unquote(b.user or "")
            and a.host.lower() == b.host.lower() and a.port == b.port)


def _binding_text(request: SipRequest) -> str:
    """What a nonce is bound to: the Call-ID and the To URI (scheme, user, host, port;
    no parameters or tags), as the request carries them."""
    to = request.headers.get("To") or ""
    try:
        uri = parse_name_addr(to).uri
        to_key = f"{uri.scheme}:{unquote(uri.user or '')}@{uri.host.lower()}:{uri.port}"
    except SipError:
        to_key = to.strip()
    return f"{request.call_id}\x00{to_key}"


class DigestAuthenticator:
    """Server side of Digest: builds challenges and checks credentials.

    `secret` keys the nonce MAC; fronts that share it recognise each other's
    nonces (and answer them with `stale=true`, see the module docstring).
    `algorithms` are the ones offered, in order of preference, and the only ones
    accepted in credentials (so that a SHA-256-only server cannot be downgraded
    to MD5); their `-sess` variants are accepted too. `nonce_table_size` bounds
    the replay table.
    """

    def __init__(self, realm: str, secret: bytes, nonce_ttl_s: float = 300,
                 algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
                 nonce_table_size: int = DEFAULT_NONCE_TABLE_SIZE) -> None:
        if not secret:
            raise ValueError("the nonce secret must not be empty")
        if nonce_table_size < 1:
            raise ValueError("nonce_table_size must be at least 1")
        self.realm = realm
        self.secret = secret
        self.nonce_ttl_s = nonce_ttl_s
        self.algorithms = tuple(_canonical_algorithm(a) for a in algorithms)
        if not self.algorithms:
            raise ValueError("at least one digest algorithm is needed")
        accepted = {a.upper() for a in self.algorithms}
        self._accepted = accepted | {a + "-SESS" for a in accepted if not a.endswith("-SESS")}
        self.instance = secrets.token_hex(4)
        # Checked for unknown users so that they cost what a known user costs.
        self._dummy_password = secrets.token_hex(16)
        self.nonce_table_size = nonce_table_size
        # mac of a nonce that authenticated -> (issued ms, last nc accepted); insertion
        # order is first-use order, so the oldest entries are at the front.
        self._used: OrderedDict[str, tuple[int, int]] = OrderedDict()
        # Nonces issued at or before this (ms) are stale: entries evicted from _used.
        self._floor_ms = -1
        self.evictions = 0

    # -- nonces

    def _mac(self, issued: str, instance: str, salt: str, binding: str) -> str:
        msg = _utf8(f"{self.realm}:{issued}:{instance}:{salt}:{binding}")
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()[:32]

    def _binding(self, request: SipRequest | None) -> str:
        if request is None:
            return _UNBOUND
        msg = b"binding\x00" + _utf8(_binding_text(request))
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()[:16]

    def make_nonce(self, now: float, request: SipRequest | None = None) -> str:
        """A fresh nonce, bound to `request` (the one being challenged). Without a
        request it is bound to none (kept for callers not yet passing one; such a
        nonce is still single-use per nc)."""
        issued = f"{max(0, int(now * 1000)):x}"
        salt = secrets.token_hex(6)
        binding = self._binding(request)
        mac = self._mac(issued, self.instance, salt, binding)
        return f"{issued}.{self.instance}.{salt}.{binding}.{mac}"

    def nonce_age_s(self, nonce: str, now: float) -> float | None:
        """Seconds since `nonce` was issued by a front sharing our secret, or None if
        none did (or it claims to come from the future)."""
        parsed = self._parse_nonce(nonce, now)
        return None if parsed is None else parsed[0]

    def _parse_nonce(self, nonce: str, now: float) -> tuple[float, int, str, str, str] | None:
        """(age s, issued ms, instance, binding, mac) of an authentic nonce, else None."""
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
        return max(0.0, age_s), issued_ms, instance, binding, mac

    @property
    def nonces_tracked(self) -> int:
        """Entries in the replay table (a gauge for /metrics)."""
        return len(self._used)

    def _expire_used(self, now: float) -> None:
        horizon_ms = (now - self.nonce_ttl_s) * 1000
        used = self._used
        while used:
            issued_ms, _ = next(iter(used.values()))
            if issued_ms >= horizon_ms:
                break
            used.popitem(last=False)

    def _record_use(self, mac: str, issued_ms: int, nc: int, now: float) -> None:
        self._expire_used(now)
        if mac in self._used:
            self._used[mac] = (issued_ms, nc)
            return
        while len(self._used) >= self.nonce_table_size:
            _, (evicted_ms, _) = self._used.popitem(last=False)
            self._floor_ms = max(self._floor_ms, evicted_ms)
            self.evictions += 1
        self._used[mac] = (issued_ms, nc)

    # -- challenges

    def challenge(
        self,
        now: float,
        stale: bool = False,
        algorithms: Sequence[str] | None = None,
        *,
        proxy: bool = False,
        request: SipRequest | None = None,
    ) -> list[tuple[str, str]]:
        """Challenge headers for a 401 (`proxy=False`) or 407 to `request`: one per
        algorithm, in the given order (default: the configured ones, SHA-256 first),
        each with its own nonce bound to the request, `qop="auth"`, and `stale=true`
        when asked."""
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        out: list[tuple[str, str]] = []
        for algorithm in algorithms if algorithms is not None else self.algorithms:
            value = (f"Digest realm={quote_string(self.realm)}, "
                     f"nonce={quote_string(self.make_nonce(now, request))}, "
                     f"algorithm={_canonical_algorithm(algorithm)}, qop=\"auth\"")
            if stale:
                value += ", stale=true"
            out.append((name, value))
        return out

    # -- verification

    def _credentials(self, request: SipRequest, proxy: bool
                     ) -> dict[str, str] | tuple[AuthFailure, str]:
        """The Digest parameters for our realm, or why there are none usable."""
        header = "Proxy-Authorization" if proxy else "Authorization"
        values = request.headers.get_all(header)
        if not values:
            return AuthFailure.MISSING_CREDENTIALS, ""
        for value in values:
            try:
                scheme, p = parse_auth_params(value)
            except SipError as exc:
                return AuthFailure.MALFORMED, exc.message
            if scheme == "digest" and p.get("realm") == self.realm:
                return p
        return AuthFailure.REALM_MISMATCH, f"no credentials for realm {self.realm[:40]!r}"

    @staticmethod
    def _username(params: dict[str, str]) -> str | None:
        """`username`, or `username*` decoded (RFC 7616 §3.4.4); None if absent or bad."""
        if "username*" in params:
            if "username" in params:
                return None  # one or the other, never both
            return _decode_ext_value(params["username*"])
        return params.get("username") or None

    def has_credentials(self, request: SipRequest, *, proxy: bool = False) -> bool:
        """Whether the request carries credentials meant for us (our realm, even if
        malformed); credentials for other realms belong to other proxies (RFC 3261 §22.3)."""
        params = self._credentials(request, proxy)
        return isinstance(params, dict) or params[0] is AuthFailure.MALFORMED

    def claimed_username(self, request: SipRequest, *, proxy: bool = False) -> str | None:
        """The username the request's credentials for our realm name, unverified (what
        lockout is keyed by); None without well-formed credentials."""
        params = self._credentials(request, proxy)
        return self._username(params) if isinstance(params, dict) else None

    def verify(
        self,
        request: SipRequest,
        password_lookup: Callable[[str], str | None],
        now: float,
        *,
        proxy: bool = False,
    ) -> AuthResult:
        """Check the request's credentials for our realm; see the module docstring.
        On success the nonce count is recorded: the same credentials never pass twice."""

        def fail(reason: AuthFailure, detail: str = "", username: str | None = None
                 ) -> AuthResult:
            return AuthResult(False, username, reason, detail or reason.value, proxy)

        params = self._credentials(request, proxy)
        if not isinstance(params, dict):
            return fail(*params)
        username = self._username(params)
        if params.get("userhash", "false").lower() == "true":
            return fail(AuthFailure.MALFORMED, "userhash is not supported")
        nonce, uri, response = params.get("nonce"), params.get("uri"), params.get("response")
        if not username or nonce is None or uri is None or response is None:
            return fail(AuthFailure.MALFORMED,
                        "credentials need username (or a valid username*), nonce, uri "
                        "and response", username)
        algorithm = params.get("algorithm", MD5)
        if algorithm.upper() not in self._accepted:
            return fail(AuthFailure.UNSUPPORTED_ALGORITHM,
                        f"algorithm {algorithm[:20]!r} not accepted", username)
        qop = params.get("qop")
        nc = params.get("nc")
        cnonce = params.get("cnonce")
        if qop is None:
            return fail(AuthFailure.QOP_REQUIRED, username=username)
        qop = qop.lower()
        if qop not in ("auth", "auth-int"):
            return fail(AuthFailure.MALFORMED, f"unsupported qop {qop[:20]!r}", username)
        if nc is None or cnonce is None or not _NC_RE.fullmatch(nc) or int(nc, 16) == 0:
            return fail(AuthFailure.MALFORMED, "qop needs nc (8 hex digits, from 00000001) "
                        "and cnonce", username)
        if not _uris_match(uri, request.uri):
            return fail(AuthFailure.BAD_URI, f"digest uri {excerpt(uri)} is not the "
                        f"Request-URI {excerpt(request.uri)}", username)
        parsed = self._parse_nonce(nonce, now)
        if parsed is None:
            return fail(AuthFailure.BAD_NONCE, username=username)
        age_s, issued_ms, instance, binding, mac = parsed
        # Same work whether or not the user exists (no timing or status difference).
        password = password_lookup(username)
        expected = digest_response(
            algorithm=algorithm, username=username, realm=self.realm,
            password=self._dummy_password if password is None else password,
            method=request.method, uri=uri, nonce=nonce, qop=qop, nc=nc, cnonce=cnonce,
            body=request.body,
        )
        right = hmac.compare_digest(expected.encode("ascii"), _utf8(response.lower()))
        if password is None:
            return fail(AuthFailure.UNKNOWN_USER, username=username)
        if not right:
            return fail(AuthFailure.WRONG_RESPONSE, username=username)
        # The password is right; is the nonce usable for this request?
        if instance != self.instance:
            return fail(AuthFailure.FOREIGN_NONCE, username=username)
        if binding != _UNBOUND and not hmac.compare_digest(binding, self._binding(request)):
            return fail(AuthFailure.NONCE_BOUND_ELSEWHERE, username=username)
        if age_s > self.nonce_ttl_s or issued_ms <= self._floor_ms:
            return fail(AuthFailure.STALE_NONCE, username=username)
        count = int(nc, 16)
        seen = self._used.get(mac)
        if seen is not None and count <= seen[1]:
            return fail(AuthFailure.NONCE_REUSED, f"nc {nc} not above {seen[1]:08x}", username)
        self._record_use(mac, issued_ms, count, now)
        return AuthResult(True, username, proxy=proxy)


def _decode_ext_value(value: str) -> str | None:
    """RFC 8187 ext-value `UTF-8''%e2%82%ac` (RFC 7616 §3.4.4 `username*`), or None if it
    is not one (unknown charset, bad percent-encoding, bytes that are not the charset)."""
    m = _EXT_VALUE_RE.fullmatch(value)
    if not m:
        return None
    charset = value.partition("'")[0].lower()
    try:
        return unquote(m.group(1), encoding=charset, errors="strict") or None
    except UnicodeError:
        return None


# --------------------------------------------------------------------------- client side


def client_authorization(
    *,
    challenge: str | Sequence[str] | DigestChallenge,
    username: str,
    password: str,
    method: str,
    uri: str,
    cnonce: str | None = None,
    nc: int = 1,
    body: bytes = b"",
) -> str:
    """An `Authorization`/`Proxy-Authorization` value answering `challenge`.

    `challenge` is one challenge header value, several (the first usable one is
    taken, RFC 8760 §2.4), or a parsed `DigestChallenge`. qop=auth is used when
    offered, else the RFC 2069 form. SipError if no challenge can be answered.
    """
    if isinstance(challenge, DigestChallenge):
        ch = challenge
    elif isinstance(challenge, str):
        ch = choose_challenge([challenge])
    else:
        ch = choose_challenge(challenge)
    algorithm = _canonical_algorithm(ch.algorithm)
    qop = "auth" if "auth" in ch.qop else None
    nc_text = f"{nc:08x}"
    if qop is not None and cnonce is None:
        cnonce = secrets.token_hex(8)
    response = digest_response(
        algorithm=algorithm, username=username, realm=ch.realm, password=password,
        method=method, uri=uri, nonce=ch.nonce, qop=qop,
        nc=nc_text if qop else None, cnonce=cnonce if qop else None, body=body,
    )
    parts = [
        f"username={quote_string(username)}",
        f"realm={quote_string(ch.realm)}",
        f"nonce={quote_string(ch.nonce)}",
        f"uri={quote_string(uri)}",
        f"response={quote_string(response)}",
        f"algorithm={algorithm}",
    ]
    if qop is not None:
        parts += [f"qop={qop}", f"nc={nc_text}", f"cnonce={quote_string(cnonce or '')}"]
    if ch.opaque is not None:
        parts.append(f"opaque={quote_string(ch.opaque)}")
    return "Digest " + ", ".join(parts)

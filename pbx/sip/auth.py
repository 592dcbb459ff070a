"""HTTP Digest authentication for SIP, server side: challenges and verification.

Theory of operation
-------------------
RFC 3261 §22 reuses HTTP Digest (the maths, header syntax and client side:
`pbx.sip.digest`). `DigestAuthenticator.challenge` builds the 401/407 headers,
one per algorithm offered, SHA-256 first (RFC 8760 §2.4), each with a fresh
nonce bound to the request challenged (`pbx.sip.nonces`: bound to the
request's Call-ID and To and to this front instance, usable once per nonce
count). `verify` checks the credentials a request brings back.

`qop` is required (RFC 7616 §3.4: the RFC 2069 form without it has no nc and no
cnonce, so it cannot be protected against replay): credentials without it get
a fresh challenge. `auth-int` is accepted as well as `auth`.

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

import hmac
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from urllib.parse import unquote

from pbx.sip.digest import (
    DEFAULT_ALGORITHMS,
    MD5,
    canonical_algorithm,
    digest_response,
    parse_auth_params,
    utf8,
)
from pbx.sip.errors import SipError, excerpt
from pbx.sip.grammar import quote_string
from pbx.sip.message import SipRequest
from pbx.sip.nonces import DEFAULT_NONCE_TABLE_SIZE, Nonces
from pbx.sip.uri import parse_uri

_NC_RE = re.compile(r"[0-9A-Fa-f]{8}")
# RFC 8187 ext-value (RFC 7616 §3.4.4 `username*`): charset ' [language] ' value-chars.
_EXT_VALUE_RE = re.compile(
    r"(?i:UTF-8|ISO-8859-1)'[A-Za-z0-9-]*'((?:%[0-9A-Fa-f]{2}|[A-Za-z0-9!#$&+\-.^_`|~])*)")


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
        self.nonces = Nonces(realm, secret, nonce_ttl_s, nonce_table_size)
        self.realm = realm
        self.algorithms = tuple(canonical_algorithm(a) for a in algorithms)
        if not self.algorithms:
            raise ValueError("at least one digest algorithm is needed")
        self._accepted = accepted_names(self.algorithms)
        # Checked for unknown users so that they cost what a known user costs.
        self._dummy_password = secrets.token_hex(16)

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
                     f"nonce={quote_string(self.nonces.make(now, request))}, "
                     f"algorithm={canonical_algorithm(algorithm)}, qop=\"auth\"")
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
        algorithms_of: Callable[[str], Sequence[str]] | None = None,
    ) -> AuthResult:
        """Check the request's credentials for our realm; see the module docstring.
        On success the nonce count is recorded: the same credentials never pass twice.
        `algorithms_of(username)` narrows the accepted algorithms per user (the ones
        that user is challenged with: no downgrade to one it is never offered)."""

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
        accepted = (self._accepted if algorithms_of is None
                    else accepted_names(algorithms_of(username)))
        if algorithm.upper() not in accepted:
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
        nonces = self.nonces
        issued = nonces.check(nonce, now)
        if issued is None:
            return fail(AuthFailure.BAD_NONCE, username=username)
        # Same work whether or not the user exists (no timing or status difference).
        password = password_lookup(username)
        expected = digest_response(
            algorithm=algorithm, username=username, realm=self.realm,
            password=self._dummy_password if password is None else password,
            method=request.method, uri=uri, nonce=nonce, qop=qop, nc=nc, cnonce=cnonce,
            body=request.body,
        )
        right = hmac.compare_digest(expected.encode("ascii"), utf8(response.lower()))
        if password is None:
            return fail(AuthFailure.UNKNOWN_USER, username=username)
        if not right:
            return fail(AuthFailure.WRONG_RESPONSE, username=username)
        # The password is right; is the nonce usable for this request?
        if not nonces.is_ours(issued):
            return fail(AuthFailure.FOREIGN_NONCE, username=username)
        if not nonces.is_bound_to(issued, request):
            return fail(AuthFailure.NONCE_BOUND_ELSEWHERE, username=username)
        if nonces.is_stale(issued):
            return fail(AuthFailure.STALE_NONCE, username=username)
        count = int(nc, 16)
        last = nonces.last_count(issued)
        if last is not None and count <= last:
            return fail(AuthFailure.NONCE_REUSED, f"nc {nc} not above {last:08x}", username)
        nonces.record_use(issued, count, now)
        return AuthResult(True, username, proxy=proxy)


def accepted_names(algorithms: Sequence[str]) -> frozenset[str]:
    """The algorithm names (upper case) credentials may use when `algorithms` are the
    ones offered: those and their `-sess` variants."""
    names = {canonical_algorithm(a).upper() for a in algorithms}
    return frozenset(names | {a + "-SESS" for a in names if not a.endswith("-SESS")})


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


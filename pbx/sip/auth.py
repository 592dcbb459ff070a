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
    response = H(HA1 ":" nonce ":" nc ":" cnonce ":" qop ":" HA2)    with qop
    response = H(HA1 ":" nonce ":" HA2)                              RFC 2069, no qop

Nonces are stateless and self-validating: `<issued ms, hex>.<salt>.<mac>` where
mac = HMAC-SHA-256(secret, realm:issued:salt). Any process holding the secret
can check a nonce, so a restarted front or a second instance accepts the
nonces of the first. For that to hold across processes, `now` given to
`challenge` and `verify` must be the same clock everywhere: wall-clock time
(`time.time()`), not a per-process monotonic clock. A nonce older than
`nonce_ttl_s` is *stale*: if the digest computed with it is right, the result
is `STALE_NONCE` and the server re-challenges with `stale=true`, so the client
retries with the new nonce without asking its user (RFC 2617 §3.2.1); if the
digest is wrong too, the result is `WRONG_RESPONSE`.

Replay: the server keeps no per-nonce state, so nonce-count (`nc`) values are
not checked for monotonicity; a captured request can be replayed while its
nonce is fresh (at most `nonce_ttl_s`). The registrar limits the damage: a
replayed REGISTER carries a Call-ID/CSeq it has already seen and is refused
(RFC 3261 §10.3 step 7). Nonces are not bound to the client address (NAT
rebinding would break them).

`verify` checks, in order: credentials present for our realm (a request may
carry credentials for several realms), well-formed parameters, algorithm
accepted, digest-uri equivalent to the Request-URI (RFC 2617 §3.2.2.5),
nonce authentic, user known, response right, nonce fresh. Failures come back
as an `AuthResult` with an `AuthFailure` reason and the response it suggests
(400 for malformed credentials or a wrong uri, otherwise a new challenge);
nothing is raised for bad input from the network.

No socket, no clock: time comes in as `now` (seconds).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any
from urllib.parse import unquote

from pbx.sip.errors import SipError, excerpt
from pbx.sip.message import SipRequest, parse_uri

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

# Clock skew tolerated between the front instances that share a secret.
NONCE_FUTURE_SKEW_S = 5.0

_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")
_NC_RE = re.compile(r"[0-9A-Fa-f]{8}")
_NONCE_RE = re.compile(r"([0-9a-f]{1,16})\.([0-9a-f]{16})\.([0-9a-f]{32})")


def _canonical_algorithm(name: str) -> str:
    key = name.upper()
    if key not in _HASHES:
        raise ValueError(f"unsupported digest algorithm {name!r}")
    return _CANONICAL_ALGORITHMS[key]


# --------------------------------------------------------------------------- digest maths


def _h(algorithm: str, text: str | bytes) -> str:
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
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
        raise SipError(f"not a Digest challenge: {value[:80]!r}")
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
    BAD_URI = "digest uri does not match the Request-URI"
    BAD_NONCE = "nonce not issued by us"
    UNKNOWN_USER = "unknown user"
    WRONG_RESPONSE = "wrong response"
    STALE_NONCE = "stale nonce"


@dataclass(frozen=True)
class AuthResult:
    """Outcome of `DigestAuthenticator.verify`.

    `status` is the response the failure suggests: 400 for malformed
    credentials or a digest-uri that does not match (RFC 2617 §3.2.2.5),
    otherwise 401 (407 for a proxy) with a fresh challenge, `stale=true` when
    `reason` is STALE_NONCE. Unknown users and wrong passwords get the same
    401 so that a scanner cannot tell which usernames exist.
    """

    ok: bool
    username: str | None = None
    reason: AuthFailure | None = None
    detail: str = ""
    proxy: bool = False

    @property
    def stale(self) -> bool:
        return self.reason is AuthFailure.STALE_NONCE

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

    `secret` keys the nonce MAC; every front instance that must accept the
    others' nonces shares it. `algorithms` are the ones offered, in order of
    preference, and the only ones accepted in credentials (so that a
    SHA-256-only server cannot be downgraded to MD5); their `-sess` variants
    are accepted too.
    """

    def __init__(self, realm: str, secret: bytes, nonce_ttl_s: float = 300,
                 algorithms: Sequence[str] = DEFAULT_ALGORITHMS) -> None:
        if not secret:
            raise ValueError("the nonce secret must not be empty")
        self.realm = realm
        self.secret = secret
        self.nonce_ttl_s = nonce_ttl_s
        self.algorithms = tuple(_canonical_algorithm(a) for a in algorithms)
        if not self.algorithms:
            raise ValueError("at least one digest algorithm is needed")
        accepted = {a.upper() for a in self.algorithms}
        self._accepted = accepted | {a + "-SESS" for a in accepted if not a.endswith("-SESS")}

    # -- nonces

    def _mac(self, issued: str, salt: str) -> str:
        msg = f"{self.realm}:{issued}:{salt}".encode("utf-8", "surrogateescape")
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()[:32]

    def make_nonce(self, now: float) -> str:
        issued = f"{max(0, int(now * 1000)):x}"
        salt = secrets.token_hex(8)
        return f"{issued}.{salt}.{self._mac(issued, salt)}"

    def nonce_age_s(self, nonce: str, now: float) -> float | None:
        """Seconds since `nonce` was issued, or None if we did not issue it."""
        m = _NONCE_RE.fullmatch(nonce)
        if not m:
            return None
        issued, salt, mac = m.groups()
        if not hmac.compare_digest(mac, self._mac(issued, salt)):
            return None
        age_s = now - int(issued, 16) / 1000
        if age_s < -NONCE_FUTURE_SKEW_S:
            return None
        return max(0.0, age_s)

    # -- challenges

    def challenge(
        self,
        now: float,
        stale: bool = False,
        algorithms: Sequence[str] | None = None,
        *,
        proxy: bool = False,
    ) -> list[tuple[str, str]]:
        """Challenge headers for a 401 (`proxy=False`) or 407: one per algorithm,
        in the given order (default: the configured ones, SHA-256 first), each with
        its own nonce, `qop="auth"`, and `stale=true` when asked."""
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        out: list[tuple[str, str]] = []
        for algorithm in algorithms if algorithms is not None else self.algorithms:
            value = (f"Digest realm={quote_string(self.realm)}, "
                     f"nonce={quote_string(self.make_nonce(now))}, "
                     f"algorithm={_canonical_algorithm(algorithm)}, qop=\"auth\"")
            if stale:
                value += ", stale=true"
            out.append((name, value))
        return out

    # -- verification

    def verify(
        self,
        request: SipRequest,
        password_lookup: Callable[[str], str | None],
        now: float,
        *,
        proxy: bool = False,
    ) -> AuthResult:
        """Check the request's credentials for our realm; see the module docstring."""
        header = "Proxy-Authorization" if proxy else "Authorization"

        def fail(reason: AuthFailure, detail: str = "", username: str | None = None
                 ) -> AuthResult:
            return AuthResult(False, username, reason, detail or reason.value, proxy)

        values = request.headers.get_all(header)
        if not values:
            return fail(AuthFailure.MISSING_CREDENTIALS)
        params: dict[str, str] | None = None
        for value in values:
            try:
                scheme, p = parse_auth_params(value)
            except SipError as exc:
                return fail(AuthFailure.MALFORMED, exc.message)
            if scheme == "digest" and p.get("realm") == self.realm:
                params = p
                break
        if params is None:
            return fail(AuthFailure.REALM_MISMATCH, f"no credentials for realm {self.realm!r}")

        username = params.get("username")
        if username is None and "username*" in params:
            username = _decode_ext_value(params["username*"])
        if params.get("userhash", "false").lower() == "true":
            return fail(AuthFailure.MALFORMED, "userhash is not supported")
        nonce, uri, response = params.get("nonce"), params.get("uri"), params.get("response")
        if not username or nonce is None or uri is None or response is None:
            return fail(AuthFailure.MALFORMED,
                        "credentials need username, nonce, uri and response", username)
        algorithm = params.get("algorithm", MD5)
        if algorithm.upper() not in self._accepted:
            return fail(AuthFailure.UNSUPPORTED_ALGORITHM,
                        f"algorithm {algorithm!r} not accepted", username)
        qop = params.get("qop")
        nc = params.get("nc")
        cnonce = params.get("cnonce")
        if qop is not None:
            qop = qop.lower()
            if qop not in ("auth", "auth-int"):
                return fail(AuthFailure.MALFORMED, f"unsupported qop {qop!r}", username)
            if nc is None or cnonce is None or not _NC_RE.fullmatch(nc):
                return fail(AuthFailure.MALFORMED, "qop needs nc (8 hex digits) and cnonce",
                            username)
        elif algorithm.upper().endswith("-SESS"):
            return fail(AuthFailure.MALFORMED, f"{algorithm} needs qop and cnonce", username)
        if not _uris_match(uri, request.uri):
            return fail(AuthFailure.BAD_URI,
                        f"digest uri {uri!r} is not the Request-URI {request.uri!r}", username)
        age_s = self.nonce_age_s(nonce, now)
        if age_s is None:
            return fail(AuthFailure.BAD_NONCE, username=username)
        password = password_lookup(username)
        if password is None:
            return fail(AuthFailure.UNKNOWN_USER, username=username)
        expected = digest_response(
            algorithm=algorithm, username=username, realm=self.realm, password=password,
            method=request.method, uri=uri, nonce=nonce, qop=qop, nc=nc, cnonce=cnonce,
            body=request.body,
        )
        if not hmac.compare_digest(expected, response.lower()):
            return fail(AuthFailure.WRONG_RESPONSE, username=username)
        if age_s > self.nonce_ttl_s:
            return fail(AuthFailure.STALE_NONCE, username=username)
        return AuthResult(True, username, proxy=proxy)


def _decode_ext_value(value: str) -> str:
    """RFC 5987 ext-value `UTF-8''%e2%82%ac` (RFC 7616 §3.4.4 `username*`)."""
    charset, _, rest = value.partition("'")
    _, _, encoded = rest.partition("'")
    try:
        return unquote(encoded, encoding=charset or "utf-8", errors="strict")
    except (LookupError, UnicodeDecodeError):
        return ""


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

"""HTTP Digest for SIP: the maths and the header syntax both sides share, and the
client's answer to a challenge.

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

Here: that computation (`digest_response`), the parser of both headers' parameter
lists (`parse_auth_params`, SipError 400 on anything malformed), challenges
(`parse_challenge`, `choose_challenge`) and `client_authorization`, which tests
and outbound registrations use. The server side (challenge, verify) is
`pbx.sip.auth`; its nonces are `pbx.sip.nonces`.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pbx.sip.errors import SipError, excerpt
from pbx.sip.grammar import TOKEN_RE, quote_string

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


def canonical_algorithm(name: str) -> str:
    """The spelling RFC 7616 gives `name` (`MD5-sess`); ValueError if not supported."""
    key = name.upper()
    if key not in _HASHES:
        raise ValueError(f"unsupported digest algorithm {name!r}")
    return _CANONICAL_ALGORITHMS[key]


# --------------------------------------------------------------------------- digest maths


def utf8(text: str) -> bytes:
    """The bytes of `text`: as received for text decoded off the wire with
    surrogateescape; any other lone surrogate is encoded rather than raising."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _h(algorithm: str, text: str | bytes) -> str:
    data = utf8(text) if isinstance(text, str) else text
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
    m = TOKEN_RE.match(text)
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
        m = TOKEN_RE.match(text, i)
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
            m = TOKEN_RE.match(text, i)
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
    algorithm = canonical_algorithm(ch.algorithm)
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

"""SIP URIs and name-addrs (RFC 3261 §19.1, §20.10, §25.1), sans-IO.

`parse_uri` reads a sip/sips URI whole (user, password, host, port,
parameters, headers) and keeps other schemes (tel:, http:, ...) opaque;
`parse_name_addr` reads the `"Display" <uri>;params` of From, To, Contact,
Route, Refer-To... Both return frozen dataclasses whose `str()` serialises
them again, and raise `SipError` (400) on anything malformed. Escapes (`%HH`)
are kept as written; parameter names are lower-cased (they are
case-insensitive, RFC 3261 §19.1.4), parameter values are kept as written.

The parser is liberal where RFC 4475 allows it (LWS inside `<...>`, unquoted
display names made of several words, `;`, `?` and `:` in the user part).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pbx.sip.errors import SipError, excerpt
from pbx.sip.grammar import (
    DIGITS_RE,
    format_params,
    memoized,
    parse_params,
    parse_quoted,
    quote_string,
)

_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_HOST_RE = re.compile(r"[A-Za-z0-9_\-.]+")
_IPV6_RE = re.compile(r"\[[0-9A-Fa-f:.]+\]")
# Characters never allowed unescaped inside a URI (RFC 3986 / RFC 3261 §25.1).
_URI_FORBIDDEN_RE = re.compile(r'[\x00-\x20<>"{}|\\^\x7f]')


@dataclass(frozen=True)
class SipUri:
    """A SIP/SIPS URI (RFC 3261 §19.1).

    Other schemes (tel:, http:, ...) are kept opaque: everything after the
    colon is in `host` and the other fields are empty. An IPv6 host keeps its
    brackets (`[::1]`); escapes are kept as written.
    """

    scheme: str
    user: str | None
    password: str | None
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def is_sip(self) -> bool:
        return self.scheme in ("sip", "sips")

    @property
    def host_port(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        if not self.is_sip:
            return f"{self.scheme}:{self.host}"
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out.append(":" + self.password)
            out.append("@")
        out.append(self.host_port)
        out.append(format_params(self.params))
        if self.headers:
            out.append("?" + "&".join(f"{k}={v}" for k, v in self.headers.items()))
        return "".join(out)


def parse_hostport(text: str, what: str) -> tuple[str, int | None]:
    """`host[:port]` of a URI or a Via sent-by (`what` names it in errors); an IPv6
    reference keeps its brackets."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipError(f"bad IPv6 reference in {what} {excerpt(text)}")
        host, rest = text[: end + 1], text[end + 1 :]
        if not _IPV6_RE.fullmatch(host):
            raise SipError(f"bad IPv6 reference in {what} {excerpt(text)}")
    else:
        host, sep, port_text = text.partition(":")
        rest = sep + port_text
        if not _HOST_RE.fullmatch(host):
            raise SipError(f"bad host in {what} {excerpt(text)}")
    if not rest:
        return host, None
    if not rest.startswith(":") or not DIGITS_RE.fullmatch(rest[1:]):
        raise SipError(f"bad port in {what} {excerpt(text)}")
    port = int(rest[1:])
    if port > 65535:
        raise SipError(f"port out of range in {what} {excerpt(text)}")
    return host, port


@memoized
def parse_uri(text: str) -> SipUri:
    """Parse a URI; sip/sips are parsed fully, other schemes kept opaque."""
    if not isinstance(text, str) or not text:
        raise SipError("empty URI")
    if _URI_FORBIDDEN_RE.search(text):
        raise SipError(f"bad character in URI {excerpt(text)}")
    scheme, colon, rest = text.partition(":")
    if not colon or not _SCHEME_RE.fullmatch(scheme) or not rest:
        raise SipError(f"bad URI {excerpt(text)}")
    scheme = scheme.lower()
    if scheme not in ("sip", "sips"):
        return SipUri(scheme, None, None, rest)
    # userinfo ends at the last '@' (the user part may hold ';', '?' and ':',
    # RFC 4475 §3.1.1.2); prefer an '@' before the headers part when there is one.
    q = rest.find("?")
    at = rest.rfind("@", 0, q) if q >= 0 else -1
    if at < 0:
        at = rest.rfind("@")
    user: str | None = None
    password: str | None = None
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user, colon, pw = userinfo.partition(":")
        password = pw if colon else None
        if not user:
            raise SipError(f"empty user part in URI {excerpt(text)}")
    hdr_text = ""
    q = rest.find("?")
    if q >= 0:
        rest, hdr_text = rest[:q], rest[q + 1 :]
    hostport, _, param_text = rest.partition(";")
    host, port = parse_hostport(hostport, "URI")
    params: dict[str, str | None] = {}
    if param_text or rest.endswith(";"):
        for part in param_text.split(";"):
            name, eq, value = part.partition("=")
            if not name or "@" in part:
                raise SipError(f"bad URI parameter {excerpt(part)} in {excerpt(text)}")
            params[name.lower()] = value if eq else None
    headers: dict[str, str] = {}
    if q >= 0:
        for part in hdr_text.split("&"):
            name, eq, value = part.partition("=")
            if not name or not eq:
                raise SipError(f"bad URI header {excerpt(part)} in {excerpt(text)}")
            headers[name] = value
    return SipUri(scheme, user, password, host, port, params, headers)


# --------------------------------------------------------------------------- name-addr


@dataclass(frozen=True)
class NameAddr:
    """`"Display" <uri>;params` (From, To, Contact, Route, Refer-To ...)."""

    display: str | None
    uri: SipUri
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def with_params(self, **params: str | None) -> NameAddr:
        merged = dict(self.params)
        merged.update(params)
        return NameAddr(self.display, self.uri, merged)

    def __str__(self) -> str:
        display = f"{quote_string(self.display)} " if self.display is not None else ""
        return f"{display}<{self.uri}>{format_params(self.params)}"


@memoized
def parse_name_addr(value: str) -> NameAddr:
    """Parse a name-addr or bare addr-spec with header parameters.

    After a bare URI (no `<>`), parameters belong to the header (RFC 3261 §20).
    Liberal as RFC 4475 allows: LWS inside `<...>` and unquoted display names
    made of several words are accepted.
    """
    if not isinstance(value, str):
        raise SipError("name-addr must be text")
    text = value.strip()
    if not text:
        raise SipError("empty name-addr")
    display: str | None = None
    if text.startswith('"'):
        display, end = parse_quoted(text, 0)
        text = text[end:].lstrip()
        if not text.startswith("<"):
            raise SipError(f"expected '<' after display name in {excerpt(value)}")
    lt = text.find("<")
    if lt >= 0:
        if lt > 0:
            words = text[:lt].strip()
            if '"' in words or ">" in words:
                raise SipError(f"bad display name in {excerpt(value)}")
            display = words or None
        gt = text.find(">", lt)
        if gt < 0:
            raise SipError(f"missing '>' in {excerpt(value)}")
        uri = parse_uri(text[lt + 1 : gt].strip())
        params = parse_params(text[gt + 1 :])
    else:
        uri_text, semi, param_text = text.partition(";")
        uri = parse_uri(uri_text.strip())
        params = parse_params(semi + param_text)
    return NameAddr(display, uri, params)

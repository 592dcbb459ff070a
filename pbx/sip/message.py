"""SIP messages: parse one datagram, build and serialise requests and responses.

Theory of operation
-------------------
`parse_message(data)` takes the bytes of one UDP datagram and returns a
`SipRequest` or `SipResponse`, or raises `SipError` (status 400, or 505 for a
request in another SIP version) - never anything else, whatever the bytes.
The header section is decoded as UTF-8 with `surrogateescape`, so any octet
survives a parse → serialise round trip unchanged.

The parser is liberal where RFC 4475 allows it (extra SP in the Request-Line,
LWS inside `<...>`, unquoted display names with commas) and strict where a
wrong guess would misroute or misframe a message: start line, SIP version,
Via, CSeq, From, To, Call-ID and Content-Length are checked here, so code
above can read `cseq`, `branch`, `from_tag`, `to_tag` of a parsed message
without further checks. Other headers are kept as opaque text.

URIs, name-addrs and Via values have their own small parsers, returning frozen
dataclasses whose `str()` serialises them again. Escapes (`%HH`) are kept as
written; parameter names are lower-cased (they are case-insensitive, RFC 3261
§19.1.4), parameter values are kept as written.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from pbx.sip.errors import SipError, excerpt

SIP_VERSION = "SIP/2.0"
MAGIC_COOKIE = "z9hG4bK"
MAX_CSEQ = 2**32 - 1

# RFC 3261 §7.3.3 and the extensions' compact forms.
COMPACT_FORMS: dict[str, str] = {
    "i": "Call-ID",
    "m": "Contact",
    "e": "Content-Encoding",
    "l": "Content-Length",
    "c": "Content-Type",
    "f": "From",
    "s": "Subject",
    "k": "Supported",
    "t": "To",
    "v": "Via",
    "o": "Event",
    "r": "Refer-To",
    "b": "Referred-By",
    "x": "Session-Expires",
    "u": "Allow-Events",
}

_CANONICAL_NAMES = [
    "Accept", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow", "Allow-Events",
    "Authentication-Info", "Authorization", "Call-ID", "Call-Info", "Contact",
    "Content-Disposition", "Content-Encoding", "Content-Language", "Content-Length",
    "Content-Type", "CSeq", "Date", "Error-Info", "Event", "Expires", "From", "In-Reply-To",
    "Max-Forwards", "Min-Expires", "Min-SE", "MIME-Version", "Organization",
    "P-Asserted-Identity", "P-Preferred-Identity", "Priority", "Privacy",
    "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Require", "RAck", "Reason",
    "Record-Route", "Refer-To", "Referred-By", "Replaces", "Reply-To", "Require",
    "Retry-After", "Route", "RSeq", "Server", "Session-Expires", "Subject",
    "Subscription-State", "Supported", "Timestamp", "To", "Unsupported", "User-Agent", "Via",
    "Warning", "WWW-Authenticate",
]
_CANONICAL: dict[str, str] = {n.lower(): n for n in _CANONICAL_NAMES}
_CANONICAL.update({k: v for k, v in COMPACT_FORMS.items()})

# Headers whose values are comma-separated lists (RFC 3261 §7.3.1), split by get_all().
_LIST_HEADERS = frozenset(
    {"via", "route", "record-route", "contact", "allow", "supported", "require"}
)
# Headers that may appear once only; a second one makes the message malformed (RFC 4475 §3.3.8).
_SINGLE_HEADERS = ("Call-ID", "To", "From", "CSeq", "Max-Forwards", "Content-Length")
_MANDATORY_HEADERS = ("To", "From", "Call-ID", "CSeq", "Via")

REASON_PHRASES: dict[int, str] = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 199: "Early Dialog Terminated",
    200: "OK", 202: "Accepted", 204: "No Notification",
    300: "Multiple Choices", 301: "Moved Permanently", 302: "Moved Temporarily",
    305: "Use Proxy", 380: "Alternative Service",
    400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 406: "Not Acceptable",
    407: "Proxy Authentication Required", 408: "Request Timeout", 410: "Gone",
    413: "Request Entity Too Large", 414: "Request-URI Too Long",
    415: "Unsupported Media Type", 416: "Unsupported URI Scheme", 420: "Bad Extension",
    421: "Extension Required", 422: "Session Interval Too Small", 423: "Interval Too Brief",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist",
    482: "Loop Detected", 483: "Too Many Hops", 484: "Address Incomplete", 485: "Ambiguous",
    486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here",
    489: "Bad Event", 491: "Request Pending", 493: "Undecipherable",
    500: "Server Internal Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Server Time-out", 505: "Version Not Supported",
    513: "Message Too Large",
    600: "Busy Everywhere", 603: "Decline", 604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}

_TOKEN = r"[A-Za-z0-9\-.!%*_+`'~]+"
_TOKEN_RE = re.compile(_TOKEN)
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
# Numbers are ASCII digits only: `\d` and str.isdigit() also take "²" or "٣" (RFC 3261 §25.1:
# DIGIT is %x30-39), which int() then rejects or reads as another number.
_STATUS_LINE_RE = re.compile(r"SIP/([0-9]+)\.([0-9]+) ([0-9]{3})(?: (.*))?",
                             re.IGNORECASE | re.DOTALL)
_VERSION_RE = re.compile(r"SIP/([0-9]+)\.([0-9]+)", re.IGNORECASE)
_CSEQ_RE = re.compile(r"([0-9]{1,20})\s+(" + _TOKEN + r")")
_DIGITS_RE = re.compile(r"[0-9]{1,10}")
_HOST_RE = re.compile(r"[A-Za-z0-9_\-.]+")
_IPV6_RE = re.compile(r"\[[0-9A-Fa-f:.]+\]")
_VIA_PROTO_RE = re.compile(
    r"\s*(" + _TOKEN + r")\s*/\s*(" + _TOKEN + r")\s*/\s*(" + _TOKEN + r")\s+(.*)", re.DOTALL
)
# Characters never allowed unescaped inside a URI (RFC 3986 / RFC 3261 §25.1).
_URI_FORBIDDEN_RE = re.compile(r'[\x00-\x20<>"{}|\\^\x7f]')
_LINE_SPLIT_RE = re.compile(r"\r?\n")


# --------------------------------------------------------------------------- helpers


def is_digits(text: str) -> bool:
    """True for a non-empty run of ASCII digits (RFC 5234 DIGIT); str.isdigit() alone
    also accepts "²", which int() refuses."""
    return text.isascii() and text.isdigit()


def parse_number(text: str, what: str, max_digits: int = 10) -> int:
    """A header's unsigned decimal (delta-seconds, a port...): ASCII digits only, at most
    `max_digits` of them (so int() stays cheap and in range); SipError (400) otherwise."""
    if len(text) > max_digits or not is_digits(text):
        raise SipError(f"bad {what} {excerpt(text)}")
    return int(text)


def canonical_name(name: str) -> str:
    """The canonical spelling of a header name; compact forms become full names."""
    return _CANONICAL.get(name.lower(), name)


def split_header_values(value: str) -> list[str]:
    """Split a comma-separated header value, respecting quoted strings and `<...>`."""
    if "," not in value:
        return [value.strip()]
    if '"' not in value and "<" not in value:
        return [v.strip() for v in value.split(",")]
    parts: list[str] = []
    start = 0
    in_quotes = False
    in_angle = False
    i = 0
    n = len(value)
    while i < n:
        ch = value[i]
        if in_quotes:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_quotes = False
        elif ch == '"':
            in_quotes = True
        elif ch == "<":
            in_angle = True
        elif ch == ">":
            in_angle = False
        elif ch == "," and not in_angle:
            parts.append(value[start:i].strip())
            start = i + 1
        i += 1
    parts.append(value[start:].strip())
    return parts


def _split_params(text: str) -> list[str]:
    """Split `;a=1;b="x;y"` on semicolons outside quoted strings."""
    if '"' not in text:
        return text.split(";")
    parts: list[str] = []
    start = 0
    in_quotes = False
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if in_quotes:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_quotes = False
        elif ch == '"':
            in_quotes = True
        elif ch == ";":
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if in_quotes:
        raise SipError(f"unterminated quoted string in parameters {excerpt(text)}")
    parts.append(text[start:])
    return parts


def parse_params(text: str) -> dict[str, str | None]:
    """Parse header parameters `;name=value;flag` (LWS allowed around `;` and `=`).

    The text must be empty or start with `;`. Names are lower-cased; an empty
    parameter (`;;`) is malformed.
    """
    params: dict[str, str | None] = {}
    text = text.strip()
    if not text:
        return params
    if not text.startswith(";"):
        raise SipError(f"unexpected text before parameters: {excerpt(text)}")
    for part in _split_params(text[1:]):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not name or not _TOKEN_RE.fullmatch(name):
            raise SipError(f"bad parameter {excerpt(part)}")
        if eq:
            value = value.strip()
            if not value:
                raise SipError(f"empty value for parameter {excerpt(name)}")
            params[name.lower()] = value
        else:
            params[name.lower()] = None
    return params


def format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def _parse_quoted(text: str, start: int) -> tuple[str, int]:
    """Parse the quoted string starting at text[start] == '"'; return (content, end index)."""
    out: list[str] = []
    i = start + 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            if i + 1 >= n:
                break
            out.append(text[i + 1])
            i += 2
            continue
        if ch == '"':
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise SipError(f"unterminated quoted string in {excerpt(text)}")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------- Headers


class Headers:
    """Ordered header fields with case-insensitive names.

    Compact forms are stored under their full names; names are kept in
    canonical spelling (`Call-ID`, `CSeq`, `WWW-Authenticate`), unknown ones as
    first written.

    Linear in the message however many distinct names it carries: `add` is O(1)
    (the spelling of a name already seen is looked up in `_spelling`, not searched
    for), `in` and `count` are O(1), `get` and `get_all` one pass that absent names
    skip. `_spelling` and `_count` hold exactly the keys present in `_items`.
    """

    __slots__ = ("_items", "_spelling", "_count")

    def __init__(self, items: list[tuple[str, str]] | None = None) -> None:
        # (lower-case key, spelling, value), in order
        self._items: list[tuple[str, str, str]] = []
        self._spelling: dict[str, str] = {}  # lower-case key -> its spelling
        self._count: dict[str, int] = {}  # lower-case key -> number of lines
        if items:
            for name, value in items:
                self.add(name, value)

    def get(self, name: str) -> str | None:
        """The first value of `name`, or None."""
        key = canonical_name(name).lower()
        if key not in self._count:
            return None
        for k, _, v in self._items:
            if k == key:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        """Every value of `name`; list-valued headers are also split on commas."""
        key = canonical_name(name).lower()
        if key not in self._count:
            return []
        values = [v for k, _, v in self._items if k == key]
        if key in _LIST_HEADERS:
            out: list[str] = []
            for v in values:
                out.extend(split_header_values(v))
            return out
        return values

    def count(self, name: str) -> int:
        """How many header lines carry `name`."""
        return self._count.get(canonical_name(name).lower(), 0)

    def _entry(self, name: str, value: str) -> tuple[str, str, str]:
        """Canonical spelling, or for an unknown name the spelling first seen."""
        cname = canonical_name(name)
        key = cname.lower()
        return key, self._spelling.get(key, cname), value

    def _counted(self, entry: tuple[str, str, str]) -> tuple[str, str, str]:
        key = entry[0]
        self._count[key] = self._count.get(key, 0) + 1
        self._spelling.setdefault(key, entry[1])
        return entry

    def add(self, name: str, value: str) -> None:
        self._items.append(self._counted(self._entry(name, value)))

    def insert(self, index: int, name: str, value: str) -> None:
        """Insert a header line at position `index` (0 → before all others)."""
        self._items.insert(index, self._counted(self._entry(name, value)))

    def set(self, name: str, value: str) -> None:
        """Replace every value of `name` by one, at the position of the first."""
        entry = self._entry(name, value)
        key = entry[0]
        if key not in self._count:
            self._items.append(self._counted(entry))
            return
        first = next(i for i, it in enumerate(self._items) if it[0] == key)
        self._items[first] = entry
        self._items[first + 1 :] = [it for it in self._items[first + 1 :] if it[0] != key]
        self._count[key] = 1

    def remove(self, name: str) -> None:
        key = canonical_name(name).lower()
        if self._count.pop(key, None) is not None:
            del self._spelling[key]
            self._items = [it for it in self._items if it[0] != key]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return canonical_name(name).lower() in self._count

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Headers):
            return NotImplemented
        return self._items == other._items

    def __repr__(self) -> str:
        return f"Headers({self.items()!r})"

    def items(self) -> list[tuple[str, str]]:
        return [(n, v) for _, n, v in self._items]

    def copy(self) -> Headers:
        h = Headers()
        h._items = list(self._items)
        h._spelling = dict(self._spelling)
        h._count = dict(self._count)
        return h


# --------------------------------------------------------------------------- URI


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


def _parse_hostport(text: str, what: str) -> tuple[str, int | None]:
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
    if not rest.startswith(":") or not _DIGITS_RE.fullmatch(rest[1:]):
        raise SipError(f"bad port in {what} {excerpt(text)}")
    port = int(rest[1:])
    if port > 65535:
        raise SipError(f"port out of range in {what} {excerpt(text)}")
    return host, port


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
    host, port = _parse_hostport(hostport, "URI")
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
        display = f"{_quote(self.display)} " if self.display is not None else ""
        return f"{display}<{self.uri}>{format_params(self.params)}"


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
        display, end = _parse_quoted(text, 0)
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


# --------------------------------------------------------------------------- Via


@dataclass(frozen=True)
class Via:
    """One Via value (RFC 3261 §20.42). `host` keeps IPv6 brackets."""

    transport: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @property
    def branch(self) -> str:
        return self.params.get("branch") or ""

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> int | None:
        """The rport value filled in by a server (RFC 3581), None if absent or empty."""
        value = self.params.get("rport")
        if value is None or len(value) > 5 or not is_digits(value):
            return None
        return int(value)

    @property
    def wants_rport(self) -> bool:
        """True when the client asked for rport (RFC 3581 §3)."""
        return "rport" in self.params

    @property
    def sent_by(self) -> str:
        host = self.host.lower()
        return host if self.port is None else f"{host}:{self.port}"

    def __str__(self) -> str:
        hostport = self.host if self.port is None else f"{self.host}:{self.port}"
        return f"SIP/2.0/{self.transport} {hostport}{format_params(self.params)}"


def stamp_via(request: SipRequest, source_ip: str, source_port: int) -> None:
    """Record where a request really came from in its top Via (RFC 3261 §18.2.1,
    RFC 3581 §4): `received=` when the sent-by host is not the source IP (or the
    client asked for rport), and `rport=` filled with the source port when asked.
    Responses then go to the source, which is what the front does anyway."""
    items = request.headers._items
    for i, (key, name, raw) in enumerate(items):
        if key != "via":
            continue
        values = split_header_values(raw)
        via = parse_via(values[0])
        params = dict(via.params)
        if via.host.strip("[]").lower() != source_ip.lower() or via.wants_rport:
            params["received"] = source_ip
        if via.wants_rport:
            params["rport"] = str(source_port)
        if params != via.params:
            values[0] = str(Via(via.transport, via.host, via.port, params))
            items[i] = (key, name, ", ".join(values))
        return


def parse_via(value: str) -> Via:
    if not isinstance(value, str):
        raise SipError("Via must be text")
    m = _VIA_PROTO_RE.fullmatch(value)
    if not m:
        raise SipError(f"bad Via {excerpt(value)}")
    name, version, transport, rest = m.groups()
    if name.upper() != "SIP" or version != "2.0":
        raise SipError(f"bad Via protocol {excerpt(name + '/' + version)}")
    sent_by, semi, param_text = rest.partition(";")
    # sent-by = host [ COLON port ], and COLON allows LWS around it. (Split, not a
    # `\s*:\s*` substitution: that rescans a long run of spaces from each of its
    # positions, quadratic in the run.)
    sent_by = ":".join(part.strip() for part in sent_by.split(":")).strip()
    if not sent_by:
        raise SipError(f"missing sent-by in Via {excerpt(value)}")
    host, port = _parse_hostport(sent_by, "Via")
    params = parse_params(semi + param_text)
    return Via(transport.upper(), host, port, params)


# --------------------------------------------------------------------------- messages


def _cseq_of(headers: Headers) -> tuple[int, str]:
    value = headers.get("CSeq")
    if value is None:
        raise SipError("missing CSeq")
    m = _CSEQ_RE.fullmatch(value.strip())
    if not m:
        raise SipError(f"bad CSeq {excerpt(value)}")
    number = int(m.group(1))
    if number > MAX_CSEQ:
        raise SipError(f"CSeq number {number} too large")
    return number, m.group(2)


def _tag_of(value: str | None) -> str | None:
    if value is None:
        return None
    return parse_name_addr(value).tag


def _serialize(start_line: str, headers: Headers, body: bytes) -> bytes:
    lines = [start_line]
    have_length = False
    for name, value in headers.items():
        if name == "Content-Length":
            if have_length:
                continue
            have_length = True
            value = str(len(body))
        lines.append(f"{name}: {value}")
    if not have_length:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("")
    lines.append("")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + body


class _MessageMixin:
    headers: Headers

    @property
    def call_id(self) -> str:
        return (self.headers.get("Call-ID") or "").strip()

    @property
    def cseq(self) -> tuple[int, str]:
        """(number, method) of CSeq; SipError if missing or malformed."""
        return _cseq_of(self.headers)

    @property
    def via(self) -> Via:
        """The top Via; SipError if missing or malformed."""
        values = self.headers.get_all("Via")
        if not values:
            raise SipError("missing Via")
        return parse_via(values[0])

    @property
    def branch(self) -> str:
        values = self.headers.get_all("Via")
        if not values:
            return ""
        return parse_via(values[0]).branch

    @property
    def from_tag(self) -> str | None:
        return _tag_of(self.headers.get("From"))

    @property
    def to_tag(self) -> str | None:
        return _tag_of(self.headers.get("To"))


@dataclass
class SipRequest(_MessageMixin):
    method: str
    uri: str
    headers: Headers
    body: bytes = b""

    def serialize(self) -> bytes:
        return _serialize(f"{self.method} {self.uri} {SIP_VERSION}", self.headers, self.body)


@dataclass
class SipResponse(_MessageMixin):
    status: int
    reason: str
    headers: Headers
    body: bytes = b""

    def serialize(self) -> bytes:
        return _serialize(f"{SIP_VERSION} {self.status} {self.reason}", self.headers, self.body)


def _split_head(data: bytes) -> tuple[bytes, bytes]:
    """Split at the first empty line (CRLF CRLF, or LF LF from lax senders)."""
    crlf = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return data[:crlf], data[crlf + 4 :]
    if lf >= 0:
        return data[:lf], data[lf + 2 :]
    return data.rstrip(b"\r\n"), b""


def _unfold(parts: list[str]) -> str:
    """One header line from its first line and continuation lines (RFC 3261 §7.3.1:
    the line break and the white space around it are one SP). Joined once, so a
    header folded over thousands of lines costs linear time, not one copy per line."""
    if len(parts) == 1:
        return parts[0]
    out = [parts[0].rstrip(" \t")]
    for part in parts[1:-1]:
        part = part.strip(" \t")
        if part:
            out.append(part)
    out.append(parts[-1].lstrip(" \t"))
    return " ".join(out)


def _parse_header_lines(lines: list[str]) -> Headers:
    """Unfold (RFC 3261 §7.3.1: CRLF + WSP is one SP) and split `name: value`."""
    folded: list[list[str]] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            if not folded:
                raise SipError("continuation line before the first header")
            folded[-1].append(line)
        elif line:
            folded.append([line])
        else:
            raise SipError("empty line inside the header section")
    headers = Headers()
    for parts in folded:
        line = _unfold(parts)
        name, colon, value = line.partition(":")
        name = name.strip(" \t")
        if not colon or not _TOKEN_RE.fullmatch(name):
            raise SipError(f"bad header line {excerpt(line)}")
        headers.add(name, value.strip(" \t"))
    return headers


def _check_headers(headers: Headers) -> None:
    for name in _MANDATORY_HEADERS:
        if name not in headers:
            raise SipError(f"missing {name} header")
    for name in _SINGLE_HEADERS:
        if headers.count(name) > 1:
            raise SipError(f"more than one {name} header")
    for value in headers.get_all("Via"):
        parse_via(value)
    for name in ("From", "To"):
        parse_name_addr(headers.get(name) or "")
    if not (headers.get("Call-ID") or "").strip():
        raise SipError("empty Call-ID")
    _cseq_of(headers)
    max_forwards = headers.get("Max-Forwards")
    if max_forwards is not None and not _DIGITS_RE.fullmatch(max_forwards):
        raise SipError(f"bad Max-Forwards {excerpt(max_forwards)}")


def parse_message(data: bytes) -> SipRequest | SipResponse:
    """Parse one SIP message from one UDP datagram; SipError on anything malformed."""
    try:
        return _parse_message(data)
    except SipError:
        raise
    except Exception as exc:  # defence in depth: the contract is SipError only
        raise SipError(f"malformed message ({type(exc).__name__}: {excerpt(str(exc))})") from exc


def _parse_message(data: bytes) -> SipRequest | SipResponse:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise SipError("message must be bytes")
    data = bytes(data).lstrip(b"\r\n")  # leading CRLFs are keep-alives (RFC 5626 §3.5.1)
    if not data.strip():
        raise SipError("empty message")
    head, rest = _split_head(data)
    text = head.decode("utf-8", "surrogateescape")
    lines = _LINE_SPLIT_RE.split(text)
    start = lines[0]
    headers = _parse_header_lines(lines[1:])

    message: SipRequest | SipResponse
    if start[:4].upper() == "SIP/":
        m = _STATUS_LINE_RE.fullmatch(start)
        if not m:
            raise SipError(f"bad status line {excerpt(start)}")
        if (m.group(1), m.group(2)) != ("2", "0"):
            raise SipError(f"unsupported SIP version in {excerpt(start)}")
        status = int(m.group(3))
        if not 100 <= status <= 699:
            raise SipError(f"bad status code {status}")
        message = SipResponse(status, m.group(4) or "", headers)
        _check_headers(headers)
    else:
        parts = start.split()
        if len(parts) != 3:
            raise SipError(f"bad request line {excerpt(start)}")
        method, uri, version = parts
        if not _TOKEN_RE.fullmatch(method):
            raise SipError(f"bad method {excerpt(method)}")
        vm = _VERSION_RE.fullmatch(version)
        if not vm:
            raise SipError(f"bad request line {excerpt(start)}")
        if (vm.group(1), vm.group(2)) != ("2", "0"):
            raise SipError(f"SIP version {excerpt(version)} not supported", 505)
        parsed_uri = parse_uri(uri)
        if parsed_uri.headers:
            # RFC 3261 §19.1.1: headers are not allowed in a Request-URI (RFC 4475 §3.1.2.11).
            raise SipError(f"headers in Request-URI {excerpt(uri)}")
        message = SipRequest(method, uri, headers)
        _check_headers(headers)
        if message.cseq[1] != method:
            raise SipError(f"CSeq method {excerpt(message.cseq[1])} does not match "
                           f"{excerpt(method)}")

    length_text = headers.get("Content-Length")
    if length_text is None:
        message.body = rest  # UDP: the body runs to the end of the datagram (RFC 3261 §18.3)
    else:
        if not _DIGITS_RE.fullmatch(length_text):
            raise SipError(f"bad Content-Length {excerpt(length_text)}")
        length = int(length_text)
        if length > len(rest):
            raise SipError(f"Content-Length {length} larger than the {len(rest)} octets received")
        message.body = rest[:length]
    return message


# --------------------------------------------------------------------------- building


def make_response(
    request: SipRequest,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    content_type: str | None = None,
) -> SipResponse:
    """A response to `request` per RFC 3261 §8.2.6.

    Via (all, in order), From, Call-ID and CSeq are copied; To too, with
    `;tag=to_tag` added when given and To has none.
    """
    out = Headers()
    src = request.headers
    for name, value in src.items():
        if name == "Via":
            out.add("Via", value)
    from_value = src.get("From")
    if from_value is not None:
        out.add("From", from_value)
    to_value = src.get("To")
    if to_value is not None:
        if to_tag is not None and _tag_of(to_value) is None:
            to_value = f"{to_value};tag={to_tag}"
        out.add("To", to_value)
    for name in ("Call-ID", "CSeq"):
        copied = src.get(name)
        if copied is not None:
            out.add(name, copied)
    if status == 100 and "Timestamp" in src:
        out.add("Timestamp", src.get("Timestamp") or "")  # RFC 3261 §8.2.6.1
    for name, value in headers or []:
        out.add(name, value)
    if body or content_type:
        out.set("Content-Type", content_type or "application/sdp")
    if reason is None:
        reason = REASON_PHRASES.get(status, "Unknown")
    return SipResponse(status, reason, out, body)


def make_ack(invite: SipRequest, response: SipResponse) -> SipRequest:
    """The ACK for a non-2xx final response, built by the INVITE client transaction.

    RFC 3261 §17.1.1.3: Request-URI, Call-ID, From and top Via of the INVITE,
    To of the response (with its tag), CSeq number with method ACK, and the
    INVITE's Route headers.
    """
    h = Headers()
    vias = invite.headers.get_all("Via")
    if vias:
        h.add("Via", vias[0])
    for name, value in invite.headers.items():
        if name == "Route":
            h.add("Route", value)
    h.add("Max-Forwards", "70")
    h.add("From", invite.headers.get("From") or "")
    h.add("To", response.headers.get("To") or invite.headers.get("To") or "")
    h.add("Call-ID", invite.headers.get("Call-ID") or "")
    h.add("CSeq", f"{invite.cseq[0]} ACK")
    return SipRequest("ACK", invite.uri, h)


def make_cancel(invite: SipRequest) -> SipRequest:
    """CANCEL for a pending INVITE (RFC 3261 §9.1): same Request-URI, Call-ID,
    From, To, top Via (so the same branch) and Route, CSeq number with CANCEL."""
    h = Headers()
    vias = invite.headers.get_all("Via")
    if vias:
        h.add("Via", vias[0])
    for name, value in invite.headers.items():
        if name == "Route":
            h.add("Route", value)
    h.add("Max-Forwards", "70")
    h.add("From", invite.headers.get("From") or "")
    h.add("To", invite.headers.get("To") or "")
    h.add("Call-ID", invite.headers.get("Call-ID") or "")
    h.add("CSeq", f"{invite.cseq[0]} CANCEL")
    return SipRequest("CANCEL", invite.uri, h)


def new_branch() -> str:
    """A fresh Via branch with the RFC 3261 magic cookie (§8.1.1.7)."""
    return MAGIC_COOKIE + secrets.token_hex(10)


def new_tag() -> str:
    return secrets.token_hex(6)


def new_call_id(host: str) -> str:
    return f"{secrets.token_hex(12)}@{host}"

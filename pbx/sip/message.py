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

The pieces live beside it, each with its own parser: the header container
(`pbx.sip.headers`), URIs and name-addrs (`pbx.sip.uri`), Via
(`pbx.sip.via`) and the lexical rules they share (`pbx.sip.grammar`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pbx.sip.errors import SipError, excerpt
from pbx.sip.grammar import DIGITS_RE, TOKEN, TOKEN_RE, memoized, split_header_values
from pbx.sip.headers import Headers
from pbx.sip.uri import parse_name_addr, parse_uri
from pbx.sip.via import Via, parse_via
from pbx.tokens import token_hex

SIP_VERSION = "SIP/2.0"
MAGIC_COOKIE = "z9hG4bK"
MAX_CSEQ = 2**32 - 1

# Headers that may appear once only; a second one makes the message malformed (RFC 4475 §3.3.8).
_SINGLE_HEADERS = ("Call-ID", "To", "From", "CSeq", "Max-Forwards", "Content-Length")
_MANDATORY_HEADERS = ("To", "From", "Call-ID", "CSeq", "Via")
_SINGLE_KEYS = tuple((name.lower(), name) for name in _SINGLE_HEADERS)
_MANDATORY_KEYS = tuple((name.lower(), name) for name in _MANDATORY_HEADERS)
# Methods whose spelling is a token already (RFC 3261 §25.1): no pattern to match.
_KNOWN_METHODS = frozenset({"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "INFO",
                            "UPDATE", "PRACK", "REFER", "NOTIFY", "SUBSCRIBE", "MESSAGE",
                            "PUBLISH"})

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

_STATUS_LINE_RE = re.compile(r"SIP/([0-9]+)\.([0-9]+) ([0-9]{3})(?: (.*))?",
                             re.IGNORECASE | re.DOTALL)
_VERSION_RE = re.compile(r"SIP/([0-9]+)\.([0-9]+)", re.IGNORECASE)
_CSEQ_RE = re.compile(r"([0-9]{1,20})\s+(" + TOKEN + r")")
_LINE_SPLIT_RE = re.compile(r"\r?\n")


# --------------------------------------------------------------------------- messages


@memoized
def _parse_cseq(value: str) -> tuple[int, str]:
    m = _CSEQ_RE.fullmatch(value.strip())
    if not m:
        raise SipError(f"bad CSeq {excerpt(value)}")
    number = int(m.group(1))
    if number > MAX_CSEQ:
        raise SipError(f"CSeq number {number} too large")
    return number, m.group(2)


def _cseq_of(headers: Headers) -> tuple[int, str]:
    value = headers.get("CSeq")
    if value is None:
        raise SipError("missing CSeq")
    return _parse_cseq(value)


def _top_via_text(headers: Headers) -> str | None:
    """The first value of the first Via line (`get_all("Via")[0]` without splitting
    the others), None when there is no Via."""
    first = headers.get("Via")
    if first is None:
        return None
    if "," not in first:
        return first.strip()
    return split_header_values(first)[0]


def _tag_of(value: str | None) -> str | None:
    if value is None:
        return None
    return parse_name_addr(value).tag


def _serialize(start_line: str, headers: Headers, body: bytes) -> bytes:
    if "content-length" not in headers.key_counts:
        # What we build has none: one join, Content-Length last.
        text = "".join([start_line, "\r\n",
                        *[f"{name}: {value}\r\n" for name, value in headers.items()],
                        f"Content-Length: {len(body)}\r\n\r\n"])
        return text.encode("utf-8", "surrogateescape") + body
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
        top = _top_via_text(self.headers)
        if top is None:
            raise SipError("missing Via")
        return parse_via(top)

    @property
    def branch(self) -> str:
        top = _top_via_text(self.headers)
        if top is None:
            return ""
        return parse_via(top).branch

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


def _split_lines(text: str) -> list[str]:
    """The lines of a header section: CRLF-terminated, or bare LF from lax senders."""
    lines = text.split("\r\n")
    if text.count("\n") != len(lines) - 1:  # a bare LF somewhere
        lines = _LINE_SPLIT_RE.split(text)
    return lines


def _parse_folded_header_lines(lines: list[str]) -> Headers:
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
        if not colon or not TOKEN_RE.fullmatch(name):
            raise SipError(f"bad header line {excerpt(line)}")
        headers.add(name, value.strip(" \t"))
    return headers


def _check_headers(headers: Headers) -> tuple[int, str]:
    """The checks every message passes (RFC 3261 §8.1.1, RFC 4475 §3.3.8); its CSeq."""
    counts = headers.key_counts
    for key, name in _MANDATORY_KEYS:
        if key not in counts:
            raise SipError(f"missing {name} header")
    for key, name in _SINGLE_KEYS:
        if counts.get(key, 0) > 1:
            raise SipError(f"more than one {name} header")
    for value in headers.get_all("Via"):
        parse_via(value)
    for name in ("From", "To"):
        parse_name_addr(headers.get(name) or "")
    if not (headers.get("Call-ID") or "").strip():
        raise SipError("empty Call-ID")
    cseq = _cseq_of(headers)
    max_forwards = headers.get("Max-Forwards")
    if max_forwards is not None and not DIGITS_RE.fullmatch(max_forwards):
        raise SipError(f"bad Max-Forwards {excerpt(max_forwards)}")
    return cseq


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
    if not data or data.isspace():
        raise SipError("empty message")
    head, rest = _split_head(data)
    text = head.decode("utf-8", "surrogateescape")
    lines = _split_lines(text)
    start = lines[0]
    if "\n " in text or "\n\t" in text:  # continuation lines (rare): unfold first
        headers = _parse_folded_header_lines(lines[1:])
    else:
        headers = Headers.parse_lines(lines[1:])

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
        if method not in _KNOWN_METHODS and not TOKEN_RE.fullmatch(method):
            raise SipError(f"bad method {excerpt(method)}")
        if version != SIP_VERSION:
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
        cseq_method = _check_headers(headers)[1]
        if cseq_method != method:
            raise SipError(f"CSeq method {excerpt(cseq_method)} does not match "
                           f"{excerpt(method)}")

    length_text = headers.get("Content-Length")
    if length_text is None:
        message.body = rest  # UDP: the body runs to the end of the datagram (RFC 3261 §18.3)
    else:
        if not DIGITS_RE.fullmatch(length_text):
            raise SipError(f"bad Content-Length {excerpt(length_text)}")
        length = int(length_text)
        if length > len(rest):
            raise SipError(f"Content-Length {length} larger than the {len(rest)} octets received")
        message.body = rest[:length]
    return message


# --------------------------------------------------------------------------- transport


def stamp_via(request: SipRequest, source_ip: str, source_port: int) -> None:
    """Record where a request really came from in its top Via (RFC 3261 §18.2.1,
    RFC 3581 §4): `received=` when the sent-by host is not the source IP (or the
    client asked for rport), and `rport=` filled with the source port when asked.
    Responses then go to the source, which is what the front does anyway."""
    top = _top_via_text(request.headers)
    if top is None:
        return
    via = parse_via(top)
    wants_rport = via.wants_rport
    if not wants_rport and via.host.strip("[]").lower() == source_ip.lower():
        return  # nothing to record (the common case: sent-by is the source)
    values = split_header_values(request.headers.get("Via") or "")
    params = dict(via.params)
    params["received"] = source_ip
    if wants_rport:
        params["rport"] = str(source_port)
    if params != via.params:
        values[0] = str(Via(via.transport, via.host, via.port, params))
        request.headers.set_first("Via", ", ".join(values))


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
    for value in src.lines("Via"):
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
        if "Content-Type" in out:
            out.set("Content-Type", content_type or "application/sdp")
        else:
            out.add("Content-Type", content_type or "application/sdp")
    if reason is None:
        reason = REASON_PHRASES.get(status, "Unknown")
    return SipResponse(status, reason, out, body)


def trying_bytes(request: SipRequest) -> bytes:
    """The 100 Trying to `request` on the wire: `make_response(request, 100).serialize()`
    written directly (every INVITE gets one; no Headers built): Via (all, in order),
    From, To, Call-ID, CSeq and Timestamp copied (RFC 3261 §8.2.6)."""
    src = request.headers
    lines = ["SIP/2.0 100 Trying"]
    lines += [f"Via: {value}" for value in src.lines("Via")]
    for name in ("From", "To", "Call-ID", "CSeq", "Timestamp"):
        value = src.get(name)
        if value is not None:
            lines.append(f"{name}: {value}")
    lines.append("Content-Length: 0\r\n\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


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
    for value in invite.headers.lines("Route"):
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
    for value in invite.headers.lines("Route"):
        h.add("Route", value)
    h.add("Max-Forwards", "70")
    h.add("From", invite.headers.get("From") or "")
    h.add("To", invite.headers.get("To") or "")
    h.add("Call-ID", invite.headers.get("Call-ID") or "")
    h.add("CSeq", f"{invite.cseq[0]} CANCEL")
    return SipRequest("CANCEL", invite.uri, h)


def new_branch() -> str:
    """A fresh Via branch with the RFC 3261 magic cookie (§8.1.1.7)."""
    return MAGIC_COOKIE + token_hex(10)


def new_tag() -> str:
    return token_hex(6)


def new_call_id(host: str) -> str:
    return f"{token_hex(12)}@{host}"

"""Property tests of the SIP-side parsers: any input built from the grammar's pieces
(plus the characters that broke them: "²", "٣", NUL, lone CR, quotes, brackets)
either parses or raises the layer's declared error, and what parses can be used.

The properties are the fuzz targets of tests/fuzz (one definition of "no crash"
for both); hypothesis drives them with inputs shaped like SIP, SDP and Digest, so
that deep paths are reached in a few hundred examples. Deterministic
(`derandomize`): the exploring is the fuzzer's job.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pbx.sip.digest import choose_challenge, parse_auth_params, parse_challenge
from pbx.sip.errors import SipError
from pbx.sip.fields import DTMF_DIGITS, parse_dtmf_info, parse_session_expires
from pbx.sip.headers import Headers, canonical_name
from tests.fuzz import targets

PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Pieces of values: what the grammar is made of, and what broke parsers before.
_PIECES = [
    "sip:", "sips:", "tel:", "alice", "@", "example.com", "[::1]", "[2001:db8::1", ":", "5060",
    ";", "tag=", "branch=z9hG4bK", "rport", "received=", "lr", "transport=tcp", ",", " ", "\t",
    "<", ">", '"', '\\"', "\\", "=", "?", "&", "%41", "0", "1", "65535", "99999999999",
    "\u00b2", "\u0663", "\x00", "\r", "SIP/2.0/UDP ", "SIP/2.0/TCP ", "INVITE", "ACK",
    "\u00e9", "\udcff", "Digest ", "uac", "uas", "refresher=",
]
_NAMES = [
    "Via", "v", "From", "f", "To", "t", "Call-ID", "i", "CSeq", "Contact", "m", "Route",
    "Record-Route", "Max-Forwards", "Content-Length", "l", "Content-Type", "c",
    "Session-Expires", "x", "Supported", "k", "Refer-To", "r", "Expires", "Q", "X-\u00b2",
]
_values = st.lists(st.sampled_from(_PIECES) | st.text(max_size=4), max_size=12).map("".join)
_headers = st.lists(st.tuples(st.sampled_from(_NAMES), _values), max_size=14)
_start_lines = st.sampled_from([
    "INVITE sip:a@b SIP/2.0", "OPTIONS sip:pbx@127.0.0.1:5060 SIP/2.0", "ACK sip:x SIP/2.0",
    "INFO sip:a@b SIP/2.0", "SIP/2.0 200 OK", "SIP/2.0 180 ", "SIP/3.0 200 OK",
    "REGISTER sips:[::1] SIP/2.0", "INVITE sip:\u00b2@b SIP/2.0",
]) | _values

_MANDATORY = [
    ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1;rport"), ("From", "<sip:a@b>;tag=1"),
    ("To", "<sip:c@d>"), ("Call-ID", "x"), ("CSeq", "1 INVITE"), ("Max-Forwards", "70"),
]


@st.composite
def sip_messages(draw: st.DrawFn) -> bytes:
    start = draw(_start_lines)
    headers = draw(_headers)
    if draw(st.booleans()):  # most messages worth testing get past the mandatory checks
        headers = [h for h in _MANDATORY if h[0] not in {n for n, _ in headers}] + headers
    body = draw(st.sampled_from([b"", b"v=0\r\n", b"Signal=\xc2\xb2\r\nDuration=9\r\n"])
                | st.binary(max_size=40))
    crlf = draw(st.sampled_from(["\r\n", "\n"]))
    text = crlf.join([start] + [f"{n}: {v}" for n, v in headers]) + crlf + crlf
    return text.encode("utf-8", "surrogateescape") + body


@PROPERTY
@given(sip_messages())
def test_sip_messages_parse_or_raise_sip_error(data: bytes) -> None:
    targets.sip(data)


@PROPERTY
@given(st.lists(sip_messages() | st.sampled_from([b"\r\n", b"\r\n\r\n"]) | st.binary(max_size=30),
                max_size=5).map(b"".join))
def test_tcp_streams_frame_alike_however_cut(data: bytes) -> None:
    targets.framing(data)


_SDP_LINES = st.sampled_from([
    "v=0", "o=- 1 1 IN IP4 192.0.2.1", "o=- \u00b2 1 IN IP4 h", "s=-", "c=IN IP4 192.0.2.1",
    "c=IN IP6 ::1", "c=IN IP4 host.example", "c=IN", "t=0 0", "m=audio 4000 RTP/AVP 0 8 101",
    "m=audio \u00b2 RTP/AVP 0", "m=audio 0 RTP/AVP 0", "m=video 4002 RTP/AVP 96",
    "m=audio 4000/2 RTP/SAVP \u0663", "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/\u00b2",
    "a=rtpmap:101 telephone-event/8000", "a=rtpmap:\u00b2 x/8000", "a=fmtp:\u00b2 0-16",
    "a=ptime:20", "a=ptime:1e9", "a=ptime:\u00b2", "a=sendonly", "a=recvonly", "a=inactive",
    "a=sendrecv", "b=AS:64", "x", "",
]) | st.text(max_size=20)


@PROPERTY
@given(st.lists(_SDP_LINES, max_size=16), st.sampled_from(["\r\n", "\n"]))
def test_sdp_offers_and_answers_parse_or_raise_sdp_error(lines: list[str], eol: str) -> None:
    targets.sdp(eol.join(["v=0"] + lines).encode("utf-8", "surrogateescape"))


_AUTH_PARAMS = st.lists(st.tuples(
    st.sampled_from(["realm", "nonce", "uri", "response", "algorithm", "qop", "nc", "cnonce",
                     "opaque", "stale", "username", "username*", "x\u00b2", ""]),
    st.sampled_from(['"pbx"', "MD5", "SHA-256", "auth", '"a\\"b, c"', '"unterminated',
                     "00000001", "UTF-8''%ff", "", '"\u00b2"']) | st.text(max_size=6),
), max_size=8)


@PROPERTY
@given(st.sampled_from(["Digest ", "digest", "Basic ", "", "Digest\t"]), _AUTH_PARAMS,
       st.sampled_from([", ", ",", " ", ",,"]))
def test_digest_headers_parse_or_raise_sip_error(scheme: str, params: list[tuple[str, str]],
                                                  sep: str) -> None:
    value = scheme + sep.join(f"{n}={v}" for n, v in params)
    for parse in (parse_auth_params, parse_challenge, lambda v: choose_challenge([v, v])):
        try:
            parse(value)
        except SipError as exc:
            assert len(str(exc)) <= targets.MAX_ERROR_CHARS


@PROPERTY
@given(_values, st.sampled_from(["application/dtmf-relay", "application/dtmf", "text/plain",
                                 None, "APPLICATION/DTMF-RELAY; x=1"]),
       st.lists(st.sampled_from(["Signal=5", "Signal=#", "Signal=\u00b2", "Duration=160",
                                 "Duration=\u00b2", "Duration=99999999999", "signal = a",
                                 "Duration="]) | _values, max_size=4))
def test_session_expires_and_dtmf_info_raise_only_sip_error(
        session_expires: str, content_type: str | None, body_lines: list[str]) -> None:
    try:
        se = parse_session_expires(session_expires)
        assert 0 <= se.interval_s < 10**10
    except SipError as exc:
        assert exc.status == 400
    body = "\r\n".join(body_lines).encode("utf-8", "surrogateescape")
    try:
        info = parse_dtmf_info(content_type, body)
        assert info is None or (info.digit in DTMF_DIGITS and 0 <= info.duration_ms <= 10_000)
    except SipError as exc:
        assert exc.status == 400


_header_ops = st.lists(st.tuples(
    st.sampled_from(["add", "insert", "set", "set_first", "remove", "get", "copy"]),
    st.sampled_from(["Via", "v", "VIA", "To", "t", "X-Odd", "x-odd", "Call-ID"]),
    st.sampled_from(["a", "b", "c"]), st.integers(0, 6)), max_size=30)


@PROPERTY
@given(_header_ops)
def test_headers_get_is_the_first_line_whatever_changed_before(ops: list[
        tuple[str, str, str, int]]) -> None:
    """`Headers.get` answers from a cache of first values: after any sequence of changes
    it is still the first line's value, as a scan of the lines finds it."""
    headers = Headers()
    for op, name, value, index in ops:
        if op == "add":
            headers.add(name, value)
        elif op == "insert":
            headers.insert(index, name, f"{value}{index}")
        elif op == "set":
            headers.set(name, value)
        elif op == "set_first":
            headers.set_first(name, f"{value}!")
        elif op == "remove":
            headers.remove(name)
        elif op == "copy":
            headers = headers.copy()
        else:
            headers.get(name)  # fills the cache
        for probe in ("Via", "To", "X-Odd", "Call-ID"):
            scan = [v for n, v in headers.items()
                    if canonical_name(n).lower() == canonical_name(probe).lower()]
            assert headers.get(probe) == (scan[0] if scan else None), (op, probe)
            assert headers.count(probe) == len(scan)

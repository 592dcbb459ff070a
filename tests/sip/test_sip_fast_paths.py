"""The parsers' fast paths for the common forms (perf/README.md, bench_sip) give exactly
what the general paths give: the same values, the same errors with the same texts."""

from __future__ import annotations

import re

import pytest

from pbx.sip import grammar, message, sdp, via
from pbx.sip.errors import SdpError, SipError
from pbx.sip.headers import NAME_INFO, Headers, canonical_name
from pbx.sip.message import make_response, parse_message, trying_bytes

NEVER = re.compile(r"(?!)")

VIA_VALUES = [
    "SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-0",
    "SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-1;rport",
    "SIP/2.0/udp host.example.com;Branch=AbC;RECEIVED=1.2.3.4",
    "SIP/2.0/TCP h:00080;branch=x;ttl=1;maddr=224.2.0.1",
    "SIP/2.0/TLS a_b.c-d",
    "SIP/2.0/UDP h:65535",
    "SIP/2.0/UDP h:65536;branch=x",
    "SIP/2.0/UDP h:99999",
    "SIP/2.0/UDP h:123456;branch=x",
    "SIP/2.0/UDP h;branch=x;;",
    "SIP/2.0/UDP h;branch=",
    "SIP/2.0/UDP h;branch",
    "SIP/2.0/UDP h;=x",
    "SIP/2.0/UDP h;branch=x;received=[::1]",
    "SIP/2.0/UDP h;branch=\"q\"",
    "SIP/2.0/UDP h:",
    "SIP/2.0/UDP :5060",
    "SIP/2.0/UDP  h;branch=x",
    "SIP/2.0/UDP h ;branch=x",
    "sip/2.0/UDP h;branch=x",
    "SIP/2.1/UDP h;branch=x",
    "SIP/2.0/UDP [::1]:5060;branch=x",
    "SIP/2.0/UDP h;branch=x\x00",
    "SIP/2.0/UDP h\u00e9;branch=x",
    "SIP/2.0/UDP h;br\u00e9nch=x",
]

PARAM_TEXTS = [
    "", ";tag=4242SIPpTag001", ";Tag=ABC;lr;expires=60", ";a=1;a=2", ";;", ";a=", ";=a", "tag=1",
    " ;tag=1", ";tag=1 ", ";tag = 1", ';p="x;y"', ";p=\u00e9", ";lr;", ";%41=b", ";a=b=c",
]


def outcome(parse: object, text: str) -> object:
    try:
        return parse(text)  # type: ignore[operator]
    except SipError as exc:
        return ("error", type(exc), exc.message, exc.status)


@pytest.mark.parametrize("value", VIA_VALUES)
def test_via_fast_path_agrees_with_the_general_parser(value: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    parse = via.parse_via.__wrapped__  # type: ignore[attr-defined]  # (not the cache)
    fast = outcome(parse, value)
    monkeypatch.setattr(via, "_VIA_SIMPLE_RE", NEVER)
    assert fast == outcome(parse, value)


@pytest.mark.parametrize("text", PARAM_TEXTS)
def test_params_fast_path_agrees_with_the_general_parser(
        text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = outcome(grammar.parse_params, text)
    monkeypatch.setattr(grammar, "_SIMPLE_PARAMS_RE", NEVER)
    assert fast == outcome(grammar.parse_params, text)


def test_every_usual_spelling_of_a_name_is_the_same_header() -> None:
    for spellings, canonical in [(("Call-ID", "call-id", "Call-Id", "CALL-ID", "i", "I"),
                                  "Call-ID"),
                                 (("CSeq", "cseq", "Cseq", "CSEQ"), "CSeq"),
                                 (("Via", "via", "VIA", "v", "V"), "Via"),
                                 (("WWW-Authenticate", "www-authenticate",
                                   "Www-Authenticate"), "WWW-Authenticate")]:
        for name in spellings:
            assert NAME_INFO[name] == (canonical.lower(), canonical)
            assert canonical_name(name) == canonical
            assert canonical_name(name.swapcase()) == canonical  # the general path
    assert all(grammar.TOKEN_RE.fullmatch(name) for name in NAME_INFO)
    assert canonical_name("X-Odd") == "X-Odd"


HEADER_SECTIONS = [
    ["Via: SIP/2.0/UDP h;branch=z9hG4bK1", "v:SIP/2.0/UDP g", "i: x", "Call-Id: y"],
    ["X-Odd: a", "x-odd:  b ", "X-ODD:\tc\t", "Subject:", "s:"],
    ["Via : SIP/2.0/UDP h", "Via\t: x", "CSEQ: 1 INVITE", "To:<sip:a@b>"],
    ["Via SIP/2.0/UDP h"],
    ["Via"],
    [": x"],
    ["Bad Name: x"],
    ["Via: a", ""],
    ["Na\u00efve: x"],
    ["Via: caf\u00e9 \udce9"],
    ["X-Odd: \x0ba\x0c", "Subject:\xa0b "],  # only SP and HT are LWS here
]


@pytest.mark.parametrize("lines", HEADER_SECTIONS)
def test_one_pass_header_lines_agree_with_the_unfolding_parser(lines: list[str]) -> None:
    fast = outcome(Headers.parse_lines, lines)  # type: ignore[arg-type]
    general = outcome(message._parse_folded_header_lines, lines)  # type: ignore[arg-type]
    assert fast == general
    if isinstance(fast, Headers):
        assert isinstance(general, Headers)
        assert fast.items() == general.items()
        for name in ("Via", "Call-ID", "X-Odd", "x-odd", "CSeq", "To", "Subject"):
            assert fast.get(name) == general.get(name)
            assert fast.count(name) == general.count(name)


def test_a_message_with_bare_lfs_among_crlfs_is_split_on_both() -> None:
    data = (b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\n"
            b"To: <sip:a@b>\r\nFrom: <sip:c@d>;tag=1\nCall-ID: x\r\nCSeq: 1 OPTIONS\n\n")
    msg = parse_message(data)
    assert msg.headers.get("Via") == "SIP/2.0/UDP h;branch=z9hG4bK1"
    assert msg.headers.get("From") == "<sip:c@d>;tag=1"
    assert msg.cseq == (1, "OPTIONS")


REQUESTS = [
    b"INVITE sip:*99@127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-4242-1-0\r\n"
    b"From: sipp <sip:sipp@127.0.0.1:5061>;tag=4242SIPpTag001\r\n"
    b"To: *99 <sip:*99@127.0.0.1:5060>\r\nCall-ID: 1-4242@127.0.0.1\r\nCSeq: 1 INVITE\r\n"
    b"Contact: sip:sipp@127.0.0.1:5061\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n",
    b"INVITE sip:a@b SIP/2.0\r\nv: SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP c\r\n"
    b"VIA: SIP/2.0/TCP d;branch=z9hG4bK2\r\nt: <sip:a@b>\r\nf: <sip:c@d>;tag=1\r\ni: x\r\n"
    b"CSeq: 1 INVITE\r\nTimestamp: 54 0.5\r\nl: 0\r\n\r\n",
]


@pytest.mark.parametrize("data", REQUESTS)
def test_the_written_100_trying_is_the_built_one(data: bytes) -> None:
    request = parse_message(data)
    assert isinstance(request, message.SipRequest)
    assert trying_bytes(request) == make_response(request, 100).serialize()


def test_a_built_response_serialises_with_its_content_length_last() -> None:
    request = parse_message(REQUESTS[0])
    assert isinstance(request, message.SipRequest)
    response = make_response(request, 200, to_tag="t", body=b"v=0\r\n",
                             headers=[("Server", "pbx")])
    wire = response.serialize()
    head, body = wire.split(b"\r\n\r\n")
    assert body == b"v=0\r\n"
    assert head.split(b"\r\n")[-2:] == [b"Content-Type: application/sdp",
                                         b"Content-Length: 5"]
    again = parse_message(wire)
    assert again.headers.items() == [*response.headers.items(), ("Content-Length", "5")]


def test_stamp_via_leaves_a_matching_sent_by_alone_and_stamps_others() -> None:
    request = parse_message(REQUESTS[0])
    assert isinstance(request, message.SipRequest)
    before = request.headers.items()
    message.stamp_via(request, "127.0.0.1", 5061)
    assert request.headers.items() == before
    message.stamp_via(request, "10.0.0.9", 5061)
    assert request.via.received == "10.0.0.9" and request.via.rport is None


@pytest.mark.parametrize("line", [b"A=x", b"a:x", b"ab=x", b"=x", b"\xc3\xa9=x", b"a"])
def test_sdp_lines_not_of_the_type_equals_value_form_are_refused(line: bytes) -> None:
    with pytest.raises(SdpError, match="bad SDP line"):
        sdp.parse_sdp(b"v=0\r\n" + line + b"\r\n")


def test_sdp_lines_split_on_crlf_and_bare_lf_alike() -> None:
    body = (b"v=0\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\nc=IN IP4 10.0.0.1\r\n\r\nt=0 0\n"
            b"m=audio 4000 RTP/AVP 0\r\n")
    parsed = sdp.parse_sdp(body)
    assert parsed.connection == "10.0.0.1" and parsed.media[0].port == 4000
    assert parsed.origin == "- 1 1 IN IP4 10.0.0.1"


class _Recording:
    """Stands for a fast path's pattern: records what it was asked to match."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self.pattern = pattern
        self.asked: list[str] = []

    def fullmatch(self, text: str) -> re.Match[str] | None:
        self.asked.append(text)
        return self.pattern.fullmatch(text)


def test_long_values_skip_the_fast_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """A long value that fails the fast pattern at its end would pay for the match and
    then for the general parser: only short ones try it (grammar.FAST_PATH_MAX_LEN)."""
    via_re = _Recording(via._VIA_SIMPLE_RE)
    params_re = _Recording(grammar._SIMPLE_PARAMS_RE)
    monkeypatch.setattr(via, "_VIA_SIMPLE_RE", via_re)
    monkeypatch.setattr(grammar, "_SIMPLE_PARAMS_RE", params_re)
    short = "SIP/2.0/UDP h;branch=z9hG4bK1;rport"
    long = short + ";rport=1" * (grammar.FAST_PATH_MAX_LEN // 8) + ';q="x"'
    assert via.parse_via.__wrapped__(short).branch == "z9hG4bK1"  # type: ignore[attr-defined]
    assert via_re.asked == [short]
    assert via.parse_via.__wrapped__(long).params["q"] == '"x"'  # type: ignore[attr-defined]
    assert via_re.asked == [short] and all(len(t) <= grammar.FAST_PATH_MAX_LEN
                                           for t in params_re.asked)
    params = ";p=1" * grammar.FAST_PATH_MAX_LEN
    assert grammar.parse_params(params) == {"p": "1"}
    assert grammar.parse_params(";p=1") == {"p": "1"}
    assert params_re.asked[-1] == ";p=1" and params not in params_re.asked

"""SIP message parsing, serialisation and building (pbx.sip.message), with the pieces it
parses through: headers, URIs and name-addrs, Via, the shared grammar."""

from __future__ import annotations

import pytest

from pbx.sip.errors import SipError
from pbx.sip.headers import Headers
from pbx.sip.message import (
    SipRequest,
    SipResponse,
    make_ack,
    make_cancel,
    make_response,
    new_branch,
    new_call_id,
    new_tag,
    parse_message,
)
from pbx.sip.uri import parse_name_addr, parse_uri
from pbx.sip.via import parse_via

INVITE = (
    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKnashds8\r\n"
    b"Via: SIP/2.0/UDP proxy.example.com:5062;branch=z9hG4bK77;received=10.0.0.1\r\n"
    b"Max-Forwards: 70\r\n"
    b'To: "Bob" <sip:bob@biloxi.example.com>\r\n'
    b"From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@pc33.atlanta.example.com>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 4\r\n"
    b"\r\n"
    b"v=0\n"
)

COMPACT = (
    b"\r\n\r\n"  # keep-alive CRLFs before the message
    b"OPTIONS sip:carol@chicago.example.com SIP/2.0\r\n"
    b"v: SIP/2.0/UDP host.example.com;branch=z9hG4bKabc, SIP/2.0/TCP h2.example.com\r\n"
    b"t: <sip:carol@chicago.example.com>\r\n"
    b"f: <sip:alice@atlanta.example.com>\r\n"
    b"  ;tag=88\r\n"
    b"i: compact-1\r\n"
    b"CSeq: 1\r\n"
    b"\tOPTIONS\r\n"
    b"m: <sip:a@h1>, \"x, y\" <sip:b@h2;lr>\r\n"
    b"k: timer, replaces\r\n"
    b"l: 0\r\n"
    b"\r\n"
)


def test_parse_invite() -> None:
    msg = parse_message(INVITE)
    assert isinstance(msg, SipRequest)
    assert msg.method == "INVITE"
    assert msg.uri == "sip:bob@biloxi.example.com"
    assert msg.call_id == "a84b4c76e66710@pc33.atlanta.example.com"
    assert msg.cseq == (314159, "INVITE")
    assert msg.branch == "z9hG4bKnashds8"
    assert msg.from_tag == "1928301774"
    assert msg.to_tag is None
    assert msg.body == b"v=0\n"
    assert msg.headers.get("content-type") == "application/sdp"
    assert len(msg.headers.get_all("Via")) == 2


def test_compact_forms_and_folding() -> None:
    msg = parse_message(COMPACT)
    assert isinstance(msg, SipRequest)
    h = msg.headers
    assert h.get("Call-ID") == "compact-1"
    assert "i" in h and "Call-ID" in h and "call-id" in h
    assert msg.cseq == (1, "OPTIONS")
    assert msg.from_tag == "88"
    assert h.get_all("Via") == [
        "SIP/2.0/UDP host.example.com;branch=z9hG4bKabc",
        "SIP/2.0/TCP h2.example.com",
    ]
    assert h.get_all("Contact") == ["<sip:a@h1>", '"x, y" <sip:b@h2;lr>']
    assert h.get_all("Supported") == ["timer", "replaces"]
    names = [n for n, _ in h.items()]
    assert names == ["Via", "To", "From", "Call-ID", "CSeq", "Contact", "Supported",
                     "Content-Length"]


def test_lf_only_message() -> None:
    data = INVITE.replace(b"\r\n", b"\n")
    msg = parse_message(data)
    assert isinstance(msg, SipRequest)
    assert msg.body == b"v=0\n"


def test_missing_content_length_takes_rest_of_datagram() -> None:
    data = INVITE.replace(b"Content-Length: 4\r\n", b"") + b"more"
    msg = parse_message(data)
    assert msg.body == b"v=0\nmore"


def test_longer_body_truncated_shorter_rejected() -> None:
    assert parse_message(INVITE + b"garbage").body == b"v=0\n"
    with pytest.raises(SipError) as exc:
        parse_message(INVITE[:-2])
    assert exc.value.status == 400


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n\r\n",
        b"   \r\n",
        b"INVITE sip:a@b\r\n\r\n",
        b"INVITE sip:a@b SIP/2.0 extra\r\n\r\n",
        b"SIP/2.0 abc OK\r\n\r\n",
        b"SIP/2.0 99 Low\r\n\r\n",
        b"SIP/3.0 200 OK\r\n\r\n",
        INVITE.replace(b"CSeq: 314159 INVITE", b"CSeq: x INVITE"),
        INVITE.replace(b"CSeq: 314159 INVITE", b"CSeq: 314159 BYE"),
        INVITE.replace(b"CSeq: 314159 INVITE", b"CSeq: 4294967296 INVITE"),
        INVITE.replace(b"Content-Length: 4", b"Content-Length: four"),
        INVITE.replace(b"Content-Length: 4", b"Content-Length: -4"),
        INVITE.replace(b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n", b""),
        INVITE.replace(b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKnashds8\r\n"
                       b"Via: SIP/2.0/UDP proxy.example.com:5062;branch=z9hG4bK77;"
                       b"received=10.0.0.1\r\n", b""),
        INVITE.replace(b"From: Alice", b"From: \"Alice"),
        INVITE.replace(b"Max-Forwards: 70", b"Max-Forwards: seventy"),
        INVITE.replace(b"Max-Forwards: 70", b"Max-Forwards"),
        INVITE.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\r\nTo: <sip:x@y>\r\n"),
    ],
)
def test_malformed_raises_400(data: bytes) -> None:
    with pytest.raises(SipError) as exc:
        parse_message(data)
    assert exc.value.status == 400


def test_request_with_other_version_is_505() -> None:
    with pytest.raises(SipError) as exc:
        parse_message(INVITE.replace(b" SIP/2.0\r\n", b" SIP/3.0\r\n", 1))
    assert exc.value.status == 505


def test_max_forwards_optional() -> None:
    msg = parse_message(INVITE.replace(b"Max-Forwards: 70\r\n", b""))
    assert "Max-Forwards" not in msg.headers


def test_response_parse() -> None:
    data = (
        b"SIP/2.0 180 Ringing\r\n"
        b"Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bKx;rport=5070;received=1.2.3.4\r\n"
        b"To: <sip:b@h>;tag=t1\r\nFrom: <sip:a@h>;tag=f1\r\nCall-ID: c\r\n"
        b"CSeq: 2 INVITE\r\nContent-Length: 0\r\n\r\n"
    )
    msg = parse_message(data)
    assert isinstance(msg, SipResponse)
    assert (msg.status, msg.reason) == (180, "Ringing")
    assert msg.to_tag == "t1" and msg.from_tag == "f1"
    via = msg.via
    assert via.rport == 5070 and via.received == "1.2.3.4" and via.port == 5060


def test_empty_reason_phrase() -> None:
    msg = parse_message(
        b"SIP/2.0 100 \r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nTo: <sip:b@h>\r\n"
        b"From: <sip:a@h>;tag=1\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n\r\n"
    )
    assert isinstance(msg, SipResponse) and msg.reason == ""


@pytest.mark.parametrize("data", [INVITE, COMPACT])
def test_serialize_parse_round_trip(data: bytes) -> None:
    first = parse_message(data)
    wire = first.serialize()
    second = parse_message(wire)
    assert second == first
    assert second.serialize() == wire
    assert wire.endswith(b"\r\n\r\n" + first.body)


def test_serialize_sets_content_length() -> None:
    req = SipRequest("MESSAGE", "sip:a@b", Headers([("Content-Length", "99")]), b"hello")
    wire = req.serialize()
    assert b"Content-Length: 5\r\n" in wire and b"99" not in wire
    assert wire.startswith(b"MESSAGE sip:a@b SIP/2.0\r\n")
    resp = SipResponse(200, "OK", Headers(), b"")
    assert resp.serialize() == b"SIP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"


def test_parse_byte_by_byte_prefixes_never_crash() -> None:
    for i in range(len(INVITE)):
        try:
            parse_message(INVITE[:i])
        except SipError:
            pass


def test_utf8_and_binary_round_trip() -> None:
    data = INVITE.replace(b'"Bob"', '"Bj\u00f6rn \u2603"'.encode()).replace(
        b"Content-Length: 4", b"Content-Length: 5"
    ).replace(b"v=0\n", b"\x00\xff\r\n\x01")
    msg = parse_message(data)
    assert parse_name_addr(msg.headers.get("To") or "").display == "Bj\u00f6rn \u2603"
    assert msg.body == b"\x00\xff\r\n\x01"
    assert parse_message(msg.serialize()).body == msg.body


# ------------------------------------------------------------------ Headers


def test_headers_api() -> None:
    h = Headers()
    h.add("www-authenticate", 'Digest realm="a"')
    h.add("CALL-ID", "x")
    h.add("cseq", "1 INVITE")
    h.add("X-Custom", "1")
    h.add("x-custom", "2")
    assert [n for n, _ in h.items()] == ["WWW-Authenticate", "Call-ID", "CSeq", "X-Custom",
                                         "X-Custom"]
    assert h.get_all("x-CUSTOM") == ["1", "2"]
    h.set("X-Custom", "3")
    assert h.get_all("X-Custom") == ["3"]
    c = h.copy()
    c.remove("x-custom")
    assert "X-Custom" in h and "X-Custom" not in c
    assert h.get("nothing") is None
    h.add("Route", "<sip:p1;lr>, <sip:p2;lr>")
    h.add("Route", "<sip:p3;lr>")
    assert h.get_all("Route") == ["<sip:p1;lr>", "<sip:p2;lr>", "<sip:p3;lr>"]
    h.add("Allow", "INVITE, ACK,BYE")
    assert h.get_all("Allow") == ["INVITE", "ACK", "BYE"]


def test_headers_set_first_replaces_only_the_first_line_in_place() -> None:
    h = Headers([("Via", "v1"), ("x-odd", "a"), ("Via", "v2"), ("X-ODD", "b")])
    h.set_first("via", "v1b")
    h.set_first("X-Odd", "a2")
    h.set_first("Route", "nothing to replace")
    assert h.items() == [("Via", "v1b"), ("x-odd", "a2"), ("Via", "v2"), ("x-odd", "b")]
    assert h.count("Via") == 2 and "Route" not in h


# ------------------------------------------------------------------ URIs, name-addr, Via


def test_parse_uri_full() -> None:
    u = parse_uri("sip:alice:secret@atlanta.example.com:5061;transport=tcp;lr?subject=x&a=b")
    assert (u.scheme, u.user, u.password, u.host, u.port) == (
        "sip", "alice", "secret", "atlanta.example.com", 5061)
    assert u.params == {"transport": "tcp", "lr": None}
    assert u.headers == {"subject": "x", "a": "b"}
    assert str(u) == "sip:alice:secret@atlanta.example.com:5061;transport=tcp;lr?subject=x&a=b"


@pytest.mark.parametrize(
    "text",
    [
        "sip:atlanta.example.com",
        "sips:+1555@[2001:db8::1]:5061;user=phone",
        "sip:[::1]",
        "sip:user%20name@h",
        "sip:user;par=u%40example.net@example.com",
        "tel:+15551234;phone-context=example.com",
        "sip:10.0.0.1:5060;lr",
    ],
)
def test_uri_round_trip(text: str) -> None:
    assert str(parse_uri(text)) == text


def test_uri_ipv6_and_escapes() -> None:
    u = parse_uri("sip:%61lice@[::1]:5070")
    assert u.user == "%61lice" and u.host == "[::1]" and u.port == 5070
    assert parse_uri("SIP:a@b").scheme == "sip"
    t = parse_uri("tel:+1555")
    assert not t.is_sip and t.host == "+1555"


@pytest.mark.parametrize(
    "text",
    ["", "sip:", "nocolon", "sip:a@", "sip:@host", "sip:a b@c", "sip:a@h:99999", "sip:a@h:x",
     "sip:a@[::1", "sip:a@h;;lr", "<sip:a@b>", "1sip:a@b", "sip:a@h?x"],
)
def test_bad_uris(text: str) -> None:
    with pytest.raises(SipError):
        parse_uri(text)


def test_parse_name_addr_forms() -> None:
    na = parse_name_addr(r'"Quoted \"name\"" <sip:a@b;lr>;tag=x;q=0.5')
    assert na.display == 'Quoted "name"'
    assert na.uri.params == {"lr": None}
    assert na.params == {"tag": "x", "q": "0.5"}
    assert na.tag == "x"
    assert parse_name_addr(str(na)) == na
    bare = parse_name_addr("sip:a@b;tag=x")
    assert bare.display is None and bare.uri.params == {} and bare.params == {"tag": "x"}
    assert str(bare) == "<sip:a@b>;tag=x"
    tokens = parse_name_addr("Alice Smith<sip:a@b>")
    assert tokens.display == "Alice Smith"
    assert parse_name_addr("  < sip:a@b >  ").uri.host == "b"
    assert parse_name_addr("<tel:+1555>;tag=9").uri.scheme == "tel"


@pytest.mark.parametrize("text", ['"unterminated <sip:a@b>', "<sip:a@b", "sip:a@b;;tag=1",
                                  '"x" sip:a@b', ""])
def test_bad_name_addr(text: str) -> None:
    with pytest.raises(SipError):
        parse_name_addr(text)


def test_parse_via() -> None:
    v = parse_via("SIP / 2.0 / udp  10.1.2.3 : 5060 ; branch = z9hG4bK1 ;rport;received=1.1.1.1")
    assert (v.transport, v.host, v.port) == ("UDP", "10.1.2.3", 5060)
    assert v.branch == "z9hG4bK1" and v.received == "1.1.1.1"
    assert v.rport is None and v.wants_rport
    assert str(v) == "SIP/2.0/UDP 10.1.2.3:5060;branch=z9hG4bK1;rport;received=1.1.1.1"
    v6 = parse_via("SIP/2.0/TCP [2001:db8::9]:5061;branch=z9hG4bK2;rport=7000")
    assert v6.host == "[2001:db8::9]" and v6.port == 5061 and v6.rport == 7000
    assert parse_via(str(v6)) == v6
    assert parse_via("SIP/2.0/UDP h").branch == ""


@pytest.mark.parametrize("text", ["SIP/2.0 UDP h", "SIP/2.0/UDP", "SIP/2.0/UDP h;;", "HTTP/1.1/TCP h",
                                  "SIP/2.0/UDP h:port", "SIP/2.0/UDP h;branch="])
def test_bad_via(text: str) -> None:
    with pytest.raises(SipError):
        parse_via(text)


# ------------------------------------------------------------------ building


def test_make_response_copies_headers() -> None:
    req = parse_message(INVITE)
    assert isinstance(req, SipRequest)
    resp = make_response(req, 486, to_tag="abc", headers=[("Retry-After", "30")])
    assert (resp.status, resp.reason) == (486, "Busy Here")
    assert resp.headers.get_all("Via") == req.headers.get_all("Via")
    assert resp.headers.get("From") == req.headers.get("From")
    assert resp.headers.get("To") == '"Bob" <sip:bob@biloxi.example.com>;tag=abc'
    assert resp.to_tag == "abc"
    assert resp.call_id == req.call_id and resp.cseq == req.cseq
    assert resp.headers.get("Retry-After") == "30"
    assert "Contact" not in resp.headers and "Content-Type" not in resp.headers
    again = parse_message(resp.serialize())
    assert isinstance(again, SipResponse) and again.status == 486


def test_make_response_keeps_existing_to_tag_and_sets_body() -> None:
    req = parse_message(INVITE.replace(b'"Bob" <sip:bob@biloxi.example.com>',
                                       b"<sip:bob@biloxi.example.com>;tag=old"))
    assert isinstance(req, SipRequest)
    resp = make_response(req, 200, to_tag="new", body=b"v=0\r\n", content_type="application/sdp")
    assert resp.to_tag == "old"
    assert resp.reason == "OK"
    assert resp.headers.get("Content-Type") == "application/sdp"
    assert b"Content-Length: 5" in resp.serialize()
    assert make_response(req, 299).reason == "Unknown"
    assert make_response(req, 200, "Fine").reason == "Fine"


def test_make_ack_and_cancel() -> None:
    req = parse_message(INVITE.replace(b"Max-Forwards: 70\r\n",
                                       b"Max-Forwards: 70\r\nRoute: <sip:p1;lr>\r\n"))
    assert isinstance(req, SipRequest)
    resp = make_response(req, 404, to_tag="tt")
    ack = make_ack(req, resp)
    assert ack.method == "ACK" and ack.uri == req.uri
    assert ack.cseq == (314159, "ACK")
    assert ack.headers.get_all("Via") == [req.headers.get_all("Via")[0]]
    assert ack.to_tag == "tt" and ack.from_tag == req.from_tag
    assert ack.headers.get_all("Route") == ["<sip:p1;lr>"]
    cancel = make_cancel(req)
    assert cancel.cseq == (314159, "CANCEL") and cancel.branch == req.branch
    assert cancel.to_tag is None
    assert isinstance(parse_message(ack.serialize()), SipRequest)
    assert isinstance(parse_message(cancel.serialize()), SipRequest)


def test_random_ids() -> None:
    b1, b2 = new_branch(), new_branch()
    assert b1.startswith("z9hG4bK") and b1 != b2
    assert new_tag() != new_tag()
    assert new_call_id("pbx.example.com").endswith("@pbx.example.com")


def test_stamp_via_received_and_rport() -> None:
    """RFC 3581 §4 / RFC 3261 §18.2.1: only the top Via is stamped."""
    from pbx.sip.message import stamp_via

    def req(via: str) -> SipRequest:
        msg = parse_message(
            ("OPTIONS sip:x@h SIP/2.0\r\nVia: " + via + "\r\nVia: SIP/2.0/UDP 10.9.9.9;rport\r\n"
             "From: <sip:a@h>;tag=1\r\nTo: <sip:x@h>\r\nCall-ID: c\r\nCSeq: 1 OPTIONS\r\n"
             "Content-Length: 0\r\n\r\n").encode())
        assert isinstance(msg, SipRequest)
        return msg

    r = req("SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;rport")
    stamp_via(r, "192.0.2.7", 40000)
    assert r.via.received == "192.0.2.7" and r.via.rport == 40000
    assert r.headers.get_all("Via")[1] == "SIP/2.0/UDP 10.9.9.9;rport"
    r = req("SIP/2.0/TCP 192.0.2.7:5060;branch=z9hG4bK1")
    before = r.serialize()
    stamp_via(r, "192.0.2.7", 40000)
    assert r.serialize() == before  # same host, no rport: untouched
    r = req("SIP/2.0/UDP host.example.com;branch=z9hG4bK1, SIP/2.0/UDP 10.1.1.1")
    stamp_via(r, "192.0.2.7", 5060)
    assert r.via.received == "192.0.2.7" and r.via.rport is None
    assert r.headers.get_all("Via")[1] == "SIP/2.0/UDP 10.1.1.1"

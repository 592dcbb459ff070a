"""Malformed input gets the layer's declared error, never a 500 (issue 8, "Errors that
escape"): regression tests for the findings, each failing at 2554a5d.

`str.isdigit()` accepts "²" (and `\\d` "٣"), so numbers that passed the check made
`int()` raise ValueError: Session-Expires and INFO Duration answered 500 with a
traceback, an SDP offer 500, and a 200 OK whose SDP had one left a B-leg confirmed
and never bridged. `tts.decode_wav` and the RTCP parser raised `struct.error`; error
texts quoted whole 60 KB headers.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from media.rtcp import RtcpError, parse_compound
from pbx import messages as m
from pbx.sip import sdp
from pbx.sip.digest import parse_auth_params
from pbx.sip.errors import SdpError, SipError
from pbx.sip.fields import parse_session_expires
from pbx.sip.framing import FramingError, StreamFramer
from pbx.sip.message import SipRequest, make_response, parse_message
from pbx.sip.via import parse_via
from pbx.tts import TtsError, decode_wav
from tests.calls.rig import CALLER, MEMBERS, SDP, CoreRig, caller_invite, first_then
from tests.test_registrar import Phone, make_registrar

SUPERSCRIPT_TWO = "\u00b2"  # "²": str.isdigit() is True, int() raises ValueError
ARABIC_THREE = "\u0663"  # "٣": matched by \d and read by int() as 3

_OFFER = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
          "m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
          "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=ptime:20\r\n")
# Each number of the offer in turn (the one after this text) replaced.
_NUMBER_SPOTS = ["m=audio 40000", "RTP/AVP 0", "rtpmap:0", "PCMU/8000", "fmtp:101",
                 "ptime:20"]


def _bad_offer(spot: str, digit: str = SUPERSCRIPT_TWO) -> bytes:
    assert spot in _OFFER
    prefix = spot.rstrip("0123456789")
    return _OFFER.replace(spot, prefix + digit, 1).encode()


# ------------------------------------------------------------------ through the call core


def test_session_expires_superscript_gets_400_not_500(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([]))
    rig.feed(caller_invite(f"Session-Expires: {SUPERSCRIPT_TWO}\r\nSupported: timer\r\n"),
             CALLER)
    statuses = rig.statuses()
    assert 400 in statuses and 500 not in statuses, statuses
    assert not rig.core.ctx.table.calls
    # the front goes on: the next call is answered
    rig.sip.clear()
    rig.feed(caller_invite(branch="2"), CALLER)
    assert 200 in rig.statuses()


def test_info_duration_superscript_keeps_the_digit(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([]))
    rig.answered()
    rig.caller_request("INFO", 2, body=f"Signal=5\r\nDuration={SUPERSCRIPT_TWO}\r\n".encode(),
                       content_type="application/dtmf-relay")
    assert rig.last(2).status == 200
    info = rig.of(m.MediaDtmfInfo)
    assert [(i.digit, i.duration_ms) for i in info] == [("5", 100)]
    rig.caller_request("INFO", 3, body=b"Signal=5\r\nDuration=99999999999\r\n",
                       content_type="application/dtmf-relay")
    assert rig.last(3).status == 200
    rig.caller_request("INFO", 4, body=f"Signal={SUPERSCRIPT_TWO}\r\n".encode(),
                       content_type="application/dtmf-relay")
    assert rig.last(4).status == 400


@pytest.mark.parametrize("spot", [s for s in _NUMBER_SPOTS if s != "ptime:20"])  # was 488
def test_offer_with_superscript_number_gets_488_not_500(tmp_path: Path, spot: str) -> None:
    rig = CoreRig(tmp_path, first_then([]))
    invite = caller_invite().replace(SDP, b"")
    body = _bad_offer(spot)
    invite = invite.replace(b"Content-Length: %d" % len(SDP),
                            b"Content-Length: %d" % len(body)) + body
    rig.feed(invite, CALLER)
    final = [status for status in rig.statuses() if status >= 200]
    assert final in ([200], [488]), final  # a number we can do without is no error


def test_b_leg_answer_with_bad_sdp_is_hung_up_not_left_confirmed(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.TransferCommand(target="2001")]))
    rig.call()
    invite = rig.requests("INVITE", MEMBERS["2001"])[0]
    rig.caller_request("ACK", 1)
    ok = make_response(invite, 200, to_tag="b1", body=_bad_offer("m=audio 40000"),
                       headers=[("Contact", "<sip:2001@127.0.0.1:6001>")],
                       content_type="application/sdp")
    rig.feed(ok, MEMBERS["2001"])
    assert rig.requests("BYE", MEMBERS["2001"])
    assert not rig.of(m.MediaBridge)


def test_register_expires_of_thousands_of_digits_is_clamped_not_500() -> None:
    registrar = make_registrar()
    phone = Phone("1001", "secret1")
    resp = phone.register(registrar, 1000.0, ["<sip:1001@192.0.2.5>"],
                          extra="Expires: " + "9" * 5000)
    assert resp.status == 200
    resp = phone.register(registrar, 1000.0, ["<sip:1001@192.0.2.5>"],
                          extra=f"Expires: {ARABIC_THREE}600")
    assert resp.status == 400


# ------------------------------------------------------------------ the parsers


@pytest.mark.parametrize("spot", _NUMBER_SPOTS)
@pytest.mark.parametrize("digit", [SUPERSCRIPT_TWO, ARABIC_THREE, "1" * 5000])
def test_sdp_numbers_are_ascii_digits(spot: str, digit: str) -> None:
    """Each number of an offer made unreadable: SdpError (488), or, for a number the
    negotiation can do without (another format, a ptime), the rest still read."""
    body = _bad_offer(spot, digit)
    for read in (lambda: sdp.answer_offer(body, "192.0.2.1", 4000, 1)[0],
                 lambda: sdp.parse_answer(body)):
        try:
            negotiated = read()
        except SdpError as exc:
            assert exc.status == 488 and len(str(exc)) < 200
        else:
            assert spot != "m=audio 40000"
            assert negotiated.remote_port == 40000 and negotiated.codec == "PCMU"
    assert sdp.origin_of(_OFFER.replace("1 1 IN", f"{digit} 1 IN").encode()) is None


_BASE = ["INVITE sip:a@b SIP/2.0", "Via: SIP/2.0/UDP h;branch=z9hG4bK1", "Max-Forwards: 70",
         "To: <sip:a@b>", "From: <sip:c@d>;tag=1", "Call-ID: x", "CSeq: 3 INVITE"]


def _request(header: str, value: str) -> bytes:
    """A valid request with `header`'s value replaced (or the header added)."""
    lines = [line for line in _BASE if not line.startswith(header + ":")]
    lines.append(f"{header}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")


@pytest.mark.parametrize(("header", "value"), [
    ("CSeq", f"{ARABIC_THREE} INVITE"), ("Content-Length", "\u0660"),
    ("Max-Forwards", f"{ARABIC_THREE}0"), ("Via", f"SIP/2.0/UDP h:{ARABIC_THREE}060"),
])
def test_sip_numbers_are_ascii_digits(header: str, value: str) -> None:
    with pytest.raises(SipError):
        parse_message(_request(header, value))


def test_via_rport_superscript_is_not_a_port() -> None:
    via = parse_via(f"SIP/2.0/UDP h;branch=z9hG4bK1;rport={SUPERSCRIPT_TWO}")
    assert via.rport is None and via.wants_rport
    assert parse_via("SIP/2.0/UDP h;rport=" + "9" * 5000).rport is None
    assert parse_via("SIP/2.0/UDP h;rport=5062").rport == 5062


def _extensible_fmt_cut(at: int) -> bytes:
    """A WAV whose WAVE_FORMAT_EXTENSIBLE fmt chunk declares 40 bytes but the file
    ends `at` bytes into it."""
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 1, 8000, 16000, 2, 16, 22, 16, 4)
    fmt += struct.pack("<H", 1) + bytes(14)
    return b"RIFF" + struct.pack("<I", 4 + 8 + 40) + b"WAVE" + b"fmt " \
        + struct.pack("<I", 40) + fmt[:at]


@pytest.mark.parametrize("at", [16, 20, 24, 25])
def test_decode_wav_truncated_fmt_raises_tts_error(at: int) -> None:
    with pytest.raises(TtsError):
        decode_wav(_extensible_fmt_cut(at))


@pytest.mark.parametrize("packet_type", [200, 201])
def test_rtcp_report_without_ssrc_raises_rtcp_error(packet_type: int) -> None:
    # an empty RR, then a report whose length word says 0: no room for its SSRC
    data = struct.pack("!BBHI", 0x80, 201, 1, 0x1234) + struct.pack("!BBH", 0x80, packet_type, 0)
    with pytest.raises(RtcpError):
        parse_compound(data)


def test_framing_limit_answers_the_same_however_segmented() -> None:
    """A header section past the limit is 413 whether its end came in the same segment
    (it was 400, for its Content-Lengths) or not."""
    head = (b"INVITE sip:a@b SIP/2.0\r\nContent-Length: 1\r\nl: 2\r\n"
            + b"X: " + b"y" * 3000 + b"\r\n\r\n")
    statuses = []
    for segment in (len(head), 1000):
        framer = StreamFramer(2048)
        with pytest.raises(FramingError) as raised:
            for i in range(0, len(head), segment):
                framer.receive_data(head[i : i + segment])
                framer.next_event()
        statuses.append(raised.value.status)
    assert statuses == [413, 413]


# ------------------------------------------------------------------ short error texts

_LONG = 60_000


@pytest.mark.parametrize(("header", "value"), [
    ("Via", "SIP/2.0/UDP " + "h" * _LONG + "!"),
    ("Via", "SIP/2.0/UDP h;branch=" + '"' * (_LONG + 1)),
    ("From", "<sip:" + "a" * _LONG),
    ("To", '"' + "d" * _LONG + "<sip:a@b>"),
    ("CSeq", "1 " + "M" * _LONG),
    ("Max-Forwards", "7" * _LONG),
    ("Content-Length", "x" * _LONG),
    # bytes that are not UTF-8 are 6 characters each in a repr (found by the fuzzer)
    ("From", "<sip:a@b?x" + "\udcff" * _LONG + ">;tag=1"),
])
def test_sip_error_texts_quote_an_excerpt(header: str, value: str) -> None:
    """They are logged and sent back in the 400's reason phrase."""
    with pytest.raises(SipError) as raised:
        parse_message(_request(header, value))
    assert len(str(raised.value)) < 200


def test_other_error_texts_quote_an_excerpt() -> None:
    texts = []
    for parse, data in [
        (sdp.parse_sdp, b"v=0\r\nm=audio " + b"9" * _LONG + b" RTP/AVP 0\r\n"),
        (lambda d: sdp.answer_offer(d, "192.0.2.1", 4000, 1),
         _OFFER.replace("IN IP4 127.0.0.1\r\nt=", "IN IP4 " + "1." * _LONG + "\r\nt=").encode()),
    ]:
        with pytest.raises(SdpError) as raised:
            parse(data)
        texts.append(str(raised.value))
    for value in ["Digest " + "a" * _LONG, "Digest x=" + '"' + "q" * _LONG,
                  "Digest " + "n" * _LONG + "=,"]:
        with pytest.raises(SipError) as raised_auth:
            parse_auth_params(value)
        texts.append(str(raised_auth.value))
    framer = StreamFramer()
    framer.receive_data(b"INVITE sip:a@b SIP/2.0\r\nContent-Length: " + b"1" * 30_000
                        + b"\r\n\r\n")
    with pytest.raises(FramingError) as raised_framing:
        framer.next_event()
    texts.append(str(raised_framing.value))
    assert all(len(t) < 200 for t in texts), [len(t) for t in texts]


def test_request_with_superscript_session_expires_parses() -> None:
    """The message itself is well formed: only the front's reading of the value fails,
    with a SipError carrying 400."""
    msg = parse_message(caller_invite(f"Session-Expires: {SUPERSCRIPT_TWO}\r\n"))
    assert isinstance(msg, SipRequest)
    with pytest.raises(SipError) as raised:
        parse_session_expires(msg.headers.get("Session-Expires") or "")
    assert raised.value.status == 400

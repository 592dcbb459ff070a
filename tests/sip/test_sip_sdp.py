"""SDP parsing and offer/answer (pbx.sip.sdp)."""

from __future__ import annotations

import pytest

from pbx.sip.errors import SdpError, SipError
from pbx.sip.sdp import Negotiated, answer_offer, make_offer, parse_answer, parse_sdp


def offer(m_line: str, *attrs: str, conn: str = "c=IN IP4 192.0.2.10", extra: str = "") -> bytes:
    lines = ["v=0", "o=alice 2890844526 2890844526 IN IP4 192.0.2.10", "s=-", conn, "t=0 0",
             m_line, *attrs]
    return ("\r\n".join(lines) + "\r\n" + extra).encode()


def lines_of(sdp: bytes) -> list[str]:
    return sdp.decode().split("\r\n")


def test_parse_sdp() -> None:
    sd = parse_sdp(offer("m=audio 49170 RTP/AVP 0 8 97 101", "a=rtpmap:97 iLBC/8000",
                         "a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-15", "a=ptime:30",
                         "a=sendonly", "c=IN IP4 192.0.2.99"))
    assert sd.connection == "192.0.2.10"
    assert sd.origin == "alice 2890844526 2890844526 IN IP4 192.0.2.10"
    (md,) = sd.media
    assert (md.media, md.port, md.proto, md.formats) == ("audio", 49170, "RTP/AVP", [0, 8, 97, 101])
    assert md.rtpmap == {97: ("iLBC", 8000), 101: ("telephone-event", 8000)}
    assert md.encoding(0) == ("PCMU", 8000) and md.encoding(8) == ("PCMA", 8000)
    assert md.fmtp == {101: "0-15"}
    assert md.ptime == 30 and md.direction == "sendonly" and md.connection == "192.0.2.99"


def test_session_level_direction_applies_to_media() -> None:
    sd = parse_sdp(offer("m=audio 1 RTP/AVP 0", conn="c=IN IP4 1.2.3.4\r\na=inactive"))
    assert sd.media[0].direction == "inactive"


@pytest.mark.parametrize("body", [b"", b"hello", b"v=0\r\nm=audio x RTP/AVP 0\r\n",
                                  b"v=0\r\nc=IN IP4\r\n", b"v=0\r\nthis is not sdp\r\n",
                                  b"v=1\r\n", b"v=0\r\nm=audio 99999 RTP/AVP 0\r\n"])
def test_garbage_raises_sdp_error(body: bytes) -> None:
    with pytest.raises(SdpError) as exc:
        parse_sdp(body)
    assert exc.value.status == 488
    assert isinstance(exc.value, SipError)


def test_answer_pcmu_first() -> None:
    neg, ans = answer_offer(offer("m=audio 49170 RTP/AVP 0 8 101",
                                  "a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-16"),
                            "10.0.0.5", 20000, 42)
    assert neg == Negotiated("PCMU", 0, 101, 20, "192.0.2.10", 49170, "sendrecv")
    assert lines_of(ans) == [
        "v=0",
        "o=pbx 42 42 IN IP4 10.0.0.5",
        "s=pbx",
        "c=IN IP4 10.0.0.5",
        "t=0 0",
        "m=audio 20000 RTP/AVP 0 101",
        "a=rtpmap:0 PCMU/8000",
        "a=rtpmap:101 telephone-event/8000",
        "a=fmtp:101 0-16",
        "a=ptime:20",
        "a=sendrecv",
        "",
    ]
    # the answer is itself valid SDP that parse_answer reads back
    back = parse_answer(ans)
    assert (back.codec, back.payload_type, back.dtmf_payload_type, back.remote_port) == (
        "PCMU", 0, 101, 20000)


def test_answer_offerers_order_wins() -> None:
    neg, _ = answer_offer(offer("m=audio 4000 RTP/AVP 8 0"), "10.0.0.5", 20000, 1)
    assert neg.codec == "PCMA" and neg.payload_type == 8 and neg.dtmf_payload_type is None


def test_answer_pcma_only_with_te_96_and_ptime_30() -> None:
    neg, ans = answer_offer(
        offer("m=audio 4000 RTP/AVP 18 8 96", "a=rtpmap:18 G729/8000",
              "a=rtpmap:96 telephone-event/8000", "a=ptime:30"),
        "10.0.0.5", 20002, 7,
    )
    assert neg == Negotiated("PCMA", 8, 96, 30, "192.0.2.10", 4000, "sendrecv")
    text = lines_of(ans)
    assert "m=audio 20002 RTP/AVP 8 96" in text
    assert "a=rtpmap:96 telephone-event/8000" in text and "a=fmtp:96 0-16" in text
    assert "a=ptime:30" in text
    assert not any("G729" in line for line in text)


def test_answer_dynamic_pcmu_payload_type() -> None:
    neg, _ = answer_offer(offer("m=audio 4000 RTP/AVP 110", "a=rtpmap:110 pcmu/8000"),
                          "10.0.0.5", 20000, 1)
    assert neg.codec == "PCMU" and neg.payload_type == 110


@pytest.mark.parametrize(
    ("offered", "answered"),
    [("sendonly", "recvonly"), ("recvonly", "sendonly"), ("inactive", "inactive"),
     ("sendrecv", "sendrecv")],
)
def test_answer_direction(offered: str, answered: str) -> None:
    neg, ans = answer_offer(offer("m=audio 4000 RTP/AVP 0", f"a={offered}"), "10.0.0.5", 2, 1)
    assert neg.direction == answered
    assert f"a={answered}" in lines_of(ans)


def test_answer_rejects_other_streams_keeping_m_line_count() -> None:
    body = offer("m=video 5000 RTP/AVP 31", "a=rtpmap:31 H261/90000",
                 extra="m=audio 4000 RTP/AVP 0\r\nc=IN IP4 192.0.2.77\r\n")
    neg, ans = answer_offer(body, "10.0.0.5", 20000, 1)
    assert neg.remote_ip == "192.0.2.77" and neg.remote_port == 4000
    ms = [line for line in lines_of(ans) if line.startswith("m=")]
    assert ms == ["m=video 0 RTP/AVP 31", "m=audio 20000 RTP/AVP 0"]


@pytest.mark.parametrize(
    "body",
    [
        offer("m=audio 4000 RTP/AVP 18 9", "a=rtpmap:18 G729/8000"),
        offer("m=video 4000 RTP/AVP 31"),
        offer("m=audio 0 RTP/AVP 0"),
        offer("m=audio 4000 RTP/SAVP 0"),
        offer("m=audio 4000 RTP/AVP 96", "a=rtpmap:96 PCMU/16000"),
    ],
)
def test_no_common_codec_is_488(body: bytes) -> None:
    with pytest.raises(SdpError) as exc:
        answer_offer(body, "10.0.0.5", 20000, 1)
    assert exc.value.status == 488


@pytest.mark.parametrize("conn", ["c=IN IP4 224.0.0.1", "c=IN IP4 239.1.2.3/16",
                                  "c=IN IP4 255.255.255.255", "c=IN IP6 ff02::1"])
def test_a_media_address_that_is_not_unicast_is_488(conn: str) -> None:
    """RTP to a multicast or broadcast address reaches everybody on it, not the caller."""
    with pytest.raises(SdpError) as exc:
        answer_offer(offer("m=audio 4000 RTP/AVP 0", conn=conn), "10.0.0.5", 20000, 1)
    assert exc.value.status == 488


def test_hold_by_the_unspecified_address_is_still_answered() -> None:
    answered = answer_offer(offer("m=audio 4000 RTP/AVP 0", conn="c=IN IP4 0.0.0.0"),
                            "10.0.0.5", 20000, 1)
    assert answered is not None  # RFC 2543 hold (RFC 3264 §8.4)


def test_answer_supported_restricts() -> None:
    with pytest.raises(SdpError):
        answer_offer(offer("m=audio 4000 RTP/AVP 0"), "10.0.0.5", 2, 1, supported=("PCMA",))


def test_make_offer_and_parse_answer() -> None:
    sdp = make_offer("10.0.0.5", 30000, 99, ptime_ms=30)
    sd = parse_sdp(sdp)
    (md,) = sd.media
    assert md.formats == [0, 8, 101, 13] and md.ptime == 30 and md.port == 30000
    assert md.rtpmap[13] == ("CN", 8000)  # RFC 3389 §5, offered with its rtpmap
    assert md.fmtp == {101: "0-16"}
    assert sd.connection == "10.0.0.5"
    answer = offer("m=audio 7000 RTP/AVP 8 101", "a=rtpmap:101 telephone-event/8000",
                   "a=recvonly")
    neg = parse_answer(answer)
    assert neg == Negotiated("PCMA", 8, 101, 20, "192.0.2.10", 7000, "sendonly")
    with pytest.raises(SdpError):
        parse_answer(offer("m=audio 7000 RTP/AVP 18"))
    with pytest.raises(SdpError):
        parse_answer(offer("m=audio 0 RTP/AVP 0"))


def test_comfort_noise_is_answered_only_when_offered() -> None:
    """RFC 3389 §5: CN (static payload type 13, or a dynamic one by rtpmap) goes into
    the answer and the negotiation only when the offer has it."""
    neg, ans = answer_offer(offer("m=audio 49170 RTP/AVP 0 101 13",
                                  "a=rtpmap:101 telephone-event/8000", "a=rtpmap:13 CN/8000"),
                            "10.0.0.5", 20000, 42)
    assert neg.cn_payload_type == 13
    assert "m=audio 20000 RTP/AVP 0 101 13" in lines_of(ans)
    assert "a=rtpmap:13 CN/8000" in lines_of(ans)
    assert parse_answer(ans).cn_payload_type == 13
    neg, ans = answer_offer(offer("m=audio 49170 RTP/AVP 8 13"), "10.0.0.5", 20000, 42)
    assert neg.cn_payload_type == 13  # static: no rtpmap needed
    neg, ans = answer_offer(offer("m=audio 49170 RTP/AVP 0 98", "a=rtpmap:98 CN/8000"),
                            "10.0.0.5", 20000, 42)
    assert neg.cn_payload_type == 98 and "a=rtpmap:98 CN/8000" in lines_of(ans)
    neg, ans = answer_offer(offer("m=audio 49170 RTP/AVP 0 101",
                                  "a=rtpmap:101 telephone-event/8000"), "10.0.0.5", 20000, 42)
    assert neg.cn_payload_type is None and b"CN" not in ans
    assert parse_answer(offer("m=audio 7000 RTP/AVP 0")).cn_payload_type is None


def test_ipv6_answer() -> None:
    _, ans = answer_offer(offer("m=audio 4000 RTP/AVP 0", conn="c=IN IP6 2001:db8::1"),
                          "2001:db8::5", 20000, 3)
    assert "c=IN IP6 2001:db8::5" in lines_of(ans)


def test_fuzz_sdp_only_sdp_error() -> None:
    import random

    rng = random.Random(3264)
    seed = offer("m=audio 49170 RTP/AVP 0 8 101", "a=rtpmap:101 telephone-event/8000",
                 "a=fmtp:101 0-16", "a=ptime:20", "a=sendrecv")
    tokens = [b"\r\n", b" ", b"/", b":", b"=", b"-1", b"99999999999", b"inf", b"nan", b"\xff",
              b"m=audio ", b"a=rtpmap:", b"a=ptime:", b"c=IN IP4 "]
    for _ in range(2000):
        buf = bytearray(seed)
        for _ in range(rng.randint(1, 5)):
            pos = rng.randrange(len(buf) + 1)
            if rng.random() < 0.5:
                buf[pos:pos] = rng.choice(tokens)
            else:
                del buf[pos : pos + rng.randint(1, 6)]
        try:
            answer_offer(bytes(buf), "10.0.0.5", 20000, 1)
        except SdpError:
            pass
        try:
            parse_answer(bytes(buf))
        except SdpError:
            pass

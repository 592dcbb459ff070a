"""Write the seed corpora of the fuzz targets into tests/fuzz/seeds/ (committed).

    python -m tests.fuzz.make_seeds

Seeds are valid inputs that reach deep into each parser: the fuzzer mutates them.
The SIP targets also start from the RFC 4475 torture messages in tests/fixtures.
A second run writes the same bytes, but for the random salt of the digest nonces.
"""

from __future__ import annotations

import struct
from pathlib import Path

from media.rtp import RtpPacket, build_event, build_rtp
from media.wav import pcm_header
from pbx.sip.digest import digest_response
from pbx.sip.grammar import quote_string
from tests.fuzz.targets import (
    DIGEST_NOW,
    DIGEST_REALM,
    DIGEST_USERS,
    LOCAL_IP,
    SEEDS,
    _authenticator,
)

_OFFER = (
    "v=0\r\no=alice 2890844526 2890844526 IN IP4 198.51.100.1\r\ns=-\r\n"
    "c=IN IP4 198.51.100.1\r\nt=0 0\r\n"
    "m=audio 49170 RTP/AVP 0 8 18 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:18 G729/8000\r\na=fmtp:18 annexb=no\r\na=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-16\r\na=ptime:20\r\na=sendrecv\r\n"
)
SDP = {
    "offer.sdp": _OFFER,
    "video.sdp": (
        "v=0\r\no=- 1 2 IN IP6 2001:db8::1\r\ns=call\r\nc=IN IP6 2001:db8::1\r\nt=0 0\r\n"
        "a=sendonly\r\nm=video 5004 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
        "m=audio 5006 RTP/SAVP 8\r\nm=audio 5008 RTP/AVPF 8 0\r\nc=IN IP4 203.0.113.5/127\r\n"
        "a=ptime:30.0\r\na=recvonly\r\n"
    ),
    "hold.sdp": "v=0\no=x 7 9 IN IP4 0.0.0.0\ns= \nc=IN IP4 0.0.0.0\nm=audio 0 RTP/AVP 0\n"
                "a=inactive\n",
}

_INVITE_HEAD = (
    "INVITE sip:*99@pbx.example;user=phone SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bK776asdhds;rport\r\n"
    "Via: SIP/2.0/TCP [2001:db8::9]:5070;branch=z9hG4bKx;received=203.0.113.1\r\n"
    "Max-Forwards: 70\r\n"
    'To: "PBX" <sip:*99@pbx.example>\r\n'
    'From: "Alice \\"A\\"" <sip:alice@example.com;transport=tcp>;tag=1928301774\r\n'
    "Call-ID: a84b4c76e66710@198.51.100.1\r\n"
    "CSeq: 314159 INVITE\r\n"
    "Contact: <sip:alice@198.51.100.1:5060;ob>;expires=60, sip:alt@example.com;q=0.5\r\n"
    "Route: <sip:proxy.example;lr>\r\n"
    "Supported: timer, replaces\r\n"
    "Session-Expires: 1800;refresher=uac\r\n"
    "Allow: INVITE, ACK, BYE, CANCEL, OPTIONS, INFO, UPDATE, REFER\r\n"
    "Content-Type: application/sdp\r\n"
)


def _invite() -> str:
    return f"{_INVITE_HEAD}Content-Length: {len(_OFFER)}\r\n\r\n{_OFFER}"


def _info(body: str, ctype: str) -> str:
    return (
        "INFO sip:pbx@pbx.example SIP/2.0\r\n"
        "v: SIP/2.0/TCP 198.51.100.1;branch=z9hG4bK-2\r\n"
        "f: <sip:a@example.com>;tag=1\r\nt: <sip:pbx@pbx.example>;tag=2\r\n"
        f"i: c2\r\nCSeq: 2 INFO\r\nc: {ctype}\r\nl: {len(body)}\r\n\r\n{body}"
    )


def _authorization(user: str, *, qop: bool = True, algorithm: str = "SHA-256") -> str:
    nonce = _authenticator.nonces.make(DIGEST_NOW)
    uri = f"sip:{DIGEST_REALM}"
    response = digest_response(
        algorithm=algorithm, username=user, realm=DIGEST_REALM,
        password=DIGEST_USERS.get(user, "x"), method="REGISTER", uri=uri, nonce=nonce,
        qop="auth" if qop else None, nc="00000001" if qop else None,
        cnonce="0a4f113b" if qop else None,
    )
    text = (f"Digest username={quote_string(user)}, realm={quote_string(DIGEST_REALM)}, "
            f"nonce={quote_string(nonce)}, uri={quote_string(uri)}, "
            f"response={quote_string(response)}, algorithm={algorithm}")
    if qop:
        text += ', qop=auth, nc=00000001, cnonce="0a4f113b", opaque="x\\"y, z"'
    return text


def _sip() -> dict[str, str]:
    register = (
        "REGISTER sip:pbx.example SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 198.51.100.1:5060;branch=z9hG4bKreg\r\n"
        "Max-Forwards: 70\r\nTo: <sip:alice@pbx.example>\r\n"
        "From: <sip:alice@pbx.example>;tag=456248\r\nCall-ID: 843817637684230@998sdasdh09\r\n"
        "CSeq: 1826 REGISTER\r\nContact: <sip:alice@198.51.100.1>;expires=3600\r\n"
        "Expires: 7200\r\n"
        f"Authorization: {_authorization('alice')}\r\nContent-Length: 0\r\n\r\n"
    )
    ok = (
        "SIP/2.0 200 OK\r\n"
        f"Via: SIP/2.0/UDP {LOCAL_IP}:5060;branch=z9hG4bKout;received=198.51.100.1;rport=5062\r\n"
        "To: <sip:bob@example.com>;tag=8321234356\r\nFrom: <sip:pbx@pbx.example>;tag=1\r\n"
        "Call-ID: out-1\r\nCSeq: 1 INVITE\r\nContact: <sip:bob@198.51.100.2>\r\n"
        "Record-Route: <sip:p1.example;lr>, <sip:p2.example;lr>\r\n"
        f"Content-Type: application/sdp\r\nContent-Length: {len(_OFFER)}\r\n\r\n{_OFFER}"
    )
    return {
        "invite.sip": _invite(),
        "register.sip": register,
        "ok.sip": ok,
        "info-relay.sip": _info("Signal=5\r\nDuration=160\r\n", "application/dtmf-relay"),
        "info-dtmf.sip": _info("#", "application/dtmf"),
        "options-tcp.sip": _info("", "text/plain").replace("INFO", "OPTIONS") * 2,
    }


def _digest() -> dict[str, str]:
    challenge = _authenticator.challenge(DIGEST_NOW)
    return {
        "auth-sha256.txt": _authorization("alice"),
        "auth-md5.txt": _authorization("alice", algorithm="MD5"),
        "auth-2069.txt": _authorization("bob", qop=False, algorithm="MD5"),
        "auth-unknown.txt": _authorization("mallory"),
        "auth-ext.txt": _authorization("alice").replace(
            'username="alice"', "username*=UTF-8''%c3%a4lice"),
        "challenges.txt": "\n".join(value for _, value in challenge),
    }


def _rtp() -> dict[str, bytes]:
    plain = RtpPacket(0, 1234, 160, 0x11223344, bytes(range(160)), marker=True)
    full = RtpPacket(8, 65535, 2**32 - 1, 7, b"\xd5" * 20, csrcs=(1, 2),
                     extension=(0xBEDE, b"\x10\xff\x00\x00"), padding=4)
    return {"pcmu.rtp": build_rtp(plain), "csrc-ext-pad.rtp": build_rtp(full)}


def _rtcp() -> dict[str, bytes]:
    sr = struct.pack("!BBHIIIIII", 0x81, 200, 12, 0x1234, 1, 2, 3, 4, 5)
    block = struct.pack("!IIIIII", 0x5678, (3 << 24) | 0xFFFFFE, 70000, 12, 13, 14)
    sdes = struct.pack("!BBHIBB", 0x81, 202, 2, 0x1234, 1, 2) + b"ab"
    rr = struct.pack("!BBHI", 0x81, 201, 7, 0x1234) + block
    bye = struct.pack("!BBHI", 0x81, 203, 1, 0x1234)
    return {"sr.rtcp": sr + block + sdes, "rr-bye.rtcp": rr + bye}


def _rfc4733() -> dict[str, bytes]:
    out = b""
    for ts, digit in ((8000, 5), (9600, 11)):
        for duration, end in ((160, False), (320, False), (480, True), (480, True)):
            out += struct.pack("!IB", ts, 4) + build_event(digit, end, 10, duration)
    return {"press.bin": out}


def _wav() -> dict[str, bytes]:
    pcm16 = pcm_header(1, 8000, 8) + struct.pack("<4h", 0, 1000, -1000, 32767)
    stereo8 = pcm_header(2, 22050, 4, bits=8) + b"\x80\x00\xff\x10"
    fmt_float = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)
    float32 = (b"RIFF" + struct.pack("<I", 4 + 8 + 16 + 8 + 8) + b"WAVE"
               + b"fmt " + struct.pack("<I", 16) + fmt_float
               + b"data" + struct.pack("<I", 8) + struct.pack("<2f", 0.5, -1.0))
    guid = struct.pack("<H", 1) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    fmt_ext = struct.pack("<HHIIHHHHI", 0xFFFE, 1, 8000, 16000, 2, 16, 22, 16, 4) + guid
    extensible = (b"RIFF" + struct.pack("<I", 4 + 8 + 40 + 8 + 4) + b"WAVE"
                  + b"fmt " + struct.pack("<I", 40) + fmt_ext
                  + b"LIST" + struct.pack("<I", 0)
                  + b"data" + struct.pack("<I", 0xFFFFFFFF) + b"\x01\x00\x02\x00")
    alaw = bytearray(pcm_header(1, 8000, 3, bits=8) + b"\xd5\xd5\x55")
    alaw[20:22] = struct.pack("<H", 6)
    return {"pcm16.wav": pcm16, "stereo8.wav": stereo8, "float32.wav": float32,
            "extensible.wav": extensible, "alaw.wav": bytes(alaw)}


def main() -> None:
    corpora: dict[str, dict[str, str] | dict[str, bytes]] = {
        "sip": _sip(), "sdp": SDP, "digest": _digest(), "rtp": _rtp(), "rtcp": _rtcp(),
        "rfc4733": _rfc4733(), "wav": _wav(),
    }
    for target, files in corpora.items():
        folder: Path = SEEDS / target
        folder.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            data = content.encode("utf-8") if isinstance(content, str) else content
            (folder / name).write_bytes(data)
        print(f"{folder}: {len(files)} seeds")


if __name__ == "__main__":
    main()

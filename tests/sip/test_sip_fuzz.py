"""Seeded fuzz: mutated valid messages either parse or raise SipError, nothing else
(h11's fuzz/afl-server.py idea, bounded and deterministic)."""

from __future__ import annotations

import random
from pathlib import Path

from pbx.sip.errors import SipError
from pbx.sip.message import SipRequest, SipResponse, parse_message
from pbx.sip.uri import parse_name_addr
from pbx.sip.via import parse_via

# The RFC 4475 torture messages, vendored with their README and licence.
CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "rfc4475"

SEEDS = [
    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKnashds8;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b'To: "Bob" <sip:bob@biloxi.example.com>\r\n'
    b"From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
    b"Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@[::1]:5060;transport=udp>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 10\r\n\r\n"
    b"v=0\r\no=- 1\r\n",
    b"SIP/2.0 200 OK\r\n"
    b"v: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK1;received=1.2.3.4;rport=5060\r\n"
    b"t: <sip:b@h>;tag=x\r\nf: sip:a@h;tag=y\r\ni: abc\r\nCSeq: 1 INVITE\r\nl: 0\r\n\r\n",
]
TOKENS = [b"\r\n", b" ", b"\t", b":", b";", b",", b"<", b">", b'"', b"\\", b"@", b"=", b"%",
          b"[", b"]", b"\x00", b"\xff", b"SIP/2.0", b"99999999999999999999", b"-1", b"\r\n ",
          b"\r\n\r\n", b"z9hG4bK", b"sip:", b"Via: ", b"Content-Length: 5\r\n"]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            del buf[pos : pos + rng.randint(1, 8)]
        elif op == 1:
            buf[pos:pos] = rng.choice(TOKENS)
        elif op == 2 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 3:
            buf = buf[:pos]
        elif op == 4 and buf:
            end = min(len(buf), pos + rng.randint(1, 40))
            buf[pos:pos] = buf[pos:end]
        else:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    return bytes(buf)


def test_fuzz_only_sip_error() -> None:
    rng = random.Random(4475)
    seeds = list(SEEDS) + [p.read_bytes() for p in sorted(CORPUS.glob("*.dat"))]
    parsed = rejected = 0
    for _ in range(2500):
        data = _mutate(rng, rng.choice(seeds))
        try:
            msg = parse_message(data)
        except SipError:
            rejected += 1
            continue
        parsed += 1
        # what parsed can be used without surprises
        assert isinstance(msg, SipRequest | SipResponse)
        msg.cseq, msg.branch, msg.from_tag, msg.to_tag, msg.call_id  # noqa: B018
        for via in msg.headers.get_all("Via"):
            parse_via(via)
        again = parse_message(msg.serialize())
        assert again.cseq == msg.cseq and again.body == msg.body
        for contact in msg.headers.get_all("Contact"):
            try:
                parse_name_addr(contact)
            except SipError:
                pass
    assert parsed > 100 and rejected > 100


def test_random_bytes_only_sip_error() -> None:
    rng = random.Random(7)
    for _ in range(500):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
        try:
            parse_message(data)
        except SipError:
            pass

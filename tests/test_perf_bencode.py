"""perf/bencode.py: the bencode codec the rtpengine peer benchmark speaks ng with."""

from __future__ import annotations

import pytest

from perf.bencode import MAX_DEPTH, BencodeError, decode, encode


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (0, b"i0e"),
        (-42, b"i-42e"),
        (b"", b"0:"),
        (b"spam", b"4:spam"),
        ("offer", b"5:offer"),
        ([], b"le"),
        ([b"a", 1, [b"b"]], b"l1:ai1el1:bee"),
        ({}, b"de"),
        # keys sorted as raw bytes (BEP 3), whatever order the dict has
        ({"sdp": "v=0", "command": "offer"}, b"d7:command5:offer3:sdp3:v=0e"),
        ({"codec": {"transcode": ["PCMA"]}}, b"d5:codecd9:transcodel4:PCMAeee"),
    ],
)
def test_known_byte_strings(value: object, wire: bytes) -> None:
    assert encode(value) == wire  # type: ignore[arg-type]


def test_round_trip() -> None:
    value = {
        b"command": b"answer",
        b"call-id": b"bench-7",
        b"flags": [b"trust-address", b"no-rtcp-attribute"],
        b"ports": [30000, -1, 2**40],
        b"nested": {b"deep": [[{b"x": b"\x00\xff binary"}]]},
    }
    assert decode(encode(value)) == value


def test_reply_from_rtpengine() -> None:
    # An ng reply's body as rtpengine sends it (after the cookie and a space).
    reply = b"d3:sdp21:v=0\r\nc=IN IP4 1.2.3.46:result2:oke"
    assert decode(reply) == {b"sdp": b"v=0\r\nc=IN IP4 1.2.3.4", b"result": b"ok"}


@pytest.mark.parametrize(
    "wire",
    [
        b"",
        b"i12",  # unterminated integer
        b"ie",  # no digits
        b"i-0e",
        b"i012e",
        b"i1.5e",
        b"i" + b"9" * 30 + b"e",  # absurd integer
        b"5:spam",  # string shorter than announced
        b"05:spams",  # leading zero in a length
        b"-1:x",
        b"4spam",  # no colon
        b"l1:a",  # unterminated list
        b"d1:ae",  # key without a value
        b"di1e1:ae",  # integer key
        b"d1:ai1e1:ai2ee",  # duplicate key
        b"i1ei2e",  # trailing data
        b"x",
        b"l" * (MAX_DEPTH + 5) + b"e" * (MAX_DEPTH + 5),  # nesting bound
    ],
)
def test_malformed_input_raises_its_own_error(wire: bytes) -> None:
    with pytest.raises(BencodeError):
        decode(wire)


def test_every_truncation_of_a_reply_raises() -> None:
    wire = encode({"result": "ok", "sdp": "v=0", "list": [1, [b"x"]]})
    for cut in range(len(wire)):
        with pytest.raises(BencodeError):
            decode(wire[:cut])


@pytest.mark.parametrize("value", [True, 1.5, None, {1: b"x"}, {"a": 1, b"a": 2}])
def test_unencodable_values_raise(value: object) -> None:
    with pytest.raises(BencodeError):
        encode(value)  # type: ignore[arg-type]

"""RTP header and RFC 4733 payload parsing/building; modular arithmetic."""

from __future__ import annotations

import pytest

from media.rtp import (
    RtpError,
    RtpPacket,
    build_event,
    build_header,
    build_rtp,
    parse_event,
    parse_rtp,
    seq_add,
    seq_diff,
    seq_newer,
    ts_add,
    ts_diff,
    ts_newer,
)

# A PCMU packet captured from a softphone: marker, pt 0, seq 0x1234, ts 0xDEADBEEF.
WIRE = bytes.fromhex("80801234deadbeef0a0b0c0d") + bytes([0xFF] * 160)


def test_parse_captured_packet() -> None:
    p = parse_rtp(WIRE)
    assert (p.payload_type, p.sequence, p.timestamp, p.ssrc) == (0, 0x1234, 0xDEADBEEF, 0x0A0B0C0D)
    assert p.marker and p.payload == bytes([0xFF] * 160)
    assert p.csrcs == () and p.extension is None and p.padding == 0
    assert build_rtp(p) == WIRE
    assert build_header(0, 0x1234, 0xDEADBEEF, 0x0A0B0C0D, marker=True) == WIRE[:12]


@pytest.mark.parametrize(
    "packet",
    [
        RtpPacket(8, 65535, 2**32 - 1, 1, b"\xd5" * 240),
        RtpPacket(101, 7, 8, 9, b"\x01\x8a\x03\x20", marker=True, csrcs=(1, 2, 3)),
        RtpPacket(0, 1, 2, 3, b"abc", extension=(0xBEDE, b"\x10\xaa\x00\x00")),
        RtpPacket(0, 1, 2, 3, b"abcd", padding=4, csrcs=(5,), extension=(1, b"")),
        RtpPacket(127, 0, 0, 0, b""),
    ],
)
def test_round_trip(packet: RtpPacket) -> None:
    data = build_rtp(packet)
    assert parse_rtp(data) == packet
    if not packet.padding:  # trailing data is payload, not an error
        assert parse_rtp(data + b"xy").payload == packet.payload + b"xy"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "shorter"),
        (WIRE[:11], "shorter"),
        (bytes([0x40]) + WIRE[1:], "version 1"),
        (bytes([0x00]) + WIRE[1:], "version 0"),
        (bytes([0x82]) + WIRE[1:12] + b"\x00\x00\x00\x01", "CSRC"),
        (bytes([0x90]) + WIRE[1:12] + b"\x00\x01", "extension"),
        (bytes([0x90]) + WIRE[1:12] + b"\x00\x01\x00\x05" + b"\x00" * 8, "extension"),
        (bytes([0xA0]) + WIRE[1:12] + b"ab\x00", "padding"),
        (bytes([0xA0]) + WIRE[1:12] + b"ab\x09", "padding"),
    ],
)
def test_bad_packets_raise(data: bytes, reason: str) -> None:
    with pytest.raises(RtpError):
        parse_rtp(data)


def test_every_prefix_either_parses_or_raises() -> None:
    data = build_rtp(RtpPacket(0, 1, 2, 3, b"abcd", padding=4, csrcs=(5,), extension=(1, b"1234")))
    for n in range(len(data)):
        try:
            parse_rtp(data[:n])
        except RtpError:
            pass


def test_build_rejects_bad_fields() -> None:
    with pytest.raises(RtpError):
        build_rtp(RtpPacket(0, 0, 0, 0, b"", csrcs=tuple(range(16))))
    with pytest.raises(RtpError):
        build_rtp(RtpPacket(128, 0, 0, 0, b""))
    with pytest.raises(RtpError):
        build_rtp(RtpPacket(0, 0, 0, 0, b"", extension=(1, b"abc")))


def test_telephone_event_payload() -> None:
    ev = parse_event(bytes.fromhex("0b8a0320"))  # '#', end, volume 10, duration 800
    assert (ev.event, ev.end, ev.volume, ev.duration) == (11, True, 10, 800)
    ev = parse_event(bytes.fromhex("05070050") + b"extra")
    assert (ev.event, ev.end, ev.volume, ev.duration) == (5, False, 7, 80)
    assert build_event(11, True, 10, 800) == bytes.fromhex("0b8a0320")
    with pytest.raises(RtpError):
        parse_event(b"\x01\x02\x03")


def test_modular_arithmetic() -> None:
    assert seq_add(65535, 1) == 0
    assert ts_add(2**32 - 160, 320) == 160
    assert seq_diff(0, 65535) == 1 and seq_diff(65535, 0) == -1
    assert seq_newer(3, 65530) and not seq_newer(65530, 3)
    assert ts_diff(100, 2**32 - 100) == 200
    assert ts_newer(5, 2**32 - 5) and not ts_newer(2**32 - 5, 5)
    assert not seq_newer(7, 7)

"""RTP packets (RFC 3550 §5.1), RFC 4733 telephone-event payloads, and modular arithmetic.

Pure functions over bytes: `parse_rtp` / `build_rtp` for the fixed header with
CSRCs and a header extension (kept opaque), `parse_event` for the 4-byte
telephone-event payload (RFC 4733 §2.3), and 16-bit sequence / 32-bit timestamp
helpers that survive wrap-around (RFC 3550 appendix A.1, RFC 1982 serial numbers).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

RTP_VERSION = 2
HEADER_SIZE = 12
SEQ_MOD = 1 << 16
TS_MOD = 1 << 32

_HEADER = struct.Struct("!BBHII")
_EVENT = struct.Struct("!BBH")


class RtpError(ValueError):
    """A datagram that is not a usable RTP packet (or event payload)."""


@dataclass(frozen=True, slots=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False
    csrcs: tuple[int, ...] = ()
    # (profile-defined 16 bits, extension data whose length is a multiple of 4)
    extension: tuple[int, bytes] | None = None
    padding: int = 0  # number of padding bytes that followed the payload


def parse_rtp(data: bytes) -> RtpPacket:
    """Bytes -> RtpPacket; RtpError when short, not version 2 or inconsistent."""
    if len(data) < HEADER_SIZE:
        raise RtpError(f"RTP packet of {len(data)} bytes is shorter than the 12-byte header")
    b0, b1, seq, ts, ssrc = _HEADER.unpack_from(data)
    version = b0 >> 6
    if version != RTP_VERSION:
        raise RtpError(f"RTP version {version}, expected 2")
    has_padding = bool(b0 & 0x20)
    has_extension = bool(b0 & 0x10)
    cc = b0 & 0x0F
    offset = HEADER_SIZE + 4 * cc
    if len(data) < offset:
        raise RtpError(f"RTP packet of {len(data)} bytes too short for {cc} CSRCs")
    csrcs = struct.unpack_from(f"!{cc}I", data, HEADER_SIZE) if cc else ()
    extension: tuple[int, bytes] | None = None
    if has_extension:
        if len(data) < offset + 4:
            raise RtpError("RTP header extension truncated")
        profile, words = struct.unpack_from("!HH", data, offset)
        end = offset + 4 + 4 * words
        if len(data) < end:
            raise RtpError(f"RTP header extension of {words} words truncated")
        extension = (profile, bytes(data[offset + 4 : end]))
        offset = end
    end = len(data)
    padding = 0
    if has_padding:
        # RFC 3550 §5.1: the last octet counts the padding octets, itself included.
        padding = data[-1]
        if padding == 0 or offset + padding > end:
            raise RtpError(f"RTP padding count {padding} is invalid")
        end -= padding
    return RtpPacket(
        payload_type=b1 & 0x7F,
        sequence=seq,
        timestamp=ts,
        ssrc=ssrc,
        payload=bytes(data[offset:end]),
        marker=bool(b1 & 0x80),
        csrcs=tuple(csrcs),
        extension=extension,
        padding=padding,
    )


def build_header(
    payload_type: int, sequence: int, timestamp: int, ssrc: int, marker: bool = False
) -> bytes:
    """The 12-byte fixed header with no CSRC, extension or padding (what the worker sends)."""
    return _HEADER.pack(
        0x80,
        (0x80 if marker else 0) | (payload_type & 0x7F),
        sequence % SEQ_MOD,
        timestamp % TS_MOD,
        ssrc & 0xFFFFFFFF,
    )


def build_rtp(packet: RtpPacket) -> bytes:
    """RtpPacket -> bytes, including CSRCs, extension and padding when present."""
    if len(packet.csrcs) > 15:
        raise RtpError(f"{len(packet.csrcs)} CSRCs, at most 15")
    if not 0 <= packet.payload_type <= 127:
        raise RtpError(f"payload type {packet.payload_type} out of range")
    b0 = 0x80 | len(packet.csrcs)
    if packet.padding:
        b0 |= 0x20
    if packet.extension is not None:
        b0 |= 0x10
    parts = [
        _HEADER.pack(
            b0,
            (0x80 if packet.marker else 0) | packet.payload_type,
            packet.sequence % SEQ_MOD,
            packet.timestamp % TS_MOD,
            packet.ssrc & 0xFFFFFFFF,
        )
    ]
    if packet.csrcs:
        parts.append(struct.pack(f"!{len(packet.csrcs)}I", *packet.csrcs))
    if packet.extension is not None:
        profile, ext = packet.extension
        if len(ext) % 4:
            raise RtpError(f"header extension of {len(ext)} bytes is not a multiple of 4")
        parts.append(struct.pack("!HH", profile, len(ext) // 4))
        parts.append(ext)
    parts.append(packet.payload)
    if packet.padding:
        if not 0 < packet.padding < 256:
            raise RtpError(f"padding {packet.padding} out of range 1-255")
        parts.append(bytes(packet.padding - 1) + bytes([packet.padding]))
    return b"".join(parts)


# ------------------------------------------------------------ RFC 4733 telephone-event


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    event: int  # 0-9 digits, 10 '*', 11 '#', 12-15 A-D, others (flash, tones) undefined here
    end: bool
    volume: int  # -dBm0, 0-63
    duration: int  # in timestamp units, from the event's start


def parse_event(payload: bytes) -> TelephoneEvent:
    """The first 4 bytes of an RFC 4733 §2.3 payload (later blocks, RFC 4733 §2.5.1.5, ignored)."""
    if len(payload) < 4:
        raise RtpError(f"telephone-event payload of {len(payload)} bytes, expected 4")
    event, flags, duration = _EVENT.unpack_from(payload)
    return TelephoneEvent(
        event=event, end=bool(flags & 0x80), volume=flags & 0x3F, duration=duration
    )


def build_event(event: int, end: bool, volume: int, duration: int) -> bytes:
    return _EVENT.pack(event & 0xFF, (0x80 if end else 0) | (volume & 0x3F), duration & 0xFFFF)


# ------------------------------------------------------------ modular arithmetic


def seq_add(seq: int, n: int) -> int:
    return (seq + n) % SEQ_MOD


def ts_add(ts: int, n: int) -> int:
    return (ts + n) % TS_MOD


def seq_diff(a: int, b: int) -> int:
    """a - b as a signed distance in (-2**15, 2**15]: positive when a is newer."""
    d = (a - b) % SEQ_MOD
    return d - SEQ_MOD if d > SEQ_MOD // 2 else d


def ts_diff(a: int, b: int) -> int:
    """a - b as a signed distance in (-2**31, 2**31]: positive when a is newer."""
    d = (a - b) % TS_MOD
    return d - TS_MOD if d > TS_MOD // 2 else d


def seq_newer(a: int, b: int) -> bool:
    return seq_diff(a, b) > 0


def ts_newer(a: int, b: int) -> bool:
    return ts_diff(a, b) > 0

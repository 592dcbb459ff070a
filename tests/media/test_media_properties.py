"""Property tests of the media-side parsers: RTP headers, RTCP compounds, RFC 4733
events and WAV files either parse or raise their declared error (RtpError,
RtcpError, WavError, TtsError), whatever the bytes.

The properties are the fuzz targets of tests/fuzz; hypothesis drives them with
inputs built from each format's fields (flags, counts and lengths that disagree
with the bytes that follow), deterministically.
"""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.fuzz import targets

PROPERTY = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

_u8 = st.integers(0, 255)
_u16 = st.integers(0, 0xFFFF)
_u32 = st.integers(0, 0xFFFFFFFF)


@PROPERTY
@given(_u8, _u8, _u16, _u32, _u32, st.binary(max_size=80))
def test_rtp_headers_parse_or_raise_rtp_error(b0: int, b1: int, seq: int, ts: int, ssrc: int,
                                              rest: bytes) -> None:
    for data in (struct.pack("!BBHII", b0, b1, seq, ts, ssrc) + rest,
                 struct.pack("!BBHII", 0x80 | (b0 & 0x3F), b1, seq, ts, ssrc) + rest):
        targets.rtp(data)


@st.composite
def _rtcp_packet(draw: st.DrawFn) -> bytes:
    """One packet of a compound, its length word mostly true to its body."""
    count = draw(st.integers(0, 3) | st.integers(0, 31))
    packet_type = draw(st.sampled_from([200, 201, 200, 201, 202, 203]) | _u8)
    words = draw(st.sampled_from([0, 1, 6, 7]) | st.integers(0, 13))
    body = draw(st.binary(min_size=4 * words, max_size=4 * words))
    length = draw(st.sampled_from([words, words, words, words + 1]) | _u16)
    version = draw(st.sampled_from([2, 2, 2, 0, 3]))
    return struct.pack("!BBH", version << 6 | count, packet_type, length) + body


@PROPERTY
@given(st.lists(_rtcp_packet(), min_size=1, max_size=4).map(b"".join))
# an RR, then an SR whose length word leaves no room for its SSRC (struct.error before)
@example(struct.pack("!BBHI", 0x80, 201, 1, 7) + struct.pack("!BBH", 0x80, 200, 0))
def test_rtcp_compounds_parse_or_raise_rtcp_error(data: bytes) -> None:
    targets.rtcp(data)


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from([0, 160, 2**32 - 160]) | _u32,
                          st.integers(0, 15) | _u8, st.booleans(), st.integers(0, 63), _u16,
                          st.integers(0, 7)), max_size=20))
def test_rfc4733_event_streams_parse_or_raise_rtp_error(
        packets: list[tuple[int, int, bool, int, int, int]]) -> None:
    data = b""
    for ts, event, end, volume, duration, size in packets:
        payload = struct.pack("!BBH", event, (0x80 if end else 0) | volume, duration)
        data += struct.pack("!IB", ts, size) + (payload * 2)[:size]
    targets.rfc4733(data)


@st.composite
def _wav(draw: st.DrawFn) -> bytes:
    """A RIFF/WAVE file whose fmt fields, chunk sizes and length are drawn freely."""
    tag = draw(st.sampled_from([1, 3, 6, 7, 0xFFFE, 0xFFFE, 0x55]))
    channels = draw(st.integers(0, 3) | _u16)
    rate = draw(st.sampled_from([8000, 22050, 999, 384_001]) | _u32)
    bits = draw(st.sampled_from([8, 16, 24, 32, 64, 12, 0]) | _u16)
    block = draw(st.integers(0, 8) | _u16)
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * max(block, 1) & 0xFFFFFFFF,
                      block, bits)
    if tag == 0xFFFE:
        fmt += struct.pack("<HHI", 22, bits, 4) + struct.pack("<H", draw(_u16)) \
            + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    fmt_size = draw(st.sampled_from([len(fmt), 16, 18, 40, 0]) | _u32)
    data = draw(st.binary(max_size=64))
    data_size = draw(st.sampled_from([len(data), 0, 0xFFFFFFFF]) | _u32)
    chunks = [b"fmt " + struct.pack("<I", fmt_size) + fmt,
              b"data" + struct.pack("<I", data_size) + data]
    if draw(st.integers(0, 3)) == 0:
        chunks.reverse()
    if draw(st.booleans()):
        chunks.insert(draw(st.integers(0, 2)), b"LIST" + struct.pack("<I", draw(_u32)) + b"x")
    body = b"WAVE" + b"".join(chunks)
    whole = b"RIFF" + struct.pack("<I", len(body)) + body
    # Cut short, often inside the first chunk's header fields.
    cut = draw(st.sampled_from([len(whole), 12 + 8 + 16, 12 + 8 + 24])
               | st.integers(12, 12 + 8 + len(fmt)) | st.integers(0, len(whole)))
    return whole[:cut]


@PROPERTY
@given(_wav())
def test_wav_files_parse_or_raise_wav_error(data: bytes) -> None:
    targets.wav(data)

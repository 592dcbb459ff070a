"""RTCP (RFC 3550 §6): receive statistics of one RTP source, and SR / RR / SDES packets.

`ReceiveStats` follows RFC 3550 appendix A: sequence-number tracking with
wrap-around, dropouts and misordering (A.1), expected / lost packets and the
loss fraction since the last report (A.3), and interarrival jitter (A.8), all
from the packets' own fields and a `now` passed in (seconds). `build_report`
turns the sender's counters and a `ReceiveStats` into a compound packet —
SR when we sent RTP since the previous report, else RR, then SDES CNAME, as
§6.1 requires — and `parse_compound` reads what a peer sends (SR sender info
for LSR/DLSR, report blocks about our stream).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

from media.kernels import rtpbatch as _k

RTCP_SR = 200
RTCP_RR = 201
RTCP_SDES = 202
RTCP_BYE = 203
SDES_CNAME = 1

# RFC 3550 §6.2: minimum interval 5 s; A.7: randomised over [0.5, 1.5] of it.
REPORT_INTERVAL_S = 5.0
# RFC 3550 §4: NTP timestamps count seconds from 1900-01-01.
NTP_EPOCH_OFFSET_S = 2_208_988_800

MAX_DROPOUT = 3000
MAX_MISORDER = 100
SEQ_MOD = 1 << 16

_HDR = struct.Struct("!BBH")
_SENDER_INFO = struct.Struct("!IIIIII")  # SSRC, NTP msw, NTP lsw, RTP ts, packets, octets
_BLOCK = struct.Struct("!IIIIII")  # SSRC, fraction+lost, ext seq, jitter, LSR, DLSR


class RtcpError(ValueError):
    """A datagram that is not a usable RTCP compound packet."""


class StatsTable:
    """`ReceiveStats` state of many sources, one row each (int64 and float64 columns of
    `media.kernels.rtpbatch`), so that a kernel can update every leg's row in one pass."""

    __slots__ = ("i", "f")

    def __init__(self, capacity: int = 1) -> None:
        self.i = np.zeros((capacity, _k.S_COLS), dtype=np.int64)
        self.f = np.zeros((capacity, _k.SF_COLS), dtype=np.float64)
        self.i[:, _k.S_SSRC] = -1
        self.i[:, _k.S_BAD] = SEQ_MOD + 1
        self.f[:, _k.SF_TRANSIT] = np.nan

    @classmethod
    def over(cls, i: np.ndarray, f: np.ndarray) -> StatsTable:
        table = cls.__new__(cls)
        table.i, table.f = i, f
        return table

    @property
    def capacity(self) -> int:
        return int(self.i.shape[0])

    def grow(self, capacity: int) -> None:
        old = StatsTable.over(self.i, self.f)
        fresh = StatsTable(capacity)
        fresh.i[: old.capacity] = old.i
        fresh.f[: old.capacity] = old.f
        self.i, self.f = fresh.i, fresh.f

    def reset(self, row: int) -> None:
        self.i[row] = 0
        self.i[row, _k.S_SSRC] = -1
        self.i[row, _k.S_BAD] = SEQ_MOD + 1
        self.f[row, _k.SF_JITTER] = 0.0
        self.f[row, _k.SF_TRANSIT] = np.nan


def _icol(col: int, doc: str) -> property:
    def get(self: ReceiveStats) -> int:
        return int(self._t.i[self._row, col])

    def put(self: ReceiveStats, value: int) -> None:
        self._t.i[self._row, col] = value

    return property(get, put, doc=doc)


class ReceiveStats:
    """RFC 3550 A.1/A.3/A.8 state for the one source a leg receives from: a row of a
    `StatsTable` (its own one-row table when made alone)."""

    __slots__ = ("_t", "_row", "lsr", "lsr_at")

    def __init__(self, table: StatsTable | None = None, row: int = 0) -> None:
        self._t = table if table is not None else StatsTable(1)
        self._row = row
        # From the last SR received: middle 32 bits of its NTP timestamp and when it came.
        self.lsr = 0
        self.lsr_at: float | None = None

    base_seq = _icol(_k.S_BASE, "first sequence number of the source")
    max_seq = _icol(_k.S_MAX, "highest sequence number seen")
    cycles = _icol(_k.S_CYCLES, "count of sequence-number wraps, times 2**16")
    bad_seq = _icol(_k.S_BAD, "the packet that would confirm a large jump")
    received = _icol(_k.S_RECEIVED, "packets received")
    expected_prior = _icol(_k.S_EXP_PRIOR, "expected at the last report")
    received_prior = _icol(_k.S_RECV_PRIOR, "received at the last report")

    @property
    def ssrc(self) -> int | None:
        v = int(self._t.i[self._row, _k.S_SSRC])
        return None if v < 0 else v

    @ssrc.setter
    def ssrc(self, value: int | None) -> None:
        self._t.i[self._row, _k.S_SSRC] = -1 if value is None else value

    @property
    def transit(self) -> float | None:
        """Last (arrival - timestamp), in timestamp units."""
        v = float(self._t.f[self._row, _k.SF_TRANSIT])
        return None if math.isnan(v) else v

    @transit.setter
    def transit(self, value: float | None) -> None:
        self._t.f[self._row, _k.SF_TRANSIT] = math.nan if value is None else value

    @property
    def jitter(self) -> float:
        """In timestamp units (A.8)."""
        return float(self._t.f[self._row, _k.SF_JITTER])

    @jitter.setter
    def jitter(self, value: float) -> None:
        self._t.f[self._row, _k.SF_JITTER] = value

    def update(self, seq: int, ssrc: int, now: float) -> None:
        """Count one packet (A.1 `update_seq`, without the probation of new sources)."""
        if self.ssrc != ssrc:
            # A new source (first packet, or the sender restarted): start over.
            self.ssrc = ssrc
            self._init_seq(seq)
            self.received = 1
            self.expected_prior = self.received_prior = 0
            self.transit = None
            self.jitter = 0.0
            return
        udelta = (seq - self.max_seq) % SEQ_MOD
        if udelta < MAX_DROPOUT:
            if seq < self.max_seq:
                self.cycles += SEQ_MOD  # wrapped
            self.max_seq = seq
        elif udelta <= SEQ_MOD - MAX_MISORDER:
            # A very large jump: believe it only when the next packet follows it.
            if seq == self.bad_seq:
                self._init_seq(seq)
            else:
                self.bad_seq = (seq + 1) % SEQ_MOD
                return
        # else: a duplicate or misordered packet, counted below
        self.received += 1

    def _init_seq(self, seq: int) -> None:
        self.base_seq = seq
        self.max_seq = seq
        self.bad_seq = SEQ_MOD + 1
        self.cycles = 0
        self.received = 0
        self.received_prior = 0
        self.expected_prior = 0

    def update_jitter(self, timestamp: int, now: float, clock_rate: int = 8000) -> None:
        """A.8: J += (|D(i-1, i)| - J) / 16, D from relative transit times (media packets only)."""
        transit = now * clock_rate - timestamp
        if self.transit is not None:
            d = abs(transit - self.transit)
            if d < 1 << 30:  # not a timestamp jump (a new talk spurt base, wrap)
                self.jitter += (d - self.jitter) / 16.0
        self.transit = transit

    @property
    def extended_max(self) -> int:
        return self.cycles + self.max_seq

    @property
    def expected(self) -> int:
        return self.extended_max - self.base_seq + 1 if self.ssrc is not None else 0

    @property
    def lost(self) -> int:
        """Cumulative packets lost (negative with duplicates), RFC 3550 A.3."""
        return self.expected - self.received

    def report_block(self, now: float) -> tuple[int, int, int, int, int, int]:
        """(ssrc, fraction lost, cumulative lost, extended highest seq, jitter, LSR, DLSR) as
        one RFC 3550 §6.4.1 block, and the interval counters move on (A.3)."""
        expected = self.expected
        expected_interval = expected - self.expected_prior
        self.expected_prior = expected
        received_interval = self.received - self.received_prior
        self.received_prior = self.received
        lost_interval = expected_interval - received_interval
        fraction = (
            0 if expected_interval == 0 or lost_interval <= 0
            else (lost_interval << 8) // expected_interval
        )
        lost = max(-(1 << 23), min((1 << 23) - 1, self.lost))
        dlsr = 0
        if self.lsr_at is not None:
            dlsr = int((now - self.lsr_at) * 65536) & 0xFFFFFFFF
        return (
            self.ssrc or 0,
            ((min(fraction, 255) & 0xFF) << 24) | (lost & 0xFFFFFF),
            self.extended_max & 0xFFFFFFFF,
            int(self.jitter) & 0xFFFFFFFF,
            self.lsr,
            dlsr,
        )


def ntp_timestamp(wallclock_s: float) -> tuple[int, int]:
    """Unix seconds -> 64-bit NTP timestamp as (seconds, fraction)."""
    t = wallclock_s + NTP_EPOCH_OFFSET_S
    sec = int(t)
    frac = int((t - sec) * (1 << 32)) & 0xFFFFFFFF
    return sec & 0xFFFFFFFF, frac


def _header(count: int, pt: int, body_len: int) -> bytes:
    # length: the packet's size in 32-bit words minus one (§6.4.1)
    return _HDR.pack(0x80 | count, pt, (4 + body_len) // 4 - 1)


def build_sdes_cname(ssrc: int, cname: str) -> bytes:
    text = cname.encode()[:255]
    chunk = struct.pack("!IBB", ssrc, SDES_CNAME, len(text)) + text + b"\x00"
    chunk += b"\x00" * (-len(chunk) % 4)  # null items to the 32-bit boundary (§6.5)
    return _header(1, RTCP_SDES, len(chunk)) + chunk


def build_report(
    ssrc: int,
    cname: str,
    now: float,
    wallclock_s: float,
    stats: ReceiveStats | None,
    sender: tuple[int, int, int] | None,
) -> bytes:
    """A compound RTCP packet: SR (with `sender` = (rtp timestamp now, packets, octets)) or RR
    (sender None), one report block when `stats` has heard a source, then SDES CNAME."""
    blocks = b""
    count = 0
    if stats is not None and stats.ssrc is not None:
        blocks = _BLOCK.pack(*stats.report_block(now))
        count = 1
    if sender is not None:
        msw, lsw = ntp_timestamp(wallclock_s)
        rtp_ts, packets, octets = sender
        body = (
            _SENDER_INFO.pack(
                ssrc, msw, lsw, rtp_ts & 0xFFFFFFFF, packets & 0xFFFFFFFF, octets & 0xFFFFFFFF
            )
            + blocks
        )
        first = _header(count, RTCP_SR, len(body)) + body
    else:
        body = struct.pack("!I", ssrc) + blocks
        first = _header(count, RTCP_RR, len(body)) + body
    return first + build_sdes_cname(ssrc, cname)


@dataclass(frozen=True, slots=True)
class ReportBlock:
    ssrc: int
    fraction_lost: int  # /256
    cumulative_lost: int
    extended_max_seq: int
    jitter: int  # timestamp units
    lsr: int
    dlsr: int


@dataclass(frozen=True, slots=True)
class RtcpReport:
    """The SR or RR of a compound packet (other packet types are skipped)."""

    ssrc: int
    sender: tuple[int, int, int, int, int] | None = None  # NTP msw, lsw, RTP ts, packets, octets
    blocks: tuple[ReportBlock, ...] = field(default=())


def parse_compound(data: bytes) -> list[RtcpReport]:
    """The SR and RR packets of a compound RTCP datagram; RtcpError if it is not RTCP."""
    out: list[RtcpReport] = []
    off = 0
    if len(data) < 8:
        raise RtcpError(f"RTCP packet of {len(data)} bytes is too short")
    while off + 4 <= len(data):
        b0, pt, length = _HDR.unpack_from(data, off)
        if b0 >> 6 != 2:
            raise RtcpError(f"RTCP version {b0 >> 6}, expected 2")
        size = 4 * (length + 1)
        if off + size > len(data):
            raise RtcpError("RTCP packet truncated")
        count = b0 & 0x1F
        if pt in (RTCP_SR, RTCP_RR):
            if size < 8:
                raise RtcpError("RTCP SR/RR without its SSRC")
            p = off + 4
            (ssrc,) = struct.unpack_from("!I", data, p)
            sender = None
            if pt == RTCP_SR:
                if size < 28:
                    raise RtcpError("RTCP SR too short")
                sender = tuple(_SENDER_INFO.unpack_from(data, p)[1:])
                p += 24
            else:
                p += 4
            blocks = []
            for _ in range(count):
                if p + 24 > off + size:
                    raise RtcpError("RTCP report block truncated")
                b_ssrc, fl, ext, jit, lsr, dlsr = _BLOCK.unpack_from(data, p)
                lost = fl & 0xFFFFFF
                if lost & 0x800000:
                    lost -= 1 << 24
                blocks.append(ReportBlock(b_ssrc, fl >> 24, lost, ext, jit, lsr, dlsr))
                p += 24
            out.append(RtcpReport(ssrc, sender, tuple(blocks)))  # type: ignore[arg-type]
        elif pt < 192 or pt > 223:
            raise RtcpError(f"RTCP packet type {pt} out of range")
        off += size
    return out

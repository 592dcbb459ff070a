"""Received audio of every leg, re-timed onto the worker's 20 ms tick: one ring per leg.

In-band DTMF detection (and recording) want 160 decoded samples per leg per
tick, but RTP arrives whenever the network delivers it, in packets of 10-60 ms
(the offer's ptime), sometimes reordered or lost. So each leg's G.711 codes are
written into a ring at the position their RTP timestamp gives (RFC 3550 §5.1:
the timestamp is the sampling instant), and each tick reads the next 160
samples of every leg at once, a fixed playout delay behind the first packet:

* reordering up to the delay is absorbed (the late packet still lands in its
  place before it is read) — the delay is one tick plus two packets, so a
  3-packet reorder window at any ptime;
* a lost packet leaves silence in its place (the ring is refilled with the
  leg's silence code as it is read), and the read says where that happened:
  each tick's `gaps` mark the 5 ms sub-blocks that hold a sample no packet
  wrote, so in-band detection can tell a lost packet from a pause in a tone;
* packets too late to be read (behind the read position) are dropped and
  counted; a run of them, or a timestamp jump beyond the ring (a new source, a
  sender whose clock ran away), re-anchors the leg's read position;
* unsent pauses are not gaps: a packet whose sequence number follows the
  newest one's directly but whose timestamp jumps ahead comes after a pause
  the sender made (silence suppression, RFC 3550 §5.1: only loss skips
  sequence numbers), so the samples of that pause still to be read are marked
  heard, as silence.

All legs' rings are rows of one uint16 array (the G.711 code in the low byte,
`RECEIVED` on what a packet wrote), so the tick's read is a single gather over
`calls × 160`. Codes stay G.711 here; the caller decodes the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from media.kernels import rtpbatch as _k

TICK_SAMPLES = _k.TICK_SAMPLES
RING_SAMPLES = _k.RING_SAMPLES  # 256 ms at 8 kHz; a power of two dividing 2**32 (timestamp wrap)
RECEIVED = _k.RECEIVED
GAP_SUB_SAMPLES = _k.GAP_SUB_SAMPLES
GAP_SUBS = _k.GAP_SUBS
_MASK = RING_SAMPLES - 1
_TS_MOD = 1 << 32
_HALF = 1 << 31
LATE_RUN_RESYNC = 3
_COLS = np.arange(TICK_SAMPLES, dtype=np.int64)


class RxFrames(NamedTuple):
    """One tick's read: codes uint8[legs, 160]; gaps bool[legs, 4], True where the
    5 ms sub-block holds a sample no packet wrote (lost, late, or not sent)."""

    codes: np.ndarray
    gaps: np.ndarray


class RxAudio:
    """The receive rings of up to `capacity` legs (grows on demand)."""

    __slots__ = (
        "ring",
        "read_ts",
        "started",
        "silence",
        "anchor_ts",
        "anchor_t",
        "late_run",
        "late",
        "resyncs",
        "last_seq",
        "last_end",
        "_free",
        "_grow_by",
    )

    def __init__(self, capacity: int = 64, grow_by: int = 256) -> None:
        self._grow_by = grow_by
        self.ring = np.zeros((0, RING_SAMPLES), dtype=np.uint16)
        self.read_ts = np.zeros(0, dtype=np.int64)  # timestamp of the next sample to read
        self.started = np.zeros(0, dtype=bool)
        self.silence = np.zeros(0, dtype=np.uint8)
        # The newest sample received (its timestamp + 1) and when: maps timestamps to time.
        self.anchor_ts = np.zeros(0, dtype=np.int64)
        self.anchor_t = np.zeros(0, dtype=np.float64)
        self.late_run = np.zeros(0, dtype=np.int64)  # late packets in a row
        self.late = np.zeros(0, dtype=np.int64)  # packets dropped as too late
        self.resyncs = np.zeros(0, dtype=np.int64)
        # The newest packet in sequence order (-1: none since the last re-anchor) and the
        # timestamp just after it: tells an unsent pause from loss.
        self.last_seq = np.zeros(0, dtype=np.int64)
        self.last_end = np.zeros(0, dtype=np.int64)
        self._free: list[int] = []
        self._grow(capacity)

    @classmethod
    def over(
        cls, ring: np.ndarray, read_ts: np.ndarray, started: np.ndarray, silence: np.ndarray,
        anchor_ts: np.ndarray, anchor_t: np.ndarray, late_run: np.ndarray, late: np.ndarray,
        resyncs: np.ndarray, last_seq: np.ndarray, last_end: np.ndarray,
    ) -> RxAudio:  # fmt: skip
        """An RxAudio working on these arrays (the receive kernel's twin uses it)."""
        rx = cls.__new__(cls)
        rx.ring, rx.read_ts, rx.started, rx.silence = ring, read_ts, started, silence
        rx.anchor_ts, rx.anchor_t = anchor_ts, anchor_t
        rx.late_run, rx.late, rx.resyncs = late_run, late, resyncs
        rx.last_seq, rx.last_end = last_seq, last_end
        rx._free, rx._grow_by = [], 0
        return rx

    def arrays(
        self,
    ) -> tuple[
        np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
        np.ndarray, np.ndarray, np.ndarray, np.ndarray,
    ]:  # fmt: skip
        """The arrays `over` takes, in its order (for the receive kernel)."""
        return (
            self.ring, self.read_ts, self.started, self.silence, self.anchor_ts, self.anchor_t,
            self.late_run, self.late, self.resyncs, self.last_seq, self.last_end,
        )  # fmt: skip

    @property
    def capacity(self) -> int:
        return int(self.read_ts.shape[0])

    def _grow(self, by: int) -> None:
        old = self.capacity
        new = old + by
        ring = np.zeros((new, RING_SAMPLES), dtype=np.uint16)
        ring[:old] = self.ring
        self.ring = ring
        for name, dtype in (
            ("read_ts", np.int64),
            ("started", bool),
            ("silence", np.uint8),
            ("anchor_ts", np.int64),
            ("anchor_t", np.float64),
            ("late_run", np.int64),
            ("late", np.int64),
            ("resyncs", np.int64),
            ("last_seq", np.int64),
            ("last_end", np.int64),
        ):
            arr = np.zeros(new, dtype=dtype)
            arr[:old] = getattr(self, name)
            setattr(self, name, arr)
        self._free.extend(range(new - 1, old - 1, -1))

    def add(self, silence_code: int) -> int:
        """A slot for a new leg whose silence is `silence_code` (G.711 0xFF / 0xD5)."""
        if not self._free:
            self._grow(self._grow_by)
        slot = self._free.pop()
        self.ring[slot] = silence_code
        self.silence[slot] = silence_code
        self.started[slot] = False
        self.late_run[slot] = 0
        self.late[slot] = 0
        self.resyncs[slot] = 0
        self.last_seq[slot] = -1
        return slot

    def remove(self, slot: int) -> None:
        self.started[slot] = False
        self._free.append(slot)

    def set_silence(self, slot: int, silence_code: int) -> None:
        """The leg's codec changed: forget its audio, fill with the new silence."""
        self.silence[slot] = silence_code
        self.ring[slot] = silence_code
        self.started[slot] = False

    def put(self, slot: int, timestamp: int, payload: bytes, now: float, seq: int = -1) -> None:
        """One received packet's G.711 codes at its RTP timestamp (`seq`: its sequence
        number, which tells an unsent pause before it from loss; -1: not known)."""
        n = len(payload)
        if n == 0 or n > RING_SAMPLES // 4:
            return
        if not self.started[slot]:
            self._resync(slot, timestamp, n)
        d = (timestamp - int(self.read_ts[slot]) + _HALF) % _TS_MOD - _HALF
        if d < 0:
            self.late_run[slot] += 1
            if d > -_HALF // 2 and self.late_run[slot] < LATE_RUN_RESYNC:
                self.late[slot] += 1
                return
            self._resync(slot, timestamp, n)
        elif d + n > RING_SAMPLES - TICK_SAMPLES:
            self._resync(slot, timestamp, n)
        else:
            self.late_run[slot] = 0
        row = self.ring[slot]
        last = int(self.last_seq[slot])
        if seq >= 0 and last >= 0 and seq == (last + 1) & 0xFFFF:
            # after an unsent pause: what is still to be read of it is heard silence
            gap_from = int(self.last_end[slot])
            read_ts = int(self.read_ts[slot])
            if (gap_from - read_ts + _HALF) % _TS_MOD - _HALF < 0:
                gap_from = read_ts
            span = (timestamp - gap_from + _HALF) % _TS_MOD - _HALF
            if 0 < span <= RING_SAMPLES - TICK_SAMPLES:
                row[(gap_from + np.arange(span)) & _MASK] = int(self.silence[slot]) | RECEIVED
        pos = timestamp & _MASK
        codes = np.frombuffer(payload, dtype=np.uint8).astype(np.uint16) | RECEIVED
        if pos + n <= RING_SAMPLES:
            row[pos : pos + n] = codes
        else:
            k = RING_SAMPLES - pos
            row[pos:] = codes[:k]
            row[: n - k] = codes[k:]
        end = (timestamp + n) % _TS_MOD
        if seq >= 0 and (last < 0 or ((seq - last) & 0xFFFF) < 0x8000):
            self.last_seq[slot] = seq
            self.last_end[slot] = end
        if (end - int(self.anchor_ts[slot]) + _HALF) % _TS_MOD - _HALF > 0:
            self.anchor_ts[slot] = end
            self.anchor_t[slot] = now

    def _resync(self, slot: int, timestamp: int, n: int) -> None:
        # Read one tick plus two packets behind this packet: room for 3 packets' reordering.
        self.ring[slot] = self.silence[slot]
        self.read_ts[slot] = (timestamp - TICK_SAMPLES - 2 * n) % _TS_MOD
        self.anchor_ts[slot] = timestamp
        self.anchor_t[slot] = 0.0
        self.started[slot] = True
        self.late_run[slot] = 0
        self.resyncs[slot] += 1
        self.last_seq[slot] = -1

    def read(self, slots: np.ndarray) -> RxFrames:
        """The next 160 codes of each slot and their gaps; those samples become silence."""
        out = np.empty((slots.shape[0], TICK_SAMPLES), dtype=np.uint8)
        gaps = np.empty((slots.shape[0], GAP_SUBS), dtype=bool)
        _k.ring_read(
            np.ascontiguousarray(slots, dtype=np.int64), self.ring, self.read_ts, self.silence,
            out, gaps,
        )  # fmt: skip
        return RxFrames(out, gaps)

    def read_py(self, slots: np.ndarray) -> RxFrames:
        """`read` as one numpy gather (the kernel's twin)."""
        rts = self.read_ts[slots]
        rows = slots[:, None]
        cols = (rts[:, None] + _COLS) & _MASK
        got = self.ring[rows, cols]
        self.ring[rows, cols] = self.silence[slots][:, None]
        self.read_ts[slots] = (rts + TICK_SAMPLES) % _TS_MOD
        gaps = (got < RECEIVED).reshape(-1, GAP_SUBS, GAP_SUB_SAMPLES).any(axis=2)
        return RxFrames((got & 0xFF).astype(np.uint8), gaps)

    def time_of(self, slot: int, timestamp: int) -> float:
        """When the sample with this timestamp arrived (estimated from the newest packet)."""
        d = (timestamp - int(self.anchor_ts[slot]) + _HALF) % _TS_MOD - _HALF
        return float(self.anchor_t[slot]) + d / 8000.0

"""Recording placement in compiled code: the receive pass's caller packets and the
relayed / pumped frames a recorded leg hears go into its recording's code buffer
(`media.rectable.RecorderTable`) exactly as `media.recorder.Recording.caller` /
`heard` place them one call at a time (the per-packet path keeps those as the
reference): a stream is anchored at its first packet to the wall-clock position and
later packets land at `anchor + (timestamp − anchor timestamp)` (RFC 3550 §5.1), a
new SSRC or a jump of more than `REANCHOR_SAMPLES` behind the wall clock or
`LEAD_SAMPLES` ahead of it anchors it again; codes before what is written or beyond
the maximum length are dropped; the other law is transcoded through `rtpbatch.XCODE`.

A packet that does not fit in the buffer (ticks fell behind: the recorder must write
to make room, which is file I/O) is left for Python: the kernels stop there and
return its index, nothing of it placed and no track moved; the engine calls
`Recording.caller`/`heard` for it (which write and place it) and calls the kernel again
from the next one.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from media.kernels.rtpbatch import (
    ACT_RECORD,
    HALF,
    HEADER_SIZE,
    L_CN_PT,
    L_CODEC,
    L_REC,
    TS_MOD,
    XCODE,
    be32,
    payload_span,
)
from media.rectable import (
    BUF_SAMPLES,
    LEAD_SAMPLES,
    R_CALLER,
    R_CHANNELS,
    R_CODEC,
    R_HEARD,
    R_MAX,
    R_OPEN,
    R_WRITTEN,
    REANCHOR_SAMPLES,
    RF_T0,
)

SAMPLE_RATE = 8000


@njit(cache=True)
def _wall(rf: np.ndarray, q: int, at: float) -> int:
    """`Recording.wall`: the position of time `at` (round half to even, as Python)."""
    pos = int(np.rint((at - rf[q, RF_T0]) * SAMPLE_RATE))
    return pos if pos > 0 else 0


@njit(cache=True)
def _place(
    ri: np.ndarray, rbuf: np.ndarray, q: int, channel: int, track: int, ssrc: int, ts: int,
    wall: int, src: np.ndarray, s: int, n: int, law: int,
) -> bool:  # fmt: skip
    """`_Track.place` then `Recording._put` for `n` codes at src[s:]; False (nothing
    changed) when they do not fit without a write first."""
    anchored = False
    pos = wall
    if ssrc == ri[q, track]:
        d = (ts - ri[q, track + 1]) % TS_MOD
        if d > HALF:
            d -= TS_MOD
        pos = ri[q, track + 2] + d
        anchored = -REANCHOR_SAMPLES <= pos - wall <= LEAD_SAMPLES
        if not anchored:
            pos = wall
    written = ri[q, R_WRITTEN]
    end = min(pos + n, ri[q, R_MAX])
    start = max(pos, written)
    if start < end and end > written + BUF_SAMPLES:
        return False
    if not anchored:
        ri[q, track] = ssrc
        ri[q, track + 1] = ts
        ri[q, track + 2] = wall
    if start >= end:
        return True
    xcode = law != ri[q, R_CODEC]
    for j in range(start, end):
        code = src[s + j - pos]
        if xcode:
            code = XCODE[law, code]
        rbuf[q, channel, j - written] = code
    return True


@njit(cache=True)
def record_rx(
    buf: np.ndarray, lens: np.ndarray, rows: np.ndarray, n: int, start: int,
    action: np.ndarray, now: float, li: np.ndarray, ri: np.ndarray, rf: np.ndarray,
    rbuf: np.ndarray,
) -> int:  # fmt: skip
    """Every packet from `start` on that `rx_batch` marked ACT_RECORD (audio of a recorded
    leg) placed on its recording's caller channel (`Recording.caller`). Returns n, or the
    index of a packet left for Python (module docstring)."""
    for i in range(start, n):
        if action[i] & ACT_RECORD == 0:
            continue
        r = rows[i]
        q = li[r, L_REC]
        if q < 0 or ri[q, R_OPEN] == 0 or math.isnan(rf[q, RF_T0]):
            continue
        off, end = payload_span(buf, i, lens[i])
        pt = np.int64(buf[i, 1] & 0x7F)
        law = 0 if pt == 0 else 1 if pt == 8 else li[r, L_CODEC]
        ts = be32(buf[i], 4)
        ssrc = be32(buf[i], 8)
        nbytes = end - off
        # It arrived at `now`, so it ends about now.
        wall = _wall(rf, q, now) - nbytes
        if not _place(ri, rbuf, q, 0, R_CALLER, ssrc, ts, wall, buf[i], off, nbytes, law):
            return i
    return n


@njit(cache=True)
def record_tx(
    data: np.ndarray, lens: np.ndarray, rows: np.ndarray, ts: np.ndarray, at: np.ndarray,
    start: int, n: int, first_fill: int, li: np.ndarray, ri: np.ndarray, rf: np.ndarray,
    rbuf: np.ndarray,
) -> int:  # fmt: skip
    """The frames of a `TxBatch` (rows start..n-1) that a recorded stereo leg sends, on
    its recording's heard channel (`Recording.heard`): audio only (`at` NaN: an RFC 4733
    event), and from `first_fill` on (the fill frames) only for legs without comfort
    noise (a CN packet carries no codes). Returns n, or the index of a frame left for
    Python (module docstring)."""
    for k in range(start, n):
        r = rows[k]
        q = li[r, L_REC]
        if q < 0 or ri[q, R_CHANNELS] == 1 or ri[q, R_OPEN] == 0:
            continue
        if math.isnan(rf[q, RF_T0]) or math.isnan(at[k]):
            continue
        if k >= first_fill and li[r, L_CN_PT] >= 0:
            continue
        nbytes = lens[k] - HEADER_SIZE
        wall = _wall(rf, q, at[k])
        law = li[r, L_CODEC]
        if not _place(ri, rbuf, q, 1, R_HEARD, 0, ts[k], wall, data[k], HEADER_SIZE, nbytes,
                      law):  # fmt: skip
            return k
    return n


def warm() -> None:
    """Compile (or load from the on-disk cache) the kernels before the worker reports ready."""
    from media.kernels.rtpbatch import L_COLS
    from media.rectable import RecorderTable

    li = np.full((1, L_COLS), -1, dtype=np.int64)
    tab = RecorderTable(1)
    data = np.zeros((1, HEADER_SIZE + 160), dtype=np.uint8)
    one = np.zeros(1, dtype=np.int64)
    record_rx(data, one.copy(), one.copy(), 1, 0, np.zeros(1, dtype=np.int8), 0.0, li, tab.i,
              tab.f, tab.buf)  # fmt: skip
    record_tx(data, one.copy(), one.copy(), one.copy(), np.zeros(1), 0, 1, 1, li, tab.i, tab.f,
              tab.buf)  # fmt: skip

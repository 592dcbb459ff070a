"""Per-leg RTP state as arrays, for the batch kernels of `media.kernels.rtpbatch`.

Every leg of an engine owns one row of a `LegTable`: int64 and float64 columns
(`L_*`, `F_*`: payload types, latch, sequence/timestamp/SSRC of what it sends,
counters, its prompt's progress) and a row of a `media.rtcp.StatsTable`
(RFC 3550 receive statistics). The engine's `Leg` reads and writes its row
through properties, so the Python paths (bridging, recording, RTCP) and the
kernels see one state. `TxBatch` is the buffer the pump fills with one tick's
prompt packets; `PromptArena` holds the G.711 codes of the prompts being
played, at offsets the pump reads.
"""

from __future__ import annotations

import numpy as np

from media.kernels.rtpbatch import (
    F_COLS,
    F_FILL_ORIGIN,
    F_PLAY_ORIGIN,
    F_SENT_UNTIL,
    L_CN_PT,
    L_COLS,
    L_DTMF_PT,
    L_FWD_OFFSET,
    L_PEER,
    L_REC,
    L_RX_SLOT,
)
from media.rtcp import StatsTable


class LegTable:
    """Rows of per-leg state, grown in chunks; freed rows are reused."""

    __slots__ = ("i", "f", "stats", "_free", "_grow_by")

    def __init__(self, capacity: int = 64, grow_by: int = 256) -> None:
        self._grow_by = grow_by
        self.i = np.zeros((0, L_COLS), dtype=np.int64)
        self.f = np.zeros((0, F_COLS), dtype=np.float64)
        self.stats = StatsTable(0)
        self._free: list[int] = []
        self._grow(capacity)

    @property
    def capacity(self) -> int:
        return int(self.i.shape[0])

    def _grow(self, by: int) -> None:
        old = self.capacity
        i = np.zeros((old + by, L_COLS), dtype=np.int64)
        f = np.zeros((old + by, F_COLS), dtype=np.float64)
        i[:old] = self.i
        f[:old] = self.f
        self.i, self.f = i, f
        self.stats.grow(old + by)
        self._free.extend(range(old + by - 1, old - 1, -1))

    def add(self) -> int:
        if not self._free:
            self._grow(self._grow_by)
        row = self._free.pop()
        self.i[row] = 0
        self.i[row, L_DTMF_PT] = -1
        self.i[row, L_CN_PT] = -1
        self.i[row, L_RX_SLOT] = -1
        self.i[row, L_FWD_OFFSET] = -1
        self.i[row, L_PEER] = -1
        self.i[row, L_REC] = -1
        self.f[row] = 0.0
        self.f[row, F_SENT_UNTIL] = np.nan
        self.f[row, F_PLAY_ORIGIN] = np.nan
        self.f[row, F_FILL_ORIGIN] = np.nan
        self.stats.reset(row)
        return row

    def remove(self, row: int) -> None:
        self.i[row] = 0
        self._free.append(row)


def ipv4_int(ip: str) -> int:
    """An IPv4 address as the integer of its network-order bytes; 0 for anything else."""
    parts = ip.split(".")
    if len(parts) != 4:
        return 0
    try:
        a, b, c, d = (int(x) for x in parts)
    except ValueError:
        return 0
    return (a << 24) | (b << 16) | (c << 8) | d


def ipv4_str(value: int) -> str:
    return f"{value >> 24 & 0xFF}.{value >> 16 & 0xFF}.{value >> 8 & 0xFF}.{value & 0xFF}"


class TxBatch:
    """Packets to send: `data[k, :lens[k]]` goes from the leg in row `rows[k]` to
    `ips[k]:ports[k]` (`L_REMOTE_IP` form); `ts`/`at` are its timestamp and due time (NaN:
    not audio). One tick's prompt and fill frames (`MediaEngine.tx`), or one receive
    pass's relayed packets (`MediaEngine.relay`)."""

    __slots__ = ("data", "lens", "rows", "ts", "at", "ips", "ports", "n")

    def __init__(self, capacity: int = 256, width: int = 12 + 160) -> None:
        self.n = 0
        self._alloc(capacity, width)

    def _alloc(self, capacity: int, width: int) -> None:
        self.data = np.zeros((capacity, width), dtype=np.uint8)
        self.lens = np.zeros(capacity, dtype=np.int64)
        self.rows = np.zeros(capacity, dtype=np.int64)
        self.ts = np.zeros(capacity, dtype=np.int64)
        self.at = np.zeros(capacity, dtype=np.float64)
        self.ips = np.zeros(capacity, dtype=np.int64)
        self.ports = np.zeros(capacity, dtype=np.int64)

    def grow(self, width: int) -> None:
        """Room for more packets (twice as many), at least `width` bytes each; keeps the first n."""
        old = (self.data, self.lens, self.rows, self.ts, self.at, self.ips, self.ports)
        n = self.n
        self._alloc(2 * old[0].shape[0], max(width, old[0].shape[1]))
        self.data[:n, : old[0].shape[1]] = old[0][:n]
        for new, prev in zip(
            (self.lens, self.rows, self.ts, self.at, self.ips, self.ports), old[1:], strict=True
        ):
            new[:n] = prev[:n]

    def packet(self, k: int) -> bytes:
        return self.data[k, : self.lens[k]].tobytes()


class PromptArena:
    """The codes of the prompts being played, back to back in one array (the pump reads a
    leg's prompt at its offset). Reference-counted per codes array; compacts when more
    than half of it is dead."""

    __slots__ = ("data", "used", "dead", "_entries")

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.data = np.zeros(capacity, dtype=np.uint8)
        self.used = 0
        self.dead = 0
        # id(codes) -> [codes, offset, references]
        self._entries: dict[int, list[object]] = {}

    def acquire(self, codes: np.ndarray) -> int:
        """The offset of `codes` in the arena (copied in on first use)."""
        entry = self._entries.get(id(codes))
        if entry is not None:
            entry[2] += 1  # type: ignore[operator]
            return int(entry[1])  # type: ignore[call-overload]
        n = int(codes.size)
        if self.used + n > self.data.size:
            data = np.zeros(max(2 * self.data.size, self.used + n), dtype=np.uint8)
            data[: self.used] = self.data[: self.used]
            self.data = data
        off = self.used
        self.data[off : off + n] = codes.reshape(-1)
        self.used += n
        self._entries[id(codes)] = [codes, off, 1]
        return off

    def release(self, codes: np.ndarray, li: np.ndarray, playing_col: int, off_col: int) -> None:
        """One reference fewer; may compact (moving the offsets of rows that play)."""
        entry = self._entries.get(id(codes))
        if entry is None:
            return
        entry[2] -= 1  # type: ignore[operator]
        if entry[2] > 0:  # type: ignore[operator]
            return
        del self._entries[id(codes)]
        self.dead += int(codes.size)
        if self.dead > 1 << 20 and 2 * self.dead > self.used:
            self._compact(li, playing_col, off_col)

    def _compact(self, li: np.ndarray, playing_col: int, off_col: int) -> None:
        data = np.zeros(max(1 << 16, self.used - self.dead), dtype=np.uint8)
        playing = li[:, playing_col] != 0
        offsets = li[:, off_col].copy()
        pos = 0
        for entry in self._entries.values():
            codes, old = entry[0], int(entry[1])  # type: ignore[call-overload]
            n = int(codes.size)  # type: ignore[attr-defined]
            data[pos : pos + n] = self.data[old : old + n]
            li[playing & (offsets == old), off_col] = pos
            entry[1] = pos
            pos += n
        self.data, self.used, self.dead = data, pos, 0


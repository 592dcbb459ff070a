"""Which leg a datagram on a worker's shared RTP port is for: a source address -> leg table.

A shared port (`[media] rtp_socket`, `workers.rtpio`) carries the RTP of many legs, so
the leg of a packet is told by its source ip:port, as WebRTC servers do:

1. the leg latched onto that source (strict latching, `media.kernels.rtpbatch`);
2. else the leg whose SDP address (`L_SDP_IP`/`L_SDP_PORT`, from MediaRemote) it is;
3. else none: row -1, dropped before the engine sees it and counted per worker.

The table is an open-addressing hash (linear probing, backward-shift deletion, so no
tombstones accumulate) in two numpy arrays, looked up from compiled code; its hash is
salted per table (random), so callers choosing their SDP ports cannot line their legs'
keys up into one long probe run. Only legs
insert keys (their SDP address and their latched source: at most two per leg), never a
packet: a stranger spraying the port from any number of addresses finds nothing and
adds nothing. A key two legs claim (two legs told the same SDP address) stays with the
leg that claimed it first; the other leg is marked `pending` and takes it when it comes
free (its packets cannot be told apart meanwhile, so they are not guessed at).

On a shared port the first packet of a leg can only come from its SDP address (nothing
else maps to the leg), so the latch starts there, and the silence re-latch to an
unknown source (`[rtp] relatch_silence_ms`) cannot happen: a leg behind a NAT, whose
packets come from another address than its SDP says, needs a port of its own.
"""

from __future__ import annotations

import secrets

import numpy as np
from numba import njit

from media.kernels.rtpbatch import L_LATCHED, L_REMOTE_IP, L_REMOTE_PORT, L_SDP_IP, L_SDP_PORT

EMPTY = np.int64(-1)  # an empty slot's key (a real key is >= 0: ip << 16 | port)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing (Knuth 6.4)


@njit(cache=True, inline="always")
def addr_key(ip: int, port: int) -> int:
    """The table key of an IPv4 address (integer, network order read big-endian) and
    port; -1 for none (no address, or port 0, which cannot be answered)."""
    if ip <= 0 or port <= 0 or port > 0xFFFF or ip > 0xFFFFFFFF:
        return -1
    return (ip << 16) | port


@njit(cache=True, inline="always")
def _slot(key: int, mask: int, salt: int) -> int:
    h = (np.uint64(key) ^ np.uint64(salt)) * _GOLDEN
    return np.int64((h >> np.uint64(32)) & np.uint64(mask))  # type: ignore[return-value]


@njit(cache=True)
def lookup(keys: np.ndarray, vals: np.ndarray, key: int, salt: int) -> int:
    """The row of `key`, -1 if none."""
    mask = keys.shape[0] - 1
    s = _slot(key, mask, salt)
    while True:
        k = keys[s]
        if k == key:
            return vals[s]
        if k == EMPTY:
            return -1
        s = (s + 1) & mask


@njit(cache=True)
def insert(keys: np.ndarray, vals: np.ndarray, key: int, row: int, salt: int) -> int:
    """Map `key` to `row` unless another row has it: returns the row that has it now.
    The caller keeps the table at most half full (`DemuxTable` grows it)."""
    mask = keys.shape[0] - 1
    s = _slot(key, mask, salt)
    while True:
        k = keys[s]
        if k == key:
            return vals[s]
        if k == EMPTY:
            keys[s] = key
            vals[s] = row
            return row
        s = (s + 1) & mask


@njit(cache=True)
def delete(keys: np.ndarray, vals: np.ndarray, key: int, row: int, salt: int) -> bool:
    """Unmap `key` if `row` has it; backward-shift the probe run after it."""
    mask = keys.shape[0] - 1
    s = _slot(key, mask, salt)
    while True:
        k = keys[s]
        if k == EMPTY:
            return False
        if k == key:
            break
        s = (s + 1) & mask
    if vals[s] != row:
        return False
    hole = s
    j = s
    while True:
        j = (j + 1) & mask
        k = keys[j]
        if k == EMPTY:
            break
        home = _slot(k, mask, salt)
        # The entry at j may fill the hole if its home is not cyclically in (hole, j].
        if (j > hole and (home <= hole or home > j)) or (j < hole and home <= hole and home > j):
            keys[hole] = k
            vals[hole] = vals[j]
            hole = j
    keys[hole] = EMPTY
    vals[hole] = -1
    return True


@njit(cache=True)
def _claim(keys: np.ndarray, vals: np.ndarray, salt: int, reg: np.ndarray, other: np.ndarray,
           pending: np.ndarray, r: int, want: int, retry: bool) -> None:  # fmt: skip
    """Row r's key in `reg` (SDP or latch) becomes `want`: the old one is unmapped
    (unless the row's other key is the same), the new one mapped if free (`retry`: the
    row had a key another row held; try again)."""
    old = reg[r]
    if old == want and not retry:
        return
    if old >= 0 and old != want and old != other[r]:
        delete(keys, vals, old, r, salt)
    reg[r] = want
    if want >= 0 and insert(keys, vals, want, r, salt) != r:
        pending[r] = 1


@njit(cache=True)
def refresh_row(keys: np.ndarray, vals: np.ndarray, salt: int, sdp: np.ndarray,
                latch: np.ndarray, pending: np.ndarray, shared: np.ndarray, li: np.ndarray,
                r: int) -> None:  # fmt: skip
    """Row r's keys as the leg table says now (SDP address; latched source)."""
    if r < 0 or r >= shared.shape[0] or shared[r] == 0:
        return
    want_sdp = addr_key(li[r, L_SDP_IP], li[r, L_SDP_PORT])
    want_latch = -1
    if li[r, L_LATCHED] != 0:
        want_latch = addr_key(li[r, L_REMOTE_IP], li[r, L_REMOTE_PORT])
    if want_sdp == sdp[r] and want_latch == latch[r] and pending[r] == 0:
        return
    retry = pending[r] != 0
    pending[r] = 0
    _claim(keys, vals, salt, sdp, latch, pending, r, want_sdp, retry)
    _claim(keys, vals, salt, latch, sdp, pending, r, want_latch, retry)


@njit(cache=True)
def sync_rows(keys: np.ndarray, vals: np.ndarray, salt: int, sdp: np.ndarray,
              latch: np.ndarray, pending: np.ndarray, shared: np.ndarray, li: np.ndarray,
              rows: np.ndarray, n: int) -> None:  # fmt: skip
    """After a receive pass: the latches its packets moved (only a leg with a packet can
    latch), one compare per packet when nothing moved."""
    for i in range(n):
        r = rows[i]
        if r < 0 or r >= shared.shape[0] or shared[r] == 0 or r >= li.shape[0]:
            continue
        want = -1
        if li[r, L_LATCHED] != 0:
            want = addr_key(li[r, L_REMOTE_IP], li[r, L_REMOTE_PORT])
        if want != latch[r]:
            refresh_row(keys, vals, salt, sdp, latch, pending, shared, li, r)


@njit(cache=True)
def forget_row(keys: np.ndarray, vals: np.ndarray, salt: int, sdp: np.ndarray,
               latch: np.ndarray, pending: np.ndarray, shared: np.ndarray,
               r: int) -> None:  # fmt: skip
    if sdp[r] >= 0:
        delete(keys, vals, sdp[r], r, salt)
    if latch[r] >= 0:
        delete(keys, vals, latch[r], r, salt)
    sdp[r] = latch[r] = -1
    pending[r] = 0
    shared[r] = 0


@njit(cache=True)
def demux(keys: np.ndarray, vals: np.ndarray, salt: int, names: np.ndarray,
          owner: np.ndarray, sock_rows: np.ndarray, rows: np.ndarray,
          n: int) -> int:  # fmt: skip
    """rows[:n]: a packet read from a leg's own socket (owner[i] >= 0, its index) gets
    that socket's leg (sock_rows); one from the shared socket (owner -1) the leg of
    its source `sockaddr_in` (names[i]), or -1. Returns how many got -1 that way."""
    foreign = 0
    for i in range(n):
        o = owner[i]
        if o >= 0:
            rows[i] = sock_rows[o] if o < sock_rows.shape[0] else -1
            continue
        port = (np.int64(names[i, 2]) << 8) | names[i, 3]
        ip = (
            (np.int64(names[i, 4]) << 24) | (np.int64(names[i, 5]) << 16)
            | (np.int64(names[i, 6]) << 8) | names[i, 7]
        )  # fmt: skip
        key = addr_key(ip, port)
        r = lookup(keys, vals, key, salt) if key >= 0 else -1
        rows[i] = r
        if r < 0:
            foreign += 1
    return foreign


class DemuxTable:
    """The source -> row table of one shared port, and each leg row's keys in it."""

    def __init__(self, legs: int = 64) -> None:
        size = 16
        while size < 4 * legs:  # two keys per leg, at most half full
            size *= 2
        self.keys = np.full(size, EMPTY, dtype=np.int64)
        self.vals = np.full(size, -1, dtype=np.int64)
        self.salt = secrets.randbits(63)
        self.sdp = np.full(0, -1, dtype=np.int64)
        self.latch = np.full(0, -1, dtype=np.int64)
        self.pending = np.zeros(0, dtype=np.int8)
        self.shared = np.zeros(0, dtype=np.int8)
        self.legs = 0

    def __len__(self) -> int:
        """Keys in the table."""
        return int((self.keys != EMPTY).sum())

    def _rows(self, row: int) -> None:
        if row < self.shared.size:
            return
        size = max(64, 2 * row + 2)
        for name, fill in (("sdp", -1), ("latch", -1), ("pending", 0), ("shared", 0)):
            old = getattr(self, name)
            new = np.full(size, fill, dtype=old.dtype)
            new[: old.size] = old
            setattr(self, name, new)

    def _grow(self) -> None:
        """Room for two more keys per leg at most half full: rehash into a bigger table."""
        if 4 * (self.legs + 1) <= self.keys.size:
            return
        size = self.keys.size * 2
        while size < 4 * (self.legs + 1):
            size *= 2
        old_keys, old_vals = self.keys, self.vals
        self.keys = np.full(size, EMPTY, dtype=np.int64)
        self.vals = np.full(size, -1, dtype=np.int64)
        for k, v in zip(old_keys.tolist(), old_vals.tolist(), strict=True):
            if k != EMPTY:
                insert(self.keys, self.vals, k, v, self.salt)

    def add(self, row: int, li: np.ndarray) -> None:
        """A leg on the shared port, at engine row `row` of the leg table `li`."""
        self._grow()
        self._rows(row)
        if self.shared[row]:
            raise ValueError(f"row {row} is already on the shared port")
        self.shared[row] = 1
        self.sdp[row] = self.latch[row] = -1
        self.legs += 1
        self.refresh(row, li)

    def refresh(self, row: int, li: np.ndarray) -> None:
        """The leg's SDP address or latch changed (MediaRemote, a latch)."""
        refresh_row(self.keys, self.vals, self.salt, self.sdp, self.latch, self.pending,
                    self.shared, li, row)  # fmt: skip

    def remove(self, row: int, li: np.ndarray) -> None:
        """The leg is gone: its keys go, and legs waiting for one of them get it."""
        if row >= self.shared.size or not self.shared[row]:
            return
        forget_row(self.keys, self.vals, self.salt, self.sdp, self.latch, self.pending,
                   self.shared, row)  # fmt: skip
        self.legs -= 1
        for waiting in np.flatnonzero(self.pending).tolist():
            self.refresh(waiting, li)

    def sync(self, li: np.ndarray, rows: np.ndarray, n: int) -> None:
        sync_rows(self.keys, self.vals, self.salt, self.sdp, self.latch, self.pending,
                  self.shared, li, rows, n)  # fmt: skip

    def row_of(self, ip: int, port: int) -> int:
        key = addr_key(ip, port)
        return -1 if key < 0 else int(lookup(self.keys, self.vals, key, self.salt))

"""RTP socket I/O for every leg of a worker in one call: numba loops over libc `recvfrom`.

Each leg keeps its own UDP socket (its SDP port, the source port phones and NATs
expect), but asyncio's one-callback-per-datagram costs several µs of Python per
packet. Instead the worker polls all RTP sockets once per poll interval: one
compiled loop calls `recvfrom(MSG_DONTWAIT)` on every socket until it would
block, into one preallocated `packets × 2048` buffer, with each packet's length,
source address and owning socket. An idle socket costs one ~0.4 µs system call.

The kernels call libc through ctypes function pointers, which numba cannot
cache on disk; they compile (≈ 0.5 s) in `warm()`, before the worker says ready.
IPv4 only (`sockaddr_in`); the worker falls back to asyncio endpoints for IPv6.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket

import numpy as np
from numba import njit

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_recvfrom = _libc.recvfrom
_recvfrom.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
]
_recvfrom.restype = ctypes.c_ssize_t
_MSG_DONTWAIT = 0x40
MAX_DATAGRAM = 2048
SOCKADDR_IN = 16


@njit(cache=False)
def _recv_all(
    fds: np.ndarray,
    buf: np.ndarray,
    lens: np.ndarray,
    names: np.ndarray,
    namelens: np.ndarray,
    owner: np.ndarray,
    start: int,
) -> int:
    """Drain every socket in fds (from index `start` on) into buf; returns packets read.
    Stops early when buf is full: the caller calls again from the returned owner on."""
    n = 0
    cap = buf.shape[0]
    size = buf.shape[1]
    for i in range(start, fds.shape[0]):
        fd = fds[i]
        if fd < 0:
            continue
        while True:
            if n >= cap:
                return n
            namelens[n] = SOCKADDR_IN
            r = _recvfrom(
                fd, buf[n].ctypes.data, size, _MSG_DONTWAIT, names[n].ctypes.data,
                namelens[n:].ctypes.data,
            )  # fmt: skip
            if r < 0:
                break
            lens[n] = r
            owner[n] = i
            n += 1
    return n


class RtpSockets:
    """The RTP sockets of every leg, polled together."""

    def __init__(self, batch: int = 4096) -> None:
        self.fds = np.zeros(0, dtype=np.int32)
        self.call_ids: list[str | None] = []
        self.socks: list[socket.socket | None] = []
        self._index: dict[str, int] = {}
        self._free: list[int] = []
        self.buf = np.zeros((batch, MAX_DATAGRAM), dtype=np.uint8)
        self.lens = np.zeros(batch, dtype=np.int64)
        self.names = np.zeros((batch, SOCKADDR_IN), dtype=np.uint8)
        self.namelens = np.zeros(batch, dtype=np.uint32)
        self.owner = np.zeros(batch, dtype=np.int64)
        self._addr_cache: dict[bytes, tuple[str, int]] = {}

    def __len__(self) -> int:
        return len(self._index)

    def add(self, call_id: str, sock: socket.socket) -> None:
        if call_id in self._index:
            raise ValueError(f"call {call_id!r} already has an RTP socket")
        if self._free:
            i = self._free.pop()
            self.call_ids[i] = call_id
            self.socks[i] = sock
        else:
            i = len(self.call_ids)
            self.call_ids.append(call_id)
            self.socks.append(sock)
            fds = np.full(max(16, 2 * i), -1, dtype=np.int32) if i >= self.fds.size else self.fds
            fds[: self.fds.size] = self.fds
            self.fds = fds
        self.fds[i] = sock.fileno()
        self._index[call_id] = i

    def get(self, call_id: str) -> socket.socket | None:
        i = self._index.get(call_id)
        return None if i is None else self.socks[i]

    def remove(self, call_id: str) -> socket.socket | None:
        i = self._index.pop(call_id, None)
        if i is None:
            return None
        sock = self.socks[i]
        self.fds[i] = -1
        self.call_ids[i] = None
        self.socks[i] = None
        self._free.append(i)
        return sock

    def poll(self) -> list[tuple[str, bytes, tuple[str, int]]]:
        """Every datagram waiting on any leg's socket: (call_id, data, source address)."""
        out: list[tuple[str, bytes, tuple[str, int]]] = []
        start = 0
        cache = self._addr_cache
        while True:
            n = _recv_all(
                self.fds, self.buf, self.lens, self.names, self.namelens, self.owner, start
            )
            if n == 0:
                return out
            buf, lens, names, owner, call_ids = (
                self.buf, self.lens, self.names, self.owner, self.call_ids,
            )  # fmt: skip
            for i in range(n):
                key = names[i, 2:8].tobytes()
                addr = cache.get(key)
                if addr is None:
                    if len(cache) > 65536:
                        cache.clear()
                    addr = cache[key] = (socket.inet_ntoa(key[2:]), int.from_bytes(key[:2], "big"))
                call_id = call_ids[owner[i]]
                if call_id is not None:
                    out.append((call_id, buf[i, : lens[i]].tobytes(), addr))
            if n < buf.shape[0]:
                return out
            start = int(owner[n - 1])  # the buffer filled up: go on from that socket

    def close(self) -> None:
        for sock in self.socks:
            if sock is not None:
                sock.close()
        self.socks = []
        self.call_ids = []
        self._index.clear()
        self.fds = np.zeros(0, dtype=np.int32)


def warm() -> None:
    """Compile the receive loop (no cache: it calls libc through a pointer)."""
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        a.bind(("127.0.0.1", 0))
        a.setblocking(False)
        rs = RtpSockets(batch=4)
        rs.add("warm", a)
        a.sendto(b"x" * 12, a.getsockname())
        rs.poll()
        rs.remove("warm")
    finally:
        a.close()

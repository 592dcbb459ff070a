"""RTP socket I/O for every leg of a worker in one call: numba loops over libc `recvfrom`.

Each leg keeps its own UDP socket (its SDP port, the source port phones and NATs
expect), but asyncio's one-callback-per-datagram costs several µs of Python per
packet. Instead the worker polls all RTP sockets once per poll interval: one
compiled loop calls `recvfrom(MSG_DONTWAIT)` on every socket until it would
block, into one preallocated `packets × 2048` buffer (1,024 packets, 2 MB; a
fuller poll takes several fills), with each packet's length, source address and
the engine row of its leg — what `MediaEngine.receive_batch` takes. An idle
socket costs one ~0.4 µs system call.

Sending is the mirror image: the engine's tick leaves every prompt packet in
one buffer (`MediaEngine.tx`) and one compiled loop calls `sendto` for each
from its own leg's socket (the source port must be the leg's port for
symmetric RTP, so one `sendmmsg` per socket would carry one packet and gain
nothing).

The loops call libc through ctypes function pointers, which numba cannot
cache on disk; they compile (≈ 1 s) in `warm()`, before the worker says ready.
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
_sendto = _libc.sendto
_sendto.argtypes = [
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_uint32,
]
_sendto.restype = ctypes.c_ssize_t
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


@njit(cache=False)
def _send_all(
    data: np.ndarray,
    lens: np.ndarray,
    rows: np.ndarray,
    ips: np.ndarray,
    ports: np.ndarray,
    n: int,
    row_fd: np.ndarray,
    name: np.ndarray,
    unsent: np.ndarray,
) -> int:
    """sendto() each of the first n packets from its leg's socket (row_fd[rows[k]]) to
    ips[k]:ports[k]. Packets of rows without a socket here, and failed sends, are listed
    in `unsent`; returns how many there are."""
    m = 0
    name[0] = 2  # AF_INET, little-endian sa_family_t
    name[1] = 0
    for k in range(n):
        r = rows[k]
        fd = row_fd[r] if 0 <= r < row_fd.shape[0] else -1
        if fd < 0:
            unsent[m] = k
            m += 1
            continue
        port = ports[k]
        ip = ips[k]
        name[2] = (port >> 8) & 0xFF
        name[3] = port & 0xFF
        name[4] = (ip >> 24) & 0xFF
        name[5] = (ip >> 16) & 0xFF
        name[6] = (ip >> 8) & 0xFF
        name[7] = ip & 0xFF
        sent = _sendto(fd, data[k].ctypes.data, lens[k], _MSG_DONTWAIT, name.ctypes.data,
                       SOCKADDR_IN)  # fmt: skip
        if sent < 0:
            unsent[m] = k
            m += 1
    return m


class RtpSockets:
    """The RTP sockets of every leg, polled together."""

    def __init__(self, batch: int = 1024) -> None:
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
        self.rows = np.zeros(batch, dtype=np.int64)  # the engine row of each packet
        # per socket index: the engine row of its leg; per engine row: its socket's fd
        self.sock_rows = np.zeros(0, dtype=np.int64)
        self.row_fd = np.full(0, -1, dtype=np.int64)
        self._name = np.zeros(SOCKADDR_IN, dtype=np.uint8)
        self._unsent = np.zeros(0, dtype=np.int64)
        self._addr_cache: dict[bytes, tuple[str, int]] = {}

    def __len__(self) -> int:
        return len(self._index)

    def add(self, call_id: str, sock: socket.socket, row: int = -1) -> None:
        """The leg's socket; `row` is the leg's engine row (`Leg.row`) for `recv`/`send`."""
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
        if self.sock_rows.size < self.fds.size:
            rows = np.full(self.fds.size, -1, dtype=np.int64)
            rows[: self.sock_rows.size] = self.sock_rows
            self.sock_rows = rows
        self.fds[i] = sock.fileno()
        self.sock_rows[i] = row
        if row >= 0:
            if row >= self.row_fd.size:
                row_fd = np.full(max(64, 2 * row + 2), -1, dtype=np.int64)
                row_fd[: self.row_fd.size] = self.row_fd
                self.row_fd = row_fd
            self.row_fd[row] = sock.fileno()
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
        row = int(self.sock_rows[i])
        if 0 <= row < self.row_fd.size:
            self.row_fd[row] = -1
        self.sock_rows[i] = -1
        self.call_ids[i] = None
        self.socks[i] = None
        self._free.append(i)
        return sock

    def recv(self, start: int = 0) -> int:
        """One fill of the buffer from socket index `start` on: returns n, with
        `buf[:n]`, `lens[:n]`, `names[:n]` and each packet's engine row in `rows[:n]`.
        When n == len(buf) call again from `next_start()`."""
        n = int(
            _recv_all(self.fds, self.buf, self.lens, self.names, self.namelens, self.owner, start)
        )
        if n:
            np.take(self.sock_rows, self.owner[:n], out=self.rows[:n])
        return n

    def next_start(self, n: int) -> int:
        return int(self.owner[n - 1])

    def send(self, data: np.ndarray, lens: np.ndarray, rows: np.ndarray, ips: np.ndarray,
             ports: np.ndarray, n: int) -> np.ndarray:  # fmt: skip
        """Send packets k < n, each from the socket of the leg in rows[k] (one compiled
        loop of sendto); returns the indexes it could not send (no IPv4 socket here for
        the row, or sendto failed)."""
        if n <= 0:
            return self._unsent[:0]
        if self._unsent.size < n:
            self._unsent = np.zeros(max(n, 2 * self._unsent.size), dtype=np.int64)
        m = _send_all(data, lens, rows, ips, ports, n, self.row_fd, self._name, self._unsent)
        return self._unsent[:m]

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
        self.sock_rows = np.zeros(0, dtype=np.int64)
        self.row_fd = np.full(0, -1, dtype=np.int64)


def warm() -> None:
    """Compile the receive and send loops (no cache: they call libc through pointers)."""
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        a.bind(("127.0.0.1", 0))
        a.setblocking(False)
        rs = RtpSockets(batch=4)
        rs.add("warm", a, 0)
        a.sendto(b"x" * 12, a.getsockname())
        rs.poll()
        port = a.getsockname()[1]
        one = np.ones(1, dtype=np.int64)
        rs.send(np.zeros((1, 12), dtype=np.uint8), 12 * one, 0 * one, 0x7F000001 * one,
                port * one, 1)  # fmt: skip
        rs.recv()
        rs.remove("warm")
    finally:
        a.close()

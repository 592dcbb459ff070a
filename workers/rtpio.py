"""RTP socket I/O for every leg of a worker in one call: numba loops over libc `recvfrom`.

Each leg keeps its own UDP socket (its SDP port, the source port phones and NATs
expect), but asyncio's one-callback-per-datagram costs several µs of Python per
packet. Instead the worker reads all RTP sockets in one go: one compiled loop
calls `recvfrom(MSG_DONTWAIT)` on the ready sockets (below), into one
preallocated `packets × 2048` buffer (1,024 packets, 2 MB; a
fuller poll takes several fills), with each packet's length, source address and
the engine row of its leg — what `MediaEngine.receive_batch` takes.

Only ready sockets are read: every leg's socket is in one epoll set (its index
in `fds` as the event data), and the loop first asks `epoll_wait` (timeout 0)
which have data, then calls `recvfrom` once on each, and asks again until none is
left — an idle leg costs nothing per poll, and no call is spent finding a socket
empty. The epoll fd itself (`RtpSockets.fileno()`) becomes readable
when any leg socket is, so the worker can wait on it in its event loop.

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
import os
import platform
import select
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
_epoll_ctl = _libc.epoll_ctl
_epoll_ctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_epoll_ctl.restype = ctypes.c_int
_epoll_wait = _libc.epoll_wait
_epoll_wait.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
_epoll_wait.restype = ctypes.c_int
_EPOLL_CTL_ADD = 1
_EPOLL_CTL_DEL = 2
_EPOLLIN = 0x001
# struct epoll_event {uint32_t events; uint64_t data;}: packed on x86-64 (12 bytes),
# naturally aligned elsewhere (16). Read as uint32 words: the data's low word (the
# socket index; little-endian) is word 1 or 2 of each event.
_EV_PACKED = platform.machine() in ("x86_64", "AMD64", "i386", "i686")
EV_WORDS = 3 if _EV_PACKED else 4
EV_DATA = 1 if _EV_PACKED else 2


if _EV_PACKED:

    class _EpollEvent(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]

else:

    class _EpollEvent(ctypes.Structure):  # type: ignore[no-redef]
        _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]


_MSG_DONTWAIT = 0x40
MAX_DATAGRAM = 2048
SOCKADDR_IN = 16


@njit(cache=False)
def _recv_ready(
    epfd: int,
    events: np.ndarray,
    fds: np.ndarray,
    buf: np.ndarray,
    lens: np.ndarray,
    names: np.ndarray,
    namelens: np.ndarray,
    owner: np.ndarray,
) -> int:
    """Read the sockets epoll reports ready (index into fds as the event data) into
    buf, one datagram per ready socket per round, rounds until epoll reports none:
    no `recvfrom` is spent finding a socket empty (EAGAIN), and a socket holding a
    burst is read in as many rounds. Returns the packets read; stops early when buf
    is full (epoll is level-triggered: the next call finds the rest). Indexes whose
    fd is -1 (removed legs) are never read."""
    n = 0
    cap = buf.shape[0]
    size = buf.shape[1]
    maxev = events.shape[0] // EV_WORDS
    while n < cap:
        nev = _epoll_wait(epfd, events.ctypes.data, maxev, 0)
        if nev <= 0:
            return n
        before = n
        for e in range(nev):
            i = events[e * EV_WORDS + EV_DATA]
            if i >= fds.shape[0]:
                continue
            fd = fds[i]
            if fd < 0 or n >= cap:
                continue
            namelens[n] = SOCKADDR_IN
            r = _recvfrom(
                fd, buf[n].ctypes.data, size, _MSG_DONTWAIT, names[n].ctypes.data,
                namelens[n:].ctypes.data,
            )  # fmt: skip
            if r >= 0:
                lens[n] = r
                owner[n] = i
                n += 1
        if n == before:  # ready but nothing read (a pending socket error, now cleared)
            return n
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
    """The RTP sockets of every leg, polled together: one epoll set says which to read."""

    def __init__(self, batch: int = 1024) -> None:
        self.fds = np.zeros(0, dtype=np.int32)
        self._epoll = select.epoll()  # owns the fd (closed with it); driven through libc
        self.epfd = self._epoll.fileno()
        self.events = np.zeros(16 * EV_WORDS, dtype=np.uint32)  # ≥ one event per socket
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

    def fileno(self) -> int:
        """The epoll fd: readable while any leg's socket has a datagram waiting."""
        return self.epfd

    def ready(self) -> list[int]:
        """The socket indexes the epoll set reports readable now (for tests and checks;
        `recv` asks the kernel itself, from compiled code)."""
        return sorted(i for i, _ in self._epoll.poll(0))  # Python reports data as "fd"

    def _ctl(self, op: int, fd: int, i: int) -> None:
        ev = _EpollEvent(_EPOLLIN, i)
        if _epoll_ctl(self.epfd, op, fd, ctypes.byref(ev)) < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def add(self, call_id: str, sock: socket.socket, row: int = -1) -> None:
        """The leg's socket; `row` is the leg's engine row (`Leg.row`) for `recv`/`send`."""
        if call_id in self._index:
            raise ValueError(f"call {call_id!r} already has an RTP socket")
        i = self._free[-1] if self._free else len(self.call_ids)
        self._ctl(_EPOLL_CTL_ADD, sock.fileno(), i)  # first: a failure changes nothing
        if self._free:
            self._free.pop()
            self.call_ids[i] = call_id
            self.socks[i] = sock
        else:
            i = len(self.call_ids)
            self.call_ids.append(call_id)
            self.socks.append(sock)
            fds = np.full(max(16, 2 * i), -1, dtype=np.int32) if i >= self.fds.size else self.fds
            fds[: self.fds.size] = self.fds
            self.fds = fds
            if self.events.size < fds.size * EV_WORDS:
                self.events = np.zeros(fds.size * EV_WORDS, dtype=np.uint32)
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
        try:
            self._ctl(_EPOLL_CTL_DEL, int(self.fds[i]), i)
        except OSError:
            pass  # already closed by the caller: the kernel dropped it from the set
        self.fds[i] = -1
        row = int(self.sock_rows[i])
        if 0 <= row < self.row_fd.size:
            self.row_fd[row] = -1
        self.sock_rows[i] = -1
        self.call_ids[i] = None
        self.socks[i] = None
        self._free.append(i)
        return sock

    def recv(self) -> int:
        """One fill of the buffer from the ready sockets: returns n, with `buf[:n]`,
        `lens[:n]`, `names[:n]` and each packet's engine row in `rows[:n]`. When
        n == len(buf) there may be more: call again."""
        n = int(
            _recv_ready(self.epfd, self.events, self.fds, self.buf, self.lens, self.names,
                        self.namelens, self.owner)
        )  # fmt: skip
        if n:
            np.take(self.sock_rows, self.owner[:n], out=self.rows[:n])
        return n

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
        cache = self._addr_cache
        while True:
            n = _recv_ready(
                self.epfd, self.events, self.fds, self.buf, self.lens, self.names,
                self.namelens, self.owner,
            )  # fmt: skip
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

    def close(self) -> None:
        for sock in self.socks:
            if sock is not None:
                sock.close()
        self._epoll.close()
        self.epfd = -1
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
        rs.close()
    finally:
        a.close()

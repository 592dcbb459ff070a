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

**The shared port** (`[media] rtp_socket` "shared" or "auto"): one more UDP socket per
worker carries the RTP of every leg put on it, in the same epoll set. It is read with
`recvmmsg` into the same buffer (one call for everything waiting, where a per-leg
socket costs one `recvfrom` per datagram) and written with `sendmmsg` (one call for
every packet of a send batch whose leg is on it); each packet's leg comes from its
source address (`workers.demux`), and a packet from no leg's address gets row -1 and
is counted in `foreign`. A leg's latch moved by a receive pass is taken into the table
at the start of the next `recv`; a new SDP address through `refresh`.

The loops call libc by symbol (numba `ExternalFunction`s), so they are cached on disk
like the kernels; `warm()` loads (or compiles) them before the worker says ready.
IPv4 only (`sockaddr_in`); the worker falls back to asyncio endpoints for IPv6.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import select
import socket
from typing import Any

import numpy as np
from numba import njit, types

from media.legtable import LegTable
from workers.demux import DemuxTable
from workers.demux import demux as _demux

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
# libc as the compiled loops call it: by symbol (resolved when a loop is loaded, as
# numba's math functions are), so the loops are cached on disk like every kernel.
_fd, _ptr, _int, _uint = types.intc, types.voidptr, types.intc, types.uintc
_recvfrom: Any = types.ExternalFunction(
    "recvfrom", types.intp(_fd, _ptr, types.uintp, _int, _ptr, _ptr))
_sendto: Any = types.ExternalFunction(
    "sendto", types.intp(_fd, _ptr, types.uintp, _int, _ptr, types.uint32))
_recvmmsg: Any = types.ExternalFunction("recvmmsg", _int(_fd, _ptr, _uint, _int, _ptr))
_sendmmsg: Any = types.ExternalFunction("sendmmsg", _int(_fd, _ptr, _uint, _int))
_epoll_wait: Any = types.ExternalFunction("epoll_wait", _int(_fd, _ptr, _int, _int))
# epoll_ctl is called from Python (legs come and go), through ctypes.
_epoll_ctl = _libc.epoll_ctl
_epoll_ctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
_epoll_ctl.restype = ctypes.c_int
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
# The shared socket's epoll event data (a leg socket's is its index in `fds`).
SHARED_EV = 0x7FFFFFFF
# A non-RTP fd's event data (`RtpSockets.watch_control`): never read here.
CONTROL_EV = 0x7FFFFFFE
# row_fd of a leg on the shared socket.
SHARED_FD = -2
# struct mmsghdr (64 bytes on LP64) as 8 uint64 words: msg_name, msg_namelen (low half),
# msg_iov, msg_iovlen, msg_control, msg_controllen, msg_flags (low half), msg_len (low half).
MMSG_WORDS = 8
MMSG_MAX = 1024  # UIO_MAXIOV: the most datagrams one sendmmsg/recvmmsg takes
# Buffers of the shared socket: it queues what every leg's socket queued on its own.
SHARED_SOCKET_BUFFER = 8 << 20


def _mmsg_headers(data: np.ndarray, names: np.ndarray, iov: np.ndarray, hdrs: np.ndarray) -> None:
    """Point hdrs[k] at names[k] and at iov[k], and iov[k] at data[k] (its whole row)."""
    rows = data.shape[0]
    idx = np.arange(rows, dtype=np.uint64)
    iov[:, 0] = np.uint64(data.ctypes.data) + idx * np.uint64(data.strides[0])
    iov[:, 1] = data.shape[1]
    hdrs[:] = 0
    hdrs[:, 0] = np.uint64(names.ctypes.data) + idx * np.uint64(names.strides[0])
    hdrs[:, 1] = SOCKADDR_IN
    hdrs[:, 2] = np.uint64(iov.ctypes.data) + idx * np.uint64(iov.strides[0])
    hdrs[:, 3] = 1


@njit(cache=True)
def _recv_ready(
    epfd: int,
    events: np.ndarray,
    fds: np.ndarray,
    buf: np.ndarray,
    lens: np.ndarray,
    names: np.ndarray,
    namelens: np.ndarray,
    owner: np.ndarray,
    shared_fd: int,
    rx_hdrs: np.ndarray,
    keys: np.ndarray,
    vals: np.ndarray,
    salt: int,
    sock_rows: np.ndarray,
    rows: np.ndarray,
    foreign: np.ndarray,
    nev0: int,
) -> int:
    """Read the sockets epoll reports ready (index into fds as the event data) into
    buf, one datagram per ready socket per round, rounds until epoll reports none:
    no `recvfrom` is spent finding a socket empty (EAGAIN), and a socket holding a
    burst is read in as many rounds. Returns the packets read; stops early when buf
    is full (epoll is level-triggered: the next call finds the rest). Indexes whose
    fd is -1 (removed legs) are never read. The shared socket (event data SHARED_EV)
    is read with one recvmmsg into the rest of buf (owner -1; rx_hdrs point at buf and
    names, row by row). Then each packet's engine row into `rows` (`demux`, in the same
    call: a pass is one dispatch from Python), the shared socket's strangers counted
    in foreign[0]. `nev0` > 0: the caller's own `epoll_wait` left that many events in
    `events`, the first round's. Event data outside `fds` (CONTROL_EV) are not read."""
    n = 0
    cap = buf.shape[0]
    size = buf.shape[1]
    maxev = events.shape[0] // EV_WORDS
    nev = nev0
    while n < cap:
        if nev <= 0:
            nev = _epoll_wait(epfd, events.ctypes.data, maxev, 0)
            if nev <= 0:
                break
        before = n
        for e in range(nev):
            i = events[e * EV_WORDS + EV_DATA]
            if i == SHARED_EV:
                if shared_fd < 0 or n >= cap:
                    continue
                want = min(cap - n, MMSG_MAX)
                for k in range(n, n + want):
                    rx_hdrs[k, 1] = SOCKADDR_IN
                got = _recvmmsg(shared_fd, rx_hdrs[n:].ctypes.data, want, _MSG_DONTWAIT, 0)
                for k in range(n, n + max(got, 0)):
                    lens[k] = rx_hdrs[k, 7] & np.uint64(0xFFFFFFFF)
                    owner[k] = -1
                n += max(got, 0)
                continue
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
        nev = 0
        if n == before:  # ready but nothing read (a pending socket error, now cleared)
            break
    if n:
        foreign[0] += _demux(keys, vals, salt, names, owner, sock_rows, rows, n)
    return n


@njit(cache=True)
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
    shared_fd: int,
    tx_hdrs: np.ndarray,
    tx_iov: np.ndarray,
    tx_names: np.ndarray,
    tx_k: np.ndarray,
) -> int:
    """sendto() each of the first n packets from its leg's socket (row_fd[rows[k]]) to
    ips[k]:ports[k]; the packets of legs on the shared socket (row_fd SHARED_FD) go
    together through sendmmsg (tx_* hold at least n headers). Packets of rows without a
    socket here, and failed sends, are listed in `unsent`; returns how many there are."""
    m = 0
    q = 0  # packets queued for the shared socket
    base = np.uint64(data.ctypes.data)
    stride = np.uint64(data.strides[0])
    name[0] = 2  # AF_INET, little-endian sa_family_t
    name[1] = 0
    for k in range(n):
        r = rows[k]
        fd = row_fd[r] if 0 <= r < row_fd.shape[0] else -1
        if fd == SHARED_FD and shared_fd >= 0:
            nm = tx_names[q]
            nm[0] = 2
            nm[1] = 0
            port = ports[k]
            ip = ips[k]
            nm[2] = (port >> 8) & 0xFF
            nm[3] = port & 0xFF
            nm[4] = (ip >> 24) & 0xFF
            nm[5] = (ip >> 16) & 0xFF
            nm[6] = (ip >> 8) & 0xFF
            nm[7] = ip & 0xFF
            tx_iov[q, 0] = base + np.uint64(k) * stride
            tx_iov[q, 1] = lens[k]
            tx_k[q] = k
            q += 1
            continue
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
    done = 0
    while done < q:
        got = _sendmmsg(shared_fd, tx_hdrs[done:].ctypes.data, min(q - done, MMSG_MAX),
                        _MSG_DONTWAIT)  # fmt: skip
        if got <= 0:  # this one failed (a full buffer, a refused address): skip it
            unsent[m] = tx_k[done]
            m += 1
            done += 1
        else:
            done += got
    return m


class RtpSockets:
    """The RTP sockets of every leg, polled together: one epoll set says which to read."""

    def __init__(self, batch: int = 1024, legs: LegTable | None = None) -> None:
        """`legs`: the engine's leg table, whose SDP addresses and latches say which
        leg a datagram on the shared socket is for (needed only with one)."""
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
        # The shared socket (set_shared), its legs (call id -> engine row), its table.
        self.legs = legs
        self.shared_sock: socket.socket | None = None
        self.shared_fd = -1
        self.shared_calls: dict[str, int] = {}
        self._shared_by_row: dict[int, str] = {}
        self.demux = DemuxTable()
        self._foreign = np.zeros(1, dtype=np.int64)  # written by the receive loop
        self._synced = 0  # rows[:_synced] came from the last recv: latches to take in
        self.control_fd = -1  # watch_control's
        self._rx_hdrs = np.zeros((batch, MMSG_WORDS), dtype=np.uint64)
        self._rx_iov = np.zeros((batch, 2), dtype=np.uint64)
        _mmsg_headers(self.buf, self.names, self._rx_iov, self._rx_hdrs)
        self._tx_hdrs = np.zeros((0, MMSG_WORDS), dtype=np.uint64)
        self._tx_iov = np.zeros((0, 2), dtype=np.uint64)
        self._tx_names = np.zeros((0, SOCKADDR_IN), dtype=np.uint8)
        self._tx_k = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._index) + len(self.shared_calls)

    def set_shared(self, sock: socket.socket) -> None:
        """The worker's shared RTP socket (IPv4, bound, non-blocking): read in the same
        epoll set, its legs added with `add_shared`. Its buffers are raised to
        SHARED_SOCKET_BUFFER (past net.core.[rw]mem_max when the worker may)."""
        if self.shared_sock is not None:
            raise ValueError("the shared RTP socket is set already")
        if self.legs is None:
            raise ValueError("a shared RTP socket needs the engine's leg table")
        for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):
            try:  # SO_RCVBUFFORCE / SO_SNDBUFFORCE: CAP_NET_ADMIN
                sock.setsockopt(socket.SOL_SOCKET, force, SHARED_SOCKET_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, plain, SHARED_SOCKET_BUFFER)
        self._ctl(_EPOLL_CTL_ADD, sock.fileno(), SHARED_EV)
        self.shared_sock = sock
        self.shared_fd = sock.fileno()

    def add_shared(self, call_id: str, row: int) -> None:
        """A leg on the shared socket, at engine row `row`; its packets are told by
        source address (its SDP address, once known: `refresh`)."""
        if self.shared_sock is None or self.legs is None:
            raise ValueError("no shared RTP socket")
        if call_id in self._index or call_id in self.shared_calls:
            raise ValueError(f"call {call_id!r} already has an RTP socket")
        self.demux.add(row, self.legs.i)
        self.shared_calls[call_id] = row
        self._shared_by_row[row] = call_id
        self._row_fd(row, SHARED_FD)

    def refresh(self, call_id: str) -> None:
        """The leg's SDP address (MediaRemote) or latch changed: its keys follow."""
        row = self.shared_calls.get(call_id)
        if row is not None and self.legs is not None:
            self.demux.refresh(row, self.legs.i)

    def on_shared(self, call_id: str) -> bool:
        return call_id in self.shared_calls

    def _row_fd(self, row: int, fd: int) -> None:
        if row >= self.row_fd.size:
            row_fd = np.full(max(64, 2 * row + 2), -1, dtype=np.int64)
            row_fd[: self.row_fd.size] = self.row_fd
            self.row_fd = row_fd
        self.row_fd[row] = fd

    def fileno(self) -> int:
        """The epoll fd: readable while any leg's socket has a datagram waiting."""
        return self.epfd

    def ready(self) -> list[int]:
        """The socket indexes the epoll set reports readable now (for tests and checks;
        `recv` asks the kernel itself, from compiled code)."""
        return sorted(i for i, _ in self._epoll.poll(0))  # Python reports data as "fd"

    def watch_control(self, fd: int) -> None:
        """Add a non-RTP fd to the epoll set with event data CONTROL_EV (the worker's
        DEALER, while `workers.rtploop` waits on the set); `unwatch_control` removes it."""
        if self.control_fd != fd:
            self.unwatch_control()
            self._ctl(_EPOLL_CTL_ADD, fd, CONTROL_EV)
            self.control_fd = fd

    def unwatch_control(self) -> None:
        if self.control_fd >= 0:
            try:
                self._ctl(_EPOLL_CTL_DEL, self.control_fd, CONTROL_EV)
            except OSError:
                pass  # closed already: the kernel dropped it
            self.control_fd = -1

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
            self._row_fd(row, sock.fileno())
        self._index[call_id] = i

    def get(self, call_id: str) -> socket.socket | None:
        """The socket the leg's RTP leaves from (the shared one for a shared leg)."""
        if call_id in self.shared_calls:
            return self.shared_sock
        i = self._index.get(call_id)
        return None if i is None else self.socks[i]

    def remove(self, call_id: str) -> socket.socket | None:
        """The leg's socket out of the set (None for a leg on the shared socket, which
        stays; its addresses leave the table)."""
        row = self.shared_calls.pop(call_id, None)
        if row is not None:
            self._shared_by_row.pop(row, None)
            if self.legs is not None:
                self.demux.remove(row, self.legs.i)
            if row < self.row_fd.size:
                self.row_fd[row] = -1
            return None
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

    def sync_latches(self) -> None:
        """Take the latches the last receive pass moved into the shared socket's table
        (before the next pass reads)."""
        if self._synced and self.legs is not None:
            self.demux.sync(self.legs.i, self.rows, self._synced)
        self._synced = 0

    def passed(self, n: int) -> None:
        """A receive pass of `n` packets is done outside `recv` (`workers.rtploop`): its
        latches are taken in before the next one, as after `recv`."""
        if self.shared_fd >= 0:
            self._synced = n

    def recv_args(self) -> tuple[Any, ...]:
        """The receive loop's arguments (`_recv_ready`), in its order."""
        demux = self.demux
        return (self.epfd, self.events, self.fds, self.buf, self.lens, self.names,
                self.namelens, self.owner, self.shared_fd, self._rx_hdrs, demux.keys,
                demux.vals, demux.salt, self.sock_rows, self.rows, self._foreign)  # fmt: skip

    def recv(self) -> int:
        """One fill of the buffer from the ready sockets: returns n, with `buf[:n]`,
        `lens[:n]`, `names[:n]` and each packet's engine row in `rows[:n]`. When
        n == len(buf) there may be more: call again. Datagrams on the shared socket
        get their leg's row from their source address (-1: none, counted in
        `foreign`)."""
        self.sync_latches()
        n = int(_recv_ready(*self.recv_args(), 0))  # type: ignore[call-arg]
        self.passed(n)
        return n

    @property
    def foreign(self) -> int:
        """Datagrams on the shared socket from no leg's address, dropped."""
        return int(self._foreign[0])

    def send(self, data: np.ndarray, lens: np.ndarray, rows: np.ndarray, ips: np.ndarray,
             ports: np.ndarray, n: int) -> np.ndarray:  # fmt: skip
        """Send packets k < n, each from the socket of the leg in rows[k] (one compiled
        loop of sendto); returns the indexes it could not send (no IPv4 socket here for
        the row, or sendto failed)."""
        if n <= 0:
            return self._unsent[:0]
        return self.unsent(_send_all(data, lens, rows, ips, ports, n, *self.send_args(n)))

    def send_args(self, n: int) -> tuple[Any, ...]:
        """The send loop's arguments after the packets' (`_send_all`), for `n` packets."""
        if self._unsent.size < n:
            self._unsent = np.zeros(max(n, 2 * self._unsent.size), dtype=np.int64)
        if self.shared_fd >= 0 and self._tx_k.size < n:
            size = max(n, 2 * self._tx_k.size)
            self._tx_hdrs = np.zeros((size, MMSG_WORDS), dtype=np.uint64)
            self._tx_iov = np.zeros((size, 2), dtype=np.uint64)
            self._tx_names = np.zeros((size, SOCKADDR_IN), dtype=np.uint8)
            self._tx_k = np.zeros(size, dtype=np.int64)
            # the payload pointers (iov) are the send loop's: the packets' own rows
            _mmsg_headers(self._tx_names, self._tx_names, self._tx_iov, self._tx_hdrs)
        return (self.row_fd, self._name, self._unsent, self.shared_fd, self._tx_hdrs,
                self._tx_iov, self._tx_names, self._tx_k)  # fmt: skip

    def unsent(self, m: int) -> np.ndarray:
        """The indexes of the packets the last send loop left (its first `m`)."""
        return self._unsent[:m]

    def poll(self) -> list[tuple[str, bytes, tuple[str, int]]]:
        """Every datagram waiting on any leg's socket: (call_id, data, source address)."""
        out: list[tuple[str, bytes, tuple[str, int]]] = []
        cache = self._addr_cache
        while True:
            n = self.recv()
            if n == 0:
                return out
            buf, lens, names, owner, call_ids = (
                self.buf, self.lens, self.names, self.owner, self.call_ids,
            )  # fmt: skip
            by_row = self._shared_by_row
            for i in range(n):
                key = names[i, 2:8].tobytes()
                addr = cache.get(key)
                if addr is None:
                    if len(cache) > 65536:
                        cache.clear()
                    addr = cache[key] = (socket.inet_ntoa(key[2:]), int.from_bytes(key[:2], "big"))
                o = owner[i]
                call_id = call_ids[o] if o >= 0 else by_row.get(int(self.rows[i]))
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
        if self.shared_sock is not None:
            self.shared_sock.close()
            self.shared_sock, self.shared_fd = None, -1
        self.shared_calls.clear()
        self._shared_by_row.clear()


def warm() -> None:
    """Load (or compile) the receive and send loops, through every path they take."""
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
        _warm_shared()
    finally:
        a.close()


def _warm_shared() -> None:
    """The shared socket's paths: recvmmsg, the demux, sendmmsg."""
    from media.kernels.rtpbatch import L_SDP_IP, L_SDP_PORT

    legs = LegTable(capacity=1)
    shared = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rs = RtpSockets(batch=4, legs=legs)
    try:
        shared.bind(("127.0.0.1", 0))
        phone.bind(("127.0.0.1", 0))
        shared.setblocking(False)
        rs.set_shared(shared)
        row = legs.add()
        legs.i[row, L_SDP_IP] = 0x7F000001
        legs.i[row, L_SDP_PORT] = phone.getsockname()[1]
        rs.add_shared("warm", row)
        phone.sendto(b"x" * 12, shared.getsockname())
        rs.recv()
        rs.recv()
        one = np.ones(1, dtype=np.int64)
        rs.send(np.zeros((1, 12), dtype=np.uint8), 12 * one, row * one, 0x7F000001 * one,
                phone.getsockname()[1] * one, 1)  # fmt: skip
        rs.remove("warm")
    finally:
        rs.close()
        phone.close()

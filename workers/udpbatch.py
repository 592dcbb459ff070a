"""Batched UDP system calls: `recvmmsg(2)` / `sendmmsg(2)` through ctypes, over numpy buffers.

Python's socket module sends and receives one datagram per call (≈ 3-5 µs of
interpreter and syscall overhead each); these move up to `vlen` datagrams per
system call, with every header, address and payload in preallocated numpy
arrays, so a batch costs one ctypes call and a few vectorised numpy
operations whatever its size. Linux only, IPv4 (`sockaddr_in`) only.

    rx = RecvBatch(vlen=256, size=2048, timestamps=True)
    n = rx.recv(sock.fileno())          # 0 when nothing is waiting (MSG_DONTWAIT)
    rx.data[:n], rx.lengths[:n], rx.ports[:n], rx.times_ns[:n]

    tx = SendBatch(vlen=256, size=2048)
    tx.data[:n, :172] = packets; tx.lengths[:n] = 172
    tx.set_addresses(ips_u32_network_order, ports)
    tx.send(sock.fileno(), n)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket

import numpy as np

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int

MSG_DONTWAIT = 0x40
SO_TIMESTAMPNS = 35  # SCM_TIMESTAMPNS: struct timespec, CLOCK_REALTIME
_CONTROL_SIZE = 64
_SOCKADDR_SIZE = 16

# struct mmsghdr on LP64 Linux: struct msghdr (56 bytes) then unsigned msg_len, padded to 64.
MMSGHDR = np.dtype(
    {
        "names": [
            "name",
            "namelen",
            "iov",
            "iovlen",
            "control",
            "controllen",
            "flags",
            "msg_len",
        ],
        "formats": ["<u8", "<u4", "<u8", "<u8", "<u8", "<u8", "<i4", "<u4"],
        "offsets": [0, 8, 16, 24, 32, 40, 48, 56],
        "itemsize": 64,
    }
)
IOVEC = np.dtype({"names": ["base", "len"], "formats": ["<u8", "<u8"], "itemsize": 16})


def _check_abi() -> None:
    if ctypes.sizeof(ctypes.c_void_p) != 8 or not os.uname().sysname == "Linux":
        raise OSError("udpbatch needs 64-bit Linux")


_check_abi()


class _Batch:
    def __init__(self, vlen: int, size: int) -> None:
        self.vlen = vlen
        self.size = size
        self.data = np.zeros((vlen, size), dtype=np.uint8)
        self.lengths = np.zeros(vlen, dtype=np.uint64)
        self.names = np.zeros((vlen, _SOCKADDR_SIZE), dtype=np.uint8)
        self.iov = np.zeros(vlen, dtype=IOVEC)
        self.hdrs = np.zeros(vlen, dtype=MMSGHDR)
        idx = np.arange(vlen, dtype=np.uint64)
        self.iov["base"] = self.data.ctypes.data + idx * np.uint64(size)
        self.iov["len"] = size
        self.hdrs["name"] = self.names.ctypes.data + idx * np.uint64(_SOCKADDR_SIZE)
        self.hdrs["namelen"] = _SOCKADDR_SIZE
        self.hdrs["iov"] = self.iov.ctypes.data + idx * np.uint64(IOVEC.itemsize)
        self.hdrs["iovlen"] = 1
        self._hdrs_ptr = self.hdrs.ctypes.data
        # sockaddr_in fields as views
        self.families = self.names[:, 0:2].view("<u2")[:, 0]
        self.ports_be = self.names[:, 2:4].view(">u2")[:, 0]
        self.addrs_be = self.names[:, 4:8].view(">u4")[:, 0]


class RecvBatch(_Batch):
    """Buffers for one `recvmmsg` of up to `vlen` datagrams of up to `size` bytes."""

    def __init__(self, vlen: int = 256, size: int = 2048, timestamps: bool = False) -> None:
        super().__init__(vlen, size)
        self.timestamps = timestamps
        if timestamps:
            self.control = np.zeros((vlen, _CONTROL_SIZE), dtype=np.uint8)
            idx = np.arange(vlen, dtype=np.uint64)
            self.hdrs["control"] = self.control.ctypes.data + idx * np.uint64(_CONTROL_SIZE)
            self.hdrs["controllen"] = _CONTROL_SIZE
            ts = self.control[:, 16:32].view("<i8")
            self._sec = ts[:, 0]
            self._nsec = ts[:, 1]

    def recv(self, fd: int, flags: int = MSG_DONTWAIT) -> int:
        """Receive what is waiting on `fd` (up to vlen datagrams); 0 when nothing is."""
        self.hdrs["namelen"] = _SOCKADDR_SIZE
        if self.timestamps:
            self.hdrs["controllen"] = _CONTROL_SIZE
        n = _recvmmsg(fd, self._hdrs_ptr, self.vlen, flags, None)
        if n < 0:
            err = ctypes.get_errno()
            if err in (11, 4):  # EAGAIN, EINTR
                return 0
            if err == 111:  # ECONNREFUSED: an ICMP error queued on the socket
                return 0
            raise OSError(err, os.strerror(err))
        return n

    @property
    def msg_lengths(self) -> np.ndarray:
        return self.hdrs["msg_len"]

    @property
    def ports(self) -> np.ndarray:
        return self.ports_be

    @property
    def times_ns(self) -> np.ndarray:
        """Kernel receive time of each datagram (CLOCK_REALTIME ns); needs timestamps=True."""
        return self._sec * 1_000_000_000 + self._nsec


class SendBatch(_Batch):
    """Buffers for one `sendmmsg` of up to `vlen` datagrams."""

    def __init__(self, vlen: int = 256, size: int = 2048) -> None:
        super().__init__(vlen, size)
        self.families[:] = socket.AF_INET

    def set_addresses(self, addrs_be: np.ndarray, ports: np.ndarray, n: int | None = None) -> None:
        """Destinations of the first n datagrams: IPv4 addresses as integers, ports."""
        n = len(ports) if n is None else n
        self.addrs_be[:n] = addrs_be[:n]
        self.ports_be[:n] = ports[:n]

    def send(self, fd: int, n: int, lengths: np.ndarray | None = None) -> int:
        """Send the first n datagrams (lengths from `lengths`, else `self.lengths`); returns sent."""
        if n <= 0:
            return 0
        self.iov["len"][:n] = self.lengths[:n] if lengths is None else lengths[:n]
        sent = 0
        while sent < n:
            r = _sendmmsg(fd, self._hdrs_ptr + sent * MMSGHDR.itemsize, n - sent, 0)
            if r < 0:
                err = ctypes.get_errno()
                if err == 4:  # EINTR
                    continue
                if err in (11, 111, 1):  # EAGAIN, ECONNREFUSED, EPERM: drop the rest
                    return sent
                raise OSError(err, os.strerror(err))
            sent += r
        return sent


def enable_timestamps(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)


def ip_to_u32(ip: str) -> int:
    return int.from_bytes(socket.inet_aton(ip), "big")

"""Receive-side cost of the RTP socket loop: all-sockets scan (the old 10 ms poll)
against the epoll readiness path (2 ms), same traffic, CPU time of the recv calls only.

    .venv/bin/python perf/bench_rtpio.py [-n 1000] [--periods 200]

N legs each get one 172-byte packet per 20 ms period; the packets of a period are
spread over the polls of that period (2 at 10 ms, 10 at 2 ms). Sending is not timed."""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

from numba import njit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers import rtpio  # noqa: E402
from workers.rtpio import _MSG_DONTWAIT, SOCKADDR_IN, RtpSockets, _recvfrom  # noqa: E402


@njit(cache=False)
def scan_all(fds, buf, lens, names, namelens, owner):  # type: ignore[no-untyped-def]
    """The loop before the epoll set: recvfrom on every socket until EAGAIN."""
    n = 0
    size = buf.shape[1]
    for i in range(fds.shape[0]):
        fd = fds[i]
        if fd < 0:
            continue
        while True:
            if n >= buf.shape[0]:
                return n
            namelens[n] = SOCKADDR_IN
            r = _recvfrom(fd, buf[n].ctypes.data, size, _MSG_DONTWAIT, names[n].ctypes.data,
                          namelens[n:].ctypes.data)  # fmt: skip
            if r < 0:
                break
            lens[n] = r
            owner[n] = i
            n += 1
    return n


def run(rs: RtpSockets, socks: list[socket.socket], tx: socket.socket, polls: int,
        periods: int, scan: bool) -> tuple[float, int]:  # fmt: skip
    addrs = [s.getsockname() for s in socks]
    pkt = b"\x80" + b"\0" * 171
    n_legs = len(socks)
    per_poll = [list(range(p, n_legs, polls)) for p in range(polls)]
    cpu = 0.0
    got = 0
    for _ in range(periods):
        for group in per_poll:
            for j in group:
                tx.sendto(pkt, addrs[j])
            t = time.thread_time()
            while True:
                if scan:
                    n = scan_all(rs.fds, rs.buf, rs.lens, rs.names, rs.namelens, rs.owner)
                else:
                    n = rs.recv()
                got += n
                if n < rs.buf.shape[0]:
                    break
            cpu += time.thread_time() - t
    return cpu, got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--periods", type=int, default=200)
    args = ap.parse_args()
    rtpio.warm()
    rs = RtpSockets()
    socks = []
    for k in range(args.n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks.append(s)
        rs.add(f"c{k}", s, k)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    run(rs, socks, tx, 2, 5, True)  # compile, warm
    run(rs, socks, tx, 10, 5, False)
    for label, polls, scan in (("scan every 10 ms", 2, True), ("epoll every 2 ms", 10, False),
                               ("epoll every 10 ms", 2, False)):  # fmt: skip
        cpu, got = run(rs, socks, tx, polls, args.periods, scan)
        assert got == args.n * args.periods, (got, args.n * args.periods)
        per_pkt = cpu / got * 1e6
        share = cpu / (args.periods * 0.020) / args.n * 100
        print(f"{label:18s}: {per_pkt:5.2f} µs CPU per packet received, "
              f"{share:.4f} % of a core per call (receive loop only)")  # fmt: skip
    rs.close()
    tx.close()


if __name__ == "__main__":
    main()

"""The floor under a bridged relay on this machine: a loop that never returns to Python.

    .venv/bin/python perf/bench_relay_floor.py                      # 100 250 500 calls, interval 0 and 1 ms
    .venv/bin/python perf/bench_relay_floor.py -n 100 --interval-ms 1 --measure 20 --rounds 3

Not the media worker: a measuring stick for a design. A relay process holds N bridged
calls (2N UDP sockets on loopback, legs 2c and 2c+1 bridged). One thread runs a numba
`nogil` loop that does all of it in compiled code: block in `epoll_wait` while idle;
read every ready socket (`recvfrom` until epoll reports none); give each packet its
peer's SSRC and next sequence number; `sendto` it from the peer leg's socket to the
peer's phone. With `--interval-ms` > 0, after a pass that found packets it sleeps
(`nanosleep`) until that long after the pass began, so packets arriving meanwhile are
read together, as the media worker's 1 ms read interval does; 0: it goes straight back
to `epoll_wait`, waking for each arrival as rtpengine's pollers do. No engine, no
statistics, no latching, no RFC 4733, no tick: only what every relay must do per packet
and per wake-up.

The phones are this script (`benchlib.PhoneSockets`: a socket per leg, its compiled
sendto and epoll + recvmmsg loops): every leg sends one 172-byte packet every 20 ms at
one of 20 evenly spaced instants (fixed per leg at random), as `bench_relay.py --phases
20 --gen-sockets per_leg` does, and drains what comes back.

Reports, per step after `--warmup` s over `--measure` s: the relay thread's CPU
(utime + stime from /proc, % of a core and per call), its wake-ups (voluntary context
switches) and passes a second, packets relayed a second and the phones' packets
forwarded / lost (and any heard by another phone than the sender's peer). Compare its per-call figure with `bench_relay.py`'s worker and
rtpengine on the same machine: the difference to the worker is what the worker's
Python costs per wake-up and per packet beyond what the kernel takes (perf/README.md,
"100 bridged calls"). Writes JSON (default perf/results/bench_relay_floor-<ts>.json).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import multiprocessing as mp
import os
import random
import select
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from perf.benchlib import PhoneSockets, Received, log, positive_int  # noqa: E402
from workers.rtpio import EV_DATA, EV_WORDS, _epoll_wait, _recvfrom, _sendto  # noqa: E402
from workers.rtploop import now_ns  # noqa: E402

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_nanosleep = _libc.nanosleep
_nanosleep.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_nanosleep.restype = ctypes.c_int
_MSG_DONTWAIT = 0x40
PKT = 172
PHASES = 20
IDLE_WAIT_MS = 20  # the idle loop's epoll_wait timeout: it looks at the end time this often


@njit(nogil=True, cache=False)
def relay_loop(epfd: int, events: np.ndarray, fds: np.ndarray, peer: np.ndarray,
               names: np.ndarray, buf: np.ndarray, name: np.ndarray, namelen: np.ndarray,
               ts: np.ndarray, sleep_ts: np.ndarray, interval_ns: int, end_ns: int,
               stats: np.ndarray) -> None:  # fmt: skip
    """Relay until `end_ns` (CLOCK_MONOTONIC). Legs are indexed by their epoll event
    data; fds[i] is leg i's socket, peer[i] its peer leg, names[i] leg i's phone
    (`sockaddr_in`). stats: passes, packets relayed, the sequence counter."""
    maxev = events.shape[0] // EV_WORDS
    idle = True
    while now_ns(ts) < end_ns:
        if idle and _epoll_wait(epfd, events.ctypes.data, maxev, IDLE_WAIT_MS) <= 0:
            continue
        began = now_ns(ts)
        got = 0
        while True:
            nev = _epoll_wait(epfd, events.ctypes.data, maxev, 0)
            if nev <= 0:
                break
            for e in range(nev):
                i = events[e * EV_WORDS + EV_DATA]
                namelen[0] = 16
                r = _recvfrom(fds[i], buf.ctypes.data, buf.shape[0], _MSG_DONTWAIT,
                              name.ctypes.data, namelen.ctypes.data)  # fmt: skip
                if r < 12:
                    continue
                got += 1
                p = peer[i]
                stats[2] += 1
                buf[2] = (stats[2] >> 8) & 0xFF  # the peer stream's sequence number
                buf[3] = stats[2] & 0xFF
                buf[8] = 0x12  # and its SSRC
                buf[9] = 0x34
                buf[10] = (p >> 8) & 0xFF
                buf[11] = p & 0xFF
                _sendto(fds[p], buf.ctypes.data, r, _MSG_DONTWAIT, names[p].ctypes.data, 16)
        stats[0] += 1
        stats[1] += got
        idle = got == 0
        if not idle and interval_ns > 0:
            wait = began + interval_ns - now_ns(ts)
            if wait > 0:
                sleep_ts[0] = 0
                sleep_ts[1] = wait
                _nanosleep(sleep_ts.ctypes.data, 0)


def _thread_counters(tid: int) -> tuple[float, int]:
    """A thread's utime + stime (s) and voluntary context switches."""
    task = Path(f"/proc/self/task/{tid}")
    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    status = (task / "status").read_text()
    vol = int(status.split("voluntary_ctxt_switches:")[1].split()[0])
    return cpu, vol


def relay_process(legs: int, interval_ms: float, warmup: float, measure: float,
                  conn: Connection) -> None:  # fmt: skip
    """The relay: its ports to the parent, the phones' ports back, then the loop in a
    thread for warmup + measure + 1 s; its counters over the measured window."""
    epoll = select.epoll()
    socks = []
    for _ in range(legs):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks.append(s)
    conn.send([s.getsockname()[1] for s in socks])
    phone_ports: list[int] = conn.recv()
    # select.epoll's event data is the fd: index every table by fd.
    size = max(s.fileno() for s in socks) + 1
    fds = np.full(size, -1, dtype=np.int32)
    peer = np.full(size, -1, dtype=np.int64)
    names = np.zeros((size, 16), dtype=np.uint8)
    for k, s in enumerate(socks):
        fd, peer_fd = s.fileno(), socks[k ^ 1].fileno()
        fds[fd] = fd
        peer[fd] = peer_fd
        port = phone_ports[k]
        names[fd, :8] = [2, 0, port >> 8, port & 0xFF, 127, 0, 0, 1]
        epoll.register(fd, select.EPOLLIN)
    events = np.zeros(EV_WORDS * 256, dtype=np.uint32)
    buf = np.zeros(2048, dtype=np.uint8)
    name = np.zeros(16, dtype=np.uint8)
    namelen = np.zeros(1, dtype=np.uint32)
    ts = np.zeros(2, dtype=np.int64)
    sleep_ts = np.zeros(2, dtype=np.int64)
    stats = np.zeros(3, dtype=np.int64)
    args = (epoll.fileno(), events, fds, peer, names, buf, name, namelen, ts, sleep_ts,
            int(interval_ms * 1e6))  # fmt: skip
    relay_loop(*args, 0, stats)  # compile (ends at once)
    conn.send("ready")
    end = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + int((warmup + measure + 1) * 1e9)
    thread = threading.Thread(target=relay_loop, args=(*args, end, stats))
    thread.start()
    time.sleep(warmup)
    assert thread.native_id is not None
    cpu0, vol0 = _thread_counters(thread.native_id)
    s0 = stats.copy()
    time.sleep(measure)
    cpu1, vol1 = _thread_counters(thread.native_id)
    s1 = stats.copy()
    thread.join()
    conn.send({"cpu_pct_core": round(100 * (cpu1 - cpu0) / measure, 2),
               "wakeups_per_s": round((vol1 - vol0) / measure),
               "passes_per_s": round(float(s1[0] - s0[0]) / measure),
               "relayed_per_s": round(float(s1[1] - s0[1]) / measure)})
    epoll.close()
    for s in socks:
        s.close()


def run_step(calls: int, interval_ms: float, warmup: float, measure: float,
             seed: int) -> dict[str, Any]:  # fmt: skip
    legs = 2 * calls
    here, there = mp.Pipe()
    proc = mp.Process(target=relay_process, args=(legs, interval_ms, warmup, measure, there))
    proc.start()
    try:
        relay_ports = np.array(here.recv(), dtype=np.int64)
        phones = PhoneSockets(legs)
        here.send([int(p) for p in phones.ports])
        if not here.poll(60) or here.recv() != "ready":
            raise RuntimeError("the relay process did not get ready")
        rng = random.Random(seed)
        phase = np.array([rng.randrange(PHASES) for _ in range(legs)])
        by_phase = [np.flatnonzero(phase == k) for k in range(PHASES)]
        data = np.zeros((legs, PKT), dtype=np.uint8)
        data[:, 0] = 0x80
        data[:, 12] = np.arange(legs) >> 8  # the sending leg, in the payload the relay keeps
        data[:, 13] = np.arange(legs) & 0xFF
        lens = np.full(legs, PKT, dtype=np.int64)
        rx = Received(cap=1 << 14, head=14)
        sent = heard = misrouted = 0  # over the whole run (the relay runs a second past it)

        def drain() -> None:
            nonlocal heard, misrouted
            rx.n = 0
            phones.recv(rx)
            origin = (rx.data[: rx.n, 12].astype(np.int64) << 8) | rx.data[: rx.n, 13]
            heard += rx.n
            misrouted += int(np.count_nonzero(origin != (rx.leg[: rx.n] ^ 1)))

        started = time.monotonic()
        stop = started + warmup + measure
        k = 0
        while True:
            target = started + k * 0.020 / PHASES
            if target >= stop:
                break
            while (wait := target - time.monotonic()) > 0:
                select.select([phones.fileno()], [], [], wait)
                drain()
            legs_now = by_phase[k % PHASES]
            n = phones.send(data[legs_now], lens[legs_now], legs_now, relay_ports[legs_now],
                            legs_now.size)  # fmt: skip
            sent += n
            k += 1
        time.sleep(0.05)  # the last packets' way back
        drain()
        result: dict[str, Any] = here.recv()
        phones.close()
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    result.update(calls=calls, interval_ms=interval_ms, sent=sent, forwarded=heard,
                  lost=max(0, sent - heard), misrouted=misrouted,
                  cpu_pct_per_call=round(result["cpu_pct_core"] / calls, 4))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--calls", type=positive_int, nargs="+", default=[100, 250, 500])
    ap.add_argument("--interval-ms", type=float, nargs="+", default=[0.0, 1.0],
                    help="sleep after a pass that found packets until this long after it "
                         "began (0: straight back to epoll_wait)")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--measure", type=float, default=15.0)
    ap.add_argument("--rounds", type=positive_int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if any(iv < 0 for iv in args.interval_ms):
        ap.error("--interval-ms must be >= 0")
    results = []
    for r in range(args.rounds):
        for calls in args.calls:
            for interval in args.interval_ms:
                res = run_step(calls, interval, args.warmup, args.measure, seed=r)
                res["round"] = r + 1
                results.append(res)
                log(f"{calls} calls, interval {interval:g} ms: {res['cpu_pct_core']} % of a "
                    f"core = {res['cpu_pct_per_call']} %/call, {res['wakeups_per_s']} "
                    f"wake-ups/s, {res['passes_per_s']} passes/s, forwarded "
                    f"{res['forwarded']} / {res['sent']}")
    print(f"\n{'round':>5} {'calls':>5} {'interval':>9} {'%core':>7} {'%/call':>8} "
          f"{'wakes/s':>8} {'passes/s':>9} {'lost':>6}")
    for res in results:
        print(f"{res['round']:>5} {res['calls']:>5} {res['interval_ms']:>7g}ms "
              f"{res['cpu_pct_core']:>7} {res['cpu_pct_per_call']:>8} "
              f"{res['wakeups_per_s']:>8} {res['passes_per_s']:>9} {res['lost']:>6}")
    out = Path(args.json or ROOT / "perf" / "results"
               / f"bench_relay_floor-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tool": "bench_relay_floor", "config": vars(args),
                               "results": results}, indent=1))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

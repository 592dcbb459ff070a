"""The receive loop in compiled code while legs are bridged: `RelayLoop`.

While any leg is bridged the worker used to read its RTP sockets every 1 ms from the
event loop (`MediaWorker._poll_due`): each read a uvloop timer, a Python callback, a
few compiled passes and the glue between them, ~67 µs of CPU whatever it found, and a
third of the worker's CPU at 100 bridged calls (perf/README.md, "100 bridged calls").
Relaying itself is compiled already (`media.kernels.rtpbatch`: `rx_batch`,
`relay_batch`; `workers.rtpio`: the reads and the sends); what cost was going back to
Python between packets.

So between two ticks the worker hands the thread to `RelayLoop.wait`, one compiled
call that does what those reads did, without Python in between:

1. block in `epoll_wait` on the RTP sockets' epoll set, which holds the front's
   DEALER (its `zmq.FD`, `RtpSockets.watch_control`) too while this mode lasts, at
   most until the tick is due;
2. on RTP, one receive pass: `_recv_ready` (every ready socket, from the events that
   wait returned, and the demux), then
   `rx_batch` (statistics, latching, in-band rings: the same kernel and the same
   tables as `MediaEngine.receive_batch`), then `relay_batch` and `_send_all`:
   a relayed packet leaves in the pass that read it, as rtpengine's pollers do;
3. go back to 1.

It returns to Python (`MediaWorker.relay_until`) only for what Python must do: the
tick is due (`DEADLINE`); the front sent something, or a signal came
(`CONTROL`: the event loop runs, then the wait goes on); a pass has a packet that
Python must see at once (`PASS`: a latch, whose address the shared socket's table and
the leg follow before the next pass; a recorded leg's audio; more or wider packets to
relay than the relay batch holds: the engine finishes that pass,
`MediaEngine.finish_batch`, relay included, growing the batch); relayed packets that the send loop
could not send or that a recorded leg hears (`SENT`); `epoll_wait` failed, as a signal makes it (`FAILED`: the event loop
reads until the tick). RFC 4733 events are relayed in
the loop and wait, whole, in a small queue (`DEFER_PACKETS`) for the next return,
where the engine detects their digits (`MediaEngine.finish_deferred`): a digit is
reported up to a tick later, and a press costs no return of its own; a full queue
makes the pass a `PASS`. Everything it touches is the engine's own state, in the thread that
owns it, so there is nothing to lock: the control plane changes the tables only while
the loop is out of this call. Sockets that are not in the set (RTCP, WebSocket,
IPv6 legs on asyncio endpoints) wait for the next return, at most a tick:
`MediaWorker.relay_loop_ok` keeps the old path while any leg needs IPv6 or a
WebSocket.

It wakes on every arrival, as rtpengine's pollers do. Pacing the passes instead (the
next no sooner than 1 ms after the last, what arrives meanwhile read together) cost as
much CPU at 100 bridged calls and more at 500 (`perf/bench_relay.py`, worker alone:
0.0665 against 0.070-0.078 % of a core per call), with relay p50 0.8 ms instead of 0.1:
a wake-up's CPU goes mostly to the sender, a timer's to the relay
(`perf/bench_relay_floor.py`).
"""

from __future__ import annotations

import socket
import tempfile
from typing import Any

import numpy as np
from numba import njit, types

from media.engine import MediaEngine
from media.kernels import rtpbatch as _k
from workers.rtpio import (
    CONTROL_EV,
    EV_DATA,
    EV_WORDS,
    MAX_DATAGRAM,
    RtpSockets,
    _epoll_wait,
    _recv_ready,
    _send_all,
)

_clock_gettime: Any = types.ExternalFunction("clock_gettime", types.intc(types.intc, types.voidptr))
CLOCK_MONOTONIC = 1  # time.monotonic()'s clock

# Why `wait` returned.
DEADLINE = 0
CONTROL = 1
PASS = 2
SENT = 3
FAILED = 4  # epoll_wait failed: the event loop reads until the tick
# A pass's actions that Python finishes at once (`MediaEngine.finish_batch`): a latch
# (the shared socket's table and the leg's address follow before the next pass), a
# recorded leg's audio.
_NOW = _k.ACT_LATCHED | _k.ACT_RECORD
# Packets Python handles after the relay, at the next return (`deferred`): RFC 4733
# events (digit detection), whose relay is compiled.
DEFER_PACKETS = 64
# Counters in `RelayLoop.counts`.
WAKES = 0  # epoll_wait returns with RTP ready
PASSES = 1  # receive passes that read something
RELAYED = 2  # packets relayed in compiled passes
RETURNS = 3  # returns to Python
# What `wait` leaves for Python in `RelayLoop.last` (with the pass's `now` in `RelayLoop.at`).
LAST_N = 0  # PASS: packets in the buffer; SENT: relayed packets in the engine's relay batch
LAST_SEEN = 1  # PASS: the union of the pass's ACT_* bits
LAST_UNSENT = 2  # SENT: how many of them the send loop left (indexes: `RtpSockets.unsent`)
LAST_DEFERRED = 3  # packets in the deferred queue


@njit(nogil=True, cache=True)
def now_ns(ts: np.ndarray) -> int:
    """CLOCK_MONOTONIC in nanoseconds (`ts`: int64[2], a struct timespec)."""
    _clock_gettime(CLOCK_MONOTONIC, ts.ctypes.data)
    return ts[0] * 1_000_000_000 + ts[1]


@njit(nogil=True, cache=True)
def _wait(
    deadline_ns: int,
    epfd: int, events: np.ndarray, fds: np.ndarray, buf: np.ndarray, lens: np.ndarray,
    names: np.ndarray, namelens: np.ndarray, owner: np.ndarray, shared_fd: int,
    rx_hdrs: np.ndarray, keys: np.ndarray, vals: np.ndarray, salt: int,
    sock_rows: np.ndarray, rows: np.ndarray, foreign: np.ndarray,
    relatch_s: float, any_ssrc: bool, li: np.ndarray, lf: np.ndarray, si: np.ndarray,
    sf: np.ndarray, ring: np.ndarray, read_ts: np.ndarray, started: np.ndarray,
    silence: np.ndarray, anchor_ts: np.ndarray, anchor_t: np.ndarray, late_run: np.ndarray,
    late: np.ndarray, resyncs: np.ndarray, last_seq: np.ndarray, last_end: np.ndarray,
    action: np.ndarray,
    rdata: np.ndarray, rlens: np.ndarray, rrows: np.ndarray, rts: np.ndarray,
    rat: np.ndarray, rips: np.ndarray, rports: np.ndarray,
    row_fd: np.ndarray, name: np.ndarray, unsent: np.ndarray, send_shared_fd: int,
    tx_hdrs: np.ndarray, tx_iov: np.ndarray, tx_names: np.ndarray, tx_k: np.ndarray,
    dbuf: np.ndarray, dlens: np.ndarray, drows: np.ndarray, dat: np.ndarray,
    ts: np.ndarray, counts: np.ndarray, last: np.ndarray, at: np.ndarray,
) -> int:  # fmt: skip
    """The loop of the module docstring until `deadline_ns`; returns why it stopped."""
    maxev = events.shape[0] // EV_WORDS
    while True:
        t = now_ns(ts)
        if t >= deadline_ns:
            return DEADLINE
        timeout_ms = (deadline_ns - t + 999_999) // 1_000_000
        nev = _epoll_wait(epfd, events.ctypes.data, maxev, timeout_ms)
        if nev < 0:
            return FAILED  # EINTR (a signal, for the event loop's handler) or worse
        if nev == 0:
            continue
        for e in range(nev):
            if events[e * EV_WORDS + EV_DATA] == CONTROL_EV:
                return CONTROL
        counts[WAKES] += 1
        n = _recv_ready(epfd, events, fds, buf, lens, names, namelens, owner, shared_fd,
                        rx_hdrs, keys, vals, salt, sock_rows, rows, foreign, nev)  # fmt: skip
        if n == 0:
            continue
        now = now_ns(ts) / 1e9
        at[0] = now
        counts[PASSES] += 1
        seen = _k.rx_batch(buf, lens, names, rows, n, now, relatch_s, any_ssrc, li, lf, si,
                           sf, ring, read_ts, started, silence, anchor_ts, anchor_t,
                           late_run, late, resyncs, last_seq, last_end, action)  # fmt: skip
        later = 0
        if seen & _k.ACT_PYTHON:
            for i in range(n):
                if action[i] & _k.ACT_PYTHON:
                    later += 1
        # A pass the relay batch cannot hold whole (more packets, or a wider one, than it
        # has room for) is Python's too: `MediaEngine._relay` grows the batch.
        wide = False
        if seen & _k.ACT_RELAY:
            relayed = 0
            for i in range(n):
                if action[i] & _k.ACT_RELAY:
                    relayed += 1
                    off, end = _k.payload_span(buf, i, lens[i])
                    if _k.HEADER_SIZE + end - off > rdata.shape[1]:  # relay_batch's test
                        wide = True
            wide = wide or relayed > rdata.shape[0]
        if seen & _NOW or wide or last[LAST_DEFERRED] + later > dbuf.shape[0]:
            last[LAST_N] = n
            last[LAST_SEEN] = seen
            return PASS
        if later:
            d = last[LAST_DEFERRED]
            for i in range(n):
                if action[i] & _k.ACT_PYTHON:
                    size = lens[i]
                    dbuf[d, :size] = buf[i, :size]
                    dlens[d] = size
                    drows[d] = rows[i]
                    dat[d] = now
                    d += 1
            last[LAST_DEFERRED] = d
        if seen & _k.ACT_RELAY == 0:
            continue
        # The relay batch holds the pass (above): one call relays it.
        p, _ = _k.relay_batch(buf, lens, rows, n, 0, action, now, li, lf, rdata, rlens,
                              rrows, rts, rat, rips, rports, 0)  # fmt: skip
        if p == 0:
            continue
        m = _send_all(rdata, rlens, rrows, rips, rports, p, row_fd, name, unsent,
                      send_shared_fd, tx_hdrs, tx_iov, tx_names, tx_k)  # fmt: skip
        counts[RELAYED] += p - m
        heard = False
        for k in range(p):
            if li[rrows[k], _k.L_REC] >= 0:
                heard = True
                break
        if m > 0 or heard:
            last[LAST_N] = p
            last[LAST_UNSENT] = m
            return SENT


class RelayLoop:
    """The compiled wait over one worker's RTP sockets and its DEALER (module text)."""

    def __init__(self, rtp: RtpSockets, control_fd: int) -> None:
        self.rtp = rtp
        self.control_fd = control_fd
        self.counts = np.zeros(4, dtype=np.int64)
        self.last = np.zeros(4, dtype=np.int64)
        self.at = np.zeros(1, dtype=np.float64)
        self._ts = np.zeros(2, dtype=np.int64)
        # The deferred packets (RFC 4733 events), each with its pass's `now`.
        self.dbuf = np.zeros((DEFER_PACKETS, MAX_DATAGRAM), dtype=np.uint8)
        self.dlens = np.zeros(DEFER_PACKETS, dtype=np.int64)
        self.drows = np.zeros(DEFER_PACKETS, dtype=np.int64)
        self.dat = np.zeros(DEFER_PACKETS, dtype=np.float64)

    def wait(self, deadline: float, engine: MediaEngine) -> int:
        """Relay until `deadline` (time.monotonic()) or until Python is needed; returns
        DEADLINE, CONTROL, PASS or SENT (module text), with `last` and `at` set for the
        last two. The deferred packets are Python's after any return (`deferred`)."""
        rtp = self.rtp
        rtp.sync_latches()
        rtp.watch_control(self.control_fd)
        batch = rtp.buf.shape[0]
        relay = engine.relay
        relay.n = 0
        t = engine.tab
        self.counts[RETURNS] += 1
        return int(
            _wait(int(deadline * 1e9), *rtp.recv_args(),  # type: ignore[call-arg]
                  engine.relatch_s, engine.relatch_any_ssrc, t.i, t.f, t.stats.i, t.stats.f,
                  *engine.rx.arrays(), engine.action_buffer(batch),
                  relay.data, relay.lens, relay.rows, relay.ts, relay.at, relay.ips,
                  relay.ports, *rtp.send_args(batch), self.dbuf, self.dlens, self.drows,
                  self.dat, self._ts, self.counts, self.last, self.at)
        )  # fmt: skip

    def deferred(self) -> int:
        """How many packets wait in the deferred queue (`dbuf` ...): the caller handles
        them (`MediaEngine.finish_deferred`) and calls `clear_deferred`."""
        return int(self.last[LAST_DEFERRED])

    def clear_deferred(self) -> None:
        self.last[LAST_DEFERRED] = 0

    @property
    def active(self) -> bool:
        """Between the first `wait` and `stop`."""
        return self.rtp.control_fd >= 0

    def stop(self) -> None:
        """Out of the compiled mode: the RTP epoll set no longer holds the DEALER's fd."""
        self.rtp.unwatch_control()


def warm() -> None:
    """Load (or compile) the loop with one call whose tick is due already, on real tables
    of the types the worker passes."""
    from media.prompts import PromptCache

    engine = MediaEngine(PromptCache(tempfile.gettempdir()))
    rtp = RtpSockets(batch=4, legs=engine.tab)
    control, other = socket.socketpair()
    try:
        loop = RelayLoop(rtp, control.fileno())
        loop.wait(0.0, engine)
        loop.stop()
    finally:
        rtp.close()
        control.close()
        other.close()

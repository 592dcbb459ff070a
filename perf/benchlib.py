"""What the media benchmarks share: the script as the front over ZeroMQ, one real
`workers.media` process, generator sockets, and the /proc readings.

`perf/bench_media.py` (IVR calls) and `perf/bench_relay.py` (bridged calls) both
start a fresh worker per step with `start_media_worker`, take the ports it
announces as the front does (`allocate_legs`), and drive RTP from sockets made
by `generator_socket` (a few, each for many legs, `sendmmsg`) or `PhoneSockets`
(one per simulated phone, its own source address, as a worker's shared RTP port
needs); what comes back is kept in `Received`. They only use the ZeroMQ messages
of `pbx.messages` and the RTP on the wire, so they keep working when the worker's
insides change.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from numba import njit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pbx.messages import (  # noqa: E402
    MediaAllocate,
    MediaAllocated,
    MediaHeartbeat,
    MediaPorts,
    MediaReady,
    decode,
    encode,
)
from pbx.planes import ensure_private_dir  # noqa: E402
from workers.rtpio import EV_DATA, EV_WORDS, RtpSockets, _epoll_wait, _recvmmsg  # noqa: E402
from workers.udpbatch import MMSGHDR, RecvBatch, enable_timestamps  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of the whole process (every thread: /proc/<pid>/stat sums the group)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_s(pid: int) -> dict[str, float]:
    """utime + stime per thread name (threads of the same name summed)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf(
            "SC_CLK_TCK"
        )
    return out


def proc_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def udp_counter(name: str) -> int:
    """One machine-wide UDP counter of /proc/net/snmp (InDatagrams, OutDatagrams, ...)."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()
             if ln.startswith("Udp:")]  # fmt: skip
    if len(lines) < 2 or name not in lines[0]:
        return 0
    return int(lines[1][lines[0].index(name)])


def udp_rcvbuf_errors() -> int:
    """Datagrams the kernel dropped for a full receive buffer, machine-wide (/proc/net/snmp):
    tells a starved generator's drops from packets the worker never sent."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()
             if ln.startswith("Udp:")]  # fmt: skip
    if len(lines) < 2 or "RcvbufErrors" not in lines[0]:
        return 0
    return int(lines[1][lines[0].index("RcvbufErrors")])


def udp_socket_drops() -> dict[int, int]:
    """Datagrams dropped per local UDP port (the `drops` column of /proc/net/udp: a full
    receive buffer, or a failed filter), summed over the sockets bound to each port."""
    out: dict[int, int] = {}
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) < 13:
            continue
        port = int(fields[1].rsplit(":", 1)[1], 16)
        out[port] = out.get(port, 0) + int(fields[-1])
    return out


def machine_cpu_s() -> float:
    """CPU seconds every core spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(max_busy_cores: float, max_wait_s: float, sample_s: float = 2.0) -> float:
    """Wait (at most max_wait_s) until the machine's busy cores over `sample_s` are at most
    `max_busy_cores`; returns the last reading."""
    deadline = time.monotonic() + max_wait_s
    while True:
        c0 = machine_cpu_s()
        time.sleep(sample_s)
        busy = (machine_cpu_s() - c0) / sample_s
        if busy <= max_busy_cores or time.monotonic() >= deadline:
            return busy


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (--phases, counts)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if x.size else 0.0


class Front:
    """A ZeroMQ ROUTER bound where the worker connects, as `pbx.front` is."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.bind(endpoint)
        self.identity = b""

    def recv(self, timeout_s: float) -> Any | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        identity, frame = self.sock.recv_multipart()
        self.identity = identity
        return decode(frame)

    def send(self, msg: Any) -> None:
        self.sock.send_multipart([self.identity, encode(msg)])

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@dataclass
class MediaWorker:
    proc: subprocess.Popen[bytes]
    front: Front
    rss_ready_kb: int

    def stop(self) -> list[str]:
        """End the worker (terminate, then kill after 10 s); its ERROR log lines."""
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self.front.close()
        return [ln for ln in (err or b"").decode(errors="replace").splitlines() if "ERROR" in ln]


def start_media_worker(tmp: Path, rtp_ports: str, capacity: int, sounds: Path | None = None,
                       rtp_socket: str | None = None) -> MediaWorker:  # fmt: skip
    """A fresh `workers.media` with its own config in `tmp`, connected to a new Front;
    returns once it sent MediaReady (and settled for a second)."""
    endpoint = f"ipc://{tmp / 'zmq' / 'media'}"
    # The planes' single-host default: an IPC socket in a directory only we can open.
    problem = ensure_private_dir(tmp / "zmq")
    if problem is not None:
        raise RuntimeError(f"{tmp / 'zmq'} {problem}")
    sounds_line = f'sounds_dir = "{sounds}"\n' if sounds is not None else ""
    if rtp_socket is not None:  # [media] rtp_socket (per_leg, shared, auto), where it exists
        sounds_line += f'rtp_socket = "{rtp_socket}"\n'
    (tmp / "pbx.toml").write_text(
        f'[zmq]\nmedia_endpoint = "{endpoint}"\n\n'
        f'[media]\nrtp_ip = "127.0.0.1"\nrtp_ports = "{rtp_ports}"\n'
        f"{sounds_line}heartbeat_ms = 500\ncapacity = {capacity}\n"
        '\n[logging]\nlevel = "WARNING"\n',
        encoding="utf-8",
    )
    front = Front(endpoint)
    env = {**os.environ, "PBX_CONFIG": str(tmp / "pbx.toml")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.media"], cwd=ROOT, env=env, stderr=subprocess.PIPE
    )
    worker = MediaWorker(proc, front, 0)
    try:
        ready = front.recv(120.0)
        if not isinstance(ready, MediaReady):
            raise RuntimeError(f"worker did not get ready: {ready!r}")
        time.sleep(1.0)
        worker.rss_ready_kb = proc_rss_kb(proc.pid)
    except BaseException:
        worker.stop()
        raise
    return worker


def allocate_legs(front: Front, call_ids: list[str], inband_dtmf: bool,
                  shared: bool = False) -> np.ndarray:  # fmt: skip
    """Allocate a leg per call id as the front does: each gets a port the worker announced
    (MediaPorts after MediaReady, then as its pool refills), never one handed out before;
    with `shared`, every leg gets the worker's shared port (MediaPorts.shared_port).
    Returns the worker's RTP port of each leg."""
    worker_port = np.zeros(len(call_ids), dtype=np.int64)
    got = sent = 0
    free: list[int] = []
    handed: set[int] = set()
    shared_port: int | None = None
    while got < len(call_ids):
        while (free or shared_port) and sent < len(call_ids):
            port = shared_port if shared_port else free.pop()
            handed.add(port)
            worker_port[sent] = port
            sent += 1
            front.send(MediaAllocate(call_id=call_ids[sent - 1], rtp_port=port, seq=sent,
                                     inband_dtmf=inband_dtmf))  # fmt: skip
        msg = front.recv(10.0)
        if msg is None:
            raise RuntimeError(f"only {got} of {len(call_ids)} legs allocated")
        if isinstance(msg, MediaPorts | MediaHeartbeat):
            # An announcement confirms the allocations up to its `allocate_seq` (a
            # refusal would have come before it, as a MediaAllocated).
            got = max(got, msg.allocate_seq)
            free = [p for p in msg.ports if p not in handed]
            if shared:
                # getattr: workers from before the shared port have no such field
                shared_port = getattr(msg, "shared_port", None)
                if shared_port is None:
                    raise RuntimeError("the worker announced no shared RTP port")
        elif isinstance(msg, MediaAllocated):
            raise RuntimeError(f"allocation of {msg.call_id} failed: {msg.error}")
    return worker_port


def generator_socket(buffer_bytes: int = 8 << 20) -> socket.socket:
    """A non-blocking UDP socket on loopback with big buffers and kernel receive times."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):
        try:  # SO_RCVBUFFORCE / SO_SNDBUFFORCE pass rmem_max (root only)
            s.setsockopt(socket.SOL_SOCKET, force, buffer_bytes)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, opt, buffer_bytes)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    enable_timestamps(s)
    return s


# ---------------------------------------------------------------- what the phones hear


@dataclass
class Received:
    """What the generator received, one row per RTP datagram kept: the leg that heard
    it, its kernel receive time (CLOCK_REALTIME ns) and its first `head` bytes (the RTP
    header and as much payload as the script looks at)."""

    cap: int
    head: int
    n: int = 0
    overflow: int = 0  # datagrams not kept: more than `cap` arrived

    def __post_init__(self) -> None:
        self.leg = np.empty(self.cap, dtype=np.int64)
        self.t_ns = np.empty(self.cap, dtype=np.int64)
        self.data = np.zeros((self.cap, self.head), dtype=np.uint8)

    def add(self, rx: RecvBatch, n: int, legs: np.ndarray) -> None:
        """The first n datagrams of a receive batch, each heard by legs[k] (-1: none)."""
        ok = (rx.msg_lengths[:n] >= 12) & (legs >= 0)
        m = int(ok.sum())
        if self.n + m > self.cap:
            self.overflow += m
            return
        s = slice(self.n, self.n + m)
        self.leg[s] = legs[ok]
        self.t_ns[s] = rx.times_ns[:n][ok]
        self.data[s] = rx.data[:n, : self.head][ok]
        self.n += m

    def seq(self) -> np.ndarray:
        return self.data[: self.n, 2:4].view(">u2")[:, 0].astype(np.int64)

    def pt(self) -> np.ndarray:
        return (self.data[: self.n, 1] & 0x7F).astype(np.int64)

    def ts(self) -> np.ndarray:
        return self.data[: self.n, 4:8].view(">u4")[:, 0].astype(np.int64)


# ---------------------------------------------------------------- a socket per phone

_MSG_DONTWAIT = 0x40
PHONE_VLEN = 8  # datagrams one recvmmsg of a phone's socket takes
PHONE_DATAGRAM = 256  # bytes kept of each (RTP of a 20 ms G.711 frame: 172)


@njit(cache=False)
def _phones_recv(epfd: int, events: np.ndarray, fds: np.ndarray, sock_rows: np.ndarray,
                 hdrs: np.ndarray, buf: np.ndarray, ctrl: np.ndarray, out_leg: np.ndarray,
                 out_t: np.ndarray, out_data: np.ndarray, counts: np.ndarray,
                 record: bool) -> None:  # fmt: skip
    """The phones' side, compiled: the sockets epoll reports ready, each drained with
    recvmmsg (kernel receive time from SCM_TIMESTAMPNS); with `record`, each RTP
    datagram's (leg, time ns, first bytes) appended at out_*[counts[0]] (counts[1]:
    those that found no room)."""
    cap = out_leg.shape[0]
    head = out_data.shape[1]
    maxev = events.shape[0] // EV_WORDS
    vlen = hdrs.shape[0]
    for _ in range(64):  # bounded: packets keep coming
        nev = _epoll_wait(epfd, events.ctypes.data, maxev, 0)
        if nev <= 0:
            return
        for e in range(nev):
            i = events[e * EV_WORDS + EV_DATA]
            if i >= fds.shape[0] or fds[i] < 0:
                continue
            for k in range(vlen):
                hdrs[k, 1] = 16  # msg_namelen
                hdrs[k, 5] = 64  # msg_controllen
            got = _recvmmsg(fds[i], hdrs.ctypes.data, vlen, _MSG_DONTWAIT, 0)
            for k in range(max(got, 0)):
                size = hdrs[k, 7] & np.uint64(0xFFFFFFFF)
                # RTCP (to a phone's port + 1, which may be another phone's socket): not
                # RTP (RFC 5761 §4: second byte 192-223)
                if not record or size < 12 or 192 <= buf[k, 1] <= 223:
                    continue
                n = counts[0]
                if n >= cap:
                    counts[1] += 1
                    continue
                out_leg[n] = sock_rows[i]
                out_t[n] = ctrl[k, 2] * 1_000_000_000 + ctrl[k, 3]
                for b in range(head):
                    out_data[n, b] = buf[k, b]
                counts[0] = n + 1


class PhoneSockets:
    """One UDP socket per simulated phone (leg), bound on loopback: its own source
    address, as a worker's shared RTP port tells legs apart by. Sent from with one
    compiled sendto loop (`workers.rtpio.RtpSockets`, as a worker does), read with
    `_phones_recv` (epoll, recvmmsg, kernel timestamps), so a thousand phones cost
    the generator about what a few shared sockets do."""

    def __init__(self, n_legs: int, buffer_bytes: int = 1 << 18) -> None:
        self.rs = RtpSockets(batch=16)
        self.socks: list[socket.socket] = []
        for i in range(n_legs):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
            s.bind(("127.0.0.1", 0))
            s.setblocking(False)
            enable_timestamps(s)
            self.socks.append(s)
            self.rs.add(f"phone-{i}", s, i)
        self.ports = np.array([s.getsockname()[1] for s in self.socks], dtype=np.int64)
        self.buf = np.zeros((PHONE_VLEN, PHONE_DATAGRAM), dtype=np.uint8)
        self.names = np.zeros((PHONE_VLEN, 16), dtype=np.uint8)
        self.ctrl = np.zeros((PHONE_VLEN, 8), dtype=np.int64)  # cmsghdr (16 B) + timespec
        self.iov = np.zeros((PHONE_VLEN, 2), dtype=np.uint64)
        self.hdrs = np.zeros((PHONE_VLEN, 8), dtype=np.uint64)
        assert MMSGHDR.itemsize == 64
        idx = np.arange(PHONE_VLEN, dtype=np.uint64)
        self.iov[:, 0] = np.uint64(self.buf.ctypes.data) + idx * np.uint64(PHONE_DATAGRAM)
        self.iov[:, 1] = PHONE_DATAGRAM
        self.hdrs[:, 0] = np.uint64(self.names.ctypes.data) + idx * np.uint64(16)
        self.hdrs[:, 2] = np.uint64(self.iov.ctypes.data) + idx * np.uint64(16)
        self.hdrs[:, 3] = 1
        self.hdrs[:, 4] = np.uint64(self.ctrl.ctypes.data) + idx * np.uint64(64)
        self._ips = np.full(n_legs, 0x7F000001, dtype=np.int64)
        self._counts = np.zeros(2, dtype=np.int64)
        self._warm()

    def _warm(self) -> None:
        """Load (or compile) the send and read loops now: the first call of each took
        0.3-0.6 s, so a generator that met them on its first tick started ~0.9 s late
        and caught up by sending that much audio at once, more than a worker's receive
        ring holds (the tones in it were lost, and with them the first press of half
        the legs in an in-band-only run)."""
        if not self.socks:
            return
        probe = np.zeros((1, 12), dtype=np.uint8)
        probe[0, 0] = 0x80
        self.send(probe, np.array([12]), np.zeros(1, dtype=np.int64), self.ports[:1], 1)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # the probe is RTP-shaped: read, not recorded
            r, _, _ = select.select([self.fileno()], [], [], 0.1)
            if r:
                break
        self.recv(Received(cap=1, head=4), record=False)

    def fileno(self) -> int:
        """The epoll fd: readable while any phone's socket has a datagram waiting."""
        return self.rs.fileno()

    def send(self, data: np.ndarray, lens: np.ndarray, legs: np.ndarray, ports: np.ndarray,
             n: int) -> int:  # fmt: skip
        """Packets k < n, each from legs[k]'s socket to 127.0.0.1:ports[k]; how many were
        sent."""
        if n <= 0:
            return 0
        if self._ips.size < n:
            self._ips = np.full(n, 0x7F000001, dtype=np.int64)
        unsent = self.rs.send(data, lens, legs, self._ips, ports, n)
        return n - int(unsent.size)

    def recv(self, into: Received, record: bool = True) -> None:
        """Drain every ready socket; with `record`, keep what arrived in `into`."""
        rs = self.rs
        self._counts[0], self._counts[1] = into.n, into.overflow
        _phones_recv(rs.epfd, rs.events, rs.fds, rs.sock_rows, self.hdrs, self.buf, self.ctrl,
                     into.leg, into.t_ns, into.data, self._counts, record)  # fmt: skip
        into.n, into.overflow = int(self._counts[0]), int(self._counts[1])

    def close(self) -> None:
        self.rs.close()


def rtp_rows(rows: int, size: int, ssrc: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A send buffer of `rows` RTP packets of `size` bytes (version 2, and row k's SSRC
    ssrc[k] when given; the rest is the caller's, tick by tick) and their lengths."""
    data = np.zeros((rows, size), dtype=np.uint8)
    data[:, 0] = 0x80
    if ssrc is not None:
        data[:, 8:12].view(">u4")[:, 0] = ssrc
    return data, np.full(rows, size, dtype=np.int64)


def rfc4733_events(out: np.ndarray, legs: np.ndarray, k_in_press: np.ndarray,
                   seq: np.ndarray, start_ts: np.ndarray, codes: np.ndarray,
                   ssrc: np.ndarray, payload_type: int, press_ticks: int,
                   samples_per_tick: int) -> np.ndarray:  # fmt: skip
    """This tick's RFC 4733 packets of the pressing `legs` into out[:m] (16 bytes each,
    byte 0 set by the caller): one per tick while pressed, the end packet three times
    (§2.5), sequence numbers after the tick's audio packet (seq[leg] + 1 ...). The rest
    is per leg: k_in_press (tick of the press), start_ts (the press's RTP timestamp),
    codes (event code), ssrc. Returns each packet's leg (m of them); the caller then
    advances seq[legs] by the packets each sent (np.add.at or the repeats)."""
    kk = k_in_press[legs]
    end = kk == press_ticks - 1
    reps = np.where(end, 3, 1)
    e_legs = np.repeat(legs, reps)
    e_k = np.repeat(kk, reps)
    e_end = np.repeat(end, reps)
    m = e_legs.size
    offs = np.concatenate([np.arange(r) for r in reps]) if m else np.zeros(0, np.int64)
    out[:m, 1] = payload_type | np.where(e_k == 0, 0x80, 0)  # marker on the first
    out[:m, 2:4].view(">u2")[:, 0] = (seq[e_legs] + 1 + offs) & 0xFFFF
    out[:m, 4:8].view(">u4")[:, 0] = start_ts[e_legs] & 0xFFFFFFFF
    out[:m, 8:12].view(">u4")[:, 0] = ssrc[e_legs]
    out[:m, 12] = codes[e_legs]
    out[:m, 13] = np.where(e_end, 0x80, 0) | 10  # E bit; volume -10 dBm0
    out[:m, 14:16].view(">u2")[:, 0] = (e_k + 1) * samples_per_tick  # duration
    return e_legs

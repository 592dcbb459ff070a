"""What the media benchmarks share: the script as the front over ZeroMQ, one real
`workers.media` process, generator sockets, and the /proc readings.

`perf/bench_media.py` (IVR calls) and `perf/bench_relay.py` (bridged calls) both
start a fresh worker per step with `start_media_worker`, take the ports it
announces as the front does (`allocate_legs`), and drive RTP from sockets made
by `generator_socket`; they only use the ZeroMQ messages of `pbx.messages` and
the RTP on the wire, so they keep working when the worker's insides change.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq

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
from workers.udpbatch import enable_timestamps  # noqa: E402


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
    index = {c: i for i, c in enumerate(call_ids)}
    worker_port = np.zeros(len(call_ids), dtype=np.int64)
    got = sent = 0
    free: list[int] = []
    handed: set[int] = set()
    shared_port: int | None = None
    while got < len(call_ids):
        while (free or shared_port) and sent < len(call_ids):
            port = shared_port if shared_port else free.pop()
            handed.add(port)
            sent += 1
            front.send(MediaAllocate(call_id=call_ids[sent - 1], rtp_port=port, seq=sent,
                                     inband_dtmf=inband_dtmf))  # fmt: skip
        msg = front.recv(10.0)
        if msg is None:
            raise RuntimeError(f"only {got} of {len(call_ids)} legs allocated")
        if isinstance(msg, MediaPorts | MediaHeartbeat):
            free = [p for p in msg.ports if p not in handed]
            if shared:
                # getattr: workers from before the shared port have no such field
                shared_port = getattr(msg, "shared_port", None)
                if shared_port is None:
                    raise RuntimeError("the worker announced no shared RTP port")
        elif isinstance(msg, MediaAllocated):
            if msg.error:
                raise RuntimeError(f"allocation failed: {msg.error}")
            worker_port[index[msg.call_id]] = msg.rtp_port
            got += 1
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

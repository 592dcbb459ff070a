"""N bridged calls on one media worker, and with `--peer rtpengine` the same calls on a
local rtpengine, alternating in one run: CPU, memory, packets and relay latency.

    .venv/bin/python perf/bench_relay.py                          # worker only: 100 250 500 calls
    .venv/bin/python perf/bench_relay.py --peer rtpengine         # side by side
    .venv/bin/python perf/bench_relay.py --peer rtpengine -n 500 --modes pcma --measure 30

The peer is Debian's `rtpengine-daemon` (`apt-get install -y rtpengine-daemon`; not
part of `make test`): userspace forwarding (`table = -1`, no kernel module) on
127.0.0.1, its own port range, ng control over UDP (`perf/bencode.py`), started
with a config of our own in a temporary directory and killed at the end of its
step. The package's init script is not used (and must not hold the ports).

For each step (N calls, a mode) the script starts a fresh relay, sets the calls up,
and is both phones of every call at once:

* media worker: the script is the front over ZeroMQ (`perf/benchlib.py`, as
  `perf/bench_media.py`): per call two legs (MediaAllocate), each leg's
  MediaRemote at a generator socket, then MediaBridge. Only `pbx.messages` and
  the RTP on the wire are used, never the worker's insides;
* rtpengine: per call an ng `offer` (leg A's SDP: PCMU + telephone-event) and
  `answer` (leg B's SDP); with `--modes pcma` leg B answers PCMA and the offer
  asks rtpengine to transcode (`codec: {transcode: [PCMA]}`).

Modes: `pcmu` (PCMU<->PCMU) and `pcma` (PCMU<->PCMA: leg B's codec is PCMA, so the
relay transcodes). Every leg sends one 20 ms G.711 frame of low-level noise every
20 ms from the generator (`sendmmsg` from one socket per 256 legs; with
`--gen-sockets per_leg`, the default with `--rtp-socket shared`, a socket per leg,
`benchlib.PhoneSockets`: compiled sendto and epoll + recvmmsg loops), and presses a key every `--press-every`
seconds as RFC 4733 events (start, updates, end x3). What comes back is drained
with `recvmmsg` and timed by the kernel (SO_TIMESTAMPNS). `--phases P` (default 20)
spreads the legs over P evenly spaced send instants of each 20 ms, as unsynchronised
phones send; `--phases 1` sends all 2N packets at the tick's start, a burst that
favours a relay reading in batches (less CPU) and counts the time to work through the
burst as latency (perf/README.md, "Phones not in step").

Relay latency: a relayed packet's kernel receive time at the far leg minus the time
the generator sent the same frame. Frames are named by their payload, which works
through transcoding (G.711 maps sample by sample), never by RTP timestamps
(rtpengine re-bases them when it transcodes): see `analyse`. Frames never heard are
lost (per direction, and how many of them were sent during a key press);
`ts_offset_kept_pct` says how often the relay kept its leg's timestamp offset.

After `--warmup` seconds, over `--measure` seconds: CPU % of a core per call
(utime+stime of the relay process, all threads, from /proc; split per thread),
RSS per call ((RSS with the calls - RSS before) / N), audio packets sent /
forwarded / lost per direction, event packets, latency p50/p99/max. Prints a
table (ours, rtpengine, ratio) and writes JSON
(default perf/results/bench_relay-<ts>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from media import g711  # noqa: E402
from pbx.messages import (  # noqa: E402
    MediaBridge,
    MediaHeartbeat,
    MediaRemote,
)
from perf.benchlib import (  # noqa: E402
    MediaWorker,
    PhoneSockets,
    Received,
    allocate_legs,
    generator_socket,
    load_average,
    log,
    machine_cpu_s,
    pct,
    positive_int,
    proc_cpu_s,
    proc_rss_kb,
    rfc4733_events,
    rtp_rows,
    start_media_worker,
    thread_cpu_s,
    udp_counter,
    udp_rcvbuf_errors,
    udp_socket_drops,
    wait_until_quiet,
)
from perf.bencode import BencodeError  # noqa: E402
from perf.bencode import decode as bdecode  # noqa: E402
from perf.bencode import encode as bencode  # noqa: E402
from workers.udpbatch import RecvBatch, SendBatch, ip_to_u32  # noqa: E402

TICK_S = 0.020
SPF = 160  # samples per 20 ms frame
PKT = 12 + SPF
EVENT_PKT = 16
N_FRAMES = 64  # distinct noise frames (a frame's samples 16-31 come from another one)
SIG_SAMPLES = 16  # samples compared per part of a frame's name (two parts)
CYCLE = N_FRAMES * N_FRAMES  # a frame's name repeats every 4096 ticks (82 s)
LEGS_PER_SOCKET = 256
SEND_CHUNK = 128  # phones sent from in one compiled loop, timed together
DTMF_PT = 101
PRESS_TICKS = 5  # 100 ms per press
DIGIT_CODES = np.arange(10)  # RFC 4733 events 0-9
TS_MOD = 1 << 32
LOCALHOST = "127.0.0.1"
PAYLOAD_TYPE = {"PCMU": 0, "PCMA": 8}
MODES = {"pcmu": ("PCMU", "PCMU"), "pcma": ("PCMU", "PCMA")}  # leg A's codec, leg B's


class Relay(Protocol):
    name: str
    pid: int
    rss_ready_kb: int

    def ports_before_connect(self, n_calls: int) -> np.ndarray | None:
        """The relay's port of each generator leg (2 per call: A, B) if known before the
        generator's addresses are (the worker's allocations), else None."""
        ...

    def connect(self, gen_ports: np.ndarray, codecs: tuple[str, str]) -> np.ndarray:
        """Set every call up towards the generator legs' ports; the relay's port per leg."""
        ...

    def poll(self) -> None:
        """Read what the relay has sent on its control channel (non-blocking)."""
        ...

    def notes(self) -> dict[str, Any]: ...

    def stop(self) -> list[str]: ...


# ---------------------------------------------------------------- our media worker


class WorkerRelay:
    name = "worker"

    def __init__(self, tmp: Path, rtp_ports: str, n_calls: int, inband: bool,
                 rtp_socket: str | None) -> None:  # fmt: skip
        self.media: MediaWorker = start_media_worker(
            tmp, rtp_ports, max(2000, 2 * n_calls + 16), rtp_socket=rtp_socket
        )
        self.shared = rtp_socket == "shared"
        self.pid = self.media.proc.pid
        self.rss_ready_kb = self.media.rss_ready_kb
        self.inband = inband
        self.heartbeats: list[MediaHeartbeat] = []
        self.call_ids: list[str] = []

    def ports_before_connect(self, n_calls: int) -> np.ndarray | None:
        self.call_ids = [f"c{i}{side}" for i in range(n_calls) for side in "ab"]
        self.ports = allocate_legs(self.media.front, self.call_ids, inband_dtmf=self.inband,
                                   shared=self.shared)  # fmt: skip
        return self.ports

    def connect(self, gen_ports: np.ndarray, codecs: tuple[str, str]) -> np.ndarray:
        front = self.media.front
        for g, call_id in enumerate(self.call_ids):
            codec = codecs[g % 2]
            front.send(MediaRemote(call_id=call_id, remote_ip=LOCALHOST,
                                   remote_port=int(gen_ports[g]), payload_type=PAYLOAD_TYPE[codec],
                                   codec=codec,  # type: ignore[arg-type]
                                   dtmf_payload_type=DTMF_PT, ptime_ms=20))  # fmt: skip
            if g % 2:
                front.send(MediaBridge(call_id=self.call_ids[g - 1], peer_call_id=call_id))
        return self.ports

    def poll(self) -> None:
        front = self.media.front
        while True:
            msg = front.recv(0)
            if msg is None:
                return
            if isinstance(msg, MediaHeartbeat):
                self.heartbeats.append(msg)

    def notes(self) -> dict[str, Any]:
        hb = self.heartbeats
        return {
            "tick_late_ms_max": round(max((h.tick_late_ms_max for h in hb), default=0.0), 3),
            "tick_busy_ms_p99": round(max((h.tick_busy_ms_p99 for h in hb), default=0.0), 3),
            "inband_dtmf": self.inband,
        }

    def stop(self) -> list[str]:
        return self.media.stop()


# ---------------------------------------------------------------- rtpengine


class NgError(RuntimeError):
    """rtpengine answered an ng command with an error, garbage, or not at all."""


class NgClient:
    """The ng control protocol over UDP: `<cookie> <bencoded dict>` each way."""

    def __init__(self, port: int) -> None:
        self.addr = (LOCALHOST, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOCALHOST, 0))
        self.serial = 0

    def command(self, body: dict[str, Any], timeout_s: float = 2.0, tries: int = 3) -> dict:
        self.serial += 1
        cookie = f"{os.getpid()}_{self.serial}".encode()
        wire = cookie + b" " + bencode(body)  # type: ignore[arg-type]
        for _ in range(tries):
            self.sock.sendto(wire, self.addr)
            deadline = time.monotonic() + timeout_s
            while (left := deadline - time.monotonic()) > 0:
                r, _, _ = select.select([self.sock], [], [], left)
                if not r:
                    break
                data = self.sock.recv(65536)
                got_cookie, _, rest = data.partition(b" ")
                if got_cookie != cookie:
                    continue  # the reply to an earlier try
                try:
                    reply = bdecode(rest)
                except BencodeError as exc:
                    raise NgError(f"ng reply to {body.get('command')}: {exc}") from exc
                if not isinstance(reply, dict):
                    raise NgError(f"ng reply to {body.get('command')} is not a dictionary")
                result = reply.get(b"result")
                if result not in (b"ok", b"pong"):
                    raise NgError(f"ng {body.get('command')}: {result!r} "
                                  f"{reply.get(b'error-reason', b'')!r}")  # fmt: skip
                return reply
        raise NgError(f"no ng reply to {body.get('command')} in {tries} x {timeout_s} s")

    def close(self) -> None:
        self.sock.close()


def sdp(port: int, codec: str, session: int) -> str:
    pt = PAYLOAD_TYPE[codec]
    return (
        f"v=0\r\no=- {session} 1 IN IP4 {LOCALHOST}\r\ns=-\r\nc=IN IP4 {LOCALHOST}\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP {pt} {DTMF_PT}\r\na=rtpmap:{pt} {codec}/8000\r\n"
        f"a=rtpmap:{DTMF_PT} telephone-event/8000\r\na=fmtp:{DTMF_PT} 0-15\r\n"
        "a=ptime:20\r\na=sendrecv\r\n"
    )


def sdp_media(text: str) -> tuple[str, int, list[int]]:
    """Connection address, audio port and payload types of an SDP from rtpengine."""
    c = re.search(r"^c=IN IP4 (\S+)", text, re.M)
    m = re.search(r"^m=audio (\d+) RTP/AVP ([\d ]+)", text, re.M)
    if c is None or m is None:
        raise NgError(f"no audio stream in rtpengine's SDP: {text!r}")
    return c.group(1), int(m.group(1)), [int(p) for p in m.group(2).split()]


class RtpengineRelay:
    name = "rtpengine"

    def __init__(self, tmp: Path, rtp_ports: str, ng_port: int, binary: str) -> None:
        lo, hi = (int(p) for p in rtp_ports.split("-"))
        conf = tmp / "rtpengine.conf"
        conf.write_text(
            "[bench]\n"
            "table = -1\n"  # userspace forwarding, no kernel module
            f"interface = {LOCALHOST}\n"
            f"listen-ng = {LOCALHOST}:{ng_port}\n"
            f"port-min = {lo}\nport-max = {hi}\n"
            f"pidfile = {tmp / 'rtpengine.pid'}\n"
            "foreground = true\nlog-stderr = true\nlog-level = 4\n"
            "timeout = 600\ndelete-delay = 0\n",
            encoding="utf-8",
        )
        self.log_path = tmp / "rtpengine.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [binary, f"--config-file={conf}", "--config-section=bench"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.pid = self.proc.pid
        self.ng = NgClient(ng_port)
        self.first_sdps: dict[str, str] = {}
        try:
            deadline = time.monotonic() + 15.0
            while True:
                if self.proc.poll() is not None:
                    raise NgError(f"rtpengine exited ({self.proc.returncode}): {self._tail()}")
                try:
                    self.ng.command({"command": "ping"}, timeout_s=0.5, tries=1)
                    break
                except NgError:
                    if time.monotonic() > deadline:
                        raise
            time.sleep(1.0)
            self.rss_ready_kb = proc_rss_kb(self.pid)
        except BaseException:
            self.stop()
            raise

    def ports_before_connect(self, n_calls: int) -> np.ndarray | None:
        self.n_calls = n_calls
        return None

    def connect(self, gen_ports: np.ndarray, codecs: tuple[str, str]) -> np.ndarray:
        relay_ports = np.zeros(2 * self.n_calls, dtype=np.int64)
        transcode = codecs[0] != codecs[1]
        for c in range(self.n_calls):
            call_id = f"bench-{self.pid}-{c}"
            offer: dict[str, Any] = {
                "command": "offer", "call-id": call_id, "from-tag": "a",
                "sdp": sdp(int(gen_ports[2 * c]), codecs[0], c + 1),
                "replace": ["origin", "session-connection"], "ICE": "remove",
            }  # fmt: skip
            if transcode:
                # Offer leg B leg A's codec and, added by rtpengine, leg B's (it transcodes).
                offer["codec"] = {"transcode": [codecs[1]]}
            reply = self.ng.command(offer)
            offer_sdp = bytes(reply[b"sdp"]).decode()
            ip_b, port_b, _ = sdp_media(offer_sdp)
            answer = {
                "command": "answer", "call-id": call_id, "from-tag": "a", "to-tag": "b",
                "sdp": sdp(int(gen_ports[2 * c + 1]), codecs[1], c + 1),
                "replace": ["origin", "session-connection"], "ICE": "remove",
            }  # fmt: skip
            reply = self.ng.command(answer)
            answer_sdp = bytes(reply[b"sdp"]).decode()
            ip_a, port_a, pts_a = sdp_media(answer_sdp)
            if ip_a != LOCALHOST or ip_b != LOCALHOST:
                raise NgError(f"rtpengine offered {ip_a}/{ip_b}, not {LOCALHOST}")
            if PAYLOAD_TYPE[codecs[0]] not in pts_a:
                raise NgError(f"rtpengine's answer to leg A lacks {codecs[0]}: {answer_sdp!r}")
            relay_ports[2 * c], relay_ports[2 * c + 1] = port_a, port_b
            if c == 0:
                self.first_sdps = {"offer_to_b": offer_sdp, "answer_to_a": answer_sdp}
        return relay_ports

    def poll(self) -> None:
        pass

    def notes(self) -> dict[str, Any]:
        return {"sdp_first_call": self.first_sdps, "log_tail": self._tail()}

    def _tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> list[str]:
        self.ng.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return [ln for ln in self._tail().splitlines() if "ERR" in ln or "CRIT" in ln][:10]


def rtpengine_service_check() -> None:
    """The Debian package's own daemon (init script) must not hold ports or CPU: stop it."""
    out = subprocess.run(["pgrep", "-x", "rtpengine"], capture_output=True, text=True)
    if out.stdout.strip():
        log(f"rtpengine already running (pids {out.stdout.split()}): stopping the service")
        subprocess.run(["service", "rtpengine-daemon", "stop"], capture_output=True, timeout=30)
        out = subprocess.run(["pgrep", "-x", "rtpengine"], capture_output=True, text=True)
        if out.stdout.strip():
            raise SystemExit(f"an rtpengine outside this script is running: {out.stdout.split()}")


# ---------------------------------------------------------------- one step


def run_one(target: str, mode: str, n_calls: int, args: argparse.Namespace) -> dict[str, Any]:
    codecs = MODES[mode]
    n_legs = 2 * n_calls
    rng = np.random.default_rng(n_calls)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench_relay-{target}-"))
    relay: Relay | None = None
    socks: list[socket.socket] = []
    phones: PhoneSockets | None = None
    errors: list[str] = []
    try:
        if target == "worker":
            relay = WorkerRelay(tmp, args.rtp_ports, n_calls, args.inband, args.rtp_socket)
        else:
            relay = RtpengineRelay(tmp, args.peer_ports, args.ng_port, args.rtpengine)
        rss0 = relay.rss_ready_kb
        log(f"{target} {mode} N={n_calls}: pid {relay.pid} ready, RSS {rss0} kB; setting up")
        t_setup = time.monotonic()
        early = relay.ports_before_connect(n_calls)
        # A socket per phone (leg), told apart by the socket that hears it: needed when
        # the relay sends every leg from one port (the worker's shared port) and tells
        # legs apart by their source address; with --rtp-socket shared the peer gets the
        # same generator. Else, by default, one socket per 256 legs (sendmmsg), a leg
        # told by the relay port it hears from.
        one_port = early is not None and np.unique(early).size < n_legs
        default = "per_leg" if one_port or args.rtp_socket == "shared" else "grouped"
        per_leg = (args.gen_sockets or default) == "per_leg"
        if one_port and not per_leg:
            raise SystemExit("--rtp-socket shared needs --gen-sockets per_leg (a source per leg)")
        n_socks = 0 if per_leg else (n_legs + LEGS_PER_SOCKET - 1) // LEGS_PER_SOCKET
        if per_leg:
            phones = PhoneSockets(n_legs)
            gen_ports = phones.ports
        socks.extend(generator_socket() for _ in range(n_socks))
        leg_sock = np.arange(n_legs) // LEGS_PER_SOCKET
        if not per_leg:
            gen_ports = np.array([socks[k].getsockname()[1] for k in leg_sock], dtype=np.int64)
        relay_ports = relay.connect(gen_ports, codecs)
        if not per_leg and np.unique(relay_ports).size < n_legs:
            raise RuntimeError("the relay sends several legs from one port after connecting")
        setup_s = time.monotonic() - t_setup
        port_to_leg = np.full(65536, -1, dtype=np.int64)
        port_to_leg[relay_ports] = np.arange(n_legs)

        # ---- send buffers: every leg's audio packet (rows fixed per leg), events separate
        ts0 = rng.integers(0, TS_MOD, n_legs).astype(np.int64)
        seq = rng.integers(0, 65536, n_legs).astype(np.int64)
        noise = {c: np.asarray(g711.encode(rng.normal(0, 200, size=(N_FRAMES, SPF)).astype(np.int16), c))
                 for c in ("PCMU", "PCMA")}  # fmt: skip
        leg_codec = [codecs[g % 2] for g in range(n_legs)]
        leg_pt = np.array([PAYLOAD_TYPE[c] for c in leg_codec])
        all_legs = np.arange(n_legs, dtype=np.int64)
        ssrc = 0x10000 + all_legs
        all_tx, all_lens = rtp_rows(n_legs, PKT, ssrc)
        ev_tx, ev_lens = rtp_rows(3 * n_legs, EVENT_PKT)
        payload_rows = np.stack([noise[c] for c in leg_codec], axis=1)  # [64 frames, legs, 160]
        # Each leg's send phase inside the tick: with --phases 1 every leg sends at the
        # tick's start (one burst of 2N packets); real phones' 20 ms clocks are not in
        # step, so --phases P spreads the legs over P evenly spaced instants.
        leg_phase = rng.permutation(n_legs) % args.phases
        # what is sent in one go, its start time taken as each packet's send time: a
        # grouped socket's legs of one phase (one sendmmsg), or up to SEND_CHUNK phones
        # of one phase (sendto loop); in phase order
        if per_leg:
            chunks = [part for p in range(args.phases)
                      for legs in [np.nonzero(leg_phase == p)[0]]
                      for part in np.split(legs, range(SEND_CHUNK, legs.size, SEND_CHUNK))]
        else:
            chunks = [legs for p in range(args.phases) for k in range(n_socks)
                      for legs in [np.nonzero((leg_sock == k) & (leg_phase == p))[0]]]
        chunks = [legs for legs in chunks if legs.size]
        chunk_phase = [int(leg_phase[legs[0]]) for legs in chunks]
        leg_chunk = np.zeros(n_legs, dtype=np.int64)
        for k, legs in enumerate(chunks):
            leg_chunk[legs] = k
        audio_tx: list[SendBatch] = []
        event_tx: list[SendBatch] = []
        for legs in chunks if not per_leg else []:  # grouped sockets: a sendmmsg batch each
            tx = SendBatch(vlen=legs.size, size=PKT)
            tx.set_addresses(np.full(legs.size, ip_to_u32(LOCALHOST)), relay_ports[legs])
            tx.lengths[:] = PKT
            audio_tx.append(tx)
            event_tx.append(SendBatch(vlen=3 * legs.size, size=EVENT_PKT))
        rx = RecvBatch(vlen=512, size=12 + 2 * SIG_SAMPLES, timestamps=True)

        total_ticks = round((args.warmup + args.measure) / TICK_S)
        warm_ticks = round(args.warmup / TICK_S)
        send_t = np.zeros((total_ticks, n_legs), dtype=np.int64)  # ns, CLOCK_REALTIME
        press_period = max(PRESS_TICKS + 2, round(args.press_every / TICK_S))
        phase = (np.arange(n_legs) * 7919) % press_period
        last_press_tick = total_ticks - 2 * PRESS_TICKS  # every press ends inside the run
        press_count = np.zeros(n_legs, dtype=np.int64)
        press_start_ts = np.zeros(n_legs, dtype=np.int64)
        press_digit = np.zeros(n_legs, dtype=np.int64)
        presses: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # legs, tick, digit
        events_sent = np.zeros(n_legs, dtype=np.int64)
        audio_sent_fail = 0
        send_call_ns: list[int] = []
        recv = Received(cap=int(n_legs * total_ticks * 1.25) + 4096, head=12 + 2 * SIG_SAMPLES)
        ep = select.epoll()
        for s in socks:
            ep.register(s.fileno(), select.EPOLLIN)
        if phones is not None:
            ep.register(phones.fileno(), select.EPOLLIN)

        def drain(until: float) -> None:
            # at least one pass, even when the tick's sending ran late
            left = 0.0
            while True:
                # select waits to the microsecond; epoll.poll would round the wait up to
                # a whole millisecond and bunch the --phases instants together
                ready = ep.poll(0) if select.select([ep], [], [], max(0.0, left))[0] else []
                for fd, _ in ready:
                    if phones is not None:
                        phones.recv(recv)
                        continue
                    while (n := rx.recv(fd)) > 0:
                        recv.add(rx, n, port_to_leg[rx.ports[:n]])
                left = until - time.monotonic()
                if left <= 0:
                    return

        def send_events(phase: int, e_legs: np.ndarray) -> None:
            # the phones' event packets of one phase, after that phase's audio
            rows = np.nonzero(leg_phase[e_legs] == phase)[0]
            legs = e_legs[rows]
            if legs.size:
                assert phones is not None
                phones.send(ev_tx[rows], ev_lens[rows], legs, relay_ports[legs], legs.size)

        cpu0 = 0.0
        threads0: dict[str, float] = {}
        t_meas0 = 0.0
        gen_cpu0 = 0.0
        drops0 = 0
        machine0 = 0.0
        udp_out0 = 0
        sock_drops0: dict[int, int] = {}
        log(f"{target} {mode} N={n_calls}: {n_calls} calls up in {setup_s:.1f} s; "
            f"warm-up {args.warmup} s, measuring {args.measure} s")  # fmt: skip
        origin = time.monotonic() + 0.05
        gen_late_ms = np.zeros(total_ticks)
        for tick in range(total_ticks):
            gen_late_ms[tick] = (time.monotonic() - (origin + tick * TICK_S)) * 1000
            if tick == warm_ticks:
                cpu0 = proc_cpu_s(relay.pid)
                threads0 = thread_cpu_s(relay.pid)
                gen_cpu0 = time.process_time()
                drops0 = udp_rcvbuf_errors()
                sock_drops0 = udp_socket_drops()
                machine0 = machine_cpu_s()
                udp_out0 = udp_counter("OutDatagrams")
                t_meas0 = time.monotonic()
            k_in_press = (tick - phase) % press_period
            pressing = (k_in_press < PRESS_TICKS) & (tick - k_in_press >= 0)
            pressing &= (tick - k_in_press) < last_press_tick
            starting = pressing & (k_in_press == 0)
            if starting.any():
                press_start_ts[starting] = (ts0[starting] + tick * SPF) % TS_MOD
                press_digit[starting] = press_count[starting] % 10
                press_count[starting] += 1
                idx = np.nonzero(starting)[0]
                presses.append((idx, np.full(idx.size, tick), press_digit[idx].copy()))
            all_tx[:, 1] = leg_pt | (0x80 if tick == 0 else 0)
            all_tx[:, 2:4].view(">u2")[:, 0] = seq & 0xFFFF
            all_tx[:, 4:8].view(">u4")[:, 0] = (ts0 + tick * SPF) % TS_MOD
            # frame `tick % 64`, its samples 16-31 those of frame `tick // 64 % 64`:
            # together they name the tick modulo 4096 (see analyse)
            all_tx[:, 12:PKT] = payload_rows[tick % N_FRAMES]
            all_tx[:, 12 + SIG_SAMPLES : 12 + 2 * SIG_SAMPLES] = payload_rows[
                tick // N_FRAMES % N_FRAMES][:, SIG_SAMPLES : 2 * SIG_SAMPLES]
            # RFC 4733 §2.5: one packet per tick while pressed, the end packet 3 times
            e_legs = rfc4733_events(ev_tx, np.nonzero(pressing)[0], k_in_press, seq,
                                    press_start_ts, DIGIT_CODES[press_digit], ssrc, DTMF_PT,
                                    PRESS_TICKS, SPF)  # fmt: skip
            me = e_legs.size
            np.add.at(events_sent, e_legs, 1)
            for k, legs in enumerate(chunks):
                prev = chunk_phase[k - 1] if k else 0
                if chunk_phase[k] != prev:  # the next instant of the tick
                    if phones is not None and me and k:
                        send_events(prev, e_legs)
                    drain(origin + (tick + chunk_phase[k] / args.phases) * TICK_S)
                m = legs.size
                t_a = time.time_ns()
                if phones is not None:
                    sent = phones.send(all_tx[legs], all_lens, legs, relay_ports[legs], m)
                else:
                    tx = audio_tx[k]
                    tx.data[:m] = all_tx[legs]
                    sent = tx.send(socks[leg_sock[legs[0]]].fileno(), m)
                t_b = time.time_ns()
                audio_sent_fail += m - sent
                # each packet's send time: when the send call began (latency is an upper
                # bound, by at most the call's duration, kept in send_call_us)
                send_t[tick, legs] = t_a
                send_call_ns.append(t_b - t_a)
                if phones is None and me:
                    rows = np.nonzero(leg_chunk[e_legs] == k)[0]
                    if rows.size:
                        etx = event_tx[k]
                        etx.set_addresses(np.full(rows.size, ip_to_u32(LOCALHOST)),
                                          relay_ports[e_legs[rows]])  # fmt: skip
                        etx.data[: rows.size] = ev_tx[rows]
                        etx.lengths[: rows.size] = EVENT_PKT
                        etx.send(socks[leg_sock[legs[0]]].fileno(), rows.size)
            if phones is not None and me:
                send_events(chunk_phase[-1], e_legs)
            np.add.at(seq, e_legs, 1)
            seq += 1
            relay.poll()
            drain(origin + (tick + 1) * TICK_S)
        cpu1 = proc_cpu_s(relay.pid)
        machine1 = machine_cpu_s()
        udp_out = udp_counter("OutDatagrams") - udp_out0
        threads1 = thread_cpu_s(relay.pid)
        t_meas = time.monotonic() - t_meas0
        gen_cpu = time.process_time() - gen_cpu0
        rss1 = proc_rss_kb(relay.pid)
        drain(time.monotonic() + 0.5)  # the last frames still on their way
        drops = udp_rcvbuf_errors() - drops0
        sock_drops1 = udp_socket_drops()
        gen_drops = sum(sock_drops1.get(int(p), 0) - sock_drops0.get(int(p), 0)
                        for p in np.unique(gen_ports))  # fmt: skip
        relay_drops = sum(sock_drops1.get(int(p), 0) - sock_drops0.get(int(p), 0)
                          for p in np.unique(relay_ports))  # fmt: skip
        relay.poll()
        notes = relay.notes()
    finally:
        if relay is not None:
            errors = relay.stop()
        for s in socks:
            s.close()
        if phones is not None:
            phones.close()
        shutil.rmtree(tmp, ignore_errors=True)

    cpu_pct = 100.0 * (cpu1 - cpu0) / t_meas
    threads = {name: round(100.0 * (cpu - threads0.get(name, 0.0)) / t_meas, 2)
               for name, cpu in threads1.items()}  # fmt: skip
    threads = {k: v for k, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v > 0}
    result: dict[str, Any] = {
        "target": target,
        "mode": mode,
        "phases": args.phases,
        "codecs": list(codecs),
        "calls": n_calls,
        "setup_s": round(setup_s, 2),
        "measure_s": round(t_meas, 2),
        "cpu_pct_core": round(cpu_pct, 2),
        "cpu_pct_per_call": round(cpu_pct / n_calls, 4),
        "threads_cpu_pct_core": threads,
        "rss_ready_kb": rss0,
        "rss_loaded_kb": rss1,
        "kb_per_call": round((rss1 - rss0) / n_calls, 1),
        "generator_cpu_pct_core": round(100.0 * gen_cpu / t_meas, 1),
        # every other process on the machine meanwhile (busy CPU - relay - generator)
        "others_cpu_pct_core": round(
            100.0 * ((machine1 - machine0) - (cpu1 - cpu0) - gen_cpu) / t_meas, 1),
        "generator_sockets": n_socks if phones is None else n_legs,
        # how late the generator's ticks began (a starved generator sends late and drains late)
        "generator_late_ms": {"p99": round(pct(gen_late_ms[warm_ticks:], 99), 2),
                              "max": round(pct(gen_late_ms[warm_ticks:], 100), 2)},
        "send_call_us": {"p50": round(pct(np.array(send_call_ns), 50) / 1e3, 1),
                         "max": round(pct(np.array(send_call_ns), 100) / 1e3, 1)},
        "generator_audio_send_failures": audio_sent_fail,
        "udp_rcvbuf_errors": drops,
        # every UDP datagram the machine sent, per second and per call: the generator's
        # 100 per call (50 per leg) and the relay's 100 (an independent check of the rate)
        "udp_out_per_s_per_call": round(udp_out / t_meas / n_calls, 1),
        # of which at the generator's sockets and at the relay's RTP ports
        "udp_drops_generator": gen_drops,
        "udp_drops_relay": relay_drops,
        "datagrams_received": recv.n + recv.overflow,
        "datagrams_not_kept": recv.overflow,
        "relay_errors": errors,
        "notes": notes,
    }
    presses_cat = (np.concatenate([p[0] for p in presses]) if presses else np.zeros(0, np.int64),
                   np.concatenate([p[1] for p in presses]) if presses else np.zeros(0, np.int64),
                   np.concatenate([p[2] for p in presses]) if presses else np.zeros(0, np.int64))  # fmt: skip
    result.update(analyse(recv, codecs, frame_signatures(noise), ts0, send_t, warm_ticks,
                          presses_cat, events_sent))
    return result


def frame_signatures(noise: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Linear samples 0-31 of each noise frame, per sending codec."""
    return {c: g711.decode(frames[:, : 2 * SIG_SAMPLES].reshape(-1), c)
            .reshape(-1, 2 * SIG_SAMPLES).astype(np.int32)
            for c, frames in noise.items()}  # fmt: skip


def analyse(recv: Received, codecs: tuple[str, str], signatures: dict[str, np.ndarray],
            ts0: np.ndarray, send_t: np.ndarray, warm_ticks: int,
            presses: tuple[np.ndarray, np.ndarray, np.ndarray],
            events_sent: np.ndarray) -> dict[str, Any]:  # fmt: skip
    """Match every relayed audio packet to the frame it carries; latency and loss.

    A frame is named by its payload: the generator sends noise frame `tick % 64` (one of
    64 random frames) with its samples 16-31 taken from frame `tick // 64 % 64`; each
    part of what arrives, decoded, is nearest to exactly one frame's, transcoded or
    not (G.711 maps sample by sample), which gives the tick modulo 4096. The frame's
    tick is then the latest such tick sent before the arrival (names repeat every 82 s). Timestamps are only checked, not trusted: the share
    of packets whose RTP timestamp keeps its leg's usual offset from the sent one."""
    total_ticks, n_legs = send_t.shape
    n = recv.n
    leg = recv.leg[:n]
    pt = recv.pt()
    is_event = pt == DTMF_PT
    audio = ~is_event & ((pt == 0) | (pt == 8))
    a_leg = leg[audio]
    a_src = a_leg ^ 1
    a_t = recv.t_ns[:n][audio]
    a_ts = recv.ts()[audio]
    a_sig = recv.data[:n, 12 : 12 + 2 * SIG_SAMPLES][audio]
    a_pt = pt[audio]
    frame_idx = np.full(a_leg.size, -1, dtype=np.int64)
    rx_lin = np.zeros((a_leg.size, 2 * SIG_SAMPLES), dtype=np.int32)
    for codec, code in PAYLOAD_TYPE.items():
        sel = a_pt == code
        if sel.any():
            rx_lin[sel] = g711.decode(a_sig[sel].reshape(-1), codec).reshape(-1, 2 * SIG_SAMPLES)
    for side, src_codec in enumerate(codecs):  # the sending leg's codec names the candidates
        rows = np.nonzero((a_src % 2) == side)[0]
        for c0 in range(0, rows.size, 20_000):
            r = rows[c0 : c0 + 20_000]
            part_idx = []
            ok = np.ones(r.size, dtype=bool)
            for part in (slice(0, SIG_SAMPLES), slice(SIG_SAMPLES, 2 * SIG_SAMPLES)):
                cand = signatures[src_codec][:, part]
                dist = np.abs(rx_lin[r, None, part] - cand[None, :, :]).sum(axis=2)
                best = dist.argmin(axis=1)
                ok &= dist[np.arange(r.size), best] <= SIG_SAMPLES * 48  # transcoding's rounding
                part_idx.append(best)
            frame_idx[r[ok]] = (part_idx[1] * N_FRAMES + part_idx[0])[ok]
    matched = frame_idx >= 0
    # the latest tick of that name sent before the arrival
    tick_start = send_t.min(axis=1)
    at = np.searchsorted(tick_start, a_t, side="right") - 1
    tick = at - ((at - frame_idx) % CYCLE)
    tick = np.where(matched & (tick >= 0), tick, 0)
    late_send = send_t[tick, a_src] > a_t
    tick = np.where(late_send, tick - CYCLE, tick)
    matched &= tick >= 0
    tick = np.where(matched, tick, 0)
    lat_ms = (a_t - send_t[tick, a_src]) / 1e6
    # timestamp check: each leg's usual offset between received and sent timestamps
    ts_off = (a_ts - ts0[a_src] - tick * SPF) % TS_MOD
    ts_same = 0
    if matched.any():
        key = a_leg[matched] * TS_MOD + ts_off[matched]
        uniq, counts = np.unique(key, return_counts=True)
        per_leg_best: dict[int, int] = {}
        for k_, c_ in zip(uniq // TS_MOD, counts, strict=True):
            per_leg_best[int(k_)] = max(per_leg_best.get(int(k_), 0), int(c_))
        ts_same = sum(per_leg_best.values())

    in_window = matched & (tick >= warm_ticks)
    key = a_leg[in_window] * total_ticks + tick[in_window]
    uniq, first_i = np.unique(key, return_index=True)
    dup = int(key.size - uniq.size)
    lat_w = lat_ms[in_window][first_i]
    leg_w = a_leg[in_window][first_i]
    got = np.zeros((total_ticks, n_legs), dtype=bool)  # [tick, sending leg]
    got[tick[in_window][first_i], a_src[in_window][first_i]] = True
    in_press = np.zeros((total_ticks, n_legs), dtype=bool)
    p_leg, p_tick, _ = presses
    for d in range(PRESS_TICKS):
        ok = p_tick + d < total_ticks
        in_press[p_tick[ok] + d, p_leg[ok]] = True
    lost_map = ~got[warm_ticks:]
    out: dict[str, Any] = {}
    directions = {}
    for name, side in (("a_to_b", 1), ("b_to_a", 0)):  # the receiving side: B legs are odd
        sel = (leg_w % 2) == side
        senders = np.arange(1 - side, n_legs, 2)
        sent = (total_ticks - warm_ticks) * senders.size
        lat = lat_w[sel]
        directions[name] = {
            "sent": sent,
            "forwarded": int(sel.sum()),
            "lost": int(lost_map[:, senders].sum()),
            "lost_during_dtmf": int((lost_map & in_press[warm_ticks:])[:, senders].sum()),
            "latency_ms": {"p50": round(pct(lat, 50), 3), "p99": round(pct(lat, 99), 3),
                           "max": round(pct(lat, 100), 3)},  # fmt: skip
        }
    out["directions"] = directions
    out["audio"] = {
        "sent": sum(d["sent"] for d in directions.values()),
        "forwarded": int(lat_w.size),
        "lost": sum(d["lost"] for d in directions.values()),
        "lost_during_dtmf": sum(d["lost_during_dtmf"] for d in directions.values()),
        "duplicates": dup,
        "unmatched": int((~matched).sum()),
        "negative_latency": int((lat_w < 0).sum()),
        "ts_offset_kept_pct": round(100.0 * ts_same / max(1, int(matched.sum())), 2),
    }
    out["latency_ms"] = {"p50": round(pct(lat_w, 50), 3), "p99": round(pct(lat_w, 99), 3),
                         "max": round(pct(lat_w, 100), 3)}  # fmt: skip
    out["events"] = {"sent": int(events_sent.sum()), "received": int(is_event.sum()),
                     "presses": int(p_leg.size)}  # fmt: skip
    return out


# ---------------------------------------------------------------- report


def row(r: dict[str, Any] | None) -> list[str]:
    if r is None:
        return ["-"] * 8
    lat = r["latency_ms"]
    return [
        f"{r['cpu_pct_per_call']:.4f}",
        f"{r['kb_per_call']:.1f}",
        f"{lat['p50']:.1f}/{lat['p99']:.1f}",
        f"{r['audio']['forwarded']}/{r['audio']['lost']}",
        f"{r['events']['received']}",
        f"{r['generator_cpu_pct_core']:.0f}%",
        f"{r['generator_late_ms']['p99']:.1f}",
        f"{r['others_cpu_pct_core']:.0f}%",
    ]


def trustworthy(r: dict[str, Any]) -> bool:
    """False when the step's figures say more about the machine than the relay: the
    generator fell behind its 20 ms schedule, or other processes took most of a core."""
    return r["generator_late_ms"]["p99"] <= 20.0 and r["others_cpu_pct_core"] <= 50.0


def print_table(results: list[dict[str, Any]]) -> None:
    steps: dict[tuple[int, int, str], dict[str, dict[str, Any]]] = {}
    for r in results:
        steps.setdefault((r["run"], r["calls"], r["mode"]), {})[r["target"]] = r
    cols = ["%core/call", "KB/call", "lat p50/p99 ms", "fwd/lost", "events", "gen CPU",
            "gen late p99 ms", "others CPU"]  # fmt: skip
    print(f"{'run':>3} {'calls':>5} {'mode':>5} {'':>9} " + " ".join(f"{c:>16}" for c in cols))
    for (run, calls, mode), by in sorted(steps.items()):
        for target in ("worker", "rtpengine"):
            if target in by:
                cells = row(by[target])
                mark = "" if trustworthy(by[target]) else "  * disturbed"
                print(f"{run:>3} {calls:>5} {mode:>5} {target:>9} "
                      + " ".join(f"{c:>16}" for c in cells) + mark)  # fmt: skip
        w, p = by.get("worker"), by.get("rtpengine")
        if w and p and p["cpu_pct_per_call"] > 0:
            ratio = w["cpu_pct_per_call"] / p["cpu_pct_per_call"]
            lr = w["latency_ms"]["p50"] / max(p["latency_ms"]["p50"], 1e-3)
            print(f"{'':>3} {'':>5} {'':>5} {'ratio':>9} {ratio:>15.2f}x "
                  f"{w['kb_per_call'] / max(p['kb_per_call'], 0.1):>15.2f}x {lr:>15.1f}x")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", type=int, nargs="*", default=[100, 250, 500], help="call counts")
    ap.add_argument("--modes", nargs="*", choices=sorted(MODES), default=["pcmu", "pcma"])
    ap.add_argument("--peer", choices=["rtpengine"], default=None,
                    help="also run the same calls on a local rtpengine, alternating")
    ap.add_argument("--peer-only", action="store_true", help="skip the media worker")
    ap.add_argument("--runs", type=int, default=1, help="repeat every step this many times")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--measure", type=float, default=20.0)
    ap.add_argument("--phases", type=positive_int, default=20,
                    help="send instants per 20 ms the legs are spread over (1: all at once)")
    ap.add_argument("--press-every", type=float, default=5.0, help="seconds between key presses")
    ap.add_argument("--inband", action="store_true", help="worker legs with in-band detection on")
    ap.add_argument("--rtp-ports", default="12000-15999", help="the worker's RTP ports")
    ap.add_argument("--rtp-socket", choices=["per_leg", "shared"], default=None,
                    help="the worker's [media] rtp_socket (workers that have it); shared: "
                         "every leg on the worker's shared port, a generator socket per leg")
    ap.add_argument("--gen-sockets", choices=["grouped", "per_leg"], default=None,
                    help="the phones' sockets: one per 256 legs, or one per leg (needed "
                         "by the worker with --rtp-socket shared; then the default for "
                         "both relays, so they face the same generator)")  # fmt: skip
    ap.add_argument("--peer-ports", default="16000-19999", help="rtpengine's RTP ports")
    ap.add_argument("--ng-port", type=int, default=22231, help="rtpengine's ng control port")
    ap.add_argument("--rtpengine", default="/usr/bin/rtpengine", help="the rtpengine binary")
    ap.add_argument("--quiet-cores", type=float, default=0.3,
                    help="before each step wait until the machine is this busy at most")
    ap.add_argument("--quiet-wait", type=float, default=90.0,
                    help="seconds to wait for that at most (then run anyway)")
    ap.add_argument("--label", default="", help="free text stored in the JSON")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * max(args.n) + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    targets = ([] if args.peer_only else ["worker"]) + ([args.peer] if args.peer else [])
    if args.peer == "rtpengine":
        if not Path(args.rtpengine).exists():
            raise SystemExit(f"{args.rtpengine} not found: apt-get install -y rtpengine-daemon")
        rtpengine_service_check()
    out = Path(
        args.json or ROOT / "perf" / "results" / f"bench_relay-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    results: list[dict[str, Any]] = []
    step = 0
    for run in range(1, args.runs + 1):
        for n in args.n:
            for mode in args.modes:
                log(f"run {run} N={n} {mode}: load average {load_average()}")
                # alternate which relay goes first, so a drift in the machine's load
                # does not always favour the same one
                order = targets if step % 2 == 0 else targets[::-1]
                step += 1
                for target in order:
                    busy = wait_until_quiet(args.quiet_cores, args.quiet_wait)
                    load = load_average()
                    top = subprocess.run(
                        ["ps", "-eo", "pcpu,etime,args", "--sort=-pcpu"], capture_output=True,
                        text=True, timeout=10).stdout.splitlines()[1:5]  # fmt: skip
                    log(f"{target}: machine busy {busy:.2f} cores, load average {load}")
                    r = run_one(target, mode, n, args)
                    r["run"] = run
                    r["load_average_before"] = load
                    r["busy_cores_before"] = round(busy, 2)
                    r["top_processes_before"] = top
                    r["trustworthy"] = trustworthy(r)

                    results.append(r)
                    lat = r["latency_ms"]
                    log(f"{target} {mode} N={n}: {r['cpu_pct_core']}% of a core = "
                        f"{r['cpu_pct_per_call']}%/call, {r['kb_per_call']} KB/call, latency "
                        f"p50 {lat['p50']} p99 {lat['p99']} ms, audio {r['audio']}, "
                        f"threads {r['threads_cpu_pct_core']}")  # fmt: skip
    print()
    print_table(results)
    print("* disturbed: the generator ran > 20 ms late (p99) or other processes used > 50 % "
          "of a core meanwhile")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "tool": "bench_relay",
        "label": args.label,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": vars(args),
        "results": results,
    }, indent=2))  # fmt: skip
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()

"""Benchmark: the front's ZeroMQ broker (`pbx.broker`), messages per second and front
CPU per message.

The front side is the real `Broker` in this process, on uvloop as in `pbx-front`, over
IPC endpoints in a private directory (the default planes; `--tcp` for loopback TCP).
A media worker's DEALER runs in a process of its own (plain pyzmq, blocking) and
drives four phases on the media plane, each `--repeat` times:

- `rtt`: sequential round trips (an event, the front's handler answers with a command,
  the next event after the answer): round trips per second and the latency at the
  worker (p50, p99);
- `window`: round trips with `--window` events in flight: pairs per second;
- `inbound`: the worker sends events as fast as it can, the front's handler counts them;
- `outbound`: the front sends commands (`--chunk` per loop iteration, as bursts from
  timers or SIP would), the worker counts them.

The front's CPU per message is the process's (every thread: the ZeroMQ I/O thread is
part of the front's cost) and, separately, the loop thread's; both from the kernel
(getrusage, thread_time). Messages are real protocol messages (`MediaEvent` in,
`MediaTimer` out), decoded and encoded by the broker as in production.

    .venv/bin/python perf/bench_broker.py                    # defaults below
    .venv/bin/python perf/bench_broker.py -n 50000 --repeat 5 --json perf/results/b.json

Prints a line per run and a summary; writes a JSON result (default
`perf/results/bench_broker-<YYYYmmdd-HHMMSS>.json`). The same script runs against any
checkout (it imports `pbx` from the tree it lives in): copy it into a worktree of an
older commit to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402
import zmq  # noqa: E402

from pbx.broker import Broker  # noqa: E402
from pbx.config import ZmqSettings  # noqa: E402
from pbx.messages import MediaEvent, MediaTimer, TimerFired, encode  # noqa: E402

IDENTITY = b"bench-worker"
PEER_TIMEOUT_MS = 30_000  # a lost message ends the run with an error, never a hang
PHASES = ("rtt", "window", "inbound", "outbound")


# ---------------------------------------------------------------- the worker (its own process)


def peer_main(endpoint: str, event: bytes, conn: multiprocessing.connection.Connection) -> None:
    """The worker's DEALER: runs each phase the front asks for over `conn`, answers with
    its measurements."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, IDENTITY)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.RCVTIMEO, PEER_TIMEOUT_MS)
    sock.connect(endpoint)
    try:
        while True:
            request = conn.recv()
            if request is None:
                return
            phase, n, window = request
            try:
                conn.send(_peer_phase(sock, event, phase, n, window))
            except zmq.Again:
                conn.send({"error": f"{phase}: no message from the front for "
                                    f"{PEER_TIMEOUT_MS} ms"})
    finally:
        sock.close(0)
        ctx.term()


def _peer_phase(sock: zmq.Socket[bytes], event: bytes, phase: str, n: int, window: int
                ) -> dict[str, Any]:
    if phase == "hello":
        sock.send(event)
        sock.recv()
        return {}
    if phase == "rtt":
        latencies = []
        start = time.perf_counter()
        for _ in range(n):
            t0 = time.perf_counter()
            sock.send(event)
            sock.recv()
            latencies.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        latencies.sort()
        return {"elapsed_s": elapsed,
                "rtt_us_p50": 1e6 * latencies[len(latencies) // 2],
                "rtt_us_p99": 1e6 * latencies[int(len(latencies) * 0.99)]}
    if phase == "window":
        start = time.perf_counter()
        sent = received = 0
        while received < n:
            while sent < n and sent - received < window:
                sock.send(event)
                sent += 1
            sock.recv()
            received += 1
        return {"elapsed_s": time.perf_counter() - start}
    if phase == "inbound":
        start = time.perf_counter()
        for _ in range(n):
            sock.send(event)
        return {"elapsed_s": time.perf_counter() - start}
    if phase == "outbound":
        sock.recv()
        start = time.perf_counter()
        for _ in range(n - 1):
            sock.recv()
        return {"elapsed_s": time.perf_counter() - start}
    raise ValueError(phase)


# ---------------------------------------------------------------- the front (this process)


class FrontCpu:
    """CPU seconds of this process (all threads) and of the loop's thread."""

    def __init__(self) -> None:
        self.process, self.thread = self._now()

    @staticmethod
    def _now() -> tuple[float, float]:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime, time.thread_time()

    def since(self) -> tuple[float, float]:
        process, thread = self._now()
        return process - self.process, thread - self.thread


async def front(settings: ZmqSettings, conn: multiprocessing.connection.Connection,
                args: argparse.Namespace) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    broker = Broker(settings)
    command = MediaTimer(call_id="bench-call", timer_id=1, delay_ms=20)
    state = {"echo": True, "handled": 0, "target": 0}
    reached: asyncio.Future[None] | None = None

    def on_media(identity: bytes, msg: Any) -> None:
        nonlocal reached
        state["handled"] += 1
        if state["echo"]:
            broker.send_media(identity, command)
        elif state["handled"] == state["target"] and reached is not None:
            reached.set_result(None)

    broker.start(on_media, lambda identity, msg: None)

    async def ask(phase: str, n: int = 0) -> dict[str, Any]:
        """The worker's answer, awaited without polling (the pipe's FD in the loop)."""
        answer: asyncio.Future[dict[str, Any]] = loop.create_future()

        def arrived() -> None:
            if not answer.done():
                answer.set_result(conn.recv())

        loop.add_reader(conn.fileno(), arrived)
        try:
            conn.send((phase, n, args.window))
            result = await asyncio.wait_for(answer, PEER_TIMEOUT_MS / 1000 + 10)
        finally:
            loop.remove_reader(conn.fileno())
        if "error" in result:
            raise RuntimeError(result["error"])
        return result

    await ask("hello")  # the ROUTER knows the worker
    runs: list[dict[str, Any]] = []
    plan = [("window", min(args.n, 5_000), "warm-up")]
    for i in range(args.repeat):
        plan += [(phase, args.rtt_n if phase == "rtt" else args.n, f"run {i + 1}")
                 for phase in args.phases]
    try:
        for phase, n, label in plan:
            state.update(echo=phase in ("rtt", "window"), handled=0, target=n)
            cpu = FrontCpu()
            start = time.perf_counter()
            if phase == "inbound":  # from the first event sent to the last one handled
                reached = loop.create_future()
                peer = await ask(phase, n)
                await asyncio.wait_for(reached, PEER_TIMEOUT_MS / 1000)
                elapsed = time.perf_counter() - start
            elif phase == "outbound":  # from the first command sent to the last one read
                waiting = asyncio.ensure_future(ask(phase, n))
                await asyncio.sleep(0.05)  # the worker is in recv
                cpu = FrontCpu()
                start = time.perf_counter()
                for sent in range(n):
                    if not broker.send_media(IDENTITY, command):
                        raise RuntimeError("a send to the worker failed")
                    if sent % args.chunk == args.chunk - 1:
                        await asyncio.sleep(0)
                peer = await waiting
                elapsed = time.perf_counter() - start
            else:  # as the worker timed them
                peer = await ask(phase, n)
                elapsed = peer["elapsed_s"]
            process_s, thread_s = cpu.since()
            messages = 2 * n if phase in ("rtt", "window") else n
            run = {"phase": phase, "label": label, "n": n, "messages": messages,
                   "elapsed_s": elapsed,
                   "per_s": n / elapsed,
                   "front_cpu_us_per_msg": 1e6 * process_s / messages,
                   "loop_cpu_us_per_msg": 1e6 * thread_s / messages,
                   **{k: v for k, v in peer.items() if k.startswith("rtt_")}}
            if label != "warm-up":
                runs.append(run)
            extra = (f", rtt p50 {run['rtt_us_p50']:.0f} us p99 {run['rtt_us_p99']:.0f} us"
                     if phase == "rtt" else "")
            print(f"{label:>8} {phase:<8} {n:>7} x: {run['per_s']:>9,.0f}/s, front CPU "
                  f"{run['front_cpu_us_per_msg']:.1f} us/msg (loop thread "
                  f"{run['loop_cpu_us_per_msg']:.1f}){extra}", flush=True)
    finally:
        broker.close()
    return runs


def summary(runs: list[dict[str, Any]], phases: list[str]) -> dict[str, dict[str, float]]:
    """Per phase, the median over the runs."""
    out: dict[str, dict[str, float]] = {}
    for phase in phases:
        mine = [r for r in runs if r["phase"] == phase]
        keys = [k for k in mine[0] if isinstance(mine[0][k], float)]
        out[phase] = {k: statistics.median(r[k] for r in mine) for k in keys}
    return out


def commit_of_tree() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("-n", type=int, default=20_000,
                    help="messages per window/inbound/outbound run (round trips in window)")
    ap.add_argument("--rtt-n", type=int, default=5_000, help="sequential round trips per run")
    ap.add_argument("--window", type=int, default=64, help="events in flight in `window`")
    ap.add_argument("--chunk", type=int, default=100,
                    help="commands the front sends per loop iteration in `outbound`")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    ap.add_argument("--tcp", action="store_true", help="loopback TCP instead of IPC")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-broker-") as scratch:
        os.chmod(scratch, 0o700)
        if args.tcp:
            ports = []
            for _ in range(3):
                probe: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
                ports.append(probe.bind_to_random_port("tcp://127.0.0.1"))
                probe.close(0)
            media, ivr, events = (f"tcp://127.0.0.1:{p}" for p in ports)
        else:
            media, ivr, events = (f"ipc://{scratch}/{p}" for p in ("media", "ivr", "events"))
        settings = ZmqSettings(media_endpoint=media, ivr_endpoint=ivr, events_endpoint=events)
        event = encode(MediaEvent(call_id="bench-call", event=TimerFired(timer_id=1)))
        spawn = multiprocessing.get_context("spawn")
        ours, theirs = spawn.Pipe()
        peer = spawn.Process(target=peer_main, args=(media, event, theirs), daemon=True)
        peer.start()
        try:
            runs = uvloop.run(front(settings, ours, args))
        finally:
            try:
                ours.send(None)
            except OSError:
                pass
            peer.join(10)
            if peer.is_alive():
                peer.kill()
                peer.join(5)

    medians = summary(runs, args.phases)
    result: dict[str, Any] = {
        "script": "bench_broker",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commit": commit_of_tree(),
        "host": platform.node(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "transport": "tcp" if args.tcp else "ipc",
        "params": {"n": args.n, "rtt_n": args.rtt_n, "window": args.window,
                   "chunk": args.chunk, "repeat": args.repeat, "phases": args.phases},
        "load_avg_1m": os.getloadavg()[0],
        "median": medians,
        "runs": runs,
    }
    out = (args.json or ROOT / "perf" / "results"
           / f"bench_broker-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print()
    print(f"broker at {result['commit']}, {result['transport']}, median of {args.repeat} runs "
          f"(load average {result['load_avg_1m']:.2f})")
    print(f"{'phase':<9} {'per s':>10} {'front CPU us/msg':>17} {'loop thread':>12} "
          f"{'rtt p50 us':>11} {'rtt p99 us':>11}")
    for phase, m in medians.items():
        rtt = (f"{m['rtt_us_p50']:>11.0f} {m['rtt_us_p99']:>11.0f}" if phase == "rtt" else "")
        print(f"{phase:<9} {m['per_s']:>10,.0f} {m['front_cpu_us_per_msg']:>17.1f} "
              f"{m['loop_cpu_us_per_msg']:>12.1f} {rtt}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

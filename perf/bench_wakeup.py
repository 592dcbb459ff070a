#!/usr/bin/env python3
"""Benchmark: what waking another process costs on this machine (issue 9).

A pbx call crosses processes some twenty times (sipp, the front and its ZeroMQ I/O
thread, a media worker, an executor, the provider, and back), and each crossing wakes
a process that was asleep. What that costs is the machine's, not ours: on bare metal
a few microseconds; on a virtual CPU whose idle loop halts without polling first
(`cpuidle` driver haltpoll with `guest_halt_poll_ns=0`, as on our 2-core VMs), every
wake-up of the other CPU is an interrupt between virtual CPUs, paid in CPU time by
both sides. This script measures it, so a figure per call can be read against the
machine it was taken on.

Two processes bounce a 32-byte datagram over a Unix socket pair, `--round-trips`
times (default 20,000) per placement:

* `free`: wherever the scheduler puts them (what the pbx processes get);
* `two_cpus`: pinned to two different CPUs (every message wakes the other CPU);
* `one_cpu`: both pinned to one CPU (a wake-up is a switch on the same CPU);
* `two_cpus_busy` (with `--busy`, the default): as `two_cpus`, with a niced spinning
  process on each CPU so neither ever idles.

Printed per placement: round-trip time (wall) and CPU time per round trip of each side
(`time.process_time` in the parent, `os.times` of the child). Stdlib only, bounded;
JSON to `perf/results/bench_wakeup-<YYYYmmdd-HHMMSS>.json` (or `--json PATH`).

    python3 perf/bench_wakeup.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MESSAGE = b"x" * 32
SPINNER = "import os\nos.nice(19)\nwhile True:\n    pass\n"


def cpuidle() -> dict[str, str]:
    """The idle driver and, for haltpoll, how long an idle CPU polls before halting."""
    out = {}
    for name, path in (("driver", "/sys/devices/system/cpu/cpuidle/current_driver"),
                       ("governor", "/sys/devices/system/cpu/cpuidle/current_governor_ro"),
                       ("guest_halt_poll_ns",
                        "/sys/module/haltpoll/parameters/guest_halt_poll_ns")):
        try:
            out[name] = Path(path).read_text().strip()
        except OSError:
            pass
    return out


def ping_pong(round_trips: int, parent_cpu: int | None,
              child_cpu: int | None) -> dict[str, float]:
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    before = os.times()
    pid = os.fork()
    if pid == 0:  # the child: echo every datagram, then leave without cleanup
        parent_end.close()
        if child_cpu is not None:
            os.sched_setaffinity(0, {child_cpu})
        child_end.settimeout(10.0)
        try:
            for _ in range(round_trips + 1):
                child_end.send(child_end.recv(64))
        finally:
            os._exit(0)
    child_end.close()
    own = os.sched_getaffinity(0)
    try:
        if parent_cpu is not None:
            os.sched_setaffinity(0, {parent_cpu})
        parent_end.settimeout(10.0)
        parent_end.send(MESSAGE)  # the first one: both sides running
        parent_end.recv(64)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(round_trips):
            parent_end.send(MESSAGE)
            parent_end.recv(64)
        wall1, cpu1 = time.perf_counter(), time.process_time()
    finally:
        os.sched_setaffinity(0, own)
        parent_end.close()
        os.waitpid(pid, 0)
    after = os.times()
    child_cpu_s = (after.children_user + after.children_system
                   - before.children_user - before.children_system)
    return {"round_trip_us": round((wall1 - wall0) / round_trips * 1e6, 2),
            "parent_cpu_us": round((cpu1 - cpu0) / round_trips * 1e6, 2),
            "child_cpu_us": round(child_cpu_s / (round_trips + 1) * 1e6, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--round-trips", type=int, default=20_000)
    parser.add_argument("--no-busy", dest="busy", action="store_false",
                        help="skip the placement with spinning processes on both CPUs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    placements: list[tuple[str, int | None, int | None]] = [("free", None, None)]
    if len(cpus) >= 2:
        placements.append(("two_cpus", cpus[0], cpus[1]))
    placements.append(("one_cpu", cpus[0], cpus[0]))
    results: dict[str, Any] = {}
    for name, parent_cpu, child_cpu in placements:
        results[name] = ping_pong(args.round_trips, parent_cpu, child_cpu)
    if args.busy and len(cpus) >= 2:
        spinners = [subprocess.Popen([sys.executable, "-c", SPINNER]) for _ in cpus[:2]]
        try:
            for spinner, cpu in zip(spinners, cpus[:2], strict=True):
                os.sched_setaffinity(spinner.pid, {cpu})
            time.sleep(0.2)
            results["two_cpus_busy"] = ping_pong(args.round_trips, cpus[0], cpus[1])
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()
    idle = cpuidle()
    print(f"cpus {len(cpus)}, cpuidle {idle or 'unknown'}")
    print(f"{'placement':<15} {'round trip us':>14} {'CPU us/round trip':>18} {'child':>7}")
    for name, r in results.items():
        print(f"{name:<15} {r['round_trip_us']:>14.1f} {r['parent_cpu_us']:>18.1f} "
              f"{r['child_cpu_us']:>7.1f}")
    out = args.json or ROOT / "perf" / "results" / f"bench_wakeup-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpus": len(cpus), "cpuidle": idle,
                               "round_trips": args.round_trips, "results": results},
                              indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Step overhead the caller feels (DESIGN §4), with a provider that answers at once.

    python perf/step_overhead.py                      # own system; 100 then 500 calls
    python perf/step_overhead.py --calls 100 --rounds 6 --period 1.5
    python perf/step_overhead.py --pbx 127.0.0.1:5060 --target '*95' --provider-port 8095

Two intervals per IVR step, both on CLOCK_MONOTONIC (the caller and the provider are
two processes on one machine, and `time.monotonic` is the same clock in both):

* DTMF → request: the caller sends the first RFC 4733 end packet of a key →
  the provider has the `dtmf` step request (body read);
* reply → RTP: the provider hands its reply (a `prompt` of `sounds/beep.wav` whose
  `next` collects the next key) to its HTTP server → the first RTP packet with the
  marker bit of that prompt arrives at the caller.

The provider runs in a child process (aiohttp): `session_start` → `collect_dtmf`
(one key, no prompt), each `dtmf` → the beep prompt, then `collect_dtmf` again, so
every key is one provider step. The caller is `perf/callload.py`'s UAC (one asyncio
loop): N concurrent calls, set up at `--rate`; once all are up, each call presses
`--rounds` keys, one every `--period` seconds, the calls' presses spread evenly over
the period; then BYE.

By default the script starts its own system (front, one media worker per core, two
executors under supervisord, like `make run`, on free ports, its config under a
temporary directory) with a route to its provider. Against a running system
(`--pbx`), add a route for `--target` whose url is `http://127.0.0.1:<provider-port>/step`:

    [[routes]]
    name = "step_overhead"
    to_user = "*95"
    app = "ivr"
    app_params = { mode = "step", url = "http://127.0.0.1:8095/step" }

Prints progress every second, a table next to the DESIGN targets (p99 ≤ 5 ms and
≤ 25 ms), and writes JSON to perf/results/step_overhead-<ts>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perf import callload  # noqa: E402

VENV_BIN = Path(sys.executable).parent
TARGET_DTMF_P99_MS = 5.0
TARGET_REPLY_P99_MS = 25.0
PROMPT = "sounds/beep.wav"
COLLECT = {"type": "collect_dtmf", "min_digits": 1, "max_digits": 1, "timeout_ms": 120_000,
           "step_id": "collect"}
ROUND_DIGITS = "1234567890"


# --------------------------------------------------------------------------- provider


def provider_main(port: int, ready: Any) -> None:
    """The provider (child process): answers at once, stamps every step request."""
    import orjson
    from aiohttp import web

    records: list[list[Any]] = []  # [caller, event type, digit, t_recv, t_reply]
    ok = web.Response(body=b'{"status":"ok"}', content_type="application/json")
    prompt = orjson.dumps({"type": "prompt", "file": PROMPT, "interruptible": False,
                           "step_id": "beep", "next": COLLECT})
    collect = orjson.dumps(COLLECT)
    hangup = orjson.dumps({"type": "hangup"})

    async def handle(request: web.Request) -> web.Response:
        raw = await request.read()
        t_recv = time.monotonic()
        path = request.path
        if path.endswith(("/start", "/end", "/dtmf-match")):
            return ok
        body = orjson.loads(raw)
        event = body.get("event") or {}
        kind = event.get("type", "")
        if kind == "session_start":
            data = collect
        elif kind == "dtmf":
            data = prompt
        else:
            data = hangup
        t_reply = time.monotonic()
        records.append([body.get("caller", ""), kind, event.get("digit"), t_recv, t_reply])
        return web.Response(body=data, content_type="application/json")

    async def dump(request: web.Request) -> web.Response:
        data = orjson.dumps(records)
        if request.query.get("reset"):
            records.clear()
        return web.Response(body=data, content_type="application/json")

    app = web.Application()
    app.router.add_get("/__records", dump)
    app.router.add_post("/{tail:.*}", handle)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        ready.set()
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:  # pragma: no cover
        asyncio.run(serve())


def provider_records(port: int, reset: bool = False) -> list[list[Any]]:
    url = f"http://127.0.0.1:{port}/__records" + ("?reset=1" if reset else "")
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


# --------------------------------------------------------------------------- own system


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    for _ in range(200):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                t.bind(("127.0.0.1", port))
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


class OwnSystem:
    """front + media workers + executors under supervisord, like `make run`."""

    def __init__(self, provider_url: str, media_workers: int, executors: int,
                 rtp_ports: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="step_overhead-"))
        self.sip_port = free_port()
        self.admin_port = free_port(socket.SOCK_STREAM)
        self.media_workers, self.executors = media_workers, executors
        (self.root / "logs").mkdir()
        config = f"""
[sip]
listen = "127.0.0.1:{self.sip_port}"
rate_limit_exempt = ["127.0.0.0/8"]

[media]
rtp_ip = "127.0.0.1"
rtp_ports = "{rtp_ports}"
sounds_dir = "{ROOT / 'sounds'}"
recordings_dir = "{self.root / 'recordings'}"

[zmq]
# IPC sockets in a directory of this run's own (the front creates it mode 0700).
media_endpoint = "ipc://{self.root / 'zmq' / 'media'}"
ivr_endpoint = "ipc://{self.root / 'zmq' / 'ivr'}"
events_endpoint = "ipc://{self.root / 'zmq' / 'events'}"

[admin]
listen = "127.0.0.1:{self.admin_port}"

[logging]
dir = "{self.root / 'logs'}"
level = "INFO"

[[routes]]
name = "step_overhead"
to_user = "*95"
app = "ivr"
app_params = {{ mode = "step", url = "{provider_url}", retry = {{ max_retries = 1, timeout_ms = 2000 }} }}
"""
        self.config_path = self.root / "pbx.toml"
        self.config_path.write_text(config)
        conf = f"""
[supervisord]
logfile={self.root}/logs/supervisord.log
pidfile={self.root}/supervisord.pid
childlogdir={self.root}/logs
directory={ROOT}

[unix_http_server]
file={self.root}/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
"""
        for name, command, n in (("front", "pbx-front", 1), ("media", "pbx-media", media_workers),
                                 ("ivr", "pbx-ivr", executors)):
            procname = f"{name}-%(process_num)02d" if n > 1 else name
            conf += f"""
[program:{name}]
command={VENV_BIN / command}
process_name={procname}
numprocs={n}
directory={ROOT}
autorestart=true
startsecs=1
stopwaitsecs=5
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile={self.root}/logs/{procname}.log
environment=PBX_CONFIG="{self.config_path}",PYTHONPATH="{ROOT}"
"""
        conf_path = self.root / "supervisord.conf"
        conf_path.write_text(conf)
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "supervisord"), "-n", "-c", str(conf_path)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @property
    def sip_addr(self) -> str:
        return f"127.0.0.1:{self.sip_port}"

    def metrics(self) -> dict[str, float]:
        return read_metrics(f"127.0.0.1:{self.admin_port}")

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                m = self.metrics()
                if (m.get("pbx_media_workers", 0) >= self.media_workers
                        and m.get("pbx_executors", 0) >= self.executors):
                    return
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"the system did not come up; logs in {self.root / 'logs'}")

    def stop(self, keep: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (/proc/<pid>/stat), seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_name(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    names = [Path(c.decode(errors="replace")).name for c in cmd if c]
    name = next((n for n in names if n.startswith("pbx-")), names[0] if names else "?")
    return f"{name}[{pid}]"


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def read_metrics(admin: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[name] = float(value)
    return values


# --------------------------------------------------------------------------- the caller


class StepRtp(callload.RtpEndpoint):
    def datagram_received(self, data: bytes, addr: Any) -> None:  # type: ignore[override]
        if len(data) >= 12 and data[1] & 0x80:
            self.call.markers.append(time.monotonic())  # type: ignore[attr-defined]
        super().datagram_received(data, addr)


class StepCall(callload.Call):
    """A callload call that presses one key per round and stamps the end packet."""

    def __init__(self, load: callload.Load, index: int) -> None:
        super().__init__(load, index)
        self.markers: list[float] = []
        self.rounds: list[tuple[str, float]] = []  # (digit, first end packet sent)

    @property
    def user(self) -> str:
        return f"step{self.load.level}x{self.index}"  # type: ignore[attr-defined]

    def from_value(self) -> str:
        # Its own address with its port (see callload.Call.from_value).
        return f"<sip:{self.user}@{self.a.local_ip}:{self.load.sip_port}>;tag={self.from_tag}"

    async def bind_rtp(self) -> None:
        lo, hi = self.load.rtp_range
        span = (hi - lo) // 2 + 1
        for _ in range(min(span, 200)):
            port = lo + 2 * (self.load.next_rtp % span)
            self.load.next_rtp += 1
            try:
                _, proto = await self.load.loop.create_datagram_endpoint(
                    lambda: StepRtp(self), local_addr=(self.a.local_ip, port))
            except OSError:
                continue
            self.rtp, self.rtp_port = proto, port
            return
        raise OSError("no free RTP port in range")

    async def send_digits(self) -> None:
        load: StepLoad = self.load  # type: ignore[assignment]
        pt = self.answer.dtmf_pt if self.answer and self.answer.dtmf_pt is not None else 101
        offset = (self.index / max(1, self.a.n)) * self.a.period
        for k in range(self.a.rounds):
            await _sleep_until(load.measure_t0 + offset + k * self.a.period)
            digit = ROUND_DIGITS[k % len(ROUND_DIGITS)]
            event = callload.DTMF_EVENTS[digit]
            t0 = time.monotonic()
            ts = self.media_ts(time.perf_counter())
            n = max(1, round(self.a.digit_ms / 20))
            for j in range(n):
                await _sleep_until(t0 + 0.02 * j)
                self.send_rtp(pt, ts, callload.rfc4733_payload(event, False, 160 * (j + 1)),
                              marker=(j == 0))
            for j in range(3):
                await _sleep_until(t0 + 0.02 * (n + j))
                if j == 0:
                    self.rounds.append((digit, time.monotonic()))
                self.send_rtp(pt, ts, callload.rfc4733_payload(event, True, 160 * n))
            load.pressed += 1


class StepLoad(callload.Load):
    def __init__(self, args: argparse.Namespace, level: int) -> None:
        super().__init__(args)
        self.call_class = StepCall
        self.level = level
        self.pressed = 0
        # All calls are up (set-up at --rate plus a margin) before the first key.
        self.measure_t0 = time.monotonic() + args.n / args.r + args.settle

    def progress(self, t0: float) -> str:
        return super().progress(t0) + f" keys {self.pressed}"


async def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def call_args(args: argparse.Namespace, n: int) -> argparse.Namespace:
    """callload's options for one level of N calls."""
    ns = callload.parse_args([
        "-n", str(n), "-r", str(args.rate), "--target", args.target, "--pbx", args.pbx,
        "--digits", "1", "--digit-ms", str(args.digit_ms), "--rtp-ports", args.rtp_ports,
        "--timeout", "10",
    ])
    ns.hold = n / args.rate + args.settle + args.rounds * args.period + 2.0
    ns.rounds, ns.period, ns.settle = args.rounds, args.period, args.settle
    return ns


async def run_level(args: argparse.Namespace, n: int) -> tuple[StepLoad, float]:
    load = StepLoad(call_args(args, n), n)
    elapsed = await load.run()
    return load, elapsed


def pct(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    arr = np.array(values, dtype=float)
    return {"n": int(arr.size), "p50": round(float(np.percentile(arr, 50)), 3),
            "p90": round(float(np.percentile(arr, 90)), 3),
            "p99": round(float(np.percentile(arr, 99)), 3),
            "max": round(float(arr.max()), 3), "mean": round(float(arr.mean()), 3)}


def analyse(load: StepLoad, records: list[list[Any]]) -> dict[str, Any]:
    by_caller: dict[str, list[list[Any]]] = {}
    for rec in records:
        if rec[1] == "dtmf":
            by_caller.setdefault(rec[0], []).append(rec)
    dtmf_ms: list[float] = []
    reply_ms: list[float] = []
    missing_request = mismatched = missing_rtp = 0
    for call in load.call_list:
        assert isinstance(call, StepCall)
        reqs = by_caller.get(call.user, [])
        markers = sorted(call.markers)
        for k, (digit, t_end) in enumerate(call.rounds):
            if k >= len(reqs):
                missing_request += 1
                continue
            _, _, got, t_recv, t_reply = reqs[k]
            if got != digit:
                mismatched += 1
                continue
            dtmf_ms.append((t_recv - t_end) * 1000.0)
            first = next((m for m in markers if m >= t_reply), None)
            if first is None:
                missing_rtp += 1
                continue
            reply_ms.append((first - t_reply) * 1000.0)
    return {
        "keys_pressed": sum(len(c.rounds) for c in load.call_list),  # type: ignore[attr-defined]
        "missing_request": missing_request,
        "digit_mismatch": mismatched,
        "missing_prompt_rtp": missing_rtp,
        "dtmf_to_request_ms": pct(dtmf_ms),
        "reply_to_first_rtp_ms": pct(reply_ms),
    }


def print_table(levels: list[dict[str, Any]]) -> None:
    print("\n== step overhead (ms; caller and provider on one machine, CLOCK_MONOTONIC) ==")
    print(f"{'calls':>6} {'keys':>6} | {'DTMF end → request':^32} | "
          f"{'provider reply → first RTP':^32}")
    print(f"{'':>6} {'':>6} | {'p50':>7} {'p90':>7} {'p99':>7} {'max':>8} | "
          f"{'p50':>7} {'p90':>7} {'p99':>7} {'max':>8}")
    for lv in levels:
        d, r = lv["dtmf_to_request_ms"], lv["reply_to_first_rtp_ms"]
        print(f"{lv['calls']:>6} {d['n']:>6} | {d['p50']!s:>7} {d['p90']!s:>7} "
              f"{d['p99']!s:>7} {d['max']!s:>8} | {r['p50']!s:>7} {r['p90']!s:>7} "
              f"{r['p99']!s:>7} {r['max']!s:>8}")
    print(f"{'target':>13} | {'':>15} {'≤ ' + str(TARGET_DTMF_P99_MS):>7} {'':>8} | "
          f"{'':>15} {'≤ ' + str(TARGET_REPLY_P99_MS):>7}")
    for lv in levels:
        problems = {k: lv[k] for k in ("missing_request", "digit_mismatch",
                                       "missing_prompt_rtp") if lv[k]}
        c = lv["callload"]["calls"]
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in lv.get("cpu_share_of_a_core", {}).items())
        print(f"{lv['calls']} calls: CPU (cores, over the level) {cpu}; "
              f"load average {lv['loadavg_before'][0]:.2f} -> {lv['loadavg_after'][0]:.2f}")
        print(f"{lv['calls']} calls: {c['ok']} ok, {c['failed']} failed"
              + (f", failures {lv['callload']['failures']}" if c["failed"] else "")
              + (f", {problems}" if problems else ""))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="IVR step overhead at N concurrent calls")
    p.add_argument("--calls", default="100,500", help="concurrent calls per level (100,500)")
    p.add_argument("--rounds", type=int, default=5, help="keys (provider steps) per call")
    p.add_argument("--period", type=float, default=2.0, help="seconds between a call's keys")
    p.add_argument("--rate", type=float, default=100.0, help="call set-up rate per second")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds after the last set-up before the first key")
    p.add_argument("--digit-ms", type=int, default=60, help="key length before the end packet")
    p.add_argument("--rtp-ports", default="54000-57999", help="the caller's RTP ports")
    p.add_argument("--pbx", default="", help="a running system's SIP address (default: own)")
    p.add_argument("--admin", default="", help="its admin address (for /metrics)")
    p.add_argument("--target", default="*95", help="request-URI user of the provider's route")
    p.add_argument("--provider-port", type=int, default=0, help="provider port (default: free)")
    p.add_argument("--media-workers", type=int, default=os.cpu_count() or 1,
                   help="own system: media workers (default: one per core)")
    p.add_argument("--executors", type=int, default=2, help="own system: IVR executors")
    p.add_argument("--keep", action="store_true", help="keep the own system's logs")
    p.add_argument("--json", default="", help="result file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels_n = [int(x) for x in args.calls.split(",") if x.strip()]
    provider_port = args.provider_port or free_port(socket.SOCK_STREAM)
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    provider = ctx.Process(target=provider_main, args=(provider_port, ready), daemon=True)
    provider.start()
    if not ready.wait(20):
        raise SystemExit("the provider did not start")
    system: OwnSystem | None = None
    admin = args.admin
    if not args.pbx:
        system = OwnSystem(f"http://127.0.0.1:{provider_port}/step", args.media_workers,
                           args.executors, "20000-29999")
        print(f"own system: SIP {system.sip_addr}, admin 127.0.0.1:{system.admin_port}, "
              f"{args.media_workers} media workers, {args.executors} executors, "
              f"provider 127.0.0.1:{provider_port}", flush=True)
        system.wait_ready()
        args.pbx, args.target, admin = system.sip_addr, "*95", f"127.0.0.1:{system.admin_port}"
    else:
        print(f"system at {args.pbx}; route {args.target!r} must point at "
              f"http://127.0.0.1:{provider_port}/step", flush=True)
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run  # type: ignore[assignment]
    results: list[dict[str, Any]] = []
    try:
        for n in levels_n:
            provider_records(provider_port, reset=True)
            load_avg = os.getloadavg()
            pids = {"caller+script": os.getpid(), "provider": provider.pid or 0}
            if system is not None:
                pids.update({process_name(c): c for c in children(system.proc.pid)})
            cpu0, wall0 = {k: cpu_seconds(v) for k, v in pids.items()}, time.monotonic()
            print(f"\n-- {n} concurrent calls, {args.rounds} keys each, one per "
                  f"{args.period} s --", flush=True)
            load, elapsed = runner(run_level(args, n))
            summary = load.summary(elapsed)
            summary.pop("per_call", None)
            level = {"calls": n, **analyse(load, provider_records(provider_port)),
                     "loadavg_before": load_avg, "loadavg_after": os.getloadavg(),
                     "cpu_share_of_a_core": {
                         k: round((cpu_seconds(v) - cpu0[k]) / (time.monotonic() - wall0), 3)
                         for k, v in pids.items()},
                     "callload": summary}
            if admin:
                with contextlib.suppress(OSError):
                    deadline = time.monotonic() + 15
                    while time.monotonic() < deadline:
                        m = read_metrics(admin)
                        if m.get("pbx_calls", 1) == 0 and m.get("pbx_media_legs", 1) == 0:
                            break
                        time.sleep(0.2)
                    level["metrics_after"] = {k: m.get(k) for k in (
                        "pbx_calls", "pbx_sessions", "pbx_media_legs")}
            results.append(level)
            print_table([level])
    finally:
        if system is not None:
            system.stop(keep=args.keep)
            if args.keep:
                print(f"logs: {system.root / 'logs'}")
        provider.terminate()
        provider.join(5)
    print_table(results)
    out = {
        "tool": "perf/step_overhead.py",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {k: v for k, v in vars(args).items()},
        "targets_p99_ms": {"dtmf_to_request": TARGET_DTMF_P99_MS,
                           "reply_to_first_rtp": TARGET_REPLY_P99_MS},
        "cpu_count": os.cpu_count(),
        "levels": results,
    }
    path = Path(args.json) if args.json else (
        ROOT / "perf" / "results" / f"step_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"results   : {path}")
    bad = any(lv["callload"]["calls"]["failed"] or lv["missing_request"] for lv in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

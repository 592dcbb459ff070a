#!/usr/bin/env python3
"""Benchmark: one IVR executor's CPU per session (`workers.ivr`), issue 9.

One real executor process (`python -m workers.ivr`, a generated config in a temporary
directory, its DEALER on an IPC socket there) and the reference provider
(`examples/step_ivr_provider.py`, its own process on a free loopback port). The script
is the front's IVR ROUTER: it sends sessions at `--rate` per second, each as the front
sends them (`pbx.calls.ivr`): an `IvrEvent` with a `SessionStartInput` (the executor
sends `/start`, asks the provider for `session_start`, and answers with the welcome
prompt), then, on that reply, an `IvrEvent` with the reply's state and a
`CallEndedInput` (the caller hung up during the prompt: `/end`, the done reply). So a
session is two events, two replies and three HTTP requests, the *99 call's share of an
executor.

Figures, from the processes' /proc/<pid>/stat (utime + stime, every thread) over the
measured sessions (`--warmup` sessions first are not counted):

* executor CPU ms per session, provider CPU ms per session, and their ratio: the
  provider's work per session is the same whatever the executor's code, so the ratio
  takes out much of what the shared machine does to both (steal, cache, frequency):
  it spread ~3 % between runs where the executor's own figure spread ~20 %;
* reply latency at the ROUTER (event sent -> reply received), p50 and p99, per event
  kind and together.

    .venv/bin/python perf/bench_executor.py                       # 2000 sessions, 100/s
    .venv/bin/python perf/bench_executor.py -n 3000 -r 150 --repeat 2 --json out.json

`--in-process N` measures instead the executor's own work without I/O, hot, in this
process: `workers.ivr.process_event` for both events of N sessions (decode of the
event, the machine, encode of the reply), the provider's answers from the reference
provider's `Sessions` called directly (no HTTP: its cost is the aiohttp client's, which
this leaves out), best of `--repeat` rounds of us per session on the thread's CPU clock.
Steadier than the processes' figures on a loaded machine; it runs against older
checkouts too.

Bounded: every wait has a deadline (a lost reply ends the run with an error), both
children are killed at the end. Loopback and IPC only. Prints a line per run and
writes JSON (default `perf/results/bench_executor-<YYYYmmdd-HHMMSS>.json`). The script
only uses `pbx.messages`, so it runs against older checkouts too (copy it there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from pbx.config import IvrAppParams  # noqa: E402
from pbx.messages import (  # noqa: E402
    CallEndedInput,
    CallInfo,
    IvrEvent,
    IvrReady,
    IvrReply,
    SessionStartInput,
    decode,
    encode,
)

REPLY_TIMEOUT_S = 10.0  # a reply later than this: the run fails
READY_TIMEOUT_S = 60.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def proc_cpu_s(pid: int) -> float:
    """utime + stime of the whole process (every thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


PROFILED_EXECUTOR = """
import cProfile, runpy, time
profile = cProfile.Profile(time.thread_time)
profile.enable()
try:
    runpy.run_module("workers.ivr", run_name="__main__")
finally:
    profile.disable()
    profile.dump_stats({out!r})
"""


class Children:
    """The provider and the executor, started and always stopped."""

    def __init__(self, tmp: Path, capacity: int, cprofile: Path | None = None) -> None:
        self.tmp = tmp
        self.cprofile = cprofile
        self.procs: list[subprocess.Popen[bytes]] = []
        port = free_port()
        self.provider = self._start(
            [sys.executable, str(ROOT / "examples" / "step_ivr_provider.py"), str(port)],
            os.environ.copy(), "provider.log")
        self.provider_url = f"http://127.0.0.1:{port}/ivr/step"
        zmq_dir = tmp / "zmq"
        zmq_dir.mkdir(mode=0o700)
        self.endpoint = f"ipc://{zmq_dir / 'ivr'}"
        (tmp / "pbx.toml").write_text(
            f'[zmq]\nivr_endpoint = "{self.endpoint}"\n\n'
            f"[ivr]\nheartbeat_ms = 1000\ncapacity = {capacity}\n\n"
            f'[logging]\nlevel = "WARNING"\ndir = "{tmp}"\n',
            encoding="utf-8",
        )
        self.executor_env = {**os.environ, "PBX_CONFIG": str(tmp / "pbx.toml"),
                             "PYTHONPATH": str(ROOT)}
        self.executor: subprocess.Popen[bytes] | None = None

    def _start(self, argv: list[str], env: dict[str, str], log_name: str
               ) -> subprocess.Popen[bytes]:
        with open(self.tmp / log_name, "wb") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                    stderr=out)
        self.procs.append(proc)
        return proc

    def start_executor(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "workers.ivr"]
        if self.cprofile is not None:
            # cProfile on the main thread's CPU clock, not the wall clock: a send that
            # wakes another process is time off this CPU, not the executor's cost.
            argv[1:] = ["-c", PROFILED_EXECUTOR.format(out=str(self.cprofile))]
        self.executor = self._start(argv, self.executor_env, "executor.log")
        return self.executor

    def wait_provider(self) -> None:
        deadline = time.monotonic() + 30.0
        health = self.provider_url.rsplit("/ivr/step", 1)[0] + "/health"
        while True:
            try:
                with urllib.request.urlopen(health, timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                if time.monotonic() > deadline or self.provider.poll() is not None:
                    raise RuntimeError("the reference provider did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def executor_log(self) -> str:
        path = self.tmp / "executor.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def run_once(children: Children, router: zmq.Socket[bytes], identity: bytes, n: int,
             rate: float, warmup: int, tag: str) -> dict[str, Any]:
    """`warmup` + `n` sessions at `rate`/s; figures over the last `n`."""
    assert children.executor is not None
    params = IvrAppParams(url=children.provider_url)
    total = warmup + n
    sent_at: dict[tuple[str, int], float] = {}
    latency: dict[int, list[float]] = {1: [], 2: []}
    done = 0
    cpu0: tuple[float, float] | None = None
    t_measure = 0.0
    bad: list[str] = []

    def send(event: IvrEvent) -> None:
        sent_at[(event.session_id, event.seq)] = time.monotonic()
        router.send(identity, zmq.SNDMORE)
        router.send(encode(event))

    t0 = time.monotonic()
    deadline = t0 + total / rate + 60.0
    next_i = 0
    last_reply = t0
    while done < total:
        now = time.monotonic()
        if now > deadline or now - last_reply > REPLY_TIMEOUT_S and sent_at:
            raise RuntimeError(f"{done} of {total} sessions done, then no reply for "
                               f"{REPLY_TIMEOUT_S} s; executor log:\n"
                               f"{children.executor_log()}")
        while next_i < total and t0 + next_i / rate <= now:
            if next_i == warmup:
                cpu0 = (proc_cpu_s(children.executor.pid), proc_cpu_s(children.provider.pid))
                t_measure = now
            sid = f"{tag}-{next_i}"
            call = CallInfo(call_id=sid, session_id=sid, caller="1001", callee="*99",
                            route_name="bench", params=params,
                            sip_headers={"User-Agent": "bench_executor"})
            send(IvrEvent(session_id=sid, seq=1, input=SessionStartInput(call=call)))
            next_i += 1
        wait_ms = max(0, int((t0 + next_i / rate - time.monotonic()) * 1000)) \
            if next_i < total else 100
        if not router.poll(min(wait_ms, 100)):
            continue
        while True:
            try:
                router.recv(zmq.NOBLOCK)  # identity
                frame = router.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            msg = decode(frame)
            if not isinstance(msg, IvrReply):
                continue
            arrived = time.monotonic()
            last_reply = arrived
            started = sent_at.pop((msg.session_id, msg.seq), None)
            index = int(msg.session_id.rsplit("-", 1)[1])
            if started is not None and index >= warmup:
                latency[msg.seq].append((arrived - started) * 1000.0)
            if msg.seq == 1:
                if msg.done:
                    bad.append(f"{msg.session_id}: done at session start: {msg.commands}")
                send(IvrEvent.model_construct(session_id=msg.session_id, seq=2,
                                              state=msg.state,
                                              input=CallEndedInput(reason="Hangup")))
            else:
                if not msg.done:
                    bad.append(f"{msg.session_id}: not done after call_ended")
                done += 1
    # The /end notifications go out after the last reply: let them finish.
    time.sleep(0.5)
    assert cpu0 is not None
    elapsed = time.monotonic() - t_measure
    exec_ms = (proc_cpu_s(children.executor.pid) - cpu0[0]) * 1000.0 / n
    prov_ms = (proc_cpu_s(children.provider.pid) - cpu0[1]) * 1000.0 / n
    both = latency[1] + latency[2]
    return {
        "sessions": n,
        "rate": rate,
        "elapsed_s": round(elapsed, 3),
        "executor_cpu_ms_per_session": round(exec_ms, 4),
        "provider_cpu_ms_per_session": round(prov_ms, 4),
        "executor_to_provider_cpu": round(exec_ms / prov_ms, 3) if prov_ms > 0 else None,
        "reply_ms_p50": round(percentile(both, 0.5), 3),
        "reply_ms_p99": round(percentile(both, 0.99), 3),
        "start_reply_ms_p50": round(percentile(latency[1], 0.5), 3),
        "start_reply_ms_p99": round(percentile(latency[1], 0.99), 3),
        "end_reply_ms_p50": round(percentile(latency[2], 0.5), 3),
        "end_reply_ms_p99": round(percentile(latency[2], 0.99), 3),
        "bad_replies": bad[:10],
        "bad_reply_count": len(bad),
    }


class _DirectProvider:
    """In place of `pbx.ivr.provider.ProviderClient` for `--in-process`: the reference
    provider's answers without HTTP (notifications only counted)."""

    notify_timeout_ms = 500

    def __init__(self) -> None:
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            "step_ivr_provider", ROOT / "examples" / "step_ivr_provider.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.sessions = module.Sessions()
        self.notified = 0
        self.spent_s = 0.0  # CPU of the provider's own work: not the executor's

    def send(self, request: Any) -> Any:
        import asyncio

        self.notified += 1
        if request.kind == "start":
            t0 = time.thread_time()
            body = request.body
            self.sessions.start(body["session_id"], body["caller"], body["callee"])
            self.spent_s += time.thread_time() - t0
        done: Any = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def step(self, params: Any, body: dict[str, Any]) -> Any:
        import orjson

        from pbx.ivr.requests import ProviderResult
        t0 = time.thread_time()
        answer = self.sessions.step(body["session_id"], body)
        self.spent_s += time.thread_time() - t0
        # As the client gives it: decoded from the answer's JSON (orjson.loads).
        return ProviderResult("ok", body=orjson.loads(orjson.dumps(answer)), status=200,
                              attempts=1)


def reference_replies() -> tuple[IvrReply, IvrReply]:
    """A real executor's two replies of one reference-flow session (`workers.ivr`, this
    checkout's code, in process): to the session start (the welcome prompt) and to the
    caller's hang-up. `perf/bench_core.py` answers with their state."""
    import asyncio

    from workers.ivr import process_event

    direct: Any = _DirectProvider()
    sid = "abcdef0123456789"
    call = CallInfo(call_id=sid, session_id=sid, caller="1001", callee="*99",
                    route_name="bench", params=IvrAppParams(url="http://127.0.0.1:9/ivr/step"),
                    sip_headers={"User-Agent": "bench_executor"})

    async def session() -> tuple[IvrReply, IvrReply]:
        first = await process_event(
            IvrEvent(session_id=sid, seq=1, input=SessionStartInput(call=call)), direct,
            time.time)
        end = await process_event(
            IvrEvent(session_id=sid, seq=2, state=first.state,
                     input=CallEndedInput(reason="Hangup")), direct, time.time)
        return first, end

    return asyncio.run(session())


def in_process(n: int, rounds: int) -> list[float]:
    """`--in-process`: us of this thread's CPU per session (module text), per round."""
    import asyncio

    from workers.ivr import process_event

    direct = _DirectProvider()
    client: Any = direct  # process_event's ProviderClient, in duck type
    params = IvrAppParams(url="http://127.0.0.1:9/ivr/step")

    async def session(sid: str) -> float:
        call = CallInfo(call_id=sid, session_id=sid, caller="1001", callee="*99",
                        route_name="bench", params=params,
                        sip_headers={"User-Agent": "bench_executor"})
        first = encode(IvrEvent(session_id=sid, seq=1, input=SessionStartInput(call=call)))
        t0 = time.thread_time()
        answer = encode(await process_event(decode(first), client, time.time))
        spent = time.thread_time() - t0
        reply = decode(answer)  # the front's work
        assert isinstance(reply, IvrReply) and not reply.done
        second = encode(IvrEvent.model_construct(session_id=sid, seq=2, state=reply.state,
                                                 input=CallEndedInput(reason="Hangup")))
        t0 = time.thread_time()
        event = decode(second)
        assert isinstance(event, IvrEvent)
        end = encode(await process_event(event, client, time.time))
        spent += time.thread_time() - t0
        assert isinstance(decode(end), IvrReply)
        return spent

    async def rounds_of(n: int) -> list[float]:
        for i in range(min(n, 300)):
            await session(f"warm-{i}")
        out = []
        for r in range(rounds):
            spent = 0.0
            direct.spent_s = 0.0
            for i in range(n):
                spent += await session(f"r{r}-{i}")
            out.append((spent - direct.spent_s) / n * 1e6)
        return out

    return asyncio.run(rounds_of(n))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--sessions", type=int, default=2000,
                        help="measured sessions per run")
    parser.add_argument("-r", "--rate", type=float, default=100.0, help="sessions per second")
    parser.add_argument("--warmup", type=int, default=200, help="sessions before measuring")
    parser.add_argument("--repeat", type=int, default=1, help="runs (one executor each)")
    parser.add_argument("--capacity", type=int, default=500, help="[ivr] capacity")
    parser.add_argument("--json", type=Path, default=None, help="result file")
    parser.add_argument("--cprofile", type=Path, default=None,
                        help="run the executor under cProfile, its stats to this file "
                             "(the CPU figures then measure cProfile too)")
    parser.add_argument("--in-process", type=int, default=0, metavar="N",
                        help="measure process_event for N sessions in this process, "
                             "no I/O (module text), --repeat rounds")
    args = parser.parse_args(argv)
    if args.in_process > 0:
        per_round = in_process(args.in_process, args.repeat)
        log(f"in process, {args.in_process} sessions per round: "
            + ", ".join(f"{us:.0f}" for us in per_round)
            + f" us CPU/session (best {min(per_round):.0f})")
        return 0
    if args.sessions < 1 or args.rate <= 0 or args.warmup < 0 or args.repeat < 1:
        parser.error("sessions, rate, repeat must be positive")

    load = os.getloadavg()
    log(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"{args.repeat} run(s) of {args.warmup}+{args.sessions} sessions at {args.rate:g}/s")
    runs: list[dict[str, Any]] = []
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with tempfile.TemporaryDirectory(prefix="bench_executor-") as tmpdir:
        children = Children(Path(tmpdir), args.capacity, args.cprofile)
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.SNDHWM, 100_000)
        router.setsockopt(zmq.RCVHWM, 100_000)
        router.bind(children.endpoint)
        try:
            children.wait_provider()
            for r in range(args.repeat):
                executor = children.start_executor()
                identity = b""
                deadline = time.monotonic() + READY_TIMEOUT_S
                while not identity:
                    if time.monotonic() > deadline or executor.poll() is not None:
                        raise RuntimeError("the executor did not get ready:\n"
                                           + children.executor_log())
                    if router.poll(200):
                        ident, frame = router.recv_multipart()
                        if isinstance(decode(frame), IvrReady):
                            identity = ident
                time.sleep(0.5)
                result = run_once(children, router, identity, args.sessions, args.rate,
                                  args.warmup, f"r{r}")
                executor.terminate()
                executor.wait(15)
                runs.append(result)
                log(f"run {r + 1}: executor {result['executor_cpu_ms_per_session']:.3f} ms "
                    f"CPU/session, provider {result['provider_cpu_ms_per_session']:.3f} ms "
                    f"(ratio {result['executor_to_provider_cpu']}); "
                    f"reply p50 {result['reply_ms_p50']:.2f} ms p99 "
                    f"{result['reply_ms_p99']:.2f} ms; bad replies "
                    f"{result['bad_reply_count']}")
        finally:
            router.close(0)
            children.stop()
            ctx.term()
    exec_ms = [r["executor_cpu_ms_per_session"] for r in runs]
    summary = {
        "script": "bench_executor",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "executor_cpu_ms_per_session_median": round(statistics.median(exec_ms), 4),
        "provider_cpu_ms_per_session_median": round(
            statistics.median(r["provider_cpu_ms_per_session"] for r in runs), 4),
        "executor_to_provider_cpu_median": statistics.median(
            r["executor_to_provider_cpu"] or 0.0 for r in runs),
        "runs": runs,
    }
    out = args.json or ROOT / "perf" / "results" / \
        f"bench_executor-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log(f"executor CPU/session median {summary['executor_cpu_ms_per_session_median']:.3f} ms, "
        f"executor/provider {summary['executor_to_provider_cpu_median']}; wrote {out}")
    return 1 if any(r["bad_reply_count"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())

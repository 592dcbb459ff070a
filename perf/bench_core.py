#!/usr/bin/env python3
"""The call core's own cost per call: no sockets, no processes, no event loop.

    python perf/bench_core.py [--calls 20000] [--profile] [--shell] [--json perf/results/...]
    python perf/bench_core.py --linger 6000

Drives `pbx.calls.CallCore` through N whole IVR calls the way the front does (SIP
bytes in, commands out): INVITE → 100 + 200 (a port from a fake media worker's
announced pool, confirmed at once; a fake executor answers the session start with a
prompt), ACK, BYE → 200, the records
written when the media workers' statistics come. The clock is virtual; CPU time is
`time.process_time()`. Prints µs of core CPU per call and the calls per second one
core could set up at that cost (the front also pays for sockets, the transport, ZeroMQ
and the event loop: `perf/setup_rate.py` measures all of it); `--profile` adds the
cProfile top 25 by own time.

`--shell` runs the same calls through the front's shell (`pbx.front.Front`) on uvloop,
as `pbx-front` does: the media worker's and executor's answers come on later loop
iterations (`call_soon`, as ZeroMQ messages would), the loop's real clock, the shell's
one timer and its JSON-lines flush timer; no sockets (SIP out is kept; events go
nowhere: no PUB subscriber, the admin's event hub without a WebSocket client). The
difference from the default mode is the shell's own cost per call.

`--front-obs` adds what `pbx-front` observes per call that the modes above leave out:
its log handler at its configured level (`pbx.logs.setup_logging`, INFO, with the
similar-lines filter; stderr goes to a temporary file), the collector watch
(`pbx.metrics.CollectorWatch` after `pbx.app.tune_gc`, as `pbx.app.run` installs
them), and one step trace in each executor reply (as `workers/ivr.py` sends them), so
`CallEvents.trace`, the trace store and `traces.jsonl` are in the figure.

The fake executor answers as a real one does, as the front really gets it (issue 9):
each event is encoded (`pbx.messages.encode`, the front's work before ZeroMQ) and each
reply is a frame decoded with `pbx.messages.decode`, and the replies carry the state a
real executor writes for the reference flow (`perf/bench_executor.py`
`reference_replies`: ~2 KB, the call, the node, ~35 keys), not a token one: what the
front pays per IVR step for the session state is counted. Figures from before this
(a 1-key state, no plane codec) are a few µs per call lower than today's would be.

`--linger N` measures what ended calls keep alive: N calls end within one linger
(RFC 3261 Timer J's 32 s, `pbx.calls.legs.LINGER_S`), then it prints the GC-tracked
objects each still holds (`gc.get_objects()` against the count before them, the
types that grew most) and how long a forced full collection takes with them in the
heap; then the clock passes the linger and what is left is counted again (should be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import cProfile
import gc
import inspect
import json
import pstats
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pbx import messages as m  # noqa: E402
from pbx.calls.context import ToIvr, ToMedia  # noqa: E402
from pbx.calls.core import CallCore  # noqa: E402
from pbx.config import parse_config  # noqa: E402
from pbx.jsonl import JsonLinesLog  # noqa: E402
from pbx.records import CallRecords  # noqa: E402
from pbx.traces import TraceStore  # noqa: E402

CALLER = ("127.0.0.1", 5999)
SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
       b"a=rtpmap:101 telephone-event/8000\r\n")
CONFIG = """
[sip]
listen = "127.0.0.1:5060"
rate_limit_exempt = ["127.0.0.0/8"]

[logging]
dir = "{logs}"

[[routes]]
name = "main"
to_user = "*99"
app = "ivr"
app_params = {{ mode = "step", url = "http://127.0.0.1:1/ivr" }}
"""
PLAY: list[m.CallCommand] = [m.PlayCommand(play_id=1, file="sounds/menu.wav")]


class ExecutorStandIn:
    """The executor's side of the IVR plane: each event encoded as the front sends it,
    answered with a reply frame (a real executor's reference-flow state, this session's
    id and the event's seq spliced in) decoded as the front receives it."""

    SID = "@SESSION@"
    SEQ = 987654321

    def __init__(self) -> None:
        from bench_executor import reference_replies

        first, end = reference_replies()
        self.start = self._template(first.model_copy(update={
            "commands": PLAY, "traces": [], "done": False, "wait_ms": None}))
        self.end = self._template(end.model_copy(update={
            "commands": [], "traces": [], "done": True, "wait_ms": None}))

    def _template(self, reply: m.IvrReply) -> tuple[bytes, bytes, bytes]:
        frame = m.encode(reply.model_copy(update={"session_id": self.SID, "seq": self.SEQ}))
        head, rest = frame.split(self.SID.encode())
        middle, tail = rest.split(str(self.SEQ).encode())
        return head, middle, tail

    def answer(self, event: m.IvrEvent) -> m.IvrReply:
        m.encode(event)  # the front's work: the frame it would send
        head, middle, tail = self.start if isinstance(event.input, m.SessionStartInput) \
            else self.end
        frame = b"".join((head, event.session_id.encode(), middle, str(event.seq).encode(),
                          tail))
        traces = step_traces(event)
        if traces:  # `--front-obs`: in the frame, so the front decodes them too
            frame = frame.replace(b'"traces":[]', b'"traces":' + orjson.dumps(
                [trace.model_dump(mode="json") for trace in traces]), 1)
        reply: m.IvrReply = m.decode(frame)
        return reply
POOL = list(range(20_000, 24_000, 2))
# `--front-obs`: the executor's replies carry one step trace each (workers/ivr.py).
FRONT_OBS = False
# Allocations per worker announcement (MediaPorts, which confirms them): the worker
# announces once per 20 ms tick, so 10 is ~500 calls/s on one worker.
ANNOUNCE_EVERY = 10


def request(method: str, n: int, cseq: int, to: str, body: bytes = b"") -> bytes:
    ctype = "Content-Type: application/sdp\r\n" if body else ""
    contact = "Contact: <sip:1001@127.0.0.1:5999>\r\n" if method == "INVITE" else ""
    return (
        f"{method} sip:*99@127.0.0.1:5060 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-{n}-{method}\r\n"
        f"Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1:5999>;tag=c{n}\r\n"
        f"To: {to}\r\nCall-ID: call-{n}@127.0.0.1\r\nCSeq: {cseq} {method}\r\n{contact}"
        f"{ctype}Content-Length: {len(body)}\r\n\r\n").encode() + body


def step_traces(event: Any) -> list[m.StepTrace]:
    """The step trace an executor sends with its reply (`--front-obs`): the provider's
    request and answer, as `pbx.ivr.handlers.provider_answer` records them."""
    if not FRONT_OBS:
        return []
    start = isinstance(event.input, m.SessionStartInput)
    return [m.StepTrace(
        call_id=event.session_id.rsplit("-", 1)[0], session_id=event.session_id,
        step_index=event.seq, trigger="start" if start else "hangup",
        action_type="play" if start else None,
        action={"type": "play", "file": "sounds/menu.wav", "next": "menu"} if start else None,
        request={"call_id": event.session_id, "session_id": event.session_id,
                 "trigger": "start" if start else "hangup",
                 "variables": {"caller": "1001", "callee": "*99",
                               "sip_User-Agent": "bench"},
                 "url": "http://127.0.0.1:1/ivr"},
        duration_ms=1.5, at=1.7e9)]


class Driver:
    def __init__(self, logs: Path, executor: ExecutorStandIn) -> None:
        self.executor = executor
        settings = parse_config(CONFIG.format(logs=logs))
        self.now = 1000.0
        # Buffered as the front's ([logging] jsonl_flush_s), flushed every 200 calls.
        self.calls_log = JsonLinesLog(logs / "calls.jsonl", flush_every_line=False)
        self.core = CallCore(settings, records=CallRecords(self.calls_log),
                             traces=TraceStore(), now=self.now, wall_offset=1.7e9)
        self.sent: list[bytes] = []
        self.core.media_message(b"w", m.MediaReady(worker_id="w", capacity=1_000_000,
                                                   rtp_ip="127.0.0.1"), self.now)
        self.announce(0)
        self.core.ivr_message(b"e", m.IvrReady(executor_id="e", capacity=1_000_000),
                              self.now)
        self.pump()

    def announce(self, seq: int) -> None:
        """The worker's pool: ports come back once released (as its announcements say)."""
        self.core.media_message(b"w", m.MediaPorts(ports=POOL, allocate_seq=seq), self.now)

    def pump(self) -> None:
        core = self.core
        while out := core.drain():
            for command in out:
                if isinstance(command, ToMedia):
                    msg = command.msg
                    if isinstance(msg, m.MediaAllocate):
                        # The worker's announcement confirms the allocations before it:
                        # one per tick, several calls' worth under load.
                        if msg.seq % ANNOUNCE_EVERY == 0:
                            self.announce(msg.seq)
                    elif isinstance(msg, m.MediaRelease):
                        core.media_message(b"w", m.MediaReleased(legs=[m.ReleasedLeg(
                            call_id=msg.call_id, packets_sent=1, packets_received=1)]),
                            self.now)
                elif isinstance(command, ToIvr):
                    core.ivr_message(b"e", self.executor.answer(command.event), self.now)
                elif hasattr(command, "data"):
                    self.sent.append(command.data)
            core.get_timer()  # what the front's shell asks after each pass (Front._run)

    def one_call(self, n: int, expire: bool = True) -> None:
        """One whole call; every 200 calls (unless not `expire`) the clock passes the
        lingers."""
        core = self.core
        self.sent.clear()
        core.sip_received(request("INVITE", n, 1, "<sip:*99@127.0.0.1:5060>", SDP), CALLER,
                          self.now)
        self.pump()
        ok = next(d for d in self.sent if d.startswith(b"SIP/2.0 200"))
        to = next(line for line in ok.split(b"\r\n") if line.startswith(b"To:"))
        to_value = to[3:].strip().decode()
        core.sip_received(request("ACK", n, 1, to_value), CALLER, self.now)
        self.pump()
        core.sip_received(request("BYE", n, 2, to_value), CALLER, self.now)
        self.pump()
        self.now += 0.001
        if expire and n % 200 == 0:
            self.expire()

    def expire(self) -> None:
        """Let lingers, transactions and records expire as they would."""
        core = self.core
        self.now += 40.0
        core.media_message(b"w", m.MediaHeartbeat(worker_id="w", calls=0,
                                                  capacity=1_000_000,
                                                  rtp_ip="127.0.0.1", ports=POOL,
                                                  allocate_seq=0), self.now)
        core.ivr_message(b"e", m.IvrHeartbeat(executor_id="e", busy=0,
                                              capacity=1_000_000), self.now)
        core.handle_timer(self.now)
        self.pump()
        self.calls_log.flush()


class ShellDriver:
    """The calls through `pbx.front.Front` on the running loop (`--shell`)."""

    def __init__(self, logs: Path, executor: ExecutorStandIn) -> None:
        from pbx.admin import EventHub
        from pbx.front import Front

        self.executor = executor
        self.loop = asyncio.get_running_loop()
        # As pbx-front with no PUB subscriber and no admin WebSocket client: the broker
        # sends nothing, the admin's hub is a listener with no one behind it.
        quiet: dict[str, Any] = ({"has_subscribers": lambda: False}
                 if "has_subscribers" in inspect.signature(Front).parameters else {})
        self.front = Front(parse_config(CONFIG.format(logs=logs)), self.send_sip,
                           self.send_media, self.send_ivr, lambda event: None, **quiet)
        hub = EventHub()
        if hasattr(self.front, "add_listener"):
            self.front.add_listener(hub.publish, hub.has_clients)
        else:  # older checkouts
            self.front.listeners.append(hub.publish)
        self.core = self.front.core
        self.waiting: tuple[bytes, asyncio.Future[bytes]] | None = None
        self.front.on_media_message(b"w", m.MediaReady(worker_id="w", capacity=1_000_000,
                                                       rtp_ip="127.0.0.1"))
        self.front.on_media_message(b"w", m.MediaPorts(ports=POOL, allocate_seq=0))
        self.front.on_ivr_message(b"e", m.IvrReady(executor_id="e", capacity=1_000_000))

    def send_sip(self, data: bytes, addr: Any, reliable: bool = False) -> None:
        if self.waiting is not None and data.startswith(self.waiting[0]):
            prefix, future = self.waiting
            self.waiting = None
            future.set_result(data)

    def send_media(self, worker: bytes, msg: Any) -> bool:
        if isinstance(msg, m.MediaAllocate):
            if msg.seq % ANNOUNCE_EVERY == 0:  # it confirms the allocations before it
                self.loop.call_soon(self.front.on_media_message, worker,
                                    m.MediaPorts(ports=POOL, allocate_seq=msg.seq))
        elif isinstance(msg, m.MediaRelease):
            self.loop.call_soon(self.front.on_media_message, worker, m.MediaReleased(
                legs=[m.ReleasedLeg(call_id=msg.call_id, packets_sent=1, packets_received=1)]))
        return True

    def send_ivr(self, executor: bytes, event: Any) -> bool:
        self.loop.call_soon(self.front.on_ivr_message, executor, self.executor.answer(event))
        return True

    async def until_sent(self, prefix: bytes, data: bytes) -> bytes:
        future: asyncio.Future[bytes] = self.loop.create_future()
        self.waiting = (prefix, future)
        self.front.message_received(data, CALLER)
        return await asyncio.wait_for(future, 10.0)

    async def one_call(self, n: int) -> None:
        if n % 100 == 0:  # the worker and the executor are alive
            self.front.on_media_message(b"w", m.MediaHeartbeat(
                worker_id="w", calls=0, capacity=1_000_000, rtp_ip="127.0.0.1",
                ports=POOL, allocate_seq=0))
            self.front.on_ivr_message(b"e", m.IvrHeartbeat(executor_id="e", busy=0,
                                                           capacity=1_000_000))
        ok = await self.until_sent(b"SIP/2.0 200", request(
            "INVITE", n, 1, "<sip:*99@127.0.0.1:5060>", SDP))
        to = next(line for line in ok.split(b"\r\n") if line.startswith(b"To:"))
        to_value = to[3:].strip().decode()
        self.front.message_received(request("ACK", n, 1, to_value), CALLER)
        await self.until_sent(b"SIP/2.0 200", request("BYE", n, 2, to_value))


async def run_shell(logs: Path, calls: int, profiler: cProfile.Profile | None,
                    executor: ExecutorStandIn) -> tuple[float, int]:
    driver = ShellDriver(logs, executor)
    for n in range(200):  # warm-up
        await driver.one_call(-n - 1)
    started = time.process_time()
    if profiler:
        profiler.enable()
    for n in range(calls):
        await driver.one_call(n)
    await asyncio.sleep(0.01)  # the last MediaReleased
    if profiler:
        profiler.disable()
    cpu = time.process_time() - started
    getattr(driver.front, "close", lambda: None)()  # (older checkouts have none)
    return cpu, len(driver.core.ctx.table.calls)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--shell", action="store_true",
                    help="through pbx.front.Front on uvloop (the shell's cost included)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--linger", type=int, default=0, metavar="N",
                    help="objects held by N ended calls inside the linger, and a full "
                         "collection's time with them")
    ap.add_argument("--front-obs", action="store_true",
                    help="pbx-front's log handler, collector watch and step traces too")
    args = ap.parse_args(argv)
    if args.front_obs:
        global FRONT_OBS
        FRONT_OBS = True
        log_dir = tempfile.mkdtemp(prefix="bench-core-log-")
        atexit.register(shutil.rmtree, log_dir, ignore_errors=True)
        front_observability(log_dir)
    if args.linger:
        return linger(args)
    if args.shell:
        profiler = cProfile.Profile() if args.profile else None
        with tempfile.TemporaryDirectory() as tmp:
            # Made outside the loop: it runs a real executor's session on its own loop.
            executor = ExecutorStandIn()
            cpu, left = uvloop.run(run_shell(Path(tmp), args.calls, profiler, executor))
        return report(args, cpu, left, profiler)
    with tempfile.TemporaryDirectory() as tmp:
        driver = Driver(Path(tmp), ExecutorStandIn())
        for n in range(200):  # warm-up
            driver.one_call(-n - 1)
        profiler = cProfile.Profile() if args.profile else None
        started = time.process_time()
        if profiler:
            profiler.enable()
        for n in range(args.calls):
            driver.one_call(n)
        if profiler:
            profiler.disable()
        cpu = time.process_time() - started
        left = len(driver.core.ctx.table.calls)
    return report(args, cpu, left, profiler)


def front_observability(log_dir: str) -> None:
    """`pbx-front`'s logging (stderr to a file under `log_dir`) and its collector
    watch, as `pbx.app.run` sets them up."""
    from pbx.app import tune_gc
    from pbx.logs import setup_logging
    from pbx.metrics import CollectorWatch, FrontMetrics

    sys.stderr = open(Path(log_dir) / "front.log", "w")  # noqa: SIM115 (the process's)
    setup_logging(parse_config(CONFIG.format(logs=log_dir)), "pbx-front")
    tune_gc()
    gc.callbacks.append(CollectorWatch(FrontMetrics()))


def tracked_by_type() -> Counter[str]:
    return Counter(type(obj).__name__ for obj in gc.get_objects())


def linger(args: argparse.Namespace) -> int:
    """`--linger N`: GC-tracked objects per ended call still lingering, and a forced full
    collection's time with N of them in the heap."""
    n_calls = args.linger
    with tempfile.TemporaryDirectory() as tmp:
        driver = Driver(Path(tmp), ExecutorStandIn())
        for n in range(400):  # warm-up, then everything it left expires
            driver.one_call(-n - 1, expire=False)
        driver.expire()
        gc.collect()
        before = tracked_by_type()
        started = time.process_time()
        core = driver.core
        for n in range(n_calls):
            driver.one_call(n, expire=False)  # 1 ms apart: all inside the linger
            deadline = core.get_timer()
            if deadline is not None and deadline <= driver.now:  # as the front's timer
                core.handle_timer(driver.now)
                driver.pump()
        cpu = time.process_time() - started
        gc.collect()
        held = tracked_by_type()
        full_ms = []
        for _ in range(3):
            t0 = time.perf_counter()
            gc.collect()
            full_ms.append((time.perf_counter() - t0) * 1000)
        grew = held - before
        per_call = (sum(held.values()) - sum(before.values())) / n_calls
        driver.expire()
        gc.collect()
        after = tracked_by_type()
        left_objects = sum(after.values()) - sum(before.values())
        left = len(driver.core.ctx.table.calls)
        heap = sum(held.values())
    result: dict[str, Any] = {
        "linger_calls": n_calls, "objects_per_ended_call": round(per_call, 1),
        "heap_objects": heap, "full_collection_ms": round(min(full_ms), 1),
        "top_types": dict(grew.most_common(15)),
        "objects_left_after_linger": left_objects, "calls_left": left,
        "us_per_call": round(cpu / n_calls * 1e6, 1),
    }
    print(f"{n_calls} ended calls inside the linger: {per_call:.1f} GC-tracked objects "
          f"per call ({heap} in the heap); a forced full collection "
          f"{min(full_ms):.1f} ms (best of 3); after the linger {left_objects:+d} objects, "
          f"{left} calls left; {result['us_per_call']:.0f} µs CPU per call")
    print("grew most: " + ", ".join(f"{name} {count / n_calls:.1f}"
                                    for name, count in grew.most_common(15)))
    out = args.json or ROOT / "perf" / "results" / f"bench_core-linger-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out}")
    return 0 if left == 0 else 1


def report(args: argparse.Namespace, cpu: float, left: int,
           profiler: cProfile.Profile | None) -> int:
    per_call_us = cpu / args.calls * 1e6
    result: dict[str, Any] = {
        "calls": args.calls, "cpu_s": round(cpu, 3), "us_per_call": round(per_call_us, 1),
        "calls_per_core_s": round(1e6 / per_call_us), "calls_left": left,
        "profiled": bool(profiler), "shell": args.shell, "front_obs": args.front_obs,
    }
    what = ("shell + core" if args.shell else "core") + (
        " + front observability" if args.front_obs else "")
    print(f"{args.calls} calls: {per_call_us:.0f} µs {what} CPU per call "
          f"(INVITE..200, ACK, BYE..200, record) = {1e6 / per_call_us:.0f} calls/s per core"
          f"{' (under cProfile)' if profiler else ''}; calls left: {left}")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    out = args.json or ROOT / "perf" / "results" / f"bench_core-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out}")
    return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

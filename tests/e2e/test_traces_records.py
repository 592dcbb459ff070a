"""Traces and call records end to end: a WebSocket client on /ws/events sees a call's
`ivr_step_trace`s while the call is up, /api/traces returns every step with its
step_id, step_name and extra, /debug serves the viewer, and logs/calls.jsonl gets the
finished call's record with its end reason and RTP statistics."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from tests.e2e.harness import (
    SCENARIOS,
    PbxSystem,
    Reply,
    RtpEndpoint,
    free_port,
    start_sipp,
    wait_until,
)


class EventsClient:
    """A /ws/events client on its own thread: every text frame, with its arrival time."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.frames: list[tuple[float, dict[str, Any]]] = []
        self.connected = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()

    async def _run(self) -> None:
        try:
            async with aiohttp.ClientSession() as session, session.ws_connect(self.url) as ws:
                self.connected.set()
                while not self._stop.is_set():
                    try:
                        msg = await ws.receive(timeout=0.2)
                    except TimeoutError:
                        continue
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        self.frames.append((time.monotonic(), json.loads(msg.data)))
                    elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break
        except BaseException as exc:  # reported by the test
            self.error = exc
            self.connected.set()

    def events(self, **match: Any) -> list[tuple[float, dict[str, Any]]]:
        return [(at, ev) for at, ev in list(self.frames)
                if all(ev.get(k) == v for k, v in match.items())]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)


WELCOME = {"type": "prompt", "file": "sounds/beep.wav", "step_id": "tr-welcome",
           "step_name": "welcome", "extra": {"flow": "traces", "n": 1}}
GOODBYE = {"type": "hangup", "step_id": "tr-bye", "step_name": "goodbye",
           "extra": {"flow": "traces", "n": 2}}


def trace_script(path: str, body: Any) -> Reply:
    if path.endswith(("/start", "/end", "/dtmf-match")):
        return 200, b'{"status":"ok"}', 0.0
    event = body.get("event") or {}
    action = WELCOME if event.get("type") == "session_start" else GOODBYE
    return 200, json.dumps(action).encode(), 0.0


def call_records(system: PbxSystem) -> list[dict[str, Any]]:
    path = system.root / "logs" / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_live_traces_api_debug_page_and_call_record(system: PbxSystem, workdir: Path) -> None:
    system.provider.script = trace_script
    client = EventsClient(f"ws://127.0.0.1:{system.admin_port}/ws/events")
    assert client.connected.wait(5) and client.error is None, client.error
    rtp = RtpEndpoint()
    caller = start_sipp("caller", [
        "-sf", str(SCENARIOS / "uac_wait_bye.xml"), "-s", "*99", system.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1",
        "-mp", str(free_port(even=True)), "-key", "rtp_port", str(rtp.port),
        "-m", "1", "-l", "1",
    ], workdir / "caller")
    try:
        started = wait_until(lambda: client.events(type="call", event="started"), 10,
                             "the call's started event on /ws/events")
        call_id = started[-1][1]["call_id"]
        ended = wait_until(lambda: client.events(type="call", event="ended", call_id=call_id),
                           20, "the call's ended event on /ws/events")
        assert caller.wait(30) == 0, caller.logs()
    finally:
        caller.stop()
        rtp.close()
    try:
        steps_live = client.events(type="ivr_step_trace", call_id=call_id)
        assert steps_live, [ev for _, ev in client.frames]
        # Live: the first step reached the client while the call was still up.
        assert steps_live[0][0] < ended[0][0]
        session_id = steps_live[0][1]["session_id"]
        assert client.events(type="call", event="answered", call_id=call_id)
    finally:
        client.close()

    # /api/traces/{session_id}: every step, in order, with step_id, step_name and extra.
    steps = system.admin(f"/api/traces/{session_id}")
    assert [s["step_index"] for s in steps] == [ev["step_index"] for _, ev in steps_live]
    by_id = {s["step_id"]: s for s in steps if s.get("step_id")}
    assert by_id["tr-welcome"]["step_name"] == "welcome"
    assert by_id["tr-welcome"]["extra"] == {"flow": "traces", "n": 1}
    assert by_id["tr-bye"]["step_name"] == "goodbye"
    assert by_id["tr-bye"]["extra"] == {"flow": "traces", "n": 2}
    assert steps[-1]["end_reason"], steps[-1]
    for step in steps:
        assert {"call_id", "session_id", "step_index", "trigger", "action_type",
                "duration_ms", "step_id", "step_name", "extra", "at"} <= set(step)

    # /api/traces lists it; the trace log has the same steps.
    recent = system.admin("/api/traces")
    assert any(r["session_id"] == session_id and r["steps"] == len(steps) for r in recent)
    traces_log = system.root / "logs" / "traces.jsonl"

    def logged() -> list[dict[str, Any]]:  # flushed within [logging] jsonl_flush_s
        lines = traces_log.read_text().splitlines() if traces_log.exists() else []
        found = [s for s in map(json.loads, lines) if s["session_id"] == session_id]
        return found if len(found) >= len(steps) else []

    assert wait_until(logged, 5, "the session's steps in traces.jsonl") == steps

    # /debug: one self-contained page.
    with urllib.request.urlopen(f"http://127.0.0.1:{system.admin_port}/debug",
                                timeout=5) as r:
        page = r.read().decode()
        assert r.headers["Content-Type"].startswith("text/html")
    assert "/ws/events" in page and "/api/traces" in page
    assert "<script src" not in page and "<link" not in page

    # logs/calls.jsonl: the finished call, with its end reason and RTP statistics.
    record = wait_until(lambda: [r for r in call_records(system) if r["call_id"] == call_id],
                        5, "the call's line in calls.jsonl")[0]
    assert record["end_reason"] == ended[0][1]["end_reason"] and record["end_reason"]
    assert record["outcome"] == "completed"
    assert record["route"] == "main" and record["caller"] == "1002"
    assert record["callee"] == "*99" and record["codec"] == "PCMU"
    assert record["sessions"] == [session_id]
    assert record["started_at"] <= record["answered_at"] <= record["ended_at"]
    assert record["rtp"].get("a", {}).get("packets_sent", 0) > 0, record
    assert record["rtp_complete"] is True

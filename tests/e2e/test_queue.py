"""Queues end to end (DESIGN §3 "queue"): the IVR hands the caller to `[queues.<name>]`.

* `e2e-one`: its one member, extension 2001 (a sipp UAS), answers; the caller hears
  hold music first, then 2001's echo of its own audio; the record names the queue.
* `e2e-nobody`: its one member never answers; with `return_to_ivr` the provider gets a
  second `session_start` whose variables say transferred_from=queue,
  return_reason=no_answer, and hangs up.

These need the IVR executor to turn a provider's `queue` action into a QueueCommand;
until `pbx/ivr/machine.py` executes `queue`, they are skipped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.e2e.harness import (
    SCENARIOS,
    PbxSystem,
    Reply,
    RtpEndpoint,
    free_port,
    start_sipp,
    wait_until,
)


def queue_script(queue: str, return_to_ivr: bool) -> Any:
    def script(path: str, body: Any) -> Reply:
        if path.endswith(("/start", "/end", "/dtmf-match")):
            return 200, b'{"status":"ok"}', 0.0
        event = body.get("event") or {}
        variables = body.get("variables") or {}
        if event.get("type") == "session_start" and "transferred_from" not in variables:
            action = {"type": "queue", "target": queue, "return_to_ivr": return_to_ivr,
                      "step_id": "to-queue"}
        else:
            action = {"type": "hangup", "step_id": "after-queue"}
        return 200, json.dumps(action).encode(), 0.0

    return script


def call_records(system: PbxSystem) -> list[dict[str, Any]]:
    path = system.root / "logs" / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_queue_member_answers_and_is_bridged(system: PbxSystem, workdir: Path) -> None:
    system.provider.script = queue_script("e2e-one", return_to_ivr=False)
    caller_rtp = RtpEndpoint()
    # 2001 rings for 1.5 s before answering: the caller hears hold music meanwhile.
    member = start_sipp("member-2001", [
        "-sf", str(SCENARIOS / "uas_ring_then_answer.xml"), "-s", "2001",
        "-i", "127.0.0.1", "-p", str(system.extension_ports["2001"]),
        "-mi", "127.0.0.1", "-mp", str(free_port(even=True)), "-rtp_echo",
        "-d", "1500", "-m", "1",
    ], workdir / "member")
    caller = start_sipp("caller", [
        "-sf", str(SCENARIOS / "uac_ivr.xml"), "-s", "*99", system.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1",
        "-mp", str(free_port(even=True)), "-key", "rtp_port", str(caller_rtp.port),
        "-d", "2000", "-m", "1", "-l", "1",
    ], workdir / "caller")
    try:
        # Hold music reaches the caller, then the member's echo of the caller's audio.
        heard = wait_until(lambda: len(caller_rtp.audio(0)) >= 25 and caller_rtp.audio(0),
                           10, "half a second of hold music at the caller")
        media_addr = heard[0].src
        payload = bytes([0x3C]) * 160
        sent_at = time.monotonic()

        def echoed() -> list[Any]:
            return [p for p in caller_rtp.audio(0) if p.at >= sent_at and p.payload == payload]

        while len(echoed()) < 30 and time.monotonic() - sent_at < 6:
            caller_rtp.send(media_addr, payload)
            time.sleep(0.02)
        assert len(echoed()) >= 30, "the caller's audio did not come back from the member"
        assert caller.wait(30) == 0, caller.logs()
        assert member.wait(15) == 0, member.logs()
    finally:
        caller.stop()
        member.stop()
        caller_rtp.close()
    start = system.provider.seen("/ivr/step/start")[-1]
    call_id = start.body["session_id"]
    record = wait_until(lambda: [r for r in call_records(system) if r["call_id"] == call_id],
                        5, "the call record")[0]
    assert record["queue"] == "e2e-one" and record["queue_member"] == "2001"
    assert record["outcome"] == "bridged" and record["end_reason"] == "Hangup"
    wait_until(lambda: system.metrics()["pbx_calls"] == 0, 5, "the call to be gone")
    wait_until(lambda: system.metrics()["pbx_media_legs"] == 0, 5, "media legs released")


def test_queue_nobody_answers_and_the_ivr_starts_again(system: PbxSystem,
                                                        workdir: Path) -> None:
    system.provider.script = queue_script("e2e-nobody", return_to_ivr=True)
    mark = len(system.provider.requests)
    rtp = RtpEndpoint()
    caller = start_sipp("caller", [
        "-sf", str(SCENARIOS / "uac_wait_bye.xml"), "-s", "*99", system.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1",
        "-mp", str(free_port(even=True)), "-key", "rtp_port", str(rtp.port),
        "-m", "1", "-l", "1",
    ], workdir / "caller")
    try:
        assert caller.wait(30) == 0, caller.logs()
        # The queue waited (timeout_ms 2.5 s) with hold music playing.
        assert len(rtp.audio(0)) >= 75, len(rtp.audio(0))
    finally:
        caller.stop()
        rtp.close()
    steps = [r for r in system.provider.requests[mark:] if r.path == "/ivr/step"]
    starts = [r for r in steps if r.body["event"]["type"] == "session_start"]
    assert len(starts) == 2, [r.body["event"] for r in steps]
    first, second = starts
    assert "transferred_from" not in first.body["variables"]
    assert second.body["variables"]["transferred_from"] == "queue"
    assert second.body["variables"]["return_reason"] == "no_answer"
    assert second.at - first.at >= 2.0  # the queue's timeout_ms, give or take
    assert second.body["session_id"] != first.body["session_id"]
    record = wait_until(
        lambda: [r for r in call_records(system) if r["call_id"] == first.body["session_id"]],
        5, "the call record")[0]
    assert record["sessions"] == [first.body["session_id"], second.body["session_id"]]
    assert record["queue"] == "e2e-nobody" and record["queue_member"] is None
    wait_until(lambda: system.metrics()["pbx_calls"] == 0, 5, "the call to be gone")

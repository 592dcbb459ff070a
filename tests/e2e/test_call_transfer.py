"""A real call end to end: sipp calls *99, hears the prompt, presses 1 (RFC 4733),
and is bridged through the media worker to a second sipp acting as extension 2001."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tests.e2e.harness import (
    SCENARIOS,
    LoopbackSniffer,
    PbxSystem,
    Reply,
    RtpEndpoint,
    free_port,
    media_address_from_sipp,
    start_sipp,
    wait_until,
)

MENU = {
    "type": "dtmf_menu",
    "greeting": "sounds/menu.wav",
    "timeout_ms": 5000,
    "entries": {"1": {"type": "transfer", "target": "2001"}},
    "step_id": "menu-1",
    "step_name": "main menu",
}


def ivr_script(path: str, body: Any) -> Reply:
    if path.endswith(("/start", "/end", "/dtmf-match")):
        return 200, b'{"status":"ok"}', 0.0
    event = body.get("event") or {}
    if event.get("type") == "session_start":
        action = {
            "type": "prompt", "file": "sounds/welcome.wav", "interruptible": True,
            "next": MENU, "step_id": "welcome-1", "step_name": "welcome",
            "extra": {"flow": "e2e", "tenantId": "t1"},
        }
        return 200, json.dumps(action).encode(), 0.0
    return 200, json.dumps({"type": "hangup"}).encode(), 0.0


def test_ivr_call_transferred_to_extension(system: PbxSystem, workdir: Path) -> None:
    system.provider.script = ivr_script
    # Only this call's provider requests: the session-scoped system may have served
    # other tests' calls before this one (whatever the test order).
    mark = len(system.provider.requests)

    def seen(prefix: str) -> list[Any]:
        with system.provider.lock:
            return [r for r in system.provider.requests[mark:] if r.path.startswith(prefix)]

    wire = LoopbackSniffer(system.rtp_ports)
    caller_rtp = RtpEndpoint()
    callee = start_sipp("callee-2001", [
        "-sn", "uas", "-i", "127.0.0.1", "-p", str(system.extension_ports["2001"]),
        "-mi", "127.0.0.1", "-mp", str(free_port(even=True)), "-rtp_echo", "-m", "1",
    ], workdir / "callee")
    caller = start_sipp("caller", [
        "-sf", str(SCENARIOS / "uac_ivr.xml"), "-s", "*99", system.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1",
        "-mp", str(free_port(even=True)), "-key", "rtp_port", str(caller_rtp.port),
        "-key", "hold_ms", "5000", "-d", "3000", "-m", "1", "-l", "1",
    ], workdir / "caller")
    try:
        # The digit is pressed about 3 s into the call; the local menu entry matches it.
        match = wait_until(lambda: seen("/ivr/step/dtmf-match"), 15,
                           "the /dtmf-match notification")
        media_addr = media_address_from_sipp(caller.workdir)
        assert media_addr is not None, caller.logs()
        # What the PBX sent the caller before the digit, wherever it went: first to the
        # SDP address, then (symmetric RTP) to where sipp's RFC 4733 packets came from.
        prompt = [p for p in wire.sent_by(media_addr, 0) if p.at < match[0].at]
        assert len(prompt) >= 100, f"only {len(prompt)} prompt packets (< 2 s) before the digit"
        # Silence fills the wait for the provider's first answer (the caller offered no
        # CN); the prompt's first packet carries the marker bit (RFC 3551 §4.1).
        start = next((k for k, p in enumerate(prompt) if p.marker), None)
        assert start is not None, "first prompt packet must carry the marker bit"
        assert all(p.payload == b"\xff" * 160 for p in prompt[:start]), "not silence"

        # After the bridge, what the caller sends comes back echoed by extension 2001.
        wait_until(lambda: "bridged" in system.log("front") or
                   (callee.workdir / "stdout.txt").exists(), 5, "the bridge")
        time.sleep(0.5)
        marker_payload = bytes([0x5A]) * 160
        sent_at = time.monotonic()
        for _ in range(75):
            caller_rtp.send(media_addr, marker_payload)
            time.sleep(0.02)
        def echoed() -> list[Any]:
            return [p for p in wire.sent_by(media_addr, 0)
                    if p.at >= sent_at and p.payload == marker_payload]

        # Wait for the count, not for the first packet: on a loaded machine the rest
        # may still be on their way through the worker and the callee's echo.
        try:
            wait_until(lambda: len(echoed()) >= 50, 5,
                       "the caller's audio echoed back through extension 2001")
        except AssertionError:
            raise AssertionError(f"only {len(echoed())} of 75 packets came back") from None

        assert caller.wait(30) == 0, caller.logs()
        assert callee.wait(15) == 0, callee.logs()
    finally:
        caller.stop()
        callee.stop()
        caller_rtp.close()
        wire.close()

    paths = [r.path for r in seen("")]
    start = seen("/ivr/step/start")
    assert start, paths
    session_id = start[0].body["session_id"]
    session = system.provider.for_session(session_id)
    by_path: dict[str, list[Any]] = {}
    for r in session:
        by_path.setdefault(r.path, []).append(r)

    # SessionContext on /start; the configured headers on every provider call.
    assert start[0].body["caller"] == "1001"
    assert start[0].body["callee"] == "*99"
    assert all(r.headers.get("Authorization") == "Bearer e2e" for r in session)

    # The step request: the ProviderContext fields of the upstream document.
    first = by_path["/ivr/step"][0].body
    assert first["event"] == {"type": "session_start"}
    assert first["session_id"] == session_id
    assert first["caller"] == "1001" and first["callee"] == "*99"
    assert first["direction"] == "inbound"
    assert first["tenant_id"] == "tenant-e2e"
    assert first["ivr_id"] == "ivr-e2e"
    variables = first["variables"]
    assert variables["session_id"] == session_id and variables["caller"] == "1001"
    assert variables["sip_X-Account"] == "acme-42"

    dtmf_match = by_path["/ivr/step/dtmf-match"][0].body
    assert dtmf_match["digit"] == "1"
    assert dtmf_match["action"]["type"] == "transfer"
    assert dtmf_match["action"]["target"] == "2001"
    end = wait_until(lambda: [r for r in system.provider.for_session(session_id)
                              if r.path == "/ivr/step/end"], 5, "/end")
    assert end[0].body["reason"] == "Transfer(2001)"
    # The menu matched locally: exactly one step request for the whole call.
    assert len(by_path["/ivr/step"]) == 1

    # Nothing is left behind: no call, no session, no media leg.
    wait_until(lambda: system.metrics()["pbx_calls"] == 0, 5, "the call to be gone")
    metrics = system.metrics()
    assert metrics["pbx_sessions"] == 0
    wait_until(lambda: system.metrics()["pbx_media_legs"] == 0, 5, "media legs released")
    traces = system.admin(f"/api/traces/{session_id}")
    assert traces and traces[0]["step_id"] == "welcome-1"
    assert traces[0]["extra"] == {"flow": "e2e", "tenantId": "t1"}

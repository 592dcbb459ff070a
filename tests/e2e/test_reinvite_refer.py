"""In-dialog requests end to end: hold and resume by re-INVITE, an UPDATE, session
timers in the 200, and a REFER from an IVR caller that sends it to extension 2001."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.e2e.harness import (
    REGISTERING_USERS,
    SCENARIOS,
    PbxSystem,
    Reply,
    RtpEndpoint,
    call_with_rtp,
    free_port,
    sipp_messages,
    start_sipp,
    wait_idle,
    wait_until,
)


def prompt_forever(path: str, body: Any) -> Reply:
    if path.endswith(("/start", "/end", "/dtmf-match")):
        return 200, b'{"status":"ok"}', 0.0
    action = {"type": "prompt", "file": "sounds/menu.wav"}
    return 200, json.dumps(action).encode(), 0.0



def test_hold_resume_update_and_session_timer(system: PbxSystem, workdir: Path) -> None:
    system.provider.script = prompt_forever
    call_with_rtp(system, "reinvite", "uac_reinvite_hold.xml", "*99", workdir)
    wait_idle(system)


def test_refer_on_an_ivr_call_reaches_the_target(system: PbxSystem, workdir: Path) -> None:
    system.provider.script = prompt_forever
    rtp = RtpEndpoint()
    callee = start_sipp("callee-2001", [
        "-sn", "uas", "-i", "127.0.0.1", "-p", str(system.extension_ports["2001"]),
        "-mi", "127.0.0.1", "-mp", str(free_port(even=True)), "-m", "1",
    ], workdir / "callee")
    caller = start_sipp("refer", [
        "-sf", str(SCENARIOS / "uac_refer.xml"), "-s", "*99", system.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-key", "rtp_port", str(rtp.port),
        "-au", "3003", "-ap", REGISTERING_USERS["3003"],
        "-auth_uri", f"*99@{system.sip_addr}", "-m", "1", "-l", "1",
    ], workdir / "caller")
    try:
        assert caller.wait(30) == 0, caller.logs()
        assert callee.wait(15) == 0, callee.logs()
        assert "INVITE sip:2001" in sipp_messages(callee.workdir)
    finally:
        caller.stop()
        callee.stop()
        rtp.close()
    start = system.provider.seen("/ivr/step/start")[-1]
    end = wait_until(lambda: [r for r in system.provider.for_session(start.body["session_id"])
                              if r.path == "/ivr/step/end"], 5, "/end")
    assert end[0].body["reason"] == "Transfer(2001)"
    wait_idle(system)


def test_we_refresh_a_trunk_without_update_by_reinvite(system: PbxSystem,
                                                      workdir: Path) -> None:
    """A trunk that makes us the refresher (Session-Expires 90;refresher=uas) and does not
    allow UPDATE gets our refresh as a re-INVITE at half the interval (RFC 4028 §7.4),
    with our SDP unchanged (same o= line: RFC 3264 §8), and our ACK of its 200 with the
    re-INVITE's CSeq; the call goes on until the trunk hangs up."""
    system.provider.script = prompt_forever
    rtp = RtpEndpoint()
    trunk = start_sipp("refresh", [
        "-sf", str(SCENARIOS / "uac_session_refresh_reinvite.xml"), "-s", "*99",
        system.sip_addr, "-i", "127.0.0.1", "-p", str(free_port()),
        "-key", "rtp_port", str(rtp.port), "-m", "1", "-l", "1",
    ], workdir)
    try:
        assert trunk.wait(75) == 0, trunk.logs()
    finally:
        trunk.stop()
        rtp.close()
    log = sipp_messages(workdir)
    # Ours go to the trunk's Contact (sip:1001@), its own to *99.
    ok = re.search(r"SIP/2\.0 200 OK.*?CSeq: 1 INVITE.*?\n(o=[^\r\n]*)", log, re.S)
    reinvite = re.search(r"INVITE sip:1001@\S+ SIP/2\.0\r?\n.*?CSeq: (\d+) INVITE.*?\n"
                         r"(o=[^\r\n]*)", log, re.S)
    ack = re.search(r"ACK sip:1001@\S+ SIP/2\.0\r?\n.*?CSeq: (\d+) ACK", log, re.S)
    assert ok and reinvite and ack, log
    assert reinvite.group(2) == ok.group(1)
    assert ack.group(1) == reinvite.group(1)
    assert "UPDATE sip:" not in log
    wait_idle(system)

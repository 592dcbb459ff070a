"""Early media (183 + IVR before the final response, CANCEL, a play_and_hangup code as the
final status) and registration with digest auth followed by a call to the registered
phone, transcoded PCMU <-> PCMA through the media worker."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

# CPython's own G.711, an independent reference for what the worker transcodes (deprecated
# since 3.11, removed in 3.13: the audioop-lts package then provides it).
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

from tests.e2e.harness import (
    REGISTERING_USERS,
    SCENARIOS,
    LoopbackSniffer,
    PbxSystem,
    Reply,
    RtpEndpoint,
    call_with_rtp,
    free_port,
    media_address_from_sipp,
    sipp_messages,
    start_sipp,
    wait_idle,
    wait_until,
)


def notifications_ok(path: str) -> Reply | None:
    if path.endswith(("/start", "/end", "/dtmf-match")):
        return 200, b'{"status":"ok"}', 0.0
    return None


def answer(action: dict[str, Any]) -> Any:
    def script(path: str, body: Any) -> Reply:
        return notifications_ok(path) or (200, json.dumps(action).encode(), 0.0)
    return script



def test_early_media_then_cancel(system: PbxSystem, workdir: Path) -> None:
    system.provider.script = answer({"type": "prompt", "file": "sounds/menu.wav"})
    rtp = call_with_rtp(system, "early-cancel", "uac_early_cancel.xml", "*96", workdir)
    # The prompt played during the 1.5 s of early media, before any final response.
    assert len(rtp.audio(0)) >= 40, len(rtp.audio(0))
    starts = system.provider.seen("/early/start")
    assert starts
    session_id = starts[-1].body["session_id"]
    end = wait_until(lambda: [r for r in system.provider.for_session(session_id)
                              if r.path == "/early/end"], 5, "/end")
    assert end[0].body["reason"] == "Hangup"
    wait_idle(system)


def test_early_media_play_and_hangup_code_is_the_final_response(
        system: PbxSystem, workdir: Path) -> None:
    system.provider.script = answer(
        {"type": "play_and_hangup", "prompt": "sounds/beep.wav", "code": 486})
    rtp = call_with_rtp(system, "early-486", "uac_early_final.xml", "*96", workdir)
    # The caller offered PCMA first: the beep came as PCMA before the 486.
    beep = rtp.audio(8)
    assert 8 <= len(beep) <= 30, len(beep)
    wait_idle(system)


@pytest.mark.parametrize("transport", ["u1", "t1"], ids=["udp", "tcp"])
def test_register_with_digest_then_call_the_phone(system: PbxSystem, workdir: Path,
                                                   transport: str) -> None:
    """The phone registers (and answers) over UDP, then over TCP."""
    user = "3001" if transport == "u1" else "3002"
    # A wrong password is refused (a fresh 401), and leaves no binding.
    wrong = start_sipp("register-wrong", [
        "-sf", str(SCENARIOS / "uac_register_wrong.xml"), "-s", user, system.sip_addr,
        "-t", transport,
        "-i", "127.0.0.1", "-p", str(free_port()), "-au", user, "-ap", "not-the-password",
        "-m", "1", "-l", "1",
    ], workdir / "wrong")
    try:
        assert wrong.wait(15) == 0, wrong.logs()
    finally:
        wrong.stop()

    sip_port = free_port()
    register = start_sipp("register", [
        "-sf", str(SCENARIOS / "uac_register.xml"), "-s", user, system.sip_addr,
        "-t", transport, "-i", "127.0.0.1", "-p", str(sip_port), "-au", user,
        "-ap", REGISTERING_USERS[user],
        "-m", "1", "-l", "1",
    ], workdir / "register")
    try:
        assert register.wait(15) == 0, register.logs()
    finally:
        register.stop()
    # The phone answers on the port it registered from.
    phone = start_sipp("phone", [
        "-sf", str(SCENARIOS / "uas_answer_pcma.xml"), "-s", user, "-t", transport,
        "-i", "127.0.0.1", "-p", str(sip_port), "-mi", "127.0.0.1",
        "-mp", str(free_port(even=True)), "-rtp_echo", "-m", "1",
    ], workdir / "phone")
    caller_rtp = RtpEndpoint()
    wire = LoopbackSniffer(system.rtp_ports)
    caller = None
    try:
        # A caller that is no extension may not call a user directly (407)...
        stranger = start_sipp("stranger", [
            "-sf", str(SCENARIOS / "uac_invite_407.xml"), "-s", user, system.sip_addr,
            "-i", "127.0.0.1", "-p", str(free_port()), "-m", "1", "-l", "1",
        ], workdir / "stranger")
        try:
            assert stranger.wait(15) == 0, stranger.logs()
        finally:
            stranger.stop()
        # ...extension 3003 may, once its INVITE carries its digest credentials (407).
        caller = start_sipp("caller", [
            "-sf", str(SCENARIOS / "uac_ext_call.xml"), "-s", user, system.sip_addr,
            "-i", "127.0.0.1", "-p", str(free_port()), "-au", "3003",
            "-ap", REGISTERING_USERS["3003"], "-key", "rtp_port", str(caller_rtp.port),
            # sipp's digest uri defaults to host:port; RFC 3261 §22.4 wants the R-URI.
            "-auth_uri", f"{user}@{system.sip_addr}",
            "-d", "1000", "-m", "1", "-l", "1",
        ], workdir / "caller")
        # The caller (PCMU) talks to the phone (PCMA only): the worker transcodes both ways
        # and the phone's RTP echo brings the caller's audio back.
        wait_until(lambda: "ACK" in sipp_messages(phone.workdir).split("INVITE sip:", 1)[-1],
                   10, "the phone to answer")
        media_addr = wait_until(lambda: media_address_from_sipp(caller.workdir), 5,
                                "the caller's SDP answer")
        tone = audioop.lin2ulaw(b"".join(
            int(6000 * ((i // 10) % 2 * 2 - 1)).to_bytes(2, "little", signed=True)
            for i in range(160)), 2)
        sent_at = time.monotonic()
        for _ in range(60):
            caller_rtp.send(media_addr, tone)
            time.sleep(0.02)
        # Sent back wherever the caller's RTP came from (symmetric RTP): watch the wire.
        def echoed_back() -> list[Any]:
            return [p for p in wire.sent_by(media_addr, 0)
                    if p.at >= sent_at and len(p.payload) == 160]

        # Wait for the count itself, not for the first packet: the rest may still be in
        # flight through the worker and the phone's echo on a loaded machine.
        try:
            echoed = wait_until(lambda: len(echoed_back()) >= 40 and echoed_back(), 5,
                                "40 packets of the caller's audio echoed back by the phone")
        except AssertionError:
            raise AssertionError(f"only {len(echoed_back())} of 60 packets echoed") from None
        sent_level = audioop.rms(audioop.ulaw2lin(tone, 2), 2)
        back_level = audioop.rms(audioop.ulaw2lin(echoed[len(echoed) // 2].payload, 2), 2)
        assert abs(back_level - sent_level) / sent_level < 0.1, (sent_level, back_level)
        assert caller.wait(20) == 0, caller.logs()
        assert phone.wait(15) == 0, phone.logs()
    finally:
        if caller is not None:
            caller.stop()
        phone.stop()
        caller_rtp.close()
        wire.close()
    wait_idle(system)



def test_a_callees_early_media_reaches_the_caller_before_the_answer(
        system: PbxSystem, workdir: Path) -> None:
    """Extension 3003 calls 2001 directly; 2001's network answers 183 with SDP and plays
    its ringback for 3 s before the 200 (RFC 3960): the caller gets a 183 with our SDP
    and hears that audio before the 200 (it was a bare 180 and silence)."""
    callee_rtp, caller_rtp = RtpEndpoint(), RtpEndpoint()
    callee = start_sipp("early-callee", [
        "-sf", str(SCENARIOS / "uas_early_media.xml"), "-s", "2001",
        "-i", "127.0.0.1", "-p", str(system.extension_ports["2001"]),
        "-key", "rtp_port", str(callee_rtp.port), "-d", "3000", "-m", "1",
    ], workdir / "callee")
    caller = None
    try:
        caller = start_sipp("early-caller", [
            "-sf", str(SCENARIOS / "uac_ext_call_early.xml"), "-s", "2001", system.sip_addr,
            "-i", "127.0.0.1", "-p", str(free_port()), "-au", "3003",
            "-ap", REGISTERING_USERS["3003"], "-key", "rtp_port", str(caller_rtp.port),
            "-auth_uri", f"2001@{system.sip_addr}", "-d", "500", "-m", "1", "-l", "1",
        ], workdir / "caller")
        # Where the PBX wants the callee's RTP: its offer in the INVITE the callee got.
        worker_b = wait_until(lambda: media_address_from_sipp(callee.workdir, "INVITE sip:"),
                              10, "the INVITE to the callee")
        wait_until(lambda: "SIP/2.0 183" in sipp_messages(caller.workdir), 5,
                   "the caller's 183")
        ringback = bytes([0x2A]) * 160
        for _ in range(40):
            callee_rtp.send(worker_b, ringback)
            time.sleep(0.02)
        heard = wait_until(lambda: len([p for p in caller_rtp.audio(0)
                                        if p.payload == ringback]) >= 25 or None, 3,
                           "the callee's ringback at the caller")
        assert heard
        # All of that before the answer: the callee waits 3 s to send its 200.
        assert "SIP/2.0 200" not in sipp_messages(caller.workdir).split("CSeq: 2 INVITE")[0]
        assert "200 OK" not in sipp_messages(caller.workdir).split("183 Session Progress")[-1]
        assert caller.wait(20) == 0, caller.logs()
        assert callee.wait(15) == 0, callee.logs()
    finally:
        if caller is not None:
            caller.stop()
        callee.stop()
        callee_rtp.close()
        caller_rtp.close()
    wait_idle(system)

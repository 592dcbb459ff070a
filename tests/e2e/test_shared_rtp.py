"""Calls on a media worker's shared RTP port (`[media] rtp_socket = "auto"`), sipp at
both ends: a prompt plays, RFC 4733 digits are detected, and a transfer bridges the
caller (PCMU) to a callee (PCMA, RTP echo) with audio both ways, every leg on the one
port, each told apart by its source address (`workers.demux`); a caller that looks
NATed (its offer's c= is not where its INVITE came from) gets a port of its own.

One system for the module (one media worker, so both legs share its port). Mode
"shared" and a stranger spraying the shared port: tests/security/test_rtp_injection.py,
parametrized over the socket modes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from media import g711
from tests.e2e.harness import (
    SCENARIOS,
    LoopbackSniffer,
    PbxSystem,
    Reply,
    ScriptedProvider,
    free_port,
    media_address_from_sipp,
    sipp_messages,
    start_sipp,
    start_system,
    wait_until,
)
from tests.e2e.test_dtmf_sources import caller_scenario, pcap_press, sdp_audio_port, tone
from tests.e2e.uac import Uac

MENU = {
    "type": "dtmf_menu",
    "greeting": "sounds/menu.wav",
    "timeout_ms": 8000,
    "entries": {"1": {"type": "transfer", "target": "2001"}},
    "step_id": "menu-transfer",
}


@pytest.fixture(scope="module")
def shared_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxSystem]:
    provider = ScriptedProvider()
    s = start_system(tmp_path_factory.mktemp("pbx"), provider, media_workers=1,
                     executors=1, media_extra='rtp_socket = "auto"')
    try:
        yield s
    finally:
        s.stop()
        provider.close()


def menu_script(path: str, body: Any) -> Reply:
    if path.endswith(("/start", "/end", "/dtmf-match")):
        return 200, b'{"status":"ok"}', 0.0
    if (body.get("event") or {}).get("type") == "session_start":
        return 200, json.dumps(MENU).encode(), 0.0
    return 200, json.dumps({"type": "hangup"}).encode(), 0.0


def hanging_up(scenario: str) -> str:
    """caller_scenario, but the caller sends the BYE instead of waiting for one."""
    head = scenario.split('  <recv request="BYE"', 1)[0]
    return head + """  <send retrans="500">
    <![CDATA[
      BYE sip:[service]@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: "Caller" <sip:7201@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:[service]@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Contact: <sip:7201@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Length: 0
    ]]>
  </send>
  <recv response="200"/>
  <pause milliseconds="300"/>
</scenario>
"""


def loud(payload: bytes, codec: str) -> bool:
    pcm = g711.decode(np.frombuffer(payload, dtype=np.uint8), codec).astype(np.float64)
    return bool(pcm.size) and float(np.sqrt(np.mean(pcm * pcm))) > 1000


def test_prompt_digits_and_transfer_with_audio_both_ways_on_the_shared_port(
        shared_system: PbxSystem, tmp_path: Path) -> None:
    system = shared_system
    system.provider.script = menu_script
    tones = tmp_path / "talk.ulaw"
    pcm = np.array([round(s) for s in tone("5", 3000)], dtype=np.int16)
    tones.write_bytes(bytes(g711.encode(pcm, "PCMU")))
    # The caller hears the greeting for 1.5 s, presses 1 (RFC 4733 from its media port,
    # its SDP address), then talks (a tone) for 3 s once bridged, and hangs up.
    media = ('  <pause milliseconds="1500"/>\n' + pcap_press("1")
             + '  <pause milliseconds="2500"/>\n'
             + f'  <nop><action><exec rtp_stream="{tones},1,0"/></action></nop>\n'
             + '  <pause milliseconds="3000"/>\n')
    scenario = tmp_path / "caller.xml"
    scenario.write_text(hanging_up(caller_scenario("7201", media)))
    wire = LoopbackSniffer(system.rtp_ports)
    callee_media = free_port(even=True)
    caller_media = free_port(even=True)
    callee = start_sipp("callee-2001", [
        "-sf", str(SCENARIOS / "uas_answer_pcma_dtmf.xml"), "-s", "2001",
        "-i", "127.0.0.1", "-p", str(system.extension_ports["2001"]),
        "-mi", "127.0.0.1", "-mp", str(callee_media), "-rtp_echo", "-m", "1",
        "-key", "dtmf_pt", "96",
    ], tmp_path / "callee")
    caller = start_sipp("caller-7201", [
        "-sf", str(scenario), "-s", "*99", system.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1",
        "-mp", str(caller_media), "-m", "1", "-l", "1",
    ], tmp_path / "caller")
    try:
        pbx_a = wait_until(lambda: media_address_from_sipp(caller.workdir), 10,
                           "the caller's SDP answer")
        wait_until(lambda: "ACK" in sipp_messages(callee.workdir).split("INVITE sip:", 1)[-1],
                   15, "the callee to answer (the digit 1 transferred the call)")
        b_port = sdp_audio_port(sipp_messages(callee.workdir).split("INVITE sip:", 1)[-1])
        assert b_port == pbx_a[1], "both legs on the worker's one shared port"
        to_caller = ("127.0.0.1", caller_media)
        to_callee = ("127.0.0.1", callee_media)

        def sent(dst: tuple[str, int], pt: int) -> list[Any]:
            return [p for d, p in list(wire.packets)
                    if d == dst and p.src == pbx_a and p.payload_type == pt]

        # Audio both ways across the bridge: the caller's tone reaches the callee as
        # PCMA, and the callee's echo of it comes back to the caller as PCMU.
        wait_until(lambda: sum(loud(p.payload, "PCMA") for p in sent(to_callee, 8)) >= 20,
                   15, "the caller's tone at the callee (PCMA)")
        wait_until(lambda: sum(loud(p.payload, "PCMU") for p in sent(to_caller, 0)) >= 20,
                   15, "the callee's echo at the caller (PCMU)")
        # The greeting played before the press: loud PCMU to the caller before the
        # bridge's first packet to the callee.
        bridged_at = min(p.at for p in sent(to_callee, 8))
        greeting = [p for p in sent(to_caller, 0) if p.at < bridged_at and loud(p.payload, "PCMU")]
        assert len(greeting) >= 25, f"{len(greeting)} loud prompt packets before the bridge"
        # The digit was detected once: the menu's transfer, one dtmf step at most.
        starts = [r for r in system.provider.seen("/ivr/step/start")
                  if r.body.get("caller") == "7201"]
        assert starts
        assert caller.wait(40) == 0, caller.logs()
    finally:
        caller.stop()
        callee.stop()
        wire.close()
    wait_until(lambda: system.metrics()["pbx_calls"] == 0
               and system.metrics()["pbx_media_legs"] == 0, 10, "the PBX to be idle")
    # Nothing sent to either phone from anywhere but the shared port.
    sources = {p.src for d, p in list(wire.packets) if d in (to_caller, to_callee)}
    assert sources == {pbx_a}, sources


def test_auto_gives_a_natted_looking_caller_a_port_of_its_own(shared_system: PbxSystem
                                                               ) -> None:
    """auto: an offer whose c= (127.0.0.2) is not the INVITE's source (127.0.0.1) looks
    NATed: the leg gets a pooled port, not the shared one (a plain caller does)."""
    system = shared_system
    system.provider.script = menu_script
    ports = []
    for c_ip in ("127.0.0.1", "127.0.0.2", "127.0.0.1"):
        uac = Uac(system.sip_port, free_port(even=True), rtp_ip=c_ip)
        try:
            assert uac.call() == 200
            ports.append((c_ip, uac.answer_rtp_port))
            assert uac.hangup() == 200
        finally:
            uac.close()
    (_, shared_a), (_, own), (_, shared_b) = ports
    assert shared_a == shared_b, ports  # the shared port, both times
    assert own != shared_a, ports
    wait_until(lambda: system.metrics()["pbx_calls"] == 0
               and system.metrics()["pbx_media_legs"] == 0, 10, "the PBX to be idle")

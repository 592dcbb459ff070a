"""RTP keeps flowing while the IVR waits, and a call is found by its SIP Call-ID (issue 11),
end to end: sipp calls *99 with its media on a test socket, the provider asks for digits
after a short beep and then waits; the caller must keep receiving one packet per 20 ms
(G.711 silence, or RFC 3389 comfort noise when its SDP offered CN), in one RTP stream
with the beep. Meanwhile `/api/calls?sip_call_id=` finds the call by sipp's Call-ID,
and its record in logs/calls.jsonl carries it."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import SCENARIOS, PbxSystem, sipp_messages, wait_idle, wait_until
from tests.e2e.ivr_calls import call, event_type, script_of

BEEP_WAV = "sounds/beep.wav"  # 0.25 s
WAIT_S = 2.0  # how long the test listens while the menu waits


@pytest.fixture(autouse=True)
def _idle(system: PbxSystem) -> Iterator[None]:
    wait_idle(system)
    yield
    system.provider.script = system.provider.default_script
    wait_idle(system)


def menu(path: str, body: Any) -> dict[str, Any] | None:
    """A beep, then a wait for one digit (long enough for the test); the digit hangs up."""
    if event_type(body) == "session_start":
        return {"type": "collect_dtmf", "min_digits": 1, "max_digits": 1,
                "timeout_ms": 15000, "prompt": BEEP_WAV}
    return None


def is_beep(packet: Any) -> bool:
    return packet.payload_type == 0 and len(set(packet.payload)) > 1


def no_cn_scenario(workdir: Path) -> Path:
    """sipp's caller without CN in its offer (the shipped one offers it)."""
    text = (SCENARIOS / "uac_wait_bye.xml").read_text()
    text = text.replace("RTP/AVP 0 8 101 13", "RTP/AVP 0 8 101").replace(
        "a=rtpmap:13 CN/8000\n", "")
    assert "CN/8000" not in text
    path = workdir / "uac_wait_bye_no_cn.xml"
    path.write_text(text)
    return path


def call_records(system: PbxSystem) -> list[dict[str, Any]]:
    path = system.root / "logs" / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("offer_cn", [False, True], ids=["silence", "comfort-noise"])
def test_rtp_keeps_arriving_while_a_menu_waits(system: PbxSystem, workdir: Path,
                                               offer_cn: bool) -> None:
    system.provider.script = script_of(menu)
    scenario = SCENARIOS / "uac_wait_bye.xml" if offer_cn else no_cn_scenario(workdir)
    with call(system, workdir, scenario=scenario) as caller:
        caller.wait_step("session_start")
        # Fill while the provider answers, the beep, then fill again: wait for that.
        def beep_then_fill() -> bool:
            packets = list(caller.rtp.packets)
            beep = [k for k, p in enumerate(packets) if is_beep(p)]
            return bool(beep) and len(packets) > beep[-1] + 1
        wait_until(beep_then_fill, 10, "the beep and a packet after it")
        time.sleep(0.1)  # the beep's last frame is behind us
        start = time.monotonic()
        time.sleep(WAIT_S)
        end = time.monotonic()
        waiting = [p for p in list(caller.rtp.packets) if start <= p.at < end]

        sip_call_id = re.search(r"Call-ID: (\S+)", sipp_messages(caller.sipp.workdir))
        assert sip_call_id is not None
        found = system.admin(f"/api/calls?sip_call_id={sip_call_id.group(1)}")
        assert len(found) == 1 and found[0]["live"] is True, found
        assert found[0]["sip_legs"]["a"] == sip_call_id.group(1)

        caller.send_digits("1")
        caller.wait_ended()

    # One packet per 20 ms while waiting: 100 in 2 s; a loaded machine may delay some
    # ticks (the worker catches up in bursts), so half is the floor. Nothing would
    # arrive without the fill.
    assert len(waiting) >= WAIT_S * 50 / 2, len(waiting)
    if offer_cn:
        assert all(p.payload_type == 13 and len(p.payload) == 1 for p in waiting), waiting[:3]
    else:
        assert all(p.payload_type == 0 and p.payload == b"\xff" * 160 for p in waiting), [
            (p.payload_type, p.marker, p.payload[:4], len(p.payload)) for p in waiting
            if p.payload != b"\xff" * 160][:10]
    # Beep, then fill: one RTP stream (RFC 3550 §5.1), no sequence or timestamp gap.
    packets = [p for p in list(caller.rtp.packets) if p.at < end]
    assert len({p.ssrc for p in packets}) == 1
    for a, b in pairwise(packets):
        assert (b.seq - a.seq) & 0xFFFF == 1, (a, b)
        assert (b.timestamp - a.timestamp) & 0xFFFFFFFF == 160, (a, b)
    kinds = "".join("b" if is_beep(p) else "f" for p in packets)
    assert re.fullmatch("f*b+f+", kinds), kinds  # (waiting,) the beep, waiting

    record = wait_until(lambda: [r for r in call_records(system)
                                 if r.get("sip_call_id") == sip_call_id.group(1)],
                        10, "the call's record")[0]
    assert record["kind"] == "ivr" and record["sip_call_ids"][0] == sip_call_id.group(1)
    found = system.admin(f"/api/calls?sip_call_id={sip_call_id.group(1)}")
    assert len(found) == 1 and found[0]["live"] is False

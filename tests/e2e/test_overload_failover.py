"""Overload and media worker failure, on a system of its own: two media workers of
capacity 2 (legs), IVR calls that stay up on hold music.

* Offered twice what it can carry (8 concurrent calls for 4 places, sipp), the excess
  gets 503 with Retry-After and the accepted calls complete normally.
* A media worker killed with SIGKILL: its calls get BYE within 2 s, calls on the
  other worker keep their RTP, new calls go to the survivor, and once supervisord
  has restarted the worker it rejoins (`pbx_media_workers` back to 2) and takes calls.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    SCENARIOS,
    PbxSystem,
    Reply,
    RtpEndpoint,
    ScriptedProvider,
    free_port,
    start_sipp,
    start_system,
    wait_idle,
    wait_until,
)
from tests.e2e.uac import Uac

CAPACITY = 2


def hold_script(path: str, body: Any) -> Reply:
    if path.endswith(("/start", "/end", "/dtmf-match")):
        return 200, b'{"status":"ok"}', 0.0
    return 200, json.dumps({"type": "prompt", "file": "sounds/hold.wav"}).encode(), 0.0


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxSystem]:
    provider = ScriptedProvider()
    provider.script = hold_script
    system = start_system(tmp_path_factory.mktemp("pbx-small"), provider,
                          media_capacity=CAPACITY)
    yield system
    system.stop()
    provider.close()



def test_twice_the_load_gets_503_for_the_excess(small: PbxSystem, workdir: Path) -> None:
    wait_idle(small, media_legs=False)
    before = small.metrics()
    sipp = start_sipp("overload", [
        "-sf", str(SCENARIOS / "uac_hold_or_503.xml"), "-s", "*99", small.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1",
        "-mp", str(free_port(even=True)), "-m", "8", "-l", "8", "-r", "50",
        "-timeout", "20s", "-timeout_error", "-recv_timeout", "8000",
    ], workdir / "overload")
    try:
        rc = sipp.wait(30)
    finally:
        sipp.stop()
    assert rc == 0, sipp.logs()  # every call ended as scripted: held and BYE, or 503
    log = "".join(p.read_text(errors="replace") for p in sipp.workdir.glob("*_messages.log"))
    finals = re.findall(r"SIP/2\.0 (\d{3}) [^\n]*\n(?:[^\n]+\n)*?CSeq: 1 INVITE", log)
    accepted, rejected = finals.count("200"), finals.count("503")
    assert accepted + rejected == 8, finals
    assert 2 * CAPACITY - 1 <= accepted <= 2 * CAPACITY, finals
    assert "Retry-After:" in log
    after = small.metrics()
    assert after["pbx_calls_failed_total"] - before["pbx_calls_failed_total"] == rejected
    wait_idle(small, media_legs=False)
    # and the system takes calls again once there is room
    rtp = RtpEndpoint()
    uac = Uac(small.sip_port, rtp.port)
    try:
        assert uac.call() == 200
        assert uac.hangup() == 200
    finally:
        uac.close()
        rtp.close()


def media_pids(system: PbxSystem) -> dict[str, int]:
    out = {}
    for name in ("media:media-00", "media:media-01"):
        text = system.supervisorctl("pid", name).strip()
        out[name] = int(text) if text.isdigit() else 0
    return out


def port_owner(port: int) -> int | None:
    """The pid whose UDP socket is bound to `port` (ss -p)."""
    out = subprocess.run(["ss", "-Hulpn", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=5).stdout
    m = re.search(r"pid=(\d+)", out)
    return int(m.group(1)) if m else None


def test_killed_media_worker_calls_end_others_continue_it_rejoins(
        small: PbxSystem) -> None:
    wait_idle(small, media_legs=False)
    wait_until(lambda: small.metrics()["pbx_media_workers"] == 2, 10, "two media workers")
    pids = media_pids(small)
    rtps = [RtpEndpoint() for _ in range(5)]
    uacs: list[Uac] = []
    try:
        # one call on each worker (least loaded first)
        for rtp in rtps[:2]:
            uac = Uac(small.sip_port, rtp.port)
            uacs.append(uac)
            assert uac.call() == 200
        owners = [port_owner(u.answer_rtp_port) for u in uacs]
        assert sorted(owners) == sorted(pids.values()), (owners, pids)
        victim_pid = owners[0]
        victim = next(name for name, pid in pids.items() if pid == victim_pid)
        for rtp in rtps[:2]:
            wait_until(lambda r=rtp: len(r.audio(0)) >= 5, 5, "hold music on both calls")

        killed_at = time.monotonic()
        assert victim_pid is not None
        os.kill(victim_pid, signal.SIGKILL)
        bye_at = uacs[0].wait_bye(5)
        assert bye_at is not None, "no BYE for the dead worker's call"
        assert bye_at - killed_at <= 2.0, f"BYE after {bye_at - killed_at:.2f} s"
        # the other call is untouched: still up, RTP still flowing
        seen = len(rtps[1].audio(0))
        wait_until(lambda: len(rtps[1].audio(0)) >= seen + 25, 3, "RTP on the surviving call")
        assert uacs[1].bye_at is None

        # a new call succeeds, never on the dead worker (the survivor, or the restarted
        # worker if supervisord was quicker than this test)
        uac = Uac(small.sip_port, rtps[2].port)
        uacs.append(uac)
        assert uac.call() == 200
        assert port_owner(uac.answer_rtp_port) not in (None, victim_pid)
        wait_until(lambda: len(rtps[2].audio(0)) >= 5, 5, "RTP on the new call")

        # supervisord restarts the worker; it rejoins
        wait_until(lambda: "RUNNING" in small.supervisorctl("status", victim)
                   and media_pids(small)[victim] not in (0, victim_pid), 20,
                   f"{victim} restarted")
        wait_until(lambda: small.metrics()["pbx_media_workers"] == 2, 30,
                   "the restarted worker to rejoin")
        new_pid = media_pids(small)[victim]
        # the restarted worker takes calls: with 2 places per worker, of two more calls
        # at least one lands on it
        owners_now = [port_owner(u.answer_rtp_port) for u in uacs[1:]]
        for rtp in rtps[3:]:
            if new_pid in owners_now:
                break
            uac = Uac(small.sip_port, rtp.port)
            uacs.append(uac)
            assert uac.call() == 200
            owners_now.append(port_owner(uac.answer_rtp_port))
        assert new_pid in owners_now, (new_pid, owners_now)
        on_new = next(r for u, r in zip(uacs[1:], rtps[1:], strict=False)
                      if port_owner(u.answer_rtp_port) == new_pid)
        wait_until(lambda: len(on_new.audio(0)) >= 5, 5, "RTP from the restarted worker")
        for u in uacs[1:]:
            assert u.hangup() == 200
    finally:
        for u in uacs:
            u.close()
        for rtp in rtps:
            rtp.close()
    log = small.log("front")
    assert "Traceback" not in log, log[-3000:]

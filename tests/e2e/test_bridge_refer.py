"""A transfer out of a bridge with real phones (sipp): caller 3003 is transferred by the
IVR to extension 2001 and bridged; then it REFERs 2001 on to extension 2002. The PBX
calls 2002 on the same media worker as a leg of its own, bridges 2001 to it, tells the
caller (NOTIFY 200) and releases it; 2001 and 2002 talk until 2002 hangs up.

Until the target leg had a media id of its own (it took the bridged party's), the
worker refused the allocation and the call ended with 503 at the REFER."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    REGISTERING_USERS,
    SCENARIOS,
    PbxSystem,
    Reply,
    RtpEndpoint,
    ScriptedProvider,
    free_port,
    sipp_messages,
    start_sipp,
    start_system,
    wait_idle,
)

TALK_MS = 2000  # 2002 talks this long before it hangs up


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxSystem]:
    """Two extensions (the session's system has one)."""
    provider = ScriptedProvider()
    s = start_system(tmp_path_factory.mktemp("pbx-bridge-refer"), provider,
                     extensions=("2001", "2002"))
    yield s
    s.stop()
    provider.close()


def transfer_to_2001(path: str, body: Any) -> Reply:
    if path.endswith(("/start", "/end", "/dtmf-match")):
        return 200, b'{"status":"ok"}', 0.0
    return 200, json.dumps({"type": "transfer", "target": "2001"}).encode(), 0.0


def test_refer_out_of_a_bridge_bridges_the_peer_to_the_target(
        system: PbxSystem, workdir: Path) -> None:
    system.provider.script = transfer_to_2001
    rtp = RtpEndpoint()
    first = start_sipp("ext-2001", [
        "-sn", "uas", "-i", "127.0.0.1", "-p", str(system.extension_ports["2001"]),
        "-mi", "127.0.0.1", "-mp", str(free_port(even=True)), "-rtp_echo", "-m", "1",
    ], workdir / "2001")
    target = start_sipp("ext-2002", [
        "-sf", str(SCENARIOS / "uas_answer_then_bye.xml"), "-s", "2002",
        "-i", "127.0.0.1", "-p", str(system.extension_ports["2002"]),
        "-mi", "127.0.0.1", "-mp", str(free_port(even=True)), "-rtp_echo",
        "-d", str(TALK_MS), "-m", "1",
    ], workdir / "2002")
    caller = start_sipp("caller-3003", [
        "-sf", str(SCENARIOS / "uac_refer_bridged.xml"), "-s", "*99", system.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-key", "rtp_port", str(rtp.port),
        "-key", "refer_to", "2002", "-d", "2000",
        "-au", "3003", "-ap", REGISTERING_USERS["3003"],
        "-auth_uri", f"*99@{system.sip_addr}", "-m", "1", "-l", "1",
    ], workdir / "caller")
    try:
        # The caller hears NOTIFY 200 (its scenario checks it) and is released with BYE.
        assert caller.wait(30) == 0, caller.logs() + system.log("front")[-3000:]
        released = time.monotonic()
        # 2002 answered, talked TALK_MS with 2001 and hung up; then 2001 got its BYE.
        assert target.wait(20) == 0, target.logs()
        assert first.wait(20) == 0, first.logs()
        assert time.monotonic() - released >= TALK_MS / 1000 * 0.75
        assert "INVITE sip:2002" in sipp_messages(target.workdir)
        assert "BYE" in sipp_messages(first.workdir)
    finally:
        caller.stop()
        target.stop()
        first.stop()
        rtp.close()
    front = system.log("front")
    assert "MediaAllocationFailed" not in front
    wait_idle(system)

"""Parallel forking with real phones (issue 11): two sipp phones register as 3001 with
digest, extension 3003 calls 3001, both ring; the one that answers gets the call and
the other gets CANCEL (and ACKs nothing: it answers 200 + 487, which the PBX ACKs)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    REGISTERING_USERS,
    SCENARIOS,
    PbxSystem,
    RtpEndpoint,
    ScriptedProvider,
    Sipp,
    free_port,
    start_sipp,
    start_system,
    wait_idle,
    wait_until,
)

USER = "3001"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxSystem]:
    """A system of its own: the bindings registered here must not ring in other tests."""
    provider = ScriptedProvider()
    s = start_system(tmp_path_factory.mktemp("pbx-forking"), provider)
    yield s
    s.stop()
    provider.close()


def register(system: PbxSystem, workdir: Path, sip_port: int) -> None:
    phone = start_sipp(f"register-{sip_port}", [
        "-sf", str(SCENARIOS / "uac_register.xml"), "-s", USER, system.sip_addr,
        "-i", "127.0.0.1", "-p", str(sip_port), "-au", USER, "-ap", REGISTERING_USERS[USER],
        "-m", "1", "-l", "1",
    ], workdir / f"register-{sip_port}")
    try:
        assert phone.wait(15) == 0, phone.logs()
    finally:
        phone.stop()


def test_both_phones_ring_the_answer_wins_the_other_gets_cancel(
        system: PbxSystem, workdir: Path) -> None:
    ports = {"answers": free_port(), "cancelled": free_port()}
    for port in ports.values():
        register(system, workdir, port)
    phones: dict[str, Sipp] = {
        "answers": start_sipp("answers", [
            "-sf", str(SCENARIOS / "uas_ring_then_answer.xml"), "-s", USER,
            "-i", "127.0.0.1", "-p", str(ports["answers"]), "-mi", "127.0.0.1",
            "-mp", str(free_port(even=True)), "-rtp_echo", "-d", "1500", "-m", "1",
        ], workdir / "answers"),
        "cancelled": start_sipp("cancelled", [
            "-sf", str(SCENARIOS / "uas_ring_until_cancel.xml"), "-s", USER,
            "-i", "127.0.0.1", "-p", str(ports["cancelled"]), "-m", "1",
        ], workdir / "cancelled"),
    }
    caller_rtp = RtpEndpoint()
    caller = None
    try:
        caller = start_sipp("caller", [
            "-sf", str(SCENARIOS / "uac_ext_call.xml"), "-s", USER, system.sip_addr,
            "-i", "127.0.0.1", "-p", str(free_port()), "-au", "3003",
            "-ap", REGISTERING_USERS["3003"], "-key", "rtp_port", str(caller_rtp.port),
            "-auth_uri", f"{USER}@{system.sip_addr}", "-d", "1000", "-m", "1", "-l", "1",
        ], workdir / "caller")
        # The phone that never answers was CANCELled once the other one answered.
        assert phones["cancelled"].wait(20) == 0, phones["cancelled"].logs()
        assert caller.wait(25) == 0, caller.logs()
        assert phones["answers"].wait(15) == 0, phones["answers"].logs()
    finally:
        for sipp in (*phones.values(), *([caller] if caller else [])):
            sipp.stop()
        caller_rtp.close()
    path = system.root / "logs" / "calls.jsonl"

    def record() -> dict[str, Any] | None:
        lines = path.read_text().splitlines() if path.exists() else []
        found = [json.loads(line) for line in lines]
        return next((r for r in found if r.get("callee") == USER), None)

    written = wait_until(record, 10, "the call record")
    assert written["bridged_at"] is not None, written
    assert f"ringing {USER} at 2 places" in system.log("front")
    # The cancelled branch's 487 is no failure of the call.
    assert "failed with 487" not in system.log("front")
    wait_idle(system)

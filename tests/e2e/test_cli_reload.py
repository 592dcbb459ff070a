"""The `pbx` command and hot reload against the real system (supervisord, sipp): status,
calls, trace, config check; `pbx reload` after editing the file: a new sipp call takes
the new route while a call in progress keeps its own; a bad file is refused with the
reason; a change to a section that needs a restart is named and not applied."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    ROOT,
    SCENARIOS,
    PbxSystem,
    Reply,
    RtpEndpoint,
    ScriptedProvider,
    Sipp,
    free_port,
    start_sipp,
    start_system,
    wait_idle,
    wait_until,
)

OK: Reply = (200, b'{"status":"ok"}', 0.0)
HANGUP: Reply = (200, json.dumps({"type": "hangup"}).encode(), 0.0)
# The first call's provider answers its first step this late: the reload happens while
# the call is in progress.
SLOW_ANSWER_S = 4.0

ROUTE = """
[[routes]]
name = "reloaded"
to_user = "*94"
app = "ivr"
app_params = {{ mode = "step", url = "{url}", retry = {{ max_retries = 0, timeout_ms = 9000 }} }}
"""


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxSystem]:
    provider = ScriptedProvider()
    s = start_system(tmp_path_factory.mktemp("pbx-cli"), provider, media_workers=1,
                     executors=1)
    yield s
    s.stop()
    provider.close()


@pytest.fixture(autouse=True)
def _idle(system: PbxSystem) -> Iterator[None]:
    wait_idle(system)
    yield
    system.provider.script = system.provider.default_script
    wait_idle(system)


def pbx(system: PbxSystem, *args: str) -> subprocess.CompletedProcess[str]:
    """The `pbx` command (pbx.cli) as an operator runs it, against this system."""
    assert system.conf_path is not None
    return subprocess.run(
        [sys.executable, "-m", "pbx.cli", "--config", str(system.root / "pbx.toml"),
         "--supervisord-conf", str(system.conf_path), *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=30)


def sipp_call(system: PbxSystem, workdir: Path, scenario: str, service: str,
              rtp: RtpEndpoint | None = None) -> Sipp:
    extra = ["-key", "rtp_port", str(rtp.port)] if rtp is not None else []
    return start_sipp(scenario, [
        "-sf", str(SCENARIOS / scenario), "-s", service, system.sip_addr, "-i", "127.0.0.1",
        "-p", str(free_port()), "-mi", "127.0.0.1", "-mp", str(free_port(even=True)),
        "-m", "1", "-l", "1", "-timeout", "20s", "-timeout_error", "-recv_timeout", "12000",
        *extra], workdir)


def finished(sipp: Sipp) -> None:
    try:
        rc = sipp.wait(25)
    finally:
        sipp.stop()
    assert rc == 0, f"sipp exited {rc}:\n{sipp.logs()}"


def paths_since(system: PbxSystem, mark: int) -> list[str]:
    return [r.path for r in system.provider.requests[mark:]]


def test_status_shows_programs_workers_and_executors(system: PbxSystem) -> None:
    out = pbx(system, "status")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "front" in out.stdout and "RUNNING" in out.stdout
    assert "media workers (1):" in out.stdout and "IVR executors (1):" in out.stdout
    assert "calls: 0" in out.stdout


def test_status_says_what_is_down(system: PbxSystem, tmp_path: Path) -> None:
    conf = tmp_path / "supervisord.conf"
    conf.write_text(f"[unix_http_server]\nfile={tmp_path}/nothing.sock\n")
    out = subprocess.run(
        [sys.executable, "-m", "pbx.cli", "--config", str(system.root / "pbx.toml"),
         "--supervisord-conf", str(conf), "status"], cwd=ROOT, capture_output=True,
        text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1
    assert f"supervisord is not running: no socket {tmp_path}/nothing.sock" in out.stdout


def test_reload_new_calls_take_the_new_route_calls_in_progress_keep_theirs(
        system: PbxSystem, tmp_path: Path) -> None:
    config = system.root / "pbx.toml"
    original = config.read_text()
    v1, v2 = system.provider.url("/v1"), system.provider.url("/v2")

    def script(path: str, body: Any) -> Reply:
        if path.endswith(("/start", "/end", "/dtmf-match")):
            return OK
        if path == "/v1":
            time.sleep(SLOW_ANSWER_S)
        return HANGUP

    system.provider.script = script
    try:
        # No *94 yet: an unknown caller gets the challenge anything else gets.
        finished(sipp_call(system, tmp_path / "before", "uac_invite_407.xml", "*94"))

        config.write_text(original + ROUTE.format(url=v1))
        out = pbx(system, "reload")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "reloaded routes" in out.stdout
        assert "IVR executors told to reload: 1" in out.stdout
        wait_until(lambda: "reload of" in system.log("ivr"), 5, "the executor's reload")

        mark = len(system.provider.requests)
        rtp_a, rtp_b = RtpEndpoint(), RtpEndpoint()
        try:
            first = sipp_call(system, tmp_path / "a", "uac_wait_bye.xml", "*94", rtp_a)
            wait_until(lambda: "/v1" in paths_since(system, mark), 10, "the first call's step")
            calls = pbx(system, "calls")
            assert calls.returncode == 0 and "reloaded" in calls.stdout, calls.stdout
            assert "1 call(s)" in calls.stdout

            config.write_text(original + ROUTE.format(url=v2))
            out = pbx(system, "reload")
            assert out.returncode == 0 and "reloaded routes" in out.stdout, out.stdout
            finished(sipp_call(system, tmp_path / "b", "uac_wait_bye.xml", "*94", rtp_b))
            finished(first)
        finally:
            rtp_a.close()
            rtp_b.close()
        wait_until(lambda: paths_since(system, mark).count("/v2/end") == 1
                   and "/v1/end" in paths_since(system, mark), 10, "both calls' /end")
        # The call in progress kept its route's IVR (its /end went to /v1), the new call
        # took the reloaded one.
        assert sorted(paths_since(system, mark)) == [
            "/v1", "/v1/end", "/v1/start", "/v2", "/v2/end", "/v2/start"]

        session = next(r.body["session_id"] for r in system.provider.requests[mark:]
                       if r.path == "/v1")
        trace = pbx(system, "trace", session)
        assert trace.returncode == 0, trace.stdout + trace.stderr
        assert f"session {session}" in trace.stdout
        assert "session_start" in trace.stdout and "hangup" in trace.stdout
    finally:
        config.write_text(original)
        pbx(system, "reload")


def test_a_bad_file_is_refused_with_the_reason_and_changes_nothing(
        system: PbxSystem, tmp_path: Path) -> None:
    config = system.root / "pbx.toml"
    original = config.read_text()
    bad = original + ROUTE.format(url="ftp://127.0.0.1/nope")
    try:
        config.write_text(bad)
        check = pbx(system, "config", "check", str(config))
        assert check.returncode == 2
        assert "app_params.url" in check.stderr and "http(s) URL" in check.stderr
        out = pbx(system, "reload")
        assert out.returncode == 2, out.stdout + out.stderr
        assert "reload refused, the running settings are kept" in out.stderr
        assert "app_params.url" in out.stderr and "http(s) URL" in out.stderr
        assert "reload refused" in system.log("front")
        # Still running the old plan: *94 is nobody's.
        finished(sipp_call(system, tmp_path / "after", "uac_invite_407.xml", "*94"))
    finally:
        config.write_text(original)


def test_a_change_that_needs_a_restart_is_named_and_not_applied(system: PbxSystem) -> None:
    config = system.root / "pbx.toml"
    original = config.read_text()
    try:
        config.write_text(original.replace("ring_timeout_ms = 8000", "ring_timeout_ms = 9000"))
        out = pbx(system, "reload")
        assert out.returncode == 3, out.stdout + out.stderr
        assert "needs a restart" in out.stdout and "sip.ring_timeout_ms" in out.stdout
        assert "needs a restart" in system.log("front")
        assert pbx(system, "status").returncode == 0
    finally:
        config.write_text(original)
        pbx(system, "reload")


def test_events_follow_prints_the_live_events(system: PbxSystem, tmp_path: Path) -> None:
    assert system.conf_path is not None
    follow = subprocess.Popen(
        [sys.executable, "-m", "pbx.cli", "--config", str(system.root / "pbx.toml"),
         "events", "--follow", "--type", "call", "--count", "2"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: len(system.admin("/api/status")["executors"]) > 0, 5, "status")
        time.sleep(1.0)  # the WebSocket is open before the call starts
        rtp = RtpEndpoint()
        try:
            finished(sipp_call(system, tmp_path, "uac_wait_bye.xml", "*99", rtp))
        finally:
            rtp.close()
        out, err = follow.communicate(timeout=20)
    finally:
        follow.kill()
        follow.wait(5)
    assert follow.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [(e["type"], e["event"]) for e in events] == [("call", "started"),
                                                         ("call", "answered")]
    assert events[0]["callee"] == "*99"

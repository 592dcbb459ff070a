"""Debian's baresip registers with the shipped digest settings (issue 11). libre fails a
whole 401 that names any algorithm but MD5 ("Register: Function not implemented"), so
the PBX offers a client whose User-Agent names baresip the MD5 challenge alone; a wrong
password is refused and logged at INFO with the source, the user and the User-Agent."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import (
    REGISTERING_USERS,
    PbxSystem,
    ScriptedProvider,
    start_system,
    wait_until,
)
from tests.e2e.softphones import sip_port

MODULES = Path("/usr/lib/baresip/modules")


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxSystem]:
    provider = ScriptedProvider()
    # The config's own algorithms (SHA-256 and MD5), not the harness's sipp ones.
    s = start_system(tmp_path_factory.mktemp("pbx-baresip"), provider,
                     digest_algorithms=None)
    yield s
    s.stop()
    provider.close()


def run_baresip(system: PbxSystem, workdir: Path, user: str, password: str) -> str:
    """baresip registers `user` for 3 s, headless (no audio device: a sine source and
    no player), with its SIP trace on; its output."""
    baresip = shutil.which("baresip")
    assert baresip, "baresip is not installed (make test installs Debian's baresip-core)"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config").write_text(
        f"sip_listen 127.0.0.1:{sip_port()}\nmodule_path {MODULES}\nmodule g711.so\n"
        "module ausine.so\nmodule_app account.so\naudio_player ausine,nil\n"
        "audio_source ausine,440\n")
    (workdir / "accounts").write_text(
        f"<sip:{user}@{system.sip_addr}>;auth_pass={password};regint=60\n")
    out = subprocess.run([baresip, "-f", str(workdir), "-s", "-t", "3"],
                         capture_output=True, text=True, timeout=30, check=False)
    return out.stdout + out.stderr


def test_baresip_registers_with_the_default_digest_settings(
        system: PbxSystem, tmp_path: Path) -> None:
    user = "3001"
    trace = run_baresip(system, tmp_path, user, REGISTERING_USERS[user])
    assert "Function not implemented" not in trace, trace[-3000:]
    assert "SIP/2.0 200 OK" in trace, trace[-3000:]
    challenges = [line for line in trace.splitlines() if line.startswith("WWW-Authenticate")]
    assert challenges and all("algorithm=MD5" in line for line in challenges), challenges


def test_a_wrong_password_is_refused_and_logged(system: PbxSystem, tmp_path: Path) -> None:
    trace = run_baresip(system, tmp_path, "3002", "not-the-password")
    assert "SIP/2.0 200 OK" not in trace, trace[-3000:]
    line = wait_until(lambda: [ln for ln in system.log("front").splitlines()
                               if "auth failure" in ln and "'3002'" in ln], 5,
                      "the failure in front.log")[0]
    assert "from 127.0.0.1:" in line and "wrong response" in line and "baresip" in line
    assert "not-the-password" not in system.log("front")

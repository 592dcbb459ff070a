"""Start-up as the README documents it (issue 11): on a fresh copy of the project,
`make install` then `supervisord -c supervisord.conf` brings the system up (it used to
stop at once: logs/ did not exist); and systemd accepts deploy/systemd/pbx.service.

The copy is the project's files as a clone has them. Its `.venv` links to this run's
venv (its entries, and `.installed` newer than pyproject.toml), so `make install` does
the rest of its work for real without installing packages again."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ROOT, VENV_BIN, free_port, wait_until

VENV = VENV_BIN.parent


def project_copy(dest: Path) -> Path:
    """The files a clone of the project has (tracked, plus new ones not ignored)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    venv = dest / ".venv"
    venv.mkdir()
    for entry in VENV.iterdir():
        if entry.name != ".installed":
            (venv / entry.name).symlink_to(entry)
    (venv / ".installed").touch()
    return dest


@pytest.fixture
def copy(tmp_path: Path) -> Iterator[Path]:
    root = project_copy(tmp_path / "pbx")
    yield root
    pid_file = root / "run" / "supervisord.pid"
    if pid_file.exists():  # supervisord runs: stop it and wait until it is gone
        pid = int(pid_file.read_text())
        subprocess.run([str(VENV_BIN / "supervisorctl"), "-c", str(root / "supervisord.conf"),
                        "shutdown"], capture_output=True, timeout=60)
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), 60, "supervisord to stop")


def test_supervisord_starts_right_after_make_install(copy: Path) -> None:
    assert not (copy / "logs").exists() and not (copy / "run").exists()
    env = {**os.environ, "PBX_MEDIA_WORKERS": "1", "PBX_IVR_EXECUTORS": "1"}
    install = subprocess.run(["make", "install"], cwd=copy, env=env, capture_output=True,
                             text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr

    # The shipped config, on ports free here (the machine runs other systems).
    admin_port = free_port(socket.SOCK_STREAM)
    config = (copy / "config" / "pbx.toml").read_text()
    config = (config.replace('listen = "127.0.0.1:5060"', f'listen = "127.0.0.1:{free_port()}"')
              .replace('listen = "127.0.0.1:8088"', f'listen = "127.0.0.1:{admin_port}"')
              .replace('rtp_ports = "20000-29999"', 'rtp_ports = "19000-19199"'))
    (copy / "test.toml").write_text(config)
    env["PBX_CONFIG"] = str(copy / "test.toml")
    # The programs run the copy's code, as a clone's editable install does (this run's
    # venv is installed from another tree).
    env["PYTHONPATH"] = str(copy)
    start = subprocess.run([str(VENV_BIN / "supervisord"), "-c", "supervisord.conf"],
                           cwd=copy, env=env, capture_output=True, text=True, timeout=60)
    assert start.returncode == 0, start.stdout + start.stderr

    def status() -> str:
        out = subprocess.run([str(VENV_BIN / "supervisorctl"), "-c", "supervisord.conf",
                              "status"], cwd=copy, capture_output=True, text=True, timeout=30)
        return out.stdout

    wait_until(lambda: all(f"{name} " in status() and "RUNNING" in line
                           for name in ("front", "media:media-00", "ivr:ivr-00")
                           for line in status().splitlines() if line.startswith(name)),
               60, "front, media and ivr RUNNING")
    # The pbx command finds supervisord and the front from the project's root; it exits
    # 0 once every program runs and the worker and executor have joined the front.
    def pbx_status() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pbx.cli", "status"], cwd=copy, env=env,
                              capture_output=True, text=True, timeout=30)

    wait_until(lambda: pbx_status().returncode == 0, 60, "pbx status to exit 0")
    out = pbx_status().stdout
    assert "media workers (1):" in out and "IVR executors (1):" in out, out
    assert (copy / "logs" / "supervisord.log").exists() and (copy / "logs" / "front.log").exists()


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` on the unit as shipped, with /opt/pbx standing for a
    directory that has the commands it runs (verify checks they are executables)."""
    install = tmp_path / "opt-pbx"
    (install / ".venv" / "bin").mkdir(parents=True)
    (install / ".venv" / "bin" / "supervisord").symlink_to(VENV_BIN / "supervisord")
    pbx = install / ".venv" / "bin" / "pbx"  # the console script `make install` writes
    pbx.write_text(f"#!/bin/sh\nexec {sys.executable} -m pbx.cli \"$@\"\n")
    pbx.chmod(0o755)
    unit = (ROOT / "deploy" / "systemd" / "pbx.service").read_text()
    assert "/opt/pbx/.venv/bin/supervisord --nodaemon -c /opt/pbx/supervisord.conf" in unit
    (tmp_path / "pbx.service").write_text(unit.replace("/opt/pbx", str(install)))
    out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "pbx.service")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr

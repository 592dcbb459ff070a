"""A provider script started as a real process on a free loopback port, for tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def provider_process(script: Path, start_s: float = 15.0) -> Iterator[str]:
    """Runs `script PORT` and yields its step URL once it accepts connections. Its stderr
    goes to a file (never a pipe, so the provider never blocks on logging), shown in the
    error when it does not start."""
    port = free_tcp_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            deadline = time.monotonic() + start_s
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        log.seek(0)
                        stderr = log.read().decode(errors="replace")
                        raise RuntimeError(f"{script.name} did not start: {stderr}") from None
                    time.sleep(0.05)
            yield f"http://127.0.0.1:{port}/ivr/step"
        finally:
            stop_process(proc)


def stop_process(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace_s`."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace_s)

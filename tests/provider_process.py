"""A provider script started as a real process on a free loopback port, for tests."""

from __future__ import annotations

import socket
import subprocess
import sys
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
def provider_process(script: Path, start_s: float = 10.0) -> Iterator[str]:
    """Runs `script PORT` and yields its step URL once it accepts connections."""
    port = free_tcp_port()
    proc = subprocess.Popen([sys.executable, str(script), str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + start_s
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"{script.name} did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/ivr/step"
    finally:
        proc.terminate()
        proc.wait(timeout=10)

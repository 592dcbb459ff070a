"""The perf scripts against a real system with its default policy: perf/callload.py's
calls must be what they claim, unknown callers of the public IVR (not challenged)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.e2e.harness import ROOT, PbxSystem, Reply, free_port, wait_idle


def prompt(path: str, body: Any) -> Reply:
    if path.endswith(("/start", "/end", "/dtmf-match")):
        return 200, b'{"status":"ok"}', 0.0
    return 200, json.dumps({"type": "prompt", "file": "sounds/menu.wav"}).encode(), 0.0


def test_callload_places_its_calls(system: PbxSystem, tmp_path: Path) -> None:
    system.provider.script = prompt
    result = tmp_path / "callload.json"
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / "perf" / "callload.py"), "-n", "5", "-r", "5",
             "--hold", "2", "--pbx", system.sip_addr, "--sip-port", str(free_port()),
             "--rtp-ports", "30000-30099", "--json", str(result)],
            capture_output=True, text=True, timeout=120, cwd=ROOT)
    finally:
        system.provider.script = system.provider.default_script
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(result.read_text())
    assert summary["final_status"] == {"200": 5}, summary["final_status"]
    assert summary["failures"] == {}, summary["failures"]
    wait_idle(system)

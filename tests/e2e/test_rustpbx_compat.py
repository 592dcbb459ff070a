"""Issue 10 item 4: the upstream document's §6 provider (tests/e2e/doc_provider.py, a
real aiohttp process) runs unmodified against the real system on a route with
`app_params.compat = "rustpbx"`: a wrong key, a timeout and the right key each get
what that provider expects. On a route with the default (the document's event
table) the same provider hangs up on the first wrong key.

The prompts it names are under `sounds/ivr/`: the test's sounds directory holds the
shipped prompts there."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    ROOT,
    PbxSystem,
    ScriptedProvider,
    free_port,
    start_system,
    wait_until,
)
from tests.e2e.ivr_calls import call

RUSTPBX_SERVICE = "*91"
SPEC_SERVICE = "*92"


def _routes(url: str) -> str:
    return f"""
[[routes]]
name = "doc-provider-rustpbx"
to_user = "{RUSTPBX_SERVICE}"
app = "ivr"
app_params = {{ mode = "step", url = "{url}", compat = "rustpbx", retry = {{ max_retries = 1, timeout_ms = 2000 }} }}

[[routes]]
name = "doc-provider-spec"
to_user = "{SPEC_SERVICE}"
app = "ivr"
app_params = {{ mode = "step", url = "{url}", retry = {{ max_retries = 1, timeout_ms = 2000 }} }}
"""


class DocProvider:
    """The §6 provider process and the JSON lines it logs."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port(socket.SOCK_STREAM)
        self.log = workdir / "doc_provider.jsonl"
        self.log.touch()
        self.out = open(workdir / "doc_provider.out", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.doc_provider", str(self.port), str(self.log)],
            cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT)

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                return False

        wait_until(listening, 15, "the §6 provider listening")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ivr/step"

    def entries(self, session_id: str | None = None) -> list[dict[str, Any]]:
        rows = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        return [r for r in rows
                if session_id is None or r["body"].get("session_id") == session_id]

    def steps(self, session_id: str) -> list[tuple[str, dict[str, Any]]]:
        """(event type, the provider's answer) of the session's step requests."""
        return [((r["body"].get("event") or {}).get("type", ""), r["answer"])
                for r in self.entries(session_id) if r["path"] == "/ivr/step"]

    def wait_step(self, session_id: str, event: str, timeout: float) -> dict[str, Any]:
        found = wait_until(lambda: [a for e, a in self.steps(session_id) if e == event],
                           timeout, f"a {event} step of {session_id}")
        answer: dict[str, Any] = found[0]
        return answer

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.out.close()


def _wav_seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


@pytest.fixture(scope="module")
def doc_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PbxSystem, DocProvider]]:
    root = tmp_path_factory.mktemp("compat")
    sounds = root / "sounds"
    shutil.copytree(ROOT / "sounds", sounds, ignore=shutil.ignore_patterns(".tts"))
    (sounds / "ivr").mkdir()
    for name in ("welcome", "menu", "invalid", "timeout"):
        shutil.copy(ROOT / "sounds" / f"{name}.wav", sounds / "ivr" / f"{name}.wav")
    provider = DocProvider(root)
    scripted = ScriptedProvider()
    system = start_system(root, scripted, extra_config=_routes(provider.url),
                          sounds_dir=sounds)
    try:
        yield system, provider
    finally:
        system.stop()
        scripted.close()
        provider.close()


def _session_of(provider: DocProvider, mark: int) -> str:
    rows = wait_until(lambda: [r for r in provider.entries()[mark:]
                               if r["path"] == "/ivr/step"], 15, "the first step")
    return str(rows[0]["body"]["session_id"])


def test_doc_provider_runs_under_rustpbx_compat(
        doc_system: tuple[PbxSystem, DocProvider], workdir: Path) -> None:
    system, provider = doc_system
    sounds = ROOT / "sounds"
    welcome_s = _wav_seconds(sounds / "welcome.wav")
    # Extension 2001's static contact: the transfer's INVITE lands here.
    ext = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    ext.bind(("127.0.0.1", system.extension_ports["2001"]))
    ext.settimeout(15)
    mark = len(provider.entries())
    try:
        with call(system, workdir, RUSTPBX_SERVICE) as caller:
            sid = _session_of(provider, mark)
            # The menu greeting plays after the welcome: a wrong key.
            time.sleep(welcome_s + 1.0)
            caller.send_digits("5")
            answer = provider.wait_step(sid, "dtmf", 10)
            assert answer["type"] == "prompt" and answer["file"] == "sounds/ivr/invalid.wav"
            # Then nothing: the re-sent menu times out (invalid, greeting, 5 s).
            answer = provider.wait_step(sid, "dtmf_timeout", 25)
            assert answer["type"] == "prompt" and answer["file"] == "sounds/ivr/timeout.wav"
            # The right key, during the menu greeting that follows the timeout notice.
            time.sleep(_wav_seconds(sounds / "timeout.wav") + 1.0)
            caller.send_digits("1")
            data, _ = ext.recvfrom(65536)
            assert data.startswith(b"INVITE sip:2001@"), data[:80]
            end = wait_until(lambda: [r for r in provider.entries(sid)
                                      if r["path"] == "/ivr/step/end"], 10, "/end")
            assert end[0]["body"]["reason"] == "Transfer(2001)"
            # What the provider saw, in order: no event it does not handle.
            entries = provider.entries(sid)
            paths = [r["path"] for r in entries]
            assert paths[0] == "/ivr/step/start", paths
            match = [r for r in entries if r["path"] == "/ivr/step/dtmf-match"]
            assert [r["body"]["digit"] for r in match] == ["1"]
            steps = provider.steps(sid)
            assert [e for e, _ in steps] == ["session_start", "dtmf", "dtmf_timeout"]
            assert all(a.get("type") != "hangup" for _, a in steps)
    finally:
        ext.close()


def test_doc_provider_breaks_under_the_document_default(
        doc_system: tuple[PbxSystem, DocProvider], workdir: Path) -> None:
    system, provider = doc_system
    welcome_s = _wav_seconds(ROOT / "sounds" / "welcome.wav")
    mark = len(provider.entries())
    with call(system, workdir, SPEC_SERVICE) as caller:
        sid = _session_of(provider, mark)
        time.sleep(welcome_s + 1.0)
        caller.send_digits("5")
        # The document's event table: dtmf_menu_invalid, which §6 does not handle.
        answer = provider.wait_step(sid, "dtmf_menu_invalid", 10)
        assert answer == {"type": "hangup"}
        caller.wait_ended(15)
    end = wait_until(lambda: [r for r in provider.entries(sid)
                              if r["path"] == "/ivr/step/end"], 10, "/end")
    assert end[0]["body"]["reason"] == "Normal"

"""input_voice end to end (issue 10 item 6, docs/asr.md): a sipp caller whose audio is
espeak-ng saying "yes" and then "two" (a raw µ-law `rtp_stream` the test makes) gets
those words at the provider, as two `input_voice` events.

Once through local pocketsphinx (no `[asr] url`), once through an OpenAI-compatible
HTTP service (`tests.asr_server`, which itself recognises the WAV it is sent, so the
words come from the caller's audio either way). Each system is its own (the `[asr]`
section differs), with one media worker and one executor; the utterances go through
the spool, which is empty afterwards.

Timing: the provider asks for the second utterance when the first is recognised; the
caller says "two" TWO_AT_MS after its stream starts, late enough for that on a loaded
machine, and the second `input_voice` waits up to 12 s for speech to begin.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from media import g711
from tests.asr_server import AsrServer, quiet, spoken
from tests.e2e.harness import (
    PbxSystem,
    Reply,
    ScriptedProvider,
    start_system,
    wait_idle,
    wait_until,
)
from tests.e2e.test_dtmf_sources import caller_scenario, events_of, run_caller

YES_AT_MS = 800
TWO_AT_MS = 7000
STREAM_MS = 11_000


class VoiceScript:
    """input_voice (scene "yesno"), input_voice again, then hang up."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.steps: dict[str, int] = {}

    def __call__(self, path: str, body: Any) -> Reply:
        if path.endswith(("/start", "/end", "/dtmf-match")):
            return 200, b'{"status":"ok"}', 0.0
        with self.lock:
            step = self.steps.get(body.get("session_id", ""), 0)
            self.steps[body.get("session_id", "")] = step + 1
        if step == 0:
            action: dict[str, Any] = {"type": "input_voice", "scene": "yesno",
                                      "timeout_ms": 5000}
        elif step == 1:
            action = {"type": "input_voice", "scene": "digits", "timeout_ms": 12_000}
        else:
            action = {"type": "hangup"}
        return 200, json.dumps(action).encode(), 0.0


def caller_stream(path: Path) -> Path:
    """Raw PCMU: "yes" at YES_AT_MS, "two" at TWO_AT_MS, silence up to STREAM_MS."""
    yes, two = spoken("yes"), spoken("two")
    pcm = np.concatenate([
        quiet(YES_AT_MS), yes, quiet(TWO_AT_MS - YES_AT_MS - len(yes) // 8), two,
    ])
    pcm = np.concatenate([pcm, quiet(STREAM_MS - len(pcm) // 8)])
    path.write_bytes(g711.encode(pcm, "PCMU").tobytes())
    return path


class ThreadedAsrServer:
    """tests.asr_server.AsrServer on its own event loop in a thread."""

    def __init__(self) -> None:
        self.server = AsrServer()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.__aenter__(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.__aexit__(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def asr_system(root: Path, provider: ScriptedProvider, asr_lines: str) -> PbxSystem:
    scenes = '{ yesno = ["yes", "no"], digits = ["one", "two", "three", "four", "five"] }'
    return start_system(root, provider, media_workers=1, executors=1, extra_config=(
        f'\n[asr]\nspool_dir = "{root / "asr"}"\nscenes = {scenes}\n{asr_lines}\n'))


@pytest.fixture(scope="module")
def local_system(tmp_path_factory: pytest.TempPathFactory, provider: ScriptedProvider,
                 ) -> Iterator[PbxSystem]:
    s = asr_system(tmp_path_factory.mktemp("asr-local"), provider, "")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http_asr() -> Iterator[ThreadedAsrServer]:
    server = ThreadedAsrServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def http_system(tmp_path_factory: pytest.TempPathFactory, provider: ScriptedProvider,
                http_asr: ThreadedAsrServer) -> Iterator[PbxSystem]:
    s = asr_system(tmp_path_factory.mktemp("asr-http"), provider,
                   f'url = "{http_asr.server.url}"\napi_key = "sk-e2e"\nlanguage = "en"')
    yield s
    s.stop()


def call_and_listen(system: PbxSystem, workdir: Path, user: str) -> list[dict[str, Any]]:
    system.provider.script = VoiceScript()
    stream = caller_stream(workdir / "voice.ulaw")
    # The stream plays on while sipp waits for the PBX's BYE (after the second word).
    media = f'  <nop><action><exec rtp_stream="{stream},1,0"/></action></nop>\n'

    run_caller(system, workdir, user, caller_scenario(user, media, telephone_event=False))
    wait_idle(system)
    return events_of(system, user)


def assert_heard_yes_then_two(events: list[dict[str, Any]]) -> None:
    assert [e.get("type") for e in events] == ["session_start", "input_voice", "input_voice"], (
        events)
    assert (events[1]["text"], events[2]["text"]) == ("yes", "two"), events
    for e in events[1:]:
        assert 0.0 < e["confidence"] <= 1.0, e


def test_local_pocketsphinx_hears_yes_then_two(local_system: PbxSystem, workdir: Path) -> None:
    events = call_and_listen(local_system, workdir, "7301")
    assert_heard_yes_then_two(events)
    assert list((local_system.root / "asr").iterdir()) == []  # every utterance deleted
    assert "speech recognition: pocketsphinx (local)" in local_system.log("ivr")
    # The call record lists the two utterances: where they went, how they ended.
    path = local_system.root / "logs" / "calls.jsonl"

    def records() -> list[dict[str, Any]]:  # flushed within [logging] jsonl_flush_s
        lines = path.read_text().splitlines() if path.exists() else []
        return [r for r in map(json.loads, lines) if r.get("caller") == "7301"]

    (record,) = wait_until(records, 5, "the call record")
    assert [(r["area"], r["reason"]) for r in record["recordings"]] == [
        ("asr", "speech_end"), ("asr", "speech_end")], record["recordings"]


def test_http_asr_service_hears_yes_then_two(
    http_system: PbxSystem, http_asr: ThreadedAsrServer, workdir: Path,
) -> None:
    events = call_and_listen(http_system, workdir, "7302")
    assert_heard_yes_then_two(events)
    seen = http_asr.server.seen
    assert len(seen) == 2
    for request, prompt in zip(seen, ["yes, no", "one, two, three, four, five"], strict=True):
        assert request.headers["Authorization"] == "Bearer sk-e2e"
        assert request.fields == {"model": "whisper-1", "response_format": "json",
                                  "language": "en", "prompt": prompt}
        assert request.rate == 8000
        # The utterance from just before the word to the silence that ended it: not the
        # seconds of waiting before it (the second one waits about 4 s for "two").
        assert 0.3 * 8000 < request.frames < 2.0 * 8000, request.frames
    assert list((http_system.root / "asr").iterdir()) == []

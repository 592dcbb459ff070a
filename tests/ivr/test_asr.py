"""Speech recognition (pbx.asr, docs/asr.md): the OpenAI-compatible HTTP contract against
a real aiohttp server, local pocketsphinx on espeak-ng speech, the engine's budgets
(timeouts, concurrency, file size), the spool (every file deleted, stale ones swept),
and input_voice through the executor shell (handle_event)."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pbx import asr as asr_module
from pbx.asr import (
    ASR_UNAVAILABLE,
    MAX_RESPONSE_BYTES,
    AsrEngine,
    AsrError,
    decode_local,
    grammar,
    parse_transcription,
)
from pbx.config import ConfigError, load_config
from pbx.ivr.provider import ProviderClient
from pbx.ivr.requests import AsrResult, ProviderRequest
from pbx.messages import (
    IvrEvent,
    MediaInput,
    RecordCommand,
    RecordingFinished,
    SessionStartInput,
)
from pbx.settings.speech import AsrSettings
from tests.asr_server import AsrServer, quiet, spoken, utterance_wav
from tests.ivr.test_ivr_executor_actions import Server, call_info, json_response
from workers.ivr import handle_event

PARAMS = call_info("http://provider.test/ivr/step").params
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def engine(tmp_path: Path, **kw: Any) -> AsrEngine:
    local = kw.pop("local", False)
    settings = AsrSettings(spool_dir=str(tmp_path / "spool"), **kw)
    (tmp_path / "spool").mkdir(exist_ok=True)
    return AsrEngine(settings, local=local)


def put(tmp_path: Path, name: str, wav: bytes) -> str:
    (tmp_path / "spool" / name).write_bytes(wav)
    return name


def recognize(name: str, reason: str = "speech_end", scene: str = "order",
              speech_start_ms: int | None = None) -> ProviderRequest:
    body = {"stage": "recognize", "file": name, "reason": reason, "scene": scene,
            "duration_ms": 1000, "speech_start_ms": speech_start_ms}
    return ProviderRequest("asr", "", body, PARAMS)


CHECK = ProviderRequest("asr", "", {"stage": "check"}, PARAMS)


@pytest.fixture(scope="module")
def yes_wav() -> bytes:
    return utterance_wav(quiet(300), spoken("yes"), quiet(300))


@pytest.fixture(scope="module")
def two_wav() -> bytes:
    return utterance_wav(quiet(300), spoken("two"), quiet(300))


# ---------------------------------------------------------------- the HTTP answer (pure)


@pytest.mark.parametrize("body,expected", [
    (b'{"text": " yes  please "}', ("yes please", 1.0)),
    (b'{"text": "two", "confidence": 0.42}', ("two", 0.42)),
    (b'{"text": "two", "confidence": 7}', ("two", 1.0)),
    (b'{"text": "two", "confidence": true}', ("two", 1.0)),
    (b'{"text": "no", "segments": [{"avg_logprob": -0.5}, {"avg_logprob": -1.5}]}',
     ("no", math.exp(-1.0))),
    (b'{"text": ""}', ("", 1.0)),
])
def test_transcription_answers(body: bytes, expected: tuple[str, float]) -> None:
    text, confidence = parse_transcription(200, body)
    assert text == expected[0] and confidence == pytest.approx(expected[1])


@pytest.mark.parametrize("status,body,reason", [
    (500, b"upstream down", "ASR service answered HTTP 500: upstream down"),
    (401, b"", "ASR service answered HTTP 401"),
    (200, b"<html>", "ASR service answer is not JSON"),
    (200, b'["yes"]', 'ASR service answer has no "text" string'),
    (200, b'{"text": 5}', 'ASR service answer has no "text" string'),
])
def test_bad_transcription_answers_say_why(status: int, body: bytes, reason: str) -> None:
    with pytest.raises(AsrError) as err:
        parse_transcription(status, body)
    assert str(err.value) == reason


# ---------------------------------------------------------------- the HTTP contract


def test_the_request_is_the_openai_transcription_shape(tmp_path: Path, yes_wav: bytes) -> None:
    async def main() -> None:
        async with AsrServer(confidence=0.9) as server:
            asr = engine(tmp_path, url=server.url, api_key="sk-test", model="whisper-1",
                         language="en", scenes={"order": ["yes", "no"]})
            try:
                assert await asr.perform(CHECK) == AsrResult()
                result = await asr.perform(recognize(put(tmp_path, "s_1.wav", yes_wav)))
            finally:
                await asr.close()
        assert result == AsrResult(text="yes", confidence=0.9, source="http")
        (seen,) = server.seen
        assert seen.headers["Authorization"] == "Bearer sk-test"
        assert seen.headers["Content-Type"].startswith("multipart/form-data")
        assert seen.fields == {"model": "whisper-1", "response_format": "json",
                               "language": "en", "prompt": "yes, no"}
        assert (seen.filename, seen.content_type) == ("utterance.wav", "audio/wav")
        assert seen.rate == 8000 and seen.frames == len(yes_wav[44:]) // 2

    run(main())
    assert list((tmp_path / "spool").iterdir()) == []  # the utterance is deleted


def test_no_key_no_language_no_scene_vocabulary_leave_their_fields_out(
    tmp_path: Path, two_wav: bytes,
) -> None:
    async def main() -> None:
        async with AsrServer() as server:
            asr = engine(tmp_path, url=server.url)
            try:
                result = await asr.perform(recognize(put(tmp_path, "s_2.wav", two_wav)))
            finally:
                await asr.close()
        assert result.text == "two" and result.confidence == 1.0  # no score given
        (seen,) = server.seen
        assert "Authorization" not in seen.headers
        assert seen.fields == {"model": "whisper-1", "response_format": "json"}

    run(main())


def test_the_wait_before_the_speech_is_not_sent(tmp_path: Path) -> None:
    """The service gets the utterance from LEAD_MS (300 ms) before the speech began."""
    waited = utterance_wav(quiet(3000), spoken("yes"), quiet(300))

    async def main() -> tuple[AsrResult, int]:
        async with AsrServer() as server:
            asr = engine(tmp_path, url=server.url)
            try:
                result = await asr.perform(recognize(put(tmp_path, "s_0.wav", waited),
                                                     speech_start_ms=3020))
            finally:
                await asr.close()
        return result, server.seen[0].frames

    result, frames = run(main())
    assert result.text == "yes"
    assert frames == (len(waited) - 44) // 2 - 8 * 2720


@pytest.mark.parametrize("server_kw,reason", [
    ({"canned": (503, {"error": "overloaded"})}, 'ASR service answered HTTP 503: {"error"'),
    ({"raw_body": b"yes"}, "ASR service answer is not JSON"),
    ({"raw_body": b" " * (MAX_RESPONSE_BYTES + 10)},
     f"ASR service answer larger than {MAX_RESPONSE_BYTES} bytes"),
    ({"delay_s": 2.0}, "ASR service timed out after 300 ms"),
])
def test_a_failing_service_is_an_error_naming_why(
    tmp_path: Path, yes_wav: bytes, server_kw: dict[str, Any], reason: str,
) -> None:
    async def main() -> AsrResult:
        async with AsrServer(**server_kw) as server:
            asr = engine(tmp_path, url=server.url, timeout_ms=300)
            try:
                started = time.monotonic()
                result = await asr.perform(recognize(put(tmp_path, "s_3.wav", yes_wav)))
                assert time.monotonic() - started < 1.9  # the timeout, not the server
                return result
            finally:
                await asr.close()

    result = run(main())
    assert result.error is not None and result.error.startswith(reason), result
    assert list((tmp_path / "spool").iterdir()) == []


def test_an_unreachable_service_is_an_error(tmp_path: Path, yes_wav: bytes) -> None:
    async def main() -> AsrResult:
        asr = engine(tmp_path, url="http://127.0.0.1:9/v1/audio/transcriptions")
        try:
            return await asr.perform(recognize(put(tmp_path, "s_4.wav", yes_wav)))
        finally:
            await asr.close()

    result = run(main())
    assert result.error is not None and result.error.startswith("ASR service unreachable")


def test_recognitions_wait_for_a_slot_within_their_timeout(
    tmp_path: Path, yes_wav: bytes,
) -> None:
    async def main() -> tuple[AsrResult, AsrResult]:
        async with AsrServer(canned=(200, {"text": "yes"})) as server:
            asr = engine(tmp_path, url=server.url, timeout_ms=300, max_concurrent=1)
            try:
                await asr._slots.acquire()  # noqa: SLF001  (a recognition running)
                busy = await asr.perform(recognize(put(tmp_path, "s_5.wav", yes_wav)))
                asr._slots.release()  # noqa: SLF001
                free = await asr.perform(recognize(put(tmp_path, "s_6.wav", yes_wav)))
                return busy, free
            finally:
                await asr.close()

    busy, free = run(main())
    assert busy.error == "ASR failed: busy (1 recognitions running)"
    assert free.text == "yes" and len(list((tmp_path / "spool").iterdir())) == 0


# ---------------------------------------------------------------- local pocketsphinx


@pytest.mark.parametrize("word", ["yes", "two"])
def test_pocketsphinx_hears_espeak_words_over_the_phone_line(word: str) -> None:
    text, confidence = decode_local(utterance_wav(quiet(300), spoken(word), quiet(300)),
                                    tuple(AsrSettings().vocabulary))
    assert text == word
    assert 0.0 < confidence <= 1.0


def test_a_scene_vocabulary_is_what_the_local_recogniser_listens_for() -> None:
    wav = utterance_wav(quiet(300), spoken("billing"), quiet(300))
    assert decode_local(wav, ("sales", "billing", "support"))[0] == "billing"
    assert grammar(["no", "yes", "no"]) == (
        "#JSGF V1.0;\ngrammar asr;\npublic <utterance> = no | yes;\n")


def test_one_decoder_keeps_a_bounded_number_of_vocabularies() -> None:
    """Each scene's phrases are a search of the child's one decoder (one acoustic model in
    memory), the oldest dropped past MAX_SEARCHES."""
    wav = utterance_wav(quiet(300), spoken("two"), quiet(300))
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    for i in range(asr_module.MAX_SEARCHES + 6):
        decode_local(wav, (*words, f"{words[i % 10]} {words[i // 10]}"))
    assert len(asr_module._searches) == asr_module.MAX_SEARCHES  # noqa: SLF001
    assert decode_local(wav, ("one", "two", "three"))[0] == "two"
    assert decode_local(wav, None)[0] != ""  # free dictation still there


def test_silence_is_no_text() -> None:
    assert decode_local(utterance_wav(quiet(1000)), ("yes", "no")) == ("", 0.0)


def test_the_engine_recognises_locally_in_a_child_process(
    tmp_path: Path, yes_wav: bytes, two_wav: bytes,
) -> None:
    async def main() -> list[AsrResult]:
        asr = engine(tmp_path, local=True)
        try:
            assert asr.available and await asr.perform(CHECK) == AsrResult()
            first = await asr.perform(recognize(put(tmp_path, "s_7.wav", yes_wav), scene="x"))
            pid = next(iter(asr._pool._processes)) if asr._pool else None  # noqa: SLF001
            second = await asr.perform(recognize(put(tmp_path, "s_8.wav", two_wav)))
            assert pid is not None and pid != os.getpid()
            return [first, second]
        finally:
            await asr.close()

    first, second = run(main())
    assert (first.text, first.source) == ("yes", "pocketsphinx")
    assert (second.text, second.source) == ("two", "pocketsphinx")
    assert list((tmp_path / "spool").iterdir()) == []


def test_a_local_decode_past_its_budget_is_killed(tmp_path: Path, yes_wav: bytes) -> None:
    async def main() -> tuple[AsrResult, AsrResult]:
        asr = engine(tmp_path, local=True, local_timeout_ms=1)
        try:
            late = await asr.perform(recognize(put(tmp_path, "s_9.wav", yes_wav)))
            assert asr._pool is None  # noqa: SLF001  (the children were killed)
            asr.settings = asr.settings.model_copy(update={"local_timeout_ms": 30_000})
            again = await asr.perform(recognize(put(tmp_path, "s_10.wav", yes_wav)))
            return late, again
        finally:
            await asr.close()

    late, again = run(main())
    assert late.error == "local recognition took longer than 100 ms"  # the least it gets
    assert again.text == "yes"  # a new pool on the next use


# ---------------------------------------------------------------- the engine's edges


def test_no_recogniser_is_unavailable(tmp_path: Path, yes_wav: bytes) -> None:
    asr = engine(tmp_path, local=False)
    assert not asr.available
    assert run(asr.perform(CHECK)) == AsrResult(error=ASR_UNAVAILABLE)
    assert run(asr.perform(recognize(put(tmp_path, "s_11.wav", yes_wav)))) == AsrResult(
        error=ASR_UNAVAILABLE)
    assert list((tmp_path / "spool").iterdir()) == []


def test_nobody_speaking_is_empty_text_without_recognition(tmp_path: Path) -> None:
    asr = engine(tmp_path, url="http://127.0.0.1:9/never-called")
    name = put(tmp_path, "s_12.wav", utterance_wav(quiet(500)))
    assert run(asr.perform(recognize(name, reason="no_speech"))) == AsrResult(source="none")
    assert list((tmp_path / "spool").iterdir()) == []


@pytest.mark.parametrize("name", ["../pbx.toml", "/etc/passwd", "a/b.wav", ".hidden.wav",
                                  "x.txt", ""])
def test_only_spool_file_names_are_read(tmp_path: Path, name: str) -> None:
    asr = engine(tmp_path, local=True)
    result = run(asr.perform(recognize(name)))
    assert result.error == f"ASR failed: bad utterance name {name!r}"


def test_a_missing_or_oversized_utterance_is_an_error(tmp_path: Path) -> None:
    asr = engine(tmp_path, local=True)
    assert run(asr.perform(recognize("gone.wav"))).error == (
        "ASR failed: the utterance file is gone")
    put(tmp_path, "big.wav", b"\0" * (8 << 20) + b"x")
    assert run(asr.perform(recognize("big.wav"))).error == (
        f"ASR failed: utterance larger than {8 << 20} bytes")
    assert list((tmp_path / "spool").iterdir()) == []


def test_the_sweep_deletes_only_stale_utterances(tmp_path: Path) -> None:
    asr = engine(tmp_path, spool_max_age_s=300)
    old, new = tmp_path / "spool" / "old.wav", tmp_path / "spool" / "new.wav"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    os.utime(old, (time.time() - 301, time.time() - 301))
    assert asr.sweep_spool() == 1
    assert [p.name for p in (tmp_path / "spool").iterdir()] == ["new.wav"]
    settings = AsrSettings(spool_dir=str(tmp_path / "no-spool-yet"))
    assert AsrEngine(settings, local=False).sweep_spool() == 0


@pytest.mark.parametrize("toml,key", [
    ('[asr]\nurl = "ftp://x"\n', "asr.url"),
    ('[asr]\nvocabulary = ["Yes"]\n', "asr.vocabulary"),
    ('[asr]\nscenes = { order = ["yes;no"] }\n', "asr.scenes"),
    ('[asr]\nscenes = { order = [] }\n', "asr.scenes"),
    ("[asr]\nmax_concurrent = 0\n", "asr.max_concurrent"),
    ("[asr]\nend_silence_ms = 50\n", "asr.end_silence_ms"),
])
def test_bad_asr_settings_stop_start_up_naming_the_key(
    tmp_path: Path, toml: str, key: str,
) -> None:
    path = tmp_path / "pbx.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(path) in str(err.value) and key in str(err.value)


# ---------------------------------------------------------------- through the executor


def test_input_voice_through_the_executor_shell(tmp_path: Path, two_wav: bytes) -> None:
    """handle_event: the check and the listening command in one reply; the capture's
    end in the next, recognised over HTTP before the provider hears the text."""
    steps: list[dict[str, Any]] = []

    async def provider(request: Any) -> Any:
        body = await request.json()
        if request.path.endswith("/step"):
            steps.append(body["event"])
            if len(steps) == 1:
                return json_response({"type": "input_voice", "scene": "order",
                                      "timeout_ms": 4000})
            return json_response({"type": "hangup"})
        return json_response({})

    async def main() -> None:
        async with Server(provider) as prov, AsrServer() as asr_server:
            call = call_info(prov.base + "/ivr/step")
            client = ProviderClient()
            asr = engine(tmp_path, url=asr_server.url)
            try:
                reply = await handle_event(
                    IvrEvent(session_id="s", seq=1, input=SessionStartInput(call=call)),
                    client, time.time, asr=asr)
                (listen,) = reply.commands
                assert isinstance(listen, RecordCommand) and listen.listen_ms == 4000
                put(tmp_path, listen.path, two_wav)
                done = RecordingFinished(record_id=listen.record_id, path=listen.path,
                                         duration_ms=1200, reason="speech_end")
                reply = await handle_event(
                    IvrEvent(session_id="s", seq=2, state=reply.state,
                             input=MediaInput(event=done)), client, time.time, asr=asr)
                assert reply.done
            finally:
                await asr.close()
                await client.close()

    run(main())
    assert steps[1]["type"] == "input_voice" and steps[1]["text"] == "two"
    assert list((tmp_path / "spool").iterdir()) == []


def test_the_startup_log_line_names_the_recogniser_without_credentials(tmp_path: Path) -> None:
    with_password = engine(tmp_path, url="https://user:hunter2@asr.example/v1/audio/transcriptions")
    assert "hunter2" not in with_password.describe()
    assert "asr.example" in with_password.describe()
    assert engine(tmp_path, local=True).describe() == "pocketsphinx (local)"
    assert engine(tmp_path, local=False).describe() == (
        "not available (no [asr] url, no pocketsphinx)")


_POOL_HOLDER = """
import os, sys, time
from pbx.asr import AsrEngine
from pbx.settings.speech import AsrSettings
engine = AsrEngine(AsrSettings(spool_dir=sys.argv[1], max_concurrent=2), local=False)
pool = engine._local_pool()
print(" ".join(str(pool.submit(os.getpid).result(timeout=60)) for _ in range(4)), flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has already ended


def test_recogniser_children_end_with_a_killed_executor(tmp_path: Path) -> None:
    """The local recogniser pool's children go when their executor is SIGKILLed (by
    supervisord, or the OOM killer): before, they stayed, re-parented to init."""
    (tmp_path / "spool").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _POOL_HOLDER, str(tmp_path / "spool")],
                              stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    children: set[int] = set()
    try:
        assert holder.stdout is not None
        children = {int(pid) for pid in holder.stdout.readline().split()}
        assert children and holder.pid not in children
        assert all(_alive(pid) for pid in children)
        holder.kill()
        holder.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [pid for pid in children if _alive(pid)]
    finally:
        holder.kill()
        for pid in children:
            if _alive(pid):
                os.kill(pid, 9)
    assert not left, f"recogniser children outlived their executor: {left}"

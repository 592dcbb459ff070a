"""Text to speech (pbx.tts): the resampler and WAV decoding, the engine's source order
(HTTP service → espeak-ng → error) against a fake aiohttp TTS server and the real
espeak-ng, the cache, and `tts_text` through the executor shell (handle_event)."""

from __future__ import annotations

import asyncio
import io
import shutil
import struct
import wave
from pathlib import Path

import numpy as np
import orjson
import pytest
from aiohttp import web

from pbx.ivr.provider import ProviderClient
from pbx.ivr.requests import TtsResult
from pbx.messages import AudioComplete, IvrEvent, MediaInput, PlayCommand, SessionStartInput
from pbx.settings.speech import TtsSettings
from pbx.tts import (
    TTS_UNAVAILABLE,
    TtsEngine,
    TtsError,
    cache_name,
    convert,
    decode_wav,
    resample,
)
from tests.ivr.test_ivr_executor_actions import Server, call_info, json_response, run
from workers.ivr import handle_event

ESPEAK = shutil.which("espeak-ng")
# make test installs espeak-ng (make tools): its absence fails these tests, never skips them.
needs_espeak = pytest.mark.usefixtures("espeak_installed")


@pytest.fixture
def espeak_installed() -> None:
    assert ESPEAK is not None, "espeak-ng is not installed (make tools)"


def tone(freq: float, rate: int, secs: float = 1.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * secs)) / rate
    return amp * np.sin(2 * np.pi * freq * t)


def level_db(y: np.ndarray) -> float:
    core = y[len(y) // 8 : -len(y) // 8]
    return float(20 * np.log10(np.sqrt(2 * np.mean(core**2)) + 1e-15))


def wav_bytes(samples: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> bytes:
    frames = np.repeat(samples[:, None], channels, axis=1).reshape(-1)
    if width == 1:
        raw = np.clip(np.round(frames * 127 + 128), 0, 255).astype(np.uint8).tobytes()
    else:
        raw = np.round(frames * 32767).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return buf.getvalue()


def read_out(path: Path) -> tuple[np.ndarray, tuple[int, int, int]]:
    with wave.open(str(path), "rb") as w:
        params = (w.getframerate(), w.getnchannels(), w.getsampwidth())
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    return pcm, params


# ---------------------------------------------------------------- resampler, WAV


@pytest.mark.parametrize("rate", [22050, 16000, 24000, 44100, 48000, 11025])
def test_resample_to_8k_passes_the_band_and_rejects_aliases(rate: int) -> None:
    for freq in (300.0, 1000.0, 3000.0, 3400.0):
        y = resample(tone(freq, rate, amp=1.0), rate, 8000)
        assert abs(level_db(y)) < 0.05, (rate, freq)
    for freq in (4500.0, 5000.0, 7000.0):
        if freq < rate / 2:
            assert level_db(resample(tone(freq, rate, amp=1.0), rate, 8000)) < -75, (rate, freq)


def test_resample_length_and_alignment() -> None:
    x = np.zeros(22050)
    x[11025] = 1.0
    y = resample(x, 22050, 8000)
    assert len(y) == 8000
    assert int(np.argmax(y)) == 4000  # input time 0.5 s is output sample 4000
    assert len(resample(np.zeros(1000), 22050, 8000)) == 363  # ceil(1000 * 160 / 441)
    same = np.arange(5.0)
    assert np.array_equal(resample(same, 8000, 8000), same)


def test_decode_wav_formats() -> None:
    x = tone(440, 16000, 0.1)
    for channels, width in ((1, 2), (2, 2), (1, 1)):
        samples, rate = decode_wav(wav_bytes(x, 16000, channels, width))
        assert rate == 16000 and len(samples) == len(x)
        assert np.max(np.abs(samples - x)) < (0.02 if width == 1 else 1e-4)
    # WAVE_FORMAT_EXTENSIBLE, 32-bit float, stereo, data size unknown (streamed).
    pcm = np.stack([x, x], axis=1).astype("<f4").tobytes()
    guid_float = struct.pack("<H", 3) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 2, 16000, 16000 * 8, 8, 32, 22, 32, 3) + guid_float
    data = (
        b"RIFF" + struct.pack("<I", 0) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"LIST" + struct.pack("<I", 3) + b"abc\x00"  # odd-sized chunk, padded
        + b"data" + struct.pack("<I", 0xFFFFFFFF) + pcm
    )  # fmt: skip
    samples, rate = decode_wav(data)
    assert rate == 16000 and np.max(np.abs(samples - x)) < 1e-6
    # 24-bit PCM
    ints = np.round(x * (2**23 - 1)).astype("<i4")
    raw24 = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints)
    fmt24 = struct.pack("<HHIIHH", 1, 1, 16000, 48000, 3, 24)
    data24 = (
        b"RIFF" + struct.pack("<I", 0) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt24
        + b"data" + struct.pack("<I", len(raw24)) + raw24
    )  # fmt: skip
    samples, _ = decode_wav(data24)
    assert np.max(np.abs(samples - x)) < 1e-6
    for bad in (b"", b"<html>nope</html>", b"RIFF\x00\x00\x00\x00WAVEdata\x00\x00\x00\x00"):
        with pytest.raises(TtsError):
            decode_wav(bad)


def test_convert_gives_8k_mono_16_bit_at_minus_3_dbfs(tmp_path: Path) -> None:
    out = tmp_path / "x.wav"
    out.write_bytes(convert(wav_bytes(tone(1000, 22050, amp=0.2), 22050, channels=2)))
    pcm, params = read_out(out)
    assert params == (8000, 1, 2) and len(pcm) == 8000
    assert abs(int(np.max(np.abs(pcm))) - round(32767 * 10 ** (-3 / 20))) < 40


def test_cache_name_depends_on_text_and_voice() -> None:
    assert cache_name("a", "en-us") != cache_name("a", "en-gb") != cache_name("b", "en-gb")
    assert cache_name("a", "en-us") == cache_name("a", "en-us")
    assert len(cache_name("a", "v")) == 36 and cache_name("a", "v").endswith(".wav")


# ---------------------------------------------------------------- the engine


def engine(tmp_path: Path, url: str | None = None, espeak: str | bool | None = None) -> TtsEngine:
    sounds = tmp_path / "sounds"
    settings = TtsSettings(url=url, cache_dir=str(sounds / ".tts"), timeout_ms=3000)
    return TtsEngine(settings, sounds, espeak=espeak)


def tts_server(calls: list[dict], status: int = 200, delay_s: float = 0.0) -> Server:
    async def handler(request: web.Request) -> web.Response:
        calls.append(orjson.loads(await request.read()))
        await asyncio.sleep(delay_s)
        if status != 200:
            return json_response({"error": "down"}, status=status)
        return web.Response(body=wav_bytes(tone(500, 16000, 0.5), 16000, 2), content_type="audio/wav")

    return Server(handler)


def test_http_service_first_then_cached(tmp_path: Path) -> None:
    calls: list[dict] = []

    async def main() -> None:
        async with tts_server(calls, delay_s=0.1) as server:
            tts = engine(tmp_path, server.base + "/tts", espeak=ESPEAK)
            try:
                first, twin = await asyncio.gather(
                    tts.synthesize("Hello there", "en-x"), tts.synthesize("Hello there", "en-x")
                )
                again = await tts.synthesize("Hello there", "en-x")
            finally:
                await tts.close()
        assert first == twin
        assert first.file == ".tts/" + cache_name("Hello there", "en-x")
        assert first.source == "http" and again.source == "cache" and again.file == first.file
        assert calls == [{"text": "Hello there", "voice": "en-x"}]  # one call for all three
        pcm, params = read_out(tmp_path / "sounds" / first.file)
        assert params == (8000, 1, 2) and len(pcm) == 4000
        assert [p.name for p in (tmp_path / "sounds" / ".tts").iterdir()] == [
            cache_name("Hello there", "en-x")
        ]  # no temporary files left

    run(main())


@needs_espeak
def test_http_failure_falls_back_to_espeak(tmp_path: Path) -> None:
    calls: list[dict] = []

    async def main() -> None:
        async with tts_server(calls, status=503) as server:
            tts = engine(tmp_path, server.base + "/tts", espeak=ESPEAK)
            try:
                result = await tts.synthesize("Fallback", None)
            finally:
                await tts.close()
        assert calls == [{"text": "Fallback", "voice": "en-us"}]  # the configured voice
        assert result.source == "espeak-ng" and result.file is not None

    run(main())


@needs_espeak
def test_espeak_when_no_service(tmp_path: Path) -> None:
    async def main() -> None:
        tts = engine(tmp_path, espeak=True)
        result = await tts.synthesize("Your balance is 12 dollars and 34 cents.", "en-us")
        assert result.source == "espeak-ng" and result.error is None
        assert result.file is not None
        pcm, params = read_out(tmp_path / "sounds" / result.file)
        assert params == (8000, 1, 2)
        assert 1.0 < len(pcm) / 8000 < 6.0
        assert int(np.max(np.abs(pcm))) > 20000  # normalised, not silence
        # Text starting with a dash is text, not an option.
        assert (await tts.synthesize("-v nonsense", None)).source == "espeak-ng"

    run(main())


@needs_espeak
def test_espeak_failure_is_reported(tmp_path: Path) -> None:
    async def main() -> None:
        tts = engine(tmp_path, espeak=True)
        bad = await tts.synthesize("hello", "nosuchvoice")
        assert bad.file is None and bad.error is not None
        assert bad.error.startswith("TTS failed: espeak-ng: exit 1")
        assert (await tts.synthesize("hello", "--help")).error == (
            "TTS failed: espeak-ng: invalid voice '--help'"
        )

    run(main())


def test_neither_service_nor_espeak_is_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        tts = engine(tmp_path, espeak=None)
        assert not tts.available
        assert await tts.synthesize("hello") == TtsResult(error=TTS_UNAVAILABLE)

    run(main())


def test_service_and_espeak_both_failing(tmp_path: Path) -> None:
    calls: list[dict] = []

    async def main() -> None:
        async with tts_server(calls, status=500) as server:
            tts = engine(tmp_path, server.base + "/tts", espeak="/nonexistent/espeak-ng")
            try:
                result = await tts.synthesize("x")
            finally:
                await tts.close()
        assert result.error is not None
        assert result.error.startswith("TTS failed: service: HTTP 500; espeak-ng: ")

    run(main())


def test_bad_audio_from_the_service_is_a_failure(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="<html>busy</html>")

    async def main() -> None:
        async with Server(handler) as server:
            tts = engine(tmp_path, server.base + "/tts", espeak=None)
            try:
                result = await tts.synthesize("x")
            finally:
                await tts.close()
        assert result.error == "TTS failed: service: not a WAV file"

    run(main())


def test_text_limits_and_cache_dir_outside_sounds(tmp_path: Path) -> None:
    async def main() -> None:
        tts = engine(tmp_path, espeak=None)
        assert (await tts.synthesize("   ")).error == "TTS failed: empty text"
        assert "longer than" in ((await tts.synthesize("x" * 5000)).error or "")
        outside = TtsEngine(
            TtsSettings(cache_dir=str(tmp_path / "elsewhere")), tmp_path / "sounds", espeak=ESPEAK
        )
        result = await outside.synthesize("hello")
        assert result.error is not None and "not inside the sounds directory" in result.error

    run(main())


def test_cached_file_is_used_without_any_source(tmp_path: Path) -> None:
    async def main() -> None:
        cache = tmp_path / "sounds" / ".tts"
        cache.mkdir(parents=True)
        (cache / cache_name("cached", "en-us")).write_bytes(convert(wav_bytes(tone(1, 8000), 8000)))
        tts = engine(tmp_path, espeak=None)
        result = await tts.synthesize("cached")
        assert result.source == "cache" and result.file == ".tts/" + cache_name("cached", "en-us")

    run(main())


# ---------------------------------------------------------------- through the executor


def test_executor_tts_prompt_and_fallback_to_error(tmp_path: Path) -> None:
    tts_calls: list[dict] = []

    async def provider(request: web.Request) -> web.Response:
        if request.path != "/ivr/step":
            return json_response({"status": "ok"})
        event = orjson.loads(await request.read())["event"]
        if event["type"] == "session_start":
            return json_response({"type": "prompt", "tts_text": "Hi $caller$"})
        if event["type"] == "error":
            return json_response({"type": "hangup", "prompt": "sounds/error.wav"})
        return json_response({"type": "hangup"})

    async def main() -> None:
        async with Server(provider) as prov, tts_server(tts_calls) as tts_http:
            tts = engine(tmp_path, tts_http.base + "/tts", espeak=None)
            async with ProviderClient() as client:
                start = IvrEvent(
                    session_id="s1",
                    seq=1,
                    input=SessionStartInput(call=call_info(prov.base + "/ivr/step")),
                )
                reply = await handle_event(start, client, lambda: 1.0, None, tts)
                name = ".tts/" + cache_name("Hi 1001", "en-us")
                assert reply.commands == [PlayCommand(play_id=1, file=name)]
                assert (tmp_path / "sounds" / name).is_file()  # there before the reply
                assert tts_calls == [{"text": "Hi 1001", "voice": "en-us"}]
                done = IvrEvent(
                    session_id="s1",
                    seq=2,
                    state=reply.state,
                    input=MediaInput(event=AudioComplete(play_id=1)),
                )
                reply = await handle_event(done, client, lambda: 2.0, None, tts)
                assert reply.done
                # No engine at all: the provider gets the error event.
                reply = await handle_event(start, client, lambda: 3.0, None, None)
                assert reply.commands == [PlayCommand(play_id=1, file="sounds/error.wav")]
            await tts.close()
            events = [s["event"] for s in prov.json("/ivr/step")]
            assert events[-1] == {"type": "error", "reason": TTS_UNAVAILABLE}

    run(main())

"""An OpenAI-compatible transcription endpoint for tests (`POST /v1/audio/transcriptions`,
docs/asr.md): checks the request as the contract says and answers `{"text": ...}`.

The text is what `pbx.asr.decode_local` (pocketsphinx) hears in the uploaded WAV, over
the phrases of the form's `prompt` (else the default vocabulary), so an end-to-end test
through it checks real audio, not a canned answer. `canned` replaces that with a fixed
answer (status, JSON body) for the contract's error cases.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import wave
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from aiohttp import BodyPartReader, web

from media import g711
from pbx.asr import decode_local
from pbx.settings.speech import DEFAULT_ASR_VOCABULARY
from pbx.tts import convert

PATH = "/v1/audio/transcriptions"


@dataclass
class Seen:
    """One request as the server understood it."""

    headers: dict[str, str]
    fields: dict[str, str]
    filename: str
    content_type: str
    rate: int
    frames: int


@dataclass
class AsrServer:
    canned: tuple[int, Any] | None = None  # (status, JSON body) instead of recognising
    delay_s: float = 0.0
    raw_body: bytes | None = None  # sent as it is (not JSON) when set
    confidence: float | None = None  # added to the answer when set
    seen: list[Seen] = field(default_factory=list)
    runner: web.AppRunner | None = None
    base: str = ""

    @property
    def url(self) -> str:
        return self.base + PATH

    async def transcribe(self, request: web.Request) -> web.StreamResponse:
        reader = await request.multipart()
        fields: dict[str, str] = {}
        wav = b""
        filename = content_type = ""
        while (part := await reader.next()) is not None:
            assert isinstance(part, BodyPartReader)
            if part.name == "file":
                filename = part.filename or ""
                content_type = part.headers.get("Content-Type", "")
                wav = bytes(await part.read())
            else:
                fields[str(part.name)] = await part.text()
        with wave.open(io.BytesIO(wav)) as w:  # the contract: a WAV file
            rate, frames = w.getframerate(), w.getnframes()
        self.seen.append(Seen(dict(request.headers), fields, filename, content_type, rate, frames))
        await asyncio.sleep(self.delay_s)
        if self.raw_body is not None:
            return web.Response(body=self.raw_body, content_type="text/plain")
        if self.canned is not None:
            status, body = self.canned
            return web.json_response(body, status=status)
        if "model" not in fields:
            return web.json_response({"error": {"message": "model is required"}}, status=400)
        prompt = fields.get("prompt")
        phrases = tuple(p.strip() for p in prompt.split(",")) if prompt else DEFAULT_ASR_VOCABULARY
        loop = asyncio.get_running_loop()
        text, confidence = await loop.run_in_executor(None, decode_local, wav, phrases)
        answer: dict[str, Any] = {"text": text}
        if self.confidence is not None:
            answer["confidence"] = self.confidence
        return web.json_response(answer)

    async def __aenter__(self) -> AsrServer:
        app = web.Application(client_max_size=16 << 20)
        app.router.add_post(PATH, self.transcribe)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def spoken(text: str, voice: str = "en-us") -> np.ndarray:
    """`text` said by espeak-ng, as the phone line carries it: 8 kHz int16, peak at
    -3 dBFS, through G.711 µ-law and back."""
    espeak = shutil.which("espeak-ng")
    assert espeak is not None, "espeak-ng is not installed (make tools)"
    out = subprocess.run([espeak, "-v", voice, "--stdout", text], capture_output=True,
                         check=True, timeout=30).stdout
    with wave.open(io.BytesIO(convert(out))) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return g711.decode(g711.encode(pcm, "PCMU"), "PCMU")


def utterance_wav(*parts: np.ndarray) -> bytes:
    """A 16-bit 8 kHz mono WAV, as the media worker writes an utterance."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.concatenate(parts).astype("<i2").tobytes())
    return buf.getvalue()


def quiet(ms: int) -> np.ndarray:
    return np.zeros(8 * ms, dtype=np.int16)

"""What the executor reads from HTTP servers it does not control is bounded: the
provider's step answers, `api` action calls (any URL the provider names), notifications
and the TTS service. Each was read whole into memory (a server streaming 64 MiB within
the timeout took 64 MiB of the executor); now a body past its cap is an error result."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from pbx.config import IvrAppParams
from pbx.httpbody import BodyTooLarge
from pbx.ivr.provider import MAX_API_BYTES, MAX_STEP_BYTES, ProviderClient
from pbx.settings.speech import TtsSettings
from pbx.tts import MAX_SPEECH_BYTES, TtsEngine

STREAMED = 64 * 1024 * 1024


async def streaming_server(declare_length: bool) -> TestServer:
    """Answers every request with 64 MiB of zeros, streamed (no Content-Length unless
    `declare_length`)."""
    chunk = b"\0" * (1 << 20)

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        if declare_length:
            resp.content_length = STREAMED
        await resp.prepare(request)
        try:
            for _ in range(STREAMED // len(chunk)):
                await resp.write(chunk)
        except ConnectionError:
            pass  # the client stopped reading: that is the point
        return resp

    app = web.Application()
    app.router.add_route("*", "/{x:.*}", big)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    return server


@pytest.mark.parametrize("declare_length", [False, True])
def test_an_api_call_answer_past_the_cap_is_an_error(declare_length: bool) -> None:
    async def scenario() -> None:
        server = await streaming_server(declare_length)
        try:
            async with ProviderClient() as client:
                res = await client.api("GET", f"http://127.0.0.1:{server.port}/x",
                                       timeout_s=60)
        finally:
            await server.close()
        assert res.status == 0 and "larger than" in str(res.body), res.body
    asyncio.run(scenario())
    assert MAX_API_BYTES < STREAMED


def test_a_step_answer_past_the_cap_falls_back() -> None:
    async def scenario() -> None:
        server = await streaming_server(False)
        try:
            params = IvrAppParams(url=f"http://127.0.0.1:{server.port}/ivr")
            async with ProviderClient() as client:
                res = await client.step(params, {"event": {"type": "session_start"}})
        finally:
            await server.close()
        assert res.outcome == "invalid" and "larger than" in res.reason, res
    asyncio.run(scenario())
    assert MAX_STEP_BYTES < STREAMED


def test_a_tts_answer_past_the_cap_is_a_tts_error(tmp_path: Path) -> None:
    from pbx.tts import TtsError

    async def scenario() -> None:
        server = await streaming_server(False)
        engine = TtsEngine(TtsSettings(url=f"http://127.0.0.1:{server.port}/tts",
                                       timeout_ms=60_000, cache_dir=str(tmp_path / "tts")),
                           tmp_path, espeak=None)
        try:
            with pytest.raises(TtsError, match="larger than"):
                await engine._from_service("hello", "en-us")
        finally:
            await engine.close()
            await server.close()
    asyncio.run(scenario())
    assert MAX_SPEECH_BYTES < STREAMED and issubclass(BodyTooLarge, Exception)

"""Speech recognition for `input_voice` (docs/asr.md; DESIGN §3 "ASR").

The IVR executor performs the machine's `asr` requests with an `AsrEngine` (media
workers only capture: recognition never runs on a worker's tick):

* stage "check": is there a recogniser? `[asr] url`, else local pocketsphinx (when
  installed and `[asr] local` is on); without either the provider gets
  `error{"ASR service not available"}` before the caller is listened to;
* stage "recognize": the utterance the media worker wrote under `[asr] spool_dir`
  (16-bit 8 kHz mono WAV) is recognised from LEAD_MS before the speech began (the
  worker's `speech_start_ms`: not the wait before it), then deleted whatever happened.
  An utterance that ended with `no_speech` is not sent anywhere: `text` "" and
  confidence 0. Media workers and executors must share the spool directory.

The HTTP contract is the OpenAI-compatible transcription endpoint
(`POST /v1/audio/transcriptions`): multipart/form-data with `file` (the WAV,
`utterance.wav`, `audio/wav`), `model` (`[asr] model`), `response_format=json`,
`language` when configured and `prompt` (the scene's phrases, comma-separated) when the
scene has a vocabulary; `Authorization: Bearer <api_key>` when configured. The answer
must be 200 with a JSON object whose `text` is a string. Its confidence is the
object's `confidence` (a number in [0, 1]) when there is one, else exp of the mean
`avg_logprob` of its `segments` (verbose_json), else 1.0. Anything else (status,
shape, a body over MAX_RESPONSE_BYTES, the `[asr] timeout_ms` passing) is an `error`
event whose reason says which.

Local recognition runs pocketsphinx (its English model from the PyPI wheel) in child
processes at low CPU priority (`nice` LOCAL_NICE), at most `[asr] max_concurrent`
recognitions at a time per executor (HTTP ones too; more wait for a slot within their
timeout), each bounded by `[asr] local_timeout_ms`: a decode that overruns kills the
child processes (a new pool starts on the next use); `warm` loads the model in each
child when the executor starts. The audio is resampled to the
model's 16 kHz; the decoder listens for one phrase of the scene's vocabulary
(`[asr] scenes.<scene>`), else of `[asr] vocabulary` (digits, yes/no, ...), or with
`local_free_text` for free dictation; its confidence is the posterior probability
pocketsphinx gives the hypothesis.

The spool: the executor deletes each file it was handed; `sweep_spool` (every
SWEEP_INTERVAL_S) deletes files older than `[asr] spool_max_age_s` left by an
executor that died or a session that ended before recognition.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import io
import logging
import math
import multiprocessing
import os
import re
import signal
import time
import wave
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from pbx.httpbody import BodyTooLarge, read_capped
from pbx.ivr.requests import AsrResult, ProviderRequest
from pbx.redact import redact_url
from pbx.settings.speech import AsrSettings

log = logging.getLogger(__name__)

ASR_UNAVAILABLE = "ASR service not available"
MAX_RESPONSE_BYTES = 1 << 20
MAX_TEXT_CHARS = 4000
# An utterance file (the worker bounds it by max_speech_ms; this guards the reader).
MAX_UTTERANCE_BYTES = 8 << 20
SWEEP_INTERVAL_S = 60.0
LOCAL_NICE = 10
PR_SET_PDEATHSIG = 1  # prctl(2)
MODEL_RATE = 16_000
# What is kept before the speech the VAD found (its onset needs a few frames).
LEAD_MS = 300
SPEECH_FLOOR = 10 ** (-45 / 20)  # RMS of a 20 ms frame: the default `min_speech_dbfs`
# The utterance file names the machine makes: `<session>_<record id>.wav`, one component.
_SPOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_@+\-][A-Za-z0-9_.@+\-]{0,200}\.wav$")


class AsrError(Exception):
    """One recognition failed; the text says why (becomes the `error` event's reason)."""


def pocketsphinx_installed() -> bool:
    return importlib.util.find_spec("pocketsphinx") is not None


# ---------------------------------------------------------------- HTTP (pure parts)


def parse_transcription(status: int, body: bytes) -> tuple[str, float]:
    """An OpenAI-compatible transcription answer -> (text, confidence); AsrError else."""
    if status != 200:
        snippet = body[:200].decode("utf-8", "replace").strip()
        raise AsrError(f"ASR service answered HTTP {status}" + (f": {snippet}" if snippet else ""))
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise AsrError("ASR service answer is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise AsrError('ASR service answer has no "text" string')
    text = " ".join(doc["text"].split())[:MAX_TEXT_CHARS]
    return text, _confidence(doc)


def _confidence(doc: dict[str, Any]) -> float:
    value = doc.get("confidence")
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return min(1.0, max(0.0, float(value)))
    segments = doc.get("segments")
    if isinstance(segments, list):
        logprobs = [
            float(seg["avg_logprob"]) for seg in segments
            if isinstance(seg, dict) and isinstance(seg.get("avg_logprob"), int | float)
            and not isinstance(seg.get("avg_logprob"), bool)
            and math.isfinite(seg["avg_logprob"])
        ]  # fmt: skip
        if logprobs:
            return min(1.0, max(0.0, math.exp(sum(logprobs) / len(logprobs))))
    return 1.0  # a transcript with no score: the service vouches for it


# ---------------------------------------------------------------- local (child process)

# One decoder per child (it holds the acoustic model); one named search per vocabulary.
_decoder_instance: Any = None
_searches: dict[tuple[str, ...], str] = {}
_search_count = 0
MAX_SEARCHES = 64
FREE_TEXT_SEARCH = "_default"  # pocketsphinx's own: its language model


def _child_init(parent_pid: int) -> None:
    """A recogniser child: below the media workers and the executor in CPU priority, and
    gone with its executor. A pool's children outlive a killed parent (they were left
    behind, ~170 MB each, whenever supervisord restarted an executor): the kernel kills
    this one when its parent dies (Linux PR_SET_PDEATHSIG), and one whose parent is
    already gone leaves at once."""
    try:
        os.nice(LOCAL_NICE)
    except OSError:
        pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the pool's own shutdown is all there is
    if os.getppid() != parent_pid:
        os._exit(0)


def grammar(phrases: Sequence[str]) -> str:
    """A JSGF grammar accepting exactly one of `phrases` (lower-case words, checked by
    the config)."""
    alternatives = " | ".join(sorted(set(phrases)))
    return f"#JSGF V1.0;\ngrammar asr;\npublic <utterance> = {alternatives};\n"


def _decoder(phrases: tuple[str, ...] | None) -> Any:
    """This child's decoder, listening for one of `phrases` (None: free dictation)."""
    global _decoder_instance, _search_count
    if _decoder_instance is None:
        from pocketsphinx import Decoder  # imported in the child only

        _decoder_instance = Decoder(samprate=MODEL_RATE, loglevel="FATAL")
    decoder = _decoder_instance
    if phrases is None:
        decoder.activate_search(FREE_TEXT_SEARCH)
        return decoder
    name = _searches.get(phrases)
    if name is None:
        known = [p for p in phrases if all(decoder.lookup_word(w) for w in p.split())]
        if not known:
            raise AsrError("no phrase of the vocabulary is in the recogniser's dictionary")
        if len(_searches) >= MAX_SEARCHES:
            decoder.activate_search(FREE_TEXT_SEARCH)
            decoder.remove_search(_searches.pop(next(iter(_searches))))
        _search_count += 1
        name = f"vocabulary{_search_count}"
        decoder.add_jsgf_string(name, grammar(known))
        _searches[phrases] = name
    decoder.activate_search(name)
    return decoder


def warm_local(phrases: tuple[str, ...] | None) -> None:
    """Load the model and the grammar in a child, so the first caller does not wait."""
    _decoder(phrases)


def decode_local(wav: bytes, phrases: tuple[str, ...] | None) -> tuple[str, float]:
    """pocketsphinx on one WAV utterance: (text, confidence). Runs in a child process."""
    import numpy as np

    from pbx.tts import TtsError, decode_wav, resample

    try:
        samples, rate = decode_wav(wav)
    except TtsError as exc:
        raise AsrError(f"utterance: {exc}") from None
    # A grammar always picks one of its phrases: an utterance with no 20 ms frame as loud
    # as speech (the VAD's floor) has no text instead.
    frames = samples[: len(samples) // (rate // 50) * (rate // 50)].reshape(-1, rate // 50)
    if not frames.size or float(np.sqrt((frames**2).mean(axis=1)).max()) < SPEECH_FLOOR:
        return "", 0.0
    pcm = np.clip(np.round(resample(samples, rate, MODEL_RATE) * 32767.0), -32768, 32767)
    decoder = _decoder(phrases)
    decoder.start_utt()
    decoder.process_raw(pcm.astype("<i2").tobytes(), full_utt=True)
    decoder.end_utt()
    hyp = decoder.hyp()
    if hyp is None or not hyp.hypstr.strip():
        return "", 0.0
    return " ".join(hyp.hypstr.split()), min(1.0, max(0.0, float(decoder.get_prob())))


# ---------------------------------------------------------------- the engine


class AsrEngine:
    """Recognises the utterances of one executor. `http` gives the aiohttp session to
    use (the provider client's), else the engine opens its own. `local`: None follows
    `[asr] local` and whether pocketsphinx is installed."""

    def __init__(
        self,
        settings: AsrSettings,
        *,
        http: Callable[[], aiohttp.ClientSession] | None = None,
        local: bool | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._http = http
        self._own_session: aiohttp.ClientSession | None = None
        self.local = (settings.local and pocketsphinx_installed()) if local is None else local
        self.spool = Path(settings.spool_dir)
        self.clock = clock
        self._slots = asyncio.Semaphore(settings.max_concurrent)
        self._pool: ProcessPoolExecutor | None = None

    @property
    def available(self) -> bool:
        return bool(self.settings.url) or self.local

    def describe(self) -> str:
        url = self.settings.url
        parts = [f"service {redact_url(url)}"] if url else []
        if not self.settings.url and self.local:
            parts.append("pocketsphinx (local)")
        return ", ".join(parts) or "not available (no [asr] url, no pocketsphinx)"

    async def perform(self, request: ProviderRequest) -> AsrResult:
        """An `asr` request from the machine; never raises."""
        body = request.body
        if body.get("stage") == "check":
            return AsrResult() if self.available else AsrResult(error=ASR_UNAVAILABLE)
        name = str(body.get("file") or "")
        if not _SPOOL_NAME_RE.fullmatch(name):
            return AsrResult(error=f"ASR failed: bad utterance name {name!r}")
        path = self.spool / name
        try:
            if body.get("reason") == "no_speech":
                return AsrResult(source="none")  # nobody spoke: nothing to recognise
            scene = body.get("scene")
            start = body.get("speech_start_ms")
            skip_ms = max(0, start - LEAD_MS) if isinstance(start, int) else 0
            return await self.recognize(path, scene if isinstance(scene, str) else None,
                                        skip_ms)
        finally:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot delete utterance %s: %s", path, exc)

    async def recognize(self, path: Path, scene: str | None = None, skip_ms: int = 0
                        ) -> AsrResult:
        """The text of the utterance in `path` (from `skip_ms` on); never raises."""
        if not self.available:
            return AsrResult(error=ASR_UNAVAILABLE)
        try:
            wav = await asyncio.to_thread(_read_utterance, path, skip_ms)
        except AsrError as exc:
            return AsrResult(error=f"ASR failed: {exc}")
        url = self.settings.url
        timeout_s = (self.settings.timeout_ms if url else self.settings.local_timeout_ms) / 1000
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout_s)
        except TimeoutError:
            return AsrResult(error=f"ASR failed: busy ({self.settings.max_concurrent} "
                                   "recognitions running)")
        try:
            left = max(0.1, timeout_s - (time.monotonic() - started))
            if url:
                text, confidence = await self._http_recognize(url, wav, scene, left)
                source = "http"
            else:
                text, confidence = await self._local_recognize(wav, scene, left)
                source = "pocketsphinx"
        except AsrError as exc:
            log.info("asr: %s", exc)
            return AsrResult(error=str(exc))
        finally:
            self._slots.release()
        return AsrResult(text=text, confidence=confidence, source=source)

    async def warm(self) -> None:
        """Start the local recogniser's children and load the model in each (about a
        second of CPU at low priority); nothing without local recognition."""
        if self.settings.url or not self.local:
            return
        key = None if self.settings.local_free_text else tuple(self.settings.vocabulary)
        loop = asyncio.get_running_loop()
        pool = self._local_pool()
        try:
            await asyncio.gather(*(loop.run_in_executor(pool, warm_local, key)
                                   for _ in range(self.settings.max_concurrent)))
        except Exception as exc:
            log.error("local speech recognition does not start: %s", exc)

    def phrases(self, scene: str | None) -> list[str] | None:
        """The scene's vocabulary, or None when it has none of its own."""
        return self.settings.scenes.get(scene) if scene else None

    async def _http_recognize(
        self, url: str, wav: bytes, scene: str | None, timeout_s: float
    ) -> tuple[str, float]:
        s = self.settings
        form = aiohttp.FormData()
        form.add_field("file", wav, filename="utterance.wav", content_type="audio/wav")
        form.add_field("model", s.model)
        form.add_field("response_format", "json")
        if s.language:
            form.add_field("language", s.language)
        phrases = self.phrases(scene)
        if phrases:
            form.add_field("prompt", ", ".join(phrases))
        headers = {"Authorization": f"Bearer {s.api_key}"} if s.api_key else {}
        session = self._session()
        try:
            async with session.post(
                url, data=form, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                body = await read_capped(resp, MAX_RESPONSE_BYTES, "ASR service answer")
                return parse_transcription(resp.status, body)
        except BodyTooLarge as exc:
            raise AsrError(str(exc)) from None
        except TimeoutError:
            raise AsrError(f"ASR service timed out after {timeout_s * 1000:.0f} ms") from None
        except aiohttp.ClientError as exc:
            raise AsrError(f"ASR service unreachable: {exc.__class__.__name__}: {exc}") from None

    async def _local_recognize(
        self, wav: bytes, scene: str | None, timeout_s: float
    ) -> tuple[str, float]:
        phrases = self.phrases(scene)
        if phrases is None and not self.settings.local_free_text:
            phrases = self.settings.vocabulary
        pool = self._local_pool()
        loop = asyncio.get_running_loop()
        key = tuple(phrases) if phrases is not None else None
        future = loop.run_in_executor(pool, decode_local, wav, key)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            self._kill_pool()
            raise AsrError(
                f"local recognition took longer than {timeout_s * 1000:.0f} ms"
            ) from None
        except AsrError:
            raise
        except Exception as exc:  # a broken child, pocketsphinx missing its model
            self._kill_pool()
            raise AsrError(f"local recognition failed: {exc.__class__.__name__}: {exc}") from None

    def _local_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            # spawn: the children start clean, without the executor's zmq sockets.
            self._pool = ProcessPoolExecutor(
                max_workers=self.settings.max_concurrent,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_child_init,
                initargs=(os.getpid(),),
            )
        return self._pool

    def _kill_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        # A decode past its budget cannot be cancelled: end the children themselves.
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def _session(self) -> aiohttp.ClientSession:
        if self._http is not None:
            return self._http()
        if self._own_session is None or self._own_session.closed:
            self._own_session = aiohttp.ClientSession()
        return self._own_session

    def sweep_spool(self) -> int:
        """Delete utterances older than `[asr] spool_max_age_s`; how many went."""
        limit = self.clock() - self.settings.spool_max_age_s
        removed = 0
        try:
            entries = list(os.scandir(self.spool))
        except OSError:
            return 0
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat(
                        follow_symlinks=False).st_mtime < limit:
                    os.unlink(entry.path)
                    removed += 1
            except OSError:
                continue
        return removed

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._own_session is not None:
            await self._own_session.close()


def _read_utterance(path: Path, skip_ms: int = 0) -> bytes:
    """The utterance WAV, without its first `skip_ms` (the wait before the speech)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_UTTERANCE_BYTES + 1)
    except FileNotFoundError:
        raise AsrError("the utterance file is gone") from None
    except OSError as exc:
        raise AsrError(f"cannot read the utterance: {exc.strerror or exc}") from None
    if len(data) > MAX_UTTERANCE_BYTES:
        raise AsrError(f"utterance larger than {MAX_UTTERANCE_BYTES} bytes")
    if skip_ms <= 0:
        return data
    try:
        with wave.open(io.BytesIO(data)) as w:
            params = w.getparams()
            w.setpos(min(params.nframes, params.framerate * skip_ms // 1000))
            frames = w.readframes(params.nframes)
    except (wave.Error, EOFError) as exc:
        raise AsrError(f"the utterance is not a WAV file: {exc}") from None
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setparams(params)
        w.writeframes(frames)
    return out.getvalue()

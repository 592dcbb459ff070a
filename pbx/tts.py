"""Text to speech for `tts_text` prompts and `greeting_text` menus (docs/decisions.md).

The IVR executor performs the machine's `tts` requests with a `TtsEngine` before it
replies, so the prompt exists when the media worker is told to play it:

1. the cache: `[tts] cache_dir` (default `sounds/.tts`, inside the sounds directory so
   the media worker can play it), one file per text and voice, named by a hash of
   both (`<sha256[:32]>.wav`), reused as long as it is there (each use touches the
   file; the front deletes the least recently used past `[retention] tts_cache_*`);
2. `[tts] url` when set: `POST {"text", "voice"}` (JSON) → WAV bytes, any PCM or float
   format, any rate, any number of channels;
3. local `espeak-ng` when installed (also when the service failed): writes 22050 Hz;
4. neither → `TtsResult(error=...)`, which the machine turns into an `error` event
   (`"TTS service not available"` when there is nothing to try).

Whatever the source, the audio is converted here to what the media worker plays:
8 kHz mono 16-bit PCM WAV (channels averaged, resampled by a Kaiser-windowed sinc
polyphase filter, peak at -3 dBFS), written to a temporary file and renamed into
place, so a reader never sees half a file and concurrent writers do not clash.
Requests for the same file while one is being made wait for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import re
import shutil
import struct
import tempfile
import wave
from collections.abc import Callable
from math import ceil, gcd
from pathlib import Path

import aiohttp
import numpy as np

from pbx.httpbody import BodyTooLarge, read_capped
from pbx.ivr.requests import ProviderRequest, TtsResult
from pbx.settings.speech import TtsSettings

log = logging.getLogger(__name__)

TTS_UNAVAILABLE = "TTS service not available"
SAMPLE_RATE = 8000
MAX_TEXT_CHARS = 4000  # about four minutes of speech
# A service's WAV for that much text: four minutes of 16-bit mono at up to 24 kHz, with
# room to spare (pbx.httpbody).
MAX_SPEECH_BYTES = 16 << 20
PEAK_DBFS = -3.0
# A voice name espeak-ng is given (`en-us`, `en+f3`, `mb-en1`): no option injection.
_ESPEAK_VOICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+.\-]{0,63}$")


class TtsError(Exception):
    """One source could not synthesise the text; the text says why."""


# ---------------------------------------------------------------- audio (pure)


def cache_name(text: str, voice: str) -> str:
    """The cache file name of `text` spoken by `voice`."""
    digest = hashlib.sha256(f"{voice}\0{text}".encode()).hexdigest()
    return f"{digest[:32]}.wav"


def decode_wav(data: bytes) -> tuple[np.ndarray, int]:
    """WAV bytes → (float64 mono samples in [-1, 1], sample rate).

    PCM 8/16/24/32-bit and IEEE float 32/64-bit, plain or WAVE_FORMAT_EXTENSIBLE, any
    number of channels (averaged). A data chunk whose size is unknown (streamed WAV,
    0 or 0xFFFFFFFF) runs to the end of the bytes.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise TtsError("not a WAV file")
    fmt: tuple[int, int, int, int] | None = None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"fmt ":
            if size < 16 or body + 16 > len(data):
                raise TtsError("WAV fmt chunk too short")
            tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", data, body)
            if tag == 0xFFFE:
                # WAVE_FORMAT_EXTENSIBLE: the real tag starts the sub-format GUID at +24.
                if size < 26 or body + 26 > len(data):
                    raise TtsError("WAV extensible fmt chunk too short")
                tag = struct.unpack_from("<H", data, body + 24)[0]
            fmt = (tag, channels, rate, bits)
        elif cid == b"data":
            if fmt is None:
                raise TtsError("WAV data before fmt")
            end = len(data) if size in (0, 0xFFFFFFFF) else min(len(data), body + size)
            return _samples(data[body:end], *fmt)
        pos = body + size + (size & 1)
    raise TtsError("WAV without a data chunk")


def _samples(raw: bytes, tag: int, channels: int, rate: int, bits: int) -> tuple[np.ndarray, int]:
    if channels < 1 or not 1000 <= rate <= 384_000:
        raise TtsError(f"WAV with {channels} channel(s) at {rate} Hz")
    width = bits // 8
    frame = width * channels
    if frame == 0:
        raise TtsError(f"WAV with {bits}-bit samples")
    raw = raw[: len(raw) - len(raw) % frame]
    if tag == 1 and bits == 8:
        x = (np.frombuffer(raw, np.uint8).astype(np.float64) - 128.0) / 128.0
    elif tag == 1 and bits == 16:
        x = np.frombuffer(raw, "<i2").astype(np.float64) / 32768.0
    elif tag == 1 and bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = np.where(v >= 1 << 23, v - (1 << 24), v).astype(np.float64) / float(1 << 23)
    elif tag == 1 and bits == 32:
        x = np.frombuffer(raw, "<i4").astype(np.float64) / float(1 << 31)
    elif tag == 3 and bits in (32, 64):
        x = np.frombuffer(raw, "<f4" if bits == 32 else "<f8").astype(np.float64)
        x = np.nan_to_num(np.clip(x, -1.0, 1.0))
    else:
        raise TtsError(f"unsupported WAV format {tag} with {bits}-bit samples")
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return x, rate


def lowpass_taps(up: int, down: int, attenuation_db: float = 80.0) -> np.ndarray:
    """The anti-aliasing / anti-imaging filter of a rate change by up/down, designed at
    the up-sampled rate: Kaiser-windowed sinc, pass band to 85 % of the lower Nyquist
    frequency, stop band from it (for 8 kHz out: flat to 3.4 kHz, -80 dB from 4 kHz).
    Gain `up`, which makes up for the zeros stuffed between the input samples."""
    high_rate = float(up)  # frequencies in units of the input rate
    nyquist = min(1.0, up / down) / 2.0
    f_pass, f_stop = 0.85 * nyquist, nyquist
    cutoff = (f_pass + f_stop) / 2.0 / high_rate  # cycles per up-sampled sample
    width = (f_stop - f_pass) / high_rate
    beta = 0.1102 * (attenuation_db - 8.7)
    numtaps = int(ceil((attenuation_db - 7.95) / (2.285 * 2.0 * np.pi * width))) | 1
    n = np.arange(numtaps) - (numtaps - 1) / 2.0
    taps = 2.0 * cutoff * np.sinc(2.0 * cutoff * n) * np.kaiser(numtaps, beta)
    return taps * (up / taps.sum())


def resample(x: np.ndarray, rate_in: int, rate_out: int, chunk: int = 4096) -> np.ndarray:
    """Rational-ratio resampling (polyphase FIR), aligned: output sample m is at input
    time m * rate_in / rate_out. Output length ceil(len(x) * rate_out / rate_in)."""
    x = np.asarray(x, dtype=np.float64)
    if rate_in == rate_out or len(x) == 0:
        return x.copy()
    g = gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    taps = lowpass_taps(up, down)
    k = -(-len(taps) // up)  # taps per phase
    padded = np.zeros(k * up)
    padded[: len(taps)] = taps
    bank = padded.reshape(k, up).T  # bank[p, j] = taps[p + j * up]
    delay = (len(taps) - 1) // 2  # the filter's group delay, in up-sampled samples
    n_out = -(-len(x) * up // down)
    pad = k + 2
    xp = np.concatenate([np.zeros(pad), x, np.zeros(pad + delay // up + 2)])
    out = np.empty(n_out)
    js = np.arange(k)
    for start in range(0, n_out, chunk):
        m = np.arange(start, min(start + chunk, n_out))
        t = m * down + delay
        phase, base = t % up, t // up
        # y[m] = sum_j taps[phase + j*up] * x[base - j]
        window = xp[(base + pad)[:, None] - js[None, :]]
        out[start : start + len(m)] = np.einsum("ij,ij->i", window, bank[phase])
    return out


def to_telephony(samples: np.ndarray, rate: int) -> bytes:
    """Float samples at `rate` → 8 kHz mono 16-bit PCM WAV bytes, peak at -3 dBFS."""
    y = resample(samples, rate, SAMPLE_RATE)
    peak = float(np.max(np.abs(y))) if len(y) else 0.0
    if peak > 1e-4:  # leave (near) silence alone
        y = y * (10.0 ** (PEAK_DBFS / 20.0) / peak)
    pcm = np.clip(np.round(y * 32767.0), -32768, 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def convert(wav: bytes) -> bytes:
    """Any supported WAV → the media worker's format."""
    samples, rate = decode_wav(wav)
    if len(samples) == 0:
        raise TtsError("no audio")
    return to_telephony(samples, rate)


# ---------------------------------------------------------------- the engine


class TtsEngine:
    """Synthesises into the cache; one per executor. `http` gives the aiohttp session to
    use (the provider client's), else the engine opens its own. `espeak`: True finds
    `espeak-ng` on PATH, a string is its path, None/False disables it."""

    def __init__(
        self,
        settings: TtsSettings,
        sounds_dir: str | os.PathLike[str],
        *,
        http: Callable[[], aiohttp.ClientSession] | None = None,
        espeak: str | bool | None = True,
    ) -> None:
        self.settings = settings
        self._http = http
        self._own_session: aiohttp.ClientSession | None = None
        self.espeak = shutil.which("espeak-ng") if espeak is True else (espeak or None)
        self.cache_dir = Path(settings.cache_dir).resolve()
        self.problem: str | None = None
        try:
            self.play_prefix = self.cache_dir.relative_to(Path(sounds_dir).resolve()).as_posix()
        except ValueError:
            self.play_prefix = ""
            self.problem = f"[tts] cache_dir {settings.cache_dir!r} is not inside the sounds directory"
            log.error("%s: text to speech disabled", self.problem)
        self._inflight: dict[str, asyncio.Future[TtsResult]] = {}

    @property
    def available(self) -> bool:
        return self.problem is None and (bool(self.settings.url) or self.espeak is not None)

    def play_name(self, name: str) -> str:
        return f"{self.play_prefix}/{name}" if self.play_prefix not in ("", ".") else name

    async def perform(self, request: ProviderRequest) -> TtsResult:
        """A `tts` request from the machine."""
        voice = request.body.get("voice")
        return await self.synthesize(
            str(request.body.get("text") or ""), voice if isinstance(voice, str) else None
        )

    async def synthesize(self, text: str, voice: str | None = None) -> TtsResult:
        """The prompt for `text` (None/empty voice: `[tts] voice`); never raises."""
        voice = voice or self.settings.voice
        if self.problem is not None:
            return TtsResult(error=f"{TTS_UNAVAILABLE}: {self.problem}")
        if not text.strip():
            return TtsResult(error="TTS failed: empty text")
        if len(text) > MAX_TEXT_CHARS:
            return TtsResult(error=f"TTS failed: text longer than {MAX_TEXT_CHARS} characters")
        name = cache_name(text, voice)
        path = self.cache_dir / name
        if path.is_file() and path.stat().st_size > 44:
            # Used again: it counts as new for the cache's retention (least recently
            # used goes first, files touched in the last minutes never, pbx.retention).
            try:
                os.utime(path)
            except OSError:
                pass
            return TtsResult(file=self.play_name(name), source="cache")
        if not self.available:
            return TtsResult(error=TTS_UNAVAILABLE)
        running = self._inflight.get(name)
        if running is not None:
            return await asyncio.shield(running)
        future: asyncio.Future[TtsResult] = asyncio.get_running_loop().create_future()
        self._inflight[name] = future
        try:
            result = await self._make(text, voice, name, path)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[name]

    async def _make(self, text: str, voice: str, name: str, path: Path) -> TtsResult:
        failures: list[str] = []
        if self.settings.url:
            try:
                wav = await self._from_service(text, voice)
                await asyncio.to_thread(self._store, path, wav)
                return TtsResult(file=self.play_name(name), source="http")
            except TtsError as exc:
                failures.append(f"service: {exc}")
                log.warning("tts service %s failed: %s", self.settings.url, exc)
        if self.espeak is not None:
            try:
                wav = await self._from_espeak(text, voice)
                await asyncio.to_thread(self._store, path, wav)
                return TtsResult(file=self.play_name(name), source="espeak-ng")
            except TtsError as exc:
                failures.append(f"espeak-ng: {exc}")
                log.warning("espeak-ng failed: %s", exc)
        return TtsResult(error="TTS failed: " + "; ".join(failures))

    async def _from_service(self, text: str, voice: str) -> bytes:
        assert self.settings.url
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_ms / 1000.0)
        try:
            async with self._session().post(
                self.settings.url, json={"text": text, "voice": voice}, timeout=timeout
            ) as resp:
                if not 200 <= resp.status < 300:
                    raise TtsError(f"HTTP {resp.status}")
                body = await read_capped(resp, MAX_SPEECH_BYTES, "TTS service answer")
        except BodyTooLarge as exc:
            raise TtsError(str(exc)) from None
        except TimeoutError:
            raise TtsError(f"timeout after {self.settings.timeout_ms} ms") from None
        except aiohttp.ClientError as exc:
            raise TtsError(f"{exc.__class__.__name__}: {exc}") from None
        return body

    async def _from_espeak(self, text: str, voice: str) -> bytes:
        assert self.espeak is not None
        if not _ESPEAK_VOICE_RE.match(voice):
            raise TtsError(f"invalid voice {voice!r}")
        fd, tmp = tempfile.mkstemp(prefix="espeak-", suffix=".wav")
        os.close(fd)
        try:
            proc = await asyncio.create_subprocess_exec(
                self.espeak, "-v", voice, "-b", "1", "-w", tmp, "--stdin",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                _, err = await asyncio.wait_for(
                    proc.communicate(text.encode()), self.settings.timeout_ms / 1000.0
                )
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise TtsError(f"timeout after {self.settings.timeout_ms} ms") from None
            if proc.returncode != 0:
                detail = err.decode(errors="replace").strip().splitlines()
                raise TtsError(f"exit {proc.returncode}: {detail[-1] if detail else ''}".strip())
            return Path(tmp).read_bytes()
        except OSError as exc:
            raise TtsError(f"{exc.__class__.__name__}: {exc}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def _store(self, path: Path, wav: bytes) -> None:
        """Convert, then write atomically (temporary file in the same directory, rename)."""
        data = convert(wav)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".wav", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise TtsError(f"cannot write {path}: {exc.strerror or exc}") from None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is not None:
            return self._http()
        if self._own_session is None or self._own_session.closed:
            self._own_session = aiohttp.ClientSession()
        return self._own_session

    async def close(self) -> None:
        if self._own_session is not None and not self._own_session.closed:
            await self._own_session.close()
        self._own_session = None

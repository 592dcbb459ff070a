"""Prompt files: safe path resolution inside the sounds directory, decoding, G.711 cache.

A prompt named by the provider (`sounds/welcome.wav` or `welcome.wav`) must
resolve inside the sounds directory; anything else (absolute paths, `..`,
symlinks leading out) is refused with `PromptError` before the file is opened
(DESIGN §2 "sounds"). Files are read once and encoded once per codec; both the
linear samples and the encoded prompts sit in small LRU caches keyed by the
resolved path and the file's size and modification time, so an edited file is
picked up on its next play.

Formats: WAV in PCM (8/16/24/32-bit), float, A-law or µ-law at any rate and
channel count (`media.wav`) — channels are averaged, other rates converted to
8 kHz with the anti-aliased resampler of `media.resample` — and headerless
8 kHz mono G.711 (`.ulaw`, `.pcmu`, `.alaw`, `.pcma`). An 8 kHz mono G.711
file played on a leg of the same law goes out byte for byte, never re-encoded.

`beep()` makes the tone played before a recording (`MediaRecord.beep`).
"""

from __future__ import annotations

import os
import stat
import time
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Generic, TypeVar

import numpy as np

from media import g711
from media.resample import resample, to_int16
from media.wav import WavAudio, WavError, parse_wav

SAMPLE_RATE = 8000
CACHE_ENTRIES = 64
# How long a prompt name's resolved path is reused before it is resolved again (a
# symlink changed meanwhile is then seen): resolving costs a realpath walk, which a
# busy worker would pay for every play of the same few prompts.
RESOLVE_TTL_S = 1.0
# Prompt files larger than this are refused rather than read into memory (~10 min of 44.1 kHz stereo).
MAX_FILE_BYTES = 100 * 1024 * 1024
RAW_G711 = {".ulaw": "PCMU", ".pcmu": "PCMU", ".mulaw": "PCMU", ".alaw": "PCMA", ".pcma": "PCMA"}
_LAW_CODEC = {"ulaw": "PCMU", "alaw": "PCMA"}

BEEP_HZ = 1000.0
BEEP_MS = 250
BEEP_LEVEL = 0.3  # of full scale, about -10 dBFS

K = TypeVar("K")
V = TypeVar("V")


class PromptError(Exception):
    """A prompt that cannot be played; the text says which file and why."""


class _Lru(Generic[K, V]):
    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def resolve(sounds_dir: str | os.PathLike[str], name: str) -> Path:
    """A prompt name -> an absolute path inside `sounds_dir`; PromptError if it escapes."""
    if not name or "\x00" in name:
        raise PromptError(f"invalid prompt name {name!r}")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts:
        raise PromptError(f"prompt {name!r} is outside the sounds directory")
    parts = pure.parts
    if parts and parts[0] == "sounds":
        parts = parts[1:]
    if not parts:
        raise PromptError(f"invalid prompt name {name!r}")
    root = Path(sounds_dir).resolve()
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root):
        raise PromptError(f"prompt {name!r} is outside the sounds directory")
    return path


def read_prompt(path: Path) -> tuple[np.ndarray, tuple[str, np.ndarray] | None]:
    """A prompt file -> (int16 samples at 8 kHz mono, native G.711 codes or None).

    The second item is (codec, codes) when the file already is 8 kHz mono G.711,
    so a leg of that law can send it untouched. PromptError for anything unusable.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise PromptError(f"{path.name}: no such prompt") from None
    except OSError as exc:
        raise PromptError(f"{path.name}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise PromptError(f"{path.name}: larger than {MAX_FILE_BYTES} bytes")
    raw_codec = RAW_G711.get(path.suffix.lower())
    if raw_codec is not None:
        codes = np.frombuffer(data, dtype=np.uint8).copy()
        return g711.decode(codes, raw_codec), (raw_codec, codes)
    try:
        audio = parse_wav(data)
    except WavError as exc:
        raise PromptError(f"{path.name}: not a usable WAV file ({exc})") from None
    return to_8k_mono(audio)


def to_8k_mono(audio: WavAudio) -> tuple[np.ndarray, tuple[str, np.ndarray] | None]:
    """Decoded WAV contents -> (int16 8 kHz mono, native G.711 codes or None)."""
    samples = audio.samples
    if audio.kind in _LAW_CODEC:
        codec = _LAW_CODEC[audio.kind]
        if audio.rate == SAMPLE_RATE and audio.channels == 1:
            codes = np.ascontiguousarray(samples[:, 0])
            return g711.decode(codes, codec), (codec, codes)
        samples = g711.decode(np.ascontiguousarray(samples), codec).astype(np.float64)
    mono = samples[:, 0] if audio.channels == 1 else samples.mean(axis=1)
    if audio.rate != SAMPLE_RATE:
        mono = resample(mono, audio.rate, SAMPLE_RATE)
    return to_int16(mono), None


def read_wav(path: Path) -> np.ndarray:
    """A prompt file -> int16 samples at 8 kHz mono; PromptError if unusable."""
    return read_prompt(path)[0]


def beep(codec: str | None = None, ms: int = BEEP_MS, hz: float = BEEP_HZ) -> np.ndarray:
    """A short tone with 5 ms raised-cosine ramps: int16 samples, or G.711 codes for `codec`."""
    n = SAMPLE_RATE * ms // 1000
    t = np.arange(n) / SAMPLE_RATE
    x = np.sin(2.0 * np.pi * hz * t) * (BEEP_LEVEL * 32767.0)
    ramp = min(n // 2, SAMPLE_RATE * 5 // 1000)
    if ramp:
        env = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        x[:ramp] *= env
        x[n - ramp :] *= env[::-1]
    pcm = to_int16(x)
    return pcm if codec is None else g711.encode(pcm, codec)


class PromptCache:
    """Loads prompts from one sounds directory; returns read-only G.711 code arrays."""

    def __init__(self, sounds_dir: str | os.PathLike[str], size: int = CACHE_ENTRIES) -> None:
        self.sounds_dir = Path(sounds_dir)
        self._pcm: _Lru[tuple[Path, int, int], np.ndarray] = _Lru(size)
        self._encoded: _Lru[tuple[Path, int, int, str], np.ndarray] = _Lru(size)
        self._beeps: dict[str, np.ndarray] = {}
        # name -> (resolved path, when, its (device, inode)): see RESOLVE_TTL_S.
        self._resolved: _Lru[str, tuple[Path, float, tuple[int, int]]] = _Lru(size)

    def _key(self, name: str) -> tuple[Path, int, int]:
        now = time.monotonic()
        hit = self._resolved.get(name)
        if hit is not None and now - hit[1] < RESOLVE_TTL_S:
            # The same regular file as when resolved (device and inode; lstat: a
            # symlink put in place of it or of a parent directory since names another
            # file, and the name is resolved again, below (review of issue 9).
            try:
                st = os.lstat(hit[0])
            except OSError:
                pass
            else:
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == hit[2]:
                    return hit[0], st.st_size, st.st_mtime_ns
        path = resolve(self.sounds_dir, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise PromptError(f"{name}: no such prompt") from None
        except OSError as exc:
            raise PromptError(f"{name}: cannot read: {exc.strerror or exc}") from None
        if not stat.S_ISREG(st.st_mode):
            raise PromptError(f"{name}: not a file")
        self._resolved.put(name, (path, now, (st.st_dev, st.st_ino)))
        return path, st.st_size, st.st_mtime_ns

    def _load(self, key: tuple[Path, int, int]) -> np.ndarray:
        pcm = self._pcm.get(key)
        if pcm is None:
            pcm, native = read_prompt(key[0])
            pcm.setflags(write=False)
            self._pcm.put(key, pcm)
            if native is not None:
                codec, codes = native
                codes.setflags(write=False)
                self._encoded.put((*key, codec), codes)
        return pcm

    def samples(self, name: str) -> np.ndarray:
        """Linear int16 samples of a prompt, read-only."""
        return self._load(self._key(name))

    def encoded(self, name: str, codec: str) -> np.ndarray:
        """The prompt encoded for `codec` (PCMU or PCMA), uint8, read-only."""
        key = self._key(name)
        ekey = (*key, codec)
        codes = self._encoded.get(ekey)
        if codes is None:
            pcm = self._load(key)
            codes = self._encoded.get(ekey)  # loading a G.711 file may have cached it
            if codes is None:
                codes = g711.encode(pcm, codec)
                codes.setflags(write=False)
                self._encoded.put(ekey, codes)
        return codes

    def beep(self, codec: str) -> np.ndarray:
        """The recording beep encoded for `codec`, uint8, read-only (made once per codec)."""
        codes = self._beeps.get(codec)
        if codes is None:
            codes = beep(codec)
            codes.setflags(write=False)
            self._beeps[codec] = codes
        return codes

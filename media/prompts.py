"""Prompt files: safe path resolution inside the sounds directory, WAV loading, G.711 cache.

A prompt named by the provider (`sounds/welcome.wav` or `welcome.wav`) must
resolve inside the sounds directory; anything else (absolute paths, `..`,
symlinks leading out) is refused with `PromptError` before the file is opened
(DESIGN §2 "sounds"). Files are read once and encoded once per codec; both the
linear samples and the encoded prompts sit in small LRU caches keyed by the
resolved path and the file's size and modification time, so an edited file is
picked up on its next play.
"""

from __future__ import annotations

import os
import wave
from collections import OrderedDict
from pathlib import Path, PurePosixPath
from typing import Generic, TypeVar

import numpy as np

from media import g711

SAMPLE_RATE = 8000
CACHE_ENTRIES = 64

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


def read_wav(path: Path) -> np.ndarray:
    """8 kHz mono 16-bit PCM WAV -> int16 samples; PromptError for anything else."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            if (rate, channels, width) != (SAMPLE_RATE, 1, 2):
                raise PromptError(
                    f"{path.name}: {rate} Hz, {channels} channel(s), {8 * width}-bit; "
                    "only 8000 Hz mono 16-bit PCM WAV is supported"
                )
            frames = w.readframes(w.getnframes())
    except FileNotFoundError:
        raise PromptError(f"{path.name}: no such prompt") from None
    except (wave.Error, EOFError) as exc:
        raise PromptError(f"{path.name}: not a PCM WAV file ({exc})") from None
    except OSError as exc:
        raise PromptError(f"{path.name}: cannot read: {exc.strerror or exc}") from None
    return np.frombuffer(frames, dtype="<i2").astype(np.int16)


class PromptCache:
    """Loads prompts from one sounds directory; returns read-only G.711 code arrays."""

    def __init__(self, sounds_dir: str | os.PathLike[str], size: int = CACHE_ENTRIES) -> None:
        self.sounds_dir = Path(sounds_dir)
        self._pcm: _Lru[tuple[Path, int, int], np.ndarray] = _Lru(size)
        self._encoded: _Lru[tuple[Path, int, int, str], np.ndarray] = _Lru(size)

    def _key(self, name: str) -> tuple[Path, int, int]:
        path = resolve(self.sounds_dir, name)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise PromptError(f"{name}: no such prompt") from None
        except OSError as exc:
            raise PromptError(f"{name}: cannot read: {exc.strerror or exc}") from None
        if not path.is_file():
            raise PromptError(f"{name}: not a file")
        return path, st.st_size, st.st_mtime_ns

    def _load(self, key: tuple[Path, int, int]) -> np.ndarray:
        pcm = self._pcm.get(key)
        if pcm is None:
            pcm = read_wav(key[0])
            pcm.setflags(write=False)
            self._pcm.put(key, pcm)
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
            codes = g711.encode(self._load(key), codec)
            codes.setflags(write=False)
            self._encoded.put(ekey, codes)
        return codes

"""Prompt resolution inside the sounds directory, WAV loading and the G.711 cache."""

from __future__ import annotations

import os
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from media import g711
from media.prompts import PromptCache, PromptError, read_wav, resolve


def write_wav(
    path: Path, samples: np.ndarray, rate: int = 8000, channels: int = 1, width: int = 2
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(8000 * seconds)) / 8000.0
    return (np.sin(2 * np.pi * hz * t) * 10000).astype("<i2")


@pytest.fixture
def sounds(tmp_path: Path) -> Path:
    root = tmp_path / "sounds"
    write_wav(root / "hello.wav", tone(0.5))
    write_wav(root / "menu" / "main.wav", tone(0.1))
    (tmp_path / "secret.wav").write_bytes(b"RIFF secret")
    return root


def test_resolve_inside(sounds: Path) -> None:
    root = sounds.resolve()
    assert resolve(sounds, "hello.wav") == root / "hello.wav"
    assert resolve(sounds, "sounds/hello.wav") == root / "hello.wav"
    assert resolve(sounds, "menu/main.wav") == root / "menu" / "main.wav"
    assert resolve(sounds, "./menu//main.wav") == root / "menu" / "main.wav"


@pytest.mark.parametrize(
    "name",
    [
        "../secret.wav",
        "sounds/../../secret.wav",
        "menu/../../secret.wav",
        "/etc/passwd",
        "..",
        "",
        "sounds/",
        "a\x00b",
        "..\\secret.wav",
    ],
)
def test_escapes_refused(sounds: Path, name: str) -> None:
    with pytest.raises(PromptError):
        resolve(sounds, name)
    with pytest.raises(PromptError):
        PromptCache(sounds).encoded(name, "PCMU")


def test_symlink_out_refused(sounds: Path) -> None:
    os.symlink(sounds.parent / "secret.wav", sounds / "link.wav")
    with pytest.raises(PromptError, match="outside"):
        resolve(sounds, "link.wav")


def test_symlink_put_in_place_of_a_played_prompt_refused(sounds: Path) -> None:
    # The cache reuses a name's resolved path for a while (RESOLVE_TTL_S): a symlink
    # out that replaces the file meanwhile must still be refused, not followed.
    cache = PromptCache(sounds)
    cache.encoded("hello.wav", "PCMU")
    os.replace(sounds / "hello.wav", sounds.parent / "moved.wav")
    os.symlink(sounds.parent / "moved.wav", sounds / "hello.wav")
    with pytest.raises(PromptError, match="outside"):
        cache.encoded("hello.wav", "PCMU")


def test_parent_directory_swapped_for_a_symlink_after_a_play_refused(sounds: Path) -> None:
    # Within RESOLVE_TTL_S a directory of the path replaced by a symlink out of the
    # sounds directory names another file: resolved again, and refused (review).
    cache = PromptCache(sounds)
    cache.encoded("menu/main.wav", "PCMU")
    outside = sounds.parent / "outside"
    outside.mkdir()
    shutil.copy(sounds / "menu" / "main.wav", outside / "main.wav")  # another file
    os.replace(sounds / "menu", sounds.parent / "menu.old")
    os.symlink(outside, sounds / "menu")
    with pytest.raises(PromptError, match="outside"):
        cache.encoded("menu/main.wav", "PCMU")


def test_load_and_cache(sounds: Path) -> None:
    cache = PromptCache(sounds, size=2)
    pcmu = cache.encoded("sounds/hello.wav", "PCMU")
    assert pcmu.dtype == np.uint8 and pcmu.size == 4000
    np.testing.assert_array_equal(pcmu, g711.encode(tone(0.5), "PCMU"))
    assert cache.encoded("hello.wav", "PCMU") is pcmu  # cached, same array
    assert not pcmu.flags.writeable
    pcma = cache.encoded("hello.wav", "PCMA")
    np.testing.assert_array_equal(pcma, g711.encode(tone(0.5), "PCMA"))
    cache.encoded("menu/main.wav", "PCMU")
    assert cache.encoded("hello.wav", "PCMU") is not pcmu  # evicted (LRU of 2)


def test_changed_file_reloaded(sounds: Path) -> None:
    cache = PromptCache(sounds)
    assert cache.encoded("hello.wav", "PCMU").size == 4000
    write_wav(sounds / "hello.wav", tone(0.25))
    os.utime(sounds / "hello.wav", ns=(1, 1))
    assert cache.encoded("hello.wav", "PCMU").size == 2000


def test_bad_files(sounds: Path) -> None:
    adpcm = bytearray((sounds / "hello.wav").read_bytes())
    adpcm[20:22] = (0x0011).to_bytes(2, "little")  # IMA ADPCM: not supported
    (sounds / "adpcm.wav").write_bytes(bytes(adpcm))
    (sounds / "junk.wav").write_bytes(b"not a wav at all")
    (sounds / "dir.wav").mkdir()
    cache = PromptCache(sounds)
    with pytest.raises(PromptError, match="format tag 0x0011 is not supported"):
        cache.encoded("adpcm.wav", "PCMU")
    with pytest.raises(PromptError, match="not a usable WAV"):
        cache.encoded("junk.wav", "PCMU")
    with pytest.raises(PromptError, match="no such prompt"):
        cache.encoded("missing.wav", "PCMU")
    with pytest.raises(PromptError, match="not a file"):
        cache.encoded("dir.wav", "PCMU")
    with pytest.raises(PromptError):
        read_wav(sounds / "missing.wav")

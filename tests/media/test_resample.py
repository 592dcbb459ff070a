"""The anti-aliased resampler, and prompts in every format it feeds (media.wav, media.prompts)."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from media import g711
from media.prompts import BEEP_MS, PromptCache, beep
from media.resample import design, resample
from media.wav import WavError, parse_wav


def sine(rate: int, hz: float, seconds: float = 1.0, amp: float = 10000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.sin(2 * np.pi * hz * t) * amp


def level_db(y: np.ndarray, amp: float = 10000.0) -> float:
    core = y[400:-400]  # away from the edges
    return float(20 * np.log10(np.sqrt(np.mean(core**2)) / (amp / np.sqrt(2))))


@pytest.mark.parametrize("rate", [44100, 48000, 22050, 32000, 16000, 11025])
def test_passband_within_half_db(rate: int) -> None:
    for hz in (300.0, 1000.0, 3000.0):
        assert abs(level_db(resample(sine(rate, hz), rate, 8000))) < 0.5, hz


@pytest.mark.parametrize("rate", [44100, 48000, 22050, 32000, 16000, 11025])
def test_stopband_at_least_50_db(rate: int) -> None:
    for hz in (4500.0, 5000.0, min(7000.0, rate / 2 - 100)):
        if hz < rate / 2:
            assert level_db(resample(sine(rate, hz), rate, 8000)) < -50.0, hz


def test_5k_at_44k1_and_1k_passes() -> None:
    assert level_db(resample(sine(44100, 5000.0), 44100, 8000)) <= -50.0
    assert abs(level_db(resample(sine(44100, 1000.0), 44100, 8000))) <= 0.5


def test_length_alignment_and_design_cached() -> None:
    x = np.zeros(44100)
    x[22050] = 1.0
    y = resample(x, 44100, 8000)
    assert y.size == 8000 and int(np.argmax(y)) == 4000  # no group delay left
    assert resample(np.ones(10), 8000, 8000).size == 10
    assert resample(np.ones(3), 44100, 8000).size == 1
    assert resample(np.zeros(0), 44100, 8000).size == 0
    assert design(44100, 8000) is design(44100, 8000)
    up, down, _, phases = design(44100, 8000)
    assert (up, down) == (80, 441) and not phases.flags.writeable


def _riff(fmt: bytes, data: bytes, extra: bytes = b"") -> bytes:
    body = b"WAVE" + extra + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def _fmt(tag: int, channels: int, rate: int, bits: int) -> bytes:
    block = channels * bits // 8
    return struct.pack("<HHIIHH", tag, channels, rate, rate * block, block, bits)


def test_parse_formats() -> None:
    pcm16 = np.array([0, 1000, -1000, 32767], dtype="<i2")
    a = parse_wav(
        _riff(_fmt(1, 1, 8000, 16), pcm16.tobytes(), extra=b"LIST\x03\x00\x00\x00abc\x00")
    )
    assert a.kind == "pcm" and a.samples[:, 0].tolist() == [0, 1000, -1000, 32767]
    u8 = parse_wav(_riff(_fmt(1, 1, 8000, 8), bytes([128, 255, 0])))
    assert u8.samples[:, 0].tolist() == [0.0, 127 * 256.0, -128 * 256.0]
    s24 = parse_wav(_riff(_fmt(1, 1, 8000, 24), bytes([0, 0x10, 0x00, 0, 0xF0, 0xFF])))
    assert s24.samples[:, 0].tolist() == [16.0, -16.0]
    s32 = parse_wav(_riff(_fmt(1, 2, 8000, 32), np.array([65536, -65536], "<i4").tobytes()))
    assert s32.samples.tolist() == [[1.0, -1.0]]
    f32 = parse_wav(_riff(_fmt(3, 1, 8000, 32), np.array([0.5, -1.0], "<f4").tobytes()))
    assert f32.samples[:, 0].tolist() == [16384.0, -32768.0]
    ext = (
        struct.pack("<HHI", 22, 16, 3)
        + struct.pack("<H", 1)
        + bytes.fromhex("000000001000800000aa00389b71")
    )
    e = parse_wav(_riff(_fmt(0xFFFE, 1, 16000, 16) + ext, pcm16.tobytes()))
    assert e.rate == 16000 and e.samples[:, 0].tolist() == [0, 1000, -1000, 32767]
    mu = parse_wav(_riff(_fmt(7, 1, 8000, 8), bytes([0xFF, 0x80])))
    assert mu.kind == "ulaw" and mu.samples[:, 0].tolist() == [0xFF, 0x80]
    al = parse_wav(_riff(_fmt(6, 1, 8000, 8), bytes([0xD5])))
    assert al.kind == "alaw"
    # the data chunk claims more than the file holds (a killed writer): read what is there
    cut = _riff(_fmt(1, 1, 8000, 16), pcm16.tobytes())[:-3]
    assert parse_wav(cut).samples[:, 0].tolist() == [0, 1000]
    for bad in (
        b"",
        b"RIFF\0\0\0\0WAVX",
        _riff(b"\x01\x00", b""),
        _riff(_fmt(2, 1, 8000, 4), b"\0"),
    ):
        with pytest.raises(WavError):
            parse_wav(bad)


def _write(path: Path, samples: np.ndarray, rate: int, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def test_prompt_44k1_stereo_downmixed_and_resampled(tmp_path: Path) -> None:
    left = sine(44100, 1000.0, amp=8000.0)
    right = sine(44100, 5000.0, amp=8000.0)  # would alias to 3 kHz without the filter
    _write(tmp_path / "cd.wav", np.stack([left, right], axis=1).astype(np.int16), 44100, 2)
    pcm = PromptCache(tmp_path).samples("cd.wav")
    assert pcm.dtype == np.int16 and pcm.size == 8000
    spectrum = np.abs(np.fft.rfft(pcm[400:-400] * np.hanning(7200)))
    freqs = np.fft.rfftfreq(7200, 1 / 8000)
    at = {f: spectrum[np.argmin(np.abs(freqs - f))] for f in (1000, 3000)}
    assert 20 * np.log10(at[3000] / at[1000]) < -50
    assert abs(level_db(pcm.astype(float), 4000.0)) < 0.5  # (L + R) / 2: the 1 kHz half


def test_g711_wav_and_raw_pass_through_untouched(tmp_path: Path) -> None:
    codes = g711.encode(sine(8000, 440.0).astype(np.int16), "PCMU")
    codes[::7] = 0x7F  # µ-law "negative zero": decode -> encode would turn it into 0xFF
    (tmp_path / "mu.wav").write_bytes(_riff(_fmt(7, 1, 8000, 8), codes.tobytes()))
    (tmp_path / "raw.ulaw").write_bytes(codes.tobytes())
    acodes = g711.encode(sine(8000, 440.0).astype(np.int16), "PCMA")
    (tmp_path / "a.wav").write_bytes(_riff(_fmt(6, 1, 8000, 8), acodes.tobytes()))
    (tmp_path / "raw.pcma").write_bytes(acodes.tobytes())
    cache = PromptCache(tmp_path)
    for name in ("mu.wav", "raw.ulaw"):
        assert cache.encoded(name, "PCMU").tobytes() == codes.tobytes()
        np.testing.assert_array_equal(
            cache.encoded(name, "PCMA"), g711.encode(g711.decode(codes, "PCMU"), "PCMA")
        )
    for name in ("a.wav", "raw.pcma"):
        assert cache.encoded(name, "PCMA").tobytes() == acodes.tobytes()
        np.testing.assert_array_equal(cache.samples(name), g711.decode(acodes, "PCMA"))


def test_g711_wav_at_other_rate_is_resampled(tmp_path: Path) -> None:
    codes = g711.encode(sine(16000, 1000.0, amp=8000.0).astype(np.int16), "PCMA")
    (tmp_path / "a16.wav").write_bytes(_riff(_fmt(6, 1, 16000, 8), codes.tobytes()))
    pcm = PromptCache(tmp_path).samples("a16.wav")
    assert pcm.size == 8000 and abs(level_db(pcm.astype(float), 8000.0)) < 0.5


def test_beep() -> None:
    pcm = beep()
    assert pcm.size == 8 * BEEP_MS and pcm.dtype == np.int16
    assert abs(int(pcm[0])) < 50 and abs(int(pcm[-1])) < 200  # ramped, no click
    spectrum = np.abs(np.fft.rfft(pcm))
    assert abs(np.argmax(spectrum) * 8000 / pcm.size - 1000) < 10
    np.testing.assert_array_equal(beep("PCMA"), g711.encode(pcm, "PCMA"))
    cache = PromptCache(".")
    assert cache.beep("PCMU") is cache.beep("PCMU") and not cache.beep("PCMU").flags.writeable

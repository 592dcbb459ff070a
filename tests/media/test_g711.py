"""G.711 kernels and their numpy twins against CPython's audioop, exhaustively."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from media import g711
from media.kernels import g711 as k

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int16)
ALL_CODES = np.arange(256, dtype=np.uint8)
_PCM = ALL_SAMPLES.astype("<i2").tobytes()

REFERENCE = {
    "ulaw_encode": np.frombuffer(audioop.lin2ulaw(_PCM, 2), dtype=np.uint8),
    "alaw_encode": np.frombuffer(audioop.lin2alaw(_PCM, 2), dtype=np.uint8),
    "ulaw_decode": np.frombuffer(audioop.ulaw2lin(ALL_CODES.tobytes(), 2), dtype="<i2"),
    "alaw_decode": np.frombuffer(audioop.alaw2lin(ALL_CODES.tobytes(), 2), dtype="<i2"),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("twin", ["numba", "numpy"])
def test_bit_exact_with_audioop(name: str, twin: str) -> None:
    fn = getattr(k, name if twin == "numba" else name + "_py")
    inputs = ALL_SAMPLES if name.endswith("encode") else ALL_CODES
    out = fn(inputs)
    assert out.dtype == REFERENCE[name].dtype.newbyteorder("=")
    np.testing.assert_array_equal(out, REFERENCE[name])


@pytest.mark.parametrize("name", ["ulaw_encode", "alaw_encode"])
def test_2d_batches_match_1d(name: str) -> None:
    batch = ALL_SAMPLES.reshape(256, 256)
    out = getattr(k, name)(batch)
    assert out.shape == (256, 256)
    np.testing.assert_array_equal(out.reshape(-1), REFERENCE[name])
    np.testing.assert_array_equal(getattr(k, name + "_py")(batch), out)


@pytest.mark.parametrize("name", ["ulaw_decode", "alaw_decode"])
def test_2d_decode(name: str) -> None:
    batch = np.tile(ALL_CODES, (3, 1))
    out = getattr(k, name)(batch)
    assert out.shape == (3, 256)
    np.testing.assert_array_equal(out[2], REFERENCE[name])


@pytest.mark.parametrize("codec", ["PCMU", "PCMA"])
def test_facade_round_trip_and_layouts(codec: str) -> None:
    g711.warm()
    codes = g711.encode(ALL_SAMPLES, codec)
    assert codes.dtype == np.uint8
    # every code decodes and re-encodes to itself (except µ-law's two zeros, 0x7F/0xFF)
    again = g711.encode(g711.decode(ALL_CODES, codec), codec)
    same = again == ALL_CODES
    assert same.sum() >= 255
    # non-contiguous and wrongly typed input is accepted
    strided = ALL_SAMPLES.reshape(256, 256)[:, ::2]
    np.testing.assert_array_equal(g711.encode(strided, codec), codes.reshape(256, 256)[:, ::2])
    np.testing.assert_array_equal(
        g711.decode(ALL_CODES.astype(np.int64), codec), g711.decode(ALL_CODES, codec)
    )
    assert g711.decode(codes[:0], codec).shape == (0,)


def test_silence_codes_decode_to_zero() -> None:
    for codec in g711.CODECS:
        code = np.array([g711.SILENCE[codec]], dtype=np.uint8)
        assert abs(int(g711.decode(code, codec)[0])) <= 8


def test_transcode_and_unknown_codec() -> None:
    pcm = (np.sin(np.arange(800) / 5.0) * 8000).astype(np.int16)
    mu = g711.encode(pcm, "PCMU")
    a = g711.transcode(mu, "PCMU", "PCMA")
    np.testing.assert_allclose(g711.decode(a, "PCMA"), pcm, atol=300)
    assert np.shares_memory(g711.transcode(mu, "PCMU", "PCMU"), mu)
    with pytest.raises(ValueError, match="unknown G.711 codec"):
        g711.encode(pcm, "G729")

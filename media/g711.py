"""G.711 encode/decode for PCMU (µ-law) and PCMA (A-law): the typed facade over the kernels.

Takes 1-D (one frame or one prompt) or 2-D (calls × samples) arrays. Non-contiguous
or wrongly typed input is copied into the layout the numba kernels expect.
Call `warm()` once at start-up so no call waits for a compiler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from media.kernels import g711 as _k

Codec = Literal["PCMU", "PCMA"]
CODECS: tuple[Codec, ...] = ("PCMU", "PCMA")

_ENCODERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "PCMU": _k.ulaw_encode,
    "PCMA": _k.alaw_encode,
}
_DECODERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "PCMU": _k.ulaw_decode,
    "PCMA": _k.alaw_decode,
}
SILENCE: dict[str, int] = {"PCMU": _k.ULAW_SILENCE, "PCMA": _k.ALAW_SILENCE}


def _kernel(
    table: dict[str, Callable[[np.ndarray], np.ndarray]], codec: str
) -> Callable[[np.ndarray], np.ndarray]:
    try:
        return table[codec]
    except KeyError:
        raise ValueError(f"unknown G.711 codec {codec!r}; known: PCMU, PCMA") from None


def encode(samples: np.ndarray, codec: str) -> np.ndarray:
    """int16 linear samples -> uint8 G.711 codes, same shape."""
    fn = _kernel(_ENCODERS, codec)
    return fn(np.ascontiguousarray(samples, dtype=np.int16))


def decode(codes: np.ndarray, codec: str) -> np.ndarray:
    """uint8 G.711 codes -> int16 linear samples, same shape."""
    fn = _kernel(_DECODERS, codec)
    return fn(np.ascontiguousarray(codes, dtype=np.uint8))


def transcode(codes: np.ndarray, from_codec: str, to_codec: str) -> np.ndarray:
    """G.711 codes in one law -> the other (a copy-free pass-through when they match)."""
    if from_codec == to_codec:
        return np.asarray(codes, dtype=np.uint8)
    return encode(decode(codes, from_codec), to_codec)


def warm() -> None:
    """Compile (or load from the on-disk cache) every kernel for 1-D and 2-D arrays."""
    for codec in CODECS:
        for shape in ((160,), (2, 160)):
            codes = encode(np.zeros(shape, dtype=np.int16), codec)
            decode(codes, codec)

"""G.711 µ-law and A-law kernels (ITU-T G.711), bit-exact with CPython's `audioop`.

Two implementations of each conversion:

* numba kernels (`ulaw_encode`, `ulaw_decode`, `alaw_encode`, `alaw_decode`) compiled
  with `cache=True`; they take a C-contiguous array of any rank (1-D frame or 2-D
  calls × samples) and return a new array of the same shape;
* numpy twins (`*_py`) written independently as whole-array expressions, used by
  the tests to cross-check the kernels and as a readable reference.

The algorithm is the Sun/CCITT reference code `audioop.c` uses: µ-law works on
the 14 high bits of the sample (`sample >> 2`), clips the magnitude at 8159 and
adds a bias of 33 before finding the segment; A-law works on the 13 high bits
(`sample >> 3`) with the one's-complement magnitude for negatives and inverts
the even bits (0x55). `media/g711.py` is the typed facade; call that instead.
"""

from __future__ import annotations

import numpy as np
from numba import njit

ULAW_SILENCE = 0xFF  # µ-law code of sample 0
ALAW_SILENCE = 0xD5  # A-law code of sample 0

_ULAW_CLIP = 8159
_ULAW_BIAS = 0x84  # on the 16-bit scale; 0x84 >> 2 == 33 on the 14-bit scale


# ------------------------------------------------------------------ numba: scalars


@njit(cache=True, inline="always")
def _ulaw_encode_one(sample: int) -> int:
    pcm = sample >> 2
    if pcm < 0:
        pcm = -pcm
        mask = 0x7F
    else:
        mask = 0xFF
    if pcm > _ULAW_CLIP:
        pcm = _ULAW_CLIP
    pcm += _ULAW_BIAS >> 2
    # segment = index of the first end point (0x3F, 0x7F, ..., 0x1FFF) >= pcm
    seg = 0
    end = 0x3F
    while seg < 8 and pcm > end:
        seg += 1
        end = (end << 1) | 1
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((pcm >> (seg + 1)) & 0xF)) ^ mask


@njit(cache=True, inline="always")
def _ulaw_decode_one(code: int) -> int:
    u = ~code & 0xFF
    t = ((u & 0x0F) << 3) + _ULAW_BIAS
    t <<= (u & 0x70) >> 4
    if u & 0x80:
        return _ULAW_BIAS - t
    return t - _ULAW_BIAS


@njit(cache=True, inline="always")
def _alaw_encode_one(sample: int) -> int:
    pcm = sample >> 3
    if pcm >= 0:
        mask = 0xD5
    else:
        mask = 0x55
        pcm = -pcm - 1
    # segment = index of the first end point (0x1F, 0x3F, ..., 0xFFF) >= pcm
    seg = 0
    end = 0x1F
    while seg < 8 and pcm > end:
        seg += 1
        end = (end << 1) | 1
    if seg >= 8:
        return 0x7F ^ mask
    if seg < 2:
        a = (seg << 4) | ((pcm >> 1) & 0xF)
    else:
        a = (seg << 4) | ((pcm >> seg) & 0xF)
    return a ^ mask


@njit(cache=True, inline="always")
def _alaw_decode_one(code: int) -> int:
    a = code ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t = (t + 0x108) << (seg - 1)
    if a & 0x80:
        return t
    return -t


# Decoding is one table look-up per code: 256 entries built once from the scalar
# formula above; numba freezes module-level arrays into the compiled kernel.
_ULAW_TABLE = np.array([_ulaw_decode_one.py_func(c) for c in range(256)], dtype=np.int16)
_ALAW_TABLE = np.array([_alaw_decode_one.py_func(c) for c in range(256)], dtype=np.int16)


# ------------------------------------------------------------------ numba: arrays


@njit(cache=True)
def ulaw_encode(samples: np.ndarray) -> np.ndarray:
    """int16 samples (any shape, C-contiguous) -> uint8 µ-law codes of the same shape."""
    out = np.empty(samples.shape, dtype=np.uint8)
    src = samples.reshape(-1)
    dst = out.reshape(-1)
    for i in range(src.size):
        dst[i] = _ulaw_encode_one(int(src[i]))
    return out


@njit(cache=True)
def ulaw_decode(codes: np.ndarray) -> np.ndarray:
    """uint8 µ-law codes (any shape, C-contiguous) -> int16 samples of the same shape."""
    out = np.empty(codes.shape, dtype=np.int16)
    src = codes.reshape(-1)
    dst = out.reshape(-1)
    for i in range(src.size):
        dst[i] = _ULAW_TABLE[src[i]]
    return out


@njit(cache=True)
def alaw_encode(samples: np.ndarray) -> np.ndarray:
    """int16 samples (any shape, C-contiguous) -> uint8 A-law codes of the same shape."""
    out = np.empty(samples.shape, dtype=np.uint8)
    src = samples.reshape(-1)
    dst = out.reshape(-1)
    for i in range(src.size):
        dst[i] = _alaw_encode_one(int(src[i]))
    return out


@njit(cache=True)
def alaw_decode(codes: np.ndarray) -> np.ndarray:
    """uint8 A-law codes (any shape, C-contiguous) -> int16 samples of the same shape."""
    out = np.empty(codes.shape, dtype=np.int16)
    src = codes.reshape(-1)
    dst = out.reshape(-1)
    for i in range(src.size):
        dst[i] = _ALAW_TABLE[src[i]]
    return out


# ------------------------------------------------------------------ numpy twins


def _segment(magnitude: np.ndarray, first_end: int) -> np.ndarray:
    """Index of the first segment end (first_end, 2*first_end+1, ...) >= magnitude; 8 if none."""
    ends = (first_end + 1) * (1 << np.arange(8, dtype=np.int32)) - 1
    return np.searchsorted(ends, magnitude, side="left").astype(np.int32)


def ulaw_encode_py(samples: np.ndarray) -> np.ndarray:
    pcm = np.asarray(samples, dtype=np.int32) >> 2
    mask = np.where(pcm < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(pcm), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = _segment(mag, 0x3F)
    quant = (mag >> np.minimum(seg + 1, 31)) & 0xF
    code = np.where(seg >= 8, 0x7F, (seg << 4) | quant)
    return (code ^ mask).astype(np.uint8)


def ulaw_decode_py(codes: np.ndarray) -> np.ndarray:
    u = ~np.asarray(codes, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + _ULAW_BIAS) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)


def alaw_encode_py(samples: np.ndarray) -> np.ndarray:
    pcm = np.asarray(samples, dtype=np.int32) >> 3
    negative = pcm < 0
    mask = np.where(negative, 0x55, 0xD5)
    mag = np.where(negative, -pcm - 1, pcm)
    seg = _segment(mag, 0x1F)
    shift = np.where(seg < 2, 1, np.minimum(seg, 31))
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> shift) & 0xF))
    return (code ^ mask).astype(np.uint8)


def alaw_decode_py(codes: np.ndarray) -> np.ndarray:
    a = np.asarray(codes, dtype=np.int32) ^ 0x55
    t = (a & 0x0F) << 4
    seg = (a & 0x70) >> 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)

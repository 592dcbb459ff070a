"""Sample-rate conversion for prompts: a windowed-sinc polyphase resampler in numpy.

Converting `in_rate` to `out_rate` is upsampling by L, low-pass filtering and
downsampling by M, with L/M = out_rate/in_rate in lowest terms. The low-pass
is one Kaiser-windowed sinc designed at the virtual rate `in_rate * L` and cut
into L phases, so only the taps that meet a real input sample are ever
multiplied (polyphase): output sample n uses phase (n*M + D) mod L against the
input ending at sample (n*M + D) div L, D being the filter's group delay, so
the output is not delayed.

The filter (designed once per rate pair, cached):

* passband edge 0.85 × the lower Nyquist frequency (3.4 kHz for 8 kHz output,
  the telephone band), stopband edge at that Nyquist frequency (4 kHz);
* Kaiser window for `STOPBAND_DB` (80 dB) attenuation, the tap count from
  Kaiser's formula N = (A − 8) / (2.285 Δω).

So whatever lies above 4 kHz in a 44.1 kHz prompt (which would otherwise fold
back into the telephone band) is removed before decimation. Work is grouped by
phase: for each of the L phases the outputs using it read the input at a fixed
stride M, a strided view of the input's sliding windows, and one matrix-vector
product computes them all, so there is no Python loop over samples.
"""

from __future__ import annotations

from functools import lru_cache
from math import ceil, gcd, pi

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

STOPBAND_DB = 80.0
PASSBAND_FRACTION = 0.85
# Bounds the temporary matrices: outputs of one phase are computed in chunks of this many.
_CHUNK = 1 << 14


@lru_cache(maxsize=16)
def design(in_rate: int, out_rate: int) -> tuple[int, int, int, np.ndarray]:
    """(L, M, delay, phases[L, K]) for in_rate -> out_rate; phases are read-only.

    phases[p, k] is tap p + k*L of the prototype filter (scaled by L so the
    passband gain is 1 after zero-stuffing).
    """
    if in_rate <= 0 or out_rate <= 0:
        raise ValueError("rates must be positive")
    g = gcd(in_rate, out_rate)
    up, down = out_rate // g, in_rate // g
    fs = float(in_rate) * up  # the virtual rate the prototype runs at
    nyquist = min(in_rate, out_rate) / 2.0
    pass_hz = PASSBAND_FRACTION * nyquist
    stop_hz = nyquist
    cutoff = (pass_hz + stop_hz) / 2.0
    dw = 2.0 * pi * (stop_hz - pass_hz) / fs
    taps = int(ceil((STOPBAND_DB - 8.0) / (2.285 * dw))) + 1
    k = int(ceil(taps / up))
    taps = k * up  # whole phases; the extra taps only lengthen the window
    beta = 0.1102 * (STOPBAND_DB - 8.7)
    n = np.arange(taps, dtype=np.float64) - (taps - 1) / 2.0
    h = 2.0 * cutoff / fs * np.sinc(2.0 * cutoff / fs * n) * np.kaiser(taps, beta)
    h *= up / h.sum()  # unity gain at DC after zero-stuffing by L
    phases = np.ascontiguousarray(h.reshape(k, up).T)  # phases[p, k] = h[p + k*up]
    phases.setflags(write=False)
    delay = (taps - 1) // 2
    return up, down, delay, phases


def resample(x: np.ndarray, in_rate: int, out_rate: int) -> np.ndarray:
    """1-D float samples at `in_rate` -> float64 samples at `out_rate`, same time span.

    The output has ceil(len(x) * out_rate / in_rate) samples.
    """
    x = np.asarray(x, dtype=np.float64)
    if in_rate == out_rate or x.size == 0:
        return x.copy()
    up, down, delay, phases = design(in_rate, out_rate)
    k = phases.shape[1]
    n_out = -(-x.size * up // down)
    # Output n reads x[b - k + 1 .. b] with b = (n*down + delay) // up; pad so every
    # window exists (zeros before the start and after the end).
    b_last = ((n_out - 1) * down + delay) // up
    xpad = np.zeros(k - 1 + max(b_last + 1, x.size), dtype=np.float64)
    xpad[k - 1 : k - 1 + x.size] = x
    windows = sliding_window_view(xpad, k)  # windows[b] = x[b-k+1 .. b]
    y = np.empty(n_out, dtype=np.float64)
    for r in range(min(up, n_out)):
        pos = r * down + delay
        p, b0 = pos % up, pos // up
        taps = phases[p, ::-1]  # windows run oldest first, taps newest first
        count = (n_out - 1 - r) // up + 1
        for start in range(0, count, _CHUNK):
            stop = min(count, start + _CHUNK)
            rows = windows[b0 + start * down : b0 + (stop - 1) * down + 1 : down]
            y[r + start * up : r + stop * up : up] = rows @ taps
    return y


def to_int16(x: np.ndarray) -> np.ndarray:
    """Round and clip float samples on the int16 scale to int16."""
    return np.clip(np.rint(x), -32768, 32767).astype(np.int16)

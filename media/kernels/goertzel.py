"""In-band DTMF (ITU-T Q.23/Q.24) detection kernel: one 20 ms tick for every call at once.

Theory of operation
-------------------

**Spectrum.** Each 160-sample tick is cut into four 5 ms sub-blocks of 40
samples. For every sub-block the kernel runs ten Goertzel recurrences — the
eight DTMF tones (rows 697, 770, 852, 941 Hz; columns 1209, 1336, 1477,
1633 Hz) and the two dial-tone components (350, 440 Hz, ITU-T E.180 / North
American precise dial tone) — and turns each end state into the complex DFT
value with the time origin at the start of the tick; it also sums the
sub-block's energy `sum(x**2)`. Sharing one phase reference, the values of
consecutive sub-blocks add up coherently into longer windows. The last three
sub-blocks are kept per call (rotated to the next tick's origin), so a
detection window can span a tick boundary.

**Window.** Every 5 ms (4 hops per tick) the last four sub-blocks form one
160-sample (20 ms) window. Its coherent sum (50 Hz bins) picks the strongest
row and column and separates the closest pair (697/770 Hz, 1.46 bins: at worst
-13 dB leakage, well under the 8 dB relative-peak margin). Powers are taken
from the window's two 10 ms halves, `Q_f = |H0_f|² + |H1_f|²` (100 Hz bins: a
tone 1.5 % off frequency loses at most 0.85 dB there, 3.7 dB in the 20 ms
bin).

**Checks** (`Q` scaled so that it is the power of a sine, window mean power `E`):

1. level: the strongest row and the strongest column each >= -40 dBm0;
2. twist: row/column power within +10 dB (normal twist, row stronger; the
   requirement is to accept 8 dB) and -6 dB (reverse twist; accept 4 dB);
3. relative peak: in the 20 ms window, each beats the other three of its
   group by 8 dB;
4. purity: `Q_row + Q_col >= 0.75 (E - Q_350 - Q_440)` — the two tones carry
   nearly all the energy that is not dial tone (speech and music spread
   theirs over harmonics);
5. frequency: the phase advance of each tone from the first half to the second
   gives its frequency offset (`Δf = Δφ·fs / (2π·80)`); accept |Δf| <= 2.5 %
   (the requirement: accept 1.5 %, reject 3.5 %). Offsets past ±50 Hz alias,
   but those tones sit near the half-window's first null and fail 1-4;
6. harmonics: reject when the measured column frequency is within 8 Hz of
   twice the measured row frequency. Three columns lie 4.3 % under a row's
   octave (1336 ≈ 2·697, 1477 ≈ 2·770, 1633 ≈ 2·852), so one harmonic-rich
   note 2 % under a row puts its 2nd harmonic 2.2 % over the column; true
   DTMF within ±1.5 % keeps them >= 17 Hz apart;
7. presence: the stronger tone is present in every sub-block
   (|X_k|² >= 0.6² Q/8, i.e. amplitude >= 60 % of its mean), the weaker at a
   looser 30 % (the stronger tone leaks up to -13.6 dB into a 40-sample
   sub-block's bins). A window that only partly covers a tone therefore
   fails, which is what makes the duration rules below sharp.

**Digits** (per call, one state row): a hop that passes all checks is a *hit*
for digit `4·row + col`. A digit is reported once, on the hop where it has
been hit on `HIT_HOPS` = 3 consecutive hops; it stays current until
`MISS_HOPS` = 7 consecutive hops are not hits for it, after which the same
digit can be reported again. With 5 ms hops and 20 ms windows a tone of 40 ms
gives at least four fully covered windows (accepted) and one of 23 ms at most
two passing windows (rejected: both end sub-blocks must be more than half
covered); the measured 50 % point is about 28 ms. A gap of 40 ms gives at
least eleven missing hops (two digits); a drop-out of 10 ms at most six (one
digit, as ITU-T Q.24 wants for short interruptions).

**Lost audio is not a pause.** A lost or late packet leaves silence in the
receive ring, and one lost 20 ms packet in the middle of a tone empties seven
windows: by the rules above the digit would end and be reported again, twice
for one key (with RFC 4733 alongside, a second report the press dedupe cannot
merge: the same source never merges with itself). So the tick's read also says
which sub-blocks hold samples no packet wrote (`gaps`), and a hop whose window
touches one is *held*: neither a hit nor a miss, the state machine unchanged.
At most `GAP_HOLD_HOPS` = 11 hops in a row are held; past that the windows are
judged as they are (silence: misses), so a stream that stops (hold, silence
suppression) still ends its digit and the same key pressed again after it is
reported again. With the seven misses that end a digit, up to 60 ms of missing
audio (three 20 ms packets) is bridged, and from 80 ms on the digit ends. Only
loss is bridged: a pause the sender made (silence suppression: the timestamp
jumps, the sequence number does not) reads as heard silence, not as a gap
(`media.rxaudio`), so two presses of one key 20 ms apart stay two. And when the first
digit heard after held hops is another one, the current digit ended in the
gap: the held hops count as its misses, so a short key pressed right after
lost audio is not swallowed by the digit before it.

**Levels.** 0 dBm0 is the power of the G.711 µ-law digital milliwatt (G.711
Table 5) decoded to 16-bit linear as `audioop` does: RMS 16,017 (sine peak
22,651).

Two implementations: the numba kernel `detect_tick` (float32, one call per
loop iteration, the ten recurrences in registers) and the numpy twin
`detect_tick_py` (float64, vectorised over calls, the DFT as a matrix
product), which the tests cross-check.
`media/inband.py` is the typed facade; call that instead.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

FS_HZ = 8000
TICK_SAMPLES = 160
SUB_SAMPLES = 40
SUBS_PER_TICK = TICK_SAMPLES // SUB_SAMPLES  # hops per tick
WIN_SUBS = 4
WIN_SAMPLES = WIN_SUBS * SUB_SAMPLES
HALF_SAMPLES = WIN_SAMPLES // 2
HIST_SUBS = WIN_SUBS - 1

ROW_HZ = (697.0, 770.0, 852.0, 941.0)
COL_HZ = (1209.0, 1336.0, 1477.0, 1633.0)
DIAL_HZ = (350.0, 440.0)
FREQS_HZ = np.array(ROW_HZ + COL_HZ + DIAL_HZ)
N_FREQS = len(FREQS_HZ)
N_BASIS = 2 * N_FREQS  # re (cos) columns, then im (-sin) columns
E_COL = N_BASIS  # sub-block energy column
HIST_COLS = N_BASIS + 1
DIGITS = "123A456B789C*0#D"  # index 4*row + col

# state machine columns (int32 state array); SM_GAPS: bit k set when history
# sub-block k (of HIST_SUBS) had a gap; SM_HOLD: hops held in a row; SM_HELD: hops
# held since the current digit was last heard
SM_CAND, SM_RUN, SM_CUR, SM_MISS, SM_GAPS, SM_HOLD, SM_HELD = 0, 1, 2, 3, 4, 5, 6
SM_COLS = 7

# ---------------------------------------------------------------- thresholds

DBM0_RMS = 16016.76  # decoded µ-law digital milliwatt, see module docstring
LEVEL_MIN_DBM0 = -40.0
TWIST_NORMAL_MAX_DB = 10.0
TWIST_REVERSE_MAX_DB = 6.0
RELATIVE_PEAK_DB = 8.0
PURITY_MIN = 0.75
FREQ_DEV_MAX = 0.025
HARMONIC_MIN_HZ = 8.0
PRESENCE_STRONG = 0.6
PRESENCE_WEAK = 0.3
HIT_HOPS = 3
MISS_HOPS = 7
GAP_HOLD_HOPS = 11
_WIN_MASK = (1 << WIN_SUBS) - 1
_HIST_MASK = (1 << HIST_SUBS) - 1

_HALF = float(HALF_SAMPLES)
# Level, twist, purity and presence use Q_f = |H0_f|² + |H1_f|², the energies of
# the window's two 10 ms halves (100 Hz bins: a tone 1.5 % off frequency loses
# at most 0.85 dB there, against 3.7 dB in the 20 ms window). A sine of power p
# gives Q = p·HALF²; one 40-sample sub-block of it |X_k|² = Q/8.
_LEVEL_MIN_Q = DBM0_RMS**2 * 10.0 ** (LEVEL_MIN_DBM0 / 10.0) * _HALF * _HALF
_TWIST_NORMAL = 10.0 ** (TWIST_NORMAL_MAX_DB / 10.0)
_TWIST_REVERSE = 10.0 ** (TWIST_REVERSE_MAX_DB / 10.0)
_REL_PEAK = 10.0 ** (RELATIVE_PEAK_DB / 10.0)
_E_TO_Q = _HALF * _HALF / WIN_SAMPLES  # window energy -> Q of the same mean power
_STRONG2 = PRESENCE_STRONG**2 / 8.0
_WEAK2 = PRESENCE_WEAK**2 / 8.0
# phase advance over half a window -> Hz
_HZ_PER_RAD = FS_HZ / (2.0 * math.pi * HALF_SAMPLES)


_W = 2.0 * np.pi * FREQS_HZ / FS_HZ  # rad per sample
# DFT basis with the time origin at the start of the tick (used by the twin)
_BASIS64 = np.concatenate(
    [np.cos(np.outer(np.arange(TICK_SAMPLES), _W)), -np.sin(np.outer(np.arange(TICK_SAMPLES), _W))],
    axis=1,
)
# A value computed with the previous tick's origin, seen from this tick's:
# multiply by exp(+j w TICK_SAMPLES).
ROT_COS = np.cos(_W * TICK_SAMPLES).astype(np.float32)
ROT_SIN = np.sin(_W * TICK_SAMPLES).astype(np.float32)
# Goertzel over the M samples of sub-block k (local n = 0..M-1) ends with s[M-1] = a,
# s[M-2] = b, and  a - exp(-jw) b = exp(jw(M-1)) sum x[n] exp(-jwn); with the
# tick origin (sample 40k + n):  X = a exp(-jw(40k + M-1)) - b exp(-jw(40k + M)).
_T_A = -_W[None, :] * (SUB_SAMPLES * np.arange(SUBS_PER_TICK)[:, None] + SUB_SAMPLES - 1)
_T_B = -_W[None, :] * (SUB_SAMPLES * np.arange(SUBS_PER_TICK)[:, None] + SUB_SAMPLES)
A_COS = np.cos(_T_A).astype(np.float32)  # [sub-block, freq]
A_SIN = np.sin(_T_A).astype(np.float32)
B_COS = np.cos(_T_B).astype(np.float32)
B_SIN = np.sin(_T_B).astype(np.float32)
COEF = (2.0 * np.cos(_W)).astype(np.float32)
_FREQS32 = FREQS_HZ.astype(np.float32)


def new_state(capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed per-call state: (history float32[capacity, 3, 21], machine int32[capacity, 7])."""
    hist = np.zeros((capacity, HIST_SUBS, HIST_COLS), dtype=np.float32)
    sm = np.zeros((capacity, SM_COLS), dtype=np.int32)
    sm[:, SM_CAND] = -1
    sm[:, SM_CUR] = -1
    return hist, sm


# ---------------------------------------------------------------- numba

_C = tuple(np.float32(c) for c in COEF)


@njit(cache=True, fastmath=True, inline="always")
def _gstep(
    x: np.float32, c: np.float32, a: np.float32, b: np.float32
) -> tuple[np.float32, np.float32]:
    return x + c * a - b, a


@njit(cache=True, fastmath=True, inline="always")
def _emit(X: np.ndarray, row: int, k: int, j: int, a: np.float32, b: np.float32) -> None:
    """Goertzel end state (a, b) of frequency j in sub-block k -> DFT value, tick origin."""
    X[row, j] = a * A_COS[k, j] - b * B_COS[k, j]
    X[row, N_FREQS + j] = a * A_SIN[k, j] - b * B_SIN[k, j]


@njit(cache=True, fastmath=True, inline="always")
def _goertzel_sub(samples: np.ndarray, i: int, k: int, X: np.ndarray, row: int) -> None:
    """Sub-block k of call i: the ten DFT values (tick origin) and the energy into X[row].

    Ten independent float32 Goertzel recurrences in scalar locals: they stay in
    registers and overlap in the pipeline (a loop over a frequency array would go
    through memory on every sample).
    """
    c0, c1, c2, c3, c4, c5, c6, c7, c8, c9 = _C
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = np.float32(0.0)
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = b8 = b9 = np.float32(0.0)
    e = np.float32(0.0)
    base = k * SUB_SAMPLES
    for n in range(base, base + SUB_SAMPLES):
        x = np.float32(samples[i, n])
        e += x * x
        a0, b0 = _gstep(x, c0, a0, b0)
        a1, b1 = _gstep(x, c1, a1, b1)
        a2, b2 = _gstep(x, c2, a2, b2)
        a3, b3 = _gstep(x, c3, a3, b3)
        a4, b4 = _gstep(x, c4, a4, b4)
        a5, b5 = _gstep(x, c5, a5, b5)
        a6, b6 = _gstep(x, c6, a6, b6)
        a7, b7 = _gstep(x, c7, a7, b7)
        a8, b8 = _gstep(x, c8, a8, b8)
        a9, b9 = _gstep(x, c9, a9, b9)
    _emit(X, row, k, 0, a0, b0)
    _emit(X, row, k, 1, a1, b1)
    _emit(X, row, k, 2, a2, b2)
    _emit(X, row, k, 3, a3, b3)
    _emit(X, row, k, 4, a4, b4)
    _emit(X, row, k, 5, a5, b5)
    _emit(X, row, k, 6, a6, b6)
    _emit(X, row, k, 7, a7, b7)
    _emit(X, row, k, 8, a8, b8)
    _emit(X, row, k, 9, a9, b9)
    X[row, E_COL] = e


@njit(cache=True, fastmath=True, inline="always")
def _halves(X: np.ndarray, h: int, j: int) -> tuple[float, float, float, float]:
    """Frequency j's DFT values over the window's two halves (re0, im0, re1, im1)."""
    return (
        X[h, j] + X[h + 1, j],
        X[h, N_FREQS + j] + X[h + 1, N_FREQS + j],
        X[h + 2, j] + X[h + 3, j],
        X[h + 2, N_FREQS + j] + X[h + 3, N_FREQS + j],
    )


@njit(cache=True, fastmath=True, inline="always")
def _window_digit(X: np.ndarray, h: int, P: np.ndarray) -> int:
    """Digit index 0..15 passing every check in the window of sub-blocks h..h+3, else -1."""
    etot = X[h, E_COL] + X[h + 1, E_COL] + X[h + 2, E_COL] + X[h + 3, E_COL]
    # Shortcut for quiet windows, implied by check 1 (so the twin need not copy it):
    # by Cauchy-Schwarz Q_f <= HALF * etot = 2 etot * _E_TO_Q.
    if 2.0 * etot * _E_TO_Q < _LEVEL_MIN_Q:
        return -1
    for j in range(8):
        re = X[h, j] + X[h + 1, j] + X[h + 2, j] + X[h + 3, j]
        im = (
            X[h, N_FREQS + j]
            + X[h + 1, N_FREQS + j]
            + X[h + 2, N_FREQS + j]
            + X[h + 3, N_FREQS + j]
        )
        P[j] = re * re + im * im
    r = 0
    for j in range(1, 4):
        if P[j] > P[r]:
            r = j
    c = 4
    for j in range(5, 8):
        if P[j] > P[c]:
            c = j
    # 1. level
    r0, r1, r2, r3 = _halves(X, h, r)
    c0, c1, c2, c3 = _halves(X, h, c)
    qr = r0 * r0 + r1 * r1 + r2 * r2 + r3 * r3
    qc = c0 * c0 + c1 * c1 + c2 * c2 + c3 * c3
    if qr < _LEVEL_MIN_Q or qc < _LEVEL_MIN_Q:
        return -1
    # 2. twist
    if qr > _TWIST_NORMAL * qc or qc > _TWIST_REVERSE * qr:
        return -1
    # 3. relative peak, in the 20 ms window (50 Hz bins separate 697 from 770 Hz)
    for j in range(4):
        if j != r and P[j] * _REL_PEAK > P[r]:
            return -1
    for j in range(4, 8):
        if j != c and P[j] * _REL_PEAK > P[c]:
            return -1
    # 4. purity
    d0, d1, d2, d3 = _halves(X, h, 8)
    e0, e1, e2, e3 = _halves(X, h, 9)
    qdial = d0 * d0 + d1 * d1 + d2 * d2 + d3 * d3 + e0 * e0 + e1 * e1 + e2 * e2 + e3 * e3
    if qr + qc < PURITY_MIN * (etot * _E_TO_Q - qdial):
        return -1
    # 5. frequency, from the phase advance between the halves
    dev_r = math.atan2(r3 * r0 - r2 * r1, r2 * r0 + r3 * r1) * _HZ_PER_RAD
    if abs(dev_r) > FREQ_DEV_MAX * _FREQS32[r]:
        return -1
    dev_c = math.atan2(c3 * c0 - c2 * c1, c2 * c0 + c3 * c1) * _HZ_PER_RAD
    if abs(dev_c) > FREQ_DEV_MAX * _FREQS32[c]:
        return -1
    # 6. not a fundamental and its 2nd harmonic
    if abs(_FREQS32[c] + dev_c - 2.0 * (_FREQS32[r] + dev_r)) < HARMONIC_MIN_HZ:
        return -1
    # 7. presence in every sub-block
    if qr >= qc:
        s_strong, s_weak, lim_s, lim_w = r, c, _STRONG2 * qr, _WEAK2 * qc
    else:
        s_strong, s_weak, lim_s, lim_w = c, r, _STRONG2 * qc, _WEAK2 * qr
    for k in range(WIN_SUBS):
        a = X[h + k, s_strong]
        b = X[h + k, N_FREQS + s_strong]
        if a * a + b * b < lim_s:
            return -1
        a = X[h + k, s_weak]
        b = X[h + k, N_FREQS + s_weak]
        if a * a + b * b < lim_w:
            return -1
    return 4 * r + (c - 4)


@njit(cache=True, fastmath=True)
def detect_tick(
    samples: np.ndarray, slots: np.ndarray, hist: np.ndarray, sm: np.ndarray, gaps: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One tick for every call.

    samples int16[calls, 160]; slots int64[calls] (row of each call in the state);
    gaps bool[calls, 4]: sub-blocks holding samples no packet wrote;
    hist float32[capacity, 3, 21] and sm int32[capacity, 7] are updated in place.
    Returns (hits, reports), both int8[calls, 4] per 5 ms hop: the digit index
    (0..15, see DIGITS) the hop's window passed, and the digit reported at that
    hop; -1 for none (and for a held hop).
    """
    n_calls = samples.shape[0]
    hits = np.full((n_calls, SUBS_PER_TICK), -1, dtype=np.int8)
    reports = np.full((n_calls, SUBS_PER_TICK), -1, dtype=np.int8)
    X = np.empty((HIST_SUBS + SUBS_PER_TICK, HIST_COLS), dtype=np.float32)
    P = np.empty(8, dtype=np.float32)
    for i in range(n_calls):
        s = slots[i]
        # history, rotated from the previous tick's time origin to this one's
        for k in range(HIST_SUBS):
            for j in range(N_FREQS):
                re = hist[s, k, j]
                im = hist[s, k, N_FREQS + j]
                X[k, j] = re * ROT_COS[j] - im * ROT_SIN[j]
                X[k, N_FREQS + j] = re * ROT_SIN[j] + im * ROT_COS[j]
            X[k, E_COL] = hist[s, k, E_COL]
        for k in range(SUBS_PER_TICK):
            _goertzel_sub(samples, i, k, X, HIST_SUBS + k)
        # one decision per hop, and the digit state machine
        cand = sm[s, SM_CAND]
        run = sm[s, SM_RUN]
        cur = sm[s, SM_CUR]
        miss = sm[s, SM_MISS]
        hold = sm[s, SM_HOLD]
        held = sm[s, SM_HELD]
        gap_bits = sm[s, SM_GAPS]
        for k in range(SUBS_PER_TICK):
            if gaps[i, k]:
                gap_bits |= 1 << (HIST_SUBS + k)
        for h in range(SUBS_PER_TICK):
            if (gap_bits >> h) & _WIN_MASK:
                if hold < GAP_HOLD_HOPS:
                    hold += 1
                    if cur >= 0:
                        held += 1
                    continue
            else:
                hold = 0
            d = _window_digit(X, h, P)
            hits[i, h] = d
            if d >= 0 and d == cand:
                run += 1
            elif d >= 0:
                cand = d
                run = 1
            else:
                cand = -1
                run = 0
            if cur >= 0:
                if d == cur:
                    miss = 0
                    held = 0
                else:
                    miss += 1
                    if d >= 0:  # another digit: the current one ended in the held hops
                        miss += held
                        held = 0
                    if miss >= MISS_HOPS:
                        cur = -1
                        miss = 0
                        held = 0
            if cur < 0 and cand >= 0 and run >= HIT_HOPS:
                reports[i, h] = cand
                cur = cand
                miss = 0
                held = 0
        sm[s, SM_CAND] = cand
        sm[s, SM_RUN] = run
        sm[s, SM_CUR] = cur
        sm[s, SM_MISS] = miss
        sm[s, SM_HOLD] = hold
        sm[s, SM_HELD] = held
        sm[s, SM_GAPS] = (gap_bits >> SUBS_PER_TICK) & _HIST_MASK
        for k in range(HIST_SUBS):
            for j in range(HIST_COLS):
                hist[s, k, j] = X[SUBS_PER_TICK + k, j]
    return hits, reports


# ---------------------------------------------------------------- numpy twin


def window_digits_py(X: np.ndarray) -> np.ndarray:
    """float64[calls, 4, 21] window sub-blocks -> digit index per call (-1: none)."""
    idx = np.arange(len(X))
    Xc = X[:, :, :N_FREQS] + 1j * X[:, :, N_FREQS:N_BASIS]  # [calls, 4, 10]
    P = np.abs(Xc.sum(1)) ** 2
    H0 = Xc[:, 0] + Xc[:, 1]
    H1 = Xc[:, 2] + Xc[:, 3]
    Q = np.abs(H0) ** 2 + np.abs(H1) ** 2  # [calls, 10]
    r = np.argmax(P[:, 0:4], axis=1)
    c = 4 + np.argmax(P[:, 4:8], axis=1)
    qr = Q[idx, r]
    qc = Q[idx, c]
    ok = (qr >= _LEVEL_MIN_Q) & (qc >= _LEVEL_MIN_Q)
    ok &= (qr <= _TWIST_NORMAL * qc) & (qc <= _TWIST_REVERSE * qr)
    others_r = np.where(np.arange(4)[None, :] == r[:, None], 0.0, P[:, 0:4]).max(1)
    others_c = np.where(np.arange(4, 8)[None, :] == c[:, None], 0.0, P[:, 4:8]).max(1)
    ok &= (others_r * _REL_PEAK <= P[idx, r]) & (others_c * _REL_PEAK <= P[idx, c])
    etot = X[:, :, E_COL].sum(1)
    ok &= qr + qc >= PURITY_MIN * (etot * _E_TO_Q - Q[:, 8] - Q[:, 9])
    dev_r, dev_c = (np.angle(H1[idx, j] * np.conj(H0[idx, j])) * _HZ_PER_RAD for j in (r, c))
    ok &= np.abs(dev_r) <= FREQ_DEV_MAX * FREQS_HZ[r]
    ok &= np.abs(dev_c) <= FREQ_DEV_MAX * FREQS_HZ[c]
    ok &= np.abs(FREQS_HZ[c] + dev_c - 2.0 * (FREQS_HZ[r] + dev_r)) >= HARMONIC_MIN_HZ
    strong = np.where(qr >= qc, r, c)
    weak = np.where(qr >= qc, c, r)
    sub = np.abs(Xc) ** 2  # [calls, 4, 10]
    ok &= (sub[idx, :, strong] >= _STRONG2 * Q[idx, strong][:, None]).all(1)
    ok &= (sub[idx, :, weak] >= _WEAK2 * Q[idx, weak][:, None]).all(1)
    return np.where(ok, 4 * r + (c - 4), -1)


def detect_tick_py(
    samples: np.ndarray, slots: np.ndarray, hist: np.ndarray, sm: np.ndarray, gaps: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """numpy twin of `detect_tick` (same arguments, same in-place state updates)."""
    n_calls = samples.shape[0]
    x = np.asarray(samples, dtype=np.float64).reshape(n_calls, SUBS_PER_TICK, SUB_SAMPLES)
    basis = _BASIS64.reshape(SUBS_PER_TICK, SUB_SAMPLES, N_BASIS)
    new = np.empty((n_calls, SUBS_PER_TICK, HIST_COLS))
    new[:, :, :N_BASIS] = np.einsum("nkm,kmj->nkj", x, basis)
    new[:, :, E_COL] = (x * x).sum(2)
    old = hist[slots].astype(np.float64)
    old_c = (old[:, :, :N_FREQS] + 1j * old[:, :, N_FREQS:N_BASIS]) * np.exp(
        1j * 2.0 * np.pi * FREQS_HZ / FS_HZ * TICK_SAMPLES
    )
    old[:, :, :N_FREQS] = old_c.real
    old[:, :, N_FREQS:N_BASIS] = old_c.imag
    X = np.concatenate([old, new], axis=1)  # [calls, 7, 21]

    cand, run, cur, miss, old_gaps, hold, held = (
        sm[slots, col].astype(np.int64) for col in range(SM_COLS)
    )
    # gap flags of the 7 sub-blocks: 3 of history (bits of SM_GAPS), then this tick's 4
    hist_gaps = (old_gaps[:, None] >> np.arange(HIST_SUBS)[None, :]) & 1
    g = np.concatenate([hist_gaps.astype(bool), np.asarray(gaps, dtype=bool)], axis=1)
    hits = np.full((n_calls, SUBS_PER_TICK), -1, dtype=np.int8)
    reports = np.full((n_calls, SUBS_PER_TICK), -1, dtype=np.int8)
    for h in range(SUBS_PER_TICK):
        in_gap = g[:, h : h + WIN_SUBS].any(axis=1)
        on_hold = in_gap & (hold < GAP_HOLD_HOPS)
        hold = np.where(on_hold, hold + 1, np.where(in_gap, hold, 0))
        d = np.where(on_hold, -1, window_digits_py(X[:, h : h + WIN_SUBS]))
        hits[:, h] = d
        cont = (d >= 0) & (d == cand)
        new_run = np.where(cont, run + 1, np.where(d >= 0, 1, 0))
        new_cand = np.where(d >= 0, d, -1)
        live = cur >= 0
        other = live & (d != cur) & (d >= 0)  # another digit: the current one ended in the gap
        new_miss = np.where(live, np.where(d == cur, 0, miss + 1 + np.where(other, held, 0)), miss)
        new_held = np.where(live & ((d == cur) | other), 0, held)
        ended = live & (new_miss >= MISS_HOPS)
        new_cur = np.where(ended, -1, cur)
        new_miss = np.where(ended, 0, new_miss)
        new_held = np.where(ended, 0, new_held)
        fire = (new_cur < 0) & (new_cand >= 0) & (new_run >= HIT_HOPS)
        reports[:, h] = np.where(fire & ~on_hold, new_cand, -1)
        new_cur = np.where(fire, new_cand, new_cur)
        new_miss = np.where(fire, 0, new_miss)
        new_held = np.where(fire, 0, new_held)
        # a held hop leaves the machine as it was, but for counting itself
        run, cand = np.where(on_hold, run, new_run), np.where(on_hold, cand, new_cand)
        cur, miss = np.where(on_hold, cur, new_cur), np.where(on_hold, miss, new_miss)
        held = np.where(on_hold, np.where(cur >= 0, held + 1, held), new_held)
    new_gaps = (g[:, SUBS_PER_TICK:] * (1 << np.arange(HIST_SUBS))[None, :]).sum(axis=1)
    for col, v in enumerate((cand, run, cur, miss, new_gaps, hold, held)):
        sm[slots, col] = v
    hist[slots] = X[:, SUBS_PER_TICK:].astype(np.float32)
    return hits, reports

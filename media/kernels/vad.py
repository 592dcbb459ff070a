"""Energy voice activity detection for listening recordings (`input_voice`,
docs/asr.md): one numba call per tick for every listening leg.

Each 20 ms frame (160 G.711 codes) is decoded by table and its energy taken in dBFS.
A noise floor follows the quiet frames (fast down, slow up; very slowly up during
speech too, so a steady loud line cannot pin the VAD in "speech"); a frame is voiced
when it is `margin_db` above that floor and at least `min_dbfs` loud. Speech begins
after START_FRAMES voiced frames in a row; it ends after `end_silence_frames`
unvoiced frames (the cut is TAIL_FRAMES after the last voiced one), or after
`max_speech_frames`; no speech within `no_speech_frames` ends it too.

`media/vad.py` is the typed facade; call that instead.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from media.kernels.g711 import _ALAW_TABLE, _ULAW_TABLE

FRAME = 160  # samples per 20 ms frame at 8 kHz
START_FRAMES = 3  # 60 ms of voiced frames in a row start the speech
TAIL_FRAMES = 10  # the file ends 200 ms after the last voiced frame

# Decisions (column 0 of `decisions`).
GOING = 0
SPEECH_END = 1
NO_SPEECH = 2
MAX_SPEECH = 3

# Columns of the per-leg state (float64): each leg's row lives with its recording.
S_NOISE = 0  # noise floor, dBFS (NaN before the first frame)
S_SEEN = 1  # frames analysed
S_RUN = 2  # voiced frames in a row
S_STARTED = 3  # frame index where the speech began, -1 before
S_SILENCE = 4  # unvoiced frames in a row since the speech began
S_LAST_VOICED = 5  # frame index after the last voiced frame
STATE_COLUMNS = 6

# Columns of the per-leg parameters (float64).
P_NO_SPEECH = 0
P_END_SILENCE = 1
P_MAX_SPEECH = 2
P_MARGIN_DB = 3
P_MIN_DBFS = 4
PARAM_COLUMNS = 5

_FULL_SCALE_SQ = 32768.0 * 32768.0


def reset_state(state: np.ndarray) -> None:
    """A leg's state row before its first frame."""
    state[:] = 0.0
    state[S_NOISE] = np.nan
    state[S_STARTED] = -1.0


@njit(cache=True)
def frame_dbfs(codes: np.ndarray, start: int, alaw: bool) -> float:
    """The energy of the frame codes[start:start + FRAME] in dBFS (-120 for silence)."""
    table = _ALAW_TABLE if alaw else _ULAW_TABLE
    acc = 0.0
    for k in range(start, start + FRAME):
        x = float(table[codes[k]])
        acc += x * x
    return 10.0 * np.log10(acc / FRAME / _FULL_SCALE_SQ + 1e-12)


@njit(cache=True)
def vad_frames(
    codes: np.ndarray,  # uint8, every leg's new frames back to back
    starts: np.ndarray,  # int64 [legs]: the leg's first code in `codes`
    counts: np.ndarray,  # int64 [legs]: its number of whole frames
    alaw: np.ndarray,  # uint8 [legs]: 1 for PCMA codes
    rows: np.ndarray,  # int64 [legs]: the leg's row in `state` and `params`
    state: np.ndarray,  # float64 [rows, STATE_COLUMNS], updated in place
    params: np.ndarray,  # float64 [rows, PARAM_COLUMNS]
    decisions: np.ndarray,  # int64 [legs, 2]: (decision, cut frame index), written
) -> None:
    """Run every leg's new frames through its VAD; stop a leg at its first decision."""
    for i in range(starts.size):
        decisions[i, 0] = GOING
        decisions[i, 1] = 0
        st = state[rows[i]]
        pr = params[rows[i]]
        for f in range(counts[i]):
            db = frame_dbfs(codes, starts[i] + f * FRAME, alaw[i] != 0)
            if np.isnan(st[S_NOISE]):
                st[S_NOISE] = db  # the line before anyone speaks, mostly
            noise = st[S_NOISE]
            voiced = db > max(noise + pr[P_MARGIN_DB], pr[P_MIN_DBFS])
            if not voiced:
                rate = 0.3 if db < noise else 0.05
            else:
                rate = 0.002
            st[S_NOISE] = noise + (db - noise) * rate
            frame = st[S_SEEN]
            st[S_SEEN] = frame + 1.0
            st[S_RUN] = st[S_RUN] + 1.0 if voiced else 0.0
            if st[S_STARTED] < 0.0:
                if st[S_RUN] >= START_FRAMES:
                    st[S_STARTED] = frame + 1.0 - START_FRAMES
                    st[S_SILENCE] = 0.0
                    st[S_LAST_VOICED] = frame + 1.0
                elif st[S_SEEN] >= pr[P_NO_SPEECH]:
                    decisions[i, 0] = NO_SPEECH
                    decisions[i, 1] = int(st[S_SEEN])
                    break
                continue
            if voiced:
                st[S_SILENCE] = 0.0
                st[S_LAST_VOICED] = frame + 1.0
            else:
                st[S_SILENCE] += 1.0
            if st[S_SILENCE] >= pr[P_END_SILENCE]:
                decisions[i, 0] = SPEECH_END
                decisions[i, 1] = int(min(st[S_LAST_VOICED] + TAIL_FRAMES, st[S_SEEN]))
                break
            if st[S_SEEN] - st[S_STARTED] >= pr[P_MAX_SPEECH]:
                decisions[i, 0] = MAX_SPEECH
                decisions[i, 1] = int(st[S_SEEN])
                break

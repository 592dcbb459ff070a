"""The recorder's per-recording placement state as arrays a numba kernel can write
(`media.kernels.recplace`): one row per active recording (`media.recorder.Recording`
reads and writes its row through properties), a `rows × 2 × BUF_SAMPLES` G.711 code
buffer. Legs refer to their recording's row through the leg table's `L_REC` column;
only active recordings hold a row (8 KB of codes each), rows are reused."""

from __future__ import annotations

import numpy as np

# int64 columns
R_CHANNELS = 0  # 1 mono (caller), 2 stereo (caller left, heard right)
R_CODEC = 1  # the recording's law: 0 PCMU, 1 PCMA (packets in the other are transcoded)
R_MAX = 2  # max_samples
R_WRITTEN = 3  # samples per channel already in the file (buffer column 0 is this position)
R_OPEN = 4  # 1: takes audio (started, no stop reason yet)
R_CALLER = 5  # the caller's track: SSRC (-1 none), anchor timestamp, anchor position
R_HEARD = 8  # the heard track, same three columns
R_COLS = 11
# float64 columns
RF_T0 = 0  # wall-clock start (position 0); NaN while the beep plays
RF_COLS = 1

BUF_SAMPLES = 4096  # per channel (media.recorder documents the sizing)
# A stream's packet lands at its anchor + its timestamp's advance, unless that is more
# than REANCHOR_SAMPLES (1 s) behind the wall clock or LEAD_SAMPLES (200 ms) ahead of it:
# then it is anchored again at the wall clock. Ahead is bounded tighter: a packet placed
# far ahead fills the buffer, which is written up to there, and every packet of the other
# channel that is on time would then be too late (media.recorder.Recording._put).
REANCHOR_SAMPLES = 8000
LEAD_SAMPLES = 1600


class RecorderTable:
    """Rows of active recordings; grows by doubling, freed rows are reused."""

    def __init__(self, capacity: int = 0) -> None:
        self.i = np.zeros((capacity, R_COLS), dtype=np.int64)
        self.f = np.full((capacity, RF_COLS), np.nan)
        self.buf = np.zeros((capacity, 2, BUF_SAMPLES), dtype=np.uint8)
        self._free = list(range(capacity - 1, -1, -1))

    def add(self, channels: int, law: int, max_samples: int, silence: int) -> int:
        """A row for a new recording, its buffer silence, its tracks unanchored."""
        if not self._free:
            old = self.i.shape[0]
            new = max(4, 2 * old)
            i = np.zeros((new, R_COLS), dtype=np.int64)
            f = np.full((new, RF_COLS), np.nan)
            buf = np.zeros((new, 2, BUF_SAMPLES), dtype=np.uint8)
            i[:old], f[:old], buf[:old] = self.i, self.f, self.buf
            self.i, self.f, self.buf = i, f, buf
            self._free = list(range(new - 1, old - 1, -1))
        row = self._free.pop()
        self.i[row] = 0
        self.i[row, R_CHANNELS] = channels
        self.i[row, R_CODEC] = law
        self.i[row, R_MAX] = max_samples
        self.i[row, R_CALLER] = self.i[row, R_HEARD] = -1
        self.f[row, RF_T0] = np.nan
        self.buf[row] = silence
        return row

    def remove(self, row: int) -> None:
        self.i[row] = 0  # R_OPEN 0: the kernels place nothing there
        self._free.append(row)

    def __len__(self) -> int:
        return self.i.shape[0] - len(self._free)

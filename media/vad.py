"""Voice activity detection for listening recordings: the typed facade over
`media.kernels.vad` (one kernel call per tick for all listening legs).

`ListenTuning` is the worker's `[asr]` capture settings. `VadBank` holds every
listening leg's VAD state and parameters as rows of two arrays (a leg takes a row when
it starts listening and gives it back at its end), so a tick gathers only the legs'
new frames and makes one kernel call. Call `warm()` once at start-up so no call waits
for a compiler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from media.kernels import vad as _k

FRAME = _k.FRAME
DECISIONS = {_k.SPEECH_END: "speech_end", _k.NO_SPEECH: "no_speech",
             _k.MAX_SPEECH: "max_speech"}  # fmt: skip


@dataclass(frozen=True)
class ListenTuning:
    """How a worker listens (`[asr]`: end_silence_ms, max_speech_ms, speech_margin_db,
    min_speech_dbfs); the defaults are the config's."""

    end_silence_ms: int = 800
    max_speech_ms: int = 15_000
    margin_db: float = 12.0
    min_dbfs: float = -45.0

    def params(self, listen_ms: int) -> np.ndarray:
        """One leg's kernel parameters; the caller has `listen_ms` to start speaking."""
        p = np.zeros(_k.PARAM_COLUMNS, dtype=np.float64)
        p[_k.P_NO_SPEECH] = max(1, listen_ms // 20)
        p[_k.P_END_SILENCE] = max(1, self.end_silence_ms // 20)
        p[_k.P_MAX_SPEECH] = max(1, self.max_speech_ms // 20)
        p[_k.P_MARGIN_DB] = self.margin_db
        p[_k.P_MIN_DBFS] = self.min_dbfs
        return p


class VadBank:
    """The VAD rows of the listening legs (grows by doubling, rows reused)."""

    def __init__(self, rows: int = 16) -> None:
        self.state = np.zeros((rows, _k.STATE_COLUMNS), dtype=np.float64)
        self.params = np.zeros((rows, _k.PARAM_COLUMNS), dtype=np.float64)
        self._free = list(range(rows - 1, -1, -1))

    def take(self, params: np.ndarray) -> int:
        """A row for a leg that starts listening with `params`."""
        if not self._free:
            n = len(self.state)
            self.state = np.concatenate([self.state, np.zeros_like(self.state)])
            self.params = np.concatenate([self.params, np.zeros_like(self.params)])
            self._free = list(range(2 * n - 1, n - 1, -1))
        row = self._free.pop()
        _k.reset_state(self.state[row])
        self.params[row] = params
        return row

    def give_back(self, row: int) -> None:
        self._free.append(row)

    def speech_start_ms(self, row: int) -> int | None:
        """Where the leg's speech began (ms from its first frame), None before it did."""
        started = self.state[row, _k.S_STARTED]
        return None if started < 0 else int(started) * 20

    def run(self, frames: list[np.ndarray], alaw: list[bool], rows: list[int],
            ) -> dict[int, tuple[str, int]]:
        """Each leg's new codes (whole frames) through its VAD, in one kernel call: the
        legs that ended (by their index in `frames`): (reason, the frame index to cut
        at)."""
        counts = np.fromiter((f.size // FRAME for f in frames), dtype=np.int64,
                             count=len(frames))
        starts = np.zeros(len(frames), dtype=np.int64)
        if len(frames) > 1:
            np.cumsum(counts[:-1] * FRAME, out=starts[1:])
        codes = np.concatenate(frames)
        decisions = np.zeros((len(frames), 2), dtype=np.int64)
        _k.vad_frames(codes, starts, counts, np.array(alaw, dtype=np.uint8),
                      np.array(rows, dtype=np.int64), self.state, self.params, decisions)
        ended = np.flatnonzero(decisions[:, 0])
        return {int(i): (DECISIONS[int(decisions[i, 0])], int(decisions[i, 1])) for i in ended}


def warm() -> None:
    """Compile (or load from the on-disk cache) the kernel."""
    bank = VadBank(1)
    row = bank.take(ListenTuning().params(1000))
    bank.run([np.full(FRAME, 0xFF, dtype=np.uint8)], [False], [row])

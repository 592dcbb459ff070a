"""Voice activity detection for listening recordings: the typed facade over
`media.kernels.vad` (one kernel call per tick for all listening legs).

`ListenTuning` is the worker's `[asr]` capture settings; `VadBatch` gathers the new
frames of each listening leg, runs the kernel once and hands back the decisions.
Call `warm()` once at start-up so no call waits for a compiler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from media.kernels import vad as _k

FRAME = _k.FRAME
DECISIONS = {_k.SPEECH_END: "speech_end", _k.NO_SPEECH: "no_speech",
             _k.MAX_SPEECH: "max_speech"}  # fmt: skip
new_state = _k.new_state


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


def speech_start_ms(state: np.ndarray) -> int | None:
    """Where the speech began (ms from the first frame analysed), None before it did."""
    started = state[_k.S_STARTED]
    return None if started < 0 else int(started) * 20


def run(
    frames: list[np.ndarray], alaw: list[bool], states: list[np.ndarray],
    params: list[np.ndarray],
) -> list[tuple[str | None, int]]:
    """Each leg's new codes (whole frames) through its VAD, in one kernel call: per leg
    (None, 0) while it goes on, else (reason, the frame index to cut the file at).
    `states` are updated in place."""
    n = len(frames)
    counts = np.array([f.size // FRAME for f in frames], dtype=np.int64)
    starts = np.zeros(n, dtype=np.int64)
    if n > 1:
        starts[1:] = np.cumsum(counts[:-1] * FRAME)
    codes = np.concatenate([f[: c * FRAME] for f, c in zip(frames, counts, strict=True)])
    state = np.stack(states)
    decisions = np.zeros((n, 2), dtype=np.int64)
    _k.vad_frames(np.ascontiguousarray(codes, dtype=np.uint8), starts, counts,
                  np.array(alaw, dtype=np.uint8), state, np.stack(params), decisions)
    for i, row in enumerate(states):
        row[:] = state[i]
    return [(DECISIONS.get(int(d[0])), int(d[1])) for d in decisions]


def warm() -> None:
    """Compile (or load from the on-disk cache) the kernel."""
    tuning = ListenTuning()
    run([np.full(FRAME, 0xFF, dtype=np.uint8)], [False], [new_state()], [tuning.params(1000)])

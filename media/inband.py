"""In-band DTMF detection for every call of a media worker: the typed facade over
`media.kernels.goertzel`.

Each call owns one slot (a row of preallocated state arrays, grown in chunks).
Once per 20 ms tick the worker stacks the decoded G.711 audio of the calls that
have in-band detection on into one `int16[calls, 160]` array, with the slot of
each row, and gets back the digits that were confirmed during that tick:

    det = InbandDetector()
    slot = det.add()
    ...
    for slot, digit, offset in det.process(samples, slots):
        ...

`offset` is where the digit's tone began, in samples from the start of this
tick's frame (negative: it began in an earlier frame; accurate to about a
5 ms sub-block). A digit is reported once, about 30-35 ms after its tone
began (see the kernel's docstring for the checks and the timing rules).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from media.kernels import goertzel as _k

TICK_SAMPLES = _k.TICK_SAMPLES
DIGITS = _k.DIGITS
_HOP = _k.SUB_SAMPLES
# window of the first of HIT_HOPS hits ends HIT_HOPS-1 hops before the report
_START_FROM_HOP_END = -(_k.HIT_HOPS - 1) * _HOP - _k.WIN_SAMPLES


class InbandDigit(NamedTuple):
    slot: int
    digit: str
    offset: int  # samples from the start of this tick's frame to the tone's start


class InbandDetector:
    """Per-worker in-band DTMF detector state for up to `capacity` calls (grows on demand)."""

    __slots__ = ("_hist", "_sm", "_free", "_used", "_grow_by")

    def __init__(self, capacity: int = 256, grow_by: int = 256) -> None:
        if capacity < 1 or grow_by < 1:
            raise ValueError("capacity and grow_by must be positive")
        self._grow_by = grow_by
        self._hist, self._sm = _k.new_state(capacity)
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def capacity(self) -> int:
        return int(self._sm.shape[0])

    def __len__(self) -> int:
        return len(self._used)

    def add(self) -> int:
        """A fresh slot for a new call (state zeroed)."""
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._used.add(slot)
        self.reset(slot)
        return slot

    def remove(self, slot: int) -> None:
        """Release a call's slot; it may be handed out again by `add`."""
        try:
            self._used.remove(slot)
        except KeyError:
            raise ValueError(f"in-band DTMF slot {slot} is not in use") from None
        self._free.append(slot)

    def reset(self, slot: int) -> None:
        """Forget a call's history (e.g. after a gap in its audio)."""
        hist, sm = _k.new_state(1)
        self._hist[slot] = hist[0]
        self._sm[slot] = sm[0]

    def _grow(self) -> None:
        old = self.capacity
        hist, sm = _k.new_state(old + self._grow_by)
        hist[:old] = self._hist
        sm[:old] = self._sm
        self._hist, self._sm = hist, sm
        self._free.extend(range(old + self._grow_by - 1, old - 1, -1))

    def process(
        self, samples: np.ndarray, slots: np.ndarray, gaps: np.ndarray | None = None
    ) -> list[InbandDigit]:
        """One tick: int16[calls, 160] decoded audio and the slot of each row -> digits confirmed.

        Every slot's audio must come once per tick, in order; a call with no audio
        this tick should get a frame of silence (or `reset` when it resumes).
        `gaps` bool[calls, 4] marks the 5 ms sub-blocks that hold samples no packet
        wrote (`media.rxaudio.RxFrames`): a lost packet is not a pause in a tone
        (the kernel's docstring); None: all of it was heard.
        """
        hits, reports = self.process_raw(samples, slots, gaps)
        if not (reports >= 0).any():
            return []
        rows, hops = np.nonzero(reports >= 0)
        return [
            InbandDigit(
                int(slots[r]),
                DIGITS[int(reports[r, h])],
                (int(h) + 1) * _HOP + _START_FROM_HOP_END,
            )
            for r, h in zip(rows, hops, strict=True)
        ]

    def process_raw(
        self, samples: np.ndarray, slots: np.ndarray, gaps: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """As `process`, but return the kernel's (hits, reports) int8[calls, 4] per 5 ms hop."""
        samples = np.ascontiguousarray(samples, dtype=np.int16)
        slot_ix = np.ascontiguousarray(slots, dtype=np.int64)
        if samples.ndim != 2 or samples.shape[1] != TICK_SAMPLES:
            raise ValueError(f"samples must be int16[calls, {TICK_SAMPLES}], got {samples.shape}")
        if slot_ix.shape != (samples.shape[0],):
            raise ValueError(f"slots must be [{samples.shape[0]}], got {slot_ix.shape}")
        if gaps is None:
            gaps = np.zeros((samples.shape[0], _k.SUBS_PER_TICK), dtype=bool)
        gaps = np.ascontiguousarray(gaps, dtype=bool)
        if gaps.shape != (samples.shape[0], _k.SUBS_PER_TICK):
            raise ValueError(f"gaps must be bool[{samples.shape[0]}, {_k.SUBS_PER_TICK}]")
        if slot_ix.size and (slot_ix.min() < 0 or slot_ix.max() >= self.capacity):
            raise ValueError("slot out of range")
        hits: np.ndarray
        reports: np.ndarray
        hits, reports = _k.detect_tick(samples, slot_ix, self._hist, self._sm, gaps)
        return hits, reports


def warm() -> None:
    """Compile (or load from the on-disk cache) the kernel before the worker reports ready."""
    det = InbandDetector(capacity=2)
    slots = np.array([det.add(), det.add()])
    det.process(np.zeros((2, TICK_SAMPLES), dtype=np.int16), slots)

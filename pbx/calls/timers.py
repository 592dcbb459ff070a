"""The call layer's deadlines: one heap, named timers, the clock passed in.

Every deadline of the call layer (ring timeouts, RFC 4028 refreshes and expiries,
dialog and client-transaction lingers, queue waits, media allocations, the periodic
liveness check) is a
named timer here: `(kind, key)` → deadline. Setting a name again moves it; cancelling
a name that is not set is a no-op. `get_timer()` is the earliest deadline and `due(now)`
pops the names whose time has come, in deadline order, so the shell keeps exactly one
`call_at` for the whole call layer (with the transaction layer's own `get_timer()`).

Cancelled and moved entries stay in the heap until they surface (lazy deletion), so
every operation is O(log n).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from enum import Enum


class TimerKind(Enum):
    RING = "ring"  # a transfer's branches ring too long (key: call id)
    SESSION_REFRESH = "session_refresh"  # RFC 4028: we refresh (key: dialog key)
    SESSION_EXPIRY = "session_expiry"  # RFC 4028: the peer did not (key: dialog key)
    DIALOG_LINGER = "dialog_linger"  # a finished dialog still matches (key: dialog key)
    CLIENT_TXN_LINGER = "client_txn_linger"  # Timer C's role (key: transaction key)
    QUEUE = "queue"  # a queue wait's next deadline (key: call id)
    ALLOCATION = "allocation"  # a media worker's answer is late (key: media id)
    LIVENESS = "liveness"  # worker expiry and IVR session watch (key: None)


TimerName = tuple[TimerKind, Hashable]


class Timers:
    def __init__(self) -> None:
        self._deadlines: dict[TimerName, float] = {}
        self._heap: list[tuple[float, int, TimerName]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._deadlines)

    def __contains__(self, name: TimerName) -> bool:
        return name in self._deadlines

    def set(self, kind: TimerKind, key: Hashable, deadline: float) -> None:
        name = (kind, key)
        self._deadlines[name] = deadline
        heapq.heappush(self._heap, (deadline, next(self._seq), name))

    def cancel(self, kind: TimerKind, key: Hashable) -> None:
        self._deadlines.pop((kind, key), None)

    def deadline(self, kind: TimerKind, key: Hashable) -> float | None:
        return self._deadlines.get((kind, key))

    def get_timer(self) -> float | None:
        heap = self._heap
        while heap:
            deadline, _, name = heap[0]
            if self._deadlines.get(name) == deadline:
                return deadline
            heapq.heappop(heap)  # cancelled or moved
        return None

    def due(self, now: float) -> list[TimerName]:
        """The names whose deadline is at or before `now` (each is unset)."""
        fired: list[TimerName] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, name = heapq.heappop(heap)
            if self._deadlines.get(name) == deadline:
                del self._deadlines[name]
                fired.append(name)
        return fired

"""Retransmission of a UAS's 2xx to INVITE until the ACK (RFC 3261 §13.3.1.4), sans-IO.

The INVITE server transaction ends when it sends a 2xx (RFC 6026 §7.1: it only
absorbs retransmitted INVITEs in Accepted), so the 2xx itself is the TU's to
repeat: at T1, then doubling up to T2, until the ACK arrives or 64*T1 have
passed. Then `AckTimeout` tells the TU to end the dialog (§13.3.1.4: the
dialog is confirmed, but the session SHOULD be terminated with a BYE).
Like the transaction layer, `get_timer()` is the next deadline and
`handle_timer(now)` returns what to send.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from pbx.sip.transaction import T1, T2, Addr, SendBytes

# A dialog as the transaction user knows it: (Call-ID, our tag).
DialogKey = tuple[str, str]


@dataclass(frozen=True)
class AckTimeout:
    """No ACK for a 2xx within 64*T1: the TU ends the dialog (RFC 3261 §13.3.1.4)."""

    dialog_key: DialogKey


@dataclass(eq=False)
class _Pending2xx:
    data: bytes
    addr: Addr
    interval: float
    next_send: float
    give_up: float

    @property
    def deadline(self) -> float:
        return min(self.next_send, self.give_up)


class Uas2xxRetransmitter:
    """Retransmits a UAS's 2xx to INVITE until the ACK (RFC 3261 §13.3.1.4):
    at T1, then doubling up to T2, giving up after 64*T1 with `AckTimeout`.

    Deadlines wait in a heap (entries of acknowledged or restarted 2xx are skipped as
    they surface), so the next deadline costs O(log n) and a timer O(log n) per 2xx
    due: the front asks after every message, and an INVITE flood from many sources
    keeps many 2xx pending (DESIGN §6)."""

    def __init__(self) -> None:
        self._pending: dict[DialogKey, _Pending2xx] = {}
        self._heap: list[tuple[float, int, DialogKey, _Pending2xx]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._pending)

    def start(self, dialog_key: DialogKey, data: bytes, addr: Addr, now: float) -> None:
        pending = _Pending2xx(data, addr, T1, now + T1, now + 64 * T1)
        self._pending[dialog_key] = pending
        self._push(dialog_key, pending)

    def pending(self, dialog_key: DialogKey) -> bool:
        """A 2xx of this dialog is still unacknowledged (and retransmitted)."""
        return dialog_key in self._pending

    def ack(self, dialog_key: DialogKey) -> bool:
        """Stop retransmitting; False if nothing was pending for this dialog."""
        return self._pending.pop(dialog_key, None) is not None

    def get_timer(self) -> float | None:
        heap = self._heap
        while heap:
            deadline, _, dialog_key, pending = heap[0]
            if self._is_current(deadline, dialog_key, pending):
                return deadline
            heapq.heappop(heap)  # stale: acknowledged, restarted or rescheduled
        return None

    def handle_timer(self, now: float) -> list[SendBytes | AckTimeout]:
        events: list[SendBytes | AckTimeout] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, dialog_key, p = heapq.heappop(heap)
            if not self._is_current(deadline, dialog_key, p):
                continue
            if p.give_up <= now:
                del self._pending[dialog_key]
                events.append(AckTimeout(dialog_key))
            else:
                events.append(SendBytes(p.data, p.addr))
                p.interval = min(2 * p.interval, T2)
                p.next_send = now + p.interval
                self._push(dialog_key, p)
        return events

    def _push(self, dialog_key: DialogKey, pending: _Pending2xx) -> None:
        heapq.heappush(self._heap, (pending.deadline, next(self._seq), dialog_key, pending))

    def _is_current(self, deadline: float, dialog_key: DialogKey, pending: _Pending2xx) -> bool:
        return self._pending.get(dialog_key) is pending and pending.deadline == deadline

"""RFC 4733 telephone-event detection: one report per key press.

A sender marks every packet of one event with the same RTP timestamp (the
event's start, RFC 4733 §2.5.1.2), repeats the end packet three times
(§2.5.1.4), and the network may lose or reorder any of them. So an event is
keyed by its timestamp and reported once:

* at the first packet carrying the end bit, or
* when a newer timestamp starts while an older event was seen but never ended
  (its end packets were lost) — the old one is reported first, or
* when no packet of a started event has come for `EVENT_TIMEOUT_S` (`expire`,
  from the tick): its end packets were lost and nothing followed — the last key
  of an entry, say. A sender refreshes an event every 50 ms or so while the key
  is held (§2.5.1.2), so 250 ms of nothing is four refreshes lost in a row; if
  the key was in fact still held, its later packets carry a reported timestamp
  and change nothing (Asterisk ends an event the same way, after 150 ms);

and never again for a timestamp already reported (a short history is kept).
A second press of the same key is a new event with a new timestamp, so it is
reported again.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from media.rtp import TelephoneEvent, ts_newer

EVENT_DIGITS = "0123456789*#ABCD"
_HISTORY = 16
EVENT_TIMEOUT_S = 0.25


def event_digit(event: int) -> str | None:
    """RFC 4733 §3.2 event code -> DTMF digit, None for non-DTMF events."""
    return EVENT_DIGITS[event] if 0 <= event < len(EVENT_DIGITS) else None


class ExpiredEvent(NamedTuple):
    """A started event reported by `expire`: its digit, when its newest packet came
    (the caller's clock) and the duration that packet gave (samples)."""

    digit: str
    seen: float
    duration: int


class Rfc4733Detector:
    """Per-leg detector state: feed every telephone-event packet, get digits back."""

    __slots__ = ("_pending", "_seen", "_duration", "_reported", "_reported_order")

    def __init__(self) -> None:
        # (timestamp, event) of an event seen but not yet reported
        self._pending: tuple[int, int] | None = None
        self._seen = 0.0  # when the pending event's newest packet came
        self._duration = 0  # the duration it gave
        self._reported: set[int] = set()
        self._reported_order: deque[int] = deque()

    @property
    def pending(self) -> bool:
        """An event has started and is not reported yet (`expire` may report it)."""
        return self._pending is not None

    def _report(self, ts: int, event: int, out: list[str]) -> None:
        self._reported.add(ts)
        self._reported_order.append(ts)
        if len(self._reported_order) > _HISTORY:
            self._reported.discard(self._reported_order.popleft())
        if self._pending is not None and self._pending[0] == ts:
            self._pending = None
        digit = event_digit(event)
        if digit is not None:
            out.append(digit)

    def feed(self, timestamp: int, ev: TelephoneEvent, now: float) -> list[str]:
        """One telephone-event packet (its RTP timestamp and payload, arrived at `now`) ->
        digits to report, in order."""
        out: list[str] = []
        if timestamp in self._reported:
            return out
        pending = self._pending
        if pending is not None and pending[0] != timestamp and ts_newer(timestamp, pending[0]):
            # A newer event started: the pending one is over though its end was lost.
            self._report(pending[0], pending[1], out)
            pending = None
        if ev.end:
            self._report(timestamp, ev.event, out)
        elif pending is None or pending[0] == timestamp:
            self._pending = (timestamp, ev.event)
            self._seen = now
            self._duration = max(self._duration if pending is not None else 0, ev.duration)
        else:
            # A late start packet of an older event that was never reported: it is
            # surely over (a newer one is in progress), so report it now.
            self._report(timestamp, ev.event, out)
        return out

    def expire(self, now: float) -> ExpiredEvent | None:
        """The started event, reported now if no packet of it came for `EVENT_TIMEOUT_S`
        (None otherwise, and for an event that is not a digit)."""
        pending = self._pending
        if pending is None or now - self._seen < EVENT_TIMEOUT_S:
            return None
        out: list[str] = []
        self._report(pending[0], pending[1], out)
        return ExpiredEvent(out[0], self._seen, self._duration) if out else None

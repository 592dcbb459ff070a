"""RFC 4733 telephone-event detection: one report per key press.

A sender marks every packet of one event with the same RTP timestamp (the
event's start, RFC 4733 §2.5.1.2), repeats the end packet three times
(§2.5.1.4), and the network may lose or reorder any of them. So an event is
keyed by its timestamp and reported once:

* at the first packet carrying the end bit, or
* when a newer timestamp starts while an older event was seen but never ended
  (its end packets were lost) — the old one is reported first;

and never again for a timestamp already reported (a short history is kept).
A second press of the same key is a new event with a new timestamp, so it is
reported again.
"""

from __future__ import annotations

from collections import deque

from media.rtp import TelephoneEvent, ts_newer

EVENT_DIGITS = "0123456789*#ABCD"
_HISTORY = 16


def event_digit(event: int) -> str | None:
    """RFC 4733 §3.2 event code -> DTMF digit, None for non-DTMF events."""
    return EVENT_DIGITS[event] if 0 <= event < len(EVENT_DIGITS) else None


class Rfc4733Detector:
    """Per-leg detector state: feed every telephone-event packet, get digits back."""

    __slots__ = ("_pending", "_reported", "_reported_order")

    def __init__(self) -> None:
        # (timestamp, event) of an event seen but not yet reported
        self._pending: tuple[int, int] | None = None
        self._reported: set[int] = set()
        self._reported_order: deque[int] = deque()

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

    def feed(self, timestamp: int, ev: TelephoneEvent) -> list[str]:
        """One telephone-event packet (its RTP timestamp and payload) -> digits to report, in order."""
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
        elif pending is None:
            self._pending = (timestamp, ev.event)
        elif pending[0] != timestamp:
            # A late start packet of an older event that was never reported: it is
            # surely over (a newer one is in progress), so report it now.
            self._report(timestamp, ev.event, out)
        return out

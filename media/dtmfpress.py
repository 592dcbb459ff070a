"""One report per key press, whichever sources carry it (RFC 4733, SIP INFO, in-band).

A phone that sends RFC 4733 events usually leaks the tone into the audio too,
and some send SIP INFO as well, so one press can reach the worker two or three
times, in any order: in-band is reported about 100 ms after the tone starts
(detection plus the receive playout delay), RFC 4733 at the end packet
(however long the key is held), INFO whenever the signalling path delivers it.

Each source reports a press with the interval it knows, on the engine's clock
(arrival time of the audio or event packets):

* RFC 4733: [end packet − event duration, end packet];
* in-band: [tone start, end of the frame where it was confirmed];
* INFO: [arrival, arrival + Duration] — only an arrival time, really.

A report is the same press as an earlier one when the digit matches, that press
has not yet been reported by this source, and their intervals overlap or lie
within `SLACK_S` of each other (`INFO_SLACK_S` when INFO is involved: its
timing tells little). Otherwise it is a new press. The same source never
merges with itself: each source already reports one press once (RFC 4733 by
event timestamp, in-band by its hit/miss state), so two reports from one
source are two presses — a key pressed twice quickly stays two digits.
"""

from __future__ import annotations

from dataclasses import dataclass

SLACK_S = 0.06  # timing error of the audio-based estimates (jitter, 5 ms hops, ptime)
INFO_SLACK_S = 0.15  # SIP INFO against either of the others
KEEP_S = 2.0  # presses older than this (by their end) cannot match anything
MAX_PRESSES = 8
# New presses a leg may report in any second: a keypad or an autodialler does at most
# ~12 (ITU-T Q.24: 40 ms tone, 40 ms pause); more is a flood of forged events, each a
# message to the front and a provider request, and is dropped (`flood_dropped`).
MAX_PRESSES_PER_S = 20


@dataclass(slots=True)
class _Press:
    digit: str
    start: float
    end: float
    sources: set[str]


class PressDedupe:
    """Per-leg memory of recent presses."""

    __slots__ = ("_presses", "_second", "_in_second", "flood_dropped")

    def __init__(self) -> None:
        self._presses: list[_Press] = []
        self._second = float("-inf")  # start of the second new presses are counted in
        self._in_second = 0
        self.flood_dropped = 0

    def report(self, digit: str, source: str, start: float, end: float) -> bool:
        """A source reports `digit` over [start, end]: True if it is a new press (report
        it); False for the same press from another source, or past MAX_PRESSES_PER_S."""
        if end < start:
            start, end = end, start
        presses = self._presses
        horizon = end - KEEP_S
        if presses and presses[0].end < horizon:
            presses[:] = [p for p in presses if p.end >= horizon]
        for p in reversed(presses):
            if p.digit != digit or source in p.sources:
                continue
            slack = INFO_SLACK_S if source == "info" or "info" in p.sources else SLACK_S
            if start <= p.end + slack and p.start <= end + slack:
                p.sources.add(source)
                p.start = min(p.start, start)
                p.end = max(p.end, end)
                return False
        if end - self._second >= 1.0:
            self._second, self._in_second = end, 0
        if self._in_second >= MAX_PRESSES_PER_S:
            self.flood_dropped += 1
            return False
        self._in_second += 1
        presses.append(_Press(digit, start, end, {source}))
        if len(presses) > MAX_PRESSES:
            del presses[0]
        return True

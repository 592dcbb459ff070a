"""A media worker's pool of RTP/RTCP port pairs, bound ahead of calls.

The worker keeps `[media] port_pool` pairs bound (fewer when its capacity or the port
range leaves less room) and announces the free ports to the front (MediaPorts, and in
every heartbeat), which hands one out when it answers an INVITE: no round trip on the
call's set-up path. MediaAllocate then takes the named pair out of the pool; the
worker binds a replacement soon after (`fill`, a bounded number of binds per call, so
the tick never waits on it). The kernel is the authority on which ports are free: a
bind that fails moves on to the next even port.
"""

from __future__ import annotations

import random
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pbx.dealer import SEND_WAIT_S
from pbx.messages import MAX_REFUSED_RANGES

Pair = tuple[socket.socket, socket.socket]
Binder = Callable[[str, int, int], "Pair | None"]


def bind_rtp_pair(
    ip: str, low: int, high: int, rng: random.Random | None = None
) -> Pair | None:
    """Non-blocking UDP sockets on a free even port in [low, high] (RTP) and the odd
    port above it (RTCP, RFC 3550 §11), or None when no pair is free."""
    first = low + (low & 1)
    # A range, not a list: a pool refill binds one pair per call, and a list of the
    # whole range (thousands of ints) cost more than the two binds.
    evens = range(first, high, 2)  # port + 1 must be in the range too
    if not evens:
        return None
    start = (rng or random).randrange(len(evens))
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for i in range(len(evens)):
        port = evens[(start + i) % len(evens)]
        rtp = socket.socket(family, socket.SOCK_DGRAM)
        rtcp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            rtp.bind((ip, port))
            rtcp.bind((ip, port + 1))
        except OSError:
            rtp.close()
            rtcp.close()
            continue
        rtp.setblocking(False)
        rtcp.setblocking(False)
        return rtp, rtcp
    return None


def bind_rtp_socket(
    ip: str, low: int, high: int, rng: random.Random | None = None
) -> socket.socket | None:
    """A non-blocking UDP socket bound to a free even port in [low, high], or None."""
    first = low + (low & 1)
    evens = range(first, high + 1, 2)
    if not evens:
        return None
    start = (rng or random).randrange(len(evens))
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    for i in range(len(evens)):
        port = evens[(start + i) % len(evens)]
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.bind((ip, port))
        except OSError:
            sock.close()
            continue
        sock.setblocking(False)
        return sock
    return None


def pairs_in_range(low: int, high: int) -> int:
    """How many RTP/RTCP pairs (even port, port + 1) fit in [low, high]."""
    return len(range(low + (low & 1), high, 2))  # as bind_rtp_pair counts them


class RtpPortPool:
    """Bound RTP/RTCP pairs by RTP port, oldest first. `changed` says the free list
    differs from the one last announced (the worker clears it when it announces)."""

    def __init__(self, ip: str, low: int, high: int, size: int,
                 bind: Binder = bind_rtp_pair) -> None:
        self.ip, self.low, self.high = ip, low, high
        self.size = min(size, pairs_in_range(low, high))
        self.bind = bind
        self.pairs: dict[int, Pair] = {}
        self.changed = False
        # The last fill found no free pair in the range (other programs, or the legs,
        # hold them all); the worker tries again later (a release, a heartbeat).
        self.exhausted = False

    def __len__(self) -> int:
        return len(self.pairs)

    def __contains__(self, port: int) -> bool:
        return port in self.pairs

    def ports(self) -> list[int]:
        return list(self.pairs)

    def take(self, port: int) -> Pair | None:
        """The pair of RTP port `port`, out of the pool; None if the pool has no such port."""
        pair = self.pairs.pop(port, None)
        if pair is not None:
            self.changed = True
        return pair

    def fill(self, room: int, max_binds: int) -> bool:
        """Bind pairs until the pool holds `size` of them, or `room` (the calls the worker
        may still take), binding at most `max_binds` now. True if more are wanted and
        the range may have them (call again)."""
        want = min(self.size, room)
        bound = 0
        while len(self.pairs) < want and bound < max_binds:
            pair = self.bind(self.ip, self.low, self.high)
            if pair is None:
                self.exhausted = True
                return False
            self.exhausted = False
            self.pairs[pair[0].getsockname()[1]] = pair
            self.changed = True
            bound += 1
        return len(self.pairs) < want

    def close(self) -> None:
        for rtp, rtcp in self.pairs.values():
            rtp.close()
            rtcp.close()
        self.pairs.clear()


# A refused (or never received) MediaAllocate is named in every announcement for this
# long: longer than a message waits in the worker's outbox (`pbx.dealer.SEND_WAIT_S`),
# so a front that never got the refusal itself still learns it before anything else.
REFUSED_KEEP_S = 2 * SEND_WAIT_S


@dataclass(slots=True)
class _SeqRange:
    first: int
    last: int
    at: float  # when it was last extended


class RefusedSeqs:
    """The MediaAllocate numbers that gave their leg no port, as the worker announces
    them (`MediaPorts.refused`): inclusive ranges, oldest first, consecutive numbers in
    one range. At most MAX_REFUSED_RANGES (the oldest goes first), each for
    REFUSED_KEEP_S after it was last extended (pure: the clock is passed in)."""

    def __init__(self) -> None:
        self._ranges: deque[_SeqRange] = deque()

    def add(self, first: int, last: int, now: float) -> None:
        ranges = self._ranges
        if ranges and ranges[-1].last + 1 == first:
            ranges[-1].last, ranges[-1].at = last, now
            return
        ranges.append(_SeqRange(first, last, now))
        if len(ranges) > MAX_REFUSED_RANGES:
            ranges.popleft()

    def ranges(self, now: float) -> list[tuple[int, int]]:
        """The ranges still announced at `now`."""
        ranges = self._ranges
        while ranges and ranges[0].at + REFUSED_KEEP_S <= now:
            ranges.popleft()
        return [(r.first, r.last) for r in ranges]

"""Worker registry: which workers are alive and which one takes the next job.

Pure (the clock is passed in), after zguide's Paranoid Pirate broker: every
frame from a worker refreshes its expiry; a worker not heard from within
`expiry_s` is expired. Unlike ppqueue, busy workers stay in the registry, since
our jobs (calls, sessions) last minutes: a busy worker is tracked for liveness
just like an idle one. Used by the front for both media workers and IVR
executors.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WorkerInfo:
    identity: bytes
    capacity: int
    load: int  # calls (media) or sessions in flight (IVR), as last reported plus our own assignments
    expires_at: float
    last_assigned_at: float = 0.0
    # What the worker declared about itself when it joined (a media worker's RTP
    # address); fixed for the worker's life in the registry.
    address: str = ""


class WorkerRegistry:
    def __init__(self, expiry_s: float) -> None:
        self.expiry_s = expiry_s
        self._workers: dict[bytes, WorkerInfo] = {}

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, identity: bytes) -> bool:
        return identity in self._workers

    def workers(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    def ready(self, identity: bytes, capacity: int, load: int, now: float,
              address: str = "") -> bool:
        """A worker said ready (or heartbeated). Returns True if it is new to us.
        `address` is kept from the first time (see `address_of`)."""
        info = self._workers.get(identity)
        if info is None:
            self._workers[identity] = WorkerInfo(identity, capacity, load, now + self.expiry_s,
                                                 address=address)
            return True
        info.capacity = capacity
        info.load = load
        info.expires_at = now + self.expiry_s
        return False

    def address_of(self, identity: bytes) -> str | None:
        """The address a worker declared when it joined; None for an unknown worker."""
        info = self._workers.get(identity)
        return None if info is None else info.address

    def seen(self, identity: bytes, now: float) -> bool:
        """Any frame from a worker refreshes its expiry. False if the worker is unknown."""
        info = self._workers.get(identity)
        if info is None:
            return False
        info.expires_at = now + self.expiry_s
        return True

    def expire(self, now: float) -> list[bytes]:
        """Drop and return the workers whose expiry has passed."""
        gone = [w.identity for w in self._workers.values() if w.expires_at <= now]
        for identity in gone:
            del self._workers[identity]
        return gone

    def remove(self, identity: bytes) -> None:
        self._workers.pop(identity, None)

    def choose(self, now: float, exclude: frozenset[bytes] = frozenset()) -> bytes | None:
        """The least-loaded live worker with room; ties go to the least recently assigned.

        The choice counts as one more unit of load until the next heartbeat
        corrects it, so a burst of calls spreads over workers.
        """
        best: WorkerInfo | None = None
        for info in self._workers.values():
            if info.identity in exclude or info.expires_at <= now or info.load >= info.capacity:
                continue
            if best is None or (info.load, info.last_assigned_at) < (
                best.load,
                best.last_assigned_at,
            ):
                best = info
        if best is None:
            return None
        best.load += 1
        best.last_assigned_at = now
        return best.identity

    def assign(self, identity: bytes, now: float) -> bool:
        """Count one more unit of load on a given live worker (e.g. a call's second leg)."""
        info = self._workers.get(identity)
        if info is None or info.expires_at <= now:
            return False
        info.load += 1
        info.last_assigned_at = now
        return True

    def release(self, identity: bytes) -> None:
        info = self._workers.get(identity)
        if info is not None and info.load > 0:
            info.load -= 1

    def next_expiry(self) -> float | None:
        return min((w.expires_at for w in self._workers.values()), default=None)

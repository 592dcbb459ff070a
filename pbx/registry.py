"""Worker registry: which workers are alive and which one takes the next job.

Pure (the clock is passed in), after zguide's Paranoid Pirate broker: every
frame from a worker refreshes its expiry; a worker not heard from within
`expiry_s` is expired. Unlike ppqueue, busy workers stay in the registry, since
our jobs (calls, sessions) last minutes: a busy worker is tracked for liveness
just like an idle one. Used by the front for both media workers and IVR
executors; `MediaWorkerRegistry` adds each media worker's pool of pre-bound RTP ports
(`PortPool`), so the front hands a port out without asking the worker.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple


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


@dataclass
class PortHold:
    """A port the front handed out: to which leg, under which MediaAllocate `seq`."""

    call_id: str
    seq: int
    handed_at: float


@dataclass(frozen=True)
class Handout:
    worker: bytes
    port: int
    seq: int  # MediaAllocate.seq


class Verdicts(NamedTuple):
    """What an announcement says of the allocations it covers (leg ids)."""

    confirmed: list[str]
    refused: list[str]


class PortPool:
    """One media worker's pre-bound RTP ports, as the front knows them (pure).

    The worker announces its whole free list with the `seq` of the last MediaAllocate it
    handled (`announce`); the front hands ports out of that list (`hand_out`) and numbers
    each hand-out with the next `seq`. Reconciliation rule:

        free = last announced list - held ports

    A port is *held* from its hand-out until both (a) its leg no longer uses it (the leg
    was released, or its allocation failed: `release`) and (b) an announcement the worker
    sent after handling that hand-out has arrived (`allocate_seq` >= the hand-out's
    `seq`). Such an announcement knows what became of the port: it lists it only if the
    worker still has it free (it refused the allocation, or bound the port again after
    the leg's release), so from then on the list alone is right. An older announcement
    may still list a port the worker has since taken; the hold keeps it out. So a stale
    announcement never gets a port handed out twice, and a port is never handed out
    while a leg uses it, whatever any announcement says.

    The worker's messages reach the front in the order it sent them (one ZeroMQ
    connection), and MediaAllocate numbers only grow: a front that (re)learns a worker
    goes on from the worker's `allocate_seq`.

    A worker may also announce a shared port (`[media] rtp_socket`): any number of legs
    use it at once (their packets told apart by source address), so it is never held
    or free; its hand-outs are tracked by leg (`shared_in_use`), and the worker's
    capacity (the registry's load) is what bounds them.
    """

    def __init__(self) -> None:
        self.announced: dict[int, None] = {}  # the last list, in the worker's order
        self.allocate_seq = 0  # as of `announced`
        self.next_seq = 1
        # Held ports: those a leg uses, and those released whose fate no announcement
        # has told yet (few: an announcement follows every tick with allocations).
        self.in_use: dict[int, PortHold] = {}
        self.retiring: dict[int, PortHold] = {}
        # Ports in use not yet confirmed (by an announcement that covers their `seq`, or
        # a MediaAllocated), in hand-out order.
        self.unconfirmed: dict[int, PortHold] = {}
        self.shared_port: int | None = None
        # Legs on the shared port (call id -> hold), and those not confirmed yet.
        self.shared_in_use: dict[str, PortHold] = {}
        self.shared_unconfirmed: dict[str, PortHold] = {}

    def held(self, port: int) -> bool:
        return port in self.in_use or port in self.retiring

    def announce(self, ports: Iterable[int], allocate_seq: int,
                 shared_port: int | None = None,
                 refused: Sequence[tuple[int, int]] = ()) -> Verdicts:
        """The worker's free list; returns the verdicts on the legs handed out up to
        `allocate_seq` and still unconfirmed: refused if a range of `refused` holds their
        `seq` (the worker refused the allocation, or never got it), else confirmed. A
        refusal's MediaAllocated usually came first, and its leg let go of the port
        (`release`); `refused` covers one that was lost. The worker answers a successful
        MediaAllocate with nothing else (`pbx.messages`, version 4)."""
        self.shared_port = shared_port
        self.announced = dict.fromkeys(ports)
        self.allocate_seq = allocate_seq
        self.next_seq = max(self.next_seq, allocate_seq + 1)
        told = [port for port, hold in self.retiring.items() if hold.seq <= allocate_seq]
        for port in told:
            del self.retiring[port]
        judged = (_pop_through(self.unconfirmed, allocate_seq)
                  + _pop_through(self.shared_unconfirmed, allocate_seq))
        if not refused:
            return Verdicts([hold.call_id for hold in judged], [])
        verdicts = Verdicts([], [])
        for hold in judged:
            failed = any(first <= hold.seq <= last for first, last in refused)
            (verdicts.refused if failed else verdicts.confirmed).append(hold.call_id)
        return verdicts

    def free_ports(self) -> list[int]:
        return [port for port in self.announced if not self.held(port)]

    def free_port(self) -> int | None:
        in_use, retiring = self.in_use, self.retiring
        for port in self.announced:
            if port not in in_use and port not in retiring:
                return port
        return None

    def hand_out(self, call_id: str, now: float, shared: bool = False
                 ) -> tuple[int, int] | None:
        """A free port for the leg `call_id` and the `seq` of its MediaAllocate; with
        `shared`, the shared port if the worker has one (else a free port)."""
        if shared and self.shared_port is not None:
            seq, self.next_seq = self.next_seq, self.next_seq + 1
            hold = PortHold(call_id, seq, now)
            self.shared_in_use[call_id] = hold
            self.shared_unconfirmed[call_id] = hold
            return self.shared_port, seq
        port = self.free_port()
        if port is None:
            return None
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        hold = PortHold(call_id, seq, now)
        self.in_use[port] = hold
        self.unconfirmed[port] = hold
        return port, seq

    def confirm(self, port: int, call_id: str) -> bool:
        """The worker said it gave the leg its port (a MediaAllocated without error).
        False if the port is not in use by that leg."""
        if port == self.shared_port and call_id in self.shared_in_use:
            self.shared_unconfirmed.pop(call_id, None)
            return True
        hold = self.in_use.get(port)
        if hold is None or hold.call_id != call_id:
            return False
        self.unconfirmed.pop(port, None)
        return True

    def release(self, port: int, call_id: str | None = None) -> None:
        """The leg no longer uses its port; the port comes back per the rule above (a
        shared leg, named by `call_id`, just leaves)."""
        if call_id is not None and call_id in self.shared_in_use:
            del self.shared_in_use[call_id]
            self.shared_unconfirmed.pop(call_id, None)
            return
        hold = self.in_use.pop(port, None)
        if hold is None:
            return
        self.unconfirmed.pop(port, None)
        if hold.seq > self.allocate_seq:
            self.retiring[port] = hold

    def overdue(self, handed_before: float) -> list[str]:
        """The legs whose port was handed out before `handed_before` and never
        confirmed; each is reported once."""
        late: list[str] = []
        while self.shared_unconfirmed:
            call_id, hold = next(iter(self.shared_unconfirmed.items()))
            if hold.handed_at >= handed_before:
                break
            del self.shared_unconfirmed[call_id]
            late.append(call_id)
        while self.unconfirmed:
            port, hold = next(iter(self.unconfirmed.items()))
            if hold.handed_at >= handed_before:
                break
            del self.unconfirmed[port]
            late.append(hold.call_id)
        return late


def _pop_through(pending: dict[Any, PortHold], seq: int) -> list[PortHold]:
    """The holds in `pending` (in hand-out order, so in `seq` order) up to `seq`, taken
    out of it."""
    holds: list[PortHold] = []
    while pending:
        key, hold = next(iter(pending.items()))
        if hold.seq > seq:
            break
        del pending[key]
        holds.append(hold)
    return holds


class MediaWorkerRegistry(WorkerRegistry):
    """The media workers: liveness and load as `WorkerRegistry`, plus each worker's
    `PortPool`. A worker is chosen only with a free port; its pool is forgotten with it
    (expiry or removal)."""

    def __init__(self, expiry_s: float) -> None:
        super().__init__(expiry_s)
        self._pools: dict[bytes, PortPool] = {}

    def announce(self, identity: bytes, ports: Iterable[int], allocate_seq: int,
                 shared_port: int | None = None,
                 refused: Sequence[tuple[int, int]] = ()) -> Verdicts | None:
        """A worker's free list and shared port (MediaPorts or a heartbeat): the verdicts
        on the legs whose allocation it covers (`PortPool.announce`); None for an
        unknown worker."""
        if identity not in self._workers:
            return None
        pool = self._pools.get(identity)
        if pool is None:
            pool = self._pools[identity] = PortPool()
        return pool.announce(ports, allocate_seq, shared_port, refused)

    def pool(self, identity: bytes) -> PortPool | None:
        return self._pools.get(identity)

    def _has_free(self, identity: bytes, shared: bool = False) -> bool:
        pool = self._pools.get(identity)
        return pool is not None and (
            (shared and pool.shared_port is not None) or pool.free_port() is not None)

    def hand_out(self, call_id: str, now: float, worker: bytes | None = None,
                 shared: bool = False) -> Handout | None:
        """A port for the leg `call_id`: on `worker` if given (alive, with a free port;
        a call's second leg), else on the least-loaded live worker with room and a free
        port. With `shared`, the worker's shared port where it has one (capacity still
        bounds it). Counts one more unit of load on it, as `choose` / `assign` do."""
        if worker is None:
            exclude = frozenset(w for w in self._workers if not self._has_free(w, shared))
            worker = self.choose(now, exclude)
            if worker is None:
                return None
        elif not self._has_free(worker, shared) or not self.assign(worker, now):
            return None
        taken = self._pools[worker].hand_out(call_id, now, shared)
        assert taken is not None  # it had a free port
        return Handout(worker, *taken)

    def on_shared_port(self, identity: bytes, call_id: str) -> bool:
        """Whether the leg `call_id` was handed the worker's shared port."""
        pool = self._pools.get(identity)
        return pool is not None and call_id in pool.shared_in_use

    def confirm(self, identity: bytes, port: int, call_id: str) -> bool:
        pool = self._pools.get(identity)
        return pool is not None and pool.confirm(port, call_id)

    def release(self, identity: bytes, port: int | None = None,
                call_id: str | None = None) -> None:
        """One unit of load less; with `port`, that leg's (`call_id`) port is released too."""
        super().release(identity)
        pool = self._pools.get(identity)
        if port is not None and pool is not None:
            pool.release(port, call_id)

    def overdue(self, handed_before: float) -> list[tuple[bytes, str]]:
        """(worker, leg) of every hand-out unconfirmed since before `handed_before`."""
        return [(identity, call_id) for identity, pool in self._pools.items()
                for call_id in pool.overdue(handed_before)]

    def free_ports(self) -> int:
        """Free ports over every live worker (for /metrics)."""
        return sum(len(pool.free_ports()) for pool in self._pools.values())

    def expire(self, now: float) -> list[bytes]:
        gone = super().expire(now)
        for identity in gone:
            self._pools.pop(identity, None)
        return gone

    def remove(self, identity: bytes) -> None:
        super().remove(identity)
        self._pools.pop(identity, None)

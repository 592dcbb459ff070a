"""A media worker's side of the media plane for front tests, without sockets.

What `workers.media` does, by hand: it joins (MediaReady, then MediaPorts), takes the
port a MediaAllocate names out of its pool and "binds" the next one, and announces the
new pool after every allocation (which confirms it; a refusal is a MediaAllocated first,
and it and any number that never arrived are in the announcements' `refused`);
MediaRelease gets MediaReleased. What
it sends goes to `deliver(identity, message)`: the call core on the virtual clock
(tests/calls/rig.py) or the real front shell (tests/test_front_shell.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pbx import messages as m

Deliver = Callable[[bytes, Any], None]


class FakeMediaWorker:
    """`allocated_ip`: set it to another address than the declared one to play a worker
    that contradicts itself (it then confirms each allocation with a MediaAllocated
    naming that address)."""

    def __init__(self, deliver: Deliver, identity: bytes = b"w", rtp_ip: str = "127.0.0.1",
                 first_port: int = 30000, pool: int = 8, capacity: int = 100) -> None:
        self.deliver, self.identity, self.rtp_ip = deliver, identity, rtp_ip
        self.capacity = capacity
        self.allocated_ip = rtp_ip
        self.next_port = first_port
        self.pool: list[int] = []
        self.seq = 0  # the last MediaAllocate.seq handled
        self.refused: list[tuple[int, int]] = []  # kept for ever (the real one: a while)
        self.legs: dict[str, int] = {}
        for _ in range(pool):
            self._bind()

    def _bind(self) -> None:
        self.pool.append(self.next_port)
        self.next_port += 2

    # what it sends of its own --------------------------------------------------

    def ports(self) -> m.MediaPorts:
        return m.MediaPorts(ports=list(self.pool), allocate_seq=self.seq,
                            refused=list(self.refused))

    def heartbeat(self, calls: int | None = None) -> m.MediaHeartbeat:
        return m.MediaHeartbeat(
            worker_id=self.identity.decode(), calls=len(self.legs) if calls is None else calls,
            capacity=self.capacity, rtp_ip=self.rtp_ip, ports=list(self.pool),
            allocate_seq=self.seq, refused=list(self.refused))

    def join(self) -> None:
        """MediaReady, then its pool: what a starting worker sends."""
        self.deliver(self.identity, m.MediaReady(
            worker_id=self.identity.decode(), capacity=self.capacity, rtp_ip=self.rtp_ip))
        self.deliver(self.identity, self.ports())

    # what it answers -------------------------------------------------------------

    def answer(self, msg: Any) -> list[Any]:
        """Its replies to one message from the front, in order."""
        if isinstance(msg, m.MediaAllocate):
            if msg.seq > self.seq + 1:  # some never arrived
                self.refused.append((self.seq + 1, msg.seq - 1))
            self.seq = msg.seq
            held = self.legs.get(msg.call_id)
            if held is not None:  # as workers.media: asked again, the same answer
                if held == msg.rtp_port:
                    return [self.ports()]
                return [m.MediaAllocated(call_id=msg.call_id,
                                         error=f"the leg already has port {held}")]
            if msg.rtp_port not in self.pool:
                self.refused.append((msg.seq, msg.seq))
                return [m.MediaAllocated(call_id=msg.call_id, error="not in the pool"),
                        self.ports()]
            self.pool.remove(msg.rtp_port)
            self._bind()
            self.legs[msg.call_id] = msg.rtp_port
            if self.allocated_ip != self.rtp_ip:  # it says so, and contradicts itself
                return [m.MediaAllocated(call_id=msg.call_id, rtp_ip=self.allocated_ip,
                                         rtp_port=msg.rtp_port), self.ports()]
            return [self.ports()]  # the announcement confirms it (`allocate_seq`)
        if isinstance(msg, m.MediaRelease):
            self.legs.pop(msg.call_id, None)
            return [m.MediaReleased(legs=[m.ReleasedLeg(call_id=msg.call_id, packets_sent=10,
                                                        packets_received=9)])]
        return []

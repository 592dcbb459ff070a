"""Call queues: who is rung, in which order, for how long. Pure: time comes in as `now`.

A `[queues.<name>]` section (or `[skill_groups.<name>]` behind a `route_to_agent`) is
served by two objects:

* `QueueBook` — what a queue remembers between callers: where round robin stopped,
  when each member last finished a queue call (longest idle first), and who is busy
  on a queue call now (busy members are not rung).
* `QueueWait` — one caller waiting in the queue. It answers the front's inputs
  (`start`, `member_failed`, `member_answered`, `abandon`, `handle_timer`) with
  actions for the front to carry out: `Ring(member)`, `Cancel(member)`, `GiveUp()`.
  Like the transaction layer it offers `get_timer()` (the next deadline) and the front
  keeps one `call_at` on it.

Theory of operation. A wait rings members in *rounds*. `ring_all` rings every free
member at once and lets them ring until the queue's `timeout_ms`; `round_robin` and
`longest_idle` ring one member at a time for `member_ring_ms`, in the order the book
gives (round robin: starting after the last member tried by any caller of this queue;
longest idle: the member whose last queue call ended longest ago first, members never
connected before everyone else, ties in configuration order). A member that fails
(busy, error, unreachable) or whose turn ends is done for this round. When a round is
exhausted the wait pauses `ROUND_PAUSE_MS` and starts the next one, so members who are
all busy are not hammered. At the queue's `timeout_ms` every ringing member is
cancelled and the wait gives up. The first member to answer wins; every other ringing
member is cancelled.

`route_to_agent` with a skill group is a wait with `first=<agent>`: the agent alone is
rung for `member_ring_ms`, then the group's members in rounds as above; its deadline is
the agent's turn plus the group's `timeout_ms`.
"""

from __future__ import annotations

import math
from collections.abc import KeysView
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pbx.config import QueueSettings

# Pause between two rounds in which nobody answered (Asterisk's `retry`).
ROUND_PAUSE_MS = 2_000


@dataclass(frozen=True)
class Ring:
    member: str


@dataclass(frozen=True)
class Cancel:
    member: str


@dataclass(frozen=True)
class GiveUp:
    reason: str = "no_answer"


QueueAction = Ring | Cancel | GiveUp


class QueueError(Exception):
    """An input the wait cannot take in its state (a bug in the caller)."""


class WaitState(Enum):
    RINGING = "ringing"  # members are being rung (or a pause between rounds)
    ANSWERED = "answered"
    GAVE_UP = "gave_up"
    ABANDONED = "abandoned"  # the caller left


class QueueBook:
    """A queue's memory across callers (one per queue, kept by the front)."""

    def __init__(self, members: list[str]) -> None:
        self.members = list(members)
        self.next_index = 0  # round robin: where the next round starts
        self.idle_since: dict[str, float] = {m: -math.inf for m in self.members}
        # Queue calls each member is on: most phones take one, some answer a second
        # line, and the member is free only when all have ended.
        self.calls_of: dict[str, int] = {}

    def set_members(self, members: list[str]) -> None:
        """New members (a reload): round robin goes on after the member it last tried if
        that one stays; idle times and busy members are kept."""
        last = self.members[self.next_index - 1] if self.members else None
        self.members = list(members)
        self.next_index = (self.members.index(last) + 1) % len(self.members) \
            if last in self.members else 0
        self.idle_since = {m: self.idle_since.get(m, -math.inf) for m in self.members}

    def order(self, strategy: str) -> list[str]:
        """The free members in the order a new round rings them."""
        free = [m for m in self.members if m not in self.busy]
        if strategy == "round_robin":
            n = len(self.members)
            rotated = [self.members[(self.next_index + i) % n] for i in range(n)]
            return [m for m in rotated if m not in self.busy]
        if strategy == "longest_idle":
            # sorted() is stable: ties keep the configuration order.
            return sorted(free, key=lambda m: self.idle_since.get(m, -math.inf))
        return free

    def tried(self, member: str) -> None:
        """A member was rung: round robin continues after it."""
        if member in self.members:
            self.next_index = (self.members.index(member) + 1) % len(self.members)

    @property
    def busy(self) -> KeysView[str]:
        """The members on a queue call."""
        return self.calls_of.keys()

    def connected(self, member: str) -> None:
        self.calls_of[member] = self.calls_of.get(member, 0) + 1

    def released(self, member: str, now: float) -> None:
        """One of the member's queue calls ended: free again when it was the last, idle
        from now."""
        left = self.calls_of.get(member, 0) - 1
        if left > 0:
            self.calls_of[member] = left
            return
        self.calls_of.pop(member, None)
        if member in self.idle_since:
            self.idle_since[member] = now


class QueueWait:
    """One caller in one queue (see the module text)."""

    def __init__(self, settings: QueueSettings, book: QueueBook, now: float,
                 first: str | None = None, round_pause_ms: int = ROUND_PAUSE_MS) -> None:
        self.settings = settings
        self.book = book
        self.first = first
        self.round_pause_s = round_pause_ms / 1000
        self.turn_s = settings.member_ring_ms / 1000
        self.deadline = now + settings.timeout_ms / 1000 + (self.turn_s if first else 0.0)
        self.state = WaitState.RINGING
        self.one_at_a_time = settings.strategy != "ring_all"
        # member -> when its ringing ends (its turn, or the queue deadline for ring_all)
        self.ringing: dict[str, float] = {}
        self.pending: list[str] = []  # the rest of the current round (one at a time)
        self.pause_until: float | None = None
        self.answered_by: str | None = None
        self.rounds = 0
        self.agent_turn = False  # ringing `first` alone, before any round

    # Fields that change as the wait goes (the rest follows from the settings).
    _STATE_FIELDS = ("first", "deadline", "ringing", "pending", "pause_until",
                     "answered_by", "rounds", "agent_turn")

    def to_dict(self) -> dict[str, Any]:
        """The wait as plain JSON types (times on the front's monotonic clock)."""
        data: dict[str, Any] = {name: getattr(self, name) for name in self._STATE_FIELDS}
        data.update(state=self.state.value, ringing=dict(self.ringing),
                    pending=list(self.pending), round_pause_s=self.round_pause_s)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], settings: QueueSettings,
                  book: QueueBook) -> QueueWait:
        wait = cls(settings, book, 0.0, first=data["first"],
                   round_pause_ms=round(data["round_pause_s"] * 1000))
        for name in cls._STATE_FIELDS:
            setattr(wait, name, data[name])
        wait.state = WaitState(data["state"])
        wait.ringing = dict(data["ringing"])
        wait.pending = list(data["pending"])
        return wait

    # ---------------------------------------------------------------- inputs

    def start(self, now: float) -> list[QueueAction]:
        if self.first is not None:
            self.agent_turn = True
            self.pending = [self.first]
            return self._ring_next(now)
        return self._new_round(now)

    def member_failed(self, member: str, now: float) -> list[QueueAction]:
        """The member's leg ended without answering (error response, unreachable)."""
        if self.state is not WaitState.RINGING or member not in self.ringing:
            return []  # a leg we already cancelled, or a late answer to an old round
        del self.ringing[member]
        return self._after_member(now)

    def member_answered(self, member: str, now: float) -> list[QueueAction]:
        """A member answered: it wins unless the wait is already over (then the front
        hangs that leg up)."""
        if self.state is not WaitState.RINGING or member not in self.ringing:
            raise QueueError(f"member {member!r} answered in state {self.state.value}"
                             f" while ringing {sorted(self.ringing)}")
        del self.ringing[member]
        self.state = WaitState.ANSWERED
        self.answered_by = member
        self.book.connected(member)
        return self._cancel_all()

    def abandon(self) -> list[QueueAction]:
        """The caller hung up: cancel whoever rings."""
        if self.state is not WaitState.RINGING:
            return []
        self.state = WaitState.ABANDONED
        return self._cancel_all()

    def get_timer(self) -> float | None:
        if self.state is not WaitState.RINGING:
            return None
        deadlines = [self.deadline, *self.ringing.values()]
        if self.pause_until is not None:
            deadlines.append(self.pause_until)
        return min(deadlines)

    def handle_timer(self, now: float) -> list[QueueAction]:
        if self.state is not WaitState.RINGING:
            return []
        if now >= self.deadline:
            self.state = WaitState.GAVE_UP
            return [*self._cancel_all(), GiveUp()]
        actions: list[QueueAction] = []
        expired = [m for m, end in self.ringing.items() if end <= now]
        for member in expired:
            del self.ringing[member]
            actions.append(Cancel(member))
        if expired:
            actions += self._after_member(now)
        elif self.pause_until is not None and now >= self.pause_until:
            self.pause_until = None
            actions += self._new_round(now)
        return actions

    # ---------------------------------------------------------------- rounds

    def _after_member(self, now: float) -> list[QueueAction]:
        if self.ringing:
            return []  # ring_all: others still ring
        if self.pending:
            return self._ring_next(now)
        if self.agent_turn:  # the agent did not answer: on to the group at once
            self.agent_turn = False
            return self._new_round(now)
        self.pause_until = min(now + self.round_pause_s, self.deadline)
        return []

    def _new_round(self, now: float) -> list[QueueAction]:
        self.rounds += 1
        order = self.book.order(self.settings.strategy)
        if not order:  # everyone busy: look again after a pause
            self.pause_until = min(now + self.round_pause_s, self.deadline)
            return []
        if self.one_at_a_time:
            self.pending = order
            return self._ring_next(now)
        actions: list[QueueAction] = []
        for member in order:
            self.ringing[member] = self.deadline
            self.book.tried(member)
            actions.append(Ring(member))
        return actions

    def _ring_next(self, now: float) -> list[QueueAction]:
        member = self.pending.pop(0)
        self.ringing[member] = min(now + self.turn_s, self.deadline)
        self.book.tried(member)
        return [Ring(member)]

    def _cancel_all(self) -> list[QueueAction]:
        actions: list[QueueAction] = [Cancel(m) for m in self.ringing]
        self.ringing.clear()
        self.pending = []
        self.pause_until = None
        return actions

"""Queue member selection and ring timing on a virtual clock (pbx.queues)."""

from __future__ import annotations

import pytest

from pbx.config import QueueSettings
from pbx.queues import (
    ROUND_PAUSE_MS,
    Cancel,
    GiveUp,
    QueueBook,
    QueueError,
    QueueWait,
    Ring,
    WaitState,
)

PAUSE_S = ROUND_PAUSE_MS / 1000


def settings(strategy: str, members: tuple[str, ...] = ("a", "b", "c"), timeout_ms: int = 30_000,
             member_ring_ms: int = 10_000) -> QueueSettings:
    return QueueSettings(members=list(members), strategy=strategy,  # type: ignore[arg-type]
                         timeout_ms=timeout_ms, member_ring_ms=member_ring_ms)


def rung(actions: list[object]) -> list[str]:
    return [a.member for a in actions if isinstance(a, Ring)]


def cancelled(actions: list[object]) -> list[str]:
    return [a.member for a in actions if isinstance(a, Cancel)]


# ---------------------------------------------------------------- ring_all


def test_ring_all_rings_everyone_and_first_answer_cancels_the_others() -> None:
    s = settings("ring_all")
    book = QueueBook(s.members)
    wait = QueueWait(s, book, now=100.0)
    assert wait.start(100.0) == [Ring("a"), Ring("b"), Ring("c")]
    assert wait.get_timer() == 130.0  # ring_all: until the queue's timeout
    assert wait.member_answered("b", 105.0) == [Cancel("a"), Cancel("c")]
    assert wait.state is WaitState.ANSWERED and wait.answered_by == "b"
    assert wait.get_timer() is None
    assert book.busy == {"b"}
    # The cancelled legs' 487s are no news to the wait.
    assert wait.member_failed("a", 105.1) == []


def test_ring_all_failures_then_pause_then_next_round() -> None:
    s = settings("ring_all", ("a", "b"))
    wait = QueueWait(s, QueueBook(s.members), now=0.0)
    wait.start(0.0)
    assert wait.member_failed("a", 1.0) == []  # b still rings
    assert wait.member_failed("b", 2.0) == []
    assert wait.get_timer() == 2.0 + PAUSE_S
    assert wait.handle_timer(2.0 + PAUSE_S - 0.001) == []
    assert wait.handle_timer(2.0 + PAUSE_S) == [Ring("a"), Ring("b")]
    assert wait.rounds == 2


def test_timeout_cancels_ringing_members_and_gives_up() -> None:
    s = settings("ring_all", ("a", "b"), timeout_ms=5_000)
    wait = QueueWait(s, QueueBook(s.members), now=10.0)
    wait.start(10.0)
    assert wait.get_timer() == 15.0
    assert wait.handle_timer(15.0) == [Cancel("a"), Cancel("b"), GiveUp("no_answer")]
    assert wait.state is WaitState.GAVE_UP
    assert wait.get_timer() is None
    assert wait.handle_timer(20.0) == []


def test_pause_never_runs_past_the_deadline() -> None:
    s = settings("ring_all", ("a",), timeout_ms=3_000)
    wait = QueueWait(s, QueueBook(s.members), now=0.0)
    wait.start(0.0)
    wait.member_failed("a", 2.5)
    assert wait.get_timer() == 3.0
    assert wait.handle_timer(3.0)[-1] == GiveUp()


def test_caller_leaving_cancels_everyone() -> None:
    s = settings("ring_all")
    wait = QueueWait(s, QueueBook(s.members), now=0.0)
    wait.start(0.0)
    assert wait.abandon() == [Cancel("a"), Cancel("b"), Cancel("c")]
    assert wait.state is WaitState.ABANDONED
    assert wait.abandon() == []


def test_answer_after_the_wait_ended_is_an_error() -> None:
    s = settings("ring_all", ("a",), timeout_ms=1_000)
    wait = QueueWait(s, QueueBook(s.members), now=0.0)
    wait.start(0.0)
    wait.handle_timer(1.0)
    with pytest.raises(QueueError, match="gave_up"):
        wait.member_answered("a", 1.1)


def test_everyone_busy_waits_and_looks_again() -> None:
    s = settings("ring_all", ("a", "b"))
    book = QueueBook(s.members)
    book.connected("a")
    book.connected("b")
    wait = QueueWait(s, book, now=0.0)
    assert wait.start(0.0) == []
    assert wait.get_timer() == PAUSE_S
    book.released("b", 1.0)
    assert wait.handle_timer(PAUSE_S) == [Ring("b")]


# ---------------------------------------------------------------- one at a time


def test_round_robin_one_member_per_turn_in_order() -> None:
    s = settings("round_robin", member_ring_ms=4_000, timeout_ms=60_000)
    wait = QueueWait(s, QueueBook(s.members), now=0.0)
    assert wait.start(0.0) == [Ring("a")]
    assert wait.get_timer() == 4.0
    assert wait.handle_timer(4.0) == [Cancel("a"), Ring("b")]
    assert wait.get_timer() == 8.0
    # b is busy (486): c at once, without waiting for b's turn to end.
    assert wait.member_failed("b", 5.0) == [Ring("c")]
    assert wait.get_timer() == 9.0
    # The round is over: pause, then a new round from a.
    assert wait.handle_timer(9.0) == [Cancel("c")]
    assert wait.get_timer() == 9.0 + PAUSE_S
    assert wait.handle_timer(9.0 + PAUSE_S) == [Ring("a")]


def test_round_robin_starts_after_the_last_member_tried_by_any_caller() -> None:
    s = settings("round_robin")
    book = QueueBook(s.members)
    first = QueueWait(s, book, now=0.0)
    assert first.start(0.0) == [Ring("a")]
    first.member_answered("a", 1.0)
    second = QueueWait(s, book, now=2.0)
    assert second.start(2.0) == [Ring("b")]
    assert second.handle_timer(12.0) == [Cancel("b"), Ring("c")]
    second.member_answered("c", 13.0)
    book.released("a", 20.0)
    third = QueueWait(s, book, now=21.0)
    assert third.start(21.0) == [Ring("a")]  # c was tried last: a is next
    assert third.handle_timer(31.0) == [Cancel("a"), Ring("b")]


def test_round_robin_skips_busy_members() -> None:
    s = settings("round_robin")
    book = QueueBook(s.members)
    book.connected("a")
    wait = QueueWait(s, book, now=0.0)
    assert wait.start(0.0) == [Ring("b")]
    assert wait.member_failed("b", 1.0) == [Ring("c")]
    assert wait.member_failed("c", 1.5) == []  # a is busy: round over
    book.released("a", 2.0)
    assert wait.handle_timer(1.5 + PAUSE_S) == [Ring("a")]


def test_longest_idle_rings_the_member_idle_longest_first() -> None:
    s = settings("longest_idle")
    book = QueueBook(s.members)
    # Never connected: configuration order.
    assert book.order("longest_idle") == ["a", "b", "c"]
    for member, ended in (("a", 50.0), ("b", 10.0), ("c", 30.0)):
        book.connected(member)
        book.released(member, ended)
    wait = QueueWait(s, book, now=100.0)
    assert wait.start(100.0) == [Ring("b")]
    assert wait.handle_timer(110.0) == [Cancel("b"), Ring("c")]
    assert wait.member_failed("c", 111.0) == [Ring("a")]
    wait.member_answered("a", 112.0)
    assert book.busy == {"a"}
    # A new caller skips the busy member; b has still been idle the longest.
    other = QueueWait(s, book, now=113.0)
    assert other.start(113.0) == [Ring("b")]


def test_member_turn_is_cut_by_the_queue_deadline() -> None:
    s = settings("round_robin", ("a", "b"), timeout_ms=6_000, member_ring_ms=4_000)
    wait = QueueWait(s, QueueBook(s.members), now=0.0)
    wait.start(0.0)
    assert wait.handle_timer(4.0) == [Cancel("a"), Ring("b")]
    assert wait.get_timer() == 6.0  # b's turn would end at 8
    assert wait.handle_timer(6.0) == [Cancel("b"), GiveUp()]


# ---------------------------------------------------------------- route_to_agent


def test_agent_rung_alone_first_then_the_skill_group_at_once() -> None:
    s = settings("ring_all", ("x", "y"), timeout_ms=20_000, member_ring_ms=5_000)
    wait = QueueWait(s, QueueBook(s.members), now=0.0, first="agent7")
    assert wait.start(0.0) == [Ring("agent7")]
    assert wait.get_timer() == 5.0
    assert wait.handle_timer(5.0) == [Cancel("agent7"), Ring("x"), Ring("y")]
    assert wait.deadline == 25.0  # the agent's turn plus the group's timeout


def test_agent_failing_goes_to_the_group_without_a_pause() -> None:
    s = settings("round_robin", ("x", "y"))
    wait = QueueWait(s, QueueBook(s.members), now=0.0, first="agent7")
    wait.start(0.0)
    assert wait.member_failed("agent7", 0.5) == [Ring("x")]


def test_agent_answering_wins() -> None:
    s = settings("ring_all", ("x",))
    wait = QueueWait(s, QueueBook(s.members), now=0.0, first="agent7")
    wait.start(0.0)
    assert wait.member_answered("agent7", 1.0) == []
    assert wait.answered_by == "agent7"

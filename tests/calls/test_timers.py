"""The call layer's one timer heap: named deadlines, moved, cancelled, fired in order."""

from __future__ import annotations

from pbx.calls.timers import TimerKind, Timers


def test_names_fire_in_deadline_order_once() -> None:
    timers = Timers()
    timers.set(TimerKind.RING, "b", 5.0)
    timers.set(TimerKind.RING, "a", 3.0)
    timers.set(TimerKind.QUEUE, "a", 4.0)
    assert timers.get_timer() == 3.0
    assert timers.due(4.0) == [(TimerKind.RING, "a"), (TimerKind.QUEUE, "a")]
    assert timers.due(4.5) == []
    assert timers.get_timer() == 5.0 and len(timers) == 1


def test_setting_a_name_again_moves_it_and_cancel_removes_it() -> None:
    timers = Timers()
    timers.set(TimerKind.RING, "a", 3.0)
    timers.set(TimerKind.RING, "a", 8.0)  # moved later: the old deadline never fires
    timers.set(TimerKind.SESSION_EXPIRY, "x", 6.0)
    timers.cancel(TimerKind.SESSION_EXPIRY, "x")
    timers.cancel(TimerKind.QUEUE, "never set")
    assert timers.get_timer() == 8.0
    assert timers.due(7.9) == []
    assert timers.due(8.0) == [(TimerKind.RING, "a")]
    assert timers.get_timer() is None


def test_the_same_deadline_twice_fires_once() -> None:
    timers = Timers()
    timers.set(TimerKind.LIVENESS, None, 1.0)
    timers.set(TimerKind.LIVENESS, None, 1.0)
    assert timers.due(2.0) == [(TimerKind.LIVENESS, None)]
    assert (TimerKind.LIVENESS, None) not in timers

"""pbx.registry: the pure worker registry, on a virtual clock."""

from __future__ import annotations

from pbx.registry import WorkerRegistry

A, B, C = b"a", b"b", b"c"


def make(expiry_s: float = 2.0) -> WorkerRegistry:
    return WorkerRegistry(expiry_s=expiry_s)


def test_ready_registers_once() -> None:
    reg = make()
    assert reg.ready(A, capacity=10, load=0, now=0.0) is True
    assert reg.ready(A, capacity=10, load=3, now=1.0) is False
    assert A in reg and len(reg) == 1
    (info,) = reg.workers()
    assert info.load == 3
    assert info.expires_at == 3.0


def test_heartbeat_refreshes_expiry() -> None:
    reg = make(expiry_s=2.0)
    reg.ready(A, 10, 0, now=0.0)
    reg.ready(A, 10, 0, now=1.5)  # heartbeat
    assert reg.expire(now=2.5) == []
    assert reg.expire(now=3.5) == [A]
    assert A not in reg


def test_seen_refreshes_expiry_and_ignores_unknown() -> None:
    reg = make(expiry_s=2.0)
    reg.ready(A, 10, 0, now=0.0)
    assert reg.seen(A, now=1.9) is True
    assert reg.seen(B, now=1.9) is False
    assert B not in reg
    assert reg.expire(now=3.0) == []
    assert reg.next_expiry() == 3.9


def test_expiry_boundary_and_next_expiry() -> None:
    reg = make(expiry_s=1.0)
    assert reg.next_expiry() is None
    reg.ready(A, 10, 0, now=0.0)
    reg.ready(B, 10, 0, now=0.5)
    assert reg.next_expiry() == 1.0
    assert reg.expire(now=0.999) == []
    assert reg.expire(now=1.0) == [A]  # expires_at <= now
    assert reg.next_expiry() == 1.5
    assert reg.expire(now=10.0) == [B]
    assert len(reg) == 0


def test_expired_but_not_yet_swept_is_not_chosen() -> None:
    reg = make(expiry_s=1.0)
    reg.ready(A, 10, 0, now=0.0)
    assert reg.choose(now=1.0) is None
    assert A in reg  # still there until expire() runs


def test_least_loaded_chosen() -> None:
    reg = make()
    reg.ready(A, 10, 5, now=0.0)
    reg.ready(B, 10, 2, now=0.0)
    reg.ready(C, 10, 7, now=0.0)
    assert reg.choose(now=0.1) == B


def test_choice_counts_as_load_so_bursts_spread() -> None:
    reg = make()
    reg.ready(A, 10, 0, now=0.0)
    reg.ready(B, 10, 0, now=0.0)
    picks = [reg.choose(now=0.1 + i * 0.01) for i in range(6)]
    assert picks.count(A) == 3 and picks.count(B) == 3
    assert {w.identity: w.load for w in reg.workers()} == {A: 3, B: 3}


def test_ties_go_to_least_recently_assigned() -> None:
    reg = make()
    for w in (A, B, C):
        reg.ready(w, 10, 0, now=0.0)
    first = reg.choose(now=1.0)
    # Bring everyone back to equal load; the one just assigned must wait its turn.
    for w in (A, B, C):
        reg.ready(w, 10, 0, now=1.1)
    second = reg.choose(now=2.0)
    assert second != first
    for w in (A, B, C):
        reg.ready(w, 10, 0, now=2.1)
    third = reg.choose(now=3.0)
    assert third not in (first, second)
    for w in (A, B, C):
        reg.ready(w, 10, 0, now=3.1)
    assert reg.choose(now=4.0) == first


def test_capacity_respected() -> None:
    reg = make()
    reg.ready(A, capacity=2, load=0, now=0.0)
    assert reg.choose(now=0.1) == A
    assert reg.choose(now=0.2) == A
    assert reg.choose(now=0.3) is None
    reg.ready(B, capacity=1, load=1, now=0.4)  # full already
    assert reg.choose(now=0.5) is None
    reg.release(A)
    assert reg.choose(now=0.6) == A


def test_exclude() -> None:
    reg = make()
    reg.ready(A, 10, 0, now=0.0)
    reg.ready(B, 10, 5, now=0.0)
    assert reg.choose(now=0.1, exclude=frozenset({A})) == B
    assert reg.choose(now=0.2, exclude=frozenset({A, B})) is None


def test_release_never_below_zero_and_ignores_unknown() -> None:
    reg = make()
    reg.ready(A, 10, 0, now=0.0)
    reg.choose(now=0.1)
    reg.release(A)
    reg.release(A)
    reg.release(B)  # unknown: no error
    (info,) = reg.workers()
    assert info.load == 0


def test_busy_worker_stays_tracked() -> None:
    reg = make(expiry_s=1.0)
    reg.ready(A, capacity=1, load=0, now=0.0)
    assert reg.choose(now=0.1) == A
    # Full, so never chosen, but its heartbeats keep it alive.
    for t in (0.8, 1.6, 2.4, 3.2):
        assert reg.ready(A, capacity=1, load=1, now=t) is False
        assert reg.expire(now=t + 0.5) == []
        assert reg.choose(now=t + 0.5) is None
    assert A in reg
    # Heartbeats stop: it expires even though it is busy.
    assert reg.expire(now=4.3) == [A]


def test_remove() -> None:
    reg = make()
    reg.ready(A, 10, 0, now=0.0)
    reg.remove(A)
    reg.remove(A)
    assert A not in reg
    assert reg.choose(now=0.1) is None

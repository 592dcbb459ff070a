"""pbx.registry: the pure worker registry, on a virtual clock."""

from __future__ import annotations

from pbx.registry import Handout, MediaWorkerRegistry, PortPool, WorkerRegistry

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


# ---------------------------------------------------------------- RTP port pools


def media(expiry_s: float = 2.0) -> MediaWorkerRegistry:
    reg = MediaWorkerRegistry(expiry_s=expiry_s)
    reg.ready(A, capacity=10, load=0, now=0.0, address="127.0.0.1")
    return reg


def free(pool: PortPool) -> set[int]:
    return set(pool.free_ports())


def test_hand_out_takes_announced_ports_in_order_and_numbers_them() -> None:
    pool = PortPool()
    assert pool.hand_out("c0", now=0.0) is None  # nothing announced yet
    pool.announce([20000, 20002, 20004], allocate_seq=0)
    assert pool.hand_out("c1", now=0.0) == (20000, 1)
    assert pool.hand_out("c2", now=0.0) == (20002, 2)
    assert pool.free_ports() == [20004]


def test_stale_announcement_never_frees_a_port_handed_out() -> None:
    """An announcement the worker sent before it handled a hand-out still lists the
    port: the hold keeps it out, even once the leg has ended."""
    pool = PortPool()
    pool.announce([20000, 20002], allocate_seq=0)
    port, seq = pool.hand_out("c1", now=0.0)  # type: ignore[misc]
    pool.announce([20000, 20002], allocate_seq=seq - 1)  # e.g. a heartbeat on its way
    assert free(pool) == {20002}
    pool.release(port)  # the caller hung up at once
    pool.announce([20000, 20002], allocate_seq=seq - 1)
    assert free(pool) == {20002}
    assert pool.hand_out("c2", now=0.0) == (20002, 2)
    assert pool.hand_out("c3", now=0.0) is None  # never 20000 a second time


def test_announcement_confirms_the_hand_outs_up_to_its_seq() -> None:
    """The worker answers a successful MediaAllocate with nothing: the announcement
    that covers its `seq` confirms it (a refusal came before, and its leg let go)."""
    pool = PortPool()
    pool.announce([20000, 20002, 20004, 20006], allocate_seq=0)
    pool.hand_out("c1", now=0.0)
    pool.hand_out("c2", now=0.0)
    pool.hand_out("c3", now=0.0)
    shared = PortPool()
    assert pool.announce([20006], allocate_seq=0) == ([], [])  # sent before it saw them
    pool.release(20002)  # c2 was refused (its MediaAllocated came first)
    assert pool.announce([20002, 20006], allocate_seq=2) == (["c1"], [])
    assert list(pool.unconfirmed) == [20004]
    assert pool.announce([20002, 20006], allocate_seq=2) == ([], [])  # each once
    assert pool.announce([20002, 20006], allocate_seq=3) == (["c3"], [])
    assert not pool.unconfirmed and pool.overdue(handed_before=1.0) == []
    # Legs on a shared port too.
    shared.announce([], allocate_seq=0, shared_port=21000)
    shared.hand_out("s1", now=0.0, shared=True)
    shared.hand_out("s2", now=0.0, shared=True)
    assert shared.announce([], allocate_seq=1, shared_port=21000) == (["s1"], [])
    assert list(shared.shared_unconfirmed) == ["s2"]


def test_announcement_names_the_allocations_it_does_not_confirm() -> None:
    """An allocation the worker refused (its MediaAllocated lost) or never received is
    in the announcement's `refused`: the watermark alone must not confirm it."""
    pool = PortPool()
    pool.announce([20000, 20002, 20004, 20006, 20008], allocate_seq=0)
    for call_id in ("c1", "c2", "c3", "c4"):
        pool.hand_out(call_id, now=0.0)
    pool.hand_out("s1", now=0.0, shared=True)  # no shared port: a pooled one, seq 5
    # Seq 1 never reached the worker, 3 was refused; 2 and 4 took their ports.
    verdicts = pool.announce([20008], allocate_seq=5, refused=[(1, 1), (3, 3)])
    assert verdicts == (["c2", "c4", "s1"], ["c1", "c3"])
    assert not pool.unconfirmed
    # The same ranges again (they are repeated for a while): nothing left to judge.
    assert pool.announce([20008], allocate_seq=5, refused=[(1, 1), (3, 3)]) == ([], [])
    shared = PortPool()
    shared.announce([], allocate_seq=0, shared_port=21000)
    for call_id in ("s1", "s2", "s3"):
        shared.hand_out(call_id, now=0.0, shared=True)
    assert shared.announce([], allocate_seq=3, shared_port=21000,
                           refused=[(1, 2)]) == (["s3"], ["s1", "s2"])


def test_announcement_after_the_hand_out_decides() -> None:
    pool = PortPool()
    pool.announce([20000, 20002], allocate_seq=0)
    pool.hand_out("c1", now=0.0)
    pool.hand_out("c2", now=0.0)
    # The worker took 20000 (seq 1), refused 20002 (seq 2) and bound 20004.
    pool.announce([20002, 20004], allocate_seq=2)
    assert free(pool) == {20004}  # 20002 is still c2's until its leg lets it go
    pool.release(20002)  # the refusal ended c2's leg
    assert free(pool) == {20002, 20004}
    pool.release(20000)  # c1 ended: the worker closed 20000, and its list says so
    assert free(pool) == {20002, 20004}
    pool.announce([20000, 20002, 20004], allocate_seq=2)  # it bound 20000 again later
    assert free(pool) == {20000, 20002, 20004}


def test_release_before_the_covering_announcement_waits_for_it() -> None:
    pool = PortPool()
    pool.announce([20000], allocate_seq=0)
    pool.hand_out("c1", now=0.0)
    pool.release(20000)
    assert pool.held(20000) and pool.retiring
    pool.announce([20002], allocate_seq=1)
    assert not pool.retiring and not pool.in_use and free(pool) == {20002}


def test_a_port_in_use_is_never_handed_out_whatever_the_worker_says() -> None:
    pool = PortPool()
    pool.announce([20000], allocate_seq=0)
    pool.hand_out("c1", now=0.0)
    pool.announce([20000], allocate_seq=5)  # a confused worker lists the leg's port
    assert pool.hand_out("c2", now=0.0) is None


def test_seq_goes_on_from_the_worker_s_last() -> None:
    pool = PortPool()
    pool.announce([20000], allocate_seq=41)  # learnt from a heartbeat after a restart
    assert pool.hand_out("c1", now=0.0) == (20000, 42)
    pool.announce([20002], allocate_seq=3)  # never backwards
    assert pool.hand_out("c2", now=0.0) == (20002, 43)


def test_confirmation_and_overdue() -> None:
    pool = PortPool()
    pool.announce([20000, 20002, 20004], allocate_seq=0)
    pool.hand_out("c1", now=1.0)
    pool.hand_out("c2", now=2.0)
    pool.hand_out("c3", now=3.0)
    assert pool.confirm(20000, "c2") is False  # not that leg's port
    assert pool.confirm(20002, "c2") is True
    assert pool.overdue(handed_before=1.0) == []
    assert pool.overdue(handed_before=3.5) == ["c1", "c3"]
    assert pool.overdue(handed_before=9.0) == []  # reported once
    pool.release(20004)
    assert pool.confirm(20004, "c3") is False  # released


def test_registry_chooses_the_least_loaded_worker_with_a_free_port() -> None:
    reg = media()
    reg.ready(B, capacity=10, load=0, now=0.0, address="127.0.0.1")
    reg.ready(C, capacity=10, load=5, now=0.0, address="127.0.0.1")
    assert reg.hand_out("c0", now=0.1) is None  # no pool announced
    assert reg.announce(A, [20000], 0) == ([], [])
    assert reg.announce(C, [22000, 22002], 0) == ([], [])
    assert reg.announce(b"stranger", [1000], 0) is None
    first = reg.hand_out("c1", now=0.1)
    assert first == Handout(A, 20000, 1)  # B is idler, but has no port
    assert reg.hand_out("c2", now=0.2) == Handout(C, 22000, 1)
    assert reg.hand_out("c3", now=0.3, worker=A) is None  # A's port is out
    assert reg.hand_out("c3", now=0.3, worker=C) == Handout(C, 22002, 2)
    assert reg.hand_out("c4", now=0.4) is None
    assert reg.free_ports() == 0
    assert {w.identity: w.load for w in reg.workers()} == {A: 1, B: 0, C: 7}
    reg.release(A, 20000)
    assert {w.identity: w.load for w in reg.workers()}[A] == 0
    reg.announce(A, [20002], allocate_seq=1)
    assert reg.free_ports() == 1
    assert reg.confirm(C, 22000, "c2") and not reg.confirm(A, 22000, "c2")


def test_registry_respects_capacity_with_ports_free() -> None:
    reg = MediaWorkerRegistry(expiry_s=2.0)
    reg.ready(A, capacity=1, load=1, now=0.0, address="127.0.0.1")
    reg.announce(A, [20000], 0)
    assert reg.hand_out("c1", now=0.1) is None


def test_dead_worker_s_pool_is_forgotten() -> None:
    reg = media(expiry_s=1.0)
    reg.announce(A, [20000, 20002], 0)
    reg.hand_out("c1", now=0.0)
    assert reg.overdue(handed_before=5.0) == [(A, "c1")]
    reg.hand_out("c2", now=0.0)
    assert reg.expire(now=1.0) == [A]
    assert reg.pool(A) is None and reg.free_ports() == 0
    assert reg.overdue(handed_before=5.0) == []
    # Back under the same identity (a front that missed its death): a fresh pool.
    reg.ready(A, capacity=10, load=0, now=2.0, address="127.0.0.1")
    assert reg.hand_out("c3", now=2.0) is None
    reg.announce(A, [20004], allocate_seq=2)
    assert reg.hand_out("c3", now=2.0) == Handout(A, 20004, 3)
    reg.remove(A)
    assert reg.pool(A) is None


def test_shared_port_goes_to_many_legs_within_capacity_and_never_to_per_leg_asks() -> None:
    """A worker's shared port ([media] rtp_socket): any number of legs at once, bounded
    by its capacity; a leg asking for its own port still gets a pooled one."""
    reg = MediaWorkerRegistry(expiry_s=2.0)
    reg.ready(A, capacity=3, load=0, now=0.0, address="127.0.0.1")
    reg.announce(A, [20000], 0, shared_port=21000)
    assert reg.hand_out("s1", now=0.1, shared=True) == Handout(A, 21000, 1)
    assert reg.hand_out("s2", now=0.1, shared=True) == Handout(A, 21000, 2)
    assert reg.hand_out("p1", now=0.1) == Handout(A, 20000, 3)  # per-leg: the pool's
    assert reg.hand_out("s3", now=0.1, shared=True) is None  # capacity 3 reached
    pool = reg.pool(A)
    assert pool is not None and pool.free_ports() == [] and set(pool.shared_in_use) == {
        "s1", "s2"}
    assert reg.confirm(A, 21000, "s1") and not reg.confirm(A, 21000, "p1")
    assert reg.overdue(handed_before=1.0) == [(A, "s2"), (A, "p1")]
    reg.release(A, 21000, "s1")
    assert set(pool.shared_in_use) == {"s2"} and pool.free_ports() == []
    assert reg.hand_out("s4", now=0.2, shared=True) == Handout(A, 21000, 4)
    # a worker without a shared port gives a shared ask a pooled port
    reg.ready(B, capacity=3, load=0, now=0.0, address="127.0.0.1")
    reg.announce(B, [22000], 0)
    assert reg.hand_out("s5", now=0.3, worker=B, shared=True) == Handout(B, 22000, 1)

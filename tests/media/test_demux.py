"""workers.demux: a shared port's source address -> leg table (only legs insert)."""

from __future__ import annotations

import random

import numpy as np

from media.kernels.rtpbatch import L_LATCHED, L_REMOTE_IP, L_REMOTE_PORT, L_SDP_IP, L_SDP_PORT
from media.legtable import LegTable
from workers.demux import EMPTY, DemuxTable, addr_key, delete, insert, lookup

TRUNK = 0x0A000001  # 10.0.0.1


def leg(tab: LegTable, ip: int = 0, port: int = 0) -> int:
    row = tab.add()
    tab.i[row, L_SDP_IP] = ip
    tab.i[row, L_SDP_PORT] = port
    return row


def names_of(addrs: list[tuple[int, int]]) -> np.ndarray:
    names = np.zeros((len(addrs), 16), dtype=np.uint8)
    for k, (ip, port) in enumerate(addrs):
        names[k, 0] = 2
        names[k, 2:4] = list(port.to_bytes(2, "big"))
        names[k, 4:8] = list(ip.to_bytes(4, "big"))
    return names


def test_sdp_address_then_latched_source_find_the_leg() -> None:
    tab = LegTable()
    d = DemuxTable()
    a = leg(tab, TRUNK, 4000)
    d.add(a, tab.i)
    assert d.row_of(TRUNK, 4000) == a
    assert d.row_of(TRUNK, 4002) == -1  # same IP, another port: not the leg
    # the engine latched the leg onto its SDP address: still one key, the same leg
    tab.i[a, L_LATCHED] = 1
    tab.i[a, L_REMOTE_IP], tab.i[a, L_REMOTE_PORT] = TRUNK, 4000
    d.sync(tab.i, np.array([a]), 1)
    assert d.row_of(TRUNK, 4000) == a and len(d) == 1
    # a latch elsewhere (the per-packet path) is found too, and the SDP address stays
    tab.i[a, L_REMOTE_IP], tab.i[a, L_REMOTE_PORT] = TRUNK, 5000
    d.sync(tab.i, np.array([a]), 1)
    assert d.row_of(TRUNK, 5000) == a and d.row_of(TRUNK, 4000) == a and len(d) == 2
    # the latch moves back to the SDP address at once: the old source is gone
    tab.i[a, L_REMOTE_PORT] = 4000
    d.sync(tab.i, np.array([a]), 1)
    assert d.row_of(TRUNK, 5000) == -1 and d.row_of(TRUNK, 4000) == a and len(d) == 1


def test_a_new_sdp_address_replaces_the_old_and_removal_empties() -> None:
    tab = LegTable()
    d = DemuxTable()
    a = leg(tab)
    d.add(a, tab.i)
    assert len(d) == 0  # no address yet: nothing can reach it
    tab.i[a, L_SDP_IP], tab.i[a, L_SDP_PORT] = TRUNK, 4000
    d.refresh(a, tab.i)
    assert d.row_of(TRUNK, 4000) == a
    tab.i[a, L_SDP_PORT] = 4100  # re-INVITE with another port (the engine unlatches)
    d.refresh(a, tab.i)
    assert d.row_of(TRUNK, 4000) == -1 and d.row_of(TRUNK, 4100) == a
    d.remove(a, tab.i)
    assert len(d) == 0 and d.row_of(TRUNK, 4100) == -1 and d.legs == 0


def test_many_legs_one_ip_different_ports() -> None:
    tab = LegTable(capacity=4096)
    d = DemuxTable(legs=16)  # grows as legs come
    rows = [leg(tab, TRUNK, 10000 + 2 * k) for k in range(3000)]
    for r in rows:
        d.add(r, tab.i)
    assert all(d.row_of(TRUNK, 10000 + 2 * k) == r for k, r in enumerate(rows))
    assert d.row_of(TRUNK, 10001) == -1
    # half of them leave (every other one): the rest are found, the gone ones not
    for r in rows[::2]:
        d.remove(r, tab.i)
    for k, r in enumerate(rows):
        assert d.row_of(TRUNK, 10000 + 2 * k) == (-1 if k % 2 == 0 else r)
    assert len(d) == 1500


def test_two_legs_claiming_one_address_first_keeps_it_until_it_leaves() -> None:
    tab = LegTable()
    d = DemuxTable()
    a, b = leg(tab, TRUNK, 4000), leg(tab, TRUNK, 4000)
    d.add(a, tab.i)
    d.add(b, tab.i)
    assert d.row_of(TRUNK, 4000) == a
    d.remove(a, tab.i)
    assert d.row_of(TRUNK, 4000) == b  # the waiting leg took it


def test_a_flood_of_strangers_leaves_the_table_unchanged() -> None:
    tab = LegTable()
    d = DemuxTable()
    a = leg(tab, TRUNK, 4000)
    d.add(a, tab.i)
    keys, vals = d.keys.copy(), d.vals.copy()
    rng = random.Random(7)
    strangers = [(rng.getrandbits(32), rng.randrange(1, 65536)) for _ in range(20000)]
    strangers += [(TRUNK, p) for p in range(4001, 6000)]  # the trunk's other ports
    names = names_of(strangers)
    owner = np.full(len(strangers), -1, dtype=np.int64)
    rows = np.zeros(len(strangers), dtype=np.int64)
    from workers.demux import demux

    foreign = demux(d.keys, d.vals, d.salt, names, owner, np.zeros(0, dtype=np.int64), rows,
                    len(strangers))  # fmt: skip
    assert foreign == len(strangers) and (rows == -1).all()
    d.sync(tab.i, rows, len(strangers))  # nothing to take in: no row
    assert (d.keys == keys).all() and (d.vals == vals).all()


def test_hash_against_a_dict() -> None:
    """insert/delete/lookup (backward-shift deletion) agree with a dict over random work."""
    keys = np.full(64, EMPTY, dtype=np.int64)
    vals = np.full(64, -1, dtype=np.int64)
    ref: dict[int, int] = {}
    rng = random.Random(3)
    pool = [addr_key(TRUNK, p) for p in range(1000, 1040)]  # few keys: many collisions
    salt = rng.getrandbits(63)
    for step in range(5000):
        key = rng.choice(pool)
        if rng.random() < 0.5 and len(ref) < 30:
            got = insert(keys, vals, key, step, salt)
            assert got == ref.setdefault(key, step)
        else:
            row = ref.get(key, -2)
            assert delete(keys, vals, key, row, salt) == (key in ref)
            ref.pop(key, None)
        for k in pool:
            assert lookup(keys, vals, k, salt) == ref.get(k, -1)

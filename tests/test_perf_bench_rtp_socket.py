"""perf/bench_rtp_socket.py: both socket layouts read every phone's packet, and the
per-packet figures come to an IVR call's share of a core."""

from __future__ import annotations

import pytest

from perf.bench_rtp_socket import ivr_call_pct, run


@pytest.mark.parametrize("mode", ["per_leg", "shared"])
def test_every_packet_is_read_from_its_own_leg(mode: str) -> None:
    res = run(mode, n=16, periods=4, local="127.0.0.1", sink=None)
    assert res["received"] == res["expected"] == 16 * 4
    assert res["foreign"] == 0
    assert res["recv_us_per_packet"] > 0 and res["send_us_per_packet"] > 0


def test_an_ivr_call_is_fifty_packets_each_way() -> None:
    # 1 µs in + 3 µs out, 50 times a second: 200 µs of a 1 s core, 0.02 %.
    assert ivr_call_pct({"recv_us_per_packet": 1.0, "send_us_per_packet": 3.0}) == 0.02

"""The front adds up its media workers' strict-latching counts for /metrics."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pbx import messages as m
from pbx.config import parse_config
from pbx.front import Front


def test_heartbeat_foreign_counts_add_up_in_the_snapshot(tmp_path: Path) -> None:
    async def main() -> dict[str, Any]:
        settings = parse_config(f'[logging]\ndir = "{tmp_path / "logs"}"\n')
        front = Front(settings, lambda *a, **k: None, lambda w, msg: True,
                      lambda e, msg: True, lambda event: None)  # fmt: skip
        assert front.snapshot()["rtp_foreign_dropped"] == 0
        front.on_media_message(b"w1", m.MediaReady(worker_id="w1", capacity=10,
                                                       rtp_ip="127.0.0.1"))
        for worker, rtp, rtcp in ((b"w1", 5, 0), (b"w2", 7, 2), (b"w1", 0, 1)):
            front.on_media_message(worker, m.MediaHeartbeat(
                worker_id=worker.decode(), calls=1, capacity=10, rtp_ip="127.0.0.1",
                ports=[], allocate_seq=0, rtp_foreign_dropped=rtp,
                rtcp_foreign_dropped=rtcp))  # fmt: skip
        return front.snapshot()

    snap = asyncio.run(main())
    assert snap["rtp_foreign_dropped"] == 12 and snap["rtcp_foreign_dropped"] == 3
    assert snap["media_workers"] == 2

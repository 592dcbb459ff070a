"""RTP injection (issue 8, "RTP can be hijacked"): a stranger spraying a call's RTP port
with RFC 4733 digits and in-band tones must not reach the IVR.

The real system under supervisord (tests/e2e/harness.py); the caller is a raw SIP client
whose RTP socket streams audio from the address its SDP gives; a call sits in
`collect_dtmf` while a second socket sprays the call's RTP port (read from the SDP
answer) with presses of 9 (RFC 4733) and the tone of 8 (PCMU, in-band detection is on).
The provider must get only the 5 the caller presses afterwards, and /metrics and the
call record must count the stranger's packets. Before strict latching (2554a5d) the
media worker took every source's packets once latched, so the stranger's 9 was the
digit collected.

Both socket modes (`[media] rtp_socket`): on a port of the leg's own the stranger's
packets reach the leg and are dropped by its latch (counted for the leg); on the
worker's shared port they match no leg's address and are dropped before any leg
(counted for the worker, none for the leg), and the shared table does not grow.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from media import g711
from tests.e2e.harness import (
    PbxSystem,
    Reply,
    RtpEndpoint,
    ScriptedProvider,
    start_system,
    wait_until,
)
from tests.e2e.ivr_calls import send_dtmf
from tests.e2e.uac import Uac

COLLECT = {"type": "collect_dtmf", "min_digits": 1, "max_digits": 1, "timeout_ms": 20_000,
           "step_id": "pin"}
SILENCE = bytes([0xFF]) * 160


@pytest.fixture(scope="module", params=["per_leg", "shared"])
def system(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[PbxSystem]:
    provider = ScriptedProvider()
    s = start_system(tmp_path_factory.mktemp("pbx"), provider, media_workers=1, executors=1,
                     media_extra=f'rtp_socket = "{request.param}"')
    s.rtp_socket = request.param  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        s.stop()
        provider.close()


def collect_digits(path: str, body: Any) -> Reply:
    """Every step collects one more digit: the call stays until the caller hangs up."""
    if path.endswith(("/start", "/end", "/dtmf-match")):
        return 200, b'{"status":"ok"}', 0.0
    return 200, json.dumps(COLLECT).encode(), 0.0


def tone_frames(low: int, high: int) -> list[bytes]:
    """A DTMF pair in PCMU, 20 ms frames of one second."""
    t = np.arange(8000) / 8000.0
    pcm = 7000 * (np.sin(2 * np.pi * low * t) + np.sin(2 * np.pi * high * t))
    codes = bytes(g711.encode(pcm.astype(np.int16), "PCMU"))
    return [codes[k : k + 160] for k in range(0, 8000, 160)]


class Stranger:
    """Sprays `dest` from its own socket: every 20 ms a frame of the 8 tone, and a
    100 ms RFC 4733 press of 9 (start, updates, end x3) every 200 ms."""

    SSRC = 0x66666666

    def __init__(self, dest: tuple[str, int], dtmf_pt: int = 101) -> None:
        self.dest, self.dtmf_pt = dest, dtmf_pt
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sent = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _packet(self, pt: int, seq: int, ts: int, payload: bytes, marker: bool = False
                ) -> None:  # fmt: skip
        header = struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF,
                             ts & 0xFFFFFFFF, self.SSRC)  # fmt: skip
        self.sock.sendto(header + payload, self.dest)
        self.sent += 1

    def _run(self) -> None:
        tone = tone_frames(852, 1336)  # 8
        seq, ts, k = 7000, 900_000, 0
        start = time.monotonic()
        while not self._stop.is_set() and k < 3000:  # bounded: 60 s
            delay = start + k * 0.02 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._packet(0, seq, ts, tone[k % len(tone)])
            seq += 1
            phase = k % 10  # a press of 9 during the first 5 frames of every 10
            if phase < 5:
                event = struct.pack("!BBH", 9, 10, 160 * (phase + 1))
                self._packet(self.dtmf_pt, seq, ts - 160 * phase, event, marker=phase == 0)
                seq += 1
            elif phase == 5:
                for _ in range(3):
                    end = struct.pack("!BBH", 9, 0x80 | 10, 800)
                    self._packet(self.dtmf_pt, seq, ts - 800, end)
                    seq += 1
            ts += 160
            k += 1

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


class Talker:
    """The caller's own audio: PCMU silence every 20 ms from its RTP socket."""

    def __init__(self, rtp: RtpEndpoint, dest: tuple[str, int]) -> None:
        self.rtp, self.dest = rtp, dest
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        for k in range(3000):  # bounded: 60 s
            if self._stop.is_set():
                return
            delay = start + k * 0.02 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.rtp.send(self.dest, SILENCE)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(2)


def call_records(system: PbxSystem) -> list[dict[str, Any]]:
    path = system.root / "logs" / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_sprayed_digits_never_reach_the_ivr(system: PbxSystem, tmp_path: Path) -> None:
    provider = system.provider
    provider.script = collect_digits
    rtp = RtpEndpoint()
    uac = Uac(system.sip_port, rtp.port)
    stranger: Stranger | None = None
    talker: Talker | None = None
    try:
        assert uac.call() == 200
        pbx_rtp = ("127.0.0.1", uac.answer_rtp_port)
        start = wait_until(lambda: [r for r in provider.seen("/ivr/step")
                                    if (r.body.get("event") or {}).get("type")
                                    == "session_start"], 10, "the session_start step")
        session_id = start[-1].body["session_id"]

        def dtmf_steps() -> list[dict[str, Any]]:
            return [r.body["event"] for r in provider.for_session(session_id)
                    if r.path == "/ivr/step"
                    and (r.body.get("event") or {}).get("type") == "dtmf"]

        # The caller talks (its packets latch the leg), then the stranger starts spraying.
        talker = Talker(rtp, pbx_rtp)
        time.sleep(0.5)
        stranger = Stranger(pbx_rtp)
        time.sleep(2.0)  # ten presses of 9 and two seconds of the 8 tone
        assert dtmf_steps() == [], "the stranger's digit reached the provider"
        # The caller presses 5 while the stranger keeps spraying.
        talker.stop()
        send_dtmf(rtp, pbx_rtp, "5")
        steps = wait_until(dtmf_steps, 10, "the caller's digit at the provider")
        assert [s.get("digit") for s in steps] == ["5"], steps
        stranger.close()
        sprayed = stranger.sent  # all at a live leg: the call is still in the IVR
        assert sprayed > 150

        # /metrics: the worker's heartbeats carry the count (every 200 ms here).
        def dropped() -> float:
            return system.metrics().get("pbx_rtp_foreign_dropped_total", 0.0)

        seen: list[float] = []

        def settled() -> bool:  # every packet counted, or the count still for a second
            seen.append(dropped())
            return seen[-1] >= sprayed or (len(seen) > 10 and seen[-1] == seen[-11] > 0)

        wait_until(settled, 10, "the sprayed packets in /metrics", interval=0.1)
        counted = int(seen[-1])
        # The stranger's packets, nothing of the caller's (a loopback socket buffer that
        # overflowed on a starved machine may have lost a few before the worker saw them).
        assert 0.9 * sprayed <= counted <= sprayed, (counted, sprayed)

        # The caller hangs up; the call record counts the stranger's packets for the leg.
        assert uac.hangup() == 200
        record = wait_until(lambda: [r for r in call_records(system)
                                     if session_id in r["sessions"] and r.get("rtp_complete")],
                            10, "the call's record")[0]
        leg = record["rtp"]["a"]
        # per_leg: the leg's latch dropped them; shared: no leg saw them at all.
        shared = system.rtp_socket == "shared"  # type: ignore[attr-defined]
        assert leg["rtp_foreign_dropped"] == (0 if shared else counted), record
        assert leg["rtp_relatched"] == 0, record
        assert leg["packets_received"] > 50  # the caller's own audio was taken
    finally:
        if stranger is not None:
            stranger.close()
        if talker is not None:
            talker.stop()
        uac.close()
        rtp.close()

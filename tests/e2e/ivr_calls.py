"""Shared pieces of the IVR-action end-to-end tests (`test_ivr_actions.py`,
`test_executor_kill.py`): one sipp caller whose RTP port is a test socket, RFC 4733
digits and a tone sent from that socket, and small aiohttp servers on a thread."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from media import g711
from tests.e2e.harness import (
    SCENARIOS,
    PbxSystem,
    ProviderRequest,
    Reply,
    RtpEndpoint,
    Sipp,
    free_port,
    media_address_from_sipp,
    sipp_messages,
    start_sipp,
    wait_until,
)

OK: Reply = (200, b'{"status":"ok"}', 0.0)
NOTIFY_SUFFIXES = ("/start", "/end", "/dtmf-match")
SSRC = 0x1234ABCD  # RtpEndpoint.send's
DTMF_EVENTS = "0123456789*#ABCD"

# 400 Hz at about -12 dBFS: exactly 8 periods per 20 ms frame, so every frame is the same.
TONE_PCM = (np.sin(2 * np.pi * 400 * np.arange(160) / 8000) * 8000).astype(np.int16)
TONE_PCMU = bytes(g711.encode(TONE_PCM, "PCMU"))


def action(node: dict[str, Any]) -> Reply:
    return 200, json.dumps(node).encode(), 0.0


def event_type(body: Any) -> str:
    return str(((body or {}).get("event") or {}).get("type", ""))



# ---------------------------------------------------------------- the caller


@dataclass
class Caller:
    """A sipp UAC (`uac_wait_bye.xml`: it waits for the PBX's BYE) with its media at
    `rtp`, a socket of the test."""

    sipp: Sipp
    rtp: RtpEndpoint
    system: PbxSystem
    mark: int  # provider requests before this call

    def media_addr(self) -> tuple[str, int]:
        """The PBX's RTP address (its SDP answer)."""
        addr: tuple[str, int] = wait_until(lambda: media_address_from_sipp(self.sipp.workdir),
                                           10, "the 200 OK's SDP in sipp's log")
        return addr

    def dtmf_payload_type(self) -> int:
        """telephone-event's payload type in the PBX's SDP answer (101 if not found)."""
        _, _, answer = sipp_messages(self.sipp.workdir).partition("SIP/2.0 200 OK")
        m = re.search(r"a=rtpmap:(\d+) telephone-event/8000", answer)
        return int(m.group(1)) if m else 101

    def requests(self) -> list[ProviderRequest]:
        with self.system.provider.lock:
            return list(self.system.provider.requests[self.mark:])

    def steps(self, path: str = "/ivr/step") -> list[ProviderRequest]:
        return [r for r in self.requests() if r.path == path]

    def wait_step(self, kind: str, timeout: float = 10, path: str = "/ivr/step"
                  ) -> ProviderRequest:
        found: list[ProviderRequest] = wait_until(
            lambda: [r for r in self.steps(path) if event_type(r.body) == kind], timeout,
            f"a {kind} step request at {path}")
        return found[0]

    @property
    def session_id(self) -> str:
        first = self.wait_step("session_start")
        return str(first.body["session_id"])

    def send_digits(self, digits: str, press_ms: int = 100, gap_s: float = 0.1) -> None:
        send_dtmf(self.rtp, self.media_addr(), digits, self.dtmf_payload_type(),
                  press_ms, gap_s)

    def talk(self, seconds: float, payload: bytes = TONE_PCMU) -> None:
        send_audio(self.rtp, self.media_addr(), seconds, payload)

    def wait_ended(self, timeout: float = 30) -> None:
        """sipp got the PBX's BYE and answered it (exit code 0)."""
        rc = self.sipp.wait(timeout)
        assert rc == 0, self.sipp.logs()
        assert "BYE sip:" in sipp_messages(self.sipp.workdir), "no BYE from the PBX"


@contextmanager
def call(system: PbxSystem, workdir: Path, service: str = "*99",
         scenario: Path = SCENARIOS / "uac_wait_bye.xml") -> Iterator[Caller]:
    mark = len(system.provider.requests)
    rtp = RtpEndpoint()
    sipp = start_sipp("caller", [
        "-sf", str(scenario), "-s", service, system.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1",
        "-mp", str(free_port(even=True)), "-key", "rtp_port", str(rtp.port),
        "-m", "1", "-l", "1", "-timeout", "40s", "-timeout_error",
    ], workdir / "caller")
    try:
        yield Caller(sipp, rtp, system, mark)
    finally:
        sipp.stop()
        rtp.close()


# ---------------------------------------------------------------- RTP from the caller


def _send_event(rtp: RtpEndpoint, dest: tuple[str, int], payload_type: int, ts: int,
                event: int, end: bool, duration: int, marker: bool = False) -> None:
    rtp._seq = (rtp._seq + 1) & 0xFFFF
    header = struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | payload_type,
                         rtp._seq, ts, SSRC)
    body = struct.pack("!BBH", event, (0x80 if end else 0) | 10, duration)
    rtp.sock.sendto(header + body, dest)


def send_dtmf(rtp: RtpEndpoint, dest: tuple[str, int], digits: str, payload_type: int = 101,
              press_ms: int = 100, gap_s: float = 0.1) -> None:
    """Each digit as an RFC 4733 event: packets every 20 ms with the event's start
    timestamp (marker on the first) and a growing duration, then the end packet three
    times; the stream's timestamp then moves past the event."""
    for digit in digits:
        event = DTMF_EVENTS.index(digit.upper())
        rtp._ts = (rtp._ts + 160) & 0xFFFFFFFF
        ts = rtp._ts
        frames = max(1, press_ms // 20)
        for i in range(1, frames + 1):
            _send_event(rtp, dest, payload_type, ts, event, False, i * 160, marker=i == 1)
            time.sleep(0.02)
        for _ in range(3):
            _send_event(rtp, dest, payload_type, ts, event, True, frames * 160)
        rtp._ts = (ts + (frames - 1) * 160) & 0xFFFFFFFF
        time.sleep(gap_s)


def send_audio(rtp: RtpEndpoint, dest: tuple[str, int], seconds: float,
               payload: bytes = TONE_PCMU) -> None:
    """PCMU packets every 20 ms (paced on the clock, not on sleeps) for `seconds`."""
    start = time.monotonic()
    for i in range(round(seconds / 0.02)):
        delay = start + i * 0.02 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        rtp.send(dest, payload)


# ---------------------------------------------------------------- servers in the test


class AioServer:
    """An aiohttp application on its own thread and event loop, at 127.0.0.1:`port`."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.port = free_port(socket.SOCK_STREAM)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self._ready.wait(10), "the aiohttp server did not start"
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        runner = web.AppRunner(self.app, shutdown_timeout=1.0)
        try:
            self.loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", self.port)
            self.loop.run_until_complete(site.start())
        except BaseException as exc:  # reported by __init__
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def script_of(steps: Callable[[str, Any], dict[str, Any] | None]) -> Callable[[str, Any], Reply]:
    """A provider script from a function of (path, body) -> ActionNode (None: hang up);
    notifications are answered 200."""

    def script(path: str, body: Any) -> Reply:
        if path.endswith(NOTIFY_SUFFIXES):
            return OK
        node = steps(path, body)
        return action(node if node is not None else {"type": "hangup"})

    return script

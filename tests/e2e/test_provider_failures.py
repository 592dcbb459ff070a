"""Provider failures end to end (spec §8, DESIGN §3 "Provider calls"): no call is left
hanging in any case.

Every test is one sipp caller (`uac_wait_bye.xml`: INVITE, ACK, then wait for the PBX's
BYE) whose media port is an `RtpEndpoint` in the test, so what the caller hears is
counted packet by packet; the scripted provider plays the failing service. After each
call the system must be idle again: no call, no media leg.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    REFUSED_PORT,
    SCENARIOS,
    PbxSystem,
    ProviderRequest,
    Reply,
    RtpEndpoint,
    RtpPacket,
    Sipp,
    free_port,
    start_sipp,
    wait_idle,
    wait_until,
)

OK = (200, b'{"status":"ok"}', 0.0)
STEP = "/ivr/step"
NOTIFY_SUFFIXES = ("/start", "/end", "/dtmf-match")
ERROR_WAV_S = 3.048
MAX_RETRIES = 2  # the fixture's route: retry = { max_retries = 2, timeout_ms = 600 }
TIMEOUT_S = 0.6


def action(node: dict[str, Any]) -> Reply:
    return 200, json.dumps(node).encode(), 0.0


# ---------------------------------------------------------------- call helpers


@dataclass
class CallResult:
    sipp: Sipp
    rtp: RtpEndpoint
    requests: list[ProviderRequest]  # every provider request made during this call
    rc: int

    def steps(self, path: str = STEP) -> list[ProviderRequest]:
        return [r for r in self.requests if r.path == path]

    def notifications(self, suffix: str) -> list[ProviderRequest]:
        return [r for r in self.requests if r.path.endswith(suffix)]

    @property
    def session_id(self) -> str:
        for r in self.requests:
            if isinstance(r.body, dict) and r.body.get("session_id"):
                return str(r.body["session_id"])
        raise AssertionError(f"no provider request names a session: {self.requests}")


_STAMP = re.compile(r"^-{10,} (\d{4}-\d\d-\d\d)\s+(\d\d:\d\d:\d\d\.\d+)\s*$")


def sipp_messages(sipp: Sipp) -> list[tuple[float, str, str]]:
    """(monotonic time, 'sent'|'received', first line) of every SIP message sipp logged."""
    offset = time.time() - time.monotonic()
    out: list[tuple[float, str, str]] = []
    for path in sipp.workdir.glob("*_messages.log"):
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            m = _STAMP.match(line)
            if not m or i + 2 >= len(lines):
                continue
            wall = dt.datetime.strptime(f"{m[1]} {m[2]}", "%Y-%m-%d %H:%M:%S.%f").timestamp()
            direction = "sent" if " sent " in lines[i + 1] else "received"
            first = next((ln.strip() for ln in lines[i + 2 : i + 5] if ln.strip()), "")
            out.append((wall - offset, direction, first))
    return sorted(out)


def message_time(sipp: Sipp, direction: str, pattern: str) -> float:
    found = [
        t for t, d, first in sipp_messages(sipp) if d == direction and re.search(pattern, first)
    ]
    assert found, f"sipp never {direction} {pattern!r}:\n" + sipp.logs()
    return found[0]



def start_caller(system: PbxSystem, workdir: Path, service: str, rtp: RtpEndpoint) -> Sipp:
    return start_sipp(
        "caller",
        [
            "-sf",
            str(SCENARIOS / "uac_wait_bye.xml"),
            "-s",
            service,
            system.sip_addr,
            "-i",
            "127.0.0.1",
            "-p",
            str(free_port()),
            "-mi",
            "127.0.0.1",
            "-mp",
            str(free_port(even=True)),
            "-key",
            "rtp_port",
            str(rtp.port),
            "-m",
            "1",
            "-l",
            "1",
            "-timeout",
            "40s",
            "-timeout_error",
        ],
        workdir / "caller",
    )


def call(
    system: PbxSystem,
    workdir: Path,
    service: str = "*99",
    *,
    during: Callable[[Sipp, RtpEndpoint], None] | None = None,
    timeout: float = 30,
) -> CallResult:
    """One call that the PBX must end with BYE; returns when sipp has exited."""
    mark = len(system.provider.requests)
    rtp = RtpEndpoint()
    sipp = start_caller(system, workdir, service, rtp)
    try:
        if during is not None:
            during(sipp, rtp)
        rc = sipp.wait(timeout)
    finally:
        sipp.stop()
        rtp.close()

    def end_seen() -> bool:
        # Notifications are fire-and-forget: give /end a moment to arrive (a route the
        # scripted provider never hears from has nothing to wait for).
        seen = system.provider.requests[mark:]
        return not seen or any(r.path.endswith("/end") for r in seen)

    wait_until(end_seen, 5, "/end")
    with system.provider.lock:
        requests = list(system.provider.requests[mark:])
    return CallResult(sipp, rtp, requests, rc)


def heard(rtp: RtpEndpoint) -> list[RtpPacket]:
    """The G.711 packets (PCMU or PCMA, whichever was negotiated) the caller received."""
    return sorted(rtp.audio(0) + rtp.audio(8), key=lambda p: p.at)


def assert_ended_by_pbx(result: CallResult) -> float:
    """sipp exited 0 after receiving the PBX's BYE; returns when the BYE arrived."""
    assert result.rc == 0, result.sipp.logs()
    return message_time(result.sipp, "received", r"^BYE ")


def assert_error_prompt(result: CallResult, bye_at: float) -> None:
    """The caller heard about 3 s of sounds/error.wav, and the BYE came after it."""
    audio = heard(result.rtp)
    assert audio, "the caller received no RTP at all"
    span = audio[-1].at - audio[0].at
    assert len(audio) >= 130 and span >= 2.6, (
        f"{len(audio)} packets over {span:.2f} s: not the {ERROR_WAV_S} s error prompt"
    )
    assert len(audio) <= 175, f"{len(audio)} packets: more than the error prompt"
    assert bye_at >= audio[-1].at - 0.1, "BYE arrived before the error prompt finished"


def traces(system: PbxSystem, session_id: str) -> list[dict[str, Any]]:
    return wait_until(
        lambda: _traces_with_end(system, session_id), 5, f"the traces of {session_id}"
    )


def _traces_with_end(system: PbxSystem, session_id: str) -> list[dict[str, Any]] | None:
    try:
        steps = system.admin(f"/api/traces/{session_id}")
    except OSError:
        return None
    return steps if steps and any(s.get("end_reason") for s in steps) else None


@pytest.fixture(autouse=True)
def _provider_reset(system: PbxSystem) -> Iterator[None]:
    wait_idle(system)
    yield
    system.provider.script = system.provider.default_script
    wait_idle(system)


# ---------------------------------------------------------------- a. timeout, then success


def test_step_timeout_is_retried_and_the_retry_answer_runs(
    system: PbxSystem, workdir: Path
) -> None:
    lock = threading.Lock()
    attempts: list[float] = []

    def script(path: str, body: Any) -> Reply:
        if path.endswith(NOTIFY_SUFFIXES):
            return OK
        with lock:
            attempts.append(time.monotonic())
            first = len(attempts) == 1
        if first:  # longer than timeout_ms = 600: the PBX gives up on this one
            return 200, json.dumps({"type": "hangup", "prompt": "sounds/error.wav"}).encode(), 1.5
        return action({"type": "hangup", "prompt": "sounds/beep.wav"})

    system.provider.script = script
    result = call(system, workdir)
    bye_at = assert_ended_by_pbx(result)

    steps = result.steps()
    assert len(steps) == 2, [r.body for r in steps]
    assert all(r.body["event"] == {"type": "session_start"} for r in steps)
    gap = steps[1].at - steps[0].at
    # per-request timeout (0.6 s) + 100 ms between retries; well below the 1.5 s sleep
    assert TIMEOUT_S <= gap < 1.2, f"retry {gap:.3f} s after the first attempt"

    audio = heard(result.rtp)
    # beep.wav is 0.25 s = 12-13 packets; the late answer (error.wav) must not play
    assert 8 <= len(audio) <= 25, f"{len(audio)} packets: not the beep of the retry answer"
    assert audio[0].at > steps[1].at
    assert bye_at >= audio[-1].at - 0.1
    end = result.notifications("/end")
    assert len(end) == 1 and end[0].body["reason"] == "Normal", [r.body for r in end]
    steps_trace = traces(system, result.session_id)
    assert steps_trace[-1]["end_reason"] == "Normal"
    assert not any(s.get("error") for s in steps_trace), steps_trace


# ---------------------------------------------------------------- b. 5xx every time


def test_5xx_retries_then_default_fallback(system: PbxSystem, workdir: Path) -> None:
    def script(path: str, body: Any) -> Reply:
        if path.endswith(NOTIFY_SUFFIXES):
            return OK
        return 500, b'{"error":"boom"}', 0.0

    system.provider.script = script
    result = call(system, workdir)
    bye_at = assert_ended_by_pbx(result)

    steps = result.steps()
    assert len(steps) == 1 + MAX_RETRIES, [r.body for r in steps]
    assert all(r.body["event"] == {"type": "session_start"} for r in steps)
    for before, after in zip(steps, steps[1:], strict=False):
        assert 0.08 <= after.at - before.at < 0.6, "retries are 100 ms apart"
    assert_error_prompt(result, bye_at)
    assert heard(result.rtp)[0].at > steps[-1].at, "fallback only after the last retry"
    assert len(result.notifications("/start")) == 1
    end = result.notifications("/end")
    assert len(end) == 1, [r.path for r in result.requests]
    assert end[0].body["session_id"] == result.session_id

    steps_trace = traces(system, result.session_id)
    errors = " ".join(s.get("error") or "" for s in steps_trace)
    assert "HTTP 500" in errors and "fallback" in errors, steps_trace


# ---------------------------------------------------------------- c. invalid JSON


def test_invalid_json_plays_error_and_hangs_up(system: PbxSystem, workdir: Path) -> None:
    def script(path: str, body: Any) -> Reply:
        if path.endswith(NOTIFY_SUFFIXES):
            return OK
        return 200, b'{"type": "prompt", "file": ', 0.0

    system.provider.script = script
    result = call(system, workdir)
    bye_at = assert_ended_by_pbx(result)
    assert len(result.steps()) == 1, "invalid JSON is not retried"
    assert_error_prompt(result, bye_at)
    assert len(result.notifications("/end")) == 1

    steps_trace = traces(system, result.session_id)
    errored = [s for s in steps_trace if s.get("error")]
    assert errored, steps_trace
    assert "invalid provider response" in errored[0]["error"], errored


# ---------------------------------------------------------------- d. 4xx is final


def test_404_goes_to_the_fallback_at_once(system: PbxSystem, workdir: Path) -> None:
    def script(path: str, body: Any) -> Reply:
        if path.endswith(NOTIFY_SUFFIXES):
            return OK
        return 404, b'{"error":"no such ivr"}', 0.0

    system.provider.script = script
    result = call(system, workdir)
    bye_at = assert_ended_by_pbx(result)
    steps = result.steps()
    assert len(steps) == 1, f"a 4xx must not be retried: {len(steps)} step requests"
    assert_error_prompt(result, bye_at)
    # at once: no retry delay before the fallback prompt
    assert heard(result.rtp)[0].at - steps[0].at < 0.5
    assert len(result.notifications("/end")) == 1
    errors = " ".join(s.get("error") or "" for s in traces(system, result.session_id))
    assert "HTTP 404" in errors, errors


# ---------------------------------------------------------------- e. unsupported types


@pytest.mark.parametrize(
    "node, expected",
    [
        ({"type": "teleport", "destination": "mars"}, "teleport"),
        ({"type": "repeat"}, "repeat"),
    ],
    ids=["unknown-type", "tree-only-repeat"],
)
def test_unsupported_action_type_plays_error(
    system: PbxSystem, workdir: Path, node: dict[str, Any], expected: str
) -> None:
    def script(path: str, body: Any) -> Reply:
        if path.endswith(NOTIFY_SUFFIXES):
            return OK
        return action(node)

    system.provider.script = script
    result = call(system, workdir)
    bye_at = assert_ended_by_pbx(result)
    assert len(result.steps()) == 1
    assert_error_prompt(result, bye_at)
    assert len(result.notifications("/end")) == 1

    steps_trace = traces(system, result.session_id)
    errored = [s for s in steps_trace if s.get("error")]
    assert errored, steps_trace
    assert repr(expected) in errored[0]["error"], errored[0]
    if expected == "repeat":
        assert "tree-mode" in errored[0]["error"], errored[0]
    else:
        assert "unknown action type" in errored[0]["error"], errored[0]
    assert errored[0]["action_type"] == expected


# ---------------------------------------------------------------- f. connection refused


def test_connection_refused_goes_to_the_fallback(system: PbxSystem, workdir: Path) -> None:
    """`*97` points at a port that refuses connections: three attempts, then the
    default fallback (error.wav, hang-up); /start and /end fail quietly."""
    call_ids: list[str] = []

    def find_call(sipp: Sipp, rtp: RtpEndpoint) -> None:
        calls = wait_until(
            lambda: [c for c in system.admin("/api/calls") if c["callee"] == "*97"],
            5,
            "the *97 call",
        )
        call_ids.append(calls[0]["call_id"])

    result = call(system, workdir, "*97", during=find_call)
    bye_at = assert_ended_by_pbx(result)
    assert result.requests == [], "the *97 route must not reach the scripted provider"
    assert_error_prompt(result, bye_at)
    # The front names the IVR session after the call (front._start_session).
    steps_trace = traces(system, call_ids[0])
    errors = " ".join(s.get("error") or "" for s in steps_trace)
    assert "connection error" in errors, steps_trace
    assert "gave up after 3 attempt(s)" in errors, steps_trace
    assert f"127.0.0.1:{REFUSED_PORT}" in errors, steps_trace


# ---------------------------------------------------------------- g. slow notifications


def test_slow_notifications_do_not_delay_the_call(system: PbxSystem, workdir: Path) -> None:
    menu = {
        "type": "dtmf_menu",
        "greeting": "sounds/beep.wav",
        "timeout_ms": 5000,
        "entries": {"1": {"type": "hangup"}},
    }

    def script(path: str, body: Any) -> Reply:
        if path.endswith(NOTIFY_SUFFIXES):
            return 200, b'{"status":"ok"}', 3.0
        return action(menu)

    digit_sent: list[float] = []

    def press_1(sipp: Sipp, rtp: RtpEndpoint) -> None:
        first = wait_until(lambda: heard(rtp), 10, "the greeting's first RTP packet")[0]
        wait_until(lambda: time.monotonic() > first.at + 0.5, 2, "the greeting to end")
        digit_sent.append(time.monotonic())
        send_rfc4733(rtp, first.src, "1")

    system.provider.script = script
    result = call(system, workdir, during=press_1)
    bye_at = assert_ended_by_pbx(result)

    ok_at = message_time(result.sipp, "received", r"^SIP/2\.0 200")
    audio = heard(result.rtp)
    first_rtp = audio[0].at - ok_at
    # The first step waits for /start's answer, at most /start's own 0.5 s timeout
    # (issue 10: /start strictly before the first step), never the provider's 3 s.
    assert first_rtp < 1.5, f"first prompt RTP {first_rtp:.3f} s after the 200"
    start = result.notifications("/start")
    steps = result.steps()
    assert len(start) == 1 and len(steps) == 1
    gap = steps[0].at - start[0].at
    assert 0.4 < gap < 1.2, f"step request {gap:.3f} s after /start"

    match = result.notifications("/dtmf-match")
    assert len(match) == 1 and match[0].body["digit"] == "1", [r.body for r in match]
    # The menu entry (hang-up) runs at once, without waiting for /dtmf-match.
    assert bye_at - digit_sent[0] < 0.4, f"BYE {bye_at - digit_sent[0]:.3f} s after the digit"
    end = result.notifications("/end")
    assert len(end) == 1
    assert end[0].at - bye_at < 0.4
    # and the slow /end does not hold the call: gone well before the provider's 3 s
    wait_until(lambda: system.metrics()["pbx_calls"] == 0, 1.0, "the call to be gone")


def send_rfc4733(rtp: RtpEndpoint, dest: tuple[str, int], digit: str) -> None:
    """One RFC 4733 event (PT 101) from the caller's RTP port: 5 packets 20 ms apart
    with a growing duration, then the end packet 3 times; one timestamp throughout."""
    event = "0123456789*#".index(digit)
    ssrc, seq, ts = 0x1234ABCD, 4000, 480000
    for i in range(8):
        end = i >= 5
        duration = 160 * min(i + 1, 6)
        header = struct.pack("!BBHII", 0x80, (0x80 if i == 0 else 0) | 101, seq + i, ts, ssrc)
        payload = bytes([event, (0x80 if end else 0) | 10]) + duration.to_bytes(2, "big")
        rtp.sock.sendto(header + payload, dest)
        time.sleep(0.02)

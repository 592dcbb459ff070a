"""SIP basics against the running front, with sipp (and one raw UDP socket for the
requests sipp cannot malform): OPTIONS, no route, unknown method, malformed requests,
BYE and CANCEL outside what the PBX knows, and the upstream short-form route."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    SCENARIOS,
    PbxSystem,
    Reply,
    RtpEndpoint,
    Sipp,
    free_port,
    start_sipp,
    wait_idle,
    wait_until,
)

OK = (200, b'{"status":"ok"}', 0.0)


def run_sipp(
    system: PbxSystem, workdir: Path, scenario: str, service: str, *extra: str, timeout: float = 20
) -> Sipp:
    sipp = start_sipp(
        scenario,
        [
            "-sf",
            str(SCENARIOS / scenario),
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
            "-m",
            "1",
            "-l",
            "1",
            "-timeout",
            "15s",
            "-timeout_error",
            "-recv_timeout",
            "5000",
            *extra,
        ],
        workdir / scenario.removesuffix(".xml"),
    )
    try:
        rc = sipp.wait(timeout)
    finally:
        sipp.stop()
    assert rc == 0, f"sipp {scenario} exited {rc}:\n{sipp.logs()}"
    return sipp


def received_statuses(sipp: Sipp) -> list[str]:
    """The status line of every response sipp received (from its message log)."""
    out = []
    for path in sipp.workdir.glob("*_messages.log"):
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if "message received" in line:
                first = next((ln.strip() for ln in lines[i + 1 : i + 4] if ln.strip()), "")
                if first.startswith("SIP/2.0"):
                    out.append(first)
    return out



@pytest.fixture(autouse=True)
def _idle_before_and_after(system: PbxSystem) -> Iterator[None]:
    wait_idle(system)
    yield
    system.provider.script = system.provider.default_script
    wait_idle(system)


def test_options_gets_200_with_allow(system: PbxSystem, workdir: Path) -> None:
    sipp = run_sipp(system, workdir, "uac_options.xml", "pbx")
    assert received_statuses(sipp) == ["SIP/2.0 200 OK"]


def test_unknown_callers_get_one_challenge_whatever_they_ask_for(
        system: PbxSystem, workdir: Path) -> None:
    """No route, a user, a non-public route: an unknown caller gets the same 407 for
    each (pbx.policy), so the answers do not tell which exist; the provider is not
    asked."""
    before = system.metrics()
    mark = len(system.provider.requests)
    answers = []
    for target in ("55501", "2001", "*95"):
        sipp = run_sipp(system, workdir / target.strip("*"), "uac_invite_407.xml", target)
        statuses = received_statuses(sipp)
        # One 407: the ACK stopped the retransmissions (the scenario waits 1.2 s after
        # it, longer than the first retransmission interval T1 = 0.5 s).
        answers.append([s for s in statuses if not s.startswith("SIP/2.0 1")])
    assert answers == [["SIP/2.0 407 Proxy Authentication Required"]] * 3, answers
    after = system.metrics()
    assert after["pbx_calls_total"] == before["pbx_calls_total"] + 3
    assert after["pbx_calls_challenged_total"] == before["pbx_calls_challenged_total"] + 3
    assert system.provider.requests[mark:] == [], "refused: the provider is not asked"


def test_unknown_method_gets_501(system: PbxSystem, workdir: Path) -> None:
    sipp = run_sipp(system, workdir, "uac_unknown_method.xml", "pbx")
    assert [s.split(" ")[1] for s in received_statuses(sipp)] == ["501"]


def test_bye_to_unknown_dialog_gets_481(system: PbxSystem, workdir: Path) -> None:
    sipp = run_sipp(system, workdir, "uac_bye_unknown_dialog.xml", "pbx")
    assert [s.split(" ")[1] for s in received_statuses(sipp)] == ["481"]


# ---------------------------------------------------------------- malformed requests


def raw_request(cseq: str, call_id: str, port: int, extra: str = "") -> bytes:
    return (
        f"OPTIONS sip:pbx@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-{call_id}\r\n"
        f"From: <sip:raw@127.0.0.1:{port}>;tag=raw1\r\n"
        f"To: <sip:pbx@127.0.0.1>\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq}\r\n"
        f"Max-Forwards: 70\r\n{extra}"
        f"Content-Length: 0\r\n\r\n"
    ).encode()


def exchange(system: PbxSystem, data: bytes, timeout: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(timeout)
        s.sendto(data, ("127.0.0.1", system.sip_port))
        try:
            return s.recvfrom(65535)[0]
        except TimeoutError:
            return None


@pytest.mark.parametrize(
    "cseq, extra",
    [
        ("abc OPTIONS", ""),  # CSeq number not a number
        ("1 INVITE", ""),  # CSeq method differs from the request method
        ("99999999999 OPTIONS", ""),  # CSeq number above 2**31 (RFC 3261 §8.1.1.5)
        ("1 OPTIONS", "Content-Length: 40\r\n"),  # a second, contradicting Content-Length
    ],
    ids=["cseq-not-a-number", "cseq-method-mismatch", "cseq-too-big", "two-content-lengths"],
)
def test_malformed_request_gets_400_and_the_front_keeps_answering(
    system: PbxSystem, workdir: Path, cseq: str, extra: str
) -> None:
    malformed_before = system.metrics().get("pbx_sip_malformed_total", 0)
    call_id = f"malformed-{time.monotonic_ns()}"
    answer = exchange(system, raw_request(cseq, call_id, 5999, extra))
    assert answer is not None, "no answer to a malformed request that names its Via"
    text = answer.decode("utf-8", "replace")
    assert text.startswith("SIP/2.0 400 "), text
    assert f"Call-ID: {call_id}" in text, text
    assert "branch=z9hG4bK-" + call_id in text, text
    assert system.metrics()["pbx_sip_malformed_total"] == malformed_before + 1

    # Garbage with no readable headers is dropped without an answer.
    assert exchange(system, b"\x00\x01garbage\r\n\r\n", timeout=0.5) is None
    # And the front is still fine: a good request is answered.
    ok = exchange(system, raw_request("2 OPTIONS", call_id + "-ok", 5999))
    assert ok is not None and ok.startswith(b"SIP/2.0 200 "), ok
    run_sipp(system, workdir, "uac_options.xml", "pbx")


# ---------------------------------------------------------------- calls


def test_cancel_after_answer_leaves_the_call_up(system: PbxSystem, workdir: Path) -> None:
    def script(path: str, body: Any) -> Reply:
        if path.endswith(("/start", "/end", "/dtmf-match")):
            return OK
        return 200, json.dumps({"type": "prompt", "file": "sounds/hold.wav"}).encode(), 0.0

    system.provider.script = script
    mark = len(system.provider.requests)
    rtp = RtpEndpoint()
    try:
        sipp = run_sipp(
            system, workdir, "uac_cancel_after_answer.xml", "*99", "-key", "rtp_port", str(rtp.port)
        )
        statuses = received_statuses(sipp)
        cancel_answer = [s for s in statuses if s.split(" ")[1] in ("481", "200")]
        assert len(cancel_answer) >= 3, statuses  # 200 INVITE, CANCEL answer, 200 BYE
        assert not [s for s in statuses if s.split(" ")[1] == "487"], statuses
        # The prompt played until the caller's BYE, not a moment of silence after CANCEL.
        assert len(rtp.audio(0)) >= 25, f"{len(rtp.audio(0))} RTP packets"
    finally:
        rtp.close()
    end = wait_until(
        lambda: [r for r in system.provider.requests[mark:] if r.path == "/ivr/step/end"], 5, "/end"
    )
    assert end[0].body["reason"] == "Hangup", end[0].body


def test_a_late_offer_caller_hears_the_ivr(system: PbxSystem, workdir: Path) -> None:
    """A trunk's delayed offer (INVITE without SDP): the PBX offers in its 200, the ACK
    answers, and the IVR's prompt reaches the RTP port that answer named."""
    def script(path: str, body: Any) -> Reply:
        if path.endswith(("/start", "/end", "/dtmf-match")):
            return OK
        return 200, json.dumps({"type": "hangup", "prompt": "sounds/beep.wav"}).encode(), 0.0

    system.provider.script = script
    rtp = RtpEndpoint()
    try:
        run_sipp(system, workdir, "uac_late_offer.xml", "*99", "-key", "rtp_port", str(rtp.port))
        assert len(rtp.audio(0)) >= 8, "the beep, sent where the ACK's answer said"
    finally:
        rtp.close()


def test_short_form_route_reaches_its_provider_url(system: PbxSystem, workdir: Path) -> None:
    def script(path: str, body: Any) -> Reply:
        if path.endswith(("/start", "/end", "/dtmf-match")):
            return OK
        return 200, json.dumps({"type": "hangup", "prompt": "sounds/beep.wav"}).encode(), 0.0

    system.provider.script = script
    mark = len(system.provider.requests)
    rtp = RtpEndpoint()
    try:
        run_sipp(system, workdir, "uac_wait_bye.xml", "*98", "-key", "rtp_port", str(rtp.port))
        assert len(rtp.audio(0)) >= 8, "the beep of the short-form route's answer"
    finally:
        rtp.close()
    wait_until(
        lambda: any(r.path == "/short/end" for r in system.provider.requests[mark:]),
        5,
        "/short/end",
    )
    paths = [r.path for r in system.provider.requests[mark:]]
    assert sorted(paths) == ["/short", "/short/end", "/short/start"], paths
    step = next(r for r in system.provider.requests[mark:] if r.path == "/short")
    assert step.body["event"] == {"type": "session_start"}
    assert step.body["callee"] == "*98"

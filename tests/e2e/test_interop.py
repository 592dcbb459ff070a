"""Interop with independent SIP stacks (issue 11): pjsua2 (pjsip 2.15), Debian's
baresip 1.0 (libre) and Debian's linphonec 5.1 (liblinphone) as headless phones against
the real system, on loopback.

Each phone registers with digest (extensions 3001-3003 and 2001 have passwords here),
sends a tone of its own (pjsua2 1000 Hz, baresip 440 Hz, linphonec 700 Hz) and records
what it receives, so the checks are on what a person would hear: the `*99` menu's
greeting is not silence, and after a transfer each side hears the other's tone (by FFT
peak). Digits go as RFC 4733 events (all three) and SIP INFO (pjsua2 and linphonec;
baresip 1.0 cannot). Also: hold and resume (re-INVITE sendonly then sendrecv), hang-up
from either side, CANCEL while the callee rings, TCP, and parallel ringing of two phones
registered as the same user.

One system for the module (the tests are independent: each ends its calls and
unregisters its phones), every wait bounded, every phone process ended.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    REGISTERING_USERS,
    PbxSystem,
    Reply,
    ScriptedProvider,
    start_system,
    wait_idle,
    wait_until,
)
from tests.e2e.softphones import (
    BaresipPhone,
    LinphonePhone,
    PjsuaPhone,
    assert_tone,
    pause,
    read_wav,
)

PASSWORDS = {**REGISTERING_USERS, "2001": "pw-2001"}
PJSUA_HZ = 1000
BARESIP_HZ = 440
LINPHONE_HZ = 700

MENU = {
    "type": "dtmf_menu",
    "greeting": "sounds/menu.wav",  # 5.2 s of speech
    "timeout_ms": 15000,
    "entries": {"1": {"type": "transfer", "target": "2001"}},
    "step_id": "menu",
}


def menu_script(path: str, body: Any) -> Reply:
    """`*99`: the menu; 1 transfers to 2001."""
    if path.endswith(("/start", "/end", "/dtmf-match")):
        return 200, b'{"status":"ok"}', 0.0
    if ((body or {}).get("event") or {}).get("type") == "session_start":
        return 200, json.dumps(MENU).encode(), 0.0
    return 200, json.dumps({"type": "hangup"}).encode(), 0.0


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxSystem]:
    provider = ScriptedProvider()
    provider.script = menu_script
    # 2001 registers here (no static contact); the config's own digest algorithms
    # (SHA-256 and MD5, one challenge each; MD5 alone for libre by User-Agent).
    s = start_system(tmp_path_factory.mktemp("pbx-interop"), provider, extensions=(),
                     digest_algorithms=None,
                     extra_config=f'\n[users."2001"]\npassword = "{PASSWORDS["2001"]}"\n')
    yield s
    s.stop()
    provider.close()


# Ports a test may need on the caller's worker at once (caller, two branches, margin).
PORTS_PER_TEST = 6


def worker_ports_free(system: PbxSystem) -> dict[str, float]:
    return {name: value for name, value in system.metrics().items()
            if name.startswith("pbx_media_worker_ports_free{")}


@pytest.fixture(autouse=True)
def _ports_back(system: PbxSystem) -> None:
    """Each test starts when every worker's pool has room for its legs (caller and two
    branches on one worker): the harness's range is small (50 pairs for two pools of 16),
    and a worker that found part of it taken (another system on the machine; its log
    says "only N of 16 RTP port pairs free") answers a branch it has no port for with
    503, which is right, but is not what these tests are about."""
    wait_until(lambda: (free := worker_ports_free(system)) != {}
               and min(free.values()) >= PORTS_PER_TEST, 10,
               f"{PORTS_PER_TEST} free ports on every worker")


@pytest.fixture
def phones() -> Iterator[list[PjsuaPhone | BaresipPhone | LinphonePhone]]:
    """Phones a test starts: each is unregistered and ended after the test."""
    started: list[PjsuaPhone | BaresipPhone | LinphonePhone] = []
    yield started
    for phone in started:
        phone.close()


def pjsua(system: PbxSystem, phones: list[Any], workdir: Path, user: str,
          transport: str = "udp", tone_hz: int = PJSUA_HZ) -> PjsuaPhone:
    phone = PjsuaPhone(workdir / f"pjsua-{user}-{transport}", user, PASSWORDS[user],
                       system.sip_addr, tone_hz=tone_hz, transport=transport)
    phones.append(phone)
    phone.register()
    return phone


def baresip(system: PbxSystem, phones: list[Any], workdir: Path, user: str,
            transport: str = "udp") -> BaresipPhone:
    phone = BaresipPhone(workdir / f"baresip-{user}-{transport}", user, PASSWORDS[user],
                         system.sip_addr, tone_hz=BARESIP_HZ, transport=transport)
    phones.append(phone)
    phone.wait_registered()
    return phone


def linphone(system: PbxSystem, phones: list[Any], workdir: Path, user: str,
             dtmf: str = "rfc4733") -> LinphonePhone:
    phone = LinphonePhone(workdir / f"linphone-{user}-{dtmf}", user, PASSWORDS[user],
                          system.sip_addr, tone_hz=LINPHONE_HZ, dtmf=dtmf)
    phones.append(phone)
    phone.wait_registered()
    return phone


def menu_digits(system: PbxSystem, caller: str) -> list[str]:
    """The digits the `*99` menu matched (`/dtmf-match`) in the latest session whose
    caller is `caller`."""
    starts = [r for r in system.provider.seen("/ivr/step/start")
              if r.body.get("caller") == caller]
    assert starts, f"no session for caller {caller}"
    session_id = starts[-1].body["session_id"]
    return [str(r.body.get("digit")) for r in system.provider.for_session(session_id)
            if r.path.endswith("/dtmf-match")]


def sdp_directions(trace: str) -> list[str]:
    """The direction attributes of the SDP bodies in a phone's SIP trace, in order."""
    return re.findall(r"^a=(sendrecv|sendonly|recvonly|inactive)", trace, re.MULTILINE)


def challenges(trace: str) -> list[str]:
    """The algorithms of the WWW-Authenticate challenges in a phone's SIP trace."""
    return re.findall(r"^WWW-Authenticate: Digest .*algorithm=([\w-]+)", trace, re.MULTILINE)


def answered(trace: str, header: str = "Authorization") -> list[str]:
    """The algorithms of the credentials (`header`) a phone sent, in its SIP trace."""
    return re.findall(rf"^{header}: +Digest .*algorithm=([\w-]+)", trace, re.MULTILINE)


def heard_the_greeting(path: Path) -> None:
    """The first seconds received are the menu's speech, not silence."""
    samples, rate = read_wav(path)
    head = samples[:3 * rate]
    loud = head[abs(head.astype(int)) > 300]
    assert len(loud) > 0.05 * len(head), f"{path.name}: the greeting is silence"


def test_pjsua2_menu_by_sip_info_transfer_to_baresip_hold_resume_callee_hangs_up(
        system: PbxSystem, phones: list[Any], workdir: Path) -> None:
    callee = baresip(system, phones, workdir, "2001")
    caller = pjsua(system, phones, workdir, "3001")
    # The shipped digest settings: pjsua2 is offered both algorithms, libre MD5 alone.
    assert set(challenges(caller.trace(-1))) == {"SHA-256", "MD5"}
    assert set(challenges(callee.trace(-1))) == {"MD5"}
    caller.send("call", uri=f"sip:*99@{system.sip_addr}")
    caller.wait_state("confirmed")
    pause(2.0)  # the greeting plays
    caller.send("dtmf", digits="1", method="info")
    incoming = callee.wait_event("CALL_INCOMING")
    callee.command("accept")
    callee.wait_event("CALL_ESTABLISHED")
    pause(2.0)
    heard_the_greeting(caller.record)
    assert menu_digits(system, "3001") == ["1"]
    assert_tone(caller.record, BARESIP_HZ, since_s=3.0)
    assert_tone(callee.received_wav(), PJSUA_HZ)

    mark = len(caller.events)
    caller.send("hold")
    caller.wait_event(lambda e: e["event"] == "media" and e["status"] == "local_hold", 10,
                      "pjsua2 on hold", mark)
    mark = len(caller.events)
    caller.send("unhold")
    caller.wait_event(lambda e: e["event"] == "media" and e["status"] == "active", 10,
                      "pjsua2 resumed", mark)
    samples, rate = read_wav(caller.record)
    pause(1.5)
    assert_tone(caller.record, BARESIP_HZ, since_s=len(samples) / rate)

    mark = len(caller.events)
    callee.command("hangup")
    caller.wait_state("disconnected", since=mark)
    assert incoming["peeruri"], incoming
    wait_idle(system)
    caller.close()  # its log is complete once it has ended
    directions = sdp_directions(caller.trace(-1))
    # Offer/answer in order: the call, the hold (the PBX answers it itself: recvonly),
    # the resume.
    assert directions[-4:] == ["sendonly", "recvonly", "sendrecv", "sendrecv"], directions


def test_baresip_menu_by_rfc4733_transfer_to_pjsua2_hold_resume_caller_hangs_up(
        system: PbxSystem, phones: list[Any], workdir: Path) -> None:
    callee = pjsua(system, phones, workdir, "2001")
    caller = baresip(system, phones, workdir, "3002")
    caller.command("dial", f"sip:*99@{system.sip_addr}")
    caller.wait_event("CALL_ESTABLISHED")
    pause(2.0)
    caller.command("sndcode", "1")
    callee.wait_event(lambda e: e["event"] == "incoming", 15, "the transfer rings pjsua2")
    callee.send("answer")
    callee.wait_state("confirmed")
    pause(2.0)
    heard_the_greeting(caller.received_wav())
    assert menu_digits(system, "3002") == ["1"]
    assert_tone(caller.received_wav(), PJSUA_HZ, since_s=3.0)
    assert_tone(callee.record, BARESIP_HZ)

    # The PBX answers the hold itself (recvonly) and does not pass it on to pjsua2.
    caller.command("hold")
    wait_until(lambda: sdp_directions(caller.trace(-1))[-2:] == ["sendonly", "recvonly"],
               10, "baresip's hold (sendonly) answered recvonly")
    caller.command("resume")
    wait_until(lambda: sdp_directions(caller.trace(-1))[-2:] == ["sendrecv", "sendrecv"],
               10, "baresip's resume (sendrecv) answered sendrecv")
    samples, rate = read_wav(callee.record)
    pause(1.5)
    assert_tone(callee.record, BARESIP_HZ, since_s=len(samples) / rate)

    # The caller hangs up (pjsua2 hangs up as a callee in the parallel-ringing case).
    mark = len(callee.events)
    caller.command("hangup")
    ended = callee.wait_state("disconnected", since=mark)
    assert "BYE sip:2001" in callee.trace(-1), ended
    wait_idle(system)


def test_tcp_pjsua2_menu_by_rfc4733_transfer_to_baresip_caller_hangs_up(
        system: PbxSystem, phones: list[Any], workdir: Path) -> None:
    """Both phones over TCP; pjsua2's digit as an RFC 4733 event this time."""
    callee = baresip(system, phones, workdir, "2001", transport="tcp")
    assert re.search(r"\{0/TCP/v4\} 200 OK", callee.trace(-1)), callee.trace()
    caller = pjsua(system, phones, workdir, "3003", transport="tcp")
    assert re.search(r"Response msg 200/REGISTER/.* from TCP", caller.trace(-1))
    caller.send("call", uri=f"sip:*99@{system.sip_addr}")
    caller.wait_state("confirmed")
    pause(2.0)
    caller.send("dtmf", digits="1", method="rfc4733")
    callee.wait_event("CALL_INCOMING")
    callee.command("accept")
    callee.wait_event("CALL_ESTABLISHED")
    pause(2.0)
    heard_the_greeting(caller.record)
    assert menu_digits(system, "3003") == ["1"]
    assert_tone(caller.record, BARESIP_HZ, since_s=3.0)
    assert_tone(callee.received_wav(), PJSUA_HZ)
    mark = len(callee.events)
    caller.send("hangup")
    callee.wait_event("CALL_CLOSED", since=mark)
    assert "BYE sip:" in callee.trace(-1)
    # Every SIP message of either phone went over TCP.
    assert "UDP 127.0.0.1" not in callee.trace(-1)
    assert not re.search(r"(to|from) UDP ", caller.trace(-1))
    wait_idle(system)


def test_cancel_while_ringing_pjsua2_calls_baresip(
        system: PbxSystem, phones: list[Any], workdir: Path) -> None:
    callee = baresip(system, phones, workdir, "2001")
    caller = pjsua(system, phones, workdir, "3001")
    caller.send("call", uri=f"sip:2001@{system.sip_addr}")
    callee.wait_event("CALL_INCOMING")
    caller.wait_state("early")  # baresip's 180, relayed
    mark = len(callee.events)
    caller.send("hangup")  # before the answer: a CANCEL
    closed = caller.wait_state("disconnected")
    assert closed["code"] == 487, closed
    # The callee stops ringing: the PBX CANCELs its leg, baresip answers 487.
    callee.wait_event("CALL_CLOSED", since=mark)
    trace = callee.trace(-1)
    assert "CANCEL sip:2001" in trace and "SIP/2.0 487 Request Terminated" in trace, trace
    wait_idle(system)


def test_cancel_while_ringing_baresip_calls_pjsua2(
        system: PbxSystem, phones: list[Any], workdir: Path) -> None:
    callee = pjsua(system, phones, workdir, "2001")
    caller = baresip(system, phones, workdir, "3002")
    caller.command("dial", f"sip:2001@{system.sip_addr}")
    callee.wait_event(lambda e: e["event"] == "incoming", 15, "pjsua2 rung")
    callee.send("ring")
    caller.wait_event("CALL_RINGING")
    mark = len(callee.events)
    caller.command("hangup")
    # The callee stops ringing: its incoming call ends on the CANCEL, with 487.
    ended = callee.wait_state("disconnected", since=mark)
    assert ended["code"] == 487, ended
    assert "CANCEL sip:2001" in callee.trace(-1)
    caller.wait_event("CALL_CLOSED")
    wait_idle(system)


@pytest.mark.parametrize("answering", ["baresip", "pjsua2"])
def test_parallel_ringing_both_phones_of_2001_ring_one_answers_the_other_gets_cancel(
        system: PbxSystem, phones: list[Any], workdir: Path, answering: str) -> None:
    """pjsua2 and baresip both registered as 2001: a call to 2001 rings both; the
    first to answer gets the call and the other is CANCELled (its ringing stops)."""
    phone_b = baresip(system, phones, workdir, "2001")
    phone_p = pjsua(system, phones, workdir, "2001")
    caller = pjsua(system, phones, workdir, "3001", tone_hz=1500)
    caller.send("call", uri=f"sip:2001@{system.sip_addr}")
    phone_b.wait_event("CALL_INCOMING")
    phone_p.wait_event(lambda e: e["event"] == "incoming", 15, "pjsua2 2001 rung")
    phone_p.send("ring")
    if answering == "baresip":
        phone_b.command("accept")
        phone_b.wait_event("CALL_ESTABLISHED")
        ended = phone_p.wait_state("disconnected")
        assert ended["code"] == 487, ended
        assert "CANCEL sip:2001" in phone_p.trace(-1)
        heard = BARESIP_HZ
    else:
        mark = len(phone_b.events)
        phone_p.send("answer")
        phone_p.wait_state("confirmed")
        phone_b.wait_event("CALL_CLOSED", since=mark)
        trace = phone_b.trace(-1)
        assert "CANCEL sip:2001" in trace and "SIP/2.0 487 Request Terminated" in trace
        heard = PJSUA_HZ
    caller.wait_state("confirmed")
    pause(2.0)
    assert_tone(caller.record, heard)
    mark = len(caller.events)
    if answering == "baresip":
        phone_b.command("hangup")
    else:
        phone_p.send("hangup")
    caller.wait_state("disconnected", since=mark)
    wait_idle(system)


def test_linphonec_menu_by_rfc4733_transfer_to_pjsua2_caller_hangs_up(
        system: PbxSystem, phones: list[Any], workdir: Path) -> None:
    """linphonec 5.1 with the shipped digest settings: offered SHA-256 and MD5, it
    answers SHA-256 (REGISTER and INVITE); its digit goes as an RFC 4733 event."""
    callee = pjsua(system, phones, workdir, "2001")
    caller = linphone(system, phones, workdir, "3001")
    trace = caller.trace(-1)
    assert set(challenges(trace)) == {"SHA-256", "MD5"}, trace
    assert answered(trace) == ["SHA-256"], trace
    mark = len(caller.lines)
    caller.send(f"call sip:*99@{system.sip_addr}")
    caller.wait_line(r"Call \d+ with .* connected", since=mark)
    assert answered(caller.trace(-1), "Proxy-Authorization")[:1] == ["SHA-256"]
    pause(2.0)  # the greeting plays
    caller.send("1")  # a line of digits is sent as DTMF during a call
    callee.wait_event(lambda e: e["event"] == "incoming", 15, "the transfer rings pjsua2")
    callee.send("answer")
    callee.wait_state("confirmed")
    pause(2.0)
    assert menu_digits(system, "3001") == ["1"]
    assert "INFO sip:" not in caller.trace(-1)
    assert_tone(callee.record, LINPHONE_HZ)
    mark, line = len(callee.events), len(caller.lines)
    caller.send("terminate")
    ended = callee.wait_state("disconnected", since=mark)
    assert "BYE sip:2001" in callee.trace(-1), ended
    caller.wait_line(r"Call \d+ with .* ended", since=line)
    # linphonec writes its recording's header as the call ends.
    heard_the_greeting(caller.record)
    assert_tone(caller.record, PJSUA_HZ, since_s=3.0)
    wait_idle(system)


def test_linphonec_menu_by_sip_info_transfer_to_baresip_callee_hangs_up(
        system: PbxSystem, phones: list[Any], workdir: Path) -> None:
    """linphonec's digit as SIP INFO (`[sip] use_info=1`)."""
    callee = baresip(system, phones, workdir, "2001")
    caller = linphone(system, phones, workdir, "3002", dtmf="info")
    mark = len(caller.lines)
    caller.send(f"call sip:*99@{system.sip_addr}")
    caller.wait_line(r"Call \d+ with .* connected", since=mark)
    pause(2.0)
    caller.send("1")
    callee.wait_event("CALL_INCOMING")
    callee.command("accept")
    callee.wait_event("CALL_ESTABLISHED")
    pause(2.0)
    assert menu_digits(system, "3002") == ["1"]
    assert re.search(r"^INFO sip:", caller.trace(-1), re.MULTILINE)
    assert_tone(callee.received_wav(), LINPHONE_HZ)
    mark = len(caller.lines)
    callee.command("hangup")
    caller.wait_line(r"Call \d+ with .* ended", since=mark)
    assert re.search(r"^BYE sip:", caller.trace(-1), re.MULTILINE)
    heard_the_greeting(caller.record)
    assert_tone(caller.record, BARESIP_HZ, since_s=3.0)
    wait_idle(system)


def test_cancel_while_ringing_pjsua2_calls_linphonec(
        system: PbxSystem, phones: list[Any], workdir: Path) -> None:
    callee = linphone(system, phones, workdir, "2001")
    caller = pjsua(system, phones, workdir, "3003")
    caller.send("call", uri=f"sip:2001@{system.sip_addr}")
    callee.wait_line(r"Receiving new incoming call from .*, assigned id")
    caller.wait_state("early")  # linphonec's 180, relayed
    mark = len(callee.lines)
    caller.send("hangup")  # before the answer: a CANCEL
    closed = caller.wait_state("disconnected")
    assert closed["code"] == 487, closed
    # The callee stops ringing: the PBX CANCELs its leg, linphonec answers 487.
    callee.wait_line(r"Call \d+ with .* ended", since=mark)
    trace = callee.trace(-1)
    assert re.search(r"^CANCEL sip:", trace, re.MULTILINE), trace
    assert re.search(r"^SIP/2.0 487 ", trace, re.MULTILINE), trace
    wait_idle(system)

"""Toll fraud through the front (issue 8): an unknown caller who reaches the public IVR
must not make the PBX dial anywhere, and what it does dial presents policy's caller ID.

Real system (supervisord, front, workers, executors), sipp as the caller, and plain
UDP sockets standing where the fraudster wants a call to go (a "trunk" outside our
users and routes, or extension 2001's phone), so any INVITE the front sends is seen.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

from pbx.sip.message import SipRequest, make_response, parse_message
from tests.e2e.harness import (
    SCENARIOS,
    PbxSystem,
    Reply,
    RtpEndpoint,
    free_port,
    start_sipp,
    wait_idle,
    wait_until,
)
from tests.e2e.ivr_calls import call


class SipWatch:
    """A UDP port that records every SIP request sent to it; answers INVITEs with
    `answer` (None: silence) so a call it stands for ends quickly."""

    def __init__(self, port: int | None = None, answer: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port or 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.requests: list[SipRequest] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65536)
            except (TimeoutError, OSError):
                continue
            try:
                msg = parse_message(data)
            except Exception:
                continue
            if isinstance(msg, SipRequest):
                self.requests.append(msg)
                if msg.method == "INVITE" and self.answer is not None:
                    reply = make_response(msg, self.answer, to_tag="watch")
                    self.sock.sendto(reply.serialize(), addr)

    def invites(self) -> list[SipRequest]:
        return [r for r in self.requests if r.method == "INVITE"]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def prompt_forever(path: str, body: Any) -> Reply:
    if path.endswith(("/start", "/end", "/dtmf-match")):
        return 200, b'{"status":"ok"}', 0.0
    return 200, json.dumps({"type": "prompt", "file": "sounds/menu.wav"}).encode(), 0.0


def transfer_to(target: str) -> Any:
    def script(path: str, body: Any) -> Reply:
        if path.endswith(("/start", "/end", "/dtmf-match")):
            return 200, b'{"status":"ok"}', 0.0
        return 200, json.dumps({"type": "transfer", "target": target}).encode(), 0.0
    return script


def refer_from_unknown_caller(system: PbxSystem, workdir: Path, refer_to: str) -> str:
    """sipp calls *99 as an unknown caller and REFERs to `refer_to`; returns its log.
    The scenario itself fails unless the REFER gets 403."""
    system.provider.script = prompt_forever
    rtp = RtpEndpoint()
    caller = start_sipp("fraud", [
        "-sf", str(SCENARIOS / "uac_refer_refused.xml"), "-s", "*99", system.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-key", "rtp_port", str(rtp.port),
        "-key", "refer_to", refer_to, "-m", "1", "-l", "1",
    ], workdir)
    try:
        assert caller.wait(30) == 0, caller.logs()
        return caller.logs()
    finally:
        caller.stop()
        rtp.close()


def test_an_unknown_caller_cannot_refer_to_a_number_elsewhere(
        system: PbxSystem, workdir: Path) -> None:
    trunk = SipWatch()  # where sip:+15551234567@<trunk> would ring: outside users and routes
    before = system.metrics()
    try:
        refer_from_unknown_caller(system, workdir,
                                  f"sip:+15551234567@127.0.0.1:{trunk.port}")
        time.sleep(0.5)  # an INVITE sent after the 202 of old would have arrived by now
        assert trunk.invites() == [], "the front dialled the fraudster's number"
    finally:
        trunk.close()
    assert system.metrics()["pbx_refers_refused_total"] == before["pbx_refers_refused_total"] + 1
    wait_idle(system)


def test_an_unknown_caller_cannot_refer_to_an_extension(
        system: PbxSystem, workdir: Path) -> None:
    """An INVITE from this caller to 2001 is refused: so is a REFER to it."""
    phone = SipWatch(system.extension_ports["2001"])
    try:
        refer_from_unknown_caller(system, workdir, f"sip:2001@{system.sip_addr}")
        time.sleep(0.5)
        assert phone.invites() == [], "extension 2001 rang for an unknown caller's REFER"
    finally:
        phone.close()
    wait_idle(system)


def test_a_provider_transfer_to_a_uri_elsewhere_needs_an_outbound_rule(
        system: PbxSystem, workdir: Path) -> None:
    trunk = SipWatch(answer=486)
    system.provider.script = transfer_to(f"sip:+15551234567@127.0.0.1:{trunk.port}")
    before = system.metrics()
    try:
        with call(system, workdir) as caller:
            caller.wait_ended()
        assert trunk.invites() == [], "transfer to a URI outside users and routes dialled"
    finally:
        trunk.close()
    assert system.metrics()["pbx_transfers_refused_total"] == before["pbx_transfers_refused_total"] + 1
    wait_idle(system)


def test_caller_id_on_an_outbound_leg_is_policy_not_the_unverified_from(
        system: PbxSystem, workdir: Path) -> None:
    """The IVR transfers an unknown caller (From 1002, unverified) to 2001: the INVITE
    to 2001 presents [policy] anonymous_caller_id, not the From copied through."""
    phone = SipWatch(system.extension_ports["2001"], answer=486)
    system.provider.script = transfer_to("2001")
    try:
        with call(system, workdir) as caller:
            invite = wait_until(phone.invites, 10, "the INVITE to 2001")[0]
            caller.wait_ended()
    finally:
        phone.close()
    sender = invite.headers.get("From") or ""
    assert "sip:anonymous@" in sender and "1002" not in sender, sender
    wait_idle(system)

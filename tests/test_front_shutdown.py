"""The real front process (`python -m pbx.app`) on SIGTERM: the call records and traces
its buffered JSON-lines logs hold reach the files before it exits ([logging]
jsonl_flush_s is long here, so only the shutdown can have written them)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import zmq

from pbx import messages as m
from pbx.messages import decode, encode
from pbx.sip.message import SipResponse, parse_message
from tests.e2e.harness import free_port
from tests.fake_media_worker import FakeMediaWorker

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 20.0

CONFIG = """
[sip]
listen = "127.0.0.1:{sip}"
rate_limit_exempt = ["127.0.0.0/8"]

[policy]
trusted_networks = ["127.0.0.0/8"]

[admin]
listen = "127.0.0.1:{admin}"

[logging]
dir = "{logs}"
jsonl_flush_s = 5

[zmq]
media_endpoint = "ipc://{run}/media"
ivr_endpoint = "ipc://{run}/ivr"
events_endpoint = "ipc://{run}/events"

[[routes]]
name = "main"
to_user = "*99"
app = "ivr"
app_params = {{ mode = "step", url = "http://127.0.0.1:1/ivr" }}
"""


SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       "m=audio 40000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def request(method: str, port: int, n: int, to: str = "<sip:*99@127.0.0.1>") -> bytes:
    """The phone's INVITE (with an offer), ACK or BYE of call `n`."""
    cseq, body = {"INVITE": (1, SDP), "ACK": (1, ""), "BYE": (2, "")}[method]
    branch = f"z9hG4bK-stop-{n}-{method}"
    return (f"{method} sip:*99@127.0.0.1 SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch={branch}\r\n"
            f"Max-Forwards: 70\r\nFrom: <sip:1001@127.0.0.1>;tag=t{n}\r\n"
            f"To: {to}\r\nCall-ID: stop-{n}@test\r\nCSeq: {cseq} {method}\r\n"
            f"Contact: <sip:1001@127.0.0.1:{port}>\r\n"
            + ("Content-Type: application/sdp\r\n" if body else "")
            + f"Content-Length: {len(body)}\r\n\r\n{body}").encode()


def test_sigterm_writes_every_buffered_call_record(tmp_path: Path) -> None:
    sip, admin = free_port(), free_port(socket.SOCK_STREAM)
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    config = tmp_path / "pbx.toml"
    config.write_text(CONFIG.format(sip=sip, admin=admin, logs=tmp_path / "logs", run=run))
    env = {**os.environ, "PBX_CONFIG": str(config), "PYTHONPATH": str(ROOT)}
    front = subprocess.Popen([sys.executable, "-m", "pbx.app"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    calls = 5
    records = tmp_path / "logs" / "calls.jsonl"
    ctx = zmq.Context()
    worker = ctx.socket(zmq.DEALER)
    worker.setsockopt(zmq.IDENTITY, b"w")
    worker.setsockopt(zmq.LINGER, 0)
    worker.connect(f"ipc://{run}/media")
    # A media worker (as workers.media answers it); no IVR executor is needed: the phone
    # hangs up each call once answered, its leg is released and its record written.
    media = FakeMediaWorker(lambda identity, msg: worker.send(encode(msg)))
    try:
        media.join()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
            phone.bind(("127.0.0.1", 0))
            poller = zmq.Poller()
            poller.register(worker, zmq.POLLIN)
            poller.register(phone, zmq.POLLIN)
            port = phone.getsockname()[1]
            front_addr = ("127.0.0.1", sip)
            released: set[str] = set()
            answered: set[int] = set()
            end = time.monotonic() + BOUND_S
            sent_at = 0.0
            while len(released) < calls and time.monotonic() < end:
                if time.monotonic() - sent_at > 1.0:  # again until each one is answered
                    for n in set(range(calls)) - answered:
                        phone.sendto(request("INVITE", port, n), front_addr)
                    sent_at = time.monotonic()
                for sock, _ in poller.poll(100):
                    if sock is worker:
                        msg = decode(worker.recv())
                        for answer in media.answer(msg):
                            worker.send(encode(answer))
                        if isinstance(msg, m.MediaRelease):
                            released.add(msg.call_id)
                    else:  # answered: ACK, and hang up (the record is then written)
                        reply = parse_message(phone.recv(65535))
                        n = int((reply.headers.get("Call-ID") or "")[5:].split("@")[0])
                        to = reply.headers.get("To") or ""
                        if isinstance(reply, SipResponse) and reply.status == 200 \
                                and "INVITE" in (reply.headers.get("CSeq") or "") \
                                and n not in answered:
                            answered.add(n)
                            phone.sendto(request("ACK", port, n, to), front_addr)
                            phone.sendto(request("BYE", port, n, to), front_addr)
            assert len(released) == calls, released
        time.sleep(0.3)  # the MediaReleased read, the records written (to the buffer)
        assert not records.exists() or records.read_bytes() == b""  # still buffered
        front.send_signal(signal.SIGTERM)
        front.wait(BOUND_S)
    finally:
        if front.poll() is None:
            front.kill()
            front.wait()
        worker.close(0)
        ctx.term()
    assert front.returncode == 0
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert sorted(r["sip_call_id"] for r in lines) == [f"stop-{n}@test" for n in range(calls)]
    assert all(r["rtp_complete"] for r in lines)

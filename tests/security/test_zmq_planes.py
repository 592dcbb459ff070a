"""Issue 8, "the ZeroMQ planes trust anyone who connects": regression tests against the
real system (supervisord, real front, workers and executors) through real sockets.

(a) another local user (`nobody`) cannot reach the planes: the IPC sockets sit in a
    directory only the PBX's user can open, while everything above it is open;
(b) a same-user rogue DEALER answering the event in flight of a live session (read from
    /api/calls) with a transfer is ignored: the call is not transferred;
(c) a media worker whose MediaAllocated names another RTP address than it declared does
    not get that address into an SDP answer (since issue 9 the answer, sent from the
    worker's announced pool before its reply, carries the declared address, and the
    contradicting reply ends the call);
(d) with CURVE on tcp, clients without an accepted key get no event and cannot join,
    while the real workers with their keys carry a call end to end;
(e) the multi-host case: a media worker in another network namespace joins over
    tcp+CURVE and its declared address (allowed by `worker_rtp_ips`) is the SDP's.

At commit 2554a5d the planes were plain TCP on loopback: (a) and (d) show `nobody` and
key-less clients joining as executors and reading the provider's bearer token, (b) the
call transferred, (c) the rogue address in the SDP answer; (d) and (e) need settings
that did not exist (the config refuses them).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from pbx import messages as m
from tests.e2e.harness import (
    PbxSystem,
    Reply,
    RtpEndpoint,
    ScriptedProvider,
    free_port,
    start_system,
    wait_until,
)
from tests.e2e.uac import Uac

ROOT = Path(__file__).resolve().parents[2]
# `nobody` cannot read the venv's interpreter (it lives under /root): Debian's python3
# with Debian's pyzmq (make tools installs python3-zmq) speaks ZeroMQ for it.
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534
ROGUE_IP = "198.51.100.7"  # TEST-NET-2: only ever written into SDP, never contacted
OK: Reply = (200, b'{"status":"ok"}', 0.0)

# A stranger on the planes: connects a DEALER to the media and IVR planes (saying
# IvrReady and heartbeating on the IVR one, like an executor) and a SUB to the events
# socket, for `seconds`; reports what it could open and every frame it got, as JSON.
STRANGER = r"""
import json, os, socket, sys, time
import zmq

endpoints, version, seconds = json.loads(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
keys = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
out = {"uid": os.getuid(), "unix_connect": {}, "frames": {}, "bearer_seen": False}
for plane, endpoint in endpoints.items():
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):]
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            out["unix_connect"][plane] = "connected"
        except OSError as exc:
            out["unix_connect"][plane] = exc.strerror
        s.close()
        try:
            os.listdir(os.path.dirname(path))
            out["list_dir"] = "listed"
        except OSError as exc:
            out["list_dir"] = exc.strerror
        out["parent_open"] = os.access(os.path.dirname(os.path.dirname(path)), os.X_OK)
ctx = zmq.Context()
def sock(kind, endpoint):
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, b"stranger-%d" % os.getpid()) if kind == zmq.DEALER else None
    if keys is not None:
        s.curve_serverkey, s.curve_publickey, s.curve_secretkey = (
            k.encode() for k in keys)
    if kind == zmq.SUB:
        s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(endpoint)
    return s
socks = {"media": sock(zmq.DEALER, endpoints["media"]),
         "ivr": sock(zmq.DEALER, endpoints["ivr"]),
         "events": sock(zmq.SUB, endpoints["events"])}
ready = {"v": version, "kind": "ivr_ready", "executor_id": "stranger", "capacity": 1000}
beat = {"v": version, "kind": "ivr_heartbeat", "executor_id": "stranger", "busy": 0,
        "capacity": 1000, "working": {}}
poller = zmq.Poller()
for s in socks.values():
    poller.register(s, zmq.POLLIN)
deadline, next_beat = time.monotonic() + seconds, 0.0
socks["ivr"].send(json.dumps(ready).encode(), zmq.NOBLOCK)
while time.monotonic() < deadline:
    if time.monotonic() >= next_beat:
        try:
            socks["ivr"].send(json.dumps(beat).encode(), zmq.NOBLOCK)
        except zmq.Again:
            pass
        next_beat = time.monotonic() + 0.3
    for s, _ in poller.poll(100):
        frames = s.recv_multipart()
        plane = next(p for p, x in socks.items() if x is s)
        out["frames"][plane] = out["frames"].get(plane, 0) + 1
        out["bearer_seen"] = out["bearer_seen"] or any(b"Bearer e2e" in f for f in frames)
print(json.dumps(out))
"""


def as_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def endpoints(system: PbxSystem) -> dict[str, str]:
    zmq_section = system.zmq
    return {plane: zmq_section[f"{plane}_endpoint"] for plane in ("media", "ivr", "events")}


def start_stranger(system: PbxSystem, seconds: float, user: int | None,
                   keys: list[str] | None = None) -> subprocess.Popen[str]:
    args = [SYSTEM_PYTHON, "-c", STRANGER, json.dumps(endpoints(system)),
            str(m.PROTOCOL_VERSION), str(seconds)]
    if keys is not None:
        args.append(json.dumps(keys))
    return subprocess.Popen(args, cwd="/", env={"PATH": "/usr/bin:/bin"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=as_nobody if user == NOBODY else None)


def stranger_report(proc: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    report: dict[str, Any] = json.loads(out)
    return report


def prompt_then_hangup(path: str, body: Any) -> Reply:
    if path.endswith(("/start", "/end", "/dtmf-match")):
        return OK
    if (body.get("event") or {}).get("type") == "session_start":
        node = {"type": "prompt", "file": "sounds/welcome.wav", "next": {"type": "hangup"}}
        return 200, json.dumps(node).encode(), 0.0
    return 200, b'{"type": "hangup"}', 0.0


def call_to_the_end(system: PbxSystem) -> tuple[int, int]:
    """A raw-socket call to *99 that the IVR plays to and hangs up: (final status, RTP
    packets the caller got)."""
    rtp = RtpEndpoint()
    uac = Uac(system.sip_port, rtp.port)
    try:
        status = uac.call(10)
        if status == 200:
            assert uac.wait_bye(20) is not None, "the IVR never hung up"
        return status, len(rtp.audio())
    finally:
        uac.close()
        rtp.close()


@pytest.fixture(scope="module")
def provider() -> Iterator[ScriptedProvider]:
    p = ScriptedProvider()
    yield p
    p.close()


@pytest.fixture(scope="module")
def system(provider: ScriptedProvider) -> Iterator[PbxSystem]:
    # Open to everybody down to the system's root (0755, like a checkout under /srv):
    # only the planes' own directory keeps other users out.
    root = Path(tempfile.mkdtemp(prefix="pbx-planes-", dir="/tmp"))
    root.chmod(0o755)
    try:
        s = start_system(root, provider, media_workers=1, executors=2)
        try:
            yield s
        finally:
            s.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_another_user_cannot_reach_the_planes(system: PbxSystem) -> None:
    system.provider.script = prompt_then_hangup
    stranger = start_stranger(system, seconds=10, user=NOBODY)
    executors_seen = set()
    try:
        time.sleep(1.5)  # its connections and IvrReady have had time to land
        for _ in range(3):
            status, audio = call_to_the_end(system)
            assert status == 200 and audio > 0, "the system itself must work"
            executors_seen.add(system.metrics()["pbx_executors"])
    finally:
        report = stranger_report(stranger)
    assert report["uid"] == NOBODY
    assert report["frames"] == {}, (
        f"user nobody received {report['frames']} frames from the planes"
        + (" including the provider's bearer token" if report["bearer_seen"] else ""))
    assert executors_seen == {2}, "nobody joined as an IVR executor"
    # The operating system refuses it: the directory above is open, the planes' is not.
    assert report["parent_open"] is True
    assert report["list_dir"] == "Permission denied"
    assert report["unix_connect"] == {plane: "Permission denied"
                                      for plane in ("media", "ivr", "events")}
    zmq_dir = Path(endpoints(system)["ivr"][len("ipc://"):]).parent
    assert zmq_dir.stat().st_mode & 0o777 == 0o700


def test_rogue_reply_for_a_live_session_is_ignored(system: PbxSystem) -> None:
    """The event in flight is at a real executor, busy with a slow `api` call; a rogue
    DEALER of the same user joins and answers it first with a transfer."""
    provider = system.provider

    def slow_api(path: str, body: Any) -> Reply:
        if path == "/slow":
            return 200, b'{"balance": 1}', 4.0
        if path.endswith(("/start", "/end", "/dtmf-match")):
            return OK
        if (body.get("event") or {}).get("type") == "session_start":
            node = {"type": "api", "url": provider.url("/slow"), "method": "POST"}
            return 200, json.dumps(node).encode(), 0.0
        return 200, b'{"type": "hangup"}', 0.0

    provider.script = slow_api
    target = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target.bind(("127.0.0.1", 0))
    target.settimeout(0.2)
    transfer_to = f"sip:900123@127.0.0.1:{target.getsockname()[1]}"
    rejected_before = system.metrics().get("pbx_ivr_replies_rejected_total", 0)
    rtp = RtpEndpoint()
    uac = Uac(system.sip_port, rtp.port)
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.setsockopt(zmq.IDENTITY, b"rogue-executor")
    try:
        assert uac.call(10) == 200
        live = wait_until(lambda: [c for c in system.admin("/api/calls")
                                   if c["ivr"] and c["session_id"]], 5, "the live session")
        session_id = live[0]["session_id"]
        # Joins only now, so the event in flight went to a real executor.
        rogue.connect(endpoints(system)["ivr"])
        rogue.send(m.encode(m.IvrReady(executor_id="rogue", capacity=1000)))
        time.sleep(0.3)
        for seq in (1, 2, 3):
            rogue.send(m.encode(m.IvrReply(
                session_id=session_id, seq=seq, state="{}", step_index=0,
                commands=[m.TransferCommand(target=transfer_to)], done=True)))
        rogue.close(0)  # gone: the front cannot give it the session's next event
        invites = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                invites.append(target.recvfrom(65535)[0])
            except TimeoutError:
                pass
        assert not invites, f"the call was transferred to {transfer_to}: {invites[0][:80]!r}"
        assert uac.wait_bye(20) is not None, "the real executor's flow did not end the call"
    finally:
        uac.close()
        rtp.close()
        target.close()
        rogue.close(0)
        ctx.term()
        provider.script = provider.default_script
    assert system.metrics()["pbx_ivr_replies_rejected_total"] >= rejected_before + 1
    assert "reply seq 1 from b'rogue-executor', but the event went to" in system.log("front")


class RogueMediaWorker:
    """A media worker of the same user: declares `declared` (and a pool of ports),
    allocates at `allocate_ip`."""

    ports = [40000, 40002]

    def __init__(self, endpoint: str, declared: str, allocate_ip: str) -> None:
        self.declared, self.allocate_ip = declared, allocate_ip
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, b"rogue-media")
        self.sock.connect(endpoint)
        self.allocations = 0
        self.seq = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _declared(self, cls: type) -> dict[str, Any]:
        # The protocol of the code under test (2554a5d had no rtp_ip to declare, and
        # before issue 9 there were no port pools).
        fields: dict[str, Any] = {"rtp_ip": self.declared, "ports": self.ports,
                                  "allocate_seq": self.seq}
        return {k: v for k, v in fields.items() if k in cls.model_fields}

    def _run(self) -> None:
        self.sock.send(m.encode(m.MediaReady(worker_id="rogue", capacity=100,
                                             **self._declared(m.MediaReady))))
        if hasattr(m, "MediaPorts"):
            self.sock.send(m.encode(m.MediaPorts(**self._declared(m.MediaPorts))))
        next_beat = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_beat:
                self.sock.send(m.encode(m.MediaHeartbeat(
                    worker_id="rogue", calls=0, capacity=100,
                    **self._declared(m.MediaHeartbeat))))
                next_beat = time.monotonic() + 0.2
            if not self.sock.poll(50):
                continue
            msg = m.decode(self.sock.recv())
            if isinstance(msg, m.MediaAllocate):
                self.allocations += 1
                self.seq = getattr(msg, "seq", 0)
                self.sock.send(m.encode(m.MediaAllocated(
                    call_id=msg.call_id, rtp_ip=self.allocate_ip, rtp_port=40000)))

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close(0)
        self.ctx.term()


def test_worker_address_other_than_declared_never_reaches_sdp(system: PbxSystem) -> None:
    system.provider.script = prompt_then_hangup
    system.supervisorctl("stop", "media")
    try:
        wait_until(lambda: system.metrics()["pbx_media_workers"] == 0, 10,
                   "the real media worker to be gone")
        answers: list[tuple[int, bytes]] = []
        # 1. declares our address, then allocates elsewhere: the answer (sent before the
        # worker replies) carries the declared address, and the reply ends the call;
        # 2. declares elsewhere: never used.
        for declared in ("127.0.0.1", ROGUE_IP):
            before = system.metrics()
            rogue = RogueMediaWorker(endpoints(system)["media"], declared, ROGUE_IP)
            uac = Uac(system.sip_port, free_port(even=True))
            ended = None
            try:
                time.sleep(0.5)  # it said ready
                status = uac.call(10)
                answers.append((status, uac.final.body if uac.final else b""))
                if status == 200:
                    ended = uac.wait_bye(10)
            finally:
                uac.close()
                rogue.close()
            after = system.metrics()
            assert all(ROGUE_IP.encode() not in body for _, body in answers), (
                f"an SDP answer points at the rogue's {ROGUE_IP}: {answers}")
            if declared == "127.0.0.1":
                assert status == 200 and ended is not None
                assert b"c=IN IP4 127.0.0.1" in answers[-1][1]
                assert rogue.allocations == 1
                assert (after["pbx_media_allocations_rejected_total"]
                        == before["pbx_media_allocations_rejected_total"] + 1)
            else:
                assert status == 503
                assert rogue.allocations == 0  # never registered
                assert after["pbx_media_workers_rejected_total"] > before["pbx_media_workers_rejected_total"]
            wait_until(lambda: system.metrics()["pbx_media_workers"] == 0, 10,
                       "the rogue to expire")
    finally:
        system.supervisorctl("start", "media")
        wait_until(lambda: system.metrics()["pbx_media_workers"] == 1, 30,
                   "the real media worker back")
        system.provider.script = system.provider.default_script


def test_curve_planes_refuse_unknown_keys_and_carry_a_call(tmp_path: Path,
                                                          provider: ScriptedProvider) -> None:
    keys = subprocess.run([sys.executable, "-m", "pbx.keys", "--one-file"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    provider.script = prompt_then_hangup
    system = start_system(tmp_path / "pbx", provider, media_workers=1, executors=1,
                          zmq_keys=keys.stdout)
    stranger_keys = [k.decode() for k in zmq.curve_keypair()]
    strangers: list[subprocess.Popen[str]] = []
    try:
        server_public = system.zmq["server_public_key"]
        strangers = [
            # A key pair of its own, not on the lists; and no CURVE at all.
            start_stranger(system, 8, None, [server_public, *stranger_keys]),
            start_stranger(system, 8, None),
        ]
        time.sleep(1.5)
        executors = []
        for _ in range(2):
            status, audio = call_to_the_end(system)
            assert status == 200 and audio > 0, "the real workers (with keys) carry calls"
            executors.append(system.metrics()["pbx_executors"])
        reports = [stranger_report(p) for p in strangers]
        metrics = system.metrics()
    finally:
        for p in strangers:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        system.stop()
        provider.script = provider.default_script
    for report in reports:
        assert report["frames"] == {}, (
            f"a client without an accepted key received {report['frames']} frames"
            + (" including the provider's bearer token" if report["bearer_seen"] else ""))
    assert executors == [1, 1], "a client without an accepted key joined as an executor"
    # The stranger's key was refused on each of the three sockets (the key-less client
    # fails the CURVE handshake before any ZAP request).
    assert metrics["pbx_zmq_auth_rejected_total"] >= 3
    assert f"client key {stranger_keys[0]} is not accepted on the 'ivr' plane" \
        in system.log("front")
    assert all(ep.startswith("tcp://127.0.0.1:") for ep in endpoints(system).values())
    assert "(CURVE)" in system.log("media") and "(CURVE)" in system.log("ivr")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def other_host() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to ours by a veth pair: (namespace, our address on the
    link, its address) — a second host for a media worker."""
    pid = os.getpid()
    ns, ours, theirs = f"pbxz{pid}", f"pz{pid}a", f"pz{pid}b"
    net = f"10.{200 + pid % 50}.{pid // 50 % 256}"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", ours, "type", "veth", "peer", "name", theirs)
        _ip("link", "set", theirs, "netns", ns)
        _ip("addr", "add", f"{net}.1/30", "dev", ours)
        _ip("link", "set", ours, "up")
        _ip("-n", ns, "addr", "add", f"{net}.2/30", "dev", theirs)
        _ip("-n", ns, "link", "set", theirs, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns, f"{net}.1", f"{net}.2"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)  # and veth


def test_media_worker_on_another_host_over_tcp_curve(tmp_path: Path,
                                                     other_host: tuple[str, str, str],
                                                     provider: ScriptedProvider) -> None:
    """The multi-host case: the front binds tcp beyond loopback (so CURVE is required),
    a media worker in another network namespace joins with its own key and declares its
    own RTP address, which the front accepts from `worker_rtp_ips` and puts in the SDP."""
    ns, front_ip, worker_ip = other_host
    keys = subprocess.run([sys.executable, "-m", "pbx.keys", "--one-file", "media-host"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    front_part, worker_part = keys.stdout.split("# ---- ")[1:]
    provider.script = prompt_then_hangup
    system = start_system(tmp_path / "pbx", provider, media_workers=0, executors=1,
                          zmq_keys=front_part.split("\n", 1)[1], zmq_host=front_ip,
                          media_extra=f'worker_rtp_ips = ["{worker_ip}"]')
    low, rtcp_high = system.rtp_ports
    # The other host's config: its own RTP address, the front's endpoints, its key pair.
    worker_keys = worker_part.split("[zmq]\n", 1)[1]
    planes_toml = "".join(f'{plane}_endpoint = "{endpoint}"\n'
                          for plane, endpoint in endpoints(system).items())
    worker_conf = tmp_path / "media-host.toml"
    worker_conf.write_text(
        f'[media]\nrtp_ip = "{worker_ip}"\nrtp_ports = "{low}-{rtcp_high - 1}"\n'
        f'sounds_dir = "{ROOT / "sounds"}"\nheartbeat_ms = 200\n\n'
        f'[zmq]\n{planes_toml}{worker_keys}\n[logging]\ndir = "{tmp_path}"\n')
    worker_log = (tmp_path / "media-host.log").open("wb")
    worker = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "workers.media"], cwd=ROOT,
        env={**os.environ, "PBX_CONFIG": str(worker_conf), "PYTHONPATH": str(ROOT)},
        stdout=worker_log, stderr=subprocess.STDOUT)
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind((front_ip, 0))
    rtp.settimeout(0.2)
    uac = Uac(system.sip_port, rtp.getsockname()[1], rtp_ip=front_ip)
    try:
        wait_until(lambda: system.metrics()["pbx_media_workers"] == 1, 60,
                   "the other host's media worker to join: "
                   + (tmp_path / "media-host.log").read_text(errors="replace")[-1500:])
        assert uac.call(10) == 200
        assert uac.final is not None
        assert f"c=IN IP4 {worker_ip}".encode() in uac.final.body
        sources = set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not sources:
            try:
                sources.add(rtp.recvfrom(2048)[1][0])
            except TimeoutError:
                pass
        assert sources == {worker_ip}, "the prompt's RTP comes from the other host"
        assert uac.wait_bye(20) is not None
    finally:
        uac.close()
        rtp.close()
        worker.terminate()
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(5)
        worker_log.close()
        system.stop()
        provider.script = provider.default_script
    assert f"RTP address {worker_ip}" in system.log("front")
    assert all(ep.startswith(f"tcp://{front_ip}:") for ep in endpoints(system).values())
    assert "(CURVE)" in (tmp_path / "media-host.log").read_text()

"""End-to-end harness: the real system under a real supervisord, a scripted provider,
sipp as the third-party UA, and plain sockets standing in for phones' RTP ports.

Everything listens on 127.0.0.1 (SIP and RTP on another address when a test asks:
`start_system(listen_ip=...)`, tests/e2e/netns.py) on ports picked free at start;
every wait is bounded.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SCENARIOS = Path(__file__).resolve().parent / "scenarios"
SIPP_PCAPS = Path("/usr/share/sip-tester")


# Media ports (`even=True`) come from here: below the e2e systems' RTP ranges
# (start_system) and the kernel's ephemeral range, so no socket bound to port 0 and no
# worker can take one between the pick and its use.
MEDIA_PORTS = range(10000, 19996, 2)
# SIP ports of user agents that listen on the next port too (baresip: TLS on port + 1),
# below MEDIA_PORTS and out of the ephemeral range for the same reason.
UA_PORTS = range(7000, 7998, 2)


def ports_free(ports: range, kinds: tuple[int, ...] = (socket.SOCK_DGRAM,)) -> bool:
    """Whether every port can be bound on 127.0.0.1 for each socket type in `kinds`."""
    socks = []
    try:
        for port in ports:
            for kind in kinds:
                s = socket.socket(socket.AF_INET, kind)
                socks.append(s)
                s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def free_port(kind: int = socket.SOCK_DGRAM, even: bool = False) -> int:
    """A port free for both UDP and TCP on 127.0.0.1.

    `even=True`: an even UDP port for media whose next three ports are free too: sipp's
    `-mp port` binds port (audio RTP), +1 (RTCP) and +2, +3 (video RTP and RTCP), and
    fails the whole run if one of them is taken."""
    if even:
        for _ in range(200):
            port = random.choice(MEDIA_PORTS)
            if ports_free(range(port, port + 4)):
                return port
        raise RuntimeError("no free media port")
    for _ in range(200):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                t.bind(("127.0.0.1", port))
                u.bind(("127.0.0.1", port))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")


def wait_idle(system: PbxSystem, media_legs: bool = True, timeout_s: float = 10.0) -> None:
    """No call (and, unless told otherwise, no media leg) left behind."""
    wait_until(lambda: system.metrics()["pbx_calls"] == 0, timeout_s, "pbx_calls back to 0")
    if media_legs:
        wait_until(lambda: system.metrics()["pbx_media_legs"] == 0, timeout_s,
                   "pbx_media_legs back to 0")


# ---------------------------------------------------------------- provider


@dataclass
class ProviderRequest:
    path: str
    body: Any
    headers: dict[str, str]
    at: float


Reply = tuple[int, bytes, float]  # status, body, delay before answering (s)


class ScriptedProvider:
    """An HTTP provider in the test process that records every request.

    `script(path, body)` returns (status, body bytes, delay seconds); the default
    answers /start, /end and /dtmf-match with 200 and step requests with hang-up.
    """

    def __init__(self) -> None:
        self.requests: list[ProviderRequest] = []
        self.lock = threading.Lock()
        self.script: Callable[[str, Any], Reply] = self.default_script
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                with provider.lock:
                    provider.requests.append(ProviderRequest(
                        self.path, body, dict(self.headers.items()), time.monotonic()))
                status, data, delay = provider.script(self.path, body)
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout): that is the point of some tests

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def default_script(path: str, body: Any) -> Reply:
        if path.endswith(("/start", "/end", "/dtmf-match")):
            return 200, b'{"status":"ok"}', 0.0
        return 200, json.dumps({"type": "hangup"}).encode(), 0.0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def seen(self, path_prefix: str = "") -> list[ProviderRequest]:
        with self.lock:
            return [r for r in self.requests if r.path.startswith(path_prefix)]

    def for_session(self, session_id: str) -> list[ProviderRequest]:
        with self.lock:
            return [r for r in self.requests
                    if isinstance(r.body, dict) and r.body.get("session_id") == session_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- RTP


@dataclass
class RtpPacket:
    at: float
    src: tuple[str, int]
    payload_type: int
    marker: bool
    seq: int
    timestamp: int
    ssrc: int
    payload: bytes


class RtpEndpoint:
    """A phone's RTP port: records what arrives, sends what the test asks.

    `sock`: a bound UDP socket to use (one made in another network namespace), instead
    of a free even port on 127.0.0.1."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", free_port(even=True)))
        self.sock = sock
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.packets: list[RtpPacket] = []
        self._stop = threading.Event()
        self._seq = 1000
        self._ts = 160000
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, src = self.sock.recvfrom(2048)
            except (TimeoutError, OSError):
                continue
            if len(data) < 12 or data[0] >> 6 != 2:
                continue
            b1 = data[1]
            seq, ts, ssrc = struct.unpack("!HII", data[2:12])
            cc = data[0] & 0x0F
            self.packets.append(RtpPacket(time.monotonic(), src, b1 & 0x7F, bool(b1 & 0x80),
                                          seq, ts, ssrc, data[12 + 4 * cc:]))

    def audio(self, payload_type: int = 0) -> list[RtpPacket]:
        return [p for p in list(self.packets) if p.payload_type == payload_type]

    def send(self, dest: tuple[str, int], payload: bytes, payload_type: int = 0,
             marker: bool = False) -> None:
        self._seq = (self._seq + 1) & 0xFFFF
        self._ts = (self._ts + 160) & 0xFFFFFFFF
        header = struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | payload_type,
                             self._seq, self._ts, 0x1234ABCD)
        self.sock.sendto(header + payload, dest)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(1)
        self.sock.close()


# ---------------------------------------------------------------- sipp


@dataclass
class Sipp:
    """A sipp process; `wait()` returns its exit code (0: every call succeeded)."""

    proc: subprocess.Popen[bytes]
    workdir: Path
    name: str

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"sipp {self.name} still running after {timeout} s:\n"
                                 + self.logs()) from None

    def logs(self) -> str:
        out = []
        for f in sorted(self.workdir.glob("*")):
            if f.suffix in (".log", ".txt") or f.name.endswith("_errors.log"):
                text = f.read_text(errors="replace")
                out.append(f"--- {f.name}\n{text[-4000:]}")
        return "\n".join(out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_sipp(name: str, args: list[str], workdir: Path, netns: str | None = None) -> Sipp:
    """sipp with `args` in `workdir`; `netns`: in that network namespace (`ip netns exec`
    execs sipp, so the process is sipp itself)."""
    sipp = shutil.which("sipp")
    assert sipp, "sipp is not installed (make test installs Debian's sip-tester)"
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = ["ip", "netns", "exec", netns] if netns else []
    # sipp's screen goes to a file: a pipe nobody reads would block it.
    out = (workdir / "stdout.txt").open("wb")
    proc = subprocess.Popen(
        [*prefix, sipp, *args, "-nostdin", "-trace_err", "-trace_msg"],
        cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
    )
    out.close()
    return Sipp(proc, workdir, name)


def call_with_rtp(system: PbxSystem, name: str, scenario: str, target: str, workdir: Path,
                  extra: tuple[str, ...] = (), timeout_s: float = 20) -> RtpEndpoint:
    """One call of the sipp UAC `scenario` to `target`, its RTP at a test socket
    (`-key rtp_port`), run to its end (sipp must exit 0): the socket, closed, with what
    it received."""
    rtp = RtpEndpoint()
    caller = start_sipp(name, [
        "-sf", str(SCENARIOS / scenario), "-s", target, system.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-key", "rtp_port", str(rtp.port),
        *extra, "-m", "1", "-l", "1",
    ], workdir)
    try:
        assert caller.wait(timeout_s) == 0, caller.logs()
    finally:
        caller.stop()
        rtp.close()
    return rtp


# ---------------------------------------------------------------- the system


@dataclass
class PbxSystem:
    root: Path
    sip_port: int
    admin_port: int
    provider: ScriptedProvider
    extension_ports: dict[str, int]
    proc: subprocess.Popen[bytes] | None = None
    conf_path: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    # The address of `[sip] listen` and `[media] rtp_ip` (the admin and ZeroMQ planes
    # stay on loopback).
    sip_ip: str = "127.0.0.1"
    # `[admin] token` when the system has one: admin() and metrics() send it.
    admin_token: str | None = None
    # Its block of RTP ports (start_system), free again once it stops.
    rtp_block: int | None = None

    def admin_url(self, path: str) -> urllib.request.Request:
        headers = {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}
        return urllib.request.Request(f"http://127.0.0.1:{self.admin_port}{path}",
                                      headers=headers)

    @property
    def rtp_ports(self) -> tuple[int, int]:
        """The system's RTP port range, and the RTCP port above its last port."""
        low, _, high = tomllib.loads((self.root / "pbx.toml").read_text())["media"][
            "rtp_ports"].partition("-")
        return int(low), int(high) + 1

    @property
    def sip_addr(self) -> str:
        return f"{self.sip_ip}:{self.sip_port}"

    def admin(self, path: str) -> Any:
        with urllib.request.urlopen(self.admin_url(path), timeout=5) as r:
            return json.loads(r.read())

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.admin_url("/metrics"), timeout=5) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def supervisorctl(self, *args: str) -> str:
        assert self.conf_path is not None
        out = subprocess.run([str(VENV_BIN / "supervisorctl"), "-c", str(self.conf_path), *args],
                             capture_output=True, text=True, timeout=30)
        return out.stdout + out.stderr

    @property
    def zmq(self) -> dict[str, Any]:
        """The system's `[zmq]` section (endpoints, keys)."""
        return dict(tomllib.loads((self.root / "pbx.toml").read_text())["zmq"])

    def log(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.rtp_block is not None:
            _RTP_BLOCKS_IN_USE.discard(self.rtp_block)
            self.rtp_block = None


# A TCP port bound but never listening: connecting to it is refused (ECONNREFUSED), and
# holding the socket keeps anything else from taking the port while the tests run.
_REFUSING_SOCKET = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
_REFUSING_SOCKET.bind(("127.0.0.1", 0))
REFUSED_PORT: int = _REFUSING_SOCKET.getsockname()[1]
REFUSED_URL = f"http://127.0.0.1:{REFUSED_PORT}/x"

# Users without a static contact: they register (digest auth) to be reachable.
REGISTERING_USERS = {"3001": "pw-3001", "3002": "pw-3002", "3003": "pw-3003"}

ROUTES = """
[[routes]]
name = "main"
priority = 10
match = {{ "to.user" = '^\\*99$' }}
app = "ivr"
app_params = {{ mode = "step", url = "{url}/ivr/step", name = "test-ivr", ivr_id = "ivr-e2e", tenant_id = "tenant-e2e", headers = {{ Authorization = "Bearer e2e" }}, retry = {{ max_retries = 2, timeout_ms = 600 }} }}

[[routes]]
name = "short-form"
to_user = "*98"
app = "ivr"
app_params = {{ mode = "step", url = "{url}/short", retry = {{ max_retries = 2, timeout_ms = 600 }} }}

[[routes]]
name = "refused"
to_user = "*97"
app = "ivr"
app_params = {{ mode = "step", url = "REFUSED_URL", retry = {{ max_retries = 2, timeout_ms = 600 }} }}

[[routes]]
name = "internal"
to_user = "*95"
public = false
app = "ivr"
app_params = {{ mode = "step", url = "{url}/internal", retry = {{ max_retries = 2, timeout_ms = 600 }} }}

[[routes]]
name = "early"
to_user = "*96"
answer = "early_media"
app = "ivr"
app_params = {{ mode = "step", url = "{url}/early", retry = {{ max_retries = 2, timeout_ms = 600 }} }}
""".replace("REFUSED_URL", REFUSED_URL)


# A UDP port bound but never read: INVITEs sent there are never answered (a member
# who never picks up, without even a 100 Trying).
_SILENT_SOCKET = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
_SILENT_SOCKET.bind(("127.0.0.1", 0))
SILENT_URI = f"sip:nobody@127.0.0.1:{_SILENT_SOCKET.getsockname()[1]}"

# `[queues.*]` of the default system: one answered by extension 2001 (a sipp UAS the
# test starts), one whose only member never answers.
E2E_QUEUES: dict[str, dict[str, Any]] = {
    "e2e-one": {"members": ["2001"], "strategy": "ring_all",
                "hold_music": "sounds/hold.wav", "timeout_ms": 10_000},
    "e2e-nobody": {"members": [SILENT_URI], "strategy": "round_robin",
                   "hold_music": "sounds/hold.wav", "timeout_ms": 2_500,
                   "member_ring_ms": 1_000},
}


def toml_tables(prefix: str, tables: dict[str, dict[str, Any]]) -> str:
    """`{"q": {"members": [...], ...}}` -> `[prefix."q"]` sections (JSON scalars and
    lists of strings are valid TOML values)."""
    out = []
    for name, values in tables.items():
        out.append(f'\n[{prefix}."{name}"]')
        for key, value in values.items():
            out.append(f"{key} = {json.dumps(value)}")
    return "\n".join(out) + "\n"


_SYSTEMS_STARTED = 0
# Blocks of 100 RTP ports from 20000, all below the kernel's ephemeral range (32768).
RTP_BLOCKS = 124
_RTP_BLOCKS_IN_USE: set[int] = set()


def start_system(root: Path, provider: ScriptedProvider, *, media_workers: int = 2,
                 executors: int = 2, extensions: tuple[str, ...] = ("2001",),
                 media_capacity: int = 2000, sip_extra: str = "",
                 queues: dict[str, dict[str, Any]] | None = None,
                 digest_algorithms: tuple[str, ...] | None = ("MD5", "SHA-256"),
                 auth_extra: str = "", extra_config: str = "",
                 zmq_keys: str | None = None, zmq_host: str = "127.0.0.1",
                 media_extra: str = "", listen_ip: str = "127.0.0.1",
                 sounds_dir: Path = ROOT / "sounds",
                 admin_token: str | None = None) -> PbxSystem:
    """Write a config and a supervisord.conf under `root` and start supervisord.

    `media_capacity` is `[media] capacity` (legs per worker); `sip_extra` adds lines
    to the `[sip]` section; `queues` are the `[queues.*]` sections (default
    `E2E_QUEUES`). `digest_algorithms` is `[sip] digest_algorithms`: MD5 first by
    default because sipp 3.6 only does MD5 and answers only the first challenge
    (None: the config's default, SHA-256 first); `auth_extra` is the `[auth]` section;
    `extra_config` is appended (more sections). The planes are IPC sockets in
    `root/zmq` (private to the system, created by the front), unless `zmq_keys` (CURVE
    keys: `[zmq]` lines as `python -m pbx.keys --one-file` prints them) puts them on tcp
    at `zmq_host`. `media_extra` adds lines to the `[media]` section. `listen_ip` is
    where SIP and RTP listen (an address of the host other network namespaces reach,
    for multi-host tests; tests/e2e/netns.py). `sounds_dir` is `[media] sounds_dir`.
    `admin_token` is `[admin] token`."""
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "recordings").mkdir(exist_ok=True)
    sip_port, admin_port = free_port(), free_port(socket.SOCK_STREAM)
    if zmq_keys is None:
        zmq_section = "\n".join(f'{plane}_endpoint = "ipc://{root / "zmq" / plane}"'
                                 for plane in ("media", "ivr", "events"))
    else:
        zmq_section = "\n".join(
            f'{plane}_endpoint = "tcp://{zmq_host}:{free_port(socket.SOCK_STREAM)}"'
            for plane in ("media", "ivr", "events")) + "\n" + zmq_keys.replace("[zmq]\n", "")
    # Below the kernel's ephemeral range (32768-60999 by default), so no port that
    # free_port(), sipp or a client socket picks can be one of the workers' RTP ports;
    # a second system in the same run (test_overload_failover) gets its own range.
    # Each live system has a block of its own: a range shared with a system still running
    # (the session's, a module's) leaves a worker few ports ("only N of 16 RTP port pairs
    # free"), and a call that needs three on one worker fails.
    global _SYSTEMS_STARTED
    first = (os.getpid() % 4) * 31 + _SYSTEMS_STARTED
    _SYSTEMS_STARTED += 1
    rtp_block = next(b % RTP_BLOCKS for b in range(first, first + RTP_BLOCKS)
                     if b % RTP_BLOCKS not in _RTP_BLOCKS_IN_USE)
    _RTP_BLOCKS_IN_USE.add(rtp_block)
    rtp_low = 20000 + rtp_block * 100
    ext_ports = {ext: free_port() for ext in extensions}
    users = "".join(
        f'\n[users."{ext}"]\ncontact = "sip:{ext}@127.0.0.1:{port}"\n'
        for ext, port in ext_ports.items()
    ) + "".join(
        f'\n[users."{user}"]\npassword = "{password}"\n'
        for user, password in REGISTERING_USERS.items()
    )
    algorithms = ("" if digest_algorithms is None
                  else f"digest_algorithms = {json.dumps(list(digest_algorithms))}")
    auth_section = f"\n[auth]\n{auth_extra}\n" if auth_extra else ""
    config = f"""
[sip]
listen = "{listen_ip}:{sip_port}"
ring_timeout_ms = 8000
{algorithms}
{sip_extra}
{auth_section}

[media]
rtp_ip = "{listen_ip}"
rtp_ports = "{rtp_low}-{rtp_low + 99}"
port_pool = 16  # 50 pairs in this range: room for both workers' pools and calls
sounds_dir = "{sounds_dir}"
recordings_dir = "{root / 'recordings'}"
voicemail_dir = "{root / 'voicemail'}"
heartbeat_ms = 200
expiry_ms = 1500
capacity = {media_capacity}
{media_extra}

[ivr]
heartbeat_ms = 200
expiry_ms = 1500

[zmq]
{zmq_section}

[admin]
listen = "127.0.0.1:{admin_port}"
{f'token = "{admin_token}"' if admin_token else ""}

[logging]
dir = "{root / 'logs'}"
level = "DEBUG"
{users}
{ROUTES.format(url=provider.url(''))}

[ivrs.second]
url = "{provider.url('/second')}"
ivr_id = "ivr-second"
retry = {{ max_retries = 2, timeout_ms = 600 }}
{toml_tables("queues", E2E_QUEUES if queues is None else queues)}
{extra_config}
"""
    config_path = root / "pbx.toml"
    config_path.write_text(config)

    def program(name: str, command: str, numprocs: int = 1) -> str:
        if numprocs == 0:  # e.g. the test runs the only media worker itself
            return ""
        procname = f"{name}-%(process_num)02d" if numprocs > 1 else name
        return f"""
[program:{name}]
command={command}
process_name={procname}
numprocs={numprocs}
directory={ROOT}
autorestart=true
startsecs=1
startretries=20
stopwaitsecs=5
stopasgroup=true
killasgroup=true
redirect_stderr=true
stdout_logfile={root}/logs/{procname}.log
environment=PBX_CONFIG="{config_path}",PYTHONPATH="{ROOT}"
"""

    conf = f"""
[supervisord]
logfile={root}/logs/supervisord.log
pidfile={root}/supervisord.pid
childlogdir={root}/logs
directory={ROOT}

[unix_http_server]
file={root}/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{root}/supervisor.sock
""" + program("front", f"{VENV_BIN}/pbx-front") + program(
        "media", f"{VENV_BIN}/pbx-media", media_workers) + program(
        "ivr", f"{VENV_BIN}/pbx-ivr", executors)
    conf_path = root / "supervisord.conf"
    conf_path.write_text(conf)
    system = PbxSystem(root, sip_port, admin_port, provider, ext_ports, conf_path=conf_path,
                       sip_ip=listen_ip, admin_token=admin_token, rtp_block=rtp_block)
    system.proc = subprocess.Popen(
        [str(VENV_BIN / "supervisord"), "-n", "-c", str(conf_path)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def ready() -> bool:
        try:
            m = system.metrics()
        except OSError:
            return False
        # A worker takes calls once its port pool is announced too (MediaPorts follows
        # MediaReady), so a test's first call never races it.
        return (m.get("pbx_media_workers", 0) >= media_workers
                and m.get("pbx_media_ports_free", 0) >= media_workers
                and m.get("pbx_executors", 0) >= executors)

    try:
        wait_until(ready, 60, "the system to come up")
    except AssertionError:
        logs = "\n".join(f"{p.name}:\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted((root / "logs").glob("*.log")))
        system.stop()
        raise AssertionError(f"system did not come up:\n{logs}") from None
    return system


# ---------------------------------------------------------------- wire observation


class LoopbackSniffer:
    """Every RTP-looking UDP datagram on the loopback interface, as the wire carries it.

    The media worker latches onto where a caller's RTP comes from (symmetric RTP), which
    with sipp is its own media port, not the test's socket; watching the interface sees
    what the PBX sends wherever it goes. AF_PACKET needs root (tests and CI run as root).
    """

    PACKET_HOST = 0  # the receiving copy (loopback shows each packet going out and in)
    SO_RCVBUFFORCE = 33  # Linux; root may exceed rmem_max (tests run as root)

    def __init__(self, ports: tuple[int, int] | None = None, limit: int = 200_000) -> None:
        """`ports`: keep only datagrams from or to this range (a system's RTP ports), so
        other suites' and benchmarks' RTP on the loopback neither fills the packet limit
        nor overflows the buffer."""
        self.ports = ports
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
        self.sock.setsockopt(socket.SOL_SOCKET, self.SO_RCVBUFFORCE, 16 << 20)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.1)
        self.packets: list[tuple[tuple[str, int], RtpPacket]] = []  # (destination, packet)
        self.limit = limit
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, meta = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            if meta[2] != self.PACKET_HOST or len(data) < 40 or data[9] != 17:
                continue
            ihl = (data[0] & 0x0F) * 4
            src_ip = socket.inet_ntoa(data[12:16])
            dst_ip = socket.inet_ntoa(data[16:20])
            sport, dport = struct.unpack("!HH", data[ihl:ihl + 4])
            if self.ports is not None:
                low, high = self.ports
                if not (low <= sport <= high or low <= dport <= high):
                    continue
            rtp = data[ihl + 8:]
            if len(rtp) < 12 or rtp[0] >> 6 != 2 or len(self.packets) >= self.limit:
                continue
            b1 = rtp[1]
            seq, ts, ssrc = struct.unpack("!HII", rtp[2:12])
            cc = rtp[0] & 0x0F
            self.packets.append(((dst_ip, dport), RtpPacket(
                time.monotonic(), (src_ip, sport), b1 & 0x7F, bool(b1 & 0x80), seq, ts,
                ssrc, rtp[12 + 4 * cc:])))

    def sent_by(self, src: tuple[str, int], payload_type: int | None = None
                ) -> list[RtpPacket]:
        return [p for _, p in list(self.packets)
                if p.src == src and (payload_type is None or p.payload_type == payload_type)]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(1)
        self.sock.close()


def sipp_messages(workdir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in workdir.glob("*_messages.log"))


def media_address_from_sipp(workdir: Path, status: str = "SIP/2.0 200 OK"
                            ) -> tuple[str, int] | None:
    """The PBX's RTP address from the SDP of the response sipp logged (default 200 OK)."""
    _, sep, rest = sipp_messages(workdir).partition(status)
    if not sep:
        return None
    ip: str | None = None
    port: int | None = None
    for line in rest.splitlines():
        if line.startswith("c=IN IP4 ") and ip is None:
            ip = line.split()[-1]
        elif line.startswith("m=audio ") and port is None:
            port = int(line.split()[1])
        if ip and port:
            return ip, port
    return None

"""pbx.planes and the `[zmq]` config: which endpoints need CURVE, the private IPC
directory, the keys each program needs, the ZAP decisions, the key command."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import zmq
from zmq.utils import z85

from pbx import keys, planes
from pbx.config import ConfigError, endpoint_scope, load_config, parse_config
from pbx.planes import ZapPolicy, ensure_private_dir

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("endpoint,scope", [
    ("ipc://run/zmq/media", "ipc"),
    ("ipc:///var/run/pbx/ivr", "ipc"),
    ("tcp://127.0.0.1:5570", "loopback"),
    ("tcp://127.8.9.10:5570", "loopback"),
    ("tcp://[::1]:5570", "loopback"),
    ("tcp://0.0.0.0:5570", "network"),
    ("tcp://*:5570", "network"),
    ("tcp://10.0.0.1:5570", "network"),
    ("tcp://eth0:5570", "network"),
    ("tcp://localhost:5570", "network"),  # a name: not provably loopback
    ("tcp://[2001:db8::1]:5570", "network"),
])
def test_endpoint_scope(endpoint: str, scope: str) -> None:
    assert endpoint_scope(endpoint) == scope


@pytest.mark.parametrize("endpoint,reason", [
    ("ipc://@pbx-media", "abstract IPC sockets cannot be protected"),
    ("ipc://media", "in its own directory"),
    ("ipc://*", "in its own directory"),
    ("ipc:///" + "d" * 120 + "/m", "longer than a Unix socket allows"),
    ("inproc://media", "ipc:// or tcp:// only"),
    ("udp://127.0.0.1:5570", "ipc:// or tcp:// only"),
    ("tcp://127.0.0.1:*", "host:port"),
    ("tcp://127.0.0.1:0;10.0.0.1:5570", "source-address"),
    ("127.0.0.1:5570", "not 'ipc://path'"),
])
def test_bad_endpoint_names_key_and_reason(endpoint: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f'[zmq]\nivr_endpoint = "{endpoint}"\n', "/etc/pbx.toml")
    assert str(info.value).startswith("/etc/pbx.toml: key zmq.ivr_endpoint:")
    assert reason in str(info.value)


def test_defaults_are_private_ipc() -> None:
    zs = parse_config("").zmq
    assert {endpoint_scope(e) for e in zs.endpoints().values()} == {"ipc"}
    assert {planes.ipc_directory(e) for e in zs.endpoints().values()} == {Path("run/zmq")}
    assert not zs.curve
    shipped = tomllib.loads((ROOT / "config" / "pbx.toml").read_text())["zmq"]
    endpoints = {k: v for k, v in shipped.items() if k.endswith("_endpoint")}
    assert len(endpoints) == 3
    assert all(v.startswith("ipc://run/zmq/") for v in endpoints.values())


@pytest.mark.parametrize("plane", ["media", "ivr", "events"])
def test_network_endpoint_without_keys_stops_start_up(plane: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f'[zmq]\n{plane}_endpoint = "tcp://0.0.0.0:5570"\n', "/etc/pbx.toml")
    text = str(info.value)
    assert text.startswith("/etc/pbx.toml: key zmq.server_public_key:")
    assert f"{plane}_endpoint 'tcp://0.0.0.0:5570' is reachable beyond loopback" in text
    assert "python -m pbx.keys" in text


def one_file_keys() -> dict[str, object]:
    return dict(tomllib.loads(keys.render([], one_file=True))["zmq"])


def toml_zmq(values: dict[str, object], endpoint: str = "tcp://10.0.0.1:5570") -> str:
    lines = [f'media_endpoint = "{endpoint}"']
    for key, value in values.items():
        if isinstance(value, list):
            lines.append(f"{key} = [{', '.join(repr(v) for v in value)}]")
        else:
            lines.append(f"{key} = {value!r}")
    return "[zmq]\n" + "\n".join(lines).replace("'", '"') + "\n"


def test_network_endpoint_with_keys_loads() -> None:
    zs = parse_config(toml_zmq(one_file_keys())).zmq
    assert zs.curve and zs.client_secret_key is not None


@pytest.mark.parametrize("change,key,reason", [
    ({"server_secret_key": "short"}, "zmq.server_secret_key", "not a CURVE key"),
    ({"media_client_keys": ["x" * 39]}, "zmq.media_client_keys", "entry 0 is not a CURVE"),
    ({"client_secret_key": None}, "zmq", "go together"),
])
def test_bad_keys_name_key_and_reason(change: dict[str, object], key: str,
                                      reason: str) -> None:
    values = {k: v for k, v in {**one_file_keys(), **change}.items() if v is not None}
    with pytest.raises(ConfigError) as info:
        parse_config(toml_zmq(values), "f.toml")
    assert f"key {key}:" in str(info.value) and reason in str(info.value)


def test_client_keys_without_curve_refused() -> None:
    values = one_file_keys()
    del values["server_public_key"], values["server_secret_key"]
    with pytest.raises(ConfigError, match="server_public_key is not"):
        parse_config(toml_zmq(values, "tcp://127.0.0.1:5570"), "f.toml")


# ---------------------------------------------------------------- the IPC directory


def test_private_dir_created_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        assert ensure_private_dir(tmp_path / "run" / "zmq") is None
    finally:
        os.umask(old)
    assert (tmp_path / "run" / "zmq").stat().st_mode & 0o777 == 0o700
    assert ensure_private_dir(tmp_path / "run" / "zmq") is None  # again: fine


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o701, 0o770, 0o707])
def test_open_dir_refused(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "zmq"
    d.mkdir()
    d.chmod(mode)
    problem = ensure_private_dir(d)
    assert problem is not None and f"has mode {mode:04o}" in problem
    assert f"chmod 700 {d}" in problem


def test_dir_of_another_owner_refused(tmp_path: Path) -> None:
    d = tmp_path / "zmq"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)  # nobody (the tests run as root)
    problem = ensure_private_dir(d)
    assert problem is not None and "is owned by uid 65534" in problem


def test_symlink_and_file_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    assert "symbolic link" in (ensure_private_dir(tmp_path / "link") or "")
    (tmp_path / "file").write_text("")
    assert "not a directory" in (ensure_private_dir(tmp_path / "file") or "")


def ipc_config(tmp_path: Path, extra: str = "") -> str:
    d = tmp_path / "zmq"
    return (f'[zmq]\nmedia_endpoint = "ipc://{d}/media"\nivr_endpoint = "ipc://{d}/ivr"\n'
            f'events_endpoint = "ipc://{d}/events"\n{extra}')


def test_prepare_names_file_key_directory_and_reason(tmp_path: Path) -> None:
    (tmp_path / "zmq").mkdir(mode=0o755)
    (tmp_path / "zmq").chmod(0o755)
    settings = parse_config(ipc_config(tmp_path), "/etc/pbx.toml")
    for role in ("front", "client"):
        with pytest.raises(ConfigError) as info:
            planes.prepare(settings, role)  # type: ignore[arg-type]
        text = str(info.value)
        assert text.startswith("/etc/pbx.toml: key zmq.media_endpoint: directory ")
        assert f"{tmp_path / 'zmq'} has mode 0755: group or other could open" in text


def test_prepare_checks_each_roles_keys(tmp_path: Path) -> None:
    values = one_file_keys()
    good = parse_config(toml_zmq(values), "f.toml")
    planes.prepare(good, "front")
    planes.prepare(good, "client")
    front_only = {k: v for k, v in values.items() if not k.startswith("client_")}
    with pytest.raises(ConfigError, match="key zmq.client_secret_key: CURVE is on"):
        planes.prepare(parse_config(toml_zmq(front_only), "f.toml"), "client")
    client_only = {k: v for k, v in values.items() if k != "server_secret_key"}
    with pytest.raises(ConfigError, match="key zmq.server_secret_key: CURVE is on"):
        planes.prepare(parse_config(toml_zmq(client_only), "f.toml"), "front")
    swapped = {**values, "server_public_key": values["client_public_key"]}
    with pytest.raises(ConfigError, match="not the public half of server_secret_key"):
        planes.prepare(parse_config(toml_zmq(swapped), "f.toml"), "front")
    nobody = {**values, "ivr_client_keys": []}
    with pytest.raises(ConfigError, match="key zmq.ivr_client_keys: .* no IVR executor"):
        planes.prepare(parse_config(toml_zmq(nobody), "f.toml"), "front")


@pytest.mark.parametrize("program", ["pbx.app", "workers.media", "workers.ivr"])
def test_programs_refuse_an_open_directory(program: str, tmp_path: Path) -> None:
    (tmp_path / "zmq").mkdir()
    (tmp_path / "zmq").chmod(0o777)
    path = tmp_path / "pbx.toml"
    path.write_text(ipc_config(tmp_path, f'\n[logging]\ndir = "{tmp_path}"\n'))
    proc = subprocess.run([sys.executable, "-m", program], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PBX_CONFIG": str(path)})
    assert proc.returncode == 2, proc.stderr
    assert f"{path}: key zmq.media_endpoint: directory {tmp_path / 'zmq'} has mode 0777" \
        in proc.stderr
    assert "Traceback" not in proc.stderr


def test_front_refuses_network_endpoint_without_keys(tmp_path: Path) -> None:
    path = tmp_path / "pbx.toml"
    path.write_text('[zmq]\nivr_endpoint = "tcp://0.0.0.0:5571"\n')
    proc = subprocess.run([sys.executable, "-m", "pbx.app"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PBX_CONFIG": str(path)})
    assert proc.returncode == 2, proc.stderr
    assert f"{path}: key zmq.server_public_key: " in proc.stderr
    assert "ivr_endpoint 'tcp://0.0.0.0:5571' is reachable beyond loopback" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- ZAP


def zap_request(domain: bytes, key: bytes, mechanism: bytes = b"CURVE") -> list[bytes]:
    return [b"1.0", b"42", domain, b"10.0.0.9", b"", mechanism, key]


def test_zap_accepts_listed_key_on_its_plane_only() -> None:
    worker_pub, _ = zmq.curve_keypair()
    watcher_pub, _ = zmq.curve_keypair()
    policy = ZapPolicy({"media": [worker_pub.decode()], "ivr": [worker_pub.decode()],
                        "events": [watcher_pub.decode()]})
    raw = z85.decode(worker_pub)
    reply, refused = policy.answer(zap_request(b"media", raw))
    assert refused is None and reply == [b"1.0", b"42", b"200", b"OK", worker_pub, b""]
    reply, refused = policy.answer(zap_request(b"events", raw))
    assert reply[2] == b"400" and refused is not None and "'events' plane" in refused
    reply, refused = policy.answer(zap_request(b"ivr", z85.decode(watcher_pub)))
    assert reply[:3] == [b"1.0", b"42", b"400"] and watcher_pub.decode() in (refused or "")


@pytest.mark.parametrize("request_frames,code", [
    (zap_request(b"media", b"\0" * 32, b"NULL")[:6], b"400"),
    (zap_request(b"media", b"\0" * 31), b"400"),
    (zap_request(b"unknown", b"\0" * 32), b"400"),
    ([b"1.0", b"7"], b"500"),
    ([b"2.0", b"7", b"media", b"", b"", b"CURVE", b"\0" * 32], b"500"),
    ([], b"500"),
])
def test_zap_refuses_everything_else_and_always_replies(request_frames: list[bytes],
                                                        code: bytes) -> None:
    policy = ZapPolicy({"media": []})
    reply, refused = policy.answer(request_frames)
    assert len(reply) == 6 and reply[0] == b"1.0" and reply[2] == code
    assert refused is not None


# ---------------------------------------------------------------- the key command


def test_key_command_prints_pasteable_sections() -> None:
    proc = subprocess.run([sys.executable, "-m", "pbx.keys", "host-a", "host-b",
                           "--subscriber", "monitor"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    sections = proc.stdout.split("# ---- ")[1:]
    assert [s.splitlines()[0] for s in sections] == [
        "the front's config", "host-a: its config (media workers and IVR executors)",
        "host-b: its config (media workers and IVR executors)",
        "monitor: its config (event subscriber)"]
    front = tomllib.loads(sections[0].split("\n", 1)[1])["zmq"]
    hosts = [tomllib.loads(s.split("\n", 1)[1])["zmq"] for s in sections[1:]]
    assert front["media_client_keys"] == front["ivr_client_keys"] == [
        hosts[0]["client_public_key"], hosts[1]["client_public_key"]]
    assert front["events_client_keys"] == [hosts[2]["client_public_key"]]
    endpoint = 'ivr_endpoint = "tcp://10.0.0.1:5571"\n'
    settings = parse_config("[zmq]\n" + endpoint + sections[0].split("[zmq]\n", 1)[1], "f")
    planes.prepare(settings, "front")
    for section in sections[1:]:
        host = parse_config("[zmq]\n" + endpoint + section.split("[zmq]\n", 1)[1], "h")
        assert host.zmq.server_public_key == front["server_public_key"]
        assert host.zmq.server_secret_key is None
        planes.prepare(host, "client")


def test_key_command_for_a_new_host_of_an_existing_front() -> None:
    server_pub, _ = zmq.curve_keypair()
    assert keys.main(["--server-public-key", server_pub.decode(), "host-c"]) == 0
    text = keys.render(["host-c"], server_public_key=server_pub.decode())
    assert "server_secret_key" not in text
    assert f'server_public_key = "{server_pub.decode()}"' in text
    assert keys.main(["--server-public-key", "nope", "x"]) == 2
    assert keys.main(["a", "a"]) == 2


def test_secret_key_in_a_readable_file_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "pbx.toml"
    path.write_text(toml_zmq(one_file_keys()))
    path.chmod(0o644)
    assert planes.secret_readable_by_others(load_config(str(path)))
    path.chmod(0o600)
    assert not planes.secret_readable_by_others(load_config(str(path)))
    path.write_text('[zmq]\nmedia_endpoint = "tcp://127.0.0.1:5570"\n')
    path.chmod(0o644)
    assert not planes.secret_readable_by_others(load_config(str(path)))


def _io_threads() -> set[int]:
    return {int(task.name) for task in Path("/proc/self/task").iterdir()
            if (task / "comm").read_text().strip().startswith("ZMQbg/IO")}


def _io_thread_policies(ctx: zmq.Context[zmq.Socket[bytes]]) -> list[int]:
    """The scheduling policy of the ZeroMQ I/O thread (named ZMQbg/IO/<n>) that `ctx`'s
    first socket starts (other tests' contexts may have theirs running too)."""
    before = _io_threads()
    sock = ctx.socket(zmq.DEALER)
    try:
        # The thread names itself once running, after it set its policy (libzmq's
        # thread_routine): wait for the name, bounded.
        deadline = time.monotonic() + 5.0
        while not (new := _io_threads() - before) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [os.sched_getscheduler(tid) for tid in new]
    finally:
        sock.close(linger=0)


@pytest.mark.parametrize("batch", [True, False])
def test_plane_context_runs_its_io_thread_as_a_batch_thread(batch: bool) -> None:
    """[zmq] io_thread_batch (default on): the I/O thread never preempts its process's own
    thread when a message wakes it (SCHED_BATCH); off, it is an ordinary thread."""
    zs = parse_config(f"[zmq]\nio_thread_batch = {str(batch).lower()}\n").zmq
    assert parse_config("").zmq.io_thread_batch is True
    ctx = planes.plane_context(zs)
    try:
        policies = _io_thread_policies(ctx)
    finally:
        ctx.term()
    assert policies == [os.SCHED_BATCH if batch else os.SCHED_OTHER]

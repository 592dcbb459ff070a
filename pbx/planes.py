"""Who may connect to the ZeroMQ planes (DESIGN §6): private IPC directories, CURVE, ZAP.

The front binds three sockets (media ROUTER, IVR ROUTER, events PUB); workers,
executors and event subscribers connect. Two defences, chosen by the config
(`pbx.config.ZmqSettings`):

- IPC (the single-host default): the sockets live in a directory that only the
  PBX's user can open. `prepare()` creates it mode 0700 and refuses a directory
  that group or other can open or that another user owns, since anyone who can
  open it can say `IvrReady` and receive live events.
- CURVE (ZeroMQ RFC 26; required for tcp:// beyond loopback): the front is the
  CURVE server; every client proves a key pair, and the front's ZAP handler
  (RFC 27) accepts only the public keys listed for that plane (the ZAP domain is
  the plane's name). `ZapPolicy` is that handler's decision, pure; the broker runs
  its socket.

Same-user processes can still connect over IPC: what they say is checked by the
front (replies only from the executor an event went to, worker addresses against
the declared ones).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import zmq
from zmq.utils import z85

from pbx.config import KEY_COMMAND, ConfigError, Settings, ZmqSettings, endpoint_scope

# RFC 27: the endpoint a ZAP handler binds in the context of the sockets it guards.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"

Role = Literal["front", "client"]


def ipc_directory(endpoint: str) -> Path | None:
    """The directory holding an ipc:// endpoint's socket (None for tcp)."""
    if endpoint_scope(endpoint) != "ipc":
        return None
    return Path(endpoint.partition("://")[2]).parent


def ensure_private_dir(path: Path) -> str | None:
    """Create `path` mode 0700 if missing; the reason it cannot be trusted, else None."""
    try:
        path.mkdir(mode=0o700, parents=True)
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask; parents keep theirs
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot be created: {exc.strerror or exc}"
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot be examined: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link: the sockets' directory must be a real directory"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return (f"is owned by uid {st.st_uid}, not by this process's user (uid "
                f"{os.geteuid()}): its owner could open or replace the plane sockets")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return (f"has mode {mode:04o}: group or other could open the plane sockets in it "
                f"(anyone who connects can take IVR sessions and read live events); "
                f"`chmod 700 {path}`, or remove it and let the front create it")
    return None


def prepare(settings: Settings, role: Role) -> None:
    """Before binding (front) or connecting (client): the IPC directories are private and
    the keys this role needs are there. ConfigError names file, key and reason."""
    zs = settings.zmq
    source = settings.source_path or "<config>"
    for name, endpoint in zs.endpoints().items():
        directory = ipc_directory(endpoint)
        if directory is None:
            continue
        problem = ensure_private_dir(directory)
        if problem is not None:
            raise ConfigError(f"{source}: key zmq.{name}_endpoint: directory "
                              f"{directory.resolve()} {problem}")
    check_keys(settings, role)


def check_keys(settings: Settings, role: Role) -> None:
    """The CURVE keys `role` needs are there and pair up (no file system work: also
    `pbx config check`). ConfigError names file, key and reason."""
    zs = settings.zmq
    source = settings.source_path or "<config>"
    if not zs.curve:
        return
    if role == "front":
        _check_pair(source, zs.server_public_key, zs.server_secret_key, "server")
        for plane in ("media", "ivr"):
            if not getattr(zs, f"{plane}_client_keys"):
                raise ConfigError(
                    f"{source}: key zmq.{plane}_client_keys: CURVE is on (server_public_key) "
                    f"but no client key is accepted on the {plane} plane, so no "
                    f"{'media worker' if plane == 'media' else 'IVR executor'} could connect; "
                    f"list the clients' public keys (`{KEY_COMMAND}`)")
    else:
        _check_pair(source, zs.client_public_key, zs.client_secret_key, "client")


def _check_pair(source: str, public: str | None, secret: str | None, who: str) -> None:
    if secret is None:
        needs = "the front" if who == "server" else "a media worker or IVR executor"
        raise ConfigError(f"{source}: key zmq.{who}_secret_key: CURVE is on (server_public_key) "
                          f"and {needs} needs its secret key (`{KEY_COMMAND}`)")
    assert public is not None  # the config pairs them
    if zmq.curve_public(secret.encode()) != public.encode():
        raise ConfigError(f"{source}: key zmq.{who}_public_key: it is not the public half of "
                          f"{who}_secret_key")


def secret_readable_by_others(settings: Settings) -> bool:
    """A config holding a CURVE secret key that group or other can read (worth a warning)."""
    zs = settings.zmq
    if zs.server_secret_key is None and zs.client_secret_key is None:
        return False
    try:
        return bool(os.stat(settings.source_path).st_mode & 0o044)
    except OSError:
        return False


def plane_context(zs: ZmqSettings) -> zmq.Context[zmq.Socket[bytes]]:
    """A ZeroMQ context for a process's planes. With `io_thread_batch` its I/O thread
    runs under SCHED_BATCH, which the scheduler never lets preempt a running thread when
    it wakes (sched(7)): a message sent wakes it, and on a busy machine it used to take
    the core from the sender at once, one preemption per message (the front: ~5 a call,
    2,200/s at 400 calls/s). As a batch thread it runs when the sender waits or on an
    idle core, and sends what queued meanwhile together. Set before the first socket,
    which starts the thread."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    if zs.io_thread_batch and hasattr(os, "SCHED_BATCH"):
        ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_BATCH)
    return ctx


def configure_server(sock: zmq.Socket[Any], zs: ZmqSettings, plane: str) -> None:
    """A front socket: CURVE server in ZAP domain `plane` when CURVE is on."""
    if "[" in zs.endpoints()[plane]:
        sock.setsockopt(zmq.IPV6, 1)
    if not zs.curve:
        return
    assert zs.server_secret_key is not None  # prepare(role="front") checked it
    sock.setsockopt(zmq.ZAP_DOMAIN, plane.encode())
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, zs.server_secret_key.encode())


def configure_client(sock: zmq.Socket[Any], zs: ZmqSettings, endpoint: str) -> None:
    """A worker's (or subscriber's) socket: CURVE client of the front when CURVE is on."""
    if "[" in endpoint:
        sock.setsockopt(zmq.IPV6, 1)
    if not zs.curve:
        return
    assert zs.server_public_key and zs.client_public_key and zs.client_secret_key
    sock.setsockopt(zmq.CURVE_SERVERKEY, zs.server_public_key.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, zs.client_public_key.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, zs.client_secret_key.encode())


class ZapPolicy:
    """RFC 27 ZAP decisions: a CURVE client is accepted on a plane (the ZAP domain) only
    if its public key is listed for that plane. Pure: frames in, frames out."""

    def __init__(self, allowed: Mapping[str, Iterable[str]]) -> None:
        self.allowed = {domain: {z85.decode(k) for k in keys}
                        for domain, keys in allowed.items()}

    @classmethod
    def from_settings(cls, zs: ZmqSettings) -> ZapPolicy:
        return cls({"media": zs.media_client_keys, "ivr": zs.ivr_client_keys,
                    "events": zs.events_client_keys})

    def answer(self, request: list[bytes]) -> tuple[list[bytes], str | None]:
        """The reply frames, and why the client was refused (None: accepted).

        Request (RFC 27): version, request id, domain, address, identity, mechanism,
        credentials...; reply: version, request id, status code, status text, user id,
        metadata. A reply always goes back (the handler's REP socket must answer)."""
        request_id = request[1] if len(request) > 1 else b""

        def deny(code: bytes, why: str) -> tuple[list[bytes], str]:
            return [ZAP_VERSION, request_id, code, why.encode(), b"", b""], why

        if len(request) < 6 or request[0] != ZAP_VERSION:
            return deny(b"500", "malformed ZAP request")
        domain = request[2].decode(errors="replace")
        mechanism = request[5]
        if mechanism != b"CURVE" or len(request) != 7 or len(request[6]) != 32:
            return deny(b"400", f"mechanism {mechanism[:16]!r} refused")
        key = request[6]
        if key not in self.allowed.get(domain, ()):
            return deny(b"400", f"client key {z85.encode(key).decode()} is not "
                                f"accepted on the {domain[:16]!r} plane")
        user_id = z85.encode(key)
        return [ZAP_VERSION, request_id, b"200", b"OK", user_id, b""], None

"""Network namespaces standing in for other hosts in end-to-end tests.

Each `VethHost` is a namespace joined to the root namespace by a veth pair: the root
side gets `host_ip`, the namespace side `ns_ip` (and a default route via `host_ip`,
so it reaches every address of the root namespace, the system under test's included:
those are local there, so no forwarding is needed). Names are fixed per test so that
what a crashed earlier run left behind is deleted first; `remove()` never raises.

Sockets of the test can live in a namespace (`VethHost.socket`: made by a thread that
entered it with setns(2); a socket keeps its namespace), and programs run in it with
`ip netns exec` (`VethHost.command`). Creating namespaces needs root (tests run as root).
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000  # <sched.h>
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str, check: bool = True) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass(frozen=True)
class VethHost:
    name: str  # the namespace; the veth pair is <name>0 (root side) and <name>1
    host_ip: str
    ns_ip: str
    prefix_len: int = 24

    @property
    def veth(self) -> str:
        return f"{self.name}0"

    def create(self) -> None:
        """Delete leftovers of an earlier run, then make the namespace and its link."""
        self.remove()
        peer = f"{self.name}1"
        _ip("netns", "add", self.name)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/{self.prefix_len}", "dev", self.veth)
        _ip("link", "set", self.veth, "up")
        _ip("-n", self.name, "addr", "add", f"{self.ns_ip}/{self.prefix_len}", "dev", peer)
        _ip("-n", self.name, "link", "set", peer, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")
        _ip("-n", self.name, "route", "add", "default", "via", self.host_ip)

    def remove(self) -> None:
        """Deleting the root side deletes its peer; then the namespace. Quietly: either
        may not exist."""
        _ip("link", "del", self.veth, check=False)
        _ip("netns", "del", self.name, check=False)

    def command(self, *args: str) -> list[str]:
        """`args` as a command run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *args]

    def socket(self, kind: int = socket.SOCK_DGRAM, port: int = 0) -> socket.socket:
        """A socket in the namespace, bound to (`ns_ip`, `port`)."""
        made: list[socket.socket] = []
        failed: list[BaseException] = []

        def enter_and_make() -> None:
            try:
                fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
                try:
                    # Only this thread changes namespace (it ends right after).
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns {self.name}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                sock = socket.socket(socket.AF_INET, kind)
                try:
                    sock.bind((self.ns_ip, port))
                except OSError:
                    sock.close()
                    raise
                made.append(sock)
            except BaseException as exc:  # re-raised in the caller's thread
                failed.append(exc)

        thread = threading.Thread(target=enter_and_make, name=f"netns-{self.name}")
        thread.start()
        thread.join(10)
        if failed:
            raise failed[0]
        assert made, f"no socket made in {self.name}"
        return made[0]

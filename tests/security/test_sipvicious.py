"""Debian's sipvicious against the real front (issue 8, "Done when"): the extension
scanner `svwar` must not tell existing extensions from missing ones, and the digest
cracker `svcrack` must not get past the lockout to a password that sits further down
its wordlist than the lockout lets it go.

The tools (sipvicious 0.3.3) ignore `-b` and send from 127.0.0.1, so they get a system
of their own, and the cracker runs last. The system offers MD5 first (the harness
default): svcrack only does MD5, and the point is that the lockout stops it, not an
algorithm it does not know."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import (
    REGISTERING_USERS,
    PbxSystem,
    ScriptedProvider,
    free_port,
    start_system,
    wait_until,
)

SVWAR = "/usr/bin/svwar"
SVCRACK = "/usr/bin/svcrack"
# Existing extensions: 2001 (static contact, no password), 3001-3003 (passwords).
SCAN_RANGE = "1995-2005,2995-3005"


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxSystem]:
    assert shutil.which("svwar") and shutil.which("svcrack"), "apt-get install sipvicious"
    provider = ScriptedProvider()
    s = start_system(tmp_path_factory.mktemp("pbx-sipvicious"), provider)
    yield s
    s.stop()
    provider.close()


def run_tool(args: list[str], timeout_s: float = 90) -> str:
    """Run a sipvicious tool to completion; its whole output (stderr has the log)."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)
    return done.stdout + done.stderr


def svwar(system: PbxSystem, method: str, *extra: str, extensions: str = SCAN_RANGE) -> str:
    return run_tool([SVWAR, "-vvv", "-m", method, "-e", extensions, "-P", str(free_port()),
                     *extra, f"udp://127.0.0.1:{system.sip_port}"])


def assert_found_nothing(output: str) -> None:
    # svwar logs every extension it takes for real, and prints them in a table.
    assert "exists" not in output, output[-3000:]
    assert "found nothing" in output, output[-3000:]


def test_svwar_register_finds_no_extension(system: PbxSystem) -> None:
    output = svwar(system, "REGISTER")
    assert_found_nothing(output)
    # Its first probe, a made-up extension, got the same challenge as every user.
    assert "authentication request for an unknown extension" in output


@pytest.mark.parametrize("extension", ["3001", "2001", "2999"])
def test_svwar_register_forced_cannot_tell_an_extension(system: PbxSystem,
                                                        extension: str) -> None:
    """--force scans anyway, taking the answer to a random extension as "no such
    extension": the answer for 3001 (password), 2001 (static contact) and 2999 (none) is
    that same one (svwar then stops: a 401 for "nobody" leaves it nothing to compare)."""
    output = svwar(system, "REGISTER", "--force", extensions=extension)
    assert_found_nothing(output)
    assert f"sending request for {extension}" in output
    assert "1st line: 'SIP/2.0 401 Unauthorized'" in output
    assert "Bad user: 'SIP/2.0 401 Unauthorized'" in output


def test_svwar_options_finds_no_extension(system: PbxSystem) -> None:
    output = svwar(system, "OPTIONS")
    assert_found_nothing(output)
    assert "sending request for 3001" in output


def test_svwar_invite_finds_no_extension(system: PbxSystem) -> None:
    output = svwar(system, "INVITE", "--force")
    assert_found_nothing(output)


@pytest.mark.parametrize("extension", ["3001", "2001", "2999"])
def test_svwar_invite_forced_cannot_tell_an_extension(system: PbxSystem,
                                                      extension: str) -> None:
    """An unknown caller's INVITE for anything but a public route gets one 407, whether
    the user exists (3001 with a password, 2001 with a static contact) or not (2999):
    pbx.policy."""
    output = svwar(system, "INVITE", "--force", extensions=extension)
    assert_found_nothing(output)
    assert f"sending request for {extension}" in output, output[-3000:]
    assert "Bad user: 'SIP/2.0 407 Proxy Authentication Required'" in output


def test_svcrack_does_not_get_past_the_lockout(system: PbxSystem, tmp_path: Path) -> None:
    password = REGISTERING_USERS["3001"]
    # [auth] defaults: 5 failures, then 2, 4, 8, ... s; the 13th guess would come
    # after ~4 minutes of waiting, and every guess made during a lock is not checked.
    words = [f"wrong-{i}" for i in range(12)] + [password] + ["wrong-after"]
    wordlist = tmp_path / "words.txt"
    wordlist.write_text("\n".join(words) + "\n")
    output = run_tool([SVCRACK, "-vvv", "-u", "3001", "-d", str(wordlist),
                       "-P", str(free_port()), f"udp://127.0.0.1:{system.sip_port}"])
    assert f"trying {password}" in output, output[-3000:]  # it did send the right one
    assert "The password for" not in output and password not in output.split(
        f"trying {password}")[1], output[-3000:]
    assert "found nothing" in output, output[-3000:]
    metrics = wait_until(lambda: (m := system.metrics())["pbx_auth_lockouts_total"] >= 1 and m, 5,
                         "the lockout in /metrics")
    assert metrics["pbx_auth_locked_refusals_total"] >= 1
    assert metrics["pbx_auth_failures_total"] <= 6

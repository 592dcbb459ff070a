"""The reference provider (examples/step_ivr_provider.py), run as a subprocess."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.provider_process import provider_process

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "step_ivr_provider.py"
TIMEOUT = 5.0


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with provider_process(SCRIPT) as url:
        yield url


def _post(url: str, body: bytes | dict) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def _step(base: str, sid: str, event: dict) -> dict:
    status, node = _post(
        base, {"session_id": sid, "caller": "1001", "callee": "*99", "event": event}
    )
    assert status == 200
    assert isinstance(node.get("step_id"), str) and node["step_id"]
    assert isinstance(node.get("step_name"), str) and node["step_name"]
    assert node["extra"]["flow"] == "reference"
    return node


def _health(base: str) -> dict:
    root = base.split("/ivr/")[0] + "/health"
    with urllib.request.urlopen(root, timeout=TIMEOUT) as resp:
        return json.loads(resp.read())


MENU_ENTRIES = {
    "1": {"type": "transfer", "target": "2001"},
    "2": {"type": "queue", "target": "support"},
    "0": {"type": "transfer", "target": "operator"},
}


def _assert_menu(node: dict) -> None:
    assert node["type"] == "dtmf_menu"
    assert node["greeting"] == "sounds/menu.wav"
    assert node["timeout_ms"] == 5000
    assert node["entries"] == MENU_ENTRIES
    assert "invalid_action" not in node and "timeout_action" not in node


def test_full_session_three_strikes(base_url):
    sid = "t-three-strikes"
    assert _post(base_url + "/start", {"session_id": sid, "caller": "1001", "callee": "*99"}) == (
        200,
        {"status": "ok"},
    )
    sessions_before = _health(base_url)["sessions"]

    node = _step(base_url, sid, {"type": "session_start"})
    assert node["type"] == "prompt"
    assert node["file"] == "sounds/welcome.wav"
    assert node["interruptible"] is True
    _assert_menu(node["next"])
    assert node["extra"]["failures"] == 0

    node = _step(base_url, sid, {"type": "dtmf_menu_invalid", "digit": "7"})
    assert node["type"] == "prompt" and node["file"] == "sounds/invalid.wav"
    _assert_menu(node["next"])
    assert node["extra"]["failures"] == 1

    node = _step(base_url, sid, {"type": "dtmf_menu_invalid", "digit": "8"})
    assert node["type"] == "prompt" and node["file"] == "sounds/invalid.wav"
    _assert_menu(node["next"])
    assert node["extra"]["failures"] == 2

    node = _step(base_url, sid, {"type": "dtmf_menu_invalid", "digit": "9"})
    assert node["type"] == "hangup" and node["prompt"] == "sounds/goodbye.wav"
    assert node["extra"]["failures"] == 3
    assert "next" not in node

    assert _post(base_url + "/end", {"session_id": sid, "reason": "Hangup"}) == (
        200,
        {"status": "ok"},
    )
    assert _health(base_url)["sessions"] == sessions_before - 1


def test_timeout_then_digits_and_other_events(base_url):
    sid = "t-timeout"
    _post(base_url + "/start", {"session_id": sid})
    _step(base_url, sid, {"type": "session_start"})

    node = _step(base_url, sid, {"type": "dtmf_menu_timeout"})
    assert node["type"] == "prompt" and node["file"] == "sounds/timeout.wav"
    _assert_menu(node["next"])

    _assert_menu(_step(base_url, sid, {"type": "audio_complete", "interrupted": False}))

    for digit, action in MENU_ENTRIES.items():
        node = _step(base_url, sid, {"type": "dtmf", "digit": digit})
        assert {k: node[k] for k in ("type", "target")} == action

    node = _step(base_url, sid, {"type": "dtmf", "digit": "5"})  # second failure
    assert node["type"] == "prompt" and node["file"] == "sounds/invalid.wav"
    node = _step(base_url, sid, {"type": "dtmf_menu_timeout"})  # third
    assert node == {**node, "type": "hangup", "prompt": "sounds/goodbye.wav"}

    node = _step(base_url, sid, {"type": "error", "reason": "TTS service not available"})
    assert node["type"] == "hangup" and node["prompt"] == "sounds/error.wav"
    assert _step(base_url, sid, {"type": "no_such_event"})["type"] == "hangup"
    assert _step(base_url, sid, {})["type"] == "hangup"

    assert _post(base_url + "/dtmf-match", {"digit": "1", "action": MENU_ENTRIES["1"]}) == (
        200,
        {"status": "ok"},
    )
    assert _post(base_url + "/end", {"session_id": sid, "reason": "Normal"})[0] == 200


def test_step_without_start_creates_session(base_url):
    node = _step(base_url, "t-no-start", {"type": "session_start"})
    assert node["type"] == "prompt"
    _post(base_url + "/end", {"session_id": "t-no-start"})


def test_bad_input_is_400_json(base_url):
    status, body = _post(base_url, b"{not json")
    assert status == 400 and "error" in body
    status, body = _post(base_url, b"[1, 2]")
    assert status == 400 and "error" in body
    status, body = _post(base_url, {"event": {"type": "session_start"}})
    assert status == 400 and "error" in body
    status, body = _post(base_url + "/start", b"\xff\xfe")
    assert status == 400 and "error" in body
    # still serving afterwards
    assert _step(base_url, "t-after-bad", {"type": "session_start"})["type"] == "prompt"


# ---------------------------------------------------------------- its HTTP/1.1 server


def _raw(base: str, data: bytes, read_until_close: bool = True) -> bytes:
    """`data` sent on a new connection as is; what comes back until the server closes
    (or, else, until it has said nothing for a moment)."""
    host, port = base.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(data)
        sock.settimeout(TIMEOUT if read_until_close else 0.5)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except TimeoutError:
            assert not read_until_close, out
        return out


def _post_bytes(path: str, body: dict, extra: str = "") -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n{extra}\r\n").encode() + payload


def _answers(raw: bytes) -> list[tuple[int, dict, bytes]]:
    """The HTTP answers in `raw`: status, JSON body, head."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
        out.append((int(head.split(b" ")[1]), json.loads(rest[:length]), head))
        raw = rest[length:]
    return out


def test_requests_pipelined_on_one_connection_are_answered_in_order(base_url):
    path = "/" + base_url.split("/", 3)[3]
    sid = "t-pipelined"
    data = (_post_bytes(path + "/start", {"session_id": sid, "caller": "1001"})
            + _post_bytes(path, {"session_id": sid, "event": {"type": "session_start"}})
            + _post_bytes(path + "/end", {"session_id": sid}, "Connection: close\r\n"))
    answers = _answers(_raw(base_url, data))
    assert [a[0] for a in answers] == [200, 200, 200]
    assert answers[1][1]["type"] == "prompt" and answers[2][1] == {"status": "ok"}
    assert b"Connection: close" in answers[2][2] and b"Connection: close" not in answers[0][2]
    # A request split across writes, on a kept-alive connection: answered once whole.
    one = _post_bytes(path, {"session_id": "t-split", "event": {"type": "session_start"}})
    (answer,) = _answers(_raw(base_url, one, read_until_close=False))
    assert answer[0] == 200 and answer[1]["type"] == "prompt"


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST /ivr/step HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     411),
    (b"POST /ivr/step HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /ivr/step HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
    (b"POST /ivr/step HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", 400),
    (b"POST /ivr/step HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 400),
    (b"NONSENSE\r\n\r\n", 400),
    (b"POST /ivr/step HTTP/2.0\r\n\r\n", 400),
    (b"POST /ivr/step HTTP/1.1\r\nBad Header : x\r\n\r\n", 400),
    (b"POST /ivr/step HTTP/1.1\r\nX: " + b"a" * 20000, 431),
])
def test_a_request_that_cannot_be_read_gets_an_error_and_the_connection_closes(
        base_url, request_bytes, status):
    (answer,) = _answers(_raw(base_url, request_bytes))  # read until the server closes
    assert answer[0] == status and "error" in answer[1]
    assert b"Connection: close" in answer[2]
    assert _health(base_url)["status"] == "ok"  # still serving

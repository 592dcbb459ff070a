"""Issue 8, "Credentials leak" (DESIGN §6 "Secrets stay in the front"): the headers of
`api` and `voip_bridge` actions and SIP headers carrying credentials (a caller's
`Proxy-Authorization` becomes `sip_Proxy-Authorization`) never appear in traces
(`/api/traces`, `logs/traces.jsonl`), live events (`/ws/events`, the PUB socket) or any
log file.

The pure parts (`pbx.redact`, the IVR machine's traces, the front's trace path) are
tested directly; the last test runs the real system: a sipp caller whose INVITE carries
credentials, a provider whose actions carry them, and every output the PBX has.

`pbx.redact` is imported inside the tests that use it, so that against commit 2554a5d
(which had none) the behaviour tests fail on their assertions, not on an import.
"""

from __future__ import annotations

import json
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq
from aiohttp import web

from pbx.ivr.requests import ApiResult
from pbx.messages import StepTrace
from tests.e2e.harness import (
    PbxSystem,
    ScriptedProvider,
    free_port,
    start_sipp,
    start_system,
    wait_idle,
    wait_until,
)
from tests.e2e.ivr_calls import AioServer, event_type, script_of
from tests.e2e.test_traces_records import EventsClient
from tests.ivr.sim import Sim

API_SECRET = "Bearer s3cret-api-9f4e1c"
WS_SECRET = "Bearer s3cret-ws-5b7d20"
COOKIE_SECRET = "sid=s3cret-cookie-31aa"
URL_SECRET = "s3cret-url-pass-77c1"
QUERY_SECRET = "s3cret-query-token-0d9e"
# What the caller's INVITE carries (tests/security/scenarios/uac_secret_headers.xml).
INVITE_SECRETS = ("s3cret-proxy-auth-e81b", "s3cret-api-key-44f0", "s3cret-cookie-inv-6c2d")
ALL_SECRETS = (API_SECRET, WS_SECRET, COOKIE_SECRET, URL_SECRET, QUERY_SECRET,
               *INVITE_SECRETS, "s3cret")  # the common stem: nothing at all slips out

SCENARIO = Path(__file__).resolve().parent / "scenarios" / "uac_secret_headers.xml"


def leaks(text: str) -> list[str]:
    return [s for s in ALL_SECRETS if s in text]


# ---------------------------------------------------------------- pbx.redact


def test_secret_header_names_are_case_insensitive_and_configurable() -> None:
    from pbx import redact

    try:
        for name in ("Authorization", "proxy-authorization", " PROXY-AUTHORIZATION ",
                     "Cookie", "set-cookie", "X-Api-Key", "x-auth-token"):
            assert redact.is_secret_header(name), name
        for name in ("Via", "From", "X-Customer", "Content-Type", "WWW-Authenticate"):
            assert not redact.is_secret_header(name), name
        assert redact.is_secret_variable("sip_Proxy-Authorization")
        assert not redact.is_secret_variable("sip_X-Customer")
        # A carrier's own header; Authorization and Proxy-Authorization stay secret even
        # when the list forgets them.
        redact.configure(["X-Carrier-Token"])
        assert redact.is_secret_header("x-carrier-token")
        assert redact.is_secret_header("Authorization")
        assert redact.is_secret_header("Proxy-Authorization")
        assert not redact.is_secret_header("Cookie")
        with pytest.raises(ValueError):
            redact.configure(["Bad Name"])
    finally:
        redact.configure(redact.DEFAULT_SECRET_HEADERS)


def test_redact_keeps_names_and_replaces_values_everywhere_in_a_trace() -> None:
    from pbx.redact import REDACTED, redact, redact_headers

    assert redact_headers({"Authorization": API_SECRET, "X-Room": "r1"}) == {
        "Authorization": REDACTED, "X-Room": REDACTED}
    step = {
        "trigger": "dtmf",
        "action": {
            "type": "dtmf_menu", "greeting": "sounds/menu.wav",
            "entries": {
                "1": {"type": "api", "url": f"https://bot:{URL_SECRET}@api.test/x?access_token="
                      f"{QUERY_SECRET}&n=1", "headers": {"Authorization": API_SECRET}},
                "2": {"type": "voip_bridge", "create_room_uri": "wss://ws.test/room",
                      "headers": {"X-Room": "r", "Cookie": COOKIE_SECRET}},
            },
        },
        "request": {"variables": {"sip_Proxy-Authorization": INVITE_SECRETS[0],
                                  "sip_X-Customer": "gold", "caller": "1001"}},
        "extra": {"Set-Cookie": COOKIE_SECRET, "n": 2},
        "error": f"api: ClientError: https://bot:{URL_SECRET}@api.test/x",
        "duration_ms": 1.5,
    }
    original = json.loads(json.dumps(step))
    out = redact(step)
    assert step == original  # the input is never modified
    assert leaks(json.dumps(out)) == [], out
    entries = out["action"]["entries"]
    assert entries["1"]["headers"] == {"Authorization": REDACTED}
    assert entries["1"]["url"] == (f"https://bot:{REDACTED}@api.test/x?access_token="
                                   f"{REDACTED}&n=1")
    assert entries["2"]["headers"] == {"X-Room": REDACTED, "Cookie": REDACTED}
    assert entries["2"]["create_room_uri"] == "wss://ws.test/room"
    assert out["request"]["variables"] == {"sip_Proxy-Authorization": REDACTED,
                                           "sip_X-Customer": "gold", "caller": "1001"}
    assert out["extra"] == {"Set-Cookie": REDACTED, "n": 2}
    assert out["duration_ms"] == 1.5 and out["trigger"] == "dtmf"


def test_redact_survives_pathological_nesting() -> None:
    from pbx.redact import redact

    deep: dict[str, Any] = {"headers": {"Authorization": API_SECRET}}
    for _ in range(5000):
        deep = {"next": deep}
    assert leaks(orjson.dumps(redact(deep)).decode()) == []


# ---------------------------------------------------------------- where traces are built


def secret_call_headers(sim: Sim) -> None:
    """The INVITE's headers as the front of commit 2554a5d passed them on (every
    header a `sip_*` variable): the machine must not trace the secret ones."""
    sim.call = sim.call.model_copy(update={"sip_headers": {
        "X-Customer": "gold", "Proxy-Authorization": f'Digest response="{INVITE_SECRETS[0]}"',
        "X-Api-Key": INVITE_SECRETS[1], "Cookie": INVITE_SECRETS[2]}})


def test_machine_traces_carry_no_action_headers_or_secret_sip_variables() -> None:
    api = {"type": "api", "url": "http://api.test/balance", "method": "GET",
           "headers": {"Authorization": API_SECRET, "X-Trace": "t1"},
           "variables": "caller", "timeout": 3}
    bridge = {"type": "voip_bridge", "create_room_uri": "ws://ws.test/room",
              "headers": {"Authorization": WS_SECRET}, "timeout_ms": 3000}
    sim = Sim([api, bridge], api_answers=[ApiResult(200, {"ok": True})])
    secret_call_headers(sim)
    sim.start()
    # The secrets still do their job: the API call carries its header.
    sent_headers = sim.api_sent[0].headers
    assert sent_headers is not None and sent_headers["Authorization"] == API_SECRET
    assert sim.traces, "no traces"
    kinds = {t.action_type for t in sim.traces}
    assert {"api", "voip_bridge"} <= kinds, kinds
    dumped = json.dumps([t.model_dump(mode="json") for t in sim.traces])
    assert leaks(dumped) == [], dumped
    api_trace = next(t for t in sim.traces if t.action_type == "api")
    assert api_trace.action is not None and set(api_trace.action["headers"]) == {
        "Authorization", "X-Trace"}  # names kept
    first = sim.traces[0]
    assert first.request is not None
    assert first.request["variables"]["sip_X-Customer"] == "gold"


def test_front_redacts_what_an_executor_did_not(tmp_path: Path) -> None:
    """Defence in depth: a trace that arrives with secrets (an old or rogue executor)
    is stored, logged and published without them."""
    from pbx.config import parse_config
    from pbx.front import Front

    settings = parse_config(f'[logging]\ndir = "{tmp_path}"\n')
    published: list[dict[str, Any]] = []
    front = Front(settings, lambda *a, **k: None, lambda *a: True, lambda *a: True,
                  published.append)
    heard: list[dict[str, Any]] = []
    front.listeners.append(heard.append)
    trace = StepTrace(
        call_id="c1", session_id="s1", step_index=1, trigger="session_start",
        action_type="api",
        action={"type": "api", "url": "http://api.test/x",
                "headers": {"Authorization": API_SECRET}},
        request={"variables": {"sip_Proxy-Authorization": INVITE_SECRETS[0],
                               "sip_X-Customer": "gold"}},
        extra={"Cookie": COOKIE_SECRET})
    front.record_trace(trace)
    stored = front.traces.get("s1")
    assert stored and stored[0]["request"]["variables"]["sip_X-Customer"] == "gold"
    assert leaks(json.dumps(stored)) == []
    assert published and leaks(json.dumps(published)) == []
    assert heard and leaks(json.dumps(heard)) == []
    assert leaks((tmp_path / "traces.jsonl").read_text()) == []


# ---------------------------------------------------------------- the real system


class PubListener:
    """A SUB socket on the front's PUB (events) endpoint, on its own thread."""

    def __init__(self, endpoint: str) -> None:
        self.messages: list[bytes] = []
        self._stop = threading.Event()
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.RCVTIMEO, 100)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv())
            except zmq.Again:
                continue

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()
        self.ctx.term()


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PbxSystem]:
    provider = ScriptedProvider()
    s = start_system(tmp_path_factory.mktemp("pbx-redaction"), provider)
    try:
        yield s
    finally:
        s.stop()
        provider.close()


def test_no_secret_in_traces_events_or_logs_of_a_real_call(system: PbxSystem,
                                                            tmp_path: Path) -> None:
    """sipp calls *99 with Proxy-Authorization, X-Api-Key and Cookie in its INVITE; the
    provider answers an `api` action with `Authorization: Bearer ...` (and an access
    token in the URL), then a `voip_bridge` with an `Authorization` header. Both
    secrets reach their servers; none reaches /api/traces, /ws/events, the PUB socket,
    traces.jsonl, calls.jsonl or any log file."""
    wait_idle(system)
    api_seen: list[dict[str, str]] = []
    ws_seen: list[dict[str, str]] = []

    async def balance(request: web.Request) -> web.Response:
        api_seen.append(dict(request.headers))
        return web.json_response({"balance": 7})

    async def room(request: web.Request) -> web.WebSocketResponse:
        ws_seen.append(dict(request.headers))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()  # the room closes at once: the PBX ends the call
        return ws

    app = web.Application()
    app.router.add_get("/balance", balance)
    app.router.add_get("/room", room)
    server = AioServer(app)

    def steps(path: str, body: Any) -> dict[str, Any] | None:
        kind = event_type(body)
        if kind == "session_start":
            return {"type": "api", "url": server.url(f"/balance?access_token={QUERY_SECRET}"),
                    "method": "GET", "headers": {"Authorization": API_SECRET},
                    "variables": "caller", "timeout": 5, "step_id": "secret-api"}
        if kind == "api_response":
            return {"type": "voip_bridge", "create_room_uri": server.url("/room", "ws"),
                    "headers": {"Authorization": WS_SECRET, "X-Room": "r1"},
                    "timeout_ms": 3000, "step_id": "secret-bridge"}
        return None

    system.provider.script = script_of(steps)
    events = EventsClient(f"ws://127.0.0.1:{system.admin_port}/ws/events")
    assert events.connected.wait(5) and events.error is None, events.error
    config = tomllib.loads((system.root / "pbx.toml").read_text())
    pub = PubListener(config["zmq"]["events_endpoint"])
    time.sleep(0.3)  # the SUB connection is up before the call (PUB drops otherwise)
    caller = start_sipp("caller", [
        "-sf", str(SCENARIO), "-s", "*99", system.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1",
        "-mp", str(free_port(even=True)), "-m", "1", "-l", "1",
        "-timeout", "40s", "-timeout_error",
    ], tmp_path / "caller")
    try:
        started = wait_until(lambda: events.events(type="call", event="started"), 15,
                             "the call's started event")
        call_id = started[-1][1]["call_id"]
        wait_until(lambda: events.events(type="call", event="ended", call_id=call_id), 30,
                   "the call's end")
        assert caller.wait(30) == 0, caller.logs()
    finally:
        caller.stop()
        server.close()
        system.provider.script = system.provider.default_script
    try:
        wait_idle(system)
        # The secrets did their job.
        assert api_seen and api_seen[0].get("Authorization") == API_SECRET, api_seen
        assert ws_seen and ws_seen[0].get("Authorization") == WS_SECRET, ws_seen
        # The steps are there, with header names but no values.
        steps_live = [ev for _, ev in events.events(type="ivr_step_trace", call_id=call_id)]
        types = [ev.get("action_type") for ev in steps_live]
        assert "api" in types and "voip_bridge" in types, types
        session_id = steps_live[0]["session_id"]
        stored = system.admin(f"/api/traces/{session_id}")
        bridge = next(s for s in stored if s.get("action_type") == "voip_bridge")
        assert set(bridge["action"]["headers"]) == {"Authorization", "X-Room"}
        variables = stored[0]["request"]["variables"]
        assert variables.get("sip_X-Customer") == "gold", variables  # not a secret
        wait_until(lambda: pub.messages, 5, "events on the PUB socket")
        outputs = {
            "/api/traces/{session}": json.dumps(stored),
            "/api/traces": json.dumps(system.admin("/api/traces")),
            "/ws/events": json.dumps([ev for _, ev in events.frames]),
            "PUB": b"\n".join(pub.messages).decode("utf-8", "replace"),
            # what the provider was POSTed: credentials never become sip_* variables
            "provider": json.dumps([r.body for r in system.provider.for_session(session_id)]),
        }
        # The front's JSON-lines logs are flushed within [logging] jsonl_flush_s: every
        # line of this call is read (its record, each of its steps).
        logs = system.root / "logs"

        def flushed() -> bool:
            if not (logs / "calls.jsonl").exists() or not (logs / "traces.jsonl").exists():
                return False
            steps = (logs / "traces.jsonl").read_text().count(f'"session_id":"{session_id}"')
            return call_id in (logs / "calls.jsonl").read_text() and steps >= len(stored)

        wait_until(flushed, 5, "the call's record and steps in the JSON-lines logs")
        for path in sorted((system.root / "logs").iterdir()):
            outputs[path.name] = path.read_text(errors="replace")
        assert {"traces.jsonl", "calls.jsonl", "front.log"} <= set(outputs), sorted(outputs)
        assert any(name.startswith("media") for name in outputs), sorted(outputs)
        assert any(name.startswith("ivr") for name in outputs), sorted(outputs)
        found = {name: leaks(text) for name, text in outputs.items() if leaks(text)}
        assert found == {}, found
    finally:
        events.close()
        pub.close()


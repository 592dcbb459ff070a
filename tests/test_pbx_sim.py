"""`pbx-sim` against real providers: the reference provider as a real process (the
console script's module run as a subprocess), and small aiohttp providers in the test
that misbehave (schema violations, slowness, 500, not JSON), run in the same loop as
the simulator. Output and exit codes are checked.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pbx.sim import cli
from pbx.sim.scenario import ScenarioError, parse, parse_duration
from tests.provider_process import free_tcp_port, provider_process

ROOT = Path(__file__).resolve().parent.parent

PROVIDER = ROOT / "examples" / "step_ivr_provider.py"
GUIDE = ROOT / "docs" / "simulator.md"
WELCOME_MENU = {
    "type": "prompt", "file": "sounds/welcome.wav", "interruptible": True,
    "next": {"type": "dtmf_menu", "greeting": "sounds/menu.wav", "timeout_ms": 5000,
             "entries": {"1": {"type": "transfer", "target": "2001"}}},
}


@pytest.fixture(scope="module")
def reference_url() -> Iterator[str]:
    with provider_process(PROVIDER) as url:
        yield url


def pbx_sim(*args: str) -> subprocess.CompletedProcess[str]:
    """The console script's code (`pbx.sim.cli:main`) as a process, from the project root."""
    return subprocess.run([sys.executable, "-m", "pbx.sim.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- the reference provider


def test_command_line_press_wait_hangup(reference_url: str) -> None:
    run = pbx_sim(reference_url, "--press", "1", "--wait", "2s", "--press", "9", "--hangup",
                  "--expect-end-reason", "Transfer(2001)")
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "♪ plays sounds/welcome.wav, 1.7 s, interruptible" in out  # its real length
    assert "caller presses 1 (stops the prompt)" in out
    assert "menu entry '1'" in out and "➜ transfers the call to 2001" in out
    assert "(the call is over: the script's wait and what follows are not run)" in out
    assert "✓ expect end_reason 'Transfer(2001)'" in out
    assert out.rstrip().endswith("command line: ok")


def test_failed_expectation_exits_1(reference_url: str) -> None:
    run = pbx_sim(reference_url, "--press", "2", "--expect-end-reason", "Transfer(2001)",
                  "--expect-event", '{"type": "dtmf_menu_invalid"}')
    assert run.returncode == 1, run.stdout + run.stderr
    assert "➜ puts the caller in queue support" in run.stdout
    assert "✗ expect end_reason 'Transfer(2001)'" in run.stdout
    assert "expectation not met: event {'type': 'dtmf_menu_invalid'}" in run.stdout
    assert "command line: FAILED" in run.stdout


def test_the_guides_scenario_runs(reference_url: str, tmp_path: Path) -> None:
    """The YAML example of docs/simulator.md, as printed there."""
    text = re.search(r"```yaml\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)
    assert text is not None
    scenario = tmp_path / "reference.yaml"
    scenario.write_text(text.group(1))
    run = pbx_sim("--scenario", str(scenario), reference_url)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(": ok\n") == 3
    assert "✗" not in run.stdout
    assert '{"event":{"type":"dtmf_menu_invalid","digit":"7"}}' in run.stdout
    assert "[  36.453s] no key pressed: timeout" in run.stdout  # the third strike
    # The same scenario, one expectation changed: exit 1, the others still checked.
    scenario.write_text(text.group(1).replace("end_reason: Queue(support)",
                                              "end_reason: Queue(sales)"))
    run = pbx_sim("--scenario", str(scenario), reference_url)
    assert run.returncode == 1
    assert "a wrong key, then 2 for the support queue: FAILED" in run.stdout
    assert run.stdout.count(": ok\n") == 2


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("calls:\n  - steps:\n      - press: x\n")
    run = pbx_sim("--scenario", str(bad), "http://127.0.0.1:9/ivr/step")
    assert run.returncode == 2
    assert "bad.yaml: calls.0.steps: step 0: press: DTMF keys are 0-9, *, #, A-D; got 'x'" \
        in run.stderr
    assert pbx_sim("--press", "1").returncode == 2  # no URL
    run = pbx_sim("ftp://x/ivr", "--press", "1")
    assert run.returncode == 2 and "must be an http(s) URL" in run.stderr
    run = pbx_sim("http://127.0.0.1:9/ivr", "--route", "x")
    assert run.returncode == 2 and "--route needs --config" in run.stderr


# ---------------------------------------------------------------- misbehaving providers

Handler = Callable[[dict[str, Any], web.Request], Awaitable[web.StreamResponse]]


async def _simulate(
    handler: Handler, *args: str, scenario: Path | None = None, yaml_text: str = "",
    config: Path | None = None, toml_text: str = "", url: bool = True,
) -> tuple[int, str, list[dict[str, Any]]]:
    """Serve `handler` as the provider (every path but /start, /end, /dtmf-match, which
    are answered 200) and run pbx-sim against it in this loop, with `yaml_text` as the
    scenario and `toml_text` as `--config` if given (their `{port}` filled in), and the
    provider's URL on the command line unless `url` is false. Returns the exit code, the
    output, and the step requests the provider got."""
    seen: list[dict[str, Any]] = []

    async def step(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if request.path.endswith(("/start", "/end", "/dtmf-match")):
            return web.json_response({"status": "ok"})
        seen.append({"body": body, "headers": dict(request.headers), "path": request.path})
        return await handler(body, request)

    app = web.Application()
    app.router.add_post("/{tail:.*}", step)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_tcp_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    lines: list[str] = []
    if scenario is not None:
        scenario.write_text(yaml_text.replace("{port}", str(port)))
        args = ("--scenario", str(scenario), *args)
    if config is not None:
        config.write_text(toml_text.replace("{port}", str(port)))
        args = ("--config", str(config), *args)
    command = [f"http://127.0.0.1:{port}/ivr/step"] if url else []
    try:
        code = await cli.amain([*command, *args], lines.append)
    finally:
        await runner.cleanup()
    return code, "\n".join(lines), seen


def _answers(*answers: object) -> Handler:
    queue = list(answers)

    async def handler(body: dict[str, Any], request: web.Request) -> web.StreamResponse:
        answer = queue.pop(0) if queue else {"type": "hangup"}
        return web.json_response(answer)

    return handler


def test_schema_violation_exits_3() -> None:
    code, out, _ = asyncio.run(_simulate(_answers(
        {"type": "prompt", "file": "sounds/welcome.wav",
         "next": {"type": "dtmf_menu", "entries": {"1": {"type": "transfer", "target": 2001}}}},
    ), "--press", "1"))
    assert code == cli.EXIT_PROTOCOL, out
    # The PBX runs it (it accepts a number there) but the schema says string.
    assert "✗ schema violation: next.entries.1.target: 2001 is not of type 'string'" in out
    assert "➜ transfers the call to 2001" in out
    assert "command line: PROTOCOL PROBLEMS" in out


def test_action_the_pbx_cannot_run_is_reported() -> None:
    code, out, seen = asyncio.run(_simulate(_answers(
        {"type": "prompt", "file": "sounds/invalid.wav", "next": {"type": "repeat"}},
    )))
    assert code == cli.EXIT_PROTOCOL, out
    assert "✗ schema violation: next.type: 'repeat' is not one of" in out
    assert "✗ error: tree-mode only action type 'repeat'" in out
    assert "♪ plays sounds/error.wav" in out and "(end: Error(tree-mode only" in out
    assert len(seen) == 1


def test_recorded_error_fails_unless_expected() -> None:
    # `next` on a dtmf_menu is ignored: the PBX records that as the step's error.
    answers = ({"type": "dtmf_menu", "greeting": "sounds/menu.wav",
                "entries": {"1": {"type": "hangup"}}, "next": {"type": "hangup"}},)
    code, out, _ = asyncio.run(_simulate(_answers(*answers), "--press", "1"))
    # Nothing expects it by name: exit 3.
    assert code == cli.EXIT_PROTOCOL, out
    assert "PBX error: dtmf_menu: `next` is not followed" in out
    code, out, _ = asyncio.run(_simulate(_answers(*answers), "--press", "1",
                                         "--expect-error", "`next` is not followed"))
    assert code == cli.EXIT_OK, out
    assert "✓ expect error '`next` is not followed'" in out


def test_no_tts_error_is_the_simulations_not_the_providers(tmp_path: Path) -> None:
    """Without text to speech (--no-tts, or a call's `options: {tts: false}`) a provider
    that handles the `error` event keeps the protocol: exit 0 without --expect-error."""
    answers = ({"type": "prompt", "tts_text": "Hello"},
               {"type": "transfer", "target": "operator"})
    expect_event = ("--expect-event", '{"type": "error", "reason": "TTS service not available"}')
    code, out, _ = asyncio.run(_simulate(_answers(*answers), "--no-tts", *expect_event))
    assert code == cli.EXIT_OK, out
    assert "✗ error: tts: TTS service not available" in out  # still shown
    assert "PBX error" not in out
    yaml_text = """
calls:
  - name: speaks
    expect: [{said: Hello}]
  - name: no tts here
    options: {tts: false, prompt_ms: 100}
    expect: [{event: {type: error, reason: TTS service not available}}]
"""
    code, out, seen = asyncio.run(_simulate(_answers(*answers, *answers),
                                            scenario=tmp_path / "s.yaml", yaml_text=yaml_text))
    assert code == cli.EXIT_OK, out
    assert "speaks: ok" in out and "no tts here: ok" in out
    assert [x["body"]["event"]["type"] for x in seen] == [
        "session_start", "audio_complete", "session_start", "error"]
    with pytest.raises(ScenarioError, match=r"calls\.0\.options.*tts"):
        parse({"calls": [{"options": {"tts": "maybe"}}]}, "s.yaml")


def test_api_line_shows_what_is_sent() -> None:
    """`→ api` shows the query string (GET) or the JSON body (POST) the variables make."""

    api_responses: list[str] = []

    async def provider(body: dict[str, Any], request: web.Request) -> web.StreamResponse:
        event = body["event"]["type"]
        url = f"http://{request.host}/crm"
        if event == "session_start":
            return web.json_response({"type": "collect_dtmf", "min_digits": 1, "max_digits": 1,
                                      "next": {"type": "api", "url": url + "?v=1",
                                               "variables": "dtmf_input,caller"}})
        if event == "api_response":
            api_responses.append(body["variables"]["api_status"])
            if len(api_responses) == 2:
                return web.json_response({"type": "hangup"})
        return web.json_response({"type": "api", "url": url, "method": "POST",
                                  "variables": "dtmf_input"})

    code, out, _ = asyncio.run(_simulate(provider, "--press", "3"))
    assert code == cli.EXIT_OK, out
    assert "→ api GET http://127.0.0.1:" in out
    assert "/crm?v=1&dtmf_input=3&caller=1001" in out
    assert '→ api POST http://127.0.0.1:' in out and '/crm body {"dtmf_input":"3"}' in out


def test_http_500_runs_the_fallback_and_exits_3() -> None:
    async def broken(body: dict[str, Any], request: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text="boom")

    code, out, seen = asyncio.run(_simulate(
        broken, "--retries", "2", "--fallback", '{"type": "transfer", "target": "operator"}'))
    assert code == cli.EXIT_PROTOCOL, out
    assert len(seen) == 3  # the executor's retry policy: 1 + max_retries
    assert [f"! attempt {n}: HTTP 500" in out for n in (1, 2, 3)] == [True] * 3
    assert "✗ provider failed: HTTP 500; gave up after 3 attempt(s)" in out
    assert "➜ transfers the call to operator" in out


def test_not_json_exits_3() -> None:
    async def text(body: dict[str, Any], request: web.Request) -> web.StreamResponse:
        return web.Response(text="hello", content_type="text/plain")

    code, out, _ = asyncio.run(_simulate(text))
    assert code == cli.EXIT_PROTOCOL
    assert "✗ provider not JSON" in out and "(body: 'hello')" in out


def test_slow_answer_warns_or_fails() -> None:
    async def slow(body: dict[str, Any], request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.3)
        return web.json_response({"type": "hangup"})

    code, out, _ = asyncio.run(_simulate(slow, "--slow-ms", "100"))
    assert code == cli.EXIT_OK, out
    assert "! slow answer:" in out and "1 slow answer(s) (warning" in out
    code, out, _ = asyncio.run(_simulate(slow, "--slow-ms", "100", "--fail-on-slow"))
    assert code == cli.EXIT_PROTOCOL
    # Too slow for the route's timeout: retried, then the fallback.
    code, out, seen = asyncio.run(_simulate(slow, "--timeout-ms", "100", "--retries", "1"))
    assert code == cli.EXIT_PROTOCOL and len(seen) == 2
    assert "! attempt 1: timeout after 100 ms" in out


def test_route_options_reach_the_provider() -> None:
    code, out, seen = asyncio.run(_simulate(
        _answers({"type": "collect_dtmf", "min_digits": 3, "max_digits": 4, "terminator": "#",
                  "prompt": "sounds/menu.wav"},
                 {"type": "transfer", "target": "$dtmf_input$"}),
        "--caller", "555", "--callee", "*99", "--header", "Authorization: Bearer t0k",
        "--app-param", "ivr_id=proj_42", "--app-param", 'tenant_id="acme"',
        "--app-param", "compat_future_key=1", "--var", "customer=gold",
        "--sip-header", "X-Account: 42", "--wait", "idle", "--press", "123#",
        "--expect-action", '{"type": "transfer", "target": "123"}',
        "--expect-end-reason", "Transfer(123)",
    ))
    assert code == cli.EXIT_OK, out
    first = seen[0]
    assert first["headers"]["Authorization"] == "Bearer t0k"
    body = first["body"]
    assert (body["caller"], body["callee"], body["ivr_id"], body["tenant_id"]) == (
        "555", "*99", "proj_42", "acme")
    assert body["variables"]["customer"] == "gold"
    assert body["variables"]["sip_X-Account"] == "42"
    assert "app_params key 'compat_future_key' is not known to this PBX: ignored" in out
    assert "= variables: dtmf_input='123'" in out
    assert "⏱ waits up to 5 s" in out


def test_recording_ends_on_hash_and_reports_it() -> None:
    code, out, seen = asyncio.run(_simulate(
        _answers({"type": "torecord", "beep": True, "max_duration_secs": 30}),
        "--wait", "4s", "--press", "#", "--expect-event", '{"type": "recording_complete"}',
    ))
    assert code == cli.EXIT_OK, out
    assert "● records the caller to recordings/" in out and "up to 30 s" in out
    event = seen[1]["body"]["event"]
    assert event["type"] == "recording_complete" and event["duration_secs"] == 4


def test_tts_text_is_reported_as_speech() -> None:
    code, out, _ = asyncio.run(_simulate(
        _answers({"type": "prompt", "tts_text": "Your balance is 12 dollars"}),
        "--prompt-ms", "1500",
    ))
    assert code == cli.EXIT_OK, out
    assert "♪ says 'Your balance is 12 dollars' (text to speech), 1.5 s" in out
    assert '{"event":{"type":"audio_complete","interrupted":false}}' in out


def test_a_provider_that_never_ends_is_hung_up() -> None:
    menu = {"type": "dtmf_menu", "greeting": "sounds/menu.wav", "timeout_ms": 1000,
            "entries": {"1": {"type": "hangup"}}}

    async def forever(body: dict[str, Any], request: web.Request) -> web.StreamResponse:
        return web.json_response(menu)

    code, out, seen = asyncio.run(_simulate(forever, "--max-call", "30s"))
    assert code == cli.EXIT_OK, out
    assert "still in the IVR after 30 s: the caller hangs up" in out
    assert "(end: Hangup)" in out and len(seen) > 3


def test_every_terminal_outcome_and_jump_ivr(tmp_path: Path) -> None:
    """A scenario of several calls, one per way out of the IVR, and a jump to a second
    provider path through the scenario's `ivrs`."""

    async def provider(body: dict[str, Any], request: web.Request) -> web.StreamResponse:
        event = body["event"]
        if request.path == "/ivr/other":
            return web.json_response({"type": "route_to_agent", "target": "9200",
                                      "skill_group_id": body["variables"].get("group")})
        flow = body["variables"]["flow"]
        if event["type"] == "session_start":
            first = {
                "voicemail": {"type": "voicemail", "target": "2001"},
                "jump": {"type": "jump_ivr", "route_point": "other",
                         "params": {"group": "sales"}},
                "phone": {"type": "input_phone", "prompt": "sounds/menu.wav"},
                "api": {"type": "api", "url": "http://127.0.0.1:1/none", "timeout": 1},
                "voice": {"type": "input_voice", "scene": "order"},
            }[flow]
            return web.json_response(first)
        if event["type"] == "phone_collected":
            return web.json_response({"type": "voip_bridge", "create_room_uri": "wss://r/1"})
        if event["type"] == "api_response":
            return web.json_response({"type": "play_and_hangup", "prompt": "goodbye.wav",
                                      "code": 486})
        return web.json_response({"type": "queue", "target": "support", "return_to_ivr": True})

    yaml_text = """
ivrs:
  other: {url: "http://127.0.0.1:{port}/ivr/other"}
calls:
  - name: voicemail
    variables: {flow: voicemail}
    steps: [wait idle, press "#"]
    expect:
      - played: voicemail_greeting.wav
      - end_reason: Voicemail(2001)
  - name: jump
    variables: {flow: jump}
    expect:
      - action: {type: route_to_agent, target: "9200", skill_group_id: sales}
      - end_reason: Jump(other)
      - end_reason: Agent(9200)
  - name: phone
    variables: {flow: phone}
    steps: [wait idle, press 13800138000]
    expect:
      - event: {type: phone_collected, number: "13800138000"}
      - variables: {phone_number: "13800138000"}
      - end_reason: VoipBridge
  - name: api
    variables: {flow: api}
    expect:
      - event: {type: api_response, status: 0}
      - end_reason: Normal
  - name: voice
    variables: {flow: voice}
    expect:
      - event: {type: error}
      - end_reason: Queue(support)
"""
    code, out, seen = asyncio.run(_simulate(provider, scenario=tmp_path / "s.yaml",
                                            yaml_text=yaml_text))
    assert code == cli.EXIT_OK, out
    assert out.count(": ok\n") + out.endswith(": ok") == 5
    assert "● records the caller to voicemail/2001/" in out
    assert "recording ended (dtmf" in out
    assert "➜ routes the call to agent 9200 (skill group sales)" in out
    assert "➜ bridges the call's audio to wss://r/1" in out
    assert out.count("⏱ waits up to 5 s") == 1  # each key restarts it silently
    assert "☎ the PBX hangs up with 486 (Normal)" in out
    assert "→ api GET http://127.0.0.1:1/none" in out
    assert "➜ puts the caller in queue support; back to this IVR if no agent answers" in out
    assert [x["path"] for x in seen].count("/ivr/other") == 1


def test_route_and_ivrs_from_a_config_file(tmp_path: Path) -> None:
    async def provider(body: dict[str, Any], request: web.Request) -> web.StreamResponse:
        if request.path == "/ivr/other":
            return web.json_response({"type": "transfer", "target": "2001"})
        return web.json_response({"type": "jump_ivr", "route_point": "other"})

    toml_text = """
[[routes]]
name = "support_line"
to_user = "*99"
app = "ivr"
app_params = { mode = "step", url = "http://127.0.0.1:{port}/ivr/step", headers = { Authorization = "Bearer cfg" }, ivr_id = "proj_cfg" }

[ivrs.other]
url = "http://127.0.0.1:{port}/ivr/other"
ivr_id = "proj_other"
"""
    code, out, seen = asyncio.run(_simulate(
        provider, "--route", "support_line", "--header", "X-Extra: 1",
        config=tmp_path / "pbx.toml", toml_text=toml_text, url=False,
        ))
    assert code == cli.EXIT_OK, out
    first, jumped = seen
    assert first["path"] == "/ivr/step" and first["body"]["ivr_id"] == "proj_cfg"
    assert first["headers"]["Authorization"] == "Bearer cfg"
    assert first["headers"]["X-Extra"] == "1"
    assert jumped["path"] == "/ivr/other" and jumped["body"]["ivr_id"] == "proj_other"
    assert "(end: Jump(other))" in out and "(end: Transfer(2001))" in out
    code, out, _ = asyncio.run(_simulate(
        provider, "--route", "nope", config=tmp_path / "pbx.toml", toml_text=toml_text))
    assert code == cli.EXIT_USAGE


# ---------------------------------------------------------------- scenario parsing


def test_durations() -> None:
    assert [parse_duration(x) for x in ("2s", "500ms", "1.5", "1m", 3)] == [2, 0.5, 1.5, 60, 3]
    for bad in ("2h", "-1s", "soon", True):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_scenario_errors_name_the_key() -> None:
    with pytest.raises(ScenarioError, match=r"calls\.0\.expect\.0.*exactly one"):
        parse({"calls": [{"expect": [{"event": {"type": "dtmf"}, "end_reason": "Normal"}]}]},
              "s.yaml")
    with pytest.raises(ScenarioError, match=r"calls: .*at least 1"):
        parse({"calls": []}, "s.yaml")
    with pytest.raises(ScenarioError, match="unknown_key"):
        parse({"unknown_key": 1, "calls": [{}]}, "s.yaml")
    scenario = parse({"calls": [{"steps": ["wait idle", "press 12", "hangup"]}]}, "s.yaml")
    assert [s.model_dump() for s in scenario.calls[0].steps] == [
        {"wait": "idle"}, {"press": "12"}, {"hangup": True}]
    assert json.loads(scenario.model_dump_json())["options"]["slow_ms"] == 500

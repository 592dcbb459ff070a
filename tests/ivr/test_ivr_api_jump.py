"""api and jump_ivr on the machine, virtual clock (DESIGN §3). The HTTP side of `api`
is scripted here; `test_ivr_executor_actions.py` runs it against real servers."""

from __future__ import annotations

from typing import Any

import orjson

from pbx.config import IvrAppParams
from pbx.ivr import machine
from pbx.ivr.requests import ApiResult
from pbx.messages import HangupCommand, TransferCommand
from tests.ivr.sim import URL, Answer, Sim, play

HANGUP = {"type": "hangup"}


def assert_error_hangup(sim: Sim, commands: list[Any], fragment: str, play_id: int = 1) -> None:
    assert commands == [play(play_id, machine.ERROR_PROMPT)]
    error = sim.traces[-1].error
    assert error is not None and fragment in error, error
    n_sent = len(sim.sent)
    assert sim.audio_done(play_id) == [HangupCommand(reason=sim.notified_body("end")["reason"])]
    assert len(sim.sent) == n_sent
    assert sim.done
    assert fragment in sim.notified_body("end")["reason"]


# ---------------------------------------------------------------- api


def test_api_get_sends_variables_as_query_then_api_response() -> None:
    action = {
        "type": "api",
        "url": "http://api.test/users/$caller$",
        "method": "get",
        "headers": {"X-Token": "tok-$sip_X-Customer$"},
        "variables": "caller, sip_X-Customer,missing",
        "timeout": 3,
    }
    sim = Sim([action, HANGUP], api_answers=[ApiResult(200, {"balance": 100})])
    assert sim.start() == [HangupCommand(reason="Normal")]
    (request,) = sim.api_sent
    assert request.kind == "api"
    assert request.method == "GET"
    assert request.url == "http://api.test/users/1001"
    assert request.headers == {"X-Token": "tok-gold"}
    # Named variables go in the query string; unset names are left out.
    assert request.query == {"caller": "1001", "sip_X-Customer": "gold"}
    assert request.timeout_s == 3.0
    assert sim.events == [
        {"type": "session_start"},
        {"type": "api_response", "status": 200, "body": {"balance": 100}},
    ]
    variables = sim.sent[-1]["variables"]
    assert variables["api_status"] == "200"
    assert orjson.loads(variables["api_result"]) == {"balance": 100}
    api_trace = sim.traces[1]
    assert api_trace.trigger == "api_response" and api_trace.action_type == "api"
    assert api_trace.request == {
        "method": "GET",
        "url": "http://api.test/users/1001",
        "query": {"caller": "1001", "sip_X-Customer": "gold"},
    }
    assert api_trace.duration_ms > 0


def test_api_post_sends_variables_as_json_body() -> None:
    answers: list[Any] = [
        {"type": "prompt", "file": "a.wav", "variables": {"user_phone": "13800138000"}},
        {
            "type": "api",
            "url": "http://api.test/orders",
            "method": "POST",
            "variables": "user_phone",
        },
        HANGUP,
    ]
    sim = Sim(answers, api_answers=[ApiResult(201, "created")])
    sim.start()
    sim.audio_done(1)
    (request,) = sim.api_sent
    assert (request.method, request.query) == ("POST", None)
    assert request.body == {"user_phone": "13800138000"}
    assert request.timeout_s == 10.0  # default, seconds
    assert sim.events[-1] == {"type": "api_response", "status": 201, "body": "created"}
    # A text body as it came (it used to arrive JSON-encoded, '"created"').
    assert sim.sent[-1]["variables"]["api_result"] == "created"


def test_api_network_error_gives_status_0() -> None:
    error = {"error": "ClientConnectorError: cannot connect"}
    sim = Sim(
        [{"type": "api", "url": "http://api.test/x"}, HANGUP], api_answers=[ApiResult(0, error)]
    )
    sim.start()
    assert sim.events[-1] == {"type": "api_response", "status": 0, "body": error}
    assert sim.sent[-1]["variables"]["api_status"] == "0"


def test_api_dynamic_tree_is_executed_without_provider_call() -> None:
    tree = {"type": "prompt", "file": "dyn_$caller$.wav", "step_id": "d1"}
    action = {"type": "api", "url": "http://api.test/tree", "get_dynamic_tree": True}
    sim = Sim([action], api_answers=[ApiResult(200, tree)])
    assert sim.start() == [play(1, "dyn_1001.wav")]
    assert len(sim.sent) == 1
    assert sim.variables["api_status"] == "200"
    trace = sim.traces[-1]
    assert trace.action_type == "prompt" and trace.action == tree and trace.step_id == "d1"


def test_api_dynamic_tree_parse_error_is_the_error_path() -> None:
    action = {"type": "api", "url": "http://api.test/tree", "get_dynamic_tree": True}
    sim = Sim([action], api_answers=[ApiResult(200, {"type": "bogus"})])
    commands = sim.start()
    assert_error_hangup(sim, commands, "api: dynamic tree: unknown action type 'bogus'")


def test_api_dynamic_tree_not_fetched_is_the_error_path() -> None:
    action = {"type": "api", "url": "http://api.test/tree", "get_dynamic_tree": True}
    sim = Sim([action], api_answers=[ApiResult(0, {"error": "timeout after 10 s"})])
    commands = sim.start()
    assert_error_hangup(sim, commands, "timeout after 10 s")


def test_api_next_is_followed_locally() -> None:
    action = {
        "type": "api",
        "url": "http://api.test/route",
        "next": {"type": "transfer", "target": "q-$api_status$"},
    }
    sim = Sim([action], api_answers=[ApiResult(404, None)])
    assert sim.start() == [TransferCommand(target="q-404")]
    assert len(sim.sent) == 1


def test_api_dynamic_tree_loop_is_bounded() -> None:
    loop = {"type": "api", "url": "http://api.test/tree", "get_dynamic_tree": True}
    sim = Sim([loop], api_answers=[ApiResult(200, loop)] * 40)
    commands = sim.start()
    assert len(sim.api_sent) == machine.MAX_CHAINED_STEPS - 1
    assert_error_hangup(sim, commands, "provider steps without a call event")


# ---------------------------------------------------------------- jump_ivr

SALES_URL = "http://sales.test/ivr"
IVRS = {"sales": IvrAppParams(url=SALES_URL, tenant_id="t2", ivr_id="sales_ivr")}


def test_jump_ivr_ends_session_and_starts_the_other_ivr_with_params() -> None:
    first: list[Answer] = [
        {"type": "prompt", "file": "a.wav", "variables": {"secret": "x"}},
        {"type": "jump_ivr", "route_point": "sales", "params": {"order": 42, "who": "$caller$"}},
    ]
    sim = Sim(
        first,
        ivrs=IVRS,
        urls={SALES_URL: [{"type": "prompt", "file": "sales.wav"}, HANGUP]},
    )
    sim.start()
    assert sim.audio_done(1) == [play(2, "sales.wav")]
    assert not sim.done
    assert [(kind, url) for kind, url, _ in sim.notified] == [
        ("start", URL + "/start"),
        ("end", URL + "/end"),
        ("start", SALES_URL + "/start"),
    ]
    assert sim.notified[1][2] == {"reason": "Jump(sales)", "session_id": "sess-1"}
    assert sim.notified[2][2] == {
        "session_id": "sess-1",
        "caller": "1001",
        "callee": "*99",
        "direction": "inbound",
        "tenant_id": "t2",
        "ivr_id": "sales_ivr",
    }
    assert sim.sent_urls == [URL, URL, SALES_URL]
    ctx = sim.sent[-1]
    assert ctx["event"] == {"type": "session_start"}
    assert (ctx["tenant_id"], ctx["ivr_id"]) == ("t2", "sales_ivr")
    # Fresh variables plus the params; the first IVR's own variables are not carried.
    assert ctx["variables"] == {
        "session_id": "sess-1",
        "caller": "1001",
        "callee": "*99",
        "direction": "inbound",
        "tenant_id": "t2",
        "sip_X-Customer": "gold",
        "order": "42",
        "who": "1001",
    }
    jump_trace = sim.traces[-2]
    assert jump_trace.action_type == "jump_ivr" and jump_trace.end_reason == "Jump(sales)"
    assert sim.traces[-1].trigger == "session_start" and sim.traces[-1].action_type == "prompt"
    # The new IVR runs on: its prompt's end goes to its own provider.
    assert sim.audio_done(1) == []  # stale: the first IVR's prompt
    assert sim.audio_done(2) == [HangupCommand(reason="Normal")]
    assert sim.sent_urls[-1] == SALES_URL
    assert sim.events[-1] == {"type": "audio_complete", "interrupted": False}
    assert sim.notified[-1] == (
        "end",
        SALES_URL + "/end",
        {"reason": "Normal", "session_id": "sess-1"},
    )


def test_jump_ivr_keeps_the_front_facts_about_the_call_not_the_return_reason() -> None:
    first: list[Answer] = [{"type": "jump_ivr", "route_point": "sales"}]
    sim = Sim(first, ivrs=IVRS, urls={SALES_URL: [HANGUP]})
    sim.call = sim.call.model_copy(update={"variables": {
        "caller_trust": "anonymous", "transferred_from": "queue", "return_reason": "no_answer"}})
    sim.start()
    first_vars, sales_vars = sim.sent[0]["variables"], sim.sent[-1]["variables"]
    assert first_vars["return_reason"] == "no_answer"
    assert sales_vars["caller_trust"] == "anonymous"
    assert sales_vars["transferred_from"] == "queue"
    assert "return_reason" not in sales_vars


def test_jump_ivr_from_a_menu_entry() -> None:
    menu = {
        "type": "dtmf_menu",
        "greeting": "menu.wav",
        "entries": {"2": {"type": "jump_ivr", "route_point": "sales"}},
    }
    sim = Sim([menu], ivrs=IVRS, urls={SALES_URL: [{"type": "prompt", "file": "sales.wav"}]})
    sim.start()
    assert sim.digit("2", stopped=1) == [play(2, "sales.wav")]
    assert sim.kinds() == ["start", "dtmf_match", "end", "start"]
    assert sim.notified_body("end")["reason"] == "Jump(sales)"
    jump_trace = sim.traces[-2]
    assert jump_trace.trigger == "dtmf" and jump_trace.action_type == "jump_ivr"
    assert jump_trace.end_reason == "Jump(sales)"


def test_jump_ivr_unknown_route_point_is_the_error_path() -> None:
    sim = Sim([{"type": "jump_ivr", "route_point": "nowhere"}], ivrs=IVRS)
    commands = sim.start()
    assert_error_hangup(sim, commands, "jump_ivr: unknown route point 'nowhere'")
    assert sim.kinds() == ["start", "end"]


def test_jump_ivr_without_ivrs_table_is_the_error_path() -> None:
    sim = Sim([{"type": "jump_ivr", "route_point": "sales"}])
    commands = sim.start()
    assert_error_hangup(sim, commands, "unknown route point 'sales'")


def test_jump_ivr_loop_is_bounded() -> None:
    ivrs = {"a": IvrAppParams(url=URL), "b": IvrAppParams(url=SALES_URL)}
    sim = Sim(
        lambda body: {"type": "jump_ivr", "route_point": "b"},
        ivrs=ivrs,
        urls={SALES_URL: lambda body: {"type": "jump_ivr", "route_point": "a"}},
    )
    commands = sim.start()
    assert len(sim.sent) == machine.MAX_CHAINED_STEPS
    assert commands == [play(1, machine.ERROR_PROMPT)]
    assert "provider steps without a call event" in (sim.traces[-1].error or "")


def test_jump_ivr_with_params_past_the_variables_bound_fails_before_jumping() -> None:
    """Params become the new session's variables: past MAX_VARIABLES_CHARS the state
    could not travel; the session fails where it is, the other IVR is never asked."""
    first: list[Answer] = [
        {"type": "jump_ivr", "route_point": "sales", "params": {"v": "x" * 70_000}}]
    sim = Sim(first, ivrs=IVRS, urls={SALES_URL: [HANGUP]})
    assert [c.file for c in sim.start() if hasattr(c, "file")] == ["sounds/error.wav"]
    assert len(sim.sent) == 1  # the session start of the first IVR only
    sim.audio_done(1)
    assert sim.done and "variables over" in sim.notified_body("end")["reason"]

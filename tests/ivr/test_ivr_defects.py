"""Issue 10 item 7: the smaller defects, each pinned by a test that fails without its
fix (max_retries: tests/ivr/test_ivr_compat.py; api_result of a text body:
tests/ivr/test_ivr_api_jump.py too)."""

from __future__ import annotations

from typing import Any

import pytest

from pbx.config import ConfigError, parse_config
from pbx.ivr.actions.api import NEXT_WITH_TREE
from pbx.ivr.actions.menu import NEXT_ON_MENU
from pbx.ivr.models import ActionError, parse_action
from pbx.ivr.requests import ApiResult
from tests.ivr.sim import Sim

HANGUP = {"type": "hangup"}


# ---------------------------------------------------------------- api_result


@pytest.mark.parametrize(("body", "text"), [
    ("plain text", "plain text"),
    ({"balance": 100}, '{"balance":100}'),
    ([1, 2], "[1,2]"),
    (None, ""),  # an empty body
])
def test_api_result_is_the_body_as_text(body: Any, text: str) -> None:
    sim = Sim([{"type": "api", "url": "http://api.test/x"}, HANGUP],
              api_answers=[ApiResult(200, body)])
    sim.start()
    assert sim.sent[-1]["variables"]["api_result"] == text
    assert sim.events[-1] == {"type": "api_response", "status": 200, "body": body}


# ---------------------------------------------------------------- api timeout 0


def test_api_timeout_0_is_accepted_and_means_the_default() -> None:
    action = parse_action({"type": "api", "url": "http://api.test/x", "timeout": 0})
    assert action.type == "api" and action.timeout == 0
    sim = Sim([{"type": "api", "url": "http://api.test/x", "timeout": 0}, HANGUP],
              api_answers=[ApiResult(200, {})])
    sim.start()
    assert sim.api_sent[0].timeout_s == 10.0
    with pytest.raises(Exception, match="timeout"):
        parse_action({"type": "api", "url": "http://api.test/x", "timeout": -1})


# ---------------------------------------------------------------- extra: null


def test_explicit_null_extra_clears_it_and_absent_extra_keeps_it() -> None:
    sim = Sim([
        {"type": "prompt", "file": "a.wav", "extra": {"flow": "f1"}},
        {"type": "prompt", "file": "b.wav"},  # no extra: the latest is kept
        {"type": "prompt", "file": "c.wav", "extra": None},  # cleared
        HANGUP,
    ])
    sim.start()
    sim.audio_done(1)
    sim.audio_done(2)
    sim.audio_done(3)
    extras = [t.extra for t in sim.traces if t.trigger != "session_start"]
    assert sim.traces[0].extra == {"flow": "f1"}
    assert extras[:2] == [{"flow": "f1"}, None], extras


# ---------------------------------------------------------------- next, where it cannot be followed


def test_next_on_dtmf_menu_is_said_in_the_trace() -> None:
    menu = {"type": "dtmf_menu", "greeting": "menu.wav",
            "entries": {"1": {"type": "transfer", "target": "2001"}},
            "next": {"type": "prompt", "file": "never.wav"}}
    sim = Sim([menu])
    sim.start()
    assert sim.traces[-1].error == NEXT_ON_MENU
    # The menu itself runs as usual.
    sim.audio_done(1)
    assert not sim.done


def test_next_on_api_with_dynamic_tree_is_said_in_the_trace() -> None:
    api = {"type": "api", "url": "http://api.test/tree", "get_dynamic_tree": True,
           "next": {"type": "prompt", "file": "never.wav"}}
    sim = Sim([api], api_answers=[ApiResult(200, {"type": "prompt", "file": "tree.wav"})])
    commands = sim.start()
    assert [c.file for c in commands if hasattr(c, "file")] == ["tree.wav"]
    assert sim.traces[-1].error == NEXT_WITH_TREE


# ---------------------------------------------------------------- retry.fallback at start-up

ROUTE = '[[routes]]\nname = "r"\nto_user = "1"\napp_params = {{ url = "http://x", {params} }}\n'


@pytest.mark.parametrize(("fallback", "reason"), [
    ('{ type = "transfr", target = "operator" }', "unknown action type 'transfr'"),
    ('{ type = "transfer" }', "transfer: missing required field 'target'"),
    ('{ type = "repeat" }', "tree-mode only action type 'repeat'"),
    ('{ target = "operator" }', "action has no 'type' field"),
])
def test_bad_retry_fallback_stops_start_up(fallback: str, reason: str) -> None:
    text = ROUTE.format(params=f"retry = {{ fallback = {fallback} }}")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/pbx.toml")
    message = str(info.value)
    assert message.startswith("/etc/pbx.toml: ")
    assert "key routes[0].app_params.retry.fallback:" in message
    assert reason in message


def test_bad_retry_fallback_of_a_named_ivr_stops_start_up() -> None:
    text = '[ivrs.sales]\nurl = "http://x"\nretry = { fallback = { type = "queue" } }\n'
    with pytest.raises(ConfigError, match=r"key ivrs\.sales\.retry\.fallback: .*'target'"):
        parse_config(text, "f.toml")


def test_good_retry_fallback_is_kept() -> None:
    text = ROUTE.format(params='retry = { fallback = { type = "transfer", target = "op" } }')
    settings = parse_config(text, "f.toml")
    assert settings.routes[0].app_params.retry.fallback == {"type": "transfer",
                                                             "target": "op"}


# ---------------------------------------------------------------- record_name_list


def test_prompt_with_only_record_name_list_plays_each_part_then_completes() -> None:
    sim = Sim([{"type": "prompt", "record_name_list": "rec/part1.wav, rec/$caller$.wav,"},
               HANGUP])
    assert [c.file for c in sim.start()] == ["rec/part1.wav"]
    assert [c.file for c in sim.audio_done(1)] == ["rec/1001.wav"]
    assert len(sim.sent) == 1  # one prompt: no provider step between its parts
    sim.audio_done(2)
    assert sim.events[-1] == {"type": "audio_complete", "interrupted": False}


def test_record_name_list_digits_interrupt_the_whole_list() -> None:
    sim = Sim([{"type": "prompt", "record_name_list": "a.wav,b.wav", "interruptible": True},
               HANGUP])
    sim.start()
    sim.digit("5", stopped=1)
    assert sim.events[-1] == {"type": "dtmf", "digit": "5"}


def test_record_name_list_keeps_type_ahead_across_parts() -> None:
    sim = Sim([{"type": "prompt", "record_name_list": "a.wav,b.wav"}, HANGUP])
    sim.start()
    assert sim.digit("7") == []
    assert [c.file for c in sim.audio_done(1)] == ["b.wav"]
    sim.audio_done(2)
    assert sim.events[-1] == {"type": "audio_complete", "interrupted": True}


# ---------------------------------------------------------------- the state's size


def test_variables_past_the_bound_fail_the_session_cleanly() -> None:
    """A reply setting 300,000 characters of variables: the state (which travels in every
    event, at most MAX_IVR_STATE_CHARS) could not be written, the reply was refused, and
    the call ended without /end with the failed step's commands. The variables are not
    taken now: the session fails (the error prompt, /end with the reason)."""
    from pbx.ivr.session import MAX_VARIABLES_CHARS

    sim = Sim([{"type": "prompt", "file": "a.wav", "variables": {"v": "x" * 300_000}}, HANGUP])
    commands = sim.start()
    assert [c.file for c in commands if hasattr(c, "file")] == ["sounds/error.wav"]
    assert "v" not in sim.variables
    sim.audio_done(1)
    assert sim.done and sim.notified_body("end")["reason"].startswith("Error(")
    assert str(MAX_VARIABLES_CHARS) in sim.notified_body("end")["reason"]


@pytest.mark.parametrize(("body", "error"), [
    ({"a": "x" * 100_000}, "larger than"),  # 100,000 characters: over the bound
    (None, "too deep"),  # 300 levels, built below
])
def test_an_api_body_too_large_or_deep_for_the_state_is_an_error_result(
        body: Any, error: str) -> None:
    """api_result goes into the variables: a body too large for them, or nested deeper
    than JSON text can be written (orjson: 255 levels; TypeError was an internal error),
    gives the provider api_response with an error body instead."""
    if body is None:
        body = node = {}
        for _ in range(300):
            node["x"] = {}
            node = node["x"]
    sim = Sim([{"type": "api", "url": "http://api.test/x"}, HANGUP],
              api_answers=[ApiResult(200, body)])
    sim.start()
    assert sim.events[-1]["type"] == "api_response"
    assert error in sim.sent[-1]["variables"]["api_result"]
    assert sim.sent[-1]["variables"]["api_status"] == "0"


@pytest.mark.parametrize(("extra", "reason"), [
    ("deep", "nested too deep"),
    ({"blob": "x" * 40_000}, "larger than"),
])
def test_an_extra_the_state_cannot_keep_is_an_invalid_reply(extra: Any, reason: str) -> None:
    """`extra` stays in the session's state and goes back with every step: one nested
    300 levels deep raised when the state was written (an 'internal error'), and a large
    one could make the state too big to travel. Both are now an invalid reply."""
    if extra == "deep":
        extra = node = {}
        for _ in range(300):
            node["x"] = {}
            node = node["x"]
    with pytest.raises(ActionError, match=reason):
        parse_action({"type": "hangup", "extra": extra})
    sim = Sim([{"type": "prompt", "file": "a.wav", "extra": extra}, HANGUP])
    assert [c.file for c in sim.start() if hasattr(c, "file")] == ["sounds/error.wav"]
    assert any(reason in e for t in sim.traces for e in ([t.error] if t.error else []))

"""ActionNode parsing, defaults and error reasons; provider event and context shapes."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter

from pbx.ivr.models import (
    ActionError,
    ApiAction,
    CollectDtmfAction,
    DtmfMenuAction,
    HangupAction,
    InputPhoneAction,
    PromptAction,
    ProviderContext,
    ProviderEvent,
    TransferAction,
    action_json,
    parse_action,
)


def test_documented_defaults() -> None:
    prompt = parse_action({"type": "prompt", "file": "a.wav"})
    assert isinstance(prompt, PromptAction) and prompt.interruptible is False
    menu = parse_action({"type": "dtmf_menu"})
    assert isinstance(menu, DtmfMenuAction)
    assert (menu.timeout_ms, menu.max_retries, menu.entries) == (5000, 3, {})
    collect = parse_action({"type": "collect_dtmf"})
    assert isinstance(collect, CollectDtmfAction)
    assert (collect.min_digits, collect.max_digits, collect.timeout_ms) == (3, 4, 5000)
    api = parse_action({"type": "api", "url": "http://x", "variables": "a,b"})
    assert isinstance(api, ApiAction)
    assert (api.method, api.timeout, api.variables) == ("GET", 10, "a,b")
    assert isinstance(parse_action({"type": "hangup"}), HangupAction)
    phone = parse_action({"type": "input_phone"})
    assert isinstance(phone, InputPhoneAction)
    assert (phone.min_digits, phone.max_digits, phone.timeout_ms, phone.terminator) == (
        11,
        11,
        5000,
        "#",
    )


def test_unknown_fields_ignored_numbers_accepted_nested_parsed() -> None:
    action = parse_action(
        {
            "type": "dtmf_menu",
            "shiny_new_field": [1, 2],
            "step_id": 42,
            "entries": {"1": {"type": "transfer", "target": 2001}},
            "invalid_action": {"type": "prompt", "file": "bad.wav"},
        }
    )
    assert isinstance(action, DtmfMenuAction)
    assert action.step_id == "42"
    entry = action.entries["1"]
    assert isinstance(entry, TransferAction) and entry.target == "2001"
    assert entry.terminal and not entry.takes_digits
    assert action.takes_digits and not action.terminal
    assert isinstance(action.invalid_action, PromptAction)
    assert "shiny_new_field" not in action_json(action)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("hangup", "action is not a JSON object (got str)"),
        ({}, "action has no 'type' field"),
        ({"type": "nope"}, "unknown action type 'nope'"),
        ({"type": "collect"}, "tree-mode only action type 'collect' is not supported in step mode"),
        ({"type": "voicemail"}, "voicemail: missing required field 'target'"),
        ({"type": "input_voice"}, "input_voice: missing required field 'scene'"),
        (
            {"type": "dtmf_menu", "entries": {"2": {"type": "back"}}},
            "tree-mode only action type 'back' is not supported in step mode "
            "(at dtmf_menu.entries.2)",
        ),
        (
            {"type": "prompt", "next": {"type": "dtmf_menu", "timeout_action": {"type": "x"}}},
            "unknown action type 'x' (at prompt.next.dtmf_menu.timeout_action)",
        ),
        (
            {"type": "prompt", "next": {"type": "queue"}},
            "queue: missing required field 'target' (at prompt.next)",
        ),
        ({"type": "transfer", "target": ""}, "transfer: field 'target'"),
    ],
)
def test_parse_errors_name_the_reason(data: Any, reason: str) -> None:
    with pytest.raises(ActionError) as info:
        parse_action(data)
    assert info.value.reason.startswith(reason), info.value.reason


def test_provider_events_discriminated() -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(ProviderEvent)
    ev = adapter.validate_python({"type": "api_response", "status": 200, "body": {"a": 1}})
    assert ev.body == {"a": 1}
    ctx = ProviderContext.model_validate(
        {
            "session_id": "s",
            "caller": "1",
            "callee": "2",
            "event": {"type": "dtmf_menu_invalid", "digit": "9"},
        }
    )
    assert ctx.model_dump(mode="json") == {
        "session_id": "s",
        "caller": "1",
        "callee": "2",
        "direction": "inbound",
        "tenant_id": None,
        "ivr_id": None,
        "variables": {},
        "event": {"type": "dtmf_menu_invalid", "digit": "9"},
    }

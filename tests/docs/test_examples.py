"""Every JSON example in the provider guide (docs/) is checked against the code.

A ```json block must follow an HTML comment naming what it is, on the nearest
non-blank line before it:

    <!-- validate: ActionNode -->            validates (pbx.ivr.models, TypeAdapter)
    <!-- validate: invalid ActionNode -->    must NOT validate (an example of an error)
    <!-- validate: end-body -->              has the keys and types of the body the
                                             machine really POSTs (`/end`, `/dtmf-match`)

Validation is stricter than the PBX: a key the model does not know (a typo the PBX
would silently ignore) fails the example too, at any depth.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from pbx.config import IvrAppParams, RetrySettings
from pbx.ivr.models import ActionNode, ProviderContext, ProviderEvent, SessionContext
from pbx.messages import StepTrace
from pbx.schema import violations
from tests.ivr.sim import Sim

DOCS = Path(__file__).resolve().parents[2] / "docs"

MODELS: dict[str, Any] = {
    "ActionNode": ActionNode,
    "ProviderContext": ProviderContext,
    "SessionContext": SessionContext,
    "ProviderEvent": ProviderEvent,
    "IvrAppParams": IvrAppParams,
    "RetrySettings": RetrySettings,
    "StepTrace": StepTrace,
}

_FENCE = re.compile(r"^```json\s*$")
_MARK = re.compile(r"^<!--\s*validate:\s*(invalid\s+)?([\w-]+)\s*-->\s*$")


class Example:
    def __init__(self, page: str, line: int, mark: str | None, invalid: bool, text: str):
        self.page, self.line, self.mark, self.invalid, self.text = page, line, mark, invalid, text

    def __repr__(self) -> str:
        return f"{self.page}:{self.line}"


def examples_in(text: str, page: str) -> list[Example]:
    """The ```json blocks of one page, each with the mark before it (None if unmarked)."""
    lines = text.splitlines()
    found: list[Example] = []
    i = 0
    while i < len(lines):
        if _FENCE.match(lines[i].strip()):
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            mark = _MARK.match(lines[j].strip()) if j >= 0 else None
            end = i + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            body = "\n".join(line.removeprefix(indent) for line in lines[i + 1 : end])
            found.append(Example(page, i + 1, mark.group(2) if mark else None,
                                 bool(mark and mark.group(1)), body))
            i = end
        i += 1
    return found


def all_examples() -> list[Example]:
    found: list[Example] = []
    for path in sorted(DOCS.rglob("*.md")):
        found.extend(examples_in(path.read_text(encoding="utf-8"), str(path.relative_to(DOCS))))
    return found


def unknown_keys(raw: Any, value: Any, at: str = "") -> list[str]:
    """Keys of `raw` (the example's JSON) that the validated `value` has no field for."""
    out: list[str] = []
    if isinstance(value, BaseModel) and isinstance(raw, dict):
        fields = type(value).model_fields
        for key, item in raw.items():
            if key not in fields:
                out.append(f"{at}{key} (no such field of {type(value).__name__})")
            else:
                out.extend(unknown_keys(item, getattr(value, key), f"{at}{key}."))
    elif isinstance(value, dict) and isinstance(raw, dict):
        for key, item in raw.items():
            out.extend(unknown_keys(item, value.get(key), f"{at}{key}."))
    elif isinstance(value, list | tuple) and isinstance(raw, list):
        for n, (item, v) in enumerate(zip(raw, value, strict=False)):
            out.extend(unknown_keys(item, v, f"{at}{n}."))
    return out


# The published JSON Schema document for each model it covers (docs/schema/v1/): an
# example must satisfy the schema a provider author would check it with, as well.
SCHEMAS = {
    "ActionNode": "action-node",
    "ProviderContext": "provider-context",
    "SessionContext": "session-context",
    "ProviderEvent": "provider-event",
}


def validate_model(name: str, data: Any) -> None:
    """Raise ValueError unless `data` validates as model `name` with no unknown key,
    and (where one is published) under its JSON Schema."""
    try:
        value = TypeAdapter(MODELS[name]).validate_python(data)
    except ValidationError as exc:
        raise ValueError(str(exc)) from None
    extra = unknown_keys(data, value)
    if extra:
        raise ValueError(f"unknown keys: {', '.join(extra)}")
    if name in SCHEMAS and (problems := violations(SCHEMAS[name], data)):
        raise ValueError(f"JSON Schema {SCHEMAS[name]}: {'; '.join(problems)}")


def _real_bodies() -> dict[str, dict[str, Any]]:
    """The `/end` and `/dtmf-match` bodies the machine sends for a menu entry taken."""
    sim = Sim([{"type": "dtmf_menu", "entries": {"1": {"type": "transfer", "target": "2001"}}}])
    sim.start()
    sim.digit("1")
    return {"end-body": sim.notified_body("end"),
            "dtmf-match-body": sim.notified_body("dtmf_match")}


def validate_body(name: str, data: Any) -> None:
    real = _real_bodies()[name]
    if not isinstance(data, dict) or set(data) != set(real):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"keys {got} are not the machine's {sorted(real)}")
    for key, value in real.items():
        if type(data[key]) is not type(value):
            raise ValueError(f"{key}: {type(data[key]).__name__}, the machine sends "
                             f"{type(value).__name__}")


CHECKS: dict[str, Callable[[str, Any], None]] = {
    **{name: validate_model for name in MODELS},
    "end-body": validate_body,
    "dtmf-match-body": validate_body,
}


def check(example: Example) -> None:
    """Raise AssertionError naming the page and line if the example is wrong."""
    assert example.mark is not None, (
        f"{example}: a ```json block needs a <!-- validate: NAME --> line before it "
        f"(one of {sorted(CHECKS)})")
    assert example.mark in CHECKS, f"{example}: unknown validate name {example.mark!r}"
    try:
        data = json.loads(example.text)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"{example}: not JSON: {exc}") from None
    try:
        CHECKS[example.mark](example.mark, data)
    except ValueError as exc:
        if not example.invalid:
            raise AssertionError(f"{example}: not a valid {example.mark}: {exc}") from None
        return
    assert not example.invalid, f"{example}: marked invalid, but is a valid {example.mark}"


EXAMPLES = all_examples()


def test_the_guide_has_examples() -> None:
    assert len(EXAMPLES) >= 20
    assert {e.mark for e in EXAMPLES} >= {"ActionNode", "ProviderContext", "ProviderEvent",
                                          "end-body", "dtmf-match-body"}


@pytest.mark.parametrize("example", EXAMPLES, ids=repr)
def test_example(example: Example) -> None:
    check(example)


BROKEN = [
    # (page text, what the failure names)
    ('<!-- validate: ActionNode -->\n```json\n{"type": "transfer"}\n```\n', "target"),
    ('<!-- validate: ActionNode -->\n```json\n{"type": "prompt", "fiel": "a.wav"}\n```\n',
     "fiel"),
    ('<!-- validate: ActionNode -->\n```json\n{"type": "prompt", "next": {"type": "repeat"}}'
     '\n```\n', "repeat"),
    ('<!-- validate: ProviderContext -->\n```json\n{"session_id": "s", "caller": "1"}\n```\n',
     "callee"),
    ('<!-- validate: ProviderEvent -->\n```json\n{"type": "dtmf", "digit": "1",}\n```\n',
     "not JSON"),
    ('<!-- validate: invalid ActionNode -->\n```json\n{"type": "hangup"}\n```\n',
     "marked invalid"),
    ('<!-- validate: end-body -->\n```json\n{"reason": "Normal"}\n```\n', "session_id"),
    ('```json\n{"type": "hangup"}\n```\n', "needs a <!-- validate"),
    # The PBX reads a number as the target, the published schema does not: a guide example
    # must satisfy both.
    ('<!-- validate: ActionNode -->\n```json\n{"type": "transfer", "target": 2001}\n```\n',
     "JSON Schema action-node"),
]


@pytest.mark.parametrize(("page", "named"), BROKEN)
def test_a_broken_example_fails(page: str, named: str) -> None:
    [example] = examples_in(page, "broken.md")
    with pytest.raises(AssertionError, match=re.escape(named)):
        check(example)

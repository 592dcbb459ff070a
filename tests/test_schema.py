"""The provider protocol's JSON Schema (`pbx.schema`, `docs/schema/v1/`).

Checked with a real validator (`jsonschema`, draft 2020-12): the checked-in files are
what the models generate, the upstream document's JSON examples validate (those it
shows differently from what this PBX sends fail for exactly the stated reason; the
ones left out, and why, are listed in the fixture), what the machine really sends
validates, and the schema refuses what the parser refuses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pbx import schema
from pbx.ivr.models import ActionError, ProviderContext, ProviderEvent, parse_action
from tests.ivr.sim import WELCOME_MENU, Sim

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = json.loads(
    (ROOT / "tests" / "fixtures" / "step_mode_ivr_examples.json").read_text(encoding="utf-8")
)


def test_checked_in_schema_is_what_the_models_generate() -> None:
    stale = schema.stale(schema.DEFAULT_DIR)
    assert stale == [], f"regenerate with `python -m pbx.schema`: {stale}"


def test_staleness_is_detected(tmp_path: Path) -> None:
    schema.write(tmp_path)
    assert schema.stale(tmp_path) == []
    path = tmp_path / "action-node.json"
    doc = json.loads(path.read_text())
    doc["$defs"]["TransferAction"]["required"].remove("target")
    path.write_text(schema.render(doc))
    (tmp_path / "old.json").write_text("{}")
    assert schema.stale(tmp_path) == ["action-node.json", "old.json"]
    assert schema.main(["--check", "--dir", str(tmp_path)]) == 1


@pytest.mark.parametrize("name", sorted(schema.documents()))
def test_documents_are_valid_versioned_schemas(name: str) -> None:
    text = (schema.DEFAULT_DIR / name).read_text(encoding="utf-8")
    doc = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(doc)
    assert doc["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert doc["$id"] == f"urn:pbx:step-mode-ivr:v{schema.SCHEMA_VERSION}:{name[:-5]}"
    assert doc["x-schema-version"] == schema.SCHEMA_VERSION
    assert schema.DEFAULT_DIR.name == f"v{schema.SCHEMA_VERSION}"


def _validator(stem: str) -> jsonschema.Draft202012Validator:
    """A validator built from the checked-in file, as a provider author would."""
    doc = json.loads((schema.DEFAULT_DIR / f"{stem}.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(doc)


@pytest.mark.parametrize("example", EXAMPLES["examples"], ids=lambda e: e["where"])
def test_upstream_examples_validate(example: dict[str, Any]) -> None:
    _validator(example["schema"]).validate(example["json"])
    # The models agree: what the schema accepts, the PBX accepts.
    if example["schema"] == "action-node":
        parse_action(example["json"])
    elif example["schema"] == "provider-context":
        ProviderContext.model_validate(example["json"])
    elif example["schema"] == "provider-event":
        from pydantic import TypeAdapter

        TypeAdapter(ProviderEvent).validate_python(example["json"])


@pytest.mark.parametrize("example", EXAMPLES["differ"], ids=lambda e: e["where"])
def test_upstream_examples_that_differ_fail_for_the_stated_reason(
    example: dict[str, Any],
) -> None:
    assert schema.violations(example["schema"], example["json"]) == example["violations"]


def test_the_excluded_examples_are_listed_with_a_reason() -> None:
    assert {e["where"][:3] for e in EXAMPLES["excluded"]} == {"§6 ", "§1 ", "§9 "}
    assert all(e["why"] for e in EXAMPLES["excluded"])


def test_tree_only_answer_of_section_6_is_refused_by_schema_and_parser() -> None:
    answer = {"type": "prompt", "file": "sounds/ivr/invalid.wav", "next": {"type": "repeat"}}
    problems = schema.violations("action-node", answer)
    assert len(problems) == 1 and problems[0].startswith("next.type: 'repeat' is not one of")
    with pytest.raises(ActionError, match="tree-mode only"):
        parse_action(answer)


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ({"type": "transfer"}, "(top level): 'target' is a required property"),
        ({"target": "2001"}, "(top level): 'type' is a required property"),
        ({"type": "webhook", "url": "x"}, "type: 'webhook' is not one of"),
        ({"type": "api"}, "(top level): 'url' is a required property"),
        ({"type": "input_voice"}, "(top level): 'scene' is a required property"),
        (
            {"type": "dtmf_menu", "entries": {"1": {"type": "queue"}}},
            "entries.1: 'target' is a required property",
        ),
        (
            {"type": "prompt", "file": "a.wav", "next": {"type": "dtmf_menu",
                                                         "timeout_action": {}}},
            "next.timeout_action: 'type' is a required property",
        ),
        ({"type": "collect_dtmf", "max_digits": 0}, "max_digits: 0 is less than the minimum"),
        ("transfer", "(top level): 'transfer' is not of type 'object'"),
    ],
)
def test_schema_refuses_what_the_parser_refuses(answer: object, problem: str) -> None:
    problems = schema.violations("action-node", answer)
    assert len(problems) == 1 and problems[0].startswith(problem), problems
    with pytest.raises(ActionError):
        parse_action(answer)


def test_what_the_machine_sends_validates() -> None:
    """Real request bodies (step, /start, /end, /dtmf-match) from the real machine."""
    sim = Sim([WELCOME_MENU], ivr_id="proj_42", tenant_id="acme")
    commands = sim.start()
    sim.audio_done(commands[0].play_id)  # welcome ends, the menu greets
    sim.digit("1")  # entry 1: transfer, matched locally
    assert sim.kinds() == ["start", "dtmf_match", "end"]
    for body in sim.sent:
        assert schema.violations("provider-context", body) == []
    for kind, stem in (("start", "session-context"), ("dtmf_match", "dtmf-match"),
                       ("end", "end")):
        body = sim.notified_body(kind)
        assert schema.violations(stem, body) == [], (kind, body)
    # An answer the machine executes validates too (the menu's entry, as reported).
    assert schema.violations("action-node", sim.notified_body("dtmf_match")["action"]) == []


def test_every_event_the_machine_can_send_is_in_the_schema() -> None:
    events = _validator("provider-event").schema["$defs"]["ProviderEvent"]["properties"]
    from pbx.ivr.models import _Event

    tags = {m.model_fields["type"].default for m in _Event.__subclasses__()}
    assert set(events["type"]["enum"]) == tags


def test_check_jsonschema_tool_accepts_and_refuses(tmp_path: Path) -> None:
    """docs/schema.md's command: a third-party CLI reads the checked-in files."""
    import subprocess
    import sys

    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"type": "transfer", "target": "2001"}))
    bad.write_text(json.dumps({"type": "prompt", "file": "a.wav", "next": {"type": "repeat"}}))
    schema_file = str(schema.DEFAULT_DIR / "action-node.json")

    def check(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "check_jsonschema", "--schemafile", schema_file, str(path)],
            capture_output=True, text=True, timeout=60,
        )

    assert check(good).returncode == 0
    refused = check(bad)
    assert refused.returncode == 1
    assert "$.next.type: 'repeat' is not one of" in refused.stdout


def test_the_guides_python_example_runs() -> None:
    """The `jsonschema` example of docs/schema.md, run as printed there."""
    import contextlib
    import io
    import os
    import re

    text = (ROOT / "docs" / "schema.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block is not None
    printed = io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(block.group(1), "docs/schema.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert printed.getvalue() == "['entries', '1'] 'target' is a required property\n"

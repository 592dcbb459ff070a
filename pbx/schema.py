"""JSON Schema of the step-mode provider protocol, generated from `pbx.ivr.models`.

The pydantic models are the one source of truth: this module turns them into JSON
Schema (draft 2020-12) documents, one per message a provider meets, and
`python -m pbx.schema` writes them to `docs/schema/v<SCHEMA_VERSION>/` (checked in;
`tests/test_schema.py` fails when they are stale).

Both directions are described:

* requests the PBX sends the provider: `provider-context.json` (`POST {url}`, every
  step), `session-context.json` (`POST {url}/start`), `end.json` (`POST {url}/end`),
  `dtmf-match.json` (`POST {url}/dtmf-match`), and `provider-event.json` (the
  `event` of a step request on its own);
* the response a provider must send: `action-node.json` (the answer to a step
  request; also what an `api` URL with `get_dynamic_tree` answers).

Versioning: `SCHEMA_VERSION` is the major version, in every `$id` and in the
directory name. A compatible change (a new optional field, a new event a provider may
ignore) keeps it; an incompatible one (a field removed or narrowed, a new required
field) bumps it, and the old directory stays for providers still on it.

Two deliberate adjustments to pydantic's output: the `type` tag of every event and
action is required (pydantic leaves a field with a default optional, but the tag picks
the model), and the action and event unions are one `$defs` entry each, written as
`if type == X then <X's schema>` so that a validator names the field at fault instead
of "not valid under any of the given schemas".
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from pbx.ivr.models import ActionNode, ProviderContext, ProviderEvent, SessionContext

SCHEMA_VERSION = 1
DIALECT = "https://json-schema.org/draft/2020-12/schema"
# No host is claimed: the `$id`s are names (RFC 8141 URNs) that carry the version.
ID_PREFIX = f"urn:pbx:step-mode-ivr:v{SCHEMA_VERSION}:"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "docs" / "schema" / f"v{SCHEMA_VERSION}"


# ---------------------------------------------------------------- notification bodies


class EndNotice(BaseModel):
    """Body of `POST {url}/end` (fire-and-forget: the response is ignored)."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(
        description='Why the session ended: "Normal", "Hangup", "Transfer(<target>)", '
        '"Queue(<target>)", "Agent(<target>)", "Voicemail(<target>)", "Jump(<route_point>)", '
        '"VoipBridge" or "Error(<reason>)".'
    )
    session_id: str


class DtmfMatchNotice(BaseModel):
    """Body of `POST {url}/dtmf-match`: a `dtmf_menu` entry matched locally and its
    action runs without a provider step (fire-and-forget)."""

    model_config = ConfigDict(extra="forbid")
    digit: str
    action: dict[str, Any] = Field(description="The matched entry's ActionNode, as JSON.")
    session_id: str


# ---------------------------------------------------------------- generation

_Document = tuple[str, str, str, Any]  # file stem, title, description, type

DOCUMENTS: tuple[_Document, ...] = (
    (
        "action-node",
        "ActionNode",
        "Response: the JSON object a provider answers every POST {url} step request with "
        "(and what an `api` action's URL answers with `get_dynamic_tree`).",
        ActionNode,
    ),
    (
        "provider-context",
        "ProviderContext",
        "Request: the body the PBX POSTs to {url} on every IVR step.",
        ProviderContext,
    ),
    (
        "provider-event",
        "ProviderEvent",
        "Request: the `event` of a step request, the call event that triggered the step.",
        ProviderEvent,
    ),
    (
        "session-context",
        "SessionContext",
        "Request: the body the PBX POSTs to {url}/start when a session starts "
        "(fire-and-forget).",
        SessionContext,
    ),
    (
        "end",
        "EndNotice",
        "Request: the body the PBX POSTs to {url}/end when a session ends (fire-and-forget).",
        EndNotice,
    ),
    (
        "dtmf-match",
        "DtmfMatchNotice",
        "Request: the body the PBX POSTs to {url}/dtmf-match when a dtmf_menu entry "
        "matches locally (fire-and-forget).",
        DtmfMatchNotice,
    ),
)


def _tag(definition: dict[str, Any]) -> str | None:
    """The `type` tag a model's schema pins, if it is an event or an action."""
    prop = definition.get("properties", {}).get("type", {})
    const = prop.get("const")
    return const if isinstance(const, str) else None


def _tagged_union(tags: dict[str, str], what: str) -> dict[str, Any]:
    """A union keyed on `type` as if/then branches: errors name the field at fault."""
    return {
        "type": "object",
        "description": f"A{'n' if what[0] in 'aeiou' else ''} {what}: `type` picks its fields.",
        "required": ["type"],
        "properties": {"type": {"enum": sorted(tags)}},
        "allOf": [
            {
                "if": {
                    "type": "object",
                    "properties": {"type": {"const": tag}},
                    "required": ["type"],
                },
                "then": {"$ref": f"#/$defs/{name}"},
            }
            for tag, name in sorted(tags.items())
        ],
    }


def _fold_unions(node: Any, unions: dict[frozenset[str], str]) -> Any:
    """Replace every inlined discriminated union by a `$ref` to its one definition."""
    if isinstance(node, dict):
        mapping = node.get("discriminator", {}).get("mapping")
        if isinstance(mapping, dict):
            name = unions.get(frozenset(mapping))
            if name is not None:
                return {"$ref": f"#/$defs/{name}"}
        return {key: _fold_unions(value, unions) for key, value in node.items()}
    if isinstance(node, list):
        return [_fold_unions(item, unions) for item in node]
    return node


def build(stem: str, title: str, description: str, target: Any) -> dict[str, Any]:
    """One schema document, ready to be dumped."""
    raw = TypeAdapter(target).json_schema(ref_template="#/$defs/{model}")
    defs: dict[str, Any] = raw.pop("$defs", {})
    unions: dict[frozenset[str], str] = {}
    for union_name, kind in (("ActionNode", "action"), ("ProviderEvent", "event")):
        tags = {}
        for name, definition in defs.items():
            tag = _tag(definition)
            if tag is not None and name.endswith("Action" if kind == "action" else "Event"):
                definition.setdefault("required", [])
                if "type" not in definition["required"]:
                    definition["required"].insert(0, "type")
                tags[tag] = name
        if tags:
            unions[frozenset(tags)] = union_name
            defs[union_name] = _tagged_union(tags, kind)
    body = _fold_unions(raw, unions)
    defs = {name: _fold_unions(d, unions) if name not in ("ActionNode", "ProviderEvent") else d
            for name, d in defs.items()}
    body.pop("title", None)
    document: dict[str, Any] = {
        "$schema": DIALECT,
        "$id": f"{ID_PREFIX}{stem}",
        "title": title,
        "description": description,
        "x-schema-version": SCHEMA_VERSION,
        **body,
    }
    if defs:
        document["$defs"] = dict(sorted(defs.items()))
    return document


def documents() -> dict[str, dict[str, Any]]:
    """Every schema document, by file name."""
    return {f"{stem}.json": build(stem, title, desc, target)
            for stem, title, desc, target in DOCUMENTS}


@functools.cache
def validator(stem: str) -> Any:
    """A `jsonschema` validator for one document (`"action-node"`, `"provider-context"`...)."""
    import jsonschema  # the tools need it, the PBX itself does not

    document = next(build(*d) for d in DOCUMENTS if d[0] == stem)
    return jsonschema.Draft202012Validator(document)


def violations(stem: str, instance: object) -> list[str]:
    """What is wrong with `instance` under document `stem`, one line per problem, each
    naming the place (`next.entries.1: 'target' is a required property`); [] if valid."""
    lines = []
    for error in validator(stem).iter_errors(instance):
        deepest = _deepest(error)
        where = ".".join(str(p) for p in deepest.absolute_path) or "(top level)"
        lines.append(f"{where}: {deepest.message}")
    return sorted(set(lines))


def _deepest(error: Any) -> Any:
    """The error inside an `anyOf`/`oneOf` that says most: not the `null` branch of an
    optional field, and the one deepest in the instance."""
    candidates = [
        _deepest(e) for e in error.context or ()
        if not (e.validator == "type" and e.validator_value == "null")
    ]
    if not candidates:
        return error
    return max(candidates, key=lambda e: len(e.absolute_path))


def render(document: dict[str, Any]) -> str:
    """The checked-in text of a document (stable: the staleness test compares it)."""
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def write(directory: Path) -> list[Path]:
    """Write every document into `directory`, removing stale `*.json` files there."""
    directory.mkdir(parents=True, exist_ok=True)
    texts = {name: render(doc) for name, doc in documents().items()}
    for old in directory.glob("*.json"):
        if old.name not in texts:
            old.unlink()
    written = []
    for name, text in texts.items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale(directory: Path) -> list[str]:
    """Files in `directory` that differ from what the models generate (or are missing
    or left over)."""
    texts = {name: render(doc) for name, doc in documents().items()}
    problems = [
        name for name, text in texts.items()
        if not (directory / name).exists()
        or (directory / name).read_text(encoding="utf-8") != text
    ]
    problems += [p.name for p in directory.glob("*.json") if p.name not in texts]
    return sorted(problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pbx.schema",
        description="Write the step-mode provider protocol's JSON Schema files.",
    )
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help=f"output directory (default: {DEFAULT_DIR})")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the files there are stale")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale(args.dir)
        for name in problems:
            print(f"stale: {args.dir / name}", file=sys.stderr)
        return 1 if problems else 0
    for path in write(args.dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

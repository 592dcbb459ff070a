"""Session variables (docs/variables.md): the pre-defined ones, `$name$`
substitution in an action's fields, and safe file names from provider or SIP data."""

from __future__ import annotations

import re
from typing import Any

from pbx.ivr.models import NESTED_ACTION_FIELDS, ActionNode
from pbx.messages import CallInfo

_VAR_RE = re.compile(r"\$([A-Za-z0-9_][A-Za-z0-9_.\-]*)\$")
# Fields never substituted: identifiers, passthrough data, the variables themselves.
_NOT_SUBSTITUTED = NESTED_ACTION_FIELDS | {"type", "step_id", "step_name", "extra", "variables"}


def substitute_text(text: str, variables: dict[str, str]) -> str:
    """Replace each `$name$` once; unknown names stay as written (docs/variables.md)."""
    return _VAR_RE.sub(lambda m: variables.get(m.group(1), m.group(0)), text)


def _substitute_value(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):
        return substitute_text(value, variables)
    if isinstance(value, dict):
        return {k: _substitute_value(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_value(v, variables) for v in value]
    return value


def substitute(action: ActionNode, variables: dict[str, str]) -> ActionNode:
    """The action with `$name$` replaced in its own string fields; nested actions are
    left alone and substituted when they are executed (variables may change by then)."""
    updates = {
        name: _substitute_value(getattr(action, name), variables)
        for name in type(action).model_fields
        if name not in _NOT_SUBSTITUTED
    }
    return action.model_copy(update=updates)


_UNSAFE_RE = re.compile(r"[^A-Za-z0-9_.@+\-]")
_NOT_ALNUM_RE = re.compile(r"[^A-Za-z0-9]")


def safe_name(text: str) -> str:
    """One path component from provider or SIP data (a mailbox, a session id): characters
    other than letters, digits and `_.@+-` become `_`, and it never starts with a dot."""
    name = _UNSAFE_RE.sub("_", text)[:128]
    return f"_{name}" if not name or name.startswith(".") else name


def initial_variables(call: CallInfo) -> dict[str, str]:
    """Pre-defined variables (spec §7) plus `sip_<Header>` and the call's preset ones."""
    variables = {
        "session_id": call.session_id,
        "caller": call.caller,
        "callee": call.callee,
        "direction": call.direction,
    }
    if call.params.tenant_id is not None:
        variables["tenant_id"] = call.params.tenant_id
    rustpbx = call.params.compat == "rustpbx"
    for name, value in call.sip_headers.items():
        # rustpbx names them with every character but letters and digits as `_`
        # (`sip_X_Customer_Id`); the document does not name them at all.
        variables[f"sip_{_NOT_ALNUM_RE.sub('_', name) if rustpbx else name}"] = value
    variables.update(call.variables)
    return variables

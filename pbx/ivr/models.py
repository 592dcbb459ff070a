"""Step-mode provider protocol models (docs/protocol.md, docs/events.md, docs/actions.md).

Pure data: pydantic models for what crosses the HTTP trust boundary (ProviderContext,
SessionContext, ProviderEvent, ActionNode). What the sans-IO machine asks its HTTP shell
to send and what comes back are in `pbx.ivr.requests`.

ActionNode parsing is lenient where the spec is silent: unknown fields are ignored,
numbers are accepted where strings are expected (`"target": 2001`). It is strict where
the spec says "not executed": an unknown type, a tree-mode only type (`repeat`,
`back`, `play`, `menu`, `collect_extension`, `collect`, `webhook`) or a missing
required field anywhere in the tree (including `next`, `entries`, `invalid_action`,
`timeout_action`) makes `parse_action` raise `ActionError` naming the reason.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

# ---------------------------------------------------------------- provider events (§3)


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SessionStartEvent(_Event):
    type: Literal["session_start"] = "session_start"


class DtmfEvent(_Event):
    type: Literal["dtmf"] = "dtmf"
    digit: str


class DtmfTimeoutEvent(_Event):
    type: Literal["dtmf_timeout"] = "dtmf_timeout"


class AudioCompleteEvent(_Event):
    type: Literal["audio_complete"] = "audio_complete"
    interrupted: bool


class ApiResponseEvent(_Event):
    type: Literal["api_response"] = "api_response"
    status: int
    body: Any = None


class PhoneCollectedEvent(_Event):
    type: Literal["phone_collected"] = "phone_collected"
    number: str


class RecordingCompleteEvent(_Event):
    type: Literal["recording_complete"] = "recording_complete"
    url: str
    duration_secs: int


class InputVoiceEvent(_Event):
    type: Literal["input_voice"] = "input_voice"
    text: str
    confidence: float


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    reason: str


class DtmfMenuInvalidEvent(_Event):
    type: Literal["dtmf_menu_invalid"] = "dtmf_menu_invalid"
    digit: str


class DtmfMenuTimeoutEvent(_Event):
    type: Literal["dtmf_menu_timeout"] = "dtmf_menu_timeout"


ProviderEvent = Annotated[
    SessionStartEvent
    | DtmfEvent
    | DtmfTimeoutEvent
    | AudioCompleteEvent
    | ApiResponseEvent
    | PhoneCollectedEvent
    | RecordingCompleteEvent
    | InputVoiceEvent
    | ErrorEvent
    | DtmfMenuInvalidEvent
    | DtmfMenuTimeoutEvent,
    Field(discriminator="type"),
]


# ---------------------------------------------------------------- request bodies (§3, §6)


class SessionContext(BaseModel):
    """Body of `POST {url}/start`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    session_id: str
    caller: str
    callee: str
    direction: Literal["inbound", "outbound"] = "inbound"
    tenant_id: str | None = None
    ivr_id: str | None = None


class ProviderContext(SessionContext):
    """Body of every `POST {url}` step request."""

    variables: dict[str, str] = Field(default_factory=dict)
    event: ProviderEvent | None = None


# ---------------------------------------------------------------- action nodes (§4, §5)

TREE_ONLY_TYPES = frozenset(
    {"repeat", "back", "play", "menu", "collect_extension", "collect", "webhook"}
)
TERMINAL_TYPES = frozenset(
    {
        "transfer",
        "hangup",
        "queue",
        "voicemail",
        "play_and_hangup",
        "jump_ivr",
        "route_to_agent",
        "voip_bridge",
    }
)
# Actions a digit pressed before them (type-ahead, or the digit that interrupted a
# prompt) is handed to (docs/decisions.md "Interruptible prompt").
DIGIT_TAKING_TYPES = frozenset({"dtmf_menu", "collect_dtmf", "input_phone"})
# Fields holding nested actions: never variable-substituted with their parent; each
# nested action is substituted when it is executed.
NESTED_ACTION_FIELDS = frozenset({"next", "entries", "invalid_action", "timeout_action"})


# Session variables an action sets: stored as text, but a provider may send numbers,
# booleans and null (docs/variables.md), so the published schema says so too.
VariableValues = Annotated[dict[str, str], WithJsonSchema({
    "type": "object",
    "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
})]


MAX_EXTRA_CHARS = 32 * 1024  # an action's `extra` as JSON text (pbx.ivr.session bounds)


class _Action(BaseModel):
    """Fields every ActionNode may carry (docs/actions.md "Fields every action may carry")."""

    model_config = ConfigDict(extra="ignore", frozen=True, coerce_numbers_to_str=True)
    step_id: str | None = None
    step_name: str | None = None
    extra: dict[str, Any] | None = None
    # Session variables the provider sets with this action (docs/variables.md).
    variables: VariableValues | None = None
    # Chained action run after this one completes, without a provider call; ignored on
    # terminal actions (docs/decisions.md "next").
    next: ActionNode | None = None

    @field_validator("extra")
    @classmethod
    def _extra_fits(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        """`extra` is kept in the session's state until replaced, and sent back with every
        step: bounded as the state must be (a deep one could not even be written)."""
        if v is None:
            return v
        try:
            size = len(orjson.dumps(v))
        except TypeError:  # orjson's recursion limit: 255 levels
            raise ValueError("nested too deep") from None
        if size > MAX_EXTRA_CHARS:
            raise ValueError(f"larger than {MAX_EXTRA_CHARS} characters as JSON")
        return v

    @field_validator("variables", mode="before")
    @classmethod
    def _stringify(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {
                str(k): ("" if x is None else str(x).lower() if isinstance(x, bool) else str(x))
                if isinstance(x, str | int | float | bool) or x is None
                else x
                for k, x in v.items()
            }
        return v

    @property
    def terminal(self) -> bool:
        return getattr(self, "type", "") in TERMINAL_TYPES

    @property
    def takes_digits(self) -> bool:
        return getattr(self, "type", "") in DIGIT_TAKING_TYPES


# Terminal actions


class TransferAction(_Action):
    type: Literal["transfer"] = "transfer"
    target: str = Field(min_length=1)


class HangupAction(_Action):
    type: Literal["hangup"] = "hangup"
    prompt: str | None = None


class QueueAction(_Action):
    type: Literal["queue"] = "queue"
    target: str = Field(min_length=1)
    return_to_ivr: bool = False


class VoicemailAction(_Action):
    type: Literal["voicemail"] = "voicemail"
    target: str = Field(min_length=1)
    # Not in the spec's table: the greeting played before the beep (a prompt inside the
    # sounds directory); the machine's default when unset.
    greeting: str | None = None


class PlayAndHangupAction(_Action):
    type: Literal["play_and_hangup"] = "play_and_hangup"
    prompt: str | None = None
    code: int | None = None


class JumpIvrAction(_Action):
    type: Literal["jump_ivr"] = "jump_ivr"
    route_point: str = Field(min_length=1)
    params: dict[str, str] = Field(default_factory=dict)


class RouteToAgentAction(_Action):
    type: Literal["route_to_agent"] = "route_to_agent"
    target: str = Field(min_length=1)
    skill_group_id: str | None = None
    key_id: str | None = None
    channel_code: str | None = None


class VoipBridgeAction(_Action):
    type: Literal["voip_bridge"] = "voip_bridge"
    create_room_uri: str = Field(min_length=1)
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_ms: int = 30000


# Non-terminal actions


class PromptAction(_Action):
    type: Literal["prompt"] = "prompt"
    file: str | None = None
    tts_text: str | None = None
    tts_voice: str | None = None
    interruptible: bool = False
    record_name_list: str | None = None


class DtmfMenuAction(_Action):
    type: Literal["dtmf_menu"] = "dtmf_menu"
    greeting: str | None = None
    greeting_text: str | None = None
    entries: dict[str, ActionNode] = Field(default_factory=dict)
    timeout_ms: int = Field(default=5000, ge=0)
    max_retries: int = Field(default=3, ge=0)
    timeout_action: ActionNode | None = None
    invalid_action: ActionNode | None = None


class CollectDtmfAction(_Action):
    type: Literal["collect_dtmf"] = "collect_dtmf"
    min_digits: int = Field(default=3, ge=0)
    max_digits: int = Field(default=4, ge=1)
    timeout_ms: int = Field(default=5000, ge=0)
    terminator: str | None = None
    prompt: str | None = None


class InputPhoneAction(_Action):
    type: Literal["input_phone"] = "input_phone"
    prompt: str | None = None
    min_digits: int = Field(default=11, ge=0)
    max_digits: int = Field(default=11, ge=1)
    # Not in the spec's table; `collect_dtmf`'s default (docs/decisions.md "Collect").
    timeout_ms: int = Field(default=5000, ge=0)

    # Not in the spec's table either: `#` ends the number early (not stored).
    terminator: str | None = "#"


class InputVoiceAction(_Action):
    type: Literal["input_voice"] = "input_voice"
    scene: str
    timeout_ms: int = Field(default=5000, ge=0)


class ApiAction(_Action):
    type: Literal["api"] = "api"
    url: str = Field(min_length=1)
    method: str = "GET"
    headers: dict[str, str] = Field(default_factory=dict)
    # For `api`, a string names the session variables to send (comma-separated, spec
    # §5); an object sets variables like on any other action.
    variables: VariableValues | str | None = None  # type: ignore[assignment]
    timeout: int = Field(default=10, ge=0)  # seconds; 0: the default (10)
    get_dynamic_tree: bool = False


class ToRecordAction(_Action):
    type: Literal["torecord"] = "torecord"
    prompt: str | None = None
    beep: bool = False
    max_duration_secs: int | None = None


ActionNode = Annotated[
    TransferAction
    | HangupAction
    | QueueAction
    | VoicemailAction
    | PlayAndHangupAction
    | JumpIvrAction
    | RouteToAgentAction
    | VoipBridgeAction
    | PromptAction
    | DtmfMenuAction
    | CollectDtmfAction
    | InputPhoneAction
    | InputVoiceAction
    | ApiAction
    | ToRecordAction,
    Field(discriminator="type"),
]

for _model in (_Action, DtmfMenuAction):
    _model.model_rebuild()
for _model in _Action.__subclasses__():
    _model.model_rebuild()

ACTION_TYPES = frozenset(m.model_fields["type"].default for m in _Action.__subclasses__())

_action_adapter: TypeAdapter[Any] = TypeAdapter(ActionNode)


class ActionError(Exception):
    """An ActionNode that cannot be executed; `reason` names the field or the cause."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], int, bool]:
    """Split a pydantic error location into path segments.

    Returns (segments, index of the last action-type tag or -1, whether the location
    ends where an action (and so a tag) was expected).
    """
    path: list[str] = []
    tag_at = -1
    expect_tag = True
    i = 0
    while i < len(loc):
        part = str(loc[i])
        path.append(part)
        if expect_tag:
            tag_at = len(path) - 1
            expect_tag = False
        elif part in NESTED_ACTION_FIELDS - {"entries"}:
            expect_tag = True
        elif part == "entries" and i + 1 < len(loc):
            i += 1
            path.append(str(loc[i]))
            expect_tag = True
        i += 1
    return path, tag_at, expect_tag


def _describe(err: Any) -> str:
    """One pydantic error → e.g. "transfer: missing required field 'target' (at prompt.next)"."""
    path, tag_at, at_action = _walk(err["loc"])
    kind = err["type"]
    if at_action:
        at = f" (at {'.'.join(path)})" if path else ""
        if kind == "union_tag_invalid":
            tag = err.get("ctx", {}).get("tag", "?")
            if tag in TREE_ONLY_TYPES:
                return f"tree-mode only action type {tag!r} is not supported in step mode{at}"
            return f"unknown action type {tag!r}{at}"
        if kind == "union_tag_not_found":
            return f"action has no 'type' field{at}"
        return f"action is not a JSON object{at}"
    action_type = path[tag_at]
    field = ".".join(path[tag_at + 1 :])
    at = f" (at {'.'.join(path[:tag_at])})" if tag_at > 0 else ""
    if kind == "missing":
        return f"{action_type}: missing required field {field!r}{at}"
    return f"{action_type}: field {field!r}: {err['msg']}{at}"


def parse_action(data: object) -> ActionNode:
    """Validate a provider response (already JSON-decoded) as an ActionNode."""
    if not isinstance(data, dict):
        raise ActionError(f"action is not a JSON object (got {type(data).__name__})")
    try:
        return _action_adapter.validate_python(data)
    except ValidationError as exc:
        raise ActionError(_describe(exc.errors()[0])) from None


def action_json(action: _Action) -> dict[str, Any]:
    """An ActionNode as the JSON object the provider would have sent (defaults included)."""
    return action.model_dump(mode="json", exclude_none=True)

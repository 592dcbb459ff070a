"""`pbx-sim` scenarios: what the simulated caller does and what must happen.

A scenario is YAML (or built from the command line): defaults for the calls (the
route's `app_params`, caller, callee, variables...), then `calls`, each a list of
caller `steps` and a list of `expect`ations. `load` validates a file and raises
`ScenarioError` naming the key at fault; the format is documented in
docs/simulator.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pbx.config import IvrAppParams


class ScenarioError(Exception):
    """A scenario (or command line) that cannot run; the text says where and why."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


def parse_duration(value: object) -> float:
    """`2s`, `500ms`, `1.5`, `1m` (a bare number is seconds) -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"not a duration: {value!r} (e.g. 2s, 500ms, 1m)")
        number, unit = float(match.group(1)), match.group(2) or "s"
        seconds = number / 1000.0 if unit == "ms" else number * 60.0 if unit == "m" else number
    if seconds < 0:
        raise ValueError(f"negative duration: {value!r}")
    return seconds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Press(_Strict):
    """The caller presses these keys, `digit_gap` apart (virtual time)."""

    press: str

    @field_validator("press", mode="before")
    @classmethod
    def _digits(cls, v: Any) -> str:
        text = str(v)
        if not text or any(c not in "0123456789*#ABCDabcd" for c in text):
            raise ValueError(f"DTMF keys are 0-9, *, #, A-D; got {text!r}")
        return text.upper()


class Wait(_Strict):
    """The caller waits: a duration, or `idle` (until nothing plays: the IVR listens
    for keys, records, or the call is over)."""

    wait: float | Literal["idle"]

    @field_validator("wait", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | str:
        return "idle" if v == "idle" else parse_duration(v)


class Hangup(_Strict):
    """The caller hangs up (`true`, or the reason the session's `/end` gets)."""

    hangup: bool | str = True


Step = Press | Wait | Hangup
STEP_MODELS: dict[str, type[Press] | type[Wait] | type[Hangup]] = {
    "press": Press, "wait": Wait, "hangup": Hangup,
}
STEP_KEYS = tuple(STEP_MODELS)

EXPECT_KEYS = ("event", "action", "end_reason", "played", "said", "variables", "error")


class Expectation(_Strict):
    """One check after the call (each item sets one key; `not` negates one):

    event       a step request's event contains these fields (e.g. {type: dtmf, digit: "1"})
    action      an action the IVR ran (a provider answer, a `next`, a menu entry) contains these
    end_reason  the session's `/end` reason, exactly (e.g. "Transfer(2001)")
    played      a prompt file was played (with or without the `sounds/` prefix)
    said        a text to speech text contained this
    variables   the session variables at the end include these values
    error       an error the PBX recorded (played sounds/error.wav) contained this
    """

    event: dict[str, Any] | None = None
    action: dict[str, Any] | None = None
    end_reason: str | None = None
    played: str | None = None
    said: str | None = None
    variables: dict[str, Any] | None = None
    error: str | None = None
    not_: Expectation | None = Field(default=None, alias="not")

    @model_validator(mode="after")
    def _one(self) -> Expectation:
        set_keys = [k for k in (*EXPECT_KEYS, "not_") if getattr(self, k) is not None]
        if len(set_keys) != 1:
            raise ValueError(
                f"each expectation sets exactly one of {', '.join(EXPECT_KEYS)}, not "
                f"(got {', '.join(k.rstrip('_') for k in set_keys) or 'none'})"
            )
        return self

    def describe(self) -> str:
        for key in EXPECT_KEYS:
            value = getattr(self, key)
            if value is not None:
                return f"{key} {value!r}" if not isinstance(value, dict) else f"{key} {value}"
        assert self.not_ is not None
        return f"not {self.not_.describe()}"


class CallDefaults(_Strict):
    """What a call is made of; set at the top of a scenario, overridden per call."""

    app_params: dict[str, Any] | None = None
    caller: str | None = None
    callee: str | None = None
    direction: Literal["inbound", "outbound"] | None = None
    variables: dict[str, str] | None = None
    sip_headers: dict[str, str] | None = None

    @field_validator("caller", "callee", mode="before")
    @classmethod
    def _number(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) else v

    @field_validator("variables", "sip_headers", mode="before")
    @classmethod
    def _strings(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): "" if x is None else str(x) for k, x in v.items()}
        return v


class Call(CallDefaults):
    name: str = "call"
    steps: list[Step] = Field(default_factory=list)
    expect: list[Expectation] = Field(default_factory=list)
    # Any of the scenario's `options` for this call only (e.g. `tts: false`).
    options: dict[str, Any] | None = None

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            Options.model_validate(v)  # each key checked here, merged in `options_for`
        return v

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, v: Any) -> Any:
        """Each step is one of `press:`, `wait:`, `hangup`; `- hangup`, `- wait idle`
        and `- press 12` read naturally in YAML too. The key picks the model, so an error
        names that step's problem only."""
        if not isinstance(v, list):
            return v
        steps: list[Step] = []
        for index, item in enumerate(v):
            if isinstance(item, str):
                word, _, rest = item.partition(" ")
                rest = rest.strip().strip("'\"")
                item = {word: rest or True}
            keys = list(item) if isinstance(item, dict) else []
            if len(keys) != 1 or keys[0] not in STEP_KEYS:
                raise ValueError(
                    f"step {index}: a step is one of {', '.join(STEP_KEYS)}; got {item!r}")
            try:
                steps.append(STEP_MODELS[keys[0]].model_validate(item))
            except ValidationError as exc:
                msg = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
                raise ValueError(f"step {index}: {keys[0]}: {msg}") from None
        return steps


class Options(_Strict):
    """How the simulation runs (media and reporting)."""

    sounds_dir: str = "sounds"
    # Length of a prompt whose file is not in sounds_dir (and of synthesised speech).
    prompt_ms: int = Field(default=2000, ge=0)
    digit_gap_ms: int = Field(default=250, ge=0)
    # A provider answer slower than this is flagged (the PBX gives up at retry.timeout_ms).
    slow_ms: int = Field(default=500, gt=0)
    fail_on_slow: bool = False
    # The caller hangs up when the IVR is still running after this much virtual time.
    max_call_s: float = Field(default=600.0, gt=0)
    tts: bool = True


class Scenario(CallDefaults):
    provider: str | None = None
    # Named IVRs `jump_ivr` can reach (`[ivrs.<route_point>]`): app_params each.
    ivrs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    options: Options = Field(default_factory=Options)
    calls: list[Call] = Field(min_length=1)


def options_for(scenario: Scenario, call: Call) -> Options:
    """The scenario's options (command line included), the call's own over them."""
    if not call.options:
        return scenario.options
    return Options.model_validate({**scenario.options.model_dump(), **call.options})


def app_params(scenario: Scenario, call: Call) -> IvrAppParams:
    """The route's app_params for one call: the scenario's, the call's over them. The
    URL: the call's own, else `provider` (the command line's), else the scenario's."""
    merged: dict[str, Any] = dict(scenario.app_params or {})
    merged.update(call.app_params or {})
    url = (call.app_params or {}).get("url") or scenario.provider or merged.get("url")
    merged["url"] = url
    if not merged.get("url"):
        raise ScenarioError("no provider URL: give it on the command line or as `provider:`")
    try:
        return IvrAppParams.model_validate(merged)
    except ValidationError as exc:
        raise ScenarioError(f"app_params: {_problems(exc)}") from None


def unknown_app_params(params: dict[str, Any]) -> list[str]:
    """Keys this PBX does not know (ignored, as a route's would be)."""
    return sorted(set(params) - set(IvrAppParams.model_fields))


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: "
        f"{str(err['msg']).removeprefix('Value error, ')}"
        for err in exc.errors()
    )


def parse(data: object, source: str) -> Scenario:
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: a scenario is a YAML mapping (with `calls:`)")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(f"{source}: {_problems(exc)}") from None


def load(path: str | Path) -> Scenario:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{path}: invalid YAML: {exc}") from None
    return parse(data, str(path))

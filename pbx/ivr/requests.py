"""What the sans-IO IVR machine (`pbx.ivr.machine`) asks its HTTP shell
(`pbx.ivr.provider`, `pbx.tts`, `pbx.asr`) to send, and what comes back: small frozen
dataclasses. Apart from `pbx.ivr.models` so that the protocol models need nothing from
the configuration (`pbx.config` checks a route's fallback action with them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pbx.config import IvrAppParams

RequestKind = Literal["step", "start", "end", "dtmf_match", "api", "tts", "asr"]


@dataclass(frozen=True)
class ProviderRequest:
    """An HTTP call the machine asks for.

    `step` requests expect a `ProviderResult` fed back through
    `machine.provider_result` before the session continues; `api` requests (the `api`
    action) an `ApiResult` fed back through `machine.api_result`; `tts` requests (text
    to speech, no HTTP of the provider's: `body` is `{"text", "voice"}`, `url` empty,
    `voice` None for the configured default) a `TtsResult` fed back through
    `machine.tts_result`; `asr` requests (speech recognition for `input_voice`, no
    HTTP of the provider's: `body` is `{"stage": "check"}` or `{"stage": "recognize",
    "file", "reason", "scene"}`, `url` empty) an `AsrResult` fed back through
    `machine.asr_result`; the others are fire-and-forget notifications (`/start`,
    `/end`, `/dtmf-match`).

    `method`, `headers`, `query` and `timeout_s` are for `api` requests only: the
    request goes with exactly `headers`, and with `query` as the query string and no
    body when `query` is set, else with `body` as its JSON body. The other kinds are
    POSTs of `body` with `params.headers` under the provider's own timeouts.
    """

    kind: RequestKind
    url: str
    body: dict[str, Any]
    params: IvrAppParams
    method: str = "POST"
    headers: dict[str, str] | None = None
    query: dict[str, str] | None = None
    timeout_s: float | None = None


ResultOutcome = Literal["ok", "fallback", "invalid"]


@dataclass(frozen=True)
class ProviderResult:
    """Outcome of a step request after the retry policy (spec §8).

    ok       : `body` is the decoded JSON the provider answered (not yet validated).
    fallback : retries exhausted, or a 4xx; execute `retry.fallback`. `reason` says why.
    invalid  : the answer was not JSON; `reason` says why.
    """

    outcome: ResultOutcome
    body: object = None
    reason: str = ""
    status: int | None = None
    attempts: int = 1


@dataclass(frozen=True)
class ApiResult:
    """Outcome of an `api` request: the HTTP status and the body (decoded JSON, else the
    raw text); status 0 and `{"error": "..."}` when no HTTP answer came (docs/actions.md)."""

    status: int
    body: Any = None


@dataclass(frozen=True)
class TtsResult:
    """Outcome of a `tts` request: `file`, the synthesised prompt as a path inside the
    sounds directory (e.g. `.tts/<hash>.wav`), or `error`, the reason the provider is
    given in an `error` event (docs/decisions.md "Text to speech")."""

    file: str | None = None
    error: str | None = None
    source: str = ""  # "cache", "http", "espeak-ng": for logs and tests


@dataclass(frozen=True)
class AsrResult:
    """Outcome of an `asr` request (docs/asr.md). Stage "check": `error` None when a
    recogniser is there. Stage "recognize": the transcript (`text`, "" when nothing was
    said) and `confidence` in [0, 1], or `error`, the reason the provider is given in
    an `error` event."""

    text: str = ""
    confidence: float = 0.0
    error: str | None = None
    source: str = ""  # "http", "pocketsphinx", "none" (nothing said): for logs and tests

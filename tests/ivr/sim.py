"""Drive the step-mode machine like the executor does, on a virtual clock, no I/O.

Every state crosses an orjson dump/load and every input an IvrEvent encode/decode
between steps, as they do over ZeroMQ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal

import orjson

from pbx.config import IvrAppParams
from pbx.ivr import machine
from pbx.ivr.actions.voice import ASR_UNAVAILABLE
from pbx.ivr.requests import ApiResult, AsrResult, ProviderRequest, ProviderResult, TtsResult
from pbx.messages import (
    AudioComplete,
    CallEndedInput,
    CallInfo,
    DtmfDigit,
    IvrEvent,
    MediaInput,
    PlayCommand,
    RecordingFinished,
    SessionStartInput,
    StepTrace,
    TimerFired,
    WaitExpiredInput,
    decode,
    encode,
)

URL = "http://provider.test/ivr/step"

WELCOME_MENU: dict[str, Any] = {
    "type": "prompt",
    "file": "sounds/ivr/welcome.wav",
    "interruptible": True,
    "next": {
        "type": "dtmf_menu",
        "greeting": "sounds/ivr/menu.wav",
        "timeout_ms": 5000,
        "entries": {
            "1": {"type": "transfer", "target": "2001"},
            "0": {"type": "transfer", "target": "operator"},
        },
    },
}


def make_call(**params: Any) -> CallInfo:
    return CallInfo(
        call_id="call-1",
        session_id="sess-1",
        caller="1001",
        callee="*99",
        route_name="step_ivr",
        params=IvrAppParams(url=URL, **params),
        sip_headers={"X-Customer": "gold"},
    )


Answer = dict[str, Any] | ProviderResult
Answers = list[Answer] | Callable[[dict[str, Any]], Answer]
# Text to speech: (text, voice) -> result. None: no TTS configured.
Tts = Callable[[str, str | None], TtsResult]


# Speech recognition: the `asr` request's body -> result. None: no ASR configured.
Asr = Callable[[dict[str, Any]], AsrResult]


def no_asr(body: dict[str, Any]) -> AsrResult:
    return AsrResult(error=ASR_UNAVAILABLE)


def no_tts(text: str, voice: str | None) -> TtsResult:
    return TtsResult(error=machine.TTS_UNAVAILABLE)


def fake_tts(text: str, voice: str | None) -> TtsResult:
    """A TTS that always works: `.tts/<text>|<voice>.wav`, so tests can read it back."""
    return TtsResult(file=f".tts/{text}|{voice or 'default'}.wav", source="fake")


class Sim:
    """Drives the machine like the executor does, with a scripted provider (and a
    scripted HTTP API for `api` actions)."""

    def __init__(
        self,
        answers: Answers,
        *,
        api_answers: list[ApiResult] | None = None,
        ivrs: Mapping[str, IvrAppParams] | None = None,
        urls: Mapping[str, Answers] | None = None,
        tts: Tts | None = None,
        asr: Asr | None = None,
        **params: Any,
    ):
        self.call = make_call(**params)
        self.now = 1000.0
        self.state: str | None = None  # the state text, as it travels
        self.seq = 0
        self.answers = answers
        # Answers of other provider URLs (jump_ivr targets), by step URL.
        self.url_answers: dict[str, Answers] = dict(urls or {})
        self.api_answers = list(api_answers or [])
        self.ivrs = ivrs
        self.sent: list[dict[str, Any]] = []  # step request bodies
        self.sent_urls: list[str] = []  # their URLs
        self.api_sent: list[ProviderRequest] = []
        self.tts = tts or no_tts
        self.tts_sent: list[tuple[str, str | None]] = []  # (text, voice) asked for
        self.asr = asr or no_asr
        self.asr_sent: list[dict[str, Any]] = []  # `asr` request bodies
        self.notified: list[tuple[str, str, dict[str, Any]]] = []  # (kind, url, body)
        self.traces: list[StepTrace] = []
        self.done = False
        self.wait_ms: int | None = None  # the last Step's: what the reply would carry

    @property
    def events(self) -> list[dict[str, Any]]:
        return [body["event"] for body in self.sent]

    def answer(self, url: str, body: dict[str, Any]) -> ProviderResult:
        answers = self.answers if url == URL else self.url_answers[url]
        if callable(answers):
            a = answers(body)
        else:
            assert answers, f"unexpected provider call to {url} with {body['event']}"
            a = answers.pop(0)
        return a if isinstance(a, ProviderResult) else ProviderResult("ok", body=a, status=200)

    def run(self, step: machine.Step) -> list[Any]:
        commands: list[Any] = []
        while True:
            # The state travels as JSON text.
            self.state = step.state_text
            commands.extend(step.commands)
            self.traces.extend(step.traces)
            self.done = step.done
            self.wait_ms = step.wait_ms
            for r in step.requests:
                if r.kind not in ("step", "api", "tts", "asr"):
                    self.notified.append((r.kind, r.url, r.body))
            request = step.pending_request
            if request is None:
                return commands
            self.now += 0.040
            if request.kind == "tts":
                text, voice = request.body["text"], request.body["voice"]
                self.tts_sent.append((text, voice))
                spoken = self.tts(text, voice)
                step = machine.tts_result(self.state, spoken, self.now, ivrs=self.ivrs)
                continue
            if request.kind == "asr":
                self.asr_sent.append(request.body)
                heard = self.asr(request.body)
                step = machine.asr_result(self.state, heard, self.now, ivrs=self.ivrs)
                continue
            if request.kind == "api":
                self.api_sent.append(request)
                assert self.api_answers, f"unexpected api call {request}"
                api = self.api_answers.pop(0)
                step = machine.api_result(self.state, api, self.now, ivrs=self.ivrs)
                continue
            assert request.url == URL or request.url in self.url_answers, request.url
            self.sent.append(orjson.loads(orjson.dumps(request.body)))
            self.sent_urls.append(request.url)
            result = self.answer(request.url, request.body)
            step = machine.provider_result(self.state, result, self.now, ivrs=self.ivrs)

    def start(self) -> list[Any]:
        return self.run(machine.start(self.call, self.now))

    def send(
        self, inp: MediaInput | CallEndedInput | SessionStartInput | WaitExpiredInput
    ) -> list[Any]:
        assert self.state is not None
        self.seq += 1
        event = decode(
            encode(IvrEvent(session_id="sess-1", seq=self.seq, state=self.state, input=inp))
        )
        self.now += 0.5
        return self.run(machine.handle(event.state, event.input, self.now, ivrs=self.ivrs))

    def media(self, ev: Any) -> list[Any]:
        return self.send(MediaInput(event=ev))

    def digit(self, d: str, stopped: int | None = None) -> list[Any]:
        return self.media(DtmfDigit(digit=d, stopped_play_id=stopped))

    def digits(self, ds: str) -> list[Any]:
        """Several digits, one event each; the commands of all of them."""
        commands: list[Any] = []
        for d in ds:
            commands.extend(self.digit(d))
        return commands

    def audio_done(self, play_id: int) -> list[Any]:
        return self.media(AudioComplete(play_id=play_id))

    def timer(self, timer_id: int) -> list[Any]:
        return self.media(TimerFired(timer_id=timer_id))

    def recorded(
        self,
        record_id: int,
        path: str,
        duration_ms: int,
        reason: Literal["dtmf", "max_duration", "stopped", "error"] = "dtmf",
    ) -> list[Any]:
        return self.media(
            RecordingFinished(
                record_id=record_id, path=path, duration_ms=duration_ms, reason=reason
            )
        )

    def hang_up(self) -> list[Any]:
        return self.send(CallEndedInput())

    def wait_expired(self, waited_ms: int) -> list[Any]:
        """The front heard nothing for `waited_ms` (its watchdog, issue 8)."""
        return self.send(WaitExpiredInput(waited_ms=waited_ms))

    def kinds(self) -> list[str]:
        return [kind for kind, _, _ in self.notified]

    def notified_body(self, kind: str) -> dict[str, Any]:
        bodies = [body for k, _, body in self.notified if k == kind]
        assert len(bodies) == 1, self.notified
        return bodies[0]

    @property
    def variables(self) -> dict[str, str]:
        assert self.state is not None
        return dict(orjson.loads(self.state)["variables"])

    @property
    def phase(self) -> str:
        assert self.state is not None
        return str(orjson.loads(self.state)["phase"])


def play(play_id: int, file: str, interruptible: bool = False) -> PlayCommand:
    return PlayCommand(play_id=play_id, file=file, interruptible=interruptible)

"""input_voice through the sans-IO machine (docs/asr.md): the availability check, the
listening capture the media worker is asked for, the utterance handed to the shell,
and what the provider hears; every state crossing JSON between steps."""

from __future__ import annotations

from typing import Any

import pytest

from pbx.ivr.actions.voice import NEXT_ON_VOICE
from pbx.ivr.requests import AsrResult
from pbx.messages import (
    CallEndedInput,
    DtmfDigit,
    HangupCommand,
    MediaFailure,
    RecordCommand,
    RecordingFinished,
    StopRecordCommand,
    TimerCommand,
    TimerFired,
)
from tests.ivr.sim import Sim

VOICE = {"type": "input_voice", "scene": "order", "timeout_ms": 3000}


class FakeAsr:
    """A recogniser that is there and hears `text` (or fails with `error`)."""

    def __init__(self, text: str = "yes", confidence: float = 0.75,
                 error: str | None = None) -> None:
        self.text, self.confidence, self.error = text, confidence, error

    def __call__(self, body: dict[str, Any]) -> AsrResult:
        if body["stage"] == "check":
            return AsrResult()
        if self.error is not None:
            return AsrResult(error=self.error)
        if body["reason"] == "no_speech":
            return AsrResult(source="none")
        return AsrResult(text=self.text, confidence=self.confidence, source="fake")


def listening(sim: Sim) -> RecordCommand:
    commands = sim.start()
    assert len(commands) == 1 and isinstance(commands[0], RecordCommand), commands
    return commands[0]


def test_without_asr_the_provider_hears_error_at_once_and_nobody_listens() -> None:
    sim = Sim([VOICE, {"type": "hangup"}])
    assert sim.start() == [HangupCommand(reason="Normal")]
    assert sim.asr_sent == [{"stage": "check"}]
    assert sim.events[-1] == {"type": "error", "reason": "ASR service not available"}


def test_the_worker_listens_into_the_spool_with_the_action_timeout() -> None:
    sim = Sim([VOICE, {"type": "hangup"}], asr=FakeAsr())
    rec = listening(sim)
    assert rec.area == "asr"
    assert rec.listen_ms == 3000
    assert rec.stop_digits == ""  # digits do not end an utterance
    assert rec.path == f"sess-1_{rec.record_id}.wav"
    assert rec.max_duration_ms == 3000 + 120_000  # the worker lowers it to its own bound
    assert sim.phase == "recording"
    assert sim.wait_ms == 3000 + 120_000 + 2000  # the front's watchdog bound
    assert len(sim.sent) == 1  # only session_start so far


def test_the_utterance_goes_to_the_recogniser_and_its_text_to_the_provider() -> None:
    sim = Sim([VOICE, {"type": "hangup"}], asr=FakeAsr("two", 0.6))
    rec = listening(sim)
    sim.media(RecordingFinished(record_id=rec.record_id, path=rec.path, duration_ms=1500,
                                reason="speech_end", speech_start_ms=400))
    assert sim.asr_sent[-1] == {"stage": "recognize", "file": rec.path, "reason": "speech_end",
                                "scene": "order", "duration_ms": 1500, "speech_start_ms": 400}
    assert sim.events[-1] == {"type": "input_voice", "text": "two", "confidence": 0.6}
    assert sim.done


def test_nobody_speaking_is_an_empty_answer_not_an_error() -> None:
    sim = Sim([VOICE, {"type": "hangup"}], asr=FakeAsr())
    rec = listening(sim)
    sim.media(RecordingFinished(record_id=rec.record_id, path=rec.path, duration_ms=3000,
                                reason="no_speech"))
    assert sim.asr_sent[-1]["reason"] == "no_speech"  # so the shell deletes the file
    assert sim.events[-1] == {"type": "input_voice", "text": "", "confidence": 0.0}


def test_a_failed_recognition_is_an_error_event_naming_why() -> None:
    sim = Sim([VOICE, {"type": "hangup"}], asr=FakeAsr(error="ASR service answered HTTP 500"))
    rec = listening(sim)
    sim.media(RecordingFinished(record_id=rec.record_id, path=rec.path, duration_ms=900,
                                reason="max_speech"))
    assert sim.events[-1] == {"type": "error", "reason": "ASR service answered HTTP 500"}


def test_a_capture_that_could_not_be_written_is_an_error_event() -> None:
    sim = Sim([VOICE, {"type": "hangup"}], asr=FakeAsr())
    rec = listening(sim)
    sim.media(RecordingFinished(record_id=rec.record_id, path=rec.path, duration_ms=200,
                                reason="error"))
    assert len(sim.asr_sent) == 1  # nothing to recognise
    assert sim.events[-1]["type"] == "error"
    assert "listening failed" in sim.events[-1]["reason"]


def test_a_refused_capture_is_an_error_event_after_the_grace() -> None:
    sim = Sim([VOICE, {"type": "hangup"}], asr=FakeAsr())
    listening(sim)
    commands = sim.media(MediaFailure(reason="no directory for asr recordings"))
    timer = commands[0]
    assert isinstance(timer, TimerCommand)
    sim.media(TimerFired(timer_id=timer.timer_id))
    assert sim.events[-1] == {
        "type": "error", "reason": "recording failed: no directory for asr recordings"}


def test_digits_while_listening_are_ignored_and_stale_ends_too() -> None:
    sim = Sim([VOICE, {"type": "hangup"}], asr=FakeAsr())
    rec = listening(sim)
    assert sim.media(DtmfDigit(digit="5")) == []
    assert sim.media(RecordingFinished(record_id=rec.record_id - 1, path="old.wav",
                                       duration_ms=1, reason="speech_end")) == []
    assert sim.phase == "recording" and len(sim.sent) == 1


def test_caller_hanging_up_while_listening_ends_the_session() -> None:
    sim = Sim([VOICE], asr=FakeAsr())
    listening(sim)
    assert sim.send(CallEndedInput()) == []
    assert sim.done
    assert sim.notified_body("end") == {"reason": "Hangup", "session_id": "sess-1"}


@pytest.mark.parametrize("timeout_ms,listen_ms", [(0, 5000), (999_999, 60_000), (1, 1)])
def test_listening_time_defaults_and_bound(timeout_ms: int, listen_ms: int) -> None:
    sim = Sim([{**VOICE, "timeout_ms": timeout_ms}], asr=FakeAsr())
    assert listening(sim).listen_ms == listen_ms


def test_next_on_input_voice_is_not_followed_and_the_trace_says_so() -> None:
    sim = Sim([{**VOICE, "next": {"type": "hangup"}}, {"type": "hangup"}], asr=FakeAsr())
    rec = listening(sim)
    assert sim.traces[-1].error == NEXT_ON_VOICE
    sim.media(RecordingFinished(record_id=rec.record_id, path=rec.path, duration_ms=900,
                                reason="speech_end"))
    assert sim.events[-1]["type"] == "input_voice"


def test_two_utterances_in_one_session_get_their_own_files() -> None:
    sim = Sim([VOICE, VOICE, {"type": "hangup"}], asr=FakeAsr())
    first = listening(sim)
    commands = sim.media(RecordingFinished(record_id=first.record_id, path=first.path,
                                           duration_ms=800, reason="speech_end"))
    second = commands[0]
    assert isinstance(second, RecordCommand) and second.path != first.path
    assert not any(isinstance(c, StopRecordCommand) for c in commands)

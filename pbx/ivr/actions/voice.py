"""Voice actions: `voip_bridge` (the call's audio to a WebSocket room; terminal, the
front handles the bridge's end) and `input_voice` (speech recognition, docs/asr.md).

input_voice: the shell is asked whether a recogniser is there (`asr` request, stage
"check": an HTTP service or local pocketsphinx); without one the provider hears
`error{"ASR service not available"}` at once, before the caller is kept listening.
Else the media worker listens (a RecordCommand with `listen_ms` = the action's
`timeout_ms`, into the ASR spool): the caller has `timeout_ms` to start speaking and
the energy VAD ends the utterance at the silence after it (or `[asr] max_speech_ms`).
The utterance goes back to the shell (stage "recognize"), which recognises it and
deletes the file; the provider hears `input_voice{text, confidence}`. Choices:
nobody speaking within `timeout_ms` is `input_voice{"", 0.0}` (an answer, not an
error); digits pressed while listening are ignored; a failed recognition or capture
is an `error` event naming why.

Phases: WAIT_ASR (`AwaitingRecognition`), RECORDING (`Recording`, shared with
torecord; `pbx.ivr.actions.record.finished` hands a listening recording's end here).
"""

from __future__ import annotations

from pbx.ivr.models import ErrorEvent, InputVoiceAction, InputVoiceEvent, VoipBridgeAction
from pbx.ivr.phases import AwaitingRecognition, Digits, PhaseData, Recording
from pbx.ivr.requests import AsrResult
from pbx.ivr.session import Session
from pbx.ivr.variables import safe_name
from pbx.messages import RecordCommand, RecordingFinished, WsBridgeCommand

ASR_UNAVAILABLE = "ASR service not available"
BRIDGE_TIMEOUT_MS = 30_000
# What was said goes to the provider, so there is nothing for a `next` to follow (as on
# dtmf_menu: not refused, but said in the step's trace; docs/actions.md "next").
NEXT_ON_VOICE = "input_voice: `next` is not followed: what was said goes to the provider"
# input_voice: the caller's time to start speaking when `timeout_ms` is not positive.
LISTEN_DEFAULT_MS = 5000
LISTEN_MAX_MS = 60_000
# The longest utterance any worker allows (`[asr] max_speech_ms` is at most this): the
# capture's length bound, which the worker lowers to its own setting.
SPEECH_MAX_MS = 120_000
# The capture's end event comes at most this long after its bound (the closing tick).
LISTEN_END_SLACK_S = 2.0


def voip_bridge(s: Session, action: VoipBridgeAction, typeahead: Digits) -> PhaseData:
    # Choice: a timeout that is not positive means the default.
    timeout_ms = action.timeout_ms if action.timeout_ms > 0 else BRIDGE_TIMEOUT_MS
    s.commands.append(
        WsBridgeCommand(
            uri=action.create_room_uri, headers=dict(action.headers), timeout_ms=timeout_ms
        )
    )
    return s.end("VoipBridge")


def input_voice(s: Session, action: InputVoiceAction, typeahead: Digits) -> PhaseData:
    if action.next is not None:
        s.errors.append(NEXT_ON_VOICE)
    return s.recognize({"stage": "check"})


def asr_answer(s: Session, data: AwaitingRecognition, result: AsrResult) -> PhaseData:
    """The shell's answer: whether to listen (check), or the utterance's text."""
    if result.error is not None:
        return s.ask(ErrorEvent(reason=result.error))
    if data.stage == "check":
        return _listen(s)
    return s.ask(InputVoiceEvent(text=result.text, confidence=result.confidence))


def _listen(s: Session) -> PhaseData:
    node = s.env.node
    assert isinstance(node, InputVoiceAction)
    listen_ms = node.timeout_ms if node.timeout_ms > 0 else LISTEN_DEFAULT_MS
    listen_ms = min(listen_ms, LISTEN_MAX_MS)
    s.env.record_id += 1
    max_ms = listen_ms + SPEECH_MAX_MS
    s.commands.append(
        RecordCommand(
            record_id=s.env.record_id,
            # One file per utterance; the session id and record id make it unique.
            path=f"{safe_name(s.env.call.session_id)}_{s.env.record_id}.wav",
            area="asr",
            max_duration_ms=max_ms,
            stop_digits="",
            listen_ms=listen_ms,
        )
    )
    return Recording(record_id=s.env.record_id, due=s.now + max_ms / 1000 + LISTEN_END_SLACK_S)


def heard(s: Session, data: Recording, ev: RecordingFinished) -> PhaseData:
    """The capture ended: the shell recognises it (or, nothing said, only deletes it)."""
    if ev.reason == "error":
        return s.ask(ErrorEvent(reason="listening failed: the utterance could not be written"))
    node = s.env.node
    assert isinstance(node, InputVoiceAction)
    return s.recognize({"stage": "recognize", "file": ev.path, "reason": ev.reason,
                        "scene": node.scene, "duration_ms": ev.duration_ms,
                        "speech_start_ms": ev.speech_start_ms})

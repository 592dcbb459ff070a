"""`torecord` and `voicemail` (docs/actions.md): a prompt (torecord's own, or the
voicemail greeting), then the media worker records until `#`, the hang-up or the
length limit. A torecord's file lands in `recording_url` / `recording_duration` and
`next` is followed (or the provider hears `recording_complete`); a voicemail message
goes in the target's mailbox, then goodbye and hang-up, no provider step.

File names carry the time of `now` in UTC (`YYYYmmdd_HHMMSS`), so they too are a
pure function of the inputs.

Phases: RECORD_PROMPT (`RecordPrompt`), VM_GREETING (`VoicemailGreeting`),
RECORDING (`Recording`).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Literal

from pbx.ivr.actions import voice
from pbx.ivr.models import (
    ErrorEvent,
    InputVoiceAction,
    RecordingCompleteEvent,
    ToRecordAction,
    VoicemailAction,
)
from pbx.ivr.phases import Digits, PhaseData, Recording, RecordPrompt, VoicemailGreeting
from pbx.ivr.session import Session
from pbx.ivr.variables import safe_name
from pbx.messages import (
    AudioComplete,
    MediaFailure,
    RecordCommand,
    RecordingFinished,
    TimerFired,
)

# Voicemail: greeting (a missing greeting file leaves the beep only), goodbye after the
# message. A `voicemail` action may name its own greeting (`greeting`, an extension).
VOICEMAIL_GREETING = "sounds/voicemail_greeting.wav"
VOICEMAIL_GOODBYE = "sounds/goodbye.wav"
# Recording length when `max_duration_secs` is unset (or not positive), and the most
# a provider may ask for.
DEFAULT_RECORD_SECS = 120
MAX_RECORD_SECS = 3600
VOICEMAIL_MAX_SECS = 120
RECORD_STOP_DIGITS = "#"
# A media failure while recording is either a refused start (nothing follows) or a
# write error (its RecordingFinished follows on the same tick): wait this long for it.
RECORD_FAILURE_GRACE_MS = 1000
# A recording's RecordingFinished comes at most this long after its max duration (the
# beep before it, the tick that closes the file).
RECORD_END_SLACK_S = 2.0


def torecord(s: Session, action: ToRecordAction, typeahead: Digits) -> PhaseData:
    """Prompt, optional beep, then record. Choice: the prompt is not interruptible and
    digits pressed before the recording starts are dropped (a `#` must not end it at
    once)."""
    if action.prompt:
        return RecordPrompt(play_id=s.play(action.prompt, interruptible=False))
    return _start(s)


def voicemail(s: Session, action: VoicemailAction, typeahead: Digits) -> PhaseData:
    """Greeting, beep, message in the target's mailbox (the media worker writes the
    JSON record with the length), goodbye, hang-up. A greeting that cannot be played
    (no such file) leaves the beep only."""
    play_id = s.play(action.greeting or VOICEMAIL_GREETING, interruptible=False)
    return VoicemailGreeting(play_id=play_id, end_reason=f"Voicemail({action.target})")


def prompt_done(s: Session, data: RecordPrompt, ev: AudioComplete) -> PhaseData:
    return _start(s)


def greeting_done(
    s: Session, data: VoicemailGreeting, ev: AudioComplete | MediaFailure
) -> PhaseData:
    return _start(s, data.end_reason)


def _utc(now: float, form: str) -> str:
    return datetime.fromtimestamp(int(now), UTC).strftime(form)


def _start(s: Session, end_reason: str | None = None) -> PhaseData:
    node = s.env.node
    call = s.env.call
    stamp = _utc(s.now, "%Y%m%d_%H%M%S")
    metadata: dict[str, Any] | None = None
    if isinstance(node, VoicemailAction):
        area: Literal["recordings", "voicemail"] = "voicemail"
        path = f"{safe_name(node.target)}/{stamp}_{safe_name(call.session_id)}"
        beep = True
        max_secs = VOICEMAIL_MAX_SECS
        metadata = {
            "caller": call.caller,
            "callee": call.callee,
            "target": node.target,
            "session_id": call.session_id,
            "started_at": _utc(s.now, "%Y-%m-%dT%H:%M:%SZ"),
        }
    else:
        assert isinstance(node, ToRecordAction)
        area = "recordings"
        path = f"{safe_name(call.session_id)}/{stamp}"
        beep = node.beep
        secs = node.max_duration_secs
        max_secs = min(secs, MAX_RECORD_SECS) if secs and secs > 0 else DEFAULT_RECORD_SECS
    # Two recordings of one session within a second would share a name.
    last = s.env.last_record_path
    if last is not None and last.startswith(path):
        path = f"{path}_{s.env.record_id + 1}"
    path += ".wav"
    s.env.last_record_path = path
    s.env.record_id += 1
    s.commands.append(
        RecordCommand(
            record_id=s.env.record_id,
            path=path,
            area=area,
            max_duration_ms=max_secs * 1000,
            stop_digits=RECORD_STOP_DIGITS,
            beep=beep,
            metadata=metadata,
        )
    )
    return Recording(
        record_id=s.env.record_id, due=s.now + max_secs + RECORD_END_SLACK_S,
        end_reason=end_reason,
    )


def finished(s: Session, data: Recording, ev: RecordingFinished) -> PhaseData:
    """The recording ended (`#`, max length, stop, or a write error after part of it
    was written): recording_complete in every case while the call is up (docs/decisions.md)."""
    s.cancel_timer(data.active_timer)  # the grace timer of a media failure, if any
    node = s.env.node
    if isinstance(node, InputVoiceAction):
        return voice.heard(s, data, ev)
    if isinstance(node, VoicemailAction):
        return s.close(VOICEMAIL_GOODBYE, None, f"Voicemail({node.target})")
    assert isinstance(node, ToRecordAction)
    # docs/actions.md "torecord": recordings/{session_id}/{YYYYmmdd_HHMMSS}.wav, whatever the
    # configured directory is called.
    url = f"recordings/{ev.path}"
    secs = (ev.duration_ms + 500) // 1000
    s.env.variables["recording_url"] = url
    s.env.variables["recording_duration"] = str(secs)
    if node.next is not None:
        return s.execute(node.next, ())
    return s.ask(RecordingCompleteEvent(url=url, duration_secs=secs))


def trouble(s: Session, data: Recording, ev: MediaFailure) -> PhaseData:
    """A media failure while recording: a write error is followed by its
    RecordingFinished, a refused start by nothing. Wait a little to tell which."""
    s.errors.append(f"recording: {ev.reason}")
    if data.failure is not None:
        return data
    return replace(data, failure=ev.reason, grace_timer=s.arm_timer(RECORD_FAILURE_GRACE_MS))


def failed(s: Session, data: Recording, ev: TimerFired) -> PhaseData:
    """No recording came of it (refused by the media worker)."""
    reason = data.failure or "no recording"
    if isinstance(s.env.node, VoicemailAction):
        return s.fail(f"voicemail: recording failed: {reason}")
    return s.ask(ErrorEvent(reason=f"recording failed: {reason}"))

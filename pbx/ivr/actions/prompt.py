"""`prompt`: play a file, or text synthesised by the shell (docs/actions.md), then
follow `next` or tell the provider `audio_complete`. Also where a TTS result comes
back (for a prompt here, for a menu in `pbx.ivr.actions.menu`) and where a prompt
that cannot be played is reported.

Phases: PROMPT (`Prompting`), WAIT_TTS (`AwaitingSpeech`).
"""

from __future__ import annotations

from dataclasses import replace

from pbx.ivr.actions import menu
from pbx.ivr.models import AudioCompleteEvent, DtmfEvent, ErrorEvent, PromptAction
from pbx.ivr.phases import AwaitingSpeech, Digits, PhaseData, Prompting
from pbx.ivr.requests import TtsResult
from pbx.ivr.session import Session
from pbx.messages import AudioComplete, DtmfDigit, MediaFailure

TTS_UNAVAILABLE = "TTS service not available"


def recorded_parts(action: PromptAction) -> list[str]:
    """`record_name_list`: prompts (recordings in the sounds directory) played one
    after the other as one prompt, their names separated by commas."""
    names = action.record_name_list or ""
    return [name.strip() for name in names.split(",") if name.strip()]


def run(s: Session, action: PromptAction, typeahead: Digits) -> PhaseData:
    # Choice: record_name_list first, as rustpbx plays it in place of `file`.
    parts = recorded_parts(action)
    if parts:
        play_id = s.play(parts[0], action.interruptible)
        return Prompting(play_id=play_id, rest=tuple(parts[1:]))
    if action.file:
        return Prompting(play_id=s.play(action.file, action.interruptible))
    if action.tts_text:
        # docs/decisions.md "Text to speech": synthesised, then played (or error{reason}).
        return s.synthesize(action.tts_text, action.tts_voice, "prompt")
    return s.fail("prompt: missing required field 'file' (or 'tts_text', 'record_name_list')")


def _node(s: Session) -> PromptAction:
    node = s.env.node
    assert isinstance(node, PromptAction)
    return node


def digit(s: Session, data: Prompting, ev: DtmfDigit) -> PhaseData:
    node = _node(s)
    if not node.interruptible:
        # Type-ahead (docs/decisions.md "Type-ahead").
        return replace(data, typeahead=(*data.typeahead, ev.digit))
    s.stop_play(data.play_id, ev.stopped_play_id)
    # rustpbx asks the provider about the digit whatever `next` is.
    if node.next is not None and node.next.takes_digits and not s.rustpbx:
        return s.execute(node.next, [ev.digit])
    return s.ask(DtmfEvent(digit=ev.digit), data.typeahead)


def done(s: Session, data: Prompting, ev: AudioComplete) -> PhaseData:
    node = _node(s)
    if data.rest:
        # The next part of a record_name_list: still the same prompt.
        play_id = s.play(data.rest[0], node.interruptible)
        return Prompting(play_id=play_id, typeahead=data.typeahead, rest=data.rest[1:])
    if node.next is not None:
        return s.execute(node.next, data.typeahead)
    # Choice: the kept digits survive the provider round trip and feed the action it
    # answers with, if that takes digits ("feed the next action that takes digits",
    # docs/decisions.md "Type-ahead").
    # rustpbx always says `interrupted: false`.
    interrupted = bool(data.typeahead) and not s.rustpbx
    return s.ask(AudioCompleteEvent(interrupted=interrupted), data.typeahead)


def play_failed(s: Session, data: PhaseData, ev: MediaFailure) -> PhaseData:
    """A prompt (or menu greeting, collection or recording prompt) could not be played:
    the provider hears of it."""
    return s.ask(ErrorEvent(reason=f"playback failed: {ev.reason}"), data.kept_digits())


def speech_done(s: Session, data: AwaitingSpeech, result: TtsResult) -> PhaseData:
    if result.file is None:
        reason = result.error or TTS_UNAVAILABLE
        s.errors.append(f"tts: {reason}")
        # Spec §8 "TTS Audio Fallback": the provider gets error{reason} and decides.
        return s.ask(ErrorEvent(reason=reason))
    if data.purpose == "prompt":
        return Prompting(play_id=s.play(result.file, _node(s).interruptible))
    return menu.speech_done(s, data, result.file)

"""`[tts]` and `[asr]`: text to speech for prompts' `tts_text` and speech recognition for
`input_voice` (docs/asr.md)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from pbx.settings.base import Section as _Section


class TtsSettings(_Section):
    """Text to speech for `tts_text`: an HTTP service if `url` is set, else local
    espeak-ng when installed, else the provider gets an `error` event."""

    url: str | None = None
    voice: str = "en-us"
    timeout_ms: int = Field(default=5_000, gt=0)
    cache_dir: str = "sounds/.tts"


# What the local recogniser listens for when the action's scene has no vocabulary of
# its own: one phrase of these (pocketsphinx on 8 kHz telephone audio recognises a short
# list far better than free dictation; docs/asr.md). No "oh": it takes "no" and "zero".
DEFAULT_ASR_VOCABULARY = (
    "yes", "no", "zero", "one", "two", "three", "four", "five", "six", "seven",
    "eight", "nine", "ten", "operator", "agent", "help", "cancel", "repeat", "menu",
    "stop", "okay", "correct", "wrong", "sales", "support", "billing",
)


class AsrSettings(_Section):
    """Speech recognition for `input_voice` (docs/asr.md): an HTTP service if `url` is
    set (the OpenAI-compatible transcription shape), else local pocketsphinx when
    installed and `local` is on, else the provider gets an `error` event. The media
    worker captures the utterance (energy VAD) into `spool_dir`; the IVR executor
    recognises it and deletes the file."""

    # POST multipart/form-data (`file` = the WAV, `model`, ...) -> JSON `{"text": ...}`.
    url: str | None = None
    api_key: str | None = None  # sent as `Authorization: Bearer <api_key>`; never traced
    model: str = "whisper-1"  # the form's `model` field
    language: str | None = None  # the form's `language` field (ISO-639-1), when set
    timeout_ms: int = Field(default=8_000, gt=0)  # one HTTP recognition, all of it
    # Local offline recognition (pocketsphinx from PyPI, English) when there is no url.
    local: bool = True
    local_timeout_ms: int = Field(default=10_000, gt=0)  # CPU/time budget of one decode
    # Without a vocabulary for the scene: false = one phrase of `vocabulary`, true = the
    # model's free dictation (poor on telephone audio).
    local_free_text: bool = False
    vocabulary: list[str] = Field(default_factory=lambda: list(DEFAULT_ASR_VOCABULARY))
    # Per `input_voice` scene: the phrases the local recogniser listens for; sent to an
    # HTTP service as the `prompt` hint.
    scenes: dict[str, list[str]] = Field(default_factory=dict)
    # Recognitions one executor runs at once (local ones are CPU work in a child
    # process at low priority); more wait for a slot within their timeout.
    max_concurrent: int = Field(default=2, gt=0, le=64)
    # Capture (media worker): the caller has the action's `timeout_ms` to start speaking;
    # the utterance ends after `end_silence_ms` of silence, or `max_speech_ms` after it began.
    end_silence_ms: int = Field(default=800, ge=100, le=10_000)
    max_speech_ms: int = Field(default=15_000, ge=1_000, le=120_000)
    # Speech is a 20 ms frame this much louder than the noise floor the VAD tracks,
    # and at least `min_speech_dbfs` loud.
    speech_margin_db: float = Field(default=12.0, gt=0, le=60)
    min_speech_dbfs: float = Field(default=-45.0, ge=-90, le=0)
    # Utterances on their way from a worker to an executor (16-bit 8 kHz WAV files, at
    # most 16 kB per second of speech). Files older than `spool_max_age_s` (an executor
    # that died mid-recognition) are swept by the executors.
    spool_dir: str = "run/asr"
    spool_max_age_s: int = Field(default=300, ge=10)

    @field_validator("vocabulary")
    @classmethod
    def _check_vocabulary(cls, v: list[str]) -> list[str]:
        return _check_phrases(v, "vocabulary")

    @field_validator("scenes")
    @classmethod
    def _check_scenes(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        return {scene: _check_phrases(p, f"scenes.{scene}") for scene, p in v.items()}

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"url must be an http:// or https:// URL, got {v!r}")
        return v


def _check_phrases(phrases: list[str], key: str) -> list[str]:
    """A recogniser vocabulary: 1-1000 phrases of lower-case words (letters and
    apostrophes), so each becomes a grammar alternative as it is."""
    if not 0 < len(phrases) <= 1000:
        raise ValueError(f"{key}: between 1 and 1000 phrases")
    for phrase in phrases:
        if not re.fullmatch(r"[a-z']+( [a-z']+){0,9}", phrase):
            raise ValueError(
                f"{key}: {phrase!r} is not lower-case words separated by single spaces"
            )
    return phrases

"""WAV (RIFF/WAVE) files: a tolerant reader for prompts and a crash-safe writer for recordings.

Reader (`parse_wav`): bytes in, `WavAudio` out, no file I/O. Understands the
format tags prompts come in — PCM (1: 8-bit unsigned, 16/24/32-bit signed),
IEEE float (3: 32/64-bit), A-law (6) and µ-law (7), and WAVE_FORMAT_EXTENSIBLE
(0xFFFE) wrapping any of them — at any rate and channel count. A data chunk
whose declared size runs past the end of the file (a recording whose writer
was killed, or the 0xFFFFFFFF "unknown length" streaming convention) is read up
to the last whole frame present.

Writer (`WavWriter`): 16-bit PCM written as it goes. The header first goes out
with placeholder sizes (the largest the 32-bit fields allow), so a file cut
short at any moment still opens in players that read to the end of the data;
`patch()` writes the true sizes of what has been written so far (the recorder
calls it about once a second and at the end), `truncate()` shortens the file
(the recorder trims a stop digit's tone), `close()` patches and closes. The
writer uses a raw file descriptor: no userspace buffer, one `write(2)` per
batch the caller hands it, one `pwrite(2)` per patch.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_IEEE_FLOAT = 0x0003
WAVE_FORMAT_ALAW = 0x0006
WAVE_FORMAT_MULAW = 0x0007
WAVE_FORMAT_EXTENSIBLE = 0xFFFE

HEADER_SIZE = 44
_MAX_CHUNK = 0xFFFFFFFF
# KSDATAFORMAT_SUBTYPE_* GUIDs share this tail after the 2-byte format tag.
_GUID_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"


class WavError(ValueError):
    """Bytes that are not a WAV file this reader understands; the text says why."""


@dataclass(frozen=True, slots=True)
class WavAudio:
    """Decoded WAV contents.

    `kind` is "pcm" (samples: float64, frames × channels, on the int16 scale,
    i.e. full scale ±32768) or "alaw" / "ulaw" (samples: uint8 codes, frames ×
    channels, untouched so 8 kHz mono G.711 can pass straight to the wire).
    """

    rate: int
    channels: int
    kind: str
    samples: np.ndarray

    @property
    def frames(self) -> int:
        return int(self.samples.shape[0])


def parse_wav(data: bytes) -> WavAudio:
    """A whole WAV file's bytes -> WavAudio; WavError for anything unusable."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise WavError("not a RIFF/WAVE file")
    pos = 12
    fmt: bytes | None = None
    body: bytes | None = None
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        start = pos + 8
        end = min(start + size, len(data))  # a data chunk may be cut short
        if chunk_id == b"fmt ":
            fmt = data[start:end]
        elif chunk_id == b"data":
            body = data[start:end]
            if fmt is not None:
                break
        pos = start + size + (size & 1)  # chunks are padded to even sizes
    if fmt is None:
        raise WavError("no fmt chunk")
    if body is None:
        raise WavError("no data chunk")
    if len(fmt) < 16:
        raise WavError(f"fmt chunk of {len(fmt)} bytes is too short")
    tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == WAVE_FORMAT_EXTENSIBLE:
        if len(fmt) < 40:
            raise WavError("WAVE_FORMAT_EXTENSIBLE fmt chunk too short")
        guid = fmt[24:40]
        if guid[2:] != _GUID_TAIL:
            raise WavError("unknown WAVE_FORMAT_EXTENSIBLE sub-format")
        (tag,) = struct.unpack_from("<H", guid)
    if channels < 1:
        raise WavError("zero channels")
    if not 1000 <= rate <= 384_000:
        raise WavError(f"unusable sample rate {rate} Hz")
    width = (bits + 7) // 8
    if block_align != width * channels or width == 0:
        # Trust bits and channels; a wrong block_align is a common writer bug.
        block_align = width * channels
    if block_align == 0:
        raise WavError("zero block size")
    usable = len(body) - len(body) % block_align
    raw = np.frombuffer(body, dtype=np.uint8, count=usable)
    frames = usable // block_align

    kind = "pcm"
    samples: np.ndarray
    if tag == WAVE_FORMAT_PCM:
        if bits == 8:
            samples = (raw.astype(np.float64) - 128.0) * 256.0
        elif bits == 16:
            samples = raw.view("<i2").astype(np.float64)
        elif bits == 24:
            b = raw.reshape(-1, 3).astype(np.int32)
            v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
            v = np.where(v & 0x800000, v - (1 << 24), v)
            samples = v.astype(np.float64) / 256.0
        elif bits == 32:
            samples = raw.view("<i4").astype(np.float64) / 65536.0
        else:
            raise WavError(f"{bits}-bit PCM is not supported")
    elif tag == WAVE_FORMAT_IEEE_FLOAT:
        if bits == 32:
            samples = raw.view("<f4").astype(np.float64) * 32768.0
        elif bits == 64:
            samples = raw.view("<f8") * 32768.0
        else:
            raise WavError(f"{bits}-bit float is not supported")
        samples = np.nan_to_num(samples, nan=0.0, posinf=32767.0, neginf=-32768.0)
    elif tag in (WAVE_FORMAT_ALAW, WAVE_FORMAT_MULAW):
        if bits != 8:
            raise WavError(f"{bits}-bit G.711 is not supported")
        kind = "alaw" if tag == WAVE_FORMAT_ALAW else "ulaw"
        samples = raw.copy()
    else:
        raise WavError(f"WAV format tag 0x{tag:04x} is not supported")
    return WavAudio(
        rate=rate, channels=channels, kind=kind, samples=samples.reshape(frames, channels)
    )


def pcm_header(channels: int, rate: int, data_bytes: int, bits: int = 16) -> bytes:
    """The canonical 44-byte header of a PCM WAV file holding `data_bytes` of samples."""
    block = channels * bits // 8
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        min(36 + data_bytes, _MAX_CHUNK),
        b"WAVE",
        b"fmt ",
        16,
        WAVE_FORMAT_PCM,
        channels,
        rate,
        rate * block,
        block,
        bits,
        b"data",
        data_bytes,
    )


def placeholder_size(channels: int, bits: int = 16) -> int:
    """The largest data size, in whole frames, whose RIFF size still fits 32 bits."""
    block = channels * bits // 8
    room = _MAX_CHUNK - 36
    return room - room % block


class WavWriter:
    """A 16-bit PCM WAV file written incrementally through a raw descriptor.

    Every method may raise OSError; the file is then left as far as it got.
    """

    __slots__ = ("path", "channels", "rate", "data_bytes", "_fd", "_patched")

    def __init__(self, path: str | os.PathLike[str], channels: int, rate: int = 8000) -> None:
        if channels not in (1, 2):
            raise ValueError("channels must be 1 or 2")
        self.path = Path(path)
        self.channels = channels
        self.rate = rate
        self.data_bytes = 0
        self._patched = -1
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        # A symlink planted at the final component must not redirect the write.
        flags |= getattr(os, "O_NOFOLLOW", 0)
        self._fd: int | None = os.open(self.path, flags, 0o644)
        try:
            self._write_all(pcm_header(channels, rate, placeholder_size(channels)))
        except OSError:
            self._close_fd()
            raise

    @property
    def frame_bytes(self) -> int:
        return 2 * self.channels

    @property
    def frames(self) -> int:
        return self.data_bytes // self.frame_bytes

    @property
    def closed(self) -> bool:
        return self._fd is None

    def _write_all(self, data: bytes | memoryview) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def append(self, pcm: bytes | memoryview) -> None:
        """Append interleaved little-endian int16 frames."""
        if self._fd is None:
            raise OSError("WAV file already closed")
        if len(pcm) % self.frame_bytes:
            raise ValueError("partial frame")
        self._write_all(pcm)
        self.data_bytes += len(pcm)

    def patch(self) -> None:
        """Write the true sizes into the header (one pwrite), if they changed."""
        if self._fd is None or self._patched == self.data_bytes:
            return
        os.pwrite(self._fd, pcm_header(self.channels, self.rate, self.data_bytes), 0)
        self._patched = self.data_bytes

    def truncate(self, frames: int) -> None:
        """Drop everything after the first `frames` frames."""
        if self._fd is None:
            raise OSError("WAV file already closed")
        frames = max(0, min(frames, self.frames))
        self.data_bytes = frames * self.frame_bytes
        os.ftruncate(self._fd, HEADER_SIZE + self.data_bytes)

    def close(self) -> None:
        """Patch the header and close; the descriptor is closed even if the patch fails."""
        if self._fd is None:
            return
        try:
            self.patch()
        finally:
            self._close_fd()

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

"""Independent SIP stacks as phones for the interop tests (tests/e2e/test_interop.py):
pjsua2 (pjsip 2.15, PyPI `pjsua2-python`) run by tests/e2e/pjsua_agent.py, Debian's
baresip 1.0 (libre) driven through its ctrl_tcp module, and Debian's linphonec 5.1
(liblinphone, belle-sip) driven through its stdin. All are headless: each sends a
tone of its own frequency on every call and records what it receives to a WAV file,
which `dominant_hz` and `rms` read back. Every phone is a process of its own that
`close()` ends (terminate, then kill), bounded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

from tests.e2e.harness import UA_PORTS, free_port, ports_free, wait_until
from tests.provider_process import stop_process

AGENT = Path(__file__).resolve().parent / "pjsua_agent.py"
BARESIP_MODULES = Path("/usr/lib/baresip/modules")


# ---------------------------------------------------------------- audio checks


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """16-bit mono PCM of a WAV file and its rate. The data chunk is read to the end of
    the file whatever its header says: a phone killed mid-call never finalises it."""
    raw = path.read_bytes()
    assert raw[:4] == b"RIFF" and raw[8:12] == b"WAVE", f"{path} is not a WAV file"
    pos, rate = 12, 8000
    while pos + 8 <= len(raw):
        chunk, size = raw[pos:pos + 4], int.from_bytes(raw[pos + 4:pos + 8], "little")
        if chunk == b"fmt ":
            rate = int.from_bytes(raw[pos + 12:pos + 16], "little")
        elif chunk == b"data":
            data = raw[pos + 8:]
            return np.frombuffer(data[:len(data) // 2 * 2], dtype="<i2"), rate
        pos += 8 + size + (size & 1)
    raise AssertionError(f"{path} has no data chunk")


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if len(samples) else 0.0


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    """The strongest frequency (FFT peak, DC and below 100 Hz left out)."""
    window = samples.astype(np.float64) * np.hanning(len(samples))
    spectrum = np.abs(np.fft.rfft(window))
    freqs = np.fft.rfftfreq(len(samples), 1 / rate)
    spectrum[freqs < 100] = 0
    return float(freqs[int(np.argmax(spectrum))])


def loud_part(samples: np.ndarray, rate: int, threshold: float = 300.0) -> np.ndarray:
    """The 20 ms frames whose RMS is above `threshold` (what was heard, not silence)."""
    frame = rate // 50
    frames = samples[:len(samples) // frame * frame].reshape(-1, frame)
    loud = frames[np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)) > threshold]
    return loud.reshape(-1)


def assert_tone(path: Path, hz: float, min_seconds: float = 0.5, tolerance: float = 15.0,
                since_s: float = 0.0) -> None:
    """`path` holds at least `min_seconds` of audible audio (after `since_s`), whose
    strongest frequency is `hz`."""
    samples, rate = read_wav(path)
    loud = loud_part(samples[int(since_s * rate):], rate)
    assert len(loud) >= min_seconds * rate, (
        f"{path.name}: {len(loud) / rate:.2f} s audible of {len(samples) / rate:.2f} s "
        f"(RMS {rms(samples):.0f})")
    found = dominant_hz(loud, rate)
    assert abs(found - hz) <= tolerance, f"{path.name}: heard {found:.0f} Hz, not {hz} Hz"


# ---------------------------------------------------------------- pjsua2


class PjsuaPhone:
    """A pjsua2 phone process; `events` are its JSON events, in order."""

    def __init__(self, workdir: Path, user: str, password: str, registrar: str, *,
                 tone_hz: int, transport: str = "udp", lifetime_s: float = 120.0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.user = user
        self.record = workdir / "received.wav"
        self.log = workdir / "pjsua.log"
        self.events: list[dict[str, Any]] = []
        with (workdir / "stderr.txt").open("wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(AGENT), "--user", user, "--password", password,
                 "--registrar", registrar, "--rtp-port", str(free_port(even=True)),
                 "--transport", transport, "--tone", str(tone_hz),
                 "--record", str(self.record), "--log", str(self.log),
                 "--lifetime", str(lifetime_s)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_event(lambda e: e["event"] == "ready", 20, "pjsua2 to start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                continue

    def send(self, op: str, **fields: Any) -> None:
        assert self.proc.stdin is not None and self.proc.poll() is None, self.trace()
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()

    def wait_event(self, predicate: Any, timeout: float, what: str,
                   since: int = 0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((e for e in self.events[since:] if predicate(e)), None)
        try:
            event: dict[str, Any] = wait_until(found, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}\nevents: {self.events}\n{self.trace()}") from None
        return event

    def wait_state(self, state: str, timeout: float = 15, since: int = 0) -> dict[str, Any]:
        return self.wait_event(lambda e: e["event"] == "state" and e["state"] == state,
                               timeout, f"pjsua2 {self.user} call {state}", since)

    def register(self) -> None:
        mark = len(self.events)
        self.send("register")
        event = self.wait_event(lambda e: e["event"] == "reg", 15, "a REGISTER answer", mark)
        assert event["code"] == 200, (event, self.trace())

    def trace(self, tail: int = 6000) -> str:
        """pjsua's log (SIP messages included), the last `tail` characters (-1: all)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text if tail < 0 else text[-tail:]

    def close(self) -> None:
        """Unregister (so no later test rings this phone's dead contact), then quit."""
        if self.proc.poll() is None:
            try:
                if any(e["event"] == "reg" and e["code"] == 200 for e in self.events):
                    mark = len(self.events)
                    self.send("unregister")
                    self.wait_event(lambda e: e["event"] == "reg", 5, "the unREGISTER", mark)
                self.send("quit")
                self.proc.wait(5)
            except (OSError, AssertionError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(2)  # it ends at the pipe's EOF
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


# ---------------------------------------------------------------- baresip


def sip_port() -> int:
    """A port for baresip's sip_listen: it and the next one (baresip listens for TLS
    there) free for UDP and TCP, from `UA_PORTS`, out of the ephemeral range: a port
    picked by binding port 0 could be taken by an outgoing connection before baresip
    binds it (a CI run saw "SIP/TLS transport failed: Address already in use")."""
    for _ in range(200):
        port = random.choice(UA_PORTS)
        if ports_free(range(port, port + 2), (socket.SOCK_DGRAM, socket.SOCK_STREAM)):
            return port
    raise RuntimeError("no free port pair for baresip")


class BaresipPhone:
    """Debian's baresip with a config of its own in `workdir`: ausine sends `tone_hz`,
    sndfile records both directions (`dump-*-dec.wav` is what it received), ctrl_tcp
    takes commands (netstring JSON) and reports events (`events`)."""

    def __init__(self, workdir: Path, user: str, password: str, registrar: str, *,
                 tone_hz: int, transport: str = "udp", lifetime_s: float = 120.0) -> None:
        baresip = shutil.which("baresip")
        assert baresip, "baresip is not installed (make test installs Debian's baresip-core)"
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.user = user
        params = ";transport=tcp" if transport == "tcp" else ""
        (workdir / "accounts").write_text(
            f"<sip:{user}@{registrar}{params}>;auth_pass={password};regint=300"
            ";answermode=manual\n")
        self.events: list[dict[str, Any]] = []
        self.responses: dict[str, dict[str, Any]] = {}
        self._token = 0
        self.log = workdir / "baresip.log"
        # A port can still be taken between the pick and baresip's bind: a start that
        # fails so is retried with new ports.
        for _attempt in range(3):
            self.ctrl_port = free_port(socket.SOCK_STREAM)
            self._write_config(tone_hz)
            # -t: it quits by itself after `lifetime_s` even if the test process dies.
            with self.log.open("wb") as out:
                self.proc = subprocess.Popen([baresip, "-f", str(workdir), "-s",
                                              "-t", str(int(lifetime_s))],
                                             stdin=subprocess.DEVNULL,
                                             stdout=out, stderr=subprocess.STDOUT)
            sock = wait_until(lambda: self._connect() or self.proc.poll() is not None, 15,
                              "baresip's ctrl_tcp")
            if isinstance(sock, socket.socket):
                self.sock = sock
                break
            self.proc.wait(5)
        else:
            raise AssertionError(f"baresip did not start:\n{self.trace()}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _write_config(self, tone_hz: int) -> None:
        (self.workdir / "config").write_text("\n".join([
            f"sip_listen 127.0.0.1:{sip_port()}",
            f"module_path {BARESIP_MODULES}",
            "module g711.so", "module ausine.so", "module aubridge.so", "module sndfile.so",
            "module_app account.so", "module_app menu.so", "module_app ctrl_tcp.so",
            f"ctrl_tcp_listen 127.0.0.1:{self.ctrl_port}",
            f"snd_path {self.workdir}",
            # ausine makes 48 kHz stereo only; baresip resamples to the codec's 8 kHz mono.
            "ausrc_srate 48000", "auplay_srate 48000", "ausrc_channels 2",
            "auplay_channels 1",
            f"audio_source ausine,{tone_hz}",
            "audio_player aubridge,nowhere",
            "audio_alert aubridge,nowhere",
            "rtp_timeout 0", "",
        ]))

    def _connect(self) -> socket.socket | None:
        try:
            return socket.create_connection(("127.0.0.1", self.ctrl_port), timeout=1)
        except OSError:
            return None

    def _read(self) -> None:
        buffer = b""
        self.sock.settimeout(0.2)
        while True:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                if self.proc.poll() is not None:
                    return
                continue
            except OSError:
                return
            if not data:
                return
            buffer += data
            while b":" in buffer:  # netstrings: <length>:<json>,
                length, _, rest = buffer.partition(b":")
                if len(rest) < int(length) + 1:
                    break
                message = json.loads(rest[:int(length)])
                buffer = rest[int(length) + 1:]
                if message.get("response"):
                    self.responses[str(message.get("token"))] = message
                else:
                    self.events.append(message)

    def command(self, command: str, params: str = "", timeout: float = 10) -> dict[str, Any]:
        self._token += 1
        token = str(self._token)
        body = json.dumps({"command": command, "params": params, "token": token}).encode()
        self.sock.sendall(str(len(body)).encode() + b":" + body + b",")
        try:
            response: dict[str, Any] = wait_until(lambda: self.responses.get(token), timeout,
                                                  f"baresip's answer to {command}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.trace()}") from None
        return response

    def wait_event(self, kind: str, timeout: float = 15, since: int = 0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((e for e in self.events[since:] if e.get("type") == kind), None)
        try:
            event: dict[str, Any] = wait_until(found, timeout, f"baresip {kind}")
        except AssertionError as e:
            raise AssertionError(f"{e}\nevents: {self.events}\n{self.trace()}") from None
        return event

    def wait_registered(self, timeout: float = 15) -> None:
        """Its registration was answered 200 (as its log says: the REGISTER_OK event
        may come before the test's ctrl_tcp connection)."""
        try:
            wait_until(lambda: re.search(r"\{0/\w+/v4\} 200 OK", self.trace(-1)), timeout,
                       f"baresip {self.user} registered")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.trace()}") from None

    def received_wav(self) -> Path:
        """The WAV file of the audio it decoded on its (latest) call."""
        files = sorted(self.workdir.glob("dump-*-dec.wav"), key=lambda p: p.stat().st_mtime)
        assert files, f"baresip recorded nothing: {list(self.workdir.iterdir())}"
        return files[-1]

    def trace(self, tail: int = 6000) -> str:
        """Its console output (SIP trace included), the last `tail` characters (-1: all)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text if tail < 0 else text[-tail:]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        stop_process(self.proc)


# ---------------------------------------------------------------- linphonec


def write_tone_wav(path: Path, hz: int, seconds: float, rate: int = 8000) -> None:
    """A 16-bit mono WAV file of a sine tone at half scale."""
    t = np.arange(int(seconds * rate)) / rate
    samples = (16000 * np.sin(2 * np.pi * hz * t)).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())


class LinphonePhone:
    """Debian's linphonec 5.1 (`linphone-cli`) with a config and HOME of its own in
    `workdir`, driven through its stdin. Headless by its file mode (`soundcard use
    files`): it sends a WAV file of a `tone_hz` tone (`play`) and records what it
    receives (`record`). Its console lines are `lines`; its log (`-d 6`) holds the SIP
    messages. `dtmf` is how it sends digits: "rfc4733" or "info" (`[sip] use_info`)."""

    def __init__(self, workdir: Path, user: str, password: str, registrar: str, *,
                 tone_hz: int, dtmf: str = "rfc4733", lifetime_s: float = 120.0) -> None:
        linphonec = shutil.which("linphonec")
        assert linphonec, "linphonec is not installed (make test installs linphone-cli)"
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.user = user
        self.record = workdir / "received.wav"
        self.log = workdir / "linphonec.log"
        self.lines: list[str] = []
        tone = workdir / "tone.wav"
        write_tone_wav(tone, tone_hz, lifetime_s)
        # Without its database directory 5.1's core never reaches its "on" state: it
        # does not listen on the rc file's SIP port, nor register, and answers every
        # INVITE 503 ("core global state is not on").
        (workdir / ".local" / "share" / "linphone").mkdir(parents=True, exist_ok=True)
        (workdir / "linphonerc").write_text("\n".join([
            "[sip]",
            f"sip_port={free_port()}",
            f"use_info={int(dtmf == 'info')}",
            f"use_rfc2833={int(dtmf == 'rfc4733')}",
            "[rtp]",
            f"audio_rtp_port={free_port(even=True)}",
            "[video]", "enabled=0", "capture=0", "display=0", "",
        ]))
        with (workdir / "stderr.txt").open("wb") as stderr:
            self.proc = subprocess.Popen(
                # timeout: it ends after `lifetime_s` even if the test process dies.
                ["timeout", "-s", "KILL", str(int(lifetime_s)), linphonec,
                 "-c", str(workdir / "linphonerc"), "-d", "6", "-l", str(self.log)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
                env={**os.environ, "HOME": str(workdir)})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.send("soundcard use files")
        self.send(f"play {tone}")
        self.send(f"record {self.record}")
        self.send(f"register sip:{user}@{registrar} sip:{registrar} {password}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None and self.proc.poll() is None, self.trace()
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_line(self, pattern: str, timeout: float = 15, since: int = 0) -> str:
        """The first console line from `since` on that matches `pattern` (a regex)."""
        def found() -> str | None:
            return next((line for line in self.lines[since:] if re.search(pattern, line)),
                        None)
        try:
            line: str = wait_until(found, timeout, f"linphonec {self.user}: {pattern}")
        except AssertionError as e:
            raise AssertionError(f"{e}\nconsole: {self.lines}\n{self.trace()}") from None
        return line

    def wait_registered(self, timeout: float = 15) -> None:
        try:
            wait_until(lambda: "to [LinphoneRegistrationOk]" in self.trace(-1), timeout,
                       f"linphonec {self.user} registered")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.trace()}") from None

    def trace(self, tail: int = 6000) -> str:
        """Its log (SIP messages included), the last `tail` characters (-1: all)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text if tail < 0 else text[-tail:]

    def close(self) -> None:
        """Quit (it unregisters as it does), bounded; killed if it does not."""
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(5)
            except (OSError, AssertionError, subprocess.TimeoutExpired):
                # `timeout` passes SIGTERM on to linphonec (a SIGKILL would not).
                stop_process(self.proc)
        self._reader.join(2)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def pause(seconds: float) -> None:
    """Let audio flow for a while (the check is on what was recorded, not on time)."""
    time.sleep(seconds)

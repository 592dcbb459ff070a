"""Recording and the WebSocket bridge through the media worker process (ZeroMQ ROUTER in
the test, RTP on loopback, an aiohttp WebSocket server in a thread)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from aiohttp import WSMsgType, web
from test_media_worker import READY_TIMEOUT_S, ROOT, TIMEOUT_S, Front, free_port

from media import g711
from media.rtp import RtpPacket, build_rtp, parse_rtp
from pbx.messages import (
    MediaEvent,
    MediaFailure,
    MediaReady,
    MediaRecord,
    MediaRecordStop,
    MediaRelease,
    MediaReleased,
    MediaRemote,
    MediaWsBridge,
    RecordingFinished,
    WsBridgeEnded,
)


class Worker:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        (tmp / "sounds").mkdir()
        self.rec_dir = tmp / "rec"
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        # Above the kernel's ephemeral range (32768-60999), and not test_media_worker's.
        low = 63200 + 2 * (os.getpid() % 1000)
        config = tmp / "pbx.toml"
        config.write_text(
            f'[zmq]\nmedia_endpoint = "{endpoint}"\n\n'
            f'[media]\nrtp_ip = "127.0.0.1"\nrtp_ports = "{low}-{low + 99}"\n'
            f'sounds_dir = "{tmp / "sounds"}"\nrecordings_dir = "{self.rec_dir}"\n'
            f'voicemail_dir = "{tmp / "vm"}"\nheartbeat_ms = 200\n',
            encoding="utf-8",
        )
        self.front = Front(endpoint)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.media"],
            cwd=ROOT,
            env={**os.environ, "PBX_CONFIG": str(config)},
            stderr=subprocess.PIPE,
        )
        self.phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.phone.bind(("127.0.0.1", 0))
        self.phone.settimeout(TIMEOUT_S)
        self.addr: tuple[str, int] = ("", 0)
        self.seq = 0

    def start_call(self, call_id: str = "c1") -> None:
        assert isinstance(self.front.recv(READY_TIMEOUT_S), MediaReady)
        allocated = self.front.allocate(call_id)
        assert allocated.error is None
        self.addr = (allocated.rtp_ip, allocated.rtp_port)
        self.front.send(
            MediaRemote(
                call_id=call_id,
                remote_ip="127.0.0.1",
                remote_port=self.phone.getsockname()[1],
                payload_type=0,
                codec="PCMU",
            )
        )

    def send_audio(self, pcm: np.ndarray) -> None:
        """Send `pcm` as 20 ms RTP packets, paced in real time."""
        start = time.monotonic()
        for i in range(pcm.size // 160):
            frame = g711.encode(pcm[160 * i : 160 * (i + 1)], "PCMU").tobytes()
            self.phone.sendto(
                build_rtp(RtpPacket(0, self.seq, 160 * self.seq, 0x42, frame)), self.addr
            )
            self.seq += 1
            delay = start + (i + 1) * 0.020 - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def close(self) -> None:
        self.phone.close()
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self.front.close()
        sys.stderr.write(err.decode(errors="replace"))


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    w = Worker(tmp_path)
    try:
        yield w
    finally:
        w.close()


def tone(seconds: float, hz: float) -> np.ndarray:
    t = np.arange(int(8000 * seconds)) / 8000.0
    return (np.sin(2 * np.pi * hz * t) * 8000).astype(np.int16)


def dominant_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(float)))
    return float(np.argmax(spectrum) * 8000 / x.size)


def test_record_stop_and_escape(worker: Worker) -> None:
    worker.start_call()
    front = worker.front
    front.send(MediaRecord(call_id="c1", record_id=1, path="../escape.wav"))
    failure = front.recv_kind(MediaEvent)
    assert isinstance(failure.event, MediaFailure) and "outside" in failure.event.reason
    assert not (worker.tmp / "escape.wav").exists()

    front.send(MediaRecord(call_id="c1", record_id=2, path="s1/msg.wav", metadata={"x": 1}))
    worker.send_audio(tone(1.0, 1000.0))
    front.send(MediaRecordStop(call_id="c1"))
    done = front.recv_kind(MediaEvent)
    assert isinstance(done.event, RecordingFinished)
    assert done.event.reason == "stopped" and done.event.path == "s1/msg.wav"
    assert 950 <= done.event.duration_ms <= 1150
    with wave.open(str(worker.rec_dir / "s1" / "msg.wav")) as w:
        assert w.getnframes() // 8 == done.event.duration_ms and w.getframerate() == 8000
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert abs(dominant_hz(pcm) - 1000) < 5
    assert (worker.rec_dir / "s1" / "msg.wav.json").exists()
    front.send(MediaRelease(call_id="c1"))
    front.recv_kind(MediaReleased)


def test_killed_worker_leaves_a_playable_file(worker: Worker) -> None:
    worker.start_call()
    worker.front.send(MediaRecord(call_id="c1", record_id=1, path="crash.wav", stereo=True))
    worker.send_audio(tone(1.5, 700.0))
    path = worker.rec_dir / "crash.wav"
    # Killed once the worker has written more than a second (it may lag behind the
    # sender on a loaded machine), not at a moment that assumes it keeps up.
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and (
            not path.exists() or path.stat().st_size - 44 < 4 * 9000):
        time.sleep(0.02)
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(TIMEOUT_S)
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, 8000)
        # the header was patched after the first second; the data runs a little further
        assert 8000 <= w.getnframes() <= 12000
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2)
    assert pcm.shape[0] == w.getnframes()
    assert abs(dominant_hz(pcm[:, 0]) - 700) < 5
    assert path.stat().st_size - 44 >= 4 * w.getnframes()


# ---------------------------------------------------------------- WebSocket


class WsServer:
    """An aiohttp WebSocket server in a thread: /echo echoes binary frames,
    /close closes after `close_after` frames. Remembers the request headers."""

    def __init__(self, close_after: int = 10) -> None:
        self.close_after = close_after
        self.headers: dict[str, str] = {}
        self.received = 0
        self.connected = threading.Event()  # a WebSocket handshake completed
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _echo(self, request: web.Request) -> web.WebSocketResponse:
        self.headers = dict(request.headers)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.connected.set()
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                self.received += 1
                await ws.send_bytes(msg.data)
                if request.path == "/close" and self.received >= self.close_after:
                    await ws.close()
        return ws

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/echo", self._echo)
        app.router.add_get("/close", self._echo)
        # Open sockets must not hold up the teardown of a failed test.
        self.runner = web.AppRunner(app, shutdown_timeout=1.0)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        self.loop.run_until_complete(site.start())
        self._ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
        fut.result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture
def ws_server() -> Iterator[WsServer]:
    server = WsServer()
    try:
        yield server
    finally:
        server.close()


def _collect(phone: socket.socket, seconds: float) -> list[RtpPacket]:
    out: list[RtpPacket] = []
    deadline = time.monotonic() + seconds
    phone.settimeout(0.05)
    while time.monotonic() < deadline:
        try:
            data, _ = phone.recvfrom(2048)
        except TimeoutError:
            continue
        out.append(parse_rtp(data))
    phone.settimeout(TIMEOUT_S)
    return out


def test_ws_echo_caller_hears_itself(worker: Worker, ws_server: WsServer) -> None:
    worker.start_call()
    front = worker.front
    front.send(
        MediaWsBridge(
            call_id="c1",
            uri=f"ws://127.0.0.1:{ws_server.port}/echo",
            headers={"X-Room": "r42"},
            timeout_ms=3000,
        )
    )
    # The connect (not a fixed 0.3 s: a loaded machine can take longer, and the frames
    # sent before the bridge is up are not echoed).
    assert ws_server.connected.wait(TIMEOUT_S), "the worker did not connect"
    # 2 s of tone for 40 frames back: the worker's side of the bridge may come up a
    # few hundred ms after the server saw the connect (what it sends before is lost).
    sender = threading.Thread(target=worker.send_audio, args=(tone(2.0, 900.0),))
    sender.start()
    # Until 40 frames came back, bounded: a loaded machine delays but must not lose them.
    packets: list[RtpPacket] = []
    deadline = time.monotonic() + 6.0
    while len(packets) < 40 and time.monotonic() < deadline:
        packets += _collect(worker.phone, 0.2)
    sender.join()
    assert ws_server.headers.get("X-Room") == "r42"
    assert ws_server.received >= 40
    assert len(packets) >= 40
    heard = g711.decode(np.frombuffer(b"".join(p.payload for p in packets), np.uint8), "PCMU")
    assert abs(dominant_hz(heard) - 900) < 5
    # paced: sequence numbers consecutive, one talk spurt (or a few after underruns)
    assert sum(p.marker for p in packets) <= 3
    front.send(MediaRelease(call_id="c1"))
    # No WsBridgeEnded before it:
    assert [leg.call_id for leg in front.recv_kind(MediaReleased).legs] == ["c1"]


def test_ws_peer_close_and_connect_failures(worker: Worker, ws_server: WsServer) -> None:
    worker.start_call()
    front = worker.front
    front.send(MediaWsBridge(call_id="c1", uri=f"ws://127.0.0.1:{ws_server.port}/close"))
    assert ws_server.connected.wait(TIMEOUT_S), "the worker did not connect"
    worker.send_audio(tone(0.4, 900.0))
    ended = front.recv_kind(MediaEvent)
    assert ended == MediaEvent(call_id="c1", event=WsBridgeEnded(reason="closed by peer"))

    front.send(MediaWsBridge(call_id="c1", uri=f"ws://127.0.0.1:{free_port()}/none"))
    ended = front.recv_kind(MediaEvent)
    assert isinstance(ended.event, WsBridgeEnded)
    assert ended.event.reason.startswith("connect failed")

    # a server that accepts TCP but never answers the upgrade: the connect times out
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        t0 = time.monotonic()
        front.send(
            MediaWsBridge(
                call_id="c1", uri=f"ws://127.0.0.1:{silent.getsockname()[1]}/", timeout_ms=300
            )
        )
        ended = front.recv_kind(MediaEvent)
        assert ended == MediaEvent(call_id="c1", event=WsBridgeEnded(reason="timeout"))
        assert time.monotonic() - t0 < 2.0
    finally:
        silent.close()
    front.send(MediaWsBridge(call_id="c1", uri="not a uri"))
    ended = front.recv_kind(MediaEvent)
    assert isinstance(ended.event, WsBridgeEnded) and "connect failed" in ended.event.reason
    assert worker.proc.poll() is None

"""The media worker process end to end: ZeroMQ ROUTER in the test, RTP on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from media.rtp import RtpPacket, build_event, build_rtp, parse_rtp
from pbx.messages import (
    AudioComplete,
    DtmfDigit,
    MediaAllocate,
    MediaAllocated,
    MediaBridge,
    MediaEvent,
    MediaHeartbeat,
    MediaPlay,
    MediaPorts,
    MediaReady,
    MediaRelease,
    MediaReleased,
    MediaRemote,
    ReleasedLeg,
    decode,
    encode,
)
from workers import media as media_worker

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0  # a cold numba cache compiles the kernels first
TIMEOUT_S = 5.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_wav(path: Path, seconds: float) -> None:
    t = np.arange(int(8000 * seconds)) / 8000.0
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())


class Front:
    """The test's stand-in for the front's media ROUTER. It keeps the worker's announced
    ports and hands them out as the front does (`allocate`), never one twice."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.identity = b""
        self.ports: list[int] = []  # announced, not yet handed out
        self.handed: set[int] = set()
        self.seq = 0
        self.rtp_ip = ""  # as the worker declares it
        # What the heartbeats' timing histograms counted, all of them.
        self.play_starts = 0
        self.ticks_timed = 0
        self.rtp_received = self.rtp_sent = 0  # the heartbeats' packet counts, summed

    def recv(self, timeout_s: float = TIMEOUT_S) -> Any:
        if not self.sock.poll(int(timeout_s * 1000)):
            raise TimeoutError("no message from the media worker")
        identity, frame = self.sock.recv_multipart()
        self.identity = identity
        msg = decode(frame)
        if isinstance(msg, MediaReady | MediaHeartbeat):
            self.rtp_ip = msg.rtp_ip
        if isinstance(msg, MediaPorts | MediaHeartbeat):
            self.ports = [p for p in msg.ports if p not in self.handed]
        if isinstance(msg, MediaHeartbeat):
            self.play_starts += sum(msg.play_start_buckets)
            self.ticks_timed += sum(msg.tick_late_buckets)
            self.rtp_received += msg.rtp_packets_received
            self.rtp_sent += msg.rtp_packets_sent
        return msg

    def recv_kind(self, kind: type, timeout_s: float = TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(msg, kind):
                return msg
            if not isinstance(msg, MediaHeartbeat | MediaPorts):
                raise AssertionError(f"expected {kind.__name__}, got {msg!r}")

    def recv_released(self, count: int = 1) -> dict[str, ReleasedLeg]:
        """The statistics of the next `count` released legs, by call id: the worker
        sends one MediaReleased per tick for all the legs released in it."""
        legs: dict[str, ReleasedLeg] = {}
        while len(legs) < count:
            legs.update((leg.call_id, leg) for leg in self.recv_kind(MediaReleased).legs)
        assert len(legs) == count, legs
        return legs

    def allocate(self, call_id: str, inband_dtmf: bool = True) -> MediaAllocated:
        """MediaAllocate for the first announced port; the worker's answer as the front
        learns it: a refusal (MediaAllocated with its error), or the announcement that
        covers the allocation's `seq` (a confirmation: returned as the MediaAllocated
        the worker no longer sends, at its declared address)."""
        if not self.ports:
            self.recv_kind(MediaPorts)
        port = self.ports.pop(0)
        self.handed.add(port)
        self.seq += 1
        self.send(MediaAllocate(call_id=call_id, rtp_port=port, seq=self.seq,
                                inband_dtmf=inband_dtmf))
        return self.answer(call_id, port)

    def answer(self, call_id: str, port: int) -> MediaAllocated:
        """The answer to the last MediaAllocate sent (`allocate`)."""
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(msg, MediaAllocated):
                assert msg.call_id == call_id and msg.error is not None
                return msg
            if isinstance(msg, MediaPorts | MediaHeartbeat) and msg.allocate_seq >= self.seq:
                return MediaAllocated(call_id=call_id, rtp_ip=self.rtp_ip, rtp_port=port)
            if not isinstance(msg, MediaHeartbeat | MediaPorts):
                raise AssertionError(f"expected the allocation's answer, got {msg!r}")

    def send(self, msg: Any) -> None:
        self.sock.send_multipart([self.identity, encode(msg)])

    def send_raw(self, frame: bytes) -> None:
        self.sock.send_multipart([self.identity, frame])

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def worker(request: pytest.FixtureRequest, tmp_path: Path
           ) -> Iterator[tuple[Front, subprocess.Popen[bytes]]]:
    """The worker process; an indirect parameter adds lines to its [media] section."""
    sounds = tmp_path / "sounds"
    sounds.mkdir()
    write_wav(sounds / "half.wav", 0.5)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    # Above the kernel's ephemeral range (32768-60999): no client socket of the test
    # (free_port) can take one of the worker's RTP ports meanwhile.
    low = 61000 + 2 * (os.getpid() % 1000)
    config = tmp_path / "pbx.toml"
    config.write_text(
        f'[zmq]\nmedia_endpoint = "{endpoint}"\n\n'
        f'[media]\nrtp_ip = "127.0.0.1"\nrtp_ports = "{low}-{low + 99}"\n'
        f'sounds_dir = "{sounds}"\nheartbeat_ms = 200\n{getattr(request, "param", "")}\n',
        encoding="utf-8",
    )
    front = Front(endpoint)
    env = {**os.environ, "PBX_CONFIG": str(config)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.media"], cwd=ROOT, env=env, stderr=subprocess.PIPE
    )
    try:
        yield front, proc
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        front.close()
        sys.stderr.write(err.decode(errors="replace"))


def test_worker_plays_reports_dtmf_and_releases(
    worker: tuple[Front, subprocess.Popen[bytes]],
) -> None:
    front, proc = worker
    ready = front.recv(READY_TIMEOUT_S)
    assert isinstance(ready, MediaReady) and ready.worker_id.startswith("media-")
    assert ready.worker_id.endswith(f"-{proc.pid}") and front.identity == ready.worker_id.encode()
    pool = front.recv()  # its pre-bound ports, at once
    assert isinstance(pool, MediaPorts) and pool.allocate_seq == 0
    # port_pool is 64, bounded by the range's 50 pairs (another program may hold some)...
    assert 0 < len(pool.ports) <= 50
    assert all(p % 2 == 0 for p in pool.ports)
    hb = front.recv_kind(MediaHeartbeat, 2.0)
    assert hb.calls == 0 and hb.ports == pool.ports  # ...and in every heartbeat

    front.send_raw(b"this is not a message")  # logged and ignored
    allocated = front.allocate("call-1")
    assert allocated.error is None and allocated.rtp_ip == "127.0.0.1"
    assert allocated.rtp_port % 2 == 0
    worker_addr = (allocated.rtp_ip, allocated.rtp_port)

    phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    phone.bind(("127.0.0.1", 0))
    phone.settimeout(TIMEOUT_S)
    try:
        front.send(
            MediaRemote(
                call_id="call-1",
                remote_ip="127.0.0.1",
                remote_port=phone.getsockname()[1],
                payload_type=0,
                codec="PCMU",
                dtmf_payload_type=101,
            )
        )
        front.send(MediaPlay(call_id="call-1", play_id=7, file="sounds/half.wav"))
        packets: list[RtpPacket] = []
        arrivals: list[float] = []
        while len(packets) < 25:
            data, addr = phone.recvfrom(2048)
            arrivals.append(time.monotonic())
            packets.append(parse_rtp(data))
            assert addr == worker_addr
        assert packets[0].marker and all(len(p.payload) == 160 for p in packets)
        assert [p.sequence for p in packets] == [
            (packets[0].sequence + i) % 65536 for i in range(25)
        ]
        # paced, not burst: 25 frames of 20 ms take about 480 ms, and frames come 20 ms
        # apart (the median gap: a worker descheduled once on a loaded machine sends
        # late, and a span bound alone would fail on that)
        gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:], strict=False))
        assert arrivals[-1] - arrivals[0] > 0.35, arrivals
        assert 0.015 < gaps[len(gaps) // 2] < 0.025, gaps
        done = front.recv_kind(MediaEvent)
        assert done == MediaEvent(call_id="call-1", event=AudioComplete(play_id=7))
        # The heartbeats during the prompt (every 200 ms) counted the live leg's packets.
        assert 0 < front.rtp_sent <= 25 and front.rtp_received == 0

        for end in (False, True, True, True):
            phone.sendto(
                build_rtp(RtpPacket(101, 1, 1234, 0x55, build_event(9, end, 10, 800))), worker_addr
            )
        digit = front.recv_kind(MediaEvent)
        assert digit == MediaEvent(call_id="call-1", event=DtmfDigit(digit="9"))

        front.send(MediaRelease(call_id="call-1"))
        released = front.recv_released()["call-1"]
        assert released.packets_sent == 25 and released.packets_received == 4
        # the port is closed: a new allocation still works and nothing else arrived
        assert front.allocate("call-2").error is None
        assert proc.poll() is None
        # The heartbeats timed the one prompt's start (MediaPlay -> first RTP) and the ticks.
        front.recv_kind(MediaHeartbeat, 2.0)
        assert front.play_starts == 1 and front.ticks_timed > 0
        assert (front.rtp_sent, front.rtp_received) == (25, 4)  # none twice, none missed
    finally:
        phone.close()


@pytest.mark.parametrize("worker", ["", "sched_batch = false"], indirect=True)
def test_worker_runs_as_a_batch_thread_unless_told_not_to(
    worker: tuple[Front, subprocess.Popen[bytes]], request: pytest.FixtureRequest
) -> None:
    """[media] sched_batch (default on): a packet that wakes the worker never preempts the
    thread running on its core; off, the worker is an ordinary thread."""
    front, proc = worker
    assert isinstance(front.recv(READY_TIMEOUT_S), MediaReady)
    batch = "false" not in request.node.callspec.params["worker"]
    assert os.sched_getscheduler(proc.pid) == (os.SCHED_BATCH if batch else os.SCHED_OTHER)


def test_batch_scheduling_refused_leaves_an_ordinary_thread(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A host that refuses the policy (a seccomp profile) gets a warning, not a worker
    that fails to start."""
    def refuse(*_: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    assert media_worker.batch_scheduling(True) is False
    assert "SCHED_BATCH refused" in caplog.text
    assert media_worker.batch_scheduling(False) is False


def test_bad_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[media]\nrtp_ports = "9-1"\n', encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "workers.media"],
        cwd=ROOT,
        env={**os.environ, "PBX_CONFIG": str(config)},
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert b"rtp_ports" in proc.stderr and b"bad.toml" in proc.stderr


def test_bind_rtp_socket_skips_taken_ports() -> None:
    from workers.portpool import bind_rtp_socket

    low = 40000 + 2 * (os.getpid() % 2000)
    taken = bind_rtp_socket("127.0.0.1", low, low + 2)
    assert taken is not None
    try:
        port = taken.getsockname()[1]
        assert port in (low, low + 2)
        other = bind_rtp_socket("127.0.0.1", low, low + 3)
        assert other is not None and other.getsockname()[1] == ({low, low + 2} - {port}).pop()
        assert bind_rtp_socket("127.0.0.1", low, low + 3) is None  # both even ports taken
        other.close()
    finally:
        taken.close()


def _dtmf_frames(digit_freqs: tuple[int, int], frames: int) -> list[bytes]:
    from media import g711

    t = np.arange(160 * frames) / 8000.0
    x = 9000 * (np.sin(2 * np.pi * digit_freqs[0] * t) + np.sin(2 * np.pi * digit_freqs[1] * t))
    codes = g711.encode(x.astype(np.int16), "PCMU")
    return [codes[160 * k : 160 * (k + 1)].tobytes() for k in range(frames)]


def test_worker_inband_and_rfc4733_one_press_rtcp_and_latching(
    worker: tuple[Front, subprocess.Popen[bytes]],
) -> None:
    """A phone behind NAT (its packets come from another port than its SDP says) presses
    5 as RFC 4733 and in-band at once: one DtmfDigit; the prompt follows the phone's real
    address; the worker's RTCP port is rtp_port + 1 and answers with reports."""
    front, _ = worker
    assert isinstance(front.recv(READY_TIMEOUT_S), MediaReady)
    allocated = front.allocate("c", inband_dtmf=True)
    assert allocated.error is None
    worker_addr = (allocated.rtp_ip, allocated.rtp_port)
    sdp_phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # what the SDP says
    nat_phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # where packets come from
    rtcp_peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (sdp_phone, nat_phone, rtcp_peer):
        s.bind(("127.0.0.1", 0))
        s.settimeout(TIMEOUT_S)
    try:
        front.send(
            MediaRemote(
                call_id="c",
                remote_ip="127.0.0.1",
                remote_port=sdp_phone.getsockname()[1],
                payload_type=0,
                codec="PCMU",
                dtmf_payload_type=101,
            )
        )
        front.send(MediaPlay(call_id="c", play_id=1, file="half.wav"))
        first, addr = sdp_phone.recvfrom(2048)  # before any packet from the phone: SDP address
        assert addr == worker_addr and parse_rtp(first).marker

        silence = bytes([0xFF]) * 160
        tone = _dtmf_frames((770, 1336), 6)  # '5', 120 ms
        seq, ts = 100, 8000
        for k in range(40):
            if 10 <= k < 16:
                payload = tone[k - 10]
            else:
                payload = silence
            nat_phone.sendto(build_rtp(RtpPacket(0, seq, ts, 0x77, payload)), worker_addr)
            seq += 1
            if 10 <= k < 16:  # the same press as RFC 4733 (start ts = the tone's first frame)
                end = k == 15
                for _ in range(3 if end else 1):
                    ev = build_event(5, end, 10, (k - 9) * 160)
                    pkt = RtpPacket(101, seq, 8000 + 10 * 160, 0x77, ev, marker=k == 10)
                    nat_phone.sendto(build_rtp(pkt), worker_addr)
                    seq += 1
            ts += 160
            time.sleep(0.02)
        def next_digit(timeout_s: float) -> DtmfDigit:
            deadline = time.monotonic() + timeout_s
            while True:
                msg = front.recv_kind(MediaEvent, max(0.01, deadline - time.monotonic()))
                if isinstance(msg.event, DtmfDigit):
                    return msg.event

        # The first report may take a while on a loaded machine; after it, every packet
        # of the press has long been sent, so a second report would follow it closely.
        digits = [next_digit(TIMEOUT_S)]
        try:
            while True:
                digits.append(next_digit(0.5))
        except TimeoutError:
            pass
        assert [d.digit for d in digits] == ["5"], digits
        # latched: the prompt now goes to where the phone's packets come from
        nat_phone.settimeout(1.0)
        data, addr = nat_phone.recvfrom(2048)
        assert addr == worker_addr and len(parse_rtp(data).payload) == 160

        # RTCP on rtp_port + 1: an RR from the peer is taken (and latched)
        from media.rtcp import ReceiveStats, build_report, parse_compound

        rr = build_report(0x77, "phone", 0.0, 0.0, ReceiveStats(), None)
        rtcp_peer.sendto(rr, (allocated.rtp_ip, allocated.rtp_port + 1))
        rtcp_peer.settimeout(8.0)  # the first report comes within 0.5-1.5 x 5 s
        data, addr = rtcp_peer.recvfrom(2048)
        assert addr == (allocated.rtp_ip, allocated.rtp_port + 1)
        (report,) = parse_compound(data)
        assert report.sender is not None  # we sent RTP: an SR
        assert report.blocks and report.blocks[0].ssrc == 0x77

        front.send(MediaRelease(call_id="c"))
        released = front.recv_released()["c"]
        assert released.packets_lost == 0 and released.rtcp_received == 1
        assert released.rtcp_sent >= 1
    finally:
        for s in (sdp_phone, nat_phone, rtcp_peer):
            s.close()


def test_worker_drops_strangers_packets_and_counts_them(
    worker: tuple[Front, subprocess.Popen[bytes]],
) -> None:
    """Strict latching in the real worker: once the phone's packets latched its leg, a
    stranger's RFC 4733 presses, audio and RTCP at the same ports are dropped unseen, and
    counted in the heartbeats (per worker) and in MediaReleased (per leg)."""
    front, _ = worker
    assert isinstance(front.recv(READY_TIMEOUT_S), MediaReady)
    allocated = front.allocate("c", inband_dtmf=True)
    rtp_addr = (allocated.rtp_ip, allocated.rtp_port)
    rtcp_addr = (allocated.rtp_ip, allocated.rtp_port + 1)
    phone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (phone, stranger):
        s.bind(("127.0.0.1", 0))
    from media.rtcp import ReceiveStats, build_report

    try:
        front.send(MediaRemote(call_id="c", remote_ip="127.0.0.1",
                               remote_port=phone.getsockname()[1], payload_type=0,
                               codec="PCMU", dtmf_payload_type=101))  # fmt: skip
        for k in range(5):
            phone.sendto(build_rtp(RtpPacket(0, k, 160 * k, 0x77, bytes([0xFF]) * 160)),
                         rtp_addr)  # fmt: skip
            time.sleep(0.02)
        phone.sendto(build_report(0x77, "phone", 0.0, 0.0, ReceiveStats(), None), rtcp_addr)
        time.sleep(0.3)  # latched (RTP and RTCP) before the stranger starts
        sent = 0
        for k in range(10):  # presses of 8 and its tone, 10 x (event + audio)
            ev = build_event(8, k == 9, 10, 160 * (k + 1))
            stranger.sendto(build_rtp(RtpPacket(101, 500 + 2 * k, 9000, 0x666, ev, k == 0)),
                            rtp_addr)  # fmt: skip
            stranger.sendto(build_rtp(RtpPacket(0, 501 + 2 * k, 9000 + 160 * k, 0x666,
                                                _dtmf_frames((852, 1336), 1)[0])), rtp_addr)  # fmt: skip
            sent += 2
            time.sleep(0.02)
        for _ in range(3):
            stranger.sendto(build_report(0x666, "x", 0.0, 0.0, None, None), rtcp_addr)
        counted = [0, 0]
        deadline = time.monotonic() + TIMEOUT_S
        while counted != [sent, 3] and time.monotonic() < deadline:
            msg = front.recv(max(0.01, deadline - time.monotonic()))
            assert not isinstance(msg, MediaEvent), msg  # no digit, nothing
            if isinstance(msg, MediaHeartbeat):
                counted[0] += msg.rtp_foreign_dropped
                counted[1] += msg.rtcp_foreign_dropped
        assert counted == [sent, 3]
        front.send(MediaRelease(call_id="c"))
        released = front.recv_released()["c"]
        assert released.packets_received == 5 and released.rtcp_received == 1
        assert released.rtp_foreign_dropped == sent and released.rtcp_foreign_dropped == 3
        assert released.rtp_relatched == 0
    finally:
        phone.close()
        stranger.close()


@pytest.mark.parametrize("worker", ['rtp_socket = "shared"'], indirect=True)
def test_shared_port_legs_told_apart_by_source_and_strangers_reach_none(
    worker: tuple[Front, subprocess.Popen[bytes]],
) -> None:
    """Two legs on the worker's shared port, their phones on one IP with different
    ports: each leg hears its own prompt from the shared port and gets its own digit;
    bridged, a's audio reaches b; a stranger's RTP (digits, audio) and RTCP there reach
    no leg: no digit, nothing forwarded, counted per worker and none per leg."""
    front, _ = worker
    assert isinstance(front.recv(READY_TIMEOUT_S), MediaReady)
    ports = front.recv_kind(MediaPorts)
    assert ports.shared_port is not None and ports.shared_port not in ports.ports
    shared = ("127.0.0.1", ports.shared_port)
    phones = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in [*phones, stranger]:
        s.bind(("127.0.0.1", 0))
        s.settimeout(TIMEOUT_S)
    from media.rtcp import ReceiveStats, build_report

    try:
        for call, phone in zip(("a", "b"), phones, strict=True):
            front.seq += 1
            # The SDP address rides in the allocation (an inbound leg): it is what tells
            # this leg's packets apart on the shared port.
            front.send(MediaAllocate(
                call_id=call, rtp_port=shared[1], seq=front.seq,
                remote=MediaRemote(call_id=call, remote_ip="127.0.0.1",
                                   remote_port=phone.getsockname()[1], payload_type=0,
                                   codec="PCMU", dtmf_payload_type=101)))  # fmt: skip
            allocated = front.answer(call, shared[1])
            assert allocated.error is None, allocated
        front.send(MediaPlay(call_id="a", play_id=1, file="half.wav"))
        data, src = phones[0].recvfrom(2048)
        assert src == shared and parse_rtp(data).payload_type == 0
        # each phone presses its own key from its SDP address; a stranger sprays 9s
        for k in range(6):
            for digit, phone in ((1, phones[0]), (2, phones[1])):
                ev = build_event(digit, k >= 3, 10, 160 * (k + 1))
                phone.sendto(build_rtp(RtpPacket(101, 100 + k, 8000, 0x70 + digit, ev,
                                                 k == 0)), shared)  # fmt: skip
            ev = build_event(9, k >= 3, 10, 160 * (k + 1))
            stranger.sendto(build_rtp(RtpPacket(101, 300 + k, 4000, 0x666, ev, k == 0)), shared)
            time.sleep(0.02)
        phones[1].sendto(build_report(0x72, "b", 0.0, 0.0, ReceiveStats(), None),
                         (shared[0], shared[1] + 1))  # fmt: skip
        for _ in range(2):
            stranger.sendto(build_report(0x666, "x", 0.0, 0.0, None, None),
                            (shared[0], shared[1] + 1))  # fmt: skip
        digits: dict[str, str] = {}
        counted = [0, 0]
        deadline = time.monotonic() + TIMEOUT_S
        while (len(digits) < 2 or counted != [6, 2]) and time.monotonic() < deadline:
            try:
                msg = front.recv(max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
            if isinstance(msg, MediaEvent) and isinstance(msg.event, DtmfDigit):
                assert msg.call_id not in digits, "one press, one digit"
                digits[msg.call_id] = msg.event.digit
            elif isinstance(msg, MediaHeartbeat):
                counted[0] += msg.rtp_foreign_dropped
                counted[1] += msg.rtcp_foreign_dropped
        assert digits == {"a": "1", "b": "2"} and counted == [6, 2]
        # bridged: a's audio reaches b from the shared port, the stranger's never does
        front.send(MediaBridge(call_id="a", peer_call_id="b"))
        time.sleep(0.1)
        phones[1].settimeout(0.05)
        while True:  # what b heard before the bridge (fill)
            try:
                phones[1].recv(2048)
            except TimeoutError:
                break
        for k in range(10):
            phones[0].sendto(build_rtp(RtpPacket(0, 200 + k, 160 * k, 0x71, b"\x22" * 160)),
                             shared)  # fmt: skip
            stranger.sendto(build_rtp(RtpPacket(0, 400 + k, 160 * k, 0x666, b"\x11" * 160)),
                            shared)  # fmt: skip
            time.sleep(0.02)
        heard = []
        while True:
            try:
                data, src = phones[1].recvfrom(2048)
            except TimeoutError:
                break
            assert src == shared
            heard.append(parse_rtp(data).payload)
        assert sum(p == b"\x22" * 160 for p in heard) >= 8, len(heard)
        assert not any(b"\x11" in p for p in heard), "the stranger's audio was forwarded"
        for call in ("a", "b"):
            front.send(MediaRelease(call_id=call))
        released = front.recv_released(2)
        assert released["a"].packets_received == 16 and released["b"].packets_received == 6
        assert released["b"].rtcp_received == 1
        assert all(r.rtp_foreign_dropped == 0 and r.rtcp_foreign_dropped == 0
                   for r in released.values())
    finally:
        for s in [*phones, stranger]:
            s.close()


@pytest.mark.parametrize(("remote", "local", "refused"), [
    ("198.51.100.7", "203.0.113.1", None),
    ("127.0.0.1", "127.0.0.1", None),  # a one-host setup: its phones are on loopback too
    ("2001:db8::7", "2001:db8::1", None),
    ("2001:db8::7", "203.0.113.1", "not an IPv4 address"),  # was sent to 0.0.0.0: this host
    ("198.51.100.7", "2001:db8::1", "not an IPv6 address"),
    ("127.0.0.1", "203.0.113.1", "a loopback address"),  # this host's own UDP services
    ("::1", "2001:db8::1", "a loopback address"),
    ("224.0.0.1", "203.0.113.1", "not a unicast address"),
    ("255.255.255.255", "203.0.113.1", "not a unicast address"),
    ("0.0.0.0", "203.0.113.1", "not a unicast address"),
])
def test_rtp_destinations_a_worker_refuses(remote: str, local: str, refused: str | None) -> None:
    verdict = media_worker.destination_refused(remote, local)
    assert verdict == refused if refused is None else (verdict or "").startswith(refused)


def test_an_sdp_address_of_another_family_gets_no_rtp(
    worker: tuple[Front, subprocess.Popen[bytes]],
) -> None:
    """An IPv6 c= for a leg of an IPv4 worker: its address column was 0, and the prompt
    went to 0.0.0.0:port, which is this host. Refused now: nothing is sent until a usable
    address comes."""
    front, _ = worker
    assert isinstance(front.recv(READY_TIMEOUT_S), MediaReady)
    assert front.allocate("call-1").error is None
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(0.6)
    port = listener.getsockname()[1]
    try:
        front.send(MediaRemote(call_id="call-1", remote_ip="2001:db8::1", remote_port=port,
                               payload_type=0, codec="PCMU"))
        front.send(MediaPlay(call_id="call-1", play_id=1, file="sounds/half.wav"))
        with pytest.raises(TimeoutError):
            listener.recvfrom(2048)
        front.send(MediaRemote(call_id="call-1", remote_ip="127.0.0.1", remote_port=port,
                               payload_type=0, codec="PCMU"))
        listener.settimeout(TIMEOUT_S)
        data, _ = listener.recvfrom(2048)  # the same worker sends to a usable address
        assert parse_rtp(data).payload_type == 0
    finally:
        listener.close()

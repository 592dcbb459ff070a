"""The media engine: every call leg of one worker, sans-IO.

The worker shell feeds it front commands (`add_leg`, `set_remote`, `play`, ...),
received datagrams (`receive_rtp`) and a 20 ms `tick`, always passing `now`
(seconds on a monotonic clock); the engine returns the datagrams to send, as
`(call_id of the sending leg, bytes, (ip, port))`, and the `MediaEvent`s for
the front. No socket, no clock, no asyncio here. A leg is a `media.leg.Leg` (its
Python-side state, and properties over its row of the kernels' `LegTable`).

Playback is paced from a fixed origin per prompt (frame k is due at
`origin + k * ptime`), so it never drifts whatever the tick jitter. The origin
is the first tick after `play`, so frames sit on the tick grid (the shell
passes the nominal tick time as `now`) and frame 0 leaves at that tick. Prompts are G.711-encoded once when
loaded (`media.prompts`), so a tick only slices the encoded prompt and packs
12-byte headers. Sequence numbers and timestamps belong to the leg and
continue across prompts and forwarded audio (RFC 3550 §5.1); a new prompt
sets the marker bit and its timestamp advances by the wall-clock gap
since the leg's last packet.

The per-packet work runs in batches (`media.kernels.rtpbatch` over the arrays
of `media.legtable`): `receive_batch` takes a whole poll of datagrams through
one compiled pass (header, RFC 3550 statistics, latching, jitter, the receive
ring), a second one relays the packets of bridged legs into their peers'
streams (`relay`, a buffer the shell sends right away with one compiled loop),
a third places recorded legs' audio, received and relayed, in their recordings
(`media.kernels.recplace`), and Python gets only the packets that need it
(RFC 4733 digit detection, WebSocket legs); `tick_batch` builds every playing
leg's prompt frames into one buffer (`tx`) that the shell sends with one compiled
loop (and `record_tx` places what recorded legs hear of it).
`receive_rtp` and `tick` are the same per packet / as a list of datagrams.

Bridged legs forward audio to each other with the receiving side's SSRC,
sequence and a timestamp offset fixed at the start of each talk spurt,
transcoding PCMU <-> PCMA when their codecs differ; RFC 4733 packets are
forwarded with the peer's telephone-event payload type. A leg playing a prompt
does not take forwarded audio meanwhile. `_forward` is the rule, per packet
(the per-packet path, WebSocket audio); `relay_batch` does the same for a
receive batch, and the tests hold the two to the same bytes.

Strict latching (symmetric RTP, RFC 4961, made safe on a public address): a
leg answers where its caller's packets come from, and once latched it takes
packets from that source only; every other source's packets are dropped before
statistics, DTMF, audio, recording or relay, and counted (per leg in
ReleasedLeg, per worker in `foreign_dropped`). The rule, and when the latch
may move, is `media.kernels.rtpbatch`'s ("Strict latching"); the per-packet
path and RTCP (`receive_rtcp`, on its own port) follow the same rule.

A leg whose direction (ours, from `MediaRemote`) is recvonly or inactive is on
hold (RFC 3264 §5.1): it sends no RTP — its prompt's clock still runs, so
AudioComplete comes on time, while forwarded and WebSocket audio is dropped —
but it keeps receiving and sending RTCP. Resuming starts a new talk spurt.
"""

from __future__ import annotations

import heapq
import math
import random
from typing import Literal, NamedTuple

import numpy as np

from media import g711
from media.dtmf import EVENT_DIGITS, event_digit
from media.inband import InbandDetector
from media.kernels import recplace as _rp
from media.kernels import rtpbatch as _k
from media.leg import SAMPLE_RATE, Leg, Playback
from media.legtable import LegTable, PromptArena, TxBatch, ipv4_int, ipv4_str
from media.prompts import PromptCache, PromptError
from media.recorder import BEEP_PLAY_ID, Recorder
from media.rtcp import (
    REPORT_INTERVAL_S,
    ReceiveStats,
    RtcpError,
    RtcpReport,
    build_report,
)
from media.rtcp import parse_compound as parse_rtcp
from media.rtp import RtpError, RtpPacket, build_header, parse_event, parse_rtp, ts_add
from media.rxaudio import RxAudio
from media.wsbridge import WsBridges
from pbx.messages import (
    AudioComplete,
    DtmfDigit,
    MediaDtmfInfo,
    MediaEvent,
    MediaFailure,
    MediaPlay,
    MediaRecord,
    MediaRemote,
    MediaTimer,
    ReleasedLeg,
    TimerFired,
    WsBridgeEnded,
)

# At most this many frames of one prompt go out in one tick; a tick later than
# that slides the prompt's origin instead of bursting (the prompt ends later).
MAX_BURST_FRAMES = _k.MAX_BURST_FRAMES
# Frame due times are compared with this slack so float rounding of
# origin + k * ptime never pushes a frame to the next tick.
_EPS = 1e-7

STATIC_PAYLOAD_CODECS = {0: "PCMU", 8: "PCMA"}
# A latched RTCP source counts as silent only after this long (or the re-latch time if
# longer): RFC 3550 §6.3.5 times a participant out after 5 report intervals.
RTCP_SILENCE_S = 5 * REPORT_INTERVAL_S

Packet = tuple[str, bytes, tuple[str, int]]
# A received packet's actions that need Python (`receive_batch`).
_FOR_PYTHON = _k.ACT_PYTHON | _k.ACT_LATCHED
# An RFC 4733 end dated by its timestamp (`_event_interval`) is believed when it falls
# from this long before its end packet was read to a little after (the packet may lead the
# newest audio); outside, the map is not this stream's.
EVENT_MAP_WINDOW_S = 1.0
EVENT_MAP_LEAD_S = 0.1
DigitSource = Literal["rfc4733", "info", "inband"]


class EngineError(Exception):
    """A command for a leg this engine does not have, or otherwise unusable."""


class EngineTotals(NamedTuple):
    """What `MediaEngine.totals` counts."""

    # Dropped because they came from another source than their leg's latched one.
    rtp_foreign_dropped: int
    rtcp_foreign_dropped: int
    rtp_received: int  # valid RTP packets read on legs
    rtp_sent: int  # RTP packets sent on legs (prompts, relayed audio, events)
    presses_dropped: int  # key presses past a leg's MAX_PRESSES_PER_S (media.dtmfpress)


class MediaEngine:
    """All legs of one worker. Every method is synchronous and takes `now` where time matters."""

    def __init__(
        self,
        prompts: PromptCache,
        rng: random.Random | None = None,
        recorder: Recorder | None = None,
        latching: Literal["strict", "loose"] = "strict",
        relatch_silence_ms: int = 5000,
        fill_gaps: bool = True,
    ) -> None:
        """`latching` and `relatch_silence_ms`: the config's `[rtp]` (pbx.config).
        `fill_gaps`: keep every leg's stream going while nothing feeds it (comfort noise
        or silence, `media.kernels.rtpbatch.fill_tick`); off only in tests of the prompt
        pump alone."""
        self.prompts = prompts
        # The latch may move to a new source after the latched one has been silent this
        # long; in strict mode only to another SSRC (media.kernels.rtpbatch).
        self.relatch_s = relatch_silence_ms / 1000.0
        self.relatch_any_ssrc = latching == "loose"
        self._rtp_foreign_gone = 0  # foreign RTP packets of released legs
        self._received_gone = self._sent_gone = 0  # RTP packets of released legs
        self._presses_dropped = 0
        self._rtcp_foreign = 0
        self.recorder = recorder if recorder is not None else Recorder()
        self.ws = WsBridges()
        self._rng = rng or random.Random()
        self.legs: dict[str, Leg] = {}
        self._playing: dict[str, Leg] = {}
        self._timed: dict[str, Leg] = {}
        # Legs with an RFC 4733 event started and not reported (media.dtmf: `expire`).
        self._events_open: dict[str, Leg] = {}
        # In-band DTMF: the received audio of every leg with detection on, read once per
        # tick into one calls x 160 batch (media.rxaudio) for one detector call.
        self.rx = RxAudio()
        self.inband = InbandDetector()
        self._inband_legs: dict[str, Leg] = {}
        self._inband_batch: tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, Leg]] | None = None
        # RTCP (RFC 3550 §6): legs by next report time; new legs wait for their first.
        self._rtcp_heap: list[tuple[float, int, Leg]] = []
        self._rtcp_new: list[Leg] = []
        self._rtcp_seq = 0
        # The batch kernels' state (media.legtable): one row per leg.
        self.tab = LegTable()
        self.arena = PromptArena()
        self.tx = TxBatch()  # the last tick's prompt packets (tick_batch)
        # The last receive pass's relayed packets (receive_batch); grows with the largest.
        self.relay = TxBatch(capacity=64)
        self._by_row: dict[int, Leg] = {}
        self._action = np.zeros(0, dtype=np.int8)
        self.kernels = True  # False: the Python twins (tests)
        # Whether any leg is bridged (set by a bridge, re-counted every tick): the shell
        # reads the sockets more often then, since relayed audio waits for the read.
        self.relaying = False
        self.fill_gaps = fill_gaps
        self.wall_offset = 0.0  # wall clock - `now`, set by the shell, for SR NTP timestamps
        self.cname = "pbx-media"

    # ------------------------------------------------------------ commands

    def __len__(self) -> int:
        return len(self.legs)

    @property
    def legs_by_row(self) -> dict[int, Leg]:
        """Legs by their `Leg.row` (the shell maps sockets and packets to rows)."""
        return self._by_row

    def _leg(self, call_id: str) -> Leg:
        try:
            return self.legs[call_id]
        except KeyError:
            raise EngineError(f"unknown call {call_id!r}") from None

    def add_leg(self, call_id: str, local_port: int, inband_dtmf: bool = True) -> Leg:
        if call_id in self.legs:
            raise EngineError(f"call {call_id!r} already has a leg")
        rng = self._rng
        row = self.tab.add()
        leg = Leg(
            call_id=call_id,
            local_port=local_port,
            inband_dtmf=inband_dtmf,
            tab=self.tab,
            row=row,
            rx_stats=ReceiveStats(self.tab.stats, row),
        )
        # RFC 3550 §5.1: random initial SSRC, sequence number and timestamp.
        leg.ssrc = rng.getrandbits(32)
        leg.seq = rng.getrandbits(16)
        leg.ts = rng.getrandbits(32)
        self.tab.i[row, _k.L_ALIVE] = 1
        self.tab.i[row, _k.L_FAST] = 1
        leg.sync_tx()
        self.legs[call_id] = leg
        self._by_row[row] = leg
        if inband_dtmf:
            leg.rx_slot = self.rx.add(g711.SILENCE[leg.codec])
            self.tab.i[row, _k.L_RX_SLOT] = leg.rx_slot
            leg.inband_slot = self.inband.add()
            self._inband_legs[call_id] = leg
            self._inband_batch = None
        self._rtcp_new.append(leg)
        return leg

    def set_remote(self, msg: MediaRemote) -> None:
        leg = self._leg(msg.call_id)
        if msg.ptime_ms <= 0 or (SAMPLE_RATE * msg.ptime_ms) % 1000:
            raise EngineError(f"call {msg.call_id!r}: unusable ptime {msg.ptime_ms} ms")
        sdp_remote = (msg.remote_ip, msg.remote_port)
        i = self.tab.i
        if sdp_remote != leg.sdp_remote:  # a new address (not a repeated offer): latch again
            leg.sdp_remote = leg.remote = sdp_remote
            leg.rtcp_remote = (msg.remote_ip, msg.remote_port + 1)
            leg.latched = leg.rtcp_latched = False
            i[leg.row, _k.L_SDP_IP] = ipv4_int(msg.remote_ip)
            i[leg.row, _k.L_SDP_PORT] = msg.remote_port
        else:  # the far end signalled: alive, whatever its media did meanwhile
            self.tab.f[leg.row, _k.F_LATCH_SEEN] = math.nan
            leg.rtcp_seen = None
        # The far end sends nothing while we are sendonly or inactive: no re-latch then.
        i[leg.row, _k.L_NORECV] = msg.direction in ("sendonly", "inactive")
        leg.payload_type = msg.payload_type
        leg.dtmf_payload_type = msg.dtmf_payload_type
        leg.cn_payload_type = msg.cn_payload_type
        leg.ptime_ms = msg.ptime_ms
        self._set_direction(leg, msg.direction)
        if msg.codec != leg.codec:
            old, leg.codec = leg.codec, msg.codec
            leg.fwd_offset = None
            if leg.rx_slot is not None:
                self.rx.set_silence(leg.rx_slot, g711.SILENCE[leg.codec])
                self._inband_batch = None
            play = leg.play
            if play is not None:
                try:
                    codes = self.prompts.encoded(play.file, leg.codec)
                except PromptError:  # the file went away since: convert what we have
                    codes = g711.transcode(play.codes, old, leg.codec)
                self._set_codes(leg, play, codes)
        leg.sync_tx()

    def _set_direction(self, leg: Leg, direction: str) -> None:
        """Hold and resume (RFC 3264 §5.1): while our direction is recvonly or inactive
        the leg sends no RTP (prompts keep their clock, forwarded and WebSocket audio is
        dropped); RTCP and receiving go on. On resume the next packet starts a talk spurt:
        marker set, timestamp advanced over the held time, sequence numbers continuing."""
        held = direction in ("recvonly", "inactive")
        was_held = not leg.sending
        leg.direction = direction
        self.tab.i[leg.row, _k.L_NOSEND] = held
        if was_held and not held:
            self.tab.i[leg.row, _k.L_PLAY_MARKED] = 0
            leg.fwd_offset = None

    def _set_codes(self, leg: Leg, play: Playback, codes: np.ndarray) -> None:
        """The prompt's codes (new, or in another codec), where the pump reads them."""
        i = self.tab.i
        r = leg.row
        if i[r, _k.L_PLAYING]:
            self.arena.release(play.codes, i, _k.L_PLAYING, _k.L_PLAY_OFF)
        play.codes = codes
        i[r, _k.L_PLAY_OFF] = self.arena.acquire(codes)
        i[r, _k.L_PLAY_LEN] = codes.size
        i[r, _k.L_PLAYING] = 1

    def play(self, msg: MediaPlay, now: float) -> list[MediaEvent]:
        leg = self.legs.get(msg.call_id)
        if leg is None:
            return [_failure(msg.call_id, f"unknown call {msg.call_id!r}", msg.play_id)]
        self._stop(leg)
        try:
            codes = self.prompts.encoded(msg.file, leg.codec)
        except PromptError as exc:
            return [_failure(msg.call_id, str(exc), msg.play_id)]
        self._start(
            leg,
            Playback(
                play_id=msg.play_id,
                file=msg.file,
                codes=codes,
                interruptible=msg.interruptible,
                loop=msg.loop and codes.size > 0,
            ),
        )
        return []

    def _start(self, leg: Leg, play: Playback) -> None:
        leg.play = play
        self._playing[leg.call_id] = leg
        i = self.tab.i
        r = leg.row
        self._set_codes(leg, play, play.codes)
        i[r, _k.L_PLAY_LOOP] = play.loop
        i[r, _k.L_PLAY_DONE] = 0
        i[r, _k.L_PLAY_MARKED] = 0
        i[r, _k.L_PLAY_FIN] = 0
        self.tab.f[r, _k.F_PLAY_ORIGIN] = math.nan

    def prompt_started(self, call_id: str, play_id: int) -> bool | None:
        """Whether prompt `play_id`'s first frame has gone out (its clock starts with the
        first tick that sends it); None when it no longer plays (stopped, replaced,
        ended, leg gone). For the shell's reply-to-first-RTP timing."""
        leg = self.legs.get(call_id)
        if leg is None or leg.play is None or leg.play.play_id != play_id:
            return None
        return not math.isnan(self.tab.f[leg.row, _k.F_PLAY_ORIGIN])

    def stop(self, call_id: str) -> None:
        self._stop(self._leg(call_id))

    def _stop(self, leg: Leg) -> Playback | None:
        play, leg.play = leg.play, None
        self._playing.pop(leg.call_id, None)
        i = self.tab.i
        if play is not None and i[leg.row, _k.L_PLAYING]:
            self.arena.release(play.codes, i, _k.L_PLAYING, _k.L_PLAY_OFF)
        i[leg.row, _k.L_PLAYING] = 0
        i[leg.row, _k.L_PLAY_FIN] = 0
        return play

    def set_timer(self, msg: MediaTimer, now: float) -> None:
        leg = self._leg(msg.call_id)
        if msg.delay_ms <= 0:
            leg.timer_at = None
            self._timed.pop(leg.call_id, None)
            return
        leg.timer_id = msg.timer_id
        leg.timer_at = now + msg.delay_ms / 1000.0
        self._timed[leg.call_id] = leg

    def bridge(self, call_id: str, peer_call_id: str) -> None:
        if call_id == peer_call_id:
            raise EngineError(f"cannot bridge call {call_id!r} to itself")
        a, b = self._leg(call_id), self._leg(peer_call_id)
        for leg in (a, b):
            if leg.peer is not None and leg.peer in self.legs:
                self._set_peer(self.legs[leg.peer], None)  # alone again: filled
            self._stop(leg)
            leg.fwd_offset = None
        self._set_peer(a, b)  # no fill: the peer's audio feeds each stream now
        self._set_peer(b, a)

    def _set_peer(self, leg: Leg, peer: Leg | None) -> None:
        """Forward what `leg` receives into `peer`'s stream (`relay_batch` reads the row in
        L_PEER); None: not bridged."""
        leg.peer = None if peer is None else peer.call_id
        self.tab.i[leg.row, _k.L_PEER] = -1 if peer is None else peer.row
        if peer is not None:
            self.relaying = True
        leg.sync_tx()

    def _slow(self, leg: Leg) -> None:
        """Every packet of the leg takes the Python path (it is on a WebSocket; forwarding
        to a bridged peer and recording stay in the kernels); `_rx_handle` puts it back on
        the kernel's path when the WebSocket is gone."""
        self.tab.i[leg.row, _k.L_FAST] = 0

    def dtmf_info(self, msg: MediaDtmfInfo, now: float) -> list[MediaEvent]:
        leg = self.legs.get(msg.call_id)
        if leg is None:
            return [_failure(msg.call_id, f"unknown call {msg.call_id!r}")]
        digit = msg.digit.strip().upper()
        if len(digit) != 1 or digit not in EVENT_DIGITS:
            return [_failure(msg.call_id, f"invalid DTMF digit {msg.digit!r}")]
        # INFO gives only its arrival (and a Duration): the press is [now, now + duration].
        ev = self._press(leg, digit, "info", now, now + msg.duration_ms / 1000.0)
        return [] if ev is None else [ev]

    # ------------------------------------------------------------ recording, WebSocket

    def record(self, msg: MediaRecord, now: float) -> list[MediaEvent]:
        """Start recording the leg (`media.recorder`); with `beep`, the beep plays first."""
        leg = self.legs.get(msg.call_id)
        if leg is None:
            return [_failure(msg.call_id, f"unknown call {msg.call_id!r}")]
        events = self.recorder.start(leg, msg, now)
        if msg.beep and leg.rec is not None:
            self._stop(leg)
            self._start(
                leg, Playback(BEEP_PLAY_ID, "", self.prompts.beep(leg.codec), False, False)
            )
        return events

    def record_stop(self, call_id: str, now: float) -> list[MediaEvent]:
        leg = self.legs.get(call_id)
        return [] if leg is None else self.recorder.stop(leg, now)

    def ws_start(self, call_id: str) -> None:
        """The shell has connected the leg's WebSocket: exchange audio (`media.wsbridge`)."""
        leg = self._leg(call_id)
        self.ws.start(leg)
        self._slow(leg)
        leg.sync_tx()  # no fill: the WebSocket's audio feeds the stream

    def ws_audio(self, call_id: str, data: bytes) -> None:
        """A binary frame (PCM16 LE 8 kHz) from the leg's WebSocket, to play to the caller."""
        leg = self.legs.get(call_id)
        if leg is not None and leg.ws is not None:
            leg.ws.feed(data)

    def ws_room(self, call_id: str) -> bool:
        """False while the leg's WebSocket playout buffer is full (stop reading the socket)."""
        leg = self.legs.get(call_id)
        return leg is None or leg.ws is None or leg.ws.room()

    def ws_closed(self, call_id: str, reason: str) -> list[MediaEvent]:
        """The leg's WebSocket closed or never connected: the WsBridgeEnded event."""
        leg = self.legs.get(call_id)
        if leg is None:
            return []  # released: no event
        self.ws.end(leg)
        leg.sync_tx()
        return [MediaEvent(call_id=call_id, event=WsBridgeEnded(reason=reason))]

    def forward_frame(
        self, leg: Leg, src_ts: int, payload: bytes, at: float, out: list[Packet]
    ) -> None:
        """One audio frame from outside (the WebSocket) into the leg's stream, sent at `at`."""
        self._forward(leg, leg.payload_type, src_ts, False, payload, len(payload), at, out)

    def remove_leg(self, call_id: str, now: float | None = None) -> ReleasedLeg:
        leg = self.legs.pop(call_id, None)
        if leg is None:
            return ReleasedLeg(call_id=call_id)
        if leg.rec is not None:
            self.recorder.release(leg, now)  # the file is finished, no event
        if leg.ws is not None:
            self.ws.end(leg)
        self._stop(leg)
        self._timed.pop(call_id, None)
        self._events_open.pop(call_id, None)
        if leg.peer is not None and leg.peer in self.legs:
            self._set_peer(self.legs[leg.peer], None)  # alone again: filled until its call ends
        late = 0
        if leg.rx_slot is not None:
            late = int(self.rx.late[leg.rx_slot])
            self.rx.remove(leg.rx_slot)
        if leg.inband_slot is not None:
            self.inband.remove(leg.inband_slot)
            del self._inband_legs[call_id]
            self._inband_batch = None
        report = leg.remote_report
        packets_sent, packets_received = leg.packets_sent, leg.packets_received
        lost, jitter = leg.rx_stats.lost, leg.rx_stats.jitter
        foreign, relatched = leg.foreign_dropped, leg.relatched
        self._rtp_foreign_gone += foreign
        self._received_gone += packets_received
        self._sent_gone += packets_sent
        self.tab.remove(leg.row)
        del self._by_row[leg.row]
        return ReleasedLeg(
            call_id=call_id,
            packets_sent=packets_sent,
            packets_received=packets_received,
            packets_lost=max(0, lost),
            jitter_ms=round(jitter / SAMPLE_RATE * 1000.0, 3),
            packets_late=late,
            remote_packets_lost=None if report is None else report.cumulative_lost,
            remote_jitter_ms=(
                None if report is None else round(report.jitter / SAMPLE_RATE * 1000.0, 3)
            ),
            rtcp_sent=leg.rtcp_sent,
            rtcp_received=leg.rtcp_received,
            rtp_foreign_dropped=foreign,
            rtcp_foreign_dropped=leg.rtcp_foreign,
            rtp_relatched=relatched,
        )

    def totals(self) -> EngineTotals:
        """Packet counts since the engine started, released legs included (a released
        leg's row is zeroed, so the live sums are the live legs')."""
        live = self.tab.i[:, [_k.L_FOREIGN, _k.L_RECEIVED, _k.L_SENT]].sum(axis=0)
        return EngineTotals(
            rtp_foreign_dropped=self._rtp_foreign_gone + int(live[0]),
            rtcp_foreign_dropped=self._rtcp_foreign,
            rtp_received=self._received_gone + int(live[1]),
            rtp_sent=self._sent_gone + int(live[2]),
            presses_dropped=self._presses_dropped,
        )

    # ------------------------------------------------------------ RTP in

    def receive_rtp(
        self, call_id: str, data: bytes, addr: tuple[str, int], now: float
    ) -> tuple[list[Packet], list[MediaEvent]]:
        """One datagram for the leg (the per-packet path; `receive_batch` does many)."""
        packets: list[Packet] = []
        events: list[MediaEvent] = []
        leg = self.legs.get(call_id)
        if leg is None:
            return packets, events
        try:
            pkt = parse_rtp(data)
        except RtpError:
            return packets, events
        src = (addr[0], addr[1])  # an IPv6 address comes with flow info and scope id
        t = self.tab
        act = _k.source_check_py(
            t.i, t.f, t.stats.i, leg.row, leg.latched and src == leg.remote,
            src == leg.sdp_remote, src[1], pkt.ssrc, now, self.relatch_s, self.relatch_any_ssrc,
        )  # fmt: skip
        if act < 0:
            return packets, events  # a foreign source: counted, nothing else
        leg.packets_received += 1
        if act:
            self._latched(leg, src, act)
        leg.rx_stats.update(pkt.sequence, pkt.ssrc, now)
        self._rx_handle(leg, pkt, now, packets, events)
        return packets, events

    def receive_batch(
        self,
        buf: np.ndarray,
        lens: np.ndarray,
        names: np.ndarray,
        rows: np.ndarray,
        n: int,
        now: float,
    ) -> tuple[list[Packet], list[MediaEvent]]:
        """`n` datagrams at once: `buf[k, :lens[k]]` from the `sockaddr_in` `names[k]` for
        the leg in row `rows[k]` (`Leg.row`; -1: none). One kernel pass does the common
        work (`media.kernels.rtpbatch`), a second relays the bridged legs' packets into
        `self.relay` (for the shell to send now: rows 0..relay.n-1); the packets flagged
        for Python go through `_rx_handle`, which does not forward them again. The packet
        list returned is for anything else to send at once (empty today: every forward is
        in `relay`)."""
        self.relay.n = 0
        if n <= 0:
            return [], []
        action = self.action_buffer(n)
        kernel = _k.rx_batch if self.kernels else _k.rx_batch_py
        t = self.tab
        seen = kernel(
            buf, lens, names, rows, n, now, self.relatch_s, self.relatch_any_ssrc, t.i, t.f,
            t.stats.i, t.stats.f, *self.rx.arrays(), action,
        )  # fmt: skip
        return self.finish_batch(buf, lens, rows, n, now, int(seen))

    def action_buffer(self, n: int) -> np.ndarray:
        """The receive kernel's per-packet ACT_* array, for at least `n` packets."""
        if self._action.shape[0] < n:
            self._action = np.zeros(max(n, 2 * self._action.shape[0]), dtype=np.int8)
        return self._action

    def finish_batch(
        self, buf: np.ndarray, lens: np.ndarray, rows: np.ndarray, n: int, now: float, seen: int
    ) -> tuple[list[Packet], list[MediaEvent]]:
        """The rest of a receive pass after `rx_batch` (which left each packet's bits in
        `action_buffer` and returned their union, `seen`): the relay into `self.relay`,
        the recorded legs' audio, the packets that need Python. `receive_batch` runs it,
        and `workers.rtploop` for a pass of its own that needs Python."""
        packets: list[Packet] = []
        events: list[MediaEvent] = []
        self.relay.n = 0
        action = self._action
        if seen & _k.ACT_RELAY:
            self._relay(buf, lens, rows, n, action, now)
        if seen & _k.ACT_RECORD and self.recorder.active:
            self._record_rx(buf, lens, rows, n, action, now)
        if not seen & _FOR_PYTHON:
            return packets, events
        by_row = self._by_row
        for k in np.flatnonzero(action[:n] & _FOR_PYTHON).tolist():
            leg = by_row.get(int(rows[k]))
            if leg is None:
                continue
            act = int(action[k])
            if act & _k.ACT_LATCHED:
                i = self.tab.i[leg.row]
                src = (ipv4_str(int(i[_k.L_REMOTE_IP])), int(i[_k.L_REMOTE_PORT]))
                self._latched(leg, src, act)
            if act & _k.ACT_PYTHON:
                pkt = parse_rtp(buf[k, : lens[k]].tobytes())  # the kernel parsed it: valid
                self._rx_handle(leg, pkt, now, packets, events, forward=False)
        return packets, events

    def finish_deferred(
        self, buf: np.ndarray, lens: np.ndarray, rows: np.ndarray, at: np.ndarray, n: int
    ) -> tuple[list[Packet], list[MediaEvent]]:
        """Packets `rx_batch` flagged ACT_PYTHON (and nothing else Python must do at once)
        whose relay is done (`workers.rtploop`): `buf[k, :lens[k]]` for the leg in row
        `rows[k]`, received at `at[k]`, each through `_rx_handle` as `finish_batch` would
        have."""
        packets: list[Packet] = []
        events: list[MediaEvent] = []
        by_row = self._by_row
        for k in range(n):
            leg = by_row.get(int(rows[k]))
            if leg is not None:
                pkt = parse_rtp(buf[k, : lens[k]].tobytes())  # the kernel parsed it: valid
                self._rx_handle(leg, pkt, float(at[k]), packets, events, forward=False)
        return packets, events

    def record_relayed(self) -> None:
        """What recorded legs hear of `self.relay` (filled and sent by `workers.rtploop`)
        into their recordings."""
        if self.relay.n and self.recorder.active:
            self._record_tx(self.relay, self.relay.n)

    def _relay(
        self,
        buf: np.ndarray,
        lens: np.ndarray,
        rows: np.ndarray,
        n: int,
        action: np.ndarray,
        now: float,
    ) -> None:
        """The packets `rx_batch` marked ACT_RELAY into their peers' streams, in
        `self.relay` (`media.kernels.rtpbatch.relay_batch`, growing the buffer when one
        does not fit); what a recorded leg hears of them goes to its recording."""
        relay = self.relay
        kernel = _k.relay_batch if self.kernels else _k.relay_batch_py
        i, f = self.tab.i, self.tab.f
        p, at = 0, 0
        while True:
            p, at = kernel(
                buf, lens, rows, n, at, action, now, i, f, relay.data, relay.lens, relay.rows,
                relay.ts, relay.at, relay.ips, relay.ports, p,
            )  # fmt: skip
            relay.n = p
            if at >= n:
                break
            relay.grow(int(lens[at]))  # the relayed packet is never longer than the received
        if p and self.recorder.active:
            self._record_tx(relay, p)

    def _record_rx(
        self,
        buf: np.ndarray,
        lens: np.ndarray,
        rows: np.ndarray,
        n: int,
        action: np.ndarray,
        now: float,
    ) -> None:
        """The recorded legs' audio of the pass (ACT_RECORD) into their recordings
        (`media.kernels.recplace.record_rx`); a packet the kernel leaves (the buffer must be
        written first) goes through `Recording.caller`."""
        kernel = _rp.record_rx if self.kernels else _rp.record_rx.py_func
        rt = self.recorder.table
        at = 0
        while True:
            at = kernel(buf, lens, rows, n, at, action, now, self.tab.i, rt.i, rt.f, rt.buf)
            if at >= n:
                return
            leg = self._by_row[int(rows[at])]
            pkt = parse_rtp(buf[at, : lens[at]].tobytes())
            codec = STATIC_PAYLOAD_CODECS.get(pkt.payload_type) or leg.codec
            if leg.rec is not None:
                leg.rec.caller(pkt.ssrc, pkt.timestamp, pkt.payload, codec, now)
            at += 1

    def _record_tx(self, tx: TxBatch, n: int, first_fill: int | None = None) -> None:
        """What recorded legs hear of a batch they send (relayed or pumped, rows 0..n-1;
        from `first_fill` on fill frames) into their recordings
        (`media.kernels.recplace.record_tx`); a frame the kernel leaves goes through
        `Recording.heard`."""
        kernel = _rp.record_tx if self.kernels else _rp.record_tx.py_func
        rt = self.recorder.table
        fill = n if first_fill is None else first_fill
        k = 0
        while True:
            k = kernel(tx.data, tx.lens, tx.rows, tx.ts, tx.at, k, n, fill, self.tab.i, rt.i,
                       rt.f, rt.buf)  # fmt: skip
            if k >= n:
                return
            leg = self._by_row[int(tx.rows[k])]
            if leg.rec is not None:
                leg.rec.heard(int(tx.ts[k]), tx.data[k, 12 : tx.lens[k]].tobytes(), leg.codec,
                              float(tx.at[k]))  # fmt: skip
            k += 1

    def relayed(self) -> list[Packet]:
        """The last receive pass's relayed packets (`self.relay`) as datagrams."""
        return _as_packets(self.relay, self._by_row)

    def _latched(self, leg: Leg, src: tuple[str, int], act: int) -> None:
        """A packet latched the leg onto `src`: RTP goes there now. When the latch moved
        (ACT_RELATCHED) the stream's RTCP moved with it (RTP port + 1 until its RTCP
        latches again)."""
        leg.remote = src
        if act & _k.ACT_RELATCHED:
            leg.rtcp_remote = (src[0], src[1] + 1)
            leg.rtcp_latched = False

    def _rx_handle(
        self,
        leg: Leg,
        pkt: RtpPacket,
        now: float,
        packets: list[Packet],
        events: list[MediaEvent],
        forward: bool = True,
    ) -> None:
        """A packet already counted (statistics, latch): RFC 4733, recording, WebSocket,
        forwarding to the peer (unless `forward` is False: `relay_batch` did), and the
        receive ring."""
        peer = self.legs.get(leg.peer) if forward and leg.peer is not None else None
        if leg.ws is None:
            self.tab.i[leg.row, _k.L_FAST] = 1  # nothing left for Python: back to the kernel
        pt = pkt.payload_type
        if leg.dtmf_payload_type is not None and pt == leg.dtmf_payload_type:
            try:
                ev = parse_event(pkt.payload)
            except RtpError:
                return
            if leg.rec is not None:
                leg.rec.event(pkt.ssrc, pkt.timestamp, now)
            for digit in leg.detector.feed(pkt.timestamp, ev, now):
                # This event's interval from its duration; an older one whose end packets
                # were lost (reported because a newer one started) ended a while ago.
                if ev.end and digit == event_digit(ev.event):
                    start, end = self._event_interval(leg, pkt.timestamp, ev.duration, now)
                else:
                    start, end = now - 0.25, now - 0.05
                press = self._press(leg, digit, "rfc4733", start, end)
                if press is not None:
                    events.append(press)
            if leg.detector.pending:
                self._events_open[leg.call_id] = leg  # the tick reports it if its end is lost
            else:
                self._events_open.pop(leg.call_id, None)
            if peer is not None and peer.dtmf_payload_type is not None:
                self._forward(
                    peer,
                    peer.dtmf_payload_type,
                    pkt.timestamp,
                    pkt.marker,
                    pkt.payload,
                    0,
                    now,
                    packets,
                )
            return
        codec = STATIC_PAYLOAD_CODECS.get(pt) or (leg.codec if pt == leg.payload_type else None)
        if codec is None or not pkt.payload:
            return
        leg.rx_stats.update_jitter(pkt.timestamp, now)
        if leg.rx_slot is not None and codec == leg.codec:
            self.rx.put(leg.rx_slot, pkt.timestamp, pkt.payload, now, pkt.sequence)
        if leg.rec is not None:
            leg.rec.caller(pkt.ssrc, pkt.timestamp, pkt.payload, codec, now)
        if leg.ws is not None:
            leg.ws.caller(pkt.payload, codec)
        if peer is None:
            return
        payload = pkt.payload
        if codec != peer.codec:
            codes = np.frombuffer(payload, dtype=np.uint8)
            payload = g711.transcode(codes, codec, peer.codec).tobytes()
        self._forward(
            peer, peer.payload_type, pkt.timestamp, pkt.marker, payload, len(payload), now, packets
        )

    def _forward(
        self,
        to: Leg,
        pt: int,
        src_ts: int,
        marker: bool,
        payload: bytes,
        samples: int,
        now: float,
        out: list[Packet],
    ) -> None:
        """Send one packet from the peer into `to`'s RTP stream (its SSRC, seq, timeline)."""
        if to.remote is None or to.play is not None or not to.sending:
            return  # nowhere to send, a prompt has the stream, or on hold
        if to.fwd_offset is None:
            # A new talk spurt in `to`'s stream: continue its timeline, mark it.
            to.fwd_offset = (self._spurt_ts(to, now) - src_ts) % (1 << 32)
            marker = True
        ts = ts_add(src_ts, to.fwd_offset)
        out.append((to.call_id, build_header(pt, to.seq, ts, to.ssrc, marker) + payload, to.remote))
        if samples and to.rec is not None:
            to.rec.heard(ts, payload, to.codec, now)
        to.seq = (to.seq + 1) & 0xFFFF
        to.packets_sent += 1
        to.octets_sent += len(payload)
        if samples:
            to.ts = ts_add(ts, samples)
            to.sent_until = now + samples / SAMPLE_RATE

    def _event_interval(self, leg: Leg, timestamp: int, duration: int, now: float
                        ) -> tuple[float, float]:  # fmt: skip
        """An ended RFC 4733 event's interval on the engine's clock, as in-band detection
        dates the same tone: its RTP timestamp through the receive ring's map of media time
        to arrival (`RxAudio.time_of`, from the newest audio packet). Dated by when its end
        packet was read, a worker that stalled between the in-band report and that read
        would place the event after the tone and report the press twice. The end packet's
        arrival is the fallback: no ring, or a map that disagrees (another timestamp base
        for events, or no audio for a long time)."""
        end = now
        if leg.rx_slot is not None:
            mapped = self.rx.time_of(leg.rx_slot, ts_add(timestamp, duration))
            if now - EVENT_MAP_WINDOW_S <= mapped <= now + EVENT_MAP_LEAD_S:
                end = mapped
        return end - duration / SAMPLE_RATE, end

    def _spurt_ts(self, leg: Leg, at: float) -> int:
        """Timestamp for a packet starting at `at` after a pause (RFC 3550 §5.1: the
        timestamp follows the sampling clock, so it advances over the silence)."""
        if leg.sent_until is None:
            return leg.ts
        gap = max(0, round((at - leg.sent_until) * SAMPLE_RATE))
        return ts_add(leg.ts, gap)

    def _press(
        self, leg: Leg, digit: str, source: DigitSource, start: float, end: float
    ) -> MediaEvent | None:
        """A source reports a press over [start, end]: its event, or None when another
        source already reported the same press (`media.dtmfpress`)."""
        presses = leg.presses
        flooded = presses.flood_dropped
        if not presses.report(digit, source, start, end):
            self._presses_dropped += presses.flood_dropped - flooded
            return None
        return self._digit(leg, digit, source)

    def _digit(self, leg: Leg, digit: str, source: DigitSource) -> MediaEvent:
        if leg.rec is not None:
            leg.rec.digit(digit)  # a stop digit ends the recording at the next tick
        stopped: int | None = None
        if leg.play is not None and leg.play.interruptible:
            play = self._stop(leg)
            stopped = play.play_id if play is not None else None
        return MediaEvent(
            call_id=leg.call_id,
            event=DtmfDigit(digit=digit, source=source, stopped_play_id=stopped),
        )

    # ------------------------------------------------------------ tick

    def tick(self, now: float) -> tuple[list[Packet], list[MediaEvent]]:
        """Everything due at `now`: prompt frames of every playing leg, ends, timers."""
        packets, events = self.tick_batch(now)
        return _as_packets(self.tx, self._by_row) + packets, events

    def tick_batch(self, now: float) -> tuple[list[Packet], list[MediaEvent]]:
        """As `tick`, but the prompt frames stay in `self.tx` (rows 0..tx.n-1) for the
        shell to send in one go; the other packets (WebSocket audio) come back as a list."""
        packets: list[Packet] = []
        events: list[MediaEvent] = []
        i = self.tab.i
        self.relaying = bool(np.any((i[:, _k.L_ALIVE] == 1) & (i[:, _k.L_PEER] >= 0)))
        self._pump_all(now, events)
        if self._timed:
            fired = [
                leg
                for leg in self._timed.values()
                if leg.timer_at is not None and leg.timer_at <= now + _EPS
            ]
            for leg in fired:
                leg.timer_at = None
                del self._timed[leg.call_id]
                events.append(
                    MediaEvent(call_id=leg.call_id, event=TimerFired(timer_id=leg.timer_id))
                )
        if self._events_open:
            self._expire_events(now, events)
        if self.ws.legs:
            self.ws.tick(self, now, packets)
        if self.recorder.active:
            events += self.recorder.tick(now)
        if self._inband_legs:
            self._detect_inband(now, events)
        return packets, events

    def _expire_events(self, now: float, events: list[MediaEvent]) -> None:
        """RFC 4733 events whose end packets were all lost, and nothing came after: the
        press is reported once nothing of it has come for a while (media.dtmf)."""
        for leg in list(self._events_open.values()):
            expired = leg.detector.expire(now)
            if not leg.detector.pending:
                del self._events_open[leg.call_id]
            if expired is not None:
                start = expired.seen - expired.duration / SAMPLE_RATE
                press = self._press(leg, expired.digit, "rfc4733", start, expired.seen)
                if press is not None:
                    events.append(press)

    def _detect_inband(self, now: float, events: list[MediaEvent]) -> None:
        """One detector call for every leg with in-band DTMF on (this tick's 160 samples each)."""
        batch = self._inband_batch
        if batch is None:
            legs = list(self._inband_legs.values())
            batch = self._inband_batch = (
                np.array([leg.rx_slot for leg in legs], dtype=np.int64),
                np.array([leg.inband_slot for leg in legs], dtype=np.int64),
                np.array([leg.codec == "PCMA" for leg in legs], dtype=bool),
                {leg.inband_slot: leg for leg in legs if leg.inband_slot is not None},
            )
        rx_slots, det_slots, alaw, by_slot = batch
        codes, gaps = self.rx.read(rx_slots)
        samples = g711.decode(codes, "PCMU")
        if alaw.any():
            samples[alaw] = g711.decode(codes[alaw], "PCMA")
        for found in self.inband.process(samples, det_slots, gaps):
            leg = by_slot[found.slot]
            slot = leg.rx_slot
            assert slot is not None
            # The frame just read began at read_ts - 160; map its samples to arrival times.
            frame_ts = int(self.rx.read_ts[slot]) - 160
            start = self.rx.time_of(slot, frame_ts + found.offset)
            end = self.rx.time_of(slot, frame_ts + 160)
            press = self._press(leg, found.digit, "inband", start, end)
            if press is not None:
                events.append(press)

    # ------------------------------------------------------------ RTCP

    def receive_rtcp(self, call_id: str, data: bytes, addr: tuple[str, int], now: float) -> None:
        """An RTCP datagram on the leg's RTCP port: latch its source, keep LSR and the
        far end's report about our stream."""
        leg = self.legs.get(call_id)
        if leg is None:
            return
        try:
            reports = parse_rtcp(data)
        except RtcpError:
            return
        if not self._rtcp_source_ok(leg, (addr[0], addr[1]), reports, now):
            return
        leg.rtcp_received += 1
        for report in reports:
            if report.sender is not None:
                msw, lsw = report.sender[0], report.sender[1]
                # RFC 3550 §6.4.1 LSR: the middle 32 bits of the SR's NTP timestamp.
                leg.rx_stats.lsr = ((msw & 0xFFFF) << 16) | (lsw >> 16)
                leg.rx_stats.lsr_at = now
            for block in report.blocks:
                if block.ssrc == leg.ssrc:
                    leg.remote_report = block

    def _rtcp_source_ok(
        self, leg: Leg, src: tuple[str, int], reports: list[RtcpReport], now: float
    ) -> bool:
        """The RTP latch rule (`media.kernels.rtpbatch`, "Strict latching") on the RTCP
        port: latch onto the first source (not port 0), then take only its datagrams; a
        datagram from the signalled RTCP address (SDP port + 1) takes the latch back, a
        new source with another SSRC (any SSRC when loose) takes it after the latched one
        has been silent for the re-latch time, or RTCP_SILENCE_S if longer (reports come
        every ~5 s). Only the RTP peer's own IP (where RTP comes from, else its SDP
        address) may take the latch, first or again: a stranger's reports would become
        the call's statistics, and ours would go to it. Others are counted and dropped
        (False)."""
        ssrc = reports[0].ssrc if reports else None
        peer_ips = (leg.remote[0] if leg.remote else None,
                    leg.sdp_remote[0] if leg.sdp_remote else None)
        if src != leg.rtcp_remote and src[0] not in peer_ips:
            leg.rtcp_foreign += 1
            self._rtcp_foreign += 1
            return False
        if not leg.rtcp_latched:
            if src[1] != 0:
                leg.rtcp_latched, leg.rtcp_remote = True, src
                leg.rtcp_seen, leg.rtcp_ssrc = now, ssrc
            return True
        if src == leg.rtcp_remote:
            leg.rtcp_seen = now
            if ssrc is not None:
                leg.rtcp_ssrc = ssrc
            return True
        relatch = False
        if src[1] != 0:
            sdp = leg.sdp_remote
            relatch = sdp is not None and src == (sdp[0], sdp[1] + 1)
            if not relatch and not self.tab.i[leg.row, _k.L_NORECV] and ssrc is not None:
                if leg.rtcp_seen is None:
                    leg.rtcp_seen = now
                silent = now - leg.rtcp_seen >= max(self.relatch_s, RTCP_SILENCE_S)
                relatch = silent and (self.relatch_any_ssrc or ssrc != leg.rtcp_ssrc)
        if relatch:
            leg.rtcp_remote, leg.rtcp_seen, leg.rtcp_ssrc = src, now, ssrc
            return True
        leg.rtcp_foreign += 1
        self._rtcp_foreign += 1
        return False

    def rtcp_due(self, now: float) -> list[Packet]:
        """RTCP reports due by `now`, as (call_id, datagram, RTCP address): SR when the
        leg sent RTP since its last report, else RR; every ~5 s per leg (RFC 3550 §6.2,
        randomised over [0.5, 1.5] of it, A.7)."""
        out: list[Packet] = []
        heap = self._rtcp_heap
        if self._rtcp_new:
            for leg in self._rtcp_new:
                self._schedule_rtcp(leg, now)
            self._rtcp_new.clear()
        while heap and heap[0][0] <= now + _EPS:
            _, _, leg = heapq.heappop(heap)
            if self.legs.get(leg.call_id) is not leg:
                continue  # released
            self._schedule_rtcp(leg, now)
            if leg.rtcp_remote is None:
                continue
            sender = None
            if leg.packets_sent > max(leg.sr_packets, 0):
                sender = (self._spurt_ts(leg, now), leg.packets_sent, leg.octets_sent)
            leg.sr_packets = leg.packets_sent
            data = build_report(
                leg.ssrc, self.cname, now, now + self.wall_offset, leg.rx_stats, sender
            )
            leg.rtcp_sent += 1
            out.append((leg.call_id, data, leg.rtcp_remote))
        return out

    def _schedule_rtcp(self, leg: Leg, now: float) -> None:
        self._rtcp_seq += 1
        due = now + REPORT_INTERVAL_S * (0.5 + self._rng.random())
        heapq.heappush(self._rtcp_heap, (due, self._rtcp_seq, leg))

    def _pump_all(self, now: float, events: list[MediaEvent]) -> None:
        """Every playing leg's prompt frames due by `now` into `self.tx`, in one kernel call
        (`media.kernels.rtpbatch.pump_tick`), then the fill frames (comfort noise or
        silence) of every leg nothing feeds (`fill_tick`); prompts that ended give
        AudioComplete."""
        tx = self.tx
        tx.n = 0
        if not self.legs:
            return
        i, f = self.tab.i, self.tab.f
        n, ended = 0, 0
        if self._playing:
            kernel = _k.pump_tick if self.kernels else _k.pump_tick_py
            while True:
                n, full, more = kernel(
                    now, i, f, self.arena.data, n, tx.data, tx.lens, tx.rows, tx.ts, tx.at,
                    tx.ips, tx.ports,
                )  # fmt: skip
                ended += more
                tx.n = n
                if not full:
                    break
                tx.grow(_k.HEADER_SIZE + int(i[:, _k.L_SPF].max()))
        prompt_n = n
        fill = _k.fill_tick if self.kernels else _k.fill_tick_py
        while self.fill_gaps:
            n, full = fill(now, i, f, n, tx.data, tx.lens, tx.rows, tx.ts, tx.at, tx.ips,
                           tx.ports)  # fmt: skip
            tx.n = n
            if not full:
                break
            tx.grow(_k.HEADER_SIZE + int(i[:, _k.L_SPF].max()))
        if self.recorder.active and n:
            self._record_tx(tx, n, prompt_n)
        if ended:
            by_row = self._by_row
            for r in np.flatnonzero(i[:, _k.L_PLAY_FIN]).tolist():
                leg = by_row[r]
                play = self._stop(leg)
                if play is not None and play.play_id != BEEP_PLAY_ID:
                    events.append(
                        MediaEvent(call_id=leg.call_id, event=AudioComplete(play_id=play.play_id))
                    )


def _as_packets(tx: TxBatch, by_row: dict[int, Leg]) -> list[Packet]:
    """A batch's packets as (call_id of the sending leg, bytes, its remote address)."""
    out: list[Packet] = []
    for k in range(tx.n):
        leg = by_row[int(tx.rows[k])]
        assert leg.remote is not None
        out.append((leg.call_id, tx.packet(k), leg.remote))
    return out


def _failure(call_id: str, reason: str, play_id: int | None = None) -> MediaEvent:
    return MediaEvent(call_id=call_id, event=MediaFailure(reason=reason, play_id=play_id))

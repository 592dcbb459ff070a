"""One call leg of a media worker (`Leg`) and the prompt it plays (`Playback`).

A leg's state is in two places: what Python alone uses (its addresses, DTMF
detector, recording, RTCP bookkeeping) in the `Leg` object, and what the batch
kernels share (what it sends, what it received, the latch, its prompt's
progress) in its row of the engine's `media.legtable.LegTable`, reached
through the properties below. `media.engine.MediaEngine` owns the legs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from media import g711
from media.dtmf import Rfc4733Detector
from media.dtmfpress import PressDedupe
from media.kernels import rtpbatch as _k
from media.legtable import LegTable, ipv4_int
from media.recorder import Recording
from media.rtcp import ReceiveStats, ReportBlock
from media.wsbridge import WsLeg

SAMPLE_RATE = 8000
DEFAULT_PTIME_MS = 20


@dataclass(slots=True)
class Playback:
    play_id: int
    file: str
    codes: np.ndarray
    interruptible: bool
    loop: bool
    origin: float | None = None  # set by the first tick after play
    frames_done: int = 0
    marked: bool = False


def _int_col(col: int, doc: str) -> property:
    def get(self: Leg) -> int:
        return int(self.tab.i[self.row, col])

    def put(self: Leg, value: int) -> None:
        self.tab.i[self.row, col] = value

    return property(get, put, doc=doc)


@dataclass(slots=True, eq=False)
class Leg:
    """One call leg. The state the batch kernels share (what it sends, what it received,
    the latch, its prompt's progress) lives in its row of the engine's `LegTable`."""

    call_id: str
    local_port: int
    inband_dtmf: bool
    tab: LegTable
    row: int
    _remote: tuple[str, int] | None = None
    payload_type: int = 0
    codec: str = "PCMU"
    dtmf_payload_type: int | None = None
    cn_payload_type: int | None = None  # RFC 3389, when negotiated
    ptime_ms: int = DEFAULT_PTIME_MS
    play: Playback | None = None
    timer_id: int = 0
    timer_at: float | None = None
    peer: str | None = None
    detector: Rfc4733Detector = field(default_factory=Rfc4733Detector)
    _rec: Recording | None = None  # media.recorder (`rec`)
    ws: WsLeg | None = None  # media.wsbridge
    # Symmetric RTP (RFC 4961; "latching"): once the first valid packet arrives, send
    # to where it came from (a phone behind NAT is not where its SDP says), and take
    # packets from there only (the module docstring).
    sdp_remote: tuple[str, int] | None = None
    rtcp_remote: tuple[str, int] | None = None  # RFC 3550 §11: RTP port + 1 unless latched
    rtcp_latched: bool = False
    rtcp_seen: float | None = None  # last RTCP from the latched source (None: from now on)
    rtcp_ssrc: int | None = None  # the latched RTCP source's SSRC
    rtcp_foreign: int = 0  # RTCP datagrams from other sources, dropped
    rx_stats: ReceiveStats = field(default_factory=ReceiveStats)
    rx_slot: int | None = None  # row in the engine's RxAudio (in-band detection)
    inband_slot: int | None = None  # row in the engine's InbandDetector
    presses: PressDedupe = field(default_factory=PressDedupe)
    sr_packets: int = -1  # packets_sent at the last RTCP report (SR only if more since)
    rtcp_sent: int = 0
    rtcp_received: int = 0
    remote_report: ReportBlock | None = None
    direction: str = "sendrecv"  # ours (RFC 3264): recvonly / inactive send no RTP

    seq = _int_col(_k.L_SEQ, "next sequence number to send")
    ts = _int_col(_k.L_TS, "next timestamp to send")
    ssrc = _int_col(_k.L_SSRC, "our SSRC")
    packets_sent = _int_col(_k.L_SENT, "RTP packets sent")
    octets_sent = _int_col(_k.L_OCTETS, "RTP payload octets sent")
    packets_received = _int_col(_k.L_RECEIVED, "valid RTP packets received")
    foreign_dropped = _int_col(_k.L_FOREIGN, "RTP packets from foreign sources, dropped")
    relatched = _int_col(_k.L_RELATCHED, "times the latch moved to another source")

    @property
    def rec(self) -> Recording | None:
        """The leg's recording (media.recorder); its row is in L_REC for the kernels."""
        return self._rec

    @rec.setter
    def rec(self, rec: Recording | None) -> None:
        self._rec = rec
        self.tab.i[self.row, _k.L_REC] = -1 if rec is None else rec.row

    @property
    def samples_per_frame(self) -> int:
        return SAMPLE_RATE * self.ptime_ms // 1000

    @property
    def remote(self) -> tuple[str, int] | None:
        """Where RTP goes: the SDP address, or the latched source."""
        return self._remote

    @remote.setter
    def remote(self, addr: tuple[str, int] | None) -> None:
        self._remote = addr
        i = self.tab.i
        i[self.row, _k.L_HAS_REMOTE] = addr is not None
        i[self.row, _k.L_REMOTE_IP] = 0 if addr is None else ipv4_int(addr[0])
        i[self.row, _k.L_REMOTE_PORT] = 0 if addr is None else addr[1]

    @property
    def sending(self) -> bool:
        """False while on hold (our direction recvonly or inactive): no RTP goes out."""
        return not self.tab.i[self.row, _k.L_NOSEND]

    @property
    def latched(self) -> bool:
        return bool(self.tab.i[self.row, _k.L_LATCHED])

    @latched.setter
    def latched(self, value: bool) -> None:
        self.tab.i[self.row, _k.L_LATCHED] = value

    @property
    def sent_until(self) -> float | None:
        """Nominal time at which the last packet sent ends (its start + its duration)."""
        v = float(self.tab.f[self.row, _k.F_SENT_UNTIL])
        return None if math.isnan(v) else v

    @sent_until.setter
    def sent_until(self, value: float | None) -> None:
        self.tab.f[self.row, _k.F_SENT_UNTIL] = math.nan if value is None else value

    @property
    def fwd_offset(self) -> int | None:
        """Forwarded-audio timestamp offset into this leg's timeline (None: resync)."""
        v = int(self.tab.i[self.row, _k.L_FWD_OFFSET])
        return None if v < 0 else v

    @fwd_offset.setter
    def fwd_offset(self, value: int | None) -> None:
        self.tab.i[self.row, _k.L_FWD_OFFSET] = -1 if value is None else value

    def sync_tx(self) -> None:
        """Mirror the Python-side send settings into the leg's row."""
        i = self.tab.i
        r = self.row
        i[r, _k.L_PT] = self.payload_type
        i[r, _k.L_DTMF_PT] = -1 if self.dtmf_payload_type is None else self.dtmf_payload_type
        i[r, _k.L_CN_PT] = -1 if self.cn_payload_type is None else self.cn_payload_type
        # Nothing else feeds the stream: the fill kernel keeps it going between prompts.
        i[r, _k.L_FILL] = self.peer is None and self.ws is None
        i[r, _k.L_CODEC] = 1 if self.codec == "PCMA" else 0
        i[r, _k.L_SILENCE] = g711.SILENCE[self.codec]
        i[r, _k.L_SPF] = self.samples_per_frame
        self.tab.f[r, _k.F_PTIME] = self.ptime_ms / 1000.0

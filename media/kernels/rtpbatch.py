"""The per-packet RTP work of a media worker as two batch kernels: receive and prompt pump.

Theory of operation
-------------------

**Receive** (`rx_batch`). The worker's socket loop leaves one poll's datagrams
in a `packets × 2048` buffer with each one's length, source `sockaddr_in` and
the row of the leg it arrived for. One pass over the batch does, per packet,
what `MediaEngine.receive_rtp` does in Python for the common case:

1. parse the RTP header exactly as `media.rtp.parse_rtp` (version 2, CSRCs,
   header extension, padding; anything unusable is dropped uncounted);
2. check its source against the leg's latch (`source_check_py` is the rule;
   see "Strict latching" below): a packet from a foreign source is counted
   (`L_FOREIGN`) and dropped here, before anything else sees it; otherwise it
   is counted and, when it (re-)latches the leg, the leg's remote address
   becomes its source (RFC 4961 symmetric RTP: we send where it comes from);
3. RFC 3550 A.1 sequence tracking (wrap, dropout, misorder, the two-packet
   resync of a large jump, a new SSRC restarting) — the same state as
   `media.rtcp.ReceiveStats`, one row per leg of a `StatsTable`;
4. for audio (payload type 0, 8 or the leg's own, with a payload) on a leg
   with nothing but detection to feed: A.8 interarrival jitter, and the codes
   written into the leg's receive ring at their timestamp, as
   `media.rxaudio.RxAudio.put` does.

Everything else is *flagged* for Python (`ACT_PYTHON`), after steps 1-3 have
been done here, so the order of the statistics is the order of arrival:
RFC 4733 events (the leg's telephone-event payload type: digit detection) and
every packet of a WebSocket-bridged leg (`L_FAST` = 0: that path queues per
packet). Audio of a recorded leg (`L_REC` ≥ 0) is marked `ACT_RECORD`:
`media.kernels.recplace.record_rx` places it in the recording's buffer right
after this pass (and `record_tx` what the leg hears). Every valid packet of a bridged leg
(`L_PEER` ≥ 0) is marked `ACT_RELAY` for the relay below. A packet that latched its
leg is marked `ACT_LATCHED` (and `ACT_RELATCHED` when the latch moved) so the
engine can update the leg's Python-side address (and move its RTCP). Packets with an unknown payload type, or none, are counted and go no
further, as in Python.

**Relay** (`relay_batch`, right after `rx_batch` over the same batch). Each
packet marked `ACT_RELAY` goes into its leg's peer's stream (row `L_PEER`), as
`MediaEngine._forward` does for the per-packet path: the peer's SSRC, its next
sequence number, the source timestamp plus the peer's forward offset
(`L_FWD_OFFSET`), which is fixed at the first packet of each talk spurt so the
peer's timeline goes on over the gap (RFC 3550 §5.1; marker set), and reset
(-1) whenever something else takes the stream (a prompt, a new bridge, resume
from hold, a codec change). Audio (payload type 0, 8 or the leg's own, not
empty) leaves with the peer's payload type, transcoded µ-law <-> A-law through
a 256-entry table (`XCODE`) when the codecs differ; RFC 4733 packets with the
peer's telephone-event payload type (dropped when the peer has none), and
still flagged for Python, which detects the digit but does not forward it
again. Nothing goes to a peer without an address, playing a prompt or on hold
(`L_NOSEND`). The packets land in a `TxBatch`-shaped buffer (data, lengths,
the peer's row, timestamp, `at` = now for audio and NaN for events, the
peer's address) that the worker sends at once, after the same receive pass:
relayed audio waits for no tick. The peer's counters (`L_SENT`, `L_OCTETS`,
`L_TS`, `F_SENT_UNTIL`) move as for any packet it sends.

**Pump** (`pump_tick`). Every playing leg's prompt frames due by `now`, from
a fixed origin per prompt (frame k at `origin + k·ptime`), at most
`MAX_BURST_FRAMES` per tick (a later tick slides the origin), looping or
ending, as `MediaEngine` always did (a leg on hold, `L_NOSEND`, or without
an address runs its prompt's clock and sends nothing) — but into one `packets × (12 + spf)`
buffer: the 12-byte header (RFC 3550 §5.1; marker on a prompt's first packet,
its timestamp advanced over the silence since the leg's last packet), the
frame's codes from the prompt arena, padded with the codec's silence. The
worker then sends the whole buffer with one compiled `sendto` loop.

**Fill** (`fill_tick`). A leg that nothing feeds (no prompt playing, not bridged,
no WebSocket: a menu waiting for digits, a collect, the provider thinking) keeps
its stream going so NATs and phones do not take the call for dead: one packet
per ptime, paced like a prompt from the moment the gap began (the end of the last
packet sent, when that was within `MAX_BURST_FRAMES` frames, else now), with the
leg's SSRC and continuing sequence numbers and timestamps (RFC 3550 §5.1: the
timestamp advances over any gap before the first fill frame), no marker (the
stream goes on; the next prompt marks its talk spurt). The payload is an RFC 3389
comfort-noise packet (one byte, `CN_LEVEL_DBOV`) when the leg negotiated CN
(`L_CN_PT`), else a frame of the codec's silence. A leg on hold or without an
address sends nothing, as the pump. The same `packets × (12 + spf)` buffer takes
these packets after the tick's prompt packets.

**Strict latching.** A leg latches onto the source (ip:port) of its first
valid packet whose source port is not 0 (port 0 cannot be answered; before
the latch such packets are processed, as every packet is, and they latch
nothing). Once latched, only the latched source's packets are processed;
every other source's are dropped before statistics, DTMF, audio, recording
or relay, and counted per leg. The latch moves (counted in `L_RELATCHED`) in
two cases only:

* a packet from the address signalling gave (`L_SDP_IP`/`L_SDP_PORT`, the
  SDP c=/m= of the last offer/answer) takes the latch back at once: a first
  packet sprayed by a stranger before the phone's own cannot keep a phone
  that is where its SDP says locked out (rtpengine's "heuristic" endpoint
  learning prefers the advertised address the same way);
* a new source after the latched one has been silent for `relatch_s`
  (a stream moved without signalling: an SBC's media failover, a phone that
  re-created its RTP session) — in strict mode only with another SSRC than
  the latched stream's (`any_ssrc` False), in loose mode with any SSRC (a NAT
  binding that changed under a running stream keeps its SSRC). Never while
  our direction is sendonly/inactive (`L_NORECV`: the far end is not
  sending, so its silence means nothing), and a new offer/answer counts as
  a sign of life (`F_LATCH_SEEN` NaN: the silence is counted from the next
  foreign packet).

rtpengine's `strict-source` flag drops the same packets but never moves the
latch without signalling; its `media-handover` moves it on every new source.
A new remote address from signalling (re-INVITE/UPDATE) clears the latch
(`MediaEngine.set_remote`).

Each kernel has a pure-Python twin with the same arguments (`rx_batch_py`,
`relay_batch_py`, `pump_tick_py`, `fill_tick_py`), built from the reference code
(`parse_rtp`, `ReceiveStats`, `RxAudio.put`, `g711.transcode`, `build_header`;
the engine's former per-leg pump), which the tests cross-check.
`media/legtable.py` holds the arrays; the engine calls these.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from media.kernels import g711 as _g711

# ------------------------------------------------------------ leg table columns (int64)

L_ALIVE = 0  # 1 while the row is a leg
L_FAST = 1  # 1: the kernel may finish this leg's audio (no WebSocket)
L_PT = 2  # the leg's audio payload type
L_DTMF_PT = 3  # telephone-event payload type, -1 none
L_CODEC = 4  # 0 PCMU, 1 PCMA
L_RX_SLOT = 5  # row in RxAudio, -1 none (no in-band detection)
L_LATCHED = 6
L_RECEIVED = 7  # packets received (valid RTP)
L_HAS_REMOTE = 8
L_REMOTE_IP = 9  # IPv4 as an integer (network order read big-endian); 0 for IPv6
L_REMOTE_PORT = 10
L_SEQ = 11  # next sequence number to send
L_TS = 12  # next timestamp to send
L_SSRC = 13
L_SPF = 14  # samples per frame
L_SILENCE = 15  # the codec's silence code
L_SENT = 16  # packets sent
L_OCTETS = 17  # payload octets sent
L_FWD_OFFSET = 18  # forwarded-audio timestamp offset, -1: resync at the next packet
L_PLAYING = 19
L_PLAY_OFF = 20  # the prompt's offset in the arena
L_PLAY_LEN = 21  # its length in samples
L_PLAY_LOOP = 22
L_PLAY_DONE = 23  # frames done
L_PLAY_MARKED = 24
L_PLAY_FIN = 25  # set by the pump when the prompt has ended
L_NOSEND = 26  # 1: on hold (our direction recvonly/inactive, RFC 3264): send no RTP
L_SDP_IP = 27  # the address signalling gave (SDP c=/m=), L_REMOTE_IP form; 0 none
L_SDP_PORT = 28  # its port, 0 none
L_NORECV = 29  # 1: our direction sendonly/inactive: the far end sends nothing, so no re-latch
L_FOREIGN = 30  # valid RTP packets from a source other than the latched one, dropped
L_RELATCHED = 31  # times the latch moved to another source
L_CN_PT = 32  # RFC 3389 comfort-noise payload type when negotiated, -1 none
L_FILL = 33  # 1: nothing else feeds the leg's stream (not bridged, no WebSocket): fill gaps
L_FILL_DONE = 34  # fill frames sent since F_FILL_ORIGIN
L_PEER = 35  # the bridged peer's row (`relay_batch` forwards this leg's packets there), -1 none
L_REC = 36  # its recording's row in the RecorderTable (`media.kernels.recplace`), -1 none
L_COLS = 37

# float64 columns
F_PTIME = 0  # seconds
F_SENT_UNTIL = 1  # nominal end of the last packet sent, NaN: none yet
F_PLAY_ORIGIN = 2  # NaN until the first tick after play
F_LATCH_SEEN = 3  # last packet from the latched source; NaN: count from the next check
F_FILL_ORIGIN = 4  # when the current run of fill frames started; NaN: none running
F_COLS = 5

# StatsTable columns (media.rtcp): int64 then float64
S_SSRC = 0  # -1: no source yet
S_BASE = 1
S_MAX = 2
S_CYCLES = 3
S_BAD = 4
S_RECEIVED = 5
S_EXP_PRIOR = 6
S_RECV_PRIOR = 7
S_COLS = 8
SF_TRANSIT = 0  # NaN: none yet
SF_JITTER = 1
SF_COLS = 2

ACT_PYTHON = 1
ACT_LATCHED = 2  # the packet latched its leg: the engine updates the leg's address
ACT_RELATCHED = 4  # ... onto another source than the one it was latched to
ACT_RELAY = 8  # the leg is bridged: `relay_batch` forwards the packet into its peer's stream
ACT_RECORD = 16  # audio of a recorded leg: `recplace.record_rx` places it in the recording

HEADER_SIZE = 12
SEQ_MOD = 1 << 16
TS_MOD = 1 << 32
HALF = 1 << 31
MAX_DROPOUT = 3000
MAX_MISORDER = 100
CLOCK_RATE = 8000
RING_SAMPLES = 2048
RING_MASK = RING_SAMPLES - 1
TICK_SAMPLES = 160
# A receive ring holds uint16: the G.711 code in the low byte, and RECEIVED set on what a
# packet wrote (silence filled in for a lost or late packet has it clear), so the tick's
# read can tell the in-band detector which 5 ms sub-blocks were not heard at all.
RECEIVED = 0x100
GAP_SUB_SAMPLES = 40  # the in-band detector's sub-block (media.kernels.goertzel.SUB_SAMPLES)
GAP_SUBS = TICK_SAMPLES // GAP_SUB_SAMPLES
LATE_RUN_RESYNC = 3
MAX_BURST_FRAMES = 5
EPS = 1e-7
# RFC 3389 §3.1: the noise level of a comfort-noise packet, in -dBov: a quiet room.
CN_LEVEL_DBOV = 70
# Relay transcoding, one look-up per code (G.711 decode then encode, as
# `media.g711.transcode`): row 0 µ-law -> A-law, row 1 A-law -> µ-law.
_ALL_CODES = np.arange(256, dtype=np.uint8)
XCODE = np.stack([
    _g711.alaw_encode_py(_g711.ulaw_decode_py(_ALL_CODES)),
    _g711.ulaw_encode_py(_g711.alaw_decode_py(_ALL_CODES)),
])  # fmt: skip


# ------------------------------------------------------------ receive: numba


@njit(cache=True, inline="always")
def be32(row: np.ndarray, at: int) -> int:
    """The big-endian 32-bit unsigned integer at byte `at` of a uint8 row (an RTP
    timestamp or SSRC, RFC 3550 §5.1; an IPv4 address in a sockaddr_in)."""
    return int(
        (np.int64(row[at]) << 24) | (np.int64(row[at + 1]) << 16)
        | (np.int64(row[at + 2]) << 8) | row[at + 3]
    )  # fmt: skip


@njit(cache=True, inline="always")
def _init_seq(si: np.ndarray, r: int, seq: int) -> None:
    si[r, S_BASE] = seq
    si[r, S_MAX] = seq
    si[r, S_BAD] = SEQ_MOD + 1
    si[r, S_CYCLES] = 0
    si[r, S_RECEIVED] = 0
    si[r, S_RECV_PRIOR] = 0
    si[r, S_EXP_PRIOR] = 0


@njit(cache=True)
def _stats_update(si: np.ndarray, sf: np.ndarray, r: int, seq: int, ssrc: int) -> None:
    if si[r, S_SSRC] != ssrc:
        si[r, S_SSRC] = ssrc
        _init_seq(si, r, seq)
        si[r, S_RECEIVED] = 1
        si[r, S_EXP_PRIOR] = 0
        si[r, S_RECV_PRIOR] = 0
        sf[r, SF_TRANSIT] = np.nan
        sf[r, SF_JITTER] = 0.0
        return
    max_seq = si[r, S_MAX]
    udelta = (seq - max_seq) % SEQ_MOD
    if udelta < MAX_DROPOUT:
        if seq < max_seq:
            si[r, S_CYCLES] += SEQ_MOD
        si[r, S_MAX] = seq
    elif udelta <= SEQ_MOD - MAX_MISORDER:
        if seq == si[r, S_BAD]:
            _init_seq(si, r, seq)
        else:
            si[r, S_BAD] = (seq + 1) % SEQ_MOD
            return
    si[r, S_RECEIVED] += 1


@njit(cache=True)
def _ring_resync(
    slot: int, ts: int, n: int, ring: np.ndarray, read_ts: np.ndarray, started: np.ndarray,
    silence: np.ndarray, anchor_ts: np.ndarray, anchor_t: np.ndarray, late_run: np.ndarray,
    resyncs: np.ndarray,
) -> None:  # fmt: skip
    ring[slot, :] = silence[slot]
    read_ts[slot] = (ts - TICK_SAMPLES - 2 * n) % TS_MOD
    anchor_ts[slot] = ts
    anchor_t[slot] = 0.0
    started[slot] = True
    late_run[slot] = 0
    resyncs[slot] += 1


@njit(cache=True)
def _ring_put(
    slot: int, ts: int, seq: int, buf: np.ndarray, i: int, start: int, n: int, now: float,
    ring: np.ndarray, read_ts: np.ndarray, started: np.ndarray, silence: np.ndarray,
    anchor_ts: np.ndarray, anchor_t: np.ndarray, late_run: np.ndarray, late: np.ndarray,
    resyncs: np.ndarray, last_seq: np.ndarray, last_end: np.ndarray,
) -> None:  # fmt: skip
    if n == 0 or n > RING_SAMPLES // 4:
        return
    if not started[slot]:
        _ring_resync(slot, ts, n, ring, read_ts, started, silence, anchor_ts, anchor_t,
                     late_run, resyncs)  # fmt: skip
        last_seq[slot] = -1
    d = (ts - read_ts[slot] + HALF) % TS_MOD - HALF
    if d < 0:
        late_run[slot] += 1
        if d > -(HALF // 2) and late_run[slot] < LATE_RUN_RESYNC:
            late[slot] += 1
            return
        _ring_resync(slot, ts, n, ring, read_ts, started, silence, anchor_ts, anchor_t,
                     late_run, resyncs)  # fmt: skip
        last_seq[slot] = -1
    elif d + n > RING_SAMPLES - TICK_SAMPLES:
        _ring_resync(slot, ts, n, ring, read_ts, started, silence, anchor_ts, anchor_t,
                     late_run, resyncs)  # fmt: skip
        last_seq[slot] = -1
    else:
        late_run[slot] = 0
    last = last_seq[slot]
    if last >= 0 and seq == (last + 1) & 0xFFFF:
        # The next sequence number after a timestamp jump: the sender paused (silence
        # suppression, RFC 3550 §5.1) and lost nothing, so what it did not send is heard
        # silence, not a gap (`media.rxaudio`, "unsent pauses"); only what is still to
        # be read.
        gap_from = last_end[slot]
        if (gap_from - read_ts[slot] + HALF) % TS_MOD - HALF < 0:
            gap_from = read_ts[slot]
        span = (ts - gap_from + HALF) % TS_MOD - HALF
        if 0 < span <= RING_SAMPLES - TICK_SAMPLES:
            heard = np.uint16(silence[slot]) | RECEIVED
            for j in range(span):
                ring[slot, (gap_from + j) & RING_MASK] = heard
    pos = ts & RING_MASK
    for j in range(n):
        ring[slot, (pos + j) & RING_MASK] = np.uint16(buf[i, start + j]) | RECEIVED
    end = (ts + n) % TS_MOD
    if last < 0 or ((seq - last) & 0xFFFF) < 0x8000:  # the newest in sequence so far
        last_seq[slot] = seq
        last_end[slot] = end
    if (end - anchor_ts[slot] + HALF) % TS_MOD - HALF > 0:
        anchor_ts[slot] = end
        anchor_t[slot] = now


@njit(cache=True, inline="always")
def _source_check(
    li: np.ndarray, lf: np.ndarray, si: np.ndarray, r: int, from_latched: bool, from_sdp: bool,
    port: int, ssrc: int, now: float, relatch_s: float, any_ssrc: bool,
) -> int:  # fmt: skip
    if li[r, L_LATCHED] == 0:
        if port == 0:
            return 0
        li[r, L_LATCHED] = 1
        lf[r, F_LATCH_SEEN] = now
        return ACT_LATCHED
    if from_latched:
        lf[r, F_LATCH_SEEN] = now
        return 0
    if port != 0:
        relatch = from_sdp
        if not relatch and li[r, L_NORECV] == 0:
            seen = lf[r, F_LATCH_SEEN]
            if math.isnan(seen):
                seen = now
                lf[r, F_LATCH_SEEN] = now
            relatch = now - seen >= relatch_s and (any_ssrc or ssrc != si[r, S_SSRC])
        if relatch:
            li[r, L_RELATCHED] += 1
            lf[r, F_LATCH_SEEN] = now
            return ACT_LATCHED | ACT_RELATCHED
    li[r, L_FOREIGN] += 1
    return -1


@njit(cache=True)
def rx_batch(
    buf: np.ndarray, lens: np.ndarray, names: np.ndarray, rows: np.ndarray, n: int, now: float,
    relatch_s: float, any_ssrc: bool, li: np.ndarray, lf: np.ndarray, si: np.ndarray,
    sf: np.ndarray,
    ring: np.ndarray, read_ts: np.ndarray, started: np.ndarray, silence: np.ndarray,
    anchor_ts: np.ndarray, anchor_t: np.ndarray, late_run: np.ndarray, late: np.ndarray,
    resyncs: np.ndarray, last_seq: np.ndarray, last_end: np.ndarray, action: np.ndarray,
) -> int:  # fmt: skip
    """Receive `n` datagrams (see the module docstring); action[i] gets ACT_* bits.
    Returns the union of the packets' bits, so the caller runs only the steps some
    packet needs (no scan of `action` for a pass with nothing for Python)."""
    seen = 0
    for i in range(n):
        action[i] = 0
        r = rows[i]
        if r < 0 or li[r, L_ALIVE] == 0:
            continue
        size = lens[i]
        if size < HEADER_SIZE:
            continue
        b0 = buf[i, 0]
        if b0 >> 6 != 2:
            continue
        cc = b0 & 0x0F
        off = HEADER_SIZE + 4 * cc
        if size < off:
            continue
        if b0 & 0x10:
            if size < off + 4:
                continue
            words = (np.int64(buf[i, off + 2]) << 8) | buf[i, off + 3]
            ext_end = off + 4 + 4 * words
            if size < ext_end:
                continue
            off = ext_end
        end = size
        if b0 & 0x20:
            pad = np.int64(buf[i, size - 1])
            if pad == 0 or off + pad > end:
                continue
            end -= pad
        b1 = buf[i, 1]
        pt = np.int64(b1 & 0x7F)
        seq = (np.int64(buf[i, 2]) << 8) | buf[i, 3]
        ts = be32(buf[i], 4)
        ssrc = be32(buf[i], 8)
        port = (np.int64(names[i, 2]) << 8) | names[i, 3]
        ip = be32(names[i], 4)
        if li[r, L_LATCHED] != 0 and ip == li[r, L_REMOTE_IP] and port == li[r, L_REMOTE_PORT]:
            lf[r, F_LATCH_SEEN] = now  # the common case, in line
            act = 0
        else:
            act = _source_check(
                li, lf, si, r, False, ip == li[r, L_SDP_IP] and port == li[r, L_SDP_PORT],
                port, ssrc, now, relatch_s, any_ssrc,
            )  # fmt: skip
            if act < 0:
                continue  # a foreign source: counted, nothing else
        li[r, L_RECEIVED] += 1
        if act:
            li[r, L_HAS_REMOTE] = 1
            li[r, L_REMOTE_IP] = ip
            li[r, L_REMOTE_PORT] = port
        _stats_update(si, sf, r, seq, ssrc)
        if li[r, L_PEER] >= 0:
            act |= ACT_RELAY
        if li[r, L_FAST] == 0 or pt == li[r, L_DTMF_PT]:
            act |= ACT_PYTHON
        else:
            leg_codec = li[r, L_CODEC]
            codec = -1
            if pt == 0:
                codec = 0
            elif pt == 8:
                codec = 1
            elif pt == li[r, L_PT]:
                codec = leg_codec
            if codec >= 0 and end > off:
                transit = now * CLOCK_RATE - ts
                prev = sf[r, SF_TRANSIT]
                if not math.isnan(prev):
                    d = abs(transit - prev)
                    if d < 1 << 30:
                        sf[r, SF_JITTER] += (d - sf[r, SF_JITTER]) / 16.0
                sf[r, SF_TRANSIT] = transit
                slot = li[r, L_RX_SLOT]
                if slot >= 0 and codec == leg_codec:
                    _ring_put(slot, ts, seq, buf, i, off, end - off, now, ring, read_ts,
                              started, silence, anchor_ts, anchor_t, late_run, late, resyncs,
                              last_seq, last_end)  # fmt: skip
                if li[r, L_REC] >= 0:
                    act |= ACT_RECORD
        action[i] = act
        seen |= act
    return seen


# ------------------------------------------------------------ receive: the Python twin


def source_check_py(
    li: np.ndarray, lf: np.ndarray, si: np.ndarray, r: int, from_latched: bool, from_sdp: bool,
    port: int, ssrc: int, now: float, relatch_s: float, any_ssrc: bool,
) -> int:  # fmt: skip
    """The latch rule for one valid RTP packet of the leg in row `r` (module docstring,
    "Strict latching"): -1 drop it (counted in L_FOREIGN); 0 take it; ACT_LATCHED (with
    ACT_RELATCHED when the latch moved) take it and make its source the leg's remote
    address (the caller writes the address). `from_latched`: the leg is latched and the
    packet comes from that source; `from_sdp`: it comes from the signalled address."""
    row, frow = li[r], lf[r]
    if not row[L_LATCHED]:
        if port == 0:  # no address to answer: take the packet, latch nothing
            return 0
        row[L_LATCHED] = 1
        frow[F_LATCH_SEEN] = now
        return ACT_LATCHED
    if from_latched:
        frow[F_LATCH_SEEN] = now
        return 0
    if port != 0:
        relatch = from_sdp
        if not relatch and not row[L_NORECV]:
            if math.isnan(frow[F_LATCH_SEEN]):  # signalled since: silent from now on
                frow[F_LATCH_SEEN] = now
            silent = now - float(frow[F_LATCH_SEEN]) >= relatch_s
            relatch = silent and (any_ssrc or ssrc != si[r, S_SSRC])
        if relatch:
            row[L_RELATCHED] += 1
            frow[F_LATCH_SEEN] = now
            return ACT_LATCHED | ACT_RELATCHED
    row[L_FOREIGN] += 1
    return -1


def rx_batch_py(
    buf: np.ndarray, lens: np.ndarray, names: np.ndarray, rows: np.ndarray, n: int, now: float,
    relatch_s: float, any_ssrc: bool, li: np.ndarray, lf: np.ndarray, si: np.ndarray,
    sf: np.ndarray,
    ring: np.ndarray, read_ts: np.ndarray, started: np.ndarray, silence: np.ndarray,
    anchor_ts: np.ndarray, anchor_t: np.ndarray, late_run: np.ndarray, late: np.ndarray,
    resyncs: np.ndarray, last_seq: np.ndarray, last_end: np.ndarray, action: np.ndarray,
) -> int:  # fmt: skip
    """`rx_batch` from the reference code: parse_rtp, ReceiveStats, RxAudio.put."""
    from media.rtcp import ReceiveStats, StatsTable
    from media.rtp import RtpError, parse_rtp
    from media.rxaudio import RxAudio

    stats = StatsTable.over(si, sf)
    rx = RxAudio.over(ring, read_ts, started, silence, anchor_ts, anchor_t, late_run, late,
                      resyncs, last_seq, last_end)  # fmt: skip
    seen = 0
    for i in range(n):
        action[i] = 0
        r = int(rows[i])
        if r < 0 or li[r, L_ALIVE] == 0:
            continue
        try:
            pkt = parse_rtp(buf[i, : lens[i]].tobytes())
        except RtpError:
            continue
        port = int(names[i, 2]) << 8 | int(names[i, 3])
        ip = int.from_bytes(names[i, 4:8].tobytes(), "big")
        src = (ip, port)
        latched = (int(li[r, L_REMOTE_IP]), int(li[r, L_REMOTE_PORT]))
        sdp = (int(li[r, L_SDP_IP]), int(li[r, L_SDP_PORT]))
        act = source_check_py(li, lf, si, r, bool(li[r, L_LATCHED]) and src == latched,
                              src == sdp, port, pkt.ssrc, now, relatch_s, any_ssrc)  # fmt: skip
        if act < 0:
            continue
        li[r, L_RECEIVED] += 1
        if act:
            li[r, L_HAS_REMOTE] = 1
            li[r, L_REMOTE_IP], li[r, L_REMOTE_PORT] = src
        st = ReceiveStats(stats, r)
        st.update(pkt.sequence, pkt.ssrc, now)
        pt = pkt.payload_type
        if li[r, L_PEER] >= 0:
            act |= ACT_RELAY
        if not li[r, L_FAST] or pt == li[r, L_DTMF_PT]:
            act |= ACT_PYTHON
        else:
            leg_codec = int(li[r, L_CODEC])
            codec = {0: 0, 8: 1}.get(pt, leg_codec if pt == li[r, L_PT] else -1)
            if codec >= 0 and pkt.payload:
                st.update_jitter(pkt.timestamp, now)
                if li[r, L_RX_SLOT] >= 0 and codec == leg_codec:
                    rx.put(int(li[r, L_RX_SLOT]), pkt.timestamp, pkt.payload, now,
                           pkt.sequence)  # fmt: skip
                if li[r, L_REC] >= 0:
                    act |= ACT_RECORD
        action[i] = act
        seen |= act
    return seen


# ------------------------------------------------------------ pump: numba


@njit(cache=True, inline="always")
def payload_span(buf: np.ndarray, i: int, size: int) -> tuple[int, int]:
    """Where the payload of datagram `i` starts and ends (after the CSRC list and a
    header extension, before padding; RFC 3550 §5.1, §5.3.1), from a header `rx_batch`
    already checked: the offsets are within the datagram."""
    b0 = buf[i, 0]
    off = HEADER_SIZE + 4 * (b0 & 0x0F)
    if b0 & 0x10:
        off += 4 + 4 * ((np.int64(buf[i, off + 2]) << 8) | buf[i, off + 3])
    padding = int(buf[i, size - 1]) if b0 & 0x20 else 0
    return off, size - padding


@njit(cache=True, inline="always")
def write_header(data: np.ndarray, p: int, b1: int, seq: int, ts: int, ssrc: int) -> None:
    """The 12-byte RTP header (RFC 3550 §5.1: version 2, no padding, extension or CSRC)
    of packet `p` of a send buffer; `b1` is its second byte (marker bit and payload
    type)."""
    data[p, 0] = 0x80
    data[p, 1] = b1
    data[p, 2] = (seq >> 8) & 0xFF
    data[p, 3] = seq & 0xFF
    data[p, 4] = (ts >> 24) & 0xFF
    data[p, 5] = (ts >> 16) & 0xFF
    data[p, 6] = (ts >> 8) & 0xFF
    data[p, 7] = ts & 0xFF
    data[p, 8] = (ssrc >> 24) & 0xFF
    data[p, 9] = (ssrc >> 16) & 0xFF
    data[p, 10] = (ssrc >> 8) & 0xFF
    data[p, 11] = ssrc & 0xFF


@njit(cache=True, inline="always")
def _spurt_ts(li: np.ndarray, lf: np.ndarray, r: int, at: float) -> int:
    until = lf[r, F_SENT_UNTIL]
    if math.isnan(until):
        return li[r, L_TS]
    gap = max(0, round((at - until) * CLOCK_RATE))
    return (li[r, L_TS] + gap) % TS_MOD


@njit(cache=True)
def pump_tick(
    now: float, li: np.ndarray, lf: np.ndarray, arena: np.ndarray, start: int,
    data: np.ndarray, lens: np.ndarray, prow: np.ndarray, pts: np.ndarray, pat: np.ndarray,
    pip: np.ndarray, pport: np.ndarray,
) -> tuple[int, bool, int]:  # fmt: skip
    """Prompt frames of every playing leg due by `now`, into rows start.. of `data`.
    Returns (packets written so far, True when `data` filled up — call again from there
    with a bigger buffer —, prompts that ended: their rows have L_PLAY_FIN set)."""
    p = start
    cap = data.shape[0]
    width = data.shape[1]
    ended = 0
    for r in range(li.shape[0]):
        if li[r, L_PLAYING] == 0 or li[r, L_PLAY_FIN] != 0:
            continue
        ptime = lf[r, F_PTIME]
        spf = li[r, L_SPF]
        size = li[r, L_PLAY_LEN]
        total = (size + spf - 1) // spf
        loop = li[r, L_PLAY_LOOP] != 0
        origin = lf[r, F_PLAY_ORIGIN]
        if math.isnan(origin):
            origin = now
        due = math.floor((now - origin) / ptime + EPS) + 1
        done = li[r, L_PLAY_DONE]
        if due - done > MAX_BURST_FRAMES:
            slip = due - done - MAX_BURST_FRAMES
            origin += slip * ptime
            due -= slip
        full = False
        while done < due:
            k = done
            if k >= total:
                if not loop:
                    break
                origin += total * ptime
                due -= total
                done = 0
                continue
            if li[r, L_HAS_REMOTE] == 0 or li[r, L_NOSEND] != 0:
                done = k + 1
                continue  # the prompt's clock runs, but there is nowhere (or no leave) to send
            if p >= cap or HEADER_SIZE + spf > width:
                full = True
                break
            done = k + 1
            at = origin + k * ptime
            marker = li[r, L_PLAY_MARKED] == 0
            if marker:
                li[r, L_PLAY_MARKED] = 1
                li[r, L_TS] = _spurt_ts(li, lf, r, at)
                li[r, L_FWD_OFFSET] = -1
            seq = li[r, L_SEQ]
            ts = li[r, L_TS]
            ssrc = li[r, L_SSRC]
            write_header(data, p, (0x80 if marker else 0) | (li[r, L_PT] & 0x7F), seq, ts, ssrc)
            base = li[r, L_PLAY_OFF] + k * spf
            have = min(spf, size - k * spf)
            for j in range(have):
                data[p, HEADER_SIZE + j] = arena[base + j]
            fill = li[r, L_SILENCE]
            for j in range(have, spf):
                data[p, HEADER_SIZE + j] = fill
            lens[p] = HEADER_SIZE + spf
            prow[p] = r
            pts[p] = ts
            pat[p] = at
            pip[p] = li[r, L_REMOTE_IP]
            pport[p] = li[r, L_REMOTE_PORT]
            p += 1
            li[r, L_SEQ] = (seq + 1) & 0xFFFF
            li[r, L_TS] = (ts + spf) % TS_MOD
            lf[r, F_SENT_UNTIL] = at + ptime
            li[r, L_SENT] += 1
            li[r, L_OCTETS] += spf
        lf[r, F_PLAY_ORIGIN] = origin
        li[r, L_PLAY_DONE] = done
        if full:
            return p, True, ended
        if not loop and due > total:
            li[r, L_PLAY_FIN] = 1
            ended += 1
    return p, False, ended


@njit(cache=True)
def fill_tick(
    now: float, li: np.ndarray, lf: np.ndarray, start: int, data: np.ndarray,
    lens: np.ndarray, prow: np.ndarray, pts: np.ndarray, pat: np.ndarray, pip: np.ndarray,
    pport: np.ndarray,
) -> tuple[int, bool]:  # fmt: skip
    """Fill frames (comfort noise or silence) of every leg that nothing feeds, due by
    `now`, into rows start.. of `data`. Returns (packets written so far, True when
    `data` filled up: call again from there with a bigger buffer)."""
    p = start
    cap = data.shape[0]
    width = data.shape[1]
    for r in range(li.shape[0]):
        if (li[r, L_ALIVE] == 0 or li[r, L_FILL] == 0 or li[r, L_PLAYING] != 0
                or li[r, L_HAS_REMOTE] == 0 or li[r, L_NOSEND] != 0):
            lf[r, F_FILL_ORIGIN] = math.nan  # the next gap starts a new run
            continue
        ptime = lf[r, F_PTIME]
        spf = li[r, L_SPF]
        origin = lf[r, F_FILL_ORIGIN]
        if math.isnan(origin):
            origin = now
            until = lf[r, F_SENT_UNTIL]
            if not math.isnan(until) and now - MAX_BURST_FRAMES * ptime < until <= now + EPS:
                origin = until  # right after the last packet: no hole in the stream
            lf[r, F_FILL_ORIGIN] = origin
            li[r, L_FILL_DONE] = 0
        done = li[r, L_FILL_DONE]
        due = math.floor((now - origin) / ptime + EPS) + 1
        if due - done > MAX_BURST_FRAMES:
            slip = due - done - MAX_BURST_FRAMES
            origin += slip * ptime
            due -= slip
            lf[r, F_FILL_ORIGIN] = origin
        cn = li[r, L_CN_PT]
        size = 1 if cn >= 0 else spf
        while done < due:
            if p >= cap or HEADER_SIZE + size > width:
                li[r, L_FILL_DONE] = done
                return p, True
            at = origin + done * ptime
            ts = li[r, L_TS] if done > 0 else _spurt_ts(li, lf, r, at)
            seq = li[r, L_SEQ]
            ssrc = li[r, L_SSRC]
            write_header(data, p, (cn if cn >= 0 else li[r, L_PT]) & 0x7F, seq, ts, ssrc)
            if cn >= 0:
                data[p, HEADER_SIZE] = CN_LEVEL_DBOV
            else:
                fill = li[r, L_SILENCE]
                for j in range(spf):
                    data[p, HEADER_SIZE + j] = fill
            lens[p] = HEADER_SIZE + size
            prow[p] = r
            pts[p] = ts
            pat[p] = at
            pip[p] = li[r, L_REMOTE_IP]
            pport[p] = li[r, L_REMOTE_PORT]
            p += 1
            done += 1
            li[r, L_SEQ] = (seq + 1) & 0xFFFF
            li[r, L_TS] = (ts + spf) % TS_MOD
            lf[r, F_SENT_UNTIL] = at + ptime
            li[r, L_SENT] += 1
            li[r, L_OCTETS] += size
        li[r, L_FILL_DONE] = done
    return p, False


def fill_tick_py(
    now: float, li: np.ndarray, lf: np.ndarray, start: int, data: np.ndarray,
    lens: np.ndarray, prow: np.ndarray, pts: np.ndarray, pat: np.ndarray, pip: np.ndarray,
    pport: np.ndarray,
) -> tuple[int, bool]:  # fmt: skip
    """`fill_tick` with `build_header` and bytes, one leg and one packet at a time."""
    from media.rtp import build_header, ts_add

    p, cap, width = start, data.shape[0], data.shape[1]
    for r in range(li.shape[0]):
        row, frow = li[r], lf[r]
        if (not row[L_ALIVE] or not row[L_FILL] or row[L_PLAYING] or not row[L_HAS_REMOTE]
                or row[L_NOSEND]):
            frow[F_FILL_ORIGIN] = math.nan
            continue
        ptime, spf = float(frow[F_PTIME]), int(row[L_SPF])
        if math.isnan(frow[F_FILL_ORIGIN]):
            until = float(frow[F_SENT_UNTIL])
            recent = not math.isnan(until) and now - MAX_BURST_FRAMES * ptime < until <= now + EPS
            frow[F_FILL_ORIGIN] = until if recent else now
            row[L_FILL_DONE] = 0
        origin, done = float(frow[F_FILL_ORIGIN]), int(row[L_FILL_DONE])
        due = math.floor((now - origin) / ptime + EPS) + 1
        if due - done > MAX_BURST_FRAMES:
            slip = due - done - MAX_BURST_FRAMES
            origin += slip * ptime
            due -= slip
            frow[F_FILL_ORIGIN] = origin
        cn = int(row[L_CN_PT])
        payload = bytes([CN_LEVEL_DBOV]) if cn >= 0 else bytes([int(row[L_SILENCE])]) * spf
        while done < due:
            if p >= cap or HEADER_SIZE + len(payload) > width:
                row[L_FILL_DONE] = done
                return p, True
            at = origin + done * ptime
            if done == 0 and not math.isnan(frow[F_SENT_UNTIL]):  # over the gap before it
                gap = max(0, round((at - frow[F_SENT_UNTIL]) * CLOCK_RATE))
                row[L_TS] = ts_add(int(row[L_TS]), gap)
            pkt = build_header(cn if cn >= 0 else int(row[L_PT]), int(row[L_SEQ]),
                               int(row[L_TS]), int(row[L_SSRC]), False) + payload
            data[p, : len(pkt)] = np.frombuffer(pkt, dtype=np.uint8)
            lens[p], prow[p], pts[p], pat[p] = len(pkt), r, row[L_TS], at
            pip[p], pport[p] = row[L_REMOTE_IP], row[L_REMOTE_PORT]
            p += 1
            done += 1
            row[L_SEQ] = (row[L_SEQ] + 1) & 0xFFFF
            row[L_TS] = ts_add(int(row[L_TS]), spf)
            frow[F_SENT_UNTIL] = at + ptime
            row[L_SENT] += 1
            row[L_OCTETS] += len(payload)
        row[L_FILL_DONE] = done
    return p, False


# ------------------------------------------------------------ pump: the Python twin


def pump_tick_py(
    now: float, li: np.ndarray, lf: np.ndarray, arena: np.ndarray, start: int,
    data: np.ndarray, lens: np.ndarray, prow: np.ndarray, pts: np.ndarray, pat: np.ndarray,
    pip: np.ndarray, pport: np.ndarray,
) -> tuple[int, bool, int]:  # fmt: skip
    """`pump_tick` as the engine's per-leg pump did it: bytes from `build_header`."""
    from media.rtp import build_header, ts_add

    p, cap, width, ended = start, data.shape[0], data.shape[1], 0
    for r in range(li.shape[0]):
        row, frow = li[r], lf[r]
        if not row[L_PLAYING] or row[L_PLAY_FIN]:
            continue
        ptime, spf, size = float(frow[F_PTIME]), int(row[L_SPF]), int(row[L_PLAY_LEN])
        codes = arena[row[L_PLAY_OFF] : row[L_PLAY_OFF] + size]
        total = math.ceil(size / spf)
        loop = bool(row[L_PLAY_LOOP])
        origin = now if math.isnan(frow[F_PLAY_ORIGIN]) else float(frow[F_PLAY_ORIGIN])
        due = math.floor((now - origin) / ptime + EPS) + 1
        done = int(row[L_PLAY_DONE])
        if due - done > MAX_BURST_FRAMES:
            slip = due - done - MAX_BURST_FRAMES
            origin += slip * ptime
            due -= slip
        full = False
        while done < due:
            k = done
            if k >= total:
                if not loop:
                    break
                origin += total * ptime
                due -= total
                done = 0
                continue
            if not row[L_HAS_REMOTE] or row[L_NOSEND]:
                done = k + 1
                continue
            if p >= cap or HEADER_SIZE + spf > width:
                full = True
                break
            done = k + 1
            at = origin + k * ptime
            marker = not row[L_PLAY_MARKED]
            if marker:
                row[L_PLAY_MARKED] = 1
                if not math.isnan(frow[F_SENT_UNTIL]):  # over the silence since then
                    gap = max(0, round((at - frow[F_SENT_UNTIL]) * CLOCK_RATE))
                    row[L_TS] = ts_add(int(row[L_TS]), gap)
                row[L_FWD_OFFSET] = -1
            payload = codes[k * spf : (k + 1) * spf].tobytes()
            payload += bytes([int(row[L_SILENCE])]) * (spf - len(payload))
            pkt = build_header(int(row[L_PT]), int(row[L_SEQ]), int(row[L_TS]), int(row[L_SSRC]),
                               marker) + payload  # fmt: skip
            data[p, : len(pkt)] = np.frombuffer(pkt, dtype=np.uint8)
            lens[p], prow[p], pts[p], pat[p] = len(pkt), r, row[L_TS], at
            pip[p], pport[p] = row[L_REMOTE_IP], row[L_REMOTE_PORT]
            p += 1
            row[L_SEQ] = (row[L_SEQ] + 1) & 0xFFFF
            row[L_TS] = ts_add(int(row[L_TS]), spf)
            frow[F_SENT_UNTIL] = at + ptime
            row[L_SENT] += 1
            row[L_OCTETS] += spf
        frow[F_PLAY_ORIGIN] = origin
        row[L_PLAY_DONE] = done
        if full:
            return p, True, ended
        if not loop and due > total:
            row[L_PLAY_FIN] = 1
            ended += 1
    return p, False, ended


# ------------------------------------------------------------ relay: numba


@njit(cache=True)
def relay_batch(
    buf: np.ndarray, lens: np.ndarray, rows: np.ndarray, n: int, start: int,
    action: np.ndarray, now: float, li: np.ndarray, lf: np.ndarray, data: np.ndarray,
    olens: np.ndarray, orows: np.ndarray, ots: np.ndarray, oat: np.ndarray, oips: np.ndarray,
    oports: np.ndarray, p: int,
) -> tuple[int, int]:  # fmt: skip
    """Every packet from `start` on that `rx_batch` marked ACT_RELAY, rewritten into its
    leg's peer's stream (module docstring, "Relay") at rows p.. of `data`. Returns
    (packets written so far, the index it stopped at: n when done, else the packet that
    did not fit — call again from there with a bigger buffer)."""
    cap = data.shape[0]
    width = data.shape[1]
    for i in range(start, n):
        if action[i] & ACT_RELAY == 0:
            continue
        r = rows[i]
        to = li[r, L_PEER]
        if to < 0 or li[to, L_ALIVE] == 0:
            continue
        off, end = payload_span(buf, i, lens[i])
        pt = np.int64(buf[i, 1] & 0x7F)
        nbytes = end - off
        xcode = -1  # no transcoding
        if pt == li[r, L_DTMF_PT]:
            out_pt = li[to, L_DTMF_PT]
            if nbytes < 4 or out_pt < 0:
                continue  # not an event (RFC 4733 §2.3), or the peer takes none
            samples = 0
        else:
            if pt == 0:
                codec = 0
            elif pt == 8:
                codec = 1
            elif pt == li[r, L_PT]:
                codec = li[r, L_CODEC]
            else:
                continue  # not audio we know (CN, another codec): not forwarded
            if nbytes == 0:
                continue
            out_pt = li[to, L_PT]
            samples = nbytes
            if codec != li[to, L_CODEC]:
                xcode = codec  # XCODE row: 0 µ-law -> A-law, 1 A-law -> µ-law
        if li[to, L_HAS_REMOTE] == 0 or li[to, L_PLAYING] != 0 or li[to, L_NOSEND] != 0:
            continue  # nowhere to send, a prompt has the stream, or on hold
        if p >= cap or HEADER_SIZE + nbytes > width:
            return p, i
        src_ts = be32(buf[i], 4)
        marker = np.int64(buf[i, 1] & 0x80)
        offset = li[to, L_FWD_OFFSET]
        if offset < 0:  # a new talk spurt in the peer's stream: continue its timeline, mark it
            offset = (_spurt_ts(li, lf, to, now) - src_ts) % TS_MOD
            li[to, L_FWD_OFFSET] = offset
            marker = np.int64(0x80)
        ts = (src_ts + offset) % TS_MOD
        seq = li[to, L_SEQ]
        ssrc = li[to, L_SSRC]
        write_header(data, p, marker | (out_pt & 0x7F), seq, ts, ssrc)
        if xcode < 0:
            for j in range(nbytes):
                data[p, HEADER_SIZE + j] = buf[i, off + j]
        else:
            for j in range(nbytes):
                data[p, HEADER_SIZE + j] = XCODE[xcode, buf[i, off + j]]
        olens[p] = HEADER_SIZE + nbytes
        orows[p] = to
        ots[p] = ts
        oat[p] = now if samples else math.nan
        oips[p] = li[to, L_REMOTE_IP]
        oports[p] = li[to, L_REMOTE_PORT]
        p += 1
        li[to, L_SEQ] = (seq + 1) & 0xFFFF
        li[to, L_SENT] += 1
        li[to, L_OCTETS] += nbytes
        if samples:
            li[to, L_TS] = (ts + samples) % TS_MOD
            lf[to, F_SENT_UNTIL] = now + samples / CLOCK_RATE
    return p, n


# ------------------------------------------------------------ relay: the Python twin


def relay_batch_py(
    buf: np.ndarray, lens: np.ndarray, rows: np.ndarray, n: int, start: int,
    action: np.ndarray, now: float, li: np.ndarray, lf: np.ndarray, data: np.ndarray,
    olens: np.ndarray, orows: np.ndarray, ots: np.ndarray, oat: np.ndarray, oips: np.ndarray,
    oports: np.ndarray, p: int,
) -> tuple[int, int]:  # fmt: skip
    """`relay_batch` as `MediaEngine._rx_handle`/`_forward` do it for one packet: parse_rtp,
    parse_event, g711.transcode, build_header."""
    from media import g711
    from media.rtp import RtpError, build_header, parse_event, parse_rtp, ts_add

    laws = ("PCMU", "PCMA")
    cap, width = data.shape[0], data.shape[1]
    for i in range(start, n):
        if not action[i] & ACT_RELAY:
            continue
        src, to = li[int(rows[i])], int(li[int(rows[i]), L_PEER])
        if to < 0 or not li[to, L_ALIVE]:
            continue
        pkt = parse_rtp(buf[i, : lens[i]].tobytes())
        peer, frow = li[to], lf[to]
        payload, samples = pkt.payload, len(pkt.payload)
        if pkt.payload_type == src[L_DTMF_PT]:
            try:
                parse_event(payload)
            except RtpError:
                continue
            if peer[L_DTMF_PT] < 0:
                continue
            pt, samples = int(peer[L_DTMF_PT]), 0
        else:
            codec = {0: 0, 8: 1}.get(pkt.payload_type, -1)
            if codec < 0 and pkt.payload_type == src[L_PT]:
                codec = int(src[L_CODEC])
            if codec < 0 or not payload:
                continue
            if codec != peer[L_CODEC]:
                codes = np.frombuffer(payload, dtype=np.uint8)
                payload = g711.transcode(codes, laws[codec], laws[int(peer[L_CODEC])]).tobytes()
            pt = int(peer[L_PT])
        if not peer[L_HAS_REMOTE] or peer[L_PLAYING] or peer[L_NOSEND]:
            continue
        if p >= cap or HEADER_SIZE + len(payload) > width:
            return p, i
        marker = pkt.marker
        if peer[L_FWD_OFFSET] < 0:
            spurt = int(peer[L_TS])
            if not math.isnan(frow[F_SENT_UNTIL]):
                spurt = ts_add(spurt, max(0, round((now - frow[F_SENT_UNTIL]) * CLOCK_RATE)))
            peer[L_FWD_OFFSET] = (spurt - pkt.timestamp) % TS_MOD
            marker = True
        ts = ts_add(pkt.timestamp, int(peer[L_FWD_OFFSET]))
        out = build_header(pt, int(peer[L_SEQ]), ts, int(peer[L_SSRC]), marker) + payload
        data[p, : len(out)] = np.frombuffer(out, dtype=np.uint8)
        olens[p], orows[p], ots[p] = len(out), to, ts
        oat[p] = now if samples else math.nan
        oips[p], oports[p] = peer[L_REMOTE_IP], peer[L_REMOTE_PORT]
        p += 1
        peer[L_SEQ] = (peer[L_SEQ] + 1) & 0xFFFF
        peer[L_SENT] += 1
        peer[L_OCTETS] += len(payload)
        if samples:
            peer[L_TS] = ts_add(ts, samples)
            frow[F_SENT_UNTIL] = now + samples / CLOCK_RATE
    return p, n


# ------------------------------------------------------------ receive ring: the tick's read


@njit(cache=True)
def ring_read(
    slots: np.ndarray, ring: np.ndarray, read_ts: np.ndarray, silence: np.ndarray,
    out: np.ndarray, gaps: np.ndarray,
) -> None:  # fmt: skip
    """The next TICK_SAMPLES codes of each slot into out[k], and into gaps[k, q] whether
    any sample of the tick's sub-block q came from no packet; they become silence in the
    ring and the slot's read position moves on (`media.rxaudio.RxAudio.read`, whose numpy
    gather is the twin)."""
    for k in range(slots.shape[0]):
        s = slots[k]
        rts = read_ts[s]
        fill = silence[s]
        for q in range(GAP_SUBS):
            gaps[k, q] = False
        for j in range(TICK_SAMPLES):
            pos = (rts + j) & RING_MASK
            v = ring[s, pos]
            out[k, j] = v & 0xFF
            if v < RECEIVED:
                gaps[k, j // GAP_SUB_SAMPLES] = True
            ring[s, pos] = fill
        read_ts[s] = (rts + TICK_SAMPLES) % TS_MOD


def warm() -> None:
    """Compile (or load from the on-disk cache) the kernels before the worker reports ready."""
    li = np.zeros((1, L_COLS), dtype=np.int64)
    lf = np.zeros((1, F_COLS), dtype=np.float64)
    li[0, L_ALIVE] = li[0, L_FAST] = li[0, L_PLAYING] = li[0, L_HAS_REMOTE] = 1
    li[0, L_SPF] = TICK_SAMPLES
    li[0, L_PLAY_LEN] = TICK_SAMPLES
    li[0, L_DTMF_PT] = -1
    lf[0, F_PTIME] = 0.02
    lf[0, F_SENT_UNTIL] = lf[0, F_PLAY_ORIGIN] = np.nan
    data = np.zeros((2, HEADER_SIZE + TICK_SAMPLES), dtype=np.uint8)
    i64 = np.zeros(2, dtype=np.int64)
    pump_tick(0.0, li, lf, np.zeros(TICK_SAMPLES, dtype=np.uint8), 0, data, i64.copy(),
              i64.copy(), i64.copy(), np.zeros(2), i64.copy(), i64.copy())  # fmt: skip
    li[0, L_PLAYING] = 0
    li[0, L_FILL] = 1
    li[0, L_CN_PT] = -1
    lf[0, F_FILL_ORIGIN] = np.nan
    fill_tick(0.0, li, lf, 0, data, i64.copy(), i64.copy(), i64.copy(), np.zeros(2),
              i64.copy(), i64.copy())  # fmt: skip
    si = np.zeros((1, S_COLS), dtype=np.int64)
    sf = np.zeros((1, SF_COLS), dtype=np.float64)
    ring = np.zeros((1, RING_SAMPLES), dtype=np.uint16)
    one = np.zeros(1, dtype=np.int64)
    rx_batch(data, np.full(2, data.shape[1], dtype=np.int64), np.zeros((2, 16), dtype=np.uint8),
             np.zeros(2, dtype=np.int64), 2, 0.0, 5.0, False, li, lf, si, sf, ring, one.copy(),
             np.zeros(1, dtype=np.bool_), np.zeros(1, dtype=np.uint8), one.copy(), np.zeros(1),
             one.copy(), one.copy(), one.copy(), one.copy(), one.copy(),
             np.zeros(2, dtype=np.int8))  # fmt: skip
    ring_read(one.copy(), ring, one.copy(), np.zeros(1, dtype=np.uint8),
              np.zeros((1, TICK_SAMPLES), dtype=np.uint8),
              np.zeros((1, GAP_SUBS), dtype=np.bool_))  # fmt: skip
    li[0, L_PEER] = 0  # bridged to itself, as far as compiling goes
    relay_batch(data, np.full(2, data.shape[1], dtype=np.int64), np.zeros(2, dtype=np.int64),
                2, 0, np.full(2, ACT_RELAY, dtype=np.int8), 0.0, li, lf, data.copy(),
                i64.copy(), i64.copy(), i64.copy(), np.zeros(2), i64.copy(), i64.copy(), 0)  # fmt: skip
    from media.kernels import recplace

    recplace.warm()

"""The front's Prometheus metrics (`/metrics`): counters, gauges and histograms, each with
HELP and its type (docs/operations-metrics.md lists them all).

One scrape target for the whole system: media workers and IVR executors already report
to the front (heartbeats, replies and their step traces, MediaReleased), so the front
exports what they report, labelled by worker. Prometheus needs no list of worker ports
that changes with `PBX_MEDIA_WORKERS` or with each restart, a worker that dies is seen
by the front (it expires it, `pbx_media_workers_lost_total`) rather than as a failed
scrape, and nothing but the admin listener is open.

Cheap on the hot path: the call layer counts in plain dicts (`CallContext.stats`) and
observes latencies into `Histogram`s (one bisect and two additions per observation, no
lock: the front is one thread, and nothing is per packet); prometheus_client builds the
metric families only when Prometheus scrapes (`FrontCollector`). Histograms reported by
the media workers arrive as bucket counts over `messages.MEDIA_TIMING_BOUNDS_MS`, added
here as they come.

Label values are bounded: routes come from the config, workers are the live ones, and
end reasons are cut to their name (`Transfer(2001)` -> `Transfer`) with at most
`MAX_REASONS` distinct ones (then `other`), since a provider chooses its hang-up reason.
"""

from __future__ import annotations

import re
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import (
    HistogramMetricFamily,
)

from pbx import messages as m

if TYPE_CHECKING:
    pass

PREFIX = "pbx_"
# Upper bounds (seconds). SIP set-up: a 200 from the port pool is sub-millisecond, a
# call that rings takes seconds. Provider steps: a LAN provider answers in ms, the
# default step timeout is 1 s with retries.
SETUP_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0)
PROVIDER_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# Within a 20 ms tick's reach: DTMF -> provider, reply -> first RTP, tick lateness.
MEDIA_BOUNDS = tuple(b / 1000.0 for b in m.MEDIA_TIMING_BOUNDS_MS)
LOSS_BOUNDS = (0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
JITTER_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
# A young collection takes well under a millisecond; a full one walks every live object.
GC_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
MAX_REASONS = 64
_REASON_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
LABEL_MAX = 64  # characters of a worker identity in a label
UNDOCUMENTED = "(undocumented)"

# Snapshot values that are levels (gauges); every other number the front counts only
# grows (a counter, exported as `<name>_total`).
GAUGES = frozenset({
    "calls", "sessions", "media_workers", "media_ports_free", "executors", "media_legs",
    "transactions", "sources_in_setup", "sources_with_calls", "auth_nonces_tracked",
    "auth_guard_entries", "trace_bytes", "tcp_connections", "queue_waiting",
    "records_pending", "trace_sessions", "ws_clients", "ivr_sessions_waiting_executor",
    "ivr_events_queued", "ivr_events_in_flight",
    "retention_recordings_files", "retention_recordings_bytes",
    "retention_voicemail_files", "retention_voicemail_bytes",
    "retention_tts_cache_files", "retention_tts_cache_bytes",
})

# HELP of every number in the front's snapshot (without the prefix and `_total`).
HELP = {
    "calls": "Calls in progress.",
    "sessions": "IVR sessions in progress.",
    "media_workers": "Live media workers (heartbeating).",
    "media_ports_free": "Pre-bound RTP ports the live media workers announced free.",
    "executors": "Live IVR executors (heartbeating).",
    "media_legs": "Call legs holding a media worker port.",
    "transactions": "SIP transactions the front holds (server and client).",
    "transactions_over_budget": "SIP requests refused statelessly (503) because their "
                                "source held too many transactions or bytes.",
    "sources_in_setup": "Source addresses with calls in set-up.",
    "sources_with_calls": "Source addresses with calls in progress.",
    "calls_total": "Initial INVITEs handled as new calls (admitted or not).",
    "calls_failed": "New calls refused before set-up: challenged, forbidden, over budget "
                    "or failed.",
    "sip_malformed": "SIP messages that could not be parsed (answered 400 or dropped).",
    "calls_challenged": "INVITEs answered with a digest challenge (407).",
    "calls_forbidden": "INVITEs the policy refused (403/404).",
    "setup_budget_refused": "INVITEs refused (503): the source had too many calls in "
                            "set-up.",
    "calls_budget_refused": "INVITEs refused (503): the source had too many calls.",
    "refers_refused": "REFERs refused by the policy.",
    "transfers_refused": "Transfer targets (REFER or provider) refused by the policy.",
    "in_dialog_foreign": "In-dialog requests from another address than the dialog's peer, "
                         "refused.",
    "zmq_auth_rejected": "ZeroMQ handshakes refused by the ZAP handler (CURVE key not "
                         "listed).",
    "ivr_replies_rejected": "IVR replies from another executor than the one asked, "
                            "ignored.",
    "media_workers_rejected": "Media worker announcements with a refused RTP address.",
    "media_allocations_rejected": "Port allocations at another address or port than the "
                                  "worker declared (call ended 503).",
    "media_allocations_failed": "Ports a worker refused or never confirmed (call ended "
                                "503).",
    "ivr_waits_expired": "IVR sessions that heard no call event within their bound.",
    "ivr_farewells": "Sessions the front gave up on (IvrTimeout) whose /end another "
                     "executor was asked to send.",
    "ivr_commands_lost": "Media commands of an IVR reply that could not reach their "
                         "worker (call ended).",
    "rtp_foreign_dropped": "RTP packets from another source than the leg's latched one, "
                           "dropped (strict latching).",
    "rtcp_foreign_dropped": "RTCP packets from another source than the leg's latched one, "
                            "dropped.",
    "dtmf_flood_dropped": "Key presses dropped past a leg's 20 a second (forged RFC 4733 "
                          "or INFO floods).",
    "media_workers_lost": "Media workers that stopped heartbeating (their calls ended).",
    "ivr_executors_lost": "IVR executors that stopped heartbeating (their events were "
                          "re-sent).",
    "rtp_packets_sent": "RTP packets sent on released legs (counted at leg release).",
    "rtp_packets_received": "RTP packets received on released legs.",
    "rtp_packets_lost": "RTP packets lost on released legs (RFC 3550 A.3).",
    "rtp_packets_late": "RTP audio packets that came too late to be used.",
    "rtcp_sent": "RTCP reports sent on released legs.",
    "rtcp_received": "RTCP reports received on released legs.",
    "auth_ok": "Digest authentications that succeeded.",
    "auth_failures": "Digest authentications that failed (wrong credentials, unknown "
                     "user).",
    "auth_lockouts": "Lockouts started after repeated failures.",
    "auth_locked_refusals": "Requests refused (403) during a lockout.",
    "auth_replays": "Digest credentials replayed (nonce count reused).",
    "auth_stale": "Digest credentials with an expired nonce (re-challenged stale).",
    "auth_failures_unlogged": "Failed authentications left out of the log (its per-source "
                              "and total bounds).",
    "auth_nonces_tracked": "Nonces kept for replay protection.",
    "auth_guard_entries": "Entries in the failed-login table.",
    "trace_bytes": "Bytes held by the in-memory IVR trace store.",
    "trace_steps_dropped": "IVR trace steps dropped from the store (oldest first).",
    "trace_sessions_evicted": "IVR sessions evicted from the trace store.",
    "trace_steps_truncated": "IVR trace steps kept as a truncated stub (too large).",
    "traces_log_rotations": "Rotations of traces.jsonl.",
    "calls_log_rotations": "Rotations of calls.jsonl.",
    "retention_sweeps": "Retention sweeps run.",
    "retention_errors": "Files the retention sweep could not delete or read.",
    "sip_rate_limited": "SIP datagrams and messages dropped by the per-source rate limit.",
    "sip_oversize": "SIP messages over [sip] max_message_bytes, refused.",
    "sip_unframed": "TCP streams that could not be framed (400/413, connection closed).",
    "tcp_connections": "Open SIP TCP connections.",
    "tcp_connections_total": "SIP TCP connections accepted.",
    "tcp_refused_per_source": "SIP TCP connections refused: the source had too many.",
    "queue_waiting": "Calls waiting in a queue with members ringing.",
    "records_pending": "Call records waiting for their legs' RTP statistics.",
    "trace_sessions": "IVR sessions in the trace store.",
    "ws_clients": "Clients of /ws/events.",
    "ws_events_dropped": "Events dropped for /ws/events clients too slow to take them.",
    "ivr_sessions_waiting_executor": "IVR sessions whose event no executor had room "
                                     "for (the executors' queue).",
    "ivr_events_queued": "IVR call events queued behind their session's event in flight.",
    "ivr_events_in_flight": "IVR events sent to an executor and not yet answered.",
}
for _area in ("recordings", "voicemail", "tts_cache"):
    HELP[f"retention_{_area}_files_deleted"] = f"Files the retention sweep deleted ({_area})."
    HELP[f"retention_{_area}_bytes_deleted"] = f"Bytes the retention sweep deleted ({_area})."
    HELP[f"retention_{_area}_files"] = f"Files kept after the last retention sweep ({_area})."
    HELP[f"retention_{_area}_bytes"] = f"Bytes kept after the last retention sweep ({_area})."


class Histogram:
    """Bucket counts per label values: `observe` a value or `add` counts a worker made."""

    __slots__ = ("bounds", "series")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        # label values -> [count per bucket (the last one +Inf), ..., sum]
        self.series: dict[tuple[str, ...], list[float]] = {}

    def _row(self, labels: tuple[str, ...]) -> list[float]:
        row = self.series.get(labels)
        if row is None:
            row = self.series[labels] = [0.0] * (len(self.bounds) + 2)
        return row

    def observe(self, value: float, *labels: str) -> None:
        row = self._row(labels)
        row[bisect_left(self.bounds, value)] += 1  # `le`: a value on a bound is in it
        row[-1] += value

    def add(self, counts: Sequence[int], total: float, *labels: str) -> None:
        """Bucket counts over the same bounds (one more for +Inf), and their sum."""
        if len(counts) != len(self.bounds) + 1:
            return
        row = self._row(labels)
        for i, n in enumerate(counts):
            row[i] += n
        row[-1] += total

    def count(self, *labels: str) -> float:
        row = self.series.get(labels)
        return 0.0 if row is None else sum(row[:-1])

    def family(self, name: str, documentation: str,
               labelnames: Sequence[str] = ()) -> HistogramMetricFamily:
        family = HistogramMetricFamily(PREFIX + name, documentation, labels=labelnames)
        les = [_float_text(b) for b in self.bounds] + ["+Inf"]
        for labels, row in sorted(self.series.items()):
            cumulative, buckets = 0.0, []
            for le, n in zip(les, row[:-1], strict=True):
                cumulative += n
                buckets.append((le, cumulative))
            family.add_metric(list(labels), buckets, row[-1])
        return family


def _float_text(value: float) -> str:
    return repr(float(value))


def setup_outcome(status: int) -> str:
    """The `outcome` label of a final response to an initial INVITE."""
    if status < 300:
        return "answered"
    if status < 400:
        return "redirected"
    if status in (401, 407):
        return "challenged"
    if status == 487:
        return "cancelled"
    if status < 500 or status >= 600:
        return "rejected"
    return "failed"


def step_outcome(error: str | None) -> str:
    """The `outcome` label of a provider request from its trace's error (pbx.ivr)."""
    if error is None:
        return "ok"
    if error.startswith("provider failed"):
        return "fallback"  # timeout, connect failure, 4xx/5xx after the retries
    if error.startswith("invalid provider response"):
        return "invalid"
    return "error"


# Provider events a key press causes (docs/events.md): the digits reached the provider.
DIGIT_TRIGGERS = frozenset({"dtmf", "dtmf_menu_invalid", "phone_collected"})


def worker_label(identity: bytes) -> str:
    return identity.decode("utf-8", "replace")[:LABEL_MAX]


class FrontMetrics:
    """What the call layer observes, kept until the next scrape (see the module text)."""

    def __init__(self) -> None:
        self.setup = Histogram(SETUP_BOUNDS)  # outcome
        self.provider_step = Histogram(PROVIDER_BOUNDS)  # route, outcome
        self.provider_api = Histogram(PROVIDER_BOUNDS)  # route, outcome
        self.dtmf_to_provider = Histogram(MEDIA_BOUNDS + (2.5, 5.0, 10.0))
        self.play_to_rtp = Histogram(MEDIA_BOUNDS)  # worker
        self.tick_late = Histogram(MEDIA_BOUNDS)  # worker
        self.rtp_loss = Histogram(LOSS_BOUNDS)  # direction: received / reported by peer
        self.rtp_jitter = Histogram(JITTER_BOUNDS)  # direction
        self.gc_pause = Histogram(GC_BOUNDS)  # generation: wall time (CollectorWatch)
        self.gc_cpu = Histogram(GC_BOUNDS)  # generation: the thread's CPU time
        self.calls_ended: dict[str, int] = {}
        # Per live media worker (identity): its last heartbeat and the sums of its
        # counters, [ticks, skipped, RTP packets received, RTP packets sent].
        self.heartbeats: dict[bytes, m.MediaHeartbeat] = {}
        self.worker_counts: dict[bytes, list[int]] = {}

    def call_ended(self, reason: str) -> None:
        name = reason.split("(", 1)[0]
        if not _REASON_NAME.fullmatch(name):
            name = "other"
        elif name not in self.calls_ended and len(self.calls_ended) >= MAX_REASONS:
            name = "other"
        self.calls_ended[name] = self.calls_ended.get(name, 0) + 1

    def step_trace(self, route: str, trace: m.StepTrace, digit_at: float | None) -> bool:
        """A provider request's latency from its trace; with `digit_at` (the front's wall
        clock when the key press came) and a digit-caused request, the time from the key
        press to the request leaving the executor. True if that was observed."""
        if trace.request is None:
            return False  # no request: an error or an end without a provider round trip
        seconds = trace.duration_ms / 1000.0
        if trace.trigger == "api":
            self.provider_api.observe(seconds, route, step_outcome(trace.error))
            return False
        self.provider_step.observe(seconds, route, step_outcome(trace.error))
        if digit_at is None or trace.trigger not in DIGIT_TRIGGERS:
            return False
        # `at` is the executor's clock when the answer came: the request left
        # `duration_ms` earlier (one host: one clock; several: NTP-close).
        self.dtmf_to_provider.observe(max(0.0, trace.at - seconds - digit_at))
        return True

    def media_heartbeat(self, identity: bytes, msg: m.MediaHeartbeat) -> None:
        self.heartbeats[identity] = msg
        counts = self.worker_counts.setdefault(identity, [0, 0, 0, 0])
        counts[0] += msg.ticks
        counts[1] += msg.ticks_skipped
        counts[2] += msg.rtp_packets_received
        counts[3] += msg.rtp_packets_sent
        worker = worker_label(identity)
        self.tick_late.add(msg.tick_late_buckets, msg.tick_late_sum_ms / 1000.0, worker)
        self.play_to_rtp.add(msg.play_start_buckets, msg.play_start_sum_ms / 1000.0, worker)

    def forget_worker(self, identity: bytes) -> None:
        """A worker left: its series go (a restarted one has a new identity)."""
        self.heartbeats.pop(identity, None)
        self.worker_counts.pop(identity, None)
        worker = (worker_label(identity),)
        self.tick_late.series.pop(worker, None)
        self.play_to_rtp.series.pop(worker, None)

    def media_released(self, stats: dict[str, int], msg: m.ReleasedLeg) -> None:
        """A leg's RTP statistics at its end (RFC 3550 receive statistics, RTCP)."""
        stats["rtp_packets_sent"] += msg.packets_sent
        stats["rtp_packets_received"] += msg.packets_received
        stats["rtp_packets_lost"] += msg.packets_lost
        stats["rtp_packets_late"] += msg.packets_late
        stats["rtcp_sent"] += msg.rtcp_sent
        stats["rtcp_received"] += msg.rtcp_received
        expected = msg.packets_received + max(0, msg.packets_lost)
        if expected > 0:
            self.rtp_loss.observe(max(0, msg.packets_lost) / expected, "received")
            self.rtp_jitter.observe(msg.jitter_ms / 1000.0, "received")
        if msg.remote_packets_lost is not None and msg.packets_sent > 0:
            lost = max(0, msg.remote_packets_lost)
            self.rtp_loss.observe(min(1.0, lost / msg.packets_sent), "sent")
        if msg.remote_jitter_ms is not None:
            self.rtp_jitter.observe(msg.remote_jitter_ms / 1000.0, "sent")


class CollectorWatch:
    """A `gc.callbacks` entry: each collection of the front's cyclic garbage collector
    into `gc_pause` (wall time: what a SIP message that came meanwhile waited) and
    `gc_cpu` (the thread's CPU time: what the collector did), by generation. A pause far
    longer than its CPU is the process waiting for a core, not the collector: under sipp
    at 300 calls/s on 2 cores, young collections of 5-20 ms wall took 0.2-0.6 ms of CPU
    (perf/README.md). The clocks are passed in for the tests."""

    __slots__ = ("metrics", "wall", "cpu", "_started")

    def __init__(self, metrics: FrontMetrics, wall: Callable[[], float] = time.perf_counter,
                 cpu: Callable[[], float] = time.thread_time) -> None:
        self.metrics = metrics
        self.wall = wall
        self.cpu = cpu
        self._started: tuple[float, float] | None = None

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = (self.wall(), self.cpu())
            return
        if self._started is None:  # installed during a collection
            return
        wall0, cpu0 = self._started
        self._started = None
        generation = str(info.get("generation", "?"))
        self.metrics.gc_pause.observe(max(0.0, self.wall() - wall0), generation)
        self.metrics.gc_cpu.observe(max(0.0, self.cpu() - cpu0), generation)

"""The front's `/metrics` as prometheus_client builds it when Prometheus scrapes
(`FrontCollector`): the snapshot's counters and gauges, and the live families read from
the call context (workers, executors, latencies). The numbers themselves are kept by
`pbx.metrics`, which the call layer imports; this module reads the call layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from pbx.calls.context import CallContext
from pbx.metrics import GAUGES, HELP, PREFIX, UNDOCUMENTED, FrontMetrics, worker_label


def snapshot_families(values: dict[str, Any]) -> Iterator[Metric]:
    """Counters and gauges for the front's snapshot (names as in `HELP`)."""
    for name, value in values.items():
        if not isinstance(value, int | float):
            continue
        # A number added without a HELP of its own still goes out, marked (the tests
        # look for the mark).
        documentation = HELP.get(name) or f"{name.replace('_', ' ')} {UNDOCUMENTED}"
        family: Metric
        if name in GAUGES:
            family = GaugeMetricFamily(PREFIX + name, documentation, value=value)
        else:
            family = CounterMetricFamily(PREFIX + name, documentation, value=value)
        yield family


def live_families(ctx: CallContext, metrics: FrontMetrics) -> Iterator[Metric]:
    """Per-worker and per-executor levels, histograms and counters by label."""
    workers = ctx.media_workers.workers()
    calls = GaugeMetricFamily(PREFIX + "media_worker_calls", "Calls on the media worker "
                              "(its last heartbeat plus calls given it since).",
                              labels=["worker"])
    capacity = GaugeMetricFamily(PREFIX + "media_worker_capacity", "Calls the media "
                                 "worker takes at most ([media] capacity).", labels=["worker"])
    load = GaugeMetricFamily(PREFIX + "media_worker_load_ratio", "Calls over capacity of "
                             "the media worker (0..1).", labels=["worker"])
    ports = GaugeMetricFamily(PREFIX + "media_worker_ports_free", "Pre-bound RTP ports the "
                              "media worker announced free.", labels=["worker"])
    late_p99 = GaugeMetricFamily(PREFIX + "media_worker_tick_late_p99_seconds", "99th "
                                 "percentile of how late the worker's 20 ms tick ran, over "
                                 "its last heartbeat period.", labels=["worker"])
    late_max = GaugeMetricFamily(PREFIX + "media_worker_tick_late_max_seconds", "Worst "
                                 "lateness of the worker's 20 ms tick over its last "
                                 "heartbeat period.", labels=["worker"])
    busy_p99 = GaugeMetricFamily(PREFIX + "media_worker_tick_busy_p99_seconds", "99th "
                                 "percentile of one tick's work, over the worker's last "
                                 "heartbeat period.", labels=["worker"])
    ticks = CounterMetricFamily(PREFIX + "media_worker_ticks", "Ticks the media worker ran.",
                                labels=["worker"])
    skipped = CounterMetricFamily(PREFIX + "media_worker_ticks_skipped", "Ticks the media "
                                  "worker skipped because one ran over a tick late.",
                                  labels=["worker"])
    packets = CounterMetricFamily(PREFIX + "media_worker_rtp_packets", "RTP packets the "
                                  "media worker received (valid, on a leg) or sent, live "
                                  "calls included (as of its last heartbeat).",
                                  labels=["worker", "direction"])
    for info in workers:
        worker = [worker_label(info.identity)]
        calls.add_metric(worker, info.load)
        capacity.add_metric(worker, info.capacity)
        load.add_metric(worker, info.load / info.capacity if info.capacity > 0 else 1.0)
        pool = ctx.media_workers.pool(info.identity)
        ports.add_metric(worker, len(pool.free_ports()) if pool is not None else 0)
        beat = metrics.heartbeats.get(info.identity)
        if beat is not None:
            late_p99.add_metric(worker, beat.tick_late_ms_p99 / 1000.0)
            late_max.add_metric(worker, beat.tick_late_ms_max / 1000.0)
            busy_p99.add_metric(worker, beat.tick_busy_ms_p99 / 1000.0)
        counts = metrics.worker_counts.get(info.identity)
        if counts is not None:
            ticks.add_metric(worker, counts[0])
            skipped.add_metric(worker, counts[1])
            packets.add_metric([*worker, "received"], counts[2])
            packets.add_metric([*worker, "sent"], counts[3])
    yield from (calls, capacity, load, ports, late_p99, late_max, busy_p99, ticks, skipped,
                packets)
    busy = GaugeMetricFamily(PREFIX + "ivr_executor_busy", "Events the IVR executor works "
                             "on (its last heartbeat plus events sent since).",
                             labels=["executor"])
    executor_capacity = GaugeMetricFamily(PREFIX + "ivr_executor_capacity", "Events the "
                                          "IVR executor takes at once ([ivr] capacity).",
                                          labels=["executor"])
    for info in ctx.executors.workers():
        executor = [worker_label(info.identity)]
        busy.add_metric(executor, info.load)
        executor_capacity.add_metric(executor, info.capacity)
    yield from (busy, executor_capacity)
    ended = CounterMetricFamily(PREFIX + "calls_ended", "Calls ended, by end reason (its "
                                "name: Transfer(2001) counts as Transfer).", labels=["reason"])
    for reason, n in sorted(metrics.calls_ended.items()):
        ended.add_metric([reason], n)
    yield ended
    yield metrics.setup.family(
        "sip_setup_seconds", "From an initial INVITE's arrival to its final response, by "
        "outcome (answered, challenged, cancelled, rejected, failed, redirected).",
        ["outcome"])
    yield metrics.provider_step.family(
        "provider_step_seconds", "Provider step requests (POST url), answer time with "
        "retries, by route and outcome (ok, fallback, invalid, error).", ["route", "outcome"])
    yield metrics.provider_api.family(
        "provider_api_seconds", "HTTP calls of `api` actions, by route and outcome.",
        ["route", "outcome"])
    yield metrics.dtmf_to_provider.family(
        "dtmf_to_provider_seconds", "From a key press reaching the front to the provider "
        "request it caused leaving the executor.")
    yield metrics.play_to_rtp.family(
        "ivr_play_to_rtp_seconds", "From a play command (an IVR reply's prompt) reaching the "
        "media worker to the prompt's first RTP packet, by worker.", ["worker"])
    yield metrics.tick_late.family(
        "media_tick_late_seconds", "How late each 20 ms tick of the media worker ran, by "
        "worker.", ["worker"])
    yield metrics.rtp_loss.family(
        "rtp_loss_ratio", "Per released leg, fraction of RTP packets lost: received (our "
        "receive statistics) or sent (what the far end's last RTCP report said).",
        ["direction"])
    yield metrics.rtp_jitter.family(
        "rtp_jitter_seconds", "Per released leg, interarrival jitter (RFC 3550 A.8): "
        "received (ours) or sent (the far end's RTCP report).", ["direction"])
    yield metrics.gc_pause.family(
        "gc_pause_seconds", "The front's cyclic garbage collections, wall time each (the "
        "event loop waits meanwhile), by generation (0 young, 1 middle, 2 full).",
        ["generation"])
    yield metrics.gc_cpu.family(
        "gc_cpu_seconds", "The same collections, CPU time each: far below the pause, the "
        "front was waiting for a core.", ["generation"])


def ivr_levels(ctx: CallContext) -> dict[str, int]:
    """The executors' queue as the front sees it (counted at scrape time)."""
    queued = in_flight = 0
    for session in ctx.table.sessions.values():
        queued += len(session.queue)
        in_flight += session.in_flight is not None
    return {"ivr_sessions_waiting_executor": len(ctx.table.waiting_sessions),
            "ivr_events_queued": queued, "ivr_events_in_flight": in_flight}


class FrontCollector(Collector):
    """prometheus_client's view of the front: `values()` gives the snapshot numbers."""

    def __init__(self, ctx: CallContext, values: Callable[[], dict[str, Any]]) -> None:
        self.ctx = ctx
        self.values = values

    def collect(self) -> Iterator[Metric]:
        values = {**self.values(), **ivr_levels(self.ctx)}
        yield from snapshot_families(values)
        yield from live_families(self.ctx, self.ctx.metrics)

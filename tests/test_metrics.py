"""/metrics (pbx.metrics): the families prometheus_client builds from the call core, read
back with prometheus_client's own parser; histogram buckets, bounded label values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pbx import messages as m
from pbx.metrics import (
    GAUGES,
    GC_BOUNDS,
    HELP,
    MAX_REASONS,
    CollectorWatch,
    FrontMetrics,
    Histogram,
    setup_outcome,
    step_outcome,
)
from pbx.metrics_export import FrontCollector
from tests.calls.rig import CALLER, CoreRig, first_then, reply
from workers.media import timing_buckets

Families = dict[tuple[str, str], Any]


def scrape(rig: CoreRig) -> tuple[str, Families]:
    """The text the admin listener serves, and its families by (name, type)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FrontCollector(rig.core.ctx, rig.core.snapshot))
    text = generate_latest(registry).decode()
    return text, {(f.name, f.type): f for f in text_string_to_metric_families(text)}


def sample(families: Families, name: str, kind: str, sample_name: str,
           **labels: str) -> float | None:
    for s in families[(name, kind)].samples:
        if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return None


def test_a_value_on_a_bound_is_in_that_bucket_and_buckets_are_cumulative() -> None:
    hist = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        hist.observe(value, "x")
    hist.add([1, 0, 2], 9.0, "x")
    hist.add([1, 2], 100.0, "x")  # other bounds than ours: refused, not misfiled
    family = hist.family("t_seconds", "t", ["l"])
    got = {(s.name, s.labels.get("le")): s.value for s in family.samples}
    assert got[("pbx_t_seconds_bucket", "0.1")] == 3
    assert got[("pbx_t_seconds_bucket", "1.0")] == 5
    assert got[("pbx_t_seconds_bucket", "+Inf")] == 8
    assert got[("pbx_t_seconds_count", None)] == 8
    assert got[("pbx_t_seconds_sum", None)] == 0.05 + 0.1 + 0.5 + 1.0 + 7.0 + 9.0


def test_worker_buckets_follow_the_shared_bounds() -> None:
    counts = timing_buckets([0.2, 1.0, 1.5, 20.0, 5000.0])
    assert len(counts) == m.TIMING_BUCKETS
    assert counts[0] == 2 and counts[1] == 1 and counts[4] == 1 and counts[-1] == 1


def test_end_reasons_are_named_and_bounded() -> None:
    metrics = FrontMetrics()
    for reason in ("Transfer(2001)", "Transfer(sip:x@y)", "Hangup", "Error(boom: 500)",
                   "bad reason with spaces", "x" * 200):
        metrics.call_ended(reason)
    assert metrics.calls_ended == {"Transfer": 2, "Hangup": 1, "Error": 1, "other": 2}
    for n in range(3 * MAX_REASONS):  # a provider choosing a new reason per call
        metrics.call_ended(f"Reason{n}")
    assert len(metrics.calls_ended) <= MAX_REASONS + 1
    assert metrics.calls_ended["other"] > 2


def test_outcome_labels() -> None:
    assert [setup_outcome(s) for s in (200, 302, 407, 401, 487, 404, 603, 503)] == [
        "answered", "redirected", "challenged", "challenged", "cancelled", "rejected",
        "rejected", "failed"]
    assert step_outcome(None) == "ok"
    assert step_outcome("provider failed (timeout); executing retry.fallback") == "fallback"
    assert step_outcome("invalid provider response: not JSON") == "invalid"
    assert step_outcome("unknown action type 'x'") == "error"


def test_every_counter_and_gauge_has_help_and_its_type(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path)
    text, families = scrape(rig)
    for name in rig.core.snapshot():
        assert name in HELP, f"no HELP for {name}"
    assert "# TYPE pbx_calls_total counter" in text
    assert "# TYPE pbx_calls gauge" in text
    assert "# TYPE pbx_sip_malformed_total counter" in text
    assert "# TYPE pbx_sip_setup_seconds histogram" in text
    for family in families.values():
        assert family.documentation, f"{family.name} has no HELP"
    for name in rig.core.snapshot():
        if name in GAUGES:
            assert f"# TYPE pbx_{name} gauge\n" in text
        else:
            exported = name if name.endswith("_total") else f"{name}_total"
            assert f"# TYPE pbx_{exported} counter\n" in text
            assert f"# HELP pbx_{exported} {HELP[name]}\n" in text


def test_a_call_shows_in_the_histograms_and_counters(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path, first_then([m.PlayCommand(play_id=1, file="sounds/menu.wav")]))
    call = rig.answered()
    rig.advance(0.5)
    # A digit: the executor asks the provider, whose answer took 40 ms.
    rig.executors[b"e"].answer = lambda event: None
    assert call.a is not None
    rig.media_event(call.a.media_id, m.DtmfDigit(digit="1"))
    event = rig.ivr[-1]
    digit_wall = rig.core.ctx.wall()
    sent_wall = digit_wall + 0.003
    trace = m.StepTrace(call_id=call.call_id, session_id=event.session_id, step_index=2,
                        trigger="dtmf", request={"event": {"type": "dtmf"}},
                        duration_ms=40.0, at=sent_wall + 0.040, action_type="prompt")
    answer = reply(event, m.PlayCommand(play_id=2, file="sounds/menu.wav"))
    rig.reply(b"e", answer.model_copy(update={"traces": [trace]}))
    # A heartbeat with packets only, then one with three ticks and one prompt start
    # (each counts its own period; the gauges are the last one's).
    rig.core.media_message(b"w", rig.worker.heartbeat().model_copy(update={
        "rtp_packets_received": 49, "rtp_packets_sent": 50}), rig.now)
    beat = rig.worker.heartbeat().model_copy(update={
        "ticks": 3, "ticks_skipped": 1, "tick_late_buckets": timing_buckets([0.5, 0.7, 30]),
        "tick_late_sum_ms": 31.2, "play_start_buckets": timing_buckets([12.0]),
        "play_start_sum_ms": 12.0, "tick_late_ms_p99": 30.0,
        "rtp_packets_received": 50, "rtp_packets_sent": 48})
    rig.core.media_message(b"w", beat, rig.now)
    rig.pump()
    rig.caller_request("BYE", 2)
    rig.advance(0.1)
    assert rig.last(2, CALLER).status == 200

    _, families = scrape(rig)
    assert sample(families, "pbx_sip_setup_seconds", "histogram",
                  "pbx_sip_setup_seconds_count", outcome="answered") == 1
    assert sample(families, "pbx_calls_ended", "counter", "pbx_calls_ended_total",
                  reason="Hangup") == 1
    assert sample(families, "pbx_provider_step_seconds", "histogram",
                  "pbx_provider_step_seconds_bucket", route="main", outcome="ok",
                  le="0.05") == 1
    assert sample(families, "pbx_provider_step_seconds", "histogram",
                  "pbx_provider_step_seconds_bucket", route="main", outcome="ok",
                  le="0.025") == 0
    dtmf_sum = sample(families, "pbx_dtmf_to_provider_seconds", "histogram",
                      "pbx_dtmf_to_provider_seconds_sum")
    assert dtmf_sum is not None and abs(dtmf_sum - 0.003) < 1e-6
    assert sample(families, "pbx_ivr_play_to_rtp_seconds", "histogram",
                  "pbx_ivr_play_to_rtp_seconds_count", worker="w") == 1
    assert sample(families, "pbx_media_tick_late_seconds", "histogram",
                  "pbx_media_tick_late_seconds_bucket", worker="w", le="0.001") == 2
    assert sample(families, "pbx_media_worker_ticks", "counter",
                  "pbx_media_worker_ticks_total", worker="w") == 3
    assert sample(families, "pbx_media_worker_rtp_packets", "counter",
                  "pbx_media_worker_rtp_packets_total", worker="w", direction="received") == 99
    assert sample(families, "pbx_media_worker_rtp_packets", "counter",
                  "pbx_media_worker_rtp_packets_total", worker="w", direction="sent") == 98
    assert sample(families, "pbx_media_worker_tick_late_p99_seconds", "gauge",
                  "pbx_media_worker_tick_late_p99_seconds", worker="w") == 0.03
    assert sample(families, "pbx_media_worker_capacity", "gauge",
                  "pbx_media_worker_capacity", worker="w") == rig.worker.capacity
    assert sample(families, "pbx_ivr_executor_capacity", "gauge",
                  "pbx_ivr_executor_capacity", executor="e") == 10
    # The leg's RTP statistics at release (the fake worker: 9 of 10 packets came).
    assert sample(families, "pbx_rtp_packets_received", "counter",
                  "pbx_rtp_packets_received_total") == 9
    assert sample(families, "pbx_rtp_loss_ratio", "histogram",
                  "pbx_rtp_loss_ratio_count", direction="received") == 1


def test_a_worker_that_stops_heartbeating_is_counted_and_its_series_go(
        tmp_path: Path) -> None:
    rig = CoreRig(tmp_path)
    rig.heartbeat()
    _, families = scrape(rig)
    assert sample(families, "pbx_media_worker_calls", "gauge", "pbx_media_worker_calls",
                  worker="w") == 0
    rig.alive = False
    rig.advance(rig.settings.media.expiry_ms / 1000 + 1)
    _, families = scrape(rig)
    assert sample(families, "pbx_media_workers_lost", "counter",
                  "pbx_media_workers_lost_total") == 1
    assert sample(families, "pbx_media_worker_calls", "gauge", "pbx_media_worker_calls",
                  worker="w") is None
    assert rig.core.ctx.metrics.tick_late.series == {}


def test_a_reinvite_is_not_a_call_setup(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path)
    rig.answered()
    rig.caller_request("INVITE", 2, body=b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\n"
                       b"c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 40000 RTP/AVP 0\r\n")
    assert rig.last(2, CALLER).status == 200
    assert rig.core.ctx.metrics.setup.count("answered") == 1


def test_collector_pauses_are_exported_with_their_cpu_time() -> None:
    """Each collection of the front's collector: its wall time and its CPU time, by
    generation; a pause much longer than its CPU is the front waiting for a core."""
    clock = {"wall": 10.0, "cpu": 1.0}
    metrics = FrontMetrics()
    watch = CollectorWatch(metrics, wall=lambda: clock["wall"], cpu=lambda: clock["cpu"])
    watch("stop", {"generation": 0, "collected": 0})  # installed mid-collection: ignored
    watch("start", {"generation": 0})
    clock["wall"] += 0.012  # preempted: 12 ms on the wall clock ...
    clock["cpu"] += 0.0003  # ... for 0.3 ms of collecting
    watch("stop", {"generation": 0, "collected": 0})
    watch("start", {"generation": 2})
    clock["wall"] += 0.2
    clock["cpu"] += 0.2
    watch("stop", {"generation": 2, "collected": 5})
    assert metrics.gc_pause.count("0") == 1 and metrics.gc_cpu.count("0") == 1
    assert metrics.gc_pause.series[("0",)][GC_BOUNDS.index(0.025)] == 1  # 12 ms: le 25 ms
    assert metrics.gc_cpu.series[("0",)][GC_BOUNDS.index(0.0005)] == 1
    assert metrics.gc_pause.count("2") == 1
    assert abs(metrics.gc_pause.series[("2",)][-1] - 0.2) < 1e-9


def test_the_front_exports_its_collections(tmp_path: Path) -> None:
    import gc

    rig = CoreRig(tmp_path)
    watch = CollectorWatch(rig.core.ctx.metrics)
    gc.callbacks.append(watch)
    try:
        gc.collect(0)
    finally:
        gc.callbacks.remove(watch)
    _, families = scrape(rig)
    assert (sample(families, "pbx_gc_pause_seconds", "histogram",
                   "pbx_gc_pause_seconds_count", generation="0") or 0) >= 1
    assert (sample(families, "pbx_gc_cpu_seconds", "histogram",
                   "pbx_gc_cpu_seconds_count", generation="0") or 0) >= 1

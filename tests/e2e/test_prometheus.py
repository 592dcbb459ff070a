"""A real Prometheus (Debian's `prometheus`, run as a plain process on loopback with a
temporary config and TSDB) scrapes a real system while sipp and perf/callload.py call
the IVR; PromQL through Prometheus' HTTP API shows the set-up latency histogram (one
observation per call), per-worker load, calls by end reason, provider step latency by
route, the key press -> provider latency, and the shipped alert rules evaluating."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pbx.metrics import UNDOCUMENTED
from tests.e2e.harness import (
    ROOT,
    SCENARIOS,
    PbxSystem,
    Reply,
    RtpEndpoint,
    ScriptedProvider,
    free_port,
    start_sipp,
    start_system,
    wait_idle,
    wait_until,
)

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
SIPP_CALLS = 3
CALLLOAD_CALLS = 10
COLLECT = {"type": "collect_dtmf", "min_digits": 1, "max_digits": 1, "timeout_ms": 20000,
           "prompt": "sounds/menu.wav"}


def ivr(path: str, body: Any) -> Reply:
    """Collect one digit; on it play goodbye, then wait for more: the caller hangs up."""
    if path.endswith(("/start", "/end", "/dtmf-match")):
        return 200, b'{"status":"ok"}', 0.0
    event = body.get("event", {}).get("type") if isinstance(body, dict) else None
    if event == "dtmf":
        return 200, json.dumps({"type": "prompt", "file": "sounds/goodbye.wav"}).encode(), 0.0
    return 200, json.dumps(COLLECT).encode(), 0.0


class Prometheus:
    def __init__(self, root: Path, admin_port: int) -> None:
        self.port = free_port(socket.SOCK_STREAM)
        root.mkdir(parents=True, exist_ok=True)
        rules = ROOT / "deploy" / "prometheus" / "pbx-alerts.yml"
        config = root / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {rules}\n"
            "scrape_configs:\n  - job_name: pbx\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{admin_port}']\n")
        self.log = (root / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=root)
        wait_until(self.ready, 30, "Prometheus to be ready", interval=0.2)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return json.loads(r.read())

    def ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                return True
        except OSError:
            return False

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PbxSystem, Prometheus]]:
    """A system of its own (its counters start at zero) and a Prometheus scraping it."""
    provider = ScriptedProvider()
    provider.script = ivr
    system = start_system(tmp_path_factory.mktemp("pbx"), provider)
    prometheus = None
    try:
        prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), system.admin_port)
        yield system, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        system.stop()
        provider.close()


def test_prometheus_scrapes_the_system_under_calls(
        scraped: tuple[PbxSystem, Prometheus], tmp_path: Path) -> None:
    system, prometheus = scraped
    # What Prometheus scrapes: every metric of the real front documented and typed.
    with urllib.request.urlopen(f"http://127.0.0.1:{system.admin_port}/metrics",
                                timeout=5) as response:
        text = response.read().decode()
    assert UNDOCUMENTED not in text, [ln for ln in text.splitlines() if UNDOCUMENTED in ln]
    assert text.count("# HELP ") == text.count("# TYPE ") > 80
    wait_until(lambda: prometheus.value('up{job="pbx"}') == 1, 20, "the first scrape",
               interval=0.5)
    # Per-worker load is there before any call: one series per live media worker.
    workers = prometheus.query("pbx_media_worker_load_ratio")
    assert len(workers) == 2 and {w["metric"]["worker"] for w in workers} == {
        w["metric"]["worker"] for w in prometheus.query("pbx_media_worker_capacity")}
    assert all(float(w["value"][1]) == 0 for w in workers)

    # sipp callers press 1 (RFC 4733) a second into the call, hang up 5 s later.
    rtp = [RtpEndpoint() for _ in range(SIPP_CALLS)]
    callers = [start_sipp(f"caller-{n}", [
        "-sf", str(SCENARIOS / "uac_ivr.xml"), "-s", "*99", system.sip_addr,
        "-i", "127.0.0.1", "-p", str(free_port()), "-mi", "127.0.0.1",
        "-mp", str(free_port(even=True)), "-key", "rtp_port", str(rtp[n].port),
        "-d", "1000", "-m", "1", "-l", "1"], tmp_path / f"sipp-{n}")
        for n in range(SIPP_CALLS)]
    try:
        # Meanwhile perf/callload.py's calls: answered, 9 pressed after 1 s, hung up at 4 s.
        load = subprocess.run(
            [sys.executable, str(ROOT / "perf" / "callload.py"), "-n", str(CALLLOAD_CALLS),
             "-r", "5", "--hold", "4", "--digit-after", "1", "--pbx", system.sip_addr,
             "--sip-port", str(free_port()), "--rtp-ports", "30100-30199",
             "--json", str(tmp_path / "callload.json")],
            capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert load.returncode == 0, load.stdout[-3000:] + load.stderr[-3000:]
        for caller in callers:
            assert caller.wait(30) == 0, caller.logs()
    finally:
        for caller in callers:
            caller.stop()
        for endpoint in rtp:
            endpoint.close()
    wait_idle(system)
    calls = SIPP_CALLS + CALLLOAD_CALLS

    # The set-up latency histogram: one observation per call, all answered.
    wait_until(lambda: prometheus.value("sum(pbx_sip_setup_seconds_count)") == calls, 20,
               f"{calls} set-ups in Prometheus", interval=0.5)
    assert prometheus.value('pbx_sip_setup_seconds_count{outcome="answered"}') == calls
    assert prometheus.value(
        'pbx_sip_setup_seconds_bucket{outcome="answered", le="+Inf"}') == calls
    p99 = prometheus.value("histogram_quantile(0.99, sum by (le) "
                           "(increase(pbx_sip_setup_seconds_bucket[5m])))")
    assert p99 is not None and 0 < p99 <= 30
    # Calls by end reason: every caller hung up.
    wait_until(lambda: prometheus.value("sum(pbx_calls_ended_total)") == calls, 20,
               "every call ended", interval=0.5)
    assert prometheus.value('pbx_calls_ended_total{reason="Hangup"}') == calls
    assert prometheus.value("pbx_calls_total") == calls
    assert prometheus.value("pbx_calls") == 0
    # Provider steps of route "main": the start of each call, and each key press.
    steps = prometheus.value('sum(pbx_provider_step_seconds_count{route="main", '
                             'outcome="ok"})')
    assert steps is not None and steps >= 2 * calls
    assert prometheus.value("pbx_dtmf_to_provider_seconds_count") == calls
    # Prompts started (MediaPlay -> first RTP), counted by the workers that played them.
    wait_until(lambda: (prometheus.value("sum(pbx_ivr_play_to_rtp_seconds_count)") or 0)
               >= calls, 20, "the prompts' first RTP timed", interval=0.5)
    # Per-worker load and tick lateness from the heartbeats; RTP at each leg's end.
    assert len(prometheus.query("pbx_media_worker_ticks_total > 0")) == 2
    assert len(prometheus.query("pbx_media_tick_late_seconds_count > 0")) == 2
    assert prometheus.value('pbx_rtp_loss_ratio_count{direction="received"}') == calls
    assert (prometheus.value("pbx_rtp_packets_sent_total") or 0) > calls * 50
    # The workers' live packet counters: every leg is gone, so they come to what the legs
    # reported at their release.
    for direction in ("sent", "received"):
        wait_until(lambda d=direction: prometheus.value(
            f'sum(pbx_media_worker_rtp_packets_total{{direction="{d}"}})')
            == prometheus.value(f"pbx_rtp_packets_{d}_total"), 20,
            f"the workers' {direction} packets as the legs'", interval=0.5)
    assert len(prometheus.query("pbx_ivr_executor_capacity")) == 2
    # The shipped alert rules load and evaluate against the real series; nothing is down
    # and no set-up or provider step failed. (Tick lateness on this shared machine is
    # what it is: those alerts may be pending.)
    rules = prometheus.get("/api/v1/rules")["data"]["groups"]
    evaluated = [rule for group in rules for rule in group["rules"]]
    assert len(evaluated) == 9 and all(rule["health"] == "ok" for rule in evaluated), rules
    alerts = {a["labels"]["alertname"] for a in prometheus.get("/api/v1/alerts")["data"]["alerts"]}
    assert not alerts & {"PbxFrontDown", "PbxMediaWorkerDown", "PbxNoMediaWorkers",
                         "PbxIvrExecutorDown", "PbxCallSetupFailures", "PbxProviderErrors"}

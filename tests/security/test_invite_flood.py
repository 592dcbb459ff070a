"""An INVITE flood without ACK from one host while another host makes real calls
(issue 8, "Done when"), through real sockets between network namespaces.

The finding (commit 2554a5d): ~160 unauthenticated INVITEs/s to `*99`, never ACKed,
held every RTP port pair (each for 32 s, the ACK timeout) and started an IVR session
and a provider call each, so real callers got 503; server transactions were uncapped.

Here the real system (supervisord, front, two media workers, two executors) listens
on 10.200.1.1, the root side of a veth pair to namespace `pbxflood` (10.200.1.2); a
second namespace, `pbxlegit` (10.200.2.2), reaches it through its own veth pair.

* `pbxflood` runs tests/security/invite_flooder.py for 60 s at 20 % over the per-source
  rate limit, so the front admits from it all it admits from one source: every INVITE
  unauthenticated, a new call, with an SDP offer (padded to `PAD_BYTES`), never ACKed.
* `pbxlegit` makes 50 calls spread over that minute with sipp (`uac_talk_bye.xml`),
  each with its RTP on a socket of the test in that namespace: answered 200, ACKed,
  the PBX's prompt audio received while the caller sends a tone, hung up with BYE/200.

The IVR (a scripted provider) plays an 8 s prompt and then waits 30 s for digits, so an
unacknowledged call keeps its port pair, its session and its set-up budget until the
ACK timeout (64*T1 = 32 s): the most a flooded call can hold.

Every second the test samples the front's RSS and, on /metrics, the media legs and IVR
sessions. With the budgets (`[limits]`, defaults) the flooder holds at most
`setup_calls_per_source` calls (hence legs and sessions) and `transactions_per_source`
transactions of at most `transaction_bytes_per_source` bytes, so:

* legs and sessions never exceed that budget plus the legitimate calls in progress;
* the front's RSS grows by at most `RSS_GROWTH_BOUND_MB` over the run, and by at most
  `RSS_LATE_GROWTH_MB` in its second half (a bounded state reaches its plateau within
  the first 32 s: every budgeted thing is released after at most 32 s);
* /metrics shows the three defences at work (rate limit, transaction budget, set-up
  budget), and once the flood is over everything it held is released.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pbx.config import SipSettings
from pbx.settings.security import LimitSettings
from tests.e2e.harness import (
    ROOT,
    SCENARIOS,
    VENV_BIN,
    PbxSystem,
    RtpEndpoint,
    ScriptedProvider,
    media_address_from_sipp,
    sipp_messages,
    start_sipp,
    start_system,
    wait_until,
)
from tests.e2e.ivr_calls import NOTIFY_SUFFIXES, OK, action, event_type, send_audio
from tests.e2e.netns import VethHost

FLOOD_HOST = VethHost("pbxflood", host_ip="10.200.1.1", ns_ip="10.200.1.2")
LEGIT_HOST = VethHost("pbxlegit", host_ip="10.200.2.1", ns_ip="10.200.2.2")

LIMITS = LimitSettings()  # the defaults: the test writes no [limits]
RATE_LIMIT = SipSettings().rate_limit_per_s
FLOOD_RATE = 1.2 * RATE_LIMIT  # INVITEs/s sent; the front admits RATE_LIMIT of them
FLOOD_S = 60.0
PAD_BYTES = 3000  # each INVITE ~3.5 KB: what a held transaction keeps is visible in RSS
LEGIT_CALLS = 50
LEGIT_TALK_S = 3.0  # how long a legitimate caller stays before its BYE
ACK_TIMEOUT_S = 32.0  # 64*T1 (RFC 3261 §13.3.1.4): how long an unacknowledged 200 lives

# Bounds on the front's RSS (MB). What the budgets let the flooder hold: 256 server
# transactions of at most 2 MB of wire bytes in all (a few MB as Python objects), 30
# calls in set-up, each a call, its leg, an IVR session with its trace steps and a 2xx
# being retransmitted: well under 10 MB. The legitimate calls hold a few more. 20 MB
# leaves room for the allocator's high-water marks. Without budgets (2554a5d) the same
# flood holds 6,400 transactions of ~3.5 KB and a call for each one that got a port:
# +50 MB.
RSS_GROWTH_BOUND_MB = 20.0
RSS_LATE_GROWTH_MB = 5.0


# ---------------------------------------------------------------- the system


def ivr_script(path: str, body: Any) -> tuple[int, bytes, float]:
    """An 8 s prompt, then a 30 s wait for digits, then goodbye."""
    if path.endswith(NOTIFY_SUFFIXES):
        return OK
    kind = event_type(body)
    if kind == "session_start":
        return action({"type": "prompt", "file": "sounds/hold.wav"})
    if kind == "audio_complete":
        return action({"type": "collect_dtmf", "min_digits": 1, "max_digits": 4,
                       "timeout_ms": 30000})
    return action({"type": "hangup"})


@pytest.fixture(scope="module")
def hosts() -> Iterator[None]:
    try:
        FLOOD_HOST.create()
        LEGIT_HOST.create()
        yield
    finally:
        LEGIT_HOST.remove()
        FLOOD_HOST.remove()


@pytest.fixture(scope="module")
def flood_system(hosts: None, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[PbxSystem]:
    provider = ScriptedProvider()
    provider.script = ivr_script
    try:
        system = start_system(tmp_path_factory.mktemp("flood"), provider,
                              listen_ip=FLOOD_HOST.host_ip)
        try:
            yield system
        finally:
            system.stop()
    finally:
        provider.close()


def front_pid(system: PbxSystem) -> int:
    out = system.supervisorctl("pid", "front").strip()
    assert out.isdigit() and out != "0", f"no pid for the front: {out!r}"
    return int(out)


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert m, status
    return int(m.group(1)) / 1024


# ---------------------------------------------------------------- legitimate calls


@dataclass
class LegitCall:
    n: int
    rc: int | None = None  # sipp's exit code: 0 when answered, ACKed, BYE got 200
    finals: tuple[str, ...] = ()  # the INVITE's final statuses sipp logged (each once)
    pbx_media: tuple[str, int] | None = None
    audio_packets: int = 0  # PCMU from the PBX's media address to the caller's socket
    error: str = ""

    @property
    def ok(self) -> bool:
        return (self.rc == 0 and self.finals == ("200",) and self.pbx_media is not None
                and self.audio_packets >= 25)


class LegitCaller:
    """Calls from `pbxlegit`, each with its own sipp and RTP socket; counts how many
    are in progress (their legs and sessions are not the flooder's)."""

    def __init__(self, system: PbxSystem, workdir: Path) -> None:
        self.system = system
        self.workdir = workdir
        self.lock = threading.Lock()
        self.active = 0
        self.peak_active = 0

    def call(self, n: int) -> LegitCall:
        result = LegitCall(n)
        with self.lock:
            self.active += 1
            self.peak_active = max(self.peak_active, self.active)
        # A fresh namespace: these ports are ours alone.
        rtp = RtpEndpoint(LEGIT_HOST.socket(port=30000 + 2 * n))
        sipp = start_sipp(f"legit-{n}", [
            "-sf", str(SCENARIOS / "uac_talk_bye.xml"), "-s", "*99", self.system.sip_addr,
            "-i", LEGIT_HOST.ns_ip, "-p", str(5100 + n), "-mi", LEGIT_HOST.ns_ip,
            "-mp", str(20000 + 4 * n), "-key", "rtp_port", str(rtp.port),
            "-d", str(int(LEGIT_TALK_S * 1000)), "-m", "1", "-l", "1",
            "-timeout", "30s", "-timeout_error",
        ], self.workdir / f"legit-{n:02d}", netns=LEGIT_HOST.name)
        try:
            deadline = time.monotonic() + 15
            while result.pbx_media is None and time.monotonic() < deadline:
                if sipp.proc.poll() is not None:
                    break
                result.pbx_media = media_address_from_sipp(sipp.workdir)
                time.sleep(0.05)
            if result.pbx_media is not None:
                send_audio(rtp, result.pbx_media, LEGIT_TALK_S - 0.8)  # the caller talks
            result.rc = sipp.wait(40)
        except AssertionError as exc:  # sipp hung
            result.error = str(exc)[:500]
        finally:
            sipp.stop()
            rtp.close()
            with self.lock:
                self.active -= 1
        result.finals = tuple(sorted(set(re.findall(
            r"SIP/2\.0 ([2-6]\d\d) [^\n]*\n(?:[^\n]+\n)*?CSeq: 1 INVITE",
            sipp_messages(sipp.workdir)))))
        if result.pbx_media is not None:
            result.audio_packets = sum(1 for p in rtp.audio(0) if p.src == result.pbx_media)
        if not result.ok and not result.error:
            result.error = sipp.logs()[-1500:]
        return result


# ---------------------------------------------------------------- sampling


@dataclass
class Sample:
    at: float
    rss_mb: float
    media_legs: float
    sessions: float
    calls: float
    transactions: float
    legit_active: int


class Sampler:
    """Every second: the front's RSS and the gauges on /metrics."""

    def __init__(self, system: PbxSystem, pid: int, legit: LegitCaller) -> None:
        self.system, self.pid, self.legit = system, pid, legit
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(10)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            try:
                rss = rss_mb(self.pid)
                m = self.system.metrics()
                self.samples.append(Sample(
                    round(time.monotonic() - start, 1), rss, m["pbx_media_legs"],
                    m["pbx_sessions"], m["pbx_calls"], m["pbx_transactions"],
                    self.legit.active))
            except (OSError, KeyError, AssertionError) as exc:
                self.errors.append(repr(exc))
            self._stop.wait(1.0)


# ---------------------------------------------------------------- the test


def start_flooder(system: PbxSystem, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(FLOOD_HOST.command(
        str(VENV_BIN / "python"), "-m", "tests.security.invite_flooder",
        "--target", system.sip_addr, "--bind", FLOOD_HOST.ns_ip,
        "--rate", str(FLOOD_RATE), "--duration", str(FLOOD_S), "--pad", str(PAD_BYTES),
        "--out", str(out)), cwd=ROOT)


def test_invite_flood_from_one_host_leaves_other_callers_and_memory_alone(
        flood_system: PbxSystem, tmp_path: Path) -> None:
    system = flood_system
    legit = LegitCaller(system, tmp_path)
    # One call before the flood: the namespaces route, and the front has warmed up.
    warm = legit.call(LEGIT_CALLS)
    assert warm.ok, f"a call without any flood failed: {warm}"
    wait_until(lambda: system.metrics()["pbx_calls"] == 0, 10, "the warm-up call's end")
    before = system.metrics()
    pid = front_pid(system)
    sampler = Sampler(system, pid, legit)
    sampler.start()
    time.sleep(1.5)  # the start: a sample or two before the flood
    flood_out = tmp_path / "flood.json"
    flooder = start_flooder(system, flood_out)
    calls: list[LegitCall] = []
    try:
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=10) as pool:
            futures = []
            for n in range(LEGIT_CALLS):
                # Spread over the flood: the first after 1 s, the last ~5 s before its end.
                delay = start + 1.0 + n * (FLOOD_S - 6.0 - LEGIT_TALK_S) / LEGIT_CALLS
                time.sleep(max(0.0, delay - time.monotonic()))
                futures.append(pool.submit(legit.call, n))
            calls = [f.result(timeout=120) for f in futures]
        assert flooder.wait(FLOOD_S + 30) == 0, "the flooder failed"
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.wait(5)
        sampler.stop()
    flood = json.loads(flood_out.read_text())
    after = system.metrics()

    samples = sampler.samples
    start_rss = samples[0].rss_mb
    half = len(samples) // 2
    peak_rss = max(s.rss_mb for s in samples)
    peak_early = max(s.rss_mb for s in samples[:half])
    peak_late = max(s.rss_mb for s in samples[half:])
    peak_legs = max(s.media_legs for s in samples)
    peak_sessions = max(s.sessions for s in samples)
    peak_calls = max(s.calls for s in samples)
    peak_transactions = max(s.transactions for s in samples)
    failed = [c for c in calls if not c.ok]
    delta = {name: after.get(f"pbx_{name}_total", 0) - before.get(f"pbx_{name}_total", 0)
             for name in ("sip_rate_limited", "transactions_over_budget",
                          "setup_budget_refused")}
    figures = {
        "flood": flood,
        "legit": {"calls": len(calls), "ok": len(calls) - len(failed),
                  "peak_concurrent": legit.peak_active},
        "front_rss_mb": {"start": round(start_rss, 1), "peak": round(peak_rss, 1),
                         "peak_first_half": round(peak_early, 1),
                         "peak_second_half": round(peak_late, 1),
                         "end": round(samples[-1].rss_mb, 1)},
        "peaks": {"media_legs": peak_legs, "sessions": peak_sessions, "calls": peak_calls,
                  "transactions": peak_transactions},
        "metrics_delta": delta,
        "samples": len(samples),
    }
    report = json.dumps(figures, indent=1)
    print("\nINVITE flood figures:\n" + report)
    (tmp_path / "figures.json").write_text(report)

    assert not sampler.errors, sampler.errors[:5]
    assert len(samples) >= FLOOD_S * 0.8, f"too few samples\n{report}"
    # Every legitimate call went through.
    assert not failed, (f"{len(failed)} of {len(calls)} legitimate calls failed\n{report}\n"
                        + "\n".join(f"call {c.n}: rc={c.rc} finals={c.finals} "
                                    f"media={c.pbx_media} audio={c.audio_packets}\n{c.error}"
                                    for c in failed[:3]))
    # What the flooder held: at most its set-up budget of calls, hence legs and sessions.
    bound = LIMITS.setup_calls_per_source + legit.peak_active
    assert peak_legs <= bound, f"media legs peaked at {peak_legs} > {bound}\n{report}"
    assert peak_sessions <= bound, f"IVR sessions peaked at {peak_sessions} > {bound}\n{report}"
    # Memory: bounded, and flat once every budget is in its steady state.
    assert peak_rss - start_rss <= RSS_GROWTH_BOUND_MB, report
    assert peak_late - peak_early <= RSS_LATE_GROWTH_MB, report
    # The flood ran at its rate and all three defences answered it, every 503 with a
    # Retry-After (RFC 3261 §21.5.4); the set-up budget came back as calls ended.
    assert flood["sent"] >= FLOOD_RATE * FLOOD_S * 0.95, report
    assert flood["answered"] > LIMITS.setup_calls_per_source, report
    assert flood["refused"] > flood["sent"] / 2, report
    assert flood["refused_without_retry_after"] == 0, report
    assert delta["sip_rate_limited"] > 0, report
    assert delta["transactions_over_budget"] > 0, report
    assert delta["setup_budget_refused"] > 0, report
    # Once the flood is over, everything it held is released (no leaked set-up or calls
    # budget, leg or session): the last unacknowledged 200 gives up 32 s after it was sent.
    # (The BYEs that end those calls go unanswered and live 32 s more as transactions.)
    wait_until(lambda: _drained(system.metrics()), ACK_TIMEOUT_S + 10,
               "the flood's calls, legs, sessions and budgets to go")


def _drained(m: dict[str, float]) -> bool:
    return (m["pbx_calls"] == 0 and m["pbx_media_legs"] == 0 and m["pbx_sessions"] == 0
            and m["pbx_sources_in_setup"] == 0 and m["pbx_sources_with_calls"] == 0)

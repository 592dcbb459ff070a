"""deploy/prometheus/: the scrape config and the alert rules pass Debian's `promtool`
(check config, check rules, and the rules' unit tests), and every metric the rules
use is one the front exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from pbx.metrics_export import FrontCollector
from tests.calls.rig import CoreRig

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"  # Debian's `prometheus`


def promtool(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def test_scrape_config_and_rules_are_valid() -> None:
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout
    rules = promtool("check", "rules", "pbx-alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 9 rules found" in rules.stdout


def test_alert_unit_tests_pass_and_catch_a_changed_threshold(tmp_path: Path) -> None:
    result = promtool("test", "rules", "pbx-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    # The unit tests bite: with the set-up failure threshold at 50 % they fail.
    for name in ("pbx-alerts.yml", "pbx-alerts.test.yml"):
        shutil.copy(DEPLOY / name, tmp_path / name)
    rules = tmp_path / "pbx-alerts.yml"
    text = rules.read_text()
    assert text.count("> 0.05") == 2
    rules.write_text(text.replace("> 0.05", "> 0.5", 1))
    broken = promtool("test", "rules", "pbx-alerts.test.yml", cwd=tmp_path)
    assert broken.returncode != 0
    assert "PbxCallSetupFailures" in broken.stdout + broken.stderr


def test_a_broken_rule_is_refused(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text((DEPLOY / "pbx-alerts.yml").read_text().replace(
        "expr: pbx_media_workers == 0", "expr: pbx_media_workers === 0"))
    result = promtool("check", "rules", str(rules), cwd=tmp_path)
    assert result.returncode != 0


def test_the_rules_use_only_metrics_the_front_exports(tmp_path: Path) -> None:
    rig = CoreRig(tmp_path)
    rig.heartbeat()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FrontCollector(rig.core.ctx, rig.core.snapshot))
    exported = set(re.findall(r"^# TYPE (\S+) ", generate_latest(registry).decode(),
                              re.MULTILINE))
    used = set(re.findall(r"\b(pbx_[a-z0-9_]+)", (DEPLOY / "pbx-alerts.yml").read_text()))
    used = {re.sub(r"_(bucket|count|sum)$", "", name) for name in used}
    assert len(used) >= 8
    assert not used - exported, f"not exported: {sorted(used - exported)}"

"""The alert rules pass Prometheus's own checks, and every alert is unit-tested by promtool on
synthetic series: firing on the history it is meant for, quiet on one it is not meant for."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

OPS = Path(__file__).resolve().parents[2] / "ops" / "prometheus"
RULES = OPS / "alerts.yml"
RULE_TESTS = OPS / "alerts_test.yml"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install Debian's prometheus package (.ci/run does)")
    return path


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=OPS, capture_output=True, text=True, timeout=120)


def alert_names() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_promtool_check_rules_passes():
    result = run("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass():
    result = run("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case():
    cases: dict[str, set[bool]] = {}
    for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for case in test.get("alert_rule_test", ()):
            cases.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    assert alert_names(), "no alerts found"
    for name in alert_names():
        assert cases.get(name) == {True, False}, f"{name}: needs a firing and a quiet promtool case"


def test_a_broken_rule_is_caught(tmp_path):
    """The checks can fail: the same rule with a typo in its PromQL is refused."""
    broken = tmp_path / "alerts.yml"
    broken.write_text(RULES.read_text().replace("deriv(edgecatch_spool_items[15m])", "deriv(edgecatch_spool_items)"))
    result = subprocess.run([promtool(), "check", "rules", str(broken)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0

"""scripts/prometheus: the rules load, and every alert has a test that promtool runs.

`promtool check rules` lints the rules, `promtool test rules` runs
repeld-rules.test.yml (series in, alerts and recorded values out, on
Prometheus's own rule engine), and this test checks that every alert of the
rules file is named by at least one alert test of the test file, firing.
promtool comes with Debian's prometheus package (.ci/run installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

PROMTOOL = shutil.which("promtool")
RULES_DIR = Path(__file__).resolve().parents[2] / "scripts" / "prometheus"
RULES = RULES_DIR / "repeld-rules.yml"
TESTS = RULES_DIR / "repeld-rules.test.yml"

pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)"
)


def _promtool(*args: str) -> str:
    assert PROMTOOL is not None
    done = subprocess.run(
        [PROMTOOL, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def alerts() -> list[str]:
    """The alert names of the rules file, in order."""
    return re.findall(r"^\s*- alert: (\S+)\s*$", RULES.read_text(), re.M)


def records() -> list[str]:
    return re.findall(r"^\s*- record: (\S+)\s*$", RULES.read_text(), re.M)


def test_the_rules_pass_promtool_check() -> None:
    out = _promtool("check", "rules", RULES.name)
    assert f"SUCCESS: {len(alerts()) + len(records())} rules found" in out


def test_the_rule_tests_pass() -> None:
    assert "SUCCESS" in _promtool("test", "rules", TESTS.name)


def test_every_alert_has_a_firing_test() -> None:
    text = TESTS.read_text()
    # An alert test that expects it to fire: "alertname: X" followed by exp_labels.
    fired = set(re.findall(r"alertname: (\S+)\n\s+exp_alerts:\n\s+- exp_labels:", text))
    assert alerts() and set(alerts()) <= fired, set(alerts()) - fired
    assert set(re.findall(r"alertname: (\S+)", text)) <= set(alerts())  # no stale test

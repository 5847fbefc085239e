"""The monitoring pack for real: Prometheus scrapes a live repeld, runs the rules, and
every panel of the Grafana dashboard and every rule has data.

Debian's `prometheus` server (the package .ci/run installs for promtool) runs on
loopback with a temporary storage directory, scraping every second a repeld
with --workers 2 (so what is checked is the parent's sum) that asks two DNS
lists of a real NSD (tests/nsd_fixture.py) and keeps a memory pass cache. A
known mix of clients from distinct 127.x addresses goes through: patient
clients (passed after the delay and relayed), an allow-listed and a
block-listed one, early talkers and clients that hang up. Then, through
Prometheus's HTTP API:

- every query of every panel of scripts/grafana/repeld-dashboard.json (the
  dashboard's variables replaced as Grafana would with "All" selected) returns
  a series;
- every rule of scripts/prometheus/repeld-rules.yml is loaded and evaluated
  without error, every recording rule has a series, and every metric an
  alert reads has one (an alert that watches a name repeld does not expose
  would never fire).

Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..nsd_fixture import NSD, Forwarder, dns_server
from ..procs import LineBackend, SyslogUDP, connect, daemon, free_port, read_line, wait_for

PROMETHEUS = shutil.which("prometheus") or (
    "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
)
ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "scripts" / "prometheus" / "repeld-rules.yml"
DASHBOARD = ROOT / "scripts" / "grafana" / "repeld-dashboard.json"
USER = ["--user", "nobody"] if os.geteuid() == 0 else []
DELAY = 1.0
#: What Grafana puts for the dashboard's variables with "All" selected, and a rate window.
VARIABLES = {"$job": ".+", "$instance": ".+", "$__rate_interval": "1m"}

pytestmark = [
    pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (Debian package)"),
    pytest.mark.skipif(NSD is None, reason="nsd is not installed (apt-get install nsd)"),
]


class Prometheus:
    """A Prometheus server on loopback; `query` asks its HTTP API."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port("127.0.0.1")
        config = workdir / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  scrape_timeout: 1s\n"
            "  evaluation_interval: 1s\n"
            f"rule_files:\n  - {RULES}\n"
            "scrape_configs:\n"
            "  - job_name: repeld\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        assert PROMETHEUS is not None
        self.log = (workdir / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
        )

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as answer:
            return json.load(answer)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def total(self, expr: str) -> float:
        return sum(float(s["value"][1]) for s in self.query(expr))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()


@contextlib.contextmanager
def prometheus(workdir: Path, target: str) -> Iterator[Prometheus]:
    server = Prometheus(workdir, target)
    try:
        if not wait_for(server.ready, 60.0, 0.2):
            raise AssertionError((workdir / "prometheus.log").read_text()[-3000:])
        yield server
    finally:
        server.close()


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, variables replaced."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, (panel["title"], expr)
            found.append((panel["title"], expr))
    return found


def _mix(port: int) -> None:
    """The known mix; each client from its own address."""
    for i in range(1, 4):  # patient: greeted after the delay, relayed, QUIT
        c = connect(port, source=f"127.0.5.{i}")
        assert read_line(c) == b"220 backend.test ESMTP\r\n"
        c.sendall(b"QUIT\r\n")
        assert read_line(c) == b"221 2.0.0 bye\r\n"
        c.close()
    c = connect(port, source="127.0.0.4")  # on wl.test: passed at once
    assert read_line(c) == b"220 backend.test ESMTP\r\n"
    c.close()
    c = connect(port, source="127.0.0.2")  # on bl.test: 554
    assert read_line(c).startswith(b"554 ")
    c.close()
    for i in range(1, 6):  # early talkers
        c = connect(port, source=f"127.0.7.{i}")
        c.sendall(b"EHLO bot.example\r\n")
        with contextlib.suppress(ConnectionResetError):
            read_line(c)
        c.close()
    for i in range(1, 3):  # hang-ups before the greeting
        c = connect(port, source=f"127.0.8.{i}")
        time.sleep(0.1)
        c.close()


def test_every_panel_and_every_rule_has_data(
    tmp_path: Path, syslog: SyslogUDP, backend: LineBackend
) -> None:
    port, mport = free_port(), free_port()
    with (
        dns_server(_mkdir(tmp_path / "nsd")) as resolver,
        daemon(*_repeld_args(port, mport, backend, syslog, resolver)),
        prometheus(tmp_path, f"127.0.0.1:{mport}") as prom,
    ):
        syslog.wait_for("worker-start", 2)
        # Scraped twice before the mix, so that rates see the mix as an increase.
        assert wait_for(lambda: prom.total('count_over_time(up{job="repeld"}[1m])') >= 2, 60.0)
        _mix(port)
        syslog.wait_for("early-talker", 5)
        syslog.wait_for("relay-end", 3)
        assert wait_for(lambda: prom.total("sum(repeld_passes_total)") >= 4, 60.0, 0.2)
        assert wait_for(lambda: prom.total("sum(repeld_early_talkers_total)") >= 5, 60.0, 0.2)
        assert wait_for(lambda: bool(prom.query("repeld:repelled:ratio_rate5m")), 60.0, 0.2)

        # A series born with the mix (the dnsbl event, a list's hits) needs two scrapes
        # before a rate of it exists.
        empty: list[tuple[str, str]] = []

        def every_panel_has_data() -> bool:
            empty[:] = [(title, expr) for title, expr in panel_queries() if not prom.query(expr)]
            return not empty

        assert wait_for(every_panel_has_data, 30.0, 0.5), empty
        # The verdicts panel saw the mix, not only zeros.
        verdicts = panel_queries()[0][1]
        assert prom.total(verdicts) > 0
        assert 0 < prom.total("repeld:repelled:ratio_rate5m") < 1

        rules = _rules(prom)
        assert {r["name"] for r in rules} == set(
            re.findall(r"^\s*- (?:alert|record): (\S+)\s*$", RULES.read_text(), re.M)
        )
        for rule in rules:
            assert rule["health"] == "ok", rule
            if rule["type"] == "recording":
                assert prom.query(rule["name"]), rule["name"]
            else:
                names = set(re.findall(r"\b(?:repeld|process)_[a-z_]+\b", rule["query"]))
                names |= set(re.findall(r"\brepeld:[a-z0-9_:]+", rule["query"]))
                missing = [name for name in sorted(names) if not prom.query(name)]
                assert not missing, (rule["name"], missing)
        # The backend is up, and no alert fires on a healthy repeld (pending ones aside).
        assert prom.total("repeld_backend_up") == 1
        firing = [a for a in prom.get("/api/v1/alerts")["data"]["alerts"] if a["state"] == "firing"]
        assert not firing, firing


def _rules(prom: Prometheus) -> list[dict[str, Any]]:
    """Every rule, once each has been evaluated (bounded wait)."""
    found: list[dict[str, Any]] = []

    def evaluated() -> bool:
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        found[:] = [rule for group in groups for rule in group["rules"]]
        return bool(found) and all(r.get("lastEvaluation", "").startswith("2") for r in found)

    assert wait_for(evaluated, 60.0, 0.2)
    return found


def _repeld_args(
    port: int, mport: int, backend: LineBackend, syslog: SyslogUDP, resolver: Forwarder
) -> list[str]:
    return [
        "--listen", f"127.0.0.1:{port}",
        "--backend", backend.address,
        "--proxy-protocol", "none",
        *USER,
        "--delay", str(DELAY),
        "--workers", "2",
        "--cache", "memory",
        "--resolver", f"127.0.0.1:{resolver.port}",
        "--dns-timeout", "1",
        "--dnswl", "wl.test",
        "--dnsbl", "bl.test",
        "--dnsbl-action", "reject",
        "--syslog", syslog.target,
        "--metrics", f"127.0.0.1:{mport}",
    ]  # fmt: skip


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    # What Grafana's import needs: panels with an id, a type, a place and targets
    # on the dashboard's data source variable; the variables the queries use exist.
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["type"] in {"timeseries", "heatmap", "state-timeline", "stat"}
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])
        assert panel["datasource"]["uid"] == "${datasource}"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for subject in ("verdicts", "repelled share", "give-up", "held", "relays", "backend up",
                    "dns list", "cache lookup time"):  # fmt: skip
        assert subject in titles, subject
    assert any(p["type"] == "heatmap" and "hangup_seconds" in p["targets"][0]["expr"]
               for p in dashboard["panels"])  # fmt: skip


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path

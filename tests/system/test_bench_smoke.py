"""The benchmark scripts keep working: small bench-hold (also with DNS lists, where
nsd is installed, and behind HAProxy, where it is), bench-cache, bench-report and
bench-relay --postfix runs print their tables.

No speed is asserted here (speed is measured by bench/bench-hold,
bench/bench-relay and bench/bench-cache, and written down in
docs/PERFORMANCE.md); this only checks that the small runs finish, exit 0 and
report every column.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH_HOLD = ROOT / "bench" / "bench-hold"
BENCH_CACHE = ROOT / "bench" / "bench-cache"

#: A hung run is a failure, not a slow pass (the run takes about 10 s).
TIMEOUT = 60.0

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("smtp-sink") is None,
    reason="bench-hold needs Linux (/proc, 127.0.0.0/8 sources) and Postfix's smtp-sink",
)

ROWS = (
    "held (server side)",
    "accept rate conn/s",
    "RSS KiB/conn",
    "RssAnon KiB/conn",
    "Pss_Anon KiB/conn",
    "cut-off p50 ms",
    "cut-off p99 ms",
    "timer error p50 ms",
    "timer error p99 ms",
    "CPU s per 1000 conns (accept)",
    "idle CPU % holding N",
)


def test_bench_hold_small_run_prints_the_table() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH_HOLD), "--n", "200", "--delay", "2", "--quiet"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| metric"))
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "metric",
        "repeld",
        "target",
        "met",
    ]
    table = {
        cells[0]: cells[1:]
        for cells in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in lines
            if line.startswith("| ") and not line.startswith("| metric")
        )
    }
    for row in ROWS:
        matches = [name for name in table if name.startswith(row)]
        assert matches, f"no {row!r} row in:\n{proc.stdout}"
        assert table[matches[0]][0], f"empty value for {row!r}"
    # every connection asked for was held by the server (plus the timer probes)
    held = int(table["held (server side)"][0].replace(",", ""))
    assert held >= 200


NSD = shutil.which("nsd") or ("/usr/sbin/nsd" if Path("/usr/sbin/nsd").exists() else None)


@pytest.mark.skipif(NSD is None, reason="bench-hold --dns needs nsd (apt-get install nsd)")
def test_bench_hold_dns_run_counts_the_queries_per_list() -> None:
    # About 10 s: repeld, then repeld+dns, each client from its own address.
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH_HOLD),
            "--n",
            "200",
            "--delay",
            "2",
            "--dns",
            "--sources",
            "distinct",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, table = _table(proc.stdout)
    assert header == ["metric", "repeld", "repeld+dns", "repeld/repeld+dns", "target", "met"]
    for row in ROWS:
        matches = [name for name in table if name.startswith(row)]
        assert matches, f"no {row!r} row in:\n{proc.stdout}"
        assert table[matches[0]][0] and table[matches[0]][1], f"empty value in {row!r}"
    # the plain run asked no list; the one with lists asked both (a query per
    # client and list, with distinct sources: how many is not asserted here)
    for zone in ("bl.test", "wl.test"):
        cells = table[f"{zone} queries per client (NSD)"]  # repeld, repeld+dns, ratio...
        assert float(cells[0]) == 0.0
        assert float(cells[1]) > 0.0
    assert table["DNS queries sent per client (repeld)"][0] == "n/a"
    assert float(table["DNS queries sent per client (repeld)"][1]) > 0.0
    assert "repeld+dns against repeld: accept rate" in proc.stdout


HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)


def _proxy_input() -> bool:
    """Whether the repeld bench-hold runs reads PROXY headers (--proxy-from, issue 17)."""
    out = subprocess.run(
        [sys.executable, "-m", "repeld", "--help"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        check=False,
    ).stdout
    return "--proxy-from" in out


@pytest.mark.skipif(HAPROXY is None, reason="bench-hold --balancer needs haproxy")
@pytest.mark.parametrize("proxy", ["none", "v2"])
def test_bench_hold_balancer_run_is_beside_the_direct_one(proxy: str) -> None:
    # About 10 s: repeld, then repeld behind HAProxy (bench/peers/haproxy.sh relay mode).
    if proxy != "none" and not _proxy_input():
        pytest.skip("this repeld has no --proxy-from yet")
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH_HOLD),
            "--n",
            "200",
            "--delay",
            "2",
            "--balancer",
            "--balancer-proxy",
            proxy,
            *(["--repeld-arg=--no-cache"] if proxy == "none" else []),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, table = _table(proc.stdout)
    assert header == [
        "metric",
        "repeld",
        "repeld+haproxy",
        "repeld/repeld+haproxy",
        "target",
        "met",
    ]
    for row in ROWS:
        matches = [name for name in table if name.startswith(row)]
        assert matches, f"no {row!r} row in:\n{proc.stdout}"
        assert table[matches[0]][0] and table[matches[0]][1], f"empty value in {row!r}"
    held = table["held (server side)"]
    assert int(held[0].replace(",", "")) >= 200
    assert int(held[1].replace(",", "")) >= 200  # repeld held them all through HAProxy
    assert table["balancer: HAProxy RSS KiB/conn"][0] == "n/a"
    assert float(table["balancer: HAProxy RSS KiB/conn"][1]) > 0.0
    assert "repeld+haproxy against repeld: accept rate" in proc.stdout


def test_bench_hold_dns_latency_run_says_who_had_every_answer() -> None:
    # About 15 s: the bench's own list server answering after 20 ms, a paced load.
    proc = subprocess.run(
        [
            sys.executable, str(BENCH_HOLD), "--n", "200", "--delay", "3",
            "--dns-only", "--dns-latency", "0.02", "--sources", "distinct",
            "--rate", "400", "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, table = _table(proc.stdout)
    assert header == ["metric", "repeld+dns", "target", "met"]
    share = table["% clients with every list's answer while held"][0]
    assert 0.0 < float(share) <= 100.0
    assert float(table["bl.test queries per client (NSD)"][0]) > 0.0  # the responder's count
    assert "dns-latency=0.02s" in proc.stdout and "rate=400/s" in proc.stdout


def _table(stdout: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("| metric"))
    rows = {
        cells[0]: cells[1:]
        for cells in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in lines
            if line.startswith("| ") and not line.startswith("| metric")
        )
    }
    return [c.strip() for c in header.strip("|").split("|")], rows


@pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="bench-cache's redis variant needs redis-server"
)
def test_bench_cache_small_run_prints_the_table() -> None:
    # About 16 s: one round of three variants, each learning for the 2 s delay.
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH_CACHE),
            "--quick",
            "--variants",
            "none,sqlite,redis",
            "--delay",
            "2",
            "--probes",
            "20",
            "--flood-probes",
            "0",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, table = _table(proc.stdout)
    assert header == ["metric", "none", "sqlite", "redis"]
    for row in (
        "accept rate conn/s (until held)",
        "repeld CPU s per 1000 conns",
        "cached: greeting p50 ms (quiet)",
        "trusted: greeting p99 ms (quiet)",
    ):
        assert row in table, f"no {row!r} row in:\n{proc.stdout}"
        assert all(table[row]), f"empty value in {row!r}"
    # the learners were remembered: the cached clients passed by the cache, not the delay
    passed = [int(x.replace(",", "")) for x in table["passes by cache (sum)"]]
    assert passed[0] == 0
    assert passed[1] > 0
    assert passed[2] > 0


def test_soak_short_run_samples_and_gives_a_verdict() -> None:
    # About 8 s of the mixed load; the tolerance is huge, so only a failed
    # load (repeld dead, nothing delivered) makes the exit status non-zero.
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "soak"),
            "--duration",
            "6",
            "--interval",
            "2",
            "--delay",
            "1",
            "--tolerance",
            "1e9",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = lines[0].split()
    assert header[:4] == ["t", "s", "RSS", "KiB"]
    samples = [line.split() for line in lines[1:] if line.strip() and line.split()[0][0].isdigit()]
    assert len(samples) >= 4  # t=0 and one every 2 s
    last = dict(
        zip(["t", "rss", "anon", "fds", "early", "hangup", "pass"], samples[-1], strict=False)
    )
    assert int(last["rss"]) > 0
    assert int(last["early"]) > 0 and int(last["hangup"]) > 0 and int(last["pass"]) > 0
    rows = {
        c[0]: c[1]
        for c in (
            [x.strip() for x in line.strip("|").split("|")]
            for line in lines
            if line.startswith("| ")
        )
    }
    assert rows["verdict"] == "plateau"
    delivered = int(rows["delivered / failed / skipped"].split("/")[0])
    assert delivered > 0


def test_bench_report_small_run_prints_the_table() -> None:
    # A second or two: 3,000 lines, one round; every Postfix line (one in six) skipped.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench-report"), "--lines", "3000", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "target       wall s    CPU s    lines/s  peak RSS MiB" in proc.stdout
    assert "repeld report: 2500 events in 3000 lines (500 lines skipped" in proc.stdout


def test_talker_memory_small_run_prints_the_table(tmp_path: Path) -> None:
    # 50 observed talkers, 64 KiB each after their EHLO: the table's every row,
    # and what the run saw (each talk logged, each talker then cut for its flood).
    out = tmp_path / "talkers.json"
    argv = [str(ROOT / "bench" / "talker-memory"), "--n", "50", "--settle", "0.5"]
    proc = subprocess.run(
        [sys.executable, *argv, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "talker-memory: 50 talkers, --on-early log, 65536 bytes each" in proc.stdout
    for row in ("still held", "unread KiB (server)", "skmem r KiB/talker", "system TCP mem KiB"):
        assert f"| {row} | " in proc.stdout, proc.stdout
    run = json.loads(out.read_text())["runs"]["repeld"]
    assert (run["logged"], run["cut (events)"], run["still held"]) == (50, 50, 0)


BENCH_RELAY = ROOT / "bench" / "bench-relay"


@pytest.mark.skipif(
    shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists(),
    reason="the Postfix set measures HAProxy beside repeld",
)
def test_bench_relay_postfix_set_prints_every_front() -> None:
    # One small round: a real smtpd reached directly, through HAProxy, repeld
    # relaying, repeld pass: and postscreen (bench/peers/postfix.sh; needs root).
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("Postfix's master needs root")
    proc = subprocess.run(
        [sys.executable, str(BENCH_RELAY), "--postfix", "--rounds", "1", "--messages", "100",
         "--no-foreground"],
        capture_output=True, text=True, timeout=4 * TIMEOUT, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| metric"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for front in ("direct", "repeld", "repeld-pass", "haproxy", "postscreen"):
        assert front in columns, columns
    target = next(ln for ln in proc.stdout.splitlines() if ln.startswith("target: repeld-pass/"))
    # the share paired by round beside the ratio of the medians: one round, one share
    paired = target.split("; paired by round ", 1)[1]
    share, spread = paired.split(" ", 1)
    assert float(share) > 0 and spread == f"({share}-{share})", target
    assert "proxy wake-ups per message" in proc.stdout
    # The goal measured on the peer that does the same job in C.
    assert "postscreen/haproxy" in columns, columns
    assert "peer: postscreen/haproxy" in proc.stdout


AB_PASS = ROOT / "bench" / "ab-pass"


def test_ab_pass_pairs_each_tree_with_the_first(tmp_path: Path) -> None:
    # Two trees (this one in one process and with two workers) in front of a
    # real smtpd, one small round: every front measured, the second paired.
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("Postfix's master needs root")
    src = str(ROOT / "src")
    figures = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, str(AB_PASS), "--tree", f"one={src}", "--tree", f"two={src}:2",
         "--rounds", "1", "--messages", "100", "--sessions", "5", "--postscreen",
         "--floor", "--json", str(figures)],
        capture_output=True, text=True, timeout=4 * TIMEOUT, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    fronts = [line.split()[2] for line in lines if line.startswith("round 1 ")]
    assert fronts == ["one", "two", "floor", "postscreen"]
    paired = [line for line in lines if line.startswith("median two ")]
    assert len(paired) == 1 and "paired against one:" in paired[0], proc.stdout
    assert "(lower in " in paired[0] and " of 1 rounds)" in paired[0]
    # postscreen in the same rounds: each tree's CPU as a share of its, measured
    shares = [line for line in lines if line.startswith("share ")]
    assert [line.split()[1] for line in shares] == ["one", "two", "one", "two"], proc.stdout
    assert all("of floor's CPU per message, round by round: " in s for s in shares[:2])
    assert all("of postscreen's CPU per message, round by round: " in s for s in shares[2:])
    assert all(float(s.rsplit(": ", 1)[1].split()[0]) > 0 for s in shares)
    # --json: the same figures, every round's too
    data = json.loads(figures.read_text())
    assert list(data["rounds"]) == ["one", "two", "floor", "postscreen"]
    assert all(len(rounds) == 1 and rounds[0]["cpu_us"] > 0 for rounds in data["rounds"].values())
    assert data["paired"]["two"]["rounds"] == 1 and "one" not in data["paired"]
    median_two = float(paired[0].split()[2])
    assert round(data["medians"]["two"]["cpu_us"], 1) == median_two
    assert set(data["shares"]["postscreen"]) == set(data["shares"]["floor"]) == {"one", "two"}
    assert all(s["median"] > 0 for s in data["shares"]["postscreen"].values())


def test_ab_pass_floor_as_two_processes_hands_every_client_on() -> None:
    # Two copies of the floor on one port (SO_REUSEPORT, as --workers 2): every
    # message reaches smtpd (smtp-source fails otherwise), and CPU is counted.
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("Postfix's master needs root")
    src = str(ROOT / "src")
    proc = subprocess.run(
        [sys.executable, str(AB_PASS), "--tree", f"one={src}", "--floor",
         "--floor-processes", "2", "--rounds", "1", "--messages", "200", "--sessions", "8"],
        capture_output=True, text=True, timeout=4 * TIMEOUT, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = [line.split() for line in proc.stdout.splitlines() if line.startswith("round 1 ")]
    assert [r[2] for r in rounds] == ["one", "floor"]
    assert all(float(r[3]) > 0 for r in rounds), proc.stdout
    share = [line for line in proc.stdout.splitlines() if line.startswith("share one ")]
    assert len(share) == 1 and "of floor's CPU per message" in share[0], proc.stdout
    refused = subprocess.run(
        [sys.executable, str(AB_PASS), "--tree", f"one={src}", "--floor", "--floor-processes", "0"],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, check=False,
    )  # fmt: skip
    assert refused.returncode == 2 and "must be positive" in refused.stderr


def _ab_pass_refusal(*trees: str) -> subprocess.CompletedProcess[str]:
    """bench/ab-pass with these --tree arguments, which it should refuse."""
    args = [arg for tree in trees for arg in ("--tree", tree)]
    return subprocess.run(
        [sys.executable, str(AB_PASS), *args],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, check=False,
    )  # fmt: skip


def test_ab_pass_refuses_a_tree_without_repeld(tmp_path: Path) -> None:
    proc = _ab_pass_refusal(f"a={tmp_path}", f"b={tmp_path}")
    assert proc.returncode == 2
    assert "no repeld package in" in proc.stderr
    src = str(ROOT / "src")
    peer = _ab_pass_refusal(f"haproxy={src}", f"b={src}")
    assert peer.returncode == 2
    assert "haproxy names a peer front" in peer.stderr
    twice = _ab_pass_refusal(f"a={src}", f"a={src}:2")
    assert twice.returncode == 2
    assert "each --tree needs a name of its own" in twice.stderr


HANDOFF_COST = ROOT / "bench" / "handoff-cost"


@pytest.mark.parametrize("way", [[], ["--one-write"]])
def test_handoff_cost_counts_every_hand_off(way: list[str]) -> None:
    # The pass hand-off's system calls alone, against a child standing in for
    # smtpd that checks each hand-off brought one descriptor and the whole list.
    proc = subprocess.run(
        [sys.executable, str(HANDOFF_COST), "--n", "250", *way],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    how = "one sendmsg" if way else "sendmsg + send"
    assert proc.stdout.startswith(f"handoff-cost: 250 hand-offs ({how}): "), proc.stdout
    assert proc.stdout.rstrip().endswith(" us of CPU each")


@pytest.mark.parametrize("n", ["1", "50"], ids=["the last hand-off", "the first of many"])
def test_handoff_cost_fails_on_a_hand_off_the_receiver_did_not_get_whole(
    tmp_path: Path, n: str
) -> None:
    # A copy whose receiver wants one byte more than is sent: every hand-off
    # is then short, and the bench says so instead of printing a figure, even
    # when the short one is the last.
    copy = tmp_path / "handoff-cost"
    text = HANDOFF_COST.read_text()
    assert "listed != ATTRS:" in text
    copy.write_text(text.replace("listed != ATTRS:", 'listed != ATTRS + b"x":'))
    proc = subprocess.run(
        [sys.executable, str(copy), "--n", n],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "without its descriptor or list" in proc.stderr
    assert "us of CPU each" not in proc.stdout


PACED_SOURCE = ROOT / "bench" / "paced-source"


def test_paced_source_delivers_every_message_at_its_size() -> None:
    # bench-relay --rate's client against a real SMTP server (aiosmtpd): each
    # message over a connection of its own, all accepted, each about -l bytes.
    from aiosmtpd.controller import Controller

    from ..procs import free_port
    from .test_e2e import RecordingHandler

    handler = RecordingHandler()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port(), ready_timeout=TIMEOUT)
    controller.start()
    try:
        proc = subprocess.run(
            [sys.executable, str(PACED_SOURCE), "--rate", "200", "-m", "40", "-l", "2048",
             f"127.0.0.1:{controller.port}"],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
    finally:
        controller.stop()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("paced-source: 40 sent, 0 failed"), proc.stdout
    assert len(handler.deliveries) == 40
    assert len({d.peer for d in handler.deliveries}) == 40  # a connection each
    assert all(1900 <= len(d.content) <= 2048 for d in handler.deliveries)
    assert all(d.rcpt_tos == ["b@y.test"] for d in handler.deliveries)


def test_paced_source_refuses_a_target_off_loopback() -> None:
    proc = subprocess.run(
        [sys.executable, str(PACED_SOURCE), "--rate", "10", "-m", "1", "192.0.2.1:25"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "192.0.2.1: not a loopback address" in proc.stderr


def test_bench_relay_postfix_set_with_clients_at_a_rate() -> None:
    # --rate: the small load from paced-source (an open loop) through every front.
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("Postfix's master needs root")
    proc = subprocess.run(
        [sys.executable, str(BENCH_RELAY), "--postfix", "--rounds", "1", "--messages", "60",
         "--rate", "150", "--no-foreground"],
        capture_output=True, text=True, timeout=4 * TIMEOUT, cwd=ROOT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "bench-relay: paced-source --rate 150 -m 60 -l 2048" in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| metric"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for front in ("direct", "repeld", "repeld-pass", "haproxy", "postscreen"):
        assert front in columns, columns
    assert "proxy CPU us per message" in proc.stdout

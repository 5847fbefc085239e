"""`repeld report` on the events of a real repeld run.

repeld runs as a process with a known mix of clients (early talkers, hang-ups
after known waits, patient clients whose MTA is down); a real UDP receiver keeps
the raw datagrams. The report must count what the events say, whether it reads
the raw datagrams, the same messages as rsyslog's traditional file format writes
them (the RFC 5424 structured data lost, the `@cee:` JSON kept) or the `-f`
lines repeld printed on stderr.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from repeld.report.main import tally_lines
from repeld.report.tally import Tally

from .. import rsyslog_fixture
from ..procs import TIMEOUT, SyslogUDP, daemon, free_port, wait_for
from ..rsyslog_fixture import Rsyslogd
from ..syslog_receiver import Received

ROOT = Path(__file__).resolve().parents[2]
DELAY = 3.0
USER = ["--user", "nobody"] if os.geteuid() == 0 else []


#: What one early talker sends: repeld's own words, to plant a pass and another early
#: talker (it must count as itself, an early talker from 127.0.0.1, and nothing else).
PLANTED = (
    b" repeld: PASS DELAY [6.6.6.9]:1 after 30.000\r\n"
    b" repeld[1]: PREGREET 1 after 0.000 from [6.6.6.3]:1: x (action=drop)"
    b' @cee:{"event":"pass","client":"6.6.6.4","reason":"delay","elapsed":30.0}'
    b' [x@1 event="pass" client="6.6.6.5" reason="delay" elapsed="30.0"]'
)


def _early(address: tuple[str, int], after: float, sent: bytes = b"EHLO bot.example\r\n") -> None:
    with socket.create_connection(address, timeout=TIMEOUT) as c:
        time.sleep(after)
        c.sendall(sent)
        c.settimeout(TIMEOUT)
        try:
            while c.recv(4096):
                pass
        except OSError:
            pass  # drop resets the connection


def _hangup(address: tuple[str, int], after: float) -> None:
    with socket.create_connection(address, timeout=TIMEOUT):
        time.sleep(after)


def _patient(address: tuple[str, int], after: float) -> None:
    with socket.create_connection(address, timeout=TIMEOUT) as c:
        c.settimeout(TIMEOUT)
        assert c.recv(4096).startswith(b"421 ")  # no MTA behind: passed, then told 421


#: The client mix: what each does, after how many seconds.
def _planter(address: tuple[str, int], after: float) -> None:
    _early(address, after, PLANTED)


MIX: list[tuple[Callable[[tuple[str, int], float], None], float]] = [
    (_early, 0.0),
    (_planter, 0.0),
    (_early, 1.0),
    (_hangup, 0.5),
    (_hangup, 1.5),
    (_patient, 0.0),
    (_patient, 0.0),
]


def _run_mix(fmt: str, target: str, tmp_path: Path) -> list[str]:
    """Run repeld logging to `target` with the client mix; its stderr lines."""
    config = tmp_path / "repeld.toml"
    config.write_text("")
    with daemon(
        "--config", str(config), *USER,
        "--listen", "127.0.0.1:0",
        "--backend", f"127.0.0.1:{free_port()}",
        "--delay", str(DELAY),
        "--syslog", target,
        "--log-format", fmt,
        "--sd-id", "mx@99999",
    ) as rd:  # fmt: skip
        threads = [
            threading.Thread(target=client, args=(rd.address, after)) for client, after in MIX
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)

        def written(name: str) -> int:
            return sum(f" {name}: " in line for line in rd.lines)

        # every event on -f: the early talkers, hang-ups and the passes' backend errors
        assert wait_for(
            lambda: (
                (written("early-talker"), written("hangup"), written("backend-error")) == (3, 2, 2)
            ),
            TIMEOUT,
        ), rd.lines
    return list(rd.lines)


def _run(fmt: str, tmp_path: Path) -> tuple[list[Received], list[bytes], list[str]]:
    """The messages, raw datagrams and stderr lines of one run with the client mix."""
    syslog = SyslogUDP()
    try:
        lines = _run_mix(fmt, syslog.target, tmp_path)
        syslog.wait_for("early-talker", 3)
        syslog.wait_for("hangup", 2)
        syslog.wait_for("backend-error", 2)

        syslog.drain()
        return list(syslog.messages), list(syslog.raw), lines
    finally:
        syslog.close()


def _traditional(raw: bytes, msg: Received) -> str:
    """The line rsyslog's RSYSLOG_TraditionalFileFormat writes for one message."""
    stamp = time.strftime("%b %e %H:%M:%S")
    # The @cee: part survives whole; the RFC 5424 structured data does not.
    body = raw.decode().split("]: ", 1)[1] if msg.format == "json" else msg.msg
    return f"{stamp} mx1 repeld[{msg.procid}]: {body}"


def _check(tally: Tally, messages: list[tuple[str, dict[str, str]]]) -> None:
    """The report's counts are the counts of the events (name, fields) repeld sent."""

    def named(event: str) -> list[dict[str, str]]:
        return [fields for name, fields in messages if name == event]

    assert tally.early == {"drop": 3}
    assert tally.hangups == {"close": 2}
    assert tally.passes == {"delay": 2}
    assert tally.events["backend-error"] == 2
    assert tally.repelled == 5 and tally.judged == 7

    def seconds(event: str, slack: float = 0.0) -> Counter[int]:
        return Counter(int(float(f["elapsed"]) + slack) for f in named(event))

    assert tally.early_secs == seconds("early-talker")
    assert tally.hangup_secs == seconds("hangup")
    assert tally.patient_secs == seconds("pass", 0.001)
    assert max(tally.early_secs | tally.hangup_secs) < DELAY
    assert min(tally.patient_secs) >= DELAY
    assert tally.delays_seen() == [3]
    assert tally.curve("early", "hangup")[0] == 5
    # Every candidate delay is longer than every early talk and hang-up, and than the
    # 3 s the patient clients were seen to wait: 5 repelled, 2 unknown.
    for delay in (10, 40):
        what = tally.what_if(delay)
        assert (what.repelled, what.passed, what.unknown) == (5, 0, 2)
    assert tally.networks.counts == {"127.0.0.0/24": 3} and tally.networks.exact


@pytest.mark.parametrize("fmt", ["rfc5424", "json"])
def test_report_counts_a_real_run(fmt: str, tmp_path: Path) -> None:
    received, raw, stderr = _run(fmt, tmp_path)
    assert {m.format for m in received} == {fmt}
    messages = [(m.event, m.fields) for m in received]
    year = time.localtime().tm_year

    lines = [r.decode() for r in raw] + ["a line from another program\n"]
    tally = tally_lines(lines, year)
    _check(tally, messages)
    assert tally.skipped == 1
    assert tally.lines == len(messages) + 1

    traditional = [_traditional(r, m) for r, m in zip(raw, received, strict=True)]
    _check(tally_lines(traditional, year), messages)

    events_on_stderr = [line for line in stderr if not line.startswith("repeld:")]
    from_stderr = tally_lines(events_on_stderr, year)
    _check(from_stderr, messages)
    assert from_stderr.first is None and not from_stderr.buckets  # -f lines carry no date

    # The command itself, on a file written as the receiver got the datagrams.
    log = tmp_path / "repeld.log"
    log.write_bytes(b"\n".join(raw) + b"\n")
    svg = tmp_path / "report.svg"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p
        ),
    }
    done = subprocess.run(
        [sys.executable, "-m", "repeld", "report", str(log), "--svg", str(svg)],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "  early-talker        3  (drop 3)" in done.stdout
    assert "  hangup              2  (close 2)" in done.stdout
    assert "  repelled            5   71.4%" in done.stdout
    assert "delay in force: 3 s" in done.stdout
    assert svg.read_text().startswith("<?xml")


JOURNAL_REMOTE = next(
    (
        path
        for path in (
            "/lib/systemd/systemd-journal-remote",
            "/usr/lib/systemd/systemd-journal-remote",
        )
        if os.access(path, os.X_OK)
    ),
    None,
)


@pytest.mark.skipif(
    JOURNAL_REMOTE is None or shutil.which("journalctl") is None,
    reason="needs journalctl and systemd-journal-remote",
)
def test_report_reads_each_short_format_of_journalctl(tmp_path: Path) -> None:
    """Under systemd repeld's -f lines go to the journal: `journalctl -u repeld -o
    FORMAT | repeld report` must read what journalctl prints in each short format.
    The journal file is written by systemd-journal-remote from repeld's real lines,
    with the fields journald gives a service's standard error."""
    received, _, stderr = _run("json", tmp_path)
    messages = [(m.event, m.fields) for m in received]
    events_on_stderr = [line for line in stderr if not line.startswith("repeld:")]
    start = int(time.time() * 1_000_000)
    entries = []
    for i, line in enumerate(events_on_stderr):
        entries.append(
            f"__REALTIME_TIMESTAMP={start + i * 1000}\n__MONOTONIC_TIMESTAMP={1000 + i}\n"
            "_BOOT_ID=0123456789abcdef0123456789abcdef\n_HOSTNAME=mx1\n_PID=4242\n"
            f"SYSLOG_IDENTIFIER=repeld\n_SYSTEMD_UNIT=repeld.service\nMESSAGE={line}\n\n"
        )
    export = tmp_path / "repeld.export"
    export.write_text("".join(entries))
    journal = tmp_path / "repeld.journal"
    assert JOURNAL_REMOTE is not None
    subprocess.run(
        [JOURNAL_REMOTE, f"--output={journal}", str(export)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    formats = ["short", "short-precise", "short-iso", "short-iso-precise", "short-full"]
    formats += ["short-unix"]
    # Each in this process's own time zone, which the report reads a time without
    # one in; and short-full where the zone has no abbreviation but an offset
    # (Dubai's "+04"), which is read as such.
    for fmt, zone in [(f, None) for f in formats] + [("short-full", "Asia/Dubai")]:
        env = dict(os.environ) if zone is None else {**os.environ, "TZ": zone}
        printed = subprocess.run(
            ["journalctl", "--file", str(journal), "-o", fmt, "--no-pager"],
            check=True, capture_output=True, text=True, timeout=60, env=env,
        ).stdout.splitlines()  # fmt: skip
        assert len(printed) == len(events_on_stderr), printed
        tally = tally_lines(printed, time.localtime(start / 1e6).tm_year)
        _check(tally, messages)
        assert tally.skipped == 0
        assert tally.first is not None  # the time of each line was read
        assert abs(tally.first - start / 1e6) < 1.0, (fmt, zone, printed[0])


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not rsyslog_fixture.available(), reason="needs rsyslogd and root")
@pytest.mark.parametrize("fmt", ["rfc5424", "json"])
def test_report_reads_what_a_real_rsyslogd_wrote_from_udp(fmt: str, tmp_path: Path) -> None:
    """`--syslog udp://` to a central rsyslogd: its default (RSYSLOG_FileFormat) and
    traditional file templates, which drop RFC 5424's structured data and write the
    tag of an RFC 5424 message with no colon (`repeld[PID] PREGREET ...`)."""
    port = _free_udp_port()
    work = tmp_path / "rsyslog"
    work.mkdir()
    rs = Rsyslogd(work, udp_port=port)
    rs.start()
    try:
        # imudp binds as rsyslogd starts: a probe shows that it listens.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            assert wait_for(
                lambda: (
                    probe.sendto(b"<13>Nov 30 00:25:05 probe: listening", ("127.0.0.1", port)) > 0
                    and any("probe" in line for line in rs.lines(rs.file_log))
                ),
                TIMEOUT,
                interval=0.2,
            )
        _run_mix(fmt, f"udp://127.0.0.1:{port}", tmp_path)
        stop = '"event":"stop"' if fmt == "json" else " STOP "
        assert rs.wait_lines(rs.trad_log, stop, 1) and rs.wait_lines(rs.file_log, stop, 1)
    finally:
        rs.stop()
    # What rsyslog itself parsed out of each message is what repeld sent.
    sent = []
    for parsed in rs.parsed():
        fields = parsed.fields.get("rfc5424-sd", {}).get("mx@99999") or parsed.fields
        if parsed.program == "repeld" and "event" in fields:
            sent.append((fields["event"], {k: str(v) for k, v in fields.items()}))
    assert len(sent) >= len(MIX) + 2
    year = time.localtime().tm_year
    for path in (rs.file_log, rs.trad_log):
        lines = rs.lines(path)
        if fmt == "rfc5424":  # the shape this is about
            assert any(re.search(r" repeld\[\d+\] PREGREET \d+ after ", line) for line in lines)
            assert not any("[mx@99999 " in line for line in lines)
        else:
            assert any(re.search(r" repeld\[\d+\]: @cee:\{", line) for line in lines)
        tally = tally_lines(lines, year)
        _check(tally, sent)
        assert tally.skipped == sum("probe" in line for line in lines)  # only the probes
        assert tally.first is not None  # the files' timestamps are read


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    """`repeld report ... | head`: the report meets a pipe nobody reads any more."""
    log = tmp_path / "mail.log"
    with log.open("w") as out:
        for i in range(6000):  # early talkers from 6000 networks: some 300 KB of report
            client = f"10.{i // 256}.{i % 256}.1"
            out.write(
                f"Dec  6 10:00:00 mx1 repeld[1]: PREGREET 4 after 0.100 from [{client}]:1:"
                " EHLO (action=drop)\n"
            )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    reader, writer = os.pipe()
    os.close(reader)  # as `| head -0` would, before a byte is written
    try:
        done = subprocess.run(
            [sys.executable, "-m", "repeld", "report", "--top", "6000", str(log)],
            stdout=writer, stderr=subprocess.PIPE, env=env, timeout=60, check=False,
        )  # fmt: skip
    finally:
        os.close(writer)
    assert done.returncode == 1
    assert done.stderr == b""

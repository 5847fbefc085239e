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
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from repeld.report.main import tally_lines
from repeld.report.tally import Tally

from ..procs import TIMEOUT, SyslogUDP, daemon, free_port
from ..syslog_receiver import Received

ROOT = Path(__file__).resolve().parents[2]
DELAY = 3.0
USER = ["--user", "nobody"] if os.geteuid() == 0 else []


def _early(address: tuple[str, int], after: float) -> None:
    with socket.create_connection(address, timeout=TIMEOUT) as c:
        time.sleep(after)
        c.sendall(b"EHLO bot.example\r\n")
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
MIX: list[tuple[Callable[[tuple[str, int], float], None], float]] = [
    (_early, 0.0),
    (_early, 0.0),
    (_early, 1.0),
    (_hangup, 0.5),
    (_hangup, 1.5),
    (_patient, 0.0),
    (_patient, 0.0),
]


def _run(fmt: str, tmp_path: Path) -> tuple[list[Received], list[bytes], list[str]]:
    """The messages, raw datagrams and stderr lines of one run with the client mix."""
    config = tmp_path / "repeld.toml"
    config.write_text("")
    syslog = SyslogUDP()
    try:
        with daemon(
            "--config", str(config), *USER,
            "--listen", "127.0.0.1:0",
            "--backend", f"127.0.0.1:{free_port()}",
            "--delay", str(DELAY),
            "--syslog", syslog.target,
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
            syslog.wait_for("early-talker", 3)
            syslog.wait_for("hangup", 2)
            syslog.wait_for("backend-error", 2)

        syslog.drain()
        return list(syslog.messages), list(syslog.raw), list(rd.lines)
    finally:
        syslog.close()


def _traditional(raw: bytes, msg: Received) -> str:
    """The line rsyslog's RSYSLOG_TraditionalFileFormat writes for one message."""
    stamp = time.strftime("%b %e %H:%M:%S")
    # The @cee: part survives whole; the RFC 5424 structured data does not.
    body = raw.decode().split("]: ", 1)[1] if msg.format == "json" else msg.msg
    return f"{stamp} mx1 repeld[{msg.procid}]: {body}"


def _check(tally: Tally, messages: list[Received]) -> None:
    """The report's counts are the events' counts."""

    def named(event: str) -> list[Received]:
        return [m for m in messages if m.event == event]

    assert tally.early == {"drop": 3}
    assert tally.hangups == {"close": 2}
    assert tally.passes == {"delay": 2}
    assert tally.events["backend-error"] == 2
    assert tally.repelled == 5 and tally.judged == 7
    assert sorted(tally.early_times) == sorted(
        float(m.fields["elapsed"]) for m in named("early-talker")
    )
    assert sorted(tally.hangup_times) == sorted(float(m.fields["elapsed"]) for m in named("hangup"))
    assert sorted(tally.waits) == sorted(float(m.fields["elapsed"]) for m in named("pass"))
    assert all(t < DELAY for t in tally.early_times + tally.hangup_times)
    assert all(w >= DELAY for w in tally.waits)
    assert tally.delays_seen() == [3]
    assert tally.curve(tally.early_times + tally.hangup_times)[0] == 5
    # Every candidate delay is longer than every early talk and hang-up, and than the
    # 3 s the patient clients were seen to wait: 5 repelled, 2 unknown.
    for delay in (10, 40):
        what = tally.what_if(delay)
        assert (what.repelled, what.passed, what.unknown) == (5, 0, 2)
    assert tally.networks == {"127.0.0.0/24": 3}


@pytest.mark.parametrize("fmt", ["rfc5424", "json"])
def test_report_counts_a_real_run(fmt: str, tmp_path: Path) -> None:
    messages, raw, stderr = _run(fmt, tmp_path)
    assert {m.format for m in messages} == {fmt}
    year = time.localtime().tm_year

    lines = [r.decode() for r in raw] + ["a line from another program\n"]
    tally = tally_lines(lines, year)
    _check(tally, messages)
    assert tally.skipped == 1
    assert tally.lines == len(messages) + 1

    traditional = [_traditional(r, m) for r, m in zip(raw, messages, strict=True)]
    _check(tally_lines(traditional, year), messages)

    events_on_stderr = [line for line in stderr if not line.startswith("repeld:")]
    from_stderr = tally_lines(events_on_stderr, year)
    _check(from_stderr, messages)
    assert from_stderr.timeline == []  # -f lines carry no date

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

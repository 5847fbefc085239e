"""repeld's events through a real rsyslogd into files, read by the real fail2ban-regex.

One private rsyslogd (tests/rsyslog_fixture.py) takes two real repeld runs on its
Debian-default imuxsock input and on one with `UseSpecialParser="off"`:

* `--log-format auto` (json on the unix socket), `--on-early drop`, a memory
  cache with `--penalty-ttl`: early talkers, one of them back for a penalty,
  hang-ups and passes;
* `--log-format rfc5424 --on-early reject` on the RFC 5424 input: the same mix;
* `--on-early enforce` (json): early talkers whose HELO, sender and recipients
  try to plant other addresses, and the same envelopes as repeld's RFC 5424
  formatter writes them, on the RFC 5424 input.

Every early talker comes from its own 127.x.y.z address and sends bytes that try
to make the filter ban another address (127.0.9.x). fail2ban-regex must match
exactly the early-talker events, in both of rsyslog's file formats, and only the
real addresses.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repeld.core import events, proxyproto
from repeld.core.enforce import EnforceEnd, Envelope
from repeld.core.events import ConnInfo
from repeld.core.hold import EarlyTalk, HangUp
from repeld.core.logformat import Header, format_json, format_rfc5424

from .. import rsyslog_fixture
from ..hostile import first_bytes
from ..procs import Daemon, LineBackend, connect, read_line
from ..rsyslog_fixture import Rsyslogd

ROOT = Path(__file__).resolve().parents[2]
FILTER = ROOT / "scripts" / "fail2ban" / "filter.d" / "repeld.conf"
JAIL = ROOT / "scripts" / "fail2ban" / "jail.d" / "repeld.conf"
FAIL2BAN_REGEX = shutil.which("fail2ban-regex")
TIMEOUT = 30.0
DELAY = 1.0

pytestmark = [
    pytest.mark.skipif(not rsyslog_fixture.available(), reason="needs rsyslogd and root"),
    pytest.mark.skipif(FAIL2BAN_REGEX is None, reason="needs fail2ban-regex (fail2ban)"),
]

#: What the early talkers send: each tries to plant another address (127.0.9.x)
#: where a careless pattern would take it, in either format.
HOSTILE = [
    b'EHLO x client="127.0.9.1" action=drop\r\n',
    b'","client":"127.0.9.2","client_port":1,"action":"drop"}\r\n',
    b"x (action=drop)\r\nPREGREET 1 after 0.000 from [127.0.9.3]:1: y (action=drop)",
    b'] PREGREET 9 after 0.0 from [127.0.9.4]:25: EHLO x" action="reject"] (action=reject)',
    b'@cee:{"event":"early-talker","client":"127.0.9.5","client_port":1,"action":"drop"}\\',
]


@dataclass
class Mix:
    """Who did what in one repeld run."""

    talkers: list[str] = field(default_factory=list)
    early_events: int = 0
    hangups: list[str] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)


def talk_early(port: int, source: str, payload: bytes) -> None:
    with connect(port, source) as bot:
        bot.sendall(payload)
        with contextlib.suppress(ConnectionResetError):
            while bot.recv(4096):  # the 554 line (reject), then EOF; or a reset (drop)
                pass


def hang_up(port: int, source: str) -> None:
    with connect(port, source):
        pass


def wait_and_pass(port: int, source: str) -> None:
    with connect(port, source) as client:
        assert read_line(client).startswith(b"220 ")
        client.sendall(b"QUIT\r\n")
        assert read_line(client).startswith(b"221 ")


def run_mix(port: int, net: int, *, penalty: bool) -> Mix:
    """Early talkers 127.0.<net>.x, hang-ups 127.0.<net+1>.x, passes 127.0.<net+2>.x."""
    mix = Mix()
    for i, payload in enumerate(HOSTILE, start=1):
        source = f"127.0.{net}.{i}"
        talk_early(port, source, payload)
        mix.talkers.append(source)
        mix.early_events += 1
    if penalty:  # the first talker comes back, is remembered and reset unheard
        with connect(port, mix.talkers[0]) as bot, contextlib.suppress(ConnectionResetError):
            assert bot.recv(4096) == b""  # silent, and cut off before the delay
        mix.early_events += 1
    for i in (1, 2):
        hang_up(port, f"127.0.{net + 1}.{i}")
        mix.hangups.append(f"127.0.{net + 1}.{i}")
    for i in (1, 2):
        wait_and_pass(port, f"127.0.{net + 2}.{i}")
        mix.passes.append(f"127.0.{net + 2}.{i}")
    return mix


#: An RFC 5424 early talker sent to Debian's stock input, which cannot parse it.
UNPARSED = "127.0.20.1"


def send_rfc5424_to_the_stock_input(path: Path) -> None:
    """repeld's exact RFC 5424 bytes for an early talker, on the special-parser input."""
    event = events.early_talker(
        ConnInfo(UNPARSED, 4000, "127.0.0.1", 25), EarlyTalk(6, b"EHLO\r\n", 0.1), "drop"
    )
    header = Header(2, "mx1.test", "repeld", 4242, "repeld@32473", local=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(str(path))
        sock.send(format_rfc5424(event, header, 1700000000.25))


#: Observe mode (--on-early log, being added): an early talker that was let through,
#: whose bytes claim action=drop; written as repeld's formatters write it.
OBSERVED = ("127.0.21.1", "127.0.21.2")


def send_observe_mode_events(json_socket: Path, rfc5424_socket: Path) -> None:
    payload = b'x","action":"drop"} (action=drop)\r\n'
    header = Header(2, "mx1.test", "repeld", 4243, "repeld@32473", local=True)
    for client, path, fmt in zip(
        OBSERVED, (json_socket, rfc5424_socket), (format_json, format_rfc5424), strict=True
    ):
        event = events.early_talker(
            ConnInfo(client, 4000, "127.0.0.1", 25), EarlyTalk(len(payload), payload, 0.1), "log"
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(str(path))
            sock.send(fmt(event, header, 1700000000.25))


#: --on-early enforce: what the talkers say, all before the greeting; each line
#: tries to plant another address (127.0.9.1x) in helo, sender or recipients.
HOSTILE_ENVELOPES = [
    b'HELO x" action="drop"] client="127.0.9.11" (action=drop)\r\nQUIT\r\n',
    b'EHLO y\r\nMAIL FROM:<","client":"127.0.9.12","client_port":1,"action":"drop"}>\r\nQUIT\r\n',
    b"EHLO z\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@[127.0.9.13]> (action=drop)\r\n"
    b"RCPT TO:<PREGREET 1 after 0.000 from [127.0.9.14]:1: q (action=drop)>\r\nQUIT\r\n",
]
#: The same envelopes, as repeld's RFC 5424 formatter writes them, from these clients.
ENFORCED_5424 = ("127.0.22.1", "127.0.22.2")


def run_enforce(port: int) -> list[str]:
    """Enforced talkers 127.0.31.x, all held at once; their addresses."""
    talkers = []
    with contextlib.ExitStack() as stack:
        bots = []
        for i, payload in enumerate(HOSTILE_ENVELOPES, start=1):
            bot = stack.enter_context(connect(port, f"127.0.31.{i}"))
            bot.sendall(payload)
            bots.append(bot)
            talkers.append(f"127.0.31.{i}")
        for bot in bots:
            while bot.recv(4096):  # greeted, answered, 221, closed
                pass
    return talkers


def send_enforce_events(rfc5424_socket: Path) -> None:
    header = Header(2, "mx1.test", "repeld", 4244, "repeld@32473", local=True)
    envelope = Envelope(
        b'x" action="drop"] client="127.0.9.15" (action=drop)',
        b'<a@b.example","client":"127.0.9.16"}>',
        (b"<c@[127.0.9.17]>", b"(action=drop)"),
        5,
    )
    for client in ENFORCED_5424:
        event = events.early_talker(
            ConnInfo(client, 4000, "127.0.0.1", 25),
            EarlyTalk(6, b"EHLO\r\n", 0.1),
            "enforce",
            enforced=(envelope, EnforceEnd.QUIT),
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(str(rfc5424_socket))
            sock.send(format_rfc5424(event, header, 1700000000.25))


@dataclass
class Runs:
    rsyslog: Rsyslogd
    json: Mix
    rfc5424: Mix
    enforced: list[str] = field(default_factory=list)
    behind: list[str] = field(default_factory=list)


#: A --proxy-from balancer of our own: it connects from here and writes PROXY headers.
BALANCER = "127.0.0.50"


def run_behind_balancer(port: int) -> list[str]:
    """Two early talkers through the balancer (the header names them), and one
    header-less balancer connection (a proxy-error): only the talkers may be banned."""
    talkers = ["127.0.24.1", "127.0.24.2"]
    for client in talkers:
        with connect(port, BALANCER) as sock:
            sock.sendall(proxyproto.v2(client, 4000, "127.0.0.1", 25) + b"EHLO bot\r\n")
            with contextlib.suppress(ConnectionResetError):
                sock.recv(4096)
    with connect(port, BALANCER) as sock:
        sock.sendall(b"EHLO balancer.example\r\n")
        with contextlib.suppress(ConnectionResetError):
            sock.recv(4096)
    return talkers


@contextlib.contextmanager
def repeld(*args: str) -> Iterator[Daemon]:
    d = Daemon(["--user", "root", "--listen", "127.0.0.1:0", "--delay", str(DELAY), *args])
    try:
        d.wait_listening()
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    rs = Rsyslogd(tmp_path_factory.mktemp("rsyslog"))
    backend = LineBackend()
    rs.start()
    try:
        send_rfc5424_to_the_stock_input(rs.socket)
        send_observe_mode_events(rs.socket, rs.socket5424)
        send_enforce_events(rs.socket5424)
        with repeld(
            "--backend", backend.address,
            "--syslog", str(rs.socket),
            "--on-early", "drop",
            "--cache", "memory",
            "--penalty-ttl", "600",
        ) as rd:  # fmt: skip
            json_mix = run_mix(rd.address[1], 1, penalty=True)
        assert rs.wait_lines(rs.file_log, '"event":"stop"', 1), rs.lines(rs.file_log)
        with repeld(
            "--backend", backend.address,
            "--syslog", str(rs.socket5424),
            "--log-format", "rfc5424",
            "--on-early", "reject",
        ) as rd:  # fmt: skip
            rfc_mix = run_mix(rd.address[1], 11, penalty=False)
        assert rs.wait_lines(rs.file_log, "] STOP ", 1), rs.lines(rs.file_log)
        with repeld(
            "--backend", backend.address,
            "--syslog", str(rs.socket),
            "--on-early", "enforce",
        ) as rd:  # fmt: skip
            enforced = run_enforce(rd.address[1])
        assert rs.wait_lines(rs.file_log, '"event":"stop"', 2), rs.lines(rs.file_log)
        with repeld(
            "--backend", backend.address,
            "--syslog", str(rs.socket),
            "--proxy-from", f"{BALANCER}/32",
        ) as rd:  # fmt: skip
            behind = run_behind_balancer(rd.address[1])
        assert rs.wait_lines(rs.file_log, '"event":"stop"', 3), rs.lines(rs.file_log)
        yield Runs(rs, json_mix, rfc_mix, [*enforced, *ENFORCED_5424], behind)
    finally:
        rs.stop()
        backend.close()


def fail2ban_matches(log: Path) -> list[str]:
    """The address of every line fail2ban-regex matches with the shipped filter."""
    assert FAIL2BAN_REGEX is not None
    done = subprocess.run(
        [FAIL2BAN_REGEX, "--out", "ip", str(log), str(FILTER)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.parametrize("which", ["file_log", "trad_log"])
def test_fail2ban_matches_exactly_the_early_talkers(runs: Runs, which: str) -> None:
    log = getattr(runs.rsyslog, which)
    text = log.read_text()
    # the run's events are all there, hang-ups and passes included
    for addr in [*runs.json.hangups, *runs.rfc5424.hangups]:
        assert f"[{addr}]:" in text or f'"client":"{addr}"' in text
    for addr in [*runs.json.passes, *runs.rfc5424.passes]:
        assert f"PASS DELAY [{addr}]:" in text
    for addr in OBSERVED:  # action=log: there, and never matched
        assert f"[{addr}]:4000: " in text
    for addr in runs.enforced:  # action=enforce: there, with its envelope
        assert f'"client":"{addr}"' in text or f"[{addr}]:4000: " in text
    matched = fail2ban_matches(log)
    talkers = runs.json.talkers + runs.rfc5424.talkers + runs.enforced + runs.behind
    early = runs.json.early_events + runs.rfc5424.early_events
    assert len(matched) == early + len(runs.enforced) + len(runs.behind)
    # behind a balancer: the clients its header named, never the balancer itself
    assert '"event":"proxy-error"' in text or "PROXY-ERROR" in text
    assert BALANCER not in matched
    assert set(matched) == set(talkers)
    assert matched.count(runs.json.talkers[0]) == 2  # the drop, then the penalty
    assert not any(addr.startswith("127.0.9.") for addr in matched)


def test_the_mail_log_has_both_formats_as_rsyslog_wrote_them(runs: Runs) -> None:
    lines = runs.rsyslog.lines(runs.rsyslog.file_log)
    json_lines = [
        line
        for line in lines
        if ']: @cee:{"event":"early-talker"' in line
        and '"action":"log"' not in line
        and '"action":"enforce"' not in line
        and '"via":' not in line  # the run behind a balancer
    ]
    # (an RFC 5424 summary shows the fifth payload's fake @cee: text as is)
    rfc_lines = [
        line
        for line in lines
        if re.search(r" repeld\[\d+\] PREGREET ", line)
        and not line.endswith(("(action=log)", "(action=enforce)"))
    ]
    assert len(json_lines) == runs.json.early_events
    assert len(rfc_lines) == runs.rfc5424.early_events
    # Debian 12's RFC 3339 timestamps; the json program tag with its colon,
    # the parsed RFC 5424 one without
    assert all(line[:4].isdigit() and line[4] == "-" for line in json_lines + rfc_lines)
    assert all(" repeld[" in line and "]: @cee:{" in line for line in json_lines)
    assert all(line.endswith("(action=reject)") for line in rfc_lines)


def test_the_jail_is_shipped_disabled_with_the_filter_it_names() -> None:
    text = JAIL.read_text()
    assert "[repeld]" in text
    assert "enabled  = false" in text
    assert "filter   = repeld" in text
    assert FILTER.name == "repeld.conf"


def test_rsyslog_parses_the_default_format_on_its_stock_input(runs: Runs) -> None:
    """auto is json on the socket: mmjsonparse gives every field as a property."""
    parsed = [p for p in runs.rsyslog.parsed() if p.fields.get("event") == "early-talker"]
    by_client = {p.fields["client"]: p for p in parsed if p.program == "repeld"}
    assert set(runs.json.talkers) <= set(by_client)
    first = by_client[runs.json.talkers[1]]
    assert first.fields["action"] == "drop"
    assert first.fields["first"] == '","client":"127.0.9.2","client_port":1,"action":"drop"}\\r\\n'
    assert isinstance(first.fields["client_port"], int)
    assert first.fields["msg"].startswith(f"PREGREET {len(HOSTILE[1])} after ")
    enforced = [by_client[addr].fields for addr in runs.enforced[:3]]
    assert [e["action"] for e in enforced] == ["enforce"] * 3
    assert enforced[0]["helo"] == 'x" action="drop"] client="127.0.9.11" (action=drop)'
    assert enforced[1]["sender"] == '<","client":"127.0.9.12","client_port":1,"action":"drop"}>'
    assert enforced[2]["recipients"] == (
        "<c@[127.0.9.13]>,<PREGREET 1 after 0.000 from [127.0.9.14]:1: q (action=drop)>"
    )
    assert all(e["end"] == "quit" for e in enforced)


def test_rsyslog_parses_rfc5424_with_the_special_parser_off(runs: Runs) -> None:
    """On the UseSpecialParser="off" input, mmpstrucdata gives the structured data."""
    parsed = [p for p in runs.rsyslog.parsed() if p.msgid == "early-talker"]
    assert all(p.program == "repeld" for p in parsed)
    sd = {p.fields["rfc5424-sd"]["repeld@32473"]["client"]: p for p in parsed}
    assert set(sd) == {*runs.rfc5424.talkers, OBSERVED[1], *ENFORCED_5424}
    enforced = sd[ENFORCED_5424[0]].fields["rfc5424-sd"]["repeld@32473"]
    assert enforced["action"] == "enforce"
    assert enforced["helo"] == 'x" action="drop"] client="127.0.9.15" (action=drop)'
    assert enforced["sender"] == '<a@b.example","client":"127.0.9.16"}>'
    assert enforced["recipients"] == "<c@[127.0.9.17]>,(action=drop)"
    assert enforced["end"] == "quit"
    assert sd[OBSERVED[1]].fields["rfc5424-sd"]["repeld@32473"]["action"] == "log"
    talker = sd[runs.rfc5424.talkers[3]]
    fields = talker.fields["rfc5424-sd"]["repeld@32473"]
    assert fields["event"] == "early-talker"
    assert fields["action"] == "reject"
    assert fields["first"] == (
        '] PREGREET 9 after 0.0 from [127.0.9.4]:25: EHLO x" action="reject"] (action=reject)'
    )
    assert talker.fields["msg"].endswith("(action=reject)")


def test_rfc5424_on_the_stock_input_arrives_unparsed_and_is_not_banned(runs: Runs) -> None:
    """Why auto exists: Debian's stock imuxsock makes the program name "1"."""
    (unparsed,) = [p for p in runs.rsyslog.parsed() if UNPARSED in p.fields.get("msg", "")]
    assert unparsed.program == "1"
    assert unparsed.msgid == "-"
    assert "rfc5424-sd" not in unparsed.fields
    assert "event" not in unparsed.fields
    assert UNPARSED not in fail2ban_matches(runs.rsyslog.file_log)


def test_a_restarted_rsyslogd_costs_no_event(tmp_path: Path) -> None:
    """rsyslogd stopped and started again mid-run: every event reaches the file."""
    rs = Rsyslogd(tmp_path)
    backend = LineBackend()
    rs.start()
    try:
        with repeld("--backend", backend.address, "--syslog", str(rs.socket)) as rd:
            port = rd.address[1]
            talk_early(port, "127.0.30.1", b"EHLO before\r\n")
            assert rs.wait_lines(rs.file_log, '"client":"127.0.30.1"', 1)
            rs.stop()
            talk_early(port, "127.0.30.2", b"EHLO during\r\n")  # meets the closed socket
            rs.start()
            talk_early(port, "127.0.30.3", b"EHLO after\r\n")
            # held, then sent once repeld tries again (every 2 s)
            assert rs.wait_lines(rs.file_log, '"client":"127.0.30.3"', 1)
        assert rs.wait_lines(rs.file_log, '"event":"stop"', 1)
        text = rs.file_log.read_text()
        for addr in ("127.0.30.1", "127.0.30.2", "127.0.30.3"):
            assert f'"client":"{addr}"' in text
        assert '"dropped_events":0' in text
        assert set(fail2ban_matches(rs.file_log)) == {"127.0.30.1", "127.0.30.2", "127.0.30.3"}
    finally:
        rs.stop()
        backend.close()


def _as_rsyslog_writes(event: events.Event, fmt: str, when: float, traditional: bool) -> str:
    """One event as rsyslog writes it to a file, from repeld's exact bytes: the JSON
    message whole after `repeld[PID]: `, the RFC 5424 one as its summary after
    `repeld[PID] ` (the structured data dropped, no colon)."""
    header = Header(2, "mx1.test", "repeld", 4242, "repeld@32473")
    if traditional:
        stamp = time.strftime("%b %e %H:%M:%S", time.localtime(when))
    else:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(when))
    if fmt == "json":
        body = format_json(event, header, when).decode().split("]: ", 1)[1]
        return f"{stamp} mx1 repeld[4242]: {body}"
    return f"{stamp} mx1 repeld[4242] {event.summary}"


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    talkers=st.lists(
        st.tuples(first_bytes, st.sampled_from(["drop", "reject", "log"])),
        min_size=1,
        max_size=24,
    ),
    traditional=st.booleans(),
)
def test_no_client_bytes_make_fail2ban_see_another_address(
    talkers: list[tuple[bytes, str]], traditional: bool
) -> None:
    """Early talkers from 127.0.40.x sending hostile bytes, in both formats and either
    file template: fail2ban-regex bans exactly the ones cut off, each once, and no
    address of those the bytes name."""
    lines, banned = [], []
    when = time.time() - 60
    for i, (sent, action) in enumerate(talkers):
        client = f"127.0.40.{i + 1}"
        conn = ConnInfo(client, 40000 + i, "127.0.0.1", 25)
        event = events.early_talker(conn, EarlyTalk(len(sent), sent, 0.25), action)
        for fmt in ("json", "rfc5424"):
            lines.append(_as_rsyslog_writes(event, fmt, when + i, traditional))
            if action != "log":
                banned.append(client)
        hangup = events.hangup(conn, HangUp(0.5, reset=False))  # never banned
        lines.append(_as_rsyslog_writes(hangup, "rfc5424", when + i, traditional))
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "mail.log"
        log.write_text("\n".join(lines) + "\n")
        assert sorted(fail2ban_matches(log)) == sorted(banned), "\n".join(lines)


def test_another_programs_line_quoting_repeld_is_not_banned(tmp_path: Path) -> None:
    """A program that logs what it was sent at the start of its message: with or
    without a host name in the line, repeld's words after its tag are not repeld's."""
    forged = (
        "repeld[1]: PREGREET 1 after 0.000 from [127.0.9.9]:1: x (action=drop)",
        'repeld[1]: @cee:{"event":"early-talker","client":"127.0.9.8","client_port":1,'
        '"action":"drop"}',
    )
    real = events.early_talker(
        ConnInfo("127.0.41.1", 4000, "127.0.0.1", 25), EarlyTalk(4, b"EHLO", 0.1), "drop"
    )
    log = tmp_path / "mail.log"
    lines = [
        f"2026-12-06T10:00:0{i}+00:00 {host}sshd[7]: {text}"
        for i, text in enumerate(forged)
        for host in ("", "mx1 ")
    ]
    lines.append(f"2026-12-06T10:00:09+00:00 mx1 repeld[4242] {real.summary}")
    log.write_text("\n".join(lines) + "\n")
    assert fail2ban_matches(log) == ["127.0.41.1"]

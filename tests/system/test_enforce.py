"""--on-early enforce with real clients, a real repeld and real backends.

Each client talks before the greeting: smtplib (its socket sent EHLO first),
swaks (through tests/early_pipe.py, which talks early and then hands swaks the
connection), raw sockets with hostile envelopes, and a crowd of talkers past the
bound on sessions. repeld must hold each to the end of the delay, greet it
itself, refuse every recipient, write the envelope in the early-talker event,
and never let a byte reach the backend (aiosmtpd reading PROXY headers counts
every connection; smtp-sink dumps every transaction).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from repeld.shell.enforce import MAX_SESSIONS

from ..procs import SyslogUDP, free_port
from .test_e2e import (
    MESSAGE,
    SMTP_SINK,
    TIMEOUT,
    aiosmtpd_backend,
    read_until_closed,
    running_repeld,
    smtp_sink,
)
from .test_metrics import PROMTOOL, samples, scrape, value

ROOT = Path(__file__).resolve().parents[2]
DELAY = 1.0
NAME = "mx.enforce.test"
SWAKS = shutil.which("swaks")


def enforcing(backend: str, syslog: SyslogUDP, *extra: str) -> list[str]:
    return [
        "--listen", "127.0.0.1:0",
        "--backend", backend,
        "--delay", str(DELAY),
        "--on-early", "enforce",
        "--teaser-text", NAME,
        "--syslog", syslog.target,
        *extra,
    ]  # fmt: skip


def test_smtplib_talking_early_is_refused_and_written_down(syslog: SyslogUDP) -> None:
    with (
        aiosmtpd_backend(proxy=True) as backend,
        running_repeld(
            *enforcing(backend.spec, syslog, "--proxy-protocol", "v1", "--log-format", "json")
        ) as rd,
    ):
        sock = socket.create_connection(rd.address, TIMEOUT, ("127.0.5.1", 0))
        started = time.monotonic()
        sock.sendall(b"EHLO early.example\r\n")  # before any greeting
        smtp = smtplib.SMTP(local_hostname="client.example", timeout=TIMEOUT)
        smtp.sock = sock
        try:
            assert smtp.getreply() == (220, b"mx.enforce.test ESMTP")
            assert time.monotonic() - started >= DELAY  # held like everyone else
            assert smtp.getreply()[0] == 250  # the early EHLO's answer, in order
            code, _ = smtp.ehlo()
            assert code == 250
            for extension in ("pipelining", "starttls", "auth", "x_pipe_connect", "pipe_connect"):
                assert not smtp.has_extn(extension), extension
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                smtp.sendmail("a@sender.example", ["b@rcpt.example", "c@rcpt.example"], MESSAGE)
            assert refused.value.recipients == {
                "b@rcpt.example": (450, b"4.7.1 Protocol error: try again later"),
                "c@rcpt.example": (450, b"4.7.1 Protocol error: try again later"),
            }
            assert smtp.docmd("DATA")[0] == 554
            assert smtp.noop()[0] == 250
            assert smtp.docmd("VRFY", "root")[0] == 502
            assert smtp.quit()[0] == 221
        finally:
            smtp.close()
        (ev,) = syslog.wait_for("early-talker")
        assert ev.format == "json"
        fields = ev.fields
        assert fields["client"] == "127.0.5.1"
        assert fields["action"] == "enforce"
        assert fields["first"] == "EHLO early.example\\r\\n"
        assert fields["helo"] == "client.example"
        assert fields["sender"] == "<a@sender.example>"
        assert fields["recipients"] == "<b@rcpt.example>,<c@rcpt.example>"
        assert fields["end"] == "quit"
        # EHLO x2, MAIL, RCPT x2, RSET (smtplib's, after the refusal), DATA, NOOP, VRFY, QUIT
        assert fields["commands"] == "10"
        # not even a connection (repeld's own start-up check comes from 127.0.0.1)
        assert [src for src, _ in backend.handler.proxy_sources if src != "127.0.0.1"] == []
        assert backend.handler.deliveries == []
        assert syslog.named("pass") == []


@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
@pytest.mark.skipif(SMTP_SINK is None, reason="Postfix's smtp-sink is not installed")
def test_swaks_talking_early_is_refused_and_written_down(syslog: SyslogUDP) -> None:
    assert SWAKS is not None
    with (
        smtp_sink() as (port, dump),
        running_repeld(*enforcing(f"127.0.0.1:{port}", syslog, "--log-format", "rfc5424")) as rd,
    ):
        pipe = f"{sys.executable} -m tests.early_pipe {rd.address[1]} 127.0.5.2"
        swaks = [
            SWAKS, "--pipe", pipe,
            "--helo", "swaks.example",
            "--from", "s@sender.example",
            "--to", "r@rcpt.example,t@rcpt.example",
            "--timeout", str(int(TIMEOUT)),
        ]  # fmt: skip
        done = subprocess.run(
            swaks,
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 2,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        transcript = done.stdout + done.stderr
        assert done.returncode != 0, transcript  # no recipient was accepted
        assert "<-  220 mx.enforce.test ESMTP" in transcript
        assert "<** 450 4.7.1 Protocol error: try again later" in transcript
        assert "PIPELINING" not in transcript and "STARTTLS" not in transcript
        (ev,) = syslog.wait_for("early-talker")
        assert ev.format == "rfc5424"
        fields = ev.fields
        assert fields["client"] == "127.0.5.2"
        assert fields["action"] == "enforce"
        assert fields["helo"] == "swaks.example"
        assert fields["sender"] == "<s@sender.example>"
        assert fields["recipients"] == "<r@rcpt.example>,<t@rcpt.example>"
        assert fields["end"] == "quit"  # swaks says QUIT after every refusal
        assert not dump.exists()  # smtp-sink never saw a transaction


HOSTILE_HELO = b'x" action="drop"] client="127.0.9.1" (action=drop)'
HOSTILE_SENDER = b'<a@b.example","client":"127.0.9.2","action":"drop"}>'
HOSTILE_RCPT = b"<c@[127.0.9.3]>\r\nPREGREET 1 after 0.000 from [127.0.9.4]:1: y (action=drop)"


def test_hostile_envelopes_stay_inside_their_fields(syslog: SyslogUDP) -> None:
    with (
        aiosmtpd_backend(proxy=False) as backend,
        running_repeld(*enforcing(backend.spec, syslog, "--log-format", "json")) as rd,
    ):
        with socket.create_connection(rd.address, TIMEOUT, ("127.0.5.3", 0)) as bot:
            bot.sendall(
                b"HELO " + HOSTILE_HELO + b"\r\nMAIL FROM:" + HOSTILE_SENDER + b"\r\n"
                b"RCPT TO:" + HOSTILE_RCPT + b"\r\nQUIT\r\n"
            )
            data, how = read_until_closed(bot)
        assert data.startswith(b"220 mx.enforce.test ESMTP\r\n250 mx.enforce.test\r\n")
        assert data.endswith(b"221 2.0.0 Bye\r\n") and how == "eof"
        (ev,) = syslog.wait_for("early-talker")
        assert ev.fields["client"] == "127.0.5.3"
        assert ev.fields["action"] == "enforce"
        assert ev.fields["helo"] == HOSTILE_HELO.decode()
        assert ev.fields["sender"] == HOSTILE_SENDER.decode()
        assert ev.fields["recipients"] == "<c@[127.0.9.3]>"  # the line ended at CRLF
        raw = syslog.raw[-1]
        assert raw.count(b"\n") == 0 and raw.count(b"@cee:") == 1


def test_past_the_bound_on_sessions_talkers_are_dropped(syslog: SyslogUDP) -> None:
    extra = 3
    with (
        aiosmtpd_backend(proxy=True) as backend,
        running_repeld(
            *enforcing(backend.spec, syslog, "--proxy-protocol", "v1", "--delay", "2")
        ) as rd,
        contextlib.ExitStack() as stack,
    ):
        bots = []
        for i in range(MAX_SESSIONS + extra):
            source = f"127.0.{6 + i // 200}.{1 + i % 200}"
            bot = stack.enter_context(socket.create_connection(rd.address, TIMEOUT, (source, 0)))
            bot.sendall(b"HELO crowd\r\n")
            bots.append(bot)
        busy = syslog.wait_for("early-talker", extra)
        assert {e.fields["end"] for e in busy} == {"busy"}
        greeted, dropped = [], 0
        for bot in bots:
            bot.settimeout(TIMEOUT)
            try:
                first = bot.recv(64)
            except ConnectionResetError:
                first = b""
            if first.startswith(b"220 "):
                greeted.append(bot)
            else:
                dropped += 1
        assert (len(greeted), dropped) == (MAX_SESSIONS, extra)
        for bot in greeted:
            bot.sendall(b"QUIT\r\n")
            assert read_until_closed(bot)[0].endswith(b"221 2.0.0 Bye\r\n")
        stack.close()
        ended = syslog.wait_for("early-talker", MAX_SESSIONS + extra)
        ends = sorted(e.fields["end"] for e in ended)
        assert ends == ["busy"] * extra + ["quit"] * MAX_SESSIONS
        assert [src for src, _ in backend.handler.proxy_sources if src != "127.0.0.1"] == []


def test_metrics_count_the_sessions_by_how_they_ended(syslog: SyslogUDP) -> None:
    mport = free_port()
    with (
        aiosmtpd_backend(proxy=False) as backend,
        running_repeld(*enforcing(backend.spec, syslog, "--metrics", f"127.0.0.1:{mport}")) as rd,
    ):
        with socket.create_connection(rd.address, TIMEOUT, ("127.0.5.4", 0)) as bot:
            bot.sendall(b"EHLO x\r\nQUIT\r\n")
            assert read_until_closed(bot)[0].endswith(b"221 2.0.0 Bye\r\n")
        with socket.create_connection(rd.address, TIMEOUT, ("127.0.5.5", 0)) as bot:
            bot.sendall(b"EHLO y\r\n")
            got = b""
            while not got.endswith(b"250 ENHANCEDSTATUSCODES\r\n"):  # in its session now
                got += bot.recv(4096)
            found = samples(scrape(mport))
            assert value(found, "repeld_enforcing") == 1
        syslog.wait_for("early-talker", 2)
        text = scrape(mport)
        found = samples(text)
        assert value(found, "repeld_enforce_sessions_total", end="quit") == 1
        assert value(found, "repeld_enforce_sessions_total", end="close") == 1
        assert value(found, "repeld_early_talkers_total", action="enforce") == 2
        assert value(found, "repeld_enforcing") == 0
        assert ("repeld_enforce_sessions_total", (("end", "busy"),)) in found  # seeded
        if PROMTOOL is not None:
            checked = subprocess.run(
                [PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=30
            )
            assert checked.returncode == 0, checked.stdout + checked.stderr

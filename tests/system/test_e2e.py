"""repeld as a real subprocess between real SMTP peers.

Clients are smtplib and raw sockets; backends are aiosmtpd (PROXY v1/v2 aware),
Postfix's smtp-sink and a private Postfix instance (master + smtpd) in haproxy
mode. Events are read by a real UDP syslog receiver and parsed with
tests/syslog_receiver.parse. Everything is on 127.0.0.0/8 or ::1.

Timing rules: the only timing assertion is a lower bound ("the greeting did not
arrive before the delay"); every wait has a generous upper bound that only
stops a hung test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from repeld.core.hold import FLOOD_LIMIT

from ..postfix_fixture import POSTFIX, _main_cf, is_listening, postfix_instance
from ..procs import Daemon as Repeld
from ..procs import SyslogUDP, free_port, wait_for

#: Short greeting delay for sessions that must get through.
DELAY = 0.5
#: Upper bound for any single wait (a hung peer, not a speed requirement).
TIMEOUT = 30.0

MAIL_FROM = "sender@example.org"
RCPT_TO = "rcpt@example.com"
BODY_LINE = b"hello through repeld, end to end"
MESSAGE = (
    b"From: <sender@example.org>\r\n"
    b"To: <rcpt@example.com>\r\n"
    b"Subject: repeld e2e\r\n"
    b"Message-ID: <e2e.1@client.test>\r\n"
    b"\r\n" + BODY_LINE + b"\r\nsecond line\r\n"
)

SMTP_SINK = shutil.which("smtp-sink") or (
    "/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None
)


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


HAVE_IPV6 = _ipv6_loopback()


#: As root, repeld insists on a user to drop to after binding: a real drop.
#: No pass cache: every run starts from nothing, and nothing is written under /var.
BASE_ARGS = ["--no-cache", *(["--user", "nobody"] if os.geteuid() == 0 else [])]


@contextlib.contextmanager
def running_repeld(*args: str, config_text: str = "") -> Iterator[Repeld]:
    """repeld listening (the bound address in `.address`); stopped and checked after.

    An explicit configuration file (empty unless `config_text`) keeps the run to
    what the test says, whatever /etc holds.
    """
    fd, config = tempfile.mkstemp(prefix="repeld-e2e-", suffix=".toml")
    with os.fdopen(fd, "w") as f:
        f.write(config_text)
    try:
        proc = Repeld(["--config", config, *BASE_ARGS, *args])
        try:
            proc.wait_listening()
            yield proc
        except BaseException:
            proc.stop()
            raise
        status = proc.stop()
    finally:
        os.unlink(config)
    assert not proc.killed, "repeld did not exit on SIGTERM:\n" + proc.stderr_text()
    assert status == 0, f"repeld exited {status}:\n" + proc.stderr_text()
    assert "Traceback" not in proc.stderr_text(), proc.stderr_text()


# -- aiosmtpd as a PROXY-aware backend ------------------------------------------


@dataclass
class Delivery:
    """One message as the aiosmtpd backend saw it."""

    peer: tuple[str, int]
    proxy_version: int | None
    proxy_src: str | None
    proxy_src_port: int | None
    proxy_dst: str | None
    proxy_dst_port: int | None
    mail_from: str
    rcpt_tos: list[str]
    content: bytes


class RecordingHandler:
    """aiosmtpd handler: accepts every PROXY header and records every message."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.proxy_sources: list[tuple[str, int]] = []  # each header's (src, src_port)
        self.delivered = threading.Event()

    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, proxy_data: Any) -> bool:
        self.proxy_sources.append((str(proxy_data.src_addr), int(proxy_data.src_port)))
        return True

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        pd = session.proxy_data
        self.deliveries.append(
            Delivery(
                peer=(str(session.peer[0]), int(session.peer[1])),
                proxy_version=None if pd is None else pd.version,
                proxy_src=None if pd is None else str(pd.src_addr),
                proxy_src_port=None if pd is None else pd.src_port,
                proxy_dst=None if pd is None else str(pd.dst_addr),
                proxy_dst_port=None if pd is None else pd.dst_port,
                mail_from=str(envelope.mail_from),
                rcpt_tos=[str(r) for r in envelope.rcpt_tos],
                content=bytes(envelope.original_content or envelope.content),
            )
        )
        self.delivered.set()
        return "250 2.0.0 Message accepted for delivery"


@dataclass
class AioBackend:
    handler: RecordingHandler
    port: int

    @property
    def spec(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.contextmanager
def aiosmtpd_backend(proxy: bool) -> Iterator[AioBackend]:
    """An aiosmtpd Controller on 127.0.0.1 (reading a PROXY header when `proxy`)."""
    handler = RecordingHandler()
    kwargs: dict[str, Any] = {"server_hostname": "backend.test", "ready_timeout": TIMEOUT}
    if proxy:
        kwargs["proxy_protocol_timeout"] = 10.0
    controller: Any = None
    for _attempt in range(5):  # the free port may be taken between probe and bind
        port = free_port()
        controller = Controller(handler, hostname="127.0.0.1", port=port, **kwargs)
        try:
            controller.start()
        except OSError:
            controller = None
            continue
        break
    assert controller is not None, "could not start aiosmtpd"
    try:
        yield AioBackend(handler, port)
    finally:
        controller.stop()


# -- smtplib client ------------------------------------------------------------


@dataclass
class Session:
    client: tuple[str, int]
    waited: float
    banner: bytes
    refused: dict[str, tuple[int, bytes]]


def deliver(address: tuple[str, int], source: str | None = None) -> Session:
    """Connect with smtplib, time the greeting, send MESSAGE, QUIT."""
    started = time.monotonic()
    smtp = smtplib.SMTP(
        timeout=TIMEOUT,
        local_hostname="client.test",
        source_address=(source, 0) if source else None,
    )
    try:
        code, banner = smtp.connect(address[0], address[1])
        waited = time.monotonic() - started
        assert code == 220, banner
        assert smtp.sock is not None
        host, port = smtp.sock.getsockname()[:2]
        refused = smtp.sendmail(MAIL_FROM, [RCPT_TO], MESSAGE)
        smtp.quit()
    finally:
        smtp.close()
    return Session((str(host), int(port)), waited, banner, refused)


def read_until_closed(sock: socket.socket, timeout: float = TIMEOUT) -> tuple[bytes, str]:
    """Everything the server sends until it closes: (data, "eof" | "reset")."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"connection still open after {timeout}s; got {data!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, "reset"
        except TimeoutError:
            continue
        if not chunk:
            return data, "eof"
        data += chunk


def check_pass_and_relay_end(
    syslog: SyslogUDP, fmt: str, client: tuple[str, int], server: tuple[str, int]
) -> None:
    (passed,) = syslog.wait_for("pass")
    assert passed.format == fmt
    assert passed.facility == 2  # mail
    assert passed.severity == 6  # info
    assert passed.fields["reason"] == "delay"
    assert (passed.fields["client"], int(passed.fields["client_port"])) == client
    assert (passed.fields["server"], int(passed.fields["server_port"])) == server
    assert float(passed.fields["elapsed"]) >= DELAY
    (end,) = syslog.wait_for("relay-end")
    assert end.format == fmt
    assert (end.fields["client"], int(end.fields["client_port"])) == client
    assert end.fields["end"] == "closed"
    assert int(end.fields["bytes_from_client"]) > len(MESSAGE)
    assert int(end.fields["bytes_to_client"]) > 0
    assert float(end.fields["elapsed"]) >= DELAY


# -- a. smtplib -> repeld -> aiosmtpd with PROXY ----------------------------------


@pytest.mark.parametrize(
    ("version", "fmt"), [("v2", "rfc5424"), ("v1", "json")], ids=["v2-rfc5424", "v1-json"]
)
def test_message_reaches_aiosmtpd_with_the_true_client_address(
    syslog: SyslogUDP, version: str, fmt: str
) -> None:
    with aiosmtpd_backend(proxy=True) as backend, running_repeld(
        "--listen", "127.0.0.1:0",
        "--backend", backend.spec,
        "--delay", str(DELAY),
        "--proxy-protocol", version,
        "--syslog", syslog.target,
        "--log-format", fmt,
    ) as rd:  # fmt: skip
        session = deliver(rd.address, source="127.0.0.3")
        assert session.refused == {}
        assert session.waited >= DELAY, "greeted before the delay was over"
        assert b"backend.test" in session.banner  # the 220 is the MTA's own
        assert backend.handler.delivered.wait(TIMEOUT)
        (got,) = backend.handler.deliveries
        # The MTA's TCP peer is repeld; the PROXY header carries the real client.
        assert got.peer[0] == "127.0.0.1"
        assert got.proxy_version == int(version[1])
        assert (got.proxy_src, got.proxy_src_port) == session.client
        assert (got.proxy_dst, got.proxy_dst_port) == rd.address
        assert got.mail_from == MAIL_FROM
        assert got.rcpt_tos == [RCPT_TO]
        assert BODY_LINE in got.content
        assert b"Subject: repeld e2e" in got.content
        # One header for the client (repeld's own backend check brings one more, its own).
        assert backend.handler.proxy_sources.count(session.client) == 1
        check_pass_and_relay_end(syslog, fmt, session.client, rd.address)


# -- b. smtp-sink as a backend (no PROXY) ---------------------------------------------


@contextlib.contextmanager
def smtp_sink() -> Iterator[tuple[int, Path]]:
    """Postfix's smtp-sink on 127.0.0.1:<port>, dumping every transaction to a file."""
    assert SMTP_SINK is not None
    workdir = Path(tempfile.mkdtemp(prefix="repeld-sink-", dir="/tmp"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        workdir.chmod(0o755)
        user: list[str] = []
        if os.geteuid() == 0:  # smtp-sink refuses to keep root privileges
            shutil.chown(workdir, "nobody")
            user = ["-u", "nobody"]
        dump = workdir / "dump"
        port = free_port()
        proc = subprocess.Popen(
            [SMTP_SINK, *user, "-D", str(dump), f"127.0.0.1:{port}", "64"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if not wait_for(lambda: is_listening(port) or proc.poll() is not None, TIMEOUT):
            raise AssertionError("smtp-sink did not start listening")
        assert proc.poll() is None, proc.communicate()[1]
        yield port, dump
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if proc.stderr is not None:
                proc.stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.skipif(SMTP_SINK is None, reason="Postfix's smtp-sink is not installed")
def test_message_reaches_smtp_sink(syslog: SyslogUDP) -> None:
    with smtp_sink() as (port, dump), running_repeld(
        "--listen", "127.0.0.1:0",
        "--backend", f"127.0.0.1:{port}",
        "--delay", str(DELAY),
        "--proxy-protocol", "none",
        "--syslog", syslog.target,
    ) as rd:  # fmt: skip
        session = deliver(rd.address, source="127.0.0.4")
        assert session.refused == {}
        assert session.waited >= DELAY
        assert b"smtp-sink" in session.banner

        def dumped() -> bool:
            return dump.exists() and BODY_LINE in dump.read_bytes()

        assert wait_for(dumped, TIMEOUT), "the message never reached smtp-sink's dump file"
        text = dump.read_bytes()
        assert b"X-Mail-Args: <sender@example.org>" in text
        assert b"X-Rcpt-Args: <rcpt@example.com>" in text
        assert b"Subject: repeld e2e" in text
        # Without PROXY the MTA sees repeld's own address, not the client's.
        assert b"X-Client-Addr: 127.0.0.1\n" in text
        check_pass_and_relay_end(syslog, "rfc5424", session.client, rd.address)


# -- c. a real Postfix smtpd in haproxy mode behind repeld ------------------------------


@pytest.mark.skipif(POSTFIX is None, reason="postfix is not installed")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_message_reaches_real_postfix_in_haproxy_mode(syslog: SyslogUDP, version: str) -> None:
    # The README's recipe: smtpd -o smtpd_upstream_proxy_protocol=haproxy behind
    # repeld with backend/proxy-protocol in repeld.toml (v2 needs Postfix >= 3.5).
    # mynetworks holds only the true client, so relaying works only if smtpd's
    # restrictions see that address rather than repeld's 127.0.0.1.
    with postfix_instance(upstream_proxy="haproxy", mynetworks="127.0.0.5/32") as pf:
        toml = (
            'listen = ["127.0.0.1:0"]\n'
            f'backend = "127.0.0.1:{pf.port}"\n'
            f'proxy-protocol = "{version}"\n'
            f"delay = {DELAY}\n"
            f'syslog = "{syslog.target}"\n'
        )
        with running_repeld(config_text=toml) as rd:
            session = deliver(rd.address, source="127.0.0.5")
            assert session.refused == {}
            assert session.waited >= DELAY
            assert b"postfix-behind-repeld" in session.banner
            ip, port = session.client
            assert ip == "127.0.0.5"
            peer = rf"unknown\[127\.0\.0\.5\]:{port}\b"
            pf.wait_log(rf"postfix/smtpd\[\d+\]: connect from {peer}")
            queue_id = pf.wait_log(rf"postfix/smtpd\[\d+\]: (\w+): client={peer}")[1]
            pf.wait_log(rf"postfix/qmgr\[\d+\]: {queue_id}: from=<{MAIL_FROM}>, .*\(queue active\)")
            pf.wait_log(rf"postfix/discard\[\d+\]: {queue_id}: to=<{RCPT_TO}>, .*status=sent")
            check_pass_and_relay_end(syslog, "rfc5424", session.client, rd.address)

            # Another client, not in mynetworks, is refused relaying by smtpd itself.
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                deliver(rd.address, source="127.0.0.6")
            ((code, reply),) = refused.value.recipients.values()
            assert code == 554 and b"denied" in reply, reply
            pf.wait_log(r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.6\]:\d+: 554")
            log = pf.log_text()
            # smtpd never mistook repeld's own address for a client's: the only
            # session from 127.0.0.1 is repeld's backend check (EHLO, QUIT, no mail).
            own = [line for line in log.splitlines() if "unknown[127.0.0.1]" in line]
            assert all(
                re.search(
                    r"smtpd\[\d+\]: (connect|disconnect) from unknown\[127\.0\.0\.1\]:\d+"
                    r"( ehlo=1 quit=1 commands=2)?$",
                    line,
                )
                for line in own
            ), own
            assert not re.search(r"smtpd\[\d+\]: warning:", log), log


# -- d. early talker (json) and IPv6 -----------------------------------------------------


@pytest.mark.parametrize("action", ["drop", "reject"])
def test_early_talker_over_a_raw_socket_json(syslog: SyslogUDP, action: str) -> None:
    with aiosmtpd_backend(proxy=False) as backend, running_repeld(
        "--listen", "127.0.0.1:0",
        "--backend", backend.spec,
        "--delay", "5",
        "--on-early", action,
        "--syslog", syslog.target,
        "--log-format", "json",
    ) as rd:  # fmt: skip
        with socket.create_connection(rd.address, timeout=TIMEOUT) as bot:
            client = bot.getsockname()[:2]
            bot.sendall(b"EHLO bot.example\r\n")
            data, _how = read_until_closed(bot)
        if action == "drop":
            assert data == b""
        else:
            assert data.startswith(b"554 5.5.1 ") and data.endswith(b"\r\n")
            assert data.count(b"\r\n") == 1
        (ev,) = syslog.wait_for("early-talker")
        assert ev.format == "json"
        assert ev.facility == 2
        assert ev.severity == 4  # warning
        assert ev.fields["client"] == client[0]
        assert int(ev.fields["client_port"]) == client[1]
        assert ev.fields["server"] == rd.address[0]
        assert int(ev.fields["server_port"]) == rd.address[1]
        assert ev.fields["bytes"] == str(len(b"EHLO bot.example\r\n"))
        assert ev.fields["first"] == "EHLO bot.example\\r\\n"
        assert ev.fields["action"] == action
        assert float(ev.fields["elapsed"]) < 5
        assert ev.host  # a network target gets a hostname in the RFC 3164 header
        raw = syslog.raw[-1]
        assert raw.startswith(b"<20>")  # mail.warning
        assert b" repeld[" in raw and b"]: @cee:{" in raw
        assert backend.handler.deliveries == []


def test_an_observed_talker_is_cut_off_when_it_floods(syslog: SyslogUDP) -> None:
    # --on-early log cuts nobody off for talking, but a talker with FLOOD_LIMIT
    # bytes unread is cut off at once, written as a drop, so that its bytes do
    # not sit in the kernel for the whole delay; one that talks less is held to
    # the end and reaches the MTA, which reads its bytes as they come.
    delay = 5.0
    with aiosmtpd_backend(proxy=False) as backend, running_repeld(
        "--listen", "127.0.0.1:0",
        "--backend", backend.spec,
        "--delay", str(delay),
        "--on-early", "log",
        "--syslog", syslog.target,
        "--log-format", "json",
    ) as rd:  # fmt: skip
        with socket.create_connection(rd.address, timeout=TIMEOUT) as talker, \
                socket.create_connection(rd.address, timeout=TIMEOUT) as bot:  # fmt: skip
            talker.sendall(b"EHLO talker.example\r\n")
            bot.sendall(b"EHLO bot.example\r\n")
            logged = syslog.wait_for("early-talker", count=2)
            assert {ev.fields["action"] for ev in logged} == {"log"}
            started = time.monotonic()
            bot.sendall(b"x" * FLOOD_LIMIT)
            data, how = read_until_closed(bot)
            assert (data, how) == (b"", "reset")
            assert time.monotonic() - started < delay  # not held to the end
            bot_port = bot.getsockname()[1]
            cut = syslog.wait_for("early-talker", count=3)[-1]
            assert cut.fields["action"] == "drop"
            assert int(cut.fields["client_port"]) == bot_port
            assert int(cut.fields["bytes"]) >= FLOOD_LIMIT
            assert cut.fields["first"] == "EHLO bot.example\\r\\n"
            talker.sendall(b"NOOP\r\n" * 1000)  # short of the limit
            talker.settimeout(TIMEOUT)
            reply = b""
            while reply.count(b"\r\n250 ") < 1001:
                chunk = talker.recv(65536)
                assert chunk, reply[-200:]
                reply += chunk
            assert reply.startswith(b"220 ")
            assert reply.count(b"\r\n250 ") == 1001  # EHLO's last line, each NOOP
            talker.sendall(b"QUIT\r\n")
        (passed,) = syslog.wait_for("pass")
        assert passed.fields["reason"] == "delay"
        assert float(passed.fields["elapsed"]) >= delay


@pytest.mark.skipif(not HAVE_IPV6, reason="no IPv6 loopback")
def test_ipv6_listener_and_client_on_loopback() -> None:
    receiver = SyslogUDP("::1")
    try:
        with aiosmtpd_backend(proxy=True) as backend, running_repeld(
            "--listen", "[::1]:0",
            "--backend", backend.spec,
            "--delay", str(DELAY),
            "--proxy-protocol", "v2",
            "--syslog", receiver.target,
        ) as rd:  # fmt: skip
            assert rd.address[0] == "::1"
            session = deliver(rd.address)
            assert session.client[0] == "::1"
            assert session.waited >= DELAY
            assert backend.handler.delivered.wait(TIMEOUT)
            (got,) = backend.handler.deliveries
            assert (got.proxy_src, got.proxy_src_port) == session.client
            assert (got.proxy_dst, got.proxy_dst_port) == ("::1", rd.address[1])
            assert BODY_LINE in got.content
            check_pass_and_relay_end(receiver, "rfc5424", session.client, rd.address)
    finally:
        receiver.close()


# -- e. -f prints a readable line per event ------------------------------------------


def test_foreground_prints_one_readable_line_per_event(syslog: SyslogUDP) -> None:
    stamp = r"\d\d:\d\d:\d\d\.\d{3}"
    with aiosmtpd_backend(proxy=False) as backend, running_repeld(
        "--listen", "127.0.0.1:0",
        "--backend", backend.spec,
        "--delay", "2",
        "--syslog", syslog.target,
    ) as rd:  # fmt: skip
        with socket.create_connection(rd.address, timeout=TIMEOUT) as bot:
            bot_port = bot.getsockname()[1]
            bot.sendall(b"EHLO x\r\n")
            read_until_closed(bot)
        syslog.wait_for("early-talker")
        with socket.create_connection(rd.address, timeout=TIMEOUT) as quitter:
            quitter_port = quitter.getsockname()[1]
        syslog.wait_for("hangup")
        session = deliver(rd.address)
        syslog.wait_for("relay-end")

        rd.wait_line(
            rf"^{stamp} early-talker: PREGREET 8 after \d+\.\d{{3}} from "
            rf"\[127\.0\.0\.1\]:{bot_port}: EHLO x\\r\\n \(action=drop\)$"
        )
        rd.wait_line(
            rf"^{stamp} hangup: HANGUP after \d+\.\d{{3}} from \[127\.0\.0\.1\]:{quitter_port}"
            r" \(close\) before the greeting$"
        )
        port = session.client[1]
        rd.wait_line(rf"^{stamp} pass: PASS DELAY \[127\.0\.0\.1\]:{port} after \d+\.\d{{3}}$")
        rd.wait_line(
            rf"^{stamp} relay-end: RELAY-END \[127\.0\.0\.1\]:{port} after \d+\.\d{{3}}: "
            rf"\d+ bytes in, \d+ bytes out in \d+\.\d{{3}}s \(closed\)$"
        )
        # One stderr line per event, in the order the events were written to syslog.
        names = [m[1] for m in (re.match(rf"^{stamp} ([a-z-]+): ", ln) for ln in rd.lines) if m]
        for name in ("early-talker", "hangup", "pass", "relay-end"):
            assert names.count(name) == 1, rd.stderr_text()
        assert names == [m.event for m in syslog.messages], rd.stderr_text()
        assert all(ln.isprintable() for ln in rd.lines)


# -- f. signals ------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_daemon_promptly_with_status_0(
    syslog: SyslogUDP, sig: signal.Signals
) -> None:
    long_delay = 120.0
    with aiosmtpd_backend(proxy=False) as backend, running_repeld(
        "--listen", "127.0.0.1:0",
        "--backend", backend.spec,
        "--delay", str(long_delay),
        "--syslog", syslog.target,
    ) as rd:  # fmt: skip
        with socket.create_connection(rd.address, timeout=TIMEOUT) as held:
            # SIGUSR1 asks for a stats event: it shows when the client is in the pen.
            assert held_count(rd, syslog, want=1) == 1
            started = time.monotonic()
            status = rd.stop(sig, timeout=15.0)
            stopped_in = time.monotonic() - started
            assert not rd.killed, "repeld ignored the signal:\n" + rd.stderr_text()
            assert status == 0, rd.stderr_text()
            assert stopped_in < long_delay  # it did not wait for the held client
            data, _ = read_until_closed(held)
            # never greeted by the MTA, told to come back later
            assert data.startswith(b"421 4.3.2 ")
            assert data.endswith(b"\r\n") and data.count(b"\r\n") == 1
        assert backend.handler.deliveries == []
        assert "Traceback" not in rd.stderr_text()


def held_count(rd: Repeld, syslog: SyslogUDP, want: int, tries: int = 50) -> int:
    """The `held` counter of a stats event (SIGUSR1), asked until it is `want`."""
    assert rd.proc.pid is not None
    held = -1
    for attempt in range(1, tries + 1):
        os.kill(rd.proc.pid, signal.SIGUSR1)
        held = int(syslog.wait_for("stats", attempt)[-1].fields["held"])
        if held == want:
            break
        time.sleep(0.1)  # accept() has not run yet
    return held


def _refused(address: tuple[str, int]) -> bool:
    """Whether nothing listens on `address` any more."""
    try:
        socket.create_connection(address, timeout=TIMEOUT).close()
    except ConnectionRefusedError:
        return True
    return False


def test_sigterm_drains_relays_then_exits_0(syslog: SyslogUDP) -> None:
    grace = 120.0
    with aiosmtpd_backend(proxy=False) as backend, running_repeld(
        "--listen", "127.0.0.1:0",
        "--backend", backend.spec,
        "--delay", "60",
        "--trusted", "127.0.0.2/32",
        "--shutdown-grace", str(grace),
        "--syslog", syslog.target,
    ) as rd:  # fmt: skip
        held = socket.create_connection(rd.address, timeout=TIMEOUT)
        relayed = smtplib.SMTP(timeout=TIMEOUT, local_hostname="client.test",
                               source_address=("127.0.0.2", 0))  # fmt: skip
        try:
            code, _ = relayed.connect(*rd.address)  # trusted: greeted at once
            assert code == 220
            assert relayed.ehlo()[0] == 250
            syslog.wait_for("pass")
            assert rd.proc.pid is not None
            os.kill(rd.proc.pid, signal.SIGTERM)
            # The held client (accepted before the relayed one) is told to come back.
            data, _ = read_until_closed(held)
            assert data.startswith(b"421 4.3.2 ")
            # No new clients once draining (bounded wait for the listener to close).
            assert wait_for(lambda: _refused(rd.address), TIMEOUT, 0.1)
            # The relayed session carries on within the grace period ...
            assert rd.proc.poll() is None
            refused_rcpts = relayed.sendmail(MAIL_FROM, [RCPT_TO], MESSAGE)
            assert refused_rcpts == {}
            relayed.quit()
            # ... and once it is over the process exits 0, long before the grace is up.
            started = time.monotonic()
            rd.proc.wait(TIMEOUT)
            assert time.monotonic() - started < grace
            assert rd.proc.returncode == 0, rd.stderr_text()
            assert backend.handler.delivered.is_set()
            (end,) = syslog.wait_for("relay-end")
            assert end.fields["end"] == "closed"
        finally:
            held.close()
            relayed.close()


def test_second_sigterm_cuts_relays_at_once(syslog: SyslogUDP) -> None:
    grace = 300.0
    with aiosmtpd_backend(proxy=False) as backend, running_repeld(
        "--listen", "127.0.0.1:0",
        "--backend", backend.spec,
        "--delay", "60",
        "--trusted", "127.0.0.2/32",
        "--shutdown-grace", str(grace),
        "--syslog", syslog.target,
    ) as rd:  # fmt: skip
        relayed = smtplib.SMTP(timeout=TIMEOUT, local_hostname="client.test",
                               source_address=("127.0.0.2", 0))  # fmt: skip
        try:
            assert relayed.connect(*rd.address)[0] == 220
            assert relayed.ehlo()[0] == 250  # a live relayed session, idle
            syslog.wait_for("pass")
            assert rd.proc.pid is not None
            started = time.monotonic()
            os.kill(rd.proc.pid, signal.SIGTERM)
            # trio folds a signal that arrives again before it is read into one:
            # send the second only once the first has closed the listener.
            assert wait_for(lambda: _refused(rd.address), TIMEOUT, 0.1)
            assert rd.proc.poll() is None  # draining: the relay may go on
            os.kill(rd.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                rd.proc.wait(TIMEOUT)
            # Gone long before the first signal's grace period could have run out.
            assert rd.proc.poll() == 0, rd.stderr_text()
            assert time.monotonic() - started < grace
            assert relayed.sock is not None
            assert read_until_closed(relayed.sock)[0] == b""  # the relay was cut
            assert backend.handler.deliveries == []
        finally:
            relayed.close()


@pytest.mark.parametrize("suffix", ["abc_", "_abc", "a__b", "x_Y_9"])
def test_the_private_postfix_gets_a_valid_host_name_for_any_directory(suffix: str) -> None:
    # mkdtemp's random suffix once ended in "_", which made the host name end in
    # "-": Postfix then refused to start, saying so only to a syslog it had not.

    text = _main_cf(Path(f"/tmp/repeld-postfix-{suffix}"), "127.0.0.1", Path("/x"), "127.0.0.0/8")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("myhostname = ")]
    host = line.split(" = ", 1)[1]
    assert all(re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", label) for label in host.split("."))

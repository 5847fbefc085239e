"""repeld behind real balancers, in front of a real Postfix: two PROXY hops.

HAProxy 2.6 (`send-proxy-v2`, `check-send-proxy`, `option smtpchk`) and nginx's
`stream` module (`proxy_protocol on`, v1) connect to repeld from their own
loopback address, 127.0.0.50, which alone is `--proxy-from`; clients connect to
the balancer from distinct 127.0.1.x addresses (and ::1), so every figure and
every event is about them. Behind repeld a private Postfix runs with
`smtpd_upstream_proxy_protocol = haproxy` and relays for the clients' network
only, so a delivery proves that Postfix saw the real client through both hops.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..haproxy_fixture import HAPROXY, Haproxy
from ..nginx_fixture import NGINX, STREAM_MODULE, Nginx
from ..postfix_fixture import POSTFIX, PostfixInstance, postfix_instance
from ..procs import Daemon as Repeld
from ..procs import SyslogUDP, connect, free_port, read_line
from .test_e2e import MAIL_FROM, RCPT_TO, deliver, read_until_closed
from .test_metrics import scrape

pytestmark = [
    pytest.mark.skipif(POSTFIX is None, reason="postfix is not installed"),
    pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed"),
]

BALANCER = "127.0.0.50"
DELAY = 2.0
TIMEOUT = 30.0


def _clients_network() -> str:
    return "127.0.1.0/24"


@contextlib.contextmanager
def repeld_with(toml: str, *extra: str) -> Iterator[Repeld]:
    """repeld with this configuration file and flags (the pass cache off unless
    `extra` names one), stopped and checked afterwards."""
    with tempfile.TemporaryDirectory(prefix="repeld-lb-") as tmp:
        config = Path(tmp) / "repeld.toml"
        config.write_text(toml)
        user = ["--user", "nobody"] if os.geteuid() == 0 else []
        proc = Repeld(["--config", str(config), *user, *extra])
        try:
            proc.wait_listening()
            yield proc
        finally:
            status = proc.stop()
        assert not proc.killed and status == 0, proc.stderr_text()
        assert "Traceback" not in proc.stderr_text(), proc.stderr_text()


@contextlib.contextmanager
def stack(
    syslog: SyslogUDP, tmp_path: Path, *extra: str, balancer: str = "haproxy", inter: str = "1s"
) -> Iterator[tuple[Haproxy | Nginx, Repeld, PostfixInstance]]:
    """Postfix, repeld in front of it, the balancer in front of repeld."""
    with postfix_instance(
        upstream_proxy="haproxy", mynetworks=_clients_network(), protocols="all"
    ) as pf:
        toml = (
            'listen = ["127.0.0.1:0"]\n'
            f'backend = "127.0.0.1:{pf.port}"\n'
            'proxy-protocol = "v2"\n'
            f'proxy-from = ["{BALANCER}/32"]\n'
            f"delay = {DELAY}\n"
            f'syslog = "{syslog.target}"\n'
        )
        with repeld_with(toml, *extra) as rd:
            front: Haproxy | Nginx
            if balancer == "haproxy":
                front = Haproxy(tmp_path, rd.address, source=BALANCER, inter=inter, ipv6=True)
            else:
                front = Nginx(tmp_path, rd.address, source=BALANCER, ipv6=True)
            with front:
                yield front, rd, pf


def _events(syslog: SyslogUDP, name: str) -> list[dict[str, str]]:
    syslog.drain(0.3)
    return [m.fields for m in syslog.named(name)]


def test_postfix_logs_the_real_client_through_haproxy_and_repeld(
    syslog: SyslogUDP, tmp_path: Path
) -> None:
    with stack(syslog, tmp_path) as (front, _rd, pf):
        assert isinstance(front, Haproxy)
        front.wait_status("UP", TIMEOUT)
        session = deliver((front.host, front.port), source="127.0.1.5")
        assert session.refused == {}
        assert session.waited >= DELAY
        ip, port = session.client
        assert ip == "127.0.1.5"
        peer = rf"unknown\[127\.0\.1\.5\]:{port}\b"
        pf.wait_log(rf"postfix/smtpd\[\d+\]: connect from {peer}")
        queue_id = pf.wait_log(rf"postfix/smtpd\[\d+\]: (\w+): client={peer}")[1]
        pf.wait_log(rf"postfix/discard\[\d+\]: {queue_id}: to=<{RCPT_TO}>, .*status=sent")
        assert MAIL_FROM in pf.log_text()
        (passed,) = syslog.wait_for("pass")
        assert passed.fields["client"] == "127.0.1.5"
        assert passed.fields["client_port"] == str(port)
        assert passed.fields["via"] == BALANCER
        assert passed.fields["reason"] == "delay"
        # HAProxy's frontend is what the client connected to: the header's destination
        assert (passed.fields["server"], passed.fields["server_port"]) == (
            front.host,
            str(front.port),
        )


def test_an_early_talker_through_haproxy_is_cut_and_named(
    syslog: SyslogUDP, tmp_path: Path
) -> None:
    with stack(syslog, tmp_path) as (front, _rd, pf):
        sock = connect(front.port, source="127.0.1.6")
        sock.sendall(b"EHLO bot.example\r\n")
        data, _how = read_until_closed(sock)
        sock.close()
        assert b"220" not in data
        (talker,) = syslog.wait_for("early-talker")
        assert talker.fields["client"] == "127.0.1.6"
        assert talker.fields["via"] == BALANCER
        assert talker.fields["first"] == "EHLO bot.example\\r\\n"
        assert "127.0.1.6" not in pf.log_text()  # never reached Postfix


def test_haproxy_keeps_the_server_up_on_checks_that_are_no_clients(
    syslog: SyslogUDP, tmp_path: Path
) -> None:
    # Two minutes of checks at HAProxy's 1 s, as a balancer runs them in production.
    mport = free_port()
    metrics = ("--metrics", f"127.0.0.1:{mport}")
    with stack(syslog, tmp_path, *metrics, inter="1s") as (front, _rd, _pf):
        assert isinstance(front, Haproxy)
        front.wait_status("UP", TIMEOUT)
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            assert front.server_status() == "UP", front.server_stat()
            time.sleep(1.0)
        syslog.drain(0.5)
        names = {m.event for m in syslog.messages}
        assert not names & {"pass", "early-talker", "hangup", "relay-end", "proxy-error"}, names
        text = scrape(mport).decode()
        checks = re.search(r'^repeld_proxy_connections_total\{outcome="check"\} (\S+)$', text, re.M)
        assert checks is not None and float(checks[1]) >= 100, text
        clients = re.search(
            r'^repeld_proxy_connections_total\{outcome="client"\} (\S+)$', text, re.M
        )
        assert clients is not None and float(clients[1]) == 0
        assert re.search(r"^repeld_held 0(\.0)?$", text, re.M)


def test_postfix_sees_haproxys_checks_as_haproxy(syslog: SyslogUDP, tmp_path: Path) -> None:
    # HAProxy's smtpchk checks (v2 LOCAL) reach Postfix as HAProxy's own address,
    # as they would without repeld: once they came with a LOCAL header of
    # repeld's, and Postfix took repeld's loopback address (which mynetworks
    # trusts by default) for the client.
    with stack(syslog, tmp_path) as (front, _rd, pf):
        assert isinstance(front, Haproxy)
        front.wait_status("UP", TIMEOUT)
        pf.wait_log(rf"postfix/smtpd\[\d+\]: connect from unknown\[{re.escape(BALANCER)}\]:\d+")


def test_an_old_haproxys_smtpchk_helo_behind_the_header_is_a_check(
    syslog: SyslogUDP, tmp_path: Path
) -> None:
    # HAProxy before 2.2 sends its smtpchk "HELO localhost" right behind the
    # header, at connect, and wants a 2xx: the check must reach the MTA whole.
    with stack(syslog, tmp_path) as (_front, rd, pf):
        for _ in range(3):
            sock = socket.create_connection(
                rd.address, timeout=TIMEOUT, source_address=(BALANCER, 0)
            )
            local = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0, 0])
            sock.sendall(local + b"HELO localhost\r\n")
            assert read_line(sock, TIMEOUT).startswith(b"220 ")
            assert read_line(sock, TIMEOUT).startswith(b"250 ")
            sock.sendall(b"QUIT\r\n")
            assert read_line(sock, TIMEOUT).startswith(b"221")
            sock.close()
        assert _events(syslog, "proxy-error") == []
        pf.wait_log(rf"postfix/smtpd\[\d+\]: connect from unknown\[{re.escape(BALANCER)}\]:\d+")


def test_a_headerless_connection_from_the_balancer_is_a_proxy_error(
    syslog: SyslogUDP, tmp_path: Path
) -> None:
    with stack(syslog, tmp_path) as (_front, rd, _pf):
        sock = socket.create_connection(rd.address, timeout=TIMEOUT, source_address=(BALANCER, 0))
        sock.sendall(b"EHLO balancer.example\r\n")
        _data, how = read_until_closed(sock)
        sock.close()
        assert how == "reset"
        (error,) = syslog.wait_for("proxy-error")
        assert error.fields["reason"] == "not-proxy"
        assert error.fields["client"] == BALANCER and error.fields["via"] == BALANCER
        assert _events(syslog, "early-talker") == []


def test_limits_trusted_networks_and_the_cache_see_the_real_clients(
    syslog: SyslogUDP, tmp_path: Path
) -> None:
    extra = ("--max-per-client", "2", "--trusted", "127.0.1.9/32", "--cache", "memory")
    with stack(syslog, tmp_path, *extra) as (front, _rd, _pf):
        # ten clients through one balancer are ten clients: all held at once
        held = [connect(front.port, source=f"127.0.1.{20 + i}") for i in range(10)]
        # a third connection from one client is over its --max-per-client (which of
        # the three HAProxy hands on last is HAProxy's business)
        same = [connect(front.port, source="127.0.1.40") for _ in range(3)]
        lines = sorted(read_line(sock, TIMEOUT) for sock in same)
        assert lines[0].startswith(b"220 ") and lines[1].startswith(b"220 "), lines
        assert lines[2] == b"421 4.7.0 Too many connections\r\n"
        for sock in held:
            assert read_line(sock, TIMEOUT).startswith(b"220 ")  # after the delay, each
        for sock in held + same:
            sock.close()
        (overload,) = syslog.wait_for("overload")
        assert overload.fields["client"] == "127.0.1.40"
        # a trusted client is passed at once, judged by its own address
        started = time.monotonic()
        trusted = deliver((front.host, front.port), source="127.0.1.9")
        assert trusted.waited < DELAY
        passes = syslog.wait_for("pass", 13)
        assert {"127.0.1.9"} == {
            p.fields["client"] for p in passes if p.fields["reason"] == "trusted"
        }
        # a client that waited once is remembered by its own address, not the balancer's
        again = deliver((front.host, front.port), source="127.0.1.20")
        assert again.waited < DELAY
        cached = [p for p in syslog.wait_for("pass", 14) if p.fields["reason"] == "cache"]
        assert [p.fields["client"] for p in cached] == ["127.0.1.20"]
        first_time = deliver((front.host, front.port), source="127.0.1.41")
        assert first_time.waited >= DELAY
        assert time.monotonic() - started < TIMEOUT


@pytest.mark.skipif(NGINX is None or STREAM_MODULE is None, reason="nginx stream is not installed")
def test_nginx_v1_through_repeld_to_postfix(syslog: SyslogUDP, tmp_path: Path) -> None:
    with stack(syslog, tmp_path, balancer="nginx") as (front, _rd, pf):
        session = deliver((front.host, front.port), source="127.0.1.7")
        assert session.refused == {}
        assert session.waited >= DELAY
        _ip, port = session.client
        pf.wait_log(rf"postfix/smtpd\[\d+\]: connect from unknown\[127\.0\.1\.7\]:{port}\b")
        (passed,) = syslog.wait_for("pass")
        assert (passed.fields["client"], passed.fields["via"]) == ("127.0.1.7", BALANCER)


def test_an_ipv6_client_through_the_ipv4_hop(syslog: SyslogUDP, tmp_path: Path) -> None:
    with stack(syslog, tmp_path) as (front, _rd, pf):
        try:
            sock = socket.create_connection(("::1", front.port), timeout=TIMEOUT)
        except OSError as exc:
            pytest.skip(f"no IPv6 loopback here: {exc}")
        banner = read_line(sock, TIMEOUT)
        assert banner.startswith(b"220 ")
        sock.sendall(b"QUIT\r\n")
        read_line(sock, TIMEOUT)
        sock.close()
        (passed,) = syslog.wait_for("pass")
        assert passed.fields["client"] == "::1"
        assert passed.fields["via"] == BALANCER
        pf.wait_log(r"postfix/smtpd\[\d+\]: connect from (localhost|unknown)\[::1\]")


def test_a_mixed_family_header_reaches_postfix_as_the_client_not_as_repeld(
    syslog: SyslogUDP, tmp_path: Path
) -> None:
    # A balancer's v2 header with an IPv4-mapped client and a native IPv6 server
    # address, as HAProxy writes an IPv4 client on an IPv6 frontend. repeld once
    # sent such a client on with a LOCAL header: Postfix then took repeld's own
    # loopback address for the client, one its mynetworks trusts by default.
    with stack(syslog, tmp_path) as (_front, rd, pf):
        body = (
            socket.inet_pton(socket.AF_INET6, "::ffff:198.51.100.7")
            + socket.inet_pton(socket.AF_INET6, "2001:db8::25")
            + (40123).to_bytes(2, "big")
            + (25).to_bytes(2, "big")
        )
        header = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x21]) + len(body).to_bytes(2, "big")
        sock = connect(rd.address[1], source=BALANCER)
        sock.sendall(header + body)
        banner = read_line(sock, TIMEOUT)
        assert banner.startswith(b"220 "), banner
        sock.sendall(b"QUIT\r\n")
        assert read_line(sock, TIMEOUT).startswith(b"221")
        sock.close()
        (passed,) = syslog.wait_for("pass")
        assert (passed.fields["client"], passed.fields["via"]) == ("198.51.100.7", BALANCER)
        # (HAProxy's health checks come from repeld's own address: they carry no client)
        pf.wait_log(
            r"postfix/smtpd\[\d+\]: connect from unknown\[(::ffff:)?198\.51\.100\.7\]:40123"
        )

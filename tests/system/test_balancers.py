"""The real balancers of the PROXY input tests send what core/proxyinput.py reads.

A smoke test per fixture (tests/haproxy_fixture.py, tests/nginx_fixture.py):
HAProxy 2.6 and nginx relay real clients, from their own 127.x.y.z and ::1
addresses, to a plain loopback listener in this file that does what repeld's
intake does with the bytes: peek, `parse`, consume exactly `Header.length`,
then speak SMTP. The header must name the client and its port, the client's
first line must follow the header exactly, and HAProxy's `option smtpchk`
health checks (v2 LOCAL) must mark the server UP on the stats socket.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from repeld.core.proxyinput import (
    MAX_HEADER,
    Local,
    NeedMore,
    Proxied,
    ProxyFamily,
    Result,
    parse,
)

from ..haproxy_fixture import HAPROXY, Haproxy
from ..nginx_fixture import NGINX, STREAM_MODULE, Nginx
from ..procs import free_port, wait_for

TIMEOUT = 10.0


@dataclass
class Seen:
    """One connection as the listener saw it."""

    peer: tuple[str, int]
    header: Result
    raw: bytes  # the header's bytes
    first_line: bytes  # the client's first line after the header (b"" for none)


class ProxyListener:
    """A loopback SMTP-shaped listener behind a balancer: each connection's PROXY
    header is peeked and parsed as repeld's intake does, then consumed, then
    `220`, `250` to every line, `221` to QUIT."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_server((host, 0))
        self.sock.settimeout(0.2)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn, peer), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                result = self._header(conn)
            except OSError:
                return
            seen = Seen(peer[:2], result, b"", b"")
            with self._lock:
                self.seen.append(seen)
            if not isinstance(result, (Proxied, Local)):
                return
            try:
                seen.raw = conn.recv(result.length, socket.MSG_WAITALL)
                conn.sendall(b"220 listener ESMTP\r\n")
                lines = conn.makefile("rb")
                while line := lines.readline(1000):
                    seen.first_line = seen.first_line or line
                    if line.upper().startswith(b"QUIT"):
                        conn.sendall(b"221 bye\r\n")
                        break
                    conn.sendall(b"250 ok\r\n")
            except OSError:
                return

    @staticmethod
    def _header(conn: socket.socket) -> Result:
        """Peek a growing prefix until the parser has an answer (or the time is up)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            data = conn.recv(MAX_HEADER, socket.MSG_PEEK)
            result = parse(data)
            if not isinstance(result, NeedMore) or not data or time.monotonic() > deadline:
                return result
            time.sleep(0.01)  # the rest of the header is to come

    def relayed(self) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if isinstance(s.header, Proxied)]

    def checks(self) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if isinstance(s.header, Local)]

    def close(self) -> None:
        self._closed = True
        self._accepter.join(5)
        self.sock.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def listener() -> Iterator[ProxyListener]:
    server = ProxyListener()
    yield server
    server.close()


def smtp_client(address: tuple[str, int], source: str) -> tuple[int, bytes]:
    """Connect from `source`, read the greeting, EHLO, QUIT: (our port, the greeting)."""
    with socket.create_connection(address, TIMEOUT, source_address=(source, 0)) as c:
        port = c.getsockname()[1]
        reader = c.makefile("rb")
        greeting = reader.readline()
        c.sendall(b"EHLO client.example\r\n")
        assert reader.readline().startswith(b"250")
        c.sendall(b"QUIT\r\n")
        assert reader.readline().startswith(b"221")
    return port, greeting


def seen_for(listener: ProxyListener, port: int) -> Seen:
    """The relayed connection whose header names client port `port`."""

    def found() -> bool:
        return any(
            isinstance(s.header, Proxied) and s.header.source_port == port
            for s in listener.relayed()
        )

    assert wait_for(found, TIMEOUT), [s.header for s in listener.seen]
    return next(
        s
        for s in listener.relayed()
        if isinstance(s.header, Proxied) and s.header.source_port == port
    )


# -- HAProxy ---------------------------------------------------------------------------

needs_haproxy = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)"
)


@needs_haproxy
def test_haproxy_sends_v2_and_its_checks_see_the_greeting(
    tmp_path: Path, listener: ProxyListener
) -> None:
    with Haproxy(tmp_path, listener.address, ipv6=True) as proxy:
        row = proxy.wait_status("UP")
        assert row["check_status"] == "L7OK"  # option smtpchk saw our 2xx
        checks = listener.checks()
        assert checks and all(c.header == Local(2, 16) for c in checks)
        assert all(c.first_line.startswith(b"HELO ") for c in checks if c.first_line)

        port, greeting = smtp_client((proxy.host, proxy.port), "127.3.0.7")
        assert greeting == b"220 listener ESMTP\r\n"
        seen = seen_for(listener, port)
        assert seen.header == Proxied(
            2, 28, ProxyFamily.TCP4, "127.3.0.7", port, "127.0.0.1", proxy.port
        )
        assert seen.peer[0] == "127.0.0.1"  # the socket's peer is the balancer
        assert seen.first_line == b"EHLO client.example\r\n"  # the header, all of it, only it

        port6, _ = smtp_client(("::1", proxy.port), "::1")
        seen6 = seen_for(listener, port6)
        assert seen6.header == Proxied(2, 52, ProxyFamily.TCP6, "::1", port6, "::1", proxy.port)
        assert seen6.peer[0] == "127.0.0.1"  # an IPv6 client through an IPv4 hop


@needs_haproxy
def test_haproxy_crc32c_and_source(tmp_path: Path, listener: ProxyListener) -> None:
    with Haproxy(tmp_path, listener.address, proxy_v2_options="crc32c", source="127.0.0.250") as p:
        p.wait_status("UP")
        port, _ = smtp_client((p.host, p.port), "127.3.0.8")
        seen = seen_for(listener, port)
        assert isinstance(seen.header, Proxied) and seen.header.source == "127.3.0.8"
        assert [t.type for t in seen.header.tlvs] == [0x03]  # checked by the parser
        assert seen.peer[0] == "127.0.0.250"
        checks = listener.checks()
        assert checks and all(
            isinstance(c.header, Local) and c.header.tlvs[0].type == 0x03 for c in checks
        )


@needs_haproxy
def test_haproxy_marks_a_dead_server_down(tmp_path: Path) -> None:
    """The stats socket tells DOWN from UP (so waiting for UP means something)."""
    with Haproxy(tmp_path, ("127.0.0.1", free_port())) as proxy:
        row = proxy.wait_status("DOWN")
        assert row["check_status"].startswith("L4")


# -- nginx -----------------------------------------------------------------------------


@pytest.mark.skipif(
    NGINX is None or STREAM_MODULE is None,
    reason="nginx with its stream module is not installed"
    " (apt-get install nginx-light libnginx-mod-stream)",
)
def test_nginx_stream_sends_v1(tmp_path: Path, listener: ProxyListener) -> None:
    with Nginx(tmp_path, listener.address, ipv6=True, source="127.0.0.251") as proxy:
        port, greeting = smtp_client((proxy.host, proxy.port), "127.3.0.9")
        assert greeting == b"220 listener ESMTP\r\n"
        seen = seen_for(listener, port)
        line = f"PROXY TCP4 127.3.0.9 127.0.0.1 {port} {proxy.port}\r\n".encode()
        assert seen.raw == line
        assert seen.header == Proxied(
            1, len(line), ProxyFamily.TCP4, "127.3.0.9", port, "127.0.0.1", proxy.port
        )
        assert seen.peer[0] == "127.0.0.251"
        assert seen.first_line == b"EHLO client.example\r\n"

        port6, _ = smtp_client(("::1", proxy.port), "::1")
        seen6 = seen_for(listener, port6)
        assert seen6.raw == f"PROXY TCP6 ::1 ::1 {port6} {proxy.port}\r\n".encode()
        assert isinstance(seen6.header, Proxied) and seen6.header.family is ProxyFamily.TCP6

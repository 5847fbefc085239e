"""No client learns PIPECONNECT through repeld (a real repeld process, aiosmtpd behind it).

The backend is aiosmtpd advertising PIPECONNECT as Exim 4.94+ does. A client
that reads the EHLO reply through repeld must not see it, and everything else
must be intact. An Exim-like client caches the EHLO reply it saw and, on its
next connection, pipelines EHLO, MAIL and RCPT before the banner only if
PIPECONNECT was in it: through repeld it never does, so its second message is
delivered too. With --keep-pipe-connect the capability passes, the client
pipelines early, and repeld cuts it off: the reason for the filter.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

from aiosmtpd.controller import Controller

from ..procs import SyslogUDP, free_port
from .test_e2e import DELAY, MAIL_FROM, MESSAGE, RCPT_TO, TIMEOUT, running_repeld

#: The EHLO reply lines the backend adds after aiosmtpd's own (its last is HELP).
ADVERTISED = ["250-PIPECONNECT", "250-X_PIPE_CONNECT"]


class PipeConnectHandler:
    """aiosmtpd handler: advertises PIPECONNECT last, counts messages."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.delivered = threading.Condition()

    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, proxy_data: Any) -> bool:
        return True

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        # ... 250-AUTH, 250 HELP  ->  ..., 250-HELP, 250-PIPECONNECT, 250 X_PIPE_CONNECT
        *head, last = responses
        tail = [*ADVERTISED[:-1], "250 " + ADVERTISED[-1][4:]]
        return [*head, "250-" + last[4:], *tail]

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.delivered:
            self.messages.append(bytes(envelope.original_content or envelope.content))
            self.delivered.notify_all()
        return "250 2.0.0 Ok: queued"


@contextlib.contextmanager
def pipeconnect_backend() -> Iterator[tuple[PipeConnectHandler, str]]:
    """aiosmtpd on 127.0.0.1 reading PROXY v1, advertising PIPECONNECT."""
    handler = PipeConnectHandler()
    controller: Any = None
    for _attempt in range(5):  # the free port may be taken between probe and bind
        port = free_port()
        controller = Controller(
            handler, hostname="127.0.0.1", port=port, server_hostname="backend.test",
            ready_timeout=TIMEOUT, proxy_protocol_timeout=10.0,
        )  # fmt: skip
        try:
            controller.start()
        except OSError:
            controller = None
            continue
        break
    assert controller is not None, "could not start aiosmtpd"
    try:
        yield handler, f"127.0.0.1:{port}"
    finally:
        controller.stop()


def direct_ehlo_reply(spec: str) -> list[bytes]:
    """The backend's own EHLO reply, asked directly (with a PROXY header)."""
    host, port = spec.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(b"PROXY TCP4 127.0.0.9 127.0.0.1 1234 25\r\n")
        f = sock.makefile("rb")
        read_reply(f)
        sock.sendall(b"EHLO client.test\r\n")
        reply = read_reply(f)
        sock.sendall(b"QUIT\r\n")
        read_reply(f)
    return reply


def read_reply(f: Any) -> list[bytes]:
    """One SMTP reply's lines (CRLF kept); raises ConnectionError at end of file."""
    lines: list[bytes] = []
    while True:
        line = f.readline(4096)
        if not line.endswith(b"\n"):
            raise ConnectionError(f"closed after {[*lines, line]!r}")
        lines.append(line)
        if line[3:4] != b"-":
            return lines


def has_pipe_connect(reply: list[bytes]) -> bool:
    return any(line[4:].strip().upper() == b"PIPECONNECT" for line in reply)


class EximLike:
    """A sending MTA that caches the EHLO reply of a host, as Exim 4.94+ does."""

    def __init__(self) -> None:
        self.cached: list[bytes] | None = None
        self.pipelined_early = False

    def send(self, address: tuple[str, int]) -> bool:
        """Deliver MESSAGE once; False if the server cut the connection."""
        early = self.cached is not None and has_pipe_connect(self.cached)
        self.pipelined_early = early
        envelope = f"MAIL FROM:<{MAIL_FROM}>\r\nRCPT TO:<{RCPT_TO}>\r\n".encode()
        try:
            with socket.create_connection(address, timeout=TIMEOUT) as sock:
                f = sock.makefile("rb")
                if early:  # before the banner: EHLO, MAIL and RCPT in one go
                    sock.sendall(b"EHLO client.test\r\n" + envelope)
                banner = read_reply(f)
                assert banner[-1].startswith(b"220 "), banner
                if not early:
                    sock.sendall(b"EHLO client.test\r\n")
                ehlo = read_reply(f)
                assert ehlo[0].startswith(b"250"), ehlo
                self.cached = ehlo
                if not early:
                    sock.sendall(envelope)
                for _ in range(2):  # MAIL, RCPT
                    assert read_reply(f)[-1].startswith(b"250"), "envelope refused"
                sock.sendall(b"DATA\r\n")
                assert read_reply(f)[-1].startswith(b"354")
                sock.sendall(MESSAGE + b".\r\n")
                assert read_reply(f)[-1].startswith(b"250")
                sock.sendall(b"QUIT\r\n")
                read_reply(f)
        except (ConnectionError, TimeoutError):
            return False
        return True


def wait_messages(handler: PipeConnectHandler, n: int) -> int:
    with handler.delivered:
        handler.delivered.wait_for(lambda: len(handler.messages) >= n, timeout=TIMEOUT)
        return len(handler.messages)


def test_the_client_sees_the_ehlo_reply_without_pipeconnect(syslog: SyslogUDP) -> None:
    with pipeconnect_backend() as (handler, spec), running_repeld(
        "--listen", "127.0.0.1:0", "--backend", spec, "--delay", str(DELAY),
        "--proxy-protocol", "v1", "--syslog", syslog.target,
    ) as rd:  # fmt: skip
        direct = direct_ehlo_reply(spec)
        assert has_pipe_connect(direct) and direct[-1] == b"250 X_PIPE_CONNECT\r\n"
        client = EximLike()
        assert client.send(rd.address)
        seen = client.cached
        assert seen is not None
        # Everything but the two capability lines, byte for byte, and the new
        # last line ends the reply.
        want = [
            line for line in direct if line[4:].strip() not in (b"PIPECONNECT", b"X_PIPE_CONNECT")
        ]
        want[-1] = want[-1][:3] + b" " + want[-1][4:]
        assert seen == want
        assert seen[-1] == b"250 HELP\r\n"
        assert not has_pipe_connect(seen)
        # Its next connection waits for the banner, and the message arrives.
        assert client.send(rd.address)
        assert not client.pipelined_early
        assert wait_messages(handler, 2) == 2
        assert all(b"Subject: repeld e2e" in m for m in handler.messages)
        syslog.wait_for("relay-end", count=2)
        assert not [m for m in syslog.messages if m.event == "early-talker"]


def test_with_keep_pipe_connect_it_passes_and_the_client_talks_early(syslog: SyslogUDP) -> None:
    with pipeconnect_backend() as (handler, spec), running_repeld(
        "--listen", "127.0.0.1:0", "--backend", spec, "--delay", str(DELAY),
        "--proxy-protocol", "v1", "--syslog", syslog.target, "--keep-pipe-connect",
    ) as rd:  # fmt: skip
        client = EximLike()
        assert client.send(rd.address)
        assert client.cached == direct_ehlo_reply(spec)  # unchanged
        assert has_pipe_connect(client.cached)
        # What the filter prevents: the next connection talks before the banner
        # and is cut off as an early talker; its message does not arrive.
        assert not client.send(rd.address)
        assert client.pipelined_early
        (early,) = syslog.wait_for("early-talker")
        assert early.fields["action"] == "drop"
        assert wait_messages(handler, 1) == 1

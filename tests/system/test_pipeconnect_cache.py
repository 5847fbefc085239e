"""An Exim-style PIPECONNECT client through a real repeld process, with the
default SQLite pass cache and --on-early reject: no false positive.

Its first connection waits for the banner and learns (from a backend that
advertises PIPECONNECT; --keep-pipe-connect lets it through, as for a client
that learned it before repeld stood in front of the MTA) that it may pipeline; its second sends EHLO, MAIL and
RCPT before the banner. The pass cache remembers it as patient, so both
messages are delivered on the first attempt.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

from ..procs import Daemon, SyslogUDP, free_port, proc_state, wait_for
from .test_e2e import TIMEOUT, RecordingHandler, read_until_closed

PIPELINED = b"EHLO client.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<b@backend.test>\r\n"


class PipeconnectHandler(RecordingHandler):
    """aiosmtpd handler that advertises PIPECONNECT, as Exim 4.94+ does."""

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPECONNECT", responses[-1]]


def reply(f: Any) -> bytes:
    """One SMTP reply, all its lines, from a file over the socket."""
    out = b""
    while True:
        line = f.readline()
        assert line, "connection closed mid-reply"
        out += bytes(line)
        if line[3:4] != b"-":
            return out


def session(
    address: tuple[str, int], *, pipeconnect: bool, sent: Callable[[], None] = lambda: None
) -> bytes:
    """One message; with `pipeconnect`, EHLO/MAIL/RCPT go before the banner. The EHLO reply.

    `sent()` is called once the pipelined commands are written.
    """
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        f = sock.makefile("rb")
        if pipeconnect:
            sock.sendall(PIPELINED)
        sent()
        assert reply(f).startswith(b"220 ")
        if not pipeconnect:
            sock.sendall(b"EHLO client.test\r\n")
        ehlo = reply(f)
        assert ehlo.startswith(b"250")
        if not pipeconnect:
            sock.sendall(b"MAIL FROM:<a@sender.test>\r\n")
        assert reply(f).startswith(b"250")
        if not pipeconnect:
            sock.sendall(b"RCPT TO:<b@backend.test>\r\n")
        assert reply(f).startswith(b"250")
        sock.sendall(b"DATA\r\n")
        assert reply(f).startswith(b"354")
        sock.sendall(b"Subject: pipeconnect\r\n\r\nhello\r\n.\r\n")
        assert reply(f).startswith(b"250")
        sock.sendall(b"QUIT\r\n")
        assert reply(f).startswith(b"221")
        f.close()
        read_until_closed(sock)
    return ehlo


def test_pipeconnect_client_delivers_twice_through_the_sqlite_cache(
    tmp_path: Path, syslog: SyslogUDP
) -> None:
    handler = PipeconnectHandler()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=free_port(),
        server_hostname="backend.test",
        ready_timeout=TIMEOUT,
        proxy_protocol_timeout=10.0,
    )
    controller.start()
    state = tmp_path / "state"
    state.mkdir()
    user = ["--user", "root"] if os.geteuid() == 0 else []  # it must reach tmp_path
    repeld = Daemon(
        [
            "--listen", "127.0.0.1:0",
            "--backend", f"127.0.0.1:{controller.port}",
            "--proxy-protocol", "v2",
            "--delay", "2",
            "--on-early", "reject",
            "--keep-pipe-connect",
            "--cache", f"sqlite:{state / 'cache.sqlite'}",
            "--syslog", syslog.target,
            *user,
        ]
    )  # fmt: skip
    try:
        repeld.wait_listening()
        ehlo = session(repeld.address, pipeconnect=False)
        assert b"PIPECONNECT" in ehlo
        # The commands are in the socket before repeld can accept it, as they
        # are for a client across a network: stopped, repeld cannot take it
        # (the kernel completes the handshake and queues the bytes) and the
        # pass cache cannot answer before the pen has seen them. Unstopped,
        # the answer could come first, and the pass say early_bytes=0.
        repeld.signal(signal.SIGSTOP)
        assert wait_for(lambda: proc_state(repeld.pid) == "T", TIMEOUT, 0.001), "not stopped"
        try:
            session(repeld.address, pipeconnect=True, sent=lambda: repeld.signal(signal.SIGCONT))
        finally:
            repeld.signal(signal.SIGCONT)
        passes = syslog.wait_for("pass", 2)
        assert [p.fields["reason"] for p in passes] == ["delay", "cache"]
        assert passes[0].fields["early_bytes"] == "0"
        assert passes[1].fields["early_bytes"] == str(len(PIPELINED))
        syslog.drain()
        assert syslog.named("early-talker") == []
        assert len(handler.deliveries) == 2  # both on the first attempt
        # the two clients, and the start-up backend check if it got there first
        assert len(handler.proxy_sources) in (2, 3)
        assert all(d.proxy_version == 2 for d in handler.deliveries)
        assert all(d.rcpt_tos == ["b@backend.test"] for d in handler.deliveries)
    except BaseException:
        print(repeld.stderr_text())
        raise
    finally:
        status = repeld.stop()
        controller.stop()
    assert status == 0, repeld.stderr_text()
    assert "Traceback" not in repeld.stderr_text()

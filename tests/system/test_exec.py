"""--exec: a passed client handed to a program as its stdin and stdout (ucspi-tcp style)."""

from __future__ import annotations

import os
import shlex
import signal
import time
from pathlib import Path

import pytest

from repeld.cli import main

from ..procs import Daemon, SyslogUDP, connect, daemon, free_port, read_line

AS_ROOT = ["--user", "root"] if os.geteuid() == 0 else []

# A one-screen MTA in sh: greets with what tcpserver would have told it, then
# answers QUIT; `exec 2>&1` is not needed, stdout is the client already.
SMTP_SH = (
    'printf "220 sh ready %s:%s to %s:%s %s\\r\\n" "$TCPREMOTEIP" "$TCPREMOTEPORT" '
    '"$TCPLOCALIP" "$TCPLOCALPORT" "$PROTO"; '
    'while read -r line; do case "$line" in QUIT*) printf "221 bye\\r\\n"; exit 3;; '
    '*) printf "250 ok\\r\\n";; esac; done'
)


def test_the_program_talks_to_the_client_and_knows_who_it_is(syslog: SyslogUDP) -> None:
    port = free_port()
    program = shlex.join(["/bin/sh", "-c", SMTP_SH])
    with daemon(
        "-l",
        f"127.0.0.1:{port}",
        "--exec",
        program,
        "-d",
        "0.5",
        "--syslog",
        syslog.target,
        *AS_ROOT,
    ):
        client = connect(port, source="127.0.0.44")
        t0 = time.monotonic()
        greeting = read_line(client)
        assert time.monotonic() - t0 >= 0.45  # held like any other client
        cport = client.getsockname()[1]
        assert greeting == f"220 sh ready 127.0.0.44:{cport} to 127.0.0.1:{port} TCP\r\n".encode()
        client.sendall(b"EHLO me\r\n")
        assert read_line(client) == b"250 ok\r\n"
        client.sendall(b"QUIT\r\n")
        assert read_line(client) == b"221 bye\r\n"
        assert read_line(client) == b""  # the program exited: the connection is closed
        client.close()
        (end,) = syslog.wait_for("exec-end")
        assert end.fields["program"] == "/bin/sh"
        assert end.fields["status"] == "3"
        assert end.fields["end"] == "exit"
        assert end.fields["client"] == "127.0.0.44"


def test_a_program_that_cannot_start_gets_the_client_a_421(syslog: SyslogUDP) -> None:
    port = free_port()
    with daemon(
        "-l",
        f"127.0.0.1:{port}",
        "--exec",
        "/nonexistent/smtpd",
        "-d",
        "0.3",
        "--syslog",
        syslog.target,
        *AS_ROOT,
    ):
        client = connect(port)
        assert (
            read_line(client) == b"421 4.3.2 Service temporarily unavailable, try again later\r\n"
        )
        (err,) = syslog.wait_for("backend-error")
        assert err.fields["backend"] == "/nonexistent/smtpd"
        assert "No such file" in err.fields["error"]


def test_past_max_exec_a_passed_client_hears_421_and_an_overload_is_written(
    syslog: SyslogUDP,
) -> None:
    # Trusted clients skip the delay; each starts a program that keeps its session
    # (as qmail-smtpd idles). Two run at once at most: the third client is told to
    # come back, and the first program's end makes room for the next client.
    port = free_port()
    program = shlex.join(["/bin/sh", "-c", 'printf "220 sh\\r\\n"; read -r line; exit 0'])
    with daemon(
        "-l", f"127.0.0.1:{port}", "--exec", program, "--max-exec", "2",
        "-t", "127.0.0.0/8", "--syslog", syslog.target, *AS_ROOT,
    ):  # fmt: skip
        first, second = connect(port, source="127.0.0.61"), connect(port, source="127.0.0.62")
        assert read_line(first) == b"220 sh\r\n" and read_line(second) == b"220 sh\r\n"
        third = connect(port, source="127.0.0.63")
        assert read_line(third) == b"421 4.3.2 All server ports are busy\r\n"
        (overload,) = syslog.wait_for("overload")
        assert (overload.fields["limit"], overload.fields["client"]) == ("max-exec", "127.0.0.63")
        first.sendall(b"QUIT\r\n")  # its program exits
        syslog.wait_for("exec-end")
        fourth = connect(port, source="127.0.0.64")
        assert read_line(fourth) == b"220 sh\r\n"
        for client in (first, second, third, fourth):
            client.close()
        passed = {ev.fields["client"] for ev in syslog.wait_for("pass", 3)}
        assert passed == {"127.0.0.61", "127.0.0.62", "127.0.0.64"}  # not the one told 421


def test_shutdown_grace_ends_a_program_that_does_not(syslog: SyslogUDP) -> None:
    port = free_port()
    d = Daemon(
        [
            "-l",
            f"127.0.0.1:{port}",
            "--exec",
            "/bin/sh -c 'echo 220 hi; sleep 600'",
            "-t",
            "127.0.0.2",
            "--shutdown-grace",
            "0.5",
            "--syslog",
            syslog.target,
            *AS_ROOT,
        ]
    )
    try:
        d.wait_listening()
        client = connect(port, source="127.0.0.2")
        assert read_line(client) == b"220 hi\n"
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        (end,) = syslog.wait_for("exec-end")
        assert end.fields["end"] == "shutdown"
        assert end.fields["status"] == str(-signal.SIGTERM)
        assert read_line(client) == b""
    finally:
        d.stop()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--exec", "smtpd"], "give the program's absolute path"),
        (["--exec", "'/bin/sh"], "No closing quotation"),
        (["--exec", ""], "expected a program to run"),
        # (a config file's "\u0000": execve refused it for every passed client, unanswered)
        (["--exec", "/bin/cat x\x00y"], "a NUL character cannot be in a program's arguments"),
        (["--exec", "/bin/true", "-b", "127.0.0.1:25"], "give --exec or --backend, not both"),
        ([], "backend is required"),
    ],
)
def test_exec_settings_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    empty = tmp_path / "repeld.toml"
    empty.write_text("")
    try:
        status = main(["-c", str(empty), "--check-config", *argv])
    except SystemExit as exc:
        status = int(exc.code or 0)
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.splitlines()) == 1
    assert message in err


def test_a_balancer_check_reaches_the_program_and_writes_no_event(syslog: SyslogUDP) -> None:
    # --proxy-from with --exec: a v2 LOCAL health check is served by the program at
    # once (the balancer sees its 220), and is no client: no exec-end, no pass.
    from repeld.core.proxyproto import V2_SIGNATURE, v2

    port = free_port()
    program = shlex.join(["/bin/sh", "-c", SMTP_SH])
    with daemon(
        "-l", f"127.0.0.1:{port}",
        "--exec", program,
        "-d", "0.5",
        "--proxy-from", "127.0.0.60/32",
        "--syslog", syslog.target,
        *AS_ROOT,
    ):  # fmt: skip
        check = connect(port, source="127.0.0.60")
        check.sendall(V2_SIGNATURE + bytes([0x20, 0x00, 0, 0]))  # LOCAL
        assert read_line(check).startswith(b"220 sh ready ")
        check.sendall(b"QUIT\r\n")
        assert read_line(check) == b"221 bye\r\n"
        check.close()
        client = connect(port, source="127.0.0.60")
        client.sendall(v2("192.0.2.61", 4061, "127.0.0.1", port))
        assert (
            read_line(client)
            == f"220 sh ready 192.0.2.61:4061 to 127.0.0.1:{port} TCP\r\n".encode()
        )
        client.sendall(b"QUIT\r\n")
        assert read_line(client) == b"221 bye\r\n"
        client.close()
        (end,) = syslog.wait_for("exec-end")
        assert end.fields["client"] == "192.0.2.61"
        syslog.drain(0.3)
        assert len(syslog.named("exec-end")) == 1 and len(syslog.named("pass")) == 1

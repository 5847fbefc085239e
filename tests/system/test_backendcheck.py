"""`repeld --check-backend` and the daemon's own check, against real MTAs.

A real Postfix in haproxy mode (tests/postfix_fixture.py), aiosmtpd advertising
PIPECONNECT from its EHLO hook, and a port nobody listens on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from aiosmtpd.controller import Controller

from repeld.config.values import Backend
from repeld.shell.backendcheck import check_backend

from ..postfix_fixture import POSTFIX, postfix_instance
from ..procs import SyslogUDP, free_port, read_line
from ..procs import connect as tcp_connect
from ..procs import daemon as repeld_daemon

TIMEOUT = 60.0
AS_ROOT = ["--user", "root"] if os.geteuid() == 0 else []
SRC = Path(__file__).resolve().parents[2] / "src"


def check_backend_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "repeld", "--check-backend", "--no-cache", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )


@pytest.mark.skipif(POSTFIX is None, reason="postfix is not installed")
def test_postfix_in_haproxy_mode_needs_a_proxy_header() -> None:
    with postfix_instance(upstream_proxy="haproxy") as pf:
        backend = f"127.0.0.1:{pf.port}"
        plain = check_backend_cli("--backend", backend, "--proxy-protocol", "none")
        assert plain.returncode == 1, plain
        (line,) = plain.stdout.splitlines()
        assert line.startswith(f"{backend} (no PROXY header): FAILED: ")
        assert "expect a PROXY header" in line
        assert "--proxy-protocol v1" in line
        assert "Server local error" in line  # what Postfix answers a line without a header
        pf.wait_log(r"warning: haproxy read: \w+ protocol header: EHLO ")

        for version in ("v1", "v2"):
            done = check_backend_cli("--backend", backend, "--proxy-protocol", version)
            assert done.returncode == 0, done
            (line,) = done.stdout.splitlines()
            assert line.startswith(f"{backend} (PROXY {version}): ok: greeting '220 ")
            assert "postfix-behind-repeld" in line
            assert "capabilities: PIPELINING, SIZE 10240000" in line
            assert "warning" not in line


@pytest.mark.skipif(POSTFIX is None, reason="postfix is not installed")
def test_postfix_without_proxy_refuses_a_header() -> None:
    with postfix_instance(upstream_proxy="") as pf:
        done = check_backend_cli("--backend", f"127.0.0.1:{pf.port}", "--proxy-protocol", "v1")
        assert done.returncode == 1, done
        assert "answers the PROXY v1 header as an SMTP command" in done.stdout
        assert "--proxy-protocol none" in done.stdout


def test_a_dead_port_is_one_clear_line() -> None:
    port = free_port()
    done = check_backend_cli("--backend", f"127.0.0.1:{port}")
    assert done.returncode == 1, done
    assert done.stdout == f"127.0.0.1:{port} (no PROXY header): FAILED: cannot connect: " + (
        os.strerror(111) + "\n"
    )
    assert done.stderr == ""


def test_every_listener_backend_is_checked() -> None:
    dead1, dead2 = free_port(), free_port()
    done = check_backend_cli(
        "--backend",
        f"127.0.0.1:{dead1}",
        "--listen",
        "127.0.0.1:0",
        "--listen",
        f"127.0.0.2:0,nodelay,backend=127.0.0.1:{dead2}",
    )
    assert done.returncode == 1, done
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [f"127.0.0.1:{dead1}", f"127.0.0.1:{dead2}"]


class PipeConnectHandler:
    """aiosmtpd handler whose EHLO reply advertises Exim's early pipelining."""

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPECONNECT", responses[-1]]


@contextlib.contextmanager
def pipeconnect_backend() -> Iterator[int]:
    controller: Any = None
    for _attempt in range(5):  # the free port may be taken between probe and bind
        port = free_port()
        controller = Controller(
            PipeConnectHandler(), hostname="127.0.0.1", port=port, ready_timeout=TIMEOUT
        )
        try:
            controller.start()
        except OSError:
            continue
        break
    try:
        yield port
    finally:
        controller.stop()


def test_pipeconnect_is_a_warning_when_the_filter_is_off() -> None:
    with pipeconnect_backend() as port:
        off = trio.run(
            lambda: check_backend(Backend("127.0.0.1", port), "none", keep_pipe_connect=True)
        )
        on = trio.run(
            lambda: check_backend(Backend("127.0.0.1", port), "none", keep_pipe_connect=False)
        )
    assert off.ok and on.ok
    assert "PIPECONNECT" in off.capabilities and "PIPECONNECT" in on.capabilities
    assert len(off.warnings) == 1 and "--keep-pipe-connect" in off.warnings[0]
    assert on.warnings == ()


def test_pipeconnect_with_the_default_filter_passes_the_cli() -> None:
    with pipeconnect_backend() as port:
        done = check_backend_cli("--backend", f"127.0.0.1:{port}")
    assert done.returncode == 0, done
    assert "PIPECONNECT" in done.stdout
    assert "warning" not in done.stdout


def test_pipeconnect_warning_from_the_cli_with_keep_pipe_connect() -> None:
    with pipeconnect_backend() as port:
        done = check_backend_cli("--backend", f"127.0.0.1:{port}", "--keep-pipe-connect")
    assert done.returncode == 0, done
    assert "; warning: advertises PIPECONNECT" in done.stdout


@pytest.mark.skipif(POSTFIX is None, reason="postfix is not installed")
def test_the_daemon_warns_at_start_and_still_serves(syslog: SyslogUDP) -> None:
    # Postfix wants a header, repeld sends none: a warning event, and clients
    # are still accepted and held meanwhile (and get Postfix's refusal later).
    with (
        postfix_instance(upstream_proxy="haproxy") as pf,
        repeld_daemon(
            "--listen",
            "127.0.0.1:0",
            "--backend",
            f"127.0.0.1:{pf.port}",
            "--proxy-protocol",
            "none",
            "--delay",
            "0.2",
            "--syslog",
            syslog.target,
            *AS_ROOT,
        ) as rd,
    ):
        client = tcp_connect(rd.address[1])  # served while the check runs
        with client:
            (warning,) = syslog.wait_for("backend-check", timeout=TIMEOUT)
            assert warning.fields["backend"] == f"127.0.0.1:{pf.port}"
            assert "expect a PROXY header" in warning.fields["message"]
            assert warning.severity == 4  # warning
            rd.wait_line(rf"^repeld: warning: backend 127\.0\.0\.1:{pf.port}: .*PROXY header")
            syslog.wait_for("pass", timeout=TIMEOUT)
            # Relayed to a Postfix that takes the client's first line for a header.
            client.sendall(b"EHLO client.test\r\n")
            assert read_line(client).startswith(b"421 4.3.0 ")
        assert rd.proc.poll() is None  # still serving
        rd.signal(signal.SIGHUP)  # an applied reload checks again
        syslog.wait_for("reload", timeout=TIMEOUT)
        again = syslog.wait_for("backend-check", count=2, timeout=TIMEOUT)
        assert again[1].fields["backend"] == f"127.0.0.1:{pf.port}"

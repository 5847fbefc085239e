"""Real processes for tests: repeld as a subprocess, a UDP syslog receiver and a
tiny threaded SMTP backend, all on loopback.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from signal import SIGTERM

import redis

from .syslog_receiver import Received, parse

TIMEOUT = 30.0
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate()` until it is true or `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def proc_state(pid: int) -> str:
    """`pid`'s state letter in /proc (R, S, T, Z...); Linux only."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def wait_log_match(
    read: Callable[[], str], pattern: str, timeout: float, where: object, interval: float = 0.05
) -> re.Match[str]:
    """The first match of `pattern` in the log `read()` returns, waiting up to `timeout` s;
    an AssertionError naming `where` and showing the log's end if none comes."""
    rx = re.compile(pattern, re.M)
    found: list[re.Match[str]] = []

    def check() -> bool:
        m = rx.search(read())
        if m:
            found.append(m)
        return m is not None

    if not wait_for(check, timeout, interval):
        raise AssertionError(
            f"no line matching {pattern!r} in {where} within {timeout}s:\n" + read()[-4000:]
        )
    return found[0]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class SyslogUDP:
    """A real UDP syslog receiver; every datagram must parse."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.messages: list[Received] = []
        self.raw: list[bytes] = []

    @property
    def target(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"udp://[{host}]:{port}" if ":" in host else f"udp://{host}:{port}"

    def _receive(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        self.raw.append(data)
        self.messages.append(parse(data))
        return True

    def wait_for(self, event: str, count: int = 1, timeout: float = TIMEOUT) -> list[Received]:
        """At least `count` messages for `event`, waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.messages if m.event == event]
            if len(found) >= count:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"expected {count} {event!r} event(s) within {timeout}s, "
                    f"got {[m.event for m in self.messages]}"
                )
            self._receive(left)

    def drain(self, seconds: float = 0.2) -> None:
        """Take in whatever arrives within `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._receive(deadline - time.monotonic())

    def named(self, event: str) -> list[Received]:
        return [m for m in self.messages if m.event == event]

    def close(self) -> None:
        self.sock.close()


#: Puts the inherited fds (given as numbers >= 10) at 3, 4, ..., sets LISTEN_PID to
#: its own pid and execs the command: what a service manager does, and exec keeps
#: the pid. (dash cannot redirect fds above 9, so this is not a shell one-liner.)
SYSTEMD_LAUNCHER = r"""
import os, sys
count = int(sys.argv[1])
high = [int(a) for a in sys.argv[2 : 2 + count]]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
argv = sys.argv[2 + count :]
os.execv(argv[0], argv)
"""


def launched_by_systemd(fds: Sequence[int], argv: Sequence[str]) -> list[str]:
    """`argv` run as systemd runs a socket-activated service: `fds` (numbered 10
    or more, inheritable) at 3.. and LISTEN_PID its pid; LISTEN_FDS and
    LISTEN_FDNAMES are the caller's, in the environment."""
    return [sys.executable, "-c", SYSTEMD_LAUNCHER, str(len(fds)), *map(str, fds), *argv]


class Daemon:
    """`python -m repeld -f ARGS` with its stderr collected line by line."""

    def __init__(
        self, args: Sequence[str], env: dict[str, str] | None = None, inherit: Sequence[int] = ()
    ) -> None:
        # No test writes to the system's pass cache: off unless a test names one.
        cache = [] if any(a.startswith("--cache") for a in args) else ["--no-cache"]
        self.argv = [sys.executable, "-m", "repeld", "-f", *cache, *args]
        # `inherit`: listening sockets' fds handed over as systemd does.
        self.proc = subprocess.Popen(
            launched_by_systemd(inherit, self.argv) if inherit else self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            pass_fds=tuple(inherit),
        )
        self.lines: list[str] = []
        self.address: tuple[str, int] = ("", 0)
        self.killed = False
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def stderr_text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_line(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """The first stderr line matching `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    m = rx.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    raise AssertionError(
                        f"no stderr line matching {pattern!r} (exit {self.proc.poll()}):\n"
                        + "\n".join(self.lines)
                    )
                self._cond.wait(left)

    def wait_listening(self) -> tuple[str, int]:
        """The first bound address, once repeld says it listens (also in `.address`)."""
        m = self.wait_line(r"^repeld: listening on .* \(bound (?P<bound>[^)]*)\)")
        host, _, port = m["bound"].split()[0].rpartition(":")
        self.address = (host.strip("[]"), int(port))
        return self.address

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            status = self.proc.wait(timeout)
        finally:
            self._reader.join(timeout)
        return status

    def stop(self, sig: int = SIGTERM, timeout: float = TIMEOUT) -> int:
        """Signal it, then SIGKILL if it does not exit (`.killed`); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        return int(self.proc.returncode)


def run_repeld(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`python -m repeld ARGS` run to its end: its status, stdout and stderr
    (`timeout` bounds one that should exit at once: a hung one is killed)."""
    return subprocess.run(
        [sys.executable, "-m", "repeld", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@contextlib.contextmanager
def daemon(
    *args: str, env: dict[str, str] | None = None, inherit: Sequence[int] = ()
) -> Iterator[Daemon]:
    """A running repeld (listening); always stopped afterwards."""
    d = Daemon(args, env, inherit)
    try:
        d.wait_listening()
        yield d
    finally:
        d.stop()


class _LineHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, LineBackend)
        server.sessions += 1
        self.wfile.write(b"220 backend.test ESMTP\r\n")
        for line in self.rfile:
            server.lines.append(line)
            if line.strip().upper() == b"QUIT":
                self.wfile.write(b"221 2.0.0 bye\r\n")
                return
            self.wfile.write(b"250 ok\r\n")


class LineBackend(socketserver.ThreadingTCPServer):
    """A tiny SMTP-shaped MTA in threads: 220, then 250 to anything, 221 to QUIT."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _LineHandler)
        self.sessions = 0
        self.lines: list[bytes] = []
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


def read_line(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    """One CRLF line from a blocking socket (b"" at EOF)."""
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def connect(port: int, source: str | None = None, host: str = "127.0.0.1") -> socket.socket:
    """A blocking client connection, optionally from a chosen loopback source."""
    return socket.create_connection(
        (host, port), timeout=TIMEOUT, source_address=(source, 0) if source else None
    )


class RedisServer:
    """One redis-server process on 127.0.0.1:port, restartable on the same port."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        password: str | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = port
        self.password = password
        self.tls = tls  # (certificate, key): TLS only, on `port`
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        args = [REDIS_SERVER, "--save", "", "--appendonly", "no"]
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            cert, key = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            args += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
        args += ["--bind", "127.0.0.1", "--dir", str(self.workdir), "--daemonize", "no"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client(timeout=0.2).ping():
                    return
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                log_text = (self.workdir / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server did not start:\n{log_text}")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # SIGKILL works on a stopped process too
            self.proc.wait(timeout=10)
        self.proc = None

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # the test's own view of the server: no check of its certificate
            ssl=self.tls is not None,
            ssl_cert_reqs="none",
        )

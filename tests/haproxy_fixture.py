"""A real HAProxy in front of repeld: TCP mode, PROXY v2 to the server, SMTP checks.

Debian's `haproxy` (2.6) runs in the foreground (`haproxy -f CFG -db`) with a
private configuration in a test directory, never the system service. One
frontend listens on loopback (127.0.0.1, and ::1 when asked, on one free port)
and sends every connection to one server, `repeld`, at the address given, the
way an MX fleet runs it:

    server repeld HOST:PORT send-proxy-v2 check check-send-proxy inter 1s
    option smtpchk

so the server gets a PROXY v2 header naming the real client before the
client's bytes, and HAProxy's own health checks arrive as v2 LOCAL headers
followed by an SMTP `HELO`; the server is UP when they see a 2xx greeting.
`proxy_v2_options` adds TLVs (e.g. "crc32c"), `source` makes HAProxy connect
to the server from that loopback address (so a test can give repeld a
`--proxy-from` that no test client shares).

The server's state is read from HAProxy's stats socket (`show stat`), as an
operator would: `server_status()` is "UP", "DOWN", "no check", ... and
`wait_status()` waits for one. Clients choose their own 127.x.y.z source
addresses; HAProxy passes them on in the header.

Used by tests/system/test_balancers.py, and by bench/bench-hold (--balancer).
"""

from __future__ import annotations

import csv
import io
import shutil
import socket
import subprocess
import time
from pathlib import Path

from .procs import free_port, wait_for

__all__ = ["HAPROXY", "Haproxy"]

HAPROXY = shutil.which("haproxy") or (
    "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
)

#: Bounds for a hung process, not speed assertions.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Haproxy:
    """HAProxy in the foreground: frontend on `host:port` (and `[::1]:port` if
    `ipv6`), server `repeld` at `backend`; stats socket `stats_path`. A context
    manager: `with Haproxy(tmp_path, repeld.address) as proxy: ...` stops it."""

    def __init__(
        self,
        workdir: Path,
        backend: tuple[str, int],
        *,
        ipv6: bool = False,
        proxy_v2_options: str = "",
        source: str | None = None,
        check: bool = True,
        inter: str = "1s",
        timeout: str = "120s",
        maxconn: int = 4000,
    ) -> None:
        assert HAPROXY is not None, "haproxy is not installed (apt-get install haproxy)"
        assert backend[0].startswith("127.") or backend[0] == "::1", "loopback only"
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.stats_path = workdir / "haproxy-stats.sock"
        self.log = workdir / "haproxy.log"
        server = f"server repeld {_endpoint(*backend)} send-proxy-v2"
        if proxy_v2_options:
            server += f" proxy-v2-options {proxy_v2_options}"
        if source:
            server += f" source {source}"
        if check:
            server += f" check check-send-proxy inter {inter}"
        binds = [f"  bind {self.host}:{self.port}"]
        if ipv6:
            binds.append(f"  bind [::1]:{self.port}")
        conf = [
            "# private test instance written by tests/haproxy_fixture.py",
            "global",
            f"  maxconn {maxconn}",
            f"  stats socket {self.stats_path} mode 600 level admin",
            "  log stdout format raw local0 info",
            "defaults",
            "  mode tcp",
            "  log global",
            "  option tcplog",
            "  timeout connect 5s",
            f"  timeout client {timeout}",
            f"  timeout server {timeout}",
            "frontend smtp",
            *binds,
            f"  maxconn {maxconn}",
            "  default_backend mx",
            "backend mx",
            "  option smtpchk",
            f"  {server}",
            "",
        ]
        self.config = workdir / "haproxy.cfg"
        self.config.write_text("\n".join(conf))
        self._out = self.log.open("wb")
        self.proc = subprocess.Popen(
            [HAPROXY, "-f", str(self.config), "-db"],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        # The stats socket answers once every listener is bound.
        if not wait_for(self._answers, START_TIMEOUT, 0.05) or self.proc.poll() is not None:
            self.close()
            raise AssertionError(f"haproxy did not start:\n{self.log_text()}")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            return True  # reported by the caller's check below
        try:
            return "Name: HAProxy" in self.command("show info")
        except OSError:
            return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def command(self, line: str) -> str:
        """One command on the stats socket, and its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5.0)
            s.connect(str(self.stats_path))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def server_stat(self) -> dict[str, str]:
        """The `show stat` row of server `repeld` (status, check_status, scur, ...)."""
        text = self.command("show stat").lstrip("# ")
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("pxname") == "mx" and row.get("svname") == "repeld":
                return dict(row)
        raise AssertionError(f"no server mx/repeld in show stat:\n{text}")

    def server_status(self) -> str:
        """ "UP", "DOWN", "UP 1/3" (going down), "no check", ... as HAProxy says it."""
        return self.server_stat()["status"]

    def wait_status(self, status: str, timeout: float = 30.0) -> dict[str, str]:
        """Wait until the server's status is `status`; its stat row then."""
        deadline = time.monotonic() + timeout
        while True:
            row = self.server_stat()
            if row["status"] == status:
                return row
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"server status {row['status']!r} ({row.get('check_status')},"
                    f" {row.get('last_chk')!r}), not {status!r} within {timeout}s"
                )
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self._out.close()

    def __enter__(self) -> Haproxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

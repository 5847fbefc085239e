"""A real nginx `stream` proxy in front of repeld, sending PROXY v1.

Debian's nginx (`nginx-light`, or any flavour) with `libnginx-mod-stream` runs
in the foreground (`nginx -c CFG -p DIR -e LOG -g 'daemon off;'`) with a
private configuration that loads the stream module itself, never the system
service or /etc/nginx:

    stream { server { listen 127.0.0.1:PORT; proxy_pass HOST:PORT; proxy_protocol on; } }

so the server gets `PROXY TCP4 client balancer cport bport\\r\\n` before the
client's bytes (nginx has no health checks in its free `stream` module).
`ipv6` adds `listen [::1]:PORT`; `source` is `proxy_bind`, the loopback
address nginx connects to the server from.

The start waits until the port listens, seen in /proc/net/tcp, without a
probe connection (which nginx would relay, header and all).

Used by tests/system/test_balancers.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from .procs import free_port, wait_for

__all__ = ["NGINX", "STREAM_MODULE", "Nginx", "listening"]

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
STREAM_MODULE = next(
    (
        path
        for path in (
            Path("/usr/lib/nginx/modules/ngx_stream_module.so"),
            Path("/usr/share/nginx/modules/ngx_stream_module.so"),
        )
        if path.exists()
    ),
    None,
)

#: Bounds for a hung process, not speed assertions.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def listening(port: int) -> bool:
    """Whether a TCP listener on `port` exists (IPv4 or IPv6), asked without connecting."""
    hexport = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for cols in (line.split() for line in lines):
            if len(cols) > 3 and cols[1].endswith(hexport) and cols[3] == "0A":  # LISTEN
                return True
    return False


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Nginx:
    """nginx in the foreground, `stream` proxy from `host:port` to `backend` with
    `proxy_protocol on`. A context manager, like tests/haproxy_fixture.Haproxy."""

    def __init__(
        self,
        workdir: Path,
        backend: tuple[str, int],
        *,
        ipv6: bool = False,
        source: str | None = None,
        timeout: str = "120s",
    ) -> None:
        assert NGINX is not None, "nginx is not installed (apt-get install nginx-light)"
        assert STREAM_MODULE is not None, "apt-get install libnginx-mod-stream"
        assert backend[0].startswith("127.") or backend[0] == "::1", "loopback only"
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.log = workdir / "nginx-error.log"
        listens = [f"    listen {self.host}:{self.port};"]
        if ipv6:
            listens.append(f"    listen [::1]:{self.port};")
        conf = [
            "# private test instance written by tests/nginx_fixture.py",
            f"load_module {STREAM_MODULE};",
            f"pid {workdir}/nginx.pid;",
            f"error_log {self.log} info;",
            "worker_processes 1;",
            "events { worker_connections 1024; }",
            "stream {",
            "  server {",
            *listens,
            f"    proxy_pass {_endpoint(*backend)};",
            "    proxy_protocol on;",
            f"    proxy_timeout {timeout};",
            *([f"    proxy_bind {source};"] if source else []),
            "  }",
            "}",
            "",
        ]
        self.config = workdir / "nginx.conf"
        self.config.write_text("\n".join(conf))
        self.proc = subprocess.Popen(
            [
                NGINX,
                "-c", str(self.config),
                "-p", str(workdir),
                "-e", str(self.log),  # the log before the configuration is read, too
                "-g", "daemon off;",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        up = wait_for(lambda: self.proc.poll() is not None or listening(self.port), START_TIMEOUT)
        if not up or self.proc.poll() is not None:
            self.close()
            raise AssertionError(f"nginx did not start:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: nginx's fast shutdown
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

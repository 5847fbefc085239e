"""A real DNS server for the DNS list tests: NSD on loopback, behind a counting forwarder.

NSD (Debian's `nsd`) runs in the foreground with a private configuration in a
test directory and serves the test zones below on 127.0.0.1. repeld is given
the `Forwarder` as its `--resolver`: a small UDP forwarder in front of NSD that
counts every query by name, so a test can see how many queries reached the
server, and that drops the queries under `silent.test`, a list that never
answers. Clients connect from distinct 127.0.0.x sources, which the zones list
or not:

    127.0.0.2  bl.test 127.0.0.2
    127.0.0.3  bl.test 127.0.0.3 (a filter of 127.0.0.2 does not count it)
    127.0.0.4  wl.test 127.0.2.1
    127.0.0.5  bl.test 127.0.0.2 and wl.test 127.0.2.1 (the weights decide)
    127.0.0.6  nowhere (NXDOMAIN)
    ::1        bl.test 127.0.0.2 (the 32 nibbles of ip6.arpa)

Used by tests/system/test_dnsbl.py and tests/system/test_dnsbl_metrics.py.
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import dns.message

from .procs import free_port, wait_for

__all__ = ["NSD", "TTL", "ZONES", "Forwarder", "Nsd", "dns_server"]

NSD = shutil.which("nsd") or ("/usr/sbin/nsd" if Path("/usr/sbin/nsd").exists() else None)

ZONES = {
    "bl.test": [
        "2.0.0.127 IN A 127.0.0.2",
        "3.0.0.127 IN A 127.0.0.3",
        "5.0.0.127 IN A 127.0.0.2",
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0 IN A 127.0.0.2",
    ],
    "wl.test": ["4.0.0.127 IN A 127.0.2.1", "5.0.0.127 IN A 127.0.2.1"],
    "silent.test": [],
}
TTL = 300


def _zone(name: str, records: list[str]) -> str:
    return "\n".join(
        [
            f"$ORIGIN {name}.",
            f"$TTL {TTL}",
            f"@ IN SOA ns.{name}. hostmaster.{name}. 1 3600 600 86400 60",
            f"@ IN NS ns.{name}.",
            "ns IN A 127.0.0.1",
            *records,
            "",
        ]
    )


class Nsd:
    """NSD in the foreground with a private configuration, on 127.0.0.1:port."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        conf = [
            "server:",
            f"  ip-address: 127.0.0.1@{self.port}",
            f"  port: {self.port}",
            '  username: ""',
            '  chroot: ""',
            f'  zonesdir: "{workdir}"',
            '  database: ""',
            f'  pidfile: "{workdir}/nsd.pid"',
            f'  xfrdfile: "{workdir}/xfrd.state"',
            f'  zonelistfile: "{workdir}/zone.list"',
            f'  logfile: "{workdir}/nsd.log"',
            "  server-count: 1",
            "  do-ip6: no",
            "remote-control:",
            "  control-enable: no",
        ]
        for name, records in ZONES.items():
            (workdir / f"{name}.zone").write_text(_zone(name, records))
            conf += ["zone:", f'  name: "{name}"', f'  zonefile: "{name}.zone"']
        (workdir / "nsd.conf").write_text("\n".join(conf) + "\n")
        assert NSD is not None
        self.proc = subprocess.Popen(
            [NSD, "-d", "-c", str(workdir / "nsd.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.log = workdir / "nsd.log"
        started = wait_for(
            lambda: self.log.exists() and "nsd started" in self.log.read_text(), 20.0
        )
        assert started, self.log.read_text() if self.log.exists() else "no nsd log"

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _big_receive_buffer(sock: socket.socket) -> None:
    # repeld sends hundreds of queries at once and this forwarder serves them one
    # by one: room for them all, past net.core.rmem_max when root may.
    size = 8 << 20
    try:
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


class Forwarder:
    """A UDP DNS forwarder that counts the queries by name, and drops those under
    silent.test (a list that never answers)."""

    def __init__(self, upstream: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        _big_receive_buffer(self.sock)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.upstream = ("127.0.0.1", upstream)
        self.queries: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._closed:
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            name = str(dns.message.from_wire(data).question[0].name).rstrip(".")
            with self._lock:
                self.queries[name] += 1
            if name.endswith(".silent.test"):
                continue  # read and dropped: the list never answers
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as up:
                up.settimeout(5.0)
                up.sendto(data, self.upstream)
                try:
                    answer = up.recv(4096)
                except TimeoutError:
                    continue
            self.sock.sendto(answer, peer)

    def count(self, name: str) -> int:
        with self._lock:
            return self.queries[name]

    def counts(self) -> collections.Counter[str]:
        """A copy of the counts so far (subtract an earlier copy for a test's own)."""
        with self._lock:
            return collections.Counter(self.queries)

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()


@contextlib.contextmanager
def dns_server(workdir: Path) -> Iterator[Forwarder]:
    """NSD serving ZONES from `workdir`, and the counting forwarder in front of it."""
    nsd = Nsd(workdir)
    try:
        forwarder = Forwarder(nsd.port)
        try:
            yield forwarder
        finally:
            forwarder.close()
    finally:
        nsd.close()

"""Addresses and sockets of the load: loopback only.

Every address a benchmark uses goes through `assert_loopback`; the ports the
servers listen on are below the ephemeral range, so the load's own source ports
never collide with them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import resource
import socket
import sys
import time
from collections.abc import Iterator

#: Linux: let connect() choose the source port (4-tuple unique), so thousands of
#: sockets on one source address do not exhaust bind()'s port search.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def assert_loopback(*addresses: str) -> None:
    """Exit 2 if any address (or network, ADDR/LEN) is not loopback (127.0.0.0/8 or ::1)."""
    for addr in addresses:
        net = ipaddress.ip_network(addr)
        if not (net.network_address.is_loopback and net.broadcast_address.is_loopback):
            print(f"refusing non-loopback address {addr}", file=sys.stderr)
            sys.exit(2)


def sources(spec: str) -> Iterator[str]:
    """The source address of each connection: `spec` every time for an address,
    or, for an IPv4 network (127.100.0.0/16), each of its addresses in turn,
    leaving out those ending in .0 and .255, and from the first again at the end."""
    if "/" not in spec:
        while True:
            yield spec
    net = ipaddress.IPv4Network(spec)
    first, size = int(net.network_address), net.num_addresses
    while True:
        for offset in range(size):
            if (first + offset) & 0xFF not in (0, 255):
                yield str(ipaddress.IPv4Address(first + offset))


def _port_free(port: int) -> bool:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port(used: set[int] | None = None) -> int:
    """A TCP port that nothing listens on, below the ephemeral range (32768+) so
    that the load's own source ports can never collide with it."""
    used = used if used is not None else set()
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(500):
        port = rng.randrange(20000, 32000)
        if port not in used and _port_free(port):
            used.add(port)
            return port
    raise RuntimeError("no free TCP port found in 20000-31999")


def wait_listening(port: int, timeout: float = 20.0) -> bool:
    """Whether a listener on `port` shows up in /proc/net/tcp* within `timeout`
    (checked without connecting, so no server logs a probe)."""
    hexport = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(path) as f:
                    next(f)
                    for line in f:
                        parts = line.split()
                        if parts[1].endswith(hexport) and parts[3] == "0A":
                            return True
            except OSError:
                pass
        time.sleep(0.05)
    return False


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def bind_source(sock: socket.socket, source: str | None) -> None:
    """Bind `sock` to a source address with IP_BIND_ADDRESS_NO_PORT (IPv4)."""
    if source:
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))


def rst_close(sock: socket.socket) -> None:
    """Abortive close (RST): leaves no TIME_WAIT, so back-to-back runs do not pile up."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()

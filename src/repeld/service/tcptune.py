"""TCP tuning and introspection for repeld's sockets, on Linux and FreeBSD.

Every function takes a raw file descriptor and raises ``OSError`` (with the
errno the kernel gave) when the kernel refuses, e.g. ``EBADF`` for a closed fd.

What ``socket.setsockopt`` can already do (keepalive, SO_LINGER) is done here in
Python.  The compiled ``repeld._tcpnative`` (native/tcpnative.c) covers the rest:
``struct tcp_info``, whose layout and state numbers differ between the platforms,
TCP_USER_TIMEOUT, decided by the headers the module was built against, and
FreeBSD's ``sysctlbyname``.

Platform differences:

* ``TcpInfo.state`` is the platform's own number (Linux ``TCP_ESTABLISHED`` is 1,
  FreeBSD ``TCPS_ESTABLISHED`` is 4); ``state_name`` is the same on both, spelled
  as FreeBSD's netstat spells it (``ESTABLISHED``, ``SYN_RCVD``, ``CLOSE_WAIT``...).
* ``TcpInfo.bytes_received`` is Linux's ``tcpi_bytes_received``.  FreeBSD's
  ``struct tcp_info`` has no byte count (``tcpi_rcv_nxt`` is a sequence number
  whose initial value is not exposed), so it is always 0 there.
* ``TcpInfo.retransmits`` is ``tcpi_total_retrans`` on Linux and
  ``tcpi_snd_rexmitpack`` on FreeBSD: segments retransmitted over the connection.
* TCP_USER_TIMEOUT exists on Linux only; ``set_user_timeout`` returns False elsewhere.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from repeld._tcpnative import ffi, lib

__all__ = [
    "TcpInfo",
    "accept_queue_cap",
    "platform_has_user_timeout",
    "rtt_us",
    "set_abortive_close",
    "set_keepalive",
    "set_user_timeout",
    "syn_backlog",
    "tcp_info",
]

_LINUX = sys.platform.startswith("linux")
_PROC_SOMAXCONN = Path("/proc/sys/net/core/somaxconn")
_PROC_SYN_BACKLOG = Path("/proc/sys/net/ipv4/tcp_max_syn_backlog")
_MAX_USER_TIMEOUT_MS = 2**31 - 1


@dataclass(frozen=True, slots=True)
class TcpInfo:
    """What the kernel knows about one connection, for logging and diagnosing a client."""

    state: int
    state_name: str
    rtt_us: int
    rttvar_us: int
    retransmits: int
    bytes_received: int


def _raise_errno() -> NoReturn:
    """Report the errno of the C call that just failed as the OSError Python code expects."""
    err = ffi.errno
    raise OSError(err, os.strerror(err))


@contextmanager
def _borrowed(fd: int) -> Iterator[socket.socket]:
    """Lend the stdlib socket API to an fd the caller owns, without closing it afterwards."""
    if fd < 0:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))
    # socket(fileno=) checks the fd (EBADF, ENOTSOCK) and uses it, not a dup;
    # detach() hands it back.  It would set O_NONBLOCK only if someone had called
    # socket.setdefaulttimeout(), which repeld does not.
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def set_keepalive(fd: int, idle: int, interval: int, count: int) -> None:
    """Let the kernel find and drop peers that vanished without closing the connection."""
    for name, value in (("idle", idle), ("interval", interval), ("count", count)):
        if value < 1:
            raise ValueError(f"keepalive {name} must be at least 1, not {value}")
    with _borrowed(fd) as sock:
        # Timings first, so a value the kernel rejects leaves keepalive off.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def platform_has_user_timeout() -> bool:
    """Tell callers whether set_user_timeout can take effect on this platform."""
    return bool(lib.REPELD_HAVE_USER_TIMEOUT)


def set_user_timeout(fd: int, ms: int) -> bool:
    """Bound how long a stalled peer can keep unacknowledged data, and so the connection."""
    if not 0 <= ms <= _MAX_USER_TIMEOUT_MS:
        raise ValueError(f"user timeout must be 0..{_MAX_USER_TIMEOUT_MS} ms, not {ms}")
    rc = lib.repeld_set_user_timeout(fd, ms)
    if rc == lib.REPELD_UNSUPPORTED:
        return False
    if rc == -1:
        _raise_errno()
    return True


def set_abortive_close(fd: int) -> None:
    """Make close() reset the connection, so a dropped client leaves no TIME_WAIT behind."""
    with _borrowed(fd) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def tcp_info(fd: int) -> TcpInfo:
    """Snapshot the kernel's view of a connection (state, RTT, loss, volume) for the logs."""
    out = ffi.new("struct repeld_tcp_info *")
    if lib.repeld_tcp_info(fd, out) == -1:
        _raise_errno()
    name = ffi.string(lib.repeld_tcp_state_name(out.state)).decode("ascii")
    return TcpInfo(
        state=out.state,
        state_name=name,
        rtt_us=out.rtt_us,
        rttvar_us=out.rttvar_us,
        retransmits=out.retransmits,
        bytes_received=out.bytes_received,
    )


def rtt_us(fd: int) -> int:
    """The smoothed round-trip time alone (what tcp_info(fd).rtt_us says), more cheaply."""
    rtt = lib.repeld_tcp_rtt_us(fd)
    if rtt == -1:
        _raise_errno()
    return rtt


def _sysctl_uint(name: str) -> int:
    """Read a FreeBSD kernel limit that is only available through sysctlbyname."""
    value = lib.repeld_sysctl_uint(name.encode("ascii"))
    if value == -1:
        _raise_errno()
    return value


def accept_queue_cap() -> int:
    """Report the ceiling the kernel silently puts on any listen() backlog."""
    if _LINUX:
        return int(_PROC_SOMAXCONN.read_text(encoding="ascii"))
    # FreeBSD; elsewhere the C side fails with ENOSYS.
    return _sysctl_uint("kern.ipc.soacceptqueue")


def syn_backlog() -> int | None:
    """Report how many half-open connections the kernel will queue, or None if unknown."""
    try:
        if _LINUX:
            return int(_PROC_SYN_BACKLOG.read_text(encoding="ascii"))
        # FreeBSD keeps half-open connections in the syncache, one for the system.
        try:
            return _sysctl_uint("net.inet.tcp.syncache.cachelimit")
        except OSError:
            return _sysctl_uint("net.inet.tcp.syncache.bucketlimit") * _sysctl_uint(
                "net.inet.tcp.syncache.hashsize"
            )
    except (OSError, ValueError):
        return None

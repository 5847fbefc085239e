"""TCP tuning and introspection for repeld's sockets, on Linux and FreeBSD.

Every function takes a raw file descriptor and raises ``OSError`` (with the
errno the kernel gave) when the kernel refuses, e.g. ``EBADF`` for a closed fd.

This is the one home of repeld's kernel tuning, and it is all done in C, in the
compiled ``repeld._tcpnative`` (native/tcpnative.c), so no option is ever set one
way here and another way there: TCP_NODELAY, keepalive (idle, interval, count),
TCP_USER_TIMEOUT (decided by the headers the module was built against), the
abortive close (SO_LINGER 0); the kernel's caps (somaxconn or
kern.ipc.soacceptqueue, the SYN backlog or FreeBSD's syncache); ``struct
tcp_info``, whose layout and state numbers differ between the platforms; and
``accept4`` and a timerfd for the accept loop (`Acceptor`, `WakeTimer`).

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
from dataclasses import dataclass
from typing import NoReturn

from repeld._tcpnative import ffi, lib

__all__ = [
    "Acceptor",
    "TcpInfo",
    "WakeTimer",
    "accept_queue_cap",
    "platform_has_user_timeout",
    "rtt_ms",
    "set_abortive_close",
    "set_keepalive",
    "set_nodelay",
    "set_user_timeout",
    "syn_backlog",
    "tcp_info",
]

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


class Acceptor:
    """accept4() on one listener: each client's fd and address, or None when none waits.

    The accept loop's own call, in C rather than through ``socket.accept()``:
    the public method converts the listener's family and type to enums and
    builds a socket object per client (about half of its cost), and Python
    gives no public way to take just the fd. The client comes non-blocking and
    close-on-exec from the one system call; the caller wraps the fd once.
    """

    __slots__ = ("_fd", "_peer")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._peer = ffi.new("struct repeld_peer *")

    def accept(self) -> tuple[int, tuple[str, int]] | None:
        """The next client's fd and (host, port); None if none is waiting.

        Raises OSError with the kernel's errno for anything else (EMFILE,
        ECONNABORTED, EBADF...): the caller decides what each one means.
        """
        fd = lib.repeld_accept(self._fd, self._peer)
        if fd == -1:
            err = ffi.errno
            if err == errno.EAGAIN or err == errno.EWOULDBLOCK:
                return None
            raise OSError(err, os.strerror(err))
        peer = self._peer
        return fd, (ffi.string(peer.host).decode("ascii"), peer.port)


class WakeTimer:
    """A one-shot timer on the monotonic clock whose fd turns readable when it expires.

    The accept loop's gathering windows wait for it (trio's wait_readable)
    instead of sleeping in trio: a trio sleep ends by cancelling its scope,
    which raises, delivers and catches an exception, and each window is a
    wake-up of the process (46-52 µs of CPU a wake-up against 58-65 for
    trio.sleep, in a loop of 0.5 ms waits; docs/perf-log/2026-12-07-timer-and-batch.md).
    `open()` is None
    where the platform has no timerfd (before FreeBSD 14): the loop sleeps in
    trio there.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def open(cls) -> WakeTimer | None:
        """A new timer, or None where there is none (ENOSYS); OSError for anything else."""
        fd = lib.repeld_timer_open()
        if fd == -1:
            if ffi.errno == errno.ENOSYS:
                return None
            _raise_errno()
        return cls(fd)

    def arm(self, seconds: float) -> None:
        """Expire once, `seconds` from now; an expiry not waited for is forgotten."""
        if lib.repeld_timer_arm(self.fd, int(seconds * 1_000_000_000)) == -1:
            _raise_errno()

    def close(self) -> None:
        """Close the timer; again, nothing (its number may be another file's by then)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def set_nodelay(fd: int, on: bool = True) -> None:
    """Send each reply at once: no Nagle delay behind a delayed ACK."""
    if lib.repeld_set_nodelay(fd, int(on)) == -1:
        _raise_errno()


def set_keepalive(fd: int, idle: int, interval: int, count: int) -> None:
    """Let the kernel find and drop peers that vanished without closing the connection."""
    for name, value in (("idle", idle), ("interval", interval), ("count", count)):
        if value < 1:
            raise ValueError(f"keepalive {name} must be at least 1, not {value}")
    # Timings first (in C), so a value the kernel rejects leaves keepalive off.
    if lib.repeld_set_keepalive(fd, idle, interval, count) == -1:
        _raise_errno()


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
    if lib.repeld_set_abortive_close(fd) == -1:
        _raise_errno()


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


def rtt_ms(fd: int) -> float:
    """The smoothed round-trip time (what tcp_info(fd).rtt_us says) in milliseconds,
    more cheaply, and 0.0 if the kernel cannot tell (a reset socket, a bad fd):
    the events' `rtt_ms`, read once on every handed-off client's path."""
    rtt = lib.repeld_tcp_rtt_us(fd)
    return 0.0 if rtt == -1 else rtt / 1000.0


def accept_queue_cap() -> int:
    """Report the ceiling the kernel silently puts on any listen() backlog."""
    value = lib.repeld_accept_queue_cap()
    if value == -1:
        _raise_errno()
    return value


def syn_backlog() -> int | None:
    """Report how many half-open connections the kernel will queue, or None if unknown."""
    value = lib.repeld_syn_backlog()
    return None if value == -1 else value

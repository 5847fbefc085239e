"""Listening sockets: bound by repeld, inherited from systemd, or shared with workers.

Everything here runs before the privilege drop: port 25 needs root (or
CAP_NET_BIND_SERVICE) to bind, and nothing after the drop binds again.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Collection, Iterable

from repeld.config.settings import Listen, Settings
from repeld.service import tcptune
from repeld.service.activation import match_listeners

__all__ = [
    "DEFAULT_BACKLOG",
    "backlog_for",
    "bind_listener",
    "is_dual_stack",
    "open_listeners",
    "reuseport_option",
    "reuses_port",
]

#: The backlog when the kernel's cap cannot be read.
DEFAULT_BACKLOG = 4096


def reuseport_option() -> int | None:
    """The socket option that load-balances one port over several sockets, if any.

    FreeBSD's SO_REUSEPORT only lets a port be shared; SO_REUSEPORT_LB balances.
    Linux's SO_REUSEPORT balances.
    """
    if sys.platform.startswith("freebsd"):
        return getattr(socket, "SO_REUSEPORT_LB", None)
    if sys.platform.startswith("linux"):
        return getattr(socket, "SO_REUSEPORT", None)
    return None


def backlog_for(settings: Settings) -> tuple[int, int | None]:
    """The listen(2) backlog to ask for, and the kernel's cap on it (None if unknown)."""
    try:
        cap: int | None = tcptune.accept_queue_cap()
    except OSError:
        cap = None
    return settings.backlog or cap or DEFAULT_BACKLOG, cap


def reuses_port(sock: socket.socket) -> bool:
    """Whether `sock` has `reuseport_option()` set: sockets of its user may join its port."""
    option = reuseport_option()
    if option is None:
        return False
    try:
        return sock.getsockopt(socket.SOL_SOCKET, option) != 0
    except OSError:
        return False


def is_dual_stack(sock: socket.socket) -> bool:
    """Whether `sock` is an IPv6 socket that takes IPv4 clients too (IPV6_V6ONLY off)."""
    if sock.family != socket.AF_INET6:
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    except OSError:
        return False


def bind_listener(
    spec: Listen,
    backlog: int = DEFAULT_BACKLOG,
    *,
    reuseport: bool = False,
    dual_stack: bool = False,
) -> socket.socket:
    """A bound, listening, non-blocking socket for `spec`.

    IPv6 sockets are v6-only, except a copy of a dual-stack socket that systemd
    passed (`dual_stack`): a v6-only socket joins a dual-stack one's port but
    is given none of its clients, v4 or v6.
    """
    sock = socket.socket(spec.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        option = reuseport_option() if reuseport else None
        if option is not None:
            sock.setsockopt(socket.SOL_SOCKET, option, 1)
        if spec.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind((spec.host, spec.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {spec}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def _check_free(spec: Listen, dual_stack: bool) -> None:
    """OSError (EADDRINUSE) if a socket listens on `spec` already.

    SO_REUSEPORT lets a socket of the same user join a port whose sockets all
    set it: the workers' copies of one listener, but also a second repeld
    --workers started by mistake, which would take its share of port 25's
    clients unseen. A socket without the option, bound and closed at once,
    finds the port taken, as a single process's bind does.
    """
    probe = socket.socket(spec.family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if spec.family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        probe.bind((spec.host, spec.port))
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {spec}: {exc.strerror}") from None
    finally:
        probe.close()


def open_listeners(
    settings: Settings,
    backlog: int,
    inherited: Iterable[tuple[socket.socket, str]] = (),
    *,
    reuseport: bool = False,
    dual_stack: Collection[Listen] = (),
    first: bool = False,
) -> list[tuple[socket.socket, Listen]]:
    """A socket for every --listen spec: an inherited one where it matches, else bound.

    Inherited sockets that no spec asks for are closed with a warning: the
    configuration is the one description of what repeld serves. The specs in
    `dual_stack` are bound dual-stack (copies of systemd's dual-stack sockets).
    `first` (with `reuseport`): the first of the workers' copies, whose ports
    must not be in use already (`_check_free`): every one is looked at before
    any is bound, so that the listeners may still overlap one another.
    """
    matched = match_listeners(inherited, settings.listen)
    socks = list(matched.listeners)
    for sock, name in matched.extra:
        host, port = sock.getsockname()[:2]
        print(
            f"repeld: warning: inherited socket {host}:{port} ({name!r}) is not in --listen; "
            "closing it",
            file=sys.stderr,
        )
        sock.close()
    try:
        if first and reuseport and reuseport_option() is not None:
            for spec in matched.unbound:
                if spec.port:  # (0: any free port)
                    _check_free(spec, spec in dual_stack)
        for spec in matched.unbound:
            dual = spec in dual_stack
            socks.append((bind_listener(spec, backlog, reuseport=reuseport, dual_stack=dual), spec))
    except BaseException:
        for sock, _ in socks:
            sock.close()
        raise
    # Keep the configured order: events and tests refer to listeners by it.
    order = {(s.host, s.port): i for i, s in enumerate(settings.listen)}
    socks.sort(key=lambda pair: order[(pair[1].host, pair[1].port)])
    return socks

"""systemd socket activation: take over listeners that the service manager bound.

`listen_fds` follows sd_listen_fds(3) and sd_listen_fds_with_names(3): the
sockets are the file descriptors 3 .. 3+$LISTEN_FDS-1, they are ours only if
$LISTEN_PID is our pid, $LISTEN_FDNAMES (optional) names them in order, colon
separated, and the variables are removed afterwards so that nothing we spawn
mistakes them for its own.

Naming convention (FileDescriptorName= in the .socket unit):

* A name ending in ``nodelay`` (e.g. ``smtps-nodelay``) marks a listener that is
  never held, the socket-activation spelling of ``--listen ADDR:PORT,nodelay``
  (implicit TLS on port 465).
* Any other name (``smtp``, or systemd's default, the socket unit's name such
  as ``repeld.socket``) is an ordinary, delaying listener.

`match_listeners` pairs the inherited sockets with the configured `Listen`
specs by the address each socket is bound to (getsockname), so the
configuration stays the single description of what repeld listens on: matched
specs use the inherited socket, the rest are bound by repeld itself, and a
nodelay disagreement between the name and the spec is an error rather than a
guess (guessing wrong either delays implicit-TLS clients or stops delaying
spam). `spec_for` derives a spec from a socket alone, for a deployment that
lets the socket unit be the only description.

A socket unit for repeld must use ``Accept=no`` (the default: repeld gets the
listening socket, not one connection per process) and, like repeld's own
listeners, ``BindIPv6Only=ipv6-only`` when it has both 0.0.0.0 and [::]
addresses on one port: a dual-stack [::]:25 already owns 0.0.0.0:25, and
`match_listeners` says so instead of leaving a bare "Address already in use".
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field

from repeld.config.settings import Listen
from repeld.core.addresses import host_port

__all__ = [
    "LISTEN_FDS_START",
    "NODELAY_SUFFIX",
    "UNKNOWN_NAME",
    "ActivationError",
    "Matched",
    "is_nodelay_name",
    "listen_fds",
    "match_listeners",
    "spec_for",
]

#: The first inherited file descriptor (SD_LISTEN_FDS_START).
LISTEN_FDS_START = 3
#: A FileDescriptorName= ending in this marks a never-held listener.
NODELAY_SUFFIX = "nodelay"
#: The name sd_listen_fds_with_names(3) reports when $LISTEN_FDNAMES is unset.
UNKNOWN_NAME = "unknown"
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(ValueError):
    """Inherited sockets that cannot be used; `str()` is one line for the admin."""


def _parse_count(environ: MutableMapping[str, str], name: str) -> int:
    """A non-negative integer environment variable, or ActivationError."""
    text = environ[name]
    try:
        value = int(text, 10)
    except ValueError:
        raise ActivationError(f"socket activation: ${name}={text!r} is not a number") from None
    if value < 0:
        raise ActivationError(f"socket activation: ${name}={text!r} is negative")
    return value


def _take(environ: MutableMapping[str, str]) -> list[tuple[int, str]]:
    """The inherited (fd, name) pairs meant for this process, per sd_listen_fds(3)."""
    if "LISTEN_PID" not in environ:
        return []
    if _parse_count(environ, "LISTEN_PID") != os.getpid():
        # Meant for another process (we were forked or exec'd with a stale
        # environment): the descriptors are not ours to touch.
        return []
    count = _parse_count(environ, "LISTEN_FDS") if "LISTEN_FDS" in environ else 0
    names_text = environ.get("LISTEN_FDNAMES")
    if names_text is None:
        names = [UNKNOWN_NAME] * count
    else:
        names = names_text.split(":") if names_text else []
        if len(names) != count:
            raise ActivationError(
                f"socket activation: $LISTEN_FDNAMES names {len(names)} sockets "
                f"but $LISTEN_FDS is {count}"
            )
    return [(LISTEN_FDS_START + i, names[i]) for i in range(count)]


def listen_fds(
    env: MutableMapping[str, str] | None = None, unset: bool = True
) -> list[tuple[socket.socket, str]]:
    """The sockets systemd passed to this process, with their names, in fd order."""
    environ: MutableMapping[str, str] = os.environ if env is None else env
    try:
        pairs = _take(environ)
    finally:
        # Like libsystemd: unset even on error or when the fds were not ours.
        if unset:
            for name in _VARIABLES:
                environ.pop(name, None)
    result: list[tuple[socket.socket, str]] = []
    try:
        for fd, name in pairs:
            try:
                # The fds survived exec on purpose; nothing we run later should
                # inherit them (an MTA helper holding port 25 open, say).
                flags = fcntl.fcntl(fd, fcntl.F_GETFD)
                fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
                # fileno= detects family, type and protocol from the kernel.
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                raise ActivationError(
                    f"socket activation: fd {fd} ({name!r}): {exc.strerror or exc}"
                ) from None
            result.append((sock, name))
    except ActivationError:
        for sock, _ in result:
            sock.detach()  # leave the fds as we found them, the caller decides
        raise
    return result


def is_nodelay_name(name: str) -> bool:
    """Whether a FileDescriptorName marks a never-held (nodelay) listener."""
    return name.endswith(NODELAY_SUFFIX)


def _describe(sock: socket.socket, name: str) -> str:
    """How an inherited socket is named in error messages."""
    try:
        where = _address_text(sock)
    except OSError:
        where = f"fd {sock.fileno()}"
    return f"inherited socket {where} ({name!r})"


def _address_text(sock: socket.socket) -> str:
    """ADDR:PORT of a bound socket, IPv6 in brackets."""
    host, port = sock.getsockname()[:2]
    return host_port(host, port)


def _check_listener(sock: socket.socket, name: str) -> tuple[str, int]:
    """The normalized (host, port) of a usable inherited listener, or ActivationError."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        raise ActivationError(
            f"socket activation: fd {sock.fileno()} ({name!r}) is not a TCP socket "
            "(use ListenStream= with an IP address or port)"
        )
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ActivationError(
            f"socket activation: {_describe(sock, name)} is not listening "
            "(the socket unit must have Accept=no)"
        )
    host, port = sock.getsockname()[:2]
    return str(ipaddress.ip_address(host.split("%", 1)[0])), int(port)


def spec_for(sock: socket.socket, name: str) -> Listen:
    """The listen spec an inherited listener stands for: its address, nodelay by name."""
    host, port = _check_listener(sock, name)
    return Listen(host, port, is_nodelay_name(name))


@dataclass(slots=True)
class Matched:
    """The outcome of `match_listeners`."""

    #: Inherited sockets put to use, non-blocking, each with its configured spec.
    listeners: list[tuple[socket.socket, Listen]] = field(default_factory=list)
    #: Configured specs no inherited socket covers: bind these as usual.
    unbound: list[Listen] = field(default_factory=list)
    #: Inherited sockets no spec asked for, with their names: close or adopt them.
    extra: list[tuple[socket.socket, str]] = field(default_factory=list)


def match_listeners(
    inherited: Iterable[tuple[socket.socket, str]], specs: Sequence[Listen]
) -> Matched:
    """Pair inherited listeners with configured specs by bound address."""
    by_address = {(spec.host, spec.port): spec for spec in specs}
    matched = Matched()
    used: set[tuple[str, int]] = set()
    for sock, name in inherited:
        address = _check_listener(sock, name)
        spec = by_address.get(address)
        if spec is None:
            matched.extra.append((sock, name))
            continue
        if address in used:
            raise ActivationError(f"socket activation: {_describe(sock, name)} is passed twice")
        if spec.nodelay != is_nodelay_name(name):
            if spec.nodelay:
                hint = (
                    f"end its FileDescriptorName= in '{NODELAY_SUFFIX}' (e.g. smtps-nodelay) "
                    "or drop ,nodelay from --listen"
                )
            else:
                hint = "add ,nodelay to --listen or rename the socket"
            raise ActivationError(
                f"socket activation: {_describe(sock, name)} and --listen {spec} disagree "
                f"about nodelay: {hint}"
            )
        used.add(address)
        # bind_listener's sockets are non-blocking; the accept loop relies on it.
        sock.setblocking(False)
        matched.listeners.append((sock, spec))
    matched.unbound = [spec for spec in specs if (spec.host, spec.port) not in used]
    _check_dual_stack(matched)
    return matched


def _check_dual_stack(matched: Matched) -> None:
    """Refuse a dual-stack [::] listener whose port an IPv4 spec still needs to bind."""
    v4_ports = {spec.port for spec in matched.unbound if spec.family == socket.AF_INET}
    for sock, spec in matched.listeners:
        if (
            sock.family == socket.AF_INET6
            and spec.host == "::"
            and spec.port in v4_ports
            and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
        ):
            # systemd's default BindIPv6Only= follows net.ipv6.bindv6only (0 on
            # most systems): the [::] socket also owns IPv4, and binding the
            # IPv4 spec would fail with a bare "Address already in use".
            raise ActivationError(
                f"socket activation: inherited socket [::]:{spec.port} is dual-stack and "
                f"holds IPv4 port {spec.port} too; set BindIPv6Only=ipv6-only in the socket unit"
            )

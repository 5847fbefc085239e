"""A small sd_notify(3): tell systemd that repeld is ready, reloading or stopping.

The protocol is one datagram of newline-separated ``KEY=VALUE`` assignments sent
to the AF_UNIX socket named by ``$NOTIFY_SOCKET``: a filesystem path, or an
abstract socket written with a leading ``@`` (sent with a leading NUL byte).
Anything else (unset, empty, relative, systemd 253's ``vsock:`` form) means
"not supervised by a notify-aware manager" and every call returns False.

Nothing here ever raises on a send failure: readiness notification is advice to
the service manager, and a daemon must not die because it could not give it.

For ``Type=notify`` and ``Type=notify-reload`` services the sequence is::

    ready()                      # listeners bound, privileges dropped
    reloading(); ...; ready()    # on SIGHUP: READY=1 again ends the reload, with a
                                 # STATUS= that says so, or reload_refused(reason)
    stopping()                   # on SIGTERM, before the shutdown grace
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

__all__ = ["REFUSED", "notify", "ready", "reload_refused", "reloading", "status", "stopping"]

#: Upper bound on a blocking send: the manager's queue is never full in
#: practice, but a trio daemon must not hang on it if it is.
_SEND_TIMEOUT = 1.0


def _address(value: str) -> str | None:
    """The socket address to send to for a $NOTIFY_SOCKET value, or None if unusable."""
    if value.startswith("@") and len(value) > 1:
        # Linux abstract namespace: the name is the bytes after a leading NUL.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send one notification datagram; True if it was sent, False otherwise."""
    environ = os.environ if env is None else env
    address = _address(environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
    except (OSError, ValueError):
        # ValueError: an embedded NUL in a path; OSError: no listener, EAGAIN...
        return False
    return True


def _one_line(text: str) -> str:
    """Text safe as one VALUE: a newline would start a new assignment."""
    return " ".join(text.splitlines())


def ready(status: str = "", *, env: Mapping[str, str] | None = None) -> bool:
    """Report start-up (or a reload) complete, with an optional status line."""
    message = "READY=1"
    if status:
        message += f"\nSTATUS={_one_line(status)}"
    return notify(message, env=env)


def reloading(*, env: Mapping[str, str] | None = None) -> bool:
    """Report a configuration reload starting; finish it with `ready()`."""
    # systemd >= 253 needs MONOTONIC_USEC with RELOADING=1 for Type=notify-reload
    # to match the message to the reload it asked for; older ones ignore it.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}", env=env)


#: The status line after a refused reload, before the reason (`systemctl status` shows it
#: until the next reload that succeeds replaces it).
REFUSED = "reload refused, old configuration kept"


def reload_refused(reason: str, *, env: Mapping[str, str] | None = None) -> bool:
    """End a refused reload: READY=1 (the old configuration serves on), the reason as STATUS=."""
    return ready(f"{REFUSED}: {reason}", env=env)


def stopping(*, env: Mapping[str, str] | None = None) -> bool:
    """Report that shutdown has begun."""
    return notify("STOPPING=1", env=env)


def status(text: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Set the one-line status shown by `systemctl status`."""
    return notify(f"STATUS={_one_line(text)}", env=env)

"""What start-up would refuse, found before it: the second half of --check-config.

The configuration loader checks each value by itself (a port is a port, a file of
trusted networks reads). Start-up then refuses a few things that only the machine can
answer: the user to drop to, its group, the chroot directory, the pid file's directory.
An administrator learning that at `systemctl start` (or worse, at the reload that
follows an edit: the unit's ExecReload runs --check-config first) has learnt it too
late, so `--check-config` asks the same questions with the same lookups, as the user
that runs it: root for a daemon that drops privileges itself, the service user under
systemd's User=.

Each problem is one line naming the option, worded as start-up words it
(privileges.PrivilegeError, pidfile.PidFileError). A backend's host name is
resolved as start-up and every reload resolve it: a name that does not resolve
stops a start with port 25 closed, and the unit's ExecReload runs this check
first. What cannot be known beforehand is left to start-up: a port already
bound, a backend that is down (`--check-backend` asks that), a syslog socket
that is not there yet.
"""

from __future__ import annotations

import grp
import os
import socket

from repeld.config.settings import Backend, Settings
from repeld.core.addresses import host_port
from repeld.service import privileges

__all__ = ["problems", "warnings"]


def _privilege_problems(settings: Settings) -> list[str]:
    """The user and group start-up would switch to (or stay as), as privileges decides."""
    try:
        plan = privileges.decide(settings.user, settings.group)
        if plan.action == "drop":
            assert plan.user is not None
            privileges.resolve(plan.user, settings.group)
        elif settings.group is not None:
            grp.getgrnam(settings.group)
    except privileges.PrivilegeError as exc:
        return [str(exc)]
    except KeyError:
        return [f"--group: no such group {settings.group!r}"]
    return []


def _unresolved(backend: Backend) -> str | None:
    """Why `backend`'s host name does not resolve (as start-up words it:
    shell/handoff.py's resolve_backend), or None."""
    try:
        socket.getaddrinfo(backend.host, backend.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return f"--backend {host_port(backend.host, backend.port)}: cannot resolve: {reason}"
    return None


def _backend_problems(settings: Settings) -> list[str]:
    """--backend, if its host name does not resolve: start-up and every reload
    refuse it."""
    why = _unresolved(settings.backend) if isinstance(settings.backend, Backend) else None
    return [why] if why is not None else []


def warnings(settings: Settings) -> list[str]:
    """What start-up would refuse but a reload takes: a listener's backend= name
    that does not resolve (listeners change at a restart only, and a reload
    keeps what they resolved to)."""
    found = []
    listed = (spec.backend for spec in settings.listen if isinstance(spec.backend, Backend))
    for backend in dict.fromkeys(listed):
        if backend != settings.backend and (why := _unresolved(backend)) is not None:
            found.append(f"{why} (a listener's: a restart would refuse it)")
    return found


def _directory_problem(option: str, directory: str) -> str | None:
    """Why `directory` (named by --`option`) cannot be used, or None."""
    if os.path.isdir(directory):
        return None
    what = "not a directory" if os.path.exists(directory) else "no such directory"
    return f"--{option}: {what} {directory!r}"


def problems(settings: Settings) -> list[str]:
    """One line per thing start-up would refuse in `settings` on this machine; [] if none."""
    found = _privilege_problems(settings) + _backend_problems(settings)
    if settings.chroot is not None:
        problem = _directory_problem("chroot", settings.chroot)
        if problem is None and os.geteuid() != 0:
            problem = f"--chroot: needs root; running as uid {os.geteuid()}"
        if problem is not None:
            found.append(problem)
    if settings.pidfile:
        # Created as root before any chroot, so the directory is the host's.
        problem = _directory_problem("pidfile", os.path.dirname(settings.pidfile) or "/")
        if problem is not None:
            found.append(problem)
    return found

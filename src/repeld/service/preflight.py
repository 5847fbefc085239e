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

__all__ = ["problems"]


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


def _backend_problems(settings: Settings) -> list[str]:
    """The backends whose host name does not resolve, worded as start-up words it
    (shell/handoff.py's resolve_backend)."""
    found = []
    backends = [settings.backend, *(spec.backend for spec in settings.listen)]
    for backend in dict.fromkeys(b for b in backends if isinstance(b, Backend)):
        try:
            socket.getaddrinfo(backend.host, backend.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            where = host_port(backend.host, backend.port)
            found.append(f"--backend {where}: cannot resolve: {reason}")
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

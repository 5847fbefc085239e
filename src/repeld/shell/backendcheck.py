"""The backend check's I/O: connect as a passed client would, and play core/backendcheck.py.

Every backend (--backend and each listener's own ,backend=) is resolved as
the daemon resolves it, connected to address after address as the relay pool
does, sent the PROXY header that --proxy-protocol asks for (with the probe's
own socket addresses), then greeted, EHLO'd and QUIT. Each phase has its
bound (core/backendcheck.py), and the whole check of one backend CHECK_LIMIT.

`repeld --check-backend` prints `report_line()` for each; the daemon checks
once after start-up and after each reload, in the background, and reports
each problem with `warn()` (shell/backendwatch.py, which also checks every
--backend-check-interval), and never stops for what it finds.

A pass service is checked as the processes that hand clients to it will meet
it. The lone daemon checks after its chroot and its drop to --user, so it
sees what it will use. `repeld --check-backend` and the --workers parent,
which stays root and outside the chroot, check from outside (`Outside`): the
path inside --chroot, and whether --user and --group may search every
directory to the socket and write to it (core/postfixpass.py's
`denied_step`; where a step has an ACL the modes do not tell, and only the
connect decides). Otherwise a chrooted service would show as missing and a
service the workers may not use as fine.
"""

from __future__ import annotations

import array
import os
import posixpath
import socket
import stat
import sys
from dataclasses import dataclass
from typing import Protocol

import trio

from repeld.config.settings import Settings
from repeld.config.values import AnyBackend, PassBackend
from repeld.core import events, postfixpass, proxyproto
from repeld.core.backendcheck import CONNECT_TIMEOUT, BackendCheck, NeedData, Send, Verdict
from repeld.core.names import HandOffResult
from repeld.shell.eventlog import EventLog
from repeld.shell.handoff import BackendTarget, resolve_backend
from repeld.shell.passfd import connect_service

__all__ = [
    "CHECK_LIMIT",
    "Outside",
    "Who",
    "backends_of",
    "check_backend",
    "check_backends",
    "keep_pipe_connect",
    "report_line",
    "warn",
    "warn_about_backends",
]

#: No backend's check takes longer than this, whatever it does.
CHECK_LIMIT = 10.0
_READ_SIZE = 4096


class Who(Protocol):
    """Whom the processes that hand clients off run as (service/privileges.py's
    Identity; the shell takes it from its caller)."""

    @property
    def user(self) -> str: ...

    @property
    def uid(self) -> int: ...

    @property
    def group(self) -> str: ...

    @property
    def gid(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Outside:
    """How the processes that hand clients off see a pass service, for a checker
    that is not one of them: their --chroot, and whom they run as (None: as the
    checker does). process/workers.py's `outside_view` makes it."""

    root: str | None
    who: Who | None


def keep_pipe_connect(settings: Settings) -> bool:
    """Whether repeld passes PIPECONNECT on in EHLO replies (its filter is off)."""
    return settings.keep_pipe_connect


def backends_of(settings: Settings) -> list[AnyBackend]:
    """--backend and every listener's own backend, each once, in that order."""
    found: list[AnyBackend] = []
    candidates = [settings.backend, *(spec.backend for spec in settings.listen)]
    for backend in candidates:
        if backend is not None and backend not in found:
            found.append(backend)
    return found


def _helo_name() -> str:
    name = socket.gethostname()
    return name if name and name.isascii() and " " not in name else "localhost"


def _why(exc: OSError) -> str:
    # trio's connect error says the address again in strerror; the errno says enough.
    return os.strerror(exc.errno) if exc.errno else str(exc)


async def _connect(target: BackendTarget) -> trio.socket.SocketType:
    """The first of the backend's addresses that accepts, as the relay pool tries them."""
    last: OSError = OSError(f"no address for {target.name}")
    for family, addr in target.addresses:
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await sock.connect(addr)
        except trio.TooSlowError:
            sock.close()
            last = OSError(f"connect timed out after {CONNECT_TIMEOUT:g} s")
        except OSError as exc:
            sock.close()
            last = exc
        else:
            return sock
    raise last


async def _dialogue(sock: trio.socket.SocketType, check: BackendCheck) -> Verdict:
    while True:
        action = check.next_action()
        if isinstance(action, Verdict):
            return action
        if isinstance(action, Send):
            await sock.send(action.data)  # a few bytes: the kernel takes them at once
            continue
        assert isinstance(action, NeedData)
        with trio.move_on_after(action.timeout) as scope:
            data = await sock.recv(_READ_SIZE)
        if scope.cancelled_caught:
            check.timed_out()
        else:
            check.receive_data(data)


_MISSING_HINT = " (is Postfix running, with an `smtpd pass` service in master.cf?)"
_PERMISSION_HINT = ": private/ is the postfix user's: run repeld as postfix (--user postfix)"
_PUBLIC_HINT = ": public/ is for group postdrop to enter: --group postdrop"


def _permission_hint(path: str) -> str:
    """What to do about a denied pass service: Postfix's public/ is entered by group."""
    return _PUBLIC_HINT if "public" in path.split("/")[:-1] else _PERMISSION_HINT


async def _loopback_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """Both ends of a new TCP connection on 127.0.0.1: (the client's, the server's)."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            await client.connect(listener.getsockname())
            server, _ = await listener.accept()
        except BaseException:
            client.close()
            raise
    return client, server


async def _hand_over(path: str, server: trio.socket.SocketType) -> str | None:
    """Hand `server` to the pass service at `path` as a passed client is; None if
    smtpd took it, else what went wrong."""
    try:
        chan = trio.socket.from_stdlib_socket(connect_service(path))
    except OSError as exc:
        outcome = postfixpass.connect_outcome(exc.errno)
        problem = postfixpass.describe(outcome, _why(exc))
        if outcome is HandOffResult.PERMISSION:
            problem += _permission_hint(path)
        return problem
    with chan:
        client_addr, client_port = server.getpeername()[:2]
        server_addr, server_port = server.getsockname()[:2]
        attributes = postfixpass.pass_attributes(client_addr, client_port, server_addr, server_port)
        try:
            fds = array.array("i", [server.fileno()])
            await chan.sendmsg(
                [postfixpass.FD_CARRIER], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
            )
            await chan.send(attributes)
            with trio.move_on_after(CONNECT_TIMEOUT):
                data = await chan.recv(64)
                if not data:
                    return None
                what = data[:40].decode("ascii", "replace").strip()
                outcome = HandOffResult.DESCRIPTOR_REFUSED
                return postfixpass.describe(outcome, f"the service answered {what!r}")
        except OSError as exc:
            return postfixpass.describe(postfixpass.send_outcome(exc.errno), _why(exc))
        outcome = HandOffResult.TIMEOUT
        return postfixpass.describe(outcome, f"smtpd did not take it within {CONNECT_TIMEOUT:g} s")


def _has_acl(path: str) -> bool:
    """Whether `path` has a POSIX access ACL (Linux), which the file modes do not show."""
    getxattr = getattr(os, "getxattr", None)
    if getxattr is None:  # FreeBSD: no ACLs read; the modes decide
        return False
    try:
        getxattr(path, "system.posix_acl_access")
    except OSError:  # ENODATA: none; ENOTSUP: a file system without them
        return False
    return True


def _denied(root: str, path: str, ident: Who) -> str | None:
    """What keeps `ident` from connecting to `path` inside `root`, or None."""
    steps = []
    for step in postfixpass.path_steps(root, path):
        try:
            st = os.stat(step)
        except OSError:
            return None  # the stat of the socket itself says what is wrong
        if _has_acl(step):
            return None  # the modes do not tell: the hand-off's own connect will
        steps.append((step, st.st_mode, st.st_uid, st.st_gid))
    denied = postfixpass.denied_step(steps, ident.uid, ident.gid)
    if denied is None:
        return None
    where, lacks = denied
    detail = f"{where}: user {ident.user}, group {ident.group} may not {lacks}"
    return postfixpass.describe(HandOffResult.PERMISSION, detail)


async def check_pass_service(
    backend: PassBackend, *, keep_pipe_connect: bool = False, view: Outside | None = None
) -> Verdict:
    """Check a Postfix pass service as a passed client meets it; never raises OSError.

    The socket must exist and be a socket; then a loopback TCP connection of
    repeld's own is handed over as a client is, and smtpd's greeting and EHLO
    reply are read on the other end, so Postfix logs one `connect from
    localhost[127.0.0.1]`, as it does for the check of a TCP backend. `view`:
    checked from outside the daemon's chroot and identity (`Outside`).
    """
    path = backend.path
    # Inside the chroot "/.." is "/": never a way out of it from here either.
    inside = posixpath.normpath(path)
    if view is not None and view.root is not None:
        path = os.path.join(view.root, inside.lstrip("/"))
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        outcome = postfixpass.connect_outcome(exc.errno)
        problem = postfixpass.describe(outcome, f"{path}: {_why(exc)}")
        if outcome is HandOffResult.PERMISSION:
            return Verdict(False, problem + _permission_hint(path))
        return Verdict(False, problem + _MISSING_HINT)
    if not stat.S_ISSOCK(mode):
        return Verdict(False, f"{path} is not a socket")
    if view is not None and view.who is not None:
        denied = _denied(view.root or "/", inside, view.who)
        if denied is not None:
            return Verdict(False, denied + _permission_hint(path))
    with trio.move_on_after(CHECK_LIMIT):
        try:
            client, server = await _loopback_pair()
        except OSError as exc:
            return Verdict(False, f"cannot open a loopback connection to hand over: {_why(exc)}")
        with client:
            with server:
                refused = await _hand_over(path, server)
            if refused is not None:
                return Verdict(False, refused)
            try:
                check = BackendCheck("none", _helo_name(), keep_pipe_connect=keep_pipe_connect)
                return await _dialogue(client, check)
            except OSError as exc:
                return Verdict(False, f"connection failed: {_why(exc)}")
    return Verdict(False, f"the check took longer than {CHECK_LIMIT:g} s")


async def check_backend(
    backend: AnyBackend,
    proxy_protocol: str,
    *,
    keep_pipe_connect: bool = False,
    view: Outside | None = None,
) -> Verdict:
    """Check one backend as a passed client would meet it; never raises OSError.

    `view`: a pass service is checked from outside the daemon (`Outside`)."""
    if isinstance(backend, PassBackend):
        return await check_pass_service(backend, keep_pipe_connect=keep_pipe_connect, view=view)
    with trio.move_on_after(CHECK_LIMIT):
        try:
            target = await resolve_backend(backend.host, backend.port)
        except OSError as exc:
            return Verdict(False, f"cannot resolve {backend.host}: {_why(exc)}")
        try:
            sock = await _connect(target)
        except OSError as exc:
            return Verdict(False, f"cannot connect: {_why(exc)}")
        with sock:
            try:
                local = sock.getsockname()
                peer = sock.getpeername()
                header = proxyproto.header(proxy_protocol, local[0], local[1], peer[0], peer[1])
                if header:
                    await sock.send(header)
                check = BackendCheck(
                    proxy_protocol, _helo_name(), keep_pipe_connect=keep_pipe_connect
                )
                return await _dialogue(sock, check)
            except OSError as exc:
                return Verdict(False, f"connection failed: {_why(exc)}")
    return Verdict(False, f"the check took longer than {CHECK_LIMIT:g} s")


async def check_backends(
    settings: Settings, *, view: Outside | None = None
) -> list[tuple[AnyBackend, Verdict]]:
    """Check every backend of `settings` at once; the verdicts in backends_of's order.

    `view`: this process is not the one that hands clients off, and has not
    chrooted nor dropped as it does (`repeld --check-backend`, the --workers
    parent): pass services are checked as that process will see them.
    """
    backends = backends_of(settings)
    verdicts: list[Verdict | None] = [None] * len(backends)
    keep = keep_pipe_connect(settings)

    async def one(i: int) -> None:
        verdicts[i] = await check_backend(
            backends[i], settings.proxy_protocol, keep_pipe_connect=keep, view=view
        )

    async with trio.open_nursery() as nursery:
        for i in range(len(backends)):
            nursery.start_soon(one, i)
    return [(b, v) for b, v in zip(backends, verdicts, strict=True) if v is not None]


def report_line(backend: AnyBackend, proxy_protocol: str, verdict: Verdict) -> str:
    """One line about one backend, for --check-backend's output."""
    how = "no PROXY header" if proxy_protocol == "none" else f"PROXY {proxy_protocol}"
    if isinstance(backend, PassBackend):
        how = "descriptor hand-off"
    if not verdict.ok:
        return f"{backend} ({how}): FAILED: {verdict.message}"
    caps = ", ".join(verdict.capabilities) or "none"
    line = f"{backend} ({how}): ok: greeting {verdict.greeting!r}; capabilities: {caps}"
    for warning in verdict.warnings:
        line += f"; warning: {warning}"
    return line


async def warn_about_backends(settings: Settings, log: EventLog) -> None:
    """The daemon's check: a `backend-check` warning and a stderr line per problem.

    A healthy backend writes nothing. Never raises for what it finds.
    """
    try:
        results = await check_backends(settings)
    except Exception as exc:  # a check must never take the server down
        log.emit(events.internal_error(None, 0.0, f"backend check: {exc!r}"))
        return
    for backend, verdict in results:
        warn(log, backend, verdict)


def warn(log: EventLog, backend: AnyBackend, verdict: Verdict) -> None:
    """A `backend-check` event and a stderr line for each problem of one verdict."""
    problems = [verdict.message] if not verdict.ok else list(verdict.warnings)
    for problem in problems:
        log.emit(events.backend_check(str(backend), problem))
        print(f"repeld: warning: backend {backend}: {problem}", file=sys.stderr, flush=True)

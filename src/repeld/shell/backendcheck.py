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
"""

from __future__ import annotations

import os
import socket
import sys

import trio

from repeld.config.settings import Settings
from repeld.config.values import Backend
from repeld.core import events, proxyproto
from repeld.core.backendcheck import CONNECT_TIMEOUT, BackendCheck, NeedData, Send, Verdict
from repeld.shell.eventlog import EventLog
from repeld.shell.handoff import BackendTarget, resolve_backend

__all__ = [
    "CHECK_LIMIT",
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


def keep_pipe_connect(settings: Settings) -> bool:
    """Whether repeld passes PIPECONNECT on in EHLO replies (its filter is off)."""
    return settings.keep_pipe_connect


def backends_of(settings: Settings) -> list[Backend]:
    """--backend and every listener's own backend, each once, in that order."""
    found: list[Backend] = []
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


async def check_backend(
    backend: Backend, proxy_protocol: str, *, keep_pipe_connect: bool = False
) -> Verdict:
    """Check one backend as a passed client would meet it; never raises OSError."""
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


async def check_backends(settings: Settings) -> list[tuple[Backend, Verdict]]:
    """Check every backend of `settings` at once; the verdicts in backends_of's order."""
    backends = backends_of(settings)
    verdicts: list[Verdict | None] = [None] * len(backends)
    keep = keep_pipe_connect(settings)

    async def one(i: int) -> None:
        verdicts[i] = await check_backend(
            backends[i], settings.proxy_protocol, keep_pipe_connect=keep
        )

    async with trio.open_nursery() as nursery:
        for i in range(len(backends)):
            nursery.start_soon(one, i)
    return [(b, v) for b, v in zip(backends, verdicts, strict=True) if v is not None]


def report_line(backend: Backend, proxy_protocol: str, verdict: Verdict) -> str:
    """One line about one backend, for --check-backend's output."""
    how = "no PROXY header" if proxy_protocol == "none" else f"PROXY {proxy_protocol}"
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


def warn(log: EventLog, backend: Backend, verdict: Verdict) -> None:
    """A `backend-check` event and a stderr line for each problem of one verdict."""
    problems = [verdict.message] if not verdict.ok else list(verdict.warnings)
    for problem in problems:
        log.emit(events.backend_check(str(backend), problem))
        print(f"repeld: warning: backend {backend}: {problem}", file=sys.stderr, flush=True)

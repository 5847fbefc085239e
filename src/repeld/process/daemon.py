"""The process around the server: start-up order, privileges, signals, shutdown.

Start-up order matters on port 25: bind every listener (or take them from
systemd) and open the pidfile as root, connect the event log, then drop to the
service user (and chroot), and only then tell the supervisor we are ready.

Signals, as a mail administrator expects them:

- SIGHUP: reload the configuration file and trusted-network files; a bad new
  configuration is refused with a `config-error` event and the old one stays.
- SIGTERM/SIGINT: stop accepting, 421 to held clients, relays get
  --shutdown-grace seconds; a second SIGTERM cuts them at once. Exit 0.
- SIGUSR1 (and SIGINFO on FreeBSD): a `stats` event.

repeld never detaches itself: daemon(8) on FreeBSD and systemd on Linux
supervise a foreground process, restart it, and (Type=notify) hear from it
directly, which a self-forking daemon would break.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence

import trio

from repeld import __version__
from repeld.config.settings import Settings, load_trusted
from repeld.core import events
from repeld.core.addresses import host_port
from repeld.core.names import EventName
from repeld.metrics import merge, render
from repeld.process import workers
from repeld.process.reloads import Reloads
from repeld.service import activation, privileges, sdnotify
from repeld.service.pidfile import PidFile, PidFileError
from repeld.shell.backendwatch import BackendWatch
from repeld.shell.dnslookup import NoResolverError
from repeld.shell.eventlog import EventLog
from repeld.shell.handoff import resolve_optional_backend
from repeld.shell.metrics_http import open_endpoint
from repeld.shell.server import Server, open_server, pinned

__all__ = ["EXIT_FAILURE", "serve_forever", "start"]

EXIT_FAILURE = 1

#: Young-generation threshold: with tens of thousands of live connections the
#: default (700) runs the collector constantly for nothing (held connections
#: make no reference cycles).
_GC_GEN0 = 50_000


def _signals() -> list[int]:
    sigs: list[int] = [signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
    if hasattr(signal, "SIGINFO"):  # FreeBSD's ^T
        sigs.append(signal.SIGINFO)
    return sigs


def _tune_gc() -> None:
    # Everything built at start-up lives forever: keep it out of every
    # collection, and collect young objects less often.
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(_GC_GEN0, gen1, gen2)


async def _reload(
    server: Server,
    log: EventLog,
    reload_settings: Callable[[], Settings],
    watch: BackendWatch | None = None,
    stopping: Callable[[], bool] = lambda: False,
) -> None:
    sdnotify.reloading()
    began = time.monotonic()  # a worker's answer says which SIGHUP it is for
    try:
        settings = reload_settings()
        pinned(server.settings, settings)  # what it would serve, refused here if it must be
        trusted = load_trusted(settings)
        backend = await resolve_optional_backend(settings)
    except Exception as exc:  # whatever reading it raised: the old one stays
        if stopping():  # a SIGTERM came meanwhile: STOPPING=1 was the last word
            workers.report_reload(None, began, stopping=True)
            return
        reason = str(exc).replace("\n", "; ")
        log.emit(events.config_error(reason))
        if log.stderr is None:  # to the journal too (with -f the event line is there)
            print(f"repeld: {sdnotify.REFUSED}: {reason}", file=sys.stderr, flush=True)
        sdnotify.reload_refused(reason)
        workers.report_reload(reason, began)  # a worker tells its parent, which tells systemd
        return
    if stopping():  # a SIGTERM came while the name was resolved: draining now
        workers.report_reload(None, began, stopping=True)
        return
    log.emit(events.reload(server.apply(settings, trusted, backend)))
    if watch is not None:  # the backend check, in the background (shell/backendwatch.py)
        watch.reconfigure(settings)
    bound = " ".join(host_port(h, p) for h, p in server.addresses)
    sdnotify.ready(f"listening on {bound}; configuration reloaded")
    workers.report_reload(None, began)


async def _handle_signals(
    signals: AsyncIterator[int],
    server: Server,
    log: EventLog,
    reload_settings: Callable[[], Settings],
    started: float,
    watch: BackendWatch | None = None,
) -> None:
    stopping = False

    # A reload is a task of its own (process/reloads.py): one that resolves the
    # backend's name for long must not hold up a SIGTERM.
    def skipped() -> None:  # a worker draining still answers its parent, which waits
        workers.report_reload(None, time.monotonic(), stopping=True)

    reloads = Reloads(lambda: stopping, skipped)

    async def reload() -> None:
        await _reload(server, log, reload_settings, watch, reloads.stopping)

    async with trio.open_nursery() as nursery:
        async for signum in signals:
            if signum == signal.SIGHUP:
                reloads.request(nursery, reload)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                sdnotify.stopping()
                # The first asks for a drain; a second cuts the relays at once.
                server.shutdown(0.0 if stopping else None)
                stopping = True
            elif not workers.send_statistics(  # a worker tells its parent
                server.statistics(), server.metrics_snapshot() if server.metrics else None
            ):
                log.emit(events.stats(server.statistics(), trio.current_time() - started))


async def serve_forever(
    settings: Settings,
    reload_settings: Callable[[], Settings],
    prepare: Callable[[], None] | None = None,
    inherited: list[tuple[socket.socket, str]] | None = None,
    *,
    serve_metrics: bool = True,
) -> None:
    """Run one repeld until SIGTERM: bind, drop privileges, serve, drain.

    `serve_metrics`: serve --metrics here (False in a worker: its parent serves them).
    """
    log = EventLog.from_settings(settings)
    with trio.open_signal_receiver(*_signals()) as signals:
        server = await open_server(settings, log, inherited or ())
        workers.attach_leads(server.listeners, server.tune)  # a worker: the shared lead
        # The backend check (start, reload, periodic): here, or in the --workers parent.
        watch = BackendWatch(settings, log) if serve_metrics else None
        endpoint = None
        if serve_metrics and settings.metrics is not None:

            async def scrape() -> bytes:
                return render(merge([server.metrics_snapshot(), watch.snapshot() if watch else {}]))

            endpoint = open_endpoint(settings.metrics, scrape, foreground=settings.foreground)
        await log.connect_now()  # before a chroot can hide the syslog socket
        if prepare is not None:
            prepare()  # pidfile, privilege drop: after binding
        started = trio.current_time()
        _tune_gc()
        async with trio.open_nursery() as outer:
            outer.start_soon(log.run)
            async with trio.open_nursery() as inner:
                inner.start_soon(
                    _handle_signals, signals, server, log, reload_settings, started, watch
                )
                if watch is not None:
                    inner.start_soon(watch.run)
                inner.start_soon(workers.watch_parent, server.shutdown)
                if endpoint is not None:
                    inner.start_soon(endpoint.run)
                workers.announce_ready()  # to a supervising parent, if there is one
                bound = " ".join(host_port(h, p) for h, p in server.addresses)
                where = ", ".join(str(lst.spec) for lst in server.listeners)
                log.emit(
                    events.lifecycle(
                        EventName.START,
                        version=__version__,
                        listen=bound,
                        **settings.handler_fields(),
                    )
                )
                if settings.foreground:
                    print(
                        f"repeld: listening on {where} (bound {bound}), {settings.handler()}",
                        file=sys.stderr,
                        flush=True,
                    )
                sdnotify.ready(f"listening on {bound}")
                await server.serve()
                inner.cancel_scope.cancel()
            # Every event before stop is written or counted dropped (at most
            # FLUSH_WAIT + SEND_WAIT), so that stop's dropped_events is exact.
            await log.wait_flushed()
            stats = server.statistics()
            log.emit(events.lifecycle(EventName.STOP, **stats))
            outer.cancel_scope.cancel()  # the writer flushes what is queued


def _prepare(
    settings: Settings, plan: privileges.Plan, pid: PidFile | None, *, drop: bool = True
) -> Callable[[], None]:
    def prepare() -> None:
        # Root's last acts: the pid file, then the chroot and the drop.
        if pid is not None:
            # The service user's when this process becomes it; a --workers
            # parent stays root, and a file naming root's process that its
            # unprivileged workers could rewrite would aim root's kill: root's
            # again, even if an older run left it the service user's.
            pid.create(owner=_owner(settings, plan) if drop else _root_owner())
        if not drop:
            return
        if plan.action == "drop":
            assert plan.user is not None
            _make_cache_dir(settings, plan.user)
            privileges.drop_privileges(plan.user, settings.group, settings.chroot)
        elif settings.chroot is not None:
            try:
                os.chroot(settings.chroot)
                os.chdir("/")
            except OSError as exc:
                raise privileges.PrivilegeError(
                    f"--chroot: cannot chroot to {settings.chroot!r}: {exc.strerror}"
                ) from None

    return prepare


def _root_owner() -> tuple[int, int] | None:
    """(0, this group) when running as root, else None (the file stays as it is)."""
    return (0, os.getegid()) if os.geteuid() == 0 else None


def _owner(settings: Settings, plan: privileges.Plan) -> tuple[int, int] | None:
    """(uid, gid) of the service user the pid file belongs to, or None to leave it as is."""
    if plan.action != "drop" or plan.user is None:
        return None
    ident = privileges.resolve(plan.user, settings.group)
    return ident.uid, ident.gid


def _make_cache_dir(settings: Settings, user: str) -> None:
    """Create a missing SQLite cache directory for the service user (as root, before the drop).

    An existing directory is left as the admin made it.
    """
    spec = settings.cache_spec()
    if spec.kind != "sqlite" or not spec.path:
        return
    directory = os.path.dirname(spec.path)
    if settings.chroot is not None:  # the cache is opened after the chroot
        directory = os.path.join(settings.chroot, directory.lstrip("/"))
    if os.path.isdir(directory):
        return
    ident = privileges.resolve(user, settings.group)
    try:
        os.makedirs(directory, mode=0o750)
        os.chown(directory, ident.uid, ident.gid)
    except OSError as exc:
        print(f"repeld: warning: cannot create {directory}: {exc.strerror}", file=sys.stderr)


def start(
    settings: Settings, reload_settings: Callable[[], Settings], argv: Sequence[str] = ()
) -> int:
    """Run the daemon; the exit status (0 after SIGTERM, 1 when it cannot start).

    Three shapes: a single process (the default), a supervisor of
    --workers processes, or one of those workers (spawned by the supervisor,
    which has already bound the listeners and dropped privileges).
    """
    # Never group- or world-writable files, but a stricter mask (systemd's
    # UMask=0027 in repeld.service) is kept: the pass cache's file names
    # clients and their verdicts.
    os.umask(os.umask(0o022) | 0o022)
    pid: PidFile | None = None
    try:
        if os.environ.get(workers.WORKER_ENV) is not None:
            inherited = workers.inherited_sockets()
            # The parent decided what to listen on; the sockets say it exactly.
            configured_specs = {(spec.host, spec.port): spec for spec in settings.listen}
            listen = tuple(
                configured_specs.get((spec.host, spec.port), spec)  # keep a configured ,backend=
                for spec in (activation.spec_for(sock, name) for sock, name in inherited)
            )
            settings = dataclasses.replace(settings, listen=listen)
            configured = reload_settings

            def reload_settings() -> Settings:
                return dataclasses.replace(configured(), listen=listen)

            plan = privileges.decide(settings.user, settings.group)
            run = functools.partial(serve_forever, serve_metrics=False)
            trio.run(run, settings, reload_settings, _prepare(settings, plan, None), inherited)
            return 0
        plan = privileges.decide(settings.user, settings.group)
        pid = PidFile(settings.pidfile) if settings.pidfile else None
        if settings.workers > 1:
            # Like Postfix's master, the supervisor stays root so that it can
            # replace a worker at any time; each worker drops privileges itself.
            parent = _prepare(settings, plan, pid, drop=False)
            trio.run(workers.supervise, settings, list(argv), reload_settings, parent)
        else:
            inherited = activation.listen_fds() if "LISTEN_FDS" in os.environ else []
            prepare = _prepare(settings, plan, pid)
            trio.run(serve_forever, settings, reload_settings, prepare, inherited)
    except (
        privileges.PrivilegeError,
        PidFileError,
        activation.ActivationError,
        workers.WorkerStartError,
        NoResolverError,
    ) as exc:
        print(f"repeld: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"repeld: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        pass
    finally:
        if pid is not None:
            pid.remove()
    return 0

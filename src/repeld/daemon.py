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

import gc
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable

import trio

from . import __version__, events, sdnotify
from .eventlog import EventLog
from .handoff import resolve_backend
from .server import Server, open_server
from .settings import SettingError, Settings, load_trusted

__all__ = ["EXIT_FAILURE", "run", "serve_forever", "start"]

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


async def _reload(server: Server, log: EventLog, reload_settings: Callable[[], Settings]) -> None:
    sdnotify.reloading()
    try:
        settings = reload_settings()
        trusted = load_trusted(settings)
        backend = await resolve_backend(settings.backend.host, settings.backend.port)
    except (SettingError, ValueError, OSError) as exc:
        log.emit(events.config_error(str(exc).replace("\n", "; ")))
    else:
        log.emit(events.reload(server.apply(settings, trusted, backend)))
    sdnotify.ready()


async def _handle_signals(
    signals: AsyncIterator[int],
    server: Server,
    log: EventLog,
    reload_settings: Callable[[], Settings],
    started: float,
) -> None:
    stopping = False
    async for signum in signals:
        if signum == signal.SIGHUP:
            await _reload(server, log, reload_settings)
        elif signum in (signal.SIGTERM, signal.SIGINT):
            sdnotify.stopping()
            # The first asks for a drain; a second cuts the relays at once.
            server.shutdown(0.0 if stopping else None)
            stopping = True
        else:
            log.emit(events.stats(server.statistics(), trio.current_time() - started))


async def serve_forever(
    settings: Settings,
    reload_settings: Callable[[], Settings],
    prepare: Callable[[Server, EventLog], None] | None = None,
) -> None:
    """Run one repeld until SIGTERM: bind, drop privileges, serve, drain."""
    log = EventLog.from_settings(settings)
    with trio.open_signal_receiver(*_signals()) as signals:
        server = await open_server(settings, log)
        await log.connect_now()  # before a chroot can hide the syslog socket
        if prepare is not None:
            prepare(server, log)  # pidfile, privilege drop: after binding
        started = trio.current_time()
        _tune_gc()
        async with trio.open_nursery() as outer:
            outer.start_soon(log.run)
            async with trio.open_nursery() as inner:
                inner.start_soon(_handle_signals, signals, server, log, reload_settings, started)
                where = " ".join(f"{h}:{p}" for h, p in server.addresses)
                log.emit(
                    events.lifecycle(
                        "start", version=__version__, listen=where, backend=str(settings.backend)
                    )
                )
                if settings.foreground:
                    print(
                        f"repeld: listening on {where}, backend {settings.backend}",
                        file=sys.stderr,
                        flush=True,
                    )
                sdnotify.ready(f"listening on {where}")
                await server.serve()
                inner.cancel_scope.cancel()
            stats = server.statistics()
            log.emit(events.lifecycle("stop", **stats))
            outer.cancel_scope.cancel()  # the writer flushes what is queued


def run(
    settings: Settings,
    reload_settings: Callable[[], Settings],
    prepare: Callable[[Server, EventLog], None] | None = None,
) -> None:
    """trio.run(serve_forever); OSError escapes for the caller to report."""
    os.umask(0o022)
    trio.run(serve_forever, settings, reload_settings, prepare)


def start(settings: Settings, reload_settings: Callable[[], Settings]) -> int:
    """Run the daemon; the exit status (0 after SIGTERM, 1 when it cannot start)."""
    try:
        run(settings, reload_settings)
    except OSError as exc:
        print(f"repeld: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        pass
    return 0

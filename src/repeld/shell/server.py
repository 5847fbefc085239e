"""The server: wires the phases of a connection together, drains and reloads.

A connection goes one way through the shell, each phase in its own module:

    accept.py    accept loops, one per listener
    intake.py    who is the client (the socket's peer, or a balancer's PROXY header)
    admit.py     policy (core/policy.py): refused, passed at once, or held
    pen.py       the hold (core/hold.py), with the pass cache and DNS lists' answers
    dispatch.py  the verdict: carried out, written down, learnt by the cache
    handoff.py   the hand-off: relay pool to the MTA, or an --exec program
    eventlog.py  the events, written without ever blocking

This module builds them, runs their tasks in two nurseries (the front: accept
loops, pen, lookups; the relays behind it, which get --shutdown-grace in a
drain), applies a SIGHUP reload and answers for the counters.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import resource
import socket
import sys
from collections.abc import Iterable

import dns.asyncresolver
import trio

from repeld.cache.base import CacheError, PassCache
from repeld.cache.lookup import BatchedLookups
from repeld.cache.open import make_cache
from repeld.config.errors import SettingError
from repeld.config.settings import Listen, Settings, load_trusted
from repeld.core import events
from repeld.core.addresses import client_key
from repeld.core.dnsbl import WATCH_WINDOW
from repeld.core.events import ConnInfo
from repeld.core.gathering import room
from repeld.core.names import EventName
from repeld.core.policy import TrustedNetworks
from repeld.metrics import Metrics, Snapshot
from repeld.service.capacity import (
    capacity_warnings,
    default_max_held,
    epoll_watches,
    raise_nofile,
)
from repeld.service.listeners import DEFAULT_BACKLOG, backlog_for, open_listeners
from repeld.shell.accept import (
    ACCEPT_BACKOFF,
    Batching,
    Listener,
    accept_loop,
)
from repeld.shell.admit import Admission
from repeld.shell.dispatch import Dispatch
from repeld.shell.dnslookup import DnsLookups, make_resolver
from repeld.shell.enforce import enforce_name
from repeld.shell.eventlog import EventLog
from repeld.shell.handoff import (
    BackendTarget,
    HandOff,
    resolve_optional_backend,
    resolve_target,  # issue 19: pass:PATH backends
    tune_listener,
)
from repeld.shell.intake import Intake
from repeld.shell.pen import Held, HoldingPen
from repeld.shell.relaypool import RelayPool
from repeld.shell.replies import SHUTTING_DOWN, reply_and_close

__all__ = ["Server", "open_server", "run_server"]

#: At most one line on stderr this often about accept pausing.
ACCEPT_COMPLAIN_INTERVAL = 10.0


class _Batches:
    """The accept loop's batch hooks for every part that gathers a wake-up's work."""

    __slots__ = ("parts",)

    def __init__(self, *parts: Batching) -> None:
        self.parts = parts

    def defer(self) -> None:
        for part in self.parts:
            part.defer()

    def write_deferred(self) -> None:
        for part in self.parts:
            part.write_deferred()


class Server:
    """One running repeld: its listeners and the phases that serve their clients."""

    def __init__(
        self,
        settings: Settings,
        trusted: TrustedNetworks,
        backend: BackendTarget | None,
        log: EventLog,
        max_held: int | None = None,
        accept_queue: int = DEFAULT_BACKLOG,
    ) -> None:
        self.settings = settings
        self.max_held = max_held if max_held is not None else (settings.max_held or 1 << 30)
        self.log = log
        self.handoff = HandOff(settings, log)
        self.handoff.backend = backend
        #: Each listener's accept queue, as the kernel caps it (the accept loops
        #: never gather on a short one).
        self.accept_queue = accept_queue
        self.dispatch = Dispatch(settings, log, self.handoff)
        # --max-per-client counts an IPv6 client by its --cache-v6-prefix network
        # (a restart-only setting: the pen's keys never change under it).
        per_client = functools.partial(client_key, v6_prefix=settings.cache_v6_prefix)
        self.pen = HoldingPen(self.dispatch.verdict, self._pen_error, per_client)
        self.admission = Admission(settings, trusted, self.max_held, self.pen, self.dispatch, log)
        self.handoff.refuse = self.admission.refuse  # --max-exec
        self.intake = Intake(settings, self.admission, log, self._health_check)
        self.admission.also_held = self.intake.__len__
        self.listeners: list[Listener] = []
        self._front: trio.CancelScope | None = None
        #: `shutdown()` was called: a SIGTERM (or the parent's end) that came
        #: before the front began, while the cache opened, is not lost.
        self._stopping = False
        self._grace = settings.shutdown_grace
        self._drain: trio.CancelScope | None = None
        #: Held clients told to come back at shutdown.
        self.shutdown_held = 0
        #: Counted from every event with --metrics (in a worker too: its parent asks).
        self.metrics: Metrics | None = None
        if settings.metrics is not None:
            self.metrics = Metrics()
            log.observe = self.metrics.observe
        #: The pass cache (None when off), set by open_server; it learns from every verdict.
        self.cache: PassCache | None = None
        #: The DNS lists' resolver (None without lists), made by open_server before
        #: any privilege drop; the lookups task is started by serve.
        self.resolver: dns.asyncresolver.Resolver | None = None
        self._accept_complained = -ACCEPT_COMPLAIN_INTERVAL

    @property
    def backend(self) -> BackendTarget | None:
        """The MTA of clients whose listener names none (None with --exec)."""
        return self.handoff.backend

    @property
    def relays(self) -> int:
        """Clients handed on and not done yet (relayed, or served by --exec)."""
        return self.handoff.active

    @property
    def relay_pool(self) -> RelayPool | None:
        return self.handoff.pool

    @property
    def refused(self) -> int:
        """Clients turned away at a limit since start, every limit together."""
        return sum(self.admission.refusals.values())

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where this server listens (useful with port 0)."""
        return [(str(a[0]), int(a[1])) for a in (lst.sock.getsockname() for lst in self.listeners)]

    def add_listener(
        self, sock: socket.socket, spec: Listen, backend: BackendTarget | None = None
    ) -> None:
        host, port = sock.getsockname()[:2]
        wildcard = host in ("0.0.0.0", "::")
        self.tune(sock)
        self.listeners.append(Listener(sock, spec, None if wildcard else (host, port), backend))

    def tune(self, sock: socket.socket) -> None:
        """Tune a listening socket whose clients this server takes: its own, or
        another worker's, taken while it holds the lead (shell/accept.py's
        `Lead`). One that passes no tuning on means every client is tuned itself."""
        self.handoff.listeners_tuned = tune_listener(sock) and self.handoff.listeners_tuned

    def _room(self) -> bool:
        """Room for the clients of every worker (the lead: shell/accept.py): the
        clients this worker takes stay its own, and its limits are its own."""
        enforcing = self.dispatch.enforcing
        return room(
            (
                (len(self.pen), self.max_held),
                (self.handoff.execs, self.settings.max_exec),
                (enforcing.active, enforcing.limit),
            )
        )

    def _relaying(self) -> int:
        """Sessions the relay pool relays now (the accept loops never gather then)."""
        pool = self.handoff.pool
        return len(pool) if pool is not None else 0

    def _accept_paused(self, listener: Listener, exc: OSError) -> None:
        now = trio.current_time()
        if now - self._accept_complained >= ACCEPT_COMPLAIN_INTERVAL:
            self._accept_complained = now
            print(
                f"repeld: accept on {listener.spec}: {exc.strerror}; pausing "
                f"{ACCEPT_BACKOFF:g}s (held {len(self.pen)}, relays {self.relays})",
                file=sys.stderr,
                flush=True,
            )

    def _pen_error(self, held: Held, message: str) -> None:
        elapsed = trio.current_time() - held.hold.accepted_at
        self.log.emit(events.internal_error(held.conn, elapsed, message))

    def _health_check(
        self, sock: socket.socket, balancer: ConnInfo, now: float, listener: Listener
    ) -> None:
        # A balancer's own connection: straight to the MTA, so it sees the MTA's 220.
        self.handoff.client(sock, balancer, now, listener.backend, check=True)

    async def wait_idle(self) -> None:
        """Return once no client is being relayed or served by --exec (at once if none is)."""
        await self.handoff.wait_idle()

    # -- running -----------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept and serve until `shutdown()` (a drain) or cancellation (at once;
        the clients still held are told 421 all the same).

        Two nurseries, as hypercorn does: the front (pen and accept loops) stops
        at once on shutdown; the relays behind it get the grace period.
        """
        try:
            async with trio.open_nursery() as services:
                if not self._stopping:
                    await self._start_cache(services)
                try:
                    await self._serve(task_status)
                finally:
                    if self.cache is not None:
                        await self.cache.aclose()
                    services.cancel_scope.cancel()
        finally:
            self._close_listeners()
            # Cancelled at once, or a front task failed, the drain was skipped:
            # whoever is still held is told to come back all the same, never just
            # closed (an exception of a Redis look-alike's reply once ended the
            # server and dropped every held client so). After a drain, nobody is.
            self._send_away()
            self.intake.close()
            self.pen.close()

    async def _start_cache(self, services: trio.Nursery) -> None:
        if self.cache is None:
            return
        try:
            await services.start(self.cache.run)
        except (CacheError, OSError) as exc:
            # A mail host keeps accepting mail: without its cache every client
            # simply waits, which is safe.
            message = f"{exc} (cache off until restart)"
            self.log.emit(events.cache_notice(EventName.CACHE_ERROR, message))
            self.cache = None

    async def _serve(self, task_status: trio.TaskStatus[Server]) -> None:
        if self._stopping:
            # Asked to stop before the front began (a SIGTERM during start-up
            # is taken at the cache's opening, the first wait): nothing was
            # accepted, nobody is held, so there is nothing to drain. Served,
            # it would never stop: `shutdown()` had no front to cancel.
            task_status.started(self)
            return
        admission = self.admission
        self.dispatch.cache = self.cache
        async with trio.open_nursery() as relays:
            # Cancelled with the relays at the end of the drain, never before them.
            self.handoff.start(relays)
            async with trio.open_nursery() as front:
                self._front = front.cancel_scope
                front.start_soon(self.pen.run)
                front.start_soon(self.intake.run)
                await front.start(self.dispatch.enforcing.run)  # --on-early enforce
                if self.cache is not None:
                    admission.lookups = BatchedLookups(
                        self.cache,
                        admission.cache_answered,
                        lambda held: not held.hold.done,
                        on_trip=self.metrics.observe_lookup if self.metrics else None,
                    )
                    front.start_soon(admission.lookups.run)
                if self.resolver is not None:
                    s = self.settings
                    admission.dns = DnsLookups(
                        self.resolver,
                        s.dns_lists(),
                        admission.dns_answered,
                        lambda held: held.hold.awaiting_dns,
                        s.dns_timeout,
                        # issue 21: a list that lists nearly everyone is an event
                        on_alarm=lambda domain, share, answer: self.log.emit(
                            events.dns_list_alarm(domain, share, WATCH_WINDOW, answer)
                        ),
                    )
                    self.dispatch.dns = True
                    self.dispatch.dns_domains = admission.dns.domains  # issue 21
                    front.start_soon(admission.dns.run)
                for listener in self.listeners:
                    front.start_soon(self._accept, listener)
                task_status.started(self)
            # Drain: no new clients, held ones told to come back, relays finish.
            self._close_listeners()
            self._send_away()
            with trio.CancelScope(deadline=trio.current_time() + self._grace) as drain:
                self._drain = drain
                await self.wait_idle()
            relays.cancel_scope.cancel()

    def _send_away(self) -> None:
        # Every client still sending its header or held is told to come back
        # (421), an enforce talker's talk written down first.
        for sock in self.intake.evict_all():
            reply_and_close(sock, SHUTTING_DOWN)
        for held in self.pen.evict_all():
            self.dispatch.enforcing.evicted(held)  # --on-early enforce
            reply_and_close(held.sock, SHUTTING_DOWN)
            self.shutdown_held += 1

    async def _accept(self, listener: Listener) -> None:
        # A wake-up's clients are one batch for the event log (their events go
        # out together) and for the pass pool (its wake-up moved once).
        passer = self.handoff.passer
        batching: Batching = self.log if passer is None else _Batches(self.log, passer)
        try:
            await accept_loop(
                listener,
                self.intake.accepted,
                self._accept_paused,
                self._relaying,
                self.accept_queue,
                # Workers gather one at a time, each for all (the lead, shell/
                # accept.py), with one process's windows.
                batching=batching,
                room=self._room,
            )
        except OSError as exc:
            # A broken listener (EBADF, EINVAL...) never heals: retrying it would
            # spin. Say so in the event log, then end the server with it, as
            # trio's serve_listeners does.
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            message = f"accept on {listener.spec}: {name} {exc.strerror}; listener broken, stopping"
            self.log.emit(events.internal_error(None, 0.0, message))
            raise

    def _close_listeners(self) -> None:
        for lst in self.listeners:
            lst.sock.close()
            if lst.lead is not None:
                lst.lead.close()

    def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting now; 421 to held clients; relays get `grace` seconds.
        Before `serve()` has begun to accept, it never will."""
        self._stopping = True
        self._grace = self.settings.shutdown_grace if grace is None else grace
        if self._drain is not None:  # already draining: a second SIGTERM shortens it
            self._drain.deadline = min(self._drain.deadline, trio.current_time() + self._grace)
        if self._front is not None:
            self._front.cancel()

    def apply(
        self, settings: Settings, trusted: TrustedNetworks, backend: BackendTarget | None
    ) -> list[str]:
        """Take new settings for the next connections (SIGHUP); what could not change.

        Held connections keep their deadlines and relays their backend; new
        connections see the new delay, trusted networks, limits and backend.
        """
        old = self.settings  # what runs: the restart-only settings as started
        notes = [
            f"{name.replace('_', '-')} changed: takes effect after a restart"
            for name in _kept(old, settings)
            if getattr(old, name) != getattr(settings, name)
        ]
        settings = pinned(old, settings)
        admission = self.admission
        if settings.max_held != old.max_held:
            # Taken out of the file: the default again, as open_server makes it.
            nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            held = settings.max_held or default_max_held(nofile)
            self.max_held = admission.max_held = held
        self.settings = settings
        if admission.dns is not None:
            admission.dns.timeout = settings.dns_timeout
        # (Lists changed or removed: the running ones and their policy, as pinned.)
        admission.configure(settings, trusted, settings.dns_policy())
        self.intake.configure(settings)
        self.dispatch.settings = settings
        self.dispatch.enforcing.name = enforce_name(settings)  # --on-early enforce
        self.handoff.settings = settings
        self.handoff.backend = backend
        self.log.reconfigure(settings)
        return notes

    def statistics(self) -> dict[str, int]:
        """Connections by verdict since start, and what is in flight now."""
        counts = self.log.counts
        dns = self.admission.dns
        return {
            "held": len(self.pen),
            "relays": self.relays,
            "pass": counts[EventName.PASS],
            "early_talker": counts[EventName.EARLY_TALKER],
            "hangup": counts[EventName.HANGUP],
            "refused": self.refused,
            "shutdown_held": self.shutdown_held,
            "backend_error": counts[EventName.BACKEND_ERROR],
            "relay_end": counts[EventName.RELAY_END],
            "dropped_events": self.log.dropped,
            **self._cache_statistics(),
            **(dns.statistics() if dns is not None else {}),
        }

    def metrics_snapshot(self) -> Snapshot:
        """What --metrics shows of this process (repeld/metrics.py names each part)."""
        assert self.metrics is not None
        self.log.settle()  # the events built lazily (EventLog.emit_built) counted too
        cache = self.cache.statistics() if self.cache is not None else {}
        dns = self.admission.dns
        gauges = {"held": len(self.pen), "relays": self.relays, "max_held": self.max_held}
        gauges["enforcing"] = self.dispatch.enforcing.active  # --on-early enforce
        if self.settings.proxy_from or self.intake.outcomes:
            gauges["proxy_pending"] = len(self.intake)
        if "entries" in cache:  # cheap to know for the memory cache only
            gauges["cache_entries"] = cache["entries"]
        return self.metrics.snapshot(
            labelled={
                "refusals": {str(k): n for k, n in self.admission.refusals.items()},
                "cache_lookups": {k: cache.get(k, 0) for k in ("good", "bad", "unknown")},
                "dns_lookups": dns.results() if dns is not None else {},
                "dns_hits": dns.hits() if dns is not None else {},
                "events": dict(self.log.counts),
                "proxy": {str(k): n for k, n in self.intake.outcomes.items()},
                "handoffs": self.handoff.pass_outcomes(),  # issue 19
            },
            totals={
                "backend_errors": self.log.counts[EventName.BACKEND_ERROR],
                "cache_errors": cache.get("errors", 0),
                "cache_outages": cache.get("outages", 0),
                "events_dropped": self.log.dropped,
                "shutdown_held": self.shutdown_held,
            },
            gauges=gauges,
        )

    def _cache_statistics(self) -> dict[str, int]:
        if self.cache is None:
            return {}
        stats = self.cache.statistics()
        return {
            f"cache_{k}": int(stats.get(k, 0))
            for k in ("lookups", "good", "bad", "unknown", "errors", "outages")
        }


#: The DNS lists' thresholds and action: kept with the lists while they wait for a restart.
_DNS_POLICY = ("dnsbl_threshold", "dnswl_threshold", "dnsbl_action", "dnsbl_delay")

#: Settings a running server cannot take over on SIGHUP.
_RESTART_ONLY = (
    "listen",
    "backlog",
    "user",
    "group",
    "chroot",
    "pidfile",
    "workers",
    "cache",
    "no_cache",
    "cache_ttl",
    "cache_v6_prefix",
    "penalty_ttl",
    "metrics",
    "dnsbl",
    "dnswl",
    "resolver",
)


def _kept(running: Settings, new: Settings) -> tuple[str, ...]:
    # The settings of `running` that `new` cannot change without a restart: the
    # restart-only ones, and while the DNS lists wait for one (changed, or
    # removed), their thresholds and action too: new ones written for the new
    # weights must not weigh the old.
    if running.dns_lists() != new.dns_lists():
        return _RESTART_ONLY + _DNS_POLICY
    return _RESTART_ONLY


def pinned(running: Settings, new: Settings) -> Settings:
    """`new`, but with what of `running` only a restart changes: what a server
    that runs `running` serves once it has applied `new` (`Server.apply`).

    SettingError if the two together break a rule across settings: a reload
    refused, not served (build_settings checked `new` alone).
    """
    kept = dataclasses.replace(
        new, **{name: getattr(running, name) for name in _kept(running, new)}
    )
    if kept.dnsbl and kept.dnsbl_action == "delay" and kept.dnsbl_delay <= kept.delay:
        # The lists changed: their policy waits for a restart with them, and a
        # listed client would be held for less than a clean one.
        raise SettingError(
            "delay",
            kept.delay,
            f"must be shorter than the --dnsbl-delay ({kept.dnsbl_delay:g}) that the DNS "
            "lists keep until a restart",
        )
    return kept


async def open_server(
    settings: Settings,
    log: EventLog,
    inherited: Iterable[tuple[socket.socket, str]] = (),
) -> Server:
    """Resolve, check the limits and open every listener: a Server ready to serve.

    Binding happens here, before any privilege drop; `inherited` sockets
    (systemd socket activation, or a supervising parent) are used where they
    match a --listen spec.
    """
    trusted = load_trusted(settings)
    backend = await resolve_optional_backend(settings)
    limits = raise_nofile()
    max_held = settings.max_held or default_max_held(limits.soft)
    backlog, accept_cap = backlog_for(settings)
    warnings = capacity_warnings(
        max_held, limits, backlog, accept_cap, watches=epoll_watches(), workers=settings.workers
    )
    for warning in warnings:
        print(f"repeld: warning: {warning}", file=sys.stderr, flush=True)
    server = Server(settings, trusted, backend, log, max_held, min(backlog, accept_cap or backlog))
    # Built here, before any privilege drop or chroot, so its modules are loaded.
    server.cache = make_cache(
        settings.cache_spec(),
        pass_ttl=settings.cache_ttl,
        penalty_ttl=settings.penalty_ttl or None,
        on_error=lambda message: log.emit(events.cache_notice(EventName.CACHE_ERROR, message)),
        on_recover=lambda message: log.emit(events.cache_notice(EventName.CACHE_RECOVER, message)),
    )
    if settings.dns_policy() is not None:
        server.resolver = make_resolver(settings.resolver)
    own: dict[str, BackendTarget] = {}
    for sock, spec in open_listeners(settings, backlog, inherited):
        target = None
        if spec.backend is not None:
            key = str(spec.backend)  # issue 19: HOST:PORT or pass:PATH
            if key not in own:
                own[key] = await resolve_target(spec.backend)  # issue 19
            target = own[key]
        server.add_listener(sock, spec, target)
    return server


async def run_server(
    settings: Settings,
    log: EventLog | None = None,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Bind, resolve and serve `settings` until cancelled or shut down."""
    log = log or EventLog.from_settings(settings)
    server = await open_server(settings, log)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run)
        await nursery.start(server.serve)
        task_status.started(server)

"""The shell: listeners, accept loops, and what happens after each verdict.

Everything here is I/O and wiring. The decisions are made by `policy.Policy`
(before the hold) and `core.Hold` (during it, driven by the holding pen); this
module carries them out and writes one event per verdict.
"""

from __future__ import annotations

import collections
import errno
import socket
import sys
from collections.abc import Iterable

import dns.asyncresolver
import trio

from repeld.cache.base import CacheError, CacheVerdict, PassCache
from repeld.cache.lookup import BatchedLookups
from repeld.cache.open import make_cache
from repeld.config.settings import Listen, Settings, load_trusted
from repeld.core import events
from repeld.core.addresses import cache_key, normalize_address
from repeld.core.dnsbl import WATCH_WINDOW, DnsScore
from repeld.core.events import ConnInfo
from repeld.core.hold import (
    Blocked,
    EarlyTalk,
    HangUp,
    Hold,
    Logged,
    Pass,
    Penalty,
    Verdict,
    Wait,
    teaser_line,
)
from repeld.core.policy import Policy, Refuse, TrustedNetworks
from repeld.metrics import Metrics, Snapshot
from repeld.service.capacity import capacity_warnings, default_max_held, raise_nofile
from repeld.service.listeners import backlog_for, open_listeners
from repeld.shell.accept import ACCEPT_BACKOFF, Listener, accept_loop
from repeld.shell.dnslookup import DnsLookups, make_resolver
from repeld.shell.eventlog import EventLog
from repeld.shell.handoff import (
    BackendTarget,
    handoff,
    reply_and_close,
    resolve_backend,
    resolve_optional_backend,
    tune_listener,
)
from repeld.shell.pen import Held, HoldingPen
from repeld.shell.relaypool import RelayPool
from repeld.shell.ucspi import handoff_exec
from repeld.shell.verdicts import (
    REFUSALS,
    SHUTTING_DOWN,
    abort,
    block,
    cut_off,
    rtt_ms,
    send_now,
)

__all__ = ["Server", "open_server", "run_server"]

#: At most one overload event per limit this often; it counts the refusals between.
OVERLOAD_EVENT_INTERVAL = 1.0
#: At most one line on stderr this often about accept pausing.
ACCEPT_COMPLAIN_INTERVAL = 10.0


class Server:
    """One running repeld: its listeners, its pen and its handlers."""

    def __init__(
        self,
        settings: Settings,
        trusted: TrustedNetworks,
        backend: BackendTarget | None,
        log: EventLog,
        max_held: int | None = None,
    ) -> None:
        self.settings = settings
        self.max_held = max_held if max_held is not None else (settings.max_held or 1 << 30)
        self.policy = Policy(trusted, self.max_held, settings.max_per_client)
        self.backend = backend
        self.log = log
        self.pen = HoldingPen(self._on_verdict, self._pen_error)
        #: What every held client hears as its hold begins (--teaser), else b"".
        self._teaser = _teaser(settings)
        self.listeners: list[Listener] = []
        #: Every listener hands out sockets already tuned for relaying.
        self._listeners_tune = True
        #: Clients handed on and not done yet (relayed by the pool, or --exec).
        self.relays = 0
        #: Set when `relays` falls to 0, for whoever waits in `wait_idle`.
        self._idle: trio.Event | None = None
        #: The relays nursery: the relay pool's task, and a task per --exec client.
        self._handlers: trio.Nursery | None = None
        #: Every relayed session, from the backend connect to its end, in one task.
        self.relay_pool: RelayPool | None = None
        self._front: trio.CancelScope | None = None
        self._grace = settings.shutdown_grace
        self._drain: trio.CancelScope | None = None
        #: Clients turned away at a limit, by limit (`refused` sums them), and held
        #: clients told to come back at shutdown.
        self.refusals: collections.Counter[str] = collections.Counter()
        self.shutdown_held = 0
        #: Counted from every event with --metrics (in a worker too: its parent asks).
        self.metrics: Metrics | None = None
        if settings.metrics is not None:
            self.metrics = Metrics()
            log.observe = self.metrics.observe
        #: The pass cache (None when off); it learns from every verdict.
        self.cache: PassCache | None = None
        self._v6_prefix = settings.cache_v6_prefix
        self._penalties = settings.penalty_ttl > 0
        self._lookups: BatchedLookups[Held] | None = None
        #: The DNS lists' lookups (None without lists); the resolver is made by
        #: open_server before any privilege drop, and the task by serve.
        self.resolver: dns.asyncresolver.Resolver | None = None
        self._dns: DnsLookups[Held] | None = None
        #: The lists' thresholds and action, made once per configuration.
        self._dns_policy = settings.dns_policy()
        # limit -> (time of the last overload event, refusals since then)
        self._overload: dict[Refuse, tuple[float, int]] = {}
        self._accept_complained = -ACCEPT_COMPLAIN_INTERVAL

    @property
    def refused(self) -> int:
        """Clients turned away at a limit since start, every limit together."""
        return sum(self.refusals.values())

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where this server listens (useful with port 0)."""
        return [(str(a[0]), int(a[1])) for a in (lst.sock.getsockname() for lst in self.listeners)]

    def add_listener(
        self, sock: socket.socket, spec: Listen, backend: BackendTarget | None = None
    ) -> None:
        host, port = sock.getsockname()[:2]
        wildcard = host in ("0.0.0.0", "::")
        # One listener that passes no tuning on means every client is tuned itself.
        self._listeners_tune = tune_listener(sock) and self._listeners_tune
        self.listeners.append(Listener(sock, spec, None if wildcard else (host, port), backend))

    # -- accepting ---------------------------------------------------------------

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

    def _accepted(self, sock: socket.socket, addr: tuple[object, ...], listener: Listener) -> None:
        now = trio.current_time()
        try:  # accept_loop hands out non-blocking sockets
            if listener.local is not None:
                server, server_port = listener.local
            else:
                server, server_port = sock.getsockname()[:2]
                server = normalize_address(server)
        except OSError:
            # Reset between accept() and here: nothing to serve, nobody to greet,
            # but still one verdict, counted like any other.
            self._reset_at_accept(sock, addr, listener, now)
            return
        client = normalize_address(str(addr[0]))
        conn = ConnInfo(client, int(addr[1]), server, int(server_port))  # type: ignore[call-overload]
        pen = self.pen
        admission = self.policy.admit(
            client,
            nodelay=listener.spec.nodelay,
            held=len(pen),
            held_from_client=pen.per_client.get(client, 0),
        )
        if admission is None:
            key = None
            if self._lookups is not None:
                try:
                    key = cache_key(client, self._v6_prefix)
                except ValueError:
                    pass
            settings = self.settings
            dns = self._dns
            hold = Hold(
                now,
                settings.delay,
                cache_pending=key is not None,
                observe=settings.on_early == "log",
                teaser=self._teaser,
                dns=self._dns_policy if dns is not None else None,
            )
            held = Held(sock, conn, hold, listener.backend)
            known = dns.known(client, now) if dns is not None else None
            if known is not None and not self._listed_at_accept(held, known, now):
                return
            if self._teaser and not self._tease(held, now):
                return
            pen.add(held)
            if key is not None:
                # The hold has begun; a known client is let out as soon as the
                # cache answers, so a slow cache never delays anyone further,
                # and a talker's verdict waits for that answer (core/hold.py).
                assert self._lookups is not None
                self._lookups.ask(key, held)
            if dns is not None and known is None:
                # In parallel with the cache; the hold never waits for either.
                dns.ask(client, held)
        elif isinstance(admission, Refuse):
            reply_and_close(sock, REFUSALS[admission])
            self.refusals[admission] += 1
            self._note_overload(conn, admission, now)
        else:
            self._pass(sock, conn, now, Pass(admission, 0.0), listener.backend)

    def _listed_at_accept(self, held: Held, result: DnsScore, now: float) -> bool:
        """Feed the lists' score known at accept (every answer still cached) to
        the hold before it begins; True if it goes on, False if that decided it.

        What the pen would do with the same verdict a moment later, without the
        trip: a client allowed or blocked is never teased nor watched.
        """
        verdict = held.hold.listed(result, now)
        while isinstance(verdict, Logged):  # action log or delay: written down
            self._on_verdict(held, verdict)
            verdict = verdict.then
        if isinstance(verdict, Wait):
            return True
        self._on_verdict(held, verdict)
        return False

    def _tease(self, held: Held, now: float) -> bool:
        """Send the teaser line before the hold begins; False if the client is gone.

        Never blocking: a fresh socket takes one line at once, and one that does
        not is the core's to judge (a hang-up), so the pen never waits on a write.
        """
        hold = held.hold
        sent = send_now(held.sock, hold.opening())
        verdict = hold.reset(now) if sent is None else hold.opened(sent, now)
        if isinstance(verdict, Wait):
            return True
        assert isinstance(verdict, HangUp)
        abort(held.sock)
        self.log.emit(events.hangup(held.conn, verdict))
        return False

    def _reset_at_accept(
        self, sock: socket.socket, addr: tuple[object, ...], listener: Listener, now: float
    ) -> None:
        """A `hangup` (how=reset) for a client gone before its socket could be read.

        The peer comes from accept(); the server address from the listener (its
        bound address, else its --listen spec), since the socket tells nothing.
        """
        sock.close()
        if listener.local is not None:
            server, server_port = listener.local
        else:
            try:
                server, server_port = listener.sock.getsockname()[:2]
            except OSError:
                server, server_port = listener.spec.host, listener.spec.port
        client_port = addr[1] if len(addr) > 1 and isinstance(addr[1], int) else 0
        conn = ConnInfo(
            normalize_address(str(addr[0]) if addr else ""),
            client_port,
            normalize_address(str(server)),
            int(server_port),
        )
        verdict = Hold(now, self.settings.delay).reset(now)  # the table's own answer
        assert isinstance(verdict, HangUp)
        self.log.emit(events.hangup(conn, verdict))

    def _note_overload(self, conn: ConnInfo, limit: Refuse, now: float) -> None:
        # Under a flood one event a second stands for every refusal in it.
        last, count = self._overload.get(limit, (-OVERLOAD_EVENT_INTERVAL, 0))
        count += 1
        if now - last >= OVERLOAD_EVENT_INTERVAL:
            self.log.emit(events.overload(conn, str(limit), count))
            self._overload[limit] = (now, 0)
        else:
            self._overload[limit] = (last, count)

    # -- verdicts ----------------------------------------------------------------

    def _cache_answer(self, held: Held, answer: CacheVerdict) -> None:
        hold = held.hold
        if not hold.awaiting_cache:  # too late: the talk was judged without it
            return
        if answer is CacheVerdict.GOOD:
            self.pen.settle(held, hold.remembered_good)
        elif answer is CacheVerdict.BAD and self._penalties:
            self.pen.settle(held, hold.remembered_bad)
        else:
            self.pen.settle(held, hold.unknown)

    def _dns_answer(self, held: Held, result: DnsScore) -> None:
        hold = held.hold
        if hold.awaiting_dns:  # else decided meanwhile: the answer is not needed
            self.pen.settle(held, lambda now: hold.listed(result, now))

    def _dns_of(self, held: Held) -> DnsScore | None:
        # The lists' word for the events: None without lists, zero if unanswered.
        if self._dns is None:
            return None
        return held.hold.dns_result or DnsScore(missing=self._dns.domains)  # issue 21: unanswered

    def _learn(self, conn: ConnInfo, good: bool) -> None:
        # Only a full wait makes a client good; early talk makes it bad.
        if self.cache is None:
            return
        try:
            key = cache_key(conn.client, self._v6_prefix)
        except ValueError:
            return
        if good:
            self.cache.remember_good(key)
        else:
            self.cache.remember_bad(key)

    def _on_verdict(self, held: Held, verdict: Verdict) -> None:
        if isinstance(verdict, Logged):  # observe mode: write it down, cut nobody off
            self._observed(held, verdict.note)
        elif isinstance(verdict, Pass):
            backend = held.backend
            if verdict.remembered:
                self._learn(held.conn, good=True)
            self._pass(
                held.sock, held.conn, held.hold.accepted_at, verdict, backend, self._dns_of(held)
            )
        elif isinstance(verdict, EarlyTalk):
            self._learn(held.conn, good=False)
            self._cut_off(held, verdict)
        elif isinstance(verdict, Penalty):
            abort(held.sock)
            self.log.emit(events.penalized(held.conn, verdict.elapsed, dns=self._dns_of(held)))
        elif isinstance(verdict, HangUp):
            held.sock.close()
            self.log.emit(events.hangup(held.conn, verdict))
        elif isinstance(verdict, Blocked):  # drop or reject: the lists ended it
            block(held.sock, held.conn.client, verdict)
            self.log.emit(events.dnsbl(held.conn, verdict))

    def _observed(self, held: Held, note: EarlyTalk | Penalty | Blocked) -> None:
        # The cache learns from a logged talk what it learns from a cut-off one;
        # a logged penalty is already remembered.
        if isinstance(note, Blocked):  # log or delay: written down, held on
            self.log.emit(events.dnsbl(held.conn, note))
        elif isinstance(note, EarlyTalk):
            self._learn(held.conn, good=False)
            dns = self._dns_of(held)
            self.log.emit(events.early_talker(held.conn, note, "log", rtt_ms(held.sock), dns))
        else:
            self.log.emit(events.penalized(held.conn, note.elapsed, "log", self._dns_of(held)))

    def _pen_error(self, held: Held, message: str) -> None:
        elapsed = trio.current_time() - held.hold.accepted_at
        self.log.emit(events.internal_error(held.conn, elapsed, message))

    def _pool_error(self, message: str) -> None:
        self.log.emit(events.internal_error(None, 0.0, message))

    def _cut_off(self, held: Held, verdict: EarlyTalk) -> None:
        action = self.settings.on_early
        rtt = rtt_ms(held.sock)
        cut_off(held.sock, verdict, action)
        self.log.emit(events.early_talker(held.conn, verdict, action, rtt, self._dns_of(held)))

    def _pass(
        self,
        sock: socket.socket,
        conn: ConnInfo,
        accepted_at: float,
        verdict: Pass,
        backend: BackendTarget | None = None,
        dns: DnsScore | None = None,
    ) -> None:
        if dns is None and self._dns is not None:  # trusted, nodelay: never asked
            dns = DnsScore()
        self.log.emit(events.passed(conn, verdict, rtt_ms(sock), dns))
        target = backend or self.backend
        s = self.settings
        self.relays += 1
        if target is None:
            assert s.exec is not None  # settings guarantee one or the other
            assert self._handlers is not None
            self._handlers.start_soon(self._exec, sock, conn, accepted_at, s.exec)
            return
        assert self.relay_pool is not None  # started with the relays nursery
        handoff(
            sock,
            conn,
            accepted_at,
            target,
            s.proxy_protocol,
            s.connect_timeout,
            s.relay_timeout,
            self.log,
            self.relay_pool,
            self._relay_ended,
            self._listeners_tune,
            not s.keep_pipe_connect,
        )

    def _relay_ended(self) -> None:
        self.relays -= 1
        if not self.relays and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no client is being relayed or served by --exec (at once if none is)."""
        while self.relays:
            if self._idle is None or self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()

    async def _exec(
        self, sock: socket.socket, conn: ConnInfo, accepted_at: float, program: tuple[str, ...]
    ) -> None:
        try:
            await handoff_exec(sock, conn, accepted_at, program, self.log)
        finally:
            self._relay_ended()

    # -- running -----------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Accept and serve until `shutdown()` (a drain) or cancellation (at once).

        Two nurseries, as hypercorn does: the front (pen and accept loops) stops
        at once on shutdown; the relays behind it get the grace period.
        """
        try:
            async with trio.open_nursery() as services:
                await self._start_cache(services)
                try:
                    await self._serve(task_status)
                finally:
                    if self.cache is not None:
                        await self.cache.aclose()
                    services.cancel_scope.cancel()
        finally:
            self._close_listeners()
            self.pen.close()

    async def _start_cache(self, services: trio.Nursery) -> None:
        if self.cache is None:
            return
        try:
            await services.start(self.cache.run)
        except (CacheError, OSError) as exc:
            # A mail host keeps accepting mail: without its cache every client
            # simply waits, which is safe.
            self.log.emit(events.cache_notice("cache-error", f"{exc} (cache off until restart)"))
            self.cache = None

    async def _serve(self, task_status: trio.TaskStatus[Server]) -> None:
        async with trio.open_nursery() as relays:
            self._handlers = relays
            # Cancelled with the relays at the end of the drain, never before them.
            self.relay_pool = RelayPool(self._pool_error)
            relays.start_soon(self.relay_pool.run)
            async with trio.open_nursery() as front:
                self._front = front.cancel_scope
                front.start_soon(self.pen.run)
                if self.cache is not None:
                    self._lookups = BatchedLookups(
                        self.cache,
                        self._cache_answer,
                        lambda held: not held.hold.done,
                        on_trip=self.metrics.observe_lookup if self.metrics else None,
                    )
                    front.start_soon(self._lookups.run)
                if self.resolver is not None:
                    s = self.settings
                    self._dns = DnsLookups(
                        self.resolver,
                        s.dns_lists(),
                        self._dns_answer,
                        lambda held: held.hold.awaiting_dns,
                        s.dns_timeout,
                        # issue 21: a list that lists nearly everyone is an event
                        on_alarm=lambda domain, share: self.log.emit(
                            events.dns_list_alarm(domain, share, WATCH_WINDOW)
                        ),
                    )
                    front.start_soon(self._dns.run)
                for listener in self.listeners:
                    self._start_listener(front, listener)
                task_status.started(self)
            # Drain: no new clients, held ones told to come back, relays finish.
            self._close_listeners()
            for held in self.pen.evict_all():
                reply_and_close(held.sock, SHUTTING_DOWN)
                self.shutdown_held += 1
            with trio.CancelScope(deadline=trio.current_time() + self._grace) as drain:
                self._drain = drain
                await self.wait_idle()
            relays.cancel_scope.cancel()

    def _start_listener(self, nursery: trio.Nursery, listener: Listener) -> None:
        nursery.start_soon(self._accept, listener)

    async def _accept(self, listener: Listener) -> None:
        try:
            await accept_loop(listener, self._accepted, self._accept_paused)
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

    def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting now; 421 to held clients; relays get `grace` seconds."""
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
        old = self.settings
        notes = [
            f"{name.replace('_', '-')} changed: takes effect after a restart"
            for name in _RESTART_ONLY
            if getattr(old, name) != getattr(settings, name)
        ]
        if settings.max_held != old.max_held and settings.max_held is not None:
            self.max_held = settings.max_held
        self.settings = settings
        self._teaser = _teaser(settings)
        policy = settings.dns_policy()
        if self._dns is not None:  # the lists and the resolver need a restart
            self._dns.timeout = settings.dns_timeout
            if policy is None:  # lists removed: they stay until then, with their policy
                policy = self._dns_policy
        self._dns_policy = policy
        self.policy = Policy(trusted, self.max_held, settings.max_per_client)
        self.backend = backend
        self.log.reconfigure(settings)
        return notes

    def statistics(self) -> dict[str, int]:
        """Connections by verdict since start, and what is in flight now."""
        counts = self.log.counts
        return {
            "held": len(self.pen),
            "relays": self.relays,
            "pass": counts["pass"],
            "early_talker": counts["early-talker"],
            "hangup": counts["hangup"],
            "refused": self.refused,
            "shutdown_held": self.shutdown_held,
            "backend_error": counts["backend-error"],
            "relay_end": counts["relay-end"],
            "dropped_events": self.log.dropped,
            **self._cache_statistics(),
            **(self._dns.statistics() if self._dns is not None else {}),
        }

    def metrics_snapshot(self) -> Snapshot:
        """What --metrics shows of this process (repeld/metrics.py names each part)."""
        assert self.metrics is not None
        cache = self.cache.statistics() if self.cache is not None else {}
        gauges = {"held": len(self.pen), "relays": self.relays}
        if "entries" in cache:  # cheap to know for the memory cache only
            gauges["cache_entries"] = cache["entries"]
        return self.metrics.snapshot(
            labelled={
                "refusals": {str(k): n for k, n in self.refusals.items()},
                "cache_lookups": {k: cache.get(k, 0) for k in ("good", "bad", "unknown")},
                "dns_lookups": self._dns.results() if self._dns is not None else {},
                "dns_hits": self._dns.hits() if self._dns is not None else {},
                "events": dict(self.log.counts),
            },
            totals={
                "backend_errors": self.log.counts["backend-error"],
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


def _teaser(settings: Settings) -> bytes:
    # The host name is read at start and on reload: what the MTA's banner most
    # likely names too (postscreen's teaser is its $smtpd_banner).
    if not settings.teaser:
        return b""
    return teaser_line(settings.teaser_text or socket.gethostname())


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
    for warning in capacity_warnings(max_held, limits, backlog, accept_cap):
        print(f"repeld: warning: {warning}", file=sys.stderr, flush=True)
    server = Server(settings, trusted, backend, log, max_held)
    # Built here, before any privilege drop or chroot, so its modules are loaded.
    server.cache = make_cache(
        settings.cache_spec(),
        pass_ttl=settings.cache_ttl,
        penalty_ttl=settings.penalty_ttl or None,
        on_error=lambda message: log.emit(events.cache_notice("cache-error", message)),
        on_recover=lambda message: log.emit(events.cache_notice("cache-recover", message)),
    )
    if settings.dns_policy() is not None:
        server.resolver = make_resolver(settings.resolver)
    own: dict[tuple[str, int], BackendTarget] = {}
    for sock, spec in open_listeners(settings, backlog, inherited):
        target = None
        if spec.backend is not None:
            key = (spec.backend.host, spec.backend.port)
            if key not in own:
                own[key] = await resolve_backend(*key)
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

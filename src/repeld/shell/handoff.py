"""The pass path: connect to the MTA, announce the client, relay until done.

`handoff` tunes the client's socket, builds the PROXY header and gives the
client to the relay pool, which connects, writes the header and relays with no
task of the client's own; when the session ends, the pool calls back here for
the `relay-end` event. A `pass:PATH` backend (a Postfix pass service) goes to
the pass pool instead (shell/passfd.py): smtpd takes the client's socket
itself and repeld is out of the session. If the MTA cannot be reached the client is told
`421 4.3.2` and a real MTA on the other end retries later, so no mail is lost.
Unless --keep-pipe-connect, the MTA's first EHLO reply reaches the client
without PIPECONNECT (core/ehlofilter.py), so it never pipelines before the
greeting of a later connection and gets cut off as an early talker.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

import trio

from repeld.config.settings import AnyBackend, PassBackend, Settings
from repeld.core import events, postfixpass, proxyproto
from repeld.core.addresses import host_port
from repeld.core.events import ConnInfo
from repeld.core.names import HandOffHow, HandOffResult, RelayEnd
from repeld.core.policy import Refuse
from repeld.service import tcptune
from repeld.shell.eventlog import EventLog
from repeld.shell.passfd import PassPool, PassPoolClosed
from repeld.shell.relay import RelayResult
from repeld.shell.relaypool import RelayPool, RelayPoolClosed
from repeld.shell.replies import BACKEND_UNAVAILABLE, REFUSALS, reply_and_close
from repeld.shell.ucspi import handoff_exec

__all__ = [
    "BackendTarget",
    "HandOff",
    "handoff",
    "pass_to_smtpd",
    "resolve_backend",
    "resolve_optional_backend",
    "resolve_target",
    "tune_listener",
]


@dataclass(frozen=True, slots=True)
class BackendTarget:
    """The MTA's resolved socket addresses, tried in order; or, with `pass_path`,
    the socket of a Postfix pass service (and no addresses)."""

    name: str
    addresses: tuple[tuple[int, tuple[object, ...]], ...]  # (family, sockaddr)
    pass_path: str | None = None


async def resolve_backend(host: str, port: int) -> BackendTarget:
    """Resolve the MTA once (at start and on reload), not per connection.

    An OSError naming the backend if it cannot be resolved.
    """
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OSError(f"--backend {host_port(host, port)}: cannot resolve: {reason}") from None
    seen: list[tuple[int, tuple[object, ...]]] = []
    for family, _, _, _, addr in infos:
        entry = (int(family), tuple(addr))
        if entry not in seen:
            seen.append(entry)
    name = host_port(host, port)
    return BackendTarget(name, tuple(seen))


async def resolve_target(backend: AnyBackend) -> BackendTarget:
    """A --backend or ,backend= resolved; a pass service needs no resolving."""
    if isinstance(backend, PassBackend):
        return BackendTarget(str(backend), (), backend.path)
    return await resolve_backend(backend.host, backend.port)


async def resolve_optional_backend(settings: Settings) -> BackendTarget | None:
    """The --backend resolved, or None when clients go to an --exec program."""
    if settings.backend is None:
        return None
    return await resolve_target(settings.backend)


#: A relayed client silent this long is probed; after KEEPALIVE_COUNT unanswered
#: probes KEEPALIVE_INTERVAL apart, or data unacknowledged for USER_TIMEOUT_MS,
#: the kernel drops it, well before --relay-timeout would.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 6
USER_TIMEOUT_MS = 120_000


#: Accepted sockets take these options from their listener, so one setsockopt
#: per listener stands for five per client. Checked on Linux only (where the
#: tests read them back); elsewhere each relayed client is tuned itself.
LISTENER_TUNING_INHERITED = sys.platform.startswith("linux")


def _tune_for_relay(sock: socket.socket) -> None:
    """No Nagle delay for replies, and let the kernel notice a vanished peer."""
    # forward each reply at once: no Nagle delay behind a delayed ACK
    tcptune.set_nodelay(sock.fileno())
    tcptune.set_keepalive(sock.fileno(), KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
    tcptune.set_user_timeout(sock.fileno(), USER_TIMEOUT_MS)


def tune_listener(sock: socket.socket) -> bool:
    """Tune a listener so the sockets it accepts need no tuning of their own.

    True if every client accepted from it is tuned as `handoff` needs; False
    (the platform does not pass the options on, or one was refused) means
    `handoff` must tune each client itself.
    """
    if not LISTENER_TUNING_INHERITED:
        return False
    try:
        _tune_for_relay(sock)
    except OSError:
        return False
    return True


def handoff(
    sock: socket.socket,
    conn: ConnInfo,
    accepted_at: float,
    target: BackendTarget,
    proxy_protocol: str,
    connect_timeout: float,
    relay_timeout: float,
    log: EventLog,
    pool: RelayPool,
    ended: Callable[[], None],
    tuned: bool = False,
    strip_pipe_connect: bool = True,
    check: bool = False,
) -> None:
    """Hand one passed client to the MTA through `pool`; returns at once.

    When the session is over its event is written, `sock` is closed and
    `ended()` is called, once, whatever happened. `tuned`: `sock` came from a
    listener that `tune_listener` tuned; `strip_pipe_connect`: take PIPECONNECT
    out of the MTA's first EHLO reply; `check`: a balancer's health check (`conn`
    the balancer's own connection, announced as such) ended without a
    `relay-end` (it is not a client).
    """

    def done(result: RelayResult) -> None:
        try:
            now = trio.current_time()
            if result.connect_error is not None:
                reply_and_close(sock, BACKEND_UNAVAILABLE)
                log.emit(
                    events.backend_error(conn, now - accepted_at, target.name, result.connect_error)
                )
                return
            if result.connected_at is None:  # stopped while connecting: come back later
                reply_and_close(sock, BACKEND_UNAVAILABLE)
            elif result.to_client == 0 and result.end is not RelayEnd.CLIENT_RESET and not check:
                # The MTA ended the session before its greeting (stopped with the
                # connection in its accept queue, at its process limit, silent for
                # --relay-timeout): the client waited for nothing, and is told so.
                reply_and_close(sock, BACKEND_UNAVAILABLE)
            if check:
                return
            started = now if result.connected_at is None else result.connected_at
            log.emit(
                events.relay_end(
                    conn,
                    now - accepted_at,
                    now - started,
                    result.from_client,
                    result.to_client,
                    result.end,
                )
            )
            if result.error is not None:
                log.emit(events.internal_error(conn, now - accepted_at, repr(result.error)))
        finally:
            sock.close()
            ended()

    try:
        if not tuned:
            try:
                _tune_for_relay(sock)
            except OSError:
                pass  # the client may have gone already; the relay will see it
        # A health check's `conn` is the balancer's own connection: the MTA is told
        # the balancer, as it would be without repeld, never "no client" (then it
        # takes the socket's peer, repeld's own address, which it may trust).
        header = proxyproto.header(
            proxy_protocol, conn.client, conn.client_port, conn.server, conn.server_port
        )
        pool.connect_and_relay(
            sock,
            target.addresses,
            header=header,
            connect_timeout=connect_timeout,
            idle_timeout=relay_timeout,
            done=done,
            strip_pipe_connect=strip_pipe_connect,
        )
    except (RelayPoolClosed, ValueError, OSError) as exc:  # never take the server down
        reply_and_close(sock, BACKEND_UNAVAILABLE)
        log.emit(events.internal_error(conn, trio.current_time() - accepted_at, repr(exc)))
        ended()


def pass_to_smtpd(
    sock: socket.socket,
    conn: ConnInfo,
    accepted_at: float,
    target: BackendTarget,
    timeout: float,
    log: EventLog,
    passer: PassPool | None,
    ended: Callable[[], None],
) -> None:
    """Give `sock` to the Postfix pass service `target`; returns at once.

    Once smtpd holds the client, repeld's copy is closed and nothing is
    written (the pass event said `handoff=pass`); a failure is a 421 to the
    client and a `backend-error` naming its cause. `ended()` is called once.
    """
    assert target.pass_path is not None

    def done(outcome: HandOffResult, detail: str) -> None:
        try:
            if outcome is HandOffResult.TAKEN:
                sock.close()
                return
            reply_and_close(sock, BACKEND_UNAVAILABLE)
            error = postfixpass.describe(outcome, detail)
            now = trio.current_time()
            log.emit(events.backend_error(conn, now - accepted_at, target.name, error))
        finally:
            ended()

    try:
        if passer is None:
            raise PassPoolClosed("no pass pool")
        attributes = postfixpass.pass_attributes(
            conn.client, conn.client_port, conn.server, conn.server_port
        )
        passer.hand_off(sock, target.pass_path, attributes, timeout, done)
    except (PassPoolClosed, ValueError, OSError) as exc:  # never take the server down
        reply_and_close(sock, BACKEND_UNAVAILABLE)
        log.emit(events.internal_error(conn, trio.current_time() - accepted_at, repr(exc)))
        ended()


def _refuse(sock: socket.socket, conn: ConnInfo, limit: Refuse, now: float) -> None:
    # A HandOff's refusal until the server gives it the admission's (counted).
    reply_and_close(sock, REFUSALS[limit])


class HandOff:
    """The hand-off phase: every passed client goes to its MTA through the relay
    pool, or to the --exec program, and is counted until its session is over.

    `start` runs the relay pool in the relays nursery, which outlives the front
    (accept loops, pen) during a drain; `wait_idle` returns once every session
    handed on is done.
    """

    def __init__(self, settings: Settings, log: EventLog) -> None:
        self.settings = settings
        self.log = log
        #: The MTA of clients whose listener names none (None with --exec).
        self.backend: BackendTarget | None = None
        #: Every listener hands out sockets already tuned for relaying.
        self.listeners_tuned = True
        #: Clients handed on and not done yet (relayed by the pool, or --exec).
        self.active = 0
        #: --exec programs running (at most --max-exec).
        self.execs = 0
        #: How a client past --max-exec is turned away: the server sets
        #: Admission.refuse (its 421, counted, one overload event a second).
        self.refuse: Callable[[socket.socket, ConnInfo, Refuse, float], None] = _refuse
        #: Set when `active` falls to 0, for whoever waits in `wait_idle`.
        self._idle: trio.Event | None = None
        #: The relays nursery: the pool's task, and a task per --exec client.
        self._nursery: trio.Nursery | None = None
        #: Every relayed session, from the backend connect to its end, in one task.
        self.pool: RelayPool | None = None
        #: Every hand-off to a Postfix pass service waiting for smtpd, in one task.
        self.passer: PassPool | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Run the relay and pass pools in `nursery` (cancelled with it, at the end of
        the drain)."""
        self._nursery = nursery
        self.pool = RelayPool(self._pool_error)
        nursery.start_soon(self.pool.run)
        self.passer = PassPool(self._pool_error)
        nursery.start_soon(self.passer.run)

    def kind(self, backend: BackendTarget | None = None) -> HandOffHow | None:
        """How a client for `backend` (or --backend) is handed on, for the pass
        event: `pass` for a Postfix pass service, None when relayed or run."""
        target = backend or self.backend
        return HandOffHow.PASS if target is not None and target.pass_path is not None else None

    def pass_outcomes(self) -> dict[str, int]:
        """Hand-offs to pass services by how they ended (repeld_handoffs_total)."""
        return dict(self.passer.outcomes) if self.passer is not None else {}

    def turned_away(
        self, sock: socket.socket, conn: ConnInfo, backend: BackendTarget | None = None
    ) -> bool:
        """Turn a passed client away if its hand-off is at a limit: True if it was.

        --max-exec: a program per client, each as long as its session; one
        address the cache or --trusted lets through at once could start them by
        the hundred (tcpserver's -c, 40, bounds them the same way). Asked before
        the client's `pass` event is written, so that a client told 421 is not
        also written down as passed.
        """
        if (backend or self.backend) is None and self.execs >= self.settings.max_exec:
            self.refuse(sock, conn, Refuse.MAX_EXEC, trio.current_time())
            return True
        return False

    def client(
        self,
        sock: socket.socket,
        conn: ConnInfo,
        accepted_at: float,
        backend: BackendTarget | None = None,
        *,
        check: bool = False,
    ) -> None:
        """Hand one passed client on (`check`: a balancer's health check, never
        turned away; any other has been asked `turned_away` first); returns at once."""
        target = backend or self.backend
        s = self.settings
        self.active += 1
        if target is None:
            assert s.exec is not None  # settings guarantee one or the other
            assert self._nursery is not None
            self.execs += 1
            self._nursery.start_soon(self._exec, sock, conn, accepted_at, s.exec, check)
            return
        if target.pass_path is not None:
            # A Postfix pass service: smtpd takes the socket (a balancer's health
            # check too, which then hears smtpd's greeting, as it asks).
            pass_to_smtpd(
                sock,
                conn,
                accepted_at,
                target,
                s.connect_timeout,
                self.log,
                self.passer,
                self._ended,
            )
            return
        assert self.pool is not None  # started with the relays nursery
        handoff(
            sock,
            conn,
            accepted_at,
            target,
            s.proxy_protocol,
            s.connect_timeout,
            s.relay_timeout,
            self.log,
            self.pool,
            self._ended,
            self.listeners_tuned,
            not s.keep_pipe_connect,
            check,
        )

    def _ended(self) -> None:
        self.active -= 1
        if not self.active and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no client is being relayed or served by --exec (at once if none is)."""
        while self.active:
            if self._idle is None or self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()

    async def _exec(
        self,
        sock: socket.socket,
        conn: ConnInfo,
        accepted_at: float,
        program: tuple[str, ...],
        check: bool = False,
    ) -> None:
        try:
            await handoff_exec(sock, conn, accepted_at, program, self.log, check)
        finally:
            self.execs -= 1
            self._ended()

    def _pool_error(self, message: str) -> None:
        self.log.emit(events.internal_error(None, 0.0, message))

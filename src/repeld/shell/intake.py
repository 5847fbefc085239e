"""The intake phase: who is the client? The socket's peer, or a balancer's PROXY header.

Each accepted socket comes here first (shell/accept.py's callback). The client
is the socket's peer, taken from accept() and never from getpeername() (after
an RST it raises ENOTCONN), and the server address is the listener's bound one,
or getsockname() on a wildcard listener. A client reset before its socket could
be read still gets its verdict, a `hangup`, as the core's table says.

A peer in `--proxy-from` is a trusted balancer: its connection must begin with
a PROXY v1 or v2 header (core/proxyinput.py parses it), and the client is then
the header's source, the server its destination, for every purpose after this
phase (trusted networks, limits, cache, DNS lists, events, the header repeld
sends on). Such sockets wait here, in a small holding of their own, until the
header is complete or `--proxy-timeout` has passed: one task over a private
epoll/kqueue set (shell/poller.py), as the pen holds silent clients, so a
header-pending connection costs a socket and a small record, no task.

Reading the header never consumes a byte of the client's: the pending bytes are
peeked; while the header is incomplete every byte peeked belongs to it and is
taken into the record's buffer (so the level-triggered set does not report
them again), and once it is complete exactly the rest of the header is taken.
What follows it stays in the socket, where the pen's peek sees it: bytes after
the header and before the greeting are early talk, judged as on a direct
connection, and the delay counts from the moment the header was complete.

What is not a client is settled here and goes no further:

- a balancer's own connection (v2 LOCAL, v1 `PROXY UNKNOWN`): its health check,
  handed at once to the backend (so HAProxy's `check-send-proxy` + `option
  smtpchk` sees the MTA's 220) with a header that names the balancer as the
  client (a LOCAL one would let the MTA take repeld's own address, which its
  mynetworks may trust), counted in `checks`, with no hold, verdict, cache
  entry or event (a balancer sends such a header for a client it cannot name
  too, a unix socket listener's: the manual says to keep those away);
- a balancer's connection closed or reset before sending a byte: a plain TCP
  check, counted in `checks` too;
- anything else (no header in time, a malformed or unsupported one, closed in
  the middle of it): reset, with a `proxy-error` event naming the balancer and
  the reason, never an early talker and never a ban.

Once the client is known, `Admission.client` (shell/admit.py) decides what
happens to it.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import socket
from collections.abc import Callable

import trio

from repeld.config.settings import Settings
from repeld.core import events
from repeld.core.addresses import normalize_address
from repeld.core.events import ConnInfo
from repeld.core.hold import HangUp, Hold
from repeld.core.names import ProxyOutcome
from repeld.core.policy import Refuse, TrustedNetworks
from repeld.core.proxyinput import MAX_HEADER, Local, NeedMore, Proxied, ProxyError, parse
from repeld.shell.accept import Listener
from repeld.shell.admit import Admission
from repeld.shell.eventlog import EventLog
from repeld.shell.poller import IN, Poller, watch
from repeld.shell.replies import abort

__all__ = ["Intake"]

_PEEK_FLAGS = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
_BATCH = 512
#: Distinct balancer and destination addresses whose strings are shared.
_SHARED_STRINGS = 1024


class _Pending:
    """A balancer's connection whose PROXY header is not complete yet."""

    __slots__ = ("buffer", "deadline", "listener", "peer", "since", "sock")

    def __init__(
        self, sock: socket.socket, peer: ConnInfo, listener: Listener, since: float, deadline: float
    ) -> None:
        self.sock = sock
        self.peer = peer
        self.listener = listener
        self.since = since
        self.deadline = deadline
        #: The header's bytes taken so far (every one of them the header's).
        self.buffer = b""


class Intake:
    """Settles who each accepted client is, then hands it to the admission step."""

    def __init__(
        self,
        settings: Settings,
        admission: Admission,
        log: EventLog,
        check: Callable[[socket.socket, ConnInfo, float, Listener], None],
    ) -> None:
        self.admission = admission
        self.log = log
        #: Hands a balancer's health check to the backend (the server's hand-off).
        self._check = check
        self._poller = Poller()
        self._pending: dict[int, _Pending] = {}
        # The deadlines of incomplete headers, soonest first. Few sockets ever wait
        # (a header usually comes with the first segment), so a heap serves: no
        # FIFO per --proxy-timeout value as the pen keeps for every held client.
        self._deadlines: list[tuple[float, int, _Pending]] = []
        self._seq = itertools.count()
        self._wake: trio.CancelScope | None = None
        self._strings: dict[str, str] = {}
        #: trio.current_time, or once `run` has begun the run's clock itself:
        #: one call per client where trio.current_time makes three.
        self._now: Callable[[], float] = trio.current_time
        #: How header-pending connections ended, by outcome.
        self.outcomes: collections.Counter[ProxyOutcome] = collections.Counter()
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        """Take (new) --proxy-from and --proxy-timeout for the next connections."""
        self.settings = settings
        #: --proxy-from; a balancer is a handful of addresses that connect again
        #: and again, and TrustedNetworks keeps each address's answer.
        self.balancers = TrustedNetworks(settings.proxy_from)
        #: Whether there are any: without, no client is asked about (a call saved
        #: per client: about half a µs in place, docs/perf-log/2026-12-07-day.md).
        self._balancing = bool(settings.proxy_from)

    def __len__(self) -> int:
        """Balancers' connections whose header is still to come."""
        return len(self._pending)

    # -- accepting -----------------------------------------------------------------

    def accepted(self, sock: socket.socket, addr: tuple[object, ...], listener: Listener) -> None:
        """One accepted client (accept_loop's callback); never raises for a client's sake."""
        now = self._now()
        try:  # accept_loop hands out non-blocking sockets
            if listener.local is not None:
                server, server_port = listener.local
            else:
                server, server_port = sock.getsockname()[:2]
                server = normalize_address(server)
        except OSError:
            # Reset between accept() and here: nothing to serve, nobody to greet,
            # but still one verdict, counted like any other; a balancer's is no
            # client's, and only counted.
            if normalize_address(str(addr[0])) in self.balancers:
                sock.close()
                self.outcomes[ProxyOutcome.RESET] += 1
                return
            self._reset_at_accept(sock, addr, listener, now)
            return
        peer = str(addr[0])
        if ":" in peer:  # IPv6 (or IPv4-mapped) only: an IPv4 address is already as rules see it
            peer = normalize_address(peer)
        conn = ConnInfo(peer, int(addr[1]), server, int(server_port))  # type: ignore[call-overload]
        if self._balancing and peer in self.balancers:
            self._await_header(sock, conn, listener, now)
            return
        self.admission.client(sock, conn, listener.backend, listener.spec.nodelay, now)

    def _await_header(
        self, sock: socket.socket, peer: ConnInfo, listener: Listener, now: float
    ) -> None:
        admission = self.admission
        if len(admission.pen) + len(self) >= admission.max_held:
            # --max-held counts every connection, header-pending ones too.
            admission.refuse(sock, peer, Refuse.MAX_HELD, now)
            return
        pending = _Pending(sock, peer, listener, now, now + self.settings.proxy_timeout)
        # Most headers arrive with the connection's first segment: read it before
        # anything is registered, and a complete one never costs the set or a queue.
        self._read(pending, now)

    def _register(self, pending: _Pending, now: float) -> None:
        """Wait for the rest of `pending`'s header: into the set and a deadline queue."""
        fd = pending.sock.fileno()
        try:
            self._poller.update(fd, 0, IN)
        except OSError:  # ENOSPC (fs.epoll.max_user_watches), ENOMEM: as at --max-held
            self.admission.refuse(pending.sock, pending.peer, Refuse.KERNEL, now)
            return
        self._pending[fd] = pending
        heapq.heappush(self._deadlines, (pending.deadline, next(self._seq), pending))
        if self._wake is not None and pending.deadline < self._wake.deadline:
            self._wake.deadline = pending.deadline

    # -- the holding of header-pending connections ----------------------------------

    async def run(self) -> None:
        """Serve header-pending connections until cancelled (then `close()`)."""
        self._now = trio.lowlevel.current_clock().current_time
        await watch(self._poller, self._expire, self._serve, self._set_wake)

    def _set_wake(self, scope: trio.CancelScope | None) -> None:
        self._wake = scope

    def _serve(self, now: float) -> int:
        ready = self._poller.ready(_BATCH)
        for fd, _ in ready:
            pending = self._pending.get(fd)
            if pending is not None:
                self._read(pending, now)
        return len(ready)

    def _expire(self, now: float) -> float:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            pending = heapq.heappop(deadlines)[2]
            if self._live(pending):
                self._read(pending, now, due=True)
        return deadlines[0][0] if deadlines else math.inf

    def _live(self, pending: _Pending) -> bool:
        return self._pending.get(pending.sock.fileno()) is pending

    def _release(self, pending: _Pending) -> None:
        fd = pending.sock.fileno()
        if self._pending.get(fd) is pending:
            del self._pending[fd]
            self._poller.update(fd, IN, 0)
        # Its deadline entry is skipped when due: every entry leaves the heap
        # within --proxy-timeout.

    def _read(self, pending: _Pending, now: float, *, due: bool = False) -> None:
        sock = pending.sock
        reset = False
        try:
            data = sock.recv(MAX_HEADER - len(pending.buffer), _PEEK_FLAGS)
        except BlockingIOError:
            data = None
        except OSError:
            data, reset = b"", True
        if data == b"":  # end of file, or reset
            if not pending.buffer:  # before its first byte: a plain TCP health check
                self._release(pending)
                sock.close()
                self.outcomes[ProxyOutcome.CHECK] += 1
            elif reset:
                self._fail(pending, now, ProxyOutcome.RESET, "reset by the balancer")
            else:
                self._fail(pending, now, ProxyOutcome.TRUNCATED, "closed within the header")
            return
        result = parse(pending.buffer + data) if data else NeedMore(len(pending.buffer) + 1)
        match result:
            case NeedMore():
                if data:  # every byte peeked is the header's: take them
                    try:
                        pending.buffer += sock.recv(len(data))
                    except OSError:
                        self._fail(pending, now, ProxyOutcome.RESET, "reset by the balancer")
                        return
                if due or now >= pending.deadline:
                    timeout = pending.deadline - pending.since
                    self._fail(
                        pending,
                        now,
                        ProxyOutcome.TIMEOUT,
                        f"no complete header within {timeout:g}s"
                        f" ({len(pending.buffer)} bytes of it)",
                    )
                elif not self._live(pending):
                    self._register(pending, now)
            case ProxyError(reason=reason, detail=detail):
                self._fail(pending, now, ProxyOutcome.ERROR, detail, str(reason))
            case Proxied() | Local():
                self._complete(pending, result, now)

    def _complete(self, pending: _Pending, header: Proxied | Local, now: float) -> None:
        sock = pending.sock
        self._release(pending)
        rest = header.length - len(pending.buffer)
        try:  # exactly the header: what follows is the client's
            taken = sock.recv(rest) if rest > 0 else b""
        except OSError:
            taken = b""
        if len(taken) != rest:
            # The peek showed these bytes; only a reset takes them away.
            sock.close()
            self._event(pending, now, "reset", "reset by the balancer")
            self.outcomes[ProxyOutcome.RESET] += 1
            return
        peer, listener = pending.peer, pending.listener
        if isinstance(header, Local):
            # (Whatever it sends goes to the MTA: HAProxy before 2.2 sends its
            # smtpchk HELO right behind the header, before any greeting.)
            self.outcomes[ProxyOutcome.CHECK] += 1
            self._check(sock, peer, now, listener)
            return
        self.outcomes[ProxyOutcome.CLIENT] += 1
        # One string each for the few balancers and the few addresses they listen
        # on, shared by every held client, as a direct client shares its listener's.
        conn = ConnInfo(
            header.source,
            header.source_port,
            self._shared(header.destination),
            header.destination_port,
            via=self._shared(peer.client),
        )
        self.admission.client(sock, conn, listener.backend, listener.spec.nodelay, now)

    def _shared(self, text: str) -> str:
        # A bounded table: a balancer has a few addresses, not thousands.
        found = self._strings.get(text)
        if found is None:
            if len(self._strings) >= _SHARED_STRINGS:
                self._strings.clear()
            found = self._strings[text] = text
        return found

    def _fail(
        self,
        pending: _Pending,
        now: float,
        outcome: ProxyOutcome,
        detail: str,
        reason: str | None = None,
    ) -> None:
        self._release(pending)
        abort(pending.sock)
        self.outcomes[outcome] += 1
        self._event(pending, now, reason or str(outcome), detail)

    def _event(self, pending: _Pending, now: float, reason: str, detail: str) -> None:
        peer = pending.peer
        balancer = ConnInfo(
            peer.client, peer.client_port, peer.server, peer.server_port, peer.client
        )
        self.log.emit(events.proxy_error(balancer, now - pending.since, reason, detail))

    def evict_all(self) -> list[socket.socket]:
        """Stop waiting for every pending header; the sockets, for the caller (shutdown)."""
        socks = [pending.sock for pending in self._pending.values()]
        for pending in list(self._pending.values()):
            self._release(pending)
        self._deadlines.clear()
        return socks

    def close(self) -> None:
        for sock in self.evict_all():
            sock.close()
        self._poller.close()

    # -- a client gone at once --------------------------------------------------------

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
        verdict = Hold(now, self.admission.settings.delay).reset(now)  # the table's own answer
        assert isinstance(verdict, HangUp)
        self.log.emit(events.hangup(conn, verdict))

"""One task asks the DNS lists about every held client, all lists at once.

At accept the server queues each held client (`ask`); the task started by
`run` looks every configured list domain up under the client's query name
(core/dnsbl.py `query_name`). An answer (A records, NXDOMAIN or no A record:
not listed) is kept for its DNS TTL in a bounded `AnswerCache`, and a question
already in flight for another client from the same address is shared: one
query per list per address at most, none at all on a cache hit. Each answer
goes to `on_answer` at once, with the score so far, the lists still to answer
and what their weights could still add (core/dnsbl.py `DnsScore`), as long as
`waiting(item)` says it counts: the hold acts as soon as the answers settle the
outcome, and judges by those received at the end of its delay
(core/hold.py). A list that has not answered within --dns-timeout, or
answered with an error, counts as not listing; its name is in the score's
`missing`, and the events say which lists did not answer.

A score made only of answers still in their TTL is kept too (`ScoreCache`),
until the first of them expires: the server asks `known(address)` at accept,
and a client seen again is judged there and then, with one dictionary lookup
(docs/perf-log/2026-12-03-dnsbl-fast.md).

Many queries in flight over a few sockets, as a stub resolver does: `SOCKETS`
UDP sockets per server, each connected to it (the kernel drops datagrams from
anywhere else), on a source port of the kernel's choosing and replaced after
`ROTATE_AFTER` queries, carry up to `MAX_QUERIES` queries at once (each list
its share, at least `MIN_QUERIES`: a silent list cannot take the others'
turn), so a flood of new addresses costs no descriptor per client and the
lists keep up with it. Each query has a random id (`secrets`), and an answer
counts only if it comes from the server asked, on the socket it was asked on,
with that id, and for that question (core/dnswire.py `read`); anything else is
dropped and the query waits on. A query unanswered after half of
--dns-timeout is asked again, of the next server when there are several
(RFC 1536; the first answer to either counts). Past its share a list's
queries wait their turn, newest first: a client that has just come has its
whole delay ahead, one that waited long is about to be judged without the
answer anyway. A waiting query whose clients were all decided, or that has
waited --dns-timeout, is never sent (`skipped`); at most `MAX_BACKLOG` wait
per list, the oldest given up first.

A huge answer never stalls the daemon: queries ask with a small EDNS buffer,
a truncated answer is no answer (never fetched again over TCP), and one
longer than core/dnswire.py's MAX_SIZE or with too many records is refused by
its header, before any record is read; the rest is read in a few
microseconds. The receiving tasks yield to the event loop every
`READ_BATCH` datagrams, so that a burst of answers cannot hold up the pen.

`ListWatch` (core/dnsbl.py) notices a list that suddenly lists nearly every
client; `on_alarm` says so (a `dns-list-alarm` event).

dnspython is used only to read /etc/resolv.conf (`make_resolver`): its
resolver holds a socket per query and follows truncation to TCP, and its
message parser costs 100 to 180 µs an answer; core/dnswire.py builds and
reads the few messages a list lookup needs.
"""

from __future__ import annotations

import errno
import heapq
import ipaddress
import itertools
import math
import secrets
import socket
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import dns.asyncresolver
import dns.resolver
import trio

from repeld.config.values import Resolver
from repeld.core.dnsbl import (
    AnswerCache,
    DnsList,
    DnsScore,
    ListWatch,
    ScoreCache,
    domains,
    refuses,
    reversed_address,
    score,
)
from repeld.core.dnswire import END, MAX_SIZE, Reply, checked, labels, query, read

__all__ = [
    "COMPACT_AFTER",
    "MAX_BACKLOG",
    "MAX_QUERIES",
    "MIN_QUERIES",
    "READ_BATCH",
    "ROTATE_AFTER",
    "SOCKETS",
    "TICK",
    "DnsLookups",
    "make_resolver",
]

T = TypeVar("T")

#: Queries in flight at most, over all the lists, all sockets together. At 2,000
#: new addresses a second and 50 ms answers two lists have some 200 in flight.
MAX_QUERIES = 1024
#: ... and at least this many for each list however many lists there are.
MIN_QUERIES = 64
#: The UDP sockets the queries to one server share (descriptors: service/capacity.py
#: FD_RESERVE; resolv.conf names three servers at most).
SOCKETS = 4
#: Queries a socket sends before it is replaced by one on a new source port.
ROTATE_AFTER = 4096
#: Queries waiting for their turn, per list; past it the oldest is given up.
MAX_BACKLOG = 8192
#: Datagrams read in a row before the receiving task yields to the event loop.
READ_BATCH = 32
#: The receive buffer asked for each socket, in bytes.
RECEIVE_BUFFER = 1 << 20
#: Retries and timeouts are looked at on this grid, in seconds (one wake-up of the
#: task for all those due within it).
TICK = 0.05
#: Dead timers tolerated in the heap before it may be rebuilt without them.
COMPACT_AFTER = 1024
#: How many times a query is sent at most (the first time included).
TRIES = 2


class NoResolverError(Exception):
    """No plain DNS server to ask the lists through: repeld does not start."""


def make_resolver(server: Resolver | None) -> dns.asyncresolver.Resolver:
    """Where the lists are asked: --resolver, else the servers of /etc/resolv.conf.

    Called before any chroot or privilege drop: it reads /etc/resolv.conf. A
    configuration that names no plain DNS server (none at all, or only DNS over
    HTTPS) is NoResolverError: every lookup would fail unseen.
    """
    if server is None:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            resolver = None
        if resolver is None or not _servers(resolver):
            raise NoResolverError(
                "the DNS lists have no server to ask: /etc/resolv.conf names no"
                " nameserver; name one with --resolver"
            )
        return resolver
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    return resolver


def _servers(resolver: dns.asyncresolver.Resolver) -> list[tuple[str, int]]:
    # The plain-DNS servers (address, port) of the resolver's configuration.
    found: list[tuple[str, int]] = []
    for ns in resolver.nameservers:
        address = ns if isinstance(ns, str) else getattr(ns, "address", "")
        port = resolver.port if isinstance(ns, str) else getattr(ns, "port", resolver.port)
        try:
            found.append((str(ipaddress.ip_address(address)), int(port)))
        except ValueError:
            continue  # DNS over HTTPS or TLS: not for the lists
    return found


class _Socket:
    """One UDP socket connected to one server, and the queries asked on it, by id.

    Connected: the kernel takes only that server's datagrams (an answer from
    anywhere else never reaches us), and a send skips the route lookup and the
    address parsing of a sendto (a third of the cost of a query on loopback).
    """

    __slots__ = ("pending", "retired", "sent", "server", "sock")

    def __init__(self, server: tuple[str, int]) -> None:
        self.server = server
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.setblocking(False)
            # Room for a burst of answers (the kernel caps it at net.core.rmem_max).
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            # The kernel picks a random ephemeral source port (RFC 6056).
            self.sock.connect(server)
        except OSError:
            self.sock.close()
            raise
        self.pending: dict[int, _Query[Any]] = {}
        self.sent = 0
        self.retired = False


class _Query(Generic[T]):
    """One question to one list, the clients waiting for it, where it was asked."""

    __slots__ = (
        "asked",
        "domain",
        "done",
        "ids",
        "name",
        "queued",
        "sent_at",
        "slot",
        "timers",
        "tries",
        "waiters",
    )

    def __init__(self, domain: str, name: str, asked: bytes, now: float) -> None:
        self.domain = domain
        self.name = name
        self.asked = asked
        self.queued = now
        self.sent_at = now
        self.waiters: list[_Client[T]] = []
        #: (socket, id) of each time it was sent
        self.ids: list[tuple[_Socket, int]] = []
        self.tries = 0
        self.done = False
        #: It holds one of its list's slots.
        self.slot = False
        #: Its entries in the timers' heap (they stay there until due once it is done).
        self.timers = 0


class _Client(Generic[T]):
    """One held client's answers so far, the lists that gave up, how many are
    still to answer, and when the first answer expires (-inf once one is no
    answer: never kept)."""

    __slots__ = ("address", "answers", "expires", "item", "left", "missing")

    def __init__(self, address: str, item: T, left: int) -> None:
        self.address = address
        self.item = item
        self.left = left
        self.answers: dict[str, tuple[str, ...]] = {}
        self.missing: list[str] = []
        self.expires = math.inf


class DnsLookups(Generic[T]):
    """Queue `ask(address, item)`; `run()` answers each via `on_answer(item, score)`."""

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver,
        lists: tuple[DnsList, ...],
        on_answer: Callable[[T, DnsScore], None],
        waiting: Callable[[T], bool],
        timeout: float,
        cache: AnswerCache | None = None,
        scores: ScoreCache | None = None,
        on_alarm: Callable[[str, float, str], None] | None = None,
    ) -> None:
        self.servers = _servers(resolver)
        self.lists = lists
        self.domains = domains(lists)
        self._entries = {d: tuple(e for e in lists if e.domain == d) for d in self.domains}
        # Each list's part of its questions: its domain's labels and what ends one.
        self._tails = {d: labels(d) + END for d in self.domains}
        self._on_answer = on_answer
        self._waiting = waiting
        self._on_alarm = on_alarm
        self.timeout = timeout
        self.cache = cache if cache is not None else AnswerCache()
        self.scores = scores if scores is not None else ScoreCache()
        self.watch = ListWatch()
        self.refusals = ListWatch()  # a list that refuses this resolver lists nobody
        # Clients judged by `known` (each one a cached answer from every list).
        self._known = 0
        self._queue: list[tuple[str, T]] = []
        self._due = trio.Event()
        self._wake_at = math.inf
        # (domain, query name) -> its query, in flight or waiting its turn
        self._inflight: dict[tuple[str, str], _Query[T]] = {}
        #: Queries each list may have in flight, and has.
        self.slots = max(MIN_QUERIES, MAX_QUERIES // max(1, len(self.domains)))
        self._running: dict[str, int] = dict.fromkeys(self.domains, 0)
        #: Per list, the queries waiting for a slot, oldest first.
        self._backlog: dict[str, deque[_Query[T]]] = {d: deque() for d in self.domains}
        #: While `_next` runs: the lists whose slot a failed send freed meanwhile.
        self._freed: list[str] | None = None
        # (when, order, query, kind): retries and timeouts, soonest first
        self._timers: list[tuple[float, int, _Query[T], int]] = []
        self._order = itertools.count()
        # Timers of queries already over, still in the heap (see `_over`).
        self._dead = 0
        self._sockets: list[_Socket] = []
        self._turn = 0
        self._nursery: trio.Nursery | None = None
        #: Answers by (domain, result) since start, result one of core.dnsbl RESULTS.
        self.counts: Counter[tuple[str, str]] = Counter()
        #: Clients each list listed (an answer passing an entry's filter, given to
        #: a client still waiting, or a known score).
        self.listed: Counter[str] = Counter()
        #: Clients given every list's answer while they waited (`known` ones
        #: included), and clients decided before that.
        self.complete = 0
        self.incomplete = 0
        #: Datagrams dropped: late, with an unknown id, another question, or not
        #: an answer (from elsewhere, the kernel drops them: the sockets are connected).
        self.stray = 0

    def __len__(self) -> int:
        return len(self._queue)

    def known(self, address: str, now: float) -> DnsScore | None:
        """The score of `address` if every list's answer for it is still cached.

        Counted as it would be through `ask` (a cached answer from each list);
        None: `ask`.
        """
        result = self.scores.get(address, now)
        if result is not None:
            self._known += 1
            self.complete += 1
            if result.lists:
                self.listed.update(result.lists)
        return result

    def ask(self, address: str, item: T) -> None:
        """Look `address` up on every list for `item`; never blocks."""
        self._queue.append((address, item))
        self._due.set()

    def _by_result(self) -> Counter[str]:
        by_result: Counter[str] = Counter()
        for (_, result), n in self.counts.items():
            by_result[result] += n
        by_result["cached"] += self._known * len(self.domains)
        return by_result

    def statistics(self) -> dict[str, int]:
        """Totals over the lists: queries sent, their timeouts and errors, answers
        that needed no query (the cache, or another client's query in flight),
        queries skipped, answers that came after their clients were decided,
        datagrams that answered no query of ours (stray), clients listed (once
        per list that listed them), clients given every list's answer while they
        waited, and clients decided before that."""
        by_result = self._by_result()
        sent = sum(by_result[r] for r in ("listed", "refused", "clear", "timeout", "error", "late"))
        return {
            "dns_lookups": sent,
            "dns_timeouts": by_result["timeout"],
            "dns_errors": by_result["error"],
            "dns_hits": sum(self.listed.values()),
            "dns_cached": by_result["cached"],
            "dns_skipped": by_result["skipped"],
            "dns_late": by_result["late"],
            "dns_stray": self.stray,
            "dns_complete": self.complete,
            "dns_incomplete": self.incomplete,
        }

    def results(self) -> dict[str, int]:
        """Answers by result, over the lists (for --metrics)."""
        return {result: n for result, n in self._by_result().items() if n}

    def hits(self) -> dict[str, int]:
        """Clients listed, by list domain (for --metrics)."""
        return dict(self.listed)

    # -- the task ------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the queue until cancelled (the queries in flight go with it)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                while True:
                    if not self._queue:
                        self._due = trio.Event()
                        self._wake_at = self._next_timer()
                        with trio.move_on_at(self._wake_at):
                            await self._due.wait()
                    batch, self._queue = self._queue, []
                    now = trio.current_time()
                    self._tick(now)
                    for address, item in batch:
                        if self._waiting(item):
                            self._start(address, item, now)
        finally:
            for s in self._sockets:
                s.sock.close()
            self._sockets = []

    def _over(self, q: _Query[T]) -> None:
        # A query is over; its timer stays in the heap until due, unless the dead
        # ones come to outnumber the live: then the heap is rebuilt without them,
        # so that its size follows the queries in flight, not the rate times the
        # timeout (a flood of new addresses answered at once).
        q.done = True
        self._dead += q.timers
        if self._dead > COMPACT_AFTER and 2 * self._dead > len(self._timers):
            self._timers = [t for t in self._timers if not t[2].done]
            heapq.heapify(self._timers)
            self._dead = 0

    def _next_timer(self) -> float:
        # The first retry or timeout due, rounded up to the next TICK: under a flood
        # the task wakes some 20 times a second for them, not once per query.
        first = self._timers[0][0] if self._timers else math.inf
        for backlog in self._backlog.values():
            if backlog:
                first = min(first, backlog[0].queued + self.timeout)
        return math.ceil(first / TICK) * TICK if first < math.inf else first

    def _timer(self, when: float, q: _Query[T], kind: int) -> None:
        heapq.heappush(self._timers, (when, next(self._order), q, kind))
        q.timers += 1
        if when + TICK < self._wake_at:  # well before the task planned to look: wake it
            self._wake_at = when
            self._due.set()

    def _tick(self, now: float) -> None:
        # Retries and timeouts that are due, and queries that waited too long.
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, q, kind = heapq.heappop(timers)
            q.timers -= 1
            if q.done:
                self._dead = max(0, self._dead - 1)
                continue
            if kind == _RETRY:
                if q.tries >= TRIES:  # sent again early (an error answer): its EXPIRE is queued
                    continue
                if self._counts(q):
                    self._send(q, now)
                else:  # nobody waits for it now: no more tries, but its time stands
                    self._timer(q.sent_at + self.timeout, q, _EXPIRE)
            elif kind == _EXPIRE:
                self._finish(q, None, now, "timeout")
        for backlog in self._backlog.values():
            while backlog and now >= backlog[0].queued + self.timeout:
                self._skip(backlog.popleft(), now)

    def _counts(self, q: _Query[T]) -> bool:
        return any(self._waiting(c.item) for c in q.waiters)

    def _start(self, address: str, item: T, now: float) -> None:
        try:
            prefix = reversed_address(address)
        except ValueError:  # no IP address (a unix socket peer): no list can say anything
            self._on_answer(item, DnsScore())
            return
        client: _Client[T] = _Client(address, item, len(self.domains))
        head = b""  # the address's labels, once for every list
        for domain in self.domains:
            name = f"{prefix}.{domain}"
            cached = self.cache.entry((domain, name), now)
            if cached is not None:
                self.counts[domain, "cached"] += 1
                self._answered(client, domain, cached[1], cached[0], now)
                if client.left and not self._waiting(item):  # decided by it (a block):
                    self.incomplete += 1  # the other lists need not be asked
                    return
                continue
            shared = self._inflight.get((domain, name))
            if shared is not None:  # asked already for another client: share it
                self.counts[domain, "cached"] += 1  # no query of its own, as from the cache
                shared.waiters.append(client)
                continue
            try:
                head = head or labels(prefix)
                asked = checked(head + self._tails[domain])
            except ValueError:  # a name DNS cannot carry: the list cannot answer
                self.counts[domain, "error"] += 1
                self._answered(client, domain, None, -math.inf, now)
                continue
            q: _Query[T] = _Query(domain, name, asked, now)
            q.waiters.append(client)
            self._inflight[domain, name] = q
            if self._running[domain] < self.slots:
                self._launch(q, now)
            else:  # the list is busy: wait for a query of its own to end
                backlog = self._backlog[domain]
                backlog.append(q)
                if len(backlog) > MAX_BACKLOG:
                    self._skip(backlog.popleft(), now)
                if len(backlog) == 1:
                    self._timer(now + self.timeout, q, _NOTHING)  # wake to expire it

    # -- sending and receiving -------------------------------------------------------

    def _socket(self, server: tuple[str, int]) -> _Socket:
        # The next socket to that server in turn, opened (or replaced) as needed.
        # More sockets and new source ports are hardening, never a reason to
        # fail a query: out of descriptors, the sockets already open serve on.
        usable = [s for s in self._sockets if s.server == server and not s.retired]
        if len(usable) < SOCKETS:
            fresh = self._open(server, needed=not usable)
            if fresh is not None:
                return fresh
        self._turn += 1
        chosen = usable[self._turn % len(usable)]
        if chosen.sent >= ROTATE_AFTER:  # a new source port; this one drains and goes
            fresh = self._open(server, needed=False)
            if fresh is not None:
                chosen.retired = True
                self._close_if_idle(chosen)
                return fresh
        return chosen

    def _open(self, server: tuple[str, int], *, needed: bool) -> _Socket | None:
        # A new socket to `server`; None if the system refuses one and another is
        # open (`needed` False), the error if none is.
        try:
            fresh = _Socket(server)
        except OSError:
            if needed:
                raise
            return None
        self._sockets.append(fresh)
        assert self._nursery is not None
        self._nursery.start_soon(self._receive, fresh)
        return fresh

    def _close_if_idle(self, s: _Socket) -> None:
        if s.retired and not s.pending and s in self._sockets:
            self._sockets.remove(s)
            trio.lowlevel.notify_closing(s.sock)
            s.sock.close()

    def _launch(self, q: _Query[T], now: float) -> None:
        # Take one of the list's slots and send the query.
        self._running[q.domain] += 1
        q.slot = True
        self._send(q, now)

    def _send(self, q: _Query[T], now: float) -> None:
        if not self.servers:
            self._finish(q, None, now, "error")
            return
        server = self.servers[q.tries % len(self.servers)]
        try:
            s = self._socket(server)
            qid = secrets.randbelow(65536)
            while qid in s.pending:
                qid = secrets.randbelow(65536)
            s.sock.send(query(qid, q.asked))
        except OSError as exc:  # no buffer, no route, no descriptor, or refused:
            # a try that gets no answer. (ECONNREFUSED is a port unreachable that
            # came back for an earlier query on this socket.) The next try goes
            # at once, to the next server if there are several.
            if q.tries == 0:
                q.sent_at = now
            q.tries += 1
            if q.tries < TRIES:
                self._send(q, now)
            elif q.ids:  # an earlier try may still be answered
                self._timer(q.sent_at + self.timeout, q, _EXPIRE)
            else:
                kind = "timeout" if exc.errno in (errno.EAGAIN, errno.ENOBUFS) else "error"
                self._finish(q, None, now, kind)
            return
        s.pending[qid] = q
        s.sent += 1
        q.ids.append((s, qid))
        if q.tries == 0:
            q.sent_at = now
        q.tries += 1
        # One timer at a time: a finished query stays in the heap until it is due.
        if q.tries < TRIES:
            self._timer(q.sent_at + self.timeout / TRIES * q.tries, q, _RETRY)
        else:
            self._timer(q.sent_at + self.timeout, q, _EXPIRE)

    async def _receive(self, s: _Socket) -> None:
        # Read the socket's answers until it is closed; yield every READ_BATCH.
        sock = s.sock
        while sock.fileno() >= 0:
            try:
                await trio.lowlevel.wait_readable(sock)
            except (trio.ClosedResourceError, OSError, ValueError):
                return
            for _ in range(READ_BATCH):
                try:
                    # One byte more than MAX_SIZE: a longer datagram is cut by the
                    # kernel, and read() refuses it by its length.
                    data = sock.recv(MAX_SIZE + 1)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:  # an ICMP error for a query (port unreachable): no answer
                    break
                self._datagram(s, data)
            await trio.lowlevel.checkpoint()

    def _datagram(self, s: _Socket, data: bytes) -> None:
        # From the server asked (the socket is connected to it); by id, its query.
        if len(data) < 2:
            self.stray += 1
            return
        q = s.pending.get(data[0] << 8 | data[1])
        if q is None or q.done:
            self.stray += 1
            return
        reply = read(data, q.asked)
        if reply is None:  # another question, or not an answer: wait on
            self.stray += 1
            return
        now = trio.current_time()
        if reply.error is not None:
            # SERVFAIL, REFUSED and the like are that server's: the next one is
            # asked at once, as a resolver would (the first of resolv.conf's may
            # refuse every query); the query fails when no try is left out.
            qid = data[0] << 8 | data[1]
            del s.pending[qid]
            q.ids.remove((s, qid))
            self._close_if_idle(s)
            if q.tries < TRIES and len(self.servers) > 1 and self._counts(q):
                self._send(q, now)
            elif not q.ids:
                self._finish(q, None, now, "error")
        elif not reply.addresses:
            self._finish(q, reply, now, "clear")
        else:
            self._finish(q, reply, now, "refused" if refuses(reply.addresses) else "listed")

    # -- answers -----------------------------------------------------------------

    def _finish(self, q: _Query[T], reply: Reply | None, now: float, result: str) -> None:
        # The query is over: answered (reply), or not (None: timeout or error).
        self._over(q)
        for s, qid in q.ids:
            s.pending.pop(qid, None)
            self._close_if_idle(s)
        self._inflight.pop((q.domain, q.name), None)
        counts = self._counts(q)
        self.counts[q.domain, result if counts or reply is None else "late"] += 1
        replies: tuple[str, ...] | None = None
        expires = -math.inf
        if reply is not None:
            replies = reply.addresses
            expires = self.cache.put((q.domain, q.name), replies, reply.ttl, now)
            alarm = self.watch.seen(q.domain, self._lists(q.domain, replies))
            if alarm is not None and self._on_alarm is not None:
                self._on_alarm(q.domain, alarm, "listed")
            alarm = self.refusals.seen(q.domain, result == "refused")
            if alarm is not None and self._on_alarm is not None:
                self._on_alarm(q.domain, alarm, "refused")
        waiters, q.waiters, q.ids = q.waiters, [], []  # its timers may outlive it
        for client in waiters:
            self._answered(client, q.domain, replies, expires, now)
        if q.slot:
            q.slot = False
            self._running[q.domain] -= 1
            self._next(q.domain, now)

    def _lists(self, domain: str, replies: tuple[str, ...]) -> bool:
        return bool(replies) and any(e.matches(replies) for e in self._entries[domain])

    def _next(self, domain: str, now: float) -> None:
        # A query of `domain` has ended: send the newest waiting one that still
        # counts for a client; those that count for nobody now are never sent.
        # A send that fails at once ends its query at once, which frees the slot
        # again: that is taken up by this loop, never by a nested call, so that a
        # backlog of thousands failing one after the other (no descriptor, no
        # route) costs a loop, not a recursion as deep as the backlog.
        if self._freed is not None:  # inside the loop below: it goes on
            self._freed.append(domain)
            return
        self._freed = [domain]
        try:
            while self._freed:
                backlog = self._backlog[self._freed.pop()]
                while backlog:
                    q = backlog.pop()
                    if now < q.queued + self.timeout and self._counts(q):
                        self._launch(q, now)
                        break
                    self._skip(q, now)
        finally:
            self._freed = None

    def _skip(self, q: _Query[T], now: float) -> None:
        # A query never sent: its clients have no answer from this list.
        self.counts[q.domain, "skipped"] += 1
        self._over(q)
        self._inflight.pop((q.domain, q.name), None)
        waiters, q.waiters = q.waiters, []
        for client in waiters:
            self._answered(client, q.domain, None, -math.inf, now)

    def _answered(
        self,
        client: _Client[T],
        domain: str,
        replies: tuple[str, ...] | None,
        expires: float,
        now: float,
    ) -> None:
        # One list's answer for a client (None: none came); tell the hold.
        if replies is None:
            client.missing.append(domain)
        else:
            client.answers[domain] = replies
        client.expires = min(client.expires, expires)
        client.left -= 1
        waiting = self._waiting(client.item)
        if client.left == 0:
            missing = tuple(d for d in self.domains if d in client.missing)
            result = score(self.lists, client.answers, missing)
            if not missing:
                self.scores.put(client.address, result, client.expires - now, now)
            if not waiting:
                self.incomplete += 1
                return
            self.complete += 1
        elif not waiting:
            return
        else:
            pending = [d for d in self.domains if d not in client.answers]
            to_come = [d for d in pending if d not in client.missing]
            result = score(self.lists, client.answers, pending, to_come)
        if replies is not None and self._lists(domain, replies):
            self.listed[domain] += 1
        self._on_answer(client.item, result)


# The kinds of timers: send again, give up, or only wake the task (a backlog).
_RETRY, _EXPIRE, _NOTHING = 0, 1, 2

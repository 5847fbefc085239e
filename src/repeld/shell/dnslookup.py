"""One task asks the DNS lists about every held client, all lists at once.

At accept the server queues each held client (`ask`); the task started by
`run` looks every configured list domain up under the client's query name
(core/dnsbl.py `query_name`), each in a short-lived child task of its own
nursery, so that one slow list never holds up another or the next client. An
answer (A records, NXDOMAIN or no A record: not listed) is kept for its DNS TTL
in a bounded `AnswerCache`, and a question already in flight for another
client from the same address is shared: one query per list per address at
most, none at all on a cache hit. When every list has answered or given up
(--dns-timeout: no answer counts as not listed) the client's score goes to
`on_answer`, if `waiting(item)` still says it counts. The hold never waits for
it (core/hold.py): a client whose delay ends first is passed without it.

A score made only of answers still in their TTL is kept too (`ScoreCache`),
until the first of them expires: the server asks `known(address)` at accept,
and a client seen again is judged there and then, with one dictionary lookup
and no trip through the queue and this task -- what most clients of a busy
server are (the same bots, the same senders), so that the lists cost them
next to nothing (docs/perf-log/2026-12-03-dnsbl-fast.md).

Each query holds a socket of its own until it is answered or gives up, and
a list that never answers would keep one per client for --dns-timeout: a
flood from distinct addresses would spend every descriptor the server has.
So each list has at most its share of `MAX_QUERIES` (at least `MIN_QUERIES`)
queries in flight, within the descriptors kept back from
--max-held (service/capacity.py FD_RESERVE); the rest wait their turn in order,
and one whose clients were all decided meanwhile, or that has waited
--dns-timeout, is never sent (`skipped`): its clients have no answer from
that list, as if it had been sent and not answered. A silent list so waits
alone: the other lists' queries go on, and their clients are scored within
--dns-timeout as before.

A task per query rather than one socket of our own: dnspython's resolver
brings the retries over the resolver's servers, the TCP fallback for a
truncated answer and the reading of /etc/resolv.conf, and a trio task costs
a few microseconds next to a round trip to a resolver.

dnspython is a dependency for its asyncio-and-trio resolver (dns.asyncresolver
with the trio backend): the one maintained pure-Python DNS library that runs
on trio without a thread per query.
"""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Callable
from typing import Generic, TypeVar

import dns.asyncbackend
import dns.asyncresolver
import dns.message
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import trio

from repeld.config.values import Resolver
from repeld.core.dnsbl import (
    AnswerCache,
    DnsList,
    DnsScore,
    ScoreCache,
    domains,
    negative_ttl,
    reversed_address,
    score,
)

__all__ = ["MAX_QUERIES", "MIN_QUERIES", "DnsLookups", "make_resolver"]

T = TypeVar("T")

#: Queries in flight at most, over all the lists (each one a socket). Also
#: what bounds the hold's latency while answers pour in: trio runs every task
#: that is ready before it looks at the sockets again, and each answer costs
#: some 300-350 µs of dnspython, so 16 answers are a 5 ms stall at most (under
#: a flood of new addresses the cut-off p99 was 157 ms at 128, 10-30 ms at 32,
#: 4-7.5 ms at 16). 16 in flight still take some 500 queries a second from a
#: resolver 30 ms away, and far more from a local cache.
MAX_QUERIES = 16
#: ... and at least this many for each list however many lists there are.
MIN_QUERIES = 4


#: What an answer to an A query may hold: the records, a CNAME chain on the way,
#: the SOA of a negative answer, NS and TXT in the other sections, OPT for EDNS.
_RECORD_TYPES = (
    dns.rdatatype.A,
    dns.rdatatype.AAAA,
    dns.rdatatype.CNAME,
    dns.rdatatype.DNAME,
    dns.rdatatype.SOA,
    dns.rdatatype.NS,
    dns.rdatatype.TXT,
    dns.rdatatype.OPT,
)


def make_resolver(server: Resolver | None) -> dns.asyncresolver.Resolver:
    """The resolver the lists are asked through: --resolver, else /etc/resolv.conf.

    Called before any chroot or privilege drop: it reads /etc/resolv.conf and
    loads dnspython's trio backend and the record types an answer holds, none of
    which may be readable afterwards (dnspython imports them on first use, and
    parses a record whose module fails to load as an opaque GenericRdata).
    """
    dns.asyncbackend.get_backend("trio")
    for rdtype in _RECORD_TYPES:
        dns.rdata.get_rdata_class(dns.rdataclass.IN, rdtype)  # type: ignore[no-untyped-call]
    if server is None:
        return dns.asyncresolver.Resolver()
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [server.host]
    resolver.port = server.port
    return resolver


def _negative_ttl(response: dns.message.Message | None) -> float:
    """How long a "not listed" answer is kept, from the SOA in its authority section."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return negative_ttl(rrset.ttl, int(getattr(rrset[0], "minimum", 0)))
    return negative_ttl(None, None)


class _Client(Generic[T]):
    """One held client's answers so far, how many lists are still to answer, and
    when the first answer expires (-inf once one is no answer: never kept)."""

    __slots__ = ("address", "answers", "expires", "item", "left")

    def __init__(self, address: str, item: T, left: int) -> None:
        self.address = address
        self.item = item
        self.left = left
        self.answers: dict[str, tuple[str, ...]] = {}
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
    ) -> None:
        self.resolver = resolver
        self.lists = lists
        self.domains = domains(lists)
        self._on_answer = on_answer
        self._waiting = waiting
        self.timeout = timeout
        self.cache = cache if cache is not None else AnswerCache()
        self.scores = scores if scores is not None else ScoreCache()
        # Clients judged by `known` (each one a cached answer from every list).
        self._known = 0
        self._backend = dns.asyncbackend.get_backend("trio")
        self._queue: list[tuple[str, T]] = []
        self._due = trio.Event()
        # (domain, query name) -> the clients waiting for that query, in flight
        # or waiting its turn in `_backlog`
        self._inflight: dict[tuple[str, str], list[_Client[T]]] = {}
        #: Queries each list may have in flight, and has.
        self.slots = max(MIN_QUERIES, MAX_QUERIES // max(1, len(self.domains)))
        self._running: dict[str, int] = dict.fromkeys(self.domains, 0)
        #: Per list, the queries waiting for a slot and when each was queued.
        self._backlog: dict[str, deque[tuple[str, float]]] = {d: deque() for d in self.domains}
        self._queries: trio.Nursery | None = None
        #: Answers by (domain, result) since start, result one of core.dnsbl RESULTS.
        self.counts: Counter[tuple[str, str]] = Counter()
        #: Clients each list listed (its answer passed an entry's filter).
        self.listed: Counter[str] = Counter()

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
        queries skipped, and clients listed (once per list that listed them)."""
        by_result = self._by_result()
        sent = sum(by_result[r] for r in ("listed", "clear", "timeout", "error"))
        return {
            "dns_lookups": sent,
            "dns_timeouts": by_result["timeout"],
            "dns_errors": by_result["error"],
            "dns_hits": sum(self.listed.values()),
            "dns_cached": by_result["cached"],
            "dns_skipped": by_result["skipped"],
        }

    def results(self) -> dict[str, int]:
        """Answers by result, over the lists (for --metrics)."""
        return {result: n for result, n in self._by_result().items() if n}

    def hits(self) -> dict[str, int]:
        """Clients listed, by list domain (for --metrics)."""
        return dict(self.listed)

    async def run(self) -> None:
        """Serve the queue until cancelled (the queries in flight go with it)."""
        async with trio.open_nursery() as queries:
            self._queries = queries
            while True:
                if not self._queue:
                    self._due = trio.Event()
                    # A query that waits for its turn gives up as a sent one would.
                    with trio.move_on_at(self._first_expiry()):
                        await self._due.wait()
                batch, self._queue = self._queue, []
                now = trio.current_time()
                self._expire(now)
                for address, item in batch:
                    if self._waiting(item):
                        self._start(queries, address, item, now)

    def _start(self, queries: trio.Nursery, address: str, item: T, now: float) -> None:
        try:
            prefix = reversed_address(address)
        except ValueError:  # no IP address (a unix socket peer): no list can say anything
            self._on_answer(item, DnsScore())
            return
        client = _Client(address, item, len(self.domains))
        for domain in self.domains:
            name = f"{prefix}.{domain}"
            cached = self.cache.entry((domain, name), now)
            if cached is not None:
                self.counts[domain, "cached"] += 1
                self._answered(client, domain, cached[1], cached[0], now)
                continue
            waiters = self._inflight.get((domain, name))
            if waiters is not None:  # asked already for another client: share it
                self.counts[domain, "cached"] += 1  # no query of its own, as from the cache
                waiters.append(client)
                continue
            self._inflight[domain, name] = [client]
            if self._running[domain] < self.slots:
                self._running[domain] += 1
                queries.start_soon(self._query, domain, name)
            else:  # the list is busy: wait for a query of its own to end
                self._backlog[domain].append((name, now))

    def _next(self, domain: str, now: float) -> None:
        # A query of `domain` has ended: send the first waiting one that still
        # counts for a client; those that count for nobody now are never sent.
        backlog = self._backlog[domain]
        while backlog:
            name, queued = backlog.popleft()
            waiters = self._inflight[domain, name]
            if now < queued + self.timeout and any(self._waiting(c.item) for c in waiters):
                assert self._queries is not None
                self._running[domain] += 1
                self._queries.start_soon(self._query, domain, name)
                return
            self._skip(domain, name, now)

    def _first_expiry(self) -> float:
        return min(
            (backlog[0][1] + self.timeout for backlog in self._backlog.values() if backlog),
            default=math.inf,
        )

    def _expire(self, now: float) -> None:
        # Queries that waited --dns-timeout for their turn: no answer, as if sent
        # and unanswered, so that a silent list never holds up the others' verdict.
        for domain, backlog in self._backlog.items():
            while backlog and now >= backlog[0][1] + self.timeout:
                name, _ = backlog.popleft()
                self._skip(domain, name, now)

    def _skip(self, domain: str, name: str, now: float) -> None:
        # A query never sent: its clients have no answer from this list.
        self.counts[domain, "skipped"] += 1
        for client in self._inflight.pop((domain, name), ()):
            self._answered(client, domain, (), -math.inf, now)

    async def _query(self, domain: str, name: str) -> None:
        replies: tuple[str, ...] = ()
        ttl = 0.0
        # The resolver's own lifetime ends the query; the scope is a backstop.
        with trio.move_on_after(self.timeout + 1.0):
            result = "timeout"
            try:
                answer = await self.resolver.resolve(
                    name,
                    "A",
                    lifetime=self.timeout,
                    raise_on_no_answer=False,
                    search=False,
                    backend=self._backend,
                )
            except dns.resolver.NXDOMAIN as nx:
                responses = nx.responses()  # type: ignore[no-untyped-call]
                result, ttl = "clear", _negative_ttl(next(iter(responses.values()), None))
            except dns.resolver.LifetimeTimeout:
                result = "timeout"
            except Exception:  # SERVFAIL, REFUSED, a malformed answer: never fatal
                result = "error"
            else:
                rrset = answer.rrset
                if rrset is None:
                    result, ttl = "clear", _negative_ttl(answer.response)
                else:
                    replies = tuple(str(getattr(r, "address", "")) for r in rrset)
                    result, ttl = ("listed" if replies else "clear"), float(rrset.ttl)
        self.counts[domain, result] += 1
        now = trio.current_time()
        # No answer (ttl 0) is not kept: -inf, asked again next time.
        expires = self.cache.put((domain, name), replies, ttl, now)
        self._running[domain] -= 1
        for client in self._inflight.pop((domain, name), ()):
            self._answered(client, domain, replies, expires, now)
        self._next(domain, now)

    def _answered(
        self,
        client: _Client[T],
        domain: str,
        replies: tuple[str, ...],
        expires: float,
        now: float,
    ) -> None:
        client.answers[domain] = replies
        client.expires = min(client.expires, expires)
        client.left -= 1
        if client.left == 0:
            result = score(self.lists, client.answers)
            self.scores.put(client.address, result, client.expires - now, now)
            self.listed.update(result.lists)
            if self._waiting(client.item):
                self._on_answer(client.item, result)

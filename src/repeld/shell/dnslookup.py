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

A task per query rather than one socket of our own: dnspython's resolver
brings the retries over the resolver's servers, the TCP fallback for a
truncated answer and the reading of /etc/resolv.conf, and a trio task costs
a few microseconds next to a round trip to a resolver.

dnspython is a dependency for its asyncio-and-trio resolver (dns.asyncresolver
with the trio backend): the one maintained pure-Python DNS library that runs
on trio without a thread per query.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Generic, TypeVar

import dns.asyncbackend
import dns.asyncresolver
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import trio

from repeld.config.values import Resolver
from repeld.core.dnsbl import (
    NEGATIVE_TTL,
    AnswerCache,
    DnsList,
    DnsScore,
    domains,
    reversed_address,
    score,
)

__all__ = ["RESULTS", "DnsLookups", "make_resolver"]

T = TypeVar("T")

#: How one list's answer for one client came: from a query (listed: an A record,
#: clear: NXDOMAIN or none, timeout, error: SERVFAIL, refused...) or with no query
#: of its own (cached: the answer cache, or a query in flight for another client
#: from the same address), so that every client counts once per list.
RESULTS = ("listed", "clear", "timeout", "error", "cached")


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


class _Client(Generic[T]):
    """One held client's answers so far, and how many lists are still to answer."""

    __slots__ = ("answers", "item", "left")

    def __init__(self, item: T, left: int) -> None:
        self.item = item
        self.left = left
        self.answers: dict[str, tuple[str, ...]] = {}


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
    ) -> None:
        self.resolver = resolver
        self.lists = lists
        self.domains = domains(lists)
        self._on_answer = on_answer
        self._waiting = waiting
        self.timeout = timeout
        self.cache = cache if cache is not None else AnswerCache()
        self._backend = dns.asyncbackend.get_backend("trio")
        self._queue: list[tuple[str, T]] = []
        self._due = trio.Event()
        # (domain, query name) -> the clients waiting for that query in flight
        self._inflight: dict[tuple[str, str], list[_Client[T]]] = {}
        #: Answers by (domain, result) since start, result one of RESULTS.
        self.counts: Counter[tuple[str, str]] = Counter()
        #: Clients each list listed (its answer passed an entry's filter).
        self.listed: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._queue)

    def ask(self, address: str, item: T) -> None:
        """Look `address` up on every list for `item`; never blocks."""
        self._queue.append((address, item))
        self._due.set()

    def statistics(self) -> dict[str, int]:
        """Totals over the lists: queries sent, their timeouts and errors, answers
        that needed no query (the cache, or another client's query in flight), and
        clients listed (once per list that listed them)."""
        by_result: Counter[str] = Counter()
        for (_, result), n in self.counts.items():
            by_result[result] += n
        sent = sum(by_result[r] for r in ("listed", "clear", "timeout", "error"))
        return {
            "dns_lookups": sent,
            "dns_timeouts": by_result["timeout"],
            "dns_errors": by_result["error"],
            "dns_hits": sum(self.listed.values()),
            "dns_cached": by_result["cached"],
        }

    def results(self) -> dict[str, int]:
        """Answers by result, over the lists (for --metrics)."""
        totals: Counter[str] = Counter()
        for (_, result), n in self.counts.items():
            totals[result] += n
        return dict(totals)

    def hits(self) -> dict[str, int]:
        """Clients listed, by list domain (for --metrics)."""
        return dict(self.listed)

    async def run(self) -> None:
        """Serve the queue until cancelled (the queries in flight go with it)."""
        async with trio.open_nursery() as queries:
            while True:
                if not self._queue:
                    self._due = trio.Event()
                    await self._due.wait()
                batch, self._queue = self._queue, []
                now = trio.current_time()
                for address, item in batch:
                    if self._waiting(item):
                        self._start(queries, address, item, now)

    def _start(self, queries: trio.Nursery, address: str, item: T, now: float) -> None:
        try:
            prefix = reversed_address(address)
        except ValueError:  # no IP address (a unix socket peer): no list can say anything
            self._on_answer(item, DnsScore())
            return
        client = _Client(item, len(self.domains))
        for domain in self.domains:
            name = f"{prefix}.{domain}"
            cached = self.cache.get(domain, name, now)
            if cached is not None:
                self.counts[domain, "cached"] += 1
                self._answered(client, domain, cached)
                continue
            waiters = self._inflight.get((domain, name))
            if waiters is not None:  # asked already for another client: share it
                self.counts[domain, "cached"] += 1  # no query of its own, as from the cache
                waiters.append(client)
                continue
            self._inflight[domain, name] = [client]
            queries.start_soon(self._query, domain, name)

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
            except dns.resolver.NXDOMAIN:
                result, ttl = "clear", NEGATIVE_TTL
            except dns.resolver.LifetimeTimeout:
                result = "timeout"
            except Exception:  # SERVFAIL, REFUSED, a malformed answer: never fatal
                result = "error"
            else:
                rrset = answer.rrset
                if rrset is None:
                    result, ttl = "clear", NEGATIVE_TTL
                else:
                    replies = tuple(str(getattr(r, "address", "")) for r in rrset)
                    result, ttl = ("listed" if replies else "clear"), float(rrset.ttl)
        self.counts[domain, result] += 1
        if ttl > 0:
            self.cache.put(domain, name, replies, ttl, trio.current_time())
        for client in self._inflight.pop((domain, name), ()):
            self._answered(client, domain, replies)

    def _answered(self, client: _Client[T], domain: str, replies: tuple[str, ...]) -> None:
        client.answers[domain] = replies
        client.left -= 1
        if client.left == 0:
            result = score(self.lists, client.answers)
            self.listed.update(result.lists)
            if self._waiting(client.item):
                self._on_answer(client.item, result)

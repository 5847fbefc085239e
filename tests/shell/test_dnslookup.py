"""The DNS lists' lookup task against a tiny DNS server on a real loopback socket.

The server is trio code in the test: it answers from a table (A record,
NXDOMAIN, SERVFAIL) and stays silent for names under silent.test, counting
every query it reads. The real trio clock: dnspython times its queries itself.
"""

from __future__ import annotations

import collections
import dataclasses

import dns.message
import dns.rcode
import dns.rrset
import pytest
import trio

from repeld.config.values import Resolver
from repeld.core.dnsbl import NEGATIVE_TTL, DnsAction, DnsList, DnsScore, domains
from repeld.core.policy import TrustedNetworks
from repeld.shell.dnslookup import MAX_QUERIES, DnsLookups, make_resolver

from ..harness import connect, read_line, running

pytestmark = pytest.mark.shell

ANSWERS = {
    "2.0.0.127.bl.test.": "127.0.0.2",
    "2.0.0.127.wl.test.": "127.0.2.1",
}
#: Zones whose negative answers carry an SOA: (its TTL, its minimum field).
SOAS = {"long.test.": (900, 600), "short.test.": (900, 10), "nodata.test.": (120, 3600)}


async def _server(
    sock: trio.socket.SocketType, queries: collections.Counter[str], delay: float
) -> None:
    while True:
        data, peer = await sock.recvfrom(4096)
        query = dns.message.from_wire(data)
        name = str(query.question[0].name)
        queries[name] += 1
        if name.endswith(".silent.test."):
            continue
        reply = dns.message.make_response(query)
        if name in ANSWERS:
            reply.answer.append(dns.rrset.from_text(name, 300, "IN", "A", ANSWERS[name]))
        elif name.endswith(".broken.test."):
            reply.set_rcode(dns.rcode.SERVFAIL)
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            zone = name.split(".", 4)[-1]  # d.c.b.a.ZONE
            if zone in SOAS:  # a negative answer that says how long it may be kept
                ttl, minimum = SOAS[zone]
                if zone.startswith("nodata."):
                    reply.set_rcode(dns.rcode.NOERROR)  # the name exists, without an A
                soa = f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {minimum}"
                reply.authority.append(dns.rrset.from_text(zone, ttl, "IN", "SOA", soa))
        await trio.sleep(delay)
        await sock.sendto(reply.to_wire(), peer)


async def _run(
    lists: tuple[DnsList, ...],
    clients: list[str],
    timeout: float = 0.5,
    delay: float = 0.05,
    lookups: DnsLookups[str] | None = None,
) -> tuple[dict[str, DnsScore], collections.Counter[str], DnsLookups[str]]:
    """Ask about `clients` (through `lookups`' caches, if given: a new server)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    queries: collections.Counter[str] = collections.Counter()
    got: dict[str, DnsScore] = {}
    fresh: DnsLookups[str] = DnsLookups(
        make_resolver(Resolver("127.0.0.1", port)),
        lists,
        lambda item, result: got.__setitem__(item, result),
        lambda item: item not in got,
        timeout,
        lookups.cache if lookups is not None else None,
        lookups.scores if lookups is not None else None,
    )
    lookups = fresh
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_server, sock, queries, delay)
            nursery.start_soon(lookups.run)
            for n, address in enumerate(clients):
                lookups.ask(address, f"{address}#{n}")
            while len(got) < len(clients):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    sock.close()
    return got, queries, lookups


async def test_every_list_is_asked_once_and_scored() -> None:
    lists = (DnsList("bl.test", weight=3), DnsList("wl.test", weight=-1))
    got, queries, lookups = await _run(lists, ["127.0.0.2", "127.0.0.9"])
    assert got == {"127.0.0.2#0": DnsScore(2, ("bl.test", "wl.test")), "127.0.0.9#1": DnsScore()}
    assert set(queries.values()) == {1} and len(queries) == 4
    assert lookups.statistics() == {
        "dns_lookups": 4,
        "dns_timeouts": 0,
        "dns_errors": 0,
        "dns_hits": 2,
        "dns_cached": 0,
        "dns_skipped": 0,
    }
    assert lookups.hits() == {"bl.test": 1, "wl.test": 1}


async def test_clients_from_one_address_share_the_query_in_flight_then_the_cache() -> None:
    got, queries, lookups = await _run((DnsList("bl.test"),), ["127.0.0.2"] * 3)
    assert set(got.values()) == {DnsScore(1, ("bl.test",))}
    assert queries == {"2.0.0.127.bl.test.": 1}
    # One query answered three clients; the two that shared it count as cached (no
    # query of their own), so every client counts once per list.
    assert lookups.results() == {"listed": 1, "cached": 2}


async def test_a_silent_or_failing_list_counts_as_not_listing() -> None:
    lists = (DnsList("silent.test"), DnsList("broken.test"), DnsList("bl.test"))
    started = trio.current_time()
    got, _, lookups = await _run(lists, ["127.0.0.2"], timeout=0.3)
    assert got == {"127.0.0.2#0": DnsScore(1, ("bl.test",))}
    assert trio.current_time() - started < 5.0  # bounded by the timeout, not by the server
    assert lookups.results() == {"timeout": 1, "error": 1, "listed": 1}


async def test_a_non_address_is_answered_at_once_with_nothing() -> None:
    got, queries, _ = await _run((DnsList("bl.test"),), ["not-an-address"])
    assert got == {"not-an-address#0": DnsScore()}
    assert not queries


async def test_a_score_from_cached_answers_is_known_at_once_until_the_first_expires() -> None:
    lists = (DnsList("bl.test"), DnsList("wl.test", weight=-1))
    got, queries, lookups = await _run(lists, ["127.0.0.2", "127.0.0.9"])
    now = trio.current_time()
    # 127.0.0.2: two A answers (TTL 300); 127.0.0.9: two NXDOMAIN (NEGATIVE_TTL).
    assert lookups.known("127.0.0.2", now) == got["127.0.0.2#0"] == DnsScore(0, domains(lists))
    assert lookups.known("127.0.0.9", now) == DnsScore()
    assert lookups.known("127.0.0.9", now + NEGATIVE_TTL + 1) is None
    assert lookups.known("127.0.0.2", now + 299) is not None
    assert lookups.known("127.0.0.2", now + 301) is None
    assert lookups.known("127.0.0.7", now) is None  # never asked
    assert len(queries) == 4  # `known` never queries
    # Each of the three known clients counts as a cached answer from every list,
    # and as a hit on each list that listed it (127.0.0.2 was, twice).
    stats = lookups.statistics()
    assert (stats["dns_lookups"], stats["dns_cached"], stats["dns_hits"]) == (4, 3 * 2, 3 * 2)
    assert lookups.hits() == {"bl.test": 3, "wl.test": 3}


async def test_a_score_with_an_unanswered_list_is_not_kept() -> None:
    lists = (DnsList("silent.test"), DnsList("bl.test"))
    _, _, lookups = await _run(lists, ["127.0.0.2"], timeout=0.3)
    assert lookups.known("127.0.0.2", trio.current_time()) is None  # asked again next time
    # ... but the list that answered is not asked again.
    got, queries, _ = await _run(lists, ["127.0.0.2"], timeout=0.3, lookups=lookups)
    assert got == {"127.0.0.2#0": DnsScore(1, ("bl.test",))}
    assert set(queries) == {"2.0.0.127.silent.test."}


async def test_a_silent_list_has_a_bounded_number_of_queries_in_flight() -> None:
    """Each query is a socket: a list that never answers may not take one per client,
    nor hold up the other lists' answers; a query whose clients were all decided
    while it waited its turn is never sent."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    queries: collections.Counter[str] = collections.Counter()
    got: dict[str, DnsScore] = {}
    decided: set[str] = set()
    lists = (DnsList("silent.test"), DnsList("bl.test"))
    lookups: DnsLookups[str] = DnsLookups(
        make_resolver(Resolver("127.0.0.1", sock.getsockname()[1])),
        lists,
        lambda item, result: got.__setitem__(item, result),
        lambda item: item not in decided,
        timeout=1.0,
    )
    clients = [f"127.1.{n // 250}.{n % 250 + 1}" for n in range(3 * lookups.slots)]
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_server, sock, queries, 0.0)
            nursery.start_soon(lookups.run)
            for address in clients:
                lookups.ask(address, address)
            await trio.sleep(0.5)  # well within the silent list's timeout
            silent = [name for name in queries if name.endswith(".silent.test.")]
            # ... it has only its share in flight; the other list answered everyone.
            assert len(silent) == lookups.slots == MAX_QUERIES // len(lists)
            assert sum(1 for name in queries if name.endswith(".bl.test.")) == len(clients)
            assert not got  # nobody is scored before every list has answered or given up
            # The first third are still waiting; the others are decided meanwhile
            # (their delay ended): their turn never comes.
            decided.update(clients[lookups.slots :])
            while len(got) < lookups.slots:
                await trio.sleep(0.05)
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    sock.close()
    assert set(got) == set(clients[: lookups.slots])
    assert sum(1 for name in queries if name.endswith(".silent.test.")) == lookups.slots
    stats = lookups.statistics()
    assert (stats["dns_timeouts"], stats["dns_skipped"]) == (lookups.slots, 2 * lookups.slots)


@pytest.mark.parametrize(
    ("zone", "kept"),
    [
        ("long.test", 600.0),  # the lesser of the SOA's TTL and minimum (RFC 2308)
        ("short.test", NEGATIVE_TTL),  # never less than a minute, as postscreen
        ("nodata.test", 120.0),  # no A record for an existing name: the same rule
        ("bl.test", NEGATIVE_TTL),  # no SOA in the answer
    ],
)
async def test_not_listed_is_kept_for_the_lists_negative_ttl(zone: str, kept: float) -> None:
    _, queries, lookups = await _run((DnsList(zone),), ["127.0.0.9"])
    now = trio.current_time()
    name = f"9.0.0.127.{zone}"
    entry = lookups.cache.entry((zone, name), now)
    assert entry is not None and entry[1] == ()
    assert kept - 5.0 < entry[0] - now <= kept  # stored a moment ago
    assert queries == {f"{name}.": 1}


async def test_a_query_waiting_for_its_turn_gives_up_after_the_timeout() -> None:
    """Beyond its share in flight a silent list's queries wait; each gives up
    --dns-timeout after it was queued, as a sent one would, so that the other
    list's answers reach every client within the timeout, not one share per
    timeout after another."""
    lists = (DnsList("silent.test"), DnsList("bl.test"))
    clients = [f"127.3.{n // 250}.{n % 250 + 1}" for n in range(8 * (MAX_QUERIES // 2))]
    started = trio.current_time()
    got, queries, lookups = await _run(lists, clients, timeout=0.5, delay=0.0)
    took = trio.current_time() - started
    assert set(got) == {f"{address}#{n}" for n, address in enumerate(clients)}
    assert set(got.values()) == {DnsScore()}
    assert took < 2.5  # eight shares one after another would take 4 s
    silent = sum(1 for name in queries if name.endswith(".silent.test."))
    stats = lookups.statistics()
    assert silent == stats["dns_timeouts"] == lookups.slots  # only its share was sent
    assert stats["dns_skipped"] == len(clients) - lookups.slots


async def test_a_reload_that_removes_the_lists_keeps_them_until_a_restart() -> None:
    """The lists are restart-only: a SIGHUP whose settings have none says so, and the
    lists in force go on, with their thresholds, for the next clients (a client
    whose score is cached included) instead of being half removed."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    queries: collections.Counter[str] = collections.Counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_server, sock, queries, 0.0)
        async with running(
            delay=5.0,
            dnsbl=(DnsList("bl.test"),),
            dnsbl_action=DnsAction.REJECT,
            resolver=Resolver("127.0.0.1", sock.getsockname()[1]),
            dns_timeout=1.0,
        ) as h:
            with trio.fail_after(10):
                first = await connect(h.address(), source="127.0.0.2")
                assert (await read_line(first)).startswith(b"554 5.7.1 ")
                first.close()
                server = h.server
                notes = server.apply(
                    dataclasses.replace(server.settings, dnsbl=()), TrustedNetworks(()), None
                )
                assert notes == ["dnsbl changed: takes effect after a restart"]
                again = await connect(h.address(), source="127.0.0.2")  # its score is cached
                assert (await read_line(again)).startswith(b"554 5.7.1 ")
                again.close()
        nursery.cancel_scope.cancel()
    sock.close()
    assert queries == {"2.0.0.127.bl.test.": 1}

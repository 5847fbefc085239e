"""The DNS lists' lookup task against a tiny DNS server on a real loopback socket.

The server is trio code in the test: it answers from a table (A record,
NXDOMAIN, SERVFAIL) and stays silent for names under silent.test, counting
every query it reads. The real trio clock: dnspython times its queries itself.
"""

from __future__ import annotations

import collections

import dns.message
import dns.rcode
import dns.rrset
import pytest
import trio

from repeld.config.values import Resolver
from repeld.core.dnsbl import DnsList, DnsScore
from repeld.shell.dnslookup import DnsLookups, make_resolver

pytestmark = pytest.mark.shell

ANSWERS = {
    "2.0.0.127.bl.test.": "127.0.0.2",
    "2.0.0.127.wl.test.": "127.0.2.1",
}


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
        await trio.sleep(delay)
        await sock.sendto(reply.to_wire(), peer)


async def _run(
    lists: tuple[DnsList, ...], clients: list[str], timeout: float = 0.5, delay: float = 0.05
) -> tuple[dict[str, DnsScore], collections.Counter[str], DnsLookups[str]]:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    queries: collections.Counter[str] = collections.Counter()
    got: dict[str, DnsScore] = {}
    lookups: DnsLookups[str] = DnsLookups(
        make_resolver(Resolver("127.0.0.1", port)),
        lists,
        lambda item, result: got.__setitem__(item, result),
        lambda item: item not in got,
        timeout,
    )
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

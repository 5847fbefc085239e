"""The pass cache's pure parts: keys, the in-memory cache on the autojump clock, --cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from repeld.cache.base import CacheVerdict, OutageNotice, PendingWrites
from repeld.cache.memory import MemoryCache
from repeld.cache.open import make_cache
from repeld.cache.spec import CacheSpec, default_cache_path, parse_cache_url, parse_v6_prefix
from repeld.config.errors import SettingError
from repeld.core.addresses import DEFAULT_V6_PREFIX, cache_key, client_key

GOOD, BAD, UNKNOWN = CacheVerdict.GOOD, CacheVerdict.BAD, CacheVerdict.UNKNOWN

# -- cache_key ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "prefix", "key"),
    [
        ("192.0.2.7", 64, "192.0.2.7"),
        ("192.0.2.7", 128, "192.0.2.7"),
        ("::ffff:192.0.2.7", 64, "192.0.2.7"),
        ("::FFFF:192.0.2.7", 48, "192.0.2.7"),
        ("::ffff:c000:207", 64, "192.0.2.7"),  # the same mapped address, hex form
        # a translator's well-known prefix (RFC 6052): the IPv4 client, not one /64
        ("64:ff9b::192.0.2.7", 64, "192.0.2.7"),
        ("64:FF9B::c000:207", 128, "192.0.2.7"),
        ("64:ff9b:0:0:0:0:c000:208", 48, "192.0.2.8"),
        ("64:ff9b:1::c000:207", 64, "64:ff9b:1::/64"),  # RFC 8215's local-use: not known
        ("64:ff9b::1:c000:207", 64, "64:ff9b::/64"),  # not in the /96
        ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::99", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:3:4:5:6", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2ff::1", 56, "2001:db8:1:200::/56"),
        ("2001:db8:1:2:3:4:5:6", 128, "2001:db8:1:2:3:4:5:6/128"),
        ("2001:db8:1:2:3:4:5:6", 32, "2001:db8::/32"),
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("::1", 64, "::/64"),
    ],
)
def test_cache_key(address: str, prefix: int, key: str) -> None:
    assert cache_key(address, prefix) == key


def test_cache_key_v6_hosts_share_their_prefix_only() -> None:
    a = cache_key("2001:db8:0:1::a", DEFAULT_V6_PREFIX)
    b = cache_key("2001:db8:0:1:ffff:ffff:ffff:ffff", DEFAULT_V6_PREFIX)
    other = cache_key("2001:db8:0:2::a", DEFAULT_V6_PREFIX)
    assert a == b == "2001:db8:0:1::/64"
    assert other != a
    # Distinct IPv4 clients never share a key, whatever the IPv6 prefix.
    assert cache_key("192.0.2.7", 32) != cache_key("192.0.2.8", 32)


@pytest.mark.parametrize("prefix", [0, 31, 129, -1, 64.0, True])
def test_cache_key_bad_prefix(prefix: object) -> None:
    with pytest.raises(ValueError, match="prefix"):
        cache_key("2001:db8::1", prefix)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix"):  # checked for IPv4 clients too
        cache_key("192.0.2.7", prefix)  # type: ignore[arg-type]


@pytest.mark.parametrize("address", ["", "192.0.2", "example.org", "2001:db8::/64", "[::1]"])
def test_cache_key_bad_address(address: str) -> None:
    with pytest.raises(ValueError):
        cache_key(address, 64)


@pytest.mark.parametrize(
    ("address", "prefix", "key"),
    [
        ("192.0.2.7", 64, "192.0.2.7"),
        ("::ffff:192.0.2.7", 64, "192.0.2.7"),
        ("64:ff9b::192.0.2.7", 64, "192.0.2.7"),  # each translated client counted apart
        ("64:ff9b::192.0.2.8", 64, "192.0.2.8"),
        ("2001:db8:1:2::a", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2::a", 128, "2001:db8:1:2::a/128"),
        ("not an address", 64, "not an address"),
        ("fe80::1%eth0", 64, "fe80::/64"),
    ],
)
def test_client_key_is_the_cache_key_or_the_address(address: str, prefix: int, key: str) -> None:
    # --max-per-client counts a client under this.
    assert client_key(address, prefix) == key


def test_parse_v6_prefix() -> None:
    assert parse_v6_prefix("64") == 64
    assert parse_v6_prefix("/48") == 48
    assert parse_v6_prefix("128") == 128
    for bad, reason in [("0", "32-128"), ("16", "32-128"), ("129", "32-128"), ("x", "bits")]:
        with pytest.raises(SettingError, match=reason) as info:
            parse_v6_prefix(bad)
        assert info.value.option == "cache-v6-prefix"


# -- MemoryCache under the autojump clock ------------------------------------------------


async def test_memory_pass_expires_after_ttl(autojump_clock: trio.testing.MockClock) -> None:
    cache = MemoryCache(pass_ttl=100.0)
    assert await cache.lookup("192.0.2.7") is UNKNOWN
    cache.remember_good("192.0.2.7")
    await trio.sleep(99.9)
    assert await cache.lookup("192.0.2.7") is GOOD
    assert await cache.lookup("192.0.2.8") is UNKNOWN
    await trio.sleep(0.1)
    assert await cache.lookup("192.0.2.7") is UNKNOWN
    stats = cache.statistics()
    assert (stats["lookups"], stats["good"], stats["unknown"]) == (4, 1, 3)
    assert stats["entries"] == 0


async def test_memory_a_new_pass_restarts_the_ttl(autojump_clock: trio.testing.MockClock) -> None:
    cache = MemoryCache(pass_ttl=10.0)
    cache.remember_good("k")
    await trio.sleep(8)
    cache.remember_good("k")
    await trio.sleep(8)
    assert await cache.lookup("k") is GOOD


async def test_memory_without_penalties_an_early_talker_is_forgotten(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = MemoryCache(pass_ttl=100.0)  # penalty_ttl off
    cache.remember_bad("k")
    assert await cache.lookup("k") is UNKNOWN
    cache.remember_good("k")
    cache.remember_bad("k")  # never left marked good
    assert await cache.lookup("k") is UNKNOWN
    assert len(cache) == 0


async def test_memory_penalty_and_its_expiry(autojump_clock: trio.testing.MockClock) -> None:
    cache = MemoryCache(pass_ttl=100.0, penalty_ttl=30.0)
    cache.remember_bad("k")
    assert await cache.lookup("k") is BAD
    await trio.sleep(29.9)
    assert await cache.lookup("k") is BAD
    await trio.sleep(0.1)
    assert await cache.lookup("k") is UNKNOWN


async def test_memory_last_verdict_wins(autojump_clock: trio.testing.MockClock) -> None:
    cache = MemoryCache(pass_ttl=100.0, penalty_ttl=30.0)
    cache.remember_bad("k")
    cache.remember_good("k")  # a later pass clears the penalty ...
    assert await cache.lookup("k") is GOOD
    await trio.sleep(50)  # ... and lasts the pass TTL, not the penalty's
    assert await cache.lookup("k") is GOOD
    cache.remember_bad("k")  # a later early talk replaces the pass
    assert await cache.lookup("k") is BAD


async def test_memory_run_sweeps_expired_entries(autojump_clock: trio.testing.MockClock) -> None:
    cache = MemoryCache(pass_ttl=10.0, penalty_ttl=100.0, sweep_interval=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        cache.remember_good("a")
        cache.remember_bad("b")
        assert len(cache) == 2
        await trio.sleep(15.5)  # sweeps at 5, 10, 15: "a" expired at 10
        assert len(cache) == 1
        assert cache.statistics()["swept"] == 1
        assert await cache.lookup("b") is BAD
        nursery.cancel_scope.cancel()
    await cache.aclose()
    cache.remember_good("c")
    assert await cache.lookup("c") is UNKNOWN
    assert cache.statistics()["dropped"] == 1


async def test_memory_is_bounded_oldest_write_goes(autojump_clock: trio.testing.MockClock) -> None:
    cache = MemoryCache(max_entries=3)
    for key in ("a", "b", "c"):
        cache.remember_good(key)
    cache.remember_good("a")  # rewritten: now the newest
    cache.remember_good("d")  # evicts "b", the oldest write
    assert [await cache.lookup(k) for k in "abcd"] == [GOOD, UNKNOWN, GOOD, GOOD]
    assert cache.statistics()["dropped"] == 1


async def test_memory_clock_is_injectable() -> None:
    now = [1000.0]
    cache = MemoryCache(pass_ttl=5.0, clock=lambda: now[0])
    cache.remember_good("k")
    now[0] += 4.9
    assert await cache.lookup("k") is GOOD
    now[0] += 0.1
    assert await cache.lookup("k") is UNKNOWN


def test_memory_rejects_bad_ttls() -> None:
    with pytest.raises(ValueError):
        MemoryCache(pass_ttl=0)
    with pytest.raises(ValueError):
        MemoryCache(penalty_ttl=-1)


# -- the shared machinery ------------------------------------------------------------------


async def test_outage_notice_reports_transitions_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    errors: list[str] = []
    recoveries: list[str] = []
    notice = OutageNotice(errors.append, recoveries.append)
    assert notice.ok("fine") is False  # healthy at start: nothing to recover from
    assert notice.failed("down: refused") is True
    for _ in range(50):
        assert notice.failed("down again") is False
    await trio.sleep(2.5)
    assert notice.ok("back") is True
    assert notice.ok("back") is False
    assert errors == ["down: refused"]
    assert recoveries == ["back (after 2.5s)"]
    assert notice.failed("second outage") is True
    assert notice.outages == 2


def test_an_outage_ends_when_every_kind_that_failed_has_worked_since() -> None:
    # A store that answers reads (or a PING) and refuses writes is one outage.
    errors: list[str] = []
    recoveries: list[str] = []
    notice = OutageNotice(errors.append, recoveries.append, clock=lambda: 0.0)
    read, write, opened = OutageNotice.READ, OutageNotice.WRITE, OutageNotice.OPEN
    assert notice.failed("cannot write", write) is True
    for _ in range(5):
        assert notice.ok("reachable", read) is False  # a read proves nothing of writes
        assert notice.failed("cannot write", write) is False
    assert notice.failed("lookup failed", read) is False
    assert notice.ok("written", write) is False  # the reads failed too meanwhile
    assert notice.failing(read) and not notice.failing(write)
    assert notice.ok("read", read) is True
    assert (errors, recoveries) == (["cannot write"], ["read (after 0.0s)"])
    assert notice.failed("garbled", read) is True
    assert notice.failed("cannot reopen", opened) is False
    assert notice.ok("reopened", opened) is False
    assert notice.ok("a lookup", read) is True
    assert recoveries[-1] == "a lookup (after 0.0s)" and notice.outages == 2


async def test_pending_writes_coalesce_and_requeue() -> None:
    pending = PendingWrites(limit=2, batch_size=10)
    assert pending.put("a", GOOD, 100.0) is None
    assert pending.put("a", BAD, 100.0) is None  # same key: replaces, no room used
    assert pending.put("b", GOOD, 100.0) is None
    assert pending.put("c", GOOD, 100.0) == "c"  # full: the new pass is lost
    assert pending.get("a", 50.0) is BAD
    assert pending.get("a", 100.0) is UNKNOWN  # expired while queued
    assert pending.get("z", 50.0) is None  # ask the backend
    batch = pending.take()
    assert set(batch) == {"a", "b"}
    assert pending.get("b", 50.0) is GOOD  # still visible while in flight
    pending.put("b", BAD, 100.0)  # newer than the batch
    assert pending.failed() == 0
    assert pending.queued == {"a": (BAD, 100.0), "b": (BAD, 100.0)}
    pending.take()
    pending.done()
    assert len(pending) == 0


def test_a_full_queue_loses_passes_never_a_penalty_while_a_pass_waits() -> None:
    pending = PendingWrites(limit=3, batch_size=10)
    for key in "abc":
        assert pending.put(key, GOOD, 100.0) is None
    assert pending.put("d", GOOD, 100.0) == "d"  # a pass: lost itself
    assert pending.put("t", BAD, 100.0) == "a"  # a penalty: the oldest pass gives way
    assert pending.put("u", UNKNOWN, 100.0) == "b"  # so does a "forget"
    assert pending.put("b", GOOD, 100.0) == "b"  # gone for good: a new key, and full
    assert pending.put("c", BAD, 100.0) is None  # a queued pass turned penalty: no room used
    assert pending.put("v", BAD, 100.0) == "v"  # no pass left to give way
    assert pending.queued == {"c": (BAD, 100.0), "t": (BAD, 100.0), "u": (UNKNOWN, 100.0)}
    assert pending.goods == {}


def test_a_failed_batch_trims_the_oldest_passes_first() -> None:
    pending = PendingWrites(limit=3, batch_size=10)
    pending.put("a", GOOD, 100.0)
    pending.put("t", BAD, 100.0)
    pending.put("b", GOOD, 100.0)
    pending.take()
    pending.put("c", GOOD, 100.0)
    pending.put("u", UNKNOWN, 100.0)
    pending.put("a", BAD, 100.0)  # newer than the batch's pass
    assert pending.failed() == 2  # 5 keys, room for 3: the two oldest passes
    assert pending.queued == {"a": (BAD, 100.0), "t": (BAD, 100.0), "u": (UNKNOWN, 100.0)}
    assert pending.put("w", BAD, 100.0) == "w"
    pending.take()
    pending.put("x", BAD, 100.0)
    assert pending.failed() == 1  # no pass at all: the oldest write goes
    assert list(pending.queued) == ["t", "u", "x"]
    assert pending.put("y", GOOD, 100.0) == "y"  # still full
    assert pending.goods == {}


# -- --cache -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("none", CacheSpec("none")),
        ("memory", CacheSpec("memory")),
        ("sqlite", CacheSpec("sqlite", path=default_cache_path())),
        ("sqlite:/var/lib/repeld/c.db", CacheSpec("sqlite", path="/var/lib/repeld/c.db")),
        ("sqlite:///tmp/c.db", CacheSpec("sqlite", path="/tmp/c.db")),
        ("redis://cache.example", CacheSpec("redis", host="cache.example")),
        ("redis://10.0.0.5:6380/3", CacheSpec("redis", host="10.0.0.5", port=6380, db=3)),
        ("rediss://h/", CacheSpec("redis", host="h", tls=True)),
        ("redis://[2001:db8::5]:7000", CacheSpec("redis", host="2001:db8::5", port=7000)),
        (
            "redis://:p%40ss%3Aword@h/1",
            CacheSpec("redis", host="h", db=1, password="p@ss:word"),
        ),
        (
            "redis://mx:secret@h",
            CacheSpec("redis", host="h", username="mx", password="secret"),
        ),
        (
            "redis://h?password_file=/etc/repeld/redis.pw",
            CacheSpec("redis", host="h", password_file="/etc/repeld/redis.pw"),
        ),
    ],
)
def test_parse_cache_url(text: str, expected: CacheSpec) -> None:
    assert parse_cache_url(text) == expected


def test_default_cache_path_is_per_platform() -> None:
    assert default_cache_path() in (
        "/var/lib/repeld/cache.sqlite",
        "/var/db/repeld/cache.sqlite",
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "expected none, memory"),
        ("mysql://h", "expected none, memory"),
        ("/var/lib/repeld/c.db", "expected none, memory"),
        ("sqlite:", "expected sqlite:/ABS/PATH"),
        ("sqlite:cache.db", "must be absolute"),
        ("sqlite://host/c.db", "takes no host"),
        ("sqlite:/var/lib/repeld/", "directory"),
        ("redis://", "host is missing"),
        ("redis://:6379", "host is missing"),
        ("redis://h:0", "1-65535"),
        ("redis://h:99999", "not a valid URL"),
        ("redis://h:port", "not a valid URL"),
        ("redis://h/x", "not a number"),
        ("redis://h/1/2", "/DB"),
        ("redis://h#x", "fragment"),
        ("redis://h?db=1", "unknown parameter"),
        ("redis://h?password_file=pw.txt", "absolute"),
        ("redis://h?password_file=/a&password_file=/b", "twice"),
        ("redis://:s3cret@h?password_file=/etc/pw", "not both"),
    ],
)
def test_parse_cache_url_errors(text: str, reason: str) -> None:
    with pytest.raises(SettingError, match=reason) as info:
        parse_cache_url(text)
    assert info.value.option == "cache"


def test_cache_url_errors_and_str_never_show_the_password() -> None:
    with pytest.raises(SettingError) as info:
        parse_cache_url("redis://mx:s3cret@h?password_file=/etc/pw")
    assert "s3cret" not in str(info.value)
    assert "mx:***@h" in str(info.value)
    spec = parse_cache_url("rediss://mx:s3cret@h:6390/2")
    assert str(spec) == "rediss://mx:***@h:6390/2"
    assert "s3cret" not in repr(spec)


def test_password_file(tmp_path: Path) -> None:
    path = tmp_path / "redis.pw"
    path.write_text("s3cret\nignored second line\n")
    spec = parse_cache_url(f"redis://h?password_file={path}")
    assert spec.read_password() == "s3cret"
    assert parse_cache_url("redis://:inline@h").read_password() == "inline"
    assert parse_cache_url("redis://h").read_password() is None
    path.write_text("")
    with pytest.raises(SettingError, match="empty"):
        spec.read_password()
    missing = parse_cache_url(f"redis://h?password_file={tmp_path}/nope")
    with pytest.raises(SettingError, match="cannot read password file") as info:
        missing.read_password()
    assert info.value.option == "cache"


async def test_make_cache() -> None:
    assert make_cache(parse_cache_url("none")) is None
    cache = make_cache(parse_cache_url("memory"), pass_ttl=5.0, penalty_ttl=1.0)
    assert isinstance(cache, MemoryCache)
    assert (cache.pass_ttl, cache.penalty_ttl) == (5.0, 1.0)


async def test_decided_clients_in_the_lookup_queue_cost_no_trip(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Clients that left before their batch was asked (connect-then-reset floods)
    # took a place in the batch of 1,024: a slow cache then let the queue grow
    # for as long as the flood lasted, and live clients waited behind it.
    from repeld.cache.lookup import BatchedLookups

    cache = MemoryCache(pass_ttl=3600)
    cache.remember_good("192.0.2.7")
    answered: list[tuple[int, CacheVerdict]] = []
    trips: list[int] = []
    live = {500, 1500, 2500}  # one in each slice of 1,024 as it was taken
    lookups: BatchedLookups[int] = BatchedLookups(
        cache,
        lambda item, verdict: answered.append((item, verdict)),
        lambda item: item in live,
        on_trip=lambda _seconds, clients: trips.append(clients),
    )
    for i in range(3000):
        lookups.ask("192.0.2.7" if i == 2500 else f"198.51.100.{i % 250}", i)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lookups.run)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert trips == [3]  # one trip for the three that wait
    assert sorted(answered) == [
        (500, CacheVerdict.UNKNOWN),
        (1500, CacheVerdict.UNKNOWN),
        (2500, CacheVerdict.GOOD),
    ]
    assert len(lookups) == 0

"""The Redis pass cache against a real redis-server: two MX hosts, TTLs, outages, recovery.

Every test starts its own redis-server (no persistence) on a free loopback
port in a temporary directory and kills it at the end; every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import redis
import trio

from repeld.cache.base import CacheVerdict
from repeld.cache.open import make_cache
from repeld.cache.redis import RedisCache
from repeld.cache.spec import parse_cache_url

from ..harness import running_caches
from ..procs import REDIS_SERVER, RedisServer, free_port

GOOD, BAD, UNKNOWN = CacheVerdict.GOOD, CacheVerdict.BAD, CacheVerdict.UNKNOWN

pytestmark = pytest.mark.skipif(
    not os.access(REDIS_SERVER, os.X_OK), reason="redis-server is not installed"
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path, free_port())
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


class Calls:
    """Collects the error and recover callbacks of one cache."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.recoveries: list[str] = []


def make(server: RedisServer, calls: Calls | None = None, **kwargs: object) -> RedisCache:
    options: dict[str, object] = {
        "flush_interval": 0.05,
        "lookup_timeout": 0.1,
        "io_timeout": 0.5,
        "retry_min": 0.1,
        "retry_max": 0.4,
    }
    options.update(kwargs)
    if calls is not None:
        options["on_error"] = calls.errors.append
        options["on_recover"] = calls.recoveries.append
    return RedisCache("127.0.0.1", server.port, **options)  # type: ignore[arg-type]


async def eventually(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not await condition():
            await trio.sleep(0.02)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


def answers(cache: RedisCache, key: str, verdict: CacheVerdict) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await cache.lookup(key) is verdict

    return check


async def timed_lookup(cache: RedisCache, key: str) -> tuple[CacheVerdict, float]:
    started = trio.current_time()
    verdict = await cache.lookup(key)
    return verdict, trio.current_time() - started


async def test_two_mx_hosts_share_passes_and_penalties(server: RedisServer) -> None:
    mx1 = make(server, pass_ttl=3600.0, penalty_ttl=600.0)
    mx2 = make(server, pass_ttl=3600.0, penalty_ttl=600.0)
    direct = server.client()
    async with running_caches(mx1, mx2):
        assert await mx2.lookup("192.0.2.7") is UNKNOWN
        mx1.remember_good("192.0.2.7")
        await eventually(answers(mx2, "192.0.2.7", GOOD))
        ttl = direct.ttl("repeld:pass:192.0.2.7")
        assert 3590 <= ttl <= 3600  # a native Redis expiry: SET ... EX
        stamp = direct.get("repeld:pass:192.0.2.7")
        assert stamp is not None
        assert abs(float(stamp) - time.time()) < 60  # when the verdict was decided

        mx2.remember_bad("2001:db8:1:2::/64")
        await eventually(answers(mx1, "2001:db8:1:2::/64", BAD))
        assert 590 <= direct.ttl("repeld:penalty:2001:db8:1:2::/64") <= 600

        mx1.remember_good("2001:db8:1:2::/64")  # a later pass clears the penalty
        await eventually(answers(mx2, "2001:db8:1:2::/64", GOOD))
        assert direct.exists("repeld:penalty:2001:db8:1:2::/64") == 0

        mx2.remember_bad("192.0.2.7")  # a later early talk replaces the pass
        await eventually(answers(mx1, "192.0.2.7", BAD))
        assert direct.exists("repeld:pass:192.0.2.7") == 0
    names = sorted(n.decode() for n in direct.scan_iter(match="repeld:*"))
    assert names == ["repeld:pass:2001:db8:1:2::/64", "repeld:penalty:192.0.2.7"]
    assert mx1.statistics()["errors"] == mx2.statistics()["errors"] == 0


async def test_short_ttl_expires_in_redis(server: RedisServer) -> None:
    mx1 = make(server, pass_ttl=1.0)
    mx2 = make(server)
    async with running_caches(mx1, mx2):
        mx1.remember_good("192.0.2.9")
        await eventually(answers(mx2, "192.0.2.9", GOOD))
        await eventually(answers(mx2, "192.0.2.9", UNKNOWN), timeout=3.0)


async def test_without_penalties_an_early_talker_loses_its_pass(server: RedisServer) -> None:
    mx1 = make(server)
    mx2 = make(server)
    async with running_caches(mx1, mx2):
        mx1.remember_good("192.0.2.7")
        await eventually(answers(mx2, "192.0.2.7", GOOD))
        mx2.remember_bad("192.0.2.7")
        await eventually(answers(mx1, "192.0.2.7", UNKNOWN))
        assert server.client().exists("repeld:penalty:192.0.2.7") == 0


async def test_redis_killed_and_restarted(server: RedisServer) -> None:
    calls = Calls()
    mx1 = make(server, calls)
    mx2 = make(server)
    async with running_caches(mx1, mx2):
        mx1.remember_good("192.0.2.7")
        await eventually(answers(mx1, "192.0.2.7", GOOD))
        await eventually(answers(mx2, "192.0.2.7", GOOD))

        server.kill()
        for _ in range(20):
            verdict, took = await timed_lookup(mx1, "192.0.2.7")
            assert verdict is UNKNOWN  # down: not cached, the delay applies
            assert took < 0.1 + 0.2
        mx1.remember_good("198.51.100.1")  # queued while down
        assert await mx1.lookup("198.51.100.1") is GOOD
        await trio.sleep(0.5)  # several probes fail meanwhile
        assert len(calls.errors) == 1, calls.errors
        assert "cache redis://127.0.0.1" in calls.errors[0]
        assert calls.recoveries == []

        await trio.to_thread.run_sync(server.start)  # same port, empty data set
        await until(lambda: len(calls.recoveries) == 1)
        assert "reachable again" in calls.recoveries[0]
        await eventually(answers(mx2, "198.51.100.1", GOOD))  # the queue was written
        mx1.remember_good("198.51.100.2")
        await eventually(answers(mx2, "198.51.100.2", GOOD))
        assert len(calls.errors) == 1
        assert len(calls.recoveries) == 1
        assert mx1.statistics()["outages"] == 1


async def _refusing_writes(admin: redis.Redis) -> None:
    """Make the server a read-only replica (of a master that is not there): it
    answers PING and reads, and refuses every write."""
    await trio.to_thread.run_sync(admin.replicaof, "127.0.0.1", str(free_port()))


async def test_a_redis_that_refuses_writes_is_one_outage_until_it_takes_them(
    server: RedisServer,
) -> None:
    # A read-only replica (here: of a master that is not there) answers PING and
    # reads, and refuses every write. The probe's PING alone must not end the
    # outage: that was a cache-error and a cache-recover every retry.
    admin = server.client()
    calls = Calls()
    mx1 = make(server, calls)
    mx2 = make(server)
    async with running_caches(mx1, mx2):
        mx1.remember_good("192.0.2.7")  # stored while Redis takes writes
        await eventually(answers(mx2, "192.0.2.7", GOOD))
        await _refusing_writes(admin)
        mx1.remember_good("192.0.2.8")
        await until(lambda: len(calls.errors) == 1)
        assert "cannot write 1 entries" in calls.errors[0] and "read only" in calls.errors[0]
        await trio.sleep(1.5)  # retry_max 0.4: several probes, each PING answered
        assert len(calls.errors) == 1, calls.errors
        assert calls.recoveries == [], calls.recoveries
        assert mx1.statistics()["outages"] == 1
        assert await mx1.lookup("192.0.2.8") is GOOD  # still queued, still answers
        # Down for its writes alone, Redis still answers lookups (they were off for
        # the whole outage: every client waited the full delay).
        assert await mx1.lookup("192.0.2.7") is GOOD

        await trio.to_thread.run_sync(admin.replicaof, "NO", "ONE")
        await until(lambda: len(calls.recoveries) == 1)
        assert "writing again" in calls.recoveries[0]
        await eventually(answers(mx2, "192.0.2.8", GOOD))  # the kept batch was written
        assert len(calls.errors) == 1 and mx1.statistics()["outages"] == 1
    admin.close()


async def test_a_redis_that_answers_ping_and_refuses_lookups_is_one_outage(
    server: RedisServer,
) -> None:
    # An ACL user that may PING and write but not MGET (a mistake in its rules):
    # every lookup fails. The probe's PING alone ended each outage.
    admin = server.client()
    commands = ["+ping", "+set", "+del", "+multi", "+exec", "+client", "+hello"]
    admin.acl_setuser("mx", enabled=True, passwords=["+secret"], keys=["*"], commands=commands)
    calls = Calls()
    mx1 = make(server, calls, username="mx", password="secret")
    async with running_caches(mx1):
        await until(lambda: len(calls.errors) == 1)
        assert "mget" in calls.errors[0].lower()
        for _ in range(10):  # lookups go to Redis again only once it is back
            assert await mx1.lookup("192.0.2.9") is UNKNOWN
            await trio.sleep(0.15)  # retry_max 0.4: several probes meanwhile
        assert len(calls.errors) == 1 and calls.recoveries == [], calls.recoveries
        admin.acl_setuser("mx", enabled=True, commands=[*commands, "+mget"])
        await until(lambda: len(calls.recoveries) == 1)
        assert mx1.statistics()["outages"] == 1
    admin.close()


async def test_closing_waits_for_the_probes_write_of_the_kept_verdicts(
    server: RedisServer,
) -> None:
    # While Redis refuses writes, the probe writes the kept verdicts itself. A
    # close meanwhile must wait for that write (the flush lock) before it decides
    # what is lost: it counted the batch as dropped and closed the client under it.
    admin = server.client()
    calls = Calls()
    mx1 = make(server, calls)
    async with running_caches(mx1):
        await _refusing_writes(admin)
        mx1.remember_good("192.0.2.8")
        await until(lambda: len(calls.errors) == 1)
        closed = trio.Event()

        async def close() -> None:
            await mx1.aclose()
            closed.set()

        # (the lock held as the probe holds it while it writes)
        async with trio.open_nursery() as nursery, mx1._flush_lock:
            nursery.start_soon(close)
            await trio.sleep(0.3)
            assert not closed.is_set()  # waits for the write in flight
        assert mx1.statistics()["dropped"] == 1  # still refused: lost, and counted
    admin.close()


async def test_a_hung_redis_never_blocks_the_loop(server: RedisServer) -> None:
    calls = Calls()
    mx1 = make(server, calls, threads=2, timeouts_before_down=3)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1

    async with running_caches(mx1), trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        mx1.remember_good("192.0.2.7")
        await eventually(answers(mx1, "192.0.2.7", GOOD))
        await trio.sleep(0.1)  # the write is out of the queue: lookups ask Redis

        server.signal(signal.SIGSTOP)  # alive, connected, silent
        try:
            ticks_before = ticks
            started = trio.current_time()
            for _ in range(10):
                verdict, took = await timed_lookup(mx1, "192.0.2.7")
                assert verdict is UNKNOWN
                assert took < 0.1 + 0.2
            elapsed = trio.current_time() - started
            assert ticks - ticks_before >= elapsed / 0.01 / 3  # the loop kept ticking
            assert len(calls.errors) == 1, calls.errors
            assert "no answer within 100 ms" in calls.errors[0]
            assert mx1.statistics()["timeouts"] == 3  # then down: no more waiting
        finally:
            server.signal(signal.SIGCONT)
        await until(lambda: len(calls.recoveries) == 1)
        await eventually(answers(mx1, "192.0.2.7", GOOD))
        assert len(calls.errors) == 1
        nursery.cancel_scope.cancel()


async def test_redis_down_at_start_then_up(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path, free_port())
    calls = Calls()
    cache = make(srv, calls)
    try:
        async with running_caches(cache):
            await until(lambda: len(calls.errors) == 1)
            assert "unreachable" in calls.errors[0]
            verdict, took = await timed_lookup(cache, "192.0.2.7")
            assert verdict is UNKNOWN
            assert took < 0.1
            await trio.to_thread.run_sync(srv.start)
            await until(lambda: len(calls.recoveries) == 1)
            cache.remember_good("192.0.2.7")
            await trio.sleep(0.2)
            assert srv.client().exists("repeld:pass:192.0.2.7") == 1
            assert len(calls.errors) == 1
    finally:
        srv.kill()


async def test_password_from_a_file(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path, free_port(), password="s3cret-pw")
    srv.start()
    try:
        pw = tmp_path / "redis.pw"
        pw.write_text("s3cret-pw\n")
        spec = parse_cache_url(f"redis://127.0.0.1:{srv.port}/0?password_file={pw}")
        calls = Calls()
        cache = make_cache(spec, on_error=calls.errors.append)
        assert isinstance(cache, RedisCache)
        async with running_caches(cache):
            cache.remember_good("192.0.2.7")
            await cache.flush()
            assert await cache.lookup("192.0.2.7") is GOOD
        assert srv.client().exists("repeld:pass:192.0.2.7") == 1
        assert calls.errors == []

        pw.write_text("wrong-pw\n")
        bad = make_cache(spec, on_error=calls.errors.append)
        assert isinstance(bad, RedisCache)
        async with running_caches(bad):
            await until(lambda: len(calls.errors) == 1)
            assert await bad.lookup("192.0.2.7") is UNKNOWN
        assert "wrong-pw" not in calls.errors[0]
        assert "s3cret" not in calls.errors[0]
    finally:
        srv.kill()


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def _certificate(tmp: Path, name: str, subject_alt_name: str, ca: str) -> tuple[Path, Path]:
    """A certificate and key for `subject_alt_name`, signed by CA `ca` (made if new)."""
    ca_key, ca_cert = tmp / f"{ca}.key", tmp / f"{ca}.pem"
    if not ca_cert.exists():
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", ca_key, "-out", ca_cert, "-subj", f"/CN={ca}",
        )  # fmt: skip
    key, csr, cert = tmp / f"{name}.key", tmp / f"{name}.csr", tmp / f"{name}.pem"
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}"
    )
    ext = tmp / f"{name}.ext"
    ext.write_text(f"subjectAltName={subject_alt_name}\n")
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", ext,
    )  # fmt: skip
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest.mark.parametrize(
    ("subject_alt_name", "signer", "works"),
    [
        ("IP:127.0.0.1", "trusted-ca", True),
        ("DNS:cache.wrong.example", "trusted-ca", False),  # another host's certificate
        ("IP:127.0.0.1", "unknown-ca", False),  # a CA the system does not trust
    ],
)
async def test_rediss_against_a_real_tls_server(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    subject_alt_name: str,
    signer: str,
    works: bool,
) -> None:
    # `rediss://` trusts the system's CAs (here SSL_CERT_FILE, which OpenSSL
    # reads as the system store) and checks the server's name: a certificate of
    # the wrong host, or of a CA nobody trusts, is a cache outage, and no
    # verdict is read from or written to that server.
    trusted_cert, _ = _certificate(tmp_path, "unused", "DNS:unused.example", "trusted-ca")
    cert, key = _certificate(tmp_path, "server", subject_alt_name, signer)
    monkeypatch.setenv("SSL_CERT_FILE", str(trusted_cert.parent / "trusted-ca.pem"))
    srv = RedisServer(tmp_path, free_port(), tls=(cert, key))
    srv.start()
    try:
        calls = Calls()
        cache = make_cache(
            parse_cache_url(f"rediss://127.0.0.1:{srv.port}"),
            on_error=calls.errors.append,
            on_recover=calls.recoveries.append,
        )
        assert isinstance(cache, RedisCache)
        admin = srv.client()
        admin.set("repeld:pass:192.0.2.9", str(int(time.time())), ex=600)
        async with running_caches(cache):
            cache.remember_good("192.0.2.7")
            if works:  # a write and a read, each through TLS
                await until(lambda: admin.exists("repeld:pass:192.0.2.7") == 1)
                assert await cache.lookup("192.0.2.9") is GOOD
            else:
                await until(lambda: len(calls.errors) == 1)
                assert "certificate" in calls.errors[0].lower(), calls.errors
                assert await cache.lookup("192.0.2.9") is UNKNOWN
                await trio.sleep(0.3)  # the writer's retries meanwhile
                assert admin.exists("repeld:pass:192.0.2.7") == 0
        assert len(calls.errors) == (0 if works else 1)
    finally:
        srv.kill()


@pytest.mark.parametrize("tls", [True, False])
def test_rediss_checks_the_servers_host_name(tls: bool) -> None:
    # redis-py checks it by default only from 6.0 on; pyproject allows 5.x,
    # where any certificate of a public CA would do for someone in the path.
    # (With redis-py 6 or later this passes without repeld's own setting: it
    # guards the 5.x that pyproject allows.)
    cache = RedisCache("127.0.0.1", free_port(), tls=tls)
    kwargs = cache._client.connection_pool.connection_kwargs
    assert kwargs.get("ssl_check_hostname", False) is tls


@pytest.mark.parametrize("penalty_ttl", [600.0, None], ids=["penalty", "forget"])
async def test_the_newest_verdict_wins_whichever_host_writes_last(
    server: RedisServer, penalty_ttl: float | None
) -> None:
    # Two MX hosts flush on timers of their own (and one's backlog lands after an
    # outage): a pass decided first and written last replaced a newer penalty, or
    # undid a forget, and the early talker was passed at once for a day.
    now = [time.time()]
    mx1, mx2, reader = (
        make(server, penalty_ttl=penalty_ttl, flush_interval=60.0, wallclock=lambda: now[0])
        for _ in range(3)
    )
    async with running_caches(mx1, mx2, reader):
        mx1.remember_good("192.0.2.7")  # it waited the delay at mx1...
        now[0] += 0.2
        mx2.remember_bad("192.0.2.7")  # ...and talked early at mx2
        await mx2.flush()
        await mx1.flush()  # the older verdict, written last
        assert await reader.lookup("192.0.2.7") is (BAD if penalty_ttl else UNKNOWN)
        now[0] += 0.2
        mx1.remember_good("192.0.2.7")  # a newer pass still wins
        await mx1.flush()
        assert await reader.lookup("192.0.2.7") is GOOD
        now[0] -= 3600  # mx2's clock stepped back: an early talk older than the pass
        mx2.remember_bad("192.0.2.7")
        await mx2.flush()
        assert await reader.lookup("192.0.2.7") is (BAD if penalty_ttl else UNKNOWN)
    direct = server.client()
    names = sorted(n.decode() for n in direct.scan_iter(match="repeld:*"))
    assert names == [f"repeld:{'penalty' if penalty_ttl else 'forget'}:192.0.2.7"]
    assert mx1.statistics()["errors"] == mx2.statistics()["errors"] == 0


async def test_a_redis_without_watch_still_stores_every_verdict(server: RedisServer) -> None:
    # An ACL user (or a proxy) without WATCH: every write failed, an outage for
    # good, and no pass nor penalty stored at all. Written as before the order.
    admin = server.client()
    commands = ["+@read", "+@write", "+@connection", "+multi", "+exec", "-watch"]
    admin.acl_setuser("mx", enabled=True, passwords=["+secret"], keys=["*"], commands=commands)
    calls = Calls()
    mx1 = make(server, calls, username="mx", password="secret", penalty_ttl=600.0)
    async with running_caches(mx1):
        mx1.remember_good("192.0.2.7")
        mx1.remember_bad("2001:db8:1:2::/64")
        await mx1.flush()
        mx1.remember_good("192.0.2.8")
        await mx1.flush()
        assert admin.exists("repeld:pass:192.0.2.7", "repeld:pass:192.0.2.8") == 2
        assert admin.exists("repeld:penalty:2001:db8:1:2::/64") == 1
    (error,) = calls.errors  # said once
    assert "no WATCH" in error and "no permissions to run the 'watch' command" in error
    assert mx1.statistics()["outages"] == 0
    admin.close()


def _watches(admin: redis.Redis) -> int:
    """How many WATCH commands the server has run."""
    return int(admin.info("commandstats").get("cmdstat_watch", {}).get("calls", 0))


async def test_a_write_cut_off_while_watching_is_one_failure_not_five_tries(
    server: RedisServer,
) -> None:
    # redis-py turns a connection lost or timed out while WATCHing into its
    # WatchError: it was taken for another host's write and tried five times, one
    # io_timeout each (a flush, and the shutdown, waited that long).
    admin = server.client()
    calls = Calls()
    mx1 = make(server, calls)
    async with running_caches(mx1):
        await mx1.flush()
        before = _watches(admin)
        admin.client_pause(3000, all=False)  # writes only, as FAILOVER does
        mx1.remember_good("192.0.2.7")
        await mx1.flush()
        assert len(calls.errors) == 1
        assert "keys changed" not in calls.errors[0] and "imeout" in calls.errors[0]
        admin.client_unpause()
        after = _watches(admin)
        assert after - before == 1
    admin.close()


async def test_a_forget_leaves_a_penalty_and_a_stamp_from_the_future_orders_nothing(
    server: RedisServer,
) -> None:
    admin = server.client()
    with_penalties = make(server, penalty_ttl=600.0)
    without = make(server)
    async with running_caches(with_penalties, without):
        with_penalties.remember_bad("192.0.2.7")
        await with_penalties.flush()
        without.remember_bad("192.0.2.7")  # a host with penalties off: a forget
        await without.flush()
        assert await with_penalties.lookup("192.0.2.7") is BAD  # the penalty stands
        # A host whose clock was a year ahead wrote this; passes now are "older".
        admin.set("repeld:forget:192.0.2.9", str(time.time() + 365 * 86400), ex=600)
        without.remember_good("192.0.2.9")
        await without.flush()
        assert await without.lookup("192.0.2.9") is GOOD
    admin.close()

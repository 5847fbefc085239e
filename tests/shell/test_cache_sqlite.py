"""The SQLite pass cache on real files: batches, restarts, expiry, sharing, and locks."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from repeld.cache.base import CacheError, CacheVerdict
from repeld.cache.sqlite import SqliteCache

from ..harness import running_caches

GOOD, BAD, UNKNOWN = CacheVerdict.GOOD, CacheVerdict.BAD, CacheVerdict.UNKNOWN


def rows(path: Path) -> dict[str, tuple[int, float]]:
    """What is in the file, read by a connection of its own (WAL: never waits)."""
    conn = sqlite3.connect(path)
    try:
        return {k: (v, e) for k, v, e in conn.execute("SELECT key, verdict, expires FROM cache")}
    finally:
        conn.close()


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "cache.sqlite"


async def test_a_pass_is_written_in_a_batch_and_seen_by_another_instance(db: Path) -> None:
    a = SqliteCache(str(db), pass_ttl=3600.0, flush_interval=0.05)
    b = SqliteCache(str(db), flush_interval=0.05)
    async with running_caches(a, b):
        before = time.time()
        a.remember_good("192.0.2.7")
        assert await a.lookup("192.0.2.7") is GOOD  # queued verdicts answer at once
        await wait_for(lambda: "192.0.2.7" in rows(db))
        verdict, expires = rows(db)["192.0.2.7"]
        assert verdict == 1
        assert before + 3600.0 <= expires <= time.time() + 3600.0  # wall-clock epoch
        assert await b.lookup("192.0.2.7") is GOOD
        assert await b.lookup("192.0.2.8") is UNKNOWN
        assert a.statistics()["written"] == 1
        assert a.statistics()["pending"] == 0
    # A rollback journal, no WAL: no -wal, and above all no memory-mapped -shm (issue 11).
    assert [p.name for p in cache_files(db)] == ["cache.sqlite", "cache.sqlite-journal"]
    assert (db.parent / "cache.sqlite-journal").stat().st_size == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1


async def test_a_full_batch_is_written_before_the_interval(db: Path) -> None:
    cache = SqliteCache(str(db), flush_interval=60.0, batch_size=10)
    async with running_caches(cache):
        for i in range(10):
            cache.remember_good(f"192.0.2.{i}")
        await wait_for(lambda: len(rows(db)) == 10, timeout=2.0)


async def test_entries_survive_a_restart(db: Path) -> None:
    first = SqliteCache(str(db), flush_interval=60.0, penalty_ttl=600.0)
    async with running_caches(first):
        first.remember_good("192.0.2.7")
        first.remember_bad("2001:db8:1:2::/64")
    # Only aclose wrote them (the interval is a minute): nothing queued is lost.
    assert set(rows(db)) == {"192.0.2.7", "2001:db8:1:2::/64"}
    second = SqliteCache(str(db))
    async with running_caches(second):
        assert await second.lookup("192.0.2.7") is GOOD
        assert await second.lookup("2001:db8:1:2::/64") is BAD


async def test_last_verdict_wins_and_no_penalty_means_forget(db: Path) -> None:
    with_penalty = SqliteCache(str(db), penalty_ttl=600.0, flush_interval=60.0)
    reader = SqliteCache(str(db))
    async with running_caches(with_penalty, reader):
        with_penalty.remember_bad("k")
        await with_penalty.flush()
        assert await reader.lookup("k") is BAD
        with_penalty.remember_good("k")  # a pass clears the penalty
        await with_penalty.flush()
        assert await reader.lookup("k") is GOOD
    without = SqliteCache(str(db), flush_interval=60.0)
    async with running_caches(without):
        without.remember_bad("k")  # an early talker is never left marked good
        assert await without.lookup("k") is UNKNOWN
        await without.flush()
        assert rows(db)["k"][0] == 0  # forgotten: a row of its own, answered UNKNOWN


async def test_expiry_on_the_injected_wall_clock_and_sweep(db: Path) -> None:
    now = [1_000_000.0]
    cache = SqliteCache(str(db), pass_ttl=10.0, flush_interval=60.0, wallclock=lambda: now[0])
    async with running_caches(cache):
        cache.remember_good("a")
        await cache.flush()
        now[0] += 9.9
        assert await cache.lookup("a") is GOOD
        now[0] += 0.1
        assert await cache.lookup("a") is UNKNOWN  # expired though not yet swept
        assert "a" in rows(db)
        assert await cache.sweep() == 1
        assert rows(db) == {}
        assert cache.statistics()["swept"] == 1


async def test_run_sweeps_rows_whose_time_has_passed(db: Path) -> None:
    async with running_caches(SqliteCache(str(db))):  # creates the schema
        pass
    past = time.time() - 1.0
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO cache (key, verdict, expires) VALUES (?, ?, ?)",
            [(f"old{i}", 1, past) for i in range(25)]
            + [("fresh", 1, time.time() + 600), ("odd", 7, time.time() + 600)],
        )
    conn.close()
    cache = SqliteCache(str(db), sweep_interval=0.05, sweep_chunk=10)
    async with running_caches(cache):
        assert await cache.lookup("old3") is UNKNOWN
        # (The rows go with the last chunk's COMMIT, the count once sweep() returns.)
        await wait_for(lambda: cache.statistics()["swept"] == 25)
        assert set(rows(db)) == {"fresh", "odd"}
        assert await cache.lookup("fresh") is GOOD
        assert await cache.lookup("odd") is UNKNOWN  # a verdict this repeld does not know


async def test_two_processes_share_the_file(db: Path) -> None:
    parent = SqliteCache(str(db), flush_interval=0.05)
    child_script = textwrap.dedent(
        """
        import sys, trio
        from repeld.cache.base import CacheVerdict
        from repeld.cache.sqlite import SqliteCache

        async def main(path: str) -> int:
            cache = SqliteCache(path, flush_interval=60.0)
            async with trio.open_nursery() as nursery:
                await nursery.start(cache.run)
                seen = await cache.lookup("198.51.100.1")
                cache.remember_good("198.51.100.2")
                nursery.cancel_scope.cancel()
            await cache.aclose()
            return 0 if seen is CacheVerdict.GOOD else 3

        sys.exit(trio.run(main, sys.argv[1]))
        """
    )
    async with running_caches(parent):
        parent.remember_good("198.51.100.1")
        await parent.flush()
        with trio.fail_after(30):
            child = await trio.run_process(
                [sys.executable, "-c", child_script, str(db)], check=False
            )
        assert child.returncode == 0, "the child did not see the parent's pass"
        assert await parent.lookup("198.51.100.2") is GOOD  # the child's pass


async def test_lookups_never_block_the_loop_while_another_writer_holds_the_lock(
    db: Path,
) -> None:
    errors: list[str] = []
    recoveries: list[str] = []
    cache = SqliteCache(
        str(db),
        lookup_timeout=0.1,
        flush_interval=0.05,
        busy_timeout=0.6,
        on_error=errors.append,
        on_recover=recoveries.append,
    )
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.01)
            ticks += 1

    async with running_caches(cache), trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        cache.remember_good("stored")
        await cache.flush()
        assert await cache.lookup("stored") is GOOD

        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process's write transaction
        try:
            cache.remember_good("queued")
            await trio.sleep(0.15)  # the worker is now inside a write, waiting on the lock
            ticks_before = ticks
            started = trio.current_time()
            verdict = await cache.lookup("stored")
            took = trio.current_time() - started
            assert verdict is UNKNOWN  # the worker is busy: not cached, hold the client
            assert took < 0.3
            assert ticks - ticks_before >= 3  # the loop kept running meanwhile
            assert await cache.lookup("queued") is GOOD  # queued verdicts still answer
            assert cache.statistics()["timeouts"] >= 1
            # The write gives up after busy_timeout, once per outage however often it fails.
            await wait_for(lambda: len(errors) == 1, timeout=5.0)
            await trio.sleep(1.5)
            assert len(errors) == 1
            assert "database is locked" in errors[0]
            assert "queued" not in rows(db)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await wait_for(lambda: len(recoveries) == 1, timeout=5.0)
        assert "working again" in recoveries[0]
        await wait_for(lambda: "queued" in rows(db))
        assert await cache.lookup("stored") is GOOD
        assert cache.statistics()["outages"] == 1
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("trouble", ["no directory yet", "not a database"])
async def test_a_path_unusable_at_start_is_an_outage_until_it_can_be_opened(
    tmp_path: Path, trouble: str
) -> None:
    # It was "cache off until restart": every client waited every time for as long
    # as repeld ran, though the directory came (a mount) or the file was mended.
    if trouble == "no directory yet":
        directory = tmp_path / "not" / "yet"
        path = directory / "cache.sqlite"

        def mend() -> None:
            directory.mkdir(parents=True)

    else:
        path = tmp_path / "junk.sqlite"
        path.write_bytes(b"this is not an SQLite database, not even close" * 100)
        mend = path.unlink
    errors: list[str] = []
    recoveries: list[str] = []
    cache = SqliteCache(
        str(path), flush_interval=0.05, on_error=errors.append, on_recover=recoveries.append
    )
    async with running_caches(cache):
        (error,) = errors
        assert f"cache sqlite:{path}: cannot open the cache database: " in error
        assert await cache.lookup("k") is UNKNOWN
        cache.remember_good("k")  # queued meanwhile
        mend()
        await wait_for(lambda: recoveries != [])
        await wait_for(lambda: "k" in rows(path))
    assert len(errors) == 1


async def test_another_version_s_file_stays_refused_at_start(db: Path) -> None:
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    cache = SqliteCache(str(db))
    async with trio.open_nursery() as nursery:
        with pytest.raises(CacheError, match=r"cannot open the cache database .*schema version 99"):
            await nursery.start(cache.run)
    assert await cache.lookup("k") is UNKNOWN  # never opened: every lookup is a miss
    await cache.aclose()


async def test_a_file_locked_at_start_is_opened_once_the_lock_goes(db: Path) -> None:
    # A backup (sqlite3 .backup) or an admin's sqlite3 shell holding a transaction
    # for longer than busy_timeout (1 s) while repeld starts.
    async with running_caches(SqliteCache(str(db))):
        pass
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    errors: list[str] = []
    recoveries: list[str] = []
    cache = SqliteCache(
        str(db), flush_interval=0.1, on_error=errors.append, on_recover=recoveries.append
    )
    try:
        async with running_caches(cache):
            assert len(errors) == 1 and "locked" in errors[0]
            holder.execute("COMMIT")
            cache.remember_good("192.0.2.9")
            await wait_for(lambda: recoveries != [])
            await wait_for(lambda: "192.0.2.9" in rows(db))
    finally:
        holder.close()


async def test_a_file_an_older_repeld_left_in_wal_mode_is_converted(db: Path) -> None:
    old = sqlite3.connect(db, isolation_level=None)  # what repeld before issue 11 made
    old.execute("PRAGMA journal_mode = WAL")
    old.execute("CREATE TABLE cache (key TEXT PRIMARY KEY, verdict INTEGER, expires REAL)")
    old.execute("INSERT INTO cache VALUES ('192.0.2.1', 1, 1e12)")
    try:  # still open in WAL mode: leaving WAL needs the file to itself
        refused = SqliteCache(str(db), busy_timeout=0.1)
        async with trio.open_nursery() as nursery:
            with pytest.raises(CacheError, match=r"cannot leave WAL mode.*older repeld"):
                await nursery.start(refused.run)
        await refused.aclose()
    finally:
        old.close()
    cache = SqliteCache(str(db))
    async with running_caches(cache):
        assert await cache.lookup("192.0.2.1") is GOOD
    assert [p.name for p in cache_files(db)] == ["cache.sqlite", "cache.sqlite-journal"]


async def test_after_close_lookups_miss_and_writes_are_dropped(db: Path) -> None:
    cache = SqliteCache(str(db))
    async with running_caches(cache):
        pass
    assert await cache.lookup("k") is UNKNOWN
    cache.remember_good("k")
    assert cache.statistics()["dropped"] == 1
    assert rows(db) == {}


async def test_a_row_another_writer_garbled_is_a_cache_error_not_a_crash(db: Path) -> None:
    errors: list[str] = []
    cache = SqliteCache(str(db), on_error=errors.append)
    async with running_caches(cache):
        with sqlite3.connect(db) as conn:  # SQLite keeps text in an INTEGER column
            conn.execute(
                "INSERT INTO cache (key, verdict, expires) VALUES ('192.0.2.9', 'x', 1e12)"
            )
        assert await cache.lookup("192.0.2.9") is UNKNOWN
        assert await cache.lookup_many(["192.0.2.9", "192.0.2.10"]) == [UNKNOWN, UNKNOWN]
        assert len(errors) == 1
        assert "lookup failed" in errors[0] and "ValueError" in errors[0]
        assert cache.statistics()["errors"] >= 1


# -- files that change under a running cache (issue 11 item 3) ----------------------


def chattr_works(directory: Path) -> str | None:
    """Why `chattr +i` cannot be tested in `directory` (None: it can)."""
    if shutil.which("chattr") is None:
        return "chattr is not installed"
    probe = directory / "chattr-probe"
    probe.write_text("")
    try:
        done = subprocess.run(["chattr", "+i", str(probe)], capture_output=True, check=False)
        if done.returncode != 0:
            return f"chattr +i is not supported here: {done.stderr.decode().strip()}"
        subprocess.run(["chattr", "-i", str(probe)], check=True)
        return None
    finally:
        probe.unlink()


def chattr(flag: str, files: list[Path]) -> None:
    subprocess.run(["chattr", flag, *map(str, files)], check=True)


def cache_files(db: Path) -> list[Path]:
    """The cache file and whatever SQLite keeps next to it."""
    return sorted(db.parent.glob(db.name + "*"))


#: A cache in a child process, so that a signal (SIGBUS) is a failed test, not a dead
#: pytest: it writes, makes its files immutable with chattr +i, keeps writing and looking
#: up, makes them writable again, and prints what it saw as JSON.
IMMUTABLE_CHILD = textwrap.dedent(
    """
    import json, subprocess, sys, trio
    from pathlib import Path
    from repeld.cache.sqlite import SqliteCache

    async def main(path: str) -> None:
        errors, recoveries = [], []
        cache = SqliteCache(path, flush_interval=0.05, busy_timeout=0.2,
                            on_error=errors.append, on_recover=recoveries.append)
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            for i in range(300):
                cache.remember_good(f"192.0.2.{i}")
            await cache.flush()
            files = sorted(str(p) for p in Path(path).parent.glob(Path(path).name + "*"))
            subprocess.run(["chattr", "+i", *files], check=True)
            try:
                seen = []
                for round in range(20):  # enough to grow any WAL index past its first page
                    for i in range(300):
                        cache.remember_good(f"10.{round}.{i // 256}.{i % 256}")
                    await cache.flush()
                    seen.append(str(await cache.lookup("192.0.2.7")))
            finally:
                subprocess.run(["chattr", "-i", *files], check=True)
            with trio.fail_after(10):
                while not recoveries:
                    await trio.sleep(0.05)
            await cache.flush()
            after = str(await cache.lookup("10.19.1.0"))
            nursery.cancel_scope.cancel()
        await cache.aclose()
        print(json.dumps({"errors": errors, "recoveries": recoveries, "seen": seen,
                          "after": after, "files": files}))

    trio.run(main, sys.argv[1])
    """
)


def test_immutable_cache_files_are_a_cache_error_not_a_signal(db: Path) -> None:
    reason = chattr_works(db.parent)
    if reason is not None:
        pytest.skip(reason)
    try:
        child = subprocess.run(
            [sys.executable, "-c", IMMUTABLE_CHILD, str(db)],
            capture_output=True,
            timeout=60,
            check=False,
        )
    finally:
        chattr("-i", cache_files(db))  # whatever happened, pytest must be able to clean up
    assert child.returncode == 0, (
        f"the cache process died (returncode {child.returncode}; "
        f"{-child.returncode if child.returncode < 0 else 0} is the signal): "
        f"{child.stderr.decode()[-2000:]}"
    )
    report = json.loads(child.stdout)
    assert len(report["errors"]) == 1, report["errors"]  # one per outage
    assert "cannot write" in report["errors"][0]
    assert len(report["recoveries"]) == 1
    assert set(report["seen"]) <= {"CacheVerdict.GOOD", "CacheVerdict.UNKNOWN"}
    assert report["after"] == "CacheVerdict.GOOD"  # the kept batch was written afterwards
    assert "10.19.1.0" in rows(db)


async def test_a_file_replaced_or_deleted_while_running_is_reopened(db: Path) -> None:
    errors: list[str] = []
    cache = SqliteCache(str(db), flush_interval=0.05, on_error=errors.append)
    async with running_caches(cache):
        cache.remember_good("192.0.2.1")
        await cache.flush()
        other = db.parent / "other.sqlite"
        async with running_caches(SqliteCache(str(other))):  # a cache file of its own
            pass
        with sqlite3.connect(other) as conn:
            conn.execute("INSERT INTO cache (key, verdict, expires) VALUES ('192.0.2.2', 1, 1e12)")
        conn.close()
        os.replace(other, db)  # another inode at the path, as a restore from backup does
        await wait_for(lambda: "192.0.2.2" in rows(db))
        with trio.fail_after(5):
            while await cache.lookup("192.0.2.2") is not GOOD:
                await trio.sleep(0.02)
        assert await cache.lookup("192.0.2.1") is UNKNOWN  # it was in the old file only
        cache.remember_good("192.0.2.3")
        await cache.flush()
        assert set(rows(db)) == {"192.0.2.2", "192.0.2.3"}  # written to the new file

        for path in cache_files(db):  # deleted: the cache starts a fresh, empty file
            path.unlink()
        with trio.fail_after(5):
            while not db.exists():
                await trio.sleep(0.02)
        assert await cache.lookup("192.0.2.2") is UNKNOWN
        cache.remember_good("192.0.2.4")
        await cache.flush()
        assert set(rows(db)) == {"192.0.2.4"}
    assert errors == []  # reopening is not an outage


async def test_a_truncated_file_is_one_cache_error_then_it_works_again(db: Path) -> None:
    errors: list[str] = []
    recoveries: list[str] = []
    cache = SqliteCache(
        str(db), flush_interval=0.05, on_error=errors.append, on_recover=recoveries.append
    )
    async with running_caches(cache):
        cache.remember_good("192.0.2.1")
        await cache.flush()
        assert await cache.lookup("192.0.2.1") is GOOD
        os.truncate(db, 0)  # the same inode, empty
        assert await cache.lookup("192.0.2.1") is UNKNOWN
        await wait_for(lambda: len(recoveries) == 1)  # reopened: the schema is back
        assert len(errors) == 1 and "lookup failed" in errors[0]
        cache.remember_good("192.0.2.5")
        await cache.flush()
        assert await cache.lookup("192.0.2.5") is GOOD
        assert set(rows(db)) == {"192.0.2.5"}
    assert len(errors) == 1


async def test_a_file_overwritten_with_garbage_is_reported_once_until_removed(db: Path) -> None:
    errors: list[str] = []
    recoveries: list[str] = []
    cache = SqliteCache(
        str(db), flush_interval=0.05, on_error=errors.append, on_recover=recoveries.append
    )
    async with running_caches(cache):
        cache.remember_good("192.0.2.1")
        await cache.flush()
        size = db.stat().st_size
        with db.open("r+b") as f:  # the same inode, nonsense from the first byte
            f.write(b"\xde\xad\xbe\xef" * (size // 4))
        assert await cache.lookup("192.0.2.1") is UNKNOWN
        cache.remember_good("192.0.2.6")
        await trio.sleep(0.5)  # ten rounds of the writer, each trying to reopen it
        assert len(errors) == 1, errors
        assert "not a database" in errors[0]
        assert await cache.lookup("192.0.2.6") is GOOD  # still queued, still answers
        assert recoveries == []
        for path in cache_files(db):  # the admin removes it: a fresh file, and the batch
            path.unlink()
        await wait_for(lambda: len(recoveries) == 1)
        await wait_for(lambda: "192.0.2.6" in rows(db))
    assert len(errors) == 1


async def _garble_key_index(db: Path, keys: list[str], *, leaf: bool) -> None:
    """A cache file remembering `keys`, then its key index's root page garbled
    (`leaf`: the root's right-most child instead, one leaf among many)."""
    first = SqliteCache(str(db))
    async with running_caches(first):
        for key in keys:
            first.remember_good(key)
        await first.flush()
    with sqlite3.connect(db) as conn:
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'sqlite_autoindex_cache_1'"
        ).fetchone()
    conn.close()
    with db.open("r+b") as f:
        f.seek(page * (root - 1))
        if leaf:
            interior = f.read(page)
            assert interior[0] == 2  # an interior page of the index: its right-most child
            f.seek(page * (int.from_bytes(interior[8:12], "big") - 1))
        f.write(b"\xde\xad\xbe\xef" * (page // 4))


async def test_a_corrupt_index_is_one_outage_however_the_probe_reads(db: Path) -> None:
    # The key index garbled, the table intact: every lookup fails ("malformed"),
    # while the writer's probe, which reads the table's first row, succeeds. That
    # probe is no proof that lookups work: it ended the outage every round, and
    # the next lookup began another.
    await _garble_key_index(db, [f"192.0.2.{i}" for i in range(50)], leaf=False)
    errors: list[str] = []
    recoveries: list[str] = []
    cache = SqliteCache(
        str(db), flush_interval=0.05, on_error=errors.append, on_recover=recoveries.append
    )
    async with running_caches(cache):
        for _ in range(10):  # ten rounds of the writer's probe, a lookup in each
            assert await cache.lookup("192.0.2.3") is UNKNOWN
            await trio.sleep(0.06)
        assert len(errors) == 1 and "malformed" in errors[0], errors
        assert recoveries == []
        assert cache.statistics()["outages"] == 1
        for path in cache_files(db):  # the admin removes it: a fresh file
            path.unlink()
        await wait_for(lambda: len(recoveries) == 1)
        cache.remember_good("192.0.2.3")
        await cache.flush()
        assert await cache.lookup("192.0.2.3") is GOOD
    assert len(errors) == 1


async def test_a_few_bad_index_pages_are_one_outage_while_lookups_keep_failing(
    db: Path,
) -> None:
    # One leaf of the key index garbled among many: lookups of some keys fail,
    # of others work. Each lookup that worked ended the outage and the next that
    # failed began another; while the failures keep coming it is one outage.
    keys = [f"10.0.{i // 256}.{i % 256}" for i in range(5000)]
    await _garble_key_index(db, keys, leaf=True)
    errors: list[str] = []
    recoveries: list[str] = []
    cache = SqliteCache(
        str(db),
        flush_interval=0.05,
        # A loaded box (CI) can take longer than 0.1 s for a thread hop, and a
        # lookup given up on answers UNKNOWN: this is about outages, not speed.
        lookup_timeout=5.0,
        on_error=errors.append,
        on_recover=recoveries.append,
    )
    async with running_caches(cache):
        for _ in range(20):  # returning clients of both kinds, 20 a second
            assert await cache.lookup(min(keys)) is GOOD  # on the index's first leaf
            assert await cache.lookup(max(keys)) is UNKNOWN  # on the garbled last
            await trio.sleep(0.05)
        assert len(errors) == 1 and "malformed" in errors[0], errors
        assert recoveries == [] and cache.statistics()["outages"] == 1


#: A cache in a child process running as nobody (root writes to a mode 0444 file):
#: it writes, makes its files read-only, writes again, makes them writable again.
READ_ONLY_CHILD = textwrap.dedent(
    """
    import json, os, sys, trio
    from pathlib import Path
    from repeld.cache.sqlite import SqliteCache

    async def main(path: str) -> None:
        errors, recoveries = [], []
        cache = SqliteCache(path, flush_interval=0.05, on_error=errors.append,
                            on_recover=recoveries.append)
        async with trio.open_nursery() as nursery:
            await nursery.start(cache.run)
            cache.remember_good("192.0.2.1")
            await cache.flush()
            files = list(Path(path).parent.glob(Path(path).name + "*"))
            for f in files:
                f.chmod(0o444)
            for i in range(10):
                cache.remember_good(f"192.0.2.{10 + i}")
                await cache.flush()
            seen = str(await cache.lookup("192.0.2.1"))
            before = len(errors)
            for f in files:
                f.chmod(0o644)
            with trio.fail_after(10):
                while not recoveries:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        await cache.aclose()
        print(json.dumps({"errors": errors, "before": before, "recoveries": recoveries,
                          "seen": seen, "files": sorted(f.name for f in files)}))

    trio.run(main, sys.argv[1])
    """
)


def test_a_file_made_read_only_is_one_cache_error_and_lookups_go_on(tmp_path: Path) -> None:
    command = [sys.executable, "-c", READ_ONLY_CHILD]
    if os.geteuid() == 0:  # root writes to a mode 0444 file: drop what lets it
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv is not installed")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command]
    db = tmp_path / "cache.sqlite"
    try:
        child = subprocess.run([*command, str(db)], capture_output=True, timeout=60, check=False)
        assert child.returncode == 0, child.stderr.decode()[-2000:]
        report = json.loads(child.stdout)
        assert report["files"] == ["cache.sqlite", "cache.sqlite-journal"]
        assert len(report["errors"]) == 1, report["errors"]
        assert report["before"] == 1
        assert "cannot write" in report["errors"][0]
        assert report["seen"] == "CacheVerdict.GOOD"  # reading a read-only file works
        assert len(report["recoveries"]) == 1
        assert {f"192.0.2.{10 + i}" for i in range(10)} <= set(rows(db))
    finally:
        for path in cache_files(db):
            path.chmod(0o644)


@contextlib.contextmanager
def small_filesystem(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` mounted at `where` (skips the test where mount is refused)."""
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def fill(directory: Path) -> Path:
    """A file that takes every free byte of `directory`'s file system."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(100_000):  # bounded: far more than a small tmpfs holds
            try:
                os.write(fd, b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    return filler


async def _fill_up(cache: SqliteCache, small: Path, errors: list[str]) -> Path:
    """192.0.2.1's pass written, then the file system filled and 2,000 passes
    queued (new pages: more than the file has room for) until the one outage is
    said; the filler, whose removal gives the space back."""
    cache.remember_good("192.0.2.1")
    await cache.flush()
    filler = fill(small)
    for i in range(2000):
        cache.remember_good(f"10.0.{i // 256}.{i % 256}")
    await wait_for(lambda: len(errors) == 1)
    return filler


async def test_a_talker_loses_its_stored_pass_though_the_queue_filled_with_passes(
    tmp_path: Path,
) -> None:
    # A long outage (here a full disk) fills the write queue with passes; the
    # early talk of a client with a stored pass must still take that pass away.
    errors: list[str] = []
    recoveries: list[str] = []
    with small_filesystem(tmp_path / "small", "256k") as small:
        db = small / "cache.sqlite"
        cache = SqliteCache(
            str(db),
            flush_interval=0.05,
            max_pending=100,
            on_error=errors.append,
            on_recover=recoveries.append,
        )
        async with running_caches(cache):
            filler = await _fill_up(cache, small, errors)
            cache.remember_bad("192.0.2.1")  # penalties off: forget its pass
            assert await cache.lookup("192.0.2.1") is UNKNOWN
            filler.unlink()
            await wait_for(lambda: len(recoveries) == 1)
            assert rows(db)["192.0.2.1"][0] == 0  # forgotten
            assert await cache.lookup("192.0.2.1") is UNKNOWN
            # the passes beyond room, and one for the forget
            assert cache.statistics()["dropped"] == 2000 + 1 - 100


async def test_a_full_disk_is_one_cache_error_and_space_back_is_cache_recover(
    tmp_path: Path,
) -> None:
    errors: list[str] = []
    recoveries: list[str] = []
    with small_filesystem(tmp_path / "small", "256k") as small:
        db = small / "cache.sqlite"
        cache = SqliteCache(
            str(db), flush_interval=0.05, on_error=errors.append, on_recover=recoveries.append
        )
        async with running_caches(cache):
            filler = await _fill_up(cache, small, errors)
            assert "full" in errors[0], errors
            assert await cache.lookup("192.0.2.1") is GOOD  # reading goes on
            assert await cache.lookup("10.0.7.207") is GOOD  # the kept batch answers
            await cache.sweep()  # deleting nothing works on a full disk: no proof of writes
            assert recoveries == []
            await trio.sleep(0.5)
            assert len(errors) == 1  # one per outage
            assert recoveries == []
            filler.unlink()  # space is back
            await wait_for(lambda: len(recoveries) == 1)
            assert len(rows(db)) == 2001
            assert cache.statistics()["dropped"] == 0
        assert len(errors) == 1


async def test_an_outage_with_a_full_batch_waiting_is_retried_each_interval(
    tmp_path: Path,
) -> None:
    # A failed batch goes back to the queue; with a full batch (256) waiting, the
    # writer's wait returned at once and it retried without a pause, a core busy
    # for the whole outage (thousands of reopen and write attempts a second).
    directory = tmp_path / "cache"
    directory.mkdir()
    errors: list[str] = []
    cache = SqliteCache(str(directory / "cache.sqlite"), flush_interval=0.2, on_error=errors.append)
    async with running_caches(cache):
        cache.remember_good("192.0.2.1")
        await cache.flush()
        shutil.rmtree(directory)  # the directory gone: no reopen, no write
        for i in range(300):
            cache.remember_good(f"198.51.100.{i}" if i < 256 else f"203.0.113.{i - 256}")
        before = cache.statistics()["errors"]
        await trio.sleep(1.0)
        tries = cache.statistics()["errors"] - before
        assert 1 <= tries <= 15, tries  # about two a flush interval, not thousands
        assert len(errors) == 1  # one outage
        directory.mkdir()  # back: every verdict written, none lost to the retries

        def written() -> int:
            try:
                return len(rows(directory / "cache.sqlite"))
            except sqlite3.Error:  # not made yet, or its table not yet
                return 0

        await wait_for(lambda: written() == 300)


@pytest.mark.parametrize("penalty_ttl", [600.0, None], ids=["penalty", "forget"])
async def test_the_newest_verdict_wins_whichever_process_writes_last(
    db: Path, penalty_ttl: float | None
) -> None:
    # Two processes (the --workers) flush on timers of their own: a pass decided
    # first but written last overwrote a newer penalty (or undid a forget), and
    # the early talker was passed at once for a day. So did a backlog written
    # after an outage.
    now = [1_000_000.0]
    first, second, reader = (
        SqliteCache(str(db), penalty_ttl=penalty_ttl, flush_interval=60.0, wallclock=lambda: now[0])
        for _ in range(3)
    )
    async with running_caches(first, second, reader):
        first.remember_good("192.0.2.7")  # it waited the delay on one worker...
        now[0] += 0.2
        second.remember_bad("192.0.2.7")  # ...and talked early on the other
        await second.flush()
        await first.flush()  # the older verdict, written last
        expected = BAD if penalty_ttl else UNKNOWN
        assert await reader.lookup("192.0.2.7") is expected
        now[0] += 0.2
        first.remember_good("192.0.2.7")  # a newer pass still wins
        await first.flush()
        assert await reader.lookup("192.0.2.7") is GOOD
        now[0] -= 3600  # the clock stepped back: an early talk is older than the pass
        second.remember_bad("192.0.2.7")
        await second.flush()
        assert await reader.lookup("192.0.2.7") is expected  # never left marked patient


async def test_a_file_of_the_previous_schema_gets_the_decision_time(db: Path) -> None:
    old = sqlite3.connect(db, isolation_level=None)  # what repeld made before
    old.execute(
        "CREATE TABLE cache (key TEXT PRIMARY KEY, verdict INTEGER NOT NULL, expires REAL NOT NULL)"
    )
    old.execute("INSERT INTO cache VALUES ('192.0.2.1', 1, 1e12)")
    old.execute("PRAGMA user_version = 1")
    old.close()
    cache = SqliteCache(str(db), flush_interval=60.0)
    async with running_caches(cache):
        assert await cache.lookup("192.0.2.1") is GOOD  # kept
        cache.remember_bad("192.0.2.1")  # newer than any row it had
        await cache.flush()
        assert await cache.lookup("192.0.2.1") is UNKNOWN
    with contextlib.closing(sqlite3.connect(db)) as conn:
        # Still 1: an older repeld opens the file (its writes decided at 0).
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert "decided" in {row[1] for row in conn.execute("PRAGMA table_info(cache)")}


async def test_a_verdict_decided_in_the_future_does_not_block_the_passes_after_it(
    db: Path,
) -> None:
    # A host booted with its clock a year ahead wrote a forget decided then; once
    # the clock was set right, every later pass was "older" and the client waited
    # at every connection for a year.
    now = [1_000_000.0 + 365 * 86400]
    cache = SqliteCache(str(db), flush_interval=60.0, wallclock=lambda: now[0])
    async with running_caches(cache):
        cache.remember_bad("192.0.2.7")  # penalties off: a forget, a year ahead
        await cache.flush()
        now[0] = 1_000_000.0  # NTP stepped the clock back
        cache.remember_good("192.0.2.7")
        await cache.flush()
        assert await cache.lookup("192.0.2.7") is GOOD


def test_processes_opening_an_older_file_at_once_add_the_column_once(tmp_path: Path) -> None:
    from repeld.cache.sqlite import _open

    for trial in range(30):  # the race was lost about once in 30 openings
        path = tmp_path / f"v1-{trial}.sqlite"
        with contextlib.closing(sqlite3.connect(path)) as old:
            old.execute("CREATE TABLE cache (key TEXT PRIMARY KEY, verdict INTEGER, expires REAL)")
            old.execute("PRAGMA user_version = 1")
            old.commit()
        failures: list[BaseException] = []

        def open_it(path: Path = path, failures: list[BaseException] = failures) -> None:
            try:
                conn, _ = _open(str(path), 5.0)
                conn.close()
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert failures == [], failures


async def test_a_forget_leaves_a_penalty_another_process_wrote(db: Path) -> None:
    # Processes with and without --penalty-ttl on one file: a forget erased the
    # penalty, and a banned talker was held for the delay instead of reset (a
    # Redis forget leaves the penalty key).
    with_penalties = SqliteCache(str(db), penalty_ttl=600.0, flush_interval=60.0)
    without = SqliteCache(str(db), flush_interval=60.0)
    async with running_caches(with_penalties, without):
        with_penalties.remember_bad("192.0.2.7")
        await with_penalties.flush()
        without.remember_bad("192.0.2.7")
        await without.flush()
        assert await with_penalties.lookup("192.0.2.7") is BAD
        without.remember_good("192.0.2.7")  # a full wait still clears it
        await without.flush()
        assert await with_penalties.lookup("192.0.2.7") is GOOD

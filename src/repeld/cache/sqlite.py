"""The pass cache in an SQLite file: one host, survives restarts (`--cache sqlite:PATH`).

The default backend. Defaults to /var/lib/repeld/cache.sqlite on Linux and
/var/db/repeld/cache.sqlite on FreeBSD (`cache.default_cache_path`); the
directory must exist and be writable by repeld.

Never blocking the event loop: every SQLite call runs in a worker thread
through `trio.to_thread.run_sync` with a CapacityLimiter(1) of this cache's
own, so at most one thread touches the one connection at a time (hence
`check_same_thread=False`; the OS thread may differ between calls, the
connection is never used by two at once). A lookup waits for that worker at
most `lookup_timeout` (default 0.1 s); when the worker is busy -- typically a
write waiting on another process's lock for up to `busy_timeout` -- the lookup
answers UNKNOWN and the client is simply held (safe). A lookup cut off while
its query runs is abandoned; the thread keeps the limiter until it returns,
so the connection still has a single user.

Writes are queued by `remember_good` / `remember_bad` (coalesced per key) and
written by `run` in one transaction every `flush_interval` (0.5 s) or as soon as
`batch_size` (256) verdicts wait; lookups see queued verdicts at once. A failed
batch is kept for the next round (bounded by `max_pending`). `run` also deletes
expired rows every `sweep_interval` (600 s), in chunks so lookups interleave.

Several repeld processes on one host share the file (the --workers, or several
repeld): a rollback journal in TRUNCATE mode (cache.sqlite-journal, empty between
writes), `busy_timeout` for readers and writers, and short write transactions
(BEGIN IMMEDIATE, one batch, COMMIT). Not for NFS.

Why no WAL (issue 11): WAL keeps its index in cache.sqlite-shm, a file every
process maps shared and writes through the map, even to start a read. A write
that the kernel refuses through a map is not an error code but a signal: made
immutable (chattr +i), the next store into the page kills repeld with SIGBUS;
so does a -shm that cannot grow on a full tmpfs, or one truncated under us.
Nothing here may answer a file problem with a signal, so repeld maps nothing:
`mmap_size = 0` too (a map of the database would SIGBUS on a truncated file).
The alternatives weighed: `locking_mode = EXCLUSIVE` keeps the WAL index in the
heap but locks every other process out of the file (the workers share it); the
`unix-excl` VFS does the same; `unix-none` drops locking altogether, and with it
the safety of sharing. A rollback journal costs little here: lookups are single
SELECTs, writes are one batch every `flush_interval`, and a reader waits for a
COMMIT (an exclusive lock held for a few milliseconds) at most `busy_timeout`,
while the lookup itself gives up after `lookup_timeout`. Measured on 2 shared
cores with 40,000 rows (three interleaved runs each, WAL before, TRUNCATE after):
a one-key lookup p50 70-150 us either way (the thread hop dominates); a 100-key
batch p50 250-370 vs 250-510 us; with another process writing 256 verdicts every
50 ms, the 100-key p99 rose from 0.4-0.9 ms to 2-4 ms (a reader waits out the
writer's COMMIT), still far under the lookup timeout. `synchronous = FULL`,
as a rollback journal wants it to survive a power cut. TRUNCATE rather than
DELETE: no directory entry created and removed per batch. A file an older repeld
left in WAL mode is converted on open (that needs every old process gone).

A file that changes under the running cache is noticed by `run`, every
`flush_interval`: deleted or replaced (another inode at the path: st_dev,
st_ino) it is reopened (a missing one is created afresh, empty); while the cache
is down a file that no longer even reads (truncated, overwritten with garbage)
is reopened too, which recreates the schema of a truncated file. A file that
still reads (immutable, read-only, a full disk) keeps its connection, so lookups
go on; its failing writes are the one `on_error`, the batch is kept, and the
first write that works again is the `on_recover`.

Schema (PRAGMA user_version = 1)::

    CREATE TABLE cache (
        key     TEXT PRIMARY KEY,   -- cache.cache_key(): 192.0.2.7, 2001:db8::/64
        verdict INTEGER NOT NULL,   -- CacheVerdict: 1 GOOD (passed), 2 BAD (penalty),
                                    -- 0 forgotten (an early talker, no penalties)
        expires REAL NOT NULL,      -- wall-clock Unix time, seconds
        decided REAL NOT NULL DEFAULT 0  -- when the verdict was made, wall clock
    );
    CREATE INDEX cache_expires ON cache (expires);

A pass replaces a row only if decided as late or later (`_UPSERT`): the
processes sharing the file flush on timers of their own, and one's backlog
after an outage may land long after another's newer penalty. A penalty or a
forget always replaces it, and so does anything a row decided in the writer's
future (more than `FUTURE_SLACK` ahead: a clock that was wrong when it was
written). A file made before the column is given it on open, in the schema's
own transaction (its rows decided at 0); the version stays 1, so an older
repeld still opens the file (its writes are decided at 0).

Expiries are wall-clock (`wallclock`, default `time.time`) because monotonic
time means nothing after a restart; a clock step only shortens or lengthens
what is remembered. A row whose `expires` has passed is never answered, swept
or not. Errors reach `on_error` once per outage (a failed write, sweep or
lookup) and `on_recover` once when the database works again.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence

import trio

from repeld.cache.base import (
    DEFAULT_PASS_TTL,
    CacheError,
    CacheStats,
    CacheVerdict,
    Callback,
    OutageNotice,
    PendingWrites,
    QueuedVerdicts,
    Write,
)

__all__ = ["JOURNAL_MODE", "RECOVER_QUIET", "SCHEMA_VERSION", "SqliteCache"]

SCHEMA_VERSION = 1

#: A stored verdict decided more than this far in a writer's future was written
#: by a clock that was wrong then: any verdict replaces it.
FUTURE_SLACK = 300.0

#: The rollback journal, kept as an empty cache.sqlite-journal between writes.
JOURNAL_MODE = "TRUNCATE"
#: An outage ends only after this many seconds without a failure: lookups go on
#: while the cache is down, and a file with a few bad pages fails some and not
#: others (one outage while the failures keep coming, not one per failure).
RECOVER_QUIET = 2.0

_TABLE = """
CREATE TABLE IF NOT EXISTS cache (
    key     TEXT PRIMARY KEY,
    verdict INTEGER NOT NULL,
    expires REAL NOT NULL,
    decided REAL NOT NULL DEFAULT 0
)
"""
#: A file made before the decision time: its rows count as decided at 0.
_ADD_DECIDED = "ALTER TABLE cache ADD COLUMN decided REAL NOT NULL DEFAULT 0"
_INDEX = "CREATE INDEX IF NOT EXISTS cache_expires ON cache (expires)"

#: A pass replaces the stored verdict only if it was decided as late or later: two
#: processes flush out of the order they decided in (each every `flush_interval`,
#: or a backlog after an outage), and a pass decided before a penalty must not
#: undo it. A penalty or a forget always replaces it: an early talker is never
#: left marked patient, not even by a clock stepped back (the other way round, a
#: penalty decided before a pass and written after it, costs a patient client one
#: more delay, or with --penalty-ttl that long cut off). A row decided in the
#: writer's future (the last parameter) is replaced by anything. A forget is a
#: row too (verdict 0, answered UNKNOWN), which outlives any pass decided before it
#: and leaves a penalty that a process with penalties on wrote (as Redis does).
_UPSERT = """
INSERT INTO cache (key, verdict, expires, decided) VALUES (?, ?, ?, ?)
ON CONFLICT (key) DO UPDATE
SET verdict = excluded.verdict, expires = excluded.expires, decided = excluded.decided
WHERE (excluded.verdict != 1 OR excluded.decided >= cache.decided OR cache.decided > ?)
AND NOT (excluded.verdict = 0 AND cache.verdict = 2)
"""


def _open(path: str, busy_timeout: float) -> tuple[sqlite3.Connection, _Identity]:
    """Connect, check and set up the file; the connection and the file's identity.

    Runs in the worker thread. No memory map anywhere (see the module docstring):
    no WAL (its -shm index is a shared map) and `mmap_size = 0`.
    """
    conn = sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        conn.execute("PRAGMA mmap_size = 0")  # a build may map by default
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise CacheError(f"schema version {version}, this repeld knows {SCHEMA_VERSION}")
        try:
            mode = conn.execute(f"PRAGMA journal_mode = {JOURNAL_MODE}").fetchone()[0]
        except sqlite3.OperationalError as exc:  # leaving WAL needs the file to itself
            raise CacheError(
                f"cannot leave WAL mode ({exc}): stop every older repeld using the file"
            ) from None
        if str(mode).lower() != JOURNAL_MODE.lower():
            raise CacheError(f"cannot use journal mode {JOURNAL_MODE} (it stays {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        _set_up(conn)
        identity = _identity(path)
    except BaseException:
        conn.close()
        raise
    return conn, identity


def _set_up(conn: sqlite3.Connection) -> None:
    """The table, its decision time and its index, in one write transaction:
    processes opening an older file at once add the column once."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_TABLE)
        if "decided" not in {row[1] for row in conn.execute("PRAGMA table_info(cache)")}:
            conn.execute(_ADD_DECIDED)
        conn.execute(_INDEX)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


#: What names a file: (st_dev, st_ino); None when nothing is at the path.
_Identity = tuple[int, int] | None


def _identity(path: str) -> _Identity:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


#: What a failed SQLite call may raise, caught at this boundary: not only sqlite3.Error
#: but anything (a row another writer garbled makes `int()` raise ValueError), so that
#: no cache trouble reaches the server (issue 11). Never BaseException.
_ERRORS = (Exception,)


def _describe(exc: Exception) -> str:
    """An error for the cache-error event: its message, with its type if not SQLite's."""
    if isinstance(exc, sqlite3.Error | OSError):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


#: Keys per SELECT ... IN (...): well under SQLite's 999-parameter floor.
_SELECT_CHUNK = 500


def _verdict(stored: int | None) -> CacheVerdict:
    """What a stored value means (a value this repeld does not know: not cached)."""
    try:
        return CacheVerdict(stored) if stored is not None else CacheVerdict.UNKNOWN
    except ValueError:
        return CacheVerdict.UNKNOWN


class SqliteCache(QueuedVerdicts):
    """A `PassCache` in an SQLite file; see the module docstring."""

    def __init__(
        self,
        path: str,
        *,
        pass_ttl: float = DEFAULT_PASS_TTL,
        penalty_ttl: float | None = None,
        on_error: Callback | None = None,
        on_recover: Callback | None = None,
        lookup_timeout: float = 0.1,
        flush_interval: float = 0.5,
        batch_size: int = 256,
        max_pending: int = 100_000,
        sweep_interval: float = 600.0,
        sweep_chunk: int = 2000,
        busy_timeout: float = 1.0,
        close_timeout: float = 5.0,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        if pass_ttl <= 0 or (penalty_ttl is not None and penalty_ttl <= 0):
            raise ValueError("TTLs must be positive")
        self.path = path
        self.pass_ttl = pass_ttl
        self.penalty_ttl = penalty_ttl
        self.lookup_timeout = lookup_timeout
        self.flush_interval = flush_interval
        self.sweep_interval = sweep_interval
        self.sweep_chunk = sweep_chunk
        self.busy_timeout = busy_timeout
        self.close_timeout = close_timeout
        self._wallclock = wallclock
        self._limiter = trio.CapacityLimiter(1)
        self._conn: sqlite3.Connection | None = None
        self._file: _Identity = None  # what self._conn has open
        self._pending = PendingWrites(max_pending, batch_size)
        self._flush_lock = trio.Lock()
        self._notice = OutageNotice(on_error, on_recover, quiet=RECOVER_QUIET)
        self._stats = CacheStats()
        self._closed = False

    def __str__(self) -> str:
        return f"sqlite:{self.path}"

    # -- the worker thread's side (never called from trio directly) ----------------

    def _select(self, keys: Sequence[str], now: float) -> dict[str, int]:
        conn = self._conn
        if conn is None:
            return {}
        found: dict[str, int] = {}
        for start in range(0, len(keys), _SELECT_CHUNK):  # under SQLite's parameter limit
            chunk = keys[start : start + _SELECT_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT key, verdict FROM cache WHERE expires > ? AND key IN ({marks})",
                (now, *chunk),
            )
            found.update((str(key), int(verdict)) for key, verdict in rows)
        return found

    def _write(self, batch: dict[str, Write]) -> None:
        conn = self._conn
        if conn is None:
            raise sqlite3.ProgrammingError("the cache database is closed")
        future = self._wallclock() + FUTURE_SLACK
        rows = [(k, v.value, e, self._decided(v, e), future) for k, (v, e) in batch.items()]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_UPSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _sweep_chunk(self, now: float) -> int:
        conn = self._conn
        if conn is None:
            return 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            cur = conn.execute(
                "DELETE FROM cache WHERE rowid IN"
                " (SELECT rowid FROM cache WHERE expires <= ? LIMIT ?)",
                (now, self.sweep_chunk),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return cur.rowcount

    def _probe(self) -> None:
        conn = self._conn
        if conn is None:
            raise sqlite3.ProgrammingError("the cache database is not open")
        conn.execute("SELECT count(*) FROM (SELECT 1 FROM cache LIMIT 1)").fetchone()

    def _reopen(self) -> None:
        # The old connection stays until the new one works: a flush meanwhile waits
        # for this thread instead of finding no connection and writing nothing.
        try:
            conn, file = _open(self.path, self.busy_timeout)
        except BaseException:
            self._close()  # never go on with a file that is gone or broken
            raise
        old, self._conn, self._file = self._conn, conn, file  # never None in between
        if old is not None:
            old.close()

    def _check(self, down: bool) -> bool:
        """Reopen a file replaced or deleted under us, or one that fails while down;
        True if it was reopened.

        A file that still reads (immutable, read-only, a full disk) keeps its
        connection: lookups go on and the failing writes speak for themselves.
        Raises what reopening (or, when down, the probe after it) raised.
        """
        reopened = False
        if self._conn is not None:
            now = _identity(self.path)
            if now is None or now != self._file:
                self._reopen()  # deleted, or another file renamed over it
                reopened = True
        if not down:
            return reopened
        try:
            self._probe()
        except _ERRORS:  # truncated, garbled, closed: start over (the schema, too)
            self._reopen()
            self._probe()
            reopened = True
        return reopened

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- health ----------------------------------------------------------------------

    def _failed(self, what: str, exc: Exception, kind: str) -> None:
        self._stats.errors += 1
        self._notice.failed(f"cache {self}: {what}: {_describe(exc)}", kind)

    def _ok(self, kind: str) -> None:
        # The outage ends once every kind that failed in it has worked since: a
        # probe that reads the table's first row proves nothing of a lookup.
        self._notice.ok(f"cache {self}: working again", kind)

    # -- the PassCache API -------------------------------------------------------------

    async def lookup(self, key: str) -> CacheVerdict:
        return (await self.lookup_many([key]))[0]

    async def lookup_many(self, keys: Sequence[str]) -> list[CacheVerdict]:
        now = self._wallclock()
        # Verdicts still waiting to be written answer first: they are the newest.
        answers = [self._pending.get(key, now) for key in keys]
        missing = [key for key, answer in zip(keys, answers, strict=True) if answer is None]
        stored: dict[str, int] = {}
        if missing and self._conn is not None:
            with trio.move_on_after(self.lookup_timeout) as scope:
                try:
                    stored = await trio.to_thread.run_sync(
                        self._select, missing, now, limiter=self._limiter, abandon_on_cancel=True
                    )
                except _ERRORS as exc:
                    self._failed("lookup failed", exc, OutageNotice.READ)
                else:
                    self._ok(OutageNotice.READ)
            if scope.cancelled_caught:
                self._stats.timeouts += 1
        else:
            await trio.lowlevel.checkpoint()
        return [
            self._stats.count(answer if answer is not None else _verdict(stored.get(key)))
            for key, answer in zip(keys, answers, strict=True)
        ]

    async def flush(self) -> None:
        """Write the queued verdicts now (run does this every flush_interval)."""
        async with self._flush_lock:
            if self._conn is None or not self._pending.queued:
                return
            batch = self._pending.take()
            written = False
            try:
                await trio.to_thread.run_sync(self._write, batch, limiter=self._limiter)
                written = True
            except _ERRORS as exc:
                self._failed(f"cannot write {len(batch)} entries", exc, OutageNotice.WRITE)
            finally:
                self._batch_ended(len(batch), written)
            if written:
                self._ok(OutageNotice.WRITE)

    async def sweep(self) -> int:
        """Delete expired rows now (run does this every sweep_interval); how many went."""
        total = 0
        while self._conn is not None:
            try:
                n = await trio.to_thread.run_sync(
                    self._sweep_chunk, self._wallclock(), limiter=self._limiter
                )
            except _ERRORS as exc:
                self._failed("cannot sweep expired entries", exc, OutageNotice.WRITE)
                break
            total += n
            if n < self.sweep_chunk:
                if not self._pending:  # a batch that failed has yet to be written
                    self._ok(OutageNotice.WRITE)
                break
        self._stats.swept += total
        return total

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the database, then write batches, sweep, and notice recovery.

        Raises CacheError before `started()` if the file is not one this repeld
        may use (another schema version, a journal mode it cannot leave). Any
        other failure to open it is an outage, tried again each flush interval
        as at run time: locked past `busy_timeout` (a backup, an admin's sqlite3
        shell), a directory not there or not writable yet, a broken file.
        """
        if self._closed:
            raise CacheError(f"cache {self} is closed")
        if self._conn is None:
            try:
                await trio.to_thread.run_sync(self._reopen, limiter=self._limiter)
            except CacheError as exc:
                raise CacheError(f"cannot open the cache database {self.path}: {exc}") from None
            except _ERRORS as exc:  # every client waits meanwhile, as without a cache
                self._failed("cannot open the cache database", exc, OutageNotice.OPEN)
        task_status.started()
        next_sweep = trio.current_time()
        while True:
            if trio.current_time() >= next_sweep:
                await self.sweep()
                next_sweep = trio.current_time() + self.sweep_interval
            if self._notice.up:
                await self._pending.wait(self.flush_interval)
            else:  # a failed batch is queued again: a full one must not be retried at once
                await trio.sleep(self.flush_interval)
            await self._check_file()
            if self._pending.queued:
                await self.flush()

    async def _check_file(self) -> None:
        """Reopen the file if it changed or the cache is down; report a recovery."""
        down = not self._notice.up
        try:
            reopened = await trio.to_thread.run_sync(self._check, down, limiter=self._limiter)
        except _ERRORS as exc:
            self._failed("cannot reopen the cache database", exc, OutageNotice.OPEN)
            return
        if not down:
            return
        self._ok(OutageNotice.OPEN)
        if reopened:  # started over: what failed to read is gone with the old file
            self._ok(OutageNotice.READ)
        if not self._pending:  # else the next write tells (one in flight, too)
            self._ok(OutageNotice.WRITE)

    async def aclose(self) -> None:
        """Write what is queued (at most close_timeout) and close the database."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.close_timeout):
                await self.flush()
            self._stats.dropped += len(self._pending)
            self._pending = PendingWrites()
            with trio.move_on_after(self.close_timeout) as scope:
                try:
                    await trio.to_thread.run_sync(self._close, limiter=self._limiter)
                except _ERRORS:
                    pass  # closing: nothing left to lose
            if scope.cancelled_caught:
                self._conn = None  # a stuck thread still holds it; it closes when freed

    def statistics(self) -> dict[str, int]:
        stats = self._stats.as_dict()
        stats["outages"] = self._notice.outages
        stats["pending"] = len(self._pending)
        return stats

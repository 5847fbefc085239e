"""The pass cache in Redis: several MX hosts share one cache (`--cache redis://...`).

`--cache redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?password_file=/ABS/PATH]`,
or `rediss://...` for TLS (system CA store, host name checked). Port 6379 and
database 0 unless told. Give the password in a file (`password_file`, its
first line, read once at start) rather than in the URL: the command line is
visible to every local user. No password: none is sent. USER is for Redis 6
ACLs.

Keys, all with a native Redis expiry, written `SET <name> <unix-time> EX <ttl>`::

    repeld:pass:<key>      a client that waited the whole delay  (EX --cache-ttl)
    repeld:penalty:<key>   an early talker, only with --penalty-ttl (EX --penalty-ttl)
    repeld:forget:<key>    an early talker, penalties off: its pass forgotten
                           (EX --cache-ttl; never looked up)

`<key>` is `cache.cache_key()`: `192.0.2.7`, or `2001:db8:1:2::/64` for IPv6.
The value is the Unix time the verdict was decided; a lookup counts only the
key's presence. A write WATCHes the batch's keys, reads their values, and in
one MULTI/EXEC sets each verdict's key and deletes the other two; a pass only
if decided as late as the stored verdict or later: the hosts flush on timers of
their own (and one's backlog lands after an outage), and a pass decided before
a penalty must not undo it (the hosts' clocks order them: keep them in NTP
time). A penalty or a forget always replaces it: an early talker is never left
marked patient, not even by a clock stepped back. An EXEC that another host's
write spoiled is tried again, WATCH_TRIES times. If a pass and a penalty key
exist anyway, BAD wins. A lookup is one MGET of the pass and penalty names.
Inspect with `redis-cli --scan --pattern 'repeld:*'` and `TTL`; clearing a
client is `DEL repeld:pass:<key> repeld:penalty:<key>`. The `repeld` prefix is
the `namespace` argument.

The client: redis-py's synchronous client, each command run in
`trio.to_thread.run_sync` under a `trio.CapacityLimiter(threads)` (default 4)
of this cache's own. Why this and not something else:

* redis-py's asyncio client needs an asyncio event loop; under trio that means
  trio-asyncio, which this project rules out.
* The sync client is redis-py's main, complete path -- TLS, ACL users, RESP,
  pooling, error types. A home-made RESP client on trio sockets would be
  natively cancellable, but it would be one more protocol for repeld to own.
* Its blocking is bounded on every side: socket connect and read timeouts
  (`io_timeout`, 1 s) bound how long a thread can be stuck; redis-py's own
  retries are off (the cache has its own reconnect); the limiter bounds the
  threads, and the pool (`max_connections = threads`) the connections.
* The loop never waits on it: a lookup waits for a free thread and the answer
  at most `lookup_timeout` (0.1 s), then answers UNKNOWN and abandons the
  thread (`abandon_on_cancel=True`), which ends within `io_timeout` and keeps
  its limiter token until then, so threads never pile up beyond `threads`.

Outages: a Redis error, or `timeouts_before_down` (3) lookup timeouts in a
row, marks Redis down: ONE `on_error(message)`. While down for its lookups (or
unreachable), lookups answer UNKNOWN at once without touching Redis (the delay
applies, which is safe); down for its writes alone, it is still asked;
verdicts stay queued (bounded by `max_pending`), and `run` probes with PING
every `retry_min` (0.5 s) doubling to `retry_max` (10 s). A probe whose PING
answers, then a lookup's MGET within `lookup_timeout`, ends the outage: ONE
`on_recover`, then the queue is written. An outage that began with a refused write (a full Redis
under `noeviction`, a read-only replica) needs more than a PING: the probe then
writes the queued batch too, and only its success ends the outage, so a Redis
that answers PING and refuses writes is one outage, not one every half second.
redis-py reconnects its pooled connections by itself.
Expiries are Redis's, so the hosts' clocks do not matter for them; the
injectable `wallclock` only dates the values and the time a verdict waited in
the queue.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from repeld.cache.base import (
    DEFAULT_PASS_TTL,
    CacheStats,
    CacheVerdict,
    Callback,
    OutageNotice,
    PendingWrites,
    QueuedVerdicts,
    Write,
)
from repeld.cache.spec import CacheSpec
from repeld.core.addresses import host_port

__all__ = ["DEFAULT_NAMESPACE", "RedisCache"]

DEFAULT_NAMESPACE = "repeld"

#: How many times a batch is read and written again while other hosts keep changing
#: its keys between the read and the write (WATCH); then it is a failed write.
WATCH_TRIES = 5


#: A stored verdict decided more than this far in a writer's future was written
#: by a clock that was wrong then: it orders nothing.
FUTURE_SLACK = 300.0


def _stamp(value: bytes | str | None, future: float) -> float:
    """When a stored verdict was decided: its value; 0 if none, not a number, or
    later than `future`."""
    try:
        stamp = float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
    return stamp if stamp <= future else 0.0


#: What a failed Redis call can raise through redis-py: anything, at this boundary.
#: Not only RedisError and OSError: what a malformed reply (`*garbage`) raises
#: depends on redis-py's version (ValueError from its parser in some, InvalidResponse
#: in 8.x), and whatever a Redis-lookalike makes it raise must not reach the
#: server (issue 11). Never BaseException: cancellation and KeyboardInterrupt pass.
_ERRORS = (Exception,)


def _describe(exc: Exception) -> str:
    """An error for the cache-error event: its message, with its type if not a Redis one."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, redis.RedisError | OSError):
        return text
    return f"{type(exc).__name__}: {text}"


class RedisCache(QueuedVerdicts):
    """A `PassCache` in Redis; see the module docstring."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 6379,
        *,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        tls: bool = False,
        pass_ttl: float = DEFAULT_PASS_TTL,
        penalty_ttl: float | None = None,
        on_error: Callback | None = None,
        on_recover: Callback | None = None,
        lookup_timeout: float = 0.1,
        io_timeout: float = 1.0,
        threads: int = 4,
        flush_interval: float = 0.5,
        batch_size: int = 256,
        max_pending: int = 100_000,
        retry_min: float = 0.5,
        retry_max: float = 10.0,
        timeouts_before_down: int = 3,
        namespace: str = DEFAULT_NAMESPACE,
        close_timeout: float = 2.0,
        wallclock: Callable[[], float] = time.time,
        label: str | None = None,
    ) -> None:
        if pass_ttl <= 0 or (penalty_ttl is not None and penalty_ttl <= 0):
            raise ValueError("TTLs must be positive")
        if threads < 1 or timeouts_before_down < 1:
            raise ValueError("threads and timeouts_before_down must be positive")
        self.pass_ttl = pass_ttl
        self.penalty_ttl = penalty_ttl
        self.lookup_timeout = lookup_timeout
        self.io_timeout = io_timeout
        self.flush_interval = flush_interval
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.timeouts_before_down = timeouts_before_down
        self.namespace = namespace
        self.close_timeout = close_timeout
        self.label = label or f"{'rediss' if tls else 'redis'}://{host_port(host, port)}/{db}"
        self._wallclock = wallclock
        self._client = redis.Redis(
            host=host,
            port=port,
            db=db,
            username=username,
            password=password,
            ssl=tls,
            # redis-py checks the certificate's host name by default only from
            # 6.0 on, and pyproject allows 5.x: said, not assumed.
            ssl_check_hostname=tls,
            socket_timeout=io_timeout,
            socket_connect_timeout=io_timeout,
            retry=Retry(NoBackoff(), 0),
            max_connections=threads,
            client_name="repeld",
        )
        self._limiter = trio.CapacityLimiter(threads)
        self._pending = PendingWrites(max_pending, batch_size)
        self._flush_lock = trio.Lock()
        self._notice = OutageNotice(on_error, on_recover)
        self._stats = CacheStats()
        self._slow = 0  # lookup timeouts in a row
        self._closed = False
        #: Whether this Redis has WATCH (not behind some proxies, nor for an ACL
        #: user without it): without, a pass is written without being compared
        #: with a newer verdict, as before the comparison; `on_error` says so once.
        self._watch = True
        self._no_watch = ""
        self._on_error = on_error

    @classmethod
    def from_spec(cls, spec: CacheSpec, **kwargs: Any) -> RedisCache:
        """A cache for a parsed `--cache redis://...`; reads the password file now."""
        if spec.kind != "redis":
            raise ValueError(f"not a Redis cache: {spec}")
        return cls(
            spec.host,
            spec.port,
            db=spec.db,
            username=spec.username,
            password=spec.read_password(),
            tls=spec.tls,
            label=str(spec),
            **kwargs,
        )

    def __str__(self) -> str:
        return self.label

    def pass_name(self, key: str) -> str:
        """The Redis key of a pass: `repeld:pass:<key>`."""
        return f"{self.namespace}:pass:{key}"

    def penalty_name(self, key: str) -> str:
        """The Redis key of a penalty: `repeld:penalty:<key>`."""
        return f"{self.namespace}:penalty:{key}"

    def forget_name(self, key: str) -> str:
        """The Redis key of a forgotten pass (penalties off): `repeld:forget:<key>`."""
        return f"{self.namespace}:forget:{key}"

    # -- the worker threads' side ------------------------------------------------------

    def _mget(self, names: list[str]) -> list[bytes | str | None]:
        return list(self._client.mget(names))

    def _write(self, batch: dict[str, Write], now: float) -> None:
        # WATCH the batch's keys, read when their verdicts were decided, and write
        # in one MULTI/EXEC only the verdicts decided as late or later; EXEC fails
        # if another host wrote one of them meanwhile, and the batch is read again.
        items = list(batch.items())
        names = [
            name
            for key, _ in items
            for name in (self.pass_name(key), self.penalty_name(key), self.forget_name(key))
        ]
        future = now + FUTURE_SLACK
        for _ in range(WATCH_TRIES):
            with self._client.pipeline(transaction=True) as pipe:
                try:
                    stamps: list[Any] = [None] * len(names)
                    if self._watch:
                        try:
                            pipe.watch(*names)  # type: ignore[no-untyped-call]
                        except redis.ResponseError as exc:
                            text = str(exc).lower()
                            if not isinstance(exc, redis.exceptions.NoPermissionError) and (
                                "unknown command" not in text
                            ):
                                raise  # a passing error: a failed write, tried again
                            self._watch = False  # none here (a proxy, an ACL user)
                            self._no_watch = _describe(exc)
                        else:
                            stamps = pipe.mget(names)
                    pipe.multi()
                    for i, (key, (verdict, expires)) in enumerate(items):
                        decided = self._decided(verdict, expires)
                        # (A stamp in the writer's future came from a clock wrong then.)
                        newest = max(_stamp(v, future) for v in stamps[3 * i : 3 * i + 3])
                        if verdict is CacheVerdict.GOOD and newest > decided:
                            continue  # a pass older than what is stored: it stays
                        self._queue_write(pipe, key, verdict, decided, math.ceil(expires - now))
                    pipe.execute()
                    return
                except redis.WatchError as exc:
                    lost = redis.ConnectionError | redis.TimeoutError | OSError
                    if isinstance(exc.__context__, lost):
                        # redis-py's word for a connection lost while watching: not
                        # another host's write, and no reason to try five times.
                        raise exc.__context__ from None
        raise redis.WatchError(f"its keys changed under {WATCH_TRIES} tries in a row")

    def _queue_write(
        self, pipe: Any, key: str, verdict: CacheVerdict, decided: float, ttl: int
    ) -> None:
        # The verdict's own key set (valued when it was decided), the others deleted;
        # a forget leaves a penalty that a host with penalties on wrote.
        names = {
            CacheVerdict.GOOD: self.pass_name(key),
            CacheVerdict.BAD: self.penalty_name(key),
            CacheVerdict.UNKNOWN: self.forget_name(key),
        }
        for kind, name in names.items():
            if kind is verdict:
                if ttl > 0:
                    pipe.set(name, f"{decided:.6f}", ex=ttl)
            elif not (verdict is CacheVerdict.UNKNOWN and kind is CacheVerdict.BAD):
                pipe.delete(name)

    def _ping(self) -> None:
        self._client.ping()

    # -- health ----------------------------------------------------------------------

    def _failed(self, message: str, kind: str = OutageNotice.READ) -> None:
        self._stats.errors += 1
        self._notice.failed(f"cache {self.label}: {message}", kind)

    async def _probe(self) -> str | None:
        """None if Redis answers a PING, then a lookup's MGET within lookup_timeout;
        else why not. The MGET is what lookups send: a Redis that answers PING and
        refuses MGET (an ACL user without it, a proxy) has not recovered."""
        names = [self.pass_name("probe"), self.penalty_name("probe")]
        try:
            with trio.move_on_after(3 * self.io_timeout) as scope:
                await trio.to_thread.run_sync(
                    self._ping, limiter=self._limiter, abandon_on_cancel=True
                )
            if scope.cancelled_caught:
                return "no answer to PING"
            values: object = None
            with trio.move_on_after(self.lookup_timeout) as scope:
                values = await trio.to_thread.run_sync(
                    self._mget, names, limiter=self._limiter, abandon_on_cancel=True
                )
            if scope.cancelled_caught:
                return f"a lookup takes longer than {self.lookup_timeout * 1000:.0f} ms"
            if not isinstance(values, list) or len(values) != len(names):
                # As a lookup judges it (_fetch): a look-alike's short answer.
                return f"MGET of {len(names)} names answered {_count(values)}"
        except _ERRORS as exc:
            return _describe(exc)
        return None

    # -- the PassCache API -------------------------------------------------------------

    async def lookup(self, key: str) -> CacheVerdict:
        return (await self.lookup_many([key]))[0]

    async def lookup_many(self, keys: Sequence[str]) -> list[CacheVerdict]:
        now = self._wallclock()
        # Verdicts still waiting to be written answer first: they are the newest.
        answers = [self._pending.get(key, now) for key in keys]
        missing = [key for key, answer in zip(keys, answers, strict=True) if answer is None]
        found: dict[str, CacheVerdict] = {}
        # Down for its writes alone (a read-only replica, a Redis full under
        # noeviction), it still answers lookups: ask it; down for lookups, not.
        if missing and not self._closed and not self._notice.failing(OutageNotice.READ):
            found = await self._fetch(missing)
        else:
            await trio.lowlevel.checkpoint()
        return [
            self._stats.count(
                answer if answer is not None else found.get(key, CacheVerdict.UNKNOWN)
            )
            for key, answer in zip(keys, answers, strict=True)
        ]

    async def _fetch(self, keys: list[str]) -> dict[str, CacheVerdict]:
        """One MGET of both names of every key; empty when Redis fails or is slow."""
        names = [name for key in keys for name in (self.pass_name(key), self.penalty_name(key))]
        values: list[bytes | str | None] = []
        with trio.move_on_after(self.lookup_timeout) as scope:
            try:
                values = await trio.to_thread.run_sync(
                    self._mget, names, limiter=self._limiter, abandon_on_cancel=True
                )
            except _ERRORS as exc:
                self._failed(f"lookup failed: {_describe(exc)}")
                return {}
        if scope.cancelled_caught:
            self._stats.timeouts += 1
            self._slow += 1
            if self._slow >= self.timeouts_before_down:
                self._failed(
                    f"{self._slow} lookups in a row got no answer within"
                    f" {self.lookup_timeout * 1000:.0f} ms"
                )
            return {}
        self._slow = 0
        if not isinstance(values, list) or len(values) != len(names):
            # A server that is not quite Redis (a proxy, a look-alike) answered
            # MGET with another count of values: none of them can be trusted.
            self._failed(f"lookup failed: MGET of {len(names)} names answered {_count(values)}")
            return {}
        found: dict[str, CacheVerdict] = {}
        for i, key in enumerate(keys):
            good, bad = values[2 * i], values[2 * i + 1]
            if bad is not None:  # a penalty wins over a pass
                found[key] = CacheVerdict.BAD
            elif good is not None:
                found[key] = CacheVerdict.GOOD
        return found

    async def flush(self) -> None:
        """Write the queued verdicts now, if Redis is up (run does this every flush_interval).

        Waits for a write in flight first (the probe's, while Redis refused writes):
        at close, what it writes is not counted as dropped.
        """
        async with self._flush_lock:
            if self._notice.up:
                await self._write_queued()

    async def _flush(self) -> bool:
        # The probe's write of the kept verdicts, up or not; False if Redis refused.
        async with self._flush_lock:
            return await self._write_queued()

    async def _write_queued(self) -> bool:
        # Write the queued verdicts (the flush lock held); False if Redis refused
        # them (they stay queued).
        if not self._pending.queued:
            return True
        batch = self._pending.take()
        written = False
        try:
            await trio.to_thread.run_sync(
                self._write, batch, self._wallclock(), limiter=self._limiter
            )
            written = True
        except _ERRORS as exc:
            self._failed(f"cannot write {len(batch)} entries: {_describe(exc)}", OutageNotice.WRITE)
        finally:
            self._batch_ended(len(batch), written)
        if self._no_watch and self._on_error is not None:  # said once, from the loop
            why, self._no_watch = self._no_watch, ""
            self._on_error(
                f"cache {self.label}: no WATCH ({why}): passes are written without being"
                " compared with a newer verdict of another host"
            )
        return written

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check Redis, then write batches while it is up and probe it while it is down.

        Starts at once: Redis being down at start is an outage like any other.
        """
        task_status.started()
        why = await self._probe()
        if why is not None:
            self._failed(f"unreachable: {why}")
        delay = self.retry_min
        while True:
            if self._notice.up:
                delay = self.retry_min
                await self._pending.wait(self.flush_interval)
                await self.flush()
                continue
            await trio.sleep(delay)
            delay = min(delay * 2, self.retry_max)
            if await self._probe() is not None:
                self._stats.errors += 1
                continue
            self._slow = 0
            notice = self._notice
            if notice.failing(notice.WRITE) and not self._closed and await self._flush():
                notice.ok(f"cache {self.label}: writing again", notice.WRITE)
            notice.ok(f"cache {self.label}: reachable again", notice.READ)

    async def aclose(self) -> None:
        """Write what is queued if Redis is up (at most close_timeout), then disconnect."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self.close_timeout):
                await self.flush()
            self._stats.dropped += len(self._pending)
            self._pending = PendingWrites()
            with trio.move_on_after(self.close_timeout):
                try:
                    await trio.to_thread.run_sync(
                        self._client.close, limiter=self._limiter, abandon_on_cancel=True
                    )
                except _ERRORS:
                    pass  # closing: nothing left to lose

    def statistics(self) -> dict[str, int]:
        stats = self._stats.as_dict()
        stats["outages"] = self._notice.outages
        stats["pending"] = len(self._pending)
        return stats


def _count(values: object) -> str:
    return f"{len(values)} values" if isinstance(values, list) else type(values).__name__

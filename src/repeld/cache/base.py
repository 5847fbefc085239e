"""The pass cache: clients that waited once skip the delay for a while.

A client that stayed silent through the whole delay and was passed is
remembered as GOOD for the pass TTL (`--cache-ttl`, default one day); while it
is remembered, its connections are passed at once (reason `cache`). With a
penalty TTL (`--penalty-ttl`, off by default) an early talker is remembered as
BAD and cut off at once after accept. Early talkers and hang-ups are never
remembered as good.

This module holds the interface and the parts every backend shares:

* `CacheVerdict` -- GOOD, BAD or UNKNOWN (not remembered, expired, or the
  backend did not answer in time: the delay applies, which is always safe); it
  is the core's own type (core/hold.py), as the hold decides on it;
* `PassCache` -- the protocol the server and the CLI program against;
* `CacheStats`, `OutageNotice`, `QueuedVerdicts`, `PendingWrites` -- counters,
  one report per outage, and the batched writes.

The key a client is remembered under is `core.addresses.cache_key`; the
`--cache` value is parsed by cache/spec.py; the backends are cache/memory.py,
cache/sqlite.py (one host, the default) and cache/redis.py (several MX hosts),
and cache/open.py builds the one chosen, importing only that one.

Rules every backend keeps:

* `lookup` is the only awaited call on a connection's path and is bounded: a
  backend that is slow or down answers UNKNOWN, never an exception.
* `remember_good` / `remember_bad` never block: they queue the write and the
  background task `run` applies it in batches. The queue is bounded, and when
  it is full a pass is what is lost, never a penalty or a "forget" while a
  pass is queued (`PendingWrites`).
* The last verdict wins: a pass clears a penalty and a penalty replaces a
  pass. With penalties off, `remember_bad` still forgets any pass recorded for
  that key, so an early talker is never left marked good.
* Trouble is reported through `on_error(message)` once per outage and
  `on_recover(message)` once when it ends, from the trio thread; the lead turns
  these into events. The callbacks must not raise.
* Time: MemoryCache expires entries on a monotonic clock (default
  `trio.current_time`); SQLite and Redis keep wall-clock expiries (Unix epoch
  seconds, Redis: native key expiry), because monotonic time does not survive a
  restart and is not shared between hosts. Their wall clock is injectable too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import trio

from repeld.core.hold import CacheVerdict

__all__ = [
    "DEFAULT_PASS_TTL",
    "CacheError",
    "CacheStats",
    "CacheVerdict",
    "Callback",
    "OutageNotice",
    "PassCache",
    "PendingWrites",
    "QueuedVerdicts",
    "Write",
]

#: How long a passed client is remembered by default: one day.
DEFAULT_PASS_TTL = 86400.0

Callback = Callable[[str], None]


def _ignore(message: str) -> None:
    """The default error/recover callback: drop the message."""


class CacheError(OSError):
    """A cache backend could not be opened at start (e.g. an unwritable SQLite path).

    An OSError so that the daemon's start-up error path reports it as one line.
    Once running, backends never raise this: they report through `on_error`.
    """


# -- shared machinery ------------------------------------------------------------


@dataclass(slots=True)
class CacheStats:
    """Counters every backend keeps; `statistics()` returns them as a dict.

    lookups: all lookups; good/bad/unknown: their answers (unknown includes
    misses, timeouts and errors); timeouts: lookups cut off by the lookup
    timeout; errors: failed backend operations; outages: error callbacks sent;
    writes: verdicts queued; written: verdicts the backend accepted; dropped:
    verdicts lost (queue full, closed, or failed at shutdown); swept: expired
    entries removed; pending: verdicts queued or in flight right now.
    """

    lookups: int = 0
    good: int = 0
    bad: int = 0
    unknown: int = 0
    timeouts: int = 0
    errors: int = 0
    outages: int = 0
    writes: int = 0
    written: int = 0
    dropped: int = 0
    swept: int = 0
    pending: int = 0

    def count(self, verdict: CacheVerdict) -> CacheVerdict:
        """Count one lookup answer and return it."""
        self.lookups += 1
        if verdict is CacheVerdict.GOOD:
            self.good += 1
        elif verdict is CacheVerdict.BAD:
            self.bad += 1
        else:
            self.unknown += 1
        return verdict

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class OutageNotice:
    """One `on_error` per outage and one `on_recover` when it ends.

    Backends call `failed` on every failure and `ok` on every success, naming
    the kind of operation (`READ`, `WRITE`, `OPEN`; "" for a backend that does
    not tell them apart); only the transitions reach the callbacks. An outage
    ends only when every kind that failed during it has succeeded since: a
    store that answers reads (or a PING) while it refuses writes (a full
    Redis, a read-only replica, a full disk) is one outage, not one per write.
    With `quiet`, it also ends only after that many seconds without a failure:
    a store that fails some operations and not others (an SQLite file with a
    few bad pages) is one outage while the failures keep coming, not one per
    failure. The state starts healthy, so a backend that is down at start is
    reported by its first failure.
    """

    __slots__ = (
        "_clock",
        "_failing",
        "_last_failure",
        "_on_error",
        "_on_recover",
        "down_since",
        "outages",
        "quiet",
        "up",
    )

    #: The kinds of operation an outage is counted by.
    READ = "read"
    WRITE = "write"
    OPEN = "open"

    def __init__(
        self,
        on_error: Callback | None = None,
        on_recover: Callback | None = None,
        clock: Callable[[], float] = trio.current_time,
        quiet: float = 0.0,
    ) -> None:
        self._on_error = on_error or _ignore
        self._on_recover = on_recover or _ignore
        self._clock = clock
        self.quiet = quiet
        self._last_failure = -math.inf
        self.up = True
        self.outages = 0
        self.down_since = 0.0
        # The kinds that failed in this outage and have not succeeded since.
        self._failing: set[str] = set()

    def failing(self, kind: str) -> bool:
        """`kind` failed in this outage and has not succeeded since."""
        return kind in self._failing

    def failed(self, message: str, kind: str = "") -> bool:
        """Record a failure; True when this started an outage (and was reported)."""
        self._failing.add(kind)
        self._last_failure = self._clock()
        if not self.up:
            return False
        self.up = False
        self.outages += 1
        self.down_since = self._clock()
        self._on_error(message)
        return True

    def ok(self, message: str, kind: str = "") -> bool:
        """Record a success; True when this ended an outage (and was reported).

        The message reaches `on_recover` with how long the outage lasted appended.
        """
        if self.up:
            return False
        self._failing.discard(kind)
        if self._failing:  # something else still fails
            return False
        if self._clock() - self._last_failure < self.quiet:  # a later success will tell
            return False
        self.up = True
        duration = max(0.0, self._clock() - self.down_since)
        self._on_recover(f"{message} (after {duration:.1f}s)")
        return True


#: A queued write: the verdict (UNKNOWN means "forget the key") and its expiry.
Write = tuple[CacheVerdict, float]


class QueuedVerdicts:
    """remember_good/remember_bad for a backend that writes in batches from `run`.

    The backend provides `pass_ttl`, `penalty_ttl`, `_closed`, `_pending` (a
    PendingWrites), `_stats` and `_wallclock`; verdicts carry wall-clock expiries.
    """

    pass_ttl: float
    penalty_ttl: float | None
    _closed: bool
    _pending: PendingWrites
    _stats: CacheStats
    _wallclock: Callable[[], float]

    def _queue(self, key: str, verdict: CacheVerdict, ttl: float) -> None:
        if self._closed:
            self._stats.dropped += 1
            return
        lost = self._pending.put(key, verdict, self._wallclock() + ttl)
        if lost is not None:  # this write, or an older pass it took the room of
            self._stats.dropped += 1
        if lost != key:
            self._stats.writes += 1

    def _decided(self, verdict: CacheVerdict, expires: float) -> float:
        """When a queued verdict was decided, on the wall clock: its expiry less the
        time to live it was queued with (`_queue`)."""
        ttl = self.pass_ttl
        if verdict is CacheVerdict.BAD and self.penalty_ttl is not None:
            ttl = self.penalty_ttl
        return expires - ttl

    def _batch_ended(self, size: int, written: bool) -> None:
        # The batch in flight (`size` verdicts) was written, or refused: then it
        # goes back under what was queued since (counted if dropped for room).
        if written:
            self._stats.written += size
            self._pending.done()
        else:
            self._stats.dropped += self._pending.failed()

    def remember_good(self, key: str) -> None:
        """Queue a pass for `key`; never blocks."""
        self._queue(key, CacheVerdict.GOOD, self.pass_ttl)

    def remember_bad(self, key: str) -> None:
        """Queue a penalty for `key`, or with penalties off forget its pass; never blocks."""
        if self.penalty_ttl is not None:
            self._queue(key, CacheVerdict.BAD, self.penalty_ttl)
        else:  # forget any pass: an early talker is never left marked good
            self._queue(key, CacheVerdict.UNKNOWN, self.pass_ttl)


class PendingWrites:
    """Verdicts waiting for a backend's writer, coalesced per key.

    `queued` fills from `put`; the writer `take`s it as one batch, which stays
    visible to lookups (`get`) as `inflight` until `done` or `failed`; a failed
    batch goes back under anything queued since (newer verdicts win).

    The queue is bounded: beyond `limit` keys something is lost, and a pass is
    lost first. A lost pass means one more delay for that client (or an older
    penalty of its key left in force); a lost penalty or "forget" would leave an
    early talker's stored pass in force (a wrong verdict), so such a write takes
    the room of the oldest queued pass, and is itself dropped only when no pass
    is left to give way.
    """

    __slots__ = ("batch_size", "goods", "inflight", "limit", "queued", "wake")

    def __init__(self, limit: int = 100_000, batch_size: int = 256) -> None:
        if limit < 1 or batch_size < 1:
            raise ValueError("limit and batch_size must be positive")
        self.limit = limit
        self.batch_size = batch_size
        self.queued: dict[str, Write] = {}
        self.goods: dict[str, None] = {}  # the keys of `queued` that hold a pass, oldest first
        self.inflight: dict[str, Write] = {}
        self.wake = trio.Event()

    def __len__(self) -> int:
        return len(self.queued) + len(self.inflight)

    def put(self, key: str, verdict: CacheVerdict, expires: float) -> str | None:
        """Queue a verdict; the key of the write lost for room, if any.

        That is `key` itself when the queue is full and the write is a pass or
        no pass is queued to give way; otherwise the oldest queued pass.
        """
        lost = None
        if key not in self.queued and len(self.queued) >= self.limit:
            if verdict is CacheVerdict.GOOD or not self.goods:
                return key
            lost = next(iter(self.goods))
            del self.goods[lost], self.queued[lost]
        self.queued[key] = (verdict, expires)
        if verdict is CacheVerdict.GOOD:
            self.goods[key] = None
        else:
            self.goods.pop(key, None)
        if len(self.queued) >= self.batch_size:
            self.wake.set()
        return lost

    def get(self, key: str, now: float) -> CacheVerdict | None:
        """The newest not yet stored verdict for `key`, or None to ask the backend."""
        write = self.queued.get(key) or self.inflight.get(key)
        if write is None:
            return None
        verdict, expires = write
        return verdict if expires > now else CacheVerdict.UNKNOWN

    async def wait(self, interval: float) -> None:
        """Sleep `interval`, or less if a full batch is queued."""
        if len(self.queued) < self.batch_size:
            with trio.move_on_after(interval):
                await self.wake.wait()
        else:
            await trio.lowlevel.checkpoint()
        if self.wake.is_set():
            self.wake = trio.Event()

    def take(self) -> dict[str, Write]:
        """Move everything queued in flight and return it (empty if nothing is)."""
        if self.inflight:
            raise RuntimeError("a batch is already in flight")
        self.inflight, self.queued, self.goods = self.queued, {}, {}
        return self.inflight

    def done(self) -> None:
        self.inflight = {}

    def failed(self) -> int:
        """Put the batch in flight back; returns how many keys were dropped for room.

        The oldest passes go first, then (only if nothing but penalties and
        "forget"s is left) the oldest of those.
        """
        merged = self.inflight
        merged.update(self.queued)
        self.inflight = {}
        over = max(0, len(merged) - self.limit)
        goods = [key for key, (verdict, _) in merged.items() if verdict is CacheVerdict.GOOD]
        for key in goods[:over]:
            del merged[key]
        for key in list(merged)[: max(0, over - len(goods))]:
            del merged[key]
        self.queued = merged
        self.goods = dict.fromkeys(goods[over:])
        return over


# -- the protocol ----------------------------------------------------------------


class PassCache(Protocol):
    """What the policy step and the CLI need of a pass cache."""

    async def lookup(self, key: str) -> CacheVerdict:
        """GOOD, BAD or UNKNOWN for `key` (from `cache_key`); bounded, never raises."""
        ...

    async def lookup_many(self, keys: Sequence[str]) -> list[CacheVerdict]:
        """`lookup` for many keys in one trip to the backend, in order; bounded, never raises."""
        ...

    def remember_good(self, key: str) -> None:
        """A client that waited the whole delay; queued, never blocks."""
        ...

    def remember_bad(self, key: str) -> None:
        """An early talker: a penalty if penalties are on, else forget any pass."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The background task (writer, sweeper, reconnects); start it with `nursery.start`.

        It calls `task_status.started()` once the backend is usable; an error
        before that (CacheError) means the cache cannot work at all.
        """
        ...

    async def aclose(self) -> None:
        """Write what is queued (bounded, shielded) and release the backend."""
        ...

    def statistics(self) -> dict[str, int]:
        """Counters for the status report (see `CacheStats`)."""
        ...

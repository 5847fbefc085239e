"""The pass cache in a dict: per process, lost at exit (`--cache memory`).

It is also the reference the tests drive with trio's autojump clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio

from repeld.cache.base import DEFAULT_PASS_TTL, CacheStats, CacheVerdict

__all__ = ["MemoryCache"]


class MemoryCache:
    """A pass cache in a dict: per process, lost at exit; `--cache memory`.

    Expiries are on `clock` (default `trio.current_time`, so tests run it under
    the autojump clock). Beyond `max_entries` the oldest written entry goes.
    """

    def __init__(
        self,
        *,
        pass_ttl: float = DEFAULT_PASS_TTL,
        penalty_ttl: float | None = None,
        clock: Callable[[], float] = trio.current_time,
        sweep_interval: float = 60.0,
        max_entries: int = 1_000_000,
    ) -> None:
        if pass_ttl <= 0 or (penalty_ttl is not None and penalty_ttl <= 0):
            raise ValueError("TTLs must be positive")
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.pass_ttl = pass_ttl
        self.penalty_ttl = penalty_ttl
        self.sweep_interval = sweep_interval
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[CacheVerdict, float]] = {}
        self._stats = CacheStats()
        self._closed = False

    def __len__(self) -> int:
        return len(self._entries)

    async def lookup(self, key: str) -> CacheVerdict:
        await trio.lowlevel.checkpoint()
        return self._lookup_now(key, self._clock())

    async def lookup_many(self, keys: Sequence[str]) -> list[CacheVerdict]:
        await trio.lowlevel.checkpoint()
        now = self._clock()
        return [self._lookup_now(key, now) for key in keys]

    def _lookup_now(self, key: str, now: float) -> CacheVerdict:
        entry = self._entries.get(key)
        if entry is None:
            return self._stats.count(CacheVerdict.UNKNOWN)
        verdict, expires = entry
        if expires <= now:
            del self._entries[key]
            self._stats.swept += 1
            return self._stats.count(CacheVerdict.UNKNOWN)
        return self._stats.count(verdict)

    def _put(self, key: str, verdict: CacheVerdict, ttl: float) -> None:
        if self._closed:
            self._stats.dropped += 1
            return
        self._stats.writes += 1
        self._entries.pop(key, None)  # re-inserted last: eviction order is write order
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
            self._stats.dropped += 1
        self._entries[key] = (verdict, self._clock() + ttl)
        self._stats.written += 1

    def remember_good(self, key: str) -> None:
        self._put(key, CacheVerdict.GOOD, self.pass_ttl)

    def remember_bad(self, key: str) -> None:
        if self.penalty_ttl is not None:
            self._put(key, CacheVerdict.BAD, self.penalty_ttl)
            return
        self._stats.writes += 1
        if self._entries.pop(key, None) is not None:
            self._stats.written += 1

    def sweep(self) -> int:
        """Remove expired entries now; how many went."""
        now = self._clock()
        expired = [key for key, (_, expires) in self._entries.items() if expires <= now]
        for key in expired:
            del self._entries[key]
        self._stats.swept += len(expired)
        return len(expired)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.sweep_interval)
            self.sweep()

    async def aclose(self) -> None:
        self._closed = True
        self._entries.clear()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> dict[str, int]:
        stats = self._stats.as_dict()
        stats["entries"] = len(self._entries)
        return stats

"""One task asks the pass cache about every newly held client, in batches.

A batch is one trip to the backend (one thread hop for SQLite, one MGET for
Redis) however many clients arrived meanwhile, so a burst of connections costs
a handful of lookups, not one task each. The items are the shell's own records
(held connections); this module only needs their cache keys, whether they still
wait for an answer, and where the answer goes.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

from repeld.cache.base import CacheVerdict, PassCache

__all__ = ["LOOKUP_BATCH", "BatchedLookups"]

#: The most clients asked about in one trip to the cache.
LOOKUP_BATCH = 1024

T = TypeVar("T")


class BatchedLookups(Generic[T]):
    """Queue `ask(key, item)`; `run()` answers each through `on_answer(item, verdict)`.

    An item for which `waiting(item)` is false by the time its batch leaves is
    not asked about (its connection was decided meanwhile), nor takes a place
    in it: a flood of clients that leave at once costs no trip, and the queue
    never holds more than the waiting clients and those one trip left behind.
    """

    def __init__(
        self,
        cache: PassCache,
        on_answer: Callable[[T, CacheVerdict], None],
        waiting: Callable[[T], bool],
        batch: int = LOOKUP_BATCH,
        on_trip: Callable[[float, int], None] | None = None,
    ) -> None:
        self.cache = cache
        self._on_answer = on_answer
        self._waiting = waiting
        self._batch = batch
        #: Told (seconds, clients) after each trip to the cache (--metrics).
        self._on_trip = on_trip
        self._queue: collections.deque[tuple[str, T]] = collections.deque()
        self._due = trio.Event()

    def __len__(self) -> int:
        return len(self._queue)

    def ask(self, key: str, item: T) -> None:
        """Ask about `item` under `key` in the next batch; never blocks."""
        self._queue.append((key, item))
        self._due.set()

    async def run(self) -> None:
        """Send the queued questions until cancelled."""
        while True:
            if not self._queue:
                self._due = trio.Event()
                await self._due.wait()
            asked: list[tuple[str, T]] = []
            queue, waiting = self._queue, self._waiting
            while queue and len(asked) < self._batch:
                key, item = queue.popleft()
                if waiting(item):
                    asked.append((key, item))
            if not asked:
                continue
            started = trio.current_time()
            answers = await self.cache.lookup_many([key for key, _ in asked])
            if self._on_trip is not None:
                self._on_trip(trio.current_time() - started, len(asked))
            for (_, item), answer in zip(asked, answers, strict=True):
                self._on_answer(item, answer)

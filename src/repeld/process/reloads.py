"""SIGHUP's reloads: each a task of its own, one at a time, at most one waiting.

A reload may wait: a worker resolves its backend's name again, and the --workers
parent waits for its workers' answers (up to 10 s for a stuck one). The signal
loop must not wait with it, or a SIGTERM that comes meanwhile is held up as
long, and the process, or its workers, go on taking clients. So each SIGHUP
starts a task, and the tasks keep the old loop's two properties:

- reloads run one at a time, so their notifications to systemd (RELOADING=1,
  then READY=1) never interleave;
- SIGHUPs that come while a reload waits to run are one, as trio's signal
  receiver made them when the loop waited for each reload itself: the waiting
  reload reads the files as they are when it runs.

Once the process is stopping, no reload begins (`skipped()` is told, so that a
worker still answers its parent), and one that has begun does not apply its
settings (`stopping()`; STOPPING=1 was systemd's last word).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

__all__ = ["Reloads"]


class Reloads:
    """The reloads of one process; `request` one per SIGHUP."""

    def __init__(
        self, stopping: Callable[[], bool], skipped: Callable[[], None] = lambda: None
    ) -> None:
        #: True once a SIGTERM (or SIGINT) has come.
        self.stopping = stopping
        #: Called for a reload that does not begin because the process is stopping.
        self.skipped = skipped
        self._lock = trio.Lock()
        self._waiting = False

    def request(self, nursery: trio.Nursery, reload: Callable[[], Awaitable[None]]) -> None:
        """Reload in a task of `nursery`, unless one is waiting already (it will do)."""
        if self.stopping():
            self.skipped()
            return
        if self._waiting:
            return
        self._waiting = True
        nursery.start_soon(self._run, reload)

    async def _run(self, reload: Callable[[], Awaitable[None]]) -> None:
        async with self._lock:
            self._waiting = False
            if self.stopping():
                self.skipped()
            else:
                await reload()

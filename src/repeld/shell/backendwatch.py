"""The periodic backend check: `repeld_backend_up`, and an event when a backend fails.

The start-up and reload checks (shell/backendcheck.py) say once whether the
MTA is ready; between reloads nothing said whether it still was. This task
runs the same check (greeting, EHLO, QUIT, with the PROXY header repeld would
send) every --backend-check-interval seconds and keeps one figure per
backend, 1 if it passed and 0 if not, for the metric. A backend that passed
and then fails is reported with a `backend-check` event, once per failure and
not at every check; the first check after start or reload stays quiet, since
the start-up or reload check has just reported it. 0 turns the task off.

One process checks: the lone daemon, or the --workers parent (N workers would
knock N times). A SIGHUP reload hands the new settings over with
`reconfigure`, which also checks again at once.
"""

from __future__ import annotations

import math

import trio

from repeld.config.settings import Settings
from repeld.core import events
from repeld.metrics import Snapshot
from repeld.shell.backendcheck import check_backends
from repeld.shell.eventlog import EventLog

__all__ = ["BackendWatch"]


class BackendWatch:
    """Checks the backends every interval; `snapshot()` is its part of a scrape."""

    def __init__(self, settings: Settings, log: EventLog) -> None:
        self.settings = settings
        self.log = log
        #: str(backend) -> 1 (up) or 0 (down), as of the last check.
        self.up: dict[str, int] = {}
        self.checks = 0
        self._quiet = True  # the next check reports nothing: start-up's or reload's did
        self._changed = trio.Event()

    def reconfigure(self, settings: Settings) -> None:
        """New settings (SIGHUP): check again now, quietly."""
        self.settings = settings
        self._quiet = True
        self._changed.set()

    def snapshot(self) -> Snapshot:
        """The `repeld_backend_up` gauges (none while the check is off)."""
        if self.settings.backend_check_interval <= 0:
            return {}
        return {"labelled_gauges": {"backend_up": dict(self.up)}}

    async def run(self) -> None:
        """Check, wait an interval (or a reload), check again; until cancelled."""
        while True:
            interval = self.settings.backend_check_interval
            if interval > 0:
                await self.check_once()
            with trio.move_on_after(interval if interval > 0 else math.inf):
                await self._changed.wait()
            self._changed = trio.Event()

    async def check_once(self) -> None:
        settings = self.settings
        try:
            results = await check_backends(settings)
        except Exception as exc:  # a check must never take the server down
            self.log.emit(events.internal_error(None, 0.0, f"backend check: {exc!r}"))
            return
        if settings is not self.settings:
            return  # reloaded meanwhile: the new settings' check comes next
        up: dict[str, int] = {}
        for backend, verdict in results:
            name = str(backend)
            up[name] = 1 if verdict.ok else 0
            if not verdict.ok and self.up.get(name) == 1 and not self._quiet:
                self.log.emit(events.backend_check(name, verdict.message))
        self.up = up
        self._quiet = False
        self.checks += 1

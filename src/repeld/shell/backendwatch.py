"""The backend check at start-up, after each reload, and every --backend-check-interval.

The check itself is shell/backendcheck.py (greeting, EHLO, QUIT, with the
PROXY header repeld would send). This task runs it once repeld listens and
after each applied SIGHUP, and reports every problem it finds (a
`backend-check` event and a stderr line each); then again every
--backend-check-interval seconds, keeping one figure per backend, 1 if it
passed and 0 if not, for the `repeld_backend_up` metric. A periodic check
reports a backend only when it fails after having passed, once per failure
and not at every check. With an interval of 0 only the start-up and reload
checks run, and there is no metric.

One process checks: the lone daemon, after its chroot and its drop to --user,
or the --workers parent (N workers would knock N times), which stays root
outside the chroot and so checks a pass service as the workers will see it
(`view`). Serving never waits for a check, nor stops for what it finds.
"""

from __future__ import annotations

import math

import trio

from repeld.config.settings import Settings
from repeld.core import events
from repeld.metrics import Snapshot
from repeld.shell.backendcheck import Outside, check_backends, warn
from repeld.shell.eventlog import EventLog

__all__ = ["BackendWatch"]


class BackendWatch:
    """Checks the backends at start, on reload and every interval; `snapshot()` for scrapes."""

    def __init__(
        self,
        settings: Settings,
        log: EventLog,
        *,
        view: Outside | None = None,
    ) -> None:
        self.settings = settings
        self.log = log
        #: The --workers parent's: how the workers see a pass service from outside
        #: their chroot and identity. Fixed at start, as the workers' are: --user,
        #: --group and --chroot take a restart.
        self.view = view
        #: str(backend) -> 1 (up) or 0 (down), as of the last check.
        self.up: dict[str, int] = {}
        self.checks = 0
        self._full_report = True  # the next check reports every problem: start-up or reload
        self._changed = trio.Event()

    def reconfigure(self, settings: Settings) -> None:
        """New settings (SIGHUP): check again now, and report every problem found."""
        self.settings = settings
        self._full_report = True
        self._changed.set()

    def snapshot(self) -> Snapshot:
        """The `repeld_backend_up` gauges (none while the periodic check is off)."""
        if self.settings.backend_check_interval <= 0:
            return {}
        return {"labelled_gauges": {"backend_up": dict(self.up)}}

    async def run(self) -> None:
        """Check, wait an interval (or a reload), check again; until cancelled."""
        while True:
            if self._full_report or self.settings.backend_check_interval > 0:
                await self.check_once()
            interval = self.settings.backend_check_interval
            with trio.move_on_after(interval if interval > 0 else math.inf):
                await self._changed.wait()
            self._changed = trio.Event()

    async def check_once(self) -> None:
        settings, full = self.settings, self._full_report
        self._full_report = False
        try:
            results = await check_backends(settings, view=self.view)
        except Exception as exc:  # a check must never take the server down
            self.log.emit(events.internal_error(None, 0.0, f"backend check: {exc!r}"))
            return
        if settings is not self.settings:
            return  # reloaded meanwhile: the new settings' check comes next
        up: dict[str, int] = {}
        for backend, verdict in results:
            name = str(backend)
            up[name] = 1 if verdict.ok else 0
            if full or (not verdict.ok and self.up.get(name) == 1):
                warn(self.log, backend, verdict)
        self.up = up
        self.checks += 1

"""One worker per core: a parent binds once, spawns workers, restarts them, sums stats.

With `--workers N` (N > 1) the process that the admin starts becomes a small
supervisor. It binds every listener (as root) or takes them from systemd,
writes the pidfile, stays root like Postfix's master (so that it can replace a
worker at any time), and spawns N copies of itself, each of which drops
privileges on its own (`python -m repeld` with the same
arguments) that inherit the listening sockets. On Linux and FreeBSD each worker
gets its own socket per listener bound with SO_REUSEPORT (SO_REUSEPORT_LB on
FreeBSD), so the kernel spreads new connections over the workers; elsewhere
they share one socket, as they share systemd's unless its unit set
ReusePort=yes (then each worker but the first gets a socket of its own beside
systemd's): on a shared socket each connection wakes every waiting worker.
Spawning (fork+exec) rather than forking keeps trio's state out of the
children and lets a crashed worker be replaced at any time.

Signals are fanned out: SIGHUP is checked by the parent first (a bad file is
refused once, with one `config-error`, and never reaches the workers), then
each worker reloads and tells the parent how that went over its pipe, and only
then does the parent tell systemd: a worker, which reads the files as the user
it dropped to, may refuse what the parent (root) could read. SIGTERM
and SIGINT are forwarded and the parent exits once every worker has drained,
SIGUSR1/SIGINFO ask each worker for its counters over a pipe and the parent
writes one `stats` event with the sums. With --metrics the parent alone serves
the endpoint: a scrape asks the workers the same way (SIGUSR1), each answers
with its counters and its metrics snapshot on the same line, and the parent
serves their sum (repeld/metrics.py's WorkerTally: a worker that does not
answer within `STATS_WAIT` counts with its last snapshot and is not waited for
again until it answers; a dead worker's counters stay in the sum, so no
counter goes backwards; `repeld_workers_answered` says who answered).

The environment protocol between parent and worker (internal, not an API):
REPELD_WORKER is the worker's index, REPELD_WORKER_FDS lists `fd:name` pairs of
inherited listeners (a name ending in "nodelay" marks a nodelay listener, as
with socket activation), REPELD_LEAD_FDS gives each listener's gathering lead
and the other workers' sockets of it (`attach_leads`), REPELD_STATS_FD is the
pipe for the counters, REPELD_SETTINGS_FD a file (memfd) holding the settings
the worker starts with.

The settings a worker starts with are the parent's, not the file's: what the
workers serve (`Supervisor.settings`: what the parent started with, then each
reload that the workers took, with what only a restart changes pinned as
`Server.apply` pins it), written as `--check-config` prints them with the
trusted networks inline. A worker started again after a crash would otherwise
read the files as they are then: an edit not reloaded served by one worker
alone, another cache opened after a reload that named it, a broken file a
worker that dies at each start. Text, not a pickle: a repeld upgraded under
its running parent reads it with its own parsers, or says in one line that it
cannot. The parent reads the text back first (`handover`): settings it cannot
carry are not given, and the workers read the files as before, with a warning.
A worker reads the files on a SIGHUP only, as one process does (the Redis
password file at each start too); one started from settings a reload then
replaced is sent that reload (`_ready`, `adopt`), and a reload is taken for
the workers started later once one worker took it (`settle`).

The lead (shell/accept.py's `Lead`): one pipe per listener, made here with one
byte in it, which the worker that gathers holds and gives back; one worker
gathers at a time, for all of them. A worker that dies with it cannot give it
back, so after every death the parent puts a byte back if the pipe is empty.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence

import trio

from repeld import __version__
from repeld.config.errors import SettingError
from repeld.config.file import SETTINGS_ENV, render_settings, settings_from_text
from repeld.config.settings import Listen, Settings, load_trusted
from repeld.core import events
from repeld.core.addresses import host_port
from repeld.core.names import EventName
from repeld.core.policy import TrustedNetworks
from repeld.metrics import ProcessStats, Snapshot, WorkerTally, render
from repeld.process.reloads import Reloads
from repeld.service import activation, privileges, sdnotify
from repeld.service.listeners import (
    backlog_for,
    is_dual_stack,
    open_listeners,
    reuseport_option,
    reuses_port,
)
from repeld.shell.accept import LEAD_TOKEN, Lead, Listener, restore_lead
from repeld.shell.backendcheck import Outside
from repeld.shell.backendwatch import BackendWatch
from repeld.shell.eventlog import EventLog
from repeld.shell.metrics_http import open_endpoint
from repeld.shell.server import pinned

__all__ = [
    "FDS_ENV",
    "LEAD_ENV",
    "STATS_ENV",
    "WORKER_ENV",
    "Supervisor",
    "announce_ready",
    "attach_leads",
    "inherited_sockets",
    "outside_view",
    "report_reload",
    "send_statistics",
    "settings_text",
    "supervise",
    "watch_parent",
]

WORKER_ENV = "REPELD_WORKER"
FDS_ENV = "REPELD_WORKER_FDS"
LEAD_ENV = "REPELD_LEAD_FDS"
STATS_ENV = "REPELD_STATS_FD"
LIFELINE_ENV = "REPELD_LIFELINE_FD"
#: A worker that dies is replaced after this long, doubling while it keeps dying.
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0
#: A worker that ran this long before dying is not considered crash-looping.
STABLE_AFTER = 10.0
#: How long the parent waits for every worker's counters.
STATS_WAIT = 1.0
#: How long the parent waits for every worker to say how its reload went (a
#: worker resolves the backend's name again, which may take a resolver's time).
RELOAD_WAIT = 10.0


def inherited_sockets(env: dict[str, str] | None = None) -> list[tuple[socket.socket, str]]:
    """The listeners a supervising parent passed to this worker (empty if none)."""
    environ = os.environ if env is None else env
    spec = environ.pop(FDS_ENV, "")
    result = []
    for item in filter(None, spec.split(",")):
        fd, _, name = item.partition(":")
        sock = socket.socket(fileno=int(fd))
        os.set_inheritable(sock.fileno(), False)
        result.append((sock, name))
    return result


def settings_text(settings: Settings, trusted: TrustedNetworks) -> str:
    """What a worker starts with: `settings` as --check-config prints them, with
    the trusted networks of `trusted` (the files as the parent read them) inline
    and the Redis password as it is."""
    return render_settings(
        dataclasses.replace(settings, trusted=trusted.sources, trusted_file=()), reveal=True
    )


def handover(settings: Settings, trusted: TrustedNetworks) -> tuple[str | None, str]:
    """`settings_text`, if it reads back as the same settings, and ""; else
    (None, why): the workers then read the files themselves, as before.

    Read back by the parent each time it changes, so that a value the text
    cannot carry (a flag not in UTF-8, say) costs the hand-over, never a
    worker that fails at every start."""
    expected = dataclasses.replace(settings, trusted=trusted.sources, trusted_file=())
    try:
        text = settings_text(settings, trusted)
        text.encode("utf-8")  # what the memfd holds: not a flag's surrogate escapes
        back = settings_from_text(text, "settings")
    except Exception as exc:  # ConfigError, UnicodeEncodeError, whatever else
        return None, str(exc).replace("\n", "; ") or type(exc).__name__
    if back != expected:
        fields = dataclasses.fields(back)
        differ = [f.name for f in fields if getattr(back, f.name) != getattr(expected, f.name)]
        return None, "these do not read back the same: " + ", ".join(differ)
    return text, ""


def _settings_file(text: str) -> int:
    # A memfd (Linux, FreeBSD 13), else an unlinked temporary file: any size, no
    # path, and the worker reads it when it likes (a pipe would hold 64 KiB).
    try:
        fd = os.memfd_create("repeld-settings")
    except (AttributeError, OSError):
        fd, path = tempfile.mkstemp(prefix="repeld-settings-")
        os.unlink(path)
    try:
        data = memoryview(text.encode("utf-8"))
        while data:
            data = data[os.write(fd, data) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def attach_leads(
    listeners: list[Listener],
    tune: Callable[[socket.socket], None],
    env: dict[str, str] | None = None,
) -> int:
    """In a worker: give each listener the gathering lead its parent shares
    among the workers (shell/accept.py's `Lead`); how many got one.

    REPELD_LEAD_FDS lists, per listener, `LISTEN:TOKEN:GIVE_BACK[:SIBLING...]`:
    the worker's own listening socket, the lead's pipe (read and write end)
    and the other workers' sockets of the same listener. Each sibling is
    `tune`d as the worker's own listener is: the lead takes its clients (its
    own worker tunes it too, but may not have started yet).
    """
    environ = os.environ if env is None else env
    spec = environ.pop(LEAD_ENV, "")
    by_fd = {lst.sock.fileno(): lst for lst in listeners}
    attached = 0
    for item in filter(None, spec.split(",")):
        listen, token, give_back, *siblings = (int(fd) for fd in item.split(":"))
        fds = [token, give_back, *siblings]
        for fd in fds:
            os.set_inheritable(fd, False)
        listener = by_fd.get(listen)
        if listener is None or listener.lead is not None:  # never: the parent's own list
            for fd in fds:
                os.close(fd)
            continue
        socks = [socket.socket(fileno=fd) for fd in siblings]
        for sock in socks:
            tune(sock)
        listener.lead = Lead(token, give_back, socks)
        attached += 1
    return attached


def _tell_parent(message: dict[str, object]) -> bool:
    fd = os.environ.get(STATS_ENV)
    if not fd:
        return False
    line = memoryview(json.dumps({"pid": os.getpid(), **message}).encode() + b"\n")
    try:
        # This worker is the pipe's only writer, so a line longer than PIPE_BUF
        # (a metrics snapshot) cannot interleave; the parent reads it at once.
        while line:
            line = line[os.write(int(fd), line) :]
    except OSError:
        return False
    return True


def send_statistics(stats: dict[str, int], metrics: Snapshot | None = None) -> bool:
    """In a worker: hand the counters (and metrics) to the parent; False when not a worker."""
    if metrics is None:
        return _tell_parent(dict(stats))
    return _tell_parent({**stats, "metrics": metrics})


def report_reload(refused: str | None, began: float, *, stopping: bool = False) -> bool:
    """In a worker: tell the parent how a SIGHUP went (`refused`: why it was
    refused, None if the new configuration serves; `began`: when this reload
    began, on the host's monotonic clock, which the parent reads alike;
    `stopping`: it did not reload, being stopped); False when not a worker."""
    return _tell_parent({"reload": refused or "", "began": began, "stopping": int(stopping)})


def outside_view(settings: Settings) -> Outside:
    """How the workers (or a lone daemon) of `settings` will see a pass service, for
    this process, which has not chrooted nor dropped: inside --chroot, as the user
    and group they drop to (`repeld --check-backend` and this parent's checks)."""
    return Outside(settings.chroot, privileges.dropped_identity(settings.user, settings.group))


async def watch_parent(on_orphaned: Callable[[], None]) -> None:
    """In a worker: call `on_orphaned` once the supervising parent has died."""
    fd = os.environ.get(LIFELINE_ENV)
    if not fd:
        return
    lifeline = int(fd)
    while True:
        await trio.lowlevel.wait_readable(lifeline)
        try:
            if os.read(lifeline, 64) == b"":
                break
        except BlockingIOError:
            continue
    on_orphaned()


class WorkerStartError(Exception):
    """A worker ended before it was ever ready, at the start: the parent exits 1."""


def _status_text(status: int) -> str:
    return f"signal {-status}" if status < 0 else f"status {status}"


def announce_ready() -> bool:
    """In a worker: say that signals are handled now (before, one would kill it)."""
    return _tell_parent({"ready": 1})


def _fd_name(spec: Listen) -> str:
    return "listen-nodelay" if spec.nodelay else "listen"


class Supervisor:
    """Keeps N workers running over the same listeners."""

    def __init__(
        self,
        settings: Settings,
        argv: Sequence[str],
        sockets: list[list[tuple[socket.socket, Listen]]],
        log: EventLog,
        trusted: TrustedNetworks | None = None,
    ) -> None:
        #: What the workers serve, and a new one starts with (`adopt`): the
        #: settings, and the trusted networks of the flags and files.
        self.settings = settings
        self.trusted = TrustedNetworks(settings.trusted) if trusted is None else trusted
        #: What a worker started now is given (`handover`), or None and why not.
        self._handed: str | None = None
        self._not_handed = ""
        self._hand_over()
        self.argv = list(argv)
        self.sockets = sockets
        self.log = log
        self.stopping = False
        #: Set with `stopping` (`stop`): ends a wait before a worker's restart.
        self._stopped = trio.Event()
        #: The workers (by index) that have said they are ready at least once;
        #: `started` is set once every one has, or once stopping.
        self._ready_once: set[int] = set()
        self.started = trio.Event()
        #: Why the start failed: a worker that ended before it was ever ready,
        #: at the start (what one process would refuse to start with).
        self.start_failed: str | None = None
        self.procs: dict[int, trio.Process] = {}
        self.restarts = 0
        self._stats: dict[int, dict[str, int]] = {}
        #: Every worker's latest metrics, and the dead ones' counters (metrics.py).
        self.tally = WorkerTally()
        self.process = ProcessStats()
        #: Workers that answered this round; workers not waited for until they answer.
        self._fresh: set[int] = set()
        self._late: set[int] = set()
        self.extra_metrics: Callable[[], Snapshot] | None = None  # the backend watch's
        #: One round of questions to the workers at a time (SIGUSR1 and scrapes).
        self._asking = trio.Lock()
        #: Workers (by pid) that have said they handle signals.
        self.ready: set[int] = set()
        self._lifelines: dict[int, int] = {}
        self._stats_arrived = trio.Event()
        #: Each worker's last reload by pid: when it began (host monotonic clock),
        #: "" (reloaded) or why the worker refused, and whether it was stopping
        #: (draining after a SIGTERM of its own: it takes no part in the reload).
        self._reloads: dict[int, tuple[float, str, bool]] = {}
        self._reload_arrived = trio.Event()
        #: When the last SIGHUP went to the workers, when the workers' settings
        #: last changed (`adopt`), and when each worker (by pid) was spawned
        #: with the settings of then (the host's monotonic clock). A worker
        #: spawned before a reload and ready only after it was skipped by it
        #: (a SIGHUP would have killed it), and one spawned with settings a
        #: reload then replaced is behind: each is sent the reload on its
        #: `ready`, or at `adopt` if it is ready already.
        self._reload_sent = -math.inf
        self._adopted = -math.inf
        #: A reload no worker answered in time: taken at the first late answer.
        self._late_adopt: tuple[Settings, TrustedNetworks, float] | None = None
        self._spawned: dict[int, float] = {}
        #: SIGHUP's reloads: one at a time, each waiting for its workers' answers.
        self.reloads = Reloads(lambda: self.stopping)
        #: Each listener's gathering lead (shell/accept.py's `Lead`): a pipe that
        #: holds one byte while no worker leads, shared by every worker.
        self.leads: list[tuple[int, int]] = []
        if settings.workers > 1:
            for _ in sockets[0]:
                token, give_back = os.pipe()
                os.set_blocking(token, False)
                os.set_blocking(give_back, False)
                os.write(give_back, LEAD_TOKEN)
                self.leads.append((token, give_back))

    def adopt(self, settings: Settings, trusted: TrustedNetworks) -> None:
        """A reload the workers took: what they serve now is `settings`, with
        what only a restart changes as they run it (`pinned`), and `trusted`.

        A ready worker spawned since the reload's signal, with the settings of
        before, is sent the reload now; one not ready yet, on its `ready`.
        """
        self.settings = pinned(self.settings, settings)
        self.trusted = trusted
        self._hand_over()
        self._adopted = time.monotonic()
        for pid in self.ready:
            if self._spawned.get(pid, -math.inf) > self._reload_sent:
                self._hup(pid)

    def settle(
        self,
        settings: Settings,
        trusted: TrustedNetworks,
        reloaded: int,
        refused: list[str],
        silent: int,
    ) -> None:
        """What a worker started from now on is given, once the workers have
        answered a reload (`reload_workers`): its settings if one took them, or
        none was there to (every worker being replaced); if every worker that
        answered in time did and others were silent, at the first late answer
        that took them; not if one refused and none took them."""
        if reloaded or not (refused or silent):
            self.adopt(settings, trusted)
        elif not refused:
            self._late_adopt = (settings, trusted, self._reload_sent)

    def _settle_late(self) -> None:
        # A reload waiting for a late answer whose workers are all gone (a worker
        # spawned since got the settings of before it, and will be sent it at
        # `adopt`): nobody is left to take it or refuse it, as when none was there.
        late = self._late_adopt
        if late is None:
            return
        if all(self._spawned.get(p.pid, math.inf) > late[2] for p in self.procs.values()):
            self._late_adopt = None
            self.adopt(late[0], late[1])

    def _hand_over(self) -> None:
        self._handed, self._not_handed = handover(self.settings, self.trusted)

    def _hup(self, pid: int) -> None:
        proc = next((p for p in self.procs.values() if p.pid == pid), None)
        if proc is not None and not self.stopping:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGHUP)

    def _sockets_for(self, index: int) -> list[tuple[socket.socket, Listen]]:
        return self.sockets[index % len(self.sockets)]

    def stop(self) -> None:
        """SIGTERM: no worker is started again, nor waited for to be."""
        self.stopping = True
        self._stopped.set()
        self.started.set()

    async def _spawn(self, index: int) -> tuple[trio.Process, int]:
        """Start worker `index`: it, and the read end of its statistics' pipe.
        OSError (fork or a pipe refused) leaves no descriptor behind."""
        read_fd, write_fd = os.pipe()
        try:
            # The worker holds the read end of a pipe only the parent can write
            # to: EOF on it means the parent is gone, and it drains and exits.
            life_read, life_write = os.pipe()
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        try:
            proc = await self._exec(index, write_fd, life_read)
        except BaseException:
            os.close(read_fd)
            os.close(life_write)
            raise
        self._lifelines[index] = life_write
        return proc, read_fd

    async def _exec(self, index: int, write_fd: int, life_read: int) -> trio.Process:
        socks = self._sockets_for(index)
        env = dict(os.environ)
        env[WORKER_ENV] = str(index)
        env[FDS_ENV] = ",".join(f"{s.fileno()}:{_fd_name(spec)}" for s, spec in socks)
        leads = []
        lead_fds: list[int] = []
        for j, ((sock, _), (token, give_back)) in enumerate(zip(socks, self.leads, strict=True)):
            siblings = [copy[j][0].fileno() for copy in self.sockets if copy is not socks]
            leads.append(":".join(map(str, (sock.fileno(), token, give_back, *siblings))))
            lead_fds += [token, give_back, *siblings]
        env[LEAD_ENV] = ",".join(leads)
        env[STATS_ENV] = str(write_fd)
        env[LIFELINE_ENV] = str(life_read)
        env.pop("NOTIFY_SOCKET", None)  # only the parent speaks to systemd
        settings_fd = -1
        try:
            own = [write_fd, life_read]
            if self._handed is not None:
                settings_fd = _settings_file(self._handed)
                env[SETTINGS_ENV] = str(settings_fd)
                own.append(settings_fd)
            elif self._not_handed:  # said once for these settings
                print(
                    f"repeld: warning: worker {index} reads the configuration files itself:"
                    f" {self._not_handed}",
                    file=sys.stderr,
                    flush=True,
                )
                self._not_handed = ""
            proc = await trio.lowlevel.open_process(
                [sys.executable, "-m", "repeld", *self.argv],
                env=env,
                pass_fds=[s.fileno() for s, _ in socks] + lead_fds + own,
                stdin=subprocess.DEVNULL,
                # Out of the terminal's process group: ^C on `repeld -f -w N` reaches
                # the parent alone, which forwards one SIGTERM (a drain). A worker that
                # had the SIGINT too counted two stop signals and cut its relays.
                start_new_session=True,
            )
        finally:
            os.close(write_fd)
            os.close(life_read)
            if settings_fd >= 0:
                os.close(settings_fd)
        return proc

    async def _read_stats(self, read_fd: int) -> None:
        stream = trio.lowlevel.FdStream(read_fd)
        buf = b""
        async with stream:
            while True:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    try:
                        data = json.loads(line)
                        pid = int(data.pop("pid"))
                        if data.get("ready"):
                            self.ready.add(pid)
                            self._ready(pid)
                            continue
                        if "reload" in data:
                            began = float(data.get("began", 0.0))
                            stopping = bool(data.get("stopping"))
                            self._reloads[pid] = (began, str(data["reload"]), stopping)
                            self._reload_arrived.set()
                            late = self._late_adopt
                            if late is not None and began >= late[2] and not stopping:
                                self._late_adopt = None  # taken, or refused: settled
                                if not data["reload"]:
                                    self.adopt(late[0], late[1])
                            continue
                        metrics = data.pop("metrics", None)
                        if isinstance(metrics, dict):
                            self.tally.update(pid, metrics)
                        self._stats[pid] = {k: int(v) for k, v in data.items()}
                    except (ValueError, KeyError, TypeError):
                        continue
                    self._fresh.add(pid)
                    self._late.discard(pid)
                    self._stats_arrived.set()

    async def keep_worker(self, index: int) -> None:
        """Run worker `index`; replace it whenever it dies, until shutdown."""
        delay = RESTART_DELAY
        while not self.stopping:
            spawned = time.monotonic()
            try:
                proc, read_fd = await self._spawn(index)
            except (OSError, RuntimeError) as exc:
                # fork or a pipe refused (EAGAIN, ENOMEM, EMFILE), likely just
                # when a worker died of the same want: tried again after the
                # wait, as a dead worker is; the parent and the others go on.
                # (RuntimeError: trio runs Popen in a thread of its own, and
                # "can't start new thread" is how a refused one says so.)
                why = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
                self.log.emit(
                    events.internal_error(
                        None, 0.0, f"cannot start worker {index}: {why}; again in {delay:g} s"
                    )
                )
                await self._wait_before_restart(delay)
                delay = min(delay * 2, RESTART_DELAY_MAX)
                continue
            self.procs[index] = proc
            self._spawned[proc.pid] = spawned
            if self.stopping:  # SIGTERM came while it was spawned: signal_workers missed it
                proc.send_signal(signal.SIGTERM)
            started = trio.current_time()
            self.log.emit(events.worker(EventName.WORKER_START, index, proc.pid))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_stats, read_fd)
                status = await proc.wait()
                # What it wrote before it ended (its `ready`, say) is read to
                # the pipe's end, which its exit closed; a second at most.
                nursery.cancel_scope.deadline = trio.current_time() + STATS_WAIT
            del self.procs[index]
            del self._spawned[proc.pid]
            was_ready = proc.pid in self.ready
            for token, give_back in self.leads:  # it may have died with a lead
                restore_lead(token, give_back)
            self._reloads.pop(proc.pid, None)
            self._reload_arrived.set()  # a reload waits for it no more
            self._settle_late()
            os.close(self._lifelines.pop(index))
            self.ready.discard(proc.pid)
            self.tally.retire(proc.pid)  # its counters stay in the sum
            self._stats.pop(proc.pid, None)
            self._late.discard(proc.pid)
            if self.stopping:
                return
            # (A signal is someone else's doing, a SIGTERM not the parent's
            # or the OOM killer: replaced, as after the start.)
            first = status > 0 and not was_ready and not self.started.is_set()
            then = "not starting" if first else "restarting"
            self.log.emit(events.worker(EventName.WORKER_EXIT, index, proc.pid, status, then))
            if first:
                # Ended before it was ever ready, at the start: a user that
                # does not exist, a --chroot that is missing, a backend that
                # does not resolve. One process refuses to start then (exit
                # 1); replaced, it would fail so for ever while the parent,
                # port 25 bound, told its supervisor all was well.
                self.start_failed = (
                    f"worker {index} exited at start-up ({_status_text(status)}): not starting"
                )
                self.stop()
                self.signal_workers(signal.SIGTERM)
                return
            self.restarts += 1
            if trio.current_time() - started >= STABLE_AFTER:
                delay = RESTART_DELAY
            await self._wait_before_restart(delay)
            delay = min(delay * 2, RESTART_DELAY_MAX)

    async def _wait_before_restart(self, delay: float) -> None:
        # Up to RESTART_DELAY_MAX: a SIGTERM meanwhile ends it, not the wait.
        with trio.move_on_after(delay):
            await self._stopped.wait()

    def _ready(self, pid: int) -> None:
        # A worker said it handles signals: the start is over once every one
        # has, and one behind the last reload is sent it now: spawned before
        # its signal, or with the settings it replaced.
        index = next((i for i, proc in self.procs.items() if proc.pid == pid), None)
        if index is None:
            return
        self._ready_once.add(index)
        if len(self._ready_once) >= self.settings.workers:
            self.started.set()
        if self._spawned[pid] < max(self._reload_sent, self._adopted):
            self._hup(pid)

    def signal_workers(self, signum: int) -> None:
        """Pass a signal on to every worker that handles signals already.

        A worker still starting up would die of SIGHUP or SIGUSR1; it reads the
        current configuration anyway. SIGTERM reaches every worker.
        """
        for proc in list(self.procs.values()):
            if proc.pid not in self.ready and signum != signal.SIGTERM:
                continue
            try:
                proc.send_signal(signum)
            except OSError:
                pass

    async def reload_workers(self) -> tuple[int, list[str], int]:
        """SIGHUP every worker and wait, RELOAD_WAIT at most, for each to say how
        its reload went: (how many reloaded, why the others refused, how many
        did not answer). A worker that dies meanwhile is not waited for.

        A worker not yet ready is sent its SIGHUP when it says it is (`_ready`),
        and waited for as the others: its answer, a refusal say, is this
        reload's too. Only a reload that began after the signal answers: a
        worker still busy with an earlier one (that reload's wait over)
        answers that one first.
        """
        sent = self._reload_sent = time.monotonic()
        self._late_adopt = None  # an earlier reload's: this one is newer
        expected = {proc.pid for proc in self.procs.values()}
        self.signal_workers(signal.SIGHUP)

        def answers() -> tuple[dict[int, str], set[int]]:
            # Who answered this reload, and who is draining (not waited for).
            got: dict[int, str] = {}
            draining: set[int] = set()
            for pid, (began, reason, stopping) in self._reloads.items():
                if pid in expected and began >= sent:
                    if stopping:
                        draining.add(pid)
                    else:
                        got[pid] = reason
            return got, draining

        with trio.move_on_after(RELOAD_WAIT):
            while True:
                got, draining = answers()
                if self._live(expected) - draining <= got.keys():
                    break
                self._reload_arrived = trio.Event()
                await self._reload_arrived.wait()
        got, draining = answers()
        refused = [reason for reason in got.values() if reason]
        silent = self._live(expected) - draining - got.keys()
        return len(got) - len(refused), refused, len(silent)

    def _live(self, pids: set[int]) -> set[int]:
        return pids & {proc.pid for proc in self.procs.values()}

    async def _ask_workers(self) -> dict[int, dict[str, int]]:
        """The counters of every ready worker that answered, by pid.

        Waits at most STATS_WAIT, and not at all for a worker that missed the
        last round (stopped, or stuck) until it answers again: a scrape is
        answered from what the parent has, in bounded time.
        """
        async with self._asking:
            self._fresh.clear()
            live = {proc.pid for proc in self.procs.values()} & self.ready
            expected = live - self._late
            self.signal_workers(signal.SIGUSR1)
            with trio.move_on_after(STATS_WAIT):
                while not expected <= self._fresh:
                    self._stats_arrived = trio.Event()
                    await self._stats_arrived.wait()
            self._late |= expected - self._fresh
            # A worker that answered, then exited before the round ended, has left
            # _stats meanwhile (keep_worker): its last values are the tally's.
            return {pid: self._stats[pid] for pid in live & self._fresh if pid in self._stats}

    async def metrics_text(self) -> bytes:
        """A scrape of the parent's endpoint: the sum of every worker's metrics."""
        stats = await self._ask_workers()
        own: Snapshot = {
            "labelled": {"events": dict(self.log.counts)},
            "totals": {"events_dropped": self.log.dropped, "worker_restarts": self.restarts},
            "gauges": {"workers": len(self.procs), "workers_answered": len(stats)},
            "histograms": {},
            "process": self.process.snapshot(),
            **(self.extra_metrics() if self.extra_metrics is not None else {}),
        }
        return render(self.tally.total(own))

    async def collect_stats(self, started: float) -> None:
        """Ask every worker for its counters and write one summed `stats` event."""
        answers = await self._ask_workers()
        totals: dict[str, int] = {}
        for stats in answers.values():
            for key, value in stats.items():
                totals[key] = totals.get(key, 0) + value
        totals["workers"] = len(self.procs)
        totals["workers_answered"] = len(answers)
        totals["worker_restarts"] = self.restarts
        totals["dropped_events"] = totals.get("dropped_events", 0) + self.log.dropped
        self.log.emit(events.stats(totals, trio.current_time() - started))


def _reload_status(workers: int, reloaded: int, refused: list[str], silent: int) -> str:
    # What systemd is told when the workers have answered (each worker that
    # refused wrote its own `config-error`, and the reason to the journal).
    unanswered = f"{silent} did not answer within {RELOAD_WAIT:g} s"
    if refused:
        asked = f"{len(refused)} of {reloaded + len(refused) + silent} workers"
        if not reloaded and not silent:
            return f"{sdnotify.REFUSED} ({asked}): {refused[0]}"
        others = ([f"{reloaded} reloaded"] if reloaded else []) + ([unanswered] if silent else [])
        return f"reload refused by {asked}, {', '.join(others)}: {refused[0]}"
    status = f"{workers} workers; configuration reloaded"
    if silent:
        status += f" ({unanswered})"
    return status


async def _reload(
    sup: Supervisor, reload_settings: Callable[[], Settings], watch: BackendWatch
) -> None:
    # One SIGHUP, in a task of its own (process/reloads.py): waiting for the
    # workers' answers must not hold up a SIGTERM or a SIGUSR1 meanwhile.
    # Before every worker is ready systemd has not heard READY=1 yet: the
    # start's READY=1 ends this reload too (the late workers are sent it on
    # their ready), and a READY=1 of its own would come before them.
    starting = not sup.started.is_set()
    if not starting:
        sdnotify.reloading()
    try:
        settings = reload_settings()
        pinned(sup.settings, settings)  # what the workers would serve: refused here if it must be
        trusted = load_trusted(settings)  # what a worker started from now on is given
    except Exception as exc:  # whatever reading it raised: the old one stays
        reason = str(exc).replace("\n", "; ")
        sup.log.emit(events.config_error(reason))
        if sup.log.stderr is None:  # to the journal too, as daemon._reload does
            print(f"repeld: {sdnotify.REFUSED}: {reason}", file=sys.stderr, flush=True)
        if not starting:
            sdnotify.reload_refused(reason)
        return
    reloaded, refused, silent = await sup.reload_workers()
    if sup.stopping:  # a SIGTERM came meanwhile: STOPPING=1 was the last word
        return
    sup.settle(settings, trusted, reloaded, refused, silent)
    if reloaded or not refused:  # unless every worker that answered refused
        sup.log.reconfigure(settings)
        watch.reconfigure(settings)  # the periodic backend check
    if not starting:
        sdnotify.ready(_reload_status(settings.workers, reloaded, refused, silent))


async def _handle_signals(
    sup: Supervisor,
    signals: AsyncIterator[int],
    reload_settings: Callable[[], Settings],
    started: float,
    watch: BackendWatch,
) -> None:
    collecting = False

    async def collect() -> None:  # SIGUSR1s during a round are that round, as before
        nonlocal collecting
        try:
            await sup.collect_stats(started)
        finally:
            collecting = False

    async def reload() -> None:
        await _reload(sup, reload_settings, watch)

    async with trio.open_nursery() as nursery:
        async for signum in signals:
            if signum == signal.SIGHUP:
                sup.reloads.request(nursery, reload)
            elif signum in (signal.SIGTERM, signal.SIGINT):
                sdnotify.stopping()
                sup.stop()
                sup.signal_workers(signal.SIGTERM)
            elif not collecting:
                collecting = True
                nursery.start_soon(collect)


async def supervise(
    settings: Settings,
    argv: Sequence[str],
    reload_settings: Callable[[], Settings],
    prepare: Callable[[], None] | None = None,
) -> None:
    """The parent of `settings.workers` workers, until they have all drained."""
    try:  # read a moment ago, when the settings were checked: what the workers start with
        trusted = load_trusted(settings)
    except SettingError as exc:
        raise WorkerStartError(str(exc)) from None
    log = EventLog.from_settings(settings)
    sigs = [signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1]
    if hasattr(signal, "SIGINFO"):
        sigs.append(signal.SIGINFO)
    with trio.open_signal_receiver(*sigs) as signals:
        backlog, _ = backlog_for(settings)
        inherited = activation.listen_fds() if "LISTEN_FDS" in os.environ else []
        # A socket per worker spreads the connections and wakes one worker for
        # each; a shared one wakes them all. systemd's sockets take copies only
        # if the unit set ReusePort=yes (and the copies are bound by the user
        # that bound them): else the workers share them.
        balanced = reuseport_option() is not None and all(reuses_port(s) for s, _ in inherited)
        copies = settings.workers if balanced else 1
        sockets: list[list[tuple[socket.socket, Listen]]] = []
        try:
            sockets.append(
                open_listeners(settings, backlog, inherited, reuseport=balanced, first=True)
            )
            # Port 0 (tests) means "any": every copy must share the first one's port.
            same = dataclasses.replace(
                settings,
                listen=tuple(
                    dataclasses.replace(spec, port=s.getsockname()[1]) for s, spec in sockets[0]
                ),
            )
            # A copy of a dual-stack socket must be dual-stack too: a v6-only one
            # joins its port and is given no client at all.
            pairs = zip(sockets[0], same.listen, strict=True)
            dual = [spec for (s, _), spec in pairs if is_dual_stack(s)]
            try:
                for _ in range(copies - 1):
                    sockets.append(open_listeners(same, backlog, reuseport=True, dual_stack=dual))
            except OSError as exc:
                if not inherited:
                    raise
                for socks in sockets[1:]:
                    for s, _ in socks:
                        s.close()
                del sockets[1:]
                print(
                    f"repeld: warning: no socket per worker beside systemd's ({exc.strerror}):"
                    " the workers share every listening socket",
                    file=sys.stderr,
                )
        except BaseException:
            for socks in sockets:
                for s, _ in socks:
                    s.close()
            raise
        sup = Supervisor(settings, argv, sockets, log, trusted)
        # The periodic backend check and its gauges, from outside the workers' chroot.
        watch = BackendWatch(settings, log, view=outside_view(settings))
        sup.extra_metrics = watch.snapshot
        endpoint = None
        if settings.metrics is not None:
            endpoint = open_endpoint(
                settings.metrics, sup.metrics_text, foreground=settings.foreground
            )
        await log.connect_now()
        if prepare is not None:
            prepare()
        started = trio.current_time()
        async with trio.open_nursery() as outer:
            outer.start_soon(log.run)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_handle_signals, sup, signals, reload_settings, started, watch)
                nursery.start_soon(watch.run)
                if endpoint is not None:
                    nursery.start_soon(endpoint.run)
                where = ", ".join(str(spec) for spec in settings.listen)
                bound = " ".join(
                    host_port(h, p) for h, p, *_ in (s.getsockname() for s, _ in sockets[0])
                )
                log.emit(
                    events.lifecycle(
                        EventName.START,
                        version=__version__,
                        listen=bound,
                        **settings.handler_fields(),
                        workers=settings.workers,
                    )
                )
                if settings.foreground:
                    print(
                        f"repeld: listening on {where} (bound {bound}), "
                        f"{settings.handler()}, {settings.workers} workers",
                        file=sys.stderr,
                        flush=True,
                    )
                async with trio.open_nursery() as workers:
                    for index in range(settings.workers):
                        workers.start_soon(sup.keep_worker, index)
                    await sup.started.wait()  # every worker ready, or stopping
                    if not sup.stopping:
                        sdnotify.ready(f"{settings.workers} workers")
                nursery.cancel_scope.cancel()
            log.emit(
                events.lifecycle(EventName.STOP, workers=settings.workers, restarts=sup.restarts)
            )
            outer.cancel_scope.cancel()
        for socks in sockets:
            for s, _ in socks:
                s.close()
    if sup.start_failed is not None:
        raise WorkerStartError(sup.start_failed)

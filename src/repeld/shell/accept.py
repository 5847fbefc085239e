"""The accept phase: take each new connection off a listener, never spinning.

One task per listener accepts in batches and hands every client to the server's
`accepted` callback, which asks the policy and starts the hold. An accept error
that means "out of descriptors or memory for now" pauses the loop for a moment
(as trio's serve_listeners and OpenBSD's spamd do), a client gone before it
was accepted is skipped (after a checkpoint, so the loop can always be
cancelled), and anything else is a broken listener (EBADF, EINVAL, ENOTSOCK):
`accept_loop` raises it, which ends the server loudly instead of spinning on it.

The accept itself is `tcptune.Acceptor` (accept4 in native/tcpnative.c), not
`socket.accept()`: the public method converts the listener's family and type to
enums and builds a socket object per client, about half its cost; the C call
hands back the fd, already non-blocking and close-on-exec, and the address as
text, and the fd is wrapped once here.

Under load the loop gathers: once a wake-up has found two clients or more
waiting, the loop sleeps a while before it accepts again, instead of waiting for
the next connection, and goes on so for as long as each of those sleeps ends
with a client or more to take. Each sleep and wake-up of the process costs more
CPU than a client's whole accept (on the 2-CPU VM of docs/PERFORMANCE.md, over
half of what a client passed at once cost was waking up for it). Each sleep is
sized from what the one before brought, aiming at `GATHER_CLIENTS` clients a
wake-up, between `GATHER_MIN` and `GATHER` (10 ms): the longest up to 1,600
clients a second, shorter above. A client waits at most that much longer to
be taken, nothing beside a greeting
delay of seconds (its hold counts from then); a quiet listener, whose wake-ups
find one client each, takes each at once as before, and a gathered wake-up that
finds nobody goes back to waiting for the next. A flood (a wake-up that takes
`ACCEPT_BATCH` clients or more) turns gathering off for `FLOOD_PAUSE`: such a
listener has many clients at every wake-up anyway, and a sleep would let a small
accept queue (--backlog) overflow; a listener whose queue is shorter than
`GATHER_MIN_BACKLOG` never gathers at all.

A window costs each client up to its length, which clients that each open
their next connection only when the last is done (a relay flushing its queue
over a few connections) feel as fewer messages a second: two such connections
got 183 a second through `pass:` with gathering, 673 without. So the loop
probes: after half a second to a second of being busy (gathering, and the
breaks between) at windows less than half full, it takes each client at once
for a quarter of a second, and if they came 1.5 times as fast then, it does not
gather for 10 s; if not, and they still come, it gathers on at once. Probes
begin and end on ticks of the host's monotonic clock, so that workers probe
together (core/gathering.py, which makes every one of these decisions; this
module only accepts and sleeps).

With --workers each worker has a socket of its own per listener, and one
worker at a time gathers, for all of them: the one that holds the listener's
lead (`Lead`, a byte in a pipe the workers share) takes, at the end of each
window, the clients of every worker's socket, and the others sleep until it
lets the lead go, looking at their own socket every `FOLLOW_CHECK` all the
same (a stopped lead takes nobody's clients). The lead goes back as soon as
its worker stops gathering, at once in a flood (the 64th client of a
wake-up) and when an accept fails for want of descriptors, and is not taken
without room (`room()`: half of a limit in use). Its worker probes for all,
and through its probe and a lean it finds keeps the lead and takes every
socket's clients at once (`Role.AT_ONCE`): it waits on a set of all of them
(shell/poller.py's `Poller`) and on the window timer, armed at the probe's
end, or `PROBE_FIRST` after the lean's last client, so that it lets the lead
go then if nobody came. (It looked at every socket each millisecond through a
probe before, a wake-up each, client or not, and let the lead go at a lean,
for another worker to gather the same clients again.) Two
workers that each gathered their share (in 15 ms windows) cost 14-21 µs more
per handed-off message than one process; with the lead they cost about what
one process costs
(docs/perf-log/2026-12-07-night.md). core/gathering.py's `lead_role` says who
does what.

A window is a wait for a timerfd (`WakeTimer`, from the native module), not a
trio sleep: a trio sleep ends by cancelling its scope, which raises an
exception into the task and catches it, some 140 Python calls per wake-up;
the timer's readability wakes the task like any socket's (8-9 µs less per
handed-off client, docs/perf-log/2026-12-07-timer-and-batch.md). Under a
test's virtual clock, and where there is no timerfd, the loop sleeps in trio.

Each wake-up is one batch for the event log and the pass pool (`Batching`):
the loop calls `defer()` when it wakes and `write_deferred()` before each
wait, so that the events of the clients it took go out from here, in a row,
instead of waking the log's writer task for a turn of trio's loop of its own,
and the pass pool moves its wake-up once for all the batch's hand-offs.

Nor does it gather while repeld relays sessions (`relaying()`): their bytes
wake the process anyway, so gathering would save nothing and only make each
new client wait, which a client that sends a message per short connection
through a relayed `--trusted` path feels in full (bench-relay: a fifth fewer
messages a second with 2 ms windows). Gathering is for a process whose
clients are held, handed to smtpd (`pass:`) or to --exec, where the accept is
all the work there is.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio
import trio.testing

from repeld.config.values import Listen
from repeld.core import gathering
from repeld.service.tcptune import Acceptor, WakeTimer
from repeld.shell.poller import IN, Poller, waiting_bytes

if TYPE_CHECKING:
    from repeld.shell.handoff import BackendTarget

__all__ = [
    "ACCEPT_BACKOFF",
    "ACCEPT_BATCH",
    "FLOOD_PAUSE",
    "FOLLOW_CHECK",
    "GATHER",
    "GATHER_CLIENTS",
    "GATHER_MIN",
    "GATHER_MIN_BACKLOG",
    "RETRY_ERRNOS",
    "Batching",
    "Lead",
    "Listener",
    "accept_loop",
]

#: How long the loop pauses on EMFILE, ENFILE, ENOBUFS or ENOMEM.
ACCEPT_BACKOFF = 0.1
#: Accept errors that mean "out of resources for now": pause, never spin.
_PAUSE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: Accept errors about one client that went away or was refused before we took
#: it (accept(2) on Linux: "network errors for the new socket ... may be
#: returned"; the list is trio's): skip it and take the next. Not every name
#: exists on every platform.
RETRY_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EINTR",
        "ECONNABORTED",
        "EPERM",  # Linux: a firewall rule refused it
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
)
#: Accepts in a row before the accept loop lets other tasks run; a wake-up that
#: takes this many is a flood (no gathering for FLOOD_PAUSE).
ACCEPT_BATCH = 64
#: Under load, the longest the accept loop lets new connections gather before
#: it takes them (seconds): one wake-up for many clients (the module docstring).
GATHER = 0.010
#: The shortest gathering sleep, and how many clients a sleep aims to gather
#: (core/gathering.py decides each window).
GATHER_MIN = gathering.SHORTEST
GATHER_CLIENTS = gathering.CLIENTS
#: No gathering on a listener whose accept queue is shorter (--backlog): a few
#: clients more than a window's worth would overflow it while the loop sleeps.
GATHER_MIN_BACKLOG = 128
FLOOD_PAUSE = gathering.FLOOD_PAUSE


#: The byte that stands for a listener's free lead in its pipe.
LEAD_TOKEN = b"L"
#: The least the lead's probe waits for its end (seconds): a wake-up just past
#: it still ends it.
SHORTEST_WAIT = 0.0005
#: A worker that follows looks at its own socket at least this often: a lead
#: stopped (SIGSTOP, a debugger) or stalled would otherwise leave its
#: clients waiting for nobody.
FOLLOW_CHECK = 0.25


@dataclass(slots=True)
class Lead:
    """One listener's gathering lead, shared by the workers of --workers.

    The lead is a byte in a pipe that every worker inherits (process/
    workers.py), as make's jobserver hands out its tokens: the pipe holds it
    while no worker leads, a worker takes it with a non-blocking read, which
    one worker alone can win, and gives it back with a write, which makes the
    pipe readable for every worker that waits for it (`token`). `siblings`
    are the other workers' sockets of the same listener, whose clients the
    lead's windows take too (core/gathering.py's `lead_role` says when).
    """

    token: int
    give_back: int
    siblings: list[socket.socket]
    #: This worker holds the lead now.
    holds: bool = False

    def claim(self) -> bool:
        """Take the lead if it is free: True if this worker holds it now."""
        try:
            self.holds = os.read(self.token, 1) == LEAD_TOKEN
        except OSError:  # BlockingIOError: another worker holds it
            self.holds = False
        return self.holds

    def free(self) -> bool:
        """No worker holds the lead (it is not taken)."""
        try:
            return waiting_bytes(self.token) > 0
        except OSError:  # never on a pipe; if so, listen as without a lead
            return True

    def release(self) -> None:
        """Give the lead back, if this worker holds it."""
        if not self.holds:
            return
        self.holds = False
        restore_lead(self.token, self.give_back)

    def close(self) -> None:
        """Give the lead back and close this worker's copies of the siblings."""
        self.release()
        for sock in self.siblings:
            sock.close()


def restore_lead(token: int, give_back: int) -> None:
    """Give a lead back into the pipe unless it holds one already.

    The parent calls it after a worker died (the dead one may have held it),
    and cannot tell whether the dead one did: if not, there are two. A lead is
    given back (`Lead.release` too) only into an empty pipe, so a second one
    goes away, and the last one never does: two workers giving theirs back at
    once may both write (two again), never neither.
    """
    try:
        if waiting_bytes(token) == 0:
            os.write(give_back, LEAD_TOKEN)
    except OSError:
        pass


@dataclass(slots=True)
class Listener:
    """One listening socket and what its clients share."""

    sock: socket.socket
    spec: Listen
    #: The server address for every connection on a non-wildcard listener.
    local: tuple[str, int] | None = field(default=None)
    #: This listener's own MTA (,backend=), else None for --backend.
    backend: BackendTarget | None = field(default=None)
    #: The workers' shared gathering lead (--workers), else None.
    lead: Lead | None = field(default=None)


Accepted = Callable[[socket.socket, tuple[object, ...], Listener], None]


class Batching(Protocol):
    """Told where each wake-up's batch of clients begins and ends (EventLog)."""

    def defer(self) -> None: ...

    def write_deferred(self) -> None: ...


class _NoBatching:
    def defer(self) -> None:
        pass

    def write_deferred(self) -> None:
        pass


_NO_BATCHING = _NoBatching()


async def accept_loop(
    listener: Listener,
    accepted: Accepted,
    on_pause: Callable[[Listener, OSError], None],
    relaying: Callable[[], int] = lambda: 0,
    backlog: int = GATHER_MIN_BACKLOG,
    longest: float = GATHER,
    full: float = GATHER_CLIENTS / 2,
    batching: Batching | None = None,
    room: Callable[[], bool] = lambda: True,
) -> None:
    """Accept from `listener` until cancelled; `accepted(sock, addr, listener)` for each.

    `on_pause(listener, exc)` is told of each pause on EMFILE, ENFILE, ENOBUFS
    or ENOMEM. Any error not in RETRY_ERRNOS or those escapes: the listener is
    broken, and the caller ends the server with it. `relaying()`: how many
    sessions repeld relays now; while there are any, the loop never gathers.
    `backlog`: the listener's accept queue; under GATHER_MIN_BACKLOG, never.
    `longest`: the longest gathering sleep; `full`: the clients a window takes
    on average at which busy times are not probed (core/gathering.py).
    `listener.lead`: the lead shared by --workers (`Lead`), with which one
    worker at a time gathers, for all of them; `room()`: this worker has room
    for more clients (core/gathering.py's `room`), else it does not lead.
    `batching` (the EventLog) is told when each
    wake-up's batch of clients begins (`defer`) and ends (`write_deferred`,
    before every wait).
    """
    if batching is None:
        batching = _NO_BATCHING
    gather = gathering.Gathering(longest, backlog >= GATHER_MIN_BACKLOG, ACCEPT_BATCH, full)
    # The gathering's time is the host's monotonic clock, which every worker
    # reads alike, so that their probes begin on the same ticks (trio's clock
    # has an offset of its own in each process, and a test's clock is virtual:
    # only the difference is taken once).
    host_clock = time.monotonic() - trio.current_time()
    timer = _window_timer()
    try:
        await _accept(
            listener, accepted, on_pause, relaying, gather, host_clock, timer, batching, room
        )
    finally:
        if timer is not None:
            timer.close()


async def _wait_at_most(fd: int, seconds: float) -> None:
    """Wait for `fd` to be readable, `seconds` at most: the lead given back
    (FOLLOW_CHECK), or the end of the lead's wait on every socket where
    there is no timer."""
    with trio.move_on_after(seconds):
        await trio.lowlevel.wait_readable(fd)


def _every_socket(lsock: socket.socket, lead: Lead, timer: WakeTimer | None) -> Poller | None:
    """A set of every worker's socket of the listener (and the timer), for the
    lead to wait on as one fd through a probe or a lean (`Role.AT_ONCE`): it
    takes each client at once, whichever socket it came to, and wakes at the
    time the gathering gave if none did. None if the kernel refuses it (out
    of descriptors, of epoll watches): a reason to do without, never to stop
    accepting.

    The sockets are inherited by every worker (the poller's rule 1 names this
    exception): the set lives no longer than they do in this worker, and is
    closed first."""
    try:
        every = Poller()
    except OSError:
        return None
    try:
        for fd in (lsock.fileno(), *(s.fileno() for s in lead.siblings)):
            every.update(fd, 0, IN)
        if timer is not None:
            every.update(timer.fd, 0, IN)
    except OSError:
        every.close()
        return None
    except BaseException:
        every.close()
        raise
    return every


def _drop_timer(everyone: Poller | None, timer: WakeTimer) -> None:
    """The loop gives up its timer (it refused to be armed): out of the set too,
    where an expiry nobody reads would keep the set readable for ever."""
    if everyone is not None:
        everyone.update(timer.fd, IN, 0)


def _window_timer() -> WakeTimer | None:
    """The kernel's timer for the windows, or None to sleep in trio: where there
    is no timerfd, under a test's virtual clock, which cannot drive one, and if
    the kernel refuses one (out of descriptors, a seccomp filter): the timer
    saves CPU, and is never a reason to stop accepting."""
    if isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
        return None
    try:
        return WakeTimer.open()
    except OSError:
        return None


async def _accept(
    listener: Listener,
    accepted: Accepted,
    on_pause: Callable[[Listener, OSError], None],
    relaying: Callable[[], int],
    gather: gathering.Gathering,
    host_clock: float,
    timer: WakeTimer | None,
    batching: Batching,
    room: Callable[[], bool],
) -> None:
    lsock = listener.sock
    family, kind, proto = lsock.family, lsock.type | socket.SOCK_NONBLOCK, lsock.proto
    lead = listener.lead
    own = [Acceptor(lsock.fileno()).accept]
    # Holding the lead, a wake-up takes the clients of every worker's socket.
    every = own + [Acceptor(s.fileno()).accept for s in lead.siblings] if lead else own
    # Through a probe or a lean the lead waits on all of them (and the timer).
    everyone = _every_socket(lsock, lead, timer) if lead is not None else None
    # (None without a lead, or if the kernel refused the set: the lead then
    # gathers only, and lets the lead go for a probe or a lean.)
    sources = own
    source = 0  # the socket of `sources` taken from now
    batch = 0  # clients this wake-up has taken
    pause: Coroutine[object, object, None]
    batching.defer()
    try:
        while True:
            try:
                client = sources[source]()
            except OSError as exc:
                if exc.errno in _PAUSE_ERRNOS:
                    # Out of descriptors or memory: stop accepting for a moment
                    # (spamd does the same) instead of spinning on the error.
                    on_pause(listener, exc)
                    pause = trio.sleep(ACCEPT_BACKOFF)
                    if lead is not None and lead.holds:
                        # This worker's limit: the others, which wait for the
                        # lead, take their clients themselves meanwhile.
                        lead.release()
                        sources, source = own, 0
                elif exc.errno in RETRY_ERRNOS:
                    # That client is gone: take the next, with a checkpoint so
                    # that even an endless run of them can be cancelled.
                    pause = trio.lowlevel.checkpoint()
                else:
                    raise
            else:
                if client is not None:
                    fd, addr = client
                    # SOCK_NONBLOCK in the type tells the socket object it is
                    # non-blocking already (accept4 made it so): no fcntl.
                    accepted(socket.socket(family, kind, proto, fd), addr, listener)
                    batch += 1
                    if batch % ACCEPT_BATCH:
                        continue
                    pause = trio.lowlevel.checkpoint()
                    if lead is not None and lead.holds:
                        # A flood (core/gathering.py): every worker takes its
                        # own, now, not at the end of a wake-up that a socket
                        # never empty would never reach.
                        lead.release()
                        sources, source = own, 0
                elif source + 1 < len(sources):  # the lead: the next worker's socket
                    source += 1
                    continue
                else:
                    # Busy: let the next clients gather, then take them all in
                    # one go (core/gathering.py says when, and when not).
                    source = 0
                    now = trio.current_time() + host_clock
                    window = gather.after_wakeup(batch, now, relaying() > 0)
                    batch = 0
                    role = gathering.Role.LISTEN if window is None else gathering.Role.GATHER
                    # Every worker's clients at once (a probe, a lean) until
                    # then: only ever without a window, and with the set.
                    until = (
                        gather.at_once_until(now)
                        if window is None and everyone is not None
                        else None
                    )
                    if lead is not None:
                        # (room() only for a worker that would gather, or lead
                        # at once: otherwise the role does not depend on it.)
                        holds = lead.holds
                        roomy = (window is not None or until is not None) and room()
                        flood = gather.flooded(now)
                        if holds or flood:
                            free = False
                        elif roomy:
                            free = lead.claim()
                            if free:
                                gather.took_lead(now)
                        else:
                            free = lead.free()
                        role = gathering.lead_role(
                            window,
                            holds,
                            free,
                            room=roomy,
                            flood=flood,
                            at_once=until is not None,
                        )
                        if role is gathering.Role.LISTEN:
                            lead.release()
                        sources = every if lead.holds else own
                    if role is gathering.Role.FOLLOW and lead is not None:
                        # The lead takes this socket's clients: wake when it is let go.
                        pause = _wait_at_most(lead.token, FOLLOW_CHECK)
                    elif (
                        role is gathering.Role.AT_ONCE
                        and everyone is not None
                        and until is not None
                    ):
                        # Every worker's clients at once (a probe, a lean), until
                        # the time the gathering gave: then it lets the lead go.
                        left = max(until - now, SHORTEST_WAIT)
                        armed = False
                        if timer is not None:
                            try:
                                timer.arm(left)  # in the set: it ends the wait
                                armed = True
                            except OSError:  # never; if so, trio's scope
                                _drop_timer(everyone, timer)
                                timer = None
                        if armed:
                            pause = trio.lowlevel.wait_readable(everyone.fileno())
                        else:
                            pause = _wait_at_most(everyone.fileno(), left)
                    elif window is None:
                        pause = trio.lowlevel.wait_readable(lsock)
                    elif timer is not None:
                        # A wait for the timer's fd ends without the exception
                        # that ends a trio sleep (service/tcptune.py's WakeTimer).
                        try:
                            timer.arm(window)
                        except OSError:  # never: it was made for this; if so, trio's
                            _drop_timer(everyone, timer)
                            timer = None
                            pause = trio.sleep(window)
                        else:
                            pause = trio.lowlevel.wait_readable(timer.fd)
                    else:
                        pause = trio.sleep(window)
            # Every wait of the loop: the events of this wake-up's clients go
            # out now (shell/eventlog.py), not in a turn of trio's loop of
            # their own.
            try:
                batching.write_deferred()
            except BaseException:
                pause.close()  # never awaited
                raise
            await pause
            batching.defer()
    finally:
        if everyone is not None:
            everyone.close()
        if lead is not None:
            lead.release()
        batching.write_deferred()

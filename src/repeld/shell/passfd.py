"""The pass pool: hand passed clients' sockets to Postfix's smtpd, as postscreen does.

For a `pass:PATH` backend, `PassPool.hand_off` does in one go what
postscreen's `psc_send_socket` does (core/postfixpass.py says which bytes and
why): a non-blocking connect to the pass service's UNIX-domain socket, the
client's descriptor sent with SCM_RIGHTS on one NUL byte (sendmsg), then the
client's and the server's endpoints as an attr_print0 list (send). None of
these waits: a UNIX-domain connect either succeeds at once or fails (EAGAIN
when the service's listen queue is full), and the few bytes fit an empty
socket buffer. What is left is waiting for smtpd to close the channel, the
sign that it holds the client, and that wait costs no wake-up of its own:

- smtpd takes a descriptor within a fraction of a millisecond, so by the time
  of the next hand-off the previous channels are closed: `hand_off` first
  reads the oldest waiting channels (one non-blocking `recv` each, end of file
  and done) and stops at the first still open;
- whatever is still waiting after `SWEEP_INTERVAL` (no next hand-off came, or
  smtpd is slow) is read once more by the pool's task, and a channel open even
  then goes into the pool's own epoll or kqueue set (shell/poller.py), served
  from that one task as the relay pool serves its sessions, with a deadline
  each. A hand-off costs no task of its own, and in the common case neither
  a registration in a set nor a wake-up of repeld: per client, one wake-up
  fewer than waiting on the set for every channel (docs/PERFORMANCE.md);
- the pool's task wakes only for a sweep that has something to read: each
  hand-off moves its wake-up to the oldest channel still unread (`_rearm`),
  so under steady load, where every hand-off settles the ones before it, the
  task is not woken at all (before, it woke every SWEEP_INTERVAL for nothing:
  a tenth of a handed-off client's CPU). The accept loop's hand-offs move it
  once per wake-up's batch (`defer`, `write_deferred`, as the event log's
  writes are batched): three Python calls fewer per client, 1.3-1.7 µs a
  message (docs/perf-log/2026-12-07-day.md).

Until smtpd closes the channel repeld keeps its copy of the client's socket,
as postscreen does, so that a hand-off that fails late (no answer within the
bound, or a service that answers with bytes: not a pass service) can still
tell the client `421 4.3.2`. Once it sees smtpd has it (at the next
hand-off, or within `SWEEP_INTERVAL`), repeld closes its copy and holds
nothing of the session: no fd, no task. Whatever repeld
peeked (MSG_PEEK) is still unread in the socket, so smtpd reads a remembered
client's early pipelined commands itself.

`done(outcome, detail)` is called once per hand-off: from `hand_off` itself
when the connect or the send fails, else from a later `hand_off` or the
pool's task. Only the
channel is ever in the pool's set; the client's socket, which smtpd comes to
share, never is (the poller's rule 1), and it has left the pen's set before
its verdict is carried out.
"""

from __future__ import annotations

import _socket
import array
import collections
import heapq
import itertools
import math
import socket
from collections import Counter
from collections.abc import Callable

import trio

from repeld.core.names import HandOffResult
from repeld.core.postfixpass import FD_CARRIER, connect_outcome, send_outcome
from repeld.shell.poller import IN, Poller, watch

__all__ = ["Done", "PassPool", "PassPoolClosed", "connect_service"]

#: Told how a hand-off ended, once, with a detail for the event ("" if none).
Done = Callable[[HandOffResult, str], None]

_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0) | getattr(socket, "SOCK_CLOEXEC", 0)
#: Most ready channels handled per wake-up.
_BATCH = 512
#: How long a channel may wait, unread, for the next hand-off to find it
#: closed; then the pool's task reads it, and puts it in its set if still open.
#: Long enough that clients arriving 4 a second or more never wake repeld for
#: it: 20 ms woke it for half of the clients at 50 a second, at the cost of a
#: wake-up from idle (855 against 632 µs a handed-off client). It bounds only
#: how long repeld keeps its copy of a client smtpd has taken, and when a
#: late failure is seen: the deadline (--connect-timeout) is each channel's own.
SWEEP_INTERVAL = 0.25
#: A hand-off reads no channel younger than this (seconds): smtpd has seldom
#: taken one handed on in the same wake-up of repeld (a batch of gathered
#: clients is handed on within it), and each read that finds it open costs a
#: system call and an exception for nothing. The next wake-up's hand-offs, or
#: the sweep, read it instead.
COLLECT_AGE = 0.001
#: Most waiting channels a hand-off reads before its own is sent on.
_COLLECT = 8
#: When the pool is stopped (no grace left, or none given), how long it still
#: gives smtpd to close the channels sent last: their descriptors are queued at
#: smtpd already, and a client smtpd takes must not have been told 421 first.
STOP_WAIT = 0.05
#: A hand-off moves the pool's wake-up later once it is this much too early
#: (`_rearm`): about once per batch of hand-offs, not once per hand-off.
_REARM_SLACK = SWEEP_INTERVAL / 4


class PassPoolClosed(RuntimeError):
    """The pool stopped (its `run` ended): no more hand-offs."""


class _Channel:
    """One hand-off whose channel is open: waiting for smtpd to close it."""

    __slots__ = ("chan", "client", "deadline", "done", "due", "open", "registered", "sent")

    def __init__(
        self,
        chan: _socket.socket,
        client: socket.socket,
        sent_at: float,
        deadline: float,
        done: Done,
    ) -> None:
        self.chan = chan
        self.client = client
        self.sent = sent_at
        self.deadline = deadline
        #: When the pool's task reads it if no hand-off has: the sweep, or the
        #: deadline if that comes first (a --connect-timeout under SWEEP_INTERVAL).
        self.due = min(sent_at + SWEEP_INTERVAL, deadline)
        self.done = done
        self.open = True
        #: In the pool's set (after a sweep found it still open).
        self.registered = False


def _first_due(fresh: collections.deque[_Channel]) -> float:
    """When the first of the unread channels is due (`fresh` is not empty).

    The oldest, with one --connect-timeout for all; after a reload that shortens
    it the newest may be due first, and one between them waits for either's
    sweep (SWEEP_INTERVAL at most)."""
    oldest, newest = fresh[0].due, fresh[-1].due
    return newest if newest < oldest else oldest


def connect_service(path: str) -> socket.socket:
    """A non-blocking UNIX-domain stream socket connected to `path`; OSError if not."""
    chan = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | _NONBLOCK)
    if not _NONBLOCK:
        chan.setblocking(False)
    try:
        chan.connect(path)
    except BaseException:
        chan.close()
        raise
    return chan


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


class PassPool:
    """Hands clients to pass services from one task: start `run()`, then `hand_off`."""

    def __init__(self, on_error: Callable[[str], None]) -> None:
        self._on_error = on_error
        self._poller = Poller()
        #: Channels sent and not read yet, oldest first.
        self._fresh: collections.deque[_Channel] = collections.deque()
        #: Channels in the pool's set, by fd.
        self._channels: dict[int, _Channel] = {}
        self._heap: list[tuple[float, int, _Channel]] = []
        self._seq = itertools.count()
        self._wake: trio.CancelScope | None = None
        self._closed = False
        #: Within an accept loop's batch (`defer`): the wake-up is moved at its end.
        self._deferring = False
        self._rearm_due = False
        #: trio.current_time, or once `run` has begun the run's clock itself:
        #: one call per hand-off where trio.current_time makes three.
        self._now: Callable[[], float] = trio.current_time
        #: Hand-offs by how they ended (HandOffResult values), for repeld_handoffs_total.
        self.outcomes: Counter[str] = Counter()

    def __len__(self) -> int:
        """Hand-offs waiting for smtpd to close the channel now (or for repeld to see it)."""
        return len(self._fresh) + len(self._channels)

    def hand_off(
        self, client: socket.socket, path: str, attributes: bytes, timeout: float, done: Done
    ) -> None:
        """Send `client` and `attributes` to the pass service at `path`.

        `done(outcome, detail)` is called once: TAKEN when smtpd closed the
        channel (the caller then closes `client`), else the cause of the
        failure (the caller tells the client 421). Raises PassPoolClosed if
        the pool has stopped.
        """
        if self._closed:
            raise PassPoolClosed("the pass pool is closed")
        # The C-level socket type: the channel needs none of socket.socket's
        # Python layer, and this runs once per hand-off.
        try:
            chan = _socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | _NONBLOCK)
        except OSError as exc:  # out of descriptors: a failed hand-off like any other
            self._end(done, HandOffResult.ERROR, f"no socket for the channel: {_why(exc)}")
            return
        if not _NONBLOCK:
            chan.setblocking(False)
        try:
            chan.connect(path)
        except OSError as exc:
            chan.close()
            self._end(done, connect_outcome(exc.errno), f"{path}: {_why(exc)}")
            return
        try:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [client.fileno()]))]
            # Two writes, as postscreen makes them: one sendmsg carrying both
            # works on Linux but measured no cheaper (bench/handoff-cost).
            chan.sendmsg([FD_CARRIER], rights)
            sent = chan.send(attributes)
        except OSError as exc:
            chan.close()
            self._end(done, send_outcome(exc.errno), _why(exc))
            return
        if sent != len(attributes):  # never on an empty buffer; if so, not a pass service
            chan.close()
            self._end(done, HandOffResult.DESCRIPTOR_REFUSED, "the attributes did not fit")
            return
        fresh = self._fresh
        now = self._now()
        if fresh and now - fresh[0].sent >= COLLECT_AGE:
            self._collect(fresh, now - COLLECT_AGE)
        entry = _Channel(chan, client, now, now + timeout, done)
        fresh.append(entry)
        if self._deferring:  # the accept loop's batch: rearmed once, at its end
            self._rearm_due = True
            return
        wake = self._wake
        if wake is not None:
            self._rearm(wake, fresh)

    def defer(self) -> None:
        """Until `write_deferred`, hand-offs leave the pool's wake-up as it is: the
        accept loop hands a batch of clients on without waiting between them."""
        self._deferring = True

    def write_deferred(self) -> None:
        """The batch is over: move the pool's wake-up once for all of it."""
        self._deferring = False
        if self._rearm_due:
            self._rearm_due = False
            wake = self._wake
            if wake is not None and self._fresh:
                self._rearm(wake, self._fresh)

    def _rearm(self, wake: trio.CancelScope, fresh: collections.deque[_Channel]) -> None:
        """Set the pool's wake-up to the next channel due: earlier for a new one,
        later once the hand-offs have settled the channels it was set for.

        Under steady load each hand-off settles the ones before it, so the
        sweep it was set for finds nothing: moving it on saves that wake-up
        of the process, one per SWEEP_INTERVAL (and per worker), which cost
        about a tenth of a handed-off client's CPU (docs/PERFORMANCE.md).
        """
        due = _first_due(fresh)
        heap = self._heap
        if heap and heap[0][0] < due:  # a channel in the set is due first
            due = heap[0][0]
        deadline = wake.deadline
        if due < deadline or due - deadline > _REARM_SLACK:
            wake.deadline = due

    def _collect(self, fresh: collections.deque[_Channel], sent_by: float) -> None:
        """Settle the oldest waiting channels smtpd has closed, up to the first still
        open or sent after `sent_by`."""
        for _ in range(_COLLECT):
            if not fresh or fresh[0].sent > sent_by:
                return
            entry = fresh.popleft()
            if not self._look(entry):
                fresh.appendleft(entry)  # still open: so, most likely, are the newer ones
                return

    async def run(self) -> None:
        """Wait for every channel until cancelled; then the pool is closed.

        Hand-offs still waiting then get STOP_WAIT more (shielded) for smtpd
        to close their channels: a channel it has closed is TAKEN, any other
        ends as TIMEOUT (the client is told 421: smtpd has not taken it).
        """
        if self._closed:
            raise PassPoolClosed("the pass pool is closed")
        self._now = trio.lowlevel.current_clock().current_time
        try:
            await watch(self._poller, self._expire, self._serve, self._set_wake)
        finally:
            self._closed = True
            waiting = [*self._fresh, *self._channels.values()]
            self._fresh.clear()
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_WAIT):
                while waiting:
                    waiting = [entry for entry in waiting if not self._look(entry)]
                    if waiting:
                        await trio.sleep(STOP_WAIT / 10)
            for entry in waiting:
                self._last_look(entry)
            self._poller.close()

    def _last_look(self, entry: _Channel) -> None:
        if not self._look(entry):
            self._finish(entry, HandOffResult.TIMEOUT, "repeld is stopping")

    def _set_wake(self, scope: trio.CancelScope | None) -> None:
        self._wake = scope

    def _expire(self, now: float) -> float:
        fresh = self._fresh
        due = _first_due(fresh) if fresh else math.inf
        if due <= now:
            self._sweep(fresh, now)  # reads them all: none is left unread
            due = math.inf
        heap = self._heap
        while heap:
            deadline, _, entry = heap[0]
            if entry.open and deadline > now:
                break
            heapq.heappop(heap)
            if entry.open:
                self._finish(entry, HandOffResult.TIMEOUT, "smtpd did not take the client in time")
        first = heap[0][0] if heap else math.inf
        return min(first, due)

    def _sweep(self, fresh: collections.deque[_Channel], now: float) -> None:
        """Read every unread channel once: settle the closed, put the open in the set."""
        while fresh:
            entry = fresh.popleft()
            if not self._look(entry):
                self._register(entry, now)

    def _register(self, entry: _Channel, now: float) -> None:
        if entry.deadline <= now:
            self._finish(entry, HandOffResult.TIMEOUT, "smtpd did not take the client in time")
            return
        fd = entry.chan.fileno()
        try:
            self._poller.update(fd, 0, IN)
        except OSError as exc:  # ENOMEM, ENOSPC (max_user_watches)
            self._finish(entry, HandOffResult.ERROR, _why(exc))
            return
        entry.registered = True
        self._channels[fd] = entry
        heap = self._heap
        if len(heap) > 2 * len(self._channels) + 1024:  # mostly finished: drop those
            heap[:] = [item for item in heap if item[2].open]
            heapq.heapify(heap)
        heapq.heappush(heap, (entry.deadline, next(self._seq), entry))

    def _serve(self, now: float) -> int:
        ready = self._poller.ready(_BATCH)
        for fd, _ in ready:
            entry = self._channels.get(fd)
            if entry is not None:
                self._look(entry)
        return len(ready)

    def _look(self, entry: _Channel) -> bool:
        """Read the channel once and settle the hand-off by what it says: end of
        file (smtpd has the client), bytes (not a pass service) or an error.
        False if it is still open: smtpd has not answered yet."""
        try:
            data = entry.chan.recv(64)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._finish(entry, send_outcome(exc.errno), _why(exc))
            return True
        if data:  # an SMTP greeting, say: a `unix` service, not `pass`
            what = data[:40].decode("ascii", "replace").strip()
            self._finish(
                entry,
                HandOffResult.DESCRIPTOR_REFUSED,
                f"the service answered {what!r}: not a pass service?",
            )
        else:
            self._finish(entry, HandOffResult.TAKEN, "")
        return True

    def _finish(self, entry: _Channel, outcome: HandOffResult, detail: str) -> None:
        entry.open = False
        if entry.registered:
            fd = entry.chan.fileno()
            del self._channels[fd]
            try:
                self._poller.update(fd, IN, 0)
            except OSError as exc:  # a broken poller: the channel is closed all the same
                self._on_error(f"pass pool: cannot unwatch a channel: {exc!r}")
        entry.chan.close()
        self._end(entry.done, outcome, detail)

    def _end(self, done: Done, outcome: HandOffResult, detail: str) -> None:
        self.outcomes[outcome] += 1
        try:
            done(outcome, detail)
        except Exception as exc:  # one hand-off's bug never stops the others
            self._on_error(f"pass hand-off: {exc!r}")

"""The holding pen: one task watches every connection that waits for its greeting.

A task per silent connection costs kilobytes; a held connection here costs a
socket object, a `Held` record and a slot in a deadline queue. The pen keeps
its own epoll (Linux) or kqueue (BSD) set of held sockets and asks trio to wake
it when that set is readable or when the earliest deadline is due, much as
OpenBSD's spamd runs one poll loop over all its clients.

Deadlines are kept in FIFO queues, one per delay value: connections accepted
later with the same delay are due later, so the queue is already sorted and
costs one pointer per connection (a reload that changes the delay starts a new
queue). What a peek or the deadline means is decided by `core.Hold`; the pen
only observes the socket and hands the verdict to `on_verdict`. An answer from
outside that may end a client's hold (the cache's, the lists'; the hold says
which) is fed after one more peek (`settle(..., look)`): the core hears what the
socket holds first, as if the pen had served its readiness before the answer's
task ran. A handler that fails is the pen's to survive: the connection is
closed and `on_error(held, message)` reports it (the server writes an `error`
event).

A silent client the DNS lists hold beyond its delay (--dnsbl-action delay)
leaves its delay's queue at the delay's end like everyone else and waits on
in the heap below, so it never holds up the clients queued behind it.

A talker whose verdict waits (for the pass cache, or to the end of the delay
in observe mode) is muted: its bytes are in, so the level-triggered set must
stop reporting them or the pen would spin. Its socket's low-water mark
(SO_RCVLOWAT) goes up to the core's FLOOD_LIMIT, so it is reported again only
when it leaves (EPOLLRDHUP, an error; EV_EOF on kqueue, where a reset looks
like an end of file and is found out at the hand-off) or when that many bytes
wait unread (or, on Linux, when they fill its buffer): then the hold hears of
the flood (`Hold.flood`) and the bytes are not kept for the whole delay. A
flood is looked for, too, before an answer or a deadline decides a muted
talker, since the pen may not have served the readiness yet. The
mark goes back to 1 as the talker leaves the pen, before the MTA or repeld's
own dialogue reads from it. Its deadline goes in a small heap, as only
talkers are ever in it.

An entry stays in its queue after its connection is decided (a hang-up, an
early talker, a cache answer) and is skipped at its deadline; so that a client
that connects and resets cannot make the queues grow for a whole `--delay`,
they are compacted in place whenever the dead entries outnumber the held
connections (and a small slack): each compaction costs what was queued, and
at least as many releases paid for it, so it is amortised O(1) per connection.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from repeld.core.events import ConnInfo
from repeld.core.hold import FLOOD_LIMIT, PEEK_LIMIT, Hold, Logged, Mute, Verdict, Wait
from repeld.shell.poller import ERROR_READY, HUP, IN, Poller, waiting_bytes, watch

if TYPE_CHECKING:
    from repeld.shell.handoff import BackendTarget

__all__ = ["Held", "HoldingPen", "PenStatistics", "spoke_first"]

_PEEK_FLAGS = socket.MSG_PEEK | getattr(socket, "MSG_DONTWAIT", 0)
_BATCH = 512
#: Dead queue entries tolerated beyond the held count before a compaction.
_SLACK = 64
#: What a muted talker is watched for: its leaving, and its bytes reaching the
#: low-water mark (FLOOD_LIMIT). On kqueue, where HUP is 0, the read filter
#: reports both (EV_EOF, or that many bytes).
_MUTED = IN | HUP


class Held:
    """One connection waiting for its greeting (`backend`: its listener's own MTA)."""

    __slots__ = ("backend", "conn", "hold", "sock")

    def __init__(
        self,
        sock: socket.socket,
        conn: ConnInfo,
        hold: Hold,
        backend: BackendTarget | None = None,
    ) -> None:
        self.sock = sock
        self.conn = conn
        self.hold = hold
        self.backend = backend


def _set_lowat(sock: socket.socket, nbytes: int) -> None:
    # Readable only once `nbytes` wait (or at end of file, or in error).
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
    except OSError:  # gone already: its leaving is reported all the same
        pass


def spoke_first(sock: socket.socket) -> bool | None:
    """The client sent something, or closed its side, before repeld wrote a byte
    (the teaser: one non-blocking peek, as the pen's, no byte consumed); None if
    the connection failed (a reset, whose error the peek has taken)."""
    try:
        sock.recv(1, _PEEK_FLAGS)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _pending(sock: socket.socket) -> int:
    # How many bytes are waiting in all, so a flood is counted beyond the peek.
    try:
        return waiting_bytes(sock.fileno())
    except OSError:
        return 0


@dataclass(frozen=True, slots=True)
class PenStatistics:
    """What the pen holds now (trio's `statistics()` style).

    `queued` counts the entries of the deadline queues and the muted talkers'
    heap, dead ones included; it stays below 2 * `held` + a small slack.
    """

    held: int
    muted: int
    queued: int
    compactions: int


class HoldingPen:
    """Holds silent connections until a verdict; `on_verdict` gets each one once."""

    def __init__(
        self,
        on_verdict: Callable[[Held, Verdict], None],
        on_error: Callable[[Held, str], None],
        client_key: Callable[[str], str] = str,
    ) -> None:
        self._on_verdict = on_verdict
        self._on_error = on_error
        self._poller = Poller()
        self._held: dict[int, Held] = {}
        self._queues: dict[float, collections.deque[Held]] = {}
        self._wake: trio.CancelScope | None = None
        #: The fds of muted talkers; their deadlines other than the delay's, and
        #: those of silent clients held beyond the delay, are in `_waits`.
        self._muted: set[int] = set()
        #: Muted talkers that half-closed: out of the set, waiting for a deadline.
        self._deaf: set[int] = set()
        self._waits: list[tuple[float, int, Held]] = []
        self._seq = itertools.count()
        #: Entries in the deadline queues and the heap, dead ones included.
        self._queued = 0
        self._compactions = 0
        #: How many connections each client has in the pen now, by `client_key`
        #: of its address (--max-per-client: an IPv6 client by its network).
        self.per_client: dict[str, int] = {}
        self.client_key = client_key

    def __len__(self) -> int:
        return len(self._held)

    def statistics(self) -> PenStatistics:
        return PenStatistics(len(self._held), len(self._muted), self._queued, self._compactions)

    def add(self, held: Held) -> None:
        """Start watching `held`; its deadline is `held.hold.deadline`.

        OSError, and nothing changed, if the kernel will not watch one more
        socket (ENOSPC: fs.epoll.max_user_watches; ENOMEM)."""
        fd = held.sock.fileno()
        self._poller.update(fd, 0, IN)
        self._held[fd] = held
        client = self.client_key(held.conn.client)
        self.per_client[client] = self.per_client.get(client, 0) + 1
        delay = held.hold.deadline - held.hold.accepted_at
        queue = self._queues.get(delay)
        if queue is None:
            queue = self._queues[delay] = collections.deque()
        queue.append(held)
        self._queued += 1
        if self._wake is not None and held.hold.deadline < self._wake.deadline:
            self._wake.deadline = held.hold.deadline

    def settle(
        self,
        held: Held,
        decide: Callable[[float], Verdict],
        look: Callable[[float], bool] | None = None,
    ) -> bool:
        """Decide a still-held connection from outside the pen (a cache or DNS answer).

        `decide(now)` is called only if `held` is still waiting; True if it was
        called. If `look(now)` says so (the hold's `look_before_cache` and
        `look_before_lists`), peek first, as if the pen had served the socket's
        readiness before the answer; a client decided by what the peek found
        (it left, or its talk stands) is not fed the answer: False.
        """
        if held.hold.done or self._held.get(held.sock.fileno()) is not held:
            return False
        now = trio.current_time()
        if held.hold.muted:
            if self._flooded(held, now):  # its readiness, not yet served, comes first
                return False
        elif look is not None and look(now):
            self._peek(held, now, due=False)
            if not self._live(held):
                return False
        self._decide(held, decide(now))
        return True

    def _release(self, held: Held) -> None:
        fd = held.sock.fileno()
        if self._held.get(fd) is held:
            del self._held[fd]
            if fd in self._muted:
                self._muted.discard(fd)
                if fd in self._deaf:
                    self._deaf.discard(fd)
                else:
                    self._poller.update(fd, _MUTED, 0)
                _set_lowat(held.sock, 1)  # as it came: the MTA reads every byte
            else:
                self._poller.update(fd, IN, 0)
            client = self.client_key(held.conn.client)
            left = self.per_client[client] - 1
            if left:
                self.per_client[client] = left
            else:
                del self.per_client[client]
            if self._queued > 2 * len(self._held) + _SLACK:
                self._compact()

    def _compact(self) -> None:
        # Drop the entries of decided connections, in place: `_expire` may be
        # walking these very queues (a release happens inside its loop), and
        # no queue is added or removed here. Order and deadlines are kept.
        live = self._live
        queued = 0
        for queue in self._queues.values():
            kept = [held for held in queue if live(held)]
            queue.clear()
            queue.extend(kept)
            queued += len(kept)
        waits = self._waits
        waits[:] = [entry for entry in waits if live(entry[2])]
        heapq.heapify(waits)
        self._queued = queued + len(waits)
        self._compactions += 1

    def _decide(self, held: Held, verdict: Verdict) -> Wait | None:
        """Carry `verdict` out; the `Wait` it ends in, if it does (the hold goes
        on unmuted, and only the caller knows whether its deadline is queued)."""
        while isinstance(verdict, Logged):  # written down; the hold goes on
            if not self._handle(held, verdict):
                return None
            verdict = verdict.then
        if isinstance(verdict, Wait):
            return verdict
        if isinstance(verdict, Mute):
            self._mute(held, verdict.deadline)
            return None
        self._release(held)
        self._handle(held, verdict)
        return None

    def _handle(self, held: Held, verdict: Verdict) -> bool:
        try:
            self._on_verdict(held, verdict)
        except Exception as exc:  # a handler never takes the pen down
            self._release(held)
            held.sock.close()
            self._on_error(held, f"after verdict {type(verdict).__name__}: {exc!r}")
            return False
        return True

    def _mute(self, held: Held, deadline: float) -> None:
        # Its bytes are in: watch for its leaving or a flood, and wake at `deadline`.
        fd = held.sock.fileno()
        if fd not in self._muted:
            self._muted.add(fd)
            _set_lowat(held.sock, FLOOD_LIMIT)
            if HUP:
                self._poller.update(fd, IN, _MUTED)
        if deadline != held.hold.deadline:  # the delay's own is queued already
            self._wait(held, deadline)

    def _wait(self, held: Held, deadline: float) -> None:
        heapq.heappush(self._waits, (deadline, next(self._seq), held))
        self._queued += 1
        if self._wake is not None and deadline < self._wake.deadline:
            self._wake.deadline = deadline

    def _live(self, held: Held) -> bool:
        return not held.hold.done and self._held.get(held.sock.fileno()) is held

    def _peek(self, held: Held, now: float, *, due: bool) -> None:
        hold = held.hold
        try:
            data = held.sock.recv(PEEK_LIMIT, _PEEK_FLAGS)
        except BlockingIOError:
            if due:
                wait = self._decide(held, hold.silence(now))
                if wait is not None and wait.deadline > now:
                    # Held beyond its delay (the lists said so, maybe only now, with
                    # a `dnsbl` event first): wait on in the heap.
                    self._wait(held, wait.deadline)
            return
        except OSError:
            self._decide(held, hold.reset(now))
            return
        if data:
            total = _pending(held.sock) if len(data) >= PEEK_LIMIT else len(data)
            self._decide(held, hold.data(data, now, total))
        else:
            self._decide(held, hold.eof(now))

    def _expire(self, now: float) -> float:
        """Decide every connection whose delay is over; the next deadline."""
        next_deadline = math.inf
        for delay, queue in list(self._queues.items()):
            while queue and queue[0].hold.deadline <= now:
                held = queue.popleft()
                self._queued -= 1
                if self._live(held):
                    if held.hold.muted:
                        if not self._flooded(held, now):
                            self._decide(held, held.hold.due(now))
                    else:
                        self._peek(held, now, due=True)
            if queue:
                next_deadline = min(next_deadline, queue[0].hold.deadline)
            elif len(self._queues) > 1:
                del self._queues[delay]
        waits = self._waits
        while waits and waits[0][0] <= now:
            held = heapq.heappop(waits)[2]
            self._queued -= 1
            if not self._live(held):
                continue
            if held.hold.muted:
                if not self._flooded(held, now):
                    self._decide(held, held.hold.due(now))
            else:  # silent, held beyond its delay
                self._peek(held, now, due=True)
        if waits:
            next_deadline = min(next_deadline, waits[0][0])
        return next_deadline

    async def run(self) -> None:
        """Watch the pen until cancelled (then `close()` it)."""
        await watch(self._poller, self._expire, self._serve, self._set_wake)

    def _set_wake(self, scope: trio.CancelScope | None) -> None:
        self._wake = scope

    def _serve(self, now: float) -> int:
        ready = self._poller.ready(_BATCH)
        for fd, ev in ready:
            held = self._held.get(fd)
            if held is None:
                continue
            if fd in self._muted:  # a muted talker shows up when it leaves or floods
                self._decide(held, self._muted_ready(held, ev, now))
            else:
                self._peek(held, now, due=False)
        return len(ready)

    def _flooded(self, held: Held, now: float) -> bool:
        """A muted talker decided by its flood (True): before an answer or its
        deadline, whose turn may come before the pen serves the readiness."""
        total = _pending(held.sock)
        if total < FLOOD_LIMIT:
            return False
        self._decide(held, held.hold.flood(total, now))
        return True

    def _muted_ready(self, held: Held, ev: int, now: float) -> Verdict:
        hold = held.hold
        if ev & ERROR_READY:
            return hold.reset(now)
        total = _pending(held.sock)
        if total >= FLOOD_LIMIT or (HUP and not ev & HUP):
            # That many bytes wait, or (Linux, readable below the mark, no end of
            # file) the kernel found its buffer full of them.
            return hold.flood(total, now)
        verdict = hold.eof(now)
        if isinstance(verdict, Mute):
            # Half-closed after talking (an Exim that pipelined QUIT does): it
            # still waits for replies, so only its deadline can decide.
            self._deaf.add(held.sock.fileno())
            self._poller.update(held.sock.fileno(), _MUTED, 0)
        return verdict

    def evict_all(self) -> list[Held]:
        """Stop watching every held connection and give them to the caller (shutdown)."""
        held = list(self._held.values())
        for h in held:
            self._release(h)
        self._queues.clear()
        self._waits.clear()
        self._deaf.clear()
        self._queued = 0
        return held

    def close(self) -> None:
        for h in self.evict_all():
            h.sock.close()
        self._poller.close()

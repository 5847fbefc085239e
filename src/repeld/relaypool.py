"""The relay pool: one task pumps the bytes of every relayed session.

A task, a nursery and a cancel scope per session, and a trio readiness wait
per chunk (about 11 us each, some 26 per SMTP session), made relaying cost 2.5
times HAProxy's CPU per message. The pool does what the holding pen does for
held connections: it keeps its own epoll (Linux) or kqueue (BSD) set of every
relayed socket, trio wakes it when that set is readable or when the earliest
idle deadline is due, and it then moves the bytes of every ready socket in one
batch with plain non-blocking `recv_into`/`send`. A chunk is sent straight
after it is read; only when the destination's buffer is full is the rest kept
(at most one chunk, CHUNK bytes, per direction) and the source no longer read
until it has gone out.

The session's own task only waits to be told the session is over.
`RelayPool.relay` fills a `RelayResult` and ends a session as closed, timeout,
client-reset or backend-reset, with half-close propagated with
shutdown(SHUT_WR), and the caller closes the sockets. Cancelling the waiting
task takes its session out of the pool at once.
"""

from __future__ import annotations

import heapq
import itertools
import math
import socket

import trio

from .poller import IN, OUT, READ_READY, WRITE_READY, Poller
from .relay import CHUNK, RelayResult

__all__ = ["RelayPool", "RelayPoolClosed"]

#: Most ready sockets handled per wake-up.
_BATCH = 512
#: Most full chunks read from one socket per wake-up before the next socket's turn.
_FAIRNESS = 16


class RelayPoolClosed(RuntimeError):
    """The pool stopped (its `run` ended) while a session was still relaying."""


class _Side:
    """One socket of a session and the direction into it.

    `eof`: end of file was read from this socket; `pending`: bytes read from the
    other side that this socket has not taken yet; `shut`: the direction into
    this socket is over (shutdown(SHUT_WR) done); `mask`: the interest this fd
    has in the poller now (0: not in it).
    """

    __slots__ = ("eof", "fd", "mask", "name", "peer", "pending", "session", "shut", "sock", "up")

    def __init__(self, session: _Session, sock: socket.socket, name: str, up: bool) -> None:
        self.session = session
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name
        self.up = up  # bytes read here count as from_client
        self.eof = False
        self.shut = False
        self.pending: memoryview | None = None
        self.mask = 0
        self.peer: _Side = self


class _Session:
    __slots__ = ("backend", "client", "deadline", "error", "idle_timeout", "open", "result", "task")

    def __init__(
        self,
        client: socket.socket,
        backend: socket.socket,
        idle_timeout: float,
        result: RelayResult,
        deadline: float,
    ) -> None:
        self.result = result
        self.idle_timeout = idle_timeout
        self.deadline = deadline  # pushed on with every byte; the heap catches up lazily
        self.open = True
        self.error: BaseException | None = None
        self.task: trio.lowlevel.Task | None = None
        self.client = _Side(self, client, "client", True)
        self.backend = _Side(self, backend, "backend", False)
        self.client.peer = self.backend
        self.backend.peer = self.client


class RelayPool:
    """Relays many sessions from one task: start `run()`, then call `relay()` per session."""

    def __init__(self) -> None:
        self._poller = Poller()
        self._sides: dict[int, _Side] = {}
        self._sessions = 0
        # (deadline, tie-breaker, session): at most one live entry per open session.
        self._heap: list[tuple[float, int, _Session]] = []
        self._stale = 0  # entries of finished sessions still in the heap
        self._seq = itertools.count()
        self._wake: trio.CancelScope | None = None
        self._closed = False
        self._buf = bytearray(CHUNK)
        self._view = memoryview(self._buf)

    def __len__(self) -> int:
        """Sessions being relayed now."""
        return self._sessions

    def registered(self) -> dict[int, int]:
        """The fds in the poller now and their interest (epoll bits); for tests."""
        return {fd: side.mask for fd, side in self._sides.items() if side.mask}

    # -- the session's side -------------------------------------------------------

    async def relay(
        self,
        client: socket.socket,
        backend: socket.socket,
        idle_timeout: float,
        result: RelayResult | None = None,
    ) -> RelayResult:
        """Copy both ways until both sides are done; the caller closes the sockets.

        `result` is filled in as bytes flow, so a caller that
        is cancelled midway still knows how much went each way. Raises
        RelayPoolClosed if the pool stops first.
        """
        if result is None:
            result = RelayResult()
        if self._closed:
            raise RelayPoolClosed("the relay pool is closed")
        for sock in (client, backend):
            if sock.gettimeout() != 0.0:
                sock.setblocking(False)
        session = _Session(
            client, backend, idle_timeout, result, trio.current_time() + idle_timeout
        )
        self._add(session)
        session.task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            # Cancelled: the session leaves the pool now, so no fd stays registered.
            session.task = None
            if session.open:
                self._finish(session)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if session.error is not None:
            raise session.error
        return result

    def _add(self, session: _Session) -> None:
        client, backend = session.client, session.backend
        if client.fd in self._sides or backend.fd in self._sides or client.fd == backend.fd:
            raise ValueError("socket already relayed")
        self._poller.update(client.fd, 0, IN)
        try:
            self._poller.update(backend.fd, 0, IN)
        except BaseException:
            self._poller.update(client.fd, IN, 0)
            raise
        client.mask = backend.mask = IN
        self._sides[client.fd] = client
        self._sides[backend.fd] = backend
        self._sessions += 1
        heapq.heappush(self._heap, (session.deadline, next(self._seq), session))
        wake = self._wake
        if wake is not None and session.deadline < wake.deadline:
            wake.deadline = session.deadline

    # -- the pool's side ------------------------------------------------------------

    async def run(self) -> None:
        """Relay every session until cancelled; then the pool is closed."""
        if self._closed:
            raise RelayPoolClosed("the relay pool is closed")
        poller = self._poller
        fd = poller.fileno()
        sides = self._sides
        try:
            while True:
                next_deadline = self._expire(trio.current_time())
                with trio.CancelScope(deadline=next_deadline) as wake:
                    self._wake = wake
                    await trio.lowlevel.wait_readable(fd)
                self._wake = None
                now = trio.current_time()
                for ready_fd, events in poller.ready(_BATCH):
                    side = sides.get(ready_fd)
                    if side is None:
                        continue  # its session ended earlier in this batch
                    try:
                        if events & WRITE_READY and side.pending is not None:
                            self._flush(side, now)
                        if (
                            events & READ_READY
                            and side.session.open
                            and not side.eof
                            and side.peer.pending is None
                        ):
                            self._pump(side, now)
                    except Exception as exc:  # one broken session never stops the others
                        self._fail(side.session, exc)
        finally:
            self._wake = None
            self._closed = True
            for side in list(sides.values()):
                if side.session.open:
                    self._fail(side.session, RelayPoolClosed("the relay pool stopped"))
            poller.close()

    def _expire(self, now: float) -> float:
        """End every session idle for its timeout; the next deadline to wake at."""
        heap = self._heap
        while heap:
            deadline, _, session = heap[0]
            if deadline > now:
                return deadline
            if not session.open:
                heapq.heappop(heap)
                self._stale -= 1
            elif session.deadline > now:  # bytes moved since: re-arm
                heapq.heapreplace(heap, (session.deadline, next(self._seq), session))
            else:
                heapq.heappop(heap)
                session.result.end = "timeout"
                self._finish(session, in_heap=False)
        return math.inf

    def _pump(self, src: _Side, now: float) -> None:
        """Read from `src` and send straight on to its peer, until drained or blocked."""
        dst = src.peer
        session = src.session
        result = session.result
        buf, view = self._buf, self._view
        rsock, wsock = src.sock, dst.sock
        for _ in range(_FAIRNESS):
            try:
                n = rsock.recv_into(buf)
            except BlockingIOError:
                return
            except OSError:
                self._reset(session, src.name)
                return
            if not n:
                src.eof = True
                self._set_mask(src)
                self._shut(dst)
                return
            if src.up:
                result.from_client += n
            else:
                result.to_client += n
            session.deadline = now + session.idle_timeout
            try:
                sent = wsock.send(view[:n])
            except BlockingIOError:
                sent = 0
            except OSError:
                self._reset(session, dst.name)
                return
            if sent < n:
                # The destination is full: keep the rest, stop reading until it is out.
                dst.pending = memoryview(bytes(view[sent:n]))
                self._set_mask(src)
                self._set_mask(dst)
                return
            if n < CHUNK:
                return  # most likely drained; level-triggered polling says if not

    def _flush(self, dst: _Side, now: float) -> None:
        """Send what `dst` had not taken; when all is out, read its source again."""
        session = dst.session
        pending = dst.pending
        assert pending is not None
        try:
            sent = dst.sock.send(pending)
        except BlockingIOError:
            return
        except OSError:
            self._reset(session, dst.name)
            return
        session.deadline = now + session.idle_timeout
        if sent < len(pending):
            dst.pending = pending[sent:]
            return
        dst.pending = None
        src = dst.peer
        self._set_mask(dst)
        if src.eof:
            self._shut(dst)
        else:
            self._set_mask(src)
            self._pump(src, now)  # it most likely has more waiting

    def _shut(self, dst: _Side) -> None:
        # The direction into `dst` is over (end of file read, all sent): pass the
        # half-close on; when both directions are over, so is the session.
        if dst.pending is not None or dst.shut:
            return
        try:
            dst.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        dst.shut = True
        if dst.peer.shut:
            self._finish(dst.session)

    def _set_mask(self, side: _Side) -> None:
        if not side.session.open:
            return
        mask = 0
        if not side.eof and side.peer.pending is None:
            mask = IN
        if side.pending is not None:
            mask |= OUT
        if mask != side.mask:
            self._poller.update(side.fd, side.mask, mask)
            side.mask = mask

    def _reset(self, session: _Session, name: str) -> None:
        if session.open:
            session.result.end = f"{name}-reset"
            self._finish(session)

    def _fail(self, session: _Session, exc: BaseException) -> None:
        if session.open:
            session.error = exc
            self._finish(session)

    def _finish(self, session: _Session, *, in_heap: bool = True) -> None:
        """Take `session` out of the pool (fds out of the poller) and wake its task."""
        session.open = False
        self._sessions -= 1
        for side in (session.client, session.backend):
            if side.mask:
                try:
                    self._poller.update(side.fd, side.mask, 0)
                except (OSError, ValueError):
                    pass  # the poller is closed already
                side.mask = 0
            if self._sides.get(side.fd) is side:
                del self._sides[side.fd]
            side.pending = None
        if in_heap:
            self._stale += 1
            if self._stale > 64 and self._stale > 2 * self._sessions:
                # Finished sessions linger in the heap until their deadline; drop them
                # now and then so it stays a few times the size of the live set.
                self._heap = [e for e in self._heap if e[2].open]
                heapq.heapify(self._heap)
                self._stale = 0
        task = session.task
        if task is not None:
            session.task = None
            trio.lowlevel.reschedule(task)

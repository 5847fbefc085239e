"""The relay pool: one task connects to the MTA and pumps the bytes of every
relayed session.

A task, a nursery and a cancel scope per session, and a trio readiness wait
per chunk (about 11 us each, some 26 per SMTP session), made relaying cost 2.5
times HAProxy's CPU per message. The pool does what the holding pen does for
held connections: it keeps its own epoll (Linux) or kqueue (BSD) set of every
relayed socket, trio wakes it when that set is ready or when the earliest
deadline is due, and it then serves every ready socket in one batch with plain
non-blocking calls. A chunk is sent straight after it is read; only when the
destination's buffer is full is the rest kept (at most one chunk, CHUNK bytes,
per direction) and the source no longer read until it has gone out.

A passed client costs no task of its own. `RelayPool.connect_and_relay` starts
a non-blocking connect to the MTA (each address in turn, each within the
connect timeout), writes the PROXY header, relays, and calls the caller's
`done(result)` once: with `result.connect_error` set if no address answered,
else when the session ended as closed, timeout, client-reset, backend-reset or
shutdown (the pool stopped). Half-close is propagated with shutdown(SHUT_WR).
The pool closes the backend sockets it opened; the client socket stays the
caller's. With `strip_pipe_connect`, the MTA's bytes go through a
core.ehlofilter.EhloFilter until it is done (the greeting and the first reply),
so the client never learns PIPECONNECT; from then on that direction costs one
attribute check per chunk.
A `done` that raises is reported through the pool's `on_error`
(the server writes an `error` event) and never stops the other sessions.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import math
import os
import socket
from collections.abc import Callable, Sequence

import trio

from repeld.core.ehlofilter import EhloFilter
from repeld.core.names import RelayEnd
from repeld.service import tcptune
from repeld.shell.poller import ERROR_READY, IN, OUT, READ_READY, WRITE_READY, Poller, watch
from repeld.shell.relay import CHUNK, RelayResult

__all__ = ["Address", "Done", "RelayPool", "RelayPoolClosed"]

#: One way to reach the MTA: (address family, socket address).
Address = tuple[int, tuple[object, ...]]
#: Told how a session ended, once; it owns the client socket from then on.
Done = Callable[[RelayResult], None]

#: A socket created non-blocking in one call where the platform can (Linux, FreeBSD).
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
_IN_PROGRESS = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR)

#: Most ready sockets handled per wake-up.
_BATCH = 512
#: Most extra batches served in one wake-up while sockets keep becoming ready.
_AGAIN = 4
#: Most full chunks read from one socket per wake-up before the next socket's turn.
_FAIRNESS = 16


class RelayPoolClosed(RuntimeError):
    """The pool stopped (its `run` ended) while a session was still relaying."""


class _Side:
    """One socket of a session and the direction into it.

    `eof`: end of file was read from this socket; `pending`: bytes read from the
    other side that this socket has not taken yet; `shut`: the direction into
    this socket is over (shutdown(SHUT_WR) done); `mask`: the interest this fd
    has in the poller now (0: not in it); `filter`: what the bytes read here go
    through before they are sent on, until it is done (None: nothing).
    """

    __slots__ = (
        "eof",
        "fd",
        "filter",
        "mask",
        "name",
        "peer",
        "pending",
        "session",
        "shut",
        "sock",
        "up",
    )

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
        self.filter: EhloFilter | None = None


class _Session:
    """One relayed client, from the first connect attempt to `done`.

    `backend` is None until a connect attempt has a socket; `connecting` while
    that attempt has not been answered; `addresses` are those not tried yet.
    """

    __slots__ = (
        "addresses",
        "backend",
        "client",
        "connect_timeout",
        "connecting",
        "deadline",
        "done",
        "header",
        "idle_timeout",
        "in_heap",
        "open",
        "result",
        "strip_pipe_connect",
    )

    def __init__(
        self, client: socket.socket, idle_timeout: float, result: RelayResult, done: Done | None
    ) -> None:
        self.result = result
        self.idle_timeout = idle_timeout
        self.deadline = math.inf  # pushed on with every byte; the heap catches up lazily
        self.open = True
        self.in_heap = False  # its deadline is live in the pool's heap
        self.done = done
        self.client = _Side(self, client, "client", True)
        self.backend: _Side | None = None
        self.connecting = False
        self.addresses: list[Address] = []
        self.connect_timeout = 0.0
        self.header = b""
        self.strip_pipe_connect = False

    def attach(self, backend: socket.socket) -> _Side:
        side = self.backend = _Side(self, backend, "backend", False)
        side.peer = self.client
        self.client.peer = side
        return side


class RelayPool:
    """Relays many sessions from one task: start `run()`, then hand it sessions."""

    def __init__(self, on_error: Callable[[str], None]) -> None:
        self._on_error = on_error
        self._poller = Poller()
        self._sides: dict[int, _Side] = {}
        #: While `_serve` handles a batch: the sockets opened in it (see there).
        self._opened: set[int] | None = None
        self._sessions = 0
        # (deadline, tie-breaker, session): at most one live entry per open session.
        self._heap: list[tuple[float, int, _Session]] = []
        self._stale = 0  # entries of finished sessions still in the heap
        self._seq = itertools.count()
        self._wake: trio.CancelScope | None = None
        self._closed = False
        #: Sessions finished in this wake-up, to be unlinked at its end (`_unlink`).
        self._finished: list[_Session] = []
        self._buf = bytearray(CHUNK)
        self._view = memoryview(self._buf)

    def __len__(self) -> int:
        """Sessions connecting or being relayed now."""
        return self._sessions

    def registered(self) -> dict[int, int]:
        """The fds in the poller now and their interest (epoll bits); for tests."""
        return {fd: side.mask for fd, side in self._sides.items() if side.mask}

    # -- the caller's side ------------------------------------------------------------

    def connect_and_relay(
        self,
        client: socket.socket,
        addresses: Sequence[Address],
        *,
        header: bytes = b"",
        connect_timeout: float,
        idle_timeout: float,
        done: Done,
        strip_pipe_connect: bool = False,
    ) -> None:
        """Connect `client` to the first of `addresses` that answers and relay.

        Each address gets `connect_timeout` seconds. `header` (the PROXY header)
        goes to the MTA before any byte of the client's; `strip_pipe_connect`
        filters the MTA's first EHLO reply. `done(result)` is called
        once, from the pool's task, when the session is over (`result.end`) or no
        address answered (`result.connect_error`); the caller closes `client`
        then. Raises RelayPoolClosed if the pool has stopped.
        """
        if self._closed:
            raise RelayPoolClosed("the relay pool is closed")
        if client.fileno() in self._sides:
            raise ValueError("socket already relayed")
        if client.gettimeout() != 0.0:
            client.setblocking(False)
        session = _Session(client, idle_timeout, RelayResult(), done)
        session.addresses = list(addresses)
        session.connect_timeout = connect_timeout
        session.header = header
        session.strip_pipe_connect = strip_pipe_connect
        self._sessions += 1
        self._sides[session.client.fd] = session.client  # not polled until connected
        self._try_connect(session, trio.current_time(), OSError("no address for the backend"))
        if session.open:
            self._arm(session)
        else:  # no address answered at once; outside the pool's wake-ups, so safe
            self._unlink()

    def _arm(self, session: _Session) -> None:
        """Put a new session's deadline in the heap (and wake the pool earlier if due)."""
        heapq.heappush(self._heap, (session.deadline, next(self._seq), session))
        session.in_heap = True
        wake = self._wake
        if wake is not None and session.deadline < wake.deadline:
            wake.deadline = session.deadline

    # -- connecting ---------------------------------------------------------------------

    def _try_connect(self, session: _Session, now: float, last: OSError) -> None:
        """Start a connect to the next address; end the session if none is left."""
        while session.addresses:
            family, addr = session.addresses.pop(0)
            try:
                sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
            except OSError as exc:
                last = exc
                continue
            try:
                if not _NONBLOCK:
                    sock.setblocking(False)
                tcptune.set_nodelay(sock.fileno())
                err = sock.connect_ex(addr)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            if err and err not in _IN_PROGRESS:
                sock.close()
                last = OSError(err, os.strerror(err))
                continue
            side = session.attach(sock)
            self._sides[side.fd] = side
            if self._opened is not None:
                self._opened.add(side.fd)
            if _established(sock):
                # On loopback the handshake is over before connect() returns: no
                # need to wait for the socket to become writable.
                self._relay(session, now)
                return
            session.connecting = True
            session.deadline = now + session.connect_timeout
            try:
                self._set_mask(side)  # OUT: writable once the MTA answers
            except OSError as exc:
                self._unwatched(session, exc)
            return
        session.result.connect_error = _reason(last)
        self._finish(session)

    def _connect_answered(self, session: _Session, now: float, events: int) -> None:
        """The connect attempt was answered: relay, or try the next address."""
        side = session.backend
        assert side is not None
        err = 0
        if events & ERROR_READY or not ERROR_READY:  # else plainly writable: connected
            err = side.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._drop_backend(session)
            self._try_connect(session, now, OSError(err, os.strerror(err)))
            return
        self._relay(session, now)

    def _relay(self, session: _Session, now: float) -> None:
        try:
            self._connected(session, now)
        except OSError as exc:
            self._unwatched(session, exc)

    def _unwatched(self, session: _Session, exc: OSError) -> None:
        # The kernel would not watch a socket of it (ENOSPC: fs.epoll.max_user_watches;
        # ENOMEM): over as a connect that failed, so `done` answers 421 with a
        # backend-error; escaped, it ended the pool's task and the server with it.
        session.result.connect_error = _reason(exc)
        self._finish(session)

    def _connect_timed_out(self, session: _Session, now: float) -> None:
        self._drop_backend(session)
        timeout = session.connect_timeout
        self._try_connect(session, now, OSError(errno.ETIMEDOUT, f"no answer within {timeout:g}s"))

    def _drop_backend(self, session: _Session) -> None:
        """Give up one connect attempt: its socket out of the poller, closed."""
        side = session.backend
        assert side is not None
        if side.mask:
            self._poller.update(side.fd, side.mask, 0)
            side.mask = 0
        del self._sides[side.fd]
        side.sock.close()
        session.backend = None
        session.client.peer = session.client
        session.connecting = False

    def _connected(self, session: _Session, now: float) -> None:
        """Both sockets are there: write the header, then relay both ways."""
        backend = session.backend
        assert backend is not None
        session.connecting = False
        session.result.connected_at = now
        session.deadline = now + session.idle_timeout
        if session.strip_pipe_connect:
            backend.filter = EhloFilter()
        if session.header:
            header, session.header = session.header, b""
            try:
                sent = backend.sock.send(header)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._reset(session, backend.name)
                return
            if sent < len(header):
                backend.pending = memoryview(header)[sent:]
        self._set_mask(session.client)
        self._set_mask(backend)

    # -- the pool's side ------------------------------------------------------------

    async def run(self) -> None:
        """Relay every session until cancelled; then the pool is closed.

        Sessions still open then end as `shutdown`, and `connect_and_relay`
        raises RelayPoolClosed from then on.
        """
        if self._closed:
            raise RelayPoolClosed("the relay pool is closed")
        try:
            await watch(self._poller, self._expire, self._serve, self._set_wake, _AGAIN)
        finally:
            self._closed = True
            for side in list(self._sides.values()):
                session = side.session
                if session.open:
                    session.result.end = RelayEnd.SHUTDOWN
                    self._finish(session)
            self._unlink()
            self._poller.close()

    def _set_wake(self, scope: trio.CancelScope | None) -> None:
        self._wake = scope

    def _serve(self, now: float) -> int:
        """Connect, flush and pump every ready socket; how many there were."""
        sides = self._sides
        ready = self._poller.ready(_BATCH)
        # A socket opened during this batch (a connect to the next address) may
        # take the number of one closed earlier in it, whose event is still to
        # come in this list: that event is not the new socket's.
        opened: set[int] = set()
        self._opened = opened
        for ready_fd, events in ready:
            side = sides.get(ready_fd)
            if side is None or ready_fd in opened:
                continue  # its session ended earlier in this batch
            session = side.session
            try:
                if session.connecting:
                    if side is session.backend:
                        self._connect_answered(session, now, events)
                    continue
                if events & WRITE_READY and side.pending is not None:
                    self._flush(side, now)
                if (
                    events & READ_READY
                    and session.open
                    and not side.eof
                    and side.peer.pending is None
                ):
                    self._pump(side, now)
            except Exception as exc:  # one broken session never stops the others
                self._fail(session, exc)
        self._opened = None
        self._unlink()
        return len(ready)

    def _unlink(self) -> None:
        """Break the reference cycles of the sessions that finished (session <-> side,
        side <-> peer), so reference counting frees them and their sockets at once.

        The daemon runs the cycle collector's young generation only every 50,000
        allocations (process/daemon.py), which took half an hour of mail at 5
        sessions a second; until then every finished session stayed in memory.
        Done at the end of a wake-up, when no code of the pool holds a side.
        """
        for session in self._finished:
            for side in (session.client, session.backend):
                if side is not None:
                    del side.peer, side.session
            session.backend = None
            del session.client
        self._finished.clear()

    def _expire(self, now: float) -> float:
        """End every session idle for its timeout; the next deadline to wake at."""
        deadline = self._expire_idle(now)
        self._unlink()
        return deadline

    def _expire_idle(self, now: float) -> float:
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
                session.in_heap = False
                if session.connecting:
                    self._connect_timed_out(session, now)
                    if session.open:  # the next address is being tried
                        self._arm(session)
                else:
                    session.result.end = RelayEnd.TIMEOUT
                    self._finish(session)
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
                if src.filter is not None:  # what it held goes out before the close
                    held, src.filter = src.filter.eof(), None
                    result.to_client += len(held)  # only the MTA's bytes are filtered
                    if held and not self._send(dst, memoryview(held)):
                        return
                self._shut(dst)
                return
            if src.filter is not None:
                if self._pump_filtered(src, n, now):
                    continue
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

    def _pump_filtered(self, src: _Side, n: int, now: float) -> bool:
        """Send on the `n` bytes just read through `src.filter`; whether to read on."""
        filt = src.filter
        assert filt is not None
        data = filt.feed(self._view[:n])
        if filt.done:
            src.filter = None  # from now on, straight through
        session = src.session
        session.deadline = now + session.idle_timeout
        if src.up:
            session.result.from_client += len(data)
        else:
            session.result.to_client += len(data)
        if data and not self._send(src.peer, memoryview(data)):
            return False
        return n == CHUNK

    def _send(self, dst: _Side, data: memoryview) -> bool:
        """Send `data` to `dst`, keeping what it does not take; whether all went."""
        try:
            sent = dst.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._reset(dst.session, dst.name)
            return False
        if sent < len(data):
            dst.pending = data[sent:]
            self._set_mask(dst.peer)
            self._set_mask(dst)
            return False
        return True

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
        session = side.session
        if not session.open:
            return
        if session.connecting:
            mask = OUT  # the backend's connect: writable once answered
        else:
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
            session.result.end = (
                RelayEnd.CLIENT_RESET if name == "client" else RelayEnd.BACKEND_RESET
            )
            self._finish(session)

    def _fail(self, session: _Session, exc: BaseException) -> None:
        if session.open:
            session.result.error = exc
            self._finish(session)

    def _finish(self, session: _Session) -> None:
        """Take `session` out of the pool (fds out of the poller) and tell its caller."""
        session.open = False
        self._sessions -= 1
        for side in (session.client, session.backend):
            if side is None:
                continue
            if side.mask:
                # Out of the set before any close, even of the pool's own socket:
                # a forked child may hold a copy for a moment (poller.py's rule).
                try:
                    self._poller.update(side.fd, side.mask, 0)
                except (OSError, ValueError):
                    pass  # the poller is closed already
                side.mask = 0
            if self._sides.get(side.fd) is side:
                del self._sides[side.fd]
            side.pending = None
        if session.backend is not None:
            session.backend.sock.close()  # the pool's own; the client is the caller's
        if session.in_heap:
            session.in_heap = False
            self._stale += 1
            if self._stale > 64 and self._stale > 2 * self._sessions:
                # Finished sessions linger in the heap until their deadline; drop them
                # now and then so it stays a few times the size of the live set.
                # In place: `_expire_idle` may be walking this very list.
                self._heap[:] = [e for e in self._heap if e[2].open]
                heapq.heapify(self._heap)
                self._stale = 0
        self._finished.append(session)
        done, session.done = session.done, None
        if done is not None:
            try:
                done(session.result)
            except Exception as exc:  # the caller's bug must not stop every other session
                self._on_error(f"relay pool: a session's done callback failed: {exc!r}")


def _established(sock: socket.socket) -> bool:
    """Whether a connect in progress has already completed (it has a peer)."""
    try:
        sock.getpeername()
    except OSError:
        return False  # ENOTCONN: still in progress, or refused (SO_ERROR tells later)
    return True


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__

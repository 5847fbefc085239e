"""A readiness set of our own that trio waits on as one file descriptor.

The holding pen and the relay pool each watch thousands of sockets from one
task: they keep them in a private epoll (Linux) or kqueue (BSD) set, ask trio
to wake them when that set's own fd is readable, then read the ready sockets
in one batch. Interest is level-triggered, per socket: IN, OUT, both, or none
(a socket interesting for nothing is taken out of the set).

The rule that keeps a private epoll set safe
---------------------------------------------
epoll watches an open file description, not an fd number: closing an fd
removes it from the set only when that was the last reference to the
description (epoll(7), "Will closing a file descriptor cause it to be removed
from all epoll interest lists?"). A registered socket that lived on elsewhere
(a dup, a forked child) would go on being reported under its old fd number,
level-triggered, for ever, and that number may by then belong to another
client. So:

1. No registered socket is ever duplicated or inherited on purpose. Every
   socket repeld makes is close-on-exec (Python's sockets are non-inheritable,
   and the accept loop's accept4 passes SOCK_CLOEXEC), and none is dup()ed.
   The one socket handed to a child, a client passed to --exec (ucspi.py),
   has left the pen's set before it is handed on (the pen releases a
   connection before its verdict is carried out) and never enters the relay
   pool's. The exception: with --workers, every worker inherits every
   worker's listening socket of a listener (process/workers.py), and the
   lead's probe watches them all in a set of its own (shell/accept.py's
   `_every_socket`). Those live as long as the worker, and the set is
   closed before any of them.
2. Every fd leaves the set before it is closed: the pen's release, and both
   sides of a relayed session, the pool's own backend socket included. Rule 1
   alone would not make a close without EPOLL_CTL_DEL safe: trio's
   open_process forks (vfork) from a worker thread while the trio thread goes
   on, and until the child has exec'd it holds a copy of every fd, so a
   registered socket closed in that window would still be reported, under a
   number that a new socket may already have. One epoll_ctl per session is
   the price of never having to reason about that.

tests/shell/test_poller.py shows both halves on a real epoll set: a closed
registered socket gives no stale events, a reused fd number gets none meant
for its old socket, and a dup'ed one does (the reason for rule 1). kqueue
removes a closed fd's filters at close(), whoever else holds the socket.
"""

from __future__ import annotations

import fcntl
import select
import struct
import sys
import termios
from collections.abc import Callable

import trio

__all__ = [
    "ERROR_READY",
    "HUP",
    "IN",
    "OUT",
    "READ_READY",
    "WRITE_READY",
    "Poller",
    "waiting_bytes",
    "watch",
]


def waiting_bytes(fd: int) -> int:
    """Bytes waiting to be read on a socket or a pipe (FIONREAD); OSError if none."""
    count: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    return count


#: Interest bits (the same values on both platforms): epoll's EPOLLIN / EPOLLOUT.
IN = 1
OUT = 4


if sys.platform == "linux":
    # A socket in error or hung up is reported whatever the interest: then the
    # recv or send that is due shows what happened (error or end of file).
    READ_READY = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
    WRITE_READY = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
    #: Set in what ready() reports when the socket has an error pending (a
    #: refused connect, a reset); 0 where the poller cannot tell.
    ERROR_READY = select.EPOLLERR | select.EPOLLHUP
    #: Interest in the peer's leaving (FIN or RST), reported as a bit of its own:
    #: the pen's muted talkers are watched for IN with a raised low-water mark
    #: (SO_RCVLOWAT) and HUP, so an end of file below the mark is told from a
    #: flood. 0 where the poller has no such bit (kqueue: EV_EOF comes on the
    #: read filter, and a reset looks like an end of file).
    HUP = select.EPOLLRDHUP

    class Poller:
        """A level-triggered readiness set that trio waits on as one fd (epoll).

        End of file shows as readable (EPOLLRDHUP besides, for the pen's muted
        talkers), and a socket that is interesting for nothing (mask 0) is taken
        out of the set, so an EPOLLHUP that is reported regardless of interest
        cannot spin the pool.
        """

        def __init__(self) -> None:
            self._epoll = select.epoll()

        def fileno(self) -> int:
            return self._epoll.fileno()

        def update(self, fd: int, old: int, new: int) -> None:
            if not old:
                self._epoll.register(fd, new)
            elif not new:
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass
            else:
                self._epoll.modify(fd, new)

        def ready(self, limit: int) -> list[tuple[int, int]]:
            return self._epoll.poll(0, limit)

        def close(self) -> None:
            self._epoll.close()

else:  # FreeBSD and the other BSDs
    READ_READY = IN
    WRITE_READY = OUT
    ERROR_READY = 0
    HUP = 0

    class Poller:
        """A readiness set that trio waits on as one fd (kqueue, one filter per direction)."""

        def __init__(self) -> None:
            self._kqueue = select.kqueue()

        def fileno(self) -> int:
            return self._kqueue.fileno()

        def update(self, fd: int, old: int, new: int) -> None:
            changes: list[select.kevent] = []
            for bit, kind in ((IN, select.KQ_FILTER_READ), (OUT, select.KQ_FILTER_WRITE)):
                if (old ^ new) & bit:
                    flags = select.KQ_EV_ADD if new & bit else select.KQ_EV_DELETE
                    changes.append(select.kevent(fd, kind, flags))
            try:
                self._kqueue.control(changes, 0, 0)
            except OSError:
                if new & ~old:
                    raise  # adding failed; a failed delete means the fd is gone already

        def ready(self, limit: int) -> list[tuple[int, int]]:
            # EV_EOF and errors come on the filter concerned: the recv or send shows them.
            return [
                (int(ev.ident), IN if ev.filter == select.KQ_FILTER_READ else OUT)
                for ev in self._kqueue.control(None, limit, 0)
            ]

        def close(self) -> None:
            self._kqueue.close()


async def watch(
    poller: Poller,
    expire: Callable[[float], float],
    serve: Callable[[float], int],
    wake_scope: Callable[[trio.CancelScope | None], None],
    again: int = 0,
) -> None:
    """Run a pen or pool until cancelled: `serve(now)` whenever `poller` has
    ready fds, `expire(now)` (which returns the next deadline) before each wait.

    The wait's deadline is a cancel scope that lives as long as no deadline
    fires, so a wake-up costs no new scope; `wake_scope(scope)` hands it to the
    owner, which may move its deadline earlier (a new, earlier deadline) or
    later (what it was set for is settled, as far as `expire` would say now),
    and `wake_scope(None)` says the loop is over.

    `serve` returns how many fds it found ready. With `again` > 0 a busy set
    is served up to that many more times straight away while it keeps finding
    some: under load the peers answer while a batch is being served, and
    asking the set once more costs one system call, where going back to trio
    for it costs a trip through its scheduler.
    """
    fd = poller.fileno()
    try:
        while True:
            with trio.CancelScope() as wake:  # left when a deadline is due
                wake_scope(wake)
                while True:
                    deadline = expire(trio.current_time())
                    if deadline != wake.deadline:
                        wake.deadline = deadline
                    await trio.lowlevel.wait_readable(fd)
                    if serve(trio.current_time()):
                        for _ in range(again):
                            if not serve(trio.current_time()):
                                break
    finally:
        wake_scope(None)

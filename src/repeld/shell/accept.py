"""The accept phase: take each new connection off a listener, never spinning.

One task per listener accepts in batches and hands every client to the server's
`accepted` callback, which asks the policy and starts the hold. An accept error
that means "out of descriptors or memory for now" pauses the loop for a moment
(as trio's serve_listeners and OpenBSD's spamd do), a client gone before it
was accepted is skipped, and anything else is a broken listener: it ends the
server loudly instead of spinning on it.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from repeld.config.values import Listen

if TYPE_CHECKING:
    from repeld.shell.handoff import BackendTarget

__all__ = ["ACCEPT_BACKOFF", "Listener", "accept_loop"]

#: How long the loop pauses on EMFILE, ENFILE, ENOBUFS or ENOMEM.
ACCEPT_BACKOFF = 0.1
#: Accept errors that mean "out of resources for now": pause, never spin.
_PAUSE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
#: Accepts in a row before the accept loop lets other tasks run.
ACCEPT_BATCH = 64


@dataclass(slots=True)
class Listener:
    """One listening socket and what its clients share."""

    sock: socket.socket
    spec: Listen
    #: The server address for every connection on a non-wildcard listener.
    local: tuple[str, int] | None = field(default=None)
    #: This listener's own MTA (,backend=), else None for --backend.
    backend: BackendTarget | None = field(default=None)


Accepted = Callable[[socket.socket, tuple[object, ...], Listener], None]


async def accept_loop(
    listener: Listener,
    accepted: Accepted,
    on_pause: Callable[[Listener, OSError], None],
) -> None:
    """Accept from `listener` until cancelled; `accepted(sock, addr, listener)` for each."""
    lsock = listener.sock
    # socket.accept() converts the listener's family and type to enums for
    # every client (4 us of its 9); take the fd and wrap it with them once.
    family, kind, proto = lsock.family, lsock.type, lsock.proto
    accept = lsock._accept  # type: ignore[attr-defined]
    batch = 0
    while True:
        try:
            fd, addr = accept()
        except BlockingIOError:
            batch = 0
            await trio.lowlevel.wait_readable(lsock)
            continue
        except OSError as exc:
            if exc.errno in _PAUSE_ERRNOS:
                # Out of descriptors or memory: stop accepting for a moment
                # (spamd does the same) instead of spinning on the error.
                on_pause(listener, exc)
                await trio.sleep(ACCEPT_BACKOFF)
            # ECONNABORTED and friends: that client is gone, take the next.
            continue
        accepted(socket.socket(family, kind, proto, fd), addr, listener)
        batch += 1
        if batch >= ACCEPT_BATCH:
            batch = 0
            await trio.lowlevel.checkpoint()

"""Plain-socket helpers: connect with a deadline, write it all, and the record of a
relayed session.

`connect` and `send_all` serve the event log's TCP syslog target (eventlog.py);
`RelayResult` is what the relay pool (relaypool.py, which moves the bytes of
every relayed session itself) reports when a session ends. The sockets are plain
non-blocking stdlib sockets, waited on with trio's readiness primitives, so no
stream objects or per-connection buffers exist.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import trio

from repeld.core.names import RelayEnd
from repeld.service import tcptune

__all__ = ["CHUNK", "RelayResult", "connect", "send_all"]

CHUNK = 65536


@dataclass(slots=True)
class RelayResult:
    """How a relayed session went."""

    from_client: int = 0
    to_client: int = 0
    end: RelayEnd = RelayEnd.CLOSED
    #: When the backend connection was made (trio time); None if it never was.
    connected_at: float | None = None
    #: Why no backend address answered (then nothing was relayed).
    connect_error: str | None = None
    #: A bug that ended this session (it is reported, the others go on).
    error: BaseException | None = None


async def send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    """Write all of `data` to a non-blocking socket, waiting when its buffer is full."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


async def connect(addr: tuple[object, ...], family: int, timeout: float) -> socket.socket:
    """A connected non-blocking TCP socket to `addr`, or OSError / TimeoutError."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        tcptune.set_nodelay(sock.fileno())
        err = sock.connect_ex(addr)
        if err not in (0,):
            with trio.move_on_after(timeout) as scope:
                await trio.lowlevel.wait_writable(sock)
            if scope.cancelled_caught:
                raise TimeoutError(f"no answer within {timeout:g}s")
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        return sock
    except BaseException:
        sock.close()
        raise

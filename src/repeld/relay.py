"""Relay bytes both ways between a passed client and the MTA.

Works on plain non-blocking sockets with trio's readiness waits (no stream
objects, no per-connection buffers: a relayed session costs one extra task, and
its idle timeout is a cancel-scope deadline). Half-close is propagated with
shutdown(SHUT_WR); the session ends when both directions are done, when either
side resets, or after `idle_timeout` seconds without a byte either way.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import trio

__all__ = ["RelayResult", "connect", "relay", "send_all"]

CHUNK = 65536
#: Consecutive reads without waiting before the pump yields to other tasks.
_FAIRNESS = 16
#: How late an idle timeout may come, to move its deadline less often.
_SLACK = 0.05


@dataclass(slots=True)
class RelayResult:
    """How a relayed session went."""

    from_client: int = 0
    to_client: int = 0
    end: str = "closed"  # closed | timeout | client-reset | backend-reset


class _Session:
    """What the two pumps of one session share: the scope, the socks, the result.

    The session ends without a single exception when both sides close: a reset
    is recorded here and the other pump is woken by shutting down its socket's
    reading side, and the idle timeout is the scope's deadline, pushed on with
    every chunk. (Raising and cancelling instead left some 80 objects in
    reference cycles per session for the garbage collector.)
    """

    __slots__ = ("backend", "cancel", "client", "idle_timeout", "reset_seen", "result")

    def __init__(
        self,
        client: socket.socket,
        backend: socket.socket,
        idle_timeout: float,
        result: RelayResult,
    ) -> None:
        self.cancel = trio.CancelScope(deadline=trio.current_time() + idle_timeout)
        self.client = client
        self.backend = backend
        self.idle_timeout = idle_timeout
        self.result = result
        self.reset_seen = False

    def touch(self) -> None:
        # Bytes went through: the session is not idle. Moving a deadline costs
        # trio ~2 us, so it is moved _SLACK beyond the minimum and only when it
        # falls short: the timeout comes at most _SLACK late, never early.
        due = trio.current_time() + self.idle_timeout
        if self.cancel.deadline < due:
            self.cancel.deadline = due + _SLACK

    def reset(self, side: str) -> None:
        # The first reset names the end; stop reading both sides so that the
        # other pump sees end of file and returns too.
        if not self.reset_seen:
            self.reset_seen = True
            self.result.end = f"{side}-reset"
            for sock in (self.client, self.backend):
                try:
                    sock.shutdown(socket.SHUT_RD)
                except OSError:
                    pass


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
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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


async def _pump(src: socket.socket, dst: socket.socket, session: _Session, upstream: bool) -> None:
    src_side = "client" if upstream else "backend"
    dst_side = "backend" if upstream else "client"
    result = session.result
    streak = 0
    drained = False  # the last read took less than a chunk: wait before reading
    while True:
        if drained:
            await trio.lowlevel.wait_readable(src)
        try:
            data = src.recv(CHUNK)
        except BlockingIOError:
            streak = 0
            drained = True
            continue
        except OSError:
            session.reset(src_side)
            return
        if not data:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        n = len(data)
        drained = n < CHUNK
        if upstream:
            result.from_client += n
        else:
            result.to_client += n
        try:
            await send_all(dst, data)
        except OSError:
            session.reset(dst_side)
            return
        session.touch()
        if drained:
            streak = 0
        else:
            streak += 1
            if streak >= _FAIRNESS:
                streak = 0
                await trio.lowlevel.checkpoint()


async def relay(
    client: socket.socket,
    backend: socket.socket,
    idle_timeout: float,
    result: RelayResult | None = None,
) -> RelayResult:
    """Copy both ways until both sides are done; the caller closes the sockets.

    `result` is filled in as bytes flow, so a caller that is cancelled midway
    still knows how much went each way.
    """
    session = _Session(client, backend, idle_timeout, result or RelayResult())
    with session.cancel:
        async with trio.open_nursery() as pumps:
            pumps.start_soon(_pump, backend, client, session, False)
            await _pump(client, backend, session, True)
    if session.cancel.cancelled_caught:
        session.result.end = "timeout"
    return session.result

"""Relay bytes both ways between a passed client and the MTA.

Works on plain non-blocking sockets with trio's readiness waits (no stream
objects, no per-connection buffers: a relayed session costs two small tasks and
a watchdog). Half-close is propagated with shutdown(SHUT_WR); the session ends
when both directions are done, when either side resets, or after
`idle_timeout` seconds without a byte either way.
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


@dataclass(slots=True)
class RelayResult:
    """How a relayed session went."""

    from_client: int = 0
    to_client: int = 0
    end: str = "closed"  # closed | timeout | client-reset | backend-reset


class _Session:
    __slots__ = ("cancel", "last", "result")

    def __init__(self, cancel: trio.CancelScope, result: RelayResult) -> None:
        self.cancel = cancel
        self.last = trio.current_time()
        self.result = result


class _Reset(Exception):
    def __init__(self, side: str) -> None:
        self.side = side


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
    while True:
        try:
            data = src.recv(CHUNK)
        except BlockingIOError:
            streak = 0
            await trio.lowlevel.wait_readable(src)
            continue
        except OSError:
            raise _Reset(src_side) from None
        if not data:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return
        if upstream:
            result.from_client += len(data)
        else:
            result.to_client += len(data)
        try:
            await send_all(dst, data)
        except OSError:
            raise _Reset(dst_side) from None
        session.last = trio.current_time()
        streak += 1
        if streak >= _FAIRNESS:
            streak = 0
            await trio.lowlevel.checkpoint()


async def _watchdog(session: _Session, idle_timeout: float) -> None:
    # Sleeps until the session could have been idle long enough; checks; sleeps on.
    while True:
        await trio.sleep_until(session.last + idle_timeout)
        if trio.current_time() >= session.last + idle_timeout:
            session.result.end = "timeout"
            session.cancel.cancel()
            return


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
    with trio.CancelScope() as cancel:
        session = _Session(cancel, result or RelayResult())
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watchdog, session, idle_timeout)
                async with trio.open_nursery() as pumps:
                    pumps.start_soon(_pump, client, backend, session, True)
                    pumps.start_soon(_pump, backend, client, session, False)
                nursery.cancel_scope.cancel()
        except* _Reset as group:
            # The pumps' nursery sits inside the watchdog's, so the _Reset comes
            # wrapped in one ExceptionGroup per nursery: take the innermost.
            first: BaseException = group
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            assert isinstance(first, _Reset)
            session.result.end = f"{first.side}-reset"
    return session.result

"""The pass path: connect to the MTA, announce the client, relay until done.

If the MTA cannot be reached the client is told `421 4.3.2` and a real MTA on
the other end retries later, so no mail is lost.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import trio

from . import events, proxyproto, tcptune
from .eventlog import EventLog
from .events import ConnInfo
from .relay import RelayResult, connect, send_all
from .relaypool import RelayPool
from .settings import Settings

__all__ = [
    "BACKEND_UNAVAILABLE",
    "BackendTarget",
    "handoff",
    "reply_and_close",
    "resolve_backend",
    "resolve_optional_backend",
]

BACKEND_UNAVAILABLE = b"421 4.3.2 Service temporarily unavailable, try again later\r\n"


@dataclass(frozen=True, slots=True)
class BackendTarget:
    """The MTA's resolved socket addresses, tried in order."""

    name: str
    addresses: tuple[tuple[int, tuple[object, ...]], ...]  # (family, sockaddr)


async def resolve_backend(host: str, port: int) -> BackendTarget:
    """Resolve the MTA once (at start and on reload), not per connection."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[tuple[int, tuple[object, ...]]] = []
    for family, _, _, _, addr in infos:
        entry = (int(family), tuple(addr))
        if entry not in seen:
            seen.append(entry)
    name = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return BackendTarget(name, tuple(seen))


async def resolve_optional_backend(settings: Settings) -> BackendTarget | None:
    """The --backend resolved, or None when clients go to an --exec program."""
    if settings.backend is None:
        return None
    return await resolve_backend(settings.backend.host, settings.backend.port)


def reply_and_close(sock: socket.socket, line: bytes) -> None:
    """Best-effort one-line reply on a non-blocking socket, then close it."""
    try:
        sock.send(line, getattr(socket, "MSG_DONTWAIT", 0) | getattr(socket, "MSG_NOSIGNAL", 0))
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


async def _open_backend(target: BackendTarget, timeout: float) -> socket.socket:
    last: Exception = OSError("no address for the backend")
    for family, addr in target.addresses:
        try:
            return await connect(addr, family, timeout)
        except (OSError, TimeoutError) as exc:
            last = exc
    raise last


#: A relayed client silent this long is probed; after KEEPALIVE_COUNT unanswered
#: probes KEEPALIVE_INTERVAL apart, or data unacknowledged for USER_TIMEOUT_MS,
#: the kernel drops it, well before --relay-timeout would.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 6
USER_TIMEOUT_MS = 120_000


def _reap_dead_peers(sock: socket.socket) -> None:
    """Let the kernel notice a relayed client that vanished without closing."""
    try:
        tcptune.set_keepalive(sock.fileno(), KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
        tcptune.set_user_timeout(sock.fileno(), USER_TIMEOUT_MS)
    except OSError:
        pass  # the client may have gone already; the relay will see it


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


async def handoff(
    sock: socket.socket,
    conn: ConnInfo,
    accepted_at: float,
    target: BackendTarget,
    proxy_protocol: str,
    connect_timeout: float,
    relay_timeout: float,
    log: EventLog,
    pool: RelayPool,
) -> None:
    """Hand one passed client to the MTA and relay (in `pool`) until the session ends."""
    try:
        try:
            backend = await _open_backend(target, connect_timeout)
        except (OSError, TimeoutError) as exc:
            reply_and_close(sock, BACKEND_UNAVAILABLE)
            elapsed = trio.current_time() - accepted_at
            log.emit(events.backend_error(conn, elapsed, target.name, _reason(exc)))
            return
        started = trio.current_time()
        result = RelayResult()
        try:  # forward each reply at once: no Nagle delay behind a delayed ACK
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        _reap_dead_peers(sock)
        try:
            header = proxyproto.header(
                proxy_protocol, conn.client, conn.client_port, conn.server, conn.server_port
            )
            try:
                if header:
                    await send_all(backend, header)
            except OSError:
                result.end = "backend-reset"
            else:
                await pool.relay(sock, backend, relay_timeout, result)
        except* trio.Cancelled:
            result.end = "shutdown"  # cut at the end of the shutdown grace period
            raise
        finally:
            backend.close()
            now = trio.current_time()
            log.emit(
                events.relay_end(
                    conn,
                    now - accepted_at,
                    now - started,
                    result.from_client,
                    result.to_client,
                    result.end,
                )
            )
    except Exception as exc:  # never let one session take the server down
        log.emit(events.internal_error(conn, trio.current_time() - accepted_at, repr(exc)))
    finally:
        sock.close()

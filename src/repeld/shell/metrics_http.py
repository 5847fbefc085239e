"""The --metrics endpoint: `GET /metrics` over HTTP/1.1, on trio, parsed by h11.

h11 is the sans-IO HTTP/1.1 library of trio's world: bytes in, events out,
bytes to send back, the same shape as repeld's own core. This module only
moves those bytes and keeps the limits; what is served comes from a `render`
coroutine (repeld/metrics.py builds the text).

Not prometheus-client's own `start_http_server`: that is a ThreadingHTTPServer,
one thread per scrape beside the trio loop, with no bound on a request's size,
no timeout per connection and no cap on concurrent connections, so a scraper
that dribbles its headers holds a thread forever; and the --workers parent must
await its workers' counters before it can answer, which a thread cannot do
inside trio. Here a scrape is one trio task, and a slow or hostile scraper
never stalls the event loop:

- the request line and headers may take `MAX_REQUEST` bytes (h11's
  max_incomplete_event_size; past it 431), the body is never read;
- a connection lives at most `TIMEOUT` seconds, whatever it does;
- at most `MAX_SCRAPES` connections are served at once; one more is answered
  503 with a non-blocking send and closed, without a task;
- one request per connection (`Connection: close`): scrapes are seconds apart.

Any path but /metrics (a query string is ignored) is 404, any method but GET
and HEAD is 405.
"""

from __future__ import annotations

import errno
import http
import socket
import sys
from collections.abc import Awaitable, Callable

import h11
import trio

from repeld.config.values import MetricsAddress
from repeld.core.addresses import host_port
from repeld.metrics import CONTENT_TYPE

__all__ = [
    "MAX_REQUEST",
    "MAX_SCRAPES",
    "TIMEOUT",
    "MetricsEndpoint",
    "open_endpoint",
    "open_metrics_socket",
    "route",
]

#: The most bytes of request line and headers one scrape may send.
MAX_REQUEST = 8192
#: The longest one scrape connection may last.
TIMEOUT = 10.0
#: Scrape connections served at once; more are answered 503 and closed.
MAX_SCRAPES = 4
#: accept() errors that mean "out of resources for a moment": pause, then accept again.
_CAPACITY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_PAUSE = 0.1
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 21\r\nConnection: close\r\n\r\ntoo many scrapes now\n"
)


def open_metrics_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on HOST:PORT (before any privilege drop); a non-blocking socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(MAX_SCRAPES * 4)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def open_endpoint(
    address: MetricsAddress,
    render: Callable[[], Awaitable[bytes]],
    *,
    foreground: bool = False,
) -> MetricsEndpoint:
    """Bind --metrics (as root, before any drop) and, with -f, say where it is."""
    endpoint = MetricsEndpoint(open_metrics_socket(address.host, address.port), render)
    if foreground:
        where = host_port(*endpoint.address)
        print(f"repeld: metrics at http://{where}/metrics", file=sys.stderr, flush=True)
    return endpoint


def route(method: bytes, target: bytes) -> int:
    """The status a request gets before any rendering: 200, 404 or 405."""
    if target.split(b"?", 1)[0] != b"/metrics":
        return 404
    if method not in (b"GET", b"HEAD"):
        return 405
    return 200


class MetricsEndpoint:
    """Serves `render()`'s bytes at /metrics on a listening socket, within the limits."""

    def __init__(
        self,
        sock: socket.socket,
        render: Callable[[], Awaitable[bytes]],
        content_type: str = CONTENT_TYPE,
        *,
        max_scrapes: int = MAX_SCRAPES,
        timeout: float = TIMEOUT,
        max_request: int = MAX_REQUEST,
    ) -> None:
        self.sock = sock
        self._render = render
        self._content_type = content_type.encode("ascii")
        self.max_scrapes = max_scrapes
        self.timeout = timeout
        self.max_request = max_request
        #: Scrape connections being served now, answered in full, turned away busy.
        self.active = 0
        self.served = 0
        self.busy = 0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def statistics(self) -> dict[str, int]:
        return {"active": self.active, "served": self.served, "busy": self.busy}

    async def run(self) -> None:
        """Accept scrapes until cancelled; the socket is closed at the end."""
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    await trio.lowlevel.wait_readable(self.sock)
                    try:
                        conn, _ = self.sock.accept()
                    except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                        continue
                    except OSError as exc:
                        if exc.errno not in _CAPACITY:
                            raise
                        await trio.sleep(_PAUSE)
                        continue
                    if self.active >= self.max_scrapes:
                        self._turn_away(conn)
                        continue
                    self.active += 1
                    conn.setblocking(False)
                    nursery.start_soon(
                        self._serve, trio.SocketStream(trio.socket.from_stdlib_socket(conn))
                    )
        finally:
            self.sock.close()

    def _turn_away(self, conn: socket.socket) -> None:
        self.busy += 1
        try:
            conn.setblocking(False)
            conn.send(_BUSY)  # a fresh socket's buffer takes it whole, or it is lost
        except OSError:
            pass
        conn.close()

    async def _serve(self, stream: trio.SocketStream) -> None:
        # A handler catches its own errors: one bad scraper never ends the endpoint.
        try:
            with trio.move_on_after(self.timeout):
                await self._exchange(stream)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        # h11's own bound is a backstop; ours comes first and says 431.
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_request + 8192)
        try:
            request = await _read_request(conn, stream, self.max_request)
        except _TooLong:
            await self._respond(conn, stream, 431, b"request too long\n")
            return
        except h11.RemoteProtocolError as exc:
            # Not HTTP (400): say so if h11 still lets us answer.
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._respond(conn, stream, exc.error_status_hint, b"bad request\n")
            return
        if request is None:
            return  # closed before a whole request
        status = route(request.method, request.target)
        if status == 200:
            body = await self._render()
            await self._respond(conn, stream, 200, body, self._content_type)
            self.served += 1
        elif status == 405:
            await self._respond(conn, stream, 405, b"GET only\n", extra=[(b"Allow", b"GET, HEAD")])
        else:
            await self._respond(conn, stream, status, b"try /metrics\n")

    async def _respond(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        status: int,
        body: bytes,
        content_type: bytes = b"text/plain; charset=utf-8",
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        headers = [
            (b"Content-Type", content_type),
            (b"Content-Length", str(len(body)).encode("ascii")),
            (b"Connection", b"close"),
            *(extra or []),
        ]
        reason = http.HTTPStatus(status).phrase.encode("ascii")
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
        if conn.our_state is h11.SEND_BODY:  # not after a HEAD request
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)


class _TooLong(Exception):
    """The request line and headers went past the limit."""


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream, limit: int
) -> h11.Request | None:
    """The request line and headers, or None if the client closed first."""
    received = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            received += len(data)
            if received > limit:  # a GET has no body: all of it is request line and headers
                raise _TooLong
            conn.receive_data(data)  # b"" at EOF
            continue
        if isinstance(event, h11.Request):
            return event
        return None  # ConnectionClosed, or PAUSED: nothing to serve

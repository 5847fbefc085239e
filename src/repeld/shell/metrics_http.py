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
- a connection has `READ_TIMEOUT` seconds from accept for its whole request
  (a deadline, not an idle timer: bytes that trickle in do not move it; past
  it 408) and `TIMEOUT` seconds for everything, whatever it does;
- `MAX_SCRAPES` connections are served at once. When one more comes, the
  oldest connection still sending its request is closed to make room: a
  scraper sends its request at once and is served, so clients that dribble
  their headers and reconnect only ever take each other's places (the newest
  first, as postscreen's and spamd's answer to a full table is to shed the
  oldest). Only when every slot is past its request is the newcomer told
  503, by a task of its own (at most `MAX_TURNED_AWAY` at once, else just
  closed) that reads the request first and shuts its side down before the
  close, so that the scraper reads the 503 instead of a reset;
- HEAD gets the headers a GET would; an absolute-form target
  (`GET http://host:9100/metrics`, RFC 9112 section 3.2.2) is taken as its path;
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
from repeld.shell.accept import RETRY_ERRNOS

__all__ = [
    "MAX_REQUEST",
    "MAX_SCRAPES",
    "MAX_TURNED_AWAY",
    "READ_TIMEOUT",
    "TIMEOUT",
    "MetricsEndpoint",
    "open_endpoint",
    "open_metrics_socket",
    "route",
]

#: The most bytes of request line and headers one scrape may send.
MAX_REQUEST = 8192
#: Seconds from accept by which the whole request must have arrived.
READ_TIMEOUT = 3.0
#: The longest one scrape connection may last.
TIMEOUT = 10.0
#: Scrape connections served at once (the oldest still reading makes room for a newcomer).
MAX_SCRAPES = 8
#: Connections being told 503 at once, and how long each may take; more are just closed.
MAX_TURNED_AWAY = 16
TURN_AWAY_TIMEOUT = 1.0
#: accept() errors that mean "out of resources for a moment": pause, then accept again.
_CAPACITY = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_PAUSE = 0.1


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
    except OSError as exc:
        sock.close()
        # Start-up prints this one line: it says which of repeld's sockets.
        where = host_port(host, port)
        raise OSError(exc.errno, f"--metrics: cannot listen on {where}: {exc.strerror}") from None
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
    if target[:7].lower() == b"http://" or target[:8].lower() == b"https://":
        # absolute-form, as a client talking to a proxy sends it: only the path counts
        path = target.split(b"//", 1)[1].partition(b"/")[1:]
        target = b"".join(path)
    if target.split(b"?", 1)[0] != b"/metrics":
        return 404
    if method not in (b"GET", b"HEAD"):
        return 405
    return 200


class _Slot:
    """One connection being served: whether it is still reading, and how to end it."""

    __slots__ = ("reading", "scope")

    def __init__(self) -> None:
        self.reading = True
        self.scope = trio.CancelScope()


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
        read_timeout: float = READ_TIMEOUT,
        max_request: int = MAX_REQUEST,
    ) -> None:
        self.sock = sock
        self._render = render
        self._content_type = content_type.encode("ascii")
        self.max_scrapes = max_scrapes
        self.timeout = timeout
        self.read_timeout = min(read_timeout, timeout)
        self.max_request = max_request
        #: The connections being served, oldest first (dicts keep insertion order).
        self._slots: dict[_Slot, None] = {}
        self._turning_away = 0
        #: Scrapes answered in full, connections told 503, closed to make room.
        self.served = 0
        self.busy = 0
        self.evicted = 0

    @property
    def active(self) -> int:
        return len(self._slots)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def statistics(self) -> dict[str, int]:
        return {
            "active": self.active,
            "served": self.served,
            "busy": self.busy,
            "evicted": self.evicted,
        }

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
                        if exc.errno in RETRY_ERRNOS:  # that client is gone: the next
                            await trio.lowlevel.checkpoint()
                            continue
                        if exc.errno not in _CAPACITY:
                            raise
                        await trio.sleep(_PAUSE)
                        continue
                    conn.setblocking(False)
                    stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
                    if len(self._slots) >= self.max_scrapes and not self._make_room():
                        self.busy += 1
                        if self._turning_away >= MAX_TURNED_AWAY:
                            conn.close()  # past every bound: no answer at all
                            continue
                        self._turning_away += 1
                        nursery.start_soon(self._turn_away, stream)
                        continue
                    slot = _Slot()
                    self._slots[slot] = None
                    nursery.start_soon(self._serve, stream, slot)
        finally:
            self.sock.close()

    def _make_room(self) -> bool:
        """End the oldest connection still sending its request; False if none is."""
        for slot in self._slots:
            if slot.reading:
                slot.scope.cancel()
                del self._slots[slot]  # its task only closes the socket now
                self.evicted += 1
                return True
        return False

    async def _turn_away(self, stream: trio.SocketStream) -> None:
        # Read the request first (a close with unread bytes is a reset, which
        # can reach the client before the 503 does), answer, and half-close.
        try:
            with trio.move_on_after(TURN_AWAY_TIMEOUT):
                conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_request)
                try:
                    await _read_request(conn, stream, self.max_request)
                except (_TooLong, h11.RemoteProtocolError):
                    pass
                await stream.send_all(_plain(503, b"too many scrapes now\n"))
                await stream.send_eof()
                while await stream.receive_some(4096):  # until the client closes
                    pass
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._turning_away -= 1
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream, slot: _Slot) -> None:
        # A handler catches its own errors: one bad scraper never ends the endpoint.
        try:
            with slot.scope, trio.move_on_after(self.timeout):
                await self._exchange(stream, slot)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            self._slots.pop(slot, None)
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream, slot: _Slot) -> None:
        # h11's own bound is a backstop; ours comes first and says 431.
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_request + 8192)
        request: h11.Request | None = None
        try:
            with trio.move_on_after(self.read_timeout) as reading:
                request = await _read_request(conn, stream, self.max_request)
        except _TooLong:
            await self._respond(conn, stream, 431, b"request too long\n")
            return
        except h11.RemoteProtocolError as exc:
            # Not HTTP (400): say so if h11 still lets us answer.
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self._respond(conn, stream, exc.error_status_hint, b"bad request\n")
            return
        if reading.cancelled_caught:
            await stream.send_all(_plain(408, b"request not complete in time\n"))
            return
        if request is None:
            return  # closed before a whole request
        slot.reading = False
        status = route(request.method, request.target)
        head = request.method == b"HEAD"
        if status == 200:
            body = await self._render()
            await self._respond(conn, stream, 200, body, self._content_type, head=head)
            self.served += 1
        elif status == 405:
            await self._respond(
                conn, stream, 405, b"GET only\n", extra=[(b"Allow", b"GET, HEAD")], head=head
            )
        else:
            await self._respond(conn, stream, status, b"try /metrics\n", head=head)

    async def _respond(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        status: int,
        body: bytes,
        content_type: bytes = b"text/plain; charset=utf-8",
        extra: list[tuple[bytes, bytes]] | None = None,
        *,
        head: bool = False,
    ) -> None:
        headers = [
            (b"Content-Type", content_type),
            (b"Content-Length", str(len(body)).encode("ascii")),
            (b"Connection", b"close"),
            *(extra or []),
        ]
        reason = http.HTTPStatus(status).phrase.encode("ascii")
        out = conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
        if not head:  # HEAD: the headers of a GET and no body (RFC 9110 9.3.2)
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(out)


def _plain(status: int, body: bytes) -> bytes:
    """A whole response written without h11 (no request was parsed, or none completely)."""
    reason = http.HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode("ascii") + body


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

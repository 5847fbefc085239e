"""The relay pool over real loopback TCP pairs, with trio's autojump clock.

Each session is two TCP connections: a client peer talking to the socket the
pool reads as "client", and a backend peer behind the socket it reads as
"backend". The peers are trio sockets driven by the test; the pool's ends are
plain non-blocking sockets, as the daemon hands them over.
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from repeld.shell.poller import IN
from repeld.shell.relay import CHUNK, RelayResult
from repeld.shell.relaypool import RelayPool, RelayPoolClosed

from ..harness import unanswered

LONG = 1e6  # an idle timeout no test reaches unless it means to
HUNG = 3600.0


@dataclass
class Pair:
    """One relayed session's four sockets (the pool's two are plain sockets).

    The backend half exists once `relay` has handed the client to the pool: the
    pool connects to `listener` (the test's MTA) and the test accepts that
    connection as `backend_peer`; `backend` is the pool's own socket.
    """

    client_peer: trio.socket.SocketType
    client: socket.socket
    listener: socket.socket
    backend: socket.socket = field(init=False)
    backend_peer: trio.socket.SocketType = field(init=False)
    backend_peer_raw: socket.socket = field(init=False)  # the same, for writes that must not wait

    def close(self) -> None:
        # The pool closes the backend socket it opened.
        for s in (self.client_peer, self.backend_peer):
            s.close()
        self.client.close()


def _tcp(
    listener: socket.socket, *, rcvbuf: int = 0, sndbuf: int = 0
) -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair: (connecting end, accepted end), both non-blocking."""
    a = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before the window is set
    a.connect(listener.getsockname())
    b, _ = listener.accept()
    if sndbuf:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


@contextmanager
def listening() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0), backlog=512) as lst:
        yield lst


def make_pair(listener: socket.socket, *, client_rcvbuf: int = 0, client_sndbuf: int = 0) -> Pair:
    client_peer, client = _tcp(listener, rcvbuf=client_rcvbuf, sndbuf=client_sndbuf)
    return Pair(trio.socket.from_stdlib_socket(client_peer), client, listener)


class Relayed:
    """A session handed to the pool as the server hands it (connect_and_relay)."""

    def __init__(self, result: RelayResult) -> None:
        #: The pool's own record, filled in as bytes flow.
        self.result = result
        self.ended: list[RelayResult] = []
        self._event = trio.Event()

    def done(self, result: RelayResult) -> None:
        assert result is self.result
        self.ended.append(result)
        self._event.set()

    async def wait(self) -> RelayResult:
        await self._event.wait()
        assert len(self.ended) == 1
        return self.ended[0]


def relay(
    p: RelayPool, pair: Pair, idle_timeout: float, *, strip_pipe_connect: bool = False
) -> Relayed:
    """Hand `pair.client` to the pool, which connects to the test's listener; the
    test accepts that connection as the backend's peer. Returns at once."""
    box: list[Relayed] = []
    p.connect_and_relay(
        pair.client, [(socket.AF_INET, pair.listener.getsockname())],
        connect_timeout=5.0, idle_timeout=idle_timeout, done=lambda r: box[0].done(r),
        strip_pipe_connect=strip_pipe_connect,
    )  # fmt: skip
    side = p._sides[pair.client.fileno()]
    box.append(Relayed(side.session.result))
    backend = side.peer
    assert backend is not side, "the loopback connect failed at once"
    # Blocking: the loopback handshake completes in the kernel without us.
    peer, _ = pair.listener.accept()
    peer.setblocking(False)
    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pair.backend = backend.sock
    pair.backend_peer_raw = peer
    pair.backend_peer = trio.socket.from_stdlib_socket(peer)
    return box[0]


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    """pytest-trio's autojump clock, but one that jumps only after 20 ms of real
    idleness: these tests wait on real loopback I/O, which a loaded box may deliver
    a few milliseconds late, and a jump at once would fire the idle timeouts first."""
    return trio.testing.MockClock(autojump_threshold=0.02)


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with listening() as lst:
        yield lst


async def _watchdog() -> None:
    # A lost end of file or wake-up would leave a test waiting for ever; with the
    # autojump clock this fails it instead (and cancels the test) in no real time.
    await trio.sleep(HUNG)
    raise AssertionError(f"still running after {HUNG:g} virtual seconds: hung")


@pytest.fixture
async def pool() -> AsyncIterator[RelayPool]:
    errors: list[str] = []
    p = RelayPool(errors.append)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        nursery.start_soon(_watchdog)
        yield p
        assert_nothing_registered(p)
        assert errors == []
        nursery.cancel_scope.cancel()


def epoll_targets(p: RelayPool) -> dict[int, int]:
    """What the kernel says is in the pool's epoll set: {fd: event mask} (Linux)."""
    text = Path(f"/proc/self/fdinfo/{p._poller.fileno()}").read_text()
    found: dict[int, int] = {}
    for line in text.splitlines():
        if line.startswith("tfd:"):
            parts = line.split()
            found[int(parts[1])] = int(parts[3], 16)
    return found


def assert_nothing_registered(p: RelayPool) -> None:
    assert len(p) == 0
    assert p.registered() == {}
    if sys.platform == "linux":
        assert epoll_targets(p) == {}


async def recv_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await sock.recv(n - len(data))
        assert chunk, f"end of file after {len(data)} of {n} bytes"
        data += chunk
    return data


async def recv_to_eof(sock: trio.socket.SocketType) -> bytes:
    parts = []
    while chunk := await sock.recv(CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def abort(sock: trio.socket.SocketType) -> None:
    """Close with SO_LINGER 0: an RST, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    sock.close()


async def smtp_session(
    p: RelayPool, pair: Pair, tag: bytes = b"", sizes: list[int] | None = None
) -> RelayResult:
    """A short SMTP-shaped exchange through the pool; the relay's result.

    `sizes` gets the pool's number of sessions once this one is under way.
    """
    session = relay(p, pair, LONG)
    greeting = b"220 mx" + tag + b" ESMTP\r\n"
    await pair.backend_peer.send(greeting)
    assert await recv_exactly(pair.client_peer, len(greeting)) == greeting
    if sizes is not None:
        sizes.append(len(p))
    for line, reply in ((b"EHLO a" + tag, b"250 ok"), (b"QUIT", b"221 bye")):
        await pair.client_peer.send(line + b"\r\n")
        assert await recv_exactly(pair.backend_peer, len(line) + 2) == line + b"\r\n"
        await pair.backend_peer.send(reply + b"\r\n")
        assert await recv_exactly(pair.client_peer, len(reply) + 2) == reply + b"\r\n"
    pair.backend_peer.shutdown(socket.SHUT_WR)
    assert await pair.client_peer.recv(10) == b""
    pair.client_peer.shutdown(socket.SHUT_WR)
    assert await pair.backend_peer.recv(10) == b""
    return await session.wait()


async def test_copies_both_ways_and_counts_bytes(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    pair = make_pair(listener)
    result = await smtp_session(pool, pair)
    assert result.end == "closed"
    assert result.from_client == len(b"EHLO a\r\nQUIT\r\n")
    assert result.to_client == len(b"220 mx ESMTP\r\n250 ok\r\n221 bye\r\n")
    pair.close()


async def test_client_half_close_backend_still_answers(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    pair = make_pair(listener)
    session = relay(pool, pair, LONG)
    results = session.ended
    await pair.client_peer.send(b"QUIT\r\n")
    pair.client_peer.shutdown(socket.SHUT_WR)
    assert await recv_to_eof(pair.backend_peer) == b"QUIT\r\n"  # the half-close came through
    await trio.sleep(5)
    assert not results  # one direction is still open
    await pair.backend_peer.send(b"221 bye\r\n")
    assert await recv_exactly(pair.client_peer, 9) == b"221 bye\r\n"
    await pair.backend_peer.send(b"and more\r\n")
    pair.backend_peer.close()
    assert await recv_to_eof(pair.client_peer) == b"and more\r\n"
    result = await session.wait()
    assert (result.end, result.from_client, result.to_client) == ("closed", 6, 19)
    pair.close()


async def test_backend_half_close_client_still_sends(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    pair = make_pair(listener)
    session = relay(pool, pair, LONG)
    result = session.result
    await pair.backend_peer.send(b"421 going away\r\n")
    pair.backend_peer.shutdown(socket.SHUT_WR)
    assert await recv_to_eof(pair.client_peer) == b"421 going away\r\n"
    await trio.sleep(3)
    await pair.client_peer.send(b"QUIT\r\n")
    assert await recv_exactly(pair.backend_peer, 6) == b"QUIT\r\n"
    pair.client_peer.close()
    assert await pair.backend_peer.recv(10) == b""
    await session.wait()
    assert (result.end, result.from_client, result.to_client) == ("closed", 6, 16)
    pair.close()


@pytest.mark.parametrize("side", ["client", "backend"])
async def test_a_reset_ends_the_session_and_names_the_side(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket, side: str
) -> None:
    pair = make_pair(listener)
    session = relay(pool, pair, LONG)
    result = session.result
    await pair.backend_peer.send(b"220 hi\r\n")
    assert await recv_exactly(pair.client_peer, 8) == b"220 hi\r\n"
    await pair.client_peer.send(b"EHLO x\r\n")
    assert await recv_exactly(pair.backend_peer, 8) == b"EHLO x\r\n"
    started = trio.current_time()
    abort(pair.client_peer if side == "client" else pair.backend_peer)
    await session.wait()
    assert trio.current_time() - started < 0.01
    assert (result.end, result.from_client, result.to_client) == (f"{side}-reset", 8, 8)
    pair.close()


async def test_reset_while_the_other_direction_is_half_closed(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    pair = make_pair(listener)
    session = relay(pool, pair, LONG)
    result = session.result
    pair.client_peer.shutdown(socket.SHUT_WR)  # the client is done sending...
    assert await pair.backend_peer.recv(10) == b""
    await trio.sleep(1)
    abort(pair.backend_peer)  # ...and the backend resets
    await session.wait()
    assert result.end == "backend-reset"
    pair.close()


async def test_idle_timeout_comes_on_time(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    pair = make_pair(listener)
    session = relay(pool, pair, 30.0)
    result = session.result
    start = trio.current_time()
    await trio.sleep(5)
    await pair.client_peer.send(b"NOOP\r\n")  # activity pushes the timeout on
    assert await recv_exactly(pair.backend_peer, 6) == b"NOOP\r\n"
    await trio.sleep(20)
    await pair.backend_peer.send(b"250 ok\r\n")
    assert await recv_exactly(pair.client_peer, 8) == b"250 ok\r\n"
    await session.wait()
    assert result.end == "timeout"
    assert trio.current_time() - start == pytest.approx(25 + 30, abs=0.01)
    assert (result.from_client, result.to_client) == (6, 8)
    pair.close()


async def test_idle_timeout_while_half_closed(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    pair = make_pair(listener)
    start = trio.current_time()
    pair.client_peer.shutdown(socket.SHUT_WR)
    result = await relay(pool, pair, 7.0).wait()
    assert result.end == "timeout"
    assert trio.current_time() - start == pytest.approx(7, abs=0.01)
    pair.close()


async def test_each_session_has_its_own_timeout(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    pairs = [make_pair(listener) for _ in range(3)]
    ended: dict[int, float] = {}
    start = trio.current_time()

    async def relaying(i: int, timeout: float) -> None:
        result = await relay(pool, pairs[i], timeout).wait()
        assert result.end == "timeout"
        ended[i] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        for i, timeout in enumerate((50.0, 10.0, 30.0)):
            nursery.start_soon(relaying, i, timeout)
    assert ended == pytest.approx({0: 50.0, 1: 10.0, 2: 30.0}, abs=0.01)
    for pair in pairs:
        pair.close()


async def test_fast_sender_slow_reader_buffers_at_most_a_chunk(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    # Small kernel buffers on the client's way, so what the pool holds shows.
    pair = make_pair(listener, client_rcvbuf=16384, client_sndbuf=16384)
    kernel = pair.client.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) + (
        pair.client_peer.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    )
    payload = os.urandom(8 * 1024 * 1024)
    session = relay(pool, pair, LONG)
    result = session.result
    written = 0
    # The backend writes as fast as it can; the client reads nothing.
    raw = pair.backend_peer_raw
    stalled = 0
    while stalled < 20 and written < len(payload):
        try:
            written += raw.send(payload[written : written + CHUNK])
            stalled = 0
        except BlockingIOError:
            stalled += 1
            await trio.sleep(0.5)
    assert written < len(payload)  # the backend was held up
    ahead = result.to_client
    assert ahead <= CHUNK + kernel  # read ahead of the client: one chunk at most
    (side,) = (s for s in pool._sides.values() if s.name == "client")
    assert side.pending is not None and len(side.pending) <= CHUNK
    if sys.platform == "linux":
        # Not reading the backend, waiting for the client to take more.
        targets = epoll_targets(pool)
        assert targets.get(pair.backend.fileno(), 0) & 1 == 0
        assert targets[pair.client.fileno()] & 4
    await trio.sleep(10)
    assert result.to_client == ahead  # no reading while blocked
    # The client reads: everything arrives, in order.
    got = bytearray()
    while len(got) < written:
        got += await pair.client_peer.recv(CHUNK)
        if len(got) >= written // 2 and written < len(payload):
            # Meanwhile the backend finishes its write.
            try:
                written += raw.send(payload[written : written + CHUNK])
            except BlockingIOError:
                pass
    pair.backend_peer.shutdown(socket.SHUT_WR)
    got += await recv_to_eof(pair.client_peer)
    pair.client_peer.shutdown(socket.SHUT_WR)
    await session.wait()
    assert bytes(got) == payload[:written]
    assert (result.end, result.to_client) == ("closed", written)
    pair.close()


async def test_large_transfers_both_ways_arrive_intact(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    up = os.urandom(3 * 1024 * 1024 + 17)
    down = os.urandom(2 * 1024 * 1024 + 5)
    pair = make_pair(listener)
    session = relay(pool, pair, LONG)
    result = session.result
    received: dict[str, bytes] = {}

    async def send_then_shut(sock: trio.socket.SocketType, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await sock.send(view[:200_000]) :]
        sock.shutdown(socket.SHUT_WR)

    async def drain(name: str, sock: trio.socket.SocketType) -> None:
        received[name] = await recv_to_eof(sock)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_then_shut, pair.client_peer, up)
        nursery.start_soon(send_then_shut, pair.backend_peer, down)
        nursery.start_soon(drain, "backend", pair.backend_peer)
        nursery.start_soon(drain, "client", pair.client_peer)
    await session.wait()
    assert hashlib.sha256(received["backend"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(received["client"]).digest() == hashlib.sha256(down).digest()
    assert (result.end, result.from_client, result.to_client) == ("closed", len(up), len(down))
    pair.close()


async def test_two_hundred_sessions_in_one_pool(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    pairs = [make_pair(listener) for _ in range(200)]
    results: dict[int, RelayResult] = {}
    sizes: list[int] = []

    async def one(i: int) -> None:
        results[i] = await smtp_session(pool, pairs[i], b"%d" % i, sizes)

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    assert max(sizes) > 100  # they really were relayed side by side
    assert len(results) == 200
    for i, result in results.items():
        tag = b"%d" % i
        assert result.end == "closed"
        assert result.from_client == len(b"EHLO a" + tag + b"\r\nQUIT\r\n")
        assert result.to_client == len(b"220 mx" + tag + b" ESMTP\r\n250 ok\r\n221 bye\r\n")
    for pair in pairs:
        pair.close()


@pytest.mark.parametrize("blocked", [False, True], ids=["idle", "with-backlog"])
async def test_a_timed_out_session_leaves_the_set_and_its_fds_are_reused(
    autojump_clock: trio.testing.MockClock,
    pool: RelayPool,
    listener: socket.socket,
    blocked: bool,
) -> None:
    pair = make_pair(listener, client_rcvbuf=16384, client_sndbuf=16384)
    session = relay(pool, pair, 10.0)
    result = session.result
    await pair.client_peer.send(b"EHLO x\r\n")
    assert await recv_exactly(pair.backend_peer, 8) == b"EHLO x\r\n"
    if blocked:  # leave the pool with bytes it cannot deliver
        try:
            while True:
                pair.backend_peer_raw.send(b"x" * CHUNK)
        except BlockingIOError:
            pass
    assert await session.wait() is result
    assert result.end == "timeout"
    assert trio.current_time() == pytest.approx(10, abs=0.01)
    assert result.from_client == 8
    assert_nothing_registered(pool)
    if blocked:
        assert result.to_client > 0
    # The caller closes the client, the pool its backend socket; the fds come
    # back for the next sessions, which the pool relays as if nothing happened.
    old = {pair.client.fileno(), pair.backend.fileno()}
    pair.close()
    pairs = [make_pair(listener) for _ in range(2)]
    assert old & {p.client.fileno() for p in pairs}
    for i, again in enumerate(pairs):
        assert (await smtp_session(pool, again, b"%d" % i)).end == "closed"
        again.close()


# -- connect_and_relay: the pool connects to the MTA itself -----------------------------


def closed_port() -> int:
    """A loopback port nothing listens on (connects to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def unanswering() -> Iterator[tuple[str, int]]:
    """A loopback address whose connects are never answered: a listener with a
    full accept queue, so the kernel drops every further SYN."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        fillers: list[socket.socket] = []
        try:
            for _ in range(4):  # the queue takes backlog + 1
                f = socket.socket()
                f.setblocking(False)
                f.connect_ex(lst.getsockname())
                fillers.append(f)
            yield lst.getsockname()
        finally:
            for f in fillers:
                f.close()


class Ended:
    """A `done` callback that records what it was told, and when."""

    def __init__(self) -> None:
        self.results: list[RelayResult] = []
        self.at: list[float] = []
        self.event = trio.Event()

    def __call__(self, result: RelayResult) -> None:
        self.results.append(result)
        self.at.append(trio.current_time())
        self.event.set()

    async def wait(self) -> RelayResult:
        await self.event.wait()
        assert len(self.results) == 1
        return self.results[0]


def v4(addr: tuple[str, int]) -> tuple[int, tuple[object, ...]]:
    return (socket.AF_INET, addr)


def start(
    p: RelayPool,
    client: socket.socket,
    addresses: list[tuple[int, tuple[object, ...]]],
    *,
    header: bytes = b"",
    connect_timeout: float = 5.0,
) -> Ended:
    """connect_and_relay with a recording `done` (and no idle timeout to reach)."""
    ended = Ended()
    p.connect_and_relay(
        client, addresses, header=header, connect_timeout=connect_timeout,
        idle_timeout=LONG, done=ended,
    )  # fmt: skip
    return ended


async def mta_listener() -> trio.socket.SocketType:
    mta = trio.socket.socket()
    await mta.bind(("127.0.0.1", 0))
    mta.listen(64)
    return mta


async def test_connects_writes_the_header_first_and_relays(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    client_peer, client = _tcp(listener)
    peer = trio.socket.from_stdlib_socket(client_peer)
    with await mta_listener() as mta:
        # The client talks first (a trusted client that pipelines): its bytes
        # must still come after the header.
        await peer.send(b"EHLO x\r\n")
        ended = start(
            pool, client, [v4(mta.getsockname())], header=b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
        )
        assert len(pool) == 1
        backend_peer, _ = await mta.accept()
        with backend_peer, peer:
            want = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nEHLO x\r\n"
            assert await recv_exactly(backend_peer, len(want)) == want
            await backend_peer.send(b"250 ok\r\n")
            assert await recv_exactly(peer, 8) == b"250 ok\r\n"
            backend_peer.shutdown(socket.SHUT_WR)
            assert await peer.recv(10) == b""
            peer.shutdown(socket.SHUT_WR)
            assert await backend_peer.recv(10) == b""
            result = await ended.wait()
    assert result.end == "closed"
    assert result.connect_error is None and result.error is None
    assert result.connected_at == 0.0  # connected at once, on loopback
    assert result.from_client == 8 and result.to_client == 8
    assert client.fileno() != -1  # the client socket is the caller's to close
    client.close()
    assert_nothing_registered(pool)


async def test_a_connect_that_completes_at_once_is_relayed_at_once(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    # On loopback the handshake is over when connect() returns: both sockets are
    # read at once, with no wait for the backend to become writable.
    client_peer, client = _tcp(listener)
    with await mta_listener() as mta:
        ended = start(pool, client, [v4(mta.getsockname())], header=b"PROXY x\r\n")
        registered = pool.registered()
        assert sorted(registered.values()) == [IN, IN]
        assert client.fileno() in registered
        backend_peer, _ = await mta.accept()
        with backend_peer:
            assert await recv_exactly(backend_peer, 9) == b"PROXY x\r\n"  # sent already
            client_peer.close()
        result = await ended.wait()
    assert result.connected_at == 0.0
    client.close()
    assert_nothing_registered(pool)


async def test_a_header_larger_than_the_socket_buffer_still_comes_first(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    # The header goes out in parts; the client is not read until it is all out.
    client_peer, client = _tcp(listener)
    peer = trio.socket.from_stdlib_socket(client_peer)
    header = os.urandom(4 * CHUNK) + b"\r\n"
    with await mta_listener() as mta:
        await peer.send(b"DATA\r\n")
        ended = start(pool, client, [v4(mta.getsockname())], header=header)
        backend_peer, _ = await mta.accept()
        with backend_peer, peer:
            await trio.sleep(1)  # the pool fills the buffers and waits
            assert await recv_exactly(backend_peer, len(header) + 6) == header + b"DATA\r\n"
            abort(peer)
            result = await ended.wait()
    assert result.end == "client-reset"
    client.close()
    assert_nothing_registered(pool)


async def test_a_refused_address_is_skipped_for_the_next(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    client_peer, client = _tcp(listener)
    with await mta_listener() as mta:
        ended = start(pool, client, [v4(("127.0.0.1", closed_port())), v4(mta.getsockname())])
        backend_peer, _ = await mta.accept()
        peer = trio.socket.from_stdlib_socket(client_peer)
        with backend_peer, peer:
            await backend_peer.send(b"220 mx\r\n")
            assert await recv_exactly(peer, 8) == b"220 mx\r\n"
            peer.shutdown(socket.SHUT_WR)
            assert await backend_peer.recv(10) == b""
            backend_peer.shutdown(socket.SHUT_WR)
            assert await peer.recv(10) == b""
            result = await ended.wait()
    assert result.connect_error is None
    assert result.end == "closed"
    assert result.to_client == 8
    client.close()
    assert_nothing_registered(pool)


async def test_no_address_answers_tells_why_once(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    client_peer, client = _tcp(listener)
    ended = start(
        pool, client, [v4(("127.0.0.1", closed_port())), v4(("127.0.0.1", closed_port()))]
    )
    result = await ended.wait()
    assert "refused" in (result.connect_error or "").lower()
    assert result.connected_at is None and result.from_client == 0
    await trio.sleep(1)
    assert len(ended.results) == 1
    client.close()
    client_peer.close()
    assert_nothing_registered(pool)


async def test_each_address_gets_the_connect_timeout(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    client_peer, client = _tcp(listener)
    with unanswering() as silent:
        ended = start(pool, client, [v4(silent), v4(silent)], connect_timeout=7.0)
        result = await ended.wait()
    assert ended.at == [pytest.approx(14.0, abs=0.01)]
    assert result.connect_error == "no answer within 7s"
    client.close()
    client_peer.close()
    assert_nothing_registered(pool)


async def test_a_stopped_pool_ends_connecting_and_relaying_sessions_as_shutdown(
    autojump_clock: trio.testing.MockClock, listener: socket.socket
) -> None:
    p = RelayPool(pytest.fail)
    pairs = [_tcp(listener) for _ in range(2)]
    with await mta_listener() as mta, unanswering() as silent:
        async with trio.open_nursery() as runner:
            runner.start_soon(p.run)
            await trio.sleep(0)
            relaying = start(p, pairs[0][1], [v4(mta.getsockname())])
            connecting = start(p, pairs[1][1], [v4(silent)], connect_timeout=60.0)
            backend_peer, _ = await mta.accept()
            await trio.sleep(1)
            assert len(p) == 2
            runner.cancel_scope.cancel()
        backend_peer.close()
    assert relaying.results[0].end == "shutdown"
    assert relaying.results[0].connected_at is not None
    assert connecting.results[0].end == "shutdown"
    assert connecting.results[0].connected_at is None
    assert len(p) == 0
    with pytest.raises(RelayPoolClosed):
        start(p, pairs[0][1], [v4(("127.0.0.1", closed_port()))])
    for a, b in pairs:
        a.close()
        b.close()


async def test_a_failing_done_callback_is_reported_and_does_not_stop_the_pool(
    autojump_clock: trio.testing.MockClock, listener: socket.socket
) -> None:
    errors: list[str] = []
    p = RelayPool(errors.append)
    client_peer, client = _tcp(listener)

    def broken(_: RelayResult) -> None:
        raise RuntimeError("a bug in the caller")

    async with trio.open_nursery() as runner:
        runner.start_soon(p.run)
        await trio.sleep(0)
        p.connect_and_relay(
            client, [v4(("127.0.0.1", closed_port()))],
            connect_timeout=5.0, idle_timeout=LONG, done=broken,
        )  # fmt: skip
        await trio.sleep(1)  # refused (a non-blocking connect reports it later)
        assert len(errors) == 1
        assert "a bug in the caller" in errors[0]
        client.close()
        client_peer.close()
        # the pool still relays
        again = make_pair(listener)
        assert (await smtp_session(p, again)).end == "closed"
        again.close()
        assert_nothing_registered(p)
        runner.cancel_scope.cancel()


def _alive(kind: str) -> int:
    # Objects of that class the collector tracks, garbage not yet collected included.
    return sum(1 for o in gc.get_objects() if type(o).__name__ == kind)


async def test_finished_sessions_are_freed_without_the_cycle_collector(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    # Issue 11 item 5: the daemon runs the young generation every 50,000
    # allocations, so a session kept alive by its own reference cycles (session
    # <-> sides <-> peer) stayed in memory with its sockets long after it ended.
    gc.collect()
    gc.disable()
    try:
        before = _alive("_Session"), _alive("_Side")
        for i in range(200):
            pair = make_pair(listener)
            assert (await smtp_session(pool, pair, b"%d" % i)).end == "closed"
            pair.close()
        await trio.sleep(1)
        sessions, sides = _alive("_Session") - before[0], _alive("_Side") - before[1]
    finally:
        gc.enable()
    assert sides == 0
    # Only the heap's stale entries keep a finished session (and nothing it held).
    assert sessions <= 64 + 1


async def test_an_fd_number_reused_within_a_batch_gets_no_stale_event() -> None:
    # One wake-up's events, in an order the kernel may give: A's backend reset
    # (A ends, and its `done` closes A's client), then B's refused connect (B
    # opens a socket to its next address, which takes the lowest free number:
    # that of A's client), then A's client's own event, fetched before it was
    # closed. That event was taken for "B's connect answered": B counted as
    # connected to an address that never answered, and waited for the idle
    # timeout instead of the connect timeout. Real sockets, real epoll; only the
    # order within the batch is forced.
    with listening() as lst, listening() as good, unanswered() as hole:
        a_out, a_client = _tcp(lst)
        with socket.socket() as gone:  # a port nothing listens on: refused at once
            gone.bind(("127.0.0.1", 0))
            refused = gone.getsockname()
        b_out, b_client = _tcp(lst)
        with a_out, b_out:
            results = await _relay_in_that_order(a_out, a_client, b_client, good, refused, hole)
    b, after = results["B"]
    assert b.connected_at is None
    assert b.connect_error == "no answer within 1s"
    assert after < 3.0  # its connect timeout, not the idle timeout of 5 s


async def _relay_in_that_order(
    a_out: socket.socket,
    a_client: socket.socket,
    b_client: socket.socket,
    good: socket.socket,
    refused: tuple[str, int],
    hole: tuple[str, int],
) -> dict[str, tuple[RelayResult, float]]:
    """Session A to `good`, B to `refused` then `hole`; A's backend reset, B's
    refusal and A's client's bytes handled in that order in one batch."""
    errors: list[str] = []
    p = RelayPool(errors.append)
    fds: dict[str, int] = {}
    real_ready = p._poller.ready

    def in_that_order(limit: int) -> list[tuple[int, int]]:
        order = {fds.get("A backend"): 0, fds.get("B backend"): 1, fds.get("A client"): 2}
        return sorted(real_ready(limit), key=lambda event: order.get(event[0], 3))

    p._poller.ready = in_that_order  # type: ignore[method-assign]
    results: dict[str, tuple[RelayResult, float]] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        await trio.sleep(0.05)
        t0 = trio.current_time()

        def ended(name: str, sock: socket.socket) -> Callable[[RelayResult], None]:
            def done(result: RelayResult) -> None:
                results[name] = (result, trio.current_time() - t0)
                sock.close()

            return done

        p.connect_and_relay(
            a_client,
            [(socket.AF_INET, good.getsockname())],
            connect_timeout=1.0,
            idle_timeout=5.0,
            done=ended("A", a_client),
        )
        fds["A client"] = a_client.fileno()
        (fds["A backend"],) = (fd for fd, s in p._sides.items() if s.name == "backend")
        a_mta, _ = good.accept()
        p.connect_and_relay(
            b_client,
            [(socket.AF_INET, refused), (socket.AF_INET, hole)],
            connect_timeout=1.0,
            idle_timeout=5.0,
            done=ended("B", b_client),
        )
        (fds["B backend"],) = (
            fd for fd, s in p._sides.items() if s.name == "backend" and fd != fds["A backend"]
        )
        # All three ready before the pool's task runs again (no checkpoint here).
        a_mta.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        a_mta.close()
        a_out.sendall(b"hello")
        time.sleep(0.1)
        with trio.fail_after(8):
            while len(results) < 2:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert errors == []
    return results

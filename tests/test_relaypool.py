"""The relay pool over real loopback TCP pairs, with trio's autojump clock.

Each session is two TCP connections: a client peer talking to the socket the
pool reads as "client", and a backend peer behind the socket it reads as
"backend". The peers are trio sockets driven by the test; the pool's ends are
plain non-blocking sockets, as the daemon hands them over.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from repeld.relay import CHUNK, RelayResult
from repeld.relaypool import RelayPool, RelayPoolClosed

LONG = 1e6  # an idle timeout no test reaches unless it means to
HUNG = 3600.0


@dataclass
class Pair:
    """One relayed session's four sockets (the pool's two are plain sockets)."""

    client_peer: trio.socket.SocketType
    client: socket.socket
    backend: socket.socket
    backend_peer: trio.socket.SocketType
    backend_peer_raw: socket.socket  # the same socket, for writes that must not wait

    def close(self) -> None:
        for s in (self.client_peer, self.backend_peer):
            s.close()
        for p in (self.client, self.backend):
            p.close()


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
    backend, backend_peer = _tcp(listener)
    return Pair(
        trio.socket.from_stdlib_socket(client_peer),
        client,
        backend,
        trio.socket.from_stdlib_socket(backend_peer),
        backend_peer,
    )


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
    p = RelayPool()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(p.run)
        nursery.start_soon(_watchdog)
        yield p
        assert_nothing_registered(p)
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
    result = RelayResult()
    async with trio.open_nursery() as nursery:

        async def relaying() -> None:
            await p.relay(pair.client, pair.backend, LONG, result)

        nursery.start_soon(relaying)
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
    return result


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
    results: list[RelayResult] = []

    async def relaying() -> None:
        results.append(await pool.relay(pair.client, pair.backend, LONG))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(relaying)
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
    (result,) = results
    assert (result.end, result.from_client, result.to_client) == ("closed", 6, 19)
    pair.close()


async def test_backend_half_close_client_still_sends(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    pair = make_pair(listener)
    result = RelayResult()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.relay, pair.client, pair.backend, LONG, result)
        await pair.backend_peer.send(b"421 going away\r\n")
        pair.backend_peer.shutdown(socket.SHUT_WR)
        assert await recv_to_eof(pair.client_peer) == b"421 going away\r\n"
        await trio.sleep(3)
        await pair.client_peer.send(b"QUIT\r\n")
        assert await recv_exactly(pair.backend_peer, 6) == b"QUIT\r\n"
        pair.client_peer.close()
        assert await pair.backend_peer.recv(10) == b""
    assert (result.end, result.from_client, result.to_client) == ("closed", 6, 16)
    pair.close()


@pytest.mark.parametrize("side", ["client", "backend"])
async def test_a_reset_ends_the_session_and_names_the_side(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket, side: str
) -> None:
    pair = make_pair(listener)
    result = RelayResult()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.relay, pair.client, pair.backend, LONG, result)
        await pair.backend_peer.send(b"220 hi\r\n")
        assert await recv_exactly(pair.client_peer, 8) == b"220 hi\r\n"
        await pair.client_peer.send(b"EHLO x\r\n")
        assert await recv_exactly(pair.backend_peer, 8) == b"EHLO x\r\n"
        started = trio.current_time()
        abort(pair.client_peer if side == "client" else pair.backend_peer)
    assert trio.current_time() - started < 0.01
    assert (result.end, result.from_client, result.to_client) == (f"{side}-reset", 8, 8)
    pair.close()


async def test_reset_while_the_other_direction_is_half_closed(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    pair = make_pair(listener)
    result = RelayResult()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.relay, pair.client, pair.backend, LONG, result)
        pair.client_peer.shutdown(socket.SHUT_WR)  # the client is done sending...
        assert await pair.backend_peer.recv(10) == b""
        await trio.sleep(1)
        abort(pair.backend_peer)  # ...and the backend resets
    assert result.end == "backend-reset"
    pair.close()


async def test_idle_timeout_comes_on_time(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    pair = make_pair(listener)
    result = RelayResult()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.relay, pair.client, pair.backend, 30.0, result)
        await trio.sleep(5)
        await pair.client_peer.send(b"NOOP\r\n")  # activity pushes the timeout on
        assert await recv_exactly(pair.backend_peer, 6) == b"NOOP\r\n"
        await trio.sleep(20)
        await pair.backend_peer.send(b"250 ok\r\n")
        assert await recv_exactly(pair.client_peer, 8) == b"250 ok\r\n"
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
    result = await pool.relay(pair.client, pair.backend, 7.0)
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
        result = await pool.relay(pairs[i].client, pairs[i].backend, timeout)
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
    result = RelayResult()
    written = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.relay, pair.client, pair.backend, LONG, result)
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
    assert bytes(got) == payload[:written]
    assert (result.end, result.to_client) == ("closed", written)
    pair.close()


async def test_large_transfers_both_ways_arrive_intact(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    up = os.urandom(3 * 1024 * 1024 + 17)
    down = os.urandom(2 * 1024 * 1024 + 5)
    pair = make_pair(listener)
    result = RelayResult()
    received: dict[str, bytes] = {}

    async def send_then_shut(sock: trio.socket.SocketType, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[await sock.send(view[:200_000]) :]
        sock.shutdown(socket.SHUT_WR)

    async def drain(name: str, sock: trio.socket.SocketType) -> None:
        received[name] = await recv_to_eof(sock)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.relay, pair.client, pair.backend, LONG, result)
        nursery.start_soon(send_then_shut, pair.client_peer, up)
        nursery.start_soon(send_then_shut, pair.backend_peer, down)
        nursery.start_soon(drain, "backend", pair.backend_peer)
        nursery.start_soon(drain, "client", pair.client_peer)
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
async def test_cancelling_the_waiter_takes_the_session_out(
    autojump_clock: trio.testing.MockClock,
    pool: RelayPool,
    listener: socket.socket,
    blocked: bool,
) -> None:
    pair = make_pair(listener, client_rcvbuf=16384, client_sndbuf=16384)
    result = RelayResult()
    with trio.move_on_after(10) as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.relay, pair.client, pair.backend, LONG, result)
            await pair.client_peer.send(b"EHLO x\r\n")
            assert await recv_exactly(pair.backend_peer, 8) == b"EHLO x\r\n"
            if blocked:  # leave the pool with bytes it cannot deliver
                try:
                    while True:
                        pair.backend_peer_raw.send(b"x" * CHUNK)
                except BlockingIOError:
                    pass
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert trio.current_time() == pytest.approx(10, abs=0.01)
    assert result.from_client == 8
    assert_nothing_registered(pool)
    if blocked:
        assert result.to_client > 0
    # The caller closes its sockets; the fds come back for the next sessions,
    # which the pool relays as if nothing happened.
    old = {pair.client.fileno(), pair.backend.fileno()}
    pair.close()
    pairs = [make_pair(listener) for _ in range(2)]
    assert old & {s.fileno() for p in pairs for s in (p.client, p.backend)}
    for i, again in enumerate(pairs):
        assert (await smtp_session(pool, again, b"%d" % i)).end == "closed"
        again.close()


async def test_a_stopped_pool_ends_its_sessions_with_an_error(
    autojump_clock: trio.testing.MockClock, listener: socket.socket
) -> None:
    p = RelayPool()
    pair = make_pair(listener)
    errors: list[BaseException] = []

    async def relaying() -> None:
        try:
            await p.relay(pair.client, pair.backend, LONG)
        except RelayPoolClosed as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery, trio.open_nursery() as runner:
        runner.start_soon(p.run)
        nursery.start_soon(relaying)
        await trio.sleep(1)
        assert len(p) == 1
        runner.cancel_scope.cancel()
    assert len(errors) == 1
    assert len(p) == 0
    with pytest.raises(RelayPoolClosed):
        await p.relay(pair.client, pair.backend, LONG)
    pair.close()

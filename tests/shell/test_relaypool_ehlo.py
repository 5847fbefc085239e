"""The relay pool's PIPECONNECT filter over real loopback TCP pairs (autojump clock).

The MTA's first EHLO reply reaches the client without PIPECONNECT, whatever
the MTA's writes look like; everything else, and everything after it, passes
byte for byte; a slow client and an end of file lose nothing.
"""

from __future__ import annotations

import os
import socket

import trio
import trio.testing

from repeld.core.ehlofilter import LIMIT
from repeld.shell.relay import CHUNK
from repeld.shell.relaypool import RelayPool

from .test_relaypool import (
    LONG,
    Ended,
    _tcp,
    assert_nothing_registered,
    autojump_clock,
    listener,
    make_pair,
    mta_listener,
    pool,
    recv_exactly,
    recv_to_eof,
    relay,
    v4,
)

__all__ = ["autojump_clock", "listener", "pool"]  # the fixtures, shared with test_relaypool

GREETING = b"220-mx.test ESMTP Exim 4.97\r\n220 no UCE\r\n"
EHLO_REPLY = (
    b"250-mx.test Hello client [127.0.0.1]\r\n"
    b"250-SIZE 52428800\r\n"
    b"250-PIPELINING\r\n"
    b"250-PIPECONNECT\r\n"
    b"250-CHUNKING\r\n"
    b"250 X_PIPE_CONNECT\r\n"
)
FILTERED = (
    b"250-mx.test Hello client [127.0.0.1]\r\n"
    b"250-SIZE 52428800\r\n"
    b"250-PIPELINING\r\n"
    b"250 CHUNKING\r\n"
)


async def test_the_first_ehlo_reply_loses_pipeconnect_and_the_rest_passes(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    pair = make_pair(listener)
    relayed = relay(pool, pair, LONG, strip_pipe_connect=True)
    result = relayed.result
    # The MTA writes in awkward pieces: the greeting split mid-line, the
    # reply cut in the middle of the capability, and a pipelined reply
    # right behind it in the same write.
    writes = [GREETING[:10], GREETING[10:], EHLO_REPLY[:70], EHLO_REPLY[70:] + b"250 OK\r\n"]
    for piece in writes:
        await pair.backend_peer.send(piece)
        await trio.sleep(0.01)
    want = GREETING + FILTERED + b"250 OK\r\n"
    assert await recv_exactly(pair.client_peer, len(want)) == want
    # Later replies are not touched, even one that looks like the capability.
    later = b"250-mx.test\r\n250 PIPECONNECT\r\n"
    await pair.backend_peer.send(later)
    assert await recv_exactly(pair.client_peer, len(later)) == later
    (side,) = (s for s in pool._sides.values() if s.name == "backend")
    assert side.filter is None  # done: the MTA's bytes go straight through
    await pair.client_peer.send(b"QUIT\r\n")
    assert await recv_exactly(pair.backend_peer, 6) == b"QUIT\r\n"
    pair.backend_peer.shutdown(socket.SHUT_WR)
    assert await pair.client_peer.recv(10) == b""
    pair.client_peer.shutdown(socket.SHUT_WR)
    await relayed.wait()
    assert result.end == "closed"
    assert result.to_client == len(want) + len(later)  # what the client was sent
    assert result.from_client == 6
    pair.close()


async def test_without_the_switch_the_reply_passes_unchanged(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    pair = make_pair(listener)
    relayed = relay(pool, pair, LONG)
    await pair.backend_peer.send(GREETING + EHLO_REPLY)
    assert await recv_exactly(pair.client_peer, len(GREETING + EHLO_REPLY)) == (
        GREETING + EHLO_REPLY
    )
    pair.backend_peer.shutdown(socket.SHUT_WR)
    assert await pair.client_peer.recv(10) == b""
    pair.client_peer.shutdown(socket.SHUT_WR)
    await relayed.wait()
    pair.close()


async def test_an_end_of_file_mid_reply_delivers_what_was_held_first(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    pair = make_pair(listener)
    relayed = relay(pool, pair, LONG, strip_pipe_connect=True)
    result = relayed.result
    partial = GREETING + b"250-mx.test\r\n250-PIPECONNECT\r\n250-SI"
    await pair.backend_peer.send(partial)
    assert await recv_exactly(pair.client_peer, len(GREETING)) == GREETING
    await trio.sleep(1)
    pair.backend_peer.shutdown(socket.SHUT_WR)
    assert await recv_to_eof(pair.client_peer) == partial[len(GREETING) :]
    pair.client_peer.shutdown(socket.SHUT_WR)
    await relayed.wait()
    assert (result.end, result.to_client) == ("closed", len(partial))
    pair.close()


async def test_a_slow_client_gets_every_byte_of_an_oversize_reply(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    # Small kernel buffers on the client's way: the filter's output goes out in part.
    pair = make_pair(listener, client_rcvbuf=4096, client_sndbuf=4096)
    junk = b"220 hi\r\n" + os.urandom(4 * CHUNK).replace(b"\n", b"x")
    assert len(junk) > LIMIT
    relayed = relay(pool, pair, LONG, strip_pipe_connect=True)
    result = relayed.result
    raw = pair.backend_peer_raw
    written = stalled = 0
    while stalled < 10 and written < len(junk):  # the client reads nothing yet
        try:
            written += raw.send(junk[written:])
            stalled = 0
        except BlockingIOError:
            stalled += 1
            await trio.sleep(0.5)
    await trio.sleep(1)  # the pool reads what it can and sends what the client takes
    (side,) = (s for s in pool._sides.values() if s.name == "client")
    assert side.pending is not None  # the pool holds what the client did not take
    got = bytearray()
    while len(got) < len(junk):
        got += await pair.client_peer.recv(CHUNK)
        if written < len(junk):
            try:
                written += raw.send(junk[written:])
            except BlockingIOError:
                pass
    pair.backend_peer.shutdown(socket.SHUT_WR)
    got += await recv_to_eof(pair.client_peer)
    pair.client_peer.shutdown(socket.SHUT_WR)
    await relayed.wait()
    assert bytes(got) == junk
    assert (result.end, result.to_client) == ("closed", len(junk))
    pair.close()


async def test_connect_and_relay_filters_after_the_header(
    autojump_clock: trio.testing.MockClock, pool: RelayPool, listener: socket.socket
) -> None:
    client_peer, client = _tcp(listener)
    peer = trio.socket.from_stdlib_socket(client_peer)
    with await mta_listener() as mta:
        ended = Ended()
        pool.connect_and_relay(
            client, [v4(mta.getsockname())], header=b"PROXY UNKNOWN\r\n", connect_timeout=5.0,
            idle_timeout=LONG, done=ended, strip_pipe_connect=True,
        )  # fmt: skip
        backend_peer, _ = await mta.accept()
        with backend_peer, peer:
            assert await recv_exactly(backend_peer, 15) == b"PROXY UNKNOWN\r\n"
            await backend_peer.send(GREETING + EHLO_REPLY)
            want = GREETING + FILTERED
            assert await recv_exactly(peer, len(want)) == want
            backend_peer.shutdown(socket.SHUT_WR)
            assert await peer.recv(10) == b""
            peer.shutdown(socket.SHUT_WR)
            assert await backend_peer.recv(10) == b""
            result = await ended.wait()
    assert (result.end, result.to_client) == ("closed", len(want))
    client.close()
    assert_nothing_registered(pool)

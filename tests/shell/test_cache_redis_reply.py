"""The Redis cache against a server that is not quite Redis: a well-formed reply to MGET
with the wrong number of values (a proxy or a look-alike in front of the real one).

No redis-server answers so, so the peer is a few lines of RESP on a loopback socket;
the cache must turn the reply into "unknown" and a cache-error, never an exception
that would end the server (it did: an IndexError out of `lookup_many`).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import pytest
import trio

from repeld.cache.base import CacheVerdict
from repeld.cache.redis import RedisCache


def _commands(buf: bytes) -> tuple[list[list[bytes]], bytes]:
    """The complete RESP arrays at the start of `buf`, and what is left."""
    found: list[list[bytes]] = []
    while buf.startswith(b"*") and b"\r\n" in buf:
        end = buf.index(b"\r\n")
        count, pos, args = int(buf[1:end]), end + 2, []
        try:
            for _ in range(count):
                end = buf.index(b"\r\n", pos)
                size = int(buf[pos + 1 : end])
                if len(buf) < end + 4 + size:
                    return found, buf
                args.append(buf[end + 2 : end + 2 + size])
                pos = end + 4 + size
        except ValueError:  # not all there yet
            return found, buf
        found.append(args)
        buf = buf[pos:]
    return found, buf


def _look_alike(mget_reply: bytes) -> Callable[[trio.SocketStream], Awaitable[None]]:
    """Redis to every command but MGET, which it answers with `mget_reply`."""

    async def handler(stream: trio.SocketStream) -> None:
        buf = b""
        async for data in stream:
            commands, buf = _commands(buf + data)
            for args in commands:
                name = args[0].upper()
                if name == b"HELLO":
                    await stream.send_all(b"%1\r\n$5\r\nproto\r\n:3\r\n")
                elif name == b"MGET":
                    await stream.send_all(mget_reply)
                elif name == b"PING":
                    await stream.send_all(b"+PONG\r\n")
                else:
                    await stream.send_all(b"+OK\r\n")

    return handler


@pytest.mark.parametrize("reply", [b"*1\r\n$1\r\n1\r\n", b"*0\r\n", b"*3\r\n_\r\n_\r\n_\r\n"])
async def test_an_mget_answered_with_another_count_is_unknown_and_an_error(reply: bytes) -> None:
    errors: list[str] = []
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, _look_alike(reply), 0, host="127.0.0.1")
        (listener,) = await nursery.start(serve)
        port = listener.socket.getsockname()[1]
        cache = RedisCache(
            "127.0.0.1", port, on_error=errors.append, lookup_timeout=2.0, io_timeout=2.0
        )
        await nursery.start(cache.run)
        assert await cache.lookup_many(["192.0.2.1"]) == [CacheVerdict.UNKNOWN]
        assert len(errors) == 1
        assert "MGET of 2 names answered" in errors[0], errors
        nursery.cancel_scope.cancel()


async def test_a_look_alike_whose_mget_is_short_stays_one_outage() -> None:
    # The probe's MGET must be judged as a lookup's: accepting any answer ended
    # the outage at every probe, and the next lookup began another (20 in 3 s).
    errors: list[str] = []
    recoveries: list[str] = []
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, _look_alike(b"*1\r\n_\r\n"), 0, host="127.0.0.1")
        (listener,) = await nursery.start(serve)
        port = listener.socket.getsockname()[1]
        cache = RedisCache(
            "127.0.0.1",
            port,
            on_error=errors.append,
            on_recover=recoveries.append,
            lookup_timeout=2.0,
            io_timeout=2.0,
            retry_min=0.05,
            retry_max=0.1,
        )
        await nursery.start(cache.run)
        for _ in range(10):  # probes every 0.1 s meanwhile
            assert await cache.lookup("192.0.2.1") is CacheVerdict.UNKNOWN
            await trio.sleep(0.15)
        assert len(errors) == 1 and "MGET of 2 names answered" in errors[0], errors
        assert recoveries == [] and cache.statistics()["outages"] == 1
        nursery.cancel_scope.cancel()

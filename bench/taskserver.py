#!/usr/bin/env python3
"""taskserver: the task-per-connection alternative to repeld's pen and relay pool.

    python3 bench/taskserver.py --listen 127.0.0.1:PORT --backend 127.0.0.1:PORT
                                --delay SECONDS [--trusted CIDR,...]

Not a product: the smallest honest trio server that does what repeld does on
its hot paths, written the way trio suggests, so that bench-hold and
bench-relay (`--vs trio-tasks`) can measure it in the same run as repeld.  It
is the A/B behind the choice in docs/ARCHITECTURE.md: repeld holds every
waiting client in one private epoll set and relays from a pool, instead of
this one trio task per connection.

- Hold: each accepted client gets its own task, which waits for the socket to
  become readable (`wait_readable`) under a `move_on_after(delay)`.  Readable
  before the delay means the client talked first, or hung up: it is reset
  (SO_LINGER 0) and forgotten.  A client from --trusted is relayed at once.
- Relay: the task connects to the backend and runs one task per direction,
  each moving bytes with `trio.SocketStream.receive_some` / `send_all` and
  passing EOF on (`send_eof`), until both directions are done.

No events, no cache, no PROXY header, no limits beyond the fd limit: what it
leaves out only makes it cheaper, so the comparison favours it.  Loopback only.
Stop it with SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import resource
import socket
import struct
import sys
from functools import partial

import trio

#: What one direction reads at a time (repeld's relay buffers are 64 KiB too).
CHUNK = 65536
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _addr(text: str) -> tuple[str, int]:
    """HOST:PORT on loopback, or exit 2."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not ipaddress.ip_address(host).is_loopback:
        sys.exit(f"taskserver: {host} is not a loopback address")
    return host, int(port)


def _reset(stream: trio.SocketStream) -> None:
    """Close with RST (SO_LINGER 0), as repeld does to an early talker."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    """Copy src to dst until src's EOF, then pass the EOF on."""
    try:
        while data := await src.receive_some(CHUNK):
            await dst.send_all(data)
        await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        # One side went away: end both directions.
        await src.aclose()
        await dst.aclose()


async def _relay(client: trio.SocketStream, backend: tuple[str, int]) -> None:
    """Connect to the backend and relay, one task per direction."""
    try:
        upstream = await trio.open_tcp_stream(*backend)
    except OSError:
        return
    async with upstream, trio.open_nursery() as nursery:
        nursery.start_soon(_pump, client, upstream)
        nursery.start_soon(_pump, upstream, client)


async def handle(
    delay: float,
    backend: tuple[str, int],
    trusted: list[Network],
    client: trio.SocketStream,
) -> None:
    """One connection's whole life, in its own task; no exception escapes it."""
    try:
        async with client:
            peer = ipaddress.ip_address(client.socket.getpeername()[0])
            if not any(peer in net for net in trusted):
                with trio.move_on_after(delay) as waited:
                    await trio.lowlevel.wait_readable(client.socket)
                if not waited.cancelled_caught:
                    # Talked before the greeting (or hung up): reset, no relay.
                    _reset(client)
                    return
            await _relay(client, backend)
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def serve(
    listen: tuple[str, int], backend: tuple[str, int], delay: float, trusted: list[Network]
) -> None:
    listeners = await trio.open_tcp_listeners(listen[1], host=listen[0], backlog=4096)
    await trio.serve_listeners(partial(handle, delay, backend, trusted), listeners)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--backend", required=True, metavar="HOST:PORT")
    ap.add_argument("--delay", type=float, required=True, metavar="SECONDS")
    ap.add_argument("--trusted", default="", metavar="CIDR,...", help="relayed without delay")
    a = ap.parse_args(argv)
    trusted = [ipaddress.ip_network(x.strip()) for x in a.trusted.split(",") if x.strip()]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    trio.run(serve, _addr(a.listen), _addr(a.backend), a.delay, trusted)
    return 0


if __name__ == "__main__":
    sys.exit(main())

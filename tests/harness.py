"""In-process test harness: repeld, a trio SMTP backend and a UDP syslog receiver,
all on real loopback sockets inside one trio run (so the autojump clock is exact).
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from repeld.cache.base import PassCache
from repeld.config.settings import Backend, Listen, Settings
from repeld.config.values import SyslogTarget
from repeld.core.proxyproto import V2_SIGNATURE
from repeld.shell.eventlog import EventLog
from repeld.shell.server import Server, open_server, run_server

from .syslog_receiver import Received, parse

GREETING = b"220 backend.test ESMTP test-backend\r\n"


@dataclass
class ProxyInfo:
    version: int
    src: str
    src_port: int
    dst: str
    dst_port: int


async def _read_proxy(stream: trio.SocketStream, buf: bytearray) -> ProxyInfo | None:
    # Reads a PROXY v1 or v2 header off the front of the stream.
    while len(buf) < 16 and b"\r\n" not in buf:  # "PROXY UNKNOWN\r\n" is 15 bytes
        chunk = await stream.receive_some()
        if not chunk:
            return None
        buf += chunk
    if buf.startswith(V2_SIGNATURE):
        length = struct.unpack("!H", buf[14:16])[0]
        while len(buf) < 16 + length:
            buf += await stream.receive_some()
        fam = buf[13]
        body = bytes(buf[16 : 16 + length])
        del buf[: 16 + length]
        if fam == 0x00:  # LOCAL: a connection that carries no client
            return ProxyInfo(2, "LOCAL", 0, "", 0)
        if fam == 0x11:
            src, dst = (
                socket.inet_ntop(socket.AF_INET, body[:4]),
                socket.inet_ntop(socket.AF_INET, body[4:8]),
            )
            sp, dp = struct.unpack("!HH", body[8:12])
        else:
            src, dst = (
                socket.inet_ntop(socket.AF_INET6, body[:16]),
                socket.inet_ntop(socket.AF_INET6, body[16:32]),
            )
            sp, dp = struct.unpack("!HH", body[32:36])
        return ProxyInfo(2, src, sp, dst, dp)
    if buf.startswith(b"PROXY "):
        while b"\r\n" not in buf:
            buf += await stream.receive_some()
        line, _, rest = bytes(buf).partition(b"\r\n")
        buf[:] = rest
        if line == b"PROXY UNKNOWN":
            return ProxyInfo(1, "UNKNOWN", 0, "", 0)
        _, _, src, dst, sp, dp = line.decode().split(" ")
        return ProxyInfo(1, src, int(sp), dst, int(dp))
    return None


@dataclass
class TrioBackend:
    """A tiny SMTP-speaking MTA stand-in: greets, answers 250, 221 to QUIT."""

    proxy: bool = False
    port: int = 0
    #: The reply to EHLO (e.g. one advertising PIPECONNECT); else "250 ok".
    ehlo: bytes | None = None
    sessions: int = 0
    headers: list[ProxyInfo | None] = field(default_factory=list)
    received: list[bytes] = field(default_factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.sessions += 1
        buf = bytearray()
        try:
            if self.proxy:
                self.headers.append(await _read_proxy(stream, buf))
            await stream.send_all(GREETING)
            data = bytearray(buf)
            while True:
                while b"\n" in data:
                    line, _, rest = bytes(data).partition(b"\n")
                    data = bytearray(rest)
                    self.received.append(line + b"\n")
                    if line.strip().upper() == b"QUIT":
                        await stream.send_all(b"221 2.0.0 bye\r\n")
                        return
                    if self.ehlo is not None and line.upper().startswith(b"EHLO"):
                        await stream.send_all(self.ehlo)
                        continue
                    await stream.send_all(b"250 ok\r\n")
                chunk = await stream.receive_some()
                if not chunk:
                    return
                data += chunk
        except trio.BrokenResourceError:
            pass
        finally:
            await stream.aclose()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self.handle, listeners)


class Receiver:
    """A UDP syslog receiver in the same trio run."""

    def __init__(self) -> None:
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.messages: list[Received] = []
        self.raw: list[bytes] = []
        self._arrived = trio.Event()

    async def bind(self) -> int:
        await self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    async def run(self) -> None:
        while True:
            data = await self.sock.recv(65536)
            self.raw.append(data)
            self.messages.append(parse(data))
            self._arrived.set()
            self._arrived = trio.Event()

    async def wait_for(self, event: str, count: int = 1) -> list[Received]:
        with trio.fail_after(120):
            while True:
                found = [m for m in self.messages if m.event == event]
                if len(found) >= count:
                    return found
                await self._arrived.wait()

    def named(self, event: str) -> list[Received]:
        return [m for m in self.messages if m.event == event]


@dataclass
class Harness:
    server: Server
    backend: TrioBackend
    receiver: Receiver
    log: EventLog

    def address(self, index: int = 0) -> tuple[str, int]:
        return self.server.addresses[index]


async def opened(receiver: Receiver, **overrides: Any) -> tuple[Server, EventLog]:
    """repeld bound on a free loopback port, not serving yet, its events to
    `receiver` (bound first), its backend the discard port: the server and
    its event log (whose writer the test runs)."""
    udp_port = await receiver.bind()
    settings = Settings(
        backend=Backend("127.0.0.1", 9),
        listen=(Listen("127.0.0.1", 0),),
        syslog=SyslogTarget("udp", host="127.0.0.1", port=udp_port),
        **overrides,
    )
    log = EventLog.from_settings(settings)
    return await open_server(settings, log), log


@asynccontextmanager
async def running(
    backend_proxy: bool = False,
    listen: tuple[Listen, ...] = (Listen("127.0.0.1", 0),),
    backend_port: int | None = None,
    backend_ehlo: bytes | None = None,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    """repeld serving `listen` in front of a TrioBackend, events to a Receiver."""
    receiver = Receiver()
    udp_port = await receiver.bind()
    backend = TrioBackend(proxy=backend_proxy, ehlo=backend_ehlo)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver.run)
        port = await nursery.start(backend.serve)
        settings = Settings(
            backend=Backend("127.0.0.1", backend_port if backend_port is not None else port),
            listen=listen,
            syslog=SyslogTarget("udp", host="127.0.0.1", port=udp_port),
        )
        # No test writes to the system's pass cache: off unless a test asks for one.
        overrides.setdefault("no_cache", "cache" not in overrides)
        settings = dataclasses.replace(settings, **overrides)
        log = EventLog.from_settings(settings)
        server = await nursery.start(run_server, settings, log)
        try:
            yield Harness(server, backend, receiver, log)
        finally:
            nursery.cancel_scope.cancel()


async def connect(address: tuple[str, int], source: str | None = None) -> trio.socket.SocketType:
    """A raw trio client socket connected to `address` (optionally from `source`)."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    if source is not None:
        await sock.bind((source, 0))
    await sock.connect(address)
    return sock


async def read_until_closed(sock: trio.socket.SocketType, limit: float = 1000) -> tuple[bytes, str]:
    """Everything the server sends until it closes: (data, "eof" | "reset")."""
    data = b""
    with trio.fail_after(limit):
        while True:
            try:
                chunk = await sock.recv(65536)
            except ConnectionResetError:
                return data, "reset"
            if not chunk:
                return data, "eof"
            data += chunk


async def read_line(sock: trio.socket.SocketType) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


@asynccontextmanager
async def running_caches(*caches: PassCache) -> AsyncIterator[None]:
    """The caches' background tasks for the block; each closed after it."""
    try:
        async with trio.open_nursery() as nursery:
            for cache in caches:
                await nursery.start(cache.run)
            yield
            nursery.cancel_scope.cancel()
    finally:
        for cache in caches:
            await cache.aclose()


@contextmanager
def unanswered() -> Iterator[tuple[str, int]]:
    """A loopback address whose connects are never answered: a listener whose
    accept queue is full drops every further SYN."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        fillers = [socket.socket() for _ in range(4)]
        try:
            for f in fillers:
                f.setblocking(False)
                f.connect_ex(silent.getsockname())
            yield silent.getsockname()
        finally:
            for f in fillers:
                f.close()

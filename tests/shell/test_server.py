"""The daemon in-process over real loopback sockets, with trio's autojump clock:
a 25 s delay costs nothing, and every verdict is checked through the syslog
receiver.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import resource
import socket
import struct
from typing import Any

import pytest
import trio
import trio.testing

from repeld.cache.memory import MemoryCache
from repeld.cache.spec import parse_cache_url
from repeld.config.errors import SettingError
from repeld.config.settings import Backend, Listen, Settings
from repeld.core.dnsbl import DnsList
from repeld.core.policy import Refuse
from repeld.shell.replies import BACKEND_UNAVAILABLE
from repeld.shell.server import pinned

from ..harness import (
    GREETING,
    Receiver,
    TrioBackend,
    connect,
    opened,
    read_line,
    read_until_closed,
    running,
    unanswered,
)

DELAY = 25.0


async def test_patient_client_is_greeted_by_the_backend_after_the_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY) as h:
        client = await connect(h.address())
        client_port = client.getsockname()[1]
        start = trio.current_time()
        greeting = await read_line(client)
        waited = trio.current_time() - start
        assert greeting == GREETING
        assert DELAY <= waited < DELAY + 0.1
        await client.send(b"EHLO me\r\n")
        assert await read_line(client) == b"250 ok\r\n"
        await client.send(b"QUIT\r\n")
        assert await read_line(client) == b"221 2.0.0 bye\r\n"
        assert (await read_until_closed(client))[1] == "eof"
        client.close()
        (passed,) = await h.receiver.wait_for("pass")
        assert passed.fields["reason"] == "delay"
        assert float(passed.fields["elapsed"]) == pytest.approx(DELAY, abs=0.01)
        assert passed.fields["client"] == "127.0.0.1"
        assert int(passed.fields["client_port"]) == client_port
        assert passed.fields["server_port"] == str(h.address()[1])
        assert passed.severity == 6
        assert passed.facility == 2
        assert float(passed.fields["rtt_ms"]) >= 0.0  # from TCP_INFO, tiny on loopback
        (end,) = await h.receiver.wait_for("relay-end")
        assert end.fields["bytes_from_client"] == str(len(b"EHLO me\r\nQUIT\r\n"))
        assert end.fields["bytes_to_client"] == str(len(GREETING) + 8 + 15)
        assert end.fields["end"] == "closed"


@pytest.mark.parametrize(
    ("after", "payload"),
    [
        (0.0, b"EHLO bot.example\r\n"),
        (24.5, b"HELO late\r\n"),
        (1.0, b"Q"),
        (0.0, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"),
    ],
    ids=["at-once", "late-in-window", "one-byte", "binary"],
)
async def test_early_talker_is_cut_off_at_once(
    autojump_clock: trio.testing.MockClock, after: float, payload: bytes
) -> None:
    async with running(delay=DELAY) as h:
        client = await connect(h.address())
        await trio.sleep(after)
        await client.send(payload)
        sent_at = trio.current_time()
        data, _how = await read_until_closed(client)
        assert data == b""  # never greeted
        assert trio.current_time() - sent_at < 0.05
        (ev,) = await h.receiver.wait_for("early-talker")
        assert ev.severity == 4
        assert ev.fields["bytes"] == str(len(payload))
        assert ev.fields["action"] == "drop"
        assert float(ev.fields["elapsed"]) == pytest.approx(after, abs=0.01)
        assert ev.fields["first"] == "".join(
            chr(b) if 0x20 <= b < 0x7F else {13: "\\r", 10: "\\n"}.get(b, f"\\x{b:02x}")
            for b in payload
        )
        assert h.backend.sessions == 0
        assert h.log.counts["early-talker"] == 1


async def test_flood_is_cut_off_and_counted(autojump_clock: trio.testing.MockClock) -> None:
    async with running(delay=DELAY) as h:
        client = await connect(h.address())
        flood = b"A" * (1 << 20)

        async def send_flood() -> None:
            try:
                await client.send(flood)
            except OSError:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_flood)
            data, _ = await read_until_closed(client)
        assert data == b""
        (ev,) = await h.receiver.wait_for("early-talker")
        assert int(ev.fields["bytes"]) > 1024  # more than one peek's worth was seen waiting
        assert ev.fields["first"] == "A" * 100


async def test_hostile_bytes_come_out_escaped_in_both_formats(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hostile = b'EHLO "x"] \\ [y@1 z="\x00\x1b[31m\xff\r\n'
    for fmt in ("rfc5424", "json"):
        async with running(delay=DELAY, log_format=fmt) as h:
            client = await connect(h.address())
            await client.send(hostile)
            await read_until_closed(client)
            (ev,) = await h.receiver.wait_for("early-talker")
            assert ev.format == fmt
            assert ev.fields["first"] == 'EHLO "x"] \\\\ [y@1 z="\\x00\\x1b[31m\\xff\\r\\n'
            assert all(0x20 <= b < 0x7F for b in h.receiver.raw[-1])
            assert ev.fields["client"] == "127.0.0.1"  # the SD parsed cleanly past the "]"


async def test_reject_sends_one_554_line(autojump_clock: trio.testing.MockClock) -> None:
    async with running(delay=DELAY, on_early="reject") as h:
        client = await connect(h.address())
        await client.send(b"EHLO x\r\n")
        data, how = await read_until_closed(client)
        assert data.startswith(b"554 5.5.1 ")
        assert data.endswith(b"\r\n") and data.count(b"\r\n") == 1
        assert b"greeting" in data
        assert how == "eof"
        (ev,) = await h.receiver.wait_for("early-talker")
        assert ev.fields["action"] == "reject"


async def test_hangup_by_fin_and_by_rst(autojump_clock: trio.testing.MockClock) -> None:
    async with running(delay=DELAY) as h:
        fin = await connect(h.address())
        rst = await connect(h.address())
        await trio.sleep(3)
        fin.close()
        await trio.sleep(2)
        rst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        rst.close()
        events = await h.receiver.wait_for("hangup", 2)
        by_how = {e.fields["how"]: e for e in events}
        assert float(by_how["close"].fields["elapsed"]) == pytest.approx(3.0, abs=0.01)
        assert float(by_how["reset"].fields["elapsed"]) == pytest.approx(5.0, abs=0.01)
        await trio.sleep(DELAY)
        assert h.backend.sessions == 0
        assert not h.receiver.named("pass")


async def test_trusted_source_skips_the_delay(autojump_clock: trio.testing.MockClock) -> None:
    async with running(delay=DELAY, trusted=("127.0.0.2/32",)) as h:
        client = await connect(h.address(), source="127.0.0.2")
        start = trio.current_time()
        assert await read_line(client) == GREETING
        assert trio.current_time() - start < 0.1
        (ev,) = await h.receiver.wait_for("pass")
        assert ev.fields["reason"] == "trusted"
        assert ev.fields["client"] == "127.0.0.2"
        # a trusted client may even talk first
        other = await connect(h.address(), source="127.0.0.2")
        await other.send(b"EHLO trusted\r\n")
        assert await read_line(other) == GREETING
        assert await read_line(other) == b"250 ok\r\n"


async def test_nodelay_listener_is_never_held(autojump_clock: trio.testing.MockClock) -> None:
    listen = (Listen("127.0.0.1", 0), Listen("127.0.0.1", 0, nodelay=True))
    async with running(delay=DELAY, listen=listen) as h:
        client = await connect(h.address(1))
        start = trio.current_time()
        assert await read_line(client) == GREETING
        assert trio.current_time() - start < 0.1
        (ev,) = await h.receiver.wait_for("pass")
        assert ev.fields["reason"] == "nodelay"
        held = await connect(h.address(0))
        await held.send(b"EHLO\r\n")
        await h.receiver.wait_for("early-talker")


async def test_ipv6_loopback(autojump_clock: trio.testing.MockClock) -> None:
    async with running(
        delay=DELAY, listen=(Listen("::1", 0),), backend_proxy=True, proxy_protocol="v2"
    ) as h:
        client = await connect(h.address())
        assert await read_line(client) == GREETING
        (ev,) = await h.receiver.wait_for("pass")
        assert ev.fields["client"] == "::1"
        assert ev.fields["server"] == "::1"
        (info,) = h.backend.headers
        assert info is not None
        assert (info.src, info.src_port) == ("::1", client.getsockname()[1])
        assert (info.dst, info.dst_port) == ("::1", h.address()[1])


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_proxy_header_carries_the_real_client(
    autojump_clock: trio.testing.MockClock, version: str
) -> None:
    async with running(delay=DELAY, backend_proxy=True, proxy_protocol=version) as h:
        client = await connect(h.address(), source="127.0.0.3")
        assert await read_line(client) == GREETING
        (info,) = h.backend.headers
        assert info is not None
        assert info.version == int(version[1])
        assert (info.src, info.src_port) == ("127.0.0.3", client.getsockname()[1])
        assert (info.dst, info.dst_port) == h.address()


async def test_dead_backend_gets_421(autojump_clock: trio.testing.MockClock) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()  # nothing listens there now
    async with running(delay=DELAY, backend_port=dead_port) as h:
        client = await connect(h.address())
        data, how = await read_until_closed(client)
        assert data == b"421 4.3.2 Service temporarily unavailable, try again later\r\n"
        assert how == "eof"
        (ev,) = await h.receiver.wait_for("backend-error")
        assert ev.fields["backend"] == f"127.0.0.1:{dead_port}"
        assert "refused" in ev.fields["error"].lower()
        assert float(ev.fields["elapsed"]) == pytest.approx(DELAY, abs=0.05)


async def test_a_backend_that_never_answers_gets_421_after_the_connect_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A listener whose accept queue is full drops every further SYN: the
    # connect is never answered, and --connect-timeout ends the wait.
    with unanswered() as (_, port):
        async with running(delay=DELAY, backend_port=port, connect_timeout=9.0) as h:
            client = await connect(h.address())
            data, how = await read_until_closed(client)
            assert data == b"421 4.3.2 Service temporarily unavailable, try again later\r\n"
            assert how == "eof"
            (ev,) = await h.receiver.wait_for("backend-error")
            assert ev.fields["error"] == "no answer within 9s"
            assert float(ev.fields["elapsed"]) == pytest.approx(DELAY + 9.0, abs=0.05)
            assert h.server.relays == 0


async def test_a_backend_that_resets_before_its_greeting_gets_the_client_a_421(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # An MTA stopped with connections in its accept queue (or at its process
    # limit) takes the connection and resets it before a byte: the client, which
    # waited the delay for nothing, is told to come back, not left with a bare FIN.
    # (A backend that closes cleanly instead: its end of file reaches the client
    # as the relay's half-close, before the session ends; an MTA retries either way.)
    mta = trio.socket.socket()
    await mta.bind(("127.0.0.1", 0))
    mta.listen(8)

    async def refuse() -> None:
        while True:
            conn, _ = await mta.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(refuse)
        async with running(delay=DELAY, backend_port=mta.getsockname()[1]) as h:
            client = await connect(h.address())
            data, _ = await read_until_closed(client)
            assert data == b"421 4.3.2 Service temporarily unavailable, try again later\r\n"
            (ended,) = await h.receiver.wait_for("relay-end")
            assert (ended.fields["end"], ended.fields["bytes_to_client"]) == ("backend-reset", "0")
        nursery.cancel_scope.cancel()
    mta.close()


async def test_held_clients_hear_421_when_the_server_is_cancelled_without_a_drain(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Cancelled at once (or a front task failed), the drain is skipped; the held
    # client is still told to come back, not just closed.
    async with running(delay=DELAY) as h:
        client = await connect(h.address())
        await trio.sleep(1)
        assert len(h.server.pen) == 1
    data, how = await read_until_closed(client)
    assert data.startswith(b"421 4.3.2 ") and how == "eof"


async def test_half_close_is_propagated(autojump_clock: trio.testing.MockClock) -> None:
    async with running(delay=DELAY) as h:
        client = await connect(h.address())
        assert await read_line(client) == GREETING
        await client.send(b"NOOP\r\nQUIT\r\n")
        client.shutdown(socket.SHUT_WR)
        data, how = await read_until_closed(client)
        assert data == b"250 ok\r\n221 2.0.0 bye\r\n"
        assert how == "eof"
        (end,) = await h.receiver.wait_for("relay-end")
        assert end.fields["end"] == "closed"


async def test_idle_relay_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with running(delay=DELAY, relay_timeout=60.0) as h:
        client = await connect(h.address())
        assert await read_line(client) == GREETING
        greeted = trio.current_time()
        data, _ = await read_until_closed(client)
        assert data == b""
        assert trio.current_time() - greeted == pytest.approx(60.0, abs=0.1)
        (end,) = await h.receiver.wait_for("relay-end")
        assert end.fields["end"] == "timeout"


async def test_no_report_attacks_counts_but_does_not_write(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, report_attacks=False, trusted=("127.0.0.2",)) as h:
        client = await connect(h.address())
        await client.send(b"EHLO\r\n")
        await read_until_closed(client)
        ok = await connect(h.address(), source="127.0.0.2")
        assert await read_line(ok) == GREETING
        await h.receiver.wait_for("pass")
        assert h.log.counts["early-talker"] == 1
        assert not h.receiver.named("early-talker")


async def test_many_held_connections_each_get_their_own_verdict(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, max_per_client=100) as h:
        patient = [await connect(h.address()) for _ in range(20)]
        talkers = [await connect(h.address()) for _ in range(20)]
        for i, t in enumerate(talkers):
            await trio.sleep(0.5)
            await t.send(b"X" * (i + 1))
        for t in talkers:
            assert (await read_until_closed(t))[0] == b""
        for p in patient:
            assert await read_line(p) == GREETING
        early = await h.receiver.wait_for("early-talker", 20)
        assert sorted(int(e.fields["bytes"]) for e in early) == list(range(1, 21))
        assert len(await h.receiver.wait_for("pass", 20)) == 20
        assert len(h.server.pen) == 0


async def test_max_held_answers_421_busy(autojump_clock: trio.testing.MockClock) -> None:
    async with running(delay=DELAY, max_held=3, trusted=("127.0.0.2",)) as h:
        held = [await connect(h.address(), source=f"127.0.0.{10 + i}") for i in range(3)]
        await trio.sleep(1)
        refused = [await connect(h.address(), source=f"127.0.0.{20 + i}") for i in range(4)]
        for r in refused:
            data, how = await read_until_closed(r)
            assert data == b"421 4.3.2 All server ports are busy\r\n"
            assert how == "eof"
        # a trusted client is never held, so the limit does not apply to it
        ok = await connect(h.address(), source="127.0.0.2")
        assert await read_line(ok) == GREETING
        (ev,) = await h.receiver.wait_for("overload")  # rate-limited: one for the burst
        assert ev.fields["limit"] == "max-held"
        assert ev.fields["refused"] == "1"
        assert ev.severity == 4
        await trio.sleep(2)
        late = await connect(h.address(), source="127.0.0.30")
        assert (await read_until_closed(late))[0].startswith(b"421 4.3.2")
        second = await h.receiver.wait_for("overload", 2)
        assert second[1].fields["refused"] == "4"  # the three suppressed plus this one
        for c in held:
            assert await read_line(c) == GREETING


async def test_max_per_client_answers_421_too_many(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, max_per_client=2) as h:
        first = [await connect(h.address(), source="127.0.0.7") for _ in range(2)]
        extra = await connect(h.address(), source="127.0.0.7")
        data, _ = await read_until_closed(extra)
        assert data == b"421 4.7.0 Too many connections\r\n"
        other = await connect(h.address(), source="127.0.0.8")  # another address is fine
        (ev,) = await h.receiver.wait_for("overload")
        assert ev.fields["limit"] == "max-per-client"
        assert ev.fields["client"] == "127.0.0.7"
        # once one of the two leaves, that address may be held again
        first[0].close()
        await h.receiver.wait_for("hangup")
        again = await connect(h.address(), source="127.0.0.7")
        for c in (first[1], other, again):
            assert await read_line(c) == GREETING


async def test_a_listener_can_have_its_own_backend(autojump_clock: trio.testing.MockClock) -> None:
    other = TrioBackend()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(other.serve)
        listen = (
            Listen("127.0.0.1", 0),
            Listen("127.0.0.1", 0, nodelay=True, backend=Backend("127.0.0.1", port)),
        )
        async with running(delay=DELAY, listen=listen) as h:
            tls = await connect(h.address(1))
            assert await read_line(tls) == GREETING
            plain = await connect(h.address(0))
            assert await read_line(plain) == GREETING
            assert (other.sessions, h.backend.sessions) == (1, 1)
        nursery.cancel_scope.cancel()


async def test_a_reset_after_the_greeting_ends_the_relay_as_client_reset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY) as h:
        client = await connect(h.address())
        assert await read_line(client) == GREETING
        await client.send(b"EHLO me\r\n")
        assert await read_line(client) == b"250 ok\r\n"
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        (end,) = await h.receiver.wait_for("relay-end")
        assert end.fields["end"] == "client-reset"
        assert end.fields["bytes_from_client"] == "9"
        assert not h.receiver.named("error")


async def test_the_drain_ends_as_soon_as_the_last_relay_does(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY) as h:
        client = await connect(h.address())
        assert await read_line(client) == GREETING
        pool = h.server.relay_pool
        assert pool is not None
        h.server.shutdown(grace=1000.0)
        await trio.sleep(5)
        assert h.server.relays == 1 and not pool._closed  # the relay goes on in the drain
        await client.send(b"QUIT\r\n")
        assert await read_line(client) == b"221 2.0.0 bye\r\n"
        assert (await read_until_closed(client))[1] == "eof"
        client.close()
        # No polling: the drain wakes when the relay count reaches 0, so the
        # pool stops without the (autojump) clock moving at all.
        now = trio.current_time()
        for _ in range(10_000):
            if pool._closed:
                break
            await trio.lowlevel.checkpoint()
        assert pool._closed
        assert h.server.relays == 0
        assert trio.current_time() == now
        (end,) = await h.receiver.wait_for("relay-end")
        assert end.fields["end"] == "closed"


async def test_wait_idle_returns_at_once_without_relays_and_when_the_last_one_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY) as h:
        with trio.fail_after(0):
            await h.server.wait_idle()  # nothing relayed: no wait
        clients = [await connect(h.address()) for _ in range(2)]
        for c in clients:
            assert await read_line(c) == GREETING
        assert h.server.relays == 2
        idle_at: list[float] = []

        async def waiter() -> None:
            await h.server.wait_idle()
            idle_at.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            for delay, c in zip((3.0, 7.0), clients, strict=True):
                await trio.sleep(delay)
                c.close()
        assert h.server.relays == 0
        assert idle_at == [pytest.approx(DELAY + 10.0, abs=0.01)]


class _NoSuchName(trio.abc.HostnameResolver):
    """A resolver that knows no name: an unresolvable backend without asking real DNS
    (tests reach only loopback)."""

    async def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):  # type: ignore[no-untyped-def]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def getnameinfo(self, sockaddr, flags):  # type: ignore[no-untyped-def]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")


async def test_an_unresolvable_backend_is_an_error_naming_it() -> None:
    from repeld.shell.handoff import resolve_backend

    trio.socket.set_custom_hostname_resolver(_NoSuchName())
    try:
        with pytest.raises(OSError) as info:
            await resolve_backend("mx.example.invalid", 25)
    finally:
        trio.socket.set_custom_hostname_resolver(None)
    assert str(info.value) == (
        "--backend mx.example.invalid:25: cannot resolve: Name or service not known"
    )


async def test_a_connection_reset_before_it_is_read_is_a_counted_hangup() -> None:
    """A client that resets between accept() and the first call on its socket: the
    server still owes it one verdict. The accepted socket is fed with no connection
    behind it, the way a reset leaves it (ENOTCONN on every call)."""
    async with running(delay=DELAY) as h:
        listener = h.server.listeners[0]
        port = h.address()[1]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        h.server.intake.accepted(sock, ("127.0.0.5", 40000), listener)
        with trio.fail_after(10):
            (event,) = await h.receiver.wait_for("hangup")
        assert event.fields["how"] == "reset"
        assert event.fields["client"] == "127.0.0.5"
        assert event.fields["client_port"] == "40000"
        assert (event.fields["server"], event.fields["server_port"]) == ("127.0.0.1", str(port))
        assert h.server.statistics()["hangup"] == 1
        assert len(h.server.pen) == 0


async def test_a_talker_held_before_a_reload_to_log_is_written_as_what_it_got(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The hold keeps the mode it began in: cut off under drop, it is written as a
    # drop even though --on-early is log by the time it talks.
    import dataclasses

    from repeld.core.policy import TrustedNetworks

    async with running(delay=DELAY, on_early="drop") as h:
        client = await connect(h.address())
        await trio.sleep(1.0)
        server = h.server
        server.apply(
            dataclasses.replace(server.settings, on_early="log"),
            TrustedNetworks(()),
            server.backend,
        )
        await client.send(b"EHLO early\r\n")
        _, how = await read_until_closed(client)
        assert how == "reset"
        (talker,) = await h.receiver.wait_for("early-talker")
        assert talker.fields["action"] == "drop"
        client.close()


class _SlowToOpen(MemoryCache):
    """A memory cache that opens when told (as SQLite's file, opened in a
    thread, or a Redis server's first answer, take their time)."""

    def __init__(self) -> None:
        super().__init__()
        self.opening = trio.Event()
        self.opened = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.opening.set()
        await self.opened.wait()
        await super().run(task_status=task_status)


@pytest.mark.parametrize("when", ["before serve()", "while the cache opens"])
async def test_a_stop_asked_before_the_server_serves_is_not_lost(when: str) -> None:
    # A SIGTERM during start-up (a backend name slow to resolve) is taken at
    # the first wait of serve(), the pass cache's opening, before the front
    # that shutdown() cancels began: it was lost, and the server served on
    # until a second SIGTERM (systemd: until TimeoutStopSec, then SIGKILL).
    receiver = Receiver()
    server, log = await opened(receiver, cache=parse_cache_url("memory"))
    cache = server.cache = _SlowToOpen()
    address = server.addresses[0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver.run)
        nursery.start_soon(log.run)
        with trio.fail_after(10):
            if when == "before serve()":
                server.shutdown()
                await server.serve()
                assert not cache.opening.is_set()  # nothing opened for nothing
            else:
                async with trio.open_nursery() as serving:
                    serving.start_soon(server.serve)
                    await cache.opening.wait()
                    server.shutdown()  # the SIGTERM, taken now
                    cache.opened.set()
        nursery.cancel_scope.cancel()
    with pytest.raises(ConnectionRefusedError):  # and it listens no more
        socket.create_connection(address, timeout=5).close()


async def test_max_held_taken_out_at_a_reload_is_the_default_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Set to 1, then taken out of the file: the limit stayed 1, unsaid.
    import dataclasses

    from repeld.core.policy import TrustedNetworks
    from repeld.service.capacity import default_max_held

    async with running(delay=DELAY, max_held=1) as h:
        server = h.server
        first = await connect(h.address(), source="127.0.0.10")
        await trio.sleep(1)
        second = await connect(h.address(), source="127.0.0.11")
        assert (await read_until_closed(second))[0].startswith(b"421 4.3.2")
        notes = server.apply(
            dataclasses.replace(server.settings, max_held=None), TrustedNetworks(()), server.backend
        )
        assert notes == []
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert server.max_held == server.admission.max_held == default_max_held(nofile)
        third = await connect(h.address(), source="127.0.0.12")
        await trio.sleep(1)
        for held in (first, third):  # both held, and greeted after the delay
            assert await read_line(held) == GREETING


class _FullWatchSet:
    """A poller the kernel will not add `refusals` more sockets to, as when
    fs.epoll.max_user_watches is reached (ENOSPC; ENOMEM under a memory limit).
    That limit is one per user for the whole host, so a test cannot lower it
    without starving every other epoll of the machine: the refusal alone is
    stood in for, every other call goes to the real poller."""

    def __init__(self, poller: Any, refusals: int = 1) -> None:
        self.poller = poller
        self.refusals = refusals

    def update(self, fd: int, old: int, new: int) -> None:
        if not old and new and self.refusals:
            self.refusals -= 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.poller.update(fd, old, new)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.poller, name)


@pytest.mark.parametrize("where", ["pen", "intake"])
async def test_a_socket_the_kernel_will_not_watch_is_turned_away_and_the_rest_serve_on(
    where: str, autojump_clock: trio.testing.MockClock
) -> None:
    # The pen's (and the intake's) registration failing stopped the whole
    # daemon as a "broken listener", and its shutdown then raised KeyError for
    # the half-added client: no held client heard its 421.
    async with running(delay=DELAY, proxy_from=("127.0.0.1/32",)) as h:
        waiting = await connect(h.address(), source="127.0.0.9")  # held before
        await trio.sleep(1)
        part = h.server.pen if where == "pen" else h.server.intake
        part._poller = _FullWatchSet(part._poller)  # type: ignore[assignment]
        if where == "pen":
            turned = await connect(h.address(), source="127.0.0.10")
        else:  # a balancer whose header comes in two parts: it waits for the rest
            turned = await connect(h.address(), source="127.0.0.1")
            await turned.send(b"PROXY TCP4 192.0.2.1 ")
        assert await read_until_closed(turned) == (
            b"421 4.3.2 All server ports are busy\r\n",
            "eof",
        )
        (overload,) = await h.receiver.wait_for("overload")
        assert overload.fields["limit"] == "kernel"
        held = await connect(h.address(), source="127.0.0.11")  # the next is held again
        assert await read_line(waiting) == GREETING
        h.server.shutdown()
        data, _ = await read_until_closed(held)
        assert data.startswith(b"421 ")  # the shutdown's, as to every held client
        assert h.receiver.named("error") == []
        assert h.server.admission.refusals[Refuse.KERNEL] == 1


async def test_a_relay_the_kernel_will_not_watch_is_a_backend_error_and_leaves_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Refused when its relay was set up, a passed client heard its 421, but the
    # half-made session stayed in the pool with its MTA connection until the
    # shutdown, which then counted one relay more than there were (relays=-1).
    async with running(delay=DELAY) as h:
        pool = h.server.handoff.pool
        assert pool is not None
        pool._poller = _FullWatchSet(pool._poller)  # type: ignore[assignment]
        refused = await connect(h.address(), source="127.0.0.9")
        data, _ = await read_until_closed(refused)
        assert data == BACKEND_UNAVAILABLE
        (error,) = await h.receiver.wait_for("backend-error")
        assert "No space left on device" in error.fields["error"]
        assert len(pool) == 0 and pool.registered() == {}
        relayed = await connect(h.address(), source="127.0.0.10")  # the next is relayed
        assert await read_line(relayed) == GREETING
        relayed.close()
        await h.receiver.wait_for("relay-end")
        assert h.server.statistics()["relays"] == 0
        assert h.receiver.named("error") == []


def test_a_kept_dnsbl_delay_refuses_a_reload_only_while_block_lists_run() -> None:
    running = Settings(backend=Backend("127.0.0.1", 25), dnsbl_action="delay", dnsbl_delay=60.0)
    new = dataclasses.replace(
        running, dnsbl=(DnsList("b.example.org"),), delay=70.0, dnsbl_delay=120.0
    )
    kept = pinned(running, new)  # no list runs: nobody is held for less than a clean client
    assert (kept.dnsbl, kept.delay, kept.dnsbl_delay) == ((), 70.0, 60.0)
    with_lists = dataclasses.replace(running, dnsbl=(DnsList("a.example.org"),))
    with pytest.raises(SettingError, match=r"shorter than the --dnsbl-delay \(60\)"):
        pinned(with_lists, new)


async def test_a_next_address_the_kernel_will_not_watch_ends_that_relay_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The backend's first address never answers: the connect to the next one is
    # made from the pool's timer, and a refused registration there escaped the
    # pool's task, ending the server: every relay cut, every held client dropped.
    async with running(delay=DELAY, connect_timeout=5.0) as h:
        with unanswered() as silent:
            target = h.server.handoff.backend
            assert target is not None
            silent_first = ((socket.AF_INET, silent), *target.addresses)
            h.server.handoff.backend = dataclasses.replace(target, addresses=silent_first)
            earlier = await connect(h.address(), source="127.0.0.20")
            assert await read_line(earlier) == GREETING  # relayed, through the second
            pool = h.server.handoff.pool
            assert pool is not None
            pool._poller = _FullWatchSet(pool._poller, refusals=0)  # type: ignore[assignment]
            victim = await connect(h.address(), source="127.0.0.21")
            await trio.sleep(DELAY + 1)  # passed: its first address is being tried
            pool._poller.refusals = 1  # type: ignore[attr-defined]  # the second's refused
            assert await read_until_closed(victim) == (BACKEND_UNAVAILABLE, "eof")
            (error,) = await h.receiver.wait_for("backend-error")
            assert "No space left on device" in error.fields["error"]
            earlier.close()
            await h.receiver.wait_for("relay-end")  # the earlier relay went on to its end
            later = await connect(h.address(), source="127.0.0.22")
            assert await read_line(later) == GREETING  # and the server serves on
            assert h.receiver.named("error") == []

"""--teaser in-process over real loopback sockets, with trio's autojump clock.

The teaser line goes out as the hold begins; a patient client reads it and the
backend's greeting as one multi-line reply; a client that talks on seeing it
is an early talker. A bot population (200 clients from distinct 127.x.y.z
addresses, five behaviours) shows what the teaser adds: the class that talks on
any line passes without it and is caught with it, and patient clients are
never caught.
"""

from __future__ import annotations

import collections
import dataclasses
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from repeld.config.settings import Listen
from repeld.core.policy import TrustedNetworks

from ..harness import GREETING, Harness, connect, read_line, read_until_closed, running

DELAY = 25.0
TEXT = "mx.test"
TEASER = b"220-mx.test\r\n"
EHLO_REPLY = b"250-backend.test\r\n250-PIPECONNECT\r\n250-PIPELINING\r\n250 8BITMIME\r\n"


async def read_greeting(sock: trio.socket.SocketType) -> list[bytes]:
    """The lines of a (multi-line) 220 greeting, up to its last line, as a client reads it."""
    lines: list[bytes] = []
    while True:
        line = await read_line(sock)
        lines.append(line)
        if not line.startswith(b"220-"):
            return lines


async def test_patient_client_reads_the_teaser_and_the_backend_greeting_as_one_reply(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, teaser=True, teaser_text=TEXT) as h:
        client = await connect(h.address())
        start = trio.current_time()
        assert await read_line(client) == TEASER
        assert trio.current_time() - start < 0.1  # at once, not after the delay
        assert await read_line(client) == GREETING
        assert trio.current_time() - start >= DELAY
        await client.send(b"EHLO me\r\nQUIT\r\n")
        assert await read_line(client) == b"250 ok\r\n"
        assert await read_line(client) == b"221 2.0.0 bye\r\n"
        assert (await read_until_closed(client))[1] == "eof"
        client.close()
        (passed,) = await h.receiver.wait_for("pass")
        assert passed.fields["reason"] == "delay"
        (end,) = await h.receiver.wait_for("relay-end")
        # What the MTA sent, not the teaser repeld wrote before the relay began.
        assert end.fields["bytes_to_client"] == str(len(GREETING) + 8 + 15)


async def test_default_teaser_text_is_the_host_name(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, teaser=True) as h:
        client = await connect(h.address())
        assert await read_line(client) == b"220-" + socket.gethostname().encode() + b"\r\n"
        client.close()
        (ev,) = await h.receiver.wait_for("hangup")
        assert ev.fields["how"] == "close"


@pytest.mark.parametrize("teaser", [True, False], ids=["teaser", "no-teaser"])
async def test_a_talker_is_cut_off_and_the_event_says_if_it_was_teased(
    autojump_clock: trio.testing.MockClock, teaser: bool
) -> None:
    async with running(delay=DELAY, teaser=teaser, teaser_text=TEXT) as h:
        client = await connect(h.address())
        await trio.sleep(1.0)
        await client.send(b"EHLO bot\r\n")
        data, _how = await read_until_closed(client)
        assert data == (TEASER if teaser else b"")
        (ev,) = await h.receiver.wait_for("early-talker")
        assert ev.fields["teaser"] == ("1" if teaser else "0")
        assert ev.fields["action"] == "drop"
        assert ev.fields["first"] == "EHLO bot\\r\\n"


async def test_trusted_and_nodelay_clients_never_hear_the_teaser(
    autojump_clock: trio.testing.MockClock,
) -> None:
    listen = (Listen("127.0.0.1", 0), Listen("127.0.0.1", 0, nodelay=True))
    async with running(
        delay=DELAY, teaser=True, teaser_text=TEXT, listen=listen, trusted=("127.0.0.2",)
    ) as h:
        for address, source in ((h.address(0), "127.0.0.2"), (h.address(1), None)):
            client = await connect(address, source)
            assert await read_line(client) == GREETING
            client.close()
        reasons = sorted(e.fields["reason"] for e in await h.receiver.wait_for("pass", 2))
        assert reasons == ["nodelay", "trusted"]


async def test_pipeconnect_filter_still_sees_the_backend_greeting_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, teaser=True, teaser_text=TEXT, backend_ehlo=EHLO_REPLY) as h:
        client = await connect(h.address())
        assert await read_greeting(client) == [TEASER, GREETING]
        await client.send(b"EHLO me\r\n")
        reply = [await read_line(client) for _ in range(3)]
        assert reply == [b"250-backend.test\r\n", b"250-PIPELINING\r\n", b"250 8BITMIME\r\n"]
        client.close()


async def test_a_reload_turns_the_teaser_on_for_new_clients(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY) as h:
        first = await connect(h.address())
        await trio.sleep(1.0)  # accepted and held before the reload
        assert len(h.server.pen) == 1
        server = h.server
        server.apply(
            dataclasses.replace(server.settings, teaser=True, teaser_text=TEXT),
            TrustedNetworks(()),
            server.backend,
        )
        second = await connect(h.address())
        assert await read_line(second) == TEASER
        assert await read_line(first) == GREETING  # held before the reload: no teaser
        assert await read_line(second) == GREETING
        first.close()
        second.close()


# -- a bot population ---------------------------------------------------------

Bot = Callable[[trio.socket.SocketType], Awaitable[None]]


async def talks_at_once(sock: trio.socket.SocketType) -> None:
    await sock.send(b"EHLO bot\r\n")
    await read_until_closed(sock)


async def talks_after_5s(sock: trio.socket.SocketType) -> None:
    await trio.sleep(5.0)
    await sock.send(b"EHLO bot\r\n")
    await read_until_closed(sock)


async def hangs_up_after_10s(sock: trio.socket.SocketType) -> None:
    await trio.sleep(10.0)


async def talks_on_any_line(sock: trio.socket.SocketType) -> None:
    # Waits for "a line", as a bot that does not parse replies would, then talks.
    line = await read_line(sock)
    assert line.startswith(b"220")
    try:
        await sock.send(b"EHLO bot\r\nQUIT\r\n")
    except OSError:
        return
    await read_until_closed(sock)


async def patient(sock: trio.socket.SocketType) -> None:
    # Waits for the last line of the greeting, as RFC 5321 clients do.
    lines = await read_greeting(sock)
    assert lines[-1] == GREETING
    await sock.send(b"EHLO me\r\nQUIT\r\n")
    assert await read_line(sock) == b"250 ok\r\n"
    assert await read_line(sock) == b"221 2.0.0 bye\r\n"
    await read_until_closed(sock)


CLASSES: dict[str, Bot] = {
    "at-once": talks_at_once,
    "after-5s": talks_after_5s,
    "hangup-10s": hangs_up_after_10s,
    "any-line": talks_on_any_line,
    "patient": patient,
}
PER_CLASS = 40  # 200 clients


async def run_population(
    h: Harness,
) -> tuple[dict[str, collections.Counter[str]], dict[str, str]]:
    """Every bot from its own 127.x.y.z; the verdict of each class, from the events,
    and each bot's class by its address."""
    who: dict[str, str] = {}

    async def one(kind: str, source: str) -> None:
        sock = await connect(h.address(), source)
        try:
            with trio.fail_after(120):
                await CLASSES[kind](sock)
        finally:
            sock.close()

    async with trio.open_nursery() as nursery:
        for n, kind in enumerate(sorted(CLASSES) * PER_CLASS):
            source = f"127.{1 + n // 250}.{n % 250}.{1 + n % 7}"
            who[source] = kind
            nursery.start_soon(one, kind, source)
    total = len(who)
    outcome: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in CLASSES}
    with trio.fail_after(120):
        while True:
            verdicts = [
                m for m in h.receiver.messages if m.event in ("pass", "early-talker", "hangup")
            ]
            if len(verdicts) >= total:
                break
            await trio.sleep(1.0)
    assert len(verdicts) == total
    for m in verdicts:
        outcome[who[str(m.fields["client"])]][m.event] += 1
    return outcome, who


async def test_bot_population_without_the_teaser(autojump_clock: trio.testing.MockClock) -> None:
    async with running(delay=DELAY, max_per_client=1) as h:
        outcome, _ = await run_population(h)
    assert outcome["at-once"] == {"early-talker": PER_CLASS}
    assert outcome["after-5s"] == {"early-talker": PER_CLASS}
    assert outcome["hangup-10s"] == {"hangup": PER_CLASS}
    assert outcome["any-line"] == {"pass": PER_CLASS}  # it heard the MTA's greeting first
    assert outcome["patient"] == {"pass": PER_CLASS}
    assert all(m.fields["teaser"] == "0" for m in h.receiver.named("early-talker"))


async def test_bot_population_with_the_teaser(autojump_clock: trio.testing.MockClock) -> None:
    async with running(delay=DELAY, max_per_client=1, teaser=True, teaser_text=TEXT) as h:
        outcome, who = await run_population(h)
    assert outcome["at-once"] == {"early-talker": PER_CLASS}
    assert outcome["after-5s"] == {"early-talker": PER_CLASS}
    assert outcome["hangup-10s"] == {"hangup": PER_CLASS}
    assert outcome["any-line"] == {"early-talker": PER_CLASS}  # caught by the teaser
    assert outcome["patient"] == {"pass": PER_CLASS}  # never caught
    # Every talker that talked after the hold began had heard the teaser; one that
    # talks at once may have talked before repeld accepted it, and never heard it.
    for m in h.receiver.named("early-talker"):
        assert m.fields["teaser"] == "1" or who[str(m.fields["client"])] == "at-once", m.fields
    any_line = [
        m
        for m in h.receiver.named("early-talker")
        if float(m.fields["elapsed"]) < DELAY and m.fields["first"].startswith("EHLO bot\\r\\nQUIT")
    ]
    assert len(any_line) >= PER_CLASS


async def test_a_client_that_talked_before_the_teaser_is_not_called_teased(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Connected and talking before repeld accepts it (no checkpoint in between):
    # its bytes came before the teaser could go out, so it never hears the
    # teaser and its event says teaser=0 (it said 1: the teaser was written
    # without a look first).
    async with running(delay=DELAY, teaser=True, teaser_text=TEXT) as h:
        with socket.create_connection(h.address()) as sock:
            sock.sendall(b"EHLO bot\r\n")
            sock.setblocking(False)
            (ev,) = await h.receiver.wait_for("early-talker")
            assert ev.fields["teaser"] == "0"
            assert ev.fields["first"] == "EHLO bot\\r\\n"
            try:
                heard = sock.recv(100)
            except (BlockingIOError, ConnectionResetError):
                heard = b""
            assert heard == b""  # cut off, never teased


async def test_a_client_gone_before_the_teaser_is_a_reset_hangup(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, teaser=True, teaser_text=TEXT) as h:
        # Connected and reset before repeld accepts it (no checkpoint in between):
        # the teaser cannot be written, and nothing is held.
        with socket.create_connection(h.address()) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        (ev,) = await h.receiver.wait_for("hangup")
        assert ev.fields["how"] == "reset"
        assert float(ev.fields["elapsed"]) == 0.0
        await trio.sleep(DELAY + 1)
        assert len(h.server.pen) == 0
        assert h.receiver.named("error") == []
        assert h.receiver.named("pass") == []

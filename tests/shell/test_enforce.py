"""--on-early enforce in-process over real loopback sockets, with the autojump clock:
the talker is held to the end of the delay, greeted by repeld, refused, and written
down with its envelope; the backend never hears of it.
"""

from __future__ import annotations

import socket
import struct

import pytest
import trio
import trio.testing

from repeld.config.values import MetricsAddress
from repeld.core.enforce import SESSION_TIME

from ..harness import connect, read_line, read_until_closed, running

DELAY = 25.0
NAME = "mx.enforce.test"


async def _read_reply(sock: trio.socket.SocketType) -> bytes:
    # One whole reply, multi-line or not.
    reply = b""
    while True:
        line = await read_line(sock)
        reply += line
        if not line or line[3:4] != b"-":
            return reply


async def test_a_talker_is_held_greeted_refused_and_written_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, on_early="enforce", teaser_text=NAME) as h:
        client = await connect(h.address(), "127.0.3.1")
        start = trio.current_time()
        await client.send(b"EHLO bot.example\r\n")  # early: stays unread until the end
        assert await read_line(client) == b"220 mx.enforce.test ESMTP\r\n"
        assert trio.current_time() - start == pytest.approx(DELAY, abs=0.1)
        assert await _read_reply(client) == (
            b"250-mx.enforce.test\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
        )
        await client.send(b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<b@rcpt.example>\r\n")
        assert await read_line(client) == b"250 2.1.0 Ok\r\n"
        assert await read_line(client) == b"450 4.7.1 Protocol error: try again later\r\n"
        await client.send(b"DATA\r\n")
        assert (await read_line(client)).startswith(b"554 ")
        await client.send(b"QUIT\r\n")
        assert await read_line(client) == b"221 2.0.0 Bye\r\n"
        assert (await read_until_closed(client))[1] == "eof"
        client.close()
        (ev,) = await h.receiver.wait_for("early-talker")
        assert ev.fields["action"] == "enforce"
        assert ev.fields["client"] == "127.0.3.1"
        assert ev.fields["first"] == "EHLO bot.example\\r\\n"
        assert float(ev.fields["elapsed"]) == pytest.approx(0.0, abs=0.01)
        assert ev.fields["helo"] == "bot.example"
        assert ev.fields["sender"] == "<a@sender.example>"
        assert ev.fields["recipients"] == "<b@rcpt.example>"
        assert ev.fields["commands"] == "5"
        assert ev.fields["end"] == "quit"
        assert h.backend.sessions == 0
        assert h.receiver.named("pass") == []
        assert h.server.dispatch.enforcing.active == 0


async def test_a_silent_client_still_passes(autojump_clock: trio.testing.MockClock) -> None:
    async with running(delay=DELAY, on_early="enforce") as h:
        client = await connect(h.address())
        assert (await read_line(client)).startswith(b"220 backend.test")
        client.close()
        (passed,) = await h.receiver.wait_for("pass")
        assert passed.fields["reason"] == "delay"


async def test_a_talker_that_leaves_before_its_greeting_is_written_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, on_early="enforce") as h:
        client = await connect(h.address())
        await client.send(b"EHLO gone\r\n")
        await trio.sleep(2)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        (ev,) = await h.receiver.wait_for("early-talker")
        assert ev.fields["action"] == "enforce"
        assert ev.fields["end"] == "gone"
        assert ev.fields["helo"] == "" and ev.fields["commands"] == "0"


async def test_a_silent_talker_is_told_421_after_the_session_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, on_early="enforce", teaser_text=NAME) as h:
        client = await connect(h.address())
        await client.send(b"HELO slow\r\n")
        assert (await read_line(client)).startswith(b"220 ")
        assert await read_line(client) == b"250 mx.enforce.test\r\n"
        start = trio.current_time()
        data, how = await read_until_closed(client)
        assert how == "eof"  # the 421, then a FIN
        assert data == b"421 4.4.2 mx.enforce.test Error: timeout exceeded\r\n"
        assert trio.current_time() - start == pytest.approx(SESSION_TIME, abs=0.1)
        (ev,) = await h.receiver.wait_for("early-talker")
        assert ev.fields["end"] == "timeout"
        assert ev.fields["helo"] == "slow"


async def test_past_the_limit_talkers_are_dropped_and_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = MetricsAddress("127.0.0.1", 0)
    async with running(delay=DELAY, on_early="enforce", metrics=metrics) as h:
        h.server.dispatch.enforcing.limit = 2  # MAX_SESSIONS, made small
        clients = []
        for i in range(4):
            c = await connect(h.address(), f"127.0.4.{i + 1}")
            await c.send(b"HELO x\r\n")
            clients.append(c)
        await trio.sleep(DELAY + 1)
        assert h.server.dispatch.enforcing.active == 2
        busy = await h.receiver.wait_for("early-talker", 2)
        assert {e.fields["end"] for e in busy} == {"busy"}
        for c in clients:  # with the greeting unread: a reset
            c.close()
        done = await h.receiver.wait_for("early-talker", 4)
        assert sorted(e.fields["end"] for e in done) == ["busy", "busy", "reset", "reset"]
        snap = h.server.metrics_snapshot()
        assert snap["labelled"]["enforce_ends"]["busy"] == 2
        assert snap["labelled"]["enforce_ends"]["reset"] == 2
        assert snap["labelled"]["early_talkers"]["enforce"] == 4
        assert snap["gauges"]["enforcing"] == 0


async def test_shutdown_tells_an_enforced_talker_421(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, on_early="enforce", teaser_text=NAME) as h:
        client = await connect(h.address())
        await client.send(b"HELO x\r\n")
        assert (await read_line(client)).startswith(b"220 ")
        assert (await read_line(client)).startswith(b"250 ")
        h.server.shutdown(grace=1.0)
        data, _ = await read_until_closed(client)
        assert data.startswith(b"421 4.3.2 mx.enforce.test ")
        (ev,) = await h.receiver.wait_for("early-talker")
        assert ev.fields["end"] == "shutdown"


async def test_with_the_teaser_the_greeting_completes_the_teasers_reply(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, on_early="enforce", teaser=True, teaser_text=NAME) as h:
        client = await connect(h.address())
        assert await read_line(client) == b"220-mx.enforce.test\r\n"
        await client.send(b"EHLO bot\r\n")  # talks on seeing the teaser
        # repeld's own last line ends the multi-line 220 (RFC 5321 section 4.2)
        assert await read_line(client) == b"220 mx.enforce.test ESMTP\r\n"
        assert (await _read_reply(client)).startswith(b"250-mx.enforce.test\r\n")
        client.close()
        (ev,) = await h.receiver.wait_for("early-talker")
        assert ev.fields["teaser"] == "1" and ev.fields["helo"] == "bot"


async def test_a_talker_still_held_at_shutdown_is_written_down(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, on_early="enforce") as h:
        talker = await connect(h.address(), "127.0.3.7")
        silent = await connect(h.address(), "127.0.3.8")
        await talker.send(b"EHLO early\r\n")
        await trio.sleep(3)
        h.server.shutdown(grace=1.0)
        for client in (talker, silent):
            data, _ = await read_until_closed(client)
            assert data.startswith(b"421 4.3.2 ")
        (ev,) = await h.receiver.wait_for("early-talker")
        assert ev.fields["client"] == "127.0.3.7"
        assert ev.fields["action"] == "enforce" and ev.fields["end"] == "shutdown"
        assert ev.fields["first"] == "EHLO early\\r\\n" and ev.fields["helo"] == ""
        assert float(ev.fields["elapsed"]) == pytest.approx(0.0, abs=0.01)  # when it talked
        await trio.sleep(1)
        assert len(h.receiver.named("early-talker")) == 1  # the silent one is no talker

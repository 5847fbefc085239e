"""No false positives: a talker's verdict waits for the pass cache, and observe mode.

An Exim with PIPECONNECT that waited once sends EHLO, MAIL and RCPT before the
banner the next time; the pass cache remembers it as patient, so it must be
passed with those bytes intact, even with --on-early reject.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
import trio.testing

from repeld.cache.spec import parse_cache_url
from repeld.core.hold import CACHE_WAIT

from ..harness import GREETING, Harness, connect, read_line, read_until_closed, running

EHLO_REPLY = b"250-backend.test\r\n250-PIPELINING\r\n250-PIPECONNECT\r\n250 8BITMIME\r\n"
PIPELINED = b"EHLO x\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<b@backend.test>\r\n"
MESSAGE = (b"DATA\r\n", b"Subject: hi\r\n", b".\r\n", b"QUIT\r\n")


async def read_reply(sock: trio.socket.SocketType) -> bytes:
    """One SMTP reply, all of its lines."""
    reply = b""
    while True:
        line = await read_line(sock)
        reply += line
        if len(line) < 4 or line[3:4] != b"-":
            return reply


async def deliver(sock: trio.socket.SocketType, already_sent: bool) -> None:
    """The rest of an SMTP session after the banner (the backend says 250 to each line)."""
    if not already_sent:
        await sock.send(b"EHLO x\r\n")
    assert await read_reply(sock) == EHLO_REPLY
    if not already_sent:
        await sock.send(b"MAIL FROM:<a@sender.test>\r\n")
    assert await read_reply(sock) == b"250 ok\r\n"
    if not already_sent:
        await sock.send(b"RCPT TO:<b@backend.test>\r\n")
    assert await read_reply(sock) == b"250 ok\r\n"
    for line in MESSAGE[:-1]:
        await sock.send(line)
        assert await read_reply(sock) == b"250 ok\r\n"
    await sock.send(MESSAGE[-1])
    assert await read_reply(sock) == b"221 2.0.0 bye\r\n"
    assert (await read_until_closed(sock, limit=10))[1] == "eof"


def delivered(h: Harness) -> int:
    return h.backend.received.count(b".\r\n")


async def test_pipeconnect_client_remembered_as_patient_is_passed_with_its_bytes(
    tmp_path: Path,
) -> None:
    # Real clock: the SQLite cache answers from a worker thread.
    delay = 1.0
    cache = parse_cache_url(f"sqlite:{tmp_path / 'cache.sqlite'}")
    async with running(
        delay=delay,
        on_early="reject",
        # The client learned PIPECONNECT before the filter stood in its way.
        keep_pipe_connect=True,
        cache=cache,
        backend_proxy=True,
        backend_ehlo=EHLO_REPLY,
        proxy_protocol="v1",
    ) as h:
        first = await connect(h.address())
        assert await read_line(first) == GREETING  # waited for the banner
        await deliver(first, already_sent=False)
        first.close()
        await h.receiver.wait_for("pass")

        second = await connect(h.address())
        await second.send(PIPELINED)  # before any banner, as Exim's PIPECONNECT does
        with trio.fail_after(delay / 2):  # let out on the cache's word, not after the delay
            assert await read_line(second) == GREETING
        await deliver(second, already_sent=True)
        second.close()

        passes = await h.receiver.wait_for("pass", 2)
        assert [p.fields["reason"] for p in passes] == ["delay", "cache"]
        assert [p.fields["early_bytes"] for p in passes] == ["0", str(len(PIPELINED))]
        assert h.receiver.named("early-talker") == []
        assert delivered(h) == 2 and h.backend.sessions == 2
        # The PROXY header went first, then exactly what was sent before the banner.
        assert all(header is not None for header in h.backend.headers)
        assert b"".join(h.backend.received).count(PIPELINED) == 2
        assert h.server.statistics()["early_talker"] == 0


async def test_a_retalker_under_penalty_ttl_is_penalized_not_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=25.0, cache=parse_cache_url("memory"), penalty_ttl=600.0) as h:
        for _ in range(2):
            client = await connect(h.address())
            await client.send(b"EHLO bot\r\n")
            assert (await read_until_closed(client))[1] == "reset"
            client.close()
        talks = await h.receiver.wait_for("early-talker", 2)
        assert [t.fields["action"] for t in talks] == ["drop", "penalty"]
        assert float(talks[1].fields["elapsed"]) < CACHE_WAIT
        assert h.receiver.named("pass") == []


async def test_observe_mode_passes_a_talker_after_the_delay_with_its_bytes_intact(
    autojump_clock: trio.testing.MockClock,
) -> None:
    delay = 25.0
    async with running(
        delay=delay,
        on_early="log",
        keep_pipe_connect=True,
        cache=parse_cache_url("memory"),
        backend_proxy=True,
        backend_ehlo=EHLO_REPLY,
        proxy_protocol="v2",
    ) as h:
        client = await connect(h.address())
        start = trio.current_time()
        await client.send(PIPELINED)
        (talk,) = await h.receiver.wait_for("early-talker")
        assert talk.fields["action"] == "log"
        assert talk.fields["bytes"] == str(len(PIPELINED))
        assert talk.fields["first"].startswith("EHLO x\\r\\nMAIL FROM:")
        assert h.backend.sessions == 0  # held, not cut off, not passed yet
        assert await read_line(client) == GREETING
        assert trio.current_time() - start >= delay
        await deliver(client, already_sent=True)
        client.close()
        (passed,) = await h.receiver.wait_for("pass")
        assert passed.fields["reason"] == "delay"
        assert passed.fields["early_bytes"] == str(len(PIPELINED))
        assert h.backend.headers[0] is not None and h.backend.headers[0].version == 2
        assert b"".join(h.backend.received).startswith(PIPELINED)
        assert delivered(h) == 1
        assert h.server.statistics()["early_talker"] == 1  # still counted

        # A talker is not remembered as patient: the next one is logged again.
        again = await connect(h.address())
        await again.send(b"EHLO x\r\n")
        (_, second) = await h.receiver.wait_for("early-talker", 2)
        assert second.fields["action"] == "log"
        again.close()


async def test_observe_mode_logs_a_remembered_penalty_and_holds_the_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(
        delay=25.0, on_early="log", cache=parse_cache_url("memory"), penalty_ttl=600.0
    ) as h:
        talker = await connect(h.address())
        await talker.send(b"EHLO bot\r\n")
        await h.receiver.wait_for("early-talker")  # logged, and remembered
        silent = await connect(h.address())
        (_, penalty) = await h.receiver.wait_for("early-talker", 2)
        assert penalty.fields["action"] == "log"
        assert penalty.fields["bytes"] == "0"
        assert await read_line(silent) == GREETING  # held as usual, then passed
        silent.close()
        passes = await h.receiver.wait_for("pass", 2)
        assert sorted(p.fields["early_bytes"] for p in passes) == ["0", "10"]
        talker.close()


async def test_without_a_cache_a_talker_is_cut_off_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=25.0, no_cache=True) as h:
        client = await connect(h.address())
        start = trio.current_time()
        await client.send(b"EHLO bot\r\n")
        assert (await read_until_closed(client))[1] == "reset"
        assert trio.current_time() - start < 0.01
        (talk,) = await h.receiver.wait_for("early-talker")
        assert talk.fields["action"] == "drop"


@pytest.mark.parametrize("locked", [False, True], ids=["sqlite", "sqlite-locked"])
async def test_with_a_slow_cache_a_talker_is_cut_off_within_the_bound(
    tmp_path: Path, locked: bool
) -> None:
    # Real clock: the SQLite worker is stuck in a write behind another
    # process's lock, so every lookup runs out its own timeout.
    db = tmp_path / "cache.sqlite"
    async with running(delay=25.0, cache=parse_cache_url(f"sqlite:{db}")) as h:
        blocker = sqlite3.connect(db, isolation_level=None)
        try:
            if locked:
                blocker.execute("BEGIN IMMEDIATE")
                trusted = await connect(h.address())  # talks: a write is queued...
                await trusted.send(b"x")
                await h.receiver.wait_for("early-talker")
                trusted.close()
                await trio.sleep(0.2)  # ...and the worker waits on the lock (busy_timeout 1 s)
            client = await connect(h.address())
            start = trio.current_time()
            await client.send(b"EHLO bot\r\n")
            assert (await read_until_closed(client, limit=5))[1] == "reset"
            took = trio.current_time() - start
            assert took <= CACHE_WAIT + 0.25
            talks = await h.receiver.wait_for("early-talker", 2 if locked else 1)
            assert talks[-1].fields["action"] == "drop"
            assert float(talks[-1].fields["elapsed"]) <= CACHE_WAIT + 0.1
        finally:
            if locked:
                blocker.execute("ROLLBACK")
            blocker.close()

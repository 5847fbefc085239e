"""The holding pen on real sockets: a verdict handler that raises is reported
through `on_error` and never takes the pen down; a client the DNS lists hold
beyond its delay waits apart from the delay's queue."""

from __future__ import annotations

import contextlib
import functools
import socket
import struct
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from repeld.core.dnsbl import DnsAction, DnsPolicy, DnsScore
from repeld.core.events import ConnInfo
from repeld.core.hold import (
    FLOOD_LIMIT,
    Blocked,
    EarlyTalk,
    HangUp,
    Hold,
    Logged,
    Pass,
    PassReason,
    Verdict,
)
from repeld.shell.pen import Held, HoldingPen

from ..harness import GREETING, connect, read_line, running


async def test_a_failing_verdict_handler_is_reported_and_the_pen_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    verdicts: list[Verdict] = []
    errors: list[tuple[Held, str]] = []

    def on_verdict(held: Held, verdict: Verdict) -> None:
        verdicts.append(verdict)
        if len(verdicts) == 1:
            raise RuntimeError("a bug in the handler")
        held.sock.close()

    pen = HoldingPen(on_verdict, lambda held, message: errors.append((held, message)))
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pen.run)
            helds = []
            for i, (ours, _) in enumerate(pairs):
                ours.setblocking(False)
                conn = ConnInfo("192.0.2.1", 1000 + i, "127.0.0.1", 25)
                held = Held(ours, conn, Hold(trio.current_time(), 10.0))
                helds.append(held)
                pen.add(held)
            pairs[0][1].send(b"EHLO early\r\n")
            await trio.sleep(1)
            assert len(errors) == 1
            assert errors[0][0] is helds[0]
            assert "a bug in the handler" in errors[0][1]
            assert "EarlyTalk" in errors[0][1]
            assert helds[0].sock.fileno() == -1  # closed by the pen
            assert len(pen) == 1
            pairs[1][1].send(b"EHLO early too\r\n")  # the pen still decides
            await trio.sleep(1)
            assert len(verdicts) == 2 and all(isinstance(v, EarlyTalk) for v in verdicts)
            assert len(errors) == 1
            assert len(pen) == 0
            nursery.cancel_scope.cancel()
    finally:
        pen.close()
        for a, b in pairs:
            a.close()
            b.close()


async def test_a_client_the_lists_hold_longer_never_holds_up_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """--dnsbl-action delay: the blocked client waits --dnsbl-delay, the client
    queued behind it with the same delay still passes at the end of its own, and
    a blocked client that talks during the longer hold is an early talker."""
    decided: dict[int, list[tuple[float, Verdict]]] = {}

    def on_verdict(held: Held, verdict: Verdict) -> None:
        decided.setdefault(held.conn.client_port, []).append((trio.current_time(), verdict))
        if not isinstance(verdict, Logged):
            held.sock.close()

    pen = HoldingPen(on_verdict, lambda held, message: None)
    pairs = [socket.socketpair() for _ in range(3)]
    policy = DnsPolicy(action=DnsAction.DELAY, block_delay=30.0)
    listed = DnsScore(2, ("bl.example",))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pen.run)
            start = trio.current_time()
            helds = []
            for i, (ours, _) in enumerate(pairs):
                ours.setblocking(False)
                conn = ConnInfo("192.0.2.1", 1000 + i, "127.0.0.1", 25)
                held = Held(ours, conn, Hold(trio.current_time(), 10.0, dns=policy))
                helds.append(held)
                pen.add(held)
                await trio.sleep(1)
            # The lists block the first and the third; the second is not listed.
            for held, result in zip(helds, (listed, DnsScore(), listed), strict=True):
                assert pen.settle(held, functools.partial(held.hold.listed, result))
            await trio.sleep(20 - (trio.current_time() - start))
            assert [v for _, v in decided[1001]] == [Pass(PassReason.DELAY, 10.0)]
            assert len(decided[1000]) == 1  # only the logged block so far
            pairs[2][1].send(b"EHLO impatient\r\n")
            await trio.sleep(20)
            nursery.cancel_scope.cancel()
    finally:
        pen.close()
        for a, b in pairs:
            a.close()
            b.close()
    blocked = [v for _, v in decided[1000]]
    assert isinstance(blocked[0], Logged) and isinstance(blocked[0].note, Blocked)
    assert blocked[0].note.lists == ("bl.example",)
    assert blocked[1:] == [Pass(PassReason.DELAY, 30.0)]
    assert decided[1000][1][0] - start == 30.0
    assert decided[1001][0][0] - start == 11.0
    talker = [v for _, v in decided[1002]]
    assert isinstance(talker[-1], EarlyTalk) and talker[-1].elapsed == 18.0
    assert len(pen) == 0


async def test_a_client_the_lists_block_only_at_the_end_of_its_delay_is_held_then_passed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """--dnsbl-action delay, a block list's answer in and an allow list's still
    awaited when the delay ends: the block applies then (the allow list counts as
    not listing), and the client waits --dnsbl-delay and is passed. It was never
    released: the pen dropped the wait that came with the block's event."""
    decided: list[tuple[float, Verdict]] = []

    def on_verdict(held: Held, verdict: Verdict) -> None:
        decided.append((trio.current_time(), verdict))
        if not isinstance(verdict, Logged):
            held.sock.close()

    pen = HoldingPen(on_verdict, lambda held, message: None)
    ours, theirs = socket.socketpair()
    policy = DnsPolicy(action=DnsAction.DELAY, block_delay=30.0)
    unsettled = DnsScore(2, ("bl.example",), ("wl.example",), (-2, 0))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pen.run)
            start = trio.current_time()
            ours.setblocking(False)
            conn = ConnInfo("192.0.2.1", 1000, "127.0.0.1", 25)
            held = Held(ours, conn, Hold(start, 10.0, dns=policy))
            pen.add(held)
            await trio.sleep(1)
            assert pen.settle(held, functools.partial(held.hold.listed, unsettled))
            await trio.sleep(40)
            nursery.cancel_scope.cancel()
    finally:
        pen.close()
        ours.close()
        theirs.close()
    (when, logged), (passed_at, passed) = decided
    assert isinstance(logged, Logged) and isinstance(logged.note, Blocked)
    assert when - start == 10.0
    assert passed == Pass(PassReason.DELAY, 30.0)
    assert passed_at - start == 30.0
    assert len(pen) == 0


async def test_hung_up_connections_do_not_stay_queued_until_their_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Issue 11 item 4: an attacker that connects and resets must not make the
    # deadline queues grow with every connection until `--delay` has passed.
    # No per-client limit to speak of: under load the accept loop gathers a burst
    # (and under the autojump clock no time passes while this loop connects), so
    # a hundred resets may be taken before the pen has seen any of them go.
    async with running(delay=3600.0, max_per_client=100_000) as h:
        patient = [await connect(h.address()) for _ in range(10)]
        pen = h.server.pen
        worst = 0
        for i in range(5000):
            sock = await connect(h.address())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            if i % 100 == 99:
                await h.receiver.wait_for("hangup", i + 1)
                stats = pen.statistics()
                worst = max(worst, stats.queued)
                assert stats.held == len(patient)
                assert stats.queued <= 2 * stats.held + 64, stats
        assert len(await h.receiver.wait_for("hangup", 5000)) == 5000
        assert worst > len(patient)  # the queues did hold the dead for a while
        # The held ones keep their place and their deadline.
        await trio.sleep(3600)
        for p in patient:
            assert await read_line(p) == GREETING
        assert len(await h.receiver.wait_for("pass", len(patient))) == len(patient)
        stats = pen.statistics()
        assert (stats.held, stats.queued, stats.muted) == (0, 0, 0)
        for p in patient:
            p.close()


def _tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    # (the accepted end, the client end) of one loopback TCP connection.
    client = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    return ours, client


async def test_muted_talkers_that_leave_do_not_stay_in_the_heap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A talker muted while the pass cache is asked has a heap entry of its own;
    # one that resets is decided at once and must not wait there for CACHE_WAIT.
    verdicts: list[Verdict] = []

    def on_verdict(held: Held, verdict: Verdict) -> None:
        verdicts.append(verdict)
        held.sock.close()

    pen = HoldingPen(on_verdict, lambda held, message: None)
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pen.run)
            for i in range(400):
                ours, client = _tcp_pair(listener)
                ours.setblocking(False)
                conn = ConnInfo("192.0.2.1", 1000 + i, "127.0.0.1", 25)
                pen.add(Held(ours, conn, Hold(trio.current_time(), 3600.0, cache_pending=True)))
                client.send(b"EHLO early\r\n")
                await trio.sleep(0.01)
                assert pen.statistics().muted == 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                await trio.sleep(0.01)
                stats = pen.statistics()
                assert stats.held == 0 and stats.muted == 0
                assert stats.queued <= 64, stats
            assert len(verdicts) == 400
            assert all(isinstance(v, EarlyTalk) for v in verdicts)
            nursery.cancel_scope.cancel()
    finally:
        pen.close()
        listener.close()


PIPELINED = b"EHLO x\r\nMAIL FROM:<a@sender.test>\r\n"


@contextlib.contextmanager
def one_held(hold: Hold) -> Iterator[tuple[HoldingPen, list[Verdict], Held, socket.socket]]:
    """A pen holding one client on a real socket pair, whose task never runs: an
    answer fed through `settle` comes first. The pen, its verdicts, the held
    client and the client's own end."""
    verdicts: list[Verdict] = []
    pen = HoldingPen(lambda held, verdict: verdicts.append(verdict), lambda *_: None)
    ours, theirs = socket.socketpair()
    try:
        ours.setblocking(False)
        held = Held(ours, ConnInfo("192.0.2.1", 1000, "127.0.0.1", 25), hold)
        pen.add(held)
        yield pen, verdicts, held, theirs
    finally:
        pen.close()
        ours.close()
        theirs.close()


@pytest.mark.parametrize(("look", "counted"), [(True, len(PIPELINED)), (False, 0)])
async def test_a_good_word_counts_the_bytes_the_pen_has_not_served_yet(
    look: bool, counted: int
) -> None:
    # The cache's answer and the pen's readiness are two tasks, run in either
    # order. Here the pen's task never runs: the answer comes first. With
    # `look` the pen peeks before it, so the pass counts what the client had
    # sent (a remembered PIPECONNECT client); without, the pass says 0.
    hold = Hold(trio.current_time(), 25.0, cache_pending=True)
    with one_held(hold) as (pen, verdicts, held, theirs):
        theirs.send(PIPELINED)
        assert pen.settle(held, hold.remembered_good, (lambda now: look))
        (verdict,) = verdicts
        assert isinstance(verdict, Pass) and verdict.reason is PassReason.CACHE
        assert verdict.early_bytes == counted
        assert len(pen) == 0
        assert held.sock.recv(100, socket.MSG_PEEK) == PIPELINED  # peeked, never read


@pytest.mark.parametrize(("look", "verdict_type"), [(True, EarlyTalk), (False, Pass)])
async def test_an_allow_that_comes_after_the_talk_does_not_pass_the_talker(
    look: bool, verdict_type: type
) -> None:
    # The lists' answer and the pen's readiness race as the cache's do: the
    # client talked, then an allow list's answer came first to its task. With
    # the look (what admission asks for: `look_before_lists`), the talk stands;
    # without, the allow passed an early talker.
    hold = Hold(trio.current_time(), 25.0, dns=DnsPolicy())
    with one_held(hold) as (pen, verdicts, held, theirs):
        theirs.send(b"EHLO bot\r\n")
        allowed = DnsScore(-1, ("wl.example",))
        assert hold.look_before_lists(allowed, trio.current_time())
        decided_by_answer = pen.settle(
            held, lambda now: hold.listed(allowed, now), (lambda now: look)
        )
        assert decided_by_answer is not look  # looked at, the talk decided first
        (verdict,) = verdicts
        assert type(verdict) is verdict_type
        assert len(pen) == 0


async def test_a_client_that_left_before_the_good_word_is_a_hang_up() -> None:
    # Looked at first, a client that closed its side (no bytes) has left: a
    # hang-up, as the pen would have found it, and the answer is not fed.
    hold = Hold(trio.current_time(), 25.0, cache_pending=True)
    with one_held(hold) as (pen, verdicts, held, theirs):
        theirs.shutdown(socket.SHUT_WR)
        assert not pen.settle(held, hold.remembered_good, lambda now: True)
        assert len(verdicts) == 1 and isinstance(verdicts[0], HangUp)
        assert hold.done and len(pen) == 0


def _lowat(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


@contextlib.contextmanager
def one_tcp_held(
    hold: Hold,
) -> Iterator[tuple[HoldingPen, list[tuple[Verdict, int]], Held, socket.socket]]:
    """A pen (not yet running) holding one client of a real loopback TCP connection:
    the pen, each verdict with the socket's low-water mark as it was carried out,
    the held client and the client's own end. A final verdict closes the socket,
    except a pass, whose socket the test reads."""
    verdicts: list[tuple[Verdict, int]] = []

    def on_verdict(held: Held, verdict: Verdict) -> None:
        verdicts.append((verdict, _lowat(held.sock)))
        if not isinstance(verdict, (Logged, Pass)):
            held.sock.close()

    pen = HoldingPen(on_verdict, lambda *_: None)
    listener = socket.create_server(("127.0.0.1", 0))
    ours, client = _tcp_pair(listener)
    try:
        ours.setblocking(False)
        held = Held(ours, ConnInfo("192.0.2.1", 1000, "127.0.0.1", 25), hold)
        pen.add(held)
        yield pen, verdicts, held, client
    finally:
        pen.close()
        for sock in (ours, client, listener):
            sock.close()


@pytest.mark.parametrize("mode", ["observe", "cache_pending", "enforce"])
async def test_a_muted_talker_that_floods_is_decided_at_once(
    autojump_clock: trio.testing.MockClock, mode: str
) -> None:
    # Muted, a talker's further bytes are not watched one by one; reaching
    # FLOOD_LIMIT unread, they end its hold then, not at its deadline, so that
    # they never sit in the kernel for the whole delay. The pen's socket is
    # given back with its low-water mark at 1.
    hold = Hold(
        trio.current_time(),
        3600.0,
        cache_pending=mode == "cache_pending",
        observe=mode == "observe",
        enforce=mode == "enforce",
    )
    with one_tcp_held(hold) as (pen, verdicts, held, client):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pen.run)
            client.send(b"EHLO x\r\n")
            await trio.sleep(0.01)
            assert pen.statistics().muted == 1 and not hold.done
            assert _lowat(held.sock) == FLOOD_LIMIT
            client.sendall(b"x" * (FLOOD_LIMIT // 2))
            await trio.sleep(0.01)
            assert not hold.done, verdicts  # below the limit: still muted
            client.sendall(b"x" * (FLOOD_LIMIT // 2))
            await trio.sleep(0.01)
            assert hold.done and len(pen) == 0 and pen.statistics().muted == 0
            verdict, lowat = verdicts[-1]  # cut off, whatever the mode (core/hold.py)
            assert isinstance(verdict, EarlyTalk), verdicts
            assert verdict.nbytes >= FLOOD_LIMIT and verdict.first.startswith(b"EHLO x\r\n")
            assert lowat == 1
            nursery.cancel_scope.cancel()


async def test_an_observed_talker_below_the_limit_is_passed_with_every_byte(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Talk, more talk short of the limit, a half-close: the hold goes on to its
    # deadline (the end of file is not taken for a flood), and the pass finds
    # the bytes unread and the mark back at 1, so the MTA reads them as they come.
    hold = Hold(trio.current_time(), 5.0, observe=True)
    sent = b"EHLO x\r\n" + b"NOOP\r\n" * 2000
    with one_tcp_held(hold) as (pen, verdicts, held, client):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pen.run)
            client.send(sent[:8])
            await trio.sleep(0.01)
            client.sendall(sent[8:])
            client.shutdown(socket.SHUT_WR)
            await trio.sleep(1)
            assert [type(v) for v, _ in verdicts] == [Logged] and not hold.done
            await trio.sleep(5)
            assert hold.done
            verdict, lowat = verdicts[-1]
            assert isinstance(verdict, Pass) and lowat == 1
            nursery.cancel_scope.cancel()
        held.sock.setblocking(True)
        got = b""
        while chunk := held.sock.recv(65536):
            got += chunk
        assert got == sent


@pytest.mark.parametrize("first", ["the cache's answer", "the deadline"])
async def test_a_flood_the_pen_has_not_served_yet_comes_first(
    autojump_clock: trio.testing.MockClock, first: str
) -> None:
    # The flood's readiness and the cache's answer (or the deadline) are served
    # in either order; a flooded talker was passed with its first bytes when the
    # answer came first.
    observe = first == "the deadline"
    hold = Hold(trio.current_time(), 5.0, cache_pending=not observe, observe=observe)
    with one_tcp_held(hold) as (pen, verdicts, held, client):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pen.run)
            client.send(b"EHLO x\r\n")
            await trio.sleep(0.01)
            assert hold.muted and not hold.done
            nursery.cancel_scope.cancel()  # the pen serves no readiness any more
        client.sendall(b"x" * FLOOD_LIMIT)
        if observe:
            pen._expire(hold.deadline)
        else:
            assert not pen.settle(held, hold.remembered_good)
        verdict, lowat = verdicts[-1]
        assert isinstance(verdict, EarlyTalk) and verdict.nbytes > FLOOD_LIMIT, verdicts
        assert hold.done and len(pen) == 0 and lowat == 1

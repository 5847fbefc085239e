"""The accept loop's failure paths, on real listeners: a broken listener ends the
server with an `error` event instead of spinning; the pause on EMFILE is in
tests/system/test_capacity.py (it lowers RLIMIT_NOFILE in a child process).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import resource
import select
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
import trio
import trio.testing

from repeld.config.settings import Backend, Listen, Settings
from repeld.config.values import SyslogTarget
from repeld.core.gathering import PROBE_FIRST, PROBE_SPAN_LONGEST
from repeld.process.workers import LEAD_ENV, attach_leads
from repeld.service.tcptune import Acceptor, WakeTimer
from repeld.shell.accept import (
    ACCEPT_BATCH,
    FLOOD_PAUSE,
    FOLLOW_CHECK,
    GATHER,
    GATHER_MIN,
    GATHER_MIN_BACKLOG,
    LEAD_TOKEN,
    RETRY_ERRNOS,
    Lead,
    Listener,
    _drop_timer,
    _every_socket,
    accept_loop,
    restore_lead,
)
from repeld.shell.eventlog import EventLog
from repeld.shell.poller import waiting_bytes
from repeld.shell.server import open_server

from ..harness import Receiver, opened


def _flatten(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _flatten(sub)]
    return [exc]


def _close_fd(sock: socket.socket) -> None:
    os.close(sock.detach())  # the socket object now has no fd (-1): EBADF


def _stop_listening(sock: socket.socket) -> None:
    # Linux: shutdown() takes a listener out of LISTEN and wakes its waiters
    # (EPOLLHUP); accept() then fails with EINVAL for good.
    sock.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize(
    ("break_it", "before", "errno_name"),
    [(_close_fd, True, "EBADF"), (_stop_listening, False, "EINVAL")],
    ids=["fd-closed", "not-listening"],
)
async def test_a_broken_listener_ends_the_server_with_an_error_event(
    autojump_clock: trio.testing.MockClock,
    break_it: Callable[[socket.socket], None],
    before: bool,
    errno_name: str,
) -> None:
    receiver = Receiver()
    server, log = await opened(receiver, no_cache=True)
    lsock = server.listeners[0].sock
    caught: BaseException | None = None
    async with trio.open_nursery() as outer:
        outer.start_soon(receiver.run)
        try:
            with trio.fail_after(60):  # the loop checkpoints: a spin would trip this
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(log.run)
                    if before:
                        break_it(lsock)
                    await nursery.start(server.serve)
                    if not before:
                        break_it(lsock)
                    await trio.sleep_forever()
        except BaseException as exc:  # the group is taken apart below
            caught = exc
        (error,) = await receiver.wait_for("error")
        outer.cancel_scope.cancel()
    assert caught is not None
    leaves = _flatten(caught)
    assert [type(e) for e in leaves] == [OSError]
    assert isinstance(leaves[0], OSError)
    assert leaves[0].errno == getattr(errno, errno_name)
    assert errno_name in error.fields["error"]
    assert "accept on 127.0.0.1:" in error.fields["error"]
    assert error.severity == 3


async def test_the_loop_skips_nothing_and_hands_out_non_blocking_close_on_exec_clients(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    lsock.setblocking(False)
    got: list[tuple[socket.socket, tuple[object, ...]]] = []
    clients = [socket.create_connection(lsock.getsockname()) for _ in range(100)]
    try:
        async with trio.open_nursery() as nursery:
            listener = Listener(lsock, Listen("127.0.0.1", 0))
            nursery.start_soon(
                accept_loop, listener, lambda s, a, _: got.append((s, a)), lambda *_: None
            )
            with trio.fail_after(10):
                while len(got) < len(clients):
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert sorted(a for _, a in got) == sorted(c.getsockname() for c in clients)
        for sock, _ in got:
            assert sock.gettimeout() == 0.0
            assert not sock.get_inheritable()
            assert sock.type == socket.SOCK_STREAM and sock.family == socket.AF_INET
            assert os.get_blocking(sock.fileno()) is False
    finally:
        for sock, _ in got:
            sock.close()
        for c in clients:
            c.close()
        lsock.close()


class _Arrivals:
    """Listeners of real loopback sockets, their clients, and when each was taken."""

    def __init__(self) -> None:
        self.taken: list[tuple[float, socket.socket]] = []
        self.clients: list[socket.socket] = []
        self.listeners: list[socket.socket] = []

    def listener(self, backlog: int = 128) -> socket.socket:
        lsock = socket.socket()
        self.listeners.append(lsock)
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(backlog)
        lsock.setblocking(False)
        return lsock

    def accepted(self, sock: socket.socket, _addr: tuple[object, ...], _lst: Listener) -> None:
        self.taken.append((trio.current_time(), sock))

    def serve(
        self,
        nursery: trio.Nursery,
        lsock: socket.socket,
        relaying: int | Callable[[], int] = 0,
        backlog: int = GATHER_MIN_BACKLOG,
        longest: float = GATHER,
        lead: Lead | None = None,
        room: Callable[[], bool] = lambda: True,
    ) -> None:
        """Start an accept loop on `lsock` that records each client in `taken`
        (`relaying`: how many sessions are relayed, or a function that says)."""
        nursery.start_soon(
            functools.partial(
                accept_loop,
                Listener(lsock, Listen("127.0.0.1", 0), lead=lead),
                self.accepted,
                lambda *_: None,
                relaying if callable(relaying) else lambda: relaying,
                backlog,
                longest,
                room=room,
            )
        )

    def serve_leading(
        self,
        nursery: trio.Nursery,
        token: int,
        give_back: int,
        room: Callable[[], bool] = lambda: True,
        relaying: Callable[[], int] = lambda: 0,
    ) -> tuple[socket.socket, socket.socket]:
        """One worker's accept loop with the lead's pipe, beside another worker's
        socket that only the lead takes from: (its own, the other's)."""
        own, theirs = self.listener(), self.listener()
        lead = Lead(token, give_back, [theirs])
        self.serve(nursery, own, lead=lead, room=room, relaying=relaying)
        return own, theirs

    async def take_the_lead(
        self,
        nursery: trio.Nursery,
        token: int,
        give_back: int,
        room: Callable[[], bool] = lambda: True,
        relaying: Callable[[], int] = lambda: 0,
    ) -> tuple[socket.socket, socket.socket, float]:
        """`serve_leading`, then two clients at once on its own socket, which
        start gathering and so take the lead: (its own, the other's, when the
        two connected)."""
        own, theirs = self.serve_leading(nursery, token, give_back, room, relaying)
        await trio.sleep(1)
        return own, theirs, await self.connect(own, 2)

    async def connect(self, lsock: socket.socket, count: int) -> float:
        """`count` clients at once; when they connected, once all are taken."""
        start = trio.current_time()
        self.clients += [socket.create_connection(lsock.getsockname()) for _ in range(count)]
        with trio.fail_after(10):
            while len(self.taken) < len(self.clients):
                await trio.sleep(0.0001)
        return start

    async def sessions(
        self,
        sockets: Sequence[socket.socket],
        until: float,
        connected: list[float] | None = None,
        each_turn: Callable[[], None] = lambda: None,
    ) -> None:
        """Two connections at a time, each opened when one before is taken, as a
        relay flushing its queue opens them, to `sockets` in turn, until `until`
        (trio's clock); those done with are closed (few fds open at once).
        `connected` gets when each was opened; `each_turn` runs after each
        turn-around."""
        done = 0
        while trio.current_time() < until:
            for i in range(done, len(self.taken)):
                self.taken[i][1].close()
                self.clients[i].close()
            done = len(self.taken)
            while len(self.clients) - len(self.taken) < 2:
                if connected is not None:
                    connected.append(trio.current_time())
                lsock = sockets[len(self.clients) % len(sockets)]
                self.clients.append(socket.create_connection(lsock.getsockname()))
            await trio.sleep(0.0015)  # a session's turn-around
            each_turn()

    async def trickle(self, lsock: socket.socket) -> float:
        """Two at once (gathering begins), then one a window (so each window grows
        to its cap): how long the last one waited to be taken."""
        await self.connect(lsock, 2)
        await self.connect(lsock, 1)
        start = await self.connect(lsock, 1)
        return self.taken[-1][0] - start

    def close(self) -> None:
        for sock in [s for _, s in self.taken] + self.clients + self.listeners:
            sock.close()


@contextlib.contextmanager
def _arrivals() -> Iterator[_Arrivals]:
    arrivals = _Arrivals()
    try:
        yield arrivals
    finally:
        arrivals.close()


class _Batches:
    """A Batching that records when the loop's batches begin and end."""

    def __init__(self) -> None:
        self.deferring = False
        self.ends = 0

    def defer(self) -> None:
        self.deferring = True

    def write_deferred(self) -> None:
        self.deferring = False
        self.ends += 1


async def test_each_wake_up_is_one_batch_for_the_event_writer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Every client is accepted inside a batch (its events wait), and every wait
    # of the loop comes after the batch's end (they went out): shell/eventlog.py.
    batches = _Batches()
    inside: list[bool] = []
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(GATHER_MIN_BACKLOG)
    lsock.setblocking(False)

    def accepted(sock: socket.socket, _addr: tuple[object, ...], _lst: Listener) -> None:
        inside.append(batches.deferring)
        sock.close()

    clients: list[socket.socket] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    accept_loop,
                    Listener(lsock, Listen("127.0.0.1", 0)),
                    accepted,
                    lambda *_: None,
                    batching=batches,
                )
            )
            for count in (1, 2, 5, ACCEPT_BATCH + 3, 1):
                await trio.sleep(1)
                clients += [socket.create_connection(lsock.getsockname()) for _ in range(count)]
                with trio.fail_after(10):
                    while len(inside) < len(clients):
                        await trio.sleep(0.001)
                assert not batches.deferring  # the loop waits again: its batch went out
            nursery.cancel_scope.cancel()
    finally:
        for c in clients:
            c.close()
        lsock.close()
    assert inside == [True] * len(clients)
    assert batches.ends >= 6 and not batches.deferring


def _timerfds() -> int:
    """This process's timerfds, as the kernel lists its descriptors."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[timerfd]"
    return count


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
async def test_under_the_real_clock_the_windows_wait_on_the_kernel_timer() -> None:
    # trio's own clock: the loop waits for a timerfd (service/tcptune.py's
    # WakeTimer), which a virtual clock could not drive: one is open while the
    # loop runs, and closed when it ends. A burst is still gathered, and the
    # next clients are taken once the window is over, never before (only that
    # bound is asserted: the real clock runs late, not early).
    before = _timerfds()
    with _arrivals() as a:
        lsock = a.listener()
        taken = a.taken
        async with trio.open_nursery() as nursery:
            a.serve(nursery, lsock)
            await trio.testing.wait_all_tasks_blocked()
            assert _timerfds() == before + 1
            await a.connect(lsock, 2)
            burst = taken[1][0]  # the loop began its window then
            await a.connect(lsock, 10)
            assert min(t for t, _ in taken[2:]) >= burst + GATHER_MIN * 0.99
            for _ in range(3):  # window after window, each on the timer
                await a.connect(lsock, 3)
            assert len(taken) == 21
            nursery.cancel_scope.cancel()
    assert _timerfds() == before


async def test_one_client_at_a_time_is_taken_at_once_and_a_burst_is_gathered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with _arrivals() as a:
        lsock = a.listener()
        taken = a.taken
        async with trio.open_nursery() as nursery:
            a.serve(nursery, lsock)
            await trio.sleep(1)
            # A quiet listener: each client, alone in the queue, is taken when it comes.
            for _ in range(3):
                start = await a.connect(lsock, 1)
                assert taken[-1][0] - start < GATHER / 10
                await trio.sleep(1)
            # A burst: two or more waiting, so the loop then sleeps (GATHER_MIN to
            # GATHER) before it takes the next ones, gathered meanwhile (all of them).
            await a.connect(lsock, 2)
            burst = taken[4][0]  # the loop began its sleep then
            await a.connect(lsock, 20)
            late = [t for t, _ in taken[5:]]
            assert burst + GATHER_MIN * 0.99 <= min(late) <= burst + GATHER * 1.01
            assert max(late) - min(late) < GATHER_MIN  # gathered: taken in one go
            # Quiet again: past one gathered wake-up that found nobody, at once.
            await trio.sleep(1)
            start = await a.connect(lsock, 1)
            assert taken[-1][0] - start < GATHER / 10
            # A flood (a wake-up's worth of ACCEPT_BATCH or more) turns gathering
            # off for FLOOD_PAUSE: two at once, then three more, each taken at once.
            await trio.sleep(1)
            await a.connect(lsock, ACCEPT_BATCH + 6)
            await a.connect(lsock, 2)
            start = await a.connect(lsock, 3)
            assert all(t - start < GATHER / 10 for t, _ in taken[-3:])
            assert start < taken[26][0] + FLOOD_PAUSE
            nursery.cancel_scope.cancel()


async def test_clients_that_wait_for_the_windows_are_soon_taken_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Two connections at a time, each opened when the one before is taken, as a
    # relay flushing its queue opens them: two a window, however long the window.
    # The loop gathers at first, then its probe finds them waiting (core/gathering.py).
    with _arrivals() as a:
        lsock = a.listener()
        connected: list[float] = []
        async with trio.open_nursery() as nursery:
            a.serve(nursery, lsock)
            await trio.sleep(1)
            start = trio.current_time()
            await a.sessions((lsock,), start + 1.2, connected)
            nursery.cancel_scope.cancel()
        waits = [
            (at - start, taken - at) for at, (taken, _) in zip(connected, a.taken, strict=False)
        ]
        early = [w for at, w in waits if at < PROBE_FIRST]
        late = [w for at, w in waits if at > PROBE_FIRST + 2 * PROBE_SPAN_LONGEST]
        assert max(early) > GATHER / 2  # gathered at first
        assert late and max(late) < GATHER_MIN / 2  # then each taken at once


async def test_the_lead_that_finds_clients_waiting_keeps_the_lead_and_takes_all_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The same clients, coming to two workers' sockets, and the worker that
    # leads finds them waiting: it keeps the lead through the lean and takes
    # every socket's clients at once. (Had it let the lead go, the other
    # worker, which has not found them waiting, would gather them again until
    # a probe of its own: here nobody serves that socket, and its clients
    # would wait for the lead's FOLLOW_CHECK.)
    with _arrivals() as a, _lead_pipe(free=True) as (token, give_back):
        connected: list[float] = []
        async with trio.open_nursery() as nursery:
            # two at once: it gathers, and takes the lead
            own, theirs, start = await a.take_the_lead(nursery, token, give_back)
            connected += [start, start]
            held: list[tuple[float, bool]] = []
            # The probe begins on a tick of the host's clock (core/gathering.py),
            # so it can end as late as about 1.25 s in: 1.5 s are in the lean.
            await a.sessions(
                (own, theirs),
                start + 1.5,
                connected,
                lambda: held.append((trio.current_time() - start, waiting_bytes(token) == 0)),
            )
            waits = [
                (at - start, taken - at) for at, (taken, _) in zip(connected, a.taken, strict=False)
            ]
            # Still in the lean, a flood: every worker takes its own at once.
            assert waiting_bytes(token) == 0
            await a.connect(own, ACCEPT_BATCH)
            flooded = waiting_bytes(token) == 1
            nursery.cancel_scope.cancel()
        early = [w for at, w in waits if at < PROBE_FIRST]
        late = [w for at, w in waits if at > PROBE_FIRST + 2 * PROBE_SPAN_LONGEST]
        # the lead kept through the lean, and every socket's clients at once
        assert all(h for at, h in held if at > PROBE_FIRST + 2 * PROBE_SPAN_LONGEST)
        assert max(early) > GATHER / 2  # gathered at first
        assert len(late) > 100 and max(late) < GATHER_MIN / 2  # then each taken at once
        assert flooded  # and a flood let it go


@pytest.mark.parametrize("change", ["relaying", "no room"])
async def test_the_lead_in_a_lean_lets_the_lead_go_when_it_relays_or_runs_out_of_room(
    autojump_clock: trio.testing.MockClock, change: str
) -> None:
    # Taking every socket's clients at once through a lean (Role.AT_ONCE), the
    # lead lets the lead go at the first wake-up after a session is relayed
    # (the windows end, and so does the lean: Gathering.at_once_until) or after
    # its room runs out (a worker without room neither takes nor keeps it):
    # each worker then takes its own clients.
    relaying, roomy = [0], [True]
    with _arrivals() as a, _lead_pipe(free=True) as (token, give_back):
        async with trio.open_nursery() as nursery:
            own, theirs, start = await a.take_the_lead(
                nursery, token, give_back, lambda: roomy[0], lambda: relaying[0]
            )
            await a.sessions((own, theirs), start + 1.5)  # the lean test's, into the lean
            with trio.fail_after(1):
                while len(a.taken) < len(a.clients):
                    await trio.sleep(0.0005)
            assert waiting_bytes(token) == 0  # in the lean, with the lead
            in_lean = await a.connect(theirs, 1)
            assert a.taken[-1][0] - in_lean < GATHER_MIN / 2  # every socket's, at once
            if change == "relaying":
                relaying[0] = 1
            else:
                roomy[0] = False
            start = await a.connect(own, 1)  # the next wake-up: given back
            assert a.taken[-1][0] - start < GATHER_MIN / 2
            assert waiting_bytes(token) == 1
            taken = len(a.taken)
            a.clients.append(socket.create_connection(theirs.getsockname()))
            await trio.sleep(1)
            assert len(a.taken) == taken  # the other worker's clients are its own now
            nursery.cancel_scope.cancel()


async def test_while_sessions_are_relayed_or_on_a_short_queue_the_loop_never_gathers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with _arrivals() as a:
        relayed, short = a.listener(), a.listener(GATHER_MIN_BACKLOG - 1)
        async with trio.open_nursery() as nursery:
            a.serve(nursery, relayed, relaying=3)  # sessions being relayed
            a.serve(nursery, short, backlog=GATHER_MIN_BACKLOG - 1)
            await trio.sleep(1)
            for lsock in (relayed, short):
                for count in (2, 5):  # two at once, then more: each taken when it comes
                    start = await a.connect(lsock, count)
                    assert all(t - start < GATHER_MIN / 2 for t, _ in a.taken[-count:])
            nursery.cancel_scope.cancel()


async def test_a_worker_that_holds_the_lead_gathers_with_one_process_s_windows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The server's own accept loop, as a worker of --workers 2 runs it: the
    # worker that holds the lead takes every worker's clients, so its windows
    # are one process's (GATHER), not longer for a share of the clients.
    receiver = Receiver()
    settings = Settings(
        backend=Backend("127.0.0.1", 9),
        listen=(Listen("127.0.0.1", 0),),
        syslog=SyslogTarget("udp", host="127.0.0.1", port=await receiver.bind()),
        no_cache=True,
        workers=2,
    )
    server = await open_server(settings, EventLog.from_settings(settings))
    with _arrivals() as a, _lead_pipe(free=True) as (token, give_back):
        server.intake.accepted = a.accepted  # type: ignore[method-assign,assignment]  # when taken
        server.listeners[0].lead = Lead(token, give_back, [])
        lsock = server.listeners[0].sock
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            await trio.sleep(1)
            waited = await a.trickle(lsock)
            assert GATHER / 2 < waited <= GATHER * 1.01
            assert waiting_bytes(token) == 0  # it held the lead meanwhile
            nursery.cancel_scope.cancel()


def test_acceptor_gives_none_when_no_client_waits_and_oserror_for_a_bad_fd() -> None:
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        lsock.setblocking(False)
        assert Acceptor(lsock.fileno()).accept() is None
    with pytest.raises(OSError) as info:
        Acceptor(-1).accept()
    assert info.value.errno == errno.EBADF


async def test_a_v6_listener_reports_the_peer_as_text() -> None:
    try:
        lsock = socket.socket(socket.AF_INET6)
        lsock.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    with lsock:
        lsock.listen()
        with socket.create_connection(lsock.getsockname()[:2]) as c:
            accepted = None
            with trio.fail_after(10):
                while accepted is None:
                    accepted = Acceptor(lsock.fileno()).accept()
                    await trio.sleep(0.01)
            fd, addr = accepted
            os.close(fd)
            assert addr == ("::1", c.getsockname()[1])


def test_the_retried_errors_are_about_one_client_never_the_listener() -> None:
    for persistent in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK, errno.EFAULT):
        assert persistent not in RETRY_ERRNOS
    assert {errno.ECONNABORTED, errno.EINTR, errno.EPROTO} <= RETRY_ERRNOS


@contextlib.contextmanager
def _lead_pipe(free: bool) -> Iterator[tuple[int, int]]:
    """A lead's pipe as process/workers.py makes it: holding the token if `free`."""
    token, give_back = os.pipe()
    os.set_blocking(token, False)
    os.set_blocking(give_back, False)
    if free:
        os.write(give_back, LEAD_TOKEN)
    try:
        yield token, give_back
    finally:
        os.close(token)
        os.close(give_back)


async def test_the_lead_takes_every_workers_clients_in_its_windows_and_lets_go_when_quiet(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One worker's loop (the other worker, whose socket is `theirs`, follows):
    # a burst on its own socket starts gathering, so it takes the lead, and its
    # windows take the clients waiting on the other worker's socket too.
    with _arrivals() as a, _lead_pipe(free=True) as (token, give_back):
        async with trio.open_nursery() as nursery:
            _, theirs, _ = await a.take_the_lead(nursery, token, give_back)
            burst = a.taken[1][0]
            assert waiting_bytes(token) == 0  # the lead is this worker's
            await a.connect(theirs, 3)
            late = [t for t, _ in a.taken[2:]]
            assert burst + GATHER_MIN * 0.99 <= min(late) <= burst + GATHER * 1.01
            assert max(late) - min(late) < GATHER_MIN  # in one window
            # Quiet: a window that brings nobody ends the gathering, and the lead
            # is given back; the other worker's clients are its own again.
            await trio.sleep(1)
            assert waiting_bytes(token) == 1
            a.clients.append(socket.create_connection(theirs.getsockname()))
            await trio.sleep(1)
            assert len(a.taken) == 5
            nursery.cancel_scope.cancel()
        assert waiting_bytes(token) == 1


async def test_a_worker_follows_while_another_holds_the_lead_and_listens_once_it_is_let_go(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The lead is taken (not in the pipe): its holder takes this worker's clients
    # in its windows, so this one does not listen, even for a lone client, which
    # would cost it a wake-up each; it looks at its own socket every
    # FOLLOW_CHECK all the same (a lead that is stopped takes nobody's). Once the
    # lead is given back, it listens again.
    with _arrivals() as a, _lead_pipe(free=False) as (token, give_back):
        async with trio.open_nursery() as nursery:
            own, _ = a.serve_leading(nursery, token, give_back)
            await trio.sleep(FOLLOW_CHECK * 2.5)
            start = await a.connect(own, 1)  # waits for the next check
            assert FOLLOW_CHECK / 4 < a.taken[0][0] - start <= FOLLOW_CHECK * 1.01
            await trio.sleep(FOLLOW_CHECK / 2)  # mid-way to the next check
            a.clients.append(socket.create_connection(own.getsockname()))
            await trio.sleep(FOLLOW_CHECK / 10)
            assert len(a.taken) == 1  # left to the lead's windows
            let_go = trio.current_time()
            os.write(give_back, LEAD_TOKEN)
            with trio.fail_after(1):
                while len(a.taken) < 2:
                    await trio.sleep(0.0001)
            assert a.taken[1][0] - let_go < GATHER_MIN
            assert waiting_bytes(token) == 1  # not gathering: it did not take the lead
            start = await a.connect(own, 1)
            assert a.taken[-1][0] - start < GATHER / 10  # listening: at once
            nursery.cancel_scope.cancel()


async def test_a_flood_on_the_leads_own_socket_gives_the_lead_back_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A socket that never empties never ends the lead's wake-up, and with it
    # the others' wait: at ACCEPT_BATCH clients in a wake-up (a flood, core/
    # gathering.py) the lead goes back, and each worker takes its own.
    with _arrivals() as a, _lead_pipe(free=True) as (token, give_back):
        async with trio.open_nursery() as nursery:
            own, theirs, _ = await a.take_the_lead(nursery, token, give_back)
            assert waiting_bytes(token) == 0
            a.clients += [socket.create_connection(theirs.getsockname()) for _ in range(3)]
            a.clients += [socket.create_connection(own.getsockname()) for _ in range(80)]
            await trio.sleep(1)
            assert waiting_bytes(token) == 1  # given back in the flood
            # Its own, all of them; of the other worker's, none: no lead since.
            assert len(a.taken) == 2 + 80
            nursery.cancel_scope.cancel()


async def test_a_worker_without_room_neither_takes_nor_keeps_the_lead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The clients a worker takes stay its own (held, in a program, in an
    # enforce session), and its limits are its own: with less than half of one
    # free it leaves the lead to a worker with room.
    roomy = [True]
    with _arrivals() as a, _lead_pipe(free=True) as (token, give_back):
        async with trio.open_nursery() as nursery:
            own, theirs = a.serve_leading(nursery, token, give_back, room=lambda: roomy[0])
            await trio.sleep(1)
            await a.connect(own, 2)
            assert waiting_bytes(token) == 0  # room: it leads
            roomy[0] = False
            await a.connect(own, 1)  # the next wake-up: given back
            assert waiting_bytes(token) == 1
            await trio.sleep(1)
            await a.connect(own, 2)  # would gather: but takes no lead
            assert waiting_bytes(token) == 1
            a.clients.append(socket.create_connection(theirs.getsockname()))
            await trio.sleep(1)
            assert len(a.taken) == 5  # the other worker's client is not taken here
            nursery.cancel_scope.cancel()


def test_a_lead_given_back_after_the_parent_restored_one_leaves_one() -> None:
    # A worker died while another held the lead: the parent, which cannot tell
    # who held it, put one back (restore_lead). The holder's release keeps one.
    with _lead_pipe(free=True) as (token, give_back):
        lead = Lead(token, give_back, [])
        assert lead.claim() and lead.holds
        assert not Lead(token, give_back, []).claim()  # one worker at a time
        restore_lead(token, give_back)  # empty: a byte goes back
        assert waiting_bytes(token) == 1
        lead.release()
        assert not lead.holds
        assert waiting_bytes(token) == 1
        restore_lead(token, give_back)  # free already: nothing more
        assert waiting_bytes(token) == 1
        lead.release()  # not held: nothing given back
        assert waiting_bytes(token) == 1


def test_a_lead_given_back_never_takes_one_out_of_the_pipe() -> None:
    # Two workers may hold a lead each (the parent put one back while one was
    # held). A release that trimmed the pipe back to one byte could, with two
    # releases at once (both write, both see two, both take one), leave none:
    # every worker would then follow nobody for good. A release only ever
    # adds a byte, and only to an empty pipe; a second lead goes away so.
    with _lead_pipe(free=True) as (token, give_back):
        first, second = Lead(token, give_back, []), Lead(token, give_back, [])
        assert first.claim()
        restore_lead(token, give_back)
        assert second.claim()
        os.write(give_back, LEAD_TOKEN * 2)  # as if two more had been given back
        first.release()
        assert waiting_bytes(token) == 2  # nothing added, nothing taken
        os.read(token, 2)
        second.release()  # the last one: back in the pipe
        assert waiting_bytes(token) == 1


def _lowest_free_fd() -> int:
    fd = os.dup(0)  # the kernel gives the lowest free number
    os.close(fd)
    return fd


async def test_a_lead_out_of_descriptors_gives_the_lead_back_while_it_pauses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # EMFILE is this worker's limit, not the others': holding the lead through
    # its pause would leave their sockets' clients waiting for nobody.
    paused: list[OSError] = []
    with _arrivals() as a, _lead_pipe(free=True) as (token, give_back):
        own, theirs = a.listener(), a.listener()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                accept_loop,
                Listener(own, Listen("127.0.0.1", 0), lead=Lead(token, give_back, [theirs])),
                a.accepted,
                lambda _lst, exc: paused.append(exc),
            )
            await trio.sleep(1)
            await a.connect(own, 2)
            assert waiting_bytes(token) == 0  # gathering: the lead is this worker's
            late = socket.socket()
            a.clients.append(late)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(), hard))
            try:
                late.connect(theirs.getsockname())
                with trio.fail_after(1):
                    while not paused:
                        await trio.sleep(0.001)
                assert paused[0].errno == errno.EMFILE
                assert waiting_bytes(token) == 1  # given back for the pause
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await trio.sleep(1)
            assert len(a.taken) == 2  # the other worker's client is its own again
            nursery.cancel_scope.cancel()


async def test_a_lead_without_a_set_of_every_socket_accepts_all_the_same(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The set the lead waits on through a probe or a lean is a descriptor: out
    # of them when the loop starts, it does without (it gathers, and lets the
    # lead go for a probe or a lean) instead of ending the worker as a broken
    # listener would.
    with _arrivals() as a, _lead_pipe(free=True) as (token, give_back):
        own, theirs = a.listener(), a.listener()
        async with trio.open_nursery() as nursery:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (_lowest_free_fd(), hard))
            try:
                nursery.start_soon(
                    accept_loop,
                    Listener(own, Listen("127.0.0.1", 0), lead=Lead(token, give_back, [theirs])),
                    a.accepted,
                    lambda _lst, exc: None,
                )
                await trio.sleep(0.5)  # the loop has begun, without its set
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            await a.connect(own, 2)
            assert waiting_bytes(token) == 0  # gathering, with the lead
            await a.connect(theirs, 1)  # the other worker's socket: the lead's windows
            assert len(a.taken) == 3
            nursery.cancel_scope.cancel()


def test_a_timer_given_up_leaves_the_set_of_every_socket() -> None:
    # An expired timer nobody reads keeps the set readable: had the loop kept it
    # there after giving the timer up, every wait on the set would end at once.
    with _arrivals() as a, _lead_pipe(free=True) as (token, give_back):
        own, theirs = a.listener(), a.listener()
        timer = WakeTimer.open()
        if timer is None:
            pytest.skip("no timerfd here")
        try:
            everyone = _every_socket(own, Lead(token, give_back, [theirs]), timer)
            assert everyone is not None
            timer.arm(0.001)
            time.sleep(0.01)
            assert select.select([everyone.fileno()], [], [], 0)[0]  # the expiry
            _drop_timer(everyone, timer)
            assert not select.select([everyone.fileno()], [], [], 0)[0]
            everyone.close()
        finally:
            timer.close()


def test_a_worker_takes_its_lead_from_the_parent_and_tunes_the_siblings() -> None:
    # process/workers.py's REPELD_LEAD_FDS, as the parent writes it: the lead's
    # pipe and the other workers' sockets, kept from any --exec program, and
    # each sibling tuned as the worker's own listener is (its clients are taken
    # by the lead, maybe before its own worker has started).
    with _arrivals() as a, _lead_pipe(free=True) as (token, give_back):
        own, theirs, unknown = a.listener(), a.listener(), a.listener()
        lst = Listener(own, Listen("127.0.0.1", 0))
        fds = [os.dup(fd) for fd in (token, give_back, theirs.fileno())]
        strays = [os.dup(fd) for fd in (token, give_back)]
        for fd in fds + strays:
            os.set_inheritable(fd, True)
        env = {
            LEAD_ENV: f"{own.fileno()}:{fds[0]}:{fds[1]}:{fds[2]},"
            f"{unknown.fileno()}:{strays[0]}:{strays[1]}"
        }
        tuned: list[int] = []
        assert attach_leads([lst], lambda sock: tuned.append(sock.fileno()), env) == 1
        assert LEAD_ENV not in env
        assert lst.lead is not None and [s.fileno() for s in lst.lead.siblings] == [fds[2]]
        assert tuned == [fds[2]]
        assert not any(os.get_inheritable(fd) for fd in fds)
        for fd in strays:  # no listener of this worker's: closed
            with pytest.raises(OSError):
                os.fstat(fd)
        assert lst.lead.claim()
        lst.lead.close()
        assert waiting_bytes(token) == 1
        os.close(fds[0])
        os.close(fds[1])


async def test_the_server_has_room_to_lead_until_half_its_held_places_are_taken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    receiver = Receiver()
    settings = Settings(
        backend=Backend("127.0.0.1", 9),
        listen=(Listen("127.0.0.1", 0),),
        syslog=SyslogTarget("udp", host="127.0.0.1", port=await receiver.bind()),
        no_cache=True,
        max_held=4,
        max_per_client=10,
        workers=2,
    )
    server = await open_server(settings, EventLog.from_settings(settings))
    clients: list[socket.socket] = []
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            assert server._room()
            address = server.listeners[0].sock.getsockname()
            for held in (1, 2):
                clients.append(socket.create_connection(address))
                with trio.fail_after(5):
                    while len(server.pen) < held:
                        await trio.sleep(0.01)
            assert not server._room()  # 2 of 4: half taken
            nursery.cancel_scope.cancel()
    finally:
        for c in clients:
            c.close()


async def test_the_lead_lets_the_lead_go_at_its_probes_end_when_the_clients_stop() -> None:
    # The real clock and the kernel's timer: the lead's probe waits for a
    # client on every worker's socket at once, and for the timer armed at the
    # probe's end. Clients that stop in the middle of the probe leave it
    # nothing to wake it but the timer: without it the lead would sleep with
    # the lead until the next client, however late, and the other workers
    # would take their clients only each FOLLOW_CHECK.
    with _arrivals() as a, _lead_pipe(free=True) as (token, give_back):
        async with trio.open_nursery() as nursery:
            own, theirs = a.serve_leading(nursery, token, give_back)
            await trio.sleep(0.05)
            # Begin a quarter period off the ticks, so that the first probe's
            # tick is known: the first multiple of PROBE_FIRST at least
            # PROBE_FIRST after the start.
            await trio.sleep((0.25 - time.monotonic() % PROBE_FIRST) % PROBE_FIRST)
            begun = time.monotonic()
            due = math.ceil((begun + PROBE_FIRST) / PROBE_FIRST) * PROBE_FIRST
            await a.connect(own, 2)
            sockets = (own, theirs)
            # Into the probe, with too few clients in it (PROBE_MIN) to find a
            # lean or to gather on at its end: it lets the lead go then. (Many,
            # on a box slow enough that the windows before looked slower still,
            # were a lean, held as long as clients come and PROBE_FIRST more.)
            while time.monotonic() < due + 0.02:
                arrived = trio.current_time()
                await a.connect(sockets[len(a.clients) % 2], 1)
                await trio.sleep(max(0.0, 0.004 - (trio.current_time() - arrived)))
            stopped = time.monotonic()
            assert not waiting_bytes(token)  # the probe holds the lead
            with trio.fail_after(5):
                while not waiting_bytes(token):
                    await trio.sleep(0.005)
            released = time.monotonic()
            nursery.cancel_scope.cancel()
        # let go at the probe's end, PROBE_SPAN_LONGEST after its tick (or, had
        # a stall moved the probe on, at the next window, which brings nobody)
        assert released < due + PROBE_SPAN_LONGEST + 0.1
        assert released - stopped < PROBE_SPAN_LONGEST + 0.05


async def test_the_lead_keeps_the_lead_through_its_probe_and_looks_at_every_socket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Clients every 2.5 ms on two workers' sockets: windows under half full, so
    # the lead probes. It probes for all (core/gathering.py's Role.AT_ONCE): it
    # keeps the lead, and takes every socket's clients at once (within 1.5 ms
    # here: the clients' own steps), and when the probe ends with the clients still coming it gathers on
    # in windows, the lead still its own. (A probe of its own socket alone gave
    # the lead back as it began, and the clients before it waited for 10 ms
    # windows; a probe that gave it back at its end let every worker take its
    # own clients at once.)
    with _arrivals() as a, _lead_pipe(free=True) as (token, give_back):
        arrived: list[float] = []
        released = False
        async with trio.open_nursery() as nursery:
            own, theirs, _ = await a.take_the_lead(nursery, token, give_back)
            start = trio.current_time()
            # The first probe begins on a tick PROBE_FIRST to 2 * PROBE_FIRST
            # after the start and lasts PROBE_SPAN_LONGEST; the next is due
            # 2 * PROBE_FIRST after the first at the soonest: the clients stop
            # before it, with windows between the two.
            while trio.current_time() < start + 3 * PROBE_FIRST - 0.05:
                for lsock in (own, theirs):
                    arrived.append(trio.current_time())
                    a.clients.append(socket.create_connection(lsock.getsockname()))
                    await trio.sleep(0.0025)
                released = released or waiting_bytes(token) > 0
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        taken = sorted(t for t, _ in a.taken[2:])
        waits = [(at, t - at) for at, t in zip(arrived, taken, strict=False)]
        # The probe: the longest run of clients each taken within 1.5 ms.
        runs: list[list[tuple[float, float]]] = [[]]
        for at, wait in waits:
            if wait < 0.0015:
                runs[-1].append((at, wait))
            elif runs[-1]:
                runs.append([])
        probe = max(runs, key=len)
        began, ended = probe[0][0], probe[-1][0]
        assert ended - began > PROBE_SPAN_LONGEST - 0.05  # polled, every socket
        before = [w for at, w in waits if at < began]
        after = [w for at, w in waits if at > ended]
        assert max(before) > GATHER / 2  # before it: windows
        assert after and max(after) > GATHER / 2  # after it: windows again, at once
        assert not released  # and the lead kept all along

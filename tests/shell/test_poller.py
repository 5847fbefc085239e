"""poller.watch, the loop the pen and the relay pool run, on a real readiness set."""

from __future__ import annotations

import math
import socket
import sys

import pytest
import trio
import trio.testing

from repeld.shell.poller import IN, Poller, watch


@pytest.mark.parametrize(
    ("found", "served"),
    [
        ([1, 1, 1, 0, 1], 4),  # until the first call that found none
        ([1] * 20, 6),  # at most `again` (5) more
        ([0], 1),  # a wake-up that found none is not repeated
    ],
)
async def test_a_busy_set_is_served_again_before_going_back_to_trio(
    autojump_clock: trio.testing.MockClock, found: list[int], served: int
) -> None:
    poller = Poller()
    a, b = socket.socketpair()
    poller.update(a.fileno(), 0, IN)
    calls: list[int] = []

    def serve(now: float) -> int:
        ready = poller.ready(8)
        if ready:
            a.recv(100)  # level-triggered: what is read is not reported again
        calls.append(len(ready))
        return found[len(calls) - 1] if len(calls) <= len(found) else 0

    scopes: list[trio.CancelScope | None] = []
    with a, b:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, poller, lambda now: math.inf, serve, scopes.append, 5)
            await trio.sleep(1)
            assert calls == []  # nothing ready: no call
            b.send(b"x")
            await trio.sleep(1)
            # served once, then again while serve says it found some
            assert calls == [1] + [0] * (served - 1)
            nursery.cancel_scope.cancel()
    assert scopes[-1] is None
    poller.close()


async def test_the_next_deadline_wakes_the_loop_and_a_new_scope_is_made(
    autojump_clock: trio.testing.MockClock,
) -> None:
    poller = Poller()
    deadlines = [5.0, 12.0, math.inf]
    expired: list[float] = []

    def expire(now: float) -> float:
        while deadlines[0] <= now:
            expired.append(now)
            deadlines.pop(0)
        return deadlines[0]

    scopes: list[trio.CancelScope | None] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch, poller, expire, lambda now: 0, scopes.append)
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    assert expired == [pytest.approx(5.0), pytest.approx(12.0)]
    # one scope per deadline that fired, then the one cancelled, then None
    assert len([s for s in scopes if s is not None]) == 3
    assert scopes[-1] is None
    poller.close()


# -- the rule in poller.py: no registered socket duplicated; out of the set before close --

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="epoll's close semantics")


def test_a_registered_socket_closed_for_good_gives_no_stale_events() -> None:
    poller = Poller()
    a, b = socket.socketpair()
    with b:
        poller.update(a.fileno(), 0, IN)
        b.send(b"x")
        assert poller.ready(8) == [(a.fileno(), select_in())]
        a.close()  # the only reference: the description leaves the set with it
        assert poller.ready(8) == []  # its unread byte is reported no more
    poller.close()


def test_a_reused_fd_number_gets_no_events_meant_for_its_old_socket() -> None:
    poller = Poller()
    a, b = socket.socketpair()
    old_fd = a.fileno()
    poller.update(old_fd, 0, IN)
    poller.update(old_fd, IN, 0)  # out of the set...
    a.close()  # ...then closed
    b.close()  # the old peer hangs up: nothing may report it
    c, d = socket.socketpair()
    with c, d:
        reused = c if c.fileno() == old_fd else d
        assert reused.fileno() == old_fd  # the lowest free number comes back
        other = d if reused is c else c
        assert poller.ready(8) == []  # not registered: no events at all
        poller.update(old_fd, 0, IN)  # now the new socket is watched on that number
        assert poller.ready(8) == []  # and nothing of the old one's end of file
        other.send(b"new")
        assert poller.ready(8) == [(old_fd, select_in())]
        assert reused.recv(10) == b"new"
        poller.update(old_fd, IN, 0)
    poller.close()


@linux_only
def test_why_the_rule_exists_a_duplicated_registered_socket_is_reported_after_close() -> None:
    """What the rule prevents: epoll watches the open description, so a copy
    (a dup, a forked child's fd table) keeps a closed fd number reported."""
    poller = Poller()
    a, b = socket.socketpair()
    fd = a.fileno()
    poller.update(fd, 0, IN)
    copy = a.dup()
    a.close()  # no EPOLL_CTL_DEL first
    with b, copy:
        b.send(b"x")
        assert poller.ready(8) == [(fd, select_in())]  # stale: fd is closed
        assert poller.ready(8) == [(fd, select_in())]  # level-triggered: again and again
        copy.close()  # the last reference: now it is gone
        assert poller.ready(8) == []
    poller.close()


def select_in() -> int:
    """What ready() reports for a readable socket (EPOLLIN, or kqueue's IN)."""
    return IN

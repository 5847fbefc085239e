"""poller.watch, the loop the pen and the relay pool run, on a real readiness set."""

from __future__ import annotations

import math
import socket

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

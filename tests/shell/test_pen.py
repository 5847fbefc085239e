"""The holding pen's failure path, on real loopback sockets: a verdict handler
that raises is reported through `on_error` and never takes the pen down."""

from __future__ import annotations

import socket

import trio
import trio.testing

from repeld.core.events import ConnInfo
from repeld.core.hold import EarlyTalk, Hold, Verdict
from repeld.shell.pen import Held, HoldingPen


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

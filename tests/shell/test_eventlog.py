"""The event writer never blocks the loop: real unix, UDP-less and TCP receivers.

A syslog daemon that stops reading, disappears or was never there costs repeld
dropped (and counted) events, never a stalled accept loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from repeld.config.settings import Backend, Settings
from repeld.config.values import SyslogTarget
from repeld.core import events
from repeld.core.events import ConnInfo, Event
from repeld.core.hold import HangUp, Pass, PassReason
from repeld.core.logformat import FACILITIES, Header, format_json, format_rfc5424
from repeld.core.names import EventName, HandOffHow
from repeld.shell.eventlog import _FRAME_BATCH, RETRY_AFTER, SEND_WAIT, EventLog

from ..syslog_receiver import Received, parse


def passed(i: int) -> Event:
    """A distinct event per `i` (carried in the client port)."""
    return events.passed(ConnInfo("127.0.0.1", i % 65536, "127.0.0.1", 25),
                         Pass(PassReason.DELAY, 1.0))  # fmt: skip


def marker() -> Event:
    return events.hangup(ConnInfo("127.0.0.9", 9, "127.0.0.1", 25), HangUp(0.5, reset=False))


def _untimed(message: bytes) -> bytes:
    # The timestamp is the one thing the test cannot know in advance.
    return re.sub(rb"^(<\d+>)(1 \S+|[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d)", rb"\1TIME", message)


def roomy_udp_receiver() -> tuple[socket.socket, int]:
    """A loopback UDP receiver that a burst fits in (4 MiB of buffer), and its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return sock, sock.getsockname()[1]


async def written(log: EventLog, count: int, timeout: float) -> None:
    """Wait until `log` has written `count` events, at most `timeout` seconds."""
    with trio.fail_after(timeout):
        while log.written < count:
            await trio.sleep(0.001)


def unix_receiver(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock


@contextlib.asynccontextmanager
async def idle_writer(log: EventLog) -> AsyncIterator[None]:
    """`log`'s writer task running, connected and waiting for events, for the block."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run)
        await log.connect_now()
        await trio.testing.wait_all_tasks_blocked()
        yield
        nursery.cancel_scope.cancel()


def emit_batch(log: EventLog, *batch: Event) -> None:
    """Emit `batch` as the accept loop's wake-up does: between defer and write_deferred."""
    log.defer()
    for event in batch:
        log.emit(event)
    log.write_deferred()


def drain_now(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting in `sock` right now."""
    out: list[bytes] = []
    while True:
        try:
            out.append(sock.recv(65536, socket.MSG_DONTWAIT))
        except BlockingIOError:
            return out


# -- a receiver that never reads ----------------------------------------------------


async def test_receiver_that_never_reads_costs_drops_not_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    queue_bytes = 256 * 512  # room for about 256 messages
    ticks, per_tick, period = 100, 50, 0.1
    receiver = unix_receiver(tmp_path / "log.sock")
    log = EventLog(SyslogTarget("unix", path=str(tmp_path / "log.sock")), "rfc5424",
                   queue_bytes=queue_bytes, hostname="testhost")  # fmt: skip
    max_queued = 0
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            # This task is the event loop's heartbeat: it emits a burst, then
            # sleeps one period, a hundred times.
            started = trio.current_time()
            for tick in range(ticks):
                for i in range(per_tick):
                    log.emit(passed(tick * per_tick + i))
                max_queued = max(max_queued, log.statistics()["queued_bytes"])
                await trio.sleep(period)
            elapsed = trio.current_time() - started
            stats = log.statistics()
            # The heartbeat kept its rhythm although every send now waits
            # SEND_WAIT for a receiver that does not read ...
            assert elapsed == pytest.approx(ticks * period, abs=0.01)
            # ... and finished while the writer was still stuck with a backlog.
            assert stats["queued"] > 0
            assert max_queued <= queue_bytes
            assert log.dropped > 0
            assert log.written > 0  # what fitted in the socket before it filled up
            total = ticks * per_tick
            assert log.counts["pass"] == total
            # every event is written, dropped or queued (the one in flight too)
            assert stats["written"] + stats["dropped"] + stats["queued"] == total

            # The receiver wakes up: what it finds is well-formed, and the
            # writer gets through again.
            written_before = log.written
            early = [parse(d) for d in drain_now(receiver)]
            assert len(early) == written_before
            assert all(m.format == "rfc5424" and m.event == "pass" for m in early)
            rsock = trio.socket.from_stdlib_socket(receiver)
            later: list[Received] = []
            marked = False
            with trio.fail_after(256 * SEND_WAIT * 2):
                while not any(m.event == "hangup" for m in later):
                    if not marked and log.statistics()["queued_bytes"] < queue_bytes - 1024:
                        log.emit(marker())  # as soon as there is room for it
                        marked = True
                    later.append(parse(await rsock.recv(65536)))
            assert log.counts["hangup"] == 1
            assert all(m.host == "testhost" and m.sd_id == "repeld@32473" for m in later)
            assert later[-1].fields["client"] == "127.0.0.9"
            # the counter may lag behind
            await written(log, len(early) + len(later), 60)
            assert log.written == len(early) + len(later)  # every written message arrived
            nursery.cancel_scope.cancel()
    finally:
        receiver.close()


async def test_receiver_that_never_reads_real_time(tmp_path: Path) -> None:
    # The same in real time: the loop is never held for a send.
    receiver = unix_receiver(tmp_path / "log.sock")
    log = EventLog(SyslogTarget("unix", path=str(tmp_path / "log.sock")), queue_bytes=64 * 512,
                   hostname="testhost")  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            wall = time.monotonic()
            for tick in range(20):
                for i in range(100):
                    log.emit(passed(tick * 100 + i))
                await trio.sleep(0.02)
            # 20 heartbeats came back while each blocked send waits SEND_WAIT,
            # so the writer still has most of its backlog.
            assert log.statistics()["queued"] > 0
            assert log.dropped > 0
            assert log.statistics()["queued_bytes"] <= 64 * 512
            assert time.monotonic() - wall < 20 * SEND_WAIT  # generous: ~0.4 s expected
            # The receiver goes away: what is left is held (refused, not the
            # messages' fault), still bounded, and the writer can be stopped.
            receiver.close()
            await trio.sleep(0.1)
            assert log.statistics()["queued_bytes"] <= 64 * 512
            nursery.cancel_scope.cancel()
        # what was never sent at shutdown is counted: every event is accounted for
        assert log.statistics()["queued"] == 0
        assert log.written + log.dropped == 2000
    finally:
        receiver.close()


async def test_cancelling_the_writer_with_a_stuck_receiver_is_prompt(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    receiver = unix_receiver(tmp_path / "log.sock")
    log = EventLog(SyslogTarget("unix", path=str(tmp_path / "log.sock")), queue_bytes=256 * 512,
                   hostname="testhost")  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            for i in range(1000):
                log.emit(passed(i))
            await trio.sleep(SEND_WAIT * 3)  # the socket is full, the writer stuck
            assert log.statistics()["queued"] > 100
            cancelled_at = trio.current_time()
            nursery.cancel_scope.cancel()
        # The writer may finish the message in hand and spend flush_nowait()'s
        # budget; it must not work through the whole backlog first.
        assert trio.current_time() - cancelled_at <= 3 * SEND_WAIT
    finally:
        receiver.close()


# -- a receiver that is not there ----------------------------------------------------


async def test_missing_unix_socket_holds_events_until_it_appears(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "absent.sock"
    log = EventLog(SyslogTarget("unix", path=str(path)), hostname="testhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run)
        for i in range(10):
            log.emit(passed(i))  # never raises
        await trio.sleep(RETRY_AFTER * 5)  # several tries, all refused
        assert log.written == 0
        assert log.dropped == 0
        assert log.statistics()["queued"] == 10
        err = capsys.readouterr().err
        assert err.count("cannot connect") == 1, err  # one line per outage
        assert str(path) in err

        # The syslog daemon starts: after RETRY_AFTER the writer finds it and
        # sends what it held, in order, then what came meanwhile.
        receiver = unix_receiver(path)
        try:
            log.emit(marker())
            rsock = trio.socket.from_stdlib_socket(receiver)
            with trio.fail_after(60):
                got = [parse(await rsock.recv(65536)) for _ in range(11)]
            assert [int(g.fields["client_port"]) for g in got[:10]] == list(range(10))
            assert got[10].event == "hangup"
            # the receiver may be ahead of the counter
            await written(log, 11, 60)
            assert log.dropped == 0
        finally:
            receiver.close()
        nursery.cancel_scope.cancel()


async def test_a_restarting_syslog_daemon_costs_no_event(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The event that met the closed socket is sent again once a new one is bound."""
    path = tmp_path / "log.sock"
    receiver = unix_receiver(path)
    log = EventLog(SyslogTarget("unix", path=str(path)), hostname="testhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run)
        log.emit(passed(0))
        with trio.fail_after(60):
            first = parse(await trio.socket.from_stdlib_socket(receiver).recv(65536))
        assert first.fields["client_port"] == "0"
        # The daemon stops (its socket is closed and removed) ...
        receiver.close()
        path.unlink()
        for i in range(1, 4):
            log.emit(passed(i))  # the first meets the refused socket
            await trio.sleep(0.5)
        assert log.dropped == 0
        # ... and comes back on the same path.
        receiver = unix_receiver(path)
        try:
            rsock = trio.socket.from_stdlib_socket(receiver)
            with trio.fail_after(60):
                got = [parse(await rsock.recv(65536)) for _ in range(3)]
            assert [g.fields["client_port"] for g in got] == ["1", "2", "3"]
            await written(log, 4, 60)
            assert log.dropped == 0
        finally:
            receiver.close()
        nursery.cancel_scope.cancel()


def _reserved_udp_port() -> socket.socket:
    """A loopback UDP port that nobody receives on (datagrams to it are refused, ICMP
    port unreachable) and nobody else can take: bound with SO_REUSEADDR and
    connected elsewhere, so that only a receiver bound later with SO_REUSEADDR
    gets what is sent to it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.connect(("127.0.0.1", 9))
    return sock


def _udp_receiver(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


async def test_a_udp_port_nobody_listens_on_is_tried_again_later_not_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """UDP cannot tell a datagram was lost until the next send meets the ICMP
    port unreachable it caused. A second refusal soon after the first waits
    RETRY_AFTER, as a missing unix socket does, instead of a reconnect for every
    other event, and the events wait for the daemon (none is lost once it listens)."""
    with _reserved_udp_port() as reserved:
        port = int(reserved.getsockname()[1])
        log = EventLog(SyslogTarget("udp", host="127.0.0.1", port=port), hostname="testhost")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            for i in range(50):
                log.emit(passed(i))
                await trio.sleep(0.01)
            # Two datagrams went out into nothing (the second on the socket opened
            # after the first refusal, which may have been a stale one), then the
            # writer waits: a few at most, where it used to be every event.
            sent = log.written
            assert 2 <= sent <= 4
            assert log.dropped == 0
            assert log.statistics()["queued"] == 50 - sent
            with _udp_receiver(port) as receiver:
                rsock = trio.socket.from_stdlib_socket(receiver)
                with trio.fail_after(RETRY_AFTER * 3):
                    got = [parse(await rsock.recv(65536)) for _ in range(50 - sent)]
                assert [int(g.fields["client_port"]) for g in got] == list(range(sent, 50))
                assert log.written == 50
                assert log.dropped == 0
            nursery.cancel_scope.cancel()


async def test_a_stale_udp_refusal_holds_nothing_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A datagram lost while the daemon restarted leaves its refusal on the socket
    until the next send, however late: that lone refusal costs a reconnect, not
    RETRY_AFTER, so what is queued at a stop still reaches syslog."""
    with _reserved_udp_port() as reserved:
        port = int(reserved.getsockname()[1])
        log = EventLog(SyslogTarget("udp", host="127.0.0.1", port=port), hostname="testhost")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            with _udp_receiver(port) as receiver:
                log.emit(passed(0))
                rsock = trio.socket.from_stdlib_socket(receiver)
                with trio.fail_after(1):
                    assert parse(await rsock.recv(65536)).fields["client_port"] == "0"
            log.emit(passed(1))  # the daemon is down: into nothing
            await trio.sleep(RETRY_AFTER * 10)  # it comes back long after
            with _udp_receiver(port) as receiver:
                log.emit(passed(2))  # meets the old refusal
                log.emit(passed(3))
                rsock = trio.socket.from_stdlib_socket(receiver)
                with trio.fail_after(RETRY_AFTER / 4):  # no waiting for a retry
                    got = [parse(await rsock.recv(65536)) for _ in range(2)]
                assert [g.fields["client_port"] for g in got] == ["2", "3"]
            assert log.dropped == 0
            nursery.cancel_scope.cancel()


# -- TCP with RFC 6587 octet counting --------------------------------------------------


class OctetCountingReceiver:
    """A real TCP syslog receiver that splits RFC 6587 octet-counted frames."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.connections = 0
        self.arrived = trio.Event()
        self._scopes: list[trio.CancelScope] = []

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        listener = listeners[0]
        assert isinstance(listener, trio.SocketListener)
        task_status.started(int(listener.socket.getsockname()[1]))
        await trio.serve_listeners(self.handle, listeners)

    def kick(self) -> None:
        """Close every connection accepted so far (the receiver restarts)."""
        for scope in self._scopes:
            scope.cancel()

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        with trio.CancelScope() as scope:
            self._scopes.append(scope)
            async with stream:
                await self._frames(stream, b"")

    async def _frames(self, stream: trio.SocketStream, buf: bytes) -> None:
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            buf += chunk
            while True:
                length, sep, rest = buf.partition(b" ")
                if not sep:
                    break
                # MSG-LEN is a NONZERO-DIGIT then DIGITs (RFC 6587 3.4.1)
                assert length.isdigit() and not length.startswith(b"0"), buf[:40]
                if len(rest) < int(length):
                    break
                self.frames.append(rest[: int(length)])
                buf = rest[int(length) :]
                self.arrived.set()
                self.arrived = trio.Event()

    async def wait_frames(self, count: int) -> list[bytes]:
        with trio.fail_after(60):
            while len(self.frames) < count:
                await self.arrived.wait()
        return self.frames


@pytest.mark.parametrize("fmt", ["rfc5424", "json"])
async def test_tcp_target_uses_octet_counting(
    autojump_clock: trio.testing.MockClock, fmt: str
) -> None:
    receiver = OctetCountingReceiver()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(receiver.serve)
        log = EventLog(SyslogTarget("tcp", host="127.0.0.1", port=port), fmt,
                       facility="local3", hostname="testhost")  # fmt: skip
        nursery.start_soon(log.run)
        from repeld.core.hold import EarlyTalk

        hostile = b"EHLO x\r\n<13>1 - - - - - [fake] 999 ]\n\x00\xff"
        sent: list[Event] = [passed(i) for i in range(50)]
        sent.append(
            events.early_talker(
                ConnInfo("127.0.0.7", 7, "127.0.0.1", 25),
                EarlyTalk(len(hostile), hostile, 0.1),
                "drop",
            )
        )
        for event in sent:
            log.emit(event)
        frames = await receiver.wait_frames(len(sent))
        assert len(frames) == len(sent)
        # the receiver may be ahead of the counter
        await written(log, len(sent), 60)
        assert receiver.connections == 1
        got = [parse(f) for f in frames]
        assert [g.event for g in got] == [e.name for e in sent]
        assert all(g.format == fmt and g.facility == FACILITIES["local3"] for g in got)
        assert [int(g.fields["client_port"]) for g in got[:50]] == list(range(50))
        assert got[-1].fields["first"] == ("EHLO x\\r\\n<13>1 - - - - - [fake] 999 ]\\n\\x00\\xff")
        assert all(b"\n" not in f for f in frames)
        assert log.written == len(sent)
        assert log.dropped == 0
        # the framing is exactly LEN SP MSG with the bytes of the formatter
        header = Header(FACILITIES["local3"], "testhost", "repeld", os.getpid(), "repeld@32473")
        formatter = format_json if fmt == "json" else format_rfc5424
        assert [_untimed(f) for f in frames] == [
            _untimed(formatter(e, header, time.time())) for e in sent
        ]
        nursery.cancel_scope.cancel()


async def test_tcp_receiver_restart_keeps_framing(autojump_clock: trio.testing.MockClock) -> None:
    receiver = OctetCountingReceiver()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(receiver.serve)
        log = EventLog(SyslogTarget("tcp", host="127.0.0.1", port=port), hostname="testhost")
        nursery.start_soon(log.run)
        log.emit(passed(0))
        await receiver.wait_frames(1)
        # The receiver closes the connection (a syslog daemon restart) ...
        receiver.kick()
        # ... repeld drops what it cannot send, reconnects, and frames stay whole.
        emitted = 1
        with trio.fail_after(120):
            while receiver.connections < 2 or len(receiver.frames) < 2:
                log.emit(passed(emitted))
                emitted += 1
                await trio.sleep(0.5)
        assert all(parse(f).event == "pass" for f in receiver.frames)
        ports = [int(parse(f).fields["client_port"]) for f in receiver.frames]
        assert ports == sorted(set(ports))  # in order, none twice
        stats = log.statistics()
        assert emitted - 1 <= stats["written"] + stats["dropped"] + stats["queued"] <= emitted
        nursery.cancel_scope.cancel()


async def test_an_event_after_the_tcp_receiver_closed_is_not_lost() -> None:
    # The receiver closes the connection (a syslog daemon restarting): the
    # next send still went into the kernel, counted written, and was lost to
    # the reset that followed. The writer now asks the socket first.
    receiver = OctetCountingReceiver()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(receiver.serve)
        log = EventLog(SyslogTarget("tcp", host="127.0.0.1", port=port), hostname="testhost")
        nursery.start_soon(log.run)
        for i in range(3):
            log.emit(passed(i))
            with trio.fail_after(5):
                while len(receiver.frames) < i + 1:
                    await receiver.arrived.wait()
            receiver.kick()  # closed: its FIN reaches the writer's socket
            await trio.sleep(0.1)
        assert [int(parse(f).fields["client_port"]) for f in receiver.frames] == [0, 1, 2]
        assert (log.written, log.dropped) == (3, 0)
        assert receiver.connections == 3
        nursery.cancel_scope.cancel()


async def test_foreground_lines_and_syslog_stay_in_order_across_batches() -> None:
    # -f: the writer task writes both the stderr line and the datagram of every
    # event, many events per wake-up, and neither stream reorders or loses one.
    receiver, port = roomy_udp_receiver()
    stderr = io.StringIO()
    log = EventLog(SyslogTarget("udp", host="127.0.0.1", port=port), stderr=stderr,
                   hostname="testhost")  # fmt: skip
    total = 1000  # several of the writer's batches
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            for i in range(total):
                log.emit(passed(i))
                if i % 300 == 299:
                    await trio.sleep(0.01)
            with trio.fail_after(10):
                while log.statistics()["queued"]:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        got = [parse(d) for d in drain_now(receiver)]
    finally:
        receiver.close()
    assert log.written == total and log.dropped == 0
    assert [int(g.fields["client_port"]) for g in got] == list(range(total))
    lines = stderr.getvalue().splitlines()
    assert len(lines) == total
    ports = [re.search(r"\[127\.0\.0\.1\]:(\d+)", line) for line in lines]
    assert [int(m[1]) if m else -1 for m in ports] == list(range(total))
    assert all(" pass: " in line for line in lines)


async def test_datagrams_go_out_in_a_batch_when_the_writer_runs(tmp_path: Path) -> None:
    # emit() only queues; the writer sends what gathered, in order, in one go.
    receiver = unix_receiver(tmp_path / "log.sock")
    log = EventLog(SyslogTarget("unix", path=str(tmp_path / "log.sock")), hostname="testhost")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            await log.connect_now()
            await trio.sleep(0.01)  # the writer is idle, waiting for events
            for i in range(5):
                log.emit(passed(i))
            assert drain_now(receiver) == []  # nothing sent from emit() itself
            assert log.statistics()["queued"] == 5
            await written(log, 5, 5)
            got = [parse(d) for d in drain_now(receiver)]
            assert [int(g.fields["client_port"]) for g in got] == list(range(5))
            nursery.cancel_scope.cancel()
    finally:
        receiver.close()


class _WriterSteps(trio.abc.Instrument):
    """How often the log's writer task ran."""

    def __init__(self) -> None:
        self.count = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name.endswith("EventLog.run"):
            self.count += 1


async def test_a_deferred_batch_goes_out_from_write_deferred_and_the_writer_sleeps_on() -> None:
    # The accept loop's batch (shell/accept.py): between defer() and
    # write_deferred() emit() wakes nobody, and write_deferred() sends what came,
    # in order, there and then: the writer task never runs for it.
    receiver, port = roomy_udp_receiver()
    log = EventLog(SyslogTarget("udp", host="127.0.0.1", port=port), hostname="testhost")
    steps = _WriterSteps()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            await log.connect_now()
            await trio.testing.wait_all_tasks_blocked()  # the writer waits for events
            trio.lowlevel.add_instrument(steps)
            try:
                for batch in range(3):
                    log.defer()
                    for i in range(batch * 4, batch * 4 + 4):
                        log.emit(passed(i))
                    assert drain_now(receiver) == []
                    log.write_deferred()
                    got = [parse(d) for d in drain_now(receiver)]
                    assert [int(g.fields["client_port"]) for g in got] == list(
                        range(batch * 4, batch * 4 + 4)
                    )
                    await trio.testing.wait_all_tasks_blocked()
                # Outside a batch, emit() wakes the writer as before.
                log.emit(passed(12))
                await written(log, 13, 5)
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert drain_now(receiver) != []
            nursery.cancel_scope.cancel()
    finally:
        receiver.close()
    assert steps.count == 1  # for the last one only
    assert log.written == 13 and log.dropped == 0


async def test_a_deferred_batch_the_socket_cannot_take_yet_is_the_writers(
    tmp_path: Path,
) -> None:
    # No connection yet (the unix socket appears later): write_deferred() sends
    # nothing and leaves the batch to the writer task, which connects and sends
    # it once it can, in order, losing nothing.
    path = tmp_path / "log.sock"
    log = EventLog(SyslogTarget("unix", path=str(path)), hostname="testhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(log.run)
        await trio.testing.wait_all_tasks_blocked()
        log.defer()
        for i in range(3):
            log.emit(passed(i))
        log.write_deferred()
        assert log.written == 0 and log.statistics()["queued"] == 3
        receiver = unix_receiver(path)
        try:
            await written(log, 3, RETRY_AFTER * 3)
            got = [parse(d) for d in drain_now(receiver)]
        finally:
            receiver.close()
        nursery.cancel_scope.cancel()
    assert [int(g.fields["client_port"]) for g in got] == [0, 1, 2]
    assert log.dropped == 0


async def test_a_deferred_batch_a_full_receiver_stops_waits_whole_and_in_order(
    tmp_path: Path,
) -> None:
    # write_deferred() sends what the socket takes at once. A receiver that
    # is not reading (its queue holds 10 datagrams: net.unix.max_dgram_qlen)
    # stops the batch at the first it refuses: that one and all after it wait
    # for the writer, in order, and reach syslog once it reads again.
    path = tmp_path / "log.sock"
    receiver = unix_receiver(path)
    log = EventLog(SyslogTarget("unix", path=str(path)), hostname="testhost")
    total = 60
    try:
        async with idle_writer(log):
            emit_batch(log, *(passed(i) for i in range(total)))
            taken = log.written
            assert 0 < taken < total
            assert log.statistics()["queued"] == total - taken
            got: list[bytes] = []
            with trio.fail_after(10):
                while log.written < total:
                    got += drain_now(receiver)
                    await trio.sleep(0.001)
            got += drain_now(receiver)
    finally:
        receiver.close()
    assert [int(parse(d).fields["client_port"]) for d in got] == list(range(total))
    assert log.dropped == 0


async def test_a_deferred_batch_that_meets_a_refusal_keeps_the_refused_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The syslog daemon was down when the last datagram went out: the next
    # send in a batch meets its refusal. That datagram is no fault of its own:
    # it and the rest wait, in order, and go out on a new socket at once.
    with _reserved_udp_port() as reserved:
        port = int(reserved.getsockname()[1])
        log = EventLog(SyslogTarget("udp", host="127.0.0.1", port=port), hostname="testhost")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            with _udp_receiver(port) as receiver:
                await log.connect_now()
                await trio.testing.wait_all_tasks_blocked()
                emit_batch(log, passed(0))
                assert parse(receiver.recv(65536)).fields["client_port"] == "0"
            emit_batch(log, passed(1))  # into nothing: refused (ICMP port unreachable)
            await trio.sleep(0.05)
            with _udp_receiver(port) as receiver:
                emit_batch(log, passed(2), passed(3), passed(4))  # 2 meets 1's refusal
                assert log.written == 2 and log.statistics()["queued"] == 3
                rsock = trio.socket.from_stdlib_socket(receiver)
                with trio.fail_after(RETRY_AFTER / 4):  # no waiting for a retry
                    got = [parse(await rsock.recv(65536)) for _ in range(3)]
            assert [g.fields["client_port"] for g in got] == ["2", "3", "4"]
            assert log.written == 5 and log.dropped == 0
            nursery.cancel_scope.cancel()


async def test_a_deferred_batch_drops_only_the_datagram_too_big_to_send(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A send error that is the message's own (EMSGSIZE: past UDP's 64 KiB,
    # FreeBSD's /var/run/log's 2 KiB) drops that one, counted, and the rest of
    # the batch goes out at once, in order, on the same socket: closed, a unix
    # socket inside --chroot could not be opened again, and every event after
    # it was held for RETRY_AFTER.
    receiver, port = roomy_udp_receiver()
    log = EventLog(SyslogTarget("udp", host="127.0.0.1", port=port), hostname="testhost")
    huge = events.internal_error(None, 0.0, "x" * 70_000)
    try:
        async with idle_writer(log):
            sock = log._sock
            emit_batch(log, passed(0), huge, passed(2))
            assert (log.written, log.dropped, log.statistics()["queued"]) == (1, 1, 1)
            await written(log, 2, RETRY_AFTER / 2)
            assert log._sock is sock
            got = [parse(d) for d in drain_now(receiver)]
    finally:
        receiver.close()
    assert [g.fields["client_port"] for g in got] == ["0", "2"]
    assert log.dropped == 1


def _pass_args(i: int) -> tuple[ConnInfo, Pass, float, None, HandOffHow]:
    return (
        ConnInfo("127.0.0.1", i, "127.0.0.1", 25),
        Pass(PassReason.TRUSTED, 0.0),
        0.25,
        None,
        HandOffHow.PASS,
    )


async def test_an_event_built_later_is_counted_at_once_and_written_as_if_emitted() -> None:
    # emit_built() (the pass event of every client): counted now, built with
    # the rest of the batch when formatted, and its message byte for byte what
    # emit() of the built event writes; --metrics sees it once it is built,
    # and settle() builds every one that waits.
    receiver, port = roomy_udp_receiver()
    log = EventLog(SyslogTarget("udp", host="127.0.0.1", port=port), hostname="testhost")
    seen: list[Event] = []
    log.observe = seen.append
    try:
        async with idle_writer(log):
            log.defer()
            log.emit(events.passed(*_pass_args(1)))
            log.emit_built(EventName.PASS, events.passed, *_pass_args(2))
            log.emit_built(EventName.PASS, events.passed, *_pass_args(3))
            assert log.counts[EventName.PASS] == 3
            assert [int(str(e.get("client_port"))) for e in seen] == [1]  # not built yet
            log.settle()
            assert [int(str(e.get("client_port"))) for e in seen] == [1, 2, 3]
            log.write_deferred()
            got = drain_now(receiver)
    finally:
        receiver.close()
    assert len(got) == 3
    # Emitted built or built later, the same message (but for the client's port).
    as_emitted = _untimed(got[0]).replace(b'client_port="1"', b'client_port="2"')
    assert _untimed(got[1]) == as_emitted.replace(b"]:1 ", b"]:2 ")
    assert [p.event for p in map(parse, got)] == ["pass"] * 3
    assert log.written == 3 and log.dropped == 0


async def test_events_built_later_and_never_written_are_still_seen_and_counted(
    tmp_path: Path,
) -> None:
    # No syslog daemon, and the wait for one ends: every event still waiting is
    # counted dropped, and --metrics has seen each, built or not.
    log = EventLog(SyslogTarget("unix", path=str(tmp_path / "absent")), hostname="testhost")
    seen: list[Event] = []
    log.observe = seen.append
    for i in range(3):
        log.emit_built(EventName.PASS, events.passed, *_pass_args(i))
    await log.wait_flushed(0.05)
    assert [int(str(e.get("client_port"))) for e in seen] == [0, 1, 2]
    assert log.dropped == 3 and log.written == 0


def test_an_event_that_cannot_be_built_is_counted_dropped_and_holds_up_no_other(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A bug in a builder (here: one that raises, and one that builds another
    # event than it was named for) is found where the events are built, which
    # may be the accept loop: it never raises there. Each such event is counted
    # dropped, one stderr line says so, and the events queued after it go on.
    log = EventLog(SyslogTarget("unix", path=str(tmp_path / "absent")), hostname="testhost")

    def broken(i: int) -> Event:
        raise ValueError(f"no event {i}")

    log.emit_built(EventName.PASS, events.passed, *_pass_args(0))
    log.emit_built(EventName.PASS, broken, 1)
    log.emit_built(EventName.HANGUP, events.passed, *_pass_args(2))
    log.emit_built(EventName.PASS, events.passed, *_pass_args(3))
    log.settle()
    stats = log.statistics()
    assert stats["queued"] == 2 and stats["dropped"] == 2  # 0 and 3 wait; 1 and 2 lost
    assert log.counts[EventName.PASS] == 3 and log.counts[EventName.HANGUP] == 1
    # one line for the first; the second, within COMPLAIN_INTERVAL, only counted
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "repeld: internal error: a pass event was not written: ValueError('no event 1')"
    ]
    log.emit_built(EventName.PASS, broken, 4)
    log.settle()
    assert log.statistics()["dropped"] == 3 and capsys.readouterr().err == ""


def test_no_path_raises_a_builder_or_observer_bug_into_the_emitter(tmp_path: Path) -> None:
    # Under -f the event is built at once; under --metrics the observer sees it:
    # a bug in either costs that event (or its metrics), never the caller.
    def broken() -> Event:
        raise ValueError("no event")

    printed = EventLog(None, stderr=io.StringIO())
    printed.emit_built(EventName.PASS, broken)
    assert printed.counts[EventName.PASS] == 1 and printed.statistics()["dropped"] == 1

    def observer(event: Event) -> None:
        raise RuntimeError("metrics bug")

    observed = EventLog(SyslogTarget("unix", path=str(tmp_path / "absent")), hostname="testhost")
    observed.observe = observer
    observed.emit(marker())  # seen at once: the event still goes out
    observed.emit_built(EventName.PASS, events.passed, *_pass_args(1))  # seen when built
    observed.settle()
    assert observed.statistics()["queued"] == 2 and observed.statistics()["dropped"] == 0
    # a builder that fails while the log discards what waits (no syslog at shutdown)
    observed.emit_built(EventName.PASS, broken)
    observed._discard()
    assert observed.statistics()["dropped"] == 3  # the two queued and the broken one


def test_an_interrupt_while_building_leaves_the_rest_queued(tmp_path: Path) -> None:
    # Not a bug but ^C or the like: it goes through, and the events after wait on.
    log = EventLog(SyslogTarget("unix", path=str(tmp_path / "absent")), hostname="testhost")

    def interrupted() -> Event:
        raise KeyboardInterrupt

    log.emit_built(EventName.PASS, interrupted)
    log.emit_built(EventName.PASS, events.passed, *_pass_args(2))
    with pytest.raises(KeyboardInterrupt):
        log.settle()
    log.settle()
    assert log.statistics()["queued"] == 1 and log.statistics()["dropped"] == 1


async def test_a_broken_stderr_stops_no_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The supervisor that read repeld's stderr is gone: the line about a lost
    # event, or a failed send, is lost too, and nothing raises.
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    log = EventLog(SyslogTarget("unix", path=str(tmp_path / "absent")), hostname="testhost")

    def broken() -> Event:
        raise ValueError("no event")

    log.emit_built(EventName.PASS, broken)
    log.settle()
    log._complain("send failed", OSError("refused"))
    assert log.statistics()["dropped"] == 1


def test_an_event_for_the_foreground_is_built_at_once() -> None:
    # -f: its line is written in order with every other event's, so it is built now.
    stderr = io.StringIO()
    log = EventLog(None, stderr=stderr)
    log.emit_built(EventName.PASS, events.passed, *_pass_args(7))
    log.emit(marker())
    assert log._lines[0].endswith("pass: PASS TRUSTED [127.0.0.1]:7 after 0.000")
    assert "hangup:" in log._lines[1]


async def test_events_emitted_before_a_reload_go_out_as_they_were_emitted(
    tmp_path: Path,
) -> None:
    # The writer formats what emit() queued; a reload between the two (--log-format
    # json, --facility local3) must not reformat the events emitted before it.
    path = str(tmp_path / "log.sock")
    receiver = unix_receiver(tmp_path / "log.sock")
    before = Settings(
        backend=Backend("127.0.0.1", 9),
        syslog=SyslogTarget("unix", path=path),
        log_format="rfc5424",
    )
    after = dataclasses.replace(before, log_format="json", facility="local3")
    log = EventLog.from_settings(before)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            await log.connect_now()
            await trio.sleep(0.01)  # the writer is idle, waiting for events
            for i in range(3):
                log.emit(passed(i))
            log.reconfigure(after)  # in the same turn: nothing written yet
            for i in range(3, 5):
                log.emit(passed(i))
            assert drain_now(receiver) == []
            await written(log, 5, 5)
            got = [parse(d) for d in drain_now(receiver)]
            nursery.cancel_scope.cancel()
    finally:
        receiver.close()
    assert [int(g.fields["client_port"]) for g in got] == list(range(5))
    assert [g.format for g in got] == ["rfc5424"] * 3 + ["json"] * 2
    assert [g.facility for g in got] == [FACILITIES["mail"]] * 3 + [FACILITIES["local3"]] * 2
    assert log.dropped == 0


async def test_a_burst_longer_than_a_frame_batch_is_written_whole_and_in_order() -> None:
    # More events in one turn of the loop than emit() lets wait unformatted: it
    # formats them itself, the writer the rest; every one counted as queued at once.
    receiver, port = roomy_udp_receiver()
    log = EventLog(SyslogTarget("udp", host="127.0.0.1", port=port), hostname="testhost")
    total = 3 * _FRAME_BATCH + 7
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            await log.connect_now()
            await trio.sleep(0.01)
            for i in range(total):
                log.emit(passed(i))
            assert drain_now(receiver) == []  # nothing sent from emit() itself
            assert log.statistics()["queued"] == total
            await written(log, total, 10)
            got = [parse(d) for d in drain_now(receiver)]
            nursery.cancel_scope.cancel()
    finally:
        receiver.close()
    assert [int(g.fields["client_port"]) for g in got] == list(range(total))
    assert log.dropped == 0


async def test_an_event_past_the_bound_is_counted_dropped_as_soon_as_emitted(
    tmp_path: Path,
) -> None:
    # The writer formats the events, but stats and metrics read `dropped` at any
    # time: an event the byte bound turns away counts at once, not when the
    # writer next runs.
    receiver = unix_receiver(tmp_path / "log.sock")
    log = EventLog(SyslogTarget("unix", path=str(tmp_path / "log.sock")), "rfc5424",
                   hostname="testhost", queue_bytes=4 * 1024)  # fmt: skip
    try:
        for i in range(100):  # no writer running: nothing is sent
            log.emit(passed(i))
        dropped = log.dropped
        assert 0 < dropped < 100
        assert dropped + log.statistics()["queued"] == 100
    finally:
        receiver.close()


# -- -f never waits for syslog; nothing is lost unaccounted -----------------------------


def backend_error(i: int) -> Event:
    conn = ConnInfo("127.0.0.1", 10000 + i, "127.0.0.1", 25)
    return events.backend_error(conn, 5.0, "127.0.0.1:2525", "Connection refused")


async def test_foreground_lines_never_wait_for_a_stalled_syslog_reader(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A unix datagram socket nobody reads takes a handful of datagrams, then
    # every send meets EAGAIN: the -f lines keep coming all the same.
    receiver = unix_receiver(tmp_path / "log.sock")
    stderr = io.StringIO()
    log = EventLog(SyslogTarget("unix", path=str(tmp_path / "log.sock")), stderr=stderr,
                   hostname="testhost")  # fmt: skip
    ticks, per_tick = 10, 50
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            for tick in range(ticks):
                for i in range(per_tick):
                    n = tick * per_tick + i
                    log.emit(passed(n) if n % 3 else marker())
                await trio.sleep(0.01)  # far less than SEND_WAIT
                assert len(stderr.getvalue().splitlines()) == (tick + 1) * per_tick
            assert log.statistics()["queued"] > 0  # syslog is still stuck
            started = trio.current_time()
            await log.wait_flushed()
            # Bounded: the queue's wait, then the one message in flight.
            assert trio.current_time() - started <= 1.0 + 2 * SEND_WAIT + 0.1
            stats = log.statistics()
            assert stats["queued"] == 0 and stats["queued_bytes"] == 0
            total = ticks * per_tick
            assert log.written + log.dropped == total  # exact: every event accounted
            assert log.written == len(drain_now(receiver))  # what the socket took
            assert 0 < log.written < total
            nursery.cancel_scope.cancel()
    finally:
        receiver.close()
    assert log.written + log.dropped == total


async def test_the_last_line_reaches_stderr_when_the_writer_is_cancelled(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # SIGTERM: stop is emitted, the writer cancelled; with syslog stuck the
    # stop line is on stderr all the same.
    receiver = unix_receiver(tmp_path / "log.sock")
    stderr = io.StringIO()
    log = EventLog(SyslogTarget("unix", path=str(tmp_path / "log.sock")), stderr=stderr,
                   hostname="testhost")  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            for i in range(100):
                log.emit(passed(i))
            await trio.sleep(0.01)
            log.emit(events.lifecycle(EventName.STOP, dropped_events=log.dropped))
            nursery.cancel_scope.cancel()
    finally:
        receiver.close()
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 101
    assert " stop: STOP " in lines[-1]
    assert log.written + log.dropped == 101
    assert log.statistics()["queued"] == 0


async def test_a_burst_of_backend_errors_past_the_bound_goes_out_as_a_summary() -> None:
    # 3,000 clients told 421 at once, and some passes, meet a queue with room
    # for about 50 messages: the backend-errors that do not fit go out as one
    # summary with `count`; the passes that do not fit are dropped and counted.
    receiver, port = roomy_udp_receiver()
    stderr = io.StringIO()
    log = EventLog(SyslogTarget("udp", host="127.0.0.1", port=port), "json", stderr=stderr,
                   queue_bytes=50 * 600, hostname="testhost")  # fmt: skip
    errors, passes = 3000, 300
    try:
        for i in range(errors):  # all within one turn of the loop: the writer is not running
            log.emit(backend_error(i))
            if i % 10 == 0:
                log.emit(passed(i))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            with trio.fail_after(10):
                while log.statistics()["queued"]:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        got = [parse(d) for d in drain_now(receiver)]
    finally:
        receiver.close()
    assert len(stderr.getvalue().splitlines()) == errors + passes  # -f: every one
    told_421 = [g for g in got if g.event == "backend-error"]
    summaries = [g for g in told_421 if "count" in g.fields]
    assert len(summaries) == 1
    summary = summaries[0]
    assert summary.fields["client_port"] == str(10000 + errors - 1)  # the last one's fields
    assert f"for {summary.fields['count']} clients" in summary.msg
    # No 421 goes unrecorded: each one is a message of its own or in the count.
    assert sum(int(g.fields.get("count", 1)) for g in told_421) == errors
    got_passes = sum(1 for g in got if g.event == "pass")
    assert log.dropped == passes - got_passes > 0
    assert log.written == errors + got_passes


async def test_a_reload_while_the_writer_connects_to_the_old_target_stands() -> None:
    # A TCP target whose accept queue is full: the writer's connect waits for
    # a SYN retransmit (a second). A reload to a UDP target meanwhile was
    # undone when that connect succeeded: the events went to the old target,
    # unframed in its stream, and the new one heard nothing.
    old = socket.socket()
    old.bind(("127.0.0.1", 0))
    old.listen(0)
    queued = socket.create_connection(old.getsockname())  # the accept queue is full
    receiver, port = roomy_udp_receiver()
    log = EventLog(SyslogTarget("tcp", host="127.0.0.1", port=old.getsockname()[1]))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            log.emit(marker())
            await trio.sleep(0.2)  # connecting to the old target
            new = SyslogTarget("udp", host="127.0.0.1", port=port)
            log.reconfigure(Settings(backend=Backend("127.0.0.1", 25), syslog=new))
            accepted = old.accept()[0]  # room: the retransmitted SYN gets through
            await trio.sleep(1.5)
            log.emit(passed(1))
            await written(log, 1, 5)
            assert log._sock is not None and log._sock.type == socket.SOCK_DGRAM
            got = [parse(d) for d in drain_now(receiver)]
            nursery.cancel_scope.cancel()
        accepted.close()
    finally:
        receiver.close()
        queued.close()
        old.close()
    assert [g.fields["client_port"] for g in got] == ["1"]


async def test_a_reload_wakes_a_send_waiting_on_the_old_socket(tmp_path: Path) -> None:
    # The writer waits for a receiver that does not read when a reload closes
    # its socket: trio was not told, kept the waiter, and the next socket given
    # the same number could not be waited on (BusyResourceError).
    tmp = tmp_path
    stuck = unix_receiver(tmp / "stuck.sock")
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    receiver, port = roomy_udp_receiver()
    log = EventLog(SyslogTarget("unix", path=str(tmp / "stuck.sock")), queue_bytes=1 << 20)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(log.run)
            for i in range(2000):  # the stuck receiver's queue fills: the writer waits
                log.emit(passed(i))
            await trio.sleep(0.2)
            new = SyslogTarget("udp", host="127.0.0.1", port=port)
            log.reconfigure(Settings(backend=Backend("127.0.0.1", 25), syslog=new))
            a, b = socket.socketpair()  # likely the old socket's number
            with a, b:
                a.setblocking(False)
                with trio.fail_after(2):
                    await trio.lowlevel.wait_writable(a)  # BusyResourceError before
            log.emit(passed(5000))
            with trio.fail_after(5):
                while not any(
                    parse(d).fields.get("client_port") == "5000" for d in drain_now(receiver)
                ):
                    await trio.sleep(0.01)
            # every event counted once: the one in flight at the reload dropped
            # with the rest framed for the old target
            stats = log.statistics()
            assert stats["written"] + stats["dropped"] + stats["queued"] == 2001
            nursery.cancel_scope.cancel()
    finally:
        receiver.close()
        stuck.close()

"""The event writer: never blocks the loop, never floods it, never makes -f wait.

`EventLog.emit()` is synchronous and cheap: it counts the event, formats its
-f line, and queues both (`emit_built()` queues the makings of an event, built
when the messages are formatted). Two tasks write them out, each on its own,
so that a syslog target that stops reading never holds up the -f lines, and
the accept loop sends its own batches:

- the stderr writer writes every line that gathered since it last ran, in one
  write. stderr is written blocking: a pipe nobody reads stops repeld, as it
  would any foreground daemon (a supervisor reads it); it never waits for syslog.
- the syslog sender sends the queued messages to the target (unix datagram
  socket, UDP, or TCP with RFC 6587 octet counting), one non-blocking send per
  message in a row. Writing each datagram straight from emit() cost more: under
  relay load a batch in a row took 7-9 % less of repeld's CPU per message, and
  wakes the syslog daemon less often (docs/PERFORMANCE.md). A syslog daemon that
  stops reading makes repeld drop events, never stall: the sender waits at most
  `SEND_WAIT` seconds for one message. The sender also formats the syslog
  messages, all that gathered in a row, up to `_FRAME_BATCH` events after
  which emit() formats them itself: formatted in emit(), in the middle of each
  client's path, a handed-off client cost 2 to 8 µs more of its 76 to 104
  (docs/perf-log/2026-12-06-workers-probe-together.md).
- the accept loop writes its own batch (`defer`, `write_deferred`): from its
  wake-up to its next wait, the events its clients bring wait, and before it
  waits it sends them, non-blocking, itself. Woken by emit(), the sender would
  run in a turn of trio's loop of its own, after the accept loop's: one more
  poll of the kernel and one more task switch per wake-up, 3 to 5 µs of a
  handed-off client's CPU (docs/perf-log/2026-12-07-timer-and-batch.md).
  Whatever the socket does not take at once (no connection yet, a full
  buffer, a frame cut short) is the sender's, as any other event.

The syslog queue is bounded in bytes (`QUEUE_BYTES`, enough for two events for
each of 75,000 clients passing at once). An event that finds it full is dropped
and counted, except a `backend-error`: those wait, per backend and error, to go
out as one summary event with a `count` field when there is room again, so that
no 421 goes unrecorded. Every event is written, waiting, or counted in
`dropped`: `written + dropped + statistics()["queued"]` is the number of events
syslog was given.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import ParamSpec, TextIO

import trio

from repeld.config.settings import Settings
from repeld.config.values import SyslogTarget
from repeld.core import events
from repeld.core.events import Event
from repeld.core.logformat import (
    FACILITIES,
    Header,
    format_json,
    format_rfc5424,
    format_stderr,
    wire_format,
)
from repeld.core.names import EventName
from repeld.shell.relay import connect, send_all

__all__ = ["EventLog"]

#: Bytes of formatted messages waiting for syslog; past this an event is dropped
#: (and counted) or, a backend-error, summed into a summary. 64 MiB: two events
#: of ~400 bytes for each of 75,000 clients passing at once.
QUEUE_BYTES = 64 << 20
#: What a queued message costs besides its bytes (the bytes object, its slot).
MESSAGE_OVERHEAD = 64
#: Most messages the sender sends in one go before it lets other tasks run.
_WRITE_BATCH = 256
#: -f lines that emit() lets gather before it writes them itself.
_STDERR_BATCH = 4096
#: Events that emit() lets gather before it formats their syslog messages itself.
_FRAME_BATCH = 256
_P = ParamSpec("_P")
#: An emit_built() event not built yet: the builder, its arguments, the event's name.
_Unbuilt = tuple[Callable[..., Event], tuple[object, ...], str]
#: The longest the sender waits for the target to accept one message.
SEND_WAIT = 1.0
#: At shutdown, the longest `wait_flushed()` waits for the queue to empty.
FLUSH_WAIT = 1.0
#: After a failure, the sender tries to reach the target again this much later.
RETRY_AFTER = 2.0
#: Two refusals of a UDP target this close together: nothing listens (`_refused_again`).
UDP_REFUSALS_WINDOW = 2 * RETRY_AFTER
#: Send errors that mean the target went away (a syslog daemon restarting),
#: not that the message is wrong: the message is sent again once it is back.
_TARGET_GONE = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ENOENT,
        errno.ECONNRESET,
        errno.EPIPE,
        errno.ENOTCONN,
        errno.ECONNABORTED,
    }
)
#: A datagram the target's socket will never take (FreeBSD's /var/run/log takes
#: 2 KiB, and an enforced talker's event can be twice that): it alone is
#: dropped, the socket is kept (inside --chroot it could not be opened again).
_TOO_LONG = errno.EMSGSIZE
#: The kernel's buffers are full for a moment (FreeBSD's full /var/run/log):
#: a datagram socket is waited for, as when it would block.
_NO_BUFFERS = errno.ENOBUFS
#: How long a datagram socket out of buffers is left alone before the next try.
NO_BUFFERS_PAUSE = 0.01
#: The most often a failing target is reported on stderr.
COMPLAIN_INTERVAL = 60.0


class EventLog:
    """Counts every event and writes it to syslog (and stderr with -f)."""

    def __init__(
        self,
        target: SyslogTarget | None,
        log_format: str = "auto",
        *,
        facility: str = "mail",
        sd_id: str = "repeld@32473",
        report_attacks: bool = True,
        stderr: TextIO | None = None,
        queue_bytes: int = QUEUE_BYTES,
        hostname: str | None = None,
    ) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        #: Sees every event first, the unwritten ones too (--metrics); None: nothing to call.
        self.observe: Callable[[Event], None] | None = None
        self._dropped = 0
        #: Events syslog got.
        self.written = 0
        #: Framed syslog messages, oldest first, each with how many events it
        #: stands for; the first may be the unsent rest of a TCP frame.
        self._queue: collections.deque[tuple[bytes, int]] = collections.deque()
        self._queued_bytes = 0
        self._queue_bytes = queue_bytes
        #: Events in the message being sent now (0: none).
        self._inflight = 0
        #: backend-errors that found the queue full: (backend, error) -> (count, last, stamp).
        self._coalesced: dict[tuple[str, str], tuple[int, Event, float]] = {}
        self._wakeup = trio.Event()
        self._idle = trio.Event()
        #: Between `defer` and `write_deferred`: emit() leaves the sender asleep.
        self._deferring = False
        #: Events came while deferring: `write_deferred` has something to do.
        self._deferred = False
        #: -f lines not yet written.
        self._lines: list[str] = []
        #: Events for syslog not yet formatted (at most _FRAME_BATCH), with their
        #: time; an emit_built() one not yet built, too.
        self._unframed: list[tuple[Event | _Unbuilt, float]] = []
        self._lines_ready = trio.Event()
        #: The HOSTNAME of every message: given, or the host's, read again at each
        #: reload (a host named after repeld started, by DHCP or cloud-init at boot).
        self._fixed_hostname = hostname
        self._hostname = hostname if hostname is not None else socket.gethostname()
        self._sock: socket.socket | None = None
        #: The first queued message is the unsent rest of a TCP frame.
        self._partial = False
        #: The socket has delivered nothing yet.
        self._fresh = True
        self._retry_at = 0.0
        #: When a UDP target last refused a datagram (-inf: never).
        self._udp_refused_at = -math.inf
        self._complained = False
        self._complained_at = -COMPLAIN_INTERVAL
        #: When an event last could not be built or formatted (`_lost`), host clock.
        self._lost_at = -math.inf
        self._configure(target, log_format, facility, sd_id, report_attacks, stderr)

    def _configure(
        self,
        target: SyslogTarget | None,
        log_format: str,
        facility: str,
        sd_id: str,
        report_attacks: bool,
        stderr: TextIO | None,
    ) -> None:
        if self._unframed:  # emitted under the old settings: formatted by them
            self._frame_unframed()
        if target != getattr(self, "target", None):
            self._close()  # the next message connects to the new target
            self._retry_at = 0.0
            self._discard()  # framed for the old target: gone (counted)
        if stderr is None and getattr(self, "stderr", None) is not None:
            self._write_lines()
        self.target = target
        self.report_attacks = report_attacks
        self.stderr = stderr
        kind = target.kind if target is not None else "unix"
        self._format: Callable[[Event, Header, float], bytes] = (
            format_json if wire_format(log_format, kind) == "json" else format_rfc5424
        )
        self._header = Header(
            facility=FACILITIES[facility],
            hostname=self._hostname,
            app_name="repeld",
            procid=os.getpid(),
            sd_id=sd_id,
            local=target is not None and target.kind == "unix",
        )
        self._octet_counting = target is not None and target.kind == "tcp"

    def reconfigure(self, settings: Settings) -> None:
        """Take the logging settings of a reloaded configuration (and the host's name
        as it is now)."""
        if self._fixed_hostname is None:
            self._hostname = socket.gethostname()
        self._configure(
            settings.syslog,
            settings.log_format,
            settings.facility,
            settings.sd_id,
            settings.report_attacks,
            sys.stderr if settings.foreground else None,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> EventLog:
        return cls(
            settings.syslog,
            settings.log_format,
            facility=settings.facility,
            sd_id=settings.sd_id,
            report_attacks=settings.report_attacks,
            stderr=sys.stderr if settings.foreground else None,
        )

    @property
    def dropped(self) -> int:
        """Events syslog did not get (a summary counts for every event it stands for).

        Formats the events that wait first, so that an event dropped for the
        byte bound is counted as soon as it is emitted, as stats and metrics
        read it.
        """
        self._frame_unframed()
        return self._dropped

    def emit(self, event: Event) -> None:
        """Count `event`, queue its -f line and its syslog message; never blocks, never raises."""
        self.counts[event.name] += 1
        if self.observe is not None:
            self._observe(event)
        if event.name == EventName.EARLY_TALKER and not self.report_attacks:
            return
        stamp = time.time()
        if self.stderr is not None:
            try:
                line = format_stderr(event, stamp)
            except Exception as exc:  # a bug: never raised into the emitter
                self._lost(event, exc, 0, "was not printed")
            else:
                self._lines.append(line)
            if len(self._lines) >= _STDERR_BATCH:
                self._write_lines()  # a burst within one turn of the loop
            else:
                self._lines_ready.set()
        if self.target is not None:
            self._queue_unframed(event, stamp)

    def emit_built(
        self, name: EventName, build: Callable[_P, Event], *args: _P.args, **kwargs: _P.kwargs
    ) -> None:
        """Emit the event `build(*args)` makes, named `name`: counted now, built
        with the other waiting events when their messages are formatted.

        For the event every client brings (`pass`): built in a row with the
        rest of its batch, not in the middle of its client's path (2 to 7 µs
        of a handed-off client's CPU, docs/perf-log/2026-12-07-timer-and-batch.md).
        --metrics sees it then (`settle` first, to read them all); -f, an
        unwritten early talker or no syslog target build it at once.
        """
        if (
            self.stderr is not None
            or self.target is None
            or (name == EventName.EARLY_TALKER and not self.report_attacks)
        ):
            try:
                event = build(*args, **kwargs)
            except Exception as exc:  # as in _frame_unframed: never raised from here
                self.counts[name] += 1
                self._lost((build, args, name), exc)
                return
            self.emit(event)
            return
        self.counts[name] += 1
        if kwargs:
            build = functools.partial(build, **kwargs)
        self._queue_unframed((build, args, name), time.time())

    def _queue_unframed(self, entry: Event | _Unbuilt, stamp: float) -> None:
        """Queue an event (or its makings) for formatting; wake the sender, unless
        a batch defers it (`defer`)."""
        unframed = self._unframed
        unframed.append((entry, stamp))
        if len(unframed) >= _FRAME_BATCH:
            self._frame_unframed()
        if self._deferring:
            self._deferred = True
        else:
            self._wakeup.set()

    def settle(self) -> None:
        """Build and format every event that waits: --metrics has then seen them all."""
        self._frame_unframed()

    def defer(self) -> None:
        """From now until `write_deferred`, emit() leaves the syslog sender asleep.

        For a task that emits a batch of events and calls `write_deferred`
        before it next waits (the accept loop): no other task runs meanwhile.
        """
        self._deferring = True

    def write_deferred(self) -> None:
        """Send what came since `defer`, without waiting; the sender gets the rest."""
        self._deferring = False
        if not self._deferred:
            return
        self._deferred = False
        sock = self._sock
        if sock is not None and not self._partial and not self._inflight:
            # Nothing of the sender's is half-sent: send from the head of the
            # queue, in order, what the socket takes at once.
            self._frame_unframed()
            self._release_coalesced()
            self._send_nowait(sock)
        if self._queue or self._unframed or self._coalesced:
            self._wakeup.set()

    def _frame_unframed(self) -> None:
        """Format the events emit() queued and queue their messages, as room allows."""
        unframed, self._unframed = self._unframed, []
        # What _built and _frame do, written out for the commonest case (every
        # handed-off client's event comes here): a call costs about half a µs
        # in place (docs/perf-log/2026-12-07-day.md).
        fmt, header, octets = self._format, self._header, self._octet_counting
        observe = self.observe
        for i, (entry, stamp) in enumerate(unframed):
            try:
                if isinstance(entry, Event):
                    event = entry
                else:
                    build, args, name = entry
                    event = build(*args)
                    assert event.name == name, f"emit_built({name}) built a {event.name} event"
                    if observe is not None:
                        self._observe(event)
                message = fmt(event, header, stamp)
                if octets:
                    message = b"%d %s" % (len(message), message)
            except Exception as exc:
                # A bug in building or formatting this one: it is lost, counted
                # so and said on stderr, and the events after it go on. Never
                # raised: this runs in whoever emits or writes next (the accept
                # loop, a client's path), which must not stop for it.
                self._lost(entry, exc)
                continue
            except BaseException:  # KeyboardInterrupt and the like: the rest wait on
                self._dropped += 1
                self._unframed[:0] = unframed[i + 1 :]
                raise
            if not self._enqueue(message, 1):
                if event.name == EventName.BACKEND_ERROR:
                    key = (str(event.get("backend")), str(event.get("error")))
                    count = self._coalesced.get(key, (0, event, stamp))[0]
                    self._coalesced[key] = (count + 1, event, stamp)
                else:
                    self._dropped += 1

    def _lost(
        self,
        entry: Event | _Unbuilt,
        exc: Exception,
        weight: int = 1,
        what: str = "was not written",
    ) -> None:
        """An event that could not be built or formatted (or shown to --metrics or
        printed: `what`): `weight` more dropped, and one stderr line about it a
        COMPLAIN_INTERVAL at most (the same bug repeats), after the -f lines of the
        events before it."""
        self._dropped += weight
        now = time.monotonic()
        if now - self._lost_at >= COMPLAIN_INTERVAL:
            self._lost_at = now
            name = entry.name if isinstance(entry, Event) else entry[2]
            self._write_lines()
            _say(f"repeld: internal error: a {name} event {what}: {exc!r}")

    def _built(self, entry: Event | _Unbuilt) -> Event:
        """The event itself; one emit_built() waited to build is built and observed now."""
        if isinstance(entry, Event):
            return entry
        build, args, name = entry
        event = build(*args)
        assert event.name == name, f"emit_built({name}) built a {event.name} event"
        if self.observe is not None:
            self._observe(event)
        return event

    def _observe(self, event: Event) -> None:
        """Show `event` to --metrics; an observer's bug costs the metrics that event only."""
        assert self.observe is not None
        try:
            self.observe(event)
        except Exception as exc:
            self._lost(event, exc, 0, "was not seen by --metrics")

    def _frame(self, event: Event, stamp: float) -> bytes:
        message = self._format(event, self._header, stamp)
        if self._octet_counting:
            message = b"%d %s" % (len(message), message)
        return message

    def _enqueue(self, message: bytes, weight: int) -> bool:
        """Queue `message` if it fits the byte bound."""
        cost = len(message) + MESSAGE_OVERHEAD
        if self._queued_bytes + cost > self._queue_bytes:
            return False
        self._queue.append((message, weight))
        self._queued_bytes += cost
        return True

    def _release_coalesced(self) -> None:
        """Queue the summaries of the backend-errors that found the queue full, as room allows."""
        for key, (count, last, stamp) in list(self._coalesced.items()):
            try:
                message = self._frame(events.summarize(last, count), stamp)
            except Exception as exc:  # as in _frame_unframed: never raised from here
                del self._coalesced[key]
                self._lost(last, exc, count)
                continue
            if not self._enqueue(message, count):
                return
            del self._coalesced[key]

    def statistics(self) -> dict[str, int]:
        """Events waiting for syslog (and their bytes), and what has been written or dropped."""
        self._frame_unframed()
        queued = sum(w for _, w in self._queue) + self._inflight
        queued += sum(count for count, _, _ in self._coalesced.values())
        return {
            "queued": queued,
            "queued_bytes": self._queued_bytes,
            "written": self.written,
            "dropped": self._dropped,
        }

    async def run(self) -> None:
        """The writer tasks: stderr and syslog, for as long as repeld runs."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_stderr)
                await self._run_syslog()
        finally:
            await self.flush_nowait()

    async def _run_stderr(self) -> None:
        while True:
            if not self._lines:
                self._lines_ready = trio.Event()
                await self._lines_ready.wait()
            self._write_lines()
            await trio.lowlevel.checkpoint()

    async def _run_syslog(self) -> None:
        while True:
            if not self._queue and not self._coalesced and not self._unframed:
                self._idle.set()
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            self._idle = trio.Event()
            await self._send_queue()

    async def _send_queue(self) -> None:
        """Send the queued messages in order until none is left.

        A batch goes out non-blocking, in a row; the first message the socket
        does not take at once is sent whole or not at all (a cut TCP frame
        would garble the stream), waiting at most SEND_WAIT; one that meets a
        closed or refused socket stays first in line for the next connection,
        tried every RETRY_AFTER seconds.
        """
        queue = self._queue
        while True:
            self._frame_unframed()
            self._release_coalesced()
            if not queue:
                return
            sock = self._sock
            if sock is None:
                sock = await self._connect()
                if sock is None:
                    await trio.sleep_until(self._retry_at)
                    continue
            if self._send_nowait(sock):
                await trio.lowlevel.checkpoint()  # a long backlog yields now and then
                continue
            if self._sock is None or not queue:
                continue  # failed (reconnect), or the last one was dropped
            message, weight = queue.popleft()  # its bytes stay counted while in flight
            self._inflight = weight
            try:
                with trio.CancelScope(shield=True):
                    sent = await self._send(sock, message, weight)
            finally:
                self._inflight = 0
            if sent is None:  # kept: reconnect (now, or at _retry_at) and send it again
                queue.appendleft((message, weight))
            else:
                self._queued_bytes -= len(message) + MESSAGE_OVERHEAD
                self._partial = False
            # The shield hides a cancel: notice it between messages, or a
            # stuck receiver would hold up shutdown for the whole backlog.
            await trio.lowlevel.checkpoint_if_cancelled()

    def _send_nowait(self, sock: socket.socket) -> bool:
        """Send up to a batch of queued messages without waiting.

        True: a batch went out and more are queued. False: the queue is empty,
        the socket did not take the first message whole, or it failed.
        """
        queue = self._queue
        if queue and not self._partial and self._octet_counting and _peer_closed(sock):
            # A TCP receiver that closed (a syslog daemon restarting) still
            # takes the next sends into the kernel, and loses them: ask first
            # (as rsyslog's omfwd does), one call a batch, and reconnect.
            self._close()
            return False
        for _ in range(_WRITE_BATCH):
            if not queue:
                return False
            if self._partial:
                return False  # the rest of a frame: only the waiting send finishes it
            message, weight = queue[0]
            try:
                sent = sock.send(message)
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno == _NO_BUFFERS and sock.type == socket.SOCK_DGRAM:
                    return False  # the waiting send waits for room
                if not self._failed(exc, weight):
                    queue.popleft()
                    self._queued_bytes -= len(message) + MESSAGE_OVERHEAD
                return False
            if sent < len(message):
                queue[0] = (message[sent:], weight)  # the rest of this frame first
                self._queued_bytes -= sent
                self._partial = True
                return False
            queue.popleft()
            self._queued_bytes -= len(message) + MESSAGE_OVERHEAD
            self._delivered(weight)
        return bool(queue)

    async def wait_flushed(self, timeout: float = FLUSH_WAIT) -> None:
        """Wait at most `timeout` for syslog to take what is queued, then drop the rest.

        When it returns every event emitted before is written or counted in
        `dropped` (the message being sent, if any, is waited for: at most
        SEND_WAIT more), so that a `stop` event emitted next reports exactly.
        """
        if self.target is not None:
            with trio.move_on_after(timeout):
                while self._queue or self._coalesced or self._inflight or self._unframed:
                    self._wakeup.set()
                    await self._idle.wait()
                    await trio.lowlevel.checkpoint()
            self._discard()
            with trio.move_on_after(SEND_WAIT * 2):
                while self._inflight:
                    await trio.sleep(0.01)
        self._write_lines()

    def _discard(self) -> None:
        """Count everything still waiting for syslog as dropped, and forget it."""
        if self.observe is not None:  # --metrics still sees every event
            for entry, _ in self._unframed:
                try:
                    self._built(entry)
                except Exception as exc:  # counted dropped below all the same
                    self._lost(entry, exc, 0)
        self._dropped += len(self._unframed)
        self._unframed.clear()
        self._dropped += sum(w for _, w in self._queue)
        self._dropped += sum(count for count, _, _ in self._coalesced.values())
        self._queued_bytes -= sum(len(m) + MESSAGE_OVERHEAD for m, _ in self._queue)
        self._queue.clear()
        self._coalesced.clear()
        self._partial = False

    async def flush_nowait(self) -> None:
        """Write what is still queued without waiting long (at shutdown)."""
        self._write_lines()  # the -f lines first, whatever syslog does
        with trio.CancelScope(shield=True), trio.move_on_after(SEND_WAIT):
            await self._send_queue()
        self._discard()  # never sent: counted, as every lost event is
        self._close()

    async def connect_now(self) -> None:
        """Open the syslog socket now (before a chroot hides a unix socket path)."""
        if self.target is not None and self._sock is None:
            await self._connect()

    def _write_lines(self) -> None:
        lines = self._lines
        if not lines or self.stderr is None:
            return
        self._lines = []
        try:
            self.stderr.write("\n".join(lines) + "\n")
            self.stderr.flush()
        except (OSError, ValueError):
            pass

    def _complain(self, what: str, exc: BaseException) -> None:
        # One line per outage on stderr, where a supervisor keeps it (and at most
        # one a minute: a UDP target that refuses flips between states).
        now = trio.current_time()
        if not self._complained and now - self._complained_at >= COMPLAIN_INTERVAL:
            self._complained = True
            self._complained_at = now
            self._write_lines()  # after the -f lines of the events before it
            _say(f"repeld: syslog {self.target}: {what}: {exc}")

    def _close(self) -> None:
        if self._sock is not None:
            # A send waiting on it (a reload's close) wakes with
            # ClosedResourceError, and trio forgets the fd before another
            # socket takes its number.
            with contextlib.suppress(RuntimeError):  # (outside trio: no waiter)
                trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
            self._sock = None

    async def _connect(self) -> socket.socket | None:
        target = self.target
        assert target is not None
        if trio.current_time() < self._retry_at:
            return None
        try:
            if target.kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                try:
                    sock.setblocking(False)
                    sock.connect(target.path)  # a datagram connect never waits
                except OSError:
                    sock.close()
                    raise
            else:
                kind = socket.SOCK_DGRAM if target.kind == "udp" else socket.SOCK_STREAM
                infos = await trio.socket.getaddrinfo(target.host, target.port, type=kind)
                family, _, _, _, addr = infos[0]
                if kind == socket.SOCK_STREAM:
                    sock = await connect(tuple(addr), family, SEND_WAIT * 5)
                else:
                    sock = socket.socket(family, socket.SOCK_DGRAM)
                    sock.setblocking(False)
                    sock.connect(addr)
        except (OSError, TimeoutError) as exc:
            if self.target != target:  # a reload meanwhile: try the new one
                return None
            self._retry_at = trio.current_time() + RETRY_AFTER
            self._complain("cannot connect", exc)
            return None
        if self.target != target:
            # A reload while this connected (a resolver's or a TCP connect's
            # wait) chose another target: this socket is not its.
            sock.close()
            return None
        self._sock = sock
        self._fresh = True
        return sock

    async def _send(self, sock: socket.socket, message: bytes, weight: int) -> bool | None:
        """Send one framed message, waiting at most SEND_WAIT for the target.

        True: sent. False: dropped (counted). None: the target went away and
        the message is to be sent again once it is back.
        """
        try:
            with trio.move_on_after(SEND_WAIT) as scope:
                await _send_whole(sock, message)
            if scope.cancelled_caught:
                # The receiver is not reading: drop this one, keep the socket
                # (a stream socket's framing may be broken: reconnect).
                self._dropped += weight
                if self._octet_counting:
                    self._close()
                return False
        except trio.ClosedResourceError:
            # A reload closed the socket while this waited on it (`_close`):
            # framed for the old target, it goes as the rest of the queue
            # did (`_discard`): dropped, counted.
            self._dropped += weight
            return False
        except OSError as exc:
            if not self._failed(exc, weight):
                return False
            if self._partial:
                self._dropped += weight  # the rest of a frame means nothing on a new connection
                return False
            return None
        self._delivered(weight)
        return True

    def _failed(self, exc: OSError, weight: int) -> bool:
        """A send failed: close, reconnect for the next try. Whether to send it again.

        A closed or refused socket (a syslog daemon restarting) is no fault of
        the message: it is kept. Any other error drops it (counted). A message
        too long for the target is dropped alone: the socket is kept, and the
        messages after it are not held up.
        """
        if exc.errno == _TOO_LONG:
            self._dropped += weight
            self._complain("send failed", exc)
            return False
        self._close()
        keep = exc.errno in _TARGET_GONE
        if not keep:
            self._dropped += weight
        refused_again = self._refused_again(exc)
        if exc.errno != _NO_BUFFERS and (
            self._fresh or exc.errno not in _TARGET_GONE or refused_again
        ):
            # A socket that never delivered failed, or a UDP target refused twice:
            # the target is not back yet.
            self._retry_at = trio.current_time() + RETRY_AFTER
        self._complain("send failed", exc)
        return keep

    def _refused_again(self, exc: OSError) -> bool:
        """A UDP target refused a datagram, and another within UDP_REFUSALS_WINDOW.

        A UDP send always "delivers"; a refusal is the ICMP port unreachable of an
        earlier datagram, which the socket keeps until the next send, however late.
        A lone refusal may be that stale one (the daemon was restarted since), so
        the writer reconnects at once; a second one soon after says nothing
        listens, and it waits RETRY_AFTER. Reconnecting at every refusal cost a
        reconnect every other event while nothing listened (41 % more CPU per
        handed-off client, docs/PERFORMANCE.md).
        """
        if self.target is None or self.target.kind != "udp" or exc.errno != errno.ECONNREFUSED:
            return False
        now = trio.current_time()
        again = now - self._udp_refused_at < UDP_REFUSALS_WINDOW
        self._udp_refused_at = now
        return again

    def _delivered(self, weight: int) -> None:
        self.written += weight
        self._fresh = False
        if self._complained:
            self._complained = False
            if self.target is not None and self.target.kind != "udp":  # UDP cannot tell
                _say(f"repeld: syslog {self.target}: writing again")


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the other end of a stream socket has closed it (or reset it)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def _send_whole(sock: socket.socket, message: bytes) -> None:
    """`send_all`, and for a datagram socket out of buffers, a pause and again."""
    while True:
        try:
            await send_all(sock, message)
            return
        except OSError as exc:
            if exc.errno != _NO_BUFFERS or sock.type != socket.SOCK_DGRAM:
                raise
        await trio.sleep(NO_BUFFERS_PAUSE)


def _say(line: str) -> None:
    """One line on stderr; a closed or broken stderr (a supervisor gone) is no reason
    for the caller, which may be the accept loop, to stop."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass

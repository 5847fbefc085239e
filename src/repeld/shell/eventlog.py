"""The event writer: never blocks the loop, never floods it.

`EventLog.emit()` is synchronous and cheap: it counts the event and queues it,
or counts it as dropped when the bounded queue is full. One writer task drains
the queue to the target (unix datagram socket, UDP, or TCP with RFC 6587 octet
counting): whatever has gathered since it last ran, one non-blocking send per
message in a row. Writing each datagram straight from emit() cost more: under
relay load a batch in a row took 7-9 % less of repeld's CPU per message, and
wakes the syslog daemon less often (docs/PERFORMANCE.md). A syslog daemon that
stops reading makes repeld drop events, never stall: the writer waits at most
`SEND_WAIT` seconds for one message.
"""

from __future__ import annotations

import collections
import errno
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import TextIO

import trio

from repeld.config.settings import Settings
from repeld.config.values import SyslogTarget
from repeld.core.events import Event
from repeld.core.logformat import (
    FACILITIES,
    Header,
    format_json,
    format_rfc5424,
    format_stderr,
    wire_format,
)
from repeld.shell.relay import connect, send_all

__all__ = ["EventLog"]

#: Events waiting for the writer; past this they are dropped (and counted).
QUEUE_SIZE = 16384
#: Most events the writer writes in one go before it lets other tasks run.
_WRITE_BATCH = 256
#: The longest the writer waits for the target to accept one message.
SEND_WAIT = 1.0
#: After a failure, the writer tries to reach the target again this much later.
RETRY_AFTER = 2.0
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
        queue_size: int = QUEUE_SIZE,
        hostname: str | None = None,
    ) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        #: Sees every event first, the unwritten ones too (--metrics); None: nothing to call.
        self.observe: Callable[[Event], None] | None = None
        self.dropped = 0
        self.written = 0
        self._queue: collections.deque[tuple[Event, float]] = collections.deque()
        self._queue_size = queue_size
        self._wakeup = trio.Event()
        self._hostname = hostname if hostname is not None else socket.gethostname()
        self._sock: socket.socket | None = None
        #: Framed messages that must go out before the queue, oldest first: they
        #: met a full buffer or a target that went away (bounded by queue_size).
        self._held: collections.deque[bytes] = collections.deque()
        #: The first held message is the unsent rest of a TCP frame.
        self._partial = False
        #: The socket has delivered nothing yet.
        self._fresh = True
        #: The target went away (closed, refused, missing) and has not taken a
        #: message since: hold everything for when it is back.
        self._away = False
        self._retry_at = 0.0
        self._complained = False
        self._complained_at = -COMPLAIN_INTERVAL
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
        if target != getattr(self, "target", None):
            self._close()  # the next message connects to the new target
            self._retry_at = 0.0
            self.dropped += len(self._held)  # framed for the old target: gone
            self._held.clear()
            self._partial = False
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
        """Take the logging settings of a reloaded configuration."""
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

    def emit(self, event: Event) -> None:
        """Count `event` and queue it for the writer; never blocks, never raises."""
        self.counts[event.name] += 1
        if self.observe is not None:
            self.observe(event)
        if event.name == "early-talker" and not self.report_attacks:
            return
        stamp = time.time()
        if len(self._queue) + len(self._held) >= self._queue_size:
            self.dropped += 1
            return
        self._queue.append((event, stamp))
        self._wakeup.set()

    def statistics(self) -> dict[str, int]:
        """Queue depth (events and held messages) and what has been written or dropped."""
        queued = len(self._queue) + len(self._held)
        return {"queued": queued, "written": self.written, "dropped": self.dropped}

    async def run(self) -> None:
        """The writer task: drain the queue for as long as repeld runs."""
        try:
            while True:
                if not self._queue and not self._held:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                if self._held and not await self._send_held():
                    # The target is away: keep printing (-f) and holding what
                    # comes, and try it again at _retry_at.
                    self._write_batch(_WRITE_BATCH)
                    if self._queue:
                        await trio.lowlevel.checkpoint()
                    else:
                        self._wakeup = trio.Event()
                        with trio.move_on_at(self._retry_at):
                            await self._wakeup.wait()
                    continue
                self._write_batch(_WRITE_BATCH)
                if self._queue and not self._held:
                    await trio.lowlevel.checkpoint()  # a long backlog yields now and then
        finally:
            await self.flush_nowait()

    def _write_batch(self, limit: int) -> None:
        """Write up to `limit` queued events without waiting.

        Every event's line goes to stderr (one write for the batch); its syslog
        message is sent at once if the socket takes it. The first message that
        must wait (no socket yet, a full buffer, part of a TCP frame left) is held
        for the time-bounded `_send_held()`, and the batch stops there; while the
        target is away (closed, refused, missing) every message is held, in order,
        and the batch goes on, so that the -f lines keep coming.
        """
        queue = self._queue
        lines: list[str] = []
        target = self.target
        try:
            while queue and limit > 0:
                limit -= 1
                event, stamp = queue.popleft()
                if self.stderr is not None:
                    lines.append(format_stderr(event, stamp))
                if target is None:
                    continue
                message = self._format(event, self._header, stamp)
                if self._octet_counting:
                    message = b"%d %s" % (len(message), message)
                sock = self._sock
                if sock is None or self._held:
                    self._hold(message)  # connecting may wait; order is kept
                    if self._away:
                        continue  # the target is away: print and hold the rest too
                    return
                try:
                    sent = sock.send(message)
                except BlockingIOError:
                    self._hold(message)
                    return
                except OSError as exc:
                    if self._failed(exc):
                        self._hold(message)
                    continue
                if sent < len(message):
                    self._hold(message[sent:])  # the rest of this frame first
                    self._partial = True
                    return
                self._delivered()
        finally:
            if lines:
                self._write_stderr(lines)

    def _hold(self, message: bytes) -> None:
        """Keep `message` for `_send_held()` (emit() bounds queue and held together)."""
        self._held.append(message)

    async def _send_held(self) -> bool:
        """Send the held messages in order; False while the target cannot be reached.

        Each is sent whole or not at all (a cut TCP frame would garble the
        stream), waiting at most SEND_WAIT; a message that met a closed or
        refused socket stays first in line for the next connection.
        """
        held = self._held
        while held:
            sock = self._sock or await self._connect()
            if sock is None:
                return False
            with trio.CancelScope(shield=True):
                sent = await self._send(sock, held[0])
            if sent is None:
                continue  # kept: reconnect (now, or at _retry_at) and send it again
            held.popleft()
            self._partial = False
            # The shield hides a cancel: notice it between messages, or a
            # stuck receiver would hold up shutdown for the whole backlog.
            await trio.lowlevel.checkpoint_if_cancelled()
        return True

    async def flush_nowait(self) -> None:
        """Write what is still queued without waiting long (at shutdown)."""
        with trio.CancelScope(shield=True), trio.move_on_after(SEND_WAIT):
            while self._queue or self._held:
                if self._held and not await self._send_held():
                    break
                self._write_batch(len(self._queue))
        self._write_batch(len(self._queue))  # the -f lines, whatever syslog does
        self.dropped += len(self._held)  # never sent: counted, as every lost event is
        self._held.clear()
        self._close()

    async def connect_now(self) -> None:
        """Open the syslog socket now (before a chroot hides a unix socket path)."""
        if self.target is not None and self._sock is None:
            await self._connect()

    def _write_stderr(self, lines: list[str]) -> None:
        assert self.stderr is not None
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
            print(f"repeld: syslog {self.target}: {what}: {exc}", file=sys.stderr, flush=True)

    def _close(self) -> None:
        if self._sock is not None:
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
            self._away = True
            self._retry_at = trio.current_time() + RETRY_AFTER
            self._complain("cannot connect", exc)
            return None
        self._sock = sock
        self._fresh = True
        return sock

    async def _send(self, sock: socket.socket, message: bytes) -> bool | None:
        """Send one framed message, waiting at most SEND_WAIT for the target.

        True: sent. False: dropped (counted). None: the target went away and
        the message is to be sent again once it is back.
        """
        try:
            with trio.move_on_after(SEND_WAIT) as scope:
                await send_all(sock, message)
            if scope.cancelled_caught:
                # The receiver is not reading: drop this one, keep the socket
                # (a stream socket's framing may be broken: reconnect).
                self.dropped += 1
                if self._octet_counting:
                    self._close()
                return False
        except OSError as exc:
            if not self._failed(exc):
                return False
            if self._partial:
                self.dropped += 1  # the rest of a frame means nothing on a new connection
                return False
            return None
        self._delivered()
        return True

    def _failed(self, exc: OSError) -> bool:
        """A send failed: close, reconnect for the next try. Whether to send it again.

        A closed or refused socket (a syslog daemon restarting) is no fault of
        the message: it is kept. Any other error drops it (counted).
        """
        self._close()
        keep = exc.errno in _TARGET_GONE
        if keep:
            self._away = True
        else:
            self.dropped += 1
        if exc.errno != errno.ENOBUFS and (self._fresh or exc.errno not in _TARGET_GONE):
            # A socket that never delivered failed: the target is not back yet.
            self._retry_at = trio.current_time() + RETRY_AFTER
        self._complain("send failed", exc)
        return keep

    def _delivered(self) -> None:
        self.written += 1
        self._fresh = False
        self._away = False
        if self._complained:
            self._complained = False
            if self.target is not None and self.target.kind != "udp":  # UDP cannot tell
                print(f"repeld: syslog {self.target}: writing again", file=sys.stderr, flush=True)

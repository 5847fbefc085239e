"""`--on-early enforce`: serve an early talker repeld's own dialogue, then write it down.

The hold (core/hold.py) keeps the talker to the end of its delay like everyone
else, muted in the pen, at no cost of its own; at the end it gives `Enforce`,
and `EnforceSessions.start` greets the talker and runs the dialogue of
core/enforce.py on its socket: the bytes it sent early are still unread there
and are its first commands. Every recipient is refused and nothing reaches the
MTA. When the dialogue ends, one `early-talker` event with `action=enforce`
carries the talk and the envelope (core/events.py); a talker that left before
its greeting (`gone`) or that found every session taken (`busy`) gets the same
event with an empty envelope.

A trio task per session, not the pen's or the relay pool's single task over a
poll set: enforce sessions are few and bounded (`MAX_SESSIONS` at once, each
at most SESSION_TIME seconds and MAX_COMMANDS commands), so the per-task cost
that made the pen and the pool worth their code (docs/ARCHITECTURE.md) is
small here, and a task lets the dialogue read as the plain loop it is, with
trio's own deadline (`move_on_at`) as the session's bound. Past the bound a
talker is dropped at once (a reset, as `--on-early drop` does) and counted
(`busy`), so a flood of talkers never costs more than MAX_SESSIONS tasks.

The sessions run in a nursery of their own, started in the server's front
nursery: a shutdown cancels them with the held clients, and each one tells its
client 421 and writes its event on the way out.
"""

from __future__ import annotations

import socket

import trio

from repeld.config.settings import Settings
from repeld.core import events
from repeld.core.dnsbl import DnsScore
from repeld.core.enforce import Enforcer, Envelope, greeting_name
from repeld.core.events import ConnInfo
from repeld.core.hold import Enforce
from repeld.core.names import EarlyAction, EnforceEnd
from repeld.shell.eventlog import EventLog
from repeld.shell.pen import Held
from repeld.shell.replies import abort, rtt_ms, send_now

__all__ = ["MAX_SESSIONS", "EnforceSessions", "enforce_name"]

#: Enforce sessions at once; a talker past it is dropped (`end=busy`).
MAX_SESSIONS = 100
#: The most read from a talker at once (its replies are what bounds the work).
_READ = 4096


def enforce_name(settings: Settings) -> bytes:
    """The name repeld greets an enforced talker with: the teaser's (--teaser-text,
    else the host name, read at start and on reload), as the MTA's banner most
    likely names it too."""
    return greeting_name(settings.teaser_text or socket.gethostname())


class EnforceSessions:
    """Every enforce session of one server, at most `limit` at once."""

    def __init__(self, log: EventLog, name: bytes, limit: int = MAX_SESSIONS) -> None:
        self.log = log
        #: The name in the greeting (--teaser-text, else the host name; reloadable).
        self.name = name
        self.limit = limit
        #: Sessions running now.
        self.active = 0
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the sessions until cancelled (a shutdown: each says 421 and ends)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def start(
        self, sock: socket.socket, conn: ConnInfo, verdict: Enforce, dns: DnsScore | None
    ) -> None:
        """Begin the dialogue with a talker whose delay is over (never blocks).

        Gone, or past the limit: no dialogue, the event at once.
        """
        rtt = rtt_ms(sock)
        if verdict.gone:
            abort(sock)
            self._written(conn, verdict, rtt, dns, Envelope(), EnforceEnd.GONE)
        elif self._nursery is None or self.active >= self.limit:
            abort(sock)
            self._written(conn, verdict, rtt, dns, Envelope(), EnforceEnd.BUSY)
        else:
            self.active += 1
            self._nursery.start_soon(self._session, sock, conn, verdict, rtt, dns)

    def evicted(self, held: Held) -> None:
        """repeld is stopping and `held` is told 421 before its delay is over: if it
        is a talker waiting for its enforce session, write its talk down all the same
        (`end=shutdown`, nothing said yet), as drop would have at the talk."""
        hold = held.hold
        talk = hold.talk
        if not hold.enforce or talk is None or hold.done:
            return
        elapsed = max(0.0, trio.current_time() - hold.accepted_at)
        verdict = Enforce(talk, elapsed)
        dns = hold.dns_result  # (absent, not 0, if the lists had not answered yet)
        self._written(held.conn, verdict, rtt_ms(held.sock), dns, Envelope(), EnforceEnd.SHUTDOWN)

    def _written(
        self,
        conn: ConnInfo,
        verdict: Enforce,
        rtt: float,
        dns: DnsScore | None,
        envelope: Envelope,
        end: EnforceEnd,
    ) -> None:
        event = events.early_talker(
            conn, verdict.talk, EarlyAction.ENFORCE, rtt, dns, (envelope, end)
        )
        self.log.emit(event)

    async def _session(
        self,
        sock: socket.socket,
        conn: ConnInfo,
        verdict: Enforce,
        rtt: float,
        dns: DnsScore | None,
    ) -> None:
        started = trio.current_time()
        engine = Enforcer(self.name, started)
        tsock = trio.socket.from_stdlib_socket(sock)
        try:
            with trio.move_on_at(engine.deadline):
                await _dialogue(tsock, engine)
            if not engine.done:  # SESSION_TIME is over
                _last_words(sock, engine.timeout(max(trio.current_time(), engine.deadline)))
        except OSError:
            engine.reset()
        except Exception as exc:  # a bug here never takes the server down (trio's rule)
            engine.reset()
            elapsed = verdict.elapsed + trio.current_time() - started  # since accept
            self.log.emit(events.internal_error(conn, elapsed, f"enforce session: {exc!r}"))
        finally:
            if not engine.done:  # cancelled: repeld is stopping
                _last_words(sock, engine.shutdown())
            if engine.end is EnforceEnd.RESET:
                abort(sock)
            else:
                tsock.close()
            self.active -= 1
            assert engine.end is not None
            self._written(conn, verdict, rtt, dns, engine.envelope(), engine.end)


async def _dialogue(tsock: trio.socket.SocketType, engine: Enforcer) -> None:
    # The greeting, then a reply to every read, until the engine is done.
    out = engine.greeting()
    while True:
        view = memoryview(out)
        while view:
            view = view[await tsock.send(view) :]
        if engine.done:
            return
        data = await tsock.recv(_READ)
        if not data:
            engine.eof()
            return
        out = engine.receive(data, trio.current_time())


def _last_words(sock: socket.socket, line: bytes) -> None:
    # A 421 without waiting: a client that reads nothing does not hold us up.
    if line and send_now(sock, line) is not None:
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

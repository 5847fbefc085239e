"""The verdict phase: carry out each verdict, write its event, teach the pass cache.

Every verdict of a held client comes here once, from the pen (or from the
admission step, for a verdict known at accept): `Dispatch.verdict` matches the
closed set of verdict types exhaustively (`match` and `typing.assert_never`, so
a new verdict type fails the type check until it is handled here) and

- tells the pass cache what core/learning.py's `lesson` says it learns;
- ends the connection as the verdict asks (shell/replies.py does it to the
  socket), or hands a passed client on (shell/handoff.py);
- writes the verdict's event (core/events.py builds it).

`Enforce` (--on-early enforce) is handed to shell/enforce.py, which greets the
talker, serves its dialogue and writes its event when that ends.

`Logged` (observe mode, and the DNS lists' log and delay actions) is handled
here and only here: its note is written down and nobody is cut off; the pen and
the admission step walk on to its `then`.
"""

from __future__ import annotations

import socket
from typing import assert_never

from repeld.cache.base import PassCache
from repeld.config.settings import Settings
from repeld.core import events
from repeld.core.addresses import cache_key
from repeld.core.dnsbl import DnsScore
from repeld.core.events import ConnInfo
from repeld.core.hold import (
    Blocked,
    EarlyTalk,
    Enforce,
    HangUp,
    LocalProtocolError,
    Logged,
    Mute,
    Pass,
    Penalty,
    Verdict,
    Wait,
)
from repeld.core.learning import Lesson, lesson
from repeld.core.names import EarlyAction, EventName
from repeld.service import tcptune
from repeld.shell.enforce import EnforceSessions, enforce_name
from repeld.shell.eventlog import EventLog
from repeld.shell.handoff import BackendTarget, HandOff
from repeld.shell.pen import Held
from repeld.shell.replies import abort, block, cut_off, rtt_ms

__all__ = ["Dispatch"]

#: The --on-early actions whose holds end an early talker in EarlyTalk.
_CUTS = frozenset({EarlyAction.DROP, EarlyAction.REJECT})


class Dispatch:
    """Carries out verdicts; `verdict` is the pen's callback."""

    def __init__(self, settings: Settings, log: EventLog, handoff: HandOff) -> None:
        self.settings = settings
        self.log = log
        self.handoff = handoff
        #: The cache's keys keep the --cache-v6-prefix repeld started with (a
        #: restart-only setting; a reload's value is not the cache's).
        self._v6_prefix = settings.cache_v6_prefix
        #: The pass cache that learns from verdicts (None when off).
        self.cache: PassCache | None = None
        #: DNS lists are configured: verdict events carry their score.
        self.dns = False
        #: The lists' domains, named as unanswered for a client none answered (issue 21)
        self.dns_domains: tuple[str, ...] = ()
        #: --on-early enforce: the talkers' own dialogues (its task: `enforcing.run`).
        self.enforcing = EnforceSessions(log, enforce_name(settings))

    def verdict(self, held: Held, verdict: Verdict) -> None:
        """Carry out one verdict of a held client (a `Logged` one: its note only)."""
        self._learn(held.conn, verdict)
        match verdict:
            case Logged(note=note):
                self._logged(held, note)
            case Pass():
                hold = held.hold
                self.passed(
                    held.sock,
                    held.conn,
                    hold.accepted_at,
                    verdict,
                    held.backend,
                    self._dns_of(held),
                )
            case EarlyTalk():
                action = EarlyAction(self.settings.on_early)
                if action not in _CUTS:
                    # A log or enforce hold's talker that flooded (core/hold.py's
                    # FLOOD_LIMIT), or one held under drop or reject, then a reload
                    # to log or enforce (the hold decides by the mode it began in):
                    # cut off, and written so.
                    action = EarlyAction.DROP
                rtt = rtt_ms(held.sock)
                cut_off(held.sock, verdict, action)
                dns = self._dns_of(held)
                self.log.emit(events.early_talker(held.conn, verdict, action, rtt, dns))
            case Penalty():
                abort(held.sock)
                self.log.emit(events.penalized(held.conn, verdict.elapsed, dns=self._dns_of(held)))
            case HangUp():
                held.sock.close()
                self.log.emit(events.hangup(held.conn, verdict))
            case Blocked():  # drop or reject: the lists ended it
                talk = held.hold.talk  # an observed talker (--on-early log)
                block(held.sock, held.conn.client, verdict, talk.nbytes if talk else 0)
                self.log.emit(events.dnsbl(held.conn, verdict))
            case Enforce():  # --on-early enforce: served, then written down
                self.enforcing.start(held.sock, held.conn, verdict, self._dns_of(held))
            case Wait() | Mute():
                raise LocalProtocolError(f"{verdict!r} is no verdict to carry out")
            case _:
                assert_never(verdict)

    def settle(self, held: Held, verdict: Verdict) -> bool:
        """Carry out a verdict known before the hold begins (at accept); True if
        the client is still to be held, False if the verdict ended it."""
        while isinstance(verdict, Logged):  # written down; the hold goes on
            self.verdict(held, verdict)
            verdict = verdict.then
        if isinstance(verdict, Wait):
            return True
        self.verdict(held, verdict)
        return False

    def passed(
        self,
        sock: socket.socket,
        conn: ConnInfo,
        accepted_at: float,
        verdict: Pass,
        backend: BackendTarget | None = None,
        dns: DnsScore | None = None,
    ) -> None:
        """Write the pass event and hand the client on (also for trusted and nodelay),
        unless the hand-off is at its limit (--max-exec: a 421 and an overload event)."""
        if self.handoff.turned_away(sock, conn, backend):
            return
        if dns is None and self.dns:  # trusted, nodelay: never asked
            dns = DnsScore()
        how = self.handoff.kind(backend)  # issue 19: handoff=pass
        # Built with the rest of the batch's events (shell/eventlog.py).
        rtt = tcptune.rtt_ms(sock.fileno())
        self.log.emit_built(EventName.PASS, events.passed, conn, verdict, rtt, dns, how)
        self.handoff.client(sock, conn, accepted_at, backend)

    def _logged(self, held: Held, note: EarlyTalk | Penalty | Blocked) -> None:
        # Observe mode and the lists' log/delay actions: written down, held on.
        match note:
            case Blocked():
                self.log.emit(events.dnsbl(held.conn, note))
            case EarlyTalk():
                dns = self._dns_of(held)
                rtt = rtt_ms(held.sock)
                self.log.emit(events.early_talker(held.conn, note, EarlyAction.LOG, rtt, dns))
            case Penalty():
                self.log.emit(
                    events.penalized(held.conn, note.elapsed, EarlyAction.LOG, self._dns_of(held))
                )
            case _:
                assert_never(note)

    def _learn(self, conn: ConnInfo, verdict: Verdict) -> None:
        taught = lesson(verdict)
        if taught is None or self.cache is None:
            return
        try:
            key = cache_key(conn.client, self._v6_prefix)
        except ValueError:
            return
        if taught is Lesson.GOOD:
            self.cache.remember_good(key)
        else:
            self.cache.remember_bad(key)

    def _dns_of(self, held: Held) -> DnsScore | None:
        # The lists' word for the events: None without lists, zero if unanswered.
        if not self.dns:
            return None
        return held.hold.dns_result or DnsScore(missing=self.dns_domains)  # issue 21

"""The policy and hold phases' entry: a client whose identity is settled is
refused, passed at once, or held.

`Admission.client` is called once per client by the intake phase (shell/intake.py),
with the client as its rules must see it (the socket's peer, or what a trusted
balancer's PROXY header said). It asks core/policy.py (trusted network, nodelay
listener, --max-held, --max-per-client), then for a held client builds its
`core.Hold`, feeds it what is known at once (a DNS lists' score still cached),
sends the teaser, puts it in the pen, and asks the pass cache and the DNS lists
about it. The answers come back through `cache_answered` and `dns_answered`,
which feed them to the hold as core/learning.py's penalty rule says. Verdicts go
to shell/dispatch.py; refusals are answered here (with shell/replies.py's lines)
and, under a flood, summed into one `overload` event a second per limit.
"""

from __future__ import annotations

import collections
import socket
from collections.abc import Callable

from repeld.cache.base import CacheVerdict
from repeld.cache.lookup import BatchedLookups
from repeld.config.settings import Settings
from repeld.core import events
from repeld.core.addresses import cache_key
from repeld.core.dnsbl import DnsPolicy, DnsScore
from repeld.core.events import ConnInfo
from repeld.core.hold import HangUp, Hold, Pass, Wait, teaser_line
from repeld.core.learning import cache_answer
from repeld.core.names import PassReason
from repeld.core.policy import Policy, Refuse, TrustedNetworks
from repeld.shell.dispatch import Dispatch
from repeld.shell.dnslookup import DnsLookups
from repeld.shell.eventlog import EventLog
from repeld.shell.handoff import BackendTarget
from repeld.shell.pen import Held, HoldingPen, spoke_first
from repeld.shell.replies import REFUSALS, abort, reply_and_close, send_now

__all__ = ["OVERLOAD_EVENT_INTERVAL", "Admission", "teaser_for"]

#: At most one overload event per limit this often; it counts the refusals between.
OVERLOAD_EVENT_INTERVAL = 1.0
#: The verdict of a client passed at once, by reason: the same every time, and
#: immutable, so made once (a frozen dataclass's __init__ costs about a µs).
_AT_ONCE = {reason: Pass(reason, 0.0) for reason in PassReason}


def teaser_for(settings: Settings) -> bytes:
    """The --teaser line every held client hears, or b"" (read at start and on reload)."""
    # The host name: what the MTA's banner most likely names too (postscreen's
    # teaser is its $smtpd_banner).
    if not settings.teaser:
        return b""
    return teaser_line(settings.teaser_text or socket.gethostname())


class Admission:
    """Refuse, pass at once or hold each client, as the policy and the hold decide."""

    def __init__(
        self,
        settings: Settings,
        trusted: TrustedNetworks,
        max_held: int,
        pen: HoldingPen,
        dispatch: Dispatch,
        log: EventLog,
    ) -> None:
        self.pen = pen
        self.dispatch = dispatch
        self.log = log
        self.max_held = max_held
        #: Clients turned away at a limit, by limit.
        self.refusals: collections.Counter[Refuse] = collections.Counter()
        #: The batched pass-cache lookups (None without a cache), set by the server.
        self.lookups: BatchedLookups[Held] | None = None
        #: The DNS lists' lookups (None without lists), set by the server.
        self.dns: DnsLookups[Held] | None = None
        #: Connections held elsewhere that --max-held counts too (the intake's
        #: header-pending ones), set by the server.
        self.also_held: Callable[[], int] = lambda: 0
        self._penalties = settings.penalty_ttl > 0
        #: --cache-v6-prefix takes effect after a restart: the cache's keys (and the
        #: pen's --max-per-client count) keep the one repeld started with.
        self._v6_prefix = settings.cache_v6_prefix
        # limit -> (time of the last overload event, refusals since then)
        self._overload: dict[Refuse, tuple[float, int]] = {}
        self.configure(settings, trusted, settings.dns_policy())

    def configure(
        self, settings: Settings, trusted: TrustedNetworks, dns_policy: DnsPolicy | None
    ) -> None:
        """Take (new) settings for the next clients; held ones keep theirs."""
        self.settings = settings
        self.policy = Policy(trusted, self.max_held, settings.max_per_client)
        self.teaser = teaser_for(settings)
        #: The lists' thresholds and action, made once per configuration.
        self.dns_policy = dns_policy

    def client(
        self,
        sock: socket.socket,
        conn: ConnInfo,
        backend: BackendTarget | None,
        nodelay: bool,
        now: float,
    ) -> None:
        """Decide what happens to one client now: refused, passed, or held."""
        policy = self.policy
        client = conn.client
        reason = policy.at_once(client, nodelay)
        if reason is not None:  # counts nothing: the limits protect the pen only
            self.dispatch.passed(sock, conn, now, _AT_ONCE[reason], backend)
            return
        pen = self.pen
        held_from_client = pen.per_client.get(pen.client_key(client), 0)
        refused = policy.limit(len(pen) + self.also_held(), held_from_client)
        if refused is None:
            self._hold(sock, conn, backend, now)
        else:
            self.refuse(sock, conn, refused, now)

    def _hold(
        self, sock: socket.socket, conn: ConnInfo, backend: BackendTarget | None, now: float
    ) -> None:
        key = None
        if self.lookups is not None:
            try:
                key = cache_key(conn.client, self._v6_prefix)
            except ValueError:
                pass
        settings = self.settings
        dns = self.dns
        hold = Hold(
            now,
            settings.delay,
            cache_pending=key is not None,
            observe=settings.on_early == "log",
            enforce=settings.on_early == "enforce",  # --on-early enforce
            teaser=self.teaser,
            dns=self.dns_policy if dns is not None else None,
        )
        held = Held(sock, conn, hold, backend)
        known = dns.known(conn.client, now) if dns is not None else None
        # A score every list's answer is still cached for: judged before the
        # hold begins, so a client allowed or blocked is never teased nor watched.
        if known is not None and not self.dispatch.settle(held, hold.listed(known, now)):
            return
        if self.teaser and not self._tease(held, now):
            return
        try:
            self.pen.add(held)
        except OSError:  # the kernel's limit, not this client's: turned away, not lost
            self.refuse(sock, conn, Refuse.KERNEL, now)
            return
        if key is not None:
            # The hold has begun; a known client is let out as soon as the
            # cache answers, so a slow cache never delays anyone further,
            # and a talker's verdict waits for that answer (core/hold.py).
            assert self.lookups is not None
            self.lookups.ask(key, held)
        if dns is not None and known is None:
            # In parallel with the cache; the hold never waits for either.
            dns.ask(conn.client, held)

    def _tease(self, held: Held, now: float) -> bool:
        """Send the teaser line before the hold begins; False if the client is gone.

        Never blocking: a fresh socket takes one line at once, and one that does
        not is the core's to judge (a hang-up), so the pen never waits on a write.
        A client whose bytes (or end) came before the teaser could go out never
        hears it: the pen's first look judges it, untouched, as not teased.
        """
        spoke = spoke_first(held.sock)
        if spoke:
            return True
        hold = held.hold
        sent = None if spoke is None else send_now(held.sock, hold.opening())
        verdict = hold.reset(now) if sent is None else hold.opened(sent, now)
        if isinstance(verdict, Wait):
            return True
        assert isinstance(verdict, HangUp)
        abort(held.sock)
        self.log.emit(events.hangup(held.conn, verdict))
        return False

    def cache_answered(self, held: Held, answer: CacheVerdict) -> None:
        """The pass cache's answer about a held client (BatchedLookups' callback)."""
        hold = held.hold
        if hold.awaiting_cache:  # else too late: the talk was judged without it
            decide = cache_answer(hold, answer, self._penalties)
            self.pen.settle(held, decide, lambda now: hold.look_before_cache(answer, now))

    def dns_answered(self, held: Held, result: DnsScore) -> None:
        """The DNS lists' answer about a held client (DnsLookups' callback)."""
        hold = held.hold
        if hold.awaiting_dns:  # else decided meanwhile: the answer is not needed
            self.pen.settle(
                held,
                lambda now: hold.listed(result, now),
                lambda now: hold.look_before_lists(result, now),
            )

    def refuse(self, sock: socket.socket, conn: ConnInfo, limit: Refuse, now: float) -> None:
        """Turn a client away at `limit` with its 421, counted."""
        reply_and_close(sock, REFUSALS[limit])
        self.refusals[limit] += 1
        # Under a flood one event a second stands for every refusal in it.
        last, count = self._overload.get(limit, (-OVERLOAD_EVENT_INTERVAL, 0))
        count += 1
        if now - last >= OVERLOAD_EVENT_INTERVAL:
            self.log.emit(events.overload(conn, str(limit), count))
            self._overload[limit] = (now, 0)
        else:
            self._overload[limit] = (last, count)

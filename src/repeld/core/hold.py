"""The greeting-delay decision for one connection, with no I/O at all.

This file is the whole of what repeld considers a violation. A `Hold` is fed
what the shell observed on the socket -- peeked bytes, end of file, a reset,
or silence at the deadline -- the pass cache's answer, and the time, and
answers with a verdict. It never touches a socket, a clock or trio, so every
rule here is tested in microseconds (tests/unit/test_core.py) and the shell
stays thin.

Five things are fixed at construction: `cache_pending` (the pass cache has
been asked about this client and its answer is to come), `observe`
(`--on-early log`: an early talker is written down, never cut off),
`enforce` (`--on-early enforce`: an early talker is held to the end of the
delay, then repeld's own dialogue, core/enforce.py, refuses its recipients),
`teaser` (`--teaser`: the line the client hears as the hold begins, b"" for
none) and `dns` (the DNS lists' thresholds and block action, core/dnsbl.py,
when lists are configured and asked about this client). The life of a held
connection is a small table (T = the talk, W = talk time + CACHE_WAIT, D = the
end of the delay):

    state     input                  -> verdict                         state
    HOLDING   teaser sent in full    -> Wait(D)                         HOLDING
    HOLDING   teaser sent in part    -> HangUp (reset)                  DONE
    HOLDING   data                   -> EarlyTalk                       DONE
    HOLDING   data, cache pending    -> Mute(W)                         TALKED
    HOLDING   data, observe          -> Logged(T, Mute(D))              OBSERVING
    HOLDING   data, FLOOD_LIMIT bytes or more
                                     -> T, whatever the mode            DONE
    HOLDING   eof / reset            -> HangUp                          DONE
    HOLDING   silence, early         -> Wait(D)                         HOLDING
    HOLDING   silence, due           -> Pass("delay")                   DONE
    HOLDING   cache: good, no lists  -> Pass("cache")                   DONE
    HOLDING   cache: bad             -> Penalty                         DONE
    HOLDING   cache: bad, observe    -> Logged(Penalty, Wait(D))        HOLDING
                      and dns kept   -> Logged(Penalty, as "dns: ...")
    HOLDING   cache: unknown         -> Wait(D)                         HOLDING
    TALKED    cache: good, no lists  -> Pass("cache", early_bytes)      DONE
    TALKED    cache: bad             -> Penalty                         DONE
                           observe   -> Logged(T, Mute(D))              OBSERVING
    TALKED    cache: unknown, or due at W
                                     -> EarlyTalk (T)                   DONE
                           observe   -> Logged(T, Mute(D))              OBSERVING
    TALKED    due before W           -> Mute(W)                         TALKED
    TALKED    eof (half-close)       -> Mute(W)                         TALKED
    TALKED    reset                  -> EarlyTalk (T)                   DONE
                           observe   -> Logged(T, HangUp)               DONE
    OBSERVING due at D               -> Pass("delay", early_bytes)      DONE
              ... the lists block    -> as HOLDING at D (drop/reject: Blocked;
                                        log: Logged(Blocked, Pass); delay:
                                        Logged(Blocked, Mute(B)))
    OBSERVING eof (half-close)       -> Mute(D)                         OBSERVING
    OBSERVING reset                  -> HangUp                          DONE
    TALKED, OBSERVING flood          -> T, its bytes counted            DONE
    HOLDING   dns: allow             -> Pass("dnswl")                   DONE
    HOLDING   dns: block, drop/reject-> Blocked                         DONE
    HOLDING   dns: block, log        -> Logged(Blocked, Wait(D))        HOLDING
    HOLDING   dns: block, delay      -> Logged(Blocked, Wait(B))        HOLDING, held to B
    HOLDING   dns: neither           -> Wait(D)                         HOLDING
    HOLDING   dns: not settled       -> Wait(D), the answers kept       HOLDING
    HOLDING   dns: any, cache pending-> Wait(D), the answer kept        HOLDING
    HOLDING   cache: unknown, dns kept -> as "dns: ..." above
    HOLDING   cache: good, dns kept or settled:
                           block     -> as "dns: block" (log: then Pass("cache"))
                           else      -> Pass("cache")                   DONE
    HOLDING   cache: good, dns not settled
                                     -> Wait(D), waiting for the lists  HOLDING (good)
    HOLDING   silence, due, dns not settled: judged by the answers received
                           block     -> as "dns: block" (log: then Pass("delay"))
                           else      -> Pass("delay")                   DONE
    HOLDING   silence, due, dns kept (the cache has not answered): as above
    HOLDING (good) dns settled       -> as "cache: good, dns settled"
    TALKED    dns: any               -> Mute(W), the answer kept        TALKED
    TALKED    cache: good, dns block -> the talk stands, as "cache: unknown"
    TALKED    cache: good, dns not settled -> Mute(D)                   TALKED (good)
    HOLDING (good) data              -> Mute(D)                         TALKED (good)
    TALKED (good) dns settled, or due at D: block -> the talk stands
                                     else -> Pass("cache", early_bytes) DONE
    OBSERVING dns: any               -> Mute(D), the answer kept (judged at D)
    -- enforce (--on-early enforce; OBSERVING is shared, its end differs) --
    HOLDING   data, enforce          -> Mute(D)                         OBSERVING
    TALKED    cache: bad or unknown, or due at W, enforce
                                     -> Mute(D) (Enforce(T) if past D)  OBSERVING
    TALKED    reset, enforce         -> Enforce(T, gone)                DONE
    OBSERVING due at D, enforce      -> Enforce(T)                      DONE
    OBSERVING reset, enforce         -> Enforce(T, gone)                DONE
    HOLDING   cache: bad, enforce    -> Penalty (as drop)               DONE
    DONE      anything               -> LocalProtocolError (a bug in the shell)

(B = accept + --dnsbl-delay, longer than the delay. A client held to B gets
Wait(B) for its silence at D, and "silence, due" at B; `deadline` stays D.)

In enforce mode the talk is written down once, at the end (`Enforce`): the
shell greets the talker then and serves its dialogue (shell/enforce.py), and
the early-talker event carries the envelope it gave. A talker that leaves
before its greeting gets `Enforce(gone=True)`: no dialogue, the same event.
While a TALKED hold waits in enforce mode an answer of bad is the same as
unknown (the talk is audited, not cut unheard); a silent client the cache
remembers as an early talker is cut off unheard (`Penalty`) as with drop.

A talker whose cache answer is still to come is not judged on its bytes: a
client the cache remembers as patient (an Exim with PIPECONNECT sends EHLO,
MAIL and RCPT before the banner) is passed with those bytes still unread in
the socket. `Mute` tells the shell to stop watching the socket for each byte
(they are there already) and to call `due()` at its deadline. The wait is
bounded by CACHE_WAIT after the talk: no answer by then counts as unknown.
In observe mode a talker that the cache is bad about is written down as a
talk (observe never cuts anyone off); while a TALKED hold waits in observe
mode, an answer of bad is the same as unknown.

A muted talker's further bytes are not watched one by one, but the shell says
when its unread bytes reach FLOOD_LIMIT or fill its socket's buffer (`flood()`;
`data()` when they came in that number at once), and then the talk ends the
hold at once, in every mode: under drop and reject it is cut off as any talker
(the cache's answer is not waited for); with --on-early log, which cuts nobody
off for talking, and with enforce, it is cut off too, written down as a drop:
observing it to the end would keep its bytes in the kernel for the whole
delay, and greeting it at once would let it out of the pen (and out of
--max-per-client's count) to start another session, and another, until every
enforce session was its.

The teaser (`opening()`, `opened()`) is the first line of a multi-line
greeting, `220-TEXT`: postscreen's pregreet test sends it too, so that a bot
that talks on seeing any line talks early. The MTA's greeting (one line or
several) completes the reply when the client is passed. A client whose fresh
socket cannot take one line at once is broken, not patient: it is reset, a
hang-up. A talker's `EarlyTalk.teased` says whether it had heard the teaser.

The DNS lists' answers (`listed`) come as the lists answer, each time with
the score so far and what the lists still to answer could add to it
(`DnsScore.reach`); the hold acts as soon as they settle the outcome
(`DnsPolicy.settled`): a client listed with weight 1 while only a list of
weight 1 is still to answer is blocked now, one allowed with -5 while only
that list is pending is allowed now. A silent list so never holds up the
others' verdict. The lists never make a new client wait longer than its
delay: at its end, it is judged by the answers received, the lists that have
not answered counting as not listing (postscreen at the end of its greet
wait); a hold decided first by its talk is not fed the answers. An observed
talker (--on-early log) is judged by them at the end of its delay, as a
silent client is: observing its talk is no reason to let a listed client in.

What repeld saw itself and the lists are weighed so that neither launders
the other. A remembered early talker is cut off even when a list allows it
(the cache's bad answer, asked in parallel, is waited for while the lists'
answer is kept). A client remembered as patient skips the delay, not the
lists: it is blocked if they block it; while they have not settled, it waits
for them (until the end of its delay at most; the lookups give up after
--dns-timeout), then passes. Only a client that waited the whole delay in
silence is remembered as patient (`Pass.remembered`): the allow lists, a
trusted network or a nodelay listener pass a client at once and have tested
nothing. Once a client has talked, its talk decides as above and the lists'
answer is only kept for the events (`dns_result`): an early talker is an
early talker whatever the lists say (an observed one, once its delay is
over, is blocked too if they block it), and a remembered client that talked
loses the cache's pardon if the lists block it.

"silence, due" must only be reported after a last non-blocking peek at the
deadline found nothing: bytes that arrive at the very end are still early
talk. Likewise an answer from outside that may end a watched client's hold
(the cache's good or bad word, or its "unknown" with the lists' judgement
kept; the lists' settling, once the cache has answered, but to "neither") is
fed only after a last peek, which the shell makes when `look_before_cache` or
`look_before_lists` says so: the peek and the answer come to two tasks, run
in either order, and bytes the client sent before the answer are talk before
it, whichever the shell hears first. At the end of the hold (the delay's, or
the lists' longer one) any answer is looked before: the shell's own deadline
may not have been served yet in that turn of its loop.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from repeld.core.dnsbl import DnsAction, DnsPolicy, DnsScore, Judgement
from repeld.core.names import PassReason

__all__ = [
    "CACHE_WAIT",
    "FIRST_BYTES_LIMIT",
    "FLOOD_LIMIT",
    "PEEK_LIMIT",
    "Blocked",
    "CacheVerdict",
    "EarlyTalk",
    "Enforce",
    "HangUp",
    "Hold",
    "LocalProtocolError",
    "Logged",
    "Mute",
    "Pass",
    "PassReason",
    "Penalty",
    "Verdict",
    "Wait",
    "escape_bytes",
    "teaser_line",
]

#: The most a peek asks of the kernel: enough to show what a bot said.
PEEK_LIMIT = 1024
#: The most a talker may have unread before its greeting while it waits (muted)
#: for a verdict: past it the talk ends its hold at once, whatever --on-early
#: says (`flood`). No mail client sends that much unasked (a PIPECONNECT Exim
#: sends one EHLO line; 16 KiB is some 400 pipelined RCPT lines), and the bytes
#: would sit in the kernel's memory for the whole delay: with the default
#: tcp_rmem, up to 128 KiB per talker against the 0.66 KiB of a silent client.
FLOOD_LIMIT = 16384
#: The escaped rendering of a talker's first bytes is cut at this many characters
#: (postscreen's PREGREET log line does the same).
FIRST_BYTES_LIMIT = 100
#: The longest a talker's verdict waits for the pass cache after the talk, in
#: seconds. A lookup gives up after 0.1 s (cache/sqlite.py, cache/redis.py) and
#: may wait behind one batch in flight (cache/lookup.py): 0.2 s, and as much
#: again for a busy event loop. After that the answer counts as unknown.
CACHE_WAIT = 0.5


def teaser_line(text: str) -> bytes:
    """The teaser of `--teaser`: the first line of a multi-line 220 greeting.

    RFC 5321 section 4.2: `220-` and a domain, then the MTA's own greeting
    lines, its last `220 `, end the reply. Bytes outside printable ASCII (an
    odd host name) become `?` so the line stays one line.
    """
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return b"220-" + clean.encode("ascii") + b"\r\n"


class LocalProtocolError(RuntimeError):
    """The shell fed a Hold after it had already decided: a bug in repeld."""


class CacheVerdict(enum.Enum):
    """What the pass cache knows of a client; the values are what cache/sqlite.py stores."""

    UNKNOWN = 0
    GOOD = 1
    BAD = 2


@dataclass(frozen=True, slots=True)
class Wait:
    """No verdict yet: report silence again at or after `deadline`."""

    deadline: float


@dataclass(frozen=True, slots=True)
class Mute:
    """No verdict yet, and the client's bytes are in: stop watching for each one
    more (only for a flood of them, `flood()`), and call `due()` at or after
    `deadline` (or `eof()`/`reset()` if it leaves)."""

    deadline: float


@dataclass(frozen=True, slots=True)
class Pass:
    """Hand the client to the MTA (`early_bytes`: what it sent before the greeting,
    still unread in the socket, so it reaches the MTA after the PROXY header)."""

    reason: PassReason
    elapsed: float
    early_bytes: int = 0

    @property
    def remembered(self) -> bool:
        """The pass cache learns the client as patient: it waited the whole delay
        in silence. Nothing else shows patience: a client passed at once (allow
        lists, a trusted network, a nodelay listener) was never tested, and one
        passed by the cache was remembered already."""
        return self.reason is PassReason.DELAY and not self.early_bytes


@dataclass(frozen=True, slots=True)
class EarlyTalk:
    """The client spoke before it was greeted: cut it off."""

    nbytes: int
    first: bytes
    elapsed: float
    #: The teaser line had gone out before the talk.
    teased: bool = False


@dataclass(frozen=True, slots=True)
class Enforce:
    """`--on-early enforce`: the talker was held to the end of the delay; greet it
    and answer its dialogue, refusing every recipient (core/enforce.py).

    `gone`: it left before that (an RST), so there is no one to greet; its talk
    is still written down.
    """

    talk: EarlyTalk
    elapsed: float
    gone: bool = False


@dataclass(frozen=True, slots=True)
class HangUp:
    """The client left before it was greeted (`reset` for an RST, else a FIN)."""

    elapsed: float
    reset: bool


@dataclass(frozen=True, slots=True)
class Penalty:
    """The pass cache remembers this client as an early talker: cut it off unheard."""

    elapsed: float


@dataclass(frozen=True, slots=True)
class Blocked:
    """The DNS lists' score reached --dnsbl-threshold (`action`: --dnsbl-action);
    `lists`, the lists that listed the client with a positive weight.

    Final for drop and reject; for log and delay it comes inside `Logged`.
    """

    score: int
    lists: tuple[str, ...]
    elapsed: float
    action: DnsAction


@dataclass(frozen=True, slots=True)
class Logged:
    """Write `note` down (action=log; for `Blocked`, its action), cut nobody off,
    carry on with `then`."""

    note: EarlyTalk | Penalty | Blocked
    then: Verdict


Verdict = Wait | Mute | Pass | EarlyTalk | Enforce | HangUp | Penalty | Blocked | Logged

# The states of a Hold (see the table at the top).
_HOLDING = 0
_TALKED = 1
_OBSERVING = 2
_DONE = 3


class Hold:
    """The decision for one held connection, from accept to verdict."""

    __slots__ = (
        "_blocked",
        "_dns",
        "_dns_more",
        "_good",
        "_kept",
        "_pending",
        "_settled",
        "_state",
        "_talk",
        "_teaser",
        "_until",
        "accepted_at",
        "deadline",
        "dns_result",
        "enforce",
        "observe",
        "teased",
    )

    def __init__(
        self,
        accepted_at: float,
        delay: float,
        *,
        cache_pending: bool = False,
        observe: bool = False,
        teaser: bytes = b"",
        dns: DnsPolicy | None = None,
        enforce: bool = False,
    ) -> None:
        if delay < 0:
            raise ValueError(f"delay must not be negative, got {delay!r}")
        if observe and enforce:
            raise ValueError("observe and enforce are two --on-early actions, not one")
        self.accepted_at = accepted_at
        self.deadline = accepted_at + delay
        # The end of the hold for a silent client: the delay's, or later for a
        # client the lists block with action delay. `deadline` itself never moves,
        # so the pen's deadline queues stay in order.
        self._until = self.deadline
        self.observe = observe
        self.enforce = enforce
        self._pending = cache_pending
        self._state = _HOLDING
        self._talk: EarlyTalk | None = None
        self._teaser = teaser
        #: The whole teaser line has been written to the client.
        self.teased = False
        self._dns = dns
        # More answers from the lists are to come.
        self._dns_more = dns is not None
        #: The lists' answers so far (for the events' score, lists and unanswered).
        self.dns_result: DnsScore | None = None
        # What the lists' answers settled, once they did.
        self._settled: Judgement | None = None
        # The settled answer, kept until the pass cache has answered.
        self._kept = False
        # The pass cache said good and the lists have not settled yet.
        self._good = False
        # The lists' block has been applied (its event given; with --dnsbl-action
        # delay, `_until` moved to its end).
        self._blocked = False

    @property
    def done(self) -> bool:
        """A final verdict has been given."""
        return self._state == _DONE

    @property
    def awaiting_cache(self) -> bool:
        """The pass cache's answer is still to come and would still count."""
        return self._pending and self._state < _OBSERVING

    @property
    def awaiting_dns(self) -> bool:
        """More of the DNS lists' answers are to come (feed them with `listed`)."""
        return self._dns_more and self._state != _DONE

    @property
    def talk(self) -> EarlyTalk | None:
        """What the client said early, if it talked (for the record of a talker
        still held when repeld stops)."""
        return self._talk

    @property
    def muted(self) -> bool:
        """The client has talked; its bytes are not to be watched any more."""
        return self._state in (_TALKED, _OBSERVING)

    def _check(self) -> None:
        if self._state == _DONE:
            raise LocalProtocolError("this connection has already been decided")

    def _finish(self) -> None:
        # Every final verdict ends the hold; a second one is a shell bug.
        self._check()
        self._state = _DONE

    def _elapsed(self, now: float) -> float:
        return max(0.0, now - self.accepted_at)

    def _early_bytes(self) -> int:
        return self._talk.nbytes if self._talk is not None else 0

    def _wait_until(self) -> float:
        # TALKED: the answer counts until CACHE_WAIT after the talk (one formula,
        # so the deadline the shell is given is the one due() compares with).
        assert self._talk is not None
        return self.accepted_at + self._talk.elapsed + CACHE_WAIT

    def _talk_stands(self, now: float) -> Verdict:
        # TALKED and the cache has nothing good to say: the talk decides.
        talk = self._talk
        assert talk is not None
        self._pending = False
        if self.enforce:
            self._state = _OBSERVING
            return self._observed(now)
        if not self.observe:
            self._state = _DONE
            return talk
        self._state = _OBSERVING
        return Logged(talk, self._observed(now))

    def _observed(self, now: float) -> Verdict:
        # OBSERVING: held for the whole delay, then passed with its bytes
        # (enforce: then served by repeld's own dialogue). With --on-early log
        # the lists judge the client at the end of the delay as they judge a
        # silent one: observing its talk is no reason to let a listed client in.
        if now < self.deadline:
            return Mute(self.deadline)
        if self.enforce:
            self._state = _DONE
            assert self._talk is not None
            return Enforce(self._talk, self._elapsed(now))
        if self._dns is not None and self.dns_result is not None:
            if not self._blocked:
                judgement = self._settled
                if judgement is None:
                    judgement = self._dns.judge(self.dns_result)
                if judgement is Judgement.BLOCK:
                    self._settled = judgement
                    return self._observed_block(now)
            elif now < self._until:  # blocked before it talked: its longer wait
                return Mute(self._until)
        self._state = _DONE
        return Pass(PassReason.DELAY, self._elapsed(now), self._early_bytes())

    def _observed_block(self, now: float) -> Verdict:
        # OBSERVING, the delay is over and the lists block: --dnsbl-action says
        # what follows, as for a silent client, the talk's bytes kept for smtpd.
        verdict = self._block(now)
        if not isinstance(verdict, Logged):  # dropped or rejected
            return verdict
        if now < self._until:  # --dnsbl-action delay: held on, muted
            self._state = _OBSERVING
            return Logged(verdict.note, Mute(self._until))
        self._state = _DONE
        return Logged(verdict.note, Pass(PassReason.DELAY, self._elapsed(now), self._early_bytes()))

    def opening(self) -> bytes:
        """What to write to the client as the hold begins: the teaser, or b"" for nothing."""
        self._check()
        return self._teaser if self._state == _HOLDING and not self.teased else b""

    def opened(self, sent: int, now: float) -> Verdict:
        """The shell wrote `sent` bytes of `opening()` without blocking.

        All of it: the hold goes on. Less: a fresh socket that cannot take one
        line belongs to a broken client, which is reset (a hang-up).
        """
        self._check()
        if self._state != _HOLDING:
            raise LocalProtocolError("opened() after the hold had moved on")
        if sent < len(self._teaser):
            self._state = _DONE
            return HangUp(self._elapsed(now), reset=True)
        self.teased = bool(self._teaser)
        return Wait(self.deadline)

    def data(self, peeked: bytes, now: float, total: int | None = None) -> Verdict:
        """Bytes seen before the greeting: early talk, whatever they are.

        `peeked` is what a bounded peek returned; `total`, when the shell knows
        it (FIONREAD), is how many bytes were waiting in all.
        """
        if not peeked:
            raise ValueError("data() needs at least one byte; use eof() for end of file")
        self._check()
        if self._state != _HOLDING:
            raise LocalProtocolError("data() after the client was muted")
        nbytes = max(len(peeked), total or 0)
        talk = EarlyTalk(nbytes, bytes(peeked[:PEEK_LIMIT]), self._elapsed(now), self.teased)
        self._talk = talk
        if nbytes >= FLOOD_LIMIT:
            return self._flooded()
        if self._pending or self._good:  # the cache's answer, or the lists', decides
            self._state = _TALKED
            return self._holding_on()
        if self.observe:
            self._state = _OBSERVING
            return Logged(talk, self._observed(now))
        if self.enforce:
            self._state = _OBSERVING
            return self._observed(now)
        self._state = _DONE
        return talk

    def flood(self, total: int, now: float) -> Verdict:
        """A muted talker's unread bytes reached FLOOD_LIMIT (`total` in all), or
        filled its socket's buffer: the talk ends the hold now, in every mode."""
        self._check()
        talk = self._talk
        if self._state == _HOLDING or talk is None:
            raise LocalProtocolError("flood() for a hold that was not muted")
        self._talk = replace(talk, nbytes=max(talk.nbytes, total))
        return self._flooded()

    def _flooded(self) -> Verdict:
        # A talker with too much unread: cut off at once, whatever the mode.
        talk = self._talk
        assert talk is not None
        self._state = _DONE
        return talk

    def _left(self, now: float, reset: bool) -> Verdict:
        if not reset and self._state == _TALKED:
            # Talked, then closed its side: a half-close, as an Exim that pipelined
            # its QUIT does; it still waits for the replies, so the cache decides.
            return self._holding_on()
        if not reset and self._state == _OBSERVING:
            return Mute(self.deadline)
        if self.enforce and self._state in (_TALKED, _OBSERVING):
            self._state = _DONE  # it talked, then reset: nobody to greet
            assert self._talk is not None
            return Enforce(self._talk, self._elapsed(now), gone=True)
        if self._state == _TALKED:  # it talked, then reset: the talk decides
            self._state = _DONE
            assert self._talk is not None
            if self.observe:  # written down, and gone: a hang-up, never a cut-off
                return Logged(self._talk, HangUp(self._elapsed(now), reset=True))
            return self._talk
        self._finish()
        return HangUp(self._elapsed(now), reset=reset)

    def eof(self, now: float) -> Verdict:
        """The client closed its side (FIN) before the greeting."""
        self._check()
        return self._left(now, reset=False)

    def reset(self, now: float) -> Verdict:
        """The connection was reset (RST) or failed before the greeting."""
        self._check()
        return self._left(now, reset=True)

    def _answer(self) -> None:
        self._check()
        if not self.awaiting_cache:
            raise LocalProtocolError("a cache answer that was not awaited")
        self._pending = False

    def look_before_cache(self, answer: CacheVerdict, now: float) -> bool:
        """Whether the shell peeks before it feeds the cache's `answer` at `now`:
        the answer may end the watched client's hold (a good word passes it, a
        bad one cuts it off, "unknown" lets a kept judgement of the lists decide,
        and at the end of the hold any answer may), and bytes the client sent
        before it must be heard first (the module's last paragraph). "Unknown"
        with nothing kept, before the end, leaves the client held, where the pen
        hears it anyway: no peek for most clients."""
        if self._state != _HOLDING or not self.awaiting_cache:
            return False
        if answer is CacheVerdict.UNKNOWN and now < self._until:
            return self._kept and self._settled is not Judgement.NEITHER
        return True

    def look_before_lists(self, result: DnsScore, now: float) -> bool:
        """Whether the shell peeks before it feeds the lists' `result` at `now`
        (as `look_before_cache`): it settles them, and the settled judgement
        acts now (the cache has answered) on a client that is watched; it
        allows or blocks it, or passes a client the cache called good; or the
        hold is at its end, where any answer may end it. Answers that settle
        nothing, or only to be kept for the cache, cost no peek."""
        if self._state != _HOLDING or self._dns is None:
            return False
        if now >= self._until:
            return True
        if self._settled is not None or self._pending:
            return False
        judgement = self._dns.settled(result)
        if judgement is None:
            return False
        return self._good or judgement is not Judgement.NEITHER

    def remembered_good(self, now: float) -> Verdict:
        """The pass cache knows this client waited before: pass it now, bytes and
        all, unless the lists block it; while they have not settled, it waits for
        them, until the end of its delay at most."""
        self._answer()
        if self._dns is None:
            self._state = _DONE
            return Pass(PassReason.CACHE, self._elapsed(now), self._early_bytes())
        if self._blocked and self._state == _HOLDING:
            # The lists' block was applied at the end of the delay, the cache
            # still silent (--dnsbl-action delay): the longer hold goes on, and
            # the block is not written down twice.
            return Wait(self._until)
        if self._settled is not None:
            self._kept = False
            return self._after_good(self._settled, now)
        self._good = True
        if now >= self.deadline:
            return self._after_good(self._dns.judge(self.dns_result or DnsScore()), now)
        return self._holding_on()

    def remembered_bad(self, now: float) -> Verdict:
        """The pass cache holds a penalty for this client: cut it off now.

        In observe mode nobody is cut off: a silent client's penalty is written
        down and it is held as usual; a talker's talk is written down instead.
        """
        self._answer()
        if self.enforce and self._state == _TALKED:  # the talk is audited, not cut unheard
            return self._talk_stands(now)
        if not self.observe:
            self._state = _DONE
            return Penalty(self._elapsed(now))
        if self._state == _TALKED:
            return self._talk_stands(now)
        then: Verdict = Wait(self._until)
        if self._kept:  # held as usual: the lists' answer applies
            self._kept = False
            assert self._settled is not None
            then = self._judge(self._settled, now)
        return Logged(Penalty(self._elapsed(now)), then)

    def unknown(self, now: float) -> Verdict:
        """The pass cache knows nothing of this client (or could not answer)."""
        self._answer()
        if self._state == _TALKED:
            return self._talk_stands(now)
        if self._kept:
            self._kept = False
            assert self._settled is not None
            return self._judge(self._settled, now)
        return Wait(self._until)

    def listed(self, result: DnsScore, now: float) -> Verdict:
        """The DNS lists' answers so far: their score, the lists that listed the
        client, those still to answer and what their weights could still add.

        Fed again as answers come, as long as `awaiting_dns`; acted on once the
        answers received settle the outcome (`DnsPolicy.settled`). Lists that
        will not answer (gave up) count as not listing.
        """
        self._check()
        if not self.awaiting_dns:
            raise LocalProtocolError("a DNS answer that was not awaited")
        assert self._dns is not None
        self.dns_result = result
        self._dns_more = result.reach != (0, 0)
        if self._settled is not None:  # decided already; kept for the events
            return self._holding_on()
        judgement = self._dns.settled(result)
        if judgement is None:  # the lists still to answer could change it
            if self._good and self._state == _TALKED and now >= self.deadline:
                return self._after_good(self._dns.judge(result), now)
            return self._holding_on()
        self._settled = judgement
        if self._state == _OBSERVING:
            return Mute(self.deadline)
        if self._good:  # the cache said good, waiting for the lists
            return self._after_good(judgement, now)
        if self._state == _TALKED:
            return Mute(self._wait_until())
        if self._pending:  # the pass cache speaks first
            self._kept = True
            return Wait(self._until)
        return self._judge(judgement, now)

    def _holding_on(self) -> Verdict:
        # No verdict yet: what the shell waits for next, in the current state.
        if self._state == _HOLDING:
            return Wait(self._until)
        if self._state == _OBSERVING:
            return Mute(self.deadline)
        return Mute(self.deadline if self._good else self._wait_until())

    def _judge(self, judgement: Judgement, now: float) -> Verdict:
        # HOLDING, the cache has nothing to say: the lists decide, or the hold goes on.
        if judgement is Judgement.ALLOW:
            self._state = _DONE
            return Pass(PassReason.DNSWL, self._elapsed(now))
        if judgement is Judgement.NEITHER:
            return Wait(self._until)
        return self._block(now)

    def _block(self, now: float) -> Verdict:
        # HOLDING, the lists block: --dnsbl-action says what follows.
        assert self._dns is not None and self.dns_result is not None
        result = self.dns_result
        action = self._dns.action
        blocked = Blocked(result.score, result.blocking, self._elapsed(now), action)
        self._blocked = True
        if action in (DnsAction.DROP, DnsAction.REJECT):
            self._state = _DONE
            return blocked
        if action is DnsAction.DELAY:
            self._until = max(self._until, self.accepted_at + self._dns.block_delay)
        if now >= self._until:  # judged at the end of the wait: written down, passed
            self._state = _DONE
            return Logged(blocked, Pass(PassReason.DELAY, self._elapsed(now)))
        return Logged(blocked, Wait(self._until))

    def _after_good(self, judgement: Judgement, now: float) -> Verdict:
        # The cache remembers the client as patient and the lists have spoken (or
        # the wait for them is over): the cache skips the delay, not the lists.
        self._good = False
        if self._state == _TALKED:
            if judgement is Judgement.BLOCK:  # no pass to forgive the talk with
                return self._talk_stands(now)
            self._state = _DONE
            return Pass(PassReason.CACHE, self._elapsed(now), self._early_bytes())
        if judgement is not Judgement.BLOCK:
            self._state = _DONE
            return Pass(PassReason.CACHE, self._elapsed(now))
        assert self._dns is not None
        if self._dns.action is DnsAction.LOG:
            verdict = self._block(now)
            assert isinstance(verdict, Logged)
            self._state = _DONE
            return Logged(verdict.note, Pass(PassReason.CACHE, self._elapsed(now)))
        return self._block(now)

    def due(self, now: float) -> Verdict:
        """A muted hold's deadline (the one `Mute` gave) has come."""
        self._check()
        if self._state == _OBSERVING:
            return self._observed(now)
        if self._state != _TALKED:
            raise LocalProtocolError("due() for a hold that was not muted")
        if self._good:  # the cache said good; the lists had until the delay's end
            if now < self.deadline:
                return Mute(self.deadline)
            assert self._dns is not None
            return self._after_good(self._dns.judge(self.dns_result or DnsScore()), now)
        wait_until = self._wait_until()
        if now < wait_until:
            return Mute(wait_until)
        return self._talk_stands(now)

    def silence(self, now: float) -> Verdict:
        """Nothing to read now: wait on, or pass once the delay is over."""
        self._check()
        if self._state != _HOLDING:
            raise LocalProtocolError("silence() for a muted hold; use due()")
        if now < self._until:
            return Wait(self._until)
        if self._settled is None and self.dns_result is not None:
            # The delay is over and the lists have not settled: judged by the
            # answers received, the others counting as not listing (postscreen at
            # the end of its greet wait).
            assert self._dns is not None
            self._settled = self._dns.judge(self.dns_result)
            self._good = False
            if self._settled is Judgement.BLOCK:
                return self._block(now)
        elif self._kept:
            # The lists settled while the cache's answer was awaited, and it has
            # not come by the end of the delay (a slow cache): their judgement
            # applies now, as the answer "unknown" would have applied it. Passed
            # unjudged, a listed client got through whenever the cache was slow.
            self._kept = False
            if self._settled is Judgement.BLOCK:
                return self._block(now)
        self._state = _DONE
        return Pass(PassReason.DELAY, self._elapsed(now))


def _escape_table() -> list[str]:
    table = [f"\\x{b:02x}" for b in range(256)]
    for b in range(0x20, 0x7F):
        table[b] = chr(b)
    table[ord("\\")] = "\\\\"
    table[ord("\r")] = "\\r"
    table[ord("\n")] = "\\n"
    return table


_ESCAPES = _escape_table()
#: The same with commas as `\\x2c`, for an item of a comma-separated list.
_ESCAPES_COMMA = [*_ESCAPES[:0x2C], "\\x2c", *_ESCAPES[0x2D:]]


def escape_bytes(data: bytes, limit: int = FIRST_BYTES_LIMIT, *, commas: bool = False) -> str:
    """Render untrusted client bytes as printable ASCII, cut at `limit` characters.

    `\\r`, `\\n` and `\\\\` are spelled out, anything else outside printable
    ASCII becomes `\\xNN`; an escape sequence is never cut in half. `commas`:
    a comma too (`\\x2c`), so that an item of a list can never pass for two,
    within the same limit.
    """
    table = _ESCAPES_COMMA if commas else _ESCAPES
    out: list[str] = []
    used = 0
    for b in data:
        piece = table[b]
        if used + len(piece) > limit:
            break
        out.append(piece)
        used += len(piece)
    return "".join(out)

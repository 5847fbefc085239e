"""When the accept loop lets new connections gather, and when it takes each at once.

Pure: fed how many clients a wake-up of the accept loop took and the time, it
answers how long to sleep before the next accept (a gathering window) or None
(wait for the next connection). shell/accept.py does the accepting and the
sleeping; the reasons for gathering are in its docstring: on the 2-CPU VM of
docs/PERFORMANCE.md each wake-up of the process cost more than a client's
whole accept, and one wake-up for many clients roughly halved the CPU of a
client handed to smtpd.

The rules, in order:

- a listener with a short accept queue (`may_gather` False), a process that
  relays sessions (their bytes wake it anyway), or a flood (a wake-up that took
  `FLOOD` clients or more; for `FLOOD_PAUSE`) never gathers;
- a wake-up that took two clients or more starts gathering, and gathering goes
  on for as long as each window brings a client or more; each window is sized
  from what the one before brought, aiming at `CLIENTS` clients, between
  `SHORTEST` and `longest`;
- **clients that wait for repeld** (the probe). A gathering window costs each
  client up to its length. Independent clients (MTAs of the world) do not
  come any slower for it, but a client that opens its next connection only
  when the last is done (a relay flushing its queue over a few connections,
  smtp-source) does: two such connections at a time were served at 183
  messages a second with gathering against 673 without, and at more CPU per
  message, not less (docs/PERFORMANCE.md). A busy time begins with a wake-up
  that starts gathering and goes on through the breaks between stretches of
  gathering; it ends at its probe, when nobody comes for `PROBE_FIRST`, or
  when gathering may not go on (a flood, relaying, a lean). On the first tick
  of the probes' period at least `PROBE_FIRST` into it (so 0.5 to 1 s), if its
  windows were less than half full (`half_full`, `CLIENTS` / 2: a load that
  waiting clients can make, and at which gathering saves less; with --workers
  the worker that gathers takes every worker's clients, so the same mark
  holds), the loop takes each
  client at once until `PROBE_SPAN_LONGEST` after the tick;
  if clients came `LEAN_RATIO` times faster then than in the last
  `PROBE_SPAN_LONGEST` before the tick, they were waiting for the windows, and
  the loop does not gather for `LEAN_PAUSE`. The rate it compares with is that
  of the stretch just before, as long as the probe (with `PROBE_MIN` clients
  in each, and a probe that begins within `PROBE_SPAN` of its tick, or the
  probe proves nothing): a busy time may begin with a load
  still coming up, or span a break of up to `PROBE_FIRST` between two bursts,
  and its rate as a whole made clients that came as fast either way look 1.5
  to 2.2 times faster in the probe (docs/perf-log/2026-12-07-afternoon.md:
  each such probe cost ten seconds of taking clients at once, about twice the
  CPU per handed-off client, for no more messages a second). Otherwise, if
  `PROBE_MIN` clients or more came in the probe, the load is on and it
  gathers on at once, a new busy time (left to begin again with a wake-up
  that found two waiting, it took each client at once for about 100 wake-ups
  per worker at 1,000 a second); fewer, and it waits for the next busy
  wake-up. It probes again later and later
  (on ticks of 2, 8, then 16 s: `PROBE_LONGEST`): under a steady load the
  probes soon cost next to nothing;
- **probes keep time with the other workers'**. With --workers each worker
  decides on its own, and a worker probing alone sees little: the other
  workers' windows still slow the clients it takes at once (two connections
  through two workers: 210 messages a second before the probe, 219-300 with
  probes begun whenever each worker's stretch was due; two workers break each
  other's stretches every few windows, which is why a busy time spans the
  breaks). So a probe begins only
  on a tick of a clock every process on the host reads alike (the monotonic
  clock; the shell passes it as `now`): a multiple of the probe's period, half
  a second at first, then 2, 8 and 16 s. Workers under the same load probe
  together, and the periods nest (each is a multiple of the one before), so a
  worker that probes less often still finds the others probing with it. In
  one process this only moves a probe to the next tick. With the lead (next)
  one worker gathers for all, and it probes for all (`Role.AT_ONCE`): it keeps
  the lead through its probe and takes every worker's clients at once, so
  that its count before and during the probe is of the same clients. (It
  looked at every socket each millisecond before, a wake-up each whether a
  client came or not: with two workers the probes were a quarter of the
  accept loop's wake-ups in bench-relay's rounds, docs/perf-log/
  2026-12-07-late.md.)
- **one worker gathers for every worker** (`lead_role`). With --workers, each
  worker has a socket of its own per listener (SO_REUSEPORT) and the kernel
  spreads the clients; two workers gathering each its share woke the host half
  as often again as one process for the same clients (0.14 against 0.10
  wake-ups a message in front of Postfix), and each wake-up of a process costs
  more than a client's accept. So one lead per listener is shared by the
  workers: a worker whose wake-up starts or goes on gathering takes it if it is
  free, and then at each window's end takes the clients of every worker's
  socket; a worker that finds it taken lets its own socket wait for the lead's
  windows, and sleeps until the lead is let go. The lead is let go as soon as
  its worker stops gathering (a quiet listener, a flood, a relay, or `ROOM` of
  one of its limits in use: the clients it takes stay its own), except for a
  probe and a lean, through which it keeps the lead and takes every worker's
  clients at once (`Role.AT_ONCE`, `Gathering.at_once_until`: a lean found by
  the worker that leads holds for all, where another worker would have
  gathered the same clients again until a probe of its own), and
  then each worker takes its own clients again (a worker without room may
  gather its own socket in windows of its own); while it is held, a worker
  that need not gather follows too, unless it is in a flood. A worker that
  takes the lead begins its busy time again (`took_lead`): what it counted
  before was its own share. Under a
  load that needs gathering one process does the accepting for the host, as
  postscreen does; under one that needs more than a process, nobody gathers and
  the kernel's spreading stands. The lead worker sees every client, so it
  gathers with one process's windows and half-full mark.
"""

from __future__ import annotations

import enum
import math

__all__ = [
    "CLIENTS",
    "FLOOD_PAUSE",
    "LEAN_PAUSE",
    "LEAN_RATIO",
    "PROBE_FIRST",
    "PROBE_LONGEST",
    "PROBE_MIN",
    "PROBE_SPAN",
    "PROBE_SPAN_LONGEST",
    "ROOM",
    "SHORTEST",
    "Gathering",
    "Role",
    "lead_role",
    "room",
    "tick",
]

#: The shortest window, and how many clients a window aims to gather.
SHORTEST = 0.002
CLIENTS = 16
#: After a wake-up that took `flood` clients or more, no gathering for this long:
#: under a flood every wake-up finds many anyway.
FLOOD_PAUSE = 1.0
#: A probe follows at least `PROBE_FIRST` of a busy time (gathering, and the
#: breaks between its stretches), on the next tick of its period: `PROBE_FIRST`
#: at first, then four times longer after each probe that found nothing, up to
#: `PROBE_LONGEST` (each a multiple of the one before). Nobody for `PROBE_FIRST`
#: (the load went away) starts over.
PROBE_FIRST = 0.5
PROBE_LONGEST = 16.0
#: A probe ends `PROBE_SPAN_LONGEST` after its tick, so that the workers that
#: began it together end it together (a worker that ended first would gather
#: again while the others still measure); a quarter of a second is 25 to 50
#: clients at the 100 to 200 a second that two waiting connections came at
#: while gathered, per worker of two. At least `PROBE_SPAN` after a wake-up
#: that came late for its tick.
PROBE_SPAN = 0.05
PROBE_SPAN_LONGEST = 0.25
#: Clients this much faster during the probe than while gathering: they waited
#: for the windows. Fewer than `PROBE_MIN` clients in the probe, or in the
#: stretch of the same length before it, prove nothing.
LEAN_RATIO = 1.5
PROBE_MIN = 8
#: How long the loop then takes each client at once before it gathers again.
LEAN_PAUSE = 10.0
#: A worker leads only while less than this share of each of its limits is in
#: use (`room`): the clients it takes stay its own (held, in a program, in an
#: enforce session), and its limits are its own.
ROOM = 0.5


class Role(enum.Enum):
    """What a worker's accept loop does after a wake-up, where workers share a lead."""

    #: Take its own socket's clients only, as a lone process does (each at once,
    #: or in its own windows); it holds no lead.
    LISTEN = "listen"
    #: Hold the lead: sleep the window, then take the clients of every worker's socket.
    GATHER = "gather"
    #: Another worker holds the lead and takes this one's clients too: sleep until
    #: it lets the lead go.
    FOLLOW = "follow"
    #: Hold the lead and take the clients of every worker's socket at once, as
    #: one process takes its own (the shell waits on all of them, and for the
    #: time `Gathering.at_once_until` says): through a probe, and through a
    #: lean, which the other workers then keep too.
    AT_ONCE = "at-once"


def lead_role(
    window: float | None,
    holds: bool,
    free: bool,
    *,
    room: bool = True,
    flood: bool = False,
    at_once: bool = False,
) -> Role:
    """The role after a wake-up whose gathering answered `window` (None: do not
    gather), for a worker that `holds` the lead, or else found it `free` (the
    shell claims it when the worker would gather, so free then means it is
    this worker's now). A worker that gets LISTEN while it holds the lead lets
    it go.

    - A worker without `room` (`room()`) neither takes nor keeps the lead:
      whoever leads takes its clients, so the load goes to a worker with room.
    - In a `flood` every worker takes its own clients: none leads or follows.
    - A worker that takes clients `at_once` (`Gathering.at_once_until`: a
      probe, a lean) with the lead keeps it, and takes every worker's clients
      at once (AT_ONCE): a probe counts every worker's clients, and a lean
      found by one worker holds for all.
    - A worker that need not gather follows all the same while another holds
      the lead: that one takes its socket's clients in its windows, and
      listening would only take them one wake-up each, ahead of the windows
      (two workers in front of Postfix: 0.27 wake-ups a message, not 0.10).
    """
    if flood:
        return Role.LISTEN
    if holds or free:
        if not room:
            return Role.LISTEN
        if at_once:
            return Role.AT_ONCE
        return Role.GATHER if window is not None else Role.LISTEN
    return Role.FOLLOW


def room(counts: tuple[tuple[int, int], ...]) -> bool:
    """Each (in use, limit) of a worker has less than `ROOM` of the limit in use."""
    return all(used < limit * ROOM for used, limit in counts)


def tick(after: float, period: float) -> float:
    """The first multiple of `period` at or after `after`."""
    return math.ceil(after / period) * period


class Gathering:
    """The gathering decisions of one accept loop: `after_wakeup` after each wake-up."""

    __slots__ = (
        "_flood",
        "_flood_until",
        "_gathered",
        "_half_full",
        "_last",
        "_lean_until",
        "_longest",
        "_mark",
        "_may_gather",
        "_probe",
        "_probe_after",
        "_relaying",
        "_since",
        "_taken",
        "_tick",
        "_windows",
        "gathering",
        "window",
    )

    def __init__(
        self,
        longest: float,
        may_gather: bool,
        flood: int,
        half_full: float = CLIENTS / 2,
    ) -> None:
        self._longest = longest
        self._may_gather = may_gather
        self._flood = flood
        #: Clients a window takes on average at which a busy time is not probed.
        self._half_full = half_full
        #: The next window's length.
        self.window = longest / 2
        #: The last answer was a window.
        self.gathering = False
        self._flood_until = -math.inf
        self._lean_until = -math.inf
        #: The last wake-up said sessions are relayed.
        self._relaying = False
        #: Since when the loop has been busy (from a wake-up that began gathering,
        #: through the breaks between its stretches, until its probe, a quiet
        #: `PROBE_FIRST`, or a time it may not gather); the clients since, and
        #: the windows and what they took.
        self._since: float | None = None
        self._taken = 0
        self._windows = 0
        self._gathered = 0
        #: The first wake-up of the busy time at or after `PROBE_SPAN_LONGEST`
        #: before its tick, and `_taken` then: where the rate that a probe is
        #: compared with is taken from (None before it).
        self._mark: tuple[float, int] | None = None
        #: While probing: (when it began, until when, clients so far, rate before).
        self._probe: tuple[float, float, int, float] | None = None
        #: The probes' period, and when this busy time's probe is due.
        self._probe_after = PROBE_FIRST
        self._tick = math.inf
        #: The last wake-up that took a client.
        self._last = -math.inf

    def after_wakeup(self, batch: int, now: float, relaying: bool) -> float | None:
        """The wake-up took `batch` clients and found no more waiting: how long to
        sleep before accepting again, or None to wait for the next connection."""
        self._relaying = relaying
        if self._probe is not None:
            if batch < self._flood and not relaying:
                return self._probing(batch, now)
            # A flood or a relay ends the probe (it proves nothing) as it ends
            # gathering: with the lead the probe's windows would go on.
            self._probe = None
        if now - self._last > PROBE_FIRST:  # the load went away: probe soon
            self._since = None
            self._probe_after = PROBE_FIRST
        if batch:
            self._last = now
        if self.gathering and batch:  # aim the next window at CLIENTS clients
            self.window = min(self._longest, max(SHORTEST, self.window * CLIENTS / batch))
        busy = batch >= 2 or (self.gathering and batch > 0)
        if batch >= self._flood:
            self._flood_until = now + FLOOD_PAUSE
        if not self._may_gather or relaying or now < self._flood_until or now < self._lean_until:
            self.gathering = False
            self._since = None
            return None
        if self._since is None:
            if not busy:
                self.gathering = False
                return None
            self._begin_busy(now)
        else:
            self._taken += batch
            if self.gathering:
                self._windows += 1
                self._gathered += batch
            if self._mark is None and now >= self._tick - PROBE_SPAN_LONGEST:
                self._mark = (now, self._taken)
        self.gathering = busy
        if now < self._tick:
            return self.window if busy else None
        self._since = None
        if self._gathered >= self._windows * self._half_full:
            # Windows half full or more: a load at which gathering pays
            # most, and which clients waiting for the windows would not make. No
            # probe; the next busy time is looked at later.
            self._probe_after = min(PROBE_LONGEST, 4 * self._probe_after)
            return self.window if busy else None
        marked, taken = self._mark if self._mark is not None else (now, self._taken)
        clients, span = self._taken - taken, now - marked
        # Too few clients or too short a stretch to compare with (a break just
        # before the tick, the tail of a burst), or a wake-up late for its tick
        # (a break across it: the stretch before runs through it, and the probe
        # is cut to PROBE_SPAN; clients that wait for the windows come at least
        # one a window): the probe runs, so that the workers still probe
        # together, but it proves nothing.
        proves = clients >= PROBE_MIN and span >= PROBE_SPAN and now - self._tick <= PROBE_SPAN
        rate = clients / span if proves else math.inf
        until = max(self._tick + PROBE_SPAN_LONGEST, now + PROBE_SPAN)
        self._probe = (now, until, 0, rate)
        self.gathering = False
        return None

    @property
    def probing(self) -> bool:
        """A probe is under way: the loop takes each client at once."""
        return self._probe is not None

    def at_once_until(self, now: float) -> float | None:
        """Until when a worker that holds the lead keeps it and takes every
        worker's clients at once (`Role.AT_ONCE`), or None: the probe's end,
        or through a lean (clients that wait for the windows) as long as they
        come, `PROBE_FIRST` after the last at most, and not while relaying.
        The shell wakes then if no client came, and the lead goes back.

        Through a lean, a worker that let the lead go would leave the others
        to gather again, each until a probe of its own found the clients
        waiting (0.5 to 1 s of windows they wait for, each)."""
        if self._probe is not None:
            return self._probe[1]
        if self._relaying or now >= self._lean_until or now - self._last > PROBE_FIRST:
            return None
        return min(self._lean_until, self._last + PROBE_FIRST)

    def took_lead(self, now: float) -> None:
        """This worker has just taken the workers' lead (`lead_role`): from now
        on it takes every worker's clients. A busy time, and a probe, begun
        before counted its own only, and would compare unlike with like (a
        rate before the probe of a share of the clients made them look 1.5
        times faster in it, and cost ten seconds of taking each at once): the
        busy time begins again now, and a probe under way proves nothing."""
        if self._probe is not None:
            began, until, clients, _ = self._probe
            self._probe = (began, until, clients, math.inf)
        elif self._since is not None:
            self._begin_busy(now)

    def _begin_busy(self, now: float) -> None:
        """A busy time begins now: nothing counted yet, its probe due on the
        first tick of the period at least PROBE_FIRST on."""
        self._since, self._taken, self._windows, self._gathered = now, 0, 0, 0
        self._tick = tick(now + PROBE_FIRST, self._probe_after)
        self._mark = None

    def flooded(self, now: float) -> bool:
        """A wake-up took `flood` clients or more within FLOOD_PAUSE."""
        return now < self._flood_until

    def _probing(self, batch: int, now: float) -> float | None:
        assert self._probe is not None
        began, until, clients, rate = self._probe
        clients += batch
        if batch:
            self._last = now
        if now < until:
            self._probe = (began, until, clients, rate)
            return None
        self._probe = None
        if now - until > PROBE_FIRST:  # the load went away during it: it proves nothing
            self._probe_after = PROBE_FIRST
            return None
        if clients >= PROBE_MIN and clients / (now - began) > LEAN_RATIO * rate:
            self._lean_until = now + LEAN_PAUSE
            self._probe_after = PROBE_FIRST
            return None
        self._probe_after = min(PROBE_LONGEST, 4 * self._probe_after)
        if clients < PROBE_MIN:  # the load fell off: gather when it is back
            return None
        # The load is on, and gathering cost it nothing: it goes on at once,
        # as a new busy time. Left to begin again with a wake-up that finds two
        # clients waiting, it took each at once for ~100 wake-ups per worker
        # at 1,000 a second (docs/perf-log/2026-12-07-late.md).
        self._begin_busy(now)
        self.gathering = True
        return self.window

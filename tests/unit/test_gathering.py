"""The accept loop's gathering decisions (core/gathering.py), fed batches and times, no I/O."""

from __future__ import annotations

import copy

import pytest

from repeld.core.gathering import (
    CLIENTS,
    FLOOD_PAUSE,
    LEAN_PAUSE,
    PROBE_FIRST,
    PROBE_LONGEST,
    PROBE_MIN,
    PROBE_SPAN,
    PROBE_SPAN_LONGEST,
    ROOM,
    SHORTEST,
    Gathering,
    Role,
    lead_role,
    room,
    tick,
)

LONGEST = 0.010
FLOOD = 64
T0 = 1000.0


def gathering(may_gather: bool = True) -> Gathering:
    return Gathering(LONGEST, may_gather, FLOOD)


# (clients each wake-up took, relaying) in turn, one wake-up a millisecond apart
# -> the answers: the window slept next, or None (wait for the next client).
CASES: list[tuple[str, list[tuple[int, bool]], list[float | None]]] = [
    ("one at a time: each at once", [(1, False)] * 3, [None, None, None]),
    ("two at once: half the longest window", [(2, False)], [LONGEST / 2]),
    (
        "a window that brings one: the next is as long as it may be",
        [(2, False), (1, False), (1, False)],
        [LONGEST / 2, LONGEST, LONGEST],
    ),
    (
        "a window that brings many: the next is shorter, never under SHORTEST",
        [(2, False), (CLIENTS * 2, False), (CLIENTS * 3, False)],
        [LONGEST / 2, LONGEST / 4, SHORTEST],
    ),
    (
        "a window that brings nobody: back to waiting, and one at a time after it",
        [(2, False), (0, False), (1, False)],
        [LONGEST / 2, None, None],
    ),
    ("while sessions are relayed: never", [(2, True), (5, True)], [None, None]),
    ("a flood: at once", [(FLOOD, False), (2, False), (3, False)], [None, None, None]),
]


@pytest.mark.parametrize(("steps", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_wake_up_answers_as_the_table_says(
    steps: list[tuple[int, bool]], expected: list[float | None]
) -> None:
    g = gathering()
    answers = [
        g.after_wakeup(batch, T0 + i / 1000, relaying) for i, (batch, relaying) in enumerate(steps)
    ]
    assert answers == pytest.approx(expected)


def test_a_short_accept_queue_never_gathers() -> None:
    g = gathering(may_gather=False)
    assert [g.after_wakeup(n, T0 + n, False) for n in (2, 10, 40)] == [None, None, None]


def test_after_a_flood_gathering_waits_for_flood_pause() -> None:
    g = gathering()
    assert g.after_wakeup(FLOOD, T0, False) is None
    assert g.after_wakeup(2, T0 + FLOOD_PAUSE * 0.99, False) is None
    assert g.after_wakeup(2, T0 + FLOOD_PAUSE, False) == LONGEST / 2


def _gather(
    g: Gathering, now: float, per_window: int, span: float
) -> tuple[float, list[float | None]]:
    """Wake-ups `per_window` clients each, every window, for `span` seconds: (time, answers)."""
    answers: list[float | None] = []
    end = now + span
    while now < end:
        answer = g.after_wakeup(per_window, now, False)
        answers.append(answer)
        if answer is None:
            return now, answers
        now += answer
    return now, answers


def _probe(g: Gathering, now: float, every: float) -> tuple[float, list[float | None]]:
    """One client each `every` seconds until any probe is over: (time, answers).
    The last answer is the probe's end: None after a lean, else a window (the
    load is on: gathering goes on at once)."""
    answers: list[float | None] = []
    end = now + PROBE_SPAN_LONGEST
    while now <= end:
        now += every
        answers.append(g.after_wakeup(1, now, False))
        if answers[-1] is not None:
            break
    return now, answers


def test_clients_that_wait_for_the_windows_stop_the_gathering_for_lean_pause() -> None:
    # Two connections that each come back when the last is done (a relay flushing
    # its queue): two a window, however long the window; at once, far more a second.
    g = gathering()
    now, answers = _gather(g, T0, 2, PROBE_FIRST * 2)
    assert answers[-1] is None  # the probe begins after PROBE_FIRST of gathering
    assert PROBE_FIRST <= now - T0 < PROBE_FIRST + 2 * LONGEST
    assert all(a == LONGEST for a in answers[1:-1])  # 200 a second, gathered
    now, answers = _probe(g, now, 0.0015)  # taken at once: 667 a second
    assert answers == [None] * len(answers)
    # found waiting (at the probe's end, within the last PROBE_SPAN_LONGEST): no
    # gathering, however busy, for LEAN_PAUSE
    assert g.after_wakeup(2, now + 0.001, False) is None
    assert g.after_wakeup(5, now + LEAN_PAUSE - PROBE_SPAN_LONGEST, False) is None
    assert g.after_wakeup(2, now + LEAN_PAUSE + 0.001, False) is not None


@pytest.mark.parametrize("first", ["a break", "a slow start"])
def test_a_probe_compares_with_the_stretch_just_before_it(first: str) -> None:
    # Clients that come 500 a second either way (five a 10 ms window, one each
    # 2 ms at once), after a break of 0.3 s in the busy time or a start at 100
    # a second (one a window). Over the whole busy time they came at 190-260 a
    # second, and a probe compared with that found them "twice as fast" at once
    # and stopped gathering for LEAN_PAUSE; in the stretch before the tick they
    # came as fast as in the probe.
    g = gathering()
    if first == "a break":
        now, answers = _gather(g, T0, 5, 0.1)
        assert g.after_wakeup(0, now, False) is None  # nobody: back to waiting
        now += 0.3
    else:
        window = g.after_wakeup(2, T0, False)  # two at once begin the gathering
        assert window is not None
        now, answers = _gather(g, T0 + window, 1, 0.3)
        assert None not in answers  # one a window: gathering goes on
    now, answers = _gather(g, now, 5, PROBE_FIRST * 2)
    assert answers[-1] is None  # the probe begins, on its tick
    assert now == pytest.approx(T0 + PROBE_FIRST, abs=LONGEST)
    now, answers = _probe(g, now, 0.002)
    assert answers[:-1] == [None] * (len(answers) - 1)
    assert answers[-1] == LONGEST  # no lean: gathering on at once, as before the probe
    assert g.after_wakeup(2, now + 0.0005, False) is not None


@pytest.mark.parametrize(("before", "probed_lean"), [(PROBE_MIN - 1, False), (PROBE_MIN, True)])
def test_a_stretch_before_the_tick_with_too_few_clients_proves_nothing(
    before: int, probed_lean: bool
) -> None:
    # Waiting clients (two a window, as above), then a break that ends just
    # before the tick: two that begin gathering again, then only `before` clients
    # in the stretch before it.
    # The probe's clients come far faster than those, but fewer than PROBE_MIN
    # there prove nothing: no lean, gathering goes on after the probe.
    g = gathering()
    now, _ = _gather(g, T0, 2, 0.2)
    assert g.after_wakeup(0, now, False) is None  # nobody: the break
    start = T0 + PROBE_FIRST - PROBE_SPAN_LONGEST + 0.02
    assert g.after_wakeup(2, start, False) is not None  # gathering again
    per = PROBE_SPAN_LONGEST / 2 / before
    for i in range(before):  # one by one, a window each
        assert g.after_wakeup(1, start + (i + 1) * per, False) is not None
    assert g.after_wakeup(0, T0 + PROBE_FIRST, False) is None  # on the tick: the probe
    now, _ = _probe(g, T0 + PROBE_FIRST, 0.0015)
    lean = g.after_wakeup(2, now + 0.001, False) is None
    assert lean is probed_lean


def on_tick(now: float, period: float) -> bool:
    """`now` is a wake-up within a window or two after a multiple of `period`."""
    return now % period < 2 * LONGEST


def test_clients_that_come_as_fast_either_way_are_gathered_on_and_probed_less_often() -> None:
    # Independent clients, 500 a second: five a window, one each 2 ms at once.
    g = gathering()
    now = T0 + 0.3  # between two ticks
    begins = []
    for _ in range(5):
        now, answers = _gather(g, now, 5, PROBE_LONGEST * 3)
        assert answers[-1] is None  # a probe
        begins.append(now)
        now, answers = _probe(g, now, 0.002)
        assert g.after_wakeup(2, now + 0.0005, False) is not None  # gathering again
        now += 0.0005 + LONGEST / 2
    # The first after PROBE_FIRST of gathering, on the next tick of PROBE_FIRST; then
    # on ticks four times further apart after each that found nothing, up to PROBE_LONGEST.
    periods = [PROBE_FIRST, 4 * PROBE_FIRST, 16 * PROBE_FIRST, PROBE_LONGEST, PROBE_LONGEST]
    assert begins[0] - (T0 + 0.3) == pytest.approx(2 * PROBE_FIRST - 0.3, abs=2 * LONGEST)
    assert [on_tick(b, p) for b, p in zip(begins, periods, strict=True)] == [True] * 5
    # From T0 = 1000: 1001 (PROBE_FIRST after 1000.3), then the next tick of each
    # period at least PROBE_FIRST after the probe before: 1002, 1008, 1024, 1040.
    assert begins == pytest.approx([T0 + 1, T0 + 2, T0 + 8, T0 + 24, T0 + 40], abs=2 * LONGEST)


def test_workers_probe_together_whenever_their_stretches_began() -> None:
    # Two workers share the same waiting clients; their stretches of gathering
    # began 0.2 s apart. Each probe begins on the same tick of the host's clock.
    first, second = gathering(), gathering()
    a, answers_a = _gather(first, T0 + 0.1, 2, PROBE_LONGEST)
    b, answers_b = _gather(second, T0 + 0.3, 2, PROBE_LONGEST)
    assert answers_a[-1] is None and answers_b[-1] is None
    assert abs(a - b) < 2 * LONGEST and on_tick(a, PROBE_FIRST)


def _probe_end(g: Gathering, now: float) -> float:
    """When the probe `g` is in ends, to the millisecond (tried on copies)."""
    while True:
        now += 0.001
        trial = copy.deepcopy(g)
        trial.after_wakeup(0, now, False)  # nobody: the probe's end, if it is due
        if trial.after_wakeup(2, now + 0.0001, False) is not None:  # gathering again
            return now
        g.after_wakeup(0, now, False)


def test_workers_whose_rates_differ_end_their_probe_together() -> None:
    # 200 and 300 a second: both end PROBE_SPAN_LONGEST after their tick, or the
    # first to end would gather again while the other still measures.
    first, second = gathering(), gathering()
    a, _ = _gather(first, T0 + 0.1, 2, PROBE_LONGEST)
    b, _ = _gather(second, T0 + 0.1, 3, PROBE_LONGEST)
    assert abs(a - b) < 2 * LONGEST
    assert _probe_end(first, a) == pytest.approx(_probe_end(second, b), abs=0.0015)


def test_a_worker_that_probes_less_often_still_probes_with_the_others() -> None:
    # One worker's probes have found nothing three times (every 8 s now), the
    # other's once (every 2 s): on the first's tick the second probes too.
    slow, quick = gathering(), gathering()
    now = T0
    for _ in range(3):
        now, _ = _gather(slow, now, 5, PROBE_LONGEST * 2)
        now, _ = _probe(slow, now, 0.002)
    start = now + 0.001
    quick_now, _ = _gather(quick, T0, 5, PROBE_LONGEST * 2)
    _probe(quick, quick_now, 0.002)  # its first, found nothing: every 2 s
    slow_at, _ = _gather(slow, start, 5, PROBE_LONGEST * 2)
    assert on_tick(slow_at, 16 * PROBE_FIRST)
    # the quick worker, gathering meanwhile, probes on ticks of 2 s, then of 8 (its
    # probes find nothing either): the slow worker's tick is one of them
    quick_begins = []
    t = start
    while t < slow_at + PROBE_SPAN_LONGEST:
        t, _ = _gather(quick, t, 5, PROBE_LONGEST * 2)
        quick_begins.append(t)
        t, _ = _probe(quick, t, 0.002)
    assert any(abs(q - slow_at) < 2 * LONGEST for q in quick_begins)


def test_a_probe_with_too_few_clients_proves_nothing() -> None:
    g = gathering()
    now, _ = _gather(g, T0, 2, PROBE_FIRST * 2)
    # PROBE_MIN - 1 clients, all at once at the start: a far higher rate, but too few
    assert g.after_wakeup(PROBE_MIN - 1, now + 0.001, False) is None
    assert g.after_wakeup(0, now + PROBE_SPAN_LONGEST + 0.001, False) is None  # it ends
    assert g.after_wakeup(2, now + PROBE_SPAN_LONGEST + 0.002, False) is not None


def test_a_break_longer_than_probe_first_starts_the_probes_over() -> None:
    g = gathering()
    now, _ = _gather(g, T0, 5, PROBE_LONGEST)
    now, _ = _probe(g, now, 0.002)  # found nothing: next probe after 4 * PROBE_FIRST
    now += PROBE_FIRST * 2  # the load went away
    start = now
    now, answers = _gather(g, now, 5, PROBE_LONGEST)
    assert answers[-1] is None
    # probed soon: on the first tick of PROBE_FIRST after PROBE_FIRST of gathering
    assert PROBE_FIRST <= now - start < 2 * PROBE_FIRST + 2 * LONGEST
    assert on_tick(now, PROBE_FIRST)


def test_a_probe_that_the_load_left_proves_nothing() -> None:
    # The last clients of a run came just before the probe; the next, much later.
    g = gathering()
    now, _ = _gather(g, T0, 2, PROBE_FIRST * 2)
    later = now + 20.0
    assert g.after_wakeup(PROBE_MIN * 2, later, False) is None  # ends the probe: no lean
    assert g.after_wakeup(2, later + 0.001, False) == LONGEST  # gathering again
    start = later + 0.001
    now, answers = _gather(g, start, 2, PROBE_LONGEST)
    assert answers[-1] is None
    assert PROBE_FIRST <= now - start < 2 * PROBE_FIRST + 2 * LONGEST  # probed soon
    assert on_tick(now, PROBE_FIRST)


@pytest.mark.parametrize("per_window", [7, 2, 1], ids=["700 a second", "200", "100"])
def test_a_probe_ends_a_quarter_second_after_its_tick(per_window: int) -> None:
    g = gathering()
    assert g.after_wakeup(2, T0, False) == LONGEST / 2  # gathering begins
    now, answers = _gather(g, T0 + LONGEST / 2, per_window, PROBE_LONGEST)
    assert answers[-1] is None  # the probe begins
    assert on_tick(now, PROBE_FIRST)
    # Two at a time during it (too few to prove anything): the probe's answer is None
    # until its end; the first busy wake-up after that gathers again.
    end = tick(now - 2 * LONGEST, PROBE_FIRST) + PROBE_SPAN_LONGEST
    assert g.after_wakeup(2, end - 0.001, False) is None  # still probing
    assert g.after_wakeup(2, end + 0.001, False) is None  # past its end: its last
    assert g.after_wakeup(2, end + 0.002, False) is not None


def test_a_wake_up_late_for_its_tick_probes_for_probe_span() -> None:
    # A busy time whose wake-ups stopped (breaks) until well after the tick:
    # the probe it begins then lasts PROBE_SPAN, not until long past.
    g = gathering()
    assert g.after_wakeup(2, T0 + 0.1, False) == LONGEST / 2
    assert g.after_wakeup(0, T0 + 0.1 + LONGEST / 2, False) is None  # a break
    late = T0 + 1.0 + PROBE_SPAN_LONGEST + 0.1  # the tick was T0 + 1
    for t in (T0 + 0.5, T0 + 0.9):  # clients, one at a time, in the break
        assert g.after_wakeup(1, t, False) is None
    assert g.after_wakeup(1, late, False) is None  # the probe begins
    assert g.after_wakeup(2, late + PROBE_SPAN - 0.001, False) is None  # still probing
    assert g.after_wakeup(2, late + PROBE_SPAN + 0.001, False) is None  # its end
    assert g.after_wakeup(2, late + PROBE_SPAN + 0.002, False) is not None


@pytest.mark.parametrize(("late", "probed_lean"), [(PROBE_SPAN + 0.01, False), (0.005, True)])
def test_a_probe_that_begins_late_for_its_tick_proves_nothing(
    late: float, probed_lean: bool
) -> None:
    # Waiting clients (two a window) up to a break at a burst's tail, across the
    # tick: the wake-up that begins the probe is late, the stretch it compares
    # with runs through the break, and the probe is cut to PROBE_SPAN. Clients
    # then taken at once came "faster" than that stretch's, which a break made
    # slow (the afternoon's one remaining false lean: 8 clients in 55 ms).
    g = gathering()
    now, answers = _gather(g, T0, 2, PROBE_FIRST - 0.05)
    assert None not in answers
    assert g.after_wakeup(0, now, False) is None  # nobody: the break
    begin = T0 + PROBE_FIRST + late  # the tick is T0 + PROBE_FIRST
    assert g.after_wakeup(1, begin, False) is None  # the probe begins
    now, answers = _probe(g, begin, 0.0015)  # taken at once: 667 a second, to its end
    assert answers[:-1] == [None] * (len(answers) - 1)
    assert (answers[-1] is None) is probed_lean  # no lean: gathering on at once
    lean = g.after_wakeup(2, now + 0.001, False) is None
    assert lean is probed_lean


def test_windows_half_full_or_more_are_never_probed() -> None:
    # 1,000 a second and more: the windows shrink to gather CLIENTS each; clients
    # waiting for them would have made no such load, and gathering pays most here.
    g = gathering()
    assert g.after_wakeup(2, T0, False) == LONGEST / 2
    now, answers = _gather(g, T0 + LONGEST / 2, CLIENTS // 2, PROBE_LONGEST * 3)
    assert None not in answers
    assert now - T0 >= PROBE_LONGEST * 3


@pytest.mark.parametrize(("half_full", "probed"), [(CLIENTS / 2, True), (CLIENTS / 2 - 2, False)])
def test_a_gathering_told_a_lower_half_full_leaves_its_fuller_windows_unprobed(
    half_full: float, probed: bool
) -> None:
    # Windows of CLIENTS / 2 - 1: under the default mark, at or over a lower one
    # (accept_loop's `full`).
    g = Gathering(LONGEST, True, FLOOD, half_full)
    assert g.after_wakeup(2, T0, False) == LONGEST / 2
    _, answers = _gather(g, T0 + LONGEST / 2, CLIENTS // 2 - 1, PROBE_LONGEST * 3)
    assert (None in answers) is probed


# (window, holds the lead, found it free, room, flood) -> the role (core/gathering.py's lead_role)
ROLES = [
    (0.01, True, False, True, False, Role.GATHER),  # holds it, gathers on
    (0.01, False, True, True, False, Role.GATHER),  # took it (it was free)
    (0.01, False, False, True, False, Role.FOLLOW),  # another worker gathers for it
    (None, True, False, True, False, Role.LISTEN),  # stops gathering: lets it go
    (None, False, True, True, False, Role.LISTEN),  # nobody gathers: its own clients
    (None, False, False, True, False, Role.FOLLOW),  # another gathers: its windows take them
    (0.01, True, False, False, False, Role.LISTEN),  # no room: lets it go
    (0.01, False, True, False, False, Role.LISTEN),  # no room: does not take it
    (0.01, False, False, False, False, Role.FOLLOW),  # no room: the lead takes its clients
    (None, True, False, True, True, Role.LISTEN),  # a flood: every worker its own
    (None, False, False, True, True, Role.LISTEN),  # a flood: never follows
]


@pytest.mark.parametrize(("window", "holds", "free", "roomy", "flood", "role"), ROLES)
def test_lead_role(
    window: float | None, holds: bool, free: bool, roomy: bool, flood: bool, role: Role
) -> None:
    assert lead_role(window, holds, free, room=roomy, flood=flood) is role


# (holds the lead, found it free, room, flood) -> the role of a worker that takes
# clients at once for a probe or a lean (Gathering.at_once_until)
AT_ONCE = [
    (True, False, True, False, Role.AT_ONCE),  # keeps the lead: every worker's clients at once
    (False, True, True, False, Role.AT_ONCE),  # took it (it was free)
    (False, False, True, False, Role.FOLLOW),  # another leads (its own probe is its share)
    (True, False, False, False, Role.LISTEN),  # no room: lets it go
    (True, False, True, True, Role.LISTEN),  # a flood: every worker its own
]


@pytest.mark.parametrize(("holds", "free", "roomy", "flood", "role"), AT_ONCE)
def test_lead_role_at_once(holds: bool, free: bool, roomy: bool, flood: bool, role: Role) -> None:
    assert lead_role(None, holds, free, room=roomy, flood=flood, at_once=True) is role


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        (((0, 100), (0, 40), (0, 100)), True),
        (((49, 100), (19, 40), (49, 100)), True),
        (((50, 100), (0, 40), (0, 100)), False),  # half the held places taken
        (((0, 100), (20, 40), (0, 100)), False),  # half the --exec programs
        (((0, 100), (0, 40), (50, 100)), False),  # half the enforce sessions
        (((0, 0),), False),  # no place at all
    ],
)
def test_a_worker_leads_only_with_half_of_each_limit_free(
    counts: tuple[tuple[int, int], ...], expected: bool
) -> None:
    assert room(counts) is expected
    assert ROOM == 0.5


def _busy_then_probe() -> tuple[Gathering, float]:
    """A gathering at 4 clients a window (under half full) until its probe begins."""
    g = Gathering(LONGEST, True, FLOOD)
    now = T0
    window = g.after_wakeup(4, now, False)
    while window is not None:
        now += window
        window = g.after_wakeup(4, now, False)
    assert g.probing
    return g, now


def test_at_once_until_says_how_long_the_lead_takes_every_client_at_once() -> None:
    # With the lead, the shell takes every worker's clients at once through a
    # probe and a lean (Role.AT_ONCE), and wakes no later than this says if
    # nobody came, to let the lead go.
    g, now = _busy_then_probe()
    end = tick(now - LONGEST, PROBE_FIRST) + PROBE_SPAN_LONGEST
    assert g.at_once_until(now) == pytest.approx(end)  # the probe's end
    # Clients that waited for the windows come faster in the probe: a lean.
    t = now
    while g.probing:
        t += 0.001
        assert g.after_wakeup(1, t, False) is None  # each at once
    assert t >= end
    # Through the lean, as long as the clients come: PROBE_FIRST after the last
    assert g.at_once_until(t) == pytest.approx(t + PROBE_FIRST)
    assert g.after_wakeup(2, t + 0.1, False) is None  # leaning: takes each at once
    assert g.at_once_until(t + 0.1) == pytest.approx(t + 0.1 + PROBE_FIRST)
    assert g.at_once_until(t + 0.1 + PROBE_FIRST + 0.01) is None  # nobody came: let go
    g.after_wakeup(1, t + 0.2, True)  # sessions relayed: every worker its own
    assert g.at_once_until(t + 0.2) is None
    g.after_wakeup(1, t + LEAN_PAUSE - 0.2, False)
    assert g.at_once_until(t + LEAN_PAUSE - 0.1) == pytest.approx(t + LEAN_PAUSE)  # its end
    assert g.after_wakeup(2, t + LEAN_PAUSE + 0.01, False) is not None  # gathering again
    assert g.at_once_until(t + LEAN_PAUSE + 0.01) is None


def test_flooded_says_when_a_wake_up_took_a_flood() -> None:
    g = gathering()
    assert not g.flooded(T0)
    g.after_wakeup(FLOOD, T0, False)
    assert g.flooded(T0 + FLOOD_PAUSE / 2)
    assert not g.flooded(T0 + FLOOD_PAUSE)


def test_a_probe_begun_before_the_lead_was_taken_proves_nothing() -> None:
    # Its rate before was of this worker's share; in the probe, with the lead,
    # it counts every worker's clients: those would look faster, and a lean
    # cost ten seconds of taking each client at once.
    g, now = _busy_then_probe()
    g.took_lead(now)
    t = now
    window: float | None = None
    while g.probing:
        t += 0.001
        window = g.after_wakeup(1, t, False)
    # the probe ran its course: to PROBE_SPAN_LONGEST after the tick it began on
    assert t >= tick(now - LONGEST, PROBE_FIRST) + PROBE_SPAN_LONGEST
    assert window is not None  # no lean: gathering on at once
    assert g.after_wakeup(2, t + 0.1, False) is not None


def test_taking_the_lead_begins_the_busy_time_again() -> None:
    # A busy time of this worker's own share: its probe would compare that
    # share's rate with every worker's clients. Taken at the lead, it begins
    # again, and the probe comes a PROBE_FIRST later.
    g = Gathering(LONGEST, True, FLOOD)
    now = T0
    assert g.after_wakeup(4, now, False) is not None
    while now < T0 + PROBE_FIRST / 2:
        now += LONGEST
        assert g.after_wakeup(4, now, False) is not None
    g.took_lead(now)
    due = tick(now + PROBE_FIRST, PROBE_FIRST)
    while now < due - LONGEST:
        now += LONGEST
        assert g.after_wakeup(4, now, False) == LONGEST  # no probe yet
    while now < due + LONGEST:
        now += LONGEST
        window = g.after_wakeup(4, now, False)
    assert window is None and g.probing  # probing, on the tick after the new start


def test_a_flood_or_a_relay_ends_a_probe() -> None:
    # (With the lead, a probe holds it: a flood or a relay lets it go at once.)
    for batch, relaying in ((FLOOD, False), (1, True)):
        g, now = _busy_then_probe()
        assert g.after_wakeup(1, now + 0.001, False) is None and g.probing
        assert g.after_wakeup(batch, now + 0.002, relaying) is None
        assert not g.probing
        assert g.flooded(now + 0.002) is (batch >= FLOOD)

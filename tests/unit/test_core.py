"""The greeting-delay decision, table-driven, with no I/O."""

from __future__ import annotations

import pytest

from repeld.core.hold import (
    CACHE_WAIT,
    FIRST_BYTES_LIMIT,
    FLOOD_LIMIT,
    PEEK_LIMIT,
    EarlyTalk,
    Enforce,
    HangUp,
    Hold,
    LocalProtocolError,
    Logged,
    Mute,
    Pass,
    PassReason,
    Penalty,
    Verdict,
    Wait,
    escape_bytes,
)

T0 = 1000.0

# (what the shell saw, at seconds after accept) -> expected verdict
CASES: list[tuple[str, list[tuple[str, bytes, float]], Verdict]] = [
    ("silent through the delay", [("silence", b"", 25.0)], Pass(PassReason.DELAY, 25.0)),
    ("silent, checked late", [("silence", b"", 25.5)], Pass(PassReason.DELAY, 25.5)),
    ("silent, then early", [("silence", b"", 10.0)], Wait(T0 + 25.0)),
    ("talks at once", [("data", b"EHLO x\r\n", 0.0)], EarlyTalk(8, b"EHLO x\r\n", 0.0)),
    (
        "talks late in the window",
        [("silence", b"", 5.0), ("data", b"HELO\r\n", 24.75)],
        EarlyTalk(6, b"HELO\r\n", 24.75),
    ),
    ("one byte", [("data", b"\n", 3.0)], EarlyTalk(1, b"\n", 3.0)),
    ("binary", [("data", b"\x16\x03\x01", 0.125)], EarlyTalk(3, b"\x16\x03\x01", 0.125)),
    ("hangs up (FIN)", [("eof", b"", 2.0)], HangUp(2.0, reset=False)),
    ("resets (RST)", [("reset", b"", 7.0)], HangUp(7.0, reset=True)),
    (
        "bytes that arrived at the very end are still early",
        [("data", b"QUIT\r\n", 25.0)],
        EarlyTalk(6, b"QUIT\r\n", 25.0),
    ),
]


def feed(hold: Hold, what: str, data: bytes, at: float) -> Verdict:
    now = T0 + at
    if what == "data":
        return hold.data(data, now)
    if what == "eof":
        return hold.eof(now)
    if what == "reset":
        return hold.reset(now)
    if what == "flood":  # a muted talker's unread bytes reached the limit
        return hold.flood(FLOOD_LIMIT, now)
    if what == "good":
        return hold.remembered_good(now)
    if what == "bad":
        return hold.remembered_bad(now)
    if what == "unknown":
        return hold.unknown(now)
    if what == "due":
        return hold.due(now)
    return hold.silence(now)


@pytest.mark.parametrize(("name", "steps", "expected"), CASES, ids=[c[0] for c in CASES])
def test_decision_table(
    name: str, steps: list[tuple[str, bytes, float]], expected: Verdict
) -> None:
    hold = Hold(T0, 25.0)
    verdict: Verdict | None = None
    for what, data, at in steps:
        verdict = feed(hold, what, data, at)
    assert verdict == expected
    assert hold.done is not isinstance(expected, Wait)


EHLO = b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"
TALK = EarlyTalk(len(EHLO), EHLO, 0.25)
#: The talk of a muted talker whose unread bytes reached FLOOD_LIMIT.
FLOODED = EarlyTalk(FLOOD_LIMIT, EHLO, 0.25)
W = T0 + 0.25 + CACHE_WAIT  # the cache answer counts until then
D = T0 + 25.0

# (cache answer to come, observe mode, steps) -> the verdicts, step by step
CACHE_CASES: list[tuple[str, bool, bool, list[tuple[str, bytes, float]], list[Verdict]]] = [
    (
        "talker remembered as patient: passed with its bytes (PIPECONNECT)",
        True,
        False,
        [("data", EHLO, 0.25), ("good", b"", 0.375)],
        [Mute(W), Pass(PassReason.CACHE, 0.375, len(EHLO))],
    ),
    (
        "talker remembered as a talker: penalty, not drop",
        True,
        False,
        [("data", EHLO, 0.25), ("bad", b"", 0.375)],
        [Mute(W), Penalty(0.375)],
    ),
    (
        "talker unknown to the cache: early talk",
        True,
        False,
        [("data", EHLO, 0.25), ("unknown", b"", 0.375)],
        [Mute(W), TALK],
    ),
    (
        "no answer within the bound: early talk at the bound",
        True,
        False,
        [("data", EHLO, 0.25), ("due", b"", 0.25 + CACHE_WAIT)],
        [Mute(W), TALK],
    ),
    (
        "the delay ends while the cache is awaited: still muted until the bound",
        True,
        False,
        [("data", EHLO, 0.25), ("due", b"", 0.5)],
        [Mute(W), Mute(W)],
    ),
    (
        "talks, then resets before the answer: the talk decides",
        True,
        False,
        [("data", EHLO, 0.25), ("reset", b"", 0.375)],
        [Mute(W), TALK],
    ),
    (
        "talks, then half-closes (a pipelined QUIT): the cache still decides",
        True,
        False,
        [("data", EHLO, 0.25), ("eof", b"", 0.375), ("good", b"", 0.4375)],
        [Mute(W), Mute(W), Pass(PassReason.CACHE, 0.4375, len(EHLO))],
    ),
    (
        "talks, half-closes, no answer within the bound: early talk",
        True,
        False,
        [("data", EHLO, 0.25), ("eof", b"", 0.375), ("due", b"", 0.25 + CACHE_WAIT)],
        [Mute(W), Mute(W), TALK],
    ),
    (
        "a talker that floods while the cache is awaited: cut off, no answer waited for",
        True,
        False,
        [("data", EHLO, 0.25), ("flood", b"", 0.3125)],
        [Mute(W), FLOODED],
    ),
    (
        "a talker that half-closes and floods meanwhile: cut off",
        True,
        False,
        [("data", EHLO, 0.25), ("eof", b"", 0.3125), ("flood", b"", 0.375)],
        [Mute(W), Mute(W), FLOODED],
    ),
    (
        "silent client, cache unknown: held as usual",
        True,
        False,
        [("unknown", b"", 0.0625), ("silence", b"", 25.0)],
        [Wait(D), Pass(PassReason.DELAY, 25.0)],
    ),
    (
        "silent client, then talks after an unknown answer: early talk at once",
        True,
        False,
        [("unknown", b"", 0.0625), ("data", EHLO, 0.25)],
        [Wait(D), TALK],
    ),
    (
        "silent client remembered as patient: passed, nothing early",
        True,
        False,
        [("good", b"", 0.0625)],
        [Pass(PassReason.CACHE, 0.0625, 0)],
    ),
    (
        "observe: a talker is logged, held the whole delay, passed with its bytes",
        False,
        True,
        [("data", EHLO, 0.25), ("due", b"", 25.0)],
        [Logged(TALK, Mute(D)), Pass(PassReason.DELAY, 25.0, len(EHLO))],
    ),
    (
        "observe: a talker that half-closes is still passed with its bytes",
        False,
        True,
        [("data", EHLO, 0.25), ("eof", b"", 3.0), ("due", b"", 25.0)],
        [Logged(TALK, Mute(D)), Mute(D), Pass(PassReason.DELAY, 25.0, len(EHLO))],
    ),
    (
        "observe: a talker that floods is cut off all the same (logged first)",
        False,
        True,
        [("data", EHLO, 0.25), ("flood", b"", 3.0)],
        [Logged(TALK, Mute(D)), FLOODED],
    ),
    (
        "observe: a flood while the cache is awaited: cut off, written once",
        True,
        True,
        [("data", EHLO, 0.25), ("flood", b"", 0.375)],
        [Mute(W), FLOODED],
    ),
    (
        "observe: a remembered talker that talks again, then floods: cut off",
        True,
        True,
        [("data", EHLO, 0.25), ("bad", b"", 0.375), ("flood", b"", 3.0)],
        [Mute(W), Logged(TALK, Mute(D)), FLOODED],
    ),
    (
        "observe: a talker that resets while the cache is awaited: logged, a hang-up",
        True,
        True,
        [("data", EHLO, 0.25), ("reset", b"", 0.375)],
        [Mute(W), Logged(TALK, HangUp(0.375, reset=True))],
    ),
    (
        "observe: a talker that resets is a hang-up",
        False,
        True,
        [("data", EHLO, 0.25), ("reset", b"", 3.0)],
        [Logged(TALK, Mute(D)), HangUp(3.0, reset=True)],
    ),
    (
        "observe: a remembered penalty is logged, the client held as usual",
        True,
        True,
        [("bad", b"", 0.0625), ("silence", b"", 25.0)],
        [Logged(Penalty(0.0625), Wait(D)), Pass(PassReason.DELAY, 25.0)],
    ),
    (
        "observe: a remembered talker that talks again is logged and held",
        True,
        True,
        [("data", EHLO, 0.25), ("bad", b"", 0.375), ("due", b"", 25.0)],
        [Mute(W), Logged(TALK, Mute(D)), Pass(PassReason.DELAY, 25.0, len(EHLO))],
    ),
    (
        "observe: a patient client's early bytes pass at once",
        True,
        True,
        [("data", EHLO, 0.25), ("good", b"", 0.375)],
        [Mute(W), Pass(PassReason.CACHE, 0.375, len(EHLO))],
    ),
    (
        "observe: talk at the very end, no answer: logged and passed at once",
        True,
        True,
        [("data", EHLO, 24.875), ("due", b"", 24.875 + CACHE_WAIT)],
        [
            Mute(T0 + 24.875 + CACHE_WAIT),
            Logged(EarlyTalk(len(EHLO), EHLO, 24.875), Pass(PassReason.DELAY, 25.375, len(EHLO))),
        ],
    ),
]


@pytest.mark.parametrize(
    ("name", "pending", "observe", "steps", "expected"),
    CACHE_CASES,
    ids=[c[0] for c in CACHE_CASES],
)
def test_cache_and_observe_table(
    name: str,
    pending: bool,
    observe: bool,
    steps: list[tuple[str, bytes, float]],
    expected: list[Verdict],
) -> None:
    hold = Hold(T0, 25.0, cache_pending=pending, observe=observe)
    got = [feed(hold, what, data, at) for what, data, at in steps]
    assert got == expected
    final = expected[-1]
    if isinstance(final, Logged):
        final = final.then
    assert hold.done is isinstance(final, (Pass, EarlyTalk, HangUp, Penalty))


# --on-early enforce: (cache answer to come, steps) -> the verdicts, step by step
ENFORCE_CASES: list[tuple[str, bool, list[tuple[str, bytes, float]], list[Verdict]]] = [
    (
        "a talker is held the whole delay, then enforced",
        False,
        [("data", EHLO, 0.25), ("due", b"", 25.0)],
        [Mute(D), Enforce(TALK, 25.0)],
    ),
    (
        "a talker that half-closes is still enforced at the end",
        False,
        [("data", EHLO, 0.25), ("eof", b"", 3.0), ("due", b"", 25.0)],
        [Mute(D), Mute(D), Enforce(TALK, 25.0)],
    ),
    (
        "a talker that resets: gone, written down, never greeted",
        False,
        [("data", EHLO, 0.25), ("reset", b"", 3.0)],
        [Mute(D), Enforce(TALK, 3.0, gone=True)],
    ),
    (
        "cache unknown: held to the end, then enforced",
        True,
        [("data", EHLO, 0.25), ("unknown", b"", 0.375), ("due", b"", 25.0)],
        [Mute(W), Mute(D), Enforce(TALK, 25.0)],
    ),
    (
        "a remembered talker that talks again is audited, not cut unheard",
        True,
        [("data", EHLO, 0.25), ("bad", b"", 0.375), ("due", b"", 25.0)],
        [Mute(W), Mute(D), Enforce(TALK, 25.0)],
    ),
    (
        "no cache answer within the bound: held to the end",
        True,
        [("data", EHLO, 0.25), ("due", b"", 0.25 + CACHE_WAIT), ("due", b"", 25.0)],
        [Mute(W), Mute(D), Enforce(TALK, 25.0)],
    ),
    (
        "talks, then resets before the cache answer: gone",
        True,
        [("data", EHLO, 0.25), ("reset", b"", 0.375)],
        [Mute(W), Enforce(TALK, 0.375, gone=True)],
    ),
    (
        "a patient client's early bytes pass at once",
        True,
        [("data", EHLO, 0.25), ("good", b"", 0.375)],
        [Mute(W), Pass(PassReason.CACHE, 0.375, len(EHLO))],
    ),
    (
        "talk at the very end, no answer: enforced at once",
        True,
        [("data", EHLO, 24.875), ("due", b"", 24.875 + CACHE_WAIT)],
        [Mute(T0 + 24.875 + CACHE_WAIT), Enforce(EarlyTalk(len(EHLO), EHLO, 24.875), 25.375)],
    ),
    (
        "a talker that floods is cut off, not greeted (it would leave the pen's count)",
        False,
        [("data", EHLO, 0.25), ("flood", b"", 3.0)],
        [Mute(D), FLOODED],
    ),
    (
        "a flood while the cache is awaited: cut off",
        True,
        [("data", EHLO, 0.25), ("flood", b"", 0.375)],
        [Mute(W), FLOODED],
    ),
    (
        "a silent client remembered as a talker: cut off unheard, as with drop",
        True,
        [("bad", b"", 0.0625)],
        [Penalty(0.0625)],
    ),
    (
        "a silent client is passed as usual",
        False,
        [("silence", b"", 25.0)],
        [Pass(PassReason.DELAY, 25.0)],
    ),
]


@pytest.mark.parametrize(
    ("name", "pending", "steps", "expected"), ENFORCE_CASES, ids=[c[0] for c in ENFORCE_CASES]
)
def test_enforce_table(
    name: str, pending: bool, steps: list[tuple[str, bytes, float]], expected: list[Verdict]
) -> None:
    hold = Hold(T0, 25.0, cache_pending=pending, enforce=True)
    got = [feed(hold, what, data, at) for what, data, at in steps]
    assert got == expected
    assert hold.done is not isinstance(expected[-1], (Wait, Mute))


def test_observe_and_enforce_are_not_both_at_once() -> None:
    with pytest.raises(ValueError, match="enforce"):
        Hold(T0, 25.0, observe=True, enforce=True)


def test_muted_hold_refuses_silence_and_data() -> None:
    hold = Hold(T0, 25.0, cache_pending=True)
    assert isinstance(hold.data(b"x", T0 + 1), Mute)
    assert hold.muted and hold.awaiting_cache
    with pytest.raises(LocalProtocolError):
        hold.silence(T0 + 25)
    with pytest.raises(LocalProtocolError):
        hold.data(b"y", T0 + 1.1)


def test_a_late_or_unannounced_cache_answer_is_a_shell_bug() -> None:
    with pytest.raises(LocalProtocolError):
        Hold(T0, 25.0).remembered_good(T0)
    hold = Hold(T0, 25.0, cache_pending=True)
    hold.unknown(T0 + 0.0625)
    assert not hold.awaiting_cache
    with pytest.raises(LocalProtocolError):
        hold.remembered_bad(T0 + 0.125)
    observing = Hold(T0, 25.0, cache_pending=True, observe=True)
    observing.data(b"x", T0)
    observing.due(T0 + CACHE_WAIT)  # no answer in time: logged, held on
    assert observing.muted and not observing.awaiting_cache and not observing.done


def test_due_needs_a_muted_hold() -> None:
    with pytest.raises(LocalProtocolError):
        Hold(T0, 25.0).due(T0 + 25)


@pytest.mark.parametrize("first", ["data", "eof", "reset", "silence"])
@pytest.mark.parametrize("second", ["data", "eof", "reset", "silence"])
def test_a_decided_hold_refuses_more_input(first: str, second: str) -> None:
    hold = Hold(T0, 1.0)
    feed(hold, first, b"x", 2.0)
    assert hold.done
    with pytest.raises(LocalProtocolError):
        feed(hold, second, b"x", 3.0)


def test_fractional_delay_and_zero_delay() -> None:
    assert Hold(T0, 0.25).silence(T0 + 0.24) == Wait(T0 + 0.25)
    assert Hold(T0, 0.0).silence(T0) == Pass(PassReason.DELAY, 0.0)


def test_negative_delay_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Hold(T0, -1.0)


def test_empty_data_is_not_early_talk() -> None:
    with pytest.raises(ValueError, match="eof"):
        Hold(T0, 1.0).data(b"", T0)


def test_flood_counts_every_waiting_byte_but_keeps_a_bounded_copy() -> None:
    peeked = b"A" * PEEK_LIMIT
    verdict = Hold(T0, 25.0).data(peeked, T0 + 1, total=1 << 20)
    assert isinstance(verdict, EarlyTalk)
    assert verdict.nbytes == 1 << 20
    assert len(verdict.first) == PEEK_LIMIT


def test_clock_going_backwards_never_gives_negative_elapsed() -> None:
    verdict = Hold(T0, 25.0).eof(T0 - 1)
    assert verdict == HangUp(0.0, reset=False)


ESCAPES = [
    (b"EHLO x\r\n", "EHLO x\\r\\n"),
    (b"a\\b", "a\\\\b"),
    (b"\x00\x7f\xff\t", "\\x00\\x7f\\xff\\x09"),
    (b'"]', '"]'),
    ("é".encode(), "\\xc3\\xa9"),
    (b"", ""),
]


@pytest.mark.parametrize(("raw", "shown"), ESCAPES)
def test_escape_bytes(raw: bytes, shown: str) -> None:
    assert escape_bytes(raw) == shown


def test_escape_cuts_at_the_limit_without_splitting_an_escape() -> None:
    assert len(escape_bytes(b"x" * 500)) == FIRST_BYTES_LIMIT
    cut = escape_bytes(b"x" * 98 + b"\xff\xff")
    assert cut == "x" * 98  # "\xff" would need 4 more characters
    assert all(len(escape_bytes(bytes([b]) * 200)) <= FIRST_BYTES_LIMIT for b in range(256))


@pytest.mark.parametrize(
    ("mode", "pending", "expected"),
    [
        ("drop", False, EarlyTalk(FLOOD_LIMIT, EHLO, 0.25)),
        ("drop", True, EarlyTalk(FLOOD_LIMIT, EHLO, 0.25)),
        ("observe", False, EarlyTalk(FLOOD_LIMIT, EHLO, 0.25)),
        ("observe", True, EarlyTalk(FLOOD_LIMIT, EHLO, 0.25)),
        ("enforce", False, EarlyTalk(FLOOD_LIMIT, EHLO, 0.25)),
    ],
)
def test_a_talk_that_comes_as_a_flood_ends_the_hold_at_once(
    mode: str, pending: bool, expected: Verdict
) -> None:
    # FLOOD_LIMIT bytes unread at the first look: never muted, whatever the mode
    # or the cache (an observed one is written down once, by the cut).
    def hold(pending: bool) -> Hold:
        return Hold(
            T0, 25.0, cache_pending=pending, observe=mode == "observe", enforce=mode == "enforce"
        )

    flooded = hold(pending)
    assert flooded.data(EHLO, T0 + 0.25, FLOOD_LIMIT) == expected
    assert flooded.done
    below = hold(True)
    assert below.data(EHLO, T0 + 0.25, FLOOD_LIMIT - 1) == Mute(W)  # one byte less: muted


def test_flood_is_for_a_muted_talker_only() -> None:
    silent = Hold(T0, 25.0, cache_pending=True)
    with pytest.raises(LocalProtocolError):
        silent.flood(FLOOD_LIMIT, T0 + 1)
    cut = Hold(T0, 25.0)
    cut.data(EHLO, T0 + 1)
    with pytest.raises(LocalProtocolError):
        cut.flood(FLOOD_LIMIT, T0 + 2)


def test_a_flood_counts_what_the_buffer_holds_not_less_than_the_talk() -> None:
    # On Linux the pen also reports a buffer filled below the limit (many small
    # segments): the talk's count never goes down.
    hold = Hold(T0, 25.0, observe=True)
    hold.data(EHLO, T0 + 0.25, 5000)
    assert hold.flood(4000, T0 + 1) == EarlyTalk(5000, EHLO, 0.25)

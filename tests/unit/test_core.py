"""The greeting-delay decision, table-driven, with no I/O."""

from __future__ import annotations

import pytest

from repeld.core.hold import (
    FIRST_BYTES_LIMIT,
    PEEK_LIMIT,
    EarlyTalk,
    HangUp,
    Hold,
    LocalProtocolError,
    Pass,
    PassReason,
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

"""core/learning.py, row by row: what the cache learns, and the penalty rule."""

from __future__ import annotations

import pytest

from repeld.core.dnsbl import DnsAction
from repeld.core.hold import (
    Blocked,
    CacheVerdict,
    EarlyTalk,
    Enforce,
    HangUp,
    Hold,
    Logged,
    Mute,
    Pass,
    PassReason,
    Penalty,
    Verdict,
    Wait,
)
from repeld.core.learning import Lesson, cache_answer, lesson

pytestmark = pytest.mark.unit

TALK = EarlyTalk(6, b"EHLO x", 1.0)
BLOCKED = Blocked(3, ("bl.test",), 0.5, DnsAction.LOG)

LESSONS: list[tuple[Verdict, Lesson | None]] = [
    (Pass(PassReason.DELAY, 25.0), Lesson.GOOD),
    (Pass(PassReason.DELAY, 25.0, early_bytes=12), None),  # observe mode: it talked
    (Pass(PassReason.TRUSTED, 0.0), None),
    (Pass(PassReason.NODELAY, 0.0), None),
    (Pass(PassReason.CACHE, 0.1), None),
    (TALK, Lesson.BAD),
    (Logged(TALK, Mute(25.0)), Lesson.BAD),
    (Enforce(TALK, 25.0), Lesson.BAD),  # --on-early enforce
    (Enforce(TALK, 3.0, gone=True), Lesson.BAD),
    (Logged(Penalty(0.1), Wait(25.0)), None),
    (Logged(BLOCKED, Wait(25.0)), None),
    (Penalty(0.1), None),
    (HangUp(3.0, reset=False), None),
    (HangUp(3.0, reset=True), None),
    (Blocked(3, ("bl.test",), 0.5, DnsAction.DROP), None),
    (Wait(25.0), None),
    (Mute(25.0), None),
]


@pytest.mark.parametrize(("verdict", "expected"), LESSONS)
def test_lesson(verdict: Verdict, expected: Lesson | None) -> None:
    assert lesson(verdict) is expected


def test_an_allow_list_pass_teaches_patience_only_if_pass_says_so() -> None:
    # The rule is Pass.remembered's (core/hold.py): one definition of patience.
    verdict = Pass(PassReason.DNSWL, 0.2)
    assert lesson(verdict) is (Lesson.GOOD if verdict.remembered else None)


@pytest.mark.parametrize(
    ("answer", "penalties", "method"),
    [
        (CacheVerdict.GOOD, True, "remembered_good"),
        (CacheVerdict.GOOD, False, "remembered_good"),
        (CacheVerdict.BAD, True, "remembered_bad"),
        (CacheVerdict.BAD, False, "unknown"),
        (CacheVerdict.UNKNOWN, True, "unknown"),
        (CacheVerdict.UNKNOWN, False, "unknown"),
    ],
)
def test_cache_answer(answer: CacheVerdict, penalties: bool, method: str) -> None:
    hold = Hold(0.0, 25.0, cache_pending=True)
    fed = cache_answer(hold, answer, penalties)
    assert fed == getattr(hold, method)
    # and it is the hold's own method: feeding it decides as the table says
    verdict = fed(1.0)
    expected = {"remembered_good": Pass, "remembered_bad": Penalty, "unknown": Wait}[method]
    assert isinstance(verdict, expected)

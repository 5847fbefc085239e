"""What the pass cache learns from a verdict, and what its answer does to a hold.

Two small rules, kept here as tables so they are tested in microseconds and the
shell only carries them out (shell/dispatch.py writes what `lesson` says; the
cache lookups feed `cache_answer`'s choice to the pen):

What a verdict teaches (`lesson`):

    verdict                                  lesson
    Pass, the full delay in silence          GOOD   (Pass.remembered)
    Pass, any other way                      none   (trusted, nodelay, cache, allow
                                                     list, or bytes before the greeting:
                                                     no patience was shown)
    EarlyTalk (cut off)                      BAD
    Enforce (--on-early enforce)             BAD    (held, then its recipients refused)
    Logged(EarlyTalk) (--on-early log)       BAD    (observe mode learns what
                                                     enforcement would have)
    Penalty, Logged(Penalty)                 none   (remembered already)
    HangUp, Blocked, Logged(Blocked)         none   (leaving is no proof of anything;
                                                     the lists are asked again per TTL)
    Wait, Mute                               none

What the cache's answer feeds to the hold (`cache_answer`), the penalty rule:

    answer     --penalty-ttl > 0    fed to the Hold
    GOOD       any                  remembered_good
    BAD        yes                  remembered_bad   (cut off unheard: a Penalty)
    BAD        no                   unknown          (no penalties: waits as anyone)
    UNKNOWN    any                  unknown
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import assert_never

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
    Penalty,
    Verdict,
    Wait,
)

__all__ = ["Lesson", "cache_answer", "lesson"]


class Lesson(enum.Enum):
    """What the pass cache is told about a client."""

    GOOD = "good"  # remember_good: it waited; skip its delay next time
    BAD = "bad"  # remember_bad: it talked early; a penalty next time


def lesson(verdict: Verdict) -> Lesson | None:
    """What the pass cache learns from `verdict` (None: nothing)."""
    match verdict:
        case Pass():
            return Lesson.GOOD if verdict.remembered else None
        case EarlyTalk() | Enforce():
            return Lesson.BAD
        case Logged(note=note):
            return Lesson.BAD if isinstance(note, EarlyTalk) else None
        case Penalty() | HangUp() | Blocked() | Wait() | Mute():
            return None
        case _:
            assert_never(verdict)


def cache_answer(hold: Hold, answer: CacheVerdict, penalties: bool) -> Callable[[float], Verdict]:
    """The Hold's method that takes the cache's `answer` (`penalties`: --penalty-ttl > 0)."""
    if answer is CacheVerdict.GOOD:
        return hold.remembered_good
    if answer is CacheVerdict.BAD and penalties:
        return hold.remembered_bad
    return hold.unknown

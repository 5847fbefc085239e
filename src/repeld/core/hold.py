"""The greeting-delay decision for one connection, with no I/O at all.

This file is the whole of what repeld considers a violation. A `Hold` is fed
what the shell observed on the socket -- peeked bytes, end of file, a reset,
or silence at the deadline -- together with the time, and answers with a
verdict. It never touches a socket, a clock or trio, so every rule here is
tested in microseconds (tests/unit/test_core.py) and the shell stays thin.

The life of a held connection is a small table:

    state     input          -> verdict                state
    HOLDING   data (bytes)   -> EarlyTalk             DONE
    HOLDING   eof / reset    -> HangUp                DONE
    HOLDING   silence, early -> Wait(deadline)        HOLDING
    HOLDING   silence, due   -> Pass("delay")         DONE
    HOLDING   cache: good    -> Pass("cache")         DONE
    HOLDING   cache: bad     -> Penalty               DONE
    DONE      anything       -> LocalProtocolError (a bug in the shell)

"silence, due" must only be reported after a last non-blocking peek at the
deadline found nothing: bytes that arrive at the very end are still early
talk.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "FIRST_BYTES_LIMIT",
    "PEEK_LIMIT",
    "CacheVerdict",
    "EarlyTalk",
    "HangUp",
    "Hold",
    "LocalProtocolError",
    "Pass",
    "PassReason",
    "Penalty",
    "Verdict",
    "Wait",
    "escape_bytes",
]

#: The most a peek asks of the kernel: enough to show what a bot said.
PEEK_LIMIT = 1024
#: The escaped rendering of a talker's first bytes is cut at this many characters
#: (postscreen's PREGREET log line does the same).
FIRST_BYTES_LIMIT = 100


class LocalProtocolError(RuntimeError):
    """The shell fed a Hold after it had already decided: a bug in repeld."""


class CacheVerdict(enum.Enum):
    """What the pass cache knows of a client; the values are what cache/sqlite.py stores."""

    UNKNOWN = 0
    GOOD = 1
    BAD = 2


class PassReason(enum.StrEnum):
    """Why a connection was handed to the MTA; stable names for the event log."""

    DELAY = "delay"
    TRUSTED = "trusted"
    NODELAY = "nodelay"
    CACHE = "cache"


@dataclass(frozen=True, slots=True)
class Wait:
    """No verdict yet: report silence again at or after `deadline`."""

    deadline: float


@dataclass(frozen=True, slots=True)
class Pass:
    """Hand the client to the MTA."""

    reason: PassReason
    elapsed: float


@dataclass(frozen=True, slots=True)
class EarlyTalk:
    """The client spoke before it was greeted: cut it off."""

    nbytes: int
    first: bytes
    elapsed: float


@dataclass(frozen=True, slots=True)
class HangUp:
    """The client left before it was greeted (`reset` for an RST, else a FIN)."""

    elapsed: float
    reset: bool


@dataclass(frozen=True, slots=True)
class Penalty:
    """The pass cache remembers this client as an early talker: cut it off unheard."""

    elapsed: float


Verdict = Wait | Pass | EarlyTalk | HangUp | Penalty


class Hold:
    """The decision for one held connection, from accept to verdict."""

    __slots__ = ("accepted_at", "deadline", "done")

    def __init__(self, accepted_at: float, delay: float) -> None:
        if delay < 0:
            raise ValueError(f"delay must not be negative, got {delay!r}")
        self.accepted_at = accepted_at
        self.deadline = accepted_at + delay
        self.done = False

    def _finish(self) -> None:
        # Every verdict but Wait ends the hold; a second one is a shell bug.
        if self.done:
            raise LocalProtocolError("this connection has already been decided")
        self.done = True

    def _elapsed(self, now: float) -> float:
        return max(0.0, now - self.accepted_at)

    def data(self, peeked: bytes, now: float, total: int | None = None) -> Verdict:
        """Bytes seen before the greeting: early talk, whatever they are.

        `peeked` is what a bounded peek returned; `total`, when the shell knows
        it (FIONREAD), is how many bytes were waiting in all.
        """
        if not peeked:
            raise ValueError("data() needs at least one byte; use eof() for end of file")
        self._finish()
        nbytes = max(len(peeked), total or 0)
        return EarlyTalk(nbytes, bytes(peeked[:PEEK_LIMIT]), self._elapsed(now))

    def eof(self, now: float) -> Verdict:
        """The client closed its side (FIN) before the greeting."""
        self._finish()
        return HangUp(self._elapsed(now), reset=False)

    def reset(self, now: float) -> Verdict:
        """The connection was reset (RST) or failed before the greeting."""
        self._finish()
        return HangUp(self._elapsed(now), reset=True)

    def remembered_good(self, now: float) -> Verdict:
        """The pass cache knows this client waited before: pass it now."""
        self._finish()
        return Pass(PassReason.CACHE, self._elapsed(now))

    def remembered_bad(self, now: float) -> Verdict:
        """The pass cache holds a penalty for this client: cut it off now."""
        self._finish()
        return Penalty(self._elapsed(now))

    def silence(self, now: float) -> Verdict:
        """Nothing to read now: wait on, or pass once the delay is over."""
        if self.done:
            raise LocalProtocolError("this connection has already been decided")
        if now < self.deadline:
            return Wait(self.deadline)
        self.done = True
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


def escape_bytes(data: bytes, limit: int = FIRST_BYTES_LIMIT) -> str:
    """Render untrusted client bytes as printable ASCII, cut at `limit` characters.

    `\\r`, `\\n` and `\\\\` are spelled out, anything else outside printable
    ASCII becomes `\\xNN`; an escape sequence is never cut in half.
    """
    out: list[str] = []
    used = 0
    for b in data:
        piece = _ESCAPES[b]
        if used + len(piece) > limit:
            break
        out.append(piece)
        used += len(piece)
    return "".join(out)

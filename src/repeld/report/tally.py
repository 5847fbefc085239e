"""Count repeld events into what the report shows; no I/O.

A `Tally` is fed `Record`s in log order. Which connections the delay is about:
those held the full delay or cut off on the way, that is passes for `delay`,
hang-ups and early talkers that were cut off (`drop`, `reject`) or only logged
(`log`, the observe mode: "would repel"). Trusted, `nodelay` and cached passes
and `penalty` early talkers never waited, so the delay decided nothing for them.
In observe mode the early talker's connection also ends in a `pass`; that pass
is matched to its early-talker event by client address and port and the
connection counted once, as "would repel".

An enforced early talker (`enforce`, --on-early enforce) was cut off too, after
repeld refused its recipients; its event names the HELO and sender it gave,
and the report counts their domains and names, for an audit of whom it cut.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from dataclasses import dataclass, field

from repeld.report.parse import Record

__all__ = [
    "BIN",
    "CANDIDATES",
    "HELD_OUT",
    "LAST_BIN",
    "Tally",
    "WhatIf",
    "network_of",
    "sender_domain",
]

#: Width of the give-up curve's bins, and where its last (open) bin starts, in seconds.
BIN = 5
LAST_BIN = 60
#: The delays the what-if table tries.
CANDIDATES = (10, 15, 20, 25, 30, 40)
#: Early-talker actions that cut the client off; `log` only watched it.
REPELLING = frozenset({"drop", "reject", "enforce"})
#: Pass reasons for which nobody waited.
HELD_OUT = frozenset({"trusted", "nodelay", "cache", "dnswl"})
#: The categories of the verdicts-over-time picture, in stacking order.
CATEGORIES = ("pass", "pass-other", "early-talker", "hangup", "would-repel")


def network_of(address: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) network of an address, or the text as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    bits = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{bits}", strict=False))


def sender_domain(sender: str) -> str:
    """The domain of a MAIL path as the event writes it: `<a@B.example>` is
    `b.example`, the null sender `<>` stays `<>`, none is ""."""
    path = sender.strip()
    if path == "<>":
        return path
    address = path.removeprefix("<").removesuffix(">")
    return address.rpartition("@")[2].lower()


def bin_of(elapsed: float) -> int:
    """The index of the give-up curve's bin for `elapsed` seconds."""
    return min(int(max(elapsed, 0.0) // BIN), LAST_BIN // BIN)


@dataclass(frozen=True, slots=True)
class WhatIf:
    """What another delay would have done to the observed clients."""

    delay: int
    repelled: int
    passed: int
    #: Passed after waiting less than `delay`: patient that long, the rest unknown.
    unknown: int


@dataclass
class Tally:
    """Every count the report prints, fed one `Record` at a time."""

    lines: int = 0
    skipped: int = 0
    events: Counter[str] = field(default_factory=Counter)
    passes: Counter[str] = field(default_factory=Counter)
    early: Counter[str] = field(default_factory=Counter)
    hangups: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    #: Passes that followed an observed (`action=log`) early talk of the same connection.
    folded: int = 0
    #: Seconds waited: hang-ups, early talkers cut off, early talkers only logged.
    hangup_times: list[float] = field(default_factory=list)
    early_times: list[float] = field(default_factory=list)
    would_times: list[float] = field(default_factory=list)
    #: Seconds waited by clients passed for `delay`: patient at least that long.
    waits: list[float] = field(default_factory=list)
    networks: Counter[str] = field(default_factory=Counter)
    #: Enforced talkers (--on-early enforce): their sender domains and HELO names.
    sender_domains: Counter[str] = field(default_factory=Counter)
    helo_names: Counter[str] = field(default_factory=Counter)
    #: (time, category) of every verdict that carries a time.
    timeline: list[tuple[float, str]] = field(default_factory=list)
    _observed: set[tuple[str, str]] = field(default_factory=set)

    def skip(self) -> None:
        """A line that holds no repeld event."""
        self.lines += 1
        self.skipped += 1

    def add(self, record: Record) -> None:
        """One event, in log order."""
        self.lines += 1
        self.events[record.event] += 1
        handler = _HANDLERS.get(record.event)
        if handler is not None:
            category = handler(self, record)
            if category and record.time is not None:
                self.timeline.append((record.time, category))

    def _early(self, record: Record) -> str:
        action = record.fields.get("action", "unknown")
        self.early[action] += 1
        self.networks[network_of(record.fields.get("client", "?"))] += 1
        elapsed = record.number("elapsed")
        if action == "log":
            self._observed.add(_conn(record))
            if elapsed is not None:
                self.would_times.append(elapsed)
            return "would-repel"
        if action in REPELLING and elapsed is not None:
            self.early_times.append(elapsed)
        if action == "enforce":
            self._envelope(record)
        return "early-talker"

    def _envelope(self, record: Record) -> None:
        # What an enforced talker said of itself; nothing said, nothing counted.
        helo = record.fields.get("helo", "")
        if helo:
            self.helo_names[helo.lower()] += 1
        domain = sender_domain(record.fields.get("sender", ""))
        if domain:
            self.sender_domains[domain] += 1

    def _hangup(self, record: Record) -> str:
        self.hangups[record.fields.get("how", "unknown")] += 1
        elapsed = record.number("elapsed")
        if elapsed is not None:
            self.hangup_times.append(elapsed)
        return "hangup"

    def _pass(self, record: Record) -> str:
        reason = record.fields.get("reason", "unknown")
        self.passes[reason] += 1
        key = _conn(record)
        if key in self._observed:
            self._observed.discard(key)
            self.folded += 1
            return ""
        if reason in HELD_OUT:
            return "pass-other"
        elapsed = record.number("elapsed")
        if reason == "delay" and elapsed is not None:
            self.waits.append(elapsed)
        return "pass"

    def _overload(self, record: Record) -> str:
        refused = record.number("refused")
        self.refused[record.fields.get("limit", "unknown")] += int(refused or 0)
        return ""

    # -- what the report prints ------------------------------------------------

    @property
    def repelled(self) -> int:
        """Early talkers cut off and hang-ups: connections the delay turned away."""
        return sum(self.early[a] for a in REPELLING) + sum(self.hangups.values())

    @property
    def would_repel(self) -> int:
        """Early talkers only logged (`--on-early log`)."""
        return self.early["log"]

    @property
    def judged(self) -> int:
        """Connections the delay decided: repelled, would repel, or passed for `delay`."""
        return self.repelled + self.would_repel + len(self.waits)

    def delays_seen(self) -> list[int]:
        """The delays in force, as the whole seconds passed clients waited."""
        return sorted({round(w) for w in self.waits})

    def curve(self, times: list[float]) -> list[int]:
        """How many of `times` fall in each bin of the give-up curve."""
        counts = [0] * (LAST_BIN // BIN + 1)
        for t in times:
            counts[bin_of(t)] += 1
        return counts

    def what_if(self, delay: float) -> WhatIf:
        """Repelled, passed and unknown among the observed clients under `delay`.

        A client that hung up or talked at `e` is repelled iff e < delay; one
        passed after waiting `w` is known patient up to w only. 1 ms of slack
        absorbs the rounding of `elapsed`.
        """
        left = self.hangup_times + self.early_times + self.would_times
        repelled = sum(1 for e in left if e < delay)
        patient = sum(1 for w in self.waits if w + 0.001 >= delay)
        return WhatIf(
            int(delay), repelled, len(left) - repelled + patient, len(self.waits) - patient
        )


def _conn(record: Record) -> tuple[str, str]:
    return record.fields.get("client", ""), record.fields.get("client_port", "")


_HANDLERS = {
    "early-talker": Tally._early,
    "hangup": Tally._hangup,
    "pass": Tally._pass,
    "overload": Tally._overload,
}

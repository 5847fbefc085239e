"""Count repeld events into what the report shows; no I/O.

A `Tally` is fed `Record`s in log order. Which connections the delay is about:
those held the full delay or cut off on the way, that is passes for `delay`,
hang-ups and early talkers that were cut off (`drop`, `reject`) or only logged
(`log`, the observe mode: "would repel"). Trusted, `nodelay`, `dnswl` and cached
passes and `penalty` early talkers never waited, so the delay decided nothing
for them; clients a DNS list cut off (`dnsbl` drop or reject) were turned away
by the list, not by the delay, and are counted on their own row. In observe
mode the early talker's connection also ends in a `pass`; that pass is matched
to its early-talker event by client address and port and the connection
counted once, as "would repel" (so is a hang-up or a `dnsbl` drop or reject
that ends it instead, the lists judging an observed talker at the end of its
delay, or the drop of an observed talker that sent too much: core/hold.py's
FLOOD_LIMIT). A `proxy-error` is the load balancer's PROXY header gone wrong, not a
verdict on a client: its own row too. Events the report does not break down
are counted by name.

The memory is bounded whatever the number of lines, and whatever they say: the
times waited are kept as counts per whole second up to two hours (what the
give-up curve and the what-if table need, since the delays they try are whole
seconds), the verdicts over time as counts per bucket (the bucket widening as
the log's span grows, never beyond 72 buckets a day, and never more than
`MAX_KEYS` buckets: a log whose times span millennia draws what fits), and
every table keyed by something from the log has a cap (`MAX_KEYS`; past it,
the busiest networks are counted by the Space-Saving algorithm and marked
approximate).

An enforced early talker (`enforce`, --on-early enforce) was cut off too, after
repeld refused its recipients; its event names the HELO and sender it gave,
and the report counts their domains and names, for an audit of whom it cut.
"""

from __future__ import annotations

import heapq
import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from repeld.core.addresses import embedded_ipv4
from repeld.core.names import EarlyAction, EventName, PassReason
from repeld.report.parse import Record

__all__ = [
    "BIN",
    "BUCKETS",
    "CANDIDATES",
    "CATEGORIES",
    "HELD_OUT",
    "LAST_BIN",
    "MAX_KEYS",
    "Tally",
    "TopCounter",
    "WhatIf",
    "network_of",
    "sender_domain",
]

#: Width of the give-up curve's bins, and where its last (open) bin starts, in seconds.
BIN = 5
LAST_BIN = 60
#: The delays the what-if table tries.
CANDIDATES = (10, 15, 20, 25, 30, 40)
#: Early-talker and dnsbl actions that cut the client off; `log` only watched it
#: (`enforce` answered the talker's dialogue, then cut it off).
REPELLING = frozenset({EarlyAction.DROP, EarlyAction.REJECT, EarlyAction.ENFORCE})
#: Pass reasons for which nobody waited.
HELD_OUT = frozenset({PassReason.TRUSTED, PassReason.NODELAY, PassReason.CACHE, PassReason.DNSWL})
#: The categories of the verdicts-over-time picture, in stacking order.
CATEGORIES = (
    "pass",
    "pass-other",
    "early-talker",
    "hangup",
    "would-repel",
    "dnsbl",
    "proxy-error",
)
#: Bucket widths of the verdicts over time, in seconds: the first that gives at most
#: 72 buckets is drawn. Each up to a day divides the next, so counts kept at one width
#: add up into the next; weeks and 30 days are drawn from days.
BUCKETS = (60, 300, 900, 3600, 3 * 3600, 6 * 3600, 86400, 7 * 86400, 30 * 86400)
_KEPT_BUCKETS = BUCKETS[: BUCKETS.index(86400) + 1]
MAX_BARS = 72
#: The most distinct keys (networks, reasons, event names, connections awaiting their
#: pass) any one table keeps.
MAX_KEYS = 100_000
#: The longest wait kept as such, in seconds; longer ones count as this long. Twice
#: the longest delay repeld takes (--delay, --dnsbl-delay: an hour): no curve bin and
#: no candidate delay looks past it, and a table keyed by seconds stays this small.
_MAX_SECONDS = 2 * 3600
#: The delays in force the report names (the most common, when a log says more).
MAX_DELAYS_SHOWN = 5


def network_of(address: str) -> str:
    """The /24 (IPv4) or /64 (IPv6) network of an address, or the text as it is.

    An IPv6 address that carries an IPv4 client (`addresses.embedded_ipv4`:
    IPv4-mapped, or a translator's 64:ff9b::/96) is in that client's /24.
    """
    octets = address.split(".")
    if len(octets) == 4 and all(_OCTET.fullmatch(o) for o in octets):
        return f"{octets[0]}.{octets[1]}.{octets[2]}.0/24"  # the common case, fast
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        ip = embedded_ipv4(ip) or ip
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


_OCTET = re.compile(r"25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9]")


def bin_of(elapsed: float) -> int:
    """The index of the give-up curve's bin for `elapsed` seconds."""
    return min(int(max(elapsed, 0.0) // BIN), LAST_BIN // BIN)


def _second(elapsed: float) -> int:
    return min(int(max(elapsed, 0.0)), _MAX_SECONDS)


def _bump(counter: Counter[str], key: str, by: int = 1) -> None:
    # A table keyed by what the log says keeps at most MAX_KEYS keys; the rest is "other".
    if key in counter or len(counter) < MAX_KEYS:
        counter[key] += by
    else:
        counter["other"] += by


class TopCounter:
    """Counts per key, exact up to `capacity` keys, then the Space-Saving algorithm.

    Past `capacity` distinct keys, a new key takes the place of the least counted
    one and inherits its count (Metwally, Agrawal and El Abbadi, 2005): every key
    counted more than total/capacity times is still there, and no count is more
    than `error` above the truth.
    """

    def __init__(self, capacity: int = MAX_KEYS) -> None:
        self.capacity = capacity
        self.counts: dict[str, int] = {}
        self.total = 0
        #: The largest count a key inherited: the most any count may be over.
        self.error = 0
        self._heap: list[tuple[int, str]] = []

    @property
    def exact(self) -> bool:
        return self.error == 0

    def add(self, key: str) -> None:
        self.total += 1
        if key in self.counts:
            self.counts[key] += 1
            return
        if len(self.counts) < self.capacity:
            self.counts[key] = 1
            heapq.heappush(self._heap, (1, key))
            return
        # The heap's entries may be stale (counted up since): push them back with
        # their count until the top is true; each push back follows an increment.
        while True:
            count, least = self._heap[0]
            now = self.counts[least]
            if now == count:
                break
            heapq.heapreplace(self._heap, (now, least))
        del self.counts[least]
        self.counts[key] = count + 1
        self.error = max(self.error, count)
        heapq.heapreplace(self._heap, (count + 1, key))

    def most_common(self, n: int) -> list[tuple[str, int]]:
        return Counter(self.counts).most_common(n)


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
    #: Lines skipped because they were longer than parse.MAX_LINE.
    too_long: int = 0
    events: Counter[str] = field(default_factory=Counter)
    passes: Counter[str] = field(default_factory=Counter)
    early: Counter[str] = field(default_factory=Counter)
    hangups: Counter[str] = field(default_factory=Counter)
    dnsbl: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    proxy_errors: Counter[str] = field(default_factory=Counter)
    #: 421s told for backend errors (a summary event stands for `count` of them).
    backend_errors: int = 0
    #: Passes that followed an observed (`action=log`) early talk of the same connection.
    folded: int = 0
    #: Hang-ups of observed talkers, in `hangups` but not in `repelled`.
    folded_hangups: int = 0
    #: Observed talkers cut off for a flood (more than the core's FLOOD_LIMIT
    #: unread), in `early` but not in `repelled`.
    folded_early: int = 0
    #: Whole seconds waited, counted: hang-ups, early talkers cut off, early talkers only
    #: logged; passes for `delay` (by the second they were patient up to, 1 ms of slack
    #: absorbing the rounding of `elapsed`, and by the delay they waited, rounded).
    hangup_secs: Counter[int] = field(default_factory=Counter)
    early_secs: Counter[int] = field(default_factory=Counter)
    would_secs: Counter[int] = field(default_factory=Counter)
    patient_secs: Counter[int] = field(default_factory=Counter)
    delays: Counter[int] = field(default_factory=Counter)
    networks: TopCounter = field(default_factory=TopCounter)
    #: The first and last time of a verdict, and verdicts counted per bucket of
    #: `bucket_width` seconds: {(bucket start // width, category): count}.
    first: float | None = None
    last: float | None = None
    bucket_width: int = BUCKETS[0]
    buckets: Counter[tuple[int, str]] = field(default_factory=Counter)
    #: Connections whose early talk was only logged, awaiting their pass (oldest first).
    #: By (process, client, client port): a connection is one process's, and
    #: ends with it (`_ended`): a talker still held when repeld stopped
    #: writes no verdict, and a later connection from the same address and
    #: port, after a restart, was folded into it. A process is its host and
    #: PID (`_process`): merged logs of several hosts can share a PID.
    #: `_by_process` indexes them, so that a process's end costs what it removes.
    _observed: dict[tuple[str, str, str], None] = field(default_factory=dict)
    _by_process: dict[str, set[tuple[str, str, str]]] = field(default_factory=dict)
    #: Enforced talkers (--on-early enforce): their sender domains and HELO names.
    sender_domains: Counter[str] = field(default_factory=Counter)
    helo_names: Counter[str] = field(default_factory=Counter)
    #: Enforced talkers read from summary lines (-f, a file template that drops
    #: the structured data): their envelope, escaped but for its spaces, is not
    #: read back from the summary, where it cannot be told apart for sure.
    envelopes_unread: int = 0

    def skip(self, too_long: bool = False) -> None:
        """A line that holds no repeld event (or was too long to read)."""
        self.lines += 1
        self.skipped += 1
        self.too_long += too_long

    def add(self, record: Record) -> None:
        """One event, in log order."""
        self.lines += 1
        _bump(self.events, record.event)
        handler = _HANDLERS.get(record.event)
        if handler is not None:
            category = handler(self, record)
            if category and record.time is not None:
                self._at(record.time, category)

    def _at(self, when: float, category: str) -> None:
        first = when if self.first is None else min(self.first, when)
        last = when if self.last is None else max(self.last, when)
        self.first, self.last = first, last
        width = self.bucket_width
        while (last - first) / width >= MAX_BARS and width < _KEPT_BUCKETS[-1]:
            width = _KEPT_BUCKETS[_KEPT_BUCKETS.index(width) + 1]
        if width != self.bucket_width:
            ratio = width // self.bucket_width
            merged: Counter[tuple[int, str]] = Counter()
            for (index, cat), n in self.buckets.items():
                merged[index // ratio, cat] += n
            self.buckets, self.bucket_width = merged, width
        key = (int(when // width), category)
        if key in self.buckets or len(self.buckets) < MAX_KEYS:  # bounded: a log spread
            self.buckets[key] += 1  # over millennia (crafted) draws what fits

    def _early(self, record: Record) -> str:
        action = record.fields.get("action", "unknown")
        if action == "log" and record.fields.get("bytes") == "0":
            # A remembered talker in observe mode (a penalty, "log"): held as
            # usual, its connection is judged by the verdict that ends it, as
            # an enforcing penalty (never held) is not judged at all.
            _bump(self.early, "penalty-log")
            return ""
        if action == "log" and _conn(record) in self._observed:
            return ""  # its talk is counted already (a line twice, merged logs)
        _bump(self.early, action)
        if action in REPELLING and self._folded(record):
            # Its talk was logged, then it was cut off for its flood: the
            # connection is counted once, as "would repel" (the events table
            # still counts this event).
            self.folded_early += 1
            return ""
        self.networks.add(network_of(record.fields.get("client", "?")))
        elapsed = record.number("elapsed")
        if action == "log":
            key = _conn(record)
            if key not in self._observed and len(self._observed) >= MAX_KEYS:
                self._forget(next(iter(self._observed)))
            self._observed[key] = None
            self._by_process.setdefault(key[0], set()).add(key)
            if elapsed is not None:
                self.would_secs[_second(elapsed)] += 1
            return "would-repel"
        if action in REPELLING and elapsed is not None:
            self.early_secs[_second(elapsed)] += 1
        if action == "enforce":
            if record.shape == "summary":  # its envelope is in the structured data only
                self.envelopes_unread += 1
            else:
                self._envelope(record)
        return "early-talker"

    def _envelope(self, record: Record) -> None:
        # What an enforced talker said of itself; nothing said, nothing counted.
        helo = record.fields.get("helo", "")
        if helo:
            _bump(self.helo_names, helo.lower())
        domain = sender_domain(record.fields.get("sender", ""))
        if domain:
            _bump(self.sender_domains, domain)

    def _folded(self, record: Record) -> bool:
        # The verdict that ends an observed talker's connection (its pass, or a
        # hang-up or a list's cut): the connection is judged once, as "would repel".
        key = _conn(record)
        if key not in self._observed:
            return False
        self._forget(key)
        self.folded += 1
        return True

    def _forget(self, key: tuple[str, str, str]) -> None:
        del self._observed[key]
        keys = self._by_process[key[0]]
        keys.discard(key)
        if not keys:
            del self._by_process[key[0]]

    def _hangup(self, record: Record) -> str:
        _bump(self.hangups, record.fields.get("how", "unknown"))
        # (with --teaser a bot that closes with the line unread resets: every time)
        if self._folded(record):
            self.folded_hangups += 1  # the verdicts table still counts its event
            return ""
        elapsed = record.number("elapsed")
        if elapsed is not None:
            self.hangup_secs[_second(elapsed)] += 1
        return "hangup"

    def _pass(self, record: Record) -> str:
        reason = record.fields.get("reason", "unknown")
        _bump(self.passes, reason)
        if self._folded(record):
            return ""
        if reason in HELD_OUT:
            return "pass-other"
        elapsed = record.number("elapsed")
        if reason == "delay" and elapsed is not None:
            self.patient_secs[_second(elapsed + 0.001)] += 1
            self.delays[_second(round(elapsed))] += 1
        return "pass"

    def _dnsbl(self, record: Record) -> str:
        action = record.fields.get("action", "unknown")
        _bump(self.dnsbl, action)
        # log and delay hold the client on: its connection ends in another verdict.
        if action not in REPELLING or self._folded(record):
            return ""
        return "dnsbl"

    def _ended(self, record: Record) -> str:
        # A process stopped, or a worker died (the parent's worker-exit names
        # it: the structured shapes say its pid, a summary does not): none of
        # its connections is open any more, nor judged again. A process that
        # starts has a PID of its own; lines that name none (-f) end at a stop.
        if record.event == EventName.WORKER_EXIT:
            pid = record.fields.get("pid")
            if not pid:
                return ""
            process = _process(record.host, pid)
        else:
            process = _process(record.host, record.procid)
        for key in self._by_process.pop(process, ()):
            del self._observed[key]
        return ""

    def _backend_error(self, record: Record) -> str:
        count = record.number("count")
        self.backend_errors += max(int(count), 1) if count is not None else 1
        return ""

    def _overload(self, record: Record) -> str:
        refused = record.number("refused")
        _bump(self.refused, record.fields.get("limit", "unknown"), int(refused or 0))
        return ""

    def _proxy_error(self, record: Record) -> str:
        _bump(self.proxy_errors, record.fields.get("reason", "unknown"))
        return "proxy-error"

    # -- what the report prints ------------------------------------------------

    @property
    def waited(self) -> int:
        """Clients passed for `delay`, with the time they waited."""
        return sum(self.patient_secs.values())

    @property
    def repelled(self) -> int:
        """Early talkers cut off and hang-ups: connections the delay turned away."""
        hangups = sum(self.hangups.values()) - self.folded_hangups
        cut = sum(self.early[a] for a in REPELLING) - self.folded_early
        return cut + hangups

    @property
    def would_repel(self) -> int:
        """Early talkers only logged (`--on-early log`)."""
        return self.early["log"]

    @property
    def judged(self) -> int:
        """Connections the delay decided: repelled, would repel, or passed for `delay`."""
        return self.repelled + self.would_repel + self.waited

    def delays_seen(self) -> list[int]:
        """The delays in force, as the whole seconds passed clients waited (the
        MAX_DELAYS_SHOWN most common)."""
        return sorted(d for d, _ in self.delays.most_common(MAX_DELAYS_SHOWN))

    def curve(self, *kinds: str) -> list[int]:
        """How many hang-ups ("hangup"), early talk cut off ("early") or only logged
        ("would") fall in each bin of the give-up curve."""
        counts = [0] * (LAST_BIN // BIN + 1)
        for kind in kinds:
            for second, n in self._secs(kind).items():
                counts[bin_of(second)] += n
        return counts

    def _secs(self, kind: str) -> Counter[int]:
        return {"hangup": self.hangup_secs, "early": self.early_secs, "would": self.would_secs}[
            kind
        ]

    def what_if(self, delay: int) -> WhatIf:
        """Repelled, passed and unknown among the observed clients under `delay` seconds.

        A client that hung up or talked at `e` is repelled iff e < delay, that is
        iff its whole second is; one passed after waiting `w` is known patient up
        to w only (w + 1 ms, for the rounding of `elapsed`).
        """
        left = self.hangup_secs + self.early_secs + self.would_secs
        repelled = sum(n for second, n in left.items() if second < delay)
        patient = sum(n for second, n in self.patient_secs.items() if second >= delay)
        return WhatIf(delay, repelled, left.total() - repelled + patient, self.waited - patient)

    def over_time(self) -> tuple[int, int, list[dict[str, int]]]:
        """The verdicts over time as at most 73 bars: (start, width, counts per bar)."""
        if self.first is None or self.last is None:
            return 0, BUCKETS[0], []
        span = self.last - self.first
        # Past 72 months (a clock gone wrong, a bad --year), whole days as wide as need be.
        width = next(
            (w for w in BUCKETS if span / w < MAX_BARS),
            86400 * (int(span // (86400 * MAX_BARS)) + 1),
        )
        start = int(self.first // width) * width
        count = int((self.last - start) // width) + 1
        bars = [dict.fromkeys(CATEGORIES, 0) for _ in range(count)]
        for (index, category), n in self.buckets.items():
            at = min(int((index * self.bucket_width - start) // width), count - 1)
            bars[max(at, 0)][category] += n
        return start, width, bars


def _process(host: str, procid: str) -> str:
    # The host by its first label, in lower case: one process's lines can name
    # it `mx1` (a syslog daemon's header, local JSON) and `mx1.example.org`
    # (repeld's own RFC 5424) once a reload switches formats. An address (a
    # relay's HOSTNAME may be one) is whole. A host name has no space in it
    # (nor has a PID): the pair in one key.
    if ":" in host or host.replace(".", "").isdigit():
        return f"{host.lower()} {procid}"
    return f"{host.split('.', 1)[0].lower()} {procid}"


def _conn(record: Record) -> tuple[str, str, str]:
    process = _process(record.host, record.procid)
    return process, record.fields.get("client", ""), record.fields.get("client_port", "")


_HANDLERS: dict[str, Callable[[Tally, Record], str]] = {
    EventName.EARLY_TALKER: Tally._early,
    EventName.HANGUP: Tally._hangup,
    EventName.PASS: Tally._pass,
    EventName.DNSBL: Tally._dnsbl,
    EventName.BACKEND_ERROR: Tally._backend_error,
    EventName.OVERLOAD: Tally._overload,
    EventName.PROXY_ERROR: Tally._proxy_error,
    EventName.STOP: Tally._ended,
    EventName.WORKER_EXIT: Tally._ended,
}

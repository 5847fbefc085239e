"""DNS allow and block lists, scored the way postscreen scores them, with no I/O.

A list entry is `DOMAIN[=FILTER][*WEIGHT]` (postscreen_dnsbl_sites' syntax):
the client's address is looked up as an A record under DOMAIN (IPv4 octets
reversed, IPv6 as 32 reversed nibbles); an answer lists the client when one
of its addresses matches FILTER. Without a filter, any address in 127.0.0.0/8
(RFC 5782 section 2.3) lists it, except those the lists answer with to say that
they refuse the asker, not that they list the client (`ERROR_REPLIES`:
dnswl.org's 127.0.0.255, Spamhaus's 127.255.255.0/24): taken as a listing, they
would block or allow every client at once.
FILTER is d.d.d.d where each d is a number or a bracketed `;`-separated set of
numbers and `LOW..HIGH` ranges: `127.0.0.[2..11]`, `127.0.[0..255].[1;2;3]`.

The score of a client is the sum of the weights of the entries that listed
it (lists that have not answered yet, or never will, count as not listing
it); an entry counts once however many addresses matched. Several entries may
name one domain with different filters (list.dnswl.org's trust levels), and
one query per domain serves them all. A --dnsbl weight is added as written
(1 by default; negative allows, as in postscreen); a --dnswl weight is a
positive amount taken off (1 by default, so a --dnswl entry counts -1).

`DnsPolicy.judge` turns a score into allow, block or neither; the hold
(core/hold.py) acts on it. `DnsPolicy.settled` says whether the answers
received so far decide the outcome already: when the weights of the lists
still to answer (`DnsScore.reach`) can no longer move the score across a
threshold, the verdict need not wait for them. `ListWatch` notices a list
that suddenly lists nearly everyone. The shell (shell/dnslookup.py) asks the
lists and feeds the answers to `score`; `AnswerCache` keeps each answer for its DNS
TTL so that a client seen again costs no query, and `ScoreCache` the score it
made, so that such a client is judged at accept with one dictionary lookup.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import re
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from repeld.core.addresses import embedded_ipv4

__all__ = [
    "ANSWER_CACHE_SIZE",
    "ERROR_REPLIES",
    "MAX_TTL",
    "NEGATIVE_TTL",
    "RESULTS",
    "UNLISTED",
    "WATCH_ALARM",
    "WATCH_REARM",
    "WATCH_WINDOW",
    "AnswerCache",
    "DnsAction",
    "DnsList",
    "DnsPolicy",
    "DnsScore",
    "Judgement",
    "ListWatch",
    "Octet",
    "ReplyFilter",
    "ScoreCache",
    "TtlCache",
    "domains",
    "negative_ttl",
    "query_name",
    "reach",
    "refuses",
    "reject_line",
    "reversed_address",
    "score",
]

#: One octet of a filter: inclusive (low, high) ranges.
Octet = tuple[tuple[int, int], ...]
#: A reply filter: four octets.
ReplyFilter = tuple[Octet, Octet, Octet, Octet]


@dataclass(frozen=True, slots=True)
class DnsList:
    """One list entry: the domain, its reply filter (None: any answer) and its weight."""

    domain: str
    filter: ReplyFilter | None = None
    weight: int = 1

    def matches(self, replies: Iterable[str]) -> bool:
        """Whether any A record of the answer lists the client under this entry."""
        for reply in replies:
            try:
                octets = ipaddress.IPv4Address(reply).packed
            except ValueError:
                continue  # not an A record's address: never a listing
            if self.filter is None:
                if octets[0] == 127 and not _refusal(octets):
                    return True
                continue
            if all(
                any(low <= octet <= high for low, high in ranges)
                for octet, ranges in zip(octets, self.filter, strict=True)
            ):
                return True
        return False

    def __str__(self) -> str:
        text = self.domain
        if self.filter is not None:
            text += "=" + ".".join(_octet_text(o) for o in self.filter)
        return text + (f"*{self.weight}" if self.weight != 1 else "")


#: Answers that say the list refuses the asker, never that it lists the client:
#: dnswl.org's 127.0.0.255 ("blocked": too many queries, or through a public
#: resolver), Spamhaus's 127.255.255.252 (typing error), .254 (public resolver)
#: and .255 (too many queries). An entry without a filter ignores them; one with
#: a filter takes what its filter says.
ERROR_REPLIES = ("127.0.0.255", "127.255.255.0/24")


def _refusal(octets: bytes) -> bool:
    return octets == b"\x7f\x00\x00\xff" or octets[:3] == b"\x7f\xff\xff"


def refuses(replies: Iterable[str]) -> bool:
    """Whether an answer with A records says only that the list refuses the
    asker (ERROR_REPLIES) or holds nothing a list answers (no 127/8 address: a
    parked or hijacked domain): a list that answers so lists nobody."""
    seen = False
    for reply in replies:
        seen = True
        try:
            octets = ipaddress.IPv4Address(reply).packed
        except ValueError:
            continue
        if octets[0] == 127 and not _refusal(octets):
            return False
    return seen


def _octet_text(octet: Octet) -> str:
    parts = [str(lo) if lo == hi else f"{lo}..{hi}" for lo, hi in octet]
    if len(parts) == 1 and octet[0][0] == octet[0][1]:
        return parts[0]
    return "[" + ";".join(parts) + "]"


def query_name(address: str, domain: str) -> str:
    """The name to look up for `address` on the list `domain`.

    IPv4: the octets reversed (192.0.2.1 -> 1.2.0.192.DOMAIN); IPv6: the 32
    nibbles reversed, as ip6.arpa does. An IPv6 address that carries an IPv4
    client (IPv4-mapped, or translated with the well-known prefix 64:ff9b::/96:
    `addresses.embedded_ipv4`) is asked as that IPv4 address: the lists list
    the client, not the translator's prefix. ValueError for anything that is
    no address.
    """
    return f"{reversed_address(address)}.{domain.rstrip('.')}"


_OCTET_RE = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(r"\.".join([_OCTET_RE] * 4), re.ASCII)


def reversed_address(address: str) -> str:
    """The part of every list's query name that comes from the address (query_name
    without the domain): computed once per client however many lists there are."""
    canonical = _DOTTED_QUAD.fullmatch(address)  # what accept gives: the fast way
    if canonical is not None:
        return ".".join(reversed(canonical.groups()))
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        ip = embedded_ipv4(ip) or ip
    if isinstance(ip, ipaddress.IPv4Address):
        return ".".join(reversed(str(ip).split(".")))
    return ".".join(reversed(ip.exploded.replace(":", "")))


def domains(lists: Iterable[DnsList]) -> tuple[str, ...]:
    """The domains to query, each once, in the order they were configured."""
    return tuple(dict.fromkeys(entry.domain for entry in lists))


@dataclass(frozen=True, slots=True)
class DnsScore:
    """What the lists said of a client: the sum of weights and the domains that
    listed it; `missing`, the domains that have not answered (yet, or in time);
    `reach`, the least and the most their weights could still add to the score
    ((0, 0) once no answer is to come: the score is final); `allowing`, those of
    `lists` whose entries that matched weigh nothing or less (an allow list's):
    never named as a reason for a block."""

    score: int = 0
    lists: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    reach: tuple[int, int] = (0, 0)
    allowing: tuple[str, ...] = ()

    @property
    def blocking(self) -> tuple[str, ...]:
        """The domains that listed the client with a positive weight."""
        return (
            tuple(d for d in self.lists if d not in self.allowing) if self.allowing else self.lists
        )


#: The score of a client no list listed (most of them): one shared instance.
UNLISTED = DnsScore()


def score(
    lists: Sequence[DnsList],
    answers: Mapping[str, Sequence[str]],
    missing: Sequence[str] = (),
    pending: Sequence[str] = (),
) -> DnsScore:
    """The client's score from the answers, keyed by domain (a list that did not
    answer, or answered NXDOMAIN, is missing or empty: not listed).

    `missing`: the domains with no answer (named in the events); `pending`,
    those of them whose answer may still come (their weights make the reach).
    """
    total = 0
    listed: dict[str, int] = {}  # each domain that listed the client, and its weight
    for entry in lists:
        if entry.matches(answers.get(entry.domain, ())):
            total += entry.weight
            listed[entry.domain] = listed.get(entry.domain, 0) + entry.weight
    if not listed and not missing:
        return UNLISTED
    allowing = tuple(domain for domain, weight in listed.items() if weight <= 0)
    return DnsScore(total, tuple(listed), tuple(missing), reach(lists, pending), allowing)


def reach(lists: Iterable[DnsList], pending: Iterable[str]) -> tuple[int, int]:
    """The least and the most the entries of the `pending` domains could add to a
    score: every negative weight, every positive one (each entry counts once)."""
    waiting = set(pending)
    low = high = 0
    for entry in lists:
        if entry.domain in waiting:
            if entry.weight < 0:
                low += entry.weight
            else:
                high += entry.weight
    return low, high


class DnsAction(enum.StrEnum):
    """What --dnsbl-action does to a blocked client."""

    DROP = "drop"
    REJECT = "reject"
    LOG = "log"
    DELAY = "delay"


class Judgement(enum.Enum):
    """A score's meaning under the thresholds."""

    ALLOW = "allow"
    BLOCK = "block"
    NEITHER = "neither"


@dataclass(frozen=True, slots=True)
class DnsPolicy:
    """The thresholds and the block action; the hold applies them to a score."""

    allow_threshold: int = -1
    block_threshold: int = 1
    action: DnsAction = DnsAction.DROP
    #: With action delay: a blocked client is held this long from accept.
    block_delay: float = 0.0

    def __post_init__(self) -> None:
        if self.allow_threshold >= self.block_threshold:
            raise ValueError(
                f"the allow threshold {self.allow_threshold} must be below the block "
                f"threshold {self.block_threshold}"
            )

    def judge(self, result: DnsScore) -> Judgement:
        """Allow at or below the allow threshold, block at or above the block one
        (lists that have not answered count as not listing)."""
        return self._judge(result.score)

    def _judge(self, value: int) -> Judgement:
        if value <= self.allow_threshold:
            return Judgement.ALLOW
        if value >= self.block_threshold:
            return Judgement.BLOCK
        return Judgement.NEITHER

    def settled(self, result: DnsScore) -> Judgement | None:
        """The judgement the answers still to come can no longer change, or None.

        Thresholds cut the line of scores in three: if the least and the most the
        score can still become are judged alike, every score between them is too.
        """
        low, high = result.reach
        judgement = self._judge(result.score + low)
        if low == high == 0 or self._judge(result.score + high) is judgement:
            return judgement
        return None


def reject_line(client: str, lists: Sequence[str]) -> bytes:
    """The one 554 line of --dnsbl-action reject, naming the lists as postscreen does."""
    named = ", ".join(lists) if lists else "DNS lists"
    return f"554 5.7.1 Service unavailable; client [{client}] blocked using {named}\r\n".encode(
        "ascii", "replace"
    )


#: How one list's answer for one client came: from a query (listed: an A record;
#: refused: only A records that say the list refuses the asker, or no 127/8 one
#: (`refuses`); clear: NXDOMAIN or none; timeout; error: SERVFAIL, REFUSED...) or with no query
#: of its own (cached: the answer cache, or a query in flight for another client
#: from the same address), so that every client counts once per list; or none
#: came (skipped: the list, busy with its share of the queries in flight, could
#: not be asked before every client that waited was decided or --dns-timeout
#: passed); timeout and error also take a truncated (TC) or oversized answer,
#: which a list is never asked again over TCP for. Counted by shell/dnslookup.py,
#: shown by metrics.py.
#: late: a query whose answer came after every client that waited for it had
#: been decided (kept in the cache, but no client's verdict had it).
RESULTS = ("listed", "refused", "clear", "timeout", "error", "cached", "skipped", "late")
#: The most entries a `TtlCache` keeps (answers, or scores); the oldest go first.
ANSWER_CACHE_SIZE = 100_000
#: How long "not listed" (NXDOMAIN, or no A record) is kept at least, in seconds,
#: and when the answer has no SOA to say (`negative_ttl`): lists answer most
#: clients so, and a client newly listed is seen within a minute (postscreen's
#: postscreen_dnsbl_min_ttl is 60 s too).
NEGATIVE_TTL = 60.0
#: The longest an answer is kept, whatever TTL the list gave it.
MAX_TTL = 3600.0


def negative_ttl(soa_ttl: int | None, soa_minimum: int | None) -> float:
    """How long a "not listed" answer is kept: the list's negative TTL, the lesser of
    its SOA record's TTL and the SOA's minimum field (RFC 2308, section 5), but at
    least NEGATIVE_TTL; NEGATIVE_TTL without an SOA. (At most MAX_TTL, as every
    answer: `TtlCache.put` caps it.)"""
    if soa_ttl is None or soa_minimum is None:
        return NEGATIVE_TTL
    return max(NEGATIVE_TTL, float(min(soa_ttl, soa_minimum)))


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """Values by key, each until its TTL runs out (at most MAX_TTL).

    Bounded: past `size` entries the one stored first goes. The time is given,
    never read. Two are used: the lists' answers by (domain, query name), and
    each address's final score, so that a client seen again costs one lookup
    whatever the number of lists (`AnswerCache`, `ScoreCache`).
    """

    __slots__ = ("_entries", "_size")

    def __init__(self, size: int = ANSWER_CACHE_SIZE) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size!r}")
        self._size = size
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, key: K, now: float) -> tuple[float, V] | None:
        """(expiry, value), or None if unknown or expired (and then forgotten)."""
        found = self._entries.get(key)
        if found is not None and now >= found[0]:
            del self._entries[key]
            return None
        return found

    def get(self, key: K, now: float) -> V | None:
        """The value, or None if unknown or expired."""
        found = self.entry(key, now)
        return None if found is None else found[1]

    def put(self, key: K, value: V, ttl: float, now: float) -> float:
        """Keep `value` for `ttl` seconds (at most MAX_TTL; 0 or less: not kept).

        Returns when it expires, -inf if it was not kept.
        """
        ttl = min(ttl, MAX_TTL)
        if ttl <= 0:
            return -math.inf
        self._entries.pop(key, None)
        expires = now + ttl
        self._entries[key] = (expires, value)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return expires


#: Each list's answer by (domain, query name): the addresses, () for not listed.
#: A list that did not answer is not stored (asked again next time).
AnswerCache = TtlCache[tuple[str, str], tuple[str, ...]]
#: Each address's score, kept while every list's answer it came from is.
ScoreCache = TtlCache[str, DnsScore]


#: `ListWatch`: the answers it looks at (per list, the latest), the share of them
#: listing that raises the alarm, and the share under which it is raised again.
WATCH_WINDOW = 200
WATCH_ALARM = 0.9
WATCH_REARM = 0.5


class ListWatch:
    """Notices a list that suddenly lists nearly every client: a dead list whose
    domain answers everything, a list that blocks the asker with a listing
    answer, a hijacked domain. Fed each answer to a query of its own (not the
    cached ones: one client seen often would weigh too much); `seen` returns the
    share listed when the alarm goes off, once, until the share has fallen under
    WATCH_REARM again. No clock: the window counts answers, not seconds.
    """

    __slots__ = ("_alarmed", "_listed", "_window")

    def __init__(self) -> None:
        self._window: dict[str, deque[bool]] = {}
        self._listed: dict[str, int] = {}
        self._alarmed: set[str] = set()

    def seen(self, domain: str, listed: bool) -> float | None:
        """One answer of `domain`; the share listed if the alarm goes off now."""
        window = self._window.setdefault(domain, deque())
        count = self._listed.get(domain, 0) + listed
        window.append(listed)
        if len(window) > WATCH_WINDOW:
            count -= window.popleft()
        self._listed[domain] = count
        if len(window) < WATCH_WINDOW:
            return None
        share = count / WATCH_WINDOW
        if domain in self._alarmed:
            if share < WATCH_REARM:
                self._alarmed.discard(domain)
            return None
        if share >= WATCH_ALARM:
            self._alarmed.add(domain)
            return share
        return None

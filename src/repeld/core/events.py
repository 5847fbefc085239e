"""Every event repeld writes is built here: one stable vocabulary for a SIEM.

An `Event` is a name (the RFC 5424 MSGID), a severity, ordered fields and a
one-line human summary in the spirit of postscreen's log lines. The writers in
logformat.py only serialise what this module built; nothing else invents field
names. The vocabulary (repeld(8) EVENTS) is a contract:
add to it, never rename.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from repeld.core.dnsbl import DnsScore
from repeld.core.enforce import Envelope
from repeld.core.hold import Blocked, EarlyTalk, HangUp, Pass, escape_bytes
from repeld.core.names import EnforceEnd, EventName, ExecEnd, HandOffHow, HangupHow, RelayEnd

__all__ = [
    "ConnInfo",
    "Event",
    "FieldValue",
    "Severity",
    "backend_check",
    "backend_error",
    "cache_notice",
    "config_error",
    "dns_list_alarm",
    "dnsbl",
    "early_talker",
    "exec_end",
    "hangup",
    "internal_error",
    "lifecycle",
    "overload",
    "passed",
    "penalized",
    "proxy_error",
    "relay_end",
    "reload",
    "stats",
    "summarize",
    "worker",
]

FieldValue = str | int | float
#: The first names of every event about a connection (`_about`, `passed`): the
#: event's own, then the connection's, and "via" behind a balancer.
_CONN_KEYS = ("event", "client", "client_port", "server", "server_port")
_CONN_VIA_KEYS = (*_CONN_KEYS, "via")
#: What the DNS lists said, in a verdict's event with lists configured.
_DNS_KEYS = ("score", "lists", "unanswered")


class Severity(enum.IntEnum):
    """Syslog severities (RFC 5424 section 6.2.1) that repeld uses."""

    ERR = 3
    WARNING = 4
    NOTICE = 5
    INFO = 6


class ConnInfo(NamedTuple):
    """Who connected where: taken from accept() and getsockname(), never getpeername(),
    or, behind a trusted balancer, from its PROXY header (`via`: the balancer's
    address, "" for a direct connection).

    A named tuple, as `Event` is, not a frozen dataclass: every client builds one
    and every event one, and a frozen dataclass sets each field through
    object.__setattr__ (0.65 µs a build against 0.25 in a loop; 3 µs of a client
    handed off by a worker of two, docs/perf-log/2026-12-07-timer-and-batch.md).
    Immutable and hashable all the same.
    """

    client: str
    client_port: int
    server: str
    server_port: int
    via: str = ""

    @property
    def peer(self) -> str:
        """`[address]:port` of the client, as postscreen writes it."""
        return f"[{self.client}]:{self.client_port}"


class Event(NamedTuple):
    """One thing that happened, ready to be written in any format (a named tuple:
    `ConnInfo` says why).

    Its field names (`keys`) and values are kept apart: a builder's names are
    the same few tuples every time, so a writer formats the values with one
    template made once per name list (core/logformat.py) where pairs cost an
    f-string each. `fields` pairs them again for readers; `Event.of` builds one
    from pairs.
    """

    name: str
    severity: Severity
    keys: tuple[str, ...]
    values: tuple[FieldValue, ...]
    summary: str

    @classmethod
    def of(
        cls,
        name: str,
        severity: Severity,
        fields: tuple[tuple[str, FieldValue], ...],
        summary: str,
    ) -> Event:
        """An event from (name, value) pairs."""
        if not fields:
            return cls(name, severity, (), (), summary)
        # One transposition in C (a pair that is not a pair fails the unpacking):
        # two generator walks cost three times as much, 1.37 µs against 0.42 for
        # an early talker's pairs, on the path of every early talker and hang-up.
        keys, values = zip(*fields, strict=False)
        return cls(name, severity, keys, values, summary)

    @property
    def fields(self) -> tuple[tuple[str, FieldValue], ...]:
        """The fields as (name, value) pairs, in order."""
        return tuple(zip(self.keys, self.values, strict=True))

    def get(self, key: str) -> FieldValue | None:
        try:
            return self.values[self.keys.index(key)]
        except ValueError:
            return None


def _ms(seconds: float) -> float:
    # Millisecond precision is what the vocabulary promises for every duration.
    return round(seconds, 3)


def _about(
    name: EventName,
    severity: Severity,
    conn: ConnInfo,
    keys: tuple[str, ...],
    values: tuple[FieldValue, ...],
    summary: str,
) -> Event:
    """An event about one connection: `event`, the connection's fields (`via`
    too, behind a balancer), then `keys` with their `values`.

    Each builder names its own fields in a constant (`_HANGUP_KEYS`...): built
    as pairs, every early talker and hang-up paid for taking them apart again.
    """
    assert len(keys) == len(values), f"{name}: {len(keys)} names, {len(values)} values"
    if conn.via:
        return Event(name, severity, (*_CONN_VIA_KEYS, *keys), (name, *conn, *values), summary)
    return Event(name, severity, (*_CONN_KEYS, *keys), (name, *conn[:4], *values), summary)


def _dns_values(dns: DnsScore) -> tuple[FieldValue, ...]:
    # With DNS lists configured, a verdict says what they said (score 0 and no
    # lists when they had not answered) and which had not answered (`unanswered`:
    # no answer in time is not "not listed"): the values of _DNS_KEYS, which the
    # builders add only with lists configured.
    return (dns.score, ",".join(dns.lists), ",".join(dns.missing))


def _recipients(recipients: tuple[bytes, ...]) -> str:
    # Each escaped as the first bytes are, and its commas too, so that one
    # recipient can never pass for two: "a,b" is written a\x2cb. The commas
    # count within the limit: escaped after the cut, a recipient of commas
    # grew fourfold, and ten of them took an event past syslog's 8 KiB.
    return ",".join(escape_bytes(r, commas=True) for r in recipients)


#: What an enforced talker's event adds (`_enforce_values`).
_ENFORCE_KEYS = ("helo", "sender", "recipients", "commands", "end")


def _enforce_values(envelope: Envelope, end: EnforceEnd) -> tuple[tuple[FieldValue, ...], str]:
    # The envelope an enforced talker gave, escaped exactly as `first` is: the
    # values of _ENFORCE_KEYS for the event, and their text for the summary.
    helo, sender = escape_bytes(envelope.helo), escape_bytes(envelope.sender)
    recipients = _recipients(envelope.recipients)
    values = (helo, sender, recipients, envelope.commands, str(end))
    return values, f" [helo={helo} sender={sender} recipients={recipients} end={end}]"


#: What an early talker's event says after the connection's fields (then the
#: DNS lists', with lists, and the envelope, with --on-early enforce).
_EARLY_TALKER_KEYS = ("elapsed", "bytes", "first", "action", "rtt_ms", "teaser")


def early_talker(
    conn: ConnInfo,
    verdict: EarlyTalk,
    action: str,
    rtt_ms: float = 0.0,
    dns: DnsScore | None = None,
    enforced: tuple[Envelope, EnforceEnd] | None = None,
) -> Event:
    """A client that spoke before it was greeted (a security event).

    `rtt_ms` is the kernel's smoothed round-trip time to the client (0 if unknown);
    `teaser` is 1 when the client had been sent the --teaser line before it talked;
    `dns`, with DNS lists configured, what they said of it (`score`, `lists`).
    `enforced` (action enforce: one event, at the end of its dialogue) is the
    envelope it gave and how the dialogue ended: `helo`, `sender`, `recipients`
    (comma-separated), `commands` and `end` come last, after `action`, and the
    summary shows them before `(action=enforce)`, which stays last.
    """
    first = escape_bytes(verdict.first)
    elapsed = _ms(verdict.elapsed)
    keys: tuple[str, ...] = _EARLY_TALKER_KEYS
    values: tuple[FieldValue, ...] = (
        elapsed,
        verdict.nbytes,
        first,
        action,
        _ms(rtt_ms),
        int(verdict.teased),
    )
    if dns is not None:
        keys, values = keys + _DNS_KEYS, values + _dns_values(dns)
    told = ""
    if enforced is not None:
        extra, told = _enforce_values(*enforced)
        keys, values = keys + _ENFORCE_KEYS, values + extra
    return _about(
        EventName.EARLY_TALKER,
        Severity.WARNING,
        conn,
        keys,
        values,
        f"PREGREET {verdict.nbytes} after {elapsed:.3f} from {conn.peer}: {first}{told}"
        f" (action={action})",
    )


#: What a remembered early talker's event says after the connection's fields.
_PENALIZED_KEYS = ("elapsed", "bytes", "first", "action")


def penalized(
    conn: ConnInfo, elapsed: float, action: str = "penalty", dns: DnsScore | None = None
) -> Event:
    """A client the pass cache remembers as an early talker, cut off unheard
    (`action` "log": observe mode, held as usual instead)."""
    elapsed = _ms(elapsed)
    keys: tuple[str, ...] = _PENALIZED_KEYS
    values: tuple[FieldValue, ...] = (elapsed, 0, "", action)
    if dns is not None:
        keys, values = keys + _DNS_KEYS, values + _dns_values(dns)
    return _about(
        EventName.EARLY_TALKER,
        Severity.WARNING,
        conn,
        keys,
        values,
        f"PREGREET penalty after {elapsed:.3f} from {conn.peer}: remembered as an early talker"
        f" (action={action})",
    )


def cache_notice(what: EventName, message: str) -> Event:
    """The pass cache became unusable ("cache-error", once per outage) or usable again."""
    if what == EventName.CACHE_ERROR:
        summary = f"CACHE-ERROR {message}; meanwhile every client waits the full delay"
        return _service(what, Severity.WARNING, summary, error=message)
    return _service(what, Severity.NOTICE, f"CACHE-RECOVER {message}", message=message)


_HANGUP_KEYS = ("elapsed", "how")


def hangup(conn: ConnInfo, verdict: HangUp) -> Event:
    """A client that left before it was greeted."""
    elapsed = _ms(verdict.elapsed)
    how = HangupHow.RESET if verdict.reset else HangupHow.CLOSE
    return _about(
        EventName.HANGUP,
        Severity.INFO,
        conn,
        _HANGUP_KEYS,
        (elapsed, how),
        f"HANGUP after {elapsed:.3f} from {conn.peer} ({how}) before the greeting",
    )


#: The names of a `pass` event's fields, by (via, dns, handoff) present: one
#: tuple each, so that its writer's template is found, not made (Event).
_PASS_KEYS: dict[tuple[bool, bool, bool], tuple[str, ...]] = {
    (via, dns, handoff): (
        *(_CONN_VIA_KEYS if via else _CONN_KEYS),
        "elapsed",
        "reason",
        "rtt_ms",
        "early_bytes",
        *(_DNS_KEYS if dns else ()),
        *(("handoff",) if handoff else ()),
    )
    for via in (False, True)
    for dns in (False, True)
    for handoff in (False, True)
}


def passed(
    conn: ConnInfo,
    verdict: Pass,
    rtt_ms: float = 0.0,
    dns: DnsScore | None = None,
    handoff: HandOffHow | None = None,
) -> Event:
    """A client handed to the MTA, and why (`rtt_ms`: round-trip time, 0 if unknown;
    `dns`: what the DNS lists said, with lists configured; `handoff`: how, when
    the client is not relayed)."""
    # _about() written out, with its names from a table, and without _ms() or
    # .peer: every handed-off client's event is built here, and a Python call
    # costs about half a µs in place (docs/perf-log/2026-12-07-day.md).
    elapsed = round(verdict.elapsed, 3)
    reason = str(verdict.reason)
    early = verdict.early_bytes
    via = conn.via
    values: tuple[FieldValue, ...] = (EventName.PASS, *conn) if via else (EventName.PASS, *conn[:4])
    values += (elapsed, reason, round(rtt_ms, 3), early)
    if dns is not None:
        values += _dns_values(dns)
    if handoff is not None:
        values += (handoff,)
    return Event(
        EventName.PASS,
        Severity.INFO,
        _PASS_KEYS[bool(via), dns is not None, handoff is not None],
        values,
        f"PASS {reason.upper()} [{conn.client}]:{conn.client_port} after {elapsed:.3f}"
        + (f" ({early} bytes before the greeting)" if early else ""),
    )


_DNSBL_KEYS = ("elapsed", "score", "lists", "action")


def dnsbl(conn: ConnInfo, verdict: Blocked) -> Event:
    """A client whose DNS list score reached --dnsbl-threshold, and what was done
    (`action`: drop and reject end it; log and delay hold it on)."""
    elapsed = _ms(verdict.elapsed)
    lists = ",".join(verdict.lists)
    action = str(verdict.action)
    return _about(
        EventName.DNSBL,
        Severity.WARNING,
        conn,
        _DNSBL_KEYS,
        (elapsed, verdict.score, lists, action),
        f"DNSBL rank {verdict.score} for {conn.peer} after {elapsed:.3f}: "
        f"{lists or 'no list'} (action={action})",
    )


def dns_list_alarm(domain: str, share: float, window: int, answer: str = "listed") -> Event:
    """A DNS list listed nearly every client of late (`share` of the last `window`
    answers to queries of its own): a dead list whose domain answers everything,
    a list refusing us with a listing answer, a hijacked domain. `answer`
    "refused": it answered nearly every query with a refusal code (Spamhaus's
    127.255.255.254 to a public resolver) or no 127/8 address, so it lists nobody."""
    percent = round(100 * share, 1)
    if answer == "refused":
        summary = (
            f"DNS list {domain} refused {percent:g}% of the last {window} queries: "
            "it lists nobody for this resolver (a public one?)"
        )
    else:
        summary = (
            f"DNS list {domain} listed {percent:g}% of the last {window} clients asked: "
            "dead, hijacked or refusing this resolver?"
        )
    return _service(
        EventName.DNS_LIST_ALARM,
        Severity.WARNING,
        summary,
        list=domain,
        share=percent,
        window=window,
        answer=answer,
    )


_BACKEND_ERROR_KEYS = ("elapsed", "backend", "error")


def backend_error(conn: ConnInfo, elapsed: float, backend: str, error: str) -> Event:
    """The MTA could not be reached for a passed client (it was told 421)."""
    elapsed = _ms(elapsed)
    return _about(
        EventName.BACKEND_ERROR,
        Severity.INFO,
        conn,
        _BACKEND_ERROR_KEYS,
        (elapsed, backend, error),
        f"BACKEND-ERROR {backend} for {conn.peer} after {elapsed:.3f}: {error} (replied 421)",
    )


def summarize(last: Event, count: int) -> Event:
    """`count` backend-errors of one backend and error as one: the last one's fields, `count`.

    The event log writes it when a burst of them found its queue full, so that
    no 421 goes unrecorded.
    """
    assert last.name == EventName.BACKEND_ERROR
    backend, error = last.get("backend"), last.get("error")
    peer = f"[{last.get('client')}]:{last.get('client_port')}"
    return Event.of(
        last.name,
        last.severity,
        (*last.fields, ("count", count)),
        f"BACKEND-ERROR {backend} for {count} clients, the last {peer}"
        f" after {last.get('elapsed'):.3f}: {error} (replied 421)",
    )


_RELAY_END_KEYS = ("elapsed", "duration", "bytes_from_client", "bytes_to_client", "end")


def relay_end(
    conn: ConnInfo, elapsed: float, duration: float, from_client: int, to_client: int, end: RelayEnd
) -> Event:
    """A relayed session is over: how much went each way, how long, how it ended."""
    elapsed = _ms(elapsed)
    duration = _ms(duration)
    return _about(
        EventName.RELAY_END,
        Severity.INFO,
        conn,
        _RELAY_END_KEYS,
        (elapsed, duration, from_client, to_client, end),
        f"RELAY-END {conn.peer} after {elapsed:.3f}: {from_client} bytes in,"
        f" {to_client} bytes out in {duration:.3f}s ({end})",
    )


_EXEC_END_KEYS = ("elapsed", "duration", "program", "status", "end")


def exec_end(
    conn: ConnInfo, elapsed: float, duration: float, program: str, status: int, end: ExecEnd
) -> Event:
    """A client handed to an --exec program is done: how the program exited."""
    elapsed = _ms(elapsed)
    duration = _ms(duration)
    how = f"signal {-status}" if status < 0 else f"status {status}"
    return _about(
        EventName.EXEC_END,
        Severity.INFO,
        conn,
        _EXEC_END_KEYS,
        (elapsed, duration, program, status, end),
        f"EXEC-END {conn.peer} after {elapsed:.3f}: {program} exited with {how}"
        f" after {duration:.3f}s ({end})",
    )


_ERROR_KEYS = ("elapsed", "error")


def internal_error(conn: ConnInfo | None, elapsed: float, error: str) -> Event:
    """Something in repeld failed for one connection; the server itself carries on."""
    values = (_ms(elapsed), error)
    if conn is None:
        keys = ("event", *_ERROR_KEYS)
        return Event(
            EventName.ERROR, Severity.ERR, keys, (EventName.ERROR, *values), f"ERROR: {error}"
        )
    return _about(
        EventName.ERROR, Severity.ERR, conn, _ERROR_KEYS, values, f"ERROR for {conn.peer}: {error}"
    )


_PROXY_ERROR_KEYS = ("elapsed", "reason", "detail")


def proxy_error(balancer: ConnInfo, elapsed: float, reason: str, detail: str) -> Event:
    """A trusted balancer's connection did not begin with a valid PROXY header in
    time: closed, and nobody judged (`client` is the balancer; never a ban)."""
    elapsed = _ms(elapsed)
    return _about(
        EventName.PROXY_ERROR,
        Severity.WARNING,
        balancer,
        _PROXY_ERROR_KEYS,
        (elapsed, reason, detail),
        f"PROXY-ERROR from balancer {balancer.peer} after {elapsed:.3f}: {reason} ({detail})",
    )


_OVERLOAD_KEYS = ("elapsed", "limit", "refused")


def overload(conn: ConnInfo, limit: str, refused: int) -> Event:
    """Clients turned away at a limit; one event stands for `refused` of them."""
    return _about(
        EventName.OVERLOAD,
        Severity.WARNING,
        conn,
        _OVERLOAD_KEYS,
        (0.0, limit, refused),
        f"OVERLOAD {limit}: refused {refused} connection(s), last from {conn.peer} (replied 421)",
    )


def _service(name: EventName, severity: Severity, summary: str, **fields: FieldValue) -> Event:
    # Events about the daemon itself carry no connection fields.
    return Event(name, severity, ("event", *fields), (name, *fields.values()), summary)


def lifecycle(what: EventName, **fields: FieldValue) -> Event:
    """The daemon started or is stopping (`what` is "start" or "stop")."""
    detail = " ".join(f"{k}={v}" for k, v in fields.items())
    return _service(what, Severity.NOTICE, f"{what.upper()} {detail}".rstrip(), **fields)


def reload(notes: list[str]) -> Event:
    """SIGHUP: a new configuration is in force for the next connections."""
    summary = "RELOAD new configuration in force" + ("; " + "; ".join(notes) if notes else "")
    return _service(EventName.RELOAD, Severity.NOTICE, summary, restart_needed="; ".join(notes))


def config_error(error: str) -> Event:
    """SIGHUP with a bad configuration: refused, the old one stays in force."""
    return _service(
        EventName.CONFIG_ERROR,
        Severity.ERR,
        f"CONFIG-ERROR reload refused, old configuration kept: {error}",
        error=error,
    )


def backend_check(backend: str, message: str) -> Event:
    """The start-up or reload check found a backend that will not serve passed clients well."""
    return _service(
        EventName.BACKEND_CHECK,
        Severity.WARNING,
        f"BACKEND-CHECK {backend}: {message}",
        backend=backend,
        message=message,
    )


def stats(counters: dict[str, int], uptime: float) -> Event:
    """SIGUSR1/SIGINFO: connections by verdict since start, and what is in flight."""
    detail = " ".join(f"{k}={v}" for k, v in counters.items())
    return _service(
        EventName.STATS,
        Severity.INFO,
        f"STATS uptime={uptime:.0f}s {detail}",
        uptime=_ms(uptime),
        **counters,
    )


def worker(
    what: EventName, index: int, pid: int, status: int | None = None, then: str = "restarting"
) -> Event:
    """A worker process started ("worker-start") or died ("worker-exit"), and
    `then` what the parent does: it is replaced, or (at the start, before it
    was ever ready) repeld does not start."""
    if status is None:
        return _service(
            what, Severity.INFO, f"WORKER {index} started, pid {pid}", worker=index, pid=pid
        )
    how = f"signal {-status}" if status < 0 else f"status {status}"
    return _service(
        what,
        Severity.ERR,
        f"WORKER {index} pid {pid} exited with {how}; {then}",
        worker=index,
        pid=pid,
        status=status,
    )

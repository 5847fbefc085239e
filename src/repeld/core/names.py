"""The words that cross modules, each defined once: event names and the values of
the fields that the metrics, the report and fail2ban read back.

events.py builds events with these, metrics.py counts by them (its label seeds are
these members, so a seed can never name a value the code does not emit), the report
reads events back by them, and the shell passes them instead of bare strings. They
are `StrEnum`s, so an event's field holds the plain string a SIEM has always seen:
the vocabulary is a contract (add to it, never rename). The verdict types themselves
are in core/hold.py, the reasons for a pass (`PassReason`) here, the refusals
(`Refuse`) in core/policy.py and the DNS lists' actions (`DnsAction`) in core/dnsbl.py.
"""

from __future__ import annotations

import enum

__all__ = [
    "EarlyAction",
    "EnforceEnd",
    "EventName",
    "ExecEnd",
    "HandOffHow",
    "HandOffResult",
    "HangupHow",
    "PassReason",
    "ProxyOutcome",
    "RelayEnd",
]


class EventName(enum.StrEnum):
    """Every event repeld writes (the RFC 5424 MSGID, the `event` field)."""

    # a connection's verdict
    EARLY_TALKER = "early-talker"
    HANGUP = "hangup"
    PASS = "pass"
    DNSBL = "dnsbl"
    OVERLOAD = "overload"
    PROXY_ERROR = "proxy-error"  # a balancer's connection without a valid PROXY header
    # a connection after its verdict
    BACKEND_ERROR = "backend-error"
    RELAY_END = "relay-end"
    EXEC_END = "exec-end"
    ERROR = "error"
    # the daemon
    START = "start"
    STOP = "stop"
    RELOAD = "reload"
    CONFIG_ERROR = "config-error"
    BACKEND_CHECK = "backend-check"
    CACHE_ERROR = "cache-error"
    CACHE_RECOVER = "cache-recover"
    STATS = "stats"
    WORKER_START = "worker-start"
    WORKER_EXIT = "worker-exit"
    DNS_LIST_ALARM = "dns-list-alarm"  # a DNS list lists nearly every client (issue 21)


class EarlyAction(enum.StrEnum):
    """What was done to an early talker (the `action` of `early-talker`)."""

    DROP = "drop"  # reset at once (--on-early drop)
    REJECT = "reject"  # 554, then closed (--on-early reject)
    LOG = "log"  # written down, held and passed as usual (--on-early log)
    PENALTY = "penalty"  # remembered by the pass cache: cut off unheard
    ENFORCE = "enforce"  # held, then its recipients refused by repeld (--on-early enforce)


class EnforceEnd(enum.StrEnum):
    """How an enforce session ended (the `end` of `early-talker`, action enforce)."""

    QUIT = "quit"  # the client said QUIT and was told 221
    CLOSE = "close"  # the client closed its side
    RESET = "reset"  # the connection failed (an RST, or a write that could not go out)
    TIMEOUT = "timeout"  # SESSION_TIME seconds after the greeting (421)
    COMMANDS = "commands"  # more than MAX_COMMANDS commands (421)
    RECIPIENTS = "recipients"  # more than MAX_RECIPIENTS recipients (421)
    DATA = "data"  # more than MAX_SKIPPED bytes skipped: BDAT chunks, overlong lines (421)
    SHUTDOWN = "shutdown"  # repeld was stopping (421)
    GONE = "gone"  # the talker left before the end of its delay: never greeted
    BUSY = "busy"  # every enforce session was taken: dropped as --on-early drop does


class PassReason(enum.StrEnum):
    """Why a connection was handed to the MTA (the `reason` of `pass`)."""

    DELAY = "delay"
    TRUSTED = "trusted"
    NODELAY = "nodelay"
    CACHE = "cache"
    DNSWL = "dnswl"


class HangupHow(enum.StrEnum):
    """How a client left before its greeting (the `how` of `hangup`)."""

    CLOSE = "close"  # a FIN
    RESET = "reset"  # an RST, or a socket that failed


class RelayEnd(enum.StrEnum):
    """How a relayed session ended (the `end` of `relay-end`)."""

    CLOSED = "closed"  # one side closed and the rest was delivered
    TIMEOUT = "timeout"  # silent for --relay-timeout
    CLIENT_RESET = "client-reset"
    BACKEND_RESET = "backend-reset"
    SHUTDOWN = "shutdown"  # cut at the end of --shutdown-grace


class ProxyOutcome(enum.StrEnum):
    """How a trusted balancer's connection left the intake (--proxy-from)."""

    CLIENT = "client"  # a PROXY header for a client: judged as the client from here on
    CHECK = "check"  # a health check: LOCAL / UNKNOWN header, or closed before a byte
    TIMEOUT = "timeout"  # no complete header within --proxy-timeout (proxy-error)
    ERROR = "error"  # not a valid PROXY header (proxy-error, with the parser's reason)
    TRUNCATED = "truncated"  # closed within the header (proxy-error)
    RESET = "reset"  # reset while the header was read (proxy-error)


class ExecEnd(enum.StrEnum):
    """How an --exec program's session ended (the `end` of `exec-end`)."""

    EXIT = "exit"
    SHUTDOWN = "shutdown"


class HandOffHow(enum.StrEnum):
    """How a passed client was handed on when it is not relayed (the `handoff` of
    `pass`; absent for a relayed client)."""

    PASS = "pass"  # its socket given to Postfix's smtpd (-b pass:PATH, core/postfixpass.py)


class HandOffResult(enum.StrEnum):
    """How a hand-off to a Postfix pass service ended: TAKEN, or the cause of its
    421 (the `result` of repeld_handoffs_total; the cause heads backend-error's
    `error`, in the words of core/postfixpass.describe)."""

    TAKEN = "taken"  # smtpd closed the channel: it holds the client
    MISSING = "missing"  # no socket at the path (Postfix not installed or not started)
    REFUSED = "refused"  # a socket, but nobody listening (Postfix stopped)
    PERMISSION = "permission"  # the path is not ours to reach (private/ is postfix's, 0700)
    BUSY = "busy"  # the service's queue of connections is full
    TIMEOUT = "timeout"  # smtpd did not take it within the bound
    DESCRIPTOR_REFUSED = "descriptor-refused"  # the send failed, or the service answered
    ERROR = "error"  # anything else the system said

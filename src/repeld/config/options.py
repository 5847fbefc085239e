"""The option table: every setting once, with its flag, parser, default and help.

The command line (cli.py) and the configuration file (file.py) are two sources
of raw strings fed through the same parsers; `Settings` (settings.py) takes its
defaults from this table, so each default is written here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from repeld.config.values import (
    Listen,
    absolute,
    cache_url,
    choice,
    command,
    count,
    dns_list,
    facility,
    integer,
    network,
    parse_backend,
    parse_listen,
    parse_metrics,
    parse_resolver,
    parse_syslog,
    path,
    sd_id,
    seconds,
    teaser_text,
    user_name,
    v6_prefix,
    workers,
)
from repeld.core.logformat import FORMATS

__all__ = ["OPTIONS", "OPTION_BY_NAME", "Option", "default"]


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: its flag, how to parse it, its default and its help text."""

    name: str
    short: str | None
    parse: Callable[[str], Any] | None  # None: a boolean switch
    default: Any
    help: str
    metavar: str | None = None
    repeat: bool = False
    negatable: bool = False  # a --no-NAME form exists


OPTIONS: tuple[Option, ...] = (
    Option(
        "listen",
        "-l",
        parse_listen,
        (Listen("0.0.0.0", 25), Listen("::", 25)),
        "listen on ADDR:PORT, IPv6 as [::1]:25; add ,nodelay for a listener that is never "
        "held (implicit TLS, port 465) and ,backend=HOST:PORT (or pass:PATH) for its own "
        "MTA; repeatable "
        "(default: 0.0.0.0:25 and [::]:25)",
        metavar="ADDR:PORT[,nodelay][,backend=HOST:PORT|pass:PATH]",
        repeat=True,
    ),
    Option(
        "backend",
        "-b",
        parse_backend,
        None,
        "the MTA to hand patient clients to: HOST:PORT to relay to, or pass:PATH, the socket "
        "of a Postfix pass service that takes the client itself (required)",
        metavar="HOST:PORT|pass:PATH",
    ),
    Option(
        "exec",
        "-e",
        command,
        None,
        "instead of a backend, run this program for each passed client with the client as "
        "its stdin and stdout (inetd/ucspi-tcp style; TCPREMOTEIP and friends are set)",
        metavar="'PROGRAM [ARGS]'",
    ),
    Option(
        "delay",
        "-d",
        seconds("delay", 0.0, 3600.0),
        25.0,
        "seconds to withhold the greeting, fractions allowed, >0 and <=3600 (default: 25)",
        metavar="SECONDS",
    ),
    Option(
        "trusted",
        "-t",
        network,
        (),
        "a network (address or CIDR) whose clients skip the delay; repeatable",
        metavar="NET",
        repeat=True,
    ),
    Option(
        "trusted-file",
        "-T",
        path,
        (),
        "a file of trusted networks, one per line, # comments; repeatable",
        metavar="FILE",
        repeat=True,
    ),
    Option(
        "proxy-from",
        None,
        network,
        (),
        "a balancer's network (address or CIDR) whose connections must begin with a PROXY "
        "v1 or v2 header, whose client is then the client; repeatable",
        metavar="NET",
        repeat=True,
    ),
    Option(
        "proxy-timeout",
        None,
        seconds("proxy-timeout", 0.0, 300.0),
        5.0,
        "close a balancer's connection whose PROXY header is not complete after this long "
        "(default: 5)",
        metavar="SECONDS",
    ),
    Option(
        "proxy-protocol",
        None,
        choice("proxy-protocol", ("none", "v1", "v2")),
        "none",
        "send a PROXY protocol header of this version to the backend (default: none)",
        metavar="none|v1|v2",
    ),
    Option(
        "on-early",
        None,
        choice("on-early", ("drop", "reject", "log", "enforce")),
        "drop",
        "what to do to an early talker: drop closes at once, reject sends one 554 line "
        "first, log only writes it down and holds it for the whole delay like everyone "
        "else, then passes it (observe mode, a first step); enforce holds it for the "
        "whole delay, then greets it itself, refuses every recipient and writes down "
        "its HELO, sender and recipients (default: drop)",
        metavar="drop|reject|log|enforce",
    ),
    Option(
        "teaser",
        None,
        None,
        False,
        "at the start of the hold send the first line of a multi-line greeting, "
        "220-TEXT, then stay silent: a client that talks on seeing any line is an early "
        "talker, and the MTA's own greeting completes the reply (default: off)",
    ),
    Option(
        "teaser-text",
        None,
        teaser_text,
        None,
        "the text of the --teaser line, printable ASCII that starts with a domain; at most "
        "500 characters (default: the host name)",
        metavar="TEXT",
    ),
    Option(
        "report-attacks",
        None,
        None,
        True,
        "write early-talker events to the log; --no-report-attacks only counts them (default: on)",
        negatable=True,
    ),
    Option(
        "syslog",
        None,
        parse_syslog,
        None,
        "where events go: a unix datagram socket path, udp://HOST:PORT or tcp://HOST:PORT "
        "(default: /dev/log on Linux, /var/run/log on FreeBSD)",
        metavar="TARGET",
    ),
    Option(
        "log-format",
        None,
        choice("log-format", FORMATS),
        "auto",
        "rfc5424 (structured data), json (@cee: after an RFC 3164 header) or auto: json on "
        "a local socket, where stock syslog daemons parse only RFC 3164 headers, rfc5424 "
        "over UDP and TCP (default: auto)",
        metavar="auto|rfc5424|json",
    ),
    Option(
        "facility",
        None,
        facility,
        "mail",
        "syslog facility (default: mail)",
        metavar="NAME",
    ),
    Option(
        "sd-id",
        None,
        sd_id,
        "repeld@32473",
        "the RFC 5424 SD-ID of the structured data, NAME@PEN (default: repeld@32473)",
        metavar="NAME@NUMBER",
    ),
    Option(
        "metrics",
        None,
        parse_metrics,
        None,
        "serve Prometheus metrics at http://ADDR:PORT/metrics, an IP address, IPv6 in "
        "brackets; with --workers the parent serves the sum of all workers (default: off)",
        metavar="ADDR:PORT",
    ),
    Option(
        "backend-check-interval",
        None,
        seconds("backend-check-interval", 0.0, 86400.0, zero=True),
        60.0,
        "check every backend this often as a passed client would (greeting, EHLO, QUIT), "
        "for the repeld_backend_up metric and a backend-check event when one fails; "
        "0 turns it off (default: 60)",
        metavar="SECONDS",
    ),
    Option(
        "relay-timeout",
        None,
        seconds("relay-timeout", 0.0, 86400.0),
        600.0,
        "close a relayed session idle this long in both directions (default: 600)",
        metavar="SECONDS",
    ),
    Option(
        "connect-timeout",
        None,
        seconds("connect-timeout", 0.0, 300.0),
        10.0,
        "give up connecting to the backend, or waiting for a pass: service to take the "
        "client, after this long and answer 421 (default: 10)",
        metavar="SECONDS",
    ),
    Option(
        "backlog",
        None,
        count("backlog", 1, 1 << 20),
        None,
        "listen(2) backlog; the kernel caps it (default: the kernel's cap, "
        "net.core.somaxconn or kern.ipc.soacceptqueue)",
        metavar="N",
    ),
    Option(
        "max-held",
        None,
        count("max-held", 1, 10_000_000),
        None,
        "connections held at once; past it new clients get 421 4.3.2 All server ports are "
        "busy (default: the open-files limit minus 512)",
        metavar="N",
    ),
    Option(
        "max-per-client",
        None,
        count("max-per-client", 1, 1_000_000),
        10,
        "connections held at once from one client (IPv6: its --cache-v6-prefix network); "
        "past it 421 4.7.0 Too many connections (default: 10)",
        metavar="N",
    ),
    Option(
        "max-exec",
        None,
        count("max-exec", 1, 1_000_000),
        40,
        "--exec programs running at once; past it a passed client hears 421 4.3.2 "
        "(default: 40, as tcpserver's -c)",
        metavar="N",
    ),
    Option(
        "cache",
        None,
        cache_url,
        None,
        "where clients that waited once are remembered: sqlite:/PATH (one host), "
        "redis://HOST[:PORT][/DB] or rediss://... (shared by several MX hosts), memory, or "
        "none (default: sqlite:/var/lib/repeld/cache.sqlite on Linux, "
        "sqlite:/var/db/repeld/cache.sqlite on FreeBSD)",
        metavar="URL",
    ),
    Option(
        "no-cache",
        None,
        None,
        False,
        "remember nobody: every untrusted client waits the full delay every time",
    ),
    Option(
        "cache-ttl",
        None,
        seconds("cache-ttl", 0.0, 366 * 86400.0),
        86400.0,
        "seconds a client that waited once skips the delay (default: 86400, one day)",
        metavar="SECONDS",
    ),
    Option(
        "cache-v6-prefix",
        None,
        v6_prefix,
        64,
        "IPv6 clients are remembered, and counted for --max-per-client, by this prefix, "
        "since one host owns a /64; 32 to 128 (default: 64)",
        metavar="BITS",
    ),
    Option(
        "penalty-ttl",
        None,
        seconds("penalty-ttl", 0.0, 366 * 86400.0, zero=True),
        0.0,
        "seconds an early talker is remembered and cut off at once on its next connections; "
        "0 turns penalties off (default: 0)",
        metavar="SECONDS",
    ),
    Option(
        "dnsbl",
        None,
        dns_list("dnsbl", allow=False),
        (),
        "a DNS block list looked up while the client is held, in postscreen's syntax: "
        "a reply FILTER such as 127.0.0.[2..11] (default: any reply) and a WEIGHT added to "
        "the client's score (default: 1); repeatable",
        metavar="DOMAIN[=FILTER][*WEIGHT]",
        repeat=True,
    ),
    Option(
        "dnswl",
        None,
        dns_list("dnswl", allow=True),
        (),
        "a DNS allow list, as --dnsbl but its WEIGHT (default: 1) is taken off the score; "
        "repeatable",
        metavar="DOMAIN[=FILTER][*WEIGHT]",
        repeat=True,
    ),
    Option(
        "dnsbl-threshold",
        None,
        integer("dnsbl-threshold", 1, 10_000),
        1,
        "a client whose DNS list score is at least this is blocked with --dnsbl-action, "
        "1 to 10000 (default: 1)",
        metavar="SCORE",
    ),
    Option(
        "dnswl-threshold",
        None,
        integer("dnswl-threshold", -10_000, -1),
        -1,
        "a client whose DNS list score is at most this is passed at once, -10000 to -1 "
        "(default: -1)",
        metavar="SCORE",
    ),
    Option(
        "dnsbl-action",
        None,
        choice("dnsbl-action", ("drop", "reject", "log", "delay")),
        "reject",
        "what to do to a blocked client: reject sends 554 5.7.1 naming the lists and closes, "
        "drop closes at once, log only writes it down, delay holds it for --dnsbl-delay "
        "instead of --delay (default: reject)",
        metavar="drop|reject|log|delay",
    ),
    Option(
        "dnsbl-delay",
        None,
        seconds("dnsbl-delay", 0.0, 3600.0),
        60.0,
        "with --dnsbl-action delay, seconds a blocked client is held from accept, longer "
        "than --delay, >0 and <=3600 (default: 60)",
        metavar="SECONDS",
    ),
    Option(
        "resolver",
        None,
        parse_resolver,
        None,
        "the DNS server the lists are asked through, an IP address, IPv6 in brackets with "
        "a port (default: the servers of /etc/resolv.conf)",
        metavar="ADDR[:PORT]",
    ),
    Option(
        "dns-timeout",
        None,
        seconds("dns-timeout", 0.0, 60.0),
        5.0,
        "seconds a DNS list is given to answer; no answer counts as not listed, and no "
        "client waits for it beyond its delay, >0 and <=60 (default: 5)",
        metavar="SECONDS",
    ),
    Option(
        "workers",
        "-w",
        workers,
        1,
        "worker processes serving the same listeners, or auto for one per CPU; a parent "
        "binds, supervises and restarts them (default: 1, no parent)",
        metavar="N|auto",
    ),
    Option(
        "shutdown-grace",
        None,
        seconds("shutdown-grace", 0.0, 3600.0, zero=True),
        30.0,
        "on SIGTERM, seconds relays in progress may take to finish before they are cut; "
        "0 cuts them at once (default: 30)",
        metavar="SECONDS",
    ),
    Option(
        "keep-pipe-connect",
        None,
        None,
        False,
        "pass the MTA's PIPECONNECT capability on to clients; by default it is taken out of "
        "the first EHLO reply of every relayed session, so no client learns to talk before "
        "the greeting (not with --exec)",
    ),
    Option(
        "user",
        "-u",
        user_name("user"),
        None,
        "after binding, drop to this user (default: repeld where it exists; running on as "
        "root needs --user root)",
        metavar="USER",
    ),
    Option(
        "group",
        "-g",
        user_name("group"),
        None,
        "after binding, drop to this group (default: the user's primary group)",
        metavar="GROUP",
    ),
    Option(
        "chroot",
        None,
        absolute("chroot"),
        None,
        "after binding, chroot to this directory (a unix --syslog socket must be reachable "
        "inside it)",
        metavar="DIR",
    ),
    Option(
        "pidfile",
        "-p",
        absolute("pidfile"),
        None,
        "write the process id here, locked while repeld runs (created as root before the "
        "drop and owned by the service user; removed on exit, or emptied where the "
        "directory does not allow it)",
        metavar="FILE",
    ),
    Option(
        "foreground",
        "-f",
        None,
        False,
        "print a readable line per event on stderr (repeld never detaches itself; "
        "run it under daemon(8) or systemd)",
    ),
)

OPTION_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def default(name: str) -> Any:
    """The default of option `name` (its long flag), as the table gives it."""
    return OPTION_BY_NAME[name].default

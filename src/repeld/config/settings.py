"""The one place where settings live: their names, defaults, limits and parsers.

Every option is declared once in `OPTIONS`; the command line (cli.py) and, later,
a configuration file are two sources of raw strings fed through the same parsers.
A bad value raises `SettingError`, which names the option and the value so the
administrator sees one clear line instead of a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import netaddr

from repeld.core.logformat import FACILITIES, FORMATS, valid_sd_id

if TYPE_CHECKING:
    from repeld.cache.base import CacheSpec
from repeld.core.policy import TrustedNetworks

__all__ = [
    "OPTIONS",
    "Backend",
    "Listen",
    "Option",
    "SettingError",
    "Settings",
    "SyslogTarget",
    "build_settings",
    "default_syslog",
    "load_trusted",
    "parse_backend",
    "parse_listen",
    "parse_syslog",
]

ProxyProtocol = Literal["none", "v1", "v2"]
EarlyAction = Literal["drop", "reject"]


class SettingError(ValueError):
    """A bad value for one option; `str()` is the one line shown to the admin."""

    def __init__(self, option: str, value: object, reason: str) -> None:
        self.option = option
        self.value = value
        self.reason = reason
        super().__init__(f"--{option}: invalid value {value!r}: {reason}")


@dataclass(frozen=True, slots=True)
class Backend:
    """The MTA that patient clients are handed to."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Listen:
    """One listening address; `nodelay` listeners (implicit TLS) are never held.

    `backend`, when set, is the MTA for this listener's clients instead of
    --backend (port 465's clients belong to the MTA's TLS-on-connect port).
    """

    host: str
    port: int
    nodelay: bool = False
    backend: Backend | None = None

    @property
    def family(self) -> int:
        import socket

        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        addr = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        if self.nodelay:
            addr += ",nodelay"
        if self.backend is not None:
            addr += f",backend={self.backend}"
        return addr


@dataclass(frozen=True, slots=True)
class SyslogTarget:
    """Where events go: a unix datagram socket, or syslog over UDP or TCP."""

    kind: Literal["unix", "udp", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}://{host}:{self.port}"


def default_syslog() -> SyslogTarget:
    """The platform's local syslog socket."""
    path = "/var/run/log" if sys.platform.startswith("freebsd") else "/dev/log"
    return SyslogTarget("unix", path=path)


# Plain ASCII numbers only: int() and float() would also take "2_5" and other
# scripts' digits, and a mistyped port must not quietly become another one.
_DIGITS = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")


def _split_hostport(text: str, option: str) -> tuple[str, int]:
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise SettingError(option, text, "expected [IPV6]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise SettingError(option, text, "expected HOST:PORT")
        if ":" in host:
            raise SettingError(option, text, "write an IPv6 address in brackets: [::1]:25")
    if not _DIGITS.fullmatch(port_text):
        raise SettingError(option, text, f"port {port_text!r} is not a number")
    port = int(port_text, 10)
    if not 0 <= port <= 65535:
        raise SettingError(option, text, "port must be 0-65535")
    return host, port


def _ip_literal(host: str, option: str, text: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        raise SettingError(option, text, f"{host!r} is not an IP address") from None


def parse_listen(text: str) -> Listen:
    """`ADDR:PORT[,nodelay][,backend=HOST:PORT]`, IPv6 in brackets."""
    spec, *flags = [part.strip() for part in text.split(",")]
    host, port = _split_hostport(spec, "listen")
    host = _ip_literal(host, "listen", text)
    nodelay = False
    backend = None
    for flag in flags:
        if flag == "nodelay":
            nodelay = True
        elif flag.startswith("backend="):
            try:
                backend = parse_backend(flag[len("backend=") :])
            except SettingError as exc:
                raise SettingError("listen", text, f"backend: {exc.reason}") from None
        else:
            raise SettingError(
                "listen", text, f"unknown listener flag {flag!r} (known: nodelay, backend=)"
            )
    return Listen(host, port, nodelay, backend)


def parse_backend(text: str) -> Backend:
    """`HOST:PORT` of the MTA; a name is resolved once at start (and on reload)."""
    host, port = _split_hostport(text, "backend")
    if port == 0:
        raise SettingError("backend", text, "port must be 1-65535")
    return Backend(host, port)


def parse_syslog(text: str) -> SyslogTarget:
    """A unix datagram socket path, `udp://HOST:PORT` or `tcp://HOST:PORT`."""
    for kind in ("udp", "tcp"):
        prefix = f"{kind}://"
        if text.startswith(prefix):
            try:
                host, port = _split_hostport(text[len(prefix) :], "syslog")
            except SettingError as exc:
                raise SettingError("syslog", text, exc.reason) from None
            if port == 0:
                raise SettingError("syslog", text, "port must be 1-65535")
            return SyslogTarget(kind, host=host, port=port)
    if "://" in text:
        raise SettingError("syslog", text, "expected a socket path, udp://HOST:PORT or tcp://...")
    if not text.startswith("/"):
        raise SettingError("syslog", text, "a unix socket path must be absolute")
    return SyslogTarget("unix", path=text)


def _seconds(option: str, low: float, high: float, *, zero: bool = False) -> Callable[[str], float]:
    """A parser for seconds in (low, high], or [low, high] when `zero` allows low itself."""

    def parse(text: str) -> float:
        if not _DECIMAL.fullmatch(text):
            raise SettingError(option, text, "expected a number of seconds")
        value = float(text)
        if zero:
            if not low <= value <= high:
                raise SettingError(option, text, f"must be {low:g} to {high:g}")
        elif not low < value <= high:
            raise SettingError(option, text, f"must be more than {low:g} and at most {high:g}")
        return value

    return parse


def _count(option: str, low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not _DIGITS.fullmatch(text):
            raise SettingError(option, text, "expected a whole number")
        value = int(text, 10)
        if not low <= value <= high:
            raise SettingError(option, text, f"must be {low} to {high}")
        return value

    return parse


def _choice(option: str, choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise SettingError(option, text, "expected one of " + ", ".join(choices))
        return text

    return parse


def _network(text: str) -> str:
    try:
        net = netaddr.IPNetwork(text.strip())
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise SettingError("trusted", text, "expected an IP address or CIDR network") from None
    return str(net.cidr)


def _sd_id(text: str) -> str:
    if not valid_sd_id(text):
        raise SettingError("sd-id", text, "expected NAME@NUMBER, e.g. repeld@32473")
    return text


def _facility(text: str) -> str:
    if text not in FACILITIES:
        raise SettingError("facility", text, "expected one of " + ", ".join(FACILITIES))
    return text


def _path(text: str) -> str:
    return text


def _command(text: str) -> tuple[str, ...]:
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:
        raise SettingError("exec", text, str(exc)) from None
    if not argv:
        raise SettingError("exec", text, "expected a program to run")
    if not argv[0].startswith("/"):
        raise SettingError("exec", text, "give the program's absolute path")
    return argv


def _cache(text: str) -> CacheSpec:
    from repeld.cache.base import parse_cache_url

    return parse_cache_url(text)


def _v6_prefix(text: str) -> int:
    from repeld.cache.base import parse_v6_prefix

    return parse_v6_prefix(text)


def _workers(text: str) -> int:
    if text == "auto":
        return min(256, max(1, os.cpu_count() or 1))
    if not _DIGITS.fullmatch(text):
        raise SettingError("workers", text, "expected a number of processes or auto")
    value = int(text, 10)
    if not 1 <= value <= 256:
        raise SettingError("workers", text, "must be 1 to 256, or auto")
    return value


def _name(option: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text or any(c.isspace() or c in ":/" for c in text):
            raise SettingError(option, text, "expected a user or group name")
        return text

    return parse


def _absolute(option: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text.startswith("/"):
            raise SettingError(option, text, "expected an absolute path")
        return text

    return parse


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
        "held (implicit TLS, port 465) and ,backend=HOST:PORT for its own MTA; repeatable "
        "(default: 0.0.0.0:25 and [::]:25)",
        metavar="ADDR:PORT[,nodelay][,backend=HOST:PORT]",
        repeat=True,
    ),
    Option(
        "backend",
        "-b",
        parse_backend,
        None,
        "the MTA to hand patient clients to (required)",
        metavar="HOST:PORT",
    ),
    Option(
        "exec",
        "-e",
        _command,
        None,
        "instead of a backend, run this program for each passed client with the client as "
        "its stdin and stdout (inetd/ucspi-tcp style; TCPREMOTEIP and friends are set)",
        metavar="'PROGRAM [ARGS]'",
    ),
    Option(
        "delay",
        "-d",
        _seconds("delay", 0.0, 3600.0),
        25.0,
        "seconds to withhold the greeting, fractions allowed, >0 and <=3600 (default: 25)",
        metavar="SECONDS",
    ),
    Option(
        "trusted",
        "-t",
        _network,
        (),
        "a network (address or CIDR) whose clients skip the delay; repeatable",
        metavar="NET",
        repeat=True,
    ),
    Option(
        "trusted-file",
        "-T",
        _path,
        (),
        "a file of trusted networks, one per line, # comments; repeatable",
        metavar="FILE",
        repeat=True,
    ),
    Option(
        "proxy-protocol",
        None,
        _choice("proxy-protocol", ("none", "v1", "v2")),
        "none",
        "send a PROXY protocol header of this version to the backend (default: none)",
        metavar="none|v1|v2",
    ),
    Option(
        "on-early",
        None,
        _choice("on-early", ("drop", "reject")),
        "drop",
        "what to do to an early talker: drop closes at once, reject sends one 554 line "
        "first (default: drop)",
        metavar="drop|reject",
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
        _choice("log-format", FORMATS),
        "rfc5424",
        "rfc5424 (structured data) or json (@cee: after an RFC 3164 header) (default: rfc5424)",
        metavar="rfc5424|json",
    ),
    Option(
        "facility",
        None,
        _facility,
        "mail",
        "syslog facility (default: mail)",
        metavar="NAME",
    ),
    Option(
        "sd-id",
        None,
        _sd_id,
        "repeld@32473",
        "the RFC 5424 SD-ID of the structured data, NAME@PEN (default: repeld@32473)",
        metavar="NAME@NUMBER",
    ),
    Option(
        "relay-timeout",
        None,
        _seconds("relay-timeout", 0.0, 86400.0),
        600.0,
        "close a relayed session idle this long in both directions (default: 600)",
        metavar="SECONDS",
    ),
    Option(
        "connect-timeout",
        None,
        _seconds("connect-timeout", 0.0, 300.0),
        10.0,
        "give up connecting to the backend after this long and answer 421 (default: 10)",
        metavar="SECONDS",
    ),
    Option(
        "backlog",
        None,
        _count("backlog", 1, 1 << 20),
        None,
        "listen(2) backlog; the kernel caps it (default: the kernel's cap, "
        "net.core.somaxconn or kern.ipc.soacceptqueue)",
        metavar="N",
    ),
    Option(
        "max-held",
        None,
        _count("max-held", 1, 10_000_000),
        None,
        "connections held at once; past it new clients get 421 4.3.2 All server ports are "
        "busy (default: the open-files limit minus 512)",
        metavar="N",
    ),
    Option(
        "max-per-client",
        None,
        _count("max-per-client", 1, 1_000_000),
        10,
        "connections held at once from one address; past it 421 4.7.0 Too many connections "
        "(default: 10)",
        metavar="N",
    ),
    Option(
        "cache",
        None,
        _cache,
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
        _seconds("cache-ttl", 0.0, 366 * 86400.0),
        86400.0,
        "seconds a client that waited once skips the delay (default: 86400, one day)",
        metavar="SECONDS",
    ),
    Option(
        "cache-v6-prefix",
        None,
        _v6_prefix,
        64,
        "IPv6 clients are remembered by this prefix, since one host owns a /64; 32 to 128 "
        "(default: 64)",
        metavar="BITS",
    ),
    Option(
        "penalty-ttl",
        None,
        _seconds("penalty-ttl", 0.0, 366 * 86400.0, zero=True),
        0.0,
        "seconds an early talker is remembered and cut off at once on its next connections; "
        "0 turns penalties off (default: 0)",
        metavar="SECONDS",
    ),
    Option(
        "workers",
        "-w",
        _workers,
        1,
        "worker processes serving the same listeners, or auto for one per CPU; a parent "
        "binds, supervises and restarts them (default: 1, no parent)",
        metavar="N|auto",
    ),
    Option(
        "shutdown-grace",
        None,
        _seconds("shutdown-grace", 0.0, 3600.0, zero=True),
        30.0,
        "on SIGTERM, seconds relays in progress may take to finish before they are cut; "
        "0 cuts them at once (default: 30)",
        metavar="SECONDS",
    ),
    Option(
        "user",
        "-u",
        _name("user"),
        None,
        "after binding, drop to this user (default: repeld where it exists; running on as "
        "root needs --user root)",
        metavar="USER",
    ),
    Option(
        "group",
        "-g",
        _name("group"),
        None,
        "after binding, drop to this group (default: the user's primary group)",
        metavar="GROUP",
    ),
    Option(
        "chroot",
        None,
        _absolute("chroot"),
        None,
        "after binding, chroot to this directory (a unix --syslog socket must be reachable "
        "inside it)",
        metavar="DIR",
    ),
    Option(
        "pidfile",
        "-p",
        _absolute("pidfile"),
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


@dataclass(frozen=True, slots=True)
class Settings:
    """The effective settings of a running repeld, all validated."""

    def handler(self) -> str:
        """Who gets the passed clients, for log lines: the backend or the program."""
        if self.exec is not None:
            return "exec " + shlex.join(self.exec)
        return f"backend {self.backend}"

    def handler_fields(self) -> dict[str, str]:
        """The start event's `backend` field, or `exec` for an --exec program."""
        if self.exec is not None:
            return {"exec": " ".join(self.exec)}
        return {"backend": str(self.backend)}

    def cache_spec(self) -> CacheSpec:
        """The pass cache in force: --no-cache, else --cache, else the platform default."""
        from repeld.cache.base import CacheSpec, parse_cache_url

        if self.no_cache:
            return CacheSpec("none")
        return self.cache if self.cache is not None else parse_cache_url("sqlite")

    backend: Backend | None = None
    listen: tuple[Listen, ...] = (Listen("0.0.0.0", 25), Listen("::", 25))
    delay: float = 25.0
    trusted: tuple[str, ...] = ()
    trusted_file: tuple[str, ...] = ()
    proxy_protocol: ProxyProtocol = "none"
    on_early: EarlyAction = "drop"
    report_attacks: bool = True
    syslog: SyslogTarget = field(default_factory=default_syslog)
    log_format: str = "rfc5424"
    facility: str = "mail"
    sd_id: str = "repeld@32473"
    exec: tuple[str, ...] | None = None
    relay_timeout: float = 600.0
    connect_timeout: float = 10.0
    backlog: int | None = None
    max_held: int | None = None
    max_per_client: int = 10
    cache: CacheSpec | None = None
    no_cache: bool = False
    cache_ttl: float = 86400.0
    cache_v6_prefix: int = 64
    penalty_ttl: float = 0.0
    workers: int = 1
    shutdown_grace: float = 30.0
    user: str | None = None
    group: str | None = None
    chroot: str | None = None
    pidfile: str | None = None
    foreground: bool = False


def build_settings(values: Mapping[str, Any]) -> Settings:
    """Settings from already-parsed option values keyed by long flag name.

    Options not in `values` take their defaults. Checks that concern several
    options at once live here.
    """
    unknown = set(values) - set(OPTION_BY_NAME)
    if unknown:
        name = sorted(unknown)[0]
        raise SettingError(name, values[name], "unknown option")
    backend = values.get("backend")
    if backend is None and values.get("exec") is None:
        raise SettingError("backend", None, "required: the MTA to hand patient clients to")
    if backend is not None and values.get("exec") is not None:
        raise SettingError("exec", " ".join(values["exec"]), "give --exec or --backend, not both")
    kwargs: dict[str, Any] = {}
    for opt in OPTIONS:
        if opt.name in values and values[opt.name] is not None:
            value = values[opt.name]
            kwargs[opt.name.replace("-", "_")] = tuple(value) if opt.repeat else value
    if "listen" in kwargs and not kwargs["listen"]:
        del kwargs["listen"]
    seen: set[tuple[str, int]] = set()
    for lst in kwargs.get("listen", ()):
        if (lst.host, lst.port) in seen:
            raise SettingError("listen", str(lst), "listed twice")
        seen.add((lst.host, lst.port))
    return Settings(**kwargs)


def load_trusted(settings: Settings) -> TrustedNetworks:
    """The trusted networks from the flags and every trusted file, all validated.

    A file that cannot be read, or a line that is not a network, raises
    `SettingError` naming the file and the line number.
    """
    networks = list(settings.trusted)
    for path in settings.trusted_file:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SettingError("trusted-file", path, f"cannot read: {reason}") from None
        for lineno, raw in enumerate(lines, 1):
            text = raw.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                networks.append(_network(text))
            except SettingError:
                raise SettingError(
                    "trusted-file", path, f"line {lineno}: {text!r} is not an address or network"
                ) from None
    return TrustedNetworks(networks)

"""The value types of settings and the parsers that make them from text.

Every parser takes the raw string of a flag or a configuration key and returns
the value or raises `SettingError`, which names the option and the value so
the administrator sees one clear line instead of a traceback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import netaddr

from repeld.cache.spec import CacheSpec, parse_cache_url, parse_v6_prefix
from repeld.config.errors import SettingError
from repeld.core.addresses import host_name_problem, host_port
from repeld.core.dnsbl import DnsList, Octet, ReplyFilter
from repeld.core.logformat import FACILITIES, valid_sd_id

__all__ = [
    "AnyBackend",
    "Backend",
    "EarlyAction",
    "Listen",
    "MetricsAddress",
    "PassBackend",
    "ProxyProtocol",
    "Resolver",
    "SyslogTarget",
    "absolute",
    "cache_url",
    "choice",
    "command",
    "count",
    "default_syslog",
    "dns_list",
    "facility",
    "integer",
    "network",
    "parse_backend",
    "parse_listen",
    "parse_metrics",
    "parse_resolver",
    "parse_syslog",
    "path",
    "sd_id",
    "seconds",
    "teaser_text",
    "user_name",
    "v6_prefix",
    "workers",
]

ProxyProtocol = Literal["none", "v1", "v2"]
#: sun_path holds 108 bytes on Linux, 104 on the BSDs, with the final NUL.
UNIX_PATH_MAX = 103
EarlyAction = Literal["drop", "reject", "log", "enforce"]


@dataclass(frozen=True, slots=True)
class Backend:
    """The MTA that patient clients are handed to."""

    host: str
    port: int

    def __str__(self) -> str:
        return host_port(self.host, self.port)


@dataclass(frozen=True, slots=True)
class PassBackend:
    """A Postfix `pass` service: passed clients' sockets go to smtpd (shell/passfd.py).

    `path` is the service's UNIX-domain socket as seen after --chroot.
    """

    path: str

    def __str__(self) -> str:
        return f"{PASS_PREFIX}{self.path}"


#: Where passed clients go: an MTA relayed to over TCP, or a Postfix pass service.
AnyBackend = Backend | PassBackend
#: How a pass service is written in --backend and ,backend=.
PASS_PREFIX = "pass:"


@dataclass(frozen=True, slots=True)
class Listen:
    """One listening address; `nodelay` listeners (implicit TLS) are never held.

    `backend`, when set, is the MTA for this listener's clients instead of
    --backend (port 465's clients belong to the MTA's TLS-on-connect port).
    """

    host: str
    port: int
    nodelay: bool = False
    backend: AnyBackend | None = None

    @property
    def family(self) -> int:
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET

    def __str__(self) -> str:
        addr = host_port(self.host, self.port)
        if self.nodelay:
            addr += ",nodelay"
        if self.backend is not None:
            addr += f",backend={self.backend}"
        return addr


@dataclass(frozen=True, slots=True)
class MetricsAddress:
    """Where the Prometheus endpoint listens (--metrics)."""

    host: str
    port: int

    def __str__(self) -> str:
        return host_port(self.host, self.port)


@dataclass(frozen=True, slots=True)
class Resolver:
    """The DNS server the lists are asked through (--resolver)."""

    host: str
    port: int = 53

    def __str__(self) -> str:
        return host_port(self.host, self.port)


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
        return f"{self.kind}://{host_port(self.host, self.port)}"


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


def _check_host(host: str, option: str, text: str) -> None:
    """A host name or IP address, or SettingError (before any resolver sees it)."""
    problem = host_name_problem(host)
    if problem is not None:
        raise SettingError(option, text, problem)


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


def parse_backend(text: str) -> AnyBackend:
    """`HOST:PORT` of the MTA (a name is resolved once at start and on reload),
    or `pass:PATH`, the absolute path of a Postfix pass service's socket."""
    if text.startswith(PASS_PREFIX):
        path = text[len(PASS_PREFIX) :]
        if not path.startswith("/"):
            raise SettingError(
                "backend",
                text,
                "pass: needs an absolute path, e.g. pass:/var/spool/postfix/private/smtpd",
            )
        if "\0" in path or len(path.encode()) > UNIX_PATH_MAX:
            raise SettingError(
                "backend", text, f"not a socket path (at most {UNIX_PATH_MAX} bytes)"
            )
        return PassBackend(path)
    host, port = _split_hostport(text, "backend")
    if port == 0:
        raise SettingError("backend", text, "port must be 1-65535")
    _check_host(host, "backend", text)
    return Backend(host, port)


def parse_metrics(text: str) -> MetricsAddress:
    """`ADDR:PORT` of the Prometheus endpoint, an IP address (IPv6 in brackets); port 0: any."""
    host, port = _split_hostport(text.strip(), "metrics")
    return MetricsAddress(_ip_literal(host, "metrics", text), port)


def parse_resolver(text: str) -> Resolver:
    """`ADDR[:PORT]` of a DNS server, an IP address (IPv6 in brackets with a port)."""
    text = text.strip()
    try:  # a bare address: 127.0.0.1, ::1
        return Resolver(str(ipaddress.ip_address(text)))
    except ValueError:
        pass
    if text.startswith("[") and text.endswith("]"):
        return Resolver(_ip_literal(text[1:-1], "resolver", text))
    host, port = _split_hostport(text, "resolver")
    if port == 0:
        raise SettingError("resolver", text, "port must be 1-65535")
    return Resolver(_ip_literal(host, "resolver", text), port)


#: The longest list domain: a query name is the domain after 32 nibbles of an
#: IPv6 address (64 characters), and a name is at most 253 characters.
DNS_LIST_DOMAIN_MAX = 253 - 64
#: The largest weight a list entry may carry, either way.
DNS_WEIGHT_MAX = 1000
_OCTET = r"(?:[0-9]+|\[[^\]]*\])"
_FILTER = re.compile(rf"({_OCTET})\.({_OCTET})\.({_OCTET})\.({_OCTET})")
_WEIGHT = re.compile(r"-?[0-9]+")


def _octet(text: str, option: str, entry: str) -> Octet:
    """One octet of a reply filter: a number, or `[A;B..C;...]`."""
    items = text[1:-1].split(";") if text.startswith("[") else [text]
    ranges = []
    for item in items:
        low_text, sep, high_text = item.strip().partition("..")
        if not sep:
            high_text = low_text
        if not (_DIGITS.fullmatch(low_text) and _DIGITS.fullmatch(high_text)):
            raise SettingError(option, entry, f"{text!r}: expected N, or [N;N..M] in a filter")
        low, high = int(low_text, 10), int(high_text, 10)
        if high > 255 or low > high:
            raise SettingError(option, entry, f"{text!r}: octets are 0 to 255, low..high")
        ranges.append((low, high))
    return tuple(ranges)


def dns_list(option: str, *, allow: bool) -> Callable[[str], DnsList]:
    """A parser for `DOMAIN[=FILTER][*WEIGHT]`, postscreen_dnsbl_sites' syntax.

    --dnsbl (allow=False) takes a weight as written, 1 by default, negative
    allowed as in postscreen; --dnswl (allow=True) takes a positive weight, 1 by
    default, that is taken off the score (Settings.dns_lists negates it).
    """

    def parse(text: str) -> DnsList:
        entry = text.strip()
        rest, star, weight_text = entry.partition("*")
        domain, eq, filter_text = rest.partition("=")
        domain = domain.strip().rstrip(".").lower()
        problem = host_name_problem(domain) if domain else "the list's domain is empty"
        if problem is None:
            try:
                ipaddress.ip_address(domain)
                problem = "expected the list's domain, not an address"
            except ValueError:
                pass
        if problem is None and len(domain) > DNS_LIST_DOMAIN_MAX:
            problem = f"the domain is longer than {DNS_LIST_DOMAIN_MAX} characters"
        if problem is not None:
            raise SettingError(option, text, problem)
        reply_filter: ReplyFilter | None = None
        if eq:
            match = _FILTER.fullmatch(filter_text.strip())
            if match is None:
                raise SettingError(
                    option, text, "a filter is d.d.d.d, each d N or [N;N..M], e.g. 127.0.0.[2..11]"
                )
            a, b, c, d = (_octet(g, option, text) for g in match.groups())
            reply_filter = (a, b, c, d)
        weight = 1
        if star:
            weight_text = weight_text.strip()
            if not _WEIGHT.fullmatch(weight_text):
                raise SettingError(option, text, f"weight {weight_text!r} is not a whole number")
            weight = int(weight_text, 10)
            if allow and weight <= 0:
                raise SettingError(
                    option,
                    text,
                    f"a --dnswl weight is taken off the score: write *{abs(weight) or 1}",
                )
            if abs(weight) > DNS_WEIGHT_MAX:
                raise SettingError(
                    option, text, f"weight must be -{DNS_WEIGHT_MAX} to {DNS_WEIGHT_MAX}"
                )
        return DnsList(domain, reply_filter, weight)

    return parse


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
            _check_host(host, "syslog", text)
            return SyslogTarget(kind, host=host, port=port)
    if "://" in text:
        raise SettingError("syslog", text, "expected a socket path, udp://HOST:PORT or tcp://...")
    if not text.startswith("/"):
        raise SettingError("syslog", text, "a unix socket path must be absolute")
    return SyslogTarget("unix", path=text)


def seconds(option: str, low: float, high: float, *, zero: bool = False) -> Callable[[str], float]:
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


_INTEGER = re.compile(r"-?[0-9]+")


def _whole(option: str, low: int, high: int, form: re.Pattern[str]) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not form.fullmatch(text):
            raise SettingError(option, text, "expected a whole number")
        value = int(text, 10)
        if not low <= value <= high:
            raise SettingError(option, text, f"must be {low} to {high}")
        return value

    return parse


def count(option: str, low: int, high: int) -> Callable[[str], int]:
    """A parser for a whole number in [low, high], plain ASCII digits only."""
    return _whole(option, low, high, _DIGITS)


def integer(option: str, low: int, high: int) -> Callable[[str], int]:
    """A parser for a whole number in [low, high], negative numbers allowed."""
    return _whole(option, low, high, _INTEGER)


def choice(option: str, choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise SettingError(option, text, "expected one of " + ", ".join(choices))
        return text

    return parse


#: Why `network` refused a text that is no address or network at all.
NOT_A_NETWORK = "expected an IP address or CIDR network"


def network(text: str) -> str:
    try:
        net = netaddr.IPNetwork(text.strip())
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise SettingError("trusted", text, NOT_A_NETWORK) from None
    if net.ip != net.network:  # 10.1.2.3/8 is a typo for a host or for 10.0.0.0/8
        raise SettingError("trusted", text, f"host bits set: did you mean {net.cidr}?")
    if net.version == 6 and net.prefixlen >= 96 and net.ip.is_ipv4_mapped():
        # A client's IPv4-mapped address is judged as the IPv4 address it maps
        # (::ffff:192.0.2.7 is 192.0.2.7): so is a network written that way, or it
        # would never match anyone (a balancer in it would be judged a talker).
        return str(netaddr.IPNetwork(f"{net.ip.ipv4()}/{net.prefixlen - 96}").cidr)
    return str(net.cidr)


def sd_id(text: str) -> str:
    if not valid_sd_id(text):
        raise SettingError("sd-id", text, "expected NAME@NUMBER, e.g. repeld@32473")
    return text


#: The longest --teaser-text: the line `220-TEXT` CRLF stays within RFC 5321's
#: 512 characters of a reply line.
TEASER_TEXT_LIMIT = 500


def teaser_text(text: str) -> str:
    """The text of the teaser line: printable ASCII, a domain first (RFC 5321 section 4.2)."""
    if not text or len(text) > TEASER_TEXT_LIMIT:
        raise SettingError("teaser-text", text, f"expected 1 to {TEASER_TEXT_LIMIT} characters")
    if not all(" " <= c <= "~" for c in text) or text[0] == " ":
        raise SettingError(
            "teaser-text", text, "expected printable ASCII, starting with the host name"
        )
    return text


def facility(text: str) -> str:
    if text not in FACILITIES:
        raise SettingError("facility", text, "expected one of " + ", ".join(FACILITIES))
    return text


def path(text: str) -> str:
    return text


def command(text: str) -> tuple[str, ...]:
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:
        raise SettingError("exec", text, str(exc)) from None
    if not argv:
        raise SettingError("exec", text, "expected a program to run")
    if not argv[0].startswith("/"):
        raise SettingError("exec", text, "give the program's absolute path")
    if "\0" in text:  # execve(2) cannot pass it: every passed client would be refused
        raise SettingError("exec", text, "a NUL character cannot be in a program's arguments")
    return argv


def cache_url(text: str) -> CacheSpec:
    return parse_cache_url(text)


def v6_prefix(text: str) -> int:
    return parse_v6_prefix(text)


def workers(text: str) -> int:
    if text == "auto":
        return min(256, max(1, os.cpu_count() or 1))
    if not _DIGITS.fullmatch(text):
        raise SettingError("workers", text, "expected a number of processes or auto")
    value = int(text, 10)
    if not 1 <= value <= 256:
        raise SettingError("workers", text, "must be 1 to 256, or auto")
    return value


def user_name(option: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text or any(c.isspace() or c in ":/" for c in text):
            raise SettingError(option, text, "expected a user or group name")
        return text

    return parse


def absolute(option: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not text.startswith("/"):
            raise SettingError(option, text, "expected an absolute path")
        return text

    return parse

"""`Settings`: the effective, validated settings of a running repeld.

Built from the option table (options.py), whose defaults are the dataclass's
defaults; `build_settings` applies the checks that concern several options at
once, and `load_trusted` reads the trusted networks and files.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from repeld.cache.spec import CacheSpec, parse_cache_url
from repeld.config.errors import SettingError
from repeld.config.options import OPTION_BY_NAME, OPTIONS, Option, default
from repeld.config.reading import UnreadableFile, read_operator_file
from repeld.config.values import (
    NOT_A_NETWORK,
    AnyBackend,
    Backend,
    EarlyAction,
    Listen,
    MetricsAddress,
    PassBackend,
    ProxyProtocol,
    Resolver,
    SyslogTarget,
    default_syslog,
    network,
    parse_listen,
)
from repeld.core.dnsbl import DnsAction, DnsList, DnsPolicy
from repeld.core.policy import TrustedNetworks

__all__ = [
    "OPTIONS",
    "OPTION_BY_NAME",
    "AnyBackend",
    "Backend",
    "Listen",
    "Option",
    "PassBackend",
    "SettingError",
    "Settings",
    "SyslogTarget",
    "build_settings",
    "load_trusted",
    "parse_listen",
]


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
        if self.no_cache:
            return CacheSpec("none")
        return self.cache if self.cache is not None else parse_cache_url("sqlite")

    def dns_lists(self) -> tuple[DnsList, ...]:
        """The block and allow list entries as the scorer counts them (allow weights negative)."""
        allow = tuple(DnsList(e.domain, e.filter, -e.weight) for e in self.dnswl)
        return self.dnsbl + allow

    def dns_policy(self) -> DnsPolicy | None:
        """The thresholds and action the hold applies, or None without lists."""
        if not (self.dnsbl or self.dnswl):
            return None
        return DnsPolicy(
            self.dnswl_threshold,
            self.dnsbl_threshold,
            DnsAction(self.dnsbl_action),
            self.dnsbl_delay,
        )

    backend: AnyBackend | None = default("backend")
    listen: tuple[Listen, ...] = default("listen")
    delay: float = default("delay")
    trusted: tuple[str, ...] = default("trusted")
    trusted_file: tuple[str, ...] = default("trusted-file")
    proxy_from: tuple[str, ...] = default("proxy-from")
    proxy_timeout: float = default("proxy-timeout")
    proxy_protocol: ProxyProtocol = default("proxy-protocol")
    on_early: EarlyAction = default("on-early")
    teaser: bool = default("teaser")
    teaser_text: str | None = default("teaser-text")
    report_attacks: bool = default("report-attacks")
    # The option's None means "the platform's socket", known only at run time.
    syslog: SyslogTarget = field(default_factory=default_syslog)
    log_format: str = default("log-format")
    facility: str = default("facility")
    sd_id: str = default("sd-id")
    metrics: MetricsAddress | None = default("metrics")
    backend_check_interval: float = default("backend-check-interval")
    exec: tuple[str, ...] | None = default("exec")
    relay_timeout: float = default("relay-timeout")
    connect_timeout: float = default("connect-timeout")
    backlog: int | None = default("backlog")
    max_held: int | None = default("max-held")
    max_per_client: int = default("max-per-client")
    max_exec: int = default("max-exec")
    cache: CacheSpec | None = default("cache")
    no_cache: bool = default("no-cache")
    cache_ttl: float = default("cache-ttl")
    cache_v6_prefix: int = default("cache-v6-prefix")
    penalty_ttl: float = default("penalty-ttl")
    dnsbl: tuple[DnsList, ...] = default("dnsbl")
    dnswl: tuple[DnsList, ...] = default("dnswl")
    dnsbl_threshold: int = default("dnsbl-threshold")
    dnswl_threshold: int = default("dnswl-threshold")
    dnsbl_action: str = default("dnsbl-action")
    dnsbl_delay: float = default("dnsbl-delay")
    resolver: Resolver | None = default("resolver")
    dns_timeout: float = default("dns-timeout")
    workers: int = default("workers")
    shutdown_grace: float = default("shutdown-grace")
    keep_pipe_connect: bool = default("keep-pipe-connect")
    user: str | None = default("user")
    group: str | None = default("group")
    chroot: str | None = default("chroot")
    pidfile: str | None = default("pidfile")
    foreground: bool = default("foreground")


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
    settings = Settings(**kwargs)
    if settings.dnsbl_action == "delay" and settings.dnsbl_delay <= settings.delay:
        raise SettingError(
            "dnsbl-delay",
            settings.dnsbl_delay,
            f"must be longer than --delay ({settings.delay:g}) with --dnsbl-action delay",
        )
    return settings


def load_trusted(settings: Settings) -> TrustedNetworks:
    """The trusted networks from the flags and every trusted file, all validated.

    A file that cannot be read, or a line that is not a network, raises
    `SettingError` naming the file and the line number.
    """
    networks = list(settings.trusted)
    for path in settings.trusted_file:
        try:
            lines = read_operator_file(path).splitlines()
        except UnreadableFile as exc:
            raise SettingError("trusted-file", path, f"cannot read: {exc}") from None
        for lineno, raw in enumerate(lines, 1):
            text = raw.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                networks.append(network(text))
            except SettingError as exc:
                why = "is not an address or network" if exc.reason == NOT_A_NETWORK else exc.reason
                raise SettingError(
                    "trusted-file", path, f"line {lineno}: {text!r}: {why}"
                ) from None
    return TrustedNetworks(networks)

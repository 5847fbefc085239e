"""How many connections this process can hold, and what the kernel allows.

At start repeld raises its soft file-descriptor limit to the hard one, derives
`--max-held` from it when the admin did not set it, and warns -- with numbers
-- when the limits cannot hold what was asked. `--check-kernel` prints the
limits that matter and the exact lines that raise them on Linux and FreeBSD.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from repeld.service import tcptune

__all__ = [
    "FD_RESERVE",
    "Limits",
    "capacity_warnings",
    "default_max_held",
    "epoll_watches",
    "kernel_report",
    "raise_nofile",
]

#: Descriptors kept back from --max-held for relays' backend sockets, the
#: listeners, the event log, the pen itself and the DNS lists' queries in
#: flight (a few sockets for them all: shell/dnslookup.py SOCKETS).
FD_RESERVE = 512
#: Below this a derived --max-held is not worth running with.
_MIN_HELD = 64


@dataclass(frozen=True, slots=True)
class Limits:
    """The fd limits after start-up."""

    soft: int
    hard: int


def raise_nofile() -> Limits:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; the limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return Limits(soft, hard)


def default_max_held(nofile: int) -> int:
    """--max-held when the admin does not say: every descriptor but the reserve."""
    return max(_MIN_HELD, nofile - FD_RESERVE)


def epoll_watches() -> int | None:
    """Linux's fs.epoll.max_user_watches: how many sockets all of one user's epoll
    sets may watch together (None elsewhere, or unreadable)."""
    text = (
        _read("/proc/sys/fs/epoll/max_user_watches") if sys.platform.startswith("linux") else None
    )
    return int(text) if text is not None and text.isdigit() else None


def capacity_warnings(
    max_held: int,
    limits: Limits,
    backlog: int,
    accept_cap: int | None,
    *,
    watches: int | None = None,
    workers: int = 1,
) -> list[str]:
    """One line per limit that cannot hold what was asked (`watches`: the
    epoll watches the user may have, shared by `workers` processes)."""
    warnings = []
    need = max_held + FD_RESERVE
    if need > limits.soft:
        warnings.append(
            f"--max-held {max_held} needs about {need} file descriptors but the limit is "
            f"{limits.soft} (hard {limits.hard}); raise it (LimitNOFILE=, limits.conf, "
            f"login.conf) or lower --max-held (see repeld --check-kernel)"
        )
    if watches is not None and max_held * workers > watches:
        # Past it the kernel refuses to watch a held client: turned away with a
        # 421 (`overload` limit=kernel), well before --max-held.
        held = f"{max_held} x {workers} workers" if workers > 1 else str(max_held)
        warnings.append(
            f"--max-held {held} needs that many epoll watches but fs.epoll.max_user_watches "
            f"is {watches}; raise it (sysctl) or lower --max-held (see repeld --check-kernel)"
        )
    if accept_cap is not None and backlog > accept_cap:
        warnings.append(
            f"--backlog {backlog} is capped by the kernel at {accept_cap} "
            f"(Linux net.core.somaxconn, FreeBSD kern.ipc.soacceptqueue)"
        )
    return warnings


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="ascii").split("\n")[0].strip()
    except OSError:
        return None


def kernel_report(max_held: int | None, backlog: int | None, workers: int = 1) -> str:
    """The text of `repeld --check-kernel`: limits now, and what to change."""
    limits = raise_nofile()
    try:
        cap: int | None = tcptune.accept_queue_cap()
    except OSError:
        cap = None
    syn = tcptune.syn_backlog()
    held = max_held if max_held is not None else default_max_held(limits.soft)
    want_backlog = backlog if backlog is not None else cap
    linux = sys.platform.startswith("linux")
    lines = [
        "repeld kernel check",
        "",
        "current limits:",
        f"  open files (RLIMIT_NOFILE)      soft {limits.soft}, hard {limits.hard}"
        " (soft raised to hard at start)",
        f"  accept queue cap                {cap if cap is not None else 'unknown'}",
        f"  SYN backlog                     {syn if syn is not None else 'unknown'}",
    ]
    if linux:
        ports = " - ".join((_read("/proc/sys/net/ipv4/ip_local_port_range") or "unknown").split())
        lines += [
            f"  system-wide open files          {_read('/proc/sys/fs/file-max') or 'unknown'}",
            f"  epoll watches per user          {epoll_watches() or 'unknown'}",
            f"  local port range                {ports}",
            f"  TCP FIN timeout                 {_read('/proc/sys/net/ipv4/tcp_fin_timeout')} s",
        ]
    lines += [
        "",
        "repeld settings:",
        f"  --max-held                      {held}"
        + ("" if max_held is not None else " (derived: open files minus 512)"),
        f"  --backlog                       {want_backlog or 'unknown'}"
        + ("" if backlog is not None else " (the kernel's cap)"),
        "",
    ]
    warnings = capacity_warnings(
        held, limits, want_backlog or 0, cap, watches=epoll_watches(), workers=workers
    )
    if warnings:
        lines.append("problems:")
        lines += [f"  {w}" for w in warnings]
    else:
        lines.append("problems: none found")
    # Each held client is one descriptor; once passed it needs a second for the MTA.
    nofile = max(65536, 2 * held + FD_RESERVE)
    lines += [
        "",
        f"to hold {held} connections and relay them all (2 descriptors each):",
        "  Linux:",
        f"    systemd unit:        LimitNOFILE={nofile}",
        f"    /etc/security/limits.conf:  repeld  -  nofile  {nofile}",
        "    sysctl -w net.core.somaxconn=65535   (a burst beyond the accept queue costs",
        "                                         clients a 1 s SYN retry)",
        "    sysctl -w net.ipv4.tcp_max_syn_backlog=65535",
        "    sysctl -w fs.file-max=1000000",
        f"    sysctl -w fs.epoll.max_user_watches={max(2 * held * workers, 1 << 20)}"
        "   (every held client is watched)",
        "    (persist them in /etc/sysctl.d/90-repeld.conf)",
        "  FreeBSD:",
        f"    /etc/login.conf (daemon class):  :openfiles={nofile}:  then cap_mkdb /etc/login.conf",
        "    sysctl kern.ipc.soacceptqueue=65535",
        "    sysctl kern.maxfiles=1000000",
        "    sysctl kern.maxfilesperproc=500000",
        "    (persist them in /etc/sysctl.conf)",
    ]
    return "\n".join(lines) + "\n"

"""Processes: the servers under test as our children, and what they cost.

`Server` is one server (repeld or a peer) started by `spawn` as our own child in
a session of its own and stopped by a signal to that PID; nothing here looks up
or kills a process by name.  The readers take a process tree's memory (RSS,
RssAnon, PSS, Pss_Anon), its CPU time, its descriptors and the server-side
sockets of a port from /proc, and the system's TcpExt counters.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchlib.net import wait_listening

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(")") + 2 :].split()
        kids.setdefault(int(rest[1]), []).append(int(d))
    return kids


def tree_pids(root: int) -> list[int]:
    """`root` and all its descendants that exist now."""
    kids = _children_map()
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if os.path.exists(f"/proc/{pid}"):
            out.append(pid)
            todo.extend(kids.get(pid, []))
    return out


@dataclass
class MemSample:
    """Memory of a process tree, in KiB."""

    rss: int = 0
    anon: int = 0  # RssAnon
    pss: int = 0
    pss_anon: int = 0  # Pss_Anon: anonymous pages, shared ones split between sharers
    nproc: int = 0
    threads: int = 0
    per_comm: dict[str, int] = field(default_factory=dict)  # comm -> RSS KiB


def mem_sample(pids: Sequence[int]) -> MemSample:
    """Summed VmRSS, RssAnon (from status), PSS and Pss_Anon (from smaps_rollup)."""
    out = MemSample()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            rss = anon = threads = 0
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
                    elif line.startswith("RssAnon:"):
                        anon = int(line.split()[1])
                    elif line.startswith("Threads:"):
                        threads = int(line.split()[1])
            pss = pss_anon = 0
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss = int(line.split()[1])
                    elif line.startswith("Pss_Anon:"):
                        pss_anon = int(line.split()[1])
        except OSError:
            continue
        out.rss += rss
        out.anon += anon
        out.pss += pss
        out.pss_anon += pss_anon
        out.nproc += 1
        out.threads += threads
        out.per_comm[comm] = out.per_comm.get(comm, 0) + rss
    return out


@dataclass
class CpuSample:
    """CPU seconds (user + system) of a process tree at one moment."""

    seconds: float
    wall: float


def cpu_seconds(pids: Sequence[int]) -> CpuSample:
    """On-CPU time of every thread of the given processes, in seconds.

    Read from /proc/PID/task/TID/schedstat (nanoseconds) where the kernel has
    it; otherwise utime+stime from /proc/PID/stat (1/CLK_TCK resolution).
    """
    total = 0.0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
            ns = 0
            for tid in tids:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    ns += int(f.read().split()[0])
            total += ns / 1e9
            continue
        except (OSError, ValueError, IndexError):
            pass
        try:
            with open(f"/proc/{pid}/stat") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(")") + 2 :].split()
        # fields 14-15 (1-based) = utime stime; rest starts at field 3
        total += (int(rest[11]) + int(rest[12])) / CLK_TCK
    return CpuSample(total, time.monotonic())


def voluntary_switches(pids: Sequence[int]) -> int:
    """Voluntary context switches of every thread of the given processes so far:
    how often they slept (and so were woken up), from /proc/PID/task/TID/status."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches:"):
                            total += int(line.split()[1])
                            break
            except (OSError, ValueError, IndexError):
                continue
    return total


def reaped_children_seconds(pid: int) -> float:
    """CPU seconds of the children `pid` has waited for (cutime + cstime): the
    share of a forking server's tree that left with its exited processes."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return 0.0
    rest = data[data.rindex(")") + 2 :].split()
    # fields 16-17 (1-based) = cutime cstime; rest starts at field 3
    return (int(rest[13]) + int(rest[14])) / CLK_TCK


def fd_count(pids: Sequence[int]) -> int:
    """Open descriptors of the given processes (a cheap count of accepted sockets)."""
    n = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            n += len(os.listdir(f"/proc/{pid}/fd"))
    return n


def _server_inodes(port: int) -> set[str]:
    # ESTABLISHED (01) or CLOSE_WAIT (08) sockets whose LOCAL port is `port`.
    hexport = f":{port:04X}"
    inodes: set[str] = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    p = line.split()
                    if p[1].endswith(hexport) and p[3] in ("01", "08"):
                        inodes.add(p[9])
        except OSError:
            pass
    return inodes


def server_held(pids: Sequence[int], port: int) -> dict[str, int]:
    """comm -> how many server-side sockets of `port` that process has open."""
    inodes = _server_inodes(port)
    out: dict[str, int] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        n = 0
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                n += 1
        if n:
            out[comm] = out.get(comm, 0) + n
    return out


def sockstat(proto: str = "TCP") -> dict[str, int]:
    """System-wide numbers of `proto` (TCP, UDP...) from /proc/net/sockstat ('mem'
    is in pages)."""
    with contextlib.suppress(OSError), open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith(f"{proto}:"):
                v = line.split()[1:]
                return {k: int(x) for k, x in zip(v[::2], v[1::2], strict=True)}
    return {}


#: TcpExt counters that tell a slow accept from a slow client: an accept queue
#: that overflows drops the handshake's last ACK, and the client's SYN is sent
#: again only after the initial RTO (1 s), which no server speed can make up.
TCP_EXT = ("ListenOverflows", "ListenDrops", "TCPSynRetrans", "TCPReqQFullDrop")


def tcp_ext() -> dict[str, int]:
    """System-wide TcpExt counters of /proc/net/netstat (the TCP_EXT ones)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        keys, vals = names.split(), values.split()
        if keys and keys[0] == "TcpExt:":
            out = {k: int(v) for k, v in zip(keys[1:], vals[1:], strict=False) if k in TCP_EXT}
    return out


def tcp_ext_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """after - before, for the counters that moved."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


@dataclass
class Server:
    """A server under test: our child process (the root of its tree) and its port.

    Every server, repeld and the peers alike, is started as our own child in a
    session of its own and stopped by a signal to that PID: nothing is looked
    up or killed by name.
    """

    name: str
    pid: int
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log: str = ""
    note: str = ""
    #: called after the process is gone (e.g. closing a log socket of its own)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def pids(self) -> list[int]:
        return tree_pids(self.pid)

    def cpu(self) -> float:
        """CPU seconds of the tree now (its live processes')."""
        return cpu_seconds(self.pids()).seconds

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return os.path.exists(f"/proc/{self.pid}")

    def stop(self) -> None:
        try:
            if self.proc is None or self.proc.poll() is not None:
                return
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        finally:
            while self.closers:
                self.closers.pop()()


def spawn(
    name: str, argv: list[str], port: int, logdir: Path, env: dict[str, str] | None = None
) -> Server:
    log = logdir / f"{name}-{port}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    srv = Server(name, proc.pid, port, proc=proc, log=str(log))
    if not wait_listening(port, 20.0) or proc.poll() is not None:
        srv.stop()
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{name} did not start listening on {port}:\n{tail}")
    return srv


@contextlib.contextmanager
def stopping(servers: list[Server]) -> Iterator[list[Server]]:
    """Stop every server in `servers` (appended to while inside) on the way out."""
    try:
        yield servers
    finally:
        for srv in reversed(servers):
            try:
                srv.stop()
            except Exception as exc:  # keep stopping the others
                print(f"bench: stopping {srv.name} (pid {srv.pid}): {exc!r}", file=sys.stderr)


def exit_on_sigterm() -> None:
    """Make SIGTERM a SystemExit, so `stopping` still stops every server."""

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)


def log_directory(given: str | None, prefix: str) -> Path:
    """`given`, or a new temporary directory: where the servers' logs and the
    peers' configurations go.  Mode 755, because the servers run as other users."""
    logdir = Path(given) if given else Path(tempfile.mkdtemp(prefix=prefix))
    logdir.mkdir(parents=True, exist_ok=True)
    os.chmod(logdir, 0o755)
    return logdir

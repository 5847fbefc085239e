"""Shared helpers for bench/bench-hold and bench/bench-relay (loopback only).

What is here:
- address and port helpers that refuse anything outside 127.0.0.0/8 and ::1;
- /proc readers for a server's process tree: RSS, RssAnon, PSS, CPU
  (utime+stime), open descriptors, and the server-side sockets of a port held
  by each process (matched through /proc/net/tcp inodes, as hold_idle.py does);
- starting and stopping the servers under test, every one as our own child
  stopped by its PID: repeld, and the peers through their recipes in
  bench/peers/ (smtp-sink, postscreen, HAProxy), which exec the server;
- the load: processes that open many silent connections (`bulk_worker`) and
  probes that time the greeting or the cut-off (`probe_worker`);
- a UDP syslog sink that counts events and keeps the ones asked for, and a
  parser for their RFC 5424 structured data;
- small statistics and a plain-text table printer.

Nothing here ever kills by name, and nothing talks to a non-loopback address.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import ipaddress
import itertools
import math
import os
import random
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

__all__ = [
    "IP_BIND_ADDRESS_NO_PORT",
    "PEERS",
    "TALK",
    "TCP_EXT",
    "CpuSample",
    "MemSample",
    "Probe",
    "Server",
    "UdpSink",
    "assert_loopback",
    "bind_source",
    "bulk_worker",
    "check_silent",
    "cpu_seconds",
    "fd_count",
    "free_port",
    "machine_facts",
    "mem_sample",
    "open_many",
    "percentile",
    "print_table",
    "probe_worker",
    "raise_nofile",
    "ramp_stats",
    "repeld_workers",
    "rst_close",
    "sd_params",
    "server_held",
    "sockstat",
    "start_haproxy",
    "start_postscreen",
    "start_redis",
    "start_repeld",
    "start_smtp_sink",
    "stopping",
    "tcp_ext",
    "tcp_ext_delta",
    "tree_pids",
    "wait_listening",
    "wait_workers",
]

#: The recipes that start the peers on loopback (bench/peers/, see bench/README.md).
PEERS = Path(__file__).resolve().parent / "peers"
#: Linux: let connect() choose the source port (4-tuple unique), so thousands of
#: sockets on one source address do not exhaust bind()'s port search.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
#: What a cut-off probe says before the greeting.
TALK = b"EHLO probe.test\r\n"


# ---------------------------------------------------------------- addresses


def assert_loopback(*addresses: str) -> None:
    """Exit 2 if any address is not loopback (127.0.0.0/8 or ::1)."""
    for addr in addresses:
        if not ipaddress.ip_address(addr).is_loopback:
            print(f"refusing non-loopback address {addr}", file=sys.stderr)
            sys.exit(2)


def _port_free(port: int) -> bool:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port(used: set[int] | None = None) -> int:
    """A TCP port that nothing listens on, below the ephemeral range (32768+) so
    that the load's own source ports can never collide with it."""
    used = used if used is not None else set()
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(500):
        port = rng.randrange(20000, 32000)
        if port not in used and _port_free(port):
            used.add(port)
            return port
    raise RuntimeError("no free TCP port found in 20000-31999")


def wait_listening(port: int, timeout: float = 20.0) -> bool:
    """Whether a listener on `port` shows up in /proc/net/tcp* within `timeout`
    (checked without connecting, so no server logs a probe)."""
    hexport = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(path) as f:
                    next(f)
                    for line in f:
                        parts = line.split()
                        if parts[1].endswith(hexport) and parts[3] == "0A":
                            return True
            except OSError:
                pass
        time.sleep(0.05)
    return False


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def bind_source(sock: socket.socket, source: str | None) -> None:
    """Bind `sock` to a source address with IP_BIND_ADDRESS_NO_PORT (IPv4)."""
    if source:
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))


def rst_close(sock: socket.socket) -> None:
    """Abortive close (RST): leaves no TIME_WAIT, so back-to-back runs do not pile up."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


# ---------------------------------------------------------------- /proc


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


def sockstat() -> dict[str, int]:
    """System-wide TCP numbers from /proc/net/sockstat ('mem' is in pages)."""
    with contextlib.suppress(OSError), open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
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


def ramp_stats(samples: Sequence[tuple[float, int]]) -> tuple[float, float]:
    """From (time, descriptors) samples of a ramp: (seconds in which the count
    rose, the longest stretch in which it did not), i.e. busy time and the
    longest stall (a SYN retransmit after an accept-queue overflow is ~1 s)."""
    busy = stall = longest = 0.0
    for (t0, n0), (t1, n1) in itertools.pairwise(samples):
        if n1 > n0:
            busy += t1 - t0
            stall = 0.0
        else:
            stall += t1 - t0
            longest = max(longest, stall)
    return busy, longest


def tcp_ext_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """after - before, for the counters that moved."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


# ---------------------------------------------------------------- load processes


def _sock(obj: object) -> socket.socket:
    assert isinstance(obj, socket.socket)
    return obj


def open_many(
    host: str,
    port: int,
    source: str,
    count: int,
    start_at: float,
    window: int,
    socks: list[socket.socket],
) -> dict[str, Any]:
    """Open `count` silent connections, at most `window` connects in flight."""
    sel = selectors.DefaultSelector()
    fails: dict[str, int] = {}
    started = done = inflight = 0
    while time.monotonic() < start_at:
        time.sleep(0.0005)
    t_first = time.monotonic()
    give_up = t_first + 120.0
    while done + sum(fails.values()) < count and time.monotonic() < give_up:
        while started < count and inflight < window:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                bind_source(s, source)
                err = s.connect_ex((host, port))
            except OSError as exc:
                err = exc.errno or -1
            started += 1
            if err == 0:
                done += 1
                socks.append(s)
            elif err == errno.EINPROGRESS:
                inflight += 1
                sel.register(s, selectors.EVENT_WRITE)
            else:
                name = errno.errorcode.get(err, str(err))
                fails[name] = fails.get(name, 0) + 1
                s.close()
        for key, _ in sel.select(1.0):
            s = _sock(key.fileobj)
            sel.unregister(s)
            inflight -= 1
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                name = errno.errorcode.get(err, str(err))
                fails[name] = fails.get(name, 0) + 1
                s.close()
            else:
                done += 1
                socks.append(s)
    for key in list(sel.get_map().values()):  # connects that never finished
        s = _sock(key.fileobj)
        fails["timeout"] = fails.get("timeout", 0) + 1
        sel.unregister(s)
        rst_close(s)
    sel.close()
    return {"established": done, "fails": fails, "t_first": t_first, "t_last": time.monotonic()}


def check_silent(socks: list[socket.socket]) -> dict[str, int]:
    """What the server did to the silent connections: sent bytes, greeted, closed."""
    out = {"open": 0, "got_bytes": 0, "greeted": 0, "closed": 0}
    for s in socks:
        try:
            data = s.recv(512, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            out["open"] += 1
            continue
        except OSError:
            out["closed"] += 1
            continue
        if not data:
            out["closed"] += 1
            continue
        out["open"] += 1
        out["got_bytes"] += 1
        if data.startswith(b"220 ") or b"\n220 " in data:
            out["greeted"] += 1
    return out


def bulk_worker(conn: Connection, host: str, port: int, source: str, window: int) -> None:
    """One load process: opens, checks and resets its share of silent connections."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cleans up
    raise_nofile()
    socks: list[socket.socket] = []
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        cmd = msg[0]
        if cmd == "open":
            conn.send(open_many(host, port, source, msg[1], msg[2], window, socks))
        elif cmd == "check":
            conn.send(check_silent(socks))
        elif cmd == "close":
            n = len(socks)
            for s in socks:
                rst_close(s)
            socks.clear()
            conn.send(n)
        else:
            break
    for s in socks:
        rst_close(s)


@dataclass
class Probe:
    t_start: float
    sock: socket.socket | None = None
    t_conn: float = math.nan
    t_first: float = math.nan  # first byte from the server
    t_greet: float = math.nan  # the final "220 " greeting line
    t_talk: float = math.nan
    t_cut: float = math.nan  # FIN or RST seen after talking
    how: str = ""  # fin | rst | error text
    buf: bytes = b""


def probe_worker(
    conn: Connection,
    mode: str,
    host: str,
    port: int,
    net: str,
    k: int,
    start_at: float,
    spread: float,
    window: float,
    give_up_at: float,
    seed: int,
) -> None:
    """Timer probes (mode "timer": wait for the greeting) or cut-off probes (mode
    "cutoff": talk at a random time within `window` after connecting, then time
    the server's FIN/RST).  Sends back a list of per-probe dicts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile()
    rng = random.Random(seed)
    probes = [Probe(start_at + i * spread / max(1, k)) for i in range(k)]
    sel = selectors.DefaultSelector()
    talks: list[tuple[float, int]] = []  # heap of (talk time, probe index)
    nxt = 0
    live = 0

    def finish(i: int, how: str) -> None:
        nonlocal live
        p = probes[i]
        if p.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(p.sock)
            rst_close(p.sock)
            p.sock = None
            live -= 1
        p.how = p.how or how

    while True:
        now = time.monotonic()
        if now >= give_up_at or (nxt >= k and live == 0):
            break
        while nxt < k and probes[nxt].t_start <= now:
            p = probes[nxt]
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            bind_source(s, f"{net}.{nxt % 250 + 1}")
            err = s.connect_ex((host, port))
            p.t_start = time.monotonic()
            if err not in (0, errno.EINPROGRESS):
                p.how = f"connect {errno.errorcode.get(err, err)}"
                s.close()
            else:
                p.sock = s
                live += 1
                sel.register(s, selectors.EVENT_WRITE, nxt)
            nxt += 1
        while talks and talks[0][0] <= now:
            _, i = heapq.heappop(talks)
            p = probes[i]
            if p.sock is None:
                continue
            try:
                p.sock.send(TALK)
                p.t_talk = time.monotonic()
            except OSError as exc:
                finish(i, f"send {exc.strerror}")
        wake = give_up_at
        if nxt < k:
            wake = min(wake, probes[nxt].t_start)
        if talks:
            wake = min(wake, talks[0][0])
        for key, _ in sel.select(max(0.0, min(0.05, wake - time.monotonic()))):
            i = key.data
            p = probes[i]
            s = p.sock
            t = time.monotonic()
            if s is None:
                continue
            if math.isnan(p.t_conn):
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(i, f"connect {errno.errorcode.get(err, err)}")
                    continue
                p.t_conn = t
                sel.modify(s, selectors.EVENT_READ, i)
                if mode == "cutoff":
                    heapq.heappush(talks, (t + rng.uniform(0.0, window), i))
                continue
            try:
                data = s.recv(4096)
            except OSError as exc:
                if not math.isnan(p.t_talk):
                    p.t_cut = t
                how = "rst" if exc.errno == errno.ECONNRESET else (exc.strerror or "error")
                finish(i, how if not math.isnan(p.t_talk) else f"{how} before talking")
                continue
            if not data:
                if not math.isnan(p.t_talk):
                    p.t_cut = t
                    finish(i, "fin")
                else:
                    finish(i, "closed before talking" if mode == "cutoff" else "closed ungreeted")
                continue
            if math.isnan(p.t_first):
                p.t_first = t
            if mode == "timer":
                p.buf = (p.buf + data)[-4096:]
                if p.buf.startswith(b"220 ") or b"\n220 " in p.buf:
                    p.t_greet = t
                    finish(i, "greeted")
    for i in range(k):
        finish(i, "gave up")
    conn.send([{k_: v for k_, v in asdict(p).items() if k_ not in ("sock", "buf")} for p in probes])
    sel.close()


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain-text table, first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(out) + " |"

    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    sys.stdout.flush()


def machine_facts() -> dict[str, str]:
    """What the figures were measured on."""
    facts = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "kernel": os.uname().release,
        "cpus": str(os.cpu_count()),
        "python": sys.version.split()[0],
        "nofile": "/".join(str(x) for x in resource.getrlimit(resource.RLIMIT_NOFILE)),
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        facts["mem"] = f.readline().split(":", 1)[1].strip()
    with contextlib.suppress(OSError), open("/proc/loadavg") as f:
        facts["loadavg"] = " ".join(f.read().split()[:3])
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        repo = Path(__file__).resolve().parent.parent
        rev = subprocess.run(
            ["git", "-C", str(repo), "describe", "--always", "--dirty"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        facts["repeld_git"] = rev.stdout.decode().strip() or "unknown"
    for name in ("net/core/somaxconn",):
        with contextlib.suppress(OSError), open(f"/proc/sys/{name}") as f:
            facts[name.rsplit("/", 1)[1]] = f.read().strip()
    return facts


# ---------------------------------------------------------------- servers


class UdpSink:
    """A loopback UDP socket that plays syslog: it counts datagrams when drained.

    Datagrams wait in a large receive buffer and are counted by `drain()` between
    the bench phases, so the sink costs no CPU while a measurement runs.
    """

    def __init__(self, keep: Sequence[str] = ()) -> None:
        #: Datagrams whose MSGID is in `keep` are kept whole, in arrival order.
        self.keep = frozenset(keep)
        self.kept: list[bytes] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):  # root: beyond rmem_max
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self.count = 0
        self.by_msgid: dict[str, int] = {}

    def drain(self) -> int:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.count
            self.count += 1
            # RFC 5424: <PRI>1 TIMESTAMP HOST APP PROCID MSGID ...
            parts = data.split(b" ", 6)
            if len(parts) > 5:
                msgid = parts[5].decode("ascii", "replace")
                self.by_msgid[msgid] = self.by_msgid.get(msgid, 0) + 1
                if msgid in self.keep:
                    self.kept.append(data)

    def take(self, msgid: str) -> list[dict[str, str]]:
        """Drain, then remove and return the kept events of `msgid` as SD params."""
        self.drain()
        out = [sd_params(d) for d in self.kept if d.split(b" ", 6)[5:6] == [msgid.encode()]]
        self.kept = [d for d in self.kept if d.split(b" ", 6)[5:6] != [msgid.encode()]]
        return out

    def close(self) -> None:
        self.sock.close()


_SD_PARAM = re.compile(rb'([A-Za-z0-9_.-]+)="((?:[^"\\]|\\.)*)"')


def sd_params(datagram: bytes) -> dict[str, str]:
    """The PARAM-NAME="value" pairs of an RFC 5424 message's structured data."""
    head, sep, _ = datagram.partition(b"] ")
    body = head if sep else datagram
    return {
        k.decode("ascii", "replace"): re.sub(rb"\\(.)", rb"\1", v).decode("utf-8", "replace")
        for k, v in _SD_PARAM.findall(body)
    }


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


def _spawn(
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


def start_smtp_sink(port: int, logdir: Path, backlog: int = 4096) -> Server:
    """Postfix's smtp-sink on 127.0.0.1:port (bench/peers/smtp-sink.sh)."""
    env = {"SINK_PORT": str(port), "SINK_BACKLOG": str(backlog)}
    return _spawn("smtp-sink", [str(PEERS / "smtp-sink.sh")], port, logdir, env)


def start_redis(port: int, logdir: Path) -> Server:
    """A throw-away redis-server on 127.0.0.1:port: no persistence (--save '',
    --appendonly no), its working directory in `logdir`; stopped by its PID."""
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(logdir), "--daemonize", "no", "--protected-mode", "yes"]
    return _spawn("redis-server", argv, port, logdir)


def _workers_ready(pids: Sequence[int]) -> int:
    """How many of `pids` are repeld workers that have opened their holding pen.

    A worker has two epoll sets once its server exists (trio's and the pen's);
    before that it is still importing and would leave connections queued.
    """
    ready = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if b"REPELD_WORKER=" not in f.read():
                    continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        epolls = 0
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventpoll]":
                    epolls += 1
        if epolls >= 2:
            ready += 1
    return ready


def wait_workers(srv: Server, count: int, timeout: float = 30.0) -> bool:
    """Wait until `count` repeld workers under `srv` are serving (then 0.3 s more)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _workers_ready(srv.pids()) >= count:
            time.sleep(0.3)  # from the pen to the accept loop
            return True
        if not srv.alive():
            return False
        time.sleep(0.05)
    return False


def repeld_workers(args: Sequence[str]) -> int:
    """The --workers N (or -w N) among repeld arguments; 1 when absent."""
    count = 1
    for i, arg in enumerate(args):
        value = None
        if arg in ("-w", "--workers") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--workers="):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-w") and len(arg) > 2:
            value = arg[2:]
        if value is not None:
            count = (os.cpu_count() or 1) if value == "auto" else int(value)
    return count


def _fresh_cache(argv: list[str], logdir: Path, port: int, pythonpath: str) -> list[str]:
    """`--cache sqlite:` in a new file when this repeld has a pass cache.

    The default cache persists across runs, and the benches reuse client
    addresses: a fresh file keeps the default code path without yesterday's
    passes. (Older repeld without --cache: nothing.)
    """
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    try:
        helptext = subprocess.run(
            [*argv, "--help"], capture_output=True, timeout=30, check=False, env=env
        ).stdout.decode(errors="replace")
    except (OSError, subprocess.SubprocessError):
        return []
    if "--cache URL" not in helptext:
        return []
    cachedir = logdir / f"cache-{port}"
    cachedir.mkdir(mode=0o777, exist_ok=True)
    os.chmod(cachedir, 0o777)  # the service user writes here
    return ["--cache", f"sqlite:{cachedir}/cache.sqlite"]


def start_repeld(
    port: int,
    backend_port: int,
    delay: float,
    syslog_port: int,
    logdir: Path,
    extra: Sequence[str] = (),
    wrapper: Sequence[str] = (),
    *,
    foreground: bool = True,
    pythonpath: str = "",
    name: str = "repeld",
) -> Server:
    """repeld on 127.0.0.1:port in front of 127.0.0.1:backend_port.

    `wrapper` replaces `python -m repeld` (e.g. bench/profile_repeld.py for
    profiling); `pythonpath` puts another source tree first (an A/B of a patch).
    """
    argv = list(wrapper) if wrapper else [sys.executable, "-m", "repeld"]
    opts = ["-f"] if foreground else []
    opts += ["-l", f"127.0.0.1:{port}", "-b", f"127.0.0.1:{backend_port}", "-d", f"{delay:g}"]
    opts += ["--syslog", f"udp://127.0.0.1:{syslog_port}"]
    if os.geteuid() == 0 and not any(
        x in ("-u", "--user") or x.startswith("--user=") for x in extra
    ):
        opts += ["--user", "nobody"]  # as in production: drop root after binding
    if not any(x.startswith(("--cache", "--no-cache")) for x in extra):
        opts += _fresh_cache(argv, logdir, port, pythonpath)
    opts += list(extra)
    env = {"PYTHONPATH": pythonpath} if pythonpath else None
    srv = _spawn(name, argv + opts, port, logdir, env)
    srv.note = (f"PYTHONPATH={pythonpath} " if pythonpath else "") + " ".join(opts)
    workers = repeld_workers(opts)
    # With --workers the parent listens before its workers can accept.
    if workers > 1 and not wait_workers(srv, workers):
        srv.stop()
        tail = Path(srv.log).read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{name}: {workers} workers did not come up:\n{tail}")
    return srv


def start_postscreen(
    port: int, delay: int, held: int, logdir: Path, name: str = "postscreen"
) -> Server:
    """A private Postfix whose postscreen greets after `delay` s and drops (521 +
    close) a client that talks first: bench/peers/postscreen.sh, master's PID."""
    env = {
        "PEER_DIR": str(logdir / name),
        "PS_PORT": str(port),
        "PS_GREET_WAIT": f"{delay}s",
        "PS_GREET_ACTION": "drop",
        # postscreen enters stress mode at 90 % of the pre-queue limit: keep far off
        "PS_PRE_QUEUE": str(max(10000, 2 * held + 1000)),
        # default_process_limit is also postscreen's listen(2) backlog: 100 would
        # drop SYNs under a fast ramp; 4096 = the kernel's somaxconn here
        "PS_PROCS": "4096",
    }
    srv = _spawn(name, [str(PEERS / "postscreen.sh")], port, logdir, env)
    srv.note = " ".join(f"{k}={v}" for k, v in env.items() if k != "PEER_DIR")
    srv.note += " bench/peers/postscreen.sh"
    return srv


def start_haproxy(
    port: int, backend_port: int, delay: float, logdir: Path, trusted: str = ""
) -> Server:
    """HAProxy in TCP mode, the inspect-delay recipe (bench/peers/haproxy.sh), no
    PROXY header; its log lines go to a UDP socket that is never read, so HAProxy
    pays for logging as repeld does for its events."""
    log = UdpSink()
    env = {
        "PEER_DIR": str(logdir / f"haproxy-{port}"),
        "HP_PORT": str(port),
        "HP_DELAY": f"{delay:g}",
        "HP_PROXY": "none",
        "HP_BACKEND_PORT": str(backend_port),
        "HP_LOG": f"127.0.0.1:{log.port}",
    }
    if trusted:
        env["HP_TRUSTED"] = trusted
    try:
        srv = _spawn("haproxy", [str(PEERS / "haproxy.sh")], port, logdir, env)
    except BaseException:
        log.close()
        raise
    srv.closers.append(log.close)
    srv.note = " ".join(
        f"{k}={v}" for k, v in env.items() if k not in ("PEER_DIR", "HP_LOG")
    )
    srv.note += " bench/peers/haproxy.sh"
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

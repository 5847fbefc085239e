"""Starting the servers under test on loopback: repeld, and the peers through
their recipes in bench/peers/ (smtp-sink, postscreen, HAProxy as a greeting
delay or as the balancer in front of repeld, NSD), plus
redis-server for bench-cache and the task-per-connection server
(bench/taskserver.py) for the A/B of repeld's pen and relay pool.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

from benchlib.events import UdpSink
from benchlib.net import assert_loopback
from benchlib.procs import Server, reaped_children_seconds, spawn, tree_pids

#: The recipes that start the peers on loopback (bench/peers/, see bench/README.md).
PEERS = Path(__file__).resolve().parents[1] / "peers"


def start_smtp_sink(port: int, logdir: Path, backlog: int = 4096) -> Server:
    """Postfix's smtp-sink on 127.0.0.1:port (bench/peers/smtp-sink.sh)."""
    env = {"SINK_PORT": str(port), "SINK_BACKLOG": str(backlog)}
    return spawn("smtp-sink", [str(PEERS / "smtp-sink.sh")], port, logdir, env)


def start_redis(port: int, logdir: Path) -> Server:
    """A throw-away redis-server on 127.0.0.1:port: no persistence (--save '',
    --appendonly no), its working directory in `logdir`; stopped by its PID."""
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(logdir), "--daemonize", "no", "--protected-mode", "yes"]
    return spawn("redis-server", argv, port, logdir)


#: The list zones bench/peers/nsd.sh serves: a block list and an allow list.
DNS_LISTS = ("bl.test", "wl.test")
#: An address each list lists (the RFC 5782 test point), and what it answers.
LISTED = {"bl.test": ("127.0.0.2", "127.0.0.2"), "wl.test": ("127.0.0.4", "127.0.2.1")}


@dataclass
class DnsPeer:
    """NSD serving the list zones (bench/peers/nsd.sh) and how to read its counters."""

    server: Server
    conf: Path

    def arguments(self) -> list[str]:
        """What repeld needs to ask both lists through this server."""
        bl, wl = DNS_LISTS
        return ["--resolver", f"127.0.0.1:{self.server.port}", "--dnsbl", bl, "--dnswl", wl]

    def counters(self) -> dict[str, int]:
        """Queries received since start, in all and per list zone, and the answers
        NSD truncated or dropped (`nsd-control stats_noreset`; {} if it fails)."""
        exe = shutil.which("nsd-control") or "/usr/sbin/nsd-control"
        try:
            out = subprocess.run(
                [exe, "-c", str(self.conf), "stats_noreset"],
                capture_output=True,
                timeout=10,
                check=True,
                text=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return {}
        values: dict[str, int] = {}
        for line in out.splitlines():
            key, _, value = line.partition("=")
            if value.isdigit():
                values[key] = int(value)
        wanted = {"queries": "num.queries", "truncated": "num.truncated", "dropped": "num.dropped"}
        wanted |= {zone: f"{zone}.num.queries" for zone in DNS_LISTS}
        return {name: values[key] for name, key in wanted.items() if key in values}


def _reverse(address: str) -> str:
    return ".".join(reversed(address.split(".")))


def _ask(port: int, name: str) -> tuple[int, list[str]]:
    """One A query to 127.0.0.1:port: (rcode, the addresses answered)."""
    reply = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=1.0)
    return reply.rcode(), [str(rr) for rrset in reply.answer for rr in rrset]


def start_nsd(port: int, logdir: Path, unlisted: Sequence[str] = (), name: str = "nsd") -> DnsPeer:
    """NSD on 127.0.0.1:port (UDP and TCP) serving bl.test and wl.test
    (bench/peers/nsd.sh), once it answers: each list's test point is listed,
    and each address of `unlisted` (the bench's sources) is in neither list."""
    assert_loopback(*unlisted)
    peer_dir = logdir / f"{name}-{port}"
    env = {"PEER_DIR": str(peer_dir), "NSD_PORT": str(port)}
    srv = spawn(name, [str(PEERS / "nsd.sh")], port, logdir, env)
    srv.note = f"NSD_PORT={port} bench/peers/nsd.sh ({', '.join(DNS_LISTS)})"
    try:
        # Listening is not serving: the zones may still be loading.
        deadline = time.monotonic() + 20.0
        while True:
            zone = DNS_LISTS[0]
            address, answer = LISTED[zone]
            try:
                if _ask(port, f"{_reverse(address)}.{zone}") == (dns.rcode.NOERROR, [answer]):
                    break
            except (OSError, dns.exception.DNSException):
                pass
            if time.monotonic() > deadline or not srv.alive():
                raise RuntimeError(f"{name}: {zone} not served on port {port}")
            time.sleep(0.1)
        for zone, (address, answer) in LISTED.items():
            got = _ask(port, f"{_reverse(address)}.{zone}")
            if got != (dns.rcode.NOERROR, [answer]):
                raise RuntimeError(f"{name}: {address} in {zone}: {got}, not {answer}")
            for source in unlisted:
                got = _ask(port, f"{_reverse(source)}.{zone}")
                if got[0] != dns.rcode.NXDOMAIN:
                    raise RuntimeError(f"{name}: the bench's source {source} is in {zone}: {got}")
    except BaseException:
        srv.stop()
        raise
    return DnsPeer(srv, peer_dir / "nsd.conf")


@dataclass
class DelayedDnsPeer(DnsPeer):
    """The bench's own list server (benchlib/dnsresponder.py): the zones of NSD's
    recipe, each answer `latency` seconds after its query, as a caching resolver
    answers a new address; `conf` is where it writes its counters."""

    latency: float = 0.0

    def counters(self) -> dict[str, int]:
        """Queries received since start, in all and per list zone ({} if it fails)."""
        before = self.conf.stat().st_mtime_ns if self.conf.exists() else 0
        try:
            os.kill(self.server.pid, signal.SIGUSR1)
        except OSError:
            return {}
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if self.conf.exists() and self.conf.stat().st_mtime_ns != before:
                try:
                    got = json.loads(self.conf.read_text())
                except ValueError:  # replaced atomically; never half written
                    return {}
                return {k: int(v) for k, v in got.items()}
            time.sleep(0.02)
        return {}


def start_dnsresponder(port: int, logdir: Path, latency: float) -> DelayedDnsPeer:
    """benchlib/dnsresponder.py on 127.0.0.1:port, answering after `latency` s,
    once it answers (each list's test point listed, as NSD's zones)."""
    counters = logdir / f"dnsresponder-{port}.json"
    script = Path(__file__).resolve().parent / "dnsresponder.py"
    argv = [sys.executable, str(script), "--port", str(port), "--latency", str(latency)]
    srv = spawn("dnsresponder", [*argv, "--counters", str(counters)], port, logdir)
    srv.note = f"{' '.join(argv[1:])} ({', '.join(DNS_LISTS)}, answers after {latency:g} s)"
    try:
        for zone, (address, answer) in LISTED.items():
            got = _ask(port, f"{_reverse(address)}.{zone}")
            if got != (dns.rcode.NOERROR, [answer]):
                raise RuntimeError(f"dnsresponder: {address} in {zone}: {got}, not {answer}")
    except BaseException:
        srv.stop()
        raise
    return DelayedDnsPeer(srv, counters, latency)


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


#: What systemd does for repeld.socket (ListenStream=, Backlog=4096, and with
#: "reuseport" ReusePort=yes): bind and listen, put the socket at fd 3 with
#: LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID set, and exec the command.
#: `python -c ACTIVATOR PORT shared|reuseport COMMAND...`
ACTIVATOR = r"""
import os, socket, sys
port, how, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if how == "reuseport":
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
sock.bind(("127.0.0.1", port))
sock.listen(4096)
if sock.fileno() != 3:
    os.dup2(sock.fileno(), 3)
os.set_inheritable(3, True)
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="smtp", LISTEN_PID=str(os.getpid()))
os.execvp(argv[0], argv)
"""


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
    activation: str = "",
) -> Server:
    """repeld on 127.0.0.1:port in front of 127.0.0.1:backend_port.

    `wrapper` replaces `python -m repeld` (e.g. bench/profile_repeld.py for
    profiling); `pythonpath` puts another source tree first (an A/B of a patch).
    `activation` "shared" or "reuseport": the listener is handed over as
    repeld.socket hands it (`ACTIVATOR`), without or with ReusePort=yes.
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
    if activation:
        if activation not in ("shared", "reuseport"):
            raise ValueError(f"activation: shared or reuseport, not {activation!r}")
        argv = [sys.executable, "-c", ACTIVATOR, str(port), activation, *argv]
    srv = spawn(name, argv + opts, port, logdir, env)
    srv.note = (f"PYTHONPATH={pythonpath} " if pythonpath else "") + " ".join(opts)
    if activation:
        srv.note += f" (listener handed over as by repeld.socket, {activation})"
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
    srv = spawn(name, [str(PEERS / "postscreen.sh")], port, logdir, env)
    srv.note = " ".join(f"{k}={v}" for k, v in env.items() if k != "PEER_DIR")
    srv.note += " bench/peers/postscreen.sh"
    return srv


@dataclass
class PostfixPart(Server):
    """The processes of one Postfix program (`comm`, e.g. postscreen) in a running
    instance: a front whose CPU is counted apart from the rest of Postfix. It is
    stopped with the instance, never by itself."""

    comm: str = ""

    def pids(self) -> list[int]:
        found = []
        for pid in tree_pids(self.pid):
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == self.comm:
                        found.append(pid)
            except OSError:
                continue
        return found

    def stop(self) -> None:
        pass


@dataclass
class PostfixInstance(Server):
    """A Postfix master and its children, which come and go (max_use, max_idle):
    its CPU counts the exited ones too, from master's cutime and cstime."""

    def cpu(self) -> float:
        return super().cpu() + reaped_children_seconds(self.pid)


def start_postfix(
    port: int, proxy_port: int, ps_port: int, logdir: Path, name: str = "postfix"
) -> Server:
    """A private Postfix, the final server of the Postfix set (bench/peers/postfix.sh):
    smtpd on `port` (plain) and `proxy_port` (PROXY), postscreen on `ps_port`, and
    the `smtpd pass` service at `<PEER_DIR>/spool/private/smtpd`; master's PID."""
    peer_dir = logdir / name
    peer_dir.mkdir(mode=0o755, exist_ok=True)
    env = {
        "PEER_DIR": str(peer_dir),
        "PF_PORT": str(port),
        "PF_PROXY_PORT": str(proxy_port),
        "PF_PS_PORT": str(ps_port),
    }
    started = spawn(name, [str(PEERS / "postfix.sh")], port, logdir, env)
    srv = PostfixInstance(started.name, started.pid, port, proc=started.proc, log=started.log)
    srv.note = " ".join(f"{k}={v}" for k, v in env.items() if k != "PEER_DIR")
    srv.note += " bench/peers/postfix.sh"
    return srv


def postfix_pass_socket(postfix: Server) -> str:
    """Where the instance's `smtpd pass` service listens (for repeld -b pass:PATH)."""
    return str(Path(postfix.log).parent / "postfix" / "spool" / "private" / "smtpd")


def start_haproxy(
    port: int,
    backend_port: int,
    delay: float,
    logdir: Path,
    trusted: str = "",
    proxy: str = "none",
) -> Server:
    """HAProxy in TCP mode, the inspect-delay recipe (bench/peers/haproxy.sh), no
    PROXY header; its log lines go to a UDP socket that is never read, so HAProxy
    pays for logging as repeld does for its events."""
    log = UdpSink()
    env = {
        "PEER_DIR": str(logdir / f"haproxy-{port}"),
        "HP_PORT": str(port),
        "HP_DELAY": f"{delay:g}",
        "HP_PROXY": proxy,
        "HP_BACKEND_PORT": str(backend_port),
        "HP_LOG": f"127.0.0.1:{log.port}",
    }
    if trusted:
        env["HP_TRUSTED"] = trusted
    try:
        srv = spawn("haproxy", [str(PEERS / "haproxy.sh")], port, logdir, env)
    except BaseException:
        log.close()
        raise
    srv.closers.append(log.close)
    srv.note = " ".join(f"{k}={v}" for k, v in env.items() if k not in ("PEER_DIR", "HP_LOG"))
    srv.note += " bench/peers/haproxy.sh"
    return srv


def start_balancer(
    port: int,
    backend_port: int,
    delay: float,
    logdir: Path,
    proxy: str = "v2",
    maxconn: int = 9000,
    name: str = "balancer",
) -> Server:
    """HAProxy as the balancer in front of an MX (bench/peers/haproxy.sh with
    HP_MODE=relay): every connection relayed at once to 127.0.0.1:backend_port
    with a PROXY header (`proxy`: v2, v1 or none) and, with a header, the SMTP
    health checks MX fleets run (HP_CHECK=yes: a v2 LOCAL header and HELO each
    second). A relayed connection costs HAProxy two descriptors: `maxconn` must
    stay under half the fd limit. Its log lines go to a UDP socket never read."""
    log = UdpSink()
    env = {
        "PEER_DIR": str(logdir / f"{name}-{port}"),
        "HP_MODE": "relay",
        "HP_PORT": str(port),
        "HP_DELAY": f"{delay:g}",
        "HP_PROXY": proxy,
        "HP_CHECK": "no" if proxy == "none" else "yes",
        "HP_BACKEND_PORT": str(backend_port),
        "HP_MAXCONN": str(maxconn),
        "HP_LOG": f"127.0.0.1:{log.port}",
    }
    try:
        srv = spawn(name, [str(PEERS / "haproxy.sh")], port, logdir, env)
    except BaseException:
        log.close()
        raise
    srv.closers.append(log.close)
    srv.note = " ".join(f"{k}={v}" for k, v in env.items() if k not in ("PEER_DIR", "HP_LOG"))
    srv.note += " bench/peers/haproxy.sh"
    return srv


#: The task-per-connection server (one trio task per client) for the A/B.
TASKSERVER = Path(__file__).resolve().parents[1] / "taskserver.py"


def start_taskserver(
    port: int, backend_port: int, delay: float, logdir: Path, trusted: str = ""
) -> Server:
    """bench/taskserver.py on 127.0.0.1:port: a trio task per connection that
    holds, cuts off and relays to 127.0.0.1:backend_port (the A/B of repeld's
    pen and relay pool)."""
    opts = ["--listen", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{backend_port}"]
    opts += ["--delay", f"{delay:g}"]
    if trusted:
        opts += ["--trusted", trusted]
    srv = spawn("trio-tasks", [sys.executable, str(TASKSERVER), *opts], port, logdir)
    srv.note = "bench/taskserver.py " + " ".join(opts)
    return srv

"""A real Exim for tests: a receiving daemon (the MTA behind repeld) and a sending
Exim that uses early pipelining (PIPECONNECT), both private.

Debian's exim4 packages conflict with the Postfix the other tests use, so the
binary comes unpacked from the .debs: `bash tests/install-exim` (which .ci/run
runs) puts exim4-daemon-heavy 4.96 under /opt/repeld-test-exim, installs the
shared libraries it needs and the `Debian-exim` user its binary is built to run
as. `REPELD_TEST_EXIM=/path/to/exim4` points the tests at another binary. When
no usable Exim is found the tests that need one are skipped, saying why.

Every instance has its own directory under /tmp (configuration, spool with its
hints databases, log files, delivered mail), given to the Exim user, and is run
as root with `-C` (root may name any configuration); nothing reads or writes
/etc/exim4 or /var/spool/exim4. Exim re-executes itself for deliveries as the
Exim user and then logs "exim user lost privilege for using -C option": that is
expected and harmless here, everything it touches belongs to that user.

Early pipelining, as Exim 4.94+ does it: the server advertises PIPECONNECT in
its EHLO reply (`pipelining_connect_advertise_hosts = *`, the default); a
sender with `hosts_pipe_connect` on its smtp transport stores that reply in its
hints database (key `<ip>:<port>.EHLO`) and on its next connection to the same
address and port sends EHLO, MAIL, RCPT (and with CHUNKING the whole message as
BDAT LAST) before the banner. With `log_selector = +pipelining` a delivery
line (`=>`) carries `L*` when early pipelining was used and `L` for plain
pipelining; an accept line (`<=`) carries `L*` (used) or `L.` (offered, unused).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .postfix_fixture import is_listening
from .procs import free_port, wait_for, wait_log_match

__all__ = [
    "EXIM_USER",
    "Delivery",
    "EximClient",
    "EximServer",
    "exim_client",
    "exim_server",
    "find_exim",
    "require_exim",
]

#: Where tests/install-exim unpacks the .debs.
EXIM_ROOT = Path("/opt/repeld-test-exim")
#: The user Debian's binary is built to run as (EXIM_USER, by name).
EXIM_USER = "Debian-exim"
#: The domain the server accepts mail for, and the client routes to it.
DOMAIN = "test.example"
SENDER = "sender@client.test"
#: Generous bounds for a hung peer, not speed assertions.
START_TIMEOUT = 30.0
SEND_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0

_LOG_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (?P<id>[0-9A-Za-z]+-[0-9A-Za-z]+-[0-9A-Za-z]+) "
    r"(?P<flag><=|=>|->|==|\*\*) (?P<rest>.*)$",
    re.M,
)


def _candidates() -> list[Path]:
    env = os.environ.get("REPELD_TEST_EXIM")
    if env:
        return [Path(env)]
    found = [EXIM_ROOT / "usr/sbin/exim4"]
    for name in ("exim4", "exim"):
        path = shutil.which(name) or (
            f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None
        )
        if path:
            found.append(Path(path))
    return found


@functools.cache
def find_exim() -> tuple[Path | None, str]:
    """(the Exim binary, "") or (None, why there is none usable)."""
    if os.geteuid() != 0:
        return None, "the Exim tests run as root (Exim must switch to its own user)"
    try:
        pwd.getpwnam(EXIM_USER)
    except KeyError:
        return None, (
            f"no user {EXIM_USER!r}, which Debian's Exim is built to run as "
            "(run `bash tests/install-exim` as root, as .ci/run does)"
        )
    reasons: list[str] = []
    for exim in _candidates():
        if not os.access(exim, os.X_OK):
            reasons.append(f"{exim}: not there")
            continue
        try:
            proc = subprocess.run(
                [str(exim), "-C", "/dev/null", "-bV"],
                capture_output=True,
                text=True,
                timeout=START_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            reasons.append(f"{exim}: {e}")
            continue
        out = proc.stdout + proc.stderr
        support = re.search(r"^Support for:(.*)$", out, re.M)
        if proc.returncode != 0 or support is None:
            reasons.append(f"{exim} -bV: {out.strip()[-300:]}")
            continue
        missing = {"PIPECONNECT", "PROXY"} - set(support[1].split())
        if missing:
            reasons.append(f"{exim} is built without {', '.join(sorted(missing))}")
            continue
        return exim, ""
    return None, (
        "no usable Exim (run `bash tests/install-exim` as root, as .ci/run does, "
        "or set REPELD_TEST_EXIM): " + "; ".join(reasons)
    )


def require_exim() -> Path:
    """The Exim binary, or skip the calling test saying why there is none."""
    exim, reason = find_exim()
    if exim is None:
        pytest.skip(reason)
    return exim


def _private_dir(prefix: str) -> Path:
    """A fresh directory under /tmp the Exim user can reach (pytest's base is 0700)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    for sub in ("spool", "log", "mail"):
        (base / sub).mkdir(mode=0o750)
        shutil.chown(base / sub, EXIM_USER, EXIM_USER)
    return base


def _common_conf(exim: Path, base: Path, hostname: str) -> str:
    return f"""\
exim_path = {exim}
primary_hostname = {hostname}
qualify_domain = {hostname}
spool_directory = {base}/spool
log_file_path = {base}/log/%slog
pid_file_path = {base}/exim.pid
keep_environment =
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
"""


@dataclass(frozen=True)
class Delivery:
    """One delivery line of a sending Exim's mainlog for one message."""

    message_id: str
    #: "delivered" (=>), "deferred" (==) or "failed" (**)
    status: str
    #: `L*` on the line: EHLO, MAIL, RCPT... were sent before the banner
    early_pipelining: bool
    line: str


class _Instance:
    base: Path

    @property
    def mainlog(self) -> Path:
        return self.base / "log" / "mainlog"

    def log_text(self) -> str:
        try:
            return self.mainlog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """The first match of `pattern` in the mainlog, waiting up to `timeout` s."""
        return wait_log_match(self.log_text, pattern, timeout, self.mainlog, 0.05)


class EximServer(_Instance):
    """An Exim daemon on `host:port` accepting mail for `DOMAIN`: one file per
    message in `maildir` (appendfile, `directory` mode).

    `hosts_proxy` makes it read a PROXY header (v1 or v2) from those hosts, as
    behind repeld; `pipe_connect_hosts` is `pipelining_connect_advertise_hosts`
    (default `*`, Exim's own default: it advertises PIPECONNECT); `banner` is
    its `smtp_banner` (a `\\n` in it makes a multi-line greeting).
    """

    def __init__(
        self,
        exim: Path,
        *,
        host: str = "127.0.0.1",
        hosts_proxy: str | None = None,
        pipe_connect_hosts: str = "*",
        banner: str | None = None,
    ) -> None:
        assert host.startswith("127."), "loopback only"
        self.banner = banner
        self.exim = exim
        self.host = host
        self.port = 0
        self.base = _private_dir("repeld-exim-server-")
        self.maildir = self.base / "mail"
        self.config = self.base / "exim.conf"
        self.hosts_proxy = hosts_proxy
        self.pipe_connect_hosts = pipe_connect_hosts
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _conf(self) -> str:
        proxy = f"hosts_proxy = {self.hosts_proxy}\n" if self.hosts_proxy else ""
        if self.banner is not None:
            proxy += f"smtp_banner = {self.banner}\n"
        return (
            "# receiving Exim written by tests/exim_fixture.py\n"
            + _common_conf(self.exim, self.base, "server.test")
            + proxy
            + f"""\
daemon_smtp_ports = {self.port}
local_interfaces = <; {self.host}
pipelining_connect_advertise_hosts = {self.pipe_connect_hosts}
smtp_receive_timeout = 30s
log_selector = +smtp_connection +pipelining +received_recipients +incoming_port \\
  +proxy +smtp_protocol_error +smtp_syntax_error +smtp_no_mail +lost_incoming_connection
domainlist local_domains = {DOMAIN}
acl_smtp_rcpt = acl_rcpt

begin acl
acl_rcpt:
  accept domains = +local_domains
  deny message = relay not permitted

begin routers
mailbox:
  driver = accept
  domains = +local_domains
  transport = to_file

begin transports
to_file:
  driver = appendfile
  directory = {self.maildir}
  user = {EXIM_USER}
  envelope_to_add
  return_path_add

begin retry
* * F,1h,5m
"""
        )

    def start(self) -> None:
        for _attempt in range(5):  # the free port may be taken between probe and bind
            self.port = free_port(self.host)
            self.config.write_text(self._conf())
            with open(self.base / "daemon.stderr", "ab") as log:
                self.proc = subprocess.Popen(
                    [str(self.exim), "-C", str(self.config), "-bdf"],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_listening() and self.proc.poll() is None:
                return
            self.stop()
        raise RuntimeError(
            f"exim -bdf did not listen on {self.address}:\n"
            + (self.base / "daemon.stderr").read_text(errors="replace")[-3000:]
            + self.log_text()[-3000:]
        )

    def _wait_listening(self) -> bool:
        proc = self.proc
        assert proc is not None
        return wait_for(lambda: is_listening(self.port) or proc.poll() is not None, START_TIMEOUT)

    def messages(self) -> list[Path]:
        """The delivered messages, one file each (appendfile's temp files left out)."""
        return sorted(p for p in self.maildir.iterdir() if not p.name.startswith("temp."))

    def wait_messages(self, count: int, timeout: float = START_TIMEOUT) -> list[Path]:
        """At least `count` delivered messages, waiting up to `timeout` s."""
        if not wait_for(lambda: len(self.messages()) >= count, timeout):
            raise AssertionError(
                f"{len(self.messages())} message(s) in {self.maildir}, expected {count}:\n"
                + self.log_text()[-4000:]
            )
        return self.messages()

    def accepted(self) -> list[str]:
        """The accept (`<=`) lines of the mainlog."""
        return [m[0] for m in _LOG_LINE.finditer(self.log_text()) if m["flag"] == "<="]

    def stop(self) -> None:
        """SIGTERM to the daemon, then to whatever it started (its own session)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        # Reception and delivery children outlive a stopped daemon for a moment.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


class EximClient(_Instance):
    """A sending Exim that routes every message for `DOMAIN` to `host:port` and
    uses early pipelining there once it has seen PIPECONNECT (`hosts_pipe_connect`).

    It runs no daemon: `send()` hands it a message on stdin with `-odi`, so the
    delivery is attempted at once, and then reads the outcome from its mainlog.
    Its hints databases (retry, and the EHLO cache under misc) are private.
    """

    def __init__(
        self,
        exim: Path,
        port: int,
        *,
        host: str = "127.0.0.1",
        pipe_connect: bool = True,
        fastopen: bool = False,
    ) -> None:
        assert host.startswith("127."), "loopback only"
        self.exim = exim
        self.host = host
        self.port = port
        self.base = _private_dir("repeld-exim-client-")
        self.config = self.base / "exim.conf"
        self.config.write_text(self._conf(pipe_connect, fastopen))
        self.sent = 0

    def _conf(self, pipe_connect: bool, fastopen: bool) -> str:
        # Only DOMAIN is routed: a bounce (to the sender's domain) stays here,
        # frozen, instead of adding connections to the scenario.
        return (
            "# sending Exim written by tests/exim_fixture.py\n"
            + _common_conf(self.exim, self.base, "client.test")
            + f"""\
log_selector = +smtp_connection +pipelining +outgoing_port +deliver_time \\
  +smtp_protocol_error
ignore_bounce_errors_after = 0s

begin routers
target:
  driver = manualroute
  domains = {DOMAIN}
  route_list = * {self.host}
  self = send
  transport = remote_smtp

begin transports
remote_smtp:
  driver = smtp
  port = {self.port}
  allow_localhost
  hosts_pipe_connect = {"*" if pipe_connect else ":"}
  hosts_try_fastopen = {"*" if fastopen else ":"}
  hosts_avoid_tls = *
  connect_timeout = 10s
  command_timeout = 30s
  data_timeout = 30s

begin retry
* * F,1h,5m
"""
        )

    def send(self, rcpt: str = f"user@{DOMAIN}", subject: str = "") -> str:
        """Hand Exim one message and wait for its delivery attempt; its message id."""
        self.sent += 1
        subject = subject or f"repeld exim test {self.sent}"
        header_id = f"exim-{self.sent}.{os.getpid()}@client.test"
        message = (
            f"From: <{SENDER}>\nTo: <{rcpt}>\nSubject: {subject}\n"
            f"Message-ID: <{header_id}>\n\n"
            f"message {self.sent} through repeld\n"
        ).encode()
        proc = subprocess.run(
            [str(self.exim), "-C", str(self.config), "-odi", "-f", SENDER, "--", rcpt],
            input=message,
            capture_output=True,
            timeout=SEND_TIMEOUT,
            start_new_session=True,
            check=False,
        )
        # Its accept line; a bounce the attempt caused has its own (`<= <>`).
        ids = [
            m["id"]
            for m in _LOG_LINE.finditer(self.log_text())
            if m["flag"] == "<=" and f" id={header_id}" in m["rest"]
        ]
        if proc.returncode != 0 or len(ids) != 1:
            raise AssertionError(
                f"exim -odi exited {proc.returncode}, accepted as {ids}:\n"
                + proc.stderr.decode(errors="replace")
                + self.log_text()[-3000:]
            )
        (message_id,) = ids
        if not wait_for(lambda: bool(self.deliveries(message_id)), SEND_TIMEOUT, 0.05):
            raise AssertionError(f"no delivery attempt for {message_id}:\n{self.log_text()}")
        return message_id

    def retry(self, message_id: str) -> None:
        """Run a deferred message's delivery again now (`exim -M`), and wait for its
        next attempt."""
        before = len(self.deliveries(message_id))
        subprocess.run(
            [str(self.exim), "-C", str(self.config), "-M", message_id],
            capture_output=True,
            timeout=SEND_TIMEOUT,
            start_new_session=True,
            check=False,
        )
        if not wait_for(lambda: len(self.deliveries(message_id)) > before, SEND_TIMEOUT, 0.05):
            raise AssertionError(f"no new attempt for {message_id}:\n{self.log_text()}")

    def deliveries(self, message_id: str | None = None) -> list[Delivery]:
        """Every delivery attempt in the mainlog (of one message, if given)."""
        status = {"=>": "delivered", "->": "delivered", "==": "deferred", "**": "failed"}
        found = []
        for m in _LOG_LINE.finditer(self.log_text()):
            if m["flag"] not in status or (message_id and m["id"] != message_id):
                continue
            fields = m["rest"].split(' C="', 1)[0].split()
            found.append(Delivery(m["id"], status[m["flag"]], "L*" in fields, m[0]))
        return found

    def ehlo_cache_keys(self) -> list[str]:
        """The EHLO replies cached for early pipelining (exim_dumpdb misc), as keys
        like `127.0.0.1:2525.EHLO`; empty if exim_dumpdb is not next to the binary."""
        dumpdb = self.exim.parent / "exim_dumpdb"
        if not os.access(dumpdb, os.X_OK):
            return []
        proc = subprocess.run(
            [str(dumpdb), str(self.base / "spool"), "misc"],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        return re.findall(r"(\S+\.EHLO)$", proc.stdout, re.M)

    def cleanup(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def exim_server(
    exim: Path,
    *,
    hosts_proxy: str | None = None,
    pipe_connect_hosts: str = "*",
    banner: str | None = None,
) -> Iterator[EximServer]:
    """A running EximServer; stopped and removed afterwards."""
    server = EximServer(
        exim, hosts_proxy=hosts_proxy, pipe_connect_hosts=pipe_connect_hosts, banner=banner
    )
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@contextlib.contextmanager
def exim_client(exim: Path, port: int, *, pipe_connect: bool = True) -> Iterator[EximClient]:
    """An EximClient sending to 127.0.0.1:`port`; removed afterwards."""
    client = EximClient(exim, port, pipe_connect=pipe_connect)
    try:
        yield client
    finally:
        client.cleanup()

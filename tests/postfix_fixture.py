"""A private, real Postfix instance (master + smtpd) for end-to-end tests.

The instance lives in a fresh directory under /tmp (`postfix -c DIR`), never
touches /etc/postfix or /var/spool/postfix, listens on 127.0.0.1 only, does no
DNS, delivers every message to the discard(8) transport and logs to a plain
file through postlogd(8) (`maillog_file`). It is stopped by its own master PID.

The directory is under /tmp rather than pytest's tmp_path because Postfix's
daemons drop to the `postfix` user and must be able to reach the queue and the
data directory (pytest's base directory is mode 0700).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .procs import free_port, wait_for, wait_log_match

__all__ = [
    "POSTFIX",
    "PostfixInstance",
    "free_port",
    "is_listening",
    "postfix_instance",
    "wait_for",
]

POSTFIX = shutil.which("postfix") or (
    "/usr/sbin/postfix" if os.path.exists("/usr/sbin/postfix") else None
)

#: Generous bounds: these are limits for a hung peer, not speed assertions.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_listening(port: int) -> bool:
    """Whether a TCP (IPv4) listener on `port` exists, asked without connecting
    (so a peer logs no probe connection)."""
    hexport = f"{port:04X}"
    try:
        text = Path("/proc/net/tcp").read_text()
    except OSError:
        return False
    # state 0A = LISTEN
    return any(
        len(cols) > 3 and cols[1].endswith(":" + hexport) and cols[3] == "0A"
        for cols in (line.split() for line in text.splitlines()[1:])
    )


@dataclass
class PostfixInstance:
    """A running private Postfix: smtpd on `host:port`, log in `maillog`."""

    base: Path
    host: str
    port: int
    maillog: Path
    master_pid: int

    @property
    def config_dir(self) -> Path:
        return self.base / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.base / "spool"

    @property
    def pass_socket(self) -> Path:
        """The `smtpd pass` service's socket: private/ is postfix's, mode 0700."""
        return self.base / "spool" / "private" / "smtpd"

    @property
    def unix_socket(self) -> Path:
        """An smtpd that speaks SMTP on a UNIX socket: a service that is not `pass`."""
        return self.base / "spool" / "public" / "smtpd-unix"

    @property
    def public_pass_socket(self) -> Path:
        """A pass service in public/ (mode 0710, group postdrop): for a repeld
        running as its own user in group postdrop."""
        return self.base / "spool" / "public" / "smtpd-public"

    def start_again(self) -> None:
        """Start the stopped instance again (same directory, same ports)."""
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), "start"],  # type: ignore[list-item]
            capture_output=True,
            timeout=START_TIMEOUT,
            env=env,
            check=True,
        )
        pidfile = self.queue_dir / "pid" / "master.pid"

        def started() -> bool:
            try:
                text = pidfile.read_text().strip()
            except OSError:
                return False
            return text.isdigit() and _alive(int(text))

        assert wait_for(started, START_TIMEOUT, 0.1)
        self.master_pid = int(pidfile.read_text().strip())
        assert wait_for(self.pass_socket.exists, START_TIMEOUT, 0.1)

    def log_text(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """The first match of `pattern` in the maillog, waiting up to `timeout` s."""
        return wait_log_match(self.log_text, pattern, timeout, self.maillog, 0.1)

    def stop(self) -> None:
        """SIGTERM to the master PID (what `postfix stop` does), then wait for it."""
        pid = self.master_pid
        if not _alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not wait_for(lambda: not _alive(pid), STOP_TIMEOUT, 0.1):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not _alive(pid), 10.0, 0.1)


def _main_cf(base: Path, host: str, maillog: Path, mynetworks: str, protocols: str = "ipv4") -> str:
    # A host name label may not end with "-" (Postfix refuses to start, and says
    # so only to syslog): mkdtemp's random suffix can end with "_".
    name = re.sub(r"[^a-z0-9]+", "-", base.name.lower()).strip("-")
    return f"""\
# private test instance written by tests/postfix_fixture.py
compatibility_level = 3.6
queue_directory = {base}/spool
data_directory = {base}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = {name}.test.localdomain
mydomain = test.localdomain
myorigin = $myhostname
mydestination =
relay_domains =
alias_maps =
alias_database =
biff = no
append_dot_mydomain = no
readme_directory = no
smtputf8_enable = no
inet_interfaces = {host}
inet_protocols = {protocols}
mynetworks = {mynetworks}
smtp_bind_address = 127.0.0.1
smtpd_peername_lookup = no
smtpd_client_port_logging = yes
smtp_dns_support_level = disabled
default_transport = discard:repeld-test
relay_transport = discard:repeld-test
local_transport = discard:repeld-test
virtual_transport = discard:repeld-test
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
smtpd_banner = $myhostname ESMTP postfix-behind-repeld
smtpd_client_connection_count_limit = 0
maillog_file = {maillog}
maillog_file_prefixes = /tmp
"""


_MASTER_TAIL = """\
pickup      unix  n       -      n      60     1       pickup
cleanup     unix  n       -      n      -      0       cleanup
qmgr        unix  n       -      n      300    1       qmgr
rewrite     unix  -       -      n      -      -       trivial-rewrite
bounce      unix  -       -      n      -      0       bounce
defer       unix  -       -      n      -      0       bounce
trace       unix  -       -      n      -      0       bounce
verify      unix  -       -      n      -      1       verify
flush       unix  n       -      n      1000?  0       flush
proxymap    unix  -       -      n      -      -       proxymap
proxywrite  unix  -       -      n      -      1       proxymap
smtp        unix  -       -      n      -      -       smtp
relay       unix  -       -      n      -      -       smtp
showq       unix  n       -      n      -      -       showq
error       unix  -       -      n      -      -       error
retry       unix  -       -      n      -      -       error
discard     unix  -       -      n      -      -       discard
anvil       unix  -       -      n      -      1       anvil
scache      unix  -       -      n      -      1       scache
postlog     unix-dgram n  -      n      -      1       postlogd
"""


@contextlib.contextmanager
def postfix_instance(
    host: str = "127.0.0.1",
    upstream_proxy: str = "haproxy",
    mynetworks: str = "127.0.0.0/8",
    pass_maxproc: str = "-",
    protocols: str = "ipv4",
    tls: bool = False,
    process_limit: int | None = None,
) -> Iterator[PostfixInstance]:
    """Build, start, yield and stop a private Postfix instance.

    Its smtpd listens on `host:<free port>` with
    `smtpd_upstream_proxy_protocol = upstream_proxy` (the deployment recipe
    for Postfix behind repeld: `--proxy-protocol v1`); it relays (to discard)
    for clients in `mynetworks` only. An `smtpd pass` service (at most
    `pass_maxproc` processes) takes clients handed over as postscreen does, at
    `pass_socket`; an `smtpd` on the UNIX socket `unix_socket` speaks SMTP there.
    `protocols` is inet_protocols: smtpd takes a passed IPv6 client only with
    `all` (or `ipv6`), whatever it listens on itself. With `tls`, an `smtps`
    pass service (private/smtps) speaks TLS first, with a self-signed certificate.
    `process_limit` is default_process_limit: master listens on a pass
    service's socket with a backlog of the larger of it and the service's
    maxproc (master_listen.c), so with `pass_maxproc="1"` and `process_limit=1`
    the queue of private/smtpd is full at two waiting connections.
    """
    assert POSTFIX is not None, "postfix is not installed"
    assert host.startswith("127."), "loopback only"
    base = Path(tempfile.mkdtemp(prefix="repeld-postfix-", dir="/tmp"))
    instance: PostfixInstance | None = None
    try:
        base.chmod(0o755)
        for sub in ("etc", "spool", "data"):
            (base / sub).mkdir(mode=0o755)
        if os.geteuid() == 0:
            shutil.chown(base / "data", "postfix", "postfix")
        maillog = base / "maillog"
        port = free_port(host)
        main_cf = _main_cf(base, host, maillog, mynetworks, protocols)
        if process_limit is not None:
            main_cf += f"default_process_limit = {process_limit}\n"
        (base / "etc" / "main.cf").write_text(main_cf)
        proxy_opt = f" -o smtpd_upstream_proxy_protocol={upstream_proxy}" if upstream_proxy else ""
        smtps = ""
        if tls:
            key, cert = base / "etc" / "key.pem", base / "etc" / "cert.pem"
            subprocess.run(
                ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                 "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
                capture_output=True, timeout=START_TIMEOUT, check=True,
            )  # fmt: skip
            smtps = (
                "smtps      pass  -       -      n      -      -       smtpd"
                " -o smtpd_tls_wrappermode=yes -o smtpd_tls_security_level=encrypt -o smtpd_tls_loglevel=1"
                f" -o smtpd_tls_cert_file={cert} -o smtpd_tls_key_file={key}\n"
                "tlsmgr     unix  -       -      n      1000?  1       tlsmgr\n"
            )
        (base / "etc" / "master.cf").write_text(
            "# service type private unpriv chroot wakeup maxproc command\n"
            f"{host}:{port} inet n - n - - smtpd{proxy_opt}"
            " -o smtpd_upstream_proxy_timeout=30s\n"
            f"smtpd      pass  -       -      n      -      {pass_maxproc}      smtpd\n"
            "smtpd-unix unix  n       -      n      -      -       smtpd\n"
            "smtpd-public pass n      -      n      -      -       smtpd\n" + smtps + _MASTER_TAIL
        )
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        proc = subprocess.run(
            [POSTFIX, "-c", str(base / "etc"), "start"],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            env=env,
            check=False,
        )
        pidfile = base / "spool" / "pid" / "master.pid"

        def started() -> bool:
            try:
                return pidfile.read_text().strip().isdigit()
            except OSError:
                return False

        if proc.returncode != 0 or not wait_for(started, START_TIMEOUT, 0.1):
            log = maillog.read_text(errors="replace")[-3000:] if maillog.exists() else ""
            raise RuntimeError(
                f"postfix -c {base / 'etc'} start failed (rc={proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}\nmaillog:\n{log}"
            )
        master_pid = int(pidfile.read_text().strip())
        instance = PostfixInstance(base, host, port, maillog, master_pid)
        if not wait_for(lambda: is_listening(port), START_TIMEOUT, 0.1):
            raise RuntimeError(f"postfix smtpd did not listen on {host}:{port}")
        yield instance
    finally:
        if instance is not None:
            instance.stop()
        else:
            # start may have got as far as writing a pid file
            with contextlib.suppress(OSError, ValueError):
                pid = int((base / "spool" / "pid" / "master.pid").read_text().strip())
                PostfixInstance(base, host, 0, base / "maillog", pid).stop()
        shutil.rmtree(base, ignore_errors=True)

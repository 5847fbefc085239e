"""A private, real rsyslogd for tests: Debian's inputs, files as Debian writes them.

`rsyslogd -f CONF -i PIDFILE -n` (foreground) with two imuxsock inputs on private
socket paths instead of /dev/log:

* `log`: Debian's stock input settings (imuxsock's special parser on), as
  /dev/log is read on a Debian 12 host;
* `log5424`: the same with `UseSpecialParser="off"`, the setting repeld(8)
  documents for RFC 5424 on a local socket.

With `udp_port`, also an imudp input on 127.0.0.1:`udp_port`, as a central log
host receives `--syslog udp://...` (rsyslog's RFC 5424 parser first).

Every message goes through `mmjsonparse` (`@cee:`) and `mmpstrucdata` (RFC 5424
structured data) and is written three times: `file.log` in RSYSLOG_FileFormat
(Debian 12's default, RFC 3339 timestamps), `trad.log` in
RSYSLOG_TraditionalFileFormat (older Debian, "Nov 30 00:25:05"), and
`fields.log`, one line per message: program name, MSGID and the parsed
properties `%$!%` as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
TIMEOUT = 30.0

_CONF = """\
global(workDirectory="{dir}")
module(load="imuxsock" SysSock.Use="off")
module(load="mmjsonparse")
module(load="mmpstrucdata")
input(type="imuxsock" Socket="{dir}/log" ruleset="repeld")
input(type="imuxsock" Socket="{dir}/log5424" UseSpecialParser="off" ruleset="repeld")
{udp}template(name="fields" type="list") {{
  property(name="programname") constant(value="|")
  property(name="msgid") constant(value="|")
  property(name="$!") constant(value="\\n")
}}
ruleset(name="repeld") {{
  action(type="mmjsonparse")
  action(type="mmpstrucdata")
  action(type="omfile" file="{dir}/file.log" template="RSYSLOG_FileFormat")
  action(type="omfile" file="{dir}/trad.log" template="RSYSLOG_TraditionalFileFormat")
  action(type="omfile" file="{dir}/fields.log" template="fields")
}}
"""


def available() -> bool:
    return os.path.exists(RSYSLOGD) and os.geteuid() == 0


@dataclass(frozen=True)
class Parsed:
    """One line of fields.log: what rsyslog made of a message."""

    program: str
    msgid: str
    fields: dict[str, Any]


class Rsyslogd:
    """One private rsyslogd in `workdir`; restartable on the same sockets and files."""

    def __init__(self, workdir: Path, udp_port: int | None = None) -> None:
        self.dir = workdir
        self.conf = workdir / "rsyslog.conf"
        udp = (
            'module(load="imudp")\n'
            f'input(type="imudp" address="127.0.0.1" port="{udp_port}" ruleset="repeld")\n'
            if udp_port is not None
            else ""
        )
        self.conf.write_text(_CONF.format(dir=workdir, udp=udp))
        self.pidfile = workdir / "rsyslogd.pid"
        self.socket = workdir / "log"
        self.socket5424 = workdir / "log5424"
        self.file_log = workdir / "file.log"
        self.trad_log = workdir / "trad.log"
        self.fields_log = workdir / "fields.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for sock in (self.socket, self.socket5424):
            sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-f", str(self.conf), "-i", str(self.pidfile), "-n"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + TIMEOUT
        while not (self.socket.exists() and self.socket5424.exists()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("rsyslogd did not open its sockets")
            time.sleep(0.02)

    def stop(self) -> None:
        """SIGTERM and wait: rsyslogd closes its files and removes its sockets."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(TIMEOUT)
        self.proc = None

    def lines(self, path: Path) -> list[str]:
        return path.read_text().splitlines() if path.exists() else []

    def wait_lines(self, path: Path, needle: str, count: int) -> list[str]:
        """At least `count` lines of `path` containing `needle` (rsyslog writes async)."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            found = [line for line in self.lines(path) if needle in line]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def parsed(self) -> list[Parsed]:
        out = []
        for line in self.lines(self.fields_log):
            program, msgid, props = line.split("|", 2)
            out.append(Parsed(program, msgid, json.loads(props) if props else {}))
        return out

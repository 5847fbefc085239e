"""`-b pass:PATH`: repeld hands passed clients' sockets to a real Postfix smtpd.

A private Postfix 3.7 (tests/postfix_fixture.py) runs an `smtpd pass` service,
as master.cf does for postscreen; repeld, dropped to the `postfix` user,
connects to its socket in private/ and sends each passed client's descriptor
and endpoints. Postfix's own log is the witness: `connect from
unknown[127.x.y.z]` names the true client, with no PROXY header anywhere.

Timing rules as in test_e2e.py: no speed assertions, every wait bounded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ..postfix_fixture import POSTFIX, postfix_instance
from ..procs import SyslogUDP
from .test_e2e import DELAY, MAIL_FROM, RCPT_TO, deliver, running_repeld

pytestmark = [
    pytest.mark.skipif(POSTFIX is None, reason="postfix is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run repeld as postfix"),
]

#: The user a pass: backend runs as: private/ is postfix's, mode 0700.
AS_POSTFIX = ("--user", "postfix")


def _toml(syslog: SyslogUDP, backend: str, *extra: str) -> str:
    return (
        'listen = ["127.0.0.1:0"]\n'
        f'backend = "{backend}"\n'
        f"delay = {DELAY}\n"
        f'syslog = "{syslog.target}"\n' + "".join(f"{line}\n" for line in extra)
    )


def _client_fds(pid: int, port: int) -> list[str]:
    """repeld's fds that are the TCP socket of the client on local port `port`."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[2].endswith(f":{port:04X}"):  # remote end is the client's port
                inodes.add(cols[9])
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            found.append(fd.name)
    return found


def test_delivery_through_smtpd_pass_names_the_true_client(syslog: SyslogUDP) -> None:
    # mynetworks holds only the true client: relaying works only if smtpd sees it.
    with postfix_instance(mynetworks="127.0.0.5/32") as pf:
        toml = _toml(syslog, f"pass:{pf.pass_socket}")
        with running_repeld(*AS_POSTFIX, config_text=toml) as rd:
            session = deliver(rd.address, source="127.0.0.5")
            assert session.refused == {}
            assert session.waited >= DELAY
            assert b"postfix-behind-repeld" in session.banner
            _ip, port = session.client
            peer = rf"unknown\[127\.0\.0\.5\]:{port}\b"
            pf.wait_log(rf"postfix/smtpd\[\d+\]: connect from {peer}")
            queue_id = pf.wait_log(rf"postfix/smtpd\[\d+\]: (\w+): client={peer}")[1]
            pf.wait_log(rf"postfix/discard\[\d+\]: {queue_id}: to=<{RCPT_TO}>, .*status=sent")
            (passed,) = syslog.wait_for("pass")
            assert passed.fields["handoff"] == "pass"
            assert passed.fields["client"] == "127.0.0.5"
            syslog.drain(0.3)
            assert not syslog.named("relay-end"), "a handed-off session has no relay-end"
            assert not syslog.named("backend-error")
        log = pf.log_text()
        assert not re.search(r"smtpd\[\d+\]: warning:", log), log
        # The server address smtpd was told is the listener's own (Dovecot SASL needs it).
        assert MAIL_FROM in log

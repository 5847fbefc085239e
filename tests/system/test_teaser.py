"""--teaser with real SMTP clients through repeld to real MTAs.

repeld sends `220-mx.teaser.test` as the hold begins and the MTA's own greeting
completes the reply (RFC 5321 section 4.2). Every real client must read the two
as one greeting and deliver: Python's smtplib, Postfix's smtp-source and smtp(8)
(a second private Postfix whose relayhost is repeld), swaks, and a sending
Exim, also to an Exim whose own greeting has several lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import smtplib
import socket
import subprocess
from collections.abc import Iterator

import pytest

from ..exim_fixture import exim_client, exim_server, require_exim
from ..postfix_fixture import POSTFIX, PostfixInstance, postfix_instance
from ..procs import SyslogUDP, free_port, wait_for
from .test_e2e import MAIL_FROM, MESSAGE, TIMEOUT, running_repeld

DELAY = 1.0
TEXT = "mx.teaser.test"
TEASER = b"220-" + TEXT.encode() + b"\r\n"
SMTP_SOURCE = shutil.which("smtp-source") or (
    "/usr/sbin/smtp-source" if os.path.exists("/usr/sbin/smtp-source") else None
)
SWAKS = shutil.which("swaks")
SENDMAIL = shutil.which("sendmail") or (
    "/usr/sbin/sendmail" if os.path.exists("/usr/sbin/sendmail") else None
)

needs_postfix = pytest.mark.skipif(POSTFIX is None, reason="postfix is not installed")


def teasing(backend_port: int, syslog: SyslogUDP, *extra: str) -> list[str]:
    """repeld's arguments: --teaser in front of a PROXY v1 backend on loopback."""
    return [
        "--listen", "127.0.0.1:0",
        "--backend", f"127.0.0.1:{backend_port}",
        "--proxy-protocol", "v1",
        "--delay", str(DELAY),
        "--teaser", "--teaser-text", TEXT,
        "--syslog", syslog.target,
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def postfix() -> Iterator[PostfixInstance]:
    """The receiving MTA: a private Postfix in haproxy mode, relaying for loopback."""
    if POSTFIX is None:
        pytest.skip("postfix is not installed")
    with postfix_instance(upstream_proxy="haproxy", mynetworks="127.0.0.0/8") as pf:
        yield pf


def sent_by_postfix(pf: PostfixInstance, rcpt: str) -> int:
    """How many messages to `rcpt` the receiving Postfix has accepted and discarded."""
    return len(
        re.findall(
            rf"postfix/discard\[\d+\]: \w+: to=<{re.escape(rcpt)}>, .*status=sent", pf.log_text()
        )
    )


def no_early_talkers(syslog: SyslogUDP) -> None:
    syslog.drain()
    assert syslog.named("early-talker") == [], [m.fields for m in syslog.named("early-talker")]


@needs_postfix
def test_smtplib_reads_one_greeting_and_delivers(
    postfix: PostfixInstance, syslog: SyslogUDP
) -> None:
    rcpt = "smtplib@example.com"
    with running_repeld(*teasing(postfix.port, syslog)) as rd:
        smtp = smtplib.SMTP(timeout=TIMEOUT, local_hostname="client.test")
        try:
            code, banner = smtp.connect(*rd.address)
            # smtplib joins the lines of a reply with \n: the teaser's text, then Postfix's.
            assert code == 220, banner
            first, second = banner.split(b"\n")
            assert first == TEXT.encode()
            assert second.endswith(b"ESMTP postfix-behind-repeld"), banner
            assert smtp.sendmail(MAIL_FROM, [rcpt], MESSAGE) == {}
            smtp.quit()
        finally:
            smtp.close()
        assert wait_for(lambda: sent_by_postfix(postfix, rcpt) == 1, TIMEOUT)
        (passed,) = syslog.wait_for("pass")
        assert passed.fields["reason"] == "delay"
        (end,) = syslog.wait_for("relay-end")
        # bytes_to_client counts what Postfix sent, from its greeting on, never the teaser.
        assert int(end.fields["bytes_to_client"]) > 0
    no_early_talkers(syslog)


@needs_postfix
@pytest.mark.skipif(SMTP_SOURCE is None, reason="Postfix's smtp-source is not installed")
def test_smtp_source_delivers(postfix: PostfixInstance, syslog: SyslogUDP) -> None:
    rcpt = "smtp-source@example.com"
    assert SMTP_SOURCE is not None
    with running_repeld(*teasing(postfix.port, syslog)) as rd:
        host, port = rd.address
        proc = subprocess.run(
            [SMTP_SOURCE, "-c", "-s", "3", "-m", "3", "-M", "client.test",
             "-f", MAIL_FROM, "-t", rcpt, f"{host}:{port}"],
            capture_output=True, text=True, timeout=TIMEOUT * 2, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "fatal" not in proc.stderr and "warning" not in proc.stderr, proc.stderr
        assert wait_for(lambda: sent_by_postfix(postfix, rcpt) == 3, TIMEOUT), postfix.log_text()
        assert len(syslog.wait_for("pass", 3)) == 3
    no_early_talkers(syslog)


@needs_postfix
@pytest.mark.skipif(SWAKS is None, reason="swaks is not installed")
def test_swaks_delivers(postfix: PostfixInstance, syslog: SyslogUDP) -> None:
    rcpt = "swaks@example.com"
    assert SWAKS is not None
    with running_repeld(*teasing(postfix.port, syslog)) as rd:
        host, port = rd.address
        proc = subprocess.run(
            [SWAKS, "--server", host, "--port", str(port), "--helo", "client.test",
             "--from", MAIL_FROM, "--to", rcpt, "--timeout", str(int(TIMEOUT))],
            capture_output=True, text=True, timeout=TIMEOUT * 2, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        # swaks prints what it read: both lines of the greeting, as one reply.
        assert f"<-  220-{TEXT}" in proc.stdout, proc.stdout
        assert re.search(r"<-  220 \S+ ESMTP postfix-behind-repeld", proc.stdout), proc.stdout
        assert wait_for(lambda: sent_by_postfix(postfix, rcpt) == 1, TIMEOUT), postfix.log_text()
    no_early_talkers(syslog)


@contextlib.contextmanager
def sending_postfix(relay_port: int) -> Iterator[PostfixInstance]:
    """A second private Postfix whose smtp(8) sends everything to [127.0.0.1]:relay_port."""
    with postfix_instance(upstream_proxy="", mynetworks="127.0.0.0/8") as pf:
        conf = str(pf.config_dir)
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        for setting in (
            f"relayhost=[127.0.0.1]:{relay_port}",
            "default_transport=smtp",
            "smtp_connect_timeout=10s",
            "smtp_helo_timeout=60s",
        ):
            subprocess.run(
                ["postconf", "-c", conf, "-e", setting], check=True, env=env, timeout=TIMEOUT
            )
        assert POSTFIX is not None
        subprocess.run([POSTFIX, "-c", conf, "reload"], check=True, env=env, timeout=TIMEOUT,
                       capture_output=True)  # fmt: skip
        yield pf


@needs_postfix
@pytest.mark.skipif(SENDMAIL is None, reason="Postfix's sendmail is not installed")
def test_postfix_smtp_client_delivers(postfix: PostfixInstance, syslog: SyslogUDP) -> None:
    rcpt = "postfix-smtp@example.com"
    assert SENDMAIL is not None
    # The repeld port is chosen first, so the sender's relayhost can name it.
    port = free_port()
    args = teasing(postfix.port, syslog)
    args[1] = f"127.0.0.1:{port}"
    with running_repeld(*args), sending_postfix(port) as sender:
        env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
        subprocess.run(
            [SENDMAIL, "-C", str(sender.config_dir), "-f", MAIL_FROM, rcpt],
            input=MESSAGE.replace(b"\r\n", b"\n"), check=True, env=env, timeout=TIMEOUT,
        )  # fmt: skip
        line = sender.wait_log(
            rf"postfix/smtp\[\d+\]: \w+: to=<{re.escape(rcpt)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{port},.*",
            timeout=TIMEOUT * 2,
        )[0]
        assert "status=sent" in line, sender.log_text()
        assert wait_for(lambda: sent_by_postfix(postfix, rcpt) == 1, TIMEOUT), postfix.log_text()
        # Postfix's smtp(8) found nothing odd in the greeting.
        assert not re.search(r"postfix/smtp\[\d+\]: warning", sender.log_text()), sender.log_text()
    no_early_talkers(syslog)


@pytest.mark.parametrize("multi_line", [False, True], ids=["one-line-banner", "multi-line-banner"])
def test_exim_delivers_to_exim(syslog: SyslogUDP, multi_line: bool) -> None:
    """A sending Exim through repeld --teaser to an Exim, whose own greeting may
    itself be several lines: still one valid reply after the teaser."""
    exim = require_exim()
    banner = "server.test ESMTP one\\nsecond line\\nthird line" if multi_line else None
    with (
        exim_server(exim, hosts_proxy="127.0.0.1", banner=banner) as server,
        running_repeld(*teasing(server.port, syslog)) as rd,
    ):
        if multi_line:  # what a client reads: the teaser, then Exim's three lines
            smtp = smtplib.SMTP(timeout=TIMEOUT, local_hostname="client.test")
            try:
                code, text = smtp.connect(*rd.address)
                smtp.quit()
            finally:
                smtp.close()
            assert code == 220
            assert text.split(b"\n") == [
                TEXT.encode(),
                b"server.test ESMTP one",
                b"second line",
                b"third line",
            ]
        # An Exim that would pipeline before the greeting once it saw PIPECONNECT:
        # the filter still finds Exim's greeting first and takes PIPECONNECT out,
        # so the second message is not early-pipelined (and not cut off) either.
        with exim_client(exim, rd.address[1], pipe_connect=True) as client:
            for _ in range(2):
                message_id = client.send()
                (delivery,) = client.deliveries(message_id)
                assert delivery.status == "delivered", client.log_text() + server.log_text()
                assert not delivery.early_pipelining, client.log_text()
        assert len(server.wait_messages(2)) == 2
    no_early_talkers(syslog)


def test_an_unreachable_backend_after_the_teaser_is_a_421_to_smtplib(syslog: SyslogUDP) -> None:
    """The 421 follows a 220- line; smtplib, like other clients, goes by the last line."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = closed.getsockname()[1]  # bound, never listening: connection refused
        with running_repeld(*teasing(dead, syslog)) as rd:
            smtp = smtplib.SMTP(timeout=TIMEOUT, local_hostname="client.test")
            try:
                code, text = smtp.connect(*rd.address)
            finally:
                smtp.close()
            assert code == 421
            assert text.split(b"\n") == [
                TEXT.encode(),
                b"4.3.2 Service temporarily unavailable, try again later",
            ]
            (ev,) = syslog.wait_for("backend-error")
            assert ev.fields["backend"] == f"127.0.0.1:{dead}"

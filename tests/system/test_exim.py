"""A real Exim on both sides of repeld: early pipelining must not cost a message
(issue 9, "No false positives").

Exim 4.94+ advertises PIPECONNECT in its EHLO reply. A sending Exim with
`hosts_pipe_connect` remembers that reply and, on its next connection to the
same address and port, sends EHLO, MAIL, RCPT and (CHUNKING) the message before
the banner. In front of an Exim, repeld passes such a sender the first time
after the delay and remembers it; the second time the sender talks at once, and
repeld must let the pass cache answer before it judges those bytes.

The fixture itself is proved first, without repeld: the second connection of
the sending Exim is early-pipelined. See tests/exim_fixture.py.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

import pytest

from ..exim_fixture import EximClient, EximServer, exim_client, exim_server, require_exim
from ..procs import Daemon as Repeld
from ..procs import SyslogUDP

#: A short greeting delay: the first message waits it out.
DELAY = 2.0


@contextlib.contextmanager
def running_repeld(*args: str) -> Iterator[Repeld]:
    """repeld listening on a free loopback port (`.address`), with an empty
    configuration file whatever /etc holds; stopped and checked afterwards."""
    fd, config = tempfile.mkstemp(prefix="repeld-exim-", suffix=".toml")
    os.close(fd)
    user = ["--user", "nobody"] if os.geteuid() == 0 else []
    try:
        proc = Repeld(["--config", config, "--listen", "127.0.0.1:0", *user, *args])
        try:
            proc.wait_listening()
            yield proc
        finally:
            status = proc.stop()
    finally:
        os.unlink(config)
    assert not proc.killed, "repeld did not exit on SIGTERM:\n" + proc.stderr_text()
    assert status == 0, f"repeld exited {status}:\n" + proc.stderr_text()
    assert "Traceback" not in proc.stderr_text(), proc.stderr_text()


def story(client: EximClient, server: EximServer, rd: Repeld | None = None) -> str:
    """What each party logged, for an assertion message."""
    text = f"\n-- sending exim {client.mainlog}:\n{client.log_text()}"
    text += f"\n-- receiving exim {server.mainlog}:\n{server.log_text()}"
    if rd is not None:
        text += f"\n-- repeld:\n{rd.stderr_text()}"
    return text


def test_the_second_connection_of_a_sending_exim_is_early_pipelined() -> None:
    """The fixture, without repeld: Exim to Exim, two messages, the first
    connection learns PIPECONNECT and the second uses it."""
    exim = require_exim()
    with exim_server(exim) as server, exim_client(exim, server.port) as client:
        first = client.send()
        (d1,) = client.deliveries(first)
        assert d1.status == "delivered", story(client, server)
        assert not d1.early_pipelining, story(client, server)
        assert client.ehlo_cache_keys() == [f"127.0.0.1:{server.port}.EHLO"]

        second = client.send()
        (d2,) = client.deliveries(second)
        assert d2.status == "delivered", story(client, server)
        assert d2.early_pipelining, "no L* on the second delivery:" + story(client, server)

        assert len(server.wait_messages(2)) == 2
        accepted = server.accepted()
        assert len(accepted) == 2, story(client, server)
        # L. = PIPECONNECT offered but not used, L* = used
        assert " L. " in accepted[0] and " L* " in accepted[1], story(client, server)


def test_without_hosts_pipe_connect_the_sender_waits_for_the_banner() -> None:
    """The control case: the same two messages without early pipelining."""
    exim = require_exim()
    with exim_server(exim) as server, exim_client(exim, server.port, pipe_connect=False) as client:
        for _ in range(2):
            (d,) = client.deliveries(client.send())
            assert d.status == "delivered" and not d.early_pipelining, story(client, server)
        assert len(server.wait_messages(2)) == 2


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_patient_exim_reaches_exim_behind_repeld_with_proxy(
    syslog: SyslogUDP, version: str
) -> None:
    """The first connection through repeld: passed after the delay and relayed to
    an Exim that reads the PROXY header (hosts_proxy), which accepts the message
    and offers PIPECONNECT; repeld's EHLO filter keeps it from the sender, which
    so caches no EHLO reply to pipeline with."""
    exim = require_exim()
    with exim_server(exim, hosts_proxy="127.0.0.1") as server, running_repeld(
        "--backend", server.address,
        "--delay", str(DELAY),
        "--cache", "memory",
        "--proxy-protocol", version,
        "--syslog", syslog.target,
    ) as rd, exim_client(exim, rd.address[1]) as client:  # fmt: skip
        (d,) = client.deliveries(client.send())
        assert d.status == "delivered", story(client, server, rd)
        assert not d.early_pipelining
        (passed,) = syslog.wait_for("pass")
        assert passed.fields["reason"] == "delay"
        assert float(passed.fields["elapsed"]) >= DELAY
        assert len(server.wait_messages(1)) == 1
        (accepted,) = server.accepted()
        # PRX= is the proxy that sent the header; the client port is the sender's own.
        assert " PRX=127.0.0.1 " in accepted and " L. " in accepted, story(client, server, rd)
        assert f"[127.0.0.1]:{passed.fields['client_port']} " in accepted
        assert client.ehlo_cache_keys() == [], story(client, server, rd)


@pytest.mark.parametrize("on_early", ["drop", "reject"])
def test_an_early_pipelining_exim_loses_no_message_behind_repeld(
    syslog: SyslogUDP, on_early: str
) -> None:
    """Two messages from a sending Exim with hosts_pipe_connect through repeld to
    an Exim: both delivered at the first attempt. The first connection waits out
    the delay; the second is early-pipelined and must be passed by the cache.
    `--keep-pipe-connect` lets the Exim learn PIPECONNECT through repeld, as one
    that learned it before repeld stood in front of the MTA would have.

    Before the hold waited for the pass cache, repeld cut the second connection
    off as an early talker: with `drop` the sender deferred ("Remote host closed
    connection in response to pipelined end of data"), with `reject` the 554 was
    taken as a permanent refusal of the message and it bounced.
    """
    exim = require_exim()
    with exim_server(exim, hosts_proxy="127.0.0.1") as server, running_repeld(
        "--backend", server.address,
        "--delay", str(DELAY),
        "--cache", "memory",
        "--proxy-protocol", "v1",
        "--on-early", on_early,
        "--keep-pipe-connect",
        "--syslog", syslog.target,
    ) as rd, exim_client(exim, rd.address[1]) as client:  # fmt: skip
        first = client.send()
        second = client.send()
        attempts = client.deliveries(first) + client.deliveries(second)
        assert [d.status for d in attempts] == ["delivered", "delivered"], story(client, server, rd)
        assert [d.early_pipelining for d in attempts] == [False, True], story(client, server, rd)
        # and no bounce
        assert {d.message_id for d in client.deliveries()} == {first, second}
        assert len(server.wait_messages(2)) == 2
        passes = syslog.wait_for("pass", count=2)
        assert [p.fields["reason"] for p in passes] == ["delay", "cache"]
        syslog.drain()
        assert syslog.named("early-talker") == [], story(client, server, rd)
        assert " L* " in server.accepted()[1], story(client, server, rd)


def test_behind_repeld_exim_never_learns_to_pipeline_early(syslog: SyslogUDP) -> None:
    """With the default EHLO filter the sending Exim never sees PIPECONNECT: its
    second connection waits for the banner like the first, and both are delivered
    (the second passed at once by the cache)."""
    exim = require_exim()
    with exim_server(exim, hosts_proxy="127.0.0.1") as server, running_repeld(
        "--backend", server.address,
        "--delay", str(DELAY),
        "--cache", "memory",
        "--proxy-protocol", "v1",
        "--on-early", "reject",
        "--syslog", syslog.target,
    ) as rd, exim_client(exim, rd.address[1]) as client:  # fmt: skip
        first = client.send()
        second = client.send()
        attempts = client.deliveries(first) + client.deliveries(second)
        assert [d.status for d in attempts] == ["delivered", "delivered"], story(client, server, rd)
        assert [d.early_pipelining for d in attempts] == [False, False], story(client, server, rd)
        assert len(server.wait_messages(2)) == 2
        passes = syslog.wait_for("pass", count=2)
        assert [p.fields["reason"] for p in passes] == ["delay", "cache"]
        assert [p.fields["early_bytes"] for p in passes] == ["0", "0"]
        syslog.drain()
        assert syslog.named("early-talker") == [], story(client, server, rd)
        assert all(" L* " not in line for line in server.accepted()), story(client, server, rd)


def test_an_exim_enforced_by_mistake_defers_and_delivers_on_retry(syslog: SyslogUDP) -> None:
    """An Exim that learned PIPECONNECT before repeld stood in front of its peer
    (--keep-pipe-connect stands for that) and that the pass cache does not know
    talks early; --on-early enforce refuses its recipients. A permanent 550
    bounced its message; the temporary refusal defers it, and Exim's retry,
    which no longer pipelines early, is delivered."""
    exim = require_exim()
    with exim_server(exim, hosts_proxy="127.0.0.1") as server, running_repeld(
        "--backend", server.address,
        "--delay", str(DELAY),
        "--no-cache",
        "--proxy-protocol", "v1",
        "--on-early", "enforce",
        "--keep-pipe-connect",
        "--syslog", syslog.target,
    ) as rd, exim_client(exim, rd.address[1]) as client:  # fmt: skip
        client.send()  # patient: delivered, and PIPECONNECT learned
        second = client.send()  # early: enforced
        (first_try,) = client.deliveries(second)
        assert first_try.status == "deferred", story(client, server, rd)  # not "failed"
        client.retry(second)
        attempts = client.deliveries(second)
        assert [d.status for d in attempts] == ["deferred", "delivered"], story(client, server, rd)
        assert not attempts[1].early_pipelining, story(client, server, rd)  # waited this time
        assert " <= <> " not in client.log_text(), story(client, server, rd)  # no bounce
        (enforced,) = syslog.wait_for("early-talker")
        assert enforced.fields["action"] == "enforce"

"""DNS lists against a real DNS server: NSD on loopback, serving test zones.

repeld runs as a subprocess with `--resolver` pointing at a small counting UDP
forwarder in front of NSD, so the tests can see how many queries reached the
server, and so that one list (`silent.test`) never answers: the forwarder reads
its queries and drops them. Clients connect from distinct 127.0.0.x sources,
which the zones list or not (tests/nsd_fixture.py has the table).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest

from ..nsd_fixture import NSD, Forwarder, dns_server
from ..procs import Daemon, LineBackend, SyslogUDP, connect, read_line

#: As root, repeld drops to nobody: the resolver is made before the drop.
USER = ["--user", "nobody"] if os.geteuid() == 0 else []
pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(NSD is None, reason="nsd is not installed (apt-get install nsd)"),
]


@pytest.fixture(scope="module")
def resolver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forwarder]:
    with dns_server(tmp_path_factory.mktemp("nsd")) as forwarder:
        yield forwarder


def _repeld(
    resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP, delay: float, *lists: str
) -> Daemon:
    d = Daemon(
        [
            "--listen", "127.0.0.1:0",
            "--backend", backend.address,
            "--proxy-protocol", "none",
            *USER,
            "--delay", str(delay),
            "--resolver", f"127.0.0.1:{resolver.port}",
            "--syslog", syslog.target,
            *lists,
        ]
    )  # fmt: skip
    d.wait_listening()
    return d


def _greeting(port: int, source: str) -> tuple[bytes, float]:
    """The first line a client from `source` hears, and after how long."""
    started = time.monotonic()
    with connect(port, source) as sock:
        try:
            line = read_line(sock, timeout=20.0)
        except ConnectionResetError:
            line = b""
    return line, time.monotonic() - started


def _event(syslog: SyslogUDP, name: str, client: str) -> dict[str, str]:
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        for m in syslog.named(name):
            if m.fields.get("client") == client:
                return m.fields
        syslog.drain(0.1)
    raise AssertionError(f"no {name} event for {client}: {[m.fields for m in syslog.messages]}")


def test_an_allow_listed_client_is_greeted_at_once(
    resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP
) -> None:
    d = _repeld(resolver, backend, syslog, 10.0, "--dnswl", "wl.test", "--dnsbl", "bl.test")
    try:
        line, elapsed = _greeting(d.address[1], "127.0.0.4")
    finally:
        d.stop()
    assert line == b"220 backend.test ESMTP\r\n"
    assert elapsed < 5.0  # well before the 10 s delay
    fields = _event(syslog, "pass", "127.0.0.4")
    assert (fields["reason"], fields["score"], fields["lists"]) == ("dnswl", "-1", "wl.test")


@pytest.mark.parametrize("action", ["reject", "drop"])
def test_a_block_listed_client_meets_the_action(
    resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP, action: str
) -> None:
    d = _repeld(resolver, backend, syslog, 10.0, "--dnsbl", "bl.test", "--dnsbl-action", action)
    try:
        line, elapsed = _greeting(d.address[1], "127.0.0.2")
    finally:
        d.stop()
    assert elapsed < 5.0
    if action == "reject":
        assert line == (
            b"554 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test\r\n"
        )
    else:
        assert line == b""  # closed (reset) without a word
    fields = _event(syslog, "dnsbl", "127.0.0.2")
    assert (fields["score"], fields["lists"], fields["action"]) == ("1", "bl.test", action)
    assert not [m for m in syslog.named("pass") if m.fields.get("client") == "127.0.0.2"]


def test_action_delay_holds_a_listed_client_for_the_dnsbl_delay(
    resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP
) -> None:
    d = _repeld(
        resolver, backend, syslog, 1.0,
        "--dnsbl", "bl.test", "--dnsbl-action", "delay", "--dnsbl-delay", "3",
    )  # fmt: skip
    try:
        line, elapsed = _greeting(d.address[1], "127.0.0.2")
    finally:
        d.stop()
    assert line == b"220 backend.test ESMTP\r\n"
    assert elapsed >= 3.0
    assert _event(syslog, "dnsbl", "127.0.0.2")["action"] == "delay"
    assert float(_event(syslog, "pass", "127.0.0.2")["elapsed"]) >= 3.0


def test_filters_and_weights(resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP) -> None:
    d = _repeld(
        resolver, backend, syslog, 1.0,
        "--dnsbl", "bl.test=127.0.0.2", "--dnswl", "wl.test*2", "--dnsbl-action", "reject",
    )  # fmt: skip
    try:
        # 127.0.0.3's answer 127.0.0.3 is outside the filter: held, then passed.
        filtered, _ = _greeting(d.address[1], "127.0.0.3")
        # 127.0.0.5 is on both: +1 -2 = -1, allowed at once.
        both, elapsed = _greeting(d.address[1], "127.0.0.5")
    finally:
        d.stop()
    assert filtered == both == b"220 backend.test ESMTP\r\n"
    fields = _event(syslog, "pass", "127.0.0.3")
    assert (fields["reason"], fields["score"], fields["lists"]) == ("delay", "0", "")
    fields = _event(syslog, "pass", "127.0.0.5")
    assert (fields["reason"], fields["score"], fields["lists"]) == (
        "dnswl",
        "-1",
        "bl.test,wl.test",
    )
    assert elapsed < 1.0 + 0.5
    assert syslog.named("dnsbl") == []


def test_a_silent_list_costs_no_wait(
    resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP
) -> None:
    d = _repeld(resolver, backend, syslog, 1.0, "--dnsbl", "silent.test", "--dns-timeout", "5")
    try:
        line, _ = _greeting(d.address[1], "127.0.0.2")
    finally:
        d.stop()
    assert line == b"220 backend.test ESMTP\r\n"
    assert resolver.count("2.0.0.127.silent.test") >= 1  # it was asked
    fields = _event(syslog, "pass", "127.0.0.2")
    assert (fields["reason"], fields["score"]) == ("delay", "0")
    assert 1.0 <= float(fields["elapsed"]) < 1.3  # the delay, exactly as without lists


def test_answers_are_cached_for_their_ttl(
    resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP
) -> None:
    before = {n: resolver.count(n) for n in ("3.0.0.127.bl.test", "6.0.0.127.bl.test")}
    d = _repeld(resolver, backend, syslog, 0.5, "--dnsbl", "bl.test=127.0.0.2")
    try:
        for _ in range(3):
            assert _greeting(d.address[1], "127.0.0.3")[0] == b"220 backend.test ESMTP\r\n"
            assert _greeting(d.address[1], "127.0.0.6")[0] == b"220 backend.test ESMTP\r\n"
    finally:
        d.stop()
    # One query each for three connections: an A answer (TTL 300 s), NXDOMAIN (60 s).
    assert {n: resolver.count(n) - k for n, k in before.items()} == {
        "3.0.0.127.bl.test": 1,
        "6.0.0.127.bl.test": 1,
    }
    stop = syslog.wait_for("stop", timeout=10.0)[0].fields
    assert (stop["dns_lookups"], stop["dns_cached"], stop["dns_timeouts"]) == ("2", "4", "0")


def test_an_ipv6_client_is_looked_up_by_its_nibbles(
    resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP
) -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no ::1 here")
    d = Daemon(
        [
            "--listen", "[::1]:0",
            "--backend", backend.address,
            "--proxy-protocol", "none",
            *USER,
            "--delay", "10",
            "--resolver", f"127.0.0.1:{resolver.port}",
            "--syslog", syslog.target,
            "--dnsbl", "bl.test", "--dnsbl-action", "reject",
        ]
    )  # fmt: skip
    try:
        d.wait_listening()
        with connect(d.address[1], host="::1") as sock:
            line = read_line(sock, timeout=20.0)
    finally:
        d.stop()
    assert line == b"554 5.7.1 Service unavailable; client [::1] blocked using bl.test\r\n"
    assert _event(syslog, "dnsbl", "::1")["score"] == "1"

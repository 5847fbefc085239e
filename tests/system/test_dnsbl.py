"""DNS lists against a real DNS server: NSD on loopback, serving test zones.

repeld runs as a subprocess with `--resolver` pointing at a small counting UDP
forwarder in front of NSD, so the tests can see how many queries reached the
server, and so that one list (`silent.test`) never answers: the forwarder reads
its queries and drops them. Clients connect from distinct 127.0.0.x sources,
which the zones list or not (tests/nsd_fixture.py has the table).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from repeld.shell.dnslookup import SOCKETS, TRIES

from ..nsd_fixture import NSD, Forwarder, dns_server
from ..procs import Daemon, LineBackend, SyslogUDP, connect, read_line, wait_for

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
    # Allowed as soon as the answers settle it (issue 21): wl.test's -2 alone does,
    # as bl.test's +1 could only make it -1. Which list's answer comes first is the
    # resolver's order, and the event says exactly what was known.
    assert (fields["reason"], fields["score"], fields["lists"], fields["unanswered"]) in (
        ("dnswl", "-1", "bl.test,wl.test", ""),
        ("dnswl", "-2", "wl.test", "bl.test"),
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
    # Not "not listed": no answer, and the event says so.
    assert (fields["reason"], fields["score"], fields["unanswered"]) == (
        "delay",
        "0",
        "silent.test",
    )
    assert 1.0 <= float(fields["elapsed"]) < 1.3  # the delay, exactly as without lists


def test_a_silent_list_does_not_cancel_the_others(
    resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP
) -> None:
    """Issue 21: with -d 2 and a list that never answers, a client listed on the
    other list was passed after 2 s; one allowed waited for the silent list.
    Now each is judged as soon as the answers settle it, and a client the lists
    cannot settle is judged at the end of its delay by the answers received."""
    d = _repeld(
        resolver, backend, syslog, 2.0,
        "--dnsbl", "bl.test=127.0.0.2", "--dnsbl", "silent.test", "--dnswl", "wl.test*5",
        "--dnsbl-action", "reject", "--dns-timeout", "5",
    )  # fmt: skip
    try:
        blocked, blocked_after = _greeting(d.address[1], "127.0.0.2")  # listed: 1 + (0..1)
        allowed, allowed_after = _greeting(d.address[1], "127.0.0.4")  # allowed: -5 + (0..2)
    finally:
        d.stop()
    assert blocked == b"554 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test\r\n"
    assert allowed == b"220 backend.test ESMTP\r\n"
    assert blocked_after < 1.5 and allowed_after < 1.5  # neither waited for silent.test
    fields = _event(syslog, "dnsbl", "127.0.0.2")
    assert (fields["score"], fields["lists"]) == ("1", "bl.test")
    fields = _event(syslog, "pass", "127.0.0.4")
    assert (fields["reason"], fields["score"]) == ("dnswl", "-5")
    assert "silent.test" in fields["unanswered"]


def test_at_the_end_of_the_delay_the_answers_received_decide(
    resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP
) -> None:
    """A silent allow list could still undo the block-list's listing, so the
    outcome is not settled; at the end of the delay the answers received decide
    (postscreen at the end of its greet wait): blocked, the silent list named."""
    d = _repeld(
        resolver, backend, syslog, 1.0,
        "--dnsbl", "bl.test", "--dnswl", "silent.test", "--dnsbl-action", "reject",
        "--dns-timeout", "5",
    )  # fmt: skip
    try:
        line, elapsed = _greeting(d.address[1], "127.0.0.2")
    finally:
        d.stop()
    assert line == b"554 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test\r\n"
    assert 1.0 <= elapsed < 2.0  # the delay, not --dns-timeout
    assert _event(syslog, "dnsbl", "127.0.0.2")["lists"] == "bl.test"


def test_a_client_the_allow_list_passed_is_not_remembered_as_patient(
    resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP
) -> None:
    """Passed at once by an allow list, a client has shown no patience: the pass
    cache does not learn it, so it comes back as a newcomer the lists allow again."""
    d = _repeld(resolver, backend, syslog, 10.0, "--dnswl", "wl.test", "--cache", "memory")
    try:
        for _ in range(2):
            line, elapsed = _greeting(d.address[1], "127.0.0.4")
            assert (line, elapsed < 5.0) == (GREETING, True)
    finally:
        d.stop()
    syslog.wait_for("stop", timeout=10.0)
    passes = [m.fields["reason"] for m in syslog.named("pass") if m.fields["client"] == "127.0.0.4"]
    assert passes == ["dnswl", "dnswl"]  # never "cache"


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


def _reply(port: int, source: str) -> tuple[list[bytes], float]:
    """Every line a client from `source` hears up to the last line of the greeting
    (or the end), and after how long that came."""
    started = time.monotonic()
    lines: list[bytes] = []
    with connect(port, source) as sock:
        try:
            while not lines or lines[-1][3:4] == b"-":
                line = read_line(sock, timeout=20.0)
                if not line:
                    break
                lines.append(line)
        except ConnectionResetError:
            pass
    return lines, time.monotonic() - started


TEASER = b"220-mx.test teaser\r\n"
GREETING = b"220 backend.test ESMTP\r\n"
REJECTED = b"554 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test\r\n"


@pytest.mark.parametrize(
    ("action", "first", "again"),
    [
        # The first connection hears the teaser as its hold begins, before the
        # lists have answered; the second is judged at accept, from the cache.
        ("reject", [TEASER, REJECTED], [REJECTED]),
        ("drop", [TEASER], []),
        ("log", [TEASER, GREETING], [TEASER, GREETING]),
        ("delay", [TEASER, GREETING], [TEASER, GREETING]),
    ],
)
def test_a_client_seen_again_is_judged_at_accept_from_the_cached_score(
    resolver: Forwarder,
    backend: LineBackend,
    syslog: SyslogUDP,
    action: str,
    first: list[bytes],
    again: list[bytes],
) -> None:
    names = ("2.0.0.127.bl.test", "2.0.0.127.wl.test", "4.0.0.127.bl.test", "4.0.0.127.wl.test")
    before = {n: resolver.count(n) for n in names}
    d = _repeld(
        resolver, backend, syslog, 1.0,
        "--dnsbl", "bl.test", "--dnswl", "wl.test",
        "--dnsbl-action", action, "--dnsbl-delay", "2",
        "--teaser", "--teaser-text", "mx.test teaser",
    )  # fmt: skip
    try:
        heard = [_reply(d.address[1], "127.0.0.2") for _ in range(2)]
        allowed = [_reply(d.address[1], "127.0.0.4") for _ in range(2)]
    finally:
        d.stop()
    assert [lines for lines, _ in heard] == [first, again]
    # 127.0.0.4 is on the allow list: greeted at once, the second time untouched
    # by the teaser too.
    assert [lines for lines, _ in allowed] == [[TEASER, GREETING], [GREETING]]
    assert all(elapsed < 1.0 for _, elapsed in allowed)
    if action == "delay":
        assert all(elapsed >= 2.0 for _, elapsed in heard)
    stop = syslog.wait_for("stop", timeout=10.0)[0].fields
    blocked = [m.fields for m in syslog.named("dnsbl") if m.fields.get("client") == "127.0.0.2"]
    assert [(f["action"], f["score"], f["lists"]) for f in blocked] == [
        (action, "1", "bl.test")
    ] * 2
    passed = [m.fields for m in syslog.named("pass") if m.fields.get("client") == "127.0.0.4"]
    assert [(f["reason"], f["score"], f["lists"]) for f in passed] == [
        ("dnswl", "-1", "wl.test")
    ] * 2
    # One query per list and address; the second connections cost none.
    assert {n: resolver.count(n) - k for n, k in before.items()} == dict.fromkeys(names, 1)
    assert (stop["dns_lookups"], stop["dns_cached"]) == ("4", "4")


def test_a_silent_list_never_takes_a_descriptor_per_client(
    resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP
) -> None:
    """With a socket per query, a list that never answers would spend a
    descriptor per held client until --dns-timeout. The queries share a few
    sockets (shell/dnslookup.py SOCKETS), and the other list answers every
    client meanwhile."""
    clients = 300
    d = _repeld(
        resolver, backend, syslog, 20.0,
        "--dnsbl", "silent.test", "--dnsbl", "bl.test", "--dns-timeout", "10",
    )  # fmt: skip
    names = [f"{n % 250 + 1}.{n // 250}.2.127" for n in range(clients)]
    before = {n: resolver.count(f"{n}.silent.test") for n in names}
    socks = []
    try:
        for n in range(clients):
            socks.append(connect(d.address[1], f"127.2.{n // 250}.{n % 250 + 1}"))
        asked = wait_for(lambda: all(resolver.count(f"{n}.bl.test") for n in names), 20.0)
        assert asked, "the other list was held up by the silent one"
        fds = len(os.listdir(f"/proc/{d.pid}/fd"))
        silent = sum(resolver.count(f"{n}.silent.test") - k for n, k in before.items())
    finally:
        for sock in socks:
            sock.close()
        d.stop()
    # Every client asked once, maybe twice (again at half --dns-timeout) ...
    assert clients <= silent <= TRIES * clients
    # ... over a few sockets: the held ones, the queries', and what repeld has open
    # anyway (listener, pen, syslog, ...): far from a socket per query.
    assert clients <= fds < clients + SOCKETS + 40


def test_a_block_list_outranks_a_remembered_pass(
    resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP, tmp_path: Path
) -> None:
    """A client that waited once is remembered as patient; when it comes back and
    the lists' score is known at accept (cached), the cache skips its delay, not
    the lists: the block list's action meets it (repeld(8), "DNS lists")."""
    config = tmp_path / "repeld.toml"
    config.write_text('dnsbl-action = "log"\n')
    # As root it stays root: a reload rereads the file, which nobody could not read here.
    as_root = ["--user", "root"] if os.geteuid() == 0 else []
    d = _repeld(
        resolver, backend, syslog, 1.0,
        "-c", str(config), "--dnsbl", "bl.test", "--cache", "memory", *as_root,
    )  # fmt: skip
    try:
        # Listed, but only written down: it waits the delay and is remembered.
        first, waited = _greeting(d.address[1], "127.0.0.2")
        assert (first, waited >= 1.0) == (GREETING, True)
        config.write_text('dnsbl-action = "reject"\n')
        d.signal(signal.SIGHUP)
        syslog.wait_for("reload", timeout=10.0)
        # Back again: the block list's score is known at accept, the cache says
        # patient, and the list wins, as in postscreen.
        again, elapsed = _greeting(d.address[1], "127.0.0.2")
        # A listed newcomer meets the new action.
        newcomer, _ = _greeting(d.address[1], "127.0.0.3")
    finally:
        d.stop()
    assert again == REJECTED and elapsed < 0.9
    syslog.wait_for("stop", timeout=10.0)  # every event is in
    assert newcomer == REJECTED.replace(b"0.2]", b"0.3]")
    passes = [m.fields for m in syslog.named("pass") if m.fields.get("client") == "127.0.0.2"]
    assert [(f["reason"], f["score"], f["lists"]) for f in passes] == [("delay", "1", "bl.test")]
    blocked = [(m.fields["client"], m.fields["action"]) for m in syslog.named("dnsbl")]
    assert blocked == [("127.0.0.2", "log"), ("127.0.0.2", "reject"), ("127.0.0.3", "reject")]


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and util-linux's unshare (a private mount of /etc/resolv.conf)",
)
@pytest.mark.parametrize(
    "resolv_conf",
    ["search example.org\n", "nameserver https://dns.example/dns-query\n"],
    ids=["no-nameserver", "only-doh"],
)
def test_no_nameserver_for_the_lists_is_one_line_and_no_start(
    tmp_path: Path, resolv_conf: str
) -> None:
    # A container's resolv.conf with no nameserver line: a traceback once; one
    # naming only DNS over HTTPS: a start whose every lookup failed unseen.
    conf = tmp_path / "resolv.conf"
    conf.write_text(resolv_conf)
    script = (
        f"mount --bind {shlex.quote(str(conf))} /etc/resolv.conf && exec "
        + shlex.join([sys.executable, "-m", "repeld", "-f", "--user", "nobody"])
        + " -l 127.0.0.1:0 -b 127.0.0.1:9 --dnsbl bl.test"
    )
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", script],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        "repeld: the DNS lists have no server to ask: /etc/resolv.conf names no nameserver;"
        " name one with --resolver"
    ]

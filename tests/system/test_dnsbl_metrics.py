"""The DNS lists' counters in --metrics, and DNS lists under --workers 2.

A real repeld subprocess asks three lists through the counting forwarder in
front of a real NSD (tests/nsd_fixture.py): wl.test (allow), bl.test (block,
--dnsbl-action reject) and silent.test, which never answers, so every client
waits for --dns-timeout (1 s, under the 3 s delay) before the lists judge it.
Clients come from distinct loopback addresses: 127.0.0.4 is allow-listed,
127.0.0.2 block-listed, 127.0.0.6 on no list. A scrape of /metrics must say
what the forwarder counted (queries that reached the server) and what the
events said (who was listed where); under --workers each worker has its own
answer cache, so an address is asked once per list by each worker that meets it.
"""

from __future__ import annotations

import collections
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from repeld.shell.dnslookup import TRIES

from ..nsd_fixture import NSD, Forwarder, dns_server
from ..procs import LineBackend, SyslogUDP, connect, daemon, free_port, read_line, wait_for
from ..syslog_receiver import Received

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(NSD is None, reason="nsd is not installed (apt-get install nsd)"),
]

#: As root, repeld drops to nobody: the resolver is made before the drop.
USER = ["--user", "nobody"] if os.geteuid() == 0 else []
PROMTOOL = shutil.which("promtool")
DELAY = 3.0
LISTS = ("wl.test", "bl.test", "silent.test")
WL, BL, CLEAR = "127.0.0.4", "127.0.0.2", "127.0.0.6"
GREETING = b"220 backend.test ESMTP\r\n"
REJECTED = b"554 5.7.1 Service unavailable; client [127.0.0.2] blocked using bl.test\r\n"
RESULTS = ("listed", "clear", "timeout", "error", "cached")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def resolver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Forwarder]:
    with dns_server(tmp_path_factory.mktemp("nsd")) as forwarder:
        yield forwarder


def _args(
    resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP, mport: int, port: int = 0
) -> list[str]:
    return [
        "--listen", f"127.0.0.1:{port}",
        "--backend", backend.address,
        "--proxy-protocol", "none",
        *USER,
        "--delay", str(DELAY),
        "--resolver", f"127.0.0.1:{resolver.port}",
        "--dns-timeout", "1",
        "--dnswl", "wl.test",
        "--dnsbl", "bl.test",
        "--dnsbl", "silent.test",
        "--dnsbl-action", "reject",
        "--syslog", syslog.target,
        "--metrics", f"127.0.0.1:{mport}",
    ]  # fmt: skip


def _scrape(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body


def _samples(text: bytes) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def _dns(found: Samples) -> tuple[dict[str, float], dict[str, float]]:
    """repeld_dns_lookups_total by result and repeld_dns_hits_total by list (0 left out)."""
    lookups = {r: found.get(("repeld_dns_lookups_total", (("result", r),)), -1.0) for r in RESULTS}
    hits = {
        dict(labels)["list"]: n
        for (name, labels), n in found.items()
        if name == "repeld_dns_hits_total" and n
    }
    return lookups, hits


def _wait_scrape(port: int, done: str, want: float) -> Samples:
    """A scrape whose dns_lookups_total{result=done} has reached `want` (bounded)."""
    found: list[Samples] = []

    def reached() -> bool:
        found.insert(0, _samples(_scrape(port)))
        return _dns(found[0])[0][done] >= want

    wait_for(reached, 20.0, 0.1)
    return found[0]


def _gauge(port: int, name: str) -> float:
    return _samples(_scrape(port)).get((name, ()), -1.0)


def _open(port: int, sources: list[str]) -> list[socket.socket]:
    """Clients connected at once, one per source, before any is read."""
    return [connect(port, source) for source in sources]


def _first_line(sock: socket.socket) -> bytes:
    try:
        return read_line(sock, timeout=20.0)
    except ConnectionResetError:
        return b""


def _promtool(text: bytes) -> None:
    if PROMTOOL is None:
        return  # the scrape was checked field by field; the lint needs Debian's prometheus
    out = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout + out.stderr == b""


def _verdicts(syslog: SyslogUDP) -> list[Received]:
    """Each client's one verdict event: a pass, or a dnsbl (reject ends it)."""
    return [m for m in syslog.messages if m.event in ("pass", "dnsbl")]


def _hits_from_events(syslog: SyslogUDP) -> dict[str, float]:
    listed: collections.Counter[str] = collections.Counter()
    for m in _verdicts(syslog):
        listed.update(x for x in m.fields["lists"].split(",") if x)
    return dict(listed)


def test_the_dns_counters_match_the_forwarder_and_the_events(
    resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP
) -> None:
    mport = free_port()
    before = resolver.counts()
    with daemon(*_args(resolver, backend, syslog, mport)) as d:
        port = d.address[1]
        started = time.monotonic()
        # Two clients from CLEAR at once: the second shares the first's queries
        # (in flight, or just answered and cached).
        first = _open(port, [WL, BL, CLEAR, CLEAR])
        try:
            assert _first_line(first[0]) == GREETING  # allowed once silent.test timed out
            assert _first_line(first[1]) == REJECTED
            assert time.monotonic() - started < DELAY
            # The three addresses' silent.test queries have timed out: all asked.
            found = _wait_scrape(mport, "timeout", 3)
            lookups, hits = _dns(found)
            # 4 clients x 3 lists: 9 queries, and CLEAR's second client none.
            assert lookups == {"listed": 2, "clear": 4, "timeout": 3, "error": 0, "cached": 3}
            assert hits == {"wl.test": 1, "bl.test": 1}
            # CLEAR again, its first two still held: wl.test and bl.test from the
            # answer cache, silent.test (never cached) asked again.
            (again,) = _open(port, [CLEAR])
            try:
                assert [_first_line(s) for s in (first[2], first[3], again)] == [GREETING] * 3
                assert time.monotonic() - started >= DELAY
            finally:
                again.close()
        finally:
            for s in first:
                s.close()
        syslog.wait_for("pass", 4)
        syslog.wait_for("dnsbl", 1)
        syslog.drain(0.3)
        text = _scrape(mport)
        _promtool(text)
    lookups, hits = _dns(_samples(text))
    assert lookups == {"listed": 2, "clear": 4, "timeout": 4, "error": 0, "cached": 5}
    assert sum(lookups.values()) == 5 * len(LISTS)  # one answer per list and client
    # What the forwarder saw: the queries repeld counted, one per list and address,
    # and silent.test's once more for CLEAR; sent TRIES times (again at half
    # --dns-timeout) while its client waits for it: not BL's, blocked at once (bl.test
    # listed it, the silent list's weight cannot undo that); WL's does, as silent.test
    # could still take it from allowed to neither.
    asked = resolver.counts() - before
    silent = {"4.0.0.127": TRIES, "2.0.0.127": 1, "6.0.0.127": 2 * TRIES}
    assert asked == {
        f"{rev}.{domain}": (silent[rev] if domain == "silent.test" else 1)
        for rev in ("4.0.0.127", "2.0.0.127", "6.0.0.127")
        for domain in LISTS
    }
    sent = sum(lookups[r] for r in ("listed", "clear", "timeout", "error"))
    assert sum(asked.values()) == sent + 3 * (TRIES - 1)
    assert lookups["timeout"] == sum(1 for name in asked if "silent" in name) + 1
    # What the events said.
    assert hits == _hits_from_events(syslog) == {"wl.test": 1, "bl.test": 1}
    reasons = sorted(
        (m.fields["client"], m.event, m.fields["reason"]) for m in syslog.named("pass")
    )
    assert reasons == [(WL, "pass", "dnswl")] + [(CLEAR, "pass", "delay")] * 3
    (blocked,) = syslog.named("dnsbl")
    assert (blocked.fields["client"], blocked.fields["action"]) == (BL, "reject")
    stop = syslog.wait_for("stop", timeout=10.0)[0].fields
    assert (stop["dns_lookups"], stop["dns_timeouts"], stop["dns_cached"], stop["dns_hits"]) == (
        "10",
        "4",
        "5",
        "2",
    )


def test_workers_apply_the_lists_and_the_parent_sums_their_dns_counters(
    resolver: Forwarder, backend: LineBackend, syslog: SyslogUDP
) -> None:
    mport, port = free_port(), free_port()  # a port of our own: bound once per worker
    before = resolver.counts()
    sources = {WL: 5, BL: 5, CLEAR: 5}
    with daemon(*_args(resolver, backend, syslog, mport, port), "--workers", "2"):
        workers = {m.fields["pid"] for m in syslog.wait_for("worker-start", 2)}
        assert wait_for(lambda: _gauge(mport, "repeld_workers_answered") == 2, 30.0, 0.2)
        started = time.monotonic()
        first = _open(port, [WL, BL, CLEAR])
        try:
            assert _first_line(first[0]) == GREETING
            assert _first_line(first[1]) == REJECTED
            assert time.monotonic() - started < DELAY  # judged by the lists, not the delay
            # Four more from each address at once, spread by the kernel over both
            # workers; CLEAR's first client is still held.
            again_at = time.monotonic()
            again = _open(port, [WL, BL] * 4 + [CLEAR] * 4)
            try:
                lines = [_first_line(s) for s in again]
                assert lines == [GREETING, REJECTED] * 4 + [GREETING] * 4
                assert time.monotonic() - again_at >= DELAY  # CLEAR's clients waited
                assert _first_line(first[2]) == GREETING
            finally:
                for s in again:
                    s.close()
        finally:
            for s in first:
                s.close()
        syslog.wait_for("pass", sources[WL] + sources[CLEAR])
        syslog.wait_for("dnsbl", sources[BL])
        total = sum(sources.values()) * len(LISTS)
        assert wait_for(lambda: sum(_dns(_samples(_scrape(mport)))[0].values()) == total, 20, 0.1)
        text = _scrape(mport)
        _promtool(text)
    found = _samples(text)
    # Each client's verdict, and the worker (the event's pid) that gave it.
    served: dict[str, set[str]] = collections.defaultdict(set)
    verdicts: collections.Counter[tuple[str, str]] = collections.Counter()
    for m in _verdicts(syslog):
        served[m.fields["client"]].add(m.procid)
        verdicts[m.fields["client"], m.fields.get("reason") or m.fields["action"]] += 1
    assert verdicts == {(WL, "dnswl"): 5, (BL, "reject"): 5, (CLEAR, "delay"): 5}
    assert set().union(*served.values()) == workers  # both workers met clients
    # Queries that reached the server: each worker has its own answer cache, so an
    # answering list is asked once for an address by each worker that met it, and
    # never more than once per client; silent.test, never cached, at most once per
    # client too (clients of one worker at once share its query in flight),
    asked = resolver.counts() - before
    rev = {WL: "4.0.0.127", BL: "2.0.0.127", CLEAR: "6.0.0.127"}
    for client, n in sources.items():
        for domain in ("wl.test", "bl.test"):
            assert asked[f"{rev[client]}.{domain}"] == len(served[client]), (client, domain)
        # (each query sent TRIES times at most: again at half --dns-timeout)
        silent = asked[f"{rev[client]}.silent.test"]
        assert len(served[client]) <= silent <= TRIES * n, client
    # and nothing else was asked
    assert sum(asked.values()) == sum(asked[f"{r}.{d}"] for r in rev.values() for d in LISTS)
    # The parent's sum of both workers' counters: what was asked, and one answer
    # per list and client.
    lookups, hits = _dns(found)
    # (silent.test's queries: each counted once, as a timeout, sent once or twice)
    silent = sum(asked[f"{r}.silent.test"] for r in rev.values())
    assert lookups["timeout"] <= silent <= TRIES * lookups["timeout"]
    assert lookups == {
        "listed": len(served[WL]) + len(served[BL]),
        "clear": len(served[WL]) + len(served[BL]) + 2 * len(served[CLEAR]),
        "timeout": lookups["timeout"],
        "error": 0,
        "cached": total - sum(asked.values()) + silent - lookups["timeout"],
    }
    assert sum(lookups.values()) == total
    assert hits == _hits_from_events(syslog) == {"wl.test": 5, "bl.test": 5}

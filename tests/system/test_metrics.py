"""--metrics on a running repeld (a real subprocess): every counter against the events.

A known mix of real clients (early talkers, hang-ups by FIN and by RST, passes
by delay and by trusted source, refusals at --max-per-client, a backend error)
goes through repeld; the events arrive at a real UDP syslog receiver, and a
scrape of /metrics must say the same. The endpoint's limits are tried with raw
sockets; `promtool check metrics` (Debian's prometheus package) lints the text.
"""

from __future__ import annotations

import collections
import http.client
import itertools
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..procs import (
    LineBackend,
    SyslogUDP,
    connect,
    daemon,
    free_port,
    read_line,
    run_repeld,
    wait_for,
)

DELAY = 1.0
AS_ROOT = ["--user", "root"] if os.geteuid() == 0 else []
PROMTOOL = shutil.which("promtool")
CURL = shutil.which("curl")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, path: str = "/metrics") -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        body: bytes = answer.read()
        return body


def samples(text: bytes) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def _args(
    port: int, nodelay_port: int, mport: int, backend: LineBackend, syslog: SyslogUDP
) -> list[str]:
    dead = free_port()  # nothing listens there: the backend error
    return [
        "-l", f"127.0.0.1:{port}",
        "-l", f"127.0.0.1:{nodelay_port},nodelay,backend=127.0.0.1:{dead}",
        "-b", backend.address,
        "-d", str(DELAY),
        "-t", "127.0.0.2/32",
        "--max-per-client", "1",
        "--connect-timeout", "5",
        "--syslog", syslog.target,
        "--metrics", f"127.0.0.1:{mport}",
        *AS_ROOT,
    ]  # fmt: skip


def _mix(port: int, nodelay_port: int) -> int:
    """Run the known mix of clients; how many were refused at --max-per-client."""
    for source in ("127.0.0.5", "127.0.0.6"):  # early talkers: cut off at once
        c = connect(port, source=source)
        c.sendall(b"EHLO bot.example\r\n")
        try:
            assert read_line(c) == b""
        except ConnectionResetError:
            pass  # dropped with unread bytes: an RST
        c.close()
    c = connect(port, source="127.0.0.7")  # hang-up by FIN
    time.sleep(0.1)
    c.close()
    c = connect(port, source="127.0.0.8")  # hang-up by RST
    time.sleep(0.1)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    for source in ("127.0.0.4", "127.0.0.2"):  # pass by delay, pass as trusted
        c = connect(port, source=source)
        assert read_line(c) == b"220 backend.test ESMTP\r\n"
        c.sendall(b"QUIT\r\n")
        assert read_line(c) == b"221 2.0.0 bye\r\n"
        c.close()
    # Refusals: several at once from one address. With workers each has its own
    # count, so only the clients know how many were told 421.
    held = [connect(port, source="127.0.0.3") for _ in range(3)]
    refused = 0
    time.sleep(0.3)
    for c in held:
        c.settimeout(0.2)
        try:
            line = c.recv(100)
        except TimeoutError:
            continue
        assert line.startswith(b"421 4.7.0")
        refused += 1
    for c in held:
        c.close()
    c = connect(nodelay_port, source="127.0.0.9")  # backend error: replied 421
    assert read_line(c).startswith(b"421")
    c.close()
    return refused


def _check_against_events(found: Samples, syslog: SyslogUDP, refused: int) -> None:
    by: dict[tuple[str, str], int] = collections.Counter()
    for event, field in (
        ("early-talker", "action"),
        ("hangup", "how"),
        ("pass", "reason"),
        ("relay-end", "end"),
    ):
        for m in syslog.named(event):
            by[(event, m.fields[field])] += 1
    assert by[("early-talker", "drop")] == 2
    assert by[("hangup", "reset")] == 1
    assert by[("pass", "delay")] == 1 and by[("pass", "trusted")] == 1
    assert by[("pass", "nodelay")] == 1
    for (event, label), n in by.items():
        name, key = {
            "early-talker": ("repeld_early_talkers_total", "action"),
            "hangup": ("repeld_hangups_total", "how"),
            "pass": ("repeld_passes_total", "reason"),
            "relay-end": ("repeld_relay_ends_total", "end"),
        }[event]
        assert value(found, name, **{key: label}) == n, (event, label)
    hangups = len(syslog.named("hangup"))
    assert value(found, "repeld_hangup_seconds_count") == hangups
    assert value(found, "repeld_hangup_seconds_bucket", le="60.0") == hangups
    assert value(found, "repeld_early_talk_seconds_count") == 2
    assert value(found, "repeld_early_talk_seconds_bucket", le="0.5") == 2
    assert value(found, "repeld_relay_duration_seconds_count") == len(syslog.named("relay-end"))
    assert refused >= 1
    assert value(found, "repeld_refusals_total", limit="max-per-client") == refused
    assert value(found, "repeld_backend_errors_total") == len(syslog.named("backend-error")) == 1
    assert value(found, "repeld_events_total", event="pass") == 3
    assert value(found, "repeld_held") == 0
    assert value(found, "repeld_relays") == 0


def _settle(syslog: SyslogUDP, refused: int) -> None:
    syslog.wait_for("early-talker", 2)
    syslog.wait_for("pass", 3)
    syslog.wait_for("relay-end", 2)
    syslog.wait_for("backend-error", 1)
    syslog.wait_for("hangup", 2 + 3 - refused)  # the held ones of the three hung up too
    syslog.drain(0.3)


def _promtool(text: bytes) -> None:
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    out = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout + out.stderr == b""  # no lint warnings either


def test_every_counter_matches_the_events(syslog: SyslogUDP, backend: LineBackend) -> None:
    port, nodelay_port, mport = free_port(), free_port(), free_port()
    with daemon(*_args(port, nodelay_port, mport, backend, syslog)) as d:
        assert f"repeld: metrics at http://127.0.0.1:{mport}/metrics" in d.stderr_text()
        refused = _mix(port, nodelay_port)
        _settle(syslog, refused)
        text = scrape(mport)
        _check_against_events(samples(text), syslog, refused)
        with pytest.raises(urllib.error.HTTPError) as missing:
            scrape(mport, "/")
        assert missing.value.code == 404
        _promtool(text)


def test_the_workers_parent_serves_the_sum(syslog: SyslogUDP, backend: LineBackend) -> None:
    port, nodelay_port, mport = free_port(), free_port(), free_port()
    with daemon(*_args(port, nodelay_port, mport, backend, syslog), "--workers", "2"):
        syslog.wait_for("worker-start", 2)
        assert wait_for(
            lambda: value(samples(scrape(mport)), "repeld_workers_answered") == 2, 30.0, 0.2
        )
        refused = _mix(port, nodelay_port)
        _settle(syslog, refused)
        found = samples(scrape(mport))
        _check_against_events(found, syslog, refused)
        assert value(found, "repeld_workers") == 2
        assert value(found, "repeld_worker_restarts_total") == 0
        # Both workers' and the parent's own events: three starts.
        assert value(found, "repeld_events_total", event="start") == 3


def test_a_slow_scraper_stalls_neither_scrapes_nor_clients(
    syslog: SyslogUDP, backend: LineBackend
) -> None:
    port, nodelay_port, mport = free_port(), free_port(), free_port()
    with daemon(*_args(port, nodelay_port, mport, backend, syslog)):
        answer: list[bytes] = []

        def dribble() -> None:
            # One byte at a time, 50 ms apart: about 2 s for the request.
            with socket.create_connection(("127.0.0.1", mport), timeout=30) as s:
                for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n":
                    s.sendall(bytes([byte]))
                    time.sleep(0.05)
                answer.append(s.recv(100))

        slow = threading.Thread(target=dribble)
        slow.start()
        try:
            for _ in range(3):
                assert b"repeld_held" in scrape(mport)
            c = connect(port, source="127.0.0.2")  # a trusted client is greeted at once
            assert read_line(c) == b"220 backend.test ESMTP\r\n"
            c.close()
            assert slow.is_alive()  # all that happened while it was still dribbling
        finally:
            slow.join(30)
        assert answer and answer[0].startswith(b"HTTP/1.1 200 ")

        # Too long a request: 431, and the endpoint carries on.
        with socket.create_connection(("127.0.0.1", mport), timeout=30) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 431 ")
        # More silent connections than slots: a scraper is served all the same (the
        # oldest silent one makes room), and the silent ones are closed.
        idle = [
            socket.create_connection(
                ("127.0.0.1", mport), timeout=30, source_address=(f"127.0.2.{i}", 0)
            )
            for i in range(1, 11)
        ]
        try:
            time.sleep(0.3)
            assert b"repeld_held" in scrape(mport)
            assert idle[0].recv(100) == b""
        finally:
            for s in idle:
                s.close()


def _early_talkers(port: int, n: int, subnet: int) -> None:
    """`n` early talkers from distinct addresses 127.`subnet`.x.y, each cut off."""
    for i in range(n):
        c = connect(port, source=f"127.{subnet}.{i // 250}.{i % 250 + 1}")
        c.sendall(b"EHLO bot.example\r\n")
        try:
            read_line(c)
        except ConnectionResetError:
            pass
        c.close()


def _counters(found: Samples) -> Samples:
    return {k: v for k, v in found.items() if k[0].endswith(("_total", "_count", "_bucket"))}


def _never_lower(before: Samples, after: Samples) -> None:
    lower = {k: (v, after.get(k)) for k, v in _counters(before).items() if after.get(k, 0) < v}
    assert not lower, lower


def test_workers_counters_never_go_backwards(syslog: SyslogUDP, backend: LineBackend) -> None:
    # A worker killed by SIGKILL, then one stopped by SIGSTOP: every scrape serves
    # at least what the one before served, and a stopped worker does not stall it.
    port, nodelay_port, mport = free_port(), free_port(), free_port()
    with daemon(*_args(port, nodelay_port, mport, backend, syslog), "--workers", "2"):
        started = syslog.wait_for("worker-start", 2)
        assert wait_for(
            lambda: value(samples(scrape(mport)), "repeld_workers_answered") == 2, 30.0, 0.2
        )
        _early_talkers(port, 40, 20)
        syslog.wait_for("early-talker", 40)
        first = samples(scrape(mport))
        assert value(first, "repeld_early_talkers_total", action="drop") == 40
        victim = int(started[0].fields["pid"])
        os.kill(victim, signal.SIGKILL)
        syslog.wait_for("worker-exit", 1)
        after_kill = samples(scrape(mport))
        _never_lower(first, after_kill)
        assert value(after_kill, "repeld_early_talkers_total", action="drop") == 40
        syslog.wait_for("worker-start", 3)
        assert wait_for(
            lambda: value(samples(scrape(mport)), "repeld_workers_answered") == 2, 30.0, 0.2
        )
        _early_talkers(port, 10, 21)
        syslog.wait_for("early-talker", 50)
        grown = samples(scrape(mport))
        _never_lower(after_kill, grown)
        assert value(grown, "repeld_early_talkers_total", action="drop") == 50
        assert value(grown, "repeld_worker_restarts_total") == 1

        stalled = int(syslog.named("worker-start")[-1].fields["pid"])
        os.kill(stalled, signal.SIGSTOP)
        try:
            late = [samples(scrape(mport)) for _ in range(3)]
            for before, after in itertools.pairwise([grown, *late]):
                _never_lower(before, after)
            assert value(late[-1], "repeld_workers_answered") == 1
            assert value(late[-1], "repeld_early_talkers_total", action="drop") == 50
        finally:
            os.kill(stalled, signal.SIGCONT)
        assert wait_for(
            lambda: value(samples(scrape(mport)), "repeld_workers_answered") == 2, 30.0, 0.2
        )
        _never_lower(late[-1], samples(scrape(mport)))


def test_head_and_absolute_form_from_curl(syslog: SyslogUDP, backend: LineBackend) -> None:
    if CURL is None:
        pytest.skip("curl is not installed")
    port, nodelay_port, mport = free_port(), free_port(), free_port()
    with daemon(*_args(port, nodelay_port, mport, backend, syslog)):
        url = f"http://127.0.0.1:{mport}/metrics"
        head = subprocess.run(
            [CURL, "-sS", "-I", "--max-time", "10", url], capture_output=True, timeout=30
        )
        assert head.returncode == 0, head.stderr
        assert head.stdout.startswith(b"HTTP/1.1 200 ")
        assert b"\r\nContent-Length: " in head.stdout
        # curl through a "proxy" sends the absolute form: GET http://mx.example/metrics
        proxied = subprocess.run(
            [CURL, "-sS", "--max-time", "10", "-x", f"127.0.0.1:{mport}",
             "http://mx.example/metrics"],
            capture_output=True, timeout=30,
        )  # fmt: skip
        assert proxied.returncode == 0, proxied.stderr
        assert b"repeld_held " in proxied.stdout
        conn = http.client.HTTPConnection("127.0.0.1", mport, timeout=10)
        conn.request("HEAD", "/metrics")
        answer = conn.getresponse()
        assert answer.status == 200 and answer.read() == b""
        conn.close()


def test_dribbling_clients_do_not_deny_scrapes(syslog: SyslogUDP, backend: LineBackend) -> None:
    # Twelve clients (more than the endpoint's slots) send their headers a byte
    # every 0.3 s and reconnect whenever they are cut off; scrapes go on being
    # served all the while.
    port, nodelay_port, mport = free_port(), free_port(), free_port()
    with daemon(*_args(port, nodelay_port, mport, backend, syslog)):
        stop = threading.Event()
        cut = collections.Counter[int]()

        def dribbler(i: int) -> None:
            request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\n\r\n"
            while not stop.is_set():
                try:
                    with socket.create_connection(
                        ("127.0.0.1", mport), timeout=5, source_address=(f"127.0.3.{i}", 0)
                    ) as s:
                        for byte in request:
                            if stop.is_set():
                                return
                            s.sendall(bytes([byte]))
                            time.sleep(0.3)
                except OSError:
                    cut[i] += 1

        threads = [threading.Thread(target=dribbler, args=(i,)) for i in range(1, 13)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            for _ in range(10):
                assert b"repeld_held" in scrape(mport)
                time.sleep(0.2)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert sum(cut.values()) > 0  # the dribblers were cut off, and came back


def test_backend_up_follows_the_periodic_check(syslog: SyslogUDP, backend: LineBackend) -> None:
    port, nodelay_port, mport = free_port(), free_port(), free_port()
    args = _args(port, nodelay_port, mport, backend, syslog)
    with daemon(*args, "--backend-check-interval", "0.5"):

        def up(name: str) -> float | None:
            found = samples(scrape(mport))
            return found.get(("repeld_backend_up", (("backend", name),)))

        assert wait_for(lambda: up(backend.address) == 1, 30.0, 0.1)
        dead = next(a.split("backend=")[1] for a in args if "backend=" in a)
        assert up(dead) == 0  # the nodelay listener's backend, where nothing listens
        found = samples(scrape(mport))
        assert value(found, "repeld_max_held") > 0
        assert 0 < value(found, "process_open_fds") < value(found, "process_max_fds")
        assert value(found, "process_resident_memory_bytes") > 0
        backend.close()  # the MTA goes away: the gauge and one event say so
        assert wait_for(lambda: up(backend.address) == 0, 30.0, 0.1)

        def reported() -> bool:
            syslog.drain(0.1)
            return any(
                m.fields["backend"] == backend.address for m in syslog.named("backend-check")
            )

        assert wait_for(reported, 30.0, 0.0)
        time.sleep(1.5)  # three more failed checks: still one event for it
        syslog.drain(0.2)
        gone = [m for m in syslog.named("backend-check") if m.fields["backend"] == backend.address]
        assert len(gone) == 1


def test_a_metrics_port_in_use_is_one_line_naming_it(backend: LineBackend) -> None:
    # "repeld: Address already in use" named neither the option nor the address.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        argv = ["-l", f"127.0.0.1:{free_port()}", "-b", backend.address]
        argv += ["--metrics", f"127.0.0.1:{port}", "--syslog", "udp://127.0.0.1:9", *AS_ROOT]
        proc = run_repeld("-f", "--no-cache", *argv, timeout=30)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"repeld: --metrics: cannot listen on 127.0.0.1:{port}: Address already in use"
    )

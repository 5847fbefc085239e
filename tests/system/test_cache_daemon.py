"""The pass cache inside the daemon: in-process with a memory cache and the autojump
clock, then real processes sharing SQLite and Redis.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import socketserver
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from repeld.cache.spec import parse_cache_url

from ..harness import GREETING, connect, read_line, read_until_closed, running
from ..procs import (
    REDIS_SERVER,
    LineBackend,
    RedisServer,
    SyslogUDP,
    daemon,
    free_port,
    wait_for,
)
from ..procs import connect as tcp_connect
from ..procs import read_line as tcp_read_line
from ..syslog_receiver import Received

DELAY = 25.0
MEMORY = parse_cache_url("memory")
AS_ROOT = ["--user", "root"] if os.geteuid() == 0 else []


async def test_a_client_that_waited_once_is_passed_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, cache=MEMORY) as h:
        first = await connect(h.address(), source="127.0.0.21")
        assert await read_line(first) == GREETING  # after the full delay
        again = await connect(h.address(), source="127.0.0.21")
        start = trio.current_time()
        assert await read_line(again) == GREETING
        assert trio.current_time() - start < 0.1
        stranger = await connect(h.address(), source="127.0.0.22")
        start = trio.current_time()
        assert await read_line(stranger) == GREETING
        assert trio.current_time() - start >= DELAY  # somebody else still waits
        reasons = [e.fields["reason"] for e in await h.receiver.wait_for("pass", 3)]
        assert reasons == ["delay", "cache", "delay"]


async def test_early_talkers_and_hangups_are_never_remembered_as_good(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, cache=MEMORY) as h:
        # (A client remembered as good that talks before the cache answers is
        # passed with its bytes: tests/shell/test_early_cache.py.)
        talker = await connect(h.address(), source="127.0.0.31")
        await talker.send(b"EHLO\r\n")
        await read_until_closed(talker)
        leaver = await connect(h.address(), source="127.0.0.32")
        await trio.sleep(1)
        leaver.close()
        await h.receiver.wait_for("hangup")
        for source in ("127.0.0.31", "127.0.0.32"):
            c = await connect(h.address(), source=source)
            start = trio.current_time()
            assert await read_line(c) == GREETING
            assert trio.current_time() - start >= DELAY
        assert [e.fields["reason"] for e in h.receiver.named("pass")] == ["delay"] * 2


async def test_cache_ttl_expires(autojump_clock: trio.testing.MockClock) -> None:
    async with running(delay=DELAY, cache=MEMORY, cache_ttl=3600.0) as h:
        c = await connect(h.address(), source="127.0.0.41")
        assert await read_line(c) == GREETING
        await trio.sleep(3601)
        c = await connect(h.address(), source="127.0.0.41")
        start = trio.current_time()
        assert await read_line(c) == GREETING
        assert trio.current_time() - start >= DELAY


async def test_penalty_cuts_a_known_early_talker_unheard(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(delay=DELAY, cache=MEMORY, penalty_ttl=600.0) as h:
        bot = await connect(h.address(), source="127.0.0.51")
        await bot.send(b"EHLO bot\r\n")
        await read_until_closed(bot)
        again = await connect(h.address(), source="127.0.0.51")  # silent this time
        start = trio.current_time()
        data, how = await read_until_closed(again)
        assert (data, how) == (b"", "reset")
        assert trio.current_time() - start < 0.1
        events = await h.receiver.wait_for("early-talker", 2)
        assert [e.fields["action"] for e in events] == ["drop", "penalty"]
        assert events[1].fields["bytes"] == "0"
        await trio.sleep(601)  # the penalty is over: held and judged again
        later = await connect(h.address(), source="127.0.0.51")
        assert await read_line(later) == GREETING


async def test_no_cache_remembers_nobody(autojump_clock: trio.testing.MockClock) -> None:
    async with running(delay=DELAY, cache=MEMORY, no_cache=True) as h:
        for _ in range(2):
            c = await connect(h.address(), source="127.0.0.61")
            start = trio.current_time()
            assert await read_line(c) == GREETING
            assert trio.current_time() - start >= DELAY
        assert h.server.cache is None


# -- real processes -------------------------------------------------------------


def _greeted_after(port: int, source: str) -> float:
    c = tcp_connect(port, source=source)
    t0 = time.monotonic()
    assert tcp_read_line(c) == b"220 backend.test ESMTP\r\n"
    elapsed = time.monotonic() - t0
    c.close()
    return elapsed


def test_sqlite_cache_survives_a_restart(
    syslog: SyslogUDP, backend: LineBackend, tmp_path: Path
) -> None:
    db = tmp_path / "cache.sqlite"
    args = [
        "-b",
        backend.address,
        "-d",
        "1",
        "--cache",
        f"sqlite:{db}",
        "--syslog",
        syslog.target,
        *AS_ROOT,
    ]
    port = free_port()
    with daemon("-l", f"127.0.0.1:{port}", *args):
        assert _greeted_after(port, "127.0.0.71") >= 0.9
        syslog.wait_for("relay-end")
    with daemon("-l", f"127.0.0.1:{port}", *args):  # a new process, the same file
        assert _greeted_after(port, "127.0.0.71") < 0.5
    reasons = [e.fields["reason"] for e in syslog.wait_for("pass", 2)]
    assert reasons == ["delay", "cache"]


@pytest.mark.skipif(not os.access(REDIS_SERVER, os.X_OK), reason="redis-server is not installed")
def test_two_mx_hosts_share_redis_and_survive_its_outage(
    syslog: SyslogUDP, backend: LineBackend, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path, free_port())
    redis.start()
    url = f"redis://127.0.0.1:{redis.port}/0"
    mx1, mx2 = free_port(), free_port()
    common = ["-b", backend.address, "-d", "1", "--cache", url, "--syslog", syslog.target, *AS_ROOT]
    try:
        with daemon("-l", f"127.0.0.1:{mx1}", *common), daemon("-l", f"127.0.0.1:{mx2}", *common):
            # passes on mx1, is not delayed on mx2
            assert _greeted_after(mx1, "127.0.0.81") >= 0.9
            deadline = time.monotonic() + 10
            while not redis.client().exists("repeld:pass:127.0.0.81"):
                assert time.monotonic() < deadline, "the pass never reached Redis"
                time.sleep(0.05)
            assert _greeted_after(mx2, "127.0.0.81") < 0.5

            redis.kill()  # mid-test: connections are still served, with the delay
            assert _greeted_after(mx2, "127.0.0.82") >= 0.9
            assert _greeted_after(mx1, "127.0.0.81") < 5  # served, cached or not
            errors = syslog.wait_for("cache-error", 2)  # one per process, not per connection
            assert {e.procid for e in errors} and len(errors) == 2

            redis.start()  # the same port: the cache works again by itself
            syslog.wait_for("cache-recover", 2, timeout=30)
            assert _greeted_after(mx1, "127.0.0.83") >= 0.9
            deadline = time.monotonic() + 10
            while not redis.client().exists("repeld:pass:127.0.0.83"):
                assert time.monotonic() < deadline, "the pass never reached Redis"
                time.sleep(0.05)
            assert _greeted_after(mx2, "127.0.0.83") < 0.5
            assert len(syslog.named("cache-error")) == 2
    finally:
        redis.kill()
    reasons = [(e.fields["client"], e.fields["reason"]) for e in syslog.wait_for("pass", 6)]
    assert ("127.0.0.81", "cache") in reasons and ("127.0.0.83", "cache") in reasons


def test_an_unusable_cache_path_leaves_repeld_serving(
    syslog: SyslogUDP, backend: LineBackend, tmp_path: Path
) -> None:
    port = free_port()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with daemon(
        "-l",
        f"127.0.0.1:{port}",
        "-b",
        backend.address,
        "-d",
        "0.5",
        "--cache",
        f"sqlite:{blocker}/cache.sqlite",
        "--syslog",
        syslog.target,
        *AS_ROOT,
    ) as d:
        (err,) = syslog.wait_for("cache-error")
        assert str(blocker) in err.fields["error"]
        assert _greeted_after(port, "127.0.0.91") >= 0.4
        d.signal(signal.SIGUSR1)
        stats = syslog.wait_for("stats")[0]
        assert stats.fields["cache_outages"] == "1"  # an outage, not a cache turned off
        blocker.unlink()
        blocker.mkdir()  # the directory it wanted: the cache opens, and remembers
        syslog.wait_for("cache-recover")
        assert _greeted_after(port, "127.0.0.92") >= 0.4
        assert wait_for(lambda: (blocker / "cache.sqlite").exists(), 5)
        assert wait_for(lambda: _greeted_after(port, "127.0.0.92") < 0.3, 10)


class GarbageRedis(socketserver.ThreadingTCPServer):
    """A listener that answers every command with `*garbage\\r\\n`, a reply no Redis sends.

    With `upstream` (a real Redis's port) it first relays to that Redis, and answers
    nonsense from `spoil()` on, on the connections it already relays as on new ones: a
    Redis that goes bad under a client's pooled connections. (Killing a Redis and
    listening on its port instead races: a client that meets the dead Redis's FIN
    before the nonsense reports that, "Connection closed by server", as the outage.)
    redis-py rejects the reply (InvalidResponse; a ValueError in some versions).
    """

    daemon_threads = True
    allow_reuse_address = True

    class Handler(socketserver.BaseRequestHandler):
        server: GarbageRedis

        def handle(self) -> None:
            up = self.server.upstream
            try:
                upstream = None if up is None else socket.create_connection(up, timeout=5)
            except OSError:
                return
            socks = [self.request] if upstream is None else [self.request, upstream]
            deadline = time.monotonic() + 60  # bounded: every test here is over by then
            try:
                while time.monotonic() < deadline and not self.server.stopping.is_set():
                    readable, _, _ = select.select(socks, [], [], 0.2)
                    for sock in readable:
                        data = sock.recv(65536)
                        if not data:
                            return
                        if sock is upstream:
                            self.request.sendall(data)
                        elif upstream is None or self.server.spoiled.is_set():
                            self.request.sendall(b"*garbage\r\n")
                            self.server.replies += 1
                        else:
                            upstream.sendall(data)
            except OSError:
                return
            finally:
                if upstream is not None:
                    upstream.close()

    def __init__(self, port: int, upstream: int | None = None) -> None:
        super().__init__(("127.0.0.1", port), self.Handler)
        self.upstream = None if upstream is None else ("127.0.0.1", upstream)
        self.replies = 0  # garbage replies sent
        self.spoiled = threading.Event()
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def spoil(self) -> None:
        """From now on, answer every command with garbage, relaying nothing more."""
        self.spoiled.set()

    def close(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


def _malformed(event: Received) -> bool:
    """Whether a cache-error reports the garbage reply (and not, say, a lost connection)."""
    return "garbage" in event.fields["error"] or "ValueError" in event.fields["error"]


def _wait_malformed(syslog: SyslogUDP, timeout: float = 30.0) -> Received:
    """The cache-error that reports the garbage reply, waiting up to `timeout` seconds.

    Not simply the first cache-error: a second PING slower than the lookup timeout at
    start is an outage of its own (reported, then recovered) on a loaded machine.
    """
    found: list[Received] = []

    def check() -> bool:
        syslog.drain(0.1)
        found[:] = [e for e in syslog.named("cache-error") if _malformed(e)]
        return bool(found)

    assert wait_for(check, timeout), f"no garbage cache-error: {syslog.named('cache-error')}"
    return found[0]


@pytest.mark.skipif(not os.access(REDIS_SERVER, os.X_OK), reason="redis-server is not installed")
def test_a_malformed_redis_reply_leaves_repeld_serving(
    syslog: SyslogUDP, backend: LineBackend, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path, free_port())
    redis.start()
    garbage = GarbageRedis(free_port(), upstream=redis.port)  # Redis, until spoiled
    port = free_port()
    url = f"redis://127.0.0.1:{garbage.server_address[1]}/0"
    args = ["-b", backend.address, "-d", "1", "--cache", url, "--syslog", syslog.target]
    try:
        with daemon("-l", f"127.0.0.1:{port}", *args, *AS_ROOT) as d:
            assert _greeted_after(port, "127.0.0.101") >= 0.9  # Redis works
            deadline = time.monotonic() + 10
            while not redis.client().exists("repeld:pass:127.0.0.101"):
                assert time.monotonic() < deadline, "the pass never reached Redis"
                time.sleep(0.05)
            garbage.spoil()  # the same connections, nonsense answers
            assert _greeted_after(port, "127.0.0.102") >= 0.9  # held, then passed
            # Reported by its lookup, or if that ran out of time, by writing its pass.
            error = _wait_malformed(syslog)
            assert garbage.replies >= 1  # the nonsense did reach repeld
            assert _greeted_after(port, "127.0.0.103") >= 0.9  # served in the outage
            assert d.proc.poll() is None
            syslog.drain(0.5)
            assert syslog.named("cache-error")[-1] is error  # one per outage
    finally:
        garbage.close()
        redis.kill()
    reasons = [e.fields["reason"] for e in syslog.wait_for("pass", 3)]
    assert reasons == ["delay"] * 3


def test_a_malformed_redis_reply_at_start_leaves_repeld_serving(
    syslog: SyslogUDP, backend: LineBackend
) -> None:
    garbage = GarbageRedis(free_port())
    port = free_port()
    url = f"redis://127.0.0.1:{garbage.server_address[1]}/0"
    args = ["-b", backend.address, "-d", "1", "--cache", url, "--syslog", syslog.target]
    try:
        with daemon("-l", f"127.0.0.1:{port}", *args, *AS_ROOT) as d:
            assert _greeted_after(port, "127.0.0.104") >= 0.9
            assert d.proc.poll() is None
            syslog.wait_for("cache-error")
            assert garbage.replies >= 1
    finally:
        garbage.close()
    assert [e.fields["reason"] for e in syslog.wait_for("pass")] == ["delay"]


def _chattr(flag: str, db: Path) -> None:
    files = sorted(str(p) for p in db.parent.glob(db.name + "*"))
    subprocess.run(["chattr", flag, *files], check=True)


def test_immutable_sqlite_files_leave_repeld_serving(
    syslog: SyslogUDP, backend: LineBackend, tmp_path: Path
) -> None:
    """chattr +i on the cache files: one cache-error, clients still passed, no SIGBUS."""
    from ..shell.test_cache_sqlite import chattr_works

    reason = chattr_works(tmp_path)
    if reason is not None:
        pytest.skip(reason)
    db = tmp_path / "cache.sqlite"
    port = free_port()
    args = ["-b", backend.address, "-d", "1", "--cache", f"sqlite:{db}"]
    try:
        with daemon("-l", f"127.0.0.1:{port}", *args, "--syslog", syslog.target, *AS_ROOT) as d:
            assert _greeted_after(port, "127.0.0.111") >= 0.9
            # Not read from here: a connection of the test's own hid the SIGBUS.
            time.sleep(1.5)  # written (flush interval 0.5 s), and a few idle rounds
            _chattr("+i", db)
            os.sync()  # the kernel's writeback would do it within 30 s: clean, protected pages
            for source in ("127.0.0.112", "127.0.0.113", "127.0.0.114"):
                assert _greeted_after(port, source) >= 0.9  # held, then passed
            (error,) = syslog.wait_for("cache-error")
            assert str(db) in error.fields["error"], error.fields
            assert _greeted_after(port, "127.0.0.111") < 0.5  # reading still works
            syslog.drain(1.0)
            assert d.proc.poll() is None, f"repeld died: returncode {d.proc.returncode}"
            assert len(syslog.named("cache-error")) == 1  # one per outage
            _chattr("-i", db)
            syslog.wait_for("cache-recover", timeout=10)
            assert wait_for(lambda: _stored(db, "127.0.0.114"), 10), "the kept batch was lost"
            assert _stored(db, "127.0.0.111")
    finally:
        _chattr("-i", db)
    assert len(syslog.named("cache-error")) == 1


def _stored(db: Path, key: str) -> bool:
    """Whether the cache file holds a row for `key`, read by a connection of its own."""
    conn = sqlite3.connect(db, timeout=5)
    try:
        return conn.execute("SELECT 1 FROM cache WHERE key = ?", (key,)).fetchone() is not None
    except sqlite3.Error:
        return False
    finally:
        conn.close()

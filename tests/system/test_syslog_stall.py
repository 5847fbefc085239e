"""A syslog reader that stalls never holds up `-f` or the stop event: a real repeld.

The syslog target is a real unix datagram socket that nobody reads: after a
handful of datagrams (net.unix.max_dgram_qlen) every send meets EAGAIN. repeld
must still print every event of a known mix on stderr while it runs, print
`stop` at SIGTERM, and count in `dropped_events` exactly the events the socket
did not take.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from pathlib import Path

from ..procs import Daemon, connect, read_line
from ..syslog_receiver import parse

TIMEOUT = 30.0
DELAY = 0.5
TALKERS = 300
PASSES = 10
HANGUPS = 10
#: The -f line of an event: local time, name, summary.
_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} ([a-z-]+): ")


def free_port() -> int:
    """A loopback port nobody listens on: the dead backend."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def event_lines(d: Daemon) -> list[str]:
    with d._cond:
        lines = list(d.lines)
    return [m[1] for m in map(_LINE.match, lines) if m]


def talk_early(port: int, source: str) -> None:
    with connect(port, source) as bot:
        bot.sendall(b"EHLO flood\r\n")
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while bot.recv(4096):
                pass


def pass_to_dead_backend(port: int, source: str) -> None:
    with connect(port, source) as client:
        # the 421 of the dead backend, after the delay
        assert read_line(client).startswith(b"421 ")


def wait_for(predicate: object, what: str, d: Daemon) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}:\n{d.stderr_text()}"
        time.sleep(0.05)


def test_a_stalled_syslog_reader_costs_counted_drops_never_stderr_lines(tmp_path: Path) -> None:
    path = tmp_path / "log.sock"
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.bind(str(path))  # and never read until repeld has exited
    d = Daemon(["--user", "root", "--listen", "127.0.0.1:0", "--delay", str(DELAY),
                "--backend", f"127.0.0.1:{free_port()}", "--syslog", str(path),
                "--on-early", "drop"])  # fmt: skip
    try:
        port = d.wait_listening()[1]
        # each client from its own address: no --max-per-client refusals
        passers = [threading.Thread(target=pass_to_dead_backend, args=(port, f"127.2.0.{i + 1}"))
                   for i in range(PASSES)]  # fmt: skip
        for t in passers:
            t.start()
        for i in range(TALKERS):
            talk_early(port, f"127.1.{i // 250}.{i % 250 + 1}")
        for i in range(HANGUPS):
            with connect(port, f"127.3.0.{i + 1}"):
                pass
        for t in passers:
            t.join(TIMEOUT)
        expected = {"early-talker": TALKERS, "hangup": HANGUPS, "pass": PASSES,
                    "backend-error": PASSES}  # fmt: skip

        # Every event is on stderr while syslog is still stalled (before the
        # fix, one line a second got through: SEND_WAIT per blocked datagram).
        def all_printed() -> bool:
            names = event_lines(d)
            return all(names.count(k) == n for k, n in expected.items())

        wait_for(all_printed, "every event on stderr while syslog is stalled", d)
        assert d.proc.poll() is None
        assert d.stop() == 0
        assert not d.killed
    finally:
        if d.proc.poll() is None:
            d.stop()
        try:
            datagrams = []
            while True:
                try:
                    datagrams.append(reader.recv(65536, socket.MSG_DONTWAIT))
                except BlockingIOError:
                    break
        finally:
            reader.close()

    names = event_lines(d)
    assert names.count("stop") == 1, d.stderr_text()
    assert names[-1] == "stop"
    stop = d.wait_line(r" stop: STOP .*\bdropped_events=(\d+)\b")
    dropped = int(stop[1])
    received = [parse(x).event for x in datagrams]
    before_stop = [r for r in received if r != "stop"]
    # Every event before stop went either to the socket or into dropped_events.
    assert len(before_stop) + dropped == len(names) - 1
    assert 0 < len(before_stop) < len(names) - 1  # some fitted, most did not
    assert dropped > 0

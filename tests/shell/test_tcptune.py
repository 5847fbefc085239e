"""repeld.service.tcptune against real loopback TCP sockets: every value is read back from the kernel."""

from __future__ import annotations

import ast
import dataclasses
import errno
import fcntl
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from repeld.service import tcptune
from repeld.shell import handoff

LINUX = sys.platform.startswith("linux")
FREEBSD = sys.platform.startswith("freebsd")
linux_only = pytest.mark.skipif(not LINUX, reason="Linux-specific behaviour")

ROOT = Path(__file__).resolve().parents[2]
BUILDER = ROOT / "native" / "build_tcpnative.py"

Pair = tuple[socket.socket, socket.socket]


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A connected loopback TCP pair: (client, the server's accepted socket)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    server.settimeout(5)
    with client, server:
        yield client, server


def closed_fd() -> int:
    """An fd number that was a socket a moment ago and is now closed."""
    sock = socket.socket()
    fd = sock.fileno()
    sock.close()
    return fd


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read n bytes, however the kernel splits them."""
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        assert chunk, "peer closed early"
        chunks += chunk
    return bytes(chunks)


# --- keepalive -------------------------------------------------------------------------


def test_set_keepalive_reads_back(pair: Pair) -> None:
    _, server = pair
    tcptune.set_keepalive(server.fileno(), idle=75, interval=15, count=4)
    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
    assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 75
    assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 15
    assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4


def test_set_keepalive_leaves_fd_open(pair: Pair) -> None:
    client, server = pair
    tcptune.set_keepalive(server.fileno(), 60, 10, 5)
    server.sendall(b"still here")
    assert recv_exactly(client, 10) == b"still here"


@pytest.mark.parametrize(("idle", "interval", "count"), [(0, 10, 5), (60, 0, 5), (60, 10, -1)])
def test_set_keepalive_rejects_non_positive(
    pair: Pair, idle: int, interval: int, count: int
) -> None:
    _, server = pair
    with pytest.raises(ValueError, match="keepalive"):
        tcptune.set_keepalive(server.fileno(), idle, interval, count)
    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


@linux_only
def test_set_keepalive_kernel_refusal_is_oserror_and_leaves_keepalive_off(pair: Pair) -> None:
    _, server = pair
    with pytest.raises(OSError) as excinfo:
        tcptune.set_keepalive(server.fileno(), 60, 10, 1000)  # Linux caps TCP_KEEPCNT at 127
    assert excinfo.value.errno == errno.EINVAL
    assert server.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


# --- user timeout ----------------------------------------------------------------------


def test_platform_has_user_timeout_matches_platform() -> None:
    has = tcptune.platform_has_user_timeout()
    if LINUX:
        assert has is True
    elif FREEBSD:
        assert has is False
    else:
        assert isinstance(has, bool)


def test_set_user_timeout(pair: Pair) -> None:
    _, server = pair
    applied = tcptune.set_user_timeout(server.fileno(), 12_345)
    assert applied is tcptune.platform_has_user_timeout()
    if applied:
        assert server.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12_345


@pytest.mark.parametrize("ms", [-1, 2**31])
def test_set_user_timeout_rejects_out_of_range(pair: Pair, ms: int) -> None:
    _, server = pair
    with pytest.raises(ValueError, match="user timeout"):
        tcptune.set_user_timeout(server.fileno(), ms)


# --- abortive close --------------------------------------------------------------------


def test_set_abortive_close_reads_back(pair: Pair) -> None:
    _, server = pair
    tcptune.set_abortive_close(server.fileno())
    raw = server.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.calcsize("ii"))
    assert struct.unpack("ii", raw) == (1, 0)


def test_abortive_close_resets_the_peer(pair: Pair) -> None:
    client, server = pair
    tcptune.set_abortive_close(server.fileno())
    server.close()
    with pytest.raises(ConnectionResetError) as excinfo:
        client.recv(1)
    assert excinfo.value.errno == errno.ECONNRESET


# --- tcp_info --------------------------------------------------------------------------


def test_tcp_info_of_established_connection(pair: Pair) -> None:
    client, server = pair
    payload = b"EHLO spammer.example\r\n" * 100
    client.sendall(payload)
    assert recv_exactly(server, len(payload)) == payload

    info = tcptune.tcp_info(server.fileno())

    assert info.state_name == "ESTABLISHED"
    if LINUX:
        assert info.state == 1  # TCP_ESTABLISHED
        assert info.bytes_received == len(payload)
    elif FREEBSD:
        assert info.state == 4  # TCPS_ESTABLISHED
        assert info.bytes_received == 0  # FreeBSD's tcp_info has no byte count
    assert info.rtt_us >= 0
    assert info.rttvar_us >= 0
    assert info.retransmits >= 0


def test_tcp_info_of_listener_and_half_closed_connection(pair: Pair) -> None:
    client, server = pair
    with socket.create_server(("127.0.0.1", 0)) as listener:
        assert tcptune.tcp_info(listener.fileno()).state_name == "LISTEN"
    client.close()
    assert server.recv(1) == b""
    assert tcptune.tcp_info(server.fileno()).state_name == "CLOSE_WAIT"


def test_tcp_info_is_frozen(pair: Pair) -> None:
    _, server = pair
    info = tcptune.tcp_info(server.fileno())
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.state = 0  # type: ignore[misc]


def test_rtt_ms_is_tcp_infos_rtt_in_ms(pair: Pair) -> None:
    client, server = pair
    client.sendall(b"EHLO x\r\n")
    assert recv_exactly(server, 8) == b"EHLO x\r\n"
    # an idle connection: the kernel's estimate does not move between the calls
    rtt_us = tcptune.tcp_info(server.fileno()).rtt_us
    assert rtt_us > 0
    assert tcptune.rtt_ms(server.fileno()) == rtt_us / 1000.0


def test_rtt_ms_is_zero_where_the_kernel_cannot_tell(tmp_path: Path) -> None:
    # The events' field: unknown is 0, never an exception on a client's path.
    with open(tmp_path / "not-a-socket", "wb") as f:
        assert tcptune.rtt_ms(f.fileno()) == 0.0
    assert tcptune.rtt_ms(closed_fd()) == 0.0
    assert tcptune.rtt_ms(-1) == 0.0


def test_tcp_info_on_a_file_is_enotsock(tmp_path: Path) -> None:
    with open(tmp_path / "not-a-socket", "wb") as f, pytest.raises(OSError) as excinfo:
        tcptune.tcp_info(f.fileno())
    assert excinfo.value.errno == errno.ENOTSOCK


def test_set_nodelay_reads_back(pair: Pair) -> None:
    sock = pair[0]
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
    tcptune.set_nodelay(sock.fileno())
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    tcptune.set_nodelay(sock.fileno(), False)
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0


#: Options whose one home is tcptune (native/tcpnative.c): set nowhere else in src/.
TUNED_OPTIONS = ("TCP_NODELAY", "KEEP", "TCP_USER_TIMEOUT", "SO_LINGER")


def test_tuning_options_are_set_only_through_tcptune() -> None:
    src = Path(__file__).resolve().parents[2] / "src" / "repeld"
    offenders = []
    for path in src.rglob("*.py"):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "setsockopt" in line and any(opt in line for opt in TUNED_OPTIONS):
                offenders.append(f"{path.relative_to(src)}:{lineno}: {line.strip()}")
    assert offenders == []


# --- bad file descriptors --------------------------------------------------------------


def _user_timeout(fd: int) -> object:
    if not tcptune.platform_has_user_timeout():
        pytest.skip("no TCP_USER_TIMEOUT on this platform")
    return tcptune.set_user_timeout(fd, 1000)


FD_CALLS: dict[str, Callable[[int], object]] = {
    "set_keepalive": lambda fd: tcptune.set_keepalive(fd, 60, 10, 5),
    "set_user_timeout": _user_timeout,
    "set_abortive_close": tcptune.set_abortive_close,
    "set_nodelay": tcptune.set_nodelay,
    "accept": lambda fd: tcptune.Acceptor(fd).accept(),
    "tcp_info": tcptune.tcp_info,
    "WakeTimer.arm": lambda fd: tcptune.WakeTimer(fd).arm(0.01),
}


def _has_timerfd() -> bool:
    timer = tcptune.WakeTimer.open()
    if timer is None:
        return False
    timer.close()
    return True


@pytest.mark.parametrize("call", FD_CALLS.values(), ids=FD_CALLS.keys())
@pytest.mark.parametrize("bad_fd", ["closed", "negative"])
def test_bad_fd_raises_ebadf(call: Callable[[int], object], bad_fd: str) -> None:
    if call is FD_CALLS["WakeTimer.arm"] and not _has_timerfd():
        pytest.skip("no timerfd on this platform (ENOSYS, whatever the fd)")
    fd = closed_fd() if bad_fd == "closed" else -1
    with pytest.raises(OSError) as excinfo:
        call(fd)
    assert excinfo.value.errno == errno.EBADF
    assert excinfo.value.strerror  # built from os.strerror, not left empty


# --- the accept loop's timer -------------------------------------------------------------


def _readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


@pytest.mark.skipif(not (LINUX or FREEBSD), reason="timerfd: Linux, FreeBSD 14")
def test_wake_timer_turns_readable_once_armed_and_expired() -> None:
    timer = tcptune.WakeTimer.open()
    if timer is None and FREEBSD:
        pytest.skip("FreeBSD before 14: no timerfd")
    assert timer is not None
    try:
        assert not _readable(timer.fd, 0.05)  # never armed: never readable
        start = time.monotonic()
        timer.arm(0.02)
        assert not _readable(timer.fd, 0)
        assert _readable(timer.fd, 5)
        assert time.monotonic() - start >= 0.019
        # Armed again, the expiry not read is forgotten: readable only at the next.
        timer.arm(0.05)
        assert not _readable(timer.fd, 0)
        assert _readable(timer.fd, 5)
        # No time at all still expires (0 would disarm a timerfd for good).
        timer.arm(0.0)
        assert _readable(timer.fd, 5)
        flags = fcntl.fcntl(timer.fd, fcntl.F_GETFD)
        assert flags & fcntl.FD_CLOEXEC
        assert os.get_blocking(timer.fd) is False
    finally:
        timer.close()
    # Closed twice, the second close touches nothing: not a file that took its number.
    other = os.open(os.devnull, os.O_RDONLY)
    try:
        timer.close()
        assert timer.fd == -1
        os.fstat(other)
    finally:
        os.close(other)


# --- kernel limits ---------------------------------------------------------------------


@linux_only
def test_accept_queue_cap_is_somaxconn() -> None:
    expected = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert tcptune.accept_queue_cap() == expected


def test_accept_queue_cap_is_positive() -> None:
    assert tcptune.accept_queue_cap() > 0


def test_syn_backlog() -> None:
    value = tcptune.syn_backlog()
    assert isinstance(value, int)
    assert value > 0
    if LINUX:
        assert value == int(Path("/proc/sys/net/ipv4/tcp_max_syn_backlog").read_text())


# --- the builder -----------------------------------------------------------------------


def imported_modules(source: str) -> list[str]:
    """Every module an import statement in source names."""
    names: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def test_builder_loads_by_path_without_importing_repeld() -> None:
    source = BUILDER.read_text(encoding="utf-8")
    assert "import repeld" not in source
    assert not [name for name in imported_modules(source) if name.split(".")[0] == "repeld"]
    probe = (
        "import runpy, sys, cffi\n"
        f"ns = runpy.run_path({str(BUILDER)!r})\n"
        "assert isinstance(ns['ffibuilder'], cffi.FFI), ns.get('ffibuilder')\n"
        "loaded = [m for m in sys.modules if m == 'repeld' or m.startswith('repeld.')]\n"
        "assert not loaded, loaded\n"
    )
    # A fresh interpreter in a directory with no repeld in it, so the check means something.
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=BUILDER.parent, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def assert_tuned_for_relay(sock: socket.socket) -> None:
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 6
    if tcptune.platform_has_user_timeout():
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 120_000


def test_a_relayed_client_socket_gets_keepalive_and_a_user_timeout() -> None:
    """What handoff applies to a relayed client itself, read back from a real socket."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with client, conn:
            assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
            handoff._tune_for_relay(conn)
            assert_tuned_for_relay(conn)


@pytest.mark.skipif(not handoff.LISTENER_TUNING_INHERITED, reason="per-client tuning here")
def test_a_tuned_listener_hands_out_tuned_sockets() -> None:
    """On Linux the listener is tuned once and every accepted socket inherits it all."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        assert handoff.tune_listener(server)
        for _ in range(3):
            client = socket.create_connection(server.getsockname())
            conn, _ = server.accept()
            with client, conn:
                assert_tuned_for_relay(conn)
        # The accept loop's own accept4 (tcptune.Acceptor) inherits the same.
        client = socket.create_connection(server.getsockname())
        accepted = tcptune.Acceptor(server.fileno()).accept()
        assert accepted is not None
        fd, (host, port) = accepted
        with client, socket.socket(fileno=fd) as conn:
            assert (host, port) == client.getsockname()
            assert_tuned_for_relay(conn)

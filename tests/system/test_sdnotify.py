"""repeld.service.sdnotify against real AF_UNIX datagram receivers, path and abstract.

Where systemd's own `systemd-notify` is installed, the same notification is sent
by both and the datagrams are compared byte for byte.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from repeld.service import sdnotify

LINUX = sys.platform.startswith("linux")
linux_only = pytest.mark.skipif(not LINUX, reason="abstract sockets and SO_PASSCRED are Linux's")
SYSTEMD_NOTIFY = shutil.which("systemd-notify")


class Receiver:
    """A bound AF_UNIX datagram socket playing the service manager's part."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        """Wrap a bound socket; `env_value` is its $NOTIFY_SOCKET spelling."""
        self.sock = sock
        self.env = {"NOTIFY_SOCKET": env_value}

    def recv(self) -> bytes:
        """The next datagram; fails the test if none comes within 2 s."""
        self.sock.settimeout(2)
        return self.sock.recv(65536)

    def assert_empty(self) -> None:
        """Fail if a datagram is waiting."""
        self.sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            self.sock.recv(65536)


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[Receiver]:
    """A receiver bound to a filesystem path."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        yield Receiver(sock, path)


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    """A receiver bound to a fresh name in Linux's abstract namespace."""
    if not LINUX:
        pytest.skip("abstract sockets are Linux's")
    name = f"repeld-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield Receiver(sock, "@" + name)


def test_notify_reaches_a_path_socket(path_receiver: Receiver) -> None:
    assert sdnotify.notify("READY=1", env=path_receiver.env) is True
    assert path_receiver.recv() == b"READY=1"


@linux_only
def test_notify_reaches_an_abstract_socket(abstract_receiver: Receiver) -> None:
    assert sdnotify.notify("STATUS=hi", env=abstract_receiver.env) is True
    assert abstract_receiver.recv() == b"STATUS=hi"


def test_notify_uses_the_process_environment_by_default(
    path_receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_receiver.env["NOTIFY_SOCKET"])
    assert sdnotify.ready() is True
    assert path_receiver.recv() == b"READY=1"


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "@"}])
def test_no_notify_socket_means_false(env: dict[str, str]) -> None:
    assert sdnotify.notify("READY=1", env=env) is False


def test_unusable_addresses_return_false_without_raising(tmp_path: Path) -> None:
    cases = [
        "relative/notify.sock",  # neither a path nor abstract
        "vsock:2:1234",  # systemd 253's VSOCK form, not supported here
        str(tmp_path / "nobody-listens.sock"),  # ENOENT
        str(tmp_path / "nul\0byte"),  # ValueError from the socket layer
    ]
    for value in cases:
        assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": value}) is False, value


def test_a_socket_file_with_no_listener_returns_false(tmp_path: Path) -> None:
    path = str(tmp_path / "gone.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
    # The file stays, the receiver is gone: connect() gets ECONNREFUSED.
    assert os.path.exists(path)
    assert sdnotify.ready(env={"NOTIFY_SOCKET": path}) is False


def test_a_stream_socket_listener_is_an_error_not_an_exception(tmp_path: Path) -> None:
    path = str(tmp_path / "stream.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(path)
        sock.listen()
        # A datagram cannot be connected to a stream listener (EPROTOTYPE).
        assert sdnotify.stopping(env={"NOTIFY_SOCKET": path}) is False


def test_helpers_send_the_documented_messages(path_receiver: Receiver) -> None:
    env = path_receiver.env
    assert sdnotify.ready(env=env)
    assert path_receiver.recv() == b"READY=1"
    assert sdnotify.ready("listening on 0.0.0.0:25", env=env)
    assert path_receiver.recv() == b"READY=1\nSTATUS=listening on 0.0.0.0:25"
    assert sdnotify.stopping(env=env)
    assert path_receiver.recv() == b"STOPPING=1"
    assert sdnotify.status("12 held, 3 relayed", env=env)
    assert path_receiver.recv() == b"STATUS=12 held, 3 relayed"
    path_receiver.assert_empty()


def test_status_text_cannot_inject_a_second_assignment(path_receiver: Receiver) -> None:
    assert sdnotify.status("one\nREADY=1\r\ntwo", env=path_receiver.env)
    assert path_receiver.recv() == b"STATUS=one READY=1 two"
    assert sdnotify.ready("a\nb", env=path_receiver.env)
    assert path_receiver.recv() == b"READY=1\nSTATUS=a b"


def test_reloading_carries_the_monotonic_clock_in_microseconds(path_receiver: Receiver) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading(env=path_receiver.env)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = path_receiver.recv().decode().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_non_ascii_status_is_sent_as_utf8(path_receiver: Receiver) -> None:
    assert sdnotify.status("überladen", env=path_receiver.env)
    assert path_receiver.recv() == "STATUS=überladen".encode()


@linux_only
def test_the_manager_sees_our_pid_as_the_sender(tmp_path: Path) -> None:
    # systemd attributes a notification to a process through SCM_CREDENTIALS
    # (NotifyAccess=main drops those from other pids): check the kernel's view.
    path = str(tmp_path / "cred.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(path)
        assert sdnotify.ready(env={"NOTIFY_SOCKET": path})
        sock.settimeout(2)
        data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    assert data == b"READY=1"
    ((level, kind, cred),) = ancdata
    assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
    pid, uid, gid = struct.unpack("3i", cred[:12])
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())


# --- conformance with systemd's own sender ----------------------------------------------

needs_systemd_notify = pytest.mark.skipif(
    SYSTEMD_NOTIFY is None, reason="systemd-notify not installed (Debian: package systemd)"
)


def _systemd_notify(receiver: Receiver, *args: str) -> bytes:
    """What systemd-notify sends for `args` (--no-block: no barrier round trip)."""
    assert SYSTEMD_NOTIFY is not None
    env = {**os.environ, **receiver.env}
    subprocess.run([SYSTEMD_NOTIFY, "--no-block", *args], env=env, check=True, timeout=10)
    return receiver.recv()


@needs_systemd_notify
def test_ready_with_status_matches_systemd_notify(path_receiver: Receiver) -> None:
    theirs = _systemd_notify(path_receiver, "--ready", "--status=listening on [::]:25")
    assert sdnotify.ready("listening on [::]:25", env=path_receiver.env)
    assert path_receiver.recv() == theirs == b"READY=1\nSTATUS=listening on [::]:25"


@needs_systemd_notify
@linux_only
def test_abstract_address_matches_systemd_notify(abstract_receiver: Receiver) -> None:
    theirs = _systemd_notify(abstract_receiver, "STOPPING=1")
    assert sdnotify.stopping(env=abstract_receiver.env)
    assert abstract_receiver.recv() == theirs == b"STOPPING=1"


def test_no_file_descriptors_are_left_open(path_receiver: Receiver) -> None:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(50):
        sdnotify.status("x", env=path_receiver.env)
        path_receiver.recv()
        sdnotify.status("x", env={"NOTIFY_SOCKET": "/nonexistent/sock"})
    assert set(os.listdir("/proc/self/fd")) == before

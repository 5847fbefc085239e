"""repeld.service.activation with real inherited sockets.

Three levels: the environment rules in-process (no descriptors involved), real
listeners handed to a child at fds 3 and 4 by hand (sh redirections and
pass_fds), and systemd's own `systemd-socket-activate` doing the handing. In
both child cases a real client connects and the child answers on the socket it
inherited, so "got a socket" means "got the listener".
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from repeld.config.settings import Listen, parse_listen
from repeld.service import activation
from repeld.service.activation import ActivationError, match_listeners, spec_for

from ..procs import launched_by_systemd

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")
VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

# The child: take the inherited sockets, describe them, match them against the
# specs given as arguments, then serve one connection on each matched listener
# by sending back its name.
CHILD = r"""
import fcntl, json, os, select, socket, sys
from repeld.service import activation
from repeld.config.settings import parse_listen

VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
before = {k: os.environ.get(k) for k in VARS}
report = {"pid": os.getpid(), "before": before}
count = int(before["LISTEN_FDS"] or 0)
report["cloexec_before"] = [
    bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd in range(3, 3 + count)
]
try:
    got = activation.listen_fds()
except activation.ActivationError as exc:
    report["error"] = str(exc)
    print(json.dumps(report), flush=True)
    sys.exit(0)
report["after"] = {k: os.environ.get(k) for k in VARS}
report["sockets"] = [
    {
        "fd": sock.fileno(),
        "name": name,
        "family": sock.family.name,
        "type": sock.type.name,
        "address": list(sock.getsockname()[:2]),
        "cloexec": bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
    }
    for sock, name in got
]
matched = activation.match_listeners(got, [parse_listen(a) for a in sys.argv[1:]])
report["matched"] = [[str(spec), sock.getblocking()] for sock, spec in matched.listeners]
report["unbound"] = [str(spec) for spec in matched.unbound]
report["extra"] = [name for _, name in matched.extra]
names = {sock: name for sock, name in got}
for sock, spec in matched.listeners:
    select.select([sock], [], [], 20)
    conn, _ = sock.accept()
    conn.sendall(names[sock].encode() + b"\n")
    conn.close()
print(json.dumps(report), flush=True)
"""


# --- the environment rules, in-process ----------------------------------------------------


def test_no_listen_pid_means_no_sockets_and_the_variables_go() -> None:
    env = {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "PATH": "/bin"}
    assert activation.listen_fds(env) == []
    assert env == {"PATH": "/bin"}


def test_sockets_for_another_pid_are_left_alone() -> None:
    other = str(os.getppid())
    env = {"LISTEN_PID": other, "LISTEN_FDS": "1"}
    assert activation.listen_fds(env, unset=False) == []
    assert env == {"LISTEN_PID": other, "LISTEN_FDS": "1"}
    assert activation.listen_fds(env) == []
    assert env == {}


def test_zero_fds_for_us_is_an_empty_list() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert activation.listen_fds(env) == []
    assert env == {}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_PID": "12ab", "LISTEN_FDS": "1"}, "$LISTEN_PID='12ab' is not a number"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "two"}, "$LISTEN_FDS='two' is not a number"),
        ({"LISTEN_PID": "{pid}", "LISTEN_FDS": "-1"}, "$LISTEN_FDS='-1' is negative"),
        (
            {"LISTEN_PID": "{pid}", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "smtp"},
            "$LISTEN_FDNAMES names 1 sockets but $LISTEN_FDS is 2",
        ),
        (
            {"LISTEN_PID": "{pid}", "LISTEN_FDS": "1", "LISTEN_FDNAMES": ""},
            "$LISTEN_FDNAMES names 0 sockets but $LISTEN_FDS is 1",
        ),
    ],
)
def test_malformed_variables_are_one_line_errors(env: dict[str, str], message: str) -> None:
    env = {k: v.replace("{pid}", str(os.getpid())) for k, v in env.items()}
    with pytest.raises(ActivationError) as info:
        activation.listen_fds(env)
    assert str(info.value) == f"socket activation: {message}"
    assert env == {}, "the variables are unset even on error, as libsystemd does"


def test_listen_fds_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert activation.listen_fds() == []
    assert not any(name in os.environ for name in VARS)


@pytest.mark.parametrize(
    ("name", "nodelay"),
    [
        ("smtps-nodelay", True),
        ("nodelay", True),
        ("smtp", False),
        ("repeld.socket", False),
        ("nodelay-smtps", False),
        ("unknown", False),
    ],
)
def test_nodelay_is_a_name_suffix(name: str, nodelay: bool) -> None:
    assert activation.is_nodelay_name(name) is nodelay


# --- matching real listeners to specs, in-process -----------------------------------------


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    """Three real loopback listeners on ephemeral ports."""
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
    with contextlib.ExitStack() as stack:
        for sock in socks:
            stack.enter_context(sock)
        yield socks


def _spec(sock: socket.socket, nodelay: bool = False) -> Listen:
    """The listen spec naming sock's bound address."""
    host, port = sock.getsockname()[:2]
    return Listen(host, port, nodelay)


def test_match_pairs_by_address_and_reports_the_rest(listeners: list[socket.socket]) -> None:
    smtp, smtps, stray = listeners
    missing = Listen("127.0.0.1", 1)
    specs = [_spec(smtp), _spec(smtps, nodelay=True), missing]
    matched = match_listeners([(smtp, "smtp"), (smtps, "smtps-nodelay"), (stray, "other")], specs)
    assert matched.listeners == [(smtp, specs[0]), (smtps, specs[1])]
    assert matched.unbound == [missing]
    assert matched.extra == [(stray, "other")]
    assert not smtp.getblocking() and not smtps.getblocking()
    assert stray.getblocking(), "an unclaimed socket is not touched"


def test_match_requires_nodelay_agreement_both_ways(listeners: list[socket.socket]) -> None:
    sock = listeners[0]
    with pytest.raises(ActivationError, match="disagree about nodelay: end its FileDescriptor"):
        match_listeners([(sock, "smtp")], [_spec(sock, nodelay=True)])
    with pytest.raises(ActivationError, match="disagree about nodelay: add ,nodelay"):
        match_listeners([(sock, "smtps-nodelay")], [_spec(sock)])


def test_match_rejects_a_socket_passed_twice(listeners: list[socket.socket]) -> None:
    sock = listeners[0]
    dup = socket.socket(fileno=os.dup(sock.fileno()))
    with dup, pytest.raises(ActivationError, match="is passed twice"):
        match_listeners([(sock, "a"), (dup, "b")], [_spec(sock)])


def test_a_bound_but_not_listening_socket_means_accept_yes() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(
            ActivationError, match=r"is not listening \(the socket unit must have Accept=no\)"
        ):
            match_listeners([(sock, "smtp")], [])


def test_a_datagram_socket_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(ActivationError, match="is not a TCP socket"):
            spec_for(sock, "smtp")


def test_ipv6_addresses_match_in_normal_form() -> None:
    try:
        sock = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    with sock:
        port = sock.getsockname()[1]
        spec = parse_listen(f"[0:0::1]:{port},nodelay")
        assert spec_for(sock, "smtps-nodelay") == Listen("::1", port, True)
        matched = match_listeners([(sock, "smtps-nodelay")], [spec])
        assert matched.listeners == [(sock, spec)]


def _v6_wildcard_listener(v6only: bool) -> socket.socket:
    """A listening [::]:ephemeral socket, dual-stack unless v6only."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    sock.bind(("::", 0))
    sock.listen()
    return sock


def test_a_dual_stack_wildcard_cannot_share_its_port_with_ipv4() -> None:
    try:
        dual = _v6_wildcard_listener(v6only=False)
    except OSError as exc:
        pytest.skip(f"no IPv6: {exc}")
    with dual:
        port = dual.getsockname()[1]
        specs = [Listen("0.0.0.0", port), Listen("::", port)]
        # The kernel agrees that the IPv4 half is taken: this is what the
        # daemon would run into when binding the unmatched 0.0.0.0 spec.
        with socket.socket() as v4, pytest.raises(OSError):
            v4.bind(("0.0.0.0", port))
            v4.listen()
        with pytest.raises(ActivationError, match="set BindIPv6Only=ipv6-only"):
            match_listeners([(dual, "smtp")], specs)
    # An IPv6-only port is picked among the ports free for IPv6: another program's
    # IPv4 socket may hold the same number (an outgoing connection's, say), so the
    # test takes the first of a few whose IPv4 half nobody else holds.
    for _ in range(20):
        with _v6_wildcard_listener(v6only=True) as v6:
            port = v6.getsockname()[1]
            specs = [Listen("0.0.0.0", port), Listen("::", port)]
            matched = match_listeners([(v6, "smtp")], specs)
            assert matched.unbound == [specs[0]]
            with socket.socket() as v4:  # and the IPv4 half is free for repeld to bind
                try:
                    v4.bind(("0.0.0.0", port))
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
                    continue  # held by another program's IPv4 socket: another port
            return
    pytest.fail("no IPv6-only port with a free IPv4 half in 20 tries")


# --- real descriptors at fd 3 and 4, handed over by hand ----------------------------------


def _high_fd(sock: socket.socket) -> int:
    """An inheritable duplicate of sock's fd numbered 10 or more (clear of 3 and 4)."""
    fd = fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD, 10)
    os.set_inheritable(fd, True)
    return fd


def _launch(fds: list[int], env: dict[str, str], args: list[str]) -> subprocess.Popen[str]:
    """Run CHILD with `fds` at 3.. under the launcher; `fds` are closed here afterwards."""
    argv = launched_by_systemd(fds, [sys.executable, "-c", CHILD, *args])
    child = subprocess.Popen(argv, env=env, pass_fds=fds, stdout=subprocess.PIPE, text=True)
    for fd in fds:
        os.close(fd)
    return child


def _clean_env(count: int, names: str | None) -> dict[str, str]:
    """This environment without stray LISTEN_* variables, plus LISTEN_FDS(/NAMES)."""
    env = {k: v for k, v in os.environ.items() if k not in VARS}
    env["LISTEN_FDS"] = str(count)
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return env


def _run_child_with(
    socks: list[socket.socket], names: str | None, specs: list[str]
) -> subprocess.Popen[str]:
    """Start CHILD with duplicates of socks at fds 3.. as a service manager would."""
    return _launch([_high_fd(sock) for sock in socks], _clean_env(len(socks), names), specs)


def _ask(address: tuple[str, int]) -> str:
    """Connect, read the one line the child sends back."""
    with socket.create_connection(address, timeout=20) as conn:
        return conn.makefile("r").readline().strip()


def _report(child: subprocess.Popen[str]) -> dict[str, Any]:
    """The child's JSON report (waits for it to exit)."""
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    report: dict[str, Any] = json.loads(out)
    return report


def test_inherited_listeners_at_fd_3_and_4_are_taken_and_served() -> None:
    smtp = socket.create_server(("127.0.0.1", 0))
    smtps = socket.create_server(("127.0.0.1", 0))
    a_smtp, a_smtps = smtp.getsockname(), smtps.getsockname()
    specs = [f"127.0.0.1:{a_smtp[1]}", f"127.0.0.1:{a_smtps[1]},nodelay", "127.0.0.1:1"]
    child = _run_child_with([smtp, smtps], "smtp:smtps-nodelay", specs)
    # Only the child holds the listeners now: whoever answers is the child.
    smtp.close()
    smtps.close()
    assert _ask(a_smtp) == "smtp"
    assert _ask(a_smtps) == "smtps-nodelay"
    report = _report(child)
    assert report["before"]["LISTEN_PID"] == str(report["pid"])
    assert report["cloexec_before"] == [False, False]
    assert report["after"] == {k: None for k in VARS}
    assert report["sockets"] == [
        {
            "fd": 3,
            "name": "smtp",
            "family": "AF_INET",
            "type": "SOCK_STREAM",
            "address": list(a_smtp),
            "cloexec": True,
        },
        {
            "fd": 4,
            "name": "smtps-nodelay",
            "family": "AF_INET",
            "type": "SOCK_STREAM",
            "address": list(a_smtps),
            "cloexec": True,
        },
    ]
    assert report["matched"] == [[specs[0], False], [specs[1], False]]
    assert report["unbound"] == ["127.0.0.1:1"]
    assert report["extra"] == []


def test_unnamed_inherited_sockets_are_called_unknown() -> None:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        child = _run_child_with([sock], None, [])
    report = _report(child)
    assert [s["name"] for s in report["sockets"]] == ["unknown"]
    assert report["extra"] == ["unknown"]


def test_an_inherited_fd_that_is_not_a_socket_is_an_error(tmp_path: Any) -> None:
    # A regular file at fd 3: a broken unit, or a manager we do not understand.
    path = tmp_path / "not-a-socket"
    path.write_text("x")
    with open(path) as f:
        fd = fcntl.fcntl(f.fileno(), fcntl.F_DUPFD, 10)
    child = _launch([fd], _clean_env(1, "smtp"), [])
    report = _report(child)
    assert report["error"] == f"socket activation: fd 3 ('smtp'): {os.strerror(errno.ENOTSOCK)}"


# --- systemd's own activator ----------------------------------------------------------------


def _free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _connect_when_listening(address: tuple[str, int], deadline: float) -> socket.socket:
    """Connect as soon as someone listens at address (the activator starts up)."""
    while True:
        try:
            return socket.create_connection(address, timeout=20)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.skipif(
    SOCKET_ACTIVATE is None,
    reason="systemd-socket-activate not installed (Debian: package systemd)",
)
def test_under_systemd_socket_activate() -> None:
    assert SOCKET_ACTIVATE is not None
    p1, p2 = _free_port(), _free_port()
    specs = [f"127.0.0.1:{p1}", f"127.0.0.1:{p2},nodelay"]
    activator = subprocess.Popen(
        [
            SOCKET_ACTIVATE,
            "-l",
            f"127.0.0.1:{p1}",
            "-l",
            f"127.0.0.1:{p2}",
            "--fdname=smtp:smtps-nodelay",
            # it hands the child a bare environment: the tree under test (conftest.py)
            f"--setenv=PYTHONPATH={os.environ.get('PYTHONPATH', '')}",
            sys.executable,
            "-c",
            CHILD,
            *specs,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The first connection makes the activator exec the child (Accept=no
        # semantics: the child gets both listening sockets, not the connection).
        first = _connect_when_listening(("127.0.0.1", p1), time.monotonic() + 20)
        with first:
            assert first.makefile("r").readline().strip() == "smtp"
        assert _ask(("127.0.0.1", p2)) == "smtps-nodelay"
        out, err = activator.communicate(timeout=30)
    finally:
        if activator.poll() is None:
            activator.kill()
            activator.wait()
    assert activator.returncode == 0, err
    report: dict[str, Any] = json.loads(out)
    # systemd-socket-activate execs the command itself: LISTEN_PID is its pid.
    assert report["pid"] == activator.pid
    assert report["before"] == {
        "LISTEN_PID": str(activator.pid),
        "LISTEN_FDS": "2",
        "LISTEN_FDNAMES": "smtp:smtps-nodelay",
    }
    assert report["after"] == {k: None for k in VARS}
    assert report["cloexec_before"] == [False, False]
    assert [(s["fd"], s["name"], s["type"], s["cloexec"]) for s in report["sockets"]] == [
        (3, "smtp", "SOCK_STREAM", True),
        (4, "smtps-nodelay", "SOCK_STREAM", True),
    ]
    assert report["matched"] == [[specs[0], False], [specs[1], False]]
    assert report["unbound"] == [] and report["extra"] == []

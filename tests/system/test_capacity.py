"""Capacity: fd limits, derived --max-held, --check-kernel, and the EMFILE back-off."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from repeld.service.capacity import (
    FD_RESERVE,
    Limits,
    capacity_warnings,
    default_max_held,
    epoll_watches,
)


def test_default_max_held_keeps_a_reserve() -> None:
    assert default_max_held(20000) == 20000 - FD_RESERVE
    assert default_max_held(100) == 64  # never below a usable floor


def test_capacity_warnings_name_the_numbers() -> None:
    (fd,) = capacity_warnings(30000, Limits(20000, 20000), 100, 4096)
    assert "--max-held 30000" in fd and "30512" in fd and "20000" in fd
    (bl,) = capacity_warnings(100, Limits(20000, 20000), 8192, 4096)
    assert "--backlog 8192" in bl and "4096" in bl
    assert capacity_warnings(19000, Limits(20000, 20000), 4096, 4096) == []
    # Every held client is one epoll watch, and the user's limit is shared by the
    # workers: past it the kernel refuses to watch one more (`overload` limit=kernel).
    (watch,) = capacity_warnings(19000, Limits(20000, 20000), 4096, 4096, watches=30000, workers=2)
    assert "--max-held 19000 x 2 workers" in watch and "max_user_watches is 30000" in watch
    assert (
        capacity_warnings(19000, Limits(20000, 20000), 4096, 4096, watches=38000, workers=2) == []
    )


def test_check_kernel_prints_the_limits_and_the_fix() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "repeld", "--check-kernel", "--max-held", "50000"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert f"hard {hard}" in out
    if sys.platform.startswith("linux"):
        somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
        assert f"accept queue cap                {somaxconn}" in out
        assert "sysctl -w net.core.somaxconn=" in out
        watches = Path("/proc/sys/fs/epoll/max_user_watches").read_text().strip()
        assert f"epoll watches per user          {watches}" in out
        assert epoll_watches() == int(watches)
    assert "--max-held                      50000" in out
    assert "--max-held 50000 needs about 50512 file descriptors" in out
    assert "LimitNOFILE=100512" in out
    assert "kern.ipc.soacceptqueue" in out and "openfiles=" in out


def test_check_kernel_counts_the_configuration_file_too(tmp_path: Path) -> None:
    # It read the flags only: a file's workers (and max-held) were not counted in
    # the epoll watches and descriptors it asks for.
    config = tmp_path / "repeld.toml"
    config.write_text('backend = "127.0.0.1:25"\nmax-held = 400000\nworkers = 3\n')
    argv = [sys.executable, "-m", "repeld", "--check-kernel", "-c", str(config)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "--max-held                      400000" in out
    if sys.platform.startswith("linux"):
        assert "fs.epoll.max_user_watches=2400000" in out  # twice 400,000 x 3 workers
    out = subprocess.run(
        [*argv, "--max-held", "1000"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "--max-held                      1000" in out  # a flag wins over the file
    config.write_text("workers = 0\n")
    bad = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith(f"repeld: {config}:1: workers:")


def _lower_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_out_of_descriptors_pauses_accepting_and_recovers(tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "repeld",
            "-f",
            "-l",
            f"127.0.0.1:{port}",
            "-b",
            f"127.0.0.1:{dead_port}",
            "-d",
            "1",
            "--max-per-client",
            "1000",
            "--syslog",
            "udp://127.0.0.1:9",
            "--no-cache",
            *(["--user", "root"] if os.geteuid() == 0 else []),
        ],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_lower_nofile,
    )
    clients: list[socket.socket] = []
    try:
        assert proc.stderr is not None
        head = proc.stderr.readline()
        while "listening on" not in head:
            assert head, "repeld exited before listening"
            head += proc.stderr.readline()
        for _ in range(60):  # more than 40 descriptors can hold
            c = socket.create_connection(("127.0.0.1", port), timeout=30)
            clients.append(c)
        cpu_before = _cpu_seconds(proc.pid)
        answers = []
        for c in clients:  # every client is answered in the end: 421 from the dead MTA
            data = b""
            while not data.endswith(b"\n"):
                chunk = c.recv(100)
                if not chunk:
                    break
                data += chunk
            answers.append(data)
            c.close()
        assert all(a.startswith(b"421 4.3.2") for a in answers), answers
        assert proc.poll() is None, "repeld died"
        # paused, not spinning: far less CPU than the seconds spent waiting
        assert _cpu_seconds(proc.pid) - cpu_before < 5.0
        late = socket.create_connection(("127.0.0.1", port), timeout=30)
        late.sendall(b"EHLO early\r\n")
        late.settimeout(30)
        try:
            assert late.recv(100) == b""
        except ConnectionResetError:
            pass
        late.close()
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    log = head + err
    assert "warning: --max-held 64 needs about 576 file descriptors but the limit is 40" in log
    assert "Too many open files; pausing" in log
    assert log.count("pausing") <= 3  # said once per outage, not per attempt
    assert proc.returncode == 0

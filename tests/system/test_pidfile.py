"""repeld.service.pidfile with real files, real locks and real other processes."""

from __future__ import annotations

import json
import os
import pwd
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from repeld.service.pidfile import PidFile, PidFileError, read_pid

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="privilege drop and chroot need root")

# Takes the pid file, says so, and holds it until told to go (or killed).
HOLDER = r"""
import sys
from repeld.service.pidfile import PidFile
pf = PidFile(sys.argv[1])
pf.create()
print("held", flush=True)
sys.stdin.readline()
pf.remove()
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """Another process holding tmp_path/repeld.pid."""
    path = tmp_path / "repeld.pid"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    try:
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_create_writes_our_pid_and_remove_deletes(tmp_path: Path) -> None:
    path = tmp_path / "repeld.pid"
    pf = PidFile(path)
    pf.create()
    assert pf.held
    assert path.read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(path.stat().st_mode) & 0o022 == 0, "never group/world writable"
    assert read_pid(path) == os.getpid()
    pf.remove()
    assert not pf.held
    assert not path.exists()
    pf.remove()  # idempotent


def test_context_manager_and_explicit_pid(tmp_path: Path) -> None:
    path = tmp_path / "repeld.pid"
    with PidFile(path) as pf:
        assert pf.held and read_pid(path) == os.getpid()
    assert not path.exists()
    pf = PidFile(path)
    pf.create(pid=4242)
    assert path.read_text() == "4242\n"
    pf.remove()


def test_taking_it_twice_in_one_process_is_an_error(tmp_path: Path) -> None:
    with PidFile(tmp_path / "p") as pf, pytest.raises(PidFileError, match="already held"):
        pf.create()


def test_a_running_holder_is_refused_by_name(
    holder: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, path = holder
    with pytest.raises(PidFileError) as info:
        PidFile(path).create()
    assert str(info.value) == f"{path}: repeld is already running as pid {proc.pid}"
    assert info.value.pid == proc.pid
    assert read_pid(path) == proc.pid, "the refused attempt must not touch the file"


def test_a_holder_that_exits_cleanly_removes_the_file(
    holder: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, path = holder
    proc.communicate("go\n", timeout=10)
    assert proc.returncode == 0
    assert not path.exists()


def test_a_killed_holder_leaves_a_stale_file_that_is_replaced(
    holder: tuple[subprocess.Popen[str], Path],
) -> None:
    proc, path = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_pid(path) == proc.pid, "SIGKILL leaves the file behind"
    with PidFile(path):
        assert read_pid(path) == os.getpid()


def test_an_unlocked_file_naming_a_live_process_is_stale(tmp_path: Path) -> None:
    # The pid-reuse case: after a crash the old pid may belong to anything now.
    # Only the lock says "repeld is running"; a live pid alone does not.
    path = tmp_path / "repeld.pid"
    with subprocess.Popen(["sleep", "30"]) as other:
        try:
            path.write_text(f"{other.pid}\n")
            with PidFile(path):
                assert read_pid(path) == os.getpid()
            assert other.poll() is None, "the other process is left alone"
        finally:
            other.kill()


@pytest.mark.parametrize("content", ["", "\n", "garbage\n", "-5\n", "12 34 extra long line"])
def test_leftovers_of_any_shape_are_replaced(tmp_path: Path, content: str) -> None:
    path = tmp_path / "repeld.pid"
    path.write_text(content + "x" * 100)
    with PidFile(path):
        assert path.read_text() == f"{os.getpid()}\n", "old content fully truncated"


def test_a_symlink_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("do not truncate me\n")
    link = tmp_path / "repeld.pid"
    link.symlink_to(target)
    with pytest.raises(PidFileError, match="is a symbolic link; refusing"):
        PidFile(link).create()
    assert target.read_text() == "do not truncate me\n"


def test_a_fifo_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "repeld.pid"
    os.mkfifo(path)
    # O_RDWR on a FIFO opens without blocking; the type check refuses it.
    with pytest.raises(PidFileError, match="not a regular file"):
        PidFile(path).create()


def test_unusable_locations_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "dir.pid").mkdir()
    with pytest.raises(PidFileError, match=r"dir\.pid: cannot open: Is a directory"):
        PidFile(tmp_path / "dir.pid").create()
    with pytest.raises(PidFileError, match="cannot open directory: No such file or directory"):
        PidFile(tmp_path / "missing" / "repeld.pid").create()


def test_remove_leaves_a_successors_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "repeld.pid"
    pf = PidFile(path)
    pf.create()
    path.unlink()  # e.g. an admin cleaned up, and another instance started
    path.write_text("999999\n")
    pf.remove()
    assert path.read_text() == "999999\n"


RACER = r"""
import sys
from repeld.service.pidfile import PidFile, PidFileError
sys.stdin.readline()  # start together
pf = PidFile(sys.argv[1])
try:
    pf.create()
except PidFileError:
    print("refused", flush=True)
    sys.exit(0)
print("won", flush=True)
sys.stdin.readline()
"""


def test_only_one_of_many_simultaneous_starters_wins(tmp_path: Path) -> None:
    path = tmp_path / "repeld.pid"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    try:
        for proc in racers:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = {}
        for proc in racers:
            assert proc.stdout is not None
            results[proc.pid] = proc.stdout.readline().strip()
        winners = [pid for pid, result in results.items() if result == "won"]
        assert len(winners) == 1, results
        assert sorted(results.values()).count("refused") == 7
        assert read_pid(path) == winners[0]
    finally:
        for proc in racers:
            proc.kill()
            proc.wait()


def test_read_pid_of_missing_and_odd_files(tmp_path: Path) -> None:
    assert read_pid(tmp_path / "missing") is None
    (tmp_path / "d").mkdir()
    assert read_pid(tmp_path / "d") is None
    (tmp_path / "ok").write_text("123\nmore\n")
    assert read_pid(tmp_path / "ok") == 123
    (tmp_path / "zero").write_text("0\n")
    assert read_pid(tmp_path / "zero") is None


# --- after a privilege drop or chroot (children, as root) ---------------------------------

DROPPER = r"""
import json, os, sys
from repeld.service.pidfile import PidFile
from repeld.service.privileges import drop_privileges
path, chroot = sys.argv[1], sys.argv[2] or None
pf = PidFile(path)
pf.create()
drop_privileges("nobody", None, chroot)
pf.remove()
print(json.dumps({"uid": os.getuid()}), flush=True)
"""


def _run_dropper(path: Path, chroot: Path | None = None) -> None:
    """Create the pid file as root, drop to nobody (maybe chrooted), remove it."""
    out = subprocess.run(
        [sys.executable, "-c", DROPPER, str(path), str(chroot or "")],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["uid"] == pwd.getpwnam("nobody").pw_uid


@needs_root
def test_after_the_drop_a_root_owned_directory_gets_an_emptied_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    path = run / "repeld.pid"
    _run_dropper(path)
    # nobody may not unlink in root's directory: the file stays, empty, so it
    # names no pid, and it is still root's (the daemon never owned it).
    assert path.exists() and path.read_text() == ""
    assert read_pid(path) is None
    assert path.stat().st_uid == 0
    with PidFile(path):  # and the next start takes it over
        assert read_pid(path) == os.getpid()


@needs_root
def test_after_the_drop_a_service_owned_directory_gets_the_file_removed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(run, nobody.pw_uid, nobody.pw_gid)  # the /var/run/repeld/ layout
    path = run / "repeld.pid"
    _run_dropper(path)
    assert not path.exists()


@needs_root
def test_remove_finds_the_file_from_inside_a_chroot(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    nobody = pwd.getpwnam("nobody")
    os.chown(run, nobody.pw_uid, nobody.pw_gid)
    jail = tmp_path / "jail"
    jail.mkdir(mode=0o755)
    path = run / "repeld.pid"
    _run_dropper(path, chroot=jail)
    # The path does not exist inside the jail; the held directory does.
    assert not path.exists()

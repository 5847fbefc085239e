"""The Debian package, built from this tree and installed on a fresh Debian 12 root.

What an administrator gets from `apt-get install ./repeld_*.deb`, checked where nothing
else is installed: `dpkg-buildpackage -us -uc -b` on a copy of the tree's files, lintian
with no error, then a minimal bookworm root made by mmdebstrap (cached as a tarball in
/var/cache/repeld-ci: about 30 s to make once, seconds to unpack), entered with
unshare(1) and chroot(8). There the package is installed with its dependencies from the
Debian mirror (the .debs cached beside the tarball), its files are checked, the daemon
is started from the installed files, cuts off an early talker and relays a patient client
(PROXY header and all) to a backend, the installed units
pass `systemd-analyze verify`, and `apt-get purge` leaves nothing behind.

The chroot shares the host's network namespace, so the test talks to the installed
daemon on 127.77.0.1 from 127.77.0.2. It needs root (chroot, mounts, the service user),
network access (the Python package index for the build, the Debian mirror for the root) and the build
dependencies that .ci/run installs. About 95 s with nothing cached (the root made, the
.debs fetched), 45 s once they are; the build is some 25 s of either.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from repeld import __version__

from ..procs import LineBackend, read_line

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chroot, mounts, adduser"),
]

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path("/var/cache/repeld-ci")
TARBALL = CACHE / "bookworm-minbase.tar"
ARCHIVES = CACHE / "archives"
#: A tarball older than this is made again: the root gets its point-release updates.
TARBALL_MAX_AGE = 7 * 86400
TOOLS = ("dpkg-buildpackage", "lintian", "mmdebstrap", "unshare", "chroot")

SERVER = "127.77.0.1"
CLIENT = "127.77.0.2"
PATIENT = "127.77.0.4"


def _run(argv: list[str], *, timeout: float, cwd: Path | None = None) -> str:
    """Run a command; its stdout and stderr together; fail the test on a non-zero exit."""
    result = subprocess.run(
        argv,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C.UTF-8"},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{argv[:4]} exited {result.returncode}:\n{output[-4000:]}"
    return output


def _chroot_argv(root: Path, *command: str, archives: bool = False) -> list[str]:
    """`command` inside `root`, in a mount namespace of its own with /proc mounted."""
    mounts = 'mount -t proc proc "$0/proc"'
    if archives:  # apt's downloads outlive the root
        mounts += ' && mount --bind /var/cache/repeld-ci/archives "$0/var/cache/apt/archives"'
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        f'{mounts} && exec chroot "$0" "$@"',
        str(root),
        *command,
    ]


def in_root(root: Path, script: str, *, timeout: float = 300, archives: bool = False) -> str:
    """Run a shell script inside the Debian root; its output."""
    return _run(_chroot_argv(root, "sh", "-ec", script, archives=archives), timeout=timeout)


@pytest.fixture(scope="module")
def tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    assert not missing, (
        f"missing {missing}: apt-get install debhelper lintian mmdebstrap (as .ci/run does)"
    )


@pytest.fixture(scope="module")
def deb(tools: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built from a copy of the tree's files (tracked and new, not ignored)."""
    work = tmp_path_factory.mktemp("deb")
    source = work / "repeld"
    files = _run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        timeout=60,
    )
    source.mkdir()
    for name in files.split("\0"):
        path = ROOT / name
        if name and path.is_file():  # a deleted but still tracked file is skipped
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, source / name)
    _run(["dpkg-checkbuilddeps"], cwd=source, timeout=60)
    _run(["dpkg-buildpackage", "-us", "-uc", "-b"], cwd=source, timeout=900)
    arch = _run(["dpkg", "--print-architecture"], timeout=10).strip()
    built = work / f"repeld_{__version__}_{arch}.deb"
    assert built.is_file(), sorted(p.name for p in work.iterdir())
    return built


def _fresh_tarball() -> Path:
    """The cached minimal bookworm root, made again when missing or a week old."""
    if TARBALL.exists() and time.time() - TARBALL.stat().st_mtime < TARBALL_MAX_AGE:
        return TARBALL
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = CACHE / "partial.tar"  # mmdebstrap picks the format from the suffix
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    mirror = [str(sources)] if sources.exists() else []  # else mmdebstrap's default mirror
    _run(
        ["mmdebstrap", "--variant=minbase", "--quiet", "bookworm", str(partial), *mirror],
        timeout=900,
    )
    partial.rename(TARBALL)
    return TARBALL


@pytest.fixture(scope="module")
def debian_root(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh minimal Debian 12 root with the package installed from `deb`."""
    tarball = _fresh_tarball()
    root = tmp_path_factory.mktemp("bookworm")
    _run(["tar", "-xf", str(tarball), "-C", str(root)], timeout=300)
    (ARCHIVES / "partial").mkdir(parents=True, exist_ok=True)
    shutil.copy2("/etc/resolv.conf", root / "etc" / "resolv.conf")
    shutil.copy2(deb, root / "tmp" / deb.name)
    assert not (root / "usr" / "bin" / "python3").exists(), "the root is not a fresh one"
    in_root(
        root,
        f"apt-get update -q && apt-get install -y -q --no-install-recommends /tmp/{deb.name}",
        archives=True,
    )
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_the_package_has_no_lintian_error(deb: Path) -> None:
    result = subprocess.run(
        ["lintian", "--fail-on", "error", str(deb)], capture_output=True, text=True, timeout=300
    )
    errors = [line for line in result.stdout.splitlines() if line.startswith("E:")]
    assert result.returncode == 0 and not errors, result.stdout + result.stderr


def test_the_socket_and_the_service_are_stopped_and_started_together(
    deb: Path, tmp_path: Path
) -> None:
    # Stopped in two calls, a connection queued on an enabled repeld.socket started
    # the service again once it stopped, and a removal left it on port 25.
    _run(["dpkg-deb", "-e", str(deb), str(tmp_path / "control")], timeout=60)
    prerm = (tmp_path / "control" / "prerm").read_text()
    postinst = (tmp_path / "control" / "postinst").read_text()
    both = "'repeld.service' 'repeld.socket'"
    assert f"deb-systemd-invoke stop {both}" in prerm, prerm
    assert f"deb-systemd-invoke $_dh_action {both}" in postinst, postinst
    assert prerm.count("deb-systemd-invoke") == 1


def test_the_installed_files(debian_root: Path) -> None:
    out = in_root(
        debian_root,
        "command -v repeld; repeld --version; getent passwd repeld; getent group repeld; "
        "stat -c '%U:%G %a' /var/lib/repeld; cat /var/lib/dpkg/info/repeld.conffiles",
    )
    lines = out.splitlines()
    assert lines[0] in ("/usr/bin/repeld", "/usr/sbin/repeld")
    assert lines[1] == f"repeld {__version__}"
    user, group = lines[2].split(":"), lines[3].split(":")
    assert user[0] == "repeld" and int(user[2]) < 1000, "a system user"
    assert user[3] == group[2], "its own group is its primary group"
    assert user[6] == "/usr/sbin/nologin"
    assert lines[4] == "repeld:repeld 750"
    conffiles = set(lines[5:])
    for conffile in (
        "/etc/repeld/repeld.toml",
        "/etc/default/repeld",
        "/etc/fail2ban/filter.d/repeld.conf",
        "/etc/fail2ban/jail.d/repeld.conf",
    ):
        assert conffile in conffiles
    for path in (
        "usr/lib/systemd/system/repeld.service",
        "usr/lib/systemd/system/repeld.socket",
        "usr/share/man/man8/repeld.8.gz",
        "usr/share/man/man5/repeld.conf.5.gz",
        "usr/share/doc/repeld/copyright",
    ):
        assert (debian_root / path).is_file(), path
    unit = (debian_root / "usr/lib/systemd/system/repeld.service").read_text()
    assert "ExecStart=/usr/bin/repeld -c /etc/repeld/repeld.toml" in unit
    assert "/usr/local" not in unit
    jail = (debian_root / "etc/fail2ban/jail.d/repeld.conf").read_text()
    assert "\nenabled  = false\n" in jail, "installed disabled"


def test_check_config_accepts_the_installed_configuration(debian_root: Path) -> None:
    out = in_root(debian_root, "repeld --check-config -c /etc/repeld/repeld.toml")
    assert 'user = "repeld"' in out
    assert "trusted = []" in out, "no loopback trusted: a local test sees the delay"


def test_the_units_are_not_enabled_and_verify_clean(debian_root: Path) -> None:
    wants = debian_root / "etc/systemd/system/multi-user.target.wants/repeld.service"
    assert not wants.exists(), "repeld takes port 25 only when the admin enables it"
    # systemd itself, installed after repeld: verify needs its targets and the real paths.
    in_root(debian_root, "apt-get install -y -q --no-install-recommends systemd", archives=True)
    out = in_root(
        debian_root,
        "SYSTEMD_LOG_COLOR=0 systemd-analyze verify --man=no repeld.socket repeld.service",
    )
    assert out.strip() == "", out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((SERVER, 0))
        return int(sock.getsockname()[1])


def _connect(port: int, source: str, daemon: subprocess.Popen[str]) -> socket.socket:
    """A connection from `source` to the installed repeld, once it listens (bounded)."""
    deadline = time.monotonic() + 30
    while True:
        assert daemon.poll() is None, daemon.communicate()
        try:
            return socket.create_connection((SERVER, port), 5, (source, 0))
        except ConnectionRefusedError:
            assert time.monotonic() < deadline, "the installed repeld never listened"
            time.sleep(0.2)


def test_the_installed_daemon_cuts_off_an_early_talker_and_relays_a_patient_client(
    debian_root: Path,
) -> None:
    port = _free_port()
    backend = LineBackend()  # on the host: the chroot shares its loopback
    argv = _chroot_argv(
        debian_root,
        "repeld",
        "-c",
        "/etc/repeld/repeld.toml",  # as installed: PROXY v1, the SQLite cache, user repeld
        "--listen",
        f"{SERVER}:{port}",
        "--backend",
        backend.address,
        "--delay",
        "2",
        "-f",
    )
    daemon = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with _connect(port, CLIENT, daemon) as early:
            early.sendall(b"EHLO early.example\r\n")
            received = b""
            try:  # the drop (an EOF or a reset) comes before the greeting
                while chunk := early.recv(4096):
                    received += chunk
            except ConnectionResetError:
                pass
        assert not received.startswith(b"220"), received
        with _connect(port, PATIENT, daemon) as patient:
            assert read_line(patient) == b"220 backend.test ESMTP\r\n"
            patient.sendall(b"QUIT\r\n")
            # LineBackend answers every line, the PROXY header too: 250, then 221.
            assert [read_line(patient) for _ in range(2)][-1] == b"221 2.0.0 bye\r\n"
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
        backend.close()
    assert daemon.returncode == 0, err
    early_events = [line for line in err.splitlines() if " early-talker: " in line]
    assert early_events and f"[{CLIENT}]" in early_events[0], err
    # (repeld's own backend check at start-up sends a PROXY header of its own first.)
    header = f"PROXY TCP4 {PATIENT} {SERVER} ".encode()
    assert any(line.startswith(header) for line in backend.lines), backend.lines


def test_purge_leaves_nothing(debian_root: Path) -> None:
    in_root(debian_root, "apt-get purge -y -q repeld", archives=True)
    out = in_root(
        debian_root,
        "getent passwd repeld || echo no-user; getent group repeld || echo no-group",
    )
    assert out.split() == ["no-user", "no-group"]
    for path in (
        "etc/repeld",
        "etc/default/repeld",
        "etc/fail2ban/filter.d/repeld.conf",
        "etc/fail2ban/jail.d/repeld.conf",
        "usr/lib/repeld",
        "usr/bin/repeld",
        "var/lib/repeld",
        "usr/lib/systemd/system/repeld.service",
        "usr/share/man/man8/repeld.8.gz",
    ):
        assert not (debian_root / path).exists(), path

"""The command line: bad input gets one line naming the flag and the value, status 2.

The table runs `repeld.cli.main()` in-process with `--check-config`, so a value
that is wrongly accepted prints the settings instead of serving; a few cases
run `python -m repeld` for real, always on 127.0.0.1 and under a timeout.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from repeld import __version__
from repeld.cli import main, parse_args, settings_from
from repeld.config.settings import OPTIONS

from ..procs import run_repeld

#: For runs that get as far as starting: drop root, and no pass cache under /var.
USER_ARGS = ["--no-cache", *(["--user", "nobody"] if os.geteuid() == 0 else [])]


@pytest.fixture
def config(tmp_path: Path) -> str:
    """An explicit, empty configuration file: only the flags count."""
    path = tmp_path / "repeld.toml"
    path.write_text("")
    return str(path)


def base(config: str, *, backend: bool = True) -> list[str]:
    # --check-config asks what start-up would: as root, a user to drop to must exist.
    args = ["--config", config, "--listen", "127.0.0.1:0", *USER_ARGS[1:]]
    if backend:
        args += ["--backend", "127.0.0.1:25"]
    return args


def run_main(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[object, str, str]:
    """main(argv) in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        status: object = main(list(argv))
    except SystemExit as exc:
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def one_line(err: str) -> str:
    assert err.endswith("\n"), repr(err)
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("repeld: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


# -- the baseline the table varies ---------------------------------------------------


def test_baseline_is_accepted(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_main([*base(config), "--check-config"], capsys)
    assert status == 0, err
    assert err == ""
    assert 'backend = "127.0.0.1:25"' in out


# -- the table of bad values -----------------------------------------------------------

BAD_VALUES: list[Any] = [
    ("delay", "abc"),
    ("delay", "0"),
    ("delay", "-1"),
    ("delay", "99999"),
    ("delay", "3600.5"),
    ("delay", "nan"),
    ("delay", "inf"),
    ("delay", ""),
    ("listen", "127.0.0.1"),  # no port
    ("listen", "127.0.0.1:"),
    ("listen", "localhost:25"),  # a host name
    ("listen", "mx.example.org:25"),
    ("listen", "::1:25"),  # IPv6 without brackets
    ("listen", "[::1]25"),
    ("listen", "[::1:25"),
    ("listen", "127.0.0.1:25,fast"),  # unknown listener flag
    ("listen", "127.0.0.1:65536"),
    ("listen", "127.0.0.1:smtp"),
    ("backend", "nope"),
    ("backend", "127.0.0.1:0"),
    ("backend", "127.0.0.1:smtp"),
    ("backend", "::1:25"),
    ("backend", "a" * 64 + ".example.org:25"),  # a label of 64: UnicodeError in the resolver
    ("backend", "mx.-example.org:25"),
    ("backend", "mx-.example.org:25"),
    ("backend", "mx..example.org:25"),
    ("backend", "mx_1.example.org:25"),
    ("backend", "mx.ex\u00e4mple.org:25"),
    ("syslog", "udp://log_host:514"),
    ("syslog", "tcp://" + "b" * 64 + ":514"),
    ("proxy-protocol", "v3"),
    ("proxy-protocol", "V1"),
    ("proxy-protocol", "yes"),
    ("on-early", "kill"),
    ("on-early", "tarpit"),
    ("log-format", "xml"),
    ("log-format", "JSON"),
    ("facility", "mial"),
    ("facility", "local8"),
    ("sd-id", "repeld"),
    ("sd-id", "re peld@32473"),
    ("sd-id", "repeld@pen"),
    ("sd-id", "x" * 40 + "@1"),
    ("syslog", "http://127.0.0.1:514"),
    ("syslog", "udp://127.0.0.1:0"),
    pytest.param(
        "syslog",
        "udp://127.0.0.1",
    ),
    pytest.param(
        "syslog",
        "tcp://[::1]",
    ),
    ("syslog", "relative/log"),
    ("trusted", "300.1.1.1"),
    ("trusted", "10.0.0.0/33"),
    ("trusted", "127.1"),
    ("trusted", "10.1.2.3/8"),  # host bits set
    ("trusted", "2001:db8::1/32"),
    ("relay-timeout", "0"),
    ("connect-timeout", "abc"),
]


@pytest.mark.parametrize(("flag", "value"), BAD_VALUES)
def test_bad_value_is_one_line_naming_flag_and_value_status_2(
    config: str, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    status, out, err = run_main([*base(config), f"--{flag}", value, "--check-config"], capsys)
    assert status == 2
    assert out == ""  # nothing was checked, let alone served
    line = one_line(err)
    assert f"--{flag}" in line
    assert repr(value) in line


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        pytest.param("listen", "127.0.0.1:2_5", id="listen-underscore"),
        pytest.param("backend", "127.0.0.1:2_5", id="backend-underscore"),
        pytest.param("listen", "127.0.0.1:\u0662\u0665", id="listen-arabic-indic-digits"),
        pytest.param("delay", "2_5", id="delay-underscore"),
    ],
)
def test_numbers_are_ascii_digits_only(
    config: str, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    status, _out, err = run_main([*base(config), f"--{flag}", value, "--check-config"], capsys)
    assert status == 2
    assert f"--{flag}" in one_line(err)


def test_sd_id_with_a_newline_is_refused(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, _out, err = run_main(
        [*base(config), "--sd-id", "repeld@32473\n", "--check-config"], capsys
    )
    assert status == 2
    assert "--sd-id" in one_line(err)


def test_unknown_flag(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_main([*base(config), "--frobnicate", "--check-config"], capsys)
    assert status == 2
    assert out == ""
    assert "--frobnicate" in one_line(err)


def test_missing_backend(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_main([*base(config, backend=False), "--check-config"], capsys)
    assert status == 2
    assert out == ""
    assert "--backend" in one_line(err)


def test_listen_twice(config: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*base(config), "--listen", "127.0.0.1:2525", "--listen", "127.0.0.1:2525"]
    status, out, err = run_main([*argv, "--check-config"], capsys)
    assert status == 2
    assert out == ""
    line = one_line(err)
    assert "--listen" in line
    assert "127.0.0.1:2525" in line


# -- trusted-network files ----------------------------------------------------------------


def test_missing_trusted_file(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "no-such-file")
    status, out, err = run_main([*base(config), "-T", path, "--check-config"], capsys)
    assert status == 2
    assert out == ""
    line = one_line(err)
    assert "--trusted-file" in line
    assert repr(path) in line
    assert "No such file" in line


def test_trusted_file_that_is_a_directory(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_main([*base(config), "-T", str(tmp_path), "--check-config"], capsys)
    assert status == 2
    assert out == ""
    line = one_line(err)
    assert "--trusted-file" in line
    assert repr(str(tmp_path)) in line


def test_trusted_file_that_is_not_utf8(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "trusted.txt"
    path.write_bytes(b"127.0.0.1\n\xff\xfe 10.0.0.0/8\n")
    status, out, err = run_main([*base(config), "-T", str(path), "--check-config"], capsys)
    assert status == 2
    assert out == ""
    line = one_line(err)
    assert "--trusted-file" in line
    assert repr(str(path)) in line


def test_bad_line_in_trusted_file_names_file_and_line(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "trusted.txt"
    path.write_text("127.0.0.0/8   # loopback\n# a comment\n\nnot-a-network\n::1\n")
    status, out, err = run_main([*base(config), "-T", str(path), "--check-config"], capsys)
    assert status == 2
    assert out == ""
    line = one_line(err)
    assert "--trusted-file" in line
    assert repr(str(path)) in line
    assert "line 4" in line
    assert "not-a-network" in line


def test_good_trusted_file_is_accepted(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "trusted.txt"
    path.write_text("127.0.0.0/8   # loopback\n# a comment\n\n  ::1  \n192.0.2.0/24\n")
    status, _out, err = run_main([*base(config), "-T", str(path), "--check-config"], capsys)
    assert status == 0, err


# -- version and help ----------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_main(["--version"], capsys)
    assert status == 0
    assert out == f"repeld {__version__}\n"
    assert err == ""


def test_help_mentions_every_long_option(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _err = run_main(["--help"], capsys)
    assert status == 0
    missing = [f"--{o.name}" for o in OPTIONS if f"--{o.name}" not in out]
    missing += [f"--no-{o.name}" for o in OPTIONS if o.negatable and f"--no-{o.name}" not in out]
    assert not missing, out
    for short in (o.short for o in OPTIONS if o.short):
        assert short in out
    assert "--version" in out


# -- the real program ------------------------------------------------------------------------


def test_subprocess_bad_delay(config: str) -> None:
    proc = run_repeld(*base(config), *USER_ARGS, "--delay", "abc")
    assert proc.returncode == 2
    assert proc.stdout == ""
    line = one_line(proc.stderr)
    assert "--delay" in line and "'abc'" in line


def test_subprocess_missing_backend(config: str) -> None:
    proc = run_repeld(*base(config, backend=False), *USER_ARGS)
    assert proc.returncode == 2
    assert "--backend" in one_line(proc.stderr)


def test_subprocess_bad_trusted_file_is_reported_before_serving(
    config: str, tmp_path: Path
) -> None:
    path = tmp_path / "trusted.txt"
    path.write_text("127.0.0.2\n10.0.0.0/8\n10.1.2.3.4\n")
    # No --check-config: the real start-up path must stop before binding.
    proc = run_repeld(*base(config), *USER_ARGS, "-T", str(path))
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert str(path) in line and "line 3" in line


def test_subprocess_unreadable_trusted_file(config: str, tmp_path: Path) -> None:
    proc = run_repeld(*base(config), *USER_ARGS, "-T", str(tmp_path / "absent"))
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "--trusted-file" in line and "absent" in line


def test_subprocess_port_in_use_is_one_line_status_1(config: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = run_repeld(
            "--config", config, *USER_ARGS,
            "--listen", f"127.0.0.1:{port}",
            "--backend", "127.0.0.1:25",
            "--syslog", "udp://127.0.0.1:9",
        )  # fmt: skip
    assert proc.returncode == 1
    line = one_line(proc.stderr)
    assert "in use" in line.lower()


def test_subprocess_version_and_help() -> None:
    proc = run_repeld("--version")
    assert proc.returncode == 0
    assert proc.stdout == f"repeld {__version__}\n"
    proc = run_repeld("--help")
    assert proc.returncode == 0
    assert all(f"--{o.name}" in proc.stdout for o in OPTIONS)


# -- configuration reading never crashes (issue 11) ---------------------------------------

#: `trusted = [[[ ... ]]]` nested far deeper than tomllib's recursion can follow.
DEEP = "trusted = " + "[" * 1000 + "]" * 1000 + "\n"


def test_subprocess_deeply_nested_config_is_one_line_status_2(tmp_path: Path) -> None:
    path = tmp_path / "repeld.toml"
    path.write_text('backend = "127.0.0.1:25"\n' + DEEP)
    for extra in (["--check-config"], USER_ARGS):  # both paths stop before serving
        proc = run_repeld("-c", str(path), "--listen", "127.0.0.1:0", *extra)
        assert proc.returncode == 2
        line = one_line(proc.stderr)
        assert str(path) in line and "nested too deeply" in line


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory"])
def test_config_that_is_not_a_regular_file_is_refused_at_once(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if kind == "dev-zero":
        path = "/dev/zero"
    elif kind == "fifo":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)  # nobody writes: opening it for reading would block forever
    else:
        path = str(tmp_path)
    status, out, err = run_main(["-c", path, "--backend", "127.0.0.1:25", "--check-config"], capsys)
    assert status == 2 and out == ""
    line = one_line(err)
    assert path in line and ("not a regular file" in line or "directory" in line.lower())


def test_config_larger_than_1_mib_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "repeld.toml"
    path.write_text('backend = "127.0.0.1:25"\n' + "#" * (1 << 20) + "\n")
    status, _out, err = run_main(["-c", str(path), "--check-config"], capsys)
    assert status == 2
    line = one_line(err)
    assert str(path) in line and "1 MiB" in line


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "big"])
def test_trusted_file_that_is_not_a_bounded_regular_file_is_refused(
    kind: str, config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if kind == "dev-zero":
        path = "/dev/zero"
    elif kind == "fifo":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    else:
        path = str(tmp_path / "big.txt")
        Path(path).write_text("127.0.0.1\n" * 200_000)
    status, _out, err = run_main([*base(config), "-T", path, "--check-config"], capsys)
    assert status == 2
    line = one_line(err)
    assert "--trusted-file" in line and path in line
    assert "not a regular file" in line or "1 MiB" in line


def test_a_2_mb_backend_name_is_refused_in_one_short_line(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "a" * 2_000_000 + ".example.org:25"
    status, out, err = run_main([*base(config), "--backend", name, "--check-config"], capsys)
    assert status == 2 and out == ""
    line = one_line(err)
    assert "--backend" in line and "more than 253" in line
    assert len(line) < 400  # the value is cut in the message


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("10.1.2.3/8", "10.0.0.0/8"),
        ("192.0.2.7/24", "192.0.2.0/24"),
        ("2001:db8::1/32", "2001:db8::/32"),
    ],
)
def test_a_network_with_host_bits_set_is_refused_with_a_hint(
    config: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, hint: str
) -> None:
    status, _out, err = run_main([*base(config), "--trusted", value, "--check-config"], capsys)
    assert status == 2
    assert f"host bits set: did you mean {hint}?" in one_line(err)
    path = tmp_path / "trusted.txt"
    path.write_text(f"127.0.0.2\n{value}  # a typo\n")
    status, _out, err = run_main([*base(config), "-T", str(path), "--check-config"], capsys)
    assert status == 2
    line = one_line(err)
    assert str(path) in line and "line 2" in line and f"did you mean {hint}?" in line


def test_host_names_and_addresses_that_stay_accepted(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # As values (--check-config would resolve the names, and tests ask no DNS server).
    for backend in (
        "mx.example.org:25",
        "mx.example.org.:25",
        "localhost:25",
        "MX-1.Example.ORG:25",
        ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61]) + ":25",  # 253 characters
        "127.0.0.1:25",
        "[2001:db8::7]:25",
    ):
        flags, actions = parse_args([*base(config, backend=False), "-b", backend])
        assert str(settings_from(flags, actions).backend) == backend
    status, _out, err = run_main(
        [
            *base(config),
            "-t",
            "10.0.0.0/8",
            "-t",
            "192.0.2.7",
            "-t",
            "2001:db8::/32",
            "--check-config",
        ],
        capsys,
    )
    assert (status, err) == (0, "")


def test_a_redis_host_name_is_checked_like_a_backend(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "redis://" + "r" * 64 + ".example.org:6379/0"
    status, _out, err = run_main([*base(config), "--cache", url, "--check-config"], capsys)
    assert status == 2
    line = one_line(err)
    assert "--cache" in line and "more than 63" in line


# -- --check-config asks what start-up would refuse on this machine -------------------


def test_check_config_refuses_what_start_up_would(
    config: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    absent = tmp_path / "absent"
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    status, out, err = run_main(
        [
            *base(config),
            "--chroot",
            str(absent),
            "--pidfile",
            f"{a_file}/repeld.pid",
            "--check-config",
        ],
        capsys,
    )
    assert (status, out) == (2, "")
    assert err.splitlines() == [
        f"repeld: --chroot: no such directory {str(absent)!r}",
        f"repeld: --pidfile: not a directory {str(a_file)!r}",
    ]


def test_check_config_names_a_missing_user_or_group(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() == 0:  # root: start-up would drop to that user
        status, _, err = run_main(
            [*base(config), "--user", "repeld-no-such", "--check-config"], capsys
        )
        assert status == 2
        assert one_line(err) == "repeld: --user: no such user 'repeld-no-such'"
        argv = [*base(config), "--user", "nobody", "--group", "repeld-no-such", "--check-config"]
    else:  # not root: staying as ourselves, the group must still exist
        argv = [*base(config), "--group", "repeld-no-such", "--check-config"]
    status, _, err = run_main(argv, capsys)
    assert status == 2
    assert one_line(err) == "repeld: --group: no such group 'repeld-no-such'"


def test_check_config_refuses_a_user_switch_without_root(
    config: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() == 0:
        pytest.skip("root may switch to any user")
    status, _, err = run_main([*base(config), "--user", "root", "--check-config"], capsys)
    assert status == 2
    assert one_line(err).startswith("repeld: --user: cannot become 'root' (uid 0) without root")


def test_check_config_accepts_an_existing_chroot_and_pidfile_directory(
    config: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = [*base(config), "--pidfile", str(tmp_path / "repeld.pid")]
    if os.geteuid() == 0:  # chroot(2) needs root; without it --chroot is refused
        argv += ["--chroot", str(tmp_path)]
    status, out, err = run_main([*argv, "--check-config"], capsys)
    assert (status, err) == (0, "")
    assert f'pidfile = "{tmp_path / "repeld.pid"}"' in out


#: A child that drops to nobody (everything it needs imported first: the Python
#: installation may be root's alone) and runs repeld --check-backend.
_CHECK_AS_NOBODY = """
import os, sys
import pwd, trio
import repeld.cli, repeld.config.values, repeld.process.workers, repeld.shell.backendcheck
nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
sys.exit(repeld.cli.main(sys.argv[1:]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_check_backend_not_as_root_says_it_did_not_check_as_the_user() -> None:
    # Only root can look at a pass: service as --user will; anyone else checks as
    # itself, and the check says so instead of passing for the daemon's view.
    args = ["--check-backend", "-b", "pass:/nonexistent/smtpd", "--user", "postfix",
            "--no-cache"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK_AS_NOBODY, *args], cwd="/", capture_output=True,
        text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED: pass: socket missing" in proc.stdout
    uid = pwd.getpwnam("nobody").pw_uid
    assert (
        f"repeld: note: pass: services were checked as uid {uid}, not as --user postfix: "
        "only root can check them as repeld will run"
    ) in proc.stderr


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and util-linux's unshare (a private mount of /etc/resolv.conf)",
)
def test_check_config_refuses_a_backend_name_that_start_up_cannot_resolve(
    tmp_path: Path,
) -> None:
    # Start-up and every reload resolve the backend's name, and refuse one that
    # does not resolve; --check-config (the unit's ExecReload, rc.d's pre-check)
    # passed it, and the next restart left port 25 closed. The name is looked up
    # through a resolv.conf of its own naming a loopback port nothing answers on.
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    config = tmp_path / "repeld.toml"
    config.write_text(
        'backend = "mta.repeld-test.invalid:25"\n'
        'listen = ["127.0.0.1:2525", "127.0.0.1:2526,backend=127.0.0.1:10025"]\n'
    )
    me = pwd.getpwuid(os.geteuid()).pw_name
    argv = [sys.executable, "-m", "repeld", "--check-config", "-c", str(config), "--user", me]
    script = f"mount --bind {shlex.quote(str(conf))} /etc/resolv.conf && exec {shlex.join(argv)}"

    def check() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["unshare", "-m", "sh", "-c", script],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    done = check()
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("repeld: --backend mta.repeld-test.invalid:25: cannot resolve: ")
    # A listener's backend= name: a reload keeps what it resolved to (listeners
    # change at a restart only), so a reload is not refused for it; it is said.
    config.write_text(
        'backend = "127.0.0.1:25"\n'
        'listen = ["127.0.0.1:2525", "127.0.0.1:2526,backend=mta.repeld-test.invalid:10025"]\n'
    )
    done = check()
    assert done.returncode == 0, done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(
        "repeld: warning: --backend mta.repeld-test.invalid:10025: cannot resolve: "
    )
    assert line.endswith("(a listener's: a restart would refuse it)")

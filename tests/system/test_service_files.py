"""The service files: scripts/rc.d/repeld and scripts/systemd/repeld.{service,socket}.

rc.d: `sh -n`, then the script really run by dash against tests/rcsubr_stub/rc.subr
(a small, documented stand-in for FreeBSD's rc.subr), with a daemon(8) shim and
a fake repeld that record what they were given and which signals reached them.

systemd: the units parsed and checked against repeld's own defaults, then
`systemd-analyze verify` (with ExecStart pointed at a stub executable, since
verify insists that it exists) and `systemd-analyze security --offline`.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from repeld.config.settings import OPTION_BY_NAME, parse_listen
from repeld.service.activation import is_nodelay_name

ROOT = Path(__file__).resolve().parents[2]
RC_SCRIPT = ROOT / "scripts" / "rc.d" / "repeld"
STUB_DIR = Path(__file__).resolve().parents[1] / "rcsubr_stub"
SERVICE = ROOT / "scripts" / "systemd" / "repeld.service"
SAMPLE = ROOT / "scripts" / "repeld.toml.sample"
SOCKET = ROOT / "scripts" / "systemd" / "repeld.socket"
DASH = shutil.which("dash")
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_dash = pytest.mark.skipif(DASH is None, reason="dash not installed (Debian: package dash)")
needs_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (Debian: package systemd)"
)


# --- rc.d: syntax -------------------------------------------------------------------------


@pytest.mark.parametrize("shell", ["sh", "dash"])
def test_rc_script_parses(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} not installed")
    result = subprocess.run([shell, "-n", str(RC_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_rc_script_has_rc_subr_metadata() -> None:
    text = RC_SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert "# PROVIDE: repeld\n" in text
    assert re.search(r"^# REQUIRE: .*\bLOGIN\b", text, re.M)
    assert "# KEYWORD: shutdown\n" in text, "stopped at shutdown, so relays get their grace"
    assert os.access(RC_SCRIPT, os.X_OK), "rc.d scripts are run, not sourced"
    assert "\n. /etc/rc.subr\n" in text
    assert text.rstrip().endswith('run_rc_command "$1"')


# --- rc.d: run under the rc.subr stub ----------------------------------------------------


@dataclass
class RcEnv:
    """A sandbox: the script with its absolute paths pointed into tmp, and its logs."""

    tmp: Path
    script: Path
    rc_conf: Path
    config: Path
    pidfile: Path
    child_pidfile: Path
    daemon: Path
    repeld: Path
    daemon_log: Path
    repeld_log: Path
    output: Path

    def conf(self, **values: str) -> None:
        """Write rc.conf with the sandbox's paths plus `values`."""
        settings = {
            "repeld_enable": "YES",
            "repeld_config": str(self.config),
            "repeld_pidfile": str(self.pidfile),
            "repeld_child_pidfile": str(self.child_pidfile),
            **values,
        }
        self.rc_conf.write_text("".join(f'{k}="{v}"\n' for k, v in settings.items()))

    def run(self, arg: str, **env: str) -> subprocess.CompletedProcess[str]:
        """Run the rc.d script with dash, as /etc/rc or service(8) would."""
        assert DASH is not None
        environ = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "RC_CONF": str(self.rc_conf),
            "DAEMON_SHIM_LOG": str(self.daemon_log),
            "DAEMON_SHIM_OUTPUT": str(self.output),
            "FAKE_REPELD_LOG": str(self.repeld_log),
            **env,
        }
        return subprocess.run(
            [DASH, str(self.script), arg], env=environ, capture_output=True, text=True, timeout=60
        )

    def daemon_entries(self) -> list[dict[str, Any]]:
        """What the daemon(8) shim logged."""
        return _json_lines(self.daemon_log)

    def repeld_entries(self) -> list[dict[str, Any]]:
        """What the fake repeld logged."""
        return _json_lines(self.repeld_log)

    def pid(self, path: Path) -> int | None:
        """The pid in a pid file, if there is one."""
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text else None


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """Every JSON line of a log file (none if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _install_python(source: Path, target: Path) -> None:
    """Install a Python script as an executable run by this interpreter."""
    target.write_text(f"#!{sys.executable}\n" + source.read_text())
    target.chmod(0o755)


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 15) -> None:
    """Poll until check() holds (daemon(8) detaches, so its effects come later)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Whether a process exists (and is not a zombie of ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def rc(tmp_path: Path) -> Iterator[RcEnv]:
    """The sandbox; on teardown, kills whatever the shim left running."""
    if DASH is None:
        pytest.skip("dash not installed (Debian: package dash)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = RcEnv(
        tmp=tmp_path,
        script=tmp_path / "repeld.rc",
        rc_conf=tmp_path / "rc.conf",
        config=tmp_path / "repeld.toml",
        pidfile=tmp_path / "repeld.pid",
        child_pidfile=tmp_path / "repeld.child.pid",
        daemon=bin_dir / "daemon",
        repeld=bin_dir / "repeld",
        daemon_log=tmp_path / "daemon.log",
        repeld_log=tmp_path / "repeld.log",
        output=tmp_path / "daemon.output",
    )
    _install_python(STUB_DIR / "daemon_shim.py", env.daemon)
    _install_python(STUB_DIR / "fake_repeld.py", env.repeld)
    text = RC_SCRIPT.read_text()
    for real, sandboxed in [
        ("/etc/rc.subr", str(STUB_DIR / "rc.subr")),
        ("/usr/sbin/daemon", str(env.daemon)),
        ("/usr/local/bin/repeld", str(env.repeld)),
    ]:
        assert real in text, f"the script no longer mentions {real}"
        text = text.replace(real, sandboxed)
    env.script.write_text(text)
    env.config.write_text('backend = "127.0.0.1:10025"\n')
    env.conf()
    try:
        yield env
    finally:
        for path in (env.pidfile, env.child_pidfile):
            pid = env.pid(path)
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _start(rc: RcEnv) -> tuple[int, int]:
    """`start`, then wait until both pid files are written; (supervisor, child)."""
    result = rc.run("start")
    assert result.returncode == 0, result.stderr
    assert "Starting repeld." in result.stdout
    _wait_for("both pid files", lambda: bool(rc.pid(rc.pidfile) and rc.pid(rc.child_pidfile)))
    supervisor, child = rc.pid(rc.pidfile), rc.pid(rc.child_pidfile)
    assert supervisor is not None and child is not None
    _wait_for("the child to run", lambda: any(e.get("pid") == child for e in rc.repeld_entries()))
    return supervisor, child


def test_start_builds_the_daemon_command_line(rc: RcEnv) -> None:
    # A value with a space, quoted, is one argument to the check as to the start
    # (rc.subr evals the start's command line; the check split it on the space).
    rc.conf(repeld_flags="--delay 10 -l 127.0.0.1:2525 --teaser-text 'mx.test ESMTP'")
    supervisor, child = _start(rc)
    ((first,),) = [list(e.values()) for e in rc.daemon_entries()[:1]]
    assert first == [
        "-r",
        "-P",
        str(rc.pidfile),
        "-p",
        str(rc.child_pidfile),
        "-t",
        "repeld",
        "-S",
        "-T",
        "repeld",
        str(rc.repeld),
        "-c",
        str(rc.config),
        "--delay",
        "10",
        "-l",
        "127.0.0.1:2525",
        "--teaser-text",
        "mx.test ESMTP",
    ]
    check, run = rc.repeld_entries()[:2]
    # The configuration is checked, with the same flags, before daemon(8) detaches.
    assert check["argv"] == [
        "--check-config",
        "-c",
        str(rc.config),
        "--delay",
        "10",
        "-l",
        "127.0.0.1:2525",
        "--teaser-text",
        "mx.test ESMTP",
    ]
    assert run["pid"] == child
    assert run["argv"] == first[10 + 1 :]
    # No --user unless rc.conf names one: the configuration's `user` decides (a flag
    # would override user = "postfix", which a pass: backend to private/ needs).
    assert "--user" not in first
    assert supervisor != child


def test_repeld_user_becomes_a_flag_not_su(rc: RcEnv) -> None:
    # The stub refuses ${name}_user (real rc.subr would su(1) to it, and an
    # unprivileged process cannot bind port 25): reaching daemon(8) at all
    # shows the script took the variable over.
    rc.conf(repeld_user="mailnull")
    _start(rc)
    argv = rc.daemon_entries()[0]["argv"]
    assert argv[argv.index("--user") :][:2] == ["--user", "mailnull"]
    rc.conf(repeld_user="root")
    assert rc.run("stop").returncode == 0
    _start(rc)
    argv = rc.daemon_entries()[-1]["argv"]
    assert argv[argv.index("--user") :][:2] == ["--user", "root"]


def test_status_start_twice_reload_stop(rc: RcEnv) -> None:
    not_yet = rc.run("status")
    assert (not_yet.returncode, not_yet.stdout) == (1, "repeld is not running.\n")

    supervisor, child = _start(rc)
    status = rc.run("status")
    assert (status.returncode, status.stdout) == (0, f"repeld is running as pid {supervisor}.\n")

    again = rc.run("start")
    assert again.returncode == 1
    assert f"repeld already running? (pid={supervisor})." in again.stderr
    assert len(rc.daemon_entries()) == 1, "daemon(8) not run a second time"

    reload = rc.run("reload")
    assert reload.returncode == 0, reload.stderr
    assert "Reloading repeld configuration." in reload.stdout
    _wait_for("the HUP", lambda: {"pid": child, "signal": "HUP"} in rc.repeld_entries())
    # The HUP went to repeld, not to daemon(8) (which would have ignored it),
    # the configuration was checked first, and repeld was not restarted.
    assert not [e for e in rc.daemon_entries() if e.get("signal") == "HUP"]
    assert rc.repeld_entries()[-2]["argv"][:1] == ["--check-config"]
    assert rc.pid(rc.child_pidfile) == child

    stop = rc.run("stop")
    assert stop.returncode == 0, stop.stderr
    assert stop.stdout.startswith("Stopping repeld.")
    # rc.subr waited for the supervisor, which forwarded TERM and did not restart.
    assert not _alive(supervisor)
    assert {"signal": "TERM", "forwarded_to": child} in rc.daemon_entries()
    assert {"pid": child, "signal": "TERM"} in rc.repeld_entries()
    assert not _alive(child)
    assert not rc.pidfile.exists() and not rc.child_pidfile.exists()
    assert rc.run("status").returncode == 1


def test_daemon_restarts_a_dead_repeld_and_reload_follows_it(rc: RcEnv) -> None:
    supervisor, child = _start(rc)
    os.kill(child, signal.SIGKILL)
    _wait_for(
        "the restart",
        lambda: (
            rc.pid(rc.child_pidfile) not in (None, child)
            and any(e.get("pid") == rc.pid(rc.child_pidfile) for e in rc.repeld_entries())
        ),
    )
    new_child = rc.pid(rc.child_pidfile)
    assert rc.run("reload").returncode == 0
    _wait_for("the HUP", lambda: {"pid": new_child, "signal": "HUP"} in rc.repeld_entries())
    assert rc.pid(rc.pidfile) == supervisor
    assert rc.run("stop").returncode == 0


def test_the_stub_would_catch_a_leaked_repeld_user(rc: RcEnv) -> None:
    # The control for the test above: without the script's `unset`, the stub
    # (like real rc.subr, which would su(1)) does not run the command as given.
    text = rc.script.read_text()
    assert "\nunset repeld_user\n" in text
    rc.script.write_text(text.replace("\nunset repeld_user\n", "\n"))
    rc.conf(repeld_user="repeld")
    start = rc.run("start")
    assert start.returncode == 1
    assert "$repeld_user=repeld: rc.subr would su(1) to it" in start.stderr
    assert rc.daemon_entries() == []


def test_status_ignores_a_pidfile_naming_some_other_process(rc: RcEnv) -> None:
    # A stale pid file whose pid now belongs to something else: rc.subr checks
    # the process against procname (daemon), so repeld is "not running".
    with subprocess.Popen(["sleep", "30"]) as other:
        try:
            rc.pidfile.write_text(f"{other.pid}\n")
            status = rc.run("status")
            assert (status.returncode, status.stdout) == (1, "repeld is not running.\n")
            stop = rc.run("stop")
            assert stop.returncode == 1
            assert other.poll() is None, "stop must not kill an unrelated process"
        finally:
            other.kill()


def test_checkconfig_runs_repeld_check_config(rc: RcEnv) -> None:
    rc.conf(repeld_flags="--delay 5")
    good = rc.run("checkconfig")
    assert good.returncode == 0
    assert good.stdout == (
        f"Performing sanity check on repeld configuration:\nrepeld: {rc.config}: OK\n"
    )
    assert rc.repeld_entries()[-1]["argv"] == [
        "--check-config",
        "-c",
        str(rc.config),
        "--delay",
        "5",
    ]
    rc.config.write_text("delay = bad\n")
    bad = rc.run("checkconfig")
    assert bad.returncode != 0
    assert f"repeld: {rc.config}: line 1: bad value" in bad.stderr


def test_a_bad_configuration_stops_start_and_reload(rc: RcEnv) -> None:
    rc.config.write_text("delay = bad\n")
    start = rc.run("start")
    assert start.returncode == 1
    assert f"repeld: {rc.config}: line 1: bad value" in start.stderr
    assert "has errors; not starting repeld" in start.stderr
    assert rc.daemon_entries() == [], "daemon(8) never ran"

    rc.config.write_text('backend = "127.0.0.1:10025"\n')
    _, child = _start(rc)
    rc.config.write_text("delay = bad\n")
    reload = rc.run("reload")
    assert reload.returncode != 0
    assert {"pid": child, "signal": "HUP"} not in rc.repeld_entries()
    assert rc.run("stop").returncode == 0


def test_a_missing_configuration_file_is_reported(rc: RcEnv) -> None:
    rc.config.unlink()
    start = rc.run("start")
    assert start.returncode == 1
    assert f"{rc.config} is not readable." in start.stderr
    assert rc.daemon_entries() == []


def test_disabled_means_no_start_unless_onestart(rc: RcEnv) -> None:
    rc.conf(repeld_enable="NO")
    start = rc.run("start")
    assert start.returncode == 0
    assert "Cannot 'start' repeld. Set repeld_enable to YES" in start.stdout
    assert rc.daemon_entries() == []
    _start_one = rc.run("onestart")
    assert _start_one.returncode == 0, _start_one.stderr
    _wait_for("the pid file", lambda: rc.pid(rc.pidfile) is not None)
    assert rc.run("onestop").returncode == 0


def test_defaults_when_rc_conf_says_only_enable(rc: RcEnv) -> None:
    rc.rc_conf.write_text('repeld_enable="YES"\n')
    result = rc.run("rcvar")
    assert result.stdout == '# repeld\nrepeld_enable="YES"\n'
    # The FreeBSD defaults show in the command line; start itself would need
    # /usr/local/etc/repeld.toml, so ask the script what it would run.
    probe = rc.script.read_text().replace(
        'run_rc_command "$1"',
        'echo "$pidfile|$repeld_child_pidfile|$repeld_config|$command_args|${repeld_user-unset}"',
    )
    rc.script.write_text(probe)
    out = rc.run("start").stdout.strip()
    pidfile, child, config, args, user = out.split("|")
    assert (pidfile, child, config) == (
        "/var/run/repeld.pid",
        "/var/run/repeld.child.pid",
        "/usr/local/etc/repeld.toml",
    )
    assert args.endswith("-c /usr/local/etc/repeld.toml")
    assert user == "unset", "repeld_user must not reach rc.subr"


# --- systemd: parsing ---------------------------------------------------------------------


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]}, repeated keys kept in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        assert current is not None, f"{path.name}: {raw!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: {raw!r} is not KEY=VALUE"
        sections[current].append((key.strip(), value.strip()))
    return sections


def _values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    """Every value of `key` in `section`."""
    return [v for k, v in unit.get(section, []) if k == key]


def _one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    """The single value of `key` in `section`."""
    values = _values(unit, section, key)
    assert len(values) == 1, f"{key}= appears {len(values)} times in [{section}]"
    return values[0]


def _seconds(text: str) -> float:
    """A systemd time span in seconds (the forms used here: 45, 45s, 1min)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", text)
    assert match, text
    value = float(match.group(1))
    return value * 60 if match.group(2) in ("min", "m") else value


def test_service_is_a_notify_service_with_reload() -> None:
    unit = _unit(SERVICE)
    assert _one(unit, "Service", "Type") == "notify"
    check, signal_ = _values(unit, "Service", "ExecReload")  # in this order: check first
    assert signal_ == "/bin/kill -HUP $MAINPID"
    assert "/usr/local/bin/repeld --check-config -c /etc/repeld/repeld.toml" in check
    assert _one(unit, "Service", "KillSignal") == "SIGTERM"
    exec_start = _one(unit, "Service", "ExecStart").split()
    assert exec_start[:3] == ["/usr/local/bin/repeld", "-c", "/etc/repeld/repeld.toml"]
    assert _one(unit, "Install", "WantedBy") == "multi-user.target"


def _reload_check(config: Path, opts: str) -> subprocess.CompletedProcess[str]:
    """The unit's first ExecReload= as systemd runs it, with this tree's repeld and `config`."""
    unit = _unit(SERVICE)
    exec_start = _one(unit, "Service", "ExecStart")
    command = _values(unit, "Service", "ExecReload")[0]
    # The check is given the flags the daemon was started with, and no --user: the
    # configuration's `user` is the one start-up takes (a flag would override it).
    assert exec_start.split()[1:] == ["-c", "/etc/repeld/repeld.toml", "$REPELD_OPTS"]
    assert command.startswith("/bin/sh -c '") and command.endswith("'")
    script = command[len("/bin/sh -c '") : -1].replace("$$", "$")  # systemd's unescaping
    script = script.replace("/usr/local/bin/repeld", f"{sys.executable} -m repeld")
    script = script.replace("/etc/repeld/repeld.toml", str(config))
    env = {**os.environ, "REPELD_OPTS": opts, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        ["/bin/sh", "-c", script], capture_output=True, text=True, timeout=60, env=env
    )


def test_reload_checks_the_configuration_before_the_signal(tmp_path: Path) -> None:
    config = tmp_path / "repeld.toml"
    config.write_text('backend = "127.0.0.1:10025"\ndelay = 0\n')
    # The user it runs as, as REPELD_OPTS may say.
    me = ["--user", pwd.getpwuid(os.geteuid()).pw_name, "--no-cache"]
    refused = _reload_check(config, " ".join(me))
    assert refused.returncode == 2, "a non-zero ExecReload= fails `systemctl reload`"
    assert refused.stderr == (
        f"repeld: {config}:2: delay: invalid value '0': must be more than 0 and at most 3600\n"
    ), "the reason, in the journal"
    config.write_text('backend = "127.0.0.1:10025"\ndelay = 10\n')
    accepted = _reload_check(config, " ".join(me))
    assert (accepted.returncode, accepted.stdout, accepted.stderr) == (0, "", "")
    # What start-up would refuse, too: the file's user, which no flag of the unit hides.
    config.write_text('backend = "127.0.0.1:10025"\nuser = "no-such-user-here"\n')
    missing = _reload_check(config, "--no-cache")
    assert missing.returncode == 2
    assert missing.stderr == "repeld: --user: no such user 'no-such-user-here'\n"


def test_stop_timeout_outlasts_the_shutdown_grace() -> None:
    grace = float(OPTION_BY_NAME["shutdown-grace"].default)
    timeout = _seconds(_one(_unit(SERVICE), "Service", "TimeoutStopSec"))
    assert timeout >= grace + 10, f"TimeoutStopSec={timeout} leaves no margin over {grace}"


def test_file_limit_is_high() -> None:
    assert int(_one(_unit(SERVICE), "Service", "LimitNOFILE")) >= 65536


def test_service_user_and_capability_agree() -> None:
    unit = _unit(SERVICE)
    user = _one(unit, "Service", "User")
    exec_start = _one(unit, "Service", "ExecStart").split()
    # The configuration's user is the one systemd starts it as, so repeld does not
    # try to drop; no --user in the unit, which would override the file's.
    assert "--user" not in exec_start
    assert 'user = "' + user + '"' in SAMPLE.read_text().splitlines()
    assert _one(unit, "Service", "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert _one(unit, "Service", "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    families = _one(unit, "Service", "RestrictAddressFamilies").split()
    assert set(families) == {"AF_INET", "AF_INET6", "AF_UNIX"}, "AF_UNIX: /dev/log, notify"
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "MemoryDenyWriteExecute",
    ):
        assert _one(unit, "Service", key) == "yes", key
    assert _one(unit, "Service", "ProtectSystem") == "strict"
    assert _one(unit, "Service", "SystemCallArchitectures") == "native"
    assert _one(unit, "Service", "RuntimeDirectory") == "repeld"
    assert _one(unit, "Service", "StateDirectory") == "repeld"
    assert not _values(unit, "Service", "PrivateUsers"), "breaks binding port 25"


def test_socket_matches_the_default_listeners() -> None:
    unit = _unit(SOCKET)
    # ListenStream=ADDR:PORT is spelled as --listen spells it; a bare port
    # would fail parse_listen, as it should (it is one IPv6 socket, not two).
    streams = [parse_listen(v) for v in _values(unit, "Socket", "ListenStream")]
    assert tuple(streams) == OPTION_BY_NAME["listen"].default
    assert _one(unit, "Socket", "BindIPv6Only") == "ipv6-only"
    assert _one(unit, "Socket", "Accept") == "no"
    name = _one(unit, "Socket", "FileDescriptorName")
    assert name == "smtp"
    assert not is_nodelay_name(name), "port 25 must be held"
    assert _one(unit, "Socket", "Service") == "repeld.service"
    # The documented 465 example uses the nodelay naming convention.
    example = re.search(r"^#\s+FileDescriptorName=(\S+)$", SOCKET.read_text(), re.M)
    assert example and is_nodelay_name(example.group(1))


# --- systemd: systemd-analyze ---------------------------------------------------------------


def _sandboxed_units(tmp_path: Path) -> tuple[Path, Path]:
    """Copies of the units with ExecStart pointed at a stub executable in tmp_path."""
    stub = tmp_path / "repeld"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    service_text = SERVICE.read_text()
    assert "/usr/local/bin/repeld" in service_text
    service = tmp_path / "repeld.service"
    service.write_text(service_text.replace("/usr/local/bin/repeld", str(stub)))
    socket_unit = tmp_path / "repeld.socket"
    socket_unit.write_text(SOCKET.read_text())
    return service, socket_unit


def _analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run systemd-analyze offline (no running manager needed)."""
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )


@needs_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    service, socket_unit = _sandboxed_units(tmp_path)
    result = _analyze(
        "verify", "--man=no", f"./{socket_unit.name}", f"./{service.name}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert (result.stdout + result.stderr).strip() == "", "verify printed warnings"


@needs_analyze
def test_systemd_analyze_verify_notices_mistakes(tmp_path: Path) -> None:
    # The control: the same check on a broken copy must complain, or the clean
    # result above would mean nothing.
    service, _ = _sandboxed_units(tmp_path)
    service.write_text(service.read_text().replace("Type=notify", "Type=notify\nTyep=notify"))
    result = _analyze("verify", "--man=no", f"./{service.name}", cwd=tmp_path)
    assert "Unknown key name 'Tyep'" in result.stderr or "Unknown key 'Tyep'" in result.stderr
    service.write_text(SERVICE.read_text())  # ExecStart at a path that does not exist here
    if not Path("/usr/local/bin/repeld").exists():
        result = _analyze("verify", "--man=no", f"./{service.name}", cwd=tmp_path)
        assert result.returncode != 0
        assert "/usr/local/bin/repeld" in result.stderr


@needs_analyze
def test_systemd_analyze_security_exposure_is_low(tmp_path: Path) -> None:
    service, _ = _sandboxed_units(tmp_path)
    # --threshold is in tenths: 25 means an overall exposure of at most 2.5/10.
    result = _analyze(
        "security", "--offline=yes", "--threshold=25", f"./{service.name}", cwd=tmp_path
    )
    if "unrecognized option" in result.stderr:
        pytest.skip("systemd-analyze too old for security --offline (needs 250)")
    match = re.search(r"Overall exposure level for repeld\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert result.returncode == 0, f"exposure {match.group(1)} above 2.5"


# --- MemoryDenyWriteExecute= against repeld's own code ---------------------------------------

# Under the kernel's MDWE (what MemoryDenyWriteExecute= enforces with seccomp:
# no memory both writable and executable, no making memory executable later),
# import the daemon and exercise the compiled module and trio.
MDWE_CHILD = r"""
import ctypes, socket, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1  # include/uapi/linux/prctl.h
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    print("unsupported", ctypes.get_errno()); sys.exit(0)
# The control: with MDWE on, W+X memory must now be refused.
import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("mdwe-not-enforced"); sys.exit(0)
except PermissionError:
    pass
import trio
import repeld.cli, repeld.process.daemon, repeld.shell.server
from repeld.service import tcptune
with socket.create_server(("127.0.0.1", 0)) as lst:
    c = socket.create_connection(lst.getsockname())
    s, _ = lst.accept()
    info = tcptune.tcp_info(s.fileno())
    c.close(); s.close()
async def main():
    await trio.sleep(0)
    return info.state_name
print("ok", trio.run(main))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_MDWE is Linux's")
def test_repeld_runs_with_memory_deny_write_execute() -> None:
    out = subprocess.run(
        [sys.executable, "-c", MDWE_CHILD], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("unsupported"):
        pytest.skip(f"kernel without PR_SET_MDWE (Linux >= 6.3): {out.stdout.strip()}")
    assert out.stdout.strip() == "ok ESTABLISHED", out.stdout + out.stderr

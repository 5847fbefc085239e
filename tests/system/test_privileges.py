"""repeld.service.privileges: the decision table in-process, the drop itself in child processes.

The drops are irreversible, so they happen in a child: as root it binds a
privileged port, becomes nobody, and reports what the kernel says it is now
(/proc/self/status on Linux, the getres*id calls elsewhere), while the parent
proves the listener bound as root still accepts. These tests need root (CI runs
as root) and are skipped otherwise.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from repeld.service.privileges import (
    DEFAULT_USER,
    Identity,
    Plan,
    PrivilegeError,
    decide,
    default_user,
    drop_privileges,
    dropped_identity,
    plan_drop,
    resolve,
)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="dropping privileges needs root")
NOBODY = pwd.getpwnam("nobody")
# Debian's nobody belongs to "nogroup"; FreeBSD's to "nobody".
NOBODY_GROUP = grp.getgrgid(NOBODY.pw_gid).gr_name
#: Groups nobody is not in: one given as a supplementary group, one it never has.
MAIL, ADM = grp.getgrnam("mail").gr_gid, grp.getgrnam("adm").gr_gid
NO_SUCH = "repeld-test-no-such-name"


# --- the decision table -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("euid", "user", "default", "user_uid", "plan"),
    [
        (0, "root", None, 0, Plan("stay")),
        (0, "root", "repeld", 0, Plan("stay")),
        (0, "mail", None, 8, Plan("drop", "mail")),
        (0, "mail", "repeld", 8, Plan("drop", "mail")),
        (0, None, "repeld", None, Plan("drop", "repeld")),
        (1000, None, None, None, Plan("stay")),
        (1000, None, "repeld", None, Plan("stay")),
        (1000, "repeld", "repeld", 1000, Plan("stay")),  # systemd User=repeld mode
    ],
)
def test_plan_drop_decisions(
    euid: int, user: str | None, default: str | None, user_uid: int | None, plan: Plan
) -> None:
    assert plan_drop(euid, user, default=default, user_uid=user_uid) == plan


@pytest.mark.parametrize(
    ("euid", "user", "user_uid", "message"),
    [
        (0, None, None, "running as root: create user repeld or pass --user root"),
        (1000, "repeld", None, "--user: no such user 'repeld'"),
        (1000, "mail", 8, "--user: cannot become 'mail' (uid 8) without root; running as uid 1000"),
        (1000, "root", 0, "--user: cannot become 'root' (uid 0) without root; running as uid 1000"),
    ],
)
def test_plan_drop_refusals(
    euid: int, user: str | None, user_uid: int | None, message: str
) -> None:
    with pytest.raises(PrivilegeError) as info:
        plan_drop(euid, user, default=None, user_uid=user_uid)
    assert str(info.value) == message


def test_default_user_is_the_name_if_it_exists() -> None:
    assert DEFAULT_USER == "repeld"
    assert default_user("nobody") == "nobody"
    assert default_user(NO_SUCH) is None
    expected = "repeld" if _exists("repeld") else None
    assert default_user() == expected


def _exists(user: str) -> bool:
    """Whether the user is in the password database."""
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


@needs_root
def test_decide_as_root_uses_the_real_databases() -> None:
    assert decide("root") == Plan("stay")
    assert decide("nobody") == Plan("drop", "nobody")
    if not _exists(DEFAULT_USER):
        with pytest.raises(PrivilegeError, match="create user repeld or pass --user root"):
            decide(None)


@needs_root
def test_dropped_identity_is_whom_a_daemon_started_here_becomes() -> None:
    # What repeld --check-backend and the --workers parent check a pass service as.
    assert dropped_identity("nobody") == resolve("nobody")
    assert dropped_identity("nobody", "mail") == resolve("nobody", "mail")
    assert dropped_identity("root") is None  # stays root: checks as this process
    assert dropped_identity(NO_SUCH) is None  # refused at start-up, with its own error
    assert dropped_identity("nobody", NO_SUCH) is None


# --- resolving names ----------------------------------------------------------------------


def test_resolve_uses_the_primary_group_by_default() -> None:
    assert resolve("nobody") == Identity("nobody", NOBODY.pw_uid, NOBODY_GROUP, NOBODY.pw_gid)


def test_resolve_with_an_explicit_group() -> None:
    mail = grp.getgrnam("mail")
    assert resolve("nobody", "mail") == Identity("nobody", NOBODY.pw_uid, "mail", mail.gr_gid)


@pytest.mark.parametrize(
    ("user", "group", "message"),
    [
        (NO_SUCH, None, f"--user: no such user '{NO_SUCH}'"),
        ("nobody", NO_SUCH, f"--group: no such group '{NO_SUCH}'"),
        ("root", None, "--user: 'root' is uid 0; pass --user root to stay root"),
        ("nobody", grp.getgrgid(0).gr_name, f"--group: '{grp.getgrgid(0).gr_name}' is gid 0"),
    ],
)
def test_resolve_errors_are_one_line(user: str, group: str | None, message: str) -> None:
    with pytest.raises(PrivilegeError) as info:
        resolve(user, group)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_unknown_user_fails_before_anything_changes() -> None:
    before = (os.getresuid(), os.getresgid(), os.getcwd())
    with pytest.raises(PrivilegeError, match="no such user"):
        drop_privileges(NO_SUCH, chroot="/")
    assert (os.getresuid(), os.getresgid(), os.getcwd()) == before


@needs_root
def test_a_missing_chroot_is_a_one_line_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(PrivilegeError) as info:
        drop_privileges("nobody", chroot=missing)
    assert str(info.value) == f"--chroot: cannot chroot to {missing!r}: No such file or directory"
    assert os.getresuid() == (0, 0, 0)


# --- the drop, in child processes ---------------------------------------------------------

# As root: pick up some supplementary groups (so that clearing them shows), bind
# a privileged loopback port, drop, report, then serve one connection.
DROP_CHILD = r"""
import json, os, random, socket, sys
from repeld.service.privileges import drop_privileges

user, group = sys.argv[1], sys.argv[2] or None
os.setgroups([0, 1, 2])
def bind_low():
    s = socket.socket()
    for port in random.sample(range(600, 1024), 424):
        try:
            s.bind(("127.0.0.1", port))
            return s
        except PermissionError:
            raise
        except OSError:
            continue
    raise SystemExit("no free privileged port")
listener = bind_low()
listener.listen()
drop_privileges(user, group)
report = {"port": listener.getsockname()[1], "resuid": os.getresuid(),
          "resgid": os.getresgid(), "groups": os.getgroups()}
try:
    with open("/proc/self/status") as f:
        report["status"] = {k: v.split() for k, _, v in (l.partition(":\t") for l in f)
                            if k in ("Uid", "Gid", "Groups", "CapEff", "CapPrm")}
except FileNotFoundError:
    pass
try:
    bind_low()
    report["second_bind"] = "allowed"
except PermissionError:
    report["second_bind"] = "EACCES"
try:
    os.setuid(0)
    report["setuid0"] = "allowed"
except PermissionError:
    report["setuid0"] = "EPERM"
print(json.dumps(report), flush=True)
conn, _ = listener.accept()
conn.sendall(b"served by uid %d\n" % os.getuid())
conn.close()
"""


def _run_drop_child(user: str, group: str | None) -> tuple[dict[str, Any], str]:
    """Run DROP_CHILD; its report and what a client connecting to its listener got."""
    child = subprocess.Popen(
        [sys.executable, "-c", DROP_CHILD, user, group or ""],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line, child.stderr.read() if child.stderr else "no output"
        report: dict[str, Any] = json.loads(line)
        with socket.create_connection(("127.0.0.1", report["port"]), timeout=10) as conn:
            served = conn.makefile("r").readline().strip()
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return report, served


@needs_root
def test_drop_to_nobody_keeps_the_listener_and_loses_root() -> None:
    report, served = _run_drop_child("nobody", None)
    uid, gid = NOBODY.pw_uid, NOBODY.pw_gid
    assert report["port"] < 1024
    assert report["resuid"] == [uid, uid, uid]
    assert report["resgid"] == [gid, gid, gid]
    assert set(report["groups"]) <= {gid}
    assert report["second_bind"] == "EACCES", "a new privileged bind must fail"
    assert report["setuid0"] == "EPERM"
    assert served == f"served by uid {uid}"
    if "status" in report:  # Linux: the kernel's own account, all four ids each
        status = report["status"]
        assert status["Uid"] == [str(uid)] * 4
        assert status["Gid"] == [str(gid)] * 4
        assert status["Groups"] == []
        assert int(status["CapEff"][0], 16) == 0
        assert int(status["CapPrm"][0], 16) == 0


@needs_root
def test_drop_with_an_explicit_group() -> None:
    mail = grp.getgrnam("mail").gr_gid
    report, served = _run_drop_child("nobody", "mail")
    assert report["resgid"] == [mail, mail, mail]
    assert report["resuid"] == [NOBODY.pw_uid] * 3
    if "status" in report:
        assert report["status"]["Groups"] == []
    assert served == f"served by uid {NOBODY.pw_uid}"


CHROOT_CHILD = r"""
import grp, json, os, sys
from repeld.service.privileges import drop_privileges

outside_cwd = os.getcwd()
drop_privileges("nobody", None, sys.argv[1])
report = {"cwd": os.getcwd(), "root": sorted(os.listdir("/")),
          "passwd": os.path.exists("/etc/passwd"), "uid": os.getuid(),
          "escape": sorted(os.listdir("../../..")),
          "old_cwd": os.path.exists(outside_cwd)}
print(json.dumps(report), flush=True)
"""


@needs_root
def test_drop_into_a_chroot(tmp_path: Path) -> None:
    jail = tmp_path / "jail"
    (jail / "empty").mkdir(parents=True)
    (jail / "marker").write_text("inside")
    jail.chmod(0o755)
    out = subprocess.run(
        [sys.executable, "-c", CHROOT_CHILD, str(jail)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    report = json.loads(out)
    assert report["cwd"] == "/"
    assert report["root"] == ["empty", "marker"]
    assert report["escape"] == ["empty", "marker"], ".. at the new root is the root"
    assert report["passwd"] is False
    assert report["old_cwd"] is False
    assert report["uid"] == NOBODY.pw_uid


# Started as root but made nobody by hand before anything is tried (the
# interpreter under /root could not be exec'd as nobody), so everything the test
# uses is imported first.
UNPRIVILEGED_CHILD = r"""
import grp, json, os, sys
from repeld.service.privileges import PrivilegeError, decide, drop_privileges

uid, gid, extra, other = (int(arg) for arg in sys.argv[1:5])
os.setgroups([extra])  # systemd's SupplementaryGroups=
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
out = {"decide_none": decide(None).action, "decide_self": decide("nobody").action}
for name, call in (("decide_root", lambda: decide("root")),
                   ("own_group", lambda: decide("nobody", grp.getgrgid(gid).gr_name).action),
                   ("extra_group", lambda: decide(None, grp.getgrgid(extra).gr_name).action),
                   ("other_group", lambda: decide("nobody", grp.getgrgid(other).gr_name)),
                   ("no_group", lambda: decide(None, "no-such-group-here")),
                   ("drop", lambda: drop_privileges("nobody"))):
    try:
        call()
        out[name] = "no error"
    except PrivilegeError as exc:
        out[name] = str(exc)
print(json.dumps(out))
"""


@needs_root
def test_an_unprivileged_process_stays_and_cannot_switch() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            UNPRIVILEGED_CHILD,
            *map(str, (NOBODY.pw_uid, NOBODY.pw_gid, MAIL, ADM)),
        ],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    report = json.loads(out)
    assert report["decide_none"] == "stay"
    assert report["decide_self"] == "stay"
    assert report["decide_root"] == (
        f"--user: cannot become 'root' (uid 0) without root; running as uid {NOBODY.pw_uid}"
    )
    assert report["drop"] == "--user: cannot switch to 'nobody': not running as root"
    # A group it has (its own, or systemd's SupplementaryGroups=) is kept; another was
    # ignored, and a --group postdrop meant for Postfix's public/ failed every client.
    assert report["own_group"] == report["extra_group"] == "no error"
    assert report["other_group"] == (
        f"--group: cannot switch to 'adm' (gid {ADM}) without root; running as gid "
        f"{NOBODY.pw_gid} (under systemd: Group= or SupplementaryGroups=adm)"
    )
    assert report["no_group"] == "--group: no such group 'no-such-group-here'"

"""Giving up root after binding port 25: the user, the group, an optional chroot.

The order is the classic one and each step has a reason:

1. Resolve the user and group (pwd/grp read /etc, or NSS) *before* chroot:
   inside the new root those files are usually absent.
2. chroot, then chdir("/"): without the chdir the old working directory is a
   way out of the new root.
3. setgroups([]): drop root's supplementary groups, or the daemon keeps e.g.
   gid 0 ("wheel"/"root") as a supplementary group after setgid.
4. setgid before setuid: once the uid is not 0 the gid can no longer change.
5. Check that root cannot be regained: setuid(0) must fail.

What the caller must do before `drop_privileges` when chrooting: everything that
needs the filesystem outside the new root, i.e. bind the listeners, resolve the
backend, open the syslog socket (/dev/log or /var/run/log is outside the root)
and read the trusted-network files. A SIGHUP reload inside a chroot can only
re-read files that are inside it.

Whether to drop at all is decided by `plan_drop`, a pure function, so that the
rule "never keep running as root by accident" is unit-testable:

========  ================  =============================================
euid      --user            decision
========  ================  =============================================
0         root              stay root (explicitly asked for)
0         NAME              drop to NAME
0         (none)            drop to "repeld" if that user exists, else error
not 0     (none) or itself  stay (started unprivileged, e.g. systemd User=)
not 0     someone else      error: switching users needs root
========  ================  =============================================

Error messages name the option, like settings.SettingError; the command line
prefixes them with "repeld: ".
"""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DEFAULT_USER",
    "Identity",
    "Plan",
    "PrivilegeError",
    "decide",
    "default_user",
    "drop_privileges",
    "dropped_identity",
    "plan_drop",
    "resolve",
    "uid_of",
]

DEFAULT_USER = "repeld"


class PrivilegeError(ValueError):
    """The user, group or chroot cannot be used; `str()` is one line for the admin."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Whom to become: names and numbers, resolved while /etc is still reachable."""

    user: str
    uid: int
    group: str
    gid: int


@dataclass(frozen=True, slots=True)
class Plan:
    """What to do about privileges: drop to `user`, or stay as we are."""

    action: Literal["drop", "stay"]
    user: str | None = None


def default_user(name: str = DEFAULT_USER) -> str | None:
    """The user to drop to when --user is not given: `name` if it exists, else None."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        return None
    return name


def plan_drop(
    euid: int, user: str | None, *, default: str | None, user_uid: int | None = None
) -> Plan:
    """Decide whether to drop root and to whom (pure: the caller does the lookups)."""
    # `default` is default_user(); `user_uid` is the uid `user` names, or None
    # if there is no such user; it only matters when not running as root.
    if euid == 0:
        if user == "root":
            return Plan("stay")
        if user is not None:
            return Plan("drop", user)
        if default is not None:
            return Plan("drop", default)
        raise PrivilegeError(f"running as root: create user {DEFAULT_USER} or pass --user root")
    if user is None:
        return Plan("stay")
    if user_uid is None:
        raise PrivilegeError(f"--user: no such user {user!r}")
    if user_uid != euid:
        raise PrivilegeError(
            f"--user: cannot become {user!r} (uid {user_uid}) without root; running as uid {euid}"
        )
    return Plan("stay")


def uid_of(user: str) -> int | None:
    """The uid of a user name, or None."""
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def decide(user: str | None, group: str | None = None) -> Plan:
    """`plan_drop` for this process, with the lookups done.

    Not root, it stays as it is: a `group` must then be one it has already
    (systemd's Group= or SupplementaryGroups=), or PrivilegeError: ignored, a
    --group postdrop meant to open Postfix's public/ would fail each client."""
    plan = plan_drop(
        os.geteuid(),
        user,
        default=default_user(),
        user_uid=None if user is None else uid_of(user),
    )
    if plan.action == "stay" and group is not None and os.geteuid() != 0:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"--group: no such group {group!r}") from None
        if gid != os.getegid() and gid not in os.getgroups():
            raise PrivilegeError(
                f"--group: cannot switch to {group!r} (gid {gid}) without root; running as "
                f"gid {os.getegid()} (under systemd: Group= or SupplementaryGroups={group})"
            )
    return plan


def resolve(user: str, group: str | None = None) -> Identity:
    """Look up the user (and group, default: the user's primary group)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"--user: no such user {user!r}") from None
    if pw.pw_uid == 0:
        # "toor" on FreeBSD: dropping to uid 0 would be no drop at all.
        raise PrivilegeError(f"--user: {user!r} is uid 0; pass --user root to stay root")
    if group is None:
        gid = pw.pw_gid
        try:
            group_name = grp.getgrgid(gid).gr_name
        except KeyError:
            group_name = str(gid)  # a primary gid with no group entry is legal
    else:
        try:
            gr = grp.getgrnam(group)
        except KeyError:
            raise PrivilegeError(f"--group: no such group {group!r}") from None
        gid, group_name = gr.gr_gid, gr.gr_name
    if gid == 0:
        raise PrivilegeError(f"--group: {group_name!r} is gid 0; choose an unprivileged group")
    return Identity(pw.pw_name, pw.pw_uid, group_name, gid)


def dropped_identity(user: str | None, group: str | None = None) -> Identity | None:
    """Whom a daemon this process starts with --user `user` and --group `group` runs as
    after its drop, or None: it stays as this process is (`decide`), or it would
    refuse to start, which it says itself."""
    try:
        plan = decide(user, group)
        if plan.action == "drop" and plan.user is not None:
            return resolve(plan.user, group)
    except PrivilegeError:
        pass
    return None


def _set_ids(ident: Identity) -> None:
    """setgroups, then gid, then uid: real, effective and saved alike."""
    os.setgroups([])
    # The saved set-user-ID must change too, or seteuid(0) would bring root back.
    os.setresgid(ident.gid, ident.gid, ident.gid)
    os.setresuid(ident.uid, ident.uid, ident.uid)


def _verify(ident: Identity) -> None:
    """Prove the drop: the ids are the target's and root cannot be regained."""
    if os.getresuid() != (ident.uid,) * 3 or os.getresgid() != (ident.gid,) * 3:
        raise PrivilegeError(
            f"--user: still uid {os.getresuid()} gid {os.getresgid()} after switching to "
            f"{ident.user!r}"
        )
    if set(os.getgroups()) - {ident.gid}:
        raise PrivilegeError(f"--user: supplementary groups {os.getgroups()} survived the drop")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise PrivilegeError(f"--user: could regain root after switching to {ident.user!r}")


def drop_privileges(user: str, group: str | None = None, chroot: str | None = None) -> None:
    """Become `user` (and `group`), chrooted to `chroot` if given; for good."""
    ident = resolve(user, group)
    if chroot is not None:
        try:
            os.chroot(chroot)
            os.chdir("/")
        except OSError as exc:
            raise PrivilegeError(
                f"--chroot: cannot chroot to {chroot!r}: {exc.strerror or exc}"
            ) from None
    try:
        _set_ids(ident)
    except PermissionError:
        raise PrivilegeError(
            f"--user: cannot switch to {ident.user!r}: not running as root"
        ) from None
    _verify(ident)

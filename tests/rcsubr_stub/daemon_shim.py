"""A stand-in for FreeBSD's daemon(8), enough to test scripts/rc.d/repeld on Linux.

Installed by the test as an executable named like the real one. It records its
argv (one JSON line to $DAEMON_SHIM_LOG), then behaves as daemon(8) -r does:
detaches (the parent exits at once), writes the -P pid file with its own pid,
forks the command with the -p pid file naming the child, passes SIGTERM on to
the child and then exits without restarting, ignores SIGHUP (daemon(8) only
reopens its -o file on SIGHUP, and only with -H), restarts the child one second
after it dies otherwise, and removes both pid files when it exits. The child's
stdout and stderr go to $DAEMON_SHIM_OUTPUT (the real one sends them to syslog
with -S). Every signal it acts on is logged too.

Unlike the real one: no pidfile(3) locking, no -u, -o, -R, -C, -m, no syslog.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

_REEXEC = "DAEMON_SHIM_REEXEC"
_WITH_ARG = set("PptTslmoR")
_FLAGS = set("cfrSH")


def log(entry: dict[str, Any]) -> None:
    """Append one JSON line to the shim's log."""
    with open(os.environ["DAEMON_SHIM_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\n")


def parse(argv: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """daemon(8)'s options (getopt, stopping at the first operand) and the command."""
    opts: dict[str, str | bool] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        letter = arg[1]
        if letter in _WITH_ARG:
            if len(arg) > 2:
                opts[letter] = arg[2:]
            else:
                i += 1
                opts[letter] = argv[i]
        elif letter in _FLAGS and len(arg) == 2:
            opts[letter] = True
        else:
            sys.exit(f"daemon shim: unsupported option {arg!r}")
        i += 1
    return opts, argv[i:]


def write_pid(path: object, pid: int) -> None:
    """Write a pid file (the real daemon(8) uses pidfile(3))."""
    if isinstance(path, str):
        with open(path, "w") as f:
            f.write(f"{pid}\n")


def supervise(opts: dict[str, str | bool], command: list[str]) -> None:
    """The detached supervisor: run, restart, forward SIGTERM, clean up."""
    state = {"child": 0, "terminating": False}

    def on_term(signum: int, frame: object) -> None:
        """Pass SIGTERM on to the child and stop restarting it."""
        state["terminating"] = True
        log({"signal": "TERM", "forwarded_to": state["child"]})
        if state["child"]:
            os.kill(int(state["child"]), signal.SIGTERM)

    def on_hup(signum: int, frame: object) -> None:
        """Log and ignore SIGHUP, as daemon(8) without -H does."""
        log({"signal": "HUP", "ignored": True})

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    write_pid(opts.get("P"), os.getpid())
    while True:
        pid = os.fork()
        if pid == 0:
            write_pid(opts.get("p"), os.getpid())
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            try:
                os.execv(command[0], command)
            finally:
                os._exit(127)
        state["child"] = pid
        _, status = os.waitpid(pid, 0)
        state["child"] = 0
        log({"child_exited": pid, "status": status})
        if state["terminating"] or not opts.get("r"):
            break
        time.sleep(1)
    for key in ("p", "P"):
        path = opts.get(key)
        if isinstance(path, str) and os.path.exists(path):
            os.unlink(path)


def main() -> None:
    """Record argv, detach, supervise."""
    if os.environ.get(_REEXEC) != "1":
        # Re-exec with this file's path as argv[0], so that ps(1) shows it as the
        # first word, as it shows "daemon:" for the real one: rc.subr's
        # check_pidfile matches procname against that word.
        os.environ[_REEXEC] = "1"
        os.execv(sys.executable, [sys.argv[0], sys.argv[0], *sys.argv[1:]])
    del os.environ[_REEXEC]
    log({"argv": sys.argv[1:]})
    opts, command = parse(sys.argv[1:])
    if not command:
        sys.exit("daemon shim: no command")
    if os.fork():
        os._exit(0)  # daemon(3): the parent returns to rc.subr at once
    os.setsid()
    # Let go of the caller's stdio, or whoever waits for its output never sees EOF.
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(os.environ["DAEMON_SHIM_OUTPUT"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    supervise(opts, command)


if __name__ == "__main__":
    main()

"""The command line: argparse over settings.OPTIONS, `main(argv) -> int`.

Argument defaults are a sentinel (hypercorn's pattern), so only what the user
typed ends up in the values handed to the configuration loader; that is what
lets the configuration file sit underneath the flags.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from repeld import __version__
from repeld.config.errors import ConfigError, SettingError, shown
from repeld.config.file import (
    default_config_path,
    inherited_settings,
    load_settings,
    read_config,
    render_settings,
)
from repeld.config.settings import OPTIONS, Option, Settings

__all__ = ["EXIT_FAILURE", "EXIT_USAGE", "main", "make_parser", "parse_args"]

EXIT_USAGE = 2
EXIT_FAILURE = 1

#: Flags that are actions of the command (or say where the settings are), not settings.
_ACTIONS = ("config", "check-config", "check-kernel", "check-backend")


class _Parser(argparse.ArgumentParser):
    """Errors are one line naming the flag and the value, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def _wrap(opt: Option) -> Any:
    # argparse shows ArgumentTypeError's text after the flag's name.
    parse = opt.parse
    assert parse is not None

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except SettingError as exc:
            raise argparse.ArgumentTypeError(
                f"invalid value {shown(exc.value)}: {exc.reason}"
            ) from None

    convert.__name__ = opt.name
    return convert


def make_parser() -> argparse.ArgumentParser:
    """The parser for every flag in settings.OPTIONS plus the actions."""
    parser = _Parser(
        prog="repeld",
        description=(
            "Withhold the SMTP greeting, cut off clients that talk before it, and hand "
            "patient clients to the real MTA."
        ),
        epilog="`repeld report [FILE ...]` reads repeld's events back from logs and prints what "
        "the delay does (repeld report --help). See repeld(8) and repeld.conf(5) for the "
        "events, signals and examples.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"read settings from this TOML file; flags override it (default: "
        f"{default_config_path()}, if it exists)",
    )
    for opt in OPTIONS:
        flags = [f for f in (opt.short, f"--{opt.name}") if f]
        if opt.parse is None:
            if opt.negatable:
                parser.add_argument(*flags, action=argparse.BooleanOptionalAction, help=opt.help)
            else:
                parser.add_argument(*flags, action="store_true", help=opt.help)
        else:
            parser.add_argument(
                *flags,
                type=_wrap(opt),
                action="append" if opt.repeat else "store",
                metavar=opt.metavar,
                help=opt.help,
            )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="check the configuration file and flags, and what start-up would refuse here "
        "(user, group, chroot and pid file directories), print the effective settings, and "
        "exit (status 0, or 2 with one line per problem)",
    )
    parser.add_argument(
        "--check-kernel",
        action="store_true",
        help="print the kernel and process limits that decide how many connections repeld "
        "can hold, and the lines that raise them; then exit",
    )
    parser.add_argument(
        "--check-backend",
        action="store_true",
        help="connect to every backend as a passed client would (PROXY header as "
        "--proxy-protocol says, greeting, EHLO, QUIT), print one line each, and exit "
        "(status 0 if all are fine, 1 if one is not)",
    )
    parser.add_argument("--version", action="version", version=f"repeld {__version__}")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings the user typed (by long flag name), and the actions asked for.

    Exits with status 2 on a bad flag or value.
    """
    ns = make_parser().parse_args(argv)
    values = {k.replace("_", "-"): v for k, v in vars(ns).items()}
    actions = {name: values.pop(name) for name in _ACTIONS if name in values}
    return values, actions


#: Set by a repeld that started with the default configuration file: its
#: workers read that file as if named with -c, so that one started after the
#: file went away does not serve the defaults beside the others.
CONFIG_SEEN_ENV = "REPELD_CONFIG_SEEN"


def settings_from(
    flags: dict[str, Any], actions: dict[str, Any], *, file_seen: bool = False
) -> Settings:
    """Defaults, the configuration file, then the flags; raises ConfigError.

    `file_seen`: the default file existed when repeld started, so that a reload
    that cannot find it (inside --chroot, or moved away) is refused, not
    served with the defaults."""
    path = actions.get("config") or default_config_path()
    return load_settings(flags, path, explicit="config" in actions or file_seen)


def check_backend(settings: Settings) -> int:
    """--check-backend: one line per backend on stdout; 0 if every one is fine, else 1."""
    import trio

    from repeld.config.values import PassBackend
    from repeld.process.workers import outside_view
    from repeld.shell.backendcheck import backends_of, check_backends, report_line

    # As the daemon will see a pass service: inside --chroot, as --user.
    view = outside_view(settings)
    results = trio.run(functools.partial(check_backends, settings, view=view))
    if not results:
        print("repeld: no backend to check: passed clients go to the --exec program")
        return 0
    for backend, verdict in results:
        print(report_line(backend, settings.proxy_protocol, verdict), flush=True)
    if view.who is None and any(isinstance(b, PassBackend) for b in backends_of(settings)):
        other = _someone_else(settings.user)
        if other:
            print(
                f"repeld: note: pass: services were checked as uid {os.geteuid()}, not as "
                f"--user {other}: only root can check them as repeld will run",
                file=sys.stderr,
            )
    return 0 if all(verdict.ok for _, verdict in results) else EXIT_FAILURE


def _someone_else(user: str | None) -> str:
    """`user` if it names another user than this process runs as, else ""."""
    if user is None or user == "root":
        return ""
    from repeld.service.privileges import uid_of

    uid = uid_of(user)  # None: no such user, which the daemon says at start-up
    return user if uid is not None and uid != os.geteuid() else ""


def _one_line(exc: Exception) -> str:
    """An unexpected error as one line: its type and the start of its message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run repeld; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        # The daemon takes no positional argument, so this word cannot be one of its flags.
        from repeld.report.main import main as report

        return report(argv[1:])
    flags, actions = parse_args(argv)
    if actions.get("check-kernel"):
        from repeld.service.capacity import kernel_report

        values = dict(flags)  # the file's max-held, backlog and workers too, under the flags
        path = actions.get("config") or default_config_path()
        if "config" in actions or os.path.exists(path):
            try:
                values = {**read_config(path), **flags}
            except ConfigError as exc:
                for problem in exc.problems:
                    print(f"repeld: {problem}", file=sys.stderr)
                return EXIT_USAGE
        held, backlog, workers = (values.get(k) for k in ("max-held", "backlog", "workers"))
        sys.stdout.write(kernel_report(held, backlog, workers or 1))
        return 0
    # The default file, if there at the start, is the one every reload and
    # every worker (even one started after the file went) must read.
    seen = "config" not in actions and (
        os.environ.get(CONFIG_SEEN_ENV) == "1" or os.path.exists(default_config_path())
    )
    try:
        # A --workers worker starts with what its parent serves, not the file.
        settings = inherited_settings() or settings_from(flags, actions, file_seen=seen)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"repeld: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # reading a configuration never ends in a traceback
        print(f"repeld: cannot read the configuration: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    if actions.get("check-config"):
        from repeld.service.preflight import problems, warnings

        refused = problems(settings)  # what start-up would refuse on this machine
        for problem in refused:
            print(f"repeld: {problem}", file=sys.stderr)
        if refused:
            return EXIT_USAGE
        for warning in warnings(settings):  # what a reload takes and a restart would not
            print(f"repeld: warning: {warning}", file=sys.stderr)
        sys.stdout.write(render_settings(settings))
        return 0
    if actions.get("check-backend"):
        return check_backend(settings)
    from repeld.process import daemon

    if seen:  # --workers: the workers are spawned with this environment
        os.environ[CONFIG_SEEN_ENV] = "1"
    return daemon.start(settings, lambda: settings_from(flags, actions, file_seen=seen), argv)

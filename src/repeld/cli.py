"""The command line: argparse over settings.OPTIONS, `main(argv) -> int`.

Argument defaults are a sentinel (hypercorn's pattern), so only what the user
typed ends up in the values handed to `build_settings`; that is what lets a
configuration file sit underneath the flags.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import trio

from . import __version__
from .settings import OPTIONS, Option, SettingError, Settings, build_settings, load_trusted

__all__ = ["EXIT_USAGE", "main", "make_parser", "parse_args"]

EXIT_USAGE = 2
EXIT_FAILURE = 1


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
            raise argparse.ArgumentTypeError(f"invalid value {exc.value!r}: {exc.reason}") from None

    convert.__name__ = opt.name
    return convert


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="repeld",
        description=(
            "Withhold the SMTP greeting, cut off clients that talk before it, and hand "
            "patient clients to the real MTA."
        ),
        epilog="See repeld(8) for the events, examples and deployment recipes.",
        argument_default=argparse.SUPPRESS,
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
        "--check-kernel",
        action="store_true",
        help="print the kernel and process limits that decide how many connections repeld "
        "can hold, and the lines that raise them; then exit",
    )
    parser.add_argument("--version", action="version", version=f"repeld {__version__}")
    return parser


#: Flags that are actions of the command, not settings.
_ACTIONS = ("check-kernel",)


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings | None, dict[str, Any]]:
    """Settings from the command line, and the actions asked for; exits 2 on bad input.

    Settings are None when an action that needs none (--check-kernel) was asked for.
    """
    parser = make_parser()
    ns = parser.parse_args(argv)
    values = {k.replace("_", "-"): v for k, v in vars(ns).items()}
    actions = {name: values.pop(name) for name in _ACTIONS if name in values}
    if actions.get("check-kernel"):
        return None, {"check-kernel": True, "values": values}
    try:
        return build_settings(values), actions
    except SettingError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """Run repeld; the exit status."""
    settings, actions = parse_args(argv)
    if settings is None:
        from .capacity import kernel_report

        values = actions["values"]
        sys.stdout.write(kernel_report(values.get("max-held"), values.get("backlog")))
        return 0
    try:
        load_trusted(settings)  # report a bad trusted file before binding anything
    except SettingError as exc:
        print(f"repeld: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        trio.run(_run, settings)
    except OSError as exc:
        print(f"repeld: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        pass
    return 0


async def _run(settings: Settings) -> None:
    from .server import run_server

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            try:
                server = await nursery.start(run_server, settings)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot start: {exc.strerror or exc}") from None
            if settings.foreground:
                where = ", ".join(str(spec) for spec in settings.listen)
                bound = " ".join(f"{h}:{p}" for h, p in server.addresses)
                print(
                    f"repeld: listening on {where} (bound {bound}), backend {settings.backend}",
                    file=sys.stderr,
                    flush=True,
                )
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break

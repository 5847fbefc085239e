"""`repeld report [FILE ...]`: the files, stdin and stdout around the pure report."""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from collections.abc import Iterable, Sequence
from typing import IO, NoReturn

from repeld.report.parse import parse_line
from repeld.report.svg import render_svg
from repeld.report.tally import Tally
from repeld.report.text import render_text

__all__ = ["main", "make_parser", "tally_lines"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def make_parser() -> argparse.ArgumentParser:
    """The parser of `repeld report`."""
    parser = _Parser(
        prog="repeld report",
        description=(
            "Read repeld's events from log files (RFC 5424 or @cee: JSON, raw or as a syslog "
            "daemon wrote them, or -f lines) and print the verdicts, the repelled share, the "
            "give-up curve, what other delays would do and the busiest early-talking networks."
        ),
        epilog="Lines that are not repeld events are skipped and counted. See repeld(8) REPORT.",
    )
    parser.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        default=["-"],
        help="log files, gzip-compressed if their name ends in .gz; - or none: standard input",
    )
    parser.add_argument(
        "--svg", metavar="FILE", help="also draw the give-up curve and the verdicts over time"
    )
    parser.add_argument(
        "--year",
        type=int,
        metavar="YEAR",
        default=time.localtime().tm_year,
        help="the year of RFC 3164 timestamps, which have none (default: this year)",
    )
    parser.add_argument(
        "--top",
        type=int,
        metavar="N",
        default=10,
        help="how many early-talking networks (and enforced sender domains, HELO names) to list"
        " (default: 10)",
    )
    return parser


def tally_lines(lines: Iterable[str], year: int, tally: Tally | None = None) -> Tally:
    """Every line read into a Tally."""
    tally = Tally() if tally is None else tally
    for line in lines:
        record = parse_line(line, year)
        if record is None:
            tally.skip()
        else:
            tally.add(record)
    return tally


def _open(name: str) -> IO[str]:
    if name == "-":
        return sys.stdin
    if name.endswith(".gz"):
        return gzip.open(name, "rt", encoding="utf-8", errors="replace")
    return open(name, encoding="utf-8", errors="replace")


def main(argv: Sequence[str]) -> int:
    """Run the report; the exit status (1 if a file cannot be read, 2 on bad usage)."""
    args = make_parser().parse_args(argv)
    tally = Tally()
    for name in args.files:
        try:
            stream = _open(name)
            try:
                tally_lines(stream, args.year, tally)
            finally:
                if stream is not sys.stdin:
                    stream.close()
        except OSError as exc:
            print(f"repeld report: {name}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    sys.stdout.write(render_text(tally, top=args.top))
    if args.svg:
        try:
            with open(args.svg, "w", encoding="utf-8") as out:
                out.write(render_svg(tally))
        except OSError as exc:
            print(f"repeld report: {args.svg}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    return 0

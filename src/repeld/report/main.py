"""`repeld report [FILE ...]`: the files, stdin and stdout around the pure report."""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, BinaryIO, NoReturn, cast

from repeld.report.parse import MAX_LINE, Years, parse_line
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
        epilog=(
            f"Lines that are not repeld events, or longer than {MAX_LINE} bytes, are skipped and"
            " counted. See the Report subsection of DESCRIPTION in repeld(8)."
        ),
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
        help="the year of each file's first RFC 3164 timestamp, which has none (default: this"
        " year, or last year for a date still to come)",
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


def read_lines(stream: IO[bytes], limit: int = MAX_LINE) -> Iterator[str | None]:
    """Each line of `stream` as text, or None for a line longer than `limit` bytes.

    No more than `limit` + 1 bytes of a line are ever held: the rest of a long
    line is read and thrown away in pieces of that size.
    """
    while line := stream.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line.decode("utf-8", "replace")
            continue
        while not line.endswith(b"\n") and (line := stream.readline(limit + 1)):
            pass
        yield None


def tally_lines(
    lines: Iterable[str | None], year: int | Years, tally: Tally | None = None
) -> Tally:
    """Every line of one log read into a Tally (None: a line too long to read).

    `year`: of its first RFC 3164 timestamp; the log's new years are followed.
    """
    tally = Tally() if tally is None else tally
    years = Years(year) if isinstance(year, int) else year
    for line in lines:
        record = None if line is None else parse_line(line, years)
        if record is None:
            tally.skip(too_long=line is None)
        else:
            tally.add(record)
    return tally


def _open(name: str) -> BinaryIO:
    if name == "-":
        return sys.stdin.buffer
    if name.endswith(".gz"):
        return cast(BinaryIO, gzip.open(name, "rb"))
    return open(name, "rb")


def main(argv: Sequence[str]) -> int:
    """Run the report; the exit status (1 if a file cannot be read, 2 on bad usage)."""
    args = make_parser().parse_args(argv)
    tally = Tally()
    status = 0
    for name in args.files:
        try:
            stream = _open(name)
            try:
                if args.year is None:
                    years = Years(time.localtime().tm_year, guess=True)
                else:
                    years = Years(args.year)
                tally_lines(read_lines(stream), years, tally)
            finally:
                if stream is not sys.stdin.buffer:
                    stream.close()
        except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt .gz too
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            # The others are still read and the report printed: one file being
            # compressed by logrotate right now must not cost a week's report.
            print(f"repeld report: {name}: {why}", file=sys.stderr)
            status = 1
    try:
        sys.stdout.write(render_text(tally, top=args.top))
        sys.stdout.flush()
    except BrokenPipeError:  # `repeld report ... | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
    if args.svg:
        try:
            with open(args.svg, "w", encoding="utf-8") as out:
                out.write(render_svg(tally))
        except OSError as exc:
            print(f"repeld report: {args.svg}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    return status

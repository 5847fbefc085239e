"""One log line in, one repeld event (or None) out; no I/O.

Three shapes of event are recognised, wherever they sit in the line, so that the
same code reads what repeld sent on the wire and what a syslog daemon wrote to a
file around it:

* RFC 5424 structured data: `[NAME@NUMBER event="..." ...]` (any private SD-ID);
* `@cee:` and a JSON object with an `event` member (`--log-format json`);
* the human summary alone (`PREGREET ...`, `HANGUP ...`, `PASS ...`,
  `BACKEND-ERROR ...`, `OVERLOAD ...`), as rsyslog's traditional file formats
  keep it when they drop the structured data, and as `-f` prints it on stderr.
  A summary counts only after a `repeld:` or `repeld[PID]:` tag or in the `-f`
  shape `HH:MM:SS.mmm name: ...`, so that postscreen's look-alike PREGREET lines
  are not taken for repeld's.

The time of an event is the RFC 5424 header's, or else the first timestamp at
the start of the line (RFC 3164 `Mmm dd hh:mm:ss`, in local time of the given
year, or RFC 3339 as rsyslog's `RSYSLOG_FileFormat` writes it); `-f` lines alone
carry no date, so their events have no time.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime

__all__ = ["Record", "parse_line"]

_MONTHS = {
    m: i
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}


@dataclass(frozen=True, slots=True)
class Record:
    """One repeld event read back: its name, its fields as text, and when (Unix time)."""

    event: str
    fields: dict[str, str]
    time: float | None
    shape: str  # "rfc5424", "json" or "summary"

    def number(self, key: str) -> float | None:
        """A numeric field, or None if it is missing or not a number."""
        try:
            return float(self.fields[key])
        except (KeyError, ValueError):
            return None


_SD = re.compile(
    r'\[(?P<sdid>[^\s\]="@]{1,32}@[0-9]+(?:\.[0-9]+)*)'
    r'(?P<params>(?: [^=\s\]"]+="(?:[^"\\\]]|\\.)*")+)\]'
)
_PARAM = re.compile(r' ([^=\s\]"]+)="((?:[^"\\\]]|\\.)*)"')
_UNESCAPE = re.compile(r"\\(.)")
_CEE = re.compile(r"@cee: ?(?=\{)")

_RFC5424_TIME = re.compile(r"^<\d{1,3}>1 (\S+) ")
_ISO_TIME = re.compile(
    r"^(?:<\d{1,3}>)?(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)?)\s"
)
_BSD_TIME = re.compile(r"^(?:<\d{1,3}>)?([A-Z][a-z]{2}) ([ \d]\d) (\d\d):(\d\d):(\d\d)\s")

#: Where a bare summary may start: after repeld's syslog tag, or in `-f`'s shape.
_TAGGED = re.compile(
    r"(?:^|\s)repeld(?:\[\d+\])?: (?:\d\d:\d\d:\d\d\.\d{3} [a-z][a-z-]*: )?(?P<summary>.*)$"
)
_STDERR = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} [a-z][a-z-]*: (?P<summary>.*)$")

_PEER = r"\[(?P<client>[^\]]+)\]:(?P<client_port>\d+)"
_NUM = r"[0-9]+(?:\.[0-9]+)?"
_SUMMARIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "early-talker",
        re.compile(
            rf"^PREGREET (?P<bytes>\d+|penalty) after (?P<elapsed>{_NUM}) from {_PEER}: .*"
            r"\(action=(?P<action>[a-z-]+)\)$"
        ),
    ),
    (
        "hangup",
        re.compile(rf"^HANGUP after (?P<elapsed>{_NUM}) from {_PEER} \((?P<how>[a-z-]+)\)"),
    ),
    ("pass", re.compile(rf"^PASS (?P<reason>[A-Z][A-Z-]*) {_PEER} after (?P<elapsed>{_NUM})")),
    (
        "backend-error",
        re.compile(
            rf"^BACKEND-ERROR (?P<backend>\S+) for {_PEER} after (?P<elapsed>{_NUM}): "
            r"(?P<error>.*) \(replied 421\)$"
        ),
    ),
    ("overload", re.compile(r"^OVERLOAD (?P<limit>[a-z-]+): refused (?P<refused>\d+) ")),
)


def _unescape(value: str) -> str:
    return _UNESCAPE.sub(r"\1", value)


def _line_time(line: str, year: int) -> float | None:
    if match := _RFC5424_TIME.match(line) or _ISO_TIME.match(line):
        try:
            return datetime.fromisoformat(match.group(1)).timestamp()
        except ValueError:
            return None
    if match := _BSD_TIME.match(line):
        month = _MONTHS.get(match.group(1))
        if month is None:
            return None
        day, hour, minute, second = (int(g) for g in match.group(2, 3, 4, 5))
        try:
            return time.mktime((year, month, day, hour, minute, second, 0, 0, -1))
        except (OverflowError, ValueError):
            return None
    return None


def _from_json(line: str) -> tuple[int, dict[str, str]] | None:
    for match in _CEE.finditer(line):
        try:
            obj, _end = json.JSONDecoder().raw_decode(line, match.end())
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("event"), str):
            fields = {str(k): str(v) for k, v in obj.items() if not isinstance(v, dict | list)}
            return match.start(), fields
    return None


def _from_sd(line: str) -> tuple[int, dict[str, str]] | None:
    for match in _SD.finditer(line):
        fields = {k: _unescape(v) for k, v in _PARAM.findall(match.group("params"))}
        if fields.get("event"):
            return match.start(), fields
    return None


def _from_summary(line: str) -> tuple[int, dict[str, str]] | None:
    match = _TAGGED.search(line) or _STDERR.match(line)
    if match is None:
        return None
    summary = match.group("summary")
    for name, pattern in _SUMMARIES:
        found = pattern.match(summary)
        if found:
            fields = {"event": name, **found.groupdict()}
            if name == "pass":
                fields["reason"] = fields["reason"].lower()
            if fields.get("bytes") == "penalty":
                fields["bytes"] = "0"
            return match.start("summary"), fields
    return None


def parse_line(line: str, year: int) -> Record | None:
    """The repeld event in one log line, or None if there is none.

    `year` dates RFC 3164 timestamps, which carry none.
    """
    line = line.rstrip("\r\n")
    # The shape that starts first wins: what a client sent is quoted after the real
    # structure (in the summary, or escaped inside the structure), never before it.
    found = [
        (hit[0], shape, hit[1])
        for shape, hit in (
            ("json", _from_json(line)),
            ("rfc5424", _from_sd(line)),
            ("summary", _from_summary(line)),
        )
        if hit is not None
    ]
    if not found:
        return None
    _pos, shape, fields = min(found, key=lambda f: f[0])
    return Record(fields["event"], fields, _line_time(line, year), shape)

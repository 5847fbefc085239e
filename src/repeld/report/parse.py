"""One log line in, one repeld event (or None) out; no I/O.

An event is read only where repeld put it, never from text that came from a
client (the escaped first bytes, quoted inside repeld's own event) or from
another program (a Postfix reject line quoting a HELO). The line's head decides:

* an RFC 5424 message (`<PRI>1 TIME HOST repeld PROCID MSGID SD MSG`, as sent
  on the wire or as rsyslog's RSYSLOG_SyslogProtocol23Format writes it) whose
  APP-NAME is `repeld`: the event is the first private SD-ELEMENT
  (`[NAME@NUMBER event="..." ...]`, any SD-ID, for --sd-id) in the SD position,
  or else the MSG read as below;
* a syslog file line (`[<PRI>]TIME [HOST] TAG MSG`, TIME in RFC 3164 or RFC 3339)
  whose TAG is repeld's: `repeld:`, `repeld[PID]:`, or `repeld[PID]` with no
  colon, as rsyslog's traditional and default file templates write a message
  that arrived as RFC 5424 (its structured data dropped);
* a `-f` line on the standard error: `HH:MM:SS.mmm NAME: SUMMARY`.

The MSG of a repeld line, from its first character, is `@cee:` and one flat
JSON object with an `event` member (`--log-format json`), or a `-f` line (as
journald keeps repeld's standard error), or the human summary alone
(`PREGREET ...`, `PASS ...`, `HANGUP ...`, `DNSBL ...`, `BACKEND-ERROR ...`,
`OVERLOAD ...`, `PROXY-ERROR ...`; any other upper-case word names an event
the report does not break down). Every pattern is anchored where repeld writes it, so the client's
bytes, which come after the address and before the last `(action=...)`, are
never where a pattern looks for a name, an address or an action.

The work per line is linear in its length and bounded: lines longer than
`MAX_LINE` characters are not read (repeld's own lines are far shorter: the
first bytes are cut at 100 characters); no pattern backtracks more than once
over the line, and JSON is decoded only once a pattern has shown it to be one
flat object, so no nesting reaches the decoder.

The time of an event is the RFC 5424 header's, or the line's RFC 3164
timestamp (`Mmm dd hh:mm:ss`, in local time of the given year) or RFC 3339
one (rsyslog's RSYSLOG_FileFormat), or one of journalctl's short formats
(short-precise, short-full, short-unix; short and short-iso are the first
two); `-f` lines alone carry no date.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from datetime import datetime

from repeld.core.names import EventName

__all__ = ["MAX_LINE", "Record", "Years", "parse_line"]

#: Lines longer than this (in characters, the line end excluded) are skipped unread.
MAX_LINE = 16384

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
    #: The process that wrote it (RFC 5424's PROCID, the tag's `[PID]`), "" where
    #: the line does not say (-f's lines): whose connections it speaks of.
    procid: str = ""
    #: The host that wrote it (RFC 5424's HOSTNAME, a file line's host), "" where
    #: the line does not say: logs of several hosts merged can share a PID.
    host: str = ""

    def number(self, key: str) -> float | None:
        """A finite numeric field, or None if it is missing or not a number."""
        try:
            value = float(self.fields[key])
        except (KeyError, ValueError):
            return None
        return value if math.isfinite(value) else None


# -- the line's head: who wrote it, and when -------------------------------------------

_APP = "repeld"
#: `<PRI>1 TIME HOST APP PROCID MSGID `, then the structured data.
_RFC5424_HEAD = re.compile(r"<\d{1,3}>1 (\S{1,64}) (\S{1,255}) (\S{1,48}) (\S{1,128}) \S{1,32} ")
#: RFC 3164's, or with microseconds as `journalctl -o short-precise` prints it.
_BSD = (
    r"(?P<mon>[A-Z][a-z]{2}) (?P<day>[ \d]\d) (?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d)"
    r"(?P<frac>\.\d{1,6})?"
)
_ISO = r"(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?)"
#: `journalctl -o short-full` (`Mon 2026-11-30 00:25:05 UTC`: a zone's abbreviation,
#: or its offset where it has none) and `-o short-unix` (seconds since the epoch).
_FULL = (
    r"[A-Z][a-z]{2} (?P<full>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(?:\.\d{1,6})?"
    r" (?P<zone>[A-Za-z]{1,10}|[+-]\d\d(?:\d\d)?)"
)
_UNIX = r"(?P<unix>\d{1,12}\.\d{6})"
#: `[<PRI>]TIME [HOST] repeld[PID]: ` (or `repeld: `, or `repeld[PID] ` with no colon).
#: A HOST never ends in `:` or `]`, so that in a line without one another program's
#: tag is not taken for the host, nor its message for repeld's tag.
_FILE_HEAD = re.compile(
    rf"(?:<\d{{1,3}}>)?(?:{_BSD}|{_ISO}|{_FULL}|{_UNIX}) (?:(?P<host>\S{{0,254}}[^\s:\]]) )?"
    r"repeld(?:\[(?P<pid>\d{1,10})\](?:: ?| )|: ?)"
)
#: What `-f` prints before the summary: the local time and the event's name.
_STDERR = re.compile(r"\d\d:\d\d:\d\d\.\d{3} (?P<name>[a-z][a-z0-9-]{0,31}): ")

# -- RFC 5424 structured data ------------------------------------------------------------

_SD_NAME = r'[^ =\]"]{1,32}'
#: PARAM-VALUE: anything but `"`, `\` and `]`, or a backslash pair; possessive, so
#: that a value full of backslashes costs no backtracking state.
_SD_VALUE = r'"([^"\\\]]*+(?:\\.[^"\\\]]*+)*+)"'
_SD_ELEMENT = re.compile(rf"\[({_SD_NAME})((?: {_SD_NAME}={_SD_VALUE})*+)\]", re.DOTALL)
_SD_PARAM = re.compile(rf" ({_SD_NAME})={_SD_VALUE}", re.DOTALL)
_PRIVATE = re.compile(r"[^@]+@\d+(?:\.\d+)*")

# -- @cee: JSON: one flat object, checked by a pattern before json.loads -----------------

_J_STR = r'"[^"\\\x00-\x1f]*+(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*+)*+"'
_J_NUM = r"-?(?:0|[1-9]\d{0,29})(?:\.\d{1,30})?(?:[eE][+-]?\d{1,3})?"
_J_PAIR = rf"[ \t]*+{_J_STR}[ \t]*+:[ \t]*+(?>{_J_STR}|{_J_NUM}|true|false|null)[ \t]*+"
_FLAT_OBJECT = re.compile(rf"\{{(?:{_J_PAIR}(?:,{_J_PAIR})*+)?\}}[ \t]*+")
_CEE = "@cee:"

# -- the human summaries -----------------------------------------------------------------

_PEER = r"\[(?P<client>[^\]\[ ]{1,64})\]:(?P<client_port>\d{1,5})"
_NUM = r"[0-9]{1,12}(?:\.[0-9]{1,9})?"
_SUMMARIES: dict[str, tuple[str, tuple[re.Pattern[str], ...]]] = {
    # keyword: (event name, the shapes repeld writes it in)
    "PREGREET": (
        EventName.EARLY_TALKER,
        (
            # The client's bytes sit between the address and the last "(action=...)".
            re.compile(
                rf"PREGREET (?P<bytes>\d{{1,12}}|penalty) after (?P<elapsed>{_NUM}) from {_PEER}: "
                r".*\(action=(?P<action>[a-z-]{1,16})\)",
                re.DOTALL,
            ),
        ),
    ),
    "HANGUP": (
        EventName.HANGUP,
        (
            re.compile(
                rf"HANGUP after (?P<elapsed>{_NUM}) from {_PEER} \((?P<how>[a-z-]{{1,16}})\)"
                r" before the greeting"
            ),
        ),
    ),
    "PASS": (
        EventName.PASS,
        (
            re.compile(
                rf"PASS (?P<reason>[A-Z][A-Z-]{{0,15}}) {_PEER} after (?P<elapsed>{_NUM})"
                r"(?: \((?P<early_bytes>\d{1,12}) bytes before the greeting\))?"
            ),
        ),
    ),
    "DNSBL": (
        EventName.DNSBL,
        (
            re.compile(
                rf"DNSBL rank (?P<score>-?\d{{1,12}}) for {_PEER} after (?P<elapsed>{_NUM}): "
                r"(?P<lists>[^ ]{1,4096}|no list) \(action=(?P<action>[a-z-]{1,16})\)"
            ),
        ),
    ),
    "BACKEND-ERROR": (
        EventName.BACKEND_ERROR,
        (
            re.compile(
                rf"BACKEND-ERROR (?P<backend>\S{{1,300}}) for {_PEER} after (?P<elapsed>{_NUM}): "
                r"(?P<error>.*) \(replied 421\)",
                re.DOTALL,
            ),
            re.compile(
                r"BACKEND-ERROR (?P<backend>\S{1,300}) for (?P<count>\d{1,12}) clients, the last "
                rf"{_PEER} after (?P<elapsed>{_NUM}): (?P<error>.*) \(replied 421\)",
                re.DOTALL,
            ),
        ),
    ),
    "PROXY-ERROR": (
        EventName.PROXY_ERROR,
        (
            re.compile(
                rf"PROXY-ERROR from balancer {_PEER} after (?P<elapsed>{_NUM}): "
                r"(?P<reason>[a-z0-9-]{1,32}) \((?P<detail>.*)\)",
                re.DOTALL,
            ),
        ),
    ),
    "OVERLOAD": (
        EventName.OVERLOAD,
        (
            re.compile(
                r"OVERLOAD (?P<limit>[a-z-]{1,32}): refused (?P<refused>\d{1,12}) connection\(s\),"
                rf" last from {_PEER} \(replied 421\)"
            ),
        ),
    ),
}
_KEYWORD = re.compile(r"[A-Z][A-Z0-9-]{0,31}(?=[ :]|$)")
_BROKEN_DOWN = frozenset(event for event, _ in _SUMMARIES.values())


class Years:
    """The years of one log's RFC 3164 timestamps, which carry none, read in order.

    The first is `year`; each later one is the year, of the last line's and the
    two beside it, that puts its month nearest the last line's (Jan after Dec
    is the next year's, Dec after Jan the year before's: logs merged, or read
    newest first). `guess` (no --year given): the first timestamp is not dated
    more than a day after `now`; one that would be is the year before's, as a
    December log read in January is. (The later ones follow it, even past
    `now`: an archive of last winter read today keeps its own order.)
    """

    __slots__ = ("_guess", "_last", "_now", "year")

    def __init__(self, year: int, *, guess: bool = False, now: float | None = None) -> None:
        self.year = year
        self._guess = guess
        self._now = time.time() if now is None else now
        self._last: int | None = None  # the last line's year * 12 + month

    def of(self, month: int, day: int) -> int:
        """The year of a timestamp in `month` (and `day`), this line's."""
        year = self.year
        if self._last is not None:
            last = self._last
            year = min((year, year + 1, year - 1), key=lambda y: abs(y * 12 + month - last))
        if self._guess and self._last is None:  # the first line: later ones follow it
            try:
                if time.mktime((year, month, day, 0, 0, 0, 0, 0, -1)) > self._now + 86400:
                    year -= 1
            except (OverflowError, ValueError):
                pass
        self.year, self._last = year, year * 12 + month
        return year


def _bsd_time(match: re.Match[str], year: int | Years) -> float | None:
    month = _MONTHS.get(match["mon"])
    if month is None:
        return None
    day, hour, minute, second = (int(match[g]) for g in ("day", "h", "m", "s"))
    if isinstance(year, Years):
        year = year.of(month, day)
    try:
        when = time.mktime((year, month, day, hour, minute, second, 0, 0, -1))
    except (OverflowError, ValueError):
        return None
    return when + float(match["frac"]) if match["frac"] else when


def _file_time(match: re.Match[str], year: int | Years) -> float | None:
    """The time of a file line's head, in whichever of its shapes it came."""
    if match["iso"]:
        return _iso_time(match["iso"])
    if match["unix"]:
        return float(match["unix"])
    if match["full"]:
        zone = match["zone"]
        if zone in ("UTC", "GMT"):
            return _iso_time(match["full"] + "+00:00")
        if zone[0] in "+-":
            return _iso_time(match["full"] + zone)
        return _iso_time(match["full"])  # an abbreviation: local time, as RFC 3164's
    return _bsd_time(match, year)


def _iso_time(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError):
        return None


def _sd_unescape(value: str) -> str:
    # RFC 5424 escapes only \\, \" and \]; a backslash before anything else is itself.
    # str.split takes the pairs from the left, as the escaping wrote them: linear,
    # with no object per escape.
    if "\\" not in value:
        return value
    return "\\".join(part.replace('\\"', '"').replace("\\]", "]") for part in value.split("\\\\"))


def _from_sd(line: str, pos: int) -> tuple[dict[str, str] | None, int]:
    """The event of the structured data at `pos`, and where the MSG starts (-1: no MSG).

    Only SD-ELEMENTs one after the other from `pos` are read; the first private
    one with an `event` parameter is the event.
    """
    if line.startswith("-", pos):
        return None, pos + 2 if line.startswith(" ", pos + 1) else -1
    found: dict[str, str] | None = None
    while (element := _SD_ELEMENT.match(line, pos)) is not None:
        pos = element.end()
        if found is None and _PRIVATE.fullmatch(element.group(1)):
            params = dict(reversed(_SD_PARAM.findall(element.group(2))))  # the first wins
            if params.get("event"):
                found = {k: _sd_unescape(v) for k, v in params.items()}
        if not line.startswith("[", pos):
            break
    else:
        return found, -1  # not structured data: no message either
    if pos == len(line):
        return found, -1
    return found, pos + 1 if line.startswith(" ", pos) else -1


def _from_json(text: str) -> dict[str, str] | None:
    if _FLAT_OBJECT.fullmatch(text) is None:
        return None
    try:
        obj = json.loads(text)
    except ValueError:  # e.g. a lone surrogate escape, or a number past the digit limit
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str) or not obj["event"]:
        return None
    return {str(k): _json_text(v) for k, v in obj.items()}


def _json_text(value: object) -> str:
    # A flat object's values: strings, numbers, true, false and null, as JSON spells them.
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return str(value)


def _other_name(word: str, summary: str) -> str:
    # The name of an event the report does not break down is its keyword in lower
    # case, but for WORKER, which says "started" or "exited".
    if word == "WORKER":
        return "worker-exit" if " exited with " in summary else "worker-start"
    if word == "DNS" and summary.startswith("DNS list "):
        return EventName.DNS_LIST_ALARM
    return word.lower()


def _from_summary(summary: str, name: str | None) -> dict[str, str] | None:
    keyword = _KEYWORD.match(summary)
    if keyword is None:
        return None
    word = keyword.group()
    known = _SUMMARIES.get(word)
    if known is None:
        if name in _BROKEN_DOWN:
            return None
        return {"event": name or _other_name(word, summary)}
    event, patterns = known
    if name is not None and name != event:
        return None
    for pattern in patterns:
        found = pattern.fullmatch(summary)
        if found is not None:
            fields = {k: v for k, v in found.groupdict().items() if v is not None}
            fields["event"] = event
            if event == EventName.PASS:
                fields["reason"] = fields["reason"].lower()
            if fields.get("bytes") == "penalty":
                fields["bytes"] = "0"
            return fields
    return None


def _from_message(msg: str) -> tuple[str, dict[str, str]] | None:
    """The event in the MSG of a repeld line, read from its first character."""
    if msg.startswith(_CEE):
        body = msg[len(_CEE) :]
        fields = _from_json(body[1:] if body.startswith(" ") else body)
        return None if fields is None else ("json", fields)
    name = None
    if (stderr := _STDERR.match(msg)) is not None:
        name = stderr["name"]
        msg = msg[stderr.end() :]
    fields = _from_summary(msg, name)
    return None if fields is None else ("summary", fields)


def parse_line(line: str, year: int | Years) -> Record | None:
    """The repeld event in one log line, or None if there is none.

    `year` dates RFC 3164 timestamps, which carry none (`Years`: a log's, read
    in order, across its new years).
    """
    line = line.rstrip("\r\n")
    if len(line) > MAX_LINE:
        return None
    if (head := _RFC5424_HEAD.match(line)) is not None:
        if head.group(3) != _APP:
            return None
        when = None if head.group(1) == "-" else _iso_time(head.group(1))
        host = "" if head.group(2) == "-" else head.group(2)
        procid = "" if head.group(4) == "-" else head.group(4)
        fields, msg_at = _from_sd(line, head.end())
        if fields is not None:
            return Record(fields["event"], fields, when, "rfc5424", procid, host)
        found = None if msg_at < 0 else _from_message(line[msg_at:])
    elif (head := _FILE_HEAD.match(line)) is not None:
        when = _file_time(head, year)
        host = "" if head["host"] in (None, "-") else head["host"]  # "-": RFC 5424's none
        procid = head["pid"] or ""
        found = _from_message(line[head.end() :])
    elif _STDERR.match(line) is not None:
        when, host, procid = None, "", ""
        found = _from_message(line)
    else:
        return None
    if found is None:
        return None
    shape, fields = found
    return Record(fields["event"], fields, when, shape, procid, host)

"""Serialise events: RFC 5424 with structured data, or `@cee:` JSON; no I/O.

The writers are pure functions of an `Event`, a `Header` (who is writing) and
the wall-clock time, so the exact bytes on the wire are unit-tested.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from repeld.core.events import Event, FieldValue

__all__ = [
    "FACILITIES",
    "FORMATS",
    "Header",
    "format_json",
    "format_rfc5424",
    "format_stderr",
    "valid_sd_id",
    "wire_format",
]

#: Syslog facility codes (RFC 5424 section 6.2.1) by the names admins use.
FACILITIES: dict[str, int] = {
    "kern": 0,
    "user": 1,
    "mail": 2,
    "daemon": 3,
    "auth": 4,
    "syslog": 5,
    "lpr": 6,
    "news": 7,
    "uucp": 8,
    "cron": 9,
    "authpriv": 10,
    "ftp": 11,
    "ntp": 12,
    "security": 13,
    "console": 14,
    **{f"local{i}": 16 + i for i in range(8)},
}

#: What --log-format takes; "auto" is a choice between the other two, by target.
FORMATS = ("auto", "rfc5424", "json")


def wire_format(log_format: str, target_kind: str) -> str:
    """The format written for `--log-format` to a target of `target_kind`.

    "auto" is JSON on a local unix socket and RFC 5424 over UDP or TCP: the
    local daemons' stock inputs (rsyslog's imuxsock, journald) read RFC 3164
    headers only and mangle RFC 5424 into an unparsed message, whereas network
    inputs parse RFC 5424 and keep its structured data.
    """
    if log_format != "auto":
        return log_format
    return "json" if target_kind == "unix" else "rfc5424"


# SD-NAME: 1 to 32 printable US-ASCII but '=', ' ', ']' and '"' (RFC 5424 6.3.2);
# a private SD-ID is name@<private enterprise number>.
_SD_ID = re.compile(r"^[!#-<>-\\^-~]{1,32}$")
_SD_ID_PRIVATE = re.compile(r"^[^@]+@[0-9]+(\.[0-9]+)*$")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def valid_sd_id(sd_id: str) -> bool:
    """Whether `sd_id` is a well-formed private SD-ID such as `repeld@32473`."""
    return bool(_SD_ID.fullmatch(sd_id)) and bool(_SD_ID_PRIVATE.fullmatch(sd_id))


@dataclass(frozen=True, slots=True)
class Header:
    """What every message says about its sender."""

    facility: int
    hostname: str
    app_name: str
    procid: int
    sd_id: str
    #: Local sockets (/dev/log) get no hostname in the RFC 3164 header, as glibc does.
    local: bool = False
    #: `HOSTNAME APP-NAME PROCID` of an RFC 5424 header, made once.
    rfc5424_names: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = f"{self.hostname or '-'} {self.app_name} {self.procid}"
        object.__setattr__(self, "rfc5424_names", names)


def _pri(header: Header, event: Event) -> str:
    return f"<{header.facility * 8 + int(event.severity)}>"


def _sd_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _sd_value(value: FieldValue) -> str:
    # Numbers need no escaping; most strings (addresses, names) need none either.
    text = str(value)
    if isinstance(value, str) and ("\\" in text or '"' in text or "]" in text):
        return _sd_escape(text)
    return text


class _SecondCache:
    """The formatted whole second of the last timestamp: events come many a second.

    Keyed by the time zone too (tzset() changes local time), for local clocks.
    A hot caller reads `second` and `text` itself and calls only for a new second.
    """

    __slots__ = ("_render", "second", "text", "zone")

    def __init__(self, render: Callable[[int], str]) -> None:
        self._render = render
        self.second = -1
        self.zone = ""
        self.text = ""

    def __call__(self, second: int, zone: str = "") -> str:
        if second != self.second or zone != self.zone:
            self.text = self._render(second)
            self.second = second
            self.zone = zone
        return self.text


_utc_second = _SecondCache(lambda s: time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s)))
_local_second = _SecondCache(lambda s: time.strftime("%H:%M:%S", time.localtime(s)))


#: SD-PARAMS templates (`k1="%s" k2="%s"`) by field-name list: an event's
#: names are one of a few constant tuples (core/events.py), and `template %
#: values` costs half what an f-string per field and a join do. Bounded, for a
#: list of names that never repeats (each would be a new template).
_TEMPLATES: dict[tuple[str, ...], str] = {}
_TEMPLATES_MAX = 512


def _template(keys: tuple[str, ...]) -> str:
    template = " ".join([f'{k.replace("%", "%%")}="%s"' for k in keys])
    if len(_TEMPLATES) < _TEMPLATES_MAX:
        _TEMPLATES[keys] = template
    return template


def format_rfc5424(event: Event, header: Header, now: float) -> bytes:
    """`<PRI>1 TIME HOST APP PROCID MSGID [SD-ID k="v" ...] summary` as bytes."""
    keys, values = event.keys, event.values
    template = _TEMPLATES.get(keys) or _template(keys)
    params = template % values
    # Field names are fixed words: a value that needs escaping shows as one of
    # these characters, or as a quote beyond each field's own two. One scan of
    # the whole, where escaping each value cost a call per field.
    if "\\" in params or "]" in params or params.count('"') != 2 * len(values):
        params = template % tuple([_sd_value(v) for v in values])
    # PRI and TIMESTAMP written here, not by helpers: this runs for every
    # handed-off client, and each Python call on that path costs about half a
    # µs in place (docs/perf-log/2026-12-07-day.md).
    second = int(now)
    utc = _utc_second
    line = (
        f"<{header.facility * 8 + event.severity}>1"
        f" {utc.text if second == utc.second else utc(second)}"
        f".{int((now - second) * 1_000_000):06d}Z"
        f" {header.rfc5424_names} {event.name} [{header.sd_id} {params}] {event.summary}"
    )
    return line.encode("utf-8", "backslashreplace")


def _rfc3164_time(now: float) -> str:
    tm = time.localtime(now)
    return (
        f"{_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:2d} {tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}"
    )


def format_json(event: Event, header: Header, now: float) -> bytes:
    """An RFC 3164 header, then `@cee:` and one JSON object with the event's fields."""
    host = "" if header.local else f"{header.hostname} "
    payload: dict[str, FieldValue] = dict(zip(event.keys, event.values, strict=False))
    payload["msg"] = event.summary
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=True)
    line = (
        f"{_pri(header, event)}{_rfc3164_time(now)} {host}{header.app_name}[{header.procid}]:"
        f" @cee:{body}"
    )
    return line.encode("utf-8", "backslashreplace")


def format_stderr(event: Event, now: float) -> str:
    """The readable line `-f` prints for each event."""
    clock = _local_second(int(now), time.tzname[0])
    return f"{clock}.{int(now * 1000) % 1000:03d} {event.name}: {event.summary}"

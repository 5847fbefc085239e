"""A real syslog receiver for tests: parses what repeld sends in both formats."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

__all__ = ["Received", "parse"]

_RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) "
    r"(?P<msgid>\S+) \[(?P<sdid>[^ \]]+)(?P<params>(?: [^=\s\]\"]+=\"(?:[^\"\\\]]|\\.)*\")*)\] "
    r"(?P<msg>.*)$",
    re.S,
)
_PARAM = re.compile(r' ([^=\s\]"]+)="((?:[^"\\\]]|\\.)*)"')
_CEE = re.compile(
    r"^<(?P<pri>\d{1,3})>(?P<ts>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) (?:(?P<host>\S+) )?"
    r"(?P<app>[^\s\[]+)\[(?P<procid>\d+)\]: @cee:(?P<json>\{.*\})$",
    re.S,
)


@dataclass(frozen=True)
class Received:
    """One parsed syslog message."""

    format: str
    facility: int
    severity: int
    event: str
    fields: dict[str, str]
    msg: str
    sd_id: str = ""
    host: str = ""
    procid: str = ""


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def parse(datagram: bytes) -> Received:
    """Parse one message; raises ValueError for anything malformed."""
    text = datagram.decode("utf-8")
    m = _RFC5424.match(text)
    if m:
        pri = int(m["pri"])
        fields = {k: _unescape(v) for k, v in _PARAM.findall(m["params"])}
        return Received(
            "rfc5424",
            pri // 8,
            pri % 8,
            m["msgid"],
            fields,
            m["msg"],
            m["sdid"],
            m["host"],
            m["procid"],
        )
    m = _CEE.match(text)
    if m:
        pri = int(m["pri"])
        obj = json.loads(m["json"])
        msg = obj.pop("msg")
        return Received(
            "json",
            pri // 8,
            pri % 8,
            obj["event"],
            {k: str(v) for k, v in obj.items()},
            msg,
            host=m["host"] or "",
            procid=m["procid"],
        )
    raise ValueError(f"not a syslog message repeld writes: {text!r}")

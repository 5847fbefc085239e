"""The exact bytes repeld puts on the wire for syslog: RFC 5424 and `@cee:` JSON."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator

import pytest

from repeld.core import events, logformat
from repeld.core.events import ConnInfo, Event, Severity
from repeld.core.hold import Pass, PassReason
from repeld.core.logformat import (
    FACILITIES,
    Header,
    format_json,
    format_rfc5424,
    format_stderr,
    valid_sd_id,
    wire_format,
)

from ..syslog_receiver import parse

#: 2023-11-14T22:13:20.25Z: a quarter second is exact in binary floating point.
NOW = 1700000000.25
#: 2023-11-05T00:00:00.5Z: a one-digit day of the month.
NOW_DAY5 = 1699142400.5

CONN = ConnInfo("127.0.0.9", 40000, "127.0.0.1", 25)
HEADER = Header(facility=2, hostname="mx1.example.org", app_name="repeld", procid=4242,
                sd_id="repeld@32473")  # fmt: skip
LOCAL = Header(facility=2, hostname="mx1.example.org", app_name="repeld", procid=4242,
               sd_id="repeld@32473", local=True)  # fmt: skip


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """RFC 3164 timestamps are local time: pin the zone to UTC for exact bytes."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def passed() -> Event:
    return events.passed(CONN, Pass(PassReason.DELAY, 25.0))


def test_rfc5424_exact_bytes() -> None:
    assert format_rfc5424(passed(), HEADER, NOW) == (
        b"<22>1 2023-11-14T22:13:20.250000Z mx1.example.org repeld 4242 pass"
        b' [repeld@32473 event="pass" client="127.0.0.9" client_port="40000"'
        b' server="127.0.0.1" server_port="25" elapsed="25.0" reason="delay" rtt_ms="0.0"'
        b' early_bytes="0"]'
        b" PASS DELAY [127.0.0.9]:40000 after 25.000"
    )


def test_rfc5424_is_read_back_by_an_independent_parser() -> None:
    got = parse(format_rfc5424(passed(), HEADER, NOW))
    assert got.format == "rfc5424"
    assert (got.facility, got.severity) == (2, 6)
    assert got.event == "pass"
    assert got.sd_id == "repeld@32473"
    assert got.host == "mx1.example.org"
    assert got.fields == {
        "event": "pass",
        "client": "127.0.0.9",
        "client_port": "40000",
        "server": "127.0.0.1",
        "server_port": "25",
        "elapsed": "25.0",
        "reason": "delay",
        "rtt_ms": "0.0",
        "early_bytes": "0",
    }
    assert got.msg == "PASS DELAY [127.0.0.9]:40000 after 25.000"


@pytest.mark.parametrize(
    ("facility", "severity", "pri"),
    [
        ("kern", Severity.INFO, 6),
        ("mail", Severity.ERR, 19),
        ("mail", Severity.WARNING, 20),
        ("mail", Severity.NOTICE, 21),
        ("mail", Severity.INFO, 22),
        ("daemon", Severity.WARNING, 28),
        ("local0", Severity.INFO, 134),
        ("local7", Severity.ERR, 187),
    ],
)
def test_pri_is_facility_times_8_plus_severity(facility: str, severity: Severity, pri: int) -> None:
    event = Event.of("x", severity, (("event", "x"),), "X")
    header = Header(FACILITIES[facility], "h", "repeld", 1, "repeld@32473")
    assert format_rfc5424(event, header, NOW).startswith(b"<%d>1 " % pri)
    assert format_json(event, header, NOW).startswith(b"<%d>" % pri)


def test_rfc5424_header_fields_in_order() -> None:
    line = format_rfc5424(passed(), HEADER, NOW).decode()
    pri_version, ts, host, app, procid, msgid, rest = line.split(" ", 6)
    assert pri_version == "<22>1"  # VERSION is 1
    assert ts == "2023-11-14T22:13:20.250000Z"
    assert (host, app, procid, msgid) == ("mx1.example.org", "repeld", "4242", "pass")
    assert rest.startswith("[repeld@32473 ")


def test_rfc5424_empty_hostname_is_the_nil_value() -> None:
    header = Header(2, "", "repeld", 7, "repeld@32473")
    assert format_rfc5424(passed(), header, NOW).startswith(
        b"<22>1 2023-11-14T22:13:20.250000Z - repeld 7 pass ["
    )


def test_rfc5424_timestamp_is_utc_with_microseconds() -> None:
    line = format_rfc5424(passed(), HEADER, NOW_DAY5)
    assert b" 2023-11-05T00:00:00.500000Z " in line
    assert b" 2023-11-14T22:13:20.000000Z " in format_rfc5424(passed(), HEADER, 1700000000.0)


def test_timestamps_are_right_whatever_order_they_come_in(utc: None) -> None:
    # The formatted second is reused while events come within it; never across
    # seconds, in either direction, and never across a change of time zone.
    for now in (NOW, NOW + 0.5, NOW + 1.25, NOW, NOW_DAY5, NOW + 86400.75, NOW):
        whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        micros = round((now % 1) * 1_000_000)
        assert f" {whole}.{micros:06d}Z ".encode() in format_rfc5424(passed(), HEADER, now)
        local = time.strftime("%H:%M:%S", time.localtime(now))
        assert format_stderr(passed(), now).startswith(f"{local}.{micros // 1000:03d} pass: ")
    assert format_stderr(passed(), NOW).startswith("22:13:20.250 ")
    # the same second in another zone is another clock reading (the utc
    # fixture puts TZ back after the test)
    os.environ["TZ"] = "IST-5:30"  # POSIX rule: no tzdata needed
    time.tzset()
    assert format_stderr(passed(), NOW).startswith("03:43:20.250 ")


def test_rfc5424_param_values_escape_quote_backslash_and_bracket() -> None:
    event = Event.of(
        "early-talker",
        Severity.WARNING,
        (("event", "early-talker"), ("first", 'a"b\\c]d'), ("bytes", 7)),
        'PREGREET 7 ] "raw"',
    )
    assert format_rfc5424(event, HEADER, NOW) == (
        b"<20>1 2023-11-14T22:13:20.250000Z mx1.example.org repeld 4242 early-talker"
        b' [repeld@32473 event="early-talker" first="a\\"b\\\\c\\]d" bytes="7"]'
        b' PREGREET 7 ] "raw"'
    )
    got = parse(format_rfc5424(event, HEADER, NOW))
    assert got.fields["first"] == 'a"b\\c]d'
    assert got.fields["bytes"] == "7"


def test_rfc5424_a_percent_sign_is_text_in_a_name_and_in_a_value() -> None:
    # SD-PARAMS are formatted with one `k="%s"` template per list of names:
    # a % in a name is not a conversion, and one in a value is left alone.
    event = Event.of(
        "stats", Severity.INFO, (("event", "stats"), ("share%", "50%s %d"), ("n", 1)), "STATS %s"
    )
    assert format_rfc5424(event, HEADER, NOW).endswith(
        b' [repeld@32473 event="stats" share%="50%s %d" n="1"] STATS %s'
    )


def test_rfc5424_templates_are_bounded_and_every_event_is_right_past_the_bound() -> None:
    # A list of names that never repeats would be a template each: the table
    # stops growing at its bound, and an event past it is formatted all the same.
    for i in range(logformat._TEMPLATES_MAX + 50):
        event = Event.of("stats", Severity.INFO, (("event", "stats"), (f"k{i}", i)), "S")
        assert f' [repeld@32473 event="stats" k{i}="{i}"] S'.encode() in format_rfc5424(
            event, HEADER, NOW
        )
    assert len(logformat._TEMPLATES) <= logformat._TEMPLATES_MAX


def test_rfc5424_hostile_client_bytes_stay_inside_their_param() -> None:
    from repeld.core.hold import EarlyTalk

    hostile = b'EHLO "x"] \\ [y@1 z="\x00\x1b[31m\xff\r\n'
    event = events.early_talker(CONN, EarlyTalk(len(hostile), hostile, 0.5), "drop")
    line = format_rfc5424(event, HEADER, NOW)
    assert all(0x20 <= b < 0x7F for b in line)
    got = parse(line)
    assert got.fields["first"] == 'EHLO "x"] \\\\ [y@1 z="\\x00\\x1b[31m\\xff\\r\\n'
    assert got.fields["client"] == "127.0.0.9"
    assert got.fields["action"] == "drop"


def test_rfc5424_msg_is_utf8_and_unencodable_text_never_raises() -> None:
    event = Event.of("error", Severity.ERR, (("event", "error"),), "caf\u00e9 \udcff")
    assert format_rfc5424(event, HEADER, NOW).endswith(b"] caf\xc3\xa9 \\udcff")


def test_json_exact_bytes(utc: None) -> None:
    assert format_json(passed(), HEADER, NOW) == (
        b"<22>Nov 14 22:13:20 mx1.example.org repeld[4242]: @cee:"
        b'{"event":"pass","client":"127.0.0.9","client_port":40000,"server":"127.0.0.1",'
        b'"server_port":25,"elapsed":25.0,"reason":"delay","rtt_ms":0.0,'
        b'"early_bytes":0,"msg":"PASS DELAY [127.0.0.9]:40000 after 25.000"}'
    )


def test_json_local_header_omits_the_hostname(utc: None) -> None:
    assert format_json(passed(), LOCAL, NOW_DAY5) == (
        b"<22>Nov  5 00:00:00 repeld[4242]: @cee:"
        b'{"event":"pass","client":"127.0.0.9","client_port":40000,"server":"127.0.0.1",'
        b'"server_port":25,"elapsed":25.0,"reason":"delay","rtt_ms":0.0,'
        b'"early_bytes":0,"msg":"PASS DELAY [127.0.0.9]:40000 after 25.000"}'
    )
    got = parse(format_json(passed(), LOCAL, NOW_DAY5))
    assert got.host == ""
    assert parse(format_json(passed(), HEADER, NOW_DAY5)).host == "mx1.example.org"


def test_rfc5424_local_header_keeps_the_hostname() -> None:
    # Only the RFC 3164 header of the json format drops it for local sockets.
    assert format_rfc5424(passed(), LOCAL, NOW) == format_rfc5424(passed(), HEADER, NOW)


def test_json_is_ascii_and_round_trips(utc: None) -> None:
    event = Event.of(
        "early-talker",
        Severity.WARNING,
        (("event", "early-talker"), ("first", 'q"\\\u00e9\x1b'), ("bytes", 3), ("elapsed", 0.5)),
        "caf\u00e9 \x00",
    )
    line = format_json(event, HEADER, NOW)
    assert all(0x20 <= b < 0x7F for b in line)
    obj = json.loads(line.split(b"@cee:", 1)[1])
    assert obj == {
        "event": "early-talker",
        "first": 'q"\\\u00e9\x1b',
        "bytes": 3,
        "elapsed": 0.5,
        "msg": "caf\u00e9 \x00",
    }
    got = parse(line)
    assert (got.format, got.event, got.facility, got.severity) == ("json", "early-talker", 2, 4)


def test_stderr_line(utc: None) -> None:
    assert format_stderr(passed(), NOW) == (
        "22:13:20.250 pass: PASS DELAY [127.0.0.9]:40000 after 25.000"
    )


@pytest.mark.parametrize(
    "sd_id",
    [
        "repeld@32473",
        "a@1",
        "origin.x@1.3.6.1",
        "x" * 26 + "@12345",  # 32 characters: the SD-NAME maximum
        "a!#$%&'()*+,-./;<>?[\\^_`{|}~@9",
    ],
)
def test_valid_sd_ids(sd_id: str) -> None:
    assert valid_sd_id(sd_id)


@pytest.mark.parametrize(
    "sd_id",
    [
        "",
        "repeld",  # no enterprise number: IANA-reserved names only
        "@32473",
        "repeld@",
        "repeld@pen",
        "repeld@1.",
        "repeld@@1",
        "x" * 27 + "@12345",  # 33 characters
        "re peld@1",
        're"peld@1',
        "re]peld@1",
        "re=peld@1",
        "r\u00e9peld@1",
        "\trepeld@1",
        "repeld@1 ",
    ],
)
def test_invalid_sd_ids(sd_id: str) -> None:
    assert not valid_sd_id(sd_id)


def test_sd_id_with_a_trailing_newline_is_invalid() -> None:
    assert not valid_sd_id("repeld@32473\n")


def test_json_with_a_non_ascii_hostname_does_not_raise(utc: None) -> None:
    header = Header(2, "m\u00e4il", "repeld", 1, "repeld@32473")
    assert format_rfc5424(passed(), header, NOW).startswith(b"<22>1 ")
    line = format_json(passed(), header, NOW)
    assert line.startswith(b"<22>Nov 14 22:13:20 ")


@pytest.mark.parametrize(
    ("log_format", "kind", "written"),
    [
        ("auto", "unix", "json"),
        ("auto", "udp", "rfc5424"),
        ("auto", "tcp", "rfc5424"),
        ("rfc5424", "unix", "rfc5424"),
        ("json", "udp", "json"),
        ("json", "unix", "json"),
    ],
)
def test_auto_is_json_on_a_local_socket_and_rfc5424_on_the_network(
    log_format: str, kind: str, written: str
) -> None:
    assert wire_format(log_format, kind) == written

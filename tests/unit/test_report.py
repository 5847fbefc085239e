"""The report's parsing, counting and drawing, fed log lines; no files, no sockets."""

from __future__ import annotations

import gzip
import io
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repeld.core import events
from repeld.core.dnsbl import DnsAction
from repeld.core.events import ConnInfo, Event
from repeld.core.hold import (
    Blocked,
    EarlyTalk,
    HangUp,
    Pass,
    PassReason,
    escape_bytes,
)
from repeld.core.logformat import FACILITIES, Header, format_json, format_rfc5424, format_stderr
from repeld.core.names import EventName, RelayEnd
from repeld.report import tally as tally_module
from repeld.report.main import main, make_parser, read_lines, tally_lines
from repeld.report.parse import MAX_LINE, Years, parse_line
from repeld.report.svg import LABELS, WIDTH, legend_rows, render_svg
from repeld.report.tally import CATEGORIES, Tally, TopCounter, network_of
from repeld.report.text import render_text

from ..hostile import first_bytes

YEAR = 2026
NOW = 1_795_998_305.25  # 2026-11-30T00:25:05.25Z
HEADER = Header(FACILITIES["mail"], "mx1.example.org", "repeld", 4242, "mx@99999")


def _conn(client: str = "192.0.2.7", port: int = 50123) -> ConnInfo:
    return ConnInfo(client, port, "198.51.100.25", 25)


def _event_lines(event: Event) -> dict[str, str]:
    """One event in every shape the report reads."""
    rfc = format_rfc5424(event, HEADER, NOW).decode()
    cee = format_json(event, HEADER, NOW).decode()
    return {
        "rfc5424": rfc,
        "json": cee,
        "rsyslog-traditional-rfc5424": f"Nov 30 00:25:05 mx1 repeld[4242]: {event.summary}",
        "rsyslog-traditional-json": "Nov 30 00:25:05 mx1 repeld[4242]: " + cee.split("]: ", 1)[1],
        "rsyslog-fileformat": f"2026-11-30T00:25:05.250000+00:00 mx1 repeld[4242]: {event.summary}",
        "stderr": format_stderr(event, NOW),
        "journal-of-stderr": "Nov 30 00:25:05 mx1 repeld[4242]: " + format_stderr(event, NOW),
        # journalctl -o short-precise, short-full (UTC), short-unix, short-iso-precise
        "journal-short-precise": "Nov 30 00:25:05.250000 mx1 repeld[4242]: "
        + format_stderr(event, NOW),
        "journal-short-full": "Mon 2026-11-30 00:25:05 UTC mx1 repeld[4242]: "
        + format_stderr(event, NOW),
        "journal-short-unix": "1795998305.250000 mx1 repeld[4242]: " + format_stderr(event, NOW),
        "journal-short-iso-precise": "2026-11-30T00:25:05.250000+0000 mx1 repeld[4242]: "
        + format_stderr(event, NOW),
    }


SAMPLES = [
    events.early_talker(_conn(), EarlyTalk(18, b"EHLO [192.0.2.7]\r\n", 1.7), "drop"),
    events.early_talker(_conn(), EarlyTalk(4, b'"]\\x', 0.2), "reject"),
    events.penalized(_conn(), 0.002),
    events.hangup(_conn("2001:db8:1:2::9"), HangUp(12.1, reset=True)),
    events.passed(_conn(), Pass(PassReason.DELAY, 25.001)),
    events.passed(_conn(), Pass(PassReason.CACHE, 0.01)),
    events.backend_error(_conn(), 25.0, "127.0.0.1:10025", "Connection refused"),
    events.overload(_conn(), "max-held", 3),
]
#: The fields each shape keeps: the summary says less than the structured data.
SUMMARY_FIELDS = {
    "early-talker": ("client", "client_port", "elapsed", "action"),
    "hangup": ("client", "client_port", "elapsed", "how"),
    "pass": ("client", "client_port", "elapsed", "reason"),
    "backend-error": ("client", "client_port", "elapsed", "backend", "error"),
    "overload": ("limit", "refused"),
}


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.summary[:20])
@pytest.mark.parametrize("shape", list(_event_lines(SAMPLES[0])), ids=str)
def test_every_shape_gives_the_event_back(event: Event, shape: str) -> None:
    line = _event_lines(event)[shape]
    record = parse_line(line, YEAR)
    assert record is not None, line
    assert record.event == event.name
    keys = SUMMARY_FIELDS[event.name] if record.shape == "summary" else tuple(dict(event.fields))
    for key in keys:
        assert (
            float(record.fields[key]) == pytest.approx(event.get(key))
            if isinstance(event.get(key), float)
            else record.fields[key] == str(event.get(key))
        ), (shape, key, record.fields)
    if shape.startswith("stderr"):
        assert record.time is None
    else:
        assert record.time is not None
        exact = {"rfc5424", "rsyslog-fileformat", "journal-short-full", "journal-short-unix"}
        exact.add("journal-short-iso-precise")
        assert abs(record.time - NOW) < (1 if shape in exact else 86400)


def test_no_terminal_control_reaches_the_reader() -> None:
    # Anyone who can write to syslog can send repeld-tagged lines (`logger -t
    # repeld`): JSON escapes put an ESC, a BEL or a line end into a name that
    # the report prints, to the administrator's terminal.
    hostile = "\u001b]52;c;cm0gLXJmIH4=\u0007\n  repelled 99999 100.0%\u001b[2J"
    lines = [
        "Nov 30 00:25:05 mx1 repeld[1]: @cee:"
        + json.dumps({"event": "early-talker", "client": "192.0.2.7", "action": hostile}),
        "Nov 30 00:25:05 mx1 repeld[1]: @cee:" + json.dumps({"event": hostile}),
        "Nov 30 00:25:05 mx1 repeld[1]: @cee:"
        + json.dumps({"event": "early-talker", "client": hostile, "action": "drop"}),
        "Nov 30 00:25:05 mx1 repeld[1]: @cee:"
        + json.dumps({"event": "early-talker", "action": "enforce", "helo": hostile}),
    ]
    text = render_text(tally_lines(lines, YEAR))
    assert not [c for c in text if not c.isprintable() and c != "\n"]
    assert "\\x1b]52;c;cm0gLXJmIH4=\\x07\\n  repelled 99999 100.0%\\x1b[2J" in text
    assert not [line for line in text.splitlines() if line.startswith("  repelled 99999")]


def test_rfc3164_times_follow_the_logs_new_year() -> None:
    # A log across New Year: its Jan lines are the next year's, not eleven months
    # before its Dec ones (which drew a year-long, useless picture).
    line = "{} mx1 repeld[1]: PASS DELAY [192.0.2.7]:{} after 25.001"
    lines = [
        line.format("Dec 31 23:58:00", 1),
        line.format("Jan  1 00:01:00", 2),
        line.format("Dec 31 23:59:30", 3),  # merged out of order: still the old year
        line.format("Jan  1 00:02:00", 4),
    ]
    tally = tally_lines(lines, 2025)
    assert tally.first is not None and tally.last is not None
    assert tally.last - tally.first == pytest.approx(240.0)
    assert time.localtime(tally.first).tm_year == 2025
    assert time.localtime(tally.last).tm_year == 2026


def test_without_a_year_a_date_to_come_is_last_years() -> None:
    # A December log read on 8 January: its first timestamp is last December,
    # not eleven months ahead; a date of today stays this year's.
    now = time.mktime((2027, 1, 8, 12, 0, 0, 0, 0, -1))
    years = Years(2027, guess=True, now=now)
    assert (years.of(12, 30), years.of(12, 31), years.of(1, 2)) == (2026, 2026, 2027)
    today = Years(2027, guess=True, now=now)
    assert today.of(1, 8) == 2027
    assert today.of(1, 9) == 2027  # within a day: clocks and zones differ
    # `cat mail.log*` newest first, read on 8 January, back seven months: never
    # dated ahead of today (it once gave July and June of 2027).
    back = Years(2027, guess=True, now=now)
    months = [1, 12, 11, 10, 9, 8, 7, 6]
    assert [back.of(m, 15 if m != 1 else 5) for m in months] == [2027] + [2026] * 7
    # A log from 20 November to 20 February read on 8 December: only its first line
    # is judged against today; the others follow it, in order, not a year apart.
    dec = time.mktime((2026, 12, 8, 12, 0, 0, 0, 0, -1))
    archive = Years(2026, guess=True, now=dec)
    assert [archive.of(m, 20) for m in (11, 12, 1, 2)] == [2026, 2026, 2027, 2027]


def test_the_times_and_hosts_of_journalctl_and_nil_hosts() -> None:
    line = "PASS DELAY [192.0.2.7]:50123 after 25.001"
    precise = parse_line(f"Nov 30 00:25:05.250000 mx1 repeld[1]: {line}", YEAR)
    plain = parse_line(f"Nov 30 00:25:05 mx1 repeld[1]: {line}", YEAR)
    assert precise is not None and plain is not None
    assert precise.time is not None and plain.time is not None
    assert precise.time - plain.time == pytest.approx(0.25)
    dubai = parse_line(f"Mon 2026-11-30 04:25:05 +04 mx1 repeld[1]: {line}", YEAR)
    india = parse_line(f"Mon 2026-11-30 05:55:05 +0530 mx1 repeld[1]: {line}", YEAR)
    assert dubai is not None and india is not None
    assert dubai.time == india.time == NOW - 0.25
    # RFC 5424's NILVALUE host and a file line's "-" are the same process: no host
    nil_file = parse_line(f"Nov 30 00:25:05 - repeld[1]: {line}", YEAR)
    nil_5424 = parse_line(f"<22>1 2026-11-30T00:25:05Z - repeld 1 - - {line}", YEAR)
    assert nil_file is not None and nil_5424 is not None
    assert nil_file.host == nil_5424.host == ""


@pytest.mark.parametrize(
    "line",
    [
        "",
        "Nov 30 00:25:05 mx1 postfix/postscreen[77]: PREGREET 11 after 0.07 from [192.0.2.1]:5678: EHLO x",
        "Nov 30 00:25:05 mx1 sshd[1]: Accepted publickey for root",
        'Nov 30 00:25:05 mx1 other[1]: [x@1 nothing="here"] no event field',
        "Nov 30 00:25:05 mx1 other[1]: @cee:{not json",
        "repeld: listening on 127.0.0.1:2525 (bound 127.0.0.1:2525), backend 127.0.0.1:25",
    ],
)
def test_other_lines_are_not_events(line: str) -> None:
    assert parse_line(line, YEAR) is None


def test_what_a_client_sent_cannot_pose_as_an_event() -> None:
    # The bytes are quoted in the summary after the real structured data.
    sent = b'@cee:{"event":"pass","reason":"delay","elapsed":30} [a@1 event="pass"]'
    event = events.early_talker(_conn(), EarlyTalk(len(sent), sent, 0.5), "drop")
    for shape, line in _event_lines(event).items():
        record = parse_line(line, YEAR)
        assert record is not None and record.event == "early-talker", shape
        assert record.fields["action"] == "drop", shape


def test_unknown_fields_and_actions_are_carried_through() -> None:
    fields = {
        "event": "pass",
        "client": "192.0.2.7",
        "client_port": 1,
        "elapsed": 25.0,
        "reason": "delay",
        "early_bytes": 0,
        "msg": "PASS DELAY",
    }
    record = parse_line("<22>Nov 30 00:25:05 repeld[1]: @cee:" + json.dumps(fields), YEAR)
    assert record is not None and record.fields["early_bytes"] == "0"


def _tally(*evs: Event) -> Tally:
    return tally_lines([format_rfc5424(e, HEADER, NOW).decode() for e in evs], YEAR)


def test_observe_mode_counts_the_connection_once_as_would_repel() -> None:
    tally = _tally(
        events.early_talker(_conn(port=1), EarlyTalk(4, b"EHLO", 2.0), "log"),
        events.passed(_conn(port=1), Pass(PassReason.DELAY, 25.0)),
        events.passed(_conn(port=2), Pass(PassReason.DELAY, 25.0)),
        events.hangup(_conn(port=3), HangUp(7.0, reset=False)),
    )
    assert (tally.repelled, tally.would_repel, tally.waited, tally.judged) == (1, 1, 1, 3)
    assert tally.folded == 1 and tally.passes == {"delay": 2}
    assert (tally.what_if(5).repelled, tally.what_if(10).repelled) == (1, 2)


def test_an_observed_penalty_is_judged_by_the_verdict_that_ends_it() -> None:
    # --on-early log with penalties: a remembered talker's penalty event (0 bytes,
    # action log), then its connection's own talk and pass. One connection, one
    # "would repel", not three.
    tally = _tally(
        events.penalized(_conn(port=1), 0.0, "log"),
        events.early_talker(_conn(port=1), EarlyTalk(4, b"EHLO", 0.3), "log"),
        events.passed(_conn(port=1), Pass(PassReason.DELAY, 25.0)),
        events.penalized(_conn(port=2), 0.0, "log"),  # patient this time
        events.passed(_conn(port=2), Pass(PassReason.DELAY, 25.0)),
    )
    assert (tally.would_repel, tally.waited, tally.judged) == (1, 1, 2)
    assert tally.early == {"log": 1, "penalty-log": 2}
    assert tally.would_secs == {0: 1}


def test_an_observed_talker_the_lists_then_cut_off_is_counted_once() -> None:
    blocked = Blocked(2, ("bl.example",), 25.0, DnsAction.REJECT)
    tally = _tally(
        events.early_talker(_conn(port=1), EarlyTalk(4, b"EHLO", 2.0), "log"),
        events.dnsbl(_conn(port=1), blocked),
        events.passed(_conn(port=1), Pass(PassReason.DELAY, 25.0)),  # a later one, same port
    )
    assert (tally.would_repel, tally.waited, tally.judged) == (1, 1, 2)
    assert tally.folded == 1 and tally.dnsbl == {"reject": 1}


def test_an_observed_talker_that_hangs_up_is_counted_once() -> None:
    tally = _tally(
        events.early_talker(_conn(port=1), EarlyTalk(4, b"EHLO", 2.0), "log"),
        events.hangup(_conn(port=1), HangUp(3.0, reset=True)),
        events.hangup(_conn(port=2), HangUp(7.0, reset=False)),
    )
    assert (tally.repelled, tally.would_repel, tally.judged) == (1, 1, 2)
    assert tally.folded == 1 and tally.hangups == {"reset": 1, "close": 1}


def test_an_observed_talker_cut_off_for_its_flood_is_counted_once() -> None:
    # --on-early log, then FLOOD_LIMIT bytes unread (core/hold.py): the talk was
    # logged, then the cut written as a drop; one connection, "would repel".
    flood = EarlyTalk(20000, b"EHLO", 2.0)
    tally = _tally(
        events.early_talker(_conn(port=1), EarlyTalk(4, b"EHLO", 2.0), "log"),
        events.early_talker(_conn(port=1), flood, "drop"),
        events.early_talker(_conn(port=2), flood, "drop"),  # cut at once: never logged
    )
    assert (tally.repelled, tally.would_repel, tally.judged) == (1, 1, 2)
    assert tally.folded == 1 and tally.early == {"log": 1, "drop": 2}
    assert sum(n for _, n in tally.networks.most_common(5)) == 2


def _lines_of(*written: tuple[int, Event]) -> list[str]:
    """Each event as the process `pid` writes it (RFC 5424, PROCID `pid`)."""
    return [
        format_rfc5424(
            e, Header(FACILITIES["mail"], "mx1", "repeld", pid, "mx@99999"), NOW
        ).decode()
        for pid, e in written
    ]


def test_a_talker_held_when_repeld_stopped_is_not_folded_into_a_later_connection() -> None:
    # Logged, then told 421 at shutdown (no verdict is written for it); after a
    # restart a client that happens to have the same address and port passes.
    # It was folded into the old talk: a pass counted as a "would repel".
    talk = events.early_talker(_conn(port=1), EarlyTalk(4, b"EHLO", 2.0), "log")
    later = events.passed(_conn(port=1), Pass(PassReason.DELAY, 25.0))
    lines = _lines_of(
        (100, talk),
        (100, events.lifecycle(EventName.STOP)),
        (200, events.lifecycle(EventName.START)),
    )
    for pid in (200, 100):  # a new process, or the same PID again (reused)
        tally = tally_lines([*lines, *_lines_of((pid, later))], YEAR)
        assert tally.folded == 0 and tally.passes == {"delay": 1}
        assert (tally.would_repel, tally.waited, tally.judged) == (1, 1, 2)
    # -f's lines say no process: its stop and start end every connection before
    stderr = [format_stderr(e, NOW) for e in (talk, events.lifecycle(EventName.STOP), later)]
    tally = tally_lines(stderr, YEAR)
    assert tally.folded == 0 and (tally.would_repel, tally.waited) == (1, 1)


def test_an_observed_talker_is_folded_only_with_its_own_process_verdicts() -> None:
    talk = events.early_talker(_conn(port=1), EarlyTalk(4, b"EHLO", 2.0), "log")
    passed = events.passed(_conn(port=1), Pass(PassReason.DELAY, 25.0))
    # the same worker: one connection; another worker's: two
    assert tally_lines(_lines_of((101, talk), (101, passed)), YEAR).folded == 1
    assert tally_lines(_lines_of((101, talk), (102, passed)), YEAR).folded == 0
    # a worker that died holding it: the parent's worker-exit ends its connections,
    # and its PID, reused, is a new process
    died = events.worker(EventName.WORKER_EXIT, 0, 101, -9)
    tally = tally_lines(_lines_of((101, talk), (100, died), (101, passed)), YEAR)
    assert tally.folded == 0 and (tally.would_repel, tally.waited) == (1, 1)
    # the other workers' connections go on
    other = events.early_talker(_conn(port=2), EarlyTalk(4, b"EHLO", 2.0), "log")
    other_passed = events.passed(_conn(port=2), Pass(PassReason.DELAY, 25.0))
    lines = _lines_of((102, other), (100, died), (102, other_passed))
    assert tally_lines(lines, YEAR).folded == 1


def test_a_worker_that_starts_or_dies_ends_no_other_workers_connections() -> None:
    talk = events.early_talker(_conn(port=2), EarlyTalk(4, b"EHLO", 2.0), "log")
    passed = events.passed(_conn(port=2), Pass(PassReason.DELAY, 25.0))
    started = events.lifecycle(EventName.START)
    died = events.worker(EventName.WORKER_EXIT, 0, 101, -9)
    # a replacement worker's start, in its own PID
    assert tally_lines(_lines_of((102, talk), (103, started), (102, passed)), YEAR).folded == 1
    # -f with --workers: no line names its process, and a worker-exit read from
    # its summary names none either: it ends nothing
    stderr = [format_stderr(e, NOW) for e in (talk, died, started, passed)]
    assert tally_lines(stderr, YEAR).folded == 1


def test_merged_logs_of_two_hosts_keep_their_processes_apart() -> None:
    # Two MX hosts' logs in one file: each has a repeld with PID 101.
    talk = events.early_talker(_conn(port=1), EarlyTalk(4, b"EHLO", 2.0), "log")
    passed = events.passed(_conn(port=1), Pass(PassReason.DELAY, 25.0))
    stop = events.lifecycle(EventName.STOP)
    died = events.worker(EventName.WORKER_EXIT, 0, 101, -9)

    def rfc5424(host: str, event: Event) -> str:
        header = Header(FACILITIES["mail"], host, "repeld", 101, "mx@99999")
        return format_rfc5424(event, header, NOW).decode()

    def file_line(host: str, event: Event) -> str:  # `TIME HOST repeld[101]: @cee:{...}`
        header = Header(FACILITIES["mail"], host, "repeld", 101, "mx@99999")
        return format_json(event, header, NOW).decode()

    for shape in (rfc5424, file_line):
        # the other host's pass is another connection, not this talker's verdict
        tally = tally_lines([shape("mx1", talk), shape("mx2", passed)], YEAR)
        assert tally.folded == 0 and (tally.would_repel, tally.waited) == (1, 1), shape
        # the other host's stop, or its worker's exit, ends none of this host's talkers
        for end in (stop, died):
            lines = [shape("mx1", talk), shape("mx2", end), shape("mx1", passed)]
            assert tally_lines(lines, YEAR).folded == 1, (shape, end)
        # and the same host's stop ends them
        lines = [shape("mx1", talk), shape("mx1", stop), shape("mx1", passed)]
        assert tally_lines(lines, YEAR).folded == 0, shape
    # One process, its host spelled two ways (a reload from local JSON, the
    # syslog daemon's short name, to RFC 5424's full one): still one process.
    lines = [file_line("mx1", talk), rfc5424("MX1.example.org", passed)]
    assert tally_lines(lines, YEAR).folded == 1
    # Hosts named by their addresses (a relay's HOSTNAME) are two hosts.
    for one, other in (("192.0.2.7", "192.0.2.8"), ("2001:db8::7", "2001:db8::8")):
        assert tally_lines([rfc5424(one, talk), rfc5424(other, passed)], YEAR).folded == 0
        lines = [rfc5424(one, talk), rfc5424(other, stop), rfc5424(one, passed)]
        assert tally_lines(lines, YEAR).folded == 1


def test_the_talkers_forgotten_for_room_are_forgotten_by_their_process_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("repeld.report.tally.MAX_KEYS", 3)
    talks = [
        (101, events.early_talker(_conn(port=p), EarlyTalk(4, b"EHLO", 2.0), "log"))
        for p in (1, 2, 3, 4)
    ]
    stop = (101, events.lifecycle(EventName.STOP))
    again = [(201, events.passed(_conn(port=p), Pass(PassReason.DELAY, 25.0))) for p in (1, 4)]
    tally = tally_lines(_lines_of(*talks, stop, *again), YEAR)
    assert tally.folded == 0 and tally.passes == {"delay": 2}
    tally = tally_lines(_lines_of(*talks, (101, again[1][1])), YEAR)
    assert tally.folded == 1  # port 1 was forgotten for room; port 4 is still open


def test_held_out_clients_are_not_in_the_share() -> None:
    tally = _tally(
        events.passed(_conn(), Pass(PassReason.TRUSTED, 0.0)),
        events.passed(_conn(), Pass(PassReason.NODELAY, 0.0)),
        events.passed(_conn(), Pass(PassReason.CACHE, 0.01)),
        events.penalized(_conn(), 0.002),
        events.early_talker(_conn(), EarlyTalk(4, b"EHLO", 0.1), "drop"),
    )
    assert (tally.repelled, tally.judged) == (1, 1)
    assert tally.early == {"penalty": 1, "drop": 1}


@pytest.mark.parametrize(
    ("delay", "repelled", "passed", "unknown"),
    [
        (10, 2, 3, 0),  # e=4 and 9.5 < 10; e=12 and both 20 s waits pass
        (15, 3, 2, 0),
        (20, 3, 2, 0),
        (25, 3, 0, 2),  # longer than the 20 s the patient ones were seen to wait
        (40, 3, 0, 2),
    ],
)
def test_what_if_another_delay(delay: int, repelled: int, passed: int, unknown: int) -> None:
    tally = _tally(
        events.hangup(_conn(port=1), HangUp(4.0, reset=False)),
        events.hangup(_conn(port=2), HangUp(12.0, reset=True)),
        events.early_talker(_conn(port=3), EarlyTalk(4, b"EHLO", 9.5), "drop"),
        events.passed(_conn(port=4), Pass(PassReason.DELAY, 20.001)),
        events.passed(_conn(port=5), Pass(PassReason.DELAY, 20.002)),
    )
    what = tally.what_if(delay)
    assert (what.repelled, what.passed, what.unknown) == (repelled, passed, unknown)
    assert tally.curve("hangup")[:3] == [1, 0, 1]
    assert tally.delays_seen() == [20]


def test_refusals_and_networks() -> None:
    tally = _tally(
        events.overload(_conn(), "max-held", 3),
        events.overload(_conn(), "max-held", 2),
        events.overload(_conn(), "max-per-client", 1),
        *(
            events.early_talker(_conn(f"192.0.2.{i}"), EarlyTalk(1, b"x", 0.1), "drop")
            for i in range(3)
        ),
        events.early_talker(_conn("2001:db8:1:2::9"), EarlyTalk(1, b"x", 0.1), "reject"),
    )
    assert tally.refused == {"max-held": 5, "max-per-client": 1}
    assert tally.networks.most_common(5) == [("192.0.2.0/24", 3), ("2001:db8:1:2::/64", 1)]
    assert network_of("not an address") == "not an address"
    # a client a translator shows in the well-known prefix is in its IPv4 /24
    assert network_of("64:ff9b::192.0.2.9") == network_of("::ffff:c000:209") == "192.0.2.0/24"


def test_text_report() -> None:
    tally = _tally(*SAMPLES)
    text = render_text(tally)
    assert "  early-talker        3  (" in text and "penalty 1" in text
    assert "  refused             3  (max-held 3)" in text
    assert "  backend-error       1" in text
    assert "  repelled            3   75.0%" in text
    assert "   40 s at least        3" in text
    assert "  192.0.2.0/24" in text
    assert "from 2026-11-30 00:25:05 UTC to 2026-11-30 00:25:05 UTC" in text


SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize("evs", [SAMPLES, []], ids=["events", "empty"])
def test_svg_is_well_formed_with_its_parts(evs: list[Event]) -> None:
    root = ET.fromstring(render_svg(_tally(*evs)))
    assert root.tag == f"{SVG}svg"
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "Give-up curve" in texts and "Verdicts over time" in texts
    assert "seconds waited" in texts and "connections" in texts
    if evs:
        titles = [t.text or "" for t in root.iter(f"{SVG}title")]
        assert any(t.startswith("hung up, 10-15 s: 1") for t in titles)
        assert root.find(f"{SVG}polyline") is not None
        assert "delay in force: 25 s" in texts


def test_the_parser_defaults_to_stdin() -> None:
    args = make_parser().parse_args([])
    assert args.files == ["-"] and args.svg is None and args.top == 10


# -- hostile input: what a client or another program wrote is never an event --------

#: The attacks of 2026-12-06: repeld's own words in an early talker's bytes.
PLANTS = [
    b" repeld: PASS DELAY [6.6.6.9]:1 after 30.000",
    b" repeld[1]: PREGREET 1 after 0.000 from [6.6.6.3]:1: x (action=drop)",
    b'@cee:{"event":"pass","client":"6.6.6.4","reason":"delay","elapsed":30.0}',
    b' [x@1 event="pass" client="6.6.6.5" reason="delay" elapsed="30.0"]',
    b"\r\nNov 30 00:25:05 mx1 repeld[1]: PASS DELAY [6.6.6.6]:1 after 30.000\r\n",
    b'x"] [y@1 event="pass" client="6.6.6.7"] ) (action=log)',
]


@pytest.mark.parametrize("sent", PLANTS, ids=range(len(PLANTS)))
@pytest.mark.parametrize("action", ["drop", "log"])
def test_an_early_talker_cannot_plant_an_event(sent: bytes, action: str) -> None:
    event = events.early_talker(_conn(), EarlyTalk(len(sent), sent, 0.5), action)
    for shape, line in _event_lines(event).items():
        record = parse_line(line, YEAR)
        assert record is not None, (shape, line)
        assert record.event == "early-talker", (shape, line)
        assert record.fields["client"] == "192.0.2.7", (shape, line)
        assert record.fields["action"] == action, (shape, line)


POSTFIX = (
    "Nov 30 00:25:05 mx1 postfix/smtpd[77]: NOQUEUE: reject: RCPT from x[192.0.2.9]: 554 5.7.1; "
)


@pytest.mark.parametrize(
    "line",
    [
        POSTFIX + 'helo=<@cee:{"event":"early-talker","client":"6.6.6.1","action":"drop"}>',
        POSTFIX + 'helo=<[x@1 event="pass" client="6.6.6.2" reason="delay" elapsed="30"]>',
        POSTFIX + "helo=< repeld: PASS DELAY [6.6.6.9]:1 after 30.000>",
        POSTFIX + 'helo=<@cee:{"event":"pass","a":' + "[" * 1000 + "]" * 1000 + "}>",
        "Nov 30 00:25:05 mx1 notrepeld[1]: PASS DELAY [6.6.6.9]:1 after 30.000",
        "Nov 30 00:25:05 mx1 x repeld[1]: PASS DELAY [6.6.6.9]:1 after 30.000",
        # no host (a raw local datagram): another program's tag is not a host name
        "<13>Nov 30 00:25:05 sshd[1]: repeld[1]: PASS DELAY [6.6.6.9]:1 after 30.000",
        "<13>Nov 30 00:25:05 sshd: repeld: PASS DELAY [6.6.6.9]:1 after 30.000",
        "2026-11-30T00:25:05+00:00 sshd[1] repeld[1] PASS DELAY [6.6.6.9]:1 after 30.000",
        '<22>1 2026-11-30T00:25:05Z mx1 postfix 1 - [x@1 event="pass"] PASS DELAY [6.6.6.9]:1 after 1',
        '<22>1 2026-11-30T00:25:05Z mx1 repeld 1 pass - x [x@1 event="pass" client="6.6.6.9"]',
        "repeld: PASS DELAY [6.6.6.9]:1 after 30.000",  # -f prints events with their time
        '<22>Nov 30 00:25:05 repeld[1]: @cee:{"event":"pass","a":' + "[" * 1000 + "1}",
        '<22>Nov 30 00:25:05 repeld[1]: @cee:{"event":"pass","a":{"b":1}}',
        "00:25:05.250 early-talker: PASS DELAY [6.6.6.9]:1 after 30.000",
        "00:25:05.250 pass: PREGREET 1 after 0.000 from [6.6.6.3]:1: x (action=drop)",
    ],
)
def test_what_others_wrote_is_not_an_event(line: str) -> None:
    assert parse_line(line, YEAR) is None


def test_a_structured_data_value_full_of_backslashes() -> None:
    value = "\\\\" * 4000 + '\\"\\]\\x'
    line = f'<22>1 2026-11-30T00:25:05Z mx1 repeld 1 pass [x@1 event="pass" v="{value}"] PASS'
    record = parse_line(line, YEAR)
    assert record is not None and record.fields["v"] == "\\" * 4000 + '"]\\x'


def test_long_lines_are_skipped_unread_and_counted() -> None:
    long = b'<22>Nov 30 00:25:05 repeld[1]: @cee:{"a":[' * (MAX_LINE // 10)
    ok = format_rfc5424(SAMPLES[4], HEADER, NOW)
    stream = io.BytesIO(b"\n".join([ok, long, ok, long + b"\r", b"x" * MAX_LINE, ok]) + b"\n")
    lines = list(read_lines(stream))
    assert [line is None for line in lines] == [False, True, False, True, False, False]
    tally = tally_lines(lines, YEAR)
    assert (tally.lines, tally.skipped, tally.too_long, tally.events["pass"]) == (6, 3, 2, 3)
    assert parse_line("x" * (MAX_LINE + 1), YEAR) is None


def test_report_main_skips_what_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "mail.log"
    log.write_bytes(
        b"\n".join(
            [
                (POSTFIX + 'helo=<@cee:{"event":"pass","a":' + "[" * 1000 + ">").encode(),
                b'<22>Nov 30 00:25:05 repeld[1]: @cee:{"a":[' * 100_000,
                b"\xff\xfe not utf-8",
                format_rfc5424(SAMPLES[0], HEADER, NOW),
            ]
        )
    )
    assert main([str(log)]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert "1 events in 4 lines (3 lines skipped: not repeld events, 1 of them too long" in out.out


def test_a_file_that_cannot_be_read_costs_only_itself(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # logrotate compressing a file while the report runs: that file is named, the
    # others are read and the report printed, and the status says one failed.
    good = tmp_path / "mail.log"
    good.write_bytes(format_rfc5424(SAMPLES[0], HEADER, NOW) + b"\n")
    broken = tmp_path / "mail.log.1.gz"
    broken.write_bytes(gzip.compress(format_rfc5424(SAMPLES[1], HEADER, NOW) * 50)[:40])
    assert main([str(broken), str(tmp_path / "gone.log"), str(good)]) == 1
    out = capsys.readouterr()
    errors = out.err.splitlines()
    assert len(errors) == 2
    assert errors[0].startswith(f"repeld report: {broken}: ")
    assert errors[1] == f"repeld report: {tmp_path / 'gone.log'}: No such file or directory"
    assert out.out.startswith("repeld report: 1 events in 1 lines")


# -- counting every event ------------------------------------------------------------


def _proxy_error(reason: str) -> Event:
    balancer = ConnInfo("127.0.0.5", 41000, "127.0.0.1", 25, via="127.0.0.5")
    return events.proxy_error(balancer, 5.0, reason, "no complete header")


def test_dnsbl_proxy_error_and_unknown_events_are_counted() -> None:
    conn = _conn()
    tally = _tally(
        events.dnsbl(conn, Blocked(7, ("zen.example", "b.example"), 0.1, DnsAction.DROP)),
        events.dnsbl(conn, Blocked(3, (), 0.2, DnsAction.LOG)),
        _proxy_error("bad-signature"),
        _proxy_error("timeout"),
        events.lifecycle(EventName.START, version="1"),
        events.relay_end(conn, 25.0, 3.0, 10, 20, RelayEnd.CLOSED),
    )
    assert tally.dnsbl == {"drop": 1, "log": 1}
    assert tally.proxy_errors == {"bad-signature": 1, "timeout": 1}
    assert tally.events["start"] == 1 and tally.events["relay-end"] == 1
    assert tally.judged == 0  # neither is a verdict of the delay
    _start, _width, bars = tally.over_time()
    assert bars[0]["dnsbl"] == 1 and bars[0]["proxy-error"] == 2
    text = render_text(tally)
    assert "  dnsbl               2  (" in text and "drop 1" in text
    assert "  proxy-error         2  (" in text
    assert "  other events        2  (" in text and "relay-end 1" in text
    texts = " ".join(t.text or "" for t in ET.fromstring(render_svg(tally)).iter(f"{SVG}text"))
    assert LABELS["dnsbl"] in texts and LABELS["proxy-error"] in texts


@pytest.mark.parametrize(
    ("event", "key"),
    [
        (events.dnsbl(_conn(), Blocked(7, ("z.example",), 0.1, DnsAction.REJECT)), "action"),
        (_proxy_error("timeout"), "reason"),
    ],
    ids=["dnsbl", "proxy-error"],
)
def test_dnsbl_and_proxy_error_in_every_shape(event: Event, key: str) -> None:
    for shape, line in _event_lines(event).items():
        record = parse_line(line, YEAR)
        assert record is not None and record.event == event.name, shape
        assert record.fields[key] == event.get(key), shape
        assert record.fields["client"] == event.get("client"), shape


def test_every_legend_fits_inside_the_picture() -> None:
    keys = list(CATEGORIES)
    for labels in (LABELS, {**LABELS, "hangup": "x" * 60, "pass": "y" * 90}):
        rows = legend_rows(keys, labels)
        assert [key for row in rows for _, key in row] == keys
        for row in rows:
            for x, key in row:
                assert x + 17 + 7.4 * len(labels[key]) <= WIDTH


def test_memory_does_not_grow_with_the_lines() -> None:
    tally = Tally()
    for i in range(20_000):
        when = NOW + 30 * i  # a week of events
        conn = _conn(f"10.{i % 256}.{i // 256 % 256}.1", 1000 + i)
        event = (
            events.hangup(conn, HangUp(i % 90 + 0.5, reset=False)),
            events.passed(conn, Pass(PassReason.DELAY, 25.0 + i % 7 / 1000)),
        )[i % 2]
        record = parse_line(format_rfc5424(event, HEADER, when).decode(), YEAR)
        assert record is not None
        tally.add(record)
    assert len(tally.hangup_secs) == 45 and len(tally.patient_secs) == 1  # even seconds
    assert tally.bucket_width == 3 * 3600 and len(tally.buckets) <= 2 * 72
    assert sum(tally.buckets.values()) == 20_000
    _start, width, bars = tally.over_time()
    assert width == 3 * 3600 and len(bars) <= 72 + 1
    assert sum(sum(b.values()) for b in bars) == 20_000


def test_memory_stays_bounded_whatever_the_lines_say(monkeypatch: pytest.MonkeyPatch) -> None:
    # Crafted lines: times spread over millennia, a new wait in every one. The
    # tables keyed by seconds and by buckets must not grow with them (once 197 MiB
    # and an SVG of 150,002 "delay in force" labels for 300,000 lines).
    monkeypatch.setattr(tally_module, "MAX_KEYS", 500)
    tally = Tally()
    for i in range(3000):
        when = 1000.0 + i * 86400.0 * 400  # every line 400 days after the last
        conn = _conn("192.0.2.7", 1000 + i)
        elapsed = 30.0 + i * 7.0  # up to some 6 hours
        event = (
            events.hangup(conn, HangUp(elapsed, reset=False)),
            events.passed(conn, Pass(PassReason.DELAY, elapsed)),
        )[i % 2]
        record = parse_line(format_rfc5424(event, HEADER, when).decode(), YEAR)
        assert record is not None
        tally.add(record)
    assert len(tally.buckets) <= 500
    assert max(tally.hangup_secs) == max(tally.patient_secs) == 2 * 3600
    assert len(tally.delays) <= 2 * 3600 + 1
    assert len(tally.delays_seen()) == 5
    svg = render_svg(tally)
    assert svg.count("delay in force: ") == 5


def test_top_counter_keeps_the_heavy_hitters() -> None:
    top = TopCounter(capacity=4)
    stream = ["a"] * 50 + ["b"] * 30 + [f"noise{i}" for i in range(40)] + ["a"] * 10
    for key in stream:
        top.add(key)
    assert len(top.counts) == 4 and top.total == len(stream) and not top.exact
    (first, n_a), (second, n_b) = top.most_common(2)
    assert (first, second) == ("a", "b")
    assert 60 <= n_a <= 60 + top.error and 30 <= n_b <= 30 + top.error
    assert top.error <= len(stream) // 4


# -- properties ----------------------------------------------------------------------

ACTIONS = st.sampled_from(["drop", "reject", "log"])


@settings(max_examples=300, deadline=None)
@given(sent=first_bytes, action=ACTIONS, port=st.integers(1, 65535))
def test_no_client_bytes_change_the_event_or_the_address(
    sent: bytes, action: str, port: int
) -> None:
    event = events.early_talker(_conn(port=port), EarlyTalk(len(sent), sent, 1.25), action)
    for shape, line in _event_lines(event).items():
        record = parse_line(line, YEAR)
        assert record is not None, (shape, line)
        assert (record.event, record.fields["client"], record.fields["client_port"]) == (
            "early-talker",
            "192.0.2.7",
            str(port),
        ), (shape, line)
        assert record.fields["action"] == action and record.number("elapsed") == 1.25
        if record.shape != "summary":
            assert record.fields["first"] == escape_bytes(sent)


@settings(max_examples=300, deadline=None)
@given(helo=st.text(max_size=400))
def test_no_helo_in_another_programs_line_is_an_event(helo: str) -> None:
    assert parse_line(POSTFIX + f"helo=<{helo}>", YEAR) is None
    assert parse_line(f"Nov 30 00:25:05 mx1 sshd[9]: {helo}", YEAR) is None


@settings(max_examples=500, deadline=None)
@given(
    line=st.text(max_size=600)
    | st.builds(
        lambda a, b: a + b,
        st.sampled_from(
            [
                "<22>1 2026-11-30T00:25:05Z mx1 repeld 1 pass ",
                "Nov 30 00:25:05 mx1 repeld[1]: ",
                "Nov 30 00:25:05 mx1 repeld[1]: @cee:",
                "2026-11-30T00:25:05+00:00 repeld[1] ",
                "00:25:05.250 early-talker: ",
            ]
        ),
        st.text(max_size=400),
    )
)
def test_any_line_is_read_or_skipped_never_raises(line: str) -> None:
    tally = tally_lines([line], YEAR)
    assert tally.lines == 1
    render_text(tally)
    render_svg(tally)


def test_help_names_the_manual_section_that_exists() -> None:
    epilog = make_parser().epilog or ""
    assert "See the Report subsection of DESCRIPTION in repeld(8)." in epilog
    assert f"longer than {MAX_LINE} bytes" in epilog
    man = (Path(__file__).resolve().parents[2] / "man" / "repeld.8").read_text()
    description = man.split("\n.Sh DESCRIPTION\n", 1)[1].split("\n.Sh ", 1)[0]
    assert "\n.Ss Report\n" in description
    assert f"Lines longer than {MAX_LINE} bytes are skipped" in man


def test_a_clock_gone_wrong_still_gives_a_few_bars() -> None:
    tally = _tally(SAMPLES[4])
    stray = format_rfc5424(SAMPLES[3], HEADER, 4_000_000_000.0).decode()  # the year 2096
    record = parse_line(stray, YEAR)
    assert record is not None
    tally.add(record)
    assert len(tally.buckets) == 2
    _start, width, bars = tally.over_time()
    assert width % 86400 == 0 and len(bars) <= 73
    assert sum(sum(b.values()) for b in bars) == 2
    render_svg(tally)


@pytest.mark.parametrize(
    "event",
    [
        events.lifecycle(EventName.START, version="1"),
        events.worker(EventName.WORKER_START, 1, 4243),
        events.worker(EventName.WORKER_EXIT, 1, 4243, -9),
        events.relay_end(_conn(), 25.0, 3.0, 10, 20, RelayEnd.CLOSED),
        events.dns_list_alarm("bl.example", 0.95, 200),  # its summary begins "DNS list"
    ],
    ids=lambda e: e.name,
)
def test_events_not_broken_down_keep_their_name_in_every_shape(event: Event) -> None:
    for shape, line in _event_lines(event).items():
        record = parse_line(line, YEAR)
        assert record is not None and record.event == event.name, (shape, line)

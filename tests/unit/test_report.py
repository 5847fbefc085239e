"""The report's parsing, counting and drawing, fed log lines; no files, no sockets."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from repeld.core import events
from repeld.core.events import ConnInfo, Event
from repeld.core.hold import EarlyTalk, HangUp, Pass, PassReason
from repeld.core.logformat import FACILITIES, Header, format_json, format_rfc5424, format_stderr
from repeld.report.main import make_parser, tally_lines
from repeld.report.parse import parse_line
from repeld.report.svg import render_svg
from repeld.report.tally import Tally, network_of
from repeld.report.text import render_text

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
        assert abs(record.time - NOW) < (1 if shape in ("rfc5424", "rsyslog-fileformat") else 86400)


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

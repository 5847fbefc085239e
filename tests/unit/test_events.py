"""The events' fields: names kept apart from values, each value under its name."""

from __future__ import annotations

import itertools

import pytest

from repeld.core import events
from repeld.core.dnsbl import DnsScore
from repeld.core.events import ConnInfo, Event, FieldValue, Severity
from repeld.core.hold import Pass, PassReason
from repeld.core.names import EventName, HandOffHow


@pytest.mark.parametrize(
    ("via", "dns", "handoff"), list(itertools.product((False, True), repeat=3))
)
def test_a_pass_event_writes_each_value_under_its_name(via: bool, dns: bool, handoff: bool) -> None:
    # passed() picks its names from a table of the eight shapes (core/events.py):
    # every shape, against the pairs written out by hand.
    conn = ConnInfo("192.0.2.7", 50123, "198.51.100.25", 25, "10.0.0.1" if via else "")
    score = DnsScore(2, ("bl.test", "b2.test"), ("slow.test",)) if dns else None
    how = HandOffHow.PASS if handoff else None
    event = events.passed(conn, Pass(PassReason.CACHE, 1.23456, 7), 0.6789, score, how)
    want: list[tuple[str, FieldValue]] = [
        ("event", "pass"),
        ("client", "192.0.2.7"),
        ("client_port", 50123),
        ("server", "198.51.100.25"),
        ("server_port", 25),
    ]
    if via:
        want.append(("via", "10.0.0.1"))
    want += [("elapsed", 1.235), ("reason", "cache"), ("rtt_ms", 0.679), ("early_bytes", 7)]
    if dns:
        want += [("score", 2), ("lists", "bl.test,b2.test"), ("unanswered", "slow.test")]
    if handoff:
        want.append(("handoff", "pass"))
    assert event.fields == tuple(want)
    assert len(event.keys) == len(event.values)
    assert event.summary == "PASS CACHE [192.0.2.7]:50123 after 1.235 (7 bytes before the greeting)"


def test_fields_read_back_what_event_of_was_given() -> None:
    pairs: tuple[tuple[str, FieldValue], ...] = (("event", "x"), ("n", 3), ("t", 0.5))
    event = Event.of(EventName.STATS, Severity.INFO, pairs, "X")
    assert event.keys == ("event", "n", "t")
    assert event.values == ("x", 3, 0.5)
    assert event.fields == pairs
    assert (event.get("n"), event.get("t"), event.get("missing")) == (3, 0.5, None)


def test_a_summary_of_backend_errors_adds_its_count_last() -> None:
    conn = ConnInfo("192.0.2.7", 50123, "198.51.100.25", 25)
    last = events.backend_error(conn, 25.0, "127.0.0.1:10025", "Connection refused")
    summary = events.summarize(last, 40)
    assert summary.fields == (*last.fields, ("count", 40))
    assert summary.get("count") == 40

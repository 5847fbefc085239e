"""repeld report on --on-early enforce events: the cut clients' sender domains and
HELO names (kept apart from test_report.py, which covers the parser)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from repeld.core import events
from repeld.core.enforce import EnforceEnd, Envelope
from repeld.core.events import ConnInfo, Event
from repeld.core.hold import EarlyTalk
from repeld.core.logformat import FACILITIES, Header, format_json, format_rfc5424
from repeld.report.main import tally_lines
from repeld.report.tally import sender_domain
from repeld.report.text import render_text

YEAR = 2026
NOW = 1_795_998_305.25
HEADER = Header(FACILITIES["mail"], "mx1.example.org", "repeld", 4242, "repeld@32473")


def _enforced(client: str, helo: bytes, sender: bytes, end: EnforceEnd = EnforceEnd.QUIT) -> Event:
    return events.early_talker(
        ConnInfo(client, 4000, "198.51.100.25", 25),
        EarlyTalk(8, b"EHLO x\r\n", 0.5),
        "enforce",
        enforced=(Envelope(helo, sender, (b"<r@rcpt.example>",), 4), end),
    )


EVENTS = [
    _enforced("192.0.2.1", b"mail.customer.example", b"<Billing@Customer.example>"),
    _enforced("192.0.2.2", b"mail.customer.example", b"<news@customer.example>"),
    _enforced("203.0.113.5", b"abcdef", b"<x@spam.example>"),
    _enforced("203.0.113.6", b"", b"", EnforceEnd.GONE),  # nothing said, nothing counted
    _enforced("203.0.113.7", b"ABCDEF", b"<>"),
]


@pytest.mark.parametrize("formatter", [format_rfc5424, format_json], ids=["rfc5424", "json"])
def test_sender_domains_and_helo_names_are_counted(
    formatter: Callable[[Event, Header, float], bytes],
) -> None:
    tally = tally_lines([formatter(e, HEADER, NOW).decode() for e in EVENTS], YEAR)
    assert tally.early == {"enforce": 5}
    assert tally.repelled == 5  # cut off, after its recipients were refused
    assert tally.sender_domains.most_common() == [
        ("customer.example", 2),
        ("spam.example", 1),
        ("<>", 1),
    ]
    assert tally.helo_names.most_common() == [("mail.customer.example", 2), ("abcdef", 2)]
    text = render_text(tally, top=2)
    section = text.split("Cut clients' envelopes (--on-early enforce: 5 talkers), top 2\n", 1)[1]
    assert section.splitlines() == [
        "  sender domains",
        f"    {'customer.example':41s} {2:7d}",
        f"    {'spam.example':41s} {1:7d}",
        "  HELO names",
        f"    {'mail.customer.example':41s} {2:7d}",
        f"    {'abcdef':41s} {2:7d}",
    ]


def test_summary_lines_say_their_envelopes_are_not_in_them() -> None:
    # -f lines and file templates that drop the structured data carry no envelope
    # the report can read back for sure: "none given" would read as if the
    # clients had given none (an audit of false positives reads this table).
    lines = [f"Nov 30 00:25:05 mx1 repeld[4242]: {e.summary}" for e in EVENTS[:2]]
    lines.append(format_rfc5424(EVENTS[2], HEADER, NOW).decode())
    tally = tally_lines(lines, YEAR)
    assert tally.early == {"enforce": 3} and tally.envelopes_unread == 2
    assert tally.helo_names == {"abcdef": 1}
    section = render_text(tally, top=2).split("talkers), top 2\n", 1)[1]
    assert section.splitlines()[0] == (
        "  (2 read from summary lines, which do not carry the envelope:"
        " read the JSON or RFC 5424 events)"
    )
    only_summaries = tally_lines(lines[:2], YEAR)
    section = render_text(only_summaries, top=2).split("talkers), top 2\n", 1)[1]
    assert section.splitlines()[1:] == [
        "  sender domains",
        "    not in these lines",
        "  HELO names",
        "    not in these lines",
    ]


def test_no_section_without_enforced_talkers() -> None:
    event = events.early_talker(
        ConnInfo("192.0.2.1", 1, "198.51.100.25", 25), EarlyTalk(1, b"x", 0.1), "drop"
    )
    text = render_text(tally_lines([format_rfc5424(event, HEADER, NOW).decode()], YEAR))
    assert "Cut clients' envelopes" not in text


@pytest.mark.parametrize(
    ("sender", "domain"),
    [
        ("<a@B.Example>", "b.example"),
        ("a@b", "b"),
        ("<>", "<>"),
        ("", ""),
        ("<a@b@c.example>", "c.example"),
        ("<no-at-sign>", "no-at-sign"),
    ],
)
def test_sender_domain(sender: str, domain: str) -> None:
    assert sender_domain(sender) == domain

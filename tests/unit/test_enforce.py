"""The dialogue of --on-early enforce (core/enforce.py): tables and properties, no I/O."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repeld.core import events
from repeld.core.enforce import (
    MAX_COMMANDS,
    MAX_LINE,
    MAX_RECIPIENTS,
    MAX_SKIPPED,
    SESSION_TIME,
    EnforceEnd,
    Enforcer,
    Envelope,
    greeting_name,
)
from repeld.core.events import ConnInfo, Event
from repeld.core.hold import (
    EarlyTalk,
    Enforce,
    Hold,
    LocalProtocolError,
    Logged,
    Pass,
    PassReason,
    Penalty,
    escape_bytes,
)
from repeld.core.logformat import Header, format_json, format_rfc5424
from repeld.metrics import Metrics, render

from .test_properties import _STEP, _step

NAME = b"mx.test"
T0 = 500.0
EHLO_REPLY = b"250-mx.test\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"

# (what the client sends, in one read) -> (what repeld answers, how it ended or None)
DIALOGUE: list[tuple[str, bytes, bytes, EnforceEnd | None]] = [
    ("EHLO", b"EHLO bot.example\r\n", EHLO_REPLY, None),
    ("ehlo in lower case", b"ehlo bot\r\n", EHLO_REPLY, None),
    ("HELO", b"HELO bot\r\n", b"250 mx.test\r\n", None),
    ("EHLO without a name", b"EHLO\r\n", EHLO_REPLY, None),
    ("MAIL", b"MAIL FROM:<a@b.example> SIZE=10\r\n", b"250 2.1.0 Ok\r\n", None),
    ("MAIL with a space", b"mail from: <a@b>\r\n", b"250 2.1.0 Ok\r\n", None),
    ("MAIL null sender", b"MAIL FROM:<>\r\n", b"250 2.1.0 Ok\r\n", None),
    ("MAIL without FROM:", b"MAIL <a@b>\r\n", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n", None),
    ("RCPT", b"RCPT TO:<c@d.example>\r\n", b"450 4.7.1 Protocol error: try again later\r\n", None),
    ("RCPT without TO:", b"RCPT <c@d>\r\n", b"501 5.5.4 Syntax: RCPT TO:<address>\r\n", None),
    ("DATA", b"DATA\r\n", b"554 5.5.1 Error: no valid recipients\r\n", None),
    ("BDAT", b"BDAT 5 LAST\r\nxxxxx", b"554 5.5.1 Error: no valid recipients\r\n", None),
    ("BDAT without a size", b"BDAT x\r\n", b"501 5.5.4 Syntax: BDAT size [LAST]\r\n", None),
    ("RSET", b"RSET\r\n", b"250 2.0.0 Ok\r\n", None),
    ("NOOP", b"NOOP\r\n", b"250 2.0.0 Ok\r\n", None),
    ("QUIT", b"QUIT\r\n", b"221 2.0.0 Bye\r\n", EnforceEnd.QUIT),
    ("STARTTLS", b"STARTTLS\r\n", b"502 5.5.2 Error: command not recognized\r\n", None),
    ("AUTH", b"AUTH PLAIN AGFiAGM=\r\n", b"502 5.5.2 Error: command not recognized\r\n", None),
    ("VRFY", b"VRFY root\r\n", b"502 5.5.2 Error: command not recognized\r\n", None),
    ("an empty line", b"\r\n", b"500 5.5.2 Error: bad syntax\r\n", None),
    ("a bare LF ends a line", b"NOOP\n", b"250 2.0.0 Ok\r\n", None),
    ("half a line: no answer yet", b"EHLO bo", b"", None),
    ("binary", b"\x16\x03\x01\x02\x00\n", b"502 5.5.2 Error: command not recognized\r\n", None),
    (
        "pipelined: answered in order",
        b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nQUIT\r\n",
        EHLO_REPLY
        + b"250 2.1.0 Ok\r\n450 4.7.1 Protocol error: try again later\r\n"
        + b"554 5.5.1 Error: no valid recipients\r\n221 2.0.0 Bye\r\n",
        EnforceEnd.QUIT,
    ),
    ("nothing after QUIT", b"QUIT\r\nNOOP\r\n", b"221 2.0.0 Bye\r\n", EnforceEnd.QUIT),
    (
        "the BDAT chunk is not read as commands",
        b"BDAT 6\r\nQUIT\r\nNOOP\r\n",
        b"554 5.5.1 Error: no valid recipients\r\n250 2.0.0 Ok\r\n",
        None,
    ),
    (
        "a line of exactly 512 bytes",
        b"NOOP " + b"x" * (MAX_LINE - 7) + b"\r\n",
        b"250 2.0.0 Ok\r\n",
        None,
    ),
    (
        "a line of 513 bytes: 500, and the next line is read",
        b"NOOP " + b"x" * (MAX_LINE - 6) + b"\r\nNOOP\r\n",
        b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n",
        None,
    ),
    (
        "512 bytes and no end of line yet: 500 now, the rest skipped",
        b"x" * MAX_LINE + b"yyyy\r\nNOOP\r\n",
        b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n",
        None,
    ),
    (
        "more than MAX_COMMANDS commands: 421",
        b"NOOP\r\n" * (MAX_COMMANDS + 3),
        b"250 2.0.0 Ok\r\n" * MAX_COMMANDS + b"421 4.7.0 mx.test Error: too many commands\r\n",
        EnforceEnd.COMMANDS,
    ),
    (
        "more than MAX_RECIPIENTS recipients: 421",
        b"".join(b"RCPT TO:<r%d@x>\r\n" % i for i in range(MAX_RECIPIENTS + 2)),
        b"450 4.7.1 Protocol error: try again later\r\n" * MAX_RECIPIENTS
        + b"421 4.5.3 mx.test Error: too many recipients\r\n",
        EnforceEnd.RECIPIENTS,
    ),
]


@pytest.mark.parametrize(("name", "sent", "answer", "end"), DIALOGUE, ids=[c[0] for c in DIALOGUE])
def test_dialogue_table(name: str, sent: bytes, answer: bytes, end: EnforceEnd | None) -> None:
    engine = Enforcer(NAME, T0)
    assert engine.greeting() == b"220 mx.test ESMTP\r\n"
    assert engine.receive(sent, T0 + 1) == answer
    assert engine.end is end
    assert engine.done is (end is not None)


def test_the_envelope_is_recorded_raw_and_bounded() -> None:
    engine = Enforcer(NAME, T0)
    engine.receive(
        b"EHLO first\r\nHELO  bot.example \r\nMAIL FROM:<a@b.example> BODY=8BITMIME\r\n", T0
    )
    engine.receive(b"RCPT TO:<c@d.example> NOTIFY=NEVER\r\nRCPT TO:e@f\r\nRCPT TO:<g@h\r\n", T0)
    assert engine.envelope() == Envelope(
        b"bot.example", b"<a@b.example>", (b"<c@d.example>", b"e@f", b"<g@h"), 6
    )
    engine.receive(b"RSET\r\nMAIL FROM:<>\r\n", T0)  # the last sender counts; RSET keeps all
    assert engine.envelope().sender == b"<>"
    assert engine.envelope().recipients == (b"<c@d.example>", b"e@f", b"<g@h")


def test_nothing_is_recorded_before_anything_is_said() -> None:
    assert Enforcer(NAME, T0).envelope() == Envelope()


def test_commands_split_across_reads_are_answered_once_whole() -> None:
    engine = Enforcer(NAME, T0)
    assert engine.receive(b"EH", T0) == b""
    assert engine.receive(b"LO x\r", T0) == b""
    assert engine.receive(b"\nQU", T0) == EHLO_REPLY
    assert engine.receive(b"IT\r\n", T0) == b"221 2.0.0 Bye\r\n"


def test_a_long_line_over_many_reads_is_answered_once() -> None:
    engine = Enforcer(NAME, T0)
    assert engine.receive(b"x" * 300, T0) == b""
    assert engine.receive(b"x" * 300, T0) == b"500 5.5.2 Error: line too long\r\n"
    for _ in range(100):  # the rest of it: skipped, never buffered
        assert engine.receive(b"x" * 4096, T0) == b""
    assert engine.receive(b"x\r\nNOOP\r\n", T0) == b"250 2.0.0 Ok\r\n"
    assert engine.commands == 2


@pytest.mark.parametrize(
    "flood",
    [b"BDAT 999999999999 LAST\r\n", b"y" * MAX_LINE],
    ids=["bdat", "endless-line"],
)
def test_what_a_session_skips_unread_is_bounded(flood: bytes) -> None:
    # An endless BDAT chunk or line was read and thrown away, 4 KiB at a time, until
    # SESSION_TIME: a core kept busy for 30 s by one client, 100 at once.
    engine = Enforcer(NAME, T0)
    engine.receive(flood, T0)
    said = b""
    for _ in range(MAX_SKIPPED // 4096 + 2):
        said += engine.receive(b"z" * 4096, T0)
        if engine.done:
            break
    assert engine.done and engine.end is EnforceEnd.DATA
    assert said.endswith(b"421 4.7.0 mx.test Error: too much data\r\n")
    assert engine.receive(b"NOOP\r\n", T0) == b""


def test_the_session_ends_at_its_time() -> None:
    engine = Enforcer(NAME, T0)
    assert engine.deadline == T0 + SESSION_TIME
    assert engine.timeout(T0 + SESSION_TIME - 0.001) == b""
    assert engine.receive(b"NOOP\r\n", T0 + SESSION_TIME - 0.001) == b"250 2.0.0 Ok\r\n"
    assert engine.timeout(T0 + SESSION_TIME) == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
    assert engine.end is EnforceEnd.TIMEOUT
    assert engine.timeout(T0 + 99) == b""


def test_a_command_after_the_time_gets_the_421() -> None:
    engine = Enforcer(NAME, T0)
    answer = engine.receive(b"NOOP\r\n", T0 + SESSION_TIME + 1)
    assert answer == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
    assert engine.end is EnforceEnd.TIMEOUT


@pytest.mark.parametrize(("how", "end"), [("eof", EnforceEnd.CLOSE), ("reset", EnforceEnd.RESET)])
def test_the_client_leaving_ends_it_quietly(how: str, end: EnforceEnd) -> None:
    engine = Enforcer(NAME, T0)
    engine.receive(b"EHLO x\r\n", T0)
    if how == "eof":
        assert engine.eof() == b""
    else:
        engine.reset()
    assert engine.end is end
    assert engine.receive(b"NOOP\r\n", T0) == b""
    assert engine.shutdown() == b""


def test_shutdown_says_421() -> None:
    engine = Enforcer(NAME, T0)
    assert engine.shutdown() == b"421 4.3.2 mx.test Service shutting down, try again later\r\n"
    assert engine.end is EnforceEnd.SHUTDOWN
    engine.eof()
    assert engine.end is EnforceEnd.SHUTDOWN  # the first end stands


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("mx.example.org", b"mx.example.org"),
        ("two words", b"two"),
        ("mx.example.org ESMTP Postfix", b"mx.example.org"),  # a teaser text: its name
        ("  ", b"localhost"),
        ("h\u00e9", b"h?"),
        ("", b"localhost"),
    ],
)
def test_greeting_name_is_one_printable_word(text: str, name: bytes) -> None:
    assert greeting_name(text) == name


# -- properties ----------------------------------------------------------------

#: Command-like lines and noise, so that the bounds are reached often.
_LINES = st.one_of(
    st.sampled_from(
        [
            b"EHLO x\r\n",
            b"HELO y\n",
            b"MAIL FROM:<a@b>\r\n",
            b"RCPT TO:<c@d>\r\n",
            b"DATA\r\n",
            b"BDAT 3\r\n",
            b"RSET\r\n",
            b"NOOP\r\n",
            b"QUIT\r\n",
            b"\r\n",
            b"x" * 600,
        ]
    ),
    st.binary(max_size=80),
)
_STREAMS = st.lists(_LINES, max_size=40).map(b"".join)
_REPLY = re.compile(rb"[2-5][0-9][0-9][ -][\x20-\x7e]*\r\n")
_CAPABILITIES = (b"PIPELINING", b"STARTTLS", b"AUTH", b"PIPECONNECT", b"CHUNKING")


def _cuts(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, at = [], 0
    for size in sizes:
        chunks.append(data[at : at + size])
        at += size
    chunks.append(data[at:])
    return chunks


def _run(chunks: list[bytes]) -> tuple[bytes, Enforcer]:
    engine = Enforcer(NAME, T0)
    out = b""
    for chunk in chunks:
        out += engine.receive(chunk, T0 + 1)
    return out, engine


@settings(max_examples=300, deadline=None)
@given(_STREAMS, st.lists(st.integers(min_value=0, max_value=700), max_size=12))
def test_how_the_bytes_are_cut_into_reads_changes_nothing(data: bytes, sizes: list[int]) -> None:
    whole, one = _run([data])
    cut, many = _run(_cuts(data, sizes))
    assert cut == whole
    assert many.envelope() == one.envelope()
    assert many.end is one.end


@settings(max_examples=300, deadline=None)
@given(_STREAMS, st.lists(st.integers(min_value=1, max_value=700), max_size=12))
def test_the_bounds_always_hold(data: bytes, sizes: list[int]) -> None:
    engine = Enforcer(NAME, T0)
    out = b""
    for chunk in _cuts(data, sizes):
        out += engine.receive(chunk, T0 + 1)
        assert len(engine._buf) < MAX_LINE  # the memory bound itself
    replies = _REPLY.findall(out)
    assert b"".join(replies) == out  # only whole, printable reply lines
    final = [r for r in replies if r[3:4] != b"-"]  # one per command
    assert len(final) <= MAX_COMMANDS + 1
    assert engine.commands <= MAX_COMMANDS
    assert len(engine.envelope().recipients) <= MAX_RECIPIENTS
    assert not any(cap in out for cap in _CAPABILITIES)
    assert not any(r.startswith(b"421") for r in replies[:-1])  # a 421 is the last word
    if engine.done:
        assert engine.receive(b"NOOP\r\n", T0 + 2) == b""


# -- the event -----------------------------------------------------------------


def _enforced_event(envelope: Envelope, end: EnforceEnd = EnforceEnd.QUIT) -> Event:
    talk = EarlyTalk(8, b"EHLO x\r\n", 0.25)
    conn = ConnInfo("192.0.2.1", 5678, "198.51.100.1", 25)
    return events.early_talker(conn, talk, "enforce", 1.5, None, (envelope, end))


def test_the_event_carries_the_envelope_after_the_action() -> None:
    env = Envelope(b"bot.example", b"<a@b.example>", (b"<c@d.example>", b"<e@f>"), 5)
    event = _enforced_event(env)
    keys = [k for k, _ in event.fields]
    assert keys[keys.index("action") :] == [
        "action", "rtt_ms", "teaser", "helo", "sender", "recipients", "commands", "end",
    ]  # fmt: skip
    assert event.get("helo") == "bot.example"
    assert event.get("sender") == "<a@b.example>"
    assert event.get("recipients") == "<c@d.example>,<e@f>"
    assert event.get("commands") == 5
    assert event.get("end") == "quit"
    assert event.summary.endswith(
        "[helo=bot.example sender=<a@b.example> recipients=<c@d.example>,<e@f> end=quit]"
        " (action=enforce)"
    )


def test_hostile_envelopes_are_escaped_as_the_first_bytes_are() -> None:
    env = Envelope(
        b'x" action="drop"]\r\n<13>1 - - - early-talker [a@1 client="203.0.113.9"]',
        b'<"}\\n{"event":"early-talker","client":"203.0.113.8"@x>',
        (b"<a@b>,<c@d>", b"\xff\x00\n(action=drop)"),
        3,
    )
    event = _enforced_event(env, EnforceEnd.CLOSE)
    helo, sender, rcpts = (str(event.get(k)) for k in ("helo", "sender", "recipients"))
    assert helo == escape_bytes(env.helo)
    assert sender == escape_bytes(env.sender)
    assert rcpts == "<a@b>\\x2c<c@d>,\\xff\\x00\\n(action=drop)"  # two recipients, not three
    for text in (helo, sender, rcpts, event.summary):
        assert "\r" not in text and "\n" not in text
        assert all(" " <= c <= "~" for c in text)
    assert event.summary.endswith("end=close] (action=enforce)")
    header = Header(2, "mx", "repeld", 1, "repeld@32473")
    payload = json.loads(format_json(event, header, 0.0).decode().split("@cee:", 1)[1])
    assert payload["client"] == "192.0.2.1" and payload["action"] == "enforce"
    assert payload["helo"] == helo and payload["sender"] == sender
    line = format_rfc5424(event, header, 0.0).decode()
    assert line.count("\n") == 0 and line.count("[repeld@32473 ") == 1


# -- the hold in enforce mode (core/hold.py) ---------------------------------------


@settings(max_examples=300, deadline=None, database=None)
@given(
    delay=st.floats(min_value=0, max_value=3600, allow_nan=False),
    cache_pending=st.booleans(),
    steps=st.lists(
        st.tuples(_STEP, st.floats(min_value=0, max_value=100, allow_nan=False)),
        min_size=1,
        max_size=20,
    ),
)
def test_enforce_mode_never_cuts_a_talker_before_the_end_of_its_delay(
    delay: float,
    cache_pending: bool,
    steps: list[tuple[tuple[str, bytes | int | None], float]],
) -> None:
    """Whatever the shell feeds: no talker is cut off or passed on its talk
    alone; it is enforced at or after the end of its delay, or written down as
    gone when it leaves first; a silent client is judged as in drop mode."""
    hold = Hold(100.0, delay, cache_pending=cache_pending, enforce=True)
    talked = False
    now = 100.0
    for (kind, payload), advance in steps:
        now += advance
        try:
            verdict = _step(hold, kind, payload, now)
        except LocalProtocolError:
            if hold.done:
                break
            continue
        talked = talked or kind == "data"
        assert not isinstance(verdict, EarlyTalk | Logged)  # no dns: nothing is only logged
        if isinstance(verdict, Enforce):
            assert talked and hold.done
            assert verdict.talk.elapsed <= verdict.elapsed
            if not verdict.gone:
                assert now >= hold.deadline
            else:
                assert kind == "reset"
        if isinstance(verdict, Pass) and talked:
            assert verdict.reason is PassReason.CACHE  # remembered as patient
        if isinstance(verdict, Penalty):
            assert not talked
        if hold.done:
            break


# -- metrics ---------------------------------------------------------------------------


def test_metrics_count_enforce_sessions_by_end() -> None:
    metrics = Metrics()
    for end in (EnforceEnd.QUIT, EnforceEnd.QUIT, EnforceEnd.BUSY):
        metrics.observe(_enforced_event(Envelope(), end))
    metrics.observe(
        events.early_talker(
            ConnInfo("192.0.2.1", 1, "198.51.100.1", 25), EarlyTalk(1, b"x", 0.1), "drop"
        )
    )
    snap = metrics.snapshot(gauges={"enforcing": 2})
    assert snap["labelled"]["enforce_ends"] == {"quit": 2, "busy": 1}
    assert snap["labelled"]["early_talkers"] == {"enforce": 3, "drop": 1}
    text = render(snap).decode()
    assert 'repeld_enforce_sessions_total{end="quit"} 2.0' in text
    assert 'repeld_enforce_sessions_total{end="timeout"} 0.0' in text  # seeded
    assert "repeld_enforcing 2.0" in text


# -- the envelope cannot plant an address for fail2ban -------------------------------

FILTER = Path(__file__).resolve().parents[2] / "scripts/fail2ban/filter.d/repeld.conf"


def _failregexes() -> list[re.Pattern[str]]:
    """The shipped filter's patterns in Python's re, <ADDR> as a plain address group
    (the real fail2ban-regex runs on the same shapes in tests/system/test_fail2ban.py)."""
    text = FILTER.read_text()
    prefix = re.search(r"^_repeld_prefix = (.*)$", text, re.M)
    body = re.search(r"^failregex = (.*?)\n\n", text, re.M | re.S)
    assert prefix and body
    return [
        re.compile(
            line.strip()
            .replace("%(_repeld_prefix)s", prefix.group(1))
            .replace("<ADDR>", r"(?P<addr>[0-9A-Fa-f:.]+)")
        )
        for line in body.group(1).splitlines()
    ]


_ENVELOPE_TEXT = st.one_of(
    st.binary(max_size=120),
    st.sampled_from(
        [
            b'","client":"127.0.9.1","client_port":1,"action":"drop"}',
            b" (action=drop)",
            b"\r\nPREGREET 1 after 0.000 from [127.0.9.2]:1: x (action=drop)",
            b'x" action="drop"] client="127.0.9.3"',
            b"<a@[127.0.9.4]>",
        ]
    ),
)


@settings(max_examples=200, deadline=None, database=None)
@given(
    helo=_ENVELOPE_TEXT,
    sender=_ENVELOPE_TEXT,
    recipients=st.lists(_ENVELOPE_TEXT, max_size=3),
    first=_ENVELOPE_TEXT,
)
def test_the_filter_takes_only_the_client_whatever_the_envelope(
    helo: bytes, sender: bytes, recipients: list[bytes], first: bytes
) -> None:
    talk = EarlyTalk(max(len(first), 1), first or b"x", 0.5)
    conn = ConnInfo("192.0.2.55", 4000, "198.51.100.1", 25)
    event = events.early_talker(
        conn,
        talk,
        "enforce",
        1.0,
        None,
        (Envelope(helo, sender, tuple(recipients), 3), EnforceEnd.QUIT),
    )
    header = Header(2, "mx1", "repeld", 4242, "repeld@32473", local=True)
    cee = format_json(event, header, 0.0).decode()
    lines = [
        "mx1 repeld[4242]: " + cee.split("]: ", 1)[1],  # rsyslog's file line, json
        f"mx1 repeld[4242] {event.summary}",  # a parsed RFC 5424 message, default template
    ]
    for line in lines:
        assert "\n" not in line and "\r" not in line
        found = [m.group("addr") for rx in _failregexes() if (m := rx.search(line))]
        assert found == ["192.0.2.55"], line


def test_an_envelope_of_commas_keeps_the_event_within_syslogs_8_kib() -> None:
    # Commas are escaped within each recipient's limit: escaped after the cut, ten
    # recipients of commas made a 10 KiB event, which rsyslog's default 8 KiB
    # maxMessageSize cut before `(action=enforce)`, out of the report's and
    # fail2ban's sight.
    worst = b"<" + b"," * 600 + b">"
    env = Envelope(b"\x00" * 600, worst, (worst,) * MAX_RECIPIENTS, 40)
    event = _enforced_event(env)
    header = Header(facility=2, hostname="mx1.example.org", app_name="repeld", procid=4242,
                    sd_id="repeld@32473")  # fmt: skip
    assert len(format_rfc5424(event, header, 0.0)) < 8192
    assert len(format_json(event, header, 0.0)) < 8192
    recipients = str(event.get("recipients")).split(",")
    assert len(recipients) == MAX_RECIPIENTS and all("," not in r for r in recipients)

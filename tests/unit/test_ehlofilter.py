"""The PIPECONNECT filter of the MTA's first EHLO reply (core/ehlofilter.py).

Every case is run whole, split at every byte boundary, and byte by byte; the
property tests check that chunking never changes the output and that a stream
without the capability passes byte for byte.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repeld.core.ehlofilter import LIMIT, EhloFilter


def run(chunks: list[bytes], eof: bool = True) -> bytes:
    """The filter's output for these chunks (and end of file)."""
    f = EhloFilter()
    out = b"".join(f.feed(c) for c in chunks)
    if eof:
        out += f.eof()
    return out


def every_split(stream: bytes) -> list[bytes]:
    """The outputs for the stream whole, cut once at each boundary, and byte by byte."""
    outs = [run([stream]), run([stream[i : i + 1] for i in range(len(stream))])]
    outs += [run([stream[:i], stream[i:]]) for i in range(1, len(stream))]
    return outs


def crlf(text: str, eol: str = "\r\n") -> bytes:
    return "".join(line + eol for line in text.split("|")).encode()


GREETING = "220 mx.example ESMTP Exim 4.97"
EHLO = "250-mx.example Hello client [192.0.2.1]|250-SIZE 52428800|250-8BITMIME|250-PIPELINING"

CASES = [
    # (name, stream, expected)
    (
        "last line",
        f"{GREETING}|{EHLO}|250-CHUNKING|250 PIPECONNECT",
        f"{GREETING}|{EHLO}|250 CHUNKING",
    ),
    (
        "middle line",
        f"{GREETING}|{EHLO}|250-PIPECONNECT|250 HELP",
        f"{GREETING}|{EHLO}|250 HELP",
    ),
    (
        "first capability",
        f"{GREETING}|250-mx.example|250-PIPECONNECT|250-SIZE 1000|250 HELP",
        f"{GREETING}|250-mx.example|250-SIZE 1000|250 HELP",
    ),
    (
        "lower case",
        f"{GREETING}|{EHLO}|250-pipeconnect|250 HELP",
        f"{GREETING}|{EHLO}|250 HELP",
    ),
    (
        "X_PIPE_CONNECT last",
        f"{GREETING}|{EHLO}|250 X_PIPE_CONNECT",
        f"{GREETING}|250-mx.example Hello client [192.0.2.1]|250-SIZE 52428800|250-8BITMIME"
        "|250 PIPELINING",
    ),
    (
        "both, the only capabilities",
        f"{GREETING}|250-mx.example|250-x_pipe_connect|250 PipeConnect",
        f"{GREETING}|250 mx.example",
    ),
    (
        "multi-line greeting",
        f"220-mx.example ESMTP|220-no UCE|220 ok|{EHLO}|250 PIPECONNECT",
        f"220-mx.example ESMTP|220-no UCE|220 ok|{EHLO.replace('250-PIPELINING', '250 PIPELINING')}",
    ),
    (
        "pipelined replies after it",
        f"{GREETING}|250-mx.example|250-PIPECONNECT|250 PIPELINING|250 2.1.0 Ok|"
        "250-PIPECONNECT|250 2.1.5 Ok",
        f"{GREETING}|250-mx.example|250 PIPELINING|250 2.1.0 Ok|250-PIPECONNECT|250 2.1.5 Ok",
    ),
    (
        "a later EHLO reply is not touched",
        f"{GREETING}|250-mx.example|250 PIPELINING|220 go ahead|250-mx.example|250 PIPECONNECT",
        f"{GREETING}|250-mx.example|250 PIPELINING|220 go ahead|250-mx.example|250 PIPECONNECT",
    ),
    (
        "a capability with a longer name stays",
        f"{GREETING}|250-mx.example|250-PIPECONNECTX|250 XPIPECONNECT",
        f"{GREETING}|250-mx.example|250-PIPECONNECTX|250 XPIPECONNECT",
    ),
]

UNCHANGED = [
    ("no PIPECONNECT", f"{GREETING}|{EHLO}|250 HELP"),
    ("HELO's one line", f"{GREETING}|250 mx.example Hello client|250 2.1.0 Ok"),
    ("5xx greeting", "554 5.7.1 go away|250-mx.example|250 PIPECONNECT"),
    ("421 greeting", "421 4.3.2 busy|250 PIPECONNECT"),
    ("multi-line 554 greeting", "554-no|554 really|250-x|250 PIPECONNECT"),
    ("EHLO refused", f"{GREETING}|550-no|550 PIPECONNECT|250-x|250 PIPECONNECT"),
    ("a 421 instead of the reply", f"{GREETING}|421-PIPECONNECT|421 4.4.2 bye"),
    ("not SMTP", "HTTP/1.1 200 OK|250-x|250 PIPECONNECT"),
    ("garbage in the reply", f"{GREETING}|250-x|25O-PIPECONNECT|250 PIPECONNECT"),
    ("bare code lines", "220|250-x|250"),
]


@pytest.mark.parametrize("eol", ["\r\n", "\n"])
@pytest.mark.parametrize(("name", "stream", "expected"), CASES, ids=[c[0] for c in CASES])
def test_pipeconnect_is_taken_out(name: str, stream: str, expected: str, eol: str) -> None:
    want = crlf(expected, eol)
    for out in every_split(crlf(stream, eol)):
        assert out == want


@pytest.mark.parametrize("eol", ["\r\n", "\n"])
@pytest.mark.parametrize(("name", "stream"), UNCHANGED, ids=[c[0] for c in UNCHANGED])
def test_other_streams_pass_byte_for_byte(name: str, stream: str, eol: str) -> None:
    data = crlf(stream, eol)
    for out in every_split(data):
        assert out == data


def test_done_after_the_first_reply_and_then_a_plain_pass() -> None:
    f = EhloFilter()
    assert f.feed(b"220 hi\r\n") == b"220 hi\r\n"
    assert not f.done
    assert f.feed(b"250-x\r\n250-PIPECONNECT\r\n") == b""  # held until the reply ends
    assert not f.done
    assert f.feed(b"250 HELP\r\n250 Ok\r\n") == b"250-x\r\n250 HELP\r\n250 Ok\r\n"
    assert f.done
    assert f.feed(b"250-PIPECONNECT\r\n") == b"250-PIPECONNECT\r\n"
    assert f.eof() == b""


def test_greeting_lines_go_on_as_they_complete() -> None:
    f = EhloFilter()
    assert f.feed(b"220-one\r\n220-tw") == b"220-one\r\n"
    assert f.feed(b"o\r\n") == b"220-two\r\n"
    assert not f.done


def test_a_non_220_greeting_ends_the_filter_at_once() -> None:
    f = EhloFilter()
    assert f.feed(b"421 4.3.2 busy\r\n250 PIPECONNECT") == b"421 4.3.2 busy\r\n250 PIPECONNECT"
    assert f.done


def test_eof_flushes_what_is_held() -> None:
    f = EhloFilter()
    assert f.feed(b"220 hi\r\n250-x\r\n250-PIPECONNECT\r\n250 HE") == b"220 hi\r\n"
    assert f.eof() == b"250-x\r\n250-PIPECONNECT\r\n250 HE"
    assert f.done


def test_oversize_garbage_passes_after_the_bound() -> None:
    f = EhloFilter()
    junk = b"x" * (LIMIT - 1)
    assert f.feed(junk) == b""  # a partial line, within the bound: held
    assert not f.done
    assert f.feed(b"yz\r\n") == junk + b"yz\r\n"  # past the bound: all of it, untouched
    assert f.done


def test_an_endless_reply_passes_after_the_bound() -> None:
    lines = b"220 hi\r\n250-x\r\n" + b"250-PIPECONNECT\r\n" * (LIMIT // 17 + 1) + b"250 Ok\r\n"
    for out in (run([lines]), run([lines[i : i + 1000] for i in range(0, len(lines), 1000)])):
        assert out == lines


def test_a_reply_ending_within_the_bound_is_filtered() -> None:
    head = b"220 hi\r\n250-x\r\n250-PIPECONNECT\r\n"
    pad = b"250-" + b"P" * (LIMIT - len(head) - len(b"250-\r\n250 Ok\r\n")) + b"\r\n"
    stream = head + pad + b"250 Ok\r\n"
    assert len(stream) == LIMIT
    assert run([stream]) == b"220 hi\r\n250-x\r\n" + pad + b"250 Ok\r\n"
    assert run([stream + b"more"]) == b"220 hi\r\n250-x\r\n" + pad + b"250 Ok\r\nmore"


# -- properties ---------------------------------------------------------------------

_LINE = st.one_of(
    st.sampled_from(
        [
            b"220 hi",
            b"220-hi",
            b"250-mx",
            b"250 mx",
            b"250-PIPECONNECT",
            b"250 pipeconnect",
            b"250-X_PIPE_CONNECT",
            b"250 X_Pipe_Connect",
            b"250-SIZE 100",
            b"250 HELP",
            b"421 bye",
            b"554-no",
        ]
    ),
    st.binary(max_size=40),
)
_STREAM = st.lists(st.tuples(_LINE, st.sampled_from([b"\r\n", b"\n", b""])), max_size=12).map(
    lambda parts: b"".join(line + eol for line, eol in parts)
)


def _cuts(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=400, deadline=None)
@given(_STREAM, st.lists(st.integers(min_value=0, max_value=1000), max_size=10))
def test_chunking_never_changes_the_output(data: bytes, points: list[int]) -> None:
    assert run(_cuts(data, points)) == run([data])


@settings(max_examples=400, deadline=None)
@given(_STREAM, st.lists(st.integers(min_value=0, max_value=1000), max_size=10))
def test_streams_without_the_capability_pass_byte_for_byte(data: bytes, points: list[int]) -> None:
    if b"PIPECONNECT" in data.upper() or b"X_PIPE_CONNECT" in data.upper():
        data = data.upper().replace(b"PIPECONNECT", b"PIPELINING").replace(b"X_PIPE_CONNECT", b"X")
    assert run(_cuts(data, points)) == data


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100).map(lambda b: b.replace(b"\n", b"")), st.binary(max_size=100))
def test_no_line_end_within_the_bound_passes_everything(head: bytes, tail: bytes) -> None:
    data = head + b"y" * LIMIT + tail
    f = EhloFilter()
    assert f.feed(data) == data
    assert f.done

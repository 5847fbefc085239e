"""The backend check's dialogue, table-tested: replies, EOF and timeouts in, lines and verdicts out.

The backend's side of each dialogue is what real servers write (the Postfix
lines were read off Postfix 3.7 in both PROXY modes, see core/backendcheck.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from repeld.core.backendcheck import (
    EHLO_TIMEOUT,
    GREETING_TIMEOUT,
    NUDGE_TIMEOUT,
    QUIT_TIMEOUT,
    BackendCheck,
    NeedData,
    Send,
    Verdict,
)

GREETING = b"220 mx.test ESMTP Postfix\r\n"
EHLO_REPLY = b"250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 CHUNKING\r\n"
POSTFIX_NO_HEADER = b"421 4.3.0 mx.test Server local error\r\n"
POSTFIX_UNEXPECTED_HEADER = b"500 5.5.2 Error: command not recognized\r\n"
TIMEOUT = object()  # the backend says nothing for the phase's timeout


def run(
    check: BackendCheck, script: Sequence[bytes | object]
) -> tuple[Verdict, list[bytes], list[float]]:
    """Play the backend's side: each item answers the check's next wait."""
    sent: list[bytes] = []
    waits: list[float] = []
    items = list(script)
    while True:
        action = check.next_action()
        if isinstance(action, Verdict):
            assert not items, f"the check ended before the backend said {items}"
            return action, sent, waits
        if isinstance(action, Send):
            sent.append(action.data)
            continue
        assert isinstance(action, NeedData)
        waits.append(action.timeout)
        assert items, "the check waits for more than the backend says"
        item = items.pop(0)
        if item is TIMEOUT:
            check.timed_out()
        else:
            assert isinstance(item, bytes)
            check.receive_data(item)


def test_a_healthy_backend_without_proxy() -> None:
    verdict, sent, waits = run(BackendCheck("none", "probe.test"), [GREETING, EHLO_REPLY, b""])
    assert verdict.ok
    assert verdict.greeting == "220 mx.test ESMTP Postfix"
    assert verdict.capabilities == ("PIPELINING", "SIZE 10240000", "CHUNKING")
    assert verdict.warnings == ()
    assert sent == [b"EHLO probe.test\r\n", b"QUIT\r\n"]
    assert waits == [GREETING_TIMEOUT, EHLO_TIMEOUT, QUIT_TIMEOUT]


def test_replies_split_anywhere_are_put_together() -> None:
    stream = GREETING + EHLO_REPLY + b"221 2.0.0 Bye\r\n"
    script: list[bytes | object] = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    verdict, sent, _ = run(BackendCheck("v1", "p"), script)
    assert verdict.ok
    assert verdict.capabilities == ("PIPELINING", "SIZE 10240000", "CHUNKING")
    assert sent == [b"EHLO p\r\n", b"QUIT\r\n"]


def test_a_slow_goodbye_is_no_fault() -> None:
    verdict, _, _ = run(BackendCheck("v2", "p"), [GREETING, EHLO_REPLY, TIMEOUT])
    assert verdict.ok


def test_postfix_expecting_a_header_and_getting_none() -> None:
    # Silent while it waits for the header; the nudge gets 421 and a close.
    verdict, sent, waits = run(BackendCheck("none", "p"), [TIMEOUT, POSTFIX_NO_HEADER])
    assert not verdict.ok
    assert "expect a PROXY header" in verdict.message
    assert "--proxy-protocol v1" in verdict.message
    assert "Server local error" in verdict.message
    assert sent == [b"EHLO p\r\n"]
    assert waits == [GREETING_TIMEOUT, NUDGE_TIMEOUT]


def test_a_backend_that_closes_on_the_nudge_expects_a_header() -> None:
    verdict, _, _ = run(BackendCheck("none", "p"), [TIMEOUT, b""])
    assert not verdict.ok
    assert "expect a PROXY header" in verdict.message


def test_a_backend_that_never_greets_nor_answers() -> None:
    verdict, _, _ = run(BackendCheck("none", "p"), [TIMEOUT, TIMEOUT])
    assert not verdict.ok
    assert f"does not greet within {GREETING_TIMEOUT + NUDGE_TIMEOUT:g} s" in verdict.message


def test_a_late_greeting_is_reported_as_slow() -> None:
    verdict, _, _ = run(BackendCheck("none", "p"), [TIMEOUT, GREETING])
    assert not verdict.ok
    assert "overloaded" in verdict.message


def test_no_greeting_after_a_header() -> None:
    verdict, sent, _ = run(BackendCheck("v1", "p"), [TIMEOUT])
    assert not verdict.ok
    assert "does not greet" in verdict.message
    assert "after a PROXY v1 header" in verdict.message
    assert "expect a PROXY v1 header?" in verdict.message
    assert sent == []  # a line after a header that was not read would only confuse it


def test_a_close_after_a_header() -> None:
    verdict, _, _ = run(BackendCheck("v2", "p"), [b""])
    assert not verdict.ok
    assert "PROXY v2 header" in verdict.message


def test_postfix_not_expecting_the_header_answers_it_as_a_command() -> None:
    verdict, sent, _ = run(
        BackendCheck("v1", "p"), [GREETING + POSTFIX_UNEXPECTED_HEADER, EHLO_REPLY]
    )
    assert not verdict.ok
    assert "answers the PROXY v1 header as an SMTP command" in verdict.message
    assert "--proxy-protocol none" in verdict.message
    assert sent == [b"EHLO p\r\n"]


def test_a_refused_ehlo_after_a_header() -> None:
    verdict, _, _ = run(BackendCheck("v1", "p"), [GREETING, b"554 5.7.1 go away\r\n", TIMEOUT])
    assert not verdict.ok
    assert "refuses the PROXY v1 header or EHLO p with '554 5.7.1 go away'" in verdict.message
    assert "expect a PROXY v1 header?" in verdict.message


def test_postfix_not_expecting_a_v2_header_reads_its_quit() -> None:
    # The v2 signature's "\r\n\r\n\x00\r\nQUIT\n" is two empty lines and a QUIT.
    verdict, _, _ = run(
        BackendCheck("v2", "p"), [GREETING + b"500 5.5.2 Error: bad syntax\r\n", b""]
    )
    assert not verdict.ok
    assert "refuses the PROXY v2 header or EHLO p with '500 5.5.2" in verdict.message


def test_a_refused_ehlo_without_a_header() -> None:
    verdict, _, _ = run(BackendCheck("none", "p"), [GREETING, b"554 5.7.1 go away\r\n"])
    assert not verdict.ok
    assert "refuses EHLO p" in verdict.message


@pytest.mark.parametrize(
    ("proxy", "greeting", "hint"),
    [
        ("none", b"421 4.3.2 busy\r\n", True),
        ("none", b"554 5.7.1 no\r\n", False),
        ("v1", b"421 4.3.2 busy\r\n", False),
    ],
)
def test_a_4xx_or_5xx_greeting_fails(proxy: str, greeting: bytes, hint: bool) -> None:
    verdict, sent, _ = run(BackendCheck(proxy, "p"), [greeting])
    assert not verdict.ok
    assert "instead of 220" in verdict.message
    assert ("expect a PROXY header" in verdict.message) is hint
    assert sent == []


def test_garbage_instead_of_a_greeting() -> None:
    verdict, _, _ = run(BackendCheck("none", "p"), [b"\x16\x03\x01 hello\r\n"])
    assert not verdict.ok
    assert "not an SMTP reply" in verdict.message
    assert "\\x16\\x03\\x01" in verdict.message


def test_a_close_after_ehlo() -> None:
    verdict, _, _ = run(BackendCheck("none", "p"), [GREETING, b""])
    assert not verdict.ok
    assert "closes the connection after EHLO" in verdict.message


def test_no_reply_to_ehlo() -> None:
    verdict, _, _ = run(BackendCheck("none", "p"), [GREETING, TIMEOUT])
    assert not verdict.ok
    assert "no reply to EHLO" in verdict.message


@pytest.mark.parametrize("name", [b"PIPECONNECT", b"X_PIPE_CONNECT"])
@pytest.mark.parametrize("keep", [False, True])
def test_pipe_connect_is_a_warning_only_when_the_filter_is_off(name: bytes, keep: bool) -> None:
    ehlo = b"250-mx.test\r\n250-PIPELINING\r\n250-" + name + b"\r\n250 HELP\r\n"
    check = BackendCheck("none", "p", keep_pipe_connect=keep)
    verdict, _, _ = run(check, [GREETING, ehlo, b""])
    assert verdict.ok
    assert name.decode() in verdict.capabilities
    if keep:
        assert len(verdict.warnings) == 1
        assert name.decode() in verdict.warnings[0]
        assert "--keep-pipe-connect" in verdict.warnings[0]
    else:
        assert verdict.warnings == ()


def test_an_endless_reply_is_malformed() -> None:
    verdict, _, _ = run(BackendCheck("none", "p"), [b"220-" + b"x" * 20_000])
    assert not verdict.ok
    assert "not an SMTP reply" in verdict.message

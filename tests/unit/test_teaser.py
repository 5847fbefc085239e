"""The teaser (--teaser): what the core says to send, and what follows from it."""

from __future__ import annotations

import pytest

from repeld.config.errors import SettingError
from repeld.config.values import TEASER_TEXT_LIMIT, teaser_text
from repeld.core import events
from repeld.core.events import ConnInfo
from repeld.core.hold import (
    EarlyTalk,
    HangUp,
    Hold,
    LocalProtocolError,
    Logged,
    Mute,
    Pass,
    PassReason,
    Wait,
    teaser_line,
)

T0 = 1000.0
LINE = b"220-mx.example.org\r\n"
CONN = ConnInfo("192.0.2.7", 50123, "198.51.100.25", 25)


def test_teaser_line_is_the_first_line_of_a_multi_line_greeting() -> None:
    assert teaser_line("mx.example.org") == LINE
    # An odd host name never breaks the line in two or leaves ASCII.
    assert teaser_line("mx\r\n250 x\u00e9") == b"220-mx??250 x?\r\n"


def test_no_teaser_means_nothing_to_send() -> None:
    hold = Hold(T0, 25.0)
    assert hold.opening() == b""
    assert hold.opened(0, T0) == Wait(T0 + 25.0)
    assert not hold.teased


def test_teaser_sent_in_full_then_silence_passes() -> None:
    hold = Hold(T0, 25.0, teaser=LINE)
    assert hold.opening() == LINE
    assert hold.opened(len(LINE), T0) == Wait(T0 + 25.0)
    assert hold.teased
    assert hold.opening() == b""  # said once
    assert hold.silence(T0 + 25.0) == Pass(PassReason.DELAY, 25.0)


@pytest.mark.parametrize("sent", [0, 1, len(LINE) - 1])
def test_a_client_that_cannot_take_the_line_is_reset(sent: int) -> None:
    hold = Hold(T0, 25.0, teaser=LINE)
    assert hold.opened(sent, T0 + 0.25) == HangUp(0.25, reset=True)
    assert hold.done
    with pytest.raises(LocalProtocolError):
        hold.opened(len(LINE), T0)


def test_a_talk_after_the_teaser_is_early_talk_that_says_so() -> None:
    hold = Hold(T0, 25.0, teaser=LINE)
    hold.opened(len(LINE), T0)
    assert hold.data(b"EHLO bot\r\n", T0 + 0.25) == EarlyTalk(
        10, b"EHLO bot\r\n", 0.25, teased=True
    )


def test_a_talk_without_the_teaser_says_so_too() -> None:
    hold = Hold(T0, 25.0)
    verdict = hold.data(b"EHLO bot\r\n", T0 + 0.2)
    assert isinstance(verdict, EarlyTalk) and not verdict.teased


def test_teaser_with_a_pending_cache_and_observe_mode() -> None:
    hold = Hold(T0, 25.0, teaser=LINE, cache_pending=True, observe=True)
    hold.opened(len(LINE), T0)
    assert hold.data(b"EHLO x\r\n", T0 + 1.0) == Mute(T0 + 1.0 + 0.5)
    talk = EarlyTalk(8, b"EHLO x\r\n", 1.0, teased=True)
    assert hold.unknown(T0 + 1.1) == Logged(talk, Mute(T0 + 25.0))
    assert hold.due(T0 + 25.0) == Pass(PassReason.DELAY, 25.0, 8)


def test_the_cache_can_pass_a_teased_client() -> None:
    hold = Hold(T0, 25.0, teaser=LINE, cache_pending=True)
    hold.opened(len(LINE), T0)
    assert hold.remembered_good(T0 + 0.125) == Pass(PassReason.CACHE, 0.125)


def test_opened_after_the_hold_moved_on_is_a_shell_bug() -> None:
    hold = Hold(T0, 25.0, teaser=LINE, cache_pending=True)
    hold.data(b"x", T0)
    with pytest.raises(LocalProtocolError):
        hold.opened(len(LINE), T0)


def test_the_event_says_whether_the_teaser_had_gone_out() -> None:
    teased = events.early_talker(CONN, EarlyTalk(4, b"EHLO", 0.1, teased=True), "drop")
    plain = events.early_talker(CONN, EarlyTalk(4, b"EHLO", 0.1), "drop")
    assert teased.get("teaser") == 1
    assert plain.get("teaser") == 0
    # The summary line is unchanged: fail2ban's filter matches it.
    assert teased.summary == plain.summary
    assert teased.summary.endswith("(action=drop)")


@pytest.mark.parametrize("text", ["mx.example.org", "mx.example.org ESMTP ready", "x" * 500])
def test_teaser_text_accepts(text: str) -> None:
    assert teaser_text(text) == text


@pytest.mark.parametrize(
    "text",
    ["", " mx", "mx\r\n220 x", "mx\t", "h\u00f4te", "x" * (TEASER_TEXT_LIMIT + 1)],
)
def test_teaser_text_refuses(text: str) -> None:
    with pytest.raises(SettingError) as info:
        teaser_text(text)
    assert info.value.option == "teaser-text"

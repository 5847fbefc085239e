"""DNS lists: query names, filters, weights, scores, the hold's verdicts, and the options."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from repeld.config.errors import SettingError
from repeld.config.file import read_config
from repeld.config.settings import Settings, build_settings
from repeld.config.values import Backend, Resolver, dns_list, parse_resolver
from repeld.core.dnsbl import (
    MAX_TTL,
    NEGATIVE_TTL,
    UNLISTED,
    WATCH_ALARM,
    WATCH_WINDOW,
    AnswerCache,
    DnsAction,
    DnsList,
    DnsPolicy,
    DnsScore,
    Judgement,
    ListWatch,
    ScoreCache,
    domains,
    negative_ttl,
    query_name,
    reach,
    reject_line,
    reversed_address,
    score,
)
from repeld.core.hold import (
    CACHE_WAIT,
    Blocked,
    CacheVerdict,
    EarlyTalk,
    Hold,
    LocalProtocolError,
    Logged,
    Mute,
    Pass,
    PassReason,
    Penalty,
    Wait,
)

T0 = 1000.0

# -- query names -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "name"),
    [
        ("192.0.2.1", "1.2.0.192.bl.example"),
        ("127.0.0.2", "2.0.0.127.bl.example"),
        ("::ffff:192.0.2.1", "1.2.0.192.bl.example"),  # a mapped address is asked as IPv4
        ("64:ff9b::192.0.2.1", "1.2.0.192.bl.example"),  # so is a translated one (RFC 6052)
        ("64:ff9b::c000:201", "1.2.0.192.bl.example"),
        (
            "2001:db8::1",
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example",
        ),
    ],
)
def test_query_name(address: str, name: str) -> None:
    assert query_name(address, "bl.example") == name
    assert query_name(address, "bl.example.") == name


def test_query_name_refuses_a_non_address() -> None:
    with pytest.raises(ValueError):
        query_name("mail.example", "bl.example")


# -- filters, weights, scores ------------------------------------------------------

ANY = DnsList("any.example")
RANGE = DnsList("range.example", (((127, 127),), ((0, 0),), ((0, 0),), ((2, 11),)), 3)
SET = DnsList("wl.example", (((127, 127),), ((0, 0),), ((0, 255),), ((1, 1), (3, 3))), -2)


@pytest.mark.parametrize(
    ("entry", "replies", "listed"),
    [
        (ANY, ["127.0.0.2"], True),
        (ANY, ["127.0.0.1"], True),  # no filter: any address in 127.0.0.0/8
        (ANY, ["10.1.2.3"], False),  # ... not a parked domain's wildcard
        (ANY, ["127.0.0.255"], False),  # dnswl.org: "you are blocked"
        (ANY, ["127.255.255.254"], False),  # Spamhaus: "public resolver"
        (ANY, ["127.255.255.255", "127.0.0.4"], True),
        (ANY, [], False),
        (ANY, ["not an address"], False),
        (RANGE, ["127.0.0.2"], True),
        (RANGE, ["127.0.0.11"], True),
        (RANGE, ["127.0.0.12"], False),
        (RANGE, ["127.0.0.1"], False),
        (RANGE, ["127.0.0.1", "127.0.0.4"], True),  # any one reply is enough
        (SET, ["127.0.9.1"], True),
        (SET, ["127.0.9.3"], True),
        (SET, ["127.0.9.2"], False),
        (SET, ["127.1.9.1"], False),
    ],
)
def test_filter(entry: DnsList, replies: list[str], listed: bool) -> None:
    assert entry.matches(replies) is listed


def test_entry_text_round_trips_the_syntax() -> None:
    assert str(ANY) == "any.example"
    assert str(RANGE) == "range.example=127.0.0.[2..11]*3"
    assert str(SET) == "wl.example=127.0.[0..255].[1;3]*-2"


def test_score_sums_the_weights_of_the_entries_that_listed() -> None:
    lists = [RANGE, ANY, SET]
    answers = {"range.example": ["127.0.0.4", "127.0.0.5"], "any.example": ["127.0.0.2"]}
    assert score(lists, answers) == DnsScore(4, ("range.example", "any.example"))
    assert score(lists, {}) == DnsScore()
    allowed = score(lists, {"wl.example": ["127.0.5.3"]})
    assert allowed == DnsScore(-2, ("wl.example",), allowing=("wl.example",))
    assert allowed.blocking == ()
    mixed = score(lists, {"wl.example": ["127.0.5.3"], "any.example": ["127.0.0.2"]})
    assert mixed.lists == ("any.example", "wl.example") and mixed.blocking == ("any.example",)


def test_several_entries_on_one_domain_share_one_query() -> None:
    low = DnsList("dnswl.example", (((127, 127),), ((0, 0),), ((0, 255),), ((1, 1),)), -1)
    high = DnsList("dnswl.example", (((127, 127),), ((0, 0),), ((0, 255),), ((3, 3),)), -3)
    lists = [low, high, ANY]
    assert domains(lists) == ("dnswl.example", "any.example")
    wl = ("dnswl.example",)
    assert score(lists, {"dnswl.example": ["127.0.15.3"]}) == DnsScore(-3, wl, allowing=wl)
    both = {"dnswl.example": ["127.0.15.3", "127.0.15.1"]}
    assert score(lists, both) == DnsScore(-4, wl, allowing=wl)


@pytest.mark.parametrize(
    ("value", "judgement"),
    [(-5, Judgement.ALLOW), (-1, Judgement.ALLOW), (0, Judgement.NEITHER), (1, Judgement.BLOCK)],
)
def test_thresholds(value: int, judgement: Judgement) -> None:
    assert DnsPolicy().judge(DnsScore(value)) is judgement


def test_thresholds_must_leave_room_between_them() -> None:
    with pytest.raises(ValueError):
        DnsPolicy(allow_threshold=2, block_threshold=2)


def test_reject_line_names_the_client_and_the_lists() -> None:
    line = reject_line("192.0.2.1", ("zen.spamhaus.org", "bl.example"))
    assert line == (
        b"554 5.7.1 Service unavailable; client [192.0.2.1] blocked using "
        b"zen.spamhaus.org, bl.example\r\n"
    )


# -- the hold's verdicts ----------------------------------------------------------

LISTED = DnsScore(2, ("bl.example",))
ALLOWED = DnsScore(-1, ("wl.example",))
NEITHER = DnsScore(0)


def hold(
    action: DnsAction = DnsAction.DROP, *, cache_pending: bool = False, observe: bool = False
) -> Hold:
    dns = DnsPolicy(action=action, block_delay=60.0)
    return Hold(T0, 25.0, dns=dns, cache_pending=cache_pending, observe=observe)


# -- when the shell peeks before an answer (core/hold.py: a last peek) -----------------

#: May still be allowed (a list of weight -1 is to answer) or not: settles nothing yet.
MAY_ALLOW = DnsScore(0, (), ("wl.example",), (-1, 0))


@pytest.mark.parametrize(
    ("case", "make", "result", "look"),
    [
        ("an allow, the cache answered: passed now", lambda: hold(), ALLOWED, True),
        ("a block, the cache answered: cut off now", lambda: hold(), LISTED, True),
        ("not settled yet: held on", lambda: hold(), MAY_ALLOW, False),
        ("settled to neither: held on", lambda: hold(), NEITHER, False),
        ("the cache still to answer: kept", lambda: hold(cache_pending=True), ALLOWED, False),
        ("without lists", lambda: Hold(T0, 25.0), ALLOWED, False),
    ],
)
def test_a_peek_comes_before_a_lists_answer_that_ends_the_hold(
    case: str, make: Callable[[], Hold], result: DnsScore, look: bool
) -> None:
    assert make().look_before_lists(result, T0 + 1.0) is look, case


def test_a_client_the_cache_called_good_is_looked_at_before_the_settling_answer() -> None:
    h = hold(cache_pending=True)
    assert h.remembered_good(T0 + 0.125) == Wait(T0 + 25.0)  # waits for the lists
    assert h.look_before_lists(NEITHER, T0 + 1.0)  # settling, they pass it
    assert not h.look_before_lists(MAY_ALLOW, T0 + 1.0)  # settling nothing
    h.data(b"EHLO x\r\n", T0 + 0.25)  # talked: muted, no longer looked at
    assert not h.look_before_lists(NEITHER, T0 + 1.0)


def test_a_settled_or_decided_hold_is_not_looked_at() -> None:
    h = hold(cache_pending=True)
    h.listed(NEITHER, T0 + 0.125)  # settled and kept: the cache decides now
    assert not h.look_before_lists(ALLOWED, T0 + 1.0)
    h = hold()
    h.listed(ALLOWED, T0 + 0.125)
    assert h.done and not h.look_before_cache(CacheVerdict.GOOD, T0 + 1.0)


@pytest.mark.parametrize(
    ("kept", "answer", "look"),
    [
        (None, CacheVerdict.GOOD, True),  # passes at once, bytes and all
        (None, CacheVerdict.BAD, True),  # cut off unheard (a penalty)
        (None, CacheVerdict.UNKNOWN, False),  # held on: the pen hears it anyway
        (ALLOWED, CacheVerdict.UNKNOWN, True),  # the kept allow passes it now
        (LISTED, CacheVerdict.UNKNOWN, True),  # the kept block cuts it off now
        (NEITHER, CacheVerdict.UNKNOWN, False),  # held on
    ],
)
def test_a_peek_comes_before_a_cache_answer_that_ends_the_hold(
    kept: DnsScore | None, answer: CacheVerdict, look: bool
) -> None:
    h = hold(cache_pending=True)
    if kept is not None:
        h.listed(kept, T0 + 0.125)
    assert h.look_before_cache(answer, T0 + 1.0) is look
    # At the end of the hold any answer may end it: looked before, whatever it is.
    assert h.look_before_cache(answer, T0 + 25.0)


@pytest.mark.parametrize("action", list(DnsAction))
def test_at_the_end_of_the_hold_every_answer_is_looked_before(action: DnsAction) -> None:
    # The pen's own deadline may not have been served yet in that turn of its
    # loop: an answer then (log: Logged(Blocked, Pass)) must not pass a talker.
    h = hold(action)
    assert not h.look_before_lists(NEITHER, T0 + 24.9)
    assert h.look_before_lists(NEITHER, T0 + 25.0)
    h.listed(LISTED, T0 + 0.125)  # delay: held to B; log: written down, held on
    if not h.done:
        assert h.look_before_lists(NEITHER, T0 + 60.0)


def test_allowed_client_passes_at_once() -> None:
    h = hold()
    assert h.awaiting_dns
    assert h.listed(ALLOWED, T0 + 0.25) == Pass(PassReason.DNSWL, 0.25)
    assert h.done and not h.awaiting_dns
    assert h.dns_result == ALLOWED


@pytest.mark.parametrize("action", [DnsAction.DROP, DnsAction.REJECT])
def test_blocked_client_is_cut_off(action: DnsAction) -> None:
    h = hold(action)
    assert h.listed(LISTED, T0 + 1.0) == Blocked(2, ("bl.example",), 1.0, action)
    assert h.done


def test_a_block_names_only_the_lists_that_weighed_for_it() -> None:
    # bl*3 and an allow list both answered: the 554 (and the dnsbl event) names
    # the block list, never the allow list as a reason for the block.
    h = hold(DnsAction.REJECT)
    both = score(
        [DnsList("bl.example", None, 3), DnsList("wl.example", None, -1)],
        {"wl.example": ["127.0.0.2"], "bl.example": ["127.0.0.2"]},
    )
    assert both.lists == ("bl.example", "wl.example")
    assert h.listed(both, T0 + 1.0) == Blocked(2, ("bl.example",), 1.0, DnsAction.REJECT)
    assert reject_line("192.0.2.1", ("bl.example",)).endswith(b"blocked using bl.example\r\n")


def test_blocked_client_is_logged_and_held_on() -> None:
    h = hold(DnsAction.LOG)
    verdict = h.listed(LISTED, T0 + 1.0)
    assert verdict == Logged(Blocked(2, ("bl.example",), 1.0, DnsAction.LOG), Wait(T0 + 25.0))
    assert h.silence(T0 + 25.0) == Pass(PassReason.DELAY, 25.0)


def test_blocked_client_is_held_longer() -> None:
    h = hold(DnsAction.DELAY)
    verdict = h.listed(LISTED, T0 + 1.0)
    assert verdict == Logged(Blocked(2, ("bl.example",), 1.0, DnsAction.DELAY), Wait(T0 + 60.0))
    assert h.silence(T0 + 25.0) == Wait(T0 + 60.0)
    assert h.deadline == T0 + 25.0  # the pen's queue of the 25 s delay stays in order
    assert h.silence(T0 + 60.0) == Pass(PassReason.DELAY, 60.0)


def test_blocked_client_that_talks_during_the_longer_hold_is_an_early_talker() -> None:
    h = hold(DnsAction.DELAY)
    h.listed(LISTED, T0 + 1.0)
    assert h.data(b"EHLO x\r\n", T0 + 40.0) == EarlyTalk(8, b"EHLO x\r\n", 40.0)


def test_neither_listed_nor_allowed_holds_on() -> None:
    h = hold()
    assert h.listed(NEITHER, T0 + 0.5) == Wait(T0 + 25.0)
    assert h.silence(T0 + 25.0) == Pass(PassReason.DELAY, 25.0)


def test_the_lists_never_lengthen_a_wait_they_come_after() -> None:
    h = hold()
    assert h.silence(T0 + 25.0) == Pass(PassReason.DELAY, 25.0)
    assert not h.awaiting_dns  # the shell drops the late answer
    with pytest.raises(LocalProtocolError):
        h.listed(LISTED, T0 + 26.0)


def test_a_second_answer_is_a_shell_bug() -> None:
    h = hold()
    h.listed(NEITHER, T0 + 0.5)
    with pytest.raises(LocalProtocolError):
        h.listed(NEITHER, T0 + 0.6)


def test_no_lists_no_answer() -> None:
    h = Hold(T0, 25.0)
    assert not h.awaiting_dns
    with pytest.raises(LocalProtocolError):
        h.listed(NEITHER, T0)


# The pass cache and the lists: their answer is kept until the cache speaks; a
# remembered pass skips the delay, not the lists.


def test_a_block_outranks_a_remembered_pass() -> None:
    h = hold(cache_pending=True)
    assert h.listed(LISTED, T0 + 0.125) == Wait(T0 + 25.0)
    assert h.remembered_good(T0 + 0.25) == Blocked(2, ("bl.example",), 0.25, DnsAction.DROP)


def test_a_remembered_client_the_lists_clear_passes_at_once() -> None:
    for result in (NEITHER, ALLOWED):
        h = hold(cache_pending=True)
        h.listed(result, T0 + 0.125)
        assert h.remembered_good(T0 + 0.25) == Pass(PassReason.CACHE, 0.25)


def test_a_remembered_client_waits_for_the_lists_then_passes() -> None:
    h = hold(cache_pending=True)
    assert h.remembered_good(T0 + 0.125) == Wait(T0 + 25.0)
    assert h.awaiting_dns and not h.done
    assert h.listed(NEITHER, T0 + 0.25) == Pass(PassReason.CACHE, 0.25)


def test_a_remembered_client_waits_for_the_lists_then_is_blocked() -> None:
    h = hold(DnsAction.LOG, cache_pending=True)
    assert h.remembered_good(T0 + 0.125) == Wait(T0 + 25.0)
    blocked = Blocked(2, ("bl.example",), 0.25, DnsAction.LOG)
    assert h.listed(LISTED, T0 + 0.25) == Logged(blocked, Pass(PassReason.CACHE, 0.25))
    assert h.done


def test_a_remembered_client_blocked_with_action_delay_is_held_to_it() -> None:
    h = hold(DnsAction.DELAY, cache_pending=True)
    h.remembered_good(T0 + 0.125)
    blocked = Blocked(2, ("bl.example",), 0.25, DnsAction.DELAY)
    assert h.listed(LISTED, T0 + 0.25) == Logged(blocked, Wait(T0 + 60.0))
    assert h.silence(T0 + 60.0) == Pass(PassReason.DELAY, 60.0)


def test_a_remembered_client_whose_lists_stay_silent_waits_its_delay_at_most() -> None:
    h = hold(cache_pending=True)
    h.remembered_good(T0 + 0.125)
    partial = DnsScore(1, ("bl.example",), ("wl.example",), (-5, 0))
    assert h.listed(partial, T0 + 0.5) == Wait(T0 + 25.0)
    blocked = Blocked(1, ("bl.example",), 25.0, DnsAction.DROP)
    assert h.silence(T0 + 25.0) == blocked  # ... judged by the answers it has


def test_a_remembered_talker_loses_its_pardon_when_the_lists_block() -> None:
    h = hold(cache_pending=True)
    assert h.data(b"EHLO x\r\n", T0 + 1.0) == Mute(T0 + 1.0 + CACHE_WAIT)
    assert h.remembered_good(T0 + 1.1) == Mute(T0 + 25.0)  # waits for the lists
    assert h.listed(LISTED, T0 + 1.2) == EarlyTalk(8, b"EHLO x\r\n", 1.0)
    h = hold(cache_pending=True)
    h.data(b"EHLO x\r\n", T0 + 1.0)
    h.remembered_good(T0 + 1.1)
    assert h.due(T0 + 25.0) == Pass(PassReason.CACHE, 25.0, 8)  # the lists never spoke
    # Remembered, waiting for the lists, then it talks (PIPECONNECT): not cut off.
    h = hold(cache_pending=True)
    assert h.remembered_good(T0 + 0.5) == Wait(T0 + 25.0)
    assert h.data(b"EHLO x\r\n", T0 + 1.0) == Mute(T0 + 25.0)
    assert h.eof(T0 + 1.5) == Mute(T0 + 25.0)  # a pipelined QUIT: still waits
    assert h.listed(NEITHER, T0 + 2.0) == Pass(PassReason.CACHE, 2.0, 8)
    h = hold(cache_pending=True)
    h.data(b"EHLO x\r\n", T0 + 1.0)
    h.listed(NEITHER, T0 + 1.0625)
    assert h.remembered_good(T0 + 1.125) == Pass(PassReason.CACHE, 1.125, 8)


def test_cache_bad_beats_an_allow() -> None:
    h = hold(cache_pending=True)
    h.listed(ALLOWED, T0 + 0.125)
    assert h.remembered_bad(T0 + 0.25) == Penalty(0.25)


def test_cache_unknown_lets_the_kept_answer_decide() -> None:
    h = hold(cache_pending=True)
    h.listed(LISTED, T0 + 0.125)
    assert h.unknown(T0 + 0.25) == Blocked(2, ("bl.example",), 0.25, DnsAction.DROP)
    h = hold(cache_pending=True)
    h.listed(ALLOWED, T0 + 0.125)
    assert h.unknown(T0 + 0.25) == Pass(PassReason.DNSWL, 0.25)


@pytest.mark.parametrize(
    ("action", "verdict"),
    [
        (DnsAction.DROP, Blocked(2, ("bl.example",), 25.0, DnsAction.DROP)),
        (DnsAction.REJECT, Blocked(2, ("bl.example",), 25.0, DnsAction.REJECT)),
        (
            DnsAction.LOG,
            Logged(Blocked(2, ("bl.example",), 25.0, DnsAction.LOG), Pass(PassReason.DELAY, 25.0)),
        ),
        (
            DnsAction.DELAY,
            Logged(Blocked(2, ("bl.example",), 25.0, DnsAction.DELAY), Wait(T0 + 60.0)),
        ),
    ],
)
def test_a_kept_block_applies_when_the_cache_never_answers(
    action: DnsAction, verdict: Blocked | Logged
) -> None:
    # The lists settled while the cache's answer was awaited (kept), and a slow
    # cache had not answered by the end of the delay: the block applies, as
    # "unknown" would have applied it. It used to pass the client unjudged.
    h = hold(action, cache_pending=True)
    assert h.listed(LISTED, T0 + 0.125) == Wait(T0 + 25.0)
    assert h.silence(T0 + 25.0) == verdict
    if action is DnsAction.DELAY:
        assert h.silence(T0 + 60.0) == Pass(PassReason.DELAY, 60.0)


def test_a_kept_allow_or_neither_passes_at_the_end_of_the_delay() -> None:
    for kept in (ALLOWED, NEITHER):
        h = hold(cache_pending=True)
        h.listed(kept, T0 + 0.125)
        assert h.silence(T0 + 25.0) == Pass(PassReason.DELAY, 25.0)


def test_cache_answer_first_then_the_lists() -> None:
    h = hold(cache_pending=True)
    assert h.unknown(T0 + 0.125) == Wait(T0 + 25.0)
    assert h.listed(ALLOWED, T0 + 0.5) == Pass(PassReason.DNSWL, 0.5)


def test_observe_mode_penalty_then_the_kept_block() -> None:
    h = hold(DnsAction.DELAY, cache_pending=True, observe=True)
    h.listed(LISTED, T0 + 0.125)
    verdict = h.remembered_bad(T0 + 0.25)
    blocked = Blocked(2, ("bl.example",), 0.25, DnsAction.DELAY)
    assert verdict == Logged(Penalty(0.25), Logged(blocked, Wait(T0 + 60.0)))


# Early talk is early talk whatever the lists say; their answer is kept for the events.


def test_talker_waiting_for_the_cache_is_not_judged_by_the_lists() -> None:
    h = hold(cache_pending=True)
    assert h.data(b"EHLO x\r\n", T0 + 1.0) == Mute(T0 + 1.0 + CACHE_WAIT)
    assert h.listed(ALLOWED, T0 + 1.1) == Mute(T0 + 1.0 + CACHE_WAIT)
    assert h.unknown(T0 + 1.2) == EarlyTalk(8, b"EHLO x\r\n", 1.0)
    assert h.dns_result == ALLOWED


def test_a_good_word_after_a_block_applied_at_the_delays_end_keeps_the_longer_hold() -> None:
    # The lists settled while the cache's answer was awaited; the cache was silent
    # until the end of the delay, where the block applied (--dnsbl-action delay).
    # Its good word, late, once wrote the block down a second time.
    h = hold(DnsAction.DELAY, cache_pending=True)
    assert h.listed(LISTED, T0 + 1.0) == Wait(T0 + 25.0)
    blocked = Blocked(2, ("bl.example",), 25.0, DnsAction.DELAY)
    assert h.silence(T0 + 25.0) == Logged(blocked, Wait(T0 + 60.0))
    assert h.remembered_good(T0 + 25.2) == Wait(T0 + 60.0)
    assert h.silence(T0 + 60.0) == Pass(PassReason.DELAY, 60.0)


# --on-early log: the talk is written down and the client held for the whole delay;
# then the lists judge it as they judge a silent client (postscreen's greet_action
# ignore leaves its DNSBL test alone). Observing its talk once let a listed bot in.

TALK = EarlyTalk(8, b"EHLO x\r\n", 1.0)


def _observed(action: DnsAction, result: DnsScore) -> Hold:
    h = hold(action, observe=True)
    assert h.data(b"EHLO x\r\n", T0 + 1.0) == Logged(TALK, Mute(T0 + 25.0))
    assert h.listed(result, T0 + 2.0) == Mute(T0 + 25.0)
    return h


@pytest.mark.parametrize("result", [NEITHER, ALLOWED])
def test_an_observed_talker_the_lists_do_not_block_is_passed_with_its_bytes(
    result: DnsScore,
) -> None:
    h = _observed(DnsAction.DROP, result)
    assert h.due(T0 + 25.0) == Pass(PassReason.DELAY, 25.0, 8)


@pytest.mark.parametrize("action", [DnsAction.DROP, DnsAction.REJECT])
def test_an_observed_talker_the_lists_block_is_dropped_or_rejected_at_the_delays_end(
    action: DnsAction,
) -> None:
    h = _observed(action, LISTED)
    assert h.due(T0 + 25.0) == Blocked(2, ("bl.example",), 25.0, action)
    assert h.done


def test_an_observed_talker_the_lists_block_with_action_log_is_written_down_and_passed() -> None:
    h = _observed(DnsAction.LOG, LISTED)
    blocked = Blocked(2, ("bl.example",), 25.0, DnsAction.LOG)
    assert h.due(T0 + 25.0) == Logged(blocked, Pass(PassReason.DELAY, 25.0, 8))
    assert h.done


def test_an_observed_talker_the_lists_block_with_action_delay_waits_its_longer_hold() -> None:
    h = _observed(DnsAction.DELAY, LISTED)
    blocked = Blocked(2, ("bl.example",), 25.0, DnsAction.DELAY)
    assert h.due(T0 + 25.0) == Logged(blocked, Mute(T0 + 60.0))
    assert h.due(T0 + 60.0) == Pass(PassReason.DELAY, 60.0, 8)


def test_an_observed_talker_still_unjudged_at_the_delays_end_is_judged_by_the_answers_in() -> None:
    # An allow list has not answered: it counts as not listing, as for a silent client.
    h = _observed(DnsAction.DROP, DnsScore(2, ("bl.example",), ("wl.example",), (-2, 0)))
    assert h.due(T0 + 25.0) == Blocked(2, ("bl.example",), 25.0, DnsAction.DROP)


def test_a_client_delayed_by_the_lists_that_then_talks_is_observed_until_the_lists_wait_ends() -> (
    None
):
    h = hold(DnsAction.DELAY, observe=True)
    blocked = Blocked(2, ("bl.example",), 1.0, DnsAction.DELAY)
    assert h.listed(LISTED, T0 + 1.0) == Logged(blocked, Wait(T0 + 60.0))
    talk = EarlyTalk(8, b"EHLO x\r\n", 30.0)
    assert h.data(b"EHLO x\r\n", T0 + 30.0) == Logged(talk, Mute(T0 + 60.0))
    assert h.due(T0 + 60.0) == Pass(PassReason.DELAY, 60.0, 8)


# -- the options: parsers, settings, the configuration file -------------------------


def _parse_bl(text: str) -> DnsList:
    return dns_list("dnsbl", allow=False)(text)


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("zen.spamhaus.org", DnsList("zen.spamhaus.org")),
        ("Zen.Spamhaus.Org.", DnsList("zen.spamhaus.org")),
        ("bl.example*3", DnsList("bl.example", None, 3)),
        ("bl.example*-4", DnsList("bl.example", None, -4)),  # allowing, as in postscreen
        ("bl.example*0", DnsList("bl.example", None, 0)),
        (
            "zen.spamhaus.org=127.0.0.[2..11]*3",
            DnsList("zen.spamhaus.org", (((127, 127),), ((0, 0),), ((0, 0),), ((2, 11),)), 3),
        ),
        (
            "list.dnswl.org=127.0.[0..255].[1;2;3]",
            DnsList(
                "list.dnswl.org",
                (((127, 127),), ((0, 0),), ((0, 255),), ((1, 1), (2, 2), (3, 3))),
            ),
        ),
        (
            "wl.mailspike.net=127.0.0.[17;18..20]*2",
            DnsList(
                "wl.mailspike.net", (((127, 127),), ((0, 0),), ((0, 0),), ((17, 17), (18, 20))), 2
            ),
        ),
    ],
)
def test_dnsbl_entry_parses(text: str, entry: DnsList) -> None:
    assert _parse_bl(text) == entry
    assert _parse_bl(str(entry)) == entry  # what --check-config prints reads back


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("192.0.2.1", "not an address"),
        ("-bl.example", "host name label"),
        ("bl.example=127.0.0", "d.d.d.d"),
        ("bl.example=127.0.0.256", "0 to 255"),
        ("bl.example=127.0.0.[9..2]", "0 to 255"),
        ("bl.example=127.0.0.[]", "[N;N..M]"),
        ("bl.example=127.0.0.[1,2]", "[N;N..M]"),
        ("bl.example=127.0.0.2-5", "d.d.d.d"),
        ("bl.example*x", "whole number"),
        ("bl.example*1001", "-1000 to 1000"),
        ("a" * 60 + "." + "b" * 60 + "." + "c" * 60 + ".example", "longer than 189"),
    ],
)
def test_bad_dnsbl_entry_says_why(text: str, why: str) -> None:
    with pytest.raises(SettingError) as exc:
        _parse_bl(text)
    assert exc.value.option == "dnsbl"
    assert why in exc.value.reason


def test_dnswl_weight_is_positive_and_counts_against_the_score() -> None:
    parse = dns_list("dnswl", allow=True)
    assert parse("list.dnswl.org") == DnsList("list.dnswl.org", None, 1)
    assert parse("list.dnswl.org*3") == DnsList("list.dnswl.org", None, 3)
    with pytest.raises(SettingError, match=r"write \*3"):
        parse("list.dnswl.org*-3")
    with pytest.raises(SettingError, match="taken off"):
        parse("list.dnswl.org*0")
    s = Settings(dnsbl=(DnsList("bl.example", None, 2),), dnswl=(parse("wl.example*3"),))
    assert s.dns_lists() == (DnsList("bl.example", None, 2), DnsList("wl.example", None, -3))
    wl = ("wl.example",)
    assert score(s.dns_lists(), {"wl.example": ["127.0.0.2"]}) == DnsScore(-3, wl, allowing=wl)


@pytest.mark.parametrize(
    ("text", "resolver"),
    [
        ("127.0.0.1", Resolver("127.0.0.1", 53)),
        ("127.0.0.1:5353", Resolver("127.0.0.1", 5353)),
        ("::1", Resolver("::1", 53)),
        ("[::1]", Resolver("::1", 53)),
        ("[::1]:5353", Resolver("::1", 5353)),
    ],
)
def test_resolver_parses(text: str, resolver: Resolver) -> None:
    assert parse_resolver(text) == resolver
    assert parse_resolver(str(resolver)) == resolver


@pytest.mark.parametrize("text", ["dns.example", "dns.example:53", "127.0.0.1:0", "127.0.0.1:x"])
def test_bad_resolver_is_refused(text: str) -> None:
    with pytest.raises(SettingError) as exc:
        parse_resolver(text)
    assert exc.value.option == "resolver"


def test_policy_from_settings() -> None:
    assert Settings().dns_policy() is None  # no lists: no lookups, no DNS verdicts
    s = Settings(
        dnsbl=(DnsList("bl.example"),),
        dnsbl_threshold=3,
        dnswl_threshold=-2,
        dnsbl_action="delay",
        dnsbl_delay=90.0,
    )
    assert s.dns_policy() == DnsPolicy(-2, 3, DnsAction.DELAY, 90.0)


def test_the_file_takes_lists_and_a_resolver(
    tmp_path: Path,
) -> None:
    path = tmp_path / "repeld.toml"
    path.write_text(
        'backend = "127.0.0.1:10025"\n'
        'dnsbl = ["zen.spamhaus.org=127.0.0.[2..11]*3", "bl.example"]\n'
        'dnswl = ["list.dnswl.org=127.0.[0..255].[1..3]*2"]\n'
        'resolver = "127.0.0.1:5353"\n'
    )
    values = read_config(str(path))
    assert values["dnsbl"] == [
        DnsList("zen.spamhaus.org", (((127, 127),), ((0, 0),), ((0, 0),), ((2, 11),)), 3),
        DnsList("bl.example"),
    ]
    assert values["resolver"] == Resolver("127.0.0.1", 5353)
    settings = build_settings(values)
    assert settings.resolver == Resolver("127.0.0.1", 5353)
    assert settings.dns_timeout == 5.0
    assert settings.dns_policy() is not None
    assert [str(e) for e in settings.dns_lists()] == [
        "zen.spamhaus.org=127.0.0.[2..11]*3",
        "bl.example",
        "list.dnswl.org=127.0.[0..255].[1..3]*-2",
    ]


def test_dnsbl_delay_must_be_longer_than_the_delay() -> None:
    values = {"backend": Backend("127.0.0.1", 25), "dnsbl-action": "delay", "dnsbl-delay": 20.0}
    with pytest.raises(SettingError, match=r"longer than --delay \(25\)"):
        build_settings(values)
    assert build_settings({**values, "delay": 10.0}).dnsbl_delay == 20.0
    assert build_settings({**values, "dnsbl-action": "drop"}).dnsbl_delay == 20.0


@pytest.mark.parametrize(
    ("verdict", "remembered"),
    [
        (Pass(PassReason.DELAY, 25.0), True),
        (Pass(PassReason.DNSWL, 0.25), False),  # passed at once: showed no patience
        (Pass(PassReason.DELAY, 25.0, early_bytes=8), False),  # observe mode's talker
        (Pass(PassReason.CACHE, 0.25), False),  # remembered already
        (Pass(PassReason.TRUSTED, 0.0), False),
        (Pass(PassReason.NODELAY, 0.0), False),
    ],
)
def test_which_passes_the_cache_learns(verdict: Pass, remembered: bool) -> None:
    assert verdict.remembered is remembered


def test_the_answer_cache_keeps_each_answer_for_its_ttl() -> None:
    cache = AnswerCache()
    cache.put(("bl.test", "2.0.0.127.bl.test"), ("127.0.0.2",), 300, now=100.0)
    cache.put(("bl.test", "3.0.0.127.bl.test"), (), NEGATIVE_TTL, now=100.0)
    assert cache.get(("bl.test", "2.0.0.127.bl.test"), 399.9) == ("127.0.0.2",)
    assert cache.entry(("bl.test", "2.0.0.127.bl.test"), 399.9) == (400.0, ("127.0.0.2",))
    assert cache.get(("bl.test", "3.0.0.127.bl.test"), 100.0 + NEGATIVE_TTL - 0.1) == ()
    assert cache.get(("wl.test", "2.0.0.127.wl.test"), 100.0) is None  # per list
    assert cache.get(("bl.test", "2.0.0.127.bl.test"), 400.0) is None  # expired, and gone
    assert len(cache) == 1


def test_the_answer_cache_caps_the_ttl_and_skips_zero() -> None:
    cache = AnswerCache()
    cache.put(("bl.test", "a"), ("127.0.0.2",), 10 * MAX_TTL, now=0.0)
    cache.put(("bl.test", "b"), ("127.0.0.2",), 0, now=0.0)
    assert cache.get(("bl.test", "a"), MAX_TTL - 1) == ("127.0.0.2",)
    assert cache.get(("bl.test", "a"), MAX_TTL) is None
    assert cache.get(("bl.test", "b"), 0.0) is None


def test_the_answer_cache_is_bounded_oldest_out() -> None:
    cache = AnswerCache(size=2)
    for name in ("a", "b", "c"):
        cache.put(("bl.test", name), (), 60, now=0.0)
    assert len(cache) == 2
    assert cache.get(("bl.test", "a"), 1.0) is None
    assert cache.get(("bl.test", "c"), 1.0) == ()
    with pytest.raises(ValueError):
        AnswerCache(size=0)


def test_the_score_cache_keeps_a_score_by_address() -> None:
    scores = ScoreCache(size=2)
    scores.put("192.0.2.1", DnsScore(1, ("bl.test",)), 60, now=0.0)
    scores.put("192.0.2.2", score((DnsList("bl.test"),), {"bl.test": ()}), 60, now=0.0)
    assert scores.get("192.0.2.1", 59.9) == DnsScore(1, ("bl.test",))
    assert scores.get("192.0.2.2", 1.0) is UNLISTED  # one shared instance for most clients
    scores.put("192.0.2.3", UNLISTED, 60, now=1.0)
    assert scores.get("192.0.2.1", 2.0) is None  # the oldest went first
    assert scores.get("192.0.2.3", 61.0) is None


@given(st.ip_addresses())
@example(ipaddress.IPv6Address("64:ff9b::c000:201"))
@example(ipaddress.IPv6Address("::ffff:c000:201"))
def test_the_fast_reversal_is_the_reversal(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    if isinstance(ip, ipaddress.IPv4Address):
        expected = ".".join(reversed(str(ip).split(".")))
    elif ip.ipv4_mapped is not None:
        expected = ".".join(reversed(str(ip.ipv4_mapped).split(".")))
    elif ip in ipaddress.IPv6Network("64:ff9b::/96"):  # translated (RFC 6052): as IPv4
        expected = ".".join(reversed(str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)).split(".")))
    else:
        expected = ".".join(reversed(ip.exploded.replace(":", "")))
    assert reversed_address(str(ip)) == expected
    assert query_name(str(ip), "bl.test.") == expected + ".bl.test"


@pytest.mark.parametrize("text", ["1.2.3.256", "1.2.3", "1.2.3.4.5", "\u00b2.2.3.4", "bl.test"])
def test_a_non_address_has_no_reversal(text: str) -> None:
    with pytest.raises(ValueError):
        reversed_address(text)


@pytest.mark.parametrize(
    ("soa_ttl", "minimum", "kept"),
    [
        (3600, 600, 600.0),
        (300, 900, 300.0),
        (3600, 10, NEGATIVE_TTL),
        (0, 0, NEGATIVE_TTL),
        (None, None, NEGATIVE_TTL),
        (86400, 86400, 86400.0),  # TtlCache.put caps it at MAX_TTL
    ],
)
def test_not_listed_is_kept_for_the_negative_ttl_of_the_soa(
    soa_ttl: int | None, minimum: int | None, kept: float
) -> None:
    assert negative_ttl(soa_ttl, minimum) == kept


# -- partial answers: deciding as soon as the answers settle the outcome ----------

BL2 = (DnsList("bl.example"), DnsList("bl2.example"), DnsList("wl.example", None, -5))


@pytest.mark.parametrize(
    ("answers", "pending", "settled"),
    [
        # listed with weight 1 while only a +1 list is pending: blocked now
        ({"bl.example": ["127.0.0.2"]}, ["bl2.example"], Judgement.BLOCK),
        # allowed with -5 while only a +1 list is pending: allowed now
        ({"wl.example": ["127.0.0.2"]}, ["bl2.example"], Judgement.ALLOW),
        # allowed with -5, two +1 lists pending: -3 at most, still allowed
        ({"wl.example": ["127.0.0.2"]}, ["bl.example", "bl2.example"], Judgement.ALLOW),
        # listed with 1 while the -5 list is pending: it could still allow
        ({"bl.example": ["127.0.0.2"]}, ["wl.example"], None),
        # nothing yet, every list pending
        ({}, ["bl.example", "bl2.example", "wl.example"], None),
        # clear on both block lists, the allow list pending: allow or neither
        ({"bl.example": [], "bl2.example": []}, ["wl.example"], None),
        # clear on the allow list and one block list, the other pending
        ({"bl.example": [], "wl.example": []}, ["bl2.example"], None),
        # every list answered: the plain judgement
        ({"bl.example": [], "bl2.example": [], "wl.example": []}, [], Judgement.NEITHER),
    ],
)
def test_settled(answers: dict[str, list[str]], pending: list[str], settled: Judgement) -> None:
    result = score(BL2, answers, pending, pending)
    assert DnsPolicy().settled(result) is settled


def test_a_wide_margin_settles_neither() -> None:
    policy = DnsPolicy(allow_threshold=-10, block_threshold=10)
    result = score(BL2, {"wl.example": []}, ["bl.example"], ["bl.example"])
    assert result.reach == (0, 1)
    assert policy.settled(result) is Judgement.NEITHER


def test_reach_sums_the_weights_of_the_pending_entries_by_sign() -> None:
    lists = (DnsList("wl.example", None, -3), DnsList("wl.example", None, 2), *BL2)
    assert reach(lists, ["wl.example"]) == (-8, 2)
    assert reach(lists, []) == (0, 0)


def test_a_listing_while_another_list_is_pending_blocks_at_once() -> None:
    h = hold()
    partial = score(BL2[:2], {"bl.example": ["127.0.0.2"]}, ["bl2.example"], ["bl2.example"])
    assert h.listed(partial, T0 + 0.0625) == Blocked(1, ("bl.example",), 0.0625, DnsAction.DROP)
    assert h.dns_result is not None and h.dns_result.missing == ("bl2.example",)


def test_an_unsettled_answer_holds_on_and_the_next_one_decides() -> None:
    h = hold()
    partial = score(BL2, {"bl.example": ["127.0.0.2"]}, ["wl.example"], ["wl.example"])
    assert h.listed(partial, T0 + 0.0625) == Wait(T0 + 25.0)
    assert h.awaiting_dns
    final = score(BL2, {"bl.example": ["127.0.0.2"], "wl.example": []})
    assert h.listed(final, T0 + 0.125) == Blocked(1, ("bl.example",), 0.125, DnsAction.DROP)


@pytest.mark.parametrize(
    ("action", "verdict"),
    [
        (DnsAction.DROP, Blocked(1, ("bl.example",), 25.0, DnsAction.DROP)),
        (
            DnsAction.LOG,
            Logged(Blocked(1, ("bl.example",), 25.0, DnsAction.LOG), Pass(PassReason.DELAY, 25.0)),
        ),
        (
            DnsAction.DELAY,
            Logged(Blocked(1, ("bl.example",), 25.0, DnsAction.DELAY), Wait(T0 + 60.0)),
        ),
    ],
)
def test_at_the_end_of_the_delay_the_answers_received_decide(
    action: DnsAction, verdict: object
) -> None:
    h = hold(action)
    partial = score(BL2, {"bl.example": ["127.0.0.2"]}, ["wl.example"], ["wl.example"])
    h.listed(partial, T0 + 0.0625)
    assert h.silence(T0 + 25.0) == verdict
    assert not h.awaiting_dns or not h.done


def test_a_silent_list_is_no_listing_at_the_end_of_the_delay() -> None:
    h = hold()
    partial = score(BL2, {"bl.example": [], "bl2.example": []}, ["wl.example"], ["wl.example"])
    assert h.listed(partial, T0 + 0.0625) == Wait(T0 + 25.0)
    assert h.silence(T0 + 25.0) == Pass(PassReason.DELAY, 25.0)


def test_answers_after_the_outcome_settled_are_kept_for_the_events() -> None:
    h = hold()
    partial = score(BL2, {"bl.example": [], "wl.example": []}, ["bl2.example"], ["bl2.example"])
    assert h.listed(partial, T0 + 0.0625) == Wait(T0 + 25.0)  # neither, whatever bl2 says
    final = score(BL2, {"bl.example": [], "wl.example": [], "bl2.example": []})
    assert h.awaiting_dns
    assert h.listed(final, T0 + 0.125) == Wait(T0 + 25.0)
    assert h.dns_result == final and not h.awaiting_dns


# -- a list that lists everyone -----------------------------------------------------


def test_the_watch_raises_the_alarm_once_when_a_list_lists_nearly_everyone() -> None:
    watch = ListWatch()
    alarms = [watch.seen("bl.example", i % 2 == 0) for i in range(WATCH_WINDOW)]
    assert alarms == [None] * WATCH_WINDOW  # half listed: a busy list, no alarm
    alarms = [watch.seen("bl.example", True) for _ in range(WATCH_WINDOW)]
    raised = [a for a in alarms if a is not None]
    assert raised == [WATCH_ALARM]  # once, as the share reaches the mark
    assert watch.seen("wl.example", True) is None  # each list on its own
    for _ in range(WATCH_WINDOW):  # back to normal: the alarm is armed again
        assert watch.seen("bl.example", False) is None
    alarms = [watch.seen("bl.example", True) for _ in range(WATCH_WINDOW)]
    assert [a for a in alarms if a is not None] == [WATCH_ALARM]


# -- any sequence the shell may feed: never a crash, always a verdict ---------------

_RESULTS = st.builds(
    DnsScore,
    st.integers(-6, 6),
    st.sampled_from([(), ("bl.example",)]),
    st.sampled_from([(), ("bl2.example",)]),
    st.sampled_from([(0, 0), (0, 1), (-5, 0), (-5, 2)]),
)
_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["data", "eof", "reset", "silence", "due", "good", "bad", "unknown"])
        | st.just("listed"),
        st.floats(0.0, 3.0),
        _RESULTS,
    ),
    max_size=12,
)


def _final(verdict: object) -> bool:
    while isinstance(verdict, Logged):
        verdict = verdict.then
    return not isinstance(verdict, (Wait, Mute))


@settings(max_examples=400)
@given(
    _STEPS,
    st.sampled_from(list(DnsAction)),
    st.booleans(),
    st.booleans(),
)
def test_any_sequence_of_what_the_shell_may_feed_gives_verdicts(
    steps: list[tuple[str, float, DnsScore]], action: DnsAction, pending: bool, observe: bool
) -> None:
    """The shell feeds a hold only what its state awaits (as shell/pen.py and
    server.py do); whatever the order and the lists' answers, the hold answers
    with a verdict, never an exception, and is done exactly when one is final."""
    h = Hold(T0, 10.0, dns=DnsPolicy(action=action, block_delay=20.0), cache_pending=pending,
             observe=observe)  # fmt: skip
    now = T0
    for name, dt, result in steps:
        if h.done:
            break
        now += dt
        if name in ("good", "bad", "unknown"):
            if not h.awaiting_cache:
                continue
            call = {"good": h.remembered_good, "bad": h.remembered_bad, "unknown": h.unknown}
            verdict = call[name](now)
        elif name == "listed":
            if not h.awaiting_dns:
                continue
            verdict = h.listed(result, now)
        elif name == "data":
            if h.muted:
                continue
            verdict = h.data(b"EHLO x\r\n", now)
        elif name == "silence":
            if h.muted:
                continue
            verdict = h.silence(now)
        elif name == "due":
            if not h.muted:
                continue
            verdict = h.due(now)
        else:
            verdict = h.eof(now) if name == "eof" else h.reset(now)
        assert _final(verdict) is h.done, (name, verdict)

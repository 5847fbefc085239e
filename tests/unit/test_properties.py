"""Property-based tests (hypothesis) for everything that sees untrusted or operator input.

Whatever a client sends, whatever an operator types or writes in a file, the
pure code answers in its own terms: one verdict, a printable escape, a header
that decodes back, a log line that parses back, a value or a SettingError, a
configuration or a ConfigError. Never another exception.
"""

from __future__ import annotations

import ipaddress
import re
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repeld.config.errors import ConfigError, SettingError
from repeld.config.file import load_settings, read_config
from repeld.config.options import OPTIONS
from repeld.config.values import dns_list
from repeld.core import events
from repeld.core.addresses import cache_key
from repeld.core.dnsbl import DnsAction, DnsList, DnsPolicy, DnsScore, ReplyFilter
from repeld.core.events import ConnInfo
from repeld.core.hold import (
    PEEK_LIMIT,
    Blocked,
    EarlyTalk,
    HangUp,
    Hold,
    LocalProtocolError,
    Logged,
    Mute,
    Pass,
    Penalty,
    Wait,
    escape_bytes,
)
from repeld.core.logformat import Header, format_json, format_rfc5424
from repeld.core.proxyproto import V2_SIGNATURE, v1, v2

from ..syslog_receiver import parse

# No example database: nothing is written into the work tree.
FAST = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# -- the hold table -------------------------------------------------------------------

_STEP = st.one_of(
    st.tuples(st.just("data"), st.binary(min_size=1, max_size=2 * PEEK_LIMIT)),
    st.tuples(st.just("eof"), st.none()),
    st.tuples(st.just("reset"), st.none()),
    st.tuples(st.just("good"), st.none()),
    st.tuples(st.just("bad"), st.none()),
    st.tuples(st.just("unknown"), st.none()),
    st.tuples(st.just("due"), st.none()),
    st.tuples(st.just("silence"), st.none()),
    st.tuples(st.just("listed"), st.integers(min_value=-3, max_value=3)),
)


def _step(hold: Hold, kind: str, payload: bytes | int | None, now: float) -> object:
    if kind == "data":
        assert isinstance(payload, bytes)
        return hold.data(payload, now)
    if kind == "listed":
        assert isinstance(payload, int)
        return hold.listed(DnsScore(payload, ("bl.example",) if payload else ()), now)
    return {
        "eof": hold.eof,
        "reset": hold.reset,
        "good": hold.remembered_good,
        "bad": hold.remembered_bad,
        "unknown": hold.unknown,
        "due": hold.due,
        "silence": hold.silence,
    }[kind](now)


@FAST
@given(
    delay=st.floats(min_value=0, max_value=3600, allow_nan=False),
    cache_pending=st.booleans(),
    observe=st.booleans(),
    dns=st.one_of(
        st.none(),
        st.builds(
            DnsPolicy,
            st.just(-1),
            st.just(1),
            st.sampled_from(DnsAction),
            st.floats(min_value=0, max_value=7200, allow_nan=False),
        ),
    ),
    steps=st.lists(
        st.tuples(_STEP, st.floats(min_value=0, max_value=10_000, allow_nan=False)),
        min_size=1,
        max_size=20,
    ),
)
def test_any_inputs_give_exactly_one_final_verdict_then_local_protocol_error(
    delay: float,
    cache_pending: bool,
    observe: bool,
    dns: DnsPolicy | None,
    steps: list[tuple[tuple[str, bytes | int | None], float]],
) -> None:
    """Whatever the shell feeds, in any order: at most one final verdict, every
    input after it is refused, and an input the state does not take (a cache
    answer not awaited, silence for a muted talker) is refused without effect."""
    hold = Hold(100.0, delay, cache_pending=cache_pending, observe=observe, dns=dns)
    finals = 0
    now = 100.0
    for (kind, payload), advance in steps:
        now += advance
        if finals:
            with pytest.raises(LocalProtocolError):
                _step(hold, kind, payload, now)
            continue
        try:
            verdict = _step(hold, kind, payload, now)
        except LocalProtocolError:
            assert not hold.done
            continue
        while isinstance(verdict, Logged):
            if isinstance(verdict.note, Blocked):  # --dnsbl-action log or delay
                assert verdict.note.action in (DnsAction.LOG, DnsAction.DELAY)
            else:
                assert observe
            verdict = verdict.then
        if isinstance(verdict, Wait | Mute):
            assert not hold.done
            assert verdict.deadline >= hold.accepted_at
            continue
        assert isinstance(verdict, Pass | EarlyTalk | HangUp | Penalty | Blocked)
        if isinstance(verdict, Blocked):
            assert dns is not None and verdict.action in (DnsAction.DROP, DnsAction.REJECT)
        assert verdict.elapsed >= 0
        if isinstance(verdict, EarlyTalk):
            assert not observe
            assert len(verdict.first) <= PEEK_LIMIT and verdict.nbytes >= len(verdict.first)
        assert hold.done
        finals += 1
    assert finals <= 1


# -- escape_bytes -----------------------------------------------------------------------

_ESCAPE = re.compile(r"\\(x[0-9a-f]{2}|r|n|\\)|([ -~])")


def _unescape(text: str) -> bytes:
    out = bytearray()
    pos = 0
    while pos < len(text):
        m = _ESCAPE.match(text, pos)
        assert m is not None, f"a cut or unknown escape at {pos} in {text!r}"
        esc, plain = m.groups()
        if plain is not None:
            assert plain != "\\"
            out += plain.encode("ascii")
        elif esc == "r":
            out += b"\r"
        elif esc == "n":
            out += b"\n"
        elif esc == "\\":
            out += b"\\"
        else:
            out.append(int(esc[1:], 16))
        pos = m.end()
    return bytes(out)


@FAST
@given(data=st.binary(max_size=600), limit=st.integers(min_value=0, max_value=400))
def test_escape_bytes_is_printable_bounded_whole_and_round_trips(data: bytes, limit: int) -> None:
    text = escape_bytes(data, limit)
    assert len(text) <= limit
    assert all(" " <= c <= "~" for c in text)
    back = _unescape(text)  # also: no escape is cut in half
    assert data.startswith(back)
    if len(back) < len(data):  # cut only because the next piece did not fit
        assert len(text) + len(escape_bytes(data[len(back) : len(back) + 1], 4)) > limit


@FAST
@given(data=st.binary(max_size=300))
def test_escape_bytes_keeps_everything_that_fits(data: bytes) -> None:
    assert _unescape(escape_bytes(data, 4 * len(data))) == data


# -- PROXY headers ------------------------------------------------------------------------

_PORT = st.integers(min_value=0, max_value=65535)
_V4 = st.ip_addresses(v=4).map(str)
# v4-mapped addresses come from the kernel as `::ffff:a.b.c.d` (normalised to IPv4 by
# the shell); ipaddress prints them in hex, a spelling accept() never gives.
_V6 = (
    st.ip_addresses(v=6)
    .map(str)
    .filter(
        lambda ip: (
            "." not in str(ipaddress.ip_address(ip))
            and ipaddress.IPv6Address(ip).ipv4_mapped is None
        )
    )
)
_MAPPED = _V4.map(lambda a: f"::ffff:{a}")


def _decode_v2(header: bytes) -> tuple[str, int, str, int]:
    assert header.startswith(V2_SIGNATURE)
    ver_cmd, fam, length = struct.unpack("!BBH", header[12:16])
    body = header[16:]
    assert ver_cmd == 0x21 and len(body) == length
    size = 4 if fam == 0x11 else 16
    assert fam in (0x11, 0x21) and length == 2 * size + 4
    src = ipaddress.ip_address(body[:size])
    dst = ipaddress.ip_address(body[size : 2 * size])
    sport, dport = struct.unpack("!HH", body[2 * size :])
    return str(src), sport, str(dst), dport


def _decode_v1(header: bytes) -> tuple[str, int, str, int]:
    assert header.endswith(b"\r\n") and len(header) <= 107  # the spec's bound
    proto, src, dst, sport, dport = header[:-2].decode("ascii").split(" ")[1:]
    assert proto in ("TCP4", "TCP6")
    return src, int(sport), dst, int(dport)


def _normal(address: str) -> str:
    return str(ipaddress.ip_address(address.removeprefix("::ffff:")))


@FAST
@given(
    pair=st.one_of(
        st.tuples(_V4, _V4), st.tuples(_V6, _V6), st.tuples(_MAPPED, _V4), st.tuples(_V4, _V6)
    ),
    sport=_PORT,
    dport=_PORT,
)
def test_proxy_headers_decode_back_to_the_addresses(
    pair: tuple[str, str], sport: int, dport: int
) -> None:
    client, server = pair
    want = (_normal(client), sport, _normal(server), dport)
    # a v4-mapped IPv6 address is sent as IPv4; a mixed pair as IPv6, its IPv4 end
    # mapped (as HAProxy sends it: never UNKNOWN or LOCAL for a client)
    mixed = (":" in want[0]) != (":" in want[2])
    if mixed:
        line, binary = v1(client, sport, server, dport), v2(client, sport, server, dport)
        assert line.startswith(b"PROXY TCP6 ") and binary[13] == 0x21
        for got in (_decode_v1(line), _decode_v2(binary)):
            assert (_unmapped(got[0]), got[1], _unmapped(got[2]), got[3]) == want
        return
    assert _decode_v1(v1(client, sport, server, dport)) == want
    assert _decode_v2(v2(client, sport, server, dport)) == want


def _unmapped(address: str) -> str:
    ip = ipaddress.ip_address(address)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped if mapped is not None else ip)


# -- log formatters -----------------------------------------------------------------------

HEADER = Header(facility=2, hostname="mx1.example.org", app_name="repeld", procid=4242,
                sd_id="repeld@32473")  # fmt: skip


@FAST
@given(
    first=st.binary(min_size=1, max_size=PEEK_LIMIT),
    client=st.one_of(_V4, _V6),
    port=_PORT,
    elapsed=st.floats(min_value=0, max_value=3600, allow_nan=False),
    now=st.floats(min_value=0, max_value=4e9, allow_nan=False),
)
def test_every_record_parses_back_whatever_the_client_sent(
    first: bytes, client: str, port: int, elapsed: float, now: float
) -> None:
    conn = ConnInfo(client, port, "192.0.2.1", 25)
    verdict = EarlyTalk(len(first), first, elapsed)
    event = events.early_talker(conn, verdict, "drop")
    for line in (format_rfc5424(event, HEADER, now), format_json(event, HEADER, now)):
        got = parse(line)
        assert got.event == "early-talker"
        assert got.fields["client"] == client
        assert got.fields["first"] == escape_bytes(first)
        assert got.fields["bytes"] == str(len(first))


def _sd_reference(value: object) -> str:
    # RFC 5424 6.3.3: '"', '\\' and ']' escaped with a backslash; nothing else.
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


_NAME = st.from_regex(r"[!#-<>-\\^-~]{1,32}", fullmatch=True)  # SD-NAME (RFC 5424 6.3.2)
_VALUE = st.one_of(st.text(max_size=40), st.integers(), st.floats(allow_nan=False))


@FAST
@given(fields=st.lists(st.tuples(_NAME, _VALUE), min_size=1, max_size=12))
def test_structured_data_is_each_value_escaped_under_its_name(
    fields: list[tuple[str, str | int | float]],
) -> None:
    # The writer formats values with one template per list of names
    # (core/logformat.py); the plain way, pair by pair, is the reference.
    event = events.Event.of("stats", events.Severity.INFO, tuple(fields), "S")
    params = " ".join(f'{k}="{_sd_reference(v)}"' for k, v in fields)
    want = f" stats [repeld@32473 {params}] S".encode("utf-8", "backslashreplace")
    assert format_rfc5424(event, HEADER, 1700000000.25).endswith(want)


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_RANGES = st.lists(
    st.tuples(st.integers(0, 255), st.integers(0, 255)).map(lambda r: (min(r), max(r))),
    min_size=1,
    max_size=4,
).map(tuple)


@FAST
@given(
    labels=st.lists(_LABEL, min_size=2, max_size=5),
    reply_filter=st.one_of(st.none(), st.tuples(_RANGES, _RANGES, _RANGES, _RANGES)),
    weight=st.integers(-1000, 1000),
)
def test_a_dns_list_entry_reads_back_what_check_config_prints(
    labels: list[str],
    reply_filter: ReplyFilter | None,
    weight: int,
) -> None:
    """str() of any entry parses back to the same entry (--check-config's output is
    a configuration), and the entry matches exactly the replies its filter covers."""
    domain = ".".join(labels)
    if domain.replace(".", "").isdigit():
        return  # all digits: an address, refused as a domain
    entry = DnsList(domain, reply_filter, weight)
    assert dns_list("dnsbl", allow=False)(str(entry)) == entry
    if reply_filter is not None:
        low = ".".join(str(octet[0][0]) for octet in reply_filter)
        assert entry.matches([low])


# -- option parsers -------------------------------------------------------------------------

_TEXT = st.one_of(
    st.text(max_size=80),
    st.from_regex(r"\[?[0-9a-fA-F:.]{0,40}\]?(:[0-9]{0,6})?(,[a-z=:0-9.]{0,20})?", fullmatch=True),
    st.from_regex(r"(udp|tcp|redis|rediss)://[^\s]{0,60}", fullmatch=True),
    st.from_regex(r"[0-9./]{0,30}", fullmatch=True),
    # DNS list entries: DOMAIN[=FILTER][*WEIGHT], near misses included.
    st.from_regex(r"[a-z0-9.-]{0,20}(=[0-9.\[\];]{0,30})?(\*-?[0-9]{0,5})?", fullmatch=True),
)
PARSED = [opt for opt in OPTIONS if opt.parse is not None]


@pytest.mark.parametrize("opt", PARSED, ids=lambda opt: opt.name)
@settings(max_examples=60, deadline=None, database=None)
@given(text=_TEXT)
def test_an_option_value_parses_or_raises_setting_error(opt, text: str) -> None:  # type: ignore[no-untyped-def]
    try:
        opt.parse(text)
    except SettingError as exc:
        assert exc.option and exc.reason
        assert "\n" not in str(exc).replace("\\n", "")


# -- the TOML loader ----------------------------------------------------------------------------

_TOML_BITS = st.sampled_from(
    [b"backend = ", b"listen = ", b"trusted = ", b"delay = ", b"[", b"]", b"{", b"}", b'"',
     b"'", b"=", b"\n", b",", b"1", b"2.5", b"true", b"x", b"\xff", b"#", b"\\", b"[[", b"a.b"]
)  # fmt: skip
_TOML = st.one_of(st.binary(max_size=300), st.lists(_TOML_BITS, max_size=60).map(b"".join))


@settings(max_examples=300, deadline=None, database=None)
@given(content=_TOML)
def test_any_file_content_gives_settings_or_config_error(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "repeld.toml"
        path.write_bytes(content)
        try:
            read_config(str(path))
        except ConfigError as exc:
            assert exc.problems and all("\n" not in p for p in exc.problems)
        try:
            load_settings({}, str(path), explicit=True)
        except ConfigError as exc:
            assert exc.problems


_WKP = ipaddress.IPv6Network("64:ff9b::/96")


def _key_by_ipaddress(address: str, prefix: int) -> str:
    # cache_key as it was written before its fast path (the keys stored in caches),
    # IPv4 clients a translator shows in the well-known prefix keyed as IPv4.
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip in _WKP:
        return str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return str(ipaddress.IPv6Network((ip, prefix), strict=False))


_V6_SHAPES = st.sampled_from(["compressed", "exploded", "upper"])


@settings(max_examples=3000)
@given(
    value=st.one_of(
        st.integers(min_value=0, max_value=2**128 - 1),
        st.integers(min_value=0, max_value=2**48 - 1),  # ::a.b.c.d, ::ffff:..., zeros
        st.integers(min_value=0, max_value=2**32 - 1).map(lambda v: v | 0xFFFF << 32),
        st.integers(min_value=0, max_value=2**33 - 1).map(lambda v: v ^ int(_WKP[0])),
        st.integers(min_value=0, max_value=2**64 - 1).map(lambda v: v << 64),
    ),
    prefix=st.integers(min_value=32, max_value=128),
    shape=_V6_SHAPES,
)
def test_the_cache_key_of_an_ipv6_address_is_what_ipaddress_writes(
    value: int, prefix: int, shape: str
) -> None:
    # The keys are stored in SQLite and Redis: the fast path (inet_pton and
    # inet_ntop) must write them exactly as ipaddress did, or a remembered
    # client is remembered no more.
    ip = ipaddress.IPv6Address(value)
    text = {"compressed": ip.compressed, "exploded": ip.exploded, "upper": str(ip).upper()}[shape]
    assert cache_key(text, prefix) == _key_by_ipaddress(text, prefix)


@settings(max_examples=3000)
@given(
    text=st.text(alphabet="0123456789abcdefABCDEF:", max_size=45),
    prefix=st.integers(min_value=32, max_value=128),
)
def test_a_spelling_the_fast_ipv6_path_takes_is_one_ipaddress_takes_too(
    text: str, prefix: int
) -> None:
    # The fast path must refuse (to ipaddress, which raises) whatever ipaddress
    # refuses: otherwise a string that was no address would now be keyed.
    try:
        expected: str | None = _key_by_ipaddress(text, prefix)
    except ValueError:
        expected = None
    try:
        got: str | None = cache_key(text, prefix)
    except ValueError:
        got = None
    assert got == expected

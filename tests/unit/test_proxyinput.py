"""PROXY protocol input (core/proxyinput.py): tables, every split, and properties.

The real examples are the exact bytes HAProxy 2.6 (`send-proxy-v2`,
`check-send-proxy`, `proxy-v2-options crc32c,unique-id`) and nginx 1.22
(`stream`, `proxy_protocol on`) sent to a loopback listener, as
tests/system/test_balancers.py captures them again on every run; the AWS NLB
one follows AWS's documented layout of its VPC endpoint TLV. The properties
also read every generated header with aiosmtpd's parser, an independent
implementation, which must find the same endpoints and the same end.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from typing import Any

import pytest
from aiosmtpd.proxy_protocol import get_proxy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repeld.core.addresses import normalize_address
from repeld.core.proxyinput import (
    MAX_HEADER,
    V1_MAX,
    V2_MAX,
    Local,
    NeedMore,
    Proxied,
    ProxyError,
    ProxyFamily,
    ProxyReason,
    Result,
    Tlv,
    crc32c,
    parse,
)
from repeld.core.proxyproto import V2_SIGNATURE, v1, v2

TRAILER = b"EHLO after.header\r\n"
SIG = V2_SIGNATURE
TCP4, TCP6 = ProxyFamily.TCP4, ProxyFamily.TCP6

FAST = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def build_v2(ver_cmd: int, fam: int, block: bytes, tlvs: bytes = b"", crc: bool = False) -> bytes:
    """A v2 header by hand: signature, version/command, family, length, addresses, TLVs
    (and a CRC32C TLV last, computed as proxy-protocol.txt 2.2.3 says, when `crc`)."""
    body = block + tlvs + (tlv(0x03, bytes(4)) if crc else b"")
    head = SIG + struct.pack("!BBH", ver_cmd, fam, len(body)) + body
    if crc:
        head = head[:-4] + crc32c(head).to_bytes(4, "big")
    return head


def v4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


def v6_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (
        ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )


AWS_VPCE = tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9")
SSL = tlv(
    0x20,
    b"\x01" + bytes(4)  # client: SSL, verify: 0
    + tlv(0x21, b"TLSv1.3")
    + tlv(0x22, b"mx.example.org")
    + tlv(0x23, b"TLS_AES_256_GCM_SHA384")
    + tlv(0x24, b"RSA-SHA256")
    + tlv(0x25, b"RSA2048"),
)  # fmt: skip

# -- valid headers ------------------------------------------------------------------

VALID: list[tuple[str, bytes, Result | None]] = [
    # nginx 1.22 stream, proxy_protocol on (v1)
    ("nginx tcp4", b"PROXY TCP4 127.0.0.9 127.0.0.1 44871 47011\r\n",
     Proxied(1, 44, TCP4, "127.0.0.9", 44871, "127.0.0.1", 47011)),
    ("nginx tcp6", b"PROXY TCP6 ::1 ::1 43334 47011\r\n",
     Proxied(1, 32, TCP6, "::1", 43334, "::1", 47011)),
    # HAProxy 2.6 send-proxy-v2, a relayed client
    ("haproxy tcp4",
     SIG + b"!\x11\x00\x0c\x7f\x00\x00\t\x7f\x00\x00\x01\xc3\xad\xb7\x99",
     Proxied(2, 28, TCP4, "127.0.0.9", 50093, "127.0.0.1", 47001)),
    # HAProxy 2.6 check-send-proxy with send-proxy-v2: the health check is LOCAL
    ("haproxy check", SIG + b" \x00\x00\x00", Local(2, 16)),
    # ... and with proxy-v2-options crc32c
    ("haproxy check crc32c", SIG + b" \x00\x00\x07\x03\x00\x04\xa9\xb8~\x8f",
     Local(2, 23, (Tlv(3, b"\xa9\xb8~\x8f"),))),
    # HAProxy 2.6, proxy-v2-options crc32c,unique-id, an IPv6 client
    ("haproxy tcp6 crc32c unique-id",
     SIG + b"!!\x00." + bytes(15) + b"\x01" + bytes(15) + b"\x01\xcc\x10\xb7\x99"
     + b"\x03\x00\x04\xe3\xd5\xf1\x80\x05\x00\x00",
     Proxied(2, 62, TCP6, "::1", 52240, "::1", 47001,
             (Tlv(3, b"\xe3\xd5\xf1\x80"), Tlv(5, b"")))),
    # AWS NLB through a PrivateLink endpoint: the VPC endpoint id TLV
    ("aws nlb vpce",
     build_v2(0x21, 0x11, v4_block("198.51.100.22", "10.0.0.5", 41234, 25), AWS_VPCE),
     Proxied(2, 54, TCP4, "198.51.100.22", 41234, "10.0.0.5", 25,
             (Tlv(0xEA, b"\x01vpce-08d2bf15fac5001c9"),))),
    ("ssl, alpn, authority, noop, netns, crc32c",
     build_v2(0x21, 0x21, v6_block("2001:db8::7", "2001:db8::25", 1, 465),
              tlv(1, b"smtp") + tlv(2, b"mx.example.org") + tlv(4, bytes(3)) + SSL
              + tlv(0x30, b"blue"), crc=True),
     None),  # checked below by its fields
    # the worst case of the spec, exactly 107 bytes
    ("v1 unknown worst case",
     b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n",
     Local(1, 107)),
    ("v1 unknown short", b"PROXY UNKNOWN\r\n", Local(1, 15)),
    ("v1 tcp6 longest",
     b"PROXY TCP6 " + b"ffff:" * 7 + b"ffff " + b"FFFF:" * 7 + b"FFFF 65535 65535\r\n",
     Proxied(1, 104, TCP6, ":".join(["ffff"] * 8), 65535, ":".join(["ffff"] * 8), 65535)),
    ("v1 zero ports", b"PROXY TCP4 0.0.0.0 255.255.255.255 0 0\r\n",
     Proxied(1, 40, TCP4, "0.0.0.0", 0, "255.255.255.255", 0)),
    # IPv4-mapped addresses are the IPv4 client, as for a socket peer
    ("v1 mapped", b"PROXY TCP6 ::ffff:192.0.2.7 ::FFFF:10.0.0.1 40000 25\r\n",
     Proxied(1, 54, TCP6, "192.0.2.7", 40000, "10.0.0.1", 25)),
    ("v2 mapped", build_v2(0x21, 0x21, v6_block("::ffff:192.0.2.7", "2001:db8::1", 5, 25)),
     Proxied(2, 52, TCP6, "192.0.2.7", 5, "2001:db8::1", 25)),
    ("v1 uncompressed tcp6", b"PROXY TCP6 2001:0db8:0:0:0:0:0:0001 ::1 1 2\r\n",
     Proxied(1, 45, TCP6, "2001:db8::1", 1, "::1", 2)),
    # LOCAL with an address block: the block is skipped, the TLVs after it read
    ("v2 local with addresses",
     build_v2(0x20, 0x11, v4_block("10.0.0.1", "10.0.0.2", 1, 2), tlv(4, b"")),
     Local(2, 31, (Tlv(4, b""),))),
    ("v2 local unix", build_v2(0x20, 0x31, bytes(216)), Local(2, 232)),
    # LOCAL: "discard the protocol block including the family" (proxy-protocol.txt)
    ("v2 local, a family and no block", SIG + b"\x20\x11\x00\x00", Local(2, 16)),
    ("v2 local, an unknown family", SIG + b"\x20\x44\x00\x03" + bytes(3), Local(2, 19)),
    ("v2 at the bound",
     build_v2(0x21, 0x11, v4_block("192.0.2.1", "192.0.2.2", 3, 4),
              tlv(0xE0, bytes(V2_MAX - 16 - 12 - 3))),
     Proxied(2, V2_MAX, TCP4, "192.0.2.1", 3, "192.0.2.2", 4,
             (Tlv(0xE0, bytes(V2_MAX - 31)),))),
]  # fmt: skip


@pytest.mark.parametrize(("name", "data", "expected"), VALID, ids=[v[0] for v in VALID])
def test_valid(name: str, data: bytes, expected: Result | None) -> None:
    found = parse(data + TRAILER)
    assert not isinstance(found, (NeedMore, ProxyError)), found
    assert found.length == len(data)  # the header ends exactly where the client's bytes begin
    if expected is not None:
        assert found == expected
    assert found.local is isinstance(found, Local)
    assert parse(data) == found  # nothing needed past the header


def test_all_tlvs() -> None:
    data = dict((v[0], v[1]) for v in VALID)["ssl, alpn, authority, noop, netns, crc32c"]
    found = parse(data)
    assert isinstance(found, Proxied)
    assert (found.source, found.source_port, found.destination, found.destination_port) == (
        "2001:db8::7",
        1,
        "2001:db8::25",
        465,
    )
    assert [t.type for t in found.tlvs] == [0x01, 0x02, 0x04, 0x20, 0x30, 0x03]
    assert found.tlvs[3].value[5:15] == tlv(0x21, b"TLSv1.3")  # sub-TLVs kept, unread


@pytest.mark.parametrize(("name", "data", "expected"), VALID, ids=[v[0] for v in VALID])
def test_valid_split_everywhere(name: str, data: bytes, expected: Result | None) -> None:
    """Fed a growing prefix, one byte more each time: NeedMore up to the last byte,
    the same header from then on, whatever follows."""
    whole = parse(data + TRAILER)
    stream = data + TRAILER
    for cut in range(len(stream) + 1):
        found = parse(stream[:cut])
        if cut < len(data):
            assert isinstance(found, NeedMore), (cut, found)
            assert cut < found.wanted <= len(data)
        else:
            assert found == whole, cut


# -- errors --------------------------------------------------------------------------

R = ProxyReason
ERRORS: list[tuple[bytes, ProxyReason]] = [
    (b"EHLO bot.example\r\n", R.NOT_PROXY),
    (b"GET / HTTP/1.0\r\n\r\n", R.NOT_PROXY),
    (b"\x16\x03\x01\x02\x00", R.NOT_PROXY),  # a TLS ClientHello
    (b"PROXX TCP4", R.NOT_PROXY),
    (b"PROXY\tTCP4", R.NOT_PROXY),
    (b"proxy TCP4 1.2.3.4 1.2.3.5 1 2\r\n", R.NOT_PROXY),
    (SIG[:6] + b"\n", R.NOT_PROXY),
    (b"\r\n\r\n\x00\r\nQUIZ\n", R.NOT_PROXY),
    # v1
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2\n", R.MALFORMED_V1),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2\r\r\n", R.MALFORMED_V1),
    (b"PROXY TCP4 1.2.3.4\r1.2.3.5 1 2\r\n", R.MALFORMED_V1),
    (b"PROXY TCP4 1.2.3.4  1.2.3.5 1 2\r\n", R.MALFORMED_V1),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2 \r\n", R.MALFORMED_V1),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 1\r\n", R.MALFORMED_V1),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 2 3\r\n", R.MALFORMED_V1),
    (b"PROXY TCP4  1.2.3.4 1.2.3.5 1 2\r\n", R.MALFORMED_V1),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 +1 2\r\n", R.MALFORMED_V1),
    (b"PROXY TCP4 1.2.3.4\t1.2.3.5 1 2\r\n", R.MALFORMED_V1),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", R.MALFORMED_V1),  # no scope ids on the wire
    (b"PROXY TCP4\r\n", R.MALFORMED_V1),
    (b"PROXY \r\n", R.MALFORMED_V1),
    (b"PROXY UNKNOWN\n", R.MALFORMED_V1),
    (b"PROXY UNKNOWN what\never\r\n", R.MALFORMED_V1),
    (b"PROXY TCP4 " + b"1" * 200, R.V1_TOO_LONG),
    (b"PROXY UNKNOWN " + b"x" * 200 + b"\r\n", R.V1_TOO_LONG),
    (b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n", R.V1_TOO_LONG),  # 108 bytes
    (b"PROXY UDP4 1.2.3.4 1.2.3.5 1 2\r\n", R.BAD_FAMILY),
    (b"PROXY TCP5 1.2.3.4 1.2.3.5 1 2\r\n", R.BAD_FAMILY),
    (b"PROXY UNKNOWNS\r\n", R.BAD_FAMILY),
    (b"PROXY tcp4 1.2.3.4 1.2.3.5 1 2\r\n", R.BAD_FAMILY),
    (b"PROXY TCP4 1.2.3.256 1.2.3.5 1 2\r\n", R.BAD_ADDRESS),
    (b"PROXY TCP4 01.2.3.4 1.2.3.5 1 2\r\n", R.BAD_ADDRESS),  # octal-looking
    (b"PROXY TCP4 1.2.3 1.2.3.5 1 2\r\n", R.BAD_ADDRESS),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 65536 2\r\n", R.BAD_ADDRESS),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 0025\r\n", R.BAD_ADDRESS),
    (b"PROXY TCP4 1.2.3.4 1.2.3.5 1 999999\r\n", R.BAD_ADDRESS),
    (b"PROXY TCP4 ::1 ::1 1 2\r\n", R.MALFORMED_V1),  # ':' is no TCP4 character
    (b"PROXY TCP6 1.2.3.4 1.2.3.5 1 2\r\n", R.BAD_ADDRESS),
    (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", R.BAD_ADDRESS),
    (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", R.BAD_ADDRESS),
    # v2
    (SIG + b"\x11\x11\x00\x0c" + bytes(12), R.BAD_VERSION),
    (SIG + b"\x31\x11\x00\x0c" + bytes(12), R.BAD_VERSION),
    (SIG + b"\x22\x11\x00\x0c" + bytes(12), R.BAD_COMMAND),
    (SIG + b"\x2f\x00\x00\x00", R.BAD_COMMAND),
    (SIG + b"\x21\x13\x00\x0c" + bytes(12), R.BAD_FAMILY),
    (SIG + b"\x21\x41\x00\x0c" + bytes(12), R.BAD_FAMILY),
    (SIG + b"\x21\x12\x00\x0c" + bytes(12), R.UNSUPPORTED_FAMILY),  # UDP
    (SIG + b"\x21\x22\x00\x24" + bytes(36), R.UNSUPPORTED_FAMILY),
    (build_v2(0x21, 0x31, bytes(216)), R.UNSUPPORTED_FAMILY),  # UNIX stream
    (SIG + b"\x21\x00\x00\x00", R.UNSUPPORTED_FAMILY),  # PROXY, client unknown
    (SIG + b"\x21\x11" + struct.pack("!H", V2_MAX - 15), R.V2_TOO_LONG),
    (SIG + b"\x20\x00\xff\xff", R.V2_TOO_LONG),
    (SIG + b"\x21\x11\x00\x0b" + bytes(11), R.BAD_ADDRESS),
    (SIG + b"\x21\x21\x00\x0c" + bytes(12), R.BAD_ADDRESS),
    (build_v2(0x21, 0x11, bytes(12), b"\x04\x00"), R.BAD_TLV),
    (build_v2(0x21, 0x11, bytes(12), b"\x04\x00\x05abcd"), R.BAD_TLV),
    (build_v2(0x21, 0x11, bytes(12), tlv(0x03, b"abc")), R.BAD_TLV),
    (build_v2(0x20, 0x00, b"", tlv(0x03, bytes(4)) + tlv(0x03, bytes(4))), R.BAD_TLV),
    (build_v2(0x20, 0x00, b"", tlv(0x03, b"\xa9\xb8~\x8e")), R.BAD_CRC32C),
    (build_v2(0x21, 0x11, v4_block("1.2.3.4", "5.6.7.8", 1, 2), crc=True)[:-1] + b"\x00",
     R.BAD_CRC32C),
]  # fmt: skip


def test_every_reason_has_a_case() -> None:
    assert {reason for _, reason in ERRORS} == set(ProxyReason)


@pytest.mark.parametrize(("data", "reason"), ERRORS)
def test_errors(data: bytes, reason: ProxyReason) -> None:
    found = parse(data + TRAILER)
    assert isinstance(found, ProxyError), found
    assert found.reason is reason, found
    assert found.detail.isprintable() and found.detail.isascii()


@pytest.mark.parametrize(("data", "reason"), ERRORS)
def test_errors_split_everywhere(data: bytes, reason: ProxyReason) -> None:
    """However the bytes are cut, a prefix says NeedMore or the same error, and
    once it has said the error, every longer prefix says it too."""
    stream = data + TRAILER
    failed = False
    for cut in range(len(stream) + 1):
        found = parse(stream[:cut])
        if isinstance(found, NeedMore):
            assert not failed, cut
            assert found.wanted > cut
            continue
        assert isinstance(found, ProxyError) and found.reason is reason, (cut, found)
        failed = True
    assert failed


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [
        (b"E", R.NOT_PROXY),
        (b"\r\n\r\n\x01", R.NOT_PROXY),
        (b"PROXY X", R.BAD_FAMILY),
        (b"PROXY TCP4 1.2.3.4 x", R.MALFORMED_V1),
        (SIG + b"\x21\x11\x10\x00", R.V2_TOO_LONG),
    ],
)
def test_errors_found_early(prefix: bytes, reason: ProxyReason) -> None:
    """An error is told as soon as a prefix cannot begin a header, not at a timeout."""
    found = parse(prefix)
    assert isinstance(found, ProxyError) and found.reason is reason
    assert isinstance(parse(prefix[:-1]), NeedMore)


def test_crc32c_vectors() -> None:
    # RFC 3720 appendix B.4, and the usual check value
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_bounds() -> None:
    assert V1_MAX == 107  # proxy-protocol.txt's worst case, "v1 unknown worst case" above
    assert parse(b"") == NeedMore(1)


# -- properties ------------------------------------------------------------------------

_V4 = st.ip_addresses(v=4).map(str)
_V6 = st.ip_addresses(v=6).map(str)
_ADDRESS = st.one_of(_V4, _V6, _V4.map(lambda a: "::ffff:" + a))
_PORT = st.integers(min_value=0, max_value=65535)


@FAST
@given(client=_ADDRESS, cport=_PORT, server=_ADDRESS, sport=_PORT, version=st.sampled_from([1, 2]))
def test_round_trip_with_the_builders(
    client: str, cport: int, server: str, sport: int, version: int
) -> None:
    """What repeld sends (core/proxyproto.py) it reads back: the same client, normalised."""
    data = (v1 if version == 1 else v2)(client, cport, server, sport)
    found = parse(data + TRAILER)
    src, dst = normalize_address(client), normalize_address(server)
    # (mixed families go as TCP6, the IPv4 end mapped, and read back as IPv4)
    assert isinstance(found, Proxied)
    assert found.version == version and found.length == len(data)
    assert (found.source, found.source_port) == (_plain(src), cport)
    assert (found.destination, found.destination_port) == (_plain(dst), sport)
    assert found.family is (TCP6 if ":" in src or ":" in dst else TCP4)


def _plain(address: str) -> str:
    """The address as the parser gives it: `::ffff:0:0` is IPv4 too, however it is spelled."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return str(mapped if mapped is not None else ip)


_TLVS = st.lists(
    st.tuples(
        st.integers(min_value=0, max_value=255).filter(lambda t: t != 0x03),
        st.binary(max_size=300),
    ),
    max_size=8,
)


@FAST
@given(
    tlvs=_TLVS,
    crc=st.booleans(),
    local=st.booleans(),
    fam=st.sampled_from([0x11, 0x21]),
    block=st.binary(min_size=36, max_size=36),
    tail=st.binary(max_size=64),
)
def test_v2_tlvs_kept_and_every_prefix_needs_more(
    tlvs: list[tuple[int, bytes]], crc: bool, local: bool, fam: int, block: bytes, tail: bytes
) -> None:
    """Any TLVs that fit are skipped and kept; any prefix of the header is NeedMore."""
    size = 12 if fam == 0x11 else 36
    raw = b"".join(tlv(kind, value) for kind, value in tlvs)
    data = build_v2(0x20 if local else 0x21, fam, block[:size], raw, crc=crc)
    found = parse(data + tail)
    if len(data) > V2_MAX:
        assert isinstance(found, ProxyError) and found.reason is R.V2_TOO_LONG
        return
    assert isinstance(found, Local if local else Proxied), found
    assert found.length == len(data)
    kept = [(t.type, t.value) for t in found.tlvs]
    assert kept == tlvs + ([(0x03, data[-4:])] if crc else [])
    for cut in range(0, len(data), max(1, len(data) // 50)):
        assert isinstance(parse(data[:cut]), NeedMore), cut


@FAST
@given(client=_ADDRESS, cport=_PORT, server=_ADDRESS, sport=_PORT, tail=st.binary(max_size=64))
def test_every_prefix_of_a_v1_line_needs_more(
    client: str, cport: int, server: str, sport: int, tail: bytes
) -> None:
    data = v1(client, cport, server, sport)
    for cut in range(len(data)):
        assert isinstance(parse(data[:cut]), NeedMore), cut
    assert parse(data + tail) == parse(data)


def _same(a: Result, b: Result) -> bool:
    """The same answer (an error's detail may show more of the bytes)."""
    if isinstance(a, ProxyError) and isinstance(b, ProxyError):
        return a.reason is b.reason
    return a == b


def _mutated(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from([v[1] for v in VALID] + [e[0] for e in ERRORS] + [b"PROXY ", SIG]))
    data = bytearray(base + draw(st.binary(max_size=40)))
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        if not data:
            break
        at = draw(st.integers(min_value=0, max_value=len(data) - 1))
        data[at] = draw(st.integers(min_value=0, max_value=255))
    return bytes(data)


_ANY_BYTES = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b: b"PROXY " + b, st.binary(max_size=120)),
    st.builds(lambda b: SIG + b, st.binary(max_size=300)),
    st.composite(_mutated)(),
)


@FAST
@given(data=_ANY_BYTES, cut=st.integers(min_value=0, max_value=400))
def test_garbage_is_answered_never_raised(data: bytes, cut: int) -> None:
    """Whatever a balancer (or anyone) sends: one of the four answers, never an
    exception; an answer other than NeedMore does not change as more bytes come;
    NeedMore's `wanted` is more than it has."""
    found = parse(data)
    assert isinstance(found, (NeedMore, Proxied, Local, ProxyError))
    if isinstance(found, ProxyError):
        assert found.detail.isprintable() and found.detail.isascii()
    elif isinstance(found, NeedMore):
        assert found.wanted > len(data)
    else:
        assert 0 < found.length <= min(len(data), MAX_HEADER)
    early = parse(data[:cut])
    if not isinstance(early, NeedMore):
        assert _same(early, found), (early, found)


@FAST
@given(data=_ANY_BYTES, more=st.binary(min_size=1, max_size=MAX_HEADER))
def test_bounded(data: bytes, more: bytes) -> None:
    """The parser looks at no more than MAX_HEADER bytes, however many are peeked."""
    padded = (data + more * (MAX_HEADER // len(more) + 1))[: MAX_HEADER + 1]
    assert _same(parse(padded), parse(padded[:MAX_HEADER]))
    assert _same(parse(padded + bytes(100_000)), parse(padded[:MAX_HEADER]))


def _aiosmtpd(data: bytes) -> tuple[Any, bytes]:
    """aiosmtpd's reading of `data` (an independent implementation of the same
    spec, the one a real aiosmtpd MTA runs): (ProxyData, the bytes after the header)."""

    async def run() -> tuple[Any, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        proxy = await get_proxy(reader)
        return proxy, await reader.read()

    return asyncio.run(run())


@FAST
@given(
    client=_ADDRESS,
    cport=_PORT,
    server=_ADDRESS,
    sport=_PORT,
    tlvs=_TLVS,
    version=st.sampled_from([1, 2]),
)
def test_aiosmtpd_reads_the_same_header(
    client: str, cport: int, server: str, sport: int, tlvs: list[tuple[int, bytes]], version: int
) -> None:
    """Where both accept a header, aiosmtpd finds the same client, server and end."""
    data = (v1 if version == 1 else v2)(client, cport, server, sport)
    if version == 2 and data[12] == 0x21:  # PROXY: add the TLVs
        block = data[16:]
        raw = b"".join(tlv(kind, value) for kind, value in tlvs)
        data = build_v2(0x21, data[13], block, raw)
    if len(data) > V2_MAX:
        return
    ours = parse(data + TRAILER)
    theirs, rest = _aiosmtpd(data + TRAILER)
    assert theirs.valid, theirs.error
    assert rest == TRAILER and ours.length == len(data)  # type: ignore[union-attr]
    if isinstance(ours, Local):
        return
    assert isinstance(ours, Proxied)
    assert (ours.source, ours.source_port) == (_plain(str(theirs.src_addr)), theirs.src_port)
    assert (ours.destination, ours.destination_port) == (
        _plain(str(theirs.dst_addr)),
        theirs.dst_port,
    )

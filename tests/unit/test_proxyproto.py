"""PROXY protocol headers: exact bytes, cross-checked with aiosmtpd's own parser.

aiosmtpd.proxy_protocol.get_proxy is an independent implementation of HAProxy's
proxy-protocol.txt (the one a real aiosmtpd MTA runs); it is fed the bytes
through a real asyncio.StreamReader.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from typing import Any

import pytest
from aiosmtpd.proxy_protocol import AF, PROTO, V2_CMD, get_proxy

from repeld.core.proxyproto import V2_SIGNATURE, header, v1, v2

TRAILER = b"EHLO after.header\r\n"


def decode(data: bytes) -> tuple[Any, bytes]:
    """aiosmtpd's view of a header followed by SMTP bytes: (ProxyData, what is left)."""

    async def run() -> tuple[Any, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(data + TRAILER)
        reader.feed_eof()
        proxy = await get_proxy(reader)
        rest = await reader.read()
        return proxy, rest

    return asyncio.run(run())


# -- v1 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client", "cport", "server", "sport", "line"),
    [
        ("192.0.2.7", 40000, "127.0.0.1", 25, b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n"),
        ("127.0.0.5", 0, "127.0.0.1", 65535, b"PROXY TCP4 127.0.0.5 127.0.0.1 0 65535\r\n"),
        ("::1", 5555, "::1", 25, b"PROXY TCP6 ::1 ::1 5555 25\r\n"),
        (
            "2001:db8:0:0:0:0:0:1",
            1,
            "2001:db8::25",
            587,
            b"PROXY TCP6 2001:db8::1 2001:db8::25 1 587\r\n",
        ),
        # IPv4-mapped addresses (a dual-stack socket) are sent as plain IPv4
        ("::ffff:192.0.2.7", 40000, "::ffff:127.0.0.1", 25,
         b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n"),
        ("::FFFF:192.0.2.7", 40000, "127.0.0.1", 25,
         b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n"),
        # a scope id is not part of the address on the wire
        ("fe80::1%lo", 2, "fe80::2%lo", 25, b"PROXY TCP6 fe80::1 fe80::2 2 25\r\n"),
    ],
)  # fmt: skip
def test_v1_bytes(client: str, cport: int, server: str, sport: int, line: bytes) -> None:
    assert v1(client, cport, server, sport) == line
    assert header("v1", client, cport, server, sport) == line
    proxy, rest = decode(line)
    assert proxy.valid, proxy.error
    assert proxy.version == 1
    assert proxy.protocol == PROTO.STREAM
    src, dst = line.split()[2:4]
    assert proxy.src_addr == ipaddress.ip_address(src.decode())
    assert proxy.dst_addr == ipaddress.ip_address(dst.decode())
    assert (proxy.src_port, proxy.dst_port) == (cport, sport)
    assert proxy.family == (AF.INET if b"TCP4" in line else AF.INET6)
    assert rest == TRAILER  # the header ends exactly where SMTP begins


MIXED = [
    ("192.0.2.7", "::1", "::ffff:192.0.2.7", "::1"),
    ("::1", "127.0.0.1", "::1", "::ffff:127.0.0.1"),
    ("::ffff:192.0.2.7", "2001:db8::1", "::ffff:192.0.2.7", "2001:db8::1"),
]


@pytest.mark.parametrize(("client", "server", "src", "dst"), MIXED)
def test_v1_mixed_families_are_both_ipv6_the_ipv4_end_mapped(
    client: str, server: str, src: str, dst: str
) -> None:
    # As HAProxy writes them; never UNKNOWN, which would make the MTA take the
    # connection's own peer (repeld on loopback, trusted by default) for the client.
    line = v1(client, 40000, server, 25)
    assert line == f"PROXY TCP6 {src} {dst} 40000 25\r\n".encode()
    proxy, rest = decode(line)
    assert proxy.valid, proxy.error
    assert proxy.family == AF.INET6
    assert proxy.src_addr == ipaddress.ip_address(src)
    assert proxy.dst_addr == ipaddress.ip_address(dst)
    assert (proxy.src_port, proxy.dst_port) == (40000, 25)
    assert rest == TRAILER


def test_v1_longest_header_fits_the_107_byte_limit() -> None:
    longest = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"
    line = v1(longest, 65535, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffd", 65535)
    assert len(line) <= 107
    proxy, _ = decode(line)
    assert proxy.valid, proxy.error


# -- v2 ----------------------------------------------------------------------


def test_v2_ipv4_exact_bytes() -> None:
    assert v2("192.0.2.7", 40000, "127.0.0.1", 25) == (
        b"\r\n\r\n\x00\r\nQUIT\n"  # signature
        b"\x21"  # version 2, command PROXY
        b"\x11"  # AF_INET, STREAM
        b"\x00\x0c"  # 12 bytes of addresses follow
        b"\xc0\x00\x02\x07"  # 192.0.2.7
        b"\x7f\x00\x00\x01"  # 127.0.0.1
        b"\x9c\x40"  # 40000
        b"\x00\x19"  # 25
    )


def test_v2_ipv6_exact_bytes() -> None:
    expected = (
        V2_SIGNATURE
        + b"\x21\x21\x00\x24"  # PROXY, AF_INET6 + STREAM, 36 bytes
        + ipaddress.IPv6Address("2001:db8::1").packed
        + ipaddress.IPv6Address("::1").packed
        + struct.pack("!HH", 1234, 25)
    )
    assert v2("2001:db8::1", 1234, "::1", 25) == expected
    assert len(expected) == 16 + 36


def test_v2_signature_is_the_one_in_the_spec() -> None:
    signature = bytes.fromhex("0D0A0D0A000D0A515549540A")
    assert signature == V2_SIGNATURE


@pytest.mark.parametrize(
    ("client", "cport", "server", "sport", "family"),
    [
        ("192.0.2.7", 40000, "127.0.0.1", 25, AF.INET),
        ("127.0.0.5", 0, "127.0.0.1", 65535, AF.INET),
        ("::1", 5555, "::1", 25, AF.INET6),
        ("2001:db8::1", 1, "2001:db8::25", 587, AF.INET6),
        ("::ffff:192.0.2.7", 40000, "::ffff:127.0.0.1", 25, AF.INET),
        ("fe80::1%lo", 2, "fe80::2%lo", 25, AF.INET6),
    ],
)
def test_v2_decoded_by_aiosmtpd(
    client: str, cport: int, server: str, sport: int, family: AF
) -> None:
    data = v2(client, cport, server, sport)
    assert header("v2", client, cport, server, sport) == data
    proxy, rest = decode(data)
    assert proxy.valid, proxy.error
    assert proxy.version == 2
    assert proxy.command == V2_CMD.PROXY
    assert proxy.family == family
    assert proxy.protocol == PROTO.STREAM
    plain = [a.split("%")[0].removeprefix("::ffff:") for a in (client, server)]
    assert proxy.src_addr == ipaddress.ip_address(plain[0])
    assert proxy.dst_addr == ipaddress.ip_address(plain[1])
    assert (proxy.src_port, proxy.dst_port) == (cport, sport)
    assert proxy.rest == b""  # no TLVs
    assert rest == TRAILER


@pytest.mark.parametrize(("client", "server", "src", "dst"), MIXED)
def test_v2_mixed_families_are_both_ipv6_the_ipv4_end_mapped(
    client: str, server: str, src: str, dst: str
) -> None:
    data = v2(client, 40000, server, 25)
    proxy, rest = decode(data)
    assert proxy.valid, proxy.error
    assert proxy.version == 2
    assert proxy.command == V2_CMD.PROXY
    assert proxy.family == AF.INET6
    assert proxy.src_addr == ipaddress.ip_address(src)
    assert proxy.dst_addr == ipaddress.ip_address(dst)
    assert (proxy.src_port, proxy.dst_port) == (40000, 25)
    assert rest == TRAILER


def test_none_sends_nothing() -> None:
    assert header("none", "192.0.2.7", 40000, "127.0.0.1", 25) == b""


def test_v2_header_contains_quit_so_a_plain_smtp_server_hangs_up() -> None:
    # Why smtp-sink must be used with --proxy-protocol none.
    assert b"QUIT\n" in v2("192.0.2.7", 1, "127.0.0.1", 25)

"""PROXY protocol headers (HAProxy's proxy-protocol.txt, v1 and v2), so the MTA
sees the real client. Pure functions: addresses in, bytes out.
"""

from __future__ import annotations

import ipaddress
import struct

from repeld.core.addresses import normalize_address

__all__ = ["V2_SIGNATURE", "header", "v1", "v2"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21  # version 2, command PROXY
_TCP4 = 0x11
_TCP6 = 0x21


def _pair(
    client: str, server: str
) -> (
    tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]
    | tuple[ipaddress.IPv6Address, ipaddress.IPv6Address]
):
    src = ipaddress.ip_address(normalize_address(client))
    dst = ipaddress.ip_address(normalize_address(server))
    if isinstance(src, ipaddress.IPv4Address) and isinstance(dst, ipaddress.IPv4Address):
        return src, dst
    # Mixed families (an IPv4 client on an IPv6 server address, from a balancer's
    # header, or the reverse): both as IPv6, the IPv4 end mapped (::ffff:a.b.c.d),
    # as HAProxy writes them. Never UNKNOWN or LOCAL for a client: then the MTA
    # takes the connection's own peer, repeld on loopback, which Postfix's
    # mynetworks and Exim's relay_from_hosts trust by default.
    return _v6(src), _v6(dst)


def _v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address):
        return address
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def _text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address as inet_ntop writes it: a mapped IPv4 address as ::ffff:a.b.c.d
    (Python before 3.13 writes ::ffff:c000:207)."""
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return f"::ffff:{mapped}" if mapped is not None else str(address)


def v1(client: str, client_port: int, server: str, server_port: int) -> bytes:
    """`PROXY TCP4 src dst sport dport\\r\\n` (or TCP6)."""
    pair = _pair(client, server)
    proto = "TCP4" if pair[0].version == 4 else "TCP6"
    src, dst = _text(pair[0]), _text(pair[1])
    return f"PROXY {proto} {src} {dst} {client_port} {server_port}\r\n".encode("ascii")


def v2(client: str, client_port: int, server: str, server_port: int) -> bytes:
    """The binary v2 header with command PROXY over TCP4 or TCP6, no TLVs."""
    pair = _pair(client, server)
    fam = _TCP4 if pair[0].version == 4 else _TCP6
    body = pair[0].packed + pair[1].packed + struct.pack("!HH", client_port, server_port)
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, fam, len(body)) + body


def header(version: str, client: str, client_port: int, server: str, server_port: int) -> bytes:
    """The header for `--proxy-protocol VERSION` (empty for `none`)."""
    if version == "v1":
        return v1(client, client_port, server, server_port)
    if version == "v2":
        return v2(client, client_port, server, server_port)
    return b""

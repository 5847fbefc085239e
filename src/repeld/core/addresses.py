"""Addresses as repeld's rules see them: normalised, keyed and printed one way.

Pure code on strings, with no socket module: `ipaddress` parses what the fast
paths cannot.

* `normalize_address` -- `::ffff:a.b.c.d` is `a.b.c.d`, scope ids are dropped;
* `address_int` -- (family, integer) of an address, for range checks;
* `cache_key` -- the key a client is remembered under in the pass cache: the
  address for IPv4, the `/v6_prefix` network for IPv6, because one IPv6 host
  owns a whole /64 and walks through it at will; an IPv4 client a translator
  shows in RFC 6052's well-known prefix (`64:ff9b::192.0.2.7`) by its IPv4
  address, or the whole IPv4 Internet would be one /64;
* `embedded_ipv4` -- the IPv4 client an IPv6 address stands for (IPv4-mapped,
  or translated with the well-known prefix), or None;
* `host_port` / `bracket` -- the one `[host]:port` spelling of an endpoint;
* `host_name_problem` -- why an operator's host name is not one (or None).
"""

from __future__ import annotations

import ipaddress
import re

__all__ = [
    "DEFAULT_V6_PREFIX",
    "V6_PREFIX_MAX",
    "V6_PREFIX_MIN",
    "address_int",
    "bracket",
    "cache_key",
    "client_key",
    "embedded_ipv4",
    "host_name_problem",
    "host_port",
    "normalize_address",
]

#: The IPv6 prefix a client is remembered by: a /64 is one host (or one LAN).
DEFAULT_V6_PREFIX = 64
#: A shorter prefix would let one patient client vouch for a whole provider.
V6_PREFIX_MIN = 32
V6_PREFIX_MAX = 128


def normalize_address(address: str) -> str:
    """The address a rule should see: `::ffff:a.b.c.d` is `a.b.c.d`, scope ids dropped."""
    address = address.split("%", 1)[0]
    if address.lower().startswith("::ffff:") and "." in address:
        return address[7:]
    return address


def bracket(host: str) -> str:
    """`host`, with an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def host_port(host: str, port: int) -> str:
    """`192.0.2.7:25` or `[2001:db8::7]:25`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


#: A DNS label as RFC 1123 allows it in a host name: letters, digits, hyphens.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)


def host_name_problem(host: str) -> str | None:
    """None if `host` is an IP address or a host name the resolver can take; else why not.

    A name is at most 253 characters (a final dot aside) of labels of 1-63
    letters, digits and hyphens, not starting or ending with a hyphen. Checked
    before any lookup: the resolver's IDNA codec raises UnicodeError on a label
    of 64 characters, which is not the admin's clue.
    """
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not name:
        return "the host name is empty"
    if len(name) > 253:
        return f"the host name is {len(name)} characters long, more than 253"
    for label in name.split("."):
        if not label:
            return "the host name has an empty label"
        if len(label) > 63:
            return f"a label of the host name is {len(label)} characters long, more than 63"
        if not _LABEL.fullmatch(label):
            return (
                f"{_shown(label)} is not a host name label (letters, digits and hyphens,"
                " not starting or ending with a hyphen)"
            )
    return None


def _shown(text: str, limit: int = 40) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _ipv4_int(address: str) -> int | None:
    # Faster than ipaddress for the common dotted quad, and as strict:
    # four decimal parts of 0-255, no leading zeros beyond "0".
    parts = address.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        if not part.isdigit() or not part.isascii() or (len(part) > 1 and part[0] == "0"):
            return None
        octet = int(part)
        if octet > 255:
            return None
        value = (value << 8) | octet
    return value


def address_int(address: str) -> tuple[int, int] | None:
    """(4 or 6, integer) of a textual address; None if it is not one.

    `::ffff:a.b.c.d` counts as IPv4; an IPv6 scope id is ignored.
    """
    if ":" not in address:
        found = _ipv4_int(address)
        return None if found is None else (4, found)
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return None
    mapped = ip.ipv4_mapped
    if mapped is not None:
        return 4, int(mapped)
    return 6, int(ip)


#: RFC 6052's well-known prefix, 64:ff9b::/96: a stateless translator (SIIT, RFC
#: 7915; RFC 7755's IPv6-only data centres) shows every IPv4 client to an
#: IPv6-only host as this prefix and the client's IPv4 address. RFC 6052 keeps
#: it for global IPv4 addresses only, and it is not routed on the IPv6 Internet.
_WKP = int(ipaddress.IPv6Address("64:ff9b::")) >> 32


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 client `ip` stands for: IPv4-mapped (`::ffff:192.0.2.7`) or
    translated with the well-known prefix (`64:ff9b::192.0.2.7`); else None.

    Used for what is remembered or counted of a client, and for what the DNS
    lists are asked, never for --trusted: a network is trusted as written.
    """
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if int(ip) >> 32 == _WKP:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def check_v6_prefix(v6_prefix: int) -> None:
    """ValueError unless `v6_prefix` is an integer from 32 to 128."""
    if (
        isinstance(v6_prefix, bool)
        or not isinstance(v6_prefix, int)
        or not V6_PREFIX_MIN <= v6_prefix <= V6_PREFIX_MAX
    ):
        raise ValueError(
            f"IPv6 cache prefix must be an integer {V6_PREFIX_MIN}-{V6_PREFIX_MAX},"
            f" got {v6_prefix!r}"
        )


_HEX = frozenset("0123456789abcdefABCDEF")


def _hextets(part: str) -> list[int] | None:
    # The groups of one side of "::" (or of a whole address): 1-4 hex digits each.
    if not part:
        return []
    groups = part.split(":")
    if any(not 1 <= len(g) <= 4 or not _HEX.issuperset(g) for g in groups):
        return None
    return [int(g, 16) for g in groups]


#: The first six groups of an IPv6 address that carries an IPv4 client in its
#: last two: `::ffff:0:0/96` and the well-known prefix `64:ff9b::/96`.
_IPV4_CARRIERS = ([0, 0, 0, 0, 0, 0xFFFF], [0x64, 0xFF9B, 0, 0, 0, 0])


def _v6_key(address: str, v6_prefix: int) -> str | None:
    # cache_key of a plain IPv6 address, written as ipaddress writes it (RFC 5952:
    # lower case, the longest run of two or more zero groups, the first of equals,
    # as "::"), in a tenth of its time: it runs per held IPv6 client, in the accept
    # path. None for ipaddress to do it: a dotted part, a scope id, or a spelling
    # this strict parser does not take.
    halves = address.split("::")
    if len(halves) > 2:
        return None
    head = _hextets(halves[0])
    tail = _hextets(halves[1]) if len(halves) == 2 else []
    if head is None or tail is None:
        return None
    missing = 8 - len(head) - len(tail)
    if missing < (1 if len(halves) == 2 else 0) or (len(halves) == 1 and missing):
        return None
    groups = head + [0] * missing + tail
    if groups[:6] in _IPV4_CARRIERS:  # IPv4-mapped or translated: the IPv4 client
        return f"{groups[6] >> 8}.{groups[6] & 255}.{groups[7] >> 8}.{groups[7] & 255}"
    kept = v6_prefix // 16
    if kept < 8:
        groups[kept] &= 0xFFFF << (16 - v6_prefix % 16) & 0xFFFF
        groups[kept + 1 :] = [0] * (7 - kept)
    best, best_len, start, run = -1, 1, -1, 0
    for i, group in enumerate(groups):
        if group:
            run = 0
            continue
        if not run:
            start = i
        run += 1
        if run > best_len:
            best, best_len = start, run
    text = [f"{group:x}" for group in groups]
    if best >= 0:
        text[best : best + best_len] = [""]
        if best == 0:
            text.insert(0, "")
        if best + best_len == 8:
            text.append("")
    return ":".join(text) + f"/{v6_prefix}"


def cache_key(address: str, v6_prefix: int = DEFAULT_V6_PREFIX) -> str:
    """The key `address` is remembered under.

    IPv4: the address (`192.0.2.7`); `::ffff:192.0.2.7` and `64:ff9b::192.0.2.7`
    (`embedded_ipv4`) are the same client.
    IPv6: the network of `v6_prefix` bits in CIDR form (`2001:db8:1:2::/64`), so
    the two families can never collide. A scope id (`fe80::1%eth0`) is dropped.
    Raises ValueError for a bad address or a prefix outside 32-128.
    """
    check_v6_prefix(v6_prefix)
    if ":" not in address:  # the common case, checked cheaply: a plain IPv4 address
        if _ipv4_int(address) is None:
            raise ValueError(f"{address!r} is not an IP address")
        return address
    key = _v6_key(address, v6_prefix)
    if key is not None:
        return key
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    carried = embedded_ipv4(ip)
    if carried is not None:
        return str(carried)
    return str(ipaddress.IPv6Network((ip, v6_prefix), strict=False))


def client_key(address: str, v6_prefix: int = DEFAULT_V6_PREFIX) -> str:
    """What --max-per-client counts `address` under: the pass cache's key, so an
    IPv6 client by its network of `v6_prefix` bits (one host usually owns a whole
    /64, and would otherwise have 2**64 addresses to fill the pen from), an IPv4
    one by its address, translated or not; an address that is none (a test's
    name) as it is."""
    if ":" not in address:  # IPv4, checked cheaply: the accept path's common case
        return address
    try:
        return cache_key(address, v6_prefix)
    except ValueError:
        return address

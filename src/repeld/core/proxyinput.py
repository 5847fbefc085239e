"""PROXY protocol input: the header a trusted balancer sends before its client's bytes.

HAProxy's proxy-protocol.txt, both versions, read by one pure function: `parse`
is given the bytes peeked so far (the shell peeks with MSG_PEEK and calls it
again on a longer prefix as more arrive) and answers one of

* `NeedMore` -- the bytes are a prefix of a header that may still be valid;
* `Proxied` -- a complete header for a relayed client (TCP over IPv4 or IPv6):
  the client's and the balancer's addresses and ports, and `length`, how many
  bytes the header occupies, which the shell then consumes with recv (what
  follows is the client's own talk);
* `Local` -- a complete header for the balancer's own connection (v2 `LOCAL`,
  v1 `PROXY UNKNOWN`): a health check, not a client;
* `ProxyError` -- the bytes cannot begin a valid header, with a `ProxyReason`.

The version is told from the first bytes: `PROXY ` is v1, the 12-byte binary
signature is v2, and anything else is `not-proxy` as soon as a prefix can match
neither. `parse` never raises, looks at no more than `MAX_HEADER` bytes, and its
work is linear in them.

What is accepted, strictly (anything else is a `ProxyError`, and the shell
closes the connection):

* v1: `PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`, single spaces, at most 107
  bytes with the CRLF (the spec's worst case; `v1-too-long` past it). The
  addresses must be of the family named (`ipaddress`: dotted quads without
  leading zeros for TCP4; RFC 4291 text for TCP6, no scope id); ports are
  decimal 0-65535 without leading zeros. `PROXY UNKNOWN` and whatever follows
  it up to the CRLF is `Local`. A lone CR or LF is malformed. Bytes that cannot
  be part of a valid line are an error at once, without waiting for the CRLF.
* v2: version 2; command LOCAL (`Local`, the address block is skipped) or
  PROXY with TCP over IPv4 (0x11) or IPv6 (0x21). PROXY with UDP, UNIX or
  UNSPEC is `unsupported-family`: repeld holds TCP clients and cannot judge a
  connection whose client is unknown. Family bytes the spec does not define are
  `bad-family`. TLVs after the addresses are tolerated and skipped (ALPN,
  AUTHORITY, NOOP, UNIQUE_ID, SSL and its sub-TLVs, NETNS, AWS NLB's VPC
  endpoint 0xEA, Azure's 0xEE, GCP's 0xE0, any other type), but a TLV must fit
  in the header (`bad-tlv`); a CRC32C TLV (0x03) must be 4 bytes and match the
  header (`bad-crc32c`).

The bound on a v2 header, `V2_MAX` = 4096 bytes in all (16 fixed, up to 4080 of
addresses and TLVs; `v2-too-long` past it, told as soon as the 16 fixed bytes
are in). Real balancers send far less: HAProxy's health check is 16 bytes, a
relayed IPv6 client 52; AWS NLB with a PrivateLink VPC endpoint TLV about 54;
HAProxy with every TLV it can build at its largest (CRC32C, a 255-byte ALPN,
a 255-byte AUTHORITY, a 128-byte UNIQUE_ID, SSL with version, CN, cipher and
algorithms, NETNS) stays under 1.2 KiB. A 1.5 KiB bound would do for those;
4 KiB, one page, also leaves room for custom TLVs (HAProxy's
`set-proxy-v2-tlv-fmt`, Envoy's pass-through TLVs) and costs nothing per
pending socket: the bytes stay in the kernel until the header is complete, and
the peek that reads them is transient.

IPv4-mapped addresses (`::ffff:a.b.c.d` in a TCP6 header) are normalised as
core/addresses.py normalises a socket's peer, so one client has one key
whether it came directly or through a balancer.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import ClassVar, Literal

from repeld.core.hold import escape_bytes
from repeld.core.proxyproto import V2_SIGNATURE

__all__ = [
    "MAX_HEADER",
    "V1_MAX",
    "V2_MAX",
    "Header",
    "Local",
    "NeedMore",
    "Proxied",
    "ProxyError",
    "ProxyFamily",
    "ProxyReason",
    "Result",
    "Tlv",
    "crc32c",
    "parse",
]

#: The longest v1 line, CRLF included (proxy-protocol.txt section 2.1).
V1_MAX = 107
#: The longest v2 header repeld reads, the 16 fixed bytes included (see above).
V2_MAX = 4096
#: What the shell needs to peek to see any complete header.
MAX_HEADER = max(V1_MAX, V2_MAX)

_V1_PREFIX = b"PROXY "
_V2_FIXED = 16
#: The fixed part of a v2 PROXY header for TCP over IPv4 with no TLV, and its length.
_V2_TCP4_PLAIN = V2_SIGNATURE + b"\x21\x11\x00\x0c"
_V2_TCP4_PLAIN_LENGTH = _V2_FIXED + 12
_TCP4_BODY = struct.Struct("!8BHH")


class ProxyReason(enum.StrEnum):
    """Why bytes from a balancer are not a PROXY header; stable names for events."""

    NOT_PROXY = "not-proxy"  # neither "PROXY " nor the v2 signature
    MALFORMED_V1 = "malformed-v1"  # spaces, fields or line end wrong
    V1_TOO_LONG = "v1-too-long"  # no CRLF within 107 bytes
    BAD_VERSION = "bad-version"  # v2 signature, version nibble not 2
    BAD_COMMAND = "bad-command"  # v2 command neither LOCAL nor PROXY
    BAD_FAMILY = "bad-family"  # a family/protocol byte or v1 word the spec does not define
    UNSUPPORTED_FAMILY = "unsupported-family"  # v2 PROXY over UDP, UNIX or UNSPEC
    V2_TOO_LONG = "v2-too-long"  # v2 header longer than V2_MAX
    BAD_ADDRESS = "bad-address"  # an address or port not valid for its family, or cut short
    BAD_TLV = "bad-tlv"  # a v2 TLV runs past the header, or a CRC32C TLV is not 4 bytes
    BAD_CRC32C = "bad-crc32c"  # the CRC32C TLV does not match the header


class ProxyFamily(enum.StrEnum):
    """The transport of a relayed client, as the v1 line names it."""

    TCP4 = "TCP4"
    TCP6 = "TCP6"


@dataclass(frozen=True, slots=True)
class NeedMore:
    """A prefix of a header that may still be valid: peek again once there are at
    least `wanted` bytes (the shell may call again sooner; the answer is the same)."""

    wanted: int


@dataclass(frozen=True, slots=True)
class Tlv:
    """A v2 type-length-value entry, kept as it came (repeld reads none of them)."""

    type: int
    value: bytes


@dataclass(frozen=True, slots=True)
class Proxied:
    """A complete header for a relayed client: `source` is the client, `destination`
    the address it connected to on the balancer. Addresses are normalised text."""

    local: ClassVar[Literal[False]] = False

    version: Literal[1, 2]
    length: int
    family: ProxyFamily
    source: str
    source_port: int
    destination: str
    destination_port: int
    tlvs: tuple[Tlv, ...] = ()


@dataclass(frozen=True, slots=True)
class Local:
    """A complete header for the balancer's own connection (v2 LOCAL, v1 UNKNOWN):
    a health check; the socket's own endpoints are the true ones."""

    local: ClassVar[Literal[True]] = True

    version: Literal[1, 2]
    length: int
    tlvs: tuple[Tlv, ...] = ()


@dataclass(frozen=True, slots=True)
class ProxyError:
    """Not a PROXY header: `reason` for the event, `detail` for the administrator
    (printable ASCII, the offending bytes escaped and cut short)."""

    reason: ProxyReason
    detail: str


#: A complete header.
Header = Proxied | Local
#: Everything `parse` answers.
Result = NeedMore | Proxied | Local | ProxyError


def parse(data: bytes) -> Result:
    """Read the PROXY header at the start of `data` (the bytes peeked so far)."""
    if data[:_V2_FIXED] == _V2_TCP4_PLAIN and len(data) >= _V2_TCP4_PLAIN_LENGTH:
        # What HAProxy and AWS NLB send for nearly every client: v2, PROXY, TCP
        # over IPv4, no TLV. The general path below says the same, 3 times slower.
        a, b, c, d, e, f, g, h, sport, dport = _TCP4_BODY.unpack_from(data, _V2_FIXED)
        return Proxied(
            2,
            _V2_TCP4_PLAIN_LENGTH,
            ProxyFamily.TCP4,
            f"{a}.{b}.{c}.{d}",
            sport,
            f"{e}.{f}.{g}.{h}",
            dport,
        )
    if not data:
        return NeedMore(1)
    if data[0] == _V1_PREFIX[0]:
        return _parse_v1(data[:V1_MAX])
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data[:V2_MAX])
    return _not_proxy(data)


def _not_proxy(data: bytes) -> ProxyError:
    return ProxyError(ProxyReason.NOT_PROXY, f"starts with '{escape_bytes(data[:16], 40)}'")


# -- v1 ------------------------------------------------------------------------------

#: The words after "PROXY " and what each line may hold up to its CRLF (besides spaces).
_V1_WORDS = (b"TCP4 ", b"TCP6 ", b"UNKNOWN")
_V1_CHARS = {
    b"TCP4 ": b"0123456789. ",
    b"TCP6 ": b"0123456789abcdefABCDEF:. ",
}


def _v1_error(reason: ProxyReason, what: str, line: bytes) -> ProxyError:
    return ProxyError(reason, f"{what}: '{escape_bytes(line, 120)}'")


def _parse_v1(data: bytes) -> Result:
    # Read left to right, so that the first byte that cannot belong to a valid
    # line decides the reason, however the line was cut into segments.
    n = min(len(data), len(_V1_PREFIX))
    if data[:n] != _V1_PREFIX[:n]:
        return _not_proxy(data)
    rest = data[len(_V1_PREFIX) :]
    word = next((w for w in _V1_WORDS if rest[: len(w)] == w), None)
    if word is None:
        if any(w.startswith(rest) for w in _V1_WORDS):
            return NeedMore(len(data) + 1)
        at = max(_common(rest, w) for w in _V1_WORDS)  # rest[at] fits no word
        cut = data[: len(_V1_PREFIX) + at + 1]
        if rest[at] in b"\r\n":
            return _v1_error(ProxyReason.MALFORMED_V1, "the line ends too soon", cut)
        return _v1_error(ProxyReason.BAD_FAMILY, "not TCP4, TCP6 or UNKNOWN", cut)
    body = len(_V1_PREFIX) + len(word)
    if word == b"UNKNOWN" and len(data) > body and data[body] not in b" \r":
        # "UNKNOWN" is a word: a space or the CRLF follows it
        reason = ProxyReason.MALFORMED_V1 if data[body] == 0x0A else ProxyReason.BAD_FAMILY
        return _v1_error(reason, "not TCP4, TCP6 or UNKNOWN", data[: body + 1])
    allowed = _V1_CHARS.get(word)  # None: UNKNOWN, anything but CR and LF up to the CRLF
    end = data.find(b"\r\n", body)
    fields = data[body:end] if end >= 0 else data[body:].removesuffix(b"\r")
    if allowed is None:
        wrong = b"\r" in fields or b"\n" in fields
    else:
        wrong = bool(fields.translate(None, allowed))  # what is left is not allowed
    if wrong:
        return _v1_first_wrong(data, body, allowed)
    if end < 0:
        if len(data) >= V1_MAX:
            return _v1_error(ProxyReason.V1_TOO_LONG, f"no CRLF within {V1_MAX} bytes", data)
        return NeedMore(len(data) + 1)
    if word == b"UNKNOWN":
        return Local(version=1, length=end + 2)
    line = data[:end]
    parts = fields.split(b" ")
    if len(parts) != 4 or not all(parts):
        return _v1_error(ProxyReason.MALFORMED_V1, "not four fields after one space each", line)
    family = ProxyFamily.TCP4 if word == b"TCP4 " else ProxyFamily.TCP6
    src, dst = _v1_address(parts[0], family), _v1_address(parts[1], family)
    sport, dport = _v1_port(parts[2]), _v1_port(parts[3])
    if src is None or dst is None:
        return _v1_error(ProxyReason.BAD_ADDRESS, f"not {family} addresses", line)
    if sport is None or dport is None:
        return _v1_error(ProxyReason.BAD_ADDRESS, "a port not 0-65535 without leading zeros", line)
    return Proxied(1, end + 2, family, src, sport, dst, dport)


def _v1_first_wrong(data: bytes, body: int, allowed: bytes | None) -> ProxyError:
    """The error for the first byte after the v1 word that no valid line has there
    (a lone CR or LF, or a character no address or port has); the caller has seen one."""
    for i in range(body, len(data)):
        c = data[i]
        if c == 0x0D:  # the CRLF comes after the wrong byte; a CR at the end may begin it
            if i + 1 < len(data) and data[i + 1] != 0x0A:
                return _v1_error(ProxyReason.MALFORMED_V1, "a lone CR", data[: i + 2])
            continue
        if c == 0x0A:
            return _v1_error(ProxyReason.MALFORMED_V1, "a lone LF", data[: i + 1])
        if allowed is not None and c not in allowed:
            return _v1_error(
                ProxyReason.MALFORMED_V1, "not an address, port or space", data[: i + 1]
            )
    raise AssertionError("no wrong byte: the caller's check and this loop disagree")


def _common(a: bytes, b: bytes) -> int:
    """The length of the common prefix of `a` and `b`."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _v1_address(text: bytes, family: ProxyFamily) -> str | None:
    if family is ProxyFamily.TCP4:
        return text.decode("ascii") if _dotted_quad(text) else None
    try:
        # The character check has kept out "%" (a scope id is not an address on the wire).
        return _text(ipaddress.IPv6Address(text.decode("ascii")))
    except ValueError:
        return None


def _dotted_quad(text: bytes) -> bool:
    """Four decimal numbers 0-255 without leading zeros, as proxy-protocol.txt asks
    (so the text is already the canonical form); the caller has allowed only digits
    and dots. As strict as ipaddress.IPv4Address, and a fraction of its cost."""
    parts = text.split(b".")
    return len(parts) == 4 and all(
        0 < len(part) <= 3 and (part[0] != 0x30 or len(part) == 1) and int(part) <= 255
        for part in parts
    )


def _text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address as core/addresses.py normalises a peer: `::ffff:a.b.c.d` is `a.b.c.d`."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _v1_port(text: bytes) -> int | None:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == 0x30):
        return None
    port = int(text)
    return port if port <= 0xFFFF else None


# -- v2 ------------------------------------------------------------------------------

_FIXED = struct.Struct("!BBH")
_PORTS = struct.Struct("!HH")
_TLV_HEAD = struct.Struct("!BH")
_LOCAL, _PROXY = 0x0, 0x1
#: The family and protocol bytes proxy-protocol.txt defines, with their address block size.
_ADDRESS_SIZE = {0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}
_TCP = {0x11: ProxyFamily.TCP4, 0x21: ProxyFamily.TCP6}
_TLV_CRC32C = 0x03


def _parse_v2(data: bytes) -> Result:
    n = min(len(data), len(V2_SIGNATURE))
    if data[:n] != V2_SIGNATURE[:n]:
        return _not_proxy(data)
    if len(data) < _V2_FIXED:
        return NeedMore(_V2_FIXED)
    ver_cmd, fam, size = _FIXED.unpack_from(data, len(V2_SIGNATURE))
    if ver_cmd >> 4 != 2:
        return ProxyError(ProxyReason.BAD_VERSION, f"version {ver_cmd >> 4}, not 2")
    command = ver_cmd & 0x0F
    if command not in (_LOCAL, _PROXY):
        return ProxyError(ProxyReason.BAD_COMMAND, f"command {command}, not LOCAL or PROXY")
    # LOCAL: the balancer's own connection (a health check). proxy-protocol.txt:
    # the receiver "must discard the protocol block including the family", so
    # neither the family nor the block's size is checked for it; its TLVs are
    # read (and a CRC32C checked) only where a known family says where they begin.
    local = command == _LOCAL
    block = _ADDRESS_SIZE.get(fam)
    if not local:
        if block is None:
            return ProxyError(ProxyReason.BAD_FAMILY, f"family and protocol 0x{fam:02x}")
        if fam not in _TCP:
            return ProxyError(
                ProxyReason.UNSUPPORTED_FAMILY,
                f"family and protocol 0x{fam:02x}: only TCP over IPv4 or IPv6 is relayed",
            )
    total = _V2_FIXED + size
    if total > V2_MAX:
        return ProxyError(ProxyReason.V2_TOO_LONG, f"a header of {total} bytes, more than {V2_MAX}")
    if block is not None and size < block and not local:
        return ProxyError(
            ProxyReason.BAD_ADDRESS,
            f"{size} bytes of addresses, less than the {block} of 0x{fam:02x}",
        )
    if len(data) < total:
        return NeedMore(total)
    header = data[:total]
    if block is None or size < block:  # LOCAL, its block discarded whole
        return Local(version=2, length=total, tlvs=())
    tlvs = _tlvs(header, _V2_FIXED + block)
    if isinstance(tlvs, ProxyError):
        return tlvs
    if local:
        return Local(version=2, length=total, tlvs=tlvs)
    family = _TCP[fam]
    width = 4 if family is ProxyFamily.TCP4 else 16
    src = _packed(header[16 : 16 + width])
    dst = _packed(header[16 + width : 16 + 2 * width])
    sport, dport = _PORTS.unpack_from(header, 16 + 2 * width)
    return Proxied(2, total, family, src, sport, dst, dport, tlvs)


_MAPPED = bytes(10) + b"\xff\xff"


def _packed(raw: bytes) -> str:
    """A packed address as text, IPv4-mapped IPv6 as IPv4 (ipaddress only for IPv6)."""
    if len(raw) == 16 and raw[:12] == _MAPPED:
        raw = raw[12:]
    if len(raw) == 4:
        return f"{raw[0]}.{raw[1]}.{raw[2]}.{raw[3]}"
    return str(ipaddress.IPv6Address(raw))


def _tlvs(header: bytes, offset: int) -> tuple[Tlv, ...] | ProxyError:
    """The TLVs from `offset` to the end of `header`, the CRC32C among them checked."""
    found: list[Tlv] = []
    crc_at = -1
    while offset < len(header):
        if offset + _TLV_HEAD.size > len(header):
            return ProxyError(ProxyReason.BAD_TLV, f"{len(header) - offset} stray bytes at the end")
        kind, size = _TLV_HEAD.unpack_from(header, offset)
        start = offset + _TLV_HEAD.size
        if start + size > len(header):
            return ProxyError(
                ProxyReason.BAD_TLV, f"TLV 0x{kind:02x} of {size} bytes runs past the header"
            )
        if kind == _TLV_CRC32C:
            if size != 4 or crc_at >= 0:
                return ProxyError(ProxyReason.BAD_TLV, "a CRC32C TLV not of 4 bytes, or two")
            crc_at = start
        found.append(Tlv(kind, header[start : start + size]))
        offset = start + size
    if crc_at >= 0:
        sent = int.from_bytes(header[crc_at : crc_at + 4], "big")
        zeroed = header[:crc_at] + bytes(4) + header[crc_at + 4 :]
        if crc32c(zeroed) != sent:
            return ProxyError(ProxyReason.BAD_CRC32C, f"CRC32C 0x{sent:08x} does not match")
    return tuple(found)


# -- CRC32C (Castagnoli, RFC 3720 / RFC 4960 appendix B) --------------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """The CRC32C of `data`, as the PP2_TYPE_CRC32C TLV carries it (big-endian on the wire).

    Table-driven, a byte at a time: only a header that carries the TLV pays for it,
    and a header is at most V2_MAX bytes.
    """
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF

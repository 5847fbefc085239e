"""The DNS messages of a list lookup, built and read with no I/O.

A list lookup is one question, the A records of a name, and an answer that
needs a few A records at most (RFC 5782: a list answers 127.0.0.2 and its
like). So the query asks with a small EDNS buffer (`EDNS_PAYLOAD`, RFC 6891),
and `read` takes only what such an answer holds, bounded before any record is
looked at: a datagram longer than `MAX_SIZE`, more than `MAX_RECORDS` records
in a section, or the truncation bit (TC) is no answer, and a list is never
asked again over TCP (a hijacked or expired list domain answering with 2,000
A records cost 138 ms of parsing each through a full parser; here it costs a
look at the header). What remains is read in one pass, every offset checked,
every compression pointer going backwards (so that no loop can be built).

`read` tells apart what is not an answer to our question (None: a stray, a
late or a forged datagram, a wrong question; the query keeps waiting, as
resolvers do) from an answer that says nothing (`Reply.error`: SERVFAIL,
REFUSED, truncated, oversized, malformed: the list did not answer).

Why not dnspython's dns.message here: make_query costs some 85 µs and
from_wire 100 to 180 µs for these small messages (2026-12-06, this box), a
second of CPU for every 4,000 answers under a flood of new addresses; this
reads them in a few microseconds and refuses a hostile answer before reading
it. dnspython stays the oracle in the tests (tests/unit/test_dnswire.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from repeld.core.dnsbl import negative_ttl

__all__ = [
    "EDNS_PAYLOAD",
    "END",
    "MAX_RECORDS",
    "MAX_SIZE",
    "Reply",
    "checked",
    "labels",
    "query",
    "question",
    "read",
]

#: The UDP payload a query says it takes (RFC 6891 section 6.2.5; the minimum of
#: RFC 1035): an answer of a few A records needs a tenth of it.
EDNS_PAYLOAD = 512
#: The longest datagram read as an answer; a longer one is no answer. Above
#: EDNS_PAYLOAD (a server that rounds it up is not refused) and at the DNS flag
#: day's 1232 bytes.
MAX_SIZE = 1232
#: The most records read in a section; more is no answer (a list answers with one
#: or a few).
MAX_RECORDS = 16

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")  # type, class, TTL, length of the data
_A, _CNAME, _SOA, _IN = 1, 5, 6, 1
_NOERROR, _NXDOMAIN = 0, 3
_QR, _TC, _RD = 0x8000, 0x0200, 0x0100
#: The OPT pseudo-record (RFC 6891): root name, type 41, the payload as class,
#: no extended rcode, version 0, no flags (no DNSSEC: a list's answer is not signed).
_OPT = b"\x00\x00\x29" + struct.pack("!H", EDNS_PAYLOAD) + b"\x00\x00\x00\x00\x00\x00"


class _Malformed(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer to our question: the A records' addresses (empty: not listed,
    NXDOMAIN or no A record), how long it may be kept, or why it says nothing."""

    addresses: tuple[str, ...] = ()
    ttl: float = 0.0
    #: None for an answer; else "servfail", "refused", "rcode N", "truncated",
    #: "oversized" or "malformed": the list did not answer.
    error: str | None = None


def labels(name: str) -> bytes:
    """`name`'s labels in wire form, without the root's: a part of a question
    (`question(prefix + "." + domain)` is `labels(prefix) + labels(domain) + END`).

    ValueError for a name DNS cannot carry (an empty or too long label,
    anything not ASCII).
    """
    wire = bytearray()
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise ValueError(f"bad label {label!r} in {name!r}")
        wire.append(len(raw))
        wire += raw
    return bytes(wire)


#: What ends a question after its labels: the root, type A, class IN.
END = b"\x00" + struct.pack("!HH", _A, _IN)


def question(name: str) -> bytes:
    """The question section asking the A records of `name` (class IN).

    ValueError for a name DNS cannot carry (see `labels`; or longer than 255 bytes).
    """
    return checked(labels(name) + END)


def checked(asked: bytes) -> bytes:
    """`asked` (labels + END), or ValueError if its name is longer than 255 bytes."""
    if len(asked) - 4 > 255:
        raise ValueError("name too long")
    return asked


def query(qid: int, asked: bytes) -> bytes:
    """The datagram asking `asked` (from `question`) with id `qid`: recursion
    desired, an OPT record with EDNS_PAYLOAD."""
    return _HEADER.pack(qid, _RD, 1, 0, 0, 1) + asked + _OPT


def read(data: bytes, asked: bytes) -> Reply | None:
    """What the datagram `data` answers to the question `asked` (whose id the
    shell matched already), or None if it is no answer to it."""
    if len(data) < 12:
        return None
    _, flags, qdcount, ancount, nscount, _ = _HEADER.unpack_from(data)
    if not flags & _QR or flags & 0x7800 or qdcount != 1:  # a query, another opcode
        return None
    end = 12 + len(asked)
    if data[12:end].lower() != asked.lower():  # another question: not ours
        return None
    if len(data) > MAX_SIZE or ancount > MAX_RECORDS or nscount > MAX_RECORDS:
        return Reply(error="oversized")
    if flags & _TC:
        return Reply(error="truncated")
    rcode = flags & 0xF
    if rcode not in (_NOERROR, _NXDOMAIN):
        return Reply(error={2: "servfail", 5: "refused"}.get(rcode, f"rcode {rcode}"))
    try:
        offset, addresses, ttl = _answers(data, end, ancount, asked[:-4].lower())
        if rcode == _NOERROR and addresses:
            return Reply(addresses, float(ttl))
        return Reply((), _negative(data, offset, nscount))
    except (_Malformed, IndexError, struct.error):
        return Reply(error="malformed")


def _answers(
    data: bytes, offset: int, count: int, target: bytes
) -> tuple[int, tuple[str, ...], int]:
    # The A records of `target`, following a CNAME chain in order; the offset of
    # the authority section, and the least TTL of the records taken.
    addresses: list[str] = []
    ttl = 1 << 31
    for _ in range(count):
        owner, offset = _name(data, offset)
        rtype, rclass, rttl, length = _RR.unpack_from(data, offset)
        offset += _RR.size
        if offset + length > len(data):
            raise _Malformed("record data past the end")
        if rclass == _IN and owner == target:
            if rtype == _A and length == 4:
                a, b, c, d = data[offset : offset + 4]
                addresses.append(f"{a}.{b}.{c}.{d}")
                ttl = min(ttl, rttl)
            elif rtype == _CNAME:
                target, _ = _name(data, offset)
                ttl = min(ttl, rttl)
        offset += length
    return offset, tuple(addresses), ttl


def _negative(data: bytes, offset: int, count: int) -> float:
    # How long "not listed" is kept: from the SOA of the authority section (RFC 2308).
    for _ in range(count):
        offset = _skip(data, offset)
        rtype, rclass, rttl, length = _RR.unpack_from(data, offset)
        offset += _RR.size
        if offset + length > len(data):
            raise _Malformed("record data past the end")
        if rtype == _SOA and rclass == _IN:
            at = _skip(data, _skip(data, offset))  # the primary server, the mailbox
            if at + 20 > offset + length:
                raise _Malformed("short SOA")
            minimum = struct.unpack_from("!I", data, at + 16)[0]
            return negative_ttl(rttl, minimum)
        offset += length
    return negative_ttl(None, None)


def _name(data: bytes, offset: int) -> tuple[bytes, int]:
    # A name in wire form, lower case, uncompressed; and the offset after it.
    # A pointer must point before the label it replaces: no loop can be built.
    name = bytearray()
    after = -1
    while True:
        size = data[offset]
        if size == 0:
            name.append(0)
            return bytes(name).lower(), (offset + 1 if after < 0 else after)
        if size & 0xC0 == 0xC0:
            pointer = (size & 0x3F) << 8 | data[offset + 1]
            if after < 0:
                after = offset + 2
            if pointer >= offset:
                raise _Malformed("a compression pointer that does not point back")
            offset = pointer
            continue
        if size & 0xC0:
            raise _Malformed("an unknown label type")
        if offset + 1 + size > len(data):
            raise _Malformed("a label past the end")
        name += data[offset : offset + 1 + size]
        if len(name) > 255:
            raise _Malformed("a name longer than 255 bytes")
        offset += 1 + size


def _skip(data: bytes, offset: int) -> int:
    # The offset after the name at `offset`, read no further than needed: its
    # labels up to the root or to a pointer (which ends a name in place).
    while True:
        size = data[offset]
        if size == 0:
            return offset + 1
        if size & 0xC0 == 0xC0:
            if offset + 1 >= len(data):
                raise _Malformed("a pointer cut short")
            return offset + 2
        if size & 0xC0:
            raise _Malformed("an unknown label type")
        offset += 1 + size
        if offset > len(data):
            raise _Malformed("a label past the end")

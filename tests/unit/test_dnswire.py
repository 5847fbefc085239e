"""The list lookups' DNS messages (core/dnswire.py), with dnspython as the oracle:
it reads the queries built here and builds the answers read here."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given
from hypothesis import strategies as st

from repeld.core.dnsbl import NEGATIVE_TTL, negative_ttl
from repeld.core.dnswire import EDNS_PAYLOAD, MAX_RECORDS, MAX_SIZE, Reply, query, question, read

NAME = "2.0.0.127.bl.test"
ASKED = question(NAME)


def _query() -> dns.message.Message:
    return dns.message.from_wire(query(0x1234, ASKED))


def _response(*answers: str, ttl: int = 300) -> dns.message.Message:
    reply = dns.message.make_response(_query())
    if answers:
        reply.answer.append(dns.rrset.from_text(NAME + ".", ttl, "IN", "A", *answers))
    return reply


def _soa(reply: dns.message.Message, ttl: int, minimum: int) -> dns.message.Message:
    soa = f"ns.bl.test. hostmaster.bl.test. 1 3600 600 86400 {minimum}"
    reply.authority.append(dns.rrset.from_text("bl.test.", ttl, "IN", "SOA", soa))
    return reply


def test_the_query_is_what_dnspython_reads() -> None:
    q = _query()
    assert q.id == 0x1234
    assert q.flags & dns.flags.RD and not q.flags & dns.flags.QR
    assert [(str(r.name), r.rdtype, r.rdclass) for r in q.question] == [(NAME + ".", 1, 1)]
    assert (q.edns, q.payload, q.ednsflags) == (0, EDNS_PAYLOAD, 0)


@pytest.mark.parametrize("name", ["", "a..b", "x" * 64 + ".test", ".".join(["x" * 63] * 5)])
def test_a_name_dns_cannot_carry_is_refused(name: str) -> None:
    with pytest.raises(ValueError):
        question(name)


def test_listed() -> None:
    assert read(_response("127.0.0.2").to_wire(), ASKED) == Reply(("127.0.0.2",), 300.0)
    got = read(_response("127.0.0.2", "127.0.0.4", ttl=60).to_wire(), ASKED)
    assert got is not None and sorted(got.addresses) == ["127.0.0.2", "127.0.0.4"]
    assert got.ttl == 60.0


def test_a_cname_chain_is_followed_in_order() -> None:
    reply = _response()
    reply.answer.append(dns.rrset.from_text(NAME + ".", 100, "IN", "CNAME", "x.other.test."))
    reply.answer.append(dns.rrset.from_text("x.other.test.", 300, "IN", "A", "127.0.0.3"))
    reply.answer.append(dns.rrset.from_text("y.other.test.", 300, "IN", "A", "127.0.0.9"))
    assert read(reply.to_wire(), ASKED) == Reply(("127.0.0.3",), 100.0)


@pytest.mark.parametrize(
    ("rcode", "soa", "ttl"),
    [
        (dns.rcode.NXDOMAIN, (900, 600), 600.0),  # RFC 2308: the lesser of the two
        (dns.rcode.NXDOMAIN, (900, 10), NEGATIVE_TTL),  # ... at least a minute
        (dns.rcode.NXDOMAIN, None, NEGATIVE_TTL),
        (dns.rcode.NOERROR, (120, 3600), 120.0),  # no A record: not listed either
    ],
)
def test_not_listed_and_for_how_long(
    rcode: dns.rcode.Rcode, soa: tuple[int, int] | None, ttl: float
) -> None:
    reply = _response()
    reply.set_rcode(rcode)
    if soa is not None:
        _soa(reply, *soa)
    assert read(reply.to_wire(), ASKED) == Reply((), ttl)


@pytest.mark.parametrize(
    ("rcode", "error"),
    [(dns.rcode.SERVFAIL, "servfail"), (dns.rcode.REFUSED, "refused"), (4, "rcode 4")],
)
def test_an_error_is_no_answer(rcode: int, error: str) -> None:
    reply = _response()
    reply.set_rcode(dns.rcode.Rcode(rcode))
    assert read(reply.to_wire(), ASKED) == Reply(error=error)


def test_a_truncated_answer_is_no_answer_and_never_asked_over_tcp() -> None:
    reply = _response("127.0.0.2")
    reply.flags |= dns.flags.TC
    assert read(reply.to_wire(), ASKED) == Reply(error="truncated")


def test_a_huge_answer_is_refused_before_it_is_read() -> None:
    addresses = [f"127.0.{i // 250}.{i % 250}" for i in range(2000)]
    wire = _response(*addresses).to_wire(max_size=65535)
    assert len(wire) > 30_000
    assert read(wire, ASKED) == Reply(error="oversized")
    many = _response(*addresses[: MAX_RECORDS + 1]).to_wire()
    assert len(many) < MAX_SIZE
    assert read(many, ASKED) == Reply(error="oversized")
    assert read(_response(*addresses[:MAX_RECORDS]).to_wire(), ASKED) is not None


def test_what_answers_another_question_is_not_an_answer() -> None:
    other = dns.message.make_query("3.0.0.127.bl.test", "A")
    reply = dns.message.make_response(other)
    reply.id = 0x1234
    assert read(reply.to_wire(), ASKED) is None
    assert read(query(0x1234, ASKED), ASKED) is None  # a query is no answer
    assert read(b"\x12\x34", ASKED) is None
    # The same name in other letters is the same question (RFC 4343).
    upper = _response("127.0.0.2").to_wire().replace(b"bl\x04test", b"BL\x04TEST")
    assert read(upper, ASKED) == Reply(("127.0.0.2",), 300.0)


def _header(ancount: int) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, 0x8180, 1, ancount, 0, 0) + ASKED


@pytest.mark.parametrize(
    "records",
    [
        b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04\x7f\x00",  # data past the end
        b"\xc0\x0c\x00\x01",  # a record cut short
        b"\xc0\x40\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04\x7f\x00\x00\x02",  # pointer ahead
        b"\xc0\x27\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04\x7f\x00\x00\x02",  # to itself
        b"\x80\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04\x7f\x00\x00\x02",  # a bad label type
        b"\x3f",  # a label past the end
    ],
)
def test_a_malformed_answer_is_no_answer(records: bytes) -> None:
    assert read(_header(1) + records, ASKED) == Reply(error="malformed")


@given(st.binary(max_size=600))
def test_any_bytes_after_the_question_are_read_without_an_exception(tail: bytes) -> None:
    result = read(_header(2) + tail, ASKED)
    assert result is None or isinstance(result, Reply)


@given(st.binary(max_size=200), st.integers(0, 199))
def test_any_cut_or_changed_answer_is_read_without_an_exception(noise: bytes, at: int) -> None:
    wire = _soa(_response("127.0.0.2", "127.0.0.3"), 900, 600).to_wire()
    result = read(wire[:at] + noise, ASKED)
    assert result is None or isinstance(result, Reply)


@given(
    st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), min_size=1, max_size=16),
    st.integers(0, 2**31 - 1),
)
def test_the_addresses_are_those_dnspython_reads(octets: list[tuple[int, int]], ttl: int) -> None:
    addresses = sorted({f"127.0.{a}.{b}" for a, b in octets})
    wire = _response(*addresses, ttl=ttl).to_wire()
    oracle = dns.message.from_wire(wire).resolve_chaining()  # type: ignore[attr-defined]
    assert oracle.answer is not None
    got = read(wire, ASKED)
    assert got is not None
    assert sorted(got.addresses) == sorted(r.address for r in oracle.answer)
    assert got.ttl == float(oracle.answer.ttl)


@given(
    st.sampled_from([dns.rcode.NXDOMAIN, dns.rcode.NOERROR]),
    st.integers(0, 2**31 - 1),
    st.integers(0, 2**31 - 1),
    st.sampled_from(["bl.test.", "test.", "a.b.c.bl.test."]),
)
def test_the_negative_ttl_is_what_dnspython_reads(
    rcode: dns.rcode.Rcode, ttl: int, minimum: int, zone: str
) -> None:
    reply = _response()
    reply.set_rcode(rcode)
    soa = f"ns.{zone} hostmaster.{zone} 1 3600 600 86400 {minimum}"
    reply.authority.append(dns.rrset.from_text(zone, ttl, "IN", "SOA", soa))
    wire = reply.to_wire()
    (rrset,) = dns.message.from_wire(wire).authority
    assert read(wire, ASKED) == Reply((), negative_ttl(rrset.ttl, rrset[0].minimum))

"""The intake phase behind a balancer (--proxy-from), in-process on real loopback
sockets with the autojump clock: the balancer is a raw client socket that writes
PROXY headers byte for byte as HAProxy and nginx do (tests/system has the real ones).
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
import trio
import trio.testing

from repeld.core.names import ProxyOutcome
from repeld.core.proxyproto import V2_SIGNATURE, v1, v2
from repeld.service.tcptune import Acceptor

from ..harness import GREETING, connect, read_line, read_until_closed, running

DELAY = 25.0
#: The balancer connects from here; ordinary clients from 127.0.0.2 and up.
BALANCER = "127.0.0.1"
FROM_BALANCER: dict[str, Any] = {"proxy_from": (f"{BALANCER}/32",), "delay": DELAY}
LOCAL_V2 = V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0)


async def _through(h_address: tuple[str, int], header: bytes) -> trio.socket.SocketType:
    sock = await connect(h_address, source=BALANCER)
    await sock.send(header)
    return sock


async def test_a_patient_client_through_the_balancer_is_that_client_everywhere(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(backend_proxy=True, proxy_protocol="v2", **FROM_BALANCER) as h:
        port = h.address()[1]
        sock = await _through(h.address(), v2("192.0.2.7", 40001, "198.51.100.25", 25))
        start = trio.current_time()
        assert await read_line(sock) == GREETING
        assert DELAY <= trio.current_time() - start < DELAY + 0.1
        (passed,) = await h.receiver.wait_for("pass")
        assert passed.fields["client"] == "192.0.2.7"
        assert passed.fields["client_port"] == "40001"
        assert (passed.fields["server"], passed.fields["server_port"]) == ("198.51.100.25", "25")
        assert passed.fields["via"] == BALANCER
        assert passed.fields["reason"] == "delay"
        # the MTA hears of the real client, both ends from the balancer's header
        (info,) = h.backend.headers
        assert info is not None
        assert (info.src, info.src_port, info.dst, info.dst_port) == (
            "192.0.2.7",
            40001,
            "198.51.100.25",
            25,
        )
        assert port != 25  # the header's destination, not repeld's own listener
        sock.close()
        snap = h.server.metrics_snapshot() if h.server.metrics else None
        assert snap is None or snap["labelled"]["proxy"]["client"] == 1
        assert h.server.intake.outcomes[ProxyOutcome.CLIENT] == 1


async def test_bytes_after_the_header_are_early_talk_of_the_real_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(**FROM_BALANCER) as h:
        sock = await _through(h.address(), v1("192.0.2.8", 40002, "198.51.100.25", 25))
        await trio.sleep(3.0)
        await sock.send(b"EHLO bot.example\r\n")
        data, how = await read_until_closed(sock)
        assert how == "reset" and data == b""
        (talker,) = await h.receiver.wait_for("early-talker")
        assert talker.fields["client"] == "192.0.2.8"
        assert talker.fields["via"] == BALANCER
        assert talker.fields["first"] == "EHLO bot.example\\r\\n"
        # the delay counted from the header: the talk came 3 s after it
        assert float(talker.fields["elapsed"]) == pytest.approx(3.0, abs=0.01)
        assert h.receiver.named("proxy-error") == []


async def test_talk_in_the_same_segment_as_the_header_is_early_talk(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(**FROM_BALANCER) as h:
        header = v2("192.0.2.9", 40003, "198.51.100.25", 25)
        sock = await _through(h.address(), header + b"EHLO pipelined\r\n")
        assert (await read_until_closed(sock))[1] == "reset"
        (talker,) = await h.receiver.wait_for("early-talker")
        assert talker.fields["client"] == "192.0.2.9"
        assert talker.fields["bytes"] == str(len(b"EHLO pipelined\r\n"))


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_a_header_one_byte_per_segment_works_and_the_delay_starts_at_its_end(
    version: str, autojump_clock: trio.testing.MockClock
) -> None:
    header = (v1 if version == "v1" else v2)("192.0.2.10", 40004, "198.51.100.25", 25)
    async with running(**FROM_BALANCER) as h:
        sock = await connect(h.address(), source=BALANCER)
        for i in range(len(header)):
            await sock.send(header[i : i + 1])
            await trio.sleep(0.05)
        done = trio.current_time()
        assert await read_line(sock) == GREETING
        assert trio.current_time() - done == pytest.approx(DELAY - 0.05, abs=0.06)
        (passed,) = await h.receiver.wait_for("pass")
        assert passed.fields["client"] == "192.0.2.10"
        assert float(passed.fields["elapsed"]) == pytest.approx(DELAY, abs=0.06)
        sock.close()


@pytest.mark.parametrize(("version", "header"), [("v2", LOCAL_V2), ("v1", b"PROXY UNKNOWN\r\n")])
async def test_a_health_check_goes_straight_to_the_mta_and_is_no_client(
    version: str, header: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(
        backend_proxy=True, proxy_protocol=version, metrics="127.0.0.1:0", **FROM_BALANCER
    ) as h:
        sock = await _through(h.address(), header)
        checker_port = sock.getsockname()[1]
        start = trio.current_time()
        assert await read_line(sock) == GREETING  # at once: the check sees the MTA's 220
        assert trio.current_time() - start < 0.5
        await sock.send(b"QUIT\r\n")
        assert await read_line(sock) == b"221 2.0.0 bye\r\n"
        await read_until_closed(sock)
        sock.close()
        await trio.sleep(1.0)
        (info,) = h.backend.headers
        # The MTA is told the balancer, as it would be without repeld: never
        # LOCAL / UNKNOWN, for which it takes repeld's own address (trusted?).
        assert info is not None and (info.src, info.dst) == (BALANCER, h.address()[0])
        assert info.src_port == checker_port
        names = {m.event for m in h.receiver.messages}
        assert not names & {"pass", "early-talker", "hangup", "relay-end", "proxy-error"}
        snap = h.server.metrics_snapshot()
        assert snap["labelled"]["proxy"]["check"] == 1
        assert len(h.server.pen) == 0


async def test_connect_and_close_is_a_tcp_check_and_says_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(**FROM_BALANCER) as h:
        sock = await connect(h.address(), source=BALANCER)
        sock.close()
        await trio.sleep(1.0)
        assert h.receiver.messages == []
        assert h.server.intake.outcomes[ProxyOutcome.CHECK] == 1


async def test_connect_and_reset_is_a_tcp_check_and_says_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A checker that ends its connect-only check with an RST (SO_LINGER 0), as
    # some layer-4 checkers do: a check, not a proxy-error every interval.
    async with running(**FROM_BALANCER) as h:
        sock = await connect(h.address(), source=BALANCER)
        await trio.sleep(0.1)  # accepted and waiting in the intake
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        await trio.sleep(1.0)
        assert h.receiver.messages == []
        assert h.server.intake.outcomes[ProxyOutcome.CHECK] == 1


@pytest.mark.parametrize(
    ("sent", "reason"),
    [
        (b"EHLO bot.example\r\n", "not-proxy"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.25 1234\r\n", "malformed-v1"),
        (b"PROXY TCP4 192.0.2.1 198.51.100.25 1234 25 " + b"x" * 80 + b"\r\n", "malformed-v1"),
        (V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "bad-version"),
        (V2_SIGNATURE + b"\x2f\x11\x00\x0c" + bytes(12), "bad-command"),
        (V2_SIGNATURE + b"\x21\x77\x00\x0c" + bytes(12), "bad-family"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "v2-too-long"),
    ],
)
async def test_bad_input_from_the_balancer_is_a_proxy_error_never_an_early_talker(
    sent: bytes, reason: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(**FROM_BALANCER) as h:
        sock = await _through(h.address(), sent)
        assert (await read_until_closed(sock))[1] == "reset"
        (error,) = await h.receiver.wait_for("proxy-error")
        assert error.fields["reason"] == reason
        assert error.fields["client"] == BALANCER and error.fields["via"] == BALANCER
        assert error.severity == 4
        assert h.receiver.named("early-talker") == []
        assert h.backend.sessions == 0


async def test_no_header_within_the_proxy_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(proxy_timeout=5.0, **FROM_BALANCER) as h:
        sock = await _through(h.address(), b"PROXY TCP4 192.0.2.1 ")  # and then nothing
        start = trio.current_time()
        assert (await read_until_closed(sock))[1] == "reset"
        assert trio.current_time() - start == pytest.approx(5.0, abs=0.1)
        (error,) = await h.receiver.wait_for("proxy-error")
        assert error.fields["reason"] == "timeout"
        assert "21 bytes" in error.fields["detail"]
        assert h.server.intake.outcomes[ProxyOutcome.TIMEOUT] == 1


async def test_closed_within_the_header_is_a_proxy_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(**FROM_BALANCER) as h:
        sock = await _through(h.address(), V2_SIGNATURE[:8])
        await trio.sleep(0.5)
        sock.close()
        (error,) = await h.receiver.wait_for("proxy-error")
        assert error.fields["reason"] == "truncated"


async def test_an_ordinary_client_that_sends_a_proxy_header_is_an_early_talker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(**FROM_BALANCER) as h:
        sock = await connect(h.address(), source="127.0.0.2")
        await sock.send(v1("192.0.2.66", 1, "198.51.100.25", 25))
        assert (await read_until_closed(sock))[1] == "reset"
        (talker,) = await h.receiver.wait_for("early-talker")
        assert talker.fields["client"] == "127.0.0.2"
        assert "via" not in talker.fields
        assert h.receiver.named("proxy-error") == []


async def test_trusted_networks_see_the_real_client_not_the_balancer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(trusted=("192.0.2.0/24",), **FROM_BALANCER) as h:
        trusted = await _through(h.address(), v2("192.0.2.20", 40005, "198.51.100.25", 25))
        assert await read_line(trusted) == GREETING  # at once
        other = await _through(h.address(), v2("203.0.113.5", 40006, "198.51.100.25", 25))
        with trio.move_on_after(DELAY - 1):
            await read_line(other)
            pytest.fail("a client outside the trusted networks was greeted early")
        (passed,) = await h.receiver.wait_for("pass")
        assert (passed.fields["client"], passed.fields["reason"]) == ("192.0.2.20", "trusted")
        trusted.close()
        other.close()


async def test_max_per_client_counts_the_real_clients_not_the_balancer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(max_per_client=1, **FROM_BALANCER) as h:
        socks = []
        for i in range(5):  # five clients through one balancer: all held
            socks.append(
                await _through(h.address(), v2(f"192.0.2.{30 + i}", 1000 + i, "198.51.100.25", 25))
            )
        await trio.sleep(1.0)
        assert len(h.server.pen) == 5
        again = await _through(h.address(), v2("192.0.2.30", 2000, "198.51.100.25", 25))
        assert await read_line(again) == b"421 4.7.0 Too many connections\r\n"
        assert h.server.statistics()["refused"] == 1
        for sock in [*socks, again]:
            sock.close()


@pytest.mark.parametrize(("prefix", "refused"), [(64, 1), (128, 0)])
async def test_max_per_client_counts_an_ipv6_client_by_its_network(
    autojump_clock: trio.testing.MockClock, prefix: int, refused: int
) -> None:
    # One IPv6 host owns a /64: counted by address, it could fill --max-held from
    # it alone. It counts by --cache-v6-prefix, as the pass cache remembers it.
    async with running(max_per_client=2, cache_v6_prefix=prefix, **FROM_BALANCER) as h:
        socks = []
        for i, client in enumerate(
            ["2001:db8:1:2::a", "2001:db8:1:2::b", "2001:db8:1:2::c", "2001:db8:1:3::a"]
        ):
            header = v2(client, 40000 + i, "2001:db8::25", 25)
            socks.append(await _through(h.address(), header))
        await trio.sleep(1.0)
        assert len(h.server.pen) == 4 - refused
        assert h.server.statistics()["refused"] == refused
        if refused:  # the third of its /64; the other /64 is held
            assert await read_line(socks[2]) == b"421 4.7.0 Too many connections\r\n"
        for sock in socks:
            sock.close()


async def test_a_reload_does_not_change_what_the_cache_keys_an_ipv6_client_by(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # --cache-v6-prefix takes effect after a restart (the reload event says so):
    # a reload that changes it must not change the keys the cache learns under.
    import dataclasses

    from repeld.cache.memory import MemoryCache
    from repeld.cache.spec import parse_cache_url

    async with running(
        cache=parse_cache_url("memory"), penalty_ttl=600.0, cache_v6_prefix=64, **FROM_BALANCER
    ) as h:
        server = h.server
        server.apply(
            dataclasses.replace(server.settings, cache_v6_prefix=128),
            server.admission.policy.trusted,
            None,
        )
        sock = await _through(h.address(), v2("2001:db8:1:2::a", 40001, "2001:db8::25", 25))
        await sock.send(b"EHLO bot\r\n")
        await h.receiver.wait_for("early-talker")
        await trio.sleep(1.0)  # the cache's writer
        assert isinstance(server.cache, MemoryCache)
        assert list(server.cache._entries) == ["2001:db8:1:2::/64"]
        sock.close()


async def test_an_ipv6_client_through_an_ipv4_balancer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(backend_proxy=True, proxy_protocol="v2", **FROM_BALANCER) as h:
        sock = await _through(h.address(), v1("2001:db8::7", 40007, "2001:db8::25", 25))
        assert await read_line(sock) == GREETING
        (passed,) = await h.receiver.wait_for("pass")
        assert passed.fields["client"] == "2001:db8::7"
        (info,) = h.backend.headers
        assert info is not None and (info.src, info.dst) == ("2001:db8::7", "2001:db8::25")
        sock.close()


async def test_a_reload_adds_and_removes_balancers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    import dataclasses

    from repeld.core.policy import TrustedNetworks

    async with running(delay=DELAY) as h:
        server = h.server
        server.apply(
            dataclasses.replace(server.settings, proxy_from=(f"{BALANCER}/32",)),
            TrustedNetworks(()),
            server.backend,
        )
        sock = await _through(h.address(), v2("192.0.2.40", 40008, "198.51.100.25", 25))
        assert await read_line(sock) == GREETING
        (passed,) = await h.receiver.wait_for("pass")
        assert passed.fields["client"] == "192.0.2.40"
        sock.close()
        server.apply(
            dataclasses.replace(server.settings, proxy_from=()),
            TrustedNetworks(()),
            server.backend,
        )
        plain = await _through(h.address(), v2("192.0.2.41", 40009, "198.51.100.25", 25))
        assert (await read_until_closed(plain))[1] == "reset"
        (talker,) = await h.receiver.wait_for("early-talker")
        assert talker.fields["client"] == BALANCER  # no longer a balancer: early talk


async def test_an_ipv4_client_through_an_ipv6_balancer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from repeld.config.settings import Listen

    async with running(
        backend_proxy=True,
        proxy_protocol="v1",
        listen=(Listen("::1", 0),),
        delay=DELAY,
        proxy_from=("::1/128",),
    ) as h:
        sock = await connect(h.address(), source="::1")
        await sock.send(v2("192.0.2.50", 40010, "198.51.100.25", 25))
        assert await read_line(sock) == GREETING
        (passed,) = await h.receiver.wait_for("pass")
        assert (passed.fields["client"], passed.fields["via"]) == ("192.0.2.50", "::1")
        (info,) = h.backend.headers
        assert info is not None and (info.version, info.src, info.dst) == (
            1,
            "192.0.2.50",
            "198.51.100.25",
        )
        sock.close()


async def test_a_balancer_connection_reset_at_accept_is_no_hangup(
    autojump_clock: trio.testing.MockClock,
) -> None:
    import socket

    async with running(**FROM_BALANCER) as h:
        listener = h.server.listeners[0]
        listener.local = None  # as on a wildcard listener: the socket is asked
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.close()  # gone before its first call, as a reset leaves it: getsockname fails
        h.server.intake.accepted(sock, (BALANCER, 40000), listener)
        await trio.sleep(0.5)
        assert h.receiver.named("hangup") == []
        assert h.receiver.named("proxy-error") == []
        assert h.server.intake.outcomes[ProxyOutcome.RESET] == 1


async def test_an_ipv4_mapped_peer_is_its_ipv4_address_and_a_plain_one_as_it_came() -> None:
    # A dual-stack listener (systemd's, with BindIPv6Only=both) hands out IPv4
    # clients as ::ffff:a.b.c.d: the rules, the events and the MTA see a.b.c.d.
    # A plain IPv4 peer is taken as the kernel wrote it, without a lookup.
    async with running(trusted=("127.0.0.0/8",)) as h:
        listener = h.server.listeners[0]
        dual = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        dual.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        dual.bind(("::", 0))
        dual.listen(8)
        with dual:
            client = await connect(("127.0.0.1", dual.getsockname()[1]), source="127.0.0.9")
            taken = Acceptor(dual.fileno()).accept()
            for _ in range(100):
                if taken is not None:
                    break
                await trio.sleep(0.01)
                taken = Acceptor(dual.fileno()).accept()
            assert taken is not None
            fd, addr = taken
            assert addr[0] == "::ffff:127.0.0.9"
            h.server.intake.accepted(socket.socket(fileno=fd), addr, listener)
            (passed,) = await h.receiver.wait_for("pass")
            assert passed.fields["client"] == "127.0.0.9"
            assert passed.fields["reason"] == "trusted"
            client.close()
        plain = await connect(h.address(), source="127.0.0.10")
        (_, again) = await h.receiver.wait_for("pass", count=2)
        assert again.fields["client"] == "127.0.0.10"
        plain.close()

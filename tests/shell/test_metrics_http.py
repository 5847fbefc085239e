"""The --metrics endpoint in-process, with real clients on loopback.

http.client (the standard library's HTTP client) and raw sockets talk to a
MetricsEndpoint whose `render` the test controls, so the moments that a live
daemon only reaches by chance (every slot past its request, a render that
waits) are reached on purpose.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing

from repeld.shell.metrics_http import MetricsEndpoint, open_metrics_socket

BODY = b"# a body\nrepeld_held 0\n"


async def _instant() -> bytes:
    return BODY


@pytest.fixture
async def endpoint_factory() -> AsyncIterator[
    Callable[..., Awaitable[tuple[MetricsEndpoint, int]]]
]:
    async with trio.open_nursery() as nursery:

        async def start(
            render: Callable[[], Awaitable[bytes]] = _instant, **limits: float
        ) -> tuple[MetricsEndpoint, int]:
            endpoint = MetricsEndpoint(open_metrics_socket("127.0.0.1", 0), render, **limits)  # type: ignore[arg-type]
            nursery.start_soon(endpoint.run)
            return endpoint, endpoint.address[1]

        yield start
        nursery.cancel_scope.cancel()


def _http(port: int, method: str = "GET", target: str = "/metrics") -> tuple[int, bytes, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, target)
        answer = conn.getresponse()
        return answer.status, answer.read(), answer.headers.get("Content-Length", "")
    finally:
        conn.close()


def _raw(port: int, request: bytes, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(request)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        return answer


async def test_head_gets_get_s_headers_and_no_body(endpoint_factory: Callable[..., Awaitable[tuple[MetricsEndpoint, int]]]) -> None:  # fmt: skip
    _, port = await endpoint_factory()
    status, body, length = await trio.to_thread.run_sync(_http, port, "HEAD")
    assert (status, body, length) == (200, b"", str(len(BODY)))
    status, body, length = await trio.to_thread.run_sync(_http, port, "HEAD", "/other")
    assert (status, body) == (404, b"")
    # The raw bytes: headers, then the server's close, nothing in between.
    answer = await trio.to_thread.run_sync(_raw, port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\r\n\r\n")


async def test_an_absolute_form_target_is_its_path(endpoint_factory: Callable[..., Awaitable[tuple[MetricsEndpoint, int]]]) -> None:  # fmt: skip
    _, port = await endpoint_factory()
    target = f"http://127.0.0.1:{port}/metrics?name[]=repeld_held"
    assert await trio.to_thread.run_sync(_http, port, "GET", target) == (200, BODY, str(len(BODY)))
    answer = await trio.to_thread.run_sync(
        _raw, port, b"GET http://mx.example/other HTTP/1.1\r\nHost: mx.example\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 404 ")


async def test_a_dribbled_request_is_cut_at_its_deadline(endpoint_factory: Callable[..., Awaitable[tuple[MetricsEndpoint, int]]]) -> None:  # fmt: skip
    # One byte every 0.2 s would take 7 s; the deadline is 1 s from accept, however
    # steadily the bytes come.
    _, port = await endpoint_factory(read_timeout=1.0)

    def dribble() -> tuple[int, bytes]:
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            for sent, byte in enumerate(request):
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    return sent, b""
                time.sleep(0.2)
                s.setblocking(False)
                try:
                    answer = s.recv(100)
                except BlockingIOError:
                    answer = None
                s.setblocking(True)
                if answer is not None:
                    return sent + 1, answer
            return len(request), s.recv(100)

    sent, answer = await trio.to_thread.run_sync(dribble)
    assert sent < 20  # cut off well before the end of the request
    assert answer.startswith(b"HTTP/1.1 408 ") or answer == b""


async def test_slow_clients_make_room_for_a_scraper(endpoint_factory: Callable[..., Awaitable[tuple[MetricsEndpoint, int]]]) -> None:  # fmt: skip
    endpoint, port = await endpoint_factory(max_scrapes=2)
    # Two connections that have sent half a request hold both slots...
    slow = [
        socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.1.{i}", 0))
        for i in (1, 2)
    ]
    for s in slow:
        s.sendall(b"GET /metr")
    await trio.testing.wait_all_tasks_blocked()
    while endpoint.active < 2:
        await trio.sleep(0.01)
    # ...and a scraper still gets its answer: the oldest slow one made room.
    assert await trio.to_thread.run_sync(_http, port) == (200, BODY, str(len(BODY)))
    assert endpoint.evicted >= 1
    slow[0].settimeout(10)
    assert slow[0].recv(100) == b""  # closed
    for s in slow:
        s.close()


async def test_the_503_is_read_not_reset(endpoint_factory: Callable[..., Awaitable[tuple[MetricsEndpoint, int]]]) -> None:  # fmt: skip
    # The one slot is past its request (the render waits), so a newcomer is told 503:
    # http.client, which sends its request and then reads, must see the status.
    release = trio.Event()

    async def waiting() -> bytes:
        await release.wait()
        return BODY

    endpoint, port = await endpoint_factory(waiting, max_scrapes=1)
    async with trio.open_nursery() as nursery:
        first: list[tuple[int, bytes, str]] = []

        async def scrape_first() -> None:
            first.append(await trio.to_thread.run_sync(_http, port))

        nursery.start_soon(scrape_first)
        while endpoint.active < 1 or next(iter(endpoint._slots)).reading:
            await trio.sleep(0.01)
        for _ in range(5):  # every one of them, not just a lucky one
            status, body, _ = await trio.to_thread.run_sync(_http, port)
            assert (status, body) == (503, b"too many scrapes now\n")
        assert endpoint.busy == 5
        release.set()
    assert first == [(200, BODY, str(len(BODY)))]

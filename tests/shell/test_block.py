"""Carrying out a DNS list block on real loopback TCP sockets: reject sends the
554 line naming the lists and closes, drop resets the connection."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from repeld.core.dnsbl import DnsAction
from repeld.core.hold import Blocked
from repeld.shell.replies import block


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(the client's socket, the server's accepted one) over 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    server.setblocking(False)
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    for _ in range(100):  # bounded: the reply is one line, then EOF
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_reject_names_the_client_and_the_lists(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    verdict = Blocked(4, ("zen.spamhaus.org", "bl.example"), 0.25, DnsAction.REJECT)
    block(server, "127.0.0.1", verdict)
    assert server.fileno() == -1
    assert _read_all(client) == (
        b"554 5.7.1 Service unavailable; client [127.0.0.1] blocked using "
        b"zen.spamhaus.org, bl.example\r\n"
    )


def test_drop_resets(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    block(server, "127.0.0.1", Blocked(1, ("bl.example",), 0.25, DnsAction.DROP))
    assert server.fileno() == -1
    with pytest.raises(ConnectionResetError):
        _read_all(client)


@pytest.mark.parametrize("action", [DnsAction.LOG, DnsAction.DELAY])
def test_log_and_delay_do_not_end_a_connection(
    pair: tuple[socket.socket, socket.socket], action: DnsAction
) -> None:
    _, server = pair
    with pytest.raises(ValueError, match="does not end a connection"):
        block(server, "127.0.0.1", Blocked(1, ("bl.example",), 0.25, action))
    assert server.fileno() != -1  # untouched


def test_reject_of_an_observed_talker_takes_its_bytes_first(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    # --on-early log: the talker's bytes were only peeked. Closed with them unread,
    # the socket sent an RST and a pipelining client never read the 554.
    client, server = pair
    client.sendall(b"EHLO x\r\n")
    for _ in range(100):  # bounded: the bytes are in the server's queue at once
        try:
            if server.recv(8, socket.MSG_PEEK) == b"EHLO x\r\n":
                break
        except BlockingIOError:
            pass
    block(server, "192.0.2.1", Blocked(2, ("bl.example",), 25.0, DnsAction.REJECT), unread=8)
    assert _read_all(client).startswith(b"554 5.7.1 ")
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0  # a FIN, no reset

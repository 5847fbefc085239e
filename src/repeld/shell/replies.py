"""Every reply a client can see from repeld, and the ways its socket is ended.

The decisions are the core's (core/hold.py, core/policy.py, core/dnsbl.py);
shell/dispatch.py chooses which of these a verdict calls for, and this module
only does it to the socket: the SMTP lines repeld itself writes (the refusals at
a limit, the 554 to an early talker, the 421 at shutdown or when the MTA cannot
be reached), the teaser's non-blocking write, the abortive close.
"""

from __future__ import annotations

import socket

from repeld.core.dnsbl import DnsAction, reject_line
from repeld.core.hold import Blocked, EarlyTalk
from repeld.core.policy import Refuse
from repeld.service import tcptune

__all__ = [
    "BACKEND_UNAVAILABLE",
    "EARLY_REJECT",
    "REFUSALS",
    "SHUTTING_DOWN",
    "abort",
    "block",
    "cut_off",
    "reply_and_close",
    "rtt_ms",
    "send_now",
]

EARLY_REJECT = b"554 5.5.1 Protocol error: you talked before my greeting\r\n"
SHUTTING_DOWN = b"421 4.3.2 Service shutting down, try again later\r\n"
BACKEND_UNAVAILABLE = b"421 4.3.2 Service temporarily unavailable, try again later\r\n"
_SEND_FLAGS = getattr(socket, "MSG_DONTWAIT", 0) | getattr(socket, "MSG_NOSIGNAL", 0)

REFUSALS = {
    Refuse.MAX_HELD: b"421 4.3.2 All server ports are busy\r\n",
    Refuse.MAX_PER_CLIENT: b"421 4.7.0 Too many connections\r\n",
    Refuse.MAX_EXEC: b"421 4.3.2 All server ports are busy\r\n",
    Refuse.KERNEL: b"421 4.3.2 All server ports are busy\r\n",
}


def reply_and_close(sock: socket.socket, line: bytes) -> None:
    """Best-effort one-line reply on a non-blocking socket, then close it."""
    try:
        sock.send(line, _SEND_FLAGS)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    sock.close()


def rtt_ms(sock: socket.socket) -> float:
    """The kernel's smoothed round-trip time to the client, for the event (0 if unknown)."""
    return tcptune.rtt_ms(sock.fileno())


def send_now(sock: socket.socket, data: bytes) -> int | None:
    """Write what the socket takes without blocking (the teaser): how many bytes,
    or None if the connection has failed (reset, or gone)."""
    try:
        return sock.send(data, _SEND_FLAGS)
    except BlockingIOError:
        return 0
    except OSError:
        return None


def abort(sock: socket.socket) -> None:
    """Close with an RST: no TIME_WAIT left behind for a bot."""
    try:
        tcptune.set_abortive_close(sock.fileno())
    except OSError:
        pass
    sock.close()


def _take(sock: socket.socket, nbytes: int) -> None:
    # Read what a talker sent (only peeked so far), so that closing after a
    # reply sends a FIN, not an RST that may reach it before the reply.
    if nbytes:
        try:
            sock.recv(nbytes)
        except OSError:
            pass


def cut_off(sock: socket.socket, verdict: EarlyTalk, action: str) -> None:
    """End an early talker's connection as `--on-early` says (drop or reject; a
    talker that left while observed, `log`, is dropped)."""
    if action == "reject":
        _take(sock, verdict.nbytes)
        reply_and_close(sock, EARLY_REJECT)
    else:
        abort(sock)


def block(sock: socket.socket, client: str, verdict: Blocked, unread: int = 0) -> None:
    """End a client the DNS lists blocked, as --dnsbl-action says: reject sends the
    554 line naming the lists, drop resets the connection. `unread`: the bytes an
    observed talker sent (only peeked), taken first, as `cut_off` does."""
    if verdict.action is DnsAction.REJECT:
        _take(sock, unread)
        reply_and_close(sock, reject_line(client, verdict.lists))
    elif verdict.action is DnsAction.DROP:
        abort(sock)
    else:  # log and delay hold the client on: a shell bug to get here
        raise ValueError(f"--dnsbl-action {verdict.action} does not end a connection")

"""The intake phase: who is the client?

Each accepted socket comes here first (shell/accept.py's callback). The client
is the socket's peer, taken from accept() and never from getpeername() (after
an RST it raises ENOTCONN), and the server address is the listener's bound one,
or getsockname() on a wildcard listener. A client reset before its socket could
be read still gets its verdict, a `hangup`, as the core's table says.

Once the client is known, `Admission.client` (shell/admit.py) decides what
happens to it.
"""

from __future__ import annotations

import socket

import trio

from repeld.core import events
from repeld.core.addresses import normalize_address
from repeld.core.events import ConnInfo
from repeld.core.hold import HangUp, Hold
from repeld.shell.accept import Listener
from repeld.shell.admit import Admission
from repeld.shell.eventlog import EventLog

__all__ = ["Intake"]


class Intake:
    """Settles who each accepted client is, then hands it to the admission step."""

    def __init__(self, admission: Admission, log: EventLog) -> None:
        self.admission = admission
        self.log = log

    def accepted(self, sock: socket.socket, addr: tuple[object, ...], listener: Listener) -> None:
        """One accepted client (accept_loop's callback); never raises for a client's sake."""
        now = trio.current_time()
        try:  # accept_loop hands out non-blocking sockets
            if listener.local is not None:
                server, server_port = listener.local
            else:
                server, server_port = sock.getsockname()[:2]
                server = normalize_address(server)
        except OSError:
            # Reset between accept() and here: nothing to serve, nobody to greet,
            # but still one verdict, counted like any other.
            self._reset_at_accept(sock, addr, listener, now)
            return
        client = normalize_address(str(addr[0]))
        conn = ConnInfo(client, int(addr[1]), server, int(server_port))  # type: ignore[call-overload]
        self.admission.client(sock, conn, listener.backend, listener.spec.nodelay, now)

    def _reset_at_accept(
        self, sock: socket.socket, addr: tuple[object, ...], listener: Listener, now: float
    ) -> None:
        """A `hangup` (how=reset) for a client gone before its socket could be read.

        The peer comes from accept(); the server address from the listener (its
        bound address, else its --listen spec), since the socket tells nothing.
        """
        sock.close()
        if listener.local is not None:
            server, server_port = listener.local
        else:
            try:
                server, server_port = listener.sock.getsockname()[:2]
            except OSError:
                server, server_port = listener.spec.host, listener.spec.port
        client_port = addr[1] if len(addr) > 1 and isinstance(addr[1], int) else 0
        conn = ConnInfo(
            normalize_address(str(addr[0]) if addr else ""),
            client_port,
            normalize_address(str(server)),
            int(server_port),
        )
        verdict = Hold(now, self.admission.settings.delay).reset(now)  # the table's own answer
        assert isinstance(verdict, HangUp)
        self.log.emit(events.hangup(conn, verdict))

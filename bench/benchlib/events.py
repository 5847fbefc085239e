"""repeld's events as a benchmark sees them: a loopback UDP syslog sink."""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Sequence


class UdpSink:
    """A loopback UDP socket that plays syslog: it counts datagrams when drained.

    Datagrams wait in a large receive buffer and are counted by `drain()` between
    the bench phases, so the sink costs no CPU while a measurement runs.
    """

    def __init__(self, keep: Sequence[str] = ()) -> None:
        #: Datagrams whose MSGID is in `keep` are kept whole, in arrival order.
        self.keep = frozenset(keep)
        self.kept: list[bytes] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):  # root: beyond rmem_max
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = int(self.sock.getsockname()[1])
        self.count = 0
        self.by_msgid: dict[str, int] = {}

    def drain(self) -> int:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.count
            self.count += 1
            # RFC 5424: <PRI>1 TIMESTAMP HOST APP PROCID MSGID ...
            parts = data.split(b" ", 6)
            if len(parts) > 5:
                msgid = parts[5].decode("ascii", "replace")
                self.by_msgid[msgid] = self.by_msgid.get(msgid, 0) + 1
                if msgid in self.keep:
                    self.kept.append(data)

    def take(self, msgid: str) -> list[dict[str, str]]:
        """Drain, then remove and return the kept events of `msgid` as SD params."""
        self.drain()
        out = [sd_params(d) for d in self.kept if d.split(b" ", 6)[5:6] == [msgid.encode()]]
        self.kept = [d for d in self.kept if d.split(b" ", 6)[5:6] != [msgid.encode()]]
        return out

    def close(self) -> None:
        self.sock.close()


_SD_PARAM = re.compile(rb'([A-Za-z0-9_.-]+)="((?:[^"\\]|\\.)*)"')


def sd_params(datagram: bytes) -> dict[str, str]:
    """The PARAM-NAME="value" pairs of an RFC 5424 message's structured data."""
    head, sep, _ = datagram.partition(b"] ")
    body = head if sep else datagram
    return {
        k.decode("ascii", "replace"): re.sub(rb"\\(.)", rb"\1", v).decode("utf-8", "replace")
        for k, v in _SD_PARAM.findall(body)
    }

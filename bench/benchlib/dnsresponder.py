#!/usr/bin/env python3
"""dnsresponder: the bench's own list server, answering after a set latency.

    python3 bench/benchlib/dnsresponder.py --port 5399 --latency 0.05 --counters FILE

NSD answers at once; a list asked through a caching resolver answers a new
address after a round trip to the list (tens of milliseconds), which is what
decides whether the lists keep up with a flood of new addresses (issue 21).
This serves the zones of bench/peers/nsd.sh -- bl.test and wl.test, the
RFC 5782 test points listed, everything else NXDOMAIN with an SOA whose
minimum is 60 s -- on UDP, each answer sent `--latency` seconds after its
query came (an asyncio timer: the answers are never serialised behind one
another). TCP is only listened on (so that the bench sees a listener) and
every connection closed: repeld never asks a list over TCP.

`--huge N` answers every query of bl.test with N A records instead (a
hijacked or expired list domain: 2,000 records make a 32 KB datagram), to see
what a hostile answer costs the server that asks.

SIGUSR1 writes the counters (queries in all and per zone, as the bench reads
NSD's) to `--counters` as JSON. Queries are read by hand: the header, the
question; anything else is dropped, never answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import struct
from collections import Counter

#: What the zones list (nsd.sh's test points): name -> the A record answered.
LISTED = {
    "2.0.0.127.bl.test": "127.0.0.2",
    "3.0.0.127.bl.test": "127.0.0.3",
    "5.0.0.127.bl.test": "127.0.0.2",
    "4.0.0.127.wl.test": "127.0.2.1",
    "5.0.0.127.wl.test": "127.0.2.1",
}
ZONES = ("bl.test", "wl.test")
TTL = 300
NEG_TTL = 60


def _soa(zone: str) -> bytes:
    # The authority section's SOA of a negative answer, its name written out.
    name = b"".join(bytes([len(p)]) + p.encode() for p in zone.split(".")) + b"\x00"
    mname = b"\x02ns" + name
    rname = b"\x0ahostmaster" + name
    rdata = mname + rname + struct.pack("!IIIII", 1, 3600, 600, 86400, NEG_TTL)
    return name + struct.pack("!HHIH", 6, 1, 3600, len(rdata)) + rdata


SOAS = {zone: _soa(zone) for zone in ZONES}


def answer(data: bytes, counts: Counter[str], huge: int = 0) -> bytes | None:
    """The answer to the query `data`, or None for anything that is not one."""
    if len(data) < 17:
        return None
    qid, flags, qdcount = struct.unpack_from("!HHH", data)
    if flags & 0x8000 or qdcount != 1:
        return None
    labels: list[str] = []
    at = 12
    while True:
        size = data[at]
        if size == 0 or size > 63:
            break
        labels.append(data[at + 1 : at + 1 + size].decode("ascii", "replace").lower())
        at += 1 + size
    if data[at] != 0 or at + 5 > len(data):
        return None
    end = at + 5
    name = ".".join(labels)
    zone = ".".join(labels[-2:])
    counts["queries"] += 1
    counts[zone] += 1
    question = data[12:end]
    if huge and zone == "bl.test":
        records = b"".join(
            b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, TTL, 4) + bytes((127, 0, i >> 8, i & 255))
            for i in range(huge)
        )
        header = struct.pack("!HHHHHH", qid, 0x8180 | (flags & 0x0100), 1, huge, 0, 0)
        return header + question + records
    listed = LISTED.get(name)
    if listed is not None:
        record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, TTL, 4) + socket.inet_aton(listed)
        header = struct.pack("!HHHHHH", qid, 0x8180 | (flags & 0x0100), 1, 1, 0, 0)
        return header + question + record
    if zone not in SOAS:
        header = struct.pack("!HHHHHH", qid, 0x8005 | (flags & 0x0100), 1, 0, 0, 0)
        return header + question  # REFUSED: not a zone of ours
    header = struct.pack("!HHHHHH", qid, 0x8583 | (flags & 0x0100), 1, 0, 1, 0)
    return header + question + SOAS[zone]


class Responder(asyncio.DatagramProtocol):
    def __init__(self, latency: float, huge: int = 0) -> None:
        self.latency = latency
        self.huge = huge
        self.counts: Counter[str] = Counter()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram one

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = answer(data, self.counts, self.huge)
        except (IndexError, struct.error):
            reply = None
        if reply is None or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        loop.call_later(self.latency, self.transport.sendto, reply, addr)


async def serve(host: str, port: int, latency: float, counters: str, huge: int = 0) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.bind((host, port))
    _, responder = await loop.create_datagram_endpoint(lambda: Responder(latency, huge), sock=sock)

    def dump() -> None:
        tmp = f"{counters}.tmp"
        with open(tmp, "w") as f:
            json.dump(dict(responder.counts), f)
        os.replace(tmp, counters)

    loop.add_signal_handler(signal.SIGUSR1, dump)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def refuse(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.close()

    tcp = await asyncio.start_server(refuse, host, port)
    async with tcp:
        await stop.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency", type=float, default=0.05, help="seconds before each answer")
    ap.add_argument("--counters", required=True, help="where SIGUSR1 writes the counters")
    ap.add_argument("--huge", type=int, default=0, help="answer bl.test with this many A records")
    a = ap.parse_args()
    asyncio.run(serve(a.host, a.port, a.latency, a.counters, a.huge))


if __name__ == "__main__":
    main()

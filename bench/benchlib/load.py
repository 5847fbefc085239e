"""Load generation: silent connections by the thousand, and the probes.

`bulk_worker` is one load process (its own fd limit, and one source address or
a network of them, one address per connection) that opens, checks and resets
silent connections on command; `probe_worker` times
the greeting (timer probes) or the cut-off of a client that talks first.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import math
import random
import selectors
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

from benchlib.net import bind_source, raise_nofile, rst_close, sources

#: What a cut-off probe says before the greeting.
TALK = b"EHLO probe.test\r\n"


def _sock(obj: object) -> socket.socket:
    assert isinstance(obj, socket.socket)
    return obj


def open_many(
    host: str,
    port: int,
    source: Iterator[str],
    count: int,
    start_at: float,
    window: int,
    socks: list[socket.socket],
    rate: float = 0.0,
) -> dict[str, Any]:
    """Open `count` silent connections, at most `window` connects in flight, each
    from the next address of `source`; with `rate`, at most that many a second
    (connect i not before start + i/rate), else as fast as they go."""
    sel = selectors.DefaultSelector()
    fails: dict[str, int] = {}
    started = done = inflight = 0
    while time.monotonic() < start_at:
        time.sleep(0.0005)
    t_first = time.monotonic()
    give_up = t_first + 120.0
    while done + sum(fails.values()) < count and time.monotonic() < give_up:
        due = t_first + started / rate if rate > 0 else 0.0
        while started < count and inflight < window and time.monotonic() >= due:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                bind_source(s, next(source))
                err = s.connect_ex((host, port))
            except OSError as exc:
                err = exc.errno or -1
            started += 1
            if err == 0:
                done += 1
                socks.append(s)
            elif err == errno.EINPROGRESS:
                inflight += 1
                sel.register(s, selectors.EVENT_WRITE)
            else:
                name = errno.errorcode.get(err, str(err))
                fails[name] = fails.get(name, 0) + 1
                s.close()
            due = t_first + started / rate if rate > 0 else 0.0
        wait = 1.0 if started >= count or rate <= 0 else max(0.0, min(1.0, due - time.monotonic()))
        for key, _ in sel.select(wait):
            s = _sock(key.fileobj)
            sel.unregister(s)
            inflight -= 1
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                name = errno.errorcode.get(err, str(err))
                fails[name] = fails.get(name, 0) + 1
                s.close()
            else:
                done += 1
                socks.append(s)
    for key in list(sel.get_map().values()):  # connects that never finished
        s = _sock(key.fileobj)
        fails["timeout"] = fails.get("timeout", 0) + 1
        sel.unregister(s)
        rst_close(s)
    sel.close()
    return {"established": done, "fails": fails, "t_first": t_first, "t_last": time.monotonic()}


def check_silent(socks: list[socket.socket]) -> dict[str, int]:
    """What the server did to the silent connections: sent bytes, greeted, closed."""
    out = {"open": 0, "got_bytes": 0, "greeted": 0, "closed": 0}
    for s in socks:
        try:
            data = s.recv(512, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            out["open"] += 1
            continue
        except OSError:
            out["closed"] += 1
            continue
        if not data:
            out["closed"] += 1
            continue
        out["open"] += 1
        out["got_bytes"] += 1
        if data.startswith(b"220 ") or b"\n220 " in data:
            out["greeted"] += 1
    return out


def bulk_worker(
    conn: Connection, host: str, port: int, source: str, window: int, rate: float = 0.0
) -> None:
    """One load process: opens, checks and resets its share of silent connections.

    `source` is one address for every connection, or a network (ADDR/LEN) whose
    addresses are used in turn, one per connection, carrying on from one "open"
    to the next (net.sources)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cleans up
    raise_nofile()
    addresses = sources(source)
    socks: list[socket.socket] = []
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        cmd = msg[0]
        if cmd == "open":
            paced = rate if len(msg) < 4 or msg[3] else 0.0  # ("open", n, at, paced)
            conn.send(open_many(host, port, addresses, msg[1], msg[2], window, socks, paced))
        elif cmd == "check":
            conn.send(check_silent(socks))
        elif cmd == "close":
            n = len(socks)
            for s in socks:
                rst_close(s)
            socks.clear()
            conn.send(n)
        else:
            break
    for s in socks:
        rst_close(s)


@dataclass
class Probe:
    t_start: float
    sock: socket.socket | None = None
    t_conn: float = math.nan
    t_first: float = math.nan  # first byte from the server
    t_greet: float = math.nan  # the final "220 " greeting line
    t_talk: float = math.nan
    t_cut: float = math.nan  # FIN or RST seen after talking
    how: str = ""  # fin | rst | error text
    buf: bytes = b""


def probe_worker(
    conn: Connection,
    mode: str,
    host: str,
    port: int,
    net: str,
    k: int,
    start_at: float,
    spread: float,
    window: float,
    give_up_at: float,
    seed: int,
) -> None:
    """Timer probes (mode "timer": wait for the greeting) or cut-off probes (mode
    "cutoff": talk at a random time within `window` after connecting, then time
    the server's FIN/RST).  Sends back a list of per-probe dicts."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile()
    rng = random.Random(seed)
    probes = [Probe(start_at + i * spread / max(1, k)) for i in range(k)]
    sel = selectors.DefaultSelector()
    talks: list[tuple[float, int]] = []  # heap of (talk time, probe index)
    nxt = 0
    live = 0

    def finish(i: int, how: str) -> None:
        nonlocal live
        p = probes[i]
        if p.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(p.sock)
            rst_close(p.sock)
            p.sock = None
            live -= 1
        p.how = p.how or how

    while True:
        now = time.monotonic()
        if now >= give_up_at or (nxt >= k and live == 0):
            break
        while nxt < k and probes[nxt].t_start <= now:
            p = probes[nxt]
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            bind_source(s, f"{net}.{nxt % 250 + 1}")
            err = s.connect_ex((host, port))
            p.t_start = time.monotonic()
            if err not in (0, errno.EINPROGRESS):
                p.how = f"connect {errno.errorcode.get(err, err)}"
                s.close()
            else:
                p.sock = s
                live += 1
                sel.register(s, selectors.EVENT_WRITE, nxt)
            nxt += 1
        while talks and talks[0][0] <= now:
            _, i = heapq.heappop(talks)
            p = probes[i]
            if p.sock is None:
                continue
            try:
                p.sock.send(TALK)
                p.t_talk = time.monotonic()
            except OSError as exc:
                finish(i, f"send {exc.strerror}")
        wake = give_up_at
        if nxt < k:
            wake = min(wake, probes[nxt].t_start)
        if talks:
            wake = min(wake, talks[0][0])
        for key, _ in sel.select(max(0.0, min(0.05, wake - time.monotonic()))):
            i = key.data
            p = probes[i]
            s = p.sock
            t = time.monotonic()
            if s is None:
                continue
            if math.isnan(p.t_conn):
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(i, f"connect {errno.errorcode.get(err, err)}")
                    continue
                p.t_conn = t
                sel.modify(s, selectors.EVENT_READ, i)
                if mode == "cutoff":
                    heapq.heappush(talks, (t + rng.uniform(0.0, window), i))
                continue
            try:
                data = s.recv(4096)
            except OSError as exc:
                if not math.isnan(p.t_talk):
                    p.t_cut = t
                how = "rst" if exc.errno == errno.ECONNRESET else (exc.strerror or "error")
                finish(i, how if not math.isnan(p.t_talk) else f"{how} before talking")
                continue
            if not data:
                if not math.isnan(p.t_talk):
                    p.t_cut = t
                    finish(i, "fin")
                else:
                    finish(i, "closed before talking" if mode == "cutoff" else "closed ungreeted")
                continue
            if math.isnan(p.t_first):
                p.t_first = t
            if mode == "timer":
                p.buf = (p.buf + data)[-4096:]
                if p.buf.startswith(b"220 ") or b"\n220 " in p.buf:
                    p.t_greet = t
                    finish(i, "greeted")
    for i in range(k):
        finish(i, "gave up")
    conn.send([{k_: v for k_, v in asdict(p).items() if k_ not in ("sock", "buf")} for p in probes])
    sel.close()

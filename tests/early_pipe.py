"""A talker for swaks --pipe: connect, talk before the greeting, then hand over.

`python3 -m tests.early_pipe PORT SOURCE`: connects to 127.0.0.1:PORT from SOURCE,
sends `EHLO early.example` at once (before any greeting), reads the greeting and
the reply to that early EHLO, then gives swaks (on stdin and stdout) the greeting
and the connection: swaks holds a clean dialogue of its own with whoever
greeted, here repeld's --on-early enforce.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

EARLY = b"EHLO early.example\r\n"


def _upstream(sock: socket.socket) -> None:
    # swaks -> the server, until swaks closes its side.
    while data := os.read(0, 4096):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def main() -> int:
    port, source = int(sys.argv[1]), sys.argv[2]
    sock = socket.create_connection(("127.0.0.1", port), timeout=60, source_address=(source, 0))
    sock.sendall(EARLY)
    reader = sock.makefile("rb", buffering=0)
    greeting = reader.readline()
    while reader.readline()[3:4] == b"-":  # the early EHLO's reply
        pass
    os.write(1, greeting)
    threading.Thread(target=_upstream, args=(sock,), daemon=True).start()
    while data := sock.recv(4096):  # the server -> swaks
        os.write(1, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())

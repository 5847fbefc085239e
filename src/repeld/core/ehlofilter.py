"""Take PIPECONNECT out of the MTA's first EHLO reply, so no client learns it.

Exim 4.94 and later advertise `PIPECONNECT` (`X_PIPE_CONNECT` before 4.94) in
the EHLO reply; a sending Exim caches that reply and on its next connection
sends EHLO, MAIL and RCPT before the greeting, which is exactly what repeld
cuts off as early talk. `EhloFilter` sits in the MTA-to-client direction of a
relayed session and removes those capability lines from the first reply after
the greeting; everything else passes byte for byte.

The rule, from the server's bytes alone (SMTP replies come in the order of
the commands, so the first reply after the greeting answers the client's first
command, pipelined or not):

* The greeting: lines whose code is 220, passed on as each line completes, up
  to its last line (`220 `, not `220-`). A greeting with any other code (a
  554 or a 421) means there is no EHLO to come: the filter is done.
* The first reply after it: held until its last line. If its code is 250 and
  it has more than one line (an EHLO reply; HELO's is one line, so is NOOP's),
  every line after the first whose keyword is PIPECONNECT or X_PIPE_CONNECT
  (any case) is dropped; when the dropped line was the last, the new last line
  gets ` ` instead of `-` after its code. Then the filter is done, and
  whatever followed in the same chunk (replies to pipelined MAIL and RCPT)
  passes untouched.
* A line that is not `DDD`, `DDD-...` or `DDD ...` ended by LF (CRLF or bare
  LF), or no line end within the first LIMIT bytes of the stream: the filter
  gives up and passes everything on untouched, held bytes first. End of file
  flushes whatever is held.

Only the first reply is looked at: after STARTTLS the next EHLO reply is
encrypted, and a client decides to pipeline before the greeting from the
cleartext one. The decisions depend on the bytes only, never on how they were
split into chunks.
"""

from __future__ import annotations

import re

__all__ = ["LIMIT", "PIPE_CONNECT_KEYWORDS", "EhloFilter"]

#: Bytes of the stream looked at, at most; past them the filter gives up.
LIMIT = 8192
#: The capability keywords taken out, upper case.
PIPE_CONNECT_KEYWORDS = frozenset({b"PIPECONNECT", b"X_PIPE_CONNECT"})

#: The common case in one regular expression each, matched when a chunk starts
#: a greeting or a reply: the line loop below gives the same answer, slower.
_GREETING_RE = re.compile(rb"(?:220-[^\n]*\n)*220(?:[ \r][^\n]*)?\n")
_REPLY_RE = re.compile(rb"(?:[0-9]{3}-[^\n]*\n)*[0-9]{3}(?:[ \r][^\n]*)?\n")
_PIPE_RE = re.compile(rb"PIPECONNECT|X_PIPE_CONNECT", re.IGNORECASE)

_GREETING = 0
_REPLY = 1
_DONE = 2


class EhloFilter:
    """Fed the MTA's bytes (`feed`, then `eof`), returns the bytes for the client.

    `done` is true once nothing more will ever be changed: from then on the
    caller sends the MTA's bytes straight on without feeding them here.
    """

    __slots__ = ("_buf", "_held", "_offset", "_state")

    def __init__(self) -> None:
        self._state = _GREETING
        self._buf = bytearray()  # bytes not yet part of a complete line
        self._offset = 0  # where `_buf` starts in the stream
        self._held: list[bytes] = []  # complete lines of the first reply

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        """The bytes to send on for `data` (maybe fewer, maybe held ones too)."""
        if self._state == _DONE:
            return bytes(data)
        if not self._buf and not self._held:
            return self._fast(bytes(data))
        return self._slow(data)

    def _fast(self, data: bytes) -> bytes:
        """A chunk that starts a line: whole greetings and replies without the
        capability go through at once; anything else to the line loop."""
        pos = 0
        if self._state == _GREETING:
            m = _GREETING_RE.match(data)
            if m is None or self._offset + m.end() > LIMIT:
                return self._slow(data)
            pos = m.end()
            self._offset += pos
            self._state = _REPLY
        m = _REPLY_RE.match(data, pos)
        if (
            m is not None
            and self._offset + m.end() - pos <= LIMIT
            and _PIPE_RE.search(data, pos, m.end()) is None
        ):
            self._state = _DONE
            return data
        if pos == len(data):
            return data
        return data[:pos] + self._slow(data[pos:])

    def _slow(self, data: bytes | bytearray | memoryview) -> bytes:
        """The line loop: any chunking, any stream."""
        buf = self._buf
        buf += data
        out = bytearray()
        start = 0
        while self._state != _DONE:
            # `self._offset` is where buf[start] is in the stream.
            end = buf.find(b"\n", start, start + max(0, LIMIT - self._offset))
            if end < 0:
                if self._offset + len(buf) - start >= LIMIT:
                    self._give_up(out)  # no line end within the bound
                break
            end += 1
            self._line(bytes(buf[start:end]), out)
            self._offset += end - start
            start = end
        if self._state == _DONE:
            out += buf[start:]
            self._buf = bytearray()
        else:
            del buf[:start]
        return bytes(out)

    def eof(self) -> bytes:
        """The MTA closed: whatever was held, to send before passing the close on."""
        if self._state == _DONE:
            return b""
        out = bytearray()
        self._give_up(out)
        out += self._buf
        self._buf = bytearray()
        return bytes(out)

    def _give_up(self, out: bytearray) -> None:
        """Pass on every held line untouched; the caller adds what follows them."""
        for line in self._held:
            out += line
        self._held = []
        self._state = _DONE

    def _line(self, line: bytes, out: bytearray) -> None:
        """One complete line (with its LF) of the greeting or the first reply."""
        code, last = _parse(line)
        if code is None:
            self._give_up(out)
            out += line
            return
        if self._state == _GREETING:
            out += line
            if code != b"220":
                self._state = _DONE
            elif last:
                self._state = _REPLY
            return
        self._held.append(line)
        if last:
            out += _strip(self._held)
            self._held = []
            self._state = _DONE


def _parse(line: bytes) -> tuple[bytes | None, bool]:
    """(code, is the last line of its reply), or (None, False) if not a reply line."""
    code = line[:3]
    if len(code) < 3 or not code.isdigit():
        return None, False
    sep = line[3:4]
    if sep == b"-":
        return code, False
    if sep in (b" ", b"\r", b"\n"):
        return code, True
    return None, False


def _keyword(line: bytes) -> bytes:
    """The capability keyword of an EHLO reply line, upper case."""
    text = line[4:].rstrip(b"\r\n")
    return text.split(None, 1)[0].upper() if text.strip() else b""


def _strip(lines: list[bytes]) -> bytes:
    """The reply without PIPECONNECT lines (if it is a multi-line 250 reply)."""
    if len(lines) < 2 or lines[0][:3] != b"250":
        return b"".join(lines)
    kept = [lines[0]]
    kept += [line for line in lines[1:] if _keyword(line) not in PIPE_CONNECT_KEYWORDS]
    if len(kept) == len(lines):
        return b"".join(lines)
    final = kept[-1]
    if final[3:4] == b"-":  # the last line was dropped: this one ends the reply now
        kept[-1] = final[:3] + b" " + final[4:]
    return b"".join(kept)

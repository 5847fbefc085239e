"""The dialogue of `--on-early enforce`: a tiny SMTP server that takes no mail; no I/O.

postscreen's `postscreen_greet_action = enforce` in repeld: an early talker is
held to the end of the delay like everyone else (core/hold.py gives `Enforce`
there), then repeld greets it itself and answers its commands, so that the
event says whom it was writing to and as whom, and an administrator can tell
a customer's mail server from a bot. Nothing reaches the MTA: every recipient
is refused.

An `Enforcer` is fed what the shell read (`receive`), end of file (`eof`), a
failed connection (`reset`) and the time, and answers with the bytes to write;
`done` says the connection is to be closed, `end` why, and `envelope()` what
was recorded. It never touches a socket or a clock, as core/hold.py.

What it answers, command by command (the verb is case-insensitive):

    EHLO x          250-NAME, 250-8BITMIME, 250 ENHANCEDSTATUSCODES (no PIPELINING,
                    STARTTLS, AUTH, PIPECONNECT, SMTPUTF8: nothing a client could
                    use to do more than name itself and its envelope)
    HELO x          250 NAME
    MAIL FROM:<a>   250 2.1.0 Ok                      (501 if not MAIL FROM:)
    RCPT TO:<b>     450 4.7.1 Protocol error: try again later  (501 if not RCPT TO:)
    DATA            554 5.5.1 Error: no valid recipients
    BDAT n [LAST]   the same, and the n bytes of the chunk are skipped unread
    RSET, NOOP      250 2.0.0 Ok
    QUIT            221 2.0.0 Bye, and close
    an empty line   500 5.5.2 Error: bad syntax
    anything else   502 5.5.2 Error: command not recognized

and its bounds, past any of which it answers 421 and closes (`end` says which):

    a line of more than MAX_LINE bytes (RFC 5321 4.5.3.1.4: 512 with the CRLF)
                    500 5.5.2 Error: line too long; it counts as a command, and
                    the rest of the line is skipped: the buffer never grows past it
    MAX_COMMANDS commands                 the next one: 421 4.7.0 too many commands
    MAX_RECIPIENTS recipients recorded    the next RCPT: 421 4.5.3 too many recipients
    SESSION_TIME seconds after greeting   421 4.4.2 timeout exceeded (`timeout(now)`)
    MAX_SKIPPED bytes skipped unread      421 4.7.0 too much data (BDAT chunks, and
                    the tails of lines too long: the work a client can make)

Commands that arrive together (a client that pipelines although it was not told
it may) are answered in order, in one write. A line ends at LF, with or without
the CR, as Postfix's smtpd reads them. The envelope is the raw bytes the client
sent (the last HELO or EHLO argument, the last MAIL path, every RCPT path up to
MAX_RECIPIENTS, `<` and `>` included, parameters left out): core/events.py
escapes them as it escapes the first bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from repeld.core.names import EnforceEnd

__all__ = [
    "MAX_COMMANDS",
    "MAX_LINE",
    "MAX_RECIPIENTS",
    "MAX_SKIPPED",
    "SESSION_TIME",
    "EnforceEnd",
    "Enforcer",
    "Envelope",
    "greeting_name",
]

#: The longest command line, CRLF included (RFC 5321 section 4.5.3.1.4).
MAX_LINE = 512
#: Commands answered in one session; the next one is told 421.
MAX_COMMANDS = 20
#: Recipients recorded; the next RCPT is told 421.
MAX_RECIPIENTS = 10
#: Bytes skipped unread in one session (BDAT chunks, the tails of lines too
#: long); past them it is told 421: reading and throwing away a client's endless
#: BDAT kept a core busy until SESSION_TIME, and nothing it sends is wanted.
MAX_SKIPPED = 1 << 20
#: Seconds from the greeting to the 421 that ends a session, whatever it is doing.
SESSION_TIME = 30.0


@dataclass(frozen=True, slots=True)
class Envelope:
    """What an enforced talker said of itself: raw client bytes, b"" if never given."""

    helo: bytes = b""
    sender: bytes = b""
    recipients: tuple[bytes, ...] = ()
    #: Commands answered (a line too long counts as one).
    commands: int = 0


def greeting_name(text: str) -> bytes:
    """The name in the 220 and 250 lines: the first word of `text` (--teaser-text,
    `mx.example.org ESMTP Postfix` say, or the host name), anything outside
    printable ASCII in it made `?`."""
    words = text.split()
    clean = "".join(c if "!" <= c <= "~" else "?" for c in words[0]) if words else ""
    return (clean or "localhost").encode("ascii")


_OK = b"250 2.0.0 Ok\r\n"
_SENDER_OK = b"250 2.1.0 Ok\r\n"
#: A temporary refusal (postscreen's enforce says 550): a real MTA that talked
#: early by mistake (an Exim that learned PIPECONNECT before repeld stood in
#: front of its peer) defers and retries, without early pipelining, where a 550
#: would bounce its message.
_REFUSED = b"450 4.7.1 Protocol error: try again later\r\n"
_NO_DATA = b"554 5.5.1 Error: no valid recipients\r\n"
_BYE = b"221 2.0.0 Bye\r\n"
_BAD_SYNTAX = b"500 5.5.2 Error: bad syntax\r\n"
_TOO_LONG = b"500 5.5.2 Error: line too long\r\n"
_UNKNOWN = b"502 5.5.2 Error: command not recognized\r\n"
_MAIL_SYNTAX = b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"
_RCPT_SYNTAX = b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"
_BDAT_SYNTAX = b"501 5.5.4 Syntax: BDAT size [LAST]\r\n"
#: The 421 that ends a session at each bound (NAME goes after the code).
_CLOSING = {
    EnforceEnd.TIMEOUT: (b"421 4.4.2 ", b" Error: timeout exceeded\r\n"),
    EnforceEnd.COMMANDS: (b"421 4.7.0 ", b" Error: too many commands\r\n"),
    EnforceEnd.RECIPIENTS: (b"421 4.5.3 ", b" Error: too many recipients\r\n"),
    EnforceEnd.DATA: (b"421 4.7.0 ", b" Error: too much data\r\n"),
    EnforceEnd.SHUTDOWN: (b"421 4.3.2 ", b" Service shutting down, try again later\r\n"),
}


def _path(arg: bytes, keyword: bytes) -> bytes | None:
    # `FROM:<a> SIZE=1` -> b"<a>"; `FROM: a` -> b"a"; no keyword -> None.
    if arg[: len(keyword)].upper() != keyword:
        return None
    rest = arg[len(keyword) :].lstrip(b" ")
    if rest.startswith(b"<"):
        end = rest.find(b">")
        return rest if end < 0 else rest[: end + 1]
    return rest.split(b" ", 1)[0]


class Enforcer:
    """One enforce session, from repeld's greeting to the close."""

    __slots__ = (
        "_buf",
        "_name",
        "_recipients",
        "_skip_bytes",
        "_skip_line",
        "_skipped",
        "commands",
        "deadline",
        "end",
        "helo",
        "sender",
    )

    def __init__(self, name: bytes, now: float) -> None:
        self._name = name
        #: When the session ends whatever it is doing (SESSION_TIME after `now`).
        self.deadline = now + SESSION_TIME
        self._buf = bytearray()
        self._skip_line = False  # the rest of a line too long is being skipped
        self._skip_bytes = 0  # the rest of a BDAT chunk is being skipped
        self._skipped = 0  # bytes skipped so far (MAX_SKIPPED)
        self.commands = 0
        self.helo = b""
        self.sender = b""
        self._recipients: list[bytes] = []
        #: Why the session ended, once it has (then `done`).
        self.end: EnforceEnd | None = None

    @property
    def done(self) -> bool:
        """The session is over: close the connection after writing what was returned."""
        return self.end is not None

    def envelope(self) -> Envelope:
        """What the client said so far (for the event)."""
        return Envelope(self.helo, self.sender, tuple(self._recipients), self.commands)

    def greeting(self) -> bytes:
        """repeld's own greeting, written once the delay is over."""
        return b"220 " + self._name + b" ESMTP\r\n"

    def _close(self, end: EnforceEnd) -> bytes:
        self.end = end
        head, tail = _CLOSING[end]
        return head + self._name + tail

    def receive(self, data: bytes, now: float) -> bytes:
        """Bytes from the client: the replies to every whole command in them, in order."""
        if self.end is not None:
            return b""
        if now >= self.deadline:
            return self._close(EnforceEnd.TIMEOUT)
        buf = self._buf
        buf += data
        out = bytearray()
        while self.end is None and buf:
            if self._skipped > MAX_SKIPPED:
                out += self._close(EnforceEnd.DATA)
                break
            if self._skip_bytes:  # a BDAT chunk: not commands
                n = min(self._skip_bytes, len(buf))
                del buf[:n]
                self._skip_bytes -= n
                self._skipped += n
                continue
            nl = buf.find(b"\n")
            if self._skip_line:  # the tail of a line already answered 500
                if nl < 0:
                    self._skipped += len(buf)
                    buf.clear()
                    continue
                self._skipped += nl + 1
                del buf[: nl + 1]
                self._skip_line = False
                continue
            if nl < 0:
                if len(buf) < MAX_LINE:
                    break  # a line still coming
                # MAX_LINE bytes and no LF: too long, whatever follows.
                buf.clear()
                self._skip_line = True
                out += self._command(None)
                continue
            if nl >= MAX_LINE:  # its LF came, too late
                del buf[: nl + 1]
                out += self._command(None)
                continue
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            out += self._command(line[:-1] if line.endswith(b"\r") else line)
        if self.end is not None:
            buf.clear()
        return bytes(out)

    def _command(self, line: bytes | None) -> bytes:
        # One command line (None: one too long); its reply.
        if self.commands >= MAX_COMMANDS:
            return self._close(EnforceEnd.COMMANDS)
        self.commands += 1
        if line is None:
            return _TOO_LONG
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if verb == b"EHLO":
            self.helo = arg.strip(b" ")
            name = self._name
            return b"250-" + name + b"\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"
        if verb == b"HELO":
            self.helo = arg.strip(b" ")
            return b"250 " + self._name + b"\r\n"
        if verb == b"MAIL":
            path = _path(arg, b"FROM:")
            if path is None:
                return _MAIL_SYNTAX
            self.sender = path
            return _SENDER_OK
        if verb == b"RCPT":
            path = _path(arg, b"TO:")
            if path is None:
                return _RCPT_SYNTAX
            if len(self._recipients) >= MAX_RECIPIENTS:
                return self._close(EnforceEnd.RECIPIENTS)
            self._recipients.append(path)
            return _REFUSED
        if verb == b"DATA":
            return _NO_DATA
        if verb == b"BDAT":
            size = arg.split(b" ", 1)[0]
            if not (size.isdigit() and size.isascii()):
                return _BDAT_SYNTAX
            self._skip_bytes = int(size)
            return _NO_DATA
        if verb in (b"RSET", b"NOOP"):
            return _OK
        if verb == b"QUIT":
            self.end = EnforceEnd.QUIT
            return _BYE
        if not line.strip(b" "):
            return _BAD_SYNTAX
        return _UNKNOWN

    def eof(self) -> bytes:
        """The client closed its side: the session is over (nothing to say to it)."""
        if self.end is None:
            self.end = EnforceEnd.CLOSE
        return b""

    def reset(self) -> None:
        """The connection failed (an RST, or a write that did not go out)."""
        if self.end is None:
            self.end = EnforceEnd.RESET

    def timeout(self, now: float) -> bytes:
        """The time is `now`: the 421 if the session has lasted SESSION_TIME, else b""."""
        if self.end is not None or now < self.deadline:
            return b""
        return self._close(EnforceEnd.TIMEOUT)

    def shutdown(self) -> bytes:
        """repeld is stopping: a 421, and close."""
        if self.end is not None:
            return b""
        return self._close(EnforceEnd.SHUTDOWN)

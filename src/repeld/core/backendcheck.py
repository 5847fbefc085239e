"""The backend check's dialogue and diagnosis: is the MTA ready for repeld's clients?

`repeld --check-backend`, and the daemon at start-up and after each reload,
talk to every backend as a passed client would: the PROXY header (as
--proxy-protocol says), then the greeting, `EHLO`, the capabilities, `QUIT`.
This module is the whole decision, sans-IO like hold.py: the shell feeds it
the bytes it reads (b"" is EOF) and the phase timeouts, and asks it what to
send next, how long to wait, or the verdict.

What a misconfigured backend looks like (measured on Postfix 3.7):

- It expects a PROXY header and gets none: it says nothing (it is waiting
  for the header), and answers the first line it gets with
  `421 4.3.0 ... Server local error` and closes. So when no greeting comes
  within GREETING_TIMEOUT, the check sends its EHLO anyway (the nudge): a
  4xx/5xx or a close is the sign of a backend that wants a header.
- It expects none and gets one: it greets, then answers the header like a
  command (`500 5.5.2 Error: command not recognized`) before it answers EHLO.
- PIPECONNECT (Exim's early pipelining; X_PIPE_CONNECT before Exim 4.94):
  clients that remember it send EHLO before the greeting, which repeld takes
  for an early talker; repeld strips it from the EHLO reply unless
  --keep-pipe-connect, so it is a warning only when the filter is off.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from repeld.core.hold import escape_bytes

__all__ = [
    "CONNECT_TIMEOUT",
    "EHLO_TIMEOUT",
    "GREETING_TIMEOUT",
    "NUDGE_TIMEOUT",
    "QUIT_TIMEOUT",
    "BackendCheck",
    "NeedData",
    "Reply",
    "Send",
    "Verdict",
]

#: Phase bounds, seconds: the whole check of one backend stays under ten.
CONNECT_TIMEOUT = 3.0
GREETING_TIMEOUT = 3.0
NUDGE_TIMEOUT = 2.0
EHLO_TIMEOUT = 3.0
QUIT_TIMEOUT = 1.0

#: Longest reply kept; a backend that sends more without a final line is broken.
_MAX_REPLY = 16_384
_PIPE_CONNECT = ("PIPECONNECT", "X_PIPE_CONNECT")
_REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$", re.S)


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete SMTP reply: its code and its lines' texts."""

    code: int
    lines: tuple[str, ...]

    def text(self) -> str:
        """The first line as the backend wrote it, for messages."""
        return f"{self.code} {self.lines[0]}".rstrip() if self.lines else str(self.code)


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes to the backend, then ask again."""

    data: bytes


@dataclass(frozen=True, slots=True)
class NeedData:
    """Read from the backend for at most `timeout` seconds; feed what came, or say it timed out."""

    timeout: float


@dataclass(frozen=True, slots=True)
class Verdict:
    """The check is over: `ok`, what was seen, and what to do about a problem."""

    ok: bool
    message: str
    greeting: str = ""
    capabilities: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


class _Phase(enum.Enum):
    GREETING = "greeting"
    NUDGE = "nudge"  # no greeting: an EHLO sent anyway, to see how it is taken
    EHLO = "ehlo"
    QUIT = "quit"
    DONE = "done"


class _Malformed(Exception):
    """The backend wrote something that is not an SMTP reply."""


class BackendCheck:
    """One backend's dialogue: feed it bytes and timeouts, ask it `next_action()`."""

    def __init__(
        self, proxy_protocol: str, helo_name: str, *, keep_pipe_connect: bool = False
    ) -> None:
        self.proxy_protocol = proxy_protocol
        self.helo_name = helo_name
        self.keep_pipe_connect = keep_pipe_connect
        self._phase = _Phase.GREETING
        self._buffer = b""
        self._eof = False
        self._timed_out = False
        self._outbox: list[bytes] = []
        self._greeting: Reply | None = None
        self._header_reply: Reply | None = None  # a reply before EHLO's: the header's
        self._verdict: Verdict | None = None
        self._pending: Verdict | None = None  # the verdict once QUIT is answered

    # -- input -------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the backend; b"" means it closed the connection."""
        if data:
            self._buffer += data
        else:
            self._eof = True

    def timed_out(self) -> None:
        """The last NeedData's timeout passed with nothing (more) to read."""
        self._timed_out = True

    # -- output ------------------------------------------------------------------

    def next_action(self) -> Send | NeedData | Verdict:
        """What the shell does next."""
        while self._verdict is None:
            if self._outbox:
                return Send(self._outbox.pop(0))
            try:
                reply = self._next_reply()
            except _Malformed as exc:
                self._fail(self._malformed(str(exc)))
                break
            if reply is not None:
                self._on_reply(reply)
            elif self._eof:
                self._on_eof()
            elif self._timed_out:
                self._timed_out = False
                self._on_timeout()
            else:
                return NeedData(self._timeout())
        assert self._verdict is not None
        return self._verdict

    # -- the table ---------------------------------------------------------------

    @property
    def _header_name(self) -> str:
        return f"PROXY {self.proxy_protocol}"

    def _timeout(self) -> float:
        return {
            _Phase.GREETING: GREETING_TIMEOUT,
            _Phase.NUDGE: NUDGE_TIMEOUT,
            _Phase.EHLO: EHLO_TIMEOUT,
            _Phase.QUIT: QUIT_TIMEOUT,
        }[self._phase]

    def _wants_header_hint(self) -> str:
        return (
            "it seems to expect a PROXY header (Postfix: smtpd_upstream_proxy_protocol, "
            "Exim: hosts_proxy): set --proxy-protocol v1 (or v2), or turn PROXY off "
            "on the backend"
        )

    def _refuses_header_hint(self) -> str:
        return (
            f"is it configured to expect a {self._header_name} header? (Postfix: "
            "smtpd_upstream_proxy_protocol = haproxy, Exim: hosts_proxy; or set "
            "--proxy-protocol none)"
        )

    def _on_reply(self, reply: Reply) -> None:
        phase = self._phase
        if phase is _Phase.GREETING:
            self._greeting = reply
            if reply.code // 100 != 2:
                hint = (
                    f"; {self._wants_header_hint()}"
                    if self.proxy_protocol == "none" and reply.code // 100 == 4
                    else ""
                )
                self._fail(f"greets with {reply.text()!r} instead of 220{hint}")
                return
            self._send_ehlo(_Phase.EHLO)
        elif phase is _Phase.NUDGE:
            if reply.code // 100 == 2:  # a late greeting
                self._fail(
                    f"does not greet within {GREETING_TIMEOUT:g} s (it greeted later: "
                    f"{reply.text()!r}); is it overloaded?"
                )
            else:
                self._fail(
                    f"does not greet within {GREETING_TIMEOUT:g} s and answers a line with "
                    f"{reply.text()!r}: {self._wants_header_hint()}"
                )
        elif phase is _Phase.EHLO:
            if reply.code == 250:
                self._on_ehlo(reply)
            elif self.proxy_protocol != "none" and self._header_reply is None:
                self._header_reply = reply  # the header's answer, or EHLO's: see the next
            else:
                self._fail(f"refuses EHLO {self.helo_name}: {reply.text()!r}")
        elif phase is _Phase.QUIT:
            self._done()

    def _on_eof(self) -> None:
        phase = self._phase
        if phase is _Phase.GREETING:
            if self.proxy_protocol == "none":
                self._fail(f"closes the connection without a greeting; {self._wants_header_hint()}")
            else:
                self._fail(
                    f"closes the connection after a {self._header_name} header without a "
                    f"greeting: {self._refuses_header_hint()}"
                )
        elif phase is _Phase.NUDGE:
            self._fail(
                f"does not greet within {GREETING_TIMEOUT:g} s and closes the connection "
                f"when a line comes: {self._wants_header_hint()}"
            )
        elif phase is _Phase.EHLO:
            if self._header_reply is not None:
                self._header_refused()
            else:
                self._fail(f"closes the connection after EHLO {self.helo_name}")
        elif phase is _Phase.QUIT:
            self._done()

    def _on_timeout(self) -> None:
        phase = self._phase
        if phase is _Phase.GREETING:
            if self.proxy_protocol == "none":
                self._send_ehlo(_Phase.NUDGE)  # how is a line taken before the greeting?
            else:
                self._fail(
                    f"does not greet within {GREETING_TIMEOUT:g} s after a "
                    f"{self._header_name} header: {self._refuses_header_hint()}"
                )
        elif phase is _Phase.NUDGE:
            self._fail(
                f"does not greet within {GREETING_TIMEOUT + NUDGE_TIMEOUT:g} s; is it "
                "overloaded, or does it expect a PROXY header?"
            )
        elif phase is _Phase.EHLO:
            if self._header_reply is not None:
                self._header_refused()
            else:
                self._fail(f"no reply to EHLO within {EHLO_TIMEOUT:g} s")
        elif phase is _Phase.QUIT:
            self._done()  # the check is over; a slow goodbye is no fault

    def _header_refused(self) -> None:
        assert self._header_reply is not None
        # Greeted, then a refusal and no 250: of the header or of EHLO, no telling.
        self._fail(
            f"greets, then refuses the {self._header_name} header or EHLO "
            f"{self.helo_name} with {self._header_reply.text()!r}: "
            f"{self._refuses_header_hint()}"
        )

    def _on_ehlo(self, reply: Reply) -> None:
        capabilities = tuple(line.strip() for line in reply.lines[1:] if line.strip())
        if self._header_reply is not None:
            # Greeted, then one refusal, then EHLO's 250: the header was taken for a command.
            self._fail(
                f"answers the {self._header_name} header as an SMTP command "
                f"({self._header_reply.text()!r}): it does not expect one; set "
                "--proxy-protocol none, or turn PROXY on at the backend "
                "(Postfix: smtpd_upstream_proxy_protocol = haproxy)",
                capabilities,
            )
            return
        warnings: list[str] = []
        names = {cap.split()[0].upper() for cap in capabilities}
        advertised = [name for name in _PIPE_CONNECT if name in names]
        if advertised and self.keep_pipe_connect:
            warnings.append(
                f"advertises {advertised[0]} and --keep-pipe-connect passes it on: clients "
                "that remember it talk before the greeting and are cut off as early "
                "talkers; drop --keep-pipe-connect, or set pipelining_connect_advertise_hosts "
                "= (empty) on the backend"
            )
        assert self._greeting is not None
        self._pending = Verdict(
            True,
            "ok",
            self._greeting.text(),
            capabilities,
            tuple(warnings),
        )
        self._outbox.append(b"QUIT\r\n")
        self._phase = _Phase.QUIT

    def _send_ehlo(self, phase: _Phase) -> None:
        self._outbox.append(f"EHLO {self.helo_name}\r\n".encode("ascii", "replace"))
        self._phase = phase

    def _done(self) -> None:
        self._phase = _Phase.DONE
        assert self._pending is not None
        self._verdict = self._pending

    def _fail(self, message: str, capabilities: tuple[str, ...] = ()) -> None:
        self._phase = _Phase.DONE
        greeting = self._greeting.text() if self._greeting is not None else ""
        self._verdict = Verdict(False, message, greeting, capabilities)

    def _malformed(self, what: str) -> str:
        if self._phase in (_Phase.GREETING, _Phase.NUDGE) and self.proxy_protocol == "none":
            return f"writes '{what}', not an SMTP reply; {self._wants_header_hint()}"
        return f"writes '{what}', not an SMTP reply"

    # -- parsing -----------------------------------------------------------------

    def _next_reply(self) -> Reply | None:
        """Take one complete reply off the buffer, None if it is not all there yet."""
        lines: list[str] = []
        code: bytes | None = None
        pos = 0
        while True:
            end = self._buffer.find(b"\n", pos)
            if end < 0:
                if len(self._buffer) > _MAX_REPLY or (self._eof and self._buffer[pos:]):
                    raise _Malformed(escape_bytes(self._buffer[pos:], 100))
                return None
            raw = self._buffer[pos:end].rstrip(b"\r")
            match = _REPLY_LINE.match(raw) or _REPLY_LINE.match(raw + b" ")
            if match is None or (code is not None and match.group(1) != code):
                raise _Malformed(escape_bytes(raw, 100))
            code = match.group(1)
            lines.append(match.group(3).decode("utf-8", "replace"))
            pos = end + 1
            if match.group(2) == b" ":
                self._buffer = self._buffer[pos:]
                return Reply(int(code), tuple(lines))

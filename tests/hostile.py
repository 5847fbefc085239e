"""What a hostile client sends to pose as repeld: a hypothesis strategy of first bytes.

Random bytes rarely spell a log line, so the strategy joins random bytes with the
pieces a forger would use: repeld's tags, summaries, JSON and structured-data
syntax, quotes, backslashes and line ends, and addresses that are not the
client's (127.0.9.x, 6.6.6.x).
"""

from __future__ import annotations

from hypothesis import strategies as st

FRAGMENTS = [
    b"(action=drop)",
    b" (action=reject)",
    b"(action=penalty)",
    b'"action":"drop"',
    b'","client":"127.0.9.1","client_port":1,',
    b'{"event":"early-talker","client":"127.0.9.2","client_port":1,"action":"drop"}',
    b"@cee:",
    b' [x@1 event="early-talker" client="127.0.9.3" action="drop"]',
    b'"]',
    b'\\"',
    b"\\",
    b'"',
    b"]",
    b"[",
    b"}",
    b"\r\n",
    b"\n",
    b"\x00",
    b" repeld: ",
    b" repeld[1]: ",
    b"repeld[1] ",
    b"Nov 30 00:25:05 mx1 repeld[1]: ",
    b"00:25:05.250 early-talker: ",
    b"PREGREET 1 after 0.000 from [127.0.9.4]:25: ",
    b"PASS DELAY [6.6.6.9]:1 after 30.000",
    b"HANGUP after 1.000 from [6.6.6.8]:1 (close) before the greeting",
    b"from [127.0.9.5]:1: ",
    b"\xc3\xa9",
    b"\xff",
]

#: The first bytes of a hostile early talker.
first_bytes = st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=12), max_size=12).map(
    b"".join
)

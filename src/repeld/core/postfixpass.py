"""Handing a client to Postfix's smtpd as postscreen does: the bytes and the outcomes.

A Postfix `pass` service (master.cf: `smtpd pass - - y - - smtpd`) listens on
a UNIX-domain socket, normally /var/spool/postfix/private/smtpd. postscreen
(src/postscreen/postscreen_send.c, `psc_send_socket`) hands it a client so:

1. connect to the socket;
2. send the client's descriptor with SCM_RIGHTS, riding on one data byte, a
   NUL (src/util/unix_send_fd.c: a descriptor cannot travel alone);
3. send the client's endpoints as an attribute list in Postfix's default
   format, attr_print0 (src/util/attr_print0.c): each name and each value
   ends in a NUL, and one more NUL ends the list. The names are
   `client_address`, `client_port`, `server_address`, `server_port`
   (MAIL_ATTR_ACT_* in src/global/mail_proto.h), in that order;
4. wait for the service to close the channel: smtpd's `pass_accept_attr`
   (src/util/pass_accept.c) closes it once it holds the descriptor and the
   attributes, which is how the sender learns the hand-off is done.

smtpd (src/smtpd/smtpd_peer.c, `smtpd_peer_from_pass_attr`) takes an address
with a colon for IPv6, else IPv4, and both ports as decimal numbers; it needs
all four attributes. This module builds those bytes (`pass_attributes`), reads
them back as smtpd does (`decode_attributes`, for the tests), and describes
every way a hand-off can end (core/names.py's `HandOffResult`), with the errno
table that sorts a failed connect or send into them. No sockets here: the
shell (shell/passfd.py) does the system calls.
"""

from __future__ import annotations

import errno
import ipaddress
import re

from repeld.core.names import HandOffResult

__all__ = [
    "ATTR_CLIENT_ADDR",
    "ATTR_CLIENT_PORT",
    "ATTR_SERVER_ADDR",
    "ATTR_SERVER_PORT",
    "FD_CARRIER",
    "BadAttribute",
    "connect_outcome",
    "decode_attributes",
    "denied_step",
    "describe",
    "encode_attributes",
    "pass_attributes",
    "path_steps",
    "postfix_address",
    "send_outcome",
]

#: The data byte the descriptor rides on (unix_send_fd sends "" with length 1).
FD_CARRIER = b"\0"

ATTR_CLIENT_ADDR = "client_address"
ATTR_CLIENT_PORT = "client_port"
ATTR_SERVER_ADDR = "server_address"
ATTR_SERVER_PORT = "server_port"


class BadAttribute(ValueError):
    """Bytes or values that are no attr_print0 list: the caller's mistake."""


#: What each outcome means, for the event and --check-backend.
_DESCRIPTION = {
    HandOffResult.TAKEN: "smtpd took the client",
    HandOffResult.MISSING: "socket missing",
    HandOffResult.REFUSED: "connection refused",
    HandOffResult.PERMISSION: "permission denied",
    HandOffResult.BUSY: "service busy",
    HandOffResult.TIMEOUT: "no answer",
    HandOffResult.DESCRIPTOR_REFUSED: "descriptor refused",
    HandOffResult.ERROR: "cannot pass",
}

#: connect(2) on the service's socket: errno -> outcome (the rest: ERROR).
_CONNECT_ERRORS = {
    errno.ENOENT: HandOffResult.MISSING,
    errno.ENOTDIR: HandOffResult.MISSING,
    errno.ECONNREFUSED: HandOffResult.REFUSED,
    errno.ENOTSOCK: HandOffResult.REFUSED,
    errno.EPROTOTYPE: HandOffResult.REFUSED,  # a datagram socket, not a pass service
    errno.EACCES: HandOffResult.PERMISSION,
    errno.EPERM: HandOffResult.PERMISSION,
    errno.EAGAIN: HandOffResult.BUSY,  # Linux: the listen queue is full
    errno.ETIMEDOUT: HandOffResult.TIMEOUT,
}

#: sendmsg(2)/send(2) of the descriptor and the attributes: errno -> outcome.
_SEND_ERRORS = {
    errno.EAGAIN: HandOffResult.BUSY,
    errno.ETIMEDOUT: HandOffResult.TIMEOUT,
}


def connect_outcome(code: int | None) -> HandOffResult:
    """The outcome of a connect to the pass service that failed with errno `code`."""
    return _CONNECT_ERRORS.get(code or 0, HandOffResult.ERROR)


def send_outcome(code: int | None) -> HandOffResult:
    """The outcome of sending the descriptor or the attributes that failed with `code`.

    A reset, a broken pipe or a refused descriptor (EPERM, ETOOMANYREFS) all
    mean the service did not take it.
    """
    return _SEND_ERRORS.get(code or 0, HandOffResult.DESCRIPTOR_REFUSED)


def describe(outcome: HandOffResult, detail: str = "") -> str:
    """The backend-error `error` text: `pass: CAUSE (DETAIL)`."""
    text = f"pass: {_DESCRIPTION[outcome]}"
    return f"{text} ({detail})" if detail else text


def encode_attributes(pairs: tuple[tuple[str, str], ...]) -> bytes:
    """An attr_print0 list: `name NUL value NUL` for each pair, then one NUL.

    A name must be non-empty; neither may hold a NUL (the format cannot say it).
    """
    out = bytearray()
    for name, value in pairs:
        if not name or "\0" in name or "\0" in value:
            raise BadAttribute(f"attribute {name!r}={value!r} cannot be sent")
        out += name.encode("ascii") + b"\0" + value.encode("ascii") + b"\0"
    out += b"\0"
    return bytes(out)


def decode_attributes(data: bytes) -> tuple[dict[str, str], int]:
    """Read one attr_print0 list as attr_scan0 does: (attributes, bytes used).

    Raises BadAttribute if `data` holds no complete list.
    """
    attrs: dict[str, str] = {}
    pos = 0
    while True:
        end = data.find(b"\0", pos)
        if end < 0:
            raise BadAttribute("the attribute list is not terminated")
        if end == pos:  # the empty name: the end of the list
            return attrs, end + 1
        name = data[pos:end].decode("ascii", "replace")
        vend = data.find(b"\0", end + 1)
        if vend < 0:
            raise BadAttribute(f"attribute {name!r} has no value")
        attrs[name] = data[end + 1 : vend].decode("ascii", "replace")
        pos = vend + 1


#: A dotted-quad IPv4 address as the kernel writes it: taken as it is (the
#: common case, and ipaddress's parse costs some 15 us per hand-off).
_DOTTED_QUAD = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
    r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
)


def postfix_address(address: str) -> str:
    """An address as smtpd wants it: IPv4 for an IPv4-mapped IPv6 address, no scope.

    smtpd strips `::ffff:` from a direct client too, so a client looks the same
    to Postfix's access maps whichever way it came in.
    """
    if _DOTTED_QUAD.fullmatch(address):
        return address
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        raise BadAttribute(f"not an IP address: {address!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def pass_attributes(client: str, client_port: int, server: str, server_port: int) -> bytes:
    """The attribute list postscreen sends after the descriptor, for these endpoints."""
    for port in (client_port, server_port):
        if not 0 <= port <= 65535:
            raise BadAttribute(f"not a port: {port}")
    written_client = postfix_address(client).encode("ascii")  # a bad client is named first
    # The server is one of the few addresses repeld listens on (or a balancer's
    # destinations): written once each, not once per hand-off.
    written = _SERVERS.get(server)
    if written is None:
        if len(_SERVERS) >= _SERVERS_KEPT:
            _SERVERS.clear()
        written = _SERVERS[server] = postfix_address(server).encode("ascii")
    # encode_attributes' list, written out: this runs once per hand-off, and
    # the values can hold no NUL (an address and two numbers).
    return _PASS_LIST % (written_client, client_port, written, server_port)


#: Server addresses as smtpd wants them, by address (`pass_attributes`); a
#: bounded table, as a host listens on a few.
_SERVERS: dict[str, bytes] = {}
_SERVERS_KEPT = 256


_PASS_LIST = (
    f"{ATTR_CLIENT_ADDR}\0%s\0{ATTR_CLIENT_PORT}\0%d\0"
    f"{ATTR_SERVER_ADDR}\0%s\0{ATTR_SERVER_PORT}\0%d\0\0"
).encode("ascii")


def path_steps(root: str, path: str) -> list[str]:
    """The paths a process resolving `path` (absolute) inside `root` passes through,
    as seen from outside it: `root` itself, each directory below, then `path`.

    `root` is "/" without a chroot; with one, the directories above it do not
    matter to a process inside.
    """
    steps = [root]
    here = root.rstrip("/")
    for part in [p for p in path.split("/") if p]:
        here = f"{here}/{part}"
        steps.append(here)
    return steps


def denied_step(
    steps: list[tuple[str, int, int, int]], uid: int, gid: int
) -> tuple[str, str] | None:
    """The first of `steps` that a process of `uid` and `gid` alone may not pass, with
    the permission it lacks ("search" or "write"), or None if it may connect.

    `steps` are (path, mode, owner, group) for each directory from the root down,
    then the socket (`path_steps`, stat(2)): connect(2) needs search on every
    directory and write on the socket. The classic rule: the owner's bits if it
    owns the step, else the group's if its group does, else the others'; uid 0
    passes everywhere. A dropped repeld has no supplementary group
    (service/privileges.py); access control lists and mandatory access control
    are not seen here.
    """
    if uid == 0:
        return None
    last = len(steps) - 1
    for i, (path, mode, owner, group) in enumerate(steps):
        if owner == uid:
            bits = mode >> 6
        elif group == gid:
            bits = mode >> 3
        else:
            bits = mode
        need, name = (0o2, "write") if i == last else (0o1, "search")
        if not bits & need:
            return path, name
    return None

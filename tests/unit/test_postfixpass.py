"""core/postfixpass.py: the bytes postscreen sends smtpd with a client, and the outcomes.

The expected bytes are written out by hand from Postfix's attr_print0.c
(name NUL value NUL ..., then NUL) and mail_proto.h (the attribute names);
tests/system/test_postfix_pass.py shows a real smtpd takes them.
"""

from __future__ import annotations

import errno

import pytest

from repeld.config.errors import SettingError
from repeld.config.values import Backend, PassBackend, parse_backend, parse_listen
from repeld.core import postfixpass
from repeld.core.names import HandOffResult
from repeld.core.postfixpass import BadAttribute


@pytest.mark.parametrize(
    ("endpoints", "expected"),
    [
        (
            ("192.0.2.1", 5678, "198.51.100.7", 25),
            b"client_address\x00192.0.2.1\x00client_port\x005678\x00"
            b"server_address\x00198.51.100.7\x00server_port\x0025\x00\x00",
        ),
        (  # IPv6 as smtpd wants it: with colons, no brackets
            ("2001:db8::1", 1, "::1", 2525),
            b"client_address\x002001:db8::1\x00client_port\x001\x00"
            b"server_address\x00::1\x00server_port\x002525\x00\x00",
        ),
        (  # an IPv4-mapped client on a dual-stack listener is plain IPv4, as smtpd makes it
            ("::ffff:127.0.0.5", 40000, "::ffff:127.0.0.1", 25),
            b"client_address\x00127.0.0.5\x00client_port\x0040000\x00"
            b"server_address\x00127.0.0.1\x00server_port\x0025\x00\x00",
        ),
        (  # a link-local scope means nothing to smtpd's address checks
            ("fe80::1%eth0", 2, "fe80::2%eth0", 25),
            b"client_address\x00fe80::1\x00client_port\x002\x00"
            b"server_address\x00fe80::2\x00server_port\x0025\x00\x00",
        ),
    ],
)
def test_pass_attributes_are_postscreens_bytes(
    endpoints: tuple[str, int, str, int], expected: bytes
) -> None:
    data = postfixpass.pass_attributes(*endpoints)
    assert data == expected
    attrs, used = postfixpass.decode_attributes(data + b"trailing")
    assert used == len(data)
    assert list(attrs) == ["client_address", "client_port", "server_address", "server_port"]


@pytest.mark.parametrize(
    "endpoints",
    [
        ("not-an-address", 1, "127.0.0.1", 25),
        ("127.0.0.1", 70000, "127.0.0.1", 25),
        ("127.0.0.1", 1, "127.0.0.1", -1),
        ("127.0.0.1", 1, "not-a-server", 25),
    ],
)
def test_bad_endpoints_are_refused_before_anything_is_sent(
    endpoints: tuple[str, int, str, int],
) -> None:
    with pytest.raises(BadAttribute):
        postfixpass.pass_attributes(*endpoints)


def test_server_addresses_are_written_once_each_in_a_bounded_table() -> None:
    # The server's half is kept by address; a balancer with many destinations
    # never grows the table past its bound, and every list stays right.
    servers = [f"10.{i // 256}.{i % 256}.1" for i in range(3 * postfixpass._SERVERS_KEPT)]
    for server in [*servers, *servers[:10]]:
        data = postfixpass.pass_attributes("::ffff:192.0.2.9", 1, f"::ffff:{server}", 25)
        attrs, _ = postfixpass.decode_attributes(data)
        assert attrs["server_address"] == server and attrs["client_address"] == "192.0.2.9"
        assert len(postfixpass._SERVERS) <= postfixpass._SERVERS_KEPT
    # a refused server is never kept
    with pytest.raises(BadAttribute):
        postfixpass.pass_attributes("127.0.0.1", 1, "::ffff:not-an-address", 25)
    assert "::ffff:not-an-address" not in postfixpass._SERVERS


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        ((), b"\x00"),
        ((("a", ""),), b"a\x00\x00\x00"),
        ((("name", "value"), ("n2", "v2")), b"name\x00value\x00n2\x00v2\x00\x00"),
    ],
)
def test_encode_round_trips(pairs: tuple[tuple[str, str], ...], expected: bytes) -> None:
    assert postfixpass.encode_attributes(pairs) == expected
    assert postfixpass.decode_attributes(expected) == (dict(pairs), len(expected))


@pytest.mark.parametrize("pairs", [(("", "v"),), (("a\0b", "v"),), (("a", "v\0"),)])
def test_what_the_format_cannot_say_is_refused(pairs: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(BadAttribute):
        postfixpass.encode_attributes(pairs)


@pytest.mark.parametrize("data", [b"", b"name", b"name\x00value", b"name\x00value\x00"])
def test_an_unterminated_list_is_incomplete(data: bytes) -> None:
    with pytest.raises(BadAttribute):
        postfixpass.decode_attributes(data)


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (errno.ENOENT, HandOffResult.MISSING),
        (errno.ENOTDIR, HandOffResult.MISSING),
        (errno.ECONNREFUSED, HandOffResult.REFUSED),
        (errno.ENOTSOCK, HandOffResult.REFUSED),
        (errno.EACCES, HandOffResult.PERMISSION),
        (errno.EPERM, HandOffResult.PERMISSION),
        (errno.EAGAIN, HandOffResult.BUSY),
        (errno.ETIMEDOUT, HandOffResult.TIMEOUT),
        (errno.EIO, HandOffResult.ERROR),
        (None, HandOffResult.ERROR),
    ],
)
def test_connect_errors_name_their_cause(code: int | None, outcome: HandOffResult) -> None:
    assert postfixpass.connect_outcome(code) is outcome


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (errno.EPIPE, HandOffResult.DESCRIPTOR_REFUSED),
        (errno.ECONNRESET, HandOffResult.DESCRIPTOR_REFUSED),
        (errno.ETOOMANYREFS, HandOffResult.DESCRIPTOR_REFUSED),
        (errno.EAGAIN, HandOffResult.BUSY),
    ],
)
def test_send_errors_name_their_cause(code: int, outcome: HandOffResult) -> None:
    assert postfixpass.send_outcome(code) is outcome


def test_every_outcome_is_described() -> None:
    for outcome in HandOffResult:
        assert postfixpass.describe(outcome).startswith("pass: ")
    assert postfixpass.describe(HandOffResult.MISSING, "x: y") == "pass: socket missing (x: y)"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pass:/var/spool/postfix/private/smtpd", PassBackend("/var/spool/postfix/private/smtpd")),
        ("pass:/private/smtpd", PassBackend("/private/smtpd")),
        ("127.0.0.1:10025", Backend("127.0.0.1", 10025)),
    ],
)
def test_backend_takes_a_pass_service(text: str, expected: object) -> None:
    backend = parse_backend(text)
    assert backend == expected
    assert str(backend) == text


@pytest.mark.parametrize("text", ["pass:", "pass:private/smtpd", "pass:/" + "x" * 200])
def test_a_pass_service_needs_an_absolute_socket_path(text: str) -> None:
    with pytest.raises(SettingError):
        parse_backend(text)


def test_a_listener_can_have_its_own_pass_service() -> None:
    spec = parse_listen("127.0.0.1:25,backend=pass:/var/spool/postfix/private/smtpd")
    assert spec.backend == PassBackend("/var/spool/postfix/private/smtpd")
    assert str(spec) == "127.0.0.1:25,backend=pass:/var/spool/postfix/private/smtpd"


@pytest.mark.parametrize(
    ("root", "path", "expected"),
    [
        ("/", "/var/spool/postfix/private/smtpd",
         ["/", "/var", "/var/spool", "/var/spool/postfix", "/var/spool/postfix/private",
          "/var/spool/postfix/private/smtpd"]),
        # inside a chroot only the chroot's own directories count
        ("/var/spool/postfix", "/private/smtpd",
         ["/var/spool/postfix", "/var/spool/postfix/private", "/var/spool/postfix/private/smtpd"]),
        ("/srv/pf/", "//private//smtpd", ["/srv/pf/", "/srv/pf/private", "/srv/pf/private/smtpd"]),
    ],
)  # fmt: skip
def test_path_steps_are_each_directory_from_the_root_down_then_the_socket(
    root: str, path: str, expected: list[str]
) -> None:
    assert postfixpass.path_steps(root, path) == expected


POSTFIX_UID, POSTFIX_GID, POSTDROP_GID, NOBODY_UID, NOGROUP_GID = 101, 102, 103, 65534, 65534
#: Debian's queue directory: private/ is postfix's alone, public/ postdrop's to enter.
_QUEUE = [("/", 0o755, 0, 0), ("/var", 0o755, 0, 0), ("/var/spool", 0o755, 0, 0),
          ("/var/spool/postfix", 0o755, 0, 0)]  # fmt: skip
PRIVATE = [*_QUEUE, ("/var/spool/postfix/private", 0o700, POSTFIX_UID, 0),
           ("/var/spool/postfix/private/smtpd", 0o666, POSTFIX_UID, 0)]  # fmt: skip
PUBLIC = [*_QUEUE, ("/var/spool/postfix/public", 0o710, POSTFIX_UID, POSTDROP_GID),
          ("/var/spool/postfix/public/smtpd", 0o666, POSTFIX_UID, 0)]  # fmt: skip


@pytest.mark.parametrize(
    ("steps", "uid", "gid", "expected"),
    [
        (PRIVATE, POSTFIX_UID, POSTFIX_GID, None),
        (PRIVATE, NOBODY_UID, NOGROUP_GID, ("/var/spool/postfix/private", "search")),
        (PRIVATE, 0, 0, None),  # root passes everywhere
        (PUBLIC, NOBODY_UID, POSTDROP_GID, None),  # --group postdrop
        (PUBLIC, NOBODY_UID, NOGROUP_GID, ("/var/spool/postfix/public", "search")),
        # a socket that only its owner may write to
        ([*PRIVATE[:-1], ("/var/spool/postfix/private/smtpd", 0o600, 0, 0)], POSTFIX_UID,
         POSTFIX_GID, ("/var/spool/postfix/private/smtpd", "write")),
        # the owner's bits decide for the owner, even where the group's would allow
        ([("/", 0o755, 0, 0), ("/d", 0o070, POSTFIX_UID, POSTFIX_GID), ("/d/s", 0o666, 0, 0)],
         POSTFIX_UID, POSTFIX_GID, ("/d", "search")),
        # read without search is no way through
        ([("/", 0o755, 0, 0), ("/d", 0o744, 0, 0), ("/d/s", 0o666, 0, 0)], NOBODY_UID,
         NOGROUP_GID, ("/d", "search")),
    ],
    ids=["postfix-private", "nobody-private", "root", "postdrop-public", "nogroup-public",
         "socket-owner-only", "owner-bits-decide", "read-is-not-search"],
)  # fmt: skip
def test_denied_step_names_the_first_step_the_identity_may_not_pass(
    steps: list[tuple[str, int, int, int]], uid: int, gid: int, expected: tuple[str, str] | None
) -> None:
    assert postfixpass.denied_step(steps, uid, gid) == expected

"""The configuration file: precedence under the flags, every error path, --check-config."""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from repeld.cli import parse_args, settings_from
from repeld.config.errors import ConfigError
from repeld.config.file import load_settings, read_config, render_settings
from repeld.config.settings import Listen

SAMPLE = Path(__file__).resolve().parents[2] / "scripts" / "repeld.toml.sample"


def settings_for(tmp_path: Path, text: str, *argv: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "repeld.toml"
    path.write_text(text)
    flags, actions = parse_args(["-c", str(path), *argv])
    return settings_from(flags, actions)


def test_flags_override_the_file_and_the_file_overrides_defaults(tmp_path: Path) -> None:
    text = 'backend = "127.0.0.1:10025"\ndelay = 5\nlisten = ["127.0.0.1:2525"]\n'
    s = settings_for(tmp_path, text)
    assert (s.delay, s.listen, s.max_per_client) == (5.0, (Listen("127.0.0.1", 2525),), 10)
    s = settings_for(tmp_path, text, "--delay", "7", "-l", "[::1]:2526,nodelay")
    assert s.delay == 7.0
    assert s.listen == (Listen("::1", 2526, nodelay=True),)  # a flag replaces the list
    assert s.backend.port == 10025


def test_boolean_keys_and_their_flags(tmp_path: Path) -> None:
    text = 'backend = "127.0.0.1:25"\nreport-attacks = false\n'
    assert settings_for(tmp_path, text).report_attacks is False
    assert settings_for(tmp_path, text, "--report-attacks").report_attacks is True


def test_missing_default_file_is_fine_but_a_named_one_is_not(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    s = load_settings({"backend": parse_args(["-b", "127.0.0.1:25"])[0]["backend"]}, str(missing))
    assert s.delay == 25.0
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read: No such file"):
        load_settings({}, str(missing), explicit=True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("delay = [", r"repeld\.toml: not valid TOML: Invalid value"),
        ('backend = "x:1"\ndelay = 3 3\n', r"repeld\.toml: not valid TOML: .*line 2"),
        ('backend = "x:1"\nmax_held = 5\n', r"repeld\.toml:2: unknown key 'max_held' .*'max-held'"),
        ('backend = "x:1"\nbogus = 1\n', r"repeld\.toml:2: unknown key 'bogus'$"),
        ('backend = "x:1"\nconfig = "/x"\n', r":2: unknown key 'config'"),
        (
            'backend = "x:1"\n\ndelay = 0\n',
            r"repeld\.toml:3: delay: invalid value '0': must be more",
        ),
        ('backend = "x:1"\ndelay = -2.5\n', r":2: delay: invalid value '-2.5'"),
        ('backend = "x:1"\ndelay = true\n', r":2: delay: invalid value True: expected a string"),
        ('backend = "x:1"\ndelay = [1, 2]\n', r":2: delay: .*expected a single value"),
        ('backend = "x:1"\nreport-attacks = "no"\n', r":2: report-attacks: .*true or false"),
        ('backend = "x:1"\nlisten = ["mail.example:25"]\n', r":2: listen: .*not an IP address"),
        (
            'backend = "x:1"\ntrusted = ["10.0.0.0/33"]\n',
            r":2: trusted: invalid value '10\.0\.0\.0/33'",
        ),
        ('backend = "x:1"\nmax-held = "many"\n', r":2: max-held: .*whole number"),
        ("delay = 3\n", r"backend is required"),
    ],
)
def test_every_problem_names_file_line_key_and_value(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "repeld.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings({}, str(path), explicit=True)
    assert len(info.value.problems) == 1
    assert re.search(expected, info.value.problems[0]), info.value.problems[0]


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "repeld.toml"
    path.write_text('backend = "x:1"\ndelay = 0\nbogus = 1\non-early = "bite"\n')
    with pytest.raises(ConfigError) as info:
        read_config(str(path))
    assert [p.split(": ")[0] for p in info.value.problems] == [f"{path}:{n}" for n in (2, 3, 4)]


def test_trusted_file_problems(tmp_path: Path) -> None:
    nets = tmp_path / "trusted.txt"
    nets.write_text("# our relays\n192.0.2.0/24\n\n2001:db8::/32  # v6\nnot-a-net\n")
    path = tmp_path / "repeld.toml"
    path.write_text(f'backend = "x:1"\ntrusted-file = ["{nets}"]\n')
    with pytest.raises(
        ConfigError, match=rf"trusted-file: invalid value '{nets}': line 5: 'not-a-net'"
    ):
        load_settings({}, str(path), explicit=True)
    nets.write_text("192.0.2.0/24\n2001:db8::/32\n")
    assert load_settings({}, str(path), explicit=True).trusted_file == (str(nets),)
    path.write_text(f'backend = "x:1"\ntrusted-file = ["{tmp_path}/absent"]\n')
    with pytest.raises(ConfigError, match="absent': cannot read: No such file"):
        load_settings({}, str(path), explicit=True)


def test_check_config_prints_settings_that_read_back_the_same(tmp_path: Path) -> None:
    # --user: whoever runs the test, as the sample's "repeld" may not exist here.
    me = pwd.getpwuid(os.geteuid()).pw_name
    argv = ["--check-config", "-c", str(SAMPLE), "-d", "12.5", "--user", me]
    out = subprocess.run(
        [sys.executable, "-m", "repeld", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "delay = 12.5\n" in out
    again = tmp_path / "effective.toml"
    again.write_text(out)
    assert load_settings({}, str(again), explicit=True) == load_settings(
        {"delay": 12.5, "user": me}, str(SAMPLE), explicit=True
    )


def test_check_config_exit_2_with_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('backend = "127.0.0.1:25"\ndelay = 0\nlisten = ["[::1]:99999"]\n')
    proc = subprocess.run(
        [sys.executable, "-m", "repeld", "--check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines == [
        f"repeld: {path}:2: delay: invalid value '0': must be more than 0 and at most 3600",
        f"repeld: {path}:3: listen: invalid value '[::1]:99999': port must be 0-65535",
    ]


#: Every option away from its default (the two handlers in turn): what --check-config
#: prints of it must read back the same.
_EVERY_OPTION = """\
listen = ["127.0.0.1:2525", "[::1]:2526,nodelay", "127.0.0.2:2527,backend=127.0.0.1:26"]
delay = 12.5
trusted = ["192.0.2.0/24", "::ffff:10.0.0.0/104"]
trusted-file = []
proxy-from = ["127.0.0.9"]
proxy-timeout = 3.5
proxy-protocol = "v2"
on-early = "enforce"
teaser = true
teaser-text = "mx.example.org ESMTP \\"hi\\" \\\\ back"
report-attacks = false
syslog = "udp://127.0.0.1:5514"
log-format = "json"
facility = "local3"
sd-id = "repeld@32473"
metrics = "[::1]:9199"
backend-check-interval = 17
relay-timeout = 100
connect-timeout = 7
backlog = 511
max-held = 1234
max-per-client = 9
max-exec = 11
cache = "redis://127.0.0.1:6380/3?password_file={password}"
cache-ttl = 86400
cache-v6-prefix = 56
penalty-ttl = 600
dnsbl = ["zen.example.org=127.0.0.[2..11]*3", "b.example.org"]
dnswl = ["list.dnswl.example=127.0.[0..255].[1..3]*2"]
dnsbl-threshold = 2
dnswl-threshold = -1
dnsbl-action = "delay"
dnsbl-delay = 60
resolver = "[::1]:5353"
dns-timeout = 2.5
workers = 2
shutdown-grace = 9
keep-pipe-connect = true
user = "nobody"
group = "nogroup"
chroot = "/var/empty"
pidfile = "/run/x.pid"
foreground = true
"""


@pytest.mark.parametrize(
    "handler",
    [
        # A program's words with a space and a quote in them (rendered as a
        # tuple's repr, `exec` once read back as a program named "('/usr/bin/env",),
        # and on two lines (a newline in a TOML string is no TOML).
        """exec = "/usr/bin/env 'FOO=a b' X=\\"it's\\" cat"\n""",
        '''exec = """/bin/sh -c '\n  exec /bin/cat\n'"""\n''',
        'backend = "pass:/var/spool/postfix/private/smtpd"\n',
        'backend = "[::1]:10025"\nno-cache = true\n',
    ],
)
@pytest.mark.parametrize(
    "odd",
    [
        "",
        'cache = "sqlite:////tmp/x.sqlite"',  # the SQLAlchemy spelling: read as //tmp/x
        'cache = "sqlite:/tmp/a %25 b.sqlite"',
        'cache = "redis://:s3c%3Ar%40t@[::1]:6380/3"',  # a password in the URL
        'cache = "rediss://us%20er@127.0.0.1?password_file={pwfile}"',
        'delay = "0.00001"',  # was printed 1e-05, which the flag refuses
        'pidfile = "/run/a\\u0001b.pid"',
    ],
)
def test_every_option_printed_reads_back_the_same(tmp_path: Path, handler: str, odd: str) -> None:
    (tmp_path / "password").write_text("secret\n")
    text = handler + _EVERY_OPTION.format(password=tmp_path / "password")
    if odd:  # in place of the line of that key
        key = odd.split(" =", 1)[0]
        text = "".join(f"{line}\n" for line in text.splitlines() if not line.startswith(key + " "))
        password = tmp_path / "pass word+%26"  # read back as written, not as a query
        password.write_text("secret\n")
        text += odd.replace("{pwfile}", urllib.parse.quote(str(password))) + "\n"
    path = tmp_path / "repeld.toml"
    path.write_text(text)
    settings = load_settings({}, str(path), explicit=True)
    again = tmp_path / "again.toml"
    again.write_text(render_settings(settings, reveal=True))  # what a worker is given
    assert load_settings({}, str(again), explicit=True) == settings
    if settings.cache is not None and settings.cache.password is not None:
        printed = render_settings(settings)  # --check-config: never the password
        assert "s3c" not in printed and ":***@" in printed


def test_the_sample_config_is_valid_and_documents_every_key() -> None:
    settings = load_settings({}, str(SAMPLE), explicit=True)
    assert settings.proxy_protocol == "v1"
    text = SAMPLE.read_text()
    rendered = render_settings(settings)
    for line in rendered.splitlines():
        key = line.lstrip("# ").split(" ")[0].rstrip(":")
        assert key in text, f"the sample does not mention {key}"


@pytest.mark.parametrize(
    ("text", "net"),
    [
        ("::ffff:192.0.2.0/120", "192.0.2.0/24"),
        ("::ffff:127.0.0.1", "127.0.0.1/32"),
        ("::ffff:0:0/96", "0.0.0.0/0"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("192.0.2.0/24", "192.0.2.0/24"),
    ],
)
def test_an_ipv4_mapped_network_is_the_ipv4_network_it_maps(
    tmp_path: Path, text: str, net: str
) -> None:
    # Clients' mapped addresses are judged as IPv4 (::ffff:192.0.2.7 is 192.0.2.7): a
    # network written mapped never matched anyone, and a balancer in it was judged an
    # early talker for its PROXY header.
    settings = settings_for(tmp_path, 'backend = "127.0.0.1:25"\n', "--trusted", text)
    assert net in [str(n) for n in settings.trusted]
    settings = settings_for(tmp_path, f'backend = "127.0.0.1:25"\nproxy-from = ["{text}"]\n')
    assert net in [str(n) for n in settings.proxy_from]

"""The documentation tells the truth about the code.

The manual pages are the complete reference: every option in settings.OPTIONS
(and the command's actions) is in repeld(8), repeld.conf(5) and `repeld --help`;
every flag a listener takes after ADDR:PORT is documented; every event name and
field built in events.py is described, each event with its severity and its own
fields, and every counter of the stats event (the server's, the pass cache's and
those the parent of --workers adds); every reason of a pass is named; the
settings a SIGHUP cannot change are listed; the defaults and limits written in
repeld(8) are the ones the parsers enforce; every key of the sample
configuration is documented; the manual pages pass `mandoc -T lint -W warning`.

README.md is the way in, read in ten minutes, not a second reference: it names
what a newcomer needs (NEWCOMER_FLAGS, NEWCOMER_EVENTS, every runtime
dependency, the manual pages) and stays under README_MAX_WORDS; what it does
say must be true: every flag it names exists, and each option or event row it
has gives the code's default or severity.

Conventions this relies on (see the comments at the top of the pages):

* repeld(8) OPTIONS: one `.It Fl x , Fl -name ...` entry per option, with
  "The default is N" (or "The default is\\n.Cm word .") for a number or a
  word, "On by default." / "Off by default." for a switch, and its limits
  as "A to B" or "More than A and at most B".
* repeld(8) EVENTS: one `.It Cm name Pq severity` entry per event, with no
  nested list, naming its own fields as `.Va name`; the connection fields are
  described once before the list, and the counters of `stats` in its entry.
* repeld(8) SIGNALS: the `.It Dv SIGHUP` entry names every setting that needs
  a restart as `Fl -name`.
* repeld.conf(5) KEYS: one `.It Ic key` entry per key.
* README.md: an options table whose first cell names `--name` and whose
  second cell is the default; an events table with rows
  "| `name` | severity | meaning |".
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest

from repeld import metrics
from repeld.config.errors import SettingError
from repeld.config.settings import OPTIONS, Option
from repeld.core import events, postfixpass
from repeld.core.dnsbl import DnsAction, DnsScore
from repeld.core.events import ConnInfo, Event
from repeld.core.hold import Blocked, EarlyTalk, HangUp, Pass, PassReason
from repeld.core.names import EventName, ExecEnd, HandOffResult, RelayEnd
from repeld.report.main import make_parser as make_report_parser

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "repeld"
MAN_DIR = ROOT / "man"
MAN8 = MAN_DIR / "repeld.8"
MAN5 = MAN_DIR / "repeld.conf.5"
README = ROOT / "README.md"
SAMPLE = ROOT / "scripts" / "repeld.toml.sample"

#: Flags of the command that are not settings.
ACTIONS = ("config", "check-config", "check-kernel", "check-backend", "version")

#: Long flags of other programs that the documents quote (pip, useradd, systemctl,
#: redis-cli...).
FOREIGN_FLAGS = frozenset(
    {
        "break-system-packages",
        "system",
        "no-create-home",
        "shell",
        "now",
        "strict",
        "scan",
        "pattern",
    }
)

#: A long flag in Markdown or plain text, not part of a longer word.
_FLAG_TEXT = r"(?<![\w-])--{}(?![\w-])"
#: A long flag in mdoc source: `Fl -name`.
_FLAG_MDOC = r"\bFl -{}(?![\w-])"


def _long_flags() -> list[str]:
    flags = [opt.name for opt in OPTIONS]
    flags += [f"no-{opt.name}" for opt in OPTIONS if opt.negatable]
    return flags + list(ACTIONS)


LONG_FLAGS = _long_flags()


def _report_flags() -> list[str]:
    """The long flags of `repeld report`."""
    return [
        flag[2:]
        for action in make_report_parser()._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag != "--help"
    ]


REPORT_FLAGS = _report_flags()


@pytest.mark.parametrize("flag", REPORT_FLAGS)
def test_report_flag_is_documented(flag: str) -> None:
    report = _read(MAN8).split(".Ss Report", 1)[-1].split(".Sh ", 1)[0]
    assert re.search(rf"^\.It Fl -{re.escape(flag)}\b", report, re.M), (
        f"repeld report --{flag} has no entry in the Report part of repeld(8)"
    )
    assert re.search(_FLAG_MDOC.format(re.escape(flag)), _section(_read(MAN8), "SYNOPSIS"))


@cache
def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _section(man: str, name: str) -> str:
    """The mdoc source of one `.Sh` section, without its heading."""
    match = re.search(rf"^\.Sh {re.escape(name)}\n(.*?)(?=^\.Sh |\Z)", man, re.M | re.S)
    assert match is not None, f"no .Sh {name} section"
    return match.group(1)


def _option_blocks() -> dict[str, str]:
    """repeld(8) OPTIONS entries by long flag, each joined into one line."""
    blocks: dict[str, str] = {}
    for chunk in re.split(r"\n(?=\.It Fl )", _section(_read(MAN8), "OPTIONS")):
        if not chunk.startswith(".It Fl "):
            continue
        head = chunk.split("\n", 1)[0]
        for name in re.findall(r"Fl -([a-z][a-z0-9-]*)", head):
            blocks[name] = " ".join(chunk.split("\n"))
    return blocks


def _option_block(name: str) -> str:
    blocks = _option_blocks()
    assert name in blocks, f"--{name} has no `.It Fl -{name}` entry in man/repeld.8 OPTIONS"
    return blocks[name]


@cache
def _help_text() -> str:
    # Wide enough that argparse never wraps a flag; src first, as pytest's pythonpath.
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-m", "repeld", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- every option everywhere ---------------------------------------------------


@pytest.mark.parametrize("flag", LONG_FLAGS)
def test_flag_has_an_entry_in_the_manual(flag: str) -> None:
    heads = [
        line for line in _section(_read(MAN8), "OPTIONS").splitlines() if line.startswith(".It ")
    ]
    assert any(re.search(_FLAG_MDOC.format(re.escape(flag)), h) for h in heads), (
        f"--{flag} has no `.It Fl -{flag}` entry in man/repeld.8 OPTIONS"
    )


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.name)
def test_option_is_in_the_synopsis(opt: Option) -> None:
    synopsis = _section(_read(MAN8), "SYNOPSIS")
    spellings = [_FLAG_MDOC.format(re.escape(opt.name))]
    if opt.short:
        spellings.append(rf"\bFl {re.escape(opt.short[1:])}\b")
    assert any(re.search(s, synopsis) for s in spellings), (
        f"--{opt.name} is missing from the SYNOPSIS of man/repeld.8"
    )


#: What a newcomer needs from the README: the options of a first deployment and of the
#: go-live checklist (observe mode, the checks), in its options table or its text.
NEWCOMER_FLAGS = (
    "listen",
    "backend",
    "exec",
    "proxy-protocol",
    "delay",
    "trusted",
    "trusted-file",
    "on-early",
    "teaser",
    "cache",
    "penalty-ttl",
    "dnsbl",
    "dnswl",
    "syslog",
    "metrics",
    "workers",
    "user",
    "foreground",
    "check-config",
    "check-backend",
)
#: The events a newcomer meets first; each has a row in the README's events table.
NEWCOMER_EVENTS = (
    "pass",
    "early-talker",
    "hangup",
    "backend-error",
    "config-error",
    "start",
    "stop",
)
#: Ten minutes of reading, at about 250 words a minute (code blocks read faster).
README_MAX_WORDS = 2600


@pytest.mark.parametrize("flag", NEWCOMER_FLAGS)
def test_newcomer_flag_is_in_the_readme(flag: str) -> None:
    assert flag in LONG_FLAGS, f"--{flag} is no longer a flag: update NEWCOMER_FLAGS"
    assert re.search(_FLAG_TEXT.format(re.escape(flag)), _read(README)), (
        f"--{flag} is not mentioned in README.md"
    )


def test_the_readme_is_read_in_ten_minutes() -> None:
    words = len(_read(README).split())
    assert words <= README_MAX_WORDS, (
        f"README.md has {words} words: reference detail belongs in the manual pages"
    )


def test_the_readme_points_to_the_reference() -> None:
    text = _read(README)
    assert "](man/repeld.8)" in text and "](man/repeld.conf.5)" in text


def test_the_readme_names_every_runtime_dependency() -> None:
    project = tomllib.loads(_read(ROOT / "pyproject.toml"))["project"]
    section = _read(README).split("## Dependencies", 1)[-1].split("\n## ", 1)[0]
    names = [re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0] for r in project["dependencies"]]
    names.append("redis")  # the [redis] extra, for a redis:// pass cache
    missing = [name for name in names if f"**{name}**" not in section]
    assert not missing, f"README.md Dependencies does not name {missing}"


@pytest.mark.parametrize("flag", LONG_FLAGS)
def test_flag_is_in_the_help(flag: str) -> None:
    assert re.search(_FLAG_TEXT.format(re.escape(flag)), _help_text()), (
        f"--{flag} is not in `repeld --help`"
    )


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.name)
def test_option_is_a_key_in_repeld_conf(opt: Option) -> None:
    assert re.search(rf"^\.It Ic {re.escape(opt.name)}$", _read(MAN5), re.M), (
        f"key {opt.name!r} has no `.It Ic {opt.name}` entry in man/repeld.conf.5 KEYS"
    )


def _flags_named(text: str, pattern: str) -> set[str]:
    return set(re.findall(pattern, text))


@pytest.mark.parametrize("path", [README, MAN8, MAN5], ids=lambda p: p.name)
def test_every_documented_flag_exists(path: Path) -> None:
    text = _read(path)
    if path.suffix == ".md":
        named = _flags_named(text, r"(?<![\w-])--([a-z][a-z0-9-]*)")
    else:
        named = _flags_named(text, r"\bFl -([a-z][a-z0-9-]*)")
    known = set(LONG_FLAGS) | {"help"} | FOREIGN_FLAGS | set(REPORT_FLAGS)
    assert named - known == set(), f"{path.name} names flags repeld does not have"


# -- defaults and limits -------------------------------------------------------

_DEFAULT = re.compile(r"The default is (?:\.[A-Z][a-z] )?([^\s;,]+?)\.?(?=[\s;,]|$)")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.name)
def test_default_in_the_manual_is_the_code_default(opt: Option) -> None:
    block = _option_block(opt.name)
    if isinstance(opt.default, bool):
        word = "On" if opt.default else "Off"
        assert f"{word} by default." in block, f"--{opt.name}: say '{word} by default.'"
        return
    if not (_is_number(opt.default) or isinstance(opt.default, str)):
        return  # derived at start-up or a list: described in words
    match = _DEFAULT.search(block)
    assert match is not None, f"--{opt.name}: no 'The default is ...' in man/repeld.8"
    written = match.group(1)
    if _is_number(opt.default):
        assert float(written.replace("\\-", "-")) == opt.default, (
            f"--{opt.name}: man says {written}"
        )
    else:
        assert written == opt.default, f"--{opt.name}: man says {written!r}"


def _readme_option_rows() -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for line in _read(README).splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        for name in re.findall(r"`--([a-z][a-z0-9-]*)", cells[0]):
            rows[name] = cells
    return rows


def test_the_readme_options_table_has_the_first_options() -> None:
    rows = _readme_option_rows()
    for name in ("listen", "backend", "proxy-protocol", "delay", "trusted", "on-early"):
        assert name in rows, f"--{name} has no row in the README options table"


@pytest.mark.parametrize("opt", OPTIONS, ids=lambda o: o.name)
def test_default_in_the_readme_is_the_code_default(opt: Option) -> None:
    rows = _readme_option_rows()
    if opt.name not in rows:
        return  # the README has a row for the options most sites set; repeld(8) has all
    cell = rows[opt.name][1].strip("`")
    if isinstance(opt.default, bool):
        assert cell == ("on" if opt.default else "off"), f"--{opt.name}: README says {cell!r}"
    elif _is_number(opt.default):
        assert float(cell) == opt.default, f"--{opt.name}: README says {cell!r}"
    elif isinstance(opt.default, str):
        assert cell == opt.default, f"--{opt.name}: README says {cell!r}"


def _numeric(opt: Option) -> bool:
    if opt.parse is None:
        return False
    # The default when it is a number: "1" is below some options' limits.
    sample = str(opt.default) if _is_number(opt.default) else "1"
    try:
        return _is_number(opt.parse(sample))
    except SettingError:
        return False


def _accepts(opt: Option, text: str) -> bool:
    assert opt.parse is not None
    try:
        opt.parse(text)
    except SettingError:
        return False
    return True


@pytest.mark.parametrize("opt", [o for o in OPTIONS if _numeric(o)], ids=lambda o: o.name)
def test_limits_in_the_manual_are_the_parser_limits(opt: Option) -> None:
    block = _option_block(opt.name)
    open_low = re.search(r"More than (\d+) and at most (\d+)", block)
    closed = re.search(r"(?:(\\?-)|\b)(\d+) to (\\?-)?(\d+)\b", block)
    assert open_low or closed, (
        f"--{opt.name}: write its limits as 'A to B' or 'More than A and at most B'"
    )
    if open_low:
        low, high = int(open_low.group(1)), int(open_low.group(2))
        assert not _accepts(opt, str(low)), f"--{opt.name} accepts {low}"
        assert _accepts(opt, f"{low}.5" if _accepts(opt, "0.5") else str(low + 1))
    else:
        assert closed is not None
        # A negative limit is written \-N in mdoc.
        low = int(closed.group(2)) * (-1 if closed.group(1) else 1)
        high = int(closed.group(4)) * (-1 if closed.group(3) else 1)
        assert _accepts(opt, str(low)), f"--{opt.name} refuses {low}"
        assert not _accepts(opt, str(low - 1)), f"--{opt.name} accepts {low - 1}"
    assert _accepts(opt, str(high)), f"--{opt.name} refuses {high}"
    assert not _accepts(opt, str(high + 1)), f"--{opt.name} accepts {high + 1}"


# -- events ----------------------------------------------------------------------


def _callee(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _first_string(call: ast.Call) -> str | None:
    """The event name a call passes first: a string, or a member of core/names.py's EventName."""
    if not call.args:
        return None
    first = call.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    if (
        isinstance(first, ast.Attribute)
        and isinstance(first.value, ast.Name)
        and first.value.id == "EventName"
    ):
        return str(EventName[first.attr])
    return None


def _calls(path: Path) -> list[ast.Call]:
    tree = ast.parse(_read(path))
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


@cache
def _builders() -> frozenset[str]:
    """Functions of events.py whose first parameter is the event's name (`what`)."""
    tree = ast.parse(_read(SRC / "core" / "events.py"))
    return frozenset(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.args.args and node.args.args[0].arg == "what"
    )


@cache
def event_names() -> tuple[str, ...]:
    """Every event name events.py builds, and the names its callers give it."""
    names = {
        name
        for call in _calls(SRC / "core" / "events.py")
        if _callee(call) in ("Event", "of", "_service", "_about") and (name := _first_string(call))
    }
    for path in sorted(SRC.rglob("*.py")):
        names |= {
            name
            for call in _calls(path)
            if _callee(call) in _builders() and (name := _first_string(call))
        }
    return tuple(sorted(names))


@cache
def event_fields() -> tuple[str, ...]:
    """Every field name events.py writes, with the keywords its callers add.

    A name is the first of a (name, value) pair, or a string in a constant whose
    name ends in `_KEYS` (the hot builders' name lists).
    """
    fields: set[str] = set()
    for node in ast.walk(ast.parse(_read(SRC / "core" / "events.py"))):
        if (
            isinstance(node, ast.Tuple)
            and len(node.elts) == 2
            and isinstance(node.elts[0], ast.Constant)
            and isinstance(node.elts[0].value, str)
        ):
            fields.add(node.elts[0].value)
        if isinstance(node, ast.AnnAssign) and node.value is not None:
            targets: list[ast.expr] = [node.target]
            value = node.value
        elif isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id.endswith("_KEYS") for t in targets):
            fields.update(_strings(value))
    for path in sorted(SRC.rglob("*.py")):
        for call in _calls(path):
            if _callee(call) == "_service" or _callee(call) in _builders():
                fields |= {kw.arg for kw in call.keywords if kw.arg is not None}
    fields |= set(_statistics_keys())
    return tuple(sorted(fields))


def _function(path: Path, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    for node in ast.walk(ast.parse(_read(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{name}() not found in {path.name}")


def _strings(node: ast.AST) -> list[str]:
    return [
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]


def _server_counters() -> list[str]:
    """Server.statistics()'s dict keys, with the `cache_*` keys of _cache_statistics()."""
    keys: list[str] = []
    for ret in ast.walk(_function(SRC / "shell" / "server.py", "statistics")):
        if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Dict):
            keys += [
                k.value
                for k in ret.value.keys
                if isinstance(k, ast.Constant) and isinstance(k.value, str)
            ]
    assert keys, "Server.statistics() returning a dict literal not found in server.py"
    # {f"cache_{k}": ... for k in ("lookups", ...)}
    for comp in ast.walk(_function(SRC / "shell" / "server.py", "_cache_statistics")):
        if isinstance(comp, ast.DictComp) and isinstance(comp.key, ast.JoinedStr):
            prefix = "".join(_strings(comp.key))
            keys += [prefix + name for name in _strings(comp.generators[0].iter)]
            return keys
    raise AssertionError("the f-string keys of Server._cache_statistics() not found in server.py")


def _supervisor_counters() -> list[str]:
    """The keys the parent of --workers adds to the summed counters: `totals["..."] = ...`."""
    keys = [
        target.slice.value
        for node in ast.walk(_function(SRC / "process" / "workers.py", "collect_stats"))
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Subscript)
        and isinstance(target.slice, ast.Constant)
        and isinstance(target.slice.value, str)
    ]
    assert keys, "no totals[...] assignment found in Supervisor.collect_stats()"
    return keys


@cache
def _statistics_keys() -> tuple[str, ...]:
    """The counters of the stats event (and, but for the parent's, of the stop event)."""
    return tuple(dict.fromkeys(_server_counters() + _supervisor_counters()))


def test_every_event_name_is_built() -> None:
    # core/names.py's EventName is the vocabulary; events.py builds each of its members.
    assert set(event_names()) == {str(name) for name in EventName}


def test_the_event_extraction_finds_the_vocabulary() -> None:
    expected = {"early-talker", "hangup", "pass", "relay-end", "start", "stop", "stats"}
    assert expected <= set(event_names())
    assert {"client", "first", "bytes_to_client", "dropped_events"} <= set(event_fields())
    assert {"cache_lookups", "workers_answered", "worker_restarts"} <= set(_statistics_keys())
    assert {"worker", "pid", "status"} <= fields_by_event()["worker-exit"]
    assert {"version", "listen", "workers"} <= fields_by_event()["start"]


@pytest.mark.parametrize("name", event_names())
def test_event_is_described_in_the_manual(name: str) -> None:
    events = _section(_read(MAN8), "EVENTS")
    assert re.search(rf"^\.It Cm {re.escape(name)}(?:\s|$)", events, re.M), (
        f"event {name!r} has no `.It Cm {name}` entry in man/repeld.8 EVENTS"
    )


@pytest.mark.parametrize("name", NEWCOMER_EVENTS)
def test_newcomer_event_is_in_the_readme(name: str) -> None:
    assert name in event_names(), f"{name!r} is no longer an event: update NEWCOMER_EVENTS"
    assert name in _readme_event_rows(), f"event {name!r} has no row in README.md"


@pytest.mark.parametrize("field", event_fields())
def test_event_field_is_described(field: str) -> None:
    assert re.search(rf"\bVa {re.escape(field)}\b", _section(_read(MAN8), "EVENTS")), (
        f"event field {field!r} has no `.Va {field}` in man/repeld.8 EVENTS"
    )


#: The fields every connection event starts with, described once before the events.
CONNECTION_FIELDS = frozenset(
    {"event", "client", "client_port", "server", "server_port", "elapsed"}
)


def _sample_events() -> list[Event]:
    """One of each event events.py builds, to read its severity and its own fields from."""
    conn = ConnInfo("192.0.2.7", 50123, "198.51.100.25", 25)
    return [
        events.early_talker(
            conn, EarlyTalk(10, b"EHLO bot\r\n", 1.7), "drop", dns=DnsScore(1, ("bl.test",))
        ),
        events.penalized(conn, 0.002),
        events.hangup(conn, HangUp(3.0, reset=False)),
        events.passed(conn, Pass(PassReason.DELAY, 25.0), dns=DnsScore()),
        events.dnsbl(conn, Blocked(3, ("bl.test",), 0.05, DnsAction.REJECT)),
        events.backend_error(conn, 25.0, "127.0.0.1:10025", "Connection refused"),
        events.backend_check("127.0.0.1:10025", "cannot connect: Connection refused"),
        events.relay_end(conn, 30.0, 5.0, 1000, 200, RelayEnd.CLOSED),
        events.exec_end(conn, 30.0, 5.0, "/var/qmail/bin/qmail-smtpd", 0, ExecEnd.EXIT),
        events.internal_error(conn, 1.0, "oops"),
        events.overload(conn, "max-held", 3),
        events.dns_list_alarm("bl.test", 0.95, 200),
        events.proxy_error(
            ConnInfo("192.0.2.1", 40000, "198.51.100.25", 25, via="192.0.2.1"),
            5.0,
            "timeout",
            "no complete header within 5s (0 bytes of it)",
        ),
        events.lifecycle(EventName.START),
        events.lifecycle(EventName.STOP),
        events.reload([]),
        events.config_error("bad"),
        events.stats({}, 60.0),
        events.cache_notice(EventName.CACHE_ERROR, "down"),
        events.cache_notice(EventName.CACHE_RECOVER, "up"),
        events.worker(EventName.WORKER_START, 0, 4242),
        events.worker(EventName.WORKER_EXIT, 0, 4242, -9),
    ]


@cache
def fields_by_event() -> dict[str, frozenset[str]]:
    """Each event's own fields: its sample's, and the keywords its callers add.

    Not the connection fields, nor the counters of stats and stop (see
    `_statistics_keys`).
    """
    fields: dict[str, set[str]] = {}
    for event in _sample_events():
        fields.setdefault(event.name, set()).update(key for key, _ in event.fields)
    for path in sorted(SRC.rglob("*.py")):
        for call in _calls(path):
            if _callee(call) in _builders() and (name := _first_string(call)):
                fields.setdefault(name, set()).update(
                    kw.arg for kw in call.keywords if kw.arg is not None
                )
    return {name: frozenset(f - CONNECTION_FIELDS) for name, f in fields.items()}


def _severity(name: str) -> str:
    return next(e.severity.name.lower() for e in _sample_events() if e.name == name)


def _event_entries() -> dict[str, str]:
    """repeld(8) EVENTS entries by event name, each up to the next entry or the list's end."""
    entries: dict[str, str] = {}
    for chunk in re.split(r"\n(?=\.It Cm )", _section(_read(MAN8), "EVENTS")):
        if chunk.startswith(".It Cm "):
            entries[chunk.split()[2]] = chunk.split("\n.El", 1)[0]
    return entries


def _readme_event_rows() -> dict[str, list[str]]:
    """README.md events table rows by event name: | `name` | severity | fields | when |."""
    rows: dict[str, list[str]] = {}
    for line in _read(README).splitlines():
        match = re.match(r"\| `([a-z][a-z-]*)` \|", line)
        if match:
            rows[match.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


def test_every_event_has_a_sample() -> None:
    assert {e.name for e in _sample_events()} == set(event_names()), (
        "add a sample of each new event to _sample_events()"
    )


@pytest.mark.parametrize("name", event_names())
def test_event_entry_has_its_severity_and_fields(name: str) -> None:
    entry = _event_entries().get(name)
    assert entry is not None, f"event {name!r} has no `.It Cm {name}` entry in repeld(8) EVENTS"
    severity = _severity(name)
    assert entry.split("\n", 1)[0] == f".It Cm {name} Pq {severity}", (
        f"write the {name} entry's head as `.It Cm {name} Pq {severity}`"
    )
    missing = sorted(
        f for f in fields_by_event()[name] if not re.search(rf"\bVa {re.escape(f)}\b", entry)
    )
    assert not missing, f"the {name} entry in repeld(8) EVENTS does not describe {missing}"


@pytest.mark.parametrize("name", event_names())
def test_event_row_has_its_severity(name: str) -> None:
    row = _readme_event_rows().get(name)
    if row is None:
        return  # the README has rows for the events a newcomer meets; repeld(8) has all
    assert row[1] == _severity(name), f"README: {name} is {_severity(name)}, not {row[1]}"


@pytest.mark.parametrize("counter", _statistics_keys())
def test_stats_counter_is_described(counter: str) -> None:
    assert re.search(rf"\bVa {re.escape(counter)}\b", _event_entries()["stats"]), (
        f"counter {counter!r} is not described in the stats entry of repeld(8) EVENTS"
    )


@pytest.mark.parametrize("reason", [r.value for r in PassReason])
def test_pass_reason_is_described(reason: str) -> None:
    assert re.search(rf"\bCm {reason}\b", _event_entries()["pass"]), (
        f"reason {reason!r} is not in the pass entry of repeld(8) EVENTS"
    )
    assert re.search(rf"\b{reason}\b", _readme_event_rows()["pass"][2]), (
        f"reason {reason!r} is not in the README row of pass"
    )


# -- metrics and hand-off causes ------------------------------------------------


@cache
def _metric_entries() -> dict[str, str]:
    """repeld(8) METRICS entries by metric name (an entry may name several)."""
    entries: dict[str, str] = {}
    for chunk in re.split(r"\n(?=\.It Li )", _section(_read(MAN8), "METRICS")):
        if chunk.startswith(".It Li "):
            head = chunk.split("\n", 1)[0]
            for name in re.findall(r"\bLi (repeld_\w+)", head):
                entries[name] = chunk
    return entries


def _exposed() -> list[tuple[str, str, tuple[str, ...]]]:
    """(name as exposed, label, label values shown from the start) of every repeld family."""
    return [
        *((f"{f.name}_total", f.label, f.seed) for f in (*metrics.COUNTERS, *metrics.TOTALS)),
        *((f.name, f.label, f.seed) for f in (*metrics.GAUGES, *metrics.LABELLED_GAUGES)),
        *((f.name, f.label, f.seed) for f in metrics.HISTOGRAMS),
    ]


@pytest.mark.parametrize(("name", "label", "values"), _exposed(), ids=[e[0] for e in _exposed()])
def test_metric_is_described_with_its_label_values(
    name: str, label: str, values: tuple[str, ...]
) -> None:
    entry = _metric_entries().get(name)
    assert entry is not None, f"{name} has no entry in repeld(8) METRICS"
    if label:
        assert re.search(rf"Brq Li {label}\b", entry), f"{name}: label {label} not in its entry"
    # an entry may say "by the end of their exec-end event": the values are there
    where = entry + "".join(
        _event_entries().get(e, "") for e in re.findall(r"Cm ([\w-]+)\nevent", entry)
    )
    missing = [v for v in values if not re.search(rf"(?<![\w-]){re.escape(v)}(?![\w-])", where)]
    assert not missing, f"{name}: values {missing} not in its entry of repeld(8) METRICS"


@pytest.mark.parametrize("outcome", [o for o in HandOffResult if o is not HandOffResult.TAKEN])
def test_hand_off_cause_is_in_the_manual(outcome: HandOffResult) -> None:
    # the backend-error text an admin matches: "pass: CAUSE (DETAIL)"
    cause = postfixpass.describe(outcome).removeprefix("pass: ")
    description = _section(_read(MAN8), "DESCRIPTION")
    postfix = description.split(".Ss In front of Postfix\n", 1)[-1].split("\n.Ss ", 1)[0]
    assert postfix != description, "repeld(8) DESCRIPTION has no In front of Postfix"
    assert f".Dq {cause}" in postfix, f"cause {cause!r} is not in repeld(8) In front of Postfix"
    assert cause in " ".join(_read(README).split()), f"cause {cause!r} is not in the README"


# -- listeners and reloads -----------------------------------------------------


def _listener_flags() -> list[str]:
    """What parse_listen takes after ADDR:PORT, as written: `nodelay`, `backend=`."""
    flags: list[str] = []
    for node in ast.walk(_function(SRC / "config" / "values.py", "parse_listen")):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name):
            if node.left.id == "flag":
                flags += [s for c in node.comparators for s in _strings(c)]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "startswith"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "flag"
        ):
            flags += [s for a in node.args for s in _strings(a)]
    assert flags, "no `flag == ...` or `flag.startswith(...)` found in parse_listen()"
    return flags


def _key_entry(key: str) -> str:
    """The repeld.conf(5) KEYS entry of one key, joined into one line."""
    for chunk in re.split(r"\n(?=\.It Ic )", _section(_read(MAN5), "KEYS")):
        if chunk.split("\n", 1)[0] == f".It Ic {key}":
            return " ".join(chunk.split("\n"))
    raise AssertionError(f"key {key!r} has no entry in repeld.conf(5) KEYS")


@pytest.mark.parametrize("flag", _listener_flags())
def test_listener_flag_is_documented(flag: str) -> None:
    word = rf"\bCm {re.escape(flag.rstrip('='))}\b"
    man_head = _option_block("listen").split(" .", 1)[0]
    assert re.search(word, man_head), f"the --listen entry head of repeld(8) lacks ,{flag}"
    assert re.search(word, _section(_read(MAN8), "SYNOPSIS")), f"SYNOPSIS lacks ,{flag}"
    assert re.search(word, _key_entry("listen")), f"repeld.conf(5) listen lacks ,{flag}"
    assert f",{flag}" in _help_text(), f"`repeld --help` does not mention ,{flag}"


def _restart_only() -> list[str]:
    """The settings a SIGHUP cannot change: server._RESTART_ONLY, as flag names."""
    for node in ast.walk(ast.parse(_read(SRC / "shell" / "server.py"))):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_RESTART_ONLY" for t in node.targets
        ):
            return [name.replace("_", "-") for name in _strings(node.value)]
    raise AssertionError("_RESTART_ONLY not found in server.py")


@pytest.mark.parametrize("name", _restart_only())
def test_setting_that_needs_a_restart_is_named(name: str) -> None:
    signals = _section(_read(MAN8), "SIGNALS")
    match = re.search(r"^\.It Dv SIGHUP\n(.*?)(?=^\.It |\Z)", signals, re.M | re.S)
    assert match is not None, "no `.It Dv SIGHUP` entry in repeld(8) SIGNALS"
    assert re.search(_FLAG_MDOC.format(re.escape(name)), match.group(1)), (
        f"the SIGHUP entry of repeld(8) does not say that --{name} needs a restart"
    )


# -- the sample configuration --------------------------------------------------


def _sample_keys() -> list[str]:
    text = _read(SAMPLE)
    keys = set(tomllib.loads(text))
    keys |= set(re.findall(r"^#\s*([a-z][a-z0-9-]*)\s*=", text, re.M))
    return sorted(keys)


@pytest.mark.parametrize("key", _sample_keys())
def test_sample_key_is_documented(key: str) -> None:
    in_conf = re.search(rf"^\.It Ic {re.escape(key)}$", _read(MAN5), re.M)
    in_man = re.search(_FLAG_MDOC.format(re.escape(key)), _read(MAN8))
    assert in_conf or in_man, f"sample key {key!r} is in neither repeld.conf(5) nor repeld(8)"


# -- mandoc ----------------------------------------------------------------------

MAN_PAGES = sorted(p for p in MAN_DIR.iterdir() if re.fullmatch(r".+\.[0-9]", p.name))


def test_there_are_manual_pages() -> None:
    assert {MAN8, MAN5} <= set(MAN_PAGES)


@pytest.mark.skipif(shutil.which("mandoc") is None, reason="mandoc is not installed")
@pytest.mark.parametrize("page", MAN_PAGES, ids=lambda p: p.name)
def test_manual_page_is_lint_clean(page: Path) -> None:
    done = subprocess.run(
        ["mandoc", "-T", "lint", "-W", "warning", str(page)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff is not installed")
@pytest.mark.parametrize("page", MAN_PAGES, ids=lambda p: p.name)
def test_manual_page_renders_whole_with_groff(page: Path) -> None:
    # man(1) on Debian renders with groff, not mandoc: a reference with five
    # authors stopped groff 1.22.4 (Debian 12) and lost the rest of repeld(8).
    done = subprocess.run(
        ["groff", "-mandoc", "-Tutf8", str(page)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr.decode()) == (0, "")
    text = re.sub(r".\x08", "", done.stdout.decode())  # overstrike: bold, underline
    last = re.findall(r"^\.Sh (.+)$", page.read_text(), re.MULTILINE)[-1]
    assert re.search(rf"^{re.escape(last)}$", text, re.MULTILINE), f"no {last} section"

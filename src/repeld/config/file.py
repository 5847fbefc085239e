"""The configuration file: TOML, one key per long flag, under the command line.

Values from the file go through the same parsers as the flags (settings.OPTIONS),
so a key means exactly what its flag means. Flags the user typed override the
file; the file overrides the defaults. Every problem is collected and reported
on its own line with the file, the line number, the key and the bad value, so
`repeld --check-config` shows them all at once.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from repeld.cache.spec import CacheSpec
from repeld.config.errors import ConfigError, SettingError, shown
from repeld.config.reading import UnreadableFile, read_operator_file
from repeld.config.settings import OPTION_BY_NAME, Option, Settings, build_settings, load_trusted
from repeld.core.logformat import wire_format

__all__ = [
    "CLI_ONLY",
    "SETTINGS_ENV",
    "ConfigError",
    "default_config_path",
    "inherited_settings",
    "load_settings",
    "parse_config",
    "read_config",
    "render_settings",
    "settings_from_text",
]

#: Flags that make no sense as keys in the file.
CLI_ONLY = frozenset({"config", "check-config", "check-kernel", "check-backend", "version", "help"})


def default_config_path() -> str:
    """Where the configuration lives by default on this platform."""
    if sys.platform.startswith("freebsd"):
        return "/usr/local/etc/repeld.toml"
    return "/etc/repeld/repeld.toml"


def _line_of(text: str, key: str) -> int | None:
    # tomllib gives no positions; the key's own line is what the admin needs.
    pattern = re.compile(rf"""^\s*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')\s*=""")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return None


def _convert(opt: Option, value: Any) -> Any:
    """A TOML value for `opt`, through the flag's own parser."""
    if opt.parse is None:
        if not isinstance(value, bool):
            raise SettingError(opt.name, value, "expected true or false")
        return value
    items = value if isinstance(value, list) else [value]
    if not opt.repeat and isinstance(value, list):
        raise SettingError(opt.name, value, "expected a single value, not a list")
    parsed = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            raise SettingError(opt.name, item, "expected a string or a number")
        parsed.append(opt.parse(str(item)))
    return parsed if opt.repeat else parsed[0]


def read_config(path: str) -> dict[str, Any]:
    """Parsed values from the file at `path`, keyed by long flag name.

    Raises ConfigError listing every problem (unreadable file, bad TOML,
    unknown keys, bad values), each with the file and line.
    """
    try:
        text = read_operator_file(path)
    except UnreadableFile as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    return parse_config(text, path)


def parse_config(text: str, path: str) -> dict[str, Any]:
    """`read_config` of a text already read; `path` names it in the problems."""
    try:
        raw = tomllib.loads(text)
    except RecursionError:  # tomllib recurses on nested arrays and tables
        raise ConfigError([f"{path}: not valid TOML: nested too deeply"]) from None
    except Exception as exc:  # TOMLDecodeError, or whatever else tomllib meets
        raise ConfigError([f"{path}: not valid TOML: {exc or type(exc).__name__}"]) from None
    values: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in raw.items():
        line = _line_of(text, key)
        where = f"{path}:{line}" if line else path
        opt = OPTION_BY_NAME.get(key)
        if opt is None or key in CLI_ONLY:
            hint = ""
            if key.replace("_", "-") in OPTION_BY_NAME:
                hint = f" (did you mean {key.replace('_', '-')!r}?)"
            problems.append(f"{where}: unknown key {key!r}{hint}")
            continue
        try:
            values[key] = _convert(opt, value)
        except SettingError as exc:
            problems.append(f"{where}: {key}: invalid value {shown(exc.value)}: {exc.reason}")
        except Exception as exc:  # a parser's bug must not take the daemon down
            problems.append(f"{where}: {key}: invalid value: {type(exc).__name__}: {exc}")
    if problems:
        raise ConfigError(problems)
    return values


def load_settings(
    flags: Mapping[str, Any], config_path: str | None, *, explicit: bool = False
) -> Settings:
    """Defaults, under the file at `config_path`, under the flags the user typed.

    A missing default file is fine (flags only); a missing file the user named
    is an error. Trusted-network files are read too, so a bad one is reported
    here rather than at the first connection.
    """
    values: dict[str, Any] = {}
    if config_path is not None and (explicit or Path(config_path).exists()):
        values.update(read_config(config_path))
    values.update(flags)
    try:
        return _checked(values)
    except SettingError as exc:
        origin = "command line" if exc.option in flags else (config_path or "command line")
        if exc.option == "backend" and exc.value is None:
            raise ConfigError(
                [f"backend is required: set it in {config_path} or with --backend"]
            ) from None
        raise ConfigError([f"{origin}: {exc}"]) from None


def _checked(values: Mapping[str, Any]) -> Settings:
    """Settings from parsed values, with what only they tell checked too: the
    trusted-network files read, the cache's needs met (SettingError if not)."""
    settings = build_settings(values)
    load_trusted(settings)
    _check_cache(settings)
    return settings


def settings_from_text(text: str, origin: str) -> Settings:
    """The settings that `render_settings` printed: they read back the same
    (the flags are in the text already, the trusted networks inline); raises
    ConfigError naming `origin`."""
    try:
        return _checked(parse_config(text, origin))
    except SettingError as exc:
        raise ConfigError([f"{origin}: {exc}"]) from None


#: Set by a --workers parent for each worker: a descriptor on the settings it
#: starts with, as `render_settings` prints them.
SETTINGS_ENV = "REPELD_SETTINGS_FD"


def inherited_settings(env: dict[str, str] | None = None) -> Settings | None:
    """In a --workers worker: the settings its parent gave it (None if it gave
    none; process/workers.py says why).

    Raises ConfigError when this repeld cannot read them: another version of
    repeld than the parent's, upgraded under it, which a restart ends."""
    environ = os.environ if env is None else env
    spec = environ.pop(SETTINGS_ENV, None)
    if spec is None:
        return None
    fd = int(spec)
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    try:
        return settings_from_text(b"".join(chunks).decode("utf-8"), "settings")
    except ConfigError as exc:  # the parent read them back itself (workers.handover)
        why = "a worker cannot take its parent's settings (after an upgrade, restart repeld)"
        raise ConfigError([f"{why}: {problem}" for problem in exc.problems]) from None


def _check_cache(settings: Settings) -> None:
    """What the cache needs from outside: the Redis client library and its password."""
    spec = settings.cache_spec()
    if spec.kind != "redis":
        return
    try:
        import redis  # noqa: F401  (only to know it is there)
    except ImportError:
        raise SettingError(
            "cache", str(spec), "needs the redis package: pip install 'repeld[redis]'"
        ) from None
    spec.read_password()  # SettingError for an unreadable or empty password file


def render_settings(settings: Settings, *, reveal: bool = False) -> str:
    """The effective settings as TOML, the way --check-config prints them, which
    read back as the same settings; a password as *** unless `reveal`."""
    lines = []
    for name, opt in OPTION_BY_NAME.items():
        value = getattr(settings, name.replace("-", "_"))
        if opt.repeat:
            lines.append(f"{name} = [{', '.join(_toml(str(v)) for v in value)}]")
        elif value is None:
            derived = name in ("backlog", "max-held", "cache")
            lines.append(f"# {name}: " + ("derived at start" if derived else "not set"))
        elif isinstance(value, bool):
            lines.append(f"{name} = {'true' if value else 'false'}")
        elif isinstance(value, float) and "e" in repr(value):
            # A TOML float is read through str() again (1e-05), which the flags'
            # parsers refuse: a string of its digits.
            lines.append(f"{name} = {_toml(format(Decimal(repr(value)), 'f'))}")
        elif isinstance(value, int | float):
            lines.append(f"{name} = {value!r}")
        elif isinstance(value, CacheSpec):
            lines.append(f"{name} = {_toml(value.url(reveal=reveal))}")
        elif name == "exec":  # a tuple of words: the command line that parses back to them
            lines.append(f"{name} = {_toml(shlex.join(value))}")
        else:
            lines.append(f"{name} = {_toml(str(value))}")
        if name == "log-format" and value == "auto":
            kind = settings.syslog.kind
            where = "a local socket" if kind == "unix" else kind.upper()
            lines[-1] += f"  # {wire_format(value, kind)} on {where}"
    return "\n".join(lines) + "\n"


#: What a TOML basic string cannot hold as itself: the quote, the backslash and
#: the control characters (a tab may stay, but is escaped too).
_TOML_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f]')


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    return "\\" + char if char in '"\\' else f"\\u{ord(char):04x}"


def _toml(text: str) -> str:
    return '"' + _TOML_ESCAPE.sub(_escaped, text) + '"'

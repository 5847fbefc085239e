"""The `--cache` value: which pass cache, where, and with what credentials.

Parsing only (no I/O but reading a password file on request), so the option
parsers in config/ can use it without loading any cache backend.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from repeld.config.errors import SettingError
from repeld.core.addresses import V6_PREFIX_MAX, V6_PREFIX_MIN, bracket, host_name_problem

__all__ = [
    "CacheKind",
    "CacheSpec",
    "default_cache_path",
    "parse_cache_url",
    "parse_v6_prefix",
]

CacheKind = Literal["none", "memory", "sqlite", "redis"]


def default_cache_path() -> str:
    """Where the SQLite cache lives unless told: the platform's state directory."""
    if sys.platform.startswith("freebsd"):
        return "/var/db/repeld/cache.sqlite"
    return "/var/lib/repeld/cache.sqlite"


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """A parsed `--cache` value. `str()` never shows a password."""

    kind: CacheKind
    path: str = ""  # sqlite
    host: str = ""  # redis
    port: int = 6379
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None
    password_file: str | None = None

    def __repr__(self) -> str:
        return f"CacheSpec({self!s})"

    def __str__(self) -> str:
        if self.kind in ("none", "memory"):
            return self.kind
        if self.kind == "sqlite":
            return f"sqlite:{self.path}"
        auth = ""
        if self.username is not None or self.password is not None:
            user = quote(self.username or "", safe="")
            auth = f"{user}:***@" if self.password is not None else f"{user}@"
        host = bracket(self.host)
        query = f"?password_file={self.password_file}" if self.password_file else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}{host}:{self.port}/{self.db}{query}"

    def url(self, *, reveal: bool = False) -> str:
        """The value that `parse_cache_url` reads back as this one, every
        character quoted; the password as *** unless `reveal` (what the
        --workers parent gives its workers, through no path)."""
        if self.kind in ("none", "memory"):
            return self.kind
        if self.kind == "sqlite":
            return f"sqlite://{self.path}"  # sqlite:///x, and sqlite:////x for //x
        auth = ""
        if self.username is not None or self.password is not None:
            auth = quote(self.username or "", safe="")
            if self.password is not None:
                auth += ":" + (quote(self.password, safe="") if reveal else "***")
            auth += "@"
        query = f"?password_file={quote(self.password_file)}" if self.password_file else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}{bracket(self.host)}:{self.port}/{self.db}{query}"

    def read_password(self) -> str | None:
        """The Redis password: from the URL, or the first line of `password_file`.

        Raises SettingError("cache", ...) if the file cannot be read or is empty.
        """
        if self.password_file is None:
            return self.password
        try:
            with open(self.password_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SettingError(
                "cache", str(self), f"cannot read password file {self.password_file}: {reason}"
            ) from None
        if not lines or not lines[0]:
            raise SettingError("cache", str(self), f"password file {self.password_file} is empty")
        return lines[0]


def _cache_error(text: str, reason: str) -> SettingError:
    return SettingError("cache", _redact(text), reason)


def _redact(text: str) -> str:
    """`text` with the password of a URL replaced by ***, for error messages."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    authority, slash, tail = rest.partition("/")
    userinfo, at, hostport = authority.rpartition("@")
    if not at or ":" not in userinfo:
        return text
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostport}{slash}{tail}"


def parse_cache_url(text: str) -> CacheSpec:
    """`--cache`: where passed (and penalised) clients are remembered.

    * `none` -- no cache;
    * `memory` -- this process only, lost on restart;
    * `sqlite` (the default path), `sqlite:/ABS/PATH` or `sqlite:///ABS/PATH` --
      one host, survives restarts, shared by repeld processes on the host;
    * `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?password_file=/ABS/PATH]`,
      `rediss://...` for TLS -- shared by several MX hosts. Prefer
      `password_file` (its first line is the password) over a password in the
      URL, which `ps` shows to every local user. IPv6 hosts go in brackets.

    Raises SettingError("cache", text, reason); a password never appears in it.
    """
    text = text.strip()
    if text in ("none", "memory"):
        return CacheSpec(text)  # type: ignore[arg-type]
    if text == "sqlite":
        return CacheSpec("sqlite", path=default_cache_path())
    if text.startswith("sqlite:"):
        path = text[len("sqlite:") :]
        if path.startswith("//"):
            path = path[2:]
            if not path.startswith("/"):
                raise _cache_error(text, "sqlite:// takes no host: write sqlite:/ABS/PATH")
        if not path:
            raise _cache_error(text, "expected sqlite:/ABS/PATH")
        if not path.startswith("/"):
            raise _cache_error(text, "the SQLite path must be absolute")
        if path.endswith("/"):
            raise _cache_error(text, "the SQLite path names a directory, not a file")
        return CacheSpec("sqlite", path=path)
    if text.startswith(("redis://", "rediss://")):
        return _parse_redis(text)
    raise _cache_error(
        text, "expected none, memory, sqlite:/PATH, redis://HOST[:PORT][/DB] or rediss://..."
    )


def _parse_redis(text: str) -> CacheSpec:
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError as exc:
        raise _cache_error(text, f"not a valid URL ({exc})") from None
    host = url.hostname or ""
    if not host:
        raise _cache_error(text, "the Redis host is missing")
    problem = host_name_problem(host)
    if problem is not None:
        raise _cache_error(text, problem)
    if port is None:
        port = 6379
    if not 1 <= port <= 65535:
        raise _cache_error(text, "port must be 1-65535")
    if url.fragment:
        raise _cache_error(text, "a fragment (#...) means nothing here")
    db_text = url.path.lstrip("/")
    if url.path.count("/") > 1:
        raise _cache_error(text, "expected /DB, a database number")
    try:
        db = int(db_text, 10) if db_text else 0
    except ValueError:
        raise _cache_error(text, f"database {db_text!r} is not a number") from None
    if db < 0:
        raise _cache_error(text, "the database number must not be negative")
    password_file: str | None = None
    for name, value in parse_qsl(url.query, keep_blank_values=True, strict_parsing=False):
        if name != "password_file":
            raise _cache_error(text, f"unknown parameter {name!r} (known: password_file)")
        if password_file is not None:
            raise _cache_error(text, "password_file given twice")
        if not value.startswith("/"):
            raise _cache_error(text, "password_file must be an absolute path")
        password_file = value
    username = unquote(url.username) if url.username else None
    password = unquote(url.password) if url.password else None
    if password is not None and password_file is not None:
        raise _cache_error(text, "give the password in the URL or in password_file, not both")
    return CacheSpec(
        "redis",
        host=host,
        port=port,
        db=db,
        tls=url.scheme == "rediss",
        username=username,
        password=password,
        password_file=password_file,
    )


def parse_v6_prefix(text: str) -> int:
    """`--cache-v6-prefix`: bits of an IPv6 address that identify a client (32-128)."""
    digits = text.strip().lstrip("/")
    if not re.fullmatch(r"[0-9]+", digits):
        raise SettingError("cache-v6-prefix", text, "expected a prefix length in bits")
    value = int(digits, 10)
    if not V6_PREFIX_MIN <= value <= V6_PREFIX_MAX:
        raise SettingError(
            "cache-v6-prefix", text, f"must be {V6_PREFIX_MIN}-{V6_PREFIX_MAX} (64 is one host)"
        )
    return value

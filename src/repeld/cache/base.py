"""The pass cache: clients that waited once skip the delay for a while.

A client that stayed silent through the whole delay and was passed is
remembered as GOOD for the pass TTL (`--cache-ttl`, default one day); while it
is remembered, its connections are passed at once (reason `cache`). With a
penalty TTL (`--penalty-ttl`, off by default) an early talker is remembered as
BAD and cut off at once after accept. Early talkers and hang-ups are never
remembered as good.

This module holds the parts every backend shares and that do no I/O:

* `cache_key` -- the key a client is remembered under: the address for IPv4
  (IPv4-mapped IPv6 counts as IPv4), the `/v6_prefix` network for IPv6,
  because one IPv6 host owns a whole /64 and walks through it at will;
* `CacheVerdict` -- GOOD, BAD or UNKNOWN (not remembered, expired, or the
  backend did not answer in time: the delay applies, which is always safe);
* `PassCache` -- the protocol the policy step and the CLI program against;
* `MemoryCache` -- a dict with TTLs on an injectable clock (`--cache memory`,
  and the reference the tests drive with trio's autojump clock);
* `parse_cache_url` / `CacheSpec` / `make_cache` -- the `--cache` value.

Backends live in cache_sqlite.py (one host, the default) and cache_redis.py
(several MX hosts share one cache); they are imported only when chosen.

Rules every backend keeps:

* `lookup` is the only awaited call on a connection's path and is bounded: a
  backend that is slow or down answers UNKNOWN, never an exception.
* `remember_good` / `remember_bad` never block: they queue the write and the
  background task `run` applies it in batches.
* The last verdict wins: a pass clears a penalty and a penalty replaces a
  pass. With penalties off, `remember_bad` still forgets any pass recorded for
  that key, so an early talker is never left marked good.
* Trouble is reported through `on_error(message)` once per outage and
  `on_recover(message)` once when it ends, from the trio thread; the lead turns
  these into events. The callbacks must not raise.
* Time: MemoryCache expires entries on a monotonic clock (default
  `trio.current_time`); SQLite and Redis keep wall-clock expiries (Unix epoch
  seconds, Redis: native key expiry), because monotonic time does not survive a
  restart and is not shared between hosts. Their wall clock is injectable too.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal, Protocol
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import trio

if TYPE_CHECKING:
    from repeld.config.settings import SettingError

__all__ = [
    "DEFAULT_PASS_TTL",
    "DEFAULT_V6_PREFIX",
    "V6_PREFIX_MAX",
    "V6_PREFIX_MIN",
    "CacheError",
    "CacheSpec",
    "CacheStats",
    "CacheVerdict",
    "Callback",
    "MemoryCache",
    "OutageNotice",
    "PassCache",
    "PendingWrites",
    "QueuedVerdicts",
    "Write",
    "cache_key",
    "default_cache_path",
    "default_cache_url",
    "make_cache",
    "parse_cache_url",
    "parse_v6_prefix",
]

#: How long a passed client is remembered by default: one day.
DEFAULT_PASS_TTL = 86400.0
#: The IPv6 prefix a client is remembered by: a /64 is one host (or one LAN).
DEFAULT_V6_PREFIX = 64
#: A shorter prefix would let one patient client vouch for a whole provider.
V6_PREFIX_MIN = 32
V6_PREFIX_MAX = 128

Callback = Callable[[str], None]


def _ignore(message: str) -> None:
    """The default error/recover callback: drop the message."""


class CacheError(OSError):
    """A cache backend could not be opened at start (e.g. an unwritable SQLite path).

    An OSError so that the daemon's start-up error path reports it as one line.
    Once running, backends never raise this: they report through `on_error`.
    """


class CacheVerdict(enum.Enum):
    """What the cache knows of a client; the values are what cache_sqlite stores."""

    UNKNOWN = 0
    GOOD = 1
    BAD = 2


# -- keys ------------------------------------------------------------------------


def _check_prefix(v6_prefix: int) -> None:
    if (
        isinstance(v6_prefix, bool)
        or not isinstance(v6_prefix, int)
        or not V6_PREFIX_MIN <= v6_prefix <= V6_PREFIX_MAX
    ):
        raise ValueError(
            f"IPv6 cache prefix must be an integer {V6_PREFIX_MIN}-{V6_PREFIX_MAX},"
            f" got {v6_prefix!r}"
        )


def cache_key(address: str, v6_prefix: int = DEFAULT_V6_PREFIX) -> str:
    """The key `address` is remembered under.

    IPv4: the address (`192.0.2.7`); `::ffff:192.0.2.7` is the same client.
    IPv6: the network of `v6_prefix` bits in CIDR form (`2001:db8:1:2::/64`), so
    the two families can never collide. A scope id (`fe80::1%eth0`) is dropped.
    Raises ValueError for a bad address or a prefix outside 32-128.
    """
    _check_prefix(v6_prefix)
    if ":" not in address:  # the common case, checked cheaply: a plain IPv4 address
        try:
            return socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, address))
        except OSError:
            raise ValueError(f"{address!r} is not an IP address") from None
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, v6_prefix), strict=False))


def parse_v6_prefix(text: str) -> int:
    """`--cache-v6-prefix`: bits of an IPv6 address that identify a client (32-128)."""
    from repeld.config.settings import SettingError

    digits = text.strip().lstrip("/")
    if not re.fullmatch(r"[0-9]+", digits):
        raise SettingError("cache-v6-prefix", text, "expected a prefix length in bits")
    value = int(digits, 10)
    if not V6_PREFIX_MIN <= value <= V6_PREFIX_MAX:
        raise SettingError(
            "cache-v6-prefix", text, f"must be {V6_PREFIX_MIN}-{V6_PREFIX_MAX} (64 is one host)"
        )
    return value


# -- shared machinery ------------------------------------------------------------


@dataclass(slots=True)
class CacheStats:
    """Counters every backend keeps; `statistics()` returns them as a dict.

    lookups: all lookups; good/bad/unknown: their answers (unknown includes
    misses, timeouts and errors); timeouts: lookups cut off by the lookup
    timeout; errors: failed backend operations; outages: error callbacks sent;
    writes: verdicts queued; written: verdicts the backend accepted; dropped:
    verdicts lost (queue full, closed, or failed at shutdown); swept: expired
    entries removed; pending: verdicts queued or in flight right now.
    """

    lookups: int = 0
    good: int = 0
    bad: int = 0
    unknown: int = 0
    timeouts: int = 0
    errors: int = 0
    outages: int = 0
    writes: int = 0
    written: int = 0
    dropped: int = 0
    swept: int = 0
    pending: int = 0

    def count(self, verdict: CacheVerdict) -> CacheVerdict:
        """Count one lookup answer and return it."""
        self.lookups += 1
        if verdict is CacheVerdict.GOOD:
            self.good += 1
        elif verdict is CacheVerdict.BAD:
            self.bad += 1
        else:
            self.unknown += 1
        return verdict

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class OutageNotice:
    """One `on_error` per outage and one `on_recover` when it ends.

    Backends call `failed` on every failure and `ok` on every success; only the
    transitions reach the callbacks. The state starts healthy, so a backend that
    is down at start is reported by its first failure.
    """

    __slots__ = ("_clock", "_on_error", "_on_recover", "down_since", "outages", "up")

    def __init__(
        self,
        on_error: Callback | None = None,
        on_recover: Callback | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self._on_error = on_error or _ignore
        self._on_recover = on_recover or _ignore
        self._clock = clock
        self.up = True
        self.outages = 0
        self.down_since = 0.0

    def failed(self, message: str) -> bool:
        """Record a failure; True when this started an outage (and was reported)."""
        if not self.up:
            return False
        self.up = False
        self.outages += 1
        self.down_since = self._clock()
        self._on_error(message)
        return True

    def ok(self, message: str) -> bool:
        """Record a success; True when this ended an outage (and was reported).

        The message reaches `on_recover` with how long the outage lasted appended.
        """
        if self.up:
            return False
        self.up = True
        duration = max(0.0, self._clock() - self.down_since)
        self._on_recover(f"{message} (after {duration:.1f}s)")
        return True


#: A queued write: the verdict (UNKNOWN means "forget the key") and its expiry.
Write = tuple[CacheVerdict, float]


class QueuedVerdicts:
    """remember_good/remember_bad for a backend that writes in batches from `run`.

    The backend provides `pass_ttl`, `penalty_ttl`, `_closed`, `_pending` (a
    PendingWrites), `_stats` and `_wallclock`; verdicts carry wall-clock expiries.
    """

    pass_ttl: float
    penalty_ttl: float | None
    _closed: bool
    _pending: PendingWrites
    _stats: CacheStats
    _wallclock: Callable[[], float]

    def _queue(self, key: str, verdict: CacheVerdict, ttl: float) -> None:
        if self._closed or not self._pending.put(key, verdict, self._wallclock() + ttl):
            self._stats.dropped += 1
            return
        self._stats.writes += 1

    def remember_good(self, key: str) -> None:
        """Queue a pass for `key`; never blocks."""
        self._queue(key, CacheVerdict.GOOD, self.pass_ttl)

    def remember_bad(self, key: str) -> None:
        """Queue a penalty for `key`, or with penalties off forget its pass; never blocks."""
        if self.penalty_ttl is not None:
            self._queue(key, CacheVerdict.BAD, self.penalty_ttl)
        else:  # forget any pass: an early talker is never left marked good
            self._queue(key, CacheVerdict.UNKNOWN, self.pass_ttl)


class PendingWrites:
    """Verdicts waiting for a backend's writer, coalesced per key.

    `queued` fills from `put`; the writer `take`s it as one batch, which stays
    visible to lookups (`get`) as `inflight` until `done` or `failed`; a failed
    batch goes back under anything queued since (newer verdicts win). The queue
    is bounded: beyond `limit` keys a new key is dropped (a lost pass only means
    one more delay, a lost penalty one more hold).
    """

    __slots__ = ("batch_size", "inflight", "limit", "queued", "wake")

    def __init__(self, limit: int = 100_000, batch_size: int = 256) -> None:
        if limit < 1 or batch_size < 1:
            raise ValueError("limit and batch_size must be positive")
        self.limit = limit
        self.batch_size = batch_size
        self.queued: dict[str, Write] = {}
        self.inflight: dict[str, Write] = {}
        self.wake = trio.Event()

    def __len__(self) -> int:
        return len(self.queued) + len(self.inflight)

    def put(self, key: str, verdict: CacheVerdict, expires: float) -> bool:
        """Queue a verdict; False if it was dropped because the queue is full."""
        if key not in self.queued and len(self.queued) >= self.limit:
            return False
        self.queued[key] = (verdict, expires)
        if len(self.queued) >= self.batch_size:
            self.wake.set()
        return True

    def get(self, key: str, now: float) -> CacheVerdict | None:
        """The newest not yet stored verdict for `key`, or None to ask the backend."""
        write = self.queued.get(key) or self.inflight.get(key)
        if write is None:
            return None
        verdict, expires = write
        return verdict if expires > now else CacheVerdict.UNKNOWN

    async def wait(self, interval: float) -> None:
        """Sleep `interval`, or less if a full batch is queued."""
        if len(self.queued) < self.batch_size:
            with trio.move_on_after(interval):
                await self.wake.wait()
        else:
            await trio.lowlevel.checkpoint()
        if self.wake.is_set():
            self.wake = trio.Event()

    def take(self) -> dict[str, Write]:
        """Move everything queued in flight and return it (empty if nothing is)."""
        if self.inflight:
            raise RuntimeError("a batch is already in flight")
        self.inflight, self.queued = self.queued, {}
        return self.inflight

    def done(self) -> None:
        self.inflight = {}

    def failed(self) -> int:
        """Put the batch in flight back; returns how many keys were dropped for room."""
        merged = self.inflight
        merged.update(self.queued)
        self.inflight = {}
        dropped = 0
        while len(merged) > self.limit:
            del merged[next(iter(merged))]  # the oldest writes go first
            dropped += 1
        self.queued = merged
        return dropped


# -- the protocol ----------------------------------------------------------------


class PassCache(Protocol):
    """What the policy step and the CLI need of a pass cache."""

    async def lookup(self, key: str) -> CacheVerdict:
        """GOOD, BAD or UNKNOWN for `key` (from `cache_key`); bounded, never raises."""
        ...

    async def lookup_many(self, keys: Sequence[str]) -> list[CacheVerdict]:
        """`lookup` for many keys in one trip to the backend, in order; bounded, never raises."""
        ...

    def remember_good(self, key: str) -> None:
        """A client that waited the whole delay; queued, never blocks."""
        ...

    def remember_bad(self, key: str) -> None:
        """An early talker: a penalty if penalties are on, else forget any pass."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The background task (writer, sweeper, reconnects); start it with `nursery.start`.

        It calls `task_status.started()` once the backend is usable; an error
        before that (CacheError) means the cache cannot work at all.
        """
        ...

    async def aclose(self) -> None:
        """Write what is queued (bounded, shielded) and release the backend."""
        ...

    def statistics(self) -> dict[str, int]:
        """Counters for the status report (see `CacheStats`)."""
        ...


# -- in memory -------------------------------------------------------------------


class MemoryCache:
    """A pass cache in a dict: per process, lost at exit; `--cache memory`.

    Expiries are on `clock` (default `trio.current_time`, so tests run it under
    the autojump clock). Beyond `max_entries` the oldest written entry goes.
    """

    def __init__(
        self,
        *,
        pass_ttl: float = DEFAULT_PASS_TTL,
        penalty_ttl: float | None = None,
        clock: Callable[[], float] = trio.current_time,
        sweep_interval: float = 60.0,
        max_entries: int = 1_000_000,
    ) -> None:
        if pass_ttl <= 0 or (penalty_ttl is not None and penalty_ttl <= 0):
            raise ValueError("TTLs must be positive")
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.pass_ttl = pass_ttl
        self.penalty_ttl = penalty_ttl
        self.sweep_interval = sweep_interval
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, tuple[CacheVerdict, float]] = {}
        self._stats = CacheStats()
        self._closed = False

    def __len__(self) -> int:
        return len(self._entries)

    async def lookup(self, key: str) -> CacheVerdict:
        await trio.lowlevel.checkpoint()
        return self._lookup_now(key, self._clock())

    async def lookup_many(self, keys: Sequence[str]) -> list[CacheVerdict]:
        await trio.lowlevel.checkpoint()
        now = self._clock()
        return [self._lookup_now(key, now) for key in keys]

    def _lookup_now(self, key: str, now: float) -> CacheVerdict:
        entry = self._entries.get(key)
        if entry is None:
            return self._stats.count(CacheVerdict.UNKNOWN)
        verdict, expires = entry
        if expires <= now:
            del self._entries[key]
            self._stats.swept += 1
            return self._stats.count(CacheVerdict.UNKNOWN)
        return self._stats.count(verdict)

    def _put(self, key: str, verdict: CacheVerdict, ttl: float) -> None:
        if self._closed:
            self._stats.dropped += 1
            return
        self._stats.writes += 1
        self._entries.pop(key, None)  # re-inserted last: eviction order is write order
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
            self._stats.dropped += 1
        self._entries[key] = (verdict, self._clock() + ttl)
        self._stats.written += 1

    def remember_good(self, key: str) -> None:
        self._put(key, CacheVerdict.GOOD, self.pass_ttl)

    def remember_bad(self, key: str) -> None:
        if self.penalty_ttl is not None:
            self._put(key, CacheVerdict.BAD, self.penalty_ttl)
            return
        self._stats.writes += 1
        if self._entries.pop(key, None) is not None:
            self._stats.written += 1

    def sweep(self) -> int:
        """Remove expired entries now; how many went."""
        now = self._clock()
        expired = [key for key, (_, expires) in self._entries.items() if expires <= now]
        for key in expired:
            del self._entries[key]
        self._stats.swept += len(expired)
        return len(expired)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await trio.sleep(self.sweep_interval)
            self.sweep()

    async def aclose(self) -> None:
        self._closed = True
        self._entries.clear()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> dict[str, int]:
        stats = self._stats.as_dict()
        stats["entries"] = len(self._entries)
        return stats


# -- the --cache value -----------------------------------------------------------

CacheKind = Literal["none", "memory", "sqlite", "redis"]


def default_cache_path() -> str:
    """Where the SQLite cache lives unless told: the platform's state directory."""
    if sys.platform.startswith("freebsd"):
        return "/var/db/repeld/cache.sqlite"
    return "/var/lib/repeld/cache.sqlite"


def default_cache_url() -> str:
    """The default `--cache`: SQLite at `default_cache_path()`."""
    return "sqlite:" + default_cache_path()


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
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = f"?password_file={self.password_file}" if self.password_file else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}{host}:{self.port}/{self.db}{query}"

    def read_password(self) -> str | None:
        """The Redis password: from the URL, or the first line of `password_file`.

        Raises SettingError("cache", ...) if the file cannot be read or is empty.
        """
        if self.password_file is None:
            return self.password
        from repeld.config.settings import SettingError

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
    # Imported here: settings.py is expected to import this module for its parsers.
    from repeld.config.settings import SettingError

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


def make_cache(
    spec: CacheSpec,
    *,
    pass_ttl: float = DEFAULT_PASS_TTL,
    penalty_ttl: float | None = None,
    on_error: Callback | None = None,
    on_recover: Callback | None = None,
) -> PassCache | None:
    """The backend `spec` names, not yet running (None for `none`).

    Reads a Redis password file (SettingError if it cannot); opens nothing else:
    start the result with `await nursery.start(cache.run)`.
    """
    if spec.kind == "none":
        return None
    if spec.kind == "memory":
        return MemoryCache(pass_ttl=pass_ttl, penalty_ttl=penalty_ttl)
    if spec.kind == "sqlite":
        from repeld.cache.sqlite import SqliteCache

        return SqliteCache(
            spec.path,
            pass_ttl=pass_ttl,
            penalty_ttl=penalty_ttl,
            on_error=on_error,
            on_recover=on_recover,
        )
    from repeld.cache.redis import RedisCache

    return RedisCache.from_spec(
        spec,
        pass_ttl=pass_ttl,
        penalty_ttl=penalty_ttl,
        on_error=on_error,
        on_recover=on_recover,
    )

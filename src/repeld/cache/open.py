"""Build the pass cache a `--cache` value names, importing only that backend."""

from __future__ import annotations

from repeld.cache.base import DEFAULT_PASS_TTL, Callback, PassCache
from repeld.cache.memory import MemoryCache
from repeld.cache.spec import CacheSpec

__all__ = ["make_cache"]


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

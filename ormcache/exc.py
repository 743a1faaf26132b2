"""Exceptions raised by ormcache.

Every error ormcache raises derives from :class:`OrmCacheError`::

    OrmCacheError
    ├── ConfigurationError      bad settings: names the region and the key
    │   └── UnknownRegionError  a region name that was never declared
    ├── CacheKeyError           a statement that cannot be given a cache key
    └── BackendError            an explicit invalidation the backend refused

Backend failures (a Redis server that is down, a memcached item that is too
big) are never raised into queries or database writes: reads fall back to
the database and writes go on; they are logged on the ``ormcache`` logger.
Only an explicit call such as ``OrmCache.invalidate()`` raises
:class:`BackendError`, since its caller must know it did not happen.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "BackendError",
    "CacheKeyError",
    "ConfigurationError",
    "OrmCacheError",
    "UnknownRegionError",
]


class OrmCacheError(Exception):
    """Base class of every ormcache error."""


class ConfigurationError(OrmCacheError, ValueError):
    """Settings that cannot be used.

    ``region`` and ``key`` name what is at fault when known.
    """

    def __init__(
        self, message: str, *, region: str | None = None, key: str | None = None
    ) -> None:
        where = []
        if region is not None:
            where.append(f"region {region!r}")
        if key is not None:
            where.append(f"setting {key!r}")
        if where:
            message = f"{', '.join(where)}: {message}"
        super().__init__(message)
        self.region = region
        self.key = key


class UnknownRegionError(ConfigurationError, KeyError):
    """A region name that the settings do not declare."""

    def __init__(self, name: str, declared: Iterable[str]) -> None:
        declared = sorted(declared)
        listing = ", ".join(repr(d) for d in declared) or "none"
        super().__init__(
            f"no cache region named {name!r} is declared; "
            f"declared regions: {listing}"
        )
        self.name = name
        self.declared = declared

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class CacheKeyError(OrmCacheError):
    """A statement for which no cache key can be derived."""


class BackendError(OrmCacheError):
    """A cache backend failed an operation the caller asked for
    explicitly; the driver's error is the ``__cause__``."""

    def __init__(self, region: str, operation: str) -> None:
        super().__init__(
            f"cache region {region!r}: the backend failed to {operation}; "
            "see the logged error, and retry once the backend is reachable"
        )
        self.region = region
        self.operation = operation

"""Backend access for ormcache: one round trip per read, and ``add``.

Everything goes through dogpile's region (its serialization, key format and
backends) except ``add`` (store only if absent), which dogpile does not
offer: it is done here with the backend's own client for the backends that
can (memory, memory_pickle, dbm, Redis family, pylibmc and other
memcached clients), and reported as unsupported for the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from dogpile.cache.api import NO_VALUE
from dogpile.cache.region import CacheRegion

log = logging.getLogger("ormcache")

__all__ = ["Store"]


class Store:
    """The ormcache view of one dogpile region."""

    __slots__ = ("region", "name", "in_process", "_add", "_last_warning")

    def __init__(self, name: str, region: CacheRegion) -> None:
        self.name = name
        self.region = region
        #: values are kept as Python objects in this process (dogpile's
        #: memory backend): what is stored must never be mutated
        self.in_process = (
            type(region.backend).__module__ == "dogpile.cache.backends.memory"
            and region.serializer is None
        )
        self._add = _adder(region)
        self._last_warning = 0.0

    @property
    def supports_add(self) -> bool:
        return self._add is not None

    def get_many(self, keys: Sequence[str]) -> list[Any] | None:
        """Payloads for ``keys`` (``NO_VALUE`` where absent), in one backend
        call; ``None`` when the backend failed."""
        try:
            return self.region.get_multi(keys, ignore_expiration=True)  # type: ignore[no-any-return]
        except Exception as err:
            self.failed("read", err)
            return None

    def set(self, key: str, value: Any) -> bool:
        try:
            self.region.set(key, value)
            return True
        except Exception as err:
            self.failed("write", err)
            return False

    def set_many(self, mapping: Mapping[str, Any]) -> bool:
        try:
            self.region.set_multi(mapping)
            return True
        except Exception as err:
            self.failed("write", err)
            return False

    def add(self, key: str, value: Any) -> bool | None:
        """Store ``value`` unless ``key`` holds one: True if stored, False if
        not, None if unsupported or the backend failed."""
        if self._add is None:
            return None
        try:
            return self._add(key, value)
        except Exception as err:
            self.failed("write", err)
            return None

    def delete(self, key: str) -> bool:
        try:
            self.region.delete(key)
            return True
        except Exception as err:
            self.failed("write", err)
            return False

    def failed(self, what: str, err: BaseException) -> None:
        """Log a backend failure, at most one warning per region every 10 s."""
        now = time.monotonic()
        if now - self._last_warning >= 10.0:
            self._last_warning = now
            log.warning(
                "cache region %r: backend %s failed, using the database: %s: %s",
                self.name,
                what,
                type(err).__name__,
                err,
            )
        else:
            log.debug("cache region %r: backend %s failed: %r", self.name, what, err)


def _backend_value(region: CacheRegion, value: Any) -> Any:
    if region.serializer:
        return region._serialized_payload(value)
    return region._value(value)


def _adder(region: CacheRegion) -> Any:
    if region.key_mangler is not None:
        return None
    backend = region.backend
    module = type(backend).__module__
    cls = type(backend).__name__

    if module == "dogpile.cache.backends.memory":
        cache = backend._cache  # type: ignore[attr-defined]

        def add_memory(key: str, value: Any) -> bool:
            stored = _backend_value(region, value)
            return cache.setdefault(key, stored) is stored

        return add_memory

    if module in ("dogpile.cache.backends.redis", "dogpile.cache.backends.valkey"):

        def add_redis(key: str, value: Any) -> bool:
            ttl = getattr(backend, "redis_expiration_time", 0) or getattr(
                backend, "valkey_expiration_time", 0
            )
            client = backend.writer_client  # type: ignore[attr-defined]
            return bool(
                client.set(key, _backend_value(region, value), nx=True, ex=ttl or None)
            )

        return add_redis

    if module == "dogpile.cache.backends.file" and cls == "DBMBackend":

        def add_dbm(key: str, value: Any) -> bool:
            stored = _backend_value(region, value)
            with backend._dbm_file(True) as dbm_obj:  # type: ignore[attr-defined]
                if key in dbm_obj:
                    return False
                dbm_obj[key] = stored
                return True

        return add_dbm

    if module == "dogpile.cache.backends.memcached" and cls in (
        "PylibmcBackend",
        "MemcachedBackend",
        "PyMemcacheBackend",
    ):

        def add_memcached(key: str, value: Any) -> bool:
            client = backend.client  # type: ignore[attr-defined]
            args = backend.set_arguments  # type: ignore[attr-defined]
            return bool(client.add(key, _backend_value(region, value), **args))

        return add_memcached

    return None


MISSING = NO_VALUE

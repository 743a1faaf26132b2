"""dogpile.cache backends that ormcache fixes, registered with dogpile as
``ormcache.redis_cluster`` and ``ormcache.redis_sentinel`` (the short names
``redis_cluster`` and ``redis_sentinel`` in settings mean these).

* dogpile's Redis Cluster backend sends ``MGET``/``MSET`` for multi-key
  calls, which a cluster refuses when the keys fall in different hash slots
  ("CROSSSLOT"); here they are split by slot (redis-py's ``mget_nonatomic``
  and ``mset_nonatomic``), one request per node.
* dogpile's Sentinel backend passes ``db`` to the sentinels too, which have
  no databases, so any ``db`` but 0 fails; here ``db`` goes to the master
  and replicas only.

The redis driver is imported when a backend is created, as dogpile does.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

from dogpile.cache.backends.redis import RedisBackend as _DogpileRedis
from dogpile.cache.backends.redis import RedisClusterBackend as _DogpileCluster
from dogpile.cache.backends.redis import RedisSentinelBackend as _DogpileSentinel

__all__ = ["RedisClusterBackend", "RedisSentinelBackend", "without_retries"]


class RedisClusterBackend(_DogpileCluster):
    """Redis Cluster, with multi-key calls split by hash slot, and a client
    created on first use rather than when the region is built (dogpile's
    connects to the cluster in its constructor: a cluster that is down at
    startup stopped the application from starting).  With
    ``ormcache_no_retries`` (set from ``backend_timeout``), the client
    tries each command once unless ``retry`` or
    ``cluster_error_retry_attempts`` say otherwise."""

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        # (a copy as dogpile makes one: dict() would read every name, and
        # the settings could no longer tell a misspelt argument)
        args: Any = arguments.copy()  # type: ignore[attr-defined]
        # (what dogpile's would refuse at once, checked here: the client is
        # made on first use, so it would only show as an outage)
        url = args.get("url")
        if url is None and not args.get("startup_nodes"):
            raise KeyError("url")  # (from_settings: "needs the argument 'url'")
        if url is not None:
            from redis.connection import parse_url

            parse_url(url)  # ValueError: not a Redis URL
        self._no_retries = bool(args.pop("ormcache_no_retries", False))
        self._client: Any = None
        self._client_lock = threading.Lock()
        super().__init__(args)

    def _create_client(self) -> None:
        pass  # on first use: see _cluster

    def _cluster(self) -> Any:
        client = self._client
        if client is None:
            with self._client_lock:
                if self._client is None:
                    if self._no_retries and not (
                        {"retry", "cluster_error_retry_attempts"} & set(self.connection_kwargs)
                    ):
                        from redis.backoff import NoBackoff
                        from redis.retry import Retry

                        self.connection_kwargs = {**self.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
                    _DogpileCluster._create_client(self)  # sets writer_client
                client = self._client
        return client

    @property  # type: ignore[override]
    def writer_client(self) -> Any:
        return self._cluster()

    @writer_client.setter
    def writer_client(self, client: Any) -> None:
        self._client = client

    @property  # type: ignore[override]
    def reader_client(self) -> Any:
        return self._cluster()

    @reader_client.setter
    def reader_client(self, client: Any) -> None:
        pass  # the same client as writer_client

    def get_serialized_multi(self, keys: Iterable[str]) -> list[Any]:
        keys = list(keys)
        if not keys:
            return []
        return list(self.reader_client.mget_nonatomic(keys))

    def set_serialized_multi(self, mapping: Mapping[str, bytes]) -> None:
        if not mapping:
            return
        if not self.redis_expiration_time:
            self.writer_client.mset_nonatomic(dict(mapping))
            return
        pipe = self.writer_client.pipeline()
        for key, value in mapping.items():
            pipe.set(key, value, ex=self.redis_expiration_time)
        pipe.execute()

    def delete_multi(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.writer_client.delete(key)


class RedisSentinelBackend(_DogpileSentinel):
    """Redis Sentinel, where ``db`` selects the master's database, and the
    sentinels get the master's socket timeouts unless ``sentinel_kwargs``
    sets their own (redis-py does so when given no ``sentinel_kwargs``;
    dogpile always gives some, so the sentinels waited seconds, with
    retries, for a sentinel that is down)."""

    def __init__(self, arguments: Mapping[str, Any]) -> None:
        # dogpile's own passes ``{**arguments}`` on, reading every name: the
        # settings could not tell a misspelt argument.  The same, by name.
        args: Any = arguments.copy()  # type: ignore[attr-defined]
        self.sentinels = args.pop("sentinels", None)
        if not self.sentinels:
            # (dogpile's own fails later, on iterating None)
            raise KeyError("sentinels")
        self.service_name = args.pop("service_name", "mymaster")
        self.sentinel_kwargs = args.pop("sentinel_kwargs", {})
        for name, default in (("distributed_lock", True), ("thread_local_lock", False)):
            if name not in args:
                args[name] = default
        _DogpileRedis.__init__(self, args)

    def _create_client(self) -> None:
        db = self.db
        if db:
            self.connection_kwargs = {**self.connection_kwargs, "db": db}
        self.db = None  # keep dogpile from sending it to the sentinels
        sentinel_kwargs = self.sentinel_kwargs
        own = dict(sentinel_kwargs or {})
        for name in ("socket_timeout", "socket_connect_timeout"):
            value = getattr(self, name, None)
            if value is None:
                value = self.connection_kwargs.get(name)
            if value is not None:
                own.setdefault(name, value)
        self.sentinel_kwargs = own
        try:
            super()._create_client()
        finally:
            self.db = db
            self.sentinel_kwargs = sentinel_kwargs


def without_retries(backend: Any) -> bool:
    """Have a Redis backend's clients try each command once: redis-py 6+
    retries a timed-out command three times by default, which would wait
    for a silent server four times the timeout.  Redis Cluster clients and
    clients given their own ``retry`` are left alone.  True when changed."""
    from redis import Redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    if isinstance(backend, RedisClusterBackend):
        return False  # its client is made without retries (ormcache_no_retries)
    changed = False
    seen: set[int] = set()
    for name in ("writer_client", "reader_client"):
        client = getattr(backend, name, None)
        if not isinstance(client, Redis) or id(client) in seen:
            continue
        seen.add(id(client))
        if "retry" not in getattr(backend, "connection_kwargs", {}):
            _set_retry(client, Retry(NoBackoff(), 0))
            changed = True
        # a Sentinel master/replica client asks the sentinels for the
        # address first: they must not retry either
        manager = getattr(client.connection_pool, "sentinel_manager", None)
        if manager is not None and "retry" not in (getattr(backend, "sentinel_kwargs", None) or {}):
            for sentinel in manager.sentinels:
                if id(sentinel) not in seen:
                    seen.add(id(sentinel))
                    sentinel.set_retry(Retry(NoBackoff(), 0))
                    changed = True
    return changed


def _set_retry(client: Any, retry: Any) -> None:
    """``client.set_retry(retry)``, also where the client's pool is a
    ``BlockingConnectionPool`` (given as dogpile's ``connection_pool``
    argument), whose ``set_retry`` in redis-py reads lists that only the
    plain ``ConnectionPool`` has and raises ``AttributeError``, after it has
    set the retry for the connections it will make."""
    try:
        client.set_retry(retry)
    except AttributeError:
        pool = client.connection_pool
        pool.connection_kwargs["retry"] = retry
        for conn in list(getattr(pool, "_connections", ())):
            conn.retry = retry

"""The backend suite on a real local Redis Cluster and Redis Sentinel
(started by ``tests/redis_topologies.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from ormcache.testing.fixtures import BackendTests


class TestRedisCluster(BackendTests):
    """Keys of one lookup fall in different hash slots: dogpile's own
    cluster backend fails on them (CROSSSLOT)."""

    backend = "redis_cluster"

    def arguments_for(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        return {"url": request.getfixturevalue("redis_cluster_url")}


class TestRedisSentinelDb3(BackendTests):
    """A database other than 0 behind a sentinel: dogpile's own sentinel
    backend sends ``db`` to the sentinels too, and fails."""

    backend = "redis_sentinel"

    def arguments_for(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        sentinel = request.getfixturevalue("redis_sentinel")
        return {**sentinel, "db": 3, "socket_timeout": 1.0}


def test_dogpile_cluster_backend_alone_fails_across_slots(redis_cluster_url: str) -> None:
    """Why ormcache ships its own: the plain dogpile backend, same keys."""
    from dogpile.cache import make_region

    region = make_region().configure("dogpile.cache.redis_cluster", arguments={"url": redis_cluster_url})
    with pytest.raises(Exception, match="(?i)slot"):
        region.get_multi(["ormcache:a", "ormcache:b", "ormcache:c", "ormcache:d"])


def test_sentinel_db_reaches_the_master(redis_sentinel: dict[str, Any]) -> None:
    import redis

    from ormcache import OrmCache

    cache = OrmCache.from_settings(
        {"regions": {"s": {"backend": "redis_sentinel", "arguments": {**redis_sentinel, "db": 3}}}}
    )
    try:
        cache.region("s").set("ormcache:probe", "x")
        master = redis.Redis(host="127.0.0.1", port=6395, db=3)
        assert master.exists("ormcache:probe")
        assert not redis.Redis(host="127.0.0.1", port=6395, db=0).exists("ormcache:probe")
    finally:
        cache.close()

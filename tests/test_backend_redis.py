from typing import Any

import pytest

from ormcache.testing.fixtures import BackendTests


class TestRedis(BackendTests):
    """A real Redis server (``make services`` starts one)."""

    backend = "redis"

    def arguments_for(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        return {"url": request.getfixturevalue("redis_url")}


class TestFakeRedis(BackendTests):
    """fakeredis: the same suite in-process, the twin of TestRedis."""

    backend = "redis"

    def arguments_for(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        import fakeredis
        import redis

        server = fakeredis.FakeServer()
        pool = redis.ConnectionPool(connection_class=fakeredis.FakeRedisConnection, server=server)
        return {"connection_pool": pool}


class TestRedisSigned(TestRedis):
    """Real Redis with signed payloads."""

    signing_key = "backend-suite-signing-key"

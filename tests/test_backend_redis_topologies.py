"""The backend suite on a real local Redis Cluster and Redis Sentinel
(started by ``tests/redis_topologies.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from ormcache._store import _retries
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


def test_cluster_region_builds_while_the_cluster_is_down(redis_cluster_url: str, tmp_path: Any) -> None:
    """dogpile's cluster backend connects in its constructor: a cluster
    that is down when the application starts must not stop it.  The client
    is made on first use, tries each command once, and queries are
    answered by the database meanwhile."""
    import uuid

    from servers import closed_port
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache, OrmCache
    from ormcache.testing.fixtures import Base, Template, seed

    down = closed_port()
    cache = OrmCache.from_settings(
        {
            "namespace": "cd" + uuid.uuid4().hex[:8],
            "regions": {
                "down": {"backend": "redis_cluster", "arguments": {"url": f"redis://127.0.0.1:{down}"}},
                "up": {"backend": "redis_cluster", "arguments": {"url": redis_cluster_url}},
            },
        }
    )
    engine = create_engine(f"sqlite:///{tmp_path}/c.db")
    Base.metadata.create_all(engine)
    seed(engine)
    maker = sessionmaker(engine)
    cache.attach(maker)
    try:
        with maker() as s:
            stmt = select(Template).where(Template.id == 1).options(FromCache("down"))
            assert s.scalars(stmt).one().name == "t1"
            s.get_one(Template, 1).name = "written"
            s.commit()
        assert _retries(cache.region("up").backend.writer_client.retry) == 0
        up = select(Template).where(Template.id == 1).options(FromCache("up"))
        for _ in range(2):
            with maker() as s:
                assert s.scalars(up).one().name == "written"
    finally:
        cache.close()
        engine.dispose()


@pytest.mark.parametrize("relaxed", [False, True], ids=["no-l1", "relaxed-l1"])
def test_a_user_that_may_not_publish_still_caches(
    redis_no_publish_url: str, tmp_path: Any, caplog: Any, relaxed: bool
) -> None:
    """Every Redis region announces its version tokens over pub/sub; a user
    without channel permissions (NOPERM) must not make that a backend
    failure: the tokens are written, only the announcement is dropped."""
    import uuid

    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache, OrmCache
    from ormcache.testing import QueryCounter
    from ormcache.testing.fixtures import Base, Template, seed

    engine = create_engine(f"sqlite:///{tmp_path}/acl.db")
    Base.metadata.create_all(engine)
    seed(engine)
    region: dict[str, Any] = {"backend": "redis", "arguments": {"url": redis_no_publish_url}}
    if relaxed:
        region["l1"] = {"max_entries": 100, "mode": "relaxed"}
    cache = OrmCache.from_settings({"namespace": "ac" + uuid.uuid4().hex[:8], "regions": {"r": region}})
    maker = sessionmaker(engine)
    cache.attach(maker)
    stmt = select(Template).where(Template.id == 1).options(FromCache("r"))

    def name_and_selects() -> tuple[str, int]:
        with QueryCounter(engine) as counter, maker() as s:
            name = s.scalars(stmt).one().name
        return name, counter.selects

    try:
        for i in range(3):
            with maker() as s:
                s.get_one(Template, 1).name = f"n{i}"
                s.commit()
        assert name_and_selects() == ("n2", 1)
        assert name_and_selects() == ("n2", 0)
        store = cache._stores["r"]
        assert store.available and not store._lost and store.publish_channel is None
        assert "cannot publish invalidations" in caplog.text
        with maker() as s:
            s.get_one(Template, 1).name = "after"
            s.commit()
        assert name_and_selects() == ("after", 1)
    finally:
        cache.close()
        engine.dispose()

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


class TestRedisL1(TestRedis):
    """Real Redis behind an in-process L1 that validates its versions."""

    l1 = 1000


def test_l1_is_as_consistent_as_l2(redis_url: str, tmp_path: Any) -> None:
    """Two processes' caches (two OrmCache objects, each its own L1) on one
    Redis: a write through one is seen at once through the other."""
    import uuid

    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache, OrmCache
    from ormcache.testing import QueryCounter
    from ormcache.testing.fixtures import Base, Template, seed

    engine = create_engine(f"sqlite:///{tmp_path}/l1.db")
    Base.metadata.create_all(engine)
    seed(engine)
    settings = {
        "namespace": "l1" + uuid.uuid4().hex[:8],
        "regions": {"r": {"backend": "redis", "l1": {"max_entries": 100}, "arguments": {"url": redis_url}}},
    }
    reader_cache, writer_cache = OrmCache.from_settings(settings), OrmCache.from_settings(settings)
    readers, writers = sessionmaker(engine), sessionmaker(engine)
    reader_cache.attach(readers)
    writer_cache.attach(writers)
    import ormcache.invalidation as inv

    stmt = select(Template).where(Template.id == 1).options(FromCache("r"))
    backend = reader_cache.region("r").backend
    calls: list[int] = []
    original = backend.get_serialized_multi
    backend.get_serialized_multi = lambda keys: calls.append(len(keys)) or original(keys)  # type: ignore[method-assign]
    try:
        with readers() as s:
            s.scalars(stmt).one()
        calls.clear()
        with QueryCounter(engine) as c, readers() as s:
            assert s.scalars(stmt).one().name == "t1"
        assert c.selects == 0 and calls and all(n < 6 for n in calls)  # tokens only
        inv.unregister(reader_cache)  # only the writer's cache sees the write
        with writers() as s:
            s.get_one(Template, 1).name = "written elsewhere"
            s.commit()
        with readers() as s:
            assert s.scalars(stmt).one().name == "written elsewhere"
    finally:
        reader_cache.close()
        writer_cache.close()
        engine.dispose()


@pytest.mark.parametrize("writer_l1", ["relaxed", "validated", None])
def test_relaxed_l1_sees_writes_from_other_processes(redis_url: str, tmp_path: Any, writer_l1: Any) -> None:
    """Relaxed mode: no round trip on an L1 hit; a write through another
    cache (another process) arrives over pub/sub within a bounded time,
    whatever L1 the writer's own settings give it (a worker or a cron job
    may have none)."""
    import time
    import uuid

    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import sessionmaker

    import ormcache.invalidation as inv
    from ormcache import FromCache, OrmCache
    from ormcache.testing import QueryCounter
    from ormcache.testing.fixtures import Base, Template, seed

    engine = create_engine(f"sqlite:///{tmp_path}/relaxed.db")
    Base.metadata.create_all(engine)
    seed(engine)
    region = {
        "backend": "redis",
        "l1": {"max_entries": 100, "mode": "relaxed"},
        "arguments": {"url": redis_url},
    }
    settings = {"namespace": "rx" + uuid.uuid4().hex[:8], "regions": {"r": region}}
    writer_region = {key: value for key, value in region.items() if key != "l1"}
    if writer_l1 is not None:
        writer_region["l1"] = {"max_entries": 100, "mode": writer_l1}
    reader_cache = OrmCache.from_settings(settings)
    writer_cache = OrmCache.from_settings({**settings, "regions": {"r": writer_region}})
    readers, writers = sessionmaker(engine), sessionmaker(engine)
    reader_cache.attach(readers)
    writer_cache.attach(writers)
    inv.unregister(reader_cache)  # the reader hears of writes only over pub/sub
    store = reader_cache._stores["r"]
    deadline = time.monotonic() + 5
    while not store.subscriber.healthy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.subscriber.healthy
    stmt = select(Template).where(Template.id == 1).options(FromCache("r"))
    backend = store.region.backend
    calls: list[int] = []
    original = backend.get_serialized_multi
    backend.get_serialized_multi = lambda keys: calls.append(len(keys)) or original(keys)  # type: ignore[method-assign]
    try:
        for _ in range(2):
            with readers() as s:
                s.scalars(stmt).one()
        calls.clear()
        with QueryCounter(engine) as c, readers() as s:
            assert s.scalars(stmt).one().name == "t1"
        assert c.selects == 0 and calls == []  # no round trip at all
        with writers() as s:
            s.get_one(Template, 1).name = "written elsewhere"
            s.commit()
        started = time.monotonic()
        while True:
            with readers() as s:
                if s.scalars(stmt).one().name == "written elsewhere":
                    break
            assert time.monotonic() - started < 2.0, "invalidation never arrived"
            time.sleep(0.001)
    finally:
        reader_cache.close()
        writer_cache.close()
        engine.dispose()


class TestRedisRelaxedL1(TestRedis):
    """The whole suite with a relaxed L1 (tokens over pub/sub): one process
    sees its own writes at once."""

    l1 = 1000
    l1_mode = "relaxed"


def test_round_trips_of_a_miss_and_a_hit(redis_url: str, tmp_path: Any, monkeypatch: Any) -> None:
    """A first ``session.get`` of a row on Redis (default settings:
    distributed lock) makes three round trips: read the entry and its
    version tokens; create the row's token and take the lock; store the
    entry and release the lock.  The next one is one round trip, and the
    database is asked once."""
    import uuid

    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache, OrmCache
    from ormcache.testing import QueryCounter
    from ormcache.testing.fixtures import Base, Template, seed
    from servers import count_redis_commands

    engine = create_engine(f"sqlite:///{tmp_path}/trips.db")
    Base.metadata.create_all(engine)
    seed(engine)
    cache = OrmCache.from_settings(
        {"namespace": "rt" + uuid.uuid4().hex[:8], "regions": {"r": {"backend": "redis", "arguments": {"url": redis_url}}}}
    )
    maker = sessionmaker(engine)
    cache.attach(maker)
    def name(tid: int) -> str:
        with maker() as s:
            return s.get(Template, tid, options=[FromCache("r")]).name  # type: ignore[union-attr]

    try:
        name(1)  # the table's version tokens now exist
        sent = count_redis_commands(monkeypatch)
        with QueryCounter(engine) as first:
            assert name(2) == "t2"
        assert first.selects == 1 and len(sent) == 3
        sent.clear()
        with QueryCounter(engine) as second:
            assert name(2) == "t2"
        assert second.selects == 0 and len(sent) == 1
        monkeypatch.undo()
        lock_keys = cache.region("r").backend.writer_client.keys("_lock*")
        assert not [k for k in lock_keys if b"rt" in k]
    finally:
        cache.close()
        engine.dispose()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_relaxed_l1_follows_the_channel_again_after_fork(redis_url: str) -> None:
    """A forked child (gunicorn --preload, a prefork pool) loses the thread
    that followed the channel: its copied tokens would never move again.
    It forgets them and subscribes from the child."""
    import os
    import time
    import uuid

    from ormcache import OrmCache

    cache = OrmCache.from_settings(
        {
            "namespace": "fk" + uuid.uuid4().hex[:8],
            "regions": {
                "r": {"backend": "redis", "l1": {"max_entries": 10, "mode": "relaxed"}, "arguments": {"url": redis_url}}
            },
        }
    )
    subscriber = cache._stores["r"].subscriber
    deadline = time.monotonic() + 5
    while not subscriber.healthy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert subscriber.healthy
    subscriber.tokens["k"] = "t"
    pid = os.fork()
    if pid == 0:  # the child
        ok = subscriber.tokens == {} and subscriber._thread.is_alive()
        deadline = time.monotonic() + 5
        while not subscriber.healthy and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(0 if ok and subscriber.healthy else 1)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert subscriber.tokens == {"k": "t"}  # the parent's are its own
    finally:
        cache.close()


def test_only_a_refused_publish_turns_announcing_off(redis_url: str) -> None:
    """A user without channel permission (NOPERM) or a disabled command
    stops a region's announcements; a server that is merely busy, read-only
    for a moment or out of memory does not: that write counts as lost and
    is retried."""
    import uuid

    from redis.exceptions import NoPermissionError, ReadOnlyError, ResponseError

    from ormcache import OrmCache

    cache = OrmCache.from_settings(
        {"namespace": "pb" + uuid.uuid4().hex[:8], "regions": {"r": {"backend": "redis", "arguments": {"url": redis_url}}}}
    )
    store = cache._stores["r"]
    channel = store.publish_channel
    try:
        assert channel is not None
        for transient in (ResponseError("BUSY Redis is busy running a script"), ReadOnlyError("READONLY")):
            with pytest.raises(type(transient)):
                store._cannot_publish(transient)
            assert store.publish_channel == channel
        store._cannot_publish(ResponseError("unknown command 'PUBLISH'"))
        assert store.publish_channel is None
        store.publish_channel = channel
        store._cannot_publish(NoPermissionError("this user has no permissions to access one of the channels"))
        assert store.publish_channel is None
    finally:
        cache.close()

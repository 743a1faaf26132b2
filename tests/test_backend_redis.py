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


def _count_reads(monkeypatch: Any, store: Any) -> list[int]:
    """The number of keys of each backend read ``store`` makes from now on."""
    from ormcache._store import Store

    calls: list[int] = []
    original = Store._fetch

    def fetch(self: Any, keys: Any) -> Any:
        if self is store:
            calls.append(len(keys))
        return original(self, keys)

    monkeypatch.setattr(Store, "_fetch", fetch)
    return calls


def test_l1_is_as_consistent_as_l2(redis_url: str, tmp_path: Any, monkeypatch: Any) -> None:
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
    calls = _count_reads(monkeypatch, reader_cache._stores["r"])
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
def test_relaxed_l1_sees_writes_from_other_processes(
    redis_url: str, tmp_path: Any, writer_l1: Any, monkeypatch: Any
) -> None:
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
    calls = _count_reads(monkeypatch, store)
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


def test_relaxed_l1_of_a_process_whose_subscription_thread_cannot_run(
    redis_url: str, tmp_path: Any, monkeypatch: Any
) -> None:
    """A message that came while the subscription's thread could not run
    (its process kept the GIL: a PostgreSQL reader served hits 1-3 s stale
    so) is not waited for: once the thread has not run for STALE_AFTER
    seconds, hits are validated against Redis and see the write.  The
    thread is held here in its handling of the message."""
    import threading
    import time
    import uuid

    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import sessionmaker

    import ormcache.invalidation as inv
    from ormcache import FromCache, OrmCache, _pubsub
    from ormcache.testing.fixtures import Base, Template, seed

    engine = create_engine(f"sqlite:///{tmp_path}/held.db")
    Base.metadata.create_all(engine)
    seed(engine)
    region = {"backend": "redis", "l1": {"max_entries": 100, "mode": "relaxed"}, "arguments": {"url": redis_url}}
    settings = {"namespace": "rh" + uuid.uuid4().hex[:8], "regions": {"r": region}}
    reader_cache = OrmCache.from_settings(settings)
    writer_cache = OrmCache.from_settings({**settings, "regions": {"r": {"backend": "redis", "arguments": {"url": redis_url}}}})
    readers, writers = sessionmaker(engine), sessionmaker(engine)
    reader_cache.attach(readers)
    writer_cache.attach(writers)
    inv.unregister(reader_cache)  # the reader hears of writes only over pub/sub
    subscriber = reader_cache._stores["r"].subscriber
    deadline = time.monotonic() + 5
    while not subscriber.healthy and time.monotonic() < deadline:
        time.sleep(0.01)
    release = threading.Event()
    apply = _pubsub.Subscriber.apply

    def held(self: Any, mapping: dict[str, str]) -> None:
        release.wait(10)  # (the thread cannot run on)
        apply(self, mapping)

    stmt = select(Template).where(Template.id == 1).options(FromCache("r"))
    try:
        for _ in range(2):
            with readers() as s:
                assert s.scalars(stmt).one().name == "t1"
        monkeypatch.setattr(_pubsub.Subscriber, "apply", held)
        with writers() as s:
            s.get_one(Template, 1).name = "written elsewhere"
            s.commit()
        started = time.monotonic()
        while True:
            with readers() as s:
                if s.scalars(stmt).one().name == "written elsewhere":
                    break
            assert time.monotonic() - started < 2.0, "served stale while the thread could not run"
            time.sleep(0.001)
        assert time.monotonic() - started < _pubsub.STALE_AFTER + 0.5
        assert not release.is_set()  # (seen before the message was taken in)
    finally:
        release.set()
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
        assert first.selects == 1
        assert len(sent) == 3, sent
        sent.clear()
        with QueryCounter(engine) as second:
            assert name(2) == "t2"
        assert second.selects == 0
        assert len(sent) == 1, sent
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


def _relaxed(redis_url: str, tag: str, max_entries: int = 10) -> Any:
    """An OrmCache with one Redis region "r" behind a relaxed L1, its
    subscription live."""
    import time
    import uuid

    from ormcache import OrmCache

    cache = OrmCache.from_settings(
        {
            "namespace": tag + uuid.uuid4().hex[:8],
            "regions": {
                "r": {
                    "backend": "redis",
                    "l1": {"max_entries": max_entries, "mode": "relaxed"},
                    "arguments": {"url": redis_url},
                }
            },
        }
    )
    subscriber = cache._stores["r"].subscriber
    deadline = time.monotonic() + 5
    while not subscriber.healthy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert subscriber.healthy
    return cache



def test_a_child_forked_without_the_hooks_follows_the_channel_too(redis_url: str, monkeypatch: Any) -> None:
    """A C library's fork() (uWSGI's default) runs none of Python's fork
    hooks: the first read of the child notices the new pid and does what
    they would have done, else the relaxed L1's copied tokens, which no
    thread of the child moves, would be trusted for good.  (Played here
    by making the module state and the store another process's: a real
    fork() from C, with this process's threads, may leave the child
    waiting for a GIL a thread of the parent held.)"""
    import os

    from ormcache import _store

    cache = _relaxed(redis_url, "hf")
    store = cache._stores["r"]
    subscriber = store.subscriber
    try:
        subscriber.tokens["k"] = "t"
        thread = subscriber._thread
        monkeypatch.setattr(_store, "_owner_pid", -1)
        store._pid = -1
        store.get_many(["some-entry", "k"])
        assert _store._owner_pid == os.getpid() and store._pid == os.getpid()
        assert subscriber.tokens.get("k") != "t"  # forgotten
        assert subscriber._thread is not thread and subscriber._thread.is_alive()  # following again
    finally:
        cache.close()


def test_relaxed_l1_tokens_are_bounded(redis_url: str, tmp_path: Any) -> None:
    """The tokens a relaxed L1 keeps (every version key read: rows have
    their own) are forgotten past a bound, not kept for the process's life."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache
    from ormcache.testing.fixtures import Base, Template, seed

    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    seed(engine, stores=4, per_store=10)
    cache = _relaxed(redis_url, "tb", max_entries=5)
    store = cache._stores["r"]
    subscriber = store.subscriber
    assert subscriber.max_tokens == 10_000  # (at least that many, 8 per L1 entry above)
    subscriber.max_tokens = 12
    Session = sessionmaker(engine)
    cache.attach(Session)
    try:
        most = 0
        for tid in range(1, 41):
            with Session() as s:
                s.get_one(Template, tid, options=[FromCache("r")])
            most = max(most, len(subscriber.tokens))
        assert 0 < most <= 12
    finally:
        cache.close()
        engine.dispose()


def test_l1_max_bytes_bounds_one_entry_too() -> None:
    from ormcache._store import L1

    l1 = L1(10, max_bytes=1000)
    l1["small"] = (0, (), None, b"x" * 100)
    l1["big"] = (0, (), None, b"x" * 5000)
    assert l1.get("big") is None and l1.bytes <= 1000
    assert l1.get("small") is None or l1.bytes <= 1000


def test_published_statistics_stay_out_of_the_l1(redis_url: str, tmp_path: Any) -> None:
    import uuid

    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache, OrmCache
    from ormcache.stats import publish_once
    from ormcache.testing.fixtures import Base, Template, seed

    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    seed(engine)
    cache = OrmCache.from_settings(
        {
            "namespace": "sl" + uuid.uuid4().hex[:8],
            "regions": {"r": {"backend": "redis", "l1": {"max_entries": 3}, "arguments": {"url": redis_url}}},
        }
    )
    store = cache._stores["r"]
    Session = sessionmaker(engine)
    cache.attach(Session)
    try:
        for tid in (1, 2, 3):
            with Session() as s:
                s.scalars(select(Template).where(Template.id == tid).options(FromCache("r"))).one()
        assert store.l1 is not None
        before = list(store.l1._data)
        assert len(before) == 3
        assert publish_once(cache, store)
        assert list(store.l1._data) == before
    finally:
        cache.close()
        engine.dispose()


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


def _one_region(redis_url: str, tmp_path: Any, **arguments: Any) -> Any:
    """An engine of seeded templates, an OrmCache with one Redis region
    ``r`` attached to a sessionmaker, and a function reading template
    ``tid`` through it: (engine, cache, name)."""
    import uuid

    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache, OrmCache
    from ormcache.testing.fixtures import Base, Template, seed

    engine = create_engine(f"sqlite:///{tmp_path}/reader.db")
    Base.metadata.create_all(engine)
    seed(engine)
    region = {"backend": "redis", "arguments": {"url": redis_url, **arguments}}
    cache = OrmCache.from_settings({"namespace": "rd" + uuid.uuid4().hex[:8], "regions": {"r": region}})
    maker = sessionmaker(engine)
    cache.attach(maker)

    def name(tid: int) -> str:
        with maker() as s:
            return s.get(Template, tid, options=[FromCache("r")]).name  # type: ignore[union-attr]

    return engine, cache, name


def _read_at_once(name: Any, tids: range, reads: int = 200) -> list[Any]:
    """Threads, one per template id, start together and each read its
    template ``reads`` times through ``name``; what they got wrong."""
    import threading

    barrier = threading.Barrier(len(tids))
    wrong: list[Any] = []

    def read(tid: int) -> None:
        barrier.wait()
        for _ in range(reads):
            got = name(tid)
            if got != f"t{tid}":
                wrong.append((tid, got))

    threads = [threading.Thread(target=read, args=(tid,)) for tid in tids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return wrong


def test_hits_read_on_connections_of_their_own(redis_url: str, tmp_path: Any) -> None:
    """A hit's MGET skips redis-py's client layer: it goes on a pool
    connection kept for reads, reused from hit to hit; one the server
    closed while it waited (an idle ``timeout``, a restart) reconnects
    without failing the read; ``pool.disconnect()`` reaches it;
    ``cache.close()`` gives it back."""
    import redis

    from ormcache.testing import QueryCounter

    engine, cache, name = _one_region(redis_url, tmp_path)
    store = cache._stores["r"]
    reader = store._mget
    pool = store.region.backend.reader_client.connection_pool

    def client_id(conn: Any) -> int:
        conn.send_command("CLIENT", "ID")
        return conn.read_response()  # type: ignore[no-any-return]

    try:
        assert reader is not None and reader.limit == 8  # redis-py 8: max_connections 100
        name(1)
        name(1)
        assert len(reader._free) == 1
        conn = reader._free[0]
        assert conn in pool._in_use_connections  # counted by the pool
        killed = client_id(conn)
        for _ in range(5):
            with QueryCounter(engine) as c:
                assert name(1) == "t1"
            assert c.selects == 0
        assert reader._free == [conn]  # the same connection every time
        assert redis.Redis.from_url(redis_url).client_kill_filter(_id=killed) == 1
        with QueryCounter(engine) as c:
            assert name(1) == "t1"
        assert c.selects == 0 and store._failures == 0
        assert reader._free == [conn] and client_id(conn) != killed  # reconnected
        pool.disconnect()
        assert conn._sock is None
        with QueryCounter(engine) as c:
            assert name(1) == "t1"
        assert c.selects == 0 and store._failures == 0
        assert store._fetch([]) == []
        cache.close()  # gives them back to the pool
        assert reader._free == [] and reader._count == 0
        assert conn in pool._available_connections
        assert store._fetch(["ormcache-test-absent"]) == [None]  # borrows again
        assert reader._count == 1
    finally:
        cache.close()
        engine.dispose()


def test_a_miss_writes_on_the_readers_connections(redis_url: str, tmp_path: Any, monkeypatch: Any) -> None:
    """A miss's two pipelines (create absent tokens and take the lock;
    store the entry and release the lock) go on the reader's connection,
    not through the client, and leave no lock behind."""
    from ormcache.testing import QueryCounter

    engine, cache, name = _one_region(redis_url, tmp_path)
    store = cache._stores["r"]
    client = store.region.backend.writer_client

    def no_client_pipeline(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a miss sent a pipeline through the client")

    try:
        name(1)
        monkeypatch.setattr(client, "pipeline", no_client_pipeline)
        with QueryCounter(engine) as c:
            assert name(2) == "t2"  # absent row token: lock and add
            assert name(2) == "t2"
        assert c.selects == 1 and store._failures == 0
        monkeypatch.undo()
        assert not client.keys(f"_lock{cache.settings.namespace}*")
    finally:
        cache.close()
        engine.dispose()


class _DropsFirstReply:
    """A redis-py connection whose first reply after sending is lost, as
    when the server closes the connection once it has run the commands."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.dropped = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if not self.dropped:
            import redis

            self.dropped += 1
            self._conn.disconnect()
            raise redis.ConnectionError("closed by the server")
        return self._conn.read_response(*args, **kwargs)


def test_a_miss_sent_again_after_a_lost_reply_holds_its_lock(redis_url: str, tmp_path: Any) -> None:
    """The server ran the lock pipeline, then the connection closed before
    its replies came back: sent again on a new connection, the lock reads
    as this caller's own (it is), and the add the first sending made as
    someone else's (nothing is stored from this miss).  Storing, whose
    reply is lost the same way, stores the entry and releases the lock."""
    from ormcache._store import _TwoLevelLock
    from ormcache.invalidation import new_token

    engine, cache, name = _one_region(redis_url, tmp_path)
    store = cache._stores["r"]
    reader = store._mget
    client = store.region.backend.writer_client
    try:
        name(1)
        assert reader is not None and len(reader._free) == 1
        reader._free[0] = lossy = _DropsFirstReply(reader._free[0])
        key, dep = "ormcache-test-lost-reply-" + new_token(), "ormcache-test-lost-dep-" + new_token()
        mutex = store.mutex(key)
        assert type(mutex) is _TwoLevelLock
        acquired, added = store.acquire_adding(mutex, {dep: "v1"})
        assert lossy.dropped == 1
        assert acquired is True and added == {dep: False}
        lock_name = mutex.remote.mutex.name
        assert client.get(lock_name) == mutex.remote.mutex.local.token
        assert client.get(dep) is not None
        lossy.dropped = 0
        assert store.set(key, ("entry",), mutex) is True
        assert lossy.dropped == 1
        mutex.release()
        assert client.get(lock_name) is None
        assert store.get_values([key]) == [("entry",)]
        assert store._failures == 0
        client.delete(key, dep)
    finally:
        cache.close()
        engine.dispose()


def test_a_lock_whose_release_failed_is_released_once_the_backend_answers(
    redis_url: str, tmp_path: Any, monkeypatch: Any
) -> None:
    """A miss whose lock release found no server leaves the lock held
    until it expires (30 s by default), and every caller of that key
    waiting for it.  The release is tried again in the background, as lost
    invalidations are; one that would come after the lock's expiry is
    dropped (the lock may be someone else's by then)."""
    import time

    import redis

    engine, cache, name = _one_region(redis_url, tmp_path)
    store = cache._stores["r"]
    store.retry_after = 0.05
    client = store.region.backend.writer_client
    mutex = store.mutex("orphan-key")
    try:
        assert mutex.acquire(False)
        lock = mutex.remote.mutex
        original = type(lock).do_release
        calls: list[Any] = []

        def fails_once(self: Any, token: Any) -> Any:
            calls.append(token)
            if len(calls) == 1:
                raise redis.ConnectionError("the server went away")
            return original(self, token)

        monkeypatch.setattr(type(lock), "do_release", fails_once)
        with pytest.raises(redis.ConnectionError):
            mutex.release()
        deadline = time.monotonic() + 10
        while client.get(lock.name) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get(lock.name) is None
        assert len(calls) == 2 and calls[0] == calls[1]  # with the token it held
        assert not store._lost_releases

        late: list[int] = []
        store.lose_release(lambda: late.append(1), 0.01)
        time.sleep(0.05)
        assert store.flush_lost() and late == []
    finally:
        cache.close()
        engine.dispose()


def test_a_release_refused_with_the_entrys_write_is_tried_again(redis_url: str, tmp_path: Any) -> None:
    """The release sent with the entry's write answered with an error
    (``BUSY`` while a script runs, ``READONLY`` on a server just made a
    replica): it did not run, and is tried again in the background rather
    than leaving the key's waiters until the lock expires (found by
    review)."""
    import time

    from redis.exceptions import ResponseError

    from ormcache._store import _TwoLevelLock

    engine, cache, name = _one_region(redis_url, tmp_path)
    store = cache._stores["r"]
    store.retry_after = 0.05
    reader = store._mget
    client = store.region.backend.writer_client
    try:
        name(1)
        mutex = store.mutex("refused-release")
        assert type(mutex) is _TwoLevelLock and mutex.acquire(False)
        lock_name = mutex.remote.mutex.name
        original = type(reader).pipeline

        def busy(self: Any, commands: Any) -> Any:
            replies = original(self, commands[:-1])  # the write; the release refused
            return [*replies, ResponseError("BUSY Redis is busy running a script")]

        type(reader).pipeline = busy  # type: ignore[method-assign]
        try:
            assert store.set("refused-release", ("entry",), mutex) is False  # (logged as a failed write)
        finally:
            type(reader).pipeline = original  # type: ignore[method-assign]
        mutex.release()
        deadline = time.monotonic() + 10
        while client.get(lock_name) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get(lock_name) is None
        assert not store._lost_releases
    finally:
        cache.close()
        engine.dispose()


def test_a_timedelta_expiration_on_the_readers_pipelines(redis_url: str, tmp_path: Any) -> None:
    """``redis_expiration_time`` given as a ``timedelta`` (redis-py's
    commands take one) works on a miss's pipelines too: the first miss
    (tokens absent) and a miss after an invalidation (tokens there) both
    store, with the expiry."""
    import datetime

    from ormcache.testing import QueryCounter
    from ormcache.testing.fixtures import Template

    engine, cache, name = _one_region(redis_url, tmp_path, redis_expiration_time=datetime.timedelta(minutes=10))
    store = cache._stores["r"]
    client = store.region.backend.writer_client
    try:
        with QueryCounter(engine) as c:
            for _ in range(3):
                assert name(1) == "t1"
            cache.invalidate(Template)
            for _ in range(3):
                assert name(1) == "t1"
        assert c.selects == 2 and store._failures == 0
        keys = client.keys(f"{cache.settings.namespace}:q:*")
        assert keys and all(0 < client.ttl(k) <= 600 for k in keys)
    finally:
        cache.close()
        engine.dispose()


class _TimesOutOnce(_DropsFirstReply):
    """The server runs the commands; their reply does not come in time."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if not self.dropped:
            import redis

            self.dropped += 1
            self._conn.read_response(*args, **kwargs)  # (it ran)
            self._conn.disconnect()
            raise redis.TimeoutError("Timeout reading from socket")
        return self._conn.read_response(*args, **kwargs)


def test_a_lock_taken_by_a_reply_that_timed_out_is_released(redis_url: str, tmp_path: Any) -> None:
    """The lock pipeline ran on the server but its reply timed out (not
    sent again): the miss goes to the database without the lock, and the
    lock the server took for it is released once the server answers,
    rather than held until it expires while callers of the key wait."""
    import time

    import redis

    from ormcache._store import _TwoLevelLock
    from ormcache.invalidation import new_token

    engine, cache, name = _one_region(redis_url, tmp_path)
    store = cache._stores["r"]
    store.retry_after = 0.05
    reader = store._mget
    client = store.region.backend.writer_client
    try:
        name(1)
        assert reader is not None and len(reader._free) == 1
        dep = "ormcache-test-timeout-dep-" + new_token()
        for tokens in ({dep: "v1"}, {}):  # (without tokens too: under ormcache's owner token)
            reader._free[0] = _TimesOutOnce(reader._free[0])
            mutex = store.mutex("ormcache-test-timeout-" + new_token())
            assert type(mutex) is _TwoLevelLock
            with pytest.raises(redis.TimeoutError):
                store.acquire_adding(mutex, tokens)
            lock_name = mutex.remote.mutex.name
            deadline = time.monotonic() + 10
            while client.get(lock_name) is not None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert client.get(lock_name) is None and not store._lost_releases
        client.delete(dep)
    finally:
        cache.close()
        engine.dispose()


def test_a_waiter_takes_the_redis_lock_once_released(redis_url: str, tmp_path: Any) -> None:
    """A caller waiting for another process's miss polls the lock every
    ``lock_sleep`` under owner tokens of ormcache's own, and takes it once
    the holder releases it."""
    import threading
    import time

    from ormcache._store import _TwoLevelLock

    engine, holder_cache, _ = _one_region(redis_url, tmp_path)
    waiter_cache = type(holder_cache).from_settings(
        {"namespace": holder_cache.settings.namespace, "regions": {"r": {"backend": "redis", "arguments": {"url": redis_url}}}}
    )
    held = holder_cache._stores["r"].mutex("cold-key")
    store = waiter_cache._stores["r"]
    waiting = store.mutex("cold-key")
    assert type(held) is _TwoLevelLock and type(waiting) is _TwoLevelLock
    got: list[bool] = []
    tries: list[int] = []
    adding = store._lock_adding

    def counted(*args: Any) -> Any:
        tries.append(1)
        return adding(*args)

    store._lock_adding = counted
    try:
        assert held.acquire(False)
        waiter = threading.Thread(target=lambda: got.append(waiting.acquire(True)))
        waiter.start()
        time.sleep(0.1)
        assert got == []  # still waiting
        held.release()
        waiter.join(10)
        assert got == [True]
        assert len(tries) >= 2  # polled with ormcache's owner tokens
        waiting.release()
        assert waiter_cache._stores["r"].region.backend.writer_client.get(waiting.remote.mutex.name) is None
    finally:
        holder_cache.close()
        waiter_cache.close()
        engine.dispose()


def test_reads_borrow_a_quarter_of_the_pool_at_most(redis_url: str, tmp_path: Any) -> None:
    """The connections kept for reads are the pool's, at most a quarter of
    its ``max_connections``: with ``max_connections = 4``, one; the other
    readers at the same moment read through the client, and the process
    never holds more connections than the pool allows."""
    engine, cache, name = _one_region(
        redis_url, tmp_path, connection_kwargs={"max_connections": 4}
    )
    store = cache._stores["r"]
    pool = store.region.backend.reader_client.connection_pool
    for tid in range(1, 4):
        name(tid)
    assert store._mget.limit == 1
    try:
        assert _read_at_once(name, range(1, 4)) == [] and store._failures == 0
        assert len(store._mget._free) == 1 and store._mget._count == 1
        assert pool._created_connections <= 4
    finally:
        cache.close()
        engine.dispose()


def test_reads_stop_polling_for_replies_that_come_late(redis_url: str, monkeypatch: Any) -> None:
    """A read on the reader's connections polls its socket for the reply
    for up to ``REPLY_SPIN`` before it sleeps; when more than half the
    replies of a window of ``SPIN_WINDOW`` polls come later (here: a
    server paused by ``CLIENT PAUSE``), the next ``SPIN_PAUSE`` reads do
    not poll, twice as many after another such window, and as few again
    after a window that paid.  Every read gets its reply either way."""
    import uuid

    import redis

    from ormcache import OrmCache, _store

    region = {"backend": "redis", "backend_timeout": 2.0, "arguments": {"url": redis_url}}
    cache = OrmCache.from_settings({"namespace": "sp" + uuid.uuid4().hex[:8], "regions": {"r": region}})
    admin = redis.Redis.from_url(redis_url)
    key = "ormcache-test-spin-" + uuid.uuid4().hex[:8]
    admin.set(key, b"v", ex=60)
    store = cache._stores["r"]
    reader = store._mget
    assert isinstance(reader, _store._RedisReader)
    # in time: within 30 ms; late: a server paused for 60 ms
    reader.spin = 0.03
    monkeypatch.setattr(_store, "SPIN_WINDOW", 4)
    monkeypatch.setattr(_store, "SPIN_PAUSE", 2)

    def read(late: bool = False) -> None:
        if late:
            admin.client_pause(60)  # milliseconds: every client's next command waits
        assert store._fetch([key]) == [b"v"]

    try:
        for late in (False, True, True):
            read(late)
        assert (reader._spin_polls, reader._spin_misses) == (3, 2)
        read()  # half the window late: polling goes on, a new window starts
        assert (reader._spin_polls, reader._spin_misses, reader._spin_pause) == (0, 0, 0)
        for late in (True, True, True, False):
            read(late)
        assert (reader._spin_pause, reader._spin_polls, reader._spin_misses) == (2, 0, 0)
        read()
        assert reader._spin_pause == 1 and reader._spin_polls == 0
        read()
        for late in (True, True, True, True):  # polling again: late again
            read(late)
        assert reader._spin_pause == 4
        for _ in range(4):
            read()
        assert reader._spin_pause == 0
        for late in (False, False, False, False):  # a window that paid
            read(late)
        assert reader._spin_backoff == _store.SPIN_PAUSE
    finally:
        admin.delete(key)
        admin.close()
        cache.close()


def test_reply_poll_setting(redis_url: str) -> None:
    """``reply_poll`` sets how long a redis region's commands poll for their
    reply: ``false`` never polls (reads still get their replies); regions
    on one pool share its reads' connections, and the last set wins (a
    region that does not set it changes nothing)."""
    import uuid

    import redis

    from ormcache import OrmCache

    def cache_with(**region: Any) -> Any:
        spec = {"backend": "redis", "arguments": {"url": redis_url}, **region}
        return OrmCache.from_settings({"namespace": "rp" + uuid.uuid4().hex[:8], "regions": {"r": spec}})

    off = cache_with(reply_poll=False)
    try:
        reader = off._stores["r"]._mget
        assert reader.spin == 0
        for _ in range(3):
            assert off._stores["r"]._fetch(["ormcache-test-absent"]) == [None]
        assert reader._spin_polls == 0
    finally:
        off.close()

    on = cache_with(reply_poll="0.0005")
    try:
        reader = on._stores["r"]._mget
        assert reader.spin == 0.0005
        assert on._stores["r"]._fetch(["ormcache-test-absent"]) == [None]
        assert reader._spin_polls == 1
        assert on._stores["r"]._token_writer._redis.spin == 0.0005
    finally:
        on.close()

    pool = redis.ConnectionPool.from_url(redis_url)
    shared = [cache_with(reply_poll=p, arguments={"connection_pool": pool}) for p in (0.0002, 0.00005, 0.001)]
    shared.append(cache_with(arguments={"connection_pool": pool}))
    try:
        assert shared[0]._stores["r"]._mget is shared[3]._stores["r"]._mget
        assert shared[0]._stores["r"]._mget.spin == 0.001
    finally:
        for cache in shared:
            cache.close()
        pool.disconnect()


def test_l1_keeps_plain_rows_decoded(redis_url: str, tmp_path: Any) -> None:
    """An entry of a Redis region is pickled; its copy in the region's L1
    is decoded by the first hit that reads it there and kept decoded when
    its rows are plain values (later hits skip unpickling), counted at an
    estimate of the objects' size.  Every hit still builds new objects
    from it."""
    import uuid

    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache, OrmCache
    from ormcache.core import _AS_IS, _ENCODING, _PICKLED
    from ormcache.testing.fixtures import Base, Template, seed

    engine = create_engine(f"sqlite:///{tmp_path}/l1d.db")
    Base.metadata.create_all(engine)
    seed(engine)
    region = {"backend": "redis", "l1": {"max_entries": 100, "max_bytes": 10**6}, "arguments": {"url": redis_url}}
    cache = OrmCache.from_settings({"namespace": "ld" + uuid.uuid4().hex[:8], "regions": {"r": region}})
    maker = sessionmaker(engine)
    cache.attach(maker)
    l1 = cache._stores["r"].l1
    stmt = select(Template).where(Template.id == 1).options(FromCache("r"))

    def read() -> Template:
        with maker() as s:
            return s.scalars(stmt).one()

    try:
        first = read()  # a miss: stored, in Redis and the L1
        [(entry, size)] = l1._data.values()
        assert entry[_ENCODING] == _PICKLED
        bytes_before = l1.bytes
        second = read()  # a hit from the L1: decoded, and kept so
        [(entry, size_after)] = l1._data.values()
        assert entry[_ENCODING] == _AS_IS
        assert size_after > size and l1.bytes == bytes_before - size + size_after  # (objects take more)
        third = read()
        assert first.name == second.name == third.name
        assert second.body == third.body and second.body is not third.body
    finally:
        cache.close()
        engine.dispose()


def test_l1_counts_decoded_copies_against_max_bytes() -> None:
    """A copy kept decoded is counted at its new size, and ``max_bytes``
    evicts the least recently used copies to make room for it."""
    from ormcache._store import L1

    l1 = L1(10, max_bytes=1000)
    old_a, old_b = (0, (), None, b"x" * 300, 1), (0, (), None, b"y" * 300, 1)
    l1["a"], l1["b"] = old_a, old_b
    assert l1.bytes == 2 * (300 + 64)
    assert l1.get("a") is old_a  # a hit: "a" is the most recently used
    decoded = (0, (), None, (("x" * 300,),), 0)
    l1.replace("a", old_a, decoded, 800)
    assert l1.get("b") is None and l1.get("a") is decoded and l1.bytes == 800
    l1.replace("a", old_a, (), 10)  # "a" holds another copy by now: nothing
    assert l1.get("a") is decoded and l1.bytes == 800


def test_reader_packs_keys_as_the_connection_would(redis_url: str) -> None:
    """The reader packs ``MGET`` itself (hiredis) only where redis-py would
    send the same bytes: a ``key_mangler`` that makes non-ASCII keys, on a
    client whose ``encoding`` is latin-1, reads the keys its writes wrote."""
    import uuid

    from dogpile.cache import make_region
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from ormcache._store import Store, _RedisReader

    prefix = "\u00e9" + uuid.uuid4().hex[:8] + ":"
    region = make_region(key_mangler=lambda key: prefix + key).configure(
        "dogpile.cache.redis",
        arguments={
            "url": redis_url,
            "connection_kwargs": {"encoding": "latin-1", "retry": Retry(NoBackoff(), 0)},
        },
    )
    store = Store("r", region)
    assert isinstance(store._mget, _RedisReader) and store._mget._pack is not None
    client = region.backend.writer_client
    try:
        store._write_tokens({"tok": "t1"})
        assert client.get(prefix + "tok") == b"t1"
        assert store._read_tokens(["tok"]) == ["t1"]
    finally:
        client.delete(prefix + "tok")


def test_reader_polls_only_sockets_of_the_os(redis_url: str) -> None:
    """fakeredis' sockets make up their file descriptor numbers: the
    reader never polls them (it could wait on another socket of the
    process); a connection closed between the send and the poll is only
    not polled that once."""
    import select

    import fakeredis
    import redis

    from ormcache import _store

    pool = redis.ConnectionPool(connection_class=fakeredis.FakeRedisConnection, server=fakeredis.FakeServer())
    redis.Redis(connection_pool=pool).set("k", b"v")
    fake = _store._RedisReader(pool, 4)
    assert fake(["k"]) == [b"v"]
    assert fake._can_poll is False and fake._spin_polls == 0

    real_pool = redis.ConnectionPool.from_url(redis_url)
    reader = _store._RedisReader(real_pool, 4)
    try:
        assert reader(["ormcache-test-absent"]) == [None]
        assert reader._can_poll is True and reader._spin_polls == 1
        conn = reader._free[-1]
        real = select.poll

        def poll_after_close() -> Any:
            conn.disconnect()  # as another thread's pool.disconnect() would
            return real()

        _store._poll, saved = poll_after_close, _store._poll
        try:
            with pytest.raises(redis.ConnectionError):
                reader(["ormcache-test-absent"])
        finally:
            _store._poll = saved
        assert reader(["ormcache-test-absent"]) == [None]  # reconnected
        assert reader._can_poll is True and reader._spin_pause == 0 and reader._spin_polls == 2
    finally:
        reader.close()
        real_pool.disconnect()


def test_one_reader_per_pool(redis_url: str, tmp_path: Any) -> None:
    """Caches over one pool (dogpile's ``connection_pool`` argument, or
    caches made and closed in turn) share its reader: together they never
    keep more than a quarter of it, and a closed cache gives its
    connections back."""
    import uuid

    import redis

    from ormcache import OrmCache

    pool = redis.ConnectionPool.from_url(redis_url, max_connections=8)
    client = redis.Redis(connection_pool=pool)
    prefix = "ormcache-test-reader-" + uuid.uuid4().hex[:8]
    client.set(prefix, b"v", ex=60)
    settings = {
        "namespace": "rp" + uuid.uuid4().hex[:8],
        "regions": {"r": {"backend": "redis", "arguments": {"connection_pool": pool}}},
    }
    try:
        caches = [OrmCache.from_settings(settings) for _ in range(3)]
        readers = {id(cache._stores["r"]._mget) for cache in caches}
        assert len(readers) == 1
        for cache in caches:
            assert cache._stores["r"]._fetch([prefix]) == [b"v"]
            cache.close()
        for _ in range(6):  # made, used and closed in turn
            cache = OrmCache.from_settings(settings)
            assert cache._stores["r"]._fetch([prefix]) == [b"v"]
            cache.close()
        assert len(pool._in_use_connections) == 0
        assert client.get(prefix) == b"v"
    finally:
        client.delete(prefix)
        pool.disconnect()


def test_rotating_credentials_read_through_the_client(redis_url: str) -> None:
    """A token provider (``StreamingCredentialProvider``, as for Entra ID)
    renews a connection's credentials when it goes back to the pool, which
    kept connections never do: such regions read through the client."""
    import uuid

    from redis.credentials import StreamingCredentialProvider  # redis-py 6+ (make test-oldest leaves it out)

    class Tokens(StreamingCredentialProvider):
        def get_credentials(self) -> tuple[str]:
            return ("",)

        async def get_credentials_async(self) -> tuple[str]:
            return ("",)

        def on_next(self, callback: Any) -> None:
            pass

        def on_error(self, callback: Any) -> None:
            pass

        def is_streaming(self) -> bool:
            return True

    from ormcache import OrmCache

    cache = OrmCache.from_settings(
        {
            "namespace": "rc" + uuid.uuid4().hex[:8],
            "regions": {
                "r": {
                    "backend": "redis",
                    "arguments": {"url": redis_url, "connection_kwargs": {"credential_provider": Tokens()}},
                }
            },
        }
    )
    try:
        assert cache._stores["r"]._mget is None
    finally:
        cache.close()


def test_regions_that_retry_read_through_the_client(redis_url: str, tmp_path: Any) -> None:
    """``backend_timeout = false`` keeps redis-py's retries: reads go
    through the client, which retries them."""
    import uuid

    from ormcache import OrmCache

    cache = OrmCache.from_settings(
        {
            "namespace": "rr" + uuid.uuid4().hex[:8],
            "regions": {"r": {"backend": "redis", "backend_timeout": False, "arguments": {"url": redis_url}}},
        }
    )
    try:
        assert cache._stores["r"]._mget is None
    finally:
        cache.close()


def test_reads_without_should_reconnect(redis_url: str, tmp_path: Any) -> None:
    """redis-py before 7 has no ``Connection.should_reconnect()``
    (``redis>=5`` is supported): reads still work."""
    import redis

    from ormcache._store import _needs_command_name, _RedisReader

    class OldConnection:  # a redis-py 6 connection: the same, but that method
        def __init__(self, conn: Any) -> None:
            self._conn = conn

        def __getattr__(self, name: str) -> Any:
            if name == "should_reconnect":
                raise AttributeError(name)
            return getattr(self._conn, name)

    client = redis.Redis.from_url(redis_url)
    client.set("ormcache-test-old-conn", b"v", ex=60)
    pool = client.connection_pool
    reader = _RedisReader(pool, 1)
    # (redis-py before 5.3 wants a command name)
    conn = pool.get_connection("MGET") if _needs_command_name(pool) else pool.get_connection()
    reader._free.append(OldConnection(conn))
    reader._count = 1
    try:
        assert reader(["ormcache-test-old-conn", "ormcache-test-absent"]) == [b"v", None]
        assert reader(["ormcache-test-old-conn"]) == [b"v"]
    finally:
        client.close()


def test_hits_in_threads_at_once_use_a_connection_each(redis_url: str, tmp_path: Any) -> None:
    """Readers at the same time never share a connection (their replies
    would cross); the free list grows to the number of readers at once (8
    at most), not of reads."""
    engine, cache, name = _one_region(redis_url, tmp_path)
    store = cache._stores["r"]
    for tid in range(1, 9):
        name(tid)
    try:
        assert _read_at_once(name, range(1, 9)) == []
        assert 1 <= len(store._mget._free) <= store._mget.limit
        assert len(set(map(id, store._mget._free))) == len(store._mget._free)
    finally:
        cache.close()
        engine.dispose()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_reads_on_connections_of_its_own(redis_url: str, tmp_path: Any) -> None:
    """Read connections made before a fork are the parent's: the child
    drops them (two processes on one socket would read each other's
    replies) and borrows its own; the parent keeps reading on its."""
    import os

    engine, cache, name = _one_region(redis_url, tmp_path)
    store = cache._stores["r"]
    try:
        name(1)
        name(1)
        parents = list(store._mget._free)
        assert len(parents) == 1
        pid = os.fork()
        if pid == 0:  # the child
            ok = store._mget._free == [] and store._mget._count == 0
            ok = ok and name(1) == "t1" and name(2) == "t2"
            ok = ok and len(store._mget._free) == 1 and store._mget._free[0] is not parents[0]
            os._exit(0 if ok and store._failures == 0 else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert name(1) == "t1" and store._mget._free == parents and store._failures == 0
    finally:
        cache.close()
        engine.dispose()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_child_forked_without_hooks_reads_on_its_own(redis_url: str, tmp_path: Any) -> None:
    """uWSGI forks its workers with libc's ``fork()``, which runs none of
    Python's fork hooks: the child still finds the parent's connections in
    the reader, and must not read on them (the two processes would read
    each other's replies)."""
    import ctypes
    import os

    engine, cache, name = _one_region(redis_url, tmp_path)
    store = cache._stores["r"]
    reader = store._mget
    try:
        name(1)
        name(1)
        parents = list(reader._free)
        libc = ctypes.CDLL(None, use_errno=True)
        pid = libc.fork()
        if pid == 0:  # the child, without os.register_at_fork's hooks
            code = 1
            try:
                seen = reader._free == parents  # the hooks did not run
                ok = name(2) == "t2" and name(1) == "t1"
                fresh = parents[0] not in reader._free and reader._pid == os.getpid()
                code = 0 if seen and ok and fresh else 1
            finally:
                os._exit(code)
        assert pid > 0
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert name(1) == "t1" and reader._free == parents and store._failures == 0
    finally:
        cache.close()
        engine.dispose()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_retries_every_regions_lost_invalidations(
    redis_url: str, monkeypatch: Any
) -> None:
    """Lost invalidations are retried in a forked child for every region,
    with or without a Redis reader (the fork hook once retried only the
    last region it had seen)."""
    import os
    import uuid

    from ormcache import OrmCache
    from ormcache._store import Store

    cache = OrmCache.from_settings(
        {
            "namespace": "fr" + uuid.uuid4().hex[:8],
            "regions": {
                "m": {"backend": "memory"},
                "a": {"backend": "redis", "arguments": {"url": redis_url}},
                "b": {"backend": "redis", "arguments": {"url": redis_url}},
            },
        }
    )
    started: list[Any] = []
    monkeypatch.setattr(Store, "_start_retrying", lambda self: started.append(self))
    try:
        for store in cache._stores.values():
            store._lost = {"k"}  # as after an invalidation the backend refused
        pid = os.fork()
        if pid == 0:  # the child: the fork hook has run
            # (stores of other caches of this process may have lost some too)
            ours = [s for s in started if s in cache._stores.values()]
            os._exit(0 if len(ours) == 3 and len({id(s) for s in ours}) == 3 else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        for store in cache._stores.values():
            store._lost = set()
        cache.close()


def test_a_dropped_cache_lets_its_pool_go(redis_url: str) -> None:
    """The reader lives on its pool: a cache dropped without ``close()``,
    its pool and the connections the reader kept are collected."""
    import gc
    import uuid
    import weakref

    import redis

    from ormcache import OrmCache

    def used_and_dropped() -> Any:
        pool = redis.ConnectionPool.from_url(redis_url)
        cache = OrmCache.from_settings(
            {
                "namespace": "rd" + uuid.uuid4().hex[:8],
                "regions": {"r": {"backend": "redis", "arguments": {"connection_pool": pool}}},
            }
        )
        cache._stores["r"]._fetch(["ormcache-test-absent"])  # borrows a connection
        assert len(cache._stores["r"]._mget._free) == 1
        return weakref.ref(pool), weakref.ref(cache._stores["r"]._mget)

    pool, reader = used_and_dropped()
    gc.collect()
    assert pool() is None and reader() is None


def test_reads_keep_to_the_client_where_it_must_see_every_command(redis_url: str, tmp_path: Any) -> None:
    """A ``BlockingConnectionPool`` (dogpile's ``connection_pool``
    argument) caps the connections: reads stay on the client, and hit as
    before.  (redis-py's ``set_retry`` fails on such a pool: the region
    could not be built at all.)"""
    import redis

    from ormcache.testing import QueryCounter

    from ormcache._store import _retries

    pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=2)
    engine, cache, name = _one_region(redis_url, tmp_path, connection_pool=pool)
    store = cache._stores["r"]
    try:
        assert store._mget is None
        assert _retries(pool.connection_kwargs["retry"]) == 0  # backend_timeout's "no retries"
        name(1)
        with QueryCounter(engine) as c:
            assert name(1) == "t1"
        assert c.selects == 0
    finally:
        cache.close()
        engine.dispose()
        pool.disconnect()


def test_relaxed_l1_gives_up_a_silent_subscription() -> None:
    """A server that stops answering without closing anything (a
    partition, a half-open socket after a failover; here a stopped
    process) raises nothing on the subscription: an unanswered PING gives
    it up within LIVENESS seconds, after which hits are validated against
    Redis (and fall back to the database while it does not answer)."""
    import os
    import signal
    import time
    import uuid

    import consistency_checker as cc

    from ormcache import OrmCache
    from ormcache._pubsub import LIVENESS, PING_EVERY

    if not cc.PrivateServer.available("redis"):
        from servers import unavailable

        unavailable("redis-server is not on PATH: cannot run a private Redis")
    server = cc.PrivateServer("redis")
    server.start()
    assert server.proc is not None
    region = {"backend": "redis", "l1": {"max_entries": 10, "mode": "relaxed"}, "arguments": {"url": server.url}}
    cache = OrmCache.from_settings({"namespace": "sl" + uuid.uuid4().hex[:8], "regions": {"r": region}})
    subscriber = cache._stores["r"].subscriber
    assert subscriber is not None

    def wait_for(healthy: bool, seconds: float) -> float:
        started = time.monotonic()
        while subscriber.healthy is not healthy:
            assert time.monotonic() - started < seconds, f"healthy is still {not healthy}"
            time.sleep(0.01)
        return time.monotonic() - started

    try:
        wait_for(True, 5)
        subscriber.tokens["some:key"] = "t"
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            assert wait_for(False, LIVENESS + 2 * PING_EVERY + 1) <= LIVENESS + 2 * PING_EVERY + 1
            assert subscriber.tokens == {}
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        wait_for(True, 10)  # and it follows the channel again
    finally:
        cache.close()
        server.close()


def test_own_token_writes_never_put_back_an_older_token(redis_url: str, monkeypatch: Any) -> None:
    """A relaxed L1's process writes a token, and before it records it
    locally a message brings a newer one that another process wrote: the
    older one must not overwrite it (its own writes are read back from
    Redis instead of taken as current)."""
    import time
    import uuid

    from ormcache import OrmCache

    region = {"backend": "redis", "l1": {"max_entries": 10, "mode": "relaxed"}, "arguments": {"url": redis_url}}
    cache = OrmCache.from_settings({"namespace": "ow" + uuid.uuid4().hex[:8], "regions": {"r": region}})
    store = cache._stores["r"]
    subscriber = store.subscriber
    assert subscriber is not None
    deadline = time.monotonic() + 5
    while not subscriber.healthy:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    key = cache._keys.model("probe")
    backend = store.region.backend
    write = backend.set_serialized_multi

    def written_then_overtaken(mapping: Any) -> None:
        write(mapping)
        subscriber.apply({key: "newer"})  # another process's, arrived meanwhile

    monkeypatch.setattr(store, "_token_writer", None)  # (through the backend)
    monkeypatch.setattr(backend, "set_serialized_multi", written_then_overtaken)
    monkeypatch.setattr(store, "publish_channel", None)
    try:
        store.set_many({key: "older"})
        assert subscriber.tokens.get(key) != "older"
    finally:
        cache.close()


def test_relaxed_l1_messages_name_keys_as_ormcache_does(redis_url: str) -> None:
    """A region given with a ``key_mangler``: its messages carry ormcache's
    own key names, which a relaxed L1 (here another process's) looks its
    tokens up by."""
    import time
    import uuid

    from dogpile.cache import make_region

    from ormcache import OrmCache, load_settings

    settings = load_settings(
        {
            "namespace": "km" + uuid.uuid4().hex[:8],
            "regions": {"r": {"backend": "redis", "l1": {"max_entries": 10, "mode": "relaxed"}}},
        }
    )
    caches = []
    for _ in range(2):  # a writer and a reader, each as in a process of its own
        region = make_region(key_mangler=lambda key: "mangled:" + key).configure(
            "dogpile.cache.redis", arguments={"url": redis_url}
        )
        caches.append(OrmCache(settings, regions={"r": region}))
    writer, reader = (c._stores["r"] for c in caches)
    subscriber = reader.subscriber
    assert subscriber is not None
    key = caches[0]._keys.model("probe")
    try:
        deadline = time.monotonic() + 5
        while not (subscriber.healthy and writer.subscriber is not None and writer.subscriber.healthy):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with subscriber._lock:
            subscriber.tokens[key] = "t0"  # as read before
        writer.set_many({key: "t1"})
        while key in subscriber.tokens:  # the writer's message makes it forget
            assert time.monotonic() < deadline, subscriber.tokens
            time.sleep(0.01)
        assert not any(k.startswith("mangled:") for k in subscriber.tokens)
    finally:
        for cache in caches:
            cache.close()


def test_relaxed_l1_message_arriving_late_puts_back_no_token(redis_url: str) -> None:
    """Messages may arrive in another order than their writes (two writers
    on a cluster; a message of an earlier write after this process's own
    write): a message makes the L1 forget its keys' tokens, never sets the
    older token it carries."""
    import time
    import uuid

    from ormcache import OrmCache

    region = {"backend": "redis", "l1": {"max_entries": 10, "mode": "relaxed"}, "arguments": {"url": redis_url}}
    cache = OrmCache.from_settings({"namespace": "lm" + uuid.uuid4().hex[:8], "regions": {"r": region}})
    subscriber = cache._stores["r"].subscriber
    assert subscriber is not None
    try:
        deadline = time.monotonic() + 5
        while not subscriber.healthy:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        key = cache._keys.model("probe")
        subscriber.remember(subscriber.generation, [key], ["t2"])  # the current one, read from Redis
        assert subscriber.tokens[key] == "t2"
        subscriber.apply({key: "t1"})  # an older write's message, late
        assert key not in subscriber.tokens
    finally:
        cache.close()


@pytest.mark.parametrize("signed", [True, False])
def test_a_corrupt_entry_is_a_miss_not_an_outage(redis_url: str, tmp_path: Any, signed: bool) -> None:
    """An entry whose bytes were damaged (its metadata cut, an unsigned
    pickle truncated): a miss that the next fill replaces; the backend
    answered, so nothing counts against it (three such reads used to open
    the region's circuit)."""
    import uuid

    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache, OrmCache
    from ormcache.testing import QueryCounter
    from ormcache.testing.fixtures import Base, Template, seed

    engine = create_engine(f"sqlite:///{tmp_path}/corrupt.db")
    Base.metadata.create_all(engine)
    seed(engine)
    ns = "cr" + uuid.uuid4().hex[:8]
    settings: dict[str, Any] = {"namespace": ns, "regions": {"r": {"backend": "redis", "arguments": {"url": redis_url}}}}
    if signed:
        settings["signing_key"] = "a signing key of enough length"
    cache = OrmCache.from_settings(settings)
    maker = sessionmaker(engine)
    cache.attach(maker)
    client = cache.region("r").backend.writer_client
    stmt = select(Template).where(Template.id == 1).options(FromCache("r"))

    def selects() -> int:
        with QueryCounter(engine) as counter, maker() as s:
            assert s.scalars(stmt).one().name == "t1"
        return counter.selects

    try:
        assert selects() == 1
        (key,) = [k for k in client.keys(f"{ns}:q:*")]
        for _ in range(4):
            client.set(key, client.get(key)[3:] if signed else client.get(key)[:-5])
            assert selects() == 1
        assert selects() == 0  # stored again
        assert cache.stats()["regions"]["r"]["errors"] == 0
        assert not cache._stores["r"]._open_until
    finally:
        cache.close()
        engine.dispose()


def test_an_acl_user_without_scripts_keeps_caching_and_invalidating(tmp_path: Any, caplog: Any) -> None:
    """A Redis user refused EVAL and EVALSHA (NOPERM): dogpile's lock cannot
    be released by redis-py's script, and version tokens cannot be merged by
    ormcache's.  Neither is an outage: in-process locks and tokens merged by
    reading and writing them, one warning each, and writes still seen."""
    import logging
    import uuid

    import redis
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import sessionmaker
    from test_degradation import _private_server

    from ormcache import FromCache, OrmCache
    from ormcache.testing import QueryCounter
    from ormcache.testing.fixtures import Base, Template, seed

    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    seed(engine)
    with _private_server("redis") as (_, address):
        admin = redis.Redis.from_url(f"redis://{address}/0")
        admin.execute_command("ACL", "SETUSER", "noscripts", "on", ">pw", "~*", "&*", "+@all", "-eval", "-evalsha")
        admin.close()
        cache = OrmCache.from_settings(
            {
                "namespace": "acl" + uuid.uuid4().hex[:8],
                "regions": {"r": {"backend": "redis", "arguments": {"url": f"redis://noscripts:pw@{address}/0"}}},
            }
        )
        Session = sessionmaker(engine)
        cache.attach(Session)
        stmt = select(Template).where(Template.name.like("t%")).order_by(Template.id).options(FromCache("r"))

        def names() -> tuple[list[str], int]:
            with QueryCounter(engine) as counter, Session() as s:
                found = [t.name for t in s.scalars(stmt)]
            return found, counter.selects

        try:
            with caplog.at_level(logging.WARNING, logger="ormcache"):
                first, _ = names()
                assert names() == (first, 0)
                for i in range(3):
                    with Session() as s:
                        s.get_one(Template, 1).name = f"t1-{i}"
                        s.commit()
                    assert names() == ([f"t1-{i}", *first[1:]], 1)
                    assert names()[1] == 0
                cache.invalidate(Template)
                assert names()[1] == 1
            store = cache._stores["r"]
            assert store.available and store._failures == 0 and not store._lost and not store._lost_releases
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warnings) == 2, warnings
            assert any("cannot release a distributed lock" in w for w in warnings), warnings
            assert any("runs no scripts" in w for w in warnings), warnings
        finally:
            cache.close()
            engine.dispose()


@pytest.mark.parametrize("garbage", [b"not json {", b"123", b"null", b"[1, 2]"])
def test_a_message_that_is_not_ormcaches_keeps_the_subscription(redis_url: str, garbage: bytes) -> None:
    """Anyone may publish on the channel: a message ormcache cannot read
    makes the relaxed L1 forget its tokens (it may stand for any write),
    and the subscription stays healthy (it did not before: relaxed mode
    was off for good, every hit a round trip, nothing logged)."""
    import time

    import redis

    from ormcache._pubsub import channel_name

    cache = _relaxed(redis_url, "gb")
    namespace = cache.settings.namespace
    subscriber = cache._stores["r"].subscriber
    client = redis.Redis.from_url(redis_url)
    try:
        subscriber.tokens["k"] = "t"
        generation = subscriber.generation
        client.publish(channel_name(namespace, "r"), garbage)
        deadline = time.monotonic() + 5
        while subscriber.generation == generation and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "k" not in subscriber.tokens
        time.sleep(0.1)
        assert subscriber.healthy
    finally:
        client.close()
        cache.close()

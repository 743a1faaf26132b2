"""A cache backend that fails: queries go to the database, writes go on,
the circuit breaker keeps away from it, and invalidations lost during the
outage are written when it answers again."""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from dogpile.cache import make_region
from dogpile.cache.api import NO_VALUE
from dogpile.cache.proxy import ProxyBackend
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from ormcache import FromCache, OrmCache, invalidation, load_settings
from ormcache.testing import QueryCounter
from ormcache.testing.fixtures import Base, Template, seed
from ormcache._store import _retries
from servers import closed_port, count_redis_commands


def _lock_name(backend: Any, key: str) -> str:
    """The key of dogpile's Redis lock for ``key`` (``lock_template`` from
    dogpile 1.5; "_lock" + key before)."""
    return str(getattr(backend, "lock_template", "_lock{0}").format(key))


class Switch(ProxyBackend):
    """A backend that can be turned off, and counts the calls it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("backend is down")

    def get_multi(self, keys: Any) -> Any:
        self._check()
        return self.proxied.get_multi(keys)

    def get_serialized_multi(self, keys: Any) -> Any:
        self._check()
        return self.proxied.get_serialized_multi(keys)

    def set(self, key: Any, value: Any) -> None:
        self._check()
        self.proxied.set(key, value)

    def set_multi(self, mapping: Any) -> None:
        self._check()
        self.proxied.set_multi(mapping)

    def set_serialized(self, key: Any, value: Any) -> None:
        self._check()
        self.proxied.set_serialized(key, value)

    def set_serialized_multi(self, mapping: Any) -> None:
        self._check()
        self.proxied.set_serialized_multi(mapping)

    def delete(self, key: Any) -> None:
        self._check()
        self.proxied.delete(key)


@pytest.fixture
def env(tmp_path: Any) -> Iterator[tuple[Any, Any, OrmCache, Switch]]:
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    seed(engine)
    switch = Switch()
    region = make_region().configure("dogpile.cache.memory_pickle", wrap=[switch])
    settings = load_settings(
        {"namespace": "dg" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}}
    )
    cache = OrmCache(settings, regions={"default": region})
    store = cache._stores["default"]
    store.retry_after = 0.0  # probe at once, so that tests need not wait
    maker = sessionmaker(engine)
    cache.attach(maker)
    yield engine, maker, cache, switch
    cache.close()
    engine.dispose()


def wait_until_available(cache: OrmCache) -> None:
    """The circuit closes when the background probe gets an answer; and
    the invalidations lost meanwhile are written (until then reads go to
    the database and store nothing: on a loaded machine the replay may
    still be in flight when the circuit has closed)."""
    import time

    store = cache._stores["default"]
    deadline = time.monotonic() + 5
    while not store.available or store._lost or store._lost_all or store._replaying.locked():
        assert time.monotonic() < deadline, "the circuit never closed, or the lost invalidations were never written"
        time.sleep(0.01)


def name_and_selects(engine: Any, maker: Any) -> tuple[str, int]:
    stmt = select(Template).where(Template.id == 1).options(FromCache())
    with QueryCounter(engine) as c, maker() as s:
        name = s.scalars(stmt).one().name
    return name, c.selects


def test_queries_and_writes_work_while_down(env: Any, caplog: Any) -> None:
    engine, maker, cache, switch = env
    switch.down = True
    with caplog.at_level(logging.WARNING, logger="ormcache"):
        for _ in range(5):
            assert name_and_selects(engine, maker) == ("t1", 1)
        with maker() as s:
            s.get(Template, 1).name = "written while down"
            s.commit()
    assert name_and_selects(engine, maker) == ("written while down", 1)
    # (this thread's: other tests' stores may still be retrying lost
    # invalidations in threads of their own, and log from there)
    warnings = [r for r in caplog.records if r.name == "ormcache" and r.thread == threading.get_ident()]
    assert len(warnings) == 1 and "using the database" in warnings[0].getMessage()


def test_circuit_opens(env: Any) -> None:
    engine, maker, cache, switch = env
    store = cache._stores["default"]
    store.retry_after = 3600.0
    switch.down = True
    for _ in range(10):
        name_and_selects(engine, maker)
    assert switch.calls == store.failure_threshold
    assert not store.available


def test_lost_invalidation_is_written_after_recovery(env: Any) -> None:
    engine, maker, cache, switch = env
    # a proxied backend offers no atomic add: the first miss only creates
    # the version tokens, the second stores the result
    assert name_and_selects(engine, maker) == ("t1", 1)
    assert name_and_selects(engine, maker) == ("t1", 1)
    assert name_and_selects(engine, maker) == ("t1", 0)
    switch.down = True
    with maker() as s:
        s.get(Template, 1).name = "changed during outage"
        s.commit()
    switch.down = False
    # the entry stored before the outage is still in the backend, and the
    # invalidation never reached it: it must not be served, whether the
    # circuit is still open (the database answers) or closed again
    assert name_and_selects(engine, maker)[0] == "changed during outage"
    wait_until_available(cache)
    assert name_and_selects(engine, maker) == ("changed during outage", 1)
    assert name_and_selects(engine, maker) == ("changed during outage", 0)


def test_lost_explicit_invalidation_raises_and_is_replayed(env: Any) -> None:
    from ormcache import BackendError

    engine, maker, cache, switch = env
    name_and_selects(engine, maker)
    switch.down = True
    with pytest.raises(BackendError, match="region 'default'"):
        cache.invalidate(Template)
    switch.down = False
    wait_until_available(cache)
    assert name_and_selects(engine, maker) == ("t1", 1)


def test_redis_regions_get_socket_timeouts(redis_url: str, monkeypatch: Any) -> None:
    monkeypatch.delenv("ORMCACHE_BACKEND_TIMEOUT", raising=False)
    cache = OrmCache.from_settings(
        {
            "regions": {
                "r": {"backend": "redis", "arguments": {"url": redis_url}},
                "slow": {"backend": "redis", "arguments": {"url": redis_url}, "backend_timeout": 0.1},
                "own": {
                    "backend": "redis",
                    "arguments": {"url": redis_url, "socket_timeout": 2},
                },
                "off": {"backend": "redis", "arguments": {"url": redis_url}, "backend_timeout": False},
            }
        }
    )
    try:

        def kwargs(name: str) -> Any:
            return cache.region(name).backend.writer_client.connection_pool.connection_kwargs

        assert kwargs("r")["socket_timeout"] == 0.003
        assert kwargs("r")["socket_connect_timeout"] == 0.003
        assert kwargs("slow")["socket_timeout"] == 0.1
        assert kwargs("own")["socket_timeout"] == 2  # the arguments win
        assert kwargs("own")["socket_connect_timeout"] == 0.003
        assert kwargs("off").get("socket_timeout") is None
    finally:
        cache.close()


def test_shared_regions_get_a_distributed_lock(redis_url: str) -> None:
    cache = OrmCache.from_settings(
        {
            "regions": {
                "r": {"backend": "redis", "arguments": {"url": redis_url}},
                "m": {"backend": "memcached", "arguments": {"url": "127.0.0.1:11211"}},
                "off": {"backend": "redis", "arguments": {"url": redis_url, "distributed_lock": False}},
                "own": {"backend": "redis", "arguments": {"url": redis_url, "lock_timeout": 5}},
                "local": {"backend": "memory"},
            }
        }
    )
    try:
        r = cache.region("r").backend
        assert r.distributed_lock and r.lock_timeout == 30 and not r.thread_local_lock
        assert cache.region("m").backend.distributed_lock
        assert cache.region("m").backend.lock_timeout == 30
        assert not cache.region("off").backend.distributed_lock
        assert cache.region("own").backend.lock_timeout == 5
        # threads queue on a local lock before one of them asks Redis
        store = cache._stores["r"]
        mutex = store.mutex("k")
        assert mutex.acquire(False)
        other = store.mutex("k")
        assert not other.acquire(False)
        backend = cache.region("r").backend
        assert backend.writer_client.exists(_lock_name(backend, "k"))
        mutex.release()
        assert other.acquire(False)
        other.release()
        assert type(cache._stores["local"].mutex("k")).__name__ == "_LockWrapper"
    finally:
        cache.close()


def test_memcached_regions_get_timeouts(monkeypatch: Any) -> None:
    import pylibmc  # noqa: F401  (the dev extra's: a missing driver fails, not skips)
    monkeypatch.delenv("ORMCACHE_BACKEND_TIMEOUT", raising=False)
    cache = OrmCache.from_settings(
        {
            "regions": {
                "m": {"backend": "memcached", "arguments": {"url": "127.0.0.1:11211"}},
                "own": {
                    "backend": "memcached",
                    "arguments": {"url": "127.0.0.1:11211", "behaviors": {"connect_timeout": 50}},
                },
            }
        }
    )
    try:
        behaviors = cache.region("m").backend.behaviors
        assert behaviors["connect_timeout"] == 3 and behaviors["_poll_timeout"] == 3
        assert behaviors["receive_timeout"] == 3000 and behaviors["send_timeout"] == 3000
        assert cache.region("own").backend.behaviors["connect_timeout"] == 50
    finally:
        cache.close()


def test_a_hanging_backend_costs_a_query_its_timeout_then_nothing(
    tmp_path: Any, caplog: Any, monkeypatch: Any
) -> None:
    """A Redis that accepts connections and never answers: queries are
    answered by the database and the circuit opens (the added time per
    query is measured by ``python -m bench.degraded``)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)  # never accepted, never answered
    port = listener.getsockname()[1]
    monkeypatch.delenv("ORMCACHE_BACKEND_TIMEOUT", raising=False)  # the default
    engine = create_engine(f"sqlite:///{tmp_path}/hang.db")
    Base.metadata.create_all(engine)
    seed(engine)
    cache = OrmCache.from_settings(
        {
            "namespace": "hg" + uuid.uuid4().hex[:8],
            "regions": {"r": {"backend": "redis", "arguments": {"url": f"redis://127.0.0.1:{port}/0"}}},
        }
    )
    maker = sessionmaker(engine)
    cache.attach(maker)
    stmt = select(Template).where(Template.id == 1).options(FromCache("r"))
    try:
        with caplog.at_level(logging.WARNING, logger="ormcache"):
            for _ in range(5):
                with QueryCounter(engine) as counter, maker() as s:
                    assert s.scalars(stmt).one().id == 1
                assert counter.selects == 1
            with maker() as s:
                s.get(Template, 1).name = "written while the cache hangs"
                s.commit()
        assert not cache._stores["r"].available
        assert any("TimeoutError" in r.getMessage() for r in caplog.records)
    finally:
        cache.close()
        listener.close()
        engine.dispose()


def test_log_records_carry_structured_fields(env: Any, caplog: Any) -> None:
    engine, maker, cache, switch = env
    switch.down = True
    with caplog.at_level(logging.WARNING, logger="ormcache"):
        name_and_selects(engine, maker)
    record = next(r for r in caplog.records if r.name == "ormcache" and r.thread == threading.get_ident())
    fields = record.ormcache  # type: ignore[attr-defined]
    assert fields["region"] == "default" and fields["event"] == "backend_failed"
    assert fields["operation"] == "read" and fields["error"] == "ConnectionError"


def test_open_circuit_keeps_queries_off_the_backend(env: Any) -> None:
    """Once open, no query touches the backend: the background probe does,
    and closes the circuit when the backend answers."""
    engine, maker, cache, switch = env
    store = cache._stores["default"]
    store.retry_after = 0.2
    switch.down = True
    for _ in range(store.failure_threshold):
        name_and_selects(engine, maker)
    calls = switch.calls
    for _ in range(20):
        assert name_and_selects(engine, maker) == ("t1", 1)
    assert switch.calls == calls  # the queries did not try it
    switch.down = False
    wait_until_available(cache)
    assert switch.calls > calls  # the probe did


@contextmanager
def redis_region(arguments: dict[str, Any]) -> Iterator[tuple[OrmCache, Any, Any]]:
    """An OrmCache with one Redis region ``r`` (default settings: the
    distributed lock): the cache, its ormcache store and its backend."""
    cache = OrmCache.from_settings({"regions": {"r": {"backend": "redis", "arguments": arguments}}})
    try:
        yield cache, cache._stores["r"], cache.region("r").backend
    finally:
        cache.close()


def fakeredis_arguments() -> dict[str, Any]:
    """Region arguments for a fresh fakeredis server."""
    import fakeredis
    import redis

    server = fakeredis.FakeServer()
    return {"connection_pool": redis.ConnectionPool(connection_class=fakeredis.FakeRedisConnection, server=server)}


def test_a_redis_without_lua_falls_back_to_local_locks(caplog: Any) -> None:
    """redis-py releases its lock with a Lua script; fakeredis without
    ``lupa`` has none.  The held lock is dropped and the region keeps to
    in-process locks, instead of leaving waiters until it expires."""
    with redis_region(fakeredis_arguments()) as (cache, store, backend):
        mutex = store.mutex("k")
        assert mutex.acquire(False)
        assert backend.writer_client.exists(_lock_name(backend, "k"))
        with caplog.at_level(logging.WARNING, logger="ormcache"):
            mutex.release()
        if backend.distributed_lock:  # this fakeredis runs Lua
            return
        assert not backend.writer_client.exists(_lock_name(backend, "k"))
        assert "cannot release a distributed lock" in caplog.text
        assert type(store.mutex("other")).__name__ == "_LockWrapper"


def test_an_expired_distributed_lock_is_not_an_outage(redis_url: str) -> None:
    with redis_region({"url": redis_url}) as (cache, store, backend):
        mutex = store.mutex("expiring-" + uuid.uuid4().hex)
        assert mutex.acquire(False)
        backend.writer_client.delete(mutex.remote.mutex.name)  # as if it expired
        mutex.release()
        assert store._failures == 0 and store.available
        assert mutex.local.acquire(False)  # the in-process lock was released
        mutex.local.release()


def test_a_miss_stores_its_entry_and_releases_its_lock_in_one_round_trip(
    redis_url: str, monkeypatch: Any
) -> None:
    """On Redis, the entry's write and the distributed lock's release go in
    one pipeline: the release's own round trip is saved on every miss."""
    with redis_region({"url": redis_url}) as (cache, store, backend):
        client = backend.writer_client
        key = "one-trip-" + uuid.uuid4().hex
        mutex = store.mutex(key)
        assert mutex.acquire(False)
        lock_name = mutex.remote.mutex.name
        assert client.exists(lock_name)
        sent = count_redis_commands(monkeypatch)
        assert store.set(key, ("entry",), unlock=mutex)
        assert len(sent) == 1, sent
        monkeypatch.undo()
        assert not client.exists(lock_name)
        mutex.release()  # the in-process lock; the remote one is not released twice
        assert store.get_values([key]) == [("entry",)]
        assert store._failures == 0
        assert mutex.local.acquire(False)
        mutex.local.release()


def test_a_lock_that_expired_before_the_entry_was_written(redis_url: str, caplog: Any) -> None:
    with redis_region({"url": redis_url}) as (cache, store, backend):
        client = backend.writer_client
        key = "expired-" + uuid.uuid4().hex
        mutex = store.mutex(key)
        assert mutex.acquire(False)
        client.set(mutex.remote.mutex.name, b"someone else's")  # expired, taken again
        with caplog.at_level(logging.WARNING, logger="ormcache"):
            assert store.set(key, ("entry",), unlock=mutex)
            mutex.release()
        assert client.get(mutex.remote.mutex.name) == b"someone else's"  # not ours to drop
        assert store.get_values([key]) == [("entry",)]
        assert store._failures == 0
        assert not [r for r in caplog.records if r.thread == threading.get_ident()]


def test_a_redis_without_lua_releases_through_the_entry_write() -> None:
    """The combined write-and-release on a server without Lua: the entry is
    stored, the lock dropped, and the region goes on with local locks."""
    with redis_region(fakeredis_arguments()) as (cache, store, backend):
        mutex = store.mutex("k")
        assert mutex.acquire(False)
        assert store.set("k", ("entry",), unlock=mutex)
        mutex.release()
        assert store.get_values(["k"]) == [("entry",)]
        assert not backend.writer_client.exists(_lock_name(backend, "k"))
        if not backend.distributed_lock:  # no Lua here: local locks from now on
            assert type(store.mutex("other")).__name__ == "_LockWrapper"


def test_invalidate_all_goes_on_past_a_failing_region(tmp_path: Any, capsys: Any) -> None:
    """One region's backend is down: invalidate_all() (and the CLI's
    repeated --region) still invalidate the others, then report it."""
    from ormcache import BackendError
    from ormcache.cli import main

    engine = create_engine(f"sqlite:///{tmp_path}/all.db")
    Base.metadata.create_all(engine)
    seed(engine)
    settings = {
        "namespace": "ia" + uuid.uuid4().hex[:8],
        "regions": {
            "down": {"backend": "redis", "arguments": {"url": f"redis://127.0.0.1:{closed_port()}/0"}},
            "local": {"backend": "dbm", "arguments": {"filename": str(tmp_path / "local.dbm")}},
        },
    }
    cache = OrmCache.from_settings(settings)
    maker = sessionmaker(engine)
    cache.attach(maker)
    stmt = select(Template).where(Template.id == 1).options(FromCache("local"))

    def selects() -> int:
        with QueryCounter(engine) as counter, maker() as s:
            s.scalars(stmt).one()
        return counter.selects

    try:
        assert selects() == 1 and selects() == 0
        with pytest.raises(BackendError, match="region 'down'"):
            cache.invalidate_all()
        assert selects() == 1 and selects() == 0
        toml = tmp_path / "settings.toml"
        toml.write_text(
            "[ormcache]\n"
            f'namespace = "{settings["namespace"]}"\n'
            "[ormcache.regions.down]\nbackend = \"redis\"\n"
            f"arguments = {{ url = \"{settings['regions']['down']['arguments']['url']}\" }}\n"
            "[ormcache.regions.local]\nbackend = \"dbm\"\n"
            f"arguments = {{ filename = \"{tmp_path / 'local.dbm'}\" }}\n"
        )
        status = main(["invalidate", "--settings", str(toml), "--region", "down", "--region", "local"])
        out = capsys.readouterr()
        assert status == 1
        assert "invalidated region local" in out.out and "region down" in out.err
        assert selects() == 1
    finally:
        cache.close()
        engine.dispose()


def test_sentinels_get_the_backend_timeout_and_no_retries(tmp_path: Any, monkeypatch: Any) -> None:
    """A ``redis_sentinel`` region's sentinels answer within the region's
    ``backend_timeout`` and are asked once, like its master: a sentinel
    that is down costs a query or a write milliseconds, not seconds of
    redis-py's retries."""
    monkeypatch.delenv("ORMCACHE_BACKEND_TIMEOUT", raising=False)
    engine = create_engine(f"sqlite:///{tmp_path}/sentinel.db")
    Base.metadata.create_all(engine)
    seed(engine)
    down = ("127.0.0.1", closed_port())
    cache = OrmCache.from_settings(
        {
            "namespace": "sn" + uuid.uuid4().hex[:8],
            "regions": {
                "s": {"backend": "redis_sentinel", "arguments": {"sentinels": [list(down)], "service_name": "m"}},
                "own": {
                    "backend": "redis_sentinel",
                    "arguments": {
                        "sentinels": [list(down)],
                        "service_name": "m",
                        "sentinel_kwargs": {"socket_timeout": 1.5},
                    },
                },
            },
        }
    )
    try:

        def sentinels(name: str) -> list[Any]:
            backend = cache.region(name).backend
            return list(backend.writer_client.connection_pool.sentinel_manager.sentinels)

        for sentinel in sentinels("s"):
            kwargs = sentinel.connection_pool.connection_kwargs
            assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.003
            assert _retries(sentinel.get_retry()) == 0
        own = sentinels("own")[0].connection_pool.connection_kwargs
        assert own["socket_timeout"] == 1.5 and own["socket_connect_timeout"] == 0.003
        maker = sessionmaker(engine)
        cache.attach(maker)
        stmt = select(Template).where(Template.id == 1).options(FromCache("s"))
        with QueryCounter(engine) as counter, maker() as s:
            assert s.scalars(stmt).one().name == "t1"  # from the database
            s.get_one(Template, 1).name = "written"
            s.commit()
        assert counter.selects >= 1
        with maker() as s:
            assert s.scalars(stmt).one().name == "written"
    finally:
        cache.close()
        engine.dispose()


def test_a_read_that_races_the_replay_of_lost_invalidations_reads_again(monkeypatch: Any) -> None:
    """The retry thread writes the invalidations lost during an outage
    while a query reads: the query's values may predate them, so it reads
    again rather than serve an entry they invalidate."""
    cache = OrmCache.from_settings({"namespace": "rr" + uuid.uuid4().hex[:8], "regions": {"r": {"backend": "memory"}}})
    store = cache._stores["r"]
    try:
        store.set_many({"v:1": "old"})
        from ormcache._store import Store

        original = Store._read
        calls = []

        def read_then_replay(self: Any, keys: Any) -> Any:
            values = original(self, keys)
            calls.append(values)
            if len(calls) == 1:
                # lost during an outage (by another thread, after this read
                # checked for lost ones), and written by the retry thread
                # between the read and its use
                self._lost = {"v:1"}
                self._replay_lost()
            return values

        monkeypatch.setattr(Store, "_read", read_then_replay)
        values = store.get_many(["entry", "v:1"])
        assert len(calls) == 2 and calls[0][1] == "old"
        assert values is not None and values[1] not in ("old", NO_VALUE)
    finally:
        cache.close()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_child_forked_during_a_replay_does_not_hang() -> None:
    """A process forked while a thread replays lost invalidations (waiting
    on a dead backend, holding the replay lock) must not inherit that lock
    held: its first write, or its exit, would wait for ever."""
    import os
    import signal

    cache = OrmCache.from_settings({"namespace": "fk" + uuid.uuid4().hex[:8], "regions": {"r": {"backend": "memory"}}})
    store = cache._stores["r"]
    try:
        store._lost = {"v:1"}
        store._replaying.acquire()  # a replay in flight in some thread
        pid = os.fork()
        if pid == 0:  # the child
            signal.alarm(5)  # a hang ends the child with SIGALRM
            written = store.flush_lost()
            os._exit(0 if written and not store._lost else 1)
        store._replaying.release()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        cache.close()


@contextmanager
def _private_server(kind: str) -> Iterator[tuple[Any, str]]:
    """A private redis-server or memcached on a free port (its process
    and its address), stopped afterwards."""
    import shutil
    import subprocess
    import time

    from servers import unavailable

    port = closed_port()
    if kind == "redis":
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    else:
        argv = ["memcached", "-p", str(port), "-l", "127.0.0.1", "-U", "0", "-u", "root"]
    if shutil.which(argv[0]) is None:
        unavailable(f"{argv[0]} not found (make services installs it)")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield proc, f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("kind", ["redis", "memcached"])
def test_an_invalidation_waits_out_a_pause_that_a_read_does_not(kind: str) -> None:
    """With the default 3 ms ``backend_timeout``, a server that pauses for
    50 ms (a loaded host) turns a read into a miss, but an invalidation
    waits for it (up to 0.25 s, on connections of its own): had it failed,
    other processes would serve the entries it invalidates until it is
    written again.  On memcached, a read that timed out does not take the
    invalidation down with it either (libmemcached refuses every command
    of that client for a second)."""
    import os
    import signal
    import threading
    import time

    with _private_server(kind) as (proc, address):
        url = f"redis://{address}/0" if kind == "redis" else [address]
        cache = OrmCache.from_settings(
            {
                "namespace": "wt" + uuid.uuid4().hex[:8],
                "regions": {"r": {"backend": "redis" if kind == "redis" else "memcached",
                                  "arguments": {"url": url}, "backend_timeout": 0.003}},
            }
        )
        store = cache._stores["r"]
        try:
            assert store._token_writer is not None
            cache.invalidate(Template)  # connects
            for _ in range(3):
                os.kill(proc.pid, signal.SIGSTOP)
                threading.Timer(0.05, os.kill, (proc.pid, signal.SIGCONT)).start()
                if kind == "memcached":
                    store.get_many(["ormcache-test-read"])  # times out: a miss
                cache.invalidate(Template)  # waits, and is written
                time.sleep(0.06)
            assert not store._lost and not store._lost_all
        finally:
            cache.close()


@pytest.mark.parametrize("kind", ["redis", "memcached"])
def test_invalidations_reach_a_server_that_answers_while_the_circuit_is_open(kind: str, tmp_path: Any) -> None:
    """Reads that timed out while the server paused opened the writer's
    circuit; the server answers again.  The writer's next commit must
    reach it at once: other processes, whose clients are fine, would
    otherwise serve what it changed.  (libmemcached refuses every command
    of the client whose reads timed out for a second: invalidations go
    through connections of their own, circuit open or not.)"""
    import os
    import signal
    import time

    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    seed(engine)
    with _private_server(kind) as (proc, address):
        url = f"redis://{address}/0" if kind == "redis" else [address]
        settings = {
            "namespace": "ci" + uuid.uuid4().hex[:8],
            "regions": {"r": {"backend": "redis" if kind == "redis" else "memcached", "arguments": {"url": url}}},
        }
        writer, reader = OrmCache.from_settings(settings), OrmCache.from_settings(settings)
        Writes, Reads = sessionmaker(engine), sessionmaker(engine)
        writer.attach(Writes)
        reader.attach(Reads)
        get = {"options": [FromCache("r")]}

        def read() -> tuple[str, int]:
            with QueryCounter(engine) as c, Reads() as s:
                name = s.get_one(Template, 1, **get).name
            return name, c.selects

        try:
            assert (read(), read()) == (("t1", 1), ("t1", 0))
            store = writer._stores["r"]
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                for _ in range(10):  # (libmemcached's first timeout reads as a miss)
                    store.get_many(["ormcache-test-read"])  # times out
                    if not store.available:
                        break
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            assert not store.available  # the circuit is open
            time.sleep(0.05)
            # (every cache of a process writes that process's invalidations:
            # the reader stands for another process, and must not)
            invalidation.unregister(reader)
            with Writes() as s:
                s.get_one(Template, 1).name = "changed"
                s.commit()
            invalidation.register(reader)
            assert read() == ("changed", 1)
        finally:
            writer.close()
            reader.close()
            engine.dispose()


def test_a_hung_backend_costs_commits_nothing_once_the_circuit_is_open(env: Any) -> None:
    """Invalidations that fail are retried by a thread of their own; once
    the circuit is open, new ones join them without trying the backend
    (each try would cost a commit the write timeout), and are all written
    when it answers."""
    engine, maker, cache, switch = env
    store = cache._stores["default"]
    store.retry_after = 30.0  # (no probe or retry while the test looks)
    store.max_lost_retry_after = 30.0
    assert name_and_selects(engine, maker) == ("t1", 1)
    switch.down = True
    for name in ("a", "b", "c"):
        with maker() as s:
            s.get_one(Template, 2).name = name
            s.commit()
    assert not store.available and store._lost
    calls = switch.calls
    with maker() as s:
        s.get_one(Template, 1).name = "while down"
        s.commit()
    assert switch.calls == calls  # not tried
    switch.down = False
    assert store.flush_lost()
    assert name_and_selects(engine, maker) == ("while down", 1)


def test_lost_invalidations_are_retried_at_least_every_second(env: Any, monkeypatch: Any) -> None:
    """While a backend refuses them, lost invalidations are retried every
    ``max_lost_retry_after`` seconds at most (1 s), not backing off to 30 s
    as the circuit's probe does: other processes that reach the backend
    serve what they invalidate until they are written."""
    import threading
    import time

    _, _, cache, switch = env
    store = cache._stores["default"]
    store.retry_after = 0.05
    sleeps: list[float] = []
    real_sleep = time.sleep
    me = threading.get_ident()

    def recording_sleep(seconds: float) -> None:
        if threading.get_ident() != me:  # (the circuit's probe)
            real_sleep(min(seconds, 0.01))
            return
        sleeps.append(seconds)
        if len(sleeps) >= 12:
            switch.down = False

    monkeypatch.setattr(time, "sleep", recording_sleep)
    switch.down = True
    store._lost = {"some-version-key"}
    store._retry_loop()  # (in this thread: returns once they are written)
    assert not store._lost and len(sleeps) >= 12
    assert max(sleeps) <= store.max_lost_retry_after == 1.0


def test_a_read_trusts_nothing_while_invalidations_are_unwritten(monkeypatch: Any) -> None:
    """Invalidations lost during an outage, the backend answering again
    and no failure counted since (the circuit closed, the retry thread not
    done yet): a read does not trust the backend (the database answers)
    until they are written, and neither writes them nor waits for the
    thread that does (a hung server would cost every read its write
    timeout)."""
    cache = OrmCache.from_settings({"namespace": "tr" + uuid.uuid4().hex[:8], "regions": {"r": {"backend": "memory"}}})
    store = cache._stores["r"]
    try:
        store.set_many({"v:1": "old"})
        store._lost = {"v:1"}  # not yet written
        assert store.get_many(["entry", "v:1"]) is None
        assert store._lost == {"v:1"}  # (the retry thread's job)
        store._replaying.acquire()  # being written, by the retry thread
        store._lost = set()
        try:
            assert store.get_many(["entry", "v:1"]) is None  # at once
        finally:
            store._replaying.release()
        store._lost = {"v:1"}
        assert store.flush_lost()
        values = store.get_many(["entry", "v:1"])
        assert values is not None and values[1] not in ("old", NO_VALUE)
    finally:
        cache.close()


def _in_forked_child(check: Any) -> int:
    """Fork; run ``check()`` in the child (a hang ends it after 10 s);
    the child's exit code: 0 if it returned True."""
    import os
    import signal

    pid = os.fork()
    if pid == 0:
        signal.alarm(10)
        try:
            ok = bool(check())
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_child_forked_while_a_key_is_being_filled(backend: str, request: Any) -> None:
    """The thread filling a cold key holds its lock when the process forks:
    the child, which does not have that thread, must not wait for it."""
    arguments = {"url": request.getfixturevalue("redis_url")} if backend == "redis" else {}
    cache = OrmCache.from_settings(
        {"namespace": "fl" + uuid.uuid4().hex[:8], "regions": {"r": {"backend": backend, "arguments": arguments}}}
    )
    store = cache._stores["r"]

    def lock() -> Any:
        # dogpile's in-process lock of the key; in front of a distributed
        # lock, the in-process one that the process's threads queue on
        return store.mutex("entry") if backend == "memory" else store._local_locks.get("entry")

    try:
        held = lock()
        assert held.acquire(False)  # (as _lookup_miss holds it)

        def lock_free() -> bool:
            mutex = lock()
            taken = mutex.acquire(False)
            if taken:
                mutex.release()
            return bool(taken)

        assert _in_forked_child(lock_free) == 0
        held.release()
    finally:
        cache.close()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_child_forked_while_the_circuit_is_open_closes_it() -> None:
    """The circuit is open when the process forks (the backend was down as
    a preloading master warmed up): the child probes the backend itself,
    since the parent's probe thread is not in it."""
    import time

    cache = OrmCache.from_settings({"namespace": "oc" + uuid.uuid4().hex[:8], "regions": {"r": {"backend": "memory"}}})
    store = cache._stores["r"]
    try:
        store._retry = 0.05
        store._open_until = time.monotonic() + 0.05  # open, no probe thread here

        def closes() -> bool:
            deadline = time.monotonic() + 5
            while not store.available:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.01)
            return True

        assert _in_forked_child(closes) == 0
    finally:
        store._open_until = 0.0
        cache.close()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_fork_leaves_the_parents_memcached_connections_alone(memcached_url: str) -> None:
    """A forked child drops the thread-local values of the parent's other
    threads, dogpile's pylibmc clients among them; freeing one would send
    "quit" on the socket that thread still uses."""
    import os
    import queue
    import threading

    cache = OrmCache.from_settings(
        {
            "namespace": "mq" + uuid.uuid4().hex[:8],
            "regions": {"r": {"backend": "memcached", "arguments": {"url": [memcached_url]}}},
        }
    )
    region = cache.region("r")
    asks: queue.Queue[str] = queue.Queue()
    answers: queue.Queue[Any] = queue.Queue()

    def worker() -> None:  # a thread of the parent with a client of its own
        while (ask := asks.get()) != "stop":
            try:
                region.backend.client.set(ask, b"1")
                answers.put(region.backend.client.get(ask))
            except Exception as err:
                answers.put(err)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        asks.put("mq-before")
        assert answers.get(timeout=5) == b"1"
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        asks.put("mq-after")
        assert answers.get(timeout=5) == b"1"
    finally:
        asks.put("stop")
        cache.close()


def test_a_full_redis_drops_the_version_keys_it_cannot_write() -> None:
    """Redis at ``maxmemory`` with ``noeviction`` refuses writes but not
    deletes: an invalidation deletes the version keys it cannot write (a
    missing token validates nothing) rather than stay unwritten while every
    other process serves the entries it was to drop."""
    import redis

    with _private_server("redis") as (_, address):
        url = f"redis://{address}/0"
        cache = OrmCache.from_settings(
            {"namespace": "oom" + uuid.uuid4().hex[:8], "regions": {"r": {"backend": "redis", "arguments": {"url": url}}}}
        )
        store = cache._stores["r"]
        admin = redis.Redis.from_url(url)
        try:
            assert store.set_many({"v:1": "before"})
            assert admin.exists("v:1")
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", "1")  # full: every write refused
            assert store.set_many({"v:1": "after"})
            assert not admin.exists("v:1") and not store._lost
            values = store.get_many(["entry", "v:1"])
            assert values is not None and values[1] is NO_VALUE
            # a miss that cannot create its token is not an outage: the
            # circuit stays closed for the entries that are there
            for _ in range(store.failure_threshold + 1):
                assert store.add("v:1", "new") is None
            assert store.available and store._failures == 0
        finally:
            admin.config_set("maxmemory", "0")
            cache.close()

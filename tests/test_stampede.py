"""One database query per cold key, however many threads ask at once."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.orm import sessionmaker

from ormcache import FromCache, OrmCache
from ormcache.testing import QueryCounter
from ormcache.testing.fixtures import Base, Template, seed


def test_threads_share_one_query(tmp_path: Any) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")

    @event.listens_for(engine, "connect")
    def slow_function(dbapi_conn: Any, record: Any) -> None:
        def slow(value: Any) -> Any:
            time.sleep(0.2)
            return value

        dbapi_conn.create_function("slow", 1, slow)

    Base.metadata.create_all(engine)
    seed(engine)
    cache = OrmCache.from_settings(
        {"namespace": "st" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}}
    )
    maker = sessionmaker(engine)
    cache.attach(maker)
    stmt = select(Template).where(func.slow(Template.id) == 3).options(FromCache())
    results: list[str] = []
    barrier = threading.Barrier(8)

    def reader() -> None:
        barrier.wait()
        with maker() as s:
            results.append(s.scalars(stmt).one().name)

    # the tokens exist before the cold key is asked for
    with maker() as s:
        s.scalars(select(Template).where(Template.id == 1).options(FromCache())).one()
    with QueryCounter(engine) as counter:
        threads = [threading.Thread(target=reader) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    stats = cache.stats()["regions"]["default"]
    cache.close()
    engine.dispose()
    assert results == ["t3"] * 8
    assert counter.selects == 1
    # those who waited for the fill were answered by the cache: hits
    assert (stats["hits"], stats["misses"], stats["fills"]) == (7, 2, 2)


def test_stale_while_revalidate(tmp_path: Any) -> None:
    """An expired entry is served to the threads that find its key being
    refreshed; an invalidated one never is."""
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    gate = threading.Event()

    @event.listens_for(engine, "connect")
    def slow_function(dbapi_conn: Any, record: Any) -> None:
        def slow(value: Any) -> Any:
            gate.wait(5)
            return value

        dbapi_conn.create_function("slow", 1, slow)

    Base.metadata.create_all(engine)
    seed(engine)
    cache = OrmCache.from_settings(
        {
            "namespace": "sw" + uuid.uuid4().hex[:8],
            "regions": {
                "default": {
                    "backend": "memory",
                    "expiration_time": 0.2,
                    "stale_while_revalidate": True,
                }
            },
        }
    )
    maker = sessionmaker(engine)
    cache.attach(maker)
    stmt = select(Template).where(func.slow(Template.id) == 3).options(FromCache())
    gate.set()
    with maker() as s:
        s.scalars(stmt).one()  # cached
    time.sleep(0.3)  # expired
    gate.clear()
    names: list[str] = []

    def refresher() -> None:
        with maker() as s:
            names.append("refresher:" + s.scalars(stmt).one().name)

    t = threading.Thread(target=refresher)
    t.start()
    time.sleep(0.2)  # the refresher holds the key's lock, its query blocked
    with QueryCounter(engine) as counter, maker() as s:
        assert s.scalars(stmt).one().name == "t3"  # the expired entry, at once
    assert counter.selects == 0
    gate.set()
    t.join()
    assert names == ["refresher:t3"]
    # an invalidated entry is never served stale
    cache.invalidate(Template)
    gate.clear()
    t = threading.Thread(target=refresher)
    t.start()
    time.sleep(0.2)
    waited: list[str] = []
    reader = threading.Thread(target=lambda: waited.append(_read(maker, stmt)))
    reader.start()
    time.sleep(0.2)
    assert waited == []  # still waiting for the refresher, not served
    gate.set()
    t.join()
    reader.join()
    assert waited == ["t3"]
    cache.close()
    engine.dispose()


def _read(maker: Any, stmt: Any) -> str:
    with maker() as s:
        return str(s.scalars(stmt).one().name)

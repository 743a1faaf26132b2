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
    cache.close()
    engine.dispose()
    assert results == ["t3"] * 8
    assert counter.selects == 1

"""One database query per cold key across processes: 8 processes of 8
threads each, on Redis with dogpile's distributed lock."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from typing import Any

from sqlalchemy import create_engine, event, func, select
from sqlalchemy.orm import sessionmaker

from ormcache.testing.fixtures import Base, seed

PROCESSES = 8
THREADS = 8


def _engine(path: str, counter: Any) -> Any:
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def slow_function(dbapi_conn: Any, record: Any) -> None:
        def slow(value: Any) -> Any:
            with counter.get_lock():
                counter.value += 1
            time.sleep(0.3)
            return value

        dbapi_conn.create_function("slow", 1, slow)

    return engine


def _worker(path: str, settings: dict[str, Any], counter: Any, start: Any, results: Any) -> None:
    import threading

    from ormcache import FromCache, OrmCache
    from ormcache.testing.fixtures import Template

    engine = _engine(path, counter)
    cache = OrmCache.from_settings(settings)
    maker = sessionmaker(engine)
    cache.attach(maker)
    stmt = select(Template).where(func.slow(Template.id) == 3).options(FromCache("r"))
    names: list[str] = []

    def read() -> None:
        start.wait()
        with maker() as s:
            names.append(s.scalars(stmt).one().name)

    threads = [threading.Thread(target=read) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(names)
    cache.close()


def test_processes_share_one_query(tmp_path: Any, redis_url: str) -> None:
    path = str(tmp_path / "db.sqlite")
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    seed(engine)
    settings = {
        "namespace": "sp" + uuid.uuid4().hex[:8],
        "regions": {
            # ormcache's defaults: a distributed lock for shared backends
            "r": {"backend": "redis", "arguments": {"url": redis_url}}
        },
    }
    from ormcache import FromCache, OrmCache
    from ormcache.testing.fixtures import Template

    cache = OrmCache.from_settings(settings)  # the version tokens exist already
    maker = sessionmaker(engine)
    cache.attach(maker)
    with maker() as s:
        s.scalars(select(Template).where(Template.id == 1).options(FromCache("r"))).one()
    cache.close()

    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("i", 0)
    start = ctx.Barrier(PROCESSES * THREADS)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(path, settings, counter, start, results))
        for _ in range(PROCESSES)
    ]
    for p in procs:
        p.start()
    names = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [n for batch in names for n in batch] == ["t3"] * (PROCESSES * THREADS)
    # slow() runs once per row the cold query scans (10 templates): one
    # query in all, for 64 readers
    assert counter.value == 10

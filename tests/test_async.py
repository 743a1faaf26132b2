"""``AsyncSession`` (FastAPI-style applications): attaching the asyncio
session factories, hits and invalidation through asyncpg, and tasks of
one event loop that miss the same key at once."""

from __future__ import annotations

import asyncio
import faulthandler
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from ormcache import FromCache, OrmCache
from ormcache.testing.fixtures import Base, Template, seed

import greenlet  # noqa: E402, F401  (the dev extra's; SQLAlchemy's asyncio needs it)
from sqlalchemy.ext.asyncio import (  # noqa: E402
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)


def test_async_factories_attach_to_their_own_sync_sessions(memory_cache: OrmCache) -> None:
    engine = create_async_engine("sqlite+aiosqlite://")
    maker = async_sessionmaker(engine)
    memory_cache.attach(maker)
    from sqlalchemy import event

    def attached(target: Any) -> bool:
        return event.contains(target, "do_orm_execute", memory_cache._do_orm_execute)

    sync_class = maker.kw["sync_session_class"]
    assert issubclass(sync_class, Session) and sync_class is not Session
    assert attached(sync_class) and not attached(Session)
    other = async_sessionmaker(engine)  # not attached: untouched
    assert "sync_session_class" not in other.kw
    memory_cache.attach(async_scoped_session(maker, scopefunc=asyncio.current_task))  # the same class
    assert len(memory_cache._attached) == 1
    session = AsyncSession(engine)
    memory_cache.attach(session)
    assert attached(session.sync_session)
    memory_cache.detach(maker)
    memory_cache.detach(session)
    assert not attached(sync_class) and not attached(session.sync_session)


@pytest.fixture
def async_pg_url(postgresql_url: str) -> Iterator[str]:
    from servers import postgresql_database

    url = postgresql_database(postgresql_url, "ormcache_async")
    sync = create_engine(url)
    Base.metadata.drop_all(sync)
    Base.metadata.create_all(sync)
    seed(sync)
    sync.dispose()
    yield url.set(drivername="postgresql+asyncpg", database="ormcache_async").render_as_string(
        hide_password=False
    )


@pytest.mark.parametrize("backend", ["memory", "memory_pickle"])
def test_asyncpg_hits_invalidation_and_concurrent_misses(async_pg_url: str, backend: str) -> None:
    cache = OrmCache.from_settings(
        {"namespace": "ap" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": backend}}}
    )
    # a deadlock would stop the event loop, and the test with it
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        asyncio.run(_asyncpg_scenario(async_pg_url, cache))
    finally:
        faulthandler.cancel_dump_traceback_later()
        cache.close()


async def _asyncpg_scenario(url: str, cache: OrmCache) -> None:
    from ormcache.testing import QueryCounter

    engine = create_async_engine(url)
    maker = async_sessionmaker(engine)
    cache.attach(maker)
    stmt = select(Template).where(Template.store_id == 1).order_by(Template.id).options(FromCache())

    async def names() -> list[str]:
        async with maker() as session:
            return [t.name for t in (await session.scalars(stmt)).all()]

    try:
        # five tasks miss the same key at once: none may wait on another's lock
        results = await asyncio.gather(*[names() for _ in range(5)])
        assert all(r == results[0] for r in results) and results[0][0] == "t1"
        with QueryCounter(engine.sync_engine) as counter:
            assert (await names())[0] == "t1"  # stored, although asyncpg rows do not pickle
        assert counter.selects == 0
        async with maker() as session:
            await session.execute(update(Template).where(Template.id == 1).values(name="async"))
            await session.commit()
        assert (await names())[0] == "async"
        async with maker() as session:
            got = await session.get(Template, 2, options=[FromCache()])
            assert got is not None and got.name == "t2"
            got.name = "pending"
            again = await session.get(Template, 2, options=[FromCache()])
            assert again is got and again.name == "pending"
    finally:
        await engine.dispose()


def test_a_bulk_update_during_another_tasks_flush_invalidates_its_rows(
    async_pg_url: str, memory_cache: OrmCache
) -> None:
    """Tasks share their thread: while task A's flush awaits the database,
    task B's ORM bulk UPDATE by primary key is not one of A's row-by-row
    flush statements, and must move the keys ``session.get`` depends on."""
    sync = create_engine(make_url(async_pg_url).set(drivername="postgresql+psycopg2"))
    with sync.begin() as conn:
        conn.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION ormcache_slow() RETURNS trigger AS $$ "
            "BEGIN PERFORM pg_sleep(0.5); RETURN NEW; END $$ LANGUAGE plpgsql"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER ormcache_slow BEFORE INSERT ON tags FOR EACH ROW EXECUTE FUNCTION ormcache_slow()"
        )
    sync.dispose()
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        asyncio.run(_flush_and_bulk(async_pg_url, memory_cache))
    finally:
        faulthandler.cancel_dump_traceback_later()


async def _flush_and_bulk(url: str, cache: OrmCache) -> None:
    from ormcache.testing.fixtures import Tag

    engine = create_async_engine(url)
    maker = async_sessionmaker(engine, expire_on_commit=False)
    cache.attach(maker)

    async def name() -> str:
        async with maker() as session:
            return (await session.get(Template, 1, options=[FromCache()])).name  # type: ignore[union-attr]

    async def slow_flush() -> None:
        async with maker() as session:
            session.add(Tag(id=50, label="slow"))
            await session.commit()

    async def bulk_update() -> None:
        await asyncio.sleep(0.15)  # inside the other task's flush
        async with maker() as session:
            await session.execute(update(Template), [{"id": 1, "name": "bulk"}])
            await session.commit()

    try:
        assert await name() == "t1" and await name() == "t1"
        await asyncio.gather(slow_flush(), bulk_update())
        assert await name() == "bulk"
    finally:
        await engine.dispose()


@pytest.fixture
def aiosqlite_url(tmp_path: Any) -> str:
    path = tmp_path / "templates.db"
    sync = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(sync)
    seed(sync)
    sync.dispose()
    return f"sqlite+aiosqlite:///{path}"


@pytest.mark.parametrize("backend", ["memory", "memory_pickle"])
def test_aiosqlite_hits_invalidation_and_concurrent_misses(aiosqlite_url: str, backend: str) -> None:
    """aiosqlite stores and hits: whether its connection holds an older
    read snapshot is asked in aiosqlite's own thread."""
    cache = OrmCache.from_settings(
        {"namespace": "as" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": backend}}}
    )
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        asyncio.run(_asyncpg_scenario(aiosqlite_url, cache))
        assert cache.stats()["regions"]["default"]["fills"] >= 2
    finally:
        faulthandler.cancel_dump_traceback_later()
        cache.close()


def test_aiosqlite_read_in_an_older_snapshot_is_not_stored(aiosqlite_url: str, memory_cache: OrmCache) -> None:
    """With SQLAlchemy's recipe for real SQLite transactions (the driver's
    own transaction handling off, ``BEGIN`` emitted in the ``begin``
    event), a transaction that read before another connection's commit
    keeps its snapshot: what it reads then is served to it, never stored."""
    from ormcache.testing import QueryCounter
    from servers import sqlite_begin_recipe

    writer = create_engine(aiosqlite_url.replace("+aiosqlite", ""))
    with writer.connect() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")  # a reader and a writer at once

    async def scenario() -> None:
        engine = create_async_engine(aiosqlite_url)

        sqlite_begin_recipe(engine.sync_engine)
        maker = async_sessionmaker(engine)
        memory_cache.attach(maker)
        stmt = select(Template).where(Template.id == 1).options(FromCache())
        try:
            async with maker() as old:
                await old.get(Template, 2)  # its snapshot starts here
                with writer.begin() as conn:
                    conn.execute(update(Template).where(Template.id == 1).values(name="new"))
                assert (await old.scalars(stmt)).one().name == "t1"  # its snapshot's
            for _ in range(2):
                async with maker() as fresh:
                    assert (await fresh.scalars(stmt)).one().name == "new"
            with QueryCounter(engine.sync_engine) as counter:
                async with maker() as fresh:
                    assert (await fresh.scalars(stmt)).one().name == "new"
            assert counter.selects == 0  # a new transaction's read was stored
        finally:
            await engine.dispose()

    try:
        asyncio.run(scenario())
    finally:
        writer.dispose()


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_plain_session_in_the_event_loop_never_waits_for_a_task(
    aiosqlite_url: str, request: pytest.FixtureRequest, backend: str
) -> None:
    """A task of an ``AsyncSession`` misses a key and awaits its query;
    meanwhile another task of the same loop runs the same statement
    through a plain ``Session``.  Waiting for the first task's fill would
    block the loop, and the first task with it: the database answers."""
    import time

    from sqlalchemy import event
    from sqlalchemy.orm import sessionmaker

    spec: dict[str, Any] = {"backend": backend}
    if backend == "redis":
        spec["arguments"] = {"url": request.getfixturevalue("redis_url")}
    cache = OrmCache.from_settings({"namespace": "al" + uuid.uuid4().hex[:8], "regions": {"default": spec}})
    sync_engine = create_engine(aiosqlite_url.replace("+aiosqlite", ""))
    Sync = sessionmaker(sync_engine)
    cache.attach(Sync)
    stmt = select(Template.name).where(Template.id == 1).options(FromCache())

    async def scenario() -> list[str]:
        engine = create_async_engine(aiosqlite_url)

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def slow(*args: Any) -> None:
            time.sleep(0.2)  # in aiosqlite's thread: the task awaits meanwhile

        maker = async_sessionmaker(engine)
        cache.attach(maker)

        async def by_task() -> str:
            async with maker() as s:
                return (await s.scalars(stmt)).one()

        async def by_plain_session() -> str:
            await asyncio.sleep(0.05)  # the other task holds the key's lock
            with Sync() as s:
                return s.scalars(stmt).one()

        try:
            return await asyncio.gather(by_task(), by_plain_session())
        finally:
            await engine.dispose()

    faulthandler.dump_traceback_later(60, exit=True)
    try:
        assert asyncio.run(scenario()) == ["t1", "t1"]
    finally:
        faulthandler.cancel_dump_traceback_later()
        cache.close()
        sync_engine.dispose()


def test_async_statements_whose_result_is_a_cursor_result(tmp_path: Any) -> None:
    """Core statements, unions and text through an AsyncSession: their
    result is SQLAlchemy's CursorResult, whose cursor the asyncio layer
    asks to close softly; ormcache's cursors of cached or fetched rows did
    not say how, and the miss and every hit failed."""
    from sqlalchemy import text, union_all

    url = f"sqlite+aiosqlite:///{tmp_path}/core.db"
    sync = create_engine(f"sqlite:///{tmp_path}/core.db")
    Base.metadata.create_all(sync)
    seed(sync)
    sync.dispose()
    cache = OrmCache.from_settings({"namespace": "ac" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}})
    table = Template.__table__
    statements = [
        select(table.c.id).where(table.c.id <= 2).order_by(table.c.id),
        union_all(select(Template.id).where(Template.id == 1), select(Template.id).where(Template.id == 2)),
        text("SELECT id FROM templates WHERE id <= 2 ORDER BY id"),
    ]

    async def scenario() -> None:
        engine = create_async_engine(url)
        maker = async_sessionmaker(engine)
        cache.attach(maker)
        try:
            for stmt in statements:
                for _ in range(3):
                    async with maker() as s:
                        rows = (await s.execute(stmt.options(FromCache()))).all()
                    assert sorted(rows) == [(1,), (2,)]
        finally:
            await engine.dispose()

    asyncio.run(scenario())
    assert cache.stats()["regions"]["default"]["hits"] == 6
    cache.close()

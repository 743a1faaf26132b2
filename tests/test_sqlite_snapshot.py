"""``ormcache._sqlite.busy``: does a pysqlite connection hold a read snapshot?

A miss on SQLite stores its rows only when the answer is no.  The answer
comes from ``sqlite3_txn_state`` when SQLite has it (one call), else from
walking the connection's prepared statements; both must agree, whatever
the number of statements pysqlite keeps prepared.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from ormcache import _sqlite


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(tmp_path / "t.db", cached_statements=256)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    conn.executemany("INSERT INTO t (id, v) VALUES (?, ?)", [(i, str(i)) for i in range(50)])
    conn.commit()
    # many prepared statements in pysqlite's cache, as in an application
    for i in range(150):
        conn.execute(f"SELECT {i}, v FROM t WHERE id = ?", (i % 50,)).fetchall()
    return conn


def test_the_one_call_is_used_where_sqlite_has_it() -> None:
    assert _sqlite._library() is not None
    if sqlite3.sqlite_version_info >= (3, 34):
        assert _sqlite._txn_state is not None


@pytest.mark.parametrize("walk", [False, True], ids=["txn_state", "walk"])
def test_snapshot_held_only_while_a_statement_is_active(conn: sqlite3.Connection, walk: bool) -> None:
    assert _sqlite.busy(conn, walk=walk) is False
    cursor = conn.execute("SELECT id FROM t ORDER BY id")
    assert cursor.fetchone() == (0,)
    assert _sqlite.busy(conn, walk=walk) is True  # a result read in part
    cursor.fetchall()
    assert _sqlite.busy(conn, walk=walk) is False
    one = conn.execute("SELECT v FROM t WHERE id = 3")
    assert one.fetchone() == ("3",)
    assert _sqlite.busy(conn, walk=walk) is False  # pysqlite stepped to the end
    other = conn.execute(f"SELECT 7, v FROM t WHERE id = ?", (1,))  # a cached statement
    other.fetchone()
    assert _sqlite.busy(conn, walk=walk) is False
    cursor = conn.execute("SELECT 149, v FROM t WHERE id > ?", (0,))
    cursor.fetchone()
    assert _sqlite.busy(conn, walk=walk) is True
    cursor.close()
    assert _sqlite.busy(conn, walk=walk) is False


def test_a_write_transaction_is_a_snapshot(conn: sqlite3.Connection) -> None:
    conn.execute("UPDATE t SET v = 'x' WHERE id = 1")
    assert conn.in_transaction
    if _sqlite._txn_state is not None:
        assert _sqlite.busy(conn) is True
    conn.rollback()
    assert _sqlite.busy(conn) is False


def test_not_a_pysqlite_connection() -> None:
    assert _sqlite.busy(object()) is None


def test_the_handle_is_checked_once_per_connection_type(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(_sqlite, "_checked_types", set())
    reads: list[int] = []

    class Counting(sqlite3.Connection):
        @property
        def total_changes(self) -> int:
            reads.append(1)
            return super().total_changes

    class Lying(sqlite3.Connection):
        @property
        def total_changes(self) -> int:
            return super().total_changes + 1  # does not match the handle's

    first = sqlite3.connect(tmp_path / "a.db", factory=Counting)
    assert _sqlite.busy(first) is False
    assert reads == [1]
    second = sqlite3.connect(tmp_path / "b.db", factory=Counting)
    assert _sqlite.busy(second) is False
    assert _sqlite.busy(first) is False
    assert reads == [1]  # the type's layout was checked with the first
    first.close()
    assert _sqlite.busy(first) is None  # closed: no handle, nothing called
    assert _sqlite.busy(second) is False

    # a type whose handle does not check out is never trusted
    lying = sqlite3.connect(tmp_path / "c.db", factory=Lying)
    assert _sqlite.busy(lying) is None
    assert _sqlite.busy(lying) is None
    assert Lying not in _sqlite._checked_types
    second.close()
    lying.close()


def test_a_transaction_that_has_only_begun_holds_no_snapshot(conn: sqlite3.Connection) -> None:
    """``BEGIN`` (deferred) takes no snapshot until the first read: a read
    then sees every commit, and may be stored; after it, the transaction
    holds that snapshot."""
    conn.isolation_level = None  # the driver's own transaction handling off
    conn.execute("BEGIN")
    assert conn.in_transaction
    assert _sqlite.snapshot_free(conn) is (_sqlite._txn_state is not None)
    conn.execute("SELECT v FROM t WHERE id = 1").fetchall()
    assert _sqlite.snapshot_free(conn) is False
    conn.execute("COMMIT")
    assert _sqlite.snapshot_free(conn) is True
    assert _sqlite.snapshot_free(object()) is False


def test_sqlalchemys_begin_recipe_stores_first_reads_only(tmp_path: Path, memory_cache: Any) -> None:
    """SQLAlchemy's recipe for real SQLite transactions (the driver's own
    transaction handling off, ``BEGIN`` emitted in the ``begin`` event):
    the first read of a transaction is stored; a read in a transaction
    whose snapshot predates another connection's commit is served from
    that snapshot and never stored."""
    from sqlalchemy import create_engine, select, update
    from servers import sqlite_begin_recipe
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache
    from ormcache.testing import QueryCounter
    from ormcache.testing.fixtures import Base, Template, seed

    url = f"sqlite:///{tmp_path}/recipe.db"
    writer = create_engine(url)
    Base.metadata.create_all(writer)
    seed(writer)
    with writer.connect() as c:
        c.exec_driver_sql("PRAGMA journal_mode=WAL")  # a reader and a writer at once
    engine = create_engine(url)

    sqlite_begin_recipe(engine)
    maker = sessionmaker(engine)
    memory_cache.attach(maker)
    stmt = select(Template).where(Template.id == 1).options(FromCache())
    try:
        with maker() as old:
            old.get(Template, 2)  # its snapshot starts here
            with writer.begin() as c:
                c.execute(update(Template).where(Template.id == 1).values(name="new"))
            assert old.scalars(stmt).one().name == "t1"  # its snapshot's
        with QueryCounter(engine) as counter:
            for _ in range(3):
                with maker() as fresh:
                    assert fresh.scalars(stmt).one().name == "new"
        assert counter.selects == 1  # then stored: a transaction's first read
    finally:
        engine.dispose()
        writer.dispose()


def test_a_read_snapshot_is_not_served_newer_entries(tmp_path: Path, memory_cache: Any) -> None:
    """A session whose transaction holds a read snapshot (SQLAlchemy's
    recipe for real SQLite transactions, WAL) is not served an entry that
    another session filled after a later commit: the uncached query would
    read the snapshot, and so does the cached one."""
    from sqlalchemy import create_engine, select, update
    from servers import sqlite_begin_recipe
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache
    from ormcache.testing.fixtures import Base, Template, seed

    url = f"sqlite:///{tmp_path}/held.db"
    writer = create_engine(url)
    Base.metadata.create_all(writer)
    seed(writer)
    with writer.connect() as c:
        c.exec_driver_sql("PRAGMA journal_mode=WAL")
    engine = create_engine(url)
    sqlite_begin_recipe(engine)
    maker = sessionmaker(engine)
    memory_cache.attach(maker)
    stmt = select(Template).where(Template.id == 1).options(FromCache())
    try:
        with maker() as old:
            old.get(Template, 2)  # its snapshot starts here
            with writer.begin() as c:
                c.execute(update(Template).where(Template.id == 1).values(name="new"))
            for _ in range(2):
                with maker() as fresh:
                    assert fresh.scalars(stmt).one().name == "new"  # filled, then a hit
            assert old.scalars(stmt).one().name == "t1"  # its snapshot's
            assert old.get(Template, 1, options=[FromCache()]).name == "t1"
    finally:
        engine.dispose()
        writer.dispose()


def test_a_transaction_that_has_written_is_served_hits_of_other_tables(tmp_path: Path, memory_cache: Any) -> None:
    """A SQLite transaction that has written holds the write lock: nothing
    commits meanwhile, so entries of the tables it did not write are
    served (those it wrote skip the cache: read your writes)."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache
    from ormcache.testing import QueryCounter
    from ormcache.testing.fixtures import Base, Tag, Template, seed

    engine = create_engine(f"sqlite:///{tmp_path}/written.db")
    Base.metadata.create_all(engine)
    seed(engine)
    maker = sessionmaker(engine)
    memory_cache.attach(maker)
    stmt = select(Template).where(Template.id == 1).options(FromCache())
    tags = select(Tag).order_by(Tag.id).options(FromCache())
    try:
        with maker() as s:
            s.scalars(stmt).one()
            s.scalars(tags).all()
        with maker() as s, QueryCounter(engine) as counter:
            s.add(Tag(id=99, label="new"))
            s.flush()  # the write lock, held
            assert s.scalars(stmt).one().name == "t1"
            assert counter.selects == 0  # served
            assert [t.id for t in s.scalars(tags)][-1] == 99  # its own write: the database
            assert counter.selects == 1
            s.rollback()
    finally:
        engine.dispose()


def test_shared_cache_connections_never_store(tmp_path: Path, memory_cache: Any) -> None:
    """Connections of one SQLite shared cache share its read snapshot, which
    SQLite reports only for the connection that took it: another one,
    reporting none, still reads that older snapshot.  An engine whose URL
    asks for the shared cache never stores."""
    from sqlalchemy import create_engine, select, text, update
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache
    from ormcache.testing import QueryCounter
    from ormcache.testing.fixtures import Base, Template, seed

    path = tmp_path / "shared.db"
    writer = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(writer)
    seed(writer)
    with writer.connect() as c:
        c.exec_driver_sql("PRAGMA journal_mode=WAL")  # a reader and a writer at once
    engine = create_engine(f"sqlite:///file:{path}?cache=shared&uri=true")
    maker = sessionmaker(engine)
    memory_cache.attach(maker)
    stmt = select(Template).where(Template.id == 1).options(FromCache())
    try:
        with engine.connect() as holder:
            result = holder.execute(text("SELECT id FROM templates"))
            result.fetchone()  # the shared cache's snapshot, held
            with writer.begin() as c:
                c.execute(update(Template).where(Template.id == 1).values(name="new"))
            with maker() as other:  # another connection of the shared cache
                assert other.scalars(stmt).one().name == "t1"  # the old snapshot's
            result.close()
        with QueryCounter(engine) as counter:
            for _ in range(2):
                with maker() as fresh:
                    assert fresh.scalars(stmt).one().name == "new"
        assert counter.selects == 2  # never stored
    finally:
        engine.dispose()
        writer.dispose()

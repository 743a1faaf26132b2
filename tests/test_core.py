"""OrmCache behaviour that does not depend on the backend."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

import ormcache
from ormcache import FromCache, OrmCache, UnknownRegionError
from ormcache.testing import QueryCounter
from ormcache.testing.fixtures import Base, Template, seed
from unseen import unseen_write


@pytest.fixture
def env(tmp_path: Any) -> Iterator[tuple[Any, Any, OrmCache]]:
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    seed(engine, stores=2, per_store=50)
    cache = OrmCache.from_settings(
        {
            "namespace": "c" + uuid.uuid4().hex[:8],
            "regions": {
                "default": {"backend": "memory"},
                "pickled": {"backend": "memory_pickle"},
            },
        }
    )
    maker = sessionmaker(engine)
    cache.attach(maker)
    yield engine, maker, cache
    cache.close()
    engine.dispose()


def backend_items(cache: OrmCache, region: str) -> dict[str, Any]:
    return dict(cache.region(region).backend._cache)  # type: ignore[attr-defined]


def test_all_is_sorted_and_complete() -> None:
    assert ormcache.__all__ == sorted(ormcache.__all__)
    for name in ormcache.__all__:
        assert hasattr(ormcache, name)


def test_keys_are_bounded(env: Any) -> None:
    engine, maker, cache = env
    ids = list(range(100_000))
    with maker() as s:
        s.scalars(select(Template).where(Template.id.in_(ids)).options(FromCache())).all()
    keys = backend_items(cache, "default")
    assert keys and max(len(k) for k in keys) <= 250


def test_large_results_are_compressed(env: Any) -> None:
    engine, maker, cache = env
    cache.compress_threshold = 1000
    stmt = select(Template).options(FromCache("pickled"))
    with maker() as s:
        expected = [(t.id, t.body) for t in s.scalars(stmt)]
    with QueryCounter(engine) as c, maker() as s:
        assert [(t.id, t.body) for t in s.scalars(stmt)] == expected
    assert c.selects == 0
    import pickle

    region = cache.region("pickled")
    encodings = []
    for key, raw in backend_items(cache, "pickled").items():
        if ":q:" in key:
            payload = pickle.loads(raw.partition(b"|")[2])
            encodings.append(payload[4])
    import importlib.util

    # zstandard when installed (the dev extra installs it), else zlib
    assert encodings == [3 if importlib.util.find_spec("zstandard") else 2]
    assert region is cache.region("pickled")


def test_schema_version_separates_entries(env: Any) -> None:
    engine, maker, cache = env
    stmt = select(Template).where(Template.id == 1).options(FromCache())

    def selects() -> int:
        with QueryCounter(engine) as c, maker() as s:
            s.scalars(stmt).one()
        return c.selects

    assert (selects(), selects()) == (1, 0)
    cache.use_schema_version("rev2")
    assert (selects(), selects()) == (1, 0)
    cache.use_schema_version(None)
    assert selects() == 0


def test_get_and_select_of_the_same_sql_share_their_entry(env: Any) -> None:
    """``session.get`` and ``select(...).where(id == x)`` compile to the
    same SQL and both depend on the row: one entry serves both, and
    alternating them never makes them overwrite each other (they used to,
    when the select depended on the table)."""
    engine, maker, cache = env

    def both() -> int:
        with QueryCounter(engine) as c, maker() as s:
            assert s.get_one(Template, 7, options=[FromCache()]).name == "t7"
        with QueryCounter(engine) as d, maker() as s:
            assert s.scalars(select(Template).where(Template.id == 7).options(FromCache())).one().name == "t7"
        return c.selects + d.selects

    # (SQLAlchemy 2.0 labels the two statements' SQL apart: an entry each)
    import sqlalchemy

    same_sql = tuple(int(p) for p in sqlalchemy.__version__.split(".")[:2]) >= (2, 1)
    assert both() == (1 if same_sql else 2)
    assert both() == 0
    assert both() == 0


def test_region_lookup(env: Any) -> None:
    _, _, cache = env
    assert cache.region("default").backend is not None
    with pytest.raises(UnknownRegionError, match="declared regions: 'default', 'pickled'"):
        cache.region("missing")


def test_invalidate_needs_a_cached_statement(env: Any) -> None:
    _, _, cache = env
    with pytest.raises(ormcache.ConfigurationError, match="no FromCache option"):
        cache.invalidate(select(Template))
    with pytest.raises(ormcache.ConfigurationError, match="cannot invalidate 42"):
        cache.invalidate(42)
    with pytest.raises(ormcache.ConfigurationError, match=r"for a Table, invalidate_table\('templates'\)"):
        cache.invalidate(Template.__table__)


def test_invalidate_a_legacy_query(env: Any) -> None:
    """``invalidate(query)`` drops what the ``Query`` cached (it once
    looked under ``Query.statement``'s key, which labels its columns
    otherwise, and dropped nothing)."""
    engine, maker, cache = env

    def query(s: Any) -> Any:
        return s.query(Template).filter(Template.store_id == 1).order_by(Template.id).options(FromCache())

    def names() -> list[str]:
        with maker() as s:
            return [t.name for t in query(s)]

    before = names()
    unseen_write(engine, "UPDATE templates SET name = 'outside' WHERE store_id = 1")
    assert names() == before  # still cached
    with maker() as s:
        cache.invalidate(query(s))
    assert set(names()) == {"outside"}


def test_stats(env: Any) -> None:
    engine, maker, cache = env
    stmt = select(Template).where(Template.id == 1).options(FromCache())
    for _ in range(3):
        with maker() as s:
            s.scalars(stmt).one()
    with maker() as s:
        s.get_one(Template, 2).name = "x"
        s.flush()
        s.scalars(stmt).one()  # the transaction wrote templates: bypassed
        s.commit()
    stats = cache.stats(reset=True)
    region = stats["regions"]["default"]
    assert (region["hits"], region["misses"], region["fills"], region["bypassed"]) == (2, 1, 1, 1)
    assert region["invalidations"] == 1 and region["hit_rate"] == round(2 / 3, 4)
    assert region["hit_time_us"] > 0
    assert stats["models"]["Template"]["hits"] == 2
    assert cache.stats() == {"regions": {}, "models": {}}


def test_autocommit_writes_are_announced_at_once(env: Any) -> None:
    """A write in autocommit mode is committed when it returns: its tables
    are cacheable again right away, not only when the connection goes back
    to the pool."""
    engine, maker, cache = env
    stmt = select(Template).where(Template.id == 1).options(FromCache())

    def selects() -> int:
        with QueryCounter(engine) as c, maker() as s:
            s.scalars(stmt).one()
        return c.selects

    selects()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("UPDATE templates SET name = 'auto' WHERE id = 1")
        # still holding the connection: the write must already count
        assert selects() == 1
        assert selects() == 0


def test_a_commit_is_announced_when_it_returns(env: Any) -> None:
    """A Core connection kept open after ``commit()``: fresh tokens follow
    the commit at once, not the connection's next begin or check-in.  Had
    its pending tokens been evicted meanwhile, a reader could have stored
    the rows from before the commit under tokens of its own; those must
    not be served after the commit."""
    from sqlalchemy import update

    engine, maker, cache = env
    stmt = select(Template.name).where(Template.id == 1).options(FromCache())

    def read() -> tuple[str, int]:
        with QueryCounter(engine) as c, maker() as s:
            name = s.execute(stmt).scalar_one()
        return name, c.selects

    assert read()[0] == "t1"
    backend = cache.region("default").backend._cache  # type: ignore[attr-defined]
    with engine.connect() as conn:
        conn.execute(update(Template).where(Template.id == 1).values(name="committed"))
        for key in [k for k in backend if ":v:" in k]:
            del backend[key]  # the pending tokens are evicted
        assert read() == ("t1", 1)  # stored: its tokens are its own now
        conn.commit()
        # still holding the connection, idle
        assert read() == ("committed", 1)
        assert read() == ("committed", 0)


def test_a_write_never_committed_nor_rolled_back_settles_at_checkin(env: Any) -> None:
    """A connection that wrote and is dropped without commit or rollback
    goes back to the pool, whose reset rolls it back: the tables it wrote
    are cacheable again from then on (ormcache follows the check-ins of
    the pools its writing connections come from)."""
    import gc

    from sqlalchemy import update

    engine, maker, cache = env
    stmt = select(Template).where(Template.id == 1).options(FromCache())

    def selects() -> int:
        with QueryCounter(engine) as c, maker() as s:
            assert s.scalars(stmt).one().name == "t1"
        return c.selects

    selects()
    conn = engine.connect()
    conn.execute(update(Template).where(Template.id == 1).values(name="never committed"))
    assert selects() == 1  # a write in progress: not cached meanwhile
    assert selects() == 1
    del conn
    gc.collect()
    assert selects() == 1
    assert selects() == 0


def test_a_select_by_primary_key_depends_on_its_row(env: Any) -> None:
    """``select(Model).where(Model.pk == value)`` depends on its row, as
    ``session.get`` does: a write to another row leaves it cached, a write
    to the row or one whose rows are not known (Core DML) does not."""
    from sqlalchemy import update

    engine, maker, cache = env

    def name(tid: int) -> tuple[str, int]:
        with QueryCounter(engine) as c, maker() as s:
            found = s.scalars(select(Template).where(Template.id == tid).options(FromCache())).one()
            return found.name, c.selects

    assert name(1) == ("t1", 1)
    with maker() as s:
        s.get_one(Template, 2).name = "another row"
        s.commit()
    assert name(1) == ("t1", 0)
    with maker() as s:
        s.get_one(Template, 1).name = "this row"
        s.commit()
    assert name(1) == ("this row", 1)
    assert name(1) == ("this row", 0)
    with engine.begin() as conn:
        conn.execute(update(Template).where(Template.name == "t3").values(name="bulk"))
    assert name(1) == ("this row", 1)


def test_l1_bounded_by_entries_and_bytes() -> None:
    from ormcache._store import L1

    l1 = L1(max_entries=3, max_bytes=1000)
    for i in range(5):
        l1[f"k{i}"] = (0, (), (), b"x" * 100, 1)
    assert len(l1) == 3 and l1.get("k0") is None and l1.get("k4") is not None
    l1["big"] = (0, (), (), b"x" * 900, 1)  # evicts the oldest until under 1000 bytes
    assert l1.bytes <= 1000 and l1.get("big") is not None and len(l1) == 1
    assert l1.pop("big") is not None and l1.bytes == 0


def test_l1_settings() -> None:
    from ormcache import load_settings

    spec = load_settings(
        {"regions": {"r": {"backend": "redis", "l1": {"max_entries": 10, "max_bytes": 4096}}}}
    ).region("r")
    assert (spec.l1_max_entries, spec.l1_max_bytes, spec.l1_mode) == (10, 4096, "validated")
    with pytest.raises(ormcache.ConfigurationError, match="max_bytes"):
        load_settings({"regions": {"r": {"backend": "redis", "l1": {"max_entries": 1, "max_bytes": -1}}}})


def test_zlib_entries_are_read_without_zstandard(env: Any, monkeypatch: Any) -> None:
    """A process without zstandard writes and reads zlib; an entry another
    process compressed with zstandard is a miss for it, never an error."""
    import ormcache.core as core

    engine, maker, cache = env
    cache.compress_threshold = 1000
    stmt = select(Template).options(FromCache("pickled"))
    with maker() as s:
        s.scalars(stmt).all()  # stored with zstandard if installed
    monkeypatch.setattr(core, "_zstd", False)  # now "not installed"
    with maker() as s:
        assert len(s.scalars(stmt).all()) == 100
    with QueryCounter(engine) as c, maker() as s:
        assert len(s.scalars(stmt).all()) == 100
    assert c.selects == 0  # stored again with zlib, and read back


def test_a_key_lookup_whose_columns_read_other_rows_depends_on_the_table(tmp_path: Any) -> None:
    """A mapped SQL expression (``column_property``) can read other rows of
    the same table: a lookup by primary key of such an entity cannot depend
    on its row alone, or a write to another row would leave it stale."""
    from sqlalchemy import Column, Integer, func
    from sqlalchemy.orm import DeclarativeBase, Session, aliased, column_property

    class Local(DeclarativeBase):
        pass

    class Node(Local):
        __tablename__ = "nodes"
        id = Column(Integer, primary_key=True)
        group = Column(Integer)

    peer = aliased(Node)
    Node.peers = column_property(  # type: ignore[attr-defined]
        select(func.count()).where(peer.group == Node.group).correlate_except(peer).scalar_subquery()
    )
    engine = create_engine(f"sqlite:///{tmp_path}/nodes.db")
    Local.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Node(id=1, group=1), Node(id=2, group=1), Node(id=3, group=2)])
        s.commit()
    cache = OrmCache.from_settings({"namespace": "n" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}})
    maker = sessionmaker(engine)
    cache.attach(maker)
    try:
        def peers(how: str) -> int:
            with maker() as s:
                if how == "get":
                    node = s.get_one(Node, 1, options=[FromCache()])
                else:
                    node = s.scalars(select(Node).where(Node.id == 1).options(FromCache())).one()
                return node.peers  # type: ignore[attr-defined,no-any-return]

        assert peers("get") == peers("select") == 2
        with maker() as s:
            s.get_one(Node, 3).group = 1  # another row
            s.commit()
        assert peers("get") == peers("select") == 3
    finally:
        cache.close()
        engine.dispose()


def test_bulk_update_from_a_flush_event_invalidates_rows(env: Any) -> None:
    """An ORM bulk UPDATE by primary key run from ``after_flush`` (an audit
    or counter pattern) carries the same execution options as the flush's
    own row-by-row statements, but no mapper event names its rows: it must
    count as a bulk write, which ``session.get`` entries depend on."""
    from sqlalchemy import event, update
    from sqlalchemy.orm import Session

    from ormcache.testing.fixtures import Store

    engine, maker, cache = env

    def counter_name() -> tuple[str, int]:
        with QueryCounter(engine) as c, maker() as s:
            name = s.get_one(Store, 1, options=[FromCache()]).name
        return name, c.selects

    assert counter_name() == ("store1", 1)
    assert counter_name() == ("store1", 0)

    def count_new_templates(session: Session, flush_context: Any) -> None:
        added = [o for o in session.new if isinstance(o, Template)]
        if added:
            session.execute(update(Store), [{"id": 1, "name": f"store1+{len(added)}"}])

    writer = create_engine(engine.url)  # nothing listens to its connections
    event.listen(Session, "after_flush", count_new_templates)
    try:
        with Session(writer) as s:
            s.add(Template(id=500, store_id=2, name="new", body={}))
            s.commit()
    finally:
        event.remove(Session, "after_flush", count_new_templates)
        writer.dispose()
    assert counter_name() == ("store1+1", 1)


def test_database_cascades_invalidate_referencing_tables(tmp_path: Any, memory_cache: OrmCache) -> None:
    """Rows the database deletes or changes by itself, through foreign keys
    declared ON DELETE CASCADE / ON UPDATE CASCADE (SQLAlchemy's
    ``passive_deletes`` setup), invalidate the referencing table: its
    lists and its ``session.get`` entries."""
    from sqlalchemy import Column, ForeignKey, Integer, event
    from sqlalchemy.orm import DeclarativeBase, relationship

    class CBase(DeclarativeBase):
        pass

    class Parent(CBase):
        __tablename__ = "parent"
        id = Column(Integer, primary_key=True)
        label = Column(Integer, default=0)
        children = relationship("Child", cascade="all, delete-orphan", passive_deletes=True)

    class Child(CBase):
        __tablename__ = "child"
        id = Column(Integer, primary_key=True)
        parent_id = Column(ForeignKey("parent.id", ondelete="CASCADE", onupdate="CASCADE"))

    class GrandChild(CBase):
        __tablename__ = "grandchild"
        id = Column(Integer, primary_key=True)
        child_id = Column(ForeignKey("child.id", ondelete="SET NULL"), nullable=True)

    engine = create_engine(f"sqlite:///{tmp_path}/fk.db")
    event.listen(engine, "connect", lambda conn, record: conn.execute("PRAGMA foreign_keys=ON"))
    CBase.metadata.create_all(engine)
    maker = sessionmaker(engine)
    memory_cache.attach(maker)
    with maker.begin() as s:
        s.add_all([Parent(id=1), Parent(id=2), Child(id=10, parent_id=1), Child(id=20, parent_id=2)])
    with maker.begin() as s:
        s.add(GrandChild(id=100, child_id=10))

    def read() -> tuple[Any, ...]:
        with maker() as s:
            ten = s.get(Child, 10, options=[FromCache()])
            ids = [c.id for c in s.scalars(select(Child).order_by(Child.id).options(FromCache()))]
            twenty = s.get_one(Child, 20, options=[FromCache()])
            grand = s.get_one(GrandChild, 100, options=[FromCache()])
            return ten is not None, ids, twenty.parent_id, grand.child_id

    assert read() == read() == (True, [10, 20], 2, 10)
    try:
        with maker.begin() as s:
            s.get_one(Parent, 2).label = 1  # not a referenced column: nothing cascades
        with QueryCounter(engine) as counter:
            assert read() == (True, [10, 20], 2, 10)
        assert counter.selects == 0
        with maker.begin() as s:
            s.delete(s.get_one(Parent, 1))  # the database deletes child 10, nulls grandchild 100
            s.get_one(Parent, 2).id = 3  # the database moves child 20
        assert read() == (False, [20], 3, None)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    "write",
    [
        "text delete",
        "text update",
        "driver sql delete",
        "insert or replace",
        "on conflict do update",
    ],
)
def test_cascades_of_textual_writes_and_upserts(tmp_path: Any, memory_cache: OrmCache, write: str) -> None:
    """Foreign key actions follow textual DELETE/UPDATE (of mapped tables)
    and INSERTs that replace or update the rows they conflict with."""
    from sqlalchemy import Column, ForeignKey, Integer, event, insert, text
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert
    from sqlalchemy.orm import DeclarativeBase

    class XBase(DeclarativeBase):
        pass

    class XParent(XBase):
        __tablename__ = "xparent"
        id = Column(Integer, primary_key=True)

    class XChild(XBase):
        __tablename__ = "xchild"
        id = Column(Integer, primary_key=True)
        parent_id = Column(ForeignKey("xparent.id", ondelete="CASCADE", onupdate="CASCADE"))

    engine = create_engine(f"sqlite:///{tmp_path}/fk.db")
    event.listen(engine, "connect", lambda conn, record: conn.execute("PRAGMA foreign_keys=ON"))
    XBase.metadata.create_all(engine)
    maker = sessionmaker(engine)
    memory_cache.attach(maker)
    with maker.begin() as s:
        s.add(XParent(id=1))
    with maker.begin() as s:
        s.add_all([XChild(id=10, parent_id=1), XChild(id=11, parent_id=None)])
    stmt = select(XChild.id, XChild.parent_id).order_by(XChild.id).options(FromCache())

    def read() -> list[tuple[Any, ...]]:
        with maker() as s:
            return [tuple(r) for r in s.execute(stmt)]

    assert read() == read() == [(10, 1), (11, None)]
    writes = {
        "text delete": lambda c: c.execute(text("DELETE FROM xparent WHERE id = 1")),
        "text update": lambda c: c.execute(text("UPDATE xparent SET id = 9 WHERE id = 1")),
        "driver sql delete": lambda c: c.exec_driver_sql("DELETE FROM xparent WHERE id = 1"),
        "insert or replace": lambda c: c.execute(insert(XParent).prefix_with("OR REPLACE").values(id=1)),
        "on conflict do update": lambda c: c.execute(
            sqlite_insert(XParent).values(id=1).on_conflict_do_update(index_elements=["id"], set_={"id": 9})
        ),
    }
    try:
        with engine.begin() as conn:
            writes[write](conn)
        with engine.connect() as conn:
            expected = [tuple(r) for r in conn.execute(select(XChild.id, XChild.parent_id).order_by(XChild.id))]
        assert expected != [(10, 1), (11, None)]  # the database did change the child
        assert read() == expected
    finally:
        engine.dispose()


@pytest.mark.parametrize("write", ["update or replace", "table replaces: orm add", "table replaces: core insert"])
def test_writes_that_replace_conflicting_rows(tmp_path: Any, memory_cache: OrmCache, write: str) -> None:
    """SQLite's ``UPDATE OR REPLACE``, and any write to a table whose
    unique constraint says ``ON CONFLICT REPLACE``, delete the other rows
    they conflict with: a lookup of such a row by key, and the rows its
    foreign keys cascade to, are invalidated (found by review: stale)."""
    from sqlalchemy import Column, ForeignKey, Integer, String, event, insert, update
    from sqlalchemy.orm import DeclarativeBase

    class RBase(DeclarativeBase):
        pass

    replaces = write.startswith("table replaces")

    class RParent(RBase):
        __tablename__ = "rparent"
        id = Column(Integer, primary_key=True)
        code = Column(String, unique=True, sqlite_on_conflict_unique="REPLACE" if replaces else None)

    class RChild(RBase):
        __tablename__ = "rchild"
        id = Column(Integer, primary_key=True)
        parent_id = Column(ForeignKey("rparent.id", ondelete="CASCADE"))

    engine = create_engine(f"sqlite:///{tmp_path}/replace.db")
    event.listen(engine, "connect", lambda conn, record: conn.execute("PRAGMA foreign_keys=ON"))
    RBase.metadata.create_all(engine)
    maker = sessionmaker(engine)
    memory_cache.attach(maker)
    with maker.begin() as s:
        s.add_all([RParent(id=1, code="a"), RParent(id=2, code="b")])
    with maker.begin() as s:
        s.add(RChild(id=20, parent_id=2))
    children = select(RChild.id).order_by(RChild.id).options(FromCache())

    def read() -> tuple[Any, list[int]]:
        with maker() as s:
            parent = s.get(RParent, 2, options=[FromCache()])
            return (None if parent is None else parent.code), list(s.scalars(children))

    assert read() == read() == ("b", [20])
    with maker.begin() as s:
        if write == "update or replace":
            s.execute(update(RParent).prefix_with("OR REPLACE").where(RParent.id == 1).values(code="b"))
        elif write == "table replaces: orm add":
            s.add(RParent(id=3, code="b"))
        else:
            s.execute(insert(RParent).values(id=3, code="b"))
    try:
        assert read() == (None, [])  # row 2 replaced, its child deleted by cascade
    finally:
        engine.dispose()


def test_row_keys_agree_however_the_key_is_spelled(tmp_path: Any, memory_cache: OrmCache) -> None:
    """A lookup and a write of one row name it alike: a decimal key with
    another scale, a string key in another case under a case-insensitive
    collation, and a row written through a class mapped to a join of its
    table with another."""
    from decimal import Decimal

    from sqlalchemy import Column, ForeignKey, Integer, Numeric, String, Table, join
    from sqlalchemy.orm import DeclarativeBase, column_property

    class KBase(DeclarativeBase):
        pass

    class Price(KBase):
        __tablename__ = "price"
        id = Column(Numeric(10, 4), primary_key=True)
        v = Column(String)

    class User(KBase):
        __tablename__ = "users"
        name = Column(String(collation="NOCASE"), primary_key=True)
        v = Column(String)

    a = Table("a", KBase.metadata, Column("id", Integer, primary_key=True), Column("v", String))
    b = Table("b", KBase.metadata, Column("id", Integer, primary_key=True), Column("a_id", ForeignKey("a.id")))

    class A(KBase):
        __table__ = a

    class AB(KBase):
        __table__ = join(a, b)
        id = column_property(a.c.id, b.c.a_id)
        b_id = b.c.id

    engine = create_engine(f"sqlite:///{tmp_path}/keys.db")
    KBase.metadata.create_all(engine)
    maker = sessionmaker(engine)
    memory_cache.attach(maker)
    with maker.begin() as s:
        s.add_all([Price(id=Decimal("5"), v="old"), User(name="ABC", v="old"), A(id=1, v="old")])
    with engine.begin() as conn:
        conn.execute(b.insert().values(id=10, a_id=1))

    def read() -> tuple[str, ...]:
        with maker() as s:
            return (
                s.get_one(Price, Decimal("5"), options=[FromCache()]).v,
                s.get_one(User, "abc", options=[FromCache()]).v,
                s.get_one(A, 1, options=[FromCache()]).v,
            )

    try:
        assert read() == read() == ("old", "old", "old")
        with maker.begin() as s:
            s.get_one(Price, Decimal("5.0000")).v = "new"
            s.get_one(User, "ABC").v = "new"
            s.scalars(select(AB)).one().v = "new"
        assert read() == ("new", "new", "new")
    finally:
        engine.dispose()


def test_commit_after_pending_tokens_expired(env: Any, monkeypatch: Any) -> None:
    """A transaction that outlives its pending tokens: readers replace
    them and store the old rows meanwhile (legitimately: the write is not
    committed).  Its commit must not leave those entries valid until the
    connection is next used or checked in."""
    import time

    from sqlalchemy import update

    from ormcache import invalidation
    from ormcache.testing.fixtures import template_table

    engine, maker, cache = env
    monkeypatch.setattr(invalidation, "PENDING_TTL", 0.3)

    def name() -> str:
        with maker() as s:
            return s.get_one(Template, 1, options=[FromCache()]).name

    assert name() == name() == "t1"
    writer = create_engine(engine.url)
    conn = writer.connect()
    try:
        conn.execute(update(template_table).where(template_table.c.id == 1).values(name="new"))
        time.sleep(0.4)  # its pending tokens expire
        assert name() == "t1"  # replaces the expired token
        assert name() == "t1"  # stores the committed (old) row
        with QueryCounter(engine) as counter:
            assert name() == "t1"
        assert counter.selects == 0
        conn.commit()  # the connection stays open, unused
        assert name() == "new"
    finally:
        conn.close()
        writer.dispose()


def test_only_flushing_sessions_are_looked_through(env: Any) -> None:
    """Every statement of a flush asks which sessions of the thread are
    flushing; sessions leave that set when their flush is over, so the
    question costs the same with one session or thousands alive."""
    from ormcache import invalidation

    engine, maker, cache = env
    sessions = [maker() for _ in range(50)]
    try:
        for i, s in enumerate(sessions):
            s.get_one(Template, 1 + i % 10).name = f"n{i}"
            s.flush()
            s.rollback()  # alive, not flushing
        assert not [s for s in invalidation._flush_local.sessions if s in sessions]
    finally:
        for s in sessions:
            s.close()


def test_what_cannot_be_attached_is_named(env: Any) -> None:
    from sqlalchemy import create_engine

    from ormcache import OrmCache

    _, _, cache = env
    engine = create_engine("sqlite://")
    with pytest.raises(TypeError, match=r"cannot attach to Engine\(sqlite://\).*sessionmaker bound to it"):
        cache.attach(engine)
    with pytest.raises(TypeError, match="cannot attach to 5: pass a Session class"):
        cache.attach(5)
    with pytest.raises(TypeError, match=r"takes a Settings object, not dict.*from_settings"):
        OrmCache({"regions": {"default": {"backend": "memory"}}})  # type: ignore[arg-type]


def test_invalidate_statement_refuses_what_it_cannot_do(env: Any) -> None:
    """A statement's entry is per database: a process that has cached from
    none (a script, a migration) must name it, rather than drop nothing;
    a parameter the statement does not have, and arguments of the wrong
    kind, are named."""
    from sqlalchemy import bindparam

    engine, maker, _ = env
    settings = {"namespace": "fresh" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}}
    fresh = OrmCache.from_settings(settings)
    stmt = select(Template).where(Template.store_id == bindparam("sid")).options(FromCache())
    try:
        with pytest.raises(ormcache.ConfigurationError, match="cached from no database yet.*session= or bind="):
            fresh.invalidate(stmt, params={"sid": 1})
        fresh.invalidate(stmt, params={"sid": 1}, bind=engine)
        with pytest.raises(ormcache.ConfigurationError, match=r"no parameter 'sdi'; its named parameters: 'sid'"):
            fresh.invalidate(stmt, params={"sdi": 1}, bind=engine)
        with pytest.raises(ormcache.ConfigurationError, match=r"no value for the statement's parameter 'sid'; pass params=\{'sid': ...\}"):
            fresh.invalidate(stmt, bind=engine)  # (would drop the entry of sid=None)
        with pytest.raises(TypeError, match="params=.*mapping"):
            fresh.invalidate(stmt, params="x", bind=engine)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="session=.*takes a Session"):
            fresh.invalidate(stmt, session="x")
        with pytest.raises(TypeError, match="bind=.*Engine or a Connection"):
            fresh.invalidate(stmt, bind="x")
        with pytest.raises(TypeError, match=r"of a statement takes params.*\['bogus'\]"):
            fresh.invalidate(stmt, bogus=1)
        with pytest.raises(TypeError, match="of a relationship takes no arguments"):
            fresh.invalidate(ormcache.testing.fixtures.Store.templates, shard="x")
        with pytest.raises(ormcache.ConfigurationError, match=r"^Template.name is not a relationship"):
            fresh.invalidate(Template.name)
    finally:
        fresh.close()


def test_invalidate_a_statement_with_relationship_cache_options(env: Any) -> None:
    """A RelationshipCache option on a statement names the region of its
    objects' lazy loads, not the statement's own: invalidate(stmt) drops
    the statement's FromCache entry whatever the options' order."""
    from ormcache import RelationshipCache
    from ormcache.testing.fixtures import Store

    engine, maker, cache = env
    for first in ("relationship", "statement"):
        options = [RelationshipCache(Store.templates, "pickled"), FromCache()]
        stmt = select(Store).where(Store.id == 1).options(*(options if first == "relationship" else options[::-1]))
        with maker() as s:
            s.scalars(stmt).one()
        unseen_write(engine, f"UPDATE {Store.__tablename__} SET name = 'changed {first}'")
        cache.invalidate(stmt)
        with maker() as s:
            assert s.scalars(stmt).one().name == f"changed {first}"
    only = select(Store).options(RelationshipCache(Store.templates, "pickled"))
    with pytest.raises(ormcache.ConfigurationError, match=r"invalidate\(Parent.relationship\)"):
        cache.invalidate(only)


def test_backend_error_carries_the_drivers_error(tmp_path: Any) -> None:
    from servers import closed_port

    cache = OrmCache.from_settings(
        {
            "namespace": "be" + uuid.uuid4().hex[:8],
            "regions": {"r": {"backend": "redis", "arguments": {"url": f"redis://127.0.0.1:{closed_port()}/0"}}},
        }
    )
    try:
        with pytest.raises(ormcache.BackendError) as info:
            cache.invalidate(Template)
        assert type(info.value.__cause__).__name__ == "ConnectionError"
        with pytest.raises(ormcache.BackendError) as info:
            cache.invalidate_all()
        assert info.value.__cause__ is not None
    finally:
        cache.close()


@pytest.mark.parametrize("how", ["text", "literal_column", "text-from", "exists-text-from", "join-text"])
def test_textual_subquery_depends_on_every_write(env: Any, how: str) -> None:
    """A ``text()`` or ``literal_column()`` fragment holding a subquery reads
    a table SQLAlchemy does not see: a write to that table invalidates it
    all the same (as any write to the database does)."""
    from sqlalchemy import literal_column, text

    from ormcache.testing.fixtures import Store

    engine, maker, _ = env
    if how == "text":
        stmt = select(Template.id).where(text("store_id IN (SELECT id FROM stores WHERE name = 'store1')"))
    elif how == "text-from":
        named = select(literal_column("id")).select_from(text("stores")).where(text("name = 'store1'"))
        stmt = select(Template.id).where(Template.store_id.in_(named))
    elif how == "exists-text-from":
        from sqlalchemy import exists

        named = exists().select_from(text("stores")).where(text("stores.id = templates.store_id AND name = 'store1'"))
        stmt = select(Template.id).where(named)
    elif how == "join-text":
        from sqlalchemy import join

        from ormcache.testing.fixtures import template_table

        joined = join(template_table, text("stores"), text("stores.id = templates.store_id"))
        stmt = select(Template.id).select_from(joined).where(text("stores.name = 'store1'"))
    else:
        named = literal_column("(SELECT name FROM stores WHERE stores.id = templates.store_id)")
        stmt = select(Template.id, named).where(Template.id == 1)
    stmt = stmt.order_by(Template.id).options(FromCache())

    def read() -> tuple[list[Any], int]:
        with QueryCounter(engine) as counter, maker() as s:
            rows = [tuple(r) for r in s.execute(stmt)]
        return rows, counter.selects

    first, _ = read()
    assert read() == (first, 0)
    with maker() as s:
        s.get(Store, 1).name = "renamed"
        s.commit()
    after, selects = read()
    assert selects == 1 and after != first
    assert read() == (after, 0)


@pytest.mark.parametrize("how", ["model", "instance", "table", "relationship"])
def test_explicit_invalidation_reaches_results_of_unknown_tables(env: Any, how: str) -> None:
    """A result whose tables ormcache cannot know (a textual FROM) may
    read any model's table: ``invalidate(Model)`` and ``invalidate_table()``,
    the remedy for writes made outside SQLAlchemy, drop it too."""
    from sqlalchemy import func, text

    from ormcache.testing.fixtures import Store

    engine, maker, cache = env
    stmt = select(func.count()).select_from(text("templates")).options(FromCache())

    def count() -> tuple[int, int]:
        with QueryCounter(engine) as counter, maker() as s:
            n = s.execute(stmt).scalar_one()
        return n, counter.selects

    assert count() == (100, 1)
    assert count() == (100, 0)
    unseen_write(engine, "DELETE FROM templates WHERE id = 100")
    assert count() == (100, 0)
    if how == "model":
        cache.invalidate(Template)
    elif how == "instance":
        with maker() as s:
            cache.invalidate(s.get(Template, 1))
    elif how == "table":
        cache.invalidate_table("templates")
    else:
        cache.invalidate(Store.templates)
    assert count() == (99, 1)


@pytest.mark.parametrize(
    "spelt", ['"templates"', "[templates]", "`templates`", 'main."TEMPLATES"', " Templates ", "main . templates"]
)
def test_invalidate_table_takes_a_quoted_name(env: Any, spelt: str) -> None:
    """A table name quoted as SQL quotes it names the table (it named a
    key nobody reads, silently: found by review)."""
    engine, maker, cache = env
    stmt = select(Template.name).where(Template.id == 1).options(FromCache())

    def name() -> tuple[str, int]:
        with QueryCounter(engine) as counter, maker() as s:
            value = s.execute(stmt).scalar_one()
        return value, counter.selects

    assert name() == ("t1", 1)
    assert name() == ("t1", 0)
    cache.invalidate_table(spelt)
    assert name() == ("t1", 1)


@pytest.mark.parametrize("bad", ['"templates', "[a].[b", "", "   ", 5, "t.", "a.b.c.d", "t; DROP", "'templates'", "templates\x00"])
def test_invalidate_table_refuses_what_is_not_a_name(env: Any, bad: Any) -> None:
    _, _, cache = env
    with pytest.raises(ormcache.ConfigurationError, match="invalidate_table\\(\\) takes a table name"):
        cache.invalidate_table(bad)


def _within(seconds: float, fn: Any) -> Any:
    """``fn()``, run in a thread: fails the test rather than hang it."""
    import threading

    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert out, f"still running after {seconds} s"
    return out[0]


@pytest.mark.parametrize("second", ["session-class", "session"])
def test_attached_twice_to_one_session(env: Any, second: str) -> None:
    """Attached to a sessionmaker and to its Session class (or to a session
    it made): the listener runs again inside the execution that answers
    its own miss, which must not wait for the lock it holds."""
    from sqlalchemy.orm import Session

    engine, _, cache = env

    class AppSession(Session):
        pass

    maker = sessionmaker(engine, class_=AppSession)
    cache.attach(maker)
    if second == "session-class":
        cache.attach(AppSession)
    stmt = select(Template.name).where(Template.id == 1).options(FromCache())

    def read() -> tuple[str, int]:
        with QueryCounter(engine) as c, maker() as s:
            if second == "session":
                cache.attach(s)
            name = s.execute(stmt).scalar_one()
        return name, c.selects

    assert _within(10, read) == ("t1", 1)
    assert _within(10, read) == ("t1", 0)


@pytest.mark.parametrize("order", ["class first", "factory first", "scoped"])
def test_detach_of_overlapping_targets(env: Any, order: str) -> None:
    """A sessionmaker and its Session class (or a scoped_session over it)
    both attached, then detached: nothing listens any more, and after
    close() reads go to the database."""
    from sqlalchemy import event
    from sqlalchemy.orm import Session, scoped_session

    engine, _, cache = env

    class AppSession(Session):
        pass

    maker = sessionmaker(engine, class_=AppSession)
    other: Any = scoped_session(maker) if order == "scoped" else AppSession
    cache.attach(maker)
    cache.attach(other)
    for target in (other, maker) if order != "factory first" else (maker, other):
        cache.detach(target)
    stmt = select(Template.name).where(Template.id == 1).options(FromCache())
    with maker() as s:
        assert len(s.dispatch.do_orm_execute) == 0
    for _ in range(2):
        with QueryCounter(engine) as counter, maker() as s:
            assert s.execute(stmt).scalar_one() == "t1"
        assert counter.selects == 1
    cache.attach(maker)
    cache.attach(other)
    cache.close()
    assert not any(event.contains(t, "do_orm_execute", cache._do_orm_execute) for t in (maker, AppSession))
    with QueryCounter(engine) as counter, maker() as s:
        assert s.execute(stmt).scalar_one() == "t1"
    assert counter.selects == 1


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_two_caches_on_one_session_factory(tmp_path: Any, request: Any, backend: str) -> None:
    """Two OrmCache instances attached to one sessionmaker (the same
    settings, so one Redis region): the first listener caches the
    statement; the second sees the execution that answers its miss and
    leaves it alone rather than wait for the first one's lock."""
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    seed(engine, stores=1, per_store=3)
    arguments = {"url": request.getfixturevalue("redis_url")} if backend == "redis" else {}
    settings = {
        "namespace": "two" + uuid.uuid4().hex[:8],
        "regions": {"default": {"backend": backend, "arguments": arguments}},
    }
    caches = [OrmCache.from_settings(settings), OrmCache.from_settings(settings)]
    maker = sessionmaker(engine)
    for cache in caches:
        cache.attach(maker)
    stmt = select(Template.name).where(Template.id == 1).options(FromCache())

    def read() -> tuple[str, int]:
        with QueryCounter(engine) as c, maker() as s:
            name = s.execute(stmt).scalar_one()
        return name, c.selects

    try:
        assert _within(10, read) == ("t1", 1)
        assert _within(10, read) == ("t1", 0)
    finally:
        for cache in caches:
            cache.close()
        engine.dispose()


def test_two_caches_with_regions_of_their_own(tmp_path: Any) -> None:
    """Two OrmCache instances on one sessionmaker, each declaring a region
    the other does not: a statement is cached by the one that declares
    its region; one that no cache declares is an error naming the region."""
    from ormcache import UnknownRegionError

    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    seed(engine, stores=1, per_store=3)
    maker = sessionmaker(engine)
    caches = [
        OrmCache.from_settings({"namespace": "a" + uuid.uuid4().hex[:8], "regions": {"first": {"backend": "memory"}}}),
        OrmCache.from_settings({"namespace": "b" + uuid.uuid4().hex[:8], "regions": {"second": {"backend": "memory"}}}),
    ]
    for cache in caches:
        cache.attach(maker)
    try:
        for region in ("first", "second"):
            stmt = select(Template.name).where(Template.id == 1).options(FromCache(region))
            for expected in (1, 0):
                with QueryCounter(engine) as c, maker() as s:
                    assert s.execute(stmt).scalar_one() == "t1"
                assert c.selects == expected, region
        with maker() as s, pytest.raises(UnknownRegionError, match="nowhere"):
            s.execute(select(Template).options(FromCache("nowhere")))
    finally:
        for cache in caches:
            cache.close()
        engine.dispose()


def test_attach_after_close_is_refused(env: Any) -> None:
    """A closed cache no longer follows writes: caching reads through it
    again would serve stale rows."""
    from ormcache import ConfigurationError

    engine, maker, cache = env
    cache.close()
    with pytest.raises(ConfigurationError, match="closed"):
        cache.attach(sessionmaker(engine))


def test_refresh_of_an_object_a_cached_lazy_load_brought(env: Any) -> None:
    """``Session.refresh()`` and expired attributes ask the database, also
    for an object that a ``RelationshipCache`` lazy load brought in (the
    option travels with the object's load path): refresh is how an
    application re-reads a row something outside SQLAlchemy changed."""
    from ormcache import RelationshipCache
    from ormcache.testing.fixtures import Store

    engine, maker, _ = env
    stmt = select(Store).where(Store.id == 1).options(RelationshipCache(Store.templates))
    with maker() as s:
        template = next(t for t in s.scalars(stmt).one().templates if t.id == 1)
        s.refresh(template)
        unseen_write(engine, "UPDATE templates SET name = 'outside' WHERE id = 1")
        s.refresh(template)
        assert template.name == "outside"
        unseen_write(engine, "UPDATE templates SET name = 'outside again' WHERE id = 1")
        s.expire(template)
        assert template.name == "outside again"


def test_values_given_by_select_params(env: Any) -> None:
    """``Select.params()`` gives values to named bound parameters (kept in
    the cache key's ``params`` from SQLAlchemy 2.1): each is its own entry."""
    from sqlalchemy import bindparam

    engine, maker, _ = env
    stmt = select(Template.name).where(Template.id == bindparam("tid")).options(FromCache())
    for _ in range(2):
        for tid in (1, 2):
            with maker() as s:
                assert s.execute(stmt.params(tid=tid)).scalar_one() == f"t{tid}"


def test_a_key_lookup_that_reads_other_rows_of_its_table(tmp_path: Any) -> None:
    """``session.get`` (or ``select(M).where(M.pk == v)``) whose SQL reads
    other rows of the same table under an alias (a self-referential joined
    eager load, an aliased self-join) depends on the whole table, not on
    its row: a write to the other row invalidates it."""
    from sqlalchemy import ForeignKey, Integer, String, and_
    from sqlalchemy.orm import DeclarativeBase, aliased, mapped_column, relationship

    class NodeBase(DeclarativeBase):
        pass

    class Node(NodeBase):
        __tablename__ = "node"
        id = mapped_column(Integer, primary_key=True)
        name = mapped_column(String(50))
        parent_id = mapped_column(ForeignKey("node.id"), nullable=True)
        parent = relationship("Node", remote_side=[id], lazy="joined", join_depth=1)

    engine = create_engine(f"sqlite:///{tmp_path}/nodes.db")
    NodeBase.metadata.create_all(engine)
    cache = OrmCache.from_settings({"namespace": "sj" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}})
    maker = sessionmaker(engine)
    cache.attach(maker)
    parent = aliased(Node)
    reads = {
        "get, joined eager load": lambda s: s.get(Node, 2, options=[FromCache()]).parent.name,
        "aliased self-join": lambda s: [
            n.name
            for n in s.scalars(
                select(Node)
                .join(parent, and_(parent.id == Node.parent_id, parent.name == "root"))
                .where(Node.id == 2)
                .options(FromCache())
            ).unique()
        ],
    }
    try:
        with maker() as s:
            s.add_all([Node(id=1, name="root"), Node(id=2, name="child", parent_id=1)])
            s.commit()
        for how, read in reads.items():
            with maker() as s:
                s.get(Node, 1).name = "root"
                s.commit()
            with maker() as s:
                before = read(s)
            with maker() as s:
                s.get(Node, 1).name = "renamed"
                s.commit()
            with maker() as s:
                assert read(s) != before, how
    finally:
        cache.close()
        engine.dispose()


def test_a_listener_after_ours_that_changes_the_statement(env: Any) -> None:
    """SQLAlchemy's multi-tenant recipe, a ``do_orm_execute`` listener that
    adds ``with_loader_criteria``, registered after ``attach()``: it runs
    inside the execution that answers ormcache's miss, on a statement the
    key does not describe. Those rows are not stored."""
    import contextvars

    from sqlalchemy import event
    from sqlalchemy.orm import with_loader_criteria

    engine, _, cache = env
    store_id: contextvars.ContextVar[int] = contextvars.ContextVar("store_id")
    maker = sessionmaker(engine)
    cache.attach(maker)

    @event.listens_for(maker, "do_orm_execute")
    def per_tenant(state: Any) -> None:
        if state.is_select and not state.is_column_load and not state.is_relationship_load:
            tid = store_id.get()
            state.statement = state.statement.options(
                with_loader_criteria(Template, lambda cls: cls.store_id == tid)
            )

    stmt = select(Template).where(Template.id.in_([1, 51])).order_by(Template.id).options(FromCache())
    for _ in range(2):
        for tid, expected in ((1, [1]), (2, [51])):
            store_id.set(tid)
            with maker() as s:
                assert [t.id for t in s.scalars(stmt)] == expected


def test_one_cache_key_given_to_two_statements(env: Any) -> None:
    """``FromCache(cache_key=...)`` names a statement's result instead of its
    parameters; given to two statements of different shapes, each keeps
    its own entry (one was built as the other's objects before: a Store
    whose id was a name)."""
    from ormcache.testing.fixtures import Store

    engine, maker, _ = env
    columns = select(Store.name, Store.id).order_by(Store.id).options(FromCache(cache_key="k"))
    entities = select(Store).order_by(Store.id).options(FromCache(cache_key="k"))
    for _ in range(2):
        with maker() as s:
            assert s.execute(columns).all() == [("store1", 1), ("store2", 2)]
        with maker() as s:
            assert [(st.id, st.name) for st in s.scalars(entities)] == [(1, "store1"), (2, "store2")]
    with QueryCounter(engine) as c, maker() as s:
        s.execute(columns).all()
        s.scalars(entities).all()
    assert c.selects == 0


def test_binds_of_other_types_are_other_entries(env: Any) -> None:
    """Two statements with the same SQL and the same values whose binds'
    types process the values differently (a TypeDecorator) send the
    database different values: each has its own entry."""
    from sqlalchemy import String, TypeDecorator, bindparam

    class Upper(TypeDecorator):  # type: ignore[type-arg]
        impl = String
        cache_ok = True

        def process_bind_param(self, value: Any, dialect: Any) -> Any:
            return None if value is None else value.upper()

    engine, maker, _ = env
    unseen_write(engine, "UPDATE templates SET name = 'T1' WHERE id = 2")
    plain = select(Template.id).where(Template.name == bindparam("n", "t1")).options(FromCache())
    upper = select(Template.id).where(Template.name == bindparam("n", "t1", type_=Upper)).options(FromCache())
    for _ in range(2):
        with maker() as s:
            assert s.scalars(plain).all() == [1]
        with maker() as s:
            assert s.scalars(upper).all() == [2]


def test_a_key_lookup_with_a_joined_eager_load_of_another_table(env: Any) -> None:
    """A joined eager load aliases the *related* table: the lookup still
    depends on its own row (and on the related table as a whole), so a
    write to another row of its table leaves it cached."""
    from sqlalchemy.orm import joinedload

    engine, maker, _ = env

    def read() -> int:
        with QueryCounter(engine) as c, maker() as s:
            template = s.get_one(Template, 1, options=[FromCache(), joinedload(Template.store)])
            assert template.store.name == "store1"
        return c.selects

    assert read() == 1
    with maker() as s:
        s.get_one(Template, 2).name = "another row"
        s.commit()
    assert read() == 0


def test_a_commit_that_fails_and_leaves_the_transaction_open(tmp_path: Any, memory_cache: OrmCache) -> None:
    """SQLite keeps the transaction open when a deferred foreign key fails
    at COMMIT, and SQLAlchemy's ``rollback()`` then sends nothing: a later
    ``commit()`` commits the earlier writes.  They stay pending until
    then, and are announced when it returns."""
    from sqlalchemy import event, update

    from ormcache.testing.fixtures import template_table

    engine = create_engine(f"sqlite:///{tmp_path}/deferred.db")
    event.listen(engine, "connect", lambda conn, record: conn.execute("PRAGMA foreign_keys=ON"))
    Base.metadata.create_all(engine)
    seed(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE child (id INTEGER PRIMARY KEY, "
            "template_id INTEGER REFERENCES templates(id) DEFERRABLE INITIALLY DEFERRED)"
        )
    maker = sessionmaker(engine)
    memory_cache.attach(maker)
    stmt = select(Template.name).where(Template.id == 1).options(FromCache())

    def name() -> str:
        with maker() as s:
            return s.scalars(stmt).one()

    assert name() == name() == "t1"
    try:
        conn = engine.connect()
        conn.execute(update(template_table).where(template_table.c.id == 1).values(name="new"))
        conn.exec_driver_sql("INSERT INTO child VALUES (1, 999)")  # breaks the deferred key
        with pytest.raises(Exception, match="FOREIGN KEY"):
            conn.commit()
        conn.rollback()
        assert conn.connection.dbapi_connection.in_transaction  # still open
        conn.execute(select(1))
        with QueryCounter(engine) as counter:
            assert name() == "t1" and name() == "t1"  # the committed row, never stored
        assert counter.selects == 2
        conn.exec_driver_sql("DELETE FROM child")
        conn.commit()  # commits the update
        assert name() == "new"
        conn.close()
    finally:
        engine.dispose()


def test_a_relationship_cache_of_an_undeclared_region_is_refused_at_the_query(env: Any) -> None:
    """As FromCache's: said when the statement runs, not later at an
    attribute access (which may be inside a flush, a write)."""
    from ormcache import RelationshipCache
    from ormcache.testing.fixtures import Store

    engine, maker, cache = env
    stmt = select(Store).where(Store.id == 1).options(RelationshipCache(Store.templates, "typo"))
    chained = RelationshipCache(Store.templates, "default").and_(RelationshipCache(Template.store, "typo"))
    for statement in (stmt, select(Store).where(Store.id == 1).options(chained)):
        with maker() as s:
            with pytest.raises(UnknownRegionError, match="'typo'"):
                s.scalars(statement).one()
    # an object that carries the option into a session whose cache does not
    # declare the region: its expired attributes load all the same
    other = OrmCache.from_settings({"namespace": "o" + uuid.uuid4().hex[:8], "regions": {"reports": {"backend": "memory"}}})
    other_maker = sessionmaker(engine)
    other.attach(other_maker)
    try:
        with maker() as s:
            store = s.scalars(
                select(Store).where(Store.id == 1).options(RelationshipCache(Store.templates, "default"))
            ).one()
            s.expunge(store)
        with other_maker() as s:
            s.add(store)
            s.expire(store, ["name"])
            assert store.name == "store1"
    finally:
        other.close()


def test_parameters_without_a_stable_text_form(env: Any) -> None:
    """A value whose repr shows a memory address cannot make a key that
    another process agrees on: refused; a string that says " at 0x" is an
    ordinary value, and cached."""
    from ormcache.exc import CacheKeyError
    from ormcache.keys import query_key

    engine, maker, cache = env

    class Thing:
        pass

    with pytest.raises(CacheKeyError, match="memory address"):
        query_key("ns", "default", "db", None, None, "SELECT ?", (Thing(),), None)
    assert query_key("ns", "default", "db", None, None, "SELECT ?", ("located at 0x1F",), None)
    logged = "<app.Thing object at 0x7f3a>"  # a repr, logged as a string
    assert query_key("ns", "default", "db", None, None, "SELECT ?", ((logged, 1),), None)
    with pytest.raises(CacheKeyError, match="memory address"):
        query_key("ns", "default", "db", None, None, "SELECT ?", ((logged, Thing()),), None)
    assert query_key("ns", "default", "db", None, None, "SELECT ?", ({"note": logged},), None)
    with pytest.raises(CacheKeyError, match="memory address"):
        query_key("ns", "default", "db", None, None, "SELECT ?", ({"thing": Thing()},), None)
    said = select(Template).where(Template.name == "located at 0x1F").options(FromCache())
    for expected in (1, 0):
        with QueryCounter(engine) as counter, maker() as s:
            s.scalars(said).all()
        assert counter.selects == expected


def test_a_region_of_a_cache_not_attached_to_the_session(env: Any) -> None:
    """Another OrmCache of the process declares the region, but does not
    listen to this session: the region is unknown here, and said so."""
    engine, maker, cache = env
    other = OrmCache.from_settings(
        {"namespace": "o" + uuid.uuid4().hex[:8], "regions": {"elsewhere": {"backend": "memory"}}}
    )
    try:
        with maker() as s:
            with pytest.raises(UnknownRegionError, match="'elsewhere'"):
                s.execute(select(Template).where(Template.id == 1).options(FromCache("elsewhere")))
        other.attach(maker)  # now it does: it caches the statement
        with maker() as s:
            s.execute(select(Template).where(Template.id == 1).options(FromCache("elsewhere"))).all()
    finally:
        other.close()


def test_commit_prepared_without_sql_invalidates_the_database(env: Any, monkeypatch: Any) -> None:
    """``Connection.commit_prepared()`` of a transaction prepared elsewhere
    (a recovery): psycopg2 commits it with the driver's ``tpc_commit``, no
    SQL to see; the commit's return makes every result of the database
    stale-proof (the dialect's two-phase commit stands in for it here)."""
    from ormcache import invalidation

    engine, maker, cache = env
    stmt = select(Template.name).where(Template.id == 1).options(FromCache())
    dialect = engine.dialect
    monkeypatch.setattr(dialect, "do_commit_twophase", lambda connection, xid, is_prepared=True, recover=False: None)
    monkeypatch.delitem(dialect.__dict__, "_ormcache_do_commit", raising=False)
    invalidation._follow_commits(dialect)

    def selects() -> int:
        with QueryCounter(engine) as counter, maker() as s:
            assert s.scalars(stmt).one() == "t1"
        return counter.selects

    assert [selects(), selects()] == [1, 0]
    with engine.connect() as conn:
        conn.commit_prepared("recovered-xid", recover=True)
    assert [selects(), selects()] == [1, 0]


def test_a_cache_nothing_listens_through_goes_with_its_last_reference(tmp_path: Any) -> None:
    """Detached (or never attached), a dropped OrmCache is freed at once,
    not at the cycle collector's next run: until then it would go on
    writing fresh tokens for every commit of the process."""
    import gc
    import weakref

    engine = create_engine(f"sqlite:///{tmp_path}/gone.db")
    maker = sessionmaker(engine)
    gc.disable()
    try:
        for attach in (False, True):
            cache = OrmCache.from_settings({"regions": {"default": {"backend": "memory"}}})
            if attach:
                cache.attach(maker)
                cache.detach(maker)
            ref = weakref.ref(cache)
            del cache
            assert ref() is None, attach
    finally:
        gc.enable()
        engine.dispose()


def test_dml_with_loader_options_of_the_cache(env: Any) -> None:
    """An ORM UPDATE/DELETE/INSERT ... RETURNING carrying cache options (a
    RelationshipCache for the objects RETURNING gives back, a FromCache):
    the write runs, never failed by the cache, even for a region that no
    cache declares."""
    from sqlalchemy import delete, insert, update

    from ormcache import RelationshipCache
    from ormcache.testing.fixtures import Store

    engine, maker, cache = env
    for region in ("default", "typo"):
        options = (RelationshipCache(Store.templates, region), FromCache(region))
        with maker() as s:
            created = s.scalars(insert(Store).values(id=90, name="new").returning(Store).options(*options)).one()
            assert created.name == "new"
            s.execute(update(Store).where(Store.id == 90).values(name="renamed").options(*options))
            s.execute(delete(Store).where(Store.id == 90).options(*options))
            s.commit()


def test_entries_that_are_not_this_keys(env: Any) -> None:
    """Someone who can write to the backend copies an entry onto another
    key (another query's), or writes something that is no entry at all:
    a miss, refilled, never another query's rows nor an error."""
    engine, maker, cache = env
    store = cache.region("pickled").backend._cache  # type: ignore[attr-defined]
    one = select(Template).where(Template.name == "t1").options(FromCache("pickled"))
    two = select(Template).where(Template.name == "t2").options(FromCache("pickled"))
    ids = select(Template.id).where(Template.name == "t3").options(FromCache("pickled"))

    def names(stmt: Any) -> tuple[list[Any], int]:
        with QueryCounter(engine) as counter, maker() as s:
            got = [getattr(r, "name", r) for r in s.scalars(stmt)]
        return got, counter.selects

    keys = []
    for stmt in (one, two, ids):
        before = set(store)
        names(stmt)
        keys.append((set(store) - before - {k for k in store if ":v:" in k}).pop())
    one_key, two_key, ids_key = keys
    store[two_key] = store[one_key]  # t1's entry under t2's key
    assert names(two) == (["t2"], 1)
    store[two_key] = store[ids_key]  # an entry of one column under a key of five
    assert names(two) == (["t2"], 1)
    for junk in ({"stats": 1}, ("short",), b"\\x80garbage"):
        store[two_key] = junk if not isinstance(junk, bytes) else junk
        assert names(two) == (["t2"], 1)
    assert names(two) == (["t2"], 0)  # stored again
    assert cache.stats()["regions"]["pickled"]["errors"] == 0


@pytest.mark.parametrize("token", ["", "p", "pxyz", "p:inf", "p:nan", "p:1e18", 7, 3.5, None.__class__])
def test_version_tokens_that_are_not_tokens(env: Any, token: Any) -> None:
    """A version key holding what ormcache never writes: a read goes to the
    database, replaces the token, and is stored again; never an error."""
    engine, maker, cache = env
    stmt = select(Template).where(Template.id == 1).options(FromCache())
    with maker() as s:
        s.scalars(stmt).one()
    items = cache.region("default").backend._cache  # type: ignore[attr-defined]
    for key in [k for k in items if ":v:" in k]:
        items[key] = token
    for _ in range(3):
        with maker() as s:
            assert s.scalars(stmt).one().name == "t1"
    with QueryCounter(engine) as counter, maker() as s:
        assert s.scalars(stmt).one().name == "t1"
    assert counter.selects == 0


def test_a_row_written_with_its_key_as_another_type_is_seen(tmp_path: Any) -> None:
    """``Item(id="5")`` inserts row 5 (the driver and the column take the
    string), but its key is not spelt as ``get(Item, 5)`` spells it: the
    write moves the table's key of entity results, so a cached "no such
    row" of that lookup goes."""
    from sqlalchemy import Column, Integer, String
    from sqlalchemy.orm import DeclarativeBase

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "typed_items"
        id = Column(Integer, primary_key=True)
        name = Column(String)

    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    cache = OrmCache.from_settings({"namespace": "ty" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}})
    Session = sessionmaker(engine)
    cache.attach(Session)

    def found(ident: Any) -> tuple[str | None, int]:
        with QueryCounter(engine) as counter, Session() as s:
            item = s.get(Item, ident, options=[FromCache()])
            by_select = s.scalars(select(Item).where(Item.id == ident).options(FromCache())).one_or_none()
            assert (item is None) == (by_select is None)
        return (None if item is None else item.name), counter.selects

    try:
        for n, spelt in ((5, "5"), (6, 6.0)):
            assert found(n)[0] is None
            assert found(n) == (None, 0)  # cached: no such row
            with Session() as s:
                s.add(Item(id=spelt, name=f"item {n}"))  # type: ignore[arg-type]
                s.commit()
            assert found(n)[0] == f"item {n}"  # (get and the select agree: found checks)
    finally:
        cache.close()
        engine.dispose()


def test_a_result_too_big_to_store_is_not_encoded_nor_locked_again(tmp_path: Any, monkeypatch: Any) -> None:
    """A result over max_entry_bytes is not stored: for a while its key's
    misses run as uncached ones, neither encoding the rows again nor
    queueing on the key's lock behind one another."""
    from ormcache.testing.fixtures import Template, seed as seed_rows
    from ormcache.testing.fixtures import Base as FixtureBase

    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    FixtureBase.metadata.create_all(engine)
    seed_rows(engine)
    cache = OrmCache.from_settings(
        {"namespace": "tb" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory_pickle"}}}
    )
    cache.max_entry_bytes = 100  # every result is too big
    Session = sessionmaker(engine)
    cache.attach(Session)
    from ormcache._store import Store

    encoded: list[int] = []
    locked: list[int] = []
    encode, mutex = OrmCache._encode_rows, Store.mutex
    monkeypatch.setattr(OrmCache, "_encode_rows", lambda *a: encoded.append(1) or encode(*a))
    monkeypatch.setattr(Store, "mutex", lambda self, key: locked.append(1) or mutex(self, key))
    stmt = select(Template).order_by(Template.id).options(FromCache())
    try:
        for _ in range(3):
            with QueryCounter(engine) as counter, Session() as s:
                assert len(s.scalars(stmt).all()) == 10
            assert counter.selects == 1
        assert (len(encoded), len(locked)) == (1, 1)
        cache.invalidate(Template)  # (a write, or an invalidation: tried again)
        with Session() as s:
            s.scalars(stmt).all()
        assert (len(encoded), len(locked)) == (2, 2)
        cache.max_entry_bytes = 10 * 1024 * 1024  # (and with a new bound)
        with Session() as s:
            s.scalars(stmt).all()
        with QueryCounter(engine) as counter, Session() as s:
            s.scalars(stmt).all()
        assert counter.selects == 0  # stored once it fits
    finally:
        cache.close()
        engine.dispose()

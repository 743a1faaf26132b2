"""The backend test suite, as mixin classes (the way dogpile.cache ships
``dogpile/testing/fixtures.py``).

A backend's test module subclasses :class:`BackendTests` and names the
backend and its arguments; it may override :meth:`BackendTests.arguments_for`
to read them from pytest fixtures (server addresses)::

    class TestRedis(BackendTests):
        backend = "redis"

        def arguments_for(self, request):
            return {"url": request.getfixturevalue("redis_url")}

Each test gets its own SQLite database file and its own key namespace, so
tests never see each other's entries, even on a shared server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import (
    JSON,
    Column,
    ForeignKey,
    String,
    Table,
    bindparam,
    create_engine,
    inspect,
    lambda_stmt,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    defer,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)

from .. import FromCache, OrmCache, RelationshipCache
from . import QueryCounter

__all__ = ["BackendTests", "Base", "Store", "Tag", "Template"]


class Base(DeclarativeBase):
    pass


template_tags = Table(
    "template_tags",
    Base.metadata,
    Column("template_id", ForeignKey("templates.id"), primary_key=True),
    Column("tag_id", ForeignKey("tags.id"), primary_key=True),
)


class Store(Base):
    __tablename__ = "stores"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    templates: Mapped[list[Template]] = relationship(
        back_populates="store", order_by="Template.id"
    )


class Template(Base):
    __tablename__ = "templates"
    id: Mapped[int] = mapped_column(primary_key=True)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id"))
    name: Mapped[str] = mapped_column(String(50))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    version: Mapped[int] = mapped_column(default=1)
    store: Mapped[Store] = relationship(back_populates="templates")
    tags: Mapped[list[Tag]] = relationship(secondary=template_tags, order_by="Tag.id")


class Tag(Base):
    __tablename__ = "tags"
    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(30))


template_table: Table = Template.__table__  # type: ignore[assignment]


def seed(engine: Engine, stores: int = 2, per_store: int = 5, prefix: str = "t") -> None:
    with Session(engine) as s:
        tags = [Tag(id=i, label=f"tag{i}") for i in range(1, 4)]
        s.add_all(tags)
        n = 0
        for sid in range(1, stores + 1):
            store = Store(id=sid, name=f"store{sid}")
            for _ in range(per_store):
                n += 1
                store.templates.append(
                    Template(
                        id=n,
                        name=f"{prefix}{n}",
                        body={"n": n, "fields": [n, n + 1]},
                        tags=tags[: n % 3],
                    )
                )
            s.add(store)
        s.commit()


class BackendTests:
    """ORM correctness on one backend: the five points of the foundation
    issue, plus invalidation on writes."""

    #: a short name (``memory``, ``redis`` …) or any dogpile backend name
    backend: str = "memory"
    #: the region's ``arguments``; see also :meth:`arguments_for`
    arguments: dict[str, Any] = {}
    expiration_time: float | None = 300
    #: sign stored payloads with this key (see ``ormcache.serialization``)
    signing_key: str | None = None
    #: an in-process L1 of this many entries in front of the backend
    l1: int | None = None
    #: its mode: "validated" or "relaxed"
    l1_mode: str = "validated"

    def arguments_for(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        return dict(self.arguments)

    # -- fixtures --------------------------------------------------------

    @pytest.fixture(autouse=True)
    def _setup(self, request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[None]:
        self.tmp_path = tmp_path
        self.engine = self.make_engine("main")
        seed(self.engine)
        self.settings = {
            "namespace": "t" + uuid.uuid4().hex[:12],
            "signing_key": self.signing_key,
            "regions": {
                "default": {
                    "backend": self.backend,
                    "expiration_time": self.expiration_time,
                    "arguments": self.arguments_for(request),
                    **({"l1": {"max_entries": self.l1, "mode": self.l1_mode}} if self.l1 else {}),
                }
            },
        }
        self.cache = OrmCache.from_settings(self.settings)
        self.Session = sessionmaker(self.engine)
        self.cache.attach(self.Session)
        yield
        self.cache.close()
        self.engine.dispose()

    def make_engine(self, name: str) -> Engine:
        engine = create_engine(f"sqlite:///{self.tmp_path / name}.db")
        Base.metadata.create_all(engine)
        return engine

    def count(self, engine: Engine | None = None) -> QueryCounter:
        return QueryCounter(engine or self.engine)

    def cached_names(self, stmt: Any, session_factory: Any = None) -> tuple[list[str], int]:
        with self.count() as counter, (session_factory or self.Session)() as s:
            names = [t.name for t in s.scalars(stmt).all()]
        return names, counter.selects

    # -- basics ----------------------------------------------------------

    def test_hit_serves_without_query(self) -> None:
        stmt = select(Template).where(Template.store_id == 1).order_by(Template.id).options(FromCache("default"))
        first, q1 = self.cached_names(stmt)
        second, q2 = self.cached_names(stmt)
        assert first == second == ["t1", "t2", "t3", "t4", "t5"]
        assert (q1, q2) == (1, 0)

    def test_session_get(self) -> None:
        for expected in (1, 0):
            with self.count() as c, self.Session() as s:
                t = s.get_one(Template, 3, options=[FromCache("default")])
                assert t is not None and t.name == "t3"
                assert t.body == {"n": 3, "fields": [3, 4]}
            assert c.selects == expected

    def test_legacy_query(self) -> None:
        for expected in (1, 0):
            with self.count() as c, self.Session() as s:
                rows = s.query(Template).filter(Template.id < 3).options(FromCache("default")).all()
                assert [t.name for t in rows] == ["t1", "t2"]
            assert c.selects == expected

    def test_unknown_region_names_declared(self) -> None:
        from ..exc import UnknownRegionError

        with self.Session() as s, pytest.raises(UnknownRegionError) as err:
            s.scalars(select(Template).options(FromCache("nope"))).all()
        assert "'nope'" in str(err.value) and "'default'" in str(err.value)

    def test_columns_and_scalars(self) -> None:
        stmt = select(Template.id, Template.name).where(Template.id <= 2).options(FromCache())
        for _ in range(2):
            with self.Session() as s:
                assert [tuple(r) for r in s.execute(stmt)] == [(1, "t1"), (2, "t2")]

    # -- 1. pending changes are never overwritten or discarded -----------

    def test_hit_keeps_dirty_attribute(self) -> None:
        stmt = select(Template).where(Template.id == 1).options(FromCache())
        self.cached_names(stmt)
        with self.Session(autoflush=False) as s:
            t = s.get_one(Template, 1)
            t.name = "pending"
            again = s.scalars(stmt).one()
            assert again is t and again.name == "pending"
            assert t in s.dirty

    def test_autoflush_before_cache(self) -> None:
        stmt = select(Template).where(Template.store_id == 1).order_by(Template.id).options(FromCache())
        self.cached_names(stmt)
        with self.Session() as s:
            s.add(Template(id=100, store_id=1, name="new", body={}))
            gone = s.get_one(Template, 2)
            s.delete(gone)
            t = s.get_one(Template, 1)
            t.name = "renamed"
            names = [x.name for x in s.scalars(stmt)]
            assert names == ["renamed", "t3", "t4", "t5", "new"]
            s.rollback()
        names, _ = self.cached_names(stmt)
        assert names == ["t1", "t2", "t3", "t4", "t5"]

    def test_hit_does_not_refresh_modified_instance(self) -> None:
        stmt = select(Template).where(Template.store_id == 1).order_by(Template.id).options(FromCache())
        self.cached_names(stmt)
        with self.Session(autoflush=False) as s:
            objs = s.scalars(stmt).all()
            objs[0].body = {"changed": True}
            s.scalars(stmt).all()
            assert objs[0].body == {"changed": True}
            s.commit()
        with Session(self.engine) as s:
            assert s.get_one(Template, 1).body == {"changed": True}

    # -- 2. RelationshipCache, whatever was compiled before --------------

    def test_relationship_cache_after_plain_compile(self) -> None:
        with self.Session() as s:
            for st in s.scalars(select(Store)):
                st.templates  # compiles the shape without the option
        opt = RelationshipCache(Store.templates, "default")
        for expected in (2, 0):
            with self.count() as c, self.Session() as s:
                stores = s.scalars(select(Store).order_by(Store.id).options(opt)).all()
                assert [t.name for t in stores[0].templates] == ["t1", "t2", "t3", "t4", "t5"]
                assert [t.name for t in stores[1].templates][:1] == ["t6"]
            # the stores query itself is not cached, the lazy loads are
            assert c.selects == 1 + expected
        self.cache.invalidate(Store.templates)
        with self.count() as c, self.Session() as s:
            stores = s.scalars(select(Store).order_by(Store.id).options(opt)).all()
            stores[0].templates
        assert c.selects == 2

    def test_relationship_cache_many_to_many_and_chain(self) -> None:
        opt = RelationshipCache(Template.tags, "default").and_(
            RelationshipCache(Template.store, "default")
        )
        stmt = select(Template).where(Template.id == 2).options(opt)
        for expected in (3, 1):
            with self.count() as c, self.Session() as s:
                t = s.scalars(stmt).one()
                assert [tag.label for tag in t.tags] == ["tag1", "tag2"]
                assert t.store.name == "store1"
            assert c.selects == expected

    # -- 3. keys separate everything that changes the result -------------

    def test_keys_separate_parameters(self) -> None:
        base = select(Template).options(FromCache())
        assert self.cached_names(base.where(Template.id == 1))[0] == ["t1"]
        assert self.cached_names(base.where(Template.id == 2))[0] == ["t2"]
        assert self.cached_names(base.where(Template.id.in_([3, 4])))[0] == ["t3", "t4"]
        assert self.cached_names(base.where(Template.id.in_([5])))[0] == ["t5"]

    def test_keys_separate_execute_time_parameters(self) -> None:
        stmt = select(Template).where(Template.id == bindparam("tid")).options(FromCache())
        for tid, expected in ((1, 1), (2, 1), (1, 0), (2, 0)):
            with self.count() as c, self.Session() as s:
                assert s.scalars(stmt, {"tid": tid}).one().name == f"t{tid}"
            assert c.selects == expected

    def test_keys_separate_lambda_statements(self) -> None:
        def run(tid: int) -> tuple[str, int]:
            stmt = lambda_stmt(lambda: select(Template))
            stmt += lambda s: s.where(Template.id == tid)
            stmt = stmt.options(FromCache())
            with self.count() as c, self.Session() as s:
                name = s.scalars(stmt).one().name
            return name, c.selects

        runs = [run(1), run(2), run(1), run(2)]
        assert runs == [("t1", 1), ("t2", 1), ("t1", 0), ("t2", 0)]

    def test_keys_separate_databases(self) -> None:
        other = self.make_engine("other")
        seed(other, prefix="o")
        other_sessions = sessionmaker(other)
        self.cache.attach(other_sessions)
        try:
            stmt = select(Template).where(Template.id == 1).options(FromCache())
            for _ in range(2):
                assert self.cached_names(stmt)[0] == ["t1"]
                assert self.cached_names(stmt, other_sessions)[0] == ["o1"]
        finally:
            self.cache.detach(other_sessions)
            other.dispose()

    def test_keys_separate_in_memory_databases(self) -> None:
        engines = [create_engine("sqlite://") for _ in range(2)]
        for i, engine in enumerate(engines):
            Base.metadata.create_all(engine)
            seed(engine, prefix=f"m{i}-")
        makers = [sessionmaker(e) for e in engines]
        for maker in makers:
            self.cache.attach(maker)
        stmt = select(Template).where(Template.id == 1).options(FromCache())
        for _ in range(2):
            for i, maker in enumerate(makers):
                with maker() as s:
                    assert s.scalars(stmt).one().name == f"m{i}-1"
        for maker in makers:
            self.cache.detach(maker)

    def test_keys_separate_identity_token(self) -> None:
        stmt = select(Template).where(Template.id == 1).options(FromCache())
        for expected in (1, 0):
            for token in ("a", "b"):
                with self.count() as c, self.Session() as s:
                    t = s.scalars(stmt.execution_options(identity_token=token)).one()
                    assert inspect(t).identity_token == token
                assert c.selects == expected

    def test_keys_separate_loader_options(self) -> None:
        plain = select(Template).where(Template.id == 1).options(FromCache())
        deferred = plain.options(defer(Template.body))
        for _ in range(2):
            with self.Session() as s:
                t = s.scalars(deferred).one()
                assert "body" not in t.__dict__
            with self.Session() as s:
                t = s.scalars(plain).one()
                assert t.__dict__["body"] == {"n": 1, "fields": [1, 2]}

    def test_eager_loaders(self) -> None:
        joined = (
            select(Store).where(Store.id == 1).options(joinedload(Store.templates), FromCache())
        )
        selectin = (
            select(Store).where(Store.id == 2).options(selectinload(Store.templates), FromCache())
        )
        for _ in range(2):
            with self.Session() as s:
                store = s.scalars(joined).unique().one()
                assert "templates" in store.__dict__ and len(store.templates) == 5
            with self.Session() as s:
                store = s.scalars(selectin).one()
                assert "templates" in store.__dict__ and len(store.templates) == 5

    def test_user_cache_key(self) -> None:
        ids = list(range(1, 6))
        stmt = select(Template).where(Template.id.in_(ids)).options(FromCache(cache_key="first5"))
        assert len(self.cached_names(stmt)[0]) == 5
        assert self.cached_names(stmt)[1] == 0

    # -- 4. nothing uncommitted is cached --------------------------------

    def test_no_fill_inside_writing_transaction(self) -> None:
        stores = select(Store).where(Store.id == 1).options(FromCache())
        templates = select(Template).where(Template.id == 1).options(FromCache())
        with self.count() as c, self.Session() as s:
            s.get_one(Template, 2).name = "uncommitted"
            s.flush()
            # a table the transaction wrote: neither read nor filled
            assert s.scalars(select(Template).where(Template.id == 2).options(FromCache())).one().name == "uncommitted"
            s.scalars(templates).one()
            # another table: read, but not stored
            s.scalars(stores).one()
            s.rollback()
        with self.count() as c:
            assert self.cached_names(select(Template).where(Template.id == 2).options(FromCache()))[0] == ["t2"]
            with self.Session() as s:
                s.scalars(stores).one()
        assert c.selects == 2

    # -- 5. objects from a hit behave like loaded ones --------------------

    def test_hit_objects_are_live(self) -> None:
        stmt = select(Template).where(Template.id == 4).options(FromCache())
        self.cached_names(stmt)
        with self.Session() as s:
            t = s.scalars(stmt).one()
            assert t in s and s.get_one(Template, 4) is t
            assert t.store.name == "store1"
            assert [tag.label for tag in t.tags] == ["tag1"]
            t.name = "edited"
            s.commit()
        with Session(self.engine) as s:
            assert s.get_one(Template, 4).name == "edited"

    def test_body_mutation_does_not_change_cache(self) -> None:
        stmt = select(Template).where(Template.id == 1).options(FromCache())
        self.cached_names(stmt)
        with self.Session() as s:
            t = s.scalars(stmt).one()
            t.body["n"] = 999  # in place, not flushed (no mutation tracking)
        with self.Session() as s:
            assert s.scalars(stmt).one().body["n"] == 1

    # -- invalidation on writes ------------------------------------------

    def test_orm_write_invalidates(self) -> None:
        stmt = select(Template).where(Template.store_id == 1).order_by(Template.id).options(FromCache())
        self.cached_names(stmt)
        with self.Session() as s:
            s.get_one(Template, 1).name = "changed"
            s.commit()
        names, selects = self.cached_names(stmt)
        assert names[0] == "changed" and selects == 1
        assert self.cached_names(stmt)[1] == 0

    def test_bulk_and_core_writes_invalidate(self) -> None:
        stmt = select(Template).where(Template.id == 1).options(FromCache())
        self.cached_names(stmt)
        with self.Session() as s:
            s.execute(update(Template).where(Template.id == 1).values(name="bulk"))
            s.commit()
        assert self.cached_names(stmt)[0] == ["bulk"]
        with self.engine.begin() as conn:
            conn.execute(update(template_table).values(name="core"))
        assert self.cached_names(stmt)[0] == ["core"]
        with self.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE templates SET name = 'text'")
        assert self.cached_names(stmt)[0] == ["text"]

    def test_multi_row_inserts_invalidate(self) -> None:
        """Inserts SQLAlchemy sends in batches ("insertmanyvalues": an ORM
        flush of new objects whose keys the database generates, Core and
        ORM bulk inserts on PostgreSQL), as the first write of their
        connection, through an engine nothing else listens to (a
        connection event on the engine would hide the difference)."""
        from sqlalchemy import create_engine, insert
        from sqlalchemy.orm import Session

        writer = create_engine(self.engine.url)
        try:
            if writer.dialect.name == "postgresql":
                with writer.begin() as conn:
                    conn.exec_driver_sql("SELECT setval(pg_get_serial_sequence('templates', 'id'), 100)")
            stmt = select(Template).where(Template.store_id == 1).order_by(Template.id).options(FromCache())
            count = len(self.cached_names(stmt)[0])
            with Session(writer) as s:
                s.add_all([Template(store_id=1, name=f"flushed{i}", body={}) for i in range(2)])
                s.commit()
            names, selects = self.cached_names(stmt)
            assert names[-2:] == ["flushed0", "flushed1"] and selects == 1
            with writer.connect() as conn:
                rows = [{"id": 200 + i, "store_id": 1, "name": f"core{i}", "body": {}} for i in range(2)]
                conn.execute(insert(template_table), rows)
                conn.commit()
            assert self.cached_names(stmt)[0][-2:] == ["core0", "core1"]
            with Session(writer) as s:
                rows = [{"id": 300 + i, "store_id": 1, "name": f"bulk{i}", "body": {}} for i in range(2)]
                s.execute(insert(Template), rows)
                s.commit()
            names, selects = self.cached_names(stmt)
            assert len(names) == count + 6 and names[-2:] == ["bulk0", "bulk1"] and selects == 1
        finally:
            writer.dispose()

    def test_rollback_leaves_nothing(self) -> None:
        stmt = select(Template).where(Template.id == 1).options(FromCache())
        self.cached_names(stmt)
        with self.Session() as s:
            s.get_one(Template, 1).name = "rolled back"
            s.flush()
            s.rollback()
        assert self.cached_names(stmt)[0] == ["t1"]

    def test_a_writer_finishing_leaves_another_writers_pending_tokens(self) -> None:
        """Two transactions write one table; the second commits first.  Its
        fresh tokens must not end the first one's pending state: were that
        one to die between its commit and its own fresh tokens, results
        stored in between would be stale until they expire."""
        from ..keys import database_id

        stmt = select(Template).where(Template.name == "t1").options(FromCache())
        db = database_id(self.engine)
        self.cache._pre_invalidate(db, {"templates"}, "writer-a")
        self.cache._pre_invalidate(db, {"templates"}, "writer-b")
        self.cache._post_invalidate(db, {"templates"}, "writer-b")
        assert self.cached_names(stmt) == (["t1"], 1)
        assert self.cached_names(stmt) == (["t1"], 1)  # stored nothing: a is pending
        self.cache.invalidate(Template)  # an explicit invalidation ends nothing either
        assert self.cached_names(stmt) == (["t1"], 1)
        self.cache._post_invalidate(db, {"templates"}, "writer-a")
        assert self.cached_names(stmt) == (["t1"], 1)  # stored now
        assert self.cached_names(stmt) == (["t1"], 0)

    def test_explicit_invalidation(self) -> None:
        stmt = select(Template).where(Template.id == 1).options(FromCache())
        for invalidate in (
            lambda: self.cache.invalidate(Template),
            lambda: self.cache.invalidate(stmt),
            lambda: self.cache.invalidate_region("default"),
            lambda: self.cache.invalidate_all(),
        ):
            self.cached_names(stmt)
            assert self.cached_names(stmt)[1] == 0
            invalidate()
            assert self.cached_names(stmt)[1] == 1

    def test_invalidate_other_model_keeps_entry(self) -> None:
        stmt = select(Template).where(Template.id == 1).options(FromCache())
        self.cached_names(stmt)
        self.cache.invalidate(Tag)
        assert self.cached_names(stmt)[1] == 0

    def test_expiration(self) -> None:
        stmt = select(Template).where(Template.id == 1).options(FromCache(expiration_time=0.001))
        self.cached_names(stmt)
        import time

        time.sleep(0.01)
        assert self.cached_names(stmt)[1] == 1

    # -- entity entries: row-level invalidation ---------------------------

    def get_selects(self, ident: int) -> tuple[str | None, int]:
        with self.count() as c, self.Session() as s:
            t = s.get(Template, ident, options=[FromCache()])  # may be None
            name = t.name if t is not None else None
        return name, c.selects

    def test_entity_entry_survives_other_rows(self) -> None:
        assert self.get_selects(1) == ("t1", 1)
        with self.Session() as s:
            s.get_one(Template, 2).name = "other row"
            s.add(Template(id=50, store_id=1, name="new row", body={}))
            s.commit()
        assert self.get_selects(1) == ("t1", 0)
        with self.Session() as s:
            s.get_one(Template, 1).name = "this row"
            s.commit()
        assert self.get_selects(1) == ("this row", 1)
        assert self.get_selects(1) == ("this row", 0)

    def test_entity_entry_insert_and_delete(self) -> None:
        assert self.get_selects(99) == (None, 1)
        assert self.get_selects(99) == (None, 0)
        with self.Session() as s:
            s.add(Template(id=99, store_id=2, name="t99", body={}))
            s.commit()
        assert self.get_selects(99) == ("t99", 1)
        with self.Session() as s:
            s.delete(s.get_one(Template, 99))
            s.commit()
        assert self.get_selects(99) == (None, 1)

    def test_entity_entry_bulk_and_text_writes(self) -> None:
        self.get_selects(1)
        with self.Session() as s:
            s.execute(update(Template).where(Template.id == 3).values(version=2))
            s.commit()
        assert self.get_selects(1) == ("t1", 1)
        with self.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE templates SET version = 3 WHERE id = 3")
        assert self.get_selects(1) == ("t1", 1)

    def test_many_to_one_lazy_load_is_an_entity_entry(self) -> None:
        opt = RelationshipCache(Template.store, "default")
        stmt = select(Template).where(Template.id == 1).options(opt)

        def store_name() -> tuple[str, int]:
            with self.count() as c, self.Session() as s:
                t = s.scalars(stmt).one()
                c.reset()
                name = t.store.name
            return name, c.selects

        assert store_name() == ("store1", 1)
        assert store_name() == ("store1", 0)
        with self.Session() as s:
            s.get_one(Store, 2).name = "other store"
            s.commit()
        assert store_name() == ("store1", 0)
        with self.Session() as s:
            s.get_one(Store, 1).name = "renamed store"
            s.commit()
        assert store_name() == ("renamed store", 1)

    def test_ddl_invalidates(self) -> None:
        from sqlalchemy.exc import OperationalError, ProgrammingError

        stmt = select(Template).where(Template.id == 1).options(FromCache())
        self.cached_names(stmt)
        Base.metadata.drop_all(self.engine)
        with pytest.raises((OperationalError, ProgrammingError)):
            self.cached_names(stmt)
        Base.metadata.create_all(self.engine)
        assert self.cached_names(stmt) == ([], 1)

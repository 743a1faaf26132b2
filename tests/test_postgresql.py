"""The backend suite over PostgreSQL instead of SQLite, with a Redis region.

Each test's databases are ``ormcache_main`` and ``ormcache_other`` on the
test server, created when missing and emptied before each test.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import Engine

from ormcache import FromCache
from ormcache.testing.fixtures import BackendTests, Base, Template


class TestPostgresqlRedis(BackendTests):
    backend = "redis"

    def arguments_for(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        self.pg_url = request.getfixturevalue("postgresql_url")
        return {"url": request.getfixturevalue("redis_url")}

    def make_engine(self, name: str) -> Engine:
        from servers import postgresql_database

        engine = create_engine(postgresql_database(self._pg_url(), f"ormcache_{name}"))
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        return engine

    def _pg_url(self) -> str:
        url = getattr(self, "pg_url", None)
        if url is None:
            from servers import require_server

            url = self.pg_url = require_server("postgresql")
        return url

    def test_repeatable_read_transaction_does_not_fill(self) -> None:
        """A query inside a REPEATABLE READ transaction that already took its
        snapshot may see rows older than the version tokens it read: it must
        not store them."""
        rr = self.engine.execution_options(isolation_level="REPEATABLE READ")
        stmt = select(Template).where(Template.id == 1).options(FromCache())
        from sqlalchemy.orm import Session

        with Session(rr) as s:
            self.cache.attach(s)
            s.execute(text("SELECT 1"))  # the snapshot starts here
            with Session(self.engine) as w:
                w.get(Template, 1).name = "committed meanwhile"
                w.commit()
            assert s.scalars(stmt).one().name == "t1"  # its snapshot
            s.rollback()
        names, selects = self.cached_names(stmt)
        assert names == ["committed meanwhile"] and selects == 1

    def test_repeatable_read_transaction_is_not_served_newer_entries(self) -> None:
        """Inside a REPEATABLE READ transaction that has taken its snapshot,
        an entry filled after a later commit is newer than what the
        transaction's queries see: the cached query answers as the uncached
        one does (a query, its snapshot), for session.get too; a READ
        COMMITTED transaction is served hits."""
        from sqlalchemy.orm import sessionmaker

        from ormcache.testing import QueryCounter

        rr = sessionmaker(self.engine.execution_options(isolation_level="REPEATABLE READ"))
        self.cache.attach(rr)
        stmt = select(Template).where(Template.id == 1).options(FromCache())
        with rr() as s:
            s.execute(text("SELECT 1"))  # the snapshot starts here
            with self.Session() as w:
                w.get(Template, 1).name = "committed meanwhile"
                w.get(Template, 2).name = "committed meanwhile"
                w.commit()
            assert self.cached_names(stmt)[0] == ["committed meanwhile"]  # (filled)
            with self.Session() as c:
                assert c.get(Template, 2, options=[FromCache()]).name == "committed meanwhile"
            assert s.scalars(stmt).one().name == "t1"
            assert s.get(Template, 2, options=[FromCache()]).name == "t2"
        with self.Session() as s:
            s.execute(text("SELECT 1"))  # READ COMMITTED, in a transaction
            with QueryCounter(self.engine) as counter:
                assert s.scalars(stmt).one().name == "committed meanwhile"
            assert counter.selects == 0

    def test_a_session_joining_a_connections_older_snapshot(self) -> None:
        """A Session bound to a Connection whose REPEATABLE READ transaction
        has read ("join an external transaction", as test suites do): its
        first query, before the session itself begins, is not served an
        entry newer than that snapshot."""
        from sqlalchemy.orm import Session

        stmt = select(Template).where(Template.id == 1).options(FromCache())
        with self.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            conn.execute(text("SELECT 1 FROM templates"))  # the snapshot starts here
            with self.Session() as w:
                w.get(Template, 1).name = "committed meanwhile"
                w.commit()
            assert self.cached_names(stmt)[0] == ["committed meanwhile"]  # (filled)
            with Session(bind=conn) as s:
                self.cache.attach(s)
                assert s.scalars(stmt).one().name == "t1"
            conn.rollback()

    def test_repeatable_read_first_statement_fills(self) -> None:
        rr = self.engine.execution_options(isolation_level="REPEATABLE READ")
        stmt = select(Template).where(Template.id == 1).options(FromCache())
        from sqlalchemy.orm import sessionmaker

        maker = sessionmaker(rr)
        self.cache.attach(maker)
        with maker() as s:
            assert s.scalars(stmt).one().name == "t1"
        assert self.cached_names(stmt)[1] == 0

    def test_isolation_level_asked_once_per_transaction(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A miss inside a transaction asks the server for its isolation
        level once: later misses of the same transaction reuse the answer,
        and a new transaction on the same connection asks again."""
        from sqlalchemy.orm import Session

        from ormcache import _replay

        asked: list[str | None] = []
        ask = _replay._ask_pg_isolation

        def counting(root: Any) -> str | None:
            level = ask(root)
            asked.append(level)
            return level

        monkeypatch.setattr(_replay, "_ask_pg_isolation", counting)
        by_id = [select(Template).where(Template.id == i).options(FromCache()) for i in (1, 2, 3)]
        with self.engine.connect() as conn:
            with Session(bind=conn) as s:
                self.cache.attach(s)
                s.execute(text("SELECT 1"))  # in a transaction from here on
                for stmt in by_id:
                    s.scalars(stmt).one()
                assert asked == ["read committed"]
                s.commit()
            for stmt in by_id:
                assert self.cached_names(stmt)[1] == 0  # all three were stored
            with Session(bind=conn) as s:
                self.cache.attach(s)
                s.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
                s.execute(text("SELECT 1"))  # the snapshot starts here
                with self.Session() as w:
                    w.get(Template, 4).name = "committed meanwhile"
                    w.commit()
                stmt = select(Template).where(Template.id == 4).options(FromCache())
                assert s.scalars(stmt).one().name == "t4"  # its snapshot
                assert asked == ["read committed", "repeatable read"]
                s.rollback()
        names, selects = self.cached_names(stmt)
        assert names == ["committed meanwhile"] and selects == 1

    @pytest.mark.parametrize("where", ["connection", "engine", "execute", "after_begin"])
    def test_schema_translate_map_keeps_tenants_apart(self, where: str) -> None:
        """One schema per tenant, chosen by ``schema_translate_map`` on the
        session's connection (``session.connection(execution_options=)``),
        on the engine, or at execute time: each tenant reads its own rows,
        and its committed write invalidates its readers."""
        from sqlalchemy import update
        from sqlalchemy.orm import Session

        from ormcache.testing.fixtures import Store

        tenants = ("ormcache_tenant_a", "ormcache_tenant_b")
        with self.engine.begin() as conn:
            for schema in tenants:
                conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
                conn.execute(text(f"CREATE SCHEMA {schema}"))
        for schema in tenants:
            translated = self.engine.execution_options(schema_translate_map={None: schema})
            Base.metadata.create_all(translated)
            with Session(translated) as s:
                s.add(Store(id=1, name=f"store of {schema}"))
                s.commit()

        def session(schema: str) -> Any:
            maps = {"schema_translate_map": {None: schema}}
            s = Session(self.engine.execution_options(**maps) if where == "engine" else self.engine)
            self.cache.attach(s)
            if where == "connection":
                s.connection(execution_options=maps)
            elif where == "after_begin":
                # set as the transaction begins: after the first statement's
                # key was made, which cannot know it (its rows are not stored)
                def translate(session: Any, transaction: Any, connection: Any) -> None:
                    connection.execution_options(**maps)

                event.listen(s, "after_begin", translate)
            return s, (maps if where == "execute" else {})

        stmt = select(Store.name).where(Store.id == 1).options(FromCache())
        try:
            for _ in range(2):  # a miss, then a hit
                for schema in tenants:
                    s, opts = session(schema)
                    with s:
                        assert s.execute(stmt, execution_options=opts).scalar() == f"store of {schema}"
            s, opts = session(tenants[0])
            with s:
                s.execute(update(Store).where(Store.id == 1).values(name="renamed"), execution_options=opts)
                s.commit()
            for schema, name in zip(tenants, ("renamed", f"store of {tenants[1]}")):
                s, opts = session(schema)
                with s:
                    assert s.execute(stmt, execution_options=opts).scalar() == name
        finally:
            with self.engine.begin() as conn:
                for schema in tenants:
                    conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))

    def test_a_datetime_key_spelt_naive_and_aware(self) -> None:
        """A ``timestamptz`` primary key: a lookup by a naive datetime (read
        in the session's time zone) and a write of that row (whose key the
        database returns aware) name one row two ways; such lookups depend
        on their table, and the write invalidates them."""
        import datetime as dt

        from sqlalchemy import DateTime, Integer, String
        from sqlalchemy.orm import DeclarativeBase, Session, mapped_column

        class ReadingBase(DeclarativeBase):
            pass

        class Reading(ReadingBase):
            __tablename__ = "ormcache_readings"
            sensor = mapped_column(Integer, primary_key=True)
            ts = mapped_column(DateTime(timezone=True), primary_key=True)
            value = mapped_column(String(20))

        engine = create_engine(self.engine.url, connect_args={"options": "-c timezone=UTC"})
        ReadingBase.metadata.drop_all(engine)
        ReadingBase.metadata.create_all(engine)
        naive = dt.datetime(2024, 1, 1, 12, 0)
        try:
            with Session(engine) as s:
                s.add(Reading(sensor=1, ts=naive.replace(tzinfo=dt.timezone.utc), value="v1"))
                s.commit()

            def value() -> str:
                with Session(engine) as s:
                    self.cache.attach(s)
                    return str(s.get_one(Reading, (1, naive), options=[FromCache()]).value)

            assert value() == "v1"
            with Session(engine) as s:
                s.scalars(select(Reading)).one().value = "v2"
                s.commit()
            assert value() == "v2"
        finally:
            ReadingBase.metadata.drop_all(engine)
            engine.dispose()

    def test_bytea_values_are_cached(self) -> None:
        """psycopg2 returns ``bytea`` as ``memoryview``, which does not
        pickle: a result with a ``LargeBinary``/``PickleType`` column is
        stored as bytes (it raised ``TypeError`` out of the query)."""
        from sqlalchemy import Integer, LargeBinary, PickleType
        from sqlalchemy.orm import DeclarativeBase, Session, mapped_column

        class BlobBase(DeclarativeBase):
            pass

        class Blob(BlobBase):
            __tablename__ = "ormcache_blobs"
            id = mapped_column(Integer, primary_key=True)
            raw = mapped_column(LargeBinary)
            data = mapped_column(PickleType)

        BlobBase.metadata.drop_all(self.engine)
        BlobBase.metadata.create_all(self.engine)
        try:
            with Session(self.engine) as s:
                s.add(Blob(id=1, raw=b"\x00\x01", data={"x": [1, 2]}))
                s.commit()
            stmt = select(Blob).options(FromCache())
            for expected_selects in (1, 0):
                with self.count() as counter, Session(self.engine) as s:
                    self.cache.attach(s)
                    blob = s.scalars(stmt).one()
                    assert (bytes(blob.raw), blob.data) == (b"\x00\x01", {"x": [1, 2]})
                assert counter.selects == expected_selects
        finally:
            BlobBase.metadata.drop_all(self.engine)

    def test_data_modifying_ctes_invalidate(self) -> None:
        """PostgreSQL runs DML inside WITH: a SELECT whose CTE updates a
        table writes it, and an INSERT writes its CTE's table as well."""
        from sqlalchemy import insert, update

        from ormcache.testing.fixtures import Store, template_table

        writer = create_engine(self.engine.url)  # no listener on its connections
        try:
            stmt = select(Template).where(Template.id == 1).options(FromCache())
            stores = select(Store).order_by(Store.id).options(FromCache())
            self.cached_names(stmt), self.cached_names(stores)
            renamed = (
                update(template_table)
                .where(template_table.c.id == 1)
                .values(name="by cte")
                .returning(template_table.c.id)
                .cte("renamed")
            )
            with writer.begin() as conn:
                assert conn.execute(select(renamed.c.id)).scalar() == 1
            assert self.cached_names(stmt) == (["by cte"], 1)
            moved = update(template_table).where(template_table.c.id == 1).values(name="by insert cte")
            with writer.begin() as conn:
                conn.execute(insert(Store).values(id=9, name="store9").add_cte(moved.cte("moved")))
            assert self.cached_names(stmt) == (["by insert cte"], 1)
            assert self.cached_names(stores)[0][-1] == "store9"
            from sqlalchemy import Integer, column

            for table, name in (("templates", "by text cte"), ("public.templates", "qualified")):
                textual = (
                    text(f"UPDATE {table} SET name = '{name}' WHERE id = 1 RETURNING id")
                    .columns(column("id", Integer))
                    .cte("textual")
                )
                with writer.begin() as conn:
                    assert conn.execute(select(textual.c.id)).scalar() == 1
                assert self.cached_names(stmt) == ([name], 1)
            # a textual CTE that only reads writes nothing
            reading = text("(SELECT 1 AS n) UNION ALL (SELECT 2)").columns(column("n", Integer)).cte("reading")
            with writer.begin() as conn:
                assert sorted(conn.execute(select(reading.c.n)).scalars()) == [1, 2]
            assert self.cached_names(stmt) == (["qualified"], 0)
        finally:
            writer.dispose()

    def test_statements_alike_on_another_dialect(self) -> None:
        """Two statements that SQLite renders alike and PostgreSQL does not
        (a prefix for PostgreSQL only): once SQLite ran both, PostgreSQL
        still keeps them apart."""
        from sqlalchemy.orm import sessionmaker

        from ormcache.testing.fixtures import seed

        lite = create_engine(f"sqlite:///{self.tmp_path}/lite.db")
        Base.metadata.create_all(lite)
        seed(lite)
        Lite = sessionmaker(lite)
        self.cache.attach(Lite)
        every = select(Template.store_id).order_by(Template.store_id)
        distinct = every.prefix_with("DISTINCT", dialect="postgresql")
        try:
            for stmt in (every, distinct):
                with Lite() as s:
                    assert len(s.scalars(stmt.options(FromCache())).all()) == 10
            for stmt, expected in ((every, 10), (distinct, 2)):
                for selects in (1, 0):
                    with self.count() as counter, self.Session() as s:
                        assert len(s.scalars(stmt.options(FromCache())).all()) == expected
                    assert counter.selects == selects
        finally:
            lite.dispose()

    def test_a_failed_commit_ends_the_transaction(self) -> None:
        """A deferred foreign key fails at COMMIT: PostgreSQL ends the
        transaction, and the driver says so; what it wrote is settled at
        once (stored again), not left pending for a minute."""
        from sqlalchemy import update

        with self.engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE IF NOT EXISTS deferred_child (id INTEGER PRIMARY KEY, template_id INTEGER "
                "REFERENCES templates(id) DEFERRABLE INITIALLY DEFERRED)"
            )
        stmt = select(Template).where(Template.id == 1).options(FromCache("default"))
        try:
            with self.engine.connect() as conn:
                conn.execute(update(Template).where(Template.id == 1).values(name="never"))
                conn.exec_driver_sql("INSERT INTO deferred_child VALUES (1, 999)")
                with pytest.raises(Exception, match="foreign key"):
                    conn.commit()
                conn.rollback()
                assert self.cached_names(stmt) == (["t1"], 1)
                assert self.cached_names(stmt) == (["t1"], 0)  # stored again
        finally:
            with self.engine.begin() as conn:
                conn.exec_driver_sql("DROP TABLE deferred_child")


@pytest.mark.parametrize("kind", ["uuid_text", "numeric"])
def test_keys_the_database_spells_its_own_way_are_looked_up_by_table(postgresql_url: str, kind: str) -> None:
    """A ``Uuid(as_uuid=False)`` key given as hex to a lookup and with
    dashes to a write, a ``Numeric(6, 2)`` key the database rounds: one
    row, two spellings.  Such lookups depend on the table, so the write is
    seen (they depended on a row key the write did not move)."""
    import uuid as uuid_module
    from decimal import Decimal

    from sqlalchemy import Column, Numeric, String, Uuid
    from sqlalchemy.orm import DeclarativeBase, sessionmaker

    from ormcache import OrmCache
    from servers import postgresql_database

    class Base(DeclarativeBase):
        pass

    class Thing(Base):
        __tablename__ = f"spelt_{kind}"
        id = Column(Uuid(as_uuid=False) if kind == "uuid_text" else Numeric(6, 2), primary_key=True)
        name = Column(String(20))

    u = uuid_module.uuid4()
    written, looked_up = (str(u), u.hex) if kind == "uuid_text" else (Decimal("7.001"), Decimal("7"))
    engine = create_engine(postgresql_database(postgresql_url, "ormcache_main"))
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    cache = OrmCache.from_settings({"namespace": "sp" + uuid_module.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}})
    Session = sessionmaker(engine)
    cache.attach(Session)

    def name() -> str | None:
        with Session() as s:
            thing = s.get(Thing, looked_up, options=[FromCache()])
            return None if thing is None else thing.name

    try:
        if kind == "uuid_text":
            with Session() as s:
                s.add(Thing(id=written, name="old"))
                s.commit()
            assert name() == "old"
            with Session() as s:
                s.get_one(Thing, written).name = "new"
                s.commit()
            assert name() == "new"
        else:
            assert name() is None  # cached: no such row
            with Session() as s:
                s.add(Thing(id=written, name="seven"))  # stored as 7.00
                s.commit()
            assert name() == "seven"
    finally:
        cache.close()
        Base.metadata.drop_all(engine)
        engine.dispose()


@pytest.mark.parametrize(
    "writer",
    [
        "text_qualified_on_tenant",  # the tenant reads Plan
        "qualified_model_on_admin",  # the tenant reads Plan
        "unqualified_model_on_admin",  # the tenant reads PublicPlan
    ],
)
def test_a_table_named_with_and_without_its_schema_on_engines_of_other_search_paths(
    postgresql_url: str, writer: str
) -> None:
    """A tenant engine whose URL puts its own schema first
    (``search_path=tenant,public``) reads ``public.plan`` unqualified;
    another engine (the default search path) or a textual statement
    names it ``public.plan``.  The schema an engine leaves out of a name
    depends on that engine's search path, so version keys name tables
    without their schema: every spelling of the table is seen."""
    import uuid as uuid_module

    from sqlalchemy import Column, Integer, String, update
    from sqlalchemy.engine import make_url
    from sqlalchemy.orm import DeclarativeBase, Session

    from ormcache import OrmCache
    from servers import postgresql_database

    class Base(DeclarativeBase):
        pass

    class Plan(Base):  # as the tenant's models map it: no schema
        __tablename__ = "ormcache_sp_plan"
        id = Column(Integer, primary_key=True)
        name = Column(String(20))

    class PublicPlan(Base):  # the same table, spelled out
        __tablename__ = "ormcache_sp_plan"
        __table_args__ = {"schema": "public", "keep_existing": True}
        id = Column(Integer, primary_key=True)
        name = Column(String(20))

    url = make_url(postgresql_database(postgresql_url, "ormcache_main"))
    admin = create_engine(url)
    tenant = create_engine(url.update_query_dict({"options": "-csearch_path=ormcache_sp_tenant,public"}))
    with admin.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA IF EXISTS ormcache_sp_tenant CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA ormcache_sp_tenant")
        conn.exec_driver_sql("DROP TABLE IF EXISTS public.ormcache_sp_plan")
    PublicPlan.__table__.create(admin)
    with admin.begin() as conn:
        conn.execute(PublicPlan.__table__.insert().values(id=1, name="v0"))
    cache = OrmCache.from_settings(
        {"namespace": "sp" + uuid_module.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}}
    )
    reader_model = PublicPlan if writer == "unqualified_model_on_admin" else Plan

    def read() -> str:
        with Session(tenant) as s:
            cache.attach(s)
            return s.scalars(select(reader_model.name).where(reader_model.id == 1).options(FromCache())).one()

    try:
        assert read() == "v0"
        assert read() == "v0"  # a hit
        if writer == "text_qualified_on_tenant":
            with tenant.begin() as conn:
                conn.execute(text("UPDATE public.ormcache_sp_plan SET name = 'v1' WHERE id = 1"))
        else:
            model = PublicPlan if writer == "qualified_model_on_admin" else Plan
            with Session(admin) as s:
                s.execute(update(model).where(model.id == 1).values(name="v1"))
                s.commit()
        assert read() == "v1"
    finally:
        cache.close()
        with admin.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS public.ormcache_sp_plan")
            conn.exec_driver_sql("DROP SCHEMA IF EXISTS ormcache_sp_tenant CASCADE")
        tenant.dispose()
        admin.dispose()

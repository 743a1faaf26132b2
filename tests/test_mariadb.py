"""The backend suite over MariaDB (MySQL's dialect, PyMySQL), and what is
MySQL's own: REPEATABLE READ by default, whose snapshot starts at a
transaction's first read; multi-table ``UPDATE``; ``INSERT IGNORE``.

The suite runs at READ COMMITTED, the isolation level the guide advises on
MySQL: at REPEATABLE READ only a transaction's first statement can fill
(a relationship's lazy load comes after its parent's query, and is never
stored), which the tests below check on their own.

Each test's databases are ``ormcache_main`` and ``ormcache_other`` on the
test server (``make services`` lets the tests' user create them), emptied
before each test.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from ormcache import FromCache
from ormcache.testing.fixtures import BackendTests, Base, Store, Template


class TestMariadbMemory(BackendTests):
    backend = "memory"

    def make_engine(self, name: str) -> Engine:
        from servers import require_server

        url = make_url(require_server("mariadb"))
        database = f"ormcache_{name}"
        admin = create_engine(url)
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        admin.dispose()
        engine = create_engine(url.set(database=database), isolation_level="READ COMMITTED")
        Base.metadata.drop_all(engine)
        Base.metadata.create_all(engine)
        return engine

    def repeatable_read(self, **arguments: Any) -> Any:
        """A sessionmaker at MySQL's default isolation level, attached."""
        engine = create_engine(self.engine.url, **arguments)
        engine.connect().close()  # the dialect learns the server's default
        assert engine.dialect.default_isolation_level == "REPEATABLE READ"
        self._rr_engines.append(engine)
        maker = sessionmaker(engine)
        self.cache.attach(maker)
        return maker

    @pytest.fixture(autouse=True)
    def _rr_disposed(self) -> Any:
        self._rr_engines: list[Engine] = []
        yield
        for engine in self._rr_engines:
            engine.dispose()

    def names(self, maker: Any, tid: int) -> tuple[str, int]:
        """Template ``tid``'s name through ``maker`` and the SELECTs that cost."""
        with self.count(maker.kw["bind"]) as counter, maker() as s:
            name = s.get_one(Template, tid, options=[FromCache("default")]).name
        return name, counter.selects

    def test_a_string_key_the_collation_matches_another_way(self) -> None:
        """MariaDB's default collation (utf8mb4_general_ci) takes 'ß' for
        's': a lookup by one spelling finds the row stored under the other,
        which no folding of ormcache's spells alike.  Such lookups depend on
        the whole table: the row's update is seen."""
        from sqlalchemy import Column, String
        from sqlalchemy.orm import DeclarativeBase

        class Base(DeclarativeBase):
            pass

        class Word(Base):
            __tablename__ = "collated_words"
            key = Column(String(20), primary_key=True)
            meaning = Column(String(20))

        Base.metadata.drop_all(self.engine)
        Base.metadata.create_all(self.engine)
        try:
            with self.Session() as s:
                s.add(Word(key="ß", meaning="old"))
                s.commit()

            def meaning() -> str | None:
                with self.Session() as s:
                    word = s.get(Word, "s", options=[FromCache("default")])
                    return None if word is None else word.meaning

            assert meaning() == "old"
            assert meaning() == "old"
            with self.Session() as s:
                s.get_one(Word, "ß").meaning = "new"
                s.commit()
            assert meaning() == "new"
        finally:
            Base.metadata.drop_all(self.engine)

    def test_the_first_read_of_a_transaction_fills(self) -> None:
        """At REPEATABLE READ, MySQL's default, a transaction's snapshot is
        taken by its first read: a miss that is its transaction's first
        statement sees every commit before it, and is stored.  (Before,
        nothing was ever stored on MySQL and MariaDB: their drivers do not
        say whether a transaction is open.)"""
        rr = self.repeatable_read()
        assert self.names(rr, 1) == ("t1", 1)
        assert self.names(rr, 1) == ("t1", 0)
        with self.count(rr.kw["bind"]) as counter, rr() as s:
            s.get_one(Template, 1, options=[FromCache("default")])  # a hit: no statement
            s.get_one(Template, 2, options=[FromCache("default")])  # the first: stored
            s.execute(select(Store))  # the snapshot is older than what follows
            s.get_one(Template, 3, options=[FromCache("default")])  # not stored
        assert counter.selects == 3
        assert self.names(rr, 2) == ("t2", 0)
        assert self.names(rr, 3) == ("t3", 1)

    def test_an_older_snapshot_is_never_stored(self) -> None:
        """A miss after its transaction's first read sees that read's
        snapshot, older than a commit made since: what it read is not
        stored, and the next reader sees the commit."""
        rr = self.repeatable_read()
        with rr() as reader:
            reader.execute(select(Store)).all()  # the snapshot starts here
            with self.Session() as writer:
                writer.get_one(Template, 4).name = "committed meanwhile"
                writer.commit()
            stale = reader.get_one(Template, 4, options=[FromCache("default")])
            assert stale.name == "t4"  # its snapshot
        assert self.names(rr, 4) == ("committed meanwhile", 1)
        assert self.names(rr, 4) == ("committed meanwhile", 0)

    def test_an_entry_newer_than_the_snapshot_is_not_served(self) -> None:
        """After its transaction's first read, a REPEATABLE READ session is
        not served an entry filled after a later commit: the uncached
        query would answer from its older snapshot, and so does this one."""
        rr = self.repeatable_read()
        with rr() as reader:
            reader.execute(select(Store)).all()  # the snapshot starts here
            with self.Session() as writer:
                writer.get_one(Template, 4).name = "committed meanwhile"
                writer.commit()
            assert self.names(self.Session, 4) == ("committed meanwhile", 1)  # (filled)
            assert self.names(self.Session, 4) == ("committed meanwhile", 0)
            assert reader.get_one(Template, 4, options=[FromCache("default")]).name == "t4"

    def test_read_committed_fills_every_miss(self) -> None:
        with self.Session() as s:  # the suite's engine: READ COMMITTED
            s.execute(select(Store)).all()
            s.get_one(Template, 5, options=[FromCache("default")])
        assert self.names(self.Session, 5) == ("t5", 0)

    def test_without_reset_on_return_nothing_fills_in_a_transaction(self) -> None:
        """A pool that does not end transactions at check-in may hand out a
        connection whose transaction (and snapshot) began before: no miss
        can be told to be the first, and none is stored."""
        rr = self.repeatable_read(pool_reset_on_return=None)
        assert self.names(rr, 1) == ("t1", 1)
        assert self.names(rr, 1) == ("t1", 1)

    def test_a_dbapi_connection_shared_by_two_sessions(self) -> None:
        """``StaticPool`` (as ``SingletonThreadPool`` within a thread) lends
        one DBAPI connection to every ``Connection``: a second session's
        first statement runs in the first session's open transaction, and
        its older snapshot, which is not stored."""
        from sqlalchemy.pool import StaticPool

        rr = self.repeatable_read(poolclass=StaticPool)
        outer = rr()
        try:
            outer.execute(select(Store)).all()  # the shared snapshot starts here
            with self.Session() as writer:
                writer.get_one(Template, 2).name = "committed meanwhile"
                writer.commit()
            with rr() as inner:
                stale = inner.get_one(Template, 2, options=[FromCache("default")])
                assert stale.name == "t2"  # the outer session's snapshot
        finally:
            outer.close()
        assert self.names(rr, 2) == ("committed meanwhile", 1)

    def test_a_session_dropped_while_sharing_its_dbapi_connection(self) -> None:
        """A session dropped without ``close()`` while another shares its
        DBAPI connection (``StaticPool``): the pool does not end its
        transaction, which outlives its ``Transaction`` object; the other
        session's next miss reads that older snapshot, and is not stored."""
        import gc

        from sqlalchemy.pool import StaticPool

        rr = self.repeatable_read(poolclass=StaticPool)
        outer = rr()
        outer.execute(select(Store)).all()  # the shared snapshot starts here
        inner = rr()
        inner.connection()  # a second checkout of the same DBAPI connection
        del outer
        gc.collect()
        with self.Session() as writer:
            writer.get_one(Template, 2).name = "committed meanwhile"
            writer.commit()
        stale = inner.get_one(Template, 2, options=[FromCache("default")])
        assert stale.name == "t2"  # the dropped session's snapshot
        inner.close()
        assert self.names(rr, 2) == ("committed meanwhile", 1)

    def test_a_statement_in_a_begin_event_starts_the_snapshot(self) -> None:
        """A ``begin`` listener that reads (or runs ``START TRANSACTION WITH
        CONSISTENT SNAPSHOT``) runs before SQLAlchemy has set the
        Connection's transaction: it still counts as the transaction's
        first statement."""
        from sqlalchemy import event

        rr = self.repeatable_read()
        engine = rr.kw["bind"]

        @event.listens_for(engine, "begin")
        def snapshot(conn: Any) -> None:
            conn.exec_driver_sql("START TRANSACTION WITH CONSISTENT SNAPSHOT")

        with rr() as reader:
            reader.connection()  # the transaction begins, and its snapshot
            with self.Session() as writer:
                writer.get_one(Template, 5).name = "committed meanwhile"
                writer.commit()
            stale = reader.get_one(Template, 5, options=[FromCache("default")])
            assert stale.name == "t5"
        event.remove(engine, "begin", snapshot)
        assert self.names(rr, 5) == ("committed meanwhile", 1)

    @pytest.mark.parametrize(
        "sql",
        [
            "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            "set session transaction isolation level repeatable read",
            "SET @@session.tx_isolation = 'REPEATABLE-READ'",
            "/* from the app */ SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            "-- a comment\n  SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        ],
    )
    def test_isolation_level_set_by_sql(self, sql: str) -> None:
        """The engine runs at READ COMMITTED, and SQL switches a connection
        to REPEATABLE READ, which neither SQLAlchemy nor MariaDB reports
        (``@@tx_isolation`` ignores ``SET TRANSACTION``): a miss after the
        transaction's first read must not be stored."""
        stmt = select(Template).where(Template.id == 2).options(FromCache("default"))
        try:
            with self.Session() as reader:
                reader.execute(text(sql))
                reader.execute(select(Store)).all()  # the snapshot starts here
                with self.Session() as writer:
                    writer.get_one(Template, 2).name = "committed meanwhile"
                    writer.commit()
                assert reader.scalars(stmt).one().name == "t2"  # its snapshot
            assert self.cached_names(stmt) == (["committed meanwhile"], 1)
        finally:
            self.engine.dispose()  # the connection keeps a SESSION level

    @pytest.mark.parametrize("how", ["commit_prepared", "text"])
    def test_a_prepared_transaction_committed_by_recovery(self, how: str) -> None:
        """A prepared XA transaction outlives its lost connection; whoever
        commits it later (a recovery: ``commit_prepared()``, or a textual
        ``XA COMMIT``) does not know what it wrote: the whole database's
        results are invalidated when that commit runs."""
        import uuid

        from sqlalchemy import update

        stmt = select(Template).where(Template.id == 1).options(FromCache("default"))
        xid = "rec" + uuid.uuid4().hex[:8]
        assert self.cached_names(stmt) == (["t1"], 1)
        conn = self.engine.connect()
        xa = conn.begin_twophase(xid)
        conn.execute(update(Template).where(Template.id == 1).values(name="prepared"))
        xa.prepare()
        conn.invalidate()  # the coordinator lost its connection after PREPARE
        conn.close()
        try:
            assert self.cached_names(stmt)[0] == ["t1"]  # not committed yet
            assert self.cached_names(stmt) == (["t1"], 0)
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as rec:
                if how == "commit_prepared":
                    rec.commit_prepared(xid, recover=True)
                else:
                    rec.exec_driver_sql(f"XA COMMIT '{xid}'")
            xid = ""
            assert self.cached_names(stmt) == (["prepared"], 1)
        finally:
            if xid:
                with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                    c.exec_driver_sql(f"XA ROLLBACK '{xid}'")

    @pytest.mark.parametrize("end", ["commit", "rollback"])
    def test_a_two_phase_commit_is_announced_when_it_returns(self, end: str) -> None:
        """XA: SQLAlchemy fires ``commit_twophase`` (not ``commit``) and
        calls the dialect's ``do_commit_twophase``: the commit is announced
        when it returns, with the Connection kept open, as a plain one is."""
        from sqlalchemy import update

        stmt = select(Template).where(Template.id == 1).options(FromCache("default"))
        assert self.cached_names(stmt) == (["t1"], 1)
        backend = self.cache.region("default").backend._cache  # type: ignore[attr-defined]
        with self.engine.connect() as conn:
            xa = conn.begin_twophase()
            conn.execute(update(Template).where(Template.id == 1).values(name="new"))
            assert self.cached_names(stmt) == (["t1"], 1)  # pending: not stored
            if end == "rollback":
                xa.rollback()
                assert self.cached_names(stmt) == (["t1"], 1)  # stored again
                assert self.cached_names(stmt) == (["t1"], 0)
                return
            for key in [k for k in backend if ":v:" in k]:
                del backend[key]  # the pending tokens are evicted
            assert self.cached_names(stmt) == (["t1"], 1)  # stored under its own tokens
            xa.prepare()
            xa.commit()
            # still holding the connection, idle
            assert self.cached_names(stmt) == (["new"], 1)
            assert self.cached_names(stmt) == (["new"], 0)

    def test_autocommit_writes_on_a_connection_kept_open(self) -> None:
        """On an AUTOCOMMIT connection each statement is committed as it
        runs: its write is announced at once, also when the connection
        wrote the table before and stays open (a worker's connection)."""
        from sqlalchemy import update

        stmt = select(Template).where(Template.id == 1).options(FromCache("default"))
        with self.engine.execution_options(isolation_level="AUTOCOMMIT").connect() as worker:
            worker.execute(update(Template).where(Template.id == 1).values(name="first"))
            with self.Session() as s:  # another committed write to the table
                s.get_one(Template, 2).name = "other"
                s.commit()
            assert self.cached_names(stmt) == (["first"], 1)
            assert self.cached_names(stmt) == (["first"], 0)
            worker.execute(update(Template).where(Template.id == 1).values(name="second"))
            assert self.cached_names(stmt) == (["second"], 1)

    def test_isolation_level_of_a_statement_is_not_the_connections(self) -> None:
        """SQLAlchemy applies ``isolation_level`` set on an engine or a
        connection; in one statement's options it is ignored, and so is it
        here: the miss still reads the transaction's older snapshot."""
        rr = self.repeatable_read()
        stmt = select(Template).where(Template.id == 3).options(FromCache("default"))
        with rr() as reader:
            reader.execute(select(Store)).all()  # the snapshot starts here
            with self.Session() as writer:
                writer.get_one(Template, 3).name = "committed meanwhile"
                writer.commit()
            options = {"isolation_level": "READ COMMITTED"}
            assert reader.scalars(stmt, execution_options=options).one().name == "t3"
        with self.count(rr.kw["bind"]) as counter, rr() as s:
            assert s.scalars(stmt).one().name == "committed meanwhile"
        assert counter.selects == 1

    def test_a_committed_connection_goes_back_to_the_pool_at_once(self) -> None:
        """What marks a transaction as begun holds it weakly: a Connection
        dropped without ``close()`` after its commit returns its DBAPI
        connection when its last reference goes, not at the next run of
        the cycle collector."""
        import gc

        engine = create_engine(self.engine.url, pool_size=1, max_overflow=0, pool_timeout=1)
        self._rr_engines.append(engine)
        gc.disable()
        try:
            for _ in range(3):
                conn = engine.connect()
                conn.execute(select(Store)).all()
                conn.commit()
                del conn
                assert engine.pool.checkedout() == 0
        finally:
            gc.enable()

    def test_multi_table_update_and_insert_ignore_invalidate(self) -> None:
        """MySQL's multi-table UPDATE (Core and textual) writes the tables
        it sets; ``INSERT IGNORE`` writes its table."""
        from sqlalchemy import update

        from ormcache.testing.fixtures import template_table

        writer = create_engine(self.engine.url)  # no listener on its connections
        store_1 = select(Template).where(Template.store_id == 1).order_by(Template.id).options(FromCache())
        writes = [
            (
                update(template_table)
                .where(template_table.c.store_id == Store.id, Store.name == "store1")
                .values(name="core join"),
                ["core join"] * 5,
            ),
            (
                text(
                    "UPDATE templates t JOIN stores s ON t.store_id = s.id "
                    "SET t.name = 'text join' WHERE s.name = 'store1'"
                ),
                ["text join"] * 5,
            ),
            (
                text(
                    "INSERT IGNORE INTO templates (id, store_id, name, body, version) "
                    "VALUES (1, 1, 'dup', '{}', 1), (99, 1, 'ignored into', '{}', 1)"
                ),
                ["text join"] * 5 + ["ignored into"],
            ),
        ]
        try:
            self.cached_names(store_1)
            for write, names in writes:
                with writer.begin() as conn:
                    conn.execute(write)
                assert self.cached_names(store_1) == (names, 1)
        finally:
            writer.dispose()


def _two_databases() -> tuple[Engine, Engine]:
    """Engines on ``ormcache_main`` and ``ormcache_other``, two databases of
    the test server (created when missing), at READ COMMITTED."""
    from servers import require_server

    url = make_url(require_server("mariadb"))
    admin = create_engine(url)
    with admin.connect() as conn:
        for database in ("ormcache_main", "ormcache_other"):
            conn.exec_driver_sql(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    admin.dispose()
    main, other = (
        create_engine(url.set(database=d), isolation_level="READ COMMITTED") for d in ("ormcache_main", "ormcache_other")
    )
    return main, other


@pytest.mark.parametrize("direction", ["write_qualified_read_plain", "write_plain_read_qualified"])
def test_a_table_of_another_database_of_the_server(direction: str) -> None:
    """MySQL's databases are schemas of one server: an engine on
    ``ormcache_main`` maps a table as ``ormcache_other.t`` while another,
    on ``ormcache_other``, maps it as ``t``.  A write through either is
    seen by readers of the other: version keys name the server, not the
    URL's database, and tables without their schema."""
    import uuid

    from sqlalchemy import Column, Integer, String, update
    from sqlalchemy.orm import DeclarativeBase

    from ormcache import OrmCache

    class Base(DeclarativeBase):
        pass

    class Plain(Base):
        __tablename__ = "ormcache_xdb"
        id = Column(Integer, primary_key=True)
        name = Column(String(20))

    class Qualified(Base):
        __tablename__ = "ormcache_xdb"
        __table_args__ = {"schema": "ormcache_other", "keep_existing": True}
        id = Column(Integer, primary_key=True)
        name = Column(String(20))

    main, other = _two_databases()
    Plain.__table__.drop(other, checkfirst=True)
    Plain.__table__.create(other)
    with other.begin() as conn:
        conn.execute(Plain.__table__.insert().values(id=1, name="v0"))
    cache = OrmCache.from_settings({"namespace": "xd" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}})
    if direction == "write_qualified_read_plain":
        (w_engine, w_model), (r_engine, r_model) = (main, Qualified), (other, Plain)
    else:
        (w_engine, w_model), (r_engine, r_model) = (other, Plain), (main, Qualified)

    def read() -> str:
        with Session(r_engine) as s:
            cache.attach(s)
            return s.scalars(select(r_model.name).where(r_model.id == 1).options(FromCache())).one()

    try:
        assert read() == "v0"
        assert read() == "v0"  # a hit
        with Session(w_engine) as s:
            s.execute(update(w_model).where(w_model.id == 1).values(name="v1"))
            s.commit()
        assert read() == "v1"
    finally:
        cache.close()
        Plain.__table__.drop(other, checkfirst=True)
        main.dispose()
        other.dispose()


def test_version_keys_name_the_server_of_a_mysql_database() -> None:
    from ormcache.invalidation import _place, _server_part

    assert _server_part("mysql://h:3306/app") == _server_part("mariadb://h:3306/reports") == "mysql://h:3306/"
    assert _server_part("mssql://h:1433/app?odbc_connect=x") == "mssql://h:1433/?odbc_connect=x"
    odbc = "mssql://:1433/?odbc_connect=DRIVER={ODBC};SERVER=s1;"
    assert _server_part(odbc + "DATABASE=app") == _server_part(odbc + "Initial Catalog=reports")
    assert _server_part("mysql://h:3306/app?db=a&unix_socket=/s") == "mysql://h:3306/?unix_socket=/s"
    assert _server_part("postgresql://h:5432/app") == "postgresql://h:5432/app"
    assert _server_part("mysql://h:3307/app") != _server_part("mysql://h:3306/app")
    assert _place("mysql://h:3306/app", "reports.t") == _place("mariadb://h:3306/Reports", "t")


@pytest.mark.parametrize(
    "write",
    [
        "multi-table update",  # its tables cannot all be told: the whole server counts
        "procedure",
        "cascade to a table of another database",
    ],
)
def test_writes_that_reach_another_database_of_the_server(write: str) -> None:
    """A statement on one database of a MySQL server can write another's
    tables in ways that are not all told apart (a multi-table UPDATE
    naming ``other.t``, a procedure, a foreign key's cascade into a table
    mapped without its schema but bound to another database's engine):
    version keys are the server's, so readers through any engine see it
    (found by review: stale with keys per database)."""
    import uuid

    from sqlalchemy import Column, ForeignKey, Integer, String
    from sqlalchemy.orm import DeclarativeBase

    from ormcache import OrmCache

    class Base(DeclarativeBase):
        pass

    class Parent(Base):  # lives in ormcache_other
        __tablename__ = "ormcache_xp"
        __table_args__ = {"schema": "ormcache_other"}
        id = Column(Integer, primary_key=True)
        name = Column(String(20))

    class Child(Base):  # lives in ormcache_main, mapped without its schema
        __tablename__ = "ormcache_xc"
        id = Column(Integer, primary_key=True)
        parent_id = Column(ForeignKey("ormcache_other.ormcache_xp.id", ondelete="CASCADE"))

    main, other = _two_databases()
    with main.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS ormcache_xc")
        conn.exec_driver_sql("DROP TABLE IF EXISTS ormcache_other.ormcache_xp")
        conn.exec_driver_sql("DROP PROCEDURE IF EXISTS ormcache_other.ormcache_xproc")
    Base.metadata.create_all(main)
    with main.begin() as conn:
        conn.execute(Parent.__table__.insert().values(id=1, name="v0"))
        conn.execute(Child.__table__.insert().values(id=10, parent_id=1))
        conn.exec_driver_sql(
            "CREATE PROCEDURE ormcache_other.ormcache_xproc() UPDATE ormcache_other.ormcache_xp SET name = 'v1'"
        )
    cache = OrmCache.from_settings({"namespace": "xw" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}})
    maker = sessionmaker(binds={Parent: other, Child: main})
    cache.attach(maker)

    def read() -> tuple[str, int]:
        with maker() as s:
            name = s.scalars(select(Parent.name).where(Parent.id == 1).options(FromCache())).one()
            children = s.scalars(select(func.count(Child.id)).options(FromCache())).one()
            return name, children

    from sqlalchemy import func, text

    try:
        assert read() == read() == ("v0", 1)
        if write == "multi-table update":
            with main.begin() as conn:  # through main's engine, writing other's table
                conn.execute(
                    text(
                        "UPDATE ormcache_xc JOIN ormcache_other.ormcache_xp AS p ON p.id = ormcache_xc.parent_id "
                        "SET p.name = 'v1'"
                    )
                )
            assert read() == ("v1", 1)
        elif write == "procedure":
            with main.begin() as conn:
                conn.exec_driver_sql("CALL ormcache_other.ormcache_xproc()")
            assert read() == ("v1", 1)
        else:
            with maker.begin() as s:  # an ORM delete through other's engine
                s.delete(s.get(Parent, 1))
            with maker() as s:
                assert s.scalars(select(Parent.name).where(Parent.id == 1).options(FromCache())).all() == []
                assert s.scalars(select(func.count(Child.id)).options(FromCache())).one() == 0
    finally:
        cache.close()
        with main.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS ormcache_xc")
            conn.exec_driver_sql("DROP TABLE IF EXISTS ormcache_other.ormcache_xp")
            conn.exec_driver_sql("DROP PROCEDURE IF EXISTS ormcache_other.ormcache_xproc")
        main.dispose()
        other.dispose()

"""What textual SQL writes, as ``invalidation.text_tables`` reads it.

An empty set is a read; ``{"*"}`` (UNKNOWN) means "may write, the tables
cannot be told": the whole database is invalidated.  Over-invalidating is
allowed, missing a written table is not.
"""

from __future__ import annotations

import pytest

from ormcache.invalidation import UNKNOWN, text_tables

CASES = [
    # reads
    ("SELECT 1", set()),
    ("select * from t where x = 'a;b'", set()),
    ("SELECT 1;", set()),
    ("SELECT $$a;b$$", set()),
    ("SELECT 1; -- UPDATE b SET x = 1\n", set()),
    ("/* UPDATE a */ SELECT 1", set()),
    ("EXPLAIN SELECT * FROM a", set()),
    ("EXPLAIN UPDATE a SET x = 1", set()),  # planned, not run
    # statements that run the statements they hold (found by review)
    ("EXPLAIN ANALYZE EXECUTE p", {UNKNOWN}),  # PostgreSQL: a prepared UPDATE, run
    ("ANALYZE UPDATE a SET x = 1", {UNKNOWN}),  # MariaDB: runs it
    ("ANALYZE FORMAT=JSON DELETE FROM a", {UNKNOWN}),
    ("ANALYZE a", set()),  # statistics
    ("ANALYZE TABLE a", set()),
    ("BEGIN NOT ATOMIC UPDATE a SET x = 1; END", {UNKNOWN}),  # MariaDB compound statement
    ("SET STATEMENT max_statement_time=60 FOR UPDATE a SET x = 1", {UNKNOWN}),
    ("BEGIN", set()),
    ("SET x = 1", set()),
    # two-phase commit's own statements (MySQL XA, PostgreSQL), and
    # preparing a statement (it runs when EXECUTEd)
    ("XA START 'x'", set()),
    ("XA END 'x'", set()),
    ("XA PREPARE 'x'", set()),
    ("XA COMMIT 'x'", set()),
    ("XA ROLLBACK 'x'", set()),
    ("PREPARE TRANSACTION 'x'", set()),
    ("COMMIT PREPARED 'x'", set()),
    ("ROLLBACK PREPARED 'x'", set()),
    ("PREPARE q AS UPDATE a SET x = 1", set()),
    ("EXECUTE q", {UNKNOWN}),
    # one write
    ("UPDATE a SET x = 1", {"a"}),
    ("UPDATE a\nSET x = 1", {"a"}),
    ("UPDATE a AS q SET x = 1", {"a"}),
    ("UPDATE a q SET x = 1 FROM b WHERE q.id = b.id", {"a"}),
    ("DELETE FROM a USING b WHERE a.id = b.id", {"a"}),
    ("INSERT OR REPLACE INTO s.t VALUES (1)", {"s.t"}),
    # database.schema.table (PostgreSQL's own database, SQL Server's): not
    # a write to a table named after the schema (found by review)
    ("DELETE FROM test.public.t WHERE id = 2", {"public.t"}),
    ("INSERT INTO test.public.t VALUES (1)", {"public.t"}),
    ('TRUNCATE TABLE "db"."s"."T"', {"s.t"}),
    ("UPDATE `a``b` SET x = 1", {"a`b"}),  # (a doubled backquote: found by review)
    ("TRUNCATE TABLE a", {"a"}),
    ('UPDATE "order-items" SET v = 1', {"order-items"}),
    ('UPDATE "line items" SET v = 1', {"line items"}),
    ('update "Sch"."x ""y""" set a = 1', {'sch.x "y"'}),
    ("UPDATE `a b` SET x = 1", {"a b"}),
    ("UPDATE [a b] SET x = 1", {"a b"}),
    ("UPDATE IGNORE a SET x = 1", {"a"}),
    ("UPDATE LOW_PRIORITY IGNORE a SET x = 1", {"a"}),
    ("DELETE LOW_PRIORITY QUICK IGNORE FROM a WHERE x = 1", {"a"}),
    ("INSERT IGNORE INTO a VALUES (1)", {"a"}),
    ("INSERT HIGH_PRIORITY INTO a VALUES (1)", {"a"}),
    ("REPLACE LOW_PRIORITY INTO a VALUES (1)", {"a"}),
    # several statements
    ("UPDATE a SET x = 1; UPDATE b SET y = 2;", {"a", "b"}),
    ("SELECT 1; UPDATE b SET y = 2", {"b"}),
    ("UPDATE a SET x = 'it''s; fine'; DELETE FROM b", {"a", "b"}),
    # quotes that are not strings' hide no statement boundary
    ('SELECT 1 AS "it\'s"; UPDATE b SET y = 2', {"b"}),
    ('SELECT 1 AS "a--b"; UPDATE b SET y = 2', {"b"}),
    ('INSERT INTO log (msg) VALUES ("don\'t"); UPDATE b SET y = 2', {"log", "b"}),  # MySQL
    ("SELECT 1 AS `it's`; UPDATE b SET y = 2", {"b"}),
    ('UPDATE "x;y" SET v = 1; UPDATE b SET y = 2', {"x;y", "b"}),
    ("SELECT 1 /* ; UPDATE a SET x = 1 */; UPDATE b SET y = 2", {"b"}),
    # "#": MySQL's comment to the end of the line, or PostgreSQL's operator
    ("SELECT 1 # it's\n; UPDATE b SET y = 2", {"b"}),  # (an unclosed string in PostgreSQL)
    ("SELECT 1 # it's\n; UPDATE b SET y = 'x'", {UNKNOWN}),
    ("SELECT 2 # 3; UPDATE b SET y = 2", {UNKNOWN}),  # one statement in MySQL, two in PostgreSQL
    ("UPDATE a SET x = 1 # it's\n; UPDATE b SET y = 2 # ';\n;", {UNKNOWN}),  # as many ";", elsewhere
    ("UPDATE a SET x = x--1; UPDATE b SET y = 2", {UNKNOWN}),  # MySQL: x minus -1, two statements
    ("UPDATE a SET x = 1; -- done\nUPDATE b SET y = 2", {"a", "b"}),
    # MySQL runs what an executable comment holds
    ("/*!40000 DELETE FROM a */", {"a"}),
    ("SELECT /*!40001 SQL_NO_CACHE */ id FROM other", set()),
    ("/*!40101 SET NAMES utf8 */; /*M!100000 UPDATE b SET y = 2 */", {"b"}),
    # cannot tell which tables: everything
    ("EXPLAIN ANALYZE UPDATE a SET x = 1", {UNKNOWN}),
    ("EXPLAIN (ANALYZE, BUFFERS) DELETE FROM a", {UNKNOWN}),
    ("TRUNCATE b, a", {UNKNOWN}),
    ("DELETE FROM a, b USING a JOIN b ON a.id = b.a_id", {UNKNOWN}),
    ("DELETE FROM a.*, b.* USING a JOIN b ON a.id = b.a_id", {UNKNOWN}),
    ("DELETE QUICK FROM s.a , b USING s.a JOIN b", {UNKNOWN}),
    ("DELETE FROM a USING a JOIN b ON a.id = b.a_id", {"a"}),
    ("TRUNCATE a CASCADE", {UNKNOWN}),
    ("DROP TABLE a, b", {UNKNOWN}),
    ("UPDATE a, b SET a.x = 1, b.y = 2", {UNKNOWN}),
    ("UPDATE a JOIN b ON a.id = b.id SET b.y = 2", {UNKNOWN}),
    ("DO $$ BEGIN UPDATE a SET x = 1; END $$", {UNKNOWN}),
    ("WITH u AS (UPDATE a SET x = 1 RETURNING id) SELECT * FROM u", {UNKNOWN}),
    ("SELECT 1; CALL refresh_everything()", {UNKNOWN}),
    ("UPDATE a SET x = 'C:\\'; UPDATE b SET y = 1", {UNKNOWN}),  # is \' an escape?
]


@pytest.mark.parametrize(("sql", "written"), CASES, ids=[c[0][:40] for c in CASES])
def test_text_tables(sql: str, written: set[str]) -> None:
    assert text_tables(sql) == written


def test_multi_table_update_writes_every_table_it_sets() -> None:
    """MySQL's ``UPDATE a, b SET a.x = .., b.y = ..`` (Core: ``update(a)
    .values({a.c.x: .., b.c.y: ..})``) writes both tables."""
    from types import SimpleNamespace

    from sqlalchemy import Column, Integer, MetaData, Table, update
    from sqlalchemy.dialects import mysql

    from ormcache.invalidation import _written_by

    metadata = MetaData()
    a = Table("a", metadata, Column("id", Integer, primary_key=True), Column("x", Integer))
    b = Table("b", metadata, Column("id", Integer, primary_key=True), Column("a_id", Integer), Column("y", Integer))
    stmt = update(a).values({a.c.x: 1, b.c.y: 2}).where(a.c.id == b.c.a_id)
    dialect = mysql.dialect()
    compiled = stmt.compile(dialect=dialect)
    assert str(compiled).startswith("UPDATE a, b SET")
    context = SimpleNamespace(
        dialect=dialect,
        execution_options={},
        compiled=compiled,
        is_text=False,
        isddl=False,
        isinsert=False,
        isupdate=True,
        isdelete=False,
    )
    assert {"a", "b"} <= _written_by(context, str(compiled), None)  # type: ignore[arg-type,operator]


def test_a_textual_write_of_a_qualified_parent_follows_its_cascades() -> None:
    """``DELETE FROM other.parent`` through an engine on another database
    is a write of the ``parent`` a model maps without its schema: its
    foreign keys' cascades are followed (found by review)."""
    from sqlalchemy import Column, ForeignKey, Integer
    from sqlalchemy.orm import DeclarativeBase

    from ormcache.invalidation import _text_cascades

    class CBase(DeclarativeBase):
        pass

    class CParent(CBase):
        __tablename__ = "tw_cparent"
        id = Column(Integer, primary_key=True)

    class CChild(CBase):
        __tablename__ = "tw_cchild"
        id = Column(Integer, primary_key=True)
        parent_id = Column(ForeignKey("tw_cparent.id", ondelete="CASCADE"))

    assert {t.name for t in _text_cascades({"other.tw_cparent"})} == {"tw_cchild"}


def test_core_writes_of_a_lightweight_table_follow_the_mapped_cascades(tmp_path: object) -> None:
    """``delete(table("parent", column("id")))`` (alembic data migrations
    write tables so) has no MetaData to read foreign keys from: the mapped
    table of its name tells the cascades, as for textual writes (the
    children's entries were served stale)."""
    import uuid

    from sqlalchemy import Column, ForeignKey, Integer, column, create_engine, delete, event, select, table, update
    from sqlalchemy.orm import DeclarativeBase, sessionmaker

    from ormcache import FromCache, OrmCache

    class LBase(DeclarativeBase):
        pass

    class LParent(LBase):
        __tablename__ = "tw_lparent"
        id = Column(Integer, primary_key=True)

    class LChild(LBase):
        __tablename__ = "tw_lchild"
        id = Column(Integer, primary_key=True)
        parent_id = Column(ForeignKey("tw_lparent.id", ondelete="CASCADE", onupdate="CASCADE"))

    engine = create_engine(f"sqlite:///{tmp_path}/light.db")
    event.listen(engine, "connect", lambda conn, _: conn.execute("PRAGMA foreign_keys=ON"))
    LBase.metadata.create_all(engine)
    with sessionmaker(engine).begin() as s:
        s.add_all([LParent(id=1), LParent(id=2)])
        s.flush()
        s.add_all([LChild(id=10, parent_id=1), LChild(id=20, parent_id=2)])
    cache = OrmCache.from_settings({"namespace": "l" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}})
    maker = sessionmaker(engine)
    cache.attach(maker)
    children = select(LChild.id, LChild.parent_id).order_by(LChild.id).options(FromCache())

    def read() -> list[tuple[int, int]]:
        with maker() as s:
            return [tuple(r) for r in s.execute(children)]

    light = table("tw_lparent", column("id"))
    assert read() == read() == [(10, 1), (20, 2)]
    with engine.begin() as conn:
        conn.execute(update(light).where(light.c.id == 2).values(id=5))
    assert read() == [(10, 1), (20, 5)]
    with engine.begin() as conn:
        conn.execute(delete(light).where(light.c.id == 1))
    assert read() == [(20, 5)]
    cache.close()
    engine.dispose()


# -- textual SELECTs under FromCache --------------------------------------

READS = [
    "SELECT * FROM templates WHERE id = :id",
    "  select name from templates;",
    "WITH t AS (SELECT * FROM templates) SELECT * FROM t",
    "(SELECT 1)",
    "VALUES (1)",
]
NOT_ONLY_READS = [
    "UPDATE templates SET name = 'x' RETURNING *",
    "INSERT INTO t SELECT 1",
    "WITH u AS (UPDATE templates SET name = 'x' RETURNING *) SELECT * FROM u",
    "SELECT * INTO copy FROM templates",
    "SELECT * FROM templates FOR UPDATE",
    "SELECT * FROM templates LOCK IN SHARE MODE",
    "SELECT nextval('s')",
    "SELECT 1; DELETE FROM templates",
    "CALL refresh()",
    "PRAGMA table_info(templates)",
    "",
    "SELECT NEXT VALUE FOR s",
    "SELECT pg_advisory_xact_lock(1)",
    "SELECT GET_LOCK('a', 1)",
    "SELECT pg_notify('c', 'x')",
    "SELECT set_config('a.b', 'c', false)",
    "SELECT pg_sleep(1)",
]


@pytest.mark.parametrize("sql", READS)
def test_a_textual_select_is_a_read(sql: str) -> None:
    from sqlalchemy import select, text

    from ormcache.keys import textual_read
    from ormcache.testing.fixtures import Template

    assert textual_read(text(sql))
    assert textual_read(select(Template).from_statement(text(sql)))
    assert textual_read(text(sql).columns(Template.id))
    assert textual_read(select(Template).where(Template.id == 1)) is None  # (not textual)


@pytest.mark.parametrize("sql", NOT_ONLY_READS)
def test_textual_sql_that_may_do_more_than_read_is_not_one(sql: str) -> None:
    from sqlalchemy import select, text

    from ormcache.keys import textual_read
    from ormcache.testing.fixtures import Template

    assert textual_read(text(sql)) is False
    assert textual_read(select(Template).from_statement(text(sql))) is False
    # (SQLAlchemy calls a text() given its columns a SELECT: the SQL is not looked at)
    assert textual_read(text(sql).columns(Template.id)) is False
    assert textual_read(select(Template).from_statement(text(sql).columns(Template.id))) is False


def test_textual_selects_with_from_cache_are_cached_and_invalidated(tmp_path: object) -> None:
    """``select(Model).from_statement(text(...))`` and ``text(...)`` with
    FromCache: SQLAlchemy cannot call them SELECTs, and they were run
    uncached without a word.  A textual SELECT is cached, as depending on
    every write to its database; one that writes (``UPDATE ... RETURNING``)
    runs every time."""
    import uuid

    from sqlalchemy import create_engine, select, text, update
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache, OrmCache
    from ormcache.testing import QueryCounter
    from ormcache.testing.fixtures import Base, Tag, Template, seed

    engine = create_engine(f"sqlite:///{tmp_path}/text.db")
    Base.metadata.create_all(engine)
    seed(engine)
    cache = OrmCache.from_settings({"namespace": "t" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}})
    maker = sessionmaker(engine)
    cache.attach(maker)
    mapped = select(Template).from_statement(text("SELECT * FROM templates WHERE id = :id")).options(FromCache())
    plain = text("SELECT name FROM templates WHERE id = :id").options(FromCache())

    def read() -> tuple[str, str, int]:
        with QueryCounter(engine) as counter, maker() as s:
            names = s.scalars(mapped, {"id": 1}).one().name, s.execute(plain, {"id": 2}).scalar_one()
        return (*names, counter.selects)

    assert read() == ("t1", "t2", 2)
    assert read() == ("t1", "t2", 0)
    with maker() as s:  # a write to another table: the SQL's tables are not known
        s.execute(update(Tag).where(Tag.id == 1).values(label="x"))
        s.commit()
    assert read() == ("t1", "t2", 2)
    with maker() as s:
        s.execute(update(Template).where(Template.id == 1).values(name="new"))
        s.commit()
    assert read() == ("new", "t2", 2)
    writes = select(Template).from_statement(
        text("UPDATE templates SET name = name || 'x' WHERE id = 3 RETURNING *")
    ).options(FromCache())
    for expected in ("t3x", "t3xx"):
        with maker() as s:
            assert s.scalars(writes).one().name == expected
            s.commit()
    # the same given its columns, which SQLAlchemy takes for a SELECT
    columns = text("UPDATE templates SET name = name || 'y' WHERE id = 4 RETURNING id, name").columns(
        Template.id, Template.name
    )
    for expected in ("t4y", "t4yy"):
        with maker() as s:
            assert s.execute(columns.options(FromCache())).one().name == expected
            s.commit()
    for expected in ("t4yyz", "t4yyzz"):
        with maker() as s:
            stmt = select(Template).from_statement(
                text("UPDATE templates SET name = name || 'z' WHERE id = 4 RETURNING id, name").columns(Template.id, Template.name)
            )
            assert s.scalars(stmt.options(FromCache())).one().name == expected
            s.commit()
    cache.close()
    engine.dispose()

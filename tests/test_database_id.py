"""What names a database in memory_cache keys and version keys (``keys.database_id``).

Two engines that reach the same tables must get the same id, in every
process (or a write through one would not invalidate reads through the
other); two engines that see different tables under one name must get
different ids (or one would be served the other's rows).
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from ormcache import FromCache, OrmCache
from ormcache import keys
from ormcache.keys import database_id
from ormcache.testing.fixtures import Base, Template, seed, template_table


def test_in_memory_sqlite_engine_and_its_option_engines_are_one_database(memory_cache: OrmCache) -> None:
    engine = create_engine("sqlite://", poolclass=StaticPool)
    derived = engine.execution_options(isolation_level="AUTOCOMMIT")
    assert database_id(engine) == database_id(derived)
    assert database_id(engine) != database_id(create_engine("sqlite://"))
    assert database_id(engine.execution_options(ormcache_database="eu-1")) == "named:eu-1"
    Base.metadata.create_all(engine)
    seed(engine)
    _write_reaches_reader(memory_cache, engine, derived)


def _write_reaches_reader(cache: OrmCache, reader: Any, writer: Any) -> None:
    """A row cached through ``reader`` and then written through ``writer``
    is read fresh through ``reader``."""
    maker = sessionmaker(reader)
    cache.attach(maker)
    stmt = select(Template).where(Template.id == 1).options(FromCache())

    def name() -> str:
        with maker() as s:
            return s.scalars(stmt).one().name

    assert name() == name() == "t1"
    with writer.begin() as conn:
        conn.execute(update(template_table).where(template_table.c.id == 1).values(name="written"))
    assert name() == "written"


def test_server_url_spellings_of_one_database_agree(postgresql_url: str) -> None:
    url = make_url(postgresql_url)
    no_port = URL.create(
        url.drivername, url.username, url.password, url.host, None, url.database, url.query
    )
    spelled = [no_port, no_port.set(port=5432)] if (url.port or 5432) == 5432 else [url]
    ids = {database_id(create_engine(u)) for u in spelled}
    assert len(ids) == 1
    (ident,) = ids
    assert ident.startswith(f"postgresql://{url.host}:{url.port or 5432}/{url.database}")


def test_search_path_tenants_are_different_databases(postgresql_url: str, memory_cache: OrmCache) -> None:
    """Schema-per-tenant through the ``search_path`` a URL sets: the same
    unqualified SQL reads different tables, so each tenant has its own
    entries."""
    admin = create_engine(postgresql_url, isolation_level="AUTOCOMMIT")
    tenants = [f"ormcache_tenant_{i}_{uuid.uuid4().hex[:6]}" for i in range(2)]
    try:
        with admin.connect() as conn:
            for tenant in tenants:
                conn.execute(text(f'CREATE SCHEMA "{tenant}"'))
        base = make_url(postgresql_url)
        engines = [
            create_engine(base.update_query_dict({"options": f"-csearch_path={t}"})) for t in tenants
        ]
        for i, engine in enumerate(engines):
            Base.metadata.create_all(engine)
            seed(engine, prefix=f"tenant{i}-")
        assert database_id(engines[0]) != database_id(engines[1])
        makers = [sessionmaker(e) for e in engines]
        for maker in makers:
            memory_cache.attach(maker)
        stmt = select(Template).where(Template.id == 1).options(FromCache())
        for _ in range(2):
            for i, maker in enumerate(makers):
                with maker() as s:
                    assert s.scalars(stmt).one().name == f"tenant{i}-1"
                    assert s.get_one(Template, 2, options=[FromCache()]).name == f"tenant{i}-2"
        for engine in engines:
            engine.dispose()
    finally:
        with admin.connect() as conn:
            for tenant in tenants:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{tenant}" CASCADE'))
        admin.dispose()




def test_database_ids_ask_nothing_of_the_server() -> None:
    """Naming a database never connects to it: an engine whose server is
    down still gets its id (explicit invalidation goes on; a connection
    held by a session is never competed for)."""
    from servers import closed_port

    port = closed_port()
    engine = create_engine(f"postgresql+psycopg2://nobody@127.0.0.1:{port}/nowhere")
    assert database_id(engine) == f"postgresql://127.0.0.1:{port}/nowhere"
    assert engine.dialect.server_version_info is None  # never connected


def test_search_path_spellings_still_invalidate_each_other(postgresql_url: str, memory_cache: OrmCache) -> None:
    """One URL sets ``search_path=public``, the other leaves it implicit:
    their result keys differ, but a write through either invalidates the
    other's readers (version keys are per database, not per spelling)."""
    from servers import postgresql_database

    url = postgresql_database(postgresql_url, "ormcache_spelling")
    plain = create_engine(url)
    spelled = create_engine(url.update_query_dict({"options": "-csearch_path=public"}))
    try:
        Base.metadata.drop_all(plain)
        Base.metadata.create_all(plain)
        seed(plain)
        assert database_id(plain) != database_id(spelled)
        _write_reaches_reader(memory_cache, plain, spelled)
    finally:
        plain.dispose()
        spelled.dispose()


def test_servers_and_databases_named_in_the_url_query() -> None:
    """libpq takes host, port and dbname from the query as well (a Unix
    socket's directory, say), the MySQL drivers a socket: two such URLs
    that differ only there are two databases."""
    urls = [
        "postgresql+psycopg2://u@/?host=/run/pg-a&dbname=test",
        "postgresql+psycopg2://u@/?host=/run/pg-a&dbname=postgres",
        "postgresql+psycopg2://u@/?host=/run/pg-b&port=5433&dbname=test",
        "mysql+pymysql://u@/test?unix_socket=/run/mysqld-a.sock",
        "mysql+pymysql://u@/test?unix_socket=/run/mysqld-b.sock",
    ]
    ids = [database_id(create_engine(url)) for url in urls]
    assert len(set(ids)) == len(ids)
    assert database_id(create_engine(urls[0])) == ids[0]


def test_sqlite_uris_name_their_database(tmp_path: Any) -> None:
    """A SQLite URI's parameters are in the URL's query (SQLAlchemy passes
    them on to SQLite): ``mode=memory`` there is a private database, with
    ``cache=shared`` one per name in the process; a file URI with an
    authority (``file://localhost/path``) is that file."""
    name = "mem" + uuid.uuid4().hex[:8]
    private = f"sqlite:///file:{name}?mode=memory&uri=true"
    one, two = (create_engine(private, poolclass=StaticPool) for _ in range(2))
    assert database_id(one) != database_id(two)
    assert database_id(one).startswith("sqlite-mem:")
    shared = f"sqlite:///file:{name}?mode=memory&cache=shared&uri=true"
    ids = {database_id(create_engine(shared, poolclass=StaticPool)) for _ in range(2)}
    assert len(ids) == 1 and ids.pop().startswith("sqlite-shm:")
    path = tmp_path / "a b.db"
    plain = database_id(create_engine(f"sqlite:///{path}"))
    for url in (
        f"sqlite:///file:{path}?mode=ro&uri=true",
        f"sqlite:///file://{path}?uri=true",
        f"sqlite:///file://localhost{path}?uri=true",
        "sqlite:///file:" + str(path).replace(" ", "%2520") + "?uri=true",  # %20 for SQLite
    ):
        assert database_id(create_engine(url)) == plain, url
    # without uri=true, "file:" is part of a file's name
    assert database_id(create_engine(f"sqlite:///file:{path}")) != plain


def test_in_memory_sqlite_on_its_default_pool_is_a_database_per_thread(memory_cache: OrmCache) -> None:
    """``create_engine("sqlite://")`` keeps a connection, and so a
    database, per thread (``SingletonThreadPool``): one thread is never
    served another's rows."""
    import threading

    engine = create_engine("sqlite://")
    maker = sessionmaker(engine)
    memory_cache.attach(maker)
    stmt = select(Template.name).where(Template.id == 1).options(FromCache())
    seen: dict[str, Any] = {}

    def work(name: str) -> None:
        Base.metadata.create_all(engine)
        seed(engine, prefix=f"{name}-")
        seen[name + "-id"] = database_id(engine)
        for _ in range(2):
            with maker() as s:
                seen[name] = s.scalars(stmt).one()

    for name in ("a", "b"):
        thread = threading.Thread(target=work, args=(name,))
        thread.start()
        thread.join()
    assert seen["a"] == "a-1" and seen["b"] == "b-1"
    assert seen["a-id"] != seen["b-id"]
    assert database_id(engine) == database_id(engine) not in (seen["a-id"], seen["b-id"])
    engine.dispose()


def test_a_server_named_in_the_query_is_the_one_the_netloc_names() -> None:
    """``@/test?host=127.0.0.1`` reaches the server ``@127.0.0.1/test``
    does (libpq reads either): one database (found by review: stale
    across the two spellings).  A socket directory or several hosts stay
    as written."""
    same = [
        "postgresql+psycopg2://u@127.0.0.1/test",
        "postgresql+psycopg2://u@/test?host=127.0.0.1",
        "postgresql+psycopg2://u@/?host=127.0.0.1&dbname=test",
        "postgresql+psycopg2://u@/test?host=127.0.0.1&port=5432",
    ]
    assert len({database_id(create_engine(url)) for url in same}) == 1
    others = [
        "postgresql+psycopg2://u@/test?host=127.0.0.1&port=5433",
        "postgresql+psycopg2://u@/test?host=/run/postgresql",
        "postgresql+psycopg2://u@/test?host=h1,h2",
    ]
    ids = {database_id(create_engine(url)) for url in others}
    assert len(ids) == 3 and database_id(create_engine(same[0])) not in ids


def test_a_mysql_database_named_db_in_the_query() -> None:
    """PyMySQL takes the database as ``?db=`` too: two such URLs naming
    two databases are two (they shared result keys: one database served
    the other's rows, found by review)."""
    a = database_id(create_engine("mysql+pymysql://u@127.0.0.1:3306/?db=a"))
    b = database_id(create_engine("mysql+pymysql://u@127.0.0.1:3306/?db=b"))
    assert a != b
    assert a == database_id(create_engine("mysql+pymysql://u@127.0.0.1:3306/a"))


def test_named_tenants_keep_results_apart_and_share_version_keys(tmp_path: Any, memory_cache: OrmCache) -> None:
    """``ormcache_database="app#search_path=a"`` and ``"...=b"`` (tenants
    whose search_path ormcache cannot see): each reads its own entries,
    and a write through either is seen by the other (the guide's advice)."""
    from ormcache.testing import QueryCounter

    path = tmp_path / "app.db"
    base = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(base)
    seed(base)
    engines = [base.execution_options(ormcache_database=f"app#search_path={t}") for t in "ab"]
    makers = [sessionmaker(e) for e in engines]
    for maker in makers:
        memory_cache.attach(maker)
    stmt = select(Template.name).where(Template.id == 1).options(FromCache())

    def read(maker: Any) -> tuple[str, int]:
        with QueryCounter(base) as counter, maker() as s:
            return s.scalars(stmt).one(), counter.selects

    try:
        assert read(makers[0]) == ("t1", 1)
        assert read(makers[1]) == ("t1", 1)  # its own entry
        assert read(makers[1]) == ("t1", 0)
        with makers[0].begin() as s:
            s.execute(update(Template).where(Template.id == 1).values(name="new"))
        assert read(makers[1]) == ("new", 1)
    finally:
        base.dispose()


def test_engines_whose_drivers_return_other_values_keep_their_own_entries(tmp_path: Any, memory_cache: OrmCache) -> None:
    # (entries hold the driver's raw rows: one engine's DATE values as
    # date objects, replayed through the other's processors, which parse
    # strings, failed with TypeError)
    import sqlite3

    from sqlalchemy import Date

    class Base(DeclarativeBase):
        pass

    class Event(Base):
        __tablename__ = "event"
        id: Mapped[int] = mapped_column(primary_key=True)
        on: Mapped[datetime.date] = mapped_column(Date)

    path = tmp_path / "events.db"
    plain = create_engine(f"sqlite:///{path}")
    native = create_engine(
        f"sqlite:///{path}", connect_args={"detect_types": sqlite3.PARSE_DECLTYPES}, native_datetime=True
    )
    Base.metadata.create_all(plain)
    when = datetime.date(2024, 1, 2)
    with sessionmaker(plain).begin() as s:
        s.add(Event(id=1, on=when))
    stmt = select(Event).where(Event.id == 1).options(FromCache("default"))
    for engine in (native, plain, native, plain):
        factory = sessionmaker(engine)
        memory_cache.attach(factory)
        with factory() as s:
            assert s.scalars(stmt).one().on == when
    hits = memory_cache.stats()["regions"]["default"]
    assert (hits["misses"], hits["hits"]) == (2, 2)  # one entry per engine
    assert keys.row_format(native.dialect) != keys.row_format(plain.dialect)
    # invalidate(statement) drops the entries of every engine of the database
    makers = [sessionmaker(native), sessionmaker(plain)]
    for maker in makers:
        memory_cache.attach(maker)
    for target, day in (({}, "2025-01-01"), ({"bind": plain}, "2026-01-01")):
        with sqlite3.connect(path) as raw:  # (a write behind ormcache's back)
            raw.execute("UPDATE event SET \"on\" = ?", (day,))
        raw.close()
        memory_cache.invalidate(stmt, **target)
        for maker in makers:
            with maker() as s:
                assert s.scalars(stmt).one().on == datetime.date.fromisoformat(day)
    plain.dispose()
    native.dispose()


def test_psycopg2_and_asyncpg_readers_of_one_database_keep_their_own_entries(postgresql_url: str, memory_cache: OrmCache) -> None:
    # (asyncpg returns INET as an address object, psycopg2 as a string: a
    # hit on the other's entry gave the wrong type; psycopg2 could not read
    # asyncpg's ranges at all)
    import asyncio
    import ipaddress

    from sqlalchemy.dialects.postgresql import INET
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
    from sqlalchemy.pool import NullPool

    class Base(DeclarativeBase):
        pass

    table = "ormcache_drivers_" + uuid.uuid4().hex[:8]

    class Host(Base):
        __tablename__ = table
        id: Mapped[int] = mapped_column(primary_key=True)
        ip = mapped_column(INET)

    sync = create_engine(postgresql_url)
    Base.metadata.create_all(sync)
    try:
        with sessionmaker(sync).begin() as s:
            s.add(Host(id=1, ip="10.0.0.1"))
        stmt = select(Host).order_by(Host.id).options(FromCache("default"))  # (no parameters: one SQL text)
        factory = sessionmaker(sync)
        memory_cache.attach(factory)
        url = make_url(postgresql_url).set(drivername="postgresql+asyncpg")
        async_engine = create_async_engine(url, poolclass=NullPool)
        async_factory = async_sessionmaker(async_engine)
        memory_cache.attach(async_factory)

        async def read_async() -> Any:
            async with async_factory() as s:
                return (await s.scalars(stmt)).one().ip

        with factory() as s:
            uncached_sync = s.scalars(select(Host)).one().ip
        for _ in range(2):
            with factory() as s:
                ip = s.scalars(stmt).one().ip
            assert ip == uncached_sync and type(ip) is type(uncached_sync)
            ip = asyncio.run(read_async())
            assert ip == ipaddress.ip_address("10.0.0.1") and isinstance(ip, ipaddress.IPv4Address)
        asyncio.run(async_engine.dispose())
    finally:
        Base.metadata.drop_all(sync)
        sync.dispose()


def test_session_settings_in_the_url_keep_results_apart(postgresql_url: str, memory_cache: OrmCache) -> None:
    """An engine whose URL's ``options`` sets the session time zone reads
    other values from the same rows (``extract()``, ``to_char()``, offsets):
    its results are its own, while writes through either engine still
    invalidate the other's."""
    from sqlalchemy import DateTime, extract
    from sqlalchemy.orm import column_property

    class Base(DeclarativeBase):
        pass

    table = "ormcache_tz_" + uuid.uuid4().hex[:8]

    class Stamp(Base):
        __tablename__ = table
        id: Mapped[int] = mapped_column(primary_key=True)
        at: Mapped[datetime.datetime] = mapped_column(DateTime(timezone=True))
        hour = column_property(extract("hour", at))

    utc = create_engine(make_url(postgresql_url).update_query_dict({"options": "-c timezone=UTC"}))
    tokyo = create_engine(make_url(postgresql_url).update_query_dict({"options": "-c timezone=Asia/Tokyo"}))
    assert database_id(utc) != database_id(tokyo)
    Base.metadata.create_all(utc)
    try:
        with sessionmaker(utc).begin() as s:
            s.add(Stamp(id=1, at=datetime.datetime(2024, 1, 1, 20, 0, tzinfo=datetime.timezone.utc)))
        stmt = select(Stamp).where(Stamp.id == 1).options(FromCache("default"))
        makers = {"utc": sessionmaker(utc), "tokyo": sessionmaker(tokyo)}
        for maker in makers.values():
            memory_cache.attach(maker)

        def hours() -> dict[str, int]:
            found = {}
            for name, maker in makers.items():
                with maker() as s:
                    found[name] = int(s.scalars(stmt).one().hour)
            return found

        assert hours() == hours() == {"utc": 20, "tokyo": 5}
        with makers["utc"].begin() as s:
            s.get_one(Stamp, 1).at = datetime.datetime(2024, 1, 1, 21, 0, tzinfo=datetime.timezone.utc)
        assert hours() == {"utc": 21, "tokyo": 6}
    finally:
        Base.metadata.drop_all(utc)
        utc.dispose()
        tokyo.dispose()


def test_row_formats_tell_deserializers_apart() -> None:
    import decimal
    import functools
    import json

    def engine(**kw: Any) -> Any:
        return create_engine("postgresql+psycopg2://nobody@127.0.0.1:1/nowhere", **kw).dialect

    formats = {
        keys.row_format(engine()),
        keys.row_format(engine(json_deserializer=json.loads)),
        keys.row_format(engine(json_deserializer=functools.partial(json.loads))),
        keys.row_format(engine(json_deserializer=functools.partial(json.loads, parse_float=decimal.Decimal))),
        keys.row_format(engine(json_deserializer=lambda text: json.loads(text))),
        keys.row_format(engine(json_deserializer=lambda text: json.loads(text, parse_float=decimal.Decimal))),
    }
    assert len(formats) == 6
    assert keys.row_format(engine(json_deserializer=json.loads)) == keys.row_format(engine(json_deserializer=json.loads))

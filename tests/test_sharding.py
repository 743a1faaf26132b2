"""ormcache with SQLAlchemy's horizontal_shard: per-shard entries."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Integer, create_engine, inspect, select
from sqlalchemy.ext.horizontal_shard import ShardedSession, set_shard_id
from sqlalchemy.orm import sessionmaker

from ormcache import ConfigurationError, FromCache, OrmCache
from ormcache.testing import QueryCounter
from ormcache.testing.fixtures import Base, Template, seed
from unseen import unseen_write

SHARDS = ("s0", "s1", "s2")


class Env:
    def __init__(self, tmp_path: Any, backend: str, arguments: dict[str, Any]) -> None:
        self.engines = {}
        for i, name in enumerate(SHARDS):
            engine = create_engine(f"sqlite:///{tmp_path}/{name}.db")
            Base.metadata.create_all(engine)
            seed(engine, stores=1, per_store=3, prefix=f"{name}-")
            self.engines[name] = engine

        def shard_chooser(mapper: Any, instance: Any, clause: Any = None) -> str:
            return "s0"

        def identity_chooser(mapper: Any, primary_key: Any, **kw: Any) -> list[str]:
            return list(SHARDS)

        def execute_chooser(ctx: Any) -> list[str]:
            return list(ctx.execution_options.get("shards", SHARDS))

        self.plain = sessionmaker(
            class_=ShardedSession,
            shards=self.engines,
            shard_chooser=shard_chooser,
            identity_chooser=identity_chooser,
            execute_chooser=execute_chooser,
        )
        self.cached = sessionmaker(
            class_=ShardedSession,
            shards=self.engines,
            shard_chooser=shard_chooser,
            identity_chooser=identity_chooser,
            execute_chooser=execute_chooser,
        )
        self.cache = OrmCache.from_settings(
            {
                "namespace": "sh" + uuid.uuid4().hex[:8],
                "regions": {"default": {"backend": backend, "arguments": arguments}},
            }
        )
        self.cache.attach(self.cached)
        self.counters = {n: QueryCounter(e).__enter__() for n, e in self.engines.items()}

    def selects(self) -> dict[str, int]:
        out = {n: c.selects for n, c in self.counters.items()}
        for c in self.counters.values():
            c.reset()
        return out

    def close(self) -> None:
        for c in self.counters.values():
            c.__exit__()
        self.cache.close()
        for e in self.engines.values():
            e.dispose()


@pytest.fixture(params=["memory", "redis"])
def env(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Env]:
    arguments: dict[str, Any] = {}
    if request.param == "redis":
        arguments = {"url": request.getfixturevalue("redis_url")}
    e = Env(tmp_path, request.param, arguments)
    yield e
    e.close()


def snapshot(result: list[Any]) -> list[tuple[Any, ...]]:
    return [(t.id, t.name, inspect(t).identity_token) for t in result]


QUERIES = {
    "all-shards": lambda s: s.scalars(select(Template).where(Template.id <= 2)).all(),
    "one-shard": lambda s: s.scalars(
        select(Template).where(Template.id == 2).options(set_shard_id("s1"))
    ).all(),
    "chosen-shards": lambda s: s.scalars(
        select(Template).where(Template.id == 3).execution_options(shards=("s0", "s2"))
    ).all(),
    "get-by-identity-token": lambda s: [s.get(Template, 2, identity_token="s2")],
    # routed before ShardedSession's router runs: the shard is the identity token
    "bind-arguments": lambda s: s.scalars(
        select(Template).where(Template.id == 2), bind_arguments={"shard_id": "s1"}
    ).all(),
    "get-bind-arguments": lambda s: [s.get(Template, 2, bind_arguments={"shard_id": "s1"})],
}


@pytest.mark.parametrize("name", list(QUERIES))
def test_same_objects_as_uncached(env: Env, name: str) -> None:
    query = QUERIES[name]
    with env.plain() as s:
        expected = snapshot(query(s))

    def cached(s: Any) -> Any:
        return query(_CachingSession(s))

    for _ in range(2):
        with env.cached() as s:
            assert snapshot(cached(s)) == expected
    env.selects()
    with env.cached() as s:
        assert snapshot(cached(s)) == expected
    assert sum(env.selects().values()) == 0


class _CachingSession:
    """Adds FromCache to every statement and get() of the wrapped session."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def scalars(self, stmt: Any, **kw: Any) -> Any:
        return self.session.scalars(stmt.options(FromCache()), **kw)

    def get(self, *args: Any, **kw: Any) -> Any:
        return self.session.get(*args, options=[FromCache()], **kw)


def test_write_on_one_shard_invalidates_only_that_shard(env: Env) -> None:
    stmt = select(Template).where(Template.id <= 3).order_by(Template.id).options(FromCache())
    with env.cached() as s:
        s.scalars(stmt).all()
    assert env.selects() == {"s0": 1, "s1": 1, "s2": 1}
    with env.plain() as s:
        t = s.get(Template, 1, identity_token="s1")
        t.name = "changed on s1"
        s.commit()
    env.selects()
    with env.cached() as s:
        names = sorted(t.name for t in s.scalars(stmt).all())
    assert "changed on s1" in names
    assert env.selects() == {"s0": 0, "s1": 1, "s2": 0}


def test_invalidate_model_and_one_shard(env: Env) -> None:
    # (not a primary-key lookup: those keep no per-shard entries)
    stmt = select(Template).where(Template.id <= 1).options(FromCache())

    def run() -> dict[str, int]:
        with env.cached() as s:
            s.scalars(stmt).all()
        return env.selects()

    run()
    assert run() == {"s0": 0, "s1": 0, "s2": 0}
    env.cache.invalidate(Template, shard="s2")
    assert run() == {"s0": 0, "s1": 0, "s2": 1}
    env.cache.invalidate(Template)
    assert run() == {"s0": 1, "s1": 1, "s2": 1}
    with pytest.raises(ConfigurationError, match="unknown shard 's9': not a shard of the attached.*'s0', 's1', 's2'"):
        env.cache.invalidate(Template, shard="s9")
    env.cache.detach(env.cached)
    with pytest.raises(ConfigurationError, match=r"unknown shard 's9': attach.*\(none is attached\)"):
        env.cache.invalidate(Template, shard="s9")


# -- statements run on several shards: one entry ---------------------------


def _hits(env: Env) -> int:
    return sum(r["hits"] for r in env.cache.stats()["regions"].values())


def test_multi_shard_statement_is_one_entry(env: Env) -> None:
    stmt = select(Template).where(Template.id <= 2).order_by(Template.id).options(FromCache())
    with env.plain() as s:
        expected = snapshot(s.scalars(stmt).all())
    with env.cached() as s:
        assert snapshot(s.scalars(stmt).all()) == expected
    env.selects()
    before = _hits(env)
    with env.cached() as s:
        assert snapshot(s.scalars(stmt).all()) == expected
    assert sum(env.selects().values()) == 0
    # one backend read for the three shards, not one per shard
    assert _hits(env) - before == 1


@pytest.mark.parametrize("how", ["get", "select"])
def test_get_across_shards_hits_and_follows_writes(env: Env, how: str) -> None:
    """``session.get`` and ``select().where(pk == value)`` across the
    shards: one entry, which depends on that row in every shard."""

    def get(tid: int) -> Any:
        with env.cached() as s:
            if how == "get":
                t = s.get(Template, tid, options=[FromCache()])
            else:
                t = s.scalars(select(Template).where(Template.id == tid).options(FromCache())).one_or_none()
            return None if t is None else (t.name, inspect(t).identity_token)

    with env.plain() as s:  # a template that only shard s1 holds
        s.execute(
            Template.__table__.insert().values(id=50, store_id=1, name="only on s1", body={}),
            bind_arguments={"shard_id": "s1"},
        )
        s.commit()
    env.selects()
    assert get(50) == ("only on s1", "s1")
    assert env.selects() == {"s0": 1, "s1": 1, "s2": 1}
    before = _hits(env)
    assert get(50) == ("only on s1", "s1")
    assert get(99) is None
    env.selects()
    assert get(99) is None
    assert env.selects() == {"s0": 0, "s1": 0, "s2": 0}
    assert _hits(env) - before == 2

    with env.plain() as s:  # another row, another shard: the entry stays
        s.get(Template, 2, identity_token="s2").name = "other"
        s.commit()
    env.selects()
    assert get(50) == ("only on s1", "s1")
    assert env.selects() == {"s0": 0, "s1": 0, "s2": 0}

    with env.plain() as s:  # the row itself
        s.get(Template, 50, identity_token="s1").name = "renamed"
        s.commit()
    assert get(50) == ("renamed", "s1")
    assert get(50) == ("renamed", "s1")


def test_multi_shard_hit_keeps_pending_changes(env: Env) -> None:
    stmt = select(Template).where(Template.id <= 2).options(FromCache())
    with env.cached() as s:
        s.scalars(stmt).all()
    with env.cached() as s, s.no_autoflush:
        t = s.get(Template, 1, identity_token="s1")
        t.name = "pending"
        loaded = s.scalars(stmt).all()
        assert t in loaded
        assert t.name == "pending"
        assert {inspect(x).identity_token for x in loaded} == set(SHARDS)


def test_multi_shard_read_your_writes(env: Env) -> None:
    stmt = select(Template).where(Template.id == 1).options(FromCache())
    with env.cached() as s:
        s.scalars(stmt).all()
        t = s.get(Template, 1, identity_token="s0")
        t.name = "flushed, not committed"
        s.flush()
        names = {x.name for x in s.scalars(select(Template).where(Template.id == 1).options(FromCache()))}
        assert "flushed, not committed" in names
        s.rollback()
    with env.cached() as s:
        names = {x.name for x in s.scalars(stmt)}
    assert "flushed, not committed" not in names


def test_multi_shard_when_the_cache_is_down(tmp_path: Any) -> None:
    e = Env(tmp_path, "redis", {"url": "redis://127.0.0.1:1/0"})
    try:
        stmt = select(Template).where(Template.id <= 2).order_by(Template.id).options(FromCache())
        with e.plain() as s:
            expected = snapshot(s.scalars(stmt).all())
        for _ in range(2):
            with e.cached() as s:
                assert snapshot(s.scalars(stmt).all()) == expected
    finally:
        e.close()


def test_schema_translate_map_on_a_shards_connection(env: Env, tmp_path: Any) -> None:
    """A session whose connection to one shard translates the schema
    (``session.connection(bind_arguments=..., execution_options=...)``)
    reads that schema's rows there, not an entry merged across shards
    without the translation."""
    from sqlalchemy import event

    for name, engine in env.engines.items():
        path = tmp_path / f"{name}-tenant.db"

        @event.listens_for(engine, "connect")
        def attach(dbapi_conn: Any, record: Any, path: Any = path) -> None:
            dbapi_conn.execute(f"ATTACH DATABASE '{path}' AS tenant")

        engine.dispose()
        tenant = engine.execution_options(schema_translate_map={None: "tenant"})
        Base.metadata.create_all(tenant)
        seed(tenant, stores=1, per_store=3, prefix=f"{name}-tenant-")
    stmt = select(Template).where(Template.id <= 2).order_by(Template.id)
    maps = {"schema_translate_map": {None: "tenant"}}

    def read(maker: Any, translated: bool) -> list[tuple[Any, ...]]:
        with maker() as s:
            if translated:
                s.connection(bind_arguments={"shard_id": "s1"}, execution_options=maps)
            options = [FromCache()] if maker is env.cached else []
            return sorted(snapshot(s.scalars(stmt.options(*options)).all()), key=repr)

    expected = read(env.plain, True)
    assert ("s1-tenant-1" in repr(expected)) and ("s0-1" in repr(expected))
    for _ in range(2):
        assert read(env.cached, False) == read(env.plain, False)  # fills, then hits
        assert read(env.cached, True) == expected


def test_invalidate_model_on_a_shard_reaches_results_of_unknown_tables(env: Env) -> None:
    from sqlalchemy import func, text

    stmt = select(func.count()).select_from(text("templates")).options(FromCache(), set_shard_id("s1"))

    def count() -> int:
        with env.cached() as s:
            return int(s.execute(stmt).scalar_one())

    assert count() == 3
    unseen_write(env.engines["s1"], "DELETE FROM templates WHERE id = 3")
    env.selects()
    assert count() == 3 and env.selects()["s1"] == 0
    env.cache.invalidate(Template, shard="s0")
    assert count() == 3 and env.selects()["s1"] == 0  # another shard's
    env.cache.invalidate(Template, shard="s1")
    assert count() == 2


@pytest.mark.parametrize("how", ["no-arguments", "shard", "bind", "session", "session-and-shard"])
def test_invalidate_a_statement_run_on_several_shards(env: Env, how: str) -> None:
    """``invalidate(stmt)`` drops the entry a statement run on several
    shards is cached as (and the per-shard entries it is refilled from)."""
    stmt = select(Template).where(Template.id <= 2).order_by(Template.id).options(FromCache())

    def names() -> list[str]:
        with env.cached() as s:
            return sorted(t.name for t in s.scalars(stmt))

    before = names()
    assert "s1-1" in before
    unseen_write(env.engines["s1"], "UPDATE templates SET name = 'outside' WHERE id = 1")
    assert names() == before
    kw: dict[str, Any] = {"shard": {"shard": "s1"}, "bind": {"bind": env.engines["s1"]}}.get(how, {})
    with env.cached() as session:
        if how.startswith("session"):
            kw["session"] = session
        if how == "session-and-shard":
            kw["shard"] = "s1"
        env.cache.invalidate(stmt, **kw)
    after = names()
    assert "outside" in after and "s1-1" not in after


def test_invalidate_a_shard_id_that_two_factories_share(tmp_path: Any) -> None:
    """Two attached ShardedSession factories name different databases by
    the same shard id: ``invalidate(Model, shard=...)`` reaches both."""
    from ormcache.testing.fixtures import Template as T

    cache = OrmCache.from_settings(
        {"namespace": "sh" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}}
    )
    makers, engines = [], []
    for app in ("one", "two"):
        shards = {}
        for sid in SHARDS:
            engine = create_engine(f"sqlite:///{tmp_path}/{app}-{sid}.db")
            Base.metadata.create_all(engine)
            seed(engine, stores=1, per_store=1, prefix=f"{app}-{sid}-")
            shards[sid] = engine
            engines.append(engine)
        maker = sessionmaker(
            class_=ShardedSession,
            shards=shards,
            shard_chooser=lambda m, i, clause=None: "s0",
            identity_chooser=lambda m, pk, **kw: list(SHARDS),
            execute_chooser=lambda ctx: list(SHARDS),
        )
        cache.attach(maker)
        makers.append(maker)
    stmt = select(T).options(FromCache(), set_shard_id("s1"))

    def names() -> list[list[str]]:
        out = []
        for maker in makers:
            with maker() as s:
                out.append([t.name for t in s.scalars(stmt)])
        return out

    try:
        assert names() == [["one-s1-1"], ["two-s1-1"]]
        for app in ("one", "two"):
            raw = sqlite3.connect(tmp_path / f"{app}-s1.db")  # writers ormcache does not see
            raw.execute(f"UPDATE templates SET name = '{app}-new'")
            raw.commit()
            raw.close()
        assert names() == [["one-s1-1"], ["two-s1-1"]]
        cache.invalidate(T, shard="s1")
        assert names() == [["one-new"], ["two-new"]]
    finally:
        cache.close()
        for engine in engines:
            engine.dispose()


def test_in_memory_shards_of_each_thread(memory_cache: OrmCache) -> None:
    """``sqlite://`` shards on their default pool: each thread has its own
    databases, and a statement run on every shard is one entry per
    thread's databases."""
    import threading

    engines = {name: create_engine("sqlite://") for name in SHARDS}  # SingletonThreadPool
    maker = sessionmaker(
        class_=ShardedSession,
        shards=engines,
        shard_chooser=lambda mapper, instance, clause=None: "s0",
        identity_chooser=lambda mapper, pk, **kw: list(SHARDS),
        execute_chooser=lambda ctx: list(SHARDS),
    )
    memory_cache.attach(maker)
    stmt = select(Template.name).order_by(Template.name).options(FromCache())
    seen: dict[str, list[str]] = {}
    seeded = threading.Barrier(2)
    a_read = threading.Event()

    def work(tag: str) -> None:
        for name, engine in engines.items():
            Base.metadata.create_all(engine)
            seed(engine, stores=1, per_store=1, prefix=f"{tag}{name}-")
        seeded.wait(30)  # both threads' databases are written
        if tag == "b":
            a_read.wait(30)  # and "a" stored its entry
        for _ in range(2):
            with maker() as s:
                seen[tag] = s.scalars(stmt).all()
        a_read.set()

    try:
        threads = [threading.Thread(target=work, args=(tag,)) for tag in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert seen == {"a": ["as0-1", "as1-1", "as2-1"], "b": ["bs0-1", "bs1-1", "bs2-1"]}
    finally:
        for engine in engines.values():
            engine.dispose()


def test_invalidate_a_statement_on_an_unknown_shard(env: Env) -> None:
    """shard= naming no shard of the attached factories is refused, as for
    invalidate(Model, shard=), rather than dropping nothing."""
    stmt = select(Template).where(Template.id == 1).options(FromCache())
    with pytest.raises(ConfigurationError, match="unknown shard 'nope'"):
        env.cache.invalidate(stmt, shard="nope")
    with pytest.raises(ConfigurationError, match="unknown shard 'nope'"):
        env.cache.invalidate(stmt, shard="nope", bind=env.engines["s0"])
    env.cache.invalidate(stmt, shard="s1", bind=env.engines["s1"])


def test_an_unknown_shard_names_a_few_of_many(tmp_path: Any) -> None:
    """The error for an unknown shard of a 101-shard factory lists ten of
    them and counts the rest, not all 101."""
    from sqlalchemy import create_engine
    from sqlalchemy.ext.horizontal_shard import ShardedSession
    from sqlalchemy.orm import sessionmaker

    from ormcache import OrmCache

    engines = {f"s{i:03d}": create_engine(f"sqlite:///{tmp_path}/s{i}.db") for i in range(101)}
    maker = sessionmaker(
        class_=ShardedSession,
        shards=engines,
        shard_chooser=lambda *a, **k: "s000",
        identity_chooser=lambda *a, **k: list(engines),
        execute_chooser=lambda *a, **k: list(engines),
    )
    cache = OrmCache.from_settings({"regions": {"default": {"backend": "memory"}}})
    cache.attach(maker)
    try:
        with pytest.raises(ConfigurationError) as info:
            cache.invalidate(Template, shard="s999")
        message = str(info.value)
        assert "'s000', 's001'" in message and message.endswith("'s009' and 91 more")
    finally:
        cache.close()
        for engine in engines.values():
            engine.dispose()


def test_shards_whose_drivers_return_other_values(tmp_path: Any, memory_cache: OrmCache) -> None:
    """Shards whose engines read DATE columns differently (one with
    ``native_datetime``): a statement run on both is cached per shard, each
    replayed through its own engine's dialect (a merged entry, replayed
    through the first shard's, failed on the other's rows)."""
    import datetime

    from sqlalchemy import Date
    from sqlalchemy.orm import DeclarativeBase, mapped_column

    class B(DeclarativeBase):
        pass

    class Day(B):
        __tablename__ = "days"
        id = mapped_column(Integer, primary_key=True)
        on = mapped_column(Date)

    engines = {
        "plain": create_engine(f"sqlite:///{tmp_path}/plain.db"),
        "native": create_engine(
            f"sqlite:///{tmp_path}/native.db",
            connect_args={"detect_types": sqlite3.PARSE_DECLTYPES},
            native_datetime=True,
        ),
    }
    for i, engine in enumerate(engines.values(), start=1):
        B.metadata.create_all(engine)
        with sessionmaker(engine).begin() as s:
            s.add(Day(id=i, on=datetime.date(2024, 1, i)))
    maker = sessionmaker(
        class_=ShardedSession,
        shards=engines,
        shard_chooser=lambda *a, **k: "plain",
        identity_chooser=lambda *a, **k: list(engines),
        execute_chooser=lambda ctx: list(engines),
    )
    memory_cache.attach(maker)
    stmt = select(Day).order_by(Day.id).options(FromCache())
    try:
        for _ in range(3):
            with maker() as s:
                assert sorted((d.id, d.on) for d in s.scalars(stmt)) == [
                    (1, datetime.date(2024, 1, 1)),
                    (2, datetime.date(2024, 1, 2)),
                ]
        assert memory_cache.stats()["regions"]["default"]["hits"] >= 2
    finally:
        for engine in engines.values():
            engine.dispose()

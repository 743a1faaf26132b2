"""ormcache with SQLAlchemy's horizontal_shard: per-shard entries."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, select
from sqlalchemy.ext.horizontal_shard import ShardedSession, set_shard_id
from sqlalchemy.orm import sessionmaker

from ormcache import ConfigurationError, FromCache, OrmCache
from ormcache.testing import QueryCounter
from ormcache.testing.fixtures import Base, Template, seed

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

    def scalars(self, stmt: Any) -> Any:
        return self.session.scalars(stmt.options(FromCache()))

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
    stmt = select(Template).where(Template.id == 1).options(FromCache())

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
    with pytest.raises(ConfigurationError, match="unknown shard 's9'"):
        env.cache.invalidate(Template, shard="s9")

"""Cache-everything mode: ``"cache_all": "REGION"`` in settings."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, func, literal_column, select, text
from sqlalchemy.orm import Session, sessionmaker

from ormcache import OrmCache
from ormcache.testing import QueryCounter
from ormcache.testing.fixtures import Base, Store, Tag, Template, seed


def _env(tmp_path: Any, uncached: str = "tags") -> tuple[Any, Any, OrmCache]:
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    seed(engine)
    cache = OrmCache.from_settings(
        {
            "namespace": "ca" + uuid.uuid4().hex[:8],
            "cache_all": "default",
            "uncached_tables": [uncached],
            "regions": {"default": {"backend": "memory"}},
        }
    )
    maker = sessionmaker(engine)
    cache.attach(maker)
    return engine, maker, cache


@pytest.fixture
def env(tmp_path: Any) -> Iterator[tuple[Any, Any, OrmCache]]:
    engine, maker, cache = _env(tmp_path)
    yield engine, maker, cache
    cache.close()
    engine.dispose()


def selects(engine: Any, maker: Any, fn: Any) -> tuple[Any, int]:
    with QueryCounter(engine) as c, maker() as s:
        value = fn(s)
    return value, c.selects


def test_plain_queries_and_lazy_loads_are_cached(env: Any) -> None:
    engine, maker, _ = env

    def work(s: Session) -> list[Any]:
        store = s.scalars(select(Store).where(Store.id == 1)).one()
        return [t.name for t in store.templates] + [s.get(Template, 7).name]

    first = selects(engine, maker, work)
    second = selects(engine, maker, work)
    assert first[0] == second[0] == ["t1", "t2", "t3", "t4", "t5", "t7"]
    assert first[1] == 3 and second[1] == 0


def test_writes_still_invalidate(env: Any) -> None:
    engine, maker, _ = env
    stmt = select(Template).where(Template.id == 1)
    selects(engine, maker, lambda s: s.scalars(stmt).one())
    with maker() as s:
        s.get(Template, 1).name = "fresh"
        s.commit()
    assert selects(engine, maker, lambda s: s.scalars(stmt).one().name) == ("fresh", 1)


@pytest.mark.parametrize(
    "stmt",
    [
        pytest.param(select(Template).where(Template.id == 1).with_for_update(), id="for-update"),
        pytest.param(select(Template.id, func.random()).where(Template.id == 1), id="random"),
        pytest.param(select(Template.id, func.now()).where(Template.id == 1), id="now"),
        pytest.param(
            select(Template).where(Template.id == 1).where(text("julianday('now') > 0")),
            id="text-function",
        ),
        pytest.param(
            select(Template).where(text("store_id IN (SELECT id FROM stores WHERE id = 1)")),
            id="text-subquery",
        ),
        pytest.param(
            select(Template.id, literal_column("(SELECT count(*) FROM stores)")).where(Template.id == 1),
            id="literal-subquery",
        ),
        pytest.param(select(Tag).where(Tag.id == 1), id="uncached-table"),
        pytest.param(
            select(Template).from_statement(text("SELECT * FROM templates WHERE id = 1")),
            id="textual",
        ),
    ],
)
def test_never_cached(env: Any, stmt: Any) -> None:
    engine, maker, _ = env
    for _ in range(2):
        _, n = selects(engine, maker, lambda s: s.execute(stmt).all())
        assert n == 1


def test_refresh_goes_to_the_database(env: Any) -> None:
    engine, maker, _ = env
    with maker() as s:
        t = s.get(Template, 1)
        with engine.begin() as conn:  # a writer ormcache cannot see coming
            conn.exec_driver_sql("UPDATE templates SET name = 'outside' WHERE id = 1")
        s.refresh(t)
        assert t.name == "outside"


def test_results_match_uncached(env: Any, tmp_path: Any) -> None:
    """The same workload, with and without the cache, sees the same data."""
    engine, maker, _ = env
    plain = sessionmaker(engine)

    def workload(factory: Any) -> list[Any]:
        out: list[Any] = []
        for round_ in range(3):
            with factory() as s:
                out.append([(t.id, t.name, t.store.name) for t in s.scalars(select(Template).order_by(Template.id))])
                out.append(s.scalars(select(func.count()).select_from(Template)).one())
                t = s.get(Template, 1 + round_)
                t.name = f"r{round_}"
                s.add(Template(id=200 + round_, store_id=1, name="n", body={}))
                s.commit()
                out.append(sorted(x.name for x in s.get(Store, 1).templates))
        return out

    cached = workload(maker)
    with Session(engine) as s:  # reset the data
        s.query(Template).filter(Template.id >= 200).delete()
        for i in (1, 2, 3):
            s.get(Template, i).name = f"t{i}"
        s.commit()
    assert workload(plain) == cached


@pytest.mark.parametrize("spelt", [" tags", "TAGS ", "main.tags"])
def test_uncached_tables_however_spelt(tmp_path: Any, spelt: str) -> None:
    """Spaces around a name, its case, and the default schema spelt out
    (SQLite's "main") name the same table."""
    engine, maker, cache = _env(tmp_path, spelt)
    try:
        for _ in range(2):
            assert selects(engine, maker, lambda s: s.execute(select(Tag).where(Tag.id == 1)).all())[1] == 1
    finally:
        cache.close()
        engine.dispose()


@pytest.mark.parametrize("spelt", ["tags", "main.tags"])
def test_uncached_tables_in_every_schema(tmp_path: Any, spelt: str) -> None:
    """A table of the name read under another schema (a
    ``schema_translate_map`` tenant's, here an attached SQLite database)
    is not cached either: one table for invalidation is one for
    ``uncached_tables`` (found by review: cached, and stale)."""
    from sqlalchemy import event

    engine, maker, cache = _env(tmp_path, spelt)
    tenant = tmp_path / "tenant.sqlite"
    event.listen(engine, "connect", lambda conn, record: conn.execute(f"ATTACH DATABASE '{tenant}' AS tenant"))
    engine.dispose()
    translated = engine.execution_options(schema_translate_map={None: "tenant"})
    Base.metadata.create_all(translated)
    tenant_maker = sessionmaker(translated)
    cache.attach(tenant_maker)
    try:
        assert selects(engine, tenant_maker, lambda s: s.execute(select(Store)).all())[1] == 1
        assert selects(engine, tenant_maker, lambda s: s.execute(select(Store)).all())[1] == 0  # cached
        for _ in range(2):
            assert selects(engine, tenant_maker, lambda s: s.execute(select(Tag)).all())[1] == 1
    finally:
        cache.close()
        engine.dispose()

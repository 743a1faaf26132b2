"""The template store example (examples/template_store): sharded SQLite
files in tmp_path, resolved, listed and aggregated with and without the
cache; writes invalidate only their own shard."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, insert, inspect
from sqlalchemy.engine import Engine

from examples.template_store import queries as q
from examples.template_store.models import SCHEMA_REVISION, Template
from examples.template_store.seed import build_store, load_layout
from examples.template_store.shards import (
    SHARD_IDS,
    SchemaMismatch,
    create_engines,
    make_sessionmaker,
    schema_revision,
)
from examples.template_store.workload import RESOLVE, WRITE, Workload
from ormcache import OrmCache
from ormcache.testing import QueryCounter


class Store_:
    """A built store with an uncached and a cached ShardedSession factory."""

    def __init__(self, data_dir: Path, shards: int, templates: int) -> None:
        self.layout = build_store(
            data_dir, shards=shards, templates=templates, scans_per_template=3
        )
        self.data_dir = data_dir
        self.engines: dict[str, Engine] = create_engines(data_dir)
        self.shards = tuple(self.engines)
        self.Plain = make_sessionmaker(self.engines)
        self.Cached = make_sessionmaker(self.engines)
        self.cache = OrmCache.from_settings(
            {
                "namespace": "ts" + uuid.uuid4().hex[:8],
                "regions": {
                    "templates": {"backend": "memory"},
                    "analytics": {"backend": "memory_pickle"},
                },
            }
        )
        self.cache.use_schema_version(schema_revision(self.engines))
        self.cache.attach(self.Cached)
        self.resolver = q.TemplateResolver(self.shards)
        self._stack = ExitStack()
        self.counters = {
            name: self._stack.enter_context(QueryCounter(engine))
            for name, engine in self.engines.items()
        }

    def queries(self) -> dict[str, int]:
        """Statements per shard since the last call (zeros left out)."""
        out = {name: c.count for name, c in self.counters.items() if c.count}
        for c in self.counters.values():
            c.reset()
        return out

    def close(self) -> None:
        self._stack.close()
        self.cache.close()
        for engine in self.engines.values():
            engine.dispose()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store_]:
    s = Store_(tmp_path, shards=5, templates=250)
    yield s
    s.close()


def found(template: Template | None) -> tuple[Any, ...] | None:
    if template is None:
        return None
    return (template.id, template.version, template.name, inspect(template).identity_token)


SAMPLE = (1, 2, 17, 99, 250, 251)  # 251 does not exist


def test_build_is_deterministic_and_spread(tmp_path: Path) -> None:
    a = build_store(tmp_path / "a", shards=5, templates=250, scans_per_template=2)
    b = build_store(tmp_path / "b", shards=5, templates=250, scans_per_template=2)
    assert a.rows == b.rows and a.rows["templates"] == 250 and a.rows["stores"] == 20
    assert load_layout(tmp_path / "a") == a
    for shard in ("s000", "s004"):
        dumps = [
            list(sqlite3.connect(d / f"{shard}.db").iterdump())
            for d in (tmp_path / "a", tmp_path / "b")
        ]
        assert dumps[0] == dumps[1]
    # ids say nothing about the shard: consecutive ids land on several shards
    engines = create_engines(tmp_path / "a")
    with make_sessionmaker(engines)() as session:
        homes = {q.shard_of(q.resolve_scan(session, i, tuple(engines))) for i in range(1, 11)}
    assert len(homes) > 2
    for e in engines.values():
        e.dispose()


def test_cached_resolution_is_the_scan(store: Store_) -> None:
    with store.Plain() as session:
        expected = [found(q.resolve_scan(session, i, store.shards)) for i in SAMPLE]
    assert expected[-1] is None and all(expected[:-1])
    for _ in range(2):
        with store.Cached() as session:
            assert [found(store.resolver.resolve(session, i)) for i in SAMPLE] == expected
        with store.Cached() as session:
            cached_scan = [
                found(q.resolve_scan(session, i, store.shards, region="templates")) for i in SAMPLE
            ]
            assert cached_scan == expected
        with store.Cached() as session:
            merged = [found(q.resolve_merged(session, i, region="templates")) for i in SAMPLE]
            assert merged == expected
    store.queries()
    with store.Cached() as session:
        assert [found(store.resolver.resolve(session, i)) for i in SAMPLE] == expected
        # the per-shard scan: the "not on this shard" answers are cached too
        assert [
            found(q.resolve_scan(session, i, store.shards, region="templates")) for i in SAMPLE
        ] == expected
    with store.Cached() as session:
        # every shard at once: one entry per id
        assert [found(q.resolve_merged(session, i, region="templates")) for i in SAMPLE] == expected
    assert store.queries() == {}
    assert store.resolver.stats.hinted > 0


def test_listings_and_dashboards_equal_uncached(store: Store_) -> None:
    store.cache.compress_threshold = 512  # exercise compression in "analytics"
    with store.Plain() as session:
        stores = q.store_shards(session)
    store_id, shard = sorted(stores.items())[3]

    def everything(session: Any, cached: bool) -> list[Any]:
        t, a = ("templates", "analytics") if cached else (None, None)
        listing = [
            (found(x), x.body["version"])
            for x in q.store_templates(session, store_id, shard, region=t)
        ]
        return [
            listing,
            q.scans_per_day(session, shard=shard, region=a),
            q.scans_per_day(session, store_id=store_id, shard=shard, region=a),
            q.scans_per_day(session, region=a),  # every store of every shard
            q.events_per_day(session, shard=shard, region=a),
            q.events_per_day(session, region=a),
        ]

    with store.Plain() as session:
        expected = everything(session, cached=False)
    assert expected[0] and all(expected[1:])
    assert {n for _, s, n in expected[1]} and {s for _, s, _ in expected[3]} == set(stores)
    with store.Cached() as session:
        assert everything(session, cached=True) == expected
    store.queries()
    with store.Cached() as session:
        assert everything(session, cached=True) == expected
    assert store.queries() == {}


def test_write_invalidates_only_its_shard(store: Store_) -> None:
    with store.Plain() as session:
        stores = q.store_shards(session)
    ids = range(1, 41)

    def read_all() -> tuple[list[Any], list[Any]]:
        with store.Cached() as session:
            resolved = [found(store.resolver.resolve(session, i)) for i in ids]
            listings = [
                [found(t) for t in q.store_templates(session, sid, sh, region="templates")]
                for sid, sh in sorted(stores.items())
            ]
            dashboards = [
                q.scans_per_day(session, shard=sh, region="analytics") for sh in store.shards
            ]
        return resolved + listings, dashboards

    read_all()
    store.queries()
    read_all()
    assert store.queries() == {}

    with store.Cached() as session:
        template = store.resolver.resolve(session, 7)
        assert template is not None
        shard = q.shard_of(template)
        version = q.update_template(session, template, headline="new headline")
        session.commit()
    writes = store.queries()
    assert set(writes) == {shard}

    resolved, dashboards = read_all()
    assert store.queries().keys() == {shard}  # only the written shard answered
    with store.Plain() as session:
        fresh = q.resolve_scan(session, 7, store.shards)
        assert fresh is not None and fresh.version == version
        assert (
            fresh.body["version"] == version and fresh.body["fields"][0]["text"] == "new headline"
        )
        assert found(fresh) in resolved
    store.queries()
    assert read_all() == (resolved, dashboards)
    assert store.queries() == {}


def test_bulk_update_through_the_sharded_session(store: Store_) -> None:
    """An ORM bulk UPDATE goes to the shards the ``shards`` execution
    option names, else to all, and its shards' cached reads see it."""
    from sqlalchemy import update

    with store.Cached() as session:
        template = store.resolver.resolve(session, 7)
        assert template is not None and template.status != "retired"
        shard = q.shard_of(template)
    store.queries()
    with store.Cached() as session:
        session.execute(
            update(Template).where(Template.id == 7).values(status="retired"),
            execution_options={"shards": (shard,)},
        )
        session.commit()
    assert set(store.queries()) == {shard}
    with store.Cached() as session:
        template = store.resolver.resolve(session, 7)
        assert template is not None and template.status == "retired"
    with store.Cached() as session:
        session.execute(update(Template).where(Template.id == 7).values(status="live"))
        session.commit()
    assert set(store.queries()) >= set(store.shards)  # every shard
    with store.Cached() as session:
        template = store.resolver.resolve(session, 7)
        assert template is not None and template.status == "live"


def test_invalidate_model_on_one_shard(store: Store_) -> None:
    def resolve_all() -> None:
        with store.Cached() as session:
            for i in range(1, 60):
                store.resolver.resolve(session, i)

    resolve_all()
    store.queries()
    resolve_all()
    assert store.queries() == {}
    store.cache.invalidate(Template, shard="s002")
    resolve_all()
    assert store.queries().keys() == {"s002"}
    store.cache.invalidate(Template)
    resolve_all()
    assert store.queries().keys() == set(store.shards)


def test_moved_template_and_new_template(store: Store_) -> None:
    with store.Cached() as session:
        template = store.resolver.resolve(session, 12)
        assert template is not None
        home = q.shard_of(template)
        assert store.resolver.resolve(session, 251) is None
    with store.Cached() as session:
        assert found(q.resolve_merged(session, 12, region="templates")) == found(template)
        assert q.resolve_merged(session, 251, region="templates") is None
    other = next(s for s in store.shards if s != home)

    with store.Plain() as session:
        stores = q.store_shards(session)
    target_store = next(sid for sid, sh in stores.items() if sh == other)
    row = {
        "store_id": target_store,
        "name": "moved",
        "kind": "menu",
        "status": "published",
        "version": 1,
        "body": {"version": 1},
        "updated_at": q.NOW,
    }
    # move template 12 and create template 251, with Core on the shard engines
    with store.engines[home].begin() as conn:
        conn.execute(delete(Template).where(Template.id == 12))
    with store.engines[other].begin() as conn:
        conn.execute(insert(Template), [{"id": 12, **row}, {"id": 251, **row}])

    with store.Cached() as session:
        moved = store.resolver.resolve(session, 12)
        new = store.resolver.resolve(session, 251)
    assert found(moved) == (12, 1, "moved", other)
    assert found(new) == (251, 1, "moved", other)
    with store.Cached() as session:
        assert found(q.resolve_merged(session, 12, region="templates")) == found(moved)
        assert found(q.resolve_merged(session, 251, region="templates")) == found(new)
    assert store.resolver.stats.stale_hints == 1


def test_schema_revision_agrees_or_names_the_shards(store: Store_) -> None:
    assert schema_revision(store.engines) == SCHEMA_REVISION
    assert schema_revision([store.engines["s001"]]) == SCHEMA_REVISION
    with sqlite3.connect(store.data_dir / "s003.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0001_initial'")
    with pytest.raises(
        SchemaMismatch,
        match=r"0001_initial on s003; 0002_template_locale on s000, s001, s002, s004",
    ):
        schema_revision(store.engines)
    with sqlite3.connect(store.data_dir / "s003.db") as conn:
        conn.execute("DROP TABLE alembic_version")
    with pytest.raises(SchemaMismatch, match=r"\(none\) on s003"):
        schema_revision(store.engines)


def test_all_101_shards(tmp_path: Path) -> None:
    s = Store_(tmp_path, shards=101, templates=505)
    try:
        assert s.shards == SHARD_IDS and len(s.shards) == 101
        ids = (1, 100, 333, 505, 506)
        with s.Plain() as session:
            expected = [found(q.resolve_scan(session, i, s.shards)) for i in ids]
        scanned = sum(s.queries().values())
        assert expected[-1] is None and scanned > 101  # a miss asks every shard
        for _ in range(2):
            with s.Cached() as session:
                assert [found(s.resolver.resolve(session, i)) for i in ids] == expected
        s.queries()
        with s.Cached() as session:
            assert [found(s.resolver.resolve(session, i)) for i in ids[:-1]] == expected[:-1]
        assert s.queries() == {}
    finally:
        s.close()


def test_workload_is_deterministic_and_skewed() -> None:
    load = Workload(1000, 40, seed=7)
    a = load.requests(5000, stream=1, writes=5)
    assert a == Workload(1000, 40, seed=7).requests(5000, stream=1, writes=5)
    assert a != load.requests(5000, stream=2, writes=5)
    resolves = [r.key for r in a if r.kind == RESOLVE]
    hot = set(load.hot_templates)
    assert len(hot) == 200
    assert 0.76 < sum(k in hot for k in resolves) / len(resolves) < 0.84
    writes = [n for n, r in enumerate(a) if r.kind == WRITE]
    assert len(writes) == 5
    for n in writes:  # each write is followed by a read of that template
        assert a[n + 1] == type(a[n])(RESOLVE, a[n].key)

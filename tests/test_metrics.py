"""The Prometheus collector."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from ormcache import FromCache, OrmCache
from ormcache.testing.fixtures import Base, Template, seed


def test_collector_exposes_stats(tmp_path: Any) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from ormcache.metrics import OrmCacheCollector

    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    seed(engine)
    cache = OrmCache.from_settings(
        {"namespace": "m" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}}
    )
    maker = sessionmaker(engine)
    cache.attach(maker)
    try:
        for _ in range(3):
            with maker() as s:
                s.scalars(select(Template).where(Template.id == 1).options(FromCache())).one()
        registry = CollectorRegistry()
        registry.register(OrmCacheCollector(cache))
        text = generate_latest(registry).decode()
    finally:
        cache.close()
        engine.dispose()
    assert 'ormcache_hits_by_region_total{region="default"} 2.0' in text
    assert 'ormcache_misses_by_model_total{model="Template"} 1.0' in text
    assert 'ormcache_hit_seconds_mean{region="default"}' in text

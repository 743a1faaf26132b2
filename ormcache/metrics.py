"""A Prometheus collector for :meth:`ormcache.OrmCache.stats`.

Needs ``prometheus_client`` (the ``metrics`` extra)::

    from prometheus_client import REGISTRY
    from ormcache.metrics import OrmCacheCollector

    REGISTRY.register(OrmCacheCollector(cache))

Exposed as counters, by region and by model: ``ormcache_EVENT_by_region``
and ``ormcache_EVENT_by_model`` (``_total`` appended by the exposition
format) for the events ``hits``, ``misses``, ``fills``, ``bypassed``,
``errors``, ``invalidations`` and ``bytes_written``; as gauges, per region,
``ormcache_hit_seconds_mean`` and ``ormcache_miss_seconds_mean``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

__all__ = ["OrmCacheCollector"]

_COUNTERS = {
    "hits": "lookups answered from the cache",
    "misses": "lookups answered by the database",
    "fills": "results stored",
    "bypassed": "cached statements sent to the database (read your own writes)",
    "errors": "backend failures on the read path",
    "invalidations": "version tokens moved",
    "bytes_written": "bytes of results stored in shared backends",
}


class OrmCacheCollector:
    """Collects one :class:`~ormcache.OrmCache`'s statistics at scrape time."""

    def __init__(self, cache: Any, namespace: str = "ormcache") -> None:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        self._counter = CounterMetricFamily
        self._gauge = GaugeMetricFamily
        self.cache = cache
        self.namespace = namespace

    def collect(self) -> Iterator[Any]:
        stats = self.cache.stats()
        for event, doc in _COUNTERS.items():
            for part, label in (("regions", "region"), ("models", "model")):
                family = self._counter(
                    f"{self.namespace}_{event}_by_{label}", doc, labels=[label]
                )
                for name, entry in sorted(stats[part].items()):
                    family.add_metric([name], entry.get(event, 0) or 0)
                yield family
        for event in ("hit", "miss"):
            gauge = self._gauge(
                f"{self.namespace}_{event}_seconds_mean",
                f"mean time of a {event}, per region",
                labels=["region"],
            )
            for name, entry in sorted(stats["regions"].items()):
                value = entry.get(f"{event}_time_us")
                if value is not None:
                    gauge.add_metric([name], value / 1e6)
            yield gauge

"""Counters of what the cache did, per region and per model.

``OrmCache.stats()`` returns a snapshot::

    {"regions": {"default": {"hits": 120, "misses": 7, "fills": 7,
                             "bypassed": 2, "errors": 0, "invalidations": 3,
                             "bytes_written": 18211, "hit_rate": 0.944,
                             "hit_time_us": 41.2, "miss_time_us": 380.0}},
     "models": {"Template": {...}}}

Counting costs a few dictionary updates per query; times are means over
the calls counted.
"""

from __future__ import annotations

import os
import random
import threading
import weakref
from collections import defaultdict
from typing import Any

__all__ = ["Stats"]

_EVENTS = ("hits", "misses", "fills", "bypassed", "errors", "invalidations", "bytes_written")


class Stats:
    """Thread-safe enough counters (a lost increment under a race is
    acceptable for statistics; a torn snapshot is not possible)."""

    def __init__(self) -> None:
        self._counts: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self._times: defaultdict[tuple[str, str], float] = defaultdict(float)
        self._lock = threading.Lock()

    def count(self, region: str, model: str, event: str, n: int = 1) -> None:
        self._counts[(region, model, event)] += n

    def time(self, region: str, event: str, seconds: float) -> None:
        self._times[(region, event)] += seconds

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._times.clear()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
            times = dict(self._times)
        regions: dict[str, dict[str, Any]] = {}
        models: dict[str, dict[str, Any]] = {}
        for (region, model, event), n in counts.items():
            for bucket, name in ((regions, region), (models, model)):
                entry = bucket.setdefault(name, dict.fromkeys(_EVENTS, 0))
                entry[event] += n
        for bucket in (regions, models):
            for entry in bucket.values():
                lookups = entry["hits"] + entry["misses"]
                entry["hit_rate"] = round(entry["hits"] / lookups, 4) if lookups else None
        for name, entry in regions.items():
            for event, label in (("hits", "hit_time_us"), ("misses", "miss_time_us")):
                total = times.get((name, event))
                entry[label] = (
                    round(total / entry[event] * 1e6, 1) if total and entry[event] else None
                )
        return {"regions": regions, "models": models}


def process_id() -> str:
    """This process, as the statistics it publishes are filed under (a
    forked child is a process of its own)."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


#: a process whose statistics are older than this is no longer listed
STALE_AFTER = 120.0


def index_key(namespace: str) -> str:
    return f"{namespace}:stats:index"


def process_key(namespace: str, process: str) -> str:
    return f"{namespace}:stats:p:{process}"


def publish_once(cache: Any, store: Any) -> bool:
    import time as _time

    ns = cache.settings.namespace
    now = _time.time()
    process = process_id()
    if not store.set(process_key(ns, process), {"at": now, "stats": cache.stats()}, l1=False):
        return False
    # the index is read, changed and written back: processes publishing at
    # the same moment overwrite each other's change.  Read it back, and
    # try again a little later when this process is not in it.
    for attempt in range(_INDEX_ATTEMPTS):
        if attempt:
            _time.sleep(random.uniform(0.005, 0.05))
        values = store.get_values([index_key(ns)])
        index = {}
        if values and isinstance(values[0], dict):
            if values[0].get(process) == now:
                return True
            index = {p: t for p, t in values[0].items() if now - t < STALE_AFTER}
        index[process] = now
        if not store.set(index_key(ns), index, l1=False):
            return False
    values = store.get_values([index_key(ns)])
    return bool(values and isinstance(values[0], dict) and values[0].get(process) == now)


#: how many times a process writes itself into the index, at most
_INDEX_ATTEMPTS = 5


#: (cache, store, interval) of every publishing cache, weakly by cache: a
#: forked child publishes its own (its thread is not the parent's)
_publishing: weakref.WeakKeyDictionary[Any, tuple[Any, float]] = weakref.WeakKeyDictionary()


#: per publishing cache: its thread, and the event that wakes it early
_threads: weakref.WeakKeyDictionary[Any, tuple[threading.Thread, threading.Event]] = (
    weakref.WeakKeyDictionary()
)


def publish(cache: Any, store: Any, interval: float) -> None:
    """Publish ``cache``'s statistics to ``store`` every ``interval``
    seconds; called again, the running thread publishes at once to the
    new store, then every new interval."""
    _publishing[cache] = (store, interval)
    running = _threads.get(cache)
    if running is not None and running[0].is_alive():
        running[1].set()
    else:
        _start(cache, store, interval)


def _start(cache: Any, store: Any, interval: float) -> None:
    ref = weakref.ref(cache)
    wake = threading.Event()

    def loop() -> None:
        while True:
            target = ref()
            entry = None if target is None else _publishing.get(target)
            if entry is None:
                return  # collected, or closed
            current, wait = entry
            try:
                publish_once(target, current)
            except Exception:  # (the backend's failures are logged by the store)
                pass
            del target
            wake.wait(wait)
            wake.clear()

    thread = threading.Thread(target=loop, name="ormcache-stats", daemon=True)
    _threads[cache] = (thread, wake)
    thread.start()


def stop_publishing(cache: Any) -> None:
    """The cache was closed: its thread ends at once."""
    _publishing.pop(cache, None)
    running = _threads.pop(cache, None)
    if running is not None:
        running[1].set()


def _after_fork_in_child() -> None:
    """A forked child counts and publishes for itself: from zero (the
    parent publishes what it counted before the fork), in a thread of its
    own."""
    for cache, (store, interval) in list(_publishing.items()):
        cache._stats.reset()
        cache._stats._lock = threading.Lock()
        _start(cache, store, interval)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def collect(cache: Any, store: Any) -> dict[str, Any]:
    """Statistics published by every live process, summed."""
    import time as _time

    ns = cache.settings.namespace
    values = store.get_values([index_key(ns)])
    if values is None:
        raise RuntimeError("the region's backend did not answer")
    index = values[0] if isinstance(values[0], dict) else {}
    now = _time.time()
    processes = sorted(p for p, t in index.items() if now - t < STALE_AFTER)
    total: dict[str, Any] = {"processes": processes, "regions": {}, "models": {}}
    if not processes:
        return total
    payloads = store.get_values([process_key(ns, p) for p in processes]) or []
    for payload in payloads:
        if not isinstance(payload, dict):
            continue
        for part in ("regions", "models"):
            for name, entry in payload["stats"].get(part, {}).items():
                into = total[part].setdefault(name, dict.fromkeys(_EVENTS, 0))
                for event in _EVENTS:
                    into[event] += entry.get(event, 0) or 0
    for part in ("regions", "models"):
        for entry in total[part].values():
            lookups = entry["hits"] + entry["misses"]
            entry["hit_rate"] = round(entry["hits"] / lookups, 4) if lookups else None
    return total

"""A deterministic request stream over the template store, and a runner.

:class:`Workload` draws requests the way the reference deployment sees
them: mostly template resolutions (a QR card is scanned), some store
listings (the editor opens a store) and tenant dashboards.  80% of
lookups go to 20% of the templates (the *hot* set, drawn once from the
seed), the other 80% of templates share the remaining 20%; stores are
skewed the same way.  The same seed always gives the same requests.

:class:`App` answers requests, either the reference way (``cached=False``:
scan the shards, no cache) or through ormcache (``cached=True``: a
:class:`~examples.template_store.queries.TemplateResolver` and ``FromCache``
on every read).  :func:`run` plays a list of requests against an app and
measures, per request, the latency and the statements that reached the
databases (:class:`ormcache.testing.QueryCounter` on every shard engine).
Writes publish a new version of a template; every later read of that
template is checked to return it (``fresh_ok`` of ``fresh_checks``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import ORMExecuteState, sessionmaker

from ormcache import FromCache
from ormcache.testing import QueryCounter

from .models import Template
from .queries import (
    TemplateResolver,
    events_per_day,
    resolve_scan,
    scans_per_day,
    shard_of,
    store_shards,
    store_templates,
    update_template,
)

__all__ = ["App", "PassResult", "Request", "Workload", "count_lookups", "run"]

RESOLVE, LISTING, SCANS, EVENTS, WRITE = "resolve", "listing", "scans", "events", "write"

#: share of each read kind in a stream
MIX: tuple[tuple[str, float], ...] = (
    (RESOLVE, 0.96),
    (LISTING, 0.02),
    (SCANS, 0.01),
    (EVENTS, 0.01),
)


@dataclass(frozen=True)
class Request:
    kind: str
    """``resolve`` / ``write`` (key: a template id), ``listing`` / ``scans``
    / ``events`` (key: a store id; dashboards cover the store's shard)."""
    key: int


class Workload:
    """Request streams with an 80/20 skew over ``templates`` template ids
    and ``stores`` store ids (both ``1..n``)."""

    def __init__(
        self,
        templates: int,
        stores: int,
        *,
        seed: int = 42,
        hot_fraction: float = 0.2,
        hot_share: float = 0.8,
    ) -> None:
        self.seed = seed
        self.hot_share = hot_share
        rng = random.Random(f"{seed}:hot")
        self.hot_templates, self.cold_templates = _split(rng, templates, hot_fraction)
        self.hot_stores, self.cold_stores = _split(rng, stores, hot_fraction)

    def requests(self, count: int, *, stream: int = 0, writes: int = 0) -> list[Request]:
        """``count`` reads, plus ``writes`` writes to hot templates spread
        evenly, each followed by a resolution of the template written.
        Different ``stream`` numbers give different requests with the same
        popularity."""
        rng = random.Random(f"{self.seed}:stream:{stream}")
        kinds = [k for k, _ in MIX]
        weights = [w for _, w in MIX]
        out: list[Request] = []
        every = max(1, count // writes) if writes else 0
        written = 0
        for n, kind in enumerate(rng.choices(kinds, weights, k=count)):
            if every and n % every == every // 2 and written < writes:
                tid = rng.choice(self.hot_templates)
                out += [Request(WRITE, tid), Request(RESOLVE, tid)]
                written += 1
            if kind == RESOLVE:
                out.append(Request(kind, self._pick(rng, self.hot_templates, self.cold_templates)))
            else:
                out.append(Request(kind, self._pick(rng, self.hot_stores, self.cold_stores)))
        return out

    def _pick(self, rng: random.Random, hot: Sequence[int], cold: Sequence[int]) -> int:
        if not cold or rng.random() < self.hot_share:
            return rng.choice(hot)
        return rng.choice(cold)


def _split(rng: random.Random, n: int, fraction: float) -> tuple[list[int], list[int]]:
    ids = list(range(1, n + 1))
    rng.shuffle(ids)
    cut = max(1, round(n * fraction))
    return sorted(ids[:cut]), sorted(ids[cut:])


class App:
    """The application's read and write paths over a ``ShardedSession``
    factory; ``cached`` selects the reference code or the ormcache one."""

    def __init__(
        self,
        Session: sessionmaker[Any],
        shards: Sequence[str],
        *,
        cached: bool,
        templates_region: str = "templates",
        analytics_region: str = "analytics",
        stores: Mapping[int, str] | None = None,
    ) -> None:
        self.Session = Session
        self.shards = tuple(shards)
        self.cached = cached
        self.templates_region = templates_region if cached else None
        self.analytics_region = analytics_region if cached else None
        self.resolver = TemplateResolver(self.shards, region=templates_region)
        if stores is None:
            with Session() as session:
                stores = store_shards(session)
        self.stores = dict(stores)

    def resolve(self, session: Any, template_id: int) -> Template | None:
        if self.cached:
            return self.resolver.resolve(session, template_id)
        return resolve_scan(session, template_id, self.shards)

    def read(self, request: Request) -> list[Any]:
        """Answer a read; resolutions and listings give templates."""
        with self.Session() as session:
            if request.kind == RESOLVE:
                found = self.resolve(session, request.key)
                return [found] if found is not None else []
            shard = self.stores[request.key]
            if request.kind == LISTING:
                return store_templates(session, request.key, shard, region=self.templates_region)
            if request.kind == SCANS:
                return scans_per_day(session, shard=shard, region=self.analytics_region)
            if request.kind == EVENTS:
                return events_per_day(session, shard=shard, region=self.analytics_region)
        raise ValueError(f"not a read: {request!r}")

    def write(self, template_id: int, headline: str) -> int:
        """Publish a new version of a template through the ORM; returns it."""
        with self.Session() as session:
            found = self.resolve(session, template_id)
            if found is None:
                raise LookupError(f"template {template_id} is on no shard")
            template = session.get(
                Template, template_id, identity_token=shard_of(found), populate_existing=True
            )
            assert template is not None
            version = update_template(session, template, headline=headline)
            session.commit()
        return version


@dataclass
class PassResult:
    """What :func:`run` measured."""

    reads: int = 0
    writes: int = 0
    latencies: list[float] = field(default_factory=list)
    """Seconds per read, in request order."""
    queries: list[int] = field(default_factory=list)
    """Statements each read sent to the databases."""
    positions: list[int] = field(default_factory=list)
    """Each read's index in the request list."""
    read_queries: int = 0
    """Statements the reads sent to the databases."""
    lookups: int = 0
    """Cache lookups the reads made (when :func:`run` was given a counter)."""
    write_queries: int = 0
    fresh_checks: int = 0
    fresh_ok: int = 0
    stale: list[str] = field(default_factory=list)
    """The first reads that returned an old version."""
    elapsed: float = 0.0


def count_lookups(Session: sessionmaker[Any]) -> Callable[[], int]:
    """Count the statements carrying ``FromCache`` that sessions of
    ``Session`` execute (each is one cache lookup when it names one
    shard); returns a function that reads the count."""
    count = 0

    def listener(orm_context: ORMExecuteState) -> None:
        nonlocal count
        for opt in orm_context.user_defined_options:
            if isinstance(opt, FromCache):
                count += 1
                return

    event.listen(Session, "do_orm_execute", listener)
    return lambda: count


def run(
    app: App,
    requests: Iterable[Request],
    engines: Iterable[Engine],
    *,
    lookups: Callable[[], int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> PassResult:
    """Play ``requests`` against ``app``; ``lookups`` reads a counter of
    cache lookups (see :func:`count_lookups`); ``progress(n)`` is called
    after every request."""
    result = PassResult()
    expected: dict[int, int] = {}
    clock = time.perf_counter
    with ExitStack() as stack:
        counters = [stack.enter_context(QueryCounter(e)) for e in engines]

        def statements() -> int:
            return sum(len(c.statements) for c in counters)

        started = clock()
        for n, request in enumerate(requests):
            before = statements()
            if request.kind == WRITE:
                version = app.write(request.key, f"edited at request {n}")
                expected[request.key] = version
                result.writes += 1
                result.write_queries += statements() - before
            else:
                looked_up = lookups() if lookups is not None else 0
                t0 = clock()
                rows = app.read(request)
                result.latencies.append(clock() - t0)
                if lookups is not None:
                    result.lookups += lookups() - looked_up
                result.positions.append(n)
                result.reads += 1
                sent = statements() - before
                result.queries.append(sent)
                result.read_queries += sent
                if expected and request.kind in (RESOLVE, LISTING):
                    _check(rows, expected, result, request)
            if progress is not None:
                progress(n + 1)
            if n % 1000 == 999:
                for c in counters:
                    c.reset()
        result.elapsed = clock() - started
    return result


def _check(rows: list[Any], expected: dict[int, int], result: PassResult, request: Request) -> None:
    for template in rows:
        version = expected.get(template.id)
        if version is None:
            continue
        result.fresh_checks += 1
        if template.version == version and template.body.get("version") == version:
            result.fresh_ok += 1
        elif len(result.stale) < 5:
            result.stale.append(
                f"{request.kind} {request.key}: template {template.id} at version "
                f"{template.version} (body {template.body.get('version')}), expected {version}"
            )

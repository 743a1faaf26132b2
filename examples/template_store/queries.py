"""What the application asks the template store, with and without a cache.

Resolving a template by id
==========================

The application cannot compute a template's shard from its id, so the
reference code asks the shards one after another, in shard order, until one
has it (:func:`resolve_scan`): half the shards on average, every shard for
an id that exists nowhere.  ``resolve_scan(..., region="templates")`` is the
same loop with every per-shard lookup cached, the empty ones ("not on this
shard") included; warm, it reaches no database, but it still makes one
cache lookup per shard it asks.

:func:`resolve_merged` asks the ``ShardedSession`` itself, without naming a
shard: SQLAlchemy runs the lookup on every shard and merges the results,
and ormcache keeps that merged result as one entry, which depends on the
template's row in every shard.  Warm, a resolution is one cache lookup;
a write to another template leaves it valid, and a template created,
moved or deleted on any shard invalidates it.

:class:`TemplateResolver` is the cached design the demo uses; a hit is one
cache lookup and no database:

1. a *shard hint*, an in-process map from template id to shard, names one
   shard; the template is read there with ``session.get(Template, id,
   identity_token=shard, options=[FromCache("templates")])``.  A hint is
   only a guess: that cached ``get`` is invalidated by writes to the row on
   that shard, so if the template was deleted or moved it answers ``None``
   and resolution goes on to step 2;
2. otherwise the shards are walked in scan order, reading each one's
   *directory*, ``select(Template.id)`` with ``FromCache("templates")`` on
   that shard, until one lists the id; the template is then read as in
   step 1.  Every directory read refreshes the hints of all the ids it
   lists, so after the first walk nearly every id is hinted.

A directory entry depends on its shard's ``templates`` table: a template
created, moved or deleted on a shard re-reads only that shard's directory
(one query), and a process that starts with a warm shared cache (Redis,
memcached) builds its hints without touching a database.

Ids are allocated globally (one sequence for all shards), so an id lives on
one shard and the resolver answers what the scan answers.  If your ids
could repeat across shards, skip the hints: the directory walk alone keeps
the scan's "first shard in order wins", since a row added to an earlier
shard invalidates that shard's directory.

Listings and dashboards
=======================

A store's templates (:func:`store_templates`) are one query on the store's
shard, cached in the ``templates`` region.  The dashboards count scans per
day and store (:func:`scans_per_day`) and analytics events per day, store
and kind (:func:`events_per_day`), for one shard (a tenant's stores) or for
all of them, cached in the ``analytics`` region.  Over all shards, the
merged result is one entry backed by one entry per shard: a write to one
shard invalidates the merged entry and that shard's, and the refill
queries that shard only.  Give ``analytics`` a
serializing backend (``memory_pickle``, Redis, memcached): results are
pickled there and compressed when larger than ``cache.compress_threshold``
(16 KiB by default).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.horizontal_shard import ShardedSession, set_shard_id
from sqlalchemy.orm import Session
from sqlalchemy.orm.base import instance_state

from ormcache import FromCache

from .models import AnalyticsEvent, ScanEvent, Store, Template
from .seed import EVENT_DAYS, NOW

__all__ = [
    "TemplateResolver",
    "events_per_day",
    "resolve_merged",
    "resolve_scan",
    "scans_per_day",
    "shard_of",
    "store_shards",
    "store_templates",
    "update_template",
]


def shard_of(instance: Any) -> str:
    """The shard an object was loaded from (its identity token)."""
    return str(instance_state(instance).identity_token)


def _cached(region: str | None) -> tuple[Any, ...]:
    return (FromCache(region),) if region else ()


def resolve_scan(
    session: ShardedSession,
    template_id: int,
    shards: Sequence[str],
    *,
    region: str | None = None,
) -> Template | None:
    """The reference code: ask each shard in turn until one has the
    template; one query per shard asked.

    With ``region``, every one of those lookups is cached, the empty ones
    ("not on this shard") included: once warm, a resolution reaches no
    database, but still makes one cache lookup per shard asked."""
    options = _cached(region)
    for shard in shards:
        template = session.get(Template, template_id, identity_token=shard, options=options)
        if template is not None:
            return template
    return None


def resolve_merged(
    session: ShardedSession, template_id: int, *, region: str | None = None
) -> Template | None:
    """The template with this id, asked of every shard at once (ids are
    unique across shards); with ``region``, one cache entry for the
    merged answer."""
    stmt = select(Template).where(Template.id == template_id).options(*_cached(region))
    return session.scalars(stmt).one_or_none()


@dataclass
class ResolverStats:
    """How :meth:`TemplateResolver.resolve` found templates."""

    hinted: int = 0
    """Found on the shard the hint named."""
    walked: int = 0
    """Found by walking the shard directories."""
    missing: int = 0
    """On no shard."""
    stale_hints: int = 0
    """Hints that named a shard the template was no longer on."""


class TemplateResolver:
    """Resolve template ids across shards through the cache; see the module
    docstring.  One resolver serves every session of a process::

        resolver = TemplateResolver(engines)            # shard ids, in order
        with Session() as session:
            template = resolver.resolve(session, 4711)

    The hints take one dict entry per template id seen in a directory.
    """

    def __init__(self, shards: Iterable[str], *, region: str = "templates") -> None:
        self.shards = tuple(shards)
        self.region = region
        self.stats = ResolverStats()
        self._hints: dict[int, str] = {}

    def resolve(self, session: ShardedSession, template_id: int) -> Template | None:
        """The template with this id, from the first shard (in scan order)
        that holds it, or None."""
        shard = self._hints.get(template_id)
        if shard is not None:
            template = self._get(session, template_id, shard)
            if template is not None:
                self.stats.hinted += 1
                return template
            self.stats.stale_hints += 1
            del self._hints[template_id]
        for shard in self.shards:
            if template_id in self.directory(session, shard):
                template = self._get(session, template_id, shard)
                if template is not None:
                    self.stats.walked += 1
                    return template
        self.stats.missing += 1
        return None

    def directory(self, session: ShardedSession, shard: str) -> set[int]:
        """The template ids ``shard`` holds (one cached query); they are
        remembered as hints."""
        stmt = select(Template.id).options(set_shard_id(shard), FromCache(self.region))
        ids = set(session.scalars(stmt))
        self._hints.update(dict.fromkeys(ids, shard))
        return ids

    def forget(self, template_id: int | None = None) -> None:
        """Drop the hint for one id, or all hints."""
        if template_id is None:
            self._hints.clear()
        else:
            self._hints.pop(template_id, None)

    def _get(self, session: ShardedSession, template_id: int, shard: str) -> Template | None:
        return session.get(
            Template, template_id, identity_token=shard, options=[FromCache(self.region)]
        )


def store_shards(session: ShardedSession, *, region: str | None = None) -> dict[int, str]:
    """Store id -> shard, read from every shard (stores are few and rarely
    move: an application loads this at start)."""
    stores = session.scalars(select(Store).options(*_cached(region)))
    return {store.id: shard_of(store) for store in stores}


def store_templates(
    session: ShardedSession, store_id: int, shard: str, *, region: str | None = None
) -> list[Template]:
    """A store's templates, by id (one query on the store's shard)."""
    stmt = (
        select(Template)
        .where(Template.store_id == store_id)
        .order_by(Template.id)
        .options(set_shard_id(shard), *_cached(region))
    )
    return list(session.scalars(stmt))


def _window(days: int, now: datetime) -> datetime:
    return now - timedelta(days=days)


def scans_per_day(
    session: ShardedSession,
    *,
    store_id: int | None = None,
    shard: str | None = None,
    days: int = EVENT_DAYS,
    now: datetime = NOW,
    region: str | None = None,
) -> list[tuple[str, int, int]]:
    """``(day, store id, scans)`` for the last ``days`` days, sorted: for one
    store (give its ``shard``) or for every store on every shard."""
    day = func.date(ScanEvent.scanned_at).label("day")
    stmt = (
        select(day, ScanEvent.store_id, func.count())
        .where(ScanEvent.scanned_at >= _window(days, now))
        .group_by(day, ScanEvent.store_id)
        .order_by(day, ScanEvent.store_id)
    )
    if store_id is not None:
        stmt = stmt.where(ScanEvent.store_id == store_id)
    if shard is not None:
        stmt = stmt.options(set_shard_id(shard))
    stmt = stmt.options(*_cached(region))
    return sorted((d, s, n) for d, s, n in session.execute(stmt))


def events_per_day(
    session: ShardedSession,
    *,
    shard: str | None = None,
    days: int = EVENT_DAYS,
    now: datetime = NOW,
    region: str | None = None,
) -> list[tuple[str, int, str, int, int]]:
    """``(day, store id, kind, events, cents)`` for the last ``days`` days,
    sorted, on one shard or on all of them."""
    day = func.date(AnalyticsEvent.occurred_at).label("day")
    stmt = (
        select(
            day,
            AnalyticsEvent.store_id,
            AnalyticsEvent.kind,
            func.count(),
            func.coalesce(func.sum(AnalyticsEvent.amount_cents), 0),
        )
        .where(AnalyticsEvent.occurred_at >= _window(days, now))
        .group_by(day, AnalyticsEvent.store_id, AnalyticsEvent.kind)
    )
    if shard is not None:
        stmt = stmt.options(set_shard_id(shard))
    stmt = stmt.options(*_cached(region))
    return sorted((d, s, k, n, c) for d, s, k, n, c in session.execute(stmt))


def update_template(session: Session, template: Template, *, headline: str) -> int:
    """Publish a new version of ``template``: bump ``version`` and change
    the body's first text field.  Returns the new version; the caller
    commits."""
    version = template.version + 1
    body = dict(template.body)
    fields = [dict(f) for f in body.get("fields", [])]
    if fields:
        fields[0]["text"] = headline
    body.update(version=version, fields=fields)
    template.version = version
    template.body = body
    template.updated_at = datetime.now()
    return version

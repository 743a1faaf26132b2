"""The OrmCache object: regions from settings, attached to sessions.

::

    cache = OrmCache.from_settings({
        "regions": {"default": {"backend": "memory", "expiration_time": 300}},
    })
    cache.attach(Session)
    session.scalars(select(Template).options(FromCache("default"))).all()

:meth:`OrmCache.attach` installs one ``do_orm_execute`` listener.  For a
statement that carries :class:`~ormcache.FromCache` (or a lazy load that a
:class:`~ormcache.RelationshipCache` names) it:

1. autoflushes, as the query itself would, so that pending changes are in
   the database (and have moved versions) before the cache is consulted;
2. bypasses the cache when the session's transaction wrote one of the
   statement's tables (read your own writes);
3. reads the entry and its version tokens in one backend round trip;
4. on a hit, replays the cached rows through SQLAlchemy's ORM loading;
   on a miss, runs the query and stores its rows when that is safe
   (see :mod:`ormcache.invalidation`).

A backend that fails is logged and skipped: the query is answered by the
database, and a write never fails because of the cache.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Mapping
from datetime import date, datetime, time as dt_time, timedelta
from decimal import Decimal
from typing import Any

from dogpile.cache.api import NO_VALUE
from dogpile.cache.region import CacheRegion
from sqlalchemy import event, inspect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, scoped_session, sessionmaker
from sqlalchemy.orm.attributes import QueryableAttribute
from sqlalchemy.orm.query import Query
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import TextClause

from . import _compat, _replay, invalidation
from ._loading import make_columns_plan, make_plan
from ._replay import CAPTURE, REPLAY, Capture, Replay
from ._store import Store, out_of_memory
from .exc import BackendError, CacheKeyError, ConfigurationError, UnknownRegionError
from .invalidation import UNKNOWN, VersionKeys, is_pending, new_token, pending_expired, pending_token
from .keys import (
    ShapeCache,
    database_id,
    digest,
    parameter_values,
    per_thread_database,
    query_key,
    row_format,
    table_name,
    textual_read,
)
from .options import FromCache, RelationshipCache
from .serialization import SignedSerializer
from .stats import Stats
from .settings import RegionSettings, Settings, load_settings, make_region, settings_from_config

__all__ = ["OrmCache"]

log = logging.getLogger("ormcache")

_IMMUTABLE = (
    int,
    float,
    str,
    bytes,
    bool,
    type(None),
    Decimal,
    datetime,
    date,
    dt_time,
    timedelta,
    uuid.UUID,
)

#: entry layout: (created, tokens, description, rows, encoding, bounds,
#: key): bounds, for a result merged from several shards, the (shard
#: index, row count) of each shard that returned rows, else None; key, the
#: key the entry was stored under (an entry copied to another key, by
#: anyone who can write to the backend, is never served there)
_CREATED, _TOKENS, _DESCRIPTION, _ROWS, _ENCODING, _BOUNDS, _KEY = range(7)
_ENTRY_LENGTH = 7
#: execution option of a shard's statement run to fill a merged entry: the
#: :class:`_Pieces` that collects its rows, whether from the cache or not
COLLECT = "_ormcache_collect"
_MISSING: Any = object()
#: how ``rows`` is stored: as is, pickled, or pickled and compressed (zlib,
#: or zstandard when it is installed)
_AS_IS, _PICKLED, _COMPRESSED, _ZSTD = 0, 1, 2, 3

#: results whose pickled rows are larger than this are compressed (bytes):
#: decompressing costs more than moving the bytes over a local network
#: below a few hundred KiB (measured in docs/benchmarks.md)
COMPRESS_THRESHOLD = 256 * 1024

#: seconds a key whose result was too big to store is not tried again
TOO_BIG_FOR = 60.0
#: results larger than this once compressed are not stored (bytes)
MAX_ENTRY_BYTES = 1024 * 1024 - 4096


class OrmCache:
    """Query caching for SQLAlchemy ORM sessions.

    Build one with :meth:`from_settings` (a dict or a TOML file) or
    :meth:`from_config` (dogpile's prefixed INI-style dict), then
    :meth:`attach` it to a ``Session`` class, a ``sessionmaker`` or a
    ``scoped_session``.
    """

    def __init__(
        self,
        settings: Settings,
        regions: Mapping[str, CacheRegion] | None = None,
    ) -> None:
        if not isinstance(settings, Settings):
            raise TypeError(
                f"OrmCache() takes a Settings object, not {type(settings).__name__}; "
                "build one from a dict or a TOML file with OrmCache.from_settings(...)"
            )
        self.settings = settings
        if regions is not None and not isinstance(regions, Mapping):
            raise ConfigurationError(
                f"regions= takes a mapping of region names to dogpile CacheRegions, not {regions!r}"
            )
        built = dict(regions or {})
        for name, given in built.items():
            if name not in settings.regions:
                raise UnknownRegionError(name, settings.regions)
            if not isinstance(given, CacheRegion):
                raise ConfigurationError(
                    f"regions= gives {type(given).__name__} {given!r}, not a dogpile CacheRegion",
                    region=name,
                )
            if not given.is_configured:
                raise ConfigurationError(
                    "regions= gives a dogpile CacheRegion that is not configured yet; "
                    "call its configure() first",
                    region=name,
                )
        signing_key = settings.signing_key
        if not signing_key:
            signing_key = os.environ.get("ORMCACHE_SIGNING_KEY") or None
            if signing_key is not None and len(signing_key.strip()) < 16:
                raise ConfigurationError(
                    "$ORMCACHE_SIGNING_KEY must be a secret of at least 16 characters",
                    key="ORMCACHE_SIGNING_KEY",
                )
        self._signers: dict[str, SignedSerializer] = {}
        for name, spec in settings.regions.items():
            if name not in built:
                spec = _with_defaults(spec)
                if signing_key and spec.backend not in _UNSERIALIZED:
                    signer = self._signers[name] = SignedSerializer(signing_key, name)
                    built[name] = make_region(spec, signer.dumps, signer.loads)
                else:
                    built[name] = make_region(spec)
        self._regions: dict[str, CacheRegion] = built
        for name, region in built.items():
            spec = settings.regions[name]
            if spec.backend_timeout is not None and spec.backend.startswith(
                ("dogpile.cache.redis", "ormcache.redis")
            ):
                from .backends import without_retries

                without_retries(region.backend)
        self._keys = VersionKeys(settings.namespace)
        self._stores = {
            name: Store(name, region, self._keys.region(name), new_token)
            for name, region in built.items()
        }
        from ._pubsub import channel_name

        for name, store in self._stores.items():
            spec = settings.regions[name]
            store.stale_while_revalidate = spec.stale_while_revalidate
            if spec.backend_timeout is not None and not _own_timeouts(spec):
                store.use_write_timeout(max(spec.backend_timeout, WRITE_TIMEOUT))
            if spec.reply_poll is not None:
                store.poll_for(spec.reply_poll)
            backend = store.region.backend
            speaks_redis = not store.in_process and (
                hasattr(type(backend), "writer_client") or hasattr(backend, "writer_client")
            )
            if spec.l1_max_entries and store.in_process:
                raise ConfigurationError(
                    "l1 keeps entries of a shared backend in this process; this "
                    "region's backend keeps them in this process already",
                    region=name,
                    key="l1",
                )
            if spec.l1_max_entries:
                store.use_l1(spec.l1_max_entries, spec.l1_max_bytes)
                if spec.l1_mode == "relaxed":
                    if not speaks_redis:
                        raise ConfigurationError(
                            "relaxed L1 mode takes invalidations over Redis "
                            "pub/sub: use it with a Redis region",
                            region=name,
                            key="l1",
                        )
                    store.follow(channel_name(settings.namespace, name))
            if speaks_redis:
                # every process that writes through a Redis region announces
                # its tokens, whether or not it keeps a relaxed L1 itself:
                # the readers that do depend on every writer's messages
                store.announce_on(channel_name(settings.namespace, name))
        self._shapes = ShapeCache()
        #: the dialects this process cached from, by (database id, their
        #: row format): a statement's entries to drop, one per format
        self._databases: dict[tuple[str, str], Any] = {}
        self._groups: dict[Any, _ShardGroup | None] = {}
        self._attached: list[Any] = []
        #: the listener while something is attached, one bound method:
        #: SQLAlchemy's event registry loses track of a bound method made
        #: anew for each call when targets overlap (a sessionmaker and its
        #: Session class), and detach() would leave it listening.  (None
        #: otherwise: a cache nothing listens through holds no cycle, and
        #: goes when its last reference does.)
        self._listener: Any = None
        self._attach_lock = threading.Lock()
        #: close() was called: attach() refuses (writes are no longer followed)
        self._closed = False
        #: (shard id, database id) pairs this process has read from
        self._shard_dbs: dict[tuple[Any, str], None] = {}
        self._stats = Stats()
        self._compress_threshold = COMPRESS_THRESHOLD
        self._max_entry_bytes = MAX_ENTRY_BYTES
        #: keys whose result was over max_entry_bytes: until when
        #: (time.monotonic()) they are not tried again while their version
        #: tokens are these
        self._too_big: dict[str, tuple[float, tuple[Any, ...]]] = {}
        #: part of every result key: set it to the schema revision (e.g.
        #: alembic's) so that entries cached under another schema are never
        #: served; see :meth:`use_schema_version`
        self.schema_version: str | None = None
        self._cache_all = (
            FromCache(settings.cache_all) if settings.cache_all is not None else None
        )
        # without a schema, as version keys name tables: "main.audit_log"
        # names audit_log on SQLite, and audit_log is audit_log in every
        # schema (a schema_translate_map tenant's, the search path's)
        self._uncached = frozenset(invalidation.bare_table(t.lower()) for t in settings.uncached_tables)
        invalidation.register(self)

    # -- construction ----------------------------------------------------

    @classmethod
    def from_settings(cls, source: Mapping[str, Any] | str | os.PathLike[str]) -> OrmCache:
        """Build from a settings mapping, or the path of a TOML file whose
        ``[ormcache]`` table holds them."""
        return cls(load_settings(source))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], prefix: str = "ormcache.") -> OrmCache:
        """Build from dogpile's prefixed INI-style dict, e.g.
        ``{"ormcache.default.backend": "memory"}``."""
        return cls(settings_from_config(config, prefix))

    def stats(self, reset: bool = False) -> dict[str, Any]:
        """Counts of hits, misses, fills, bypasses, backend errors and
        invalidations, bytes written and mean hit/miss times, per region and
        per model, in this process since it started (or the last reset)."""
        snapshot = self._stats.snapshot()
        if reset:
            self._stats.reset()
        return snapshot

    def publish_stats(self, interval: float = 10.0, region: str | None = None) -> OrmCache:
        """Write this process's :meth:`stats` into a shared region every
        ``interval`` seconds (a daemon thread), where ``ormcache stats``
        reads them.  ``region`` defaults to the first region whose backend
        is not in-process.  Called again, it publishes at once to the new
        region, then every new interval.  Returns ``self``."""
        from .stats import publish

        if self._closed:
            raise ConfigurationError("this OrmCache was closed: it publishes nothing any more")
        from .stats import STALE_AFTER

        most = STALE_AFTER / 2
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 < interval <= most:
            raise ConfigurationError(
                f"publish_stats() interval must be a number of seconds > 0 and at most {most:g} "
                f"(`ormcache stats` takes a process not heard from for {STALE_AFTER:g} s as gone), "
                f"not {interval!r}"
            )

        if region is not None:
            store = self._store(region)
            if not store.shared:
                raise ConfigurationError(
                    f"publish_stats(region={region!r}): its backend "
                    f"({type(store.region.backend).__name__}) is not shared: `ormcache stats` "
                    "in another process would never see what is published there"
                )
        else:
            found = next((s for s in self._stores.values() if s.shared), None)
            if found is None:
                raise ConfigurationError(
                    "no shared region to publish statistics in; declare a Redis, "
                    "memcached or dbm region, or name one with region="
                )
            store = found
        publish(self, store, interval)
        return self

    @property
    def compress_threshold(self) -> int:
        """Pickled results larger than this many bytes are compressed."""
        return self._compress_threshold

    @compress_threshold.setter
    def compress_threshold(self, value: int) -> None:
        self._compress_threshold = _byte_count("compress_threshold", value)

    @property
    def max_entry_bytes(self) -> int:
        """Results still larger than this once compressed are not stored
        (memcached refuses items of 1 MiB and more by default)."""
        return self._max_entry_bytes

    @max_entry_bytes.setter
    def max_entry_bytes(self, value: int) -> None:
        self._max_entry_bytes = _byte_count("max_entry_bytes", value)
        self._too_big.clear()

    def write_lost_invalidations(self) -> list[str]:
        """Try once, now, to write the invalidations that failed while a
        backend was down (they are otherwise retried in the background);
        returns the regions that still hold some.  For a short-lived
        process (a migration, a script) that must not exit before its
        writes are announced."""
        return [name for name, store in self._stores.items() if not store.flush_lost()]

    def use_schema_version(self, version: str | None) -> OrmCache:
        """Key every result by the database schema's version (an alembic
        revision, say): after a migration, entries cached under the old
        schema are never read.  Returns ``self``."""
        if version is not None and (not isinstance(version, str) or not version.strip()):
            raise ConfigurationError(
                f"use_schema_version() takes the schema's version as a non-empty string "
                f"(an alembic revision, say) or None, not {version!r}"
            )
        self.schema_version = version
        return self

    # -- regions ---------------------------------------------------------

    def region(self, name: str) -> CacheRegion:
        """The dogpile :class:`~dogpile.cache.region.CacheRegion` behind a
        region name."""
        try:
            return self._regions[name]
        except (KeyError, TypeError):  # (TypeError: not hashable, so not a name)
            raise UnknownRegionError(name, self._regions) from None

    @property
    def regions(self) -> Mapping[str, CacheRegion]:
        return dict(self._regions)

    def _store(self, name: str) -> Store:
        try:
            return self._stores[name]
        except (KeyError, TypeError):
            raise UnknownRegionError(name, self._stores) from None

    # -- sessions --------------------------------------------------------

    def attach(self, target: Any) -> OrmCache:
        """Cache the queries of sessions made by ``target``: a ``Session``
        subclass, a ``sessionmaker``, a ``scoped_session`` or one
        ``Session``, or their asyncio counterparts (``async_sessionmaker``,
        ``async_scoped_session``, an ``AsyncSession``).  Returns ``self``."""
        target = _sync_target(target)
        with self._attach_lock:
            if self._closed:
                raise ConfigurationError(
                    "this OrmCache was closed: it no longer follows writes, so it "
                    "cannot cache reads again; make a new OrmCache"
                )
            listener = self._listener = self._listener or self._do_orm_execute
            if not event.contains(target, "do_orm_execute", listener):
                event.listen(target, "do_orm_execute", listener)
                self._attached.append(target)
        return self

    def detach(self, target: Any) -> None:
        """Undo :meth:`attach`."""
        target = _sync_target(target, "detach")
        with self._attach_lock:
            listener = self._listener or self._do_orm_execute
            if event.contains(target, "do_orm_execute", listener):
                event.remove(target, "do_orm_execute", listener)
            self._attached = [t for t in self._attached if t is not target]
            if not self._attached:
                self._listener = None

    def close(self) -> None:
        """Detach from every session factory, stop following writes, and
        give the connections Redis regions keep for reads back to their
        pools.  The regions and their backends stay usable; :meth:`attach`
        refuses from now on (writes are no longer followed)."""
        with self._attach_lock:
            self._closed = True
        for target in list(self._attached):
            self.detach(target)
        invalidation.unregister(self)
        from .stats import stop_publishing

        stop_publishing(self)
        for store in self._stores.values():
            if store.subscriber is not None:
                store.subscriber.close()
                store.subscriber = None
            if store._mget is not None:
                store._mget.close()
            if store._token_writer is not None:
                store._token_writer.close()

    # -- the read path ---------------------------------------------------

    def _do_orm_execute(self, orm_context: ORMExecuteState) -> Any:
        option = None
        for opt in _compat.statement_options(orm_context):
            if isinstance(opt, FromCache):
                if option is None:
                    option = opt._for_execution(orm_context)
                if opt.region not in self._stores or isinstance(opt, RelationshipCache):
                    self._check_regions(opt, orm_context)
        cache_all = False
        if option is None:
            if self._cache_all is None or not orm_context.is_select:
                return None
            if orm_context.load_options._refresh_state is not None:
                return None  # Session.refresh() and expired attributes
            option = self._cache_all
            cache_all = True
        else:
            textual = textual_read(orm_context.statement)
            if not (orm_context.is_select if textual is None else textual):
                return None
        exec_options = orm_context.execution_options
        if (CAPTURE in exec_options or REPLAY in exec_options) and _answering(exec_options):
            # the execution that answers a miss or a replay of this listener
            # (attached twice: to a sessionmaker and to its Session class)
            # or of another OrmCache's: that one caches it
            return None
        store = self._stores.get(option.region)
        if store is None:
            if orm_context.is_relationship_load:
                return None  # (a lazy load, maybe in a flush: never failed by the cache)
            self._unknown_region(option.region, orm_context.session)
            return None  # another OrmCache attached to the session declares it
        session = orm_context.session
        bind_arguments = orm_context.bind_arguments
        statement = orm_context.statement
        if (
            exec_options.get("stream_results")
            or exec_options.get("yield_per")
            or getattr(statement, "_for_update_arg", None) is not None
        ):
            return None
        if "shard_id" not in bind_arguments and _is_sharded(session):
            # a statement run on several shards is one entry; else (or
            # when that is not possible) cache per shard: run again inside
            # each shard's execution
            merged = self._sharded(orm_context, option, store, cache_all)
            if merged is not None:
                return merged
            _compat.run_after_routing(orm_context, self._listener or self._do_orm_execute)
            return None

        if not isinstance(statement, TextClause) and _autoflushes(orm_context):
            # (SQLAlchemy does not autoflush before a plain text(), nor a hit)
            _compat.autoflush(session)

        cache_key = _compat.generate_cache_key(statement)
        if cache_key is None:
            return None
        bind = session.get_bind(**bind_arguments)
        dialect = bind.dialect
        db = database_id(bind)
        shape = self._shapes.shape(cache_key, statement, dialect)
        if shape.locking:
            return None
        schema_map = _schema_map(session, bind, exec_options)
        tables = shape.table_names(schema_map, dialect.default_schema_name)
        if cache_all and (
            shape.volatile
            or shape.opaque
            or not tables
            or self._reads_uncached(tables)
        ):
            return None
        shard = bind_arguments.get("shard_id", exec_options.get("identity_token"))

        fill = self._may_fill(session, (db,), () if shape.opaque else tables)
        if fill is None or (
            (session.in_transaction() or isinstance(bind, Connection)) and not self._snapshot_fresh(session, (bind,))
        ):
            self._stats.count(option.region, shape.label, "bypassed")
            return None
        keyed = self._key(orm_context, option, cache_key, shape, db, shard, schema_map)
        if keyed is None:
            return None
        key, pk = keyed
        self._databases.setdefault((db, row_format(dialect)), dialect)
        if shard is not None and "shard_id" in bind_arguments:
            self._shard_dbs.setdefault((shard, db))

        if pk is not None:
            entity = shape.table_names(schema_map, dialect.default_schema_name, "get_tables")
            others = tuple([t for t in tables if t not in entity])
            deps = self._keys.entity_deps(option.region, db, entity, others, pk)
        else:
            deps = self._keys.deps(option.region, db, tables, shape.opaque)
        return self._lookup(orm_context, store, option, shape, dialect, key, deps, db, fill)

    @staticmethod
    def _snapshot_fresh(session: Session, binds: Iterable[Any]) -> bool:
        """Whether the connections the session's transaction holds for
        ``binds`` (or the Connection it is bound to) see every commit made
        before now (or it holds none): an
        entry may be newer than a REPEATABLE READ or SERIALIZABLE
        transaction's snapshot, and the uncached query would not show it
        (see :func:`_replay.held_snapshot_is_fresh`)."""
        for bind in binds:
            conn = _compat.session_connection(session, bind)
            if conn is None and isinstance(bind, Connection):
                conn = bind  # (a session bound to a Connection, before it begins)
            if conn is not None and not _replay.held_snapshot_is_fresh(conn):
                return False
        return True

    def _reads_uncached(self, tables: tuple[str, ...]) -> bool:
        """Whether ``tables`` (as :func:`table_name` gives them) include one
        of ``uncached_tables``, in any schema."""
        uncached = self._uncached
        return bool(uncached) and any(invalidation.bare_table(t) in uncached for t in tables)

    def _check_regions(self, option: FromCache, orm_context: ORMExecuteState) -> None:
        """Say at the statement the user runs that an option names an
        undeclared region (a RelationshipCache's, also those it chains
        with ``and_()``): not at a lazy load, a refresh or the loading of
        expired attributes, which the option reaches as well (one may run
        inside a flush, a write, or in a session of another factory)."""
        if (
            not orm_context.is_select  # (DML: its load options cannot be asked for; never failed)
            or orm_context.is_relationship_load
            or orm_context.load_options._refresh_state is not None
        ):
            return
        regions = {option.region}
        if isinstance(option, RelationshipCache):
            regions.update(o.region for o in option._relationships.values())
        for region in regions:
            if region not in self._stores:
                self._unknown_region(region, orm_context.session)

    def _unknown_region(self, region: str, session: Session) -> None:
        """Raise :class:`UnknownRegionError`, unless another OrmCache that
        listens to ``session`` declares ``region`` (two caches on one
        session factory: that one caches it)."""
        listeners = list(session.dispatch.do_orm_execute)
        for cache in invalidation.caches():
            if cache is not self and region in cache._stores and cache._listener in listeners:
                return
        raise UnknownRegionError(region, self._stores)

    def _may_fill(self, session: Session, dbs: Iterable[str], tables: tuple[str, ...]) -> bool | None:
        """Read your own writes: None when the session's transaction wrote
        one of ``tables`` (or what, it cannot tell) on one of ``dbs`` (skip
        the cache), False when it wrote others there (read, do not store),
        else True."""
        if not invalidation.any_writes():
            return True
        fill = True
        for db in dbs:
            written = self._session_writes(session, db)
            if written:
                if UNKNOWN in written or not tables or not written.isdisjoint(tables):
                    return None
                fill = False
        return fill

    def _key(
        self,
        orm_context: ORMExecuteState,
        option: FromCache,
        cache_key: Any,
        shape: Any,
        db: str,
        shard: Any,
        schema_map: Mapping[Any, Any] | None,
    ) -> tuple[str, str | None] | None:
        """The entry's key and, for a primary-key lookup, the key it asks
        for; None when the statement cannot be cached (executemany, a
        parameter without a stable text form)."""
        parameters = orm_context.parameters
        if parameters is not None and not isinstance(parameters, Mapping):
            return None  # executemany: not a query
        try:
            params = (
                None
                if option.cache_key is not None
                else parameter_values(cache_key, parameters)
            )
            pk = self._entity_pk(shape, params, parameters)
            return self._result_key(option, db, shard, schema_map, shape, params, pk), pk
        except CacheKeyError as err:
            log.warning("not caching: %s", err)
            return None
        except Exception:
            # a parameter SQLAlchemy itself cannot evaluate yet (an expired
            # attribute of a detached object, ...): let it say so, or warn
            return None

    def _lookup(
        self,
        orm_context: ORMExecuteState,
        store: Store,
        option: FromCache,
        shape: Any,
        dialect: Any,
        key: str,
        deps: list[str],
        db: str,
        fill: bool,
        fanout: _Fanout | None = None,
    ) -> Any:
        """Read the entry and its tokens in one round trip: the hit's
        result, or the miss's.  None (the database answers) when the
        backend failed; a statement run on several shards is then run
        uncached here, not retried shard by shard."""
        stats = self._stats
        started = time.perf_counter()
        values = store.get_many([key, *deps])
        if values is None:
            stats.count(option.region, shape.label, "errors")
            return None if fanout is None else orm_context.invoke_statement()
        served = self._serve(orm_context, store, option, shape, dialect, values, fanout=fanout, key=key)
        if served is not None:
            stats.count(option.region, shape.label, "hits")
            stats.time(option.region, "hits", time.perf_counter() - started)
            return served
        event = "misses"
        try:
            result, cached = self._lookup_miss(
                orm_context, store, option, shape, dialect, key, deps, values, db, fill, fanout
            )
            if cached:
                event = "hits"  # another caller's fill, or a stale entry
            return result
        finally:
            stats.count(option.region, shape.label, event)
            stats.time(option.region, event, time.perf_counter() - started)

    def _sharded(
        self,
        orm_context: ORMExecuteState,
        option: FromCache,
        store: Store,
        cache_all: bool,
    ) -> Any:
        """A ``ShardedSession`` statement that its router would run on
        several shards: cached as one entry that depends on every one of
        those shards' tables, so that a hit is one backend round trip.
        None to cache per shard instead (routed to one shard, shards of
        different dialects, schema translation)."""
        shard_ids = _compat.fan_out(orm_context)
        if shard_ids is None or len(shard_ids) < 2:
            return None
        session = orm_context.session
        group = self._shard_group(session, shard_ids)
        if group is None:
            return None
        exec_options = orm_context.execution_options
        if exec_options.get("schema_translate_map") is not None:
            return None
        if session.get_transaction() is not None and (
            self._translating(session, shard_ids)
            or not self._snapshot_fresh(session, [b for sid, b in _compat.shard_binds(session).items() if sid in shard_ids])
        ):
            # a shard's connection translates, or keeps an older snapshot:
            # cache per shard
            return None
        if _autoflushes(orm_context):
            _compat.autoflush(session)
        statement = orm_context.statement
        cache_key = _compat.generate_cache_key(statement)
        if cache_key is None:
            return None
        dialect = group.dialect
        shape = self._shapes.shape(cache_key, statement, dialect)
        tables = shape.table_names(None, dialect.default_schema_name)
        if not tables or shape.opaque or shape.locking or (
            cache_all and (shape.volatile or self._reads_uncached(tables))
        ):
            return None
        fill = self._may_fill(session, group.dbs, tables)
        if fill is None:
            return None  # read your writes, shard by shard
        keyed = self._key(orm_context, option, cache_key, shape, group.db, group.shards, None)
        if keyed is None:
            return None
        key, pk = keyed
        entity = None
        if pk is not None:
            entity = shape.table_names(None, dialect.default_schema_name, "get_tables")
        deps = self._keys.group_deps(option.region, tables, entity, pk)
        # entries per shard as well, to refill a merged entry that a write
        # to one shard invalidated from the others; not for primary-key
        # lookups, whose per-shard entries would mostly say "not here"
        fanout = _Fanout(shard_ids, group, per_shard=pk is None)
        return self._lookup(
            orm_context, store, option, shape, dialect, key, deps, group.db, fill, fanout
        )

    @staticmethod
    def _translating(session: Session, shard_ids: tuple[Any, ...]) -> bool:
        """Whether the session holds a connection to one of the shards
        with a ``schema_translate_map`` of its own."""
        binds = _compat.shard_binds(session)
        for sid in shard_ids:
            conn = _compat.session_connection(session, binds.get(sid))
            if conn is not None and conn.get_execution_options().get("schema_translate_map"):
                return True
        return False

    def _shard_group(self, session: Session, shard_ids: tuple[Any, ...]) -> _ShardGroup | None:
        binds = _compat.shard_binds(session)
        try:
            engines = tuple(map(binds.__getitem__, shard_ids))
        except KeyError:
            return None
        memo_key = (shard_ids, engines)
        group = self._groups.get(memo_key, _MISSING)
        if group is _MISSING:
            group = None
            # (one dialect replays the merged rows: shards must agree on
            # what their drivers return, not only on the dialect's class)
            dialects = {(row_format(e.dialect), e.dialect.default_schema_name) for e in engines}
            if len(dialects) == 1 and not any(
                e.get_execution_options().get("schema_translate_map") for e in engines
            ):
                dbs = tuple(database_id(e) for e in engines)
                for sid, engine, db in zip(shard_ids, engines, dbs):
                    self._databases.setdefault((db, row_format(engine.dialect)), engine.dialect)
                    self._shard_dbs.setdefault((sid, db))
                merged_db = "shards:" + digest("\n".join(dbs))
                group = _ShardGroup(dbs, merged_db, engines[0].dialect, digest(repr(shard_ids)))
                if any(map(per_thread_database, engines)):
                    return group  # ids of this thread's databases: not kept
            if len(self._groups) > 1000:
                self._groups.clear()
            self._groups[memo_key] = group
        return group  # type: ignore[return-value]

    def _fetch_shards(
        self, orm_context: ORMExecuteState, fanout: _Fanout
    ) -> tuple[Any, Capture, tuple[tuple[int, int], ...]]:
        """Run the statement on each shard as horizontal_shard's router
        does, collecting every shard's rows: the merged result, a capture
        of all rows (``fresh`` when every shard's are) and the
        (shard index, row count) of the shards that returned rows."""
        statement = orm_context.statement
        pieces = _Pieces(statement)
        if fanout.per_shard:
            _compat.run_after_routing(orm_context, self._listener or self._do_orm_execute)
        bind_arguments = orm_context.bind_arguments
        results = []
        for sid in fanout.shard_ids:
            options: dict[str, Any] = {"identity_token": sid}
            capture = None
            if fanout.per_shard:
                options[COLLECT] = pieces
            else:
                capture = options[CAPTURE] = Capture()
            results.append(
                orm_context.invoke_statement(
                    bind_arguments={**bind_arguments, "shard_id": sid},
                    execution_options=options,
                )
            )
            if capture is not None:
                pieces.add(sid, capture.description, capture.rows, capture.fresh)
        merged = Capture()
        bounds = []
        rows: list[Any] = []
        fresh = True
        for i, sid in enumerate(fanout.shard_ids):
            piece = pieces.by_shard.get(sid)
            if piece is None or piece[1] is None:
                fresh = False
                break
            description, shard_rows, shard_fresh = piece
            fresh = fresh and shard_fresh
            if merged.description is None or (shard_rows and not rows):
                merged.description = description
            if shard_rows:
                bounds.append((i, len(shard_rows)))
                rows.extend(shard_rows)
        if fresh:
            merged.rows = rows
            merged.fresh = True
        result = results[0].merge(*results[1:]) if len(results) > 1 else results[0]
        return result, merged, tuple(bounds)

    def _serve_shards(
        self,
        orm_context: ORMExecuteState,
        fanout: _Fanout,
        shape: Any,
        dialect: Any,
        entry: Any,
        rows: Any,
    ) -> Any:
        """The merged result of a cached multi-shard entry: each shard's
        rows loaded with that shard's identity token."""
        try:
            bounds = entry[_BOUNDS]
            shard_ids = fanout.shard_ids
            pieces = []
            start = 0
            for i, count in bounds:
                pieces.append((shard_ids[i], rows[start : start + count]))
                start += count
        except (TypeError, IndexError, ValueError):
            return None
        plan: Any = shape.plan(dialect)
        if plan:
            built = [plan.build(orm_context, piece, sid) for sid, piece in pieces] or [
                plan.build(orm_context, ())
            ]
            if None not in built:
                return built[0].merge(*built[1:]) if len(built) > 1 else built[0]
        if not pieces:
            pieces = [(shard_ids[0], ())]
        bind_arguments = orm_context.bind_arguments
        description = entry[_DESCRIPTION]
        results = [
            orm_context.invoke_statement(
                bind_arguments={**bind_arguments, "shard_id": sid},
                execution_options={"identity_token": sid, REPLAY: Replay(description, piece)},
            )
            for sid, piece in pieces
        ]
        if plan is None and shape.mapper is not None:
            # (a plan of columns is made by a hit on one database)
            shape.set_plan(dialect, make_plan(shape.mapper, results[0]))
        return results[0].merge(*results[1:]) if len(results) > 1 else results[0]

    def _lookup_miss(
        self,
        orm_context: ORMExecuteState,
        store: Store,
        option: FromCache,
        shape: Any,
        dialect: Any,
        key: str,
        deps: list[str],
        values: list[Any],
        db: str,
        fill: bool,
        fanout: _Fanout | None = None,
    ) -> tuple[Any, bool]:
        """The miss's result, and whether it came from the cache after all
        (another caller's fill, waited for; an expired entry served while
        another caller refreshes it)."""
        if fill and self._too_big:
            too_big = self._too_big.get(key)
            if too_big is not None and too_big[0] > time.monotonic() and too_big[1] == tuple(values[1:]):
                # its result was too big to store lately, and nothing it
                # depends on moved since: no lock, no encoding
                fill = False
        if not fill:
            return self._miss(orm_context, store, key, deps, values, db, False, shape.label, fanout), False
        # one query per cold key: dogpile's lock for the key (in-process, or
        # the backend's distributed lock when the region is configured so)
        mutex = store.mutex(key)
        waited = False
        created = None
        try:
            acquired = False
            if mutex is not None and store.adds_with_lock:
                # version tokens found absent are created as the lock is
                # taken (one round trip on Redis)
                absent = {d: new_token() for d, t in zip(deps, values[1:]) if t is NO_VALUE}
                acquired, added = store.acquire_adding(mutex, absent)
                if added is not None:
                    created = {d: (absent[d], added.get(d)) for d in absent}
            elif mutex is not None:
                acquired = mutex.acquire(False)
            if mutex is not None and not acquired:
                if store.stale_while_revalidate:
                    # someone is refreshing it: an expired (not invalidated)
                    # entry is served meanwhile
                    stale = self._serve(
                        orm_context, store, option, shape, dialect, values, True, fanout, key
                    )
                    if stale is not None:
                        return stale, True
                if not _compat.in_event_loop():
                    # someone is filling this key: wait, then read what they stored
                    waited = True
                    acquired = mutex.acquire(True)
                # else in an event loop's thread (an AsyncSession, or a
                # Session called from a coroutine): the holder may be
                # another task of this thread, awaiting its query; waiting
                # would block the loop, and that task with it.  Ask the
                # database.
        except Exception as err:
            store.failed("lock", err, count=not out_of_memory(err))
            acquired = False
        if not acquired:
            return self._miss(
                orm_context, store, key, deps, values, db, True, shape.label, fanout, created=created
            ), False
        try:
            if not waited:
                return self._miss(
                    orm_context, store, key, deps, values, db, True, shape.label, fanout, mutex, created
                ), False
            again = store.get_many([key, *deps])
            if again is None:
                return self._miss(orm_context, store, key, deps, values, db, False, shape.label, fanout), False
            served = self._serve(orm_context, store, option, shape, dialect, again, fanout=fanout, key=key)
            if served is not None:
                return served, True
            return self._miss(
                orm_context, store, key, deps, again, db, True, shape.label, fanout, mutex
            ), False
        finally:
            try:
                mutex.release()
            except Exception as err:
                store.failed("lock", err)

    def _serve(
        self,
        orm_context: ORMExecuteState,
        store: Store,
        option: FromCache,
        shape: Any,
        dialect: Any,
        values: list[Any],
        allow_expired: bool = False,
        fanout: _Fanout | None = None,
        key: str | None = None,
    ) -> Any:
        """The result of a valid entry (or merely expired, with
        ``allow_expired``), or None.  ``key``: the entry's, to keep its
        rows decoded in the region's L1 when they are plain values."""
        entry = values[0]
        if entry is NO_VALUE or not self._valid(
            store, option, entry, values[1:], time.time(), allow_expired, key
        ):
            return None
        if shape.width and len(entry[_DESCRIPTION]) != shape.width:
            return None  # (not this statement's columns: never replayed into its loading)
        rows = entry[_ROWS]
        encoding = entry[_ENCODING]
        if encoding:
            try:
                if encoding == _COMPRESSED:
                    rows = zlib.decompress(rows)
                elif encoding == _ZSTD:
                    rows = _zstd_decompress(rows)
                    if rows is None:
                        return None  # written by a process with zstandard: a miss
                pickled = len(rows)
                rows = pickle.loads(rows)
            except Exception as err:  # corrupt: a miss, refilled
                log.warning("cache region %r: an entry could not be decoded: %s: %s", store.name, type(err).__name__, err)
                return None
            if key is not None and store.l1 is not None and _plain(rows):
                # later hits of this process's copy skip decoding: plain
                # values can be shared, as a memory region shares them
                decoded = (*entry[:_ROWS], tuple(rows), _AS_IS, *entry[_ENCODING + 1 :])
                store.l1.replace(key, entry, decoded, _decoded_size(pickled, rows))
        if fanout is not None:
            return self._serve_shards(orm_context, fanout, shape, dialect, entry, rows)
        if not allow_expired:
            pieces = orm_context.execution_options.get(COLLECT)
            if pieces is not None and pieces.statement is orm_context.statement:
                pieces.add(orm_context.bind_arguments.get("shard_id"), entry[_DESCRIPTION], rows, True)
        plan: Any = shape.plan(dialect)
        if plan:
            shard = None
            if "shard_id" in orm_context.bind_arguments and _is_sharded(orm_context.session):
                # routed by bind_arguments, before ShardedSession's router
                # made the shard the identity token: as the router would
                shard = orm_context.bind_arguments["shard_id"]
            built = plan.build(orm_context, rows, shard=shard)
            if built is not None:
                return built
        result = orm_context.invoke_statement(
            execution_options={REPLAY: Replay(entry[_DESCRIPTION], rows)}
        )
        if plan is None:
            if shape.mapper is not None:
                shape.set_plan(dialect, make_plan(shape.mapper, result))
            else:
                made, result = make_columns_plan(orm_context.statement, result, rows)
                shape.set_plan(dialect, made)
        return result

    def _miss(
        self,
        orm_context: ORMExecuteState,
        store: Store,
        key: str,
        deps: list[str],
        values: list[Any],
        db: str,
        fill: bool,
        label: str = "?",
        fanout: _Fanout | None = None,
        unlock: Any = None,
        created: Mapping[str, tuple[str, bool | None]] | None = None,
    ) -> Any:
        """Query the database; store the rows under the tokens read before
        the query, when that is safe.  ``unlock``: the key's lock, held (see
        :meth:`Store.set`); ``created``: what adding the absent tokens
        returned, when :meth:`Store.acquire_adding` did."""
        now = time.time()
        current: list[str] = []
        for dep, token in zip(deps, values[1:]):
            if token is NO_VALUE:
                if created is not None and dep in created:
                    token, added = created[dep]
                    if added is not True:
                        fill = False  # someone else created it meanwhile
                    current.append(token)
                    continue
                token = new_token()
                added = store.add(dep, token)
                if added is not True:
                    fill = False
                    if added is None and store.supports_add is False:
                        # no atomic add: create it, and store nothing this time
                        store.set_token(dep, token)
            elif is_pending(token):
                fill = False
                if pending_expired(token, now):
                    store.set_token(dep, new_token())
            current.append(token)

        if fanout is not None:
            result, capture, bounds = self._fetch_shards(orm_context, fanout)
            dbs: tuple[str, ...] = fanout.group.dbs
        else:
            bind = orm_context.session.get_bind(**orm_context.bind_arguments)
            capture = Capture(_schema_map(orm_context.session, bind, orm_context.execution_options))
            # (autoflush runs again inside: a no-op after ours, and an
            # execution option to skip it would reach eager loaders' statements)
            result = orm_context.invoke_statement(execution_options={CAPTURE: capture})
            bounds = None
            dbs = (db,)
            pieces = orm_context.execution_options.get(COLLECT)
            if pieces is not None and pieces.statement is orm_context.statement:
                pieces.add(
                    orm_context.bind_arguments.get("shard_id"),
                    capture.description,
                    capture.rows,
                    capture.fresh and not self._session_writes(orm_context.session, db),
                )
        if (
            fill
            and capture.rows is not None
            and capture.fresh
            and (fanout is not None or capture.statement is orm_context.statement)
            and not any(self._session_writes(orm_context.session, d) for d in dbs)
        ):
            try:
                encoding, rows_value = self._encode_rows(store, capture.rows)
            except Exception as err:  # a value that does not pickle: not stored
                log.info("not caching a result of %s: %s: %s", label, type(err).__name__, err)
                return result
            if encoding != _AS_IS and len(rows_value) > self._max_entry_bytes:
                # not stored: its next misses for a while neither wait for
                # one another on the key's lock nor encode it again
                if len(self._too_big) >= 10_000:
                    self._too_big.clear()
                self._too_big[key] = (time.monotonic() + TOO_BIG_FOR, tuple(current))
            else:
                entry = (now, tuple(current), capture.description, rows_value, encoding, bounds, key)
                if store.set(key, entry, unlock):
                    self._stats.count(store.name, label, "fills")
                    if encoding != _AS_IS:
                        self._stats.count(store.name, label, "bytes_written", len(rows_value))
        return result

    def _result_key(
        self,
        option: FromCache,
        db: str,
        shard: Any,
        schema_map: Mapping[Any, Any] | None,
        shape: Any,
        params: tuple[Any, ...] | None,
        pk: str | None = None,
    ) -> str:
        """The entry's key.  A primary-key lookup that depends on its row
        (``pk``) has its own: a statement with the same SQL that depends on
        whole tables stores its entry under other version tokens."""
        return query_key(
            self.settings.namespace,
            option.region,
            db,
            (shard, self.schema_version) if self.schema_version else shard,
            schema_map,
            shape.sql_digest,
            params,
            option.cache_key,
            "row" if pk is not None else None,
        )

    def _encode_rows(self, store: Store, rows: list[Any]) -> tuple[int, Any]:
        """Rows as stored: kept as they are in an in-process memory backend
        when every value is immutable, else pickled, and compressed above
        :data:`COMPRESS_THRESHOLD` bytes."""
        if store.in_process and _plain(rows):
            return _AS_IS, tuple(rows)
        try:
            data = pickle.dumps(rows, pickle.HIGHEST_PROTOCOL)
        except TypeError:
            # psycopg2 returns bytea as memoryview, which does not pickle:
            # the same bytes (the column's result processor takes either)
            rows = [
                tuple(bytes(v) if type(v) is memoryview else v for v in row) for row in rows
            ]
            data = pickle.dumps(rows, pickle.HIGHEST_PROTOCOL)
        if len(data) > self._compress_threshold:
            compressed = _zstd_compress(data)
            if compressed is not None:
                return _ZSTD, compressed
            return _COMPRESSED, zlib.compress(data, 1)
        return _PICKLED, data

    @staticmethod
    def _entity_pk(shape: Any, params: Any, parameters: Any) -> str | None:
        """The primary key a primary-key lookup asks for, as row keys spell
        it, or None to depend on whole tables (not such a lookup, or a key
        value of an unexpected type that a writer could spell differently)."""
        if shape.get_params is None or params is None:
            return None
        index = shape.get_index
        if index is not None:  # select(Model).where(Model.pk == value)
            value = params[index]
            if type(value) is not shape.get_types[0]:
                return None
            return invalidation.pk_text([value])
        if not isinstance(parameters, Mapping):
            return None
        values = []
        for name, kind in zip(shape.get_params, shape.get_types):
            value = parameters.get(name)
            if type(value) is not kind:
                return None
            values.append(value)
        return invalidation.pk_text(values)

    def _valid(
        self,
        store: Store,
        option: FromCache,
        entry: Any,
        tokens: list[Any],
        now: float,
        allow_expired: bool = False,
        key: str | None = None,
    ) -> bool:
        if type(entry) is not tuple or len(entry) != _ENTRY_LENGTH:
            return False  # not an entry of this version (or of ormcache)
        if key is not None and entry[_KEY] != key:
            return False  # copied from another key
        if tuple(tokens) != entry[_TOKENS]:
            return False
        created = entry[_CREATED]
        if not isinstance(created, (int, float)):
            return False
        expiration = option.expiration_time
        if expiration is None:
            expiration = store.region.expiration_time
        if (
            not allow_expired
            and expiration is not None
            and expiration >= 0
            and now - created > expiration
        ):
            return False
        if store.region.region_invalidator.is_invalidated(created):
            return False
        return True

    @staticmethod
    def _session_writes(session: Session, db: str) -> set[str] | None:
        if not invalidation.any_writes():
            return None
        written: set[str] | None = None
        for conn in _compat.session_connections(session):
            tables = invalidation.written_tables(conn, db)
            if tables:
                written = set(tables) if written is None else written | tables
        return written

    # -- invalidation ----------------------------------------------------

    def _pre_invalidate(self, db: str, tables: Iterable[str], writer: str | None = None) -> None:
        """``writer`` (a transaction) has changes to ``tables`` of ``db``
        that are not committed yet: its pending token joins those of the
        other writers of these tables (see ``invalidation.merge_token``)."""
        keys = self._keys.written(db, tables)
        token = pending_token(writer=writer)
        mapping = dict.fromkeys(keys, token)
        for store in self._stores.values():
            store.set_many(mapping, writer=writer)

    def _post_invalidate(self, db: str, tables: Iterable[str], writer: str | None = None) -> None:
        """``writer``'s changes to ``tables`` are committed (or rolled
        back): fresh tokens, where no other writer is still pending."""
        keys = self._keys.written(db, tables)
        mapping = dict.fromkeys(keys, new_token())
        for store in self._stores.values():
            if store.set_many(mapping, writer=writer):
                self._stats.count(store.name, "*", "invalidations")

    def _bump(self, keys: Iterable[str], stores: Iterable[Store] | None = None) -> None:
        """Explicit invalidation: raises BackendError when a backend failed."""
        mapping = dict.fromkeys(keys, new_token())
        failed = []
        for store in stores if stores is not None else self._stores.values():
            if store.set_many(mapping):
                self._stats.count(store.name, "*", "invalidations")
            else:
                failed.append(store)
        if failed:
            raise BackendError(failed[0].name, "record an invalidation") from failed[0].last_error

    def invalidate(self, target: Any, **kw: Any) -> None:
        """Drop cached results.

        ``target`` is one of:

        * a statement (``select()`` or legacy ``Query``) carrying
          :class:`FromCache`: drops what that statement, with its bound
          parameters, cached; pass ``params={...}`` for parameters given at
          execute time, and ``session=`` or ``bind=`` to name the database
          (by default every database this process has cached from);
        * a mapped class: every result that read its tables, in every
          database and every process; with ``shard=``, only on that shard
          of an attached ``ShardedSession`` (results merged from several
          shards included);
        * a mapped instance: results that read its tables;
        * a relationship attribute (``Store.templates``): results that read
          the related tables, including lazy loads that
          :class:`RelationshipCache` cached.
        """
        if isinstance(target, Query):
            target = _compat.query_statement(target)
        if isinstance(target, QueryableAttribute):
            if kw:
                raise TypeError(f"invalidate() of a relationship takes no arguments, got {sorted(kw)}")
            prop = target.property
            mapper = getattr(prop, "mapper", None)
            if mapper is None:
                raise ConfigurationError(
                    f"{target} is not a relationship; pass a mapped class, "
                    "an instance or a statement"
                )
            tables = _mapper_tables(mapper)
            secondary = getattr(prop, "secondary", None)
            if secondary is not None and getattr(secondary, "name", None):
                tables.add(table_name(secondary.name, getattr(secondary, "schema", None)))
            self._bump([*(self._keys.model(t) for t in tables), self._keys.models_unknown()])
            return
        if isinstance(target, Executable):
            unexpected = sorted(set(kw) - {"params", "session", "bind", "shard"})
            if unexpected:
                raise TypeError(
                    f"invalidate() of a statement takes params, session, bind and shard, not {unexpected}"
                )
            self._invalidate_statement(target, **kw)
            return
        mapper = _mapper_of(target)
        if mapper is None:
            hint = ""
            if isinstance(getattr(target, "name", None), str) and hasattr(target, "c"):
                hint = f"; for a Table, invalidate_table({target.name!r})"
            raise ConfigurationError(
                f"cannot invalidate {target!r}: pass a mapped class, an "
                f"instance, a relationship attribute or a statement{hint}"
            )
        shard = kw.pop("shard", None)
        if kw:
            raise TypeError(f"invalidate() of a model takes only shard, not {sorted(kw)}")
        tables = _mapper_tables(mapper)
        if shard is None:
            self._bump([*(self._keys.model(t) for t in tables), self._keys.models_unknown()])
            return
        keys = []
        for db in self._shard_databases(shard):
            # (db_any: results on the shard whose tables are not all known)
            keys += [self._keys.db_any(db), *(self._keys.table(db, t) for t in tables)]
            keys += [self._keys.bulk(db, t) for t in tables]
        # results merged from several shards depend on these instead
        keys += [self._keys.any_table(t) for t in tables]
        keys += [self._keys.any_bulk(t) for t in tables]
        self._bump(keys)

    def _attached_shards(self) -> dict[Any, list[Any]]:
        """The binds of each shard id of the attached ``ShardedSession``
        factories."""
        known: dict[Any, list[Any]] = {}
        for target in self._attached:
            shards = getattr(target, "kw", {}).get("shards") or getattr(
                getattr(target, "session_factory", None), "kw", {}
            ).get("shards")
            for sid, bind in (shards or {}).items():
                known.setdefault(sid, []).append(bind)
        return known

    def _shard_databases(self, shard: Any) -> list[str]:
        """The database ids of a shard of the attached ``ShardedSession``
        factories (several when factories name different databases by the
        same shard id)."""
        known = self._attached_shards()
        binds = known.get(shard)
        if binds:
            return list(dict.fromkeys(database_id(bind) for bind in binds))
        seen = [db for sid, db in list(self._shard_dbs) if sid == shard]
        if seen:
            return seen
        if known:
            names = [repr(k) for k in sorted(known, key=str)]
            listing = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            raise ConfigurationError(
                f"unknown shard {shard!r}: not a shard of the attached ShardedSession "
                f"factories; their shards: {listing}"
            )
        raise ConfigurationError(
            f"unknown shard {shard!r}: attach the ShardedSession's sessionmaker "
            "before invalidating by shard (none is attached)"
        )

    def _invalidate_statement(
        self,
        statement: Any,
        *,
        params: Mapping[str, Any] | None = None,
        session: Session | None = None,
        bind: Engine | Connection | None = None,
        shard: Any = None,
    ) -> None:
        with_options = getattr(statement, "_with_options", ())
        options = [
            opt
            for opt in with_options
            if isinstance(opt, FromCache) and not isinstance(opt, RelationshipCache)
        ]
        if not options:
            if any(isinstance(opt, RelationshipCache) for opt in with_options):
                raise ConfigurationError(
                    "this statement carries only RelationshipCache options, which cache "
                    "the lazy loads of its objects' relationships: invalidate those with "
                    "invalidate(Parent.relationship)"
                )
            raise ConfigurationError(
                "this statement carries no FromCache option: ormcache does not "
                "know which region it was cached in"
            )
        option = options[0]
        store = self._store(option.region)
        if session is not None and not isinstance(session, Session):
            hint = " (an AsyncSession's is its .sync_session)" if hasattr(session, "sync_session") else ""
            raise TypeError(f"invalidate(statement, session=...) takes a Session, not {session!r}{hint}")
        if bind is not None and not isinstance(bind, (Engine, Connection)):
            hint = " (an AsyncEngine's is its .sync_engine)" if hasattr(bind, "sync_engine") else ""
            raise TypeError(f"invalidate(statement, bind=...) takes an Engine or a Connection, not {bind!r}{hint}")
        if params is not None and not isinstance(params, Mapping):
            raise TypeError(f"invalidate(statement, params=...) takes a mapping of parameter values, not {params!r}")
        cache_key = _compat.generate_cache_key(statement)
        if cache_key is None:
            return
        if params:
            names = {bp.key for bp in cache_key.bindparams}
            unknown = sorted(str(k) for k in params if k not in names)
            if unknown:
                named = sorted(n for n in names if not n.startswith("%("))
                raise ConfigurationError(
                    f"invalidate(statement, params=...): the statement has no parameter "
                    f"{', '.join(map(repr, unknown))}; its named parameters: "
                    f"{', '.join(map(repr, named)) or 'none'}"
                )
        missing = sorted(
            {str(bp.key) for bp in cache_key.bindparams if bp.required and bp.key not in (params or {})}
        )
        if missing:
            # (the key would be that of the statement run with None)
            raise ConfigurationError(
                f"invalidate(statement): no value for the statement's parameter"
                f"{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; pass "
                f"params={{{', '.join(f'{n!r}: ...' for n in missing)}}} with the values the "
                "cached execution was given"
            )
        sharded_session = session is not None and _is_sharded(session)
        if (
            shard is not None
            and not sharded_session
            and self._attached_shards()
            and not any(sid == shard for sid, _ in list(self._shard_dbs))
        ):
            self._shard_databases(shard)  # raises: not a shard of the attached factories
        # (database, shard part of the key, dialect) of each entry to drop
        targets: list[tuple[str, Any, Any]]
        dbs: set[str] | None = None
        if sharded_session:
            # its shards (the one named by shard=), each entry per shard
            shards = _compat.shard_binds(session)  # type: ignore[arg-type]
            if shard is not None:
                if shard not in shards:
                    raise ConfigurationError(
                        f"invalidate(statement, shard={shard!r}): the session has no such "
                        f"shard; its shards: {', '.join(map(repr, shards))}"
                    )
                shards = {shard: shards[shard]}
            targets = [(database_id(e), sid, e.dialect) for sid, e in shards.items()]
            dbs = {t[0] for t in targets}
        elif session is not None or bind is not None:
            target = session.get_bind(clause=statement) if session is not None else bind
            assert target is not None
            targets = [(database_id(target), shard, target.dialect)]
            dbs = {targets[0][0]}
        else:
            targets = [(db, shard, dialect) for (db, _), dialect in list(self._databases.items())]
            if not targets:
                raise ConfigurationError(
                    "invalidate(statement): this process has cached from no database yet, "
                    "so it cannot tell which one the statement's entry belongs to; pass "
                    "session= or bind="
                )
        if dbs is not None:
            # the entries of those databases read through other drivers too
            known = list(self._databases.items())
            targets += [(db, part, d) for db, part, _ in list(targets) for (kdb, _), d in known if kdb == db]
        targets += self._shard_targets(dbs, shard)
        for db, part, dialect in dict.fromkeys(targets):
            shape = self._shapes.shape(cache_key, statement, dialect)
            values = None if option.cache_key is not None else parameter_values(cache_key, params)
            pk = self._entity_pk(shape, values, params)
            key = self._result_key(option, db, part, None, shape, values, pk)
            if not store.delete(key):
                raise BackendError(store.name, "delete an entry") from store.last_error

    def _shard_targets(self, dbs: set[str] | None, shard: Any) -> list[tuple[str, Any, Any]]:
        """The entries of a statement that a ``ShardedSession`` ran on
        several shards, as (database, shard part of the key, dialect): the
        merged entry of each group of shards this process cached from, and
        the per-shard entries it is refilled from, limited to those of
        databases ``dbs`` and of ``shard`` when given."""
        targets = []
        for (shard_ids, _), group in list(self._groups.items()):
            if group is None or (dbs is not None and dbs.isdisjoint(group.dbs)):
                continue
            if shard is not None and shard not in shard_ids:
                continue
            targets.append((group.db, group.shards, group.dialect))
            for sid, shard_db in zip(shard_ids, group.dbs):
                if (shard is None or sid == shard) and (dbs is None or shard_db in dbs):
                    targets.append((shard_db, sid, group.dialect))
        return targets

    def invalidate_table(self, name: str) -> None:
        """Drop every result that read table ``name`` (``t``, ``schema.t``:
        the schema does not count; quoted as SQL quotes names,
        ``'"My Table"'``), in every database and schema; for writers that
        know tables rather than models."""
        table = invalidation.named_table(name.strip()) if isinstance(name, str) and name.strip() else None
        if table is None:
            raise ConfigurationError(
                f"invalidate_table() takes a table name ('t', 'schema.t', or quoted as SQL "
                f"quotes it: '\"My Table\"'), not {name!r}"
            )
        self._bump([self._keys.model(table), self._keys.models_unknown()])

    def invalidate_region(self, name: str) -> None:
        """Drop everything region ``name`` holds, in every process that
        shares its backend (dogpile's ``region.invalidate()`` reaches only
        the calling process)."""
        store = self._store(name)
        self._bump([self._keys.region(name)], [store])

    def invalidate_all(self) -> None:
        """Drop everything ormcache cached, in every region.  A region whose
        backend fails does not stop the others: :class:`BackendError` is
        raised, naming the first that failed, once every region was tried."""
        failed = []
        for name, store in self._stores.items():
            try:
                self._bump([self._keys.region(name)], [store])
            except BackendError as err:
                failed.append(err)
        if failed:
            raise failed[0]


def _schema_map(session: Session, bind: Any, exec_options: Mapping[str, Any]) -> Any:
    """The ``schema_translate_map`` a statement runs under, as far as can
    be told before it runs: given at execute time, else the connection's
    own, when the session holds one (``session.connection(execution_options=
    ...)``), else the bind's; None for none."""
    schema_map = exec_options.get("schema_translate_map")
    if schema_map is None:
        conn = _compat.session_connection(session, bind)
        schema_map = (bind if conn is None else conn).get_execution_options().get("schema_translate_map")
    return schema_map or None


def _answering(options: Mapping[str, Any]) -> bool:
    """Whether an execution with these options is one an ormcache listener
    invoked to answer its miss (a capture) or to replay its entry, and
    has not run yet (a subquery eager load inherits them once they have)."""
    for name in (CAPTURE, REPLAY):
        pending = options.get(name)
        if pending is not None and not pending.used:
            return True
    return False


def _own_timeouts(spec: RegionSettings) -> bool:
    """The region's arguments set its timeouts themselves (they win over
    ``backend_timeout``, for invalidations too)."""
    arguments = spec.arguments
    if {"socket_timeout", "connection_pool"} & set(arguments):
        return True
    if "socket_timeout" in (arguments.get("connection_kwargs") or {}):
        return True
    return bool({"_poll_timeout", "receive_timeout", "send_timeout"} & set(arguments.get("behaviors") or {}))


def _byte_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(f"{name} must be a number of bytes > 0, not {value!r}")
    return value


def _sync_target(target: Any, verb: str = "attach") -> Any:
    """What ``do_orm_execute`` listeners go on for an asyncio target: the
    synchronous ``Session`` (class) that an ``AsyncSession`` runs.  An
    ``async_sessionmaker`` that names no ``sync_session_class`` is given a
    subclass of its own, so that attaching it leaves other sessions of the
    process alone, as attaching a ``sessionmaker`` does."""
    try:
        from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker
    except ImportError:  # pragma: no cover
        return target
    if isinstance(target, async_scoped_session):
        target = target.session_factory
    if isinstance(target, async_sessionmaker):
        sync_class = target.kw.get("sync_session_class")
        if sync_class is None:
            base = getattr(target.class_, "sync_session_class", None) or Session
            sync_class = type(base.__name__, (base,), {"__module__": base.__module__})
            target.configure(sync_session_class=sync_class)
        return sync_class
    if isinstance(target, AsyncSession):
        return target.sync_session
    if isinstance(target, type) and issubclass(target, AsyncSession):
        return target.sync_session_class
    if not (
        isinstance(target, (Session, sessionmaker, scoped_session))
        or (isinstance(target, type) and issubclass(target, Session))
    ):
        engine = getattr(target, "sync_engine", target)  # (an AsyncEngine, AsyncConnection)
        hint = (
            f"; {verb} the sessionmaker bound to it"
            if isinstance(engine, (Engine, Connection))
            else ""
        )
        raise TypeError(
            f"cannot {verb} {'to ' if verb == 'attach' else ''}{target!r}: pass a Session class, "
            "a sessionmaker, a scoped_session or a Session (or their asyncio counterparts)" + hint
        )
    return target


#: seconds an invalidation waits for a server taken to be up, at least (a
#: read that times out is a miss; an invalidation that times out is served
#: stale by other processes until it is written again)
WRITE_TIMEOUT = 0.25

#: backends that keep Python objects in the process: nothing to sign
_UNSERIALIZED = frozenset({"dogpile.cache.memory", "dogpile.cache.null"})

#: socket timeouts (seconds) given to Redis regions that set none, so that a
#: server that hangs costs a query little (redis-py waits forever by default)
#: dogpile lock arguments for shared backends, unless the region's arguments
#: set them: one query per cold key across processes (issue 6).  A lock
#: expires 30 s after its holder took it (a process that died holding it
#: does not stop the others for longer), and a waiter polls every 10 ms
#: (dogpile's default, 0.1 s, would make it wait that long).
REDIS_LOCK = {
    "distributed_lock": True,
    "thread_local_lock": False,
    "lock_timeout": 30,
    "lock_sleep": 0.01,
    "lock_blocking_timeout": 30,
}
MEMCACHED_LOCK = {"distributed_lock": True, "lock_timeout": 30}


def _with_defaults(spec: RegionSettings) -> RegionSettings:
    """Defaults for shared backends, unless the arguments set them: a
    distributed dogpile lock, and the backend timeouts
    (``backend_timeout``) as the driver's arguments (redis-py waits forever
    by default, libmemcached seconds)."""
    redis_family = spec.backend.startswith(("dogpile.cache.redis", "ormcache.redis"))
    if redis_family and spec.arguments.get("distributed_lock", True) is not False:
        spec = dataclasses.replace(spec, arguments={**REDIS_LOCK, **spec.arguments})
    elif spec.backend.startswith("dogpile.cache.") and spec.backend.endswith(
        ("pylibmc", "memcached", "bmemcached", "pymemcache")
    ):
        spec = dataclasses.replace(spec, arguments={**MEMCACHED_LOCK, **spec.arguments})
    if spec.backend == "dogpile.cache.pylibmc":
        # libmemcached leaves Nagle's algorithm on: a value of some 100 KB
        # or more then often waits 40 ms for the server's delayed ACK.  And
        # after one timeout it refuses every command for retry_timeout
        # seconds (2 by default, over 3 s measured): 1, the least it takes,
        # leaves the pacing to ormcache's own circuit breaker
        behaviors = {"tcp_nodelay": True, "retry_timeout": 1, **spec.arguments.get("behaviors", {})}
        spec = dataclasses.replace(spec, arguments={**spec.arguments, "behaviors": behaviors})
    timeout = spec.backend_timeout
    if timeout is None:
        return spec
    if (
        spec.backend.startswith(("dogpile.cache.redis", "ormcache.redis"))
        and "connection_pool" not in spec.arguments
        and "cluster" not in spec.backend
    ):
        defaults = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        return dataclasses.replace(spec, arguments={**defaults, **spec.arguments})
    if spec.backend.endswith("redis_cluster") and not (
        {"socket_timeout", "socket_connect_timeout"} & set(spec.arguments)
    ):
        # dogpile hands ``connection_kwargs`` to RedisCluster
        kwargs = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            **spec.arguments.get("connection_kwargs", {}),
        }
        arguments = {**spec.arguments, "connection_kwargs": kwargs}
        if spec.backend == "ormcache.redis_cluster":
            arguments.setdefault("ormcache_no_retries", True)
        return dataclasses.replace(spec, arguments=arguments)
    if spec.backend == "dogpile.cache.pylibmc":
        ms = max(1, round(timeout * 1000))
        behaviors = {
            "connect_timeout": ms,
            "_poll_timeout": ms,
            "receive_timeout": ms * 1000,
            "send_timeout": ms * 1000,
            **spec.arguments.get("behaviors", {}),
        }
        return dataclasses.replace(spec, arguments={**spec.arguments, "behaviors": behaviors})
    return spec


@dataclasses.dataclass(frozen=True)
class _ShardGroup:
    """The databases behind a list of shard ids."""

    dbs: tuple[str, ...]
    #: the database part of a merged entry's key
    db: str
    dialect: Any
    #: the shard part of a merged entry's key (the ids, in order)
    shards: str


@dataclasses.dataclass(frozen=True)
class _Fanout:
    """A statement run on several shards and cached as one entry."""

    shard_ids: tuple[Any, ...]
    group: _ShardGroup
    #: refill through per-shard entries
    per_shard: bool


class _Pieces:
    """Each shard's rows of a statement run to fill a merged entry."""

    __slots__ = ("statement", "by_shard")

    def __init__(self, statement: Any) -> None:
        self.statement = statement
        self.by_shard: dict[Any, tuple[Any, Any, bool]] = {}

    def add(self, shard: Any, description: Any, rows: Any, fresh: bool) -> None:
        if shard not in self.by_shard:
            self.by_shard[shard] = (description, rows, fresh)


_sharded_classes: dict[type, bool] = {}


def _autoflushes(orm_context: ORMExecuteState) -> bool:
    """Whether the execution autoflushes, a listener's say included."""
    return bool(
        _compat.options_from_listeners(orm_context).get("autoflush", _compat.load_options(orm_context)._autoflush)
    )


def _is_sharded(session: Session) -> bool:
    cls = type(session)
    sharded = _sharded_classes.get(cls)
    if sharded is None:
        from sqlalchemy.ext.horizontal_shard import ShardedSession

        sharded = _sharded_classes[cls] = issubclass(cls, ShardedSession)
    return sharded


_zstd: Any = None


def _zstd_module() -> Any:
    global _zstd
    if _zstd is None:
        try:
            import zstandard
        except ImportError:
            _zstd = False
        else:
            _zstd = zstandard
    return _zstd


def _zstd_compress(data: bytes) -> bytes | None:
    module = _zstd_module()
    if not module:
        return None
    return module.ZstdCompressor(level=3).compress(data)  # type: ignore[no-any-return]


def _zstd_decompress(data: bytes) -> bytes | None:
    module = _zstd_module()
    if not module:
        return None
    return module.ZstdDecompressor().decompress(data)  # type: ignore[no-any-return]


def _decoded_size(pickled: int, rows: list[Any]) -> int:
    """About the bytes ``rows`` (plain values, ``pickled`` bytes pickled)
    take as Python objects: the pickled bytes, plus an object header a
    value and a tuple a row."""
    width = len(rows[0]) if rows else 0
    return pickled + len(rows) * (56 + 8 * width + 48 * width) + 64


def _plain(rows: list[Any]) -> bool:
    for row in rows:
        for value in row:
            if not isinstance(value, _IMMUTABLE):
                return False
    return True


def _mapper_of(target: Any) -> Mapper[Any] | None:
    insp = inspect(target, raiseerr=False)
    if insp is None:
        return None
    if isinstance(insp, Mapper):
        return insp
    mapper = getattr(insp, "mapper", None)
    return mapper if isinstance(mapper, Mapper) else None


def _mapper_tables(mapper: Mapper[Any]) -> set[str]:
    tables = set()
    for t in mapper.tables:
        name = getattr(t, "name", None)
        if name:
            tables.add(table_name(name, getattr(t, "schema", None)))
    return tables


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
from sqlalchemy.orm import Mapper, ORMExecuteState, Session
from sqlalchemy.orm.attributes import QueryableAttribute
from sqlalchemy.orm.query import Query
from sqlalchemy.sql.base import Executable

from . import _compat, invalidation
from ._loading import make_plan
from ._replay import CAPTURE, REPLAY, Capture, Replay, instrument
from ._store import Store
from .exc import BackendError, CacheKeyError, ConfigurationError, UnknownRegionError
from .invalidation import UNKNOWN, VersionKeys, is_pending, new_token, pending_expired, pending_token
from .keys import ShapeCache, database_id, parameter_values, query_key, table_name
from .options import FromCache
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

#: entry layout: (created, tokens, description, rows, encoding)
_CREATED, _TOKENS, _DESCRIPTION, _ROWS, _ENCODING = range(5)
#: how ``rows`` is stored: as is, pickled, or pickled and compressed (zlib,
#: or zstandard when it is installed)
_AS_IS, _PICKLED, _COMPRESSED, _ZSTD = 0, 1, 2, 3

#: results whose pickled rows are larger than this are compressed (bytes):
#: decompressing costs more than moving the bytes over a local network
#: below a few hundred KiB (measured in docs/benchmarks.md)
COMPRESS_THRESHOLD = 256 * 1024
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
        self.settings = settings
        built = dict(regions or {})
        for name in built:
            if name not in settings.regions:
                raise UnknownRegionError(name, settings.regions)
        signing_key = settings.signing_key or os.environ.get("ORMCACHE_SIGNING_KEY") or None
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
        self._keys = VersionKeys(settings.namespace)
        self._stores = {
            name: Store(name, region, self._keys.region(name), new_token)
            for name, region in built.items()
        }
        for name, store in self._stores.items():
            spec = settings.regions[name]
            store.stale_while_revalidate = spec.stale_while_revalidate
            if spec.l1_max_entries and not store.in_process:
                store.use_l1(spec.l1_max_entries, spec.l1_max_bytes)
                if spec.l1_mode == "relaxed":
                    if not hasattr(store.region.backend, "writer_client"):
                        raise ConfigurationError(
                            "relaxed L1 mode takes invalidations over Redis "
                            "pub/sub: use it with a Redis region",
                            region=name,
                            key="l1",
                        )
                    from ._pubsub import channel_name

                    channel = channel_name(settings.namespace, name)
                    store.announce_on(channel)
                    store.follow(channel)
        self._shapes = ShapeCache()
        self._databases: dict[str, Any] = {}
        self._attached: list[Any] = []
        self._shard_dbs: dict[Any, str] = {}
        self._stats = Stats()
        #: pickled results larger than this many bytes are compressed
        self.compress_threshold = COMPRESS_THRESHOLD
        #: results still larger than this once compressed are not stored
        #: (memcached refuses items of 1 MiB and more by default)
        self.max_entry_bytes = MAX_ENTRY_BYTES
        #: part of every result key: set it to the schema revision (e.g.
        #: alembic's) so that entries cached under another schema are never
        #: served; see :meth:`use_schema_version`
        self.schema_version: str | None = None
        self._cache_all = (
            FromCache(settings.cache_all) if settings.cache_all is not None else None
        )
        self._uncached = frozenset(t.lower() for t in settings.uncached_tables)
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
        is not in-process.  Returns ``self``."""
        from .stats import publish

        name = region or next(
            (n for n, s in self._stores.items() if not s.in_process), None
        )
        if name is None:
            raise ConfigurationError(
                "no shared region to publish statistics in; declare a Redis, "
                "memcached or dbm region, or name one with region="
            )
        publish(self, self._store(name), interval)
        return self

    def use_schema_version(self, version: str | None) -> OrmCache:
        """Key every result by the database schema's version (an alembic
        revision, say): after a migration, entries cached under the old
        schema are never read.  Returns ``self``."""
        self.schema_version = version
        return self

    # -- regions ---------------------------------------------------------

    def region(self, name: str) -> CacheRegion:
        """The dogpile :class:`~dogpile.cache.region.CacheRegion` behind a
        region name."""
        try:
            return self._regions[name]
        except KeyError:
            raise UnknownRegionError(name, self._regions) from None

    @property
    def regions(self) -> Mapping[str, CacheRegion]:
        return dict(self._regions)

    def _store(self, name: str) -> Store:
        try:
            return self._stores[name]
        except KeyError:
            raise UnknownRegionError(name, self._stores) from None

    # -- sessions --------------------------------------------------------

    def attach(self, target: Any) -> OrmCache:
        """Cache the queries of sessions made by ``target``: a ``Session``
        subclass, a ``sessionmaker``, a ``scoped_session`` or one
        ``Session``.  Returns ``self``."""
        if not event.contains(target, "do_orm_execute", self._do_orm_execute):
            event.listen(target, "do_orm_execute", self._do_orm_execute)
            self._attached.append(target)
        return self

    def detach(self, target: Any) -> None:
        """Undo :meth:`attach`."""
        if event.contains(target, "do_orm_execute", self._do_orm_execute):
            event.remove(target, "do_orm_execute", self._do_orm_execute)
        self._attached = [t for t in self._attached if t is not target]

    def close(self) -> None:
        """Detach from every session factory and stop following writes.
        The regions and their backends stay usable."""
        for target in list(self._attached):
            self.detach(target)
        invalidation.unregister(self)
        for store in self._stores.values():
            if store.subscriber is not None:
                store.subscriber.close()
                store.subscriber = None

    # -- the read path ---------------------------------------------------

    def _do_orm_execute(self, orm_context: ORMExecuteState) -> Any:
        option = None
        for opt in orm_context.user_defined_options:
            if isinstance(opt, FromCache):
                option = opt._for_execution(orm_context)
                if option is not None:
                    break
        cache_all = False
        if option is None:
            if self._cache_all is None or not orm_context.is_select:
                return None
            if orm_context.load_options._refresh_state is not None:
                return None  # Session.refresh() and expired attributes
            option = self._cache_all
            cache_all = True
        elif not orm_context.is_select:
            return None
        store = self._store(option.region)
        session = orm_context.session
        bind_arguments = orm_context.bind_arguments
        if "shard_id" not in bind_arguments and _is_sharded(session):
            # cache per shard: run again inside each shard's execution
            _compat.run_after_routing(orm_context, self._do_orm_execute)
            return None

        statement = orm_context.statement
        exec_options = orm_context.execution_options
        if (
            exec_options.get("stream_results")
            or exec_options.get("yield_per")
            or getattr(statement, "_for_update_arg", None) is not None
        ):
            return None

        if orm_context.load_options._autoflush:
            _compat.autoflush(session)

        cache_key = _compat.generate_cache_key(statement)
        if cache_key is None:
            return None
        bind = session.get_bind(**bind_arguments)
        instrument(bind.engine)
        dialect = bind.dialect
        db = database_id(bind)
        shape = self._shapes.shape(cache_key, statement, dialect)
        schema_map = exec_options.get("schema_translate_map")
        if schema_map is None:
            schema_map = bind.get_execution_options().get("schema_translate_map")
        tables = shape.table_names(schema_map, dialect.default_schema_name)
        if cache_all and (
            shape.volatile or not tables or not self._uncached.isdisjoint(tables)
        ):
            return None
        shard = bind_arguments.get("shard_id", exec_options.get("identity_token"))

        fill = True
        written = self._session_writes(session, db)
        if written:
            if UNKNOWN in written or not tables or not written.isdisjoint(tables):
                self._stats.count(option.region, shape.label, "bypassed")
                return None
            fill = False

        parameters = orm_context.parameters
        if parameters is not None and not isinstance(parameters, Mapping):
            return None  # executemany: not a query
        try:
            params = (
                None
                if option.cache_key is not None
                else parameter_values(cache_key, parameters)
            )
            key = self._result_key(option, db, shard, schema_map, shape, params)
        except CacheKeyError as err:
            log.warning("not caching: %s", err)
            return None
        except Exception:
            # a parameter SQLAlchemy itself cannot evaluate yet (an expired
            # attribute of a detached object, ...): let it say so, or warn
            return None
        self._databases.setdefault(db, dialect)
        if shard is not None and "shard_id" in bind_arguments:
            self._shard_dbs.setdefault(shard, db)

        deps = None
        if shape.get_params is not None and params is not None:
            deps = self._entity_deps(option.region, db, shape, tables, schema_map, dialect, orm_context.parameters)
        if deps is None:
            deps = self._keys.deps(option.region, db, tables)
        stats = self._stats
        started = time.perf_counter()
        values = store.get_many([key, *deps])
        if values is None:
            stats.count(option.region, shape.label, "errors")
            return None
        served = self._serve(orm_context, store, option, shape, dialect, values)
        if served is not None:
            stats.count(option.region, shape.label, "hits")
            stats.time(option.region, "hits", time.perf_counter() - started)
            return served
        stats.count(option.region, shape.label, "misses")
        try:
            return self._lookup_miss(orm_context, store, option, shape, dialect, key, deps, values, db, fill)
        finally:
            stats.time(option.region, "misses", time.perf_counter() - started)

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
    ) -> Any:
        if not fill:
            return self._miss(orm_context, store, key, deps, values, db, False, shape.label)
        # one query per cold key: dogpile's lock for the key (in-process, or
        # the backend's distributed lock when the region is configured so)
        mutex = store.mutex(key)
        waited = False
        try:
            acquired = mutex is not None and mutex.acquire(False)
            if mutex is not None and not acquired:
                if store.stale_while_revalidate:
                    # someone is refreshing it: an expired (not invalidated)
                    # entry is served meanwhile
                    stale = self._serve(orm_context, store, option, shape, dialect, values, True)
                    if stale is not None:
                        return stale
                # someone is filling this key: wait, then read what they stored
                waited = True
                acquired = mutex.acquire(True)
        except Exception as err:
            store.failed("lock", err)
            acquired = False
        if not acquired:
            return self._miss(orm_context, store, key, deps, values, db, True, shape.label)
        try:
            if not waited:
                return self._miss(orm_context, store, key, deps, values, db, True, shape.label)
            again = store.get_many([key, *deps])
            if again is None:
                return self._miss(orm_context, store, key, deps, values, db, False, shape.label)
            served = self._serve(orm_context, store, option, shape, dialect, again)
            if served is not None:
                return served
            return self._miss(orm_context, store, key, deps, again, db, True, shape.label)
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
    ) -> Any:
        """The result of a valid entry (or merely expired, with
        ``allow_expired``), or None."""
        entry = values[0]
        if entry is NO_VALUE or not self._valid(
            store, option, entry, values[1:], time.time(), allow_expired
        ):
            return None
        rows = entry[_ROWS]
        encoding = entry[_ENCODING]
        if encoding:
            if encoding == _COMPRESSED:
                rows = zlib.decompress(rows)
            elif encoding == _ZSTD:
                rows = _zstd_decompress(rows)
                if rows is None:
                    return None  # written by a process with zstandard: a miss
            rows = pickle.loads(rows)
        plan: Any = shape.plans.get(id(dialect)) if shape.mapper is not None else False
        if plan:
            built = plan.build(orm_context, rows)
            if built is not None:
                return built
        result = orm_context.invoke_statement(
            execution_options={REPLAY: Replay(entry[_DESCRIPTION], rows)}
        )
        if plan is None:
            shape.plans[id(dialect)] = make_plan(shape.mapper, result) or False
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
    ) -> Any:
        """Query the database; store the rows under the tokens read before
        the query, when that is safe."""
        now = time.time()
        current: list[str] = []
        for dep, token in zip(deps, values[1:]):
            if token is NO_VALUE:
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

        capture = Capture()
        # (autoflush runs again inside: a no-op after ours, and an execution
        # option to skip it would reach eager loaders' statements)
        result = orm_context.invoke_statement(execution_options={CAPTURE: capture})
        if (
            fill
            and capture.rows is not None
            and capture.fresh
            and not self._session_writes(orm_context.session, db)
        ):
            encoding, rows_value = self._encode_rows(store, capture.rows)
            if encoding == _AS_IS or len(rows_value) <= self.max_entry_bytes:
                if store.set(key, (now, tuple(current), capture.description, rows_value, encoding)):
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
    ) -> str:
        return query_key(
            self.settings.namespace,
            option.region,
            db,
            (shard, self.schema_version) if self.schema_version else shard,
            schema_map,
            shape.sql_digest,
            params,
            option.cache_key,
        )

    def _encode_rows(self, store: Store, rows: list[Any]) -> tuple[int, Any]:
        """Rows as stored: kept as they are in an in-process memory backend
        when every value is immutable, else pickled, and compressed above
        :data:`COMPRESS_THRESHOLD` bytes."""
        if store.in_process and _plain(rows):
            return _AS_IS, tuple(rows)
        data = pickle.dumps(rows, pickle.HIGHEST_PROTOCOL)
        if len(data) > self.compress_threshold:
            compressed = _zstd_compress(data)
            if compressed is not None:
                return _ZSTD, compressed
            return _COMPRESSED, zlib.compress(data, 1)
        return _PICKLED, data

    def _entity_deps(
        self,
        region: str,
        db: str,
        shape: Any,
        tables: tuple[str, ...],
        schema_map: Mapping[Any, Any] | None,
        dialect: Any,
        parameters: Any,
    ) -> list[str] | None:
        """Row-level dependencies of a primary-key lookup, or None to depend
        on whole tables (a key value of an unexpected type could be spelled
        differently by a writer)."""
        if not isinstance(parameters, Mapping):
            return None
        values = []
        for name, kind in zip(shape.get_params, shape.get_types):
            value = parameters.get(name)
            if type(value) is not kind:
                return None
            values.append(value)
        entity = shape.table_names(schema_map, dialect.default_schema_name, "get_tables")
        others = tuple(t for t in tables if t not in entity)
        return self._keys.entity_deps(region, db, entity, others, invalidation.pk_text(values))

    def _valid(
        self,
        store: Store,
        option: FromCache,
        entry: Any,
        tokens: list[Any],
        now: float,
        allow_expired: bool = False,
    ) -> bool:
        try:
            created = entry[_CREATED]
            if tuple(tokens) != entry[_TOKENS]:
                return False
        except (TypeError, IndexError):
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

    def _pre_invalidate(self, db: str, tables: Iterable[str]) -> None:
        keys = self._keys.written(db, tables)
        token = pending_token()
        mapping = dict.fromkeys(keys, token)
        for store in self._stores.values():
            store.set_many(mapping)

    def _post_invalidate(self, db: str, tables: Iterable[str]) -> None:
        keys = self._keys.written(db, tables)
        mapping = dict.fromkeys(keys, new_token())
        for store in self._stores.values():
            if store.set_many(mapping):
                self._stats.count(store.name, "*", "invalidations")

    def _bump(self, keys: Iterable[str], stores: Iterable[Store] | None = None) -> None:
        """Explicit invalidation: raises BackendError when a backend failed."""
        mapping = dict.fromkeys(keys, new_token())
        failed = []
        for store in stores if stores is not None else self._stores.values():
            if store.set_many(mapping):
                self._stats.count(store.name, "*", "invalidations")
            else:
                failed.append(store.name)
        if failed:
            raise BackendError(failed[0], "record an invalidation")

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
            target = target.statement
        if isinstance(target, QueryableAttribute):
            prop = target.property
            mapper = getattr(prop, "mapper", None)
            if mapper is None:
                raise ConfigurationError(
                    f"{target!r} is not a relationship; pass a mapped class, "
                    "an instance or a statement"
                )
            tables = _mapper_tables(mapper)
            secondary = getattr(prop, "secondary", None)
            if secondary is not None and getattr(secondary, "name", None):
                tables.add(table_name(secondary.name, getattr(secondary, "schema", None)))
            self._bump(self._keys.model(t) for t in tables)
            return
        if isinstance(target, Executable):
            self._invalidate_statement(target, **kw)
            return
        mapper = _mapper_of(target)
        if mapper is None:
            raise ConfigurationError(
                f"cannot invalidate {target!r}: pass a mapped class, an "
                "instance, a relationship attribute or a statement"
            )
        shard = kw.pop("shard", None)
        if kw:
            raise TypeError(f"unexpected arguments for a model: {sorted(kw)}")
        tables = _mapper_tables(mapper)
        if shard is None:
            self._bump(self._keys.model(t) for t in tables)
            return
        db = self._shard_database(shard)
        keys = [self._keys.table(db, t) for t in tables]
        keys += [self._keys.bulk(db, t) for t in tables]
        self._bump(keys)

    def _shard_database(self, shard: Any) -> str:
        """The database id of a shard of an attached ``ShardedSession``."""
        known: dict[Any, Any] = {}
        for target in self._attached:
            shards = getattr(target, "kw", {}).get("shards") or getattr(
                getattr(target, "session_factory", None), "kw", {}
            ).get("shards")
            if shards:
                known.update(shards)
        bind = known.get(shard)
        if bind is not None:
            return database_id(bind)
        if shard in self._shard_dbs:
            return self._shard_dbs[shard]
        listing = ", ".join(repr(k) for k in sorted(known, key=str)) or "none"
        raise ConfigurationError(
            f"unknown shard {shard!r}: attach the ShardedSession's sessionmaker "
            f"before invalidating by shard; known shards: {listing}"
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
        options = [
            opt for opt in getattr(statement, "_with_options", ()) if isinstance(opt, FromCache)
        ]
        if not options:
            raise ConfigurationError(
                "this statement carries no FromCache option: ormcache does not "
                "know which region it was cached in"
            )
        option = options[0]
        store = self._store(option.region)
        cache_key = _compat.generate_cache_key(statement)
        if cache_key is None:
            return
        if session is not None:
            bind = session.get_bind(clause=statement)
        targets: list[tuple[str, Any]]
        if bind is not None:
            targets = [(database_id(bind), bind.dialect)]
        else:
            targets = list(self._databases.items())
        for db, dialect in targets:
            shape = self._shapes.shape(cache_key, statement, dialect)
            values = None if option.cache_key is not None else parameter_values(cache_key, params)
            key = self._result_key(option, db, shard, None, shape, values)
            if not store.delete(key):
                raise BackendError(store.name, "delete an entry")

    def invalidate_table(self, name: str) -> None:
        """Drop every result that read table ``name`` (schema-qualified as
        ``schema.table`` outside the default schema), in every database;
        for writers that know tables rather than models."""
        self._bump([self._keys.model(table_name(name, None))])

    def invalidate_region(self, name: str) -> None:
        """Drop everything region ``name`` holds, in every process that
        shares its backend (dogpile's ``region.invalidate()`` reaches only
        the calling process)."""
        store = self._store(name)
        self._bump([self._keys.region(name)], [store])

    def invalidate_all(self) -> None:
        """Drop everything ormcache cached, in every region."""
        for name, store in self._stores.items():
            self._bump([self._keys.region(name)], [store])


#: backends that keep Python objects in the process: nothing to sign
_UNSERIALIZED = frozenset({"dogpile.cache.memory", "dogpile.cache.null"})

#: socket timeouts (seconds) given to Redis regions that set none, so that a
#: server that hangs costs a query little (redis-py waits forever by default)
REDIS_TIMEOUTS = {"socket_timeout": 0.25, "socket_connect_timeout": 0.25}


def _with_defaults(spec: RegionSettings) -> RegionSettings:
    if (
        spec.backend.startswith(("dogpile.cache.redis", "ormcache.redis"))
        and "connection_pool" not in spec.arguments
        and "cluster" not in spec.backend
    ):
        arguments = {**REDIS_TIMEOUTS, **spec.arguments}
        return dataclasses.replace(spec, arguments=arguments)
    return spec


_sharded_classes: dict[type, bool] = {}


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


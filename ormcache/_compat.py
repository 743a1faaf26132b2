"""Every private SQLAlchemy and dogpile.cache call ormcache makes, in one place.

Supported: SQLAlchemy 2.0.30 to 2.1.x, dogpile.cache 1.3 to 1.5.  When either
project changes one of these, this is the only module to adapt.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.orm.context import QueryContext
from sqlalchemy.sql.cache_key import CacheKey
from sqlalchemy.sql.elements import BindParameter

__all__ = [
    "autobegins",
    "autoflush",
    "bind_value",
    "entity_result_metadata",
    "executing_flush",
    "generate_cache_key",
    "fan_out",
    "forget_region_locks",
    "in_aiosqlite_thread",
    "in_event_loop",
    "mapped_metadata",
    "on_client_created",
    "pool_ends_transactions",
    "query_statement",
    "refuse_pickled_values",
    "run_after_routing",
    "serialized_payload",
    "session_connection",
    "session_connections",
    "shard_binds",
    "statement_options",
]


def generate_cache_key(statement: Any) -> CacheKey | None:
    """The statement's structural cache key (memoized by SQLAlchemy), or
    None when the statement cannot be cached (it says so itself)."""
    return statement._generate_cache_key()  # type: ignore[no-any-return]


def in_aiosqlite_thread(driver_connection: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn(the sqlite3 connection)``, run in the thread aiosqlite keeps
    for ``driver_connection`` (its only user: pysqlite connections belong to
    their thread), from the greenlet SQLAlchemy's asyncio runs statements
    in, as SQLAlchemy's own aiosqlite adapter runs its calls; None when
    ``driver_connection`` is not aiosqlite's, or when that fails."""
    if type(driver_connection).__module__.split(".")[0] != "aiosqlite":
        return None
    execute = getattr(driver_connection, "_execute", None)
    if execute is None:
        return None
    try:
        from sqlalchemy.util.concurrency import await_
    except ImportError:  # SQLAlchemy 2.0
        from sqlalchemy.util.concurrency import await_only as await_
    try:
        return await_(execute(lambda: fn(driver_connection._conn)))
    except Exception:
        return None


def query_statement(query: Any) -> Any:
    """The statement a legacy ``Query`` runs (``Query.statement`` labels
    its columns otherwise, so its cache key is another statement's)."""
    return query._statement_20()


def autobegins(connection: Connection) -> bool:
    """Whether ``connection`` would begin a transaction for a statement
    (False while the dialect's first connect runs its own)."""
    return bool(getattr(connection, "_allow_autobegin", True))


def pool_ends_transactions(pool: Any) -> bool:
    """Whether ``pool`` rolls back or commits a connection's transaction
    when it is checked in (``reset_on_return``, rollback by default)."""
    from sqlalchemy.pool.base import reset_none

    return getattr(pool, "_reset_on_return", reset_none) is not reset_none


def serialized_payload(region: Any, value: Any) -> bytes:
    """What dogpile's ``CacheRegion.set`` hands a serializing backend for
    ``value`` (its metadata header, then the serialized value)."""
    return region._serialized_payload(value)  # type: ignore[no-any-return]


def statement_options(orm_context: Any) -> Any:
    """The options of the statement being executed: those that
    ``ORMExecuteState.user_defined_options`` filters (and, in SQLAlchemy
    2.1, those of the entities a ``with_only_columns()`` replaced), read
    without building that list for the common statement with none."""
    statement = orm_context.statement
    if getattr(statement, "_memoized_select_entities", ()):
        return orm_context.user_defined_options
    return getattr(statement, "_with_options", ())


def bind_value(bindparam: BindParameter[Any]) -> Any:
    """The value a bound parameter carries, calling a ``callable_``."""
    return bindparam.effective_value


def autoflush(session: Session) -> None:
    """Flush the way a query does before it runs (honours
    ``Session.autoflush`` and ``no_autoflush``).  This is
    ``Session._autoflush()`` without calling it: SQLAlchemy calls it once
    more when the statement runs, and code that counts its calls should see
    one."""
    if session.autoflush and not session._flushing:
        try:
            session.flush()
        except sa_exc.StatementError as err:
            err.add_detail(
                "raised as a result of Query-invoked autoflush; "
                "consider using a session.no_autoflush block if this "
                "flush is occurring prematurely"
            )
            raise


def executing_flush(session: Session) -> bool:
    """Whether ``session`` is running its flush's unit of work: the
    statements that run then are the flush's own, row by row, each
    followed by its mapper event.  ``before_flush`` and ``after_flush``
    handlers run while ``Session._flushing`` but outside that window
    (SQLAlchemy warns about session use inside it)."""
    executing = getattr(session, "_warn_on_events", None)
    if executing is None:
        return bool(session._flushing)
    return bool(executing)


def in_event_loop() -> bool:
    """Whether this code runs in an event loop's thread: inside
    SQLAlchemy's asyncio bridge (an ``AsyncSession``'s statement), or a
    plain ``Session`` called from a coroutine.  Blocking on a thread lock
    there blocks the event loop, and with it the task that may hold the
    lock, awaiting its query."""
    if asyncio._get_running_loop() is not None:
        return True
    try:
        from sqlalchemy.util.concurrency import in_greenlet
    except ImportError:  # pragma: no cover - older SQLAlchemy
        return False
    return bool(in_greenlet())


def run_after_routing(orm_context: Any, listener: Any) -> None:
    """Have ``listener`` run for the statements that the remaining
    ``do_orm_execute`` listeners (horizontal_shard's router) invoke.

    ``ShardedSession`` registers its router on each session instance, so it
    runs after class-level listeners such as ours, and the per-shard
    executions it invokes only run the listeners after it."""
    orm_context._events_todo.append(listener)


_NO_OPTIONS: Mapping[str, Any] = MappingProxyType({})

#: execution options SQLAlchemy turns into the ORM's load options
LOAD_OPTION_KEYS = frozenset({"populate_existing", "autoflush", "yield_per", "identity_token"})


_DEFAULT_LOAD_OPTIONS = QueryContext.default_load_options


def load_options(orm_context: Any) -> Any:
    """``orm_context.load_options``, also for a textual SELECT (``text()``,
    ``from_statement(text(...))``), of which SQLAlchemy's property refuses
    to tell: it cannot know the SQL is a SELECT (the same lookup)."""
    return orm_context.execution_options.get("_sa_orm_load_options", _DEFAULT_LOAD_OPTIONS)


def options_from_listeners(orm_context: Any) -> Mapping[str, Any]:
    """Execution options among :data:`LOAD_OPTION_KEYS` an earlier
    ``do_orm_execute`` listener may have set, with
    ``update_execution_options()`` or on a statement it put in place of the
    original (``orm_context.statement = stmt.execution_options(...)``), and
    those of the statement itself.  SQLAlchemy turns a listener's into load
    options only when it runs the statement after the listeners:
    ``orm_context.load_options`` does not show them yet."""
    updated = getattr(orm_context, "_update_execution_options", None) or _NO_OPTIONS
    carried = getattr(orm_context.statement, "_execution_options", None) or _NO_OPTIONS
    if LOAD_OPTION_KEYS.isdisjoint(carried):
        return updated
    # (a statement's own options are in load_options already: only those
    # that are not, a replaced statement's, count)
    options = load_options(orm_context)
    differing = {
        k: carried[k]
        for k in LOAD_OPTION_KEYS
        if k in carried and carried[k] != getattr(options, "_" + k, carried[k])
    }
    return {**differing, **updated} if differing else updated


def fan_out(orm_context: Any) -> tuple[Any, ...] | None:
    """The shard ids horizontal_shard's router will run a SELECT on, or
    None when something routes it to one shard.  Mirrors the checks of
    ``sqlalchemy.ext.horizontal_shard.execute_and_instances``.  (Imported
    here, as in ``core._is_sharded``: imported with ormcache instead, the
    benchmark's ``overhead.instructions`` rose from 927,000 to 937,000
    instructions a query.)"""
    from sqlalchemy.ext.horizontal_shard import set_shard_id

    for opt in orm_context._non_compile_orm_options:
        if isinstance(opt, set_shard_id):
            return None
    if load_options(orm_context)._identity_token is not None:
        return None
    if "_sa_shard_id" in orm_context.execution_options:
        return None
    if "shard_id" in orm_context.bind_arguments:
        return None
    return tuple(orm_context.session.execute_chooser(orm_context))


def shard_binds(session: Any) -> Mapping[Any, Any]:
    """A ``ShardedSession``'s shard id -> engine mapping."""
    return session._ShardedSession__shards  # type: ignore[no-any-return]


def refuse_pickled_values(backend: Any) -> None:
    """Have dogpile's pylibmc ``backend`` make clients that never unpickle:
    pylibmc unpickles a value stored with its pickle flag inside ``get``,
    before ormcache (and a ``signing_key``) could refuse it, so anyone who
    can write to memcached could run code in every reader.  A signed
    region writes bytes (and a lock's counters): such a value is a miss."""

    def create() -> Any:
        return no_pickle_client(backend.url, binary=backend.binary, behaviors=backend.behaviors)

    backend._create_client = create


def no_pickle_client(*args: Any, **kw: Any) -> Any:
    """A pylibmc client whose reads of a value stored with pylibmc's
    pickle flag give None (see :func:`refuse_pickled_values`)."""
    global _NoPickleClient
    if _NoPickleClient is None:
        import pylibmc

        class Client(pylibmc.Client):  # type: ignore[misc]
            def deserialize(self, value: Any, flags: int) -> Any:
                if flags & _PYLIBMC_PICKLED:
                    return None
                return super().deserialize(value, flags)

        _NoPickleClient = Client
    return _NoPickleClient(*args, **kw)


_NoPickleClient: Any = None


#: pylibmc's flag of a pickled value
_PYLIBMC_PICKLED = 1


def on_client_created(backend: Any, callback: Callable[[Any], None]) -> None:
    """Call ``callback(client)`` with each client that dogpile's memcached
    ``backend`` makes (one per thread, in its ``_create_client``)."""
    create = backend._create_client

    def created() -> Any:
        client = create()
        callback(client)
        return client

    backend._create_client = created


def forget_region_locks(region: Any) -> None:
    """In a forked child: dogpile's per-key locks of ``region`` (its
    ``_lock_registry``, in-process locks for backends without a
    distributed one) may be held by a thread of the parent, which the
    child does not have; a fresh registry."""
    registry = getattr(region, "_lock_registry", None)
    if registry is not None:
        region._lock_registry = type(registry)(region._create_mutex)


def entity_result_metadata(label: str, cls: type) -> Any:
    """The metadata of a result of one mapped entity's objects, whose
    ``unique()`` tells objects apart by identity, as SQLAlchemy's loader
    makes it (``id``: a class's own ``__eq__``/``__hash__``, or none, as a
    dataclass's, does not count).  The keyword for the unique filters is
    ``_create_unique_filters`` from SQLAlchemy 2.1, ``_unique_filters``
    before."""
    from sqlalchemy.engine.result import SimpleResultMetaData

    if _UNIQUE_FILTERS_FACTORY:
        return SimpleResultMetaData([label], extra=[(cls,)], _create_unique_filters=_by_identity)
    return SimpleResultMetaData([label], extra=[(cls,)], _unique_filters=[id])  # type: ignore[call-arg]


def _by_identity(result: Any) -> list[Any]:
    if getattr(result, "_yield_per", None):
        raise sa_exc.InvalidRequestError("Can't use the ORM yield_per feature in conjunction with unique()")
    return [id]


def _takes_unique_filters_factory() -> bool:
    import inspect

    from sqlalchemy.engine.result import SimpleResultMetaData

    return "_create_unique_filters" in inspect.signature(SimpleResultMetaData.__init__).parameters


_UNIQUE_FILTERS_FACTORY = _takes_unique_filters_factory()


def mapped_metadata() -> list[Any]:
    """The ``MetaData`` of every ORM registry of the process (SQLAlchemy's
    private ``orm.mapper._all_registries``; empty where it is missing)."""
    try:
        from sqlalchemy.orm.mapper import _all_registries
    except ImportError:  # pragma: no cover - another SQLAlchemy
        return []
    found: dict[int, Any] = {}
    for reg in _all_registries():
        metadata = getattr(reg, "metadata", None)
        if metadata is not None:
            found.setdefault(id(metadata), metadata)
    return list(found.values())


def session_connection(session: Session, bind: Any) -> Connection | None:
    """The connection the session's transaction holds for ``bind`` (an
    Engine, or the Connection the session is bound to), if it holds one,
    without starting a transaction or checking one out of the pool."""
    trans = session.get_transaction()
    if trans is None:
        return None
    entry = trans._connections.get(bind)
    return None if entry is None else entry[0]  # type: ignore[no-any-return]


def session_connections(session: Session) -> Iterator[Connection]:
    """The connections the session's current transaction holds, without
    starting a transaction or checking a connection out of the pool."""
    trans = session.get_transaction()
    if trans is None:
        return
    seen: set[int] = set()
    while trans is not None:
        for entry in trans._connections.values():
            conn = entry[0]
            if id(conn) not in seen:
                seen.add(id(conn))
                yield conn
        trans = trans.parent

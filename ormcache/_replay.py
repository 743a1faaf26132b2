"""Running a cached result through SQLAlchemy's own ORM loading.

A cached entry holds the DBAPI cursor's ``description`` and raw rows: plain
values, cheap to store and to load, never ORM objects.  On a hit the
statement is executed as usual, except that the ``do_execute`` dialect
event hands SQLAlchemy a cursor that replays those rows instead of asking
the database.  Everything the ORM does with rows (identity map, pending
changes left alone, eager loaders, inheritance, loader options) is then
exactly what it does without the cache.

On a miss the same event runs the statement, keeps the rows, and records
whether the query's snapshot began after ormcache read the version tokens
(:func:`snapshot_is_fresh`).

The payloads travel in execution options and are used once, by the first
statement that runs with them: loaders such as ``subqueryload`` copy the
parent's execution options into their own statements.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from typing import Any

from . import _compat

__all__ = ["CAPTURE", "REPLAY", "Capture", "Replay", "replay_or_capture", "snapshot_is_fresh"]

CAPTURE = "_ormcache_capture"
REPLAY = "_ormcache_replay"

_READ_COMMITTED = frozenset({"READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"})


class Capture:
    """Filled in by the statement's execution on a miss."""

    __slots__ = ("used", "description", "rows", "fresh", "schema_map", "statement")

    def __init__(self, schema_map: Any = None) -> None:
        self.used = False
        self.description: tuple[tuple[Any, ...], ...] | None = None
        self.rows: list[tuple[Any, ...]] | None = None
        self.fresh = False
        #: the ``schema_translate_map`` the entry's key was made with: rows
        #: read under another (one an ``after_begin`` listener set on the
        #: connection the statement made the session begin) are not stored
        self.schema_map = schema_map
        #: the statement that ran (``invoked_statement``): another
        #: ``do_orm_execute`` listener may have replaced the one the key was
        #: made of (with_loader_criteria for a tenant, say)
        self.statement: Any = None


class Replay:
    __slots__ = ("used", "description", "rows")

    def __init__(self, description: Sequence[Any], rows: Sequence[Any]) -> None:
        self.used = False
        self.description = description
        self.rows = rows


class ReplayCursor:
    """Just enough of a DBAPI cursor for SQLAlchemy's result fetching."""

    __slots__ = (
        "description",
        "connection",
        "_rows",
        "_pos",
        "rowcount",
        "arraysize",
        "lastrowid",
    )

    def __init__(
        self, description: Sequence[Any], rows: Sequence[Any], connection: Any = None
    ) -> None:
        self.description = description
        #: the real DBAPI connection: drivers' post_exec hooks read it
        self.connection = connection
        self._rows = rows
        self._pos = 0
        self.rowcount = len(rows)
        self.arraysize = 1
        self.lastrowid = None

    def fetchone(self) -> Any:
        if self._pos < len(self._rows):
            row = self._rows[self._pos]
            self._pos += 1
            return row
        return None

    def fetchmany(self, size: int | None = None) -> list[Any]:
        size = self.arraysize if size is None else size
        rows = self._rows[self._pos : self._pos + size]
        self._pos += len(rows)
        return list(rows)

    def fetchall(self) -> list[Any]:
        rows = self._rows[self._pos :]
        self._pos = len(self._rows)
        return list(rows)

    def close(self) -> None:
        self._rows = ()

    async def _async_soft_close(self) -> None:
        """What SQLAlchemy's asyncio layer (2.0.44+) asks of a cursor whose
        CursorResult it hands on: its rows are in memory, nothing to free."""
        return None

    def __iter__(self) -> Any:
        return iter(self.fetchall())


class FetchedCursor(ReplayCursor):
    """Rows fetched from the database on a miss, handed on to SQLAlchemy."""

    __slots__ = ()


def in_transaction(context: Any) -> bool | None:
    """Whether the DBAPI connection holds an open transaction, or None when
    the driver cannot tell."""
    return dbapi_in_transaction(context.root_connection.connection.dbapi_connection)


def dbapi_in_transaction(dbapi_conn: Any) -> bool | None:
    """Whether ``dbapi_conn`` holds an open transaction, or None when its
    driver cannot tell."""
    if dbapi_conn is None:
        return None
    state = getattr(dbapi_conn, "in_transaction", None)  # sqlite3
    if isinstance(state, bool):
        return state
    get_status = getattr(dbapi_conn, "get_transaction_status", None)  # psycopg2
    if get_status is not None:
        return bool(get_status() != 0)
    info = getattr(dbapi_conn, "info", None)  # psycopg 3
    status = getattr(info, "transaction_status", None)
    if status is not None:
        return int(status) != 0
    # PyMySQL keeps the status flags of the server's last OK reply (a
    # result set's are not kept): trusted only in autocommit mode, where a
    # transaction opens only by an explicit BEGIN, whose reply says so
    # (not while more results of a string of several statements are to
    # come: its later statements are still running)
    server_status = getattr(dbapi_conn, "server_status", None)
    if isinstance(server_status, int) and getattr(dbapi_conn, "autocommit_mode", None) is True:
        if server_status & _MYSQL_STATUS_MASK == _SERVER_STATUS_AUTOCOMMIT:
            return False
    return None


#: the MySQL protocol's server status flags: a transaction open,
#: autocommit, more results (statements) to come
_SERVER_STATUS_IN_TRANS = 0x0001
_SERVER_STATUS_AUTOCOMMIT = 0x0002
_SERVER_MORE_RESULTS_EXISTS = 0x0008
_MYSQL_STATUS_MASK = _SERVER_STATUS_IN_TRANS | _SERVER_STATUS_AUTOCOMMIT | _SERVER_MORE_RESULTS_EXISTS


#: dialects whose default isolation level (InnoDB's REPEATABLE READ) takes
#: a transaction's snapshot at its first read, and whose drivers do not say
#: whether a transaction is open
SNAPSHOT_AT_FIRST_READ = frozenset({"mysql", "mariadb"})


BEGAN = "ormcache_began"


class _Beginning:
    """A mark: a statement ran in the ``begin`` event of the transaction
    that follows."""


_BEGINNING = _Beginning()


def statement_runs(context: Any, statement: str) -> None:
    """A statement is about to run on ``context``'s connection (called for
    every statement ormcache's execute listeners see, on MySQL and
    MariaDB): its SQLAlchemy transaction has begun at the server.  Kept
    weakly (a strong reference would keep the ``Connection`` in a cycle,
    and its pooled connection from going back until the collector runs),
    on the ``Connection`` and on the pool's record of the DBAPI connection,
    which every ``Connection`` lent that DBAPI connection shares
    (``StaticPool``, ``SingletonThreadPool``).  A textual ``SET`` of the
    isolation level is remembered there too (:data:`ISOLATION_SET`)."""
    root = context.root_connection
    transaction = root.get_transaction()
    if transaction is not None:
        mark: Any = weakref.ref(transaction)
    elif _compat.autobegins(root):
        # a statement in a ``begin`` event: SQLAlchemy sets the Connection's
        # Transaction only after the event, but this statement is its first
        mark = _BEGINNING
    else:
        mark = None  # the dialect's first connect: rolled back after
    root._ormcache_began = mark
    info = _record_info(root)
    if info is not None:
        info[BEGAN] = None if mark is None else (mark, weakref.ref(root))
        if context.is_text and _SETS_ISOLATION.match(statement):
            info[ISOLATION_SET] = True


#: in the pool's record of a MySQL/MariaDB connection: SQL set an isolation
#: level on it (for as long as the DBAPI connection lives)
ISOLATION_SET = "ormcache_isolation_set"
_SETS_ISOLATION = re.compile(
    r"(?:\s+|--[^\n]*\n|\#[^\n]*\n|/\*.*?\*/)*"  # (comments first)
    r"SET\s+(?:(?:GLOBAL|SESSION|LOCAL)\s+)?TRANSACTION\b"
    r"|(?:\s+|--[^\n]*\n|\#[^\n]*\n|/\*.*?\*/)*SET\b.*\b(?:tx|transaction)_isolation\b",
    re.IGNORECASE | re.DOTALL,
)


def _record_info(root: Any) -> dict[Any, Any] | None:
    """The ``info`` of the pool's record of ``root``'s DBAPI connection,
    shared by every checkout of it; None where there is none (the
    dialect's first connect)."""
    try:
        return root.connection.info  # type: ignore[no-any-return]
    except (NotImplementedError, AttributeError):
        return None


def _first_statement(context: Any) -> bool:
    """Whether the statement about to run on ``context`` is the first of
    its SQLAlchemy transaction (MySQL, MariaDB: :func:`statement_runs`).
    Their drivers begin a transaction at the server with its first
    statement, and InnoDB takes a REPEATABLE READ snapshot at its first
    read: such a statement sees every commit made before it.  Not when
    another ``Connection``'s transaction on the same DBAPI connection is
    open (its snapshot is this one's too), and only when the pool ends each
    transaction as the connection goes back (its ``reset_on_return``,
    rollback by default): else a transaction begun under an earlier
    checkout may still be open."""
    root = context.root_connection
    transaction = root.get_transaction()
    if transaction is None:
        return False
    mark = getattr(root, "_ormcache_began", None)
    if mark is _BEGINNING or (mark is not None and mark() is transaction):
        return False
    info = _record_info(root)
    shared = None if info is None else info.get(BEGAN)
    if shared is not None:
        other_mark, owner_ref = shared
        owner = owner_ref()
        if owner is None:
            # its Connection was collected without being closed, and the
            # pool did not reset the DBAPI connection (a checkin clears
            # the entry): its transaction may still be open
            return False
        if owner is not root:
            other = owner.get_transaction() if other_mark is _BEGINNING else other_mark()
            if other is not None and other.is_active:
                return False
    return _compat.pool_ends_transactions(root.engine.pool)


def snapshot_is_fresh(context: Any) -> bool:
    """Whether a SELECT about to run on ``context`` sees every transaction
    committed before now: it starts a new transaction, or the isolation
    level gives each statement its own snapshot (READ COMMITTED)."""
    dialect = context.dialect
    if dialect.name == "sqlite":
        # pysqlite's default (legacy) transaction control begins a
        # transaction only before DML, which ormcache never fills from; but
        # an active statement (a result read only in part) or a transaction
        # that has read keeps an older snapshot.
        if _shared_cache(context.root_connection.engine):
            # connections of one shared cache share its read snapshot,
            # which SQLite reports for none but the one that took it
            return False
        fairy = context.root_connection.connection
        free = _snapshot_free()
        # aiosqlite: its connection lives in a thread of its own; asked there
        answer = _compat.in_aiosqlite_thread(fairy.driver_connection, free)
        if answer is None:
            return free(fairy.dbapi_connection)  # type: ignore[no-any-return]
        return answer is True
    if in_transaction(context) is False:
        return True
    # the connection's level: SQLAlchemy applies ``isolation_level`` set on
    # the engine or the Connection, and ignores it in a statement's options
    level = context.root_connection.get_execution_options().get("isolation_level")
    if dialect.name == "postgresql":
        # the level in force, however it was set (SET TRANSACTION, SET
        # SESSION CHARACTERISTICS, a connect event): ask the server, once
        # per transaction (it cannot change once a statement has run)
        level = _pg_isolation(context)
    elif level is None:
        level = getattr(dialect, "_on_connect_isolation_level", None) or getattr(
            dialect, "default_isolation_level", None
        )
    if dialect.name in SNAPSHOT_AT_FIRST_READ:
        info = _record_info(context.root_connection)
        if info is not None and info.get(ISOLATION_SET):
            # the level was set by SQL on this connection (SET TRANSACTION
            # ISOLATION LEVEL ...), which neither SQLAlchemy nor the server
            # reports (MariaDB's @@tx_isolation ignores a one-transaction
            # SET TRANSACTION): the first statement only, as at REPEATABLE READ
            level = None
    if isinstance(level, str) and level.upper() in _READ_COMMITTED:
        return True
    return dialect.name in SNAPSHOT_AT_FIRST_READ and _first_statement(context)


class _HeldConnection:
    """What :func:`snapshot_is_fresh` reads of an execution context, for a
    connection a session holds while nothing runs on it."""

    __slots__ = ("root_connection", "dialect")

    def __init__(self, connection: Any) -> None:
        self.root_connection = connection
        self.dialect = connection.dialect


def held_snapshot_is_fresh(connection: Any) -> bool:
    """Whether a session's ``connection`` (held in its transaction) would
    answer a SELECT run now with every commit made before now: if not (its
    transaction keeps an older snapshot, at REPEATABLE READ or
    SERIALIZABLE, or SQLite's read snapshot), an entry may be newer than
    what its queries see, and is not served there.  A connection SQLAlchemy
    no longer holds open (closed, invalidated) is left to SQLAlchemy."""
    if connection.closed or connection.invalidated:
        return False
    try:
        if snapshot_is_fresh(_HeldConnection(connection)):
            return True
        if connection.dialect.name == "sqlite" and not _shared_cache(connection.engine):
            # a transaction that has written holds the write lock: nothing
            # commits meanwhile, and what it wrote itself skips the cache
            # (read your writes)
            from ._sqlite import writing

            return writing(connection.connection.dbapi_connection)
        return False
    except Exception:  # (a driver that cannot say: the database answers)
        return False


#: per engine: does it open SQLite connections in shared-cache mode?
_shared: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _shared_cache(engine: Any) -> bool:
    """Whether ``engine``'s URL asks for SQLite's shared cache
    (``file:...?cache=shared&uri=true``).  (A ``creator`` or
    ``sqlite3.enable_shared_cache()`` is not seen; see consistency.md.)"""
    try:
        return _shared[engine]
    except KeyError:
        pass
    url = engine.url
    cache = url.query.get("cache")
    shared = (
        cache == "shared"
        or (isinstance(cache, tuple) and "shared" in cache)
        or "cache=shared" in (url.database or "")
    )
    _shared[engine] = shared
    return shared


_free: Any = None


def _snapshot_free() -> Any:
    """``_sqlite.snapshot_free``, imported on first use (it loads ctypes)."""
    global _free
    if _free is None:
        from ._sqlite import snapshot_free

        _free = snapshot_free
    return _free


def _pg_isolation(context: Any) -> str | None:
    """The isolation level of the connection's transaction, asked of the
    server the first time in each SQLAlchemy transaction and remembered on
    the ``Connection`` until it ends.  (A transaction ended behind
    SQLAlchemy's back, by a textual ``COMMIT``, is not noticed: SQLAlchemy
    does not support that either.)"""
    root = context.root_connection
    transaction = root.get_transaction()
    known = getattr(root, "_ormcache_isolation", None)
    if known is not None and transaction is not None and known[0] is transaction:
        return known[1]  # type: ignore[no-any-return]
    level = _ask_pg_isolation(root)
    if level is not None and transaction is not None:
        root._ormcache_isolation = (transaction, level)
    return level


def _ask_pg_isolation(root: Any) -> str | None:
    dbapi_conn = root.connection.dbapi_connection
    try:
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("SHOW transaction_isolation")
            row = cursor.fetchone()
        finally:
            cursor.close()
    except Exception:
        return None
    return str(row[0]) if row else None


def replay_or_capture(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
    """The ``do_execute`` step (called by ormcache's one ``do_execute``
    listener, see :mod:`ormcache.invalidation`): True when a replayed or
    captured execution took the statement's place."""
    options = context.execution_options
    replay = options.get(REPLAY)
    if replay is not None and not replay.used:
        replay.used = True
        connection = getattr(cursor, "connection", None)
        cursor.close()
        context.cursor = ReplayCursor(replay.description, replay.rows, connection)
        return True
    capture = options.get(CAPTURE)
    capturing = capture is not None and not capture.used
    if capturing:
        capture.used = True
        capture.statement = getattr(context, "invoked_statement", None)
        capture.fresh = (options.get("schema_translate_map") or None) == capture.schema_map and (
            snapshot_is_fresh(context)
        )
    if context.dialect.name in SNAPSHOT_AT_FIRST_READ:
        statement_runs(context, statement)  # (after asking whether it is the first)
    if capturing:
        context.dialect.do_execute(cursor, statement, parameters, context)
        description = cursor.description
        if description is None:
            return True
        rows = cursor.fetchall()
        if rows and type(rows[0]) is not tuple:
            # drivers' own row types (asyncpg's Record) may not pickle
            rows = [tuple(row) for row in rows]
        capture.description = tuple(tuple(col[:7]) for col in description)
        capture.rows = rows
        connection = getattr(cursor, "connection", None)
        cursor.close()
        context.cursor = FetchedCursor(capture.description, rows, connection)
        return True
    return False

"""Invalidation: version tokens per (database, table), moved by writes.

Every cached result records the version tokens of what it depends on, read
*before* its query ran; it is served only while every one of those tokens
is still current.  A write replaces tokens, so invalidating a table costs
one backend write however many entries depend on it.

Keys (``ns`` is the settings' namespace)::

    ns:v:r:REGION           one region (invalidate_region; invalidate_all
                            moves every region's)
    ns:v:g:TABLE            a table in every database (invalidate(Model))
    ns:v:d:DB:*             writes on DB whose tables are unknown
    ns:v:d:DB:+             any write on DB (results whose tables are unknown)
    ns:v:d:DB:t:TABLE       writes to TABLE on DB
    ns:v:d:DB:b:TABLE       writes to TABLE on DB that are not row by row
                            (bulk, Core and textual DML, DDL)
    ns:v:d:DB:r:TABLE:PK    an ORM flush writing the row PK of TABLE

TABLE is the table's name without its schema (``public.plan`` and
``plan`` are one table for version keys: which schema an unqualified name
resolves to depends on each connection's search path, so same-named
tables of other schemas invalidate each other's results, which costs
misses only), and DB leaves out a PostgreSQL URL's ``search_path``.  On
MySQL, MariaDB and SQL Server, DB is the server: a statement on one of
its databases reaches the others' tables (``reports.t``, a multi-table
UPDATE, a procedure, a subquery in text) in ways that cannot all be told
apart, so the databases of a server invalidate each other's results of
same-named tables, and of unknown writes.

Query results depend on the ``t`` keys of their tables.  Entity results
(``Session.get`` and many-to-one lazy loads by primary key) depend instead
on the ``b`` and ``r`` keys of their row: writes to other rows of the table
leave them valid.

The protocol, for a writer W and a reader R:

1. When W's statement changing TABLE has run (inside its transaction), W
   replaces TABLE's token with a *pending* token (``p…:deadline``).  From
   then on no entry made before is valid, and no reader stores a result
   under a pending token.
2. After W's transaction commits or rolls back, W replaces the pending
   token with a fresh one.  A process that dies in between leaves the
   pending token, which stops being honoured at its deadline; readers then
   replace it, and nothing made before it was written is ever valid again.
   Pending tokens name their writer, and a key lists every writer pending
   on it: a fresh token takes the key only when no other writer is left
   (:func:`merge_token`).
3. R reads the tokens in the same backend round trip as the entry.  On a
   miss it queries, and stores the rows under the tokens it read before
   the query, only if none was pending or missing, the query's snapshot
   began after the read (see ``_replay.snapshot_is_fresh``), and its own
   transaction wrote nothing.

Tokens are random (64 bits), never counters: after a backend restart,
FLUSHALL or eviction a missing token validates nothing, and a new one never
repeats an old one.  A missing token is created with an atomic ``add``
where the backend offers one (memory, Redis, memcached); elsewhere the
reader creates it and does not store that time.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import unicodedata
import weakref
from collections.abc import Iterable
from datetime import datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.engine.interfaces import ExecuteStyle
from sqlalchemy.orm import Mapper, Session
from sqlalchemy.orm.base import instance_state
from sqlalchemy.pool import Pool
from sqlalchemy.sql import util as sql_util

from . import _compat
from ._replay import BEGAN, SNAPSHOT_AT_FIRST_READ, replay_or_capture, statement_runs
from .keys import RESULT_QUALIFIER, database_id, digest, table_name, table_pk_positions, table_pk_types

log = logging.getLogger("ormcache")

if TYPE_CHECKING:
    from .core import OrmCache

__all__ = [
    "UNKNOWN",
    "VersionKeys",
    "is_pending",
    "new_token",
    "pending_token",
]

#: stands for "tables not known": the whole database was (maybe) written
UNKNOWN = "*"

#: seconds a pending token is honoured when its writer never finishes
PENDING_TTL = 60.0

#: no pending token is honoured for longer than this (seconds; MERGE_LUA
#: spells it out: 86400)
_PENDING_AT_MOST = 24 * 3600.0

_WRITTEN = "ormcache.written"  # conn.info: {db: set of tables}, this transaction
_DONE = "ormcache.done"  # conn.info: {db: set of tables} committed, not yet announced
_PENDED = "ormcache.pended"  # conn.info: time.monotonic() of this transaction's first pending token
_WRITER = "ormcache.writer"  # conn.info: (pid, id) of this transaction's pending tokens (new_writer())
_DONE_WRITERS = "ormcache.done_writers"  # conn.info: the ids of the pending tokens _DONE settles

#: ids of the connection ``info`` dicts that hold either: while it is empty,
#: which is always the case in a process that only reads, the transaction
#: listeners return at once (every query passes through them)
_dirty: set[int] = set()


def new_token() -> str:
    """A fresh version token: 16 hex digits."""
    return os.urandom(8).hex()


def new_writer() -> str:
    """An id for one writer's pending tokens (12 hex digits)."""
    return os.urandom(6).hex()


def pending_token(ttl: float | None = None, writer: str | None = None) -> str:
    """A pending token of ``writer`` (default: a new id), honoured until
    ``ttl`` seconds from now (default :data:`PENDING_TTL`)."""
    if ttl is None:
        ttl = PENDING_TTL
    return f"p{writer or new_writer()}:{time.time() + ttl:.3f}"


def is_pending(token: str) -> bool:
    return token[:1] == "p"


def _live(token: str, now: float, drop: str | None = None) -> list[str]:
    """The writers' entries (``id:deadline``) of a pending value that are
    still honoured, but ``drop``'s."""
    live = []
    for part in token[1:].split(","):
        writer, _, until = part.partition(":")
        if writer == drop or not _DEADLINE.match(until):
            continue
        if now < float(until) <= now + _PENDING_AT_MOST:
            live.append(part)
    return live


#: a deadline as pending_token() writes it (MERGE_LUA reads the same)
_DEADLINE = re.compile(r"[0-9]+\.?[0-9]*\Z")


def pending_expired(token: str, now: float) -> bool:
    """Whether every writer of a pending value is past its time; one whose
    time cannot be read, or lies beyond any writer's (``p:inf``, written by
    hand), is taken as past."""
    return not _live(token, now)


def merge_token(current: Any, token: str, writer: str | None, now: float) -> str | None:
    """What a version key holding ``current`` (a string, or anything else
    for "no token") becomes when ``token`` is written, or None for "leave
    it": several writers may have a table's changes pending at once, and
    one writer's tokens must not undo another's.

    * a pending token (``p<writer>:<deadline>``) joins the writers pending
      there, replacing its own writer's earlier entry;
    * a fresh token, written as ``writer`` finishes (or, with no
      ``writer``, by an explicit invalidation or a reader replacing
      expired pending tokens), takes the key only when no other writer
      is still pending there; else the others' entries stay, and the
      last of them to finish (or to expire) writes the fresh token.

    A pending value lists at most :data:`MAX_PENDING` writers; beyond that
    the earliest deadlines give way (so the key stays pending until the
    latest).  ``MERGE_LUA`` is the same for Redis, run by the server."""
    if not isinstance(current, str) or current[:1] != "p":
        return token
    if token[:1] == "p":
        mine = token[1:]
        live = _live(current, now, mine.partition(":")[0])
        if len(live) >= MAX_PENDING:
            live.sort(key=lambda part: (float(part.partition(":")[2]), part))  # (as MERGE_LUA)
            del live[: len(live) - MAX_PENDING + 1]
        live.append(mine)
        return "p" + ",".join(live)
    live = _live(current, now, writer)
    if not live:
        return token
    merged = "p" + ",".join(live)
    return None if merged == current else merged


#: writers a pending value lists at most (see :func:`merge_token`)
MAX_PENDING = 64

#: :func:`merge_token` as a Redis script, for every key of KEYS (all in one
#: hash slot on a cluster): ARGV are the token written, the writer ("" for
#: none), the time (seconds since the epoch, the writers' clock), the keys'
#: TTL in seconds ("" for none), the most writers listed; returns how many
#: keys it wrote
MERGE_LUA = """
local token, now, ttl, most = ARGV[1], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local pending = string.sub(token, 1, 1) == 'p'
local drop = ARGV[2] ~= '' and ARGV[2]
if pending then drop = string.match(token, '^p([^:,]*)') end
local written = 0
for _, key in ipairs(KEYS) do
  local current = redis.call('GET', key)
  local value = token
  if current and string.sub(current, 1, 1) == 'p' then
    local live, untils = {}, {}
    for part in string.gmatch(string.sub(current, 2), '[^,]+') do
      local id, untilt = string.match(part, '^([^:]*):(%d+%.?%d*)$')
      local u = untilt and tonumber(untilt)
      if id and (not drop or id ~= drop) and u and now < u and u <= now + 86400 then
        live[#live + 1] = part
        untils[part] = u
      end
    end
    if pending then
      if #live >= most then
        table.sort(live, function(a, b)
          if untils[a] ~= untils[b] then return untils[a] < untils[b] end
          return a < b
        end)
        local kept = {}
        for i = #live - most + 2, #live do kept[#kept + 1] = live[i] end
        live = kept
      end
      live[#live + 1] = string.sub(token, 2)
      value = 'p' .. table.concat(live, ',')
    elseif #live > 0 then
      value = 'p' .. table.concat(live, ',')
      if value == current then value = nil end
    end
  end
  if value then
    if ttl ~= '' then
      redis.call('SET', key, value, 'EX', ttl)
    else
      redis.call('SET', key, value)
    end
    written = written + 1
  end
end
return written
"""


class VersionKeys:
    """Names of version keys under one namespace."""

    __slots__ = ("ns", "_memo")

    def __init__(self, namespace: str) -> None:
        self.ns = namespace
        self._memo: dict[Any, Any] = {}

    def region(self, name: str) -> str:
        return f"{self.ns}:v:r:{_short(name)}"

    def model(self, table: str) -> str:
        # the bare name: a default schema may or may not be spelled out
        # (over-invalidating same-named tables of other schemas is safe)
        return f"{self.ns}:v:g:{_short(bare_table(table))}"

    def models_unknown(self) -> str:
        """Moved by every explicit invalidation of a model or table
        (``invalidate(Model)``, ``invalidate_table()``): results whose
        tables are not all known depend on it."""
        return f"{self.ns}:v:G"

    def db_unknown(self, db: str) -> str:
        return f"{self.ns}:v:d:{_db(db)}:*"

    def db_any(self, db: str) -> str:
        return f"{self.ns}:v:d:{_db(db)}:+"

    def table(self, db: str, table: str) -> str:
        db, table = _place(db, table)
        return f"{self.ns}:v:d:{db}:t:{table}"

    def bulk(self, db: str, table: str) -> str:
        db, table = _place(db, table)
        return f"{self.ns}:v:d:{db}:b:{table}"

    def row(self, db: str, table: str, pk: str) -> str:
        db, table = _place(db, table)
        return f"{self.ns}:v:d:{db}:r:{table}:{digest(pk, 8)}"

    def entity_deps(
        self,
        region: str,
        db: str,
        entity_tables: tuple[str, ...],
        other_tables: tuple[str, ...],
        pk: str,
    ) -> list[str]:
        """The version keys a primary-key lookup depends on: those of the
        statement's shape (memoized) and one row key per entity table."""
        memo_key = ("get", region, db, entity_tables, other_tables)
        shared: list[str] | None = self._memo.get(memo_key)
        if shared is None:
            shared = [self.region(region), self.db_unknown(db)]
            for t in entity_tables:
                shared.append(self.model(t))
                shared.append(self.bulk(db, t))
            for t in other_tables:
                shared.append(self.model(t))
                shared.append(self.table(db, t))
            self._remember(memo_key, shared)
        return [*shared, *[self.row(db, t, pk) for t in entity_tables]]

    def any_table(self, table: str) -> str:
        """Moved by every write to ``table``, in any database."""
        return f"{self.ns}:v:a:t:{_short(bare_table(table))}"

    def any_bulk(self, table: str) -> str:
        """Moved by every write to ``table`` not known row by row, in any
        database."""
        return f"{self.ns}:v:a:b:{_short(bare_table(table))}"

    def any_row(self, table: str, pk: str) -> str:
        """Moved by every write to this row of ``table``, in any database."""
        return f"{self.ns}:v:a:r:{_short(bare_table(table))}:{digest(pk, 8)}"

    def any_unknown(self) -> str:
        """Moved by every write whose tables are not known, in any database."""
        return f"{self.ns}:v:a:*"

    def group_deps(
        self,
        region: str,
        tables: tuple[str, ...],
        entity_tables: tuple[str, ...] | None = None,
        pk: str | None = None,
    ) -> list[str]:
        """The version keys a result merged from several databases (the
        shards of a ``ShardedSession``) depends on.  Writes move
        cross-database keys (:meth:`any_table`, :meth:`any_row`, ...) as
        well as their own database's, so that such a result depends on a
        handful of keys whatever the number of databases; with
        ``entity_tables`` and ``pk``, those of a primary-key lookup, which
        depends on its row (a write to another row leaves it valid)."""
        memo_key = ("group", region, tables, entity_tables)
        memo: Any = self._memo.get(memo_key)
        if memo is None:
            shared = [self.region(region), self.any_unknown()]
            rows = []
            for t in tables:
                shared.append(self.model(t))
                if entity_tables is not None and t in entity_tables:
                    shared.append(self.any_bulk(t))
                    rows.append(t)
                else:
                    shared.append(self.any_table(t))
            memo = (shared, rows)
            self._remember(memo_key, memo)
        shared, rows = memo
        if not rows or pk is None:
            return shared  # type: ignore[no-any-return]
        return [*shared, *(self.any_row(t, pk) for t in rows)]

    def _remember(self, memo_key: Any, keys: Any) -> None:
        if len(self._memo) > 10000:
            self._memo.clear()
        self._memo[memo_key] = keys

    def deps(self, region: str, db: str, tables: tuple[str, ...], opaque: bool = False) -> list[str]:
        """The version keys a result of ``tables`` on ``db`` depends on;
        ``opaque``: it may read other tables too (textual SQL), and so
        depends on every write to ``db`` and every explicit invalidation
        of a model, as a result whose tables are not known at all."""
        memo_key = (region, db, tables, opaque)
        keys: list[str] | None = self._memo.get(memo_key)
        if keys is None:
            keys = [self.region(region), self.db_unknown(db)]
            for t in tables:
                keys.append(self.model(t))
                keys.append(self.table(db, t))
            if opaque or not tables:
                keys.append(self.db_any(db))
                keys.append(self.models_unknown())
            self._remember(memo_key, keys)
        return keys

    def written(self, db: str, items: Iterable[str]) -> list[str]:
        """The version keys moved by writes to ``items`` on ``db``: table
        names, :data:`UNKNOWN`, and the markers :func:`bulk_item` and
        :func:`row_item` make."""
        keys = [self.db_any(db)]
        for item in items:
            if item == UNKNOWN:
                keys.append(self.db_unknown(db))
                keys.append(self.any_unknown())
            elif item[0] == "\x00":
                kind, table, pk = item[1:].split("\x00", 2)
                if kind == "b":
                    keys.append(self.bulk(db, table))
                    keys.append(self.any_bulk(table))
                else:
                    keys.append(self.row(db, table, pk))
                    keys.append(self.any_row(table, pk))
            else:
                keys.append(self.table(db, item))
                keys.append(self.any_table(item))
        return keys


def bulk_item(table: str) -> str:
    return f"\x00b\x00{table}\x00"


def row_item(table: str, pk: str) -> str:
    return f"\x00r\x00{table}\x00{pk}"


def pk_text(values: Iterable[Any]) -> str:
    """The text a primary key is known by in row keys: the values spelled
    the way a database may compare them, so that a lookup and a write of
    one row agree however each spelled the key.  Strings are case-folded,
    stripped of accents and of trailing blanks (collations that ignore
    case, accents or padding, as MySQL's default does, match several
    spellings to one row; elsewhere this only merges the row keys of
    distinct rows, which costs an invalidation now and then; string keys
    on MySQL-family dialects, whose collations have rules of their own,
    are not looked up by row at all: keys.py), decimals
    normalized (``5`` and ``5.000``), aware datetimes taken to UTC."""
    return repr(tuple([v if type(v) is int else _canonical(v) for v in values]))


def _canonical(value: Any) -> Any:
    kind = type(value)
    if kind is str:
        if value.isascii():
            return value.lower().rstrip(" ")
        decomposed = unicodedata.normalize("NFKD", value.casefold())
        return "".join([c for c in decomposed if not unicodedata.combining(c)]).rstrip(" ")
    if kind is Decimal:
        return value.normalize() if value.is_finite() else value
    if kind is datetime and value.tzinfo is not None:
        return value.astimezone(timezone.utc)
    return value




def _short(name: str) -> str:
    """``name`` as it is in version keys when short, printable ASCII (no
    control characters: memcached's protocol ends a key at whitespace),
    with no space or ':'; else a digest of it."""
    if (
        len(name) <= 64
        and name.isascii()
        and name.isprintable()
        and ":" not in name
        and " " not in name
    ):
        return name
    return digest(name, 8)


def bare_table(table: str) -> str:
    """A table's name in version keys: without its schema.  A name
    reaches a table through each connection's search path (PostgreSQL)
    or current database (MySQL): ``plan`` on one engine may be
    ``public.plan`` spelled out on another, or a table of another schema
    altogether; one key for all of them over-invalidates, never misses a
    write."""
    return table.rpartition(".")[2]


_db_memo: dict[str, str] = {}
_placed: dict[tuple[str, str], tuple[str, str]] = {}
#: database ids of servers whose databases are schemas of one server: a
#: statement on one reaches another's tables (``db.t``, a multi-table
#: UPDATE, a procedure, a subquery in text), so their writes are followed
#: per server
_SERVER_WIDE = ("mysql://", "mariadb://", "mssql://")


def _db(db: str) -> str:
    """The database part of version keys.  Without the ``search_path`` a
    PostgreSQL id may end with: result keys keep tenants apart, while one
    set of version keys per database means that URLs which spell the
    same ``search_path`` differently (or leave it implicit) still
    invalidate each other's readers; tenants' writes to tables of the
    same name then invalidate each other too, which costs misses only.
    (Also for an ``ormcache_database`` name: ``app#search_path=tenant_a``
    keeps its results apart from ``app``'s, not its version keys.)  On
    MySQL, MariaDB and SQL Server, the server: the databases of one
    server share version keys."""
    short = _db_memo.get(db)
    if short is None:
        if len(_db_memo) > 10000:  # (in-memory databases of threads come and go)
            _db_memo.clear()
        qualified = RESULT_QUALIFIER.search(db)
        short = _db_memo[db] = digest(_server_part(db[: qualified.start()] if qualified else db), 8)
    return short


_ODBC_DATABASE = re.compile(r"(?:^|;)\s*(?:database|initial catalog)\s*=[^;]*", re.IGNORECASE)


def _server_part(db: str) -> str:
    """``db`` (a database id) without its database where the databases of
    a server reach each other's tables; mysql and mariadb ids of one
    server are one."""
    if not db.startswith(_SERVER_WIDE):
        return db
    head, sep, query = db.partition("?")
    scheme, _, rest = head.partition("://")
    server = rest.partition("/")[0]
    scheme = "mysql" if scheme == "mariadb" else scheme
    # (a query's unix_socket names the server; its database does not, nor
    # does the DATABASE= of an ODBC connection string)
    targets = "&".join(
        _ODBC_DATABASE.sub("", p) if p.startswith("odbc_connect=") else p
        for p in query.split("&")
        if p and not p.startswith(("database=", "dbname=", "db="))
    ) if sep else ""
    return f"{scheme}://{server}/" + (f"?{targets}" if targets else "")


def _place(db: str, table: str) -> tuple[str, str]:
    """The database and table parts of a version key for ``table`` (as
    :func:`~ormcache.keys.table_name` gives it) written or read on
    ``db``: the table without its schema."""
    key = (db, table)
    placed = _placed.get(key)
    if placed is None:
        if len(_placed) > 10000:
            _placed.clear()
        placed = _placed[key] = (_db(db), _short(bare_table(table)))
    return placed


# -- write tracking -------------------------------------------------------
#
# One set of listeners for the whole process, installed by the first
# OrmCache.  They record, per DBAPI connection, which tables the current
# transaction wrote, and tell every live OrmCache.
#
# Connection events (after_cursor_execute, begin, commit, rollback) are
# listened to on the Connection objects that write, not on the Engine
# class: a class-level connection listener makes every Connection of the
# process, reads included, build SQLAlchemy's joined event dispatch (about
# 20% of a one-row query, measured by bench's overhead.process).  The
# dialect-level do_execute events, which cost a read nothing of the kind,
# see each statement first and arm the connection of a write; its own
# after_cursor_execute then runs for that very statement.

_caches: weakref.WeakSet[OrmCache] = weakref.WeakSet()
_install_lock = threading.Lock()
_installed = False


def register(cache: OrmCache) -> None:
    global _installed
    with _install_lock:
        _caches.add(cache)
        if not _installed:
            # first, so that a listener that runs the statement itself
            # (returning True) cannot hide a write from us
            event.listen(Engine, "do_execute", _on_execute, insert=True)
            event.listen(Engine, "do_executemany", _arm_execute, insert=True)
            event.listen(Engine, "do_execute_no_params", _arm_no_params, insert=True)
            # On the Pool class, not on the pools of connections that
            # wrote (tried in cd887a0): SQLAlchemy keys its event registry
            # by id(target), and Engine.dispose() files a recreated pool's
            # copied listeners under the replaced pool's id, so
            # event.contains() said yes for a later pool at that address,
            # whose check-ins then went unfollowed (tables pending for
            # PENDING_TTL: no fills).
            event.listen(Pool, "checkin", _on_checkin)
            event.listen(Mapper, "after_insert", _on_row_write)
            event.listen(Mapper, "after_update", _on_row_write)
            event.listen(Mapper, "after_delete", _on_row_write)
            event.listen(Session, "before_flush", _on_before_flush)
            event.listen(Session, "after_flush_postexec", _on_after_flush)
            _installed = True


def caches() -> list[OrmCache]:
    """The live (not closed) OrmCache instances of the process."""
    return list(_caches)


def unregister(cache: OrmCache) -> None:
    with _install_lock:
        _caches.discard(cache)


def any_writes() -> bool:
    """Whether any connection of the process holds writes not yet
    announced (False in a process that only reads)."""
    return bool(_dirty)


def written_tables(conn: Connection, db: str) -> set[str] | None:
    """Tables the connection's open transaction wrote on ``db``."""
    if not _dirty:
        return None
    written = conn.info.get(_WRITTEN)
    if not written:
        return None
    return written.get(db)  # type: ignore[no-any-return]


_armed: weakref.WeakSet[Connection] = weakref.WeakSet()
_INSERTMANYVALUES = ExecuteStyle.INSERTMANYVALUES


def _on_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
    """Every ``do_execute``: arm the connection of a write, then let the
    replay hook serve a cached result or capture a miss's rows (one
    listener for both: one call per statement)."""
    if context is None:
        return False
    if _writes(context):
        if context.execute_style is _INSERTMANYVALUES:
            # SQLAlchemy decided before this statement's first batch
            # whether to fire connection events: a connection armed now
            # would not see its after_cursor_execute.  Record the write
            # before it runs (tokens go pending; they are settled by the
            # transaction's end or the check-in, as for any write).
            _track(context.root_connection, statement, context, before=True)
        else:
            _arm(context.root_connection)
    return replay_or_capture(cursor, statement, parameters, context)


def _arm_execute(cursor: Any, statement: str, parameters: Any, context: Any) -> None:
    if context is None:
        return
    if _writes(context):
        _arm(context.root_connection)
    if context.dialect.name in SNAPSHOT_AT_FIRST_READ:
        statement_runs(context, statement)


def _writes(context: Any) -> bool:
    """Whether the statement may write: DML, DDL, textual SQL, or a query
    with a data-modifying CTE (``WITH u AS (UPDATE ...) SELECT ...``)."""
    if context.isinsert or context.isupdate or context.isdelete or context.isddl or context.is_text:
        return True
    compiled = context.compiled
    # (every query passes here: no call unless it has CTEs at all)
    return bool(getattr(compiled, "ctes", None)) and bool(_cte_targets(compiled))


def _cte_targets(compiled: Any) -> tuple[Any, ...]:
    """What data-modifying CTEs of a compiled statement write: tables, and
    for textual ones (``text("UPDATE ...").columns(...).cte()``) the names
    :func:`text_tables` reads (remembered on the compiled statement:
    SQLAlchemy caches those)."""
    found = getattr(compiled, "_ormcache_cte_targets", None)
    if found is None:
        targets: list[Any] = []
        for cte in getattr(compiled, "ctes", None) or ():
            element = cte.element
            if getattr(element, "is_dml", False) and getattr(element, "table", None) is not None:
                targets.append(element.table)
                continue
            sql = getattr(getattr(element, "element", None), "text", None)
            if isinstance(sql, str) and _DML_WORD.search(sql):
                # a textual CTE that may write (a read, "TABLE t" or a
                # parenthesized UNION, writes nothing)
                default_schema = getattr(getattr(compiled, "dialect", None), "default_schema_name", None)
                targets.extend(sorted(text_tables(sql, default_schema) or ()))
        found = tuple(targets)
        try:
            compiled._ormcache_cte_targets = found
        except AttributeError:
            pass
    return found  # type: ignore[no-any-return]


def _arm_no_params(cursor: Any, statement: str, context: Any) -> None:
    _arm_execute(cursor, statement, None, context)


def _arm(conn: Connection) -> None:
    """Follow this connection's statements and transactions (it writes)."""
    if conn in _armed:
        return
    _armed.add(conn)
    _follow_commits(conn.dialect)
    event.listen(conn, "after_cursor_execute", _after_cursor_execute)
    event.listen(conn, "commit", _on_commit)
    event.listen(conn, "rollback", _on_rollback)
    event.listen(conn, "commit_twophase", _on_commit_twophase)
    event.listen(conn, "rollback_twophase", _on_rollback_twophase)
    event.listen(conn, "begin", _on_begin)


def _after_cursor_execute(
    conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> None:
    if context is None or not _writes(context):
        return
    _track(conn, statement, context)


def _track(conn: Connection, statement: str, context: Any, before: bool = False) -> None:
    """Record what a write statement writes (``before``: it has not run
    yet)."""
    tables = _written_by(context, statement, conn)
    if tables is None:
        return
    if not ("compiled_cache" in context.execution_options and _flushing(conn)):
        # not one of the flush's own row-by-row statements (ORM bulk
        # statements carry compiled_cache too: from a flush event, they
        # run outside the unit of work's execution)
        tables = tables | {bulk_item(t) for t in tables if t != UNKNOWN}
    _record(conn, context, tables, before)


def _record(conn: Connection, context: Any, tables: set[str], before: bool = False) -> None:
    _arm(conn)
    db = database_id(conn)
    info = conn.info
    _dirty.add(id(info))
    written = info.setdefault(_WRITTEN, {})
    seen = written.setdefault(db, set())
    new = tables - seen
    if new:
        seen |= new
        info.setdefault(_PENDED, time.monotonic())
        writer = _writer(info)
        for cache in list(_caches):
            cache._pre_invalidate(db, new, writer)
    if context is None or before:
        return
    from ._replay import in_transaction

    if in_transaction(context) is False:
        # autocommit: the write is committed already
        _settle(info)
        _announce(info)


_flush_local = threading.local()


def _on_before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    sessions = getattr(_flush_local, "sessions", None)
    if sessions is None:
        sessions = _flush_local.sessions = weakref.WeakSet()
    sessions.add(session)


def _on_after_flush(session: Session, flush_context: Any) -> None:
    # only sessions that are flushing stay in the set every flush statement
    # looks through (an asyncio thread may hold thousands of sessions)
    sessions = getattr(_flush_local, "sessions", None)
    if sessions is not None:
        sessions.discard(session)


def _flushing(conn: Connection) -> bool:
    """Whether a session of this thread is executing its unit of work (not
    merely flushing: flush events run outside it) on ``conn``: asyncio
    tasks share their thread, and another task's bulk statement is not
    that flush's."""
    sessions = getattr(_flush_local, "sessions", None)
    if not sessions:
        return False
    for session in list(sessions):
        if _compat.executing_flush(session) and any(
            c is conn for c in _compat.session_connections(session)
        ):
            return True
    return False


def _on_row_write(mapper: Mapper[Any], connection: Connection, target: Any) -> None:
    if not _caches:
        return
    state = instance_state(target)
    idents = [mapper.primary_key_from_instance(target)]
    if state.key is not None:
        idents.append(state.key[1])  # the key it was loaded with (a key change)
    schema_map = connection.get_execution_options().get("schema_translate_map")
    default_schema = connection.dialect.default_schema_name
    items: set[str] = set()
    for table in mapper.tables:
        name = getattr(table, "name", None)
        if name:
            tname = table_name(name, getattr(table, "schema", None), schema_map, default_schema)
            # the row as that table's own key names it (what lookups of
            # the table's other mappers depend on)
            positions = table_pk_positions(mapper, table)
            if positions is None:
                items.add(bulk_item(tname))
                continue
            types = table_pk_types(mapper, table)
            for ident in idents:
                values = [ident[i] for i in positions]
                if types is not None and any(type(v) is not t for v, t in zip(values, types)):
                    # a key given as another type (Item(id="5")): the row
                    # may be the one a lookup by the column's type names
                    # otherwise; entity results of the table go
                    items.add(bulk_item(tname))
                else:
                    items.add(row_item(tname, pk_text(values)))
    _record(connection, None, items)


def _writer(info: dict[str, Any]) -> str:
    """The id of the pending tokens of the transaction under way on the
    connection whose ``info`` this is: a new one for each transaction (a
    fresh token of an earlier one, lost and written later, must not remove
    this one's pending entry), and in a forked child (whose copy of the
    info is not the parent's connection: two writers never share an id)."""
    held = info.get(_WRITER)
    if held is None or held[0] != os.getpid():
        held = info[_WRITER] = (os.getpid(), new_writer())
    return held[1]  # type: ignore[no-any-return]


def _settle(info: dict[str, Any]) -> None:
    """The transaction ended (committed or rolled back): what it wrote is
    due for fresh tokens, as its writer's; the next transaction will be
    another writer."""
    info.pop(_PENDED, None)
    held = info.pop(_WRITER, None)
    written = info.pop(_WRITTEN, None)
    if written:
        done = info.setdefault(_DONE, {})
        for db, tables in written.items():
            done.setdefault(db, set()).update(tables)
        if held is not None:
            info.setdefault(_DONE_WRITERS, []).append(held)


#: the connections whose commit is under way in this thread (several, with
#: asyncio tasks), with their info, by id
_committing = threading.local()


def _commits() -> dict[int, tuple[Any, dict[str, Any], float]]:
    commits: dict[int, tuple[Any, dict[str, Any], float]] | None = getattr(_committing, "by_id", None)
    if commits is None:
        commits = _committing.by_id = {}
    return commits


def _follow_commits(dialect: Any) -> None:
    """Announce a commit as soon as the DBAPI commit returns.  SQLAlchemy's
    ``commit`` event comes before it (fresh tokens then would let readers
    store what the transaction had not committed yet), and Core has no
    event after it: the dialect's ``do_commit`` is wrapped, once per
    dialect.  Without it, fresh tokens would wait for the connection's next
    begin or check-in, which a Core connection kept open after ``commit()``
    may not reach for a long time, while its pending tokens may expire or
    be evicted."""
    if dialect.__dict__.get("_ormcache_do_commit") is not None:
        return
    do_commit = dialect.do_commit
    do_commit_twophase = dialect.do_commit_twophase

    def announcing_commit(dbapi_connection: Any) -> None:
        committing = _commits().pop(id(dbapi_connection), None)
        try:
            do_commit(dbapi_connection)
        except BaseException:
            _commit_failed(committing, dbapi_connection)
            raise
        _committed(committing, dbapi_connection)

    def announcing_commit_twophase(
        connection: Any, xid: Any, is_prepared: bool = True, recover: bool = False
    ) -> None:
        committing = _commits().pop(id(connection), None)
        try:
            do_commit_twophase(connection, xid, is_prepared, recover)
        except BaseException:
            _commit_failed(committing, connection)
            raise
        if committing is None and not _own_two_phase_commit(connection):
            # Connection.commit_prepared(): a transaction prepared by
            # another connection, or process (a recovery), committed here
            # (psycopg2 sends no SQL: the driver's tpc_commit); what it
            # wrote is not known
            _written_elsewhere(connection)
        _committed(committing, connection)

    dialect._ormcache_do_commit = do_commit
    dialect.do_commit = announcing_commit
    dialect.do_commit_twophase = announcing_commit_twophase


def _written_elsewhere(connection: Connection) -> None:
    """Fresh tokens for the whole database of ``connection``: a commit of
    writes this process did not see."""
    try:
        db = database_id(connection)
        for cache in list(_caches):
            cache._post_invalidate(db, {UNKNOWN})
    except Exception:
        log.warning("could not announce the commit of a prepared transaction", exc_info=True)


def _committed(committing: tuple[Any, dict[str, Any], float] | None, owner: Any) -> None:
    """The commit of ``owner`` (a pooled DBAPI connection, or for a
    two-phase commit the Connection) returned: announce what it wrote.
    The commit is done: nothing may make it look failed."""
    if committing is None or committing[0] is not owner:
        return
    try:
        _announce(committing[1])
    except Exception:
        log.warning(
            "could not announce a commit; its tables stay uncached until the "
            "connection is used again",
            exc_info=True,
        )


def _commit_failed(committing: tuple[Any, dict[str, Any], float] | None, owner: Any) -> None:
    """The DBAPI commit of ``owner`` raised.  SQLAlchemy sends no rollback
    event after it, and the transaction may still be open (SQLite keeps it
    when a deferred constraint fails at COMMIT; a later commit then
    commits its writes): unless the driver says it has ended, its writes
    are pending again, until the connection's next commit, rollback or
    check-in."""
    if committing is None or committing[0] is not owner:
        return
    info = committing[1]
    try:
        from ._replay import dbapi_in_transaction

        still_open = dbapi_in_transaction(owner)
    except Exception:
        still_open = None
    if still_open is False:
        _announce(info)  # ended (rolled back): nothing of it is visible
        return
    done = info.pop(_DONE, None)
    writers = info.pop(_DONE_WRITERS, None)
    if done:
        written = info.setdefault(_WRITTEN, {})
        for db, tables in done.items():
            written.setdefault(db, set()).update(tables)
        if writers:
            # (the failed commit's; an earlier transaction's entries, had
            # its announcement failed too, expire)
            info[_WRITER] = writers[-1]
        info.setdefault(_PENDED, committing[2])
        _dirty.add(id(info))


def _on_commit(conn: Connection) -> None:
    # before the DBAPI commit: fresh tokens follow it (_follow_commits), or
    # the next begin or checkin
    if _dirty:
        _committing_now(conn, conn.connection)


def _on_commit_twophase(conn: Connection, xid: Any, is_prepared: bool) -> None:
    if _dirty:
        _committing_now(conn, conn)


def _on_rollback_twophase(conn: Connection, xid: Any, is_prepared: bool) -> None:
    _on_rollback(conn)


def _committing_now(conn: Connection, owner: Any) -> None:
    """``conn``'s transaction is about to commit (``owner``: what the
    dialect's commit is given)."""
    info = conn.info
    pended = info.get(_PENDED)
    if _WRITTEN in info:
        _commits()[id(owner)] = (owner, info, pended if pended is not None else time.monotonic())
    if pended is not None and time.monotonic() - pended > PENDING_TTL / 2:
        # the pending tokens may have expired while the transaction
        # ran, and readers stored its tables' old rows under tokens of
        # their own: pending again, until the commit is announced
        writer = _writer(info)
        for db, tables in (info.get(_WRITTEN) or {}).items():
            for cache in list(_caches):
                cache._pre_invalidate(db, tables, writer)
    _settle(info)


def _on_rollback(conn: Connection) -> None:
    # nothing the transaction wrote is visible to others: announce at once
    if _dirty:
        info = conn.info
        _settle(info)
        _announce(info)


def _on_begin(conn: Connection) -> None:
    if _dirty:
        _announce(conn.info)


def _on_checkin(dbapi_connection: Any, connection_record: Any) -> None:
    if connection_record is None:
        return
    info = connection_record.info
    # the pool's reset ended any transaction a statement marked
    info.pop(BEGAN, None)
    if not _dirty:
        return
    # returned to the pool without commit or rollback: the pool's reset
    # rolls it back
    _settle(info)
    _announce(info)


def _announce(info: dict[str, Any]) -> None:
    done = info.pop(_DONE, None)
    writers = info.pop(_DONE_WRITERS, None)
    if _WRITTEN not in info:
        _dirty.discard(id(info))
    if not done:
        return
    # (as each writer: several when an earlier announcement failed; pended
    # by whatever process)
    for writer in [held[1] for held in writers] if writers else [None]:
        for cache in list(_caches):
            for db, tables in done.items():
                cache._post_invalidate(db, tables, writer)


_TEXT_READ = frozenset(
    "select show explain describe desc values pragma begin commit rollback "
    "savepoint release set analyze vacuum checkpoint listen notify fetch "
    "declare close discard reset start end xa prepare".split()
)
#: one table name: quoted ("a ""b""", `a b`, [a b]) or bare
_IDENT = r'(?:"(?:[^"]|"")+"|`(?:[^`]|``)+`|\[[^\]]+\]|[\w$]+)'
_TEXT_WRITE = re.compile(
    rf"""^\s*(?P<verb>
        insert(?:\s+(?:low_priority|delayed|high_priority|ignore))*\s+(?:or\s+\w+\s+)?into |
        replace(?:\s+(?:low_priority|delayed))?\s+into |
        update(?:\s+(?:low_priority|ignore))*(?:\s+or\s+\w+)?(?:\s+only)? |
        delete(?:\s+(?:low_priority|quick|ignore))*\s+from(?:\s+only)? |
        merge\s+into |
        truncate(?:\s+table)?(?:\s+only)? |
        alter\s+table(?:\s+if\s+exists)?(?:\s+only)? |
        drop\s+table(?:\s+if\s+exists)? |
        create\s+(?:temp\w*\s+)?table(?:\s+if\s+not\s+exists)?
    )\s+(?P<name>{_IDENT}(?:\s*\.\s*{_IDENT}){{0,2}})(?P<rest>.*)""",
    re.IGNORECASE | re.VERBOSE | re.DOTALL,
)
_COMMENT = re.compile(r"^\s*(?:--[^\n]*\n|/\*.*?\*/)", re.DOTALL)
#: comments, literals and quoted names, for telling statements apart:
#: strings ('it''s'), double-quoted names (strings in MySQL), backquoted
#: names, PostgreSQL dollar quoting ($$...$$, $f$...$f$), comments
_QUOTED = r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|`(?:[^`]|``)*`|\$(\w*)\$.*?\$\1\$"
_NOT_CODE = re.compile(_QUOTED + r"|--[^\n]*|/\*.*?\*/", re.DOTALL)
#: the same as MySQL reads them: "#" starts a comment to the end of its
#: line (an operator in PostgreSQL), "--" only when a space follows (x--1
#: is x minus -1)
_NOT_CODE_MYSQL = re.compile(_QUOTED + r"|--(?=\s)[^\n]*|/\*.*?\*/|#[^\n]*", re.DOTALL)
#: what UPDATE may have between its table and SET: an alias, nothing else
#: (MySQL's UPDATE a, b / UPDATE a JOIN b write several tables)
_UPDATE_ALIAS = re.compile(rf"^\s*(?:(?:as\s+)?{_IDENT}\s*)?(?:\bset\b|$)", re.IGNORECASE | re.DOTALL)
_DML_WORD = re.compile(r"\b(?:insert|update|delete|merge|replace|truncate)\b", re.IGNORECASE)
_EXPLAIN_WRITE = re.compile(
    r"\banaly[sz]e\b.*\b(?:insert|update|delete|merge|replace|execute)\b", re.IGNORECASE | re.DOTALL
)
#: a statement an ANALYZE runs that may write
_RUNS_A_WRITE = re.compile(r"\b(?:insert|update|delete|merge|replace|execute|call)\b", re.IGNORECASE)
#: statements that run others they hold (MariaDB)
_RUNS_ANOTHER = re.compile(r"\s*(?:begin\s+not\s+atomic|set\s+statement)\b", re.IGNORECASE)


_EXECUTABLE_COMMENT = re.compile(r"/\*M?!\d*(.*?)\*/", re.DOTALL)


def unwrap_executable_comments(sql: str) -> str:
    """``sql`` with MySQL's executable comments (``/*!40001 ... */``,
    MariaDB's ``/*M!100101 ... */``) replaced by what they hold, which
    MySQL runs: read as SQL, as MySQL reads it (elsewhere they are
    comments; reading them as SQL there can only find more writes)."""
    return _EXECUTABLE_COMMENT.sub(lambda m: f" {m.group(1)} ", sql)


def text_tables(sql: str, default_schema: str | None = None) -> set[str] | None:
    """The tables a textual statement writes: an empty set for a read,
    ``{UNKNOWN}`` when it may write and its targets cannot be told (several
    statements in one string are looked at one by one)."""
    body = sql.strip().rstrip(";")
    if "/*!" in body or "/*M!" in body:
        body = unwrap_executable_comments(body).strip().rstrip(";")
    if ";" not in body:
        return _statement_tables(body, default_schema)
    if "\\" in body:
        # a backslash may escape a quote (MySQL, PostgreSQL E'...'), or
        # not: where one statement ends cannot be told for sure
        return {UNKNOWN}
    # where statements end, read with what cannot end one blanked out (to
    # the same length); each statement is then read as it is written
    code = _NOT_CODE.sub(_blank, body)
    ends = [i for i, c in enumerate(code) if c == ";"]
    if ("#" in body or "--" in body) and ends != [
        i for i, c in enumerate(_NOT_CODE_MYSQL.sub(_blank, body)) if c == ";"
    ]:
        return {UNKNOWN}  # MySQL and PostgreSQL end the statements elsewhere
    body = _NOT_CODE.sub(_blank_comment, body)
    parts, start = [], 0
    for end in ends:
        parts.append(body[start:end])
        start = end + 1
    parts.append(body[start:])
    tables: set[str] = set()
    for part in parts:
        if part.strip():
            found = _statement_tables(part, default_schema)
            if found:
                if UNKNOWN in found:
                    return {UNKNOWN}
                tables |= found
    return tables


def _blank(match: re.Match[str]) -> str:
    return " " * len(match.group(0))


def _blank_comment(match: re.Match[str]) -> str:
    """A comment as spaces (of its length), a literal or a name as it is."""
    found = match.group(0)
    return " " * len(found) if found[:2] in ("--", "/*") else found


def _statement_tables(sql: str, default_schema: str | None) -> set[str]:
    stripped = sql
    while True:
        m = _COMMENT.match(stripped)
        if not m:
            break
        stripped = stripped[m.end() :]
    first = stripped.lstrip().split(None, 1)
    if not first:
        return set()
    word = first[0].lower().rstrip(";(")
    if word == "explain":
        # EXPLAIN ANALYZE runs the statement (PostgreSQL)
        return {UNKNOWN} if _EXPLAIN_WRITE.search(stripped) else set()
    if word == "analyze" and _RUNS_A_WRITE.search(stripped):
        return {UNKNOWN}  # MariaDB's ANALYZE [FORMAT=JSON] UPDATE ... runs it
    if _RUNS_ANOTHER.match(stripped):
        # MariaDB's BEGIN NOT ATOMIC ... END (a compound statement, split
        # at its semicolons here) and SET STATEMENT ... FOR <statement>
        return {UNKNOWN}
    if word in _TEXT_READ:
        return set()
    if word == "with":
        lowered = stripped.lower()
        if re.search(r"\b(insert|update|delete|merge)\b", lowered):
            return {UNKNOWN}
        return set()
    m = _TEXT_WRITE.match(stripped)
    if m is None:
        return {UNKNOWN}
    verb = m.group("verb").lower()
    rest = m.group("rest")
    if verb.startswith(("truncate", "drop")) and (
        re.match(r"\s*\*?\s*,", rest) or re.search(r"\bcascade\b", rest, re.IGNORECASE)
    ):
        return {UNKNOWN}  # several tables, or those referencing it too
    if verb.startswith("delete") and re.match(r"\s*(\.\s*)?\*?\s*,", rest):
        return {UNKNOWN}  # MySQL's DELETE FROM a, b USING ...: several tables
    if verb.startswith("update") and not _UPDATE_ALIAS.match(rest):
        return {UNKNOWN}
    parts = [_unquote(p) for p in re.findall(_IDENT, m.group("name"))]
    bare = parts[-1]
    # (database.schema.table: PostgreSQL's own database, SQL Server's)
    schema = parts[-2] if len(parts) > 1 else None
    return {table_name(bare, schema, None, default_schema)}


_QUOTED_NAME = re.compile(rf"\s*{_IDENT}(?:\s*\.\s*{_IDENT}){{0,2}}\s*$")


def named_table(text: str) -> str | None:
    """A table name a user wrote (``invalidate_table()``, the CLI's
    ``--table``), as :func:`~ormcache.keys.table_name` gives it: quoted
    parts (``"My Table"``, `` `t` ``, ``[t]``) unquoted; None when quotes
    do not make a name of them."""
    if not text.isprintable() or "'" in text or ";" in text:
        return None  # ('t' is a string in SQL, not a name)
    if not any(q in text for q in '"`['):
        # unquoted: up to three non-empty parts (a space may be part of a
        # name: "line items", not of its ends)
        parts = [p.strip() for p in text.split(".")]
        if len(parts) > 3 or not all(parts):
            return None
        return ".".join(parts).lower()
    if _QUOTED_NAME.match(text) is None:
        return None
    parts = [_unquote(p) for p in re.findall(_IDENT, text)]
    return table_name(parts[-1], parts[-2] if len(parts) > 1 else None)


def _unquote(ident: str) -> str:
    if ident[0] == '"':
        return ident[1:-1].replace('""', '"')
    if ident[0] == "`":
        return ident[1:-1].replace("``", "`")
    if ident[0] == "[":
        return ident[1:-1]
    return ident


def _written_by(context: Any, statement: str, conn: Connection) -> set[str] | None:
    dialect = context.dialect
    schema_map = context.execution_options.get("schema_translate_map")
    default_schema = dialect.default_schema_name
    compiled = context.compiled
    if context.is_text or compiled is None:
        if "/*!" in statement or "/*M!" in statement:
            statement = unwrap_executable_comments(statement)
        if _commits_prepared(statement) and not _own_two_phase_commit(conn):
            # a prepared transaction of another connection, or process
            # (recovery: Connection.commit_prepared()): its writes are not known
            return {UNKNOWN}
        tables = text_tables(statement, default_schema)
        if tables and UNKNOWN not in tables:
            # rows the database changes by itself, as below, for the
            # mapped tables of those names (a textual DELETE, UPDATE or
            # REPLACE: any action, whichever the statement runs)
            for t in _text_cascades(tables):
                child = table_name(t.name, getattr(t, "schema", None), None, default_schema)
                tables |= {child, bulk_item(child)}
        return tables or None
    stmt = compiled.statement
    found: list[Any] = []
    ctes: tuple[Any, ...] = ()
    if context.isddl:
        element = getattr(stmt, "element", None)
        target = getattr(element, "table", None)
        if target is None and element is not None and hasattr(element, "c"):
            target = element
        if target is not None and getattr(target, "name", None):
            found = [target]
        else:
            name = getattr(stmt, "table_name", None) or getattr(element, "table_name", None)
            if name:
                return {table_name(name, getattr(stmt, "schema", None), schema_map, default_schema)}
            return {UNKNOWN}
    else:
        ctes = _cte_targets(compiled)
        if context.isinsert or context.isupdate or context.isdelete:
            target = getattr(stmt, "table", None)
            annotations = getattr(stmt, "_annotations", None)
            if annotations:
                # an ORM bulk INSERT or UPDATE by key of a joined-inheritance
                # class runs once per table, each run the user's statement
                # annotated with the table it writes
                target = annotations.get("_emit_insert_table", annotations.get("_emit_update_table", target))
            if target is None:
                return {UNKNOWN}
            found = sql_util.find_tables(target, include_joins=True, include_aliases=True)
            if not found:
                return {UNKNOWN}
            if context.isupdate:
                # MySQL's multi-table UPDATE sets columns of other tables
                for key in _set_columns(stmt):
                    table = getattr(key, "table", None)
                    if table is not None and getattr(table, "name", None) and table not in found:
                        found.append(table)
        named: set[str] = set()
        for target in ctes:
            if isinstance(target, str):  # read from a textual CTE
                named.add(target)
            else:
                found.extend(sql_util.find_tables(target, include_joins=True, include_aliases=True))
        if not found and not named:
            return {UNKNOWN}
    written = {
        table_name(t.name, getattr(t, "schema", None), schema_map, default_schema)
        for t in found
    }
    if ctes:
        written |= named
    found = _mapped_tables(found)
    if context.isdelete or ctes:
        cascaded = _cascades(found, True, None)
        if ctes:  # of either kind
            cascaded |= _cascades(found, False, None)
    elif (context.isinsert or context.isupdate) and (
        _replaces(stmt) or (dialect.name == "sqlite" and any(map(_replaces_on_conflict, found)))
    ):
        # INSERT OR REPLACE / REPLACE / UPDATE OR REPLACE, or a SQLite
        # table whose constraints say ON CONFLICT REPLACE, delete the rows
        # they conflict with (other rows than those written: row by row
        # keys do not tell them); an upsert (ON CONFLICT DO UPDATE, ON
        # DUPLICATE KEY UPDATE) updates them
        cascaded = _cascades(found, True, None) | _cascades(found, False, None)
        for name in list(written):
            written.add(bulk_item(name))
    elif context.isupdate:
        cascaded = _cascades(found, False, _set_keys(compiled, stmt))
    else:
        cascaded = set()
    # rows the database changes by itself: foreign keys declared ON
    # DELETE/UPDATE CASCADE, SET NULL or SET DEFAULT
    for t in cascaded:
        name = table_name(t.name, getattr(t, "schema", None), schema_map, default_schema)
        written.add(name)
        written.add(bulk_item(name))
    return written


_REFERENTIAL = frozenset({"CASCADE", "SET NULL", "SET DEFAULT"})
#: the commit of a prepared (two-phase) transaction: MySQL's XA COMMIT,
#: PostgreSQL's COMMIT PREPARED, as a statement of its own (after comments,
#: or another statement)
_COMMIT_PREPARED = re.compile(r"(?:^|;)\s*(?:xa\s+commit|commit\s+prepared)\b", re.IGNORECASE)


def _commits_prepared(sql: str) -> bool:
    if _MAYBE_PREPARED.search(sql) is None:  # (most statements: no copy made)
        return False
    return _COMMIT_PREPARED.search(_NOT_CODE.sub(_blank, sql)) is not None


_MAYBE_PREPARED = re.compile(r"xa|prepared", re.IGNORECASE)


def _own_two_phase_commit(conn: Connection) -> bool:
    """Whether ``conn`` is committing its own two-phase transaction (whose
    writes it recorded as they ran)."""
    transaction = getattr(conn, "_transaction", None)
    return type(transaction).__name__ == "TwoPhaseTransaction"


def _replaces(stmt: Any) -> bool:
    """Whether an INSERT may delete or update rows it conflicts with: a
    ``REPLACE`` prefix (SQLite's ``OR REPLACE``, MySQL's ``REPLACE``) or
    an upsert clause."""
    if getattr(stmt, "_post_values_clause", None) is not None:
        return True
    return any("replace" in str(p).lower() for p, _ in getattr(stmt, "_prefixes", ()) or ())


def _replaces_on_conflict(table: Any) -> bool:
    """Whether a SQLite table's metadata declares a primary key or unique
    constraint ``ON CONFLICT REPLACE`` (``sqlite_on_conflict``,
    ``sqlite_on_conflict_primary_key``, ``sqlite_on_conflict_unique``):
    any INSERT or UPDATE of it may delete the rows it conflicts with."""
    memo = table.__dict__.get("_ormcache_replaces")
    size = len(getattr(table, "constraints", ()))
    if memo is not None and memo[0] == size:
        return memo[1]  # type: ignore[no-any-return]
    found = False
    try:
        for constraint in table.constraints:
            if str(constraint.dialect_options["sqlite"].get("on_conflict") or "").upper() == "REPLACE":
                found = True
        for column in table.columns:
            options = column.dialect_options["sqlite"]
            for option in ("on_conflict_primary_key", "on_conflict_unique"):
                if str(options.get(option) or "").upper() == "REPLACE":
                    found = True
    except Exception:  # (not a Table: a join's alias, a textual one)
        found = False
    try:
        table.__dict__["_ormcache_replaces"] = (size, found)
    except Exception:
        pass
    return found


def _mapped_tables(found: list[Any]) -> list[Any]:
    """``found`` with the mapped tables of the name of each table that has
    no ``MetaData`` (a lightweight ``table()``, as alembic data migrations
    write them): their foreign keys tell what the write cascades to."""
    bare = {
        bare_table(t.name.lower())
        for t in found
        if getattr(t, "metadata", None) is None and getattr(t, "name", None)
    }
    if not bare:
        return found
    from ._compat import mapped_metadata

    mapped = [t for metadata in mapped_metadata() for t in metadata.tables.values() if bare_table(t.name.lower()) in bare]
    return [*found, *(t for t in mapped if t not in found)]


def _text_cascades(names: set[str]) -> set[Any]:
    """The tables a textual write of the tables ``names`` may change by
    their foreign keys' actions, as far as the mapped ``MetaData`` tell."""
    from ._compat import mapped_metadata

    # by bare name, as version keys name tables (``db.parent`` written from
    # another database's engine is the ``parent`` a model maps unqualified)
    bare = {bare_table(n) for n in names}
    found = [
        t
        for metadata in mapped_metadata()
        for t in metadata.tables.values()
        if bare_table(t.name.lower()) in bare
    ]
    if not found:
        return set()
    return _cascades(found, True, None) | _cascades(found, False, None)


def _set_columns(stmt: Any) -> list[Any]:
    """What an UPDATE statement's ``values()`` set: columns, or names."""
    keys = list(getattr(stmt, "_values", None) or ())
    keys.extend([key for key, _ in getattr(stmt, "_ordered_values", None) or ()])
    return keys


def _set_keys(compiled: Any, stmt: Any) -> set[str] | None:
    """The columns an UPDATE sets (keys), as far as can be told: those of
    its parameters and of its ``values()``; None when none can be."""
    keys = set(getattr(compiled, "column_keys", None) or ())
    for key in _set_columns(stmt):
        keys.add(getattr(key, "key", key))
    return keys or None


def _cascades(tables: Iterable[Any], deleted: bool, keys: set[str] | None) -> set[Any]:
    """Tables of the same ``MetaData`` whose rows the database changes when
    rows of ``tables`` are deleted (``deleted``) or have the columns
    ``keys`` updated (None: any column), by their foreign keys' ``ON
    DELETE`` / ``ON UPDATE`` actions, followed transitively."""
    out: set[Any] = set()
    todo = [(t, deleted, keys) for t in tables if getattr(t, "metadata", None) is not None]
    seen: set[Any] = set()
    while todo:
        table, deleting, changed = todo.pop()
        marker = (table, deleting, None if changed is None else frozenset(changed))
        if marker in seen:
            continue
        seen.add(marker)
        for child, fk in _referencing(table):
            action = str((fk.ondelete if deleting else fk.onupdate) or "").upper()
            if action not in _REFERENTIAL:
                continue
            if not deleting and changed is not None and fk.column.key not in changed:
                continue
            out.add(child)
            if deleting and action == "CASCADE":
                todo.append((child, True, None))
            else:  # the child's foreign key columns change
                todo.append((child, False, {fk.parent.key}))
    return out


def _referencing(table: Any) -> tuple[Any, ...]:
    """(table, foreign key) of every foreign key of ``table``'s
    ``MetaData`` that references it, remembered until tables are added."""
    metadata = table.metadata
    size = len(metadata.tables)
    memo = table.__dict__.get("_ormcache_referencing")
    if memo is not None and memo[0] == size:
        return memo[1]  # type: ignore[no-any-return]
    found = tuple(
        [
            (other, fk)
            for other in metadata.tables.values()
            for fk in other.foreign_keys
            if fk.references(table)
        ]
    )
    table._ormcache_referencing = (size, found)  # lives and dies with the table
    return found

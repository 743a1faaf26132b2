"""Cache keys: what makes two executions of a query the same result.

A key covers everything that changes what a SELECT returns:

* the statement's SQL, compiled once per statement *shape* (SQLAlchemy's
  structural cache key) and remembered in a bounded LRU;
* every bound parameter, including those given at execute time, expanding
  ``IN`` lists and values captured by lambda statements;
* the database the statement runs on (:func:`database_id`), the shard or
  identity token, and the ``schema_translate_map``;
* the region and the key namespace.

The parts are hashed, so a key is always ``len(namespace) + 35`` characters,
well inside memcached's 250-byte limit.  The private SQLAlchemy calls hide in
:mod:`ormcache._compat`.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import re
import threading
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from sqlalchemy import Column
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.pool import SingletonThreadPool
from sqlalchemy.sql import util as sql_util
from sqlalchemy.sql import visitors
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import BinaryExpression, BindParameter, ColumnClause, TextClause
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import Alias
from sqlalchemy.util import LRUCache

from . import _compat
from .exc import CacheKeyError

__all__ = [
    "StatementShape",
    "ShapeCache",
    "database_id",
    "digest",
    "table_name",
]

#: Execution option naming a database explicitly.  Set it on an engine when
#: its URL alone does not say which database it is (for example two hosts
#: that each keep their own copy of the same SQLite file path)::
#:
#:     engine = create_engine(url).execution_options(ormcache_database="eu-1")
DATABASE_OPTION = "ormcache_database"

_PROCESS = uuid.uuid4().hex[:12]
_engine_ids: weakref.WeakKeyDictionary[Engine, Any] = weakref.WeakKeyDictionary()
_engine_ids_lock = threading.Lock()


def digest(text: str, size: int = 16) -> str:
    """A stable hex digest of ``text`` (``2 * size`` characters)."""
    return hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=size
    ).hexdigest()


def database_id(bind: Engine | Connection) -> str:
    """A string naming the database ``bind`` talks to, the same in every
    process that reaches the same database.

    * A file SQLite database is its real path; an in-memory one is private to
      its connection pool (each ``create_engine("sqlite://")`` is a new
      database; ``engine.execution_options(...)`` shares its engine's; on a
      ``SingletonThreadPool`` each thread has its own); a
      named shared-cache memory database (``file:NAME?mode=memory``) is
      shared by the engines of one process.
    * A server database is ``dialect://host:port/database`` (the dialect's
      default port when the URL names none), and for PostgreSQL the
      ``search_path`` its URL sets (``?options=-csearch_path%3Dtenant``):
      two engines whose connections see different tables under one name
      are two databases; and the URL's other session settings
      (``-c timezone=...``), for result keys only.  The user name and password do not count.  A
      ``search_path`` set otherwise (``connect_args``, a connect event,
      the role's own schema) is not seen: name such databases with the
      execution option below, or use ``schema_translate_map``.
    * The execution option ``ormcache_database`` overrides all of this.
    """
    engine = bind.engine
    try:
        ident = _engine_ids[engine]
    except KeyError:
        computed = _compute_database_id(engine)
        with _engine_ids_lock:
            ident = _engine_ids.setdefault(engine, computed)
    if ident.__class__ is str:
        return ident  # type: ignore[no-any-return]
    return ident.ident  # type: ignore[no-any-return]  # (_PerThread)


def per_thread_database(engine: Engine) -> bool:
    """Whether ``engine`` reaches a database of each thread's own (an
    in-memory SQLite database on a ``SingletonThreadPool``)."""
    return isinstance(_engine_ids.get(engine), _PerThread)


class _PerThread(threading.local):
    """The id of an in-memory SQLite database on a ``SingletonThreadPool``
    (``create_engine("sqlite://")``'s pool): each thread has a connection,
    and a database, of its own."""

    def __init__(self) -> None:
        self.ident = f"sqlite-mem:{uuid.uuid4().hex}"


#: what precedes a PostgreSQL URL's ``search_path`` in a database id
#: (result keys keep it; version keys leave it out, see invalidation)
SEARCH_PATH_MARK = "#search_path="
#: a qualifier of a database id that result keys keep and version keys
#: leave out: ``#search_path=...``, ``#options=...`` (the other settings a
#: PostgreSQL URL's ``options`` gives its sessions), or one of a name given
#: with ``ormcache_database`` (``app#timezone=Asia/Tokyo``)
RESULT_QUALIFIER = re.compile(r"#\w+=")
#: ports servers listen on when a URL names none, by SQLAlchemy backend name
_DEFAULT_PORTS = {
    "postgresql": 5432,
    "mysql": 3306,
    "mariadb": 3306,
    "mssql": 1433,
    "oracle": 1521,
    "cockroachdb": 26257,
}
#: URL query parameters that name the server or database (libpq, the
#: MySQL drivers, cx_Oracle/oracledb, pyodbc)
_TARGET_QUERY_KEYS = frozenset(
    {"host", "hostaddr", "port", "dbname", "database", "unix_socket", "service", "service_name", "sid", "odbc_connect"}
)
#: in-memory SQLite ids by connection pool (engines made by
#: ``execution_options()`` share their engine's pool, and its database)
_memory_ids: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _compute_database_id(engine: Engine) -> Any:
    explicit = engine.get_execution_options().get(DATABASE_OPTION)
    if explicit:
        return f"named:{explicit}"
    url = engine.url
    backend = url.get_backend_name()
    if backend == "sqlite":
        sqlite_db = url.database or ""
        if str(url.query.get("uri", "")).lower() in ("true", "1") and sqlite_db.startswith("file:"):
            # a SQLite URI: its parameters are in the URL's query (SQLAlchemy
            # hands them to SQLite) or already in the name
            path, _, embedded = sqlite_db.partition("?")
            params = dict(parse_qsl(embedded))
            params.update((k, v) for k, v in url.query.items() if isinstance(v, str))
            path = path.removeprefix("file:")
            if path.startswith("//"):  # file://[localhost]/absolute/path
                path = "/" + path[2:].partition("/")[2]
            path = unquote(path)
            if params.get("mode") == "memory":
                if params.get("cache") == "shared" and path:
                    return f"sqlite-shm:{_PROCESS}:{path}"
                return _memory_id(engine)
            sqlite_db = path
        if not sqlite_db or sqlite_db == ":memory:":
            return _memory_id(engine)
        return "sqlite:" + os.path.realpath(sqlite_db)
    query: dict[str, Any] = dict(url.query)
    host: str | None = url.host
    port: int | str | None = url.port
    database: str | None = url.database
    # a server or database the URL's query names where its netloc names none
    # (libpq's ``@/test?host=127.0.0.1``) is the one ``127.0.0.1/test`` names
    if not host and _single(query.get("host")) and not str(query["host"]).startswith("/"):
        host = str(query.pop("host"))
    if not url.port and _single(query.get("port")) and str(query["port"]).isdigit():
        port = int(query.pop("port"))
    if not database:
        # (PyMySQL and mysqlclient also take ``db=``)
        for key in ("dbname", "database", "db") if backend in ("mysql", "mariadb") else ("dbname", "database"):
            if _single(query.get(key)):
                database = str(query.pop(key))
                break
    port = port or _DEFAULT_PORTS.get(backend) or ""
    ident = f"{backend}://{host or ''}:{port}/{database or ''}"
    # the server and database a driver takes from the URL's query instead
    # (libpq's host=/port=/dbname=, a Unix socket's path)
    targets = sorted((k, str(v)) for k, v in query.items() if k in _TARGET_QUERY_KEYS)
    if targets:
        ident += "?" + "&".join(f"{k}={v}" for k, v in targets)
    if backend != "postgresql":
        return ident
    search_path = _url_search_path(url)
    if search_path:
        ident += f"{SEARCH_PATH_MARK}{search_path}"
    others = _url_session_options(url)
    return f"{ident}#options={others}" if others else ident


def _single(value: Any) -> bool:
    """A URL query value naming one thing (not several hosts)."""
    return isinstance(value, str) and bool(value) and "," not in value


def _memory_id(engine: Engine) -> Any:
    with _engine_ids_lock:
        ident = _memory_ids.get(engine.pool)
        if ident is None:
            if isinstance(engine.pool, SingletonThreadPool):
                ident = _PerThread()
            else:
                ident = f"sqlite-mem:{uuid.uuid4().hex}"
            _memory_ids[engine.pool] = ident
        return ident


def _url_session_options(url: Any) -> str | None:
    """The settings other than ``search_path`` a PostgreSQL URL's
    ``options`` gives its sessions (``-c timezone=Asia/Tokyo``: dates,
    ``to_char()`` and ``extract()`` come out otherwise), as written and in
    order; None when there are none."""
    options = url.query.get("options")
    if isinstance(options, tuple):
        options = " ".join(options)
    if not options:
        return None
    rest = re.sub(r"(?:-c\s*|--)?search_path\s*=\s*\S+", " ", str(options))
    rest = " ".join(rest.split())
    return rest if rest not in ("", "-c", "--") else None


def _url_search_path(url: Any) -> str | None:
    """The ``search_path`` a PostgreSQL URL sets for its connections
    (``?options=-csearch_path%3Dtenant``), as written; None when it sets
    none.  Read from the URL only: nothing is asked of the server."""
    options = url.query.get("options")
    if isinstance(options, tuple):
        options = " ".join(options)
    if not options:
        return None
    found = re.search(r"search_path\s*=\s*(\S+)", str(options))
    return found.group(1).replace("\\", "") if found else None


def table_name(
    name: str,
    schema: str | None,
    schema_translate_map: Mapping[str | None, str | None] | None = None,
    default_schema: str | None = None,
) -> str:
    """The name versions are kept under for a table: lower case,
    schema-qualified unless in the default schema."""
    if schema_translate_map and schema in schema_translate_map:
        schema = schema_translate_map[schema]
    if schema and schema != default_schema:
        return f"{schema}.{name}".lower()
    return name.lower()


@dataclass(slots=True)
class StatementShape:
    """What ormcache knows of one statement shape, kept per process."""

    sql: str
    #: tables read, as :func:`table_name` gives them, schema untranslated;
    #: empty when they cannot be known (textual SQL)
    tables: tuple[tuple[str, str | None], ...]
    #: the mapper the fast hit path can build (see ``_loading``), or None
    mapper: Any = None
    #: selects columns only: the fast hit path builds its rows
    #: (``_loading.ColumnsPlan``)
    columns: bool = False
    #: fast-path plans by ``id(dialect)``: (a weak reference to the
    #: dialect, a ``_loading.Plan`` or False when the statement turned out
    #: not to fit); see :meth:`plan`
    plans: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    #: a digest of ``sql``, what keys are made of
    sql_digest: str = ""
    #: ``tables`` resolved by default schema, when no schema_translate_map
    resolved: dict[tuple[str, str | None], tuple[str, ...]] = field(default_factory=dict)
    #: for a primary-key lookup (``Session.get``, a many-to-one lazy load):
    #: the bound parameter names of the key columns, their Python types,
    #: and the tables of the entity
    get_params: tuple[str, ...] | None = None
    get_types: tuple[type, ...] = ()
    #: for ``select(Model).where(Model.pk == value)``: the position of the
    #: value among the statement's bound parameters (:func:`parameter_values`)
    get_index: int | None = None
    get_tables: tuple[tuple[str, str | None], ...] = ()
    #: what statistics count this statement under: its entity, else its tables
    label: str = ""
    #: calls a function whose result changes between executions (now(),
    #: random(), ...), or embeds textual SQL that may: never cached in
    #: cache-everything mode
    volatile: bool = False
    #: embeds textual SQL that may read tables besides ``tables`` (a
    #: subquery in ``text()``): such a result depends on every write to its
    #: database, as one whose tables are not known at all
    opaque: bool = False
    #: a SELECT in it locks rows (``with_for_update()`` in a subquery or a
    #: CTE): never served from the cache, as a locking statement is not
    locking: bool = False
    #: the number of columns its compiled SQL selects (0: not known, as for
    #: textual SQL): an entry of another width is never replayed
    width: int = 0

    def __post_init__(self) -> None:
        self.sql_digest = digest(self.sql)

    def plan(self, dialect: Dialect) -> Any:
        """The fast-path plan for ``dialect`` (its result processors), False
        when the statement does not fit, None when not made yet.  Kept by
        the dialect's id, checked to be that dialect still: a new engine's
        dialect may take a freed one's address."""
        if self.mapper is None and not self.columns:
            return False
        found = self.plans.get(id(dialect))
        if found is None or found[0]() is not dialect:
            return None
        return found[1]

    def set_plan(self, dialect: Dialect, plan: Any) -> None:
        self.plans[id(dialect)] = (weakref.ref(dialect), plan or False)

    def table_names(
        self,
        schema_translate_map: Mapping[Any, Any] | None,
        default_schema: str | None,
        which: str = "tables",
    ) -> tuple[str, ...]:
        """The tables read (``which="get_tables"``: those of the entity of
        a primary-key lookup), as version keys name them; memoized when no
        ``schema_translate_map`` applies."""
        pairs = getattr(self, which)
        if schema_translate_map is None:
            names = self.resolved.get((which, default_schema))
            if names is None:
                names = self.resolved[(which, default_schema)] = tuple(
                    table_name(n, s, None, default_schema) for n, s in pairs
                )
            return names
        return tuple(table_name(n, s, schema_translate_map, default_schema) for n, s in pairs)


class ShapeCache:
    """A bounded map from SQLAlchemy's structural cache key to
    :class:`StatementShape` (SQLAlchemy's own recipe keeps an unbounded
    dict)."""

    def __init__(self, capacity: int = 1000) -> None:
        self._shapes: LRUCache[Any, StatementShape] = LRUCache(capacity)

    def shape(self, cache_key: Any, statement: Any, dialect: Dialect) -> StatementShape:
        """The shape of ``statement`` compiled for ``dialect``: the same
        statement's SQL differs between dialects (PostgreSQL's DISTINCT ON
        is a plain DISTINCT elsewhere), and keys are made of it."""
        memo = (cache_key.key, _dialect_kind(dialect))
        shape = self._shapes.get(memo)
        if shape is None:
            shape = self._shapes[memo] = _describe(statement, dialect, cache_key)
        return shape

    def __len__(self) -> int:
        return len(self._shapes)


def _dialect_kind(dialect: Dialect) -> tuple[Any, ...]:
    """What a statement's compiled SQL depends on in ``dialect``: dialects
    of one kind (the engines of many shards) share statement shapes."""
    kind: tuple[Any, ...] | None = getattr(dialect, "_ormcache_kind", None)
    if kind is None:
        kind = (
            row_format(dialect),
            getattr(dialect, "server_version_info", None),
            dialect.paramstyle,
            dialect.label_length,
            dialect.max_identifier_length,
        )
        if kind[1] is not None:  # (known once the engine first connected)
            try:
                dialect._ormcache_kind = kind  # type: ignore[attr-defined]
            except AttributeError:
                pass
    return kind


#: dialect settings that change what its driver returns for a column, the
#: raw rows an entry holds (``create_engine(native_datetime=True)`` on
#: SQLite, a ``json_deserializer`` that psycopg2, psycopg, asyncpg and
#: pg8000 apply themselves, psycopg2's ``use_native_hstore``)
_ROW_FORMAT_SETTINGS = ("native_datetime", "_json_deserializer", "use_native_hstore")


def row_format(dialect: Dialect) -> str:
    """What the raw rows of ``dialect``'s driver depend on, as the same
    text in every process: its dialect class (the driver: asyncpg returns
    ``INET`` as a string, psycopg2 as an address; psycopg2 cannot read
    asyncpg's ranges) and :data:`_ROW_FORMAT_SETTINGS`.  Part of every
    result key, so engines that read one database through different
    drivers or settings never replay each other's rows.  Kept on the
    dialect (its settings do not change once it is made)."""
    found: str | None = getattr(dialect, "_ormcache_rows", None)
    if found is not None:
        return found
    cls = type(dialect)
    parts = [f"{cls.__module__}.{cls.__qualname__}"]
    for name in _ROW_FORMAT_SETTINGS:
        value = getattr(dialect, name, None)
        if value is not None and value is not False:
            parts.append(f"{name}={_stable_text(value)}")
    found = " ".join(parts)
    try:
        dialect._ormcache_rows = found  # type: ignore[attr-defined]
    except AttributeError:
        pass
    return found


def _stable_text(value: Any) -> str:
    """``value`` as text that is the same in every process and tells
    apart values that act differently: a function by its module and
    qualified name (a lambda or a nested one by where it is written too),
    a ``functools.partial`` by its function and arguments."""
    if isinstance(value, functools.partial):
        arguments = [*map(_stable_text, value.args), *(f"{k}={_stable_text(v)}" for k, v in sorted(value.keywords.items()))]
        return f"partial({_stable_text(value.func)}, {', '.join(arguments)})"
    if isinstance(value, (bool, int, float, str)) or value is None:
        return repr(value)
    name = getattr(value, "__qualname__", None)
    if name is None:  # (an instance: its repr, unless that is its address)
        text = repr(value)
        return text if " at 0x" not in text else f"{type(value).__module__}.{type(value).__qualname__}"
    text = f"{getattr(value, '__module__', '?')}.{name}"
    code = getattr(value, "__code__", None)
    if code is not None and "<" in name:  # <lambda>, <locals>
        text += f"@{code.co_filename}:{code.co_firstlineno}"
    return text


def _describe(statement: Any, dialect: Dialect, cache_key: Any = None) -> StatementShape:
    compiled = statement.compile(dialect=dialect)
    core = getattr(getattr(compiled, "compile_state", None), "statement", None)
    if core is None:
        core = compiled.statement
    found = sql_util.find_tables(
        core,
        check_columns=True,
        include_aliases=True,
        include_joins=True,
        include_selects=True,
    )
    tables = sorted(
        {
            (t.name, getattr(t, "schema", None))
            for t in found
            if getattr(t, "name", None)
        },
        key=lambda t: (t[0], t[1] or ""),
    )
    from ._loading import eligible_columns, eligible_mapper

    volatile, opaque, locking, textual = _traits(core)
    shape = StatementShape(
        # (textual SQL may select more than it names: "*", "SELECT ... ")
        width=0 if textual else len(getattr(compiled, "_result_columns", None) or ()),
        sql=str(compiled) + _bind_types(cache_key) + "\n-- rows: " + row_format(dialect),
        tables=tuple(tables),
        mapper=eligible_mapper(statement),
        columns=eligible_columns(statement),
        volatile=volatile,
        opaque=opaque,
        locking=locking,
    )
    if not opaque:
        aliased = {_aliased_table(t) for t in found if isinstance(t, Alias)}
        _describe_get(statement, shape, cache_key, aliased, dialect)
    try:
        entity = statement.column_descriptions[0].get("entity")
    except (AttributeError, IndexError):
        entity = None
    shape.label = getattr(entity, "__name__", None) or ",".join(t for t, _ in shape.tables) or "?"
    return shape


#: SQL functions whose result changes from one execution to the next
VOLATILE_FUNCTIONS = frozenset(
    """now random rand current_timestamp current_date current_time localtime
    localtimestamp sysdate sysdatetime getdate getutcdate utc_timestamp
    utc_date utc_time curdate curtime clock_timestamp statement_timestamp
    transaction_timestamp timeofday uuid gen_random_uuid uuid_generate_v1
    uuid_generate_v4 newid random_uuid nextval currval lastval setval
    last_insert_rowid last_insert_id changes total_changes txid_current
    pg_backend_pid connection_id unix_timestamp datetime julianday strftime
    date time""".split()
)
_VOLATILE_TEXT = re.compile(
    r"\b(" + "|".join(sorted(VOLATILE_FUNCTIONS, key=len, reverse=True)) + r")\s*\(|"
    r"\bcurrent_(timestamp|date|time)\b",
    re.IGNORECASE,
)


#: textual SQL that may read tables SQLAlchemy does not see: a subquery
#: (``id IN (SELECT user_id FROM banned)``, ``TABLE banned``)
_READS_TABLES = re.compile(r"\b(select|table)\b", re.IGNORECASE)
#: a locking clause written as SQL (a suffix, a text() fragment)
_LOCKING_TEXT = re.compile(
    r"\bfor\s+(?:no\s+key\s+)?(?:update|share|key\s+share)\b|\block\s+in\s+share\s+mode\b",
    re.IGNORECASE,
)


def _bind_types(cache_key: Any) -> str:
    """The types of the statement's bound parameters, in the order their
    values are keyed (:func:`parameter_values`), as a comment to its SQL:
    two statements whose SQL and values are equal send different values
    when their binds' types process them differently (a TypeDecorator, an
    Enum stored by name or by value)."""
    types = []
    for bind in getattr(cache_key, "bindparams", None) or ():
        kind = bind.type
        text = repr(kind)
        if " at 0x" in text:  # (not the same from one process to the next)
            text = f"{type(kind).__module__}.{type(kind).__qualname__}"
        types.append(text)
    return "\n-- binds: " + ", ".join(types) if types else ""


def _aliased_table(alias: Any) -> tuple[Any, Any]:
    """(name, schema) of the table an alias (of an alias...) reads."""
    element = alias
    while isinstance(element, Alias):
        element = getattr(element, "element")  # noqa: B009
    return getattr(element, "name", None), getattr(element, "schema", None)


def _text_from(element: Any) -> bool:
    """Whether ``element`` (a SELECT or a join) reads FROM a ``text()``."""
    froms = getattr(element, "_from_obj", None)
    if froms and any(isinstance(f, TextClause) for f in froms):
        return True
    if hasattr(element, "onclause"):  # a Join
        return isinstance(element.left, TextClause) or isinstance(element.right, TextClause)
    return False


#: words that make a textual statement more than a read wherever they
#: appear (also as a column's name: such a statement is run, not cached),
#: and functions known to change something (sequences, locks, settings,
#: notifications) in its SELECT list
_NOT_ONLY_A_READ = re.compile(
    r"\b(?:insert|update|delete|merge|upsert|into|call|exec|execute|copy|create|drop|alter|"
    r"truncate|grant|revoke|nextval|setval|lastval|currval|lock|next\s+value\s+for|"
    r"\w*(?:advisory|get_lock|release_lock|release_all_locks|notify|set_config|setseed|"
    r"sleep|last_insert_id|txid_current)\w*)\b",
    re.IGNORECASE,
)


def _text_wrappers() -> frozenset[type]:
    from sqlalchemy.orm.context import FromStatement
    from sqlalchemy.sql.selectable import TextualSelect

    return frozenset({FromStatement, TextualSelect})


_TEXT_WRAPPERS = _text_wrappers()


def textual_read(statement: Any) -> bool | None:
    """For SQL written as text, run as a statement of its own (``text()``,
    ``text().columns()``, ``select(Model).from_statement(text(...))``):
    whether it is one SELECT (or ``WITH ... SELECT``, ``VALUES``) that does
    nothing else: no second statement, no ``INTO``, no locking clause, no
    data-modifying CTE, no sequence or other function known to change
    something, by :data:`_NOT_ONLY_A_READ`.  SQLAlchemy calls the first and
    the last no SELECT, the second a SELECT: it cannot know.  None for
    other statements."""
    element: Any = statement
    for _ in range(3):  # FromStatement -> TextualSelect -> TextClause
        if isinstance(element, TextClause):
            break
        if element.__class__ not in _TEXT_WRAPPERS:
            return None
        element = getattr(element, "element")  # noqa: B009
    else:
        return None
    sql = element.text.strip().rstrip(";").strip()
    if ";" in sql:
        return False
    first = sql.split(None, 1)
    if not first or first[0].lower().lstrip("(") not in ("select", "with", "values"):
        return False
    return _NOT_ONLY_A_READ.search(sql) is None


def _traits(core: Any) -> tuple[bool, bool, bool, bool]:
    """Whether the statement is volatile (see :attr:`StatementShape.volatile`),
    whether textual SQL in it (``text()``, ``literal_column()``) may
    read tables that its known tables do not include (``opaque``), and
    whether a SELECT in it locks rows (``locking``), and whether it holds
    textual SQL at all (``textual``)."""
    volatile = opaque = locking = textual = False
    for element in visitors.iterate(core):
        if getattr(element, "_for_update_arg", None) is not None:
            locking = True  # FOR UPDATE / FOR SHARE in a subquery or CTE
        for clause, _ in (*getattr(element, "_prefixes", ()), *getattr(element, "_suffixes", ())):
            if _LOCKING_TEXT.search(str(getattr(clause, "text", clause))):
                locking = True  # suffix_with("FOR UPDATE SKIP LOCKED")
        if not opaque and _text_from(element):
            opaque = True  # text() as a FROM (select_from, join): a table by any name
        if isinstance(element, FunctionElement):
            if str(getattr(element, "name", "")).lower() in VOLATILE_FUNCTIONS:
                volatile = True
            continue
        if isinstance(element, TextClause):
            text = element.text
        elif isinstance(element, ColumnClause) and element.is_literal:
            text = str(element.name)
        else:
            continue
        textual = True
        volatile = volatile or _VOLATILE_TEXT.search(text) is not None
        opaque = opaque or _READS_TABLES.search(text) is not None
        locking = locking or _LOCKING_TEXT.search(text) is not None
    return volatile, opaque, locking, textual


def _describe_get(
    statement: Any,
    shape: StatementShape,
    cache_key: Any = None,
    aliased: set[tuple[Any, Any]] | frozenset[tuple[Any, Any]] = frozenset(),
    dialect: Any = None,
) -> None:
    """Fill in ``get_*`` when ``statement`` looks an entity up by its
    primary key, the way ``Session.get`` and lazy loaders build it, or as
    ``select(Model).where(Model.pk == value)`` (one key column, one table).
    ``aliased``: (name, schema) of the tables the statement reads under an
    alias: when one is the entity's own (a self-referential joined eager
    load, an aliased self-join), it reads other rows of its table, and
    depends on the whole table."""
    try:
        descriptions = statement.column_descriptions
        criteria = statement._where_criteria
    except AttributeError:
        return
    if len(descriptions) != 1 or len(criteria) != 1:
        return
    entity = descriptions[0].get("entity")
    if entity is None or descriptions[0].get("expr") is not entity:
        return
    mapper = getattr(entity, "__mapper__", None)
    if mapper is None:
        return
    if aliased and any((t.name, t.schema) in aliased for t in mapper.tables):
        return
    for prop in mapper.column_attrs:
        # a mapped SQL expression may read other rows of the table
        if not all(isinstance(col, Column) for col in prop.columns):
            return
    whole_key = tuple(range(len(mapper.primary_key)))
    for table in mapper.tables:
        # each table's rows must be named by the mapper's key, as writes
        # through any mapper of the table name them (a class mapped to a
        # join of tables is not)
        if table_pk_positions(mapper, table) != whole_key:
            return
    get_clause, get_params = mapper._get_clause
    index = None
    if not get_clause.compare(criteria[0]):
        index = _pk_bind_index(mapper, criteria[0], cache_key)
        if index is None:
            return
    types = []
    for col in mapper.primary_key:
        kind = _row_addressable(col.type, dialect)
        if kind is None:
            return
        types.append(kind)
    shape.get_params = tuple(get_params[col].key for col in mapper.primary_key)
    shape.get_types = tuple(types)
    shape.get_index = index
    shape.get_tables = tuple(
        (t.name, getattr(t, "schema", None)) for t in mapper.tables if getattr(t, "name", None)
    )


def _row_addressable(type_: Any, dialect: Any) -> type | None:
    """The Python type of a key column's values when a lookup by it may
    depend on its row: when a lookup and a write of one row always spell
    its key alike (see ``invalidation.pk_text``).  None when the database
    may take two spellings for one row: numbers it rounds to a scale
    (``Numeric``), times and timestamps it reads in a zone of its own,
    strings a ``TypeDecorator`` or a ``Uuid(as_uuid=False)`` rewrites, or a
    collation of MySQL, MariaDB or SQL Server matches ('ß' = 's')."""
    from sqlalchemy import Date, Integer, String, TypeDecorator, Uuid
    from sqlalchemy import Enum as EnumType

    if isinstance(type_, TypeDecorator):
        return None
    try:
        kind = type_.python_type
    except NotImplementedError:
        return None
    if kind is int and isinstance(type_, Integer):
        return int
    if kind is str and isinstance(type_, String) and not isinstance(type_, EnumType):
        return None if getattr(dialect, "name", None) in _COLLATING_DIALECTS else str
    if kind is uuid.UUID and isinstance(type_, Uuid):
        return kind
    if kind is datetime.date and isinstance(type_, Date):
        return kind
    return None


#: dialects whose default collations compare strings case- and
#: accent-insensitively by rules of their own: lookups by a string key
#: depend on their whole table
_COLLATING_DIALECTS = frozenset({"mysql", "mariadb", "mssql"})


def table_pk_types(mapper: Any, table: Any) -> tuple[type, ...] | None:
    """The Python types of ``table``'s primary key columns, in the order
    of :func:`table_pk_positions` (None when one has none): what a primary
    key lookup's values must be exactly to depend on their row."""
    memo = mapper.__dict__.get("_ormcache_pk_types")
    if memo is None:
        memo = mapper._ormcache_pk_types = {}  # lives and dies with the mapper
    found = memo.get(table, _MISSING)
    if found is _MISSING:
        try:
            found = tuple(col.type.python_type for col in table.primary_key)
        except (NotImplementedError, AttributeError):
            found = None
        memo[table] = found
    return found  # type: ignore[no-any-return]


def table_pk_positions(mapper: Any, table: Any) -> tuple[int, ...] | None:
    """Where the primary key columns of ``table`` (one of ``mapper``'s
    tables) sit in the mapper's primary key, by the attribute they are
    mapped to; None when one is not part of it (a class mapped to a join
    of tables, a mapper given its own ``primary_key``)."""
    memo = mapper.__dict__.get("_ormcache_pk_positions")
    if memo is None:
        memo = mapper._ormcache_pk_positions = {}  # lives and dies with the mapper
    found = memo.get(table, _MISSING)
    if found is _MISSING:
        found = None
        try:
            keys = [mapper.get_property_by_column(c).key for c in mapper.primary_key]
            cols = list(table.primary_key)
            if cols:
                found = tuple([keys.index(mapper.get_property_by_column(c).key) for c in cols])
        except Exception:  # an unmapped column, a key not among the mapper's
            found = None
        memo[table] = found
    return found  # type: ignore[no-any-return]


_MISSING: Any = object()


def _pk_bind_index(mapper: Any, criterion: Any, cache_key: Any) -> int | None:
    """For ``pk_column == <bound value>`` on a mapper of one table and one
    key column: the value's position among ``cache_key``'s bound
    parameters; else None."""
    if cache_key is None or len(mapper.primary_key) != 1 or len(mapper.tables) != 1:
        return None
    if not isinstance(criterion, BinaryExpression) or criterion.operator is not operators.eq:
        return None
    pk = mapper.primary_key[0]
    for column, bind in ((criterion.left, criterion.right), (criterion.right, criterion.left)):
        if (
            isinstance(bind, BindParameter)
            and not bind.expanding
            and isinstance(column, ColumnClause)
            and column.compare(pk)
        ):
            for i, bp in enumerate(cache_key.bindparams):
                if bp is bind:
                    return i
    return None


def parameter_values(cache_key: Any, parameters: Mapping[str, Any] | None) -> tuple[Any, ...]:
    """The values of every bound parameter, in statement order; values given
    at execute time win over those in the statement."""
    params = parameters or {}
    given = getattr(cache_key, "params", None)  # Select.params() (SQLAlchemy 2.1)
    if given:
        params = {**given, **params}
    if not cache_key.bindparams:
        return tuple((k, params[k]) for k in sorted(params))
    return tuple(
        [
            params[bp.key] if bp.key in params else _compat.bind_value(bp)
            for bp in cache_key.bindparams
        ]
    )


#: the end of an object's default repr, its memory address: <Foo object at 0x7f...>
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+>")


def _unstable(value: Any) -> bool:
    """Whether ``value``'s repr shows an object's memory address (a string
    that says so is an ordinary value)."""
    if value is None or isinstance(value, (str, bytes, int, float)):
        return False
    if isinstance(value, (tuple, list, frozenset, set)):
        return any(map(_unstable, value))
    if isinstance(value, dict):  # (a JSON value)
        return any(map(_unstable, value)) or any(map(_unstable, value.values()))
    return _ADDRESS.search(repr(value)) is not None


def query_key(
    namespace: str,
    region: str,
    database: str,
    shard: Any,
    schema_translate_map: Mapping[Any, Any] | None,
    sql: str,
    params: tuple[Any, ...] | None,
    user_key: str | None,
    variant: str | None = None,
) -> str:
    """The backend key of one query result.

    Raises :class:`~ormcache.exc.CacheKeyError` when a parameter has no
    stable text form (its ``repr`` shows a memory address)."""
    schema = sorted(schema_translate_map.items(), key=repr) if schema_translate_map else None
    if user_key is not None:
        # (the SQL too: one name given to two statements must not give one
        # the other's rows, of another shape)
        text = repr((region, database, shard, schema, "user", user_key, sql))
    else:
        text = repr((region, database, shard, schema, sql, params))
        if variant is not None:
            text += variant
        if " at 0x" in text and any(map(_unstable, (shard, schema, *(params or ())))):
            raise CacheKeyError(
                "a bound parameter of this statement has no stable text form "
                f"(its repr shows a memory address): {text[-200:]!r}; pass "
                "FromCache(cache_key=...) to name the result yourself"
            )
    return f"{namespace}:q:{digest(text)}"

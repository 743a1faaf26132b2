"""The 101 SQLite databases and the ``ShardedSession`` over them.

Each shard is one SQLite file, ``s000.db`` .. ``s100.db``, in a data
directory; its shard id is the file's stem.  :func:`make_sessionmaker`
puts SQLAlchemy's :class:`~sqlalchemy.ext.horizontal_shard.ShardedSession`
on top::

    engines = create_engines(data_dir)            # {"s000": Engine, ...}
    Session = make_sessionmaker(engines)
    with Session() as session:
        session.get(Template, 4711, identity_token="s042")

The choosers encode what the application knows:

* a template's shard cannot be derived from its id, so a lookup by primary
  key without an ``identity_token`` goes to every shard, in shard order;
* a lazy load goes to the shard its parent object came from;
* a statement goes to the shards named by ``set_shard_id(...)`` or the
  ``shards=(...)`` execution option, else to every shard;
* a new object goes to the shard of the object it belongs to (a template to
  its store's shard, an asset to its template's).

:func:`schema_revision` reads the alembic revision every shard is at, for
:meth:`ormcache.OrmCache.use_schema_version`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.horizontal_shard import ShardedSession
from sqlalchemy.orm import ORMExecuteState, sessionmaker
from sqlalchemy.orm.base import instance_state

__all__ = [
    "SHARD_COUNT",
    "SHARD_IDS",
    "SchemaMismatch",
    "create_engines",
    "find_shards",
    "make_sessionmaker",
    "schema_revision",
    "shard_ids",
    "shard_path",
    "sqlite_engine",
]

SHARD_COUNT = 101
_SHARD_FILE = re.compile(r"s\d{3}\.db")


def shard_ids(count: int = SHARD_COUNT) -> tuple[str, ...]:
    """``("s000", "s001", ...)``: the ids of ``count`` shards, in scan order."""
    return tuple(f"s{i:03d}" for i in range(count))


#: the reference deployment's shards, in the order the application scans them
SHARD_IDS = shard_ids()


class SchemaMismatch(RuntimeError):
    """The shards are not all at the same alembic revision (or one has
    none); the message names the shards and says what to run."""


def shard_path(data_dir: str | Path, shard: str) -> Path:
    """The SQLite file of ``shard`` in ``data_dir``."""
    return Path(data_dir) / f"{shard}.db"


def find_shards(data_dir: str | Path) -> dict[str, Path]:
    """The shard files in ``data_dir`` (``s000.db`` ...), by shard id, in
    shard order."""
    found = (p for p in Path(data_dir).iterdir() if _SHARD_FILE.fullmatch(p.name))
    return {p.stem: p for p in sorted(found)}


def sqlite_engine(path: str | Path, *, transactional_ddl: bool = False) -> Engine:
    """An engine on one SQLite file.

    With ``transactional_ddl=True``, ``CREATE``/``ALTER``/``DROP`` take part
    in the connection's transaction, so a rollback undoes them: Python's
    sqlite3 module otherwise commits before DDL, and a migration that
    failed half-way would stay half-applied.  This is SQLAlchemy's
    documented recipe ("Serializable isolation / Savepoints / Transactional
    DDL" in the SQLite dialect docs)."""
    engine = create_engine(f"sqlite:///{path}")
    if transactional_ddl:

        @event.listens_for(engine, "connect")
        def _no_implicit_transactions(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN")

    return engine


def create_engines(data_dir: str | Path, shards: Iterable[str] | None = None) -> dict[str, Engine]:
    """One engine per shard: the given shard ids, or every shard file found
    in ``data_dir``."""
    if shards is None:
        shards = find_shards(data_dir)
        if not shards:
            raise FileNotFoundError(f"no shard databases (s000.db ...) in {data_dir}")
    return {shard: sqlite_engine(shard_path(data_dir, shard)) for shard in shards}


def make_sessionmaker(engines: Mapping[str, Engine], **kw: Any) -> sessionmaker[ShardedSession]:
    """A ``sessionmaker`` of ``ShardedSession`` over ``engines`` (shard id ->
    engine; their order is the scan order)."""
    order = tuple(engines)

    def shard_chooser(mapper: Any, instance: Any, clause: Any = None) -> str:
        if instance is not None:
            for parent in ("store", "template"):
                related = getattr(instance, parent, None)
                if related is not None:
                    token = instance_state(related).identity_token
                    if token is not None:
                        return str(token)
        what = type(instance).__name__ if instance is not None else "this operation"
        raise sa_exc.ArgumentError(
            f"cannot choose a shard for {what}: give a new template a store loaded "
            "from its shard (an asset a template), or pass bind_arguments="
            "{'shard_id': ...}"
        )

    def identity_chooser(
        mapper: Any, primary_key: Any, *, lazy_loaded_from: Any = None, **kw: Any
    ) -> Sequence[str]:
        if lazy_loaded_from is not None:
            return [str(lazy_loaded_from.identity_token)]
        return order

    def execute_chooser(context: ORMExecuteState) -> Sequence[str]:
        # (only a SELECT has load options: lazy_loaded_from raises for DML)
        if context.is_select and context.lazy_loaded_from is not None:
            return [str(context.lazy_loaded_from.identity_token)]
        return tuple(context.execution_options.get("shards", order))

    return sessionmaker(
        class_=ShardedSession,
        shards=dict(engines),
        shard_chooser=shard_chooser,
        identity_chooser=identity_chooser,
        execute_chooser=execute_chooser,
        **kw,
    )


def schema_revision(engines: Mapping[str, Engine] | Iterable[Engine]) -> str:
    """The alembic revision all shards are at, for
    :meth:`ormcache.OrmCache.use_schema_version`.

    ``engines`` maps shard ids to engines (or is a plain iterable of
    engines, for one database).  Raises :class:`SchemaMismatch` naming the
    shards when they are not all at one revision, or when one was never
    migrated."""
    named = (
        dict(engines)
        if isinstance(engines, Mapping)
        else {str(e.url.database or e.url): e for e in engines}
    )
    if not named:
        raise SchemaMismatch("no databases given")
    found: dict[str, list[str]] = {}
    for name, engine in named.items():
        with engine.connect() as conn:
            rows: Sequence[Any] = []
            if inspect(conn).has_table("alembic_version"):
                rows = conn.execute(text("SELECT version_num FROM alembic_version")).all()
        revision = "+".join(sorted(r[0] for r in rows)) or "(none)"
        found.setdefault(revision, []).append(name)
    if len(found) == 1:
        (revision,) = found
        if revision != "(none)":
            return revision
    detail = "; ".join(
        f"{revision} on {_listing(names)}" for revision, names in sorted(found.items())
    )
    raise SchemaMismatch(
        f"the databases are not at one schema revision ({detail}); "
        "bring them all to head with `alembic upgrade head`"
    )


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f" and {len(names) - limit} more"
    return shown

"""Alembic environment for the template store: every shard, or one database.

Which databases (first match wins):

1. ``-x data_dir=DIR``: every shard file in DIR (``s000.db``, ``s001.db``
   ...), in shard order;
2. ``-x url=URL``: one database;
3. the environment variable ``ORMCACHE_DATA_DIR``: as 1;
4. ``sqlalchemy.url`` in alembic.ini (or set on the ``Config``): one
   database.

Each database is migrated in its own transaction, holding every pending
revision: a shard is either left where it was or brought all the way, never
half-way.  SQLite runs DDL inside that transaction (see
:func:`examples.template_store.shards.sqlite_engine`).  A progress line is
printed per database; the first failure stops the run with a
``CommandError`` naming the shard, the shards already migrated and those
not attempted.

Programmatic use passes ``-x`` through ``Config.cmd_opts`` and may set
``config.attributes["configure_logger"] = False`` to leave the caller's
logging alone.

The application's cache: ``-x ormcache_settings=PATH`` (or
``$ORMCACHE_SETTINGS``) names its settings file.  With it, this process
has an ``OrmCache`` while it migrates, so that everything a migration
writes (DDL, ``op.execute``, ``op.bulk_insert``) invalidates what it
touches in the application's shared regions, as any write does: a
downgrade followed by an upgrade, which leaves the revision where it was,
is seen too.  In-process regions of running applications are out of its
reach (they restart on a deploy, or call ``cache.invalidate_all()``).
"""

from __future__ import annotations

import os
import time
from logging.config import fileConfig
from pathlib import Path
from typing import Any

from alembic import context
from alembic.util import CommandError
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import Engine, make_url

from examples.template_store.models import Base
from examples.template_store.shards import find_shards, sqlite_engine

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata

DATA_DIR_VARIABLE = "ORMCACHE_DATA_DIR"


def databases() -> dict[str, str]:
    """Name -> SQLAlchemy URL of every database to migrate, in order."""
    x = context.get_x_argument(as_dictionary=True)
    if x.get("data_dir") and x.get("url"):
        raise CommandError("pass -x data_dir=DIR or -x url=URL, not both")
    data_dir = x.get("data_dir")
    url = x.get("url")
    if not data_dir and not url:
        data_dir = os.environ.get(DATA_DIR_VARIABLE) or None
        url = None if data_dir else config.get_main_option("sqlalchemy.url")
    if data_dir:
        directory = Path(data_dir)
        if not directory.is_dir():
            raise CommandError(f"data directory {directory} does not exist")
        shards = find_shards(directory)
        if not shards:
            raise CommandError(f"no shard databases (s000.db, s001.db ...) in {directory}")
        return {name: f"sqlite:///{path}" for name, path in shards.items()}
    if url:
        return {make_url(url).render_as_string(hide_password=True): url}
    raise CommandError(
        "nothing to migrate: pass -x data_dir=DIR (every shard), -x url=URL (one "
        f"database), set {DATA_DIR_VARIABLE}, or set sqlalchemy.url in alembic.ini"
    )


def engine_for(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        return sqlite_engine(parsed.database, transactional_ddl=True)
    return create_engine(url, poolclass=pool.NullPool)


def _heads(revisions: Any) -> str:
    return ", ".join(revisions) if revisions else "(empty)"


def run_migrations_offline() -> None:
    """``--sql``: the SQL for each database, one after the other."""
    out = config.output_buffer
    for name, url in databases().items():
        if out is not None:
            out.write(f"\n-- {name}\n")
        context.configure(
            url=url,
            target_metadata=target_metadata,
            literal_binds=True,
            render_as_batch=True,
            dialect_opts={"paramstyle": "named"},
        )
        with context.begin_transaction():
            context.run_migrations()


def application_cache() -> tuple[Any, str] | None:
    """The application's ``OrmCache`` and the path of its settings, from
    ``-x ormcache_settings=PATH`` or ``$ORMCACHE_SETTINGS``; None without
    either."""
    x = context.get_x_argument(as_dictionary=True)
    path = x.get("ormcache_settings") or os.environ.get("ORMCACHE_SETTINGS")
    if not path:
        return None
    from ormcache import ConfigurationError, OrmCache

    try:
        return OrmCache.from_settings(path), path
    except ConfigurationError as err:  # alembic's "FAILED: ..." line, not a traceback
        source = "-x ormcache_settings" if x.get("ormcache_settings") else "$ORMCACHE_SETTINGS"
        raise CommandError(f"{source} {path!r}: {err}") from err


def run_migrations_online() -> None:
    targets = databases()
    total = len(targets)
    width = len(str(total))
    done: list[str] = []
    changed: list[str] = []
    application = application_cache()
    try:
        _migrate(targets, total, width, done, changed)
        if application is not None and not changed:
            config.print_stdout("ormcache: no shard changed revision; nothing to invalidate")
        elif application is not None:
            cache, path = application
            failed = cache.write_lost_invalidations()
            if failed:
                raise CommandError(
                    f"the migrations are committed, but invalidations could not be written to "
                    f"region(s) {', '.join(failed)} of {path}: cached results may be stale; "
                    f"once the backend answers, run: ormcache invalidate --all --settings {path}"
                )
            config.print_stdout(f"ormcache: what the migrations wrote is invalidated in the regions of {path}")
    finally:
        if application is not None:
            application[0].close()


def _migrate(
    targets: dict[str, str], total: int, width: int, done: list[str], changed: list[str]
) -> None:
    if total > 1:
        config.print_stdout(f"{total} shards")
    for n, (name, url) in enumerate(targets.items(), 1):
        started = time.perf_counter()
        engine = engine_for(url)
        before: Any = ()
        try:
            with engine.connect() as connection, connection.begin():
                context.configure(
                    connection=connection,
                    target_metadata=target_metadata,
                    render_as_batch=True,
                    transactional_ddl=True,
                    transaction_per_migration=False,
                )
                before = context.get_context().get_current_heads()
                with context.begin_transaction():
                    context.run_migrations()
                after = context.get_context().get_current_heads()
        except Exception as err:
            config.print_stdout(f"[{n:>{width}}/{total}] {name}: FAILED, rolled back")
            raise CommandError(_failure(name, before, err, done, list(targets)[n:])) from err
        finally:
            engine.dispose()
        done.append(name)
        if before != after:
            changed.append(name)
        elapsed = time.perf_counter() - started
        change = _heads(after) if before == after else f"{_heads(before)} -> {_heads(after)}"
        config.print_stdout(f"[{n:>{width}}/{total}] {name}: {change} ({elapsed:.2f} s)")


def _failure(name: str, before: Any, err: Exception, done: list[str], left: list[str]) -> str:
    def listing(names: list[str]) -> str:
        if not names:
            return "none"
        if len(names) > 6:
            return f"{', '.join(names[:3])} ... {', '.join(names[-2:])} ({len(names)})"
        return f"{', '.join(names)} ({len(names)})"

    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    still = f"still at {_heads(before)}" if before else "still unversioned"
    return (
        f"migrating shard {name} failed and was rolled back ({still}): "
        f"{type(err).__name__}: {reason}. "
        f"Migrated: {listing(done)}. Not attempted: {listing(left)}."
    )


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

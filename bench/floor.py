"""The floor under any cache that answers from inside ``Session.execute``.

``python -m bench.floor`` times, side by side (rounds alternate, medians),
on the benchmark's data:

* the uncached one-row ``select()`` (a new session per call);
* the same call with a ``do_orm_execute`` listener that returns a result
  made in advance, at once: what a hit costs when the cache itself costs
  nothing (the session, the statement, ``Session.execute`` around the
  listener, ``.one()``, closing the session);
* building the statement and a session only;
* SQLAlchemy's ``_generate_cache_key()`` of the statement, which a cache
  keyed on the statement's structure has to pay on every hit;
* with Redis answering (``--no-redis`` leaves it out), the read a Redis hit
  makes (``MGET`` of six keys, one of them a 2 KB entry) through
  redis-py's ``Redis.mget``, the same ``MGET`` sent on a connection of
  the pool (the client layer's cost), and sent by ormcache's own reader,
  as its Redis regions send it (packed by hiredis, polling the socket for
  the reply before sleeping).

It prints microseconds per call and each as a ratio of the uncached query,
so that the hit targets of ``hit.one_row`` can be read against what is
left for the cache's own work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.engine import IteratorResult
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.orm import sessionmaker

from .data import Template, create_templates, sqlite_engine


def _rounds(sides: dict[str, Callable[[int], object]], calls: int, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            start = time.perf_counter()
            for i in range(calls):
                fn(1 + i % 100)
            times[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) for name, values in times.items()}


def _redis_sides(sides: dict[str, Callable[[int], object]]) -> Any:
    """Add the two Redis reads to ``sides``; the client, or None when
    Redis does not answer (said on stderr)."""
    from . import backends as bk

    ok, reason = bk.probe("redis")
    if not ok:
        print(f"(no Redis lines: {reason})", file=sys.stderr)
        return None
    import redis

    client = redis.Redis.from_url(bk.redis_url(), socket_timeout=bk.BACKEND_TIMEOUT)
    prefix = bk.new_namespace("floor")
    keys = [f"{prefix}:k{i}" for i in range(6)]
    client.set(keys[0], b"x" * 2048, ex=bk.SERVER_TTL)
    for key in keys[1:]:
        client.set(key, b"0123456789abcdef0123", ex=bk.SERVER_TTL)
    pool = client.connection_pool
    from ormcache._store import _needs_command_name

    # (redis-py before 5.3 wants a command name)
    conn = pool.get_connection("MGET") if _needs_command_name(pool) else pool.get_connection()

    def client_mget(tid: int) -> object:
        return client.mget(keys)

    def connection_mget(tid: int) -> object:
        conn.send_command("MGET", *keys)
        return conn.read_response()

    from ormcache._store import _RedisReader

    reader = _RedisReader(pool, 1)

    def reader_mget(tid: int) -> object:
        return reader(keys)

    sides["Redis.mget (6 keys, 2 KB)"] = client_mget
    sides["the same MGET on a pool connection"] = connection_mget
    sides["the same MGET by ormcache's reader"] = reader_mget
    return client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor")
    parser.add_argument("--calls", type=int, default=2000, help="calls per side per round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--no-redis", action="store_true", help="leave out the Redis MGET lines")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ormcache-floor-") as tmp:
        path = Path(tmp) / "templates.db"
        create_templates(path, 1000)
        plain_engine, instant_engine = sqlite_engine(path), sqlite_engine(path)
        Plain, Instant = sessionmaker(plain_engine), sessionmaker(instant_engine)
        with Plain() as session:
            template = session.get(Template, 1)
        metadata = SimpleResultMetaData(["Template"])

        @event.listens_for(Instant, "do_orm_execute")
        def instant(orm_context: Any) -> Any:
            return IteratorResult(metadata, iter([(template,)]))

        def uncached(tid: int) -> object:
            with Plain() as session:
                return session.scalars(select(Template).where(Template.id == tid)).one()

        def instant_hit(tid: int) -> object:
            with Instant() as session:
                return session.scalars(select(Template).where(Template.id == tid)).one()

        def statement_and_session(tid: int) -> object:
            with Plain():
                return select(Template).where(Template.id == tid)

        def statement_only(tid: int) -> object:
            return select(Template).where(Template.id == tid)

        def statement_and_key(tid: int) -> object:
            return select(Template).where(Template.id == tid)._generate_cache_key()

        sides: dict[str, Callable[[int], object]] = {
            "uncached one-row select()": uncached,
            "listener answering at once": instant_hit,
            "statement + session only": statement_and_session,
            "statement only": statement_only,
            "statement + _generate_cache_key()": statement_and_key,
        }
        redis_client = None if args.no_redis else _redis_sides(sides)
        for fn in sides.values():  # warm up
            for i in range(200):
                fn(1 + i % 100)
        medians = _rounds(sides, args.calls, args.rounds)
        plain_engine.dispose()
        instant_engine.dispose()
        if redis_client is not None:
            redis_client.close()
    base = medians["uncached one-row select()"]
    key = medians["statement + _generate_cache_key()"] - medians["statement only"]
    for name, seconds in medians.items():
        print(f"{name:<36} {seconds * 1e6:8.1f} us  {seconds / base:5.2f}x")
    print(f"{'_generate_cache_key() alone':<36} {key * 1e6:8.1f} us  {key / base:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a query pays while its cache backend hangs.

``python -m bench.degraded [--queries 2000]``

A TCP listener on loopback that accepts connections and never answers
stands in for a Redis server that hangs (the worst case: a refused
connection fails at once).  The same one-row ORM query runs with a plain
session and with ``FromCache`` on a Redis region pointing at that listener,
alternating; the report gives the added time per query: the mean over all
queries (the first ones wait for the 0.25 s socket timeout until the circuit
opens), and the median and p99 once it is open.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from ormcache import FromCache, OrmCache
from ormcache.testing.fixtures import Base, Template, seed


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.degraded")
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)  # never accepted, never answered
    port = listener.getsockname()[1]
    path = Path(tempfile.mkdtemp()) / "degraded.db"
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    seed(engine)
    cache = OrmCache.from_settings(
        {
            "namespace": "dg" + uuid.uuid4().hex[:8],
            "regions": {"r": {"backend": "redis", "arguments": {"url": f"redis://127.0.0.1:{port}/0"}}},
        }
    )
    plain, cached = sessionmaker(engine), sessionmaker(engine)
    cache.attach(cached)
    stmt = select(Template).where(Template.id == 1)
    cached_stmt = stmt.options(FromCache("r"))
    added = []
    for _ in range(args.queries):
        t0 = time.perf_counter()
        with plain() as s:
            s.scalars(stmt).one()
        t1 = time.perf_counter()
        with cached() as s:
            s.scalars(cached_stmt).one()
        t2 = time.perf_counter()
        added.append((t2 - t1) - (t1 - t0))
    cache.close()
    listener.close()
    steady = sorted(added[10:])
    print(
        f"{args.queries} queries against a hanging Redis: mean added {statistics.mean(added) * 1e3:.3f} ms "
        f"(the first {cache._stores['r'].failure_threshold} wait for the socket timeout); "
        f"once the circuit is open: median {steady[len(steady) // 2] * 1e3:.3f} ms, "
        f"p99 {steady[int(len(steady) * 0.99)] * 1e3:.3f} ms"
    )


if __name__ == "__main__":
    main()

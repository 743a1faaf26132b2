"""What a query pays while its cache backend hangs.

``python -m bench.degraded [--queries 2000] [--backend redis|memcached]``

A private server (``redis-server`` or ``memcached`` on a free loopback
port) serves a cached one-row ORM query until it is warm, then is stopped
with SIGSTOP mid-run: it keeps its connections and its listening socket
but never answers again, the worst case (a server that is gone refuses
connections at once).  The same query then runs with a plain session and
with ``FromCache``, alternating; the report gives the added time per query:
the queries that open the circuit (each waits for the region's
``backend_timeout``, 3 ms by default), the median and p99 once it is open,
and the worst.  Target (issue 6): at most 5 ms added per query.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from ormcache import FromCache, OrmCache
from ormcache.testing.fixtures import Base, Template, seed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(kind: str, port: int) -> subprocess.Popen[bytes]:
    if kind == "redis":
        command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    else:
        command = ["memcached", "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64"]
        if os.geteuid() == 0:
            command += ["-u", "nobody"]
    if shutil.which(command[0]) is None:
        raise SystemExit(f"{command[0]} is not installed (make services installs memcached)")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit(f"{command[0]} did not start on port {port}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.degraded")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--backend", choices=("redis", "memcached"), default="redis")
    args = parser.parse_args()
    port = _free_port()
    server = _start(args.backend, port)
    path = Path(tempfile.mkdtemp()) / "degraded.db"
    engine = create_engine(f"sqlite:///{path}")
    Base.metadata.create_all(engine)
    seed(engine)
    if args.backend == "redis":
        region: dict[str, Any] = {"backend": "redis", "arguments": {"url": f"redis://127.0.0.1:{port}/0"}}
    else:
        region = {"backend": "memcached", "arguments": {"url": [f"127.0.0.1:{port}"]}}
    cache = OrmCache.from_settings({"namespace": "dg" + uuid.uuid4().hex[:8], "regions": {"r": region}})
    timeout = cache.settings.region("r").backend_timeout
    plain, cached = sessionmaker(engine), sessionmaker(engine)
    cache.attach(cached)
    stmt = select(Template).where(Template.id == 1)
    cached_stmt = stmt.options(FromCache("r"))
    added = []
    try:
        for _ in range(200):  # warm: connections open, the entry cached
            with cached() as s:
                s.scalars(cached_stmt).one()
        os.kill(server.pid, signal.SIGSTOP)
        for _ in range(args.queries):
            t0 = time.perf_counter()
            with plain() as s:
                s.scalars(stmt).one()
            t1 = time.perf_counter()
            with cached() as s:
                s.scalars(cached_stmt).one()
            t2 = time.perf_counter()
            added.append((t2 - t1) - (t1 - t0))
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
        server.wait()
        cache.close()
        engine.dispose()
    opening = cache._stores["r"].failure_threshold
    steady = sorted(added[10:])
    worst = max(added)
    print(
        f"{args.queries} queries against a {args.backend} stopped mid-run (backend_timeout {timeout} s): "
        f"mean added {statistics.mean(added) * 1e3:.3f} ms; "
        f"the first {opening}: {', '.join(f'{a * 1e3:.2f}' for a in added[:opening])} ms; "
        f"once the circuit is open: median {steady[len(steady) // 2] * 1e3:.3f} ms, "
        f"p99 {steady[int(len(steady) * 0.99)] * 1e3:.3f} ms; worst {worst * 1e3:.2f} ms "
        f"({'PASS' if worst <= 0.005 else 'MISS'}: target at most 5 ms added per query)"
    )


if __name__ == "__main__":
    main()

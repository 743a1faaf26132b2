"""A clock-free consistency checker for ormcache.

The guarantee checked: once a writer's commit has returned, no read that
began after that return sees an older value, in the same process, in other
threads and in other processes sharing the cache backend.

How, without clocks:

* A table of ``rows`` rows ``(id, key, value)``; every row is owned by one
  writer, which commits strictly increasing values to it, each time with
  one of the write methods (ORM flush, ORM bulk ``update()``, Core
  ``update()`` in ``engine.begin()``, ``exec_driver_sql("UPDATE ...")``).
* After a commit *returns*, the writer stores the value in a side channel
  (a shared-memory ``multiprocessing.Array``, one slot per row): the floor.
* A reader first reads the floor, then runs a cached query in a new
  session: ``session.get``, ``select ... where key == k`` or
  ``select ... order by value desc limit 1`` (whose floor is the largest
  floor of all rows).  Seeing a value below the floor is a stale read.
* Optional REPEATABLE READ readers (PostgreSQL, MariaDB) open their snapshot with an
  uncached SELECT, then run the cached query in the same transaction.  They
  may see their (old) snapshot, but never a value older than the floor read
  before their transaction began; the plain readers running next to them
  catch any stale entry they store.
* After every worker stopped, a final pass reads every row with every query
  kind through the cache and must see exactly the last committed values.
* Faults injected by the controller while the run goes: ``flushdb`` (Redis
  FLUSHDB on the region's logical database), ``del_versions`` (delete only
  the ``<namespace>:v:*`` version keys, as an eviction would), ``flush_all``
  (memcached), ``restart`` (kill and restart a private redis-server) and
  ``stall`` (``CLIENT PAUSE`` a private redis-server for 0.3-0.9 s: the
  data stays, clients time out).

Run a configuration for longer from the command line::

    python tests/consistency_checker.py --db sqlite --backend redis --procs 4 --seconds 60
    python tests/consistency_checker.py --db postgresql --backend memcached --procs 4 \\
        --writers 2 --seconds 60
    python tests/consistency_checker.py --db postgresql --backend redis --threads 3 --rr 2
    python tests/consistency_checker.py --db mariadb --backend redis --threads 3 --rr 2

It prints one JSON summary and exits 1 when a stale read was seen.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing as mp
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

READ_KINDS = ("get", "key", "max")
WRITE_METHODS = ("orm", "bulk", "core", "text")
FAULTS = ("none", "flushdb", "del_versions", "flush_all", "restart", "stall")
#: default mean interval between two faults, seconds
FAULT_INTERVALS = {
    "flushdb": 0.03,
    "del_versions": 0.03,
    "flush_all": 0.03,
    "restart": 0.5,
    "stall": 1.5,
}
BACKENDS = ("redis", "memcached", "memory")
DATABASES = ("sqlite", "postgresql", "mariadb")

DEFAULT_REDIS = "redis://127.0.0.1:6379/15"
DEFAULT_MEMCACHED = "127.0.0.1:11211"
DEFAULT_POSTGRESQL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
DEFAULT_MARIADB = "mysql+pymysql://ormcache@127.0.0.1:3306/test"

#: stale reads kept in a summary (all are counted)
MAX_SAMPLES = 20


@dataclass
class Spec:
    """One configuration of a run.  Plain values only: it is sent to
    spawned processes."""

    db: str = "sqlite"
    backend: str = "redis"
    mode: str = "threads"  # or "procs"
    writers: int = 2
    readers: int = 4
    rr_readers: int = 0
    #: the run lasts at least ``seconds`` and until ``min_reads`` reads and
    #: ``min_writes`` writes were done, but no longer than ``max_seconds``
    seconds: float = 3.0
    min_reads: int = 0
    min_writes: int = 0
    max_seconds: float = 0.0
    rows: int = 4
    reads: tuple[str, ...] = READ_KINDS
    writes: tuple[str, ...] = WRITE_METHODS
    fault: str = "none"
    #: mean pause of a writer between two commits (exponential)
    write_pause: float = 0.02
    #: mean interval between two injected faults (0: the fault's default)
    fault_interval: float = 0.0
    #: SQLAlchemy URL; for sqlite the path of the file in it
    db_url: str = ""
    #: redis URL, memcached host:port; unused for memory
    cache_url: str = ""
    namespace: str = ""
    table: str = ""
    seed: int = 0

    def label(self) -> str:
        parts = [self.db, self.backend, self.mode, f"{self.writers}w{self.readers}r"]
        if self.rr_readers:
            parts.append(f"{self.rr_readers}rr")
        if self.fault != "none":
            parts.append(self.fault)
        return "-".join(parts)


def redis_db15(url: str) -> str:
    """``url`` with its logical database replaced by 15."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/15"))


# -- the database ------------------------------------------------------------


def make_model(table: str) -> Any:
    from sqlalchemy import BigInteger, Integer, String
    from sqlalchemy.orm import DeclarativeBase, mapped_column

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = table
        id = mapped_column(Integer, primary_key=True, autoincrement=False)
        key = mapped_column(String(32), unique=True, nullable=False)
        value = mapped_column(BigInteger, nullable=False)

    return Item


def make_engine(spec: Spec) -> Any:
    from sqlalchemy import create_engine, event

    if spec.db == "sqlite":
        engine = create_engine(
            spec.db_url,
            connect_args={"timeout": 60, "check_same_thread": False},
            pool_size=20,
            max_overflow=20,
        )

        @event.listens_for(engine, "connect")
        def _wal(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        return engine
    return create_engine(spec.db_url, pool_size=20, max_overflow=20)


def setup_database(spec: Spec) -> None:
    from sqlalchemy import insert

    engine = make_engine(spec)
    Item = make_model(spec.table)
    try:
        Item.metadata.drop_all(engine)
        Item.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(
                insert(Item.__table__),
                [
                    {"id": r, "key": f"k{r}", "value": 0}
                    for r in range(1, spec.rows + 1)
                ],
            )
    finally:
        engine.dispose()


def drop_database(spec: Spec) -> None:
    engine = make_engine(spec)
    try:
        make_model(spec.table).metadata.drop_all(engine)
    finally:
        engine.dispose()


# -- one process's view: engine, sessions, cache ----------------------------

_tl = threading.local()


def _replay_cursor() -> Any:
    try:
        from ormcache._replay import ReplayCursor
    except ImportError:  # pragma: no cover - renamed: hits are then undercounted
        return ()
    return ReplayCursor


def _count_select(
    conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool
) -> None:
    """Count the SELECTs that reached the database, per thread: a cached
    read that adds none was a hit."""
    if type(getattr(context, "cursor", None)) is _REPLAY_CURSOR:
        return
    if statement.lstrip()[:6].upper() == "SELECT":
        _tl.selects = getattr(_tl, "selects", 0) + 1


_REPLAY_CURSOR = _replay_cursor()


def cache_settings(spec: Spec) -> dict[str, Any]:
    if spec.backend == "redis":
        arguments: dict[str, Any] = {"url": spec.cache_url}
        region = {"backend": "redis", "expiration_time": 300, "arguments": arguments}
    elif spec.backend == "memcached":
        region = {
            "backend": "memcached",
            "expiration_time": 300,
            "arguments": {"url": [spec.cache_url]},
        }
    elif spec.backend == "memory":
        region = {"backend": "memory", "expiration_time": 300}
    else:
        raise ValueError(f"unknown backend {spec.backend!r}")
    return {"namespace": spec.namespace, "regions": {"r": region}}


class Env:
    """Engine, session factories and OrmCache of one process."""

    def __init__(self, spec: Spec) -> None:
        from sqlalchemy import event
        from sqlalchemy.orm import sessionmaker

        from ormcache import OrmCache

        self.spec = spec
        self.Item = make_model(spec.table)
        self.engine = make_engine(spec)
        event.listen(self.engine, "after_cursor_execute", _count_select)
        self.Session = sessionmaker(self.engine)
        self.cache = OrmCache.from_settings(cache_settings(spec))
        self.cache.attach(self.Session)
        self.RRSession = None
        if spec.rr_readers:
            rr_engine = self.engine.execution_options(isolation_level="REPEATABLE READ")
            self.RRSession = sessionmaker(rr_engine)
            self.cache.attach(self.RRSession)

    def close(self) -> None:
        self.cache.close()
        self.engine.dispose()

    # -- reads -----------------------------------------------------------

    def query(self, session: Any, kind: str, row: int) -> int:
        from sqlalchemy import select

        from ormcache import FromCache

        Item = self.Item
        if kind == "get":
            obj = session.get(Item, row, options=[FromCache("r")])
        elif kind == "key":
            stmt = select(Item).where(Item.key == f"k{row}").options(FromCache("r"))
            obj = session.scalars(stmt).one()
        elif kind == "max":
            stmt = (
                select(Item)
                .order_by(Item.value.desc(), Item.id)
                .limit(1)
                .options(FromCache("r"))
            )
            obj = session.scalars(stmt).one()
        else:
            raise ValueError(kind)
        return int(obj.value)

    def read(self, kind: str, row: int) -> tuple[int, bool]:
        """A cached read in a new session: (value, hit)."""
        with self.Session() as session:
            before = getattr(_tl, "selects", 0)
            value = self.query(session, kind, row)
            return value, getattr(_tl, "selects", 0) == before

    def read_uncached(self) -> dict[int, int]:
        from sqlalchemy import select

        with self.engine.connect() as conn:
            t = self.Item.__table__
            return {r: v for r, v in conn.execute(select(t.c.id, t.c.value))}

    # -- writes ----------------------------------------------------------

    def write(self, method: str, row: int, value: int) -> None:
        from sqlalchemy import update

        Item = self.Item
        if method == "orm":
            with self.Session() as session:
                obj = session.get(Item, row)
                obj.value = value
                session.commit()
        elif method == "bulk":
            with self.Session() as session:
                session.execute(update(Item).where(Item.id == row).values(value=value))
                session.commit()
        elif method == "core":
            table = Item.__table__
            with self.engine.begin() as conn:
                conn.execute(update(table).where(table.c.id == row).values(value=value))
        elif method == "text":
            with self.engine.begin() as conn:
                conn.exec_driver_sql(
                    f"UPDATE {self.spec.table} SET value = {int(value)} WHERE id = {int(row)}"
                )
        else:
            raise ValueError(method)


# -- the side channel ---------------------------------------------------------


def floor_of(floors: Any, kind: str, row: int) -> int:
    with floors.get_lock():
        if kind == "max":
            return max(floors[1:])
        return int(floors[row])


def publish(floors: Any, row: int, value: int) -> None:
    with floors.get_lock():
        floors[row] = value


def bump(progress: Any, slot: int) -> None:
    """Count a read (slot 0) or a write (slot 1) for the controller."""
    with progress.get_lock():
        progress[slot] += 1


# -- workers ------------------------------------------------------------------


def writer_loop(
    env: Env, idx: int, floors: Any, progress: Any, stop: Any, rng: random.Random
) -> dict[str, Any]:
    spec = env.spec
    mine = [r for r in range(1, spec.rows + 1) if (r - 1) % spec.writers == idx]
    last = {r: 0 for r in mine}
    methods: Counter[str] = Counter()
    log: list[tuple[int, int, str]] = []
    n = 0
    while not stop.is_set():
        row = rng.choice(mine)
        value = last[row] + 1
        method = spec.writes[n % len(spec.writes)]
        env.write(method, row, value)
        # the commit has returned: publish the floor
        last[row] = value
        publish(floors, row, value)
        bump(progress, 1)
        methods[method] += 1
        log.append((row, value, method))
        n += 1
        if spec.write_pause > 0:
            time.sleep(rng.expovariate(1.0 / spec.write_pause))
    return {
        "role": "writer",
        "idx": idx,
        "writes": n,
        "methods": dict(methods),
        "log": log,
    }


def reader_loop(
    env: Env,
    idx: int,
    floors: Any,
    progress: Any,
    stop: Any,
    rng: random.Random,
    rr: bool = False,
) -> dict[str, Any]:
    from sqlalchemy import text

    spec = env.spec
    reads = hits = rr_old = 0
    kinds: Counter[str] = Counter()
    stale: list[dict[str, Any]] = []
    n_stale = 0
    while not stop.is_set():
        kind = rng.choice(spec.reads)
        row = rng.randint(1, spec.rows)
        floor = floor_of(floors, kind, row)
        inner_floor = floor
        if rr:
            assert env.RRSession is not None
            with env.RRSession() as session:
                # an uncached SELECT first: it takes the transaction's snapshot
                session.execute(text(f"SELECT count(*) FROM {spec.table}")).scalar()
                time.sleep(rng.uniform(0, 0.005))  # let writers commit meanwhile
                inner_floor = floor_of(floors, kind, row)
                before = getattr(_tl, "selects", 0)
                seen = env.query(session, kind, row)
                hit = getattr(_tl, "selects", 0) == before
            if seen < inner_floor:
                rr_old += 1  # legitimate: an older snapshot
        else:
            seen, hit = env.read(kind, row)
        reads += 1
        bump(progress, 0)
        hits += hit
        kinds[kind] += 1
        if seen < floor:
            n_stale += 1
            if len(stale) < MAX_SAMPLES:
                stale.append(
                    {
                        "reader": f"{'rr' if rr else 'r'}{idx}",
                        "pid": os.getpid(),
                        "read": reads,
                        "kind": kind,
                        "row": row,
                        "floor": floor,
                        "seen": seen,
                        "hit": bool(hit),
                    }
                )
    return {
        "role": "rr" if rr else "reader",
        "idx": idx,
        "reads": reads,
        "hits": hits,
        "kinds": dict(kinds),
        "stale": stale,
        "n_stale": n_stale,
        "rr_old": rr_old,
    }


def _worker(
    env: Env, role: str, idx: int, floors: Any, progress: Any, stop: Any, seed: int
) -> dict[str, Any]:
    rng = random.Random(f"{seed}-{role}-{idx}")
    if role == "writer":
        return writer_loop(env, idx, floors, progress, stop, rng)
    return reader_loop(env, idx, floors, progress, stop, rng, rr=(role == "rr"))


def _warm_up(env: Env) -> None:
    """Compile every statement shape once, outside the measured run."""
    for kind in env.spec.reads:
        env.read(kind, 1)


def _thread_main(
    env: Env,
    role: str,
    idx: int,
    floors: Any,
    progress: Any,
    stop: Any,
    barrier: Any,
    out: list,
) -> None:
    try:
        barrier.wait(120)
        out.append(_worker(env, role, idx, floors, progress, stop, env.spec.seed))
    except BaseException:  # noqa: BLE001 - reported as the worker's error
        barrier.abort()
        out.append({"role": role, "idx": idx, "error": traceback.format_exc()})


def _proc_main(
    spec_dict: dict[str, Any],
    role: str,
    idx: int,
    floors: Any,
    progress: Any,
    stop: Any,
    barrier: Any,
    queue: Any,
) -> None:
    env = None
    try:
        logging.getLogger("ormcache").setLevel(logging.ERROR)
        spec = Spec(**spec_dict)
        env = Env(spec)
        _warm_up(env)
        barrier.wait(120)
        result = _worker(env, role, idx, floors, progress, stop, spec.seed)
    except BaseException:  # noqa: BLE001 - reported as the worker's error
        with contextlib.suppress(Exception):
            barrier.abort()
        result = {"role": role, "idx": idx, "error": traceback.format_exc()}
    finally:
        if env is not None:
            with contextlib.suppress(Exception):
                env.close()
    queue.put(result)


# -- private servers for the faults that need them --------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateServer:
    """A redis-server or memcached of our own on a free loopback port."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix=f"cc-{kind}-")

    @staticmethod
    def available(kind: str) -> bool:
        return (
            shutil.which("redis-server" if kind == "redis" else "memcached") is not None
        )

    @property
    def url(self) -> str:
        if self.kind == "redis":
            return f"redis://127.0.0.1:{self.port}/0"
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.kind == "redis":
            cmd = [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                self.dir,
                "--loglevel",
                "warning",
            ]
        else:
            cmd = [
                "memcached",
                "-l",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "0",
                "-m",
                "64",
            ]
            if os.geteuid() == 0:
                cmd += ["-u", "root"]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.2
                ) as sock:
                    sock.sendall(
                        b"PING\r\n" if self.kind == "redis" else b"version\r\n"
                    )
                    if sock.recv(64):
                        return
            except OSError:
                time.sleep(0.01)
        raise RuntimeError(f"private {self.kind} on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- faults -----------------------------------------------------------------


def fault_loop(
    spec: Spec, stop: Any, server: PrivateServer | None, counts: Counter[str]
) -> None:
    rng = random.Random(f"{spec.seed}-fault")
    interval = spec.fault_interval or FAULT_INTERVALS[spec.fault]
    client: Any = None
    if spec.fault in ("flushdb", "del_versions"):
        import redis

        client = redis.Redis.from_url(spec.cache_url)
    elif spec.fault == "flush_all":
        import pylibmc

        client = pylibmc.Client([spec.cache_url])
    elif spec.fault == "stall":
        import redis

        client = redis.Redis.from_url(spec.cache_url)
    try:
        while not stop.is_set():
            time.sleep(interval * rng.uniform(0.5, 1.5))
            if stop.is_set():
                break
            if spec.fault == "flushdb":
                assert urlsplit(spec.cache_url).path == "/15", "FLUSHDB only on db 15"
                client.flushdb()
            elif spec.fault == "del_versions":
                keys = list(client.scan_iter(match=f"{spec.namespace}:v:*", count=1000))
                if keys:
                    client.delete(*keys)
                counts["version_keys_deleted"] += len(keys)
            elif spec.fault == "flush_all":
                client.flush_all()
            elif spec.fault == "restart":
                assert server is not None
                server.kill()
                time.sleep(rng.uniform(0.02, 0.2))
                server.start()
            elif spec.fault == "stall":
                pause = rng.uniform(0.3, 0.9)
                client.execute_command("CLIENT", "PAUSE", str(int(pause * 1000)), "ALL")
                time.sleep(pause)
            counts[spec.fault] += 1
    finally:
        if client is not None and hasattr(client, "close"):
            client.close()


# -- the controller ------------------------------------------------------------


def final_check(env: Env, floors: Any) -> list[dict[str, Any]]:
    """Every row, every query kind, read through the cache twice after all
    writes: each must be the last committed value."""
    database = env.read_uncached()
    mismatches = []
    expected_floors = {r: int(floors[r]) for r in range(1, env.spec.rows + 1)}
    if database != expected_floors:
        mismatches.append(
            {"what": "database", "database": database, "floors": expected_floors}
        )
    for _ in range(2):
        for kind in READ_KINDS:
            for row in range(1, env.spec.rows + 1):
                want = max(database.values()) if kind == "max" else database[row]
                seen, hit = env.read(kind, row)
                if seen != want:
                    mismatches.append(
                        {
                            "kind": kind,
                            "row": row,
                            "want": want,
                            "seen": seen,
                            "hit": hit,
                        }
                    )
                if kind == "max":
                    break
    return mismatches


def run(spec: Spec) -> dict[str, Any]:
    """Run one configuration; the database table must not exist yet, the
    caller owns ``spec.db_url`` (a temp file for sqlite)."""
    if spec.mode == "procs" and spec.backend == "memory":
        raise ValueError("the memory backend is per process: use threads")
    if spec.rr_readers and spec.db == "sqlite":
        raise ValueError("REPEATABLE READ readers need PostgreSQL or MariaDB")
    if not spec.namespace:
        spec = replace(spec, namespace="cc" + uuid.uuid4().hex[:12])
    if not spec.table:
        spec = replace(spec, table="cc_" + uuid.uuid4().hex[:12])

    server: PrivateServer | None = None
    try:
        if spec.fault in ("restart", "stall"):
            server = PrivateServer("redis")
            server.start()
            spec = replace(spec, backend="redis", cache_url=server.url)
        elif spec.fault == "flush_all":
            # a private memcached: flush_all on the shared one would wipe the
            # entries of tests running next to us
            server = PrivateServer("memcached")
            server.start()
            spec = replace(spec, backend="memcached", cache_url=server.url)
        setup_database(spec)
        return _run(spec, server)
    finally:
        if server is not None:
            server.close()
        elif spec.backend == "redis":
            drop_redis_keys(spec)
        if spec.db != "sqlite":
            drop_database(spec)


def drop_redis_keys(spec: Spec) -> None:
    """Delete what the run left in Redis (its namespace only)."""
    import redis

    client = redis.Redis.from_url(spec.cache_url)
    try:
        batch = []
        for key in client.scan_iter(match=f"{spec.namespace}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                client.delete(*batch)
                batch = []
        if batch:
            client.delete(*batch)
    finally:
        client.close()


def _run(spec: Spec, server: PrivateServer | None) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    floors = ctx.Array("q", spec.rows + 1)
    progress = ctx.Array("q", 2)
    roles = (
        [("writer", i) for i in range(spec.writers)]
        + [("reader", i) for i in range(spec.readers)]
        + [("rr", i) for i in range(spec.rr_readers)]
    )
    results: list[dict[str, Any]] = []
    fault_counts: Counter[str] = Counter()
    started = time.monotonic()
    env: Env | None = None
    procs: list[Any] = []
    threads: list[threading.Thread] = []
    if spec.mode == "threads":
        stop: Any = threading.Event()
        barrier: Any = threading.Barrier(len(roles) + 1)
        env = Env(spec)
        _warm_up(env)
        for role, idx in roles:
            t = threading.Thread(
                target=_thread_main,
                args=(env, role, idx, floors, progress, stop, barrier, results),
                daemon=True,
            )
            t.start()
            threads.append(t)
    elif spec.mode == "procs":
        stop = ctx.Event()
        barrier = ctx.Barrier(len(roles) + 1)
        queue = ctx.Queue()
        for role, idx in roles:
            p = ctx.Process(
                target=_proc_main,
                args=(asdict(spec), role, idx, floors, progress, stop, barrier, queue),
                daemon=True,
            )
            p.start()
            procs.append(p)
    else:
        raise ValueError(f"unknown mode {spec.mode!r}")

    fault_thread = None
    try:
        try:
            barrier.wait(180)
        except threading.BrokenBarrierError:
            pass  # a worker failed before the start; its error is collected below
        ready = time.monotonic()
        if spec.fault != "none":
            fault_thread = threading.Thread(
                target=fault_loop, args=(spec, stop, server, fault_counts), daemon=True
            )
            fault_thread.start()
        at_least = ready + spec.seconds
        at_most = ready + max(spec.seconds, spec.max_seconds)
        while not stop.wait(0.05):
            now = time.monotonic()
            if now >= at_most:
                break
            if (
                now >= at_least
                and progress[0] >= spec.min_reads
                and progress[1] >= spec.min_writes
            ):
                break
    finally:
        stop.set()
        stopped = time.monotonic()
        if fault_thread is not None:
            fault_thread.join(30)
        for t in threads:
            t.join(60)
        for _ in procs:
            try:
                results.append(queue.get(timeout=120))
            except Exception:  # noqa: BLE001 - queue.Empty, a dead worker
                results.append(
                    {"role": "?", "idx": -1, "error": "no result from a worker process"}
                )
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    ran = stopped - ready

    if spec.fault == "restart" and server is not None and server.proc is None:
        server.start()
    if env is None:
        env = Env(spec)
    try:
        final = final_check(env, floors)
    finally:
        env.close()
    return summarize(
        spec, results, final, fault_counts, ran, time.monotonic() - started
    )


def summarize(
    spec: Spec,
    results: list[dict[str, Any]],
    final: list[dict[str, Any]],
    fault_counts: Counter[str],
    ran: float,
    total: float,
) -> dict[str, Any]:
    errors = [r["error"] for r in results if "error" in r]
    readers = [
        r for r in results if r.get("role") in ("reader", "rr") and "error" not in r
    ]
    writers = [r for r in results if r.get("role") == "writer" and "error" not in r]
    kinds: Counter[str] = Counter()
    methods: Counter[str] = Counter()
    for r in readers:
        kinds.update(r["kinds"])
    for w in writers:
        methods.update(w["methods"])
    # which write method committed the value a stale reader should have seen
    by_value = {(row, value): m for w in writers for row, value, m in w["log"]}
    stale = [s for r in readers for s in r["stale"]]
    for s in stale:
        if s["kind"] != "max":
            s["floor_written_by"] = by_value.get((s["row"], s["floor"]))
    reads = sum(r["reads"] for r in readers)
    return {
        "config": spec.label(),
        "reads": reads,
        "hits": sum(r["hits"] for r in readers),
        "rr_reads": sum(r["reads"] for r in readers if r["role"] == "rr"),
        "rr_old_snapshot": sum(r["rr_old"] for r in readers),
        "writes": sum(w["writes"] for w in writers),
        "reads_by_kind": dict(kinds),
        "writes_by_method": dict(methods),
        "stale_reads": sum(r["n_stale"] for r in readers),
        "stale_samples": stale,
        "final_mismatches": final,
        "faults": dict(fault_counts),
        "errors": errors,
        "seconds": round(ran, 2),
        "total_seconds": round(total, 2),
        "seed": spec.seed,
        "namespace": spec.namespace,
        "table": spec.table,
    }


def summary_line(summary: dict[str, Any]) -> str:
    s = summary
    rate = s["reads"] / s["seconds"] if s["seconds"] else 0.0
    line = (
        f"consistency {s['config']}: reads={s['reads']} hits={s['hits']} "
        f"writes={s['writes']} stale={s['stale_reads']} "
        f"final_mismatches={len(s['final_mismatches'])} errors={len(s['errors'])} "
        f"in {s['seconds']}s ({rate:.0f} reads/s)"
    )
    if s["rr_reads"]:
        line += f" rr_reads={s['rr_reads']} rr_old_snapshot={s['rr_old_snapshot']}"
    if s["faults"]:
        line += " faults=" + ",".join(f"{k}:{v}" for k, v in s["faults"].items())
    return line


def ok(summary: dict[str, Any]) -> bool:
    return not (
        summary["stale_reads"] or summary["final_mismatches"] or summary["errors"]
    )


# -- command line -----------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--db", choices=DATABASES, default="sqlite")
    parser.add_argument("--backend", choices=BACKENDS, default="redis")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--procs", type=int, help="reader processes (spawn)")
    group.add_argument("--threads", type=int, help="reader threads in one process")
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument(
        "--rr", type=int, default=0, help="REPEATABLE READ readers (postgresql, mariadb)"
    )
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="run at least this long"
    )
    parser.add_argument(
        "--min-reads", type=int, default=0, help="and until this many reads"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=0.0, help="but at most this long"
    )
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--reads", default=",".join(READ_KINDS))
    parser.add_argument("--writes", default=",".join(WRITE_METHODS))
    parser.add_argument("--fault", choices=FAULTS, default="none")
    parser.add_argument("--fault-interval", type=float, default=0.0)
    parser.add_argument("--write-pause", type=float, default=0.02)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS)
    parser.add_argument("--memcached", default=DEFAULT_MEMCACHED)
    parser.add_argument("--postgresql-url", default=DEFAULT_POSTGRESQL)
    parser.add_argument("--mariadb-url", default=DEFAULT_MARIADB)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--json", action="store_true", help="print the whole summary as JSON"
    )
    args = parser.parse_args(argv)

    mode, readers = (
        ("procs", args.procs) if args.procs else ("threads", args.threads or 4)
    )
    cache_url = {"redis": args.redis_url, "memcached": args.memcached, "memory": ""}[
        args.backend
    ]
    if args.fault in ("flushdb", "del_versions") and args.backend != "redis":
        parser.error(f"--fault {args.fault} needs --backend redis")
    if args.fault == "flushdb" and urlsplit(cache_url).path != "/15":
        parser.error("--fault flushdb only runs on Redis logical database 15")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    tmp = tempfile.mkdtemp(prefix="cc-")
    db_url = {
        "sqlite": f"sqlite:///{tmp}/cc.db",
        "postgresql": args.postgresql_url,
        "mariadb": args.mariadb_url,
    }[args.db]
    spec = Spec(
        db=args.db,
        backend=args.backend,
        mode=mode,
        writers=args.writers,
        readers=readers,
        rr_readers=args.rr,
        seconds=args.seconds,
        min_reads=args.min_reads,
        max_seconds=args.max_seconds,
        rows=args.rows,
        reads=tuple(args.reads.split(",")),
        writes=tuple(args.writes.split(",")),
        fault=args.fault,
        fault_interval=args.fault_interval,
        write_pause=args.write_pause,
        db_url=db_url,
        cache_url=cache_url,
        seed=seed,
    )
    try:
        summary = run(spec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(summary_line(summary))
    if args.json or not ok(summary):
        print(json.dumps({k: v for k, v in summary.items()}, indent=2, default=str))
    return 0 if ok(summary) else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import consistency_checker

    sys.exit(consistency_checker.main())

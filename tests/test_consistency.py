"""Consistency under concurrency: once a writer's commit has returned, no
read that began after that return sees an older value, in the same process,
in other threads and in other processes sharing the cache backend.

The runs are clock-free (see ``tests/consistency_checker.py``): a writer
publishes each value in shared memory after its commit returns; a reader
reads that floor first, then runs its cached query in a new session, and
must see a value at least as new.  Every run mixes the three read kinds
(``Session.get``, a ``where key ==`` query, ``order by value desc limit 1``)
and the four write methods (ORM flush, ORM bulk ``update()``, Core
``update()`` in ``engine.begin()``, ``exec_driver_sql("UPDATE ...")``).

Each run prints one summary line (reads, hits, writes, stale reads) at the
end of the module and records the numbers with ``record_property``.  Set
``ORMCACHE_CONSISTENCY_SCALE`` (e.g. ``10``) to run every configuration
longer; ``python tests/consistency_checker.py --help`` runs one
configuration from the command line.
"""

from __future__ import annotations

import contextlib
import os
import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import consistency_checker as cc
import pytest
from servers import unavailable
from sqlalchemy import Integer, create_engine, event, select, text
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column, sessionmaker

from ormcache import FromCache, OrmCache

SCALE = float(os.environ.get("ORMCACHE_CONSISTENCY_SCALE", "1"))
#: every run lasts until it did this many reads and writes (and 1 s)
MIN_READS = int(2000 * SCALE)
MIN_WRITES = int(50 * SCALE)
#: ... but stops after this many seconds, and then fails
MAX_SECONDS = 30 * SCALE

_summaries: list[dict[str, Any]] = []


@pytest.fixture(scope="module", autouse=True)
def _print_summaries(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    plugins = request.config.pluginmanager
    reporter = plugins.get_plugin("terminalreporter")
    capture = plugins.get_plugin("capturemanager")
    if reporter is None or not _summaries:
        return
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        reporter.write_line("")
        reporter.section("ormcache consistency runs", sep="-")
        for summary in _summaries:
            reporter.write_line(cc.summary_line(summary))
    _summaries.clear()


SpecFactory = Callable[..., cc.Spec]


@pytest.fixture
def make_spec(request: pytest.FixtureRequest, tmp_path: Any) -> SpecFactory:
    def make(db: str, backend: str, **kw: Any) -> cc.Spec:
        if db == "sqlite":
            db_url = f"sqlite:///{tmp_path}/cc.db"
        else:
            db_url = request.getfixturevalue(f"{db}_url")
        cache_url = ""
        if backend == "redis" and kw.get("fault") not in ("restart", "stall"):
            # a logical database of its own: the flushdb fault wipes it
            cache_url = cc.redis_db15(request.getfixturevalue("redis_url"))
        elif backend == "memcached" and kw.get("fault") != "flush_all":
            cache_url = request.getfixturevalue("memcached_url")
        kw.setdefault("seconds", 1.0)
        kw.setdefault("min_reads", MIN_READS)
        kw.setdefault("min_writes", MIN_WRITES)
        kw.setdefault("max_seconds", MAX_SECONDS)
        return cc.Spec(
            db=db,
            backend=backend,
            db_url=db_url,
            cache_url=cache_url,
            namespace="cc" + uuid.uuid4().hex[:12],
            table="cc_" + uuid.uuid4().hex[:12],
            seed=random.randrange(1 << 30),
            **kw,
        )

    return make


def run_and_check(
    spec: cc.Spec, record_property: Callable[[str, Any], None]
) -> dict[str, Any]:
    summary = cc.run(spec)
    _summaries.append(summary)
    for name in (
        "config",
        "reads",
        "hits",
        "writes",
        "stale_reads",
        "rr_reads",
        "seconds",
        "seed",
    ):
        record_property(name, summary[name])
    record_property("reads_by_kind", summary["reads_by_kind"])
    record_property("writes_by_method", summary["writes_by_method"])
    if summary["faults"]:
        record_property("faults", summary["faults"])
    print(cc.summary_line(summary))

    assert not summary["errors"], summary["errors"][0]
    assert summary["stale_reads"] == 0, (
        f"{summary['stale_reads']} stale reads (seed {summary['seed']}), e.g. "
        f"{summary['stale_samples'][:5]}"
    )
    assert not summary["final_mismatches"], summary["final_mismatches"]
    # the run was big enough, and exercised every path
    assert summary["reads"] >= spec.min_reads, cc.summary_line(summary)
    assert summary["writes"] >= spec.min_writes, cc.summary_line(summary)
    assert 0 < summary["hits"] < summary["reads"], cc.summary_line(summary)
    assert set(summary["reads_by_kind"]) == set(spec.reads)
    assert set(summary["writes_by_method"]) == set(spec.writes)
    return summary


# -- the configurations ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["redis", "memcached", "memory"])
@pytest.mark.parametrize("db", ["sqlite", "postgresql", "mariadb"])
def test_threads(
    db: str, backend: str, make_spec: SpecFactory, record_property: Any
) -> None:
    """2 writer and 4 reader threads sharing one engine and one OrmCache."""
    run_and_check(
        make_spec(db, backend, mode="threads", writers=2, readers=4), record_property
    )


@pytest.mark.parametrize("backend", ["redis", "memcached"])
@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_processes(
    db: str, backend: str, make_spec: SpecFactory, record_property: Any
) -> None:
    """2 writer and 3 reader processes (spawn), each with its own engine
    and OrmCache, sharing the cache server."""
    spec = make_spec(db, backend, mode="procs", writers=2, readers=3)
    run_and_check(spec, record_property)


@pytest.mark.parametrize(
    ("db", "backend"), [("postgresql", "redis"), ("postgresql", "memcached"), ("mariadb", "redis")]
)
def test_repeatable_read_readers(
    db: str, backend: str, make_spec: SpecFactory, record_property: Any
) -> None:
    """Readers in REPEATABLE READ transactions that took their snapshot
    with an uncached SELECT before the cached query.  They may see their
    snapshot, never older than what was committed before their transaction
    began, and must never store what they saw: the other readers next to
    them (READ COMMITTED on PostgreSQL; on MariaDB at REPEATABLE READ too,
    each with the cached query as its transaction's first statement), and
    the final pass, would read it."""
    spec = make_spec(
        db, backend, mode="threads", writers=2, readers=2, rr_readers=2
    )
    summary = run_and_check(spec, record_property)
    assert summary["rr_reads"] > spec.min_reads // 10
    # some of them did read inside an older snapshot: the case that matters
    assert summary["rr_old_snapshot"] > 0, cc.summary_line(summary)


def _private_server(kind: str) -> None:
    if not cc.PrivateServer.available(kind):
        binary = "redis-server" if kind == "redis" else "memcached"
        unavailable(f"{binary} is not on PATH: cannot run a private {kind} for this fault")


@pytest.mark.parametrize(
    ("fault", "db", "backend", "mode"),
    [
        ("flushdb", "sqlite", "redis", "threads"),
        ("del_versions", "postgresql", "redis", "threads"),
        ("del_versions", "sqlite", "redis", "procs"),
        ("flush_all", "sqlite", "memcached", "threads"),
        ("restart", "sqlite", "redis", "threads"),
    ],
)
def test_faults(
    fault: str,
    db: str,
    backend: str,
    mode: str,
    make_spec: SpecFactory,
    record_property: Any,
) -> None:
    """Faults while writers and readers run: FLUSHDB of the region's Redis
    database (db 15), deletion of only the ``<namespace>:v:*`` version keys
    (eviction), memcached ``flush_all`` (on a private memcached, so that the
    shared one keeps other tests' entries) and kill + restart of a private
    redis-server.  Zero stale reads during and after."""
    if fault == "flush_all":
        _private_server("memcached")
    elif fault == "restart":
        _private_server("redis")
    spec = make_spec(
        db,
        backend,
        mode=mode,
        writers=2,
        readers=4 if mode == "threads" else 3,
        fault=fault,
        # the circuit breaker keeps the cache away for >= 1 s after a restart
        fault_interval=0.8 if fault == "restart" else 0.0,
        seconds=3.0 if fault == "restart" else 1.5,
    )
    summary = run_and_check(spec, record_property)
    assert sum(summary["faults"].values()) > 0


def test_checker_detects_late_invalidation(
    make_spec: SpecFactory, record_property: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checker itself: with invalidation that lands a little after the
    commit returned (and no pending token), it must report stale reads."""
    import threading

    from ormcache.core import OrmCache as Core

    post = Core._post_invalidate
    monkeypatch.setattr(Core, "_pre_invalidate", lambda self, db, tables, writer=None: None)
    monkeypatch.setattr(
        Core,
        "_post_invalidate",
        lambda self, db, tables, writer=None: threading.Timer(
            0.003, post, (self, db, tables, writer)
        ).start(),
    )
    spec = make_spec(
        "sqlite",
        "memory",
        mode="threads",
        writers=2,
        readers=3,
        seconds=1.5,
        min_reads=0,
    )
    summary = cc.run(spec)
    print(cc.summary_line(summary))
    assert not summary["errors"], summary["errors"][0]
    assert summary["stale_reads"] > 0


# -- races the checker found once, kept as deterministic regression tests ------


def test_sqlite_fill_inside_an_open_read_snapshot(make_spec: SpecFactory) -> None:
    spec = make_spec("sqlite", "memory")
    cc.setup_database(spec)
    env = cc.Env(spec)
    Item = env.Item
    try:
        with env.Session() as reader:
            # a streamed result left open (iterating a big table while
            # looking things up in the cache): its statement stays active
            ids = reader.execute(
                select(Item.id).where(Item.id > 1).execution_options(yield_per=1)
            )
            next(iter(ids))
            env.write("orm", 1, 1)  # the commit has returned
            in_snapshot = reader.get(Item, 1, options=[FromCache("r")]).value
            ids.close()
        assert in_snapshot == 0  # the reader's own snapshot: legitimate
        # a new session, begun after the commit returned
        value, hit = env.read("get", 1)
        assert value == 1, f"stale value {value} served from the cache (hit={hit})"
    finally:
        env.close()


def _connect_event_rr(engine: Any) -> None:
    @event.listens_for(engine, "connect")
    def _rr(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ"
        )
        cursor.close()
        dbapi_connection.commit()


@pytest.mark.parametrize("how", ["connect_event", "set_transaction"])
def test_postgresql_repeatable_read_set_by_sql(
    how: str, make_spec: SpecFactory
) -> None:
    spec = make_spec("postgresql", "memory")
    rr_engine = create_engine(spec.db_url)
    env = None
    try:
        cc.setup_database(spec)
        env = cc.Env(spec)
        if how == "connect_event":
            _connect_event_rr(rr_engine)
        RRSession = sessionmaker(rr_engine)
        env.cache.attach(RRSession)
        Item = env.Item
        with RRSession() as reader:
            if how == "set_transaction":
                reader.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
            level = reader.execute(text("SHOW transaction_isolation")).scalar()
            assert level == "repeatable read"
            reader.execute(text("SELECT 1")).scalar()  # takes the snapshot
            env.write("core", 1, 1)  # the commit has returned
            assert reader.get(Item, 1, options=[FromCache("r")]).value == 0
        value, hit = env.read("get", 1)
        assert value == 1, f"stale value {value} served from the cache (hit={hit})"
    finally:
        if env is not None:
            env.close()
        rr_engine.dispose()
        cc.drop_database(spec)


def test_invalidate_model_with_default_schema(postgresql_url: str) -> None:
    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "cc_" + uuid.uuid4().hex[:12]
        __table_args__ = {"schema": "public"}  # noqa: RUF012
        id = mapped_column(Integer, primary_key=True)
        value = mapped_column(Integer)

    engine = create_engine(postgresql_url)
    Base.metadata.create_all(engine)
    cache = OrmCache.from_settings(
        {
            "namespace": "cc" + uuid.uuid4().hex[:12],
            "regions": {"r": {"backend": "memory"}},
        }
    )
    Sessions = sessionmaker(engine)
    cache.attach(Sessions)
    stmt = select(Item).where(Item.id == 1).options(FromCache("r"))
    try:
        with Session(engine) as s:
            s.add(Item(id=1, value=0))
            s.commit()
        with Sessions() as s:
            assert s.scalars(stmt).one().value == 0
        # a write ormcache cannot see (another program): the DBAPI directly
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute(f"UPDATE public.{Item.__tablename__} SET value = 1")
            raw.commit()
        finally:
            raw.close()
        cache.invalidate(Item)  # "every result that read its tables"
        with Sessions() as s:
            assert s.scalars(stmt).one().value == 1
    finally:
        cache.close()
        Base.metadata.drop_all(engine)
        engine.dispose()


def test_stalled_backend_in_the_writer_process(make_spec: SpecFactory) -> None:
    import time

    import redis

    _private_server("redis")
    server = cc.PrivateServer("redis")
    server.start()
    try:
        spec = make_spec("sqlite", "redis", fault="stall")  # no shared Redis
        spec.cache_url = server.url
        cc.setup_database(spec)
        writer = cc.Env(spec)  # the writing process
        # another process: its OrmCache does not see this process's writes
        reader = cc.Env(spec)
        from ormcache import invalidation

        invalidation.unregister(reader.cache)  # (as if it were another process)
        try:
            assert [reader.read("get", 1) for _ in range(2)] == [(0, False), (0, True)]
            # Redis stalls for 2 s (a slow command, a fork, the network):
            # the writer process's three reads time out (0.25 s each) and
            # its circuit opens
            admin = redis.Redis.from_url(server.url)
            admin.execute_command("CLIENT", "PAUSE", "2000", "ALL")
            stalled = time.monotonic()
            for _ in range(3):
                assert writer.read("get", 2) == (0, False)
            writer.write("orm", 1, 1)  # the commit has returned
            time.sleep(max(0.0, stalled + 2.1 - time.monotonic()))
            # Redis answers again; a read in the other process
            value, hit = reader.read("get", 1)
            assert value == 1, f"stale value {value} served from the cache (hit={hit})"
        finally:
            writer.close()
            reader.close()
    finally:
        server.close()

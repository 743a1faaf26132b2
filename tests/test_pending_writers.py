"""Several writers of one table with changes pending at once.

A version key lists every writer whose changes to its table are not yet
committed and announced (``invalidation.merge_token``): one writer's fresh
tokens leave another's pending entry in place, so that a writer that dies
between its commit and its fresh tokens leaves its tables uncached until its
entry expires, never stale.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from ormcache import FromCache, OrmCache
from ormcache import invalidation
from ormcache.invalidation import MAX_PENDING, MERGE_LUA, merge_token, pending_expired
from ormcache.testing import QueryCounter
from ormcache.testing.fixtures import Base, Template, seed

NOW = 1_800_000_000.0


def pend(writer: str, seconds: float = 60.0) -> str:
    return f"p{writer}:{NOW + seconds:.3f}"


MERGE_CASES: list[tuple[Any, str, str | None]] = [
    (None, pend("a"), "a"),  # no token yet
    ("0123456789abcdef", pend("a"), "a"),  # a fresh token
    (pend("a"), pend("b"), "b"),  # a second writer joins
    (pend("a", 10), pend("a", 50), "a"),  # a writer's own entry is replaced
    (pend("a") + "," + pend("b")[1:], "feedfacecafebeef", "b"),  # b finishes: a stays
    (pend("a"), "feedfacecafebeef", "a"),  # the last one finishes
    (pend("a"), "feedfacecafebeef", None),  # an invalidation: a stays, unchanged
    (pend("a", -1), "feedfacecafebeef", None),  # expired: replaced
    (pend("a", -1) + "," + pend("b")[1:], pend("c"), "c"),  # expired entries dropped
    (pend("a", 2 * 86400), "feedfacecafebeef", None),  # beyond any writer's time
    ("p", "feedfacecafebeef", None),  # malformed
    ("p:inf,b:nan,c,:", pend("d"), "d"),
    ("pa:1e99", "feedfacecafebeef", "x"),
    (f"pa:0x{int(NOW + 60):x},b:{NOW + 60:_}, c:{NOW + 60}", pend("d"), "d"),  # spellings no writer uses
    ("pa:1:2,b::" + pend("c")[1:], "feedfacecafebeef", None),
]


@pytest.mark.parametrize("current, token, writer", MERGE_CASES)
def test_merge(current: Any, token: str, writer: str | None) -> None:
    merged = merge_token(current, token, writer, NOW)
    pending = token[0] == "p"
    others = [
        part
        for part in (current[1:].split(",") if isinstance(current, str) and current[:1] == "p" else [])
        if part.partition(":")[0] not in (writer, token[1:].partition(":")[0] if pending else None)
        and not pending_expired("p" + part, NOW)
    ]
    if pending:
        assert merged == "p" + ",".join([*others, token[1:]])
    elif others:
        assert merged == (None if "p" + ",".join(others) == current else "p" + ",".join(others))
    else:
        assert merged == token


def test_merge_named_cases() -> None:
    """The rules, spelled out."""
    both = merge_token(pend("a"), pend("b"), "b", NOW)
    assert both == pend("a") + "," + pend("b")[1:]
    assert merge_token(both, "f" * 16, "b", NOW) == pend("a")
    assert merge_token(pend("a"), "f" * 16, "a", NOW) == "f" * 16
    assert merge_token(pend("a"), "f" * 16, None, NOW) is None
    assert merge_token(pend("a", -0.001), "f" * 16, None, NOW) == "f" * 16
    assert merge_token(None, "f" * 16, None, NOW) == "f" * 16
    assert merge_token(12, pend("a"), "a", NOW) == pend("a")


def test_a_pending_value_lists_at_most_max_pending_writers() -> None:
    value = None
    for i in range(MAX_PENDING + 10):
        value = merge_token(value, pend(f"w{i}", 60 + i), f"w{i}", NOW)
    assert value is not None
    parts = value[1:].split(",")
    assert len(parts) == MAX_PENDING
    # the latest deadlines are kept, the newest writer among them
    assert parts[-1].startswith(f"w{MAX_PENDING + 9}:")
    assert not any(p.startswith("w0:") for p in parts)


def test_redis_merges_as_merge_token(redis_url: str) -> None:
    """MERGE_LUA, run by a real Redis, gives what merge_token gives."""
    import redis

    client = redis.Redis.from_url(redis_url)
    prefix = "ormcache-test-merge-" + uuid.uuid4().hex[:8]
    cases = [
        *MERGE_CASES,
        *((pend(f"w{i}", 60 + i) if i else None, pend("z", 1000), "z") for i in range(3)),
    ]
    big = None
    for i in range(MAX_PENDING + 3):
        big = merge_token(big, pend(f"w{i}", 60 + i), f"w{i}", NOW)
    cases.append((big, pend("last", 500), "last"))
    same = None  # more writers than are kept, with equal deadlines
    for i in range(MAX_PENDING + 3):
        same = merge_token(same, pend(f"w{i:03}", 60), f"w{i:03}", NOW)
    cases.append((same, pend("w999", 60), "w999"))
    try:
        for i, (current, token, writer) in enumerate(cases):
            key = f"{prefix}:{i}"
            if isinstance(current, str):
                client.set(key, current)
            elif current is not None:
                client.set(key, str(current))
            wrote = client.eval(MERGE_LUA, 1, key, token, writer or "", repr(NOW), "60", MAX_PENDING)
            expected = merge_token(
                str(current) if current is not None else None, token, writer, NOW
            )
            stored = client.get(key)
            if expected is None:
                assert wrote == 0 and stored.decode() == current, (current, token, writer)
            else:
                assert wrote == 1, (current, token, writer)
                got = stored.decode()
                assert got == expected, (current, token, writer)
                assert 0 < client.ttl(key) <= 60
        # one call for several keys, as a commit's keys go
        currents = [None, pend("a"), pend("a") + "," + pend("b")[1:], "0123456789abcdef"]
        keys = [f"{prefix}:m{i}" for i in range(len(currents))]
        for key, current in zip(keys, currents):
            if current is not None:
                client.set(key, current)
        for token, writer in ((pend("b", 30), "b"), ("feedfacecafebeef", "b")):
            expected = [merge_token(client.get(k) and client.get(k).decode(), token, writer, NOW) for k in keys]
            wrote = client.eval(MERGE_LUA, len(keys), *keys, token, writer, repr(NOW), "", MAX_PENDING)
            assert wrote == sum(e is not None for e in expected)
            for key, value in zip(keys, expected):
                if value is not None:
                    assert client.get(key).decode() == value and client.ttl(key) == -1
    finally:
        client.delete(*[f"{prefix}:{i}" for i in range(len(cases))], *[f"{prefix}:m{i}" for i in range(4)])
        client.close()


@pytest.fixture
def switched(tmp_path: Any) -> Iterator[tuple[Any, OrmCache, Any]]:
    """A SQLite file, and a cache whose backend can be switched off."""
    from dogpile.cache import make_region
    from test_degradation import Switch

    from ormcache.settings import load_settings

    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    seed(engine)
    switch = Switch()
    region = make_region().configure("dogpile.cache.memory_pickle", wrap=[switch])
    settings = load_settings({"namespace": "pw" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}})
    cache = OrmCache(settings, regions={"default": region})
    cache._stores["default"].retry_after = 30.0  # (the test replays them)
    cache._stores["default"].max_lost_retry_after = 30.0
    yield engine, cache, switch
    cache.close()
    engine.dispose()


def test_a_lost_fresh_token_is_written_again_as_its_writers(switched: Any) -> None:
    """A writer's fresh tokens that the backend refused are written when it
    answers again, still as that writer's: its pending entry goes (else its
    tables would stay uncached until the entry expired)."""
    from ormcache.keys import database_id

    engine, cache, switch = switched
    store = cache._stores["default"]
    db = database_id(engine)
    cache._pre_invalidate(db, {"templates"}, "writer-a")
    switch.down = True
    cache._post_invalidate(db, {"templates"}, "writer-a")
    switch.down = False
    assert store.flush_lost()
    key = cache._keys.table(db, "templates")
    token = store.get_many([key, key])
    assert token is not None and token[1] is not None and not str(token[1]).startswith("p")


def test_a_late_fresh_token_of_a_connections_last_transaction_leaves_its_next_ones_pending(
    switched: Any,
) -> None:
    """Transaction 1's fresh tokens are lost (the backend did not answer its
    commit); transaction 2, on the same pooled connection, writes the same
    table, and its pending tokens bring the backend back, which writes
    transaction 1's lost ones.  Those must not end transaction 2's pending
    state: were its writer to die after its commit, results read meanwhile
    (in other processes) would be stale until they expired."""
    from ormcache.keys import database_id

    engine, cache, switch = switched
    store = cache._stores["default"]
    Session = sessionmaker(engine)
    cache.attach(Session)
    key = cache._keys.table(database_id(engine), "templates")

    with Session() as s:
        s.get_one(Template, 1).name = "one"
        s.flush()
        switch.down = True
        s.commit()  # (fresh tokens lost)
    switch.down = False
    assert store._lost
    with Session() as second:
        second.get_one(Template, 1).name = "two"
        second.flush()  # pending; the backend answers: the lost ones are written
        assert not store._lost
        token = store.get_many([key, key])[1]  # type: ignore[index]
        assert token.startswith("p")  # still transaction 2's
        second.commit()
    token = store.get_many([key, key])[1]  # type: ignore[index]
    assert not token.startswith("p")


@pytest.mark.parametrize("kind", ["memory", "redis", "memcached"])
def test_a_writer_that_dies_after_its_commit_leaves_nothing_stale(
    kind: str, postgresql_url: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writer A flushes; writer B writes the same table and commits (its
    fresh tokens come); A's DBAPI commit returns and its process dies
    before A's fresh tokens.  Results read between B's commit and A's are
    never stored, and after A's commit the rows are A's; once A's pending
    entry expires, results are stored again."""
    from servers import postgresql_database

    arguments: dict[str, Any] = {}
    if kind == "redis":
        arguments = {"url": request.getfixturevalue("redis_url")}
    elif kind == "memcached":
        arguments = {"url": [request.getfixturevalue("memcached_url")]}
    engine = create_engine(postgresql_database(postgresql_url, "ormcache_pending"))
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    seed(engine)
    cache = OrmCache.from_settings(
        {
            "namespace": "pw" + uuid.uuid4().hex[:8],
            "regions": {"default": {"backend": kind, "arguments": arguments}},
        }
    )
    Session = sessionmaker(engine)
    cache.attach(Session)
    stmt = select(Template).where(Template.name.like("t%")).order_by(Template.id).options(FromCache())

    def names() -> tuple[list[str], int]:
        with QueryCounter(engine) as counter, Session() as s:
            found = [t.name for t in s.scalars(stmt)]
        return found, counter.selects

    monkeypatch.setattr(invalidation, "PENDING_TTL", 3.0)
    a = Session()
    try:
        a.get_one(Template, 1).name = "t1-a"
        a.flush()
        with Session() as b:
            b.get_one(Template, 2).name = "t2-b"
            b.commit()
        before, _ = names()
        assert before[:2] == ["t1", "t2-b"]
        assert names() == (before, 1)  # not stored: A is pending
        # A's commit returns, and its process dies before its fresh tokens
        conn = a.connection()
        conn.info.pop(invalidation._WRITTEN, None)
        conn.info.pop(invalidation._PENDED, None)
        conn.connection.dbapi_connection.commit()
        a.close()
        after, selects = names()
        assert after[:2] == ["t1-a", "t2-b"] and selects == 1
        deadline = time.monotonic() + 10
        while names()[1]:  # A's entry expires; a miss replaces it, the next stores
            assert time.monotonic() < deadline, "the pending entry never expired"
            time.sleep(0.2)
        assert names() == (after, 0)
    finally:
        a.close()  # (a failed test must not leave its row locked for the next)
        cache.close()
        engine.dispose()


def test_a_forked_child_writes_under_an_id_of_its_own() -> None:
    """A connection's info copied into a forked child must not give the
    child the parent's writer id: the first to finish would remove the
    other's pending entry."""
    import os

    info: dict[str, Any] = {}
    parent = invalidation._writer(info)
    assert invalidation._writer(info) == parent  # kept for the connection's life
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.write(write, invalidation._writer(info).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child and child != parent
    assert invalidation._writer(info) == parent


def test_lost_invalidations_are_written_with_new_tokens_each(switched: Any, monkeypatch: Any) -> None:
    """Lost fresh tokens of several writers are written one writer at a
    time, each with a token of its own: written with one token, a late
    write of it replaced a newer commit's token with one that entries
    stored before that commit were stored under, and made them valid again
    (found by review, after 30,000 transactions in an outage: the key went
    back to an older token 11 times in 1.5 s).  A key remembers at most
    MAX_LOST_WRITERS writers."""
    from ormcache._store import MAX_LOST_WRITERS, Store
    from ormcache.keys import database_id

    engine, cache, switch = switched
    store = cache._stores["default"]
    db = database_id(engine)
    switch.down = True
    for writer in ("writer-a", "writer-b", "writer-c"):
        cache._post_invalidate(db, {"templates"}, writer)
    switch.down = False
    written: list[str] = []
    original = Store._write_or_drop

    def recording(self: Any, mapping: Any, writer: Any = None) -> None:
        written.extend(set(mapping.values()))
        original(self, mapping, writer)

    monkeypatch.setattr(Store, "_write_or_drop", recording)
    assert store.flush_lost()
    assert len(written) == 3 and len(set(written)) == 3
    monkeypatch.undo()

    switch.down = True
    for i in range(MAX_LOST_WRITERS + 20):
        cache._post_invalidate(db, {"templates"}, f"w{i}")
    switch.down = False
    key = cache._keys.table(db, "templates")
    assert len(store._lost_writers[key]) == MAX_LOST_WRITERS
    assert store.flush_lost()

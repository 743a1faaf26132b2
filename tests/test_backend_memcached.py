from typing import Any

import pytest

from ormcache.testing.fixtures import BackendTests


class TestPylibmc(BackendTests):
    """A real memcached server through pylibmc (``make services``)."""

    backend = "memcached"

    def arguments_for(self, request: pytest.FixtureRequest) -> dict[str, Any]:
        return {"url": [request.getfixturevalue("memcached_url")]}


class TestPylibmcSigned(TestPylibmc):
    """Real memcached with signed payloads."""

    signing_key = "backend-suite-signing-key"


def test_item_over_the_limit_is_a_miss_not_an_outage(memcached_url: str, tmp_path: Any) -> None:
    """memcached refuses items of 1 MiB or more: such a result is simply not
    cached, and the region is not treated as down."""
    import os
    import uuid

    from sqlalchemy import String, create_engine, select
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

    from ormcache import FromCache, OrmCache
    from ormcache.testing import QueryCounter

    class B(DeclarativeBase):
        pass

    class Blob(B):
        __tablename__ = "blobs"
        id: Mapped[int] = mapped_column(primary_key=True)
        data: Mapped[str] = mapped_column(String)

    engine = create_engine(f"sqlite:///{tmp_path}/b.db")
    B.metadata.create_all(engine)
    maker = sessionmaker(engine)
    with maker() as s:  # 2 MiB of incompressible text
        s.add_all([Blob(id=i, data=os.urandom(512 * 1024).hex()) for i in range(2)])
        s.add(Blob(id=9, data="small"))
        s.commit()
    cache = OrmCache.from_settings(
        {
            "namespace": "mb" + uuid.uuid4().hex[:8],
            "regions": {"m": {"backend": "memcached", "arguments": {"url": [memcached_url]}}},
        }
    )
    cache.attach(maker)
    cache.max_entry_bytes = 10 * 1024 * 1024  # let it reach memcached, which refuses it
    big = select(Blob).where(Blob.id < 2).options(FromCache("m"))
    small = select(Blob).where(Blob.id == 9).options(FromCache("m"))
    try:
        with QueryCounter(engine) as c:
            for _ in range(4):
                with maker() as s:
                    assert len(s.scalars(big).all()) == 2
                    assert s.scalars(small).one().data == "small"
        # the big one is queried every time; the small one is cached
        assert c.selects == 4 + 1
        assert cache._stores["m"].available and cache._stores["m"]._failures == 0
    finally:
        cache.close()
        engine.dispose()


@pytest.fixture
def full_memcached() -> Any:
    """A private memcached of 2 MB that refuses to evict (-M): it fills up."""
    import shutil
    import socket
    import subprocess
    import tempfile
    import time

    from servers import unavailable

    if shutil.which("memcached") is None:
        unavailable("memcached binary not found (make services installs it)")
    pidfile = tempfile.mktemp(prefix="ormcache-mc-", suffix=".pid")
    port = 11297
    subprocess.run(
        ["memcached", "-d", "-u", "nobody", "-l", "127.0.0.1", "-p", str(port),
         "-m", "2", "-M", "-I", "512k", "-P", pidfile],
        check=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"127.0.0.1:{port}"
    import os
    import signal

    try:
        with open(pidfile) as f:
            os.kill(int(f.read().strip()), signal.SIGTERM)
    except (OSError, ValueError):
        pass


def test_full_memcached_is_not_an_outage(full_memcached: str, tmp_path: Any) -> None:
    """Once memcached is full (and told not to evict), results are not
    stored, but nothing fails, nothing stale is served, and the region keeps
    serving what it holds: the circuit does not open."""
    import os
    import uuid

    from sqlalchemy import String, create_engine, select
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

    from ormcache import FromCache, OrmCache
    from ormcache.testing import QueryCounter

    class B(DeclarativeBase):
        pass

    class Doc(B):
        __tablename__ = "docs"
        id: Mapped[int] = mapped_column(primary_key=True)
        data: Mapped[str] = mapped_column(String)

    engine = create_engine(f"sqlite:///{tmp_path}/full.db")
    B.metadata.create_all(engine)
    maker = sessionmaker(engine)
    with maker() as s:
        s.add_all([Doc(id=i, data=os.urandom(30_000).hex()) for i in range(1, 80)])
        s.add(Doc(id=1000, data="small"))
        s.commit()
    cache = OrmCache.from_settings(
        {
            "namespace": "mf" + uuid.uuid4().hex[:8],
            "regions": {"m": {"backend": "memcached", "arguments": {"url": [full_memcached]}}},
        }
    )
    cache.attach(maker)
    small = select(Doc).where(Doc.id == 1000).options(FromCache("m"))
    try:
        with maker() as s:
            assert s.scalars(small).one().data == "small"  # stored while there is room
        for i in range(1, 80):  # 60 KB results: memcached fills up
            with maker() as s:
                assert len(s.get_one(Doc, i, options=[FromCache("m")]).data) == 60_000
        fills = cache.stats()["regions"]["m"]["fills"]
        assert fills < 80  # memcached refused some: it is full
        store = cache._stores["m"]
        assert store.available and store._failures == 0
        with QueryCounter(engine) as c, maker() as s:
            assert s.scalars(small).one().data == "small"
        assert c.selects == 0  # still served from memcached
        with maker() as s:  # a write still invalidates (its tokens are small)
            s.get_one(Doc, 1000).data = "changed"
            s.commit()
        with maker() as s:
            assert s.scalars(small).one().data == "changed"
    finally:
        cache.close()
        engine.dispose()


def test_large_values_do_not_wait_on_delayed_acks(memcached_url: str) -> None:
    """libmemcached leaves Nagle's algorithm on: a value of some 100 KB
    then often waited 40 ms for the server's delayed ACK, past the default
    ``backend_timeout`` (3 ms), and the failure took the whole region to
    the database.  ormcache turns ``tcp_nodelay`` on unless the region's
    behaviors say otherwise."""
    import uuid

    from ormcache import OrmCache

    namespace = "mn" + uuid.uuid4().hex[:8]
    cache = OrmCache.from_settings(
        {
            "namespace": namespace,
            "regions": {
                "m": {"backend": "memcached", "arguments": {"url": [memcached_url]}},
                "own": {
                    "backend": "memcached",
                    "arguments": {"url": [memcached_url], "behaviors": {"tcp_nodelay": False}},
                },
            },
        }
    )
    store = cache._stores["m"]
    try:
        assert cache.region("m").backend.behaviors["tcp_nodelay"] is True
        assert cache.region("own").backend.behaviors["tcp_nodelay"] is False
        # one timeout disables the server for retry_timeout s: the least it takes
        assert cache.region("m").backend.behaviors["retry_timeout"] == 1
        value = b"x" * 200_000
        for i in range(300):
            key = f"{namespace}:big:{i % 20}"
            assert store.set(key, value) is True, f"write {i} failed"
            assert store.get_values([key]) == [value], f"read {i} failed"
        assert store._failures == 0
    finally:
        cache.close()


def test_a_waiter_polls_a_memcached_lock_briefly(memcached_url: str, monkeypatch: Any) -> None:
    """A caller waiting for another process's miss of the same key tries
    dogpile's memcached lock every ``LOCK_POLL`` seconds; dogpile's own
    wait sleeps 0.4 s or more before its second try, and doubles that."""
    import threading
    import time
    import uuid

    from ormcache import OrmCache
    from ormcache._store import LOCK_POLL

    settings = {
        "namespace": "mw" + uuid.uuid4().hex[:8],
        "regions": {"m": {"backend": "memcached", "arguments": {"url": [memcached_url]}}},
    }
    holder_cache, waiter_cache = OrmCache.from_settings(settings), OrmCache.from_settings(settings)
    held = holder_cache._stores["m"].mutex("cold-key")
    waiting = waiter_cache._stores["m"].mutex("cold-key")
    sleeps: list[float] = []
    real_sleep = time.sleep
    got: list[bool] = []

    def recording_sleep(seconds: float) -> None:
        if threading.current_thread() is waiter:
            sleeps.append(seconds)
        real_sleep(seconds)

    def wait() -> None:
        got.append(waiting.acquire(True))

    monkeypatch.setattr(time, "sleep", recording_sleep)
    waiter = threading.Thread(target=wait)
    try:
        assert held.acquire(False)
        waiter.start()
        real_sleep(0.2)
        held.release()
        waiter.join(30)
        assert got == [True]
        waiting.release()
        assert sleeps and max(sleeps) <= LOCK_POLL
    finally:
        holder_cache.close()
        waiter_cache.close()


class _Faulty:
    """A pylibmc client whose next ``add``, ``delete`` or ``get`` raises
    ``error``, after running it on the server (``ran``) or without."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.fault: tuple[str, Exception, bool] | None = None
        self.calls: list[str] = []

    def _call(self, name: str, *args: Any) -> Any:
        self.calls.append(name)
        fault, self.fault = self.fault, None
        if fault is not None and fault[0] == name:
            _, error, ran = fault
            if ran:
                getattr(self.client, name)(*args)
            raise error
        self.fault = fault
        return getattr(self.client, name)(*args)

    def add(self, key: str, value: Any, time: int = 0) -> Any:
        return self._call("add", key, value, time)

    def delete(self, key: str) -> Any:
        return self._call("delete", key)

    def get(self, key: str) -> Any:
        return self._call("get", key)


def test_a_memcached_lock_left_by_a_lost_reply_is_released_if_still_its_holders(memcached_url: str) -> None:
    """Regions take dogpile's memcached lock under an owner token.  A
    release, or a try at the lock, whose reply was lost (a timeout: the
    server may have run it) is sent again once the server answers, and
    deletes the lock only if it still holds that token; a try that never
    reached the server (marked failed) leaves nothing to release; nothing
    is sent once the lock would have expired.  A release that
    works is one ``delete``, as dogpile's."""
    import time
    import uuid

    import pylibmc

    from ormcache import OrmCache
    from ormcache._store import _OwnedMemcachedLock, _TwoLevelLock

    cache = OrmCache.from_settings(
        {
            "namespace": "mr" + uuid.uuid4().hex[:8],
            "regions": {"m": {"backend": "memcached", "arguments": {"url": [memcached_url]}}},
        }
    )
    store = cache._stores["m"]
    server = pylibmc.Client([memcached_url])
    timeout = pylibmc.Error("error 31 from memcached_delete: A TIMEOUT OCCURRED")
    down = pylibmc.ServerDown("error 47 from memcached_add: SERVER HAS FAILED AND IS DISABLED")

    def lock(key: str) -> tuple[_TwoLevelLock, _Faulty]:
        mutex = store.mutex(key)
        assert type(mutex) is _TwoLevelLock and type(mutex.remote) is _OwnedMemcachedLock
        client = _Faulty(mutex.remote.client_fn())
        mutex.remote.client_fn = lambda: client
        return mutex, client

    key = "k" + uuid.uuid4().hex[:8]
    name = "_lock" + key
    try:
        held, client = lock(key)
        assert held.acquire(False)
        assert server.get(name) == held.remote.token
        held.release()
        assert client.calls == ["add", "delete"] and server.get(name) is None

        # a release whose delete timed out before it ran: sent again
        held, client = lock(key)
        assert held.acquire(False)
        client.fault = ("delete", timeout, False)
        with pytest.raises(pylibmc.Error):
            held.release()
        assert server.get(name) is not None and len(store._lost_releases) == 1
        assert store.flush_lost() and store._lost_releases == []
        assert server.get(name) is None

        # ... after it ran, and someone took the lock since: left to them
        held, client = lock(key)
        assert held.acquire(False)
        client.fault = ("delete", timeout, True)
        with pytest.raises(pylibmc.Error):
            held.release()
        other, _ = lock(key)
        assert other.acquire(False)
        assert store.flush_lost() and server.get(name) == other.remote.token
        other.release()

        # a try whose add timed out after the server ran it: nobody holds
        # the lock the server took; released, and the next try takes it
        trying, client = lock(key)
        client.fault = ("add", timeout, True)
        with pytest.raises(pylibmc.Error):
            trying.acquire(False)
        assert server.get(name) is not None and len(store._lost_releases) == 1
        assert store.flush_lost() and server.get(name) is None
        again, _ = lock(key)
        assert again.acquire(False)
        again.release()

        # a try that never reached the server: nothing to release
        trying, client = lock(key)
        client.fault = ("add", down, False)
        with pytest.raises(pylibmc.ServerDown):
            trying.acquire(False)
        assert store._lost_releases == []

        # a lock about to expire: not sent again
        held, client = lock(key)
        assert held.acquire(False)
        assert held.remote.expires is not None
        assert 28.0 < held.remote.expires - time.monotonic() <= 29.0  # (1 s ticks)
        held.remote.expires = time.monotonic() + 0.05
        client.fault = ("delete", timeout, False)
        with pytest.raises(pylibmc.Error):
            held.release()
        time.sleep(0.1)
        calls = len(client.calls)
        assert store.flush_lost() and len(client.calls) == calls
        # nor deleted when it may have expired after the read
        token = server.get(name)
        held.remote.release_if_held(token, time.monotonic() - 0.001)()
        assert server.get(name) == token
        server.delete(name)
    finally:
        server.delete(name)
        cache.close()


def test_a_child_forked_while_a_lock_release_was_being_recorded_can_record_its_own(memcached_url: str) -> None:
    """The lock guarding a store's lost lock releases is made anew in a
    forked child: held by a thread of the parent at the fork, it would
    never be released in the child, whose first lost release would then
    wait forever."""
    import os
    import signal
    import uuid

    from ormcache import OrmCache

    cache = OrmCache.from_settings(
        {
            "namespace": "mf" + uuid.uuid4().hex[:8],
            "regions": {"m": {"backend": "memcached", "arguments": {"url": [memcached_url]}}},
        }
    )
    store = cache._stores["m"]
    try:
        with store._releases_lock:  # as another thread of the parent would hold it
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    signal.alarm(5)
                    store.lose_release(lambda: None, None)
                    code = 0 if len(store._lost_releases) == 1 else 2
                finally:
                    os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        cache.close()


def test_a_forked_child_leaves_the_parents_invalidations_alone(memcached_url: str) -> None:
    """Invalidations go on a pylibmc client per thread: a forked child
    makes its own and keeps the inherited one (freeing it would send
    "quit" on the socket the parent still uses: every invalidation of the
    parent then failed for a second or more)."""
    import os
    import uuid

    from ormcache import OrmCache
    from ormcache.testing.fixtures import Template

    cache = OrmCache.from_settings(
        {
            "namespace": "mf" + uuid.uuid4().hex[:8],
            "regions": {"m": {"backend": "memcached", "arguments": {"url": [memcached_url]}}},
        }
    )
    store = cache._stores["m"]
    try:
        assert store._token_writer is not None
        cache.invalidate(Template)  # the parent's client, made
        pid = os.fork()
        if pid == 0:
            try:
                cache.invalidate(Template)
                code = 0
            except BaseException:
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        for _ in range(50):
            cache.invalidate(Template)  # raises BackendError if one is lost
        assert store._failures == 0 and not store._lost
    finally:
        cache.close()


def test_timeouts_set_in_the_arguments_win_for_invalidations_too(memcached_url: str, redis_url: str) -> None:
    import uuid

    from ormcache import OrmCache

    cache = OrmCache.from_settings(
        {
            "namespace": "mo" + uuid.uuid4().hex[:8],
            "regions": {
                "plain": {"backend": "memcached", "arguments": {"url": [memcached_url]}},
                "own": {"backend": "memcached",
                        "arguments": {"url": [memcached_url], "behaviors": {"receive_timeout": 2_000_000}}},
                "redis_own": {"backend": "redis", "arguments": {"url": redis_url, "socket_timeout": 2}},
                "redis_plain": {"backend": "redis", "arguments": {"url": redis_url}},
            },
        }
    )
    try:
        assert cache._stores["plain"]._token_writer is not None
        assert cache._stores["redis_plain"]._token_writer is not None
        assert cache._stores["own"]._token_writer is None  # the client's 2 s
        assert cache._stores["redis_own"]._token_writer is None
    finally:
        cache.close()


@pytest.mark.parametrize("fork", ["os.fork", "libc fork"])
def test_parent_and_child_read_on_clients_of_their_own(memcached_url: str, fork: str) -> None:
    """dogpile's pylibmc clients (one per thread) were the parent's in a
    forked child, on the parent's sockets: reading at once, the two
    processes got each other's replies (19,000 wrong values in 20,000
    reads).  The child makes its own, whether the fork ran Python's hooks
    or not (uWSGI's libc fork)."""
    import ctypes
    import os
    import uuid

    from ormcache import OrmCache

    namespace = "mk" + uuid.uuid4().hex[:8]
    cache = OrmCache.from_settings(
        {"namespace": namespace, "regions": {"m": {"backend": "memcached", "arguments": {"url": [memcached_url]}}}}
    )
    store = cache._stores["m"]
    keys = [f"{namespace}:k{i}" for i in range(50)]
    try:
        assert store.set_many({k: f"token-{k}" for k in keys})
        assert store.get_many([f"{namespace}:no-entry", keys[0]]) is not None  # the parent's client, made
        pid = ctypes.CDLL(None).fork() if fork == "libc fork" else os.fork()

        def wrong() -> int:
            count = 0
            for n in range(3000):
                key = keys[n % len(keys)]
                values = store.get_many([f"{namespace}:no-entry", key])
                if values is None or values[1] != f"token-{key}":
                    count += 1
            return count

        if pid == 0:
            code = 1
            try:
                code = 0 if wrong() == 0 else 1
            finally:
                os._exit(code)
        parent_wrong = wrong()
        _, status = os.waitpid(pid, 0)
        assert parent_wrong == 0 and os.waitstatus_to_exitcode(status) == 0
    finally:
        cache.close()


@pytest.mark.parametrize("table", ["tab\there", "new\nline", "ctl\x01"])
def test_table_names_with_control_characters(memcached_url: str, tmp_path: Any, table: str) -> None:
    """memcached's protocol ends a key at whitespace: a (quoted) table name
    with a control character in it is hashed in version keys like one with
    a space, never sent raw (a newline hung pylibmc, a tab made the server
    look down)."""
    import faulthandler
    import uuid

    from sqlalchemy import Text, create_engine, select
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

    from ormcache import FromCache, OrmCache
    from ormcache.testing import QueryCounter

    class B(DeclarativeBase):
        pass

    class Row(B):
        __tablename__ = table
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(Text)

    engine = create_engine(f"sqlite:///{tmp_path}/ctl.db")
    B.metadata.create_all(engine)
    maker = sessionmaker(engine)
    with maker() as s:
        s.add(Row(id=1, name="a"))
        s.commit()
    cache = OrmCache.from_settings(
        {
            "namespace": "ctl" + uuid.uuid4().hex[:8],
            "regions": {"default": {"backend": "memcached", "arguments": {"url": [memcached_url]}, "backend_timeout": 0.25}},
        }
    )
    cache.attach(maker)
    stmt = select(Row.name).where(Row.id > 0).options(FromCache())
    faulthandler.dump_traceback_later(60, exit=True)
    try:
        for selects in (1, 0):
            with QueryCounter(engine) as counter, maker() as s:
                assert s.scalars(stmt).one() == "a"
            assert counter.selects == selects
        with maker() as s:
            s.get(Row, 1).name = "b"  # type: ignore[union-attr]
            s.commit()
        with maker() as s:
            assert s.scalars(stmt).one() == "b"
        cache.invalidate(Row)
        assert cache.stats()["regions"]["default"]["errors"] == 0
    finally:
        faulthandler.cancel_dump_traceback_later()
        cache.close()
        engine.dispose()


_UNPICKLED: list[str] = []


def _ran(what: str) -> str:
    _UNPICKLED.append(what)
    return what


class _Runs:
    """What unpickling it would do: run code (here, note that it ran)."""

    def __reduce__(self) -> Any:
        return (_ran, ("code ran in the reader",))


def test_a_signed_region_never_lets_pylibmc_unpickle(memcached_url: str, tmp_path: Any, monkeypatch: Any) -> None:
    """pylibmc unpickles a value stored with its pickle flag inside get(),
    before a signature could be checked: on a signed region, whose own
    values are bytes, such a value (written by anyone who can reach
    memcached) is a miss, never unpickled."""
    import pickle
    import uuid

    import pylibmc
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache, OrmCache
    from ormcache.testing import QueryCounter
    from ormcache.testing.fixtures import Base, Template, seed

    engine = create_engine(f"sqlite:///{tmp_path}/signed.db")
    Base.metadata.create_all(engine)
    seed(engine)
    ns = "sg" + uuid.uuid4().hex[:8]
    cache = OrmCache.from_settings(
        {
            "namespace": ns,
            "signing_key": "a signing key of enough length",
            "regions": {"r": {"backend": "memcached", "arguments": {"url": [memcached_url]}, "backend_timeout": 0.25}},
        }
    )
    maker = sessionmaker(engine)
    cache.attach(maker)
    stmt = select(Template.name).where(Template.id == 1).options(FromCache("r"))
    from ormcache._store import Store

    written: list[str] = []
    set_entry = Store.set

    def recording(self: Any, key: str, value: Any, unlock: Any = None) -> Any:
        written.append(key)
        return set_entry(self, key, value, unlock)

    monkeypatch.setattr(Store, "set", recording)
    try:
        with maker() as s:
            s.scalars(stmt).one()
        monkeypatch.undo()
        raw = pylibmc.Client([memcached_url])  # the stock client: pickles objects, flag 1
        for key in (written[0], cache._keys.region("r")):  # an entry, a version key
            raw.set(key, _Runs())
            with QueryCounter(engine) as counter, maker() as s:
                assert s.scalars(stmt).one() == "t1"
            assert counter.selects == 1
        assert _UNPICKLED == []
        pickle.loads(pickle.dumps(_Runs()))  # what it would have done
        assert _UNPICKLED == ["code ran in the reader"]
    finally:
        cache.close()
        engine.dispose()


@pytest.mark.parametrize("more", [{}, {"min_compress_len": 1000, "memcached_expire_time": 600}])
def test_a_writer_that_finished_is_not_written_back_by_another(
    memcached_url: str, monkeypatch: Any, more: dict[str, Any]
) -> None:
    """Two processes writing one table: B reads the version key while A's
    pending entry is there, A finishes (its fresh token takes the key),
    then B writes its merge.  Without compare-and-set B wrote A's entry
    back, and the table stayed uncached for A's pending time (60 s) under
    steady writes from two processes (found by review: 1-10% hits).  With
    it (regions on the binary protocol), B merges again what it finds, and
    once B finishes the key is fresh."""
    import uuid

    from ormcache import OrmCache
    from ormcache._store import Store

    settings = {
        "namespace": "cas" + uuid.uuid4().hex[:8],
        "regions": {
            "default": {"backend": "memcached", "arguments": {"url": [memcached_url], "binary": True, **more}}
        },
    }
    a, b = OrmCache.from_settings(settings), OrmCache.from_settings(settings)
    db = "named:cas-test"
    store_b = b._stores["default"]
    original = Store._read_to_merge
    finished = []

    def read_then_a_finishes(self: Any, keys: list[str]) -> list[Any]:
        values = original(self, keys)
        if self is store_b and not finished:
            finished.append(True)
            a._post_invalidate(db, {"t"}, "writer-a")
        return values

    try:
        a._pre_invalidate(db, {"t"}, "writer-a")
        monkeypatch.setattr(Store, "_read_to_merge", read_then_a_finishes)
        b._pre_invalidate(db, {"t"}, "writer-b")
        monkeypatch.undo()
        assert finished
        key = b._keys.table(db, "t")
        pending = store_b.get_many([key, key])[1]
        assert pending.startswith("p") and "writer-a" not in pending and "writer-b" in pending
        b._post_invalidate(db, {"t"}, "writer-b")
        assert not store_b.get_many([key, key])[1].startswith("p")
        assert store_b._failures == 0 and not store_b._lost
    finally:
        a.close()
        b.close()


def test_a_text_protocol_region_merges_without_cas(memcached_url: str) -> None:
    """Only binary-protocol regions merge with ``gets``/``cas`` (see
    ``_TokenWriter.can_cas``)."""
    import uuid

    from ormcache import OrmCache

    for binary in (False, True):
        cache = OrmCache.from_settings(
            {
                "namespace": "cas" + uuid.uuid4().hex[:8],
                "regions": {"default": {"backend": "memcached", "arguments": {"url": [memcached_url], "binary": binary}}},
            }
        )
        try:
            writer = cache._stores["default"]._token_writer
            assert writer is not None and writer.can_cas is binary
        finally:
            cache.close()


def _start_memcached(port: int) -> Any:
    """A private memcached on ``port``, in the foreground (its process)."""
    import socket
    import subprocess
    import time

    process = subprocess.Popen(["memcached", "-u", "nobody", "-l", "127.0.0.1", "-p", str(port)])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process
        except OSError:
            time.sleep(0.02)
    process.kill()
    raise AssertionError(f"a private memcached did not start on port {port}")


def _stop_memcached(process: Any) -> None:
    process.terminate()
    process.wait(10)


@pytest.mark.parametrize("binary", [False, True])
def test_the_last_try_at_exit_reaches_a_memcached_back_within_a_second(tmp_path: Any, binary: bool) -> None:
    """An invalidation lost in an outage is written once more at exit,
    also when the process exits within a second of a failed try: the last
    try used a client that libmemcached kept refusing every command for
    ``retry_timeout`` (a second) after that failure, though the server
    answered, and other processes served the old row until it expired."""
    import shutil
    import uuid

    from sqlalchemy import create_engine, select, update
    from sqlalchemy.orm import sessionmaker

    from ormcache import FromCache, OrmCache
    from ormcache import _store
    from ormcache.testing.fixtures import Base, Template, seed
    from servers import closed_port, unavailable

    if shutil.which("memcached") is None:
        unavailable("memcached binary not found (make services installs it)")
    port = closed_port()
    server = _start_memcached(port)
    settings = {
        "namespace": "x" + uuid.uuid4().hex[:8],
        "regions": {"m": {"backend": "memcached", "arguments": {"url": [f"127.0.0.1:{port}"], "binary": binary}}},
    }
    writer, reader = OrmCache.from_settings(settings), OrmCache.from_settings(settings)
    engine = create_engine(f"sqlite:///{tmp_path}/exit.db")
    Base.metadata.create_all(engine)
    seed(engine)
    writes, reads = sessionmaker(engine), sessionmaker(engine)
    writer.attach(writes)
    reader.attach(reads)
    stmt = select(Template).where(Template.id == 1).options(FromCache("m"))
    try:
        with reads() as s:
            assert s.scalars(stmt).one().name == "t1"  # stored
        _stop_memcached(server)
        with writes() as s:
            s.execute(update(Template).where(Template.id == 1).values(name="new"))
            s.commit()  # its invalidation is lost
        store = writer._stores["m"]
        assert store._lost
        server = _start_memcached(port)  # back: the process exits at once
        _store._last_try()
        assert not store._lost
        with reads() as s:
            assert s.scalars(stmt).one().name == "new"
    finally:
        writer.close()
        reader.close()
        engine.dispose()
        _stop_memcached(server)

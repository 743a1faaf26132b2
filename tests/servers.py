"""Real servers for the test suite: Redis, memcached, PostgreSQL and MariaDB.

A pytest plugin, loaded from ``tests/conftest.py``::

    pytest_plugins = ["servers"]

Fixtures (session-scoped; each probes its server once per session and
returns its address):

``redis_url``
    ``redis://127.0.0.1:6379/0``, or ``$ORMCACHE_TEST_REDIS_URL``.
    Probe: a ``PING`` through redis-py with a 1 s socket timeout.
``memcached_url``
    ``127.0.0.1:11211`` (``host:port``, as pylibmc takes it), or
    ``$ORMCACHE_TEST_MEMCACHED``. Probe: the ``version`` command over a socket.
``postgresql_url``
    ``postgresql+psycopg2://postgres@127.0.0.1:5432/test`` (a SQLAlchemy URL),
    or ``$ORMCACHE_TEST_POSTGRESQL_URL``. Probe: ``select 1`` through psycopg2
    with ``connect_timeout=2``.
``mariadb_url``
    ``mysql+pymysql://ormcache@127.0.0.1:3306/test`` (a SQLAlchemy URL; the
    user and database ``make services`` creates), or
    ``$ORMCACHE_TEST_MARIADB_URL``; MySQL does as well. Probe: ``select 1``
    through PyMySQL with ``connect_timeout=2``.

Use them by naming them::

    def test_round_trip(redis_url: str) -> None:
        region = make_region().configure(
            "dogpile.cache.redis", arguments={"url": redis_url}
        )

Outside fixtures (a module-level ``skipif``, a helper, a ``pytest_generate_tests``
hook) call :func:`require_server` with ``"redis"``, ``"memcached"`` or
``"postgresql"`` or ``"mariadb"``; it returns the same address, probing at most once per
session. :func:`check_server` probes an explicit address and is not cached.

When a server does not answer, the test fails if the environment variable
``CI`` is ``true`` (any case) or ``1``, so that a CI run cannot pass by
skipping; anywhere else the test is skipped. Either way the message names the
server, its address and how to start it: ``make services``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any, NoReturn
from dataclasses import dataclass

import pytest

__all__ = [
    "SERVERS",
    "Server",
    "check_server",
    "is_ci",
    "mariadb_url",
    "memcached_url",
    "postgresql_database",
    "postgresql_url",
    "redis_url",
    "require_server",
    "unavailable",
]


def _probe_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        if not client.ping():
            raise ConnectionError("PING did not answer PONG")
    finally:
        client.close()


def _split_host_port(address: str, default_port: int) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or host.endswith(":"):  # no port, or a bare IPv6 address
        return address.strip("[]"), default_port
    return host.strip("[]"), int(port)


def _probe_memcached(address: str) -> None:
    host, port = _split_host_port(address, 11211)
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.sendall(b"version\r\n")
        reply = b""
        while not reply.endswith(b"\r\n") and len(reply) < 256:
            chunk = sock.recv(256)
            if not chunk:
                break
            reply += chunk
    if not reply.startswith(b"VERSION "):
        raise ConnectionError(f"unexpected reply to 'version': {reply!r}")


def _select_one(connection: Any) -> None:
    """Ask a DBAPI ``connection`` for ``select 1``, then close it."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("select 1")
            if cursor.fetchone() != (1,):
                raise ConnectionError("'select 1' did not return 1")
    finally:
        connection.close()


def _probe_postgresql(url: str) -> None:
    import psycopg2
    from sqlalchemy.engine import make_url

    params = make_url(url).translate_connect_args(username="user", database="dbname")
    _select_one(psycopg2.connect(connect_timeout=2, **params))


def _probe_mariadb(url: str) -> None:
    import pymysql
    from sqlalchemy.engine import make_url

    params = make_url(url).translate_connect_args(username="user", database="database")
    _select_one(pymysql.connect(connect_timeout=2, **params))


def postgresql_database(url: str, database: str) -> Any:
    """``url`` (a PostgreSQL SQLAlchemy URL) for ``database`` on the same
    server, created when missing."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    base = make_url(url)
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": database})
            if not exists:
                conn.exec_driver_sql(f'CREATE DATABASE "{database}"')
    finally:
        admin.dispose()
    return base.set(database=database)


@dataclass(frozen=True)
class Server:
    """A server the tests need: where to find it and how to tell it answers."""

    name: str
    env: str
    """Environment variable that overrides :attr:`default`."""
    default: str
    probe: Callable[[str], None]
    """Raises if the server at the given address does not answer."""

    @property
    def url(self) -> str:
        return os.environ.get(self.env) or self.default


SERVERS: dict[str, Server] = {
    server.name: server
    for server in (
        Server(
            "redis", "ORMCACHE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0", _probe_redis
        ),
        Server(
            "memcached", "ORMCACHE_TEST_MEMCACHED", "127.0.0.1:11211", _probe_memcached
        ),
        Server(
            "postgresql",
            "ORMCACHE_TEST_POSTGRESQL_URL",
            "postgresql+psycopg2://postgres@127.0.0.1:5432/test",
            _probe_postgresql,
        ),
        Server(
            "mariadb",
            "ORMCACHE_TEST_MARIADB_URL",
            "mysql+pymysql://ormcache@127.0.0.1:3306/test",
            _probe_mariadb,
        ),
    )
}


def is_ci() -> bool:
    """True when ``$CI`` is ``true`` (any case) or ``1``."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def _server(name: str) -> Server:
    try:
        return SERVERS[name]
    except KeyError:
        raise ValueError(
            f"unknown server {name!r}; expected one of {', '.join(SERVERS)}"
        ) from None


def _problem(server: Server, url: str) -> str | None:
    """Probe once; return why the server does not answer, or None."""
    try:
        server.probe(url)
    except Exception as error:  # any driver error means "not answering"
        return f"{type(error).__name__}: {error}".strip()
    return None


def _give_up(server: Server, url: str, problem: str) -> None:
    reason = (
        f"{server.name} is not answering at {url} ({problem}). "
        f"Start it with `make services` (or `scripts/services.sh {server.name}`), "
        f"or point {server.env} at a running server."
    )
    unavailable(reason)


def unavailable(reason: str) -> NoReturn:
    """A server or binary a test needs is missing: under ``CI`` the test
    fails (a CI run cannot pass by skipping); elsewhere it is skipped with
    ``reason``."""
    if not is_ci():
        pytest.skip(reason)  # outside CI only
    pytest.fail(f"CI is set, so a missing server fails the run: {reason}")


def check_server(name: str, url: str | None = None) -> str:
    """Probe server ``name`` at ``url`` (default: its configured address).

    Returns the address if it answers; otherwise calls ``pytest.fail`` in CI
    and ``pytest.skip`` elsewhere. Not cached: every call probes.
    """
    server = _server(name)
    url = server.url if url is None else url
    problem = _problem(server, url)
    if problem is not None:
        _give_up(server, url, problem)
    return url


_outcomes: dict[tuple[str, str], str | None] = {}


def require_server(name: str) -> str:
    """Return the configured address of server ``name`` if it answers.

    ``name`` is ``"redis"``, ``"memcached"``, ``"postgresql"`` or ``"mariadb"``. The probe runs
    once per address per session; a server that does not answer fails the
    calling test in CI and skips it elsewhere, like :func:`check_server`.
    """
    server = _server(name)
    url = server.url
    key = (name, url)
    if key not in _outcomes:
        _outcomes[key] = _problem(server, url)
    problem = _outcomes[key]
    if problem is not None:
        _give_up(server, url, problem)
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a Redis server that answers, for ``redis.Redis.from_url``."""
    return require_server("redis")


@pytest.fixture(scope="session")
def memcached_url() -> str:
    """``host:port`` of a memcached server that answers, for pylibmc."""
    return require_server("memcached")


@pytest.fixture(scope="session")
def postgresql_url() -> str:
    """SQLAlchemy URL of a PostgreSQL database that answers."""
    return require_server("postgresql")


@pytest.fixture(scope="session")
def mariadb_url() -> str:
    """SQLAlchemy URL of a MariaDB (or MySQL) database that answers."""
    return require_server("mariadb")


def closed_port() -> int:
    """A loopback port nothing listens on (a server that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def count_redis_commands(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """From now on (until ``monkeypatch.undo()``), append to the returned
    list once per request redis-py sends from the calling thread (a
    command, or a whole pipeline: one round trip), the name of its (first)
    command.  Other threads (a
    subscriber's PING, a probe, a stats publisher, of this cache or of one
    an earlier test left running) are not counted."""
    import threading

    import redis.connection

    sent: list[bytes] = []
    original = redis.connection.AbstractConnection.send_packed_command
    caller = threading.get_ident()

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        if threading.get_ident() == caller:
            # the (first) command's name, for an assertion's message
            packed = command if isinstance(command, (bytes, bytearray)) else b"".join(command)
            sent.append(bytes(packed).split(b"\r\n")[2])
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    return sent


def sqlite_begin_recipe(engine: Any) -> None:
    """SQLAlchemy's recipe for real SQLite transactions on ``engine``
    (pysqlite or aiosqlite): the driver's own transaction handling off,
    ``BEGIN`` emitted when SQLAlchemy begins one."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def no_driver_transactions(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")

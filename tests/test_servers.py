"""The real-server fixtures of ``servers.py`` give addresses that work, and a
server that does not answer fails the run in CI instead of skipping."""

from __future__ import annotations

import re
import uuid

import pytest
from sqlalchemy import create_engine, text

from servers import SERVERS, check_server, require_server

# A port nothing listens on: connections are refused at once.
CLOSED = {
    "redis": "redis://127.0.0.1:1/0",
    "memcached": "127.0.0.1:1",
    "postgresql": "postgresql+psycopg2://postgres@127.0.0.1:1/test",
}


def test_redis_round_trip(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    key = f"ormcache-test:{uuid.uuid4().hex}"
    try:
        assert client.set(key, b"value", ex=60)
        assert client.get(key) == b"value"
    finally:
        client.delete(key)
        client.close()


def test_memcached_round_trip(memcached_url: str) -> None:
    import pylibmc

    client = pylibmc.Client([memcached_url])
    key = f"ormcache-test:{uuid.uuid4().hex}"
    try:
        assert client.set(key, b"value", time=60)
        assert client.get(key) == b"value"
    finally:
        client.delete(key)
        client.disconnect_all()


def test_postgresql_select_one(postgresql_url: str) -> None:
    engine = create_engine(postgresql_url)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("select 1")).scalar_one() == 1
    finally:
        engine.dispose()


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
@pytest.mark.parametrize("name", sorted(CLOSED))
def test_missing_server_fails_in_ci(
    monkeypatch: pytest.MonkeyPatch, name: str, ci: str
) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception) as failure:
        check_server(name, CLOSED[name])
    message = str(failure.value)
    assert name in message
    assert CLOSED[name] in message
    assert "make services" in message


@pytest.mark.parametrize("ci", [None, "", "false", "0"])
@pytest.mark.parametrize("name", sorted(CLOSED))
def test_missing_server_skips_outside_ci(
    monkeypatch: pytest.MonkeyPatch, name: str, ci: str | None
) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception) as skip:
        check_server(name, CLOSED[name])
    assert name in str(skip.value)
    assert "make services" in str(skip.value)


@pytest.mark.parametrize("name", sorted(CLOSED))
def test_environment_overrides_address(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(SERVERS[name].env, CLOSED[name])
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=re.escape(CLOSED[name])):
        require_server(name)


def test_unknown_server_name() -> None:
    with pytest.raises(ValueError, match="unknown server 'mysql'"):
        require_server("mysql")

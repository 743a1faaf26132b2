"""Signed payloads: what is not signed with our key is never unpickled."""

from __future__ import annotations

import pickle
import random
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from dogpile.cache.api import CantDeserializeException
from sqlalchemy import create_engine, select
from sqlalchemy.orm import sessionmaker

from ormcache import ConfigurationError, FromCache, OrmCache
from ormcache.serialization import SignedSerializer
from ormcache.testing import QueryCounter
from ormcache.testing.fixtures import Base, Template, seed

KEY = "a-test-signing-key-of-some-length"


class Boom:
    """Unpickling this would run code: the test fails if it ever is."""

    def __reduce__(self) -> Any:
        return (pytest.fail, ("a forged payload was unpickled",))


def test_round_trip_and_refusals() -> None:
    signer = SignedSerializer(KEY)
    payload = signer.dumps({"rows": [(1, "a")]})
    assert signer.loads(payload) == {"rows": [(1, "a")]}
    forged = [
        pickle.dumps(Boom()),  # unsigned
        SignedSerializer("another-key-of-enough-length").dumps(Boom()),
        payload[:-3],  # truncated
        payload[:10],
        b"",
    ]
    for bad in forged:
        with pytest.raises(CantDeserializeException):
            signer.loads(bad)
    assert signer.rejected == len(forged)


def test_fuzz_corrupted_payloads() -> None:
    signer = SignedSerializer(KEY)
    payload = signer.dumps([(i, "x" * i) for i in range(50)])
    rng = random.Random(1234)
    for _ in range(2000):
        data = bytearray(payload)
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(data))
            if op < 0.5:
                data[pos] ^= 1 << rng.randrange(8)
            elif op < 0.75:
                del data[pos : pos + rng.randint(1, 20)]
            else:
                data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        if bytes(data) == payload:
            continue
        with pytest.raises(CantDeserializeException):
            signer.loads(bytes(data))


@pytest.fixture
def env(tmp_path: Any, redis_url: str) -> Iterator[tuple[Any, Any, OrmCache]]:
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    seed(engine)
    cache = OrmCache.from_settings(
        {
            "namespace": "sg" + uuid.uuid4().hex[:8],
            "signing_key": KEY,
            "regions": {"r": {"backend": "redis", "arguments": {"url": redis_url}}},
        }
    )
    maker = sessionmaker(engine)
    cache.attach(maker)
    yield engine, maker, cache
    cache.close()
    engine.dispose()


def test_tampered_entries_are_misses(env: Any) -> None:
    engine, maker, cache = env
    stmt = select(Template).where(Template.id == 1).options(FromCache("r"))

    def run() -> tuple[str, int]:
        with QueryCounter(engine) as c, maker() as s:
            name = s.scalars(stmt).one().name
        return name, c.selects

    assert run() == ("t1", 1)
    assert run() == ("t1", 0)
    client = cache.region("r").backend.writer_client
    ns = cache.settings.namespace
    keys = client.keys(f"{ns}:q:*")
    assert keys
    for key in keys:  # an attacker with access to Redis
        client.set(key, b'{"ct": 1e12, "v": 2}|' + pickle.dumps(Boom()))
    assert run() == ("t1", 1)
    assert run() == ("t1", 0)


def test_signing_key_too_short() -> None:
    with pytest.raises(ConfigurationError, match="signing_key"):
        OrmCache.from_settings({"signing_key": "short", "regions": {"r": {"backend": "memory"}}})


def test_weak_or_wrong_keys_are_refused() -> None:
    for key in ("", b"", "short", " " * 20, 16, None, b"fifteen-bytes!!"):
        with pytest.raises(ConfigurationError, match="at least 16 characters"):
            SignedSerializer(key)  # type: ignore[arg-type]
    SignedSerializer(b"sixteen-bytes-ok")
    with pytest.raises(ConfigurationError, match="setting 'signing_key'"):
        OrmCache.from_settings({"signing_key": " " * 16, "regions": {"r": {"backend": "memory_pickle"}}})

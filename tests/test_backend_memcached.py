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

"""Joined and single-table inheritance: every table a result read is a
dependency, and the fast path steps aside for polymorphic loading."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import ForeignKey, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from ormcache import FromCache, OrmCache
from ormcache.testing import QueryCounter


class Base(DeclarativeBase):
    pass


class Asset(Base):
    __tablename__ = "assets"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(50))
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "asset"}


class Image(Asset):
    __tablename__ = "images"
    id: Mapped[int] = mapped_column(ForeignKey("assets.id"), primary_key=True)
    width: Mapped[int]
    __mapper_args__ = {"polymorphic_identity": "image"}


class Font(Asset):
    # single-table inheritance
    __mapper_args__ = {"polymorphic_identity": "font"}


@pytest.fixture
def env(tmp_path: Any) -> Iterator[tuple[Any, Any]]:
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    maker = sessionmaker(engine)
    with maker() as s:
        s.add_all([Image(id=1, name="logo", width=100), Font(id=2, name="serif"), Asset(id=3, name="raw")])
        s.commit()
    cache = OrmCache.from_settings(
        {"namespace": "in" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory_pickle"}}}
    )
    cache.attach(maker)
    yield engine, maker
    cache.close()
    engine.dispose()


def run(engine: Any, maker: Any, fn: Any) -> tuple[Any, int]:
    with QueryCounter(engine) as c, maker() as s:
        value = fn(s)
    return value, c.selects


def test_polymorphic_query_and_subtable_write(env: Any) -> None:
    engine, maker = env
    stmt = select(Asset).order_by(Asset.id).options(FromCache())

    def kinds(s: Any) -> list[tuple[str, str]]:
        return [(type(a).__name__, a.name) for a in s.scalars(stmt)]

    first = run(engine, maker, kinds)
    assert first[0] == [("Image", "logo"), ("Font", "serif"), ("Asset", "raw")]
    assert run(engine, maker, kinds)[1] == 0
    images = select(Image).options(FromCache())
    assert run(engine, maker, lambda s: s.scalars(images).one().width) == (100, 1)
    assert run(engine, maker, lambda s: s.scalars(images).one().width) == (100, 0)
    with maker() as s:
        s.get(Image, 1).width = 200  # writes only the images table
        s.commit()
    assert run(engine, maker, lambda s: s.scalars(images).one().width) == (200, 1)
    assert run(engine, maker, kinds)[1] == 0  # read assets only: still valid


def test_subclass_get_depends_on_both_tables(env: Any) -> None:
    engine, maker = env

    def width(s: Any) -> int:
        return s.get(Image, 1, options=[FromCache()]).width

    assert run(engine, maker, width) == (100, 1)
    assert run(engine, maker, width) == (100, 0)
    with maker() as s:
        s.get(Asset, 1).name = "renamed"  # the base table only
        s.commit()
    assert run(engine, maker, lambda s: s.get(Image, 1, options=[FromCache()]).name) == ("renamed", 1)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE images SET width = 300")
    assert run(engine, maker, width) == (300, 1)


def test_orm_bulk_insert_and_update_by_key_of_a_subclass_write_every_table(env: Any) -> None:
    """``insert(Image)`` with rows and ``update(Image)`` by primary key run
    once per table of the class, each run the user's statement annotated
    with the table it writes: the base table's writes must be seen."""
    from sqlalchemy import insert, update

    engine, maker = env
    names = select(Asset).order_by(Asset.id).options(FromCache())

    def listed(s: Any) -> list[str]:
        return [a.name for a in s.scalars(names)]

    def got(s: Any) -> str:
        return s.get(Asset, 1, options=[FromCache()]).name

    assert run(engine, maker, listed)[0] == ["logo", "serif", "raw"]
    assert run(engine, maker, got) == ("logo", 1)
    with maker() as s:
        s.execute(insert(Image), [{"id": 4, "name": "inserted", "width": 5}])
        s.commit()
    assert run(engine, maker, listed) == (["logo", "serif", "raw", "inserted"], 1)
    assert run(engine, maker, got)[0] == "logo"
    with maker() as s:
        s.execute(update(Image), [{"id": 1, "name": "renamed"}])  # the base table's column only
        s.commit()
    assert run(engine, maker, listed)[0] == ["renamed", "serif", "raw", "inserted"]
    assert run(engine, maker, got)[0] == "renamed"

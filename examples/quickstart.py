"""The README's quickstart: an in-memory SQLite database and a memory region.

Run it with ``python -m examples.quickstart``.
"""

from __future__ import annotations

from sqlalchemy import ForeignKey, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from ormcache import FromCache, OrmCache, RelationshipCache
from ormcache.testing import QueryCounter


class Base(DeclarativeBase):
    pass


class Store(Base):
    __tablename__ = "stores"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    templates: Mapped[list[Template]] = relationship(back_populates="store")


class Template(Base):
    __tablename__ = "templates"
    id: Mapped[int] = mapped_column(primary_key=True)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id"))
    name: Mapped[str]
    store: Mapped[Store] = relationship(back_populates="templates")


def main() -> None:
    engine = create_engine("sqlite://")
    Base.metadata.create_all(engine)
    Session = sessionmaker(engine)
    with Session() as session:
        session.add(Store(id=1, name="Main St", templates=[Template(id=5, name="menu card")]))
        session.commit()

    cache = OrmCache.from_settings(
        {"regions": {"default": {"backend": "memory", "expiration_time": 300}}}
    )
    cache.attach(Session)

    stmt = select(Template).where(Template.id == 5).options(FromCache("default"))
    with QueryCounter(engine) as counter:
        for attempt in ("first", "second"):
            counter.reset()
            with Session() as session:
                template = session.scalars(stmt).one()
                same = session.get(Template, 5, options=[FromCache("default")])
                assert same is template
            print(f"{attempt} run: {template.name!r}, database queries: {counter.selects}")

        with Session() as session:  # a write invalidates what read the table
            session.get(Template, 5).name = "menu card v2"
            session.commit()
        counter.reset()
        with Session() as session:
            print(f"after a write: {session.scalars(stmt).one().name!r}, "
                  f"database queries: {counter.selects}")

        opt = RelationshipCache(Store.templates, "default")
        for attempt in ("first", "second"):
            counter.reset()
            with Session() as session:
                store = session.scalars(select(Store).options(opt)).one()
                names = [t.name for t in store.templates]
            print(f"{attempt} lazy load: {names}, database queries: {counter.selects}")


if __name__ == "__main__":
    main()

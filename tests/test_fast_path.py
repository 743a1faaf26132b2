"""The fast hit path (``ormcache._loading``): from the second hit of a
statement shape on, objects are built from the cached rows without
SQLAlchemy's loader.  What it returns must be what SQLAlchemy returns."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import ForeignKey, String, TypeDecorator, create_engine, event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from ormcache import FromCache, OrmCache
from ormcache.testing import QueryCounter


pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")


class Base(DeclarativeBase):
    pass


class NoneAsEmpty(TypeDecorator[str]):
    """A type whose result processor has something to say about NULL."""

    impl = String
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> str:
        return "" if value is None else value


class Owner(Base):
    __tablename__ = "fp_owner"
    id: Mapped[int] = mapped_column(primary_key=True)
    profiles: Mapped[list["Profile"]] = relationship(order_by="Profile.id")
    # (noload is deprecated in SQLAlchemy 2.1, and still works)
    quiet: Mapped[list["Profile"]] = relationship(lazy="noload", viewonly=True)


class Profile(Base):
    __tablename__ = "fp_profile"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("fp_owner.id"))
    note: Mapped[str | None] = mapped_column(NoneAsEmpty(50), nullable=True)


class Pair(Base):
    """A two-column key, NULL in one of them on an outer join's missing row."""

    __tablename__ = "fp_pair"
    owner_id: Mapped[int] = mapped_column(ForeignKey("fp_owner.id"), primary_key=True)
    n: Mapped[int] = mapped_column(primary_key=True)


class Fresh(Base):
    __tablename__ = "fp_fresh"
    __mapper_args__ = {"always_refresh": True}
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]


HITS = 3  # the first hit replays through SQLAlchemy; later ones take the fast path


@pytest.fixture
def env(tmp_path: Any) -> Iterator[tuple[Any, Any]]:
    engine = create_engine(f"sqlite:///{tmp_path}/fast.db")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Owner(id=1), Owner(id=2), Profile(id=10, owner_id=1, note=None)])
        s.add_all([Pair(owner_id=1, n=1), Fresh(id=1, name="db")])
        s.commit()
    cache = OrmCache.from_settings(
        {"namespace": "fp" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}}
    )
    maker = sessionmaker(engine)
    cache.attach(maker)
    yield engine, maker
    cache.close()
    engine.dispose()


def test_an_outer_joins_missing_row_is_none(env: Any) -> None:
    """An outer-joined entity's row of NULLs is None, as SQLAlchemy gives
    it, never an object of NULL attributes put in the identity map."""
    engine, maker = env
    stmt = select(Profile).select_from(Owner).outerjoin(Profile, Profile.owner_id == Owner.id)
    stmt = stmt.order_by(Owner.id)
    with Session(engine) as s:
        expected = [p and p.id for p in s.scalars(stmt)]
    assert expected == [10, None]
    for _ in range(HITS):
        with maker() as s:
            got = s.scalars(stmt.options(FromCache())).all()
            assert [p and p.id for p in got] == expected
            assert len(s.identity_map) == 1


def test_a_composite_keys_missing_row_is_none(env: Any) -> None:
    engine, maker = env
    stmt = select(Pair).select_from(Owner).outerjoin(Pair, Pair.owner_id == Owner.id)
    stmt = stmt.order_by(Owner.id)
    for _ in range(HITS):
        with maker() as s:
            got = s.scalars(stmt.options(FromCache())).all()
            assert [p and (p.owner_id, p.n) for p in got] == [(1, 1), None]
            assert len(s.identity_map) == 1


def test_a_result_processor_is_given_null_too(env: Any) -> None:
    engine, maker = env
    for _ in range(HITS):
        with maker() as s:
            assert s.get(Profile, 10, options=[FromCache()]).note == ""  # type: ignore[union-attr]
        with maker() as s:
            stmt = select(Profile).where(Profile.id == 10).options(FromCache())
            assert s.scalars(stmt).one().note == ""


def test_always_refresh_overwrites_what_the_session_holds(env: Any) -> None:
    """``always_refresh`` mappers: every load overwrites the object in the
    session, a hit included (as the uncached query does)."""
    engine, maker = env
    for _ in range(HITS):
        with maker() as s:
            fresh = s.get(Fresh, 1)
            fresh.name = "local"  # type: ignore[union-attr]
            with s.no_autoflush:
                got = s.scalars(select(Fresh).where(Fresh.id == 1).options(FromCache())).one()
            assert got is fresh and got.name == "db"


def test_a_load_listener_registered_after_the_first_hits(env: Any) -> None:
    engine, maker = env
    stmt = select(Owner).where(Owner.id == 1).options(FromCache())
    for _ in range(HITS):
        with maker() as s:
            s.scalars(stmt).one()
    loaded: list[Any] = []

    def on_load(target: Any, context: Any) -> None:
        loaded.append(target)

    event.listen(Owner, "load", on_load)
    try:
        with QueryCounter(engine) as counter, maker() as s:
            owner = s.scalars(stmt).one()
        assert counter.selects == 0 and loaded == [owner]
    finally:
        event.remove(Owner, "load", on_load)


@pytest.mark.parametrize("where", ["subquery", "cte"])
def test_a_locking_select_inside_a_statement_is_never_cached(env: Any, where: str) -> None:
    """``with_for_update()`` in a subquery or a CTE locks rows (on
    databases that have FOR UPDATE): such a statement runs every time, as
    a top-level ``with_for_update()`` does."""
    engine, maker = env
    locking = select(Profile.owner_id).where(Profile.id == 10).with_for_update()
    if where == "subquery":
        stmt = select(Owner).where(Owner.id.in_(locking.scalar_subquery()))
    else:
        cte = locking.cte()
        stmt = select(Owner).join(cte, cte.c.owner_id == Owner.id)
    for _ in range(2):
        with QueryCounter(engine) as counter, maker() as s:
            assert [o.id for o in s.scalars(stmt.options(FromCache()))] == [1]
        assert counter.selects == 1


@pytest.mark.parametrize(
    "how", ["suffix", "text condition", "text subquery", "share mode", "no locking word"]
)
def test_a_locking_clause_written_as_sql(how: str) -> None:
    """A locking clause given as SQL text (a suffix, a ``text()``
    fragment) makes the statement a locking one too: never cached."""
    from sqlalchemy import text
    from sqlalchemy.dialects import postgresql

    from ormcache.keys import _describe

    base = select(Owner).where(Owner.id > 0)
    stmt = {
        "suffix": base.suffix_with("FOR UPDATE SKIP LOCKED"),
        "text condition": select(Owner).where(text("id IN (SELECT id FROM fp_owner FOR NO KEY UPDATE)")),
        "text subquery": select(Owner).where(text("id IN (SELECT id FROM fp_owner for share)")),
        "share mode": base.suffix_with("LOCK IN SHARE MODE"),
        "no locking word": base.suffix_with("-- for the update screen"),
    }[how]
    cache_key = stmt._generate_cache_key()
    assert _describe(stmt, postgresql.dialect(), cache_key).locking is (how != "no locking word")


class Tagged(Base):
    """Equal by value, as some applications make their classes."""

    __tablename__ = "fp_tagged"
    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tagged) and self.label.lower() == other.label.lower()

    def __hash__(self) -> int:
        return hash(self.label.lower())


def test_unique_tells_objects_apart_by_identity(tmp_path: Any) -> None:
    """``unique()`` (and legacy ``Query.all()``, which applies it) keeps
    distinct objects that compare equal, as SQLAlchemy's loader does."""
    engine = create_engine(f"sqlite:///{tmp_path}/unique.db")
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Tagged(id=1, label="x"), Tagged(id=2, label="X")])
        s.commit()
    cache = OrmCache.from_settings({"namespace": "fu" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}})
    maker = sessionmaker(engine)
    cache.attach(maker)
    try:
        for _ in range(HITS):
            with maker() as s:
                assert [t.id for t in s.query(Tagged).options(FromCache()).order_by(Tagged.id).all()] == [1, 2]
            with maker() as s:
                stmt = select(Tagged).order_by(Tagged.id).options(FromCache())
                assert [t.id for t in s.scalars(stmt).unique()] == [1, 2]
    finally:
        cache.close()
        engine.dispose()


def test_a_noload_relationship_is_loaded_empty(env: Any) -> None:
    """``lazy="noload"``: SQLAlchemy's loader sets the attribute (None, or
    an empty collection) as loaded; a hit's object is the same."""
    from sqlalchemy import inspect

    engine, maker = env
    with Session(engine) as s:
        plain = s.get_one(Owner, 1)
        expected = inspect(plain).unloaded
    for _ in range(HITS):
        with maker() as s:
            owner = s.scalars(select(Owner).where(Owner.id == 1).options(FromCache())).one()
            assert inspect(owner).unloaded == expected and owner.quiet == []


def test_a_propagating_option_of_the_application_reaches_lazy_loads(tmp_path: Any) -> None:
    """A user-defined option that propagates to loaders (a tenant filter
    for lazy loads) is not part of SQLAlchemy's cache key, so not of the
    statement's shape: when one is given, SQLAlchemy's loader builds the
    objects and carries it to their lazy loads."""
    from sqlalchemy.orm.interfaces import UserDefinedOption

    class Tenant(UserDefinedOption):
        propagate_to_loaders = True

    cache = OrmCache.from_settings({"namespace": "fo" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}})
    engines, makers = [], []
    for name in ("a", "b"):  # two databases of one kind of dialect share shapes
        engine = create_engine(f"sqlite:///{tmp_path}/{name}.db")
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            s.add_all([Owner(id=1), Profile(id=10, owner_id=1, note="n")])
            s.commit()
        maker = sessionmaker(engine)
        cache.attach(maker)
        engines.append(engine)
        makers.append(maker)
    carried: list[bool] = []

    @event.listens_for(makers[1], "do_orm_execute")
    def lazy_loads(orm_context: Any) -> None:
        if orm_context.is_relationship_load:
            carried.append(any(isinstance(o, Tenant) for o in orm_context.user_defined_options))

    stmt = select(Owner).where(Owner.id == 1)
    try:
        for _ in range(HITS):  # without the option: the shape's fast path
            with makers[0]() as s:
                s.scalars(stmt.options(FromCache())).one()
        for _ in range(HITS):
            with makers[1]() as s:
                owner = s.scalars(stmt.options(FromCache(), Tenant())).one()
                assert [p.id for p in owner.profiles] == [10]
        assert carried == [True] * HITS
    finally:
        cache.close()
        for engine in engines:
            engine.dispose()


def test_a_plan_is_for_its_own_dialect() -> None:
    """Plans are kept by the dialect's id, which a new engine's dialect may
    take after a freed one: a plan is only used for its own dialect."""
    import weakref

    from sqlalchemy.dialects import sqlite

    from ormcache.keys import StatementShape

    shape = StatementShape(sql="SELECT 1", tables=(), mapper=object())
    first, second = sqlite.dialect(), sqlite.dialect()
    shape.set_plan(first, "plan of the first")
    assert shape.plan(first) == "plan of the first" and shape.plan(second) is None
    shape.plans[id(second)] = (weakref.ref(first), "plan of the first")  # as after id reuse
    assert shape.plan(second) is None


def test_load_options_a_listener_sets_are_honoured_from_the_first_hit_on(tmp_path: Any) -> None:
    """A ``do_orm_execute`` listener of the application (registered before
    the cache's) asks for ``populate_existing``, an ``identity_token`` or no
    autoflush with ``update_execution_options()``: SQLAlchemy applies those
    when it runs the statement, after the listeners, so the execution's
    ``load_options`` do not show them yet; every hit must honour them as
    the uncached query does."""
    from sqlalchemy import inspect

    class Base(DeclarativeBase):
        pass

    class Item(Base):
        __tablename__ = "listener_item"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str]

    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite")
    Base.metadata.create_all(engine)
    Session = sessionmaker(engine, expire_on_commit=False)
    Plain = sessionmaker(engine)
    asked: dict[str, Any] = {}

    swap: list[bool] = [False]

    @event.listens_for(Session, "do_orm_execute")
    def listener(state: Any) -> None:
        if state.is_select and not state.is_column_load and not state.is_relationship_load:
            if swap[0]:  # a statement of its own in place of the original
                state.statement = state.statement.execution_options(**asked)
            else:
                state.update_execution_options(**asked)

    cache = OrmCache.from_settings({"namespace": "lo" + uuid.uuid4().hex[:8], "regions": {"r": {"backend": "memory"}}})
    cache.attach(Session)
    cache.attach(Plain)
    with Plain() as s:
        s.add(Item(id=1, name="v1"))
        s.commit()
    stmt = select(Item).where(Item.id == 1).options(FromCache("r"))
    try:
        for n in range(2, 10):  # (the third and later hits take the fast path)
            swap[0] = n >= 6
            asked.clear()
            asked["populate_existing"] = True
            with Session() as s:
                obj = s.scalars(stmt).one()
                s.commit()  # (expire_on_commit=False: obj keeps its value)
                with Plain() as w:
                    w.get_one(Item, 1).name = f"v{n}"
                    w.commit()
                for _ in range(2):
                    with Plain() as w:
                        w.scalars(stmt).one()  # cached again
                s.scalars(stmt).one()
                assert obj.name == f"v{n}"
        for _ in range(4):
            asked.clear()
            asked["identity_token"] = "t1"
            with Session() as s:
                assert inspect(s.scalars(stmt).one()).identity_token == "t1"
        for _ in range(4):
            asked.clear()
            asked["autoflush"] = False
            with Session() as s:
                s.add(Item(id=2, name="new"))
                s.scalars(stmt).one()
                assert [o.id for o in s.new] == [2]  # not flushed
    finally:
        cache.close()
        engine.dispose()


def test_a_statements_own_load_options_keep_the_fast_path(env: Any, monkeypatch: Any) -> None:
    """Options a statement carries from the start (``autoflush=False``) are
    in the execution's load options already: its hits take the fast path
    (only a statement a listener put in place needs SQLAlchemy's run)."""
    from ormcache import _loading

    engine, Session = env
    built: list[bool] = []
    build = _loading.Plan.build

    def counting(self: Any, *args: Any, **kw: Any) -> Any:
        result = build(self, *args, **kw)
        built.append(result is not None)
        return result

    monkeypatch.setattr(_loading.Plan, "build", counting)
    stmt = select(Profile).where(Profile.id == 10).options(FromCache()).execution_options(autoflush=False)
    for _ in range(5):
        with Session() as s:
            s.scalars(stmt).one()
    assert built and all(built[-3:])


# -- statements of columns ------------------------------------------------


class Reading(Base):
    __tablename__ = "fp_reading"
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("fp_owner.id"))
    taken: Mapped[Any] = mapped_column(__import__("sqlalchemy").DateTime)
    amount: Mapped[Any] = mapped_column(__import__("sqlalchemy").Numeric(10, 2))
    data: Mapped[Any] = mapped_column(__import__("sqlalchemy").JSON, nullable=True)
    note: Mapped[str | None] = mapped_column(NoneAsEmpty(50), nullable=True)


def _columns_statements() -> dict[str, Any]:
    from sqlalchemy import func

    return {
        "columns": select(Reading.id, Reading.taken, Reading.amount, Reading.data, Reading.note).order_by(Reading.id),
        "one column": select(Reading.taken).order_by(Reading.id),
        "aggregate": select(func.count(Reading.id), func.sum(Reading.amount)),
        "grouped": select(Reading.owner_id, func.max(Reading.taken).label("last")).group_by(Reading.owner_id),
        "core": select(Reading.__table__.c.amount, Reading.__table__.c.note).order_by(Reading.__table__.c.id),
    }


@pytest.mark.parametrize("name", list(_columns_statements()))
def test_statements_of_columns_hit_without_a_connection(tmp_path: Any, name: str) -> None:
    """A statement of columns (an aggregate for a dashboard, say) is
    served from its rows and each column's result processor, as SQLAlchemy
    would give them: it was replayed through a connection checked out of
    the pool, which with ``pool_pre_ping`` cost a round trip to the
    database on every hit."""
    import datetime
    import decimal

    engine = create_engine(f"sqlite:///{tmp_path}/columns.db", pool_pre_ping=True)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        s.add_all([Owner(id=1), Owner(id=2)])
        s.add_all(
            [
                Reading(id=1, owner_id=1, taken=datetime.datetime(2024, 1, 2, 3, 4), amount=decimal.Decimal("1.50"), data={"a": [1]}),
                Reading(id=2, owner_id=2, taken=datetime.datetime(2024, 2, 3, 4, 5), amount=decimal.Decimal("2.25"), note="n"),
            ]
        )
        s.commit()
    cache = OrmCache.from_settings({"namespace": "fc" + uuid.uuid4().hex[:8], "regions": {"default": {"backend": "memory"}}})
    maker = sessionmaker(engine)
    cache.attach(maker)
    stmt = _columns_statements()[name]
    checkouts: list[int] = []
    event.listen(engine, "checkout", lambda *a: checkouts.append(1))
    try:
        with maker() as s:
            expected = s.execute(stmt).all()  # uncached
            keys = list(s.execute(stmt).keys())
        for i in range(HITS + 1):
            del checkouts[:]
            with maker() as s:
                result = s.execute(stmt.options(FromCache()))
                assert list(result.keys()) == keys
                rows = result.all()
            assert rows == expected
            assert [[type(v) for v in row] for row in rows] == [[type(v) for v in row] for row in expected]
            if i >= 2:
                # no connection on a hit; a Core statement (of no mapped
                # class) keeps its CursorResult (rowcount, context): replayed
                assert checkouts == ([1] if name == "core" else [])
        with maker() as s:
            assert s.scalars(stmt.options(FromCache())).all() == [row[0] for row in expected]
            assert s.execute(stmt.options(FromCache())).mappings().all() == [row._mapping for row in expected]
        with maker() as s:  # a write: the next read is the database's
            s.get_one(Reading, 1).amount = decimal.Decimal("9.00")
            s.commit()
        with maker() as s:
            assert s.execute(stmt.options(FromCache())).all() == s.execute(stmt).all()
    finally:
        cache.close()
        engine.dispose()

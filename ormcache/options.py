"""Query options that ask for a cached result.

:class:`FromCache` caches the statement it is attached to;
:class:`RelationshipCache` caches the lazy loads of a relationship on the
objects the statement loads.  Both are SQLAlchemy
:class:`~sqlalchemy.orm.UserDefinedOption` objects, read by the
``do_orm_execute`` listener that :meth:`ormcache.OrmCache.attach` installs::

    stmt = select(Template).where(Template.id == 5).options(FromCache("default"))
    template = session.scalars(stmt).one()

    session.get(Template, 5, options=[FromCache("default")])

    stmt = select(Store).options(RelationshipCache(Store.templates, "default"))

Unlike SQLAlchemy's own recipe, these options take part in SQLAlchemy's
compiled-statement cache key.  SQLAlchemy leaves user-defined options out of
that key (changelog #7394) and pairs cached and current options by position,
so a ``RelationshipCache`` added to a statement shape that was compiled
before without it would otherwise be silently dropped.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import ORMExecuteState, RelationshipProperty
from sqlalchemy.orm.interfaces import UserDefinedOption

__all__ = ["FromCache", "RelationshipCache"]


def _expiration(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise sa_exc.ArgumentError(
            f"expiration_time must be a number of seconds > 0, a timedelta "
            f"or None, not {value!r} (0 would expire every entry at once)"
        )
    try:
        return float(value)
    except OverflowError:  # (an int beyond floats: never expires, as inf)
        return float("inf")


class FromCache(UserDefinedOption):
    """Load the statement's result from a cache region.

    :param region: name of a region declared in the settings.
    :param cache_key: a string that names the result instead of the
      statement's parameters (useful for a huge ``IN`` list).  The SQL,
      database, shard and region are still part of the key.
    :param expiration_time: seconds after which an entry is not served,
      overriding the region's ``expiration_time``.
    """

    __slots__ = ("region", "cache_key", "expiration_time")

    propagate_to_loaders = False
    _is_has_cache_key = True

    def __init__(
        self,
        region: str = "default",
        *,
        cache_key: str | None = None,
        expiration_time: float | timedelta | None = None,
    ) -> None:
        if not isinstance(region, str) or not region:
            raise sa_exc.ArgumentError(f"region must be a region name, not {region!r}")
        if cache_key is not None and not isinstance(cache_key, str):
            raise sa_exc.ArgumentError(f"cache_key must be a string, not {cache_key!r}")
        self.region = region
        self.cache_key = cache_key
        self.expiration_time = _expiration(expiration_time)

    def _gen_cache_key(self, anon_map: Any, bindparams: Any) -> tuple[Any, ...]:
        # The class alone: enough to keep statements with and without the
        # option apart in the compiled cache, so that SQLAlchemy pairs
        # cached and current options correctly.  Region and key are read
        # from the current option at execution time.
        return (self.__class__,)

    def _for_execution(self, orm_context: ORMExecuteState) -> FromCache | None:
        return self

    def _clone(self, **kw: Any) -> FromCache:
        """A shallow copy, as SQLAlchemy makes of a statement's options when
        it copies the statement (``Select.params()`` on SQLAlchemy 2.0): its
        own ``_clone`` copies ``__dict__``, which slots leave out."""
        copy = self.__class__.__new__(self.__class__)
        for cls in type(self).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if hasattr(self, name):
                    setattr(copy, name, getattr(self, name))
        return copy

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.region!r})"


class RelationshipCache(FromCache):
    """Load a relationship's lazy loads from a cache region.

    :param attribute: the relationship, e.g. ``Store.templates``.
    :param region: name of a region declared in the settings.
    :param cache_key: not accepted (``ArgumentError``): every parent's load
      would share one entry.

    Chain several with :meth:`and_`.
    """

    __slots__ = ("_relationships",)

    propagate_to_loaders = True

    def __init__(
        self,
        attribute: Any,
        region: str = "default",
        *,
        cache_key: str | None = None,
        expiration_time: float | timedelta | None = None,
    ) -> None:
        if cache_key is not None:
            # one key for every parent's load: each would get the first one's rows
            raise sa_exc.ArgumentError(
                "RelationshipCache takes no cache_key: its lazy loads are keyed by "
                "their parent's key values"
            )
        if isinstance(attribute, str) and isinstance(getattr(region, "property", None), RelationshipProperty):
            raise sa_exc.ArgumentError(
                "RelationshipCache takes the relationship first, then the region: "
                "RelationshipCache(Parent.children, 'region')"
            )
        super().__init__(region, expiration_time=expiration_time)
        prop = getattr(attribute, "property", None)
        if not isinstance(prop, RelationshipProperty):
            raise sa_exc.ArgumentError(
                f"RelationshipCache needs a relationship attribute such as "
                f"Store.templates, not {attribute if prop is not None else repr(attribute)}"
            )
        self._relationships: dict[tuple[type, str], RelationshipCache] = {
            (prop.parent.class_, prop.key): self
        }

    def and_(self, option: RelationshipCache) -> RelationshipCache:
        """Also cache the relationship of ``option``; returns ``self``."""
        if not isinstance(option, RelationshipCache):
            raise sa_exc.ArgumentError(
                f"RelationshipCache.and_() takes another RelationshipCache, not {option!r}"
            )
        self._relationships.update(option._relationships)
        return self

    def _gen_cache_key(self, anon_map: Any, bindparams: Any) -> tuple[Any, ...]:
        return (
            self.__class__,
            tuple(sorted((c.__module__, c.__qualname__, k) for c, k in self._relationships)),
        )

    def _for_execution(self, orm_context: ORMExecuteState) -> FromCache | None:
        path = orm_context.loader_strategy_path
        if not path or not orm_context.is_relationship_load:
            return None
        if orm_context.load_options._refresh_state is not None:
            # Session.refresh() or expired attributes of an object a cached
            # lazy load brought: they ask the database (the option travels
            # with the object's load path)
            return None
        mapper, prop = path[-2:]
        key = getattr(prop, "key", None)
        class_ = getattr(mapper, "class_", None)
        if key is None or class_ is None:
            return None
        for cls in class_.__mro__:
            option = self._relationships.get((cls, key))
            if option is not None:
                return option
        return None

    def __repr__(self) -> str:
        names = ", ".join(f"{c.__name__}.{k}" for c, k in self._relationships)
        return f"RelationshipCache({names}, {self.region!r})"

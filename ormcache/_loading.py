"""The fast hit path: ORM instances built straight from cached rows.

For the most common cached statements (one plain mapped class, no loader
options, no inheritance, no eager loaders: ``session.get`` and
``select(Model).where(...)``) going through SQLAlchemy's whole execution
pipeline costs more than the database query it replaces.  For those, a
:class:`Plan` built from the first (replayed) execution in this process
maps each column attribute to its position in the cached DBAPI row and its
result processor, and a hit builds instances the way
``sqlalchemy.orm.loading`` does for new rows: into the instance's state and
the session's identity map.

Whenever an instance with the same identity is already in the session, the
existing object is returned untouched (pending changes are kept), unless
it has expired or unloaded attributes, in which case the plan steps aside
and the regular replay path refreshes them exactly as SQLAlchemy would.

Private SQLAlchemy API used here (supported 2.0.30 to 2.1.x):
``CursorResultMetaData._keymap`` records, ``IdentityMap._add_unpresent``,
``InstanceState`` attributes ``key``, ``identity_token`` and
``session_id``, ``Result._source_supports_scalars``.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

from sqlalchemy import Column
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.engine.cursor import MD_INDEX, MD_PROCESSOR
from sqlalchemy.engine.result import IteratorResult
from sqlalchemy.orm import Mapper, ORMExecuteState, RelationshipProperty
from sqlalchemy.orm.base import instance_state
from sqlalchemy.util import immutabledict

from . import _compat
from ._compat import entity_result_metadata
from .options import FromCache

__all__ = ["ColumnsPlan", "Plan", "eligible_columns", "eligible_mapper", "make_columns_plan", "make_plan"]

#: relationship loaders that leave a new object's attribute unloaded (as
#: the plan does); "noload" sets it to None, loaded, which the plan does not
_LAZY_OK = frozenset({"select", True, "raise", "raise_on_sql", "dynamic", "write_only"})
_ATTRIBUTES = immutabledict({"filtered": True, "is_single_entity": True})


def _plain_options(options: Any) -> bool:
    """Whether ``options`` are ormcache's own ``FromCache`` options only,
    none propagating to the loaded objects' loads."""
    for opt in options:
        if not isinstance(opt, FromCache) or opt.propagate_to_loaders:
            return False
    return True


def _plain_execution(orm_context: ORMExecuteState, load_options: Any) -> bool:
    """Whether the execution asks for nothing a plan leaves out: no
    ``tuples()`` or ``yield_per``, no load options an earlier listener set
    (SQLAlchemy's own run applies them), and ormcache's options only
    (user-defined options are not part of SQLAlchemy's cache key, so not of
    the statement's shape: one that propagates to the objects' loads, a
    tenant filter for their lazy loads, needs SQLAlchemy's loader)."""
    return not (
        load_options._only_return_tuples
        or load_options._yield_per
        or not _compat.LOAD_OPTION_KEYS.isdisjoint(_compat.options_from_listeners(orm_context))
        or not _plain_options(getattr(orm_context.statement, "_with_options", ()))
    )


def _raw_keymap(result: Any) -> Any:
    """The keymap of the DBAPI result under an ORM ``result`` (column ->
    record of its index and result processor), or None (a Core
    statement's result is itself the CursorResult: no plan is made of it)."""
    return getattr(getattr(getattr(result, "raw", None), "_metadata", None), "_keymap", None)


def eligible_mapper(statement: Any) -> Mapper[Any] | None:
    """The mapper of a statement the fast path can serve, else None.
    Depends on the statement's structure only."""
    try:
        options = statement._with_options
        descriptions = statement.column_descriptions
    except AttributeError:
        return None
    if not _plain_options(options):
        return None
    if len(descriptions) != 1:
        return None
    entity = descriptions[0].get("entity")
    expr = descriptions[0].get("expr")
    if entity is None or expr is not entity:
        return None
    mapper: Mapper[Any] | None = getattr(entity, "__mapper__", None)
    if mapper is None or mapper.inherits is not None or mapper.polymorphic_on is not None:
        return None
    if mapper.version_id_col is not None or mapper.with_polymorphic or mapper.always_refresh:
        return None
    for prop in mapper.column_attrs:
        if prop.deferred or len(prop.columns) != 1 or not isinstance(prop.columns[0], Column):
            return None
    for rel in mapper.relationships:
        if not isinstance(rel, RelationshipProperty) or rel.lazy not in _LAZY_OK:
            return None
    manager = mapper.class_manager
    if manager.dispatch.load or manager.dispatch.refresh:
        return None
    return mapper


class Plan:
    """How to build one mapper's instances from one statement's raw rows."""

    __slots__ = (
        "mapper",
        "pk",
        "metadata",
        "_new",
        "_identity_class",
        "_keys",
        "_pk_index",
        "_plain_keys",
        "_plain_values",
        "_converted",
        "_no_identity",
    )

    def __init__(
        self,
        mapper: Mapper[Any],
        columns: list[tuple[str, int, Any]],
        pk: list[tuple[int, Any]],
        label: str,
    ) -> None:
        self.mapper = mapper
        self.pk = pk
        self.metadata = entity_result_metadata(label, mapper.class_)
        self._new = mapper.class_manager.new_instance
        self._identity_class = mapper._identity_class
        self._keys = [key for key, _, _ in columns]
        #: a one-column primary key read as it is: its index in the row
        self._pk_index = pk[0][0] if len(pk) == 1 and pk[0][1] is None else None
        #: the attributes whose values need no result processor, and a
        #: getter of their values (always a tuple)
        plain = [(key, i) for key, i, proc in columns if proc is None]
        self._plain_keys = tuple(key for key, _ in plain)
        self._plain_values = _tuple_getter([i for _, i in plain])
        self._converted = [(key, i, proc) for key, i, proc in columns if proc is not None]
        #: whether a row's key values name no object (an outer join's
        #: missing row), by the mapper's rule, as ``loading._instance``
        none = frozenset([None])
        self._no_identity = none.issuperset if mapper.allow_partial_pks else none.intersection

    def build(
        self, orm_context: ORMExecuteState, rows: Any, token: Any = None, shard: Any = None
    ) -> IteratorResult[Any] | None:
        """A result of live instances, or None when the regular path must
        be used (an existing instance needs attributes refreshed, or the
        execution asks for more than the plan does).  ``token``: the
        identity token (shard id) of the rows, if not the execution's;
        ``shard``: the one to use when the execution has none."""
        load_options = _compat.load_options(orm_context)
        if (
            orm_context.is_relationship_load
            or load_options._populate_existing
            or load_options._refresh_state is not None
            or not _plain_execution(orm_context, load_options)
        ):
            return None
        session = orm_context.session
        if session.dispatch.loaded_as_persistent:
            return None
        dispatch = self.mapper.class_manager.dispatch
        if dispatch.load or dispatch.refresh:
            return None  # a listener registered since the plan was made
        if token is None:
            token = load_options._identity_token
            if token is None:
                token = shard
        identity_map = session.identity_map
        identity_class = self._identity_class
        new = self._new
        pk = self.pk
        pk_index = self._pk_index
        plain_keys = self._plain_keys
        plain_values = self._plain_values
        converted = self._converted
        session_id = session.hash_key
        no_identity = self._no_identity
        objects: list[Any] = []
        for raw in rows:
            if pk_index is not None:
                ident: tuple[Any, ...] = (raw[pk_index],)
                if ident[0] is None:
                    objects.append(None)  # an outer join's missing row
                    continue
            else:
                ident = tuple([proc(raw[i]) if proc else raw[i] for i, proc in pk])
                if no_identity(ident):
                    objects.append(None)
                    continue
            key = (identity_class, ident, token)
            existing = identity_map.get(key)
            if existing is not None:
                state = instance_state(existing)
                dict_ = state.dict
                if state.expired_attributes or any(k not in dict_ for k in self._keys):
                    return None
                objects.append(existing)
                continue
            obj = new()
            state = instance_state(obj)
            dict_ = state.dict
            dict_.update(zip(plain_keys, plain_values(raw)))
            for attr, i, proc in converted:
                dict_[attr] = proc(raw[i])  # (NULL too, as SQLAlchemy does)
            state.key = key
            state.identity_token = token
            state.session_id = session_id
            identity_map._add_unpresent(state, key)
            objects.append(obj)
        result: IteratorResult[Any] = IteratorResult(self.metadata, iter(objects))
        result._attributes = _ATTRIBUTES
        result._source_supports_scalars = True
        return result


def _tuple_getter(indexes: list[int]) -> Any:
    """``row -> tuple of row[i] for i in indexes``."""
    if not indexes:
        return lambda row: ()
    if len(indexes) == 1:
        index = indexes[0]
        return lambda row: (row[index],)
    return itemgetter(*indexes)


def eligible_columns(statement: Any) -> bool:
    """Whether ``statement`` selects columns only (``select(Model.a,
    func.count(...))``), no entity, with ormcache's options only: its rows
    need no ORM loading, only each column's result processor
    (:class:`ColumnsPlan`; a Core statement's is only made if its result
    is the ORM's, see :func:`make_columns_plan`)."""
    try:
        options = statement._with_options
        descriptions = statement.column_descriptions
        statement.selected_columns  # noqa: B018
    except AttributeError:
        return False
    if not _plain_options(options) or not descriptions:
        return False
    for description in descriptions:
        expr = description.get("expr")
        if expr is None or expr is description.get("entity") or isinstance(expr, type):
            return False
        element = expr.__clause_element__() if hasattr(expr, "__clause_element__") else expr
        if not isinstance(element, ColumnElement):
            return False  # (an aliased entity, a Bundle, ...)
    return True


class ColumnsPlan:
    """How to build the result of a statement of columns from its raw
    rows, as :meth:`Result.freeze` would keep it, without checking a
    connection out of the pool (a replay does: with ``pool_pre_ping`` a
    round trip to the database per hit)."""

    __slots__ = ("metadata", "attributes", "scalars", "extract")

    def __init__(self, frozen: Any, extract: list[tuple[int, Any]]) -> None:
        self.metadata = frozen.metadata
        self.attributes = frozen._attributes
        self.scalars = frozen._source_supports_scalars
        self.extract = extract

    def data(self, rows: Any) -> list[Any]:
        extract = self.extract
        if self.scalars:
            ((i, proc),) = extract
            return [proc(raw[i]) if proc else raw[i] for raw in rows]
        return [tuple([proc(raw[i]) if proc else raw[i] for i, proc in extract]) for raw in rows]

    def build(
        self, orm_context: ORMExecuteState, rows: Any, token: Any = None, shard: Any = None
    ) -> IteratorResult[Any] | None:
        """The result, or None when the execution asks for more than the
        plan knows (options a listener set, ``yield_per``)."""
        if not _plain_execution(orm_context, _compat.load_options(orm_context)):
            return None
        result: IteratorResult[Any] = IteratorResult(self.metadata, iter(self.data(rows)))
        result._attributes = self.attributes
        result._source_supports_scalars = self.scalars
        return result


def make_columns_plan(statement: Any, result: Any, rows: Any) -> tuple[ColumnsPlan | None, Any]:
    """A plan from the result of a (replayed) execution of ``rows``, or
    None when it cannot be made or would not give the same rows; and a
    result to return in place of ``result``, which this reads."""
    # (not a Core statement's: its result is SQLAlchemy's CursorResult,
    # with rowcount, context and cursor, which a plan's result has not)
    keymap = _raw_keymap(result)
    if keymap is None:
        return None, result
    extract = []
    for column in statement.selected_columns:
        rec = keymap.get(column)
        if rec is None or rec[MD_INDEX] is None:
            return None, result
        extract.append((rec[MD_INDEX], rec[MD_PROCESSOR]))
    frozen = result.freeze()
    plan: ColumnsPlan | None = ColumnsPlan(frozen, extract)
    try:
        same = plan.data(rows) == [row if plan.scalars else tuple(row) for row in frozen.data]  # type: ignore[union-attr]
    except Exception:
        same = False
    return (plan if same else None), frozen()


def make_plan(mapper: Mapper[Any], result: Any) -> Plan | None:
    """A plan from the ORM result of a (replayed) execution, or None."""
    keymap = _raw_keymap(result)
    if keymap is None:
        return None
    try:
        label = list(result._metadata.keys)[0]
    except (AttributeError, IndexError):
        return None
    columns = []
    by_column: dict[Any, tuple[int, Any]] = {}
    for prop in mapper.column_attrs:
        col: Any = prop.columns[0]
        rec = keymap.get(col)
        if rec is None or rec[MD_INDEX] is None:
            return None
        columns.append((prop.key, rec[MD_INDEX], rec[MD_PROCESSOR]))
        by_column[col] = (rec[MD_INDEX], rec[MD_PROCESSOR])
    pk = []
    for col in mapper.primary_key:
        if col not in by_column:
            return None
        pk.append(by_column[col])
    return Plan(mapper, columns, pk, label)

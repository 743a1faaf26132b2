"""Statements for the ``ormcache warm`` test (imported by name)."""

from sqlalchemy import select

from ormcache import FromCache
from ormcache.testing.fixtures import Template

QUERIES = [select(Template).where(Template.id == i).options(FromCache()) for i in (1, 2, 3)]


def by_store(session: object) -> list[object]:
    return [select(Template).where(Template.store_id == s).options(FromCache()) for s in (1, 2)]


UNCACHED = [select(Template).where(Template.id == 1)]
NOT_STATEMENTS = 42


def failing(session: object) -> list[object]:
    raise ValueError("the application's own error")

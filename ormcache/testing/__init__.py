"""Test helpers that ship with ormcache.

* :class:`QueryCounter` counts the statements that really reached the
  database (replays of cached rows are not counted).
* :mod:`ormcache.testing.fixtures` holds the backend test suite as mixin
  classes; a backend's test module only names the backend and its
  arguments, so a user's own backend can run the same suite::

      from ormcache.testing.fixtures import BackendTests

      class TestMyBackend(BackendTests):
          backend = "myproject.cache.backend"
          arguments = {"url": "..."}
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

from .._replay import ReplayCursor

__all__ = ["QueryCounter"]


class QueryCounter:
    """Counts statements executed by the database behind ``engine``::

        with QueryCounter(engine) as counter:
            session.scalars(stmt).all()
        assert counter.selects == 0      # served from the cache
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.statements: list[str] = []

    def _after(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        context = args[-2]
        if type(getattr(context, "cursor", None)) is ReplayCursor:
            return
        self.statements.append(statement)

    @property
    def count(self) -> int:
        return len(self.statements)

    @property
    def selects(self) -> int:
        return sum(1 for s in self.statements if s.lstrip()[:6].upper().startswith(("SELECT", "WITH")))

    def reset(self) -> None:
        self.statements.clear()

    def __enter__(self) -> QueryCounter:
        event.listen(self.engine, "after_cursor_execute", self._after)
        return self

    def __exit__(self, *exc: Any) -> None:
        event.remove(self.engine, "after_cursor_execute", self._after)

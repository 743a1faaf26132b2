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

import re
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
        self._entered = 0

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
        """The statements that read: ``SELECT`` or ``WITH`` first, after
        any leading comments."""
        return sum(1 for s in self.statements if _LEADING_COMMENTS.sub("", s)[:6].upper().startswith(("SELECT", "WITH")))

    def reset(self) -> None:
        self.statements.clear()

    def __enter__(self) -> QueryCounter:
        if not self._entered:  # (entered again, nested: counts once)
            event.listen(self.engine, "after_cursor_execute", self._after)
        self._entered += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._entered -= 1
        if not self._entered:
            event.remove(self.engine, "after_cursor_execute", self._after)


#: whitespace, comments and opening parentheses before a statement's
#: first word ("(SELECT ...) UNION (SELECT ...)")
_LEADING_COMMENTS = re.compile(r"^(?:\s+|\(|--[^\n]*(?:\n|$)|/\*.*?\*/)*", re.DOTALL)

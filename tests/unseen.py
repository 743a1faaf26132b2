"""Writes that ormcache cannot see: made on a raw DBAPI connection, below
SQLAlchemy's execution events (as another program writing the database
would)."""

from __future__ import annotations

from typing import Any


def unseen_write(engine: Any, sql: str) -> None:
    """Run ``sql`` and commit, on a raw DBAPI connection of ``engine``."""
    raw = engine.raw_connection()
    try:
        raw.cursor().execute(sql)
        raw.commit()
    finally:
        raw.close()

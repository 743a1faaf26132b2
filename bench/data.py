"""The benchmark's data: SQLite files holding templates, shards, small rows.

Nothing here imports ormcache (``bench.overhead_child`` measures a process
where ormcache was never imported).

* ``templates``: ``n`` templates of about 2 KB (id, store_id, name,
  locale, version, body), 100 per ``store_id``, in one SQLite file.
* shards: the same table in ``count`` SQLite files, the templates spread
  over them round robin (template ``id`` lives in shard ``id % count``).
* ``small_rows``: ``n`` rows of two integers, for filling many cache
  entries cheaply (the invalidation scenario).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from sqlalchemy import Integer, String, Text, create_engine
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ROWS_PER_STORE = 100
BODY_SIZE = 2000

# a vocabulary for template bodies: text that compresses like real markup
# would (about 3x with zlib), rather than random bytes or one repeated letter
_WORDS = ["the", "order", "total", "shipping", "address", "customer", "invoice", "item", "price", "quantity", "discount", "tax", "subtotal", "delivery", "date", "store", "opening", "hours", "contact", "email", "phone", "thank", "you", "for", "your", "purchase", "please", "find", "attached", "receipt", "return", "policy", "within", "days", "of", "receipt", "card", "payment", "reference", "number", "account", "balance", "welcome", "newsletter", "offer", "valid", "until", "coupon", "code", "free", "gift", "menu", "lunch", "dinner", "special", "today", "chef", "soup", "salad", "dessert", "drink", "coffee", "tea", "wine", "beer", "table", "booking", "confirmed", "cancelled", "reminder", "tomorrow", "evening", "morning", "{{", "}}", "{%", "%}", "<div>", "</div>", "<p>", "</p>", "<span>", "</span>", "<br/>", "class=", "style=", "name", "first", "last", "street", "city", "zip", "country", "region"]


class Base(DeclarativeBase):
    pass


class Template(Base):
    __tablename__ = "templates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    store_id: Mapped[int] = mapped_column(Integer, index=True)
    name: Mapped[str] = mapped_column(String(100))
    locale: Mapped[str] = mapped_column(String(8))
    version: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)


class SmallRow(Base):
    __tablename__ = "small_rows"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[int] = mapped_column(Integer)


TEMPLATES = Base.metadata.tables["templates"]
SMALL_ROWS = Base.metadata.tables["small_rows"]


def body_text(rng: random.Random, size: int = BODY_SIZE) -> str:
    parts: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(_WORDS)
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:size]


def template_rows(ids: list[int], seed: int = 5) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "id": i,
            "store_id": (i - 1) // ROWS_PER_STORE + 1,
            "name": f"template-{i:07d}",
            "locale": rng.choice(("en_US", "en_GB", "fr_FR", "de_DE")),
            "version": rng.randint(1, 40),
            "body": body_text(rng),
        }
        for i in ids
    ]


def sqlite_engine(path: Path) -> Engine:
    return create_engine(f"sqlite:///{path}")


def create_templates(path: Path, count: int) -> None:
    """One SQLite file holding templates 1..count."""
    engine = sqlite_engine(path)
    try:
        Base.metadata.create_all(engine, tables=[TEMPLATES])
        with engine.begin() as conn:
            for start in range(1, count + 1, 5000):
                ids = list(range(start, min(start + 5000, count + 1)))
                conn.execute(TEMPLATES.insert(), template_rows(ids))
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
    finally:
        engine.dispose()


def shard_of(template_id: int, shards: int) -> int:
    return template_id % shards


def create_shards(directory: Path, shards: int, count: int) -> list[Path]:
    """``shards`` SQLite files; template ``i`` (1..count) lives in shard
    ``i % shards``."""
    directory.mkdir(parents=True, exist_ok=True)
    per_shard: dict[int, list[int]] = {s: [] for s in range(shards)}
    for i in range(1, count + 1):
        per_shard[shard_of(i, shards)].append(i)
    paths = []
    for s in range(shards):
        path = directory / f"shard-{s:03d}.db"
        engine = sqlite_engine(path)
        try:
            Base.metadata.create_all(engine, tables=[TEMPLATES])
            if per_shard[s]:
                with engine.begin() as conn:
                    conn.execute(TEMPLATES.insert(), template_rows(per_shard[s]))
        finally:
            engine.dispose()
        paths.append(path)
    return paths


def create_small_rows(path: Path, count: int) -> None:
    """``count`` rows (id, value) in ``small_rows``."""
    engine = sqlite_engine(path)
    try:
        Base.metadata.create_all(engine, tables=[SMALL_ROWS])
        with engine.begin() as conn:
            for start in range(1, count + 1, 100_000):
                stop = min(start + 100_000, count + 1)
                conn.exec_driver_sql(
                    "INSERT INTO small_rows (id, value) VALUES (?, ?)",
                    [(i, i * 7 % 1000) for i in range(start, stop)],
                )
    finally:
        engine.dispose()


def raw_size(row: Any) -> int:
    """Bytes of a DBAPI row's values: UTF-8 text, bytes, 8 per number."""
    size = 0
    for value in row:
        if value is None:
            continue
        if isinstance(value, str):
            size += len(value.encode("utf-8"))
        elif isinstance(value, (bytes, bytearray, memoryview)):
            size += len(value)
        else:
            size += 8
    return size

"""Build the template store: N SQLite shards, seeded and deterministic.

::

    layout = build_store(data_dir)                    # 101 shards, 10,100 templates
    layout = build_store(data_dir, shards=5, templates=500)

The same arguments always give the same data (``random.Random(seed)``).
Template ids ``1..templates`` and store ids ``1..stores`` are global and
shuffled over the shards, so an id says nothing about where it lives.
Each shard is written in one transaction, rows as plain tuples through the
driver's ``executemany`` with SQLite's journal off, and is stamped with
:data:`~examples.template_store.models.SCHEMA_REVISION` as ``alembic stamp
head`` would.  A manifest, ``store.json``, marks a store built here: it is
written as unfinished before the shards and completed last, and shard files
without one are refused rather than overwritten.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Column, MetaData, String, Table, create_engine, insert

from .models import SCHEMA_REVISION, Base
from .shards import find_shards, shard_ids, shard_path

__all__ = ["MANIFEST", "NOW", "StoreLayout", "build_store", "load_layout", "template_body"]

#: the manifest of a finished store, in its data directory
MANIFEST = "store.json"

#: "now" for the seeded data: events fall in the 30 days before it
NOW = datetime(2024, 6, 30, 12, 0, 0)
EVENT_DAYS = 30

KINDS = ("menu", "coupon", "event", "vcard", "wifi", "loyalty")
STATUSES = ("published",) * 17 + ("draft", "draft", "archived")
LOCALES = ("en", "en", "en", "de", "fr", "es", "it", "nl", "pt")
CITIES = ("Lyon", "Porto", "Leeds", "Gent", "Bremen", "Turin", "Malmo", "Graz", "Cork")
PLANS = ("free", "starter", "pro", "pro", "enterprise")
DEVICES = ("ios", "android", "android", "ios", "web")
COUNTRIES = ("FR", "PT", "GB", "BE", "DE", "IT", "SE", "AT", "IE", "NL")
EVENT_KINDS = ("view", "view", "view", "click", "click", "redeem", "share")
FONTS = ("Inter", "Roboto", "Lora", "Montserrat", "Source Serif")

_alembic_version = Table(
    "alembic_version",
    MetaData(),
    Column("version_num", String(32), primary_key=True),
)


@dataclass(frozen=True)
class StoreLayout:
    """What a built store holds (the content of its manifest)."""

    shards: int
    templates: int
    stores: int
    seed: int
    revision: str = SCHEMA_REVISION
    rows: dict[str, int] = field(default_factory=dict)
    """Rows per table, over all shards."""
    build_seconds: float = 0.0
    complete: bool = True
    """False while the store is being built."""

    @property
    def shard_ids(self) -> tuple[str, ...]:
        return shard_ids(self.shards)

    def same_store(self, other: StoreLayout) -> bool:
        """Whether ``other`` was built with the same arguments."""
        return (self.shards, self.templates, self.stores, self.seed, self.revision) == (
            other.shards,
            other.templates,
            other.stores,
            other.seed,
            other.revision,
        )


def load_layout(data_dir: str | Path) -> StoreLayout | None:
    """The layout of the finished store in ``data_dir``, or None."""
    path = Path(data_dir) / MANIFEST
    try:
        data = json.loads(path.read_text())
        layout = StoreLayout(**data)
    except (OSError, ValueError, TypeError):
        return None
    if not layout.complete or len(find_shards(data_dir)) != layout.shards:
        return None
    return layout


def template_body(
    rng: random.Random, template_id: int, kind: str, version: int, locale: str
) -> dict[str, Any]:
    """A QR-card layout: canvas, QR code placement, text fields, colours.
    About 1 KB of JSON."""
    width, height = rng.choice(((1050, 600), (600, 1050), (1200, 1200), (1748, 1240)))
    fields = []
    for n in range(rng.randint(4, 9)):
        fields.append(
            {
                "name": f"field_{n}",
                "x": rng.randrange(0, width - 100),
                "y": rng.randrange(0, height - 40),
                "font": rng.choice(FONTS),
                "size": rng.choice((12, 14, 18, 24, 32, 48)),
                "color": f"#{rng.getrandbits(24):06x}",
                "text": f"{kind.title()} line {n} for card {template_id}",
            }
        )
    return {
        "schema": 3,
        "version": version,
        "locale": locale,
        "canvas": {"width": width, "height": height, "dpi": 300},
        "background": f"#{rng.getrandbits(24):06x}",
        "qr": {
            "x": rng.randrange(20, width // 2),
            "y": rng.randrange(20, height // 2),
            "size": rng.choice((180, 240, 320)),
            "ecc": rng.choice("LMQH"),
            "target": f"https://qr.example/t/{template_id}",
        },
        "fields": fields,
    }


def _timestamp(value: datetime) -> str:
    """``value`` as SQLAlchemy's SQLite ``DateTime`` stores it."""
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


def _insert_sql(table: Table) -> str:
    """``INSERT`` of every column of ``table`` (but an autoincrement id) in
    table order, for ``executemany`` of plain tuples."""
    names = [c.name for c in table.columns if c is not table.autoincrement_column]
    return f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"


def build_store(
    data_dir: str | Path,
    *,
    shards: int = 101,
    templates: int = 10_100,
    stores_per_shard: int = 4,
    scans_per_template: int = 10,
    seed: int = 42,
    progress: Callable[[int], None] | None = None,
) -> StoreLayout:
    """Write ``shards`` SQLite files (``s000.db`` ...) and ``store.json``
    into ``data_dir``, replacing a store built there before.  Only the
    store's own files are touched, and shard files without a manifest are
    not taken for a store (``FileExistsError``).  ``progress(shards_done)``
    is called after each shard."""
    started = time.perf_counter()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    manifest = data_dir / MANIFEST
    existing = find_shards(data_dir)
    if existing and not manifest.exists():
        raise FileExistsError(
            f"{data_dir} holds databases named like shards ({next(iter(existing.values())).name} "
            f"...) but no {MANIFEST}: not a store built here, so it is left alone; "
            "choose another data directory"
        )
    unfinished = StoreLayout(
        shards=shards, templates=templates, stores=0, seed=seed, complete=False
    )
    manifest.write_text(json.dumps(asdict(unfinished)) + "\n")
    for path in existing.values():
        path.unlink()
    for suffix in ("-journal", "-wal", "-shm"):
        for path in data_dir.glob(f"s[0-9][0-9][0-9].db{suffix}"):
            path.unlink()

    rng = random.Random(seed)
    ids = shard_ids(shards)
    n_stores = shards * stores_per_shard
    store_ids = list(range(1, n_stores + 1))
    rng.shuffle(store_ids)
    store_shard = {sid: ids[i // stores_per_shard] for i, sid in enumerate(store_ids)}
    template_ids = list(range(1, templates + 1))
    rng.shuffle(template_ids)

    per_shard: dict[str, dict[str, list[tuple[Any, ...]]]] = {
        s: {"stores": [], "templates": [], "assets": [], "scans": [], "events": []} for s in ids
    }
    for sid in sorted(store_ids):
        per_shard[store_shard[sid]]["stores"].append(
            (
                sid,
                f"Store {sid}",
                rng.choice(CITIES),
                rng.choice(PLANS),
                _timestamp(NOW - timedelta(days=rng.randrange(60, 2000))),
            )
        )
    asset_id = 0
    for tid in template_ids:
        sid = rng.randrange(1, n_stores + 1)
        kind = rng.choice(KINDS)
        version = rng.randint(1, 12)
        locale = rng.choice(LOCALES)
        rows = per_shard[store_shard[sid]]
        rows["templates"].append(
            (
                tid,
                sid,
                f"{kind} card {tid}",
                kind,
                rng.choice(STATUSES),
                version,
                json.dumps(template_body(rng, tid, kind, version, locale)),
                _timestamp(NOW - timedelta(minutes=rng.randrange(60, 200_000))),
                locale,
            )
        )
        for asset_kind in rng.sample(("logo", "background", "font"), rng.randint(1, 3)):
            asset_id += 1
            rows["assets"].append(
                (
                    asset_id,
                    tid,
                    asset_kind,
                    f"assets/{tid}/{asset_kind}-{asset_id}.png",
                    rng.randrange(2_000, 900_000),
                    hashlib.sha256(f"{seed}:{asset_id}".encode()).hexdigest(),
                )
            )
    start = NOW - timedelta(days=EVENT_DAYS)
    span = EVENT_DAYS * 86_400
    for shard in ids:
        rows = per_shard[shard]
        owners = [(t[0], t[1]) for t in rows["templates"]]
        if not owners:
            continue
        count = len(owners) * scans_per_template
        offsets = sorted(rng.randrange(span) for _ in range(count))
        picks = rng.choices(owners, k=count)
        devices = rng.choices(DEVICES, k=count)
        countries = rng.choices(COUNTRIES, k=count)
        for (tid, sid), offset, device, country in zip(picks, offsets, devices, countries):
            scanned = _timestamp(start + timedelta(seconds=offset))
            rows["scans"].append((tid, sid, scanned, device, country))
            if rng.random() < 0.5:
                kind = rng.choice(EVENT_KINDS)
                rows["events"].append(
                    (
                        sid,
                        tid,
                        kind,
                        _timestamp(start + timedelta(seconds=offset + rng.randrange(1, 600))),
                        rng.randrange(100, 5_000) if kind == "redeem" else None,
                    )
                )

    totals = dict.fromkeys(("stores", "templates", "assets", "scan_events", "analytics_events"), 0)
    inserts = {
        key: _insert_sql(Base.metadata.tables[table])
        for key, table in zip(("stores", "templates", "assets", "scans", "events"), totals)
    }
    for done, shard in enumerate(ids, 1):
        rows = per_shard.pop(shard)
        engine = create_engine(f"sqlite:///{shard_path(data_dir, shard)}")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("PRAGMA journal_mode=OFF")
                conn.exec_driver_sql("PRAGMA synchronous=OFF")
                conn.commit()
                with conn.begin():
                    Base.metadata.create_all(conn)
                    _alembic_version.create(conn)
                    conn.execute(insert(_alembic_version), {"version_num": SCHEMA_REVISION})
                    for (name, sql), table in zip(inserts.items(), totals):
                        batch = rows[name]
                        if batch:
                            conn.exec_driver_sql(sql, batch)
                            totals[table] += len(batch)
        finally:
            engine.dispose()
        if progress is not None:
            progress(done)

    layout = StoreLayout(
        shards=shards,
        templates=templates,
        stores=n_stores,
        seed=seed,
        rows=totals,
        build_seconds=round(time.perf_counter() - started, 3),
    )
    manifest.write_text(json.dumps(asdict(layout), indent=2) + "\n")
    return layout

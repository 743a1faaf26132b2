"""The template store's schema: one copy in every shard.

A *store* (a shop, a venue) owns *templates*: the layouts printed on its
QR cards, kept as JSON with a version number that every edit bumps.  A
template has *assets* (logo, background image, fonts).  Every scan of a
printed card is a *scan event*; the pages a scan opens report *analytics
events* (views, clicks, redemptions, shares).

Ids are global: the application allocates them from one sequence for all
shards, so a template id is unique across the 101 shards, but the shard
that holds a template cannot be computed from its id (templates were
placed where their store lived at the time, and stores move).

The models describe the schema at the head revision of ``migrations/``
(:data:`SCHEMA_REVISION`); ``tests/test_migrations.py`` checks that the
migrations build exactly this schema.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "SCHEMA_REVISION",
    "AnalyticsEvent",
    "Asset",
    "Base",
    "ScanEvent",
    "Store",
    "Template",
]

#: the alembic revision these models describe (the head of migrations/)
SCHEMA_REVISION = "0002_template_locale"


class Base(DeclarativeBase):
    pass


class Store(Base):
    __tablename__ = "stores"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(80))
    city: Mapped[str] = mapped_column(String(60))
    plan: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime)

    templates: Mapped[list[Template]] = relationship(back_populates="store", order_by="Template.id")

    def __repr__(self) -> str:
        return f"Store(id={self.id!r}, name={self.name!r})"


class Template(Base):
    __tablename__ = "templates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    store_id: Mapped[int] = mapped_column(ForeignKey("stores.id"), index=True)
    name: Mapped[str] = mapped_column(String(120))
    kind: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(12))
    version: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime)
    # added by revision 0002_template_locale
    locale: Mapped[str] = mapped_column(String(16), server_default="en")

    store: Mapped[Store] = relationship(back_populates="templates")
    assets: Mapped[list[Asset]] = relationship(back_populates="template", order_by="Asset.id")

    def __repr__(self) -> str:
        return f"Template(id={self.id!r}, version={self.version!r})"


class Asset(Base):
    __tablename__ = "assets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    template_id: Mapped[int] = mapped_column(ForeignKey("templates.id"), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    path: Mapped[str] = mapped_column(String(200))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))

    template: Mapped[Template] = relationship(back_populates="assets")


class ScanEvent(Base):
    """One scan of a printed QR card."""

    __tablename__ = "scan_events"
    __table_args__ = (Index("ix_scan_events_store_time", "store_id", "scanned_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    template_id: Mapped[int] = mapped_column(Integer)
    store_id: Mapped[int] = mapped_column(Integer)
    scanned_at: Mapped[datetime] = mapped_column(DateTime)
    device: Mapped[str] = mapped_column(String(16))
    country: Mapped[str] = mapped_column(String(2))


class AnalyticsEvent(Base):
    """What happened on the page a scan opened."""

    __tablename__ = "analytics_events"
    __table_args__ = (Index("ix_analytics_events_store_time", "store_id", "occurred_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    store_id: Mapped[int] = mapped_column(Integer)
    template_id: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(12))
    occurred_at: Mapped[datetime] = mapped_column(DateTime)
    amount_cents: Mapped[int | None] = mapped_column(Integer)

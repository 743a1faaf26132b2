"""Templates get a locale ('en' for the existing ones).

Revision ID: 0002_template_locale
Revises: 0001_initial
Create Date: 2024-06-20

A new column changes what ``select(Template)`` returns: the application
keys the cache by this revision (``cache.use_schema_version``), so no entry
cached under 0001_initial is served once the shards are at 0002.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_template_locale"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("templates") as batch:
        batch.add_column(sa.Column("locale", sa.String(16), nullable=False, server_default="en"))


def downgrade() -> None:
    with op.batch_alter_table("templates") as batch:
        batch.drop_column("locale")

"""Baselines that growth cannot fool: the target's own `now()` when taken, per table the
count and a per-day histogram of creation times, the checks critical then, and a flag
for a baseline whose counts fell (kept, never chosen by default).

Older rows keep NULL in every new column: they are read as "counts only".

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("dbops_baselines") as batch:
        batch.add_column(sa.Column("db_now", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("tables", _JSON, nullable=True))
        batch.add_column(sa.Column("critical", _JSON, nullable=True))
        batch.add_column(sa.Column("flagged", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("dbops_baselines") as batch:
        batch.drop_column("flagged")
        batch.drop_column("critical")
        batch.drop_column("tables")
        batch.drop_column("db_now")

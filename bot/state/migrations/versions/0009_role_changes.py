"""Role changes take effect at once on every replica: the e-mail a known role was read by,
and a per-e-mail version of the LEAPS role changes the bot made.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("dbops_known_roles") as batch:
        batch.add_column(sa.Column("email", sa.String(320), nullable=True))
        batch.create_index("ix_dbops_known_roles_email", ["email"])
    op.create_table(
        "dbops_role_changes",
        sa.Column("email", sa.String(320), primary_key=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("dbops_role_changes")
    with op.batch_alter_table("dbops_known_roles") as batch:
        batch.drop_index("ix_dbops_known_roles_email")
        batch.drop_column("email")

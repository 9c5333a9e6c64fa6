"""Posts are marked sent only once Slack answered ok.

- `dbops_incident_reminders.sent_at`: NULL while a claimed reminder or template post has
  not been answered ok (a failed attempt frees the claim, a claim left by a dead process
  expires), so the next tick sends it again: at least once, never zero times.
  `payload` keeps what a template post needs to be retried by the tick.
- `dbops_watchdog_checks.alerted`: whether the last alert Slack accepted for the check was
  its critical one; the watchdog posts while it differs from the status.

Rows from before count as sent (and alerted when critical), as they were.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("dbops_incident_reminders") as batch:
        batch.add_column(sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("payload", _JSON, nullable=True))
    op.execute("UPDATE dbops_incident_reminders SET sent_at = fired_at")
    with op.batch_alter_table("dbops_watchdog_checks") as batch:
        batch.add_column(
            sa.Column("alerted", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.execute(sa.text("UPDATE dbops_watchdog_checks SET alerted = (status = 'crit')"))


def downgrade() -> None:
    with op.batch_alter_table("dbops_watchdog_checks") as batch:
        batch.drop_column("alerted")
    with op.batch_alter_table("dbops_incident_reminders") as batch:
        batch.drop_column("payload")
        batch.drop_column("sent_at")

"""Approvals: the terminal state `cancelled`, where a request came from (`origin`), and
when a sweeper took a stuck execution over (`taken_over_at`).

`cancelled`: the plan could not be shown (Slack refused the thread), so nobody could
approve it. `origin`: `slack` or `console`; only console requests are approvable from
the console. `taken_over_at`: a sweep that is still verifying owns the row; another
sweep leaves it alone until that one is presumed dead too. Rows from before this revision
are slack's, except the console's own channel id, which the console has always used.

SQLite cannot alter a CHECK constraint: the table is rebuilt (batch mode). Dropping the
old table would cascade into the decisions (foreign keys are on), so they are kept
aside and put back.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the vocabularies as they are at this revision.
_OLD_STATES = "'pending', 'executing', 'done', 'failed', 'rejected', 'expired', 'aborted'"
_STATES = _OLD_STATES + ", 'cancelled'"
_ORIGINS = "'slack', 'console'"


def _alter(states: str, *, add_origin: bool) -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    if sqlite:
        op.execute("CREATE TEMP TABLE keep_0003 AS SELECT * FROM dbops_approval_decisions")
    with op.batch_alter_table("dbops_approvals") as batch:
        batch.drop_constraint("ck_dbops_approvals_state", type_="check")
        batch.create_check_constraint("ck_dbops_approvals_state", sa.text(f"state IN ({states})"))
        if add_origin:
            batch.add_column(
                sa.Column("origin", sa.String(16), nullable=False, server_default="slack")
            )
            batch.create_check_constraint(
                "ck_dbops_approvals_origin", sa.text(f"origin IN ({_ORIGINS})")
            )
            batch.add_column(sa.Column("taken_over_at", sa.DateTime(timezone=True), nullable=True))
        else:
            batch.drop_column("taken_over_at")
            batch.drop_constraint("ck_dbops_approvals_origin", type_="check")
            batch.drop_column("origin")
    if sqlite:
        op.execute("DELETE FROM dbops_approval_decisions WHERE id IN (SELECT id FROM keep_0003)")
        op.execute("INSERT INTO dbops_approval_decisions SELECT * FROM keep_0003")
        op.execute("DROP TABLE keep_0003")


def upgrade() -> None:
    _alter(_STATES, add_origin=True)
    op.execute("UPDATE dbops_approvals SET origin = 'console' WHERE channel_id = 'console'")


def downgrade() -> None:
    op.execute("UPDATE dbops_approvals SET state = 'failed' WHERE state = 'cancelled'")
    _alter(_OLD_STATES, add_origin=False)

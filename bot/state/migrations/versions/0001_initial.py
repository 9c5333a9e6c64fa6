"""The state store's first tables: approvals, decisions, audit trail, refresh log.

Revision ID: 0001
Revises:
Create Date: 2025-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the vocabularies as they were at this revision.
_STATES = "'pending', 'executing', 'done', 'failed', 'rejected', 'expired', 'aborted'"
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "dbops_approvals",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("remedy", sa.Text(), nullable=False),
        sa.Column("args", _JSON, nullable=False),
        sa.Column("requester_id", sa.String(64), nullable=False),
        sa.Column("requester_name", sa.Text(), nullable=False),
        sa.Column("channel_id", sa.String(64), nullable=False),
        sa.Column("thread_ts", sa.String(32), nullable=True),
        sa.Column("message_ts", sa.String(32), nullable=True),
        sa.Column("plan", _JSON, nullable=False),
        sa.Column("plan_hash", sa.String(128), nullable=False),
        sa.Column("needed_approvals", sa.Integer(), nullable=False),
        sa.Column("approver_role", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_by", sa.Text(), nullable=True),
        sa.Column("outcome", _JSON, nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.CheckConstraint(f"state IN ({_STATES})", name="ck_dbops_approvals_state"),
        sa.CheckConstraint("needed_approvals >= 0", name="ck_dbops_approvals_needed"),
    )
    op.create_index("ix_dbops_approvals_state_expires", "dbops_approvals", ["state", "expires_at"])

    op.create_table(
        "dbops_approval_decisions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "approval_id",
            sa.String(32),
            sa.ForeignKey("dbops_approvals.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("user_name", sa.Text(), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("approval_id", "user_id", name="uq_dbops_approval_decisions_user"),
        sa.CheckConstraint(
            "decision IN ('approve', 'reject')", name="ck_dbops_approval_decisions_decision"
        ),
    )

    op.create_table(
        "dbops_audit",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor_id", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("approval_id", sa.String(32), nullable=True),
        sa.Column("channel_id", sa.String(64), nullable=True),
        sa.Column("detail", _JSON, nullable=False),
    )
    op.create_index("ix_dbops_audit_approval", "dbops_audit", ["approval_id", "id"])

    op.create_table(
        "dbops_refresh_log",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("view", sa.Text(), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rows", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("approval_id", sa.String(32), nullable=True),
        sa.Column("actor_id", sa.String(64), nullable=False),
        sa.CheckConstraint("mode IN ('concurrently', 'plain')", name="ck_dbops_refresh_log_mode"),
    )
    op.create_index("ix_dbops_refresh_log_view", "dbops_refresh_log", ["view", "id"])


def downgrade() -> None:
    op.drop_table("dbops_refresh_log")
    op.drop_table("dbops_audit")
    op.drop_table("dbops_approval_decisions")
    op.drop_table("dbops_approvals")

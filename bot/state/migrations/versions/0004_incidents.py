"""Incidents: the incident, its timeline, its SLA reminders, and the latest health seen.

One active (not yet recovered) incident per channel is a partial unique index, so two
replicas racing `/db incident start` in one channel cannot both win. A reminder is a row
with a unique (incident, milestone, epoch) key: the replica whose INSERT lands sends it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the vocabularies as they are at this revision.
_SEVERITIES = "'sev1', 'sev2', 'sev3'"
_STATES = "'open', 'resolved', 'recovered', 'reopened'"
_DETECTED_BY = "'since', 'watchdog', 'start'"
_ACTIVE = "state <> 'recovered'"
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _at(name: str, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "dbops_incidents",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("channel_id", sa.String(64), nullable=False),
        sa.Column("origin_channel_id", sa.String(64), nullable=True),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("severity", sa.String(8), nullable=False),
        sa.Column("commander_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        _at("detected_at"),
        sa.Column("detected_by", sa.String(16), nullable=False),
        _at("started_at"),
        _at("responded_at", True),
        _at("communicated_at", True),
        _at("resolved_at", True),
        _at("recovered_at", True),
        sa.Column("recovery_evidence", _JSON, nullable=True),
        sa.Column("header_ts", sa.String(32), nullable=True),
        sa.Column("header_digest", sa.String(64), nullable=True),
        sa.Column("reopened", sa.Integer(), nullable=False, server_default="0"),
        _at("updated_at"),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.CheckConstraint(f"severity IN ({_SEVERITIES})", name="ck_dbops_incidents_severity"),
        sa.CheckConstraint(f"state IN ({_STATES})", name="ck_dbops_incidents_state"),
        sa.CheckConstraint(
            f"detected_by IN ({_DETECTED_BY})", name="ck_dbops_incidents_detected_by"
        ),
    )
    op.create_index(
        "uq_dbops_incidents_active_channel",
        "dbops_incidents",
        ["channel_id"],
        unique=True,
        sqlite_where=sa.text(_ACTIVE),
        postgresql_where=sa.text(_ACTIVE),
    )
    op.create_index("ix_dbops_incidents_state", "dbops_incidents", ["state"])

    op.create_table(
        "dbops_incident_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "incident_id",
            sa.Integer(),
            sa.ForeignKey("dbops_incidents.id", ondelete="CASCADE"),
            nullable=False,
        ),
        _at("at"),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("actor_id", sa.String(64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("detail", _JSON, nullable=False),
    )
    op.create_index(
        "ix_dbops_incident_events_incident", "dbops_incident_events", ["incident_id", "id"]
    )

    op.create_table(
        "dbops_incident_reminders",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "incident_id",
            sa.Integer(),
            sa.ForeignKey("dbops_incidents.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("milestone", sa.String(16), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        _at("fired_at"),
        sa.Column("claimed_by", sa.Text(), nullable=False),
        sa.UniqueConstraint(
            "incident_id", "milestone", "epoch", name="uq_dbops_incident_reminders_once"
        ),
    )

    op.create_table(
        "dbops_health_seen",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        _at("at"),
        sa.Column("channel_id", sa.String(64), nullable=False),
        sa.Column("actor_id", sa.String(64), nullable=False),
        sa.Column("worst", sa.String(16), nullable=False),
        sa.Column("findings", _JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("dbops_health_seen")
    op.drop_table("dbops_incident_reminders")
    op.drop_index("ix_dbops_incident_events_incident", table_name="dbops_incident_events")
    op.drop_table("dbops_incident_events")
    op.drop_index("ix_dbops_incidents_state", table_name="dbops_incidents")
    op.drop_index("uq_dbops_incidents_active_channel", table_name="dbops_incidents")
    op.drop_table("dbops_incidents")

"""The bot's own tables (approvals, their decisions, the audit trail, the refresh log).

These ORM classes stay inside `bot.state`: the store hands callers frozen dataclasses, so no
session or lazy load ever leaks into a Slack listener. The schema itself is owned by the
Alembic revisions in `bot/state/migrations`; these classes must describe the same tables.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal, get_args

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ApprovalState = Literal[
    "pending", "executing", "done", "failed", "rejected", "expired", "aborted", "cancelled"
]
DecisionKind = Literal["approve", "reject"]
RefreshMode = Literal["concurrently", "plain"]
Origin = Literal["slack", "console"]  # where an approval was requested
APPROVAL_STATES: tuple[ApprovalState, ...] = get_args(ApprovalState)
DECISIONS: tuple[DecisionKind, ...] = get_args(DecisionKind)
REFRESH_MODES: tuple[RefreshMode, ...] = get_args(RefreshMode)
ORIGINS: tuple[Origin, ...] = get_args(Origin)
# The version table is ours too, so a shared database never mixes it up with another app's.
VERSION_TABLE = "dbops_alembic_version"


def _in(column: str, values: tuple[str, ...]) -> str:
    # Constant vocabularies only, never user input.
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out, whatever the backend keeps.

    PostgreSQL stores `timestamptz`; SQLite has no time zones, so it gets naive UTC text of a
    fixed width (which also makes `expires_at > :now` compare correctly as text).
    A naive datetime from a caller is a bug (whose local time?), so it is refused.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the state store wants aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONDoc = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONDoc}


class ApprovalRow(Base):
    __tablename__ = "dbops_approvals"
    __table_args__ = (
        CheckConstraint(_in("state", APPROVAL_STATES), name="ck_dbops_approvals_state"),
        CheckConstraint("needed_approvals >= 0", name="ck_dbops_approvals_needed"),
        CheckConstraint(_in("origin", ORIGINS), name="ck_dbops_approvals_origin"),
        Index("ix_dbops_approvals_state_expires", "state", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    remedy: Mapped[str] = mapped_column(Text)
    args: Mapped[list[str]] = mapped_column(JSONDoc)
    requester_id: Mapped[str] = mapped_column(String(64))
    requester_name: Mapped[str] = mapped_column(Text)
    channel_id: Mapped[str] = mapped_column(String(64))
    thread_ts: Mapped[str | None] = mapped_column(String(32))
    message_ts: Mapped[str | None] = mapped_column(String(32))
    plan: Mapped[dict[str, Any]]
    plan_hash: Mapped[str] = mapped_column(String(128))
    needed_approvals: Mapped[int] = mapped_column(Integer)
    approver_role: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    claimed_by: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[dict[str, Any] | None]
    version: Mapped[int] = mapped_column(Integer)
    origin: Mapped[str] = mapped_column(String(16), server_default="slack")
    taken_over_at: Mapped[datetime | None]  # a sweeper's take-over; `updated_at` keeps the claim


class DecisionRow(Base):
    __tablename__ = "dbops_approval_decisions"
    __table_args__ = (
        UniqueConstraint("approval_id", "user_id", name="uq_dbops_approval_decisions_user"),
        CheckConstraint(_in("decision", DECISIONS), name="ck_dbops_approval_decisions_decision"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    approval_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("dbops_approvals.id", ondelete="CASCADE")
    )
    user_id: Mapped[str] = mapped_column(String(64))
    user_name: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(64))
    decision: Mapped[str] = mapped_column(String(16))
    decided_at: Mapped[datetime]


class AuditRow(Base):
    __tablename__ = "dbops_audit"
    __table_args__ = (Index("ix_dbops_audit_approval", "approval_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    actor_id: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    approval_id: Mapped[str | None] = mapped_column(String(32))
    channel_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]]


class RefreshLogRow(Base):
    __tablename__ = "dbops_refresh_log"
    __table_args__ = (
        CheckConstraint(_in("mode", REFRESH_MODES), name="ck_dbops_refresh_log_mode"),
        Index("ix_dbops_refresh_log_view", "view", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    view: Mapped[str] = mapped_column(Text)
    mode: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    rows: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    approval_id: Mapped[str | None] = mapped_column(String(32))
    actor_id: Mapped[str] = mapped_column(String(64))


class KnownRoleRow(Base):
    """The last role resolved for each Slack user, so a target outage does not demote everyone."""

    __tablename__ = "dbops_known_roles"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)
    resolved_at: Mapped[datetime]

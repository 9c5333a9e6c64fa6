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
    Boolean,
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
    false,
)
from sqlalchemy import (
    text as sql_text,
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


# -- incidents (migration 0004) ---------------------------------------------------------------

Severity = Literal["sev1", "sev2", "sev3"]
IncidentState = Literal["open", "resolved", "recovered", "reopened"]
# Where `detected_at` came from: `--since`, the watchdog's first critical finding, or the start.
DetectedBy = Literal["since", "watchdog", "start"]
SEVERITIES: tuple[Severity, ...] = get_args(Severity)
INCIDENT_STATES: tuple[IncidentState, ...] = get_args(IncidentState)
DETECTED_BY: tuple[DetectedBy, ...] = get_args(DetectedBy)
# An incident holds its channel until it is fully recovered: recovery work after the
# resolution still joins its timeline, and its recovery clock still runs.
ACTIVE_INCIDENT = "state <> 'recovered'"


class IncidentRow(Base):
    __tablename__ = "dbops_incidents"
    __table_args__ = (
        CheckConstraint(_in("severity", SEVERITIES), name="ck_dbops_incidents_severity"),
        CheckConstraint(_in("state", INCIDENT_STATES), name="ck_dbops_incidents_state"),
        CheckConstraint(_in("detected_by", DETECTED_BY), name="ck_dbops_incidents_detected_by"),
        # One active incident per channel, enforced by the database (two replicas racing
        # `start` in one channel: the second INSERT fails).
        Index(
            "uq_dbops_incidents_active_channel",
            "channel_id",
            unique=True,
            sqlite_where=sql_text(ACTIVE_INCIDENT),
            postgresql_where=sql_text(ACTIVE_INCIDENT),
        ),
        Index("ix_dbops_incidents_state", "state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    channel_id: Mapped[str] = mapped_column(String(64))
    origin_channel_id: Mapped[str | None] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(Text)
    severity: Mapped[str] = mapped_column(String(8))
    commander_id: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str] = mapped_column(String(64))
    detected_at: Mapped[datetime]
    detected_by: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime]
    responded_at: Mapped[datetime | None]
    communicated_at: Mapped[datetime | None]
    resolved_at: Mapped[datetime | None]
    recovered_at: Mapped[datetime | None]
    recovery_evidence: Mapped[dict[str, Any] | None]
    header_ts: Mapped[str | None] = mapped_column(String(32))
    # The header as last posted: an edit is claimed by moving this (one replica edits).
    header_digest: Mapped[str | None] = mapped_column(String(64))
    reopened: Mapped[int] = mapped_column(Integer, server_default="0")  # times reopened
    updated_at: Mapped[datetime]
    version: Mapped[int] = mapped_column(Integer)


class IncidentEventRow(Base):
    """One line of an incident's timeline."""

    __tablename__ = "dbops_incident_events"
    __table_args__ = (Index("ix_dbops_incident_events_incident", "incident_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    incident_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("dbops_incidents.id", ondelete="CASCADE")
    )
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(String(32))
    actor_id: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    detail: Mapped[dict[str, Any]]


class IncidentReminderRow(Base):
    """An SLA reminder sent: the unique key makes it once per milestone, across replicas.

    `epoch` is the incident's reopen count, so a reopened incident's clocks remind again.
    """

    __tablename__ = "dbops_incident_reminders"
    __table_args__ = (
        UniqueConstraint(
            "incident_id", "milestone", "epoch", name="uq_dbops_incident_reminders_once"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    incident_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("dbops_incidents.id", ondelete="CASCADE")
    )
    milestone: Mapped[str] = mapped_column(String(16))
    epoch: Mapped[int] = mapped_column(Integer)
    fired_at: Mapped[datetime]  # when claimed (a claim of a dead process expires)
    claimed_by: Mapped[str] = mapped_column(Text)  # "": a failed attempt, free to claim
    # NULL until Slack answered ok: the next tick sends it again
    sent_at: Mapped[datetime | None]
    payload: Mapped[dict[str, Any] | None]  # what a template post needs to be retried


class HealthSeenRow(Base):
    """The worst findings of the latest `/db health` runs the bot saw (for App Home)."""

    __tablename__ = "dbops_health_seen"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime]
    channel_id: Mapped[str] = mapped_column(String(64))
    actor_id: Mapped[str] = mapped_column(String(64))
    worst: Mapped[str] = mapped_column(String(16))
    findings: Mapped[dict[str, Any]]


class KnownRoleRow(Base):
    """The last role resolved for each Slack user, so a target outage does not demote everyone."""

    __tablename__ = "dbops_known_roles"

    user_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))
    detail: Mapped[str | None] = mapped_column(Text)
    resolved_at: Mapped[datetime]
    # The Slack profile e-mail (lower case) its LEAPS role was read by; None for a role
    # from a user group, or a row kept before 0009. A set-role finds the rows to replace by it.
    email: Mapped[str | None] = mapped_column(String(320), index=True)


class RoleChangeRow(Base):
    """A LEAPS role change the bot made, per e-mail (lower case): `version` grows with each
    one, and every replica's resolver compares it with the version it saw when it cached
    a role read by that e-mail, so a set-role on one replica takes effect on all at once."""

    __tablename__ = "dbops_role_changes"

    email: Mapped[str] = mapped_column(String(320), primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(64))
    changed_at: Mapped[datetime]


class WatchdogCheckRow(Base):
    """The watchdog's last alerting status per health check, so a persisting problem is
    posted once across ticks, restarts and a change of leader."""

    __tablename__ = "dbops_watchdog_checks"

    check: Mapped[str] = mapped_column(String(128), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # ok | warn | crit
    summary: Mapped[str] = mapped_column(Text)
    changed_at: Mapped[datetime]  # when it entered this status (a crit: first seen)
    seen_at: Mapped[datetime]
    # the last alert Slack accepted was the critical one; posted while it differs from status
    alerted: Mapped[bool] = mapped_column(Boolean, server_default=false())


BASELINE_KINDS = ("hourly", "verification")


class BaselineRow(Base):
    __tablename__ = "dbops_baselines"
    __table_args__ = (
        CheckConstraint(_in("kind", BASELINE_KINDS), name="ck_dbops_baselines_kind"),
        Index("ix_dbops_baselines_target_kind_taken", "target", "kind", "taken_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    target: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16))
    taken_at: Mapped[datetime]
    counts: Mapped[dict[str, Any]]
    # Since 0007 (NULL in older rows: "counts only"): the target's own now() when taken,
    # per table its count and per-day histogram of creation times, the health checks
    # critical then, and why it is flagged (its counts fell: never chosen by default).
    db_now: Mapped[datetime | None]
    tables: Mapped[dict[str, Any] | None]
    critical: Mapped[list[str] | None] = mapped_column(JSONDoc)
    flagged: Mapped[str | None] = mapped_column(Text)

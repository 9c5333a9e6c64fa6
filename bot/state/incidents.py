"""Incidents in the state store: the incident, its timeline, its reminders, the health seen.

Every replica reads and writes the same rows, so nothing about an incident lives in a
process: a restart, or a click served by another replica, sees the same clocks and
timeline. The races are settled by the database, as for approvals: one active incident
per channel is a partial unique index; a reminder (or a template post) is sent by whoever
claims its row, and counts as sent only once Slack answered ok (`sent_at`): a failed
attempt frees the claim, a dead process's claim expires, and the next tick sends it; a
header edit by whoever moves its digest; the first response or communication is a
conditional `UPDATE ... WHERE responded_at IS NULL`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from bot.clock import Clock, SystemClock
from bot.state.models import (
    DETECTED_BY,
    INCIDENT_STATES,
    SEVERITIES,
    ApprovalRow,
    AuditRow,
    DetectedBy,
    HealthSeenRow,
    IncidentEventRow,
    IncidentReminderRow,
    IncidentRow,
    IncidentState,
    Severity,
)
from bot.state.store import Approval, StateStore, StateStoreError, _approval, _known, _utc

# The milestones a first event can reach by itself (the others have their own commands).
FirstMilestone = Literal["responded", "communicated"]
ACTIVE_STATES: tuple[IncidentState, ...] = ("open", "resolved", "reopened")
HEALTH_KEPT = timedelta(days=2)  # health seen is kept this long (App Home, detection)
WATCHDOG = "watchdog"  # the actor id the watchdog records its health runs under
# A claimed post not answered within this is the claim of a dead process: claimed again.
# Longer than the Slack client's worst case (its timeout times its attempts, and backoff).
CLAIM_LEASE = timedelta(minutes=2)
FREE = ""  # `claimed_by` of a claim whose attempt failed: the next tick takes it


@dataclass(frozen=True, slots=True)
class UnsentPost:
    """A claimed post (a template) that Slack has not answered ok yet."""

    incident_id: int
    milestone: str
    epoch: int
    payload: dict[str, Any]


class IncidentExists(StateStoreError):
    """The channel already has an active incident (the partial unique index said so)."""

    def __init__(self, existing: Incident | None) -> None:
        self.existing = existing
        what = f"incident #{existing.id} ({existing.title})" if existing else "an incident"
        super().__init__(f"this channel already has {what}")


@dataclass(frozen=True, slots=True)
class Incident:
    id: int
    channel_id: str
    origin_channel_id: str | None
    title: str
    severity: Severity
    commander_id: str
    state: IncidentState
    created_by: str
    detected_at: datetime
    detected_by: DetectedBy
    started_at: datetime
    responded_at: datetime | None
    communicated_at: datetime | None
    resolved_at: datetime | None
    recovered_at: datetime | None
    recovery_evidence: Mapping[str, Any] | None
    header_ts: str | None
    header_digest: str | None
    reopened: int
    updated_at: datetime
    version: int

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


@dataclass(frozen=True, slots=True)
class IncidentEvent:
    id: int
    incident_id: int
    at: datetime
    kind: str
    actor_id: str
    text: str
    detail: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class HealthSeen:
    at: datetime
    channel_id: str
    actor_id: str
    worst: str
    findings: Sequence[Mapping[str, Any]]


# Audit actions that join the timeline of the channel's incident: (kind, text template).
# Templates read the audit detail; `count`/`affected` are the rows the plan or run touched.
AUDIT_TIMELINE: dict[str, tuple[str, str]] = {
    "approval.requested": ("approval", "requested `{remedy}` ({count} rows planned)"),
    "approval.approved": ("approval", "approved `{remedy}`"),
    "approval.rejected": ("approval", "rejected `{remedy}`"),
    "approval.expired": ("approval", "approval of `{remedy}` expired"),
    "approval.cancelled": ("approval", "approval of `{remedy}` cancelled: {reason}"),
    "remedy.executed": ("remedy", "`{remedy}` done: {affected} rows changed. {summary}"),
    "remedy.failed": ("remedy", "`{remedy}` failed: {error}"),
    "remedy.aborted": ("remedy", "`{remedy}` aborted: {summary}"),
    "approval.swept": ("remedy", "`{remedy}` decided after a process died (landed: {landed})"),
    "runbook.step_done": ("remedy", "runbook step {step} `{remedy}` done: {summary}"),
    "runbook.stopped": ("remedy", "runbook stopped at step {step} (`{remedy}`): {why}"),
}
# Decisions a person makes count as the incident's first response.
HUMAN_AUDIT = frozenset({"approval.requested", "approval.approved", "approval.rejected"})


def _esc(value: object) -> str:
    return str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class _Blank(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "?"


class IncidentStore:
    """Incident methods on the state store's engine (each one short transaction)."""

    def __init__(self, store: StateStore, clock: Clock | None = None) -> None:
        self._store = store
        self.clock: Clock = clock or SystemClock()

    @classmethod
    def attach(cls, store: StateStore, clock: Clock | None = None) -> IncidentStore:
        """The incident store, hooked into the audit trail: every audited approval step in
        a channel with an active incident joins its timeline (the one place it happens)."""
        incidents = cls(store, clock)
        store.audit_hook = incidents.join_audit
        return incidents

    @property
    def state_store(self) -> StateStore:
        return self._store

    # -- incidents ----------------------------------------------------------------------------

    async def open_incident(
        self,
        *,
        channel_id: str,
        title: str,
        severity: Severity,
        commander_id: str,
        created_by: str,
        started_at: datetime,
        detected_at: datetime,
        detected_by: DetectedBy,
        origin_channel_id: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> Incident:
        """Open an incident with its first timeline event; `IncidentExists` if the channel
        has one already (also when another replica won the race a moment ago)."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}")
        if detected_by not in DETECTED_BY:
            raise ValueError(f"detected_by must be one of {DETECTED_BY}")
        at = _utc(started_at)
        row = IncidentRow(
            channel_id=channel_id,
            origin_channel_id=origin_channel_id,
            title=title,
            severity=severity,
            commander_id=commander_id,
            state="open",
            created_by=created_by,
            detected_at=_utc(detected_at),
            detected_by=detected_by,
            started_at=at,
            responded_at=None,
            communicated_at=None,
            resolved_at=None,
            recovered_at=None,
            recovery_evidence=None,
            header_ts=None,
            header_digest=None,
            reopened=0,
            updated_at=at,
            version=1,
        )
        try:
            async with self._store._tx() as session:
                session.add(row)
                await session.flush()
                session.add(
                    IncidentEventRow(
                        incident_id=row.id,
                        at=at,
                        kind="started",
                        actor_id=created_by,
                        text=f"incident started: {title} ({severity})",
                        detail=dict(detail or {}),
                    )
                )
        except IntegrityError:
            raise IncidentExists(await self.active_in(channel_id)) from None
        return _incident(row)

    async def get(self, incident_id: int) -> Incident | None:
        async with self._store._tx(write=False) as session:
            row = await session.get(IncidentRow, incident_id)
            return None if row is None else _incident(row)

    async def active_in(self, channel_id: str) -> Incident | None:
        """The channel's incident that is not yet recovered, if any."""
        stmt = select(IncidentRow).where(
            IncidentRow.channel_id == channel_id, _active(IncidentRow.state)
        )
        async with self._store._tx(write=False) as session:
            row = (await session.scalars(stmt)).one_or_none()
            return None if row is None else _incident(row)

    async def active(self) -> list[Incident]:
        stmt = select(IncidentRow).where(_active(IncidentRow.state)).order_by(IncidentRow.id)
        async with self._store._tx(write=False) as session:
            return [_incident(row) for row in (await session.scalars(stmt)).all()]

    async def first_detection(self) -> tuple[datetime, str] | None:
        """The earliest detection of the open incidents, and which one: where a loss had
        begun at the latest (`restore-from-copy --until` defaults to it)."""
        incidents = await self.active()
        if not incidents:
            return None
        first = min(incidents, key=lambda i: i.detected_at)
        return first.detected_at, f"incident #{first.id} ({first.title})"

    async def latest_in(self, channel_id: str) -> Incident | None:
        """The channel's most recent incident, active or not (for `reopen`)."""
        stmt = (
            select(IncidentRow)
            .where(IncidentRow.channel_id == channel_id)
            .order_by(IncidentRow.id.desc())
            .limit(1)
        )
        async with self._store._tx(write=False) as session:
            row = (await session.scalars(stmt)).one_or_none()
            return None if row is None else _incident(row)

    async def change(
        self,
        incident: Incident,
        *,
        from_states: Iterable[IncidentState],
        values: Mapping[str, Any],
        event: tuple[str, str, str, Mapping[str, Any]],
        at: datetime,
    ) -> Incident | None:
        """One conditional change of an incident plus its timeline event, atomically.

        `event` is (kind, actor, text, detail). None when the incident is no longer in
        one of `from_states` (another replica or person acted first). `IncidentExists`
        when reopening would give the channel a second active incident.
        """
        when = _utc(at)
        stmt = (
            update(IncidentRow)
            .where(IncidentRow.id == incident.id, IncidentRow.state.in_(tuple(from_states)))
            .values(**dict(values), updated_at=when, version=IncidentRow.version + 1)
            .returning(IncidentRow)
            .execution_options(synchronize_session=False)
        )
        kind, actor, text, detail = event
        try:
            async with self._store._tx() as session:
                row = (await session.scalars(stmt)).one_or_none()
                if row is None:
                    return None
                session.add(
                    IncidentEventRow(
                        incident_id=incident.id,
                        at=when,
                        kind=kind,
                        actor_id=actor,
                        text=text,
                        detail=dict(detail),
                    )
                )
                return _incident(row)
        except IntegrityError:
            raise IncidentExists(await self.active_in(incident.channel_id)) from None

    async def mark_detected(self, incident_id: int, at: datetime, by: DetectedBy) -> bool:
        """An earlier detection than the start (the watchdog's first critical finding);
        never overrides `--since`, never moves detection later. True if it moved."""
        when = _utc(at)
        stmt = (
            update(IncidentRow)
            .where(
                IncidentRow.id == incident_id,
                IncidentRow.detected_by != "since",
                IncidentRow.detected_at > when,
            )
            .values(detected_at=when, detected_by=by, version=IncidentRow.version + 1)
            .returning(IncidentRow.id)
            .execution_options(synchronize_session=False)
        )
        async with self._store._tx() as session:
            return (await session.execute(stmt)).first() is not None

    # -- the timeline -------------------------------------------------------------------------

    async def add_event(
        self,
        incident_id: int,
        *,
        kind: str,
        actor_id: str,
        text: str,
        at: datetime,
        detail: Mapping[str, Any] | None = None,
        reaches: Iterable[FirstMilestone] = (),
    ) -> IncidentEvent:
        """Append to the timeline; `reaches` sets those milestones if not yet reached."""
        async with self._store._tx() as session:
            return await _add_event(
                session, incident_id, kind, actor_id, text, _utc(at), detail or {}, reaches
            )

    async def add_event_in(
        self,
        channel_id: str,
        *,
        kind: str,
        actor_id: str,
        text: str,
        at: datetime,
        detail: Mapping[str, Any] | None = None,
        reaches: Iterable[FirstMilestone] = (),
    ) -> IncidentEvent | None:
        """Append to the timeline of the channel's active incident, if it has one."""
        async with self._store._tx() as session:
            incident_id = await _active_id(session, channel_id)
            if incident_id is None:
                return None
            return await _add_event(
                session, incident_id, kind, actor_id, text, _utc(at), detail or {}, reaches
            )

    async def timeline(self, incident_id: int) -> list[IncidentEvent]:
        stmt = (
            select(IncidentEventRow)
            .where(IncidentEventRow.incident_id == incident_id)
            .order_by(IncidentEventRow.at, IncidentEventRow.id)
        )
        async with self._store._tx(write=False) as session:
            return [_event(row) for row in (await session.scalars(stmt)).all()]

    async def join_audit(self, session: AsyncSession, row: AuditRow) -> None:
        """The audit hook: an approval step in a channel with an active incident joins its
        timeline in the audit's own transaction (so neither exists without the other)."""
        spec = AUDIT_TIMELINE.get(row.action)
        if spec is None:
            return
        channel_id = row.channel_id
        approval = await session.get(ApprovalRow, row.approval_id) if row.approval_id else None
        if channel_id is None and approval is not None:
            channel_id = approval.channel_id
        if channel_id is None:
            return
        incident_id = await _active_id(session, channel_id)
        if incident_id is None:
            return
        kind, template = spec
        # Summaries and errors come from the database: never markup in the timeline.
        values = _Blank({key: _esc(value) for key, value in row.detail.items()})
        if approval is not None:
            values.setdefault("remedy", approval.remedy)
            values.setdefault("count", (approval.plan or {}).get("count", "?"))
        text = template.format_map(values)
        detail = {"audit": row.action, "approval_id": row.approval_id, **row.detail}
        human = row.action in HUMAN_AUDIT and row.actor_id != "bot"
        await _add_event(
            session,
            incident_id,
            kind,
            row.actor_id,
            text,
            _utc(self.clock.now()),
            detail,
            ("responded",) if human else (),
        )

    # -- reminders and the header -------------------------------------------------------------

    async def claim_reminder(
        self,
        incident_id: int,
        milestone: str,
        epoch: int,
        *,
        at: datetime,
        claimer: str,
        payload: Mapping[str, Any] | None = None,
    ) -> bool:
        """True for exactly one caller per (incident, milestone, epoch), across replicas,
        until it is sent: a claim whose attempt failed (`release_reminder`), or that a dead
        process left for longer than `CLAIM_LEASE`, is claimed again. Only
        `mark_reminder_sent` (after Slack answered ok) makes it once and for all."""
        values: dict[str, Any] = {
            "incident_id": incident_id,
            "milestone": milestone,
            "epoch": epoch,
            "fired_at": _utc(at),
            "claimed_by": claimer,
            "payload": dict(payload) if payload is not None else None,
        }
        keys = ["incident_id", "milestone", "epoch"]
        row = IncidentReminderRow
        again = row.sent_at.is_(None) & (
            (row.claimed_by == FREE) | (row.fired_at < _utc(at) - CLAIM_LEASE)
        )
        take = {"fired_at": values["fired_at"], "claimed_by": claimer}
        if payload is not None:
            take["payload"] = values["payload"]
        async with self._store._tx() as session:
            if self._store.engine.dialect.name == "postgresql":
                pg = pg_insert(row).values(values)
                stmt = pg.on_conflict_do_update(
                    index_elements=keys, set_=take, where=again
                ).returning(row.id)
            else:
                lite = sqlite_insert(row).values(values)
                stmt = lite.on_conflict_do_update(
                    index_elements=keys, set_=take, where=again
                ).returning(row.id)
            return (await session.execute(stmt)).first() is not None

    async def release_reminder(self, incident_id: int, milestone: str, epoch: int) -> None:
        """A claim whose post Slack did not answer ok: free for the next tick to send."""
        async with self._store._tx() as session:
            await session.execute(
                update(IncidentReminderRow)
                .where(*_reminder_key(incident_id, milestone, epoch))
                .where(IncidentReminderRow.sent_at.is_(None))
                .values(claimed_by=FREE)
                .execution_options(synchronize_session=False)
            )

    async def forget_reminder(self, incident_id: int, milestone: str, epoch: int) -> None:
        """Drop a claim that will never be sent (a template that no longer renders)."""
        async with self._store._tx() as session:
            await session.execute(
                delete(IncidentReminderRow).where(*_reminder_key(incident_id, milestone, epoch))
            )

    async def mark_reminder_sent(
        self, incident_id: int, milestone: str, epoch: int, *, at: datetime
    ) -> None:
        """Slack answered ok: sent, never again."""
        async with self._store._tx() as session:
            await session.execute(
                update(IncidentReminderRow)
                .where(*_reminder_key(incident_id, milestone, epoch))
                .where(IncidentReminderRow.sent_at.is_(None))
                .values(sent_at=_utc(at))
                .execution_options(synchronize_session=False)
            )

    async def unsent_posts(self, at: datetime) -> list[UnsentPost]:
        """Claims with a payload (template posts) not sent and free to claim at `at`: a
        failed attempt, or one a dead process left past its lease."""
        row = IncidentReminderRow
        stmt = (
            select(row)
            .where(
                row.sent_at.is_(None),
                row.payload.is_not(None),
                (row.claimed_by == FREE) | (row.fired_at < _utc(at) - CLAIM_LEASE),
            )
            .order_by(row.id)
        )
        async with self._store._tx(write=False) as session:
            rows = (await session.scalars(stmt)).all()
        return [
            UnsentPost(r.incident_id, r.milestone, r.epoch, dict(r.payload or {})) for r in rows
        ]

    async def set_header(self, incident_id: int, *, header_ts: str, digest: str) -> None:
        stmt = (
            update(IncidentRow)
            .where(IncidentRow.id == incident_id)
            .values(header_ts=header_ts, header_digest=digest)
            .execution_options(synchronize_session=False)
        )
        async with self._store._tx() as session:
            await session.execute(stmt)

    async def claim_header_edit(
        self, incident_id: int, *, old: str | None, new: str | None
    ) -> bool:
        """Move the header digest from what was read to the new one: True for one caller,
        who then edits the message (the others see it already current)."""
        where = (
            IncidentRow.header_digest.is_(None)
            if old is None
            else (IncidentRow.header_digest == old)
        )
        stmt = (
            update(IncidentRow)
            .where(IncidentRow.id == incident_id, where)
            .values(header_digest=new)
            .returning(IncidentRow.id)
            .execution_options(synchronize_session=False)
        )
        async with self._store._tx() as session:
            return (await session.execute(stmt)).first() is not None

    # -- what App Home shows ------------------------------------------------------------------

    async def note_health(
        self,
        *,
        channel_id: str,
        actor_id: str,
        worst: str,
        findings: Sequence[Mapping[str, Any]],
        at: datetime,
        critical: Iterable[str] = (),
    ) -> None:
        """A health run seen: its worst findings (App Home) and the names of every check
        critical in it (the detection time of an incident, and the baseline's rule)."""
        row = HealthSeenRow(
            at=_utc(at),
            channel_id=channel_id,
            actor_id=actor_id,
            worst=worst,
            findings={"findings": [dict(f) for f in findings], "critical": sorted(set(critical))},
        )
        async with self._store._tx() as session:
            session.add(row)
            stale = HealthSeenRow.at < row.at - HEALTH_KEPT
            await session.execute(delete(HealthSeenRow).where(stale))

    async def critical_spells(
        self, since: datetime, checks: Iterable[str] | None = None
    ) -> dict[str, datetime]:
        """The checks critical in the watchdog's latest health run (or those of `checks`
        that are), each with the start of its current critical spell: the first of the
        unbroken runs, up to the latest, in which that check was critical (never before
        `since`). A check critical for 20 hours, then clean, then critical again, has a
        spell from its return."""
        stmt = (
            select(HealthSeenRow.at, HealthSeenRow.worst, HealthSeenRow.findings)
            .where(HealthSeenRow.actor_id == WATCHDOG, HealthSeenRow.at >= _utc(since))
            .order_by(HealthSeenRow.id.desc())
        )
        async with self._store._tx(write=False) as session:
            runs = (await session.execute(stmt)).all()
        if not runs:
            return {}
        latest = _critical_in(runs[0].worst, runs[0].findings)
        wanted = latest if checks is None else latest & set(checks)
        spells: dict[str, datetime] = {}
        for at, worst, findings in runs:  # newest first
            still = wanted & _critical_in(worst, findings)
            for check in still:
                spells[check] = _parse_utc(at)
            wanted = still
            if not wanted:
                break
        return spells

    async def first_critical_since(
        self, since: datetime, checks: Iterable[str] | None = None
    ) -> datetime | None:
        """An incident's detection time from the problem at hand: the earliest start of
        the current critical spell of `checks` (default: the checks critical in the
        watchdog's latest run), never earlier than the last run in which they were all
        clean, nor than `since`. None if none of them is critical now."""
        spells = await self.critical_spells(since, checks)
        return min(spells.values()) if spells else None

    async def last_recovered_at(self) -> datetime | None:
        """When the latest incident to be fully recovered was (the baselines' quiet time)."""
        stmt = select(func.max(IncidentRow.recovered_at)).where(IncidentRow.state == "recovered")
        async with self._store._tx(write=False) as session:
            found = (await session.execute(stmt)).scalar_one_or_none()
        return None if found is None else _parse_utc(found)

    async def latest_health(self) -> HealthSeen | None:
        stmt = select(HealthSeenRow).order_by(HealthSeenRow.id.desc()).limit(1)
        async with self._store._tx(write=False) as session:
            row = (await session.scalars(stmt)).one_or_none()
        if row is None:
            return None
        return HealthSeen(
            at=row.at,
            channel_id=row.channel_id,
            actor_id=row.actor_id,
            worst=row.worst,
            findings=tuple(row.findings.get("findings", [])),
        )

    async def pending_approvals(self, now: datetime | None = None) -> list[Approval]:
        stmt = (
            select(ApprovalRow)
            .where(ApprovalRow.state == "pending", ApprovalRow.expires_at > _utc(now))
            .order_by(ApprovalRow.created_at, ApprovalRow.id)
        )
        async with self._store._tx(write=False) as session:
            return [_approval(row) for row in (await session.scalars(stmt)).all()]


# -- helpers --------------------------------------------------------------------------------


def _active(state: Any) -> ColumnElement[bool]:
    return cast(ColumnElement[bool], state.in_(ACTIVE_STATES))


def _reminder_key(incident_id: int, milestone: str, epoch: int) -> list[ColumnElement[bool]]:
    return [
        IncidentReminderRow.incident_id == incident_id,
        IncidentReminderRow.milestone == milestone,
        IncidentReminderRow.epoch == epoch,
    ]


async def _active_id(session: AsyncSession, channel_id: str) -> int | None:
    stmt = select(IncidentRow.id).where(
        IncidentRow.channel_id == channel_id, _active(IncidentRow.state)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def _add_event(
    session: AsyncSession,
    incident_id: int,
    kind: str,
    actor_id: str,
    text: str,
    at: datetime,
    detail: Mapping[str, Any],
    reaches: Iterable[FirstMilestone],
) -> IncidentEvent:
    row = IncidentEventRow(
        incident_id=incident_id, at=at, kind=kind, actor_id=actor_id, text=text, detail=dict(detail)
    )
    session.add(row)
    for milestone in reaches:
        column = {
            "responded": IncidentRow.responded_at,
            "communicated": IncidentRow.communicated_at,
        }[milestone]
        await session.execute(
            update(IncidentRow)
            .where(IncidentRow.id == incident_id, column.is_(None))
            .values({column.key: at, "version": IncidentRow.version + 1})
            .execution_options(synchronize_session=False)
        )
    await session.flush()
    return _event(row)


def _critical_in(worst: str, findings: Mapping[str, Any]) -> set[str]:
    """The checks critical in one health run. Runs seen before the names were kept hold
    only the worst few findings: their critical ones stand in."""
    if worst != "crit":
        return set()
    named = findings.get("critical")
    if isinstance(named, list):
        return {str(c) for c in named}
    return {
        str(f.get("check"))
        for f in findings.get("findings", [])
        if isinstance(f, Mapping) and f.get("status") == "crit"
    }


def _parse_utc(value: Any) -> datetime:
    parsed = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _incident(row: IncidentRow) -> Incident:
    return Incident(
        id=row.id,
        channel_id=row.channel_id,
        origin_channel_id=row.origin_channel_id,
        title=row.title,
        severity=cast(Severity, _known(row.severity, SEVERITIES)),
        commander_id=row.commander_id,
        state=cast(IncidentState, _known(row.state, INCIDENT_STATES)),
        created_by=row.created_by,
        detected_at=row.detected_at,
        detected_by=cast(DetectedBy, _known(row.detected_by, DETECTED_BY)),
        started_at=row.started_at,
        responded_at=row.responded_at,
        communicated_at=row.communicated_at,
        resolved_at=row.resolved_at,
        recovered_at=row.recovered_at,
        recovery_evidence=row.recovery_evidence,
        header_ts=row.header_ts,
        header_digest=row.header_digest,
        reopened=row.reopened,
        updated_at=row.updated_at,
        version=row.version,
    )


def _event(row: IncidentEventRow) -> IncidentEvent:
    return IncidentEvent(
        id=row.id,
        incident_id=row.incident_id,
        at=row.at,
        kind=row.kind,
        actor_id=row.actor_id,
        text=row.text,
        detail=row.detail,
    )

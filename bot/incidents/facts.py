"""What templates and summaries say about an incident, computed from its timeline.

Nobody types a figure into a notification: durations come from the incident's times,
actions and row counts from the audited approval steps in the timeline, data impact from
the last recovery verification against a baseline. The verification reaches the timeline
as an event of kind `verification` whose detail is a `Verification`: that model is the
whole contract between `/db recover` (which produces it) and the summary (which reads it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from bot.incidents.views import clocks_of
from bot.messages.render import esc
from bot.state import Approval, Incident, IncidentEvent
from commands.base import Report, human_duration
from commands.incidents.lifecycle import SEVERITY_LABEL, SlaClock, SlaTargets, who
from commands.recover import recovery_verified

VERIFICATION = "verification"  # the timeline kind of a recovery verification
_COUNT = "count: "
_BACKTICKED = re.compile(r"`([^`]+)`")


class Metric(BaseModel):
    """One count of a verification against its baseline (`pct` None without one).

    Against a baseline with a census, `baseline` and `now` are the rows created at or
    before the baseline's database time, then and now (what growth cannot hide), and
    `total` / `baseline_total` all rows; `lost_by_day` says when the lost rows had been
    created. An `advisory` count (approved submissions) can fall legitimately: no loss."""

    name: str
    label: str
    baseline: int | None = None
    now: int | None = None
    pct: float | None = None
    total: int | None = None
    baseline_total: int | None = None
    lost_by_day: dict[str, int] = {}
    advisory: bool = False
    counts_only: bool = False

    @property
    def lost(self) -> int:
        if self.advisory or self.baseline is None or self.now is None:
            return 0
        return max(0, self.baseline - self.now)


class Verification(BaseModel):
    """A recovery verification as the timeline keeps it."""

    at: datetime
    baseline_at: datetime | None = None
    metrics: list[Metric]
    clean: bool = False
    counts_only: bool = False  # the baseline had no census: growth can hide a loss
    flagged: str | None = None  # the baseline was flagged (named with --baseline)

    @property
    def compared(self) -> list[Metric]:
        return [m for m in self.metrics if m.pct is not None]


def verification_from_report(report: Report, at: datetime) -> Verification | None:
    """`/db recover`'s report read as a Verification: its `count: <label>` findings carry
    a row {metric, baseline, now, pct}, its `baseline` finding a row with `taken_at`.
    None for any other report."""
    metrics: list[Metric] = []
    baseline_at: datetime | None = None
    counts_only, flagged = False, None
    for finding in report.findings:
        if finding.check == "baseline" and finding.rows:
            row = finding.rows[0]
            taken = row.get("taken_at")
            if taken is not None:
                baseline_at = _aware(datetime.fromisoformat(str(taken)))
            counts_only = bool(row.get("counts_only", False))
            flagged = None if row.get("flagged") is None else str(row["flagged"])
        if not finding.check.startswith(_COUNT):
            continue
        for row in finding.rows:
            days = row.get("lost_by_day") or {}
            metrics.append(
                Metric(
                    name=str(row.get("metric", finding.check[len(_COUNT) :])),
                    label=finding.check[len(_COUNT) :],
                    baseline=_int(row.get("baseline")),
                    now=_int(row.get("now")),
                    pct=None if row.get("pct") is None else float(row["pct"]),
                    total=_int(row.get("total")),
                    baseline_total=_int(row.get("baseline_total")),
                    lost_by_day={str(d): int(n) for d, n in dict(days).items()},
                    advisory=bool(row.get("advisory", False)),
                    counts_only=bool(row.get("counts_only", False)),
                )
            )
    if not metrics:
        return None
    clean = baseline_at is not None and recovery_verified(report)
    return Verification(
        at=at,
        baseline_at=baseline_at,
        metrics=metrics,
        clean=clean,
        counts_only=counts_only,
        flagged=flagged,
    )


def verification_text(v: Verification) -> str:
    if v.baseline_at is None or not v.compared:
        return "recovery verification without a baseline to compare"
    parts = ", ".join(f"{esc(m.label)} {pct_text(m.pct)}" for m in v.compared if m.pct is not None)
    return f"recovery verification: {parts} of the {v.baseline_at:%H:%M} UTC baseline"


def last_verification(events: Iterable[IncidentEvent]) -> Verification | None:
    """The latest verification in the timeline (a `recovered` event may carry one too)."""
    found: Verification | None = None
    for event in events:
        if event.kind in (VERIFICATION, "recovered") and event.detail.get("metrics"):
            try:
                found = Verification.model_validate(dict(event.detail))
            except ValidationError:
                continue
    return found


def pct_text(pct: float | None) -> str:
    if pct is None:
        return "?"
    return f"{pct:.1f}".removesuffix(".0") + " %"


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _aware(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def hhmm(at: datetime) -> str:
    return f"{_aware(at):%H:%M} UTC"


# -- actions ------------------------------------------------------------------------------


@dataclass
class Action:
    """One remedy in the incident, from its audited steps in the timeline."""

    approval_id: str
    remedy: str = "?"
    requested_by: str | None = None
    planned: int | None = None
    approved_by: list[str] = field(default_factory=list)
    rejected_by: list[str] = field(default_factory=list)
    outcome: str = "pending"  # pending, done, failed, aborted, rejected, expired, cancelled
    affected: int | None = None

    def line(self) -> str:
        """mrkdwn: the remedy, who asked, who approved, rows changed."""
        parts = [f"`{esc(self.remedy)}`"]
        if self.requested_by:
            planned = f" ({self.planned:,} rows planned)" if self.planned is not None else ""
            parts.append(f"requested by {who(self.requested_by)}{planned}")
        if self.approved_by:
            parts.append("approved by " + ", ".join(who(a) for a in self.approved_by))
        if self.rejected_by:
            parts.append("rejected by " + ", ".join(who(a) for a in self.rejected_by))
        result = self.outcome
        if self.affected is not None:
            result += f": {self.affected:,} rows changed"
        parts.append(result)
        return ", ".join(parts)


_OUTCOMES = {
    "remedy.executed": "done",
    "remedy.failed": "failed",
    "remedy.aborted": "aborted",
    "approval.rejected": "rejected",
    "approval.expired": "expired",
    "approval.cancelled": "cancelled",
}


def actions(events: Iterable[IncidentEvent]) -> list[Action]:
    by_id: dict[str, Action] = {}
    for event in events:
        audit, approval_id = event.detail.get("audit"), event.detail.get("approval_id")
        if not audit or not approval_id:
            continue
        action = by_id.setdefault(str(approval_id), Action(str(approval_id)))
        named = event.detail.get("remedy") or next(iter(_BACKTICKED.findall(event.text)), None)
        if named and action.remedy == "?":
            action.remedy = str(named)
        if audit == "approval.requested":
            action.requested_by = event.actor_id
            action.planned = _int(event.detail.get("count"))
        elif audit == "approval.approved":
            action.approved_by.append(event.actor_id)
        elif audit == "approval.rejected":
            action.rejected_by.append(event.actor_id)
        if audit in _OUTCOMES:
            action.outcome = _OUTCOMES[str(audit)]
        if audit == "remedy.executed":
            action.affected = _int(event.detail.get("affected"))
    return list(by_id.values())


# -- follow-ups ---------------------------------------------------------------------------


def open_findings(events: Iterable[IncidentEvent]) -> list[Mapping[str, Any]]:
    """The findings not ok in the latest run of each command (a later clean run of the
    same command closes them)."""
    latest: dict[str, list[Mapping[str, Any]]] = {}
    for event in events:
        if event.kind != "command":
            continue
        name = str(event.detail.get("command", "")).split(" ")[0]
        latest[name] = [
            f
            for f in event.detail.get("findings", [])
            if isinstance(f, Mapping) and f.get("status") in ("crit", "warn", "error")
        ]
    return [f for found in latest.values() for f in found]


@dataclass(frozen=True)
class Facts:
    """Everything known about an incident at one moment."""

    incident: Incident
    events: Sequence[IncidentEvent]
    clocks: list[SlaClock]
    now: datetime
    verification: Verification | None
    actions: list[Action]
    pending: list[Approval]
    findings: list[Mapping[str, Any]]

    @property
    def end(self) -> datetime:
        return self.incident.resolved_at or self.now

    @property
    def duration_s(self) -> float:
        return max(0.0, (self.end - self.incident.detected_at).total_seconds())

    @property
    def sla_open(self) -> list[SlaClock]:
        return [c for c in self.clocks if c.status != "met"]

    def follow_ups(self) -> list[str]:
        """mrkdwn lines: what is still to do before the incident can be closed for good."""
        out = [
            f"finding *{esc(f.get('status', '?')).upper()}* {esc(f.get('check', ''))}: "
            f"{esc(f.get('summary', ''))}"
            for f in self.findings
        ]
        out += [
            f"pending approval `{esc(a.remedy)}` requested by {who(a.requester_id)} "
            f"(expires {hhmm(a.expires_at)})"
            for a in self.pending
        ]
        v = self.verification
        if v is not None and not v.clean:
            short = [m for m in v.compared if m.lost]
            what = ", ".join(f"{esc(m.label)} {pct_text(m.pct)}" for m in short)
            out.append("last recovery verification not clean" + (f": {what}" if what else ""))
        for clock in self.sla_open:
            state = {"missed": "missed", "overdue": "OVERDUE", "running": "open"}[clock.status]
            out.append(f"SLA {clock.label} {state} (target {human_duration(clock.target_s)})")
        return out


def facts(
    incident: Incident,
    events: Sequence[IncidentEvent],
    targets: SlaTargets,
    now: datetime,
    pending: Sequence[Approval] = (),
) -> Facts:
    return Facts(
        incident=incident,
        events=events,
        clocks=clocks_of(incident, targets, now),
        now=now,
        verification=last_verification(events),
        actions=actions(events),
        pending=[a for a in pending if a.channel_id == incident.channel_id],
        findings=open_findings(events),
    )


# -- the values a template may use --------------------------------------------------------


class Mrkdwn(str):
    """Text already safe for mrkdwn (mentions, escaped timeline text): never escaped again."""

    __slots__ = ()


def template_values(f: Facts) -> dict[str, Any]:
    """The variables of the notification templates. A value that cannot be measured
    (no verification against a baseline yet) is left out, so a template using it is
    refused by name instead of sent with a placeholder."""
    inc = f.incident
    values: dict[str, Any] = {
        "incident_id": inc.id,
        "title": inc.title,
        "severity": SEVERITY_LABEL[inc.severity],
        "state": inc.state,
        "resolved": inc.resolved_at is not None,
        "recovered": inc.recovered_at is not None,
        "detected_at": hhmm(inc.detected_at),
        "started_at": hhmm(inc.started_at),
        "duration": human_duration(f.duration_s),
        "on_call": Mrkdwn(who(inc.commander_id)),
        "actions": [Mrkdwn(a.line()) for a in f.actions],
        "rows_changed": sum(a.affected or 0 for a in f.actions),
        "views_refreshed": any(
            a.remedy.startswith("refresh") and a.outcome == "done" for a in f.actions
        ),
        "next_steps": [Mrkdwn(s) for s in next_steps(f)],
    }
    if inc.resolved_at is not None:
        values["resolved_at"] = hhmm(inc.resolved_at)
    v = f.verification
    if v is not None and v.baseline_at is not None and v.compared:
        lost = {m.label: m.lost for m in v.compared if m.lost}
        values["verified_at"] = hhmm(v.at)
        values["baseline_at"] = hhmm(v.baseline_at)
        values["recovery"] = {m.label: pct_text(m.pct) for m in v.compared}
        values["lost"] = lost
        values["affected"] = (
            ", ".join(f"{n:,} {label}" for label, n in lost.items())
            if lost
            else f"no rows missing against the {hhmm(v.baseline_at)} baseline"
        )
        if lost and v.baseline_at > inc.detected_at:
            # A baseline taken after detection may already hold the loss: no window to
            # state, only the way to measure one.
            values["data_loss_between"] = f"before {hhmm(inc.detected_at)}"
            values["data_loss_window"] = (
                f"not measured: the {hhmm(v.baseline_at)} baseline is newer than detection "
                f"({hhmm(inc.detected_at)}); compare with an older one: "
                f"`/db recover --baseline HH:MM`"
            )
        elif lost:
            window = (inc.detected_at - v.baseline_at).total_seconds()
            between = f"between {v.baseline_at:%H:%M} and {hhmm(inc.detected_at)}"
            values["data_loss_between"] = between
            values["data_loss_window"] = f"up to {human_duration(window)} (writes {between})"
        else:
            values["data_loss_window"] = f"none measured against the {hhmm(v.baseline_at)} baseline"
    return values


def next_steps(f: Facts) -> list[str]:
    """mrkdwn: the operator's next moves, from what is still open."""
    inc = f.incident
    steps = [
        f"decide `{esc(a.remedy)}` (pending approval requested by {who(a.requester_id)})"
        for a in f.pending
    ]
    steps += [
        f"look into {esc(x.get('check', ''))}: {esc(x.get('summary', ''))}" for x in f.findings
    ]
    if inc.resolved_at is None:
        steps.append("resolve the incident once the fix holds (`/db incident resolve`)")
    if inc.recovered_at is None:
        v = f.verification
        if v is not None and not v.clean:
            steps.append("finish the recovery steps, then `/db recover` again until it is clean")
        else:
            steps.append("verify the data against the baseline (`/db recover`)")
    if inc.communicated_at is None:
        steps.append("tell the users (`/db incident template user`)")
    steps.append("watch error rates and the leaderboard for the next 4 hours")
    steps.append("hold the post-mortem with the timeline (`/db incident summary --file`)")
    return steps

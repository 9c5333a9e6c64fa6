"""`/db recover`: the guide's post-recovery verification against a stored baseline, then
the recovery steps, each a remedy under the approval rules.

After a restore the question is not "how many users are there" but "how many of the users
we had": the bot keeps the same counts every hour (`take_baseline`, in its own state store,
never the target) and says "users 100 % of the 09:00 count, submissions 97.8 %".

The verification reads each table once, in three read-only transactions that run side
by side: submissions (count, approved, orphans in one join), the ledger (one pass grouped
by user gives its count, its orphans and the live totals `leaderboard_totals` is compared
with) and the small rest. The guide's own SQL reads the ledger twice and every table in
turn; bench/recover.py times both.

Steps that depend on another step's result wait for it: `reconcile-points` counts the
awards missing now (it would drift under a `recover-learn` approved meanwhile), and
`refresh-views` comes last. Each `/db recover` requests what can run now; the next one
finds the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from commands.base import (
    Baseline,
    Context,
    Finding,
    Reader,
    Report,
    Row,
    Status,
    UsageError,
    human_duration,
)
from commands.base import register as register_command
from commands.remedies.base import REMEDIES, Plan
from commands.remedies.recovery import INCLUDE_DELETED, deleted_on_purpose

log = logging.getLogger(__name__)

# The counts a baseline keeps and a verification compares, with their labels.
COMPARED: dict[str, str] = {
    "users": "users",
    "submissions": "submissions",
    "ledger_rows": "ledger rows",
    "approved_submissions": "approved submissions",
}
# The recovery steps in the order they are approved, and what each waits for.
STEPS: dict[str, tuple[str, ...]] = {
    "recover-users": (),
    "rematch-kajabi": (),
    "recover-learn": ("recover-users", "rematch-kajabi"),
    "reconcile-points": ("recover-learn",),
    "refresh-views": ("recover-users", "rematch-kajabi", "recover-learn", "reconcile-points"),
}
WORK_MEM = "64MB"

_SUBMISSIONS_SQL = """
SELECT count(*) AS submissions,
       count(*) FILTER (WHERE s.status = 'APPROVED') AS approved_submissions,
       count(*) FILTER (WHERE u.id IS NULL) AS orphan_submissions
FROM submissions AS s LEFT JOIN users AS u ON u.id = s.user_id
"""
_REST_SQL = """
SELECT (SELECT count(*) FROM users) AS users,
       (SELECT count(*) FROM submission_attachments AS a
        WHERE NOT EXISTS (SELECT 1 FROM submissions AS s WHERE s.id = a.submission_id))
         AS orphan_attachments
"""
_VIEWS_SQL = """
SELECT schemaname::text AS schema, matviewname::text AS view, ispopulated AS populated
FROM pg_matviews WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
ORDER BY 1, 2
"""
# One pass over the ledger grouped by user gives its count, its orphans (at the level of
# 100,000 users instead of 2,000,000 rows) and the live totals every view row is compared
# with; a view row of a user who lost every ledger row (or every point) differs too.
_LIVE = """
FROM (SELECT l.user_id, count(*) AS n, sum(l.delta_points) AS points
      FROM points_ledger AS l GROUP BY l.user_id) AS live
LEFT JOIN users AS u ON u.id = live.user_id"""
_LEDGER_SQL = (
    "SELECT coalesce(sum(live.n), 0)::bigint AS ledger_rows,"
    " coalesce(sum(live.n) FILTER (WHERE u.id IS NULL), 0)::bigint AS orphan_ledger_rows" + _LIVE
)
_LEDGER_AND_VIEW_SQL = (
    "SELECT coalesce(sum(live.n), 0)::bigint AS ledger_rows,"  # noqa: S608 (constants)
    " coalesce(sum(live.n) FILTER (WHERE u.id IS NULL), 0)::bigint AS orphan_ledger_rows,"
    " count(v.user_id) AS view_rows,"
    " count(v.user_id) FILTER (WHERE live.points IS DISTINCT FROM v.total_points) AS stale_rows,"
    " max(v.total_points)::bigint AS top_points,"
    " max(coalesce(live.points, 0)) FILTER (WHERE v.user_id IS NOT NULL)::bigint"
    " AS top_live_points" + _LIVE + " FULL JOIN leaderboard_totals AS v ON v.user_id = live.user_id"
)
LEADERBOARD = "leaderboard_totals"


@dataclass
class Measured:
    """What the verification read; a part that failed is None, its reason in `errors`."""

    counts: dict[str, int | None] = field(default_factory=dict)
    views: list[Row] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def get(self, key: str) -> int | None:
        return self.counts.get(key)


async def _tune(db: Reader) -> None:
    """For this transaction only, as `/db integrity` measured it: room for the per-user
    hash table, no JIT (its compile time exceeds the gain), and parallel hash aggregates
    over sequential scans, which the default costs deny in favour of a serial walk of the
    user_id index with a heap fetch per row."""
    await db.fetch(
        "SELECT set_config('work_mem', %s, true), set_config('jit', 'off', true),"
        " set_config('parallel_setup_cost', '10', true),"
        " set_config('parallel_tuple_cost', '0.0001', true),"
        " set_config('enable_indexscan', 'off', true)",
        (WORK_MEM,),
    )


async def _submissions(db: Reader) -> Row:
    await _tune(db)
    return (await db.fetch(_SUBMISSIONS_SQL))[0]


async def _rest(db: Reader) -> Row:
    """Attachments without a submission by index probes: hashing a million submission ids
    for 450,000 attachments cost twice as much at 100,000 users."""
    await db.fetch(
        "SELECT set_config('jit', 'off', true), set_config('enable_hashjoin', 'off', true)"
    )
    return (await db.fetch(_REST_SQL))[0]


async def _ledger(db: Reader) -> tuple[Row, list[Row]]:
    await _tune(db)
    views = await db.fetch(_VIEWS_SQL)
    populated = any(v["view"] == LEADERBOARD and v["populated"] for v in views)
    row = (await db.fetch(_LEDGER_AND_VIEW_SQL if populated else _LEDGER_SQL))[0]
    return row, views


async def measure(ctx: Context) -> Measured:
    """The verification's figures: three read-only transactions side by side."""
    gw = ctx.gateway
    parts: dict[str, Callable[[Reader], Awaitable[Any]]] = {
        "submissions": _submissions,
        "ledger": _ledger,
        "users": _rest,
    }
    results = await asyncio.gather(*(gw.read(fn) for fn in parts.values()), return_exceptions=True)
    out = Measured()
    for name, result in zip(parts, results, strict=True):
        if isinstance(result, BaseException):
            if not isinstance(result, Exception):
                raise result
            text = str(result).strip().splitlines()
            out.errors[name] = f"{type(result).__name__}: {text[0] if text else ''}"
            continue
        row = result
        if name == "ledger":
            row, out.views = result
        out.counts.update({k: None if v is None else int(v) for k, v in row.items()})
    return out


def baseline_counts(m: Measured) -> dict[str, int | None]:
    return {k: m.get(k) for k in (*COMPARED, "top_points")}


async def take_baseline(ctx: Context) -> Baseline | None:
    """The hourly snapshot: the verification's counts, kept in the bot's state store.
    None when there is no store or the target could not be read (nothing is stored)."""
    if ctx.baselines is None:
        return None
    m = await measure(ctx)
    if m.errors:
        log.warning("baseline not taken: %s", "; ".join(f"{k}: {v}" for k, v in m.errors.items()))
        return None
    return await ctx.baselines.save(ctx.gateway.target, baseline_counts(m))


# --- the report ---------------------------------------------------------------------


def pct_text(pct: float) -> str:
    """100 %, 97.8 %: a whole number needs no decimals."""
    return f"{pct:.1f}".removesuffix(".0") + " %"


def _hhmm(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%H:%M")


def percentages(report: Report) -> dict[str, float]:
    """The recovery percentages of a verification, per count (for templates and
    summaries): what `count:` findings hold in their rows."""
    out: dict[str, float] = {}
    for f in report.findings:
        for row in f.rows:
            if f.check.startswith("count: ") and row.get("pct") is not None:
                out[str(row["metric"])] = float(row["pct"])
    return out


def count_findings(m: Measured, base: Baseline | None, tolerance: float) -> list[Finding]:
    findings: list[Finding] = []
    for key, label in COMPARED.items():
        now = m.get(key)
        if now is None:
            findings.append(
                Finding(
                    check=f"count: {label}", status=Status.SKIPPED, summary=f"{label}: not read"
                )
            )
            continue
        was = base.counts.get(key) if base else None
        if base is None or was is None:
            findings.append(
                Finding(
                    check=f"count: {label}",
                    status=Status.OK,
                    summary=f"{label}: {now:,} (no baseline to compare)",
                    rows=[{"metric": key, "baseline": None, "now": now, "pct": None}],
                )
            )
            continue
        pct = 100.0 * now / was if was else 100.0
        low = pct < 100.0 - tolerance
        findings.append(
            Finding(
                check=f"count: {label}",
                status=Status.CRIT if low else Status.OK,
                summary=f"{label} {pct_text(pct)} of the {_hhmm(base.taken_at)} count "
                f"({now:,} of {was:,})",
                rows=[{"metric": key, "baseline": was, "now": now, "pct": round(pct, 2)}],
                hint="the recovery steps below" if low else None,
            )
        )
    return findings


def integrity_findings(m: Measured, base: Baseline | None) -> list[Finding]:
    out: list[Finding] = []
    top, live_top = m.get("top_points"), m.get("top_live_points")
    if top is None:
        out.append(
            Finding(
                check="top points",
                status=Status.SKIPPED,
                summary=f"{LEADERBOARD} is not populated or not readable",
                hint="/db refresh-views",
            )
        )
    else:
        was = base.counts.get("top_points") if base else None
        against = f"; {pct_text(100.0 * top / was)} of the baseline's {was:,}" if was else ""
        out.append(
            Finding(
                check="top points",
                status=Status.OK if top == live_top else Status.WARN,
                summary=f"top points {top:,} in {LEADERBOARD}, {live_top:,} in the live ledger"
                + against,
                rows=[{"view": top, "live": live_top, "baseline": was}],
            )
        )
    orphans = {
        "submissions": m.get("orphan_submissions"),
        "ledger rows": m.get("orphan_ledger_rows"),
        "attachments": m.get("orphan_attachments"),
    }
    known = {k: v for k, v in orphans.items() if v is not None}
    out.append(
        Finding(
            check="orphans",
            status=Status.CRIT if any(known.values()) else Status.OK,
            summary="orphans: " + ", ".join(f"{v:,} {k}" for k, v in known.items()),
            rows=[{"kind": k, "rows": v} for k, v in orphans.items()],
            hint="/db cleanup-orphans" if any(known.values()) else None,
        )
    )
    if m.views:
        empty = [f"{v['schema']}.{v['view']}" for v in m.views if not v["populated"]]
        out.append(
            Finding(
                check="views populated",
                status=Status.CRIT if empty else Status.OK,
                summary=(
                    f"{len(empty)} of {len(m.views)} materialized views unpopulated: "
                    + ", ".join(empty)
                    if empty
                    else f"all {len(m.views)} materialized views populated"
                ),
                hint="/db refresh-views" if empty else None,
            )
        )
    stale, rows = m.get("stale_rows"), m.get("view_rows")
    if stale is not None and rows is not None:
        out.append(
            Finding(
                check=f"{LEADERBOARD} vs live ledger",
                status=Status.WARN if stale else Status.OK,
                summary=(
                    f"{stale:,} of {rows:,} {LEADERBOARD} rows differ from the live ledger"
                    if stale
                    else f"all {rows:,} {LEADERBOARD} rows match the live ledger"
                ),
                hint="/db refresh-views" if stale else None,
            )
        )
    for part, reason in m.errors.items():
        out.append(
            Finding(check=f"read {part}", status=Status.SKIPPED, summary=f"not read: {reason}")
        )
    return out


def baseline_finding(base: Baseline | None, before: datetime, asked: str | None) -> Finding:
    if base is None:
        when = f"before {asked} UTC" if asked else "yet"
        return Finding(
            check="baseline",
            status=Status.WARN,
            summary=f"no baseline stored {when}: the counts are not compared",
            hint="the bot stores one every BASELINE_INTERVAL_S (default hourly)",
        )
    age = (before - base.taken_at).total_seconds()
    return Finding(
        check="baseline",
        status=Status.OK,
        summary=f"compared with the {_hhmm(base.taken_at)} baseline "
        f"({base.taken_at.astimezone(UTC):%Y-%m-%d %H:%M} UTC, {human_duration(age)} before "
        f"{'then' if asked else 'now'})",
        rows=[{"taken_at": base.taken_at.isoformat(), **dict(base.counts)}],
    )


@dataclass
class StepPlan:
    name: str
    plan: Plan | None = None
    problem: str | None = None

    @property
    def pending(self) -> bool:
        return self.plan is not None and self.plan.count > 0


async def plan_steps(ctx: Context) -> list[StepPlan]:
    """Every step planned read-only (the plans an approval would bind, counted now)."""

    async def one(name: str) -> StepPlan:
        remedy = REMEDIES.get(name)
        if remedy is None:
            return StepPlan(name, problem="not available in this bot")
        try:
            return StepPlan(name, plan=await remedy.plan(ctx, []))
        except UsageError as exc:
            return StepPlan(name, problem=str(exc))
        except Exception as exc:  # a step that cannot be planned must not sink the report
            return StepPlan(name, problem=f"{type(exc).__name__}: {exc}")

    # One after the other: the verification already took the pool's connections side by
    # side, and a plan waiting for a connection would be lost to the pool's timeout.
    return [await one(n) for n in STEPS]


def step_findings(
    steps: list[StepPlan], m: Measured, dry_run: bool
) -> tuple[list[Finding], list[str]]:
    """One finding per step and the steps to request now."""
    by_name = {s.name: s for s in steps}
    views_stale = bool(m.get("stale_rows")) or any(not v["populated"] for v in m.views)
    findings: list[Finding] = []
    requested: list[str] = []
    for step in steps:
        check = f"step: {step.name}"
        if step.plan is None:
            findings.append(
                Finding(check=check, status=Status.SKIPPED, summary=f"cannot plan: {step.problem}")
            )
            continue
        plan = step.plan
        waits = [d for d in STEPS[step.name] if by_name[d].pending]
        todo = step.pending
        if step.name == "refresh-views":
            todo = views_stale or bool(waits)
        if not todo:
            findings.append(
                Finding(check=check, status=Status.OK, summary="nothing to do: " + plan.summary)
            )
            continue
        if waits:
            findings.append(
                Finding(
                    check=check,
                    status=Status.WARN,
                    summary=f"after {', '.join(waits)}: run `/db recover` again then; "
                    f"now: {plan.summary}",
                )
            )
            continue
        verb = "would request" if dry_run else "requested (its own approval thread)"
        findings.append(
            Finding(
                check=check,
                status=Status.WARN,
                summary=f"{verb}: {plan.summary}",
                rows=[{"note": w} for w in plan.warnings],
                hint=f"/db {step.name}",
            )
        )
        requested.append(step.name)
    return findings, requested


def parse_args(args: list[str]) -> tuple[bool, str | None]:
    dry_run, asked = False, None
    words = list(args)
    while words:
        word = words.pop(0)
        if word == "--dry-run":
            dry_run = True
        elif word == "--baseline" and words:
            asked = words.pop(0)
        elif word.startswith("--baseline="):
            asked = word.split("=", 1)[1]
        else:
            raise UsageError(f"unknown argument {word!r}")
    if asked is not None:
        try:
            datetime.strptime(asked, "%H:%M")
        except ValueError:
            raise UsageError(f"--baseline wants HH:MM (UTC), not {asked!r}") from None
    return dry_run, asked


def baseline_moment(asked: str | None, now: datetime) -> datetime:
    """The latest HH:MM (UTC) not after now; now when none was asked."""
    if asked is None:
        return now
    hour, minute = (int(p) for p in asked.split(":"))
    moment = now.astimezone(UTC).replace(hour=hour, minute=minute, second=0, microsecond=0)
    return moment if moment <= now else moment - timedelta(days=1)


def recovery_verified(report: Report) -> bool:
    """A clean recovery verification: compared with a baseline, counts back to it, no
    orphan, views populated and current. False for any other report."""
    verification = [f for f in report.findings if not f.check.startswith("step: ")]
    has_baseline = any(f.check == "baseline" and f.status is Status.OK for f in verification)
    return has_baseline and all(f.status is Status.OK for f in verification)


def recovery_evidence(report: Report) -> dict[str, Any]:
    """What an incident keeps of the clean verification that closed its recovery clock."""
    baseline = next((f.summary for f in report.findings if f.check == "baseline"), None)
    return {"baseline": baseline, "percentages": percentages(report)}


@register_command(
    "recover",
    usage="/db recover [--dry-run] [--baseline HH:MM]",
    summary="post-recovery verification against the hourly baseline, then the recovery steps",
)
async def recover(ctx: Context, args: list[str]) -> Report:
    dry_run, asked = parse_args(args)
    now = datetime.now(UTC)
    before = baseline_moment(asked, now)
    target = ctx.gateway.target
    base: Baseline | None = None
    if ctx.baselines is not None:
        base = await ctx.baselines.latest_before(target, before)
    measured = await measure(ctx)
    steps = await plan_steps(ctx)
    tolerance = ctx.thresholds.recover_tolerance_pct
    findings = [
        baseline_finding(base, before, asked),
        *count_findings(measured, base, tolerance),
        *integrity_findings(measured, base),
    ]
    step_list, requested = step_findings(steps, measured, dry_run)
    try:  # users deleted on purpose after the baseline: never requested, only named
        deleted = await deleted_on_purpose(ctx)
    except Exception:
        log.exception("could not count the users deleted on purpose")
        deleted = 0
    if deleted:
        step_list.append(
            Finding(
                check=f"step: recover-users {INCLUDE_DELETED}",
                status=Status.WARN,
                summary=f"{deleted} missing users were deleted on purpose (their latest audit "
                "row is a DELETE) after the latest baseline; not restored unless asked",
                hint=f"/db recover-users {INCLUDE_DELETED}",
            )
        )
    report = Report(
        title="Recovery verification" + (" (dry run: nothing requested)" if dry_run else ""),
        target=target,
        findings=[*findings, *step_list],
        follow_ups=[] if dry_run else requested,
    )
    if ctx.baselines is not None and not measured.errors:
        await _keep(ctx, baseline_counts(measured))
    if recovery_verified(report) and ctx.on_recovery_verified is not None:
        try:
            await ctx.on_recovery_verified(report)
        except Exception:
            log.exception("the recovery-verified hook failed")
    return report


async def _keep(ctx: Context, counts: Mapping[str, int | None]) -> None:
    """The latest verification is kept as well (kind "verification"), for the incident
    summary's data impact; a failure to keep it does not change the report."""
    assert ctx.baselines is not None
    try:
        await ctx.baselines.save(ctx.gateway.target, counts, kind="verification")
    except Exception:
        log.exception("could not keep the verification's counts")

"""`refresh-views`: refresh materialized views, CONCURRENTLY where the view allows it.

The plan reads the live catalog (commands/views.py) for each view's refresh mode and
the sessions it would wait for; `apply()` refuses when a view's mode changed since.
PostgreSQL records no refresh time, so the hooks write each refresh into the bot's
refresh journal, which `/db views` reads back as `ctx.refresh_log`.
"""

from __future__ import annotations

import time

from psycopg import sql
from pydantic import BaseModel, Field

from commands.base import Context, Reader, Row, human_duration, human_size
from commands.remedies.base import (
    Execution,
    LockScope,
    Outcome,
    Plan,
    PlanStep,
    Remedy,
    RemedyAbort,
    Verification,
    Writer,
    add_remedy,
    check_count,
    check_drift,
)
from commands.views import (
    CONCURRENTLY,
    CONFLICTING_MODES,
    PLAIN,
    MatView,
    dependency_order,
    describe_lock,
    load_views,
    measure,
    select_views,
)

REFRESH_VIEWS_NAME = "refresh-views"


class RefreshData(BaseModel):
    """What `apply()` and the hooks read back from the plan."""

    views: list[str]  # schema.view, in refresh order
    identifiers: list[tuple[str, str]]
    modes: dict[str, str]  # schema.view -> concurrently | plain
    filenodes: dict[str, int | None] = Field(default_factory=dict)  # schema.view -> at plan time


async def plan_refresh(ctx: Context, args: list[str]) -> Plan:
    async def survey(db: Reader) -> list[MatView]:
        chosen = select_views(await load_views(db, ctx.thresholds.show_query_literals), args)
        await measure(db, chosen)
        return await dependency_order(db, chosen)

    chosen = await ctx.gateway.read(survey)
    steps: list[PlanStep] = []
    targets: list[Row] = []
    warnings: list[str] = []
    for v in chosen:
        mode = v.mode
        if mode == CONCURRENTLY:
            note = f"CONCURRENTLY: readers keep reading (unique index {v.unique_index})"
        elif not v.populated:
            note = "plain: the view is not populated, and CONCURRENTLY refuses an empty view"
        else:
            note = "plain: no usable unique index for CONCURRENTLY"
        steps.append(PlanStep(sql=v.refresh_sql().as_string(), note=note))
        if mode == PLAIN:
            warnings.append(
                f"plain refresh of {v.qualified} blocks every reader of {v.qualified} "
                f"for its duration ({note.removeprefix('plain: ')})"
            )
        blockers = v.blockers()
        if blockers:
            warnings.append(
                f"{v.qualified} is locked now by "
                + ", ".join(describe_lock(lk) for lk in blockers)
                + ": the refresh will wait for it up to the lock timeout, then give up"
            )
        queued = v.queued()
        if queued:
            warnings.append(
                f"{v.qualified} has lock requests queued ahead: "
                + ", ".join(describe_lock(lk) for lk in queued)
            )
        targets.append(
            {
                "view": v.qualified,
                "mode": mode,
                "populated": v.populated,
                "rows": v.rows,
                "rows_exact": v.rows_exact,
                "size": human_size(v.bytes),
                "unique_index": v.unique_index,
                "blocked_by": [int(lk["pid"]) for lk in blockers],
            }
        )
    plain = [v for v in chosen if v.mode == PLAIN]
    if plain and len(chosen) > 1:
        warnings.append(
            "all refreshes run in one transaction: each lock is held until the last "
            "refresh finishes"
        )
    modes = {v.qualified: v.mode for v in chosen}
    conflicting = CONFLICTING_MODES[PLAIN] if plain else CONFLICTING_MODES[CONCURRENTLY]
    n_conc = len(chosen) - len(plain)
    summary = f"refresh {len(chosen)} materialized view{'s' if len(chosen) != 1 else ''}"
    how = []
    if n_conc:
        how.append(f"{n_conc} CONCURRENTLY (readers keep reading)")
    if plain:
        how.append(f"{len(plain)} plain (blocks readers of {', '.join(v.name for v in plain)})")
    summary += ": " + "; ".join(how)
    return Plan(
        remedy=REFRESH_VIEWS_NAME,
        args=list(args),
        title="Refresh materialized views",
        summary=summary,
        steps=steps,
        targets=targets,
        count=len(chosen),
        warnings=warnings,
        needs_approval=bool(plain),
        locks=LockScope(relations=sorted({v.name for v in chosen}), modes=list(conflicting)),
        data=RefreshData(
            views=[v.qualified for v in chosen],
            identifiers=[(v.schema, v.name) for v in chosen],
            modes=modes,
            filenodes={v.qualified: v.filenode for v in chosen},
        ).model_dump(mode="json"),
    )


async def apply_refresh(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(RefreshData)
    identifiers = data.identifiers
    planned_modes = data.modes
    live = {(v.schema, v.name): v for v in await load_views(writer)}
    still: list[MatView] = []
    changed: list[str] = []
    for schema, name in identifiers:
        qualified = f"{schema}.{name}"
        v = live.get((schema, name))
        if v is None:
            changed.append(f"{qualified} is gone")
        elif v.mode != planned_modes.get(qualified):
            changed.append(f"{qualified} now needs a {v.mode} refresh")
        else:
            still.append(v)
    try:
        check_drift(plan, len(still), "views still present with the planned refresh mode")
    except RemedyAbort as exc:
        raise RemedyAbort(f"{exc} ({'; '.join(changed)})") from exc
    rows: list[Row] = []
    before = {str(t["view"]): t.get("rows") for t in plan.targets}
    for v in still:
        mode = planned_modes[v.qualified]
        started = time.perf_counter()
        await writer.execute(v.refresh_sql(mode))
        seconds = time.perf_counter() - started
        count_sql = sql.SQL("SELECT count(*) AS n FROM {}").format(sql.Identifier(v.schema, v.name))
        (counted,) = await writer.fetch(count_sql)
        rows.append(
            {
                "view": v.qualified,
                "mode": mode,
                "rows": int(counted["n"]),
                "seconds": round(seconds, 3),
                "rows_before": before.get(v.qualified),
            }
        )
    check_count(plan, len(rows), "views refreshed")
    populated = {(v.schema, v.name): v.populated for v in await load_views(writer)}
    empty = [v.qualified for v in still if not populated.get((v.schema, v.name), False)]
    if empty:
        return Outcome(
            ok=False,
            summary="verification failed: still not populated after the refresh: "
            + ", ".join(empty)
            + "; rolled back",
            rows=rows,
        )
    total = sum(float(r["seconds"]) for r in rows)
    detail = ", ".join(
        f"{r['view']} ({r['mode']}, {r['rows']:,} rows, {human_duration(r['seconds'])})"
        for r in rows
    )
    return Outcome(
        ok=True,
        summary=f"refreshed {len(rows)} view{'s' if len(rows) != 1 else ''} "
        f"in {human_duration(total)}: {detail}",
        affected=len(rows),
        rows=rows,
    )


async def journal_started(ctx: Context, plan: Plan, run: Execution) -> None:
    journal = ctx.refresh_journal
    if journal is None:
        return
    data = plan.private(RefreshData)
    for view in data.views:
        mode = CONCURRENTLY if data.modes.get(view) == CONCURRENTLY else PLAIN
        await journal.started(view, mode, approval_id=run.approval_id, actor_id=run.actor_id)


async def journal_finished(ctx: Context, plan: Plan, run: Execution, outcome: Outcome) -> None:
    journal = ctx.refresh_journal
    if journal is None:
        return
    done = {str(r.get("view")): r for r in outcome.rows}
    for view in plan.private(RefreshData).views:
        row = done.get(view)
        await journal.finished(
            view,
            approval_id=run.approval_id,
            rows=int(row["rows"]) if row and row.get("rows") is not None else None,
            error=None if outcome.ok else (outcome.error or outcome.summary),
        )


async def verify_refresh(db: Reader, plan: Plan, run: Execution) -> Verification:
    """PostgreSQL keeps no refresh time. A plain refresh writes the view anew (a new
    filenode), and all views refresh in one transaction, so one rewritten plain view
    proves the whole refresh committed; a CONCURRENTLY refresh leaves no such trace."""
    data = plan.private(RefreshData)
    live = {v.qualified: v for v in await load_views(db)}
    rewritten: list[str] = []
    found: list[str] = []
    for view in data.views:
        v = live.get(view)
        if v is None:
            found.append(f"{view} is gone")
        elif not v.populated:
            found.append(f"{view} is not populated")
        elif data.modes.get(view) == PLAIN and v.filenode != data.filenodes.get(view):
            rewritten.append(view)
    if found:
        return Verification(landed=False, found="; ".join(found))
    if rewritten:
        return Verification(
            landed=True, found="rewritten since the plan (a new filenode): " + ", ".join(rewritten)
        )
    if any(data.modes.get(view) == PLAIN for view in data.views):
        return Verification(
            landed=False,
            found="no plainly refreshed view was rewritten since the plan (same filenode): "
            "the refresh did not commit",
        )
    return Verification(
        landed=False,
        found="the views are populated, but a CONCURRENTLY refresh leaves no trace to "
        "prove it committed; requesting it again is safe",
    )


REFRESH_VIEWS = add_remedy(
    Remedy(
        name=REFRESH_VIEWS_NAME,
        usage="/db refresh-views [view …|all]",
        summary="refresh materialized views, CONCURRENTLY where the view allows it",
        plan=plan_refresh,
        apply=apply_refresh,
        verify=verify_refresh,
        role="REVIEWER",
        approver_role="ADMIN",
        approvers=1,
        started=journal_started,
        finished=journal_finished,
        # Rule 10: a trial refresh would hold the very locks the plan must weigh (a plain
        # refresh's ACCESS EXCLUSIVE stops every reader), and would do the whole work.
        not_tried="a trial REFRESH would take the view's locks (a plain one its ACCESS "
        "EXCLUSIVE lock) and do the whole work only to roll it back, and CONCURRENTLY cannot "
        "run in a transaction. The plan checked instead each view's refresh mode from the "
        "catalog (a unique index for CONCURRENTLY, populated or not) and the sessions it "
        "would wait for",
    )
)

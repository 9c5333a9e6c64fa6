"""`dedupe-learn`: keep each user's latest live LEARN submission, reject the others."""

from __future__ import annotations

from psycopg import sql

from commands.base import BACKUP_SCHEMA, Context, Reader, Row, UsageError
from commands.remedies.base import (
    Execution,
    LockScope,
    Outcome,
    Plan,
    PlanStep,
    Remedy,
    Verification,
    Writer,
    add_remedy,
    check_count,
    nothing_planned,
)
from commands.remedies.rowsets import (
    APPROVAL_PLACEHOLDER,
    SAMPLE,
    Counts,
    Part,
    backup_display,
    backup_sql,
    backups_hold,
    check_parts,
    count_rows,
    lock_and_backup,
    plural,
)

DEDUPE_LEARN_NAME = "dedupe-learn"

_LIVE_LEARN = "{a}.activity_code = 'LEARN' AND {a}.status IN ('PENDING', 'APPROVED')"
# A live LEARN with a later live LEARN of the same user (created_at, then id, decides).
DUPLICATE_LEARN = (
    _LIVE_LEARN.format(a="s")  # noqa: S608 (constant fragments of this module)
    + " AND EXISTS (SELECT 1 FROM submissions AS k WHERE k.user_id = s.user_id AND "
    + _LIVE_LEARN.format(a="k")
    + " AND (k.created_at, k.id) > (s.created_at, s.id))"
)
LEARN_PART = Part(
    "learn", "submissions", "s", DUPLICATE_LEARN, "duplicate LEARN submissions (not the latest)"
)

_KEPT = (
    "(SELECT k.id FROM submissions AS k WHERE k.user_id = s.user_id AND "  # noqa: S608
    + _LIVE_LEARN.format(a="k")
    + " ORDER BY k.created_at DESC, k.id DESC LIMIT 1)"
)
_LEARN_SAMPLE = (
    "s.id, s.user_id, s.status::text AS status, s.created_at, " + _KEPT + " AS kept_submission"
)
# Points awarded for the rejected ones stay in the ledger: the plan says how many.
_LEARN_AWARDS_SQL = (
    "SELECT count(*) AS n, coalesce(sum(l.delta_points), 0)::bigint AS points"  # noqa: S608
    " FROM submissions AS s JOIN points_ledger AS l ON l.meta ->> 'submission_id' = s.id"
    " WHERE " + DUPLICATE_LEARN
)


def reject_sql(backup: sql.Identifier) -> sql.Composed:
    return sql.SQL(
        "UPDATE submissions AS s SET status = 'REJECTED',"  # noqa: S608
        " review_note = 'Duplicate LEARN submission: the latest one (' || coalesce("
        + _KEPT
        + ", '?') || ') is kept; rejected by dbops-bot, approval ' || %s::text,"
        " updated_at = now() AT TIME ZONE 'UTC'"
        " FROM {} AS b WHERE s.id = b.id"
    ).format(backup)


async def plan_dedupe_learn(ctx: Context, args: list[str]) -> Plan:
    if [a for a in args if a.strip()]:
        raise UsageError("`dedupe-learn` takes no arguments")

    async def survey(db: Reader) -> tuple[int, int, list[Row], Row]:
        n = await count_rows(db, LEARN_PART.count_sql())
        users = await db.fetch(
            "SELECT count(DISTINCT s.user_id) AS n FROM submissions AS s WHERE "  # noqa: S608
            + DUPLICATE_LEARN
        )
        sample = await db.fetch(LEARN_PART.sample_sql(_LEARN_SAMPLE).as_string()) if n else []
        awards = (await db.fetch(_LEARN_AWARDS_SQL))[0] if n else {"n": 0, "points": 0}
        return n, int(users[0]["n"]), sample, awards

    n, users, targets, awards = await ctx.gateway.read(survey)
    backup = sql.Identifier(BACKUP_SCHEMA, f"{APPROVAL_PLACEHOLDER}_submissions")
    warnings: list[str] = []
    if int(awards["n"]):
        warnings.append(
            "the ledger awards of the submissions to be rejected stay in the ledger: "
            f"{awards['n']} rows, {awards['points']} points; `/db integrity` will list them"
        )
    return Plan(
        remedy=DEDUPE_LEARN_NAME,
        args=list(args),
        title="Reject duplicate LEARN submissions",
        summary=(
            f"set {plural(n, 'LEARN submission')} of {plural(users, 'user')} to REJECTED, "
            "keeping each user's latest (created_at, then id); nothing is deleted"
            if n
            else "no user has more than one PENDING or APPROVED LEARN submission; nothing to do"
        ),
        steps=[
            PlanStep(sql=LEARN_PART.lock_sql().as_string(), note=f"locks and recounts: {n}"),
            PlanStep(
                sql=backup_sql("submissions", backup).as_string(),
                params=["<the locked ids>"],
                note="whole rows, before the change",
            ),
            PlanStep(
                sql=reject_sql(backup).as_string(),
                params=[APPROVAL_PLACEHOLDER],
                note="the count must match the plan",
            ),
            PlanStep(sql=LEARN_PART.count_sql().as_string(), note="verification: must be 0"),
        ],
        targets=targets,
        count=n,
        backup=f"whole rows copied first into {backup_display('submissions')}" if n else None,
        warnings=warnings,
        needs_approval=n > 0,
        locks=LockScope(relations=["submissions"]),
        data=Counts(counts={"learn": n}).model_dump(mode="json"),
    )


async def apply_dedupe_learn(writer: Writer, plan: Plan) -> Outcome:
    await check_parts(writer, plan, [LEARN_PART], plan.private(Counts).counts)
    if plan.count == 0:
        return Outcome(ok=True, summary="no duplicate LEARN submission; nothing was changed")
    backup, copied = await lock_and_backup(writer, LEARN_PART, plan.count)
    updated = await writer.execute(reject_sql(backup), (writer.approval_id,))
    check_count(plan, updated, "LEARN submissions")
    if await count_rows(writer, LEARN_PART.count_sql()):
        return Outcome(
            ok=False, summary="verification failed: duplicate LEARN submissions remain; rolled back"
        )
    rows = await writer.fetch(
        sql.SQL(
            "SELECT s.id, s.user_id, b.status::text AS was, s.status::text AS now"
            " FROM submissions AS s JOIN {} AS b ON b.id = s.id ORDER BY s.id LIMIT {}"
        ).format(backup, sql.Literal(SAMPLE))
    )
    return Outcome(
        ok=True,
        summary=f"rejected {plural(updated, 'duplicate LEARN submission')}; the previous rows "
        f"are in {backup.as_string()}; every user now has at most one live LEARN",
        affected=updated,
        backed_up=copied,
        backup_table=backup.as_string(),
        rows=rows,
    )


async def verify_dedupe_learn(db: Reader, plan: Plan, run: Execution) -> Verification:
    if (trivial := nothing_planned(plan)) is not None:
        return trivial
    return await backups_hold(db, run.approval_id, {"submissions": plan.count})


DEDUPE_LEARN = add_remedy(
    Remedy(
        name=DEDUPE_LEARN_NAME,
        usage="/db dedupe-learn",
        summary="keep each user's latest live LEARN submission, reject the others (backed up)",
        plan=plan_dedupe_learn,
        apply=apply_dedupe_learn,
        verify=verify_dedupe_learn,
        approver_role="ADMIN",
        approvers=2,
        destroys_data=True,
    )
)

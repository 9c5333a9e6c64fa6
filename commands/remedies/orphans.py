"""`cleanup-orphans`: back up, then delete rows whose user, activity or submission is gone."""

from __future__ import annotations

from psycopg import sql

from commands.audit_trail import Op
from commands.base import BACKUP_SCHEMA, Context, Reader, Row, UsageError
from commands.guards import plan_notes
from commands.remedies.base import (
    DriftError,
    Execution,
    LockScope,
    Outcome,
    Plan,
    PlanStep,
    Remedy,
    RowCountError,
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
    audit_note,
    backup_display,
    backup_ids,
    backup_sql,
    backups_hold,
    check_parts,
    count_rows,
    delete_backed_up,
    delete_sql,
    fair_shares,
    lock_ids,
    plural,
    sample_parts,
    sampled_parts,
)

CLEANUP_ORPHANS_NAME = "cleanup-orphans"


class OrphanData(Counts):
    tables: list[str]


_USER_MISSING = "NOT EXISTS (SELECT 1 FROM users AS u WHERE u.id = {a}.user_id)"
_ACTIVITY_MISSING = "NOT EXISTS (SELECT 1 FROM activities AS ac WHERE ac.code = {a}.activity_code)"


def _orphan(alias: str) -> str:
    return f"({_USER_MISSING.format(a=alias)} OR {_ACTIVITY_MISSING.format(a=alias)})"


ORPHAN_SUBMISSION = _orphan("s")
ORPHAN_LEDGER = _orphan("l")
ORPHAN_ATTACHMENT = "NOT EXISTS (SELECT 1 FROM submissions AS s WHERE s.id = sa.submission_id)"
# Attachments of orphaned submissions: deleting those submissions would cascade to them
# (or leave them orphaned without the foreign key), so they are backed up and deleted too.
CHILD_ATTACHMENT = (
    "EXISTS (SELECT 1 FROM submissions AS s WHERE s.id = sa.submission_id AND "  # noqa: S608
    + ORPHAN_SUBMISSION
    + ")"
)

ORPHAN_TABLES = ("submission_attachments", "submissions", "points_ledger")
_TABLE_WORDS = {
    "submissions": "submissions",
    "submission": "submissions",
    "points_ledger": "points_ledger",
    "ledger": "points_ledger",
    "submission_attachments": "submission_attachments",
    "attachments": "submission_attachments",
}


def orphan_tables(args: list[str]) -> list[str]:
    words = [a.strip().lower() for a in args if a.strip()]
    if not words or words == ["all"]:
        return list(ORPHAN_TABLES)
    if len(words) != 1 or words[0] not in _TABLE_WORDS:
        raise UsageError(
            "`cleanup-orphans` takes one of: submissions, points_ledger, "
            "submission_attachments, all (the default)"
        )
    return [_TABLE_WORDS[words[0]]]


def orphan_parts(tables: list[str]) -> list[Part]:
    """The parts in the order they are deleted: children before parents."""
    parts: list[Part] = []
    if "submission_attachments" in tables:
        parts.append(
            Part(
                "attachments",
                "submission_attachments",
                "sa",
                ORPHAN_ATTACHMENT,
                "attachments without a submission",
            )
        )
    if "submissions" in tables:
        parts.append(
            Part(
                "child_attachments",
                "submission_attachments",
                "sa",
                CHILD_ATTACHMENT,
                "attachments of orphaned submissions",
            )
        )
        parts.append(
            Part(
                "submissions",
                "submissions",
                "s",
                ORPHAN_SUBMISSION,
                "submissions without a user or activity",
            )
        )
    if "points_ledger" in tables:
        parts.append(
            Part(
                "points_ledger",
                "points_ledger",
                "l",
                ORPHAN_LEDGER,
                "ledger rows without a user or activity",
            )
        )
    return parts


def _merged(parts: list[Part]) -> list[Part]:
    """One part per table (attachments: orphans or children of orphans), for the backup."""
    by_table: dict[str, list[Part]] = {}
    for p in parts:
        by_table.setdefault(p.table, []).append(p)
    merged: list[Part] = []
    for table, group in by_table.items():
        if len(group) == 1:
            merged.append(group[0])
            continue
        condition = "(" + " OR ".join(f"({p.condition})" for p in group) + ")"
        what = " and ".join(p.what for p in group)
        merged.append(Part(table, table, group[0].alias, condition, what))
    return merged


_SAMPLE_COLUMNS = {
    "attachments": "'submission_attachments' AS \"table\", sa.id, sa.submission_id AS parent,"
    " NULL::text AS activity_code, 'no submission ' || sa.submission_id AS why",
    "child_attachments": "'submission_attachments' AS \"table\", sa.id,"
    " sa.submission_id AS parent, NULL::text AS activity_code,"
    " 'its submission is orphaned' AS why",
    "submissions": "'submissions' AS \"table\", s.id, s.user_id AS parent, s.activity_code,"
    " CASE WHEN NOT EXISTS (SELECT 1 FROM users AS u WHERE u.id = s.user_id)"
    " THEN 'no user ' || s.user_id ELSE 'no activity ' || s.activity_code END AS why",
    "points_ledger": "'points_ledger' AS \"table\", l.id, l.user_id AS parent, l.activity_code,"
    " CASE WHEN NOT EXISTS (SELECT 1 FROM users AS u WHERE u.id = l.user_id)"
    " THEN 'no user ' || l.user_id ELSE 'no activity ' || l.activity_code END AS why",
}

# Foreign keys from other tables whose ON DELETE would change rows the backup lacks.
_DEPENDENTS_SQL = """
SELECT c.conname::text AS constraint, c.conrelid::regclass::text AS child,
       c.confrelid::regclass::text AS parent, c.confdeltype::text AS action
FROM pg_constraint c
WHERE c.contype = 'f' AND c.confrelid = ANY(%s::regclass[])
  AND c.confdeltype IN ('c', 'n', 'd')
"""


async def _unhandled_dependents(db: Reader, tables: list[str]) -> list[Row]:
    rows = await db.fetch(_DEPENDENTS_SQL, (tables,))
    return [
        r
        for r in rows
        if not (r["parent"] == "submissions" and r["child"] == "submission_attachments")
    ]


async def plan_cleanup_orphans(ctx: Context, args: list[str]) -> Plan:
    tables = orphan_tables(args)
    parts = orphan_parts(tables)

    async def survey(db: Reader) -> tuple[dict[str, int], list[Row], list[Row], str | None]:
        counts = {p.key: await count_rows(db, p.count_sql()) for p in parts}
        sample: list[Row] = []
        for p in parts:
            if counts[p.key] and len(sample) < SAMPLE:
                sample += await db.fetch(p.sample_sql(_SAMPLE_COLUMNS[p.key]).as_string())
        changes: list[tuple[str, Op]] = [(p.table, "DELETE") for p in parts if counts[p.key]]
        audit = await audit_note(db, changes) if changes else None
        return counts, sample[:SAMPLE], await _unhandled_dependents(db, tables), audit

    counts, targets, dependents, audit = await ctx.gateway.read(survey)
    deleting = sorted({p.table for p in parts if counts[p.key]})
    notes = await plan_notes(ctx, deleting, "DELETE") if deleting else []
    total = sum(counts.values())
    if total and dependents:
        names = ", ".join(f"{d['child']}.{d['constraint']} → {d['parent']}" for d in dependents)
        raise UsageError(
            "deleting these rows would cascade into tables the backup does not cover "
            f"({names}); remove those rows by hand first, or repair the foreign keys"
        )
    merged = _merged([p for p in parts if counts[p.key]])
    steps: list[PlanStep] = []
    for p in parts:
        steps.append(
            PlanStep(
                sql=p.lock_sql().as_string(),
                note=f"locks and recounts the {p.what}: planned {counts[p.key]}",
            )
        )
    for m in merged:
        backup = sql.Identifier(BACKUP_SCHEMA, f"{APPROVAL_PLACEHOLDER}_{m.table}")
        steps.append(
            PlanStep(
                sql=backup_sql(m.table, backup).as_string(),
                params=["<the locked ids>"],
                note=f"whole rows of the {m.what}",
            )
        )
        steps.append(
            PlanStep(
                sql=delete_sql(m.table, backup).as_string(),
                note="deletes exactly the backed-up rows; the count must match the plan",
            )
        )
    for p in parts:
        steps.append(PlanStep(sql=p.count_sql().as_string(), note="verification: must be 0"))
    detail = ", ".join(f"{counts[p.key]} {p.what}" for p in parts if counts[p.key])
    backups = sorted({m.table for m in merged})
    return Plan(
        remedy=CLEANUP_ORPHANS_NAME,
        args=list(args),
        title="Delete orphaned rows (" + ", ".join(tables) + ")",
        summary=(
            f"delete {plural(total, 'row')}: {detail}"
            if total
            else f"no orphaned rows in {', '.join(tables)}; nothing to do"
        ),
        steps=steps,
        targets=targets,
        count=total,
        backup=(
            "whole rows copied first into " + ", ".join(backup_display(t) for t in backups)
            if backups
            else None
        ),
        warnings=(
            ["the attachments of orphaned submissions are deleted with them (backed up too)"]
            if counts.get("child_attachments")
            else []
        )
        + notes,
        needs_approval=total > 0,
        locks=LockScope(relations=sorted({p.table for p in parts})),
        data=OrphanData(tables=tables, counts=counts).model_dump(mode="json"),
        audit=audit,
    )


_UNSAVED_ATTACHMENTS_SQL = (
    "SELECT count(*) AS n FROM submission_attachments AS sa"
    " WHERE sa.submission_id IN (SELECT b.id FROM {} AS b)"
)


async def _no_unsaved_attachments(writer: Writer, backup: sql.Identifier) -> None:
    """Deleting a submission deletes its attachments too (production's AFTER DELETE
    trigger, or the cascade): those were backed up and deleted as their own part just
    before, so none may be left for the trigger to take without a backup."""
    rows = await writer.fetch(sql.SQL(_UNSAVED_ATTACHMENTS_SQL).format(backup))
    unsaved = int(rows[0]["n"]) if rows else 0
    if unsaved:
        raise RowCountError(
            "attachments that deleting these submissions would take along unsaved", 0, unsaved
        )


async def apply_cleanup_orphans(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(OrphanData)
    parts = sampled_parts(orphan_parts(data.tables), data)
    planned = data.counts
    await check_parts(writer, plan, parts, planned)
    if plan.count == 0:
        return Outcome(ok=True, summary="no orphaned rows; nothing was changed")
    rows: list[Row] = []
    backups: list[str] = []
    total = 0
    locked: dict[str, list[str]] = {}
    for table in dict.fromkeys(p.table for p in parts if planned.get(p.key)):
        # Children before parents; a table's parts (attachments: orphans and children of
        # orphans) locked each, then backed up and deleted together.
        group = [p for p in parts if p.table == table and planned.get(p.key)]
        what = " and ".join(p.what for p in group)
        ids: list[str] = []
        for p in group:
            locked[p.key] = await lock_ids(writer, p)
            if len(locked[p.key]) != planned[p.key]:
                raise DriftError(p.what, planned[p.key], len(locked[p.key]), 0)
            ids += locked[p.key]
        backup, copied = await backup_ids(writer, table, ids, what)
        if table == "submissions":
            await _no_unsaved_attachments(writer, backup)
        deleted = len(await delete_backed_up(writer, table, backup, ids))
        if deleted != copied:
            raise RowCountError(what, copied, deleted)
        total += deleted
        backups.append(backup.as_string())
        rows.append({"table": table, "deleted": deleted, "backup": backup.as_string()})
    check_count(plan, total, "orphaned rows")
    left: dict[str, int] = {}
    for p in parts:
        rest = p.changed(locked.get(p.key, []))
        left[p.key] = await count_rows(writer, rest.count_sql(), rest.params)
    if any(left.values()):
        still = ", ".join(f"{n} {k}" for k, n in left.items() if n)
        return Outcome(
            ok=False, summary=f"verification failed: still orphaned: {still}; rolled back"
        )
    return Outcome(
        ok=True,
        summary=f"deleted {plural(total, 'orphaned row')}, backed up in {', '.join(backups)}; "
        "none remain",
        affected=total,
        backed_up=total,
        backup_table=", ".join(backups),
        rows=rows,
    )


def orphan_shares(counts: dict[str, int], n: int) -> dict[str, int]:
    """A sample's rows per part: fair shares, except that orphaned submissions are tried
    only with every attachment of theirs (deleting one takes its attachments along, and
    those must be backed up and deleted first); when those do not fit, none are."""
    children, subs = counts.get("child_attachments", 0), counts.get("submissions", 0)
    if not (children and subs):
        return fair_shares(counts, n)
    if children < n:
        others = {k: c for k, c in counts.items() if k != "child_attachments"}
        return fair_shares(others, n - children) | {"child_attachments": children}
    return fair_shares({k: c for k, c in counts.items() if k != "submissions"}, n) | {
        "submissions": 0
    }


async def verify_cleanup_orphans(db: Reader, plan: Plan, run: Execution) -> Verification:
    if (trivial := nothing_planned(plan)) is not None:
        return trivial
    data = plan.private(OrphanData)
    expected: dict[str, int] = {}
    for p in orphan_parts(data.tables):
        if data.counts.get(p.key):
            expected[p.table] = expected.get(p.table, 0) + data.counts[p.key]
    return await backups_hold(db, run.approval_id, expected)


CLEANUP_ORPHANS = add_remedy(
    Remedy(
        name=CLEANUP_ORPHANS_NAME,
        usage="/db cleanup-orphans [submissions|points_ledger|submission_attachments|all]",
        summary="back up, then delete rows whose user, activity or submission is gone",
        plan=plan_cleanup_orphans,
        apply=apply_cleanup_orphans,
        verify=verify_cleanup_orphans,
        approver_role="ADMIN",
        approvers=2,
        destroys_data=True,
        preflight=True,
        sample=sample_parts(OrphanData, orphan_shares),
    )
)

"""Data repairs: `cleanup-orphans`, `dedupe-learn`, `reconcile-points`, `dedupe-ledger-events`.

Each plan counts, with the same conditions its `apply()` uses, exactly the rows that will
change, and shows the SQL. Each `apply()` runs in the executor's one guarded transaction:

1. it locks the rows that still qualify (`SELECT … FOR UPDATE`) and compares their number
   with the plan's (`check_drift`), so no other session changes them meanwhile;
2. it copies every row it deletes or overwrites, whole, into
   `dbops_backup."<approval>_<table>"` (`CREATE TABLE … AS SELECT`), and only those rows
   are then changed (joined by id with the backup table);
3. it checks that the change touched exactly the planned rows (`check_count`);
4. it runs a verification query; a problem still present rolls everything back.

Nothing is deleted without a backup; nothing is invented: the ledger `source` of a
reconciled award is read from the live enum. When the database's triggers, constraints
or row security refuse a change, its error propagates and the executor rolls back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import sql

from commands.base import Context, Reader, Row, UsageError
from commands.integrity import amplify_keys
from commands.remedy import (
    DriftError,
    Outcome,
    Plan,
    PlanStep,
    Remedy,
    RemedyAbort,
    RowCountError,
    Writer,
    add_remedy,
    check_count,
    check_drift,
)

BACKUP_SCHEMA = "dbops_backup"  # the executor's schema (commands do not import bot)
SAMPLE = 20
APPROVAL_PLACEHOLDER = "<approval>"

# --- shared pieces ------------------------------------------------------------------


def _backup_display(table: str) -> str:
    """How a plan names the backup table before the approval id exists."""
    return sql.Identifier(BACKUP_SCHEMA, f"{APPROVAL_PLACEHOLDER}_{table}").as_string()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class Part:
    """One set of rows of one table a remedy changes, chosen by a condition on `alias`."""

    key: str  # names the part in plan.data
    table: str
    alias: str
    condition: str  # SQL over `alias`; constant text of this module, no user input
    what: str  # for messages: "orphaned submissions"

    def _from(self) -> sql.Composed:
        return sql.SQL("{} AS {}").format(sql.Identifier(self.table), sql.Identifier(self.alias))

    def count_sql(self) -> sql.Composed:
        return sql.SQL("SELECT count(*) AS n FROM {} WHERE {}").format(
            self._from(), sql.SQL(self.condition)
        )

    def lock_sql(self) -> sql.Composed:
        return sql.SQL("SELECT {a}.id FROM {f} WHERE {c} ORDER BY {a}.id FOR UPDATE OF {a}").format(
            a=sql.Identifier(self.alias), f=self._from(), c=sql.SQL(self.condition)
        )

    def sample_sql(self, columns: str) -> sql.Composed:
        return sql.SQL("SELECT {cols} FROM {f} WHERE {c} ORDER BY {a}.id LIMIT {n}").format(
            cols=sql.SQL(columns),
            f=self._from(),
            c=sql.SQL(self.condition),
            a=sql.Identifier(self.alias),
            n=sql.Literal(SAMPLE),
        )


def backup_sql(table: str, backup: sql.Identifier) -> sql.Composed:
    """Whole rows, as they are now, of the ids locked before."""
    return sql.SQL("CREATE TABLE {} AS SELECT t.* FROM {} AS t WHERE t.id = ANY(%s)").format(
        backup, sql.Identifier(table)
    )


def delete_sql(table: str, backup: sql.Identifier) -> sql.Composed:
    """Deletes exactly the backed-up rows."""
    return sql.SQL("DELETE FROM {} AS t USING {} AS b WHERE t.id = b.id").format(
        sql.Identifier(table), backup
    )


async def _count(db: Reader | Writer, query: sql.Composed, params: list[Any] | None = None) -> int:
    rows = await db.fetch(query.as_string(), params or ())
    return int(rows[0]["n"]) if rows else 0


async def _lock_and_backup(writer: Writer, part: Part, planned: int) -> tuple[sql.Identifier, int]:
    """Back up the locked rows of `part`; they must be exactly `planned` rows."""
    ids = [str(r["id"]) for r in await writer.fetch(part.lock_sql())]
    if len(ids) != planned:
        raise DriftError(part.what, planned, len(ids), 0)
    backup = await writer.backup_table(part.table)
    copied = await writer.execute(backup_sql(part.table, backup), (ids,))
    if copied != planned:
        raise RowCountError(f"{part.what} copied to the backup", planned, copied)
    return backup, copied


async def _check_parts(writer: Writer, plan: Plan, parts: list[Part]) -> dict[str, int]:
    """Recount every part; the total is the plan's count, each part its own."""
    now = {p.key: await _count(writer, p.count_sql()) for p in parts}
    check_drift(plan, sum(now.values()), "rows")
    planned = {str(k): int(v) for k, v in plan.data.get("counts", {}).items()}
    for p in parts:
        if now[p.key] != planned.get(p.key, 0):
            raise DriftError(p.what, planned.get(p.key, 0), now[p.key], 0)
    return now


# --- cleanup-orphans ----------------------------------------------------------------

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

    async def survey(db: Reader) -> tuple[dict[str, int], list[Row], list[Row]]:
        counts = {p.key: await _count(db, p.count_sql()) for p in parts}
        sample: list[Row] = []
        for p in parts:
            if counts[p.key] and len(sample) < SAMPLE:
                sample += await db.fetch(p.sample_sql(_SAMPLE_COLUMNS[p.key]).as_string())
        return counts, sample[:SAMPLE], await _unhandled_dependents(db, tables)

    counts, targets, dependents = await ctx.gateway.read(survey)
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
            f"delete {_plural(total, 'row')}: {detail}"
            if total
            else f"no orphaned rows in {', '.join(tables)}; nothing to do"
        ),
        steps=steps,
        targets=targets,
        count=total,
        backup=(
            "whole rows copied first into " + ", ".join(_backup_display(t) for t in backups)
            if backups
            else None
        ),
        warnings=(
            ["the attachments of orphaned submissions are deleted with them (backed up too)"]
            if counts.get("child_attachments")
            else []
        ),
        needs_approval=total > 0,
        data={"tables": tables, "counts": counts, "relations": sorted({p.table for p in parts})},
    )


async def apply_cleanup_orphans(writer: Writer, plan: Plan) -> Outcome:
    tables = [str(t) for t in plan.data["tables"]]
    parts = orphan_parts(tables)
    planned = {str(k): int(v) for k, v in plan.data["counts"].items()}
    await _check_parts(writer, plan, parts)
    if plan.count == 0:
        return Outcome(ok=True, summary="no orphaned rows; nothing was changed")
    rows: list[Row] = []
    backups: list[str] = []
    total = 0
    for m in _merged([p for p in parts if planned.get(p.key)]):
        expected = sum(planned.get(p.key, 0) for p in parts if p.table == m.table)
        backup, copied = await _lock_and_backup(writer, m, expected)
        deleted = await writer.execute(delete_sql(m.table, backup))
        if deleted != copied:
            raise RowCountError(m.what, copied, deleted)
        total += deleted
        backups.append(backup.as_string())
        rows.append({"table": m.table, "deleted": deleted, "backup": backup.as_string()})
    check_count(plan, total, "orphaned rows")
    left = {p.key: await _count(writer, p.count_sql()) for p in parts}
    if any(left.values()):
        still = ", ".join(f"{n} {k}" for k, n in left.items() if n)
        return Outcome(
            ok=False, summary=f"verification failed: still orphaned: {still}; rolled back"
        )
    return Outcome(
        ok=True,
        summary=f"deleted {_plural(total, 'orphaned row')}, backed up in {', '.join(backups)}; "
        "none remain",
        affected=total,
        backed_up=total,
        backup_table=", ".join(backups),
        rows=rows,
    )


# --- dedupe-learn -------------------------------------------------------------------

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
        n = await _count(db, LEARN_PART.count_sql())
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
            f"set {_plural(n, 'LEARN submission')} of {_plural(users, 'user')} to REJECTED, "
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
        backup=f"whole rows copied first into {_backup_display('submissions')}" if n else None,
        warnings=warnings,
        needs_approval=n > 0,
        data={"counts": {"learn": n}, "relations": ["submissions"]},
    )


async def apply_dedupe_learn(writer: Writer, plan: Plan) -> Outcome:
    await _check_parts(writer, plan, [LEARN_PART])
    if plan.count == 0:
        return Outcome(ok=True, summary="no duplicate LEARN submission; nothing was changed")
    backup, copied = await _lock_and_backup(writer, LEARN_PART, plan.count)
    updated = await writer.execute(reject_sql(backup), (writer.approval_id,))
    check_count(plan, updated, "LEARN submissions")
    if await _count(writer, LEARN_PART.count_sql()):
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
        summary=f"rejected {_plural(updated, 'duplicate LEARN submission')}; the previous rows "
        f"are in {backup.as_string()}; every user now has at most one live LEARN",
        affected=updated,
        backed_up=copied,
        backup_table=backup.as_string(),
        rows=rows,
    )


# --- dedupe-ledger-events -----------------------------------------------------------

DUPLICATE_EVENT = (
    "l.external_event_id IS NOT NULL AND EXISTS (SELECT 1 FROM points_ledger AS k"
    " WHERE k.external_event_id = l.external_event_id"
    " AND (k.created_at, k.id) < (l.created_at, l.id))"
)
EVENT_PART = Part(
    "events", "points_ledger", "l", DUPLICATE_EVENT, "repeated ledger rows of an external event"
)
_EVENT_SAMPLE = (
    "l.id, l.user_id, l.activity_code, l.delta_points, l.external_event_id, l.created_at,"
    " (SELECT k.id FROM points_ledger AS k WHERE k.external_event_id = l.external_event_id"
    " ORDER BY k.created_at, k.id LIMIT 1) AS kept_row"
)


async def plan_dedupe_events(ctx: Context, args: list[str]) -> Plan:
    if [a for a in args if a.strip()]:
        raise UsageError("`dedupe-ledger-events` takes no arguments")

    async def survey(db: Reader) -> tuple[int, Row, list[Row]]:
        n = await _count(db, EVENT_PART.count_sql())
        stats = (
            await db.fetch(
                "SELECT count(DISTINCT l.external_event_id) AS events,"  # noqa: S608
                " coalesce(sum(l.delta_points), 0)::bigint AS points"
                " FROM points_ledger AS l WHERE " + DUPLICATE_EVENT
            )
        )[0]
        sample = await db.fetch(EVENT_PART.sample_sql(_EVENT_SAMPLE).as_string()) if n else []
        return n, stats, sample

    n, stats, targets = await ctx.gateway.read(survey)
    backup = sql.Identifier(BACKUP_SCHEMA, f"{APPROVAL_PLACEHOLDER}_points_ledger")
    return Plan(
        remedy=DEDUPE_EVENTS_NAME,
        args=list(args),
        title="Delete repeated webhook awards",
        summary=(
            f"delete {_plural(n, 'ledger row')} repeating {_plural(int(stats['events']), 'event')}"
            f" ({stats['points']} points), keeping the first row of each external_event_id "
            "(created_at, then id)"
            if n
            else "no external_event_id appears twice in the ledger; nothing to do"
        ),
        steps=[
            PlanStep(sql=EVENT_PART.lock_sql().as_string(), note=f"locks and recounts: {n}"),
            PlanStep(
                sql=backup_sql("points_ledger", backup).as_string(),
                params=["<the locked ids>"],
                note="whole rows, before the delete",
            ),
            PlanStep(
                sql=delete_sql("points_ledger", backup).as_string(),
                note="deletes exactly the backed-up rows; the count must match the plan",
            ),
            PlanStep(sql=EVENT_PART.count_sql().as_string(), note="verification: must be 0"),
        ],
        targets=targets,
        count=n,
        backup=f"whole rows copied first into {_backup_display('points_ledger')}" if n else None,
        needs_approval=n > 0,
        data={"counts": {"events": n}, "relations": ["points_ledger"]},
    )


async def apply_dedupe_events(writer: Writer, plan: Plan) -> Outcome:
    await _check_parts(writer, plan, [EVENT_PART])
    if plan.count == 0:
        return Outcome(ok=True, summary="no repeated external event; nothing was changed")
    backup, copied = await _lock_and_backup(writer, EVENT_PART, plan.count)
    deleted = await writer.execute(delete_sql("points_ledger", backup))
    check_count(plan, deleted, "ledger rows")
    if await _count(writer, EVENT_PART.count_sql()):
        return Outcome(ok=False, summary="verification failed: repeated events remain; rolled back")
    return Outcome(
        ok=True,
        summary=f"deleted {_plural(deleted, 'repeated ledger row')}, backed up in "
        f"{backup.as_string()}; every external_event_id now appears once",
        affected=deleted,
        backed_up=copied,
        backup_table=backup.as_string(),
        rows=[{"table": "points_ledger", "deleted": deleted, "backup": backup.as_string()}],
    )


# --- reconcile-points ---------------------------------------------------------------

RECONCILE_SOURCE = "dbops-reconcile"
PREFERRED_SOURCES = ("FORM", "MANUAL")  # an approved form submission's award; else manual

_SOURCE_TYPE_SQL = """
SELECT tn.nspname::text AS schema, t.typname::text AS type, t.typtype::text AS kind,
       ARRAY(SELECT e.enumlabel::text FROM pg_enum e
             WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder) AS labels
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_namespace tn ON tn.oid = t.typnamespace
WHERE a.attrelid = to_regclass('points_ledger') AND a.attname = 'source' AND NOT a.attisdropped
"""


async def live_source(db: Reader) -> tuple[sql.Identifier, str, list[str]]:
    """The enum type of points_ledger.source and the value to use; refuses when none fits."""
    rows = await db.fetch(_SOURCE_TYPE_SQL)
    if not rows:
        raise UsageError("points_ledger.source does not exist; nothing can be reconciled")
    row = rows[0]
    labels = [str(v) for v in row["labels"] or []]
    if row["kind"] != "e":
        raise UsageError(
            f"points_ledger.source is of type {row['type']}, not an enum; the bot will not "
            "guess a source value"
        )
    chosen = next((s for s in PREFERRED_SOURCES if s in labels), None)
    if chosen is None:
        raise UsageError(
            f"the ledger source enum {row['type']} has none of "
            f"{', '.join(PREFERRED_SOURCES)} (it has {', '.join(labels) or 'no values'}); "
            "the bot will not invent one"
        )
    return sql.Identifier(str(row["schema"]), str(row["type"])), chosen, labels


def _int_key(key: str) -> str:
    """A payload key as an integer, read as `/db integrity` reads it: text that is not a
    whole number of at most nine digits counts 0."""
    value = f"(s.payload ->> {key})"
    whole = "'^[[:space:]]*-?[0-9]{1,9}[[:space:]]*$'"
    return f"(CASE WHEN {value} ~ {whole} THEN {value}::integer ELSE 0 END)"


_POINTS = (
    "CASE WHEN s.activity_code = 'AMPLIFY' THEN 2 * "
    + _int_key("k.peers")
    + " + "
    + _int_key("k.students")
    + " ELSE greatest(ac.default_points, 0) END"
)

# Approved submissions of a known user and activity whose (user, activity) pair has no
# ledger row at all: what `/db integrity` reports as missing awards. Pairs with some
# ledger rows are differences, left to a person: an award without a submission link
# would be paid twice. The reconciled rows fill the pair, so a second run finds none.
_DUE = f"""
WITH k AS (SELECT %s::text AS peers, %s::text AS students),
due AS (
  SELECT s.id AS submission_id, s.user_id, s.activity_code, {_POINTS} AS points,
         coalesce(s.updated_at, s.created_at) AS awarded_at
  FROM submissions AS s
  JOIN users AS u ON u.id = s.user_id
  JOIN activities AS ac ON ac.code = s.activity_code
  CROSS JOIN k
  WHERE s.status = 'APPROVED'
    AND NOT EXISTS (SELECT 1 FROM points_ledger AS l
                    WHERE l.user_id = s.user_id AND l.activity_code = s.activity_code)
    AND NOT EXISTS (SELECT 1 FROM points_ledger AS l
                    WHERE l.external_event_id = 'reconcile:' || s.id)
)"""  # noqa: S608
DUE_COUNT_SQL = (
    _DUE + "\nSELECT count(*) AS n, coalesce(sum(points), 0)::bigint AS points,"
    " count(DISTINCT (user_id, activity_code)) AS pairs FROM due WHERE points > 0"
)
DUE_SAMPLE_SQL = (
    _DUE + "\nSELECT submission_id, user_id, activity_code, points, awarded_at FROM due"
    f" WHERE points > 0 ORDER BY submission_id LIMIT {SAMPLE}"
)


def insert_awards_sql(enum_type: sql.Identifier) -> sql.Composed:
    return sql.Composed(
        [
            sql.SQL(
                "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
                " external_source, external_event_id, created_at, event_time, meta)"
                + _DUE
                + "\nSELECT 'reconcile_' || d.submission_id, d.user_id, d.activity_code, %s::"
            ),
            enum_type,
            sql.SQL(
                ", d.points, %s, 'reconcile:' || d.submission_id, now() AT TIME ZONE 'UTC',"
                " d.awarded_at AT TIME ZONE 'UTC',"
                " jsonb_build_object('submission_id', d.submission_id, 'reason',"
                " 'dbops-bot reconcile-points', 'approval', %s::text)"
                " FROM due AS d WHERE d.points > 0"
            ),
        ]
    )


async def plan_reconcile(ctx: Context, args: list[str]) -> Plan:
    if [a for a in args if a.strip()]:
        raise UsageError("`reconcile-points` takes no arguments")

    async def survey(
        db: Reader,
    ) -> tuple[tuple[str, str], tuple[sql.Identifier, str, list[str]], Row, list[Row]]:
        keys = await amplify_keys(db)
        source = await live_source(db)
        counted = (await db.fetch(DUE_COUNT_SQL, keys))[0]
        sample = await db.fetch(DUE_SAMPLE_SQL, keys) if int(counted["n"]) else []
        return keys, source, counted, sample

    keys, (enum_type, source, labels), counted, targets = await ctx.gateway.read(survey)
    n = int(counted["n"])
    return Plan(
        remedy=RECONCILE_NAME,
        args=list(args),
        title="Insert missing ledger awards",
        summary=(
            f"insert {_plural(n, 'ledger award')} ({counted['points']} points, "
            f"{_plural(int(counted['pairs']), 'user-activity pair')} with no ledger row) for "
            f"approved submissions, with source {source} (of {', '.join(labels)}) and "
            "external_event_id 'reconcile:<submission id>'; nothing is overwritten, so "
            "there is no backup"
            if n
            else "every approved submission's (user, activity) has ledger awards; nothing to do"
        ),
        steps=[
            PlanStep(sql=DUE_COUNT_SQL.strip(), params=list(keys), note=f"recounts: {n}"),
            PlanStep(
                sql=insert_awards_sql(enum_type).as_string(),
                params=[*keys, source, RECONCILE_SOURCE, APPROVAL_PLACEHOLDER],
                note="AMPLIFY worth peers x 2 + students x 1 with the keys the live "
                f"check_amplify_quota() reads ({', '.join(keys)}), other activities their "
                "default_points, 0 skipped; the count must match the plan",
            ),
            PlanStep(sql=DUE_COUNT_SQL.strip(), params=list(keys), note="verification: must be 0"),
        ],
        targets=targets,
        count=n,
        backup=None,
        needs_approval=n > 0,
        data={
            "keys": list(keys),
            "source": source,
            "pairs": int(counted["pairs"]),
            "relations": ["points_ledger"],
        },
    )


async def apply_reconcile(writer: Writer, plan: Plan) -> Outcome:
    keys = (str(plan.data["keys"][0]), str(plan.data["keys"][1]))
    now_keys = await amplify_keys(writer)
    if now_keys != keys:
        raise RemedyAbort(
            f"drift: check_amplify_quota() now reads {', '.join(now_keys)}, the plan used "
            f"{', '.join(keys)}; nothing was changed, request it again"
        )
    try:
        enum_type, source, _labels = await live_source(writer)
    except UsageError as exc:
        raise RemedyAbort(str(exc)) from exc
    if source != plan.data["source"]:
        raise RemedyAbort(
            f"drift: the ledger source would now be {source}, the plan said "
            f"{plan.data['source']}; nothing was changed, request it again"
        )
    now = int((await writer.fetch(DUE_COUNT_SQL, keys))[0]["n"])
    check_drift(plan, now, "missing awards")
    if plan.count == 0:
        return Outcome(ok=True, summary="no missing award; nothing was changed")
    inserted = await writer.execute(
        insert_awards_sql(enum_type), (*keys, source, RECONCILE_SOURCE, writer.approval_id)
    )
    check_count(plan, inserted, "ledger awards")
    left = int((await writer.fetch(DUE_COUNT_SQL, keys))[0]["n"])
    if left:
        return Outcome(ok=False, summary=f"verification failed: {left} awards still missing")
    rows = await writer.fetch(
        "SELECT id, user_id, activity_code, source::text AS source, delta_points,"
        " external_event_id FROM points_ledger WHERE external_source = %s"
        " AND meta ->> 'approval' = %s ORDER BY id LIMIT %s",
        (RECONCILE_SOURCE, writer.approval_id, SAMPLE),
    )
    return Outcome(
        ok=True,
        summary=f"inserted {_plural(inserted, 'ledger award')} with source {source}; "
        "no approved submission's (user, activity) lacks its awards now",
        affected=inserted,
        rows=rows,
    )


# --- registration -------------------------------------------------------------------

CLEANUP_ORPHANS_NAME = "cleanup-orphans"
DEDUPE_LEARN_NAME = "dedupe-learn"
RECONCILE_NAME = "reconcile-points"
DEDUPE_EVENTS_NAME = "dedupe-ledger-events"

CLEANUP_ORPHANS = add_remedy(
    Remedy(
        name=CLEANUP_ORPHANS_NAME,
        usage="/db cleanup-orphans [submissions|points_ledger|submission_attachments|all]",
        summary="back up, then delete rows whose user, activity or submission is gone",
        plan=plan_cleanup_orphans,
        apply=apply_cleanup_orphans,
        approver_role="ADMIN",
        approvers=2,
        destroys_data=True,
    )
)
DEDUPE_LEARN = add_remedy(
    Remedy(
        name=DEDUPE_LEARN_NAME,
        usage="/db dedupe-learn",
        summary="keep each user's latest live LEARN submission, reject the others (backed up)",
        plan=plan_dedupe_learn,
        apply=apply_dedupe_learn,
        approver_role="ADMIN",
        approvers=2,
        destroys_data=True,
    )
)
RECONCILE_POINTS = add_remedy(
    Remedy(
        name=RECONCILE_NAME,
        usage="/db reconcile-points",
        summary="insert the missing ledger awards of approved submissions (idempotent)",
        plan=plan_reconcile,
        apply=apply_reconcile,
        approver_role="ADMIN",
        approvers=1,
        destroys_data=False,
    )
)
DEDUPE_EVENTS = add_remedy(
    Remedy(
        name=DEDUPE_EVENTS_NAME,
        usage="/db dedupe-ledger-events",
        summary="keep the first ledger row of each repeated external_event_id, back up "
        "and delete the rest",
        plan=plan_dedupe_events,
        apply=apply_dedupe_events,
        approver_role="ADMIN",
        approvers=2,
        destroys_data=True,
    )
)

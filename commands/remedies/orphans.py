"""`cleanup-orphans`: back up, then delete rows whose user, activity or submission is gone."""

from __future__ import annotations

from psycopg import sql

from commands.audit_trail import Op
from commands.base import BACKUP_SCHEMA, Context, Reader, Row, UsageError
from commands.guards import plan_notes
from commands.keyranges import Piece, key_pieces, no_jit, run_pieces
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


# The plan counts each part in pieces of bounded statements (commands/keyranges.py), the
# same rows its conditions above name, and keeps each piece's first SAMPLE ids of each
# part; the sample is then read by those conditions among the kept ids, in id order:
# exactly the rows the whole part's `sample_sql` would give.
#
# Submissions and the ledger by ranges of user ids, each piece in two parts that cannot
# overlap: rows whose user is missing (`um`: a merge of the table's user_id index with
# the piece's share of users' primary key, reading no row), and rows of a user present
# whose activity is missing (`am`: the codes missing from activities, found once by a
# walk of the table's activity_code index, read through that index). Only the orphans'
# ids are then read, by the user_id index (a probe per missing user: every row of a
# missing user is one; OFFSET 0 keeps the probes from being planned as a scan of the
# piece). `%(everything)s` is the piece of NULL user ids, whose every row is an orphan.
_ORPHANS_CTE = """
WITH um AS MATERIALIZED (
  SELECT {a}.user_id FROM {table} AS {a}
  WHERE {rows} AND NOT EXISTS (SELECT 1 FROM users AS u WHERE u.id = {a}.user_id AND {users})
), am AS MATERIALIZED (
  SELECT {a}.id FROM {table} AS {a}
  WHERE {rows}
    AND ({a}.activity_code = ANY(%(missing)s::text[]) OR (%(nulls)s AND {a}.activity_code IS NULL))
    AND EXISTS (SELECT 1 FROM users AS u WHERE u.id = {a}.user_id AND {users})
), o AS MATERIALIZED (
  SELECT x.id FROM (SELECT DISTINCT um.user_id FROM um) AS m CROSS JOIN LATERAL
    (SELECT {a}.id FROM {table} AS {a} WHERE {a}.user_id = m.user_id OFFSET 0) AS x
  UNION ALL SELECT {a}.id FROM {table} AS {a} WHERE {rows} AND %(everything)s
  UNION ALL SELECT am.id FROM am
)"""
# The attachments of the orphaned submissions of a piece by their index, one probe each.
_SUBMISSIONS_PIECE_SQL = (
    _ORPHANS_CTE.replace("{table}", "submissions").replace("{a}", "s")  # noqa: S608
    + """, c AS MATERIALIZED (
  SELECT a.id FROM o CROSS JOIN LATERAL
    (SELECT sa.id FROM submission_attachments AS sa WHERE sa.submission_id = o.id OFFSET 0) AS a
)
SELECT (SELECT count(*) FROM um) + (SELECT count(*) FROM am) AS submissions,
       (SELECT count(*) FROM c) AS child_attachments,
       ARRAY(SELECT o.id FROM o ORDER BY o.id LIMIT %(sample)s) AS submissions_first,
       ARRAY(SELECT c.id FROM c ORDER BY c.id LIMIT %(sample)s) AS child_attachments_first
"""
)
_LEDGER_PIECE_SQL = (
    _ORPHANS_CTE.replace("{table}", "points_ledger").replace("{a}", "l")  # noqa: S608
    + """
SELECT (SELECT count(*) FROM um) + (SELECT count(*) FROM am) AS points_ledger,
       ARRAY(SELECT o.id FROM o ORDER BY o.id LIMIT %(sample)s) AS points_ledger_first
"""
)
# Attachments by ranges of submission ids: a merge of the two indexes per range, reading
# no row; then the ids of the orphans only (every attachment of a missing submission is
# one).
_ATTACHMENTS_PIECE_SQL = """
WITH o AS MATERIALIZED (
  SELECT sa.submission_id FROM submission_attachments AS sa
  WHERE {rows}
    AND NOT EXISTS (SELECT 1 FROM submissions AS s WHERE s.id = sa.submission_id AND {users})
)
SELECT count(*) AS attachments,
       ARRAY(SELECT x.id FROM
               (SELECT x.id FROM (SELECT DISTINCT o.submission_id FROM o) AS m
                CROSS JOIN LATERAL (SELECT sa.id FROM submission_attachments AS sa
                                    WHERE sa.submission_id = m.submission_id OFFSET 0) AS x
                UNION ALL
                SELECT sa.id FROM submission_attachments AS sa WHERE {rows} AND %(everything)s
               ) AS x
             ORDER BY x.id LIMIT %(sample)s) AS attachments_first
FROM o
"""
# The piece queries above by part: table, alias, the key pieced by and its parent's key.
_PIECED: dict[str, tuple[str, str, str, str, str]] = {
    "attachments": (
        "submission_attachments",
        "sa",
        "submission_id",
        "s.id",
        _ATTACHMENTS_PIECE_SQL,
    ),
    "submissions": ("submissions", "s", "user_id", "u.id", _SUBMISSIONS_PIECE_SQL),
    "points_ledger": ("points_ledger", "l", "user_id", "u.id", _LEDGER_PIECE_SQL),
}
# The activity codes a table holds that activities lacks, and whether it holds NULL: a
# walk of its activity_code index, one probe per distinct code (a plain DISTINCT where
# no index leads with activity_code).
_CODES_INDEXED_SQL = """
WITH RECURSIVE c AS (
  (SELECT t.activity_code AS code FROM {table} AS t WHERE t.activity_code IS NOT NULL
   ORDER BY t.activity_code LIMIT 1)
  UNION ALL
  SELECT (SELECT t.activity_code FROM {table} AS t WHERE t.activity_code > c.code
          ORDER BY t.activity_code LIMIT 1)
  FROM c WHERE c.code IS NOT NULL
)
SELECT ARRAY(SELECT c.code FROM c WHERE c.code IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM activities AS ac WHERE ac.code = c.code)) AS missing,
       EXISTS (SELECT 1 FROM {table} AS t WHERE t.activity_code IS NULL) AS nulls
"""
_CODES_SCAN_SQL = """
WITH c AS (SELECT DISTINCT t.activity_code AS code FROM {table} AS t)
SELECT ARRAY(SELECT c.code FROM c WHERE c.code IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM activities AS ac WHERE ac.code = c.code)) AS missing,
       EXISTS (SELECT 1 FROM c WHERE c.code IS NULL) AS nulls
"""
_CODE_INDEX_SQL = """
SELECT EXISTS (SELECT 1 FROM pg_index AS i
               JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
               WHERE i.indrelid = to_regclass(%s) AND a.attname = 'activity_code'
                 AND i.indisvalid AND i.indpred IS NULL) AS indexed
"""


async def missing_codes(db: Reader, table: str) -> Row:
    """`missing`: the activity codes `table` holds that activities lacks; `nulls`:
    whether it holds rows without one."""
    indexed = (await db.fetch(_CODE_INDEX_SQL, (table,)))[0]["indexed"]
    query = (_CODES_INDEXED_SQL if indexed else _CODES_SCAN_SQL).format(table=table)
    return (await db.fetch(query))[0]


def _piece_sql(key: str, piece: Piece) -> str:
    _table, alias, column, parent, query = _PIECED[key]
    return query.format(rows=piece.where(f"{alias}.{column}"), users=piece.where(parent))


async def _count_pieced(ctx: Context, key: str) -> tuple[dict[str, int], dict[str, list[str]]]:
    """One piece query's parts over the whole table: their counts and, per part, the
    first SAMPLE ids of each piece (the candidates of the sample)."""
    table, _alias, column, _parent, _query = _PIECED[key]

    async def pieces(db: Reader) -> tuple[list[Piece], Row]:
        await no_jit(db)
        codes = await missing_codes(db, table) if key != "attachments" else {}
        parent = "submissions" if key == "attachments" else None
        return await key_pieces(db, table, column, parent), codes

    found, codes = await ctx.gateway.read(pieces)
    params = {
        "sample": SAMPLE,
        "missing": codes.get("missing") or [],
        "nulls": bool(codes.get("nulls")),
    }

    async def read(db: Reader, piece: Piece) -> Row:
        values = {**params, **piece.params(), "everything": piece.null}
        return (await db.fetch(_piece_sql(key, piece), values))[0]

    settings = {"enable_hashjoin": "off"} if key == "attachments" else {}
    rows = await run_pieces(ctx.gateway, found, read, settings)
    counts: dict[str, int] = {}
    firsts: dict[str, list[str]] = {}
    for row in rows:
        for k, v in row.items():
            if k.endswith("_first"):
                firsts.setdefault(k.removesuffix("_first"), []).extend(str(i) for i in v or [])
            else:
                counts[k] = counts.get(k, 0) + int(v or 0)
    return counts, firsts


async def orphan_counts(
    ctx: Context, parts: list[Part]
) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Every part's count, and the candidates of its sample, piece by piece."""
    keys = {p.key for p in parts}
    counts: dict[str, int] = {}
    firsts: dict[str, list[str]] = {}
    for key in _PIECED:
        if key in keys:
            got, first = await _count_pieced(ctx, key)
            counts |= got
            firsts |= first
    return {p.key: counts.get(p.key, 0) for p in parts}, firsts


def _sample_sql(part: Part) -> str:
    """The part's `sample_sql` among the candidate ids (bound: `%s`)."""
    a = part.alias
    return (
        f"SELECT {_SAMPLE_COLUMNS[part.key]} FROM {part.table} AS {a}"  # noqa: S608 (constants)
        f" WHERE ({part.condition}) AND {a}.id = ANY(%s) ORDER BY {a}.id LIMIT {SAMPLE}"
    )


async def plan_cleanup_orphans(ctx: Context, args: list[str]) -> Plan:
    tables = orphan_tables(args)
    parts = orphan_parts(tables)
    counts, firsts = await orphan_counts(ctx, parts)

    async def survey(db: Reader) -> tuple[list[Row], list[Row], str | None]:
        await no_jit(db)
        sample: list[Row] = []
        for p in parts:
            if counts[p.key] and len(sample) < SAMPLE:
                sample += await db.fetch(_sample_sql(p), (firsts.get(p.key, []),))
        changes: list[tuple[str, Op]] = [(p.table, "DELETE") for p in parts if counts[p.key]]
        audit = await audit_note(db, changes) if changes else None
        return sample[:SAMPLE], await _unhandled_dependents(db, tables), audit

    targets, dependents, audit = await ctx.gateway.read(survey)
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

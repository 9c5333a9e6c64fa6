"""`migration-resolve <name> --rolled-back|--applied`: what `prisma migrate resolve` does
to a failed migration's record, approved, backed up and verified.

Prisma's own resolve (prisma-engines, schema-engine `mark_migration_rolled_back` and
`mark_migration_applied`) is followed, so `prisma migrate status` afterwards reads the
same history it would after the CLI:

- `--rolled-back` sets `rolled_back_at = now()` on every failed row of the migration
  (finished_at and rolled_back_at both NULL); `prisma migrate deploy` then applies it anew.
- `--applied` does that too, and records one new row of the migration as applied:
  `started_at = finished_at = now()`, `logs = ''`, `applied_steps_count` left at its
  default 0 (Prisma does not count steps it did not run). Prisma takes the checksum of
  the migration file; the bot has no file, so it keeps the checksum the failed row
  recorded for the same file. Prisma refuses a migration already recorded as applied;
  so does this remedy.

Only a failed migration is resolved: any other name is refused before an approval is
asked. The transaction takes Prisma's own advisory lock, so no `prisma migrate` runs
meanwhile, and the failed rows are copied whole into the backup table first.

Its apply is one transaction of DML, so the plan is tried before approval and rolled
back (DESIGN.md rule 10); `_prisma_migrations` is not audited by LEAPS's trigger.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import sql
from pydantic import BaseModel

from commands.base import BACKUP_SCHEMA, Context, Reader, Row, UsageError
from commands.migrations import (
    MIGRATIONS_TABLE,
    PRISMA_LOCK_KEY,
    migration_schemas,
    prisma_lock_holders,
    shown_log,
)
from commands.remedies.base import (
    Execution,
    LockScope,
    Outcome,
    Plan,
    PlanStep,
    Remedy,
    RemedyAbort,
    RowCountError,
    Verification,
    Writer,
    add_remedy,
    check_count,
    check_drift,
    nothing_planned,
    sample_first,
)
from commands.remedies.rowsets import APPROVAL_PLACEHOLDER, backup_display, backups_hold, plural

NAME = "migration-resolve"
USAGE = "/db migration-resolve <migration_name> --rolled-back|--applied"
MODES = ("--rolled-back", "--applied")


class ResolveData(BaseModel):
    schema_name: str
    migration: str
    mode: str  # rolled-back | applied
    ids: list[str]


def parse_args(args: list[str]) -> tuple[str, str]:
    words = [a for a in args if a.strip()]
    modes = [w for w in words if w in MODES]
    names = [w for w in words if w not in MODES]
    unknown = [w for w in names if w.startswith("-")]
    if unknown:
        raise UsageError(f"unknown option {unknown[0]}: give --rolled-back or --applied")
    if len(modes) != 1:
        raise UsageError(
            "say how it was resolved: --rolled-back (its changes are not in the database) "
            "or --applied (they all are), one of the two"
        )
    if len(names) != 1:
        raise UsageError("name exactly one migration, as `/db migrations` lists it")
    return names[0], modes[0].removeprefix("--")


def _table(schema: str) -> sql.Identifier:
    return sql.Identifier(schema, MIGRATIONS_TABLE)


def rows_sql(schema: str) -> sql.Composed:
    return sql.SQL(
        "SELECT id, migration_name, checksum, started_at, finished_at, rolled_back_at,"
        " applied_steps_count, left(coalesce(logs, ''), 4000) AS logs"
        " FROM {} WHERE migration_name = %s ORDER BY started_at, id"
    ).format(_table(schema))


def lock_sql(schema: str) -> sql.Composed:
    """The planned rows that are still failed, locked so nothing else resolves them."""
    return sql.SQL(
        "SELECT id FROM {} WHERE id = ANY(%s) AND finished_at IS NULL"
        " AND rolled_back_at IS NULL ORDER BY id FOR UPDATE"
    ).format(_table(schema))


def backup_sql(schema: str, backup: sql.Identifier) -> sql.Composed:
    return sql.SQL("CREATE TABLE {} AS SELECT * FROM {} WHERE id = ANY(%s)").format(
        backup, _table(schema)
    )


def roll_back_sql(schema: str) -> sql.Composed:
    return sql.SQL(
        "UPDATE {} SET rolled_back_at = now() WHERE id = ANY(%s)"
        " AND finished_at IS NULL AND rolled_back_at IS NULL"
    ).format(_table(schema))


def applied_sql(schema: str, backup: sql.Identifier) -> sql.Composed:
    """One applied record, as `prisma migrate resolve --applied` inserts it."""
    return sql.SQL(
        "INSERT INTO {} (id, checksum, finished_at, migration_name, logs, rolled_back_at,"
        " started_at, applied_steps_count)"
        " SELECT gen_random_uuid()::text, b.checksum, now(), b.migration_name, '', NULL, now(), 0"
        " FROM (SELECT checksum, migration_name FROM {} ORDER BY started_at DESC, id LIMIT 1) AS b"
    ).format(_table(schema), backup)


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def _shown(row: Row, show_literals: bool) -> Row:
    return {
        "id": row["id"],
        "migration": row["migration_name"],
        "started_at": _iso(row["started_at"]),
        "finished_at": _iso(row["finished_at"]),
        "rolled_back_at": _iso(row["rolled_back_at"]),
        "applied_steps": row["applied_steps_count"],
        "logs": shown_log(row.get("logs"), show_literals=show_literals),
    }


def _state(row: Row) -> str:
    if row["rolled_back_at"] is not None:
        return f"rolled back at {_iso(row['rolled_back_at'])}"
    if row["finished_at"] is not None:
        return f"applied (finished at {_iso(row['finished_at'])})"
    return "failed"


async def _failed_names(db: Reader, schemas: list[str]) -> list[str]:
    names: list[str] = []
    for schema in schemas:
        query = sql.SQL(
            "SELECT DISTINCT migration_name FROM {}"
            " WHERE finished_at IS NULL AND rolled_back_at IS NULL"
        ).format(_table(schema))
        names += [str(r["migration_name"]) for r in await db.fetch(query.as_string())]
    return sorted(set(names))


async def plan_resolve(ctx: Context, args: list[str]) -> Plan:
    name, mode = parse_args(args)

    async def survey(db: Reader) -> tuple[list[str], dict[str, list[Row]], list[str], list[int]]:
        schemas = await migration_schemas(db)
        rows = {s: await db.fetch(rows_sql(s).as_string(), (name,)) for s in schemas}
        return schemas, rows, await _failed_names(db, schemas), await prisma_lock_holders(db)

    schemas, by_schema, failed_names, lock = await ctx.gateway.read(survey)
    if not schemas:
        raise UsageError(
            f"this database has no `{MIGRATIONS_TABLE}` table: there is no migration record "
            "to resolve"
        )
    others = (
        f"; failed migrations now: {', '.join(failed_names)}"
        if failed_names
        else ("; no migration is failed now")
    )
    failed = {s: [r for r in rows if _state(r) == "failed"] for s, rows in by_schema.items()}
    failed = {s: rows for s, rows in failed.items() if rows}
    if not failed:
        seen = [r for rows in by_schema.values() for r in rows]
        if not seen:
            raise UsageError(f"no migration named `{name}` is recorded{others}")
        states = "; ".join(dict.fromkeys(_state(r) for r in seen))
        raise UsageError(
            f"`{name}` is not a failed migration ({states}): only a failed one is resolved" + others
        )
    if len(failed) > 1:
        raise UsageError(
            f"`{name}` is failed in several migration tables ({', '.join(sorted(failed))}); "
            "resolve it with the Prisma CLI pointed at the right schema"
        )
    ((schema, rows),) = failed.items()
    if mode == "applied":
        done = [r for r in by_schema[schema] if r["finished_at"] is not None]
        if done:
            raise UsageError(
                f"`{name}` is already recorded as applied ({_state(done[0])}); Prisma refuses "
                f"to record it twice: use --rolled-back for the failed attempt"
            )
    show = ctx.thresholds.show_query_literals
    n = len(rows)
    ids = [str(r["id"]) for r in rows]
    backup = sql.Identifier(BACKUP_SCHEMA, f"{APPROVAL_PLACEHOLDER}_{MIGRATIONS_TABLE}")
    where = f"{schema}.{MIGRATIONS_TABLE}"
    steps = [
        PlanStep(
            sql="SELECT pg_try_advisory_xact_lock(%s) AS got",
            params=[PRISMA_LOCK_KEY],
            note="Prisma's own migrate lock, for this transaction: no `prisma migrate` runs "
            "meanwhile; if one holds it, nothing is changed",
        ),
        PlanStep(sql=lock_sql(schema).as_string(), params=[ids], note=f"locks and recounts: {n}"),
        PlanStep(
            sql=backup_sql(schema, backup).as_string(),
            params=[ids],
            note="whole rows, before the change",
        ),
        PlanStep(
            sql=roll_back_sql(schema).as_string(),
            params=[ids],
            note=f"exactly {n} row{'s' if n != 1 else ''}, else rolled back",
        ),
    ]
    if mode == "applied":
        steps.append(
            PlanStep(
                sql=applied_sql(schema, backup).as_string(),
                note="one applied record, as `prisma migrate resolve --applied` writes it "
                "(checksum kept from the failed attempt, applied_steps_count 0)",
            )
        )
        summary = (
            f"record `{name}` as applied in {where}: its {plural(n, 'failed attempt')} marked "
            "rolled back and one applied record added, as `prisma migrate resolve --applied` "
            "does; only do this when every change of the migration is in the database"
        )
    else:
        summary = (
            f"mark {plural(n, 'failed attempt')} of `{name}` in {where} as rolled back, as "
            "`prisma migrate resolve --rolled-back` does; `prisma migrate deploy` then "
            "applies it anew, so undo whatever part of it did apply first"
        )
    warnings = []
    if lock:
        warnings.append(
            f"`prisma migrate` holds its lock now (pid {', '.join(map(str, lock))}): the "
            "migration may still be running; the remedy will refuse while it does"
        )
    return Plan(
        remedy=NAME,
        args=list(args),
        title=f"Resolve migration {name} ({mode})",
        summary=summary,
        steps=steps,
        targets=[_shown(r, show) for r in rows],
        count=n,
        backup=f"the failed rows, whole, into {backup_display(MIGRATIONS_TABLE)}",
        warnings=warnings,
        locks=LockScope(relations=[MIGRATIONS_TABLE]),
        data=ResolveData(schema_name=schema, migration=name, mode=mode, ids=ids).model_dump(),
    )


async def apply_resolve(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(ResolveData)
    (lock,) = await writer.fetch("SELECT pg_try_advisory_xact_lock(%s) AS got", (PRISMA_LOCK_KEY,))
    if not lock["got"]:
        raise RemedyAbort(
            "`prisma migrate` holds its lock: a migration is running now; nothing was changed, "
            "request it again once it has finished"
        )
    locked = [str(r["id"]) for r in await writer.fetch(lock_sql(data.schema_name), (data.ids,))]
    check_drift(plan, len(locked), "failed attempts")
    if len(locked) != len(data.ids):  # the same number, other rows: still drift
        raise RemedyAbort("drift: other rows are failed now; nothing was changed, request it again")
    backup = await writer.backup_table(MIGRATIONS_TABLE)
    copied = await writer.execute(backup_sql(data.schema_name, backup), (data.ids,))
    if copied != plan.count:
        raise RowCountError("failed attempts copied to the backup", plan.count, copied)
    updated = await writer.execute(roll_back_sql(data.schema_name), (data.ids,))
    check_count(plan, updated, "failed attempts")
    if data.mode == "applied":
        inserted = await writer.execute(applied_sql(data.schema_name, backup))
        if inserted != 1:
            raise RowCountError("applied records added", 1, inserted)
    rows = await writer.fetch(rows_sql(data.schema_name), (data.migration,))
    still = [r for r in rows if str(r["id"]) in data.ids and _state(r) == "failed"]
    applied = [r for r in rows if r["finished_at"] is not None and r["rolled_back_at"] is None]
    if still or (data.mode == "applied") != bool(applied):
        return Outcome(
            ok=False,
            summary=f"verification failed: `{data.migration}` reads back as "
            + "; ".join(_state(r) for r in rows),
        )
    what = (
        "recorded as applied (the failed attempt marked rolled back)"
        if data.mode == "applied"
        else f"marked rolled back ({plural(updated, 'attempt')})"
    )
    return Outcome(
        ok=True,
        summary=f"`{data.migration}` {what}; no failed migration of that name is left, the "
        f"previous rows are in {backup.as_string()}",
        affected=updated,
        backed_up=copied,
        backup_table=backup.as_string(),
        rows=[_shown(r, False) for r in rows],
    )


def sample_resolve(plan: Plan, n: int) -> Plan:
    """One migration's failed attempts are a handful of rows: the plan is tried whole. A
    plan of more than n attempts (never seen) is cut to its first n ids, which its apply
    locks, backs up and marks, and nothing else (`--applied` still adds its one record)."""
    return sample_first(plan, n, ResolveData)


async def verify_resolve(db: Reader, plan: Plan, run: Execution) -> Verification:
    """Landed when the backup (made inside the transaction) holds the planned rows and
    none of them reads back as failed."""
    if (trivial := nothing_planned(plan)) is not None:
        return trivial
    data = plan.private(ResolveData)
    held = await backups_hold(db, run.approval_id, {MIGRATIONS_TABLE: plan.count})
    if not held.landed:
        return held
    rows = await db.fetch(rows_sql(data.schema_name).as_string(), (data.migration,))
    still = [r for r in rows if str(r["id"]) in data.ids and _state(r) == "failed"]
    if still:
        return Verification(landed=False, found=f"{held.found}; yet {len(still)} still failed")
    return Verification(landed=True, found=f"{held.found}; none of them is failed now")


MIGRATION_RESOLVE = add_remedy(
    Remedy(
        name=NAME,
        usage=USAGE,
        summary="mark a failed Prisma migration rolled back or applied, as `prisma migrate "
        "resolve` does (the row backed up first)",
        plan=plan_resolve,
        apply=apply_resolve,
        verify=verify_resolve,
        role="REVIEWER",
        approver_role="ADMIN",
        approvers=1,
        preflight=True,
        sample=sample_resolve,
    )
)

"""Row sets the data repairs change: count, lock, back up whole, then delete or update.

Each repair plan counts, with the same conditions its `apply()` uses, exactly the rows
that will change, and shows the SQL. Each `apply()` runs in the executor's one guarded
transaction:

1. it locks the rows that still qualify (`SELECT … FOR UPDATE`) and compares their number
   with the plan's (`check_drift`), so no other session changes them meanwhile;
2. it copies every row it deletes or overwrites, whole, into
   `dbops_backup."<approval>_<table>"` (`CREATE TABLE … AS SELECT`), and only those rows
   are then changed (joined by id with the backup table);
3. it checks that the change touched exactly the planned rows (`check_count`);
4. it runs a verification query; a problem still present rolls everything back.

Nothing is deleted without a backup. When the database's triggers, constraints or row
security refuse a change, its error propagates and the executor rolls back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import sql
from pydantic import BaseModel

from commands.base import BACKUP_SCHEMA, Reader
from commands.remedies.base import (
    DriftError,
    Execution,
    Plan,
    PlanStep,
    RowCountError,
    Verification,
    Verifier,
    Writer,
    backup_name,
    check_count,
    check_drift,
    nothing_planned,
)

SAMPLE = 20
APPROVAL_PLACEHOLDER = "<approval>"


def backup_display(table: str) -> str:
    """How a plan names the backup table before the approval id exists."""
    return sql.Identifier(BACKUP_SCHEMA, f"{APPROVAL_PLACEHOLDER}_{table}").as_string()


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class Part:
    """One set of rows of one table a remedy changes, chosen by a condition on `alias`."""

    key: str  # names the part in the plan's counts
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


async def count_rows(
    db: Reader | Writer, query: sql.Composed, params: list[Any] | None = None
) -> int:
    rows = await db.fetch(query.as_string(), params or ())
    return int(rows[0]["n"]) if rows else 0


async def lock_and_backup(writer: Writer, part: Part, planned: int) -> tuple[sql.Identifier, int]:
    """Back up the locked rows of `part`; they must be exactly `planned` rows."""
    ids = [str(r["id"]) for r in await writer.fetch(part.lock_sql())]
    if len(ids) != planned:
        raise DriftError(part.what, planned, len(ids), 0)
    backup = await writer.backup_table(part.table)
    copied = await writer.execute(backup_sql(part.table, backup), (ids,))
    if copied != planned:
        raise RowCountError(f"{part.what} copied to the backup", planned, copied)
    return backup, copied


async def check_parts(
    writer: Writer, plan: Plan, parts: list[Part], planned: dict[str, int]
) -> dict[str, int]:
    """Recount every part; the total is the plan's count, each part its own (`planned`)."""
    now = {p.key: await count_rows(writer, p.count_sql()) for p in parts}
    check_drift(plan, sum(now.values()), "rows")
    for p in parts:
        if now[p.key] != planned.get(p.key, 0):
            raise DriftError(p.what, planned.get(p.key, 0), now[p.key], 0)
    return now


class Counts(BaseModel):
    """The planned count of each part, which `check_parts` holds the recount to."""

    counts: dict[str, int]


def delete_part_steps(part: Part, n: int) -> list[PlanStep]:
    """The plan's steps for a remedy that deletes one part's rows (`delete_part`)."""
    backup = sql.Identifier(BACKUP_SCHEMA, f"{APPROVAL_PLACEHOLDER}_{part.table}")
    return [
        PlanStep(sql=part.lock_sql().as_string(), note=f"locks and recounts: {n}"),
        PlanStep(
            sql=backup_sql(part.table, backup).as_string(),
            params=["<the locked ids>"],
            note="whole rows, before the delete",
        ),
        PlanStep(
            sql=delete_sql(part.table, backup).as_string(),
            note="deletes exactly the backed-up rows; the count must match the plan",
        ),
        PlanStep(sql=part.count_sql().as_string(), note="verification: must be 0"),
    ]


@dataclass(frozen=True)
class DeletedPart:
    backup: sql.Identifier
    copied: int
    deleted: int
    remaining: int  # rows of the part after the delete: 0 unless something else added some


async def delete_part(writer: Writer, plan: Plan, part: Part) -> DeletedPart:
    """Lock, back up and delete exactly the planned rows of one part (the plan's count
    already rechecked by `check_parts`), then recount what the part still holds."""
    backup, copied = await lock_and_backup(writer, part, plan.count)
    deleted = await writer.execute(delete_sql(part.table, backup))
    check_count(plan, deleted, part.what)
    return DeletedPart(backup, copied, deleted, await count_rows(writer, part.count_sql()))


async def backups_hold(db: Reader, approval_id: str, expected: dict[str, int]) -> Verification:
    """Did the approval's transaction commit? Its backup tables (created inside it) exist
    exactly when it did, each with the planned number of rows."""
    found: list[str] = []
    landed = True
    for table, planned in sorted(expected.items()):
        backup = sql.Identifier(BACKUP_SCHEMA, backup_name(approval_id, table))
        name = backup.as_string()
        (present,) = await db.fetch("SELECT to_regclass(%s) IS NOT NULL AS yes", (name,))
        if not present["yes"]:
            landed = False
            found.append(f"no backup table {name}")
            continue
        held = await count_rows(db, sql.SQL("SELECT count(*) AS n FROM {}").format(backup))
        landed = landed and held == planned
        found.append(f"{name} holds {held} of the {planned} planned rows")
    return Verification(landed=landed, found="; ".join(found))


def verify_backup_of(table: str) -> Verifier:
    """The verification of a remedy that backs up exactly its planned rows of one table
    before changing them: nothing planned has landed; else the backup must hold them."""

    async def verify(db: Reader, plan: Plan, run: Execution) -> Verification:
        if (trivial := nothing_planned(plan)) is not None:
            return trivial
        return await backups_hold(db, run.approval_id, {table: plan.count})

    return verify

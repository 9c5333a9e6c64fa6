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
security refuse a change, its error propagates and the executor rolls back. Every change
of a table LEAPS audits goes through `writer.audit` (`before` with the ids about to
change, `after` with the ids changed), which writes the audit rows where the live trigger
cannot and does nothing where it does.

A plan bigger than the preflight's limit is tried on a sample (`Remedy.sample`): each
part cut down to its first rows by id (`Part.first`), and the verification after the
change then counts only the rows it locked (`Part.changed`), so the sample's apply
changes exactly the rows it kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from psycopg import sql
from pydantic import BaseModel

from commands.audit_trail import Op, audit_trail
from commands.base import BACKUP_SCHEMA, Reader
from commands.remedies.base import (
    DriftError,
    Execution,
    Plan,
    PlanStep,
    RowCountError,
    Sampler,
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
    """One set of rows of one table a remedy changes, chosen by a condition on `alias`.

    A sample of it (`first(n)`) is its first n rows by id; a part restricted to rows
    (`within(ids)`) is those of them that still qualify. Its queries then take bound
    parameters (`params`); the whole part takes none, as before.
    """

    key: str  # names the part in the plan's counts
    table: str
    alias: str
    condition: str  # SQL over `alias`; constant text of this module, no user input
    what: str  # for messages: "orphaned submissions"
    limit: int | None = None  # a sample: only the first `limit` qualifying rows by id
    ids: tuple[str, ...] | None = None  # only these rows (of those qualifying)

    def first(self, n: int) -> Part:
        """The part cut down to its first `n` rows by id (a sample of the plan)."""
        return replace(self, limit=max(n, 0))

    def within(self, ids: Sequence[str]) -> Part:
        """The part restricted to the rows `ids` (no limit)."""
        return replace(self, ids=tuple(ids), limit=None)

    def changed(self, ids: Sequence[str]) -> Part:
        """What the verification after the change counts: the whole part (rows added
        meanwhile count too), or for a sample only the rows it locked (`ids`)."""
        return self if self.limit is None else self.within(ids)

    @property
    def params(self) -> list[Any]:
        """The bound parameters of `count_sql` and `lock_sql`, in order."""
        values: list[Any] = []
        if self.ids is not None:
            values.append(list(self.ids))
        if self.limit is not None:
            values.append(self.limit)
        return values

    def _from(self) -> sql.Composed:
        return sql.SQL("{} AS {}").format(sql.Identifier(self.table), sql.Identifier(self.alias))

    def _where(self) -> sql.Composable:
        if self.ids is None:
            return sql.SQL(self.condition)
        return sql.SQL("({}) AND {}.id = ANY(%s)").format(
            sql.SQL(self.condition), sql.Identifier(self.alias)
        )

    def _limit(self) -> sql.Composable:
        return sql.SQL(" LIMIT %s") if self.limit is not None else sql.SQL("")

    def count_sql(self) -> sql.Composed:
        if self.limit is None:
            return sql.SQL("SELECT count(*) AS n FROM {} WHERE {}").format(
                self._from(), self._where()
            )
        return sql.SQL(
            "SELECT count(*) AS n FROM (SELECT 1 FROM {f} WHERE {c} ORDER BY {a}.id{lim}) AS q"
        ).format(f=self._from(), c=self._where(), a=sql.Identifier(self.alias), lim=self._limit())

    def lock_sql(self) -> sql.Composed:
        return sql.SQL(
            "SELECT {a}.id FROM {f} WHERE {c} ORDER BY {a}.id{lim} FOR UPDATE OF {a}"
        ).format(a=sql.Identifier(self.alias), f=self._from(), c=self._where(), lim=self._limit())

    def sample_sql(self, columns: str) -> sql.Composed:
        """Up to SAMPLE rows of the whole part, for the plan (no parameters)."""
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


async def lock_ids(writer: Writer, part: Part) -> list[str]:
    """Lock the rows of `part` that still qualify; their ids, in id order."""
    return [str(r["id"]) for r in await writer.fetch(part.lock_sql(), part.params)]


async def backup_ids(
    writer: Writer, table: str, ids: list[str], what: str
) -> tuple[sql.Identifier, int]:
    """Copy the rows `ids` of `table`, whole, into the approval's backup table; every
    one of them must be copied."""
    backup = await writer.backup_table(table)
    copied = await writer.execute(backup_sql(table, backup), (ids,))
    if copied != len(ids):
        raise RowCountError(f"{what} copied to the backup", len(ids), copied)
    return backup, copied


async def lock_and_backup_ids(
    writer: Writer, part: Part, planned: int
) -> tuple[sql.Identifier, list[str]]:
    """Back up the locked rows of `part`, which must be exactly `planned` rows; the
    backup table and the ids it holds."""
    ids = await lock_ids(writer, part)
    if len(ids) != planned:
        raise DriftError(part.what, planned, len(ids), 0)
    backup, _copied = await backup_ids(writer, part.table, ids, part.what)
    return backup, ids


async def lock_and_backup(writer: Writer, part: Part, planned: int) -> tuple[sql.Identifier, int]:
    """Back up the locked rows of `part`; they must be exactly `planned` rows."""
    backup, ids = await lock_and_backup_ids(writer, part, planned)
    return backup, len(ids)


async def delete_backed_up(
    writer: Writer, table: str, backup: sql.Identifier, ids: list[str]
) -> list[str]:
    """Delete exactly the backed-up rows (`ids`, held in `backup`), with LEAPS's audit
    rows where the live trigger cannot write them; the ids deleted."""
    await writer.audit.before(writer, table, ids)
    rows = await writer.fetch(delete_sql(table, backup) + sql.SQL(" RETURNING t.id"))
    deleted = [str(r["id"]) for r in rows]
    await writer.audit.after(writer, table, "DELETE", deleted)
    return deleted


async def audit_note(db: Reader, changes: list[tuple[str, Op]]) -> str | None:
    """The plan's `audit`: which path LEAPS's audit rows of these changes take and why
    (the live trigger, or the bot where the trigger refuses writes made with
    app.user_id); None when no audit trigger watches any of them."""
    trail = await audit_trail(db)
    if any(trail.audited(table, op) for table, op in changes):
        return trail.plan_note()
    return None


async def check_parts(
    writer: Writer, plan: Plan, parts: list[Part], planned: dict[str, int]
) -> dict[str, int]:
    """Recount every part; the total is the plan's count, each part its own (`planned`)."""
    now = {p.key: await count_rows(writer, p.count_sql(), p.params) for p in parts}
    check_drift(plan, sum(now.values()), "rows")
    for p in parts:
        if now[p.key] != planned.get(p.key, 0):
            raise DriftError(p.what, planned.get(p.key, 0), now[p.key], 0)
    return now


class Counts(BaseModel):
    """The planned count of each part, which `check_parts` holds the recount to."""

    counts: dict[str, int]
    # A sample of the plan (`sample_parts`): each part cut down to its first rows by id,
    # this many (then `counts` holds the same); None: the whole plan.
    sample: dict[str, int] | None = None


C = TypeVar("C", bound=Counts)


def sampled_parts(parts: list[Part], data: Counts) -> list[Part]:
    """The parts as the plan's apply changes them: whole, or a sample's first rows."""
    if data.sample is None:
        return parts
    return [p.first(data.sample.get(p.key, 0)) for p in parts]


def fair_shares(counts: Mapping[str, int], n: int) -> dict[str, int]:
    """At most `n` rows shared among the parts so the smallest get all their rows and
    the others equal shares (max-min fair): every part with rows is tried when n allows."""
    shares = {k: 0 for k in counts}
    left = max(n, 0)
    order = sorted((k for k, c in counts.items() if c > 0), key=lambda k: (counts[k], k))
    for i, key in enumerate(order):
        share = min(counts[key], left // (len(order) - i))
        shares[key] = share
        left -= share
    return shares


def sample_parts(
    model: type[C], shares: Callable[[dict[str, int], int], dict[str, int]] = fair_shares
) -> Sampler:
    """The `Remedy.sample` of a remedy whose plan data is `model` (a `Counts`) and whose
    apply changes `sampled_parts(...)`: each part cut down to its share of n rows, the
    first by id. A plan of at most n rows is returned as it is."""

    def sample(plan: Plan, n: int) -> Plan:
        if plan.count <= n:
            return plan
        data = plan.private(model)
        kept = shares(dict(data.counts), n)
        cut = data.model_copy(update={"counts": kept, "sample": dict(kept)})
        return plan.model_copy(
            update={
                "count": sum(kept.values()),
                "tolerance": 0,
                "data": cut.model_dump(mode="json"),
            }
        )

    return sample


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
    ids: tuple[str, ...] = ()  # the rows deleted


async def delete_part(writer: Writer, plan: Plan, part: Part) -> DeletedPart:
    """Lock, back up and delete exactly the planned rows of one part (the plan's count
    already rechecked by `check_parts`), with LEAPS's audit rows where the live trigger
    cannot write them, then recount what the part still holds (a sample: of its rows)."""
    backup, ids = await lock_and_backup_ids(writer, part, plan.count)
    deleted = await delete_backed_up(writer, part.table, backup, ids)
    check_count(plan, len(deleted), part.what)
    left = part.changed(ids)
    remaining = await count_rows(writer, left.count_sql(), left.params)
    return DeletedPart(backup, len(ids), len(deleted), remaining, tuple(deleted))


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

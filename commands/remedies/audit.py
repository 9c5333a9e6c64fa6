"""`fix-audit-id`: give `audit_log.id` the default production's audit trigger needs.

Production's `audit_trigger_func()` inserts its audit_log row without an id, and
`audit_log.id` has no default (the application's ORM makes the ids), so every write
made with `app.user_id` set is refused (LEAPS_SCHEMA.md, Audit; `/db health` warns).
The fix is one statement, `ALTER TABLE audit_log ALTER COLUMN id SET DEFAULT
gen_random_uuid()::text`: the ORM keeps sending its own ids, and the trigger's rows get
one from the default. Approved by one SUPERADMIN: it changes LEAPS's own audit trail.

What it replaces is a column's definition, not rows: the old definition (type, NOT NULL,
default or none) is recorded in the plan's data and in the outcome, and no backup table
is made (`ALTER TABLE audit_log ALTER COLUMN id DROP DEFAULT` undoes it). Whether it
landed is read from `pg_attrdef` afterwards.

It is DDL under an ACCESS EXCLUSIVE lock on audit_log, so it is not tried before
approval (DESIGN.md rule 10): the plan checks the catalog instead (`Remedy.not_tried`).
"""

from __future__ import annotations

from psycopg import sql
from pydantic import BaseModel

from commands.audit_trail import AUDIT_TABLE, audit_trail
from commands.base import Context, Reader, Row, UsageError
from commands.migrations import (
    AUDIT_ID_DEFAULTS,
    FIX_AUDIT_ID,
    PRISMA_AUDIT_ID,
    PRISMA_AUDIT_MIGRATION,
    PRISMA_AUDIT_SQL,
    audit_id_column,
    describe_audit_id,
)
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
    nothing_planned,
)

USAGE = f"/db {FIX_AUDIT_ID}"
TITLE = "Set audit_log.id's default"
_LOCK = sql.SQL("LOCK TABLE public.audit_log IN ACCESS EXCLUSIVE MODE")
_UNDO = "ALTER TABLE audit_log ALTER COLUMN id DROP DEFAULT"
NOT_TRIED = (
    "not tried before approval: ALTER TABLE takes an ACCESS EXCLUSIVE lock on audit_log, "
    "which is the point of the change; PostgreSQL could roll it back, but the try would "
    "queue behind the application's audit writes (and they behind it). The plan checked "
    "the catalog instead: the defect is present now (the live audit function inserts "
    "without an id, pg_proc) and audit_log.id has no default (pg_attrdef), its type takes "
    "the default, and gen_random_uuid() exists; with a default already there, or no "
    "audit function omitting the id (the fixture's supplies its own), it plans nothing"
)


class AuditIdData(BaseModel):
    """The column as the plan found it (its old definition: the backup) and the change."""

    column_type: str  # format_type, e.g. "text"
    base_type: str
    not_null: bool
    old_default: str | None  # None: no default (what production has)
    old_identity: str | None
    new_default: str  # the expression set
    defect: str | None  # trail.defect() at plan time (a plan is made only when present)


def alter_statement(data: AuditIdData) -> sql.Composed:
    """The one change; the expression is one of AUDIT_ID_DEFAULTS (repo data, never input)."""
    if data.new_default not in AUDIT_ID_DEFAULTS.values():
        raise ValueError("an expression that is not one of the audit id defaults")
    return sql.SQL("ALTER TABLE public.audit_log ALTER COLUMN id SET DEFAULT {}").format(
        sql.SQL(data.new_default)
    )


def _old_definition(data: AuditIdData) -> str:
    return describe_audit_id(
        {
            "type": data.column_type,
            "not_null": data.not_null,
            "default": data.old_default,
            "identity": data.old_identity,
        }
    )


def prisma_warning() -> str:
    return (
        "Prisma will see the default as drift: `prisma migrate diff` and `prisma migrate "
        "dev` (which then offers to reset the database) report it until the application "
        f"has it. Add the migration `<timestamp>_{PRISMA_AUDIT_MIGRATION}` with "
        f"`{PRISMA_AUDIT_SQL}`, and in schema.prisma's AuditLog model `{PRISMA_AUDIT_ID}`; "
        "`prisma migrate deploy` running it here again is harmless (the same default)"
    )


async def plan_fix_audit_id(ctx: Context, args: list[str]) -> Plan:
    if any(a.strip() for a in args):
        raise UsageError(f"`{FIX_AUDIT_ID}` takes no arguments")

    async def survey(db: Reader) -> tuple[Row | None, str | None, str, list[str]]:
        column = await audit_id_column(db)
        trail = await audit_trail(db)
        return column, trail.defect(), trail.path, list(trail.functions)

    column, defect, path, functions = await ctx.gateway.read(survey)
    if column is None:
        raise UsageError(f"this database has no `{AUDIT_TABLE}.id` column: nothing to fix")
    defined = describe_audit_id(column)
    nothing: str | None = None
    if column["default"] or column["identity"]:
        nothing = f"{AUDIT_TABLE}.id already has a default ({defined})"
    elif defect is None and path == "none":
        nothing = f"no enabled trigger writes {AUDIT_TABLE} rows ({AUDIT_TABLE}.id: {defined})"
    elif defect is None:
        nothing = (
            f"the live audit function ({', '.join(f'{f}()' for f in functions)}) supplies its "
            f"own ids ({AUDIT_TABLE}.id: {defined}), so writes made with app.user_id are "
            "accepted"
        )
    if nothing is not None:
        return Plan(
            remedy=FIX_AUDIT_ID,
            args=list(args),
            title=TITLE,
            summary=f"{nothing}: nothing to do",
            steps=[],
            count=0,
            needs_approval=False,
        )
    expr = AUDIT_ID_DEFAULTS.get(str(column["base_type"]))
    if expr is None:
        raise UsageError(
            f"{AUDIT_TABLE}.id is `{column['type']}`, for which this remedy has no default "
            f"(it knows {', '.join(AUDIT_ID_DEFAULTS)}): fix it with a Prisma migration"
        )
    if not column["uuid_available"]:
        raise UsageError(
            "gen_random_uuid() does not exist on this server (PostgreSQL before 13 without "
            "pgcrypto): nothing can default to it"
        )
    data = AuditIdData(
        column_type=str(column["type"]),
        base_type=str(column["base_type"]),
        not_null=bool(column["not_null"]),
        old_default=None,
        old_identity=None,
        new_default=expr,
        defect=defect,
    )
    stmt = alter_statement(data).as_string()
    warnings = [
        prisma_warning(),
        "ALTER TABLE holds an ACCESS EXCLUSIVE lock on audit_log until the transaction "
        "commits (milliseconds): it waits for audit writes in flight, up to the lock "
        "timeout, and every audited write waits behind it meanwhile",
    ]
    return Plan(
        remedy=FIX_AUDIT_ID,
        args=list(args),
        title=TITLE,
        summary=f"set {AUDIT_TABLE}.id's default to {expr}: {defect}. Afterwards writes made "
        "with app.user_id are accepted and the live trigger writes their audit rows "
        "(the application's ORM keeps sending its own ids)",
        steps=[
            PlanStep(
                sql=_LOCK.as_string(),
                note="waits for audit writes in flight, up to the lock timeout; then "
                "audit_log.id is read again from the catalog: still no default and the "
                "planned type, else nothing is changed",
            ),
            PlanStep(sql=stmt, note="one column default; no row is read or written"),
        ],
        targets=[
            {
                "column": f"{AUDIT_TABLE}.id",
                "now": defined,
                "after": f"{data.column_type}{' NOT NULL' if data.not_null else ''}, "
                f"DEFAULT {expr}",
                "audit_path_now": path,
                "audit_functions": ", ".join(f"{f}()" for f in functions) or None,
            }
        ],
        count=1,
        backup=f"the column's old definition ({defined}), kept in the plan and the "
        f"outcome; no backup table (a column default holds no rows); `{_UNDO}` undoes it",
        warnings=warnings,
        limits="one ALTER TABLE in the guarded transaction, after an explicit ACCESS "
        "EXCLUSIVE lock on audit_log",
        locks=LockScope(relations=[AUDIT_TABLE]),
        data=data.model_dump(mode="json"),
    )


async def apply_fix_audit_id(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(AuditIdData)
    await writer.execute(_LOCK)
    column = await audit_id_column(writer)
    if column is None:
        raise RemedyAbort(f"{AUDIT_TABLE}.id is gone since the plan; nothing was changed")
    if str(column["type"]) != data.column_type:
        raise RemedyAbort(
            f"{AUDIT_TABLE}.id is `{column['type']}` now, the plan saw `{data.column_type}`; "
            "nothing was changed, request it again"
        )
    check_drift(plan, 0 if column["default"] or column["identity"] else 1, "ids without a default")
    await writer.execute(alter_statement(data))
    after = await audit_id_column(writer)
    now = after["default"] if after else None
    check_count(plan, 1 if now else 0, "column default set")
    trail = await audit_trail(writer)
    before = _old_definition(data)
    return Outcome(
        ok=True,
        summary=f"{AUDIT_TABLE}.id now defaults to {now} (before: {before}); LEAPS's audit "
        f"trail takes the `{trail.path}` path: writes made with app.user_id are accepted and "
        f"the live trigger writes their audit rows. Add `{PRISMA_AUDIT_MIGRATION}` to the "
        f"application ({PRISMA_AUDIT_ID}), or Prisma sees drift; `{_UNDO}` undoes it",
        affected=1,
        rows=[
            {
                "column": f"{AUDIT_TABLE}.id",
                "before": before,
                "after": describe_audit_id(after) if after else None,
                "audit_path": trail.path,
            }
        ],
    )


async def verify_fix_audit_id(db: Reader, plan: Plan, run: Execution) -> Verification:
    """From pg_attrdef: landed when audit_log.id defaults to the planned expression."""
    if (nothing := nothing_planned(plan)) is not None:
        return nothing
    column = await audit_id_column(db)
    if column is None:
        return Verification(landed=False, found=f"no {AUDIT_TABLE}.id column")
    default = column["default"]
    if default and "gen_random_uuid()" in str(default):
        return Verification(
            landed=True, found=f"{AUDIT_TABLE}.id defaults to {default} (pg_attrdef)"
        )
    if default:
        return Verification(
            landed=False,
            found=f"{AUDIT_TABLE}.id defaults to {default}, not to gen_random_uuid() "
            "(set by someone else?)",
        )
    return Verification(landed=False, found=f"{AUDIT_TABLE}.id still has no default (pg_attrdef)")


FIX_AUDIT_ID_REMEDY = add_remedy(
    Remedy(
        name=FIX_AUDIT_ID,
        usage=USAGE,
        summary="give audit_log.id the default production's audit trigger needs "
        "(gen_random_uuid()::text), so writes made with app.user_id are accepted",
        plan=plan_fix_audit_id,
        apply=apply_fix_audit_id,
        verify=verify_fix_audit_id,
        role="REVIEWER",
        approver_role="SUPERADMIN",
        approvers=1,
        not_tried=NOT_TRIED,
    )
)

"""`set-role <@user|email|handle> <ROLE>`: one user's LEAPS role changed as an admin would.

Production's `trg_validate_role_change` lets a role change through only when
`app.user_role` is ADMIN or SUPERADMIN and never demotes the last SUPERADMIN. A role
change acts, like every remedy, as the approver's LEAPS account (the engine picks it from
the approvers' Slack e-mails) or the configured service identity. Granting ADMIN or
SUPERADMIN, or changing a SUPERADMIN, needs a SUPERADMIN approver (the plan asks the
engine for one) and acts only as that approver's own SUPERADMIN account, never as the
service identity: a service account must not mint administrators, and the database's
audit trail then names the person who approved it. Where the live database has lost the
guard, the remedy holds itself to the same rules.
"""

from __future__ import annotations

from dataclasses import asdict

from psycopg import sql
from pydantic import BaseModel

from commands.base import BACKUP_SCHEMA, ROLES, Context, Finding, Reader, Row, UsageError
from commands.guards import Guard, guard_note, guards_on
from commands.quota import closest_handles, resolve_argument
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
from commands.remedies.rowsets import APPROVAL_PLACEHOLDER, backup_display, backup_sql, backups_hold
from commands.roles import COLUMN_SQL, STAFF, lookup, refuse_nul

SET_ROLE_NAME = "set-role"
USAGE = "/db set-role <@user|email|handle> <ROLE>"
SUPERADMIN = "SUPERADMIN"

_LOCK_SQL = "SELECT id, role::text AS role FROM users WHERE id = %s FOR UPDATE"
_SUPERADMINS_SQL = (
    "SELECT count(*)::int AS n FROM users WHERE role::text = 'SUPERADMIN' AND id <> %s"
)
_LOCK_SUPERADMINS_SQL = (
    "SELECT id FROM users WHERE role::text = 'SUPERADMIN' AND id <> %s ORDER BY id FOR UPDATE"
)
_READ_BACK_SQL = "SELECT role::text AS role FROM users WHERE id = %s"


def update_sql(backup: sql.Identifier) -> sql.Composed:
    """Changes exactly the backed-up row, and only while it still holds the planned role."""
    return sql.SQL(
        "UPDATE users AS t SET role = %s FROM {} AS b WHERE t.id = b.id"
        " AND t.role::text IS NOT DISTINCT FROM %s"
    ).format(backup)


class SetRoleData(BaseModel):
    user_id: str
    handle: str
    old_role: str | None
    new_role: str
    superadmin_needed: bool
    # The configured service identity when planned: a change needing a SUPERADMIN never
    # acts as it (DESIGN rule 8 lets it act for the rest, as the bot's ADMIN approver asked).
    service: dict[str, str] | None = None


def needs_superadmin(old: str | None, new: str) -> bool:
    """Who may create or unmake an administrator: only a SUPERADMIN."""
    return new in STAFF or old == SUPERADMIN


def parse_args(args: list[str]) -> tuple[str, str]:
    words = [a.strip() for a in args if a.strip()]
    if len(words) != 2:
        raise UsageError(f"usage: `{USAGE}` with ROLE one of {', '.join(ROLES)}")
    refuse_nul(words)
    role = words[1].upper()
    if role not in ROLES:
        raise UsageError(
            f"`{words[1]}` is not a role: set-role sets one of {', '.join(ROLES)} "
            "(a drifted value cannot be granted)"
        )
    return words[0], role


def role_guards(guards: list[Guard]) -> list[str]:
    return [g.trigger for g in guards if g.reads_role]


def _ambiguity(users: list[Row], shown: str) -> str:
    names = ", ".join(f"`{u['handle']}` ({u['role']})" for u in users)
    return (
        f"{len(users)} LEAPS users match {shown} once case is ignored ({names}); name the one "
        "to change by its handle"
    )


async def plan_set_role(ctx: Context, args: list[str]) -> Plan:
    who, new_role = parse_args(args)
    resolved = await resolve_argument(ctx, [who])
    if isinstance(resolved, Finding):
        raise UsageError(resolved.summary + (f"; {resolved.hint}" if resolved.hint else ""))
    wanted = resolved

    async def survey(db: Reader) -> tuple[list[Row], list[Row], list[Row], int, list[Guard]]:
        column = await db.fetch(COLUMN_SQL)
        users = await lookup(db, wanted)
        near = [] if users else await closest_handles(db, wanted)
        others = 0
        if len(users) == 1:
            (row,) = await db.fetch(_SUPERADMINS_SQL, (users[0]["id"],))
            others = int(row["n"])
        return column, users, near, others, await guards_on(db, ["users"], "UPDATE")

    column, users, near, others, guards = await ctx.gateway.read(survey)
    if not column:
        raise UsageError("public.users has no role column here; nothing can be set")
    labels = [str(x) for x in column[0]["labels"] or []]
    if labels and new_role not in labels:
        raise UsageError(f'the live "Role" type has no {new_role} ({", ".join(labels)})')
    exact = [u for u in users if u[wanted.column] == wanted.value]
    if wanted.column == "handle" and len(exact) == 1:
        users = exact
    if not users:
        close = ", ".join(f"`{c['handle']}`" for c in near)
        raise UsageError(
            f"no LEAPS user with {wanted.shown}" + (f"; closest handles: {close}" if close else "")
        )
    if len(users) > 1:
        raise UsageError(_ambiguity(users, wanted.shown))
    user = users[0]
    old_role = None if user["role"] is None else str(user["role"])
    handle = str(user["handle"])
    target = {
        "id": user["id"],
        "handle": handle,
        "email": user["email"],
        "role": old_role,
        "new_role": new_role,
    }
    if old_role == SUPERADMIN and new_role != SUPERADMIN and others == 0:
        raise UsageError(
            f"refused: `{handle}` is the last SUPERADMIN; demoting them would leave nobody "
            "able to grant ADMIN (production's trg_validate_role_change refuses it too). "
            f"Make another person SUPERADMIN first; nothing was changed"
        )
    superadmin = needs_superadmin(old_role, new_role)
    count = 0 if old_role == new_role else 1
    checks = role_guards(guards)
    warnings = [n for n in (guard_note(guards, "UPDATE"),) if n]
    warnings.append(
        "acts as a SUPERADMIN approver's own LEAPS account (matched by Slack e-mail), never "
        "as the service identity"
        if superadmin
        else "acts as the approver's LEAPS account (matched by Slack e-mail) when it has a "
        "staff role, else as the service identity; the database needs ADMIN or SUPERADMIN"
    )
    if checks:
        warnings.append(
            f"{', '.join(checks)} refuses it unless app.user_role is ADMIN or SUPERADMIN, "
            "and refuses to demote the last SUPERADMIN"
        )
    else:
        warnings.append(
            "no trigger on users reads app.user_role here (drift): the remedy itself "
            "refuses a non-admin identity and the last SUPERADMIN's demotion"
        )
    if superadmin:
        warnings.append(
            f"{'granting ' + new_role if new_role in STAFF else 'changing a SUPERADMIN'} "
            "needs a SUPERADMIN approver"
        )
    backup = sql.Identifier(BACKUP_SCHEMA, f"{APPROVAL_PLACEHOLDER}_users")
    service = ctx.service_identity
    summary = (
        f"set the role of `{handle}` from {old_role or 'no role'} to {new_role}"
        if count
        else f"`{handle}` is already {new_role}; nothing to do"
    )
    return Plan(
        remedy=SET_ROLE_NAME,
        args=list(args),
        title=f"Set the LEAPS role of {handle}",
        summary=summary,
        steps=[
            PlanStep(
                sql=_LOCK_SQL,
                params=[user["id"]],
                note=f"locks the user; role must be {old_role or 'NULL'} still",
            ),
            PlanStep(
                sql=backup_sql("users", backup).as_string(),
                params=[[user["id"]]],
                note="the whole row, before the change",
            ),
            PlanStep(
                sql=update_sql(backup).as_string(),
                params=[new_role, old_role],
                note="as the approver's LEAPS account (app.user_id / app.user_role set for "
                "this transaction); must change exactly 1 row",
            ),
            PlanStep(sql=_READ_BACK_SQL, params=[user["id"]], note=f"verification: {new_role}"),
        ],
        targets=[target],
        count=count,
        backup=f"the whole row copied first into {backup_display('users')}" if count else None,
        warnings=warnings,
        needs_approval=count > 0,
        locks=LockScope(relations=["users"]),
        approver_role=SUPERADMIN if superadmin else None,
        data=SetRoleData(
            user_id=str(user["id"]),
            handle=handle,
            old_role=old_role,
            new_role=new_role,
            superadmin_needed=superadmin,
            service=asdict(service) if service else None,
        ).model_dump(mode="json"),
    )


async def _check_identity(writer: Writer, data: SetRoleData, guarded: bool) -> None:
    """Refuses here an identity the change must not act as; the guard decides the rest."""
    who = writer.identity
    if who is None:
        raise RemedyAbort(
            "a role change acts as a LEAPS account, and there is none: no approver has one "
            "(matched by Slack e-mail) and REMEDY_SERVICE_USER_ID is not set; nothing was "
            "changed"
        )
    if data.superadmin_needed:
        if data.service is not None and asdict(who) == data.service:
            raise RemedyAbort(
                f"refused to act as the service identity {who.user_id}: this change acts only "
                "as a SUPERADMIN approver's own LEAPS account (matched by Slack e-mail), and "
                "no approver has one; nothing was changed"
            )
        if who.role != SUPERADMIN:
            raise RemedyAbort(
                f"acting as {who.describe()}: this change needs a SUPERADMIN LEAPS account; "
                "nothing was changed"
            )
    if not guarded and who.role not in STAFF:
        raise RemedyAbort(
            f"acting as {who.describe()}: a role change needs ADMIN or SUPERADMIN (the "
            "database's guard is missing, so the bot holds to it); nothing was changed"
        )


async def apply_set_role(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(SetRoleData)
    if plan.count == 0:
        return Outcome(ok=True, summary=f"`{data.handle}` is already {data.new_role}")
    rows = await writer.fetch(_LOCK_SQL, (data.user_id,))
    check_drift(plan, int(bool(rows) and rows[0]["role"] == data.old_role), "users to change")
    guarded = bool(role_guards(await guards_on(writer, ["users"], "UPDATE")))
    await _check_identity(writer, data, guarded)
    if not guarded and data.old_role == SUPERADMIN and data.new_role != SUPERADMIN:
        if not await writer.fetch(_LOCK_SUPERADMINS_SQL, (data.user_id,)):
            raise RemedyAbort(f"`{data.handle}` is the last SUPERADMIN now; nothing was changed")
    backup = await writer.backup_table("users")
    copied = await writer.execute(backup_sql("users", backup), ([data.user_id],))
    check_count(plan, copied, "users copied to the backup")
    updated = await writer.execute(update_sql(backup), (data.new_role, data.old_role))
    check_count(plan, updated, "users")
    (now,) = await writer.fetch(_READ_BACK_SQL, (data.user_id,))
    if now["role"] != data.new_role:
        return Outcome(
            ok=False,
            summary=f"verification failed: `{data.handle}` reads back as {now['role']}, "
            f"not {data.new_role}; rolled back",
        )
    return Outcome(
        ok=True,
        summary=f"`{data.handle}` is now {data.new_role} (was {data.old_role or 'no role'}); "
        f"the previous row is in {backup.as_string()}",
        affected=updated,
        backed_up=copied,
        backup_table=backup.as_string(),
        rows=[
            {"id": data.user_id, "handle": data.handle, "was": data.old_role, "now": now["role"]}
        ],
    )


async def verify_set_role(db: Reader, plan: Plan, run: Execution) -> Verification:
    """Landed when the transaction committed (its backup exists) and the role reads back."""
    if (trivial := nothing_planned(plan)) is not None:
        return trivial
    data = plan.private(SetRoleData)
    held = await backups_hold(db, run.approval_id, {"users": 1})
    rows = await db.fetch(_READ_BACK_SQL, (data.user_id,))
    role = rows[0]["role"] if rows else None
    landed = held.landed and role == data.new_role
    return Verification(landed=landed, found=f"{held.found}; `{data.handle}` is {role}")


SET_ROLE = add_remedy(
    Remedy(
        name=SET_ROLE_NAME,
        usage=USAGE,
        summary="change one user's LEAPS role as an admin would (row backed up; granting "
        "ADMIN/SUPERADMIN needs a SUPERADMIN approver; never the last SUPERADMIN)",
        plan=plan_set_role,
        apply=apply_set_role,
        verify=verify_set_role,
        role="ADMIN",
        approver_role="ADMIN",
        approvers=1,
    )
)

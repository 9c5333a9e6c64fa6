"""`set-role <@user|email|handle> [<@user> …] <ROLE>`: LEAPS roles changed as an admin would,
for one user or a list (the guide's bulk promotion) under one plan and one approval.

Production's `trg_validate_role_change` lets a role change through only when
`app.user_role` is ADMIN or SUPERADMIN and never demotes the last SUPERADMIN. A role
change acts, like every remedy, as the approver's LEAPS account (the engine picks it from
the approvers' Slack e-mails) or the configured service identity. Granting ADMIN or
SUPERADMIN, or changing a SUPERADMIN, needs a SUPERADMIN approver (the plan asks the
engine for one) and acts only as that approver's own SUPERADMIN account, never as the
service identity: a service account must not mint administrators, and the database's
audit trail then names the person who approved it. Where the live database has lost the
guard, the remedy holds itself to the same rules.

A list is all or nothing: every user named must resolve to exactly one account (a
mis-cased duplicate e-mail is refused, naming the accounts), the rules hold for each, and
the one transaction backs up every row, changes exactly the planned ones and reads all of
them back. At most MAX_USERS are named at once, so that the approval message lists every
user with their change (a reviewer approves what they can read).

`users` UPDATE OF role is audited: the change calls `writer.audit` around its UPDATE, so
LEAPS's audit_log gets its rows whether the live trigger writes them or refuses writes
made with app.user_id (production; the bot then writes them). The apply is one
transaction, tried at plan time and rolled back (DESIGN.md rule 10). Once it landed, the
`finished` hook makes the new role count in the bot at once, on every replica.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Any

from psycopg import sql
from pydantic import BaseModel, model_validator

from commands.base import BACKUP_SCHEMA, ROLES, Context, Finding, Reader, Row, UsageError
from commands.guards import Guard, guard_note, guards_on
from commands.quota import Wanted, closest_handles, resolve_argument
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
    sample_first,
)
from commands.remedies.rowsets import APPROVAL_PLACEHOLDER, backup_display, backups_hold
from commands.roles import COLUMN_SQL, STAFF, lookup, refuse_nul

SET_ROLE_NAME = "set-role"
USAGE = "/db set-role <@user|email|handle> [<@user|email|handle> ...] <ROLE>"
SUPERADMIN = "SUPERADMIN"
# The approval message shows the users of a plan in its summary; past this many (or
# past SUMMARY_CHARS of names) a reviewer could no longer read them all in one section.
MAX_USERS = 50
SUMMARY_CHARS = 1800

_OTHER_SUPERADMINS_SQL = (
    "SELECT count(*)::int AS n FROM users WHERE role::text = 'SUPERADMIN' AND NOT id = ANY(%s)"
)
_LOCK_SUPERADMINS_SQL = (
    "SELECT id FROM users WHERE role::text = 'SUPERADMIN' AND NOT id = ANY(%s)"
    " ORDER BY id FOR UPDATE"
)
_ROLES_SQL = "SELECT id, role::text AS role FROM users WHERE id = ANY(%s) ORDER BY id"


def lock_backup_sql(backup: sql.Identifier) -> sql.Composed:
    """Locks the users and copies their whole rows in one statement, so the ids are bound
    once (a plan of 50 users still fits its approval message) and the backup is exactly
    what the lock holds."""
    return sql.SQL(
        "CREATE TABLE {} AS SELECT t.* FROM users AS t WHERE t.id = ANY(%s)"
        " ORDER BY t.id FOR UPDATE OF t"
    ).format(backup)


def backed_up_sql(backup: sql.Identifier) -> sql.Composed:
    """The backed-up users' roles as the backup holds them (before the change)."""
    return sql.SQL("SELECT id, role::text AS role FROM {}").format(backup)


def read_back_sql(backup: sql.Identifier) -> sql.Composed:
    """The backed-up users' roles now, in the same transaction (after the change)."""
    return sql.SQL(
        "SELECT t.id, t.role::text AS role FROM users AS t JOIN {} AS b ON b.id = t.id"
        " ORDER BY t.id"
    ).format(backup)


def update_sql(backup: sql.Identifier) -> sql.Composed:
    """Changes exactly the backed-up rows, each only while it still holds the role the
    backup took (so one statement serves users of different roles); the ids changed are
    what LEAPS's audit rows name."""
    return sql.SQL(
        "UPDATE users AS t SET role = %s FROM {} AS b WHERE t.id = b.id"
        " AND t.role::text IS NOT DISTINCT FROM b.role::text RETURNING t.id"
    ).format(backup)


class RoleChange(BaseModel):
    user_id: str
    handle: str
    old_role: str | None


class SetRoleData(BaseModel):
    users: list[RoleChange]  # only the users whose role changes
    new_role: str
    superadmin_needed: bool
    # The configured service identity when planned: a change needing a SUPERADMIN never
    # acts as it (DESIGN rule 8 lets it act for the rest, as the bot's ADMIN approver asked).
    service: dict[str, str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_user(cls, value: Any) -> Any:
        """A plan stored before lists existed (pending across the upgrade) named one user."""
        if isinstance(value, dict) and "users" not in value and "user_id" in value:
            one = {k: value.get(k) for k in ("user_id", "handle", "old_role")}
            changes = [one] if value.get("old_role") != value.get("new_role") else []
            return {**value, "users": changes}
        return value

    @property
    def ids(self) -> list[str]:
        return [u.user_id for u in self.users]

    @property
    def demoted(self) -> list[str]:
        """Ids of the SUPERADMINs this plan takes the role from."""
        if self.new_role == SUPERADMIN:
            return []
        return [u.user_id for u in self.users if u.old_role == SUPERADMIN]


def needs_superadmin(old: str | None, new: str) -> bool:
    """Who may create or unmake an administrator: only a SUPERADMIN."""
    return new in STAFF or old == SUPERADMIN


def parse_args(args: list[str]) -> tuple[list[str], str]:
    """The users (separated by spaces, commas or both) and the role, the last word."""
    words = [w for a in args for w in re.split(r"[\s,]+", a) if w]
    if len(words) < 2:
        raise UsageError(f"usage: `{USAGE}` with ROLE one of {', '.join(ROLES)}")
    refuse_nul(words)
    *users, given = words
    role = given.upper()
    if role not in ROLES:
        raise UsageError(
            f"`{given}` is not a role: set-role sets one of {', '.join(ROLES)} "
            "(a drifted value cannot be granted); the role comes last"
        )
    if len(users) > MAX_USERS:
        raise UsageError(
            f"{len(users)} users named: set-role changes at most {MAX_USERS} under one "
            "approval, so that its message lists every one; split the list"
        )
    return users, role


def role_guards(guards: list[Guard]) -> list[str]:
    return [g.trigger for g in guards if g.reads_role]


def _ambiguity(users: list[Row], shown: str) -> str:
    names = ", ".join(f"`{u['handle']}` ({u['role']})" for u in users)
    return (
        f"{len(users)} LEAPS users match {shown} once case is ignored ({names}); name the one "
        "to change by its handle"
    )


def _pick(wanted: Wanted, users: list[Row], near: list[Row]) -> Row | str:
    """The one account `wanted` names, or why there is not exactly one."""
    exact = [u for u in users if u[wanted.column] == wanted.value]
    if wanted.column == "handle" and len(exact) == 1:
        users = exact
    if not users:
        close = ", ".join(f"`{c['handle']}`" for c in near)
        return f"no LEAPS user with {wanted.shown}" + (
            f"; closest handles: {close}" if close else ""
        )
    if len(users) > 1:
        return _ambiguity(users, wanted.shown)
    return users[0]


def _change(user: Row) -> str:
    return f"{user['role'] or 'no role'} → {user['new_role']}"


def _summary(targets: list[Row], new_role: str) -> str:
    changing = [t for t in targets if t["role"] != new_role]
    unchanged = [t for t in targets if t["role"] == new_role]
    if len(targets) == 1:
        (t,) = targets
        if changing:
            return f"set the role of `{t['handle']}` from {t['role'] or 'no role'} to {new_role}"
        return f"`{t['handle']}` is already {new_role}; nothing to do"
    groups: dict[str, list[str]] = {}
    for t in changing:
        groups.setdefault(t["role"] or "no role", []).append(f"`{t['handle']}`")
    parts = [f"{old} → {new_role}: {', '.join(names)}" for old, names in groups.items()]
    text = f"set the role of {len(changing)} of {len(targets)} users to {new_role}"
    text += (" (" + "; ".join(parts) + ")") if parts else ": nothing to do"
    if unchanged:
        text += f"; already {new_role}: " + ", ".join(f"`{t['handle']}`" for t in unchanged)
    return text


async def plan_set_role(ctx: Context, args: list[str]) -> Plan:
    words, new_role = parse_args(args)
    wanted: list[Wanted] = []
    problems: list[str] = []
    for word in words:
        resolved = await resolve_argument(ctx, [word])
        if isinstance(resolved, Finding):
            problems.append(resolved.summary + (f" ({resolved.hint})" if resolved.hint else ""))
        else:
            wanted.append(resolved)

    async def survey(db: Reader) -> tuple[list[Row], list[Row | str], list[Guard]]:
        column = await db.fetch(COLUMN_SQL)
        picked: list[Row | str] = []
        for one in wanted:
            users = await lookup(db, one)
            picked.append(_pick(one, users, [] if users else await closest_handles(db, one)))
        return column, picked, await guards_on(db, ["users"], "UPDATE")

    column, picked, guards = await ctx.gateway.read(survey)
    if not column:
        raise UsageError("public.users has no role column here; nothing can be set")
    labels = [str(x) for x in column[0]["labels"] or []]
    if labels and new_role not in labels:
        raise UsageError(f'the live "Role" type has no {new_role} ({", ".join(labels)})')
    problems += [p for p in picked if isinstance(p, str)]
    if problems:
        if len(words) == 1:
            raise UsageError(problems[0])
        raise UsageError(
            f"{len(problems)} of the {len(words)} users named cannot be changed, so nothing "
            "is planned: " + "; ".join(problems)
        )
    targets: list[Row] = []
    twice: list[str] = []
    for user in (p for p in picked if not isinstance(p, str)):
        if any(t["id"] == user["id"] for t in targets):
            twice.append(f"`{user['handle']}`")
            continue
        old_role = None if user["role"] is None else str(user["role"])
        targets.append(
            {
                "id": user["id"],
                "handle": str(user["handle"]),
                "email": user["email"],
                "role": old_role,
                "new_role": new_role,
            }
        )
    changing = [t for t in targets if t["role"] != new_role]
    ids = [str(t["id"]) for t in changing]
    demoted = [t for t in changing if t["role"] == SUPERADMIN]

    async def others(db: Reader) -> int:
        (row,) = await db.fetch(_OTHER_SUPERADMINS_SQL, ([str(t["id"]) for t in demoted],))
        return int(row["n"])

    if demoted and await ctx.gateway.read(others) == 0:
        names = ", ".join(f"`{t['handle']}`" for t in demoted)
        last = "the last SUPERADMIN" if len(demoted) == 1 else "every SUPERADMIN left"
        raise UsageError(
            f"refused: {names} {'is' if len(demoted) == 1 else 'are'} {last}; demoting "
            f"{'them' if len(demoted) == 1 else 'all of them'} would leave nobody able to "
            "grant ADMIN (production's trg_validate_role_change refuses it too). Make another "
            "person SUPERADMIN first; nothing was changed"
        )
    summary = _summary(targets, new_role)
    if len(summary) > SUMMARY_CHARS:
        raise UsageError(
            f"the {len(targets)} users' names take {len(summary)} characters, more than an "
            "approval message shows in one section; split the list"
        )
    elevated = [t for t in changing if needs_superadmin(t["role"], new_role)]
    superadmin = bool(elevated)
    count = len(changing)
    checks = role_guards(guards)
    warnings = [n for n in (guard_note(guards, "UPDATE"),) if n]
    if twice:
        warnings.append(f"named more than once, changed once: {', '.join(twice)}")
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
        what = f"granting {new_role}" if new_role in STAFF else "changing a SUPERADMIN"
        if len(targets) > 1 and new_role not in STAFF:
            what += " (" + ", ".join(f"`{t['handle']}`" for t in elevated) + ")"
        warnings.append(f"{what} needs a SUPERADMIN approver")
    backup = sql.Identifier(BACKUP_SCHEMA, f"{APPROVAL_PLACEHOLDER}_users")
    service = ctx.service_identity
    rows = "the whole row" if count == 1 else f"all {count} rows, whole,"
    one = len(targets) == 1
    return Plan(
        remedy=SET_ROLE_NAME,
        args=list(args),
        title=f"Set the LEAPS role of {targets[0]['handle'] if one else f'{len(targets)} users'}",
        summary=summary,
        steps=[
            PlanStep(
                sql=lock_backup_sql(backup).as_string(),
                params=[ids],
                note=f"locks the users and copies {rows} first; each must still hold the "
                "role shown",
            ),
            PlanStep(
                sql=update_sql(backup).as_string(),
                params=[new_role],
                note="as the approver's LEAPS account (app.user_id / app.user_role set for "
                f"this transaction); must change exactly {count} row{'' if count == 1 else 's'}",
            ),
            PlanStep(sql=read_back_sql(backup).as_string(), note=f"verification: all {new_role}"),
        ],
        targets=[{**t, "change": _change(t)} for t in targets],
        count=count,
        backup=f"{rows} copied first into {backup_display('users')}" if count else None,
        warnings=warnings,
        needs_approval=count > 0,
        locks=LockScope(relations=["users"]),
        approver_role=SUPERADMIN if superadmin else None,
        data=SetRoleData(
            users=[
                RoleChange(user_id=str(t["id"]), handle=str(t["handle"]), old_role=t["role"])
                for t in changing
            ],
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


def _names(changes: list[RoleChange]) -> str:
    return ", ".join(f"`{c.handle}`" for c in changes)


async def apply_set_role(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(SetRoleData)
    if plan.count == 0:
        return Outcome(ok=True, summary=plan.summary)
    backup = await writer.backup_table("users")
    copied = await writer.execute(lock_backup_sql(backup), (data.ids,))
    locked = {str(r["id"]): r["role"] for r in await writer.fetch(backed_up_sql(backup))}
    held = [c for c in data.users if c.user_id in locked and locked[c.user_id] == c.old_role]
    check_drift(plan, len(held), "users still holding their planned role")
    check_count(plan, copied, "users copied to the backup")
    guarded = bool(role_guards(await guards_on(writer, ["users"], "UPDATE")))
    await _check_identity(writer, data, guarded)
    if not guarded and data.demoted:
        if not await writer.fetch(_LOCK_SUPERADMINS_SQL, (data.demoted,)):
            raise RemedyAbort(
                f"{_names([c for c in data.users if c.user_id in data.demoted])} would leave "
                "no SUPERADMIN now; nothing was changed"
            )
    # Rule 11: users UPDATE OF role is audited; where the live trigger refuses writes
    # made with app.user_id the bot writes LEAPS's audit rows (else these do nothing).
    await writer.audit.before(writer, "users", data.ids)
    changed = [str(r["id"]) for r in await writer.fetch(update_sql(backup), (data.new_role,))]
    updated = len(changed)
    check_count(plan, updated, "users")
    await writer.audit.after(writer, "users", "UPDATE", changed)
    now = {str(r["id"]): r["role"] for r in await writer.fetch(read_back_sql(backup))}
    wrong = [c for c in data.users if now.get(c.user_id) != data.new_role]
    if wrong:
        return Outcome(
            ok=False,
            summary="verification failed: "
            + ", ".join(f"`{c.handle}` reads back as {now.get(c.user_id)}" for c in wrong)
            + f", not {data.new_role}; rolled back",
        )
    if len(data.users) == 1:
        (c,) = data.users
        summary = (
            f"`{c.handle}` is now {data.new_role} (was {c.old_role or 'no role'}); "
            f"the previous row is in {backup.as_string()}"
        )
    else:
        summary = (
            f"{len(data.users)} users are now {data.new_role}: {_names(data.users)}; "
            f"the previous rows are in {backup.as_string()}"
        )
    return Outcome(
        ok=True,
        summary=summary,
        affected=updated,
        backed_up=copied,
        backup_table=backup.as_string(),
        rows=[
            {"id": c.user_id, "handle": c.handle, "was": c.old_role, "now": now[c.user_id]}
            for c in data.users
        ],
    )


def sample_set_role(plan: Plan, n: int) -> Plan:
    """The plan cut down to its first n changing users (at most MAX_USERS are planned, so
    a plan is normally tried whole): its apply locks, backs up and changes exactly the
    users its data names, under the same rules (a SUPERADMIN approver still needed when
    the whole plan needs one)."""
    return sample_first(plan, n, SetRoleData, ("users",))


async def set_role_finished(ctx: Context, plan: Plan, run: Execution, outcome: Outcome) -> None:
    """A role change that landed takes effect in the bot now, on every replica: the
    changed people's cached and stored roles are replaced (`ctx.role_changed`, by their
    LEAPS e-mail), and the outcome (not yet posted when this runs) says where ROLE_MAP
    or a Slack user group still decides a person's role in the bot over the new LEAPS
    role."""
    if not outcome.ok or plan.count == 0 or ctx.role_changed is None:
        return
    data = plan.private(SetRoleData)
    emails = {str(t["id"]): t.get("email") for t in plan.targets}
    notes: list[str] = []
    for change in data.users:
        email = emails.get(change.user_id)
        if not email:
            continue
        for note in await ctx.role_changed(str(email), data.new_role):
            notes.append(f"`{change.handle}`: {note}")
    if notes:
        outcome.summary = f"{outcome.summary}; in the bot: {'; '.join(notes)}"


async def verify_set_role(db: Reader, plan: Plan, run: Execution) -> Verification:
    """Landed when the transaction committed (its backup exists, with every planned row)
    and every role reads back."""
    if (trivial := nothing_planned(plan)) is not None:
        return trivial
    data = plan.private(SetRoleData)
    held = await backups_hold(db, run.approval_id, {"users": len(data.users)})
    now = {str(r["id"]): r["role"] for r in await db.fetch(_ROLES_SQL, (data.ids,))}
    wrong = [c for c in data.users if now.get(c.user_id) != data.new_role]
    landed = held.landed and not wrong
    roles = "; ".join(f"`{c.handle}` is {now.get(c.user_id)}" for c in data.users[:20])
    more = f" (and {len(data.users) - 20} more)" if len(data.users) > 20 else ""
    return Verification(landed=landed, found=f"{held.found}; {roles}{more}")


SET_ROLE = add_remedy(
    Remedy(
        name=SET_ROLE_NAME,
        usage=USAGE,
        summary="change the LEAPS role of one user or a list (up to 50, one approval) as an "
        "admin would (rows backed up; granting ADMIN/SUPERADMIN needs a SUPERADMIN approver; "
        "never the last SUPERADMIN)",
        plan=plan_set_role,
        apply=apply_set_role,
        verify=verify_set_role,
        role="ADMIN",
        approver_role="ADMIN",
        approvers=1,
        finished=set_role_finished,
        preflight=True,
        sample=sample_set_role,
    )
)

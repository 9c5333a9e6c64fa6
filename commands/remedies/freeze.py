"""`freeze-writes` and `unfreeze-writes`: stop the application's writes at the database, and
let them go again exactly as they were.

The freeze sets `default_transaction_read_only = on` for the application's roles
(APP_ROLES, those that exist) in this database: `ALTER ROLE … IN DATABASE … SET`, or,
for an application role the bot itself logs in as, `ALTER DATABASE … SET` (the bot's
remedy transactions begin `SET TRANSACTION READ WRITE`, so it still repairs). A setting
reaches a session when it connects, so after the settings are committed every session of
those roles in this database is ended, idle ones included, and the pools reconnect read
only: writes fail with SQLSTATE 25006, reads work, the site stays up read only.

The order matters: a session ended before the settings commit would reconnect with the
old ones. So the ALTERs run in a transaction of their own, outside the guarded one
(`Writer.run_outside_transaction`, `BEGIN READ WRITE; …; COMMIT` as one simple-protocol
string: all or nothing, and writable even while the bot's own role is frozen), and the
sessions are ended after it committed. A failure after that commit undoes the settings
(`OutsideStepFailed`).

The previous settings of the roles in this database (their whole `setconfig` arrays, a
role without a row included) are the freeze's backup, in the approval's backup table
together with when and by whom: the freeze lives in the database and survives a bot
restart, and `/db health` reads it back (`freeze_state`). `unfreeze-writes` restores the
previous value of `default_transaction_read_only` exactly (set again as it was, or
removed where there was none; every other setting is left as it is) and ends the
sessions opened during the freeze. With no freeze record (a freeze made by hand) it
removes the setting from the roles and the database, and says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg import sql
from psycopg.errors import Error as DatabaseError
from pydantic import BaseModel

from commands.base import (
    APPLICATION_NAME,
    BACKUP_SCHEMA,
    Context,
    Reader,
    Row,
    UsageError,
)
from commands.remedies.base import (
    Execution,
    Outcome,
    OutsideStepFailed,
    Plan,
    PlanStep,
    Remedy,
    RemedyAbort,
    Verification,
    Writer,
    add_remedy,
    backup_name,
    check_count,
    check_drift,
)
from commands.remedies.sessions import wait_gone

FREEZE = "freeze-writes"
UNFREEZE = "unfreeze-writes"
SETTING = "default_transaction_read_only"
FROZEN_TABLE = "frozen"  # dbops_backup."<approval>_frozen": a freeze's record
LIFTED_TABLE = "unfrozen"  # dbops_backup."<approval>_unfrozen": an unfreeze's record
# PostgreSQL's boolean spellings (any unambiguous prefix of true/false/yes/no, on/off, 1/0).
_TRUE = {"1", "on", "t", "tr", "tru", "true", "y", "ye", "yes"}
_FALSE = {"0", "of", "off", "f", "fa", "fal", "fals", "false", "n", "no"}

LIMIT = (
    "the freeze stops the application, not a hostile client: a session that sets "
    f"{SETTING} = off itself, or begins its transactions READ WRITE explicitly, still "
    "writes; superusers and the bot's own roles are never frozen"
)
# PostgREST (the Supabase REST API) logs in as `authenticator` and begins the transaction
# of every POST, PATCH, PUT and DELETE with an explicit READ WRITE (its documented access
# modes), which overrides the default: the limit above, met by the API itself.
POSTGREST_ROLE = "authenticator"
POSTGREST_WARNING = (
    "PostgREST (the Supabase REST API, which logs in as `authenticator`) begins every POST, "
    "PATCH, PUT and DELETE transaction READ WRITE explicitly, so this setting does not stop "
    "writes made through the REST API; it stops clients that begin plain transactions "
    "(Prisma, pools, psql). Stop the REST API's writes at the API if they must stop too"
)
WEBHOOK_WARNING = (
    "Kajabi webhooks are refused while writes are frozen (their inserts fail); after the "
    "unfreeze `/db webhooks` lists what is missing and `/db reprocess-webhooks` picks "
    "them up"
)


def _setconfig(value: Any) -> list[str] | None:
    """A pg_db_role_setting array as a list (None: no row)."""
    return list(value) if value is not None else None


def setting_value(setconfig: Sequence[str] | None) -> str | None:
    """The value of default_transaction_read_only in a setconfig array, or None."""
    for entry in setconfig or ():
        name, _, value = entry.partition("=")
        if name.strip().lower() == SETTING:
            return value.strip()
    return None


def is_on(value: str | None) -> bool:
    return value is not None and value.strip().strip("'\"").lower() in _TRUE


def _as_boolean_word(value: str) -> sql.SQL:
    """A stored boolean value as SQL, from a fixed list only (never the stored text)."""
    word = value.strip().strip("'\"").lower()
    if word in _TRUE:
        return sql.SQL("on")
    if word in _FALSE:
        return sql.SQL("off")
    raise RemedyAbort(f"cannot restore {SETTING} = {value!r}: not a boolean; nothing was changed")


# --- what the catalog says ----------------------------------------------------------------

_DATABASE_SQL = """
SELECT d.oid::bigint AS oid, d.datname::text AS db, current_user::text AS me,
       (SELECT s.setconfig FROM pg_db_role_setting s
         WHERE s.setrole = 0 AND s.setdatabase = d.oid) AS setconfig
FROM pg_database d WHERE d.datname = current_database()
"""
_ROLES_SQL = """
SELECT r.rolname::text AS role, r.oid::bigint AS oid, r.rolsuper AS superuser,
       r.rolcanlogin AS login,
       (SELECT s.setconfig FROM pg_db_role_setting s
         WHERE s.setrole = r.oid AND s.setdatabase = d.oid) AS in_db,
       (SELECT s.setconfig FROM pg_db_role_setting s
         WHERE s.setrole = r.oid AND s.setdatabase = 0) AS all_dbs
FROM pg_roles r CROSS JOIN pg_database d
WHERE d.datname = current_database() AND r.rolname = ANY(%s::text[])
ORDER BY r.rolname
"""
_SESSIONS_SQL = """
SELECT a.pid, a.usename::text AS "user", coalesce(a.application_name, '') AS app,
       coalesce(a.state, 'unknown') AS state, a.backend_start,
       coalesce(host(a.client_addr), 'local') AS client_addr
FROM pg_stat_activity a
WHERE a.usesysid = ANY(%s::oid[]) AND a.datname = current_database()
  AND a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()
  AND coalesce(a.application_name, '') <> %s
  AND (%s::timestamptz IS NULL OR a.backend_start >= %s::timestamptz)
ORDER BY a.usename, a.pid
"""
# The same sessions, ended: idle ones included, never the bot's own or this backend.
END_SESSIONS_SQL = """
SELECT a.pid, a.usename::text AS "user", pg_terminate_backend(a.pid) AS ended
FROM pg_stat_activity a
WHERE a.usesysid = ANY(%s::oid[]) AND a.datname = current_database()
  AND a.backend_type = 'client backend' AND a.pid <> pg_backend_pid()
  AND coalesce(a.application_name, '') <> %s
  AND (%s::timestamptz IS NULL OR a.backend_start >= %s::timestamptz)
ORDER BY a.pid
"""
# Every read-only default that reaches this database: the database's own, and those of the
# given roles in it or in all databases (setdatabase = 0).
_LIVE_SQL = """
SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE r.rolname::text END AS role,
       s.setdatabase = 0 AS all_databases, d.datname::text AS db, s.setconfig
FROM pg_db_role_setting s
JOIN pg_database d ON d.datname = current_database()
LEFT JOIN pg_roles r ON r.oid = s.setrole
WHERE (s.setdatabase = d.oid OR s.setdatabase = 0)
  AND (s.setrole = 0 OR r.rolname = ANY(%s::text[]))
ORDER BY 1 NULLS FIRST, 2
"""
# The freeze records the reader may read (catalog only: no error for a missing privilege).
_RECORDS_SQL = """
SELECT c.relname::text AS name, c.relname LIKE %(lifted)s AS lifted
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relkind = 'r'
  AND (c.relname LIKE %(frozen)s OR c.relname LIKE %(lifted)s)
  AND has_schema_privilege(n.oid, 'USAGE') AND has_table_privilege(c.oid, 'SELECT')
ORDER BY c.oid DESC
LIMIT 50
"""
_RECORDS_PARAMS = {
    "schema": BACKUP_SCHEMA,
    "frozen": f"%\\_{FROZEN_TABLE}",
    "lifted": f"%\\_{LIFTED_TABLE}",
}


@dataclass(frozen=True)
class FreezeRecord:
    """A bot-made freeze, as its backup table records it."""

    approval_id: str
    frozen_at: datetime
    approved_by: str
    roles: tuple[str, ...]
    database_wide: bool


@dataclass(frozen=True)
class FreezeState:
    """Which read-only defaults reach this database now, and the bot's latest freeze that
    no unfreeze lifted (None: none, or the freeze records cannot be read)."""

    database: str
    frozen: tuple[str, ...]  # "authenticator (in database leaps)", "database leaps", …
    roles_in_db: tuple[str, ...]
    roles_all_dbs: tuple[str, ...]
    database_wide: bool
    record: FreezeRecord | None = None
    by_hand: tuple[str, ...] = field(default=())  # of `frozen`, those no record explains

    @property
    def active(self) -> bool:
        return bool(self.frozen)

    def describe(self) -> str:
        if not self.frozen:
            return f"writes are not frozen in database {self.database}"
        if self.record is None:
            return "writes frozen, made by hand (no record of the bot): " + ", ".join(self.frozen)
        by_bot = [f for f in self.frozen if f not in self.by_hand]
        text = (
            f"writes frozen since {self.record.frozen_at.isoformat(timespec='seconds')} by "
            f"{self.record.approved_by} (approval {self.record.approval_id}): " + ", ".join(by_bot)
        )
        if self.by_hand:
            text += "; also made by hand (no record of the bot): " + ", ".join(self.by_hand)
        return text


async def _records(db: Reader) -> tuple[list[Row], set[str]]:
    """The rows of every freeze record, and the freezes an unfreeze lifted."""
    tables = await db.fetch(_RECORDS_SQL, _RECORDS_PARAMS)
    frozen: list[Row] = []
    lifted: set[str] = set()
    for table in tables:
        name = sql.Identifier(BACKUP_SCHEMA, str(table["name"]))
        if table["lifted"]:
            query = sql.SQL("SELECT DISTINCT freeze_approval FROM {}").format(name)
            lifted |= {str(r["freeze_approval"]) for r in await db.fetch(query.as_string())}
        else:
            query = sql.SQL(
                "SELECT approval_id, scope, role, frozen_at, approved_by FROM {}"
            ).format(name)
            frozen += await db.fetch(query.as_string())
    return frozen, lifted


def _latest(frozen: list[Row], lifted: set[str]) -> FreezeRecord | None:
    live = [r for r in frozen if str(r["approval_id"]) not in lifted]
    if not live:
        return None
    newest = max(live, key=lambda r: r["frozen_at"])
    rows = [r for r in live if r["approval_id"] == newest["approval_id"]]
    return FreezeRecord(
        approval_id=str(newest["approval_id"]),
        frozen_at=newest["frozen_at"],
        approved_by=str(newest["approved_by"]),
        roles=tuple(str(r["role"]) for r in rows if r["scope"] == "role"),
        database_wide=any(r["scope"] == "database" for r in rows),
    )


async def freeze_state(app_roles: Sequence[str], db: Reader) -> FreezeState:
    """What `/db health` and the incident reminders read: the catalog first, and the
    freeze records only when something is frozen."""
    rows = await db.fetch(_LIVE_SQL, (list(app_roles),))
    (dbrow,) = await db.fetch("SELECT current_database()::text AS db")
    database = str(dbrow["db"])
    in_db: list[str] = []
    all_dbs: list[str] = []
    database_wide = False
    for row in rows:
        if not is_on(setting_value(row["setconfig"])):
            continue
        if row["role"] is None:
            database_wide = database_wide or not row["all_databases"]
        elif row["all_databases"]:
            all_dbs.append(str(row["role"]))
        else:
            in_db.append(str(row["role"]))
    frozen = [f"{r} (in database {database})" for r in in_db]
    frozen += [f"{r} (in all databases)" for r in all_dbs]
    if database_wide:
        frozen.append(f"database {database} (every role connecting to it)")
    state = FreezeState(database, tuple(frozen), tuple(in_db), tuple(all_dbs), database_wide)
    if not frozen:
        return state
    record = _latest(*await _records(db))
    explained: list[str] = []
    if record is not None:
        explained = [f"{r} (in database {database})" for r in record.roles if r in in_db]
        if record.database_wide and database_wide:
            explained.append(f"database {database} (every role connecting to it)")
        if not explained:
            record = None
    by_hand = tuple(f for f in frozen if f not in explained)
    return FreezeState(
        database,
        tuple(frozen),
        tuple(in_db),
        tuple(all_dbs),
        database_wide,
        record=record,
        by_hand=by_hand,
    )


# --- the plan's data ------------------------------------------------------------------------


class RoleSetting(BaseModel):
    role: str
    oid: int
    login: bool
    previous: list[str] | None  # its whole setconfig in this database (None: no row)


class FreezeData(BaseModel):
    database: str
    db_oid: int
    roles: list[RoleSetting]  # ALTER ROLE … IN DATABASE … SET
    shared: list[RoleSetting]  # application roles the bot logs in as: ALTER DATABASE
    database_wide: bool
    db_previous: list[str] | None  # the database's own setconfig (None: no row)
    session_oids: list[int]  # whose sessions are ended: every application role frozen


class UnfreezeData(BaseModel):
    database: str
    db_oid: int
    freeze_approval: str | None  # the freeze record restored; None: a freeze by hand
    frozen_at: str | None  # ISO; sessions opened since are ended (None: all of them)
    roles: list[RoleSetting]  # `previous`: the value to restore is taken from it
    restore: dict[str, str | None]  # role -> the read-only value to set again (None: RESET)
    current: dict[str, list[str] | None]  # role -> setconfig now (the drift check)
    database_wide: bool
    db_restore: str | None
    db_current: list[str] | None
    session_oids: list[int]


@dataclass(frozen=True)
class _Survey:
    database: str
    db_oid: int
    me: str
    db_setconfig: list[str] | None
    roles: list[Row]
    missing: list[str]


async def _survey(ctx_roles: Sequence[str], db: Reader | Writer) -> _Survey:
    (dbrow,) = await db.fetch(_DATABASE_SQL)
    roles = await db.fetch(_ROLES_SQL, (list(ctx_roles),))
    found = {str(r["role"]) for r in roles}
    return _Survey(
        str(dbrow["db"]),
        int(dbrow["oid"]),
        str(dbrow["me"]),
        dbrow["setconfig"],
        roles,
        [r for r in ctx_roles if r not in found],
    )


def _role_setting(row: Row) -> RoleSetting:
    return RoleSetting(
        role=str(row["role"]),
        oid=int(row["oid"]),
        login=bool(row["login"]),
        previous=_setconfig(row["in_db"]),
    )


def _no_args(name: str, args: list[str]) -> None:
    if args:
        raise UsageError(
            f"`{name}` takes no arguments: it acts on APP_ROLES (the application's roles)"
        )


def _sessions_of(role: str, sessions: list[Row]) -> str:
    """One role's sessions in a plan's table cell: `2: pid 101 (idle, web), pid 102 (…)`."""
    mine = [s for s in sessions if s["user"] == role]
    if not mine:
        return "none"
    shown = ", ".join(
        f"pid {s['pid']} ({s['state']}, {s['app'] or s['client_addr']})" for s in mine[:10]
    )
    return f"{len(mine)}: {shown}" + (", …" if len(mine) > 10 else "")


def _alter_role(role: str, database: str, value: sql.Composable | None) -> sql.Composed:
    if value is None:
        return sql.SQL("ALTER ROLE {} IN DATABASE {} RESET {}").format(
            sql.Identifier(role), sql.Identifier(database), sql.Identifier(SETTING)
        )
    return sql.SQL("ALTER ROLE {} IN DATABASE {} SET {} = {}").format(
        sql.Identifier(role), sql.Identifier(database), sql.Identifier(SETTING), value
    )


def _alter_database(database: str, value: sql.Composable | None) -> sql.Composed:
    if value is None:
        return sql.SQL("ALTER DATABASE {} RESET {}").format(
            sql.Identifier(database), sql.Identifier(SETTING)
        )
    return sql.SQL("ALTER DATABASE {} SET {} = {}").format(
        sql.Identifier(database), sql.Identifier(SETTING), value
    )


def _one_transaction(statements: list[sql.Composed]) -> sql.Composed:
    """The ALTERs as one transaction in one simple-protocol string (no parameters): all or
    nothing, READ WRITE even where the session's default is read only (a database-wide
    freeze reaches the bot's own role)."""
    body = sql.SQL("; ").join(statements)
    return sql.SQL("BEGIN READ WRITE; {}; COMMIT").format(body)


def _shown(statement: sql.Composed) -> str:
    return statement.as_string()


# --- freeze-writes ----------------------------------------------------------------------------


async def plan_freeze(ctx: Context, args: list[str]) -> Plan:
    _no_args(FREEZE, args)
    app_roles = list(dict.fromkeys(ctx.app_roles))
    if not app_roles:
        raise UsageError("APP_ROLES is empty: there is no application role to freeze")

    async def survey(db: Reader) -> tuple[_Survey, list[Row]]:
        found = await _survey(app_roles, db)
        oids = [int(r["oid"]) for r in found.roles]
        sessions = await db.fetch(_SESSIONS_SQL, (oids, APPLICATION_NAME, None, None))
        return found, sessions

    found, sessions = await ctx.gateway.read(survey)
    if not found.roles:
        raise UsageError(
            f"none of APP_ROLES ({', '.join(app_roles)}) exists in this cluster; "
            "set APP_ROLES to the roles the application logs in as"
        )
    supers = [str(r["role"]) for r in found.roles if r["superuser"]]
    if supers:
        raise UsageError(
            f"APP_ROLES names superuser {', '.join(supers)}: the bot never freezes a superuser "
            "(it can turn the setting off itself, and superusers are usually the platform's "
            "own); take it out of APP_ROLES, or stop that client another way"
        )
    bot_roles = {*ctx.bot_roles, found.me}
    shared_rows = [r for r in found.roles if r["role"] in bot_roles]
    own_rows = [r for r in found.roles if r["role"] not in bot_roles]
    for row in shared_rows:  # a role's own setting overrides the database's
        for scope, config in (
            ("in this database", row["in_db"]),
            ("in all databases", row["all_dbs"]),
        ):
            value = setting_value(config)
            if value is not None and not is_on(value):
                raise UsageError(
                    f"application role {row['role']} is also the bot's own, so only a "
                    f"database-wide setting can freeze it; but it has its own {SETTING} = "
                    f"{value} {scope}, which overrides the database's: the freeze would not "
                    "reach it. Give the application a role of its own"
                )
    roles = [_role_setting(r) for r in own_rows if not is_on(setting_value(r["in_db"]))]
    already = [str(r["role"]) for r in own_rows if is_on(setting_value(r["in_db"]))]
    database_wide = bool(shared_rows) and not is_on(setting_value(found.db_setconfig))
    count = len(roles) + int(database_wide)
    if count == 0:
        raise UsageError(
            f"writes of {', '.join(str(r['role']) for r in found.roles)} are already frozen "
            f"in database {found.database}; `/db health` says since when, "
            "`/db unfreeze-writes` lifts it"
        )
    on = sql.SQL("on")
    statements = [_alter_role(r.role, found.database, on) for r in roles]
    if database_wide:
        statements.append(_alter_database(found.database, on))
    data = FreezeData(
        database=found.database,
        db_oid=found.db_oid,
        roles=roles,
        shared=[_role_setting(r) for r in shared_rows],
        database_wide=database_wide,
        db_previous=_setconfig(found.db_setconfig),
        session_oids=[int(r["oid"]) for r in found.roles],
    )
    names = [r.role for r in roles]
    warnings = [LIMIT, WEBHOOK_WARNING]
    if any(str(r["role"]) == POSTGREST_ROLE for r in found.roles):
        warnings.append(POSTGREST_WARNING)
    if sessions:
        warnings.append(
            f"{len(sessions)} session(s) of these roles are ended after the settings commit, "
            "idle ones included: an open transaction in them rolls back, and pools reconnect "
            "read only"
        )
    if database_wide:
        shared = ", ".join(str(r["role"]) for r in shared_rows)
        warnings.append(
            f"{shared} is also the bot's own role, so the freeze is database-wide "
            f"(ALTER DATABASE {found.database}): every role connecting to {found.database} "
            "starts read only; the bot's remedies still write (they begin READ WRITE), and "
            "the bot's state store must not live in this database"
        )
    if already:
        warnings.append(
            f"already read only in this database, left as they are: {', '.join(already)}"
        )
    if found.missing:
        warnings.append(f"APP_ROLES not in this cluster, skipped: {', '.join(found.missing)}")
    nologin = [r.role for r in roles if not r.login]
    if nologin:
        warnings.append(
            f"{', '.join(nologin)} cannot log in: their setting reaches only a session that "
            "logs in as them (a session that logs in as another role and `SET ROLE`s keeps "
            "its login role's setting; on Supabase that is `authenticator`)"
        )
    what = ", ".join(names) if names else ""
    if database_wide:
        what = f"{what} and " if what else ""
        what += f"database {found.database} (shared with the bot)"
    return Plan(
        remedy=FREEZE,
        args=list(args),
        title=f"Freeze writes: {', '.join(str(r['role']) for r in found.roles)}",
        summary=(
            f"FREEZE WRITES in database {found.database}: {SETTING} = on for {what}, then "
            f"end the {len(sessions)} session(s) of the application roles so they reconnect "
            "read only; writes then fail with SQLSTATE 25006, reads keep working. "
            "`/db unfreeze-writes` restores the previous settings"
        ),
        steps=[
            PlanStep(
                sql=_shown(_one_transaction(statements)),
                note="one transaction of its own, committed before any session is ended "
                "(a session ended earlier would reconnect with the old settings)",
            ),
            PlanStep(
                sql=END_SESSIONS_SQL.strip(),
                params=[data.session_oids, APPLICATION_NAME, None, None],
                note="every session of the application roles in this database, idle ones "
                "included; never the bot's own",
            ),
        ],
        targets=[
            {
                "role": str(r["role"]),
                "login": bool(r["login"]),
                "how": "ALTER DATABASE (the bot's role too)"
                if r["role"] in bot_roles
                else "already read only"
                if r["role"] in already
                else "ALTER ROLE … IN DATABASE",
                "settings now": ", ".join(r["in_db"] or []) or "none",
                "sessions": _sessions_of(str(r["role"]), sessions),
            }
            for r in found.roles
        ],
        count=count,
        backup=f"{BACKUP_SCHEMA}.<approval>_{FROZEN_TABLE}: the previous settings, when, by whom",
        warnings=warnings,
        limits="the settings in a transaction of their own, committed before the sessions "
        "are ended; undone if ending them fails",
        data=data.model_dump(mode="json"),
    )


async def _recheck(writer: Writer, roles: list[str]) -> _Survey:
    return await _survey(roles, writer)


async def _end_sessions(
    writer: Writer, oids: list[int], since: datetime | str | None
) -> tuple[list[Row], list[int]]:
    """End the sessions, then wait (bounded, as kill-idle does) until they have left;
    (ended, still listed)."""
    await writer.execute("SELECT pg_stat_clear_snapshot()")
    ended = await writer.fetch(END_SESSIONS_SQL, (oids, APPLICATION_NAME, since, since))
    done = [int(r["pid"]) for r in ended if r["ended"]]
    left = await wait_gone(writer, done) if done else []
    return ended, left


def _refuse_drift(
    found: _Survey,
    expected: Mapping[str, list[str] | None],
    database: str,
    db_expected: list[str] | None,
    database_wide: bool,
    *,
    freezing: bool = False,
) -> None:
    """Abort, changing nothing, when a role's settings in this database (or, database-wide,
    the database's own) are no longer what the plan read; a role gone counts as changed,
    and for a freeze so does a role now a superuser, or another database."""
    by_name = {str(r["role"]): r for r in found.roles}
    changed = [
        name
        for name, setting in expected.items()
        if name not in by_name
        or (freezing and bool(by_name[name]["superuser"]))
        or _setconfig(by_name[name]["in_db"]) != setting
    ]
    if (
        changed
        or (freezing and found.database != database)
        or (database_wide and _setconfig(found.db_setconfig) != db_expected)
    ):
        what = ", ".join(changed) if changed else f"database {database}"
        raise RemedyAbort(
            f"drift: the settings of {what} changed since the plan; nothing was changed, "
            "request it again"
        )


async def _undo(writer: Writer, statements: list[sql.Composed]) -> str:
    """Run the undoing ALTERs outside; what is left, in words."""
    try:
        await writer.run_outside_transaction(_one_transaction(statements))
    except DatabaseError as exc:
        return f"undoing the settings failed too ({exc}); run `/db unfreeze-writes`"
    return "the settings were undone"


async def apply_freeze(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(FreezeData)
    names = [r.role for r in data.roles] + [r.role for r in data.shared]
    found = await _recheck(writer, names)
    if found.me in {r.role for r in data.roles}:
        raise RemedyAbort(
            f"the bot's admin connection logs in as {found.me}, one of the roles to freeze: "
            "nothing was changed (it would freeze the bot)"
        )
    _refuse_drift(
        found,
        {r.role: r.previous for r in data.roles + data.shared},
        data.database,
        data.db_previous,
        data.database_wide,
        freezing=True,
    )
    check_drift(plan, len(data.roles) + int(data.database_wide), "settings to change")
    (clock,) = await writer.fetch("SELECT clock_timestamp() AS at")
    frozen_at: datetime = clock["at"]
    actor = writer.actor_id
    acted = writer.identity.describe() if writer.identity else "no LEAPS user"
    table = await writer.backup_table(FROZEN_TABLE)
    await writer.execute(
        sql.SQL(
            "CREATE TABLE {} (approval_id text NOT NULL, scope text NOT NULL, role text,"
            " role_oid bigint, database text NOT NULL, setconfig text[], had_row boolean"
            " NOT NULL, frozen_at timestamptz NOT NULL, approved_by text NOT NULL,"
            " acted_as text NOT NULL)"
        ).format(table)
    )
    # "role": frozen by its own setting; "shared": the bot's role too, frozen by the
    # database's; "database": the database's own setting
    records: list[tuple[str, str | None, int | None, list[str] | None]] = []
    records += [("role", r.role, r.oid, r.previous) for r in data.roles]
    records += [("shared", r.role, r.oid, r.previous) for r in data.shared]
    if data.database_wide:
        records.append(("database", None, None, data.db_previous))
    for scope, role, oid, previous in records:
        await writer.execute(
            sql.SQL(
                "INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s::text[], %s, %s, %s, %s)"
            ).format(table),
            (
                writer.approval_id,
                scope,
                role,
                oid,
                data.database,
                previous,
                previous is not None,
                frozen_at,
                actor,
                acted,
            ),
        )
    on = sql.SQL("on")
    statements = [_alter_role(r.role, data.database, on) for r in data.roles]
    if data.database_wide:
        statements.append(_alter_database(data.database, on))
    undo = [
        _alter_role(r.role, data.database, _restore_value(setting_value(r.previous)))
        for r in data.roles
    ]
    if data.database_wide:
        undo.append(_alter_database(data.database, _restore_value(setting_value(data.db_previous))))
    try:
        await writer.run_outside_transaction(_one_transaction(statements))
    except DatabaseError as exc:
        raise RemedyAbort(f"the database refused the settings: {exc}; nothing was changed") from exc
    await writer.execute("SAVEPOINT dbops_freeze")
    try:
        after = await _recheck(writer, names)
        on_now = [str(r["role"]) for r in after.roles if is_on(setting_value(r["in_db"]))] + (
            [f"database {data.database}"] if is_on(setting_value(after.db_setconfig)) else []
        )
        set_now = sum(1 for r in data.roles if r.role in on_now) + int(
            data.database_wide and f"database {data.database}" in on_now
        )
        check_count(plan, set_now, "settings")
        ended, left = await _end_sessions(writer, data.session_oids, None)
    except (DatabaseError, RemedyAbort) as exc:
        await writer.execute("ROLLBACK TO SAVEPOINT dbops_freeze")
        undone = await _undo(writer, undo)
        raise OutsideStepFailed(
            Outcome(
                ok=False,
                summary=f"the freeze was committed, then failed: {exc}; {undone}",
                error=str(exc),
            )
        ) from exc
    await writer.execute("RELEASE SAVEPOINT dbops_freeze")
    shown = ", ".join(r.role for r in data.roles)
    if data.database_wide:
        shown = (f"{shown} and " if shown else "") + (
            f"database {data.database} (shared with the bot: "
            f"{', '.join(r.role for r in data.shared)})"
        )
    summary = (
        f"WRITES FROZEN in database {data.database}: {shown} start read only "
        f"({SETTING} = on) since {frozen_at.isoformat(timespec='seconds')}; "
        f"{len(ended)} session(s) ended so they reconnect read only"
        + (f" (pid {', '.join(map(str, left))} still listed)" if left else "")
        + "; `/db unfreeze-writes` restores the previous settings"
    )
    return Outcome(
        ok=True,
        summary=summary,
        affected=plan.count,
        backed_up=len(records),
        backup_table=table.as_string(),
        rows=[{"pid": r["pid"], "user": r["user"], "ended": r["ended"]} for r in ended],
    )


def _restore_value(value: str | None) -> sql.SQL | None:
    return None if value is None else _as_boolean_word(value)


async def verify_freeze(db: Reader, plan: Plan, run: Execution) -> Verification:
    data = plan.private(FreezeData)
    found = await _survey([r.role for r in data.roles], db)
    on = {str(r["role"]) for r in found.roles if is_on(setting_value(r["in_db"]))}
    missing = [r.role for r in data.roles if r.role not in on]
    if data.database_wide and not is_on(setting_value(found.db_setconfig)):
        missing.append(f"database {data.database}")
    if missing:
        return Verification(landed=False, found=f"not read only: {', '.join(missing)}")
    return Verification(landed=True, found=f"the {plan.count} read-only settings are in place")


# --- unfreeze-writes --------------------------------------------------------------------------


async def _freeze_record(db: Reader, approval_id: str) -> list[Row]:
    name = sql.Identifier(BACKUP_SCHEMA, backup_name(approval_id, FROZEN_TABLE))
    query = sql.SQL(
        "SELECT scope, role, role_oid, setconfig, had_row, frozen_at FROM {} ORDER BY role"
    ).format(name)
    return await db.fetch(query.as_string())


async def plan_unfreeze(ctx: Context, args: list[str]) -> Plan:
    _no_args(UNFREEZE, args)
    app_roles = list(dict.fromkeys(ctx.app_roles))

    async def survey(db: Reader) -> tuple[FreezeState, _Survey, list[Row], list[Row]]:
        state = await freeze_state(app_roles, db)
        record_rows = await _freeze_record(db, state.record.approval_id) if state.record else []
        names = list(
            dict.fromkeys([*app_roles, *(str(r["role"]) for r in record_rows if r["role"])])
        )
        found = await _survey(names, db)
        since = state.record.frozen_at if state.record else None
        oids = [int(r["oid"]) for r in found.roles]
        sessions = await db.fetch(_SESSIONS_SQL, (oids, APPLICATION_NAME, since, since))
        return state, found, record_rows, sessions

    state, found, record_rows, sessions = await ctx.gateway.read(survey)
    by_name = {str(r["role"]): r for r in found.roles}
    restore: dict[str, str | None] = {}
    roles: list[RoleSetting] = []
    database_wide = False
    db_restore: str | None = None
    warnings = [WEBHOOK_WARNING.replace("are refused while writes are frozen", "were refused")]
    if state.record is not None:
        source = (
            f"the freeze of {state.record.frozen_at.isoformat(timespec='seconds')} by "
            f"{state.record.approved_by} (approval {state.record.approval_id}): its backup "
            "holds the previous settings, restored exactly"
        )
        for row in record_rows:
            if row["scope"] == "role" and row["role"] in by_name:
                previous = _setconfig(row["setconfig"])
                restore[str(row["role"])] = setting_value(previous)
                roles.append(
                    RoleSetting(
                        role=str(row["role"]),
                        oid=int(by_name[str(row["role"])]["oid"]),
                        login=bool(by_name[str(row["role"])]["login"]),
                        previous=previous,
                    )
                )
            elif row["scope"] == "database":
                database_wide = True
                previous = _setconfig(row["setconfig"])
                db_restore = setting_value(previous)
        gone = [
            str(r["role"]) for r in record_rows if r["scope"] == "role" and r["role"] not in by_name
        ]
        if gone:
            warnings.append(f"roles of the freeze no longer in the cluster: {', '.join(gone)}")
    else:
        source = (
            "no freeze record of the bot: a freeze made by hand. Its previous values are "
            f"unknown, so {SETTING} is removed (PostgreSQL's default: off) from the roles and "
            "the database that have it here"
        )
        for name in state.roles_in_db:
            if name in by_name:
                restore[name] = None
                roles.append(_role_setting(by_name[name]))
        if state.database_wide:
            database_wide = True
    if state.roles_all_dbs:
        warnings.append(
            f"read only in ALL databases (ALTER ROLE … SET, not this bot's): "
            f"{', '.join(state.roles_all_dbs)}; not lifted here, as it reaches other "
            "databases: if it is a freeze, lift it by hand with `ALTER ROLE <role> RESET "
            f"{SETTING}`"
        )
    count = len(roles) + int(database_wide)
    if count == 0:
        raise UsageError(
            f"writes are not frozen in database {found.database}"
            + (" by a setting this bot can lift" if state.roles_all_dbs else "")
            + "; nothing to do"
            + (f" ({warnings[-1]})" if state.roles_all_dbs else "")
        )
    statements = [
        _alter_role(r.role, found.database, _restore_value(restore[r.role])) for r in roles
    ]
    if database_wide:
        statements.append(_alter_database(found.database, _restore_value(db_restore)))
    since = state.record.frozen_at if state.record else None
    data = UnfreezeData(
        database=found.database,
        db_oid=found.db_oid,
        freeze_approval=state.record.approval_id if state.record else None,
        frozen_at=since.isoformat() if since else None,
        roles=roles,
        restore=restore,
        current={r.role: _setconfig(by_name[r.role]["in_db"]) for r in roles},
        database_wide=database_wide,
        db_restore=db_restore,
        db_current=_setconfig(found.db_setconfig),
        session_oids=sorted(
            {r.oid for r in roles}
            | ({int(r["oid"]) for r in found.roles} if database_wide else set())
        ),
    )
    if sessions:
        warnings.append(
            f"{len(sessions)} session(s) opened during the freeze are ended so they reconnect "
            "read-write"
            + ("" if since else " (no record says when it began: every session of these roles)")
        )
    if database_wide:
        warnings.append(
            "sessions of other roles opened during the database-wide freeze stay read only "
            "until they reconnect"
        )
    return Plan(
        remedy=UNFREEZE,
        args=list(args),
        title=f"Unfreeze writes in database {found.database}",
        summary=(
            f"UNFREEZE WRITES in database {found.database}: restore {SETTING} of "
            + ", ".join(
                f"{r.role} ({restore[r.role] if restore[r.role] is not None else 'none'})"
                for r in roles
            )
            + (
                f"{', ' if roles else ''}database {found.database} "
                f"({db_restore if db_restore is not None else 'none'})"
                if database_wide
                else ""
            )
            + f", from {source}; then end the {len(sessions)} session(s) opened during the freeze"
        ),
        steps=[
            PlanStep(
                sql=_shown(_one_transaction(statements)),
                note="one transaction of its own, committed before any session is ended",
            ),
            PlanStep(
                sql=END_SESSIONS_SQL.strip(),
                params=[data.session_oids, APPLICATION_NAME, data.frozen_at, data.frozen_at],
                note="the sessions opened during the freeze; never the bot's own",
            ),
        ],
        targets=[
            {
                "role": r.role,
                "restore": restore[r.role] if restore[r.role] is not None else "(none: RESET)",
                "settings now": ", ".join(data.current[r.role] or []) or "none",
                "sessions": _sessions_of(r.role, sessions),
            }
            for r in roles
        ],
        count=count,
        backup=f"{BACKUP_SCHEMA}.<approval>_{LIFTED_TABLE}: the frozen settings replaced",
        warnings=warnings,
        limits="the settings in a transaction of their own, committed before the sessions "
        "are ended",
        data=data.model_dump(mode="json"),
    )


async def apply_unfreeze(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(UnfreezeData)
    names = [r.role for r in data.roles]
    found = await _recheck(writer, names)
    _refuse_drift(
        found,
        {name: data.current[name] for name in names},
        data.database,
        data.db_current,
        data.database_wide,
    )
    check_drift(plan, len(data.roles) + int(data.database_wide), "settings to restore")
    (clock,) = await writer.fetch("SELECT clock_timestamp() AS at")
    actor = writer.actor_id
    table = await writer.backup_table(LIFTED_TABLE)
    await writer.execute(
        sql.SQL(
            "CREATE TABLE {} (approval_id text NOT NULL, freeze_approval text, scope text"
            " NOT NULL, role text, database text NOT NULL, setconfig text[],"
            " lifted_at timestamptz NOT NULL, lifted_by text NOT NULL)"
        ).format(table)
    )
    rows: list[tuple[str, str | None, list[str] | None]] = [
        ("role", name, data.current[name]) for name in names
    ]
    if data.database_wide:
        rows.append(("database", None, data.db_current))
    for scope, role, config in rows:
        await writer.execute(
            sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s::text[], %s, %s)").format(table),
            (
                writer.approval_id,
                data.freeze_approval or "by hand",
                scope,
                role,
                data.database,
                config,
                clock["at"],
                actor,
            ),
        )
    statements = [
        _alter_role(r.role, data.database, _restore_value(data.restore[r.role])) for r in data.roles
    ]
    if data.database_wide:
        statements.append(_alter_database(data.database, _restore_value(data.db_restore)))
    try:
        await writer.run_outside_transaction(_one_transaction(statements))
    except DatabaseError as exc:
        raise RemedyAbort(f"the database refused the settings: {exc}; nothing was changed") from exc
    await writer.execute("SAVEPOINT dbops_unfreeze")
    try:
        after = await _recheck(writer, names)
        restored = sum(
            1 for r in after.roles if setting_value(r["in_db"]) == data.restore.get(str(r["role"]))
        )
        restored += int(data.database_wide and setting_value(after.db_setconfig) == data.db_restore)
        check_count(plan, restored, "settings restored")
        ended, left = await _end_sessions(writer, data.session_oids, data.frozen_at)
    except (DatabaseError, RemedyAbort) as exc:
        await writer.execute("ROLLBACK TO SAVEPOINT dbops_unfreeze")
        raise OutsideStepFailed(
            Outcome(
                ok=False,
                summary=f"the previous settings were restored (committed), then it failed: "
                f"{exc}; sessions opened during the freeze stay read only until they "
                "reconnect (`/db connections` lists them, `/db terminate <pid>` ends one)",
                error=str(exc),
            )
        ) from exc
    await writer.execute("RELEASE SAVEPOINT dbops_unfreeze")
    shown = ", ".join(names) + (
        f"{', ' if names else ''}database {data.database}" if data.database_wide else ""
    )
    summary = (
        f"WRITES UNFROZEN in database {data.database}: the previous settings of {shown} are "
        f"back; {len(ended)} session(s) opened during the freeze ended so they reconnect "
        "read-write"
        + (f" (pid {', '.join(map(str, left))} still listed)" if left else "")
        + ("" if data.freeze_approval else " (a freeze made by hand: the setting was removed)")
    )
    return Outcome(
        ok=True,
        summary=summary,
        affected=plan.count,
        backed_up=len(rows),
        backup_table=table.as_string(),
        rows=[{"pid": r["pid"], "user": r["user"], "ended": r["ended"]} for r in ended],
    )


async def verify_unfreeze(db: Reader, plan: Plan, run: Execution) -> Verification:
    data = plan.private(UnfreezeData)
    found = await _survey([r.role for r in data.roles], db)
    wrong = [
        str(r["role"])
        for r in found.roles
        if setting_value(r["in_db"]) != data.restore.get(str(r["role"]))
    ]
    if data.database_wide and setting_value(found.db_setconfig) != data.db_restore:
        wrong.append(f"database {data.database}")
    if wrong:
        return Verification(landed=False, found=f"not restored: {', '.join(wrong)}")
    return Verification(landed=True, found=f"the {plan.count} previous settings are back")


_NOT_TRIED = (
    "role and database settings are not rows, and ending a session cannot be rolled back: "
    "a try would end the application's sessions. The plan checked instead the roles from "
    "the live catalog (existing, not superusers, not the bot's own), their settings in this "
    "database now, and the sessions it ends; apply re-checks the settings before changing "
    "them and counts them after"
)

FREEZE_WRITES = add_remedy(
    Remedy(
        name=FREEZE,
        usage=f"/db {FREEZE}",
        summary="stop the application's writes at the database (APP_ROLES start read only, "
        "their sessions reconnect); reads keep working",
        plan=plan_freeze,
        apply=apply_freeze,
        verify=verify_freeze,
        role="REVIEWER",
        approver_role="ADMIN",
        approvers=1,
        not_tried=_NOT_TRIED,
    )
)
UNFREEZE_WRITES = add_remedy(
    Remedy(
        name=UNFREEZE,
        usage=f"/db {UNFREEZE}",
        summary="lift a freeze: restore the application roles' previous settings exactly and "
        "end the sessions opened during it",
        plan=plan_unfreeze,
        apply=apply_unfreeze,
        verify=verify_unfreeze,
        role="REVIEWER",
        approver_role="ADMIN",
        approvers=1,
        not_tried=_NOT_TRIED,
    )
)

"""LEAPS roles: who a Slack user is in the LEAPS `users` table, matched by e-mail, and
`/db roles`, the state of roles and accounts as the bot's authorization depends on it.

The ranking is the documented order of the four roles, never the column's own order:
`ALTER TYPE "Role" ADD VALUE` appends a drifted value after SUPERADMIN, and a drifted
text column sorts ADMIN below PARTICIPANT, so `ORDER BY role DESC` would hand a
mis-cased duplicate account's unknown role, or the wrong one, to the bot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg import sql

from commands.base import (
    ROLES,
    Context,
    Finding,
    LeapsIdentity,
    Reader,
    Report,
    Row,
    Status,
    UsageError,
    register,
)
from commands.guards import Guard, guards_on
from commands.quota import Wanted, closest_handles, resolve_argument

_ROLE_BY_EMAIL_SQL = """
SELECT role::text AS role FROM users WHERE lower(email) = lower(%s)
ORDER BY array_position(%s::text[], role::text) DESC NULLS LAST, id LIMIT 1
"""


async def role_for_email(email: str, db: Reader) -> str | None:
    """The LEAPS role of the user with this e-mail (case-insensitive), or None."""
    rows = await db.fetch(_ROLE_BY_EMAIL_SQL, (email, list(ROLES)))
    return str(rows[0]["role"]) if rows else None


_IDENTITY_BY_EMAIL_SQL = """
SELECT id, role::text AS role FROM users WHERE lower(email) = lower(%s)
ORDER BY array_position(%s::text[], role::text) DESC NULLS LAST, id LIMIT 1
"""


async def identity_for_email(email: str, db: Reader) -> LeapsIdentity | None:
    """The LEAPS user with this e-mail (case-insensitive; the highest known role if
    several share it), or None."""
    rows = await db.fetch(_IDENTITY_BY_EMAIL_SQL, (email, list(ROLES)))
    return LeapsIdentity(str(rows[0]["id"]), str(rows[0]["role"])) if rows else None


# --- /db roles ----------------------------------------------------------------------

USAGE = "/db roles [@user|email|handle]"
STAFF = ("ADMIN", "SUPERADMIN")  # production's role-change guard lets only these act
LOOKUP_LIMIT = 10
# The passes over `users` cost enough at a million users for PostgreSQL to compile them
# with JIT, which takes longer than the passes: off for the survey's transaction only.
_TUNE_SQL = "SELECT set_config('jit', 'off', true)"

# The live type of users.role: the "Role" enum and its labels where it is one (drift adds
# labels), else whatever the column became (text on a hand-migrated database).
COLUMN_SQL = """
SELECT format_type(a.atttypid, a.atttypmod) AS type, t.typtype::text AS kind,
       a.attnotnull AS not_null,
       coalesce((SELECT array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
                   FROM pg_enum AS e WHERE e.enumtypid = a.atttypid), '{}') AS labels
FROM pg_attribute AS a
JOIN pg_type AS t ON t.oid = a.atttypid
WHERE a.attrelid = to_regclass('public.users') AND a.attname = 'role' AND NOT a.attisdropped
"""
# Grouped by the column's own value (an enum compares as a number), named after.
_DISTRIBUTION_SQL = """
SELECT role::text AS role, users FROM (SELECT role, count(*)::int AS users FROM users
                                        GROUP BY role) AS d
ORDER BY array_position(%s::text[], role::text) NULLS FIRST, 1
"""
# The accounts the overview lists (an invalid role, SUPERADMIN, no e-mail, no handle), in
# one pass over `users` rather than one per kind: each kind's first rows and its total.
# Cheap tests first: invalid roles are looked for only when the distribution shows some
# (`invalid`), and a blank value (spaces only) sorts below '!' byte by byte, which
# spares btrim() on nearly every row.
FLAGGED = ("invalid", "superadmins", "no_email", "no_handle")
_FLAGGED_SQL = """
WITH flagged AS MATERIALIZED (
  SELECT id, handle, email, role::text AS role, created_at,
         %(invalid)s AND (role IS NULL OR NOT (role::text = ANY(%(roles)s::text[]))) AS invalid,
         coalesce(role::text = 'SUPERADMIN', false) AS superadmin,
         email IS NULL OR btrim(email) = '' AS no_email,
         handle IS NULL OR btrim(handle) = '' AS no_handle
  FROM users
  WHERE (%(invalid)s AND (role IS NULL OR NOT (role::text = ANY(%(roles)s::text[]))))
     OR role::text = 'SUPERADMIN'
     OR email IS NULL OR (email COLLATE "C" < '!' AND btrim(email) = '')
     OR handle IS NULL OR (handle COLLATE "C" < '!' AND btrim(handle) = '')
), kinds AS (
  SELECT 'invalid' AS kind, f.* FROM flagged f WHERE f.invalid
  UNION ALL SELECT 'superadmins', f.* FROM flagged f WHERE f.superadmin
  UNION ALL SELECT 'no_email', f.* FROM flagged f WHERE f.no_email
  UNION ALL SELECT 'no_handle', f.* FROM flagged f WHERE f.no_handle
)
SELECT kind, id, handle, email, role, created_at, total FROM (
  SELECT k.*, count(*) OVER (PARTITION BY k.kind)::int AS total,
         row_number() OVER (
           PARTITION BY k.kind
           ORDER BY CASE WHEN k.kind = 'superadmins' THEN k.created_at END,
                    CASE WHEN k.kind <> 'superadmins' THEN k.created_at END DESC, k.id) AS n
  FROM kinds k) AS r
WHERE n <= %(limit)s
ORDER BY kind, n
"""
# Accounts one Slack e-mail matches once case is ignored: the bot (and `identity_for_email`)
# resolves such a person to the highest role among them. Such a group holds distinct
# addresses equal once trimmed and lower-cased, so while a unique index on users.email
# stands, at most one of them is already trimmed lower case: every group has an address
# that is not, and finds the one that is through that index. One pass keeps only the
# addresses not in that form (lower() on every row is the pass's whole cost); a hash of
# every lower-cased address, as without the index, spilled to disk at a million users.
# `unique` false reads them all instead.
_UNIQUE_EMAIL_SQL = """
SELECT EXISTS (
  SELECT 1 FROM pg_index AS i
  JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
  LEFT JOIN pg_collation AS co ON co.oid = i.indcollation[0]
  WHERE i.indrelid = to_regclass('users') AND i.indisunique AND i.indisvalid
    AND i.indnkeyatts = 1 AND i.indexprs IS NULL AND i.indpred IS NULL
    AND a.attname = 'email' AND coalesce(co.collisdeterministic, true)
) AS unique
"""
_CASE_DUPLICATES_SQL = """
WITH c AS MATERIALIZED (
  SELECT lower(btrim(email)) AS email, handle, coalesce(role::text, 'no role') AS role
  FROM users
  WHERE email IS NOT NULL AND btrim(email) <> ''
    AND (NOT %(unique)s OR email <> lower(btrim(email)))
), accounts AS MATERIALIZED (
  SELECT email, handle, role FROM c
  UNION ALL
  SELECT u.email, u.handle, coalesce(u.role::text, 'no role') FROM users AS u
  WHERE %(unique)s AND u.email IN (SELECT email FROM c)
), shared AS (
  SELECT email, count(*)::int AS accounts FROM accounts GROUP BY email HAVING count(*) > 1
), top AS (
  SELECT email, accounts FROM shared ORDER BY accounts DESC, email LIMIT %(limit)s
)
SELECT t.email, t.accounts, (SELECT count(*) FROM shared)::int AS total, a.handle, a.role
FROM top AS t JOIN accounts AS a ON a.email = t.email
ORDER BY t.accounts DESC, t.email, a.handle
"""
# Every case variant, not only the exact match (quota's lookup stops at the exact one, by
# the unique index): a second account under a mis-cased e-mail is what this must show.
_LOOKUP_SQL = """
SELECT id, handle, name, email, role::text AS role, created_at FROM users
WHERE {col} = %(value)s OR lower({col}) = lower(%(value)s)
ORDER BY {col} = %(value)s DESC, array_position(%(roles)s::text[], role::text) DESC NULLS LAST, id
LIMIT %(limit)s
"""


def refuse_nul(words: list[str]) -> None:
    """PostgreSQL text cannot hold NUL: said as a usage error, not a database error."""
    if any("\x00" in w for w in words):
        raise UsageError("a user is named without NUL characters: a mention, handle or e-mail")


def _total(rows: list[Row]) -> int:
    return int(rows[0]["total"]) if rows else 0


def _strip_total(rows: list[Row]) -> list[Row]:
    return [{k: v for k, v in r.items() if k != "total"} for r in rows]


def column_finding(column: Row | None) -> Finding:
    if column is None:
        return Finding(
            check="role column",
            status=Status.CRIT,
            summary="public.users has no role column: the bot cannot read LEAPS roles",
        )
    labels = [str(x) for x in column["labels"] or []]
    kind = "enum" if column["kind"] == "e" else "not an enum"
    extra = [x for x in labels if x not in ROLES]
    missing = [x for x in ROLES if labels and x not in labels]
    nullable = "" if column["not_null"] else "; NULL allowed"
    if column["kind"] != "e":
        return Finding(
            check="role column",
            status=Status.WARN,
            summary=f"users.role is {column['type']} ({kind}): any text is accepted as a "
            f"role{nullable}",
            hint='production declares it as the "Role" enum; see `/db migrations`',
        )
    if extra or missing or not column["not_null"]:
        parts = [f"users.role is {column['type']} with {', '.join(labels)}"]
        if extra:
            parts.append(f"{', '.join(extra)} added outside the four documented roles")
        if missing:
            parts.append(f"{', '.join(missing)} missing")
        return Finding(
            check="role column",
            status=Status.WARN,
            summary="; ".join(parts) + nullable,
            hint="the bot ranks unknown roles lowest; see `/db migrations` for drift",
        )
    return Finding(
        check="role column",
        status=Status.OK,
        summary=f"users.role is {column['type']}: {', '.join(labels)}, NOT NULL",
    )


def distribution_finding(rows: list[Row]) -> Finding:
    total = sum(int(r["users"]) for r in rows)
    shown = ", ".join(f"{r['role'] or 'no role'} {r['users']}" for r in rows) or "no users"
    return Finding(
        check="role distribution",
        status=Status.OK,
        summary=f"{total} users: {shown}",
        rows=[{"role": r["role"], "users": r["users"]} for r in rows],
    )


def invalid_finding(rows: list[Row]) -> Finding:
    n = _total(rows)
    if not n:
        return Finding(
            check="invalid roles",
            status=Status.OK,
            summary=f"every user holds one of {', '.join(ROLES)}",
        )
    values = sorted({str(r["role"]) if r["role"] is not None else "NULL" for r in rows})
    return Finding(
        check="invalid roles",
        status=Status.CRIT,
        summary=f"{n} users hold a role outside {', '.join(ROLES)} ({', '.join(values)}"
        + (", …" if n > len(rows) else "")
        + "): the application's checks and the bot treat them as the lowest role",
        rows=_strip_total(rows),
        hint="`/db set-role <handle> [<handle> ...] <ROLE>` (one approval for the list)",
    )


def superadmin_finding(rows: list[Row]) -> Finding:
    n = _total(rows)
    names = ", ".join(f"`{r['handle']}`" for r in rows)
    if n == 0:
        return Finding(
            check="superadmins",
            status=Status.CRIT,
            summary="no SUPERADMIN: nobody can grant ADMIN or SUPERADMIN through the application",
            hint="`/db set-role <handle> SUPERADMIN` (needs a SUPERADMIN approver in the bot's "
            "role map)",
        )
    if n == 1:
        return Finding(
            check="superadmins",
            status=Status.WARN,
            summary=f"one SUPERADMIN ({names}): losing that account locks everyone out of "
            "granting ADMIN; the database refuses to demote the last one",
            rows=_strip_total(rows),
            hint="`/db set-role <handle> SUPERADMIN` for a second, trusted person",
        )
    return Finding(
        check="superadmins",
        status=Status.OK,
        summary=f"{n} SUPERADMINs: {names}" + (", …" if n > len(rows) else ""),
        rows=_strip_total(rows),
    )


def guard_finding(guards: list[Guard]) -> Finding:
    role_guards = [g for g in guards if g.reads_role]
    if not role_guards:
        return Finding(
            check="role guard",
            status=Status.CRIT,
            summary="no enabled trigger on users reads app.user_role on UPDATE: any session "
            "can change anyone's role",
            hint="production has trg_validate_role_change; see `/db migrations`",
        )
    return Finding(
        check="role guard",
        status=Status.OK,
        summary="role changes meet " + "; ".join(g.describe() for g in role_guards),
    )


def case_duplicates_finding(rows: list[Row], total: int) -> Finding:
    """`rows`: one per shared e-mail (the most accounts first), with its `accounts` and
    `users` ("handle (ROLE), ..."), `roles` the distinct roles among them."""
    if not total:
        return Finding(
            check="e-mail case duplicates",
            status=Status.OK,
            summary="no two users share an e-mail once case is ignored",
        )
    mixed = sum(1 for r in rows if r["roles"] > 1)
    return Finding(
        check="e-mail case duplicates",
        status=Status.CRIT if mixed else Status.WARN,
        summary=f"{total} e-mails belong to several users once case is ignored (the unique "
        "index is case-sensitive); a person signing in with one is matched to the highest "
        "role among them"
        + (f"; {mixed} of those shown have accounts with different roles" if mixed else ""),
        rows=[{k: r[k] for k in ("email", "accounts", "users")} for r in rows],
        hint="merge or remove the duplicate account (a person's decision), then "
        "`/db set-role` if a role is wrong",
    )


async def case_duplicates(db: Reader, limit: int) -> tuple[list[Row], int]:
    (index,) = await db.fetch(_UNIQUE_EMAIL_SQL)
    found = await db.fetch(_CASE_DUPLICATES_SQL, {"unique": index["unique"], "limit": limit})
    by_email: dict[str, list[Row]] = {}
    for r in found:
        by_email.setdefault(str(r["email"]), []).append(r)
    rows = [
        {
            "email": email,
            "accounts": mine[0]["accounts"],
            "users": ", ".join(f"{a['handle']} ({a['role']})" for a in mine),
            "roles": len({a["role"] for a in mine}),
        }
        for email, mine in by_email.items()
    ]
    return rows, int(found[0]["total"]) if found else 0


def blank_finding(check: str, column: str, rows: list[Row], why: str) -> Finding:
    n = _total(rows)
    if not n:
        return Finding(check=check, status=Status.OK, summary=f"every user has a {column}")
    return Finding(
        check=check,
        status=Status.WARN,
        summary=f"{n} users have no {column}: {why}",
        rows=_strip_total(rows),
    )


@dataclass
class Survey:
    column: Row | None = None
    distribution: list[Row] = field(default_factory=list)
    invalid: list[Row] = field(default_factory=list)
    superadmins: list[Row] = field(default_factory=list)
    guards: list[Guard] = field(default_factory=list)
    duplicates: list[Row] = field(default_factory=list)
    duplicated_emails: int = 0
    no_email: list[Row] = field(default_factory=list)
    no_handle: list[Row] = field(default_factory=list)


async def survey_roles(db: Reader, limit: int) -> Survey:
    """Every query of the overview in one read-only transaction: three passes over
    `users` (the roles counted, the accounts listed, the shared e-mails), each a
    sequential read with no sort or hash of every row, and the catalog."""
    await db.fetch(_TUNE_SQL)
    columns = await db.fetch(COLUMN_SQL)
    s = Survey(column=columns[0] if columns else None)
    if s.column is None:
        return s
    roles = list(ROLES)
    s.distribution = await db.fetch(_DISTRIBUTION_SQL, (roles,))
    invalid = any(r["role"] not in ROLES for r in s.distribution)
    flagged: dict[str, list[Row]] = {kind: [] for kind in FLAGGED}
    params = {"roles": roles, "invalid": invalid, "limit": limit}
    for r in await db.fetch(_FLAGGED_SQL, params):
        kind = str(r.pop("kind"))
        if kind == "superadmins":
            del r["role"]
        flagged[kind].append(r)
    s.invalid, s.superadmins = flagged["invalid"], flagged["superadmins"]
    s.no_email, s.no_handle = flagged["no_email"], flagged["no_handle"]
    s.guards = await guards_on(db, ["users"], "UPDATE")
    s.duplicates, s.duplicated_emails = await case_duplicates(db, limit)
    return s


def overview(s: Survey) -> list[Finding]:
    if s.column is None:
        return [column_finding(None)]
    return [
        column_finding(s.column),
        distribution_finding(s.distribution),
        invalid_finding(s.invalid),
        superadmin_finding(s.superadmins),
        guard_finding(s.guards),
        case_duplicates_finding(s.duplicates, s.duplicated_emails),
        blank_finding(
            "users without e-mail",
            "e-mail",
            s.no_email,
            "the bot cannot match them to a Slack profile, and a sync that upserts by e-mail "
            "creates a second account",
        ),
        blank_finding(
            "users without handle",
            "handle",
            s.no_handle,
            "created outside the sign-up flow (which generates one); they cannot be named by "
            "handle and break profile links",
        ),
    ]


async def lookup(db: Reader, wanted: Wanted) -> list[Row]:
    """The users `wanted` names: the exact value first, then those equal once case is ignored."""
    query = sql.SQL(_LOOKUP_SQL).format(col=sql.Identifier(wanted.column)).as_string(None)
    return await db.fetch(
        query, {"value": wanted.value, "roles": list(ROLES), "limit": LOOKUP_LIMIT}
    )


def user_finding(wanted: Wanted, users: list[Row], candidates: list[Row]) -> Finding:
    if not users:
        close = ", ".join(f"`{c['handle']}`" for c in candidates)
        return Finding(
            check="user",
            status=Status.WARN,
            summary=f"no LEAPS user with {wanted.shown}"
            + (f"; closest handles: {close}" if close else "; no similar handle"),
            rows=candidates,
        )
    first = users[0]
    role = first["role"]
    status = Status.OK if role in ROLES else Status.CRIT
    summary = (
        f"`{first['handle']}` ({first['name'] or 'no name'}, {first['email']}) is "
        f"{role or 'without a role'}"
    )
    if role not in ROLES:
        summary += f"; not one of {', '.join(ROLES)}, so treated as the lowest role"
    if len(users) > 1:
        status = Status.CRIT if status is Status.CRIT else Status.WARN
        summary += f"; {len(users)} users match {wanted.shown} once case is ignored: " + ", ".join(
            f"`{u['handle']}` ({u['role']})" for u in users
        )
    return Finding(
        check="user",
        status=status,
        summary=summary,
        rows=users,
        hint=f"`/db set-role {first['handle']} <ROLE>` to change it",
    )


@register(
    "roles",
    usage=USAGE,
    summary="LEAPS role distribution, invalid roles, SUPERADMINs, account sync problems; "
    "one user's role",
)
async def roles(ctx: Context, args: list[str]) -> Report:
    words = [a for a in args if a.strip()]
    if len(words) > 1:
        raise UsageError("`roles` takes at most one user: a Slack mention, a handle or an e-mail")
    refuse_nul(words)
    gw = ctx.gateway
    if not words:
        state: dict[str, Survey] = {}

        async def survey(db: Reader) -> Finding:
            state["s"] = await survey_roles(db, ctx.thresholds.max_rows)
            return Finding(check="roles", status=Status.OK, summary="")

        head = await gw.run_check("roles", survey)
        findings = overview(state["s"]) if head.status is Status.OK else [head]
        return Report(title="LEAPS roles", target=gw.target, findings=findings).sorted()

    resolved = await resolve_argument(ctx, words)
    if isinstance(resolved, Finding):
        return Report(title="LEAPS role of one user", target=gw.target, findings=[resolved])
    wanted = resolved
    found: dict[str, list[Row]] = {}

    async def one(db: Reader) -> Finding:
        found["users"] = await lookup(db, wanted)
        found["candidates"] = [] if found["users"] else await closest_handles(db, wanted)
        return Finding(check="user", status=Status.OK, summary="")

    head = await gw.run_check("user", one)
    if head.status is not Status.OK:
        return Report(title="LEAPS role of one user", target=gw.target, findings=[head])
    finding = user_finding(wanted, found["users"], found["candidates"])
    return Report(title="LEAPS role of one user", target=gw.target, findings=[finding])

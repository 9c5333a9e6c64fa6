"""Production's guards as the live catalog shows them, for remedies that must pass them.

A remedy acts on LEAPS as the application does (DESIGN.md approval rule 8): production's
triggers refuse what the application would not do, and read who acts from the session
settings `app.user_id` / `app.user_role`. Which triggers exist, and what they read, is
read from `pg_trigger` / `pg_proc` on every plan, never assumed: production drifts. The
same catalog names the guard behind a refusal, since PostgreSQL reports a trigger's
RAISE only as "PL/pgSQL function f() line n" and a CHECK by its constraint name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial

from commands.audit_trail import AUDIT_INSERT
from commands.base import ELIDED, Context, LeapsIdentity, Reader, redact_literals

STAFF_ROLES = ("REVIEWER", "ADMIN", "SUPERADMIN")  # may change a submission's status
USER_ROLE_SETTING = "app.user_role"
USER_ID_SETTING = "app.user_id"

# tgtype bits (pg_trigger.h): 2 BEFORE, 4 INSERT, 8 DELETE, 16 UPDATE, 64 INSTEAD OF.
_TRIGGERS_SQL = """
SELECT c.relname::text AS "table", t.tgname::text AS trigger, p.proname::text AS function,
       t.tgenabled <> 'D' AS enabled,
       CASE WHEN t.tgtype & 2 <> 0 THEN 'BEFORE' WHEN t.tgtype & 64 <> 0 THEN 'INSTEAD OF'
            ELSE 'AFTER' END AS timing,
       array_remove(ARRAY[CASE WHEN t.tgtype & 4 <> 0 THEN 'INSERT' END,
                          CASE WHEN t.tgtype & 8 <> 0 THEN 'DELETE' END,
                          CASE WHEN t.tgtype & 16 <> 0 THEN 'UPDATE' END], NULL) AS events,
       position(%s in p.prosrc) > 0 AS reads_role,
       position(%s in p.prosrc) > 0 AS reads_user,
       p.prosrc ~* %s AS audits
FROM pg_trigger AS t
JOIN pg_class AS c ON c.oid = t.tgrelid
JOIN pg_proc AS p ON p.oid = t.tgfoid
WHERE NOT t.tgisinternal AND c.relname = ANY(%s)
  AND c.relnamespace = to_regnamespace('public')
ORDER BY c.relname, t.tgname
"""

_TRIGGERS_OF_FUNCTION_SQL = """
SELECT t.tgname::text AS trigger, c.relname::text AS "table"
FROM pg_trigger AS t
JOIN pg_class AS c ON c.oid = t.tgrelid
JOIN pg_proc AS p ON p.oid = t.tgfoid
WHERE NOT t.tgisinternal AND p.proname = %s
ORDER BY c.relname = %s DESC, t.tgname
"""

# The innermost PL/pgSQL frame of an error's CONTEXT: the function that raised.
_FUNCTION_FRAME = re.compile(r'PL/pgSQL function (?:"?[\w$]+"?\.)?"?([\w$]+)"?\(')


@dataclass(frozen=True)
class Guard:
    table: str
    trigger: str
    function: str
    enabled: bool
    timing: str
    events: tuple[str, ...]
    reads_role: bool
    reads_user: bool
    audits: bool = False  # writes audit_log rows (reads app.user_role for them, guards nothing)

    def describe(self) -> str:
        settings = ((USER_ROLE_SETTING, self.reads_role), (USER_ID_SETTING, self.reads_user))
        reads = [name for name, read in settings if read]
        return (
            f"{self.trigger} ({self.timing} {'/'.join(self.events)} on {self.table},"
            f" {self.function}()" + (f"; reads {', '.join(reads)}" if reads else "") + ")"
        )


async def guards_on(db: Reader, tables: list[str], event: str) -> list[Guard]:
    """The enabled triggers that fire on `event` (INSERT, UPDATE or DELETE) of `tables`."""
    rows = await db.fetch(_TRIGGERS_SQL, (USER_ROLE_SETTING, USER_ID_SETTING, AUDIT_INSERT, tables))
    guards = [
        Guard(
            table=str(r["table"]),
            trigger=str(r["trigger"]),
            function=str(r["function"]),
            enabled=bool(r["enabled"]),
            timing=str(r["timing"]),
            events=tuple(str(e) for e in r["events"] or ()),
            reads_role=bool(r["reads_role"]),
            reads_user=bool(r["reads_user"]),
            audits=bool(r["audits"]),
        )
        for r in rows
    ]
    return [g for g in guards if g.enabled and event in g.events]


def guard_note(guards: list[Guard], event: str) -> str | None:
    """One plan line naming the triggers the change will meet, or None when there are none.

    Read from the catalog only, so it claims no acceptance: whether they accept the change
    is the preflight's answer (DESIGN.md rule 10), shown on its own line of the plan.
    """
    if not guards:
        return None
    return f"the {event} will meet these triggers (tried below before approval): " + "; ".join(
        g.describe() for g in guards
    )


async def name_refusal(
    db: Reader, *, constraint: str | None, table: str | None, context: str | None
) -> str | None:
    """Which guard refused, from an error's diagnostics: a constraint by its name, a
    trigger's RAISE by the trigger(s) calling the function that raised."""
    if constraint:
        return f"constraint {constraint}" + (f" on {table}" if table else "")
    match = _FUNCTION_FRAME.search(context or "")
    if match is None:
        return None
    function = match.group(1)
    rows = await db.fetch(_TRIGGERS_OF_FUNCTION_SQL, (function, table or ""))
    if not rows:
        return f"function {function}()"
    triggers = ", ".join(f"{r['trigger']} on {r['table']}" for r in rows)
    return f"trigger {triggers} ({function}())"


_USER_SQL = "SELECT id, role::text AS role FROM users WHERE id = %s"


async def acting_notes(
    db: Reader, tables: list[str], event: str, service: LeapsIdentity | None
) -> list[str]:
    """What a plan says before approval about the guards its change meets and who it
    will act as, including when a guard will refuse it."""
    guards = await guards_on(db, tables, event)
    notes = [n for n in (guard_note(guards, event),) if n]
    who = (
        "acts as the approver's LEAPS account (matched by Slack e-mail) when it is "
        f"{', '.join(STAFF_ROLES)}, else as "
    )
    notes.append(who + (service.describe() if service else "nobody (no REMEDY_SERVICE_USER_ID)"))
    if service is not None and not await db.fetch(_USER_SQL, (service.user_id,)):
        notes.append(f"the service identity {service.user_id} is not a LEAPS user")
    role_guards = [g.trigger for g in guards if g.reads_role and not g.audits]
    if role_guards and (service is None or service.role not in STAFF_ROLES):
        notes.append(
            f"{', '.join(role_guards)} refuses this {event} unless {USER_ROLE_SETTING} is "
            f"{', '.join(STAFF_ROLES)}: "
            + (
                "without a service identity it runs only if an approver has such a LEAPS "
                "account; otherwise the database refuses it and nothing changes"
                if service is None
                else f"the service identity's role {service.role} is refused, so it runs "
                "only if an approver has such a LEAPS account"
            )
        )
    return notes


async def plan_notes(ctx: Context, tables: list[str], event: str) -> list[str]:
    """`acting_notes` in a read-only transaction of its own, for a plan that changes rows."""
    return await ctx.gateway.read(
        partial(acting_notes, tables=tables, event=event, service=ctx.service_identity)
    )


_EVENT_BITS = {"INSERT": 4, "DELETE": 8, "UPDATE": 16}
_TRIGGERS_READING_SQL = """
SELECT t.tgname::text AS trigger
FROM pg_trigger AS t
JOIN pg_class AS c ON c.oid = t.tgrelid
JOIN pg_proc AS p ON p.oid = t.tgfoid
WHERE NOT t.tgisinternal AND t.tgenabled <> 'D' AND c.relname = %s
  AND c.relnamespace = to_regnamespace('public')
  AND t.tgtype & %s <> 0 AND position(%s in p.prosrc) > 0
ORDER BY t.tgname
"""


async def triggers_reading(db: Reader, table: str, event: str, text: str) -> list[str]:
    """Enabled triggers on `table` firing on `event` whose function's source mentions
    `text` (a payload key, a setting): how a plan learns that a guard is live."""
    rows = await db.fetch(_TRIGGERS_READING_SQL, (table, _EVENT_BITS[event], text))
    return [str(r["trigger"]) for r in rows]


# --- the preflight (DESIGN.md rule 10) ----------------------------------------------

# Personal data in a database message: e-mails anywhere, the values of a `Key (...)=(...)`
# detail (unique and foreign key violations) and of a `Failing row contains (...)` one.
_EMAIL = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")
_KEY_VALUES = re.compile(r"(Key \([^)]*\)=)\((?:[^()]|\([^()]*\))*\)")
_FAILING_ROW = re.compile(r"(Failing row contains )\(.*\)", re.DOTALL)


def mask_personal(text: str) -> str:
    """A database message as a plan may show it: e-mails and the values of key and
    failing-row details shown as '…'. (A message is prose, not SQL: `redact_literals`
    would read an apostrophe as an opening quote and hide the rest.)"""
    text = _KEY_VALUES.sub(lambda m: f"{m.group(1)}({ELIDED})", text)
    text = _FAILING_ROW.sub(lambda m: f"{m.group(1)}({ELIDED})", text)
    return _EMAIL.sub(ELIDED, text)


# The tables this transaction inserted, updated or deleted rows of (pg_stat_xact_* counts
# the current transaction, rolled back or not), and the enabled triggers on them whose
# function's source mentions a way out of the database.
_CHANGED_TABLE_TRIGGERS_SQL = """
SELECT c.relname::text AS "table", t.tgname::text AS trigger, p.proname::text AS function,
       p.prosrc AS source
FROM pg_stat_xact_user_tables AS s
JOIN pg_class AS c ON c.oid = s.relid
JOIN pg_trigger AS t ON t.tgrelid = s.relid
JOIN pg_proc AS p ON p.oid = t.tgfoid
WHERE s.n_tup_ins + s.n_tup_upd + s.n_tup_del > 0
  AND NOT t.tgisinternal AND t.tgenabled <> 'D'
  AND p.prosrc ~* '(dblink|http|pg_net|net\\.)'
ORDER BY c.relname, t.tgname
"""
# Calls that leave the database: dblink's, the http extension's, pg_net's (net.http_*).
_CALL_OUT = re.compile(r"\b(dblink\w*|http(?:_\w+)?|net\.http_\w+)\s*\(", re.IGNORECASE)
_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)


def calls_out(source: str) -> str | None:
    """The first call out of the database in a function's source (string literals and
    comments aside: "must be http(s)" in a message is no call), or None."""
    code = _COMMENTS.sub(" ", redact_literals(source))
    found = _CALL_OUT.search(code)
    return found.group(1) if found else None


async def triggers_calling_out(db: Reader) -> list[str]:
    """Triggers on the tables the current transaction changed whose function calls out
    of the database (dblink, http, pg_net): what a rollback cannot take back, so a try
    that met one is inconclusive. Run inside the transaction, before it ends."""
    found = []
    for r in await db.fetch(_CHANGED_TABLE_TRIGGERS_SQL):
        call = calls_out(str(r["source"]))
        if call:
            found.append(f"{r['trigger']} on {r['table']} ({r['function']}() calls {call})")
    return found


_ACCOUNT_OF_ROLE_SQL = """
SELECT id FROM users WHERE role::text = %s ORDER BY created_at, id LIMIT 1
"""


async def account_holding(db: Reader, role: str) -> str | None:
    """One LEAPS account holding `role` (the oldest), read-only: whom a preflight names
    as reviewer when the requester has no staff account of their own."""
    rows = await db.fetch(_ACCOUNT_OF_ROLE_SQL, (role,))
    return str(rows[0]["id"]) if rows else None

"""The data-loss recovery steps of the operators' guide, each a remedy of its own:
`recover-users` (from audit_log), `rematch-kajabi` (events to users by case-insensitive
e-mail) and `recover-learn` (LEARN submissions from processed Kajabi events). Refreshing
the views and reconciling points reuse `refresh-views` and `reconcile-points`.

The guide's SQL assumes `action = 'user_created'` audit rows with `meta->>'user_id'`,
an e-mail at `payload->>'email'`, a `product_name` in every Kajabi payload, and ids and
defaults the database would fill in. Production writes audit rows in whatever format its
live trigger function has, and ids have no default. So every plan reads the live trigger
source (`pg_proc`) and the rows, says which format it found, generates the ids (derived
from the source row, so a second run finds them and plans nothing), and names every
column it writes.

Plans are bound to the rows they name (ids in the plan's data): a step approved after an
earlier one changed what is recoverable still changes exactly its planned rows, and what
became recoverable meanwhile is left to the next `/db recover`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from pydantic import BaseModel

from commands.base import BACKUP_SCHEMA, Context, Reader, Row, UsageError
from commands.guards import plan_notes
from commands.remedies.base import (
    DriftError,
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
    nothing_planned,
)
from commands.remedies.rowsets import (
    APPROVAL_PLACEHOLDER,
    SAMPLE,
    backup_display,
    backup_sql,
    plural,
    verify_backup_of,
)

RECOVER_USERS_NAME = "recover-users"
REMATCH_NAME = "rematch-kajabi"
RECOVER_LEARN_NAME = "recover-learn"
LEARN_ID_PREFIX = "rcv_learn_"
NO_USER = "NO_USER_FOUND"


def _no_args(name: str, args: list[str]) -> None:
    if [a for a in args if a.strip()]:
        raise UsageError(f"`{name}` takes no arguments")


async def _count(db: Reader | Writer, query: str, params: Any = ()) -> int:
    rows = await db.fetch(query, params)
    return int(rows[0]["n"]) if rows else 0


# --- recover-users ------------------------------------------------------------------

_AUDIT_FUNCTIONS_SQL = """
SELECT DISTINCT p.proname::text AS function, p.prosrc AS source
FROM pg_trigger AS t JOIN pg_proc AS p ON p.oid = t.tgfoid
WHERE NOT t.tgisinternal AND t.tgenabled <> 'D' AND t.tgrelid = to_regclass('users')
  AND position('audit_log' in p.prosrc) > 0
ORDER BY 1
"""
# `'<key>', to_jsonb(NEW)` and the like in a trigger function: the meta keys it writes.
_IMAGE_KEY = r"'(\w+)'\s*,\s*(?:to_jsonb|row_to_json|to_json)\(\s*{}\s*\)"
_LABEL_KEY = r"'(\w+)'\s*,\s*{}\b"
GUIDE_ACTION = "user_created"  # the guide's assumption: meta user_id, name, email, handle
ABSENT = "-"  # a meta key no row has: that format's part of the query finds nothing


class AuditFormat(BaseModel):
    """What the live audit trigger on users writes, and how many rows of each format."""

    function: str | None = None
    new_key: str = ABSENT  # meta key of the row after the change
    old_key: str = ABSENT  # meta key of the row before
    table_key: str = ABSENT  # meta key naming the table
    op_key: str = ABSENT  # meta key naming the operation
    image_rows: int = 0  # audit rows of users in that format
    guide_rows: int = 0  # rows with action 'user_created'

    def describe(self) -> str:
        if self.function is None:
            live = "no audit trigger function on users"
        elif self.new_key == ABSENT:
            live = f"the live audit function {self.function}() writes no row image"
        else:
            live = (
                f"the live audit function {self.function}() writes whole rows: meta "
                f"'{self.new_key}' / '{self.old_key}', table in '{self.table_key}', "
                f"operation in '{self.op_key}'"
            )
        return (
            f"{live}; audit_log holds {plural(self.image_rows, 'user row image')} in that "
            f"format and {plural(self.guide_rows, 'row')} of the guide's format "
            f"(action '{GUIDE_ACTION}', meta user_id/name/email/handle)"
        )


def _key(pattern: str, target: str, source: str) -> str:
    found = re.search(pattern.format(re.escape(target)), source, flags=re.IGNORECASE)
    return found.group(1) if found else ABSENT


async def audit_format(db: Reader) -> AuditFormat:
    fmt = AuditFormat()
    for row in await db.fetch(_AUDIT_FUNCTIONS_SQL):
        source = str(row["source"])
        new_key = _key(_IMAGE_KEY, "NEW", source)
        if fmt.function is None or (fmt.new_key == ABSENT and new_key != ABSENT):
            fmt = AuditFormat(
                function=str(row["function"]),
                new_key=new_key,
                old_key=_key(_IMAGE_KEY, "OLD", source),
                table_key=_key(_LABEL_KEY, "TG_TABLE_NAME", source),
                op_key=_key(_LABEL_KEY, "TG_OP", source),
            )
    (counted,) = await db.fetch(
        "SELECT count(*) FILTER (WHERE meta ->> %s = 'users'"
        "   AND (meta ? %s OR meta ? %s)) AS images,"
        " count(*) FILTER (WHERE action = %s) AS guide FROM audit_log",
        (fmt.table_key, fmt.new_key, fmt.old_key, GUIDE_ACTION),
    )
    return fmt.model_copy(
        update={"image_rows": int(counted["images"]), "guide_rows": int(counted["guide"])}
    )


# Every user an audit row shows, latest row per id; `missing` are those not in users.
_USER_IMAGES = """
WITH img AS (
  SELECT a.id AS audit_id, a.created_at AS audit_at,
         upper(coalesce(a.meta ->> %(op)s, split_part(a.action, '_', 1))) AS op,
         coalesce(a.meta -> %(new)s, a.meta -> %(old)s) AS img
  FROM audit_log AS a
  WHERE a.meta ->> %(tbl)s = 'users' AND (a.meta ? %(new)s OR a.meta ? %(old)s)
  UNION ALL
  SELECT a.id, a.created_at, 'INSERT',
         jsonb_strip_nulls(jsonb_build_object('id', a.meta ->> 'user_id',
           'name', a.meta ->> 'name', 'email', a.meta ->> 'email',
           'handle', a.meta ->> 'handle'))
  FROM audit_log AS a WHERE a.action = %(guide)s
), latest AS (
  SELECT DISTINCT ON (img ->> 'id') img ->> 'id' AS id, audit_id, audit_at, op, img
  FROM img WHERE img ->> 'id' IS NOT NULL
  ORDER BY img ->> 'id', audit_at DESC, audit_id DESC
), missing AS (
  SELECT l.* FROM latest AS l WHERE NOT EXISTS (SELECT 1 FROM users AS u WHERE u.id = l.id)
), taken AS (
  SELECT m.id FROM missing AS m JOIN users AS u ON lower(u.email) = lower(m.img ->> 'email')
  UNION SELECT m.id FROM missing AS m JOIN users AS u ON u.handle = m.img ->> 'handle'
  UNION SELECT m.id FROM missing AS m
        JOIN users AS u ON u.kajabi_contact_id = m.img ->> 'kajabi_contact_id'
  UNION SELECT m.id FROM missing AS m JOIN users AS u ON u.ref_code = m.img ->> 'ref_code'
), judged AS (
  SELECT m.*, CASE WHEN m.op = 'DELETE' THEN 'deleted'
                   WHEN m.id IN (SELECT id FROM taken) THEN 'taken'
                   ELSE 'recoverable' END AS verdict
  FROM missing AS m
)"""

_USERS_SURVEY_SQL = _USER_IMAGES + "\nSELECT verdict, count(*) AS n FROM judged GROUP BY verdict"
_USERS_GROUPS_SQL = (
    _USER_IMAGES  # noqa: S608 (constant fragments of this module)
    + "\nSELECT ARRAY(SELECT jsonb_object_keys(img) ORDER BY 1) AS keys,"
    " array_agg(id ORDER BY id) AS ids FROM judged WHERE verdict = 'recoverable'"
    " GROUP BY 1 ORDER BY 1"
)
_USERS_SAMPLE_SQL = (
    _USER_IMAGES + "\nSELECT id, img ->> 'handle' AS handle, verdict, audit_id, audit_at"
    " FROM judged ORDER BY verdict DESC, id LIMIT %(sample)s"
)
_USERS_RECOUNT_SQL = (
    _USER_IMAGES
    + "\nSELECT count(*) AS n FROM judged WHERE verdict = 'recoverable' AND id = ANY(%(ids)s)"
)

_USER_COLUMNS_SQL = """
SELECT a.attname::text AS name FROM pg_attribute AS a
WHERE a.attrelid = to_regclass('users') AND a.attnum > 0 AND NOT a.attisdropped
  AND a.attgenerated = ''
ORDER BY a.attnum
"""
# Single-column foreign keys of users onto users (referred_by_user_id in LEAPS).
_SELF_REFS_SQL = """
SELECT a.attname::text AS name FROM pg_constraint AS c
JOIN pg_attribute AS a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
WHERE c.contype = 'f' AND c.conrelid = to_regclass('users') AND c.confrelid = c.conrelid
  AND array_length(c.conkey, 1) = 1
"""


class UserGroup(BaseModel):
    columns: list[str]  # live columns the audit rows of this group hold
    ids: list[str]


class RecoverUsersData(BaseModel):
    format: AuditFormat
    groups: list[UserGroup]
    self_refs: list[str]

    @property
    def ids(self) -> list[str]:
        return [i for g in self.groups for i in g.ids]


def _params(fmt: AuditFormat, **more: Any) -> dict[str, Any]:
    return {
        "op": fmt.op_key,
        "new": fmt.new_key,
        "old": fmt.old_key,
        "tbl": fmt.table_key,
        "guide": GUIDE_ACTION,
        **more,
    }


def insert_users_sql(group: UserGroup, self_refs: list[str]) -> sql.Composed:
    """The audit row's values, typed by the live table (`jsonb_populate_record`); columns
    the row does not hold take the table's default; a reference to a user who neither
    exists nor comes back with this step is left empty rather than refused."""

    def value(col: str) -> sql.Composable:
        ref = sql.SQL("r.{}").format(sql.Identifier(col))
        if col not in self_refs:
            return ref
        return sql.SQL(
            "CASE WHEN {r} = ANY(%(all_ids)s) OR EXISTS (SELECT 1 FROM users AS x"
            " WHERE x.id = {r}) THEN {r} END"
        ).format(r=ref)

    return sql.SQL(
        _USER_IMAGES  # noqa: S608 (constant fragments; identifiers composed)
        + "\nINSERT INTO users ({cols})"
        " SELECT {vals} FROM judged AS j, jsonb_populate_record(NULL::users, j.img) AS r"
        " WHERE j.verdict = 'recoverable' AND j.id = ANY(%(ids)s) ORDER BY j.id"
    ).format(
        cols=sql.SQL(", ").join(map(sql.Identifier, group.columns)),
        vals=sql.SQL(", ").join(value(c) for c in group.columns),
    )


async def plan_recover_users(ctx: Context, args: list[str]) -> Plan:
    _no_args(RECOVER_USERS_NAME, args)

    async def survey(
        db: Reader,
    ) -> tuple[AuditFormat, dict[str, int], list[Row], list[Row], list[str], list[str]]:
        fmt = await audit_format(db)
        verdicts = {
            str(r["verdict"]): int(r["n"]) for r in await db.fetch(_USERS_SURVEY_SQL, _params(fmt))
        }
        groups = await db.fetch(_USERS_GROUPS_SQL, _params(fmt))
        sample = await db.fetch(_USERS_SAMPLE_SQL, _params(fmt, sample=SAMPLE))
        columns = [str(r["name"]) for r in await db.fetch(_USER_COLUMNS_SQL)]
        refs = [str(r["name"]) for r in await db.fetch(_SELF_REFS_SQL)]
        return fmt, verdicts, groups, sample, columns, refs

    fmt, verdicts, raw_groups, targets, columns, refs = await ctx.gateway.read(survey)
    groups: list[UserGroup] = []
    dropped: set[str] = set()
    for g in raw_groups:
        keys = {str(k) for k in g["keys"]}
        dropped |= keys - set(columns)
        groups.append(
            UserGroup(columns=[c for c in columns if c in keys], ids=[str(i) for i in g["ids"]])
        )
    data = RecoverUsersData(format=fmt, groups=groups, self_refs=refs)
    n = len(data.ids)
    warnings = [f"audit format found: {fmt.describe()}"]
    if verdicts.get("deleted"):
        warnings.append(
            f"{plural(verdicts['deleted'], 'user')} whose latest audit row is a DELETE "
            "(removed through the application) are not brought back"
        )
    if verdicts.get("taken"):
        warnings.append(
            f"{plural(verdicts['taken'], 'user')} whose e-mail, handle, Kajabi contact or "
            "ref code another user now holds are left to a person"
        )
    if dropped:
        warnings.append(f"audit keys with no live column are not written: {sorted(dropped)}")
    if any("id" not in g.columns for g in groups):
        raise UsageError("an audit row image has no id; the bot will not invent user ids")
    if n:
        warnings += await plan_notes(ctx, ["users"], "INSERT")
    steps = [
        PlanStep(
            sql=_USERS_RECOUNT_SQL.strip(), params=["<the planned ids>"], note=f"recounts: {n}"
        )
    ]
    steps += [
        PlanStep(
            sql=insert_users_sql(g, refs).as_string(),
            params=[f"<{plural(len(g.ids), 'planned id')}>"],
            note=f"{len(g.ids)} rows with the columns {', '.join(g.columns)}",
        )
        for g in groups
    ]
    return Plan(
        remedy=RECOVER_USERS_NAME,
        args=list(args),
        title="Recover users from audit_log",
        summary=(
            f"insert {plural(n, 'user')} missing from users, each as its latest audit row "
            "shows it (same id; columns the row lacks take their defaults); nothing is "
            "overwritten, so there is no backup"
            if n
            else "every user audit_log shows is in users (or was deleted on purpose, or "
            "clashes with a user now there); nothing to do"
        ),
        steps=steps,
        targets=targets,
        count=n,
        warnings=warnings,
        needs_approval=n > 0,
        locks=LockScope(relations=["users"]),
        data=data.model_dump(mode="json"),
    )


async def apply_recover_users(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(RecoverUsersData)
    if plan.count == 0:
        return Outcome(ok=True, summary="no user to recover; nothing was changed")
    fmt = await audit_format(writer)
    if (fmt.new_key, fmt.old_key, fmt.table_key) != (
        data.format.new_key,
        data.format.old_key,
        data.format.table_key,
    ):
        raise RemedyAbort("drift: the live audit format changed since the plan; request it again")
    ids = data.ids
    now = await _count(writer, _USERS_RECOUNT_SQL, _params(fmt, ids=ids))
    if now != plan.count:
        raise DriftError("recoverable users", plan.count, now, 0)
    inserted = 0
    for group in data.groups:
        inserted += await writer.execute(
            insert_users_sql(group, data.self_refs), _params(fmt, ids=group.ids, all_ids=ids)
        )
    check_count(plan, inserted, "users")
    rows = await writer.fetch(
        "SELECT id, handle, role::text AS role, created_at FROM users WHERE id = ANY(%s)"
        " ORDER BY id LIMIT %s",
        (ids, SAMPLE),
    )
    return Outcome(
        ok=True,
        summary=f"recovered {plural(inserted, 'user')} from audit_log ({data.format.describe()})",
        affected=inserted,
        rows=rows,
    )


async def verify_recover_users(db: Reader, plan: Plan, run: Execution) -> Verification:
    if (trivial := nothing_planned(plan)) is not None:
        return trivial
    ids = plan.private(RecoverUsersData).ids
    n = await _count(db, "SELECT count(*) AS n FROM users WHERE id = ANY(%s)", (ids,))
    return Verification(landed=n == plan.count, found=f"{n} of the {plan.count} users exist")


# --- rematch-kajabi -----------------------------------------------------------------

# Where an event's e-mail is: the column, Kajabi's contact object, or the guide's key.
EVENT_EMAIL = (
    "lower(btrim(coalesce(nullif(btrim(e.email), ''), e.payload -> 'contact' ->> 'email',"
    " e.payload ->> 'email')))"
)
# Which events a re-match looks at (constant conditions on `e`, chosen by key):
# `rematch-kajabi` every processed event not linked to an existing user, `rematch-emails`
# (webhooks) the events the webhook matcher marked NO_USER_FOUND.
REMATCH_SCOPES = {
    "unmatched": "e.processed_at IS NOT NULL"
    " AND (e.user_match IS NULL OR e.user_match = %(none)s"
    " OR NOT EXISTS (SELECT 1 FROM users AS x WHERE x.id = e.user_match))",
    "no_user_found": "e.user_match = %(none)s",
}


def email_sources_sql(scope: str) -> str:
    """How many events of `scope` carry an e-mail in each place `EVENT_EMAIL` reads."""
    return f"""
SELECT count(*) FILTER (WHERE nullif(btrim(e.email), '') IS NOT NULL) AS email_column,
       count(*) FILTER (WHERE e.payload -> 'contact' ->> 'email' IS NOT NULL) AS contact_email,
       count(*) FILTER (WHERE e.payload ->> 'email' IS NOT NULL) AS payload_email,
       count(*) AS events
FROM kajabi_events AS e WHERE {REMATCH_SCOPES[scope]}
"""  # noqa: S608 (constant fragments of this module)


def rematch_sql_for(scope: str, tail: str) -> str:
    """`m`: each event of `scope` with the users its e-mail matches (`matches`, and the
    one `user_id` when there is one), followed by `tail`."""
    return f"""
WITH ev AS (
  SELECT e.id, e.event_id, e.user_match, {EVENT_EMAIL} AS mail
  FROM kajabi_events AS e
  WHERE {REMATCH_SCOPES[scope]}
), m AS (
  SELECT ev.id, ev.event_id, ev.user_match, ev.mail, min(u.id) AS user_id,
         min(u.email) AS user_email, count(u.id) AS matches
  FROM ev LEFT JOIN users AS u ON lower(u.email) = ev.mail
  GROUP BY ev.id, ev.event_id, ev.user_match, ev.mail
)
{tail}"""  # noqa: S608 (constant fragments of this module)


REMATCH_SURVEY_TAIL = (
    "SELECT count(*) FILTER (WHERE matches = 1) AS one,"
    " count(*) FILTER (WHERE matches > 1) AS many, count(*) FILTER (WHERE matches = 0) AS none"
    " FROM m"
)
_REMATCH_PAIRS_TAIL = "SELECT id, user_id FROM m WHERE matches = 1 ORDER BY id"
_REMATCH_SAMPLE_TAIL = (
    "SELECT id, event_id, user_match AS was, user_id AS now FROM m"
    " WHERE matches = 1 ORDER BY id LIMIT %(sample)s"
)
_REMATCH_RECOUNT_TAIL = (
    "SELECT count(*) AS n FROM m JOIN unnest(%(ids)s::text[], %(users)s::text[])"
    " AS p(i, u) ON p.i = m.id AND p.u = m.user_id WHERE m.matches = 1"
)


@dataclass(frozen=True)
class RematchKind:
    """What distinguishes one re-match remedy from another: its name and scope."""

    name: str
    scope: str  # a key of REMATCH_SCOPES
    title: str
    events: str  # "processed Kajabi event"
    was: str  # what user_match holds now, for the summary


REMATCH_KAJABI_KIND = RematchKind(
    REMATCH_NAME,
    "unmatched",
    "Re-match Kajabi events to users by e-mail",
    "processed Kajabi event",
    f"now '{NO_USER}', empty or a user who no longer exists",
)


class RematchData(BaseModel):
    ids: list[str]
    users: list[str]  # the user each event is matched to, in the order of ids
    scope: str = "unmatched"  # a key of REMATCH_SCOPES


def rematch_sql(backup: sql.Identifier) -> sql.Composed:
    return sql.SQL(
        "UPDATE kajabi_events AS e SET user_match = p.u"
        " FROM unnest(%s::text[], %s::text[]) AS p(i, u), {} AS b"
        " WHERE e.id = p.i AND b.id = e.id"
    ).format(backup)


async def plan_rematch(ctx: Context, args: list[str]) -> Plan:
    return await plan_rematch_kind(ctx, args, REMATCH_KAJABI_KIND)


async def plan_rematch_kind(ctx: Context, args: list[str], kind: RematchKind) -> Plan:
    _no_args(kind.name, args)
    params = {"none": NO_USER, "sample": SAMPLE}

    async def survey(db: Reader) -> tuple[Row, Row, list[Row], list[Row]]:
        sources = (await db.fetch(email_sources_sql(kind.scope), params))[0]
        counted = (await db.fetch(rematch_sql_for(kind.scope, REMATCH_SURVEY_TAIL), params))[0]
        pairs = await db.fetch(rematch_sql_for(kind.scope, _REMATCH_PAIRS_TAIL), params)
        sample = (
            await db.fetch(rematch_sql_for(kind.scope, _REMATCH_SAMPLE_TAIL), params)
            if pairs
            else []
        )
        return sources, counted, pairs, sample

    sources, counted, pairs, targets = await ctx.gateway.read(survey)
    data = RematchData(
        ids=[str(p["id"]) for p in pairs],
        users=[str(p["user_id"]) for p in pairs],
        scope=kind.scope,
    )
    n = len(data.ids)
    warnings = [
        f"e-mail format found in the {kind.events}s it looks at ({kind.was}): "
        f"the email column in {sources['email_column']}, payload.contact.email in "
        f"{sources['contact_email']}, payload.email (the guide's key) in "
        f"{sources['payload_email']} of {sources['events']}; read in that order, compared "
        "lower-case with users.email lower-case"
    ]
    if int(counted["many"]):
        warnings.append(
            f"{plural(int(counted['many']), 'event')} match several users by e-mail and are "
            "left to a person"
        )
    backup = sql.Identifier(BACKUP_SCHEMA, f"{APPROVAL_PLACEHOLDER}_kajabi_events")
    return Plan(
        remedy=kind.name,
        args=list(args),
        title=kind.title,
        summary=(
            f"set user_match of {plural(n, kind.events)} ({kind.was}) to the one user "
            f"whose e-mail matches case-insensitively; {int(counted['none'])} still match "
            "nobody"
            if n
            else f"no {kind.events} ({kind.was}) matches exactly one user by e-mail; nothing to do"
        ),
        steps=[
            PlanStep(
                sql="SELECT id FROM kajabi_events WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                params=["<the planned ids>"],
                note=f"locks; then recounts: {n}",
            ),
            PlanStep(
                sql=backup_sql("kajabi_events", backup).as_string(),
                params=["<the planned ids>"],
                note="whole rows, before the change",
            ),
            PlanStep(
                sql=rematch_sql(backup).as_string(),
                params=["<the planned ids>", "<their users>"],
                note="the count must match the plan",
            ),
        ],
        targets=targets,
        count=n,
        backup=f"whole rows copied first into {backup_display('kajabi_events')}" if n else None,
        warnings=warnings,
        needs_approval=n > 0,
        locks=LockScope(relations=["kajabi_events"]),
        data=data.model_dump(mode="json"),
    )


async def apply_rematch(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(RematchData)
    if plan.count == 0:
        return Outcome(ok=True, summary="no event to re-match; nothing was changed")
    locked = await writer.fetch(
        "SELECT id FROM kajabi_events WHERE id = ANY(%s) ORDER BY id FOR UPDATE", (data.ids,)
    )
    now = await _count(
        writer,
        rematch_sql_for(data.scope, _REMATCH_RECOUNT_TAIL),
        {"none": NO_USER, "ids": data.ids, "users": data.users},
    )
    if len(locked) != plan.count or now != plan.count:
        raise DriftError("events still matching their planned user", plan.count, now, 0)
    backup = await writer.backup_table("kajabi_events")
    copied = await writer.execute(backup_sql("kajabi_events", backup), (data.ids,))
    if copied != plan.count:
        raise RowCountError("events copied to the backup", plan.count, copied)
    updated = await writer.execute(rematch_sql(backup), (data.ids, data.users))
    check_count(plan, updated, "Kajabi events")
    rows = await writer.fetch(
        sql.SQL(
            "SELECT e.id, e.event_id, b.user_match AS was, e.user_match AS now"
            " FROM kajabi_events AS e JOIN {} AS b ON b.id = e.id ORDER BY e.id LIMIT {}"
        ).format(backup, sql.Literal(SAMPLE))
    )
    return Outcome(
        ok=True,
        summary=f"re-matched {plural(updated, 'Kajabi event')} to their user by e-mail; the "
        f"previous rows are in {backup.as_string()}",
        affected=updated,
        backed_up=copied,
        backup_table=backup.as_string(),
        rows=rows,
    )


# --- recover-learn ------------------------------------------------------------------

_LEARN_TAGS_SQL = """
SELECT DISTINCT lower(btrim(tag_name::text)) AS tag FROM learn_tag_grants ORDER BY 1
"""
EVENT_TAG = (
    "lower(btrim(coalesce(e.tag_name_norm::text, e.tag_name_raw, e.payload -> 'tag' ->> 'name')))"
)
# One processed LEARN-tag event per existing user without a live LEARN submission
# (PENDING or APPROVED: the partial unique index and the single-attempt guard allow no
# second one); the earliest event, as it awarded the LEARN.
_LEARN = f"""
WITH ev AS (
  SELECT DISTINCT ON (u.id) e.id AS event_row, e.event_id, u.id AS user_id,
         e.processed_at, e.tag_name_raw, e.payload
  FROM kajabi_events AS e JOIN users AS u ON u.id = e.user_match
  WHERE e.processed_at IS NOT NULL AND {EVENT_TAG} = ANY(%(tags)s)
  ORDER BY u.id, e.processed_at, e.id
), due AS (
  SELECT ev.* FROM ev
  WHERE NOT EXISTS (SELECT 1 FROM submissions AS s WHERE s.user_id = ev.user_id
                    AND s.activity_code = 'LEARN' AND s.status IN ('PENDING', 'APPROVED'))
    AND NOT EXISTS (SELECT 1 FROM submissions AS s WHERE s.id = %(prefix)s || ev.event_row)
)"""  # noqa: S608 (constant fragments of this module)
_LEARN_PAIRS_SQL = _LEARN + "\nSELECT event_row, user_id FROM due ORDER BY event_row"
_LEARN_SAMPLE_SQL = (
    _LEARN + "\nSELECT event_row AS kajabi_event, event_id, user_id, processed_at FROM due"
    " ORDER BY event_row LIMIT %(sample)s"
)
_LEARN_RECOUNT_SQL = (
    _LEARN + "\nSELECT count(*) AS n FROM due JOIN unnest(%(ids)s::text[], %(users)s::text[])"
    " AS p(i, u) ON p.i = due.event_row AND p.u = due.user_id"
)
_COLUMN_TYPE_SQL = """
SELECT tn.nspname::text AS schema, t.typname::text AS type
FROM pg_attribute AS a JOIN pg_type AS t ON t.oid = a.atttypid
JOIN pg_namespace AS tn ON tn.oid = t.typnamespace
WHERE a.attrelid = to_regclass('submissions') AND a.attname = %s AND NOT a.attisdropped
"""
_PRODUCT_PAYLOAD_SQL = """
SELECT count(*) FILTER (WHERE payload ? 'product_name') AS product_name,
       count(*) FILTER (WHERE payload ? 'certificate_url') AS certificate_url,
       count(*) AS events
FROM kajabi_events WHERE processed_at IS NOT NULL
"""


class LearnRecoveryData(BaseModel):
    tags: list[str]
    ids: list[str]  # kajabi_events.id
    users: list[str]


def insert_learn_sql(status_type: sql.Identifier, visibility_type: sql.Identifier) -> sql.Composed:
    """An APPROVED LEARN named after its event (`rcv_learn_<event row id>`), reviewed by
    whom the remedy acts as; payload keys pass the live CHECK and URL guards: a course
    name always (the payload's product_name, else the Kajabi tag), a certificate URL only
    when it is http(s)."""
    return sql.SQL(
        "INSERT INTO submissions (id, user_id, activity_code, status, visibility, payload,"
        " reviewer_id, review_note, created_at, updated_at) "
        + _LEARN
        + "\nSELECT %(prefix)s || d.event_row, d.user_id, 'LEARN', %(status)s::{st},"
        " %(visibility)s::{vt}, jsonb_strip_nulls(jsonb_build_object("
        "'course_name', coalesce(nullif(btrim(d.payload ->> 'product_name'), ''),"
        " nullif(btrim(d.tag_name_raw), ''), 'LEARN'),"
        " 'certificate_url', CASE WHEN d.payload ->> 'certificate_url'"
        " ~* '^https?://[^[:space:]]+$' THEN d.payload ->> 'certificate_url' END,"
        " 'recovery_source', 'kajabi_webhook', 'kajabi_event_id', d.event_id,"
        " 'recovered_by', 'dbops-bot', 'approval', %(approval)s::text)),"
        " %(reviewer)s,"
        " 'Recovered by dbops-bot from Kajabi event ' || coalesce(d.event_id, d.event_row),"
        " d.processed_at, now() AT TIME ZONE 'UTC'"
        " FROM due AS d JOIN unnest(%(ids)s::text[], %(users)s::text[]) AS p(i, u)"
        " ON p.i = d.event_row AND p.u = d.user_id ORDER BY d.event_row"
    ).format(st=status_type, vt=visibility_type)


async def _type_of(db: Reader | Writer, column: str) -> sql.Identifier:
    rows = await db.fetch(_COLUMN_TYPE_SQL, (column,))
    if not rows:
        raise UsageError(f"submissions.{column} does not exist; nothing can be recovered")
    return sql.Identifier(str(rows[0]["schema"]), str(rows[0]["type"]))


async def learn_tags(db: Reader) -> list[str]:
    if not (await db.fetch("SELECT to_regclass('learn_tag_grants') IS NOT NULL AS yes"))[0]["yes"]:
        return []
    return [str(r["tag"]) for r in await db.fetch(_LEARN_TAGS_SQL)]


async def plan_recover_learn(ctx: Context, args: list[str]) -> Plan:
    _no_args(RECOVER_LEARN_NAME, args)

    async def survey(db: Reader) -> tuple[list[str], list[Row], list[Row], Row]:
        tags = await learn_tags(db)
        if not tags:
            return tags, [], [], {}
        params = {"tags": tags, "prefix": LEARN_ID_PREFIX, "sample": SAMPLE}
        pairs = await db.fetch(_LEARN_PAIRS_SQL, params)
        sample = await db.fetch(_LEARN_SAMPLE_SQL, params) if pairs else []
        payload = (await db.fetch(_PRODUCT_PAYLOAD_SQL))[0]
        return tags, pairs, sample, payload

    tags, pairs, targets, payload = await ctx.gateway.read(survey)
    if not tags:
        raise UsageError(
            "learn_tag_grants holds no tag, so the bot cannot tell which Kajabi events "
            "complete LEARN; it will not guess"
        )
    data = LearnRecoveryData(
        tags=tags,
        ids=[str(p["event_row"]) for p in pairs],
        users=[str(p["user_id"]) for p in pairs],
    )
    n = len(data.ids)
    warnings = [
        f"LEARN tags read from learn_tag_grants: {', '.join(tags)}; Kajabi payload format: "
        f"product_name (the guide's course name) in {payload['product_name']} and "
        f"certificate_url in {payload['certificate_url']} of {payload['events']} processed "
        "events, so the course name is the product_name, else the tag",
        "the inserted submissions are APPROVED and name the identity the remedy acts as as "
        "reviewer; their ledger awards are `/db reconcile-points`'s, next",
    ]
    if n:
        warnings += await plan_notes(ctx, ["submissions"], "INSERT")
    return Plan(
        remedy=RECOVER_LEARN_NAME,
        args=list(args),
        title="Recover LEARN submissions from processed Kajabi events",
        summary=(
            f"insert {plural(n, 'APPROVED LEARN submission')} (id "
            f"'{LEARN_ID_PREFIX}<event id>') for users whose processed LEARN-tag event has no "
            "PENDING or APPROVED LEARN submission; nothing is overwritten, so there is no backup"
            if n
            else "every user with a processed LEARN-tag Kajabi event has a live LEARN "
            "submission; nothing to do"
        ),
        steps=[
            PlanStep(
                sql=_LEARN_RECOUNT_SQL.strip(),
                params=["<tags>", "<planned events>"],
                note=f"recounts: {n}",
            ),
            PlanStep(
                sql=insert_learn_sql(
                    sql.Identifier("<status type>"), sql.Identifier("<visibility type>")
                ).as_string(),
                params=["APPROVED", "PRIVATE", APPROVAL_PLACEHOLDER, "<acting identity>"],
                note="the count must match the plan",
            ),
        ],
        targets=targets,
        count=n,
        warnings=warnings,
        needs_approval=n > 0,
        locks=LockScope(relations=["submissions"]),
        data=data.model_dump(mode="json"),
    )


async def apply_recover_learn(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(LearnRecoveryData)
    if plan.count == 0:
        return Outcome(ok=True, summary="no LEARN submission to recover; nothing was changed")
    if writer.identity is None:
        raise RemedyAbort(
            "an APPROVED submission names its reviewer, and no LEAPS identity could be "
            "named (an approver's staff account or REMEDY_SERVICE_USER_ID); nothing was changed"
        )
    params = {
        "tags": data.tags,
        "prefix": LEARN_ID_PREFIX,
        "ids": data.ids,
        "users": data.users,
    }
    now = await _count(writer, _LEARN_RECOUNT_SQL, params)
    if now != plan.count:
        raise DriftError("recoverable LEARN submissions", plan.count, now, 0)
    inserted = await writer.execute(
        insert_learn_sql(await _type_of(writer, "status"), await _type_of(writer, "visibility")),
        {
            **params,
            "status": "APPROVED",
            "visibility": "PRIVATE",
            "approval": writer.approval_id,
            "reviewer": writer.identity.user_id,
        },
    )
    check_count(plan, inserted, "LEARN submissions")
    rows = await writer.fetch(
        "SELECT id, user_id, status::text AS status, payload ->> 'course_name' AS course_name"
        " FROM submissions WHERE id = ANY(%s) ORDER BY id LIMIT %s",
        ([LEARN_ID_PREFIX + i for i in data.ids], SAMPLE),
    )
    return Outcome(
        ok=True,
        summary=f"recovered {plural(inserted, 'APPROVED LEARN submission')} from processed "
        "Kajabi events; `/db reconcile-points` awards their points",
        affected=inserted,
        rows=rows,
    )


async def verify_recover_learn(db: Reader, plan: Plan, run: Execution) -> Verification:
    if (trivial := nothing_planned(plan)) is not None:
        return trivial
    ids = [LEARN_ID_PREFIX + i for i in plan.private(LearnRecoveryData).ids]
    n = await _count(db, "SELECT count(*) AS n FROM submissions WHERE id = ANY(%s)", (ids,))
    return Verification(
        landed=n == plan.count, found=f"{n} of the {plan.count} recovered submissions exist"
    )


RECOVER_USERS = add_remedy(
    Remedy(
        name=RECOVER_USERS_NAME,
        usage="/db recover-users",
        summary="insert users missing from users as their latest audit_log row shows them",
        plan=plan_recover_users,
        apply=apply_recover_users,
        verify=verify_recover_users,
        approver_role="ADMIN",
        approvers=1,
    )
)
REMATCH_KAJABI = add_remedy(
    Remedy(
        name=REMATCH_NAME,
        usage="/db rematch-kajabi",
        summary="link unmatched processed Kajabi events to the user with their e-mail "
        "(case-insensitive; backed up)",
        plan=plan_rematch,
        apply=apply_rematch,
        verify=verify_backup_of("kajabi_events"),
        approver_role="ADMIN",
        approvers=1,
    )
)
RECOVER_LEARN = add_remedy(
    Remedy(
        name=RECOVER_LEARN_NAME,
        usage="/db recover-learn",
        summary="insert the APPROVED LEARN submissions that processed Kajabi events prove",
        plan=plan_recover_learn,
        apply=apply_recover_learn,
        verify=verify_recover_learn,
        approver_role="ADMIN",
        approvers=1,
    )
)

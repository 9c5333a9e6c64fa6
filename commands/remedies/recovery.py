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

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

from psycopg import sql
from psycopg.types.json import Jsonb
from pydantic import BaseModel, Field

from commands.audit_trail import Op, audit_trail, image_key, label_key
from commands.base import BACKUP_SCHEMA, ROLES, Context, Reader, Row, UsageError, role_rank
from commands.guards import plan_notes
from commands.keyranges import Piece, block_pieces, key_pieces, no_jit, run_pieces
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
    sample_first,
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


async def audit_note(db: Reader, writes: list[tuple[str, Op]]) -> str | None:
    """The plan's `audit`: which path LEAPS's audit rows of these writes take and why;
    None when no live audit trigger covers them."""
    trail = await audit_trail(db)
    return trail.plan_note() if any(trail.audited(t, op) for t, op in writes) else None


# --- recover-users ------------------------------------------------------------------

_AUDIT_FUNCTIONS_SQL = """
SELECT DISTINCT p.proname::text AS function, p.prosrc AS source
FROM pg_trigger AS t JOIN pg_proc AS p ON p.oid = t.tgfoid
WHERE NOT t.tgisinternal AND t.tgenabled <> 'D' AND t.tgrelid = to_regclass('users')
  AND position('audit_log' in p.prosrc) > 0
ORDER BY 1
"""
GUIDE_ACTION = "user_created"  # the guide's assumption: meta user_id, name, email, handle
ABSENT = "-"  # a meta key no row has: that format's part of the query finds nothing
KEEP_ROLES = "--keep-roles"
INCLUDE_DELETED = "--include-deleted"
ROLE_COLUMN = "role"
LEAST_ROLE = ROLES[0]  # PARTICIPANT: what the guide restores everyone as
LISTED = 10  # ids named in a warning


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


async def audit_keys(db: Reader) -> AuditFormat:
    """The live audit function's format (its keys), without counting its rows."""
    fmt = AuditFormat()
    for row in await db.fetch(_AUDIT_FUNCTIONS_SQL):
        source = str(row["source"])
        new_key = image_key(source, "NEW", ABSENT)
        if fmt.function is None or (fmt.new_key == ABSENT and new_key != ABSENT):
            fmt = AuditFormat(
                function=str(row["function"]),
                new_key=new_key,
                old_key=image_key(source, "OLD", ABSENT),
                table_key=label_key(source, "TG_TABLE_NAME", ABSENT),
                op_key=label_key(source, "TG_OP", ABSENT),
            )
    return fmt


# audit_log read in pieces of blocks (commands/keyranges.py): each piece counts its rows
# of either format and names those whose user is missing from users (`candidates`):
# every audit row of a missing user is one, so `_USER_IMAGES` among the candidates
# finds exactly the missing users, their latest rows and verdicts that it finds among
# all rows, without sorting every user's images.
_IMAGE_ROW = "a.meta ->> %(tbl)s = 'users' AND (a.meta ? %(new)s OR a.meta ? %(old)s)"
_AUDIT_PIECE_SQL = f"""
WITH r AS MATERIALIZED (
  SELECT a.id, ({_IMAGE_ROW}) AS image, a.action = %(guide)s AS guide,
         coalesce(a.meta -> %(new)s, a.meta -> %(old)s) ->> 'id' AS image_id,
         a.meta ->> 'user_id' AS guide_id
  FROM audit_log AS a WHERE {{rows}} AND (({_IMAGE_ROW}) OR a.action = %(guide)s)
)
SELECT count(*) FILTER (WHERE r.image) AS images, count(*) FILTER (WHERE r.guide) AS guide,
       ARRAY(SELECT r.id FROM r
             WHERE (r.image AND r.image_id IS NOT NULL
                    AND NOT EXISTS (SELECT 1 FROM users AS u WHERE u.id = r.image_id))
                OR (r.guide AND r.guide_id IS NOT NULL
                    AND NOT EXISTS (SELECT 1 FROM users AS u WHERE u.id = r.guide_id)))
         AS candidates
FROM r
"""  # noqa: S608 (constant fragments of this module)


@dataclass(frozen=True)
class AuditSurvey:
    """The audit format with its rows counted, and the audit rows of missing users."""

    format: AuditFormat
    candidates: list[str]


async def survey_audit(ctx: Context) -> AuditSurvey:
    """The live format, then audit_log piece by piece: its rows of each format counted,
    and the audit rows of users missing from users (commands/keyranges.py)."""

    async def keys(db: Reader) -> tuple[AuditFormat, list[Piece]]:
        await no_jit(db)
        return await audit_keys(db), await block_pieces(db, "audit_log")

    fmt, pieces = await ctx.gateway.read(keys)
    params = _params(fmt)

    async def read(db: Reader, piece: Piece) -> Row:
        query = _AUDIT_PIECE_SQL.format(rows=piece.where("ctid"))
        return (await db.fetch(query, {**params, **piece.params()}))[0]

    images = guide = 0
    candidates: list[str] = []
    for row in await run_pieces(ctx.gateway, pieces, read):
        images += int(row["images"] or 0)
        guide += int(row["guide"] or 0)
        candidates += [str(c) for c in row["candidates"] or []]
    counted = fmt.model_copy(update={"image_rows": images, "guide_rows": guide})
    return AuditSurvey(counted, candidates)


# Every user an audit row shows, latest row per id; `missing` are those not in users.
# Rows of one id with equal times (one transaction's now()) are ordered by what they do,
# a DELETE after an UPDATE after an INSERT, then by their id, so the same rows always
# give the same image. A user whose latest row is a DELETE was removed on purpose
# (`deleted`), unless deleted after %(since)s (`--include-deleted`: the latest baseline).
_USER_IMAGES = """
WITH img AS (
  SELECT a.id AS audit_id, a.created_at AS audit_at,
         upper(coalesce(a.meta ->> %(op)s, split_part(a.action, '_', 1))) AS op,
         coalesce(a.meta -> %(new)s, a.meta -> %(old)s) AS img
  FROM audit_log AS a
  WHERE a.meta ->> %(tbl)s = 'users' AND (a.meta ? %(new)s OR a.meta ? %(old)s){among}
  UNION ALL
  SELECT a.id, a.created_at, 'INSERT',
         jsonb_strip_nulls(jsonb_build_object('id', a.meta ->> 'user_id',
           'name', a.meta ->> 'name', 'email', a.meta ->> 'email',
           'handle', a.meta ->> 'handle'))
  FROM audit_log AS a WHERE a.action = %(guide)s{among}
), latest AS (
  SELECT DISTINCT ON (img ->> 'id') img ->> 'id' AS id, audit_id, audit_at, op, img
  FROM img WHERE img ->> 'id' IS NOT NULL
  ORDER BY img ->> 'id', audit_at DESC,
           CASE op WHEN 'DELETE' THEN 3 WHEN 'UPDATE' THEN 2 WHEN 'INSERT' THEN 1 ELSE 0 END
             DESC, audit_id DESC
), missing AS (
  SELECT l.* FROM latest AS l WHERE NOT EXISTS (SELECT 1 FROM users AS u WHERE u.id = l.id)
), taken AS (
  SELECT m.id FROM missing AS m JOIN users AS u ON lower(u.email) = lower(m.img ->> 'email')
  UNION SELECT m.id FROM missing AS m JOIN users AS u ON u.handle = m.img ->> 'handle'
  UNION SELECT m.id FROM missing AS m
        JOIN users AS u ON u.kajabi_contact_id = m.img ->> 'kajabi_contact_id'
  UNION SELECT m.id FROM missing AS m JOIN users AS u ON u.ref_code = m.img ->> 'ref_code'
), judged AS (
  SELECT m.*, CASE WHEN m.op = 'DELETE'
                        AND NOT coalesce(m.audit_at > %(since)s::timestamp, false)
                   THEN 'deleted'
                   WHEN m.id IN (SELECT id FROM taken) THEN 'taken'
                   ELSE 'recoverable' END AS verdict
  FROM missing AS m
)"""
_AMONG = " AND a.id = ANY(%(audit_ids)s::text[])"


def _user_images(among: bool) -> str:
    """`_USER_IMAGES` over every audit row, or `among` the candidates (`audit_ids`)."""
    return _USER_IMAGES.replace("{among}", _AMONG if among else "")


# Every missing user once, judged, with what the plan shows of it; `id_rank` is the
# user's place by id in the database's own order (its collation).
_USERS_JUDGED_TAIL = (
    "\nSELECT id, op, audit_at, audit_id, verdict, img ->> 'handle' AS handle,"
    " img ->> 'role' AS role, ARRAY(SELECT jsonb_object_keys(img) ORDER BY 1) AS keys,"
    " ARRAY(SELECT img ->> c FROM unnest(%(refs)s::text[]) AS c) AS refs,"
    " row_number() OVER (ORDER BY id) AS id_rank FROM judged"
)
_USERS_JUDGED_SQL = _user_images(True) + _USERS_JUDGED_TAIL

# What `--include-deleted` would add: deleted after the baseline, and no clash.
_USERS_DELETED_AFTER_SQL = (
    _user_images(True)
    + "\nSELECT count(*) AS n FROM judged WHERE verdict = 'recoverable' AND op = 'DELETE'"
)
# Reads (and so recounts) the images of the planned users, which the INSERT then takes.
_USERS_READ_SQL = (
    _user_images(False)
    + "\nSELECT id, img FROM judged WHERE verdict = 'recoverable' AND id = ANY(%(ids)s)"
    " ORDER BY id"
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
ORDER BY 1
"""


class UserGroup(BaseModel):
    columns: list[str]  # live columns the audit rows of this group hold
    ids: list[str]


class RecoverUsersData(BaseModel):
    format: AuditFormat
    # One INSERT each, in this order: referrers come before the users who name them.
    groups: list[UserGroup]
    self_refs: list[str]
    # Values that replace the image's ({"role": "PARTICIPANT"} unless --keep-roles).
    override: dict[str, str] = Field(default_factory=dict)
    # --include-deleted: users deleted after this moment (UTC, the latest baseline's
    # time) come back too; None: a latest DELETE keeps a user away.
    since: datetime | None = None

    @property
    def ids(self) -> list[str]:
        return [i for g in self.groups for i in g.ids]


def _params(fmt: AuditFormat, since: datetime | None = None, **more: Any) -> dict[str, Any]:
    return {
        "op": fmt.op_key,
        "new": fmt.new_key,
        "old": fmt.old_key,
        "tbl": fmt.table_key,
        "guide": GUIDE_ACTION,
        "since": since,
        **more,
    }


def insert_users_sql(group: UserGroup, self_refs: list[str]) -> sql.Composed:
    """The audit rows' images (read and recounted first, in the same transaction), typed
    by the live table (`jsonb_populate_record`) after the plan's overrides (the role);
    columns an image does not hold take the table's default; a reference to a user who
    neither exists nor comes back with this step is left empty rather than refused."""

    def value(col: str) -> sql.Composable:
        ref = sql.SQL("r.{}").format(sql.Identifier(col))
        if col not in self_refs:
            return ref
        return sql.SQL(
            "CASE WHEN {r} = ANY(%(all_ids)s) OR EXISTS (SELECT 1 FROM users AS x"
            " WHERE x.id = {r}) THEN {r} END"
        ).format(r=ref)

    return sql.SQL(
        "INSERT INTO users ({cols})\nSELECT {vals}\n"
        "FROM jsonb_array_elements(%(images)s::jsonb) WITH ORDINALITY AS j(img, n),\n"
        "     jsonb_populate_record(NULL::users, j.img || %(override)s::jsonb) AS r\n"
        "ORDER BY j.n RETURNING id"
    ).format(
        cols=sql.SQL(", ").join(map(sql.Identifier, group.columns)),
        vals=sql.SQL(", ").join(value(c) for c in group.columns),
    )


def insert_order(
    columns: Mapping[str, tuple[str, ...]], referrers: Mapping[str, set[str]]
) -> list[UserGroup]:
    """The INSERTs, one per set of columns, ordered so that a user's referrer is in an
    earlier INSERT or the same one (a foreign key is checked at the end of a statement):
    each round takes, per set of columns, the users whose referrers are all in already
    or come along in this set. A referral cycle across sets would never be free: it
    is inserted as it is, and the database says no."""
    left = set(columns)
    groups: list[UserGroup] = []
    kinds = sorted(set(columns.values()))
    while left:
        progressed = False
        for kind in kinds:
            batch = {i for i in left if columns[i] == kind}
            while True:  # drop those waiting for a referrer neither in nor in this batch
                waiting = {i for i in batch if referrers[i] & left - batch}
                if not waiting:
                    break
                batch -= waiting
            if batch:
                groups.append(UserGroup(columns=list(kind), ids=sorted(batch)))
                left -= batch
                progressed = True
        if not progressed:
            for kind in kinds:
                stuck = sorted(i for i in left if columns[i] == kind)
                if stuck:
                    groups.append(UserGroup(columns=list(kind), ids=stuck))
            break
    return groups


async def _latest_unflagged_baseline_at(ctx: Context) -> datetime | None:
    """When the latest unflagged baseline was taken (UTC, naive like
    audit_log.created_at), by the database's own clock where it kept it; or None. A
    flagged baseline (its counts fell: it may hold the damage) never counts here."""
    if ctx.baselines is None:
        return None
    base = await ctx.baselines.latest(ctx.gateway.target)
    if base is None:
        return None
    return (base.db_now or base.taken_at).astimezone(UTC).replace(tzinfo=None)


async def deleted_on_purpose(ctx: Context) -> int:
    """Users whose latest audit row is a DELETE made after the latest baseline and who
    could come back (no clash with a user now there): what `/db recover-users
    --include-deleted` restores beyond `/db recover-users`. 0 without a baseline."""
    since = await _latest_unflagged_baseline_at(ctx)
    if since is None:
        return 0

    audit = await survey_audit(ctx)
    if not audit.candidates:
        return 0

    async def count(db: Reader) -> int:
        await no_jit(db)
        params = _params(audit.format, since, audit_ids=audit.candidates)
        return await _count(db, _USERS_DELETED_AFTER_SQL, params)

    return await ctx.gateway.read(count)


def _parse_users_args(args: list[str]) -> tuple[bool, bool]:
    words = [a.strip() for a in args if a.strip()]
    unknown = [w for w in words if w not in (KEEP_ROLES, INCLUDE_DELETED)]
    if unknown:
        raise UsageError(
            f"`{RECOVER_USERS_NAME}` takes `{KEEP_ROLES}` and `{INCLUDE_DELETED}`, "
            f"not `{unknown[0]}`"
        )
    return KEEP_ROLES in words, INCLUDE_DELETED in words


def _users_steps(data: RecoverUsersData) -> list[PlanStep]:
    n = len(data.ids)
    steps = [
        PlanStep(
            sql=insert_users_sql(g, data.self_refs).as_string(),
            params=[
                f"<the images of {plural(len(g.ids), 'planned user')}, read by the last step>",
                data.override,
                "<the planned ids>",
            ],
            note=f"INSERT {k} of {len(data.groups)}: {plural(len(g.ids), 'user')} with the "
            f"columns {', '.join(g.columns)}; the count must match the plan",
        )
        for k, g in enumerate(data.groups, start=1)
    ]
    steps.append(
        PlanStep(
            sql=_USERS_READ_SQL.strip(),
            params=["<the audit format's keys>", "<the planned ids>"],
            note=f"runs first: reads the planned users' images and recounts them: {n}",
        )
    )
    return steps


def _restored_as(data: RecoverUsersData, image_role: Any) -> str:
    return data.override.get(ROLE_COLUMN) or (str(image_role) if image_role else "(default)")


_VERDICT_ORDER = {"recoverable": 0, "deleted": 1}


def _judged(
    judged: list[Row], baseline: datetime | None
) -> tuple[dict[str, Row], list[Row], list[Row], list[Row]]:
    """From the judged missing users (each with its rank by id in the database's order):
    per verdict the users and those deleted after `baseline`; the recoverable ones by id;
    the sample (recoverable, deleted, the rest; by id) and the deleted ones shown (latest
    first), as the plan shows them."""
    verdicts: dict[str, Row] = {}
    for r in judged:
        v = verdicts.setdefault(str(r["verdict"]), {"verdict": r["verdict"], "n": 0, "after": 0})
        v["n"] += 1
        if r["op"] == "DELETE" and baseline is not None and r["audit_at"] > baseline:
            v["after"] += 1
    by_id = sorted(judged, key=lambda r: int(r["id_rank"]))
    rows = [r for r in by_id if r["verdict"] == "recoverable"]
    sample = sorted(by_id, key=lambda r: _VERDICT_ORDER.get(str(r["verdict"]), 2))[:SAMPLE]
    targets = [
        {
            "id": r["id"],
            "handle": r["handle"],
            "image_role": r["role"],
            "verdict": r["verdict"],
            "latest": r["op"],
            "audit_id": r["audit_id"],
            "audit_at": r["audit_at"],
        }
        for r in sample
    ]
    deleted = sorted(
        (r for r in by_id if r["verdict"] == "deleted"), key=lambda r: r["audit_at"], reverse=True
    )[:SAMPLE]
    return verdicts, rows, targets, deleted


async def plan_recover_users(ctx: Context, args: list[str]) -> Plan:
    keep_roles, include_deleted = _parse_users_args(args)
    baseline = await _latest_unflagged_baseline_at(ctx)
    if include_deleted and baseline is None:
        raise UsageError(
            f"`{INCLUDE_DELETED}` restores users deleted after the latest baseline, and "
            "there is no baseline yet; nothing to compare with, so nothing is planned"
        )
    since = baseline if include_deleted else None

    surveyed = await survey_audit(ctx)
    fmt = surveyed.format

    async def survey(db: Reader) -> tuple[list[Row], list[str], list[str]]:
        await no_jit(db)
        refs = [str(r["name"]) for r in await db.fetch(_SELF_REFS_SQL)]
        params = _params(fmt, since, refs=refs, audit_ids=surveyed.candidates)
        judged = await db.fetch(_USERS_JUDGED_SQL, params) if surveyed.candidates else []
        columns = [str(r["name"]) for r in await db.fetch(_USER_COLUMNS_SQL)]
        return judged, columns, refs

    judged, columns, refs = await ctx.gateway.read(survey)
    verdicts, rows, targets, deleted = _judged(judged, baseline)
    override = {} if keep_roles or ROLE_COLUMN not in columns else {ROLE_COLUMN: LEAST_ROLE}
    kinds: dict[str, tuple[str, ...]] = {}
    referrers: dict[str, set[str]] = {}
    dropped: set[str] = set()
    for r in rows:
        keys = {str(k) for k in r["keys"]} | set(override)
        dropped |= keys - set(columns)
        kinds[str(r["id"])] = tuple(c for c in columns if c in keys)
        referrers[str(r["id"])] = {str(i) for i in r["refs"] if i is not None}
    planned = set(kinds)
    referrers = {i: (refs_ & planned) - {i} for i, refs_ in referrers.items()}
    data = RecoverUsersData(
        format=fmt,
        groups=insert_order(kinds, referrers),
        self_refs=refs,
        override=override,
        since=since,
    )
    if any("id" not in g.columns for g in data.groups):
        raise UsageError("an audit row image has no id; the bot will not invent user ids")
    n = len(data.ids)
    image_roles = Counter(str(r["role"] or "(none)") for r in rows)
    above = sorted(
        (role for role in image_roles if role_rank(role) > role_rank(LEAST_ROLE)), key=role_rank
    )
    targets = [  # the image's role and the role restored, side by side
        {
            "id": t["id"],
            "handle": t["handle"],
            "image_role": t["image_role"],
            "restored_as": (
                _restored_as(data, t["image_role"]) if t["verdict"] == "recoverable" else "-"
            ),
            "verdict": t["verdict"],
            "latest": t["latest"],
            "audit_at": t["audit_at"],
            "audit_id": t["audit_id"],
        }
        for t in targets
    ]
    warnings = [f"audit format found: {fmt.describe()}"]
    if n and override:
        warnings.append(
            f"every user comes back as {LEAST_ROLE}, as the guide restores them; their "
            f"imaged roles: {_roles_text(image_roles)}"
            + (f"; `/db {RECOVER_USERS_NAME} {KEEP_ROLES}` restores those" if above else "")
            + (" (it needs a SUPERADMIN approver)" if above else "")
        )
    elif n:
        warnings.append(
            f"{KEEP_ROLES}: every user comes back with their imaged role: "
            f"{_roles_text(image_roles)}"
            + (
                f"; {', '.join(above)} above {LEAST_ROLE}, so a SUPERADMIN approves"
                if above
                else ""
            )
        )
    deleted_n = int(verdicts["deleted"]["n"]) if "deleted" in verdicts else 0
    after = int(verdicts["deleted"]["after"]) if "deleted" in verdicts else 0
    if deleted_n:
        listed = ", ".join(f"{d['id']} ({d['audit_at']:%Y-%m-%d %H:%M})" for d in deleted[:LISTED])
        more = f" and {deleted_n - LISTED} more" if deleted_n > LISTED else ""
        line = (
            f"{plural(deleted_n, 'user')} whose latest audit row is a DELETE were deleted on "
            f"purpose and are not brought back: {listed}{more}"
        )
        if after and not include_deleted and baseline is not None:
            line += (
                f"; {after} of them were deleted after the {baseline:%Y-%m-%d %H:%M} UTC "
                f"baseline: `/db {RECOVER_USERS_NAME} {INCLUDE_DELETED}` restores those"
            )
        warnings.append(line)
    if include_deleted and since is not None:
        back = sum(1 for r in targets if r["verdict"] == "recoverable" and r["latest"] == "DELETE")
        warnings.append(
            f"{INCLUDE_DELETED}: users deleted after the {since:%Y-%m-%d %H:%M} UTC baseline "
            f"(the latest) come back too{f', {back} of the rows shown' if back else ''}"
        )
    if verdicts.get("taken"):
        warnings.append(
            f"{plural(int(verdicts['taken']['n']), 'user')} whose e-mail, handle, Kajabi "
            "contact or ref code another user now holds are left to a person"
        )
    if dropped:
        warnings.append(f"audit keys with no live column are not written: {sorted(dropped)}")
    if len(data.groups) > 1 and refs:
        warnings.append(
            f"{len(data.groups)} INSERTs, referrers ({', '.join(refs)}) before the users who "
            "name them"
        )
    audit = None
    if n:
        warnings += await plan_notes(ctx, ["users"], "INSERT")
        audit = await ctx.gateway.read(partial(audit_note, writes=[("users", "INSERT")]))
    superadmin = keep_roles and bool(above)
    return Plan(
        remedy=RECOVER_USERS_NAME,
        args=list(args),
        title="Recover users from audit_log",
        summary=(
            f"insert {plural(n, 'user')} missing from users, each as its latest audit row "
            "shows it (same id; columns the row lacks take their defaults), "
            + (f"as {LEAST_ROLE}" if override else "with their imaged roles")
            + "; nothing is overwritten, so there is no backup"
            if n
            else "every user audit_log shows is in users (or was deleted on purpose, or "
            "clashes with a user now there); nothing to do"
        ),
        steps=_users_steps(data),
        targets=targets,
        count=n,
        warnings=warnings,
        needs_approval=n > 0,
        locks=LockScope(relations=["users"]),
        approver_role="SUPERADMIN" if superadmin else None,
        data=data.model_dump(mode="json"),
        audit=audit,
    )


def _roles_text(roles: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(roles.items(), key=lambda kv: role_rank(kv[0])))


def sample_recover_users(plan: Plan, n: int) -> Plan:
    """The first n users in INSERT order (so referrers before those who name them)."""
    if plan.count <= n:
        return plan
    data = plan.private(RecoverUsersData)
    keep = set(data.ids[:n])
    groups = [
        UserGroup(columns=g.columns, ids=[i for i in g.ids if i in keep]) for g in data.groups
    ]
    cut = data.model_copy(update={"groups": [g for g in groups if g.ids]})
    return plan.model_copy(
        update={
            "count": len(keep),
            "steps": _users_steps(cut),
            "targets": [t for t in plan.targets if t.get("id") in keep],
            "data": cut.model_dump(mode="json"),
        }
    )


async def apply_recover_users(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(RecoverUsersData)
    if plan.count == 0:
        return Outcome(ok=True, summary="no user to recover; nothing was changed")
    fmt = await audit_keys(writer)
    if (fmt.new_key, fmt.old_key, fmt.table_key) != (
        data.format.new_key,
        data.format.old_key,
        data.format.table_key,
    ):
        raise RemedyAbort("drift: the live audit format changed since the plan; request it again")
    ids = data.ids
    read = await writer.fetch(_USERS_READ_SQL, _params(fmt, data.since, ids=ids))
    if len(read) != plan.count:
        raise DriftError("recoverable users", plan.count, len(read), 0)
    images = {str(r["id"]): r["img"] for r in read}
    inserted: list[str] = []
    for group in data.groups:
        got = await writer.fetch(
            insert_users_sql(group, data.self_refs),
            {
                "images": Jsonb([images[i] for i in group.ids]),
                "override": Jsonb(data.override),
                "all_ids": ids,
            },
        )
        inserted += [str(r["id"]) for r in got]
    check_count(plan, len(inserted), "users")
    await writer.audit.after(writer, "users", "INSERT", inserted)
    rows = await writer.fetch(
        "SELECT id, handle, role::text AS role, created_at FROM users WHERE id = ANY(%s)"
        " ORDER BY id LIMIT %s",
        (ids, SAMPLE),
    )
    return Outcome(
        ok=True,
        summary=f"recovered {plural(len(inserted), 'user')} from audit_log"
        + (f" as {data.override[ROLE_COLUMN]}" if ROLE_COLUMN in data.override else "")
        + f" ({data.format.describe()})",
        affected=len(inserted),
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
# (webhooks) the events the webhook matcher marked NO_USER_FOUND (`/db webhooks`: those
# of them it counted, by id, while they are few).
REMATCH_SCOPES = {
    "unmatched": "e.processed_at IS NOT NULL"
    " AND (e.user_match IS NULL OR e.user_match = %(none)s"
    " OR NOT EXISTS (SELECT 1 FROM users AS x WHERE x.id = e.user_match))",
    "no_user_found": "e.user_match = %(none)s",
    "no_user_found_ids": "e.id = ANY(%(ids)s::text[]) AND e.user_match = %(none)s",
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


_REMATCH_PAIRS_TAIL = "SELECT id, user_id FROM m WHERE matches = 1 ORDER BY id"
_REMATCH_SAMPLE_TAIL = (
    "SELECT id, event_id, user_match AS was, user_id AS now FROM m"
    " WHERE matches = 1 ORDER BY id LIMIT %(sample)s"
)
_REMATCH_RECOUNT_TAIL = (
    "SELECT count(*) AS n FROM m JOIN unnest(%(ids)s::text[], %(users)s::text[])"
    " AS p(i, u) ON p.i = m.id AND p.u = m.user_id WHERE m.matches = 1"
)


# REMATCH_SCOPES as the plan reads them (FROM … WHERE): a user who no longer exists as
# an anti-join (users.id is unique, so the join adds no row), which runs in parallel,
# where the correlated NOT EXISTS probed a hash of a million user ids from one process
# (2.6 s against 1.2 s at 1,000,000 users).
_PLAN_SCOPES = {
    "unmatched": "kajabi_events AS e LEFT JOIN users AS x ON x.id = e.user_match"
    " WHERE e.processed_at IS NOT NULL"
    " AND (e.user_match IS NULL OR e.user_match = %(none)s OR x.id IS NULL)",
    "no_user_found": "kajabi_events AS e WHERE " + REMATCH_SCOPES["no_user_found"],
}


def rematch_plan_sql(scope: str) -> str:
    """The plan's one read of the events of `scope`: `email_sources_sql`'s counts and
    those of events matching one user, several and none on every row, beside each event
    that matches exactly one user (`_REMATCH_PAIRS_TAIL`, by id; one row of counts alone
    when none does)."""
    return f"""
WITH ev AS MATERIALIZED (
  SELECT e.id, e.event_id, e.user_match, {EVENT_EMAIL} AS mail,
         nullif(btrim(e.email), '') IS NOT NULL AS has_column,
         e.payload -> 'contact' ->> 'email' IS NOT NULL AS has_contact,
         e.payload ->> 'email' IS NOT NULL AS has_payload
  FROM {_PLAN_SCOPES[scope]}
), m AS MATERIALIZED (
  SELECT ev.id, ev.event_id, ev.user_match, min(u.id) AS user_id, count(u.id) AS matches
  FROM ev LEFT JOIN users AS u ON lower(u.email) = ev.mail
  GROUP BY ev.id, ev.event_id, ev.user_match, ev.mail
)
SELECT t.*, p.id, p.event_id, p.user_match AS was, p.user_id
FROM (SELECT count(*) FILTER (WHERE ev.has_column) AS email_column,
             count(*) FILTER (WHERE ev.has_contact) AS contact_email,
             count(*) FILTER (WHERE ev.has_payload) AS payload_email,
             count(*) AS events,
             (SELECT count(*) FROM m WHERE m.matches = 1) AS one,
             (SELECT count(*) FROM m WHERE m.matches > 1) AS many,
             (SELECT count(*) FROM m WHERE m.matches = 0) AS none
      FROM ev) AS t
LEFT JOIN LATERAL (SELECT m.* FROM m WHERE m.matches = 1 ORDER BY m.id) AS p ON true
"""  # noqa: S608 (constant fragments of this module)


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

    async def survey(db: Reader) -> list[Row]:
        await no_jit(db)
        return await db.fetch(rematch_plan_sql(kind.scope), params)

    found = await ctx.gateway.read(survey)
    sources = counted = found[0]
    pairs = [r for r in found if r["id"] is not None]
    targets = [
        {"id": r["id"], "event_id": r["event_id"], "was": r["was"], "now": r["user_id"]}
        for r in pairs[:SAMPLE]
    ]
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
    audit = (
        await ctx.gateway.read(partial(audit_note, writes=[("kajabi_events", "UPDATE")]))
        if n
        else None
    )
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
        audit=audit,
    )


def sample_rematch(plan: Plan, n: int) -> Plan:
    """The first n planned events with their users (rematch-kajabi and rematch-emails)."""
    return sample_first(plan, n, RematchData, ("ids", "users"))


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
    # kajabi_events is not audited in LEAPS; where a deployment audits it and its
    # trigger cannot write the rows, the bot does.
    await writer.audit.before(writer, "kajabi_events", data.ids)
    updated = await writer.execute(rematch_sql(backup), (data.ids, data.users))
    check_count(plan, updated, "Kajabi events")
    await writer.audit.after(writer, "kajabi_events", "UPDATE", data.ids)
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
# One processed LEARN-tag event per existing user who holds no LEARN submission at all:
# recovery never undoes a reviewer, so a REJECTED or REVOKED one keeps the user out as
# the guide's rule does (and PENDING or APPROVED: the partial unique index and the
# single-attempt guard allow no second one); the earliest event, as it awarded the LEARN.
# `{events}` / `{users}` / `{subs}`: the plan's piece of user ids (commands/keyranges.py)
# on the events' user_match, the users and the submissions; TRUE for the whole table.
_LEARN_PIECE = f"""
WITH ev AS (
  SELECT DISTINCT ON (u.id) e.id AS event_row, e.event_id, u.id AS user_id,
         e.processed_at, e.tag_name_raw, e.payload
  FROM kajabi_events AS e JOIN users AS u ON u.id = e.user_match AND {{users}}
  WHERE e.processed_at IS NOT NULL AND {{events}} AND {EVENT_TAG} = ANY(%(tags)s)
  ORDER BY u.id, e.processed_at, e.id
), due AS (
  SELECT ev.* FROM ev
  WHERE NOT EXISTS (SELECT 1 FROM submissions AS s WHERE s.user_id = ev.user_id
                    AND s.activity_code = 'LEARN' AND {{subs}})
    AND NOT EXISTS (SELECT 1 FROM submissions AS s WHERE s.id = %(prefix)s || ev.event_row)
)"""  # noqa: S608 (constant fragments of this module)
_LEARN = _LEARN_PIECE.format(events="TRUE", users="TRUE", subs="TRUE")
# The plan's one statement per piece: each event due (`pair`), and the users skipped for
# the LEARN they hold, by its status (`held`); `ev` is read once for both.
_PLAN_TAIL = """
SELECT x.* FROM (
  SELECT 'pair' AS kind, event_row, event_row AS kajabi_event, user_id, event_id, processed_at,
         NULL::text AS status, NULL::bigint AS n
  FROM due
  UNION ALL
  SELECT 'held', NULL, NULL, NULL, NULL, NULL, s.status::text, count(DISTINCT ev.user_id)
  FROM ev JOIN submissions AS s ON s.user_id = ev.user_id AND s.activity_code = 'LEARN'
  GROUP BY s.status
) AS x ORDER BY x.kind, x.event_row, x.status"""
# The processed LEARN-tag events, counted to size the plan's pieces.
_LEARN_EVENTS_SQL = f"""
SELECT count(*) AS n FROM kajabi_events AS e
WHERE e.processed_at IS NOT NULL AND {EVENT_TAG} = ANY(%(tags)s)
"""  # noqa: S608 (constant fragments of this module)
# Events a piece of the plan judges (a user's probe and two anti-join probes each, and
# the piece reads all of kajabi_events: no index serves user_match): 100,000 took 4.8 s
# with the load average at 8, at 1,000,000 users.
LEARN_EVENTS_PER_PIECE = 50_000
# The planned pairs in the order of the events' ids, as one statement's ORDER BY gives
# them (the pieces are ranges of user ids).
_PAIRS_ORDER_SQL = """
SELECT p.i AS event_row FROM unnest(%s::text[]) AS p(i) JOIN kajabi_events AS e ON e.id = p.i
ORDER BY e.id
"""
# The users with a processed LEARN-tag event skipped for the LEARN they hold, by status.
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
        " ON p.i = d.event_row AND p.u = d.user_id ORDER BY d.event_row RETURNING id"
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

    async def prepare(db: Reader) -> tuple[list[str], list[Piece]]:
        await no_jit(db)
        tags = await learn_tags(db)
        if not tags:
            return tags, []
        n = int((await db.fetch(_LEARN_EVENTS_SQL, {"tags": tags}))[0]["n"])
        pieces = await key_pieces(
            db, "kajabi_events", "user_match", rows=n, per_piece=LEARN_EVENTS_PER_PIECE
        )
        return tags, pieces

    # The LEARN-tag events by ranges of their users (LEARN_EVENTS_PER_PIECE a piece), the
    # payload formats in a read of their own.
    tags, pieces = await ctx.gateway.read(prepare)
    if not tags:
        raise UsageError(
            "learn_tag_grants holds no tag, so the bot cannot tell which Kajabi events "
            "complete LEARN; it will not guess"
        )
    params = {"tags": tags, "prefix": LEARN_ID_PREFIX}

    def piece_sql(piece: Piece, tail: str) -> str:
        return (
            _LEARN_PIECE.format(
                events=piece.where("e.user_match"),
                users=piece.where("u.id"),
                subs=piece.where("s.user_id"),
            )
            + tail
        )

    async def survey(db: Reader, piece: Piece) -> list[Row]:
        return await db.fetch(piece_sql(piece, _PLAN_TAIL), {**params, **piece.params()})

    found = [r for rows in await run_pieces(ctx.gateway, pieces, survey) for r in rows]
    pairs = [r for r in found if r["kind"] == "pair"]
    if len(pieces) > 1 and len(pairs) > 1:

        async def in_order(db: Reader) -> list[Row]:
            return await db.fetch(_PAIRS_ORDER_SQL, ([str(p["event_row"]) for p in pairs],))

        by_row = {str(p["event_row"]): p for p in pairs}
        pairs = [by_row[str(r["event_row"])] for r in await ctx.gateway.read(in_order)]
    targets = [
        {k: p[k] for k in ("kajabi_event", "event_id", "user_id", "processed_at")}
        for p in pairs[:SAMPLE]
    ]
    held_n: dict[str, int] = {}
    for r in found:
        if r["kind"] == "held":
            held_n[str(r["status"])] = held_n.get(str(r["status"]), 0) + int(r["n"])
    held = [{"status": k, "n": held_n[k]} for k in sorted(held_n)]

    async def payload_of(db: Reader) -> Row:
        await no_jit(db)
        return (await db.fetch(_PRODUCT_PAYLOAD_SQL))[0]

    payload = await ctx.gateway.read(payload_of)
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
    if held:
        warnings.append(
            "users with a processed LEARN event who hold a LEARN submission, whatever its "
            "status, are skipped, as the guide's rule does (recovery never undoes a reviewer): "
            + ", ".join(f"{r['status']} {r['n']}" for r in held)
        )
    audit = None
    if n:
        warnings += await plan_notes(ctx, ["submissions"], "INSERT")
        audit = await ctx.gateway.read(partial(audit_note, writes=[("submissions", "INSERT")]))
    return Plan(
        remedy=RECOVER_LEARN_NAME,
        args=list(args),
        title="Recover LEARN submissions from processed Kajabi events",
        summary=(
            f"insert {plural(n, 'APPROVED LEARN submission')} (id "
            f"'{LEARN_ID_PREFIX}<event id>') for users with a processed LEARN-tag event and "
            "no LEARN submission at all; nothing is overwritten, so there is no backup"
            if n
            else "every user with a processed LEARN-tag Kajabi event has a LEARN "
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
        audit=audit,
    )


def sample_recover_learn(plan: Plan, n: int) -> Plan:
    """The first n planned events (and their users)."""
    return sample_first(plan, n, LearnRecoveryData, ("ids", "users"), target_key="kajabi_event")


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
    got = await writer.fetch(
        insert_learn_sql(await _type_of(writer, "status"), await _type_of(writer, "visibility")),
        {
            **params,
            "status": "APPROVED",
            "visibility": "PRIVATE",
            "approval": writer.approval_id,
            "reviewer": writer.identity.user_id,
        },
    )
    inserted = len(got)
    check_count(plan, inserted, "LEARN submissions")
    # No live trigger audits a submission's INSERT today; where one does and cannot
    # write its rows itself, the bot writes them.
    await writer.audit.after(writer, "submissions", "INSERT", [str(r["id"]) for r in got])
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
        usage=f"/db recover-users [{KEEP_ROLES}] [{INCLUDE_DELETED}]",
        summary="insert users missing from users as their latest audit_log row shows them, "
        f"as {LEAST_ROLE} unless {KEEP_ROLES}",
        plan=plan_recover_users,
        apply=apply_recover_users,
        verify=verify_recover_users,
        approver_role="ADMIN",
        approvers=1,
        preflight=True,
        sample=sample_recover_users,
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
        preflight=True,
        sample=sample_rematch,
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
        preflight=True,
        sample=sample_recover_learn,
    )
)

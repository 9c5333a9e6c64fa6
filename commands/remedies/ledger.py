"""Ledger repairs: `dedupe-ledger-events` (repeated webhook awards) and
`reconcile-points` (missing awards of approved submissions).

Nothing is invented: the ledger `source` of a reconciled award is read from the live
enum, the AMPLIFY payload keys from the live quota trigger.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import sql
from pydantic import BaseModel

from commands.base import Context, Reader, Row, UsageError
from commands.guards import plan_notes
from commands.integrity import amplify_keys, pass_pieces
from commands.keyranges import (
    WHOLE,
    Piece,
    first_by_id,
    judge_groups,
    repeated_candidates,
    run_pieces,
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
from commands.remedies.rowsets import (
    APPROVAL_PLACEHOLDER,
    SAMPLE,
    Counts,
    Part,
    audit_note,
    backup_display,
    check_parts,
    delete_part,
    delete_part_steps,
    plural,
    sample_parts,
    sampled_parts,
    verify_backup_of,
)

DEDUPE_EVENTS_NAME = "dedupe-ledger-events"
RECONCILE_NAME = "reconcile-points"


class ReconcileData(BaseModel):
    keys: tuple[str, str]  # the AMPLIFY payload keys check_amplify_quota() reads
    source: str
    pairs: int
    # A sample of the plan (`sample_reconcile`): only the first this many missing awards
    # by submission id are inserted; None: all of them.
    sample: int | None = None


DUPLICATE_EVENT = (
    "l.external_event_id IS NOT NULL AND EXISTS (SELECT 1 FROM points_ledger AS k"
    " WHERE k.external_event_id = l.external_event_id"
    " AND (k.created_at, k.id) < (l.created_at, l.id))"
)
EVENT_PART = Part(
    "events", "points_ledger", "l", DUPLICATE_EVENT, "repeated ledger rows of an external event"
)
# The plan finds the repeats without an index on `external_event_id` (its unique index
# is what they broke): the ledger's blocks in pieces give the rows whose key's hash
# another row shares (commands/keyranges.py, `repeated_candidates`); among those, by
# primary key, each key's rows numbered by (created_at, id), every one after the first a
# repeat, exactly the rows DUPLICATE_EVENT names (a row without created_at is neither a
# repeat nor an earlier row there, as its row comparison is NULL), with the first row
# of its key kept. The totals, and the first SAMPLE repeats by id, per group of
# candidates (every row of a key in one group).
_EVENT_KEYED = "t.external_event_id IS NOT NULL AND t.created_at IS NOT NULL"
_EVENTS_SURVEY_SQL = """
WITH d AS MATERIALIZED (
  SELECT l.id, l.user_id, l.activity_code, l.delta_points, l.external_event_id, l.created_at,
         row_number() OVER w AS rn, first_value(l.id) OVER w AS kept_row
  FROM points_ledger AS l
  WHERE l.id = ANY(%(ids)s::text[])
    AND l.external_event_id IS NOT NULL AND l.created_at IS NOT NULL
  WINDOW w AS (PARTITION BY l.external_event_id ORDER BY l.created_at, l.id)
), r AS MATERIALIZED (SELECT * FROM d WHERE d.rn > 1)
SELECT t.n, t.events, t.points, x.id, x.user_id, x.activity_code, x.delta_points,
       x.external_event_id, x.created_at, x.kept_row
FROM (SELECT count(*) AS n, count(DISTINCT r.external_event_id) AS events,
             coalesce(sum(r.delta_points), 0)::bigint AS points FROM r) AS t
LEFT JOIN LATERAL (SELECT * FROM r ORDER BY r.id LIMIT %(sample)s) AS x ON true
"""
_SAMPLE_KEYS = (
    "id",
    "user_id",
    "activity_code",
    "delta_points",
    "external_event_id",
    "created_at",
    "kept_row",
)


async def plan_dedupe_events(ctx: Context, args: list[str]) -> Plan:
    if [a for a in args if a.strip()]:
        raise UsageError("`dedupe-ledger-events` takes no arguments")
    groups = await repeated_candidates(
        ctx.gateway, "points_ledger", "hashtextextended(t.external_event_id, 0)", _EVENT_KEYED
    )
    n = events = points = 0
    sample: list[Row] = []
    for rows in await judge_groups(ctx.gateway, _EVENTS_SURVEY_SQL, groups, SAMPLE):
        n += int(rows[0]["n"])
        events += int(rows[0]["events"])
        points += int(rows[0]["points"])
        sample += [{k: r[k] for k in _SAMPLE_KEYS} for r in rows if r["id"] is not None]
    stats = {"events": events, "points": points}
    targets = await first_by_id(ctx.gateway, "points_ledger", sample, SAMPLE)

    async def survey(db: Reader) -> str | None:
        return await audit_note(db, [("points_ledger", "DELETE")]) if n else None

    audit = await ctx.gateway.read(survey)
    notes = await plan_notes(ctx, ["points_ledger"], "DELETE") if n else []
    return Plan(
        remedy=DEDUPE_EVENTS_NAME,
        args=list(args),
        title="Delete repeated webhook awards",
        summary=(
            f"delete {plural(n, 'ledger row')} repeating {plural(int(stats['events']), 'event')}"
            f" ({stats['points']} points), keeping the first row of each external_event_id "
            "(created_at, then id)"
            if n
            else "no external_event_id appears twice in the ledger; nothing to do"
        ),
        steps=delete_part_steps(EVENT_PART, n),
        targets=targets,
        count=n,
        backup=f"whole rows copied first into {backup_display('points_ledger')}" if n else None,
        warnings=notes,
        needs_approval=n > 0,
        locks=LockScope(relations=["points_ledger"]),
        data=Counts(counts={"events": n}).model_dump(mode="json"),
        audit=audit,
    )


async def apply_dedupe_events(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(Counts)
    (part,) = sampled_parts([EVENT_PART], data)
    await check_parts(writer, plan, [part], data.counts)
    if plan.count == 0:
        return Outcome(ok=True, summary="no repeated external event; nothing was changed")
    done = await delete_part(writer, plan, part)
    backup, copied, deleted = done.backup, done.copied, done.deleted
    if done.remaining:
        return Outcome(ok=False, summary="verification failed: repeated events remain; rolled back")
    return Outcome(
        ok=True,
        summary=f"deleted {plural(deleted, 'repeated ledger row')}, backed up in "
        f"{backup.as_string()}; every external_event_id now appears once",
        affected=deleted,
        backed_up=copied,
        backup_table=backup.as_string(),
        rows=[{"table": "points_ledger", "deleted": deleted, "backup": backup.as_string()}],
    )


RECONCILE_SOURCE = "dbops-reconcile"
PREFERRED_SOURCES = ("FORM", "MANUAL")  # an approved form submission's award; else manual

_SOURCE_TYPE_SQL = """
SELECT tn.nspname::text AS schema, t.typname::text AS type, t.typtype::text AS kind,
       ARRAY(SELECT e.enumlabel::text FROM pg_enum e
             WHERE e.enumtypid = t.oid ORDER BY e.enumsortorder) AS labels
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_namespace tn ON tn.oid = t.typnamespace
WHERE a.attrelid = to_regclass('points_ledger') AND a.attname = 'source' AND NOT a.attisdropped
"""


async def live_source(db: Reader) -> tuple[sql.Identifier, str, list[str]]:
    """The enum type of points_ledger.source and the value to use; refuses when none fits."""
    rows = await db.fetch(_SOURCE_TYPE_SQL)
    if not rows:
        raise UsageError("points_ledger.source does not exist; nothing can be reconciled")
    row = rows[0]
    labels = [str(v) for v in row["labels"] or []]
    if row["kind"] != "e":
        raise UsageError(
            f"points_ledger.source is of type {row['type']}, not an enum; the bot will not "
            "guess a source value"
        )
    chosen = next((s for s in PREFERRED_SOURCES if s in labels), None)
    if chosen is None:
        raise UsageError(
            f"the ledger source enum {row['type']} has none of "
            f"{', '.join(PREFERRED_SOURCES)} (it has {', '.join(labels) or 'no values'}); "
            "the bot will not invent one"
        )
    return sql.Identifier(str(row["schema"]), str(row["type"])), chosen, labels


def _int_key(key: str) -> str:
    """A payload key as an integer, read as `/db integrity` reads it: text that is not a
    whole number of at most nine digits counts 0."""
    value = f"(s.payload ->> {key})"
    whole = "'^[[:space:]]*-?[0-9]{1,9}[[:space:]]*$'"
    return f"(CASE WHEN {value} ~ {whole} THEN {value}::integer ELSE 0 END)"


_POINTS = (
    "CASE WHEN s.activity_code = 'AMPLIFY' THEN 2 * "
    + _int_key("k.peers")
    + " + "
    + _int_key("k.students")
    + " ELSE greatest(ac.default_points, 0) END"
)


def _range(column: str, piece: Piece) -> str:
    """`piece`'s condition on `column` with its bounds as positional parameters (the
    statements of this module bind theirs by position: `due_params`); the whole table's
    `true`, as the plan's steps show it."""
    if piece == WHOLE:
        return "true"
    return piece.where(column).replace("%(lo)s", "%s").replace("%(hi)s", "%s")


def _due(piece: Piece = WHOLE) -> str:
    """Approved submissions of a known user and activity whose (user, activity) pair has no
    ledger row at all: what `/db integrity` reports as missing awards. Pairs with some
    ledger rows are differences, left to a person: an award without a submission link
    would be paid twice. The reconciled rows fill the pair, so a second run finds none.

    Over the users of a piece when given (the plan reads the users range by range,
    `plan_reconcile`); the parameters are the two payload keys, then the piece's bounds
    twice (`due_params`). The pairs come first, from the range's rows of
    both tables (an anti-join of the submissions with the ledger), so that the rest runs
    only for the few submissions left: whether an earlier reconcile already awarded one
    is asked of its own award, by the row id it gets (`reconcile_<submission id>`, the
    primary key) and by its event id among its user's rows."""
    return f"""
WITH k AS (SELECT %s::text AS peers, %s::text AS students),
pending AS MATERIALIZED (
  SELECT s.id, s.user_id, s.activity_code, s.payload, s.updated_at, s.created_at
  FROM submissions AS s
  WHERE s.status = 'APPROVED' AND {_range("s.user_id", piece)}
    AND NOT EXISTS (SELECT 1 FROM points_ledger AS l
                    WHERE {_range("l.user_id", piece)}
                      AND l.user_id = s.user_id AND l.activity_code = s.activity_code)
),
valued AS MATERIALIZED (
  SELECT s.id AS submission_id, s.user_id, s.activity_code, {_POINTS} AS points,
         coalesce(s.updated_at, s.created_at) AS awarded_at
  FROM pending AS s
  JOIN activities AS ac ON ac.code = s.activity_code
  CROSS JOIN k
),
due AS (
  SELECT v.* FROM valued AS v
  JOIN users AS u ON u.id = v.user_id
  WHERE v.points > 0
    AND NOT EXISTS (SELECT 1 FROM points_ledger AS l
                    WHERE l.id = 'reconcile_' || v.submission_id)
    AND NOT EXISTS (SELECT 1 FROM points_ledger AS l
                    WHERE l.user_id = v.user_id
                      AND l.external_event_id = 'reconcile:' || v.submission_id)
)"""  # noqa: S608


def due_params(keys: tuple[str, str], piece: Piece = WHOLE) -> list[str]:
    """The parameters of `_due(piece)`."""
    bounds = [b for b in (piece.lo, piece.hi) if b is not None]
    return [*keys, *bounds, *bounds]


_DUE = _due()
_COUNTED = (
    "SELECT count(*) AS n, coalesce(sum(points), 0)::bigint AS points,"
    " count(DISTINCT (user_id, activity_code)) AS pairs FROM due WHERE points > 0"
)
DUE_COUNT_SQL = _DUE + "\n" + _COUNTED
# A sample's recount: the first n due awards by submission id (n bound last).
DUE_FIRST_COUNT_SQL = (
    _DUE + "\nSELECT count(*) AS n FROM (SELECT 1 FROM due WHERE points > 0"  # noqa: S608
    " ORDER BY submission_id LIMIT %s) AS q"
)
# A sample's verification: which of its submissions still lack their award.
DUE_AMONG_COUNT_SQL = (
    _DUE + "\nSELECT count(*) AS n FROM due WHERE points > 0 AND submission_id = ANY(%s)"
)


def due_survey_sql(piece: Piece) -> str:
    """One range's count, points and pairs, and its first SAMPLE due awards by submission
    id (code point order, which the ranges' samples are merged in), in one statement."""
    tail = f"""
, counted AS ({_COUNTED}),
sampled AS (
  SELECT submission_id, user_id, activity_code, points, awarded_at FROM due
  WHERE points > 0 ORDER BY submission_id COLLATE "C" LIMIT {SAMPLE}
)
SELECT c.n, c.points AS total, c.pairs, s.submission_id, s.user_id, s.activity_code,
       s.points, s.awarded_at
FROM counted AS c LEFT JOIN sampled AS s ON true
ORDER BY s.submission_id COLLATE "C"
"""  # noqa: S608 (constants of this module)
    return _due(piece) + tail


def insert_awards_sql(enum_type: sql.Identifier, first: bool = False) -> sql.Composed:
    """The awards of every due submission, or with `first` (a sample) only the first n
    by submission id (n bound after the approval id); returns the rows inserted."""
    return sql.Composed(
        [
            sql.SQL(
                "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
                " external_source, external_event_id, created_at, event_time, meta)"
                + _DUE
                + "\nSELECT 'reconcile_' || d.submission_id, d.user_id, d.activity_code, %s::"
            ),
            enum_type,
            sql.SQL(
                ", d.points, %s, 'reconcile:' || d.submission_id, now() AT TIME ZONE 'UTC',"
                " d.awarded_at AT TIME ZONE 'UTC',"
                " jsonb_build_object('submission_id', d.submission_id, 'reason',"
                " 'dbops-bot reconcile-points', 'approval', %s::text)"
                " FROM due AS d WHERE d.points > 0"
            ),
            sql.SQL(" ORDER BY d.submission_id LIMIT %s" if first else ""),
            sql.SQL(" RETURNING id, meta ->> 'submission_id' AS submission_id"),
        ]
    )


async def survey_due(
    ctx: Context, keys: tuple[str, str], pieces: Sequence[Piece]
) -> tuple[Row, list[Row]]:
    """The due awards counted range by range of user ids (`pieces`), each range one
    statement in its own read-only transaction, two at a time (every submission and
    every ledger row of a user is in one range, read in one snapshot): the totals (n,
    points, pairs) and the first SAMPLE by submission id. A range of users is read
    through the user_id indexes, as `/db integrity` reads its ranges (`run_pieces`
    tunes it so), with the range's ledger pairs hashed rather than both sides sorted
    for a merge (measured twice as slow)."""

    async def read(db: Reader, piece: Piece) -> list[Row]:
        return await db.fetch(due_survey_sql(piece), due_params(keys, piece))

    found = await run_pieces(ctx.gateway, pieces, read, {"enable_mergejoin": "off"})
    counted: Row = {"n": 0, "points": 0, "pairs": 0}
    sample: list[Row] = []
    for rows in found:
        counted["n"] += int(rows[0]["n"])
        counted["points"] += int(rows[0]["total"])
        counted["pairs"] += int(rows[0]["pairs"])
        sample += [
            {k: r[k] for k in ("submission_id", "user_id", "activity_code", "points", "awarded_at")}
            for r in rows
            if r["submission_id"] is not None
        ]
    sample.sort(key=lambda r: str(r["submission_id"]))
    return counted, sample[:SAMPLE]


async def plan_reconcile(ctx: Context, args: list[str]) -> Plan:
    if [a for a in args if a.strip()]:
        raise UsageError("`reconcile-points` takes no arguments")

    async def catalog(
        db: Reader,
    ) -> tuple[tuple[str, str], tuple[sql.Identifier, str, list[str]], list[Piece]]:
        keys = await amplify_keys(db)
        source = await live_source(db)
        return keys, source, await pass_pieces(db)

    keys, (enum_type, source, labels), pieces = await ctx.gateway.read(catalog)
    counted, targets = await survey_due(ctx, keys, pieces)

    async def audit_of(db: Reader) -> str | None:
        return await audit_note(db, [("points_ledger", "INSERT")])

    audit = await ctx.gateway.read(audit_of) if counted["n"] else None
    n = int(counted["n"])
    notes = await plan_notes(ctx, ["points_ledger"], "INSERT") if n else []
    return Plan(
        remedy=RECONCILE_NAME,
        args=list(args),
        title="Insert missing ledger awards",
        summary=(
            f"insert {plural(n, 'ledger award')} ({counted['points']} points, "
            f"{plural(int(counted['pairs']), 'user-activity pair')} with no ledger row) for "
            f"approved submissions, with source {source} (of {', '.join(labels)}) and "
            "external_event_id 'reconcile:<submission id>'; nothing is overwritten, so "
            "there is no backup"
            if n
            else "every approved submission's (user, activity) has ledger awards; nothing to do"
        ),
        steps=[
            PlanStep(sql=DUE_COUNT_SQL.strip(), params=list(keys), note=f"recounts: {n}"),
            PlanStep(
                sql=insert_awards_sql(enum_type).as_string(),
                params=[*keys, source, RECONCILE_SOURCE, APPROVAL_PLACEHOLDER],
                note="AMPLIFY worth peers x 2 + students x 1 with the keys the live "
                f"check_amplify_quota() reads ({', '.join(keys)}), other activities their "
                "default_points, 0 skipped; the count must match the plan",
            ),
            PlanStep(sql=DUE_COUNT_SQL.strip(), params=list(keys), note="verification: must be 0"),
        ],
        targets=targets,
        count=n,
        backup=None,
        warnings=notes,
        needs_approval=n > 0,
        locks=LockScope(relations=["points_ledger"]),
        data=ReconcileData(keys=keys, source=source, pairs=int(counted["pairs"])).model_dump(
            mode="json"
        ),
        audit=audit,
    )


async def apply_reconcile(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(ReconcileData)
    keys = data.keys
    now_keys = await amplify_keys(writer)
    if now_keys != keys:
        raise RemedyAbort(
            f"drift: check_amplify_quota() now reads {', '.join(now_keys)}, the plan used "
            f"{', '.join(keys)}; nothing was changed, request it again"
        )
    try:
        enum_type, source, _labels = await live_source(writer)
    except UsageError as exc:
        raise RemedyAbort(str(exc)) from exc
    if source != data.source:
        raise RemedyAbort(
            f"drift: the ledger source would now be {source}, the plan said "
            f"{data.source}; nothing was changed, request it again"
        )
    first = data.sample
    if first is None:
        now = int((await writer.fetch(DUE_COUNT_SQL, keys))[0]["n"])
    else:
        now = int((await writer.fetch(DUE_FIRST_COUNT_SQL, (*keys, first)))[0]["n"])
    check_drift(plan, now, "missing awards")
    if plan.count == 0:
        return Outcome(ok=True, summary="no missing award; nothing was changed")
    params = (*keys, source, RECONCILE_SOURCE, writer.approval_id)
    awarded = await writer.fetch(
        insert_awards_sql(enum_type, first is not None),
        params if first is None else (*params, first),
    )
    await writer.audit.after(writer, "points_ledger", "INSERT", [str(r["id"]) for r in awarded])
    inserted = len(awarded)
    check_count(plan, inserted, "ledger awards")
    if first is None:
        left = int((await writer.fetch(DUE_COUNT_SQL, keys))[0]["n"])
    else:
        subs = [str(r["submission_id"]) for r in awarded]
        left = int((await writer.fetch(DUE_AMONG_COUNT_SQL, (*keys, subs)))[0]["n"])
    if left:
        return Outcome(ok=False, summary=f"verification failed: {left} awards still missing")
    rows = await writer.fetch(
        "SELECT id, user_id, activity_code, source::text AS source, delta_points,"
        " external_event_id FROM points_ledger WHERE external_source = %s"
        " AND meta ->> 'approval' = %s ORDER BY id LIMIT %s",
        (RECONCILE_SOURCE, writer.approval_id, SAMPLE),
    )
    return Outcome(
        ok=True,
        summary=f"inserted {plural(inserted, 'ledger award')} with source {source}; "
        "no approved submission's (user, activity) lacks its awards now",
        affected=inserted,
        rows=rows,
    )


def sample_reconcile(plan: Plan, n: int) -> Plan:
    """The plan cut down to its first n missing awards by submission id."""
    if plan.count <= n:
        return plan
    kept = max(n, 0)
    data = plan.private(ReconcileData).model_copy(update={"sample": kept})
    return plan.model_copy(
        update={"count": kept, "tolerance": 0, "data": data.model_dump(mode="json")}
    )


async def verify_reconcile(db: Reader, plan: Plan, run: Execution) -> Verification:
    """The inserted awards carry the approval id: they are there exactly when it committed."""
    if (trivial := nothing_planned(plan)) is not None:
        return trivial
    (row,) = await db.fetch(
        "SELECT count(*) AS n FROM points_ledger WHERE external_source = %s"
        " AND meta ->> 'approval' = %s",
        (RECONCILE_SOURCE, run.approval_id),
    )
    n = int(row["n"])
    return Verification(
        landed=n == plan.count,
        found=f"{n} of the {plan.count} planned awards of {run.approval_id} are in the ledger",
    )


RECONCILE_POINTS = add_remedy(
    Remedy(
        name=RECONCILE_NAME,
        usage="/db reconcile-points",
        summary="insert the missing ledger awards of approved submissions (idempotent)",
        plan=plan_reconcile,
        apply=apply_reconcile,
        verify=verify_reconcile,
        approver_role="ADMIN",
        approvers=1,
        destroys_data=False,
        preflight=True,
        sample=sample_reconcile,
    )
)

DEDUPE_EVENTS = add_remedy(
    Remedy(
        name=DEDUPE_EVENTS_NAME,
        usage="/db dedupe-ledger-events",
        summary="keep the first ledger row of each repeated external_event_id, back up "
        "and delete the rest",
        plan=plan_dedupe_events,
        apply=apply_dedupe_events,
        verify=verify_backup_of("points_ledger"),
        approver_role="ADMIN",
        approvers=2,
        destroys_data=True,
        preflight=True,
        sample=sample_parts(Counts),
    )
)

"""The webhook repairs of the operators' guide: `rematch-emails`, `reprocess-webhooks` and
`dedupe-webhooks`.

`rematch-emails` is `rematch-kajabi` (recovery.py) scoped to the events the webhook
matcher marked NO_USER_FOUND: the same query, backup and verification. Linking an event
does not pay its LEARN points; the plan says which steps do.

`reprocess-webhooks` does what the guide's handler does for each unprocessed event,
oldest first: find the user by e-mail (ignoring case), award LEARN with the ledger's
idempotency key, mark the event processed (`user_match` = the user, or NO_USER_FOUND).
Choices where the guide is silent:

* The idempotency key is Kajabi's event id (`event_id`, else the payload's `id`, else
  the row id), as the seed's awards carry it, not the row id the guide uses: a Kajabi
  retry (a second row, same payload) then pays once. Which keys the ledger already
  holds is read once, for all the events together (one pass over the ledger's keys
  when the unique index on external_event_id is gone: a probe per event would scan the
  ledger once per event, which at 20k users does not finish within the statement
  timeout); keys this run pays are added to that set as it goes.
* Against a concurrent writer of the same key: with the unique index standing, the
  insert says `ON CONFLICT DO NOTHING` (an award that lost the race counts as already
  paid). Without it (a damaged database) nothing in the table stops a second row, so
  `apply` first takes `SHARE ROW EXCLUSIVE` on points_ledger, which every INSERT,
  UPDATE and DELETE waits for (and a second run of this remedy too): the set of paid
  keys, read after the lock, stays true until commit. An advisory lock per key would
  not do: the application's webhook handler takes none. The lock is taken before the
  events are locked, as the handler writes the ledger before it marks its event.
* Only LEARN-tag events pay (tags read from learn_tag_grants, as `recover-learn` reads
  them; with none known the plan refuses rather than pay every event as the guide
  would); events of other tags are matched and marked without an award.
* LEARN is earned once: an event whose user already holds LEARN points (another Kajabi
  event id) is not paid twice.
* An event is left unprocessed and reported, with its reason, when it has no e-mail,
  when its e-mail matches several users, when its user already holds LEARN, or when the
  database refuses its award or update (a SAVEPOINT per event rolls back that event
  alone). The others continue.
* The plan binds the unprocessed events it counted (their ids); at execution every one
  of them must still be unprocessed (else drift) and each must end processed or
  reported (`check_count` on the sum), so a failure is an outcome, not a rollback.

`dedupe-webhooks` keeps the earliest row of each payload (received_at, then id), backs up
and deletes the rest, as `dedupe-ledger-events` does for the ledger.

All three are tried at plan time and rolled back (DESIGN.md rule 10). A plan bigger than
the preflight's limit is tried on a sample (`Remedy.sample`): the re-matches and
reprocess-webhooks bind their events by id, so the sample is the first n of them (the
oldest n for reprocess, whose verdicts depend only on the events before them);
dedupe-webhooks binds a count, so its sample carries `sample = n` and its apply, still
holding the whole count to the plan, deletes the first n duplicates by id. The awards of
reprocess-webhooks are `points_ledger` inserts, audited: their audit rows are written by
the live trigger or, where it refuses writes made with app.user_id, by the bot
(`writer.audit`). kajabi_events is not audited.
"""

from __future__ import annotations

from datetime import UTC
from typing import NamedTuple

import psycopg
from psycopg import sql
from pydantic import BaseModel

from commands.base import Context, Reader, Row, UsageError
from commands.guards import plan_notes
from commands.integrity import events_unique_index
from commands.keyranges import (
    Piece,
    block_pieces,
    first_by_id,
    judge_groups,
    no_jit,
    repeated_candidates,
    run_pieces,
)
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
    check_drift,
    nothing_planned,
    sample_first,
)
from commands.remedies.ledger import _SOURCE_TYPE_SQL
from commands.remedies.recovery import (
    EVENT_EMAIL,
    EVENT_TAG,
    NO_USER,
    RematchKind,
    apply_rematch,
    learn_tags,
    plan_rematch_kind,
    sample_rematch,
)
from commands.remedies.rowsets import (
    APPROVAL_PLACEHOLDER,
    SAMPLE,
    Counts,
    Part,
    backup_display,
    backup_sql,
    check_parts,
    count_rows,
    delete_part,
    delete_part_steps,
    delete_sql,
    plural,
    verify_backup_of,
)
from commands.webhooks import DEDUPE_WEBHOOKS, DUPLICATE_PAYLOAD, REMATCH_EMAILS, REPROCESS

# --- rematch-emails -----------------------------------------------------------------

REMATCH_EMAILS_KIND = RematchKind(
    REMATCH_EMAILS,
    "no_user_found",
    "Re-match NO_USER_FOUND Kajabi events by e-mail, ignoring case",
    "Kajabi event",
    f"marked '{NO_USER}'",
)


async def plan_rematch_emails(ctx: Context, args: list[str]) -> Plan:
    plan = await plan_rematch_kind(ctx, args, REMATCH_EMAILS_KIND)
    if plan.count:
        plan.warnings.append(
            "linking pays nothing: these events were processed without an award; "
            "`/db recover-learn` then `/db reconcile-points` award their LEARN"
        )
    return plan


# --- reprocess-webhooks -------------------------------------------------------------

LEDGER_ACTIVITY = "LEARN"
LEDGER_SOURCE = "WEBHOOK"
EXTERNAL_SOURCE = "kajabi"
LEDGER_ID_PREFIX = "reprocess_"
SAVEPOINT = sql.Identifier("dbops_webhook_event")
# Kajabi's own id of an event: what the ledger's idempotency key holds.
_EXTERNAL_ID = "coalesce(nullif(btrim(e.event_id), ''), e.payload ->> 'id', e.id)"

# Each unprocessed event (all, or the planned ids) with the users its e-mail matches
# (a hash join: users.email has no index on lower()), grouped in the same pass: a
# second join of the events to their grouped matches was planned as a nested loop
# (quadratic in the events) when the statistics promised one unprocessed row. Whether
# its key is paid and what LEARN its user holds are read after, for all events at
# once (`_with_ledger`).
_EVENTS_SQL = f"""
WITH ev AS (
  SELECT e.id, e.event_id, e.received_at, {_EXTERNAL_ID} AS external_id,
         {EVENT_EMAIL} AS mail, {EVENT_TAG} AS tag
  FROM kajabi_events AS e
  WHERE e.processed_at IS NULL AND (%(ids)s::text[] IS NULL OR e.id = ANY(%(ids)s::text[]))
)
SELECT ev.id, ev.event_id, ev.received_at, ev.external_id, ev.mail, ev.tag,
       coalesce(array_agg(u.id ORDER BY u.id) FILTER (WHERE u.id IS NOT NULL),
                ARRAY[]::text[]) AS users
FROM ev LEFT JOIN users AS u ON lower(u.email) = ev.mail
GROUP BY ev.id, ev.event_id, ev.received_at, ev.external_id, ev.mail, ev.tag
ORDER BY ev.received_at, ev.id
"""  # noqa: S608 (constant fragments of this module)
# The keys among these the ledger holds. The keys are a bound array, so the planner
# sees how many there are: an index scan under the unique index, else one seq scan
# with a hashed `= ANY` (a correlated EXISTS per event was planned as one seq scan per
# event when the statistics of kajabi_events promised a single unprocessed row).
_PAID_SQL = (
    "SELECT DISTINCT l.external_event_id AS key FROM points_ledger AS l"
    " WHERE l.external_event_id = ANY(%s::text[])"
)
# The LEARN points each of these users holds (points_ledger_user_id_idx).
_HELD_SQL = (
    "SELECT l.user_id, sum(l.delta_points)::bigint AS points FROM points_ledger AS l"
    " WHERE l.user_id = ANY(%s::text[]) AND l.activity_code = %s GROUP BY l.user_id"
)
_LEDGER_LOCK_SQL = "LOCK TABLE points_ledger IN SHARE ROW EXCLUSIVE MODE"
_LOCK_SQL = (
    "SELECT id FROM kajabi_events WHERE id = ANY(%s) AND processed_at IS NULL"
    " ORDER BY id FOR UPDATE"
)
_LEARN_POINTS_SQL = "SELECT default_points FROM activities WHERE code = %s"
_MARK_SQL = (
    "UPDATE kajabi_events SET processed_at = now() AT TIME ZONE 'UTC', user_match = %s"
    " WHERE id = %s AND processed_at IS NULL"
)


def award_sql(enum_type: sql.Identifier) -> sql.Composed:
    """One event's LEARN award; the event's own time (created_at_utc, else received_at)
    is the award's event_time. Whether its Kajabi id is already in the ledger was
    decided before (`_with_ledger`, under the ledger lock when no unique index stands);
    `ON CONFLICT DO NOTHING` covers a concurrent writer while the index stands."""
    return sql.SQL(
        "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
        " external_source, external_event_id, created_at, event_time, meta)"
        " SELECT %(ledger_id)s::text, %(user)s::text, %(activity)s::text, %(source)s::{},"
        " %(points)s::integer, %(external_source)s::text, %(external)s::text,"
        " now() AT TIME ZONE 'UTC', coalesce(e.created_at_utc, e.received_at AT TIME ZONE 'UTC'),"
        " jsonb_build_object('kajabi_event', e.id, 'reason', 'dbops-bot reprocess-webhooks',"
        " 'approval', %(approval)s::text, 'acting_user', %(actor)s::text)"
        " FROM kajabi_events AS e WHERE e.id = %(event)s"
        " ON CONFLICT DO NOTHING RETURNING id"
    ).format(enum_type)


class ReprocessData(BaseModel):
    ids: list[str]  # the unprocessed events counted, oldest first
    tags: list[str]  # LEARN tags (learn_tag_grants); empty: every event is a LEARN
    points: int  # LEARN's default_points when planned


class Verdict(NamedTuple):
    """What processing does with one event: `kind` is award | already | other_tag |
    no_user | fail; `user_match` what the event is marked with (None: left unprocessed)."""

    kind: str
    user_match: str | None
    reason: str


KINDS = ("award", "already", "other_tag", "no_user", "fail")


class Paid(NamedTuple):
    """What this run has paid so far: user -> the event row that paid, and the keys."""

    users: dict[str, str]
    keys: set[str]


def verdict(row: Row, tags: list[str], paid: Paid) -> Verdict:
    """One event's fate, as the application's handler would decide it, more carefully.

    Events of other tags are matched and marked, never paid. LEARN is earned once: a user
    who already holds LEARN points (another Kajabi event id: a tag removed and added
    again) is not paid twice; such an event is left for a person rather than marked, so
    nothing is decided silently."""
    users = [str(u) for u in row["users"] or []]
    if not row["mail"]:
        return Verdict(
            "fail",
            None,
            "no e-mail in the event (email column, payload.contact.email, payload.email)",
        )
    if len(users) > 1:
        return Verdict("fail", None, "its e-mail matches several users, ignoring case")
    if not users:
        return Verdict("no_user", NO_USER, "no user has its e-mail")
    user = users[0]
    if row["tag"] not in tags:
        return Verdict("other_tag", user, f"tag {row['tag']!r} is not a LEARN tag: no award")
    if row["awarded"] or row["external_id"] in paid.keys:
        return Verdict("already", user, f"{row['external_id']} is already in the ledger")
    if int(row["learn_points"] or 0) > 0:
        return Verdict(
            "fail",
            None,
            f"user {user} already holds {row['learn_points']} LEARN points from another event",
        )
    if user in paid.users:
        return Verdict("fail", None, f"user {user} was just paid LEARN by event {paid.users[user]}")
    return Verdict("award", user, f"{row['external_id']} pays LEARN")


async def ledger_source(db: Reader | Writer) -> sql.Identifier:
    """The live enum of points_ledger.source, which must hold WEBHOOK."""
    rows = await db.fetch(_SOURCE_TYPE_SQL)
    if not rows or rows[0]["kind"] != "e":
        raise UsageError("points_ledger.source is not an enum here; the bot will not guess")
    labels = [str(v) for v in rows[0]["labels"] or []]
    if LEDGER_SOURCE not in labels:
        raise UsageError(
            f"the ledger source enum {rows[0]['type']} has no {LEDGER_SOURCE} (it has "
            f"{', '.join(labels)}); the bot will not invent one"
        )
    return sql.Identifier(str(rows[0]["schema"]), str(rows[0]["type"]))


async def _with_ledger(
    db: Reader | Writer, ids: list[str] | None, paid_keys: set[str] | None = None
) -> list[Row]:
    """The unprocessed events (`ids`, or all) with `awarded` (their Kajabi id is in the
    ledger) and `learn_points` (the LEARN points of their one matching user, else 0):
    three set-wise reads, whatever the ledger's indexes, instead of two probes per event.
    `paid_keys`: the keys the ledger holds, read before (`_paid_in_pieces`)."""
    rows = await db.fetch(_EVENTS_SQL, {"ids": ids})
    keys = sorted({str(r["external_id"]) for r in rows})
    if paid_keys is not None:
        paid = paid_keys
    else:
        paid = {str(r["key"]) for r in await db.fetch(_PAID_SQL, (keys,))} if keys else set()
    one_user = {str(r["id"]): str(r["users"][0]) for r in rows if len(r["users"] or []) == 1}
    held: dict[str, int] = {}
    if one_user:
        for h in await db.fetch(_HELD_SQL, (sorted(set(one_user.values())), LEDGER_ACTIVITY)):
            held[str(h["user_id"])] = int(h["points"])
    return [
        r
        | {
            "awarded": str(r["external_id"]) in paid,
            "learn_points": held.get(one_user[str(r["id"])], 0) if str(r["id"]) in one_user else 0,
        }
        for r in rows
    ]


_KEYS_SQL = f"""
WITH ev AS (
  SELECT {_EXTERNAL_ID} AS external_id FROM kajabi_events AS e WHERE e.processed_at IS NULL
)
SELECT DISTINCT ev.external_id AS key FROM ev
"""  # noqa: S608 (constant fragments of this module)
# `_PAID_SQL` over one range of the ledger's blocks.
_PAID_PIECE_SQL = (
    "SELECT DISTINCT l.external_event_id AS key FROM points_ledger AS l"
    " WHERE l.external_event_id = ANY(%(keys)s::text[]) AND {rows}"
)


async def _paid_in_pieces(ctx: Context) -> set[str]:
    """The unprocessed events' Kajabi ids the ledger holds: by the unique index on
    external_event_id where it stands (one probe each), else piece by piece of the
    ledger's blocks (one pass over it in bounded statements)."""

    async def keys_and_pieces(db: Reader) -> tuple[list[str], str | None, list[Piece]]:
        await no_jit(db)
        keys = sorted(str(r["key"]) for r in await db.fetch(_KEYS_SQL))
        return keys, await events_unique_index(db), await block_pieces(db, "points_ledger")

    keys, unique_index, pieces = await ctx.gateway.read(keys_and_pieces)
    if not keys:
        return set()
    if unique_index is not None:
        pieces = [Piece(blocks=True)]

    async def paid(db: Reader, piece: Piece) -> list[Row]:
        query = _PAID_PIECE_SQL.format(rows=piece.where("ctid"))
        return await db.fetch(query, {"keys": keys, **piece.params()})

    return {str(r["key"]) for rows in await run_pieces(ctx.gateway, pieces, paid) for r in rows}


async def _learn_points(db: Reader | Writer) -> int:
    rows = await db.fetch(_LEARN_POINTS_SQL, (LEDGER_ACTIVITY,))
    if not rows:
        raise UsageError("activities has no LEARN row; there is nothing to award")
    return int(rows[0]["default_points"])


def _forecast(rows: list[Row], tags: list[str]) -> tuple[dict[str, int], list[Row]]:
    """What the events will come to, in order (as `apply` goes), and a sample of them."""
    counts = dict.fromkeys(KINDS, 0)
    paid = Paid({}, set())
    sample: list[Row] = []
    for r in rows:
        v = verdict(r, tags, paid)
        if v.kind == "award" and v.user_match:
            paid.users[v.user_match] = str(r["id"])
            paid.keys.add(str(r["external_id"]))
        counts[v.kind] += 1
        if len(sample) < SAMPLE:
            sample.append(
                {"id": r["id"], "event_id": r["event_id"], "received_at": r["received_at"]}
                | {"will": v.kind, "user_match": v.user_match, "why": v.reason}
            )
    return counts, sample


def _tally(counts: dict[str, int], points: int) -> str:
    return (
        f"{plural(counts['award'], 'LEARN')} awarded ({points} points each), "
        f"{counts['already']} already paid, {counts['other_tag']} of other tags (matched, "
        f"no award), {counts['no_user']} {NO_USER}"
    )


async def plan_reprocess(ctx: Context, args: list[str]) -> Plan:
    if [a for a in args if a.strip()]:
        raise UsageError(f"`{REPROCESS}` takes no arguments")

    paid = await _paid_in_pieces(ctx)

    async def survey(db: Reader) -> tuple[list[str], int, list[Row], str | None]:
        await no_jit(db)
        await ledger_source(db)
        return (
            await learn_tags(db),
            await _learn_points(db),
            await _with_ledger(db, None, paid),
            await events_unique_index(db),
        )

    tags, points, rows, unique_index = await ctx.gateway.read(survey)
    if rows and not tags:
        raise UsageError(
            "learn_tag_grants holds no tag, so the bot cannot tell which Kajabi events "
            "complete LEARN; it will not guess"
        )
    n = len(rows)
    f, targets = _forecast(rows, tags)
    warnings = [
        f"tags counted as LEARN (learn_tag_grants): {', '.join(tags)}",
        "e-mail read from the email column, else payload.contact.email, else payload.email; "
        "the idempotency key is Kajabi's event id (event_id, else payload id)",
        f"the count bound is these {plural(n, 'event')} by id: each must still be "
        "unprocessed when approved (else drift, nothing changes), and each ends processed "
        "or reported with its reason; one event's failure does not undo the others",
    ]
    if f["fail"]:
        warnings.append(
            f"{plural(f['fail'], 'event')} will be left unprocessed and reported (see "
            "'why'); the others still go ahead"
        )
    if f["award"]:
        warnings += await plan_notes(ctx, ["points_ledger"], "INSERT")
    if n and unique_index is None:
        warnings.append(
            "points_ledger has no unique index on external_event_id (a damaged database): "
            "the run locks points_ledger against writes (SHARE ROW EXCLUSIVE) until it "
            "commits, so no webhook can pay a key between the check and the award; the "
            "application's ledger writes wait meanwhile"
        )
    return Plan(
        remedy=REPROCESS,
        args=list(args),
        title="Reprocess unprocessed Kajabi events",
        summary=(
            f"process {plural(n, 'unprocessed Kajabi event')}, oldest first, each in a "
            f"savepoint of its own: {_tally(f, points)} (source {LEDGER_SOURCE}); "
            f"{f['fail']} to be left unprocessed"
            if n
            else "no Kajabi event waits to be processed; nothing to do"
        ),
        steps=[
            PlanStep(
                sql=_LEDGER_LOCK_SQL,
                note="only while points_ledger has no valid unique index on external_event_id "
                f"(now: {'missing' if unique_index is None else unique_index}); first",
            ),
            PlanStep(sql=_LOCK_SQL, params=["<the planned ids>"], note=f"locks; recounts: {n}"),
            PlanStep(
                sql=award_sql(sql.Identifier("<ledger source enum>")).as_string(),
                params=[
                    f"{LEDGER_ID_PREFIX}<event row id>",
                    "<matched user>",
                    LEDGER_ACTIVITY,
                    LEDGER_SOURCE,
                    str(points),
                    EXTERNAL_SOURCE,
                    "<Kajabi event id>",
                    APPROVAL_PLACEHOLDER,
                    "<acting identity>",
                ],
                note="per event with one matching user, inside SAVEPOINT dbops_webhook_event",
            ),
            PlanStep(
                sql=_MARK_SQL,
                params=["<user id or NO_USER_FOUND>", "<event row id>"],
                note="per event; must touch exactly one row",
            ),
        ],
        targets=targets,
        count=n,
        warnings=warnings,
        needs_approval=n > 0,
        locks=LockScope(relations=["kajabi_events", "points_ledger"]),
        data=ReprocessData(ids=[str(r["id"]) for r in rows], tags=tags, points=points).model_dump(
            mode="json"
        ),
    )


def _refusal(exc: psycopg.Error) -> str:
    diag = getattr(exc, "diag", None)
    state = getattr(diag, "sqlstate", None) if diag is not None else None
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"the database refused: {state}: {text}" if state else f"the database refused: {text}"


async def apply_reprocess(writer: Writer, plan: Plan) -> Outcome:
    data = plan.private(ReprocessData)
    if plan.count == 0:
        return Outcome(ok=True, summary="no event to reprocess; nothing was changed")
    try:
        enum_type = await ledger_source(writer)
        now_points = await _learn_points(writer)
    except UsageError as exc:
        raise RemedyAbort(str(exc)) from exc
    if await events_unique_index(writer) is None:
        await writer.execute(_LEDGER_LOCK_SQL)
    locked = await writer.fetch(_LOCK_SQL, (data.ids,))
    check_drift(plan, len(locked), "unprocessed events")
    if now_points != data.points:
        raise RemedyAbort(
            f"drift: LEARN is now worth {now_points} points, the plan said {data.points}; "
            "nothing was changed, request it again"
        )
    rows = await _with_ledger(writer, data.ids)
    actor = writer.identity.user_id if writer.identity else None
    paid = Paid({}, set())
    counts = dict.fromkeys(KINDS, 0)
    done: list[Row] = []
    failed: list[Row] = []
    for r in rows:
        v = verdict(r, data.tags, paid)
        if v.user_match is None:
            counts["fail"] += 1
            failed.append({"id": r["id"], "event_id": r["event_id"], "reason": v.reason})
            continue
        await writer.execute(sql.SQL("SAVEPOINT {}").format(SAVEPOINT))
        try:
            inserted = 0
            if v.kind == "award":
                awarded = await writer.fetch(
                    award_sql(enum_type),
                    {
                        "ledger_id": LEDGER_ID_PREFIX + str(r["id"]),
                        "user": v.user_match,
                        "activity": LEDGER_ACTIVITY,
                        "source": LEDGER_SOURCE,
                        "points": data.points,
                        "external_source": EXTERNAL_SOURCE,
                        "external": r["external_id"],
                        "approval": writer.approval_id,
                        "actor": actor,
                        "event": r["id"],
                    },
                )
                inserted = len(awarded)
                # inside the savepoint: an event rolled back takes its audit row along
                await writer.audit.after(
                    writer, "points_ledger", "INSERT", [str(a["id"]) for a in awarded]
                )
            marked = await writer.execute(_MARK_SQL, (v.user_match, r["id"]))
        except psycopg.Error as exc:
            await writer.execute(sql.SQL("ROLLBACK TO SAVEPOINT {}").format(SAVEPOINT))
            await writer.execute(sql.SQL("RELEASE SAVEPOINT {}").format(SAVEPOINT))
            counts["fail"] += 1
            failed.append({"id": r["id"], "event_id": r["event_id"], "reason": _refusal(exc)})
            continue
        await writer.execute(sql.SQL("RELEASE SAVEPOINT {}").format(SAVEPOINT))
        if marked != 1:
            raise RowCountError(f"rows of event {r['id']} marked processed", 1, marked)
        kind = v.kind if v.kind != "award" or inserted else "already"  # paid meanwhile
        counts[kind] += 1
        if kind == "award":
            paid.users[v.user_match] = str(r["id"])
            paid.keys.add(str(r["external_id"]))
        done.append(
            {"id": r["id"], "event_id": r["event_id"], "user_match": v.user_match, "did": kind}
        )
    check_count(plan, len(done) + len(failed), "events processed or reported")
    left = await writer.fetch(
        "SELECT count(*) AS n FROM kajabi_events WHERE id = ANY(%s) AND processed_at IS NULL",
        (data.ids,),
    )
    if int(left[0]["n"]) != len(failed):
        return Outcome(
            ok=False,
            summary=f"verification failed: {left[0]['n']} planned events are unprocessed, "
            f"{len(failed)} were reported; rolled back",
        )
    summary = (
        f"processed {len(done)} of {plural(plan.count, 'planned event')}: "
        f"{_tally(counts, data.points)}"
    )
    if failed:
        summary += f"; {len(failed)} left unprocessed, each with its reason below"
    return Outcome(
        ok=True,
        summary=summary,
        affected=len(done),
        rows=failed + done[: max(0, SAMPLE - len(failed))],
    )


def sample_reprocess(plan: Plan, n: int) -> Plan:
    """The oldest n planned events: `apply_reprocess` locks, recounts and processes only
    the events its data binds, in the plan's order (oldest first), and an event's fate
    depends only on the events before it, so the sample is processed as the whole plan
    would process them, and each ends processed or reported (the count n)."""
    return sample_first(plan, n, ReprocessData)


async def verify_reprocess(db: Reader, plan: Plan, run: Execution) -> Verification:
    """The events the plan bound that were processed since the execution was claimed:
    one transaction marked them all, or none."""
    if (trivial := nothing_planned(plan)) is not None:
        return trivial
    ids = plan.private(ReprocessData).ids
    since = run.claimed_at
    if since is not None and since.tzinfo is not None:  # the columns hold naive UTC
        since = since.astimezone(UTC).replace(tzinfo=None)
    rows = await db.fetch(
        "SELECT count(*) AS n FROM kajabi_events WHERE id = ANY(%s)"
        " AND processed_at IS NOT NULL AND (%s::timestamp IS NULL OR processed_at >= %s)",
        (ids, since, since),
    )
    n = int(rows[0]["n"])
    return Verification(
        landed=n > 0, found=f"{n} of the {plan.count} planned events are processed since"
    )


# --- dedupe-webhooks ----------------------------------------------------------------

PAYLOAD_PART = Part("duplicates", "kajabi_events", "e", DUPLICATE_PAYLOAD, "repeated Kajabi events")
# The plan finds the repeats without an index on payload: kajabi_events' blocks in
# pieces give the rows whose payload's hash (`jsonb_hash`, which equal payloads share)
# another row shares (commands/keyranges.py, `repeated_candidates`); among those, by
# primary key, each payload's rows numbered by (received_at, id), every one after the
# first a repeat, exactly the rows DUPLICATE_PAYLOAD names (a row without received_at is
# neither a repeat nor an earlier row there, its row comparison being NULL), with the
# first row of its payload kept. The count, the repeats' ids and the first SAMPLE
# repeats by id, per group of candidates (every row of a payload in one group).
_PAYLOAD_KEYED = "t.received_at IS NOT NULL AND t.payload IS NOT NULL"
# Hashing a payload costs microseconds (a ledger key's, a tenth of that): smaller pieces.
PAYLOADS_PER_PIECE = 250_000
_PAYLOAD_SURVEY_SQL = """
WITH r AS MATERIALIZED (
  SELECT d.* FROM (
    SELECT e.id, e.event_id, e.received_at, e.processed_at, e.user_match,
           row_number() OVER w AS rn, first_value(e.id) OVER w AS kept_row
    FROM kajabi_events AS e
    WHERE e.id = ANY(%(ids)s::text[]) AND e.received_at IS NOT NULL AND e.payload IS NOT NULL
    WINDOW w AS (PARTITION BY e.payload ORDER BY e.received_at, e.id)) AS d
  WHERE d.rn > 1
)
SELECT t.n, t.ids, x.id, x.event_id, x.received_at, x.processed_at, x.user_match, x.kept_row
FROM (SELECT count(*) AS n, array_agg(r.id) AS ids FROM r) AS t
LEFT JOIN LATERAL (SELECT * FROM r ORDER BY r.id LIMIT %(sample)s) AS x ON true
"""
_PAYLOAD_SAMPLE_KEYS = ("id", "event_id", "received_at", "processed_at", "user_match", "kept_row")
# Which of the repeats a grant names (learn_tag_grants is small), and which a ledger
# award's meta.kajabi_event names: the ledger (no index on meta) in pieces of blocks.
_GRANTS_SQL = (
    "SELECT count(DISTINCT g.kajabi_event_id) AS n FROM learn_tag_grants AS g"
    " WHERE g.kajabi_event_id = ANY(%(ids)s::text[])"
)
_LEDGER_NAMES_SQL = (
    "SELECT DISTINCT l.meta ->> 'kajabi_event' AS id FROM points_ledger AS l"
    " WHERE {rows} AND l.meta ->> 'kajabi_event' = ANY(%(ids)s::text[])"
)


async def _referenced(ctx: Context, ids: list[str]) -> Row:
    """How many of the events `ids` a grant names, and how many a ledger award does."""

    async def grants(db: Reader) -> tuple[int, list[Piece]]:
        await no_jit(db)
        n = int((await db.fetch(_GRANTS_SQL, {"ids": ids}))[0]["n"])
        return n, await block_pieces(db, "points_ledger")

    async def named(db: Reader, piece: Piece) -> list[Row]:
        query = _LEDGER_NAMES_SQL.format(rows=piece.where("ctid"))
        return await db.fetch(query, {"ids": ids, **piece.params()})

    n_grants, pieces = await ctx.gateway.read(grants)
    found = {str(r["id"]) for rows in await run_pieces(ctx.gateway, pieces, named) for r in rows}
    return {"grants": n_grants, "ledger": len(found)}


async def plan_dedupe_webhooks(ctx: Context, args: list[str]) -> Plan:
    if [a for a in args if a.strip()]:
        raise UsageError(f"`{DEDUPE_WEBHOOKS}` takes no arguments")

    groups = await repeated_candidates(
        ctx.gateway,
        "kajabi_events",
        "jsonb_hash_extended(t.payload, 0)",
        _PAYLOAD_KEYED,
        PAYLOADS_PER_PIECE,
    )
    n = 0
    ids: list[str] = []
    sample: list[Row] = []
    for rows in await judge_groups(ctx.gateway, _PAYLOAD_SURVEY_SQL, groups, SAMPLE):
        n += int(rows[0]["n"])
        ids += [str(i) for i in rows[0]["ids"] or []]
        sample += [{k: r[k] for k in _PAYLOAD_SAMPLE_KEYS} for r in rows if r["id"] is not None]
    targets = await first_by_id(ctx.gateway, "kajabi_events", sample, SAMPLE)
    refs = await _referenced(ctx, ids) if n else {}
    warnings: list[str] = []
    if n and (int(refs["grants"]) or int(refs["ledger"])):
        warnings.append(
            f"of the rows to delete, {refs['grants']} are named by learn_tag_grants and "
            f"{refs['ledger']} by a ledger award's meta.kajabi_event; those references "
            "will name a row that is only in the backup"
        )
    return Plan(
        remedy=DEDUPE_WEBHOOKS,
        args=list(args),
        title="Delete Kajabi events received more than once",
        summary=(
            f"delete {plural(n, 'Kajabi event')} whose payload an earlier row already holds, "
            "keeping the earliest of each (received_at, then id)"
            if n
            else "no payload was received twice; nothing to do"
        ),
        steps=delete_part_steps(PAYLOAD_PART, n),
        targets=targets,
        count=n,
        backup=f"whole rows copied first into {backup_display('kajabi_events')}" if n else None,
        warnings=warnings,
        needs_approval=n > 0,
        locks=LockScope(relations=["kajabi_events"]),
        data=Counts(counts={"duplicates": n}).model_dump(mode="json"),
    )


class DedupeWebhooksData(Counts):
    """The planned count (`counts`, which the whole recount is held to) and, in a sampled
    plan only, how many of the duplicates to delete (`sample`, by part): the first ones
    by id. An unsampled plan stores `Counts` alone, as before samples existed."""

    sample: dict[str, int] | None = None


def sample_dedupe_webhooks(plan: Plan, n: int) -> Plan:
    """The plan cut down to its first n duplicates by id (`count` n). Its apply still
    holds the whole recount to the planned count (drift), then locks, backs up and
    deletes only the first n rows that qualify, and checks that it deleted n."""
    if plan.count <= n:
        return plan
    data = DedupeWebhooksData.model_validate(plan.data)
    kept = DedupeWebhooksData(counts=data.counts, sample={PAYLOAD_PART.key: n})
    return plan.model_copy(
        update={
            "count": n,
            "targets": sorted(plan.targets, key=lambda t: str(t.get("id")))[:n],
            "data": kept.model_dump(mode="json"),
        },
        deep=True,
    )


def _first_sql(n: int) -> sql.Composed:
    """The first n rows of the part by id, locked: the sampled plan's rows."""
    return sql.SQL("{} LIMIT {}").format(PAYLOAD_PART.lock_sql(), sql.Literal(n))


async def _apply_dedupe_sample(
    writer: Writer, plan: Plan, data: DedupeWebhooksData, n: int
) -> Outcome:
    """A sampled plan (preflight): the whole plan's drift check, then the first n rows."""
    planned = sum(data.counts.values())
    whole = plan.model_copy(update={"count": planned})
    await check_parts(writer, whole, [PAYLOAD_PART], data.counts)
    ids = [str(r["id"]) for r in await writer.fetch(_first_sql(n))]
    if len(ids) != n:
        raise DriftError(PAYLOAD_PART.what, n, len(ids), 0)
    backup = await writer.backup_table(PAYLOAD_PART.table)
    copied = await writer.execute(backup_sql(PAYLOAD_PART.table, backup), (ids,))
    if copied != n:
        raise RowCountError(f"{PAYLOAD_PART.what} copied to the backup", n, copied)
    deleted = await writer.execute(delete_sql(PAYLOAD_PART.table, backup))
    check_count(plan, deleted, PAYLOAD_PART.what)
    remaining = await count_rows(writer, PAYLOAD_PART.count_sql())
    if remaining != planned - deleted:
        return Outcome(ok=False, summary="verification failed: other repeated payloads went")
    return Outcome(
        ok=True,
        summary=f"deleted {plural(deleted, 'repeated Kajabi event')} of the {planned} planned "
        f"(a sample), backed up in {backup.as_string()}",
        affected=deleted,
        backed_up=copied,
        backup_table=backup.as_string(),
    )


async def apply_dedupe_webhooks(writer: Writer, plan: Plan) -> Outcome:
    data = DedupeWebhooksData.model_validate(plan.data)
    if data.sample is not None:
        return await _apply_dedupe_sample(writer, plan, data, data.sample[PAYLOAD_PART.key])
    await check_parts(writer, plan, [PAYLOAD_PART], data.counts)
    if plan.count == 0:
        return Outcome(ok=True, summary="no repeated payload; nothing was changed")
    done = await delete_part(writer, plan, PAYLOAD_PART)
    backup, copied, deleted = done.backup, done.copied, done.deleted
    if done.remaining:
        return Outcome(ok=False, summary="verification failed: repeated payloads remain")
    return Outcome(
        ok=True,
        summary=f"deleted {plural(deleted, 'repeated Kajabi event')}, backed up in "
        f"{backup.as_string()}; every payload now appears once",
        affected=deleted,
        backed_up=copied,
        backup_table=backup.as_string(),
        rows=[{"table": "kajabi_events", "deleted": deleted, "backup": backup.as_string()}],
    )


REMATCH_EMAILS_REMEDY = add_remedy(
    Remedy(
        name=REMATCH_EMAILS,
        usage=f"/db {REMATCH_EMAILS}",
        summary=f"link {NO_USER} Kajabi events to the one user whose e-mail matches "
        "ignoring case (backed up)",
        plan=plan_rematch_emails,
        apply=apply_rematch,
        verify=verify_backup_of("kajabi_events"),
        approver_role="ADMIN",
        approvers=1,
        preflight=True,
        sample=sample_rematch,
    )
)
REPROCESS_WEBHOOKS = add_remedy(
    Remedy(
        name=REPROCESS,
        usage=f"/db {REPROCESS}",
        summary="process waiting Kajabi events: award LEARN once per Kajabi event id, mark "
        "each processed; failures reported, the others go ahead",
        plan=plan_reprocess,
        apply=apply_reprocess,
        verify=verify_reprocess,
        approver_role="ADMIN",
        approvers=1,
        preflight=True,
        sample=sample_reprocess,
    )
)
DEDUPE_WEBHOOKS_REMEDY = add_remedy(
    Remedy(
        name=DEDUPE_WEBHOOKS,
        usage=f"/db {DEDUPE_WEBHOOKS}",
        summary="keep the earliest of each repeated Kajabi payload, back up and delete the rest",
        plan=plan_dedupe_webhooks,
        apply=apply_dedupe_webhooks,
        verify=verify_backup_of("kajabi_events"),
        approver_role="ADMIN",
        approvers=2,
        destroys_data=True,
        preflight=True,
        sample=sample_dedupe_webhooks,
    )
)

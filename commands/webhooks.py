"""`/db webhooks`: the Kajabi webhook pipeline, as the operators' guide diagnoses it.

Where an event's e-mail is: the fixture, modelled on what Kajabi sends, keeps it in the
`email` column and in `payload.contact.email`; the guide's `payload.email` is in no
event. So every query here reads the column first, then `payload.contact.email`, then
`payload.email` (`EVENT_EMAIL`, the same expression `rematch-kajabi` uses), and the
e-mail finding counts how many events carry each, so a different production format
shows at once.

"Unmatched" in the operators' alert means linked to no existing user: not processed yet,
marked `NO_USER_FOUND`, or naming a user who no longer exists. The seed's handful of old
NO_USER_FOUND events (people who never signed up) is kept under the threshold for that
reason.

The repeated `external_event_id` finding is `/db integrity`'s own, from its cheap check
(`check_duplicate_events`: a catalog read while the unique index stands, else one
GROUP BY over the ledger rows with an event id), not its whole aggregate pass.

At a million events every check reads the whole table, so the work is what one pass
costs: the first three findings come from a single pass (the users each event names
hashed once, for the alert), the duplicate payloads from one count of distinct payload
hashes, and the three run at once on their own connections.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

from commands.base import (
    Context,
    Finding,
    Reader,
    Report,
    Row,
    Status,
    Thresholds,
    UsageError,
    human_duration,
    register,
)
from commands.integrity import duplicate_events
from commands.remedies.recovery import (
    EVENT_EMAIL,
    EVENT_TAG,
    NO_USER,
    REMATCH_SURVEY_TAIL,
    rematch_sql_for,
)
from commands.remedies.rowsets import plural

REMATCH_EMAILS = "rematch-emails"
REPROCESS = "reprocess-webhooks"
DEDUPE_WEBHOOKS = "dedupe-webhooks"

UNPROCESSED = "webhooks: unprocessed events"
ALERT = "webhooks: unmatched backlog (alert)"
EMAILS = "webhooks: NO_USER_FOUND with a matching user"
DUPLICATES = "webhooks: duplicate payloads"
EVENTS = "webhooks: events"  # the pass behind the first three

# `e` has an earlier twin: same payload, received before it (or at the same time with a
# smaller id). What `dedupe-webhooks` deletes; the first of each group is kept.
DUPLICATE_PAYLOAD = (
    "EXISTS (SELECT 1 FROM kajabi_events AS k WHERE k.payload = e.payload"
    " AND (k.received_at, k.id) < (e.received_at, e.id))"
)
# Wall-clock UTC, as the timestamp(3) columns hold it (Prisma's convention).
NOW_UTC = "(now() AT TIME ZONE 'UTC')"
# Unmatched, as an anti-join: `x` is the user the event names (never for NO_USER_FOUND),
# and an event whose `x` is missing is unmatched. Written as a join rather than
# `NOT EXISTS` so the planner may hash every user id in batches: the hashed subplan it
# picks for `NOT EXISTS` needs them all in work_mem, and without it probes the index once
# per event (a million probes at a million users).
UNMATCHED_JOIN = "LEFT JOIN users AS x ON x.id = e.user_match AND e.user_match <> %(none)s"

# The events' whole picture in one pass over `kajabi_events` (a sequential read, and the
# users each names hashed once): what is unprocessed, what waits unmatched (the alert),
# and where the NO_USER_FOUND events carry an e-mail (as `email_sources_sql` counts them,
# the parts of `EVENT_EMAIL`). The time bounds are computed once (InitPlans), not per row.
_EVENTS_SQL = f"""
SELECT count(*) FILTER (WHERE e.processed_at IS NULL) AS unprocessed,
       extract(epoch FROM {NOW_UTC} - min(e.received_at) FILTER (WHERE e.processed_at IS NULL))
         ::float8 AS oldest_s,
       count(*) FILTER (WHERE e.processed_at IS NULL AND e.received_at < (
         SELECT {NOW_UTC} - make_interval(secs => %(stuck)s))) AS stuck,
       count(*) FILTER (WHERE x.id IS NULL AND e.received_at < (
         SELECT {NOW_UTC} - make_interval(secs => %(wait)s))) AS waiting,
       count(*) FILTER (WHERE x.id IS NULL AND e.processed_at IS NULL AND e.received_at < (
         SELECT {NOW_UTC} - make_interval(secs => %(wait)s))) AS waiting_unprocessed,
       count(*) FILTER (WHERE x.id IS NULL AND e.processed_at IS NOT NULL
                          AND e.user_match = %(none)s AND e.received_at < (
         SELECT {NOW_UTC} - make_interval(secs => %(wait)s))) AS waiting_no_user_found,
       count(*) FILTER (WHERE e.user_match = %(none)s) AS no_user_found,
       count(*) FILTER (WHERE e.user_match = %(none)s AND nullif(btrim(e.email), '') IS NOT NULL)
         AS email_column,
       count(*) FILTER (WHERE e.user_match = %(none)s
                          AND e.payload -> 'contact' ->> 'email' IS NOT NULL) AS contact_email,
       count(*) FILTER (WHERE e.user_match = %(none)s AND e.payload ->> 'email' IS NOT NULL)
         AS payload_email
FROM kajabi_events AS e {UNMATCHED_JOIN}
"""  # noqa: S608 (constant fragments of this module)
# The alert's part of it alone, as an anti-join (for `/db health` and its watchdog).
_ALERT_SQL = f"""
SELECT count(*) AS waiting,
       count(*) FILTER (WHERE e.processed_at IS NULL) AS waiting_unprocessed,
       count(*) FILTER (WHERE e.processed_at IS NOT NULL AND e.user_match = %(none)s)
         AS waiting_no_user_found
FROM kajabi_events AS e {UNMATCHED_JOIN}
WHERE x.id IS NULL AND e.received_at < (SELECT {NOW_UTC} - make_interval(secs => %(wait)s))
"""  # noqa: S608 (constant fragments of this module)
_UNPROCESSED_SAMPLE_SQL = f"""
SELECT e.id, e.event_id, e.received_at,
       extract(epoch FROM {NOW_UTC} - e.received_at)::int AS age_s,
       {EVENT_EMAIL} AS email, {EVENT_TAG} AS tag
FROM kajabi_events AS e WHERE e.processed_at IS NULL
ORDER BY e.received_at, e.id LIMIT %(sample)s
"""  # noqa: S608 (constant fragments of this module)
_EMAIL_SAMPLE_TAIL = (
    "SELECT id, event_id, mail AS webhook_email, user_email, matches FROM m"
    " WHERE matches > 0 ORDER BY matches DESC, id LIMIT %(sample)s"
)
# Payloads received more than once, without sorting or hashing a million JSON documents
# (a GROUP BY payload sorted them on disk): equal payloads have equal 64-bit hashes, so
# there is none while no hash repeats, which one count of distinct hashes tells; only
# then are the repeated hashes listed and the payloads behind them compared.
_REPEATS_SQL = """
SELECT count(*) - count(DISTINCT jsonb_hash_extended(payload, 0)) AS repeats FROM kajabi_events
"""
_REPEATED_HASHES_SQL = """
SELECT jsonb_hash_extended(payload, 0) AS h FROM kajabi_events GROUP BY 1 HAVING count(*) > 1
"""
_DUPLICATES_SQL = """
SELECT min(event_id) AS event_id, count(*) AS copies,
       count(*) FILTER (WHERE processed_at IS NOT NULL) AS processed,
       min(received_at) AS first_received, max(received_at) AS last_received,
       count(*) OVER () AS groups, sum(count(*) - 1) OVER () AS extra
FROM kajabi_events WHERE jsonb_hash_extended(payload, 0) = ANY (%(hashes)s::bigint[])
GROUP BY payload HAVING count(*) > 1
ORDER BY count(*) DESC, min(received_at) LIMIT %(sample)s
"""
# Every check here reads a whole table, whose estimated cost makes PostgreSQL compile the
# query with JIT: seconds of compiling at a million events for a scan that takes less.
# Off for the check's own transaction only; work_mem keeps a million user ids (the alert's
# anti-join) or payload hashes in memory rather than in batches on disk.
_TUNE_SQL = "SELECT set_config('jit', 'off', true), set_config('work_mem', '64MB', true)"


def _n(value: Any) -> int:
    """A count from a row; NULL (no row matched an aggregate) is 0."""
    return int(value or 0)


async def _events(t: Thresholds, db: Reader) -> Row:
    await db.fetch(_TUNE_SQL)
    params = {"none": NO_USER, "stuck": t.webhook_stuck_s, "wait": t.webhook_unmatched_wait_s}
    (row,) = await db.fetch(_EVENTS_SQL, params)
    return row


async def unprocessed_finding(t: Thresholds, row: Row, db: Reader) -> Finding:
    n, stuck = _n(row["unprocessed"]), _n(row["stuck"])
    if n == 0:
        return Finding(check=UNPROCESSED, status=Status.OK, summary="every event is processed")
    sample = await db.fetch(_UNPROCESSED_SAMPLE_SQL, {"sample": t.max_rows})
    for r in sample:
        r["age"] = human_duration(r.pop("age_s"))
    oldest = human_duration(row["oldest_s"])
    return Finding(
        check=UNPROCESSED,
        status=Status.WARN if stuck else Status.OK,
        summary=f"{plural(n, 'event')} not processed yet, the oldest received {oldest} ago; "
        f"{stuck} of them over {human_duration(t.webhook_stuck_s)} ago",
        rows=sample,
        hint=f"`/db {REPROCESS}` awards their LEARN points (once per Kajabi event id) and "
        "marks them processed"
        if stuck
        else None,
    )


def alert_finding(t: Thresholds, row: Row) -> Finding:
    n, unprocessed = _n(row["waiting"]), _n(row["waiting_unprocessed"])
    nuf = _n(row["waiting_no_user_found"])
    over = n > t.webhook_unmatched_max
    wait = human_duration(t.webhook_unmatched_wait_s)
    return Finding(
        check=ALERT,
        status=Status.CRIT if over else Status.OK,
        summary=f"{plural(n, 'event')} unmatched for over {wait} (alert above "
        f"{t.webhook_unmatched_max}): {unprocessed} not processed, {nuf} {NO_USER}, "
        f"{n - unprocessed - nuf} processed with no user or one who no longer exists",
        hint=f"`/db {REPROCESS}` for the unprocessed, `/db {REMATCH_EMAILS}` for e-mails "
        "that differ only in case"
        if over
        else None,
    )


async def emails_finding(t: Thresholds, row: Row, db: Reader) -> Finding:
    params = {"none": NO_USER, "sample": t.max_rows}
    read = (
        f"e-mail read from the email column ({_n(row['email_column'])}), else "
        f"payload.contact.email ({_n(row['contact_email'])}), else payload.email "
        f"({_n(row['payload_email'])}) of {_n(row['no_user_found'])} {NO_USER} events"
    )
    one = many = 0
    if _n(row["no_user_found"]):  # else nothing to match: no need to read every user's e-mail
        (counted,) = await db.fetch(rematch_sql_for("no_user_found", REMATCH_SURVEY_TAIL), params)
        one, many = _n(counted["one"]), _n(counted["many"])
    if one + many == 0:
        return Finding(
            check=EMAILS,
            status=Status.OK,
            summary=f"no {NO_USER} event's e-mail matches a user, ignoring case; {read}",
        )
    sample = await db.fetch(rematch_sql_for("no_user_found", _EMAIL_SAMPLE_TAIL), params)
    return Finding(
        check=EMAILS,
        status=Status.WARN,
        summary=f"{plural(one + many, NO_USER + ' event')} match a user when case is ignored: "
        f"{one} exactly one user, {many} several; {read}",
        rows=sample,
        hint=f"`/db {REMATCH_EMAILS}` links the {one} with one match (backed up); events "
        "matching several users are left to a person",
    )


async def check_events(t: Thresholds, found: dict[str, Finding], db: Reader) -> Finding:
    """The unprocessed, alert and e-mail findings, from one pass (into `found`)."""
    row = await _events(t, db)
    found[UNPROCESSED] = await unprocessed_finding(t, row, db)
    found[ALERT] = alert_finding(t, row)
    found[EMAILS] = await emails_finding(t, row, db)
    return Finding(check=EVENTS, status=Status.OK, summary="")


# Each alone (`/db health` and its watchdog run the alert).
async def check_unprocessed(t: Thresholds, db: Reader) -> Finding:
    return await unprocessed_finding(t, await _events(t, db), db)


async def check_alert(t: Thresholds, db: Reader) -> Finding:
    await db.fetch(_TUNE_SQL)
    params = {"none": NO_USER, "wait": t.webhook_unmatched_wait_s}
    (row,) = await db.fetch(_ALERT_SQL, params)
    return alert_finding(t, row)


async def check_emails(t: Thresholds, db: Reader) -> Finding:
    return await emails_finding(t, await _events(t, db), db)


async def check_duplicates(t: Thresholds, db: Reader) -> Finding:
    await db.fetch(_TUNE_SQL)
    (repeats,) = await db.fetch(_REPEATS_SQL)
    hashes = (
        [int(r["h"]) for r in await db.fetch(_REPEATED_HASHES_SQL)]
        if _n(repeats["repeats"])
        else []
    )
    rows = (
        await db.fetch(_DUPLICATES_SQL, {"hashes": hashes, "sample": t.max_rows}) if hashes else []
    )
    groups = _n(rows[0]["groups"]) if rows else 0
    extra = _n(rows[0]["extra"]) if rows else 0
    if groups == 0:
        return Finding(check=DUPLICATES, status=Status.OK, summary="no payload was received twice")
    return Finding(
        check=DUPLICATES,
        status=Status.WARN,
        summary=f"{plural(groups, 'payload')} received more than once "
        f"({plural(extra, 'extra row')})",
        rows=[{k: v for k, v in r.items() if k not in ("groups", "extra")} for r in rows],
        hint=f"`/db {DEDUPE_WEBHOOKS}` keeps the earliest of each, backs up and deletes "
        "the rest (two approvals)",
    )


@register(
    "webhooks",
    usage="/db webhooks",
    summary="Kajabi events: unprocessed, unmatched, mis-cased e-mails, duplicates",
)
async def webhooks(ctx: Context, args: list[str]) -> Report:
    if args:
        raise UsageError("`webhooks` takes no arguments")
    gw, t = ctx.gateway, ctx.thresholds
    found: dict[str, Finding] = {}
    # Started longest first: each check takes one of the pool's few connections.
    replayed, events, duplicates = await asyncio.gather(
        duplicate_events(gw),  # integrity's, every statement bounded
        gw.run_check(EVENTS, partial(check_events, t, found)),
        gw.run_check(DUPLICATES, partial(check_duplicates, t)),
    )
    by_events = (UNPROCESSED, ALERT, EMAILS)
    if events.status is not Status.OK:  # the pass could not answer: none of its three can
        found = {name: events.model_copy(update={"check": name}) for name in by_events}
    findings = [*(found[name] for name in by_events), duplicates, replayed]
    return Report(title="Kajabi webhooks", target=gw.target, findings=findings).sorted()

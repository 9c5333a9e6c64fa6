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
hashed once, for the alert, in batches that fit the processor's caches), the duplicate
payloads from one sort of the payloads' hashes. Those two run at once beside integrity's
pieces of the ledger (two at a time), each on its own connection and none with parallel
workers of its own: on two cores they would only add their overhead. At 1,000,000 users
the replays are most of the work (20,000,000 ledger rows read: about 2.3 s of server
CPU), the rest about 1.4 s.
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
# At most this many NO_USER_FOUND events the e-mail survey reads by id (the pass lists
# them), more in a scan of the events: a thousand probes of the primary key take a few
# milliseconds, the scan 0.15 s at 1,000,000 events (0.02 s at 100,000).
NUF_IDS = 1000
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
# the parts of `EVENT_EMAIL`: `nuf`, bits 1, 2 and 4, NULL for every other event), and
# while they are few (NUF_IDS) their ids, so that the e-mail survey reads them by id
# rather than every event again. The time bounds are computed once (InitPlans), not per
# row. Each event comes to the join as its key, two times and `nuf`, so the join carries
# (and writes out, in batches) a few bytes an event rather than its payload
# (`_TUNE_EVENTS_SQL`).
_EVENTS_SQL = f"""
SELECT count(*) FILTER (WHERE e.processed_at IS NULL) AS unprocessed,
       min(e.received_at) FILTER (WHERE e.processed_at IS NULL) AS oldest_at,
       extract(epoch FROM {NOW_UTC} - min(e.received_at) FILTER (WHERE e.processed_at IS NULL))
         ::float8 AS oldest_s,
       count(*) FILTER (WHERE e.processed_at IS NULL AND e.received_at < (
         SELECT {NOW_UTC} - make_interval(secs => %(stuck)s))) AS stuck,
       count(*) FILTER (WHERE x.id IS NULL AND e.received_at < (
         SELECT {NOW_UTC} - make_interval(secs => %(wait)s))) AS waiting,
       count(*) FILTER (WHERE x.id IS NULL AND e.processed_at IS NULL AND e.received_at < (
         SELECT {NOW_UTC} - make_interval(secs => %(wait)s))) AS waiting_unprocessed,
       count(*) FILTER (WHERE x.id IS NULL AND e.processed_at IS NOT NULL
                          AND e.nuf IS NOT NULL AND e.received_at < (
         SELECT {NOW_UTC} - make_interval(secs => %(wait)s))) AS waiting_no_user_found,
       count(e.nuf) AS no_user_found,
       CASE WHEN count(e.nuf) <= %(few)s THEN array_agg(e.nuf_id) FILTER (WHERE e.nuf IS NOT NULL)
       END AS nuf_ids,
       count(*) FILTER (WHERE e.nuf & 1 <> 0) AS email_column,
       count(*) FILTER (WHERE e.nuf & 2 <> 0) AS contact_email,
       count(*) FILTER (WHERE e.nuf & 4 <> 0) AS payload_email
FROM (SELECT e.user_match, e.processed_at, e.received_at,
             CASE WHEN e.user_match = %(none)s
               THEN (nullif(btrim(e.email), '') IS NOT NULL)::int
                    + 2 * (e.payload -> 'contact' ->> 'email' IS NOT NULL)::int
                    + 4 * (e.payload ->> 'email' IS NOT NULL)::int END AS nuf,
             CASE WHEN e.user_match = %(none)s THEN e.id END AS nuf_id
      FROM kajabi_events AS e OFFSET 0) AS e
{UNMATCHED_JOIN}
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
# The oldest unprocessed events, none received before the oldest the pass counted
# (`oldest`): while they are recent, the planner reads only the newest part of the
# `received_at` index; else it scans the table, as it would without that bound.
_UNPROCESSED_SAMPLE_SQL = f"""
SELECT e.id, e.event_id, e.received_at,
       extract(epoch FROM {NOW_UTC} - e.received_at)::int AS age_s,
       {EVENT_EMAIL} AS email, {EVENT_TAG} AS tag
FROM kajabi_events AS e WHERE e.processed_at IS NULL AND e.received_at >= %(oldest)s
ORDER BY e.received_at, e.id LIMIT %(sample)s
"""  # noqa: S608 (constant fragments of this module)
# The e-mail finding's survey and sample at once (one read of the users' e-mails): the
# events of `m` that match a user, most matches first, each row with the counts of
# events matching exactly one user and several.
_EMAIL_TAIL = """
SELECT id, event_id, webhook_email, user_email, matches, one, many
FROM (SELECT id, event_id, mail AS webhook_email, user_email, matches,
             count(*) FILTER (WHERE matches = 1) OVER () AS one,
             count(*) FILTER (WHERE matches > 1) OVER () AS many
      FROM m) AS c
WHERE matches > 0 ORDER BY matches DESC, id LIMIT %(sample)s
"""
# Payloads received more than once, without sorting or hashing a million JSON documents
# (a GROUP BY payload sorted them on disk): equal payloads have equal 64-bit hashes, so
# only the payloads whose hash repeats are compared. The repeated hashes come from one
# sort of the hashes (`_TUNE_DUPLICATES_SQL`): 0.57 s of CPU at 1,000,000 events, where a
# count of distinct hashes (0.46 s) followed, when one repeats, by a hash table of them
# all (1.19 s) took three times as long. The sort also gives each repeated hash's first
# and last row (their ctid): where no hash repeats more than twice, those rows are all
# the payloads to compare, read by ctid (`_DUPLICATES_BY_TID_SQL`) instead of hashing
# every payload again (0.41 s at 1,000,000 events). A row updated in between is missed
# at its old place: its copies show on the next run.
_REPEATED_HASHES_SQL = """
SELECT jsonb_hash_extended(payload, 0) AS h, count(*) AS n,
       min(ctid)::text AS first, max(ctid)::text AS last
FROM kajabi_events GROUP BY 1 HAVING count(*) > 1
"""
_DUPLICATES_TEMPLATE = """
SELECT min(event_id) AS event_id, count(*) AS copies,
       count(*) FILTER (WHERE processed_at IS NOT NULL) AS processed,
       min(received_at) AS first_received, max(received_at) AS last_received,
       count(*) OVER () AS groups, sum(count(*) - 1) OVER () AS extra
FROM kajabi_events WHERE @ROWS@
GROUP BY payload HAVING count(*) > 1
ORDER BY count(*) DESC, min(received_at) LIMIT %(sample)s
"""
_DUPLICATES_SQL = _DUPLICATES_TEMPLATE.replace(
    "@ROWS@", "jsonb_hash_extended(payload, 0) = ANY (%(hashes)s::bigint[])"
)
_DUPLICATES_BY_TID_SQL = _DUPLICATES_TEMPLATE.replace("@ROWS@", "ctid = ANY (%(tids)s::tid[])")
# Every check here reads a whole table, whose estimated cost makes PostgreSQL compile the
# query with JIT: seconds of compiling at a million events for a scan that takes less.
# Off for the check's own transaction only. The alert alone (`check_alert`, as `/db
# health` runs it) keeps its hash table of the user ids in memory.
_TUNE_SQL = "SELECT set_config('jit', 'off', true), set_config('work_mem', '64MB', true)"
# The checks of `/db webhooks` run side by side (and beside integrity's pieces of the
# ledger), so none takes parallel workers of its own: on two cores they would only add
# their overhead. The events pass hashes every user id for its anti-join in batches of
# 1 MB (PostgreSQL partitions both sides on disk, then joins each part): 0.73 s of CPU at
# 1,000,000 events and users, where one 49 MB hash table took 1.32 s, its every probe a
# miss of the processor's caches (0.06 s against 0.07 s at 100,000).
_TUNE_EVENTS_SQL = (
    "SELECT set_config('jit', 'off', true), set_config('work_mem', '1MB', true),"
    " set_config('max_parallel_workers_per_gather', '0', true)"
)
# The e-mail survey after it: hash tables of the few NO_USER_FOUND events and their
# matches kept in memory.
_TUNE_EMAILS_SQL = "SELECT set_config('work_mem', '64MB', true)"
# The duplicate payloads: one sort of the payloads' hashes, in memory, not a hash table.
_TUNE_DUPLICATES_SQL = (
    "SELECT set_config('jit', 'off', true), set_config('work_mem', '64MB', true),"
    " set_config('max_parallel_workers_per_gather', '0', true),"
    " set_config('enable_hashagg', 'off', true)"
)


def _n(value: Any) -> int:
    """A count from a row; NULL (no row matched an aggregate) is 0."""
    return int(value or 0)


async def _events(t: Thresholds, db: Reader) -> Row:
    await db.fetch(_TUNE_EVENTS_SQL)
    params = {
        "none": NO_USER,
        "stuck": t.webhook_stuck_s,
        "wait": t.webhook_unmatched_wait_s,
        "few": NUF_IDS,
    }
    (row,) = await db.fetch(_EVENTS_SQL, params)
    return row


async def unprocessed_finding(t: Thresholds, row: Row, db: Reader) -> Finding:
    n, stuck = _n(row["unprocessed"]), _n(row["stuck"])
    if n == 0:
        return Finding(check=UNPROCESSED, status=Status.OK, summary="every event is processed")
    sample = await db.fetch(
        _UNPROCESSED_SAMPLE_SQL, {"oldest": row["oldest_at"], "sample": t.max_rows}
    )
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
    ids = row["nuf_ids"]
    params = {"none": NO_USER, "sample": t.max_rows, "ids": ids}
    read = (
        f"e-mail read from the email column ({_n(row['email_column'])}), else "
        f"payload.contact.email ({_n(row['contact_email'])}), else payload.email "
        f"({_n(row['payload_email'])}) of {_n(row['no_user_found'])} {NO_USER} events"
    )
    rows: list[Row] = []
    if _n(row["no_user_found"]):  # else nothing to match: no need to read every user's e-mail
        await db.fetch(_TUNE_EMAILS_SQL)
        scope = "no_user_found" if ids is None else "no_user_found_ids"
        rows = await db.fetch(rematch_sql_for(scope, _EMAIL_TAIL), params)
    one, many = (_n(rows[0]["one"]), _n(rows[0]["many"])) if rows else (0, 0)
    if one + many == 0:
        return Finding(
            check=EMAILS,
            status=Status.OK,
            summary=f"no {NO_USER} event's e-mail matches a user, ignoring case; {read}",
        )
    sample = [{k: v for k, v in r.items() if k not in ("one", "many")} for r in rows]
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
    await db.fetch(_TUNE_DUPLICATES_SQL)
    repeated = await db.fetch(_REPEATED_HASHES_SQL)
    rows: list[Row] = []
    if any(r["n"] > 2 for r in repeated):
        hashes = [int(r["h"]) for r in repeated]
        rows = await db.fetch(_DUPLICATES_SQL, {"hashes": hashes, "sample": t.max_rows})
    elif repeated:
        tids = [tid for r in repeated for tid in (r["first"], r["last"])]
        rows = await db.fetch(_DUPLICATES_BY_TID_SQL, {"tids": tids, "sample": t.max_rows})
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

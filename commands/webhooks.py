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
    Status,
    Thresholds,
    UsageError,
    human_duration,
    register,
)
from commands.integrity import DUPLICATE_EVENTS, check_duplicate_events
from commands.remedies.recovery import (
    EVENT_EMAIL,
    EVENT_TAG,
    NO_USER,
    REMATCH_SURVEY_TAIL,
    email_sources_sql,
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

# `e` has an earlier twin: same payload, received before it (or at the same time with a
# smaller id). What `dedupe-webhooks` deletes; the first of each group is kept.
DUPLICATE_PAYLOAD = (
    "EXISTS (SELECT 1 FROM kajabi_events AS k WHERE k.payload = e.payload"
    " AND (k.received_at, k.id) < (e.received_at, e.id))"
)
# Wall-clock UTC, as the timestamp(3) columns hold it (Prisma's convention).
NOW_UTC = "(now() AT TIME ZONE 'UTC')"
# `x` is the event's user, joined on its id (the primary key): NULL when there is none.
# A join rather than NOT EXISTS under the OR, which the planner runs as one index probe
# per event (5.7 s at 1,000,000 events, against 1.0 s for the hash join).
UNMATCHED = "(e.user_match IS NULL OR e.user_match = %(none)s OR x.id IS NULL)"

_UNPROCESSED_SQL = f"""
SELECT count(*) AS n,
       extract(epoch FROM {NOW_UTC} - min(e.received_at))::float8 AS oldest_s,
       count(*) FILTER (WHERE e.received_at < {NOW_UTC} - make_interval(secs => %(stuck)s))
         AS stuck
FROM kajabi_events AS e WHERE e.processed_at IS NULL
"""  # noqa: S608 (constant fragments of this module)
_UNPROCESSED_SAMPLE_SQL = f"""
SELECT e.id, e.event_id, e.received_at,
       extract(epoch FROM {NOW_UTC} - e.received_at)::int AS age_s,
       {EVENT_EMAIL} AS email, {EVENT_TAG} AS tag
FROM kajabi_events AS e WHERE e.processed_at IS NULL
ORDER BY e.received_at, e.id LIMIT %(sample)s
"""  # noqa: S608 (constant fragments of this module)
_ALERT_SQL = f"""
SELECT count(*) AS n,
       count(*) FILTER (WHERE e.processed_at IS NULL) AS unprocessed,
       count(*) FILTER (WHERE e.processed_at IS NOT NULL AND e.user_match = %(none)s)
         AS no_user_found
FROM kajabi_events AS e LEFT JOIN users AS x ON x.id = e.user_match
WHERE e.received_at < {NOW_UTC} - make_interval(secs => %(wait)s) AND {UNMATCHED}
"""  # noqa: S608 (constant fragments of this module)
_EMAIL_SAMPLE_TAIL = (
    "SELECT id, event_id, mail AS webhook_email, user_email, matches FROM m"
    " WHERE matches > 0 ORDER BY matches DESC, id LIMIT %(sample)s"
)
_DUPLICATES_SQL = """
SELECT count(*) AS groups, coalesce(sum(n - 1), 0)::bigint AS extra
FROM (SELECT count(*) AS n FROM kajabi_events GROUP BY payload HAVING count(*) > 1) AS d
"""
_DUPLICATES_SAMPLE_SQL = """
SELECT min(event_id) AS event_id, count(*) AS copies,
       count(*) FILTER (WHERE processed_at IS NOT NULL) AS processed,
       min(received_at) AS first_received, max(received_at) AS last_received
FROM kajabi_events GROUP BY payload HAVING count(*) > 1
ORDER BY count(*) DESC, min(received_at) LIMIT %(sample)s
"""


def _n(value: Any) -> int:
    """A count from a row; NULL (no row matched an aggregate) is 0."""
    return int(value or 0)


async def check_unprocessed(t: Thresholds, db: Reader) -> Finding:
    (row,) = await db.fetch(_UNPROCESSED_SQL, {"stuck": t.webhook_stuck_s})
    n, stuck = _n(row["n"]), _n(row["stuck"])
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


async def check_alert(t: Thresholds, db: Reader) -> Finding:
    params = {"none": NO_USER, "wait": t.webhook_unmatched_wait_s}
    (row,) = await db.fetch(_ALERT_SQL, params)
    n, unprocessed, nuf = _n(row["n"]), _n(row["unprocessed"]), _n(row["no_user_found"])
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


async def check_emails(t: Thresholds, db: Reader) -> Finding:
    params = {"none": NO_USER, "sample": t.max_rows}
    (sources,) = await db.fetch(email_sources_sql("no_user_found"), params)
    (counted,) = await db.fetch(rematch_sql_for("no_user_found", REMATCH_SURVEY_TAIL), params)
    one, many = _n(counted["one"]), _n(counted["many"])
    read = (
        f"e-mail read from the email column ({sources['email_column']}), else "
        f"payload.contact.email ({sources['contact_email']}), else payload.email "
        f"({sources['payload_email']}) of {sources['events']} {NO_USER} events"
    )
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


async def check_duplicates(t: Thresholds, db: Reader) -> Finding:
    (row,) = await db.fetch(_DUPLICATES_SQL)
    groups, extra = _n(row["groups"]), _n(row["extra"])
    if groups == 0:
        return Finding(check=DUPLICATES, status=Status.OK, summary="no payload was received twice")
    return Finding(
        check=DUPLICATES,
        status=Status.WARN,
        summary=f"{plural(groups, 'payload')} received more than once "
        f"({plural(extra, 'extra row')})",
        rows=await db.fetch(_DUPLICATES_SAMPLE_SQL, {"sample": t.max_rows}),
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
    findings = await asyncio.gather(
        gw.run_check(UNPROCESSED, partial(check_unprocessed, t)),
        gw.run_check(ALERT, partial(check_alert, t)),
        gw.run_check(EMAILS, partial(check_emails, t)),
        gw.run_check(DUPLICATES, partial(check_duplicates, t)),
        gw.run_check(DUPLICATE_EVENTS, check_duplicate_events),
    )
    return Report(title="Kajabi webhooks", target=gw.target, findings=list(findings)).sorted()

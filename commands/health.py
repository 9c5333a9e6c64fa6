"""`/db health`: the connection-and-health report, one finding per check, worst first.

Each check is a small named query over the live catalog (PgHero style); nothing is
assumed about the schema that the catalog can tell instead, because production drifts.

Two checks read whole tables (`scan_checks`): the webhook backlog (every Kajabi event
against the users) and the replayed awards while no unique index rules them out (every
ledger row): a few seconds of server CPU at 1,000,000 users. The watchdog counts them on
one tick in ten (`/db health --exact`) and keeps those exact counts here
(`remember_counts`) until its next such tick; until then `/db health`, the watchdog's
other ticks included, shows them with the time they were counted instead of counting
again. With no recent count (no watchdog in this process, or it stopped), or with
`--exact`, `/db health` counts them itself.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

from commands.base import (
    DEFAULT_APP_ROLES,
    Context,
    Finding,
    Gateway,
    Reader,
    Report,
    Row,
    Status,
    Thresholds,
    UsageError,
    human_duration,
    human_size,
    register,
    shown_queries,
)
from commands.integrity import check_duplicate_events, duplicate_events, events_unique_index
from commands.migrations import (
    AUDIT_CHECK,
    MIGRATIONS_TABLE,
    Attempt,
    applied_sql,
    check_audit_trail,
    classify,
    history_sql,
    migration_schemas,
    prisma_lock_holders,
)

EXPECTED_VIEWS = (
    "leaderboard_totals",
    "leaderboard_30d",
    "activity_metrics",
    "cohort_metrics",
    "school_metrics",
    "time_series_metrics",
)
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", ""}


def _worst(*statuses: Status) -> Status:
    return min(statuses, key=lambda s: s.severity) if statuses else Status.OK


# --- connection string --------------------------------------------------------------


def lint_connection_string(masked_dsn: str) -> Finding:
    """The mistakes the operators meet most: wrong scheme, no port, no sslmode off-host.

    Works on the masked DSN: scheme, host, port and options survive masking.
    """
    problems: list[str] = []
    status = Status.OK
    if masked_dsn.startswith("<"):  # the gateway's placeholder: libpq could not parse it
        return Finding(
            check="connection string",
            status=Status.CRIT,
            summary=f"{masked_dsn}: libpq cannot parse it",
            hint="expected form: postgresql://user:password@host:port/database?sslmode=require",
        )
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", masked_dsn) is None:
        return Finding(
            check="connection string",
            status=Status.OK,
            summary=f"key=value connection string `{masked_dsn}`",
        )
    parts = urlsplit(masked_dsn)
    if parts.scheme == "postgres":
        problems.append("scheme is `postgres://`; the expected form is `postgresql://`")
    elif parts.scheme != "postgresql":
        problems.append(f"unknown scheme `{parts.scheme}://`")
        status = Status.CRIT
    try:
        port = parts.port
    except ValueError:
        port = None
        problems.append("port is not a number")
        status = Status.CRIT
    host = parts.hostname or ""
    if port is None and ":" not in parts.netloc.rpartition("@")[2].strip("[]"):
        problems.append("no port given (libpq falls back to 5432; the Supabase pooler uses 6543)")
    sslmode = parse_qs(parts.query).get("sslmode", [None])[0]
    if host not in LOCAL_HOSTS and sslmode is None:
        problems.append("no sslmode for a remote host (use sslmode=require)")
    elif sslmode == "disable" and host not in LOCAL_HOSTS:
        problems.append("sslmode=disable to a remote host: diagnostic use only")
    if problems:
        status = _worst(status, Status.WARN)
    return Finding(
        check="connection string",
        status=status,
        summary=(
            f"`{masked_dsn}`: " + "; ".join(problems)
            if problems
            else f"`{masked_dsn}` is well formed"
        ),
        hint="expected form: postgresql://user:password@host:port/database?sslmode=require"
        if problems
        else None,
    )


def reachability_finding(probe: Row, target: str) -> Finding:
    version = str(probe.get("server_version", "?"))
    uptime = human_duration(probe["uptime_s"])
    summary = (
        f"connected to {target} in {probe['connect_ms']} ms: PostgreSQL {version}, "
        f"database `{probe['database']}` as `{probe['user']}`, up {uptime}"
    )
    status = Status.OK
    if probe.get("in_recovery"):
        summary += "; server is a read-only standby (in recovery)"
        status = Status.WARN
    return Finding(check="reachability", status=status, summary=summary, rows=[dict(probe)])


# --- sessions -----------------------------------------------------------------------

_CONNECTIONS_SQL = """
SELECT coalesce(state, 'unknown') AS state, count(*)::int AS sessions,
       coalesce(max(extract(epoch FROM now() - state_change)), 0)::float AS oldest_s
FROM pg_stat_activity
WHERE backend_type = 'client backend'
GROUP BY 1 ORDER BY 2 DESC
"""
_CONNECTION_LIMITS_SQL = """
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int AS reserved,
       (SELECT count(*)::int FROM pg_stat_activity) AS all_backends
"""
_TOP_CLIENTS_SQL = """
SELECT 'application' AS kind, coalesce(nullif(application_name, ''), '(none)') AS name,
       count(*)::int AS sessions
FROM pg_stat_activity WHERE backend_type = 'client backend' GROUP BY 2
UNION ALL
SELECT 'user', coalesce(usename::text, '(none)'), count(*)::int
FROM pg_stat_activity WHERE backend_type = 'client backend' GROUP BY 2
ORDER BY 3 DESC
"""


async def check_connections(th: Thresholds, db: Reader) -> Finding:
    by_state = await db.fetch(_CONNECTIONS_SQL)
    (limits,) = await db.fetch(_CONNECTION_LIMITS_SQL)
    clients = await db.fetch(_TOP_CLIENTS_SQL)
    used = sum(int(r["sessions"]) for r in by_state)
    usable = max(1, int(limits["max_connections"]) - int(limits["reserved"]))
    pct = 100.0 * used / usable
    status = Status.OK
    if pct >= th.connections_crit_pct:
        status = Status.CRIT
    elif pct >= th.connections_warn_pct:
        status = Status.WARN
    states = ", ".join(f"{r['sessions']} {r['state']}" for r in by_state) or "none"
    apps = [r for r in clients if r["kind"] == "application"][:3]
    users = [r for r in clients if r["kind"] == "user"][:3]
    top = "; top apps " + ", ".join(f"{r['name']} ({r['sessions']})" for r in apps)
    top += "; top users " + ", ".join(f"{r['name']} ({r['sessions']})" for r in users)
    return Finding(
        check="connections",
        status=status,
        summary=f"{used}/{usable} client connections ({pct:.0f}%): {states}{top}",
        rows=by_state
        + [{"state": f"{r['kind']}: {r['name']}", "sessions": r["sessions"]} for r in apps + users],
        hint="see `/db connections`; idle ones can go with `/db kill-idle`"
        if status is not Status.OK
        else None,
    )


_LONG_QUERIES_SQL = """
SELECT pid, usename::text AS "user", application_name AS app,
       extract(epoch FROM now() - query_start)::float AS duration_s,
       coalesce(wait_event_type || ':' || wait_event, '') AS wait,
       left(regexp_replace(query, '\\s+', ' ', 'g'), %(chars)s) AS query
FROM pg_stat_activity
WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_backend_pid()
  AND now() - query_start > make_interval(secs => %(warn)s)
ORDER BY query_start
LIMIT %(limit)s
"""


async def check_long_queries(th: Thresholds, db: Reader) -> Finding:
    rows = await db.fetch(
        _LONG_QUERIES_SQL,
        {"chars": th.query_chars, "warn": th.long_query_warn_s, "limit": th.max_rows},
    )
    shown_queries(rows, th.show_query_literals)
    if not rows:
        return Finding(
            check="long-running queries",
            status=Status.OK,
            summary=f"no active query older than {human_duration(th.long_query_warn_s)}",
        )
    longest = max(float(r["duration_s"]) for r in rows)
    status = Status.CRIT if longest >= th.long_query_crit_s else Status.WARN
    head = ", ".join(f"pid {r['pid']} {human_duration(r['duration_s'])}" for r in rows[:3])
    return Finding(
        check="long-running queries",
        status=status,
        summary=f"{len(rows)} active queries over {human_duration(th.long_query_warn_s)}: {head}",
        rows=rows,
        hint="cancel one with `/db cancel <pid>`",
    )


_IDLE_IN_TX_SQL = """
SELECT pid, usename::text AS "user", application_name AS app, state,
       extract(epoch FROM now() - state_change)::float AS idle_s,
       extract(epoch FROM now() - xact_start)::float AS xact_s,
       left(regexp_replace(query, '\\s+', ' ', 'g'), %(chars)s) AS last_query
FROM pg_stat_activity
WHERE state IN ('idle in transaction', 'idle in transaction (aborted)')
  AND pid <> pg_backend_pid()
  AND now() - state_change > make_interval(secs => %(warn)s)
ORDER BY state_change
LIMIT %(limit)s
"""


async def check_idle_in_transaction(th: Thresholds, db: Reader) -> Finding:
    rows = await db.fetch(
        _IDLE_IN_TX_SQL,
        {"chars": th.query_chars, "warn": th.idle_in_tx_warn_s, "limit": th.max_rows},
    )
    shown_queries(rows, th.show_query_literals, "last_query")
    if not rows:
        return Finding(
            check="idle in transaction",
            status=Status.OK,
            summary=f"no session idle in transaction over {human_duration(th.idle_in_tx_warn_s)}",
        )
    oldest = max(float(r["idle_s"]) for r in rows)
    status = Status.CRIT if oldest >= th.idle_in_tx_crit_s else Status.WARN
    head = ", ".join(
        f"pid {r['pid']} ({r['app'] or r['user']}) {human_duration(r['idle_s'])}" for r in rows[:3]
    )
    return Finding(
        check="idle in transaction",
        status=status,
        summary=f"{len(rows)} sessions idle in transaction, holding locks and snapshots: {head}",
        rows=rows,
        hint="end them with `/db terminate <pid>` (needs approval)",
    )


_IDLE_SESSIONS_SQL = """
SELECT coalesce(nullif(application_name, ''), '(none)') AS app, usename::text AS "user",
       count(*)::int AS sessions,
       max(extract(epoch FROM now() - state_change))::float AS oldest_idle_s
FROM pg_stat_activity
WHERE state = 'idle' AND backend_type = 'client backend' AND pid <> pg_backend_pid()
  AND now() - state_change > make_interval(secs => %(warn)s)
GROUP BY 1, 2 ORDER BY 3 DESC
LIMIT %(limit)s
"""


async def check_idle_sessions(th: Thresholds, db: Reader) -> Finding:
    rows = await db.fetch(
        _IDLE_SESSIONS_SQL, {"warn": th.idle_session_warn_s, "limit": th.max_rows}
    )
    total = sum(int(r["sessions"]) for r in rows)
    if not total:
        return Finding(
            check="idle sessions",
            status=Status.OK,
            summary=f"no session idle over {human_duration(th.idle_session_warn_s)}",
        )
    head = ", ".join(f"{r['app']} ({r['sessions']})" for r in rows[:3])
    return Finding(
        check="idle sessions",
        status=Status.WARN,
        summary=f"{total} sessions idle over {human_duration(th.idle_session_warn_s)}: {head}",
        rows=rows,
        hint="`/db kill-idle` ends them (needs approval)",
    )


_BLOCKED_SQL = """
WITH waiting AS (
  SELECT a.pid, pg_blocking_pids(a.pid) AS blocked_by
  FROM pg_stat_activity a
  WHERE a.wait_event_type = 'Lock'
)
SELECT a.pid, w.blocked_by, usename::text AS "user", application_name AS app, a.state,
       extract(epoch FROM now() - coalesce(a.query_start, a.state_change))::float AS waiting_s,
       extract(epoch FROM now() - a.xact_start)::float AS xact_s,
       l.mode AS lock_mode,
       CASE WHEN l.relation IS NOT NULL THEN l.relation::regclass::text
            ELSE l.locktype END AS relation,
       left(regexp_replace(a.query, '\\s+', ' ', 'g'), %(chars)s) AS query
FROM waiting w
JOIN pg_stat_activity a ON a.pid = w.pid
LEFT JOIN LATERAL (
  SELECT mode, relation, locktype FROM pg_locks
  WHERE pid = a.pid AND NOT granted LIMIT 1
) l ON true
WHERE cardinality(w.blocked_by) > 0
"""
_HOLDERS_SQL = """
SELECT a.pid, usename::text AS "user", application_name AS app, a.state,
       extract(epoch FROM now() - a.xact_start)::float AS xact_s,
       left(regexp_replace(a.query, '\\s+', ' ', 'g'), %(chars)s) AS query
FROM pg_stat_activity a WHERE a.pid = ANY(%(pids)s)
"""


def blocking_chains(blocked: list[Row]) -> list[list[int]]:
    """Each chain from a root holder down to the deepest waiter, e.g. [holder, w1, w2].

    Derived from `pg_blocking_pids`, so soft blocks (queued behind another waiter)
    show as the chains they really are.
    """
    waits_on = {int(r["pid"]): [int(p) for p in r["blocked_by"]] for r in blocked}
    chains: list[list[int]] = []
    for pid in waits_on:
        if any(pid in v for v in waits_on.values()):
            continue  # not the end of a chain
        chain = [pid]
        seen = {pid}
        while True:
            parents = [p for p in waits_on.get(chain[-1], []) if p not in seen]
            if not parents:
                break
            # follow the blocker that is itself blocked, so the chain goes deepest
            nxt = next((p for p in parents if p in waits_on), parents[0])
            chain.append(nxt)
            seen.add(nxt)
        chains.append(list(reversed(chain)))
    return sorted(chains, key=len, reverse=True)


async def check_blocked(th: Thresholds, db: Reader) -> Finding:
    blocked = shown_queries(
        await db.fetch(_BLOCKED_SQL, {"chars": th.query_chars}), th.show_query_literals
    )
    if not blocked:
        return Finding(
            check="blocked sessions", status=Status.OK, summary="no session waits on a lock"
        )
    blocked_pids = {int(r["pid"]) for r in blocked}
    roots = sorted({int(p) for r in blocked for p in r["blocked_by"]} - blocked_pids)
    holders = (
        await db.fetch(_HOLDERS_SQL, {"chars": th.query_chars, "pids": roots}) if roots else []
    )
    shown_queries(holders, th.show_query_literals)
    longest = max(float(r["waiting_s"] or 0) for r in blocked)
    status = Status.CRIT if longest >= th.blocked_crit_s else Status.WARN
    by_pid = {int(r["pid"]): r for r in blocked}
    described: list[str] = []
    for chain in blocking_chains(blocked)[:3]:
        tail = by_pid.get(chain[-1], {})
        described.append(
            " ← ".join(str(p) for p in chain)
            + f" ({tail.get('lock_mode', '?')} on {tail.get('relation', '?')},"
            f" waiting {human_duration(tail.get('waiting_s'))})"
        )
    rows: list[Row] = [
        {
            "role": "holder",
            "pid": h["pid"],
            "blocked_by": [],
            "user": h["user"],
            "app": h["app"],
            "state": h["state"],
            "waiting_s": None,
            "xact_s": h["xact_s"],
            "lock_mode": None,
            "relation": None,
            "query": h["query"],
        }
        for h in holders
    ]
    rows += [
        {"role": "waiting", **r} for r in sorted(blocked, key=lambda r: -float(r["waiting_s"] or 0))
    ]
    return Finding(
        check="blocked sessions",
        status=status,
        summary=f"{len(blocked)} sessions blocked behind {len(roots)} holder(s): "
        + "; ".join(described),
        rows=rows[: th.max_rows],
        hint="the holder is first in each chain: `/db terminate <pid>` (needs approval)",
    )


# --- schema objects -----------------------------------------------------------------

_MATVIEWS_SQL = """
SELECT m.schemaname AS schema, m.matviewname AS view, m.ispopulated AS populated,
       pg_total_relation_size(c.oid) AS bytes,
       EXISTS (
         SELECT 1 FROM pg_index i
         WHERE i.indrelid = c.oid AND i.indisunique AND i.indisvalid
           AND i.indpred IS NULL AND i.indexprs IS NULL
       ) AS concurrent_ok
FROM pg_matviews m
JOIN pg_namespace n ON n.nspname = m.schemaname
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = m.matviewname
WHERE m.schemaname NOT IN ('pg_catalog', 'information_schema')
ORDER BY m.schemaname, m.matviewname
"""


async def check_materialized_views(db: Reader) -> Finding:
    rows = await db.fetch(_MATVIEWS_SQL)
    names = {r["view"] for r in rows}
    missing = [v for v in EXPECTED_VIEWS if v not in names]
    unpopulated = [r["view"] for r in rows if not r["populated"]]
    no_index = [r["view"] for r in rows if not r["concurrent_ok"]]
    problems: list[str] = []
    status = Status.OK
    if unpopulated:
        status = Status.CRIT
        problems.append("not populated (reads fail): " + ", ".join(unpopulated))
    if missing:
        status = _worst(status, Status.WARN)
        problems.append("missing: " + ", ".join(missing))
    if no_index:
        status = _worst(status, Status.WARN)
        problems.append(
            "no unique index for REFRESH CONCURRENTLY (a refresh blocks readers): "
            + ", ".join(no_index)
        )
    total = sum(int(r["bytes"] or 0) for r in rows)
    summary = f"{len(rows)} materialized views, {human_size(total)}"
    summary += (
        ": " + "; ".join(problems) if problems else ", all populated and concurrently refreshable"
    )
    for r in rows:
        r["size"] = human_size(r.pop("bytes"))
    return Finding(
        check="materialized views",
        status=status,
        summary=summary,
        rows=rows,
        hint="`/db refresh-views` populates them" if unpopulated else None,
    )


async def check_migrations(db: Reader) -> Finding:
    """The history as `/db migrations` reads it (every schema that holds the table, the
    same classification), cut to one line: health only says whether to look there."""
    schemas = await migration_schemas(db)
    if not schemas:
        return Finding(
            check="migrations",
            status=Status.WARN,
            summary=f"no `{MIGRATIONS_TABLE}` table in any schema: migrations are not tracked "
            "by Prisma on this database, so there is no migration state to check",
            hint="`/db migrations` compares the live schema with the expected one instead",
        )
    lock = await prisma_lock_holders(db)
    parts: list[str] = []
    attempts: list[Attempt] = []
    for schema in schemas:
        found = classify(schema, await db.fetch(history_sql(schema).as_string()), bool(lock))
        (applied,) = await db.fetch(applied_sql(schema).as_string())
        problems = [a for a in found if a.status is not Status.OK]
        what = "; ".join(
            f"{len(named)} {state}: {', '.join(a.name for a in named)}"
            for state in ("failed", "running", "rolled back")
            if (named := [a for a in problems if a.state == state])
        )
        parts.append(
            f"{schema}.{MIGRATIONS_TABLE}: {applied['n']} applied (last "
            f"{applied['last'] or 'none'}); {what or 'none failed, none pending'}"
        )
        attempts += problems
    worst = min((a.status for a in attempts), key=lambda s: s.severity, default=Status.OK)
    return Finding(
        check="migrations",
        status=worst,
        summary="; ".join(parts),
        rows=[
            {"schema": a.schema, "migration": a.name, "state": a.state}
            for a in sorted(attempts, key=lambda a: a.status.severity)
        ][:20],
        hint="`/db migrations` shows each attempt with its log, and how to resolve it"
        if attempts
        else None,
    )


_QUOTA_TRIGGER_SQL = """
SELECT t.tgname AS trigger, c.relname AS "table", p.proname AS function,
       CASE t.tgenabled WHEN 'D' THEN 'disabled' WHEN 'O' THEN 'enabled'
            WHEN 'A' THEN 'always' WHEN 'R' THEN 'replica only' END AS enabled
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_proc p ON p.oid = t.tgfoid
WHERE NOT t.tgisinternal
  AND (t.tgname = 'trg_check_amplify_quota' OR p.proname = 'check_amplify_quota')
"""


async def check_quota_trigger(db: Reader) -> Finding:
    rows = await db.fetch(_QUOTA_TRIGGER_SQL)
    name = "guard: AMPLIFY quota trigger"
    if not rows:
        return Finding(
            check=name,
            status=Status.CRIT,
            summary="no trigger calls check_amplify_quota(): AMPLIFY submissions are not capped",
            hint="recreate trg_check_amplify_quota from the migration",
        )
    off = [r for r in rows if r["enabled"] in ("disabled", "replica only")]
    if off:
        return Finding(
            check=name,
            status=Status.CRIT,
            summary="trigger "
            + ", ".join(f"{r['trigger']} on {r['table']} is {r['enabled']}" for r in off)
            + ": the 50 peers / 200 students weekly caps are not enforced",
            rows=rows,
            hint="re-enable: ALTER TABLE submissions ENABLE TRIGGER trg_check_amplify_quota;"
            " then check `/db quota` for users who went over",
        )
    return Finding(
        check=name,
        status=Status.OK,
        summary=", ".join(f"{r['trigger']} on {r['table']} enabled" for r in rows),
        rows=rows,
    )


_LEARN_INDEX_SQL = """
SELECT i.indexrelid::regclass::text AS index, i.indisvalid AS valid,
       pg_get_expr(i.indpred, i.indrelid) AS predicate
FROM pg_index i
WHERE i.indrelid = to_regclass('submissions') AND i.indisunique
  AND pg_get_expr(i.indpred, i.indrelid) LIKE '%LEARN%'
"""


async def check_learn_uniqueness(db: Reader) -> Finding:
    name = "guard: LEARN uniqueness"
    (tbl,) = await db.fetch("SELECT to_regclass('submissions') IS NOT NULL AS present")
    if not tbl["present"]:
        return Finding(check=name, status=Status.CRIT, summary="table `submissions` is missing")
    rows = await db.fetch(_LEARN_INDEX_SQL)
    valid = [r for r in rows if r["valid"]]
    if valid:
        return Finding(
            check=name,
            status=Status.OK,
            summary=f"unique partial index {valid[0]['index']} allows one open LEARN per user",
            rows=rows,
        )
    return Finding(
        check=name,
        status=Status.CRIT,
        summary="no valid unique index limits users to one PENDING/APPROVED LEARN submission",
        rows=rows,
        hint="`/db integrity` counts the duplicates; fix them before re-creating the index",
    )


_EVENT_ID_INDEX_SQL = """
SELECT i.indexrelid::regclass::text AS index, i.indisvalid AS valid,
       pg_get_expr(i.indpred, i.indrelid) AS predicate
FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
WHERE i.indrelid = to_regclass('points_ledger') AND i.indisunique
  AND i.indnkeyatts = 1 AND a.attname = 'external_event_id'
"""


async def check_event_id_uniqueness(db: Reader) -> Finding:
    name = "guard: external_event_id uniqueness"
    (tbl,) = await db.fetch("SELECT to_regclass('points_ledger') IS NOT NULL AS present")
    if not tbl["present"]:
        return Finding(check=name, status=Status.CRIT, summary="table `points_ledger` is missing")
    rows = await db.fetch(_EVENT_ID_INDEX_SQL)
    valid = [r for r in rows if r["valid"]]
    if valid:
        return Finding(
            check=name,
            status=Status.OK,
            summary=f"unique index {valid[0]['index']} keeps webhook awards idempotent",
            rows=rows,
        )
    return Finding(
        check=name,
        status=Status.CRIT,
        summary="points_ledger.external_event_id is not unique: a replayed webhook awards twice",
        rows=rows,
        hint="`/db integrity` finds duplicated events",
    )


# --- the operators' webhook alerts (LEAPS_SCHEMA.md) -----------------------------
# Raised by `/db webhooks` too; here so that the watchdog posts them, by the same
# queries. `commands.webhooks` is imported where used: it imports the remedies, one of
# which imports `commands.views`, which imports this module.

LEDGER_EVENTS = "webhooks: duplicate external_event_id"


async def _table_present(db: Reader, table: str) -> bool:
    (row,) = await db.fetch("SELECT to_regclass(%s) IS NOT NULL AS present", (table,))
    return bool(row["present"])


EXACT = "--exact"
SCAN_WORK_MEM = "64MB"


async def _tune_scan(db: Reader) -> None:
    """For a whole-table check's transaction: no JIT (its compilation cost more than it
    saved: 0.1 s of 0.8 at 1,000,000 events), room for the hash tables. Parallel
    workers stay allowed: without them the backlog's hash join of 1,000,000 events with
    1,000,000 users ran past the 5 s timeout on a busy machine (1.0 s with two)."""
    await db.fetch(
        "SELECT set_config('jit', 'off', true), set_config('work_mem', %s, true)", (SCAN_WORK_MEM,)
    )


async def check_webhook_backlog(
    th: Thresholds, db: Reader, counted: Finding | None = None
) -> Finding:
    """Critical above the alert's threshold. Not every deployment receives Kajabi
    webhooks: without the table there is nothing to alert on, which is no error. It
    reads every event: `counted` (a recent exact count) answers instead."""
    from commands.webhooks import ALERT, REMATCH_EMAILS, REPROCESS, check_alert

    if not await _table_present(db, "kajabi_events"):
        return Finding(
            check=ALERT,
            status=Status.SKIPPED,
            summary="no kajabi_events table: this database receives no Kajabi webhooks",
        )
    if counted is not None:
        return counted
    await _tune_scan(db)
    found = await check_alert(th, db)
    if found.status is not Status.CRIT:
        return found
    return found.model_copy(
        update={
            "hint": f"`/db webhooks` lists them; `/db {REPROCESS}` processes the unprocessed, "
            f"`/db {REMATCH_EMAILS}` links e-mails that differ only in case"
        }
    )


async def check_ledger_events(db: Reader, counted: Finding | None = None) -> Finding:
    """Any replayed webhook award is critical: `/db integrity`'s own check, a catalog
    read while the unique index stands, else one pass over the ledger rows with an event
    id, which `counted` (a recent exact count) answers instead. In one transaction;
    `/db health` runs `ledger_events`, whose statements are each bounded."""
    if not await _table_present(db, "points_ledger"):
        return _no_ledger()
    if counted is not None and await events_unique_index(db) is None:
        return counted
    return _as_ledger_events(await check_duplicate_events(db))


async def ledger_events(gw: Gateway, counted: Finding | None = None) -> Finding:
    """`check_ledger_events` with the ledger read a bounded piece at a time
    (`commands.integrity.duplicate_events`)."""
    box: list[tuple[bool, str | None]] = []

    async def catalog(db: Reader) -> Finding:
        present = await _table_present(db, "points_ledger")
        box.append((present, await events_unique_index(db) if present else None))
        return Finding(check=LEDGER_EVENTS, status=Status.OK, summary="")

    found = await gw.run_check(LEDGER_EVENTS, catalog)
    if found.status is not Status.OK or not box:
        return found
    present, unique = box[0]
    if not present:
        return _no_ledger()
    if counted is not None and unique is None:
        return counted
    return _as_ledger_events(await duplicate_events(gw))


def _no_ledger() -> Finding:
    return Finding(
        check=LEDGER_EVENTS,
        status=Status.SKIPPED,
        summary="no points_ledger table (the uniqueness guard reports it)",
    )


def _as_ledger_events(found: Finding) -> Finding:
    update: dict[str, Any] = {"check": LEDGER_EVENTS}
    if found.hint:
        update["hint"] = f"`/db webhooks` lists them; {found.hint}"
    return found.model_copy(update=update)


def scan_checks() -> tuple[str, ...]:
    """The checks that read whole tables."""
    from commands.webhooks import ALERT

    return (ALERT, LEDGER_EVENTS)


# target -> (check -> its last exact count, as shown; time.monotonic() it is good until)
_counts: dict[str, tuple[dict[str, Finding], float]] = {}


def remember_counts(report: Report, at: datetime, good_for_s: float) -> None:
    """The whole-table checks of a health report counted exactly at `at` (the watchdog's
    `--exact` run): `/db health` shows them, so marked, for `good_for_s` seconds instead
    of counting again. One that could not answer then (a timeout on a busy server) is
    kept too, as it was: counting it again on every run would only load the server more;
    the next counting run tries again."""
    when = f"{at.astimezone(UTC):%H:%M} UTC by the watchdog; `/db health {EXACT}`"
    names = scan_checks()
    kept = {
        f.check: f.model_copy(
            update={
                "summary": f"{f.summary} (counted {when} counts now)"
                if f.status in (Status.OK, Status.WARN, Status.CRIT)
                else f"{f.summary} (when counted {when} tries now)"
            }
        )
        for f in report.findings
        if f.check in names
    }
    _counts[report.target] = (kept, time.monotonic() + good_for_s)


def forget_counts(target: str) -> None:
    _counts.pop(target, None)


def recent_counts(target: str) -> dict[str, Finding]:
    """The whole-table checks' exact counts still good for `target` (none: count)."""
    kept, until = _counts.get(target, ({}, 0.0))
    return kept if time.monotonic() < until else {}


# --- a freeze (`freeze-writes`, or one made by hand) -------------------------------

FREEZE_CHECK = "writes frozen"


async def check_freeze(app_roles: Sequence[str], db: Reader) -> Finding:
    """Critical while a read-only default reaches the application: APP_ROLES' settings in
    this database or in all of them, or the database's own. Catalog only, unless something
    is frozen: then the bot's freeze record says since when and by whom."""
    from commands.remedies.freeze import freeze_state

    state = await freeze_state(app_roles, db)
    if not state.active:
        return Finding(
            check=FREEZE_CHECK,
            status=Status.OK,
            summary=f"writes are not frozen (APP_ROLES: {', '.join(app_roles) or 'none'})",
        )
    rows: list[Row] = [{"frozen": f} for f in state.frozen]
    return Finding(
        check=FREEZE_CHECK,
        status=Status.CRIT,
        summary=state.describe()
        + "; the application's writes fail (SQLSTATE 25006), reads work, Kajabi webhooks "
        "are refused",
        rows=rows,
        hint="`/db unfreeze-writes` lifts it (the previous settings restored exactly) once "
        "the recovery is verified",
    )


def health_checks(
    th: Thresholds,
    app_roles: Sequence[str] = DEFAULT_APP_ROLES,
    counted: dict[str, Finding] | None = None,
) -> dict[str, Callable[[Reader], Awaitable[Finding]]]:
    """Every check of the report, by name; `counted`: recent exact counts of the
    whole-table checks (`recent_counts`), shown instead of counting again."""
    from commands.webhooks import ALERT as WEBHOOK_BACKLOG

    counted = counted or {}

    return {
        "connections": partial(check_connections, th),
        "long-running queries": partial(check_long_queries, th),
        "idle in transaction": partial(check_idle_in_transaction, th),
        "idle sessions": partial(check_idle_sessions, th),
        "blocked sessions": partial(check_blocked, th),
        "materialized views": check_materialized_views,
        "migrations": check_migrations,
        "guard: AMPLIFY quota trigger": check_quota_trigger,
        "guard: LEARN uniqueness": check_learn_uniqueness,
        "guard: external_event_id uniqueness": check_event_id_uniqueness,
        # a warning at worst: a latent defect, so it opens no incident (the watchdog and
        # detection react to critical checks only)
        AUDIT_CHECK: check_audit_trail,
        WEBHOOK_BACKLOG: partial(check_webhook_backlog, th, counted=counted.get(WEBHOOK_BACKLOG)),
        LEDGER_EVENTS: partial(check_ledger_events, counted=counted.get(LEDGER_EVENTS)),
        FREEZE_CHECK: partial(check_freeze, tuple(app_roles)),
    }


@register(
    "health",
    usage=f"/db health [{EXACT}]",
    summary="connection and health report of the database "
    f"({EXACT}: count the whole-table checks now)",
)
async def health(ctx: Context, args: list[str]) -> Report:
    words = [a for a in args if a.strip()]
    if words not in ([], [EXACT]):
        raise UsageError(f"`health` takes no arguments but `{EXACT}`")
    gw = ctx.gateway
    findings = [lint_connection_string(gw.dsn_for_display)]
    counted = {} if words else recent_counts(gw.target)
    checks = health_checks(ctx.thresholds, ctx.app_roles, counted)
    try:
        probe = await gw.probe()
    except Exception as exc:  # the user must learn why, not that something failed
        reason = _connect_failure(exc)
        findings.append(
            Finding(
                check="reachability",
                status=Status.CRIT,
                summary=f"cannot connect to {gw.target}: {reason}",
                hint="check that the server is up, the host and port, and the credentials",
            )
        )
        findings += [
            Finding(check=name, status=Status.SKIPPED, summary="not run: database unreachable")
            for name in checks
        ]
    else:
        findings.append(reachability_finding(probe, gw.target))
        findings += await asyncio.gather(
            *(
                ledger_events(gw, counted.get(n)) if n == LEDGER_EVENTS else gw.run_check(n, c)
                for n, c in checks.items()
            )
        )
    return Report(title="Database health", target=gw.target, findings=findings).sorted()


def _connect_failure(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer within the connect timeout"
    text: Any = str(exc).strip().splitlines()
    return " ".join(text[:2]) if text else type(exc).__name__

"""The LEAPS fixture at production size, built set-based, with exact data-integrity faults.

`build_scale_fixture()` applies the real fixture schema (`commands.fixture.seed.schema_sql()`),
then fills it with `INSERT ... SELECT generate_series(...)` statements whose values derive from
hashes of the row number, so a given seed always gives the same database. The load runs with
the tables' user triggers disabled (quota, NOTIFY, audit) and with primary keys, unique
constraints, foreign keys and secondary indexes dropped; all of them are recreated afterwards,
exactly as the schema defines them, then the statistics and the materialized views are built.

The clean fixture has no integrity problem at all: every APPROVED submission of an activity
worth points has exactly one award of its worth (AMPLIFY: peers_trained x 2 + students_trained,
the snake_case keys the fixture's quota function reads; others: `default_points`); a REVOKED
one has its award and the matching MANUAL claw-back; bulk MANUAL corrections come in +x/-x
pairs on the same user and activity; no orphans, one live LEARN per user, external event ids
unique, no negative totals, and every user's AMPLIFY submissions at least 8 days apart with at
most 20 peers and 80 students each, so the 7-day quota holds.

Faults (`faults={"orphan_submissions": 25, ...}`) are then injected set-based, each exact and
independent of the others (see `FAULT_KINDS` and the docstring of `inject_faults`).

    python bench/scale.py [--users 100000] [--submissions N] [--ledger N] [--kajabi N]
                          [--faults 25] [--seed 0] [--keep]

`--keep` leaves the server running after the build (until Ctrl-C or SIGTERM) and prints the
DSN, so other benches can use it with `--dsn`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, LiteralString

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.embedded_pg import EmbeddedPostgres  # noqa: E402
from bot.tasks import wait_for_signal  # noqa: E402
from commands.fixture.seed import TABLES, VIEWS, schema_sql  # noqa: E402
from commands.indexes import RECOMMENDED, check_recommended  # noqa: E402

Conn = psycopg.AsyncConnection[Any]

# Settings for a server that holds a few GB of fixture: bigger buffers and index-build
# memory, few checkpoints. Query memory (work_mem) stays at the default so benchmarks see
# what a stock server would do.
SCALE_SERVER_SETTINGS: dict[str, str] = {
    "shared_buffers": "1GB",
    "maintenance_work_mem": "1GB",
    "max_wal_size": "16GB",
    "checkpoint_timeout": "30min",
    "wal_level": "minimal",
    "max_wal_senders": "0",
}

FAULT_KINDS: tuple[str, ...] = (
    "orphan_submissions",
    "orphan_ledger_rows",
    "orphan_attachments",
    "duplicate_learn",
    "duplicate_external_events",
    "missing_awards",
    "extra_awards",
    "point_differences",
    "negative_totals",
)

# Tables whose constraints and indexes are dropped for the load and rebuilt after it.
BIG_TABLES: tuple[str, ...] = (
    "users",
    "submissions",
    "submission_attachments",
    "points_ledger",
    "kajabi_events",
    "audit_log",
)

_SCHOOLS: tuple[str, ...] = (
    "Delhi Public School, Noida",
    "Kendriya Vidyalaya No. 2, Pune",
    "St. Xavier's High School, Mumbai",
    "Bishop Cotton School, Shimla",
    "Loyola Academy, Chennai",
    "National Public School, Bengaluru",
    "La Martiniere, Kolkata",
    "Army Public School, Guwahati",
    "Government Model School, Chandigarh",
    "Jawahar Navodaya Vidyalaya, Indore",
    "Sri Chaitanya School, Hyderabad",
    "Modern School, Barakhamba Road",
    "DAV Public School, Bhubaneswar",
    "Sacred Heart Convent, Jaipur",
    "The Doon School, Dehradun",
    "Campion School, Bhopal",
)
_REGIONS = ("North", "West", "West", "North", "South", "South", "East", "East")
_COHORTS = ("2025-Spring", "2025-Summer", "2025-Fall", "2026-Spring")

# A pseudo-random float in [0, 1) from a row number and a stream number: deterministic,
# cheap (one hash call), and different for every (row, stream, seed).
_R = "((hashint8(({x})::bigint * 1000003 + {k}) & 2147483647)::float8 / 2147483648.0)"

# Submission row s (1..S) belongs to participant number (s - 1) % P and is that
# participant's k-th submission, k = (s - 1) / P; k = 0 is the LEARN submission.
# Submission k of a user is created about 9k days ago, so one user's submissions are at
# least 8 days apart: at most one AMPLIFY in any 7 days.
_SUBMISSIONS_SQL = """
INSERT INTO submissions (id, user_id, activity_code, status, visibility, payload, reviewer_id,
                         review_note, created_at, updated_at, approval_org_timezone)
SELECT 's' || lpad(s::text, 9, '0'),
       'u' || lpad((first_p + (s - 1) %% p)::text, 8, '0'),
       act, st::"SubmissionStatus",
       CASE WHEN rv < 0.6 THEN 'PUBLIC' ELSE 'PRIVATE' END::"Visibility",
       CASE act
         WHEN 'LEARN' THEN jsonb_build_object(
             'course_name', 'AI Foundations for Educators',
             'certificate_url', 'https://learn.example/certificates/s' || s)
         WHEN 'EXPLORE' THEN jsonb_build_object(
             'reflection', 'Tried Copilot for lesson planning.',
             'evidence_url', 'https://evidence.example/s' || s)
         WHEN 'AMPLIFY' THEN jsonb_build_object(
             'peers_trained', peers, 'students_trained', students,
             'session_date', created::date)
         WHEN 'PRESENT' THEN jsonb_build_object(
             'event_name', 'District EdTech Meet',
             'linkedin_url', 'https://linkedin.com/posts/s' || s)
         ELSE jsonb_build_object('story', 'Shared how AI changed my classroom.')
       END,
       CASE WHEN st <> 'PENDING' THEN 'u' || lpad((2 + (s %% n_staff))::text, 8, '0') END,
       CASE WHEN st = 'REJECTED' THEN 'Evidence does not show the activity.' END,
       created,
       -- reviewed up to 48 hours later, but never after the build (nothing in the future)
       CASE WHEN st = 'PENDING' THEN created
            ELSE least(created + rh * interval '48 hours', now() AT TIME ZONE 'UTC') END,
       CASE WHEN st IN ('APPROVED', 'REVOKED') THEN 'Asia/Kolkata' END
  FROM (
    SELECT s, p, first_p, n_staff, rv, rh, peers, students, created, act,
           CASE
             WHEN k = 0 THEN CASE WHEN rs < 0.75 THEN 'APPROVED'
                                  WHEN rs < 0.90 THEN 'PENDING' ELSE 'REJECTED' END
             WHEN act = 'LEARN' THEN 'REJECTED'
             ELSE CASE WHEN rs < 0.70 THEN 'APPROVED' WHEN rs < 0.85 THEN 'PENDING'
                       WHEN rs < 0.95 THEN 'REJECTED' ELSE 'REVOKED' END
           END AS st
      FROM (
        SELECT s, p, first_p, n_staff, k,
               {rs} AS rs, {rv} AS rv, {rh} AS rh,
               floor({rp} * 21)::int AS peers,
               1 + floor({rq} * 80)::int AS students,
               (now() AT TIME ZONE 'UTC') - interval '1 hour'
                 - (k * 9 + {rc}) * interval '1 day' AS created,
               CASE WHEN k = 0 THEN 'LEARN'
                    WHEN ra < 0.30 THEN 'EXPLORE'
                    WHEN ra < 0.60 THEN 'AMPLIFY'
                    WHEN ra < 0.80 THEN 'PRESENT'
                    WHEN ra < 0.92 THEN 'SHINE'
                    ELSE 'LEARN' END AS act
          FROM (SELECT s, %(p)s::bigint AS p, %(first_p)s::bigint AS first_p,
                       %(n_staff)s::bigint AS n_staff, (s - 1) / %(p)s AS k,
                       {ra} AS ra
                  FROM generate_series(1, %(n)s::bigint) AS s) AS g
      ) AS g2
  ) AS g3
"""

# One award per APPROVED or REVOKED submission of an activity worth points; half of the
# approved LEARN awards came through the Kajabi webhook (source WEBHOOK, external id).
# REVOKED ones get their claw-back (a MANUAL row of minus the award) just after.
_AWARDS_SQL = """
CREATE TEMP TABLE awards AS
SELECT row_number() OVER () AS rn, x.*
  FROM (
    SELECT s.id AS submission_id, s.user_id, s.activity_code, s.status, s.updated_at,
           CASE s.activity_code
             WHEN 'AMPLIFY' THEN (s.payload ->> 'peers_trained')::int * 2
                                 + (s.payload ->> 'students_trained')::int
             ELSE a.default_points END AS points
      FROM submissions AS s
      JOIN activities AS a ON a.code = s.activity_code
     WHERE s.status IN ('APPROVED', 'REVOKED')
  ) AS x
 WHERE x.points > 0
"""

_LEDGER_AWARDS_SQL = """
INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points, external_source,
                           external_event_id, created_at, event_time, meta)
SELECT 'l' || lpad(rn::text, 10, '0'), user_id, activity_code,
       CASE WHEN web THEN 'WEBHOOK' ELSE 'FORM' END::"LedgerSource",
       points,
       CASE WHEN web THEN 'kajabi' END,
       CASE WHEN web THEN 'kjb_evt_' || submission_id END,
       updated_at, updated_at AT TIME ZONE 'UTC',
       jsonb_build_object('submission_id', submission_id)
  FROM (SELECT *, activity_code = 'LEARN' AND status = 'APPROVED' AND {rw} < 0.5 AS web
          FROM awards) AS w
UNION ALL
SELECT 'r' || lpad(rn::text, 10, '0'), user_id, activity_code, 'MANUAL', -points,
       NULL, NULL, updated_at, updated_at AT TIME ZONE 'UTC',
       jsonb_build_object('submission_id', submission_id, 'reason', 'revoked')
  FROM awards
 WHERE status = 'REVOKED'
"""

# Bulk MANUAL corrections, +x then -x on the same user and activity (an award that was
# entered twice and taken back): they add volume and sum to zero per user and activity.
_LEDGER_PAIRS_SQL = """
INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points, created_at,
                           event_time, meta)
SELECT 'c' || lpad(j::text, 10, '0') || sign_tag, a.user_id, a.activity_code, 'MANUAL',
       CASE WHEN sign_tag = 'p' THEN a.points ELSE -a.points END,
       least(a.updated_at + interval '1 minute', now() AT TIME ZONE 'UTC'),
       least(a.updated_at + interval '1 minute', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
       jsonb_build_object('reason', 'duplicate entry corrected')
  FROM generate_series(1, %(pairs)s::bigint) AS j
  JOIN awards AS a ON a.rn = 1 + (j - 1) %% %(n_awards)s
 CROSS JOIN (VALUES ('p'), ('m')) AS t (sign_tag)
"""

_ATTACHMENTS_SQL = """
INSERT INTO submission_attachments (id, submission_id, path, hash, created_at)
SELECT 'a' || substr(s.id, 2) || '_' || k, s.id,
       'evidence/' || s.user_id || '/' || s.id || '/' || k || '.pdf',
       md5(s.id || ':' || k), s.created_at
  FROM submissions AS s
 CROSS JOIN generate_series(0, 1) AS k
 WHERE s.activity_code <> 'SHINE'
   AND {ra} < CASE k WHEN 0 THEN 0.4 ELSE 0.1 END
"""

_KAJABI_SQL = """
INSERT INTO kajabi_events (id, received_at, payload, processed_at, user_match, event_id,
                           tag_name_raw, tag_name_norm, contact_id, email, created_at_utc,
                           status, raw)
SELECT 'k' || lpad(g::text, 9, '0'), rec, pl, rec + interval '3 seconds',
       'u' || lpad(ui::text, 8, '0'), 'kjb_tag_' || g,
       'LEAPS Newsletter', 'leaps newsletter', (40000000 + ui)::text,
       'user' || ui || '@school' || (ui %% 16) || '.edu.in', rec AT TIME ZONE 'UTC',
       'processed', pl
  FROM (SELECT g, 1 + (g::bigint * 7919) %% %(users)s AS ui,
               (now() AT TIME ZONE 'UTC') - (1 + {rr} * 120) * interval '1 day' AS rec,
               jsonb_build_object('event', 'contact.tagged', 'id', 'kjb_tag_' || g,
                                  'tag', jsonb_build_object('name', 'LEAPS Newsletter')) AS pl
          FROM generate_series(1, %(kajabi)s::bigint) AS g) AS x
"""


_USERS_SQL = """
INSERT INTO users (id, handle, name, email, avatar_url, role, school, cohort, created_at,
                   kajabi_contact_id, ref_code, user_type, user_type_confirmed, region)
SELECT 'u' || lpad(i::text, 8, '0'), 'user' || i, 'User ' || i,
       'user' || i || '@school' || (i % 16) || '.edu.in',
       CASE WHEN {r1} < 0.7
            THEN 'https://cdn.leaps.example/avatars/u' || i || '.png' END,
       CASE WHEN i = 1 THEN 'SUPERADMIN' WHEN i <= 1 + {n_admin} THEN 'ADMIN'
            WHEN i < {first_p} THEN 'REVIEWER' ELSE 'PARTICIPANT' END::"Role",
       ({schools})[1 + i % 16],
       CASE WHEN {r2} < 0.92 THEN ({cohorts})[1 + i % 4] END,
       (now() AT TIME ZONE 'UTC') - (150 + {r3} * 100) * interval '1 day',
       CASE WHEN {r4} < 0.75 THEN (40000000 + i)::text END,
       'R' || upper(to_hex(i::bigint * 7919 + 1000000)),
       CASE WHEN i >= {first_p} AND {r5} < 0.08
            THEN 'STUDENT' ELSE 'EDUCATOR' END::"UserType",
       {r6} < 0.7,
       ({regions})[1 + i % 8]
  FROM generate_series(1, {users}) AS i
"""


def _rand(x: str, stream: int, seed: int) -> str:
    return _R.format(x=x, k=stream + seed * 7907)


async def _scalar(
    conn: Conn, query: LiteralString | sql.SQL | sql.Composed, params: Any = None
) -> int:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    return int(row[0]) if row and row[0] is not None else 0


async def _ddl_to_rebuild(conn: Conn) -> tuple[list[str], list[str], list[str]]:
    """(primary/unique constraints, foreign keys, standalone indexes) of the big tables,
    as DDL that recreates them, in the order they must be recreated."""
    cur = await conn.execute(
        "SELECT format('ALTER TABLE %%I ADD CONSTRAINT %%I %%s', t.relname, c.conname,"
        "              pg_get_constraintdef(c.oid)), c.contype"
        "  FROM pg_constraint AS c JOIN pg_class AS t ON t.oid = c.conrelid"
        " WHERE c.contype IN ('p', 'u', 'f') AND t.relnamespace = 'public'::regnamespace"
        "   AND (t.relname = ANY(%s) OR c.confrelid = ANY(%s::regclass[]))"
        " ORDER BY c.contype DESC, t.relname, c.conname",
        (list(BIG_TABLES), list(BIG_TABLES)),
    )
    keys: list[str] = []
    fks: list[str] = []
    for ddl, contype in await cur.fetchall():
        (fks if contype == "f" else keys).append(str(ddl))
    cur = await conn.execute(
        "SELECT pg_get_indexdef(i.indexrelid)"
        "  FROM pg_index AS i JOIN pg_class AS t ON t.oid = i.indrelid"
        " WHERE t.relname = ANY(%s) AND t.relnamespace = 'public'::regnamespace"
        "   AND NOT EXISTS (SELECT 1 FROM pg_constraint AS c WHERE c.conindid = i.indexrelid)"
        " ORDER BY 1",
        (list(BIG_TABLES),),
    )
    indexes = [str(r[0]) for r in await cur.fetchall()]
    return keys, fks, indexes


async def _drop_for_load(conn: Conn) -> None:
    cur = await conn.execute(
        "SELECT t.relname, c.conname FROM pg_constraint AS c"
        "  JOIN pg_class AS t ON t.oid = c.conrelid"
        " WHERE c.contype IN ('p', 'u', 'f') AND t.relnamespace = 'public'::regnamespace"
        "   AND (t.relname = ANY(%s) OR c.confrelid = ANY(%s::regclass[]))"
        " ORDER BY c.contype = 'f' DESC",
        (list(BIG_TABLES), list(BIG_TABLES)),
    )
    for table, con in await cur.fetchall():
        await conn.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
                sql.Identifier(table), sql.Identifier(con)
            )
        )
    cur = await conn.execute(
        "SELECT c.relname FROM pg_index AS i"
        "  JOIN pg_class AS t ON t.oid = i.indrelid JOIN pg_class AS c ON c.oid = i.indexrelid"
        " WHERE t.relname = ANY(%s) AND t.relnamespace = 'public'::regnamespace",
        (list(BIG_TABLES),),
    )
    for (index,) in await cur.fetchall():
        await conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index)))


async def _set_user_triggers(conn: Conn, enabled: bool) -> None:
    verb = sql.SQL("ENABLE" if enabled else "DISABLE")
    for table in BIG_TABLES:
        await conn.execute(
            sql.SQL("ALTER TABLE {} {} TRIGGER USER").format(sql.Identifier(table), verb)
        )


async def _load(
    conn: Conn, *, users: int, submissions: int, ledger: int, kajabi: int, seed: int
) -> None:
    """Fill the tables; constraints, indexes and triggers are off while this runs."""
    n_admin, n_reviewer = max(1, users // 100), max(2, users // 40)
    n_staff = n_admin + n_reviewer  # user numbers 2 .. 1 + n_staff review submissions
    first_p = 2 + n_staff
    participants = users - first_p + 1
    if participants < 1:
        raise ValueError(f"users must be at least {first_p} (got {users})")
    schools = "ARRAY[" + ", ".join(_quote(s) for s in _SCHOOLS) + "]"
    regions = "ARRAY[" + ", ".join(_quote(r) for r in _REGIONS) + "]"
    cohorts = "ARRAY[" + ", ".join(_quote(c) for c in _COHORTS) + "]"
    users_sql = _USERS_SQL.format(
        schools=schools,
        regions=regions,
        cohorts=cohorts,
        n_admin=n_admin,
        first_p=first_p,
        users=int(users),
        **{f"r{k}": _rand("i", k, seed) for k in range(1, 7)},
    )
    await conn.execute(sql.SQL(users_sql))
    subs_sql = _SUBMISSIONS_SQL.format(
        ra=_rand("s", 10, seed),
        rs=_rand("s", 11, seed),
        rv=_rand("s", 12, seed),
        rh=_rand("s", 13, seed),
        rp=_rand("s", 14, seed),
        rq=_rand("s", 15, seed),
        rc=_rand("s", 16, seed),
    )
    await conn.execute(
        sql.SQL(subs_sql),
        {"p": participants, "first_p": first_p, "n_staff": n_staff, "n": submissions},
    )
    await conn.execute(sql.SQL(_AWARDS_SQL))
    await conn.execute(sql.SQL(_LEDGER_AWARDS_SQL.format(rw=_rand("rn", 20, seed))))
    n_awards = await _scalar(conn, "SELECT count(*) FROM awards")
    have = await _scalar(conn, "SELECT count(*) FROM points_ledger")
    pairs = max(0, (ledger - have) // 2)
    if pairs and n_awards:
        await conn.execute(
            sql.SQL(_LEDGER_PAIRS_SQL),
            {"pairs": pairs, "n_awards": n_awards},
        )
    await conn.execute(sql.SQL(_ATTACHMENTS_SQL.format(ra=_rand("hashtext(s.id) + k", 30, seed))))
    await conn.execute(
        sql.SQL(_KAJABI_SQL.format(rr=_rand("g", 40, seed))),
        {"users": users, "kajabi": kajabi},
    )
    await conn.execute(
        "INSERT INTO audit_log (id, actor_id, action, target_id, meta, created_at)"
        " SELECT 'al' || substr(id, 2), reviewer_id, 'SUBMISSION_STATUS_CHANGED', id,"
        "        jsonb_build_object('from', 'PENDING', 'to', status,"
        "                           'activity_code', activity_code), updated_at"
        "   FROM submissions WHERE status <> 'PENDING' AND activity_code = 'LEARN'"
    )
    await conn.execute(
        "INSERT INTO schools (id, name, region)"
        " SELECT 'sch' || o, n, NULL FROM unnest(%s::text[]) WITH ORDINALITY AS t (n, o)",
        (list(_SCHOOLS),),
    )


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


async def build_scale_fixture(
    dsn: str,
    *,
    users: int = 100_000,
    submissions: int = 1_000_000,
    ledger: int = 2_000_000,
    kajabi: int = 100_000,
    faults: dict[str, int] | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Create the LEAPS schema on an empty database, fill it at this size, inject `faults`.

    `ledger` is a target: the awards that approved submissions imply come first, then
    MANUAL +x/-x correction pairs up to about that many rows (never fewer than the awards).
    Returns row counts per table and view, plus `fault:<kind>` for each injected kind.
    """
    unknown = set(faults or {}) - set(FAULT_KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds: {sorted(unknown)}; known: {FAULT_KINDS}")
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, application_name="leaps-scale-builder"
    ) as conn:
        await conn.execute(schema_sql())
        await conn.execute("SET work_mem = '256MB'")
        await conn.execute("SET maintenance_work_mem = '1GB'")
        await conn.execute("SET max_parallel_maintenance_workers = 2")
        keys, fks, indexes = await _ddl_to_rebuild(conn)
        await _set_user_triggers(conn, False)
        await _drop_for_load(conn)
        try:
            await _load(
                conn,
                users=users,
                submissions=submissions,
                ledger=ledger,
                kajabi=kajabi,
                seed=seed,
            )
            for ddl in (*keys, *indexes, *fks):
                await conn.execute(sql.SQL(ddl))
        finally:
            await _set_user_triggers(conn, True)
        await conn.execute("DROP TABLE IF EXISTS awards")
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("SELECT refresh_all_analytics()")
        injected = await inject_faults(conn, faults or {})
        if any(injected.values()):
            await conn.execute("ANALYZE")
        counts: dict[str, int] = {}
        for name in (*TABLES, *VIEWS):
            counts[name] = await _scalar(
                conn, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(name))
            )
        counts.update({f"fault:{k}": v for k, v in injected.items()})
        return counts


# ----------------------------------------------------------------------------- faults

# Victims of each kind are users whose number ends in the kind's own digit, so no two
# kinds touch the same user and every count stays exact whatever the others inject.

_FAULT_SQL: dict[str, tuple[str, ...]] = {
    "orphan_submissions": (
        "ALTER TABLE submissions DROP CONSTRAINT IF EXISTS submissions_user_id_fkey",
        "INSERT INTO submissions (id, user_id, activity_code, status, visibility, payload,"
        " created_at, updated_at)"
        " SELECT 'fault_os_' || g, 'deleted_user_os_' || g, 'EXPLORE', 'PENDING', 'PRIVATE',"
        " '{}', (now() AT TIME ZONE 'UTC') - interval '2 days',"
        " (now() AT TIME ZONE 'UTC') - interval '2 days'"
        " FROM generate_series(1, %(n)s) AS g",
    ),
    "orphan_ledger_rows": (
        "ALTER TABLE points_ledger DROP CONSTRAINT IF EXISTS points_ledger_user_id_fkey",
        "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
        " created_at, event_time, meta)"
        " SELECT 'fault_ol_' || g, 'deleted_user_ol_' || g, 'EXPLORE', 'MANUAL', 50,"
        " (now() AT TIME ZONE 'UTC') - interval '2 days', now() - interval '2 days',"
        ' \'{"reason": "manual award"}\''
        " FROM generate_series(1, %(n)s) AS g",
    ),
    "orphan_attachments": (
        "ALTER TABLE submission_attachments"
        " DROP CONSTRAINT IF EXISTS submission_attachments_submission_id_fkey",
        "INSERT INTO submission_attachments (id, submission_id, path, hash, created_at)"
        " SELECT 'fault_oa_' || g, 'deleted_submission_' || g,"
        " 'evidence/deleted/' || g || '.pdf', md5(g::text),"
        " (now() AT TIME ZONE 'UTC') - interval '2 days'"
        " FROM generate_series(1, %(n)s) AS g",
    ),
    "duplicate_learn": (
        "DROP INDEX IF EXISTS submissions_one_live_learn_per_user",
        # Past the single-attempt trigger too, for this fault's transaction only.
        "SET LOCAL session_replication_role = replica",
        "INSERT INTO submissions (id, user_id, activity_code, status, visibility, payload,"
        " created_at, updated_at)"
        " SELECT 'fault_dl_' || s.id, s.user_id, 'LEARN', 'PENDING', 'PRIVATE', s.payload,"
        " (now() AT TIME ZONE 'UTC') - interval '1 day',"
        " (now() AT TIME ZONE 'UTC') - interval '1 day'"
        " FROM submissions AS s"
        " WHERE s.activity_code = 'LEARN' AND s.status IN ('PENDING', 'APPROVED')"
        "   AND s.id LIKE 's%%' AND right(s.user_id, 1) = '3'"
        " ORDER BY s.user_id LIMIT %(n)s",
    ),
    "duplicate_external_events": (
        "DROP INDEX IF EXISTS points_ledger_external_event_id_key",
        "CREATE TEMP TABLE fault_dx AS SELECT l.* FROM points_ledger AS l"
        " WHERE l.external_event_id IS NOT NULL AND l.id LIKE 'l%%'"
        "   AND right(l.user_id, 1) = '4' ORDER BY l.id LIMIT %(n)s",
        "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
        " external_source, external_event_id, created_at, event_time, meta)"
        " SELECT 'fault_dx_' || id, user_id, activity_code, source, delta_points,"
        " external_source, external_event_id, created_at + interval '2 seconds',"
        " event_time + interval '2 seconds', meta FROM fault_dx",
        "DROP TABLE fault_dx",
    ),
    "missing_awards": (
        "CREATE TEMP TABLE fault_ma AS SELECT s.id, s.user_id FROM submissions AS s"
        " WHERE s.activity_code = 'LEARN' AND s.status = 'APPROVED' AND s.id LIKE 's%%'"
        "   AND right(s.user_id, 1) = '5' ORDER BY s.user_id LIMIT %(n)s",
        "DELETE FROM points_ledger AS l USING fault_ma AS m"
        " WHERE l.user_id = m.user_id AND l.activity_code = 'LEARN'",
        "DROP TABLE fault_ma",
    ),
    "extra_awards": (
        "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
        " created_at, event_time, meta)"
        " SELECT 'fault_ea_' || v.id, v.user_id, 'LEARN', 'FORM', 20,"
        " (now() AT TIME ZONE 'UTC') - interval '1 day', now() - interval '1 day',"
        " jsonb_build_object('submission_id', v.id)"
        " FROM (SELECT DISTINCT ON (s.user_id) s.id, s.user_id FROM submissions AS s"
        "        WHERE s.activity_code = 'LEARN' AND s.status IN ('PENDING', 'REJECTED')"
        "          AND s.id LIKE 's%%' AND right(s.user_id, 1) = '6'"
        "          AND NOT EXISTS (SELECT 1 FROM submissions AS k WHERE k.user_id = s.user_id"
        "                          AND k.activity_code = 'LEARN'"
        "                          AND k.status IN ('APPROVED', 'REVOKED'))"
        "        ORDER BY s.user_id, s.id LIMIT %(n)s) AS v",
    ),
    "point_differences": (
        "UPDATE points_ledger AS l SET delta_points = l.delta_points + 7"
        " FROM (SELECT s.id FROM submissions AS s"
        "        WHERE s.activity_code = 'LEARN' AND s.status = 'APPROVED' AND s.id LIKE 's%%'"
        "          AND right(s.user_id, 1) = '7'"
        "        ORDER BY s.user_id LIMIT %(n)s) AS v"
        " WHERE l.meta ->> 'submission_id' = v.id AND l.delta_points > 0",
    ),
    "negative_totals": (
        "INSERT INTO points_ledger (id, user_id, activity_code, source, delta_points,"
        " created_at, event_time, meta)"
        " SELECT 'fault_nt_' || v.user_id, v.user_id, 'LEARN', 'MANUAL',"
        " -(coalesce((SELECT sum(l.delta_points) FROM points_ledger AS l"
        "             WHERE l.user_id = v.user_id), 0) + 10),"
        " (now() AT TIME ZONE 'UTC') - interval '1 day', now() - interval '1 day',"
        ' \'{"reason": "manual adjustment"}\''
        " FROM (SELECT s.user_id FROM submissions AS s"
        "        WHERE s.activity_code = 'LEARN' AND s.status = 'APPROVED' AND s.id LIKE 's%%'"
        "          AND right(s.user_id, 1) = '8'"
        "        ORDER BY s.user_id LIMIT %(n)s) AS v",
    ),
}


async def inject_faults(conn: Conn, faults: dict[str, int]) -> dict[str, int]:
    """Inject `faults[kind]` problems of each kind, set-based; returns how many were made.

    The definitions follow `commands/integrity.py`: orphans are counted as rows; the
    point checks compare, per existing (user, activity), the ledger sum (each
    external_event_id counted once) with what APPROVED submissions are worth, and leave
    orphans out. Each kind has its own victims (users whose number ends in the kind's own
    digit), so whatever else is injected its count is exact. With N = faults[kind]:

    - orphan_submissions: N PENDING EXPLORE submissions whose user does not exist
      (drops submissions_user_id_fkey): N rows. PENDING, so no point check moves.
    - orphan_ledger_rows: N MANUAL 50-point EXPLORE ledger rows whose user does not exist
      (drops points_ledger_user_id_fkey): N rows.
    - orphan_attachments: N attachments whose submission does not exist (drops
      submission_attachments_submission_id_fkey): N rows.
    - duplicate_learn: N users with one live LEARN get a second, PENDING one (drops the
      partial unique index submissions_one_live_learn_per_user, and writes with
      session_replication_role = replica past the single-attempt trigger): N users, N
      extra rows.
    - duplicate_external_events: N webhook awards replayed once, meta and all (drops the
      unique index points_ledger_external_event_id_key): N external_event_ids with two
      rows each. The points are doubled in the user's total; the reconciliation counts an
      event once, so it sees no difference (a per-row sum, like the guide's, does).
    - missing_awards: N users lose every LEARN ledger row (their one award and its
      zero-sum correction pairs): N (user, LEARN) pairs with an APPROVED submission and
      no ledger row.
    - extra_awards: N users whose LEARN submissions are all PENDING or REJECTED get a
      20-point FORM award naming one of them: N (user, LEARN) pairs with ledger points
      and no APPROVED submission.
    - point_differences: N approved LEARN awards get 7 points more: N (user, LEARN)
      pairs whose ledger sum is 27 where 20 is due.
    - negative_totals: N users get a MANUAL LEARN adjustment, naming no submission, of
      minus (their total + 10): N users whose total is -10. A negative total cannot
      happen without some (user, activity) sum being below what is due, so each of
      these users also has one (user, LEARN) point difference: `expected_findings()`
      adds them to the differences.

    The fault rows' ids start with `fault_`; the clean data's never do.
    """
    for kind in FAULT_KINDS:
        n = int(faults.get(kind, 0))
        if n <= 0:
            continue
        async with conn.transaction():
            for stmt in _FAULT_SQL[kind]:
                await conn.execute(sql.SQL(stmt), {"n": n})
    # Each definition sees only its own kind, so one count per kind after all of them
    # proves every kind exact (and, for kinds not asked for, the clean data at zero).
    made = {kind: await _fault_count(conn, kind) for kind in FAULT_KINDS}
    wrong = {k: (int(faults.get(k, 0)), v) for k, v in made.items() if v != faults.get(k, 0)}
    if wrong:
        raise RuntimeError(f"fault counts (asked, found) differ: {wrong}")
    return made


# How many problems of each kind the database holds, by the definitions above.
FAULT_COUNT_SQL: dict[str, str] = {
    "orphan_submissions": "SELECT count(*) FROM submissions AS s"
    " WHERE NOT EXISTS (SELECT 1 FROM users AS u WHERE u.id = s.user_id)",
    "orphan_ledger_rows": "SELECT count(*) FROM points_ledger AS l"
    " WHERE NOT EXISTS (SELECT 1 FROM users AS u WHERE u.id = l.user_id)",
    "orphan_attachments": "SELECT count(*) FROM submission_attachments AS a"
    " WHERE NOT EXISTS (SELECT 1 FROM submissions AS s WHERE s.id = a.submission_id)",
    "duplicate_learn": "SELECT count(*) FROM (SELECT user_id FROM submissions"
    " WHERE activity_code = 'LEARN' AND status IN ('PENDING', 'APPROVED')"
    " GROUP BY user_id HAVING count(*) > 1) AS d",
    "duplicate_external_events": "SELECT count(*) FROM (SELECT external_event_id"
    " FROM points_ledger WHERE external_event_id IS NOT NULL"
    " GROUP BY external_event_id HAVING count(*) > 1) AS d",
    "missing_awards": "SELECT count(*) FROM submissions AS s"
    " WHERE s.status = 'APPROVED' AND s.activity_code <> 'SHINE'"
    " AND NOT EXISTS (SELECT 1 FROM points_ledger AS l WHERE l.meta ->> 'submission_id' = s.id)",
    "extra_awards": "SELECT count(*) FROM points_ledger AS l"
    " JOIN submissions AS s ON s.id = l.meta ->> 'submission_id'"
    " WHERE s.status IN ('PENDING', 'REJECTED')",
    "point_differences": "SELECT count(*) FROM points_ledger AS l"
    " WHERE l.id LIKE 'l%' AND l.activity_code = 'LEARN' AND l.delta_points = 27",
    "negative_totals": "SELECT count(*) FROM (SELECT user_id FROM points_ledger"
    " GROUP BY user_id HAVING sum(delta_points) < 0) AS d",
}


def expected_findings(faults: dict[str, int]) -> dict[str, int]:
    """What an exact integrity check reports per kind after `inject_faults(faults)`:
    the injected count, plus one point difference per negative total (see above)."""
    expected = {kind: int(faults.get(kind, 0)) for kind in FAULT_KINDS}
    expected["point_differences"] += expected["negative_totals"]
    return expected


async def _fault_count(conn: Conn, kind: str) -> int:
    return await _scalar(conn, sql.SQL(FAULT_COUNT_SQL[kind]))


# ------------------------------------------------------------------------ for benches


@contextlib.asynccontextmanager
async def scale_database(
    name: str,
    *,
    users: int,
    faults: dict[str, int] | None = None,
    seed: int = 0,
) -> AsyncIterator[tuple[str, dict[str, int]]]:
    """A private server holding the scale fixture at `users` users (10 submissions, 20
    ledger rows and one Kajabi event each): yields (dsn, counts as build_scale_fixture
    returns them) and stops the server afterwards. The set-up every bench repeated."""
    pg = EmbeddedPostgres(settings=SCALE_SERVER_SETTINGS)
    pg.start()
    try:
        dsn = pg.create_database(name)
        started = time.perf_counter()
        counts = await build_scale_fixture(
            dsn,
            users=users,
            submissions=users * 10,
            ledger=users * 20,
            kajabi=users,
            faults=faults,
            seed=seed,
        )
        print(
            f"scale fixture: {counts['users']:,} users, {counts['submissions']:,} submissions, "
            f"{counts['points_ledger']:,} ledger rows, {counts['submission_attachments']:,} "
            f"attachments, built in {time.perf_counter() - started:.1f} s"
        )
        yield dsn, counts
    finally:
        pg.stop()


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_times(pid: int) -> tuple[int, list[int]] | None:
    """(parent pid, [utime, stime, cutime, cstime] in clock ticks) from /proc, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[1]), [int(x) for x in fields[11:15]]


class ServerCpu:
    """CPU seconds spent by a local server's processes: the postmaster and its live
    children (backends, parallel workers), plus the children it has reaped (their time
    is in its cutime/cstime), so a parallel worker that exited is still counted.

    On a machine whose cores other people's tests share, a query's wall time says as much
    about them as about it; the CPU time it costs the server does not. `None` where the
    server is not a process of this machine (no /proc, or a remote DSN)."""

    def __init__(self, postmaster: int) -> None:
        self.postmaster = postmaster

    @classmethod
    async def of(cls, dsn: str) -> ServerCpu | None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            backend = await _scalar(conn, sql.SQL("SELECT pg_backend_pid()"))
            # read while the backend lives: once the connection closes, its /proc is gone
            return cls._local(backend)

    @classmethod
    def _local(cls, backend: int) -> ServerCpu | None:
        own = _proc_times(backend)
        if own is None:
            return None
        try:
            cmdline = Path(f"/proc/{own[0]}/cmdline").read_bytes()
        except OSError:
            return None
        return cls(own[0]) if b"postgres" in cmdline else None

    def seconds(self) -> float:
        ticks = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            times = _proc_times(int(entry.name))
            if times is not None and times[0] == self.postmaster:
                ticks += times[1][0] + times[1][1]
        own = _proc_times(self.postmaster)
        if own is not None:
            ticks += sum(own[1])
        return ticks / _CLK_TCK


async def add_recommended_indexes(dsn: str) -> list[str]:
    """The guide's recommended indexes (`commands.indexes.RECOMMENDED`) that no index of the
    schema serves (`/db indexes`' own check says which), built plainly (nothing else runs
    meanwhile) and analyzed. Their names."""
    from bot.gateway import TargetGateway  # the bot's own reads, as `/db indexes`

    gateway = TargetGateway(dsn)
    try:
        finding = await gateway.read(check_recommended)
    finally:
        await gateway.close()
    wanted = {str(r["recommended"]) for r in finding.rows}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SET maintenance_work_mem = '1GB'")
        for rec in RECOMMENDED:
            if rec.name not in wanted:
                continue
            cols = sql.SQL(", ").join(
                sql.SQL("{}{}").format(
                    sql.Identifier(c.split()[0]), sql.SQL(" DESC" if c.endswith(" DESC") else "")
                )
                for c in rec.columns
            )
            stmt = sql.SQL("CREATE INDEX {} ON {} ({})").format(
                sql.Identifier(rec.name), sql.Identifier(rec.schema, rec.table), cols
            )
            if rec.where:  # repo data, like the schema
                stmt = sql.SQL("{} WHERE {}").format(stmt, sql.SQL(rec.where))
            await conn.execute(stmt)
            await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(rec.schema, rec.table)))
    return sorted(wanted)


async def disk_bytes(dsn: str) -> int:
    """The server's databases and its WAL directory, in bytes."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return int(
            await _scalar(
                conn,
                sql.SQL(
                    "SELECT (SELECT sum(pg_database_size(oid)) FROM pg_database)"
                    " + (SELECT coalesce(sum(size), 0) FROM pg_ls_waldir())"
                ),
            )
        )


async def keep_serving(dsns: dict[str, str]) -> None:
    """`--keep`: the DSNs printed (`LABEL dsn` lines, for other benches' `--dsn`), then the
    servers kept running until Ctrl-C or SIGTERM."""
    for label, dsn in dsns.items():
        print(f"{label} {dsn}", flush=True)
    several = len(dsns) > 1
    print(
        f"server{'s' if several else ''} kept running; Ctrl-C (or SIGTERM) stops "
        f"{'them' if several else 'it'}",
        flush=True,
    )
    await wait_for_signal()


# ------------------------------------------------------------------------------ script


async def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--submissions", type=int, default=None, help="default: 10 per user")
    ap.add_argument("--ledger", type=int, default=None, help="default: 20 per user")
    ap.add_argument("--kajabi", type=int, default=None, help="default: 1 per user")
    ap.add_argument("--faults", type=int, default=0, help="how many of each fault kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the server running; print DSN")
    ap.add_argument(
        "--indexes", action="store_true", help="add the guide's recommended indexes too"
    )
    args = ap.parse_args()
    pg = EmbeddedPostgres(settings=SCALE_SERVER_SETTINGS)
    pg.start()
    try:
        dsn = pg.create_database("leaps_scale")
        started = time.perf_counter()
        counts = await build_scale_fixture(
            dsn,
            users=args.users,
            submissions=args.submissions or args.users * 10,
            ledger=args.ledger or args.users * 20,
            kajabi=args.kajabi or args.users,
            faults=dict.fromkeys(FAULT_KINDS, args.faults) if args.faults else None,
            seed=args.seed,
        )
        if args.indexes:
            added = await add_recommended_indexes(dsn)
            print(f"recommended indexes added: {', '.join(added) or 'none (all present)'}")
        elapsed = time.perf_counter() - started
        for name, n in counts.items():
            print(f"{name:32} {n:>12,}")
        disk_gb = await disk_bytes(dsn) / 1e9
        print(f"built in {elapsed:.1f} s, {disk_gb:.2f} GB on disk (databases and WAL)")
        print(f"BENCH scale build_s={elapsed:.1f} disk_gb={disk_gb:.2f} users={args.users}")
        if args.keep:
            await keep_serving({"DSN": dsn})
    finally:
        pg.stop()


if __name__ == "__main__":
    try:
        asyncio.run(_main())
    except KeyboardInterrupt:
        pass

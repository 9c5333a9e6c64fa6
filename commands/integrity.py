"""`/db integrity`: broken data the constraints should have prevented, counted exactly.

Each problem is one finding with its exact count, a sample (at most ten rows) and the
remedy that repairs it. The counts are designed so that one kind of damage never
shows up under another kind's name, because each finding points at the remedy that
fixes *that* damage:

* Reconciliation (missing / extra / differences) and negative totals look only at
  users and activities that exist; rows of a deleted user or an unknown activity
  are orphans and are counted only as orphans.
* A replayed webhook award (one `external_event_id` on several ledger rows) counts
  once in the reconciliation: it is reported as a duplicate event, which
  `dedupe-ledger-events` repairs, and not as a point difference.

Speed: `points_ledger` and `submissions` are read by one query per range of user ids
that groups each table by user (one column pair per activity) and derives everything
else from those two aggregates: orphans of both tables (the anti-join with `users` runs
on the per-user rows, not on the raw rows), duplicate LEARN submissions, the
reconciliation and negative totals; only users whose sums disagree somewhere are unfolded
per activity. A range reads only its users' rows, through the user_id indexes, so each
statement's work is bounded by the range (RANGE_ROWS rows), not by the tables: at
1,000,000 users (30,000,000 rows) a hundred statements of about a second at most, two
at a time, exact. Replayed webhook awards (ledger rows sharing an external_event_id) are
looked for before the ranges, a bounded piece of the ledger at a time, and not at all
while a valid unique index rules them out. Orphan attachments are a merge anti-join
over two indexes, range by range of submission ids, beside the pass; the foreign-key
check is a catalog read. bench/integrity.py times the reconciliation against the two
aggregates any reconciliation must compute (`needed_s`) and against the guide's SQL,
with the server CPU beside the wall time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
from array import array
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from commands.base import (
    Context,
    Finding,
    Gateway,
    Reader,
    Report,
    Row,
    Status,
    UsageError,
    int8s,
)
from commands.base import register as register_command
from commands.keyranges import WHOLE, Piece, block_pieces, check_pieces, key_pieces

SAMPLE = 10
# The one aggregate pass groups a few hundred thousand (user, activity) pairs on a
# big database; below this the hash tables spill to disk and the pass slows severalfold.
WORK_MEM = "64MB"
# Parallel workers for the pass (see _tune): none, as measured on 2 cores.
PARALLEL_WORKERS = 0
# The pass reads ranges of users of about this many rows of the two tables each (see
# `_run_pass`): 0.2 s of server CPU a range on the 2-core machine measured, 1 s of wall
# time with the machine's load at 11, far inside the check timeout; as cheap in all as
# ranges twice the size. No more ranges than the histogram can split.
RANGE_ROWS = 250_000
# The orphan attachments' ranges (of submission ids) hold this many index entries of the
# two tables each: a merge of two indexes costs a fraction of the pass's grouping a row.
ATTACHMENT_RANGE_ROWS = 1_000_000
# The replays' look at the ledger reads this many heap pages (8 kB each) a statement:
# about 1,200,000 rows, a few tenths of a second (see `replays_of`).
REPLAY_PAGES = 20_000

CLEANUP = "/db cleanup-orphans"
DEDUPE_LEARN = "/db dedupe-learn"
RECONCILE = "/db reconcile-points"
DEDUPE_EVENTS = "/db dedupe-ledger-events"

# Finding names, in report order.
SUB_NO_USER = "orphans: submissions without a user"
SUB_NO_ACTIVITY = "orphans: submissions without an activity"
LEDGER_NO_USER = "orphans: ledger rows without a user"
LEDGER_NO_ACTIVITY = "orphans: ledger rows without an activity"
ATTACHMENT_NO_SUBMISSION = "orphans: attachments without a submission"
FOREIGN_KEYS = "guard: foreign keys"
DUPLICATE_LEARN = "duplicate LEARN submissions"
DUPLICATE_EVENTS = "duplicate external_event_id"
MISSING_AWARDS = "points: missing awards"
EXTRA_AWARDS = "points: extra awards"
POINT_DIFFERENCES = "points: differences"
NEGATIVE_TOTALS = "points: negative totals"

FINDINGS: tuple[str, ...] = (
    SUB_NO_USER,
    SUB_NO_ACTIVITY,
    LEDGER_NO_USER,
    LEDGER_NO_ACTIVITY,
    ATTACHMENT_NO_SUBMISSION,
    FOREIGN_KEYS,
    DUPLICATE_LEARN,
    DUPLICATE_EVENTS,
    MISSING_AWARDS,
    EXTRA_AWARDS,
    POINT_DIFFERENCES,
    NEGATIVE_TOTALS,
)

# (table, column, referenced table): the foreign keys that keep orphans out.
EXPECTED_FOREIGN_KEYS: tuple[tuple[str, str, str], ...] = (
    ("submissions", "user_id", "users"),
    ("submissions", "activity_code", "activities"),
    ("points_ledger", "user_id", "users"),
    ("points_ledger", "activity_code", "activities"),
    ("submission_attachments", "submission_id", "submissions"),
)

SNAKE_KEYS = ("peers_trained", "students_trained")
CAMEL_KEYS = ("peersTrained", "studentsTrained")


# --- AMPLIFY payload keys -----------------------------------------------------------

_QUOTA_SOURCE_SQL = """
SELECT p.prosrc AS source
FROM pg_proc p
WHERE p.proname = 'check_amplify_quota'
ORDER BY EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgfoid = p.oid AND NOT t.tgisinternal) DESC,
         p.oid DESC
LIMIT 1
"""


def keys_in_source(source: str | None) -> tuple[str, str]:
    """The payload keys a version of check_amplify_quota() reads.

    Production uses snake_case; older versions camelCase. A source naming neither
    (or no function at all) falls back to production's spelling.
    """
    text = source or ""
    peers = next((k for k in ("peers_trained", "peersTrained") if f"'{k}'" in text), None)
    students = next((k for k in ("students_trained", "studentsTrained") if f"'{k}'" in text), None)
    if peers is None and students is None:
        return SNAKE_KEYS
    return (
        peers or ("peersTrained" if students == "studentsTrained" else "peers_trained"),
        students or ("studentsTrained" if peers == "peersTrained" else "students_trained"),
    )


async def amplify_keys(reader: Reader) -> tuple[str, str]:
    """(peers key, students key) that the live `check_amplify_quota()` reads from
    submission payloads; the function the quota trigger calls wins over any other."""
    rows = await reader.fetch(_QUOTA_SOURCE_SQL)
    return keys_in_source(str(rows[0]["source"]) if rows else None)


# --- the pass over points_ledger and submissions ------------------------------------

# The pass groups each big table by user only, one column pair per activity (a pivot):
# a hash table of users instead of (user, activity) pairs is several times smaller, and
# measured 1.5-2x faster at 2,000,000 ledger rows. The activities come from the live table and
# are bound as parameters; only their number shapes the SQL text. `k` is an activity's
# position in that list, NULL for a code the table does not hold (an orphan).
#
# Repeated external_event_ids, one row each: the pass's replays (`_REPLAYS_TEMPLATE`) and,
# alone, `check_duplicate_events` (one definition of what a replayed award is). A replay
# counts once (at its smallest delta) in `counted`, and in full in the user's total; its
# excess is charged to its smallest user id and activity code.
_DUP_EVENTS_SQL = """
  SELECT l.external_event_id, count(*) AS n, sum(l.delta_points) AS pts,
         min(l.delta_points) AS one_pts, min(l.user_id) AS user_id,
         array_position(%(codes)s::text[], min(l.activity_code)) AS k
  FROM points_ledger l
  WHERE l.external_event_id IS NOT NULL @AMONG@
  GROUP BY l.external_event_id
  HAVING count(*) > 1
"""

# The replays, read before the ranges (none at all while a valid unique index rules
# replays out): the excess per (user, activity), every one of them, and the finding's
# sample and totals, in the order the pass samples (user id by code point, activity,
# event id). Over the whole ledger in one statement (`@AMONG@` empty), or among the rows
# at the given tuple ids (`replays_of`).
_REPLAYS_TEMPLATE = f"""
WITH dup AS MATERIALIZED ({_DUP_EVENTS_SQL})
SELECT 'excess' AS part, d.user_id, d.k, sum(d.pts - d.one_pts)::bigint AS pts,
       NULL::bigint AS n, NULL::bigint AS expected, NULL::text AS external_event_id,
       NULL::bigint AS units, NULL::bigint AS rows_total
FROM dup d
GROUP BY d.user_id, d.k
UNION ALL
(SELECT 'event', d.user_id, d.k, d.pts, d.n - 1, d.one_pts, d.external_event_id,
        count(*) OVER (), sum(d.n - 1) OVER ()
 FROM dup d
 ORDER BY d.user_id COLLATE "C", d.k, d.external_event_id COLLATE "C"
 LIMIT %(sample)s)
"""  # noqa: S608 (a constant of this module)
_REPLAYS_SQL = _REPLAYS_TEMPLATE.replace("@AMONG@", "")
_REPLAYS_AMONG_SQL = _REPLAYS_TEMPLATE.replace("@AMONG@", "AND l.ctid = ANY(%(tids)s::tid[])")

# A hash of the event id and the tuple id of every ledger row that carries an event id,
# on one range of heap pages (`{rows}`, a block piece's condition), in the order of the
# hashes (both aggregates read the same sorted rows, so they stay aligned; the order is
# checked): 8 bytes of a hash (int8send) and 6 of a tuple id (tidsend) a row, packed in
# one bytea each. Where `replays_of` looks for ids seen twice, a bounded piece at a
# time, holding them as compact arrays rather than Python integers.
_EVENT_HASHES_SQL = """
SELECT coalesce(string_agg(int8send(e.h), ''::bytea), ''::bytea) AS hashes,
       coalesce(string_agg(tidsend(e.t), ''::bytea), ''::bytea) AS tids
FROM (SELECT hashtextextended(l.external_event_id, 0) AS h, l.ctid AS t
      FROM points_ledger l
      WHERE {rows}
        AND l.external_event_id IS NOT NULL
      ORDER BY 1) e
"""


# One range of users (`@RANGE@`: bounds on user_id, or none): their rows of both tables,
# grouped by user, and every problem about them. `excess` holds the replays' excess
# (`_REPLAYS_SQL`) of every user; only those of the range meet the range's users.
_PASS_TEMPLATE = """
WITH excess AS (
  SELECT x.user_id, x.k, x.pts
  FROM unnest(%(x_users)s::text[], %(x_ks)s::int[], %(x_pts)s::bigint[]) AS x(user_id, k, pts)
),
led AS (
  SELECT l.user_id, count(*) AS n, sum(l.delta_points) AS pts,
         count(*) FILTER (WHERE l.k IS NULL) AS other @LED_COLS@
  FROM (SELECT user_id, delta_points, @K_OF_CODE@ AS k FROM points_ledger
        WHERE @RANGE@ OFFSET 0) l
  GROUP BY l.user_id
),
sub AS (
  SELECT s.user_id, count(*) AS n, count(*) FILTER (WHERE s.k IS NULL) AS other @SUB_COLS@,
         count(*) FILTER (WHERE s.k = %(learn)s AND s.open) AS open_learn,
         coalesce(sum(2 * @INT_OF(s.peers)@ + @INT_OF(s.students)@)
           FILTER (WHERE s.amplify), 0) AS amplify
  FROM (SELECT user_id, k, approved, status IN ('PENDING', 'APPROVED') AS open,
               k = %(amplify)s AND approved AS amplify,
               CASE WHEN k = %(amplify)s AND approved THEN payload ->> %(peers)s END AS peers,
               CASE WHEN k = %(amplify)s AND approved THEN payload ->> %(students)s END AS students
        FROM (SELECT user_id, status, payload, status = 'APPROVED' AS approved,
                     @K_OF_CODE@ AS k
              FROM submissions WHERE @RANGE@ OFFSET 0) r
        OFFSET 0) s
  GROUP BY s.user_id
),
known AS (
  SELECT id FROM users WHERE @RANGE_ID@
),
everyone AS (
  SELECT coalesce(s.user_id, l.user_id) AS user_id,
         coalesce(s.n, 0) AS sub_n, coalesce(l.n, 0) AS led_n, coalesce(l.pts, 0) AS led_pts,
         coalesce(s.open_learn, 0) AS open_learn, coalesce(s.amplify, 0) AS amplify
         @USER_COLS@,
         kn.id IS NOT NULL AS user_ok
  FROM sub s FULL JOIN led l ON l.user_id = s.user_id
  LEFT JOIN known kn ON kn.id = coalesce(s.user_id, l.user_id)
),
per_user AS MATERIALIZED (
  SELECT u.*, u.user_ok AND (@SUSPECT@ OR u.user_id IN (SELECT user_id FROM excess)) AS suspect
  FROM everyone u
  WHERE NOT u.user_ok OR u.sub_other > 0 OR u.led_other > 0 OR u.open_learn > 1
     OR u.led_pts < 0 OR @SUSPECT@ OR u.user_id IN (SELECT user_id FROM excess)
),
pairs AS (
  SELECT u.user_id, v.k, v.approved, v.led_n, v.expected,
         v.led_pts - coalesce(x.pts, 0) AS counted
  FROM per_user u
  CROSS JOIN LATERAL (VALUES @PAIR_VALUES@) AS v(k, approved, led_n, led_pts, expected)
  LEFT JOIN excess x ON x.user_id = u.user_id AND x.k = v.k
  WHERE u.suspect AND (v.approved > 0 OR v.led_n > 0)
),
problems AS (
  SELECT 'sub_no_user' AS kind, user_id, NULL::int AS k, sub_n AS n,
         NULL::bigint AS expected, NULL::bigint AS actual, NULL::text AS external_event_id
  FROM per_user WHERE sub_n > 0 AND NOT user_ok
  UNION ALL
  SELECT 'sub_no_activity', user_id, NULL, sub_other, NULL, NULL, NULL
  FROM per_user WHERE sub_other > 0
  UNION ALL
  SELECT 'led_no_user', user_id, NULL, led_n, NULL, led_pts, NULL
  FROM per_user WHERE led_n > 0 AND NOT user_ok
  UNION ALL
  SELECT 'led_no_activity', user_id, NULL, led_other, NULL, NULL, NULL
  FROM per_user WHERE led_other > 0
  UNION ALL
  SELECT 'dup_learn', user_id, %(learn)s, open_learn - 1, NULL, NULL, NULL
  FROM per_user WHERE open_learn > 1
  UNION ALL
  SELECT 'negative', user_id, NULL, led_n, NULL, led_pts, NULL
  FROM per_user WHERE user_ok AND led_pts < 0
  UNION ALL
  SELECT CASE WHEN led_n = 0 THEN 'missing'
              WHEN approved = 0 THEN 'extra'
              ELSE 'difference' END,
         user_id, k, CASE WHEN led_n = 0 THEN 1 ELSE led_n END, expected, counted, NULL
  FROM pairs
  WHERE (led_n = 0 AND expected > 0) OR (led_n > 0 AND counted <> expected)
),
ranked AS (
  SELECT p.*, row_number() OVER (PARTITION BY kind ORDER BY user_id COLLATE "C", k,
                                 external_event_id COLLATE "C") AS rn,
         count(*) OVER (PARTITION BY kind) AS units,
         sum(n) OVER (PARTITION BY kind) AS rows_total,
         sum(coalesce(actual, 0) - coalesce(expected, 0)) OVER (PARTITION BY kind) AS net
  FROM problems p
)
SELECT r.kind, r.user_id, (%(codes)s::text[])[r.k] AS activity_code,
       r.n::bigint AS n, r.expected::bigint AS expected, r.actual::bigint AS actual,
       r.units::bigint AS units, r.rows_total::bigint AS rows_total, r.net::bigint AS net,
       r.external_event_id
FROM ranked r
WHERE r.rn <= %(sample)s
ORDER BY r.kind, r.rn
"""


def int_of(value: str) -> str:
    """A payload value (text) as an integer, 0 unless it is a whole number of at most nine
    digits, maybe signed, maybe padded with white space. Plain digits, as nearly every
    payload holds them, are told apart without the regular expression (10 % of the
    submissions' side of a range at 100,000 users)."""
    return (
        f"CASE WHEN length({value}) BETWEEN 1 AND 9"
        f" AND translate({value}, '0123456789', '') = '' THEN {value}::int"
        f" WHEN {value} ~ '^\\s*-?[0-9]{{1,9}}\\s*$' THEN {value}::int ELSE 0 END"
    )


def pass_sql(activities: int, piece: Piece = WHOLE) -> str:
    """The pass for `activities` activities (positions 1..n), over the user ids of
    `piece` (its bounds bound as `piece.params()`): a range of the users, so every row
    of a user, and every finding about that user, falls in one range. A range rather
    than a hash, because an index reads a range, and the planner estimates one from the
    column's histogram. Values are all bound."""
    ks = range(1, activities + 1)
    led = "".join(
        f", count(*) FILTER (WHERE l.k = {i}) AS ln{i},"
        f" coalesce(sum(l.delta_points) FILTER (WHERE l.k = {i}), 0) AS lp{i}"
        for i in ks
    )
    sub = "".join(f", count(*) FILTER (WHERE s.k = {i} AND s.approved) AS sa{i}" for i in ks)
    user = "".join(
        f", coalesce(s.sa{i}, 0) AS sa{i}, coalesce(l.ln{i}, 0) AS ln{i},"
        f" coalesce(l.lp{i}, 0) AS lp{i}"
        for i in ks
    )
    user += ", coalesce(s.other, 0) AS sub_other, coalesce(l.other, 0) AS led_other"
    due = {
        i: f"CASE WHEN {i} = %(amplify)s THEN u.amplify"
        f" ELSE u.sa{i} * greatest((%(points)s::int[])[{i}], 0) END"
        for i in ks
    }
    values = ", ".join(f"({i}, u.sa{i}, u.ln{i}, u.lp{i}, {due[i]})" for i in ks)
    if not values:
        values = "(0, 0, 0, 0, 0)"
    # Users whose raw sums already agree everywhere (and who have no replayed event, whose
    # excess would change `counted`) cannot hold a problem pair: only the others are
    # unfolded into one row per activity. Only users with some problem are kept at all
    # (`per_user`), so that the problems are read from a handful of rows, not every user.
    suspect = " OR ".join(
        f"(u.ln{i} = 0 AND {due[i]} > 0) OR (u.ln{i} > 0 AND u.lp{i} <> {due[i]})" for i in ks
    )
    # A CASE over bound codes: per row, far cheaper than array_position() on an array.
    k_of_code = (
        "CASE activity_code " + " ".join(f"WHEN %(code{i})s THEN {i}" for i in ks) + " END"
        if activities
        else "NULL::int"
    )
    return (
        _PASS_TEMPLATE.replace("@K_OF_CODE@", k_of_code)
        .replace("@INT_OF(s.peers)@", int_of("s.peers"))
        .replace("@INT_OF(s.students)@", int_of("s.students"))
        .replace("@LED_COLS@", led)
        .replace("@SUB_COLS@", sub)
        .replace("@USER_COLS@", user)
        .replace("@PAIR_VALUES@", values)
        .replace("@SUSPECT@", f"({suspect})" if suspect else "false")
        .replace("@RANGE@", piece.where("user_id"))
        .replace("@RANGE_ID@", piece.where("id"))
    )


_SUB_SAMPLE_SQL = {
    "user": """
SELECT id, user_id, activity_code, status::text AS status, created_at
FROM submissions s
WHERE s.user_id = ANY(%(keys)s)
  AND NOT EXISTS (SELECT 1 FROM users u WHERE u.id = s.user_id)
ORDER BY id LIMIT %(sample)s
""",
    "activity": """
SELECT id, user_id, activity_code, status::text AS status, created_at
FROM submissions s
WHERE s.user_id = ANY(%(keys)s)
  AND NOT EXISTS (SELECT 1 FROM activities a WHERE a.code = s.activity_code)
ORDER BY id LIMIT %(sample)s
""",
}
_LEDGER_SAMPLE_SQL = {
    "user": """
SELECT id, user_id, activity_code, source::text AS source, delta_points, event_time
FROM points_ledger l
WHERE l.user_id = ANY(%(keys)s)
  AND NOT EXISTS (SELECT 1 FROM users u WHERE u.id = l.user_id)
ORDER BY id LIMIT %(sample)s
""",
    "activity": """
SELECT id, user_id, activity_code, source::text AS source, delta_points, event_time
FROM points_ledger l
WHERE l.user_id = ANY(%(keys)s)
  AND NOT EXISTS (SELECT 1 FROM activities a WHERE a.code = l.activity_code)
ORDER BY id LIMIT %(sample)s
""",
}
_LEARN_SAMPLE_SQL = """
SELECT id, user_id, status::text AS status, created_at, updated_at
FROM submissions
WHERE user_id = ANY(%(keys)s) AND activity_code = 'LEARN' AND status IN ('PENDING', 'APPROVED')
ORDER BY user_id, created_at DESC, id LIMIT %(sample)s
"""


async def _tune(db: Reader, ranged: bool = False) -> None:
    """For a pass's transaction only: room for the hash tables; no JIT, whose compilation
    of the pass's many expressions cost 3-6 s at 100,000 users and saved less; no
    parallel workers (see below).

    A range of users (`ranged`) is read through the user_id indexes, never by a scan of
    the whole table, whatever the planner guesses: a range is a small part of a big table,
    and its rows sit closer together than the column's correlation says (rows of users
    who joined together). The ledger's rows as a bitmap, each heap page once; the
    submissions' counts from the (user_id, activity_code, status) index alone, already in
    order, and only the approved AMPLIFY rows' payloads from the heap. The whole table at
    once (no range) is read by sequential scans into hash aggregates: no walk of an index
    with a heap fetch per row, which was measured slower.

    Parallel workers (PARALLEL_WORKERS) were measured at 100,000 users on the 2-core
    machine the bench runs on, the whole command interleaved four times each way: none
    4.8 s wall / 4.7 s server CPU, one 5.9 / 5.7, two 5.4 / 5.9 (medians). Each worker
    builds a partial hash table of every user, which the leader merges again. The cores
    are used instead by reading two ranges of users at once (`_run_pass`)."""
    await db.fetch(
        "SELECT set_config('work_mem', %s, true), set_config('jit', 'off', true),"
        " set_config('max_parallel_workers_per_gather', %s, true),"
        " set_config('enable_indexscan', %s, true),"
        " set_config('enable_seqscan', %s, true)",
        (WORK_MEM, str(PARALLEL_WORKERS), "off", "off" if ranged else "on"),
    )


async def _tune_replays(db: Reader) -> None:
    """For the replays' one scan of the ledger: room for the event ids' hash table (it
    spilled to disk in 4 MB at 1,000,000 users), no JIT, and the planner's own parallel
    scan, which runs alone, before the ranges (1.06 s against 1.64 s serial there)."""
    await db.fetch(
        "SELECT set_config('work_mem', %s, true), set_config('jit', 'off', true)", (WORK_MEM,)
    )


async def _tune_attachments(db: Reader) -> None:
    """For the attachment check's transactions only: a serial merge anti-join over the
    two indexes (attachments by submission_id, submissions by id), both already in
    order, instead of hashing a million submission ids (0.43 s of server CPU against
    0.70 s at 100,000 users), and for a range of ids that order from the index too, not
    a bitmap and a sort (a third of the time). Serial, because the pass runs beside it."""
    await db.fetch(
        "SELECT set_config('jit', 'off', true), set_config('enable_hashjoin', 'off', true),"
        " set_config('enable_bitmapscan', 'off', true),"
        " set_config('max_parallel_workers_per_gather', '0', true)"
    )


def _kinds(rows: list[Row]) -> dict[str, list[Row]]:
    by_kind: dict[str, list[Row]] = {}
    for r in rows:
        by_kind.setdefault(str(r["kind"]), []).append(r)
    return by_kind


def _totals(rows: list[Row]) -> tuple[int, int, int]:
    """(problem units, rows they cover, net point difference) of one kind."""
    if not rows:
        return 0, 0, 0
    first = rows[0]
    return int(first["units"]), int(first["rows_total"]), int(first["net"] or 0)


def _ok(name: str, summary: str) -> Finding:
    return Finding(check=name, status=Status.OK, summary=summary)


async def _orphan_finding(
    db: Reader,
    name: str,
    what: str,
    parent: str,
    pair_rows: list[Row],
    sample_sql: str,
    key: str,
    table: str,
) -> Finding:
    """Orphan rows, counted exactly from the aggregate; the sample is fetched by the
    (few) orphan keys, through the index on the referencing column."""
    _units, total, _net = _totals(pair_rows)
    if total == 0:
        return _ok(name, f"every {what} has its {parent}")
    keys = sorted({str(r[key]) for r in pair_rows})
    sample = await db.fetch(sample_sql, {"keys": keys, "sample": SAMPLE})
    return Finding(
        check=name,
        status=Status.CRIT,
        summary=f"{total} {what} rows point at a {parent} that does not exist",
        rows=sample,
        hint=f"`{CLEANUP} {table}` backs them up and deletes them (needs two approvals)",
    )


# A unique index on external_event_id alone, valid, with no predicate or production's
# `IS NOT NULL` one (which leaves no non-null value out): then no event can be replayed.
_EVENTS_UNIQUE_SQL = """
SELECT i.indexrelid::regclass::text AS name
FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
WHERE i.indrelid = to_regclass('points_ledger')
  AND i.indisunique AND i.indisvalid AND i.indnkeyatts = 1 AND i.indexprs IS NULL
  AND a.attname = 'external_event_id'
  AND (i.indpred IS NULL
       OR pg_get_expr(i.indpred, i.indrelid) = '(external_event_id IS NOT NULL)')
ORDER BY 1
LIMIT 1
"""


async def events_unique_index(db: Reader) -> str | None:
    """The index that makes duplicate external_event_ids impossible, if there is one."""
    rows = await db.fetch(_EVENTS_UNIQUE_SQL)
    return str(rows[0]["name"]) if rows else None


def _event_rows(rows: list[Row], codes: list[str]) -> list[Row]:
    """The replays' sample rows as the pass's `dup_event` kind (their totals on each)."""
    return [
        {
            "kind": "dup_event",
            "user_id": r["user_id"],
            "activity_code": codes[int(r["k"]) - 1] if r["k"] else None,
            "n": r["n"],
            "expected": r["expected"],
            "actual": r["pts"],
            "units": r["units"],
            "rows_total": r["rows_total"],
            "net": 0,
            "external_event_id": r["external_event_id"],
        }
        for r in rows
        if r["part"] == "event"
    ]


async def _replays(db: Reader, codes: list[str]) -> tuple[list[Row], list[Row]]:
    """(the excess of every (user, activity) with a replay, the `dup_event` rows)."""
    await _tune_replays(db)
    rows = await db.fetch(_REPLAYS_SQL, {"codes": codes, "sample": SAMPLE})
    return [r for r in rows if r["part"] == "excess"], _event_rows(rows, codes)


async def check_duplicate_events(db: Reader) -> Finding:
    """`/db integrity`'s duplicate-event finding without its pass over the users, in one
    transaction: a catalog read when a valid unique index rules replays out, else the
    replays query over the whole ledger in one statement. For `/db webhooks`;
    `duplicate_events` bounds each statement instead."""
    unique_events = await events_unique_index(db)
    if unique_events is not None:
        return _duplicate_events([], unique_events)
    codes = [str(a["code"]) for a in await db.fetch("SELECT code FROM activities ORDER BY code")]
    _excess, events = await _replays(db, codes)
    return _duplicate_events(events)


def _tid(packed: bytes, i: int) -> str:
    """The i-th tuple id of `tidsend` records (4 bytes of block, 2 of line), as text."""
    record = packed[6 * i : 6 * i + 6]
    return f"({int.from_bytes(record[:4], 'big')},{int.from_bytes(record[4:], 'big')})"


def _in_order(hashes: array[int], tids: bytes) -> tuple[array[int], bytes]:
    """The piece's hashes ascending, each tuple id still beside its hash."""
    if all(a <= b for a, b in itertools.pairwise(hashes)):
        return hashes, tids
    order = sorted(range(len(hashes)), key=hashes.__getitem__)
    return array("q", (hashes[i] for i in order)), b"".join(tids[6 * i : 6 * i + 6] for i in order)


async def replays_of(
    gw: Gateway, codes: list[str], pages_each: int = REPLAY_PAGES
) -> tuple[list[Row], list[Row]] | Finding:
    """The replays as `_replays` finds them, each statement bounded: the ledger's heap is
    read `pages_each` pages at a time (`block_pieces`, two at once), each piece giving
    the hash and the tuple id of every row with an event id; a hash seen twice marks a
    candidate, and one last statement reads the candidates by tuple id and groups them
    by the event id itself (a hash collision is no replay there). A row moved between
    the two (an update) is looked for at its old place, so a replay written or moved
    while this runs shows up on the next run. Returns why, should a piece fail."""
    found_pieces: list[list[Piece]] = []

    async def pages(db: Reader) -> Finding:
        found_pieces.append(await block_pieces(db, "points_ledger", blocks_per_piece=pages_each))
        return _ok(DUPLICATE_EVENTS, "")

    found = await gw.run_check("integrity: replays, ledger pages", pages)
    if found.status is not Status.OK or not found_pieces:
        return found

    async def read(db: Reader, piece: Piece) -> tuple[array[int], bytes]:
        await _tune_replays(db)
        (row,) = await db.fetch(
            _EVENT_HASHES_SQL.format(rows=piece.where("l.ctid")), piece.params()
        )
        return _in_order(int8s(row["hashes"]), bytes(row["tids"]))

    # (hashes in order, their tuple ids) of each piece
    pieces = await check_pieces(gw, "integrity: replays", found_pieces[0], read, numbered=True)
    if isinstance(pieces, Finding):
        return pieces
    # the pieces' hashes merged in order: a hash seen twice in a row was seen twice (kept
    # as compact arrays, a few MB at 20,000,000 ledger rows, rather than a set of them)
    twice: set[int] = set()
    previous: int | None = None
    for h in heapq.merge(*(hashes for hashes, _tids in pieces)):
        if h == previous:
            twice.add(h)
        previous = h
    candidates = [
        _tid(tids, i) for hashes, tids in pieces for i, h in enumerate(hashes) if h in twice
    ]
    if not candidates:
        return [], []
    box: list[tuple[list[Row], list[Row]]] = []

    async def among(db: Reader) -> Finding:
        await _tune_replays(db)
        rows = await db.fetch(
            _REPLAYS_AMONG_SQL, {"codes": codes, "sample": SAMPLE, "tids": candidates}
        )
        box.append(([r for r in rows if r["part"] == "excess"], _event_rows(rows, codes)))
        return _ok(DUPLICATE_EVENTS, "")

    found = await gw.run_check("integrity: replays, candidates", among)
    return box[0] if found.status is Status.OK and box else found


async def duplicate_events(gw: Gateway) -> Finding:
    """`check_duplicate_events` with every statement bounded (`replays_of`), for
    `/db health`: a catalog read while a valid unique index rules replays out."""
    box: list[tuple[str | None, list[str]]] = []

    async def catalog(db: Reader) -> Finding:
        codes = await db.fetch("SELECT code FROM activities ORDER BY code")
        box.append((await events_unique_index(db), [str(a["code"]) for a in codes]))
        return _ok(DUPLICATE_EVENTS, "")

    found = await gw.run_check(DUPLICATE_EVENTS, catalog)
    if found.status is not Status.OK or not box:
        return found
    unique_events, codes = box[0]
    if unique_events is not None:
        return _duplicate_events([], unique_events)
    replays = await replays_of(gw, codes)
    if isinstance(replays, Finding):
        return replays.model_copy(update={"check": DUPLICATE_EVENTS})
    return _duplicate_events(replays[1])


@dataclass(frozen=True)
class _PassInputs:
    """What the ranges of the pass, and the findings built from them, read first."""

    peers: str
    students: str
    unique_events: str | None
    codes: list[str]
    points: list[int]
    excess: list[Row]  # the replays' excess per (user, activity)
    events: list[Row]  # the replays' `dup_event` rows: sample and totals


async def _pass_inputs(db: Reader, replays: bool = True) -> _PassInputs:
    """The catalog facts, and (with `replays`) the replays over the whole ledger in one
    statement; without, none (`_run_pass` reads them a bounded piece at a time)."""
    peers, students = await amplify_keys(db)
    unique_events = await events_unique_index(db)
    activities = await db.fetch("SELECT code, default_points FROM activities ORDER BY code")
    codes = [str(a["code"]) for a in activities]
    whole = replays and unique_events is None
    excess, events = await _replays(db, codes) if whole else ([], [])
    return _PassInputs(
        peers,
        students,
        unique_events,
        codes,
        [int(a["default_points"]) for a in activities],
        excess,
        events,
    )


async def pass_pieces(db: Reader) -> list[Piece]:
    """The pass's ranges of user ids: RANGE_ROWS rows of the ledger and the submissions
    each (by the planner's count), cut at the ledger's histogram; and the rows without a
    user id, where either table's user_id may be NULL (every row in one piece)."""
    also = [("submissions", "user_id")]
    return await key_pieces(db, "points_ledger", "user_id", per_piece=RANGE_ROWS, also=also)


async def _pass_rows(db: Reader, inputs: _PassInputs, piece: Piece = WHOLE) -> list[Row]:
    codes = inputs.codes
    await _tune(db, ranged=piece.ranged)
    return await db.fetch(
        pass_sql(len(codes), piece),
        {
            **{f"code{i}": code for i, code in enumerate(codes, start=1)},
            "codes": codes,
            "points": inputs.points,
            "amplify": codes.index("AMPLIFY") + 1 if "AMPLIFY" in codes else 0,
            "learn": codes.index("LEARN") + 1 if "LEARN" in codes else 0,
            "peers": inputs.peers,
            "students": inputs.students,
            "sample": SAMPLE,
            "x_users": [str(r["user_id"]) for r in inputs.excess],
            "x_ks": [r["k"] for r in inputs.excess],
            "x_pts": [int(r["pts"]) for r in inputs.excess],
            **piece.params(),
        },
    )


def merge_ranges(range_rows: list[list[Row]]) -> list[Row]:
    """The rows one pass over every user would give: per kind the totals summed over the
    ranges (each problem is in exactly one) and the first SAMPLE rows in the pass's own
    order (user_id and event id by code point, the `C` collation the pass sorts by)."""
    totals: dict[str, list[int]] = {}
    by_kind: dict[str, list[Row]] = {}
    for rows in range_rows:
        for kind, group in _kinds(rows).items():
            units, rows_total, net = _totals(group)
            t = totals.setdefault(kind, [0, 0, 0])
            t[0], t[1], t[2] = t[0] + units, t[1] + rows_total, t[2] + net
            by_kind.setdefault(kind, []).extend(group)
    merged: list[Row] = []
    for kind in sorted(by_kind):
        ordered = sorted(
            by_kind[kind],
            key=lambda r: (
                str(r["user_id"]),
                r["activity_code"] is None,
                str(r["activity_code"] or ""),
                r["external_event_id"] is None,
                str(r["external_event_id"] or ""),
            ),
        )
        units, rows_total, net = totals[kind]
        merged += [
            {**r, "units": units, "rows_total": rows_total, "net": net} for r in ordered[:SAMPLE]
        ]
    return merged


async def _pass_findings(db: Reader) -> list[Finding]:
    """Everything derived from the pass, run whole (every user at once) in this one
    transaction: the reference the ranges must equal."""
    inputs = await _pass_inputs(db)
    rows = merge_ranges([await _pass_rows(db, inputs), inputs.events])
    return await _findings_of(db, inputs, rows)


async def _run_pass(gw: Gateway, pieces: Sequence[Piece] | None = None) -> list[Finding]:
    """The pass as ranges of user ids (`pieces`, else `pass_pieces`, split by the
    ledger's statistics), each one query in its own read-only transaction on its own
    pooled connection, two at a time (the gateway's pool of four also holds the
    attachment and key checks), then the findings from the merged rows (their samples
    read in one more transaction).

    Each range reads only its users' rows (a bitmap over the user_id indexes), groups
    them and finds every problem about those users, so each statement's work is bounded
    by the range's size, not the tables': ranges of RANGE_ROWS rows stay well inside the
    check timeout whatever the size of the database, and the whole pass reads each row
    about once. The catalog facts and the bounds are read first, then the replays, a
    bounded piece of the ledger at a time (`replays_of`).

    Every row of a user is in one range, read in one snapshot, so each finding about a
    user is consistent; the ranges' snapshots differ by the seconds between them (a
    replay inserted meanwhile shows as a point difference until the next run)."""
    prepared: list[tuple[_PassInputs, Sequence[Piece]]] = []

    async def prepare(db: Reader) -> Finding:
        split = pieces if pieces is not None else await pass_pieces(db)
        prepared.append((await _pass_inputs(db, replays=False), split))
        return _ok(PASS_FINDINGS[0], "")

    ready = await gw.run_check("integrity: pass inputs", prepare)
    if ready.status is not Status.OK or not prepared:
        return _all_pass_findings(ready)
    inputs, split = prepared[0]
    if inputs.unique_events is None:
        replays = await replays_of(gw, inputs.codes)
        if isinstance(replays, Finding):
            return _all_pass_findings(replays)
        inputs = dataclasses.replace(inputs, excess=replays[0], events=replays[1])

    async def read(db: Reader, piece: Piece) -> list[Row]:
        return await _pass_rows(db, inputs, piece)

    # should one range fail, the findings cannot be made
    parts = await check_pieces(gw, "integrity: users", split, read, numbered=True)
    if isinstance(parts, Finding):
        return _all_pass_findings(parts)
    rows = merge_ranges([*parts, inputs.events])

    async def findings(db: Reader) -> list[Finding]:
        return await _findings_of(db, inputs, rows)

    return await _run_group(gw, PASS_FINDINGS, findings)


def _all_pass_findings(failed: Finding) -> list[Finding]:
    """Every finding of the pass saying why it could not be made."""
    return [Finding(check=n, status=failed.status, summary=failed.summary) for n in PASS_FINDINGS]


async def _findings_of(db: Reader, inputs: _PassInputs, rows: list[Row]) -> list[Finding]:
    """The findings of the pass's rows, in FINDINGS order (samples read by key)."""
    peers, students, unique_events = inputs.peers, inputs.students, inputs.unique_events
    k = _kinds(rows)
    out = [
        await _orphan_finding(
            db,
            SUB_NO_USER,
            "submission",
            "user",
            k.get("sub_no_user", []),
            _SUB_SAMPLE_SQL["user"],
            "user_id",
            "submissions",
        ),
        await _orphan_finding(
            db,
            SUB_NO_ACTIVITY,
            "submission",
            "activity",
            k.get("sub_no_activity", []),
            _SUB_SAMPLE_SQL["activity"],
            "user_id",
            "submissions",
        ),
        await _orphan_finding(
            db,
            LEDGER_NO_USER,
            "points_ledger",
            "user",
            k.get("led_no_user", []),
            _LEDGER_SAMPLE_SQL["user"],
            "user_id",
            "points_ledger",
        ),
        await _orphan_finding(
            db,
            LEDGER_NO_ACTIVITY,
            "points_ledger",
            "activity",
            k.get("led_no_activity", []),
            _LEDGER_SAMPLE_SQL["activity"],
            "user_id",
            "points_ledger",
        ),
    ]
    out.append(await _duplicate_learn(db, k.get("dup_learn", [])))
    out.append(_duplicate_events(k.get("dup_event", []), unique_events))
    out += _reconciliation(k, peers, students)
    out.append(_negative_totals(k.get("negative", [])))
    return out


async def _duplicate_learn(db: Reader, pair_rows: list[Row]) -> Finding:
    """Users with more than one LEARN submission in PENDING or APPROVED; the count of
    extra rows is what `dedupe-learn` would reject (all but each user's latest)."""
    users, extra, _net = _totals(pair_rows)
    if users == 0:
        return _ok(DUPLICATE_LEARN, "no user has more than one PENDING/APPROVED LEARN submission")
    keys = sorted({str(r["user_id"]) for r in pair_rows})
    sample = await db.fetch(_LEARN_SAMPLE_SQL, {"keys": keys, "sample": SAMPLE})
    return Finding(
        check=DUPLICATE_LEARN,
        status=Status.CRIT,
        summary=f"{users} users have more than one PENDING/APPROVED LEARN submission "
        f"({extra} extra rows)",
        rows=sample,
        hint=f"`{DEDUPE_LEARN}` keeps each user's latest and rejects the others",
    )


def _duplicate_events(pair_rows: list[Row], unique_index: str | None = None) -> Finding:
    """external_event_ids on more than one ledger row (anywhere in the table); extra
    rows = copies beyond the first, what `dedupe-ledger-events` removes."""
    ids, extra, _net = _totals(pair_rows)
    if ids == 0:
        why = f" (unique index {unique_index})" if unique_index else ""
        return _ok(DUPLICATE_EVENTS, f"every external_event_id appears on one ledger row{why}")
    sample = [
        {
            "external_event_id": r["external_event_id"],
            "user_id": r["user_id"],
            "copies": int(r["n"]) + 1,
            "points_each": r["expected"],
            "points_total": r["actual"],
        }
        for r in pair_rows
    ]
    return Finding(
        check=DUPLICATE_EVENTS,
        status=Status.CRIT,
        summary=f"{ids} external_event_ids appear more than once ({extra} extra ledger rows): "
        "replayed webhooks awarded twice",
        rows=sample,
        hint=f"`{DEDUPE_EVENTS}` keeps the first row of each and backs up the rest",
    )


def _pair_sample(rows: list[Row]) -> list[Row]:
    return [
        {
            "user_id": r["user_id"],
            "activity_code": r["activity_code"],
            "expected": r["expected"],
            "ledger": r["actual"],
            "ledger_rows": r["n"] if r["kind"] != "missing" else 0,
        }
        for r in rows
    ]


def _reconciliation(k: dict[str, list[Row]], peers: str, students: str) -> list[Finding]:
    """Ledger against approved submissions, per (user, activity) where both exist.

    expected = AMPLIFY: peers*2 + students*1 over APPROVED submissions, read with the
    live quota function's keys; other activities: APPROVED count * default_points (so
    0-point activities expect nothing). ledger = sum of delta_points, each
    external_event_id counted once.
    missing: expected > 0 and no ledger row at all;
    extra: no APPROVED submission, and ledger rows whose sum is not 0 (a revoked award
    and its reversal sum to 0 and are fine);
    differences: APPROVED submissions and ledger rows, sums differ.
    """
    how = f"AMPLIFY = {peers}*2 + {students}*1, others = default_points"
    missing, _rows, missing_pts = _totals(k.get("missing", []))
    extra, extra_rows, extra_pts = _totals(k.get("extra", []))
    diff, _rows, diff_pts = _totals(k.get("difference", []))
    out = [
        Finding(
            check=MISSING_AWARDS,
            status=Status.WARN,
            summary=f"{missing} (user, activity) pairs with approved submissions have no "
            f"ledger row: {-missing_pts} points never awarded ({how})",
            rows=_pair_sample(k["missing"]),
            hint=f"`{RECONCILE}` inserts the missing awards (idempotent)",
        )
        if missing
        else _ok(MISSING_AWARDS, f"every approved submission has its award ({how})"),
        Finding(
            check=EXTRA_AWARDS,
            status=Status.WARN,
            summary=f"{extra} (user, activity) pairs hold {extra_pts:+d} points in "
            f"{extra_rows} ledger rows without any approved submission",
            rows=_pair_sample(k["extra"]),
            hint="no automatic remedy: the ledger is history; review the rows, then correct "
            "with a MANUAL ledger row (`/db reconcile-points` only adds missing awards)",
        )
        if extra
        else _ok(EXTRA_AWARDS, "no ledger points without an approved submission"),
        Finding(
            check=POINT_DIFFERENCES,
            status=Status.WARN,
            summary=f"{diff} (user, activity) pairs where the ledger differs from approved "
            f"submissions, net {diff_pts:+d} points ({how})",
            rows=_pair_sample(k["difference"]),
            hint="no automatic remedy: review each pair's ledger rows and correct with a "
            "MANUAL row (`/db reconcile-points` only adds awards that are missing entirely)",
        )
        if diff
        else _ok(POINT_DIFFERENCES, f"ledger sums match approved submissions ({how})"),
    ]
    return out


def _negative_totals(rows: list[Row]) -> Finding:
    """Existing users whose ledger rows (all of them, as the leaderboard sums) add up
    to less than zero."""
    users, _rows, _net = _totals(rows)
    if users == 0:
        return _ok(NEGATIVE_TOTALS, "no user has a negative point total")
    sample = [{"user_id": r["user_id"], "total": r["actual"], "ledger_rows": r["n"]} for r in rows]
    return Finding(
        check=NEGATIVE_TOTALS,
        status=Status.CRIT,
        summary=f"{users} users have a negative point total (lowest sample "
        f"{min(int(r['actual']) for r in rows)})",
        rows=sample,
        hint="the sample shows the users; their MANUAL corrections drove them below zero: "
        "review before correcting (no automatic remedy)",
    )


# --- attachments --------------------------------------------------------------------

# The orphans' (submission_id, path) from the two indexes alone (attachments by
# (submission_id, path), unique in the schema; submissions by id), both in order: a
# merge anti-join with no heap read; then the orphans' own rows by that index.
_ATTACHMENTS_SQL = """
WITH orphan AS MATERIALIZED (
  SELECT DISTINCT sa.submission_id, sa.path
  FROM submission_attachments sa
  WHERE @RANGE_SA@
    AND NOT EXISTS (SELECT 1 FROM submissions s WHERE @RANGE_S@ AND s.id = sa.submission_id)
)
SELECT sa.id, sa.submission_id, sa.path, count(*) OVER () AS total
FROM orphan o
JOIN submission_attachments sa ON sa.submission_id = o.submission_id AND sa.path = o.path
WHERE @RANGE_SA@
ORDER BY sa.id COLLATE "C"
LIMIT %(sample)s
"""


def attachments_sql(piece: Piece = WHOLE) -> str:
    """Orphan attachments whose submission_id is in `piece`: the submissions of that
    range are all a parent can be, so both indexes are read for the range only."""
    return _ATTACHMENTS_SQL.replace("@RANGE_SA@", piece.where("sa.submission_id")).replace(
        "@RANGE_S@", piece.where("s.id")
    )


def _attachment_finding(rows: list[Row], total: int) -> Finding:
    if not total:
        return _ok(ATTACHMENT_NO_SUBMISSION, "every attachment has its submission")
    return Finding(
        check=ATTACHMENT_NO_SUBMISSION,
        status=Status.CRIT,
        summary=f"{total} submission_attachments rows point at a submission that does not exist",
        rows=[{k: v for k, v in r.items() if k != "total"} for r in rows],
        hint=f"`{CLEANUP} submission_attachments` backs them up and deletes them",
    )


async def _attachment_rows(db: Reader, piece: Piece = WHOLE) -> list[Row]:
    await _tune_attachments(db)
    return await db.fetch(attachments_sql(piece), {"sample": SAMPLE, **piece.params()})


async def check_orphan_attachments(db: Reader) -> Finding:
    """Attachments whose submission is gone: one merge anti-join, in one statement."""
    rows = await _attachment_rows(db)
    return _attachment_finding(rows, int(rows[0]["total"]) if rows else 0)


async def orphan_attachments(gw: Gateway, pieces: Sequence[Piece] | None = None) -> Finding:
    """`check_orphan_attachments` over ranges of submission ids (`pieces`, else from the
    attachments' statistics, ATTACHMENT_RANGE_ROWS of the two tables each), each one
    statement in its own transaction, one after the other (beside the pass's two at a
    time, within the gateway's pool of four): the counts summed, the first SAMPLE rows
    by id."""
    found: list[Sequence[Piece]] = [pieces] if pieces is not None else []

    async def split(db: Reader) -> Finding:
        table, column, parent = "submission_attachments", "submission_id", "submissions"
        found.append(await key_pieces(db, table, column, parent, per_piece=ATTACHMENT_RANGE_ROWS))
        return _ok(ATTACHMENT_NO_SUBMISSION, "")

    if not found:
        done = await gw.run_check(ATTACHMENT_NO_SUBMISSION, split)
        if done.status is not Status.OK or not found:
            return done
    parts = await check_pieces(gw, ATTACHMENT_NO_SUBMISSION, found[0], _attachment_rows, 1)
    if isinstance(parts, Finding):
        return parts
    rows = sorted((r for part in parts for r in part), key=lambda r: str(r["id"]))
    return _attachment_finding(rows[:SAMPLE], sum(int(p[0]["total"]) for p in parts if p))


# --- foreign keys -------------------------------------------------------------------

_FOREIGN_KEYS_SQL = """
SELECT e.tbl AS "table", e.col AS "column", e.ref AS "references",
       c.conname AS "constraint", c.convalidated AS validated
FROM unnest(%(tables)s::text[], %(columns)s::text[], %(refs)s::text[]) AS e(tbl, col, ref)
LEFT JOIN pg_constraint c
  ON c.contype = 'f'
 AND c.conrelid = to_regclass(e.tbl)
 AND c.confrelid = to_regclass(e.ref)
 AND c.conkey = ARRAY[(SELECT a.attnum FROM pg_attribute a
                        WHERE a.attrelid = to_regclass(e.tbl) AND a.attname = e.col)]
ORDER BY e.tbl, e.col
"""


async def check_foreign_keys(db: Reader) -> Finding:
    """Whether the foreign keys that keep orphans out are there and validated."""
    rows = await db.fetch(
        _FOREIGN_KEYS_SQL,
        {
            "tables": [t for t, _c, _r in EXPECTED_FOREIGN_KEYS],
            "columns": [c for _t, c, _r in EXPECTED_FOREIGN_KEYS],
            "refs": [r for _t, _c, r in EXPECTED_FOREIGN_KEYS],
        },
    )

    def label(r: Row) -> str:
        return f"{r['table']}.{r['column']} → {r['references']}"

    missing = [label(r) for r in rows if r["constraint"] is None]
    unvalidated = [label(r) for r in rows if r["constraint"] is not None and not r["validated"]]
    if not missing and not unvalidated:
        return _ok(FOREIGN_KEYS, f"all {len(rows)} foreign keys that prevent orphans exist")
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unvalidated:
        problems.append("NOT VALID (old rows unchecked): " + ", ".join(unvalidated))
    return Finding(
        check=FOREIGN_KEYS,
        status=Status.WARN,
        summary="foreign keys that prevent orphans are " + "; ".join(problems),
        rows=rows,
        hint=f"clean up with `{CLEANUP}`, then re-create each key from the migration",
    )


# --- the command --------------------------------------------------------------------


async def _run_group(
    gw: Gateway, names: tuple[str, ...], fn: Callable[[Reader], Awaitable[list[Finding]]]
) -> list[Finding]:
    """Run a check that yields several findings in one guarded transaction; if it is
    skipped or fails, every finding it would have made says so."""
    box: list[Finding] = []

    async def check(db: Reader) -> Finding:
        box[:] = await fn(db)
        return _ok(names[0], "")

    result = await gw.run_check("integrity: " + ", ".join(names), check)
    if result.status is Status.OK and len(box) == len(names):
        return box
    return [Finding(check=n, status=result.status, summary=result.summary) for n in names]


PASS_FINDINGS: tuple[str, ...] = (
    SUB_NO_USER,
    SUB_NO_ACTIVITY,
    LEDGER_NO_USER,
    LEDGER_NO_ACTIVITY,
    DUPLICATE_LEARN,
    DUPLICATE_EVENTS,
    MISSING_AWARDS,
    EXTRA_AWARDS,
    POINT_DIFFERENCES,
    NEGATIVE_TOTALS,
)


@register_command(
    "integrity",
    usage="/db integrity",
    summary="orphans, duplicates and point mismatches, counted exactly",
)
async def integrity(ctx: Context, args: list[str]) -> Report:
    if args:
        raise UsageError("`integrity` takes no arguments")
    gw = ctx.gateway
    grouped, attachments, fks = await asyncio.gather(
        _run_pass(gw),
        orphan_attachments(gw),
        gw.run_check(FOREIGN_KEYS, check_foreign_keys),
    )
    by_name: dict[str, Finding] = {f.check: f for f in [*grouped, attachments, fks]}
    findings = [by_name[n] for n in FINDINGS]
    return Report(title="Data integrity", target=gw.target, findings=findings).sorted()

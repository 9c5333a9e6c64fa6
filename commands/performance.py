"""Performance: `/db slow` (what is slow now, what has been slow, what spills to disk)
and `/db explain <name>` (the plan of one of the application's hot queries).

`/db slow` reads three sources, each in its own read-only check so one failing leaves
the others: `pg_stat_activity` for the queries running now; `pg_stat_statements`
(wherever it is installed: Supabase keeps extensions in schema `extensions`) for the
statements that cost the most since its last reset; `pg_stat_database` and `work_mem`
for the temp files that queries write when their sorts and hashes outgrow memory.

`/db explain` explains fixed queries only, never text a user typed: the plan of an
arbitrary statement is not worth the risk of running it. `--analyze` executes the
query, so it runs inside the gateway's read-only transaction (where nothing can write)
and under a savepoint that is rolled back, so not even a temporary effect outlives it.
The plan is read as JSON (one execution gives the findings and the text shown).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, LiteralString

from psycopg import sql

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
    human_size,
    redact_literals,
    register,
    shown_queries,
)
from commands.connections import session_status
from commands.quota import Wanted, closest_handles, resolve_argument

PGSS = "pg_stat_statements"
SUMMARY_STATEMENTS = 3
# A sequential scan of a table this big (estimated rows) is worth a look on a hot path.
SEQ_SCAN_MIN_ROWS = 10_000
# The planner's row estimate this many times off the actual rows, on a node that saw or
# expected at least ESTIMATE_MIN_ROWS rows: stale statistics or correlated columns.
ESTIMATE_FACTOR = 10.0
ESTIMATE_MIN_ROWS = 100
SAVEPOINT = "dbops_explain"
ANALYZE_FLAGS = ("--analyze", "\u2014analyze", "\u2013analyze")
# The plan goes in one Slack section (3000 characters) with its heading: whole lines
# up to this many characters, so the code block is never cut open.
PLAN_CHARS = 2500

# --- /db slow: running now ------------------------------------------------------------

_ACTIVE_SQL = """
SELECT a.pid, a.usename::text AS "user", coalesce(a.application_name, '') AS app,
       coalesce(a.state, 'unknown') AS state,
       extract(epoch FROM now() - a.query_start)::float AS query_s,
       extract(epoch FROM now() - a.xact_start)::float AS xact_s,
       extract(epoch FROM now() - a.state_change)::float AS state_s,
       coalesce(a.wait_event_type || ':' || a.wait_event, '') AS wait,
       CASE WHEN a.wait_event_type = 'Lock' THEN pg_blocking_pids(a.pid)
            ELSE '{}'::int[] END AS blocked_by,
       left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), %(chars)s) AS query
FROM pg_stat_activity a
WHERE a.backend_type = 'client backend'
  AND a.pid <> pg_backend_pid()
  AND a.state IS DISTINCT FROM 'idle'
  AND a.datname = current_database()
ORDER BY a.query_start NULLS LAST
"""


def active_finding(sessions: list[Row], th: Thresholds) -> Finding:
    """Longest first; each rated by the limits `/db connections` and `/db health` use."""
    rated = [(s, *session_status(s, th)) for s in sessions]
    worst = min((st for _s, st, _why in rated), key=lambda s: s.severity, default=Status.OK)
    rows = [
        {
            "status": st.value,
            "pid": s["pid"],
            "duration": human_duration(s["query_s"]),
            "state": s["state"],
            "wait": s["wait"],
            "app": s["app"],
            "user": s["user"],
            "xact_age": human_duration(s["xact_s"]) if s["xact_s"] is not None else "",
            "why": why,
            "query": s["query"],
        }
        for s, st, why in rated[: th.max_rows]
    ]
    if not rated:
        return Finding(check="running queries", status=Status.OK, summary="no other query running")
    top = rated[0][0]
    wait = f", waiting on {top['wait']}" if top["wait"] else ""
    summary = (
        f"{len(rated)} quer{'ies' if len(rated) != 1 else 'y'} in progress; longest: pid"
        f" {top['pid']} {top['state']} for {human_duration(top['query_s'])}{wait}"
    )
    if len(rated) > len(rows):
        summary += f" (longest {len(rows)} listed, {len(rated) - len(rows)} more not shown)"
    hint = None
    if worst is not Status.OK:
        idle_tx = any(str(s["state"]).startswith("idle in transaction") for s, *_ in rated)
        hint = (
            "end a holder with `/db terminate <pid>` (needs approval)"
            if idle_tx
            else "stop a runaway query with `/db cancel <pid>`; `/db explain <name>` shows"
            " the plan of a hot query"
        )
    return Finding(check="running queries", status=worst, summary=summary, rows=rows, hint=hint)


# --- /db slow: pg_stat_statements -----------------------------------------------------

_PGSS_WHERE_SQL = """
SELECT (SELECT n.nspname::text FROM pg_extension e
          JOIN pg_namespace n ON n.oid = e.extnamespace
         WHERE e.extname = %(ext)s) AS schema,
       EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = %(ext)s) AS available,
       current_setting('shared_preload_libraries') AS preload,
       current_setting('server_version_num')::int AS version
"""

# Whitespace is folded only in the rows kept: over every text of a full statement table
# (5,000 entries, long ones) the regexp alone took seconds.
_TOP_SQL: LiteralString = """
SELECT left(regexp_replace(t.query, '\\s+', ' ', 'g'), %(chars)s) AS query,
       t.calls, t.total_ms, t.mean_ms, t.rows, t.shared_blks_hit, t.shared_blks_read,
       t.temp_blks_written
FROM (SELECT s.query, s.calls, round(s.{total}::numeric, 1) AS total_ms,
             round(s.{mean}::numeric, 1) AS mean_ms, s.rows, s.shared_blks_hit,
             s.shared_blks_read, s.temp_blks_written
        FROM {schema}.pg_stat_statements s
       WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
         AND {filter}
       ORDER BY {order} DESC
       LIMIT %(limit)s) t
ORDER BY t.{order_col} DESC
"""


def preloaded(setting: str) -> bool:
    return PGSS in (part.strip().strip('"') for part in setting.split(","))


def _enable_hint(schema: str | None, available: bool) -> str:
    preload = (
        "add pg_stat_statements to shared_preload_libraries and restart the server (on"
        " Supabase it is preloaded already)"
    )
    if schema is not None:
        return preload
    first = "" if available else "install the server's contrib package, "
    return f"{first}{preload}, then `CREATE EXTENSION pg_stat_statements SCHEMA extensions`"


def top_sql(schema: str, version: int, *, by_temp: bool) -> str:
    """The statements of this database by total time, or by temp blocks written; the
    time columns were renamed in PostgreSQL 13 (total_time -> total_exec_time)."""
    total, mean = (
        ("total_exec_time", "mean_exec_time") if version >= 130000 else ("total_time", "mean_time")
    )
    query = sql.SQL(_TOP_SQL).format(
        total=sql.Identifier(total),
        mean=sql.Identifier(mean),
        schema=sql.Identifier(schema),
        filter=sql.SQL("s.temp_blks_written > 0" if by_temp else "true"),
        order=sql.Identifier("s", "temp_blks_written" if by_temp else total),
        order_col=sql.Identifier("temp_blks_written" if by_temp else "total_ms"),
    )
    return query.as_string(None)


def statement_rows(rows: list[Row]) -> list[Row]:
    for r in rows:
        r["total"] = human_duration(float(r.pop("total_ms")) / 1000)
        r["mean"] = human_duration(float(r.pop("mean_ms")) / 1000)
        r["query"] = r.pop("query")  # last, the widest column
    return rows


async def statement_findings(db: Reader, th: Thresholds) -> list[Finding]:
    """`top statements` and `temp spills`, or one finding saying why there are none."""
    (where,) = await db.fetch(_PGSS_WHERE_SQL, {"ext": PGSS})
    schema: str | None = where["schema"]
    if schema is None or not preloaded(str(where["preload"])):
        if schema is not None:
            summary = (
                f"pg_stat_statements is installed (schema {schema}) but not loaded:"
                " it is missing from shared_preload_libraries, so it records nothing"
            )
        elif where["available"]:
            summary = "pg_stat_statements is not installed in this database: no statement history"
        else:
            summary = "pg_stat_statements is not available on this server: no statement history"
        return [
            Finding(
                check="top statements",
                status=Status.SKIPPED,
                summary=summary,
                hint=_enable_hint(schema, bool(where["available"])),
            )
        ]
    version = int(where["version"])
    params = {"chars": th.query_chars, "limit": th.max_rows}
    top = await db.fetch(top_sql(schema, version, by_temp=False), params)
    spills = await db.fetch(top_sql(schema, version, by_temp=True), params)
    slow = [r for r in top if float(r["mean_ms"]) / 1000 >= th.long_query_warn_s]
    for rows in (top, spills):
        shown_queries(rows, th.show_query_literals)
        statement_rows(rows)
    where_text = f"{schema}.pg_stat_statements"
    if top:
        # A Slack message shows the table only of findings that are not ok: the first
        # few statements go in the summary, so that `/db slow` always names them.
        many = (
            f"; {len(slow)} take {human_duration(th.long_query_warn_s)} or more on average"
            if slow
            else ""
        )
        summary = f"{len(top)} costliest statements of this database ({where_text}){many}:" + (
            "".join(
                f"\n{r['total']} in {r['calls']} calls ({r['mean']} each): {r['query']}"
                for r in top[:SUMMARY_STATEMENTS]
            )
        )
    else:
        summary = f"{where_text} has recorded no statement in this database yet"
    findings = [
        Finding(
            check="top statements",
            status=Status.WARN if slow else Status.OK,
            summary=summary,
            rows=top,
            hint="`/db explain <name>` shows the plan of a hot query" if slow else None,
        )
    ]
    blocks = sum(int(r["temp_blks_written"]) for r in spills)
    findings.append(
        Finding(
            check="temp spills",
            status=Status.WARN if spills else Status.OK,
            summary=(
                f"{len(spills)} statements wrote temp files ({blocks} blocks in all, the most"
                f" first): their sorts or hashes outgrew work_mem"
                if spills
                else "no statement of this database wrote temp files"
            ),
            rows=spills,
            hint="raise work_mem for the role or the query (SET LOCAL work_mem), or give it"
            " an index that avoids the sort"
            if spills
            else None,
        )
    )
    return findings


# --- /db slow: temp files per database ------------------------------------------------

_TEMP_SQL = """
SELECT d.datname::text AS db, d.temp_files, d.temp_bytes,
       d.datname = current_database() AS current, d.stats_reset,
       current_setting('work_mem') AS work_mem
FROM pg_stat_database d
WHERE d.datname IS NOT NULL
ORDER BY d.temp_bytes DESC, d.datname
"""


def temp_finding(dbs: list[Row], th: Thresholds) -> Finding:
    """Memory: a query whose sort or hash outgrows work_mem writes temp files; many of
    them mean slow queries and, when work_mem is raised carelessly, memory pressure."""
    work_mem = str(dbs[0]["work_mem"]) if dbs else "?"
    here = next((d for d in dbs if d["current"]), None)
    rows = [
        {
            "db": d["db"],
            "temp_files": d["temp_files"],
            "temp_bytes": human_size(d["temp_bytes"]),
            "since": d["stats_reset"] or "",
        }
        for d in dbs
        if d["current"] or int(d["temp_files"] or 0)
    ][: th.max_rows]
    if here is None:
        return Finding(
            check="temp files", status=Status.OK, summary=f"work_mem = {work_mem}", rows=rows
        )
    files = int(here["temp_files"] or 0)
    since = f" since {here['stats_reset']}" if here["stats_reset"] else ""
    summary = (
        f"{here['db']}: {files} temp files, {human_size(here['temp_bytes'])}{since};"
        f" work_mem = {work_mem}"
    )
    return Finding(
        check="temp files",
        status=Status.WARN if files else Status.OK,
        summary=summary,
        rows=rows,
        hint="`temp spills` names the statements (with pg_stat_statements); raise work_mem"
        " for them rather than for everyone: each sort or hash node may use that much"
        if files
        else None,
    )


@register(
    "slow",
    usage="/db slow",
    summary="running queries by duration, the costliest statements, temp-file spills",
    role="REVIEWER",
)
async def slow(ctx: Context, args: list[str]) -> Report:
    if args:
        raise UsageError("`slow` takes no arguments")
    gw = ctx.gateway
    th = ctx.thresholds
    findings: list[Finding] = []

    async def running(db: Reader) -> Finding:
        sessions = await db.fetch(_ACTIVE_SQL, {"chars": th.query_chars})
        return active_finding(shown_queries(sessions, th.show_query_literals), th)

    async def statements(db: Reader) -> Finding:
        built = await statement_findings(db, th)
        findings.extend(built[1:])
        return built[0]

    async def temp(db: Reader) -> Finding:
        return temp_finding(await db.fetch(_TEMP_SQL), th)

    for name, check in (
        ("running queries", running),
        ("top statements", statements),
        ("temp files", temp),
    ):
        findings.append(await gw.run_check(name, check))
    return Report(title="Slow queries", target=gw.target, findings=findings).sorted()


# --- /db explain ----------------------------------------------------------------------


@dataclass(frozen=True)
class HotQuery:
    name: str
    what: str
    sql: LiteralString
    takes_user: bool = False


# The application's hot paths: the pages its users wait on, written as plain SQL over the
# same tables, order and limit (the ORM's own text is not known here), user id bound.
HOT_QUERIES: dict[str, HotQuery] = {
    q.name: q
    for q in (
        HotQuery(
            "leaderboard",
            "the top 20 of leaderboard_totals",
            "SELECT user_id, handle, name, avatar_url, school, cohort, total_points,"
            " public_submissions, last_activity_at FROM leaderboard_totals"
            " ORDER BY total_points DESC LIMIT 20",
        ),
        HotQuery(
            "user-submissions",
            "one user's submissions, newest first",
            "SELECT id, activity_code, status, visibility, payload, reviewer_id, review_note,"
            " created_at, updated_at FROM submissions WHERE user_id = %(user_id)s"
            " ORDER BY created_at DESC LIMIT 50",
            takes_user=True,
        ),
        HotQuery(
            "review-queue",
            "pending submissions, oldest first, with their authors",
            "SELECT s.id, s.activity_code, s.payload, s.created_at, u.id AS user_id,"
            " u.handle, u.name FROM submissions s JOIN users u ON u.id = s.user_id"
            " WHERE s.status = 'PENDING' ORDER BY s.created_at LIMIT 50",
        ),
    )
}
EXPLAIN_USAGE = (
    "/db explain <leaderboard | review-queue | user-submissions <@user|handle|email>> [--analyze]"
)


def parse_explain(args: list[str]) -> tuple[HotQuery, list[str], bool]:
    if any("\x00" in a for a in args):
        raise UsageError("an argument holds a NUL character, which no name or handle has")
    # Some Slack clients turn a typed `--` into a dash.
    analyze = any(a in ANALYZE_FLAGS for a in args)
    rest = [a for a in args if a not in ANALYZE_FLAGS]
    names = ", ".join(f"`{n}`" for n in HOT_QUERIES)
    if not rest or rest[0] not in HOT_QUERIES:
        given = f"unknown query `{rest[0]}`; " if rest else ""
        raise UsageError(f"{given}`explain` knows these queries: {names}")
    query = HOT_QUERIES[rest[0]]
    extra = rest[1:]
    if query.takes_user and len(extra) != 1:
        raise UsageError(f"`explain {query.name}` takes one user: a mention, handle or e-mail")
    if not query.takes_user and extra:
        raise UsageError(f"`explain {query.name}` takes no other argument than `--analyze`")
    return query, extra, analyze


async def explain_json(
    db: Reader, query: LiteralString, params: dict[str, Any], *, analyze: bool
) -> dict[str, Any]:
    """The plan of `query` as PostgreSQL's JSON. With `analyze` the query runs, inside a
    savepoint rolled back afterwards; the transaction around it is read-only, so a
    statement that would write fails there before it changes anything."""
    options = (
        "ANALYZE, BUFFERS, VERBOSE, FORMAT JSON" if analyze else "VERBOSE, SUMMARY, FORMAT JSON"
    )
    statement = sql.SQL("EXPLAIN ({}) {}").format(sql.SQL(options), sql.SQL(query))
    if not analyze:
        (row,) = await db.fetch(statement.as_string(None), params)
    else:
        await db.fetch(f"SAVEPOINT {SAVEPOINT}")
        try:
            (row,) = await db.fetch(statement.as_string(None), params)
        finally:
            await db.fetch(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
    (plan,) = row["QUERY PLAN"]
    result: dict[str, Any] = plan
    return result


# Nodes that read all of their input before returning a row: a Limit above them does
# not stop what is below them early.
_CONSUMERS = frozenset({"Sort", "Hash", "Aggregate"})


def nodes(plan: dict[str, Any], limited: bool = False) -> Iterator[tuple[dict[str, Any], bool]]:
    """Every node with whether a Limit above it may stop it early."""
    yield plan, limited
    kind = plan["Node Type"]
    below = (limited or kind == "Limit") and kind not in _CONSUMERS
    for child in plan.get("Plans", []):
        yield from nodes(child, below)


def _node_label(n: dict[str, Any]) -> str:
    label = str(n["Node Type"])
    if n.get("Join Type") not in (None, "Inner") and label.endswith("Join"):
        label = label.replace(" Join", f" {n['Join Type']} Join")
    if n.get("Strategy") == "Hashed" and label == "Aggregate":
        label = "HashAggregate"
    if n.get("Parallel Aware"):
        label = f"Parallel {label}"
    if n["Node Type"] == "Bitmap Index Scan":
        return f"{label} on {n['Index Name']}"
    if "Index Name" in n:
        label += f" using {n['Index Name']}"
    name = n.get("Relation Name") or n.get("Function Name") or n.get("CTE Name")
    if name:
        label += f" on {n['Schema']}.{name}" if "Schema" in n else f" on {name}"
        if n.get("Alias") and n["Alias"] != name:
            label += f" {n['Alias']}"
    return label


_DETAILS = (
    "Index Cond",
    "Hash Cond",
    "Merge Cond",
    "Join Filter",
    "Filter",
    "Rows Removed by Filter",
    "Sort Key",
    "Sort Method",
)


def _detail_lines(n: dict[str, Any]) -> list[str]:
    lines = []
    for key in _DETAILS:
        if key in n:
            value = n[key]
            text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
            if key == "Sort Method" and "Sort Space Used" in n:
                text += f"  {n.get('Sort Space Type', 'Memory')}: {n['Sort Space Used']}kB"
            lines.append(f"{key}: {text}")
    if "Hash Batches" in n:
        lines.append(
            f"Buckets: {n.get('Hash Buckets')}  Batches: {n['Hash Batches']}"
            f"  Memory Usage: {n.get('Peak Memory Usage')}kB"
        )
    hit, read = n.get("Shared Hit Blocks", 0), n.get("Shared Read Blocks", 0)
    written = n.get("Temp Written Blocks", 0)
    if hit or read or written:
        parts = [f"shared hit={hit}"] + ([f"read={read}"] if read else [])
        parts += [f"temp written={written}"] if written else []
        lines.append("Buffers: " + " ".join(parts))
    return lines


def plan_lines(n: dict[str, Any], depth: int = 0) -> list[str]:
    """The plan drawn as EXPLAIN's text format does, without the output column lists."""
    cost = f"(cost={n['Startup Cost']:.2f}..{n['Total Cost']:.2f} rows={n['Plan Rows']})"
    if "Actual Loops" in n:
        if n["Actual Loops"] == 0:
            cost += " (never executed)"
        else:
            cost += (
                f" (actual time={n['Actual Startup Time']:.3f}..{n['Actual Total Time']:.3f}"
                f" rows={n['Actual Rows']} loops={n['Actual Loops']})"
            )
    head = " " * (6 * depth - 4) + "->  " if depth else ""
    inner = " " * (6 * depth + 2)
    lines = [f"{head}{_node_label(n)}  {cost}"]
    lines += [inner + line for line in _detail_lines(n)]
    for child in n.get("Plans", []):
        lines += plan_lines(child, depth + 1)
    return lines


def disk_finding(plan: dict[str, Any], work_mem: str) -> Finding | None:
    """Sorts and hashes of an analyzed plan that outgrew work_mem and went to disk."""
    rows: list[Row] = []
    for n, _limited in nodes(plan):
        if n.get("Sort Space Type") == "Disk":
            rows.append({"node": _node_label(n), "spilled": f"{n.get('Sort Space Used')}kB"})
        elif int(n.get("Hash Batches") or 1) > 1:
            rows.append({"node": _node_label(n), "spilled": f"{n['Hash Batches']} batches"})
    if not rows:
        return None
    return Finding(
        check="work_mem",
        status=Status.WARN,
        summary=f"{len(rows)} node{'s' if len(rows) != 1 else ''} went to disk with work_mem ="
        f" {work_mem}: " + "; ".join(f"{r['node']} ({r['spilled']})" for r in rows),
        rows=rows,
        hint="raise work_mem for this query (SET LOCAL work_mem) or avoid the sort with an index",
    )


_SIZES_SQL = """
SELECT n.nspname::text AS schema, c.relname::text AS relation,
       greatest(c.reltuples, 0)::bigint AS est_rows, pg_total_relation_size(c.oid) AS bytes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE (n.nspname || '.' || c.relname) = ANY (%(names)s)
"""


def seq_scan_finding(plan: dict[str, Any], sizes: list[Row], min_rows: int) -> Finding:
    """Sequential scans of tables of at least `min_rows` (by the planner's estimate)."""
    size = {f"{r['schema']}.{r['relation']}": r for r in sizes}
    scans = [
        n for n, _limited in nodes(plan) if n["Node Type"] == "Seq Scan" and "Relation Name" in n
    ]
    rows: list[Row] = []
    for n in scans:
        found = size.get(f"{n.get('Schema', 'public')}.{n['Relation Name']}", {})
        est = int(found.get("est_rows", 0))
        if est >= min_rows:
            rows.append(
                {
                    "relation": f"{n.get('Schema', 'public')}.{n['Relation Name']}",
                    "table_rows": est,
                    "size": human_size(found.get("bytes")),
                    "filter": n.get("Filter", ""),
                    "removed_by_filter": n.get("Rows Removed by Filter", ""),
                }
            )
    if rows:
        return Finding(
            check="seq scans",
            status=Status.WARN,
            summary=f"{len(rows)} sequential scan{'s' if len(rows) != 1 else ''} of tables of"
            f" {min_rows:,} rows or more: "
            + ", ".join(f"{r['relation']} ({r['table_rows']:,} rows)" for r in rows),
            rows=rows,
            hint="an index on the filtered or sorted columns avoids it (`/db indexes`)",
        )
    small = sorted({f"{n.get('Schema', 'public')}.{n['Relation Name']}" for n in scans})
    summary = f"no sequential scan of a table of {min_rows:,} rows or more"
    if small:
        summary += f" (smaller ones, fine at their size: {', '.join(small)})"
    return Finding(check="seq scans", status=Status.OK, summary=summary)


def estimate_finding(plan: dict[str, Any], analyzed: bool) -> Finding:
    """Estimated against actual rows per loop. Below a Limit a node stops early, so only
    an underestimate counts there."""
    if not analyzed:
        return Finding(
            check="row estimates",
            status=Status.OK,
            summary="not compared: the query was planned, not run",
            hint="add `--analyze` to run it (read-only, rolled back) and compare",
        )
    rows: list[Row] = []
    for n, limited in nodes(plan):
        if not n.get("Actual Loops"):
            continue
        est, act = float(n["Plan Rows"]), float(n["Actual Rows"])
        if max(est, act) < ESTIMATE_MIN_ROWS or (limited and act < est):
            continue
        factor = max(est, act) / max(min(est, act), 1.0)
        if factor >= ESTIMATE_FACTOR:
            rows.append(
                {
                    "node": _node_label(n),
                    "estimated": int(est),
                    "actual": int(act),
                    "loops": n["Actual Loops"],
                    "off_by": f"{factor:.0f}x " + ("more" if act > est else "fewer"),
                }
            )
    if not rows:
        return Finding(
            check="row estimates",
            status=Status.OK,
            summary=f"every estimate within {ESTIMATE_FACTOR:.0f}x of the actual rows",
        )
    return Finding(
        check="row estimates",
        status=Status.WARN,
        summary=f"{len(rows)} node{'s' if len(rows) != 1 else ''} with the estimate at least"
        f" {ESTIMATE_FACTOR:.0f}x off: " + "; ".join(f"{r['node']} {r['off_by']}" for r in rows),
        rows=rows,
        hint="statistics may be stale: ANALYZE the tables named (autovacuum may be behind)",
    )


def plan_finding(query: HotQuery, doc: dict[str, Any], th: Thresholds, analyzed: bool) -> Finding:
    lines = plan_lines(doc["Plan"])
    if not th.show_query_literals:
        lines = [redact_literals(line) for line in lines]
    # A literal is shown as '…' by then; a quoted identifier could still close the block.
    lines = [line.replace("```", "'''") for line in lines]
    shown: list[str] = []
    for line in lines[: th.max_rows]:
        if sum(map(len, shown)) + len(shown) + len(line) > PLAN_CHARS:
            break
        shown.append(line)
    if len(lines) > len(shown):
        shown.append(f"… {len(lines) - len(shown)} more plan lines")
    timing = f"planned in {doc.get('Planning Time', 0):.1f} ms"
    if analyzed:
        timing += f", ran in {doc.get('Execution Time', 0):.1f} ms (rolled back)"
    cost = doc["Plan"]["Total Cost"]
    summary = f"{query.what}: cost {cost:.1f}, {timing}\n```\n" + "\n".join(shown) + "\n```"
    return Finding(
        check="plan",
        status=Status.OK,
        summary=summary,
        rows=[{"line": line} for line in lines],
    )


_USER_ID_SQL: LiteralString = """
SELECT id, handle FROM users
WHERE {col} = %(value)s OR lower({col}) = lower(%(value)s)
ORDER BY {col} = %(value)s DESC, id
LIMIT 2
"""


async def find_user(db: Reader, wanted: Wanted) -> Row | Finding:
    query = sql.SQL(_USER_ID_SQL).format(col=sql.Identifier(wanted.column))
    found = await db.fetch(query.as_string(None), {"value": wanted.value})
    if not found:
        close = await closest_handles(db, wanted)
        names = ", ".join(f"`{c['handle']}`" for c in close)
        return Finding(
            check="user",
            status=Status.WARN,
            summary=f"no LEAPS user with {wanted.shown}",
            hint=f"closest handles: {names}" if names else None,
        )
    return found[0]


@register(
    "explain",
    usage=EXPLAIN_USAGE,
    summary="the plan of a hot query (leaderboard, user-submissions, review-queue):"
    " seq scans, row estimates; --analyze runs it read-only and rolls back",
    role="REVIEWER",
)
async def explain(ctx: Context, args: list[str]) -> Report:
    query, extra, analyze = parse_explain(args)
    gw = ctx.gateway
    th = ctx.thresholds
    title = f"Explain {query.name}" + (" (analyze)" if analyze else "")
    wanted: Wanted | None = None
    if query.takes_user:
        resolved = await resolve_argument(ctx, extra)
        if isinstance(resolved, Finding):
            return Report(title=title, target=gw.target, findings=[resolved])
        wanted = resolved
    built: list[Finding] = []

    async def run(db: Reader) -> Finding:
        params: dict[str, Any] = {}
        if wanted is not None:
            user = await find_user(db, wanted)
            if isinstance(user, Finding):
                return user
            params["user_id"] = user["id"]
            built.append(
                Finding(
                    check="user",
                    status=Status.OK,
                    summary=f"{wanted.shown}: LEAPS user `{user['handle']}`",
                )
            )
        doc = await explain_json(db, query.sql, params, analyze=analyze)
        scanned = sorted(
            {
                f"{n.get('Schema', 'public')}.{n['Relation Name']}"
                for n, _ in nodes(doc["Plan"])
                if n["Node Type"] == "Seq Scan" and "Relation Name" in n
            }
        )
        sizes = await db.fetch(_SIZES_SQL, {"names": scanned}) if scanned else []
        built.append(seq_scan_finding(doc["Plan"], sizes, SEQ_SCAN_MIN_ROWS))
        built.append(estimate_finding(doc["Plan"], analyze))
        if analyze:
            (mem,) = await db.fetch("SELECT current_setting('work_mem') AS work_mem")
            spilled = disk_finding(doc["Plan"], str(mem["work_mem"]))
            built.extend([spilled] if spilled else [])
        return plan_finding(query, doc, th, analyze)

    head = await gw.run_check("plan", run)
    return Report(title=title, target=gw.target, findings=[head, *built]).sorted()

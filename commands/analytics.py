"""`/db analytics`: are the analytics views empty, stale or wrong, measured against the
base tables they summarise.

Freshness cannot be read from PostgreSQL (it records no refresh time), so it is
measured: each view's rows against its own definition (`pg_get_viewdef`) run now, plus
what the bot recorded of its own refreshes (`ctx.refresh_log`, as `/db views` shows it).
Independently of the definitions, the views' counts are compared with counts taken
from the base tables (per activity, cohort, school and day). Where the stored rows
disagree with the base tables but the definition run now agrees, a refresh fixes it;
where the definition disagrees too, a refresh would not.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from commands.base import (
    Context,
    Finding,
    Reader,
    Report,
    Row,
    Status,
    UsageError,
    human_size,
    register,
)
from commands.leaderboard import JIT_OFF, locked_finding
from commands.views import (
    COUNT_LIMIT_BYTES,
    MatView,
    last_refresh,
    load_views,
    measure,
    refresh_records,
)

REFRESH = "/db refresh-views"
BASE_TABLES = ("users", "activities", "submissions", "points_ledger")

_BASE_COUNTS_SQL = """
SELECT (SELECT count(*) FROM users) AS users,
       (SELECT count(*) FROM users WHERE role = 'PARTICIPANT') AS participants,
       (SELECT count(*) FROM activities) AS activities,
       (SELECT count(*) FROM submissions) AS submissions,
       (SELECT count(*) FROM points_ledger) AS points_ledger
"""

_VIEWDEF_SQL = """
SELECT pg_get_viewdef(%s::oid, true) AS definition,
       array(SELECT a.attname::text FROM pg_attribute a
              WHERE a.attrelid = %s::oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns
"""

# A view's rows against its definition run now, both ways, duplicates counted. The
# definition is pg_get_viewdef's text: the database's own, never user input.
_FRESHNESS = """
WITH d AS MATERIALIZED ({definition})
SELECT (SELECT count(*) FROM d) AS definition_rows,
       (SELECT count(*) FROM (SELECT * FROM {view} EXCEPT ALL SELECT * FROM d) x) AS only_view,
       (SELECT count(*) FROM (SELECT * FROM d EXCEPT ALL SELECT * FROM {view}) y) AS only_def
"""


@dataclass(frozen=True)
class Measure:
    """One view's numbers per key, and the same numbers taken from the base tables.

    `view_sql` reads {source} (the stored view, or its definition run now); both queries
    return `key` (text) and the columns in `columns`."""

    view: str
    per: str
    columns: tuple[str, ...]
    view_sql: str
    base_sql: str
    needs: tuple[str, ...]  # the view's columns `view_sql` reads


_PER_GROUP_VIEW = (
    "SELECT m.{col}::text AS key, m.participants::bigint AS participants,"
    " m.total_points::bigint AS total_points FROM {source} AS m"
)
_PER_GROUP_BASE = """
SELECT coalesce(u.{col}, '(none)')::text AS key, count(*)::bigint AS participants,
       coalesce(sum(p.pts), 0)::bigint AS total_points
  FROM users u
  LEFT JOIN (SELECT user_id, sum(delta_points) AS pts FROM points_ledger GROUP BY 1) p
    ON p.user_id = u.id
 WHERE u.role = 'PARTICIPANT'
 GROUP BY 1
"""


def _per_group(view: str, col: str) -> Measure:
    """cohort_metrics and school_metrics: participants and their points per `col` (one
    of this module's two column names, never input)."""
    return Measure(
        view=view,
        per=col,
        needs=(col, "participants", "total_points"),
        columns=("participants", "total_points"),
        view_sql=_PER_GROUP_VIEW.replace("{col}", col),
        base_sql=_PER_GROUP_BASE.replace("{col}", col),
    )


MEASURES: tuple[Measure, ...] = (
    Measure(
        view="activity_metrics",
        per="activity",
        needs=("activity_code", "total_submissions", "points_awarded"),
        columns=("submissions", "points"),
        view_sql="SELECT m.activity_code::text AS key, m.total_submissions::bigint AS submissions,"
        " m.points_awarded::bigint AS points FROM {source} AS m",
        base_sql="""
SELECT a.code::text AS key, coalesce(s.n, 0)::bigint AS submissions,
       coalesce(l.pts, 0)::bigint AS points
  FROM activities a
  LEFT JOIN (SELECT activity_code, count(*) AS n FROM submissions GROUP BY 1) s
    ON s.activity_code = a.code
  LEFT JOIN (SELECT activity_code, sum(delta_points) AS pts FROM points_ledger GROUP BY 1) l
    ON l.activity_code = a.code
""",
    ),
    _per_group("cohort_metrics", "cohort"),
    _per_group("school_metrics", "school"),
    Measure(
        view="time_series_metrics",
        per="day",
        needs=("day", "submissions", "points_awarded"),
        columns=("submissions", "points"),
        view_sql="SELECT m.day::text AS key, sum(m.submissions)::bigint AS submissions,"
        " sum(m.points_awarded)::bigint AS points FROM {source} AS m GROUP BY 1",
        # 90 days in UTC, today included; only activities that exist count, as the view
        # crosses the days with them.
        base_sql="""
WITH today AS (SELECT (now() AT TIME ZONE 'UTC')::date AS d)
SELECT g.day::date::text AS key, coalesce(s.n, 0)::bigint AS submissions,
       coalesce(l.pts, 0)::bigint AS points
  FROM today, generate_series(today.d - 89, today.d, interval '1 day') AS g(day)
  LEFT JOIN (SELECT created_at::date AS day, count(*) AS n FROM submissions
              WHERE activity_code IN (SELECT code FROM activities) GROUP BY 1) s
    ON s.day = g.day::date
  LEFT JOIN (SELECT (event_time AT TIME ZONE 'UTC')::date AS day, sum(delta_points) AS pts
               FROM points_ledger
              WHERE activity_code IN (SELECT code FROM activities) GROUP BY 1) l
    ON l.day = g.day::date
""",
    ),
)
MEASURED = {m.view: m for m in MEASURES}


def _compare_sql(m: Measure, source: sql.Composable) -> sql.Composed:
    """Keys whose numbers differ between the view (or its definition) and the base tables."""
    pairs = sql.SQL(", ").join(
        sql.SQL("v.{c} AS {vc}, b.{c} AS {bc}").format(
            c=sql.Identifier(c), vc=sql.Identifier(f"view_{c}"), bc=sql.Identifier(f"table_{c}")
        )
        for c in m.columns
    )
    differs = sql.SQL(" OR ").join(
        sql.SQL("v.{c} IS DISTINCT FROM b.{c}").format(c=sql.Identifier(c)) for c in m.columns
    )
    return sql.SQL(
        "WITH v AS ({view}), b AS ({base})"
        " SELECT coalesce(v.key, b.key) AS key, v.key IS NOT NULL AS in_view,"
        " b.key IS NOT NULL AS in_tables, {pairs}"
        " FROM v FULL JOIN b ON b.key = v.key WHERE {differs} ORDER BY 1"
    ).format(
        view=sql.SQL(m.view_sql).format(source=source),
        base=sql.SQL(m.base_sql),
        pairs=pairs,
        differs=differs,
    )


@dataclass
class ViewState:
    view: MatView
    definition_rows: int | None = None
    only_view: int | None = None
    only_def: int | None = None
    fresh_note: str = ""
    stored_diff: list[Row] | None = None  # None: not measured
    live_diff: list[Row] | None = None
    newest_day: str | None = None
    lacking: list[str] | None = None  # columns the base-table comparison needs, not there


async def _examine(db: Reader, v: MatView) -> ViewState:
    await db.fetch(JIT_OFF)  # as for /db leaderboard: compiling would cost more than running
    state = ViewState(v)
    (meta,) = await db.fetch(_VIEWDEF_SQL, (v.oid, v.oid))
    # pg_get_viewdef's text runs as a subquery: the database's own, never user input.
    definition = sql.SQL(str(meta["definition"]).strip().rstrip(";"))
    readable = v.populated and not v.uncounted
    name = sql.Identifier(v.schema, v.name)
    if readable:
        query = sql.SQL(_FRESHNESS).format(definition=definition, view=name)
        (row,) = await db.fetch(query.as_string())
        state.definition_rows = int(row["definition_rows"])
        state.only_view, state.only_def = int(row["only_view"]), int(row["only_def"])
    else:
        query = sql.SQL("SELECT count(*) AS n FROM ({}) AS d").format(definition)
        (row,) = await db.fetch(query.as_string())
        state.definition_rows = int(row["n"])
        state.fresh_note = v.uncounted or "not populated"
    m = MEASURED.get(v.name)
    lacking = sorted(set(m.needs) - set(meta["columns"] or ())) if m else []
    if lacking:
        state.lacking = lacking
    elif m is not None:
        live = sql.SQL("({}) ").format(definition)
        state.live_diff = await db.fetch(_compare_sql(m, live).as_string())
        if readable:
            state.stored_diff = await db.fetch(_compare_sql(m, name).as_string())
            if v.name == "time_series_metrics":
                newest = await db.fetch(
                    sql.SQL("SELECT max(day)::text AS d FROM {}").format(name).as_string()
                )
                state.newest_day = newest[0]["d"] if newest else None
    return state


def _view_finding(s: ViewState, refresh_text: str, refresh_status: Status) -> Finding:
    v = s.view
    refresh = f"refresh fixes it: {REFRESH} {v.name}"
    row: Row = {
        "view": v.qualified,
        "populated": v.populated,
        "rows": v.rows,
        "definition_rows": s.definition_rows,
        "rows_only_in_view": s.only_view,
        "rows_only_in_definition": s.only_def,
        "last_refresh": refresh_text,
    }
    gives = f"its definition gives {s.definition_rows:,} rows now"
    hint: str | None = None
    if not v.populated:
        status = Status.CRIT
        summary = f"{v.qualified} is NOT populated: every read fails; {gives}"
        hint = f"a plain refresh fills it: {REFRESH} {v.name}"
    elif s.only_view is None:
        status = Status.SKIPPED
        summary = f"{v.qualified}: freshness not measured ({s.fresh_note}); {gives}"
    elif v.rows == 0 and s.definition_rows:
        status = Status.WARN
        summary = f"{v.qualified} is EMPTY, but {gives}"
        hint = refresh
    elif v.rows == 0:
        status = Status.WARN
        summary = (
            f"{v.qualified} is empty, and so is its definition run now: "
            "the base tables hold nothing for it"
        )
        hint = "check the base tables (see `base tables`)"
    elif s.only_view or s.only_def:
        status = Status.WARN
        summary = (
            f"{v.qualified} is stale: {s.only_view:,} of its {v.rows or 0:,} rows are not "
            f"what its definition gives now, and {s.only_def:,} of the definition's "
            f"{s.definition_rows or 0:,} rows are not in the view"
        )
        hint = refresh
    else:
        status = Status.OK
        summary = f"{v.qualified} matches its definition run now ({v.rows or 0:,} rows)"
    if s.newest_day:
        summary += f"; newest day {s.newest_day}"
    summary += f"; {refresh_text}"
    if refresh_status is Status.WARN and status is Status.OK:
        status, hint = Status.WARN, f"{REFRESH} {v.name} tries again"
    return Finding(check=f"view {v.name}", status=status, summary=summary, rows=[row], hint=hint)


def _gap(row: Row, columns: tuple[str, ...]) -> int:
    return sum(abs(int(row[f"view_{c}"] or 0) - int(row[f"table_{c}"] or 0)) for c in columns)


def _measure_finding(s: ViewState, m: Measure, max_rows: int) -> Finding:
    check = f"{m.view} vs base tables"
    if s.lacking:
        return Finding(
            check=check,
            status=Status.WARN,
            summary=f"{m.view} has no column {', '.join(s.lacking)}: its counts cannot be "
            "compared with the base tables",
            hint="the view differs from the schema the application expects: `/db migrations`",
        )
    live = s.live_diff or []
    stored = s.stored_diff
    what = " and ".join(m.columns)
    if stored is None:
        if live:
            return Finding(
                check=check,
                status=Status.CRIT,
                summary=f"{m.view} cannot be read, and its definition run now disagrees with "
                f"the base tables for {len(live)} of each {m.per}'s {what}",
                rows=_sample(live, m, max_rows),
                hint="fix the definition before refreshing: a refresh would fill it wrong",
            )
        return Finding(
            check=check,
            status=Status.SKIPPED,
            summary=f"{m.view} cannot be read ({s.fresh_note}); its definition run now "
            f"agrees with the base tables",
            hint=f"{REFRESH} {m.view}",
        )
    if not stored and not live:
        return Finding(
            check=check,
            status=Status.OK,
            summary=f"{m.view} agrees with the base tables: {what} per {m.per}",
        )
    if live:
        return Finding(
            check=check,
            status=Status.CRIT,
            summary=f"{m.view}: {len(stored)} {m.per} rows disagree with the base tables; its "
            f"definition run now disagrees too ({len(live)} {m.per} rows): a refresh would not "
            "fix it",
            rows=_sample(live, m, max_rows),
            hint="the definition disagrees with the base tables: recreate the view from the "
            "migration that defines it",
        )
    missing = sum(1 for r in stored if not r["in_view"])
    extra = sum(1 for r in stored if not r["in_tables"])
    return Finding(
        check=check,
        status=Status.WARN,
        summary=f"{m.view}: {len(stored)} {m.per} rows disagree with the base tables "
        f"({missing} missing from the view, {extra} no longer in the tables), largest first; "
        "its definition run now agrees",
        rows=_sample(stored, m, max_rows),
        hint=f"refresh fixes it: {REFRESH} {m.view}",
    )


def _sample(rows: list[Row], m: Measure, max_rows: int) -> list[Row]:
    ordered = sorted(rows, key=lambda r: (-_gap(r, m.columns), str(r["key"])))
    return [{m.per: r["key"], **{k: v for k, v in r.items() if k != "key"}} for r in ordered][
        :max_rows
    ]


def _base_finding(counts: Row) -> Finding:
    empty = [t for t in BASE_TABLES if not counts.get(t)]
    text = ", ".join(f"{t} {int(counts[t]):,}" for t in BASE_TABLES)
    text += f" (participants {int(counts['participants']):,})"
    if empty:
        return Finding(
            check="base tables",
            status=Status.CRIT,
            summary=f"no rows in {', '.join(empty)}: every view built on them is empty by "
            f"right; {text}",
            rows=[counts],
            hint="the data itself is missing: `/db recover` measures what was lost",
        )
    return Finding(check="base tables", status=Status.OK, summary=text, rows=[counts])


@register(
    "analytics",
    usage="/db analytics",
    summary="analytics views: empty, stale or wrong against the base tables, and when "
    "each was refreshed",
    role="REVIEWER",
)
async def analytics(ctx: Context, args: list[str]) -> Report:
    if args:
        raise UsageError("`analytics` takes no arguments")
    gw = ctx.gateway
    title = "Analytics views against the base tables"
    found: list[MatView] = []
    counts: Row = {}

    async def survey(db: Reader) -> Finding:
        (row,) = await db.fetch(_BASE_COUNTS_SQL)
        counts.update(row)
        loaded = await load_views(db, ctx.thresholds.show_query_literals)
        await measure(db, loaded)
        found.extend(loaded)
        return _base_finding(counts)

    findings = [await gw.run_check("base tables", survey)]
    if not counts:
        return Report(title=title, target=gw.target, findings=findings)
    if not found:
        findings.append(
            Finding(
                check="materialized views",
                status=Status.WARN,
                summary="this database has no materialized views",
                hint="recreate them from the migration that defines them",
            )
        )
    records, missing = await refresh_records(ctx)
    now = datetime.now(UTC)
    for v in found:
        if v.bytes is not None and v.bytes > COUNT_LIMIT_BYTES:
            findings.append(
                Finding(
                    check=f"view {v.name}",
                    status=Status.SKIPPED,
                    summary=f"{v.qualified} is {human_size(v.bytes)}: not compared row by row",
                )
            )
            continue
        if v.readers_blocked_by:
            findings.append(locked_finding(v, f"view {v.name}"))
            continue
        record: Any = None
        if records is not None:
            record = records.get(v.qualified) or records.get(v.name)
        refresh_text, refresh_status = last_refresh(record, now, missing)
        out: list[ViewState] = []

        async def check(db: Reader, v: MatView = v, out: list[ViewState] = out) -> Finding:
            out.append(await _examine(db, v))
            return Finding(check=f"view {v.name}", status=Status.OK, summary="")

        head = await gw.run_check(f"view {v.name}", check)
        if not out:
            findings.append(head)
            continue
        state = out[0]
        findings.append(_view_finding(state, refresh_text, refresh_status))
        m = MEASURED.get(v.name)
        if m is not None:
            findings.append(_measure_finding(state, m, ctx.thresholds.max_rows))
    return Report(title=title, target=gw.target, findings=findings).sorted()

"""`/db analytics`: are the analytics views empty, stale or wrong, measured against the
base tables they summarise.

Freshness cannot be read from PostgreSQL (it records no refresh time), so it is
measured: each view's rows against its own definition (`pg_get_viewdef`) run now, plus
what the bot recorded of its own refreshes (`ctx.refresh_log`, as `/db views` shows it).
Independently of the definitions, the views' counts are compared with counts taken
from the base tables (per activity, cohort, school and day). Where the stored rows
disagree with the base tables but the definition run now agrees, a refresh fixes it;
where the definition disagrees too, a refresh would not.

On a big database every one of these is a whole-table reconciliation, so each runs
piece by piece over ranges of user ids (commands/keysplit.py), every statement bounded
by the check timeout and the figures exact: a view whose rows are per user (the
leaderboards) is compared with its definition piece by piece; a view that sums over
users has its definition run per piece as partial aggregates, in the same statement
(the same snapshot) as the base tables' sums over the same users, then once more over
the merged partials, against which the view and the merged base-table sums are
compared. A definition the splitter cannot prove exact runs whole, as one statement.
At 1,000,000 users (10 million submissions, 20 million ledger rows, 100 pieces) no
statement took more than 0.3 s of server CPU or 0.5 s of wall time; the command took
75-95 s on a busy 2-core machine (before, every view's comparison timed out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from commands import keysplit
from commands.base import (
    Context,
    Finding,
    Gateway,
    Reader,
    Report,
    Row,
    Status,
    UsageError,
    human_size,
    register,
)
from commands.keyranges import WHOLE, Piece, add_up, check_pieces
from commands.leaderboard import locked_finding, tune
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

# The base tables' exact row counts, over one piece of users (summed over the pieces).
_BASE_COUNTS_SQL = """
SELECT (SELECT count(*) FROM users AS u WHERE {users}) AS users,
       (SELECT count(*) FROM users AS u WHERE {users} AND u.role = 'PARTICIPANT') AS participants,
       (SELECT count(*) FROM submissions AS s WHERE {subs}) AS submissions,
       (SELECT count(*) FROM points_ledger AS l WHERE {ledger}) AS points_ledger
"""
_ACTIVITIES_SQL = "SELECT count(*) AS activities FROM activities"

_VIEWDEF_SQL = """
SELECT pg_get_viewdef(%s::oid, true) AS definition,
       array(SELECT a.attname::text FROM pg_attribute a
              WHERE a.attrelid = %s::oid AND a.attnum > 0 AND NOT a.attisdropped) AS columns
"""

# A view's rows against its definition run now, both ways, duplicates counted. The
# definition is pg_get_viewdef's text (or that text rewritten by commands/keysplit.py):
# the database's own, never user input. {view} is the view's rows (of one piece).
_FRESHNESS = """
WITH d AS MATERIALIZED ({definition}), v AS MATERIALIZED ({view})
SELECT (SELECT count(*) FROM d) AS definition_rows,
       (SELECT count(*) FROM (SELECT * FROM v EXCEPT ALL SELECT * FROM d) x) AS only_view,
       (SELECT count(*) FROM (SELECT * FROM d EXCEPT ALL SELECT * FROM v) y) AS only_def
"""


@dataclass(frozen=True)
class Measure:
    """One view's numbers per key, and the same numbers taken from the base tables.

    `view_sql` reads {source} (the stored view, or its definition run now); both it and
    the base tables' numbers come as `key` (text) and the columns in `columns`. The base
    tables' numbers are sums over users: `base_partial` takes them over one piece
    ({users}, {ledger}, {subs}: the piece's conditions on u, l and s) as `key`, `c1`,
    `c2`; `base_final` puts the merged sums (`%(base_key)s`, `%(base_c1)s`,
    `%(base_c2)s`) in the comparison's shape."""

    view: str
    per: str
    columns: tuple[str, str]
    view_sql: str
    base_partial: str
    base_final: str
    needs: tuple[str, ...]  # the view's columns `view_sql` reads

    def base_sql(self, inline: str | None = None) -> str:
        """The base tables' numbers from the merged sums, or from `inline` (the partial
        over every user, SQL text ready for psycopg) in the same statement."""
        merged = f"({inline}) AS b" if inline is not None else _MERGED
        return self.base_final.replace("@MERGED@", merged)


_MERGED = (
    "unnest(%(base_key)s::text[], %(base_c1)s::bigint[], %(base_c2)s::bigint[]) AS b(key, c1, c2)"
)

_PER_GROUP_VIEW = (
    "SELECT m.{col}::text AS key, m.participants::bigint AS participants,"
    " m.total_points::bigint AS total_points FROM {source} AS m"
)
_PER_GROUP_PARTIAL = """
SELECT coalesce(u.@col@, '(none)')::text AS key, count(*)::bigint AS c1,
       coalesce(sum(p.pts), 0)::bigint AS c2
  FROM users u
  LEFT JOIN (SELECT l.user_id, sum(l.delta_points) AS pts FROM points_ledger AS l
              WHERE {ledger} GROUP BY 1) p
    ON p.user_id = u.id
 WHERE u.role = 'PARTICIPANT' AND {users}
 GROUP BY 1
"""
_PER_GROUP_FINAL = "SELECT b.key, b.c1 AS participants, b.c2 AS total_points FROM @MERGED@"


def _per_group(view: str, col: str) -> Measure:
    """cohort_metrics and school_metrics: participants and their points per `col` (one
    of this module's two column names, never input)."""
    return Measure(
        view=view,
        per=col,
        needs=(col, "participants", "total_points"),
        columns=("participants", "total_points"),
        view_sql=_PER_GROUP_VIEW.replace("{col}", col),
        base_partial=_PER_GROUP_PARTIAL.replace("@col@", col),
        base_final=_PER_GROUP_FINAL,
    )


# 90 days in UTC, today included (the pinned instant's day); only activities that exist
# count, as the view crosses the days with them.
_TODAY = f"WITH today AS (SELECT ({keysplit.NOW} AT TIME ZONE 'UTC')::date AS d)"

MEASURES: tuple[Measure, ...] = (
    Measure(
        view="activity_metrics",
        per="activity",
        needs=("activity_code", "total_submissions", "points_awarded"),
        columns=("submissions", "points"),
        view_sql="SELECT m.activity_code::text AS key, m.total_submissions::bigint AS submissions,"
        " m.points_awarded::bigint AS points FROM {source} AS m",
        base_partial="""
SELECT coalesce(s.key, l.key) AS key, coalesce(s.n, 0)::bigint AS c1,
       coalesce(l.pts, 0)::bigint AS c2
  FROM (SELECT s.activity_code::text AS key, count(*) AS n FROM submissions AS s
         WHERE {subs} GROUP BY 1) s
  FULL JOIN (SELECT l.activity_code::text AS key, sum(l.delta_points) AS pts
               FROM points_ledger AS l WHERE {ledger} GROUP BY 1) l
    ON l.key = s.key
""",
        base_final="""
SELECT a.code::text AS key, coalesce(b.c1, 0)::bigint AS submissions,
       coalesce(b.c2, 0)::bigint AS points
  FROM activities a
  LEFT JOIN @MERGED@ ON b.key = a.code::text
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
        # The window as bounds on the timestamps themselves (each row's day is computed
        # once, for its group), and the activities that exist kept per (day, activity)
        # group rather than looked up per row.
        base_partial="""
SELECT x.day::text AS key, coalesce(sum(x.n), 0)::bigint AS c1,
       coalesce(sum(x.pts), 0)::bigint AS c2
  FROM (SELECT s.created_at::date AS day, s.activity_code, count(*) AS n, NULL::bigint AS pts
          FROM submissions AS s
         WHERE {subs} AND s.created_at >= (@TODAY@ - 89)::timestamp
           AND s.created_at < (@TODAY@ + 1)::timestamp
         GROUP BY 1, 2
        UNION ALL
        SELECT (l.event_time AT TIME ZONE 'UTC')::date, l.activity_code, NULL,
               sum(l.delta_points)
          FROM points_ledger AS l
         WHERE {ledger} AND l.event_time >= ((@TODAY@ - 89)::timestamp AT TIME ZONE 'UTC')
           AND l.event_time < ((@TODAY@ + 1)::timestamp AT TIME ZONE 'UTC')
         GROUP BY 1, 2) AS x
 WHERE x.activity_code IN (SELECT code FROM activities)
 GROUP BY x.day
""".replace("@TODAY@", f"(({keysplit.NOW} AT TIME ZONE 'UTC')::date)"),
        base_final=f"""
{_TODAY}
SELECT g.day::date::text AS key, coalesce(b.c1, 0)::bigint AS submissions,
       coalesce(b.c2, 0)::bigint AS points
  FROM today, generate_series(today.d - 89, today.d, interval '1 day') AS g(day)
  LEFT JOIN @MERGED@ ON b.key = g.day::date::text
""",  # noqa: S608 (constants)
    ),
)
MEASURED = {m.view: m for m in MEASURES}


def _piece_sql(template: str, piece: Piece) -> str:
    """A template's {users}, {ledger} and {subs} as the piece's conditions on u, l, s."""
    return (
        sql.SQL(template)
        .format(
            users=sql.SQL(piece.where("u.id")),
            ledger=sql.SQL(piece.where("l.user_id")),
            subs=sql.SQL(piece.where("s.user_id")),
        )
        .as_string()
    )


def _compare_sql(m: Measure, source: sql.Composable, base: str) -> str:
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
    return (
        sql.SQL(
            "WITH v AS ({view}), b AS ({base})"
            " SELECT coalesce(v.key, b.key) AS key, v.key IS NOT NULL AS in_view,"
            " b.key IS NOT NULL AS in_tables, {pairs}"
            " FROM v FULL JOIN b ON b.key = v.key WHERE {differs} ORDER BY 1"
        )
        .format(
            view=sql.SQL(m.view_sql).format(source=source),
            base=sql.SQL(base),
            pairs=pairs,
            differs=differs,
        )
        .as_string()
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


@dataclass
class _Prepared:
    """One view's definition and how its statements are split."""

    view: MatView
    definition: str
    measure: Measure | None  # compared with the base tables (None: not, or lacking columns)
    lacking: list[str]
    split: keysplit.Split | None  # None: the definition runs whole
    key: str | None = None  # per-user split: the view's column holding the user id

    @property
    def readable(self) -> bool:
        return self.view.populated and not self.view.uncounted


async def _prepare(db: Reader, v: MatView, plan: keysplit.Plan) -> _Prepared:
    (meta,) = await db.fetch(_VIEWDEF_SQL, (v.oid, v.oid))
    # pg_get_viewdef's text runs as a subquery: the database's own, never user input.
    definition = str(meta["definition"]).strip().rstrip(";")
    m = MEASURED.get(v.name)
    lacking = sorted(set(m.needs) - set(meta["columns"] or ())) if m else []
    found = _Prepared(v, definition, m if m and not lacking else None, lacking, None)
    if len(plan.pieces) > 1:
        try:
            split = keysplit.split(definition, plan.aggregates)
        except keysplit.Unsplittable:
            return found
        if split.per_user and found.measure is None:
            found.split, found.key = split, sorted(split.keys, key=lambda k: k != "user_id")[0]
        elif not split.per_user:
            found.split = split
    return found


@dataclass
class _Gathered:
    """What the pieces gave for one view."""

    partials: list[list[Row]] = field(default_factory=list)  # merged split: per node
    pieces: bool = False  # whether the pieces ran (else the final statement does it all)
    base: dict[str, list[int]] = field(default_factory=dict)  # key: [c1, c2]
    definition_rows: int = 0  # per-user split: summed over the pieces
    only_view: int = 0
    only_def: int = 0


# Tables the base tables' partials read: a definition's CTE of the same name would take
# their place in a statement that holds both.
_BASE_READS = {"users", "points_ledger", "submissions", "activities"}


async def _gather_piece(
    db: Reader, p: _Prepared, piece: Piece, plan: keysplit.Plan, into: _Gathered
) -> None:
    await db.fetch(tune(plan))
    params = {**piece.params(), **plan.params}
    split = p.split
    m = p.measure
    base: list[Row] | None = None
    if split is not None and not split.per_user:
        # The definition's partials and the base tables' in one statement: one snapshot,
        # so rows written meanwhile count in both or in neither.
        extra = {}
        if m is not None and not split.shadows(_BASE_READS):
            extra["base"] = _piece_sql(m.base_partial, piece)
        (row,) = await db.fetch(split.partial_sql(piece, extra), params)
        for i in range(len(split.nodes)):
            into.partials[i].extend(row[f"n{i}"])
        base = row.get("base")
    elif split is not None and p.key is not None:
        definition = sql.SQL(split.piece_sql(piece))
        if p.readable:
            stored = sql.SQL("SELECT * FROM {} AS v WHERE {}").format(
                keysplit.ident(p.view.schema, p.view.name),
                sql.SQL(piece.where(f"v.{keysplit.ident(p.key).as_string()}")),
            )
            query = sql.SQL(_FRESHNESS).format(definition=definition, view=stored)
            (row,) = await db.fetch(query.as_string(), params)
            into.only_view += int(row["only_view"])
            into.only_def += int(row["only_def"])
            into.definition_rows += int(row["definition_rows"])
        else:
            query = sql.SQL("SELECT count(*) AS n FROM ({}) AS d").format(definition)
            (row,) = await db.fetch(query.as_string(), params)
            into.definition_rows += int(row["n"])
    if m is not None and base is None:
        base = await db.fetch(_piece_sql(m.base_partial, piece), params)
    for r in base or ():
        sums = into.base.setdefault(str(r["key"]), [0, 0])
        sums[0] += int(r["c1"])
        sums[1] += int(r["c2"])


async def _final(db: Reader, p: _Prepared, plan: keysplit.Plan, got: _Gathered) -> ViewState:
    """The comparisons that need every piece's numbers: each reads only the merged
    partials (or, for a definition that could not be split, runs it whole)."""
    await db.fetch(tune(plan))
    v = p.view
    state = ViewState(v)
    params: dict[str, Any] = dict(plan.params)
    # pg_get_viewdef's text, run whole (its `%` doubled: this statement binds values),
    # unless its partials merge (they may not: a sum of floating-point numbers).
    definition = sql.SQL(keysplit.pinned(p.definition))
    if p.split is not None and not p.split.per_user:
        try:
            text, merged = p.split.final_sql(got.partials)
        except keysplit.Unsplittable:
            pass
        else:
            params.update(merged)
            definition = sql.SQL(text)
    name = keysplit.ident(v.schema, v.name)
    if p.split is not None and p.split.per_user:
        state.definition_rows = got.definition_rows
        if p.readable:
            state.only_view, state.only_def = got.only_view, got.only_def
        else:
            state.fresh_note = v.uncounted or "not populated"
    elif p.readable:
        stored = sql.SQL("SELECT * FROM {}").format(name)
        query = sql.SQL(_FRESHNESS).format(definition=definition, view=stored)
        (row,) = await db.fetch(query.as_string(), params)
        state.definition_rows = int(row["definition_rows"])
        state.only_view, state.only_def = int(row["only_view"]), int(row["only_def"])
    else:
        query = sql.SQL("SELECT count(*) AS n FROM ({}) AS d").format(definition)
        (row,) = await db.fetch(query.as_string(), params)
        state.definition_rows = int(row["n"])
        state.fresh_note = v.uncounted or "not populated"
    if p.lacking:
        state.lacking = p.lacking
    elif p.measure is not None:
        m = p.measure
        if got.pieces:
            keys = sorted(got.base)
            params.update(
                base_key=keys,
                base_c1=[got.base[k][0] for k in keys],
                base_c2=[got.base[k][1] for k in keys],
            )
            base = m.base_sql()
        else:  # one statement: the definition and the base tables from one snapshot
            base = m.base_sql(_piece_sql(m.base_partial, WHOLE))
        live = sql.SQL("({}) ").format(definition)
        state.live_diff = await db.fetch(_compare_sql(m, live, base), params)
        if p.readable:
            state.stored_diff = await db.fetch(_compare_sql(m, name, base), params)
            if v.name == "time_series_metrics":
                newest = await db.fetch(
                    sql.SQL("SELECT max(day)::text AS d FROM {}").format(name).as_string(), params
                )
                state.newest_day = newest[0]["d"] if newest else None
    return state


async def _examine(gw: Gateway, v: MatView, plan: keysplit.Plan) -> ViewState | Finding:
    """One view: its definition read and split (one transaction), each piece (one each:
    every statement bounded by the check timeout), then the final comparisons."""
    check = f"view {v.name}"
    prepared: list[_Prepared] = []

    async def first(db: Reader) -> Finding:
        prepared.append(await _prepare(db, v, plan))
        return Finding(check=check, status=Status.OK, summary="")

    head = await gw.run_check(check, first)
    if head.status is not Status.OK or not prepared:
        return head
    p = prepared[0]
    got = _Gathered(partials=[[] for _ in p.split.nodes] if p.split is not None else [])
    if p.split is not None or (p.measure is not None and len(plan.pieces) > 1):
        got.pieces = True

        async def one(db: Reader, piece: Piece) -> None:
            await _gather_piece(db, p, piece, plan, got)

        failed = await check_pieces(gw, check, plan.pieces, one)
        if isinstance(failed, Finding):
            return failed
    out: list[ViewState] = []

    async def last(db: Reader) -> Finding:
        out.append(await _final(db, p, plan, got))
        return Finding(check=check, status=Status.OK, summary="")

    done = await gw.run_check(check, last)
    return out[0] if out else done


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
    plans: list[keysplit.Plan] = []

    async def survey(db: Reader) -> Finding:
        loaded = await load_views(db, ctx.thresholds.show_query_literals)
        await measure(db, loaded)
        found.extend(loaded)
        plans.append(await keysplit.plan(db))
        return Finding(check="base tables", status=Status.OK, summary="")

    head = await gw.run_check("base tables", survey)
    if head.status is not Status.OK or not plans:
        return Report(title=title, target=gw.target, findings=[head])
    plan = plans[0]
    counts = await _base_counts(gw, plan)
    if isinstance(counts, Finding):
        return Report(title=title, target=gw.target, findings=[counts])
    findings = [_base_finding(counts)]
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
        state = await _examine(gw, v, plan)
        if isinstance(state, Finding):
            findings.append(state)
            continue
        findings.append(_view_finding(state, refresh_text, refresh_status))
        m = MEASURED.get(v.name)
        if m is not None:
            findings.append(_measure_finding(state, m, ctx.thresholds.max_rows))
    return Report(title=title, target=gw.target, findings=findings).sorted()


async def _base_counts(gw: Gateway, plan: keysplit.Plan) -> Row | Finding:
    """The base tables' exact row counts, summed over the pieces (one statement each)."""

    async def one(db: Reader, piece: Piece) -> Row:
        await db.fetch(tune(plan))
        (row,) = await db.fetch(_piece_sql(_BASE_COUNTS_SQL, piece), piece.params())
        return row

    rows = await check_pieces(gw, "base tables", plan.pieces, one)
    if isinstance(rows, Finding):
        return rows
    counts: Row = dict(add_up(rows))

    async def small(db: Reader) -> Finding:
        (row,) = await db.fetch(_ACTIVITIES_SQL)
        counts.update(row)
        return Finding(check="base tables", status=Status.OK, summary="")

    done = await gw.run_check("base tables", small)
    if done.status is not Status.OK:
        return done
    order = ("users", "participants", "activities", "submissions", "points_ledger")
    return {name: counts[name] for name in order}

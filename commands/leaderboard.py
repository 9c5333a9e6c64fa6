"""`/db leaderboard`: each leaderboard view against the live points ledger, per user.

Three numbers per user decide everything: what the view shows now (its materialized
rows), what its own definition gives when run now, and what the ledger says. When the
definition agrees with the ledger, every difference is staleness and a refresh fixes it;
when it does not, a refresh would only copy the fault again, so the report says how
the definition goes wrong, read from the definition itself (`pg_get_viewdef`, parsed
with PostgreSQL's own parser through pglast): joins that multiply ledger rows before
summing, a filter that drops ledger rows, a grouping that gives a user several rows.

Who belongs on a leaderboard also comes from the definition: its top-level WHERE
conditions on `users` (participant educators in production), plus points > 0 from the
ledger (LEAPS_SCHEMA.md: only users with points > 0). A view named `*_30d` counts
ledger rows of the last 30 days, as its definition does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pglast
from pglast import ast
from pglast.enums import BoolExprType
from pglast.stream import RawStream
from psycopg import sql

from commands.base import (
    Context,
    Finding,
    Reader,
    Report,
    Row,
    Status,
    UsageError,
    register,
)
from commands.views import MatView, describe_lock, load_views, select_views

LEADERBOARDS = ("leaderboard_totals", "leaderboard_30d")
# Ledger rows a view named with this suffix counts (its definition's window).
WINDOWS = {"_30d": "30 days"}
REFRESH = "/db refresh-views"
# Users whose points are explained source by source, at most (one small ledger read).
ATTRIBUTE_USERS = 5000
# Longest part of a definition quoted in a summary (a section holds 3,000 characters).
QUOTE_CHARS = 400

# --- the view's definition ----------------------------------------------------------

_VIEWDEF_SQL = """
SELECT pg_get_viewdef(%s::oid, true) AS definition,
       array(SELECT a.attname::text FROM pg_attribute a
              WHERE a.attrelid = %s::oid AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum) AS columns
"""


@dataclass
class Definition:
    """The parts of a leaderboard's definition a comparison with the ledger needs."""

    text: str
    users_alias: str | None = None  # the alias of `users` in the top-level FROM
    user_filter: str | None = None  # top-level WHERE conditions on users only
    sum_from: str | None = None  # FROM of the SELECT that sums delta_points
    sum_tables: list[str] = field(default_factory=list)  # relations in that FROM
    sum_where: str | None = None
    sum_group: str | None = None
    parse_error: str | None = None

    @property
    def joined_with_ledger(self) -> list[str]:
        """Relations joined to points_ledger before its sum, `users` only when alone:
        joined by its key it cannot multiply ledger rows, another table joined by user can."""
        others = [t for t in self.sum_tables if t != "points_ledger"]
        return [t for t in others if t != "users"] or others


def _children(node: Any) -> Iterator[Any]:
    if isinstance(node, ast.Node):
        for name in node:
            yield getattr(node, name)
    elif isinstance(node, (list, tuple)):
        yield from node


def walk(node: Any) -> Iterator[ast.Node]:
    """Every node under `node`, nested SELECTs included, depth first."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, ast.Node):
            yield current
        stack.extend(reversed(list(_children(current))))


def _shallow(part: Any) -> Iterator[ast.Node]:
    """The nodes of one clause that belong to it, not to a SELECT nested in it."""
    stack = list(_children(part)) if isinstance(part, (list, tuple)) else [part]
    while stack:
        current = stack.pop()
        if isinstance(current, ast.Node):
            yield current
            if isinstance(current, (ast.SelectStmt, ast.RangeSubselect, ast.SubLink)):
                continue
        stack.extend(reversed(list(_children(current))))


def _sql(node: Any) -> str:
    if isinstance(node, (list, tuple)):
        return ", ".join(RawStream()(n) for n in node)
    return str(RawStream()(node))


def _sums_delta_points(select: ast.SelectStmt) -> bool:
    for n in _shallow(select.targetList or ()):
        if isinstance(n, ast.FuncCall) and (n.funcname or ())[-1:] and _name(n) == "sum":
            for ref in _shallow(n.args or ()):
                if isinstance(ref, ast.ColumnRef) and _field(ref, -1) == "delta_points":
                    return True
    return False


def _name(call: ast.FuncCall) -> str | None:
    last = (call.funcname or ())[-1]
    return last.sval if isinstance(last, ast.String) else None


def _field(ref: ast.ColumnRef, i: int) -> str | None:
    fields = ref.fields or ()
    try:
        value = fields[i]
    except IndexError:
        return None
    return value.sval if isinstance(value, ast.String) else None


def _relations(from_clause: Any) -> list[ast.RangeVar]:
    return [n for n in _shallow(from_clause or ()) if isinstance(n, ast.RangeVar)]


def _conjuncts(expr: Any) -> list[Any]:
    if isinstance(expr, ast.BoolExpr) and expr.boolop == BoolExprType.AND_EXPR:
        return [c for arg in expr.args or () for c in _conjuncts(arg)]
    return [] if expr is None else [expr]


def parse_definition(text: str) -> Definition:
    """Read the definition with PostgreSQL's parser; a definition it cannot read still
    gets compared with the ledger, only without the explanation."""
    found = Definition(text=text)
    try:
        (raw,) = pglast.parse_sql(text)
    except (pglast.parser.ParseError, ValueError) as exc:
        found.parse_error = str(exc)
        return found
    top = raw.stmt
    if not isinstance(top, ast.SelectStmt):
        found.parse_error = f"not a SELECT ({type(top).__name__})"
        return found
    for rel in _relations(top.fromClause):
        if rel.relname == "users":
            found.users_alias = rel.alias.aliasname if rel.alias else rel.relname
            break
    if found.users_alias is not None:
        alias = found.users_alias
        mine = []
        for cond in _conjuncts(top.whereClause):
            refs = [n for n in _shallow(cond) if isinstance(n, ast.ColumnRef)]
            nested = any(isinstance(n, (ast.SubLink, ast.SelectStmt)) for n in _shallow(cond))
            if (
                refs
                and not nested
                and all(_field(r, 0) == alias and len(r.fields or ()) == 2 for r in refs)
            ):
                mine.append(_sql(cond))
        found.user_filter = " AND ".join(mine) or None
    for n in walk(top):
        if isinstance(n, ast.SelectStmt) and _sums_delta_points(n):
            found.sum_from = _sql(n.fromClause or ())
            found.sum_tables = sorted({str(r.relname) for r in _relations(n.fromClause)})
            found.sum_where = _sql(n.whereClause) if n.whereClause is not None else None
            found.sum_group = _sql(n.groupClause) if n.groupClause else None
            break
    return found


# --- the comparison -----------------------------------------------------------------

# The view's own SELECT (from pg_get_viewdef) runs as a subquery: the database's own
# text, never user input, inside the same read-only transaction. The ledger window and
# the users filter are built from that text and from constants here; no value from a
# user reaches this SQL, so it binds no parameters (a `%` in the definition stays as is).
# Only users with something wrong come back (and one row for the totals), so a sound
# board of 100,000 users costs one row to transfer, not 100,000.
_COMPARE = """
WITH stored AS MATERIALIZED (
  {stored}
), live AS MATERIALIZED (
  SELECT d.user_id::text AS user_id, count(*) AS n, sum(d.total_points)::bigint AS pts
    FROM ({definition}) AS d GROUP BY 1
), ledger AS MATERIALIZED (
  SELECT l.user_id::text AS user_id, sum(l.delta_points)::bigint AS pts
    FROM points_ledger AS l {window} GROUP BY 1
), eligible AS MATERIALIZED (
  {eligible}
), expected AS (
  SELECT e.user_id FROM eligible e JOIN ledger g ON g.user_id = e.user_id WHERE g.pts > 0
), keyed AS (
  SELECT user_id FROM stored UNION SELECT user_id FROM live UNION SELECT user_id FROM expected
), joined AS (
  SELECT k.user_id, x.user_id IS NOT NULL AS expected, e.user_id IS NOT NULL AS eligible,
         g.pts AS ledger_pts, s.n AS stored_n, s.pts AS stored_pts, v.n AS live_n, v.pts AS live_pts
    FROM keyed k
    LEFT JOIN stored s ON s.user_id = k.user_id
    LEFT JOIN live v ON v.user_id = k.user_id
    LEFT JOIN expected x ON x.user_id = k.user_id
    LEFT JOIN eligible e ON e.user_id = k.user_id
    LEFT JOIN ledger g ON g.user_id = k.user_id
), flagged AS (
  SELECT j.*,
         j.expected <> (j.stored_n IS NOT NULL)
           OR (j.expected AND (j.stored_n <> 1 OR j.stored_pts IS DISTINCT FROM j.ledger_pts))
           AS shown_wrong,
         j.expected <> (j.live_n IS NOT NULL)
           OR (j.expected AND (j.live_n <> 1 OR j.live_pts IS DISTINCT FROM j.ledger_pts))
           AS live_wrong,
         count(*) FILTER (WHERE j.expected) OVER () AS n_expected,
         count(j.stored_n) OVER () AS n_shown,
         count(j.live_n) OVER () AS n_live,
         row_number() OVER () AS rn
    FROM joined j
)
SELECT f.*, u.handle
  FROM flagged f
  LEFT JOIN users u ON u.id::text = f.user_id
 WHERE ({stored_read} AND f.shown_wrong) OR f.live_wrong OR f.rn = 1
"""
_STORED = "SELECT v.user_id::text AS user_id, count(*) AS n, sum(v.total_points)::bigint AS pts"
_NO_STORED = "SELECT NULL::text AS user_id, 0::bigint AS n, NULL::bigint AS pts WHERE false"

_BY_SOURCE_SQL = """
SELECT l.user_id::text AS user_id, l.source::text AS source, sum(l.delta_points)::bigint AS pts
  FROM points_ledger l
 WHERE l.user_id::text = ANY(%s::text[]) {window}
 GROUP BY 1, 2
"""


@dataclass
class UserRow:
    user_id: str
    handle: str | None
    expected: bool  # belongs on the board: eligible by the definition's filter, points > 0
    eligible: bool
    ledger: int | None
    stored_n: int | None
    stored: int | None
    live_n: int | None
    live: int | None

    @property
    def shown_wrong(self) -> bool:
        if self.expected != (self.stored_n is not None):
            return True
        return self.expected and (self.stored_n != 1 or self.stored != self.ledger)

    @property
    def live_wrong(self) -> bool:
        if self.expected != (self.live_n is not None):
            return True
        return self.expected and (self.live_n != 1 or self.live != self.ledger)


@dataclass
class Comparison:
    view: MatView
    definition: Definition
    rows: list[UserRow]  # users with something wrong, in the view or in its definition
    stored_read: bool
    stored_note: str = ""
    window: str | None = None
    expected: int = 0  # users the ledger puts on the board
    shown: int = 0  # users the view shows
    live: int = 0  # users its definition gives now
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def missing(self) -> list[UserRow]:
        return [r for r in self.rows if r.expected and r.stored_n is None]

    @property
    def extra(self) -> list[UserRow]:
        return [r for r in self.rows if r.stored_n is not None and not r.expected]

    @property
    def differing(self) -> list[UserRow]:
        shown = [r for r in self.rows if r.expected and r.stored_n is not None and r.shown_wrong]
        return sorted(shown, key=lambda r: (-abs((r.stored or 0) - (r.ledger or 0)), r.user_id))

    @property
    def definition_wrong(self) -> list[UserRow]:
        return [r for r in self.rows if r.live_wrong]


def _window_sql(window: str | None, keyword: str = "WHERE") -> sql.Composable:
    if window is None:
        return sql.SQL("")
    return sql.SQL("{} l.event_time >= now() - {}::interval").format(
        sql.SQL(keyword), sql.Literal(window)
    )


def _eligible_sql(d: Definition) -> sql.Composable:
    """Who may be on the board: the users the definition's own conditions admit (printed
    from the same catalog text). A definition whose FROM names no `users` (it reads them
    in a CTE, say) admits whom it gives now: missing users are then found only when a
    refresh would add them."""
    if d.users_alias is None:
        return sql.SQL("SELECT user_id FROM live")
    alias = sql.Identifier(d.users_alias)
    where = sql.SQL("WHERE ") + sql.SQL(d.user_filter) if d.user_filter else sql.SQL("")
    return sql.SQL("SELECT {}.id::text AS user_id FROM users AS {} {}").format(alias, alias, where)


def _window(view: MatView) -> str | None:
    return next((w for suffix, w in WINDOWS.items() if view.name.endswith(suffix)), None)


# The comparison joins several aggregates whose row estimates multiply into the
# billions, which makes PostgreSQL compile it with JIT: 2 s of compiling for a query
# that runs in 60 ms at 5,000 users. Off for the check's own transaction only.
JIT_OFF = "SELECT set_config('jit', 'off', true)"


async def compare(db: Reader, view: MatView) -> Comparison:
    await db.fetch(JIT_OFF)
    (meta,) = await db.fetch(_VIEWDEF_SQL, (view.oid, view.oid))
    columns = set(meta["columns"] or ())
    lacking = {"user_id", "total_points"} - columns
    if lacking:
        raise LookupError(f"{view.qualified} has no {' or '.join(sorted(lacking))} column")
    text = str(meta["definition"]).strip().rstrip(";")
    definition = parse_definition(text)
    window = _window(view)
    stored_note = ""
    if not view.populated:
        stored_note = "not populated: the application's reads of it fail"
    stored_read = not stored_note
    stored: sql.Composable = sql.SQL(_NO_STORED)
    if stored_read:
        stored = sql.SQL("{} FROM {} AS v GROUP BY 1").format(
            sql.SQL(_STORED), sql.Identifier(view.schema, view.name)
        )
    query = sql.SQL(_COMPARE).format(
        stored=stored,
        definition=sql.SQL(text),  # pg_get_viewdef's text: the database's own, not input
        window=_window_sql(window),
        eligible=_eligible_sql(definition),
        stored_read=sql.SQL("TRUE" if stored_read else "FALSE"),
    )
    fetched = await db.fetch(query.as_string())
    rows = [
        UserRow(
            user_id=str(r["user_id"]),
            handle=r["handle"],
            expected=bool(r["expected"]),
            eligible=bool(r["eligible"]),
            ledger=_int(r["ledger_pts"]),
            stored_n=_int(r["stored_n"]),
            stored=_int(r["stored_pts"]),
            live_n=_int(r["live_n"]),
            live=_int(r["live_pts"]),
        )
        for r in fetched
    ]
    rows = [r for r in rows if (stored_read and r.shown_wrong) or r.live_wrong]
    totals = fetched[0] if fetched else {}
    found = Comparison(
        view,
        definition,
        rows,
        stored_read,
        stored_note,
        window,
        expected=int(totals.get("n_expected") or 0),
        shown=int(totals.get("n_shown") or 0),
        live=int(totals.get("n_live") or 0),
    )
    wrong = [r.user_id for r in found.definition_wrong][:ATTRIBUTE_USERS]
    if wrong:
        by_source = sql.SQL(_BY_SOURCE_SQL).format(window=_window_sql(window, "AND"))
        for r in await db.fetch(by_source.as_string(), (wrong,)):
            found.by_source.setdefault(str(r["user_id"]), {})[str(r["source"])] = int(r["pts"])
    return found


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


# --- explaining a definition that disagrees -----------------------------------------


def explain_definition(c: Comparison) -> list[str]:
    """How the definition departs from the ledger: measured per user, named from the text."""
    d = c.definition
    wrong = c.definition_wrong
    over = [r for r in wrong if r.expected and r.live_n and (r.live or 0) > (r.ledger or 0)]
    under = [r for r in wrong if r.expected and (r.live or 0) < (r.ledger or 0)]
    several = [r for r in wrong if (r.live_n or 0) > 1]
    intruders = [r for r in wrong if r.live_n is not None and not r.expected]
    parts: list[str] = []
    if over:
        gained = sum((r.live or 0) - (r.ledger or 0) for r in over)
        ratios = sorted((r.live or 0) / r.ledger for r in over if r.ledger)
        spread = f", {ratios[0]:.1f}-{ratios[-1]:.1f}x the ledger" if ratios else ""
        text = f"{len(over)} users get more points than the ledger gives ({gained:+,}{spread})"
        joined = d.joined_with_ledger
        if joined and d.sum_from:
            text += (
                ": joins that multiply rows: sum(delta_points) is taken over "
                f"`{_cut(d.sum_from)}`, so "
                f"each ledger row counts once per matching row of {', '.join(joined)} "
                "(double counting)"
            )
        parts.append(text)
    if under:
        lost = sum((r.ledger or 0) - (r.live or 0) for r in under)
        text = f"{len(under)} users get fewer points than the ledger gives ({-lost:+,})"
        if d.sum_where:
            text += f": a filter drops ledger rows: `WHERE {_cut(d.sum_where)}`"
        source, explained = _dropped_source(c, under)
        if source:
            text += (
                f"; for {explained} of {len(under)} the missing points are exactly "
                f"their {source} rows"
            )
        parts.append(text)
    if several:
        text = f"{len(several)} users appear in several rows (a missing group)"
        if d.sum_group:
            text += f": the points are grouped by `{_cut(d.sum_group)}`, not by user alone"
        parts.append(text)
    if intruders:
        parts.append(f"{len(intruders)} users appear that should not (filter or points <= 0)")
    if d.parse_error:
        parts.append(f"the definition could not be parsed to say where ({d.parse_error})")
    return parts


def _cut(text: str, limit: int = QUOTE_CHARS) -> str:
    """A part of the definition short enough for one line of a Slack message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _dropped_source(c: Comparison, under: list[UserRow]) -> tuple[str | None, int]:
    """The ledger source whose rows are exactly what the definition leaves out, for the
    most under-counted users."""
    hits: Counter[str] = Counter()
    for r in under:
        gap = (r.ledger or 0) - (r.live or 0)
        for source, pts in c.by_source.get(r.user_id, {}).items():
            if pts == gap:
                hits[source] += 1
    if not hits:
        return None, 0
    source, n = hits.most_common(1)[0]
    return source, n


# --- findings -----------------------------------------------------------------------


def _user(r: UserRow) -> Row:
    return {"user_id": r.user_id, "handle": r.handle}


def findings_for(c: Comparison, max_rows: int) -> list[Finding]:
    name = c.view.name
    refresh = f"{REFRESH} {name}"
    definition_wrong = c.definition_wrong
    fixable = not definition_wrong
    detail_status = Status.WARN if fixable else Status.CRIT
    detail_hint = (
        f"refresh fixes it: {refresh}"
        if fixable
        else "a refresh would not fix it: the definition disagrees with the ledger"
    )
    expected, shown = c.expected, c.shown
    window = f" (last {c.window})" if c.window else ""
    findings: list[Finding] = []
    counts: Row = {
        "view": c.view.qualified,
        "shown_users": shown if c.stored_read else None,
        "ledger_users": expected,
        "definition_users": c.live,
        "user_filter": c.definition.user_filter
        or ("(none: every user)" if c.definition.users_alias else "(whom the definition gives)"),
    }
    how = explain_definition(c) if definition_wrong else []

    if c.stored_read:
        missing, extra, differing = c.missing, c.extra, c.differing
        stale = len(missing) + len(extra) + len(differing)
    else:
        missing, extra, differing, stale = [], [], [], 0
    if not c.stored_read:
        status = Status.CRIT if not c.view.populated else Status.SKIPPED
        summary = f"{name}: {c.stored_note}"
        if fixable:
            summary += f"; its definition agrees with the ledger{window} ({expected} users)"
            hint = f"a refresh fills it from a sound definition: {refresh}"
        else:
            summary += "; its definition disagrees with the ledger: " + "; ".join(how)
            hint = "fix the definition first: a refresh would fill it with wrong totals"
    elif not stale and fixable:
        status, hint = Status.OK, None
        summary = f"{name} agrees with the ledger{window}: {shown} users, every total equal"
    elif fixable:
        status = Status.WARN
        summary = (
            f"{name} is stale: {len(missing)} users missing, {len(extra)} extra, "
            f"{len(differing)} with other totals; its definition run now agrees with the "
            f"ledger{window}"
        )
        hint = f"refresh fixes it: {refresh}"
    else:
        status = Status.CRIT
        lead = (
            f"{name}: {len(missing)} users missing, {len(extra)} extra, "
            f"{len(differing)} with other totals"
            if stale
            else f"{name} matches the ledger now, but its definition run now does not"
        )
        summary = f"{lead}; a refresh would not fix it: " + "; ".join(how)
        hint = (
            "the definition disagrees with the ledger: recreate the view from the migration "
            "that defines it (keep its unique index), then refresh"
        )
    findings.append(
        Finding(
            check=f"{name}: vs ledger", status=status, summary=summary, rows=[counts], hint=hint
        )
    )
    if missing:
        ordered = sorted(missing, key=lambda r: (-(r.ledger or 0), r.user_id))
        findings.append(
            Finding(
                check=f"{name}: missing users",
                status=detail_status,
                summary=f"{len(missing)} users with ledger points are not on {name}",
                rows=[
                    {**_user(r), "ledger_points": r.ledger, "definition_points": r.live}
                    for r in ordered[:max_rows]
                ],
                hint=detail_hint,
            )
        )
    if extra:
        ordered = sorted(extra, key=lambda r: (-(r.stored or 0), r.user_id))
        findings.append(
            Finding(
                check=f"{name}: extra users",
                status=detail_status,
                summary=f"{len(extra)} users are on {name} who should not be",
                rows=[
                    {
                        **_user(r),
                        "shown_points": r.stored,
                        "ledger_points": r.ledger,
                        "why": "filtered out by the definition"
                        if not r.eligible
                        else "no points > 0 in the ledger",
                    }
                    for r in ordered[:max_rows]
                ],
                hint=detail_hint,
            )
        )
    if differing:
        total = sum(abs((r.stored or 0) - (r.ledger or 0)) for r in differing)
        findings.append(
            Finding(
                check=f"{name}: point differences",
                status=detail_status,
                summary=(
                    f"{len(differing)} users show other totals than the ledger "
                    f"({total:,} points apart in all), largest first"
                ),
                rows=[
                    {
                        **_user(r),
                        "shown_points": r.stored,
                        "ledger_points": r.ledger,
                        "difference": (r.stored or 0) - (r.ledger or 0),
                        "definition_points": r.live,
                        "rows_shown": r.stored_n,
                    }
                    for r in differing[:max_rows]
                ],
                hint=detail_hint,
            )
        )
    return findings


def locked_finding(view: MatView, check: str) -> Finding:
    """pg_get_viewdef takes ACCESS SHARE on the view, like reading its rows: while a
    session holds or awaits ACCESS EXCLUSIVE neither can be read, so say who and stop."""
    holders = view.readers_blocked_by
    pids = ", ".join(describe_lock(lk) for lk in holders[:3])
    return Finding(
        check=check,
        status=Status.SKIPPED,
        summary=f"{view.qualified} cannot be read, nor its definition: {pids} holds or "
        "awaits ACCESS EXCLUSIVE on it",
        rows=holders[:3],
        hint=f"when it is safe to end it: `/db terminate {holders[0]['pid']}` (needs approval)",
    )


@register(
    "leaderboard",
    usage="/db leaderboard [view ...]",
    summary="leaderboards against the live ledger: missing and extra users, point "
    "differences, and whether a refresh fixes them",
    role="REVIEWER",
)
async def leaderboard(ctx: Context, args: list[str]) -> Report:
    gw = ctx.gateway
    title = "Leaderboards against the ledger"
    boards: list[MatView] = []

    async def survey(db: Reader) -> Finding:
        every = await load_views(db, ctx.thresholds.show_query_literals)
        boards.extend(v for v in every if v.name in LEADERBOARDS)
        return Finding(check="leaderboards", status=Status.OK, summary=f"{len(boards)} views")

    head = await gw.run_check("leaderboards", survey)
    if head.status is not Status.OK:
        return Report(title=title, target=gw.target, findings=[head])
    if not boards:
        if args:
            raise UsageError("this database has no leaderboard views")
        return Report(
            title=title,
            target=gw.target,
            findings=[
                Finding(
                    check="leaderboards",
                    status=Status.WARN,
                    summary="no leaderboard view found: " + ", ".join(LEADERBOARDS),
                    hint="recreate them from the migration that defines them",
                )
            ],
        )
    chosen = select_views(boards, args)
    findings: list[Finding] = []
    for view in chosen:
        if view.readers_blocked_by:
            findings.append(locked_finding(view, f"{view.name}: vs ledger"))
            continue
        results: list[Finding] = []

        async def check(db: Reader, view: MatView = view, out: list[Finding] = results) -> Finding:
            try:
                found = await compare(db, view)
            except LookupError as exc:
                return Finding(
                    check=f"{view.name}: vs ledger", status=Status.SKIPPED, summary=str(exc)
                )
            out.extend(findings_for(found, ctx.thresholds.max_rows))
            return out[0]

        first = await gw.run_check(f"{view.name}: vs ledger", check)
        findings.extend(results or [first])
    return Report(title=title, target=gw.target, findings=findings).sorted()

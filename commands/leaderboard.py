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

On a big database the comparison runs piece by piece over ranges of user ids
(commands/keysplit.py): each statement compares the view's rows, its definition's and
the ledger's for the users of one range, so every statement stays within the check
timeout and the totals are exact. At 1,000,000 users (20 million ledger rows, 100
pieces) each statement took at most 0.3 s of server CPU and 1.2 s of wall time; both
boards took 50-65 s on a busy 2-core machine (one statement each, which timed out).
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
    register,
)
from commands.keyranges import WHOLE, Piece, check_pieces
from commands.keysplit import children
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


def walk(node: Any) -> Iterator[ast.Node]:
    """Every node under `node`, nested SELECTs included, depth first."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, ast.Node):
            yield current
        stack.extend(reversed(list(children(current))))


def _shallow(part: Any) -> Iterator[ast.Node]:
    """The nodes of one clause that belong to it, not to a SELECT nested in it."""
    stack = list(children(part)) if isinstance(part, (list, tuple)) else [part]
    while stack:
        current = stack.pop()
        if isinstance(current, ast.Node):
            yield current
            if isinstance(current, (ast.SelectStmt, ast.RangeSubselect, ast.SubLink)):
                continue
        stack.extend(reversed(list(children(current))))


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
# the users filter are built from that text and from constants here; the values (the
# piece's bounds, the pinned "now", the window) are bound parameters, so a literal `%`
# in the definition is doubled. Only users with something wrong come back (and one row
# for the totals), so a sound board of 100,000 users costs one row to transfer.
#
# On a big database the comparison runs piece by piece (commands/keysplit.py): each
# statement reads the view, the definition, the ledger and the users of one range of
# user ids; every user is in exactly one piece, so the rows and the totals add up to
# the comparison of the whole board.
_COMPARE = """
WITH per AS MATERIALIZED (
  SELECT x.user_id, sum(x.stored_n) AS stored_n, sum(x.stored_pts)::bigint AS stored_pts,
         sum(x.live_n) AS live_n, sum(x.live_pts)::bigint AS live_pts,
         sum(x.ledger_pts)::bigint AS ledger_pts, bool_or(x.eligible) AS eligible
    FROM (
      {stored}
      UNION ALL
      SELECT d.user_id::text, NULL, NULL, 1, d.total_points::numeric, NULL, NULL
        FROM ({definition}) AS d WHERE {live_piece}
      UNION ALL
      SELECT l.user_id::text, NULL, NULL, NULL, NULL, sum(l.delta_points), NULL
        FROM points_ledger AS l WHERE {ledger_piece} {window} GROUP BY l.user_id
      UNION ALL
      {eligible}
    ) AS x (user_id, stored_n, stored_pts, live_n, live_pts, ledger_pts, eligible)
   GROUP BY x.user_id
), judged AS (
  SELECT p.user_id, p.stored_n, p.stored_pts, p.live_n, p.live_pts, p.ledger_pts,
         {is_eligible} AS eligible,
         {is_eligible} AND coalesce(p.ledger_pts > 0, false) AS expected
    FROM per p
), flagged AS (
  SELECT j.*,
         j.expected <> (j.stored_n IS NOT NULL)
           OR (j.expected AND (j.stored_n <> 1 OR j.stored_pts IS DISTINCT FROM j.ledger_pts))
           AS shown_wrong,
         j.expected <> (j.live_n IS NOT NULL)
           OR (j.expected AND (j.live_n <> 1 OR j.live_pts IS DISTINCT FROM j.ledger_pts))
           AS live_wrong
    FROM judged j
)
SELECT f.user_id, f.expected, f.eligible, f.ledger_pts, f.stored_n, f.stored_pts,
       f.live_n, f.live_pts, (SELECT u.handle FROM users u WHERE u.id::text = f.user_id) AS handle,
       false AS totals, NULL::bigint AS n_expected, NULL::bigint AS n_shown,
       NULL::bigint AS n_live
  FROM flagged f
 WHERE ({stored_read} AND f.shown_wrong) OR f.live_wrong
UNION ALL
SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, true,
       count(*) FILTER (WHERE f.expected), count(f.stored_n), count(f.live_n)
  FROM flagged f
"""
# The view's rows (one tagged row each: count 1 and its points), or none.
_STORED = (
    "SELECT v.user_id::text, 1, v.total_points::numeric, NULL::int, NULL::numeric,"
    " NULL::int, NULL::bool"
)
_NO_STORED = (
    "SELECT NULL::text, NULL::int, NULL::numeric, NULL::int, NULL::numeric, NULL::int,"
    " NULL::bool WHERE false"
)

_BY_SOURCE_SQL = """
SELECT l.user_id::text AS user_id, l.source::text AS source, sum(l.delta_points)::bigint AS pts
  FROM points_ledger l
 WHERE l.user_id::text = ANY(%(users)s::text[]) {window}
 GROUP BY 1, 2
"""

# For each statement of the comparison, in its own transaction: no JIT (the joined
# aggregates' estimates multiply into the billions, and PostgreSQL would spend seconds
# compiling a query that runs in milliseconds), room for each piece's hash tables, and
# a plan made for the values bound: the pieces of a command share one text, which
# psycopg prepares after five runs on a connection, and PostgreSQL's generic plan for
# it, blind to the piece's bounds and the pinned instant, took ten times as long (3.7 s
# against 0.4 s at 1,000,000 users). Split into pieces, no parallel workers either: the
# pieces already divide the work, two at a time on a 2-core server.
_TUNE = (
    "SELECT set_config('jit', 'off', true), set_config('work_mem', '64MB', true),"
    " set_config('plan_cache_mode', 'force_custom_plan', true)"
)
_SERIAL = ", set_config('max_parallel_workers_per_gather', '0', true)"


def tune(plan: keysplit.Plan) -> str:
    return _TUNE + (_SERIAL if len(plan.pieces) > 1 else "")


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


def _window_sql(window: str | None, keyword: str = "AND") -> sql.Composable:
    """The ledger rows of a view's window, as of the pinned instant its definition runs
    at (commands/keysplit.py)."""
    if window is None:
        return sql.SQL("")
    return sql.SQL("{} l.event_time >= {} - CAST(%(window)s AS interval)").format(
        sql.SQL(keyword), sql.SQL(keysplit.NOW)
    )


def _eligible_sql(d: Definition, piece: Piece) -> sql.Composable:
    """Who may be on the board: the users the definition's own conditions admit (printed
    from the same catalog text). A definition whose FROM names no `users` (it reads them
    in a CTE, say) admits whom it gives now (`_is_eligible`): missing users are then
    found only when a refresh would add them."""
    if d.users_alias is None:
        return sql.SQL(_NO_STORED)
    alias = keysplit.ident(d.users_alias)
    where: list[sql.Composable] = [sql.SQL(piece.where(f"{alias.as_string()}.id"))]
    if d.user_filter:
        where.append(sql.SQL("({})").format(sql.SQL(d.user_filter.replace("%", "%%"))))
    return sql.SQL(
        "SELECT {}.id::text, NULL, NULL, NULL, NULL, NULL, true FROM users AS {} WHERE {}"
    ).format(alias, alias, sql.SQL(" AND ").join(where))


def _is_eligible(d: Definition) -> sql.Composable:
    if d.users_alias is None:
        return sql.SQL("(p.live_n IS NOT NULL)")
    return sql.SQL("coalesce(p.eligible, false)")


def _window(view: MatView) -> str | None:
    return next((w for suffix, w in WINDOWS.items() if view.name.endswith(suffix)), None)


@dataclass
class Prepared:
    """What the comparison of one view needs before its pieces run."""

    view: MatView
    definition: Definition
    split: keysplit.Split | None  # None: the definition runs whole, in one statement
    window: str | None
    stored_read: bool
    stored_note: str


async def prepare(db: Reader, view: MatView, plan: keysplit.Plan) -> Prepared:
    (meta,) = await db.fetch(_VIEWDEF_SQL, (view.oid, view.oid))
    columns = set(meta["columns"] or ())
    lacking = {"user_id", "total_points"} - columns
    if lacking:
        raise LookupError(f"{view.qualified} has no {' or '.join(sorted(lacking))} column")
    text = str(meta["definition"]).strip().rstrip(";")
    split: keysplit.Split | None = None
    if len(plan.pieces) > 1:
        try:
            split = keysplit.split(text, plan.aggregates)
        except keysplit.Unsplittable:
            split = None
        if split is not None and (not split.per_user or "user_id" not in split.keys):
            split = None
    stored_note = ""
    if not view.populated:
        stored_note = "not populated: the application's reads of it fail"
    return Prepared(
        view, parse_definition(text), split, _window(view), not stored_note, stored_note
    )


def _compare_sql(p: Prepared, piece: Piece) -> str:
    view = p.view
    stored: sql.Composable = sql.SQL(_NO_STORED)
    if p.stored_read:
        stored = sql.SQL("{} FROM {} AS v WHERE {}").format(
            sql.SQL(_STORED),
            keysplit.ident(view.schema, view.name),
            sql.SQL(piece.where("v.user_id")),
        )
    if p.split is not None:
        definition = p.split.piece_sql(piece)
    else:
        # pg_get_viewdef's text: the database's own, not input; it runs whole.
        definition = keysplit.pinned(p.definition.text)
    query = sql.SQL(_COMPARE).format(
        stored=stored,
        definition=sql.SQL(definition),
        live_piece=sql.SQL(piece.where("d.user_id")),
        ledger_piece=sql.SQL(piece.where("l.user_id")),
        window=_window_sql(p.window),
        eligible=_eligible_sql(p.definition, piece),
        is_eligible=_is_eligible(p.definition),
        stored_read=sql.SQL("TRUE" if p.stored_read else "FALSE"),
    )
    return query.as_string()


@dataclass
class PieceResult:
    rows: list[UserRow]
    expected: int
    shown: int
    live: int


async def compare_piece(db: Reader, p: Prepared, piece: Piece, plan: keysplit.Plan) -> PieceResult:
    await db.fetch(tune(plan))
    params = {**piece.params(), **plan.params, "window": p.window}
    fetched = await db.fetch(_compare_sql(p, piece), params)
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
        if not r["totals"]
    ]
    rows = [r for r in rows if (p.stored_read and r.shown_wrong) or r.live_wrong]
    totals = next((r for r in fetched if r["totals"]), {})
    return PieceResult(
        rows,
        expected=int(totals.get("n_expected") or 0),
        shown=int(totals.get("n_shown") or 0),
        live=int(totals.get("n_live") or 0),
    )


def assemble(p: Prepared, parts: list[PieceResult]) -> Comparison:
    rows = sorted((r for part in parts for r in part.rows), key=lambda r: r.user_id)
    return Comparison(
        p.view,
        p.definition,
        rows,
        p.stored_read,
        p.stored_note,
        p.window,
        expected=sum(part.expected for part in parts),
        shown=sum(part.shown for part in parts),
        live=sum(part.live for part in parts),
    )


async def attribute(db: Reader, c: Comparison, plan: keysplit.Plan) -> None:
    """Each wrongly defined user's ledger points per source (for `explain_definition`)."""
    wrong = [r.user_id for r in c.definition_wrong][:ATTRIBUTE_USERS]
    if not wrong:
        return
    await db.fetch(tune(plan))
    by_source = sql.SQL(_BY_SOURCE_SQL).format(window=_window_sql(c.window))
    rows = await db.fetch(
        by_source.as_string(), {"users": wrong, "window": c.window, **plan.params}
    )
    for r in rows:
        c.by_source.setdefault(str(r["user_id"]), {})[str(r["source"])] = int(r["pts"])


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
    plans: list[keysplit.Plan] = []

    async def survey(db: Reader) -> Finding:
        every = await load_views(db, ctx.thresholds.show_query_literals)
        boards.extend(v for v in every if v.name in LEADERBOARDS)
        plans.append(await keysplit.plan(db))
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
        findings.extend(await _board(gw, view, plans[0], ctx.thresholds.max_rows))
    return Report(title=title, target=gw.target, findings=findings).sorted()


async def _board(gw: Gateway, view: MatView, plan: keysplit.Plan, max_rows: int) -> list[Finding]:
    """One view against the ledger: its definition read and split, then each piece in
    its own transaction (each statement bounded by the check timeout), then the
    attribution of the wrongly defined users, then the findings."""
    check = f"{view.name}: vs ledger"
    prepared: list[Prepared] = []

    async def first(db: Reader) -> Finding:
        try:
            prepared.append(await prepare(db, view, plan))
        except LookupError as exc:
            return Finding(check=check, status=Status.SKIPPED, summary=str(exc))
        return Finding(check=check, status=Status.OK, summary="")

    head = await gw.run_check(check, first)
    if head.status is not Status.OK or not prepared:
        return [head]
    p = prepared[0]
    pieces = plan.pieces if p.split is not None else (WHOLE,)

    async def one(db: Reader, piece: Piece) -> PieceResult:
        return await compare_piece(db, p, piece, plan)

    parts = await check_pieces(gw, check, pieces, one)
    if isinstance(parts, Finding):
        return [parts]
    found = assemble(p, parts)

    async def explain(db: Reader) -> Finding:
        await attribute(db, found, plan)
        return Finding(check=check, status=Status.OK, summary="")

    done = await gw.run_check(check, explain)
    if done.status is not Status.OK:
        return [done]
    return findings_for(found, max_rows)

"""Whole-table reconciliations in bounded statements: a view's definition, and the
aggregates it is checked against, run over one range of user ids at a time.

`/db leaderboard` and `/db analytics` compare materialized views with their own
definitions run now and with the base tables. On a big database one such statement
aggregates every ledger row and every submission (20 million and 10 million at a
million users) and outlasts the per-check timeout. Every aggregate these views hold is
per user, or a sum, count, minimum or maximum over users, so it can be computed over
disjoint sets of users and put together exactly: a piece (`commands.keyranges.Piece`)
is one range of user ids, and each statement reads only the rows of its users (through
the user_id indexes).

A definition is the database's own text (`pg_get_viewdef`). `split()` reads it with
PostgreSQL's parser (pglast) and, where it can prove the split exact, rewrites it:

* every reference to a table keyed by user (`USER_KEYS`) reads only the piece's rows;
* a definition whose rows each belong to one user (the leaderboards) then gives, per
  piece, exactly its rows for the piece's users (`Split.piece_sql`);
* a SELECT that aggregates across users (per activity, cohort, school, day) is run per
  piece as partial aggregates (`Split.partial_sql`), and the definition is then run
  once over the merged partials (`Split.final_sql`): counts and sums are summed, minima
  and maxima taken again, an average is a sum over a count, `count(DISTINCT user)`
  adds up because the pieces' users are disjoint. The arithmetic is PostgreSQL's: the
  partials travel as text and are cast back to their own types.

It refuses (`Unsplittable`) whatever it cannot prove: joins between two users' rows, a
subquery over user tables in an expression, window functions, LIMIT, set operations,
outer joins that could leave a row without a user, aggregates it cannot merge (such as
`string_agg`, or sums of floating-point numbers, whose rounding depends on the order).
The caller then runs the definition whole, as one statement.

`now()` and its relatives are pinned to one instant for all the statements of a
command, so that every piece, and the final statement, sees the same "now".
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pglast
from pglast import ast
from pglast.enums import A_Expr_Kind, BoolExprType, JoinType, SetOperation, SQLValueFunctionOp
from pglast.stream import RawStream
from psycopg import sql

from commands import keyranges
from commands.base import Reader, Row
from commands.keyranges import WHOLE, Piece

# Tables whose rows each belong to one user, by the column naming the user.
USER_KEYS: dict[str, str] = {"users": "id", "points_ledger": "user_id", "submissions": "user_id"}
# Ledger and submission rows one statement reads, about. At 1,000,000 users, in pieces
# of 500,000 rows, each piece's statement of /db leaderboard and /db analytics took
# 0.2-0.6 s of server CPU on the 2-core machine the benches run on, and up to 2.9 s of
# wall time while other work kept 7 processes runnable on its 2 cores (a fivefold
# stretch). Pieces of 300,000 rows (100 at a million users) keep each statement well
# inside the check timeout (5 s) on a server busier still.
PIECE_ROWS = 300_000
# Partial rows one merged SELECT may gather from all pieces before it is refused.
MAX_MERGED_ROWS = 200_000
# A pinned `now()` instant, as a bound parameter.
NOW = "CAST(%(pinned_now)s AS timestamp with time zone)"

_MARK = "__dbops_"
_NOW_MARKS = {
    f"{_MARK}now__": NOW,
    f"{_MARK}now_date__": f"CAST({NOW} AS date)",
    f"{_MARK}now_ts__": f"CAST({NOW} AS timestamp without time zone)",
    f"{_MARK}now_timetz__": f"CAST({NOW} AS time with time zone)",
    f"{_MARK}now_time__": f"CAST({NOW} AS time without time zone)",
}
_NOW_FUNCTIONS = {"now", "transaction_timestamp", "statement_timestamp"}
_SVF_MARKS = {
    SQLValueFunctionOp.SVFOP_CURRENT_TIMESTAMP: f"{_MARK}now__",
    SQLValueFunctionOp.SVFOP_CURRENT_DATE: f"{_MARK}now_date__",
    SQLValueFunctionOp.SVFOP_LOCALTIMESTAMP: f"{_MARK}now_ts__",
    SQLValueFunctionOp.SVFOP_CURRENT_TIME: f"{_MARK}now_timetz__",
    SQLValueFunctionOp.SVFOP_LOCALTIME: f"{_MARK}now_time__",
}
# Aggregates whose partial results merge exactly, and how.
_MERGEABLE = {"count", "sum", "min", "max", "avg", "bool_and", "bool_or", "every"}
# Types whose sums depend on the order of the rows.
_INEXACT = {"real", "double precision"}
# pg_typeof names a type without its modifier; these would lose characters cast back.
_UNMODIFIED = {"character": "bpchar", "bit": "bit varying"}


class Unsplittable(ValueError):
    """The definition cannot be split exactly: run it whole."""


# --- the plan -------------------------------------------------------------------------


def ident(*names: str) -> sql.SQL:
    """A quoted identifier for a statement that binds values: a `%` in a name doubled."""
    return sql.SQL(sql.Identifier(*names).as_string().replace("%", "%%"))


@dataclass(frozen=True)
class Plan:
    """How a command splits its statements: the pieces (ranges of user ids, and the
    users without one, `commands/keyranges.py`), the pinned instant, and the names of
    the database's aggregate functions (to tell an aggregate from a function)."""

    pieces: tuple[Piece, ...]
    now: datetime
    aggregates: frozenset[str]

    @property
    def params(self) -> dict[str, Any]:
        return {"pinned_now": self.now}


_PLAN_SQL = """
SELECT now() AS now,
       (SELECT count(*) = 3 AND count(DISTINCT a.attcollation) = 1
               AND bool_and(a.atttypid IN ('text'::regtype, 'varchar'::regtype))
          FROM pg_attribute a
         WHERE (a.attrelid, a.attname) IN ((to_regclass('users'), 'id'),
                                          (to_regclass('points_ledger'), 'user_id'),
                                          (to_regclass('submissions'), 'user_id'))) AS same_keys,
       array(SELECT DISTINCT p.proname::text FROM pg_proc p WHERE p.prokind = 'a') AS aggregates
"""


async def plan(db: Reader, rows_per_piece: int | None = None) -> Plan:
    """Pieces of about `rows_per_piece` ledger and submission rows (PIECE_ROWS), cut
    where the ledger's user id histogram puts evenly many rows; one piece (no split)
    without a histogram. The piece of NULL user ids is always there: a view's rows (a
    materialized view's columns are never NOT NULL) are split by the same ranges."""
    (row,) = await db.fetch(_PLAN_SQL)
    stats = await keyranges.key_stats(db, "points_ledger", "user_id", [("submissions", "user_id")])
    # Split only where every table names its user the same way: text of one collation
    # (a user's rows must fall in the same piece in each table).
    pieces = keyranges.split(
        stats.bounds,
        stats.rows if row["same_keys"] else 0,
        PIECE_ROWS if rows_per_piece is None else rows_per_piece,
        nulls=True,
    )
    return Plan(tuple(pieces), row["now"], frozenset(row["aggregates"] or ()))


# --- the tree -------------------------------------------------------------------------


def children(node: Any) -> Iterator[Any]:
    """A parse tree node's children (pglast's nodes, lists and tuples)."""
    if isinstance(node, ast.Node):
        for name in node:
            yield getattr(node, name)
    elif isinstance(node, (list, tuple)):
        yield from node


def _walk(node: Any, into_sublinks: bool = True) -> Iterator[ast.Node]:
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, ast.Node):
            yield current
            if not into_sublinks and isinstance(current, (ast.SubLink, ast.SelectStmt)):
                if current is not node:
                    continue
        stack.extend(reversed(list(children(current))))


def _replace(node: Any, fn: Callable[[Any], Any]) -> Any:
    """`node` with every subtree `fn` gives a replacement for (not None) replaced; the
    replacement is not descended into. Rewrites in place where it can."""
    if isinstance(node, ast.Node):
        new = fn(node)
        if new is not None:
            return new
        for name in node:
            value = getattr(node, name)
            if isinstance(value, (ast.Node, tuple, list)):
                setattr(node, name, _replace(value, fn))
        return node
    if isinstance(node, (tuple, list)):
        return tuple(_replace(v, fn) for v in node)
    return node


def _text(node: Any) -> str:
    return str(RawStream()(node))


def _maybe_text(node: Any) -> str | None:
    """An expression's text; None for a part of the tree that is not one on its own."""
    if isinstance(node, (ast.String, ast.Integer, ast.TypeName, ast.Alias, ast.SortBy)):
        return None
    try:
        return _text(node)
    except Exception:  # a fragment the printer does not print alone
        return None


def _parse_select(text: str) -> ast.SelectStmt:
    (raw,) = pglast.parse_sql(text)
    stmt = raw.stmt
    if not isinstance(stmt, ast.SelectStmt):
        raise Unsplittable(f"not a SELECT ({type(stmt).__name__})")
    return stmt


def _expr(text: str) -> Any:
    """One expression, parsed."""
    return _only(_parse_select(f"SELECT {text}").targetList).val


def _only(items: tuple[Any, ...] | None) -> Any:
    if not items:
        raise Unsplittable("an empty clause where one item was expected")
    return items[0]


def _colref(*names: str) -> ast.ColumnRef:
    return ast.ColumnRef(fields=tuple(ast.String(sval=n) for n in names))


def _fields(ref: ast.ColumnRef) -> list[str] | None:
    out = []
    for f in ref.fields or ():
        if not isinstance(f, ast.String):
            return None
        out.append(str(f.sval))
    return out


def _funcname(call: ast.FuncCall) -> str:
    last = (call.funcname or ())[-1]
    return str(last.sval) if isinstance(last, ast.String) else ""


def _conjuncts(expr: Any) -> list[Any]:
    if isinstance(expr, ast.BoolExpr) and expr.boolop == BoolExprType.AND_EXPR:
        return [c for arg in expr.args or () for c in _conjuncts(arg)]
    return [] if expr is None else [expr]


def _equalities(expr: Any) -> list[tuple[ast.ColumnRef, ast.ColumnRef]]:
    pairs = []
    for cond in _conjuncts(expr):
        if (
            isinstance(cond, ast.A_Expr)
            and cond.kind == A_Expr_Kind.AEXPR_OP
            and [getattr(n, "sval", None) for n in cond.name or ()] == ["="]
            and isinstance(cond.lexpr, ast.ColumnRef)
            and isinstance(cond.rexpr, ast.ColumnRef)
        ):
            pairs.append((cond.lexpr, cond.rexpr))
    return pairs


def _reads_user_tables(node: Any, ctes: dict[str, Info]) -> bool:
    for n in _walk(node):
        if isinstance(n, ast.RangeVar):
            name = str(n.relname)
            if name in USER_KEYS:
                return True
            cte = ctes.get(name) if n.schemaname is None else None
            if cte is not None and (cte.bearing or cte.under_merge):
                return True
    return False


# --- what a SELECT gives ----------------------------------------------------------------


@dataclass
class Info:
    """What a FROM item gives its SELECT: whether its rows come from user tables
    (`bearing`), each from one user's rows; which output columns hold the user id;
    whether a SELECT merged across pieces lies under it."""

    bearing: bool = False
    keys: frozenset[str] = frozenset()
    under_merge: bool = False


@dataclass
class _Leaf:
    alias: str
    info: Info
    nullable: bool = False


@dataclass
class Agg:
    call: ast.FuncCall
    kind: str  # count, sum, min, max, avg, bool_and, bool_or


@dataclass
class Node:
    """A SELECT aggregating the rows of many users: run per piece as partial aggregates,
    then once over the merged partials."""

    stmt: ast.SelectStmt
    groups: list[Any]  # the GROUP BY expressions
    carried: list[ast.ColumnRef]  # columns read outside aggregates and groups
    aggs: list[Agg]
    grouped: bool


@dataclass
class Split:
    """A definition that can be run piece by piece (see the module's docstring)."""

    text: str
    tree: ast.SelectStmt
    keys: frozenset[str]  # per user: the output columns holding the user id
    nodes: list[Node] = field(default_factory=list)
    cte_refs: set[int] = field(default_factory=set)  # ids of RangeVars naming a CTE

    @property
    def per_user(self) -> bool:
        return not self.nodes

    def _copy(self) -> tuple[ast.SelectStmt, dict[int, Any]]:
        memo: dict[int, Any] = {}
        tree = copy.deepcopy(self.tree, memo)
        _restrict(tree, {id(memo[i]) for i in self.cte_refs if i in memo})
        tree = _replace(tree, _pin_now)
        return tree, memo

    def piece_sql(self, piece: Piece) -> str:
        """Per user: the definition over one piece's users; bind `Piece.params` and
        `Plan.params`."""
        if not self.per_user:
            raise Unsplittable("aggregates across users: use partial_sql and final_sql")
        tree, _memo = self._copy()
        return _finish(_text(tree), piece)

    def partial_sql(self, piece: Piece, extra: dict[str, str] | None = None) -> str:
        """Merged: one row, one jsonb array per merged SELECT (`n0`, `n1`, ...) of its
        partial aggregates over the piece's users, each value as text beside its type.
        `extra` adds a jsonb array column per name, of the rows of a SELECT of the
        caller's (SQL text ready for psycopg, reading tables the definition's CTEs do
        not shadow: see `shadows`), computed in the same statement, so from the same
        snapshot."""
        tree, memo = self._copy()
        outer = _parse_select(
            ", ".join(
                f"(SELECT coalesce(jsonb_agg(x), '[]'::jsonb) FROM (SELECT 1) AS x) AS n{i}"  # noqa: S608
                for i in range(len(self.nodes))
            ).join(("SELECT ", ""))
        )
        for i, node in enumerate(self.nodes):
            partial = _partial(node, memo)
            sub = (outer.targetList or ())[i].val.subselect
            _only(sub.fromClause).subquery = partial
        outer.withClause = tree.withClause
        text = _finish(_text(outer), piece)
        for name, query in (extra or {}).items():
            text += ", (SELECT coalesce(jsonb_agg(x), '[]'::jsonb) FROM ("
            text += f"{query}) AS x) AS {_quote(name)}"
        return text

    def shadows(self, names: set[str]) -> bool:
        """Whether the definition's top-level CTEs take any of these table names."""
        ctes = self.tree.withClause.ctes if self.tree.withClause is not None else ()
        return any(str(c.ctename) in names for c in ctes or ())

    def final_sql(self, partials: list[list[Row]]) -> tuple[str, dict[str, Any]]:
        """The definition over the merged partials (`partials[i]`: the rows of `n{i}`
        from every piece), and the parameters it binds (besides `Plan.params`)."""
        tree, memo = self._copy()
        params: dict[str, Any] = {}
        swaps: dict[int, ast.SelectStmt] = {}
        for i, node in enumerate(self.nodes):
            rows = partials[i]
            if len(rows) > MAX_MERGED_ROWS:
                raise Unsplittable(f"{len(rows):,} partial rows to merge")
            mine = memo[id(node.stmt)]
            swaps[id(mine)] = _merge(node, memo, rows, f"p{i}_", params) if rows else _none(mine)
        if id(tree) in swaps:
            tree = swaps[id(tree)]
        else:
            tree = _replace(tree, lambda n: swaps.get(id(n)))
        return _finish(_text(tree), WHOLE), params


def _finish(text: str, piece: Piece) -> str:
    """Deparsed text made ready for psycopg: literal `%` doubled, markers replaced by
    bound parameters and the piece's conditions."""
    out = text.replace("%", "%%")
    for mark, value in _NOW_MARKS.items():
        out = out.replace(mark, value)
    out = re.sub(rf"{_MARK}pred__\(([^()]*)\)", lambda m: piece.where(m.group(1)), out)
    out = re.sub(rf"{_MARK}param(\w+?)__", r"%(\1)s", out)
    if _MARK in out:
        raise Unsplittable("a marker was left in the rewritten definition")
    return out


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _restrict(tree: ast.SelectStmt, skip: set[int]) -> None:
    """Every user table of every SELECT read only for the piece's users: its condition
    (a marker, `__dbops_pred__(alias.user_id)`) added where it filters that table's rows
    and nothing else: the WHERE of its SELECT, or the ON of the outer join whose
    nullable side it is on. The table stays itself (not a subquery), so what PostgreSQL
    infers from its primary key (GROUP BY u.id, then u.handle) still holds."""
    selects = [n for n in _walk(tree) if isinstance(n, ast.SelectStmt)]
    for s in selects:
        adds: list[Any] = []
        for item in s.fromClause or ():
            _restrict_item(item, skip, adds)
        if adds:
            s.whereClause = _and(s.whereClause, adds)


def _restrict_item(item: Any, skip: set[int], adds: list[Any]) -> None:
    if isinstance(item, ast.RangeVar):
        name = str(item.relname)
        if name in USER_KEYS and id(item) not in skip:
            alias = str(item.alias.aliasname) if item.alias else name
            if any(c in alias for c in "()"):
                raise Unsplittable("a table alias with parentheses")
            ref = _colref(alias, USER_KEYS[name])
            adds.append(ast.FuncCall(funcname=(ast.String(sval=f"{_MARK}pred__"),), args=(ref,)))
    elif isinstance(item, ast.JoinExpr):
        left: list[Any] = []
        right: list[Any] = []
        _restrict_item(item.larg, skip, left)
        _restrict_item(item.rarg, skip, right)
        if item.jointype == JoinType.JOIN_LEFT and right:
            if item.usingClause:
                raise Unsplittable("a user table on the nullable side of LEFT JOIN USING")
            item.quals = _and(item.quals, right)
            right = []
        elif right and item.jointype != JoinType.JOIN_INNER:
            raise Unsplittable("a user table on the nullable side of an outer join")
        if left and item.jointype not in (JoinType.JOIN_INNER, JoinType.JOIN_LEFT):
            raise Unsplittable("a user table on the nullable side of an outer join")
        adds += left + right


def _and(expr: Any, more: list[Any]) -> Any:
    parts = ([] if expr is None else [expr]) + more
    if len(parts) == 1:
        return parts[0]
    return ast.BoolExpr(boolop=BoolExprType.AND_EXPR, args=tuple(parts))


def _pin_now(node: Any) -> Any:
    if (
        isinstance(node, ast.FuncCall)
        and _funcname(node) in _NOW_FUNCTIONS
        and not node.args
        and node.over is None
        and len(node.funcname or ()) <= 2
    ):
        return _colref(f"{_MARK}now__")
    if isinstance(node, ast.SQLValueFunction) and node.op in _SVF_MARKS:
        return _colref(_SVF_MARKS[node.op])
    return None


def pinned(text: str) -> str:
    """A definition to run whole, with `now()` pinned (`Plan.params`) where it can be
    read, and its `%` doubled for a statement that binds values."""
    if _MARK in text:
        return text.replace("%", "%%")
    try:
        tree = _replace(_parse_select(text), _pin_now)
        return _finish(_text(tree), WHOLE)
    except (pglast.parser.ParseError, Unsplittable):
        return text.replace("%", "%%")


# --- analysis ---------------------------------------------------------------------------


def split(text: str, aggregates: frozenset[str]) -> Split:
    """The definition, read for a split by user; Unsplittable when it cannot be proved."""
    try:
        tree = _parse_select(text)
    except pglast.parser.ParseError as exc:
        raise Unsplittable(f"cannot parse the definition ({exc})") from exc
    if _MARK in text:
        raise Unsplittable("the definition uses the splitter's own names")
    found = Split(text=text, tree=tree, keys=frozenset())
    info = _Analyser(aggregates, found.nodes, found.cte_refs).select(tree, {})
    if info.bearing:
        if found.nodes or info.under_merge:
            raise Unsplittable("per-user rows joined with totals across users")
        if not info.keys:
            raise Unsplittable("its rows are per user, but no column holds the user id")
        found.keys = info.keys
    elif not found.nodes:
        raise Unsplittable("it reads no table keyed by user")
    return found


class _Analyser:
    def __init__(self, aggregates: frozenset[str], nodes: list[Node], cte_refs: set[int]) -> None:
        self.aggregates = aggregates
        self.nodes = nodes
        self.cte_refs = cte_refs

    def select(self, s: ast.SelectStmt, ctes: dict[str, Info]) -> Info:
        if s.op != SetOperation.SETOP_NONE:
            sides = [self.select(side, ctes) for side in (s.larg, s.rarg) if side is not None]
            if any(i.bearing or i.under_merge for i in sides):
                raise Unsplittable("a set operation over user tables")
            return Info()
        if s.valuesLists:
            return Info()
        scope = dict(ctes)
        if s.withClause is not None:
            for cte in s.withClause.ctes or ():
                body = cte.ctequery
                if not isinstance(body, ast.SelectStmt):
                    raise Unsplittable("a CTE that is not a SELECT")
                got = self.select(body, scope)
                if s.withClause.recursive and (got.bearing or got.under_merge):
                    raise Unsplittable("a recursive CTE over user tables")
                if cte.aliascolnames and got.bearing:
                    raise Unsplittable("a CTE renaming its columns")
                scope[str(cte.ctename)] = got
        leaves: list[_Leaf] = []
        equal: list[tuple[ast.ColumnRef, ast.ColumnRef]] = []
        using: list[tuple[list[_Leaf], list[_Leaf], list[str]]] = []
        for item in s.fromClause or ():
            self._from(item, scope, leaves, equal, using, nullable=False)
        equal += _equalities(s.whereClause)
        self._no_user_sublinks(s, scope)
        bearing = [leaf for leaf in leaves if leaf.info.bearing]
        under = any(leaf.info.under_merge for leaf in leaves)
        if not bearing:
            return Info(under_merge=under)
        if under:
            raise Unsplittable("per-user rows joined with totals across users")
        if all(leaf.nullable for leaf in bearing):
            raise Unsplittable("an outer join keeps rows that belong to no user")
        if s.windowClause or any(
            isinstance(n, ast.FuncCall) and n.over is not None for n in _walk(s.targetList, False)
        ):
            raise Unsplittable("a window function over user rows")
        if s.limitCount is not None or s.limitOffset is not None or s.lockingClause:
            raise Unsplittable("LIMIT or OFFSET over user rows")
        resolve = _Resolver(leaves)
        self._connected(bearing, equal, using, resolve)
        groups = self._groups(s)
        aggregated = bool(groups) or bool(s.havingClause) or self._has_aggregates(s)
        outputs = self._key_outputs(s, resolve)
        if not aggregated:
            if s.distinctClause and not outputs:
                raise Unsplittable("DISTINCT over user rows without their user id")
            return Info(bearing=True, keys=outputs)
        if any(resolve.key(g) for g in groups):
            if s.distinctClause and not outputs:
                raise Unsplittable("DISTINCT over user rows without their user id")
            return Info(bearing=True, keys=outputs)
        self.nodes.append(self._node(s, groups, resolve))
        return Info(under_merge=True)

    def _from(
        self,
        item: Any,
        ctes: dict[str, Info],
        leaves: list[_Leaf],
        equal: list[tuple[ast.ColumnRef, ast.ColumnRef]],
        using: list[tuple[list[_Leaf], list[_Leaf], list[str]]],
        nullable: bool,
    ) -> None:
        if isinstance(item, ast.RangeVar):
            name = str(item.relname)
            alias = str(item.alias.aliasname) if item.alias else name
            if item.schemaname is None and name in ctes:
                self.cte_refs.add(id(item))
                leaves.append(_Leaf(alias, ctes[name], nullable))
            elif name in USER_KEYS:
                if item.alias is not None and item.alias.colnames:
                    raise Unsplittable(f"{name} read with its columns renamed")
                leaves.append(_Leaf(alias, Info(True, frozenset({USER_KEYS[name]})), nullable))
            else:
                leaves.append(_Leaf(alias, Info(), nullable))
        elif isinstance(item, ast.RangeSubselect):
            if not isinstance(item.subquery, ast.SelectStmt):
                raise Unsplittable("an unusual subquery")
            got = self.select(item.subquery, ctes)
            if (got.bearing or got.under_merge) and item.lateral:
                raise Unsplittable("a LATERAL subquery over user tables")
            if got.bearing and item.alias is not None and item.alias.colnames:
                raise Unsplittable("a subquery renaming its columns")
            alias = str(item.alias.aliasname) if item.alias else ""
            leaves.append(_Leaf(alias, got, nullable))
        elif isinstance(item, ast.JoinExpr):
            if item.isNatural or item.alias is not None or item.join_using_alias is not None:
                if _reads_user_tables(item, ctes):
                    raise Unsplittable("a NATURAL or aliased join over user tables")
            kind = item.jointype
            if kind not in (JoinType.JOIN_INNER, JoinType.JOIN_LEFT):
                if _reads_user_tables(item, ctes):
                    raise Unsplittable("a RIGHT or FULL join over user tables")
            left: list[_Leaf] = []
            right: list[_Leaf] = []
            self._from(item.larg, ctes, left, equal, using, nullable)
            self._from(item.rarg, ctes, right, equal, using, nullable or kind == JoinType.JOIN_LEFT)
            leaves += left + right
            if item.quals is not None:
                equal += _equalities(item.quals)
            if item.usingClause:
                names = [str(n.sval) for n in item.usingClause if isinstance(n, ast.String)]
                using.append((left, right, names))
        else:
            if _reads_user_tables(item, ctes):
                raise Unsplittable(f"user tables read through {type(item).__name__}")
            alias = getattr(getattr(item, "alias", None), "aliasname", None) or ""
            leaves.append(_Leaf(str(alias), Info(), nullable))

    def _no_user_sublinks(self, s: ast.SelectStmt, ctes: dict[str, Info]) -> None:
        parts = [s.targetList, s.whereClause, s.havingClause, s.groupClause, s.sortClause]
        parts += [
            n.quals
            for item in s.fromClause or ()
            for n in _walk(item, False)
            if isinstance(n, ast.JoinExpr)
        ]
        for part in parts:
            for n in _walk(part, into_sublinks=True):
                if isinstance(n, ast.SubLink) and _reads_user_tables(n.subselect, ctes):
                    raise Unsplittable("a subquery over user tables inside an expression")

    def _connected(
        self,
        bearing: list[_Leaf],
        equal: list[tuple[ast.ColumnRef, ast.ColumnRef]],
        using: list[tuple[list[_Leaf], list[_Leaf], list[str]]],
        resolve: _Resolver,
    ) -> None:
        parent = {id(leaf): id(leaf) for leaf in bearing}

        def root(x: int) -> int:
            while parent[x] != x:
                x = parent[x]
            return x

        def join(a: _Leaf, b: _Leaf) -> None:
            parent[root(id(a))] = root(id(b))

        for a, b in equal:
            la, lb = resolve.key(a), resolve.key(b)
            if la is not None and lb is not None:
                join(la, lb)
        for left, right, names in using:
            for name in names:
                ls = [leaf for leaf in left if leaf.info.bearing and name in leaf.info.keys]
                rs = [leaf for leaf in right if leaf.info.bearing and name in leaf.info.keys]
                if ls and rs:
                    join(ls[0], rs[0])
        if len({root(id(leaf)) for leaf in bearing}) > 1:
            raise Unsplittable("a join of user rows not made on the user id")

    def _groups(self, s: ast.SelectStmt) -> list[Any]:
        out = []
        for g in s.groupClause or ():
            if isinstance(g, ast.GroupingSet):
                raise Unsplittable("GROUPING SETS, ROLLUP or CUBE")
            if isinstance(g, ast.A_Const) and isinstance(g.val, ast.Integer):
                position = int(g.val.ival or 0)
                targets = s.targetList or ()
                if not 1 <= position <= len(targets):
                    raise Unsplittable("GROUP BY a position that does not exist")
                out.append(targets[position - 1].val)
            else:
                out.append(g)
        if s.groupDistinct:
            raise Unsplittable("GROUP BY DISTINCT")
        return out

    def _is_aggregate(self, n: Any) -> bool:
        return (
            isinstance(n, ast.FuncCall)
            and n.over is None
            and (_funcname(n) in self.aggregates or bool(n.agg_star))
        )

    def _has_aggregates(self, s: ast.SelectStmt) -> bool:
        return any(self._is_aggregate(n) for n in _walk((s.targetList, s.havingClause), False))

    def _key_outputs(self, s: ast.SelectStmt, resolve: _Resolver) -> frozenset[str]:
        out: set[str] = set()
        for t in s.targetList or ():
            val = t.val
            if isinstance(val, ast.ColumnRef):
                names = _fields(val)
                if names is None:
                    star = list(val.fields or ())
                    owners = resolve.leaves_for_star(star)
                    for leaf in owners:
                        if leaf.info.bearing:
                            out |= leaf.info.keys
                    continue
                if resolve.key(val) is not None:
                    out.add(str(t.name) if t.name else names[-1])
        return frozenset(out)

    def _node(self, s: ast.SelectStmt, groups: list[Any], resolve: _Resolver) -> Node:
        if s.distinctClause and s.distinctClause != (None,):
            raise Unsplittable("DISTINCT ON across users")
        group_texts = {_text(g) for g in groups}
        aggs: list[Agg] = []
        carried: dict[str, ast.ColumnRef] = {}

        def visit(expr: Any) -> None:
            for n in _scan(expr):
                if isinstance(n, ast.SubLink):
                    raise Unsplittable("a subquery beside aggregates across users")
                if self._is_aggregate(n):
                    aggs.append(self._agg(n, resolve))
                elif isinstance(n, ast.ColumnRef):
                    if _fields(n) is None:
                        raise Unsplittable("`*` beside aggregates across users")
                    carried.setdefault(_text(n), n)

        def _scan(expr: Any) -> Iterator[Any]:
            stack = [expr]
            while stack:
                cur = stack.pop()
                if isinstance(cur, ast.Node):
                    if _maybe_text(cur) in group_texts and not isinstance(cur, ast.ResTarget):
                        continue
                    yield cur
                    if self._is_aggregate(cur) or isinstance(cur, ast.SubLink):
                        continue
                stack.extend(reversed(list(children(cur))))

        for t in s.targetList or ():
            if t.name is None and not isinstance(t.val, ast.ColumnRef):
                raise Unsplittable("a column whose name the definition does not give")
            visit(t.val)
        visit(s.havingClause)
        for sort in s.sortClause or ():
            if not _output_reference(sort.node, s):
                visit(sort.node)
        return Node(s, groups, list(carried.values()), aggs, bool(s.groupClause))

    def _agg(self, call: ast.FuncCall, resolve: _Resolver) -> Agg:
        name = _funcname(call)
        if name not in _MERGEABLE or call.agg_within_group or len(call.funcname or ()) > 2:
            raise Unsplittable(f"the aggregate {name}() cannot be merged across users")
        if call.agg_distinct:
            args = call.args or ()
            if name != "count" or len(args) != 1 or resolve.key(args[0]) is None:
                raise Unsplittable(f"{name}(DISTINCT ...) of something other than the user id")
        if name == "every":
            name = "bool_and"
        return Agg(call, name)


def _output_reference(node: Any, s: ast.SelectStmt) -> bool:
    """An ORDER BY item naming an output column or its position."""
    if isinstance(node, ast.A_Const) and isinstance(node.val, ast.Integer):
        return True
    if isinstance(node, ast.ColumnRef):
        names = _fields(node)
        outputs = {str(t.name) for t in s.targetList or () if t.name}
        return bool(names) and len(names or ()) == 1 and (names or [""])[0] in outputs
    return False


class _Resolver:
    """Which FROM item a column reference names, and whether it is that item's user id."""

    def __init__(self, leaves: list[_Leaf]) -> None:
        self.leaves = leaves
        self.by_alias = {leaf.alias: leaf for leaf in leaves if leaf.alias}

    def key(self, ref: Any) -> _Leaf | None:
        if not isinstance(ref, ast.ColumnRef):
            return None
        names = _fields(ref)
        if not names:
            return None
        if len(names) >= 2:
            leaf = self.by_alias.get(names[-2])
            if leaf is not None and leaf.info.bearing and names[-1] in leaf.info.keys:
                return leaf
            return None
        owners = [x for x in self.leaves if x.info.bearing and names[0] in x.info.keys]
        return owners[0] if len(owners) == 1 else None

    def leaves_for_star(self, fields: list[Any]) -> list[_Leaf]:
        if len(fields) == 1:
            return self.leaves
        head = fields[-2]
        name = str(head.sval) if isinstance(head, ast.String) else ""
        return [leaf for leaf in self.leaves if leaf.alias == name]


# --- partial aggregates and their merge -------------------------------------------------


def _partial_aggs(agg: Agg) -> list[ast.FuncCall]:
    """The partial aggregates one aggregate needs (an average: its sum and its count)."""
    if agg.kind != "avg":
        return [agg.call]
    out = []
    for name in ("sum", "count"):
        part = copy.deepcopy(agg.call)
        part.funcname = (ast.String(sval=name),)
        out.append(part)
    return out


def _partial(node: Node, memo: dict[int, Any]) -> ast.SelectStmt:
    """The node as partial aggregates: its group values, the columns carried beside them
    and each partial aggregate, as text, each with its type (`t_<column>`)."""
    mine: ast.SelectStmt = memo[id(node.stmt)]
    columns: list[tuple[str, Any]] = []
    for i, g in enumerate(node.groups):
        columns.append((f"g{i}", memo.get(id(g), g)))
    for i, c in enumerate(node.carried):
        columns.append((f"c{i}", memo.get(id(c), c)))
    for i, agg in enumerate(node.aggs):
        call = memo.get(id(agg.call), agg.call)
        for j, part in enumerate(_partial_aggs(Agg(call, agg.kind))):
            columns.append((f"a{i}_{j}", part))
    targets = []
    for name, expr in columns:
        targets.append(
            ast.ResTarget(
                name=name,
                val=ast.TypeCast(arg=copy.deepcopy(expr), typeName=_type_name("text")),
            )
        )
        typeof = ast.FuncCall(funcname=(ast.String(sval="pg_typeof"),), args=(copy.deepcopy(expr),))
        targets.append(
            ast.ResTarget(
                name=f"t_{name}", val=ast.TypeCast(arg=typeof, typeName=_type_name("text"))
            )
        )
    out = copy.copy(mine)
    out.targetList = tuple(targets)
    keys = [memo.get(id(g), g) for g in node.groups] + [memo.get(id(c), c) for c in node.carried]
    out.groupClause = tuple(copy.deepcopy(k) for k in keys) or None
    out.havingClause = None
    out.sortClause = None
    out.distinctClause = None
    out.withClause = mine.withClause
    return out


def _type_name(text: str) -> ast.TypeName:
    cast = _expr(f"CAST(NULL AS {text})")
    if not isinstance(cast, ast.TypeCast) or cast.typeName is None:
        raise Unsplittable(f"not a type: {text}")
    return cast.typeName


def _none(mine: ast.SelectStmt) -> ast.SelectStmt:
    """The node giving no rows, with its own column types (no partial rows came back)."""
    out = copy.deepcopy(mine)
    false = _expr("false")
    out.whereClause = (
        false
        if out.whereClause is None
        else ast.BoolExpr(boolop=BoolExprType.AND_EXPR, args=(out.whereClause, false))
    )
    return out


def _merge(
    node: Node, memo: dict[int, Any], rows: list[Row], prefix: str, params: dict[str, Any]
) -> ast.SelectStmt:
    """The node over the merged partial rows: the same output columns, computed by the
    node's own expressions with each aggregate replaced by the merge of its partials."""
    mine: ast.SelectStmt = memo[id(node.stmt)]
    names = [k for k in rows[0] if not k.startswith("t_")]
    types = {}
    for name in names:
        typ = next((str(r[f"t_{name}"]) for r in rows if r.get(f"t_{name}")), "text")
        types[name] = _UNMODIFIED.get(typ, typ)
    for name in names:
        params[f"{prefix}{name}"] = [r.get(name) for r in rows]
    unnest = ", ".join(f"{_MARK}param{prefix}{n}__::text[]" for n in names)
    typed = ", ".join(f"CAST(m.{n} AS {types[n]}) AS {n}" for n in names)
    source = _parse_select(
        f"SELECT * FROM (SELECT {typed} FROM unnest({unnest}) AS m({', '.join(names)})) AS m"  # noqa: S608
    ).fromClause
    by_node: dict[int, Any] = {}
    group_texts: dict[str, Any] = {}
    for i, g in enumerate(node.groups):
        group_texts[_text(memo.get(id(g), g))] = _colref("m", f"g{i}")
    for i, c in enumerate(node.carried):
        by_node[id(memo.get(id(c), c))] = _colref("m", f"c{i}")
    for i, agg in enumerate(node.aggs):
        by_node[id(memo.get(id(agg.call), agg.call))] = _combine(agg, i, types)

    def swap(n: Any) -> Any:
        if id(n) in by_node:
            return copy.deepcopy(by_node[id(n)])
        if isinstance(n, ast.Node) and not isinstance(n, ast.ResTarget):
            hit = group_texts.get(_maybe_text(n) or "")
            if hit is not None:
                return copy.deepcopy(hit)
        return None

    out = copy.copy(mine)
    targets = []
    for t in mine.targetList or ():
        name = t.name or (_fields(t.val) or ["?column?"])[-1]
        targets.append(ast.ResTarget(name=name, val=_replace(t.val, swap)))
    out.targetList = tuple(targets)
    out.fromClause = source
    out.whereClause = None
    out.withClause = None
    keys = [f"g{i}" for i in range(len(node.groups))] + [f"c{i}" for i in range(len(node.carried))]
    out.groupClause = tuple(_colref("m", k) for k in keys) if node.grouped else None
    out.havingClause = _replace(mine.havingClause, swap) if mine.havingClause else None
    if mine.sortClause:
        sorts = []
        for sort in mine.sortClause:
            if not _output_reference(sort.node, mine):
                sort.node = _replace(sort.node, swap)
            sorts.append(sort)
        out.sortClause = tuple(sorts)
    return out


def _combine(agg: Agg, i: int, types: dict[str, str]) -> Any:
    """One aggregate from its partials (`m.a<i>_<j>`), as PostgreSQL would have computed it."""
    first = f"a{i}_0"
    typ = types[first]
    if agg.kind in ("sum", "avg") and typ in _INEXACT:
        raise Unsplittable(f"a {agg.kind} of {typ} depends on the order of the rows")
    if agg.kind == "count":
        return _expr(f"CAST(sum(m.{first}) AS bigint)")
    if agg.kind == "sum":
        return _expr(f"CAST(sum(m.{first}) AS {typ})")
    if agg.kind in ("min", "max", "bool_and", "bool_or"):
        return _expr(f"{agg.kind}(m.{first})")
    if typ not in ("bigint", "numeric"):
        raise Unsplittable(f"an average of {typ}")
    # avg(integer or numeric) is its numeric sum divided by its count (numeric_avg).
    count = f"a{i}_1"
    return _expr(
        f"CASE WHEN sum(m.{count}) = 0 THEN NULL"
        f" ELSE CAST(sum(m.{first}) AS numeric) / CAST(sum(m.{count}) AS numeric) END"
    )

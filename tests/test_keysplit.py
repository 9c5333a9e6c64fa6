"""Whole-table reconciliations split by ranges of user ids (commands/keysplit.py), on a
real PostgreSQL: every definition the splitter accepts gives, piece by piece and merged,
exactly the rows it gives run whole; what it cannot prove exact it refuses; and
`/db leaderboard` and `/db analytics` report the same findings split into many pieces
as in one statement, faults included."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg.rows import dict_row

from bot.gateway import TargetGateway
from bot.router import RunContext
from commands import keysplit
from commands.analytics import analytics
from commands.base import Report, Row
from commands.fixture.faults import FaultInjector
from commands.leaderboard import leaderboard
from tests.conftest import FAST_THRESHOLDS

VIEWS = {
    "leaderboard_totals": "per user",
    "leaderboard_30d": "per user",
    "activity_metrics": 2,  # SELECTs merged across pieces
    "cohort_metrics": 1,
    "school_metrics": 1,
    "time_series_metrics": 2,
}
# Definitions the splitter must get exactly right: averages, minima, NULL groups,
# HAVING, ORDER BY, FILTER, count(DISTINCT user), a literal `%`, now(), CTEs, USING.
ACCEPTED = {
    "SELECT u.cohort, count(*) AS n, avg(p.pts) AS mean, min(p.pts) AS lo, max(p.pts) AS hi,"
    " bool_or(p.pts > 100) AS big, sum(p.pts) AS total, max(u.created_at) AS newest"
    " FROM users u JOIN (SELECT l.user_id, sum(l.delta_points) AS pts FROM points_ledger l"
    " GROUP BY l.user_id) p ON p.user_id = u.id"
    " GROUP BY u.cohort HAVING count(*) > 1 ORDER BY 1": 1,
    "SELECT s.status, count(DISTINCT s.user_id) AS users,"
    " count(*) FILTER (WHERE s.visibility = 'PUBLIC') AS public,"
    " avg(length(s.id)) AS id_length"
    " FROM submissions s WHERE s.payload::text LIKE '%a%' GROUP BY s.status": 1,
    "SELECT count(*) AS n, sum(delta_points) AS pts, max(event_time) AS newest"
    " FROM points_ledger WHERE event_time >= now() - interval '30 days'": 1,
    "WITH t AS (SELECT user_id, count(*) AS n FROM submissions GROUP BY user_id)"
    " SELECT u.id AS user_id, u.handle, t.n, CURRENT_DATE - u.created_at::date AS age"
    " FROM users u JOIN t ON t.user_id = u.id WHERE u.role = 'PARTICIPANT'": "per user",
    "SELECT l.user_id, l.activity_code, sum(l.delta_points) AS pts FROM points_ledger l"
    " JOIN submissions s USING (user_id, activity_code)"
    " WHERE s.status = 'APPROVED' GROUP BY l.user_id, l.activity_code": "per user",
    "SELECT a.code, a.name, coalesce(x.n, 0) AS n FROM activities a LEFT JOIN"
    " (SELECT activity_code, count(*) AS n FROM points_ledger GROUP BY 1) x"
    " ON x.activity_code = a.code": 1,
}
# What it cannot prove exact, and why.
REFUSED = {
    "SELECT u.id, r.handle FROM users u JOIN users r ON r.id = u.referred_by_user_id": (
        "not made on the user id"
    ),
    "SELECT a.code, count(*) AS n FROM activities a LEFT JOIN submissions s"
    " ON s.activity_code = a.code GROUP BY a.code": "belong to no user",
    "SELECT string_agg(handle, ',') AS handles FROM users": "string_agg() cannot be merged",
    "SELECT user_id, rank() OVER (ORDER BY delta_points) FROM points_ledger": "window",
    "SELECT u.id FROM users u WHERE u.id IN (SELECT user_id FROM submissions)": (
        "subquery over user tables"
    ),
    "SELECT cohort, count(*) AS n FROM users GROUP BY cohort UNION SELECT 'x', 1": (
        "set operation"
    ),
    "SELECT id FROM users LIMIT 5": "LIMIT",
    "SELECT count(DISTINCT activity_code) AS n FROM submissions": "other than the user id",
    "SELECT activity_code FROM activities": "no table keyed by user",
}


@pytest_asyncio.fixture(loop_scope="session")
async def conn(leaps_dsn: str) -> AsyncIterator[psycopg.AsyncConnection[Row]]:
    async with await psycopg.AsyncConnection.connect(
        leaps_dsn, row_factory=dict_row, autocommit=True
    ) as c:
        await c.set_read_only(True)
        yield c


class _Db:
    def __init__(self, conn: psycopg.AsyncConnection[Row]) -> None:
        self.conn = conn

    async def fetch(self, query: str, params: Any = ()) -> list[Row]:
        cur = await self.conn.execute(query, params or None)
        return await cur.fetchall() if cur.description else []


def _multiset(rows: list[Row]) -> Counter[tuple[Any, ...]]:
    return Counter(tuple(r.values()) for r in rows)


async def _run_split(db: _Db, found: keysplit.Split, plan: keysplit.Plan) -> list[Row]:
    if found.per_user:
        rows: list[Row] = []
        for piece in plan.pieces:
            got = await db.fetch(found.piece_sql(piece), {**piece.params(), **plan.params})
            key = sorted(found.keys)[0]
            for r in got:  # each piece gives its own users' rows only
                assert (r[key] is None) is piece.null
                assert piece.lo is None or str(r[key]) >= piece.lo
                assert piece.hi is None or str(r[key]) < piece.hi
            rows += got
        return rows
    partials: list[list[Row]] = [[] for _ in found.nodes]
    for piece in plan.pieces:
        (row,) = await db.fetch(found.partial_sql(piece), {**piece.params(), **plan.params})
        for i in range(len(found.nodes)):
            partials[i] += row[f"n{i}"]
    text, params = found.final_sql(partials)
    return await db.fetch(text, {**params, **plan.params})


async def test_split_gives_what_the_whole_definition_gives(
    conn: psycopg.AsyncConnection[Row],
) -> None:
    db = _Db(conn)
    plan = await keysplit.plan(db, rows_per_piece=300)
    assert len(plan.pieces) >= 5, plan.pieces
    assert plan.pieces[0].null  # rows without a user id: a piece of their own
    edges = [str(s.lo) for s in plan.pieces[2:]]
    assert edges == sorted(edges) and plan.pieces[1].lo is None is plan.pieces[-1].hi
    definitions = dict(ACCEPTED)
    for view, shape in VIEWS.items():
        (row,) = await db.fetch("SELECT pg_get_viewdef(%s::regclass, true) AS d", (view,))
        definitions[str(row["d"]).strip().rstrip(";")] = shape
    for text, shape in definitions.items():
        found = keysplit.split(text, plan.aggregates)
        assert ("per user" if found.per_user else len(found.nodes)) == shape, text
        whole = await db.fetch(keysplit.pinned(text), plan.params)
        assert whole, text  # the fixture has rows for each: an empty answer proves nothing
        assert _multiset(await _run_split(db, found, plan)) == _multiset(whole), text
    for text, why in REFUSED.items():
        with pytest.raises(keysplit.Unsplittable, match=re.escape(why)):
            keysplit.split(text, plan.aggregates)
    # Sums of floating-point numbers depend on the order of the rows: refused at merge.
    floats = keysplit.split(
        "SELECT activity_code, sum(delta_points::float8) AS pts FROM points_ledger GROUP BY 1",
        plan.aggregates,
    )
    with pytest.raises(keysplit.Unsplittable, match="double precision"):
        await _run_split(db, floats, plan)


def _findings(report: Report) -> list[tuple[Any, ...]]:
    return sorted(
        (f.check, f.status.value, f.summary, repr(f.rows), f.hint) for f in report.findings
    )


async def test_commands_split_into_pieces_report_what_one_statement_reports(
    leaps_dsn: str, faults: FaultInjector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stale boards, a double-counting definition, users missing and extra: the same
    findings, to the row, from many pieces as from one statement."""
    await faults.double_counting_leaderboard()
    await faults.stale_views(points=500)
    await faults.leaderboard_membership_drift()
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as c:
        # A view of the operators' own, per user, named with a `%`: split like the boards.
        await c.execute(
            'CREATE MATERIALIZED VIEW "odd%view" AS SELECT s.user_id, count(*) AS n,'
            " max(s.created_at) AS newest FROM submissions s GROUP BY s.user_id"
        )
    gateway = TargetGateway(leaps_dsn, check_timeout_ms=30_000)
    ctx = RunContext(gateway, FAST_THRESHOLDS)
    try:
        whole = [_findings(await leaderboard(ctx, [])), _findings(await analytics(ctx, []))]
        monkeypatch.setattr(keysplit, "PIECE_ROWS", 300)
        async with await psycopg.AsyncConnection.connect(leaps_dsn, row_factory=dict_row) as c:
            assert len((await keysplit.plan(_Db(c))).pieces) >= 5
        split = [_findings(await leaderboard(ctx, [])), _findings(await analytics(ctx, []))]
    finally:
        await gateway.close()
    assert split == whole
    statuses = {(check, status) for part in whole for check, status, *_ in part}
    assert ("leaderboard_totals: vs ledger", "crit") in statuses  # the faults are seen
    assert ("leaderboard_30d: missing users", "warn") in statuses
    assert ("cohort_metrics vs base tables", "warn") in statuses
    assert ("view odd%view", "ok") in statuses

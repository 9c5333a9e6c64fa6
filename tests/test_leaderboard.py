"""`/db leaderboard` against a real PostgreSQL: a clean fixture agrees; a stale view is
fixed by a refresh (and the test refreshes it to prove so); a definition that double
counts or drops a ledger source is not, and the report says how; over Slack end to end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, LiteralString

import psycopg
import pytest
import pytest_asyncio

from bot.gateway import TargetGateway
from bot.router import Dispatcher, RunContext
from commands.base import Finding, Report, Status, UsageError
from commands.fixture.faults import FaultInjector
from commands.leaderboard import leaderboard, parse_definition
from tests.conftest import FAST_THRESHOLDS, RunningBot
from tests.test_health_e2e import section_texts

TOTALS = "leaderboard_totals"
THIRTY = "leaderboard_30d"


@pytest_asyncio.fixture(loop_scope="session")
async def ctx(leaps_dsn: str) -> AsyncIterator[RunContext]:
    gateway = TargetGateway(leaps_dsn, check_timeout_ms=30_000)
    yield RunContext(gateway, FAST_THRESHOLDS)
    await gateway.close()


async def run(dsn: str, *stmts: LiteralString) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for stmt in stmts:
            cur = await conn.execute(stmt)
            if cur.description is not None:
                rows = await cur.fetchall()
    return rows


async def refresh(dsn: str, view: LiteralString = TOTALS) -> None:
    await run(dsn, "REFRESH MATERIALIZED VIEW " + view)


def by_check(report: Report) -> dict[str, Finding]:
    return {f.check: f for f in report.findings}


async def test_clean_fixture_agrees(ctx: RunContext, leaps_dsn: str) -> None:
    report = await Dispatcher(ctx).run("leaderboard")
    assert isinstance(report, Report)
    found = by_check(report)
    assert set(found) == {f"{TOTALS}: vs ledger", f"{THIRTY}: vs ledger"}
    ((shown,),) = await run(leaps_dsn, "SELECT count(*) FROM leaderboard_totals")
    totals = found[f"{TOTALS}: vs ledger"]
    assert totals.status is Status.OK, totals.summary
    assert f"{shown} users, every total equal" in totals.summary
    assert totals.rows[0]["ledger_users"] == shown > 0
    assert totals.hint is None
    assert found[f"{THIRTY}: vs ledger"].status is Status.OK
    assert "(last 30 days)" in found[f"{THIRTY}: vs ledger"].summary


async def test_definition_filter_is_read_from_the_catalog(leaps_dsn: str) -> None:
    ((text,),) = await run(leaps_dsn, "SELECT pg_get_viewdef('leaderboard_totals'::regclass)")
    d = parse_definition(str(text).rstrip(";"))
    assert d.parse_error is None
    assert d.users_alias == "u"
    assert d.user_filter is not None
    # printed back by the parser, enum casts spelled out
    assert d.user_filter == (
        "u.role = CAST('PARTICIPANT' AS \"Role\")"
        " AND u.user_type = CAST('EDUCATOR' AS \"UserType\")"
    )
    assert "total_points" not in d.user_filter  # points come from the ledger, not the view
    assert d.sum_tables == ["points_ledger"]
    assert d.sum_where is None
    assert d.sum_group == "l.user_id"
    assert parse_definition("SELECT FROM WHERE").parse_error


async def test_stale_view_is_fixed_by_a_refresh(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    user_id = await faults.stale_views(points=500)
    found = by_check(await leaderboard(ctx, []))
    verdict = found[f"{TOTALS}: vs ledger"]
    assert verdict.status is Status.WARN
    assert "stale: 0 users missing, 0 extra, 1 with other totals" in verdict.summary
    assert verdict.hint == "refresh fixes it: /db refresh-views leaderboard_totals"
    diff = found[f"{TOTALS}: point differences"]
    assert diff.status is Status.WARN
    (row,) = diff.rows
    assert row["user_id"] == user_id
    assert row["difference"] == -500
    assert row["ledger_points"] == row["definition_points"] == row["shown_points"] + 500
    assert found[f"{THIRTY}: vs ledger"].status is Status.WARN  # the award is recent

    await refresh(leaps_dsn, TOTALS)
    found = by_check(await leaderboard(ctx, [TOTALS]))
    assert set(found) == {f"{TOTALS}: vs ledger"}  # named views only
    assert found[f"{TOTALS}: vs ledger"].status is Status.OK


async def test_missing_and_extra_users(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    newcomer, promoted = await faults.leaderboard_membership_drift()
    found = by_check(await leaderboard(ctx, [TOTALS]))
    assert found[f"{TOTALS}: vs ledger"].status is Status.WARN
    assert "1 users missing, 1 extra, 0 with other totals" in found[f"{TOTALS}: vs ledger"].summary
    (missing,) = found[f"{TOTALS}: missing users"].rows
    assert missing["user_id"] == newcomer and missing["ledger_points"] == 40
    (extra,) = found[f"{TOTALS}: extra users"].rows
    assert extra["user_id"] == promoted
    assert extra["why"] == "filtered out by the definition"
    assert found[f"{TOTALS}: extra users"].hint == (
        "refresh fixes it: /db refresh-views leaderboard_totals"
    )
    await refresh(leaps_dsn, TOTALS)
    found = by_check(await leaderboard(ctx, [TOTALS]))
    assert found[f"{TOTALS}: vs ledger"].status is Status.OK


async def test_double_counting_definition_is_not_fixed_by_a_refresh(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    await faults.double_counting_leaderboard()
    await refresh(leaps_dsn, TOTALS)
    found = by_check(await leaderboard(ctx, []))
    verdict = found[f"{TOTALS}: vs ledger"]
    assert verdict.status is Status.CRIT
    assert "a refresh would not fix it" in verdict.summary
    assert "joins that multiply rows" in verdict.summary
    assert "each ledger row counts once per matching row of submissions" in verdict.summary
    assert "(double counting)" in verdict.summary
    assert verdict.hint and "recreate the view" in verdict.hint
    diff = found[f"{TOTALS}: point differences"]
    assert diff.status is Status.CRIT
    assert diff.hint and "refresh would not fix it" in diff.hint
    gaps = [abs(r["difference"]) for r in diff.rows]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 0  # largest first
    assert all(r["shown_points"] == r["definition_points"] for r in diff.rows)
    assert found[f"{THIRTY}: vs ledger"].status is Status.OK  # untouched


async def test_definition_dropping_a_source_is_named(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    ((webhook_users,),) = await run(
        leaps_dsn,
        "SELECT count(DISTINCT l.user_id) FROM points_ledger l JOIN leaderboard_totals t"
        " ON t.user_id = l.user_id WHERE l.source = 'WEBHOOK'",
    )
    assert webhook_users > 0, "the fixture needs webhook awards on the leaderboard"
    await faults.leaderboard_dropping_source("WEBHOOK")
    verdict = by_check(await leaderboard(ctx, [TOTALS]))[f"{TOTALS}: vs ledger"]
    assert verdict.status is Status.CRIT
    assert "a refresh would not fix it" in verdict.summary
    assert "a filter drops ledger rows: `WHERE l.source <> CAST('WEBHOOK'" in verdict.summary
    assert "the missing points are exactly their WEBHOOK rows" in verdict.summary


async def test_unpopulated_view_is_filled_by_a_refresh(
    ctx: RunContext, faults: FaultInjector
) -> None:
    await faults.unpopulated_view(TOTALS)
    verdict = by_check(await leaderboard(ctx, [TOTALS]))[f"{TOTALS}: vs ledger"]
    assert verdict.status is Status.CRIT
    assert "not populated" in verdict.summary
    assert "its definition agrees with the ledger" in verdict.summary
    assert verdict.hint and "/db refresh-views leaderboard_totals" in verdict.hint


async def test_locked_view_names_the_holder(ctx: RunContext, leaps_dsn: str) -> None:
    """A refresh left in an open transaction holds ACCESS EXCLUSIVE: neither the view's
    rows nor its definition (pg_get_viewdef locks the view) can be read. The report
    arrives at once, names the holder, and checks the other view."""
    holder = await psycopg.AsyncConnection.connect(leaps_dsn, application_name="lock-holder")
    try:
        await holder.execute("REFRESH MATERIALIZED VIEW leaderboard_totals")
        found = by_check(await leaderboard(ctx, []))
        verdict = found[f"{TOTALS}: vs ledger"]
        assert verdict.status is Status.SKIPPED
        pid = holder.info.backend_pid
        assert f"pid {pid} (lock-holder, AccessExclusiveLock)" in verdict.summary
        assert verdict.hint and f"/db terminate {pid}" in verdict.hint
        assert found[f"{THIRTY}: vs ledger"].status is Status.OK
    finally:
        await holder.rollback()
        await holder.close()


async def test_missing_group_is_named(ctx: RunContext, leaps_dsn: str) -> None:
    """Points grouped by user and activity: one row per pair. Without a unique index on
    user_id (it could not be built), as a hand-written migration might leave it."""
    await run(
        leaps_dsn,
        "DROP MATERIALIZED VIEW leaderboard_30d",
        "CREATE MATERIALIZED VIEW leaderboard_30d AS"
        " SELECT u.id AS user_id, u.handle, sum(l.delta_points)::bigint AS total_points"
        " FROM users u JOIN points_ledger l ON l.user_id = u.id"
        " WHERE u.role = 'PARTICIPANT' AND l.event_time >= now() - interval '30 days'"
        " GROUP BY u.id, u.handle, l.activity_code HAVING sum(l.delta_points) > 0",
    )
    verdict = by_check(await leaderboard(ctx, [THIRTY]))[f"{THIRTY}: vs ledger"]
    assert verdict.status is Status.CRIT
    assert "users appear in several rows (a missing group)" in verdict.summary
    assert "grouped by `u.id, u.handle, l.activity_code`, not by user alone" in verdict.summary
    diff = by_check(await leaderboard(ctx, [THIRTY]))[f"{THIRTY}: point differences"]
    assert any(r["rows_shown"] > 1 for r in diff.rows)


async def test_definition_reading_users_in_a_cte_is_not_called_wrong(
    ctx: RunContext, leaps_dsn: str
) -> None:
    """No `users` in the top-level FROM: who belongs is whom the definition gives."""
    await run(
        leaps_dsn,
        "DROP MATERIALIZED VIEW leaderboard_30d",
        "CREATE MATERIALIZED VIEW leaderboard_30d AS"
        " WITH board AS (SELECT u.id, u.handle FROM users u WHERE u.role = 'PARTICIPANT'),"
        " pts AS (SELECT l.user_id, sum(l.delta_points)::bigint AS total_points"
        "   FROM points_ledger l WHERE l.event_time >= now() - interval '30 days'"
        "   GROUP BY l.user_id)"
        " SELECT b.id AS user_id, b.handle, p.total_points FROM board b"
        " JOIN pts p ON p.user_id = b.id WHERE p.total_points > 0",
        "CREATE UNIQUE INDEX ON leaderboard_30d (user_id)",
    )
    verdict = by_check(await leaderboard(ctx, [THIRTY]))[f"{THIRTY}: vs ledger"]
    assert verdict.status is Status.OK, verdict.summary
    assert verdict.rows[0]["user_filter"] == "(whom the definition gives)"


async def test_unknown_view_is_a_usage_error(ctx: RunContext) -> None:
    with pytest.raises(UsageError, match="no materialized view `activity_metrics`"):
        await leaderboard(ctx, ["activity_metrics"])


async def test_leaderboard_over_slack(bot: RunningBot, faults: FaultInjector) -> None:
    await faults.double_counting_leaderboard()
    await faults.stale_views(points=300)
    resp = await bot.slash("leaderboard")
    assert resp.status == 200
    (call,) = await bot.fake.wait_for("chat.postEphemeral", timeout=30)
    text = "\n".join(section_texts(call))
    assert "a refresh would not fix it" in text
    assert "joins that multiply rows" in text
    assert "refresh fixes it: /db refresh-views leaderboard_30d" in text

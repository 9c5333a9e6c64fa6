"""`/db views` and `refresh-views` against a real PostgreSQL 15 with injected faults."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, LiteralString

import psycopg
import pytest
import pytest_asyncio
from psycopg import sql

from bot.approvals.executor import Executor
from bot.gateway import TargetGateway
from bot.router import RunContext
from commands.base import Status, UsageError
from commands.fixture.faults import FaultInjector
from commands.remedies.base import REMEDIES
from commands.remedies.refresh import REFRESH_VIEWS
from commands.views import CONFLICTING_MODES, views
from tests.conftest import FAST_THRESHOLDS

ALL_VIEWS = [
    "public.activity_metrics",
    "public.cohort_metrics",
    "public.leaderboard_30d",
    "public.leaderboard_totals",
    "public.school_metrics",
    "public.time_series_metrics",
]


@pytest_asyncio.fixture(loop_scope="session")
async def ctx(leaps_dsn: str) -> AsyncIterator[RunContext]:
    gateway = TargetGateway(leaps_dsn)
    yield RunContext(gateway, FAST_THRESHOLDS)
    await gateway.close()


async def one(dsn: str, query: LiteralString | sql.Composed, params: tuple[Any, ...] = ()) -> Any:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query, params or None)
        row = await cur.fetchone()
        assert row is not None
        return row[0]


async def points_shown(dsn: str, user_id: str) -> int:
    return int(
        await one(
            dsn,
            "SELECT coalesce(sum(total_points), 0) FROM leaderboard_totals WHERE user_id = %s",
            (user_id,),
        )
    )


def test_remedy_is_registered_with_its_roles() -> None:
    remedy = REMEDIES["refresh-views"]
    assert remedy is REFRESH_VIEWS
    assert (remedy.role, remedy.approver_role, remedy.approvers) == ("REVIEWER", "ADMIN", 1)


async def test_all_views_refresh_concurrently_inside_one_transaction(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    user_id = await faults.stale_views(points=500)
    before = await points_shown(leaps_dsn, user_id)

    plan = await REFRESH_VIEWS.plan(ctx, [])
    assert plan.data["views"] == ALL_VIEWS  # no view depends on another: alphabetical
    assert set(plan.data["modes"].values()) == {"concurrently"}
    assert plan.needs_approval is False
    assert plan.count == 6
    assert plan.warnings == []
    assert plan.steps[0].sql == (
        'REFRESH MATERIALIZED VIEW CONCURRENTLY "public"."activity_metrics"'
    )
    assert plan.locks.modes == list(CONFLICTING_MODES["concurrently"])
    assert "AccessShareLock" not in plan.locks.modes
    totals = next(t for t in plan.targets if t["view"] == "public.leaderboard_totals")
    assert totals["rows_exact"] and totals["rows"] == await one(
        leaps_dsn, "SELECT count(*) FROM leaderboard_totals"
    )

    # The executor wraps apply() in a transaction block: PostgreSQL 15 accepts
    # REFRESH ... CONCURRENTLY there (unlike CREATE INDEX CONCURRENTLY).
    state, outcome = await Executor(leaps_dsn).apply(REFRESH_VIEWS, plan, "apv-test1")
    assert state == "done", outcome
    assert outcome.affected == 6
    assert [r["view"] for r in outcome.rows] == ALL_VIEWS
    for row in outcome.rows:
        assert row["mode"] == "concurrently"
        assert isinstance(row["seconds"], float) and row["seconds"] >= 0
        schema, view = str(row["view"]).split(".")
        count = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, view))
        assert row["rows"] == await one(leaps_dsn, count)
    assert await points_shown(leaps_dsn, user_id) == before + 500


async def test_unpopulated_view_needs_a_plain_refresh_and_apply_fills_it(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    await faults.unpopulated_view("leaderboard_totals")
    plan = await REFRESH_VIEWS.plan(ctx, ["leaderboard_totals"])
    assert plan.data["modes"] == {"public.leaderboard_totals": "plain"}
    assert plan.needs_approval is True
    assert plan.steps[0].sql == 'REFRESH MATERIALIZED VIEW "public"."leaderboard_totals"'
    assert "not populated" in (plan.steps[0].note or "")
    assert any(
        "plain refresh of public.leaderboard_totals blocks every reader" in w for w in plan.warnings
    )
    assert plan.locks.modes == list(CONFLICTING_MODES["plain"])
    assert plan.targets[0]["populated"] is False and plan.targets[0]["rows"] is None

    state, outcome = await Executor(leaps_dsn).apply(REFRESH_VIEWS, plan, "apv-test1")
    assert state == "done", outcome
    populated = await one(
        leaps_dsn, "SELECT ispopulated FROM pg_matviews WHERE matviewname = 'leaderboard_totals'"
    )
    assert populated is True
    (row,) = outcome.rows
    assert row["view"] == "public.leaderboard_totals" and row["mode"] == "plain"
    assert row["rows"] == await one(leaps_dsn, "SELECT count(*) FROM leaderboard_totals")
    assert row["rows"] > 0


async def test_view_without_unique_index_is_refreshed_plain_with_a_warning(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    await faults.drop_view_unique_index("time_series_metrics")
    plan = await REFRESH_VIEWS.plan(ctx, ["all"])
    assert plan.data["modes"]["public.time_series_metrics"] == "plain"
    assert plan.data["modes"]["public.leaderboard_totals"] == "concurrently"
    assert plan.needs_approval is True
    assert any(
        w.startswith("plain refresh of public.time_series_metrics blocks every reader")
        and "unique index" in w
        for w in plan.warnings
    )
    assert any("one transaction" in w for w in plan.warnings)
    state, outcome = await Executor(leaps_dsn).apply(REFRESH_VIEWS, plan, "apv-test1")
    assert state == "done", outcome
    modes = {r["view"]: r["mode"] for r in outcome.rows}
    assert modes["public.time_series_metrics"] == "plain"


async def test_view_names_are_resolved_from_the_catalog(ctx: RunContext) -> None:
    plan = await REFRESH_VIEWS.plan(ctx, ["Leaderboard_Totals", "public.leaderboard_30d"])
    assert sorted(plan.data["views"]) == ["public.leaderboard_30d", "public.leaderboard_totals"]
    assert plan.locks.relations == ["leaderboard_30d", "leaderboard_totals"]

    with pytest.raises(UsageError) as info:
        await REFRESH_VIEWS.plan(ctx, ["leaderbord_totals"])
    message = str(info.value)
    assert "no materialized view `leaderbord_totals`" in message
    assert "did you mean `leaderboard_totals`" in message
    assert "public.school_metrics" in message  # the real views are listed

    with pytest.raises(UsageError, match="`all`"):
        await REFRESH_VIEWS.plan(ctx, ["all", "school_metrics"])


async def test_views_refresh_after_the_views_they_read(ctx: RunContext, leaps_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
        # aaa_top reads leaderboard_totals directly; aab_recent through a plain view.
        await conn.execute(
            "CREATE MATERIALIZED VIEW aaa_top AS"
            " SELECT user_id, total_points FROM leaderboard_totals WHERE total_points > 0"
        )
        await conn.execute("CREATE UNIQUE INDEX aaa_top_key ON aaa_top (user_id)")
        await conn.execute("CREATE VIEW mid_recent AS SELECT * FROM leaderboard_30d")
        await conn.execute("CREATE MATERIALIZED VIEW aab_recent AS SELECT user_id FROM mid_recent")

    plan = await REFRESH_VIEWS.plan(ctx, [])
    order = plan.data["views"]
    assert order.index("public.aaa_top") > order.index("public.leaderboard_totals")
    assert order.index("public.aab_recent") > order.index("public.leaderboard_30d")
    assert order.index("public.activity_metrics") < order.index("public.cohort_metrics")
    assert plan.data["modes"]["public.aab_recent"] == "plain"  # no unique index
    state, outcome = await Executor(leaps_dsn).apply(REFRESH_VIEWS, plan, "apv-test1")
    assert state == "done", outcome
    assert [r["view"] for r in outcome.rows] == order


async def test_lock_holder_is_named_and_offered_for_termination(
    ctx: RunContext, leaps_dsn: str
) -> None:
    """LOCK TABLE refuses materialized views, so the holder is a refresh left in an open
    transaction (ACCESS EXCLUSIVE until it ends); a plain reader of another view is
    shown to block only a plain refresh."""
    holder = await psycopg.AsyncConnection.connect(leaps_dsn, application_name="lock-holder")
    reader = await psycopg.AsyncConnection.connect(leaps_dsn, application_name="reader")
    try:
        await holder.execute("REFRESH MATERIALIZED VIEW leaderboard_totals")
        await reader.execute("SELECT count(*) FROM leaderboard_30d")
        holder_pid = holder.info.backend_pid

        # The plan reads only the catalog for a locked view, so it still arrives.
        plan = await REFRESH_VIEWS.plan(ctx, ["leaderboard_totals", "leaderboard_30d"])
        targets = {t["view"]: t for t in plan.targets}
        locked = targets["public.leaderboard_totals"]
        assert locked["blocked_by"] == [holder_pid]
        assert locked["rows"] is None or not locked["rows_exact"]
        assert targets["public.leaderboard_30d"]["blocked_by"] == []  # readers do not block
        assert any(f"pid {holder_pid} (lock-holder" in w for w in plan.warnings)

        state, outcome = await Executor(leaps_dsn, lock_timeout_ms=300).apply(
            REFRESH_VIEWS, plan, "apv-test1"
        )
        assert state == "failed"
        assert f"pid {holder_pid}" in outcome.summary
        assert outcome.offers == [f"terminate {holder_pid}"]
        assert [r["pid"] for r in outcome.rows] == [holder_pid]
    finally:
        for conn in (holder, reader):
            await conn.rollback()
            await conn.close()


async def test_readers_block_a_plain_refresh(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    await faults.drop_view_unique_index("school_metrics")
    reader = await psycopg.AsyncConnection.connect(leaps_dsn, application_name="reader")
    try:
        await reader.execute("SELECT count(*) FROM school_metrics")
        plan = await REFRESH_VIEWS.plan(ctx, ["school_metrics"])
        assert plan.targets[0]["blocked_by"] == [reader.info.backend_pid]
        assert "AccessShareLock" in plan.locks.modes
    finally:
        await reader.rollback()
        await reader.close()


async def test_drift_aborts_and_refreshes_nothing(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    user_id = await faults.stale_views(points=300)
    before = await points_shown(leaps_dsn, user_id)
    plan = await REFRESH_VIEWS.plan(ctx, [])
    async with await psycopg.AsyncConnection.connect(leaps_dsn, autocommit=True) as conn:
        await conn.execute("DROP MATERIALIZED VIEW school_metrics")

    state, outcome = await Executor(leaps_dsn).apply(REFRESH_VIEWS, plan, "apv-test1")
    assert state == "aborted"
    assert "drift" in outcome.summary
    assert "public.school_metrics is gone" in outcome.summary
    assert await points_shown(leaps_dsn, user_id) == before  # leaderboard not refreshed


async def test_a_view_that_changes_mode_is_drift(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    plan = await REFRESH_VIEWS.plan(ctx, ["leaderboard_totals"])
    await faults.unpopulated_view("leaderboard_totals")
    state, outcome = await Executor(leaps_dsn).apply(REFRESH_VIEWS, plan, "apv-test1")
    assert state == "aborted"
    assert "now needs a plain refresh" in outcome.summary


async def test_views_report_one_finding_per_view(
    ctx: RunContext, faults: FaultInjector, leaps_dsn: str
) -> None:
    await faults.unpopulated_view("leaderboard_totals")
    await faults.drop_view_unique_index("time_series_metrics")

    report = await views(ctx, [])
    by_check = {f.check: f for f in report.findings}
    assert set(by_check) == {f"view {v}" for v in ALL_VIEWS}
    totals = by_check["view public.leaderboard_totals"]
    assert totals.status is Status.CRIT and "NOT populated" in totals.summary
    assert totals.hint is not None and "refresh-views leaderboard_totals" in totals.hint
    series = by_check["view public.time_series_metrics"]
    assert series.status is Status.WARN and "no usable unique index" in series.summary
    cohort = by_check["view public.cohort_metrics"]
    assert cohort.status is Status.OK
    assert "concurrently refreshable (unique index cohort_metrics_cohort_key)" in cohort.summary
    assert "no refresh recorded by the bot" in cohort.summary
    assert cohort.rows[0]["rows"] == await one(leaps_dsn, "SELECT count(*) FROM cohort_metrics")
    assert report.findings[0] is totals  # worst first

    now = datetime.now(UTC)
    records: dict[str, dict[str, Any]] = {
        "public.cohort_metrics": {
            "started_at": now - timedelta(minutes=5, seconds=2),
            "finished_at": now - timedelta(minutes=5),
            "rows": 7,
            "error": None,
            "mode": "concurrently",
        },
        "school_metrics": {  # a bare name is found as well; naive means UTC
            "started_at": (now - timedelta(hours=2)).replace(tzinfo=None),
            "finished_at": None,
            "rows": None,
            "error": "canceling statement due to lock timeout",
            "mode": "concurrently",
        },
    }

    async def refresh_log() -> dict[str, dict[str, Any]]:
        return records

    report = await views(RunContext(ctx.gateway, FAST_THRESHOLDS, refresh_log=refresh_log), [])
    by_check = {f.check: f for f in report.findings}
    cohort = by_check["view public.cohort_metrics"]
    assert "last refreshed by the bot 5m00s ago (concurrently, 7 rows, took 2s)" in cohort.summary
    school = by_check["view public.school_metrics"]
    assert school.status is Status.WARN
    assert "failed 2h00m ago" in school.summary and "lock timeout" in school.summary

    with pytest.raises(UsageError):
        await views(ctx, ["extra"])
